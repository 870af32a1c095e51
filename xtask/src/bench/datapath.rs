//! `cargo xtask bench datapath`: pod-to-pod TCP throughput and 1-byte request/response
//! latency over a bare veth pair (the physical limit), the reference bridge plugin, and
//! Hypha, measured in one run with the setups taking turns (this machine is small and
//! shared: noise hits all three alike), reported as medians and ratios.
//!
//! `--family 4|6|both` (default both) picks the address families measured: for IPv6 the
//! setups are made dual stack (bridge with a second, IPv6 host-local range; Hypha with an
//! IPv6 pod CIDR) and every setup is measured once per family in each round, each family
//! against its own veth and bridge.

use super::Target;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::measure::{self, Latency, Pin};
use super::median;
use super::setups::{self, Kind, Plan, Pods};
use super::svg::{self, BarChart, Series};
use super::teardown::{Teardown, Undo};
use crate::util::workspace_root;

/// Hypha's targets, against the bare veth pair and the bridge plugin.
const TARGET_THROUGHPUT_OF_VETH: f64 = 95.0;
const TARGET_P50_OF_VETH: f64 = 110.0;

/// The address families a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Families {
    #[value(name = "4")]
    #[serde(rename = "4")]
    V4,
    #[value(name = "6")]
    #[serde(rename = "6")]
    V6,
    Both,
}

impl Families {
    fn describe(self) -> &'static str {
        match self {
            Families::V4 => "IPv4",
            Families::V6 => "IPv6",
            Families::Both => "IPv4 and IPv6",
        }
    }

    /// Whether each family is measured, IPv4's first: `ipv6` values in measuring order.
    fn list(self) -> &'static [bool] {
        match self {
            Families::V4 => &[false],
            Families::V6 => &[true],
            Families::Both => &[false, true],
        }
    }
}

#[derive(clap::Args)]
pub struct Options {
    /// Rounds of throughput + latency per setup; the setups take turns round by round
    /// [default: 5, 1 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: Option<u32>,
    /// Seconds of each throughput run and of each latency run [default: 5, 2 with
    /// --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=300))]
    seconds: Option<u32>,
    /// A short run (for CI): one round of 2 s, unless --runs or --seconds say otherwise.
    #[arg(long)]
    quick: bool,
    /// Address families to measure: 4, 6, or both (each with its own veth and bridge
    /// references and targets).
    #[arg(long, value_enum, default_value_t = Families::Both)]
    family: Families,
    /// Setups to compare, comma-separated (veth is the reference for the ratios).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Kind::Veth, Kind::Bridge, Kind::Hypha])]
    setups: Vec<Kind>,
    /// CPUs of the latency client and server threads.
    #[arg(long, value_enum, default_value_t = Pin::Same)]
    latency_pin: Pin,
    /// Another build's `hypha` and `hypha-cni` (e.g. the main branch's target/release):
    /// measured as one more setup, `hypha-base`, in the same rounds, and this build's
    /// Hypha given as a ratio of it (what a datapath change costs, such as tracing while
    /// it is off).
    #[arg(long, value_name = "DIR")]
    baseline_bin: Option<std::path::PathBuf>,
}

impl Options {
    fn runs(&self) -> u32 {
        self.runs.unwrap_or(if self.quick { 1 } else { 5 })
    }

    fn seconds(&self) -> u32 {
        self.seconds.unwrap_or(if self.quick { 2 } else { 5 })
    }
}

/// One setup's pods (if it could be made) and its results in one family.
struct Setup {
    kind: Kind,
    /// The Hypha of `--baseline-bin`.
    baseline: bool,
    /// Measured over IPv6 (else IPv4).
    ipv6: bool,
    pods: Option<Pods>,
    error: Option<String>,
    runs: Vec<Run>,
}

#[derive(Serialize)]
struct Run {
    run: u32,
    throughput_gbps: Option<f64>,
    latency: Option<Latency>,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    runs: u32,
    seconds: u32,
    family: Families,
    latency_pin: Pin,
    setups: Vec<SetupReport>,
    /// IPv4 (absent when not measured).
    hypha_vs_bridge: Option<HyphaVsBridge>,
    hypha_vs_bridge6: Option<HyphaVsBridge>,
    /// This build's Hypha against `--baseline-bin`'s, per family.
    hypha_vs_base: Option<HyphaVsBridge>,
    hypha_vs_base6: Option<HyphaVsBridge>,
    targets: Vec<Target>,
    /// `counters.egress.redirected.packets` summed over Hypha's endpoints after the runs.
    hypha_redirected_packets: Option<u64>,
    /// The same of `counters6` (IPv6 only), when IPv6 was measured.
    hypha_redirected_packets6: Option<u64>,
    errors: Vec<String>,
}

#[derive(Serialize)]
pub(super) struct Machine {
    pub(super) kernel: String,
    pub(super) nproc: usize,
    cpu: Option<String>,
    iperf3: Option<String>,
    timestamp_unix: u64,
    pub(super) timestamp_utc: String,
}

#[derive(Serialize)]
struct SetupReport {
    name: &'static str,
    /// 4 or 6.
    family: u8,
    description: &'static str,
    client: Option<String>,
    server: Option<String>,
    error: Option<String>,
    runs: Vec<Run>,
    median: Medians,
    /// Percentages of the veth pair's medians.
    vs_veth: Option<VsVeth>,
}

#[derive(Clone, Copy, Default, Serialize)]
struct Medians {
    throughput_gbps: Option<f64>,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
}

#[derive(Clone, Copy, Serialize)]
struct VsVeth {
    throughput_pct: Option<f64>,
    p50_pct: Option<f64>,
    p99_pct: Option<f64>,
}

#[derive(Serialize)]
struct HyphaVsBridge {
    /// Hypha's throughput / the bridge's.
    throughput_ratio: Option<f64>,
    /// Hypha's p50 / the bridge's (below 1 is better).
    p50_ratio: Option<f64>,
    p99_ratio: Option<f64>,
}

pub fn run(o: &Options) -> Result<()> {
    let root = workspace_root();
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut kinds: Vec<Kind> = Vec::new();
    for k in &o.setups {
        if !kinds.contains(k) {
            kinds.push(*k);
        }
    }
    let machine = machine();
    let td = Teardown::install()?;
    let plan = Plan::new(
        root.join("target/release"),
        out_dir.join("datapath-hypha-agent.log"),
    )?;
    td.make(Undo::Dir(plan.tmp.clone()), || {
        std::fs::create_dir_all(&plan.tmp)
            .with_context(|| format!("creating {}", plan.tmp.display()))
    })?;

    let dual = o.family != Families::V4;
    let mut setups: Vec<Setup> = Vec::new();
    for &kind in &kinds {
        println!("==> setting up {}: {}", kind.name(), kind.describe());
        let made = if dual {
            setups::create_dual(kind, &plan, &td)
        } else {
            setups::create(kind, &plan, &td)
        };
        setups.extend(per_family(kind, false, made, o.family));
    }
    if let Some(bin) = &o.baseline_bin {
        setups.extend(baseline(bin, &plan, &out_dir, &td, o.family)?);
    }

    let (runs, seconds) = (o.runs(), o.seconds());
    println!(
        "==> {runs} rounds of {seconds} s throughput + {seconds} s latency, setups and families taking turns"
    );
    let n = setups.len();
    for round in 0..runs as usize {
        // Rotate who goes first, so no setup always follows the same one.
        for k in 0..n {
            let setup = &mut setups[(round + k) % n];
            let Some(pods) = &setup.pods else { continue };
            let run = measure_once(pods, setup.ipv6, round as u32 + 1, o);
            println!(
                "    round {}/{} {:<11} {}",
                round + 1,
                runs,
                setup.name(),
                describe_run(&run)
            );
            setup.runs.push(run);
        }
    }

    let mut errors: Vec<String> = Vec::new();
    let socket = setups
        .iter()
        .filter(|s| !s.baseline)
        .filter_map(|s| s.pods.as_ref())
        .find_map(|p| p.agent_socket.clone());
    let mut read = |counters: &str| {
        let n = socket
            .as_ref()
            .map(|socket| setups::hypha_redirected_in(&plan.bin, socket, counters));
        match n {
            Some(Ok(n)) => Some(n),
            Some(Err(e)) => {
                errors.push(format!("reading Hypha's {counters}: {e:#}"));
                None
            }
            None => None,
        }
    };
    let redirected = read("counters");
    let redirected6 = if dual { read("counters6") } else { None };

    println!("==> cleaning up");
    if let Err(e) = td.finish() {
        errors.push(format!("{e:#}"));
    }

    let report = report(o, machine, setups, (redirected, redirected6), errors);
    print_table(&report);
    super::write_outputs(
        &out_dir,
        "datapath",
        &report,
        chart(&report),
        &report.errors,
    )
}

/// One [`Setup`] per measured family of what `kind`'s setup made (the same pods).
fn per_family(kind: Kind, baseline: bool, made: Result<Pods>, families: Families) -> Vec<Setup> {
    let (pods, error) = match made {
        Ok(p) => {
            let v6 = p
                .client_ip6
                .zip(p.server_ip6)
                .map(|(c, s)| format!(", IPv6 {c} -> {s}"))
                .unwrap_or_default();
            println!(
                "    client {} ({}) -> server {} ({}){v6}",
                p.client_ip, p.client_ns, p.server_ip, p.server_ns
            );
            (Some(p), None)
        }
        Err(e) => {
            eprintln!("    FAILED: {e:#}");
            (None, Some(format!("{e:#}")))
        }
    };
    families
        .list()
        .iter()
        .map(|&ipv6| Setup {
            kind,
            baseline,
            ipv6,
            pods: pods.clone(),
            error: error.clone(),
            runs: Vec::new(),
        })
        .collect()
}

impl Setup {
    fn name(&self) -> &'static str {
        match (self.baseline, self.kind, self.ipv6) {
            (true, _, false) => "hypha-base",
            (true, _, true) => "hypha-base6",
            (false, Kind::Veth, false) => "veth",
            (false, Kind::Veth, true) => "veth6",
            (false, Kind::Bridge, false) => "bridge",
            (false, Kind::Bridge, true) => "bridge6",
            (false, Kind::Hypha, false) => "hypha",
            (false, Kind::Hypha, true) => "hypha6",
        }
    }

    fn describe(&self) -> &'static str {
        if self.baseline {
            "Hypha as built in --baseline-bin (agent, hypha-cni and the eBPF object they embed)"
        } else {
            self.kind.describe()
        }
    }
}

/// The Hypha setup of the binaries in `bin`, beside this build's: its own names (another
/// `uniq`), directory, subnet and agent log.
fn baseline(
    bin: &std::path::Path,
    plan: &Plan,
    out_dir: &std::path::Path,
    td: &Teardown,
    families: Families,
) -> Result<Vec<Setup>> {
    println!(
        "==> setting up hypha-base: the binaries in {}",
        bin.display()
    );
    let mut base = Plan::in_range(
        bin.to_owned(),
        out_dir.join("datapath-hypha-base-agent.log"),
        242,
        10,
    )?;
    // Pids stay below 2^22: this cannot be another bench's.
    base.uniq = plan.uniq | 1 << 22;
    base.tmp = plan.tmp.join("base");
    td.make(Undo::Dir(base.tmp.clone()), || {
        std::fs::create_dir_all(&base.tmp)
            .with_context(|| format!("creating {}", base.tmp.display()))
    })?;
    let made = if families == Families::V4 {
        setups::create(Kind::Hypha, &base, td)
    } else {
        setups::create_dual(Kind::Hypha, &base, td)
    };
    Ok(per_family(Kind::Hypha, true, made, families))
}

fn measure_once(pods: &Pods, ipv6: bool, run: u32, o: &Options) -> Run {
    let mut errors = Vec::new();
    let seconds = o.seconds();
    let (mut throughput_gbps, mut latency) = (None, None);
    match pods.server(ipv6) {
        Some(server) => {
            throughput_gbps = measure::throughput_to(pods, server, seconds)
                .map(|bps| bps / 1e9)
                .map_err(|e| errors.push(format!("throughput: {e:#}")))
                .ok();
            latency = measure::latency_to(pods, server, 0, seconds, o.latency_pin)
                .map_err(|e| errors.push(format!("latency: {e:#}")))
                .ok();
        }
        None => errors.push("the server pod has no IPv6 address".to_owned()),
    }
    Run {
        run,
        throughput_gbps,
        latency,
        errors,
    }
}

fn describe_run(r: &Run) -> String {
    let mut s = match r.throughput_gbps {
        Some(g) => format!("{g:7.2} Gbit/s"),
        None => "   n/a Gbit/s".to_owned(),
    };
    if let Some(l) = &r.latency {
        s += &format!(
            "   p50 {:6.1} µs  p99 {:6.1} µs  ({} round trips)",
            us(l.p50_ns),
            us(l.p99_ns),
            l.round_trips
        );
    }
    for e in &r.errors {
        s += &format!("\n      FAILED {e}");
    }
    s
}

fn us(ns: u32) -> f64 {
    f64::from(ns) / 1000.0
}

fn report(
    o: &Options,
    machine: Machine,
    setups: Vec<Setup>,
    (redirected, redirected6): (Option<u64>, Option<u64>),
    mut errors: Vec<String>,
) -> Report {
    let medians = |runs: &[Run]| Medians {
        throughput_gbps: median(runs.iter().filter_map(|r| r.throughput_gbps)),
        p50_us: median(
            runs.iter()
                .filter_map(|r| r.latency.as_ref().map(|l| us(l.p50_ns))),
        ),
        p99_us: median(
            runs.iter()
                .filter_map(|r| r.latency.as_ref().map(|l| us(l.p99_ns))),
        ),
    };
    // (kind, baseline, ipv6, medians) of every setup, for the comparisons.
    let table: Vec<(Kind, bool, bool, Medians)> = setups
        .iter()
        .map(|s| (s.kind, s.baseline, s.ipv6, medians(&s.runs)))
        .collect();
    let find = |kind: Kind, ipv6: bool| {
        table
            .iter()
            .find(|t| t.0 == kind && !t.1 && t.2 == ipv6)
            .map(|t| t.3)
    };
    let base = |ipv6: bool| table.iter().find(|t| t.1 && t.2 == ipv6).map(|t| t.3);
    let pct = |a: Option<f64>, b: Option<f64>| Some(100.0 * a? / b.filter(|b| *b > 0.0)?);
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b.filter(|b| *b > 0.0)?);

    let mut reports = Vec::new();
    for s in setups {
        if let Some(e) = &s.error {
            errors.push(format!("{}: {e}", s.name()));
        }
        for r in &s.runs {
            for e in &r.errors {
                errors.push(format!("{} round {}: {e}", s.name(), r.run));
            }
        }
        let median = medians(&s.runs);
        let vs_veth = find(Kind::Veth, s.ipv6).map(|v| VsVeth {
            throughput_pct: pct(median.throughput_gbps, v.throughput_gbps),
            p50_pct: pct(median.p50_us, v.p50_us),
            p99_pct: pct(median.p99_us, v.p99_us),
        });
        reports.push(SetupReport {
            name: s.name(),
            family: if s.ipv6 { 6 } else { 4 },
            description: s.describe(),
            client: s.pods.as_ref().map(|p| {
                let ip = match (s.ipv6, p.client_ip6) {
                    (true, Some(ip6)) => ip6.to_string(),
                    _ => p.client_ip.to_string(),
                };
                format!("{ip} in {}", p.client_ns)
            }),
            server: s.pods.as_ref().map(|p| {
                let ip = p
                    .server(s.ipv6)
                    .map_or_else(|| "none".to_owned(), |ip| ip.to_string());
                format!("{ip} in {}", p.server_ns)
            }),
            error: s.error,
            runs: s.runs,
            median,
            vs_veth,
        });
    }

    let ratios = |h: Option<Medians>, b: Option<Medians>| match (h, b) {
        (Some(h), Some(b)) => Some(HyphaVsBridge {
            throughput_ratio: ratio(h.throughput_gbps, b.throughput_gbps),
            p50_ratio: ratio(h.p50_us, b.p50_us),
            p99_ratio: ratio(h.p99_us, b.p99_us),
        }),
        _ => None,
    };
    let measured = |ipv6: bool| o.family.list().contains(&ipv6);
    let vs = |ipv6: bool, other: Option<Medians>| {
        measured(ipv6)
            .then(|| ratios(find(Kind::Hypha, ipv6), other))
            .flatten()
    };
    let hypha_vs_bridge = vs(false, find(Kind::Bridge, false));
    let hypha_vs_bridge6 = vs(true, find(Kind::Bridge, true));
    let hypha_vs_base = vs(false, base(false));
    let hypha_vs_base6 = vs(true, base(true));
    let mut targets = Vec::new();
    for &ipv6 in o.family.list() {
        let h = find(Kind::Hypha, ipv6).unwrap_or_default();
        let v = find(Kind::Veth, ipv6).unwrap_or_default();
        let b = find(Kind::Bridge, ipv6).unwrap_or_default();
        let family = if ipv6 { "IPv6" } else { "IPv4" };
        let tput_pct = pct(h.throughput_gbps, v.throughput_gbps);
        let p50_pct = pct(h.p50_us, v.p50_us);
        targets.extend([
            Target {
                goal: format!(
                    "{family}: Hypha throughput >= {TARGET_THROUGHPUT_OF_VETH:.0}% of veth"
                ),
                measured: tput_pct.map(|p| format!("{p:.1}%")),
                pass: tput_pct.map(|p| p >= TARGET_THROUGHPUT_OF_VETH),
            },
            Target {
                goal: format!("{family}: Hypha throughput > bridge"),
                measured: h
                    .throughput_gbps
                    .zip(b.throughput_gbps)
                    .map(|(h, b)| format!("{h:.2} vs {b:.2} Gbit/s")),
                pass: h.throughput_gbps.zip(b.throughput_gbps).map(|(h, b)| h > b),
            },
            Target {
                goal: format!("{family}: Hypha p50 <= {TARGET_P50_OF_VETH:.0}% of veth"),
                measured: p50_pct.map(|p| format!("{p:.1}%")),
                pass: p50_pct.map(|p| p <= TARGET_P50_OF_VETH),
            },
        ]);
    }
    if redirected == Some(0) {
        errors.push(
            "Hypha's eBPF datapath redirected no packets: the traffic did not take the eBPF path"
                .to_owned(),
        );
    }
    if redirected6 == Some(0) {
        errors.push(
            "Hypha's eBPF datapath redirected no IPv6 packets: IPv6 did not take the eBPF path"
                .to_owned(),
        );
    }
    Report {
        bench: "datapath",
        machine,
        runs: o.runs(),
        seconds: o.seconds(),
        family: o.family,
        latency_pin: o.latency_pin,
        setups: reports,
        hypha_vs_bridge,
        hypha_vs_bridge6,
        hypha_vs_base,
        hypha_vs_base6,
        targets,
        hypha_redirected_packets: redirected,
        hypha_redirected_packets6: redirected6,
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
        "Datapath bench: median of {} rounds, {} s each; {}; kernel {}, {} CPUs; latency threads: {}",
        r.runs,
        r.seconds,
        r.family.describe(),
        r.machine.kernel,
        r.machine.nproc,
        r.latency_pin.describe()
    );
    println!(
        "{:<11} {:>14} {:>9} {:>9} {:>15} {:>12} {:>12}",
        "setup", "Gbit/s", "p50 µs", "p99 µs", "tput % veth", "p50 % veth", "p99 % veth"
    );
    for s in &r.setups {
        let m = &s.median;
        let v = s.vs_veth;
        println!(
            "{:<11} {:>14} {:>9} {:>9} {:>15} {:>12} {:>12}",
            s.name,
            opt(m.throughput_gbps, 2),
            opt(m.p50_us, 1),
            opt(m.p99_us, 1),
            pct(v.and_then(|v| v.throughput_pct)),
            pct(v.and_then(|v| v.p50_pct)),
            pct(v.and_then(|v| v.p99_pct)),
        );
    }
    let ratios = [
        ("IPv4 Hypha vs bridge", &r.hypha_vs_bridge),
        ("IPv6 Hypha vs bridge", &r.hypha_vs_bridge6),
        ("IPv4 Hypha vs hypha-base", &r.hypha_vs_base),
        ("IPv6 Hypha vs hypha-base", &r.hypha_vs_base6),
    ];
    for (what, hb) in ratios {
        if let Some(hb) = hb {
            println!(
                "{what}: throughput x{}, p50 x{}, p99 x{}",
                opt(hb.throughput_ratio, 3),
                opt(hb.p50_ratio, 3),
                opt(hb.p99_ratio, 3)
            );
        }
    }
    if let Some(n) = r.hypha_redirected_packets {
        println!("Hypha's eBPF datapath redirected {n} packets (pod egress, all endpoints)");
    }
    if let Some(n) = r.hypha_redirected_packets6 {
        println!("  of them IPv6: {n}");
    }
    super::print_targets("Targets:", &r.targets);
}

fn chart(r: &Report) -> String {
    let categories: Vec<String> = r.setups.iter().map(|s| s.name.to_owned()).collect();
    let throughput = BarChart {
        title: "TCP throughput (iperf3, 1 stream)".to_owned(),
        unit: "Gbit/s (median)".to_owned(),
        categories: categories.clone(),
        series: vec![Series::new("throughput", "#2a9d8f")],
        values: r
            .setups
            .iter()
            .map(|s| vec![s.median.throughput_gbps])
            .collect(),
        decimals: 2,
    };
    let latency = BarChart {
        title: "1-byte TCP request/response latency".to_owned(),
        unit: "µs (median of per-round values)".to_owned(),
        categories,
        series: vec![Series::new("p50", "#457b9d"), Series::new("p99", "#e76f51")],
        values: r
            .setups
            .iter()
            .map(|s| vec![s.median.p50_us, s.median.p99_us])
            .collect(),
        decimals: 1,
    };
    let (w, h) = (1000.0, 440.0);
    svg::document(
        w,
        h,
        "Hypha datapath bench: pod to pod",
        &format!(
            "{} rounds x {} s, setups interleaved; latency threads: {}; kernel {}, {} CPUs; {}",
            r.runs,
            r.seconds,
            r.latency_pin.describe(),
            r.machine.kernel,
            r.machine.nproc,
            r.machine.timestamp_utc
        ),
        &[
            svg::bars(&throughput, 10.0, 60.0, w / 2.0 - 20.0, h - 70.0),
            svg::bars(&latency, w / 2.0 + 10.0, 60.0, w / 2.0 - 20.0, h - 70.0),
        ],
    )
}

pub(super) fn machine() -> Machine {
    let first_line = |cmd: &mut Command| {
        crate::util::output(cmd)
            .ok()
            .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Machine {
        kernel: first_line(Command::new("uname").arg("-r")).unwrap_or_else(|| "unknown".to_owned()),
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        iperf3: first_line(Command::new("iperf3").arg("--version")),
        timestamp_unix: now,
        timestamp_utc: utc(now),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch (Howard Hinnant's civil_from_days).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_timestamps() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
