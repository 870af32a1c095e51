//! The three ways of joining two pods that the datapath bench compares, made with unique
//! names and recorded in the [`Teardown`] before they are made.
//!
//! - `veth`: the two namespaces joined by one veth pair, nothing else: the physical limit.
//! - `bridge`: the reference `bridge` + `host-local` CNI plugins, as a runtime calls them.
//! - `hypha`: a Hypha agent in a "node" namespace of its own, pods made by `hypha-cni`.
//!
//! Each is IPv4, or dual stack ([`create_dual`]): then the pods also get an IPv6 address
//! in `fd00:4862:A:B::/64` (the IPv4 subnet's octets as groups; never the host's own
//! `fd00::/64`).

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::teardown::{Teardown, Undo};
use crate::util::{describe, output};

const CNI_PATH: &str = "/usr/lib/cni";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Veth,
    Bridge,
    Hypha,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Veth => "veth",
            Kind::Bridge => "bridge",
            Kind::Hypha => "hypha",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::Veth => "two namespaces joined by one veth pair (the physical limit)",
            Kind::Bridge => "reference CNI plugins: bridge + host-local",
            Kind::Hypha => "Hypha agent + hypha-cni, eBPF datapath (bpf_redirect_peer)",
        }
    }
}

/// Names, subnets and paths of one bench run; every name carries the pid.
pub struct Plan {
    pub uniq: u32,
    /// Holds the agent's socket and state, host-local's data dir.
    pub tmp: PathBuf,
    /// `target/release`, where `hypha` and `hypha-cni` are.
    pub bin: PathBuf,
    /// Where the agent's log goes (kept after the run).
    pub agent_log: PathBuf,
    /// Second octet and three third octets: `10.A.B.0/24` for veth, bridge, hypha.
    octets: (u8, [u8; 3]),
}

impl Plan {
    pub fn new(bin: PathBuf, agent_log: PathBuf) -> Result<Self> {
        Self::in_range(bin, agent_log, 200, 41)
    }

    /// Like [`Plan::new`], with the subnets in `10.first.0.0` to `10.(first+count-1).255.0`
    /// instead, for a bench that may run beside those using [`Plan::new`].
    pub fn in_range(bin: PathBuf, agent_log: PathBuf, first: u8, count: u8) -> Result<Self> {
        let uniq = std::process::id();
        let taken = host_prefixes()?;
        let (first, count) = (u32::from(first), u32::from(count.max(1)));
        // Starting from a pid-derived place, skipping any /24 the host already routes
        // (another bench's bridge, a real network).
        let third = ((uniq / count) % 84 * 3) as u8;
        let octets = (0..count)
            .map(|k| {
                (
                    (first + (uniq + k) % count) as u8,
                    [third, third + 1, third + 2],
                )
            })
            .find(|(a, bs)| {
                bs.iter().all(|b| {
                    let net = u32::from(Ipv4Addr::new(10, *a, *b, 0));
                    !taken.iter().any(|t| overlaps((net, 24), *t))
                })
            })
            .with_context(|| {
                format!(
                    "every candidate subnet in 10.{first}-10.{} overlaps a host route",
                    first + count - 1
                )
            })?;
        Ok(Self {
            uniq,
            tmp: std::env::temp_dir().join(format!("hypb-{uniq}")),
            bin,
            agent_log,
            octets,
        })
    }

    fn subnet(&self, kind: Kind) -> (u8, u8) {
        let i = match kind {
            Kind::Veth => 0,
            Kind::Bridge => 1,
            Kind::Hypha => 2,
        };
        (self.octets.0, self.octets.1[i])
    }

    /// The IPv6 `/64` of `kind`'s dual-stack setup, beside its IPv4 `/24`.
    fn subnet6(&self, kind: Kind) -> String {
        let (a, b) = self.subnet(kind);
        format!("fd00:4862:{a}:{b}::/64")
    }

    pub fn netns(&self, what: &str) -> String {
        format!("hypb-{}-{what}", self.uniq)
    }
}

/// Two pods ready for traffic from `client` to `server`.
#[derive(Clone)]
pub struct Pods {
    pub client_ns: String,
    pub server_ns: String,
    pub client_ip: Ipv4Addr,
    pub server_ip: Ipv4Addr,
    /// Their IPv6 addresses, in a dual-stack setup ([`create_dual`]).
    pub client_ip6: Option<Ipv6Addr>,
    pub server_ip6: Option<Ipv6Addr>,
    /// The agent's socket (hypha only), for its counters.
    pub agent_socket: Option<PathBuf>,
}

impl Pods {
    /// The server's IPv6 (`ipv6`) or IPv4 address, if the setup has that family.
    pub fn server(&self, ipv6: bool) -> Option<IpAddr> {
        if ipv6 {
            self.server_ip6.map(IpAddr::V6)
        } else {
            Some(IpAddr::V4(self.server_ip))
        }
    }
}

/// `kind`'s IPv4 setup.
pub fn create(kind: Kind, plan: &Plan, td: &Teardown) -> Result<Pods> {
    create_families(kind, plan, td, false)
}

/// `kind`'s dual-stack setup: as [`create`]'s, each pod with an IPv6 address too.
pub fn create_dual(kind: Kind, plan: &Plan, td: &Teardown) -> Result<Pods> {
    create_families(kind, plan, td, true)
}

fn create_families(kind: Kind, plan: &Plan, td: &Teardown, ipv6: bool) -> Result<Pods> {
    match kind {
        Kind::Veth => veth(plan, td, ipv6),
        Kind::Bridge => bridge(plan, td, ipv6),
        Kind::Hypha => hypha(plan, td, &HyphaOptions::default(), ipv6),
    }
    .with_context(|| format!("setting up {}", kind.name()))
}

/// What a bench may add to the Hypha setup; the default is [`create`]'s.
#[derive(Default)]
pub struct HyphaOptions {
    /// The agent's watched policy directory (`--policy-dir`); the agent's default
    /// when `None`.
    pub policy_dir: Option<PathBuf>,
    /// `app` labels of the client and the server pod, given to hypha-cni as
    /// `args.cni.labels`, with Kubernetes' `CNI_ARGS` (namespace `default`, pod name).
    pub app_labels: Option<(String, String)>,
    /// More flags for the agent (`--fq-queues 16`, say).
    pub agent_args: Vec<String>,
}

/// The Hypha setup with `options`.
pub fn create_hypha(plan: &Plan, td: &Teardown, options: &HyphaOptions) -> Result<Pods> {
    hypha(plan, td, options, false).context("setting up hypha")
}

fn veth(plan: &Plan, td: &Teardown, ipv6: bool) -> Result<Pods> {
    let (a, b) = plan.subnet(Kind::Veth);
    let (client_ns, server_ns) = (plan.netns("veth-a"), plan.netns("veth-b"));
    add_netns(td, &client_ns)?;
    add_netns(td, &server_ns)?;
    // Both ends are made inside the pods (none ever in the host's namespace) and go with
    // them.
    ip(&[
        "-n", &client_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
        &server_ns,
    ])?;
    let client_ip = Ipv4Addr::new(10, a, b, 1);
    let server_ip = Ipv4Addr::new(10, a, b, 2);
    for (ns, addr) in [(&client_ns, client_ip), (&server_ns, server_ip)] {
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    }
    let (mut client_ip6, mut server_ip6) = (None, None);
    if ipv6 {
        let net = plan.subnet6(Kind::Veth);
        let prefix = net.trim_end_matches("::/64");
        let (c, s): (Ipv6Addr, Ipv6Addr) = (
            format!("{prefix}::1").parse()?,
            format!("{prefix}::2").parse()?,
        );
        for (ns, addr) in [(&client_ns, c), (&server_ns, s)] {
            // `nodad`: the pair is alone on its link; the address is usable at once.
            ip(&[
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        (client_ip6, server_ip6) = (Some(c), Some(s));
    }
    Ok(Pods {
        client_ns,
        server_ns,
        client_ip,
        server_ip,
        client_ip6,
        server_ip6,
        agent_socket: None,
    })
}

fn bridge(plan: &Plan, td: &Teardown, ipv6: bool) -> Result<Pods> {
    let (a, b) = plan.subnet(Kind::Bridge);
    let bridge = format!("hybr{}", plan.uniq);
    let data_dir = plan.tmp.join("host-local");
    let mut config = bridge_config(plan, a, b);
    if ipv6 {
        // A second range for IPv6: host-local gives each pod one address per range.
        let mut json: serde_json::Value = serde_json::from_str(&config)?;
        json["ipam"]["ranges"]
            .as_array_mut()
            .context("the bridge configuration has ipam.ranges")?
            .push(serde_json::json!([{ "subnet": plan.subnet6(Kind::Bridge) }]));
        config = json.to_string();
    }
    // The plugin makes the bridge on the first ADD; DEL leaves it. Recorded first, so
    // undone last, after both DELs.
    td.make(Undo::Link(bridge.clone()), || Ok(()))?;
    td.make(Undo::Dir(data_dir), || Ok(()))?;
    // isGateway turns on the host's forwarding (IPv6's too, with an IPv6 range); each is
    // put back as it was.
    let forward: Vec<PathBuf> = [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect();
    let before = forward
        .iter()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    let mut made = Vec::new();
    let added = (|| -> Result<()> {
        for pod in BRIDGE_PODS {
            let call = bridge_pod_call(plan, &config, pod);
            add_netns(td, &call.netns)?;
            made.push(td.make(Undo::Cni(call.clone()), || call.invoke("ADD"))?);
        }
        Ok(())
    })();
    // Recorded even when an ADD failed: the first may have changed them.
    for (path, before) in forward.into_iter().zip(before) {
        let after = std::fs::read_to_string(&path).unwrap_or_default();
        if after != before {
            td.make(
                Undo::Sysctl {
                    path,
                    value: before,
                },
                || Ok(()),
            )?;
        }
    }
    added?;
    pods_of(plan.netns("br-a"), plan.netns("br-b"), &made, ipv6, None)
}

/// The [`Pods`] of two CNI results (client first), with their IPv6 addresses if `ipv6`.
fn pods_of(
    client_ns: String,
    server_ns: String,
    results: &[String],
    ipv6: bool,
    agent_socket: Option<PathBuf>,
) -> Result<Pods> {
    let [client, server] = results else {
        bail!("two pods expected, {} made", results.len());
    };
    let (client_ip6, server_ip6) = if ipv6 {
        (Some(address6(client)?), Some(address6(server)?))
    } else {
        (None, None)
    };
    Ok(Pods {
        client_ns,
        server_ns,
        client_ip: first_address(client)?,
        server_ip: first_address(server)?,
        client_ip6,
        server_ip6,
        agent_socket,
    })
}

fn hypha(plan: &Plan, td: &Teardown, options: &HyphaOptions, ipv6: bool) -> Result<Pods> {
    let (a, b) = plan.subnet(Kind::Hypha);
    let mut pod_cidrs = format!("10.{a}.{b}.0/24");
    if ipv6 {
        pod_cidrs = format!("{pod_cidrs},{}", plan.subnet6(Kind::Hypha));
    }
    let hypha = plan.bin.join("hypha");
    let hypha_cni = plan.bin.join("hypha-cni");
    for bin in [&hypha, &hypha_cni] {
        if !bin.exists() {
            bail!(
                "{} is missing (the release build should have made it)",
                bin.display()
            );
        }
    }
    let node = plan.netns("node");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/hypb-{}", plan.uniq));
    let socket = plan.tmp.join("agent.sock");
    td.make(Undo::Dir(pin_dir.clone()), || Ok(()))?;
    add_netns(td, &node)?;

    // nsenter, not `ip netns exec`: the latter remounts /sys in a new mount namespace,
    // which would hide the bpffs (and the pins) under /sys/fs/bpf.
    let log = std::fs::File::create(&plan.agent_log)
        .with_context(|| format!("creating {}", plan.agent_log.display()))?;
    let mut policy_dir = Vec::new();
    if let Some(dir) = &options.policy_dir {
        policy_dir.push("--policy-dir".into());
        policy_dir.push(dir.clone().into_os_string());
    }
    let agent = td.spawn(
        "hypha agent",
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node}"))
            .arg(&hypha)
            .arg("agent")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(plan.tmp.join("state"))
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args(["--pod-cidr", &pod_cidrs, "--no-masquerade"])
            .args(&policy_dir)
            .args(&options.agent_args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: Ctrl-C must not stop it before the pods' DELs.
            .process_group(0),
    )?;
    let start = Instant::now();
    loop {
        let status = Command::new(&hypha)
            .args(["status", "--socket"])
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if status.is_ok_and(|s| s.success()) {
            break;
        }
        if let Some(exit) = agent.lock().unwrap_or_else(|p| p.into_inner()).try_wait()? {
            bail!(
                "the agent exited with {exit}:\n{}",
                tail(&plan.agent_log, 15)
            );
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!(
                "the agent did not answer within 10 s:\n{}",
                tail(&plan.agent_log, 15)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let config = hypha_network(&socket);
    let labels = options
        .app_labels
        .as_ref()
        .map(|(client, server)| [client.as_str(), server.as_str()]);
    let mut made = Vec::new();
    for (i, pod) in HYPHA_PODS.into_iter().enumerate() {
        let call = hypha_pod_call(plan, &config, labels.map(|l| l[i]), pod);
        add_netns(td, &call.netns)?;
        made.push(td.make(Undo::Cni(call.clone()), || call.invoke("ADD"))?);
    }
    pods_of(
        plan.netns("hy-a"),
        plan.netns("hy-b"),
        &made,
        ipv6,
        Some(socket),
    )
}

/// One more pod `pod` on the agent of the Hypha setup [`create_hypha`] made, labelled
/// `app=APP` (namespace `default`, as [`HyphaOptions::app_labels`] labels the first two);
/// its CNI result.
pub fn add_hypha_pod(plan: &Plan, td: &Teardown, pod: &str, app: &str) -> Result<String> {
    let config = hypha_network(&plan.tmp.join("agent.sock"));
    let call = hypha_pod_call(plan, &config, Some(app), pod);
    add_netns(td, &call.netns)?;
    td.make(Undo::Cni(call.clone()), || call.invoke("ADD"))
        .with_context(|| format!("adding Hypha pod {pod}"))
}

/// The bridge setup's two pods, and Hypha's.
const BRIDGE_PODS: [&str; 2] = ["br-a", "br-b"];
const HYPHA_PODS: [&str; 2] = ["hy-a", "hy-b"];

/// The bridge setup's network configuration, on `10.a.b.0/24`.
fn bridge_config(plan: &Plan, a: u8, b: u8) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("benchbr-{}", plan.uniq),
        "type": "bridge",
        "bridge": format!("hybr{}", plan.uniq),
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": format!("10.{a}.{b}.0/24") }]],
            "dataDir": plan.tmp.join("host-local"),
        },
    })
    .to_string()
}

fn bridge_pod_call(plan: &Plan, config: &str, pod: &str) -> CniCall {
    CniCall {
        program: vec![PathBuf::from(CNI_PATH).join("bridge").into()],
        container_id: format!("hypb-{}-{pod}", plan.uniq),
        netns: plan.netns(pod),
        config: config.to_owned(),
    }
}

/// The call that makes Hypha setup's pod `pod`; with an `app` label, passed as a
/// Kubernetes runtime passes it.
fn hypha_pod_call(
    plan: &Plan,
    config: &serde_json::Value,
    app_label: Option<&str>,
    pod: &str,
) -> CniCall {
    let mut config = config.clone();
    // CniCall sets no CNI_ARGS of its own; `env` sets it for the plugin.
    let mut program: Vec<std::ffi::OsString> = Vec::new();
    if let Some(label) = app_label {
        config["args"] = serde_json::json!({"cni": {"labels": [{"key": "app", "value": label}]}});
        program.push("env".into());
        program.push(
            format!("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}").into(),
        );
    }
    program.extend([
        "nsenter".into(),
        format!("--net=/run/netns/{}", plan.netns("node")).into(),
        plan.bin.join("hypha-cni").into(),
    ]);
    CniCall {
        program,
        container_id: format!("hypb-{}-{pod}", plan.uniq),
        netns: plan.netns(pod),
        config: config.to_string(),
    }
}

/// The CNI calls that made the two pods of [`create`]'s `kind` setup (without labels),
/// for a bench that DELs them to start from an empty node (a second DEL at teardown
/// does nothing, as CNI requires).
pub fn setup_pod_calls(kind: Kind, plan: &Plan) -> Vec<CniCall> {
    match kind {
        Kind::Veth => Vec::new(),
        Kind::Bridge => {
            let (a, b) = plan.subnet(Kind::Bridge);
            let config = bridge_config(plan, a, b);
            BRIDGE_PODS
                .iter()
                .map(|pod| bridge_pod_call(plan, &config, pod))
                .collect()
        }
        Kind::Hypha => {
            let config = hypha_network(&plan.tmp.join("agent.sock"));
            HYPHA_PODS
                .iter()
                .map(|pod| hypha_pod_call(plan, &config, None, pod))
                .collect()
        }
    }
}

/// Hypha's network configuration, for an agent on `socket`.
fn hypha_network(socket: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "hypha",
        "type": "hypha-cni",
        "agentSocket": socket,
    })
}

/// Packets the eBPF datapath redirected, summed over the agent's endpoints (pod egress),
/// as the endpoints' `counters` (all families), `counters4` or `counters6` count them.
pub fn hypha_redirected_in(bin: &Path, socket: &Path, counters: &str) -> Result<u64> {
    let text = output(
        Command::new(bin.join("hypha"))
            .args(["endpoint", "list", "-o", "json", "--socket"])
            .arg(socket),
    )?;
    let eps: serde_json::Value =
        serde_json::from_str(&text).context("parsing `hypha endpoint list -o json`")?;
    let eps = eps
        .as_array()
        .context("`hypha endpoint list -o json` is not a list")?;
    Ok(eps
        .iter()
        .filter_map(|e| e[counters]["egress"]["redirected"]["packets"].as_u64())
        .sum())
}

/// A CNI plugin invocation, as a runtime makes it.
#[derive(Clone)]
pub struct CniCall {
    /// The plugin, possibly behind a wrapper (`nsenter --net=... plugin`).
    pub program: Vec<std::ffi::OsString>,
    pub container_id: String,
    /// Name under /run/netns.
    pub netns: String,
    /// The network configuration, given on stdin.
    pub config: String,
}

impl CniCall {
    /// Runs the plugin with `CNI_COMMAND=command`; returns its standard output.
    pub fn invoke(&self, command: &str) -> Result<String> {
        let mut cmd = Command::new(&self.program[0]);
        cmd.args(&self.program[1..])
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", format!("/run/netns/{}", self.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", describe(&cmd)))?;
        // A plugin that exits without reading stdin makes this fail; its status says more.
        let _ = child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(self.config.as_bytes());
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "CNI {command} of {} by {} failed with {}: {} {}",
                self.container_id,
                describe(&cmd),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }
}

/// The IPv4 address of a CNI result (the first `ips` entry that is one), without its
/// prefix length.
pub fn first_address(result: &str) -> Result<Ipv4Addr> {
    let json: serde_json::Value = serde_json::from_str(result)
        .with_context(|| format!("the CNI result is not JSON: {result}"))?;
    json["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .find_map(|a| a.split('/').next().and_then(|a| a.parse().ok()))
        .with_context(|| format!("no IPv4 address in the CNI result's ips: {result}"))
}

/// The IPv6 address of a CNI result (the first `ips` entry that is one), without its
/// prefix length.
pub fn address6(result: &str) -> Result<Ipv6Addr> {
    let json: serde_json::Value = serde_json::from_str(result)
        .with_context(|| format!("the CNI result is not JSON: {result}"))?;
    json["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .find_map(|a| a.split('/').next().and_then(|a| a.parse().ok()))
        .with_context(|| format!("no IPv6 address in the CNI result's ips: {result}"))
}

pub fn add_netns(td: &Teardown, name: &str) -> Result<()> {
    td.make(Undo::Netns(name.to_owned()), || {
        if Path::new("/run/netns").join(name).exists() {
            bail!("network namespace {name} already exists (left by a run killed with SIGKILL?); remove it with `ip netns del {name}`");
        }
        ip(&["netns", "add", name])?;
        ip(&["-n", name, "link", "set", "lo", "up"])
    })
}

fn ip(args: &[&str]) -> Result<()> {
    output(Command::new("ip").args(args)).map(drop)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let shown = all[all.len().saturating_sub(lines)..].join("\n");
    format!("{shown}\n(full log: {})", path.display())
}

/// Every IPv4 prefix the host routes (all tables), but the default route.
fn host_prefixes() -> Result<Vec<(u32, u8)>> {
    let text = output(Command::new("ip").args(["-4", "-j", "route", "show", "table", "all"]))?;
    let routes: Vec<serde_json::Value> =
        serde_json::from_str(&text).context("parsing `ip -j route`")?;
    Ok(routes
        .iter()
        .filter_map(|r| r["dst"].as_str())
        .filter_map(parse_prefix)
        .collect())
}

fn parse_prefix(s: &str) -> Option<(u32, u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse().ok()?),
        None => (s, 32),
    };
    let addr: Ipv4Addr = addr.parse().ok()?;
    (len <= 32).then_some((u32::from(addr), len))
}

fn overlaps(a: (u32, u8), b: (u32, u8)) -> bool {
    let len = a.1.min(b.1);
    if len == 0 {
        return true;
    }
    (a.0 ^ b.0) >> (32 - u32::from(len)) == 0
}

impl Plan {
    /// The `/24` (`10.A.B.0`) the plan keeps for `kind`, for a bench that makes that
    /// setup its own way (the bandwidth bench's bridge + bandwidth chain).
    pub fn subnet_of(&self, kind: Kind) -> (u8, u8) {
        self.subnet(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_overlap_when_one_contains_the_other() {
        let p = |s| parse_prefix(s).expect("a prefix");
        assert!(overlaps(p("10.200.3.0/24"), p("10.200.0.0/16")));
        assert!(overlaps(p("10.200.3.7"), p("10.200.3.0/24")));
        assert!(!overlaps(p("10.200.3.0/24"), p("10.200.4.0/24")));
        assert!(!overlaps(p("10.201.0.0/24"), p("10.200.0.0/16")));
        assert_eq!(parse_prefix("default"), None);
    }

    #[test]
    fn first_address_drops_the_prefix_length() {
        let r = r#"{"cniVersion":"1.0.0","ips":[{"address":"10.200.5.7/32"}]}"#;
        assert_eq!(
            first_address(r).expect("parses"),
            Ipv4Addr::new(10, 200, 5, 7)
        );
        assert!(first_address(r#"{"code":11,"msg":"no"}"#).is_err());
    }

    #[test]
    fn address6_finds_the_ipv6_entry() {
        let r = r#"{"ips":[{"address":"10.200.5.7/24"},{"address":"fd00:4862:200:5::7/64"}]}"#;
        assert_eq!(
            address6(r).expect("parses"),
            "fd00:4862:200:5::7".parse::<Ipv6Addr>().unwrap()
        );
        assert!(address6(r#"{"ips":[{"address":"10.200.5.7/24"}]}"#).is_err());
    }
}
