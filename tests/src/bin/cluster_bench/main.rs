//! `cluster-bench`: the driver of `cargo xtask bench cluster-control` (issue 12's
//! benchmark). A binary of hypha-tests because it speaks to etcd through hypha-cluster,
//! which xtask must not depend on (protoc is not there before `cargo xtask setup`).
//!
//! Phases (`--phases`, comma-separated; default all):
//!
//! - `convergence` and `identities` (in [`nodes`]): real cluster-mode nodes, pods made
//!   through `hypha-cni`, every node's pinned maps read back: how fast a pod and a policy
//!   reach every node, and concurrent identity allocation.
//! - `store`: 1,000 synthetic nodes and 50,000 synthetic endpoints (with their CIDR
//!   claims and identities) written to a real etcd with `EtcdKv` (write rate), the
//!   control plane's mirror (`hypha_cluster::mirror::run`, what every agent runs) synced
//!   from it (time to its first full batch), then endpoint churn at `--churn-rate` events
//!   per second for `--churn-secs`: the lag from each write to the mirror's delta.
//! - `scale`: the same synthetic cluster, then one agent in cluster mode started against
//!   it: the time until its pinned `hypha_ipcache4` holds every synthetic endpoint, its
//!   RSS, its maps' sizes; then the churn, each sampled event's lag from the write to its
//!   entry appearing in (or leaving) the pinned map.
//!
//! etcd and the agent run in a network namespace of the bench's own (the agent's "node"),
//! etcd on an address of a bridge there; everything is removed on exit, also on panic.
//! The report goes to `--out` as JSON and a summary to stdout.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use aya::maps::lpm_trie::Key;
use aya::maps::{LpmTrie, Map, MapData};
use hypha_cluster::etcd::EtcdKv;
use hypha_cluster::layout::{
    EndpointEntry, IdentityRecord, Labels, Layout, NodeCidrs, NodeRecord, labels_digest, now_ms,
};
use hypha_cluster::mirror::{self, SyncState};
use hypha_cluster::testing::{Etcd, NetnsRuntime};
use hypha_cluster::{KvStore, Op, encode};
use hypha_common::maps;
use hypha_common::{
    IDENTITY_FIRST_CIDR, IDENTITY_FIRST_LABELS, IpcacheValue, PolicyEntry, PolicyKey,
};
use hypha_tests::netns::NamedNetns;
use ipnet::Ipv4Net;
use serde_json::{Value, json};
use tokio::sync::mpsc;

mod nodes;

/// The bench node's address on its underlay bridge (etcd listens there).
const UNDERLAY_IP: &str = "10.250.0.1";
/// Synthetic nodes' pod CIDRs: /24s from here on (10.128.0.0/9: 32,768 of them).
const SYNTHETIC_CLUSTER_CIDR: &str = "10.128.0.0/9";
/// Ops per transaction when writing the synthetic cluster (etcd's --max-txn-ops is 128).
const BATCH: usize = 100;
/// The namespace and label key of synthetic endpoints.
const NAMESPACE: &str = "bench";

/// Every phase, in the order they run by default.
const PHASES: [&str; 4] = ["convergence", "identities", "store", "scale"];

/// The settings.
#[derive(Clone, Debug)]
struct Settings {
    phases: Vec<String>,
    /// Real nodes of the convergence and identities phases.
    cluster_nodes: usize,
    /// Pods of the convergence phase.
    pods: usize,
    /// Policy changes of the convergence phase.
    changes: usize,
    /// Concurrent ADDs per node (each a new label set) of the identities phase.
    id_pods: usize,
    nodes: usize,
    endpoints: usize,
    identities: usize,
    churn_rate: usize,
    churn_secs: u64,
    /// Churn events whose map lag the scale phase samples: one in this many.
    sample_every: usize,
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
                        "cluster-bench [--quick] [--phases convergence,identities,store,scale] [--cluster-nodes N] [--pods N] [--changes N] [--id-pods N] [--nodes N] [--endpoints N] [--identities N] [--churn-rate N] [--churn-secs N] [--out FILE]"
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
        let number = |name: &str, full: usize, quick_value: usize| -> Result<usize> {
            match args.get(name) {
                Some(v) => v
                    .parse()
                    .with_context(|| format!("--{name} {v}: not a number")),
                None => Ok(if quick { quick_value } else { full }),
            }
        };
        let settings = Settings {
            phases: args
                .get("phases")
                .map(|p| p.split(',').map(str::to_owned).collect())
                .unwrap_or_else(|| PHASES.iter().map(|p| p.to_string()).collect()),
            cluster_nodes: number("cluster-nodes", 5, 3)?,
            pods: number("pods", 100, 20)?,
            changes: number("changes", 50, 5)?,
            id_pods: number("id-pods", 20, 5)?,
            nodes: number("nodes", 1000, 100)?,
            endpoints: number("endpoints", 50_000, 2000)?,
            identities: number("identities", 1000, 100)?,
            churn_rate: number("churn-rate", 1000, 1000)?,
            churn_secs: number("churn-secs", 10, 3)? as u64,
            sample_every: number("sample-every", 20, 10)?,
            out: args
                .get("out")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("target/bench/cluster-control.json")),
            quick,
        };
        for phase in &settings.phases {
            if !PHASES.contains(&phase.as_str()) {
                bail!("unknown phase {phase} (known: {})", PHASES.join(", "));
            }
        }
        if settings.nodes == 0 || settings.endpoints == 0 || settings.identities == 0 {
            bail!("--nodes, --endpoints and --identities must be at least 1");
        }
        if settings.endpoints.div_ceil(settings.nodes) > 250 {
            bail!(
                "{} endpoints on {} nodes is over 250 a node (each node has a /24)",
                settings.endpoints,
                settings.nodes
            );
        }
        if settings.nodes > 30_000 {
            bail!("at most 30,000 synthetic nodes (their /24s come from {SYNTHETIC_CLUSTER_CIDR})");
        }
        Ok(settings)
    }
}

/// Set by SIGINT or SIGTERM: the polling loops stop, and everything is cleaned up on
/// the way out (`Drop`).
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn main() -> Result<()> {
    let settings = Settings::parse()?;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    if !hypha_tests::privileged() {
        bail!("cluster-bench needs root (network namespaces, the agent, pinned maps)");
    }
    let mut report = json!({
        "settings": {
            "cluster_nodes": settings.cluster_nodes,
            "pods": settings.pods,
            "changes": settings.changes,
            "id_pods": settings.id_pods,
            "nodes": settings.nodes,
            "endpoints": settings.endpoints,
            "identities": settings.identities,
            "churn_rate": settings.churn_rate,
            "churn_secs": settings.churn_secs,
            "quick": settings.quick,
        },
        "errors": [],
    });
    let mut errors = Vec::new();
    for phase in settings.phases.clone() {
        println!("==> phase {phase}");
        let result = check_interrupted().and_then(|()| match phase.as_str() {
            "convergence" => nodes::convergence_phase(&settings),
            "identities" => nodes::identities_phase(&settings),
            "store" => store_phase(&settings),
            "scale" => scale_phase(&settings),
            _ => unreachable!("checked in Settings::parse"),
        });
        match result {
            Ok(value) => report[phase.as_str()] = value,
            Err(e) => {
                println!("    phase {phase} failed: {e:#}");
                errors.push(format!("{phase}: {e:#}"));
            }
        }
    }
    report["errors"] = json!(errors);
    if let Some(dir) = settings.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&settings.out, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", settings.out.display()))?;
    println!("wrote {}", settings.out.display());
    if !errors.is_empty() {
        bail!("the bench met errors:\n  {}", errors.join("\n  "));
    }
    Ok(())
}

/// The bench's node namespace with its underlay bridge, and etcd in it.
struct Underlay {
    // Field order is drop order: etcd goes before its namespace.
    etcd: Etcd,
    rt: NetnsRuntime,
    netns: NamedNetns,
}

impl Underlay {
    fn start() -> Result<Underlay> {
        let netns = NamedNetns::new("hcb");
        netns.exec(&["ip", "link", "add", "underlay", "type", "bridge"]);
        netns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{UNDERLAY_IP}/24"),
            "dev",
            "underlay",
        ]);
        netns.exec(&["ip", "link", "set", "underlay", "up"]);
        let etcd = Etcd::start(Some(netns.name()), UNDERLAY_IP.parse()?)
            .context("starting etcd in the bench's namespace")?;
        let rt = NetnsRuntime::new(netns.name())?;
        Ok(Underlay { etcd, rt, netns })
    }

    fn store(&self) -> Result<Arc<EtcdKv>> {
        let endpoints = self.etcd.endpoints();
        let store = self
            .rt
            .run(async move { EtcdKv::connect(&endpoints, None).await })?;
        Ok(Arc::new(store))
    }
}

/// The synthetic cluster: which keys it wrote, for the churn.
struct Synthetic {
    layout: Layout,
    /// The synthetic endpoints' addresses and identities, in the order written.
    endpoints: Vec<(String, EndpointEntry)>,
    write_secs: f64,
    keys: usize,
}

/// Node `i`'s pod CIDR.
fn node_cidr(i: usize) -> Ipv4Net {
    let base: Ipv4Net = SYNTHETIC_CLUSTER_CIDR.parse().expect("valid");
    let first = u32::from(base.network()) + ((i as u32) << 8);
    Ipv4Net::new(Ipv4Addr::from(first), 24).expect("a /24")
}

fn identity_labels(k: usize) -> Labels {
    [("app".to_owned(), format!("app-{k}"))].into()
}

/// Writes `nodes` nodes (records under one lease, CIDRs and claims), `identities`
/// identities and `endpoints` endpoints spread evenly over the nodes.
fn write_synthetic(u: &Underlay, store: &Arc<EtcdKv>, s: &Settings) -> Result<Synthetic> {
    let layout = Layout::default();
    let mut ops: Vec<Op> = Vec::new();
    let lease = {
        let store = store.clone();
        u.rt.run(async move { store.grant_lease(Duration::from_secs(3600)).await })?
    };
    for i in 0..s.nodes {
        let name = format!("synth-{i:05}");
        let cidr = node_cidr(i);
        let record = NodeRecord {
            name: name.clone(),
            uid: format!("uid-{i}"),
            addresses: vec![IpAddr::V4(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(10, 251, 0, 0)) + i as u32,
            ))],
            pod_cidr: Some(cidr),
            pod_cidr6: None,
            version: "bench".to_owned(),
            heartbeat_ms: now_ms(),
        };
        ops.push(Op::Put {
            key: layout.node(&name),
            value: encode(&record),
            lease: Some(lease),
        });
        ops.push(Op::put(
            layout.node_cidrs(&name),
            encode(&NodeCidrs {
                v4: Some(cidr),
                v6: None,
                addresses: Vec::new(),
            }),
        ));
        ops.push(Op::put(layout.cidr_claim(cidr.into()), name.into_bytes()));
    }
    for k in 0..s.identities {
        let labels = identity_labels(k);
        let id = 256 + k as u32;
        ops.push(Op::put(
            layout.identity(id),
            encode(&IdentityRecord {
                namespace: NAMESPACE.to_owned(),
                labels: labels.clone(),
                unused_since_ms: None,
            }),
        ));
        ops.push(Op::put(
            format!(
                "{}{}",
                layout.identities_by_labels(),
                labels_digest(NAMESPACE, &labels)
            ),
            id.to_string().into_bytes(),
        ));
    }
    let mut endpoints = Vec::with_capacity(s.endpoints);
    for e in 0..s.endpoints {
        let node = e % s.nodes;
        let slot = e / s.nodes;
        let name = format!("synth-{node:05}");
        let address = Ipv4Addr::from(u32::from(node_cidr(node).network()) + 2 + slot as u32);
        let k = e % s.identities;
        let entry = EndpointEntry {
            node: name.clone(),
            address: Some(address),
            address6: None,
            identity: 256 + k as u32,
            namespace: NAMESPACE.to_owned(),
            labels: identity_labels(k),
            ports: Vec::new(),
        };
        let key = layout.endpoint(&name, &format!("synth-{e:06}"), "eth0");
        ops.push(Op::put(key.clone(), encode(&entry)));
        endpoints.push((key, entry));
    }
    let keys = ops.len();
    let started = Instant::now();
    let store2 = store.clone();
    u.rt.run(async move {
        for chunk in ops.chunks(BATCH) {
            store2.txn(Vec::new(), chunk.to_vec(), Vec::new()).await?;
        }
        Ok::<_, hypha_cluster::StoreError>(())
    })?;
    let write_secs = started.elapsed().as_secs_f64();
    println!(
        "    wrote {} nodes, {} identities, {} endpoints ({keys} keys) in {write_secs:.2} s ({:.0} keys/s)",
        s.nodes,
        s.identities,
        s.endpoints,
        keys as f64 / write_secs
    );
    Ok(Synthetic {
        layout,
        endpoints,
        write_secs,
        keys,
    })
}

/// One churn event: an endpoint removed, or put back.
#[derive(Clone, Debug)]
struct ChurnEvent {
    key: String,
    address: Ipv4Addr,
    identity: u32,
    /// Put (true) or delete (false).
    present: bool,
    /// When the transaction carrying it was sent.
    sent: Instant,
}

/// Churn: every tick of 10 ms one transaction of `rate / 100` events, for `secs`; the
/// events walk the synthetic endpoints, deleting each then putting it back. Returns the
/// events with their send times and the rate achieved.
async fn churn(
    store: Arc<EtcdKv>,
    endpoints: Arc<Vec<(String, EndpointEntry)>>,
    rate: usize,
    secs: u64,
    on_event: mpsc::UnboundedSender<ChurnEvent>,
) -> Result<(usize, f64)> {
    let per_tick = rate.div_ceil(100).max(1);
    let ticks = secs * 100;
    let mut interval = tokio::time::interval(Duration::from_millis(10));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut sent = 0usize;
    let mut cursor = 0usize;
    for _ in 0..ticks {
        interval.tick().await;
        let mut ops = Vec::with_capacity(per_tick);
        let mut events = Vec::with_capacity(per_tick);
        for _ in 0..per_tick {
            // Pass 0 deletes endpoints in order, pass 1 puts them back, and so on.
            let pass = cursor / endpoints.len();
            let (key, entry) = &endpoints[cursor % endpoints.len()];
            cursor += 1;
            let present = pass % 2 == 1;
            ops.push(if present {
                Op::put(key.clone(), encode(entry))
            } else {
                Op::Delete(key.clone())
            });
            events.push((
                key.clone(),
                entry.address.expect("v4"),
                entry.identity,
                present,
            ));
        }
        let when = Instant::now();
        store
            .txn(Vec::new(), ops, Vec::new())
            .await
            .context("churn write")?;
        for (key, address, identity, present) in events {
            let _ = on_event.send(ChurnEvent {
                key,
                address,
                identity,
                present,
                sent: when,
            });
        }
        sent += per_tick;
    }
    Ok((sent, sent as f64 / started.elapsed().as_secs_f64()))
}

fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

fn lag_summary(lags_ms: &[f64]) -> Value {
    json!({
        "samples": lags_ms.len(),
        "p50_ms": percentile(lags_ms, 50.0),
        "p99_ms": percentile(lags_ms, 99.0),
        "max_ms": percentile(lags_ms, 100.0),
    })
}

/// The store phase: the synthetic cluster written, the mirror synced from it, churn seen
/// by the mirror.
fn store_phase(s: &Settings) -> Result<Value> {
    let u = Underlay::start()?;
    let store = u.store()?;
    let synth = write_synthetic(&u, &store, s)?;

    // The mirror every agent runs, over the whole prefix.
    let (tx, mut rx) = mpsc::channel::<mirror::Update>(64);
    let state = Arc::new(Mutex::new(SyncState::default()));
    let started = Instant::now();
    {
        let store: Arc<dyn KvStore> = store.clone();
        let prefix = synth.layout.prefix().to_owned();
        let state = state.clone();
        u.rt.handle().spawn(mirror::run(store, prefix, tx, state));
    }
    let first = u.rt.run(async move {
        let first = tokio::time::timeout(Duration::from_secs(120), rx.recv()).await;
        (first, rx)
    });
    let (first, mut rx) = first;
    let first = first
        .context("the mirror did not sync within 120 s")?
        .context("the mirror ended")?;
    let sync_secs = started.elapsed().as_secs_f64();
    println!(
        "    mirror synced {} keys in {sync_secs:.3} s (resync batch: {})",
        first.deltas.len(),
        first.resync
    );
    if first.deltas.len() < synth.keys {
        bail!(
            "the mirror's first batch has {} keys, {} written",
            first.deltas.len(),
            synth.keys
        );
    }

    // Churn, each event's lag to the mirror's delta.
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let endpoints = Arc::new(synth.endpoints.clone());
    let churn_task = u.rt.handle().spawn(churn(
        store.clone(),
        endpoints,
        s.churn_rate,
        s.churn_secs,
        ev_tx,
    ));
    let total_expected = s.churn_rate.div_ceil(100).max(1) * s.churn_secs as usize * 100;
    let lags = u.rt.run(async move {
        let mut pending: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
        let mut seen: Vec<(String, Instant)> = Vec::new();
        let mut lags = Vec::new();
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(s_churn_deadline(total_expected));
        while lags.len() < total_expected {
            if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            tokio::select! {
                ev = ev_rx.recv() => {
                    let Some(ev) = ev else { continue };
                    pending.entry(ev.key).or_default().push(ev.sent);
                }
                update = rx.recv() => {
                    let Some(update) = update else { break };
                    let now = Instant::now();
                    for d in update.deltas {
                        seen.push((d.key().to_owned(), now));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break,
            }
            // Match deltas to the events sent (a delta may arrive before its send time
            // is recorded: the channel of events is filled after the txn returns).
            seen.retain(|(key, at)| match pending.get_mut(key) {
                Some(sent) if !sent.is_empty() => {
                    let t = sent.remove(0);
                    lags.push(at.saturating_duration_since(t).as_secs_f64() * 1000.0);
                    false
                }
                _ => true,
            });
        }
        lags
    });
    if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
        churn_task.abort();
        check_interrupted()?;
    }
    let (sent, achieved) = u.rt.run(churn_task).context("the churn task panicked")??;
    let summary = lag_summary(&lags);
    println!(
        "    churn: {sent} events at {achieved:.0}/s; mirror lag p50 {:.1} ms, p99 {:.1} ms ({} matched)",
        summary["p50_ms"].as_f64().unwrap_or(f64::NAN),
        summary["p99_ms"].as_f64().unwrap_or(f64::NAN),
        lags.len()
    );
    Ok(json!({
        "keys_written": synth.keys,
        "write_secs": synth.write_secs,
        "write_keys_per_sec": synth.keys as f64 / synth.write_secs,
        "mirror_sync_secs": sync_secs,
        "mirror_sync_keys": first.deltas.len(),
        "churn_events": sent,
        "churn_rate_achieved": achieved,
        "churn_lag": summary,
    }))
}

/// Seconds to wait for the churn to be seen: its length plus slack.
fn s_churn_deadline(events: usize) -> u64 {
    30 + events as u64 / 100
}

/// An agent in cluster mode in the underlay's namespace.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    pin_dir: PathBuf,
}

impl Agent {
    fn start(u: &Underlay, name: &str) -> Result<Agent> {
        let dir = tempfile::Builder::new()
            .prefix("hypha-cluster-bench-")
            .tempdir()?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", u.netns.name()));
        let log = File::create(dir.path().join("agent.log"))?;
        let hypha = sibling_binary("hypha")?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", u.netns.path().display()))
            .arg(&hypha)
            .arg("agent")
            .arg("--socket")
            .arg(dir.path().join("agent.sock"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--policy-dir")
            .arg(dir.path().join("policies"))
            .args(["--cluster-store", &format!("etcd={}", u.etcd.url())])
            .args(["--node-name", name, "--node-ip", UNDERLAY_IP])
            .args([
                "--cluster-cidr",
                SYNTHETIC_CLUSTER_CIDR,
                "--node-cidr-size",
                "24",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", hypha.display()))?;
        Ok(Agent {
            child,
            dir,
            pin_dir,
        })
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails (with its log) if the agent exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the agent exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }

    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    fn ipcache(&self) -> Result<LpmTrie<MapData, u32, IpcacheValue>> {
        let path = self.pin_dir.join(maps::IPCACHE4);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        LpmTrie::try_from(Map::LpmTrie(data)).context("hypha_ipcache4 is an LPM trie")
    }

    /// How many entries the pinned `hypha_policy` holds.
    fn policy_entries(&self) -> Result<usize> {
        let path = self.pin_dir.join(maps::POLICY);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let map: aya::maps::HashMap<MapData, PolicyKey, PolicyEntry> =
            aya::maps::HashMap::try_from(Map::HashMap(data))
                .context("hypha_policy is a hash map")?;
        Ok(map.keys().filter(Result::is_ok).count())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Err(e) = std::fs::remove_dir_all(&self.pin_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cannot remove {}: {e}", self.pin_dir.display());
        }
    }
}

/// The hypha binary next to this one (target/<profile>/).
fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .map(|d| d.join(name))
        .context("the bench's directory")?;
    if !bin.exists() {
        bail!("{} is missing: build the binaries first", bin.display());
    }
    Ok(bin)
}

/// The label identity `map` gives `address`, if any. A lookup in an LPM trie answers
/// with the longest prefix holding the address, so an address without an entry of its
/// own still matches `0.0.0.0/0` (world) or a CIDR; only a label identity (256 to 2^24)
/// is an endpoint's.
fn label_identity(map: &LpmTrie<MapData, u32, IpcacheValue>, address: Ipv4Addr) -> Option<u32> {
    let key = Key::new(32, u32::from_ne_bytes(address.octets()));
    map.get(&key, 0)
        .ok()
        .map(|v| v.identity)
        .filter(|id| (IDENTITY_FIRST_LABELS..IDENTITY_FIRST_CIDR).contains(id))
}

/// Entries of the ipcache that are synthetic endpoints' /32s (in the synthetic CIDR).
fn synthetic_entries(map: &LpmTrie<MapData, u32, IpcacheValue>) -> usize {
    let cidr: Ipv4Net = SYNTHETIC_CLUSTER_CIDR.parse().expect("valid");
    map.iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| {
            k.prefix_len() == 32 && cidr.contains(&Ipv4Addr::from(k.data().to_ne_bytes()))
        })
        .count()
}

fn scale_phase(s: &Settings) -> Result<Value> {
    let u = Underlay::start()?;
    let store = u.store()?;
    let synth = write_synthetic(&u, &store, s)?;

    println!("    starting one agent in cluster mode");
    let started = Instant::now();
    let mut agent = Agent::start(&u, "bench-node")?;
    // Its API first: it must run in cluster mode.
    let client = hypha_api::Client::new(agent.dir.path().join("agent.sock"))?
        .with_timeout(Duration::from_secs(5));
    let status = loop {
        agent.check_alive()?;
        check_interrupted()?;
        if let Ok(status) = client.status() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the agent did not answer within 60 s:\n{}",
                agent.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let api_secs = started.elapsed().as_secs_f64();
    if status.cluster.is_none() {
        bail!(
            "the agent runs but not in cluster mode (its status has no cluster section):\n{}",
            agent.log_tail()
        );
    }
    // The map is pinned once the agent has loaded its programs.
    let map = loop {
        agent.check_alive()?;
        check_interrupted()?;
        if let Ok(map) = agent.ipcache() {
            break map;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("no pinned ipcache after 60 s:\n{}", agent.log_tail());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Cheap probe first (the last endpoint written), then the full count.
    let last = synth
        .endpoints
        .last()
        .and_then(|(_, e)| e.address)
        .expect("endpoints");
    let mut polls = 0;
    let sync_secs = loop {
        agent.check_alive()?;
        check_interrupted()?;
        if label_identity(&map, last).is_some() {
            polls += 1;
            let count = synthetic_entries(&map);
            if count >= s.endpoints {
                break started.elapsed().as_secs_f64();
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the agent's ipcache holds {} of {} synthetic endpoints after 120 s:\n{}",
                synthetic_entries(&map),
                s.endpoints,
                agent.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let rss = agent.rss_kib();
    let ipcache_total = map.iter().count();
    let policy_entries = agent.policy_entries().ok();
    println!(
        "    full sync in {sync_secs:.3} s from its start (its API answered after {api_secs:.3} s; {polls} full counts), RSS {} MiB, ipcache {ipcache_total} entries",
        rss.map(|k| format!("{:.1}", k as f64 / 1024.0))
            .unwrap_or_else(|| "?".into())
    );

    // Churn, a sample of events timed into the map.
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let endpoints = Arc::new(synth.endpoints.clone());
    let churn_task = u.rt.handle().spawn(churn(
        store.clone(),
        endpoints,
        s.churn_rate,
        s.churn_secs,
        ev_tx,
    ));
    let mut lags = Vec::new();
    let mut missed = 0usize;
    let mut n = 0usize;
    let churn_started = Instant::now();
    let mut watching: Vec<ChurnEvent> = Vec::new();
    loop {
        while let Ok(ev) = ev_rx.try_recv() {
            n += 1;
            if n.is_multiple_of(s.sample_every) {
                watching.push(ev);
            }
        }
        let now = Instant::now();
        watching.retain(|ev| {
            let done = match label_identity(&map, ev.address) {
                Some(id) => ev.present && id == ev.identity,
                None => !ev.present,
            };
            if done {
                lags.push(now.saturating_duration_since(ev.sent).as_secs_f64() * 1000.0);
                return false;
            }
            if now.saturating_duration_since(ev.sent) > Duration::from_secs(30) {
                missed += 1;
                return false;
            }
            true
        });
        if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
            churn_task.abort();
            check_interrupted()?;
        }
        if churn_task.is_finished() && watching.is_empty() && ev_rx.is_empty() {
            break;
        }
        if churn_started.elapsed() > Duration::from_secs(s.churn_secs + 60) {
            missed += watching.len();
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let (sent, achieved) = u.rt.run(churn_task).context("the churn task panicked")??;
    let rss_after = agent.rss_kib();
    agent.check_alive()?;
    let summary = lag_summary(&lags);
    println!(
        "    churn: {sent} events at {achieved:.0}/s; map lag p50 {:.1} ms, p99 {:.1} ms ({} sampled, {missed} never seen)",
        summary["p50_ms"].as_f64().unwrap_or(f64::NAN),
        summary["p99_ms"].as_f64().unwrap_or(f64::NAN),
        lags.len()
    );
    Ok(json!({
        "keys_written": synth.keys,
        "write_secs": synth.write_secs,
        "api_ready_secs": api_secs,
        "full_sync_secs": sync_secs,
        "rss_kib": rss,
        "rss_after_churn_kib": rss_after,
        "ipcache4_entries": ipcache_total,
        "policy_entries": policy_entries,
        "churn_events": sent,
        "churn_rate_achieved": achieved,
        "churn_lag": summary,
        "churn_missed": missed,
    }))
}
