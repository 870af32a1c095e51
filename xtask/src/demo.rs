//! `cargo xtask demo`: the main job, end to end, on this machine.
//!
//! Starts an agent with its own socket, state and pin directories, makes two pods
//! (network namespaces) through `hypha-cni` exactly as a runtime would, dual stack (an
//! IPv4 and an IPv6 address each), shows them talking through the eBPF datapath over
//! both families, prints the endpoint list with its addresses and counters, and removes
//! everything it made, also when interrupted with Ctrl-C.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, output, workspace_root};

const POD_CIDR: &str = "10.199.0.0/24";
/// The IPv6 pod CIDR, a ULA of its own (not the host's `fd00::/64`).
const POD_CIDR6: &str = "fd00:10:199::/64";
const GATEWAY: &str = "10.199.0.1/32";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// Everything the demo made, so that one function can take it all down.
#[derive(Default)]
struct Made {
    agent: Option<Child>,
    pods: Vec<(String, String)>, // (netns name, container id)
    tmp: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
    ip_forward_before: Option<String>,
    ipv6_forwarding_before: Option<String>,
    cleaned: bool,
}

struct Demo {
    bin: PathBuf,
    socket: PathBuf,
    made: Arc<Mutex<Made>>,
}

pub fn run() -> Result<()> {
    let pid = std::process::id();
    let tmp = std::env::temp_dir().join(format!("hypha-demo-{pid}"));
    std::fs::create_dir_all(&tmp)?;
    let demo = Demo {
        bin: workspace_root().join("target/debug"),
        socket: tmp.join("agent.sock"),
        made: Arc::new(Mutex::new(Made {
            tmp: Some(tmp.clone()),
            pin_dir: Some(PathBuf::from(format!("/sys/fs/bpf/hypha-demo-{pid}"))),
            ip_forward_before: std::fs::read_to_string(IP_FORWARD).ok(),
            ipv6_forwarding_before: std::fs::read_to_string(IPV6_FORWARDING).ok(),
            ..Made::default()
        })),
    };
    let made = demo.made.clone();
    let bin = demo.bin.clone();
    let socket = demo.socket.clone();
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: cleaning up");
        cleanup(&made, &bin, &socket);
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    let result = demo.steps(pid, &tmp);
    cleanup(&demo.made, &demo.bin, &demo.socket);
    result
}

impl Demo {
    fn hypha(&self, args: &[&str]) -> Result<String> {
        output(
            Command::new(self.bin.join("hypha"))
                .args(args)
                .arg("--socket")
                .arg(&self.socket),
        )
    }

    fn steps(&self, pid: u32, tmp: &Path) -> Result<()> {
        let pin_dir = self.made.lock().unwrap().pin_dir.clone().expect("set");
        step("Starting the agent");
        let log = std::fs::File::create(tmp.join("agent.log"))?;
        let agent = Command::new(self.bin.join("hypha"))
            .arg("agent")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(tmp.join("state"))
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args(["--pod-cidr", &format!("{POD_CIDR},{POD_CIDR6}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting hypha agent")?;
        self.made.lock().unwrap().agent = Some(agent);
        wait_for(|| self.hypha(&["status"]).is_ok(), Duration::from_secs(15)).with_context(
            || {
                format!(
                    "the agent did not come up; see {}",
                    tmp.join("agent.log").display()
                )
            },
        )?;
        print!("{}", self.hypha(&["status"])?);

        let mut addrs = Vec::new();
        for name in ["a", "b"] {
            let netns = format!("hypha-demo-{pid}-{name}");
            let container_id = format!("demo{pid}{name}");
            step(&format!(
                "Pod {name}: netns {netns}, CNI ADD through hypha-cni"
            ));
            util::run(Command::new("ip").args(["netns", "add", &netns]))?;
            self.made
                .lock()
                .unwrap()
                .pods
                .push((netns.clone(), container_id.clone()));
            util::run(
                Command::new("ip").args(["netns", "exec", &netns, "ip", "link", "set", "lo", "up"]),
            )?;
            let result = cni(&self.bin, "ADD", &container_id, &netns, &self.socket)?;
            println!("{result}");
            let json: serde_json::Value = serde_json::from_str(&result)?;
            let family = |v6: bool| -> Result<String> {
                json["ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|ip| ip["address"].as_str()?.split('/').next())
                    .find(|a| a.contains(':') == v6)
                    .map(str::to_owned)
                    .with_context(|| {
                        format!(
                            "CNI result without an {} address: {result}",
                            if v6 { "IPv6" } else { "IPv4" }
                        )
                    })
            };
            addrs.push((netns, family(false)?, family(true)?));
        }
        let (a_ns, a_ip, a_ip6) = &addrs[0];
        let (b_ns, b_ip, b_ip6) = &addrs[1];

        step(&format!("Pod a ({a_ip}) pings pod b ({b_ip})"));
        util::run(
            Command::new("ip").args(["netns", "exec", a_ns, "ping", "-c", "3", "-i", "0.2", b_ip]),
        )?;
        step(&format!("Pod a ({a_ip6}) pings pod b ({b_ip6}) over IPv6"));
        util::run(Command::new("ip").args([
            "netns", "exec", a_ns, "ping", "-6", "-c", "3", "-i", "0.2", b_ip6,
        ]))?;

        step("A 3-second TCP transfer from pod a to pod b (iperf3)");
        let mut server = Command::new("ip")
            .args(["netns", "exec", b_ns, "iperf3", "-s", "-1"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting iperf3 in pod b")?;
        std::thread::sleep(Duration::from_millis(300));
        let client = util::run(Command::new("ip").args([
            "netns", "exec", a_ns, "iperf3", "-c", b_ip, "-t", "3", "-f", "g",
        ]));
        let _ = server.kill();
        let _ = server.wait();
        client?;

        step(
            "Endpoints, both addresses, and their counters (TX-REDIR: carried pod-to-pod by bpf_redirect_peer)",
        );
        print!("{}", self.hypha(&["endpoint", "list"])?);
        let eps: serde_json::Value =
            serde_json::from_str(&self.hypha(&["endpoint", "list", "-o", "json"])?)?;
        let redirected = |counters: &str| -> u64 {
            eps.as_array()
                .map(|v| {
                    v.iter()
                        .filter_map(|e| e[counters]["egress"]["redirected"]["packets"].as_u64())
                        .sum()
                })
                .unwrap_or(0)
        };
        let (all, ipv6) = (redirected("counters"), redirected("counters6"));
        if all == 0 {
            bail!("the eBPF datapath redirected no packets: traffic did not take the eBPF path");
        }
        if ipv6 == 0 {
            bail!("the eBPF datapath redirected no IPv6 packets: IPv6 did not take the eBPF path");
        }
        step(&format!(
            "The eBPF datapath carried {all} packets between the pods ({ipv6} of them IPv6); cleaning up"
        ));
        Ok(())
    }
}

fn step(s: &str) {
    println!("\n==> {s}");
    let _ = std::io::stdout().flush();
}

fn cni(
    bin: &Path,
    command: &str,
    container_id: &str,
    netns: &str,
    socket: &Path,
) -> Result<String> {
    let conf = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "hypha-demo",
        "type": "hypha-cni",
        "agentSocket": socket,
    });
    let mut child = Command::new(bin.join("hypha-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", format!("/run/netns/{netns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin:/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running hypha-cni")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "hypha-cni {command} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// `FAMILY NAME` of every nftables table named after one of the demo's pod CIDRs
/// (`hypha_10_199_0_0_24`, and the IPv6 CIDR's, in whatever family the agent made them).
fn demo_nft_tables() -> Vec<String> {
    let Ok(listing) = output(Command::new("nft").args(["list", "tables"])) else {
        return Vec::new();
    };
    let marks = ["hypha_10_199_0_0_24", "fd00_10_199_"];
    listing
        .lines()
        .filter_map(|l| l.strip_prefix("table "))
        .filter(|t| marks.iter().any(|m| t.contains(m)))
        .map(str::to_owned)
        .collect()
}

fn wait_for(mut ready: impl FnMut() -> bool, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("not ready after {limit:?}")
}

/// Takes down everything the demo made; safe to call twice and from the Ctrl-C handler.
fn cleanup(made: &Mutex<Made>, bin: &Path, socket: &Path) {
    let mut m = match made.lock() {
        Ok(m) => m,
        Err(p) => p.into_inner(),
    };
    if m.cleaned {
        return;
    }
    m.cleaned = true;
    for (netns, container_id) in m.pods.iter().rev() {
        // The pod's processes first (the iperf3 pair, when interrupted mid-transfer): a
        // process left in a deleted namespace runs on, orphaned.
        if let Err(e) = util::end_netns_processes(&Path::new("/run/netns").join(netns)) {
            eprintln!("cleanup: {e:#}");
        }
        if let Err(e) = cni(bin, "DEL", container_id, netns, socket) {
            eprintln!("cleanup: {e:#}");
        }
        if let Err(e) = output(Command::new("ip").args(["netns", "del", netns])) {
            eprintln!("cleanup: {e:#}");
        }
    }
    if let Some(mut agent) = m.agent.take() {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
        let _ = agent.wait();
    }
    // What the agent leaves in place on purpose (so pods survive its restarts) goes too.
    let _ = Command::new("ip")
        .args(["addr", "del", GATEWAY, "dev", "lo"])
        .stderr(Stdio::null())
        .status();
    // The agent's masquerade tables: one per pod CIDR, named after it.
    for table in demo_nft_tables() {
        let _ = Command::new("nft")
            .args(["delete", "table"])
            .args(table.split_whitespace())
            .stderr(Stdio::null())
            .status();
    }
    if let Some(before) = &m.ip_forward_before {
        let _ = std::fs::write(IP_FORWARD, before);
    }
    if let Some(before) = &m.ipv6_forwarding_before {
        let _ = std::fs::write(IPV6_FORWARDING, before);
    }
    for dir in [m.pin_dir.take(), m.tmp.take()].into_iter().flatten() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The pid of the running `cluster-demo`, for the signal handler (0: none).
static CLUSTER_DEMO_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Passes SIGINT or SIGTERM on to `cluster-demo`, which stops and cleans up (a Ctrl-C at
/// the terminal reaches it anyway; a SIGTERM of xtask alone would not). Only kill(2),
/// which is async-signal-safe.
extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CLUSTER_DEMO_PID.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's,
        // not reaped before the handlers are restored.
        unsafe { libc::kill(pid, sig) };
    }
}

/// `cargo xtask demo --cluster`: the `cluster-demo` binary of hypha-tests (etcd, three
/// nodes, two pods each, cross-node traffic, a policy and its drop in `hypha monitor`,
/// `hypha node list`; see `tests/src/bin/cluster_demo.rs`). xtask only runs it: the
/// cluster harness and its etcd client are not xtask's dependencies. It cleans up after
/// itself, also when interrupted; xtask waits for it to finish doing so.
pub fn run_cluster() -> Result<()> {
    let bin = workspace_root().join("target/debug/cluster-demo");
    let mut child = Command::new(&bin)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    CLUSTER_DEMO_PID.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
    let handler = forward_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only loads an atomic and calls kill(2).
    let previous = unsafe {
        [
            libc::signal(libc::SIGINT, handler),
            libc::signal(libc::SIGTERM, handler),
        ]
    };
    let status = child.wait();
    // SAFETY: restores the dispositions found above.
    unsafe {
        libc::signal(libc::SIGINT, previous[0]);
        libc::signal(libc::SIGTERM, previous[1]);
    }
    CLUSTER_DEMO_PID.store(0, std::sync::atomic::Ordering::SeqCst);
    let status = status.with_context(|| format!("waiting for {}", bin.display()))?;
    if status.code() == Some(130) {
        // Interrupted; it has said so and cleaned up.
        std::process::exit(130);
    }
    if !status.success() {
        bail!("{} failed with {status}", bin.display());
    }
    Ok(())
}
