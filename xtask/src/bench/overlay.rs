//! `cargo xtask bench cluster`: issue 13's benchmark, cross-node pod traffic, driven by
//! the `overlay-bench` binary of hypha-tests (its setup (c) is the cluster harness, which
//! speaks to etcd through hypha-cluster; xtask must not depend on it). This side runs the
//! driver, reads its JSON report, computes medians, ratios and targets, prints them and
//! draws the chart.
//!
//! Between two simulated nodes (network namespaces joined by an underlay bridge), in one
//! run with the setups taking turns round by round:
//!
//! - (a) `underlay`: the two node namespaces directly over the underlay, the limit;
//! - (b) `kernel-vxlan`: pods behind a Flannel-style kernel overlay (a Linux VXLAN device
//!   per node, `id 1 dstport 8472 nolearning`, MTU underlay − 50; static FDB, neighbour
//!   and route entries; Flannel's `--ip-masq` masquerade rule, so conntrack runs in the
//!   nodes as on Flannel's and Hypha's; no eBPF);
//! - (c) `hypha`: pods on two Hypha nodes in cluster mode (VXLAN tunnel), made through
//!   `hypha-cni`;
//! - (b') `kernel-vxlan-bare`, only when asked for (`--setups`): (b) without any nftables
//!   rule, so without conntrack (what (a) runs with too).
//!
//! Each round: iperf3 with one stream and with `--streams` (each `--seconds`), the
//! machine's busy CPU over each run from `/proc/stat` less the background just before it,
//! and the iperf3 processes' own CPU; then 1-byte TCP request/response latency.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::Value;

use super::svg::{self, BarChart, Series};
use super::{Target, median, print_targets};
use crate::util::{run, workspace_root};

/// Issue 13's targets, Hypha (c) against the kernel overlay (b).
const TARGET_THROUGHPUT_OF_KERNEL: f64 = 1.0;
const TARGET_P50_OF_KERNEL: f64 = 1.05;

/// The setups in the driver's names, with the label the table and chart use.
const SETUPS: [(&str, &str); 4] = [
    ("underlay", "(a) underlay"),
    ("kernel-vxlan", "(b) kernel VXLAN"),
    ("hypha", "(c) Hypha"),
    ("kernel-vxlan-bare", "(b') no conntrack"),
];

#[derive(clap::Args)]
pub struct Options {
    /// Rounds; the setups take turns round by round [default: 5, 1 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: Option<u32>,
    /// Seconds of each throughput run and of each latency run [default: 5, 2 with
    /// --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=300))]
    seconds: Option<u32>,
    /// Parallel streams of the second throughput run (iperf3 -P).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    streams: u32,
    /// Setups, comma-separated: underlay, kernel-vxlan, hypha, kernel-vxlan-bare
    /// [default: underlay,kernel-vxlan,hypha].
    #[arg(long)]
    setups: Option<String>,
    /// CPUs of the latency client and server threads: same (both on the last CPU),
    /// split, none.
    #[arg(long, default_value = "same")]
    latency_pin: String,
    /// A short run (for CI): one round of 2 s each, unless --rounds or --seconds say
    /// otherwise.
    #[arg(long)]
    quick: bool,
}

/// One setup's medians over its rounds.
#[derive(Clone, Copy, Default, Serialize)]
struct Medians {
    single_gbps: Option<f64>,
    multi_gbps: Option<f64>,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    /// The machine's busy CPU (less the background) per Gbit/s, percent of one CPU.
    single_cpu_pct_per_gbps: Option<f64>,
    multi_cpu_pct_per_gbps: Option<f64>,
    /// The iperf3 processes' CPU per Gbit/s, percent of one CPU.
    single_processes_pct_per_gbps: Option<f64>,
    multi_processes_pct_per_gbps: Option<f64>,
}

/// `a / b` of each figure.
#[derive(Serialize)]
struct Ratios {
    single_gbps: Option<f64>,
    multi_gbps: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    machine: super::datapath::Machine,
    /// Per setup (driver name) its medians.
    medians: Vec<(String, Medians)>,
    /// (c) / (b), (b) / (a), (c) / (a).
    hypha_vs_kernel: Ratios,
    kernel_vs_underlay: Ratios,
    hypha_vs_underlay: Ratios,
    targets: Vec<Target>,
    /// What overlay-bench wrote, as it wrote it (every round).
    raw: Value,
}

pub fn run_bench(o: &Options) -> Result<()> {
    let root = workspace_root();
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let raw_path = out_dir.join("cluster-raw.json");
    // A report of an earlier run must not pass for this one's.
    let _ = std::fs::remove_file(&raw_path);
    let machine = super::datapath::machine();
    let mut cmd = Command::new(root.join("target/release/overlay-bench"));
    cmd.arg("--out").arg(&raw_path);
    if o.quick {
        cmd.arg("--quick");
    }
    for (flag, value) in [("--rounds", o.rounds), ("--seconds", o.seconds)] {
        if let Some(v) = value {
            cmd.arg(flag).arg(v.to_string());
        }
    }
    cmd.args(["--streams", &o.streams.to_string()]);
    cmd.args(["--latency-pin", &o.latency_pin]);
    if let Some(setups) = &o.setups {
        cmd.args(["--setups", setups]);
    }
    // The driver writes its report also when a setup failed; read it either way.
    let ran = run(&mut cmd);
    let raw = match read_json(&raw_path) {
        Ok(raw) => raw,
        Err(e) => {
            ran?;
            return Err(e);
        }
    };
    let mut errors: Vec<String> = raw["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_owned))
        .collect();
    if let Err(e) = ran
        && errors.is_empty()
    {
        errors.push(format!("{e:#}"));
    }
    let report = report(machine, raw);
    print_table(&report);
    print_targets(
        "Issue 13 targets (Hypha against the kernel overlay):",
        &report.targets,
    );
    let chart = chart(&report);
    super::write_outputs(&out_dir, "cluster", &report, chart, &errors)
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The medians of one setup of the driver's report.
fn medians(setup: &Value) -> Medians {
    let rounds: Vec<&Value> = setup["rounds"].as_array().into_iter().flatten().collect();
    let of = |path: &[&str]| {
        median(
            rounds
                .iter()
                .filter_map(|r| path.iter().fold(*r, |v, key| &v[*key]).as_f64()),
        )
    };
    Medians {
        single_gbps: of(&["single", "gbps"]),
        multi_gbps: of(&["multi", "gbps"]),
        p50_us: of(&["latency", "p50_us"]),
        p99_us: of(&["latency", "p99_us"]),
        single_cpu_pct_per_gbps: of(&["single", "cpu_pct_per_gbps"]),
        multi_cpu_pct_per_gbps: of(&["multi", "cpu_pct_per_gbps"]),
        single_processes_pct_per_gbps: of(&["single", "cpu_processes_pct_per_gbps"]),
        multi_processes_pct_per_gbps: of(&["multi", "cpu_processes_pct_per_gbps"]),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b.filter(|b| *b > 0.0)?)
}

fn ratios(a: &Medians, b: &Medians) -> Ratios {
    Ratios {
        single_gbps: ratio(a.single_gbps, b.single_gbps),
        multi_gbps: ratio(a.multi_gbps, b.multi_gbps),
        p50: ratio(a.p50_us, b.p50_us),
        p99: ratio(a.p99_us, b.p99_us),
    }
}

fn report(machine: super::datapath::Machine, raw: Value) -> Report {
    let medians: Vec<(String, Medians)> = raw["setups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["name"].as_str()?.to_owned(), medians(s))))
        .collect();
    let find = |name: &str| {
        medians
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| *m)
            .unwrap_or_default()
    };
    let (a, b, c) = (find("underlay"), find("kernel-vxlan"), find("hypha"));
    let streams = raw["settings"]["streams"].as_u64().unwrap_or(0);
    let throughput = |what: &str, h: Option<f64>, k: Option<f64>| {
        let r = ratio(h, k);
        Target {
            goal: format!("Hypha throughput, {what}, >= the kernel overlay's"),
            measured: h
                .zip(k)
                .map(|(h, k)| format!("{h:.2} vs {k:.2} Gbit/s (x{:.3})", r.unwrap_or(f64::NAN))),
            pass: r.map(|r| r >= TARGET_THROUGHPUT_OF_KERNEL),
        }
    };
    let p50 = ratio(c.p50_us, b.p50_us);
    let targets = vec![
        throughput("1 stream", c.single_gbps, b.single_gbps),
        throughput(&format!("{streams} streams"), c.multi_gbps, b.multi_gbps),
        Target {
            goal: format!(
                "Hypha p50 <= {:.0}% of the kernel overlay's",
                TARGET_P50_OF_KERNEL * 100.0
            ),
            measured: c.p50_us.zip(b.p50_us).map(|(h, k)| {
                format!(
                    "{h:.1} vs {k:.1} µs ({:.1}%)",
                    100.0 * p50.unwrap_or(f64::NAN)
                )
            }),
            pass: p50.map(|r| r <= TARGET_P50_OF_KERNEL),
        },
    ];
    Report {
        machine,
        hypha_vs_kernel: ratios(&c, &b),
        kernel_vs_underlay: ratios(&b, &a),
        hypha_vs_underlay: ratios(&c, &a),
        medians,
        targets,
        raw,
    }
}

fn label(name: &str) -> String {
    SETUPS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or_else(|| name.to_owned(), |(_, l)| (*l).to_owned())
}

fn print_table(r: &Report) {
    let opt = |v: Option<f64>, d: usize| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.d$}"));
    let settings = &r.raw["settings"];
    let streams = settings["streams"].as_u64().unwrap_or(0);
    println!();
    println!(
        "Cluster bench (cross-node pod traffic): median of {} rounds, {} s each; kernel {}, {} CPUs; load before {}, after {}",
        settings["rounds"],
        settings["seconds"],
        r.machine.kernel,
        r.machine.nproc,
        r.raw["machine"]["loadavg_before"].as_str().unwrap_or("?"),
        r.raw["machine"]["loadavg_after"].as_str().unwrap_or("?"),
    );
    println!(
        "{:<17} {:>5} {:>9} {:>9} {:>8} {:>8} {:>18} {:>18}",
        "setup",
        "MTU",
        "1 Gbit/s",
        format!("{streams} Gbit/s"),
        "p50 µs",
        "p99 µs",
        "%CPU/Gbit/s sys",
        "%CPU/Gbit/s iperf3"
    );
    let setups = r.raw["setups"].as_array().cloned().unwrap_or_default();
    for (name, m) in &r.medians {
        let mtu = setups
            .iter()
            .find(|s| s["name"] == name.as_str())
            .and_then(|s| s["mtu"].as_u64())
            .map_or_else(|| "?".to_owned(), |m| m.to_string());
        println!(
            "{:<17} {:>5} {:>9} {:>9} {:>8} {:>8} {:>18} {:>18}",
            label(name),
            mtu,
            opt(m.single_gbps, 2),
            opt(m.multi_gbps, 2),
            opt(m.p50_us, 1),
            opt(m.p99_us, 1),
            format!(
                "{} / {}",
                opt(m.single_cpu_pct_per_gbps, 1),
                opt(m.multi_cpu_pct_per_gbps, 1)
            ),
            format!(
                "{} / {}",
                opt(m.single_processes_pct_per_gbps, 1),
                opt(m.multi_processes_pct_per_gbps, 1)
            ),
        );
    }
    for (what, x) in [
        ("(c) Hypha / (b) kernel VXLAN", &r.hypha_vs_kernel),
        ("(b) kernel VXLAN / (a) underlay", &r.kernel_vs_underlay),
        ("(c) Hypha / (a) underlay", &r.hypha_vs_underlay),
    ] {
        let times = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("x{v:.3}"));
        println!(
            "{what}: throughput 1 stream {}, {streams} streams {}; p50 {}, p99 {}",
            times(x.single_gbps),
            times(x.multi_gbps),
            times(x.p50),
            times(x.p99)
        );
    }
    if let Some(bg) = saturation(&r.raw, r.machine.nproc) {
        println!(
            "NOTE: the machine was saturated before the runs (median background {bg:.0}% of {} CPUs): /proc/stat cannot tell the runs' CPU from the rest; the iperf3 column still can",
            r.machine.nproc
        );
    }
    println!(
        "(%CPU/Gbit/s: 1 stream / {streams} streams; sys: the machine's busy CPU from /proc/stat less the second before; iperf3: its client's and server's own CPU)"
    );
}

/// The median background CPU (percent of one CPU) over every throughput run, when it
/// was at least 90% of the machine's.
fn saturation(raw: &Value, nproc: usize) -> Option<f64> {
    let background = median(
        raw["setups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["rounds"].as_array().into_iter().flatten())
            .flat_map(|r| [&r["single"], &r["multi"]])
            .filter_map(|t| t["cpu_background_pct"].as_f64()),
    )?;
    (background >= 0.9 * 100.0 * nproc as f64).then_some(background)
}

fn chart(r: &Report) -> String {
    let categories: Vec<String> = r.medians.iter().map(|(n, _)| label(n)).collect();
    let streams = r.raw["settings"]["streams"].as_u64().unwrap_or(0);
    let column = |f: &dyn Fn(&Medians) -> Vec<Option<f64>>| -> Vec<Vec<Option<f64>>> {
        r.medians.iter().map(|(_, m)| f(m)).collect()
    };
    let throughput = BarChart {
        title: "Pod-to-pod TCP throughput across nodes (iperf3)".into(),
        unit: "Gbit/s (median)".into(),
        categories: categories.clone(),
        series: vec![
            Series::new("1 stream", "#2a9d8f"),
            Series::new(&format!("{streams} streams"), "#264653"),
        ],
        values: column(&|m| vec![m.single_gbps, m.multi_gbps]),
        decimals: 2,
    };
    let latency = BarChart {
        title: "1-byte TCP request/response".into(),
        unit: "µs (median of per-round values)".into(),
        categories: categories.clone(),
        series: vec![Series::new("p50", "#457b9d"), Series::new("p99", "#e76f51")],
        values: column(&|m| vec![m.p50_us, m.p99_us]),
        decimals: 1,
    };
    let cpu = BarChart {
        title: "CPU per Gbit/s, 1 stream".into(),
        unit: "% of one CPU per Gbit/s".into(),
        categories,
        series: vec![
            Series::new("machine (/proc/stat)", "#8d99ae"),
            Series::new("iperf3 processes", "#f4a261"),
        ],
        values: column(&|m| vec![m.single_cpu_pct_per_gbps, m.single_processes_pct_per_gbps]),
        decimals: 1,
    };
    let settings = &r.raw["settings"];
    let subtitle = format!(
        "{} rounds x {} s, setups interleaved; load {} → {}; kernel {}, {} CPUs; {}",
        settings["rounds"],
        settings["seconds"],
        r.raw["machine"]["loadavg_before"].as_str().unwrap_or("?"),
        r.raw["machine"]["loadavg_after"].as_str().unwrap_or("?"),
        r.machine.kernel,
        r.machine.nproc,
        r.machine.timestamp_utc
    );
    svg::document(
        1400.0,
        440.0,
        "cargo xtask bench cluster: pod to pod across two nodes",
        &subtitle,
        &[
            svg::bars(&throughput, 10.0, 60.0, 480.0, 370.0),
            svg::bars(&latency, 500.0, 60.0, 440.0, 370.0),
            svg::bars(&cpu, 950.0, 60.0, 440.0, 370.0),
        ],
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{chart, report};

    fn round(single: f64, multi: f64, p50: f64, cpu: f64) -> Value {
        json!({
            "single": {"gbps": single, "cpu_pct_per_gbps": cpu, "cpu_processes_pct_per_gbps": cpu / 2.0},
            "multi": {"gbps": multi, "cpu_pct_per_gbps": cpu},
            "latency": {"p50_us": p50, "p99_us": p50 * 3.0},
            "errors": [],
        })
    }

    fn raw(hypha_rounds: Vec<Value>) -> Value {
        json!({
            "settings": {"rounds": 3, "seconds": 2, "streams": 4},
            "machine": {"loadavg_before": "1.0 1.0 1.0", "loadavg_after": "1.2 1.0 1.0"},
            "setups": [
                {"name": "underlay", "mtu": 1500, "rounds": [round(10.0, 12.0, 20.0, 10.0)]},
                {"name": "kernel-vxlan", "mtu": 1450, "rounds": [
                    round(5.0, 6.0, 30.0, 20.0), round(4.0, 6.0, 32.0, 22.0), round(6.0, 6.0, 31.0, 24.0),
                ]},
                {"name": "hypha", "mtu": 1450, "rounds": hypha_rounds, "error": null},
            ],
            "errors": [],
        })
    }

    #[test]
    fn medians_ratios_and_targets() {
        let r = report(
            super::super::datapath::machine(),
            raw(vec![
                round(6.0, 5.0, 32.0, 18.0),
                round(5.5, 5.9, 33.0, 18.0),
                round(7.0, 7.0, 40.0, 18.0),
            ]),
        );
        let hypha = r.medians[2].1;
        assert_eq!(hypha.single_gbps, Some(6.0));
        assert_eq!(hypha.p50_us, Some(33.0));
        assert_eq!(hypha.single_processes_pct_per_gbps, Some(9.0));
        assert_eq!(r.hypha_vs_kernel.single_gbps, Some(6.0 / 5.0));
        assert_eq!(r.kernel_vs_underlay.single_gbps, Some(0.5));
        assert_eq!(r.hypha_vs_underlay.p50, Some(33.0 / 20.0));
        assert_eq!(r.targets[0].pass, Some(true), "6.0 >= 5.0 Gbit/s");
        assert_eq!(r.targets[1].pass, Some(false), "5.9 < 6.0 Gbit/s");
        assert_eq!(r.targets[2].pass, Some(false), "33 µs is 106.5% of 31");
        let svg = chart(&r);
        assert!(svg.contains("(c) Hypha") && svg.contains("6.00"), "{svg}");
        assert_eq!(super::saturation(&r.raw, 2), None, "no background figures");
        let busy = json!({"setups": [{"rounds": [
            {"single": {"cpu_background_pct": 195.0}, "multi": {"cpu_background_pct": 199.0}},
        ]}]});
        assert_eq!(super::saturation(&busy, 2), Some(197.0));
        assert_eq!(super::saturation(&busy, 4), None);
    }

    #[test]
    fn a_failed_setup_is_not_measured() {
        let r = report(super::super::datapath::machine(), raw(vec![]));
        assert!(
            r.targets
                .iter()
                .all(|t| t.pass.is_none() && t.measured.is_none())
        );
        assert!(chart(&r).contains("n/a"));
    }
}
