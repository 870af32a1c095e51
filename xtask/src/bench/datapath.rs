//! `cargo xtask bench datapath`: pod-to-pod TCP throughput and 1-byte request/response
//! latency over a bare veth pair (the physical limit), the reference bridge plugin, and
//! Hypha, measured in one run with the setups taking turns (this machine is small and
//! shared: noise hits all three alike), reported as medians and ratios.

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

#[derive(clap::Args)]
pub struct Options {
    /// Rounds of throughput + latency per setup; the setups take turns round by round.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Seconds of each throughput run and of each latency run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=300))]
    seconds: u32,
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

/// One setup's pods (if it could be made) and its results.
struct Setup {
    kind: Kind,
    /// The Hypha of `--baseline-bin`.
    baseline: bool,
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
    latency_pin: Pin,
    setups: Vec<SetupReport>,
    hypha_vs_bridge: Option<HyphaVsBridge>,
    /// This build's Hypha against `--baseline-bin`'s.
    hypha_vs_base: Option<HyphaVsBridge>,
    targets: Vec<Target>,
    /// `counters.egress.redirected.packets` summed over Hypha's endpoints after the runs.
    hypha_redirected_packets: Option<u64>,
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

    let mut setups: Vec<Setup> = kinds
        .iter()
        .map(|&kind| {
            println!("==> setting up {}: {}", kind.name(), kind.describe());
            let (pods, error) = match setups::create(kind, &plan, &td) {
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
            Setup {
                kind,
                baseline: false,
                pods,
                error,
                runs: Vec::new(),
            }
        })
        .collect();
    if let Some(bin) = &o.baseline_bin {
        setups.push(baseline(bin, &plan, &out_dir, &td)?);
    }

    println!(
        "==> {} rounds of {} s throughput + {} s latency, setups taking turns",
        o.runs, o.seconds, o.seconds
    );
    let n = setups.len();
    for round in 0..o.runs as usize {
        // Rotate who goes first, so no setup always follows the same one.
        for k in 0..n {
            let setup = &mut setups[(round + k) % n];
            let Some(pods) = &setup.pods else { continue };
            let run = measure_once(pods, round as u32 + 1, o);
            println!(
                "    round {}/{} {:<10} {}",
                round + 1,
                o.runs,
                setup.name(),
                describe_run(&run)
            );
            setup.runs.push(run);
        }
    }

    let mut errors: Vec<String> = Vec::new();
    let redirected = setups
        .iter()
        .filter_map(|s| s.pods.as_ref())
        .find_map(|p| p.agent_socket.as_ref())
        .map(|socket| setups::hypha_redirected(&plan.bin, socket));
    let redirected = match redirected {
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => {
            errors.push(format!("reading Hypha's counters: {e:#}"));
            None
        }
        None => None,
    };

    println!("==> cleaning up");
    if let Err(e) = td.finish() {
        errors.push(format!("{e:#}"));
    }

    let report = report(o, machine, setups, redirected, errors);
    print_table(&report);
    super::write_outputs(
        &out_dir,
        "datapath",
        &report,
        chart(&report),
        &report.errors,
    )
}

impl Setup {
    fn name(&self) -> &'static str {
        if self.baseline {
            "hypha-base"
        } else {
            self.kind.name()
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
) -> Result<Setup> {
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
    let (pods, error) = match setups::create(Kind::Hypha, &base, td) {
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
    Ok(Setup {
        kind: Kind::Hypha,
        baseline: true,
        pods,
        error,
        runs: Vec::new(),
    })
}

fn measure_once(pods: &Pods, run: u32, o: &Options) -> Run {
    let mut errors = Vec::new();
    let throughput_gbps = measure::throughput(pods, o.seconds)
        .map(|bps| bps / 1e9)
        .map_err(|e| errors.push(format!("throughput: {e:#}")))
        .ok();
    let latency = measure::latency(pods, o.seconds, o.latency_pin)
        .map_err(|e| errors.push(format!("latency: {e:#}")))
        .ok();
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
    redirected: Option<u64>,
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
    let find = |kind: Kind| {
        setups
            .iter()
            .find(|s| s.kind == kind && !s.baseline)
            .map(|s| medians(&s.runs))
    };
    let base = setups.iter().find(|s| s.baseline).map(|s| medians(&s.runs));
    let veth = find(Kind::Veth);
    let bridge = find(Kind::Bridge);
    let hypha = find(Kind::Hypha);
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
        let vs_veth = veth.map(|v| VsVeth {
            throughput_pct: pct(median.throughput_gbps, v.throughput_gbps),
            p50_pct: pct(median.p50_us, v.p50_us),
            p99_pct: pct(median.p99_us, v.p99_us),
        });
        reports.push(SetupReport {
            name: s.name(),
            description: s.describe(),
            client: s
                .pods
                .as_ref()
                .map(|p| format!("{} in {}", p.client_ip, p.client_ns)),
            server: s
                .pods
                .as_ref()
                .map(|p| format!("{} in {}", p.server_ip, p.server_ns)),
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
    let hypha_vs_bridge = ratios(hypha, bridge);
    let hypha_vs_base = ratios(hypha, base);
    let h = hypha.unwrap_or_default();
    let v = veth.unwrap_or_default();
    let b = bridge.unwrap_or_default();
    let tput_pct = pct(h.throughput_gbps, v.throughput_gbps);
    let p50_pct = pct(h.p50_us, v.p50_us);
    let targets = vec![
        Target {
            goal: format!("Hypha throughput >= {TARGET_THROUGHPUT_OF_VETH:.0}% of veth"),
            measured: tput_pct.map(|p| format!("{p:.1}%")),
            pass: tput_pct.map(|p| p >= TARGET_THROUGHPUT_OF_VETH),
        },
        Target {
            goal: "Hypha throughput > bridge".to_owned(),
            measured: h
                .throughput_gbps
                .zip(b.throughput_gbps)
                .map(|(h, b)| format!("{h:.2} vs {b:.2} Gbit/s")),
            pass: h.throughput_gbps.zip(b.throughput_gbps).map(|(h, b)| h > b),
        },
        Target {
            goal: format!("Hypha p50 <= {TARGET_P50_OF_VETH:.0}% of veth"),
            measured: p50_pct.map(|p| format!("{p:.1}%")),
            pass: p50_pct.map(|p| p <= TARGET_P50_OF_VETH),
        },
    ];
    if redirected == Some(0) {
        errors.push(
            "Hypha's eBPF datapath redirected no packets: the traffic did not take the eBPF path"
                .to_owned(),
        );
    }
    Report {
        bench: "datapath",
        machine,
        runs: o.runs,
        seconds: o.seconds,
        latency_pin: o.latency_pin,
        setups: reports,
        hypha_vs_bridge,
        hypha_vs_base,
        targets,
        hypha_redirected_packets: redirected,
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
        "Datapath bench: median of {} rounds, {} s each; kernel {}, {} CPUs; latency threads: {}",
        r.runs,
        r.seconds,
        r.machine.kernel,
        r.machine.nproc,
        r.latency_pin.describe()
    );
    println!(
        "{:<10} {:>14} {:>9} {:>9} {:>15} {:>12} {:>12}",
        "setup", "Gbit/s", "p50 µs", "p99 µs", "tput % veth", "p50 % veth", "p99 % veth"
    );
    for s in &r.setups {
        let m = &s.median;
        let v = s.vs_veth;
        println!(
            "{:<10} {:>14} {:>9} {:>9} {:>15} {:>12} {:>12}",
            s.name,
            opt(m.throughput_gbps, 2),
            opt(m.p50_us, 1),
            opt(m.p99_us, 1),
            pct(v.and_then(|v| v.throughput_pct)),
            pct(v.and_then(|v| v.p50_pct)),
            pct(v.and_then(|v| v.p99_pct)),
        );
    }
    if let Some(hb) = &r.hypha_vs_bridge {
        println!(
            "Hypha vs bridge: throughput x{}, p50 x{}, p99 x{}",
            opt(hb.throughput_ratio, 3),
            opt(hb.p50_ratio, 3),
            opt(hb.p99_ratio, 3)
        );
    }
    if let Some(hb) = &r.hypha_vs_base {
        println!(
            "Hypha vs hypha-base: throughput x{}, p50 x{}, p99 x{}",
            opt(hb.throughput_ratio, 3),
            opt(hb.p50_ratio, 3),
            opt(hb.p99_ratio, 3)
        );
    }
    if let Some(n) = r.hypha_redirected_packets {
        println!("Hypha's eBPF datapath redirected {n} packets (pod egress, all endpoints)");
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
