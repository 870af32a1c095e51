//! `cargo xtask bench services`: issue 14's benchmark, Hypha's service load balancing side
//! by side with kube-proxy's own design in iptables, in one run, at 100, 1,000 and 10,000
//! services of 3 backends each (`--services`).
//!
//! Both sides have the same pods: a client, three backends serving every service (TCP
//! [`TARGET_PORT`]), and an iperf3 pod, the only backend of one more service
//! ([`IPERF_SERVICE`]) through which throughput is measured. Service i has the ClusterIP
//! [`vip`]`(i)` (in the default service CIDR 10.96.0.0/16) and port [`SERVICE_PORT`].
//!
//! - `iptables`: kube-proxy's iptables mode, by hand, in a "node" namespace of the bench's
//!   own that routes the pods (Calico-style: each pod's `/32` on its veth, the pods' gateway
//!   169.254.1.1 a local address of the node): the `nat` table as kube-proxy writes it,
//!   `KUBE-SERVICES` jumped to from PREROUTING and OUTPUT with one rule per service port
//!   (`-d VIP/32 -p tcp --dport 80 -j KUBE-SVC-…`), each `KUBE-SVC-…` choosing among its
//!   `KUBE-SEP-…` chains with `statistic --mode random --probability 1/3, 1/2`, each
//!   `KUBE-SEP-…` marking hairpin traffic for masquerade and `DNAT`ing; conntrack
//!   translates the replies. All services are loaded with one `iptables-restore` (timed);
//!   one change (service 0's port, 80 ↔ 81) with one `iptables-restore --noflush` of what
//!   kube-proxy's partial sync rewrites: the whole `KUBE-SERVICES` chain and the changed
//!   service's chains.
//! - `hypha`: an agent in a node namespace of its own, pods made by `hypha-cni`, the
//!   services applied as Kubernetes `Service` documents selecting the backends by label,
//!   through the agent's API (`POST /v1/services`, what `hypha service apply` sends; its
//!   answer's `program_us` is the datapath's programming time, the wall time is the
//!   request's), or `--apply-with cli` to time `hypha service apply -f` itself. The
//!   change is service 0's port again, as one document.
//!
//! Measured per count and side: new connections (connect + 1-byte request/response +
//! close) from the client, each to a VIP chosen at random among all services (so that
//! the rule's position matters for iptables), p50 and p99; iperf3 throughput through the
//! iperf service's VIP and to its backend's own address, alternating, median of
//! `--runs`; the time to program all services; the time of each of `--changes` changes.
//! The counts are measured in turn, both sides at each (who goes first alternating).
//! Everything lives in namespaces the bench makes (the iptables rules too) and goes with
//! them, also on error and Ctrl-C.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Serialize;
use serde_json::{Value, json};

use super::datapath::{Machine, machine};
use super::measure::{self, Latency, enter_netns};
use super::setups::{self, HyphaOptions, Kind, Plan, Pods};
use super::svg::{self, BarChart, Series};
use super::teardown::{Teardown, Undo};
use super::{Target, median, print_targets};
use crate::util::{describe, output, workspace_root};

/// Issue 14's targets.
const TARGET_FLAT_PCT: f64 = 10.0;
const TARGET_VIP_OF_DIRECT: f64 = 0.98;
const TARGET_PROGRAM_10K_MS: f64 = 2_000.0;
const TARGET_CHANGE_MS: f64 = 20.0;

/// Every service's port, the changed one, and the backends' (targetPort).
const SERVICE_PORT: u16 = 80;
const CHANGED_PORT: u16 = 81;
const TARGET_PORT: u16 = 8080;
/// iperf3's default port, the iperf service's port and target port.
const IPERF_PORT: u16 = 5201;
/// The service through which throughput is measured (one backend, the iperf pod).
const IPERF_SERVICE: &str = "bench-iperf";
/// Its ClusterIP, apart from [`vip`]'s range.
const IPERF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 255, 250);
/// The services' namespace (the pods' too: hypha-cni is told `K8S_POD_NAMESPACE=default`).
const NAMESPACE: &str = "default";
/// The first ClusterIP: 10.96.0.16, service i at 10.96.0.16 + i.
const FIRST_VIP: u32 = u32::from_be_bytes([10, 96, 0, 16]);
/// At most this many services (their VIPs stay below [`IPERF_VIP`]).
const MAX_SERVICES: u32 = 65_000;
/// The backends: three, as the issue says.
const BACKENDS: usize = 3;
/// From this many services, iptables is given at most [`SLOW_CHANGES`] changes: each
/// `iptables-restore --noflush` rewriting `KUBE-SERVICES` takes tens of seconds there
/// with the nft backend (58 s on this machine under load).
const SLOW_CHANGES_FROM: u32 = 10_000;
const SLOW_CHANGES: u32 = 3;
/// Services per file of Hypha's apply (about 220 bytes each).
const FILE_SERVICES: u32 = 2_000;
/// New connections timed in one run, at most.
const MAX_CONNECTIONS: usize = 5_000;
/// The iptables setup's pods' gateway, a local address of its node (Calico's).
const GATEWAY: &str = "169.254.1.1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyWith {
    /// `POST /v1/services` from this process: wall time of the request and the answer's
    /// `program_us`.
    Api,
    /// `hypha service apply -f FILE`: wall time of the command (its start included).
    Cli,
}

#[derive(Clone, clap::Args)]
pub struct Options {
    /// Service counts, comma-separated, each with 3 backends.
    #[arg(long, value_delimiter = ',', default_values_t = [100, 1_000, 10_000],
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SERVICES)))]
    services: Vec<u32>,
    /// Seconds of each new-connection run and of each throughput run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=300))]
    seconds: u32,
    /// Throughput runs per count and side, each through the VIP and direct.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    runs: u32,
    /// Changes (service 0's port, back and forth) timed per count and side (iptables: at
    /// most 3 from 10,000 services, each takes tens of seconds there).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    changes: u32,
    /// The baseline's iptables (`iptables`, `iptables-legacy`, `iptables-nft`); its
    /// `-restore` loads the rules.
    #[arg(long, default_value = "iptables")]
    iptables: String,
    /// How Hypha's services are applied and timed.
    #[arg(long, value_enum, default_value_t = ApplyWith::Api)]
    apply_with: ApplyWith,
    /// Sides, comma-separated: iptables, hypha.
    #[arg(long, value_delimiter = ',', default_values_t = [Side::Iptables, Side::Hypha])]
    sides: Vec<Side>,
    /// A short run for CI (well under a minute): 100 and 1,000 services, 1 s runs, one
    /// throughput run, 4 changes.
    #[arg(long)]
    quick: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Iptables,
    Hypha,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Iptables => "iptables",
            Side::Hypha => "hypha",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Side::Iptables => {
                "kube-proxy's iptables design (nat table, statistic --mode random, DNAT, conntrack) in a routing node namespace"
            }
            Side::Hypha => {
                "Hypha agent + hypha-cni; socket load balancing (cgroup connect4, Maglev)"
            }
        }
    }
}

/// Service i's ClusterIP.
fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(FIRST_VIP + i)
}

fn service_name(i: u32) -> String {
    format!("svc-{i:05}")
}

/// One side's pods: who connects, who serves.
struct Made {
    /// The client and the iperf pod (`server`).
    pods: Pods,
    /// The three backends: (namespace, address).
    backends: Vec<(String, Ipv4Addr)>,
    /// Hypha's agent socket (Hypha only).
    socket: Option<PathBuf>,
    /// The node namespace holding the iptables rules (iptables only).
    node_ns: Option<String>,
}

/// One count on one side.
#[derive(Serialize)]
struct Level {
    services: u32,
    /// Wall time to program all services (iptables-restore; Hypha's apply).
    program_ms: Option<f64>,
    /// Hypha's `program_us` of that apply (the datapath's share).
    program_us: Option<u64>,
    /// Rules in the nat table after the restore (iptables).
    rules: Option<usize>,
    /// Each change's wall time, and Hypha's `program_us` of each.
    change_ms: Vec<f64>,
    change_program_us: Vec<u64>,
    /// New connections to random VIPs.
    connect: Option<Latency>,
    /// Connections that failed (refused, timed out) during the run.
    connect_failures: u64,
    /// Connections each backend served during the run.
    served: Vec<u64>,
    vip_gbps: Vec<f64>,
    direct_gbps: Vec<f64>,
    errors: Vec<String>,
}

impl Level {
    fn new(services: u32) -> Self {
        Self {
            services,
            program_ms: None,
            program_us: None,
            rules: None,
            change_ms: Vec::new(),
            change_program_us: Vec::new(),
            connect: None,
            connect_failures: 0,
            served: Vec::new(),
            vip_gbps: Vec::new(),
            direct_gbps: Vec::new(),
            errors: Vec::new(),
        }
    }
}

#[derive(Serialize)]
struct SideReport {
    name: Side,
    description: &'static str,
    /// Why the side could not be set up.
    error: Option<String>,
    levels: Vec<Level>,
}

/// One count on one side, summed up.
#[derive(Clone, Copy, Default, Serialize)]
struct Summary {
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    vip_gbps: Option<f64>,
    direct_gbps: Option<f64>,
    vip_of_direct: Option<f64>,
    program_ms: Option<f64>,
    program_us: Option<u64>,
    change_median_ms: Option<f64>,
    change_max_ms: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    settings: Value,
    baseline: Value,
    sides: Vec<SideReport>,
    /// Per side, per count.
    summary: Vec<(Side, Vec<(u32, Summary)>)>,
    targets: Vec<Target>,
    errors: Vec<String>,
}

pub fn run(o: &Options) -> Result<()> {
    let quick;
    let o = if o.quick {
        quick = Options {
            services: vec![100, 1_000],
            seconds: 1,
            runs: 1,
            changes: 4,
            ..o.clone()
        };
        &quick
    } else {
        o
    };
    let mut counts = o.services.clone();
    counts.sort_unstable();
    counts.dedup();
    let root = workspace_root();
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let restore = format!("{}-restore", o.iptables);
    let mut tools = vec!["iperf3"];
    if o.sides.contains(&Side::Iptables) {
        tools.extend([o.iptables.as_str(), restore.as_str()]);
    }
    for tool in tools {
        output(Command::new(tool).arg("--version")).with_context(|| format!("{tool} is needed"))?;
    }
    let machine = machine();
    let td = Teardown::install()?;
    // 10.120-10.159: apart from the policy bench's 10.160-10.199 and the others' 10.200+.
    let plan = Plan::in_range(
        root.join("target/release"),
        out_dir.join("services-hypha-agent.log"),
        120,
        40,
    )?;
    td.make(Undo::Dir(plan.tmp.clone()), || {
        std::fs::create_dir_all(&plan.tmp)
            .with_context(|| format!("creating {}", plan.tmp.display()))
    })?;

    let mut sides: Vec<(SideReport, Option<Made>)> = Vec::new();
    for side in [Side::Iptables, Side::Hypha] {
        if !o.sides.contains(&side) {
            continue;
        }
        println!("==> setting up {side}: {}", side.describe());
        let made = match side {
            Side::Iptables => iptables_setup(&plan, &td),
            Side::Hypha => hypha_setup(&plan, &td),
        };
        let (made, error) = match made {
            Ok(m) => {
                println!(
                    "    client {} -> backends {}; iperf pod {}",
                    m.pods.client_ip,
                    m.backends
                        .iter()
                        .map(|(_, ip)| ip.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    m.pods.server_ip
                );
                (Some(m), None)
            }
            Err(e) => {
                eprintln!("    FAILED: {e:#}");
                (None, Some(format!("{e:#}")))
            }
        };
        sides.push((
            SideReport {
                name: side,
                description: side.describe(),
                error,
                levels: Vec::new(),
            },
            made,
        ));
    }

    // The backends serve every side's connections until the end.
    let mut servers = Vec::new();
    let mut errors = Vec::new();
    for (_, made) in &sides {
        if let Some(m) = made {
            match BackendServers::start(&m.backends) {
                Ok(s) => servers.push(Some(s)),
                Err(e) => {
                    errors.push(format!("starting the backend servers: {e:#}"));
                    servers.push(None);
                }
            }
        } else {
            servers.push(None);
        }
    }

    println!(
        "==> service counts {counts:?}; per count and side: programming, {} changes, {} s of new connections to random VIPs, {} x {} s throughput through the VIP and direct",
        o.changes, o.seconds, o.runs, o.seconds
    );
    let mut hypha_current: Option<u32> = None;
    for (k, &n) in counts.iter().enumerate() {
        let len = sides.len();
        for j in 0..len {
            let idx = (k + j) % len;
            let (report, made) = &mut sides[idx];
            let Some(made) = made else { continue };
            let Some(servers) = &servers[idx] else {
                continue;
            };
            let mut level = Level::new(n);
            let programmed = match report.name {
                Side::Iptables => iptables_program(o, made, n, &mut level),
                Side::Hypha => hypha_program(o, &plan, made, &mut hypha_current, n, &mut level),
            };
            match programmed {
                Ok(()) => measure_level(o, report.name, made, servers, n, &mut level),
                Err(e) => level
                    .errors
                    .push(format!("programming {n} services: {e:#}")),
            }
            println!(
                "    {:<8} {:>6} services  {}",
                report.name.name(),
                n,
                describe_level(&level)
            );
            report.levels.push(level);
        }
    }

    for s in servers.into_iter().flatten() {
        if let Err(e) = s.stop() {
            errors.push(format!("backend servers: {e:#}"));
        }
    }
    println!("==> cleaning up");
    if let Err(e) = td.finish() {
        errors.push(format!("{e:#}"));
    }
    let sides: Vec<SideReport> = sides.into_iter().map(|(r, _)| r).collect();
    for s in &sides {
        if let Some(e) = &s.error {
            errors.push(format!("{}: {e}", s.name));
        }
        for l in &s.levels {
            for e in &l.errors {
                errors.push(format!("{} at {} services: {e}", s.name, l.services));
            }
        }
    }
    let report = report(o, machine, sides, errors);
    print_table(&report);
    print_targets(
        "Issue 14 targets (Hypha's service load balancing):",
        &report.targets,
    );
    super::write_outputs(
        &out_dir,
        "services",
        &report,
        chart(&report),
        &report.errors,
    )
}

/// Programs `n` services on the iptables side (from an empty nat table), then times the
/// changes; checks the rules' count.
fn iptables_program(o: &Options, made: &Made, n: u32, level: &mut Level) -> Result<()> {
    let node = made.node_ns.as_deref().context("no node namespace")?;
    let backends: Vec<Ipv4Addr> = made.backends.iter().map(|(_, ip)| *ip).collect();
    let cluster_cidr = format!("{}/24", network_of(made.pods.client_ip));
    // Not timed: the table as kube-proxy finds it on a fresh node.
    in_netns(node, &[&o.iptables, "-t", "nat", "-F"])?;
    in_netns(node, &[&o.iptables, "-t", "nat", "-X"])?;
    let rules = kube_proxy_rules(&backends, made.pods.server_ip, &cluster_cidr, n);
    let restore = format!("{}-restore", o.iptables);
    let start = Instant::now();
    restore_in(node, &restore, &[], &rules)?;
    level.program_ms = Some(ms_since(start));
    let listed = in_netns(node, &[&o.iptables, "-t", "nat", "-S"])?;
    let count = listed.lines().filter(|l| l.starts_with("-A ")).count();
    let expected = rules.lines().filter(|l| l.starts_with("-A ")).count();
    if count != expected {
        bail!("{count} rules in the node's nat table, {expected} expected");
    }
    level.rules = Some(count);
    let changes = if n >= SLOW_CHANGES_FROM {
        o.changes.min(SLOW_CHANGES)
    } else {
        o.changes
    };
    for c in 0..changes {
        let port = changed_port(c);
        let change = kube_proxy_change(&backends, &cluster_cidr, n, port);
        let start = Instant::now();
        restore_in(node, &restore, &["--noflush"], &change)?;
        level.change_ms.push(ms_since(start));
    }
    // The last change is in force: service 0 answers on its port.
    let port = changed_port(changes - 1);
    probe(&made.pods.client_ns, SocketAddr::from((vip(0), port)))
        .with_context(|| format!("service 0 on port {port} after the changes"))
}

/// The change number `c` moves service 0 to this port (81, 80, 81, ...).
fn changed_port(c: u32) -> u16 {
    if c.is_multiple_of(2) {
        CHANGED_PORT
    } else {
        SERVICE_PORT
    }
}

/// Programs `n` services on Hypha (deleting those of the previous count first, untimed),
/// then times the changes; checks that every service has its backends.
fn hypha_program(
    o: &Options,
    plan: &Plan,
    made: &Made,
    current: &mut Option<u32>,
    n: u32,
    level: &mut Level,
) -> Result<()> {
    let socket = made.socket.as_deref().context("no agent socket")?;
    if let Some(previous) = current.take() {
        for name in (0..previous)
            .map(service_name)
            .chain([IPERF_SERVICE.to_owned()])
        {
            let path = format!("/v1/services/{NAMESPACE}/{name}");
            api(socket, "DELETE", &path, None).with_context(|| format!("DELETE {path}"))?;
        }
    }
    // Files of at most FILE_SERVICES services each, well within the API's file size limit.
    let dir = plan.tmp.join(format!("services-{n}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for first in (0..n).step_by(FILE_SERVICES as usize) {
        let last = (first + FILE_SERVICES).min(n);
        let file = dir.join(format!("services-{first:05}.yaml"));
        std::fs::write(&file, services_yaml(first..last, SERVICE_PORT, last == n))
            .with_context(|| format!("writing {}", file.display()))?;
    }
    let (ms, us) = hypha_apply(o, plan, socket, &dir)?;
    *current = Some(n);
    level.program_ms = Some(ms);
    level.program_us = us;
    check_services(socket, n)?;
    let change = plan.tmp.join("change.yaml");
    for c in 0..o.changes {
        std::fs::write(&change, services_yaml(0..1, changed_port(c), false))
            .with_context(|| format!("writing {}", change.display()))?;
        let (ms, us) = hypha_apply(o, plan, socket, &change)?;
        level.change_ms.push(ms);
        level.change_program_us.extend(us);
    }
    let port = changed_port(o.changes - 1);
    probe(&made.pods.client_ns, SocketAddr::from((vip(0), port)))
        .with_context(|| format!("service 0 on port {port} after the changes"))
}

/// Applies a services file, or a directory's `*.yaml` files in one request: (wall ms, the
/// API's `program_us` when it says).
fn hypha_apply(o: &Options, plan: &Plan, socket: &Path, path: &Path) -> Result<(f64, Option<u64>)> {
    match o.apply_with {
        ApplyWith::Api => {
            let mut files = if path.is_dir() {
                std::fs::read_dir(path)
                    .with_context(|| format!("listing {}", path.display()))?
                    .map(|e| e.map(|e| e.path()))
                    .collect::<std::io::Result<Vec<_>>>()
                    .with_context(|| format!("listing {}", path.display()))?
            } else {
                vec![path.to_path_buf()]
            };
            files.sort();
            let mut sources = Vec::new();
            for file in files {
                let content = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                sources.push(json!({"source": file.display().to_string(), "content": content}));
            }
            let body = serde_json::to_vec(&sources)?;
            let start = Instant::now();
            let answer = api(socket, "POST", "/v1/services", Some(&body))?;
            let ms = ms_since(start);
            let answer: Value = serde_json::from_str(&answer)
                .with_context(|| format!("the apply's answer is not JSON: {answer}"))?;
            Ok((ms, answer["program_us"].as_u64()))
        }
        ApplyWith::Cli => {
            let mut cmd = Command::new(plan.bin.join("hypha"));
            cmd.args(["service", "apply", "-f"])
                .arg(path)
                .arg("--socket")
                .arg(socket);
            let start = Instant::now();
            output(&mut cmd)?;
            Ok((ms_since(start), None))
        }
    }
}

/// Every service of the `n` applied (and the iperf one) is listed, with its backends.
fn check_services(socket: &Path, n: u32) -> Result<()> {
    let list = api(socket, "GET", "/v1/services", None)?;
    let list: Value = serde_json::from_str(&list).context("parsing GET /v1/services")?;
    let list = list.as_array().context("GET /v1/services is not a list")?;
    let backends = |name: &str| {
        list.iter()
            .find(|s| s["namespace"] == NAMESPACE && s["name"] == name)
            .map(|s| s["ports"][0]["backends"].as_array().map_or(0, Vec::len))
    };
    let ours = list
        .iter()
        .filter(|s| s["name"].as_str().is_some_and(|n| n.starts_with("svc-")))
        .count();
    if ours != n as usize {
        bail!("{ours} services listed, {n} applied");
    }
    for (name, want) in [
        (service_name(0), BACKENDS),
        (service_name(n - 1), BACKENDS),
        (IPERF_SERVICE.to_owned(), 1),
    ] {
        match backends(&name) {
            Some(got) if got == want => {}
            Some(got) => bail!("{name} has {got} backends, {want} expected"),
            None => bail!("{name} is not listed"),
        }
    }
    Ok(())
}

/// The measurements of one count on one side, once its services are in force.
fn measure_level(
    o: &Options,
    side: Side,
    made: &Made,
    servers: &BackendServers,
    n: u32,
    level: &mut Level,
) {
    let before = servers.served();
    match connections(&made.pods.client_ns, n, o.seconds) {
        Ok((latency, failures)) => {
            level.connect = Some(latency);
            level.connect_failures = failures;
            if failures > 0 {
                level
                    .errors
                    .push(format!("{failures} new connections to VIPs failed"));
            }
        }
        Err(e) => level.errors.push(format!("new connections: {e:#}")),
    }
    level.served = servers
        .served()
        .iter()
        .zip(before)
        .map(|(a, b)| a - b)
        .collect();
    if level.connect.is_some() && level.served.contains(&0) {
        level.errors.push(format!(
            "a backend served no connection: {:?} (the choice is not spread)",
            level.served
        ));
    }
    let listen = IpAddr::V4(made.pods.server_ip);
    for _ in 0..o.runs {
        for (to, gbps) in [
            (IpAddr::V4(IPERF_VIP), &mut level.vip_gbps),
            (listen, &mut level.direct_gbps),
        ] {
            match measure::throughput_via(&made.pods, listen, to, o.seconds) {
                Ok(bps) => gbps.push(bps / 1e9),
                Err(e) => level.errors.push(format!("throughput to {to}: {e:#}")),
            }
        }
    }
    if side == Side::Hypha
        && let Some(socket) = &made.socket
        && let Err(e) = translated(socket).map(|t| {
            if t == 0 {
                level.errors.push(
                    "Hypha's service list counts no translated connection: the VIPs were not load balanced by Hypha".to_owned(),
                );
            }
        })
    {
        level
            .errors
            .push(format!("reading Hypha's backend counters: {e:#}"));
    }
}

/// Connections Hypha translated, summed over every service's backends.
fn translated(socket: &Path) -> Result<u64> {
    let list = api(socket, "GET", "/v1/services", None)?;
    let list: Value = serde_json::from_str(&list).context("parsing GET /v1/services")?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["ports"].as_array().into_iter().flatten())
        .flat_map(|p| p["backends"].as_array().into_iter().flatten())
        .filter_map(|b| b["connections"].as_u64())
        .sum())
}

/// The Kubernetes `Service` documents of services `range` (port `port`), and the iperf
/// service when `iperf`.
fn services_yaml(range: std::ops::Range<u32>, port: u16, iperf: bool) -> String {
    let doc = |name: &str, vip: Ipv4Addr, app: &str, port: u16, target: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\nspec:\n  type: ClusterIP\n  clusterIP: {vip}\n  selector:\n    app: {app}\n  ports:\n  - name: tcp\n    protocol: TCP\n    port: {port}\n    targetPort: {target}\n"
        )
    };
    let mut docs: Vec<String> = range
        .map(|i| doc(&service_name(i), vip(i), "backend", port, TARGET_PORT))
        .collect();
    if iperf {
        docs.push(doc(
            IPERF_SERVICE,
            IPERF_VIP,
            "iperf",
            IPERF_PORT,
            IPERF_PORT,
        ));
    }
    docs.join("---\n")
}

/// A kube-proxy-style chain name: `PREFIX` and 16 characters of a hash of `what`.
fn chain(prefix: &str, what: u64) -> String {
    // splitmix64: kube-proxy hashes the service port's name (sha256, base32); any
    // well-spread hash gives names of the same shape.
    let mut z = what.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    format!("KUBE-{prefix}-{z:016X}")
}

fn svc_chain(i: u32) -> String {
    chain("SVC", u64::from(i))
}

fn sep_chain(i: u32, backend: usize) -> String {
    chain("SEP", (1 << 40) | u64::from(i) << 8 | backend as u64)
}

/// `KUBE-SERVICES`' rule for service i on `port`.
fn services_rule(i: u32, port: u16) -> String {
    format!(
        "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{NAMESPACE}/{}:tcp cluster IP\" -m tcp --dport {port} -j {}",
        vip(i),
        service_name(i),
        svc_chain(i)
    )
}

/// Service `name`'s `KUBE-SVC-…` and `KUBE-SEP-…` chains' rules, as kube-proxy writes them
/// (the masquerade mark for traffic from outside the cluster CIDR, then one
/// `statistic --mode random` rule per backend but the last, probability 1/(backends
/// left)).
#[expect(
    clippy::too_many_arguments,
    reason = "the fields of one kube-proxy service port, each written into the rules"
)]
fn service_chains(
    out: &mut String,
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    svc: &str,
    seps: &[String],
    backends: &[(Ipv4Addr, u16)],
    cluster_cidr: &str,
) {
    use std::fmt::Write as _;
    let comment = format!("{NAMESPACE}/{name}:tcp");
    let _ = writeln!(
        out,
        "-A {svc} ! -s {cluster_cidr} -d {vip}/32 -p tcp -m comment --comment \"{comment} cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ"
    );
    let count = backends.len();
    for (k, ((ip, target), sep)) in backends.iter().zip(seps).enumerate() {
        let left = count - k;
        if left > 1 {
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{comment} -> {ip}:{target}\" -m statistic --mode random --probability {:.10} -j {sep}",
                1.0 / left as f64
            );
        } else {
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{comment} -> {ip}:{target}\" -j {sep}"
            );
        }
    }
    for ((ip, target), sep) in backends.iter().zip(seps) {
        let _ = writeln!(
            out,
            "-A {sep} -s {ip}/32 -m comment --comment \"{comment}\" -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            out,
            "-A {sep} -p tcp -m comment --comment \"{comment}\" -m tcp -j DNAT --to-destination {ip}:{target}"
        );
    }
}

/// The whole nat table for `n` services (and the iperf service, last), as one
/// `iptables-restore` input.
fn kube_proxy_rules(backends: &[Ipv4Addr], iperf: Ipv4Addr, cluster_cidr: &str, n: u32) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(n as usize * 1_200 + 2_000);
    s += "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n";
    let iperf_svc = chain("SVC", u64::MAX);
    let iperf_sep = chain("SEP", u64::MAX);
    for i in 0..n {
        let _ = writeln!(s, ":{} - [0:0]", svc_chain(i));
        for k in 0..backends.len() {
            let _ = writeln!(s, ":{} - [0:0]", sep_chain(i, k));
        }
    }
    let _ = writeln!(s, ":{iperf_svc} - [0:0]\n:{iperf_sep} - [0:0]");
    s += "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    s += "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    s += "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n";
    s += "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n";
    s += "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n";
    s += "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n";
    s += "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n";
    for i in 0..n {
        s += &services_rule(i, SERVICE_PORT);
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "-A KUBE-SERVICES -d {IPERF_VIP}/32 -p tcp -m comment --comment \"{NAMESPACE}/{IPERF_SERVICE}:tcp cluster IP\" -m tcp --dport {IPERF_PORT} -j {iperf_svc}"
    );
    let targets: Vec<(Ipv4Addr, u16)> = backends.iter().map(|b| (*b, TARGET_PORT)).collect();
    for i in 0..n {
        let seps: Vec<String> = (0..backends.len()).map(|k| sep_chain(i, k)).collect();
        service_chains(
            &mut s,
            &service_name(i),
            vip(i),
            SERVICE_PORT,
            &svc_chain(i),
            &seps,
            &targets,
            cluster_cidr,
        );
    }
    service_chains(
        &mut s,
        IPERF_SERVICE,
        IPERF_VIP,
        IPERF_PORT,
        &iperf_svc,
        &[iperf_sep],
        &[(iperf, IPERF_PORT)],
        cluster_cidr,
    );
    s += "COMMIT\n";
    s
}

/// One change, service 0 on `port`, as kube-proxy's partial sync writes it with
/// `iptables-restore --noflush`: `KUBE-SERVICES` whole (a chain named in the input is
/// flushed), and the changed service's chains.
fn kube_proxy_change(backends: &[Ipv4Addr], cluster_cidr: &str, n: u32, port: u16) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(n as usize * 160 + 2_000);
    s += "*nat\n:KUBE-SERVICES - [0:0]\n";
    let seps: Vec<String> = (0..backends.len()).map(|k| sep_chain(0, k)).collect();
    let _ = writeln!(s, ":{} - [0:0]", svc_chain(0));
    for sep in &seps {
        let _ = writeln!(s, ":{sep} - [0:0]");
    }
    for i in 0..n {
        s += &services_rule(i, if i == 0 { port } else { SERVICE_PORT });
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "-A KUBE-SERVICES -d {IPERF_VIP}/32 -p tcp -m comment --comment \"{NAMESPACE}/{IPERF_SERVICE}:tcp cluster IP\" -m tcp --dport {IPERF_PORT} -j {}",
        chain("SVC", u64::MAX)
    );
    let targets: Vec<(Ipv4Addr, u16)> = backends.iter().map(|b| (*b, TARGET_PORT)).collect();
    service_chains(
        &mut s,
        &service_name(0),
        vip(0),
        port,
        &svc_chain(0),
        &seps,
        &targets,
        cluster_cidr,
    );
    s += "COMMIT\n";
    s
}

fn network_of(ip: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, _] = ip.octets();
    Ipv4Addr::new(a, b, c, 0)
}

/// The iptables side: a node namespace routing five pods (client, iperf, three
/// backends), each behind a veth with its `/32`.
fn iptables_setup(plan: &Plan, td: &Teardown) -> Result<Made> {
    let (a, b) = plan.subnet_of(Kind::Veth);
    let node = plan.netns("ipt-node");
    setups::add_netns(td, &node)?;
    in_netns(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    ip(&[
        "-n",
        &node,
        "addr",
        "add",
        &format!("{GATEWAY}/32"),
        "dev",
        "lo",
    ])?;
    let mut pods = Vec::new();
    for (k, pod) in ["c", "iperf", "b0", "b1", "b2"].into_iter().enumerate() {
        let ns = plan.netns(&format!("ipt-{pod}"));
        let addr = Ipv4Addr::new(10, a, b, 10 + k as u8);
        let host_if = format!("v{pod}");
        setups::add_netns(td, &ns)?;
        ip(&[
            "-n", &node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ])?;
        ip(&["-n", &node, "link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            &node,
            "route",
            "add",
            &format!("{addr}/32"),
            "dev",
            &host_if,
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n", &ns, "route", "add", GATEWAY, "dev", "eth0", "scope", "link",
        ])?;
        ip(&[
            "-n", &ns, "route", "add", "default", "via", GATEWAY, "dev", "eth0",
        ])?;
        pods.push((ns, addr));
    }
    let mut pods = pods.into_iter();
    let (client_ns, client_ip) = pods.next().context("the client")?;
    let (server_ns, server_ip) = pods.next().context("the iperf pod")?;
    Ok(Made {
        pods: Pods {
            client_ns,
            server_ns,
            client_ip,
            server_ip,
            client_ip6: None,
            server_ip6: None,
            agent_socket: None,
        },
        backends: pods.collect(),
        socket: None,
        node_ns: Some(node),
    })
}

/// The Hypha side: the agent and the client (`app=client`) and iperf (`app=iperf`) pods
/// of the datapath bench's setup, and three pods `app=backend`.
fn hypha_setup(plan: &Plan, td: &Teardown) -> Result<Made> {
    let pods = setups::create_hypha(
        plan,
        td,
        &HyphaOptions {
            policy_dir: None,
            app_labels: Some(("client".to_owned(), "iperf".to_owned())),
            ..HyphaOptions::default()
        },
    )?;
    let mut backends = Vec::new();
    for k in 0..BACKENDS {
        let pod = format!("hy-b{k}");
        let result = setups::add_hypha_pod(plan, td, &pod, "backend")?;
        backends.push((plan.netns(&pod), setups::first_address(&result)?));
    }
    Ok(Made {
        socket: pods.agent_socket.clone(),
        pods,
        backends,
        node_ns: None,
    })
}

fn ip(args: &[&str]) -> Result<()> {
    output(Command::new("ip").args(args)).map(drop)
}

/// Runs `cmd` inside the named namespace; its standard output.
fn in_netns(ns: &str, cmd: &[&str]) -> Result<String> {
    output(Command::new("ip").args(["netns", "exec", ns]).args(cmd))
}

/// `restore ARGS` inside `ns` with `input` on its standard input.
fn restore_in(ns: &str, restore: &str, args: &[&str], input: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, restore]).args(args);
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", describe(&cmd)))?;
    let wrote = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} failed with {}: {}",
            describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    wrote.with_context(|| format!("writing to {}", describe(&cmd)))
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// One HTTP/1.1 request to the agent's API on its unix socket; the answer's body, or an
/// error with the status and body when it is not a 2xx.
fn api(socket: &Path, method: &str, path: &str, body: Option<&[u8]>) -> Result<String> {
    let mut conn = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer)
        .with_context(|| format!("reading the answer to {method} {path}"))?;
    let (status, body) = parse_http(&answer)?;
    if !(200..300).contains(&status) {
        bail!("{method} {path}: HTTP {status}: {body}");
    }
    Ok(body)
}

/// An HTTP/1.1 answer's status and body (de-chunked when chunked).
fn parse_http(answer: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP answer: {text}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    if !chunked {
        return Ok((status, body.to_owned()));
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .context("a chunk without its size line")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("a bad chunk size {size:?}"))?;
        if size == 0 {
            break;
        }
        let chunk = after.get(..size).context("a short chunk")?;
        out += chunk;
        rest = after.get(size + 2..).unwrap_or_default();
    }
    Ok((status, out))
}

/// One connection from `client_ns` to `addr` with a 1-byte round trip.
fn probe(client_ns: &str, addr: SocketAddr) -> Result<()> {
    let ns = client_ns.to_owned();
    std::thread::spawn(move || -> Result<()> {
        enter_netns(&ns)?;
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connecting to {addr}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut byte = [b'p'];
        conn.write_all(&byte)?;
        conn.read_exact(&mut byte)
            .with_context(|| format!("no answer from {addr}"))
    })
    .join()
    .map_err(|_| anyhow!("the probe panicked"))?
}

/// The backends' servers: on each, a thread in its namespace answering one byte on
/// [`TARGET_PORT`] and closing first (so the client's ports are not left in TIME_WAIT).
struct BackendServers {
    stop: Arc<AtomicBool>,
    served: Vec<Arc<AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl BackendServers {
    fn start(backends: &[(String, Ipv4Addr)]) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut servers = Self {
            stop: stop.clone(),
            served: Vec::new(),
            threads: Vec::new(),
        };
        for (ns, ip) in backends {
            let (ns, ip, stop) = (ns.clone(), *ip, stop.clone());
            let served = Arc::new(AtomicU64::new(0));
            let count = served.clone();
            let (ready_tx, ready_rx) = mpsc::channel();
            servers.threads.push(std::thread::spawn(move || {
                serve(&ns, ip, &stop, &count, &ready_tx)
            }));
            servers.served.push(served);
            if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
                let e = servers
                    .stop()
                    .err()
                    .unwrap_or_else(|| anyhow!("it stopped"));
                return Err(e.context(format!("the server on {ip}:{TARGET_PORT} did not start")));
            }
        }
        Ok(servers)
    }

    fn served(&self) -> Vec<u64> {
        self.served
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Stops every server; the errors they met.
    fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("{e:#}")),
                Err(_) => errors.push("a server panicked".to_owned()),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", errors.join("; "))
        }
    }
}

fn serve(
    ns: &str,
    ip: Ipv4Addr,
    stop: &AtomicBool,
    served: &AtomicU64,
    ready: &mpsc::Sender<()>,
) -> Result<()> {
    enter_netns(ns)?;
    let listener = TcpListener::bind((ip, TARGET_PORT))
        .with_context(|| format!("binding {ip}:{TARGET_PORT} in {ns}"))?;
    let _ = ready.send(());
    while !stop.load(Ordering::Relaxed) {
        let mut fd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; the listener outlives it.
        let rc = unsafe { libc::poll(&mut fd, 1, 100) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("polling the listener");
        }
        if rc == 0 {
            continue;
        }
        let (mut conn, _) = listener.accept().context("accepting")?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut byte = [0u8; 1];
        if conn.read_exact(&mut byte).is_ok() && conn.write_all(&byte).is_ok() {
            served.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// New connections from `client_ns` for `seconds` (at most [`MAX_CONNECTIONS`]), each to
/// the VIP of a service chosen at random among `n`, timed from connect to the 1-byte
/// reply; and how many failed.
fn connections(client_ns: &str, n: u32, seconds: u32) -> Result<(Latency, u64)> {
    let ns = client_ns.to_owned();
    let duration = Duration::from_secs(u64::from(seconds));
    let (mut samples, failures) = std::thread::spawn(move || -> Result<(Vec<u32>, u64)> {
        enter_netns(&ns)?;
        let mut rng = Rng::seeded();
        let mut samples = Vec::new();
        let mut failures = 0u64;
        let start = Instant::now();
        while start.elapsed() < duration && samples.len() < MAX_CONNECTIONS {
            let addr = SocketAddr::from((vip(rng.below(n)), SERVICE_PORT));
            let t = Instant::now();
            let round_trip = || -> std::io::Result<TcpStream> {
                let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
                conn.set_nodelay(true)?;
                conn.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut byte = [b'x'];
                conn.write_all(&byte)?;
                conn.read_exact(&mut byte)?;
                Ok(conn)
            };
            match round_trip() {
                Ok(mut conn) => {
                    samples.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
                    // The server's FIN first, so that this side's close is the passive one.
                    let _ = conn.read(&mut [0u8; 1]);
                }
                Err(_) => failures += 1,
            }
            if failures > 100 {
                bail!("over 100 connections to VIPs failed (the last to {addr})");
            }
        }
        Ok((samples, failures))
    })
    .join()
    .map_err(|_| anyhow!("the new-connection client panicked"))??;
    if samples.is_empty() {
        bail!("no connection completed");
    }
    samples.sort_unstable();
    Ok((Latency::from_sorted(&samples), failures))
}

/// xorshift64*: which VIP each connection goes to.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self(t | 1)
    }

    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % u64::from(n.max(1))) as u32
    }
}

fn describe_level(l: &Level) -> String {
    let s = summarize(l);
    let opt = |v: Option<f64>, d: usize| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.d$}"));
    let mut out = format!(
        "program {} ms{}; change {} ms (max {}); new conn p50 {} µs p99 {} µs; VIP {} / direct {} Gbit/s",
        opt(s.program_ms, 1),
        s.program_us.map_or_else(String::new, |us| format!(
            " (datapath {:.1} ms)",
            us as f64 / 1e3
        )),
        opt(s.change_median_ms, 2),
        opt(s.change_max_ms, 2),
        opt(s.p50_us, 1),
        opt(s.p99_us, 1),
        opt(s.vip_gbps, 2),
        opt(s.direct_gbps, 2),
    );
    for e in &l.errors {
        out += &format!("\n      FAILED {e}");
    }
    out
}

fn summarize(l: &Level) -> Summary {
    let vip_gbps = median(l.vip_gbps.iter().copied());
    let direct_gbps = median(l.direct_gbps.iter().copied());
    Summary {
        p50_us: l.connect.as_ref().map(|c| f64::from(c.p50_ns) / 1e3),
        p99_us: l.connect.as_ref().map(|c| f64::from(c.p99_ns) / 1e3),
        vip_gbps,
        direct_gbps,
        vip_of_direct: ratio(vip_gbps, direct_gbps),
        program_ms: l.program_ms,
        program_us: l.program_us,
        change_median_ms: median(l.change_ms.iter().copied()),
        change_max_ms: l.change_ms.iter().copied().reduce(f64::max),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b.filter(|b| *b > 0.0)?)
}

fn report(o: &Options, machine: Machine, sides: Vec<SideReport>, errors: Vec<String>) -> Report {
    let summary: Vec<(Side, Vec<(u32, Summary)>)> = sides
        .iter()
        .map(|s| {
            (
                s.name,
                s.levels
                    .iter()
                    .map(|l| (l.services, summarize(l)))
                    .collect(),
            )
        })
        .collect();
    let targets = targets(&summary);
    let mut counts = o.services.clone();
    counts.sort_unstable();
    counts.dedup();
    Report {
        settings: json!({
            "services": counts,
            "backends_per_service": BACKENDS,
            "seconds": o.seconds,
            "runs": o.runs,
            "changes": o.changes,
            "apply_with": o.apply_with,
            "quick": o.quick,
        }),
        baseline: json!({
            "iptables": o.iptables,
            "version": output(Command::new(&o.iptables).arg("--version"))
                .ok()
                .map(|v| v.trim().to_owned()),
            "example_service": kube_proxy_rules(&[Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)], Ipv4Addr::new(10, 0, 0, 4), "10.0.0.0/24", 1),
        }),
        machine,
        sides,
        summary,
        targets,
        errors,
    }
}

fn targets(summary: &[(Side, Vec<(u32, Summary)>)]) -> Vec<Target> {
    let of = |side: Side| {
        summary
            .iter()
            .find(|(s, _)| *s == side)
            .map(|(_, l)| l.clone())
            .unwrap_or_default()
    };
    let (hypha, iptables) = (of(Side::Hypha), of(Side::Iptables));
    let at = |levels: &[(u32, Summary)], n: u32| {
        levels
            .iter()
            .find(|(c, _)| *c == n)
            .map(|(_, s)| *s)
            .unwrap_or_default()
    };
    let mut targets = Vec::new();
    // Flat: the largest count against the smallest.
    let (lo, hi) = (
        hypha.first().map(|(n, _)| *n),
        hypha.last().map(|(n, _)| *n),
    );
    if let (Some(lo), Some(hi)) = (lo, hi)
        && lo != hi
    {
        let (a, b) = (at(&hypha, lo).p50_us, at(&hypha, hi).p50_us);
        let r = ratio(b, a);
        targets.push(Target {
            goal: format!(
                "Hypha new-connection p50 at {hi} services within {TARGET_FLAT_PCT:.0}% of at {lo}"
            ),
            measured: a.zip(b).map(|(a, b)| {
                format!(
                    "{b:.1} vs {a:.1} µs ({:+.1}%)",
                    100.0 * (r.unwrap_or(f64::NAN) - 1.0)
                )
            }),
            pass: r.map(|r| r <= 1.0 + TARGET_FLAT_PCT / 100.0),
        });
    }
    for &(n, h) in hypha.iter().filter(|(n, _)| *n >= 1_000) {
        let i = at(&iptables, n);
        targets.push(Target {
            goal: format!("Hypha p50 below iptables' at {n} services"),
            measured: h
                .p50_us
                .zip(i.p50_us)
                .map(|(h, i)| format!("{h:.1} vs {i:.1} µs")),
            pass: h.p50_us.zip(i.p50_us).map(|(h, i)| h < i),
        });
    }
    let worst = hypha
        .iter()
        .filter_map(|(n, s)| s.vip_of_direct.map(|r| (*n, r, *s)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    targets.push(Target {
        goal: format!(
            "Hypha throughput through the VIP >= {:.0}% of direct (every count)",
            TARGET_VIP_OF_DIRECT * 100.0
        ),
        measured: worst.map(|(n, r, s)| {
            format!(
                "worst at {n}: {:.2} vs {:.2} Gbit/s ({:.1}%)",
                s.vip_gbps.unwrap_or(f64::NAN),
                s.direct_gbps.unwrap_or(f64::NAN),
                100.0 * r
            )
        }),
        pass: worst.map(|(_, r, _)| r >= TARGET_VIP_OF_DIRECT),
    });
    let ten = at(&hypha, 10_000).program_ms;
    targets.push(Target {
        goal: format!(
            "Hypha programs 10,000 services in < {:.0} s",
            TARGET_PROGRAM_10K_MS / 1e3
        ),
        measured: ten.map(|ms| format!("{ms:.0} ms")),
        pass: ten.map(|ms| ms < TARGET_PROGRAM_10K_MS),
    });
    let change = hypha
        .iter()
        .filter_map(|(n, s)| s.change_median_ms.map(|m| (*n, m)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    targets.push(Target {
        goal: format!(
            "Hypha applies one change in < {TARGET_CHANGE_MS:.0} ms (median, every count)"
        ),
        measured: change.map(|(n, ms)| format!("worst at {n}: {ms:.2} ms")),
        pass: change.map(|(_, ms)| ms < TARGET_CHANGE_MS),
    });
    targets
}

fn print_table(r: &Report) {
    let opt = |v: Option<f64>, d: usize| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.d$}"));
    println!();
    println!(
        "Services bench: {} services x {} backends; {} s runs, {} throughput runs, {} changes; kernel {}, {} CPUs",
        r.settings["services"],
        BACKENDS,
        r.settings["seconds"],
        r.settings["runs"],
        r.settings["changes"],
        r.machine.kernel,
        r.machine.nproc
    );
    println!(
        "{:<9} {:>8} {:>9} {:>9} {:>10} {:>10} {:>12} {:>14} {:>10} {:>10}",
        "side",
        "services",
        "p50 µs",
        "p99 µs",
        "VIP Gb/s",
        "direct",
        "VIP/direct",
        "program ms",
        "change ms",
        "change max"
    );
    for (side, levels) in &r.summary {
        for (n, s) in levels {
            let program = match (s.program_ms, s.program_us) {
                (Some(ms), Some(us)) => format!("{ms:.1} ({:.1})", us as f64 / 1e3),
                (ms, _) => opt(ms, 1),
            };
            println!(
                "{:<9} {:>8} {:>9} {:>9} {:>10} {:>10} {:>12} {:>14} {:>10} {:>10}",
                side.name(),
                n,
                opt(s.p50_us, 1),
                opt(s.p99_us, 1),
                opt(s.vip_gbps, 2),
                opt(s.direct_gbps, 2),
                s.vip_of_direct
                    .map_or_else(|| "n/a".to_owned(), |v| format!("{:.1}%", v * 100.0)),
                program,
                opt(s.change_median_ms, 2),
                opt(s.change_max_ms, 2),
            );
        }
    }
    println!(
        "(program: wall time of iptables-restore or of Hypha's apply, Hypha's datapath share in parentheses; change: one service's port, median and max)"
    );
}

fn chart(r: &Report) -> String {
    let sides = [(Side::Hypha, "#2a9d8f"), (Side::Iptables, "#e76f51")];
    let mut counts: Vec<u32> = r
        .summary
        .iter()
        .flat_map(|(_, l)| l.iter().map(|(n, _)| *n))
        .collect();
    counts.sort_unstable();
    counts.dedup();
    let value = |side: Side, n: u32, f: &dyn Fn(&Summary) -> Option<f64>| {
        r.summary
            .iter()
            .find(|(s, _)| *s == side)
            .and_then(|(_, l)| l.iter().find(|(c, _)| *c == n))
            .and_then(|(_, s)| f(s))
    };
    let chart_of =
        |title: &str, unit: &str, decimals: usize, f: &dyn Fn(&Summary) -> Option<f64>| BarChart {
            title: title.to_owned(),
            unit: unit.to_owned(),
            categories: counts.iter().map(|n| format!("{n} services")).collect(),
            series: sides
                .iter()
                .map(|(s, c)| Series::new(s.name(), c))
                .collect(),
            values: counts
                .iter()
                .map(|n| sides.iter().map(|(s, _)| value(*s, *n, f)).collect())
                .collect(),
            decimals,
        };
    let p50 = chart_of("New connection to a random VIP, p50", "µs", 1, &|s| {
        s.p50_us
    });
    let program = chart_of("Programming all services", "ms (wall)", 0, &|s| {
        s.program_ms
    });
    let change = chart_of("One change (a service's port)", "ms (median)", 2, &|s| {
        s.change_median_ms
    });
    let subtitle = format!(
        "{} backends per service; {} s runs; kernel {}, {} CPUs; {}",
        BACKENDS, r.settings["seconds"], r.machine.kernel, r.machine.nproc, r.machine.timestamp_utc
    );
    svg::document(
        1400.0,
        440.0,
        "cargo xtask bench services: Hypha against kube-proxy's iptables design",
        &subtitle,
        &[
            svg::bars(&p50, 10.0, 60.0, 450.0, 370.0),
            svg::bars(&program, 470.0, 60.0, 450.0, 370.0),
            svg::bars(&change, 930.0, 60.0, 460.0, 370.0),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends() -> Vec<Ipv4Addr> {
        (1..=3).map(|k| Ipv4Addr::new(10, 0, 0, k)).collect()
    }

    #[test]
    fn vips_are_distinct_and_inside_the_service_cidr() {
        assert_eq!(vip(0), Ipv4Addr::new(10, 96, 0, 16));
        assert_eq!(vip(9_999), Ipv4Addr::new(10, 96, 39, 31));
        assert!(vip(MAX_SERVICES - 1) < IPERF_VIP);
        assert_eq!(vip(MAX_SERVICES - 1).octets()[..2], [10, 96]);
    }

    #[test]
    fn the_nat_table_is_kube_proxys() {
        let rules = kube_proxy_rules(&backends(), Ipv4Addr::new(10, 0, 0, 4), "10.0.0.0/24", 2);
        let lines: Vec<&str> = rules.lines().collect();
        assert_eq!(lines.first(), Some(&"*nat"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
        // One KUBE-SERVICES rule per service and the iperf one.
        let services: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(services.len(), 3);
        assert!(
            services[0].contains("-d 10.96.0.16/32 -p tcp") && services[0].contains("--dport 80")
        );
        // Service 1's chain: masquerade mark, 1/3, 1/2, then the last backend.
        let svc = svc_chain(1);
        let chain: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("-A {svc} ")))
            .collect();
        assert_eq!(chain.len(), 4);
        assert!(chain[0].contains("-j KUBE-MARK-MASQ"));
        assert!(chain[1].contains("--probability 0.3333333333 "));
        assert!(chain[2].contains("--probability 0.5000000000 "));
        assert!(chain[3].ends_with(&format!("-j {}", sep_chain(1, 2))));
        let sep = sep_chain(1, 2);
        assert!(lines.contains(&format!(
            "-A {sep} -p tcp -m comment --comment \"default/svc-00001:tcp\" -m tcp -j DNAT --to-destination 10.0.0.3:8080"
        ).as_str()));
        // Every chain jumped to is declared, once; names fit iptables' 28 characters.
        let declared: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(':'))
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        let mut unique = declared.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), declared.len());
        assert!(declared.iter().all(|c| c.len() <= 28), "{declared:?}");
        for l in lines.iter().filter(|l| l.starts_with("-A ")) {
            let target = l.rsplit("-j ").next().unwrap_or("");
            let target = target.split(' ').next().unwrap_or("");
            if target.starts_with("KUBE-") {
                assert!(declared.contains(&target), "{target} is not declared: {l}");
            }
        }
    }

    #[test]
    fn a_change_rewrites_kube_services_and_the_changed_service() {
        let change = kube_proxy_change(&backends(), "10.0.0.0/24", 3, 81);
        let lines: Vec<&str> = change.lines().collect();
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("-A KUBE-SERVICES"))
                .count(),
            4
        );
        assert!(lines.contains(&services_rule(0, 81).as_str()));
        assert!(lines.contains(&services_rule(2, 80).as_str()));
        let declared: Vec<&&str> = lines.iter().filter(|l| l.starts_with(':')).collect();
        assert_eq!(declared.len(), 1 + 1 + BACKENDS, "{declared:?}");
        // Service 1's chains are left as they are.
        let other = svc_chain(1);
        assert!(
            !lines
                .iter()
                .any(|l| l.starts_with(&format!(":{other}"))
                    || l.starts_with(&format!("-A {other}")))
        );
    }

    #[test]
    fn the_services_are_kubernetes_documents() {
        let yaml = services_yaml(0..2, 81, true);
        let docs: Vec<&str> = yaml.split("---\n").collect();
        assert_eq!(docs.len(), 3);
        assert!(docs[0].contains("name: svc-00000") && docs[0].contains("clusterIP: 10.96.0.16"));
        assert!(docs[1].contains("port: 81\n    targetPort: 8080"));
        assert!(docs[2].contains("name: bench-iperf") && docs[2].contains("app: iperf"));
        assert!(yaml.starts_with("apiVersion: v1\nkind: Service\n"));
    }

    #[test]
    fn http_answers_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]";
        assert_eq!(parse_http(plain).unwrap(), (200, "[]".to_owned()));
        let chunked =
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_http(chunked).unwrap(), (400, "abcde".to_owned()));
        assert!(parse_http(b"garbage").is_err());
    }

    #[test]
    fn the_random_choice_covers_every_service() {
        let mut rng = Rng(12345);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[rng.below(10) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }

    fn summary(p50: f64, vip: f64, direct: f64, program: f64, change: f64) -> Summary {
        Summary {
            p50_us: Some(p50),
            p99_us: Some(p50 * 2.0),
            vip_gbps: Some(vip),
            direct_gbps: Some(direct),
            vip_of_direct: Some(vip / direct),
            program_ms: Some(program),
            program_us: None,
            change_median_ms: Some(change),
            change_max_ms: Some(change),
        }
    }

    #[test]
    fn targets_pass_and_fail() {
        let s = vec![
            (
                Side::Iptables,
                vec![
                    (100, summary(50.0, 10.0, 10.0, 10.0, 5.0)),
                    (1_000, summary(60.0, 10.0, 10.0, 100.0, 8.0)),
                    (10_000, summary(120.0, 10.0, 10.0, 1_000.0, 30.0)),
                ],
            ),
            (
                Side::Hypha,
                vec![
                    (100, summary(40.0, 9.9, 10.0, 10.0, 2.0)),
                    (1_000, summary(41.0, 9.7, 10.0, 100.0, 3.0)),
                    (10_000, summary(45.0, 9.9, 10.0, 1_500.0, 25.0)),
                ],
            ),
        ];
        let t = targets(&s);
        let pass: Vec<Option<bool>> = t.iter().map(|t| t.pass).collect();
        // Flat (45 is +12.5%), below at 1,000 and 10,000, VIP 97%, 1.5 s, 25 ms.
        assert_eq!(
            pass,
            [
                Some(false),
                Some(true),
                Some(true),
                Some(false),
                Some(true),
                Some(false)
            ]
        );
        let none = targets(&[]);
        assert!(none.iter().all(|t| t.pass.is_none()));
    }
}
