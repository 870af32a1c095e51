//! `cargo xtask bench bandwidth`: per-pod rate limits, Hypha against the reference
//! `bandwidth` CNI plugin chained after the reference `bridge` + `host-local` plugins, in
//! one run with the two taking turns.
//!
//! Both limit the *egress* of the client pod, the one that sends, with the same rate and
//! the same burst (`rate × --burst-ms`, 10 ms by default; the reference plugin needs a
//! burst with every rate):
//!
//! - reference: `bandwidth` after `bridge`, `runtimeConfig.bandwidth.{egressRate,
//!   egressBurst}`, as a runtime passes the capability. Its egress limit is an `ingress`
//!   qdisc on the host veth redirecting to an `ifb` device with a `tbf` on it. One client
//!   pod per rate (the plugin sets a rate at ADD only), one server pod, on one bridge.
//! - hypha: an agent in a node namespace of its own and `hypha-cni` pods; the rate set on
//!   the client endpoint with `hypha endpoint config ID egress-rate=R egress-burst=B`
//!   before each measurement (a `tbf` on the pod's `eth0`).
//!
//! For each rate, setup and round: a TCP transfer of `--seconds` measured as the receiver
//! counts it (iperf3 `--get-server-output`, the server's per-interval bytes): the rate
//! over the whole transfer and in its first second, each against the configured rate,
//! and the sender's retransmissions; then the 1-byte request/response latency (the
//! client of [`measure::latency_on`]) from the same limited pod to the same server pod
//! while a second iperf3 flow saturates the limit; then Jain's fairness index of 2 and of
//! 8 parallel bulk flows (`iperf3 -P`, each stream's received rate) sharing the limit.

use super::Target;
use std::io::Read as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Serialize;

use super::datapath::{Machine, machine};
use super::measure::{self, Latency, Pin};
use super::median;
use super::setups::{self, CniCall, HyphaOptions, Kind, Plan, Pods};
use super::svg::{self, BarChart, Series};
use super::teardown::{Teardown, Undo};
use crate::util::{output, workspace_root};

const CNI_PATH: &str = "/usr/lib/cni";
/// iperf3's port in the server pods (each pod has a namespace of its own).
const IPERF_PORT: u16 = 5301;
/// Before timing round trips, the bulk flow gets this long to fill the limit.
const LOAD_LEAD: Duration = Duration::from_millis(1500);
/// Parallel bulk flows whose share of the limit is measured, and for how long.
const FAIRNESS_FLOWS: [u32; 2] = [2, 8];
const FAIRNESS_SECONDS: u32 = 5;

/// Hypha's targets: the rate over the transfer within ±5% of the configured rate; the
/// first second under 110% of it; p99 latency under load at most a fifth of the
/// reference plugin's.
const TARGET_RATE_TOLERANCE_PCT: f64 = 5.0;
const TARGET_FIRST_SECOND_PCT: f64 = 110.0;
const TARGET_P99_OF_REFERENCE: f64 = 0.2;

#[derive(clap::Args)]
pub struct Options {
    /// Rounds per rate and setup; the setups take turns.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    runs: u32,
    /// Seconds of each TCP transfer (the rate and the first second are read from it).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..=120))]
    seconds: u32,
    /// Seconds of round trips timed under load, after the bulk flow had 1.5 s to start.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=60))]
    latency_seconds: u32,
    /// Configured egress rates of the client pod, Mbit/s, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [10u64, 100, 1000],
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    rates: Vec<u64>,
    /// Configured burst of both setups, as milliseconds at the rate.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    burst_ms: u64,
    /// CPUs of the latency client and server threads (the bulk flow's iperf3 runs
    /// wherever the scheduler puts it).
    #[arg(long, value_enum, default_value_t = Pin::None)]
    latency_pin: Pin,
    /// Directory of the `hypha` and `hypha-cni` binaries (default `target/release`). The
    /// shaping is the kernel's; a debug build only configures it more slowly.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The Hypha agent's per-flow queues per limiter (`--fq-queues`; the agent's default
    /// when unset), to compare counts.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    fq_queues: Option<u16>,
    /// An experiment: after each limit change, set the Hypha client pod's `eth0`
    /// `gso_max_size` to this many bytes instead of the agent's choice.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1514..=65_536))]
    gso_max_size: Option<u32>,
}

impl Options {
    /// Whether `--bin-dir` was given.
    pub fn has_bin_dir(&self) -> bool {
        self.bin_dir.is_some()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Shaper {
    Reference,
    Hypha,
}

impl Shaper {
    fn name(self) -> &'static str {
        match self {
            Shaper::Reference => "reference",
            Shaper::Hypha => "hypha",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Shaper::Reference => {
                "reference CNI plugins: bridge + host-local, then bandwidth (egress: ifb + tbf)"
            }
            Shaper::Hypha => {
                "Hypha agent + hypha-cni, limit by `hypha endpoint config` (egress: htb with per-flow leaves, classified by hypha_flow_class, on the pod's eth0)"
            }
        }
    }
}

/// One setup's pods, or why it could not be made.
struct Setup {
    shaper: Shaper,
    /// Reference: one client pod per rate (in `o.rates` order); hypha: one, re-limited
    /// before each measurement.
    pods: Vec<Pods>,
    /// Hypha's agent socket and the client's endpoint id.
    hypha: Option<(PathBuf, String)>,
    /// The reference plugin's ifb devices (host namespace), per rate.
    ifbs: Vec<Option<String>>,
    error: Option<String>,
}

impl Setup {
    fn pods_for(&self, rate_index: usize) -> Option<&Pods> {
        match self.shaper {
            Shaper::Reference => self.pods.get(rate_index),
            Shaper::Hypha => self.pods.first(),
        }
    }
}

#[derive(Serialize)]
struct Run {
    round: u32,
    /// What the server received over the transfer (its intervals' bytes / their seconds).
    received_bps: Option<f64>,
    received_pct: Option<f64>,
    first_second_bps: Option<f64>,
    first_second_pct: Option<f64>,
    /// The server's per-interval rates (1 s each but maybe the last).
    server_intervals_bps: Vec<f64>,
    /// iperf3's client-side `end.sum_received.bits_per_second`, for comparison.
    client_sum_received_bps: Option<f64>,
    /// iperf3's client-side `end.sum_sent.bits_per_second` (bytes handed to the socket).
    sent_bps: Option<f64>,
    /// The sender's `end.sum_sent.retransmits`.
    retransmits: Option<u64>,
    /// Round trips while the bulk flow runs.
    latency_under_load: Option<Latency>,
    /// What the bulk flow of the latency measurement got (received), and its retransmits.
    load_received_bps: Option<f64>,
    load_retransmits: Option<u64>,
    /// Jain's fairness index of 2 and of 8 parallel bulk flows (1: equal shares), with
    /// each flow's received rate.
    fairness2: Option<f64>,
    fairness8: Option<f64>,
    flows_bps: Vec<Vec<f64>>,
    errors: Vec<String>,
}

#[derive(Clone, Copy, Default, Serialize)]
struct Medians {
    received_mbps: Option<f64>,
    received_pct: Option<f64>,
    first_second_mbps: Option<f64>,
    first_second_pct: Option<f64>,
    retransmits: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    fairness2: Option<f64>,
    fairness8: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    runs: u32,
    seconds: u32,
    latency_seconds: u32,
    latency_pin: Pin,
    burst_ms: u64,
    /// The agent's `--fq-queues` (`None`: its default).
    fq_queues: Option<u16>,
    /// The experiment's GSO size of the Hypha client pod (`None`: the agent's).
    gso_max_size: Option<u32>,
    limited: &'static str,
    setups: Vec<SetupReport>,
    rates: Vec<RateReport>,
    targets: Vec<Target>,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct SetupReport {
    name: &'static str,
    description: &'static str,
    error: Option<String>,
}

#[derive(Serialize)]
struct RateReport {
    rate_bps: u64,
    burst_bits: u64,
    setups: Vec<RateSetup>,
}

#[derive(Serialize)]
struct RateSetup {
    name: &'static str,
    client: Option<String>,
    server: Option<String>,
    /// The qdiscs that shape, as `tc` showed them before the first measurement.
    shaping: Option<String>,
    runs: Vec<Run>,
    median: Medians,
}

pub fn run(o: &Options) -> Result<()> {
    let root = workspace_root();
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut rates: Vec<u64> = Vec::new();
    for r in &o.rates {
        if !rates.contains(r) {
            rates.push(*r);
        }
    }
    let rates_bps: Vec<u64> = rates.iter().map(|m| m * 1_000_000).collect();
    let burst = |rate: u64| rate * o.burst_ms / 1000;
    let machine = machine();
    let td = Teardown::install()?;
    // 10.120-10.159: apart from the other benches' 10.160-10.250.
    let plan = Plan::in_range(
        o.bin_dir
            .clone()
            .unwrap_or_else(|| root.join("target/release")),
        out_dir.join("bandwidth-hypha-agent.log"),
        120,
        40,
    )?;
    td.make(Undo::Dir(plan.tmp.clone()), || {
        std::fs::create_dir_all(&plan.tmp)
            .with_context(|| format!("creating {}", plan.tmp.display()))
    })?;

    let mut setups = Vec::new();
    for shaper in [Shaper::Reference, Shaper::Hypha] {
        println!("==> setting up {}: {}", shaper.name(), shaper.describe());
        let made = match shaper {
            Shaper::Reference => reference(&plan, &td, &rates_bps, &burst),
            Shaper::Hypha => hypha(&plan, &td, o.fq_queues),
        };
        let setup = match made {
            Ok(s) => {
                for p in &s.pods {
                    println!(
                        "    client {} ({}) -> server {} ({})",
                        p.client_ip, p.client_ns, p.server_ip, p.server_ns
                    );
                }
                s
            }
            Err(e) => {
                eprintln!("    FAILED: {e:#}");
                Setup {
                    shaper,
                    pods: Vec::new(),
                    hypha: None,
                    ifbs: Vec::new(),
                    error: Some(format!("{e:#}")),
                }
            }
        };
        setups.push(setup);
    }

    println!(
        "==> {} rounds per rate of a {} s transfer + {} s of round trips under load; burst = {} ms at the rate; setups taking turns",
        o.runs, o.seconds, o.latency_seconds, o.burst_ms
    );
    // results[rate][setup]
    let mut results: Vec<Vec<(Option<String>, Vec<Run>)>> = rates_bps
        .iter()
        .map(|_| setups.iter().map(|_| (None, Vec::new())).collect())
        .collect();
    let n = setups.len();
    let mut turn = 0;
    for round in 0..o.runs {
        for (ri, &rate) in rates_bps.iter().enumerate() {
            for k in 0..n {
                let si = (turn + k) % n;
                let setup = &setups[si];
                let Some(pods) = setup.pods_for(ri) else {
                    continue;
                };
                let mut errors = Vec::new();
                if let Some((socket, id)) = &setup.hypha
                    && let Err(e) = hypha_limit(&plan.bin, socket, id, rate, burst(rate))
                {
                    errors.push(format!("setting the limit: {e:#}"));
                }
                if let (Some(_), Some(size)) = (&setup.hypha, o.gso_max_size)
                    && let Err(e) = output(Command::new("ip").args([
                        "-n",
                        &pods.client_ns,
                        "link",
                        "set",
                        "dev",
                        "eth0",
                        "gso_max_size",
                        &size.to_string(),
                    ]))
                {
                    errors.push(format!("setting gso_max_size {size}: {e:#}"));
                }
                let slot = &mut results[ri][si];
                if slot.0.is_none() {
                    slot.0 = Some(shaping(setup, ri, pods));
                }
                let mut run = if errors.is_empty() {
                    measure_once(&td, pods, rate, round + 1, o)
                } else {
                    empty_run(round + 1)
                };
                errors.append(&mut run.errors);
                run.errors = errors;
                println!(
                    "    round {}/{} {:>5} Mbit/s {:<9} {}",
                    round + 1,
                    o.runs,
                    rate / 1_000_000,
                    setup.shaper.name(),
                    describe_run(&run)
                );
                slot.1.push(run);
            }
            turn += 1;
        }
    }

    let mut errors: Vec<String> = Vec::new();
    println!("==> cleaning up");
    let ifbs: Vec<String> = setups
        .iter()
        .flat_map(|s| s.ifbs.iter().flatten().cloned())
        .collect();
    if let Err(e) = td.finish() {
        errors.push(format!("{e:#}"));
    }
    for ifb in ifbs {
        if Path::new("/sys/class/net").join(&ifb).exists() {
            errors.push(format!(
                "the reference plugin's DEL left {ifb} behind; removed it"
            ));
            let _ = output(Command::new("ip").args(["link", "del", &ifb]));
        }
    }

    let report = report(o, machine, &setups, &rates_bps, &burst, results, errors);
    print_table(&report);
    super::write_outputs(
        &out_dir,
        "bandwidth",
        &report,
        chart(&report),
        &report.errors,
    )
}

/// The reference setup: one bridge, a server pod (bridge only), and per rate a client pod
/// made by `bridge` then `bandwidth` with that egress rate.
fn reference(
    plan: &Plan,
    td: &Teardown,
    rates: &[u64],
    burst: &dyn Fn(u64) -> u64,
) -> Result<Setup> {
    let (a, b) = plan.subnet_of(Kind::Bridge);
    let uniq = plan.uniq;
    let bridge = format!("hybw{uniq}");
    let name = format!("benchbw-{uniq}");
    let data_dir = plan.tmp.join("bw-host-local");
    let bridge_conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": name,
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": format!("10.{a}.{b}.0/24") }]],
            "dataDir": data_dir,
        },
    });
    // The bridge plugin makes the bridge on the first ADD; DEL leaves it. Recorded first,
    // so undone last, after the DELs.
    td.make(Undo::Link(bridge.clone()), || Ok(()))?;
    td.make(Undo::Dir(data_dir), || Ok(()))?;
    let forward = PathBuf::from("/proc/sys/net/ipv4/ip_forward");
    let before = std::fs::read_to_string(&forward).context("reading ip_forward")?;
    let restore = || -> Result<()> {
        // isGateway turns on the host's IPv4 forwarding; it is put back as it was.
        let after = std::fs::read_to_string(&forward).unwrap_or_default();
        if after != before {
            td.make(
                Undo::Sysctl {
                    path: forward.clone(),
                    value: before.clone(),
                },
                || Ok(()),
            )?;
        }
        Ok(())
    };
    let add_pod = |pod: &str| -> Result<(String, String, String)> {
        let netns = format!("hypb-{uniq}-{pod}");
        add_netns(td, &netns)?;
        let call = CniCall {
            program: vec![PathBuf::from(CNI_PATH).join("bridge").into()],
            container_id: format!("hypb-{uniq}-{pod}"),
            netns: netns.clone(),
            config: bridge_conf.to_string(),
        };
        let result = td.make(Undo::Cni(call.clone()), || call.invoke("ADD"))?;
        Ok((netns, call.container_id, result))
    };
    let made = (|| -> Result<Setup> {
        let (server_ns, _, server_result) = add_pod("bw-srv")?;
        let server_ip = first_address(&server_result)?;
        let mut pods = Vec::new();
        let mut ifbs = Vec::new();
        for &rate in rates {
            let (client_ns, container_id, result) = add_pod(&format!("bw-c{}", rate / 1000))?;
            let client_ip = first_address(&result)?;
            let prev: serde_json::Value =
                serde_json::from_str(&result).context("the bridge plugin's result")?;
            let conf = serde_json::json!({
                "cniVersion": "1.0.0",
                "name": name,
                "type": "bandwidth",
                "capabilities": {"bandwidth": true},
                "runtimeConfig": {"bandwidth": {"egressRate": rate, "egressBurst": burst(rate)}},
                "prevResult": prev,
            });
            let call = CniCall {
                program: vec![PathBuf::from(CNI_PATH).join("bandwidth").into()],
                container_id,
                netns: client_ns.clone(),
                config: conf.to_string(),
            };
            let result = td.make(Undo::Cni(call.clone()), || call.invoke("ADD"))?;
            let json: serde_json::Value =
                serde_json::from_str(&result).context("the bandwidth plugin's result")?;
            let ifb = json["interfaces"].as_array().and_then(|is| {
                is.iter()
                    .filter_map(|i| i["name"].as_str())
                    .find(|n| n.starts_with("bwp"))
                    .map(str::to_owned)
            });
            if ifb.is_none() {
                bail!("the bandwidth plugin made no ifb device for an egress limit: {result}");
            }
            ifbs.push(ifb);
            pods.push(Pods {
                client_ns,
                server_ns: server_ns.clone(),
                client_ip,
                server_ip,
                client_ip6: None,
                server_ip6: None,
                agent_socket: None,
            });
        }
        Ok(Setup {
            shaper: Shaper::Reference,
            pods,
            hypha: None,
            ifbs,
            error: None,
        })
    })();
    restore()?;
    made
}

fn hypha(plan: &Plan, td: &Teardown, fq_queues: Option<u16>) -> Result<Setup> {
    let options = HyphaOptions {
        agent_args: fq_queues
            .map(|n| vec!["--fq-queues".to_owned(), n.to_string()])
            .unwrap_or_default(),
        ..HyphaOptions::default()
    };
    let pods = setups::create_hypha(plan, td, &options)?;
    let socket = pods
        .agent_socket
        .clone()
        .context("the Hypha setup has no agent socket")?;
    let text = output(
        Command::new(plan.bin.join("hypha"))
            .args(["endpoint", "list", "-o", "json", "--socket"])
            .arg(&socket),
    )?;
    let eps: serde_json::Value =
        serde_json::from_str(&text).context("parsing `hypha endpoint list -o json`")?;
    let id = eps
        .as_array()
        .and_then(|eps| {
            eps.iter()
                .find(|e| e["address"].as_str() == Some(&pods.client_ip.to_string()))
        })
        .and_then(|e| e["id"].as_u64())
        .with_context(|| format!("no endpoint with address {} in {text}", pods.client_ip))?;
    Ok(Setup {
        shaper: Shaper::Hypha,
        pods: vec![pods],
        hypha: Some((socket, id.to_string())),
        ifbs: Vec::new(),
        error: None,
    })
}

/// `hypha endpoint config ID egress-rate=RATE egress-burst=BURST`.
fn hypha_limit(bin: &Path, socket: &Path, id: &str, rate: u64, burst: u64) -> Result<()> {
    output(
        Command::new(bin.join("hypha"))
            .args(["endpoint", "config", id])
            .arg(format!("egress-rate={rate}"))
            .arg(format!("egress-burst={burst}"))
            .arg("--socket")
            .arg(socket),
    )
    .map(drop)
}

/// The shaping qdiscs as `tc` shows them, for the record.
fn shaping(setup: &Setup, rate_index: usize, pods: &Pods) -> String {
    let show = |args: &[&str]| {
        output(Command::new("tc").args(args))
            .unwrap_or_else(|e| format!("{e:#}"))
            .trim()
            .to_owned()
    };
    match setup.shaper {
        Shaper::Hypha => format!(
            "pod eth0: {}",
            show(&["-n", &pods.client_ns, "qdisc", "show", "dev", "eth0"])
        ),
        Shaper::Reference => match setup.ifbs.get(rate_index).cloned().flatten() {
            Some(ifb) => format!("{ifb}: {}", show(&["qdisc", "show", "dev", &ifb])),
            None => "no ifb device".to_owned(),
        },
    }
}

fn empty_run(round: u32) -> Run {
    Run {
        round,
        received_bps: None,
        received_pct: None,
        first_second_bps: None,
        first_second_pct: None,
        server_intervals_bps: Vec::new(),
        client_sum_received_bps: None,
        sent_bps: None,
        retransmits: None,
        latency_under_load: None,
        load_received_bps: None,
        load_retransmits: None,
        fairness2: None,
        fairness8: None,
        flows_bps: Vec::new(),
        errors: Vec::new(),
    }
}

/// Jain's fairness index of `rates`: (Σx)² / (n Σx²), 1 when all are equal, 1/n when
/// one takes everything.
fn jain(rates: &[f64]) -> Option<f64> {
    let sum: f64 = rates.iter().sum();
    let squares: f64 = rates.iter().map(|x| x * x).sum();
    (!rates.is_empty() && squares > 0.0).then(|| sum * sum / (rates.len() as f64 * squares))
}

fn measure_once(td: &Teardown, pods: &Pods, rate: u64, round: u32, o: &Options) -> Run {
    let mut run = empty_run(round);
    let pct = |bps: f64| 100.0 * bps / rate as f64;
    match iperf(td, pods, o.seconds, true, 1) {
        Ok(json) => {
            let server = &json["server_output_json"];
            let intervals: Vec<(f64, f64)> = server["intervals"]
                .as_array()
                .map(|is| {
                    is.iter()
                        .filter_map(|i| {
                            Some((i["sum"]["bytes"].as_f64()?, i["sum"]["seconds"].as_f64()?))
                        })
                        .collect()
                })
                .unwrap_or_default();
            if intervals.is_empty() {
                run.errors
                    .push("iperf3 returned no server intervals (--get-server-output)".to_owned());
            }
            run.server_intervals_bps = intervals
                .iter()
                .map(|(bytes, secs)| if *secs > 0.0 { bytes * 8.0 / secs } else { 0.0 })
                .collect();
            let (bytes, secs) = intervals
                .iter()
                .fold((0.0, 0.0), |(b, s), (bi, si)| (b + bi, s + si));
            run.received_bps = (secs > 0.0).then(|| bytes * 8.0 / secs);
            run.first_second_bps = run.server_intervals_bps.first().copied();
            run.received_pct = run.received_bps.map(pct);
            run.first_second_pct = run.first_second_bps.map(pct);
            run.client_sum_received_bps = json["end"]["sum_received"]["bits_per_second"].as_f64();
            run.sent_bps = json["end"]["sum_sent"]["bits_per_second"].as_f64();
            run.retransmits = json["end"]["sum_sent"]["retransmits"].as_u64();
        }
        Err(e) => run.errors.push(format!("transfer: {e:#}")),
    }
    // Round trips from the same pod to the same server while a bulk flow fills the limit.
    let (latency, load) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            iperf(
                td,
                pods,
                o.latency_seconds + LOAD_LEAD.as_secs() as u32 + 2,
                false,
                1,
            )
        });
        std::thread::sleep(LOAD_LEAD);
        let latency = measure::latency_on(pods, 0, o.latency_seconds, o.latency_pin);
        let load = load
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the bulk flow's thread panicked")));
        (latency, load)
    });
    match latency {
        Ok(l) => run.latency_under_load = Some(l),
        Err(e) => run.errors.push(format!("latency under load: {e:#}")),
    }
    match load {
        Ok(json) => {
            run.load_received_bps = json["end"]["sum_received"]["bits_per_second"].as_f64();
            run.load_retransmits = json["end"]["sum_sent"]["retransmits"].as_u64();
        }
        Err(e) => run
            .errors
            .push(format!("bulk flow under the latency: {e:#}")),
    }
    for flows in FAIRNESS_FLOWS {
        match iperf(td, pods, FAIRNESS_SECONDS, false, flows) {
            Ok(json) => {
                let rates: Vec<f64> = json["end"]["streams"]
                    .as_array()
                    .map(|ss| {
                        ss.iter()
                            .filter_map(|s| s["receiver"]["bits_per_second"].as_f64())
                            .collect()
                    })
                    .unwrap_or_default();
                if rates.len() != flows as usize {
                    run.errors.push(format!(
                        "{flows} bulk flows: iperf3 reported {} streams",
                        rates.len()
                    ));
                }
                let index = jain(&rates);
                if flows == 2 {
                    run.fairness2 = index;
                } else {
                    run.fairness8 = index;
                }
                run.flows_bps.push(rates);
            }
            Err(e) => run.errors.push(format!("{flows} bulk flows: {e:#}")),
        }
    }
    run
}

/// One iperf3 TCP transfer from the client pod to the server pod: the client's JSON
/// (with the server's, `server_output_json`, when `server_output`). Both processes are
/// recorded in the teardown, so an interrupted run leaves neither behind.
fn iperf(
    td: &Teardown,
    pods: &Pods,
    seconds: u32,
    server_output: bool,
    parallel: u32,
) -> Result<serde_json::Value> {
    let ip = pods.server_ip.to_string();
    let port = IPERF_PORT.to_string();
    let server = td.spawn(
        "iperf3 server",
        Command::new("ip")
            .args(["netns", "exec", &pods.server_ns, "iperf3", "-s", "-1", "-J"])
            .args(["-B", &ip, "-p", &port])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let result = (|| {
        let start = Instant::now();
        loop {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &pods.client_ns, "iperf3", "-J"])
                .args(["--connect-timeout", "3000", "-c", &ip, "-p", &port])
                .args(["-t", &seconds.to_string()]);
            if server_output {
                cmd.arg("--get-server-output");
            }
            if parallel > 1 {
                cmd.args(["-P", &parallel.to_string()]);
            }
            let out = run_recorded(td, &mut cmd, Duration::from_secs(u64::from(seconds) + 30))?;
            let json: serde_json::Value = serde_json::from_str(&out)
                .with_context(|| format!("iperf3 -J printed no JSON: {out}"))?;
            match json["error"].as_str() {
                None => return Ok(json),
                // The server needs a moment to listen; a refused connection does not use
                // up its single (-1) test.
                Some(e)
                    if e.contains("unable to connect")
                        && start.elapsed() < Duration::from_secs(5) =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Some(e) => bail!("iperf3: {e}"),
            }
        }
    })();
    end(&server);
    result
}

/// Runs a command recorded in the teardown, with a time limit; its standard output,
/// whatever its exit status (iperf3 -J reports its errors in the JSON).
fn run_recorded(td: &Teardown, cmd: &mut Command, limit: Duration) -> Result<String> {
    let what = crate::util::describe(cmd);
    let child = td.spawn(
        "iperf3 client",
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    let stdout = lock(&child).stdout.take().context("stdout is piped")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let mut stdout = stdout;
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let deadline = Instant::now() + limit;
    loop {
        if lock(&child).try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            end(&child);
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    reader
        .join()
        .map_err(|_| anyhow!("reading {what}: the reader panicked"))?
        .with_context(|| format!("reading the output of {what}"))
}

fn lock(child: &Arc<Mutex<Child>>) -> std::sync::MutexGuard<'_, Child> {
    child.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kills and reaps a child if it is still running.
fn end(child: &Arc<Mutex<Child>>) {
    let mut child = lock(child);
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

fn add_netns(td: &Teardown, name: &str) -> Result<()> {
    td.make(Undo::Netns(name.to_owned()), || {
        if Path::new("/run/netns").join(name).exists() {
            bail!(
                "network namespace {name} already exists (left by a run killed with SIGKILL?); remove it with `ip netns del {name}`"
            );
        }
        output(Command::new("ip").args(["netns", "add", name]))?;
        output(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"])).map(drop)
    })
}

/// `ips[0].address` of a CNI result, without its prefix length.
fn first_address(result: &str) -> Result<Ipv4Addr> {
    let json: serde_json::Value = serde_json::from_str(result)
        .with_context(|| format!("the CNI result is not JSON: {result}"))?;
    let addr = json["ips"][0]["address"]
        .as_str()
        .with_context(|| format!("CNI result without ips[0].address: {result}"))?;
    let ip = addr.split('/').next().unwrap_or(addr);
    ip.parse()
        .with_context(|| format!("ips[0].address {addr:?} is not an IPv4 address"))
}

fn describe_run(r: &Run) -> String {
    let opt = |v: Option<f64>, d: usize| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.d$}"));
    let mut s = format!(
        "{:>8} Mbit/s ({:>6}%)  1st s {:>8} ({:>6}%)  retr {:>5}",
        opt(r.received_bps.map(|b| b / 1e6), 2),
        opt(r.received_pct, 1),
        opt(r.first_second_bps.map(|b| b / 1e6), 2),
        opt(r.first_second_pct, 1),
        r.retransmits
            .map_or_else(|| "n/a".to_owned(), |n| n.to_string()),
    );
    if let Some(l) = &r.latency_under_load {
        s += &format!(
            "  loaded p50 {:.2} ms p99 {:.2} ms ({} rt, bulk {} Mbit/s)",
            ms(l.p50_ns),
            ms(l.p99_ns),
            l.round_trips,
            opt(r.load_received_bps.map(|b| b / 1e6), 1)
        );
    }
    s += &format!(
        "  Jain 2 flows {} 8 flows {}",
        opt(r.fairness2, 3),
        opt(r.fairness8, 3)
    );
    for e in &r.errors {
        s += &format!("\n      FAILED {e}");
    }
    s
}

fn ms(ns: u32) -> f64 {
    f64::from(ns) / 1e6
}

fn report(
    o: &Options,
    machine: Machine,
    setups: &[Setup],
    rates: &[u64],
    burst: &dyn Fn(u64) -> u64,
    results: Vec<Vec<(Option<String>, Vec<Run>)>>,
    mut errors: Vec<String>,
) -> Report {
    let medians = |runs: &[Run]| Medians {
        received_mbps: median(runs.iter().filter_map(|r| r.received_bps.map(|b| b / 1e6))),
        received_pct: median(runs.iter().filter_map(|r| r.received_pct)),
        first_second_mbps: median(
            runs.iter()
                .filter_map(|r| r.first_second_bps.map(|b| b / 1e6)),
        ),
        first_second_pct: median(runs.iter().filter_map(|r| r.first_second_pct)),
        retransmits: median(runs.iter().filter_map(|r| r.retransmits.map(|n| n as f64))),
        p50_ms: median(
            runs.iter()
                .filter_map(|r| r.latency_under_load.as_ref().map(|l| ms(l.p50_ns))),
        ),
        p99_ms: median(
            runs.iter()
                .filter_map(|r| r.latency_under_load.as_ref().map(|l| ms(l.p99_ns))),
        ),
        fairness2: median(runs.iter().filter_map(|r| r.fairness2)),
        fairness8: median(runs.iter().filter_map(|r| r.fairness8)),
    };
    for s in setups {
        if let Some(e) = &s.error {
            errors.push(format!("{}: {e}", s.shaper.name()));
        }
    }
    let mut targets = Vec::new();
    let mut rate_reports = Vec::new();
    for (ri, (&rate, per_setup)) in rates.iter().zip(results).enumerate() {
        let mut rs = Vec::new();
        for (setup, (shaping, runs)) in setups.iter().zip(per_setup) {
            for r in &runs {
                for e in &r.errors {
                    errors.push(format!(
                        "{} at {} Mbit/s round {}: {e}",
                        setup.shaper.name(),
                        rate / 1_000_000,
                        r.round
                    ));
                }
            }
            let pods = setup.pods_for(ri);
            rs.push(RateSetup {
                name: setup.shaper.name(),
                client: pods.map(|p| format!("{} in {}", p.client_ip, p.client_ns)),
                server: pods.map(|p| format!("{} in {}", p.server_ip, p.server_ns)),
                shaping,
                median: medians(&runs),
                runs,
            });
        }
        let m = |shaper: Shaper| {
            rs.iter()
                .find(|s| s.name == shaper.name())
                .map(|s| s.median)
                .unwrap_or_default()
        };
        let (h, r) = (m(Shaper::Hypha), m(Shaper::Reference));
        let mbit = rate / 1_000_000;
        targets.push(Target {
            goal: format!("{mbit} Mbit/s: rate within ±{TARGET_RATE_TOLERANCE_PCT:.0}%"),
            measured: h
                .received_pct
                .map(|p| format!("{p:.1}% (reference {})", pct_text(r.received_pct))),
            pass: h
                .received_pct
                .map(|p| (p - 100.0).abs() <= TARGET_RATE_TOLERANCE_PCT),
        });
        targets.push(Target {
            goal: format!("{mbit} Mbit/s: first second < {TARGET_FIRST_SECOND_PCT:.0}%"),
            measured: h
                .first_second_pct
                .map(|p| format!("{p:.1}% (reference {})", pct_text(r.first_second_pct))),
            pass: h.first_second_pct.map(|p| p < TARGET_FIRST_SECOND_PCT),
        });
        targets.push(Target {
            goal: format!("{mbit} Mbit/s: loaded p99 <= reference / 5"),
            measured: h
                .p99_ms
                .zip(r.p99_ms)
                .map(|(h, r)| format!("{h:.2} vs {r:.2} ms (x{:.2})", h / r)),
            pass: h
                .p99_ms
                .zip(r.p99_ms)
                .map(|(h, r)| h <= r * TARGET_P99_OF_REFERENCE),
        });
        targets.push(Target {
            goal: format!("{mbit} Mbit/s: Jain's fairness index of 2 / 8 bulk flows (reported)"),
            measured: Some(format!(
                "{} / {} (reference {} / {})",
                opt3(h.fairness2),
                opt3(h.fairness8),
                opt3(r.fairness2),
                opt3(r.fairness8)
            )),
            pass: None,
        });
        rate_reports.push(RateReport {
            rate_bps: rate,
            burst_bits: burst(rate),
            setups: rs,
        });
    }
    Report {
        bench: "bandwidth",
        machine,
        runs: o.runs,
        seconds: o.seconds,
        latency_seconds: o.latency_seconds,
        latency_pin: o.latency_pin,
        burst_ms: o.burst_ms,
        fq_queues: o.fq_queues,
        gso_max_size: o.gso_max_size,
        limited: "egress of the client (sending) pod, in both setups",
        setups: setups
            .iter()
            .map(|s| SetupReport {
                name: s.shaper.name(),
                description: s.shaper.describe(),
                error: s.error.clone(),
            })
            .collect(),
        rates: rate_reports,
        targets,
        errors,
    }
}

fn opt3(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.3}"))
}

fn pct_text(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.1}%"))
}

fn print_table(r: &Report) {
    let opt = |v: Option<f64>, decimals: usize| {
        v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}"))
    };
    println!();
    println!(
        "Bandwidth bench: egress limit on the sending pod, burst {} ms at the rate; median of {} rounds; {} s transfers, {} s of round trips under load; Hypha's per-flow queues: {}, GSO size: {}; kernel {}, {} CPUs",
        r.burst_ms,
        r.runs,
        r.seconds,
        r.latency_seconds,
        r.fq_queues
            .map_or_else(|| "the agent's default".to_owned(), |n| n.to_string()),
        r.gso_max_size
            .map_or_else(|| "the agent's".to_owned(), |n| format!("{n} bytes")),
        r.machine.kernel,
        r.machine.nproc
    );
    println!(
        "{:>6} {:<10} {:>9} {:>8} {:>10} {:>8} {:>8} {:>11} {:>11} {:>7} {:>7}",
        "Mbit/s",
        "setup",
        "received",
        "% cfg",
        "1st s",
        "% cfg",
        "retrans",
        "p50 ms load",
        "p99 ms load",
        "Jain 2",
        "Jain 8"
    );
    for rate in &r.rates {
        for s in &rate.setups {
            let m = &s.median;
            println!(
                "{:>6} {:<10} {:>9} {:>8} {:>10} {:>8} {:>8} {:>11} {:>11} {:>7} {:>7}",
                rate.rate_bps / 1_000_000,
                s.name,
                opt(m.received_mbps, 2),
                pct_text(m.received_pct),
                opt(m.first_second_mbps, 2),
                pct_text(m.first_second_pct),
                opt(m.retransmits, 0),
                opt(m.p50_ms, 2),
                opt(m.p99_ms, 2),
                opt(m.fairness2, 3),
                opt(m.fairness8, 3),
            );
        }
    }
    super::print_targets("Targets (Hypha):", &r.targets);
}

fn chart(r: &Report) -> String {
    let categories: Vec<String> = r
        .rates
        .iter()
        .map(|x| format!("{} Mbit/s", x.rate_bps / 1_000_000))
        .collect();
    let series = || {
        vec![
            Series::new("reference bandwidth", "#e9c46a"),
            Series::new("hypha", "#2a9d8f"),
        ]
    };
    let values = |f: &dyn Fn(&Medians) -> Option<f64>| -> Vec<Vec<Option<f64>>> {
        r.rates
            .iter()
            .map(|x| {
                [Shaper::Reference, Shaper::Hypha]
                    .iter()
                    .map(|sh| {
                        x.setups
                            .iter()
                            .find(|s| s.name == sh.name())
                            .and_then(|s| f(&s.median))
                    })
                    .collect()
            })
            .collect()
    };
    let chart = |title: &str, unit: &str, f: &dyn Fn(&Medians) -> Option<f64>, decimals| BarChart {
        title: title.to_owned(),
        unit: unit.to_owned(),
        categories: categories.clone(),
        series: series(),
        values: values(f),
        decimals,
    };
    let received = chart(
        "Rate over the transfer (receiver)",
        "% of configured",
        &|m| m.received_pct,
        1,
    );
    let first = chart(
        "Rate in the first second (receiver)",
        "% of configured",
        &|m| m.first_second_pct,
        1,
    );
    let p50 = chart("1-byte RR p50 under load", "ms", &|m| m.p50_ms, 2);
    let p99 = chart("1-byte RR p99 under load", "ms", &|m| m.p99_ms, 2);
    let (w, h) = (1000.0, 820.0);
    let (cw, ch) = (w / 2.0 - 20.0, (h - 70.0) / 2.0);
    svg::document(
        w,
        h,
        "Hypha bandwidth bench: egress limit of the sending pod, Hypha vs reference bandwidth plugin",
        &format!(
            "burst {} ms at the rate; median of {} rounds; {} s transfers, {} s RR under load; kernel {}, {} CPUs; {}",
            r.burst_ms,
            r.runs,
            r.seconds,
            r.latency_seconds,
            r.machine.kernel,
            r.machine.nproc,
            r.machine.timestamp_utc
        ),
        &[
            svg::bars(&received, 10.0, 60.0, cw, ch),
            svg::bars(&first, w / 2.0 + 10.0, 60.0, cw, ch),
            svg::bars(&p50, 10.0, 60.0 + ch, cw, ch),
            svg::bars(&p99, w / 2.0 + 10.0, 60.0 + ch, cw, ch),
        ],
    )
}
