//! `cluster-demo`: what `cargo xtask demo --cluster` runs (a binary of hypha-tests
//! because it drives the cluster harness, whose etcd client xtask must not depend on).
//!
//! etcd and three simulated nodes ([`Cluster`]: an underlay namespace with a bridge and
//! etcd, a namespace per node with its agent in cluster mode, tunnel routing), two pods
//! per node through `hypha-cni`, cross-node ping and TCP over both families through the
//! VXLAN overlay, one policy applied on node-2 and the drop it causes on node-0 as
//! `hypha monitor` prints it there, `hypha node list` and `hypha endpoint list`. Every
//! step checks what it shows; the demo fails (exit 1) when one does not hold.
//!
//! Everything is taken down on the way out: the harness's `Drop`s (agents, namespaces
//! with their VXLAN devices and pods, pins, directories, etcd and its data), also on an
//! error, a panic, or SIGINT/SIGTERM: those are blocked in every thread and waited for
//! by one, which marks the demo interrupted; the next step then stops it (exit 130).

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::IpAddr;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use hypha_tests::cluster::{Cluster, ClusterOpts};
use hypha_tests::netns::NamedNetns;
use hypha_tests::node::{Node, Pod};
use hypha_tests::traffic::{TcpEcho, tcp_ok};
use nix::sys::signal::{SigHandler, SigSet, Signal, signal};

/// Set by the signal thread on SIGINT or SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The policy the demo applies on node-2: pods `app=db` accept TCP 5432 from pods
/// `app=web` only, wherever they run.
const DB_FROM_WEB: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-from-web
  namespace: default
spec:
  podSelector:
    matchLabels:
      app: db
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: web
    ports:
    - protocol: TCP
      port: 5432
"#;

/// The pods: (node, name, app label).
const PODS: [(usize, &str, &str); 6] = [
    (0, "web-0", "web"),
    (0, "db-0", "db"),
    (1, "web-1", "web"),
    (1, "client-1", "client"),
    (2, "web-2", "web"),
    (2, "client-2", "client"),
];

fn main() -> ExitCode {
    if !hypha_tests::privileged() {
        eprintln!("cluster-demo runs as root (network namespaces, eBPF programs, pins)");
        return ExitCode::FAILURE;
    }
    if let Err(e) = watch_signals() {
        eprintln!("cluster-demo: {e:#}");
        return ExitCode::FAILURE;
    }
    let started = Instant::now();
    // `run` owns the cluster: whichever way it returns, everything is dropped by then.
    let result = run();
    let interrupted = INTERRUPTED.load(Ordering::SeqCst);
    match result {
        Ok(()) if !interrupted => {
            step(&format!(
                "Done in {:.1} s; everything the demo made is gone",
                started.elapsed().as_secs_f64()
            ));
            ExitCode::SUCCESS
        }
        _ if interrupted => {
            eprintln!("interrupted: everything the demo made is gone");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("cluster-demo failed: {e:#}\n(everything it made is gone)");
            ExitCode::FAILURE
        }
        Ok(()) => unreachable!("handled above"),
    }
}

/// SIGINT and SIGTERM blocked in this thread (before any other exists, so every thread
/// inherits the mask; children get an empty mask from `std::process`) and waited for on
/// a thread of their own. Their dispositions are reset first: a parent's `SIG_IGN`
/// survives exec and would discard them.
fn watch_signals() -> Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: installs the default disposition, no handler code runs.
        unsafe { signal(sig, SigHandler::SigDfl) }
            .with_context(|| format!("resetting the disposition of {sig}"))?;
    }
    set.thread_block().context("blocking SIGINT and SIGTERM")?;
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            if !INTERRUPTED.swap(true, Ordering::SeqCst) {
                eprintln!("\n{sig}: stopping after this step, then cleaning up");
            }
        }
    });
    Ok(())
}

/// Stops the demo (through `?`) once it has been interrupted.
fn go_on() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn step(s: &str) {
    println!("\n==> {s}");
    let _ = std::io::stdout().flush();
}

/// Runs `cmd` (argv), printing its output as it comes; fails unless it succeeds.
fn show(cmd: &[&str]) -> Result<()> {
    let status = Command::new(cmd[0])
        .args(&cmd[1..])
        .status()
        .with_context(|| format!("running {}", cmd.join(" ")))?;
    if !status.success() {
        bail!("{} failed: {status}", cmd.join(" "));
    }
    Ok(())
}

/// `hypha ARGS` against `node`'s agent: its output, or an error with it.
fn hypha(node: &Node, args: &[&str]) -> Result<String> {
    let (ok, out, err) = node.hypha(args);
    if !ok {
        bail!("hypha {} failed: {out}{err}", args.join(" "));
    }
    Ok(out)
}

/// A pod's addresses, its interface MTU, as the CNI result gave them.
fn describe(pod: &Pod) -> String {
    let mtu = pod.result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["sandbox"].is_string())
        .and_then(|i| i["mtu"].as_u64())
        .map_or_else(|| "-".to_owned(), |m| m.to_string());
    let addresses: Vec<String> = pod.addresses().iter().map(IpAddr::to_string).collect();
    format!("{} (mtu {mtu})", addresses.join(", "))
}

fn run() -> Result<()> {
    step(
        "Starting etcd and three nodes (a network namespace each on an underlay bridge, an agent in each)",
    );
    let c = Cluster::start(3, ClusterOpts::default());
    go_on()?;
    for (i, node) in c.nodes.iter().enumerate() {
        println!(
            "node-{i}: underlay {}, pod CIDRs {} {}",
            c.node_ip(i),
            node.pod_cidr,
            node.pod_cidr6.as_deref().unwrap_or("")
        );
    }
    println!("\nnode-0's agent:");
    print!("{}", hypha(&c.nodes[0], &["status"])?);
    go_on()?;

    step("Two pods per node, each through hypha-cni ADD");
    let mut pods = Vec::new();
    for (i, name, app) in PODS {
        let pod = c.nodes[i].add_labelled_pod(name, "default", &[("app", app)]);
        println!("{name} on node-{i} (app={app}): {}", describe(&pod));
        pods.push(pod);
        go_on()?;
    }
    let pod = |name: &str| {
        let k = PODS.iter().position(|p| p.1 == name).expect("a demo pod");
        &pods[k]
    };
    let (web0, db0, web1, client1, web2) = (
        pod("web-0"),
        pod("db-0"),
        pod("web-1"),
        pod("client-1"),
        pod("web-2"),
    );
    // node-1 learns node-0's pods through the store before it can reach them.
    let known = Cluster::eventually(Duration::from_secs(10), || {
        hypha_tests::traffic::ping_ok(&web1.netns, db0.address)
    });
    if !known {
        bail!(
            "web-1 (node-1) cannot reach db-0 (node-0) after 10 s\nnode-1's agent log:\n{}",
            log_tail(&c.nodes[1])
        );
    }

    for (from, from_name, to, to_name) in [
        (web1, "web-1 (node-1)", db0, "db-0 (node-0)"),
        (web2, "web-2 (node-2)", web0, "web-0 (node-0)"),
    ] {
        step(&format!(
            "{from_name}, {}, pings {to_name}, {}",
            from.address, to.address
        ));
        ping_in(&from.netns, IpAddr::V4(to.address))?;
        go_on()?;
        step(&format!(
            "{from_name}, {}, pings {to_name}, {}, over IPv6",
            from.v6(),
            to.v6()
        ));
        ping_in(&from.netns, IpAddr::V6(to.v6()))?;
        go_on()?;
    }

    for to in [IpAddr::V4(db0.address), IpAddr::V6(db0.v6())] {
        step(&format!(
            "A 2-second TCP transfer from web-1 (node-1) to db-0 (node-0) at {to} (iperf3)"
        ));
        iperf3(&web1.netns, &db0.netns, to)?;
        go_on()?;
    }

    step(
        "node-2 applies a policy (to the cluster, through etcd): db accepts TCP 5432 from web only",
    );
    print!("{DB_FROM_WEB}");
    let file = c.nodes[2].dir.join("db-from-web.yaml");
    std::fs::write(&file, DB_FROM_WEB).with_context(|| format!("writing {}", file.display()))?;
    print!(
        "{}",
        hypha(
            &c.nodes[2],
            &["policy", "apply", "-f", &file.display().to_string()]
        )?
    );
    println!("(node-2 runs no db pod, so it writes no entries; node-0 enforces it for db-0)");
    let _db = TcpEcho::start(&db0.netns, 5432);
    let monitor = TextMonitor::start(&c.nodes[0])?;
    // node-0 enforces it once its watch has it: client-1's connection is refused then.
    let enforced = Cluster::eventually(Duration::from_secs(10), || {
        !tcp_ok(&client1.netns, db0.address, 5432)
    });
    if !enforced {
        bail!(
            "node-0 does not enforce node-2's policy after 10 s\nnode-0's agent log:\n{}",
            log_tail(&c.nodes[0])
        );
    }
    go_on()?;
    step(&format!(
        "web-1 (node-1) → db-0:5432 (node-0): {}",
        verdict(tcp_ok(&web1.netns, db0.address, 5432))
    ));
    let refused = !tcp_ok(&client1.netns, db0.address, 5432);
    step(&format!(
        "client-1 (node-1) → db-0:5432 (node-0): {}",
        verdict(!refused)
    ));
    if !refused || !tcp_ok(&web1.netns, db0.address, 5432) {
        bail!("the policy does not do what it says");
    }
    step("hypha monitor --type drop on node-0 (the drop, its source's identity and the policy)");
    let lines = monitor.lines(Duration::from_secs(2));
    for l in &lines {
        println!("{l}");
    }
    let client = client1.address.to_string();
    if !lines.iter().any(|l| l.contains(&client)) {
        bail!("node-0's monitor did not show the drop of client-1's {client}");
    }
    drop(monitor);
    go_on()?;

    step("hypha node list on node-0 (traffic with each other node through the tunnel)");
    print!("{}", hypha(&c.nodes[0], &["node", "list"])?);
    step("hypha endpoint list on node-0");
    print!("{}", hypha(&c.nodes[0], &["endpoint", "list"])?);

    step("Cleaning up: pods, agents, namespaces (with the VXLAN devices), pins, etcd");
    drop(_db);
    drop(pods);
    drop(c);
    Ok(())
}

/// The last 20 lines of `node`'s agent log.
fn log_tail(node: &Node) -> String {
    let log = node.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn verdict(ok: bool) -> &'static str {
    if ok { "connected" } else { "refused (dropped)" }
}

/// `ping -c 3` of `to` inside `ns`, its output shown.
fn ping_in(ns: &NamedNetns, to: IpAddr) -> Result<()> {
    let to = to.to_string();
    let mut cmd = vec!["ip", "netns", "exec", ns.name(), "ping"];
    if to.contains(':') {
        cmd.push("-6");
    }
    cmd.extend(["-c", "3", "-i", "0.2", "-W", "2", &to]);
    show(&cmd)
}

/// iperf3 from `client` to a one-off server in `server` at `to`, for 2 s.
fn iperf3(client: &NamedNetns, server: &NamedNetns, to: IpAddr) -> Result<()> {
    let mut srv = Command::new("ip")
        .args(["netns", "exec", server.name(), "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting iperf3 in db-0")?;
    std::thread::sleep(Duration::from_millis(300));
    let to = to.to_string();
    let ran = show(&[
        "ip",
        "netns",
        "exec",
        client.name(),
        "iperf3",
        "-c",
        &to,
        "-t",
        "2",
        "-f",
        "g",
    ]);
    let _ = srv.kill();
    let _ = srv.wait();
    ran
}

/// `hypha monitor --type drop` (its text output) on a node, lines read on a thread;
/// killed on drop.
struct TextMonitor {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl TextMonitor {
    fn start(node: &Node) -> Result<TextMonitor> {
        let mut child = Command::new(hypha_tests::binary("hypha"))
            .args(["monitor", "--type", "drop", "--socket"])
            .arg(node.socket())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting hypha monitor")?;
        let stdout = child.stdout.take().context("hypha monitor's stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Subscribed before the traffic it should see.
        std::thread::sleep(Duration::from_millis(300));
        Ok(TextMonitor { child, lines })
    }

    /// What it printed so far and until `quiet` passes without a line.
    fn lines(&self, quiet: Duration) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(quiet) {
            out.push(l);
            if out.len() > 50 {
                break;
            }
        }
        out
    }
}

impl Drop for TextMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
