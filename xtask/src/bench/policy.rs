//! `cargo xtask bench policy`: what network policy costs the datapath, Hypha side by side
//! with the same rules as iptables rules in the pod's path, in one run:
//!
//! - pod-to-pod TCP throughput (iperf3), 1-byte request/response latency on one
//!   connection, and new connections (connect + 1-byte request/response + close) with 0
//!   (no policy at all), 100, 1,000 and 10,000 rules selecting the server pod. Rounds are
//!   interleaved: each round goes through every rule count (the order rotating), applying
//!   it to both setups, then measures both (the order rotating), so this small, shared
//!   machine's noise hits all alike. Medians over rounds, and ratios.
//! - Enforcement latency (Hypha): with the largest rule set in force, a small policy
//!   alternately allowing and not allowing the client on a probe port; the time from
//!   `hypha policy apply` returning, and from the file being renamed into the agent's
//!   watched directory, until new connections get the new verdict.
//!
//! The rules: N ingress rules, each allowing one /32 from 172.16.0.0/12 (never the
//! client) on its own TCP port, and one allowing the client (Hypha: by its `app=client`
//! label; iptables: by its address) on the ports the measurements use. For Hypha they
//! form one `HyphaNetworkPolicy` selecting `app=server`; for the baseline, the reference
//! bridge + host-local setup with the rules in the server pod's INPUT chain, ending in
//! DROP. Where the baseline's conntrack rule goes is `--conntrack`: `first` (the default)
//! is where Calico and kube-router put it (`-m conntrack --ctstate RELATED,ESTABLISHED
//! -j ACCEPT` at the top of each policy chain), so established packets skip the walk and
//! each new connection walks all N rules once; `last` puts it after the N rules, so every
//! packet of established traffic walks them too.

mod many;

use super::Target;
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Serialize;

use super::datapath::{Machine, machine};
use super::measure::{self, Latency, Pin, enter_netns};
use super::median;
use super::setups::{self, HyphaOptions, Kind, Plan, Pods};
use super::svg::{self, BarChart, Series};
use super::teardown::{Teardown, Undo};
use crate::util::{describe, output, workspace_root};

/// Hypha's targets: with the most rules, at least this share of its no-policy figures.
const TARGET_KEEP_PCT: f64 = 97.0;
/// Hypha's target: p99 from apply (or file) to enforcement.
const TARGET_ENFORCE_P99_MS: f64 = 100.0;

/// iperf3's default port, which `measure::throughput` uses.
const IPERF_PORT: u16 = 5201;
/// The one-connection request/response latency server.
const RR_PORT: u16 = 7001;
/// The new-connection (connect, request/response, close) server.
const CRR_PORT: u16 = 7002;
/// The port the enforcement probes connect to; its allow rule comes and goes.
const PROBE_PORT: u16 = 7003;
/// The first port of the non-matching rules (rule i allows port FIRST_RULE_PORT + i).
const FIRST_RULE_PORT: u32 = 10_000;
/// At most this many rules (their ports must stay below 65536).
const MAX_RULES: u32 = 50_000;

/// The Hypha policy holding the rules, and the one that toggles the probe port.
const RULES_POLICY: &str = "bench-rules";
const PROBE_POLICY: &str = "bench-probe";
const PROBE_DIR_POLICY: &str = "bench-probe-dir";

/// New connections timed in one run, at most (each leaves a TIME_WAIT socket behind).
const MAX_CONNECTIONS: usize = 5_000;
/// A probe's connect timeout; a probe that times out when a drop is expected is
/// confirmed by one with [`PROBE_CONFIRM`], so a slow connect is not taken for a drop.
const PROBE_TIMEOUT: Duration = Duration::from_millis(3);
const PROBE_CONFIRM: Duration = Duration::from_millis(200);
/// Probes start at most this often (each is a new connection) for [`PROBE_FAST_FOR`]
/// after a change, then at most every [`PROBE_SLOW`]. Few probes matter: Linux hands out
/// ephemeral ports in small random steps, so a port comes back after ~1,800
/// connections, and a new SYN on the 4-tuple of a flow closed less than
/// `CT_TIMEOUT_CLOSE_S` (10 s) before passes by Hypha's conntrack entry, whatever the
/// policy says now; probing every millisecond for a second saw such flows as flips.
const PROBE_EVERY: Duration = Duration::from_millis(1);
const PROBE_FAST_FOR: Duration = Duration::from_millis(20);
const PROBE_SLOW: Duration = Duration::from_millis(10);
/// A verdict that has not flipped after this long counts as a failure.
const FLIP_LIMIT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CtPlace {
    /// ESTABLISHED,RELATED accepted before the rules (Calico, kube-router).
    First,
    /// ESTABLISHED,RELATED accepted after the N rules: every packet walks them.
    Last,
}

#[derive(Clone, clap::Args)]
pub struct Options {
    /// Rounds; each applies every rule count to both setups and measures both.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Seconds of each throughput, latency and new-connection run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=300))]
    seconds: u32,
    /// Rule counts, comma-separated (0: no policy at all).
    #[arg(long, value_delimiter = ',', default_values_t = [0, 100, 1_000, 10_000],
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_RULES)))]
    rules: Vec<u32>,
    /// Verdict changes timed per trigger (apply, watched directory).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(50..=1000))]
    changes: u32,
    /// CPUs of the latency client and server threads.
    #[arg(long, value_enum, default_value_t = Pin::Same)]
    latency_pin: Pin,
    /// The baseline's iptables (`iptables`, `iptables-legacy`, `iptables-nft`); its
    /// `-restore` loads the rules.
    #[arg(long, default_value = "iptables")]
    iptables: String,
    /// Where the baseline accepts ESTABLISHED,RELATED traffic.
    #[arg(long, value_enum, default_value_t = CtPlace::First)]
    conntrack: CtPlace,
    /// The "many policies" case: this many NetworkPolicies (0: skip the case).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(0..=16_000))]
    many_policies: u32,
    /// ... over this many namespaces.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    many_namespaces: u32,
    /// ... with this many endpoints on the node (the client and the server included; the
    /// setup's pod CIDR is a /24).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u32).range(2..=252))]
    many_endpoints: u32,
    /// A short run, a couple of minutes: one round of 1 s, rule counts 0 and 1,000, 50
    /// verdict changes per trigger; the many-policies case at its full size.
    #[arg(long)]
    quick: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Side {
    Hypha,
    Iptables,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Hypha => "hypha",
            Side::Iptables => "iptables",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Side::Hypha => "Hypha agent + hypha-cni; one HyphaNetworkPolicy, eBPF policy map",
            Side::Iptables => "bridge + host-local; iptables rules in the server pod's INPUT",
        }
    }
}

/// One setup: its pods (if they could be made), what it holds now, and its runs.
struct Setup {
    side: Side,
    pods: Option<Pods>,
    error: Option<String>,
    /// The rule count in force.
    current: u32,
    runs: Vec<Run>,
}

#[derive(Serialize)]
struct Run {
    round: u32,
    rules: u32,
    /// How long `hypha policy apply` (or delete) or `iptables-restore` took.
    apply_ms: Option<f64>,
    throughput_gbps: Option<f64>,
    latency: Option<Latency>,
    /// New connections: connect + 1-byte request/response, each timed.
    connect: Option<Latency>,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    runs: u32,
    seconds: u32,
    latency_pin: Pin,
    rules: Vec<u32>,
    baseline: Baseline,
    setups: Vec<SetupReport>,
    /// Hypha's medians over iptables' at each rule count.
    hypha_vs_iptables: Vec<Ratios>,
    enforcement: Vec<Enforcement>,
    /// The "many policies" case, when it ran.
    many: Option<many::Many>,
    targets: Vec<Target>,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct Baseline {
    iptables: String,
    version: Option<String>,
    conntrack: CtPlace,
    /// The chain as loaded, with N standing for the rule count.
    chain: Vec<String>,
}

#[derive(Serialize)]
struct SetupReport {
    name: &'static str,
    description: &'static str,
    client: Option<String>,
    server: Option<String>,
    error: Option<String>,
    levels: Vec<Level>,
}

#[derive(Serialize)]
struct Level {
    rules: u32,
    median: Medians,
    /// Percentages of the same setup's no-policy medians.
    vs_no_policy: Option<Medians>,
    runs: Vec<Run>,
}

#[derive(Clone, Copy, Default, Serialize)]
struct Medians {
    throughput_gbps: Option<f64>,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    connect_p50_us: Option<f64>,
    connect_p99_us: Option<f64>,
    apply_ms: Option<f64>,
}

#[derive(Serialize)]
struct Ratios {
    rules: u32,
    throughput: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    connect_p50: Option<f64>,
}

#[derive(Serialize)]
struct Enforcement {
    trigger: &'static str,
    /// Rules in force in the other policy meanwhile.
    base_rules: u32,
    changes: usize,
    failed: usize,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
    /// How long the trigger itself took (apply returning; write + rename).
    trigger_p50_ms: Option<f64>,
    /// From the trigger's start (the API call) until enforced, p99.
    from_trigger_p99_ms: Option<f64>,
    /// `(verdict after the change, ms until enforced)`; `None` when it never flipped.
    samples: Vec<(&'static str, Option<f64>)>,
    errors: Vec<String>,
}

pub fn run(o: &Options) -> Result<()> {
    let quick;
    let o = if o.quick {
        quick = Options {
            runs: 1,
            seconds: 1,
            rules: vec![0, 1_000],
            changes: 50,
            ..o.clone()
        };
        &quick
    } else {
        o
    };
    let root = workspace_root();
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut levels: Vec<u32> = Vec::new();
    for n in &o.rules {
        if !levels.contains(n) {
            levels.push(*n);
        }
    }
    levels.sort_unstable();
    let restore = format!("{}-restore", o.iptables);
    for tool in [o.iptables.as_str(), restore.as_str(), "iperf3"] {
        output(Command::new(tool).arg("--version")).with_context(|| format!("{tool} is needed"))?;
    }
    let machine = machine();
    let td = Teardown::install()?;
    // 10.160-10.199: apart from the other benches' 10.200-10.240 and 10.250.
    let plan = Plan::in_range(
        root.join("target/release"),
        out_dir.join("policy-hypha-agent.log"),
        160,
        40,
    )?;
    td.make(Undo::Dir(plan.tmp.clone()), || {
        std::fs::create_dir_all(plan.tmp.join("policies"))
            .with_context(|| format!("creating {}", plan.tmp.display()))
    })?;

    let mut setups = Vec::new();
    for side in [Side::Hypha, Side::Iptables] {
        println!("==> setting up {}: {}", side.name(), side.describe());
        let made = match side {
            Side::Hypha => setups::create_hypha(
                &plan,
                &td,
                &HyphaOptions {
                    policy_dir: Some(plan.tmp.join("policies")),
                    app_labels: Some(("client".to_owned(), "server".to_owned())),
                    ..HyphaOptions::default()
                },
            )
            .and_then(|p| check_labels(&plan, &p).map(|()| p)),
            Side::Iptables => setups::create(Kind::Bridge, &plan, &td),
        };
        let (pods, error) = match made {
            Ok(p) => {
                println!(
                    "    client {} ({}) -> server {} ({})",
                    p.client_ip, p.client_ns, p.server_ip, p.server_ns
                );
                (Some(p), None)
            }
            Err(e) => {
                eprintln!("    FAILED: {e:#}");
                (None, Some(format!("{e:#}")))
            }
        };
        setups.push(Setup {
            side,
            pods,
            error,
            current: 0,
            runs: Vec::new(),
        });
    }
    let rules = RuleFiles::new(&plan.tmp);

    println!(
        "==> {} rounds; rule counts {:?}; per setup and count: {s} s throughput, {s} s latency, {s} s new connections",
        o.runs,
        levels,
        s = o.seconds
    );
    for round in 0..o.runs as usize {
        for k in 0..levels.len() {
            let n = levels[(round + k) % levels.len()];
            for j in 0..setups.len() {
                let setup = &mut setups[(round + k + j) % 2];
                let Some(pods) = &setup.pods else { continue };
                let mut errors = Vec::new();
                let applied = match setup.side {
                    Side::Hypha => hypha_rules(&plan, pods, &rules, setup.current, n),
                    Side::Iptables => iptables_rules(o, pods, n),
                };
                let apply_ms = match applied {
                    Ok(ms) => {
                        setup.current = n;
                        Some(ms)
                    }
                    Err(e) => {
                        errors.push(format!("applying {n} rules: {e:#}"));
                        None
                    }
                };
                let mut run = if errors.is_empty() {
                    measure_once(pods, o)
                } else {
                    Run::empty()
                };
                run.round = round as u32 + 1;
                run.rules = n;
                run.apply_ms = apply_ms;
                errors.append(&mut run.errors);
                run.errors = errors;
                println!(
                    "    round {}/{} {:<8} {:>6} rules  {}",
                    round + 1,
                    o.runs,
                    setup.side.name(),
                    n,
                    describe_run(&run)
                );
                setup.runs.push(run);
            }
        }
    }

    let mut enforcement = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    if let Some(hypha) = setups.iter_mut().find(|s| s.side == Side::Hypha)
        && let Some(pods) = &hypha.pods
    {
        let base = levels.last().copied().unwrap_or(0);
        match hypha_rules(&plan, pods, &rules, hypha.current, base) {
            Ok(_) => {
                hypha.current = base;
                println!(
                    "==> enforcement latency, {base} rules in force: {} changes by `hypha policy apply`, {} by the watched directory",
                    o.changes, o.changes
                );
                match enforcement_runs(&plan, pods, base, o.changes) {
                    Ok(mut e) => enforcement.append(&mut e),
                    Err(e) => errors.push(format!("enforcement: {e:#}")),
                }
            }
            Err(e) => errors.push(format!("enforcement: applying {base} rules: {e:#}")),
        }
    }

    let mut many = None;
    if o.many_policies > 0
        && let Some(hypha) = setups.iter_mut().find(|s| s.side == Side::Hypha)
        && let Some(pods) = &hypha.pods
    {
        // On its own: the rule set of the main case goes first.
        match hypha_rules(&plan, pods, &rules, hypha.current, 0) {
            Ok(_) => {
                hypha.current = 0;
                many = Some(many::run(
                    &plan,
                    &td,
                    pods,
                    o.many_policies as usize,
                    o.many_namespaces as usize,
                    o.many_endpoints as usize,
                    o.changes,
                ));
            }
            Err(e) => errors.push(format!("many policies: removing the rule set: {e:#}")),
        }
    }

    println!("==> cleaning up");
    if let Err(e) = td.finish() {
        errors.push(format!("{e:#}"));
    }

    let report = report(o, machine, &levels, setups, enforcement, many, errors);
    print_table(&report);
    super::write_outputs(&out_dir, "policy", &report, chart(&report), &report.errors)
}

impl Run {
    fn empty() -> Self {
        Self {
            round: 0,
            rules: 0,
            apply_ms: None,
            throughput_gbps: None,
            latency: None,
            connect: None,
            errors: Vec::new(),
        }
    }
}

fn measure_once(pods: &Pods, o: &Options) -> Run {
    let mut run = Run::empty();
    run.throughput_gbps = measure::throughput(pods, o.seconds)
        .map(|bps| bps / 1e9)
        .map_err(|e| run.errors.push(format!("throughput: {e:#}")))
        .ok();
    run.latency = measure::latency_on(pods, RR_PORT, o.seconds, o.latency_pin)
        .map_err(|e| run.errors.push(format!("latency: {e:#}")))
        .ok();
    run.connect = connections(pods, o.seconds)
        .map_err(|e| run.errors.push(format!("new connections: {e:#}")))
        .ok();
    run
}

/// The rule files, one per rule count, written once.
struct RuleFiles {
    dir: PathBuf,
}

impl RuleFiles {
    fn new(tmp: &Path) -> Self {
        Self {
            dir: tmp.to_path_buf(),
        }
    }

    fn path(&self, n: u32) -> Result<PathBuf> {
        let path = self.dir.join(format!("rules-{n}.yaml"));
        if !path.exists() {
            std::fs::write(&path, rules_policy(n))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(path)
    }
}

/// Rule i's source: the i-th address of 172.16.0.0/12 after 172.16.0.0.
fn rule_source(i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(172, 16, 0, 1)) + i)
}

/// The Hypha policy with `n` non-matching rules and the client's.
fn rules_policy(n: u32) -> String {
    let mut s = format!(
        "apiVersion: hypha.dev/v1\nkind: HyphaNetworkPolicy\nmetadata: {{name: {RULES_POLICY}, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n"
    );
    for i in 0..n {
        s += &format!(
            "  - fromCIDR: [{}/32]\n    toPorts: [{{ports: [{{port: \"{}\", protocol: TCP}}]}}]\n",
            rule_source(i),
            FIRST_RULE_PORT + i
        );
    }
    s += &format!(
        "  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: [{{ports: [{{port: \"{IPERF_PORT}\", protocol: TCP}}, {{port: \"{RR_PORT}\", protocol: TCP}}, {{port: \"{CRR_PORT}\", protocol: TCP}}]}}]\n"
    );
    s
}

/// The probe policy: the client allowed on the probe port, or on the next port only.
fn probe_policy(name: &str, allow: bool) -> String {
    let port = if allow { PROBE_PORT } else { PROBE_PORT + 1 };
    format!(
        "apiVersion: hypha.dev/v1\nkind: HyphaNetworkPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: [{{ports: [{{port: \"{port}\", protocol: TCP}}]}}]\n"
    )
}

fn hypha(plan: &Plan, pods: &Pods, args: &[&str]) -> Result<String> {
    let socket = pods
        .agent_socket
        .as_ref()
        .context("the Hypha setup has no agent socket")?;
    output(
        Command::new(plan.bin.join("hypha"))
            .args(args)
            .arg("--socket")
            .arg(socket),
    )
}

/// Puts `n` rules in force for the Hypha server (from `current`); checks that its
/// endpoint enforces them; returns how long the apply (or delete) took.
fn hypha_rules(plan: &Plan, pods: &Pods, files: &RuleFiles, current: u32, n: u32) -> Result<f64> {
    let start = Instant::now();
    if n == 0 {
        if current != 0 {
            hypha(plan, pods, &["policy", "delete", RULES_POLICY])?;
        }
    } else {
        let path = files.path(n)?;
        let path = path.to_str().context("a temp path that is not UTF-8")?;
        hypha(plan, pods, &["policy", "apply", "-f", path])?;
    }
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let got = hypha(
        plan,
        pods,
        &[
            "policy",
            "get",
            &server_container(plan, pods)?,
            "-o",
            "json",
        ],
    )?;
    let got: serde_json::Value =
        serde_json::from_str(&got).context("parsing `hypha policy get -o json`")?;
    let ingress = &got["ingress"];
    let enforced = ingress["enforced"].as_bool() == Some(true);
    let entries = ingress["entries"].as_array().map_or(0, Vec::len);
    let ours = ingress["policies"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p.as_str() == Some("default/bench-rules")));
    if n == 0 && ours {
        bail!("{RULES_POLICY} still selects the server after its delete");
    }
    if n > 0 && !(enforced && ours && entries > n as usize) {
        bail!(
            "the server does not enforce {n} rules: enforced {enforced}, {entries} entries, policies {}",
            ingress["policies"]
        );
    }
    Ok(ms)
}

/// The server's container id, found by its address.
fn server_container(plan: &Plan, pods: &Pods) -> Result<String> {
    endpoint(plan, pods, pods.server_ip)?["container_id"]
        .as_str()
        .map(str::to_owned)
        .context("an endpoint without container_id")
}

fn endpoint(plan: &Plan, pods: &Pods, ip: std::net::Ipv4Addr) -> Result<serde_json::Value> {
    let list = hypha(plan, pods, &["endpoint", "list", "-o", "json"])?;
    let list: serde_json::Value =
        serde_json::from_str(&list).context("parsing `hypha endpoint list -o json`")?;
    list.as_array()
        .into_iter()
        .flatten()
        .find(|e| e["address"].as_str() == Some(&ip.to_string()))
        .cloned()
        .with_context(|| format!("no endpoint has address {ip}"))
}

/// The pods carry the labels the policies select.
fn check_labels(plan: &Plan, pods: &Pods) -> Result<()> {
    for (ip, app) in [(pods.client_ip, "client"), (pods.server_ip, "server")] {
        let ep = endpoint(plan, pods, ip)?;
        if ep["labels"]["app"].as_str() != Some(app) {
            bail!("the pod at {ip} has labels {}, not app={app}", ep["labels"]);
        }
    }
    Ok(())
}

/// The baseline's INPUT chain for `n` rules (`None`: no rules at all).
fn iptables_chain(n: Option<u32>, client: &str, ct: CtPlace) -> Vec<String> {
    let Some(n) = n else { return Vec::new() };
    let established = "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned();
    let mut chain = vec!["-A INPUT -i lo -j ACCEPT".to_owned()];
    if ct == CtPlace::First {
        chain.push(established.clone());
    }
    for i in 0..n {
        chain.push(format!(
            "-A INPUT -s {}/32 -p tcp -m tcp --dport {} -j ACCEPT",
            rule_source(i),
            FIRST_RULE_PORT + i
        ));
    }
    if ct == CtPlace::Last {
        chain.push(established);
    }
    chain.push(format!(
        "-A INPUT -s {client}/32 -p tcp -m multiport --dports {IPERF_PORT},{RR_PORT},{CRR_PORT} -j ACCEPT"
    ));
    chain.push("-A INPUT -j DROP".to_owned());
    chain
}

/// Loads `n` rules (0: an empty chain) into the server pod's INPUT with one
/// `iptables-restore`; checks the count; returns how long the restore took.
fn iptables_rules(o: &Options, pods: &Pods, n: u32) -> Result<f64> {
    let chain = iptables_chain(
        (n > 0).then_some(n),
        &pods.client_ip.to_string(),
        o.conntrack,
    );
    let mut input = String::from("*filter\n:INPUT ACCEPT [0:0]\n");
    for rule in &chain {
        input += rule;
        input.push('\n');
    }
    input += "COMMIT\n";
    let restore = format!("{}-restore", o.iptables);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &pods.server_ns, &restore]);
    let start = Instant::now();
    with_stdin(&mut cmd, &input)?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let listed = output(Command::new("ip").args([
        "netns",
        "exec",
        &pods.server_ns,
        &o.iptables,
        "-S",
        "INPUT",
    ]))?;
    let loaded = listed.lines().filter(|l| l.starts_with("-A ")).count();
    if loaded != chain.len() {
        bail!(
            "{} rules in the server's INPUT, {} expected",
            loaded,
            chain.len()
        );
    }
    Ok(ms)
}

fn with_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    let wrote = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} failed with {}: {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    wrote.with_context(|| format!("writing to {}", describe(cmd)))
}

/// New connections from the client pod for `seconds` (at most [`MAX_CONNECTIONS`]): each
/// timed from connect to the 1-byte reply. The server closes first, so the client's
/// ephemeral ports are not left in TIME_WAIT.
fn connections(pods: &Pods, seconds: u32) -> Result<Latency> {
    let (server_ns, client_ns, ip) = (
        pods.server_ns.clone(),
        pods.client_ns.clone(),
        pods.server_ip,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<()> {
            enter_netns(&server_ns)?;
            let listener = TcpListener::bind((ip, CRR_PORT))
                .with_context(|| format!("binding {ip}:{CRR_PORT} in {server_ns}"))?;
            listener.set_nonblocking(true)?;
            let _ = ready_tx.send(());
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false)?;
                        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
                        let mut byte = [0u8; 1];
                        if conn.read_exact(&mut byte).is_ok() {
                            let _ = conn.write_all(&byte);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    Err(e) => return Err(e).context("accepting"),
                }
            }
            Ok(())
        })
    };
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        stop.store(true, Ordering::Relaxed);
        return Err(match server.join() {
            Ok(Err(e)) => e,
            _ => anyhow!("it stopped"),
        }
        .context("the new-connection server did not start"));
    }
    let duration = Duration::from_secs(u64::from(seconds));
    let client = std::thread::spawn(move || -> Result<Vec<u32>> {
        enter_netns(&client_ns)?;
        let addr = SocketAddr::from((ip, CRR_PORT));
        let mut samples = Vec::new();
        let start = Instant::now();
        while start.elapsed() < duration && samples.len() < MAX_CONNECTIONS {
            let t = Instant::now();
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .with_context(|| format!("connecting to {addr} from {client_ns}"))?;
            conn.set_nodelay(true)?;
            conn.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut byte = [b'x'];
            conn.write_all(&byte)?;
            conn.read_exact(&mut byte)?;
            samples.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
            // Wait for the server's FIN, so that this side's close is the passive one.
            let _ = conn.read(&mut byte);
        }
        Ok(samples)
    });
    let samples = client
        .join()
        .map_err(|_| anyhow!("the new-connection client panicked"));
    stop.store(true, Ordering::Relaxed);
    let served = server
        .join()
        .map_err(|_| anyhow!("the new-connection server panicked"))?;
    let mut samples = samples?.context("new-connection client")?;
    served.context("new-connection server")?;
    if samples.is_empty() {
        bail!("no connections completed");
    }
    samples.sort_unstable();
    Ok(Latency::from_sorted(&samples))
}

/// Probes from the client pod, on a thread of its own inside the client's namespace.
struct Prober {
    ask: mpsc::Sender<(bool, Instant)>,
    answer: mpsc::Receiver<Result<Duration>>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl Prober {
    fn start(client_ns: String, addr: SocketAddr) -> Self {
        let (ask, asked) = mpsc::channel::<(bool, Instant)>();
        let (answer_tx, answer) = mpsc::channel();
        let thread = std::thread::spawn(move || -> Result<()> {
            enter_netns(&client_ns)?;
            for (want, since) in asked {
                let _ = answer_tx.send(until_verdict(addr, want, since));
            }
            Ok(())
        });
        Self {
            ask,
            answer,
            thread,
        }
    }

    /// Probes until new connections are `allowed` (or not); the time from `since` to
    /// the start of the first probe that saw it.
    fn wait(&self, allowed: bool, since: Instant) -> Result<Duration> {
        if self.ask.send((allowed, since)).is_err() {
            bail!("the prober stopped");
        }
        self.answer
            .recv_timeout(FLIP_LIMIT + Duration::from_secs(5))
            .map_err(|_| anyhow!("the prober did not answer"))?
    }

    fn stop(self) -> Result<()> {
        drop(self.ask);
        self.thread
            .join()
            .map_err(|_| anyhow!("the prober panicked"))?
    }
}

fn until_verdict(addr: SocketAddr, allowed: bool, since: Instant) -> Result<Duration> {
    loop {
        let t = Instant::now();
        let mut seen = probe(addr, PROBE_TIMEOUT);
        if !allowed && !seen {
            // A drop, or only a slow connect?
            seen = probe(addr, PROBE_CONFIRM);
        }
        if seen == allowed {
            return Ok(t.saturating_duration_since(since));
        }
        if since.elapsed() > FLIP_LIMIT {
            bail!(
                "new connections still {} {FLIP_LIMIT:?} after the change",
                if allowed { "dropped" } else { "allowed" }
            );
        }
        let every = if since.elapsed() < PROBE_FAST_FOR {
            PROBE_EVERY
        } else {
            PROBE_SLOW
        };
        let next = t + every;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

/// One new connection; whether it was made within `timeout`. Closed with a reset, so
/// that thousands of probes leave no TIME_WAIT behind.
fn probe(addr: SocketAddr, timeout: Duration) -> bool {
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(conn) => {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: the descriptor is the open socket `conn` owns; setsockopt reads
            // size_of::<linger>() bytes from a live local of exactly that type.
            unsafe {
                libc::setsockopt(
                    conn.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            true
        }
        Err(_) => false,
    }
}

/// A listener on the probe port in the server pod that accepts and drops connections
/// until stopped.
struct ProbeServer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl ProbeServer {
    fn start(pods: &Pods) -> Result<Self> {
        let (ns, ip) = (pods.server_ns.clone(), pods.server_ip);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<()> {
                enter_netns(&ns)?;
                let listener = TcpListener::bind((ip, PROBE_PORT))
                    .with_context(|| format!("binding {ip}:{PROBE_PORT} in {ns}"))?;
                listener.set_nonblocking(true)?;
                let _ = ready_tx.send(());
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        Err(e) => return Err(e).context("accepting probes"),
                    }
                }
                Ok(())
            })
        };
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            stop.store(true, Ordering::Relaxed);
            return Err(match thread.join() {
                Ok(Err(e)) => e,
                _ => anyhow!("it stopped"),
            }
            .context("the probe server did not start"));
        }
        Ok(Self { stop, thread })
    }

    fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the probe server panicked"))?
    }
}

/// Both enforcement measurements: by `hypha policy apply`, then by the watched directory.
fn enforcement_runs(plan: &Plan, pods: &Pods, base: u32, changes: u32) -> Result<Vec<Enforcement>> {
    let server = ProbeServer::start(pods)?;
    let prober = Prober::start(
        pods.client_ns.clone(),
        SocketAddr::from((pods.server_ip, PROBE_PORT)),
    );
    let result = (|| -> Result<Vec<Enforcement>> {
        let mut out = Vec::new();
        let file = plan.tmp.join("probe.yaml");
        let apply = |allow: bool| -> Result<()> {
            std::fs::write(&file, probe_policy(PROBE_POLICY, allow))
                .with_context(|| format!("writing {}", file.display()))?;
            let path = file.to_str().context("a temp path that is not UTF-8")?;
            hypha(plan, pods, &["policy", "apply", "-f", path]).map(drop)
        };
        out.push(enforcement("policy apply", base, changes, &prober, apply)?);
        hypha(plan, pods, &["policy", "delete", PROBE_POLICY])?;

        let dir = plan.tmp.join("policies");
        let staged = dir.join(".probe.tmp");
        let landed = dir.join("probe.yaml");
        let land = |allow: bool| -> Result<()> {
            std::fs::write(&staged, probe_policy(PROBE_DIR_POLICY, allow))
                .with_context(|| format!("writing {}", staged.display()))?;
            std::fs::rename(&staged, &landed)
                .with_context(|| format!("renaming into {}", landed.display()))
        };
        out.push(enforcement(
            "policy directory",
            base,
            changes,
            &prober,
            land,
        )?);
        std::fs::remove_file(&landed).with_context(|| format!("removing {}", landed.display()))?;
        Ok(out)
    })();
    let mut errors = Vec::new();
    if let Err(e) = prober.stop() {
        errors.push(format!("prober: {e:#}"));
    }
    if let Err(e) = server.stop() {
        errors.push(format!("probe server: {e:#}"));
    }
    match (result, errors.is_empty()) {
        (Ok(out), true) => Ok(out),
        (Ok(_), false) => bail!("{}", errors.join("; ")),
        (Err(e), _) => Err(e.context(errors.join("; "))),
    }
}

/// `changes` verdict flips by `change(allow)`, alternating, each timed from `change`
/// returning until the probes see the new verdict. It starts from a settled "allowed".
fn enforcement(
    trigger: &'static str,
    base: u32,
    changes: u32,
    prober: &Prober,
    change: impl Fn(bool) -> Result<()>,
) -> Result<Enforcement> {
    change(true)?;
    prober
        .wait(true, Instant::now())
        .with_context(|| format!("{trigger}: the probe port never opened"))?;
    let mut samples = Vec::new();
    let mut trigger_ms = Vec::new();
    let mut from_trigger = Vec::new();
    let mut errors = Vec::new();
    for i in 0..changes {
        let allow = i % 2 == 1;
        let start = Instant::now();
        if let Err(e) = change(allow) {
            errors.push(format!("change {}: {e:#}", i + 1));
            samples.push((verdict(allow), None));
            continue;
        }
        let returned = Instant::now();
        trigger_ms.push((returned - start).as_secs_f64() * 1e3);
        let got = prober.wait(allow, returned);
        let ms = match got {
            Ok(d) => {
                from_trigger.push((returned - start + d).as_secs_f64() * 1e3);
                Some(d.as_secs_f64() * 1e3)
            }
            Err(e) => {
                errors.push(format!("change {}: {e:#}", i + 1));
                // Let the next change start from a settled verdict.
                let _ = prober.wait(allow, Instant::now());
                None
            }
        };
        samples.push((verdict(allow), ms));
    }
    let mut ok: Vec<f64> = samples.iter().filter_map(|s| s.1).collect();
    ok.sort_by(f64::total_cmp);
    from_trigger.sort_by(f64::total_cmp);
    let percentile = |sorted: &[f64], p: f64| {
        (!sorted.is_empty()).then(|| {
            let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[rank.clamp(1, sorted.len()) - 1]
        })
    };
    let pct = |p: f64| percentile(&ok, p);
    let e = Enforcement {
        trigger,
        base_rules: base,
        changes: samples.len(),
        failed: samples.iter().filter(|s| s.1.is_none()).count(),
        p50_ms: pct(50.0),
        p99_ms: pct(99.0),
        max_ms: ok.last().copied(),
        trigger_p50_ms: median(trigger_ms),
        from_trigger_p99_ms: percentile(&from_trigger, 99.0),
        samples,
        errors,
    };
    println!(
        "    {trigger:<17} p50 {} ms  p99 {} ms  max {} ms  ({} changes, {} never flipped)",
        ms(e.p50_ms),
        ms(e.p99_ms),
        ms(e.max_ms),
        e.changes,
        e.failed
    );
    Ok(e)
}

fn verdict(allow: bool) -> &'static str {
    if allow { "allowed" } else { "dropped" }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.1}"))
}

fn us(ns: u32) -> f64 {
    f64::from(ns) / 1000.0
}

fn describe_run(r: &Run) -> String {
    let mut s = match r.throughput_gbps {
        Some(g) => format!("{g:6.2} Gbit/s"),
        None => "   n/a Gbit/s".to_owned(),
    };
    if let Some(l) = &r.latency {
        s += &format!("  rr p50 {:6.1} p99 {:6.1} µs", us(l.p50_ns), us(l.p99_ns));
    }
    if let Some(c) = &r.connect {
        s += &format!(
            "  conn p50 {:6.1} p99 {:6.1} µs ({})",
            us(c.p50_ns),
            us(c.p99_ns),
            c.round_trips
        );
    }
    if let Some(a) = r.apply_ms {
        s += &format!("  apply {a:.0} ms");
    }
    for e in &r.errors {
        s += &format!("\n      FAILED {e}");
    }
    s
}

fn medians(runs: &[&Run]) -> Medians {
    let lat = |f: fn(&Latency) -> u32| {
        median(
            runs.iter()
                .filter_map(|r| r.latency.as_ref().map(|l| us(f(l)))),
        )
    };
    let conn = |f: fn(&Latency) -> u32| {
        median(
            runs.iter()
                .filter_map(|r| r.connect.as_ref().map(|l| us(f(l)))),
        )
    };
    Medians {
        throughput_gbps: median(runs.iter().filter_map(|r| r.throughput_gbps)),
        p50_us: lat(|l| l.p50_ns),
        p99_us: lat(|l| l.p99_ns),
        connect_p50_us: conn(|l| l.p50_ns),
        connect_p99_us: conn(|l| l.p99_ns),
        apply_ms: median(runs.iter().filter_map(|r| r.apply_ms)),
    }
}

fn report(
    o: &Options,
    machine: Machine,
    levels: &[u32],
    setups: Vec<Setup>,
    enforcement: Vec<Enforcement>,
    many: Option<many::Many>,
    mut errors: Vec<String>,
) -> Report {
    let pct = |a: Option<f64>, b: Option<f64>| Some(100.0 * a? / b.filter(|b| *b > 0.0)?);
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b.filter(|b| *b > 0.0)?);
    let mut all: BTreeMap<&'static str, BTreeMap<u32, Medians>> = BTreeMap::new();
    let mut reports = Vec::new();
    for s in setups {
        if let Some(e) = &s.error {
            errors.push(format!("{}: {e}", s.side.name()));
        }
        for r in &s.runs {
            for e in &r.errors {
                errors.push(format!(
                    "{} round {} with {} rules: {e}",
                    s.side.name(),
                    r.round,
                    r.rules
                ));
            }
        }
        let mut by_level: BTreeMap<u32, Vec<Run>> = BTreeMap::new();
        for r in s.runs {
            by_level.entry(r.rules).or_default().push(r);
        }
        let m: BTreeMap<u32, Medians> = levels
            .iter()
            .map(|&n| {
                let runs: Vec<&Run> = by_level.get(&n).into_iter().flatten().collect();
                (n, medians(&runs))
            })
            .collect();
        let none = m.get(&0).copied();
        let levels_report = levels
            .iter()
            .map(|&n| {
                let med = m[&n];
                Level {
                    rules: n,
                    median: med,
                    vs_no_policy: none.map(|z| Medians {
                        throughput_gbps: pct(med.throughput_gbps, z.throughput_gbps),
                        p50_us: pct(med.p50_us, z.p50_us),
                        p99_us: pct(med.p99_us, z.p99_us),
                        connect_p50_us: pct(med.connect_p50_us, z.connect_p50_us),
                        connect_p99_us: pct(med.connect_p99_us, z.connect_p99_us),
                        apply_ms: None,
                    }),
                    runs: by_level.remove(&n).unwrap_or_default(),
                }
            })
            .collect();
        all.insert(s.side.name(), m);
        reports.push(SetupReport {
            name: s.side.name(),
            description: s.side.describe(),
            client: s
                .pods
                .as_ref()
                .map(|p| format!("{} in {}", p.client_ip, p.client_ns)),
            server: s
                .pods
                .as_ref()
                .map(|p| format!("{} in {}", p.server_ip, p.server_ns)),
            error: s.error,
            levels: levels_report,
        });
    }
    let get = |side: &str, n: u32| all.get(side).and_then(|m| m.get(&n)).copied();
    let hypha_vs_iptables = levels
        .iter()
        .map(|&n| {
            let (h, i) = (
                get("hypha", n).unwrap_or_default(),
                get("iptables", n).unwrap_or_default(),
            );
            Ratios {
                rules: n,
                throughput: ratio(h.throughput_gbps, i.throughput_gbps),
                p50: ratio(h.p50_us, i.p50_us),
                p99: ratio(h.p99_us, i.p99_us),
                connect_p50: ratio(h.connect_p50_us, i.connect_p50_us),
            }
        })
        .collect();

    let most = levels.last().copied().unwrap_or(0);
    let (h0, hn) = (
        get("hypha", 0).unwrap_or_default(),
        get("hypha", most).unwrap_or_default(),
    );
    let keep_tput = pct(hn.throughput_gbps, h0.throughput_gbps);
    // Latency kept: the no-policy p50 over this one (100% = no slower).
    let keep_p50 = pct(h0.p50_us, hn.p50_us);
    let mut targets = Vec::new();
    if levels.contains(&0) && most > 0 {
        targets.push(Target {
            goal: format!("Hypha {most} rules: throughput >= {TARGET_KEEP_PCT:.0}% of none"),
            measured: keep_tput.map(|p| format!("{p:.1}%")),
            pass: keep_tput.map(|p| p >= TARGET_KEEP_PCT),
        });
        targets.push(Target {
            goal: format!("Hypha {most} rules: latency >= {TARGET_KEEP_PCT:.0}% of none"),
            measured: keep_p50.map(|p| format!("{p:.1}% (p50 none / p50 {most})")),
            pass: keep_p50.map(|p| p >= TARGET_KEEP_PCT),
        });
    }
    for e in &enforcement {
        targets.push(Target {
            goal: format!(
                "enforcement p99 < {TARGET_ENFORCE_P99_MS:.0} ms ({})",
                e.trigger
            ),
            measured: e.p99_ms.map(|p| {
                if e.failed > 0 {
                    format!("{p:.1} ms, {} never flipped", e.failed)
                } else {
                    format!("{p:.1} ms")
                }
            }),
            pass: e.p99_ms.map(|p| p < TARGET_ENFORCE_P99_MS && e.failed == 0),
        });
        for err in &e.errors {
            errors.push(format!("enforcement by {}: {err}", e.trigger));
        }
    }
    if let Some(m) = &many {
        targets.extend(many::targets(m));
        errors.extend(m.errors.iter().map(|e| format!("many policies: {e}")));
        if let Some(e) = &m.enforcement {
            for err in &e.errors {
                errors.push(format!("many policies, enforcement: {err}"));
            }
        }
    }
    let client = "CLIENT".to_owned();
    Report {
        bench: "policy",
        machine,
        runs: o.runs,
        seconds: o.seconds,
        latency_pin: o.latency_pin,
        rules: levels.to_vec(),
        baseline: Baseline {
            iptables: o.iptables.clone(),
            version: output(Command::new(&o.iptables).arg("--version"))
                .ok()
                .map(|s| s.trim().to_owned()),
            conntrack: o.conntrack,
            chain: iptables_chain(Some(1), &client, o.conntrack)
                .into_iter()
                .map(|r| {
                    if r.contains(&FIRST_RULE_PORT.to_string()) {
                        "-A INPUT -s 172.16.x.y/32 -p tcp -m tcp --dport <10000+i> -j ACCEPT   (x N)"
                            .to_owned()
                    } else {
                        r
                    }
                })
                .collect(),
        },
        setups: reports,
        hypha_vs_iptables,
        enforcement,
        many,
        targets,
        errors,
    }
}

fn print_table(r: &Report) {
    let opt = |v: Option<f64>, decimals: usize| {
        v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}"))
    };
    let pct = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.1}%"));
    println!();
    println!(
        "Policy bench: median of {} rounds, {} s each; kernel {}, {} CPUs; latency threads: {}",
        r.runs,
        r.seconds,
        r.machine.kernel,
        r.machine.nproc,
        r.latency_pin.describe()
    );
    println!(
        "Baseline: {} ({}), conntrack ESTABLISHED,RELATED accepted {} the rules",
        r.baseline.iptables,
        r.baseline.version.as_deref().unwrap_or("version unknown"),
        match r.baseline.conntrack {
            CtPlace::First => "before",
            CtPlace::Last => "after",
        }
    );
    println!(
        "{:<9} {:>6} {:>8} {:>8} {:>8} {:>10} {:>10} {:>9} {:>9} {:>8} {:>9}",
        "setup",
        "rules",
        "Gbit/s",
        "p50 µs",
        "p99 µs",
        "conn p50",
        "conn p99",
        "apply ms",
        "tput %0",
        "p50 %0",
        "conn %0"
    );
    for s in &r.setups {
        for l in &s.levels {
            let m = &l.median;
            let v = l.vs_no_policy.unwrap_or_default();
            println!(
                "{:<9} {:>6} {:>8} {:>8} {:>8} {:>10} {:>10} {:>9} {:>9} {:>8} {:>9}",
                s.name,
                l.rules,
                opt(m.throughput_gbps, 2),
                opt(m.p50_us, 1),
                opt(m.p99_us, 1),
                opt(m.connect_p50_us, 1),
                opt(m.connect_p99_us, 1),
                opt(m.apply_ms, 0),
                pct(v.throughput_gbps),
                pct(v.p50_us),
                pct(v.connect_p50_us),
            );
        }
    }
    println!(
        "(conn: new connection, connect + 1-byte request/response, µs; %0: of the same setup with no policy)"
    );
    println!("Hypha / iptables:");
    for x in &r.hypha_vs_iptables {
        println!(
            "  {:>6} rules: throughput x{}, p50 x{}, p99 x{}, new-connection p50 x{}",
            x.rules,
            opt(x.throughput, 3),
            opt(x.p50, 3),
            opt(x.p99, 3),
            opt(x.connect_p50, 3)
        );
    }
    if !r.enforcement.is_empty() {
        println!(
            "Enforcement latency (Hypha), from the trigger until new connections get the new verdict:"
        );
        println!(
            "  {:<18} {:>10} {:>8} {:>8} {:>8} {:>8} {:>14}",
            "trigger", "base rules", "p50 ms", "p99 ms", "max ms", "changes", "trigger p50 ms"
        );
        for e in &r.enforcement {
            println!(
                "  {:<18} {:>10} {:>8} {:>8} {:>8} {:>8} {:>14}",
                e.trigger,
                e.base_rules,
                ms(e.p50_ms),
                ms(e.p99_ms),
                ms(e.max_ms),
                format!("{}{}", e.changes, if e.failed > 0 { "!" } else { "" }),
                ms(e.trigger_p50_ms)
            );
        }
    }
    if let Some(m) = &r.many {
        many::print(m);
    }
    super::print_targets("Targets:", &r.targets);
}

fn chart(r: &Report) -> String {
    let categories: Vec<String> = r.rules.iter().map(|n| format!("{n} rules")).collect();
    let sides = [("hypha", "#2a9d8f"), ("iptables", "#e76f51")];
    let series = || {
        sides
            .iter()
            .map(|(n, c)| Series::new(n, c))
            .collect::<Vec<_>>()
    };
    let values = |f: fn(&Medians) -> Option<f64>| {
        r.rules
            .iter()
            .map(|&n| {
                sides
                    .iter()
                    .map(|(name, _)| {
                        r.setups
                            .iter()
                            .find(|s| s.name == *name)
                            .and_then(|s| s.levels.iter().find(|l| l.rules == n))
                            .and_then(|l| f(&l.median))
                    })
                    .collect()
            })
            .collect()
    };
    let throughput = BarChart {
        title: "TCP throughput (iperf3, 1 stream)".to_owned(),
        unit: "Gbit/s (median)".to_owned(),
        categories: categories.clone(),
        series: series(),
        values: values(|m| m.throughput_gbps),
        decimals: 2,
    };
    let latency = BarChart {
        title: "1-byte request/response, one connection".to_owned(),
        unit: "p50 µs (median)".to_owned(),
        categories: categories.clone(),
        series: series(),
        values: values(|m| m.p50_us),
        decimals: 1,
    };
    let connect = BarChart {
        title: "New connection: connect + 1-byte request/response".to_owned(),
        unit: "p50 µs (median)".to_owned(),
        categories,
        series: series(),
        values: values(|m| m.connect_p50_us),
        decimals: 1,
    };
    let enforcement = BarChart {
        title: format!(
            "Hypha: trigger to enforcement ({} rules in force)",
            r.enforcement.first().map_or(0, |e| e.base_rules)
        ),
        unit: "ms".to_owned(),
        categories: r.enforcement.iter().map(|e| e.trigger.to_owned()).collect(),
        series: vec![Series::new("p50", "#457b9d"), Series::new("p99", "#e9c46a")],
        values: r
            .enforcement
            .iter()
            .map(|e| vec![e.p50_ms, e.p99_ms])
            .collect(),
        decimals: 1,
    };
    let (w, h) = (1000.0, 820.0);
    let (cw, ch) = (w / 2.0 - 20.0, (h - 70.0) / 2.0 - 10.0);
    svg::document(
        w,
        h,
        "Hypha policy bench: rules selecting the server pod",
        &format!(
            "{} rounds x {} s, interleaved; iptables conntrack {:?}; kernel {}, {} CPUs; {}",
            r.runs,
            r.seconds,
            r.baseline.conntrack,
            r.machine.kernel,
            r.machine.nproc,
            r.machine.timestamp_utc
        ),
        &[
            svg::bars(&throughput, 10.0, 60.0, cw, ch),
            svg::bars(&latency, w / 2.0 + 10.0, 60.0, cw, ch),
            svg::bars(&connect, 10.0, 70.0 + ch, cw, ch),
            svg::bars(&enforcement, w / 2.0 + 10.0, 70.0 + ch, cw, ch),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_sources_are_distinct_and_never_the_pods() {
        assert_eq!(rule_source(0).to_string(), "172.16.0.1");
        assert_eq!(rule_source(255).to_string(), "172.16.1.0");
        assert_eq!(rule_source(MAX_RULES - 1).to_string(), "172.16.195.80");
        const { assert!(FIRST_RULE_PORT + MAX_RULES <= 65_536) };
        for port in [IPERF_PORT, RR_PORT, CRR_PORT, PROBE_PORT, PROBE_PORT + 1] {
            assert!(u32::from(port) < FIRST_RULE_PORT);
        }
    }

    #[test]
    fn the_policy_has_one_rule_per_cidr_and_the_clients() {
        let p = rules_policy(3);
        assert_eq!(p.matches("fromCIDR: [172.16.0.").count(), 3);
        assert!(p.contains("port: \"10002\""));
        assert!(p.contains("fromEndpoints: [{matchLabels: {app: client}}]"));
        assert!(p.contains(&format!("port: \"{RR_PORT}\"")));
        assert!(probe_policy("x", true).contains(&format!("\"{PROBE_PORT}\"")));
        assert!(!probe_policy("x", false).contains(&format!("\"{PROBE_PORT}\"")));
    }

    #[test]
    fn the_chain_walks_n_rules_with_conntrack_where_asked() {
        assert!(iptables_chain(None, "10.0.0.1", CtPlace::First).is_empty());
        let first = iptables_chain(Some(2), "10.0.0.1", CtPlace::First);
        assert_eq!(first.len(), 6);
        assert!(first[1].contains("ESTABLISHED"));
        assert_eq!(first.last().map(String::as_str), Some("-A INPUT -j DROP"));
        let last = iptables_chain(Some(2), "10.0.0.1", CtPlace::Last);
        assert!(last[3].contains("ESTABLISHED"));
        assert!(last[4].contains("-s 10.0.0.1/32"));
    }
}
