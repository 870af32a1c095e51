//! `overlay-bench`: the driver of `cargo xtask bench cluster` (issue 13's benchmark). A
//! binary of hypha-tests because setup (c) is the cluster harness
//! (`hypha_tests::cluster`), which speaks to etcd through hypha-cluster, which xtask must
//! not depend on.
//!
//! Between two simulated nodes, side by side in one run and interleaved (rounds of a, b,
//! c, a, b, c, ..., who goes first rotating), for each of the setups of [`setups`]:
//!
//! - TCP throughput with iperf3, one stream and `--streams` (default 4) parallel ones,
//!   `--seconds` each, with the system's busy CPU from `/proc/stat` over each run and
//!   over a second before it (the background; this machine is shared), so the run's own
//!   cost per Gbit/s;
//! - 1-byte TCP request/response latency for `--seconds`: p50, p99.
//!
//! The raw report (every round of every setup) goes to `--out` as JSON; xtask computes
//! the medians, ratios and targets and draws the chart. It is written also when a setup
//! failed (its error inside). Everything made is removed on exit, also on error, panic or
//! SIGINT/SIGTERM (checked between measurements).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

mod measure;
mod setups;

use measure::{Peers, Pin};
use setups::{HyphaSetup, KernelSetup};

/// Every setup, in measuring order: (a), (b), (c), then (b) without Flannel's masquerade
/// rule (not measured unless asked for).
const SETUPS: [&str; 4] = ["underlay", "kernel-vxlan", "hypha", "kernel-vxlan-bare"];
/// The setups measured by default.
const DEFAULT_SETUPS: [&str; 3] = ["underlay", "kernel-vxlan", "hypha"];

fn describe(setup: &str) -> &'static str {
    match setup {
        "underlay" => "(a) the two node namespaces directly over the underlay (the limit)",
        "kernel-vxlan" => {
            "(b) pods behind a Flannel-style kernel VXLAN overlay (static FDB, neighbour and route entries; Flannel's masquerade rule, so conntrack runs as on a Flannel node; no eBPF)"
        }
        "kernel-vxlan-bare" => {
            "(b') the kernel VXLAN overlay of (b) without any nftables rule (no conntrack)"
        }
        _ => "(c) pods on two Hypha nodes (cluster mode, VXLAN tunnel, hypha-cni)",
    }
}

struct Settings {
    setups: Vec<String>,
    rounds: u32,
    seconds: u32,
    streams: u32,
    latency_pin: Pin,
    out: PathBuf,
    quick: bool,
}

impl Settings {
    fn parse() -> Result<Settings> {
        let mut args: BTreeMap<String, String> = BTreeMap::new();
        let mut quick = false;
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                "-h" | "--help" => {
                    println!(
                        "overlay-bench [--quick] [--setups underlay,kernel-vxlan,hypha,kernel-vxlan-bare] [--rounds N] [--seconds N] [--streams N] [--latency-pin same|split|none] [--out FILE]"
                    );
                    std::process::exit(0);
                }
                flag if flag.starts_with("--") => {
                    let value = it.next().with_context(|| format!("{flag} needs a value"))?;
                    args.insert(flag.trim_start_matches("--").to_owned(), value);
                }
                other => bail!("unexpected argument {other}"),
            }
        }
        let number = |name: &str, full: u32, quick_value: u32, max: u32| -> Result<u32> {
            let n = match args.get(name) {
                Some(v) => v
                    .parse()
                    .with_context(|| format!("--{name} {v}: not a number"))?,
                None if quick => quick_value,
                None => full,
            };
            if !(1..=max).contains(&n) {
                bail!("--{name} {n}: must be 1 to {max}");
            }
            Ok(n)
        };
        let setups: Vec<String> = args
            .get("setups")
            .map(|p| p.split(',').map(str::to_owned).collect())
            .unwrap_or_else(|| DEFAULT_SETUPS.iter().map(|s| s.to_string()).collect());
        for s in &setups {
            if !SETUPS.contains(&s.as_str()) {
                bail!("unknown setup {s} (known: {})", SETUPS.join(", "));
            }
        }
        Ok(Settings {
            rounds: number("rounds", 5, 1, 100)?,
            seconds: number("seconds", 5, 2, 300)?,
            streams: number("streams", 4, 4, 64)?,
            latency_pin: Pin::parse(args.get("latency-pin").map_or("same", String::as_str))?,
            out: args
                .get("out")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("target/bench/cluster-raw.json")),
            setups: SETUPS
                .iter()
                .filter(|s| setups.iter().any(|x| x == *s))
                .map(|s| s.to_string())
                .collect(),
            quick,
        })
    }
}

/// Set by SIGINT or SIGTERM: the bench stops before its next measurement and cleans up
/// on the way out (`Drop`).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

pub(crate) fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// One setup: who talks to whom (when it could be made), its rounds.
struct Setup {
    name: String,
    peers: Option<Peers>,
    /// The client's interface MTU (the pods' for (b) and (c)).
    mtu: Option<u32>,
    error: Option<String>,
    rounds: Vec<Value>,
}

fn main() -> Result<()> {
    let s = Settings::parse()?;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    if !hypha_tests::privileged() {
        bail!("overlay-bench needs root (network namespaces, the agents, pinned maps)");
    }
    let load_before = loadavg();
    let mut errors: Vec<String> = Vec::new();

    // Made here, dropped (everything removed) when main returns, whatever happens.
    let wants = |name: &str| s.setups.iter().any(|x| x == name);
    // (a) and (b') share node namespaces without any nftables rule; (b) has its own,
    // with Flannel's masquerade rule.
    let bare = (wants("underlay") || wants("kernel-vxlan-bare")).then(|| {
        println!("==> setting up an underlay and a kernel VXLAN overlay without nftables rules");
        KernelSetup::create(false).map_err(|e| format!("{e:#}"))
    });
    let flannel = wants("kernel-vxlan").then(|| {
        println!("==> setting up an underlay and a Flannel-style kernel VXLAN overlay");
        KernelSetup::create(true).map_err(|e| format!("{e:#}"))
    });
    let hypha = if wants("hypha") && check_interrupted().is_ok() {
        println!("==> setting up Hypha: etcd and two cluster-mode nodes, a pod on each");
        Some(HyphaSetup::create().map_err(|e| format!("{e:#}")))
    } else {
        None
    };

    let mut setups: Vec<Setup> = Vec::new();
    for name in &s.setups {
        let (peers, error) = match name.as_str() {
            "underlay" | "kernel-vxlan" | "kernel-vxlan-bare" => {
                let made = if name == "kernel-vxlan" {
                    &flannel
                } else {
                    &bare
                };
                match made {
                    Some(Ok(k)) if name == "underlay" => (Some(k.underlay_peers()), None),
                    Some(Ok(k)) => (Some(k.overlay_peers()), None),
                    Some(Err(e)) => (None, Some(e.clone())),
                    None => unreachable!("made when wanted"),
                }
            }
            _ => match &hypha {
                Some(Ok(h)) => (Some(h.peers()), None),
                Some(Err(e)) => (None, Some(e.clone())),
                None => (None, Some("interrupted".to_owned())),
            },
        };
        let ifname = if name == "underlay" { "ul0" } else { "eth0" };
        let mtu = peers
            .as_ref()
            .and_then(|p| setups::mtu_in(&p.client_ns, ifname).ok());
        match (&peers, &error) {
            (Some(p), _) => println!(
                "    {name:<12} {} ({}) -> {} ({}), MTU {}",
                p.client_ip,
                p.client_ns,
                p.server_ip,
                p.server_ns,
                mtu.map_or_else(|| "?".to_owned(), |m| m.to_string())
            ),
            (None, Some(e)) => println!("    {name:<12} FAILED: {e}"),
            (None, None) => {}
        }
        setups.push(Setup {
            name: name.clone(),
            peers,
            mtu,
            error,
            rounds: Vec::new(),
        });
    }

    println!(
        "==> {} rounds: {} s of 1 stream, {} s of {} streams, {} s of latency, setups taking turns",
        s.rounds, s.seconds, s.seconds, s.streams, s.seconds
    );
    let n = setups.len();
    'rounds: for round in 0..s.rounds as usize {
        for k in 0..n {
            if let Err(e) = check_interrupted() {
                errors.push(format!("{e}"));
                break 'rounds;
            }
            let setup = &mut setups[(round + k) % n];
            let Some(peers) = &setup.peers else { continue };
            let value = measure_round(peers, round as u32 + 1, &s);
            println!(
                "    round {}/{} {:<12} {}",
                round + 1,
                s.rounds,
                setup.name,
                summary(&value, s.streams)
            );
            setup.rounds.push(value);
        }
    }

    // Proof that each overlay carried the traffic.
    let mut evidence = json!({});
    for (key, made, wanted) in [
        ("kernel_vxlan_devices", &flannel, wants("kernel-vxlan")),
        (
            "kernel_vxlan_bare_devices",
            &bare,
            wants("kernel-vxlan-bare"),
        ),
    ] {
        if let (Some(Ok(k)), true) = (made, wanted) {
            match k.vxlan_counters() {
                Ok(v) => evidence[key] = v,
                Err(e) => errors.push(format!("reading the kernel VXLAN counters: {e:#}")),
            }
        }
    }
    if let Some(Ok(h)) = &hypha {
        evidence["hypha_routing"] = h.routing();
        match h.tunnel_counters() {
            Ok(v) => {
                let tunnelled = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["egress_tunnel_packets"].as_u64().unwrap_or(0) > 0);
                if !tunnelled && setups.iter().any(|s| !s.rounds.is_empty()) {
                    errors.push(
                        "hypha: no pod counted a packet into the tunnel: the traffic did not take Hypha's overlay".to_owned(),
                    );
                }
                evidence["hypha_pods"] = v;
            }
            Err(e) => errors.push(format!("reading Hypha's tunnel counters: {e:#}")),
        }
    }

    for setup in &setups {
        if let Some(e) = &setup.error {
            errors.push(format!("{}: {e}", setup.name));
        }
        for r in &setup.rounds {
            for e in r["errors"].as_array().into_iter().flatten() {
                errors.push(format!("{} round {}: {}", setup.name, r["round"], e));
            }
        }
    }
    let report = json!({
        "settings": {
            "rounds": s.rounds,
            "seconds": s.seconds,
            "streams": s.streams,
            "latency_pin": s.latency_pin.name(),
            "quick": s.quick,
        },
        "machine": {
            "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        "setups": setups.iter().map(|setup| json!({
            "name": setup.name,
            "description": describe(&setup.name),
            "client": setup.peers.as_ref().map(|p| format!("{} in {}", p.client_ip, p.client_ns)),
            "server": setup.peers.as_ref().map(|p| format!("{} in {}", p.server_ip, p.server_ns)),
            "mtu": setup.mtu,
            "error": setup.error,
            "rounds": setup.rounds,
        })).collect::<Vec<_>>(),
        "evidence": evidence,
        "errors": errors,
    });

    println!("==> cleaning up");
    drop(hypha);
    drop(flannel);
    drop(bare);
    if let Some(dir) = s.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&s.out, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", s.out.display()))?;
    println!("wrote {}", s.out.display());
    if !errors.is_empty() {
        bail!("the bench met errors:\n  {}", errors.join("\n  "));
    }
    Ok(())
}

/// One round of one setup: throughput with one stream and with several (each with its
/// CPU), then latency.
fn measure_round(p: &Peers, round: u32, s: &Settings) -> Value {
    let mut errors = Vec::new();
    let mut value = json!({"round": round});
    for (key, streams) in [("single", 1), ("multi", s.streams)] {
        match measure::throughput(p, streams, s.seconds) {
            Ok(t) => value[key] = t.to_json(),
            Err(e) => errors.push(format!("throughput, {streams} streams: {e:#}")),
        }
    }
    match measure::latency(p, s.seconds, s.latency_pin) {
        Ok(l) => value["latency"] = l.to_json(),
        Err(e) => errors.push(format!("latency: {e:#}")),
    }
    value["errors"] = json!(errors);
    value
}

fn summary(v: &Value, streams: u32) -> String {
    let num = |x: &Value, d: usize| {
        x.as_f64()
            .map_or_else(|| "n/a".to_owned(), |x| format!("{x:.d$}"))
    };
    // Throughput, then %CPU per Gbit/s: the system's (less background) / iperf3's.
    let run = |r: &Value| {
        format!(
            "{:>6} Gbit/s ({:>5}/{:>5} %CPU/Gbit/s)",
            num(&r["gbps"], 2),
            num(&r["cpu_pct_per_gbps"], 1),
            num(&r["cpu_processes_pct_per_gbps"], 1)
        )
    };
    let mut s = format!(
        "{}  x{streams}: {}  p50 {:>6} µs  p99 {:>6} µs",
        run(&v["single"]),
        run(&v["multi"]),
        num(&v["latency"]["p50_us"], 1),
        num(&v["latency"]["p99_us"], 1),
    );
    for e in v["errors"].as_array().into_iter().flatten() {
        s += &format!("\n      FAILED {}", e.as_str().unwrap_or_default());
    }
    s
}

/// The first three fields of /proc/loadavg.
fn loadavg() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}
