//! `cargo xtask bench cni`: how long CNI ADD and DEL take, Hypha (`hypha-cni` + agent)
//! side by side with the reference `bridge` + `host-local` plugins, in one run:
//!
//! - sequential: ADD then DEL of one pod, `--adds` times per setup, the setups taking
//!   turns pod by pod (noise hits both alike); p50 and p99 of each;
//! - bursts: 10 and 30 ADDs started together from as many threads (each pod its own
//!   namespace), `--rounds` times; the wall time until the last one answered, and the
//!   DELs of the burst likewise;
//! - node size: the ADD (and DEL) of a probe pod on an empty node and on a node holding
//!   `--node-size` − 1 other pods (each in its own namespace), `--probes` times each, the
//!   setups taking turns; the agent's resident memory with 0 and with `--node-size`
//!   endpoints. The empty-node probes are split before the node is filled and after it
//!   is drained, so slow drift of the machine's load hits both sizes alike.
//!
//! Both setups come from [`setups`] (the datapath bench's), so the agent, the bridge and
//! their teardown are the same. Each plugin is run as a runtime runs it, as a new
//! process; `hypha-cni` runs through `nsenter --net=<node>` (the agent lives in a node
//! namespace of its own), which its figures include.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Barrier;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::measure;
use super::median;
use super::setups::{self, CniCall, Kind, Plan};
use super::svg::{self, BarChart, Series};
use super::teardown::{Teardown, Undo};
use crate::util::workspace_root;

/// Hypha's targets: an absolute one for the 30-pod burst (from before the issue "Agent
/// core for scale"), and ratios to the bridge plugin's figures (at most 1.0).
const TARGET_BURST_30_MS: f64 = 1000.0;
const TARGET_RATIO_TO_BRIDGE: f64 = 1.0;
/// The ADD on the full node at most this much slower than on the empty node.
const TARGET_NODE_SIZE_GROWTH: f64 = 0.10;

#[derive(clap::Args)]
pub struct Options {
    /// Sequential ADD+DEL pairs per setup (at least 100, for a meaningful p99) [default:
    /// 200, 100 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(100..=10_000))]
    adds: Option<u32>,
    /// Rounds of each burst size per setup [default: 5, 2 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: Option<u32>,
    /// Pods on the full node of the node-size measurement, the probe included (at most
    /// 250: the setups' pod networks are /24s).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u32).range(2..=250))]
    node_size: u32,
    /// Probe ADDs per node size per setup [default: 20, 8 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=1000))]
    probes: Option<u32>,
    /// A run of a few minutes: fewer sequential pairs, rounds and probes (the node size
    /// is kept); explicit --adds, --rounds or --probes still win.
    #[arg(long)]
    quick: bool,
}

/// The options with their defaults resolved.
#[derive(Clone, Copy, Serialize)]
struct Settings {
    adds: u32,
    rounds: u32,
    node_size: u32,
    probes: u32,
    quick: bool,
}

impl Options {
    fn settings(&self) -> Settings {
        let pick = |given: Option<u32>, full: u32, quick: u32| {
            given.unwrap_or(if self.quick { quick } else { full })
        };
        Settings {
            adds: pick(self.adds, 200, 100),
            rounds: pick(self.rounds, 5, 2),
            node_size: self.node_size,
            probes: pick(self.probes, 20, 8),
            quick: self.quick,
        }
    }
}

/// Burst sizes.
const BURSTS: [usize; 2] = [10, 30];

/// One setup: how to call its plugin.
struct Target {
    kind: Kind,
    /// The plugin (behind `nsenter` for Hypha).
    program: Vec<std::ffi::OsString>,
    config: String,
    /// Namespaces for the pods, one per pod of the largest burst or of the full node
    /// (the last one the probe's).
    netns: Vec<String>,
    seq_add_ms: Vec<f64>,
    seq_del_ms: Vec<f64>,
    bursts: Vec<Burst>,
    node: NodeSize,
    /// The agent's pid (Hypha only), for its memory.
    agent_pid: Option<u32>,
    errors: Vec<String>,
}

/// The node-size measurement of one setup (raw samples, in ms).
#[derive(Clone, Default, Serialize)]
struct NodeSize {
    /// Pods the full node held besides the probe (`--node-size` − 1 if every ADD worked).
    filled: usize,
    empty_add_ms: Vec<f64>,
    empty_del_ms: Vec<f64>,
    full_add_ms: Vec<f64>,
    full_del_ms: Vec<f64>,
    /// Each filling ADD, in order: the node's growth pod by pod.
    fill_add_ms: Vec<f64>,
    drain_del_ms: Vec<f64>,
    /// The agent's VmRSS (Hypha only).
    rss: Option<Rss>,
}

/// The agent's resident memory (KiB) at three points of the node-size measurement.
#[derive(Clone, Copy, Default, Serialize)]
struct Rss {
    /// No endpoints (the setup's pods deleted), before the node was filled.
    empty_kib: Option<u64>,
    /// `--node-size` endpoints (the full node and the probe); the largest reading.
    full_kib: Option<u64>,
    /// No endpoints again, after every pod was deleted.
    drained_kib: Option<u64>,
}

#[derive(Clone, Serialize)]
struct Burst {
    size: usize,
    round: u32,
    /// From the start of the burst to the last ADD's answer.
    add_wall_ms: f64,
    /// Each ADD's own time.
    add_p50_ms: Option<f64>,
    add_max_ms: Option<f64>,
    del_wall_ms: f64,
    failures: usize,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    settings: Settings,
    setups: Vec<SetupReport>,
    targets: Vec<super::Target>,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct Machine {
    kernel: String,
    nproc: usize,
    timestamp_unix: u64,
}

#[derive(Serialize)]
struct SetupReport {
    name: &'static str,
    description: &'static str,
    sequential: Sequential,
    /// Median over the rounds, per burst size.
    burst_medians: Vec<BurstMedian>,
    bursts: Vec<Burst>,
    node_size: NodeSizeReport,
}

#[derive(Serialize)]
struct NodeSizeReport {
    /// Pods on the full node, the probe included.
    pods: u32,
    empty_add_p50_ms: Option<f64>,
    full_add_p50_ms: Option<f64>,
    /// `full_add_p50_ms / empty_add_p50_ms - 1`.
    add_growth: Option<f64>,
    empty_del_p50_ms: Option<f64>,
    full_del_p50_ms: Option<f64>,
    agent_rss: Option<Rss>,
    samples: NodeSize,
}

#[derive(Clone, Copy, Serialize)]
struct Sequential {
    count: usize,
    add_p50_ms: Option<f64>,
    add_p99_ms: Option<f64>,
    del_p50_ms: Option<f64>,
    del_p99_ms: Option<f64>,
}

#[derive(Clone, Copy, Serialize)]
struct BurstMedian {
    size: usize,
    add_wall_ms: Option<f64>,
    del_wall_ms: Option<f64>,
}

pub fn run(o: &Options) -> Result<()> {
    let o = o.settings();
    let root = workspace_root();
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let td = Teardown::install()?;
    let plan = Plan::new(
        root.join("target/release"),
        out_dir.join("cni-hypha-agent.log"),
    )?;
    td.make(Undo::Dir(plan.tmp.clone()), || {
        std::fs::create_dir_all(&plan.tmp)
            .with_context(|| format!("creating {}", plan.tmp.display()))
    })?;

    let mut targets = Vec::new();
    for kind in [Kind::Bridge, Kind::Hypha] {
        println!("==> setting up {}: {}", kind.name(), kind.describe());
        targets.push(
            target(kind, &plan, &td, o.node_size as usize)
                .with_context(|| format!("setting up {}", kind.name()))?,
        );
    }

    println!("==> {} sequential ADD+DEL per setup, taking turns", o.adds);
    for i in 0..o.adds {
        for t in &mut targets {
            let id = format!("hypb-{}-seq-{}-{i}", plan.uniq, t.kind.name());
            let call = t.call(&id, 0);
            match time(|| call.invoke("ADD")) {
                Ok(ms) => t.seq_add_ms.push(ms),
                Err(e) => t.errors.push(format!("sequential ADD {i}: {e:#}")),
            }
            match time(|| call.invoke("DEL")) {
                Ok(ms) => t.seq_del_ms.push(ms),
                Err(e) => t.errors.push(format!("sequential DEL {i}: {e:#}")),
            }
        }
    }

    for size in BURSTS {
        println!("==> bursts of {size} concurrent ADDs, {} rounds", o.rounds);
        for round in 1..=o.rounds {
            for t in &mut targets {
                let b = burst(t, &plan, size, round);
                println!(
                    "    {:<7} round {round}: ADD wall {:7.1} ms (each p50 {:6.1}, max {:6.1}), DEL wall {:7.1} ms{}",
                    t.kind.name(),
                    b.add_wall_ms,
                    b.add_p50_ms.unwrap_or(f64::NAN),
                    b.add_max_ms.unwrap_or(f64::NAN),
                    b.del_wall_ms,
                    if b.failures > 0 {
                        format!(", {} FAILED", b.failures)
                    } else {
                        String::new()
                    }
                );
                t.bursts.push(b);
            }
        }
    }

    node_size(&mut targets, &plan, &o);

    println!("==> cleaning up");
    let mut errors = Vec::new();
    if let Err(e) = td.finish() {
        errors.push(format!("{e:#}"));
    }
    let report = report(&o, targets, errors);
    print_table(&report);
    super::write_outputs(&out_dir, "cni", &report, chart(&report), &report.errors)
}

/// Sets up `kind` with the datapath bench's setup (which also makes two pods), and
/// namespaces for the bench's pods.
fn target(kind: Kind, plan: &Plan, td: &Teardown, node_size: usize) -> Result<Target> {
    let pods = setups::create(kind, plan, td)?;
    let mut agent_pid = None;
    let (program, config) = match kind {
        Kind::Hypha => {
            let socket = pods
                .agent_socket
                .context("the Hypha setup has no agent socket")?;
            agent_pid = Some(
                measure::find_process("agent", &socket)
                    .context("finding the agent's pid, for its memory")?,
            );
            let program = vec![
                "nsenter".into(),
                format!("--net=/run/netns/hypb-{}-node", plan.uniq).into(),
                plan.bin.join("hypha-cni").into(),
            ];
            let config = serde_json::json!({
                "cniVersion": "1.0.0", "name": "hypha", "type": "hypha-cni", "agentSocket": socket,
            });
            (program, config)
        }
        Kind::Bridge => {
            // The same network as the setup's two pods (bridge, subnet and host-local
            // store), so that host-local hands out addresses from one pool.
            let [a, b, c, _] = pods.client_ip.octets();
            let program = vec![PathBuf::from("/usr/lib/cni/bridge").into()];
            let config = serde_json::json!({
                "cniVersion": "1.0.0",
                "name": format!("benchbr-{}", plan.uniq),
                "type": "bridge",
                "bridge": format!("hybr{}", plan.uniq),
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": format!("{a}.{b}.{c}.0/24") }]],
                    "dataDir": plan.tmp.join("host-local"),
                },
            });
            (program, config)
        }
        Kind::Veth => bail!("veth is no CNI setup"),
    };
    let mut netns = Vec::new();
    for i in 0..BURSTS[BURSTS.len() - 1].max(node_size) {
        let name = format!("hypb-{}-cni-{}-{i}", plan.uniq, kind.name());
        td.make(Undo::Netns(name.clone()), || {
            let out = Command::new("ip").args(["netns", "add", &name]).output()?;
            if !out.status.success() {
                bail!(
                    "ip netns add {name}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        })?;
        netns.push(name);
    }
    Ok(Target {
        kind,
        program,
        config: config.to_string(),
        netns,
        seq_add_ms: Vec::new(),
        seq_del_ms: Vec::new(),
        bursts: Vec::new(),
        node: NodeSize::default(),
        agent_pid,
        errors: Vec::new(),
    })
}

impl Target {
    fn call(&self, container_id: &str, slot: usize) -> CniCall {
        CniCall {
            program: self.program.clone(),
            container_id: container_id.to_owned(),
            netns: self.netns[slot].clone(),
            config: self.config.clone(),
        }
    }
}

/// Milliseconds `f` took, if it succeeded.
fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// Which node a probe pod joins.
#[derive(Clone, Copy, PartialEq)]
enum Fill {
    Empty,
    Full,
}

/// The node-size measurement, on both setups taking turns (see the module comment).
/// Pods are not recorded in the teardown one by one: on an error, deleting their
/// namespaces (and Hypha's node namespace, the bridge and host-local's store) takes
/// them down, as for the bursts.
fn node_size(targets: &mut [Target], plan: &Plan, o: &Settings) {
    let n = o.node_size as usize;
    println!(
        "==> node size: probe ADDs on an empty node and on one with {} pods, {} each",
        n - 1,
        o.probes
    );
    // An empty node: the setups' own two pods go.
    for t in targets.iter_mut() {
        for call in setups::setup_pod_calls(t.kind, plan) {
            if let Err(e) = call.invoke("DEL") {
                t.errors.push(format!(
                    "DEL of the setup's pod {}: {e:#}",
                    call.container_id
                ));
            }
        }
        t.node.rss = t.agent_pid.map(|_| Rss::default());
        if let Some(kib) = t.rss() {
            t.node.rss.get_or_insert_default().empty_kib = Some(kib);
        }
    }
    let before = o.probes / 2;
    probes(targets, plan, Fill::Empty, 0..before);
    println!("    filling both nodes with {} pods", n - 1);
    for i in 0..n - 1 {
        for t in targets.iter_mut() {
            let call = t.call(&fill_id(plan, t.kind, i), i);
            match time(|| call.invoke("ADD")) {
                Ok(ms) => {
                    t.node.fill_add_ms.push(ms);
                    t.node.filled += 1;
                }
                Err(e) => t.errors.push(format!("node size: filling ADD {i}: {e:#}")),
            }
        }
        if (i + 1) % 50 == 0 {
            println!("    {}/{}", i + 1, n - 1);
        }
    }
    probes(targets, plan, Fill::Full, 0..o.probes);
    println!("    deleting the {} pods", n - 1);
    for i in 0..n - 1 {
        for t in targets.iter_mut() {
            let call = t.call(&fill_id(plan, t.kind, i), i);
            match time(|| call.invoke("DEL")) {
                Ok(ms) => t.node.drain_del_ms.push(ms),
                Err(e) => t.errors.push(format!("node size: draining DEL {i}: {e:#}")),
            }
        }
    }
    for t in targets.iter_mut() {
        if let Some(kib) = t.rss() {
            t.node.rss.get_or_insert_default().drained_kib = Some(kib);
        }
    }
    probes(targets, plan, Fill::Empty, before..o.probes);
}

fn fill_id(plan: &Plan, kind: Kind, i: usize) -> String {
    format!("hypb-{}-fill-{}-{i}", plan.uniq, kind.name())
}

/// Probe rounds `rounds`: in each, every setup ADDs and DELs one probe pod, timed.
fn probes(targets: &mut [Target], plan: &Plan, fill: Fill, rounds: std::ops::Range<u32>) {
    let tag = match fill {
        Fill::Empty => "empty",
        Fill::Full => "full",
    };
    for r in rounds {
        for t in targets.iter_mut() {
            let id = format!("hypb-{}-probe-{tag}-{}-{r}", plan.uniq, t.kind.name());
            let call = t.call(&id, t.netns.len() - 1);
            match time(|| call.invoke("ADD")) {
                Ok(ms) => match fill {
                    Fill::Empty => t.node.empty_add_ms.push(ms),
                    Fill::Full => t.node.full_add_ms.push(ms),
                },
                Err(e) => t
                    .errors
                    .push(format!("node size: {tag} probe ADD {r}: {e:#}")),
            }
            if fill == Fill::Full
                && let Some(kib) = t.rss()
            {
                let rss = t.node.rss.get_or_insert_default();
                rss.full_kib = Some(rss.full_kib.map_or(kib, |k| k.max(kib)));
            }
            match time(|| call.invoke("DEL")) {
                Ok(ms) => match fill {
                    Fill::Empty => t.node.empty_del_ms.push(ms),
                    Fill::Full => t.node.full_del_ms.push(ms),
                },
                Err(e) => t
                    .errors
                    .push(format!("node size: {tag} probe DEL {r}: {e:#}")),
            }
        }
    }
}

impl Target {
    /// The agent's VmRSS now, in KiB (Hypha only); a failed read is an error of the run.
    fn rss(&mut self) -> Option<u64> {
        let pid = self.agent_pid?;
        match measure::vm_rss_kib(pid) {
            Ok(kib) => Some(kib),
            Err(e) => {
                self.errors
                    .push(format!("reading the agent's memory: {e:#}"));
                None
            }
        }
    }
}

/// `size` ADDs from as many threads released together, then their DELs likewise.
fn burst(t: &mut Target, plan: &Plan, size: usize, round: u32) -> Burst {
    let calls: Vec<CniCall> = (0..size)
        .map(|i| {
            let id = format!("hypb-{}-b{size}r{round}-{}-{i}", plan.uniq, t.kind.name());
            t.call(&id, i)
        })
        .collect();
    let run_all = |command: &'static str| -> (f64, Vec<Result<f64>>) {
        let barrier = Barrier::new(size + 1);
        std::thread::scope(|s| {
            let handles: Vec<_> = calls
                .iter()
                .map(|call| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        time(|| call.invoke(command))
                    })
                })
                .collect();
            barrier.wait();
            let start = Instant::now();
            let results: Vec<Result<f64>> = handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| bail!("the {command} thread panicked"))
                })
                .collect();
            (start.elapsed().as_secs_f64() * 1000.0, results)
        })
    };
    let (add_wall_ms, adds) = run_all("ADD");
    let (del_wall_ms, dels) = run_all("DEL");
    let mut each: Vec<f64> = Vec::new();
    let mut failures = 0;
    for (what, results) in [("ADD", adds), ("DEL", dels)] {
        for r in results {
            match r {
                Ok(ms) if what == "ADD" => each.push(ms),
                Ok(_) => {}
                Err(e) => {
                    failures += 1;
                    t.errors
                        .push(format!("burst of {size}, round {round}, {what}: {e:#}"));
                }
            }
        }
    }
    each.sort_by(f64::total_cmp);
    Burst {
        size,
        round,
        add_wall_ms,
        add_p50_ms: median(each.iter().copied()),
        add_max_ms: each.last().copied(),
        del_wall_ms,
        failures,
    }
}

/// The `p`-th percentile (0 to 100) of `values`, nearest rank.
fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

fn report(o: &Settings, targets: Vec<Target>, mut errors: Vec<String>) -> Report {
    let mut setups = Vec::new();
    for t in targets {
        errors.extend(t.errors.iter().map(|e| format!("{}: {e}", t.kind.name())));
        let burst_medians = BURSTS
            .iter()
            .map(|&size| {
                let of_size = || t.bursts.iter().filter(move |b| b.size == size);
                BurstMedian {
                    size,
                    add_wall_ms: median(of_size().map(|b| b.add_wall_ms)),
                    del_wall_ms: median(of_size().map(|b| b.del_wall_ms)),
                }
            })
            .collect();
        setups.push(SetupReport {
            name: t.kind.name(),
            description: t.kind.describe(),
            sequential: Sequential {
                count: t.seq_add_ms.len(),
                add_p50_ms: percentile(&t.seq_add_ms, 50.0),
                add_p99_ms: percentile(&t.seq_add_ms, 99.0),
                del_p50_ms: percentile(&t.seq_del_ms, 50.0),
                del_p99_ms: percentile(&t.seq_del_ms, 99.0),
            },
            burst_medians,
            bursts: t.bursts,
            node_size: node_size_report(o.node_size, t.node),
        });
    }
    let find = |name: &str| setups.iter().find(|s| s.name == name);
    let (hypha, bridge) = (find("hypha"), find("bridge"));
    let hypha_30 = hypha.and_then(burst_30).and_then(|b| b.add_wall_ms);
    let mut targets: Vec<super::Target> = [
        (
            "sequential ADD p50",
            (|s: &SetupReport| s.sequential.add_p50_ms) as fn(&SetupReport) -> Option<f64>,
        ),
        ("sequential DEL p50", |s| s.sequential.del_p50_ms),
        ("30-pod burst ADD (wall, median of the rounds)", |s| {
            burst_30(s).and_then(|b| b.add_wall_ms)
        }),
        ("30-pod burst DEL (wall, median of the rounds)", |s| {
            burst_30(s).and_then(|b| b.del_wall_ms)
        }),
    ]
    .into_iter()
    .map(|(what, get)| ratio_target(what, hypha.and_then(get), bridge.and_then(get)))
    .collect();
    targets.push(super::Target {
        goal: format!(
            "a 30-pod burst of Hypha ADDs within {TARGET_BURST_30_MS:.0} ms (median of the rounds)"
        ),
        measured: hypha_30.map(|ms| format!("{ms:.0} ms")),
        pass: hypha_30.map(|ms| ms <= TARGET_BURST_30_MS),
    });
    let growth = |s: Option<&SetupReport>| s.and_then(|s| s.node_size.add_growth);
    let n = o.node_size;
    targets.push(super::Target {
        goal: format!(
            "Hypha: the {n}th pod's ADD within {:.0}% of the 1st's (p50 of the probes)",
            TARGET_NODE_SIZE_GROWTH * 100.0
        ),
        measured: hypha.and_then(|h| {
            let (e, f) = (h.node_size.empty_add_p50_ms?, h.node_size.full_add_p50_ms?);
            let bridge =
                growth(bridge).map_or_else(|| "n/a".to_owned(), |g| format!("{:+.1}%", g * 100.0));
            Some(format!(
                "{f:.1} ms vs {e:.1} ms ({:+.1}%; bridge {bridge})",
                (f / e - 1.0) * 100.0
            ))
        }),
        pass: growth(hypha).map(|g| g <= TARGET_NODE_SIZE_GROWTH),
    });
    Report {
        bench: "cni",
        machine: Machine {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned()),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            timestamp_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        },
        settings: *o,
        setups,
        targets,
        errors,
    }
}

fn burst_30(s: &SetupReport) -> Option<BurstMedian> {
    s.burst_medians.iter().find(|b| b.size == 30).copied()
}

/// "Hypha's `what` no slower than bridge's": the ratio hypha / bridge at most 1.0.
fn ratio_target(what: &str, hypha: Option<f64>, bridge: Option<f64>) -> super::Target {
    let both = hypha.zip(bridge).filter(|&(_, b)| b > 0.0);
    super::Target {
        goal: format!("{what}: hypha / bridge <= {TARGET_RATIO_TO_BRIDGE:.1}"),
        measured: both.map(|(h, b)| format!("{h:.1} ms vs {b:.1} ms (x{:.2})", h / b)),
        pass: both.map(|(h, b)| h / b <= TARGET_RATIO_TO_BRIDGE),
    }
}

fn node_size_report(pods: u32, samples: NodeSize) -> NodeSizeReport {
    let p50 = |v: &[f64]| median(v.iter().copied());
    let (empty_add, full_add) = (p50(&samples.empty_add_ms), p50(&samples.full_add_ms));
    NodeSizeReport {
        pods,
        empty_add_p50_ms: empty_add,
        full_add_p50_ms: full_add,
        add_growth: empty_add
            .zip(full_add)
            .filter(|&(e, _)| e > 0.0)
            .map(|(e, f)| f / e - 1.0),
        empty_del_p50_ms: p50(&samples.empty_del_ms),
        full_del_p50_ms: p50(&samples.full_del_ms),
        agent_rss: samples.rss,
        samples,
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "n/a".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.1}"))
}

fn print_table(r: &Report) {
    println!();
    println!(
        "| setup | ADD p50 ms | ADD p99 ms | DEL p50 ms | DEL p99 ms | burst 10 ADD wall ms | burst 30 ADD wall ms | burst 30 DEL wall ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for s in &r.setups {
        let b = |size: usize| s.burst_medians.iter().find(|b| b.size == size).copied();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            s.name,
            ms(s.sequential.add_p50_ms),
            ms(s.sequential.add_p99_ms),
            ms(s.sequential.del_p50_ms),
            ms(s.sequential.del_p99_ms),
            ms(b(10).and_then(|b| b.add_wall_ms)),
            ms(b(30).and_then(|b| b.add_wall_ms)),
            ms(b(30).and_then(|b| b.del_wall_ms)),
        );
    }
    println!();
    let n = r.settings.node_size;
    println!(
        "| setup | pods on the full node | ADD p50 ms, empty | ADD p50 ms, {n}th pod | ADD growth | DEL p50 ms, empty | DEL p50 ms, full | agent RSS MiB: 0 / {n} / 0 endpoints (after DEL) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for s in &r.setups {
        let ns = &s.node_size;
        let rss = ns.agent_rss.map_or_else(
            || "n/a".to_owned(),
            |r| {
                format!(
                    "{} / {} / {}",
                    mib(r.empty_kib),
                    mib(r.full_kib),
                    mib(r.drained_kib)
                )
            },
        );
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {rss} |",
            s.name,
            ns.samples.filled + 1,
            ms(ns.empty_add_p50_ms),
            ms(ns.full_add_p50_ms),
            ns.add_growth
                .map_or_else(|| "n/a".to_owned(), |g| format!("{:+.1}%", g * 100.0)),
            ms(ns.empty_del_p50_ms),
            ms(ns.full_del_p50_ms),
        );
    }
    println!();
    super::print_targets("Targets:", &r.targets);
}

fn chart(r: &Report) -> String {
    let series: Vec<Series> = r
        .setups
        .iter()
        .map(|s| match s.name {
            "hypha" => Series::new("hypha", "#2a9d8f"),
            name => Series::new(name, "#8d99ae"),
        })
        .collect();
    let sequential = BarChart {
        title: format!(
            "Sequential, {} pods each (ms, lower is better)",
            r.settings.adds
        ),
        unit: "ms".into(),
        categories: vec![
            "ADD p50".into(),
            "ADD p99".into(),
            "DEL p50".into(),
            "DEL p99".into(),
        ],
        series: series
            .iter()
            .map(|s| Series::new(&s.name, &s.color))
            .collect(),
        values: vec![
            r.setups.iter().map(|s| s.sequential.add_p50_ms).collect(),
            r.setups.iter().map(|s| s.sequential.add_p99_ms).collect(),
            r.setups.iter().map(|s| s.sequential.del_p50_ms).collect(),
            r.setups.iter().map(|s| s.sequential.del_p99_ms).collect(),
        ],
        decimals: 1,
    };
    let burst_value = |size: usize, add: bool| -> Vec<Option<f64>> {
        r.setups
            .iter()
            .map(|s| {
                s.burst_medians
                    .iter()
                    .find(|b| b.size == size)
                    .and_then(|b| if add { b.add_wall_ms } else { b.del_wall_ms })
            })
            .collect()
    };
    let bursts = BarChart {
        title: format!(
            "Concurrent bursts, median of {} rounds (ms until the last answer)",
            r.settings.rounds
        ),
        unit: "ms".into(),
        categories: vec![
            "10 ADDs".into(),
            "30 ADDs".into(),
            "10 DELs".into(),
            "30 DELs".into(),
        ],
        series: series
            .iter()
            .map(|s| Series::new(&s.name, &s.color))
            .collect(),
        values: vec![
            burst_value(10, true),
            burst_value(30, true),
            burst_value(10, false),
            burst_value(30, false),
        ],
        decimals: 0,
    };
    let n = r.settings.node_size;
    let node = BarChart {
        title: format!(
            "Node size: 1st pod vs {n}th, p50 of {} probes (ms)",
            r.settings.probes
        ),
        unit: "ms".into(),
        categories: vec![
            "ADD, empty".into(),
            format!("ADD, {n}th"),
            "DEL, empty".into(),
            format!("DEL, {n}th"),
        ],
        series,
        values: vec![
            r.setups
                .iter()
                .map(|s| s.node_size.empty_add_p50_ms)
                .collect(),
            r.setups
                .iter()
                .map(|s| s.node_size.full_add_p50_ms)
                .collect(),
            r.setups
                .iter()
                .map(|s| s.node_size.empty_del_p50_ms)
                .collect(),
            r.setups
                .iter()
                .map(|s| s.node_size.full_del_p50_ms)
                .collect(),
        ],
        decimals: 1,
    };
    let (w, h) = (1500.0, 420.0);
    svg::document(
        w,
        h + 60.0,
        "CNI ADD and DEL latency: hypha-cni vs bridge + host-local",
        &format!(
            "kernel {}, {} CPUs; each call a new plugin process as a runtime makes it",
            r.machine.kernel, r.machine.nproc
        ),
        &[
            svg::bars(&sequential, 0.0, 60.0, w / 3.0, h),
            svg::bars(&bursts, w / 3.0, 60.0, w / 3.0, h),
            svg::bars(&node, 2.0 * w / 3.0, 60.0, w / 3.0, h),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::{NodeSize, node_size_report, percentile, ratio_target};

    #[test]
    fn ratio_targets_compare_with_bridge() {
        let t = ratio_target("ADD p50", Some(10.0), Some(12.5));
        assert_eq!(t.pass, Some(true));
        assert_eq!(t.measured.as_deref(), Some("10.0 ms vs 12.5 ms (x0.80)"));
        assert_eq!(ratio_target("x", Some(10.0), Some(10.0)).pass, Some(true));
        assert_eq!(ratio_target("x", Some(10.1), Some(10.0)).pass, Some(false));
        assert_eq!(ratio_target("x", None, Some(10.0)).pass, None);
        assert_eq!(ratio_target("x", Some(1.0), Some(0.0)).pass, None);
    }

    #[test]
    fn node_size_growth_is_of_the_medians() {
        let samples = NodeSize {
            empty_add_ms: vec![10.0, 11.0, 50.0, 9.0],
            full_add_ms: vec![12.0, 100.0, 11.0],
            ..NodeSize::default()
        };
        let r = node_size_report(250, samples);
        assert_eq!(r.empty_add_p50_ms, Some(10.5));
        assert_eq!(r.full_add_p50_ms, Some(12.0));
        let growth = r.add_growth.expect("growth");
        assert!((growth - (12.0 / 10.5 - 1.0)).abs() < 1e-12);
        assert_eq!(node_size_report(250, NodeSize::default()).add_growth, None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
