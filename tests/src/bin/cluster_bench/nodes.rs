//! The phases with real nodes: a cluster of cluster-mode agents (hypha_tests::cluster),
//! pods made through `hypha-cni`, and what every node's pinned maps say.
//!
//! - `convergence`: pods added one at a time, round robin over the nodes; for each, the
//!   time from its CNI ADD returning until its address is in every other node's
//!   `hypha_ipcache4`. Then policy changes applied with `hypha policy apply` on the nodes
//!   in turn (each allowing another port); for each, the time from the command returning
//!   until every node's `hypha_policy` holds entries for that port.
//! - `identities`: on every node at once, `--id-pods` concurrent ADDs, pod k of each node
//!   with the same new label set; the wall time, then every node's ipcache read back: one
//!   identity per label set on every node, never one for two label sets.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::maps::{HashMap, LpmTrie, Map, MapData};
use hypha_common::{IpcacheValue, PolicyEntry, PolicyKey, maps};
use hypha_tests::cluster::{Cluster, ClusterOpts};
use hypha_tests::node::Pod;
use serde_json::{Value, json};

use super::{NAMESPACE, Settings, check_interrupted, label_identity, lag_summary};

/// How long a change may take to reach every node before it counts as missed.
const CONVERGE_LIMIT: Duration = Duration::from_secs(10);

fn open_ipcache(pin_dir: &Path) -> Result<LpmTrie<MapData, u32, IpcacheValue>> {
    let path = pin_dir.join(maps::IPCACHE4);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    LpmTrie::try_from(Map::LpmTrie(data)).context("hypha_ipcache4 is an LPM trie")
}

fn open_policy(pin_dir: &Path) -> Result<HashMap<MapData, PolicyKey, PolicyEntry>> {
    let path = pin_dir.join(maps::POLICY);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    HashMap::try_from(Map::HashMap(data)).context("hypha_policy is a hash map")
}

fn add_pod(cluster: &Cluster, node: usize, name: &str, labels: &[(&str, &str)]) -> Result<Pod> {
    cluster.nodes[node]
        .try_add_labelled_pod(name, NAMESPACE, labels)
        .map_err(|run| {
            anyhow!(
                "CNI ADD of {name} on node {node} failed: {}{}",
                run.stdout,
                run.stderr
            )
        })
}

/// Polls `done` every 200 µs; the time it took, or None after [`CONVERGE_LIMIT`].
fn time_until(start: Instant, mut done: impl FnMut() -> bool) -> Option<f64> {
    loop {
        if done() {
            return Some(start.elapsed().as_secs_f64() * 1000.0);
        }
        if start.elapsed() > CONVERGE_LIMIT {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn policy_yaml(port: u32) -> String {
    format!(
        "apiVersion: hypha.dev/v1\nkind: HyphaNetworkPolicy\nmetadata: {{name: bench-converge, namespace: {NAMESPACE}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: conv}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: conv}}}}]\n    toPorts: [{{ports: [{{port: \"{port}\", protocol: TCP}}]}}]\n"
    )
}

pub fn convergence_phase(s: &Settings) -> Result<Value> {
    println!("    starting {} cluster-mode nodes", s.cluster_nodes);
    let cluster = Cluster::start(s.cluster_nodes, ClusterOpts::default());
    let n = cluster.nodes.len();
    let ipcaches = cluster
        .nodes
        .iter()
        .map(|node| open_ipcache(&node.pin_dir))
        .collect::<Result<Vec<_>>>()?;

    let mut pods = Vec::new();
    let mut pod_lags = Vec::new();
    let mut pod_missed = 0;
    for k in 0..s.pods {
        check_interrupted()?;
        let origin = k % n;
        let pod = add_pod(&cluster, origin, &format!("cv{k}"), &[("app", "conv")])?;
        let added = Instant::now();
        // Its identity, as its own node has it once the ADD returned.
        let identity = label_identity(&ipcaches[origin], pod.address).with_context(|| {
            format!(
                "pod {k} ({}) is not in its own node's ipcache after its ADD",
                pod.address
            )
        })?;
        let lag = time_until(added, || {
            ipcaches
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != origin)
                .all(|(_, map)| label_identity(map, pod.address) == Some(identity))
        });
        match lag {
            Some(ms) => pod_lags.push(ms),
            None => pod_missed += 1,
        }
        pods.push(pod);
    }
    let pods_summary = lag_summary(&pod_lags);
    println!(
        "    pod → every other node's ipcache: p50 {:.1} ms, p99 {:.1} ms over {} pods ({pod_missed} missed)",
        pods_summary["p50_ms"].as_f64().unwrap_or(f64::NAN),
        pods_summary["p99_ms"].as_f64().unwrap_or(f64::NAN),
        pod_lags.len()
    );

    let policies = cluster
        .nodes
        .iter()
        .map(|node| open_policy(&node.pin_dir))
        .collect::<Result<Vec<_>>>()?;
    let dir = tempfile::Builder::new()
        .prefix("hypha-cluster-bench-policy-")
        .tempdir()?;
    let file = dir.path().join("policy.yaml");
    let file_arg = file.to_str().context("a temp path that is not UTF-8")?;
    let mut policy_lags = Vec::new();
    let mut policy_missed = 0;
    for i in 0..s.changes {
        check_interrupted()?;
        let port = 20_000 + i as u32;
        std::fs::write(&file, policy_yaml(port))
            .with_context(|| format!("writing {}", file.display()))?;
        let (ok, out, err) = cluster.nodes[i % n].hypha(&["policy", "apply", "-f", file_arg]);
        if !ok {
            bail!("hypha policy apply on node {} failed: {out}{err}", i % n);
        }
        let applied = Instant::now();
        let lag = time_until(applied, || {
            policies.iter().all(|map| {
                map.keys()
                    .filter_map(Result::ok)
                    .any(|key| u32::from(key.dport) == port)
            })
        });
        match lag {
            Some(ms) => policy_lags.push(ms),
            None => policy_missed += 1,
        }
    }
    let policy_summary = lag_summary(&policy_lags);
    println!(
        "    policy apply → every node's policy map: p50 {:.1} ms, p99 {:.1} ms over {} changes ({policy_missed} missed)",
        policy_summary["p50_ms"].as_f64().unwrap_or(f64::NAN),
        policy_summary["p99_ms"].as_f64().unwrap_or(f64::NAN),
        policy_lags.len()
    );
    Ok(json!({
        "nodes": n,
        "pod_to_ipcache": pods_summary,
        "pods_missed": pod_missed,
        "policy_to_maps": policy_summary,
        "policies_missed": policy_missed,
    }))
}

pub fn identities_phase(s: &Settings) -> Result<Value> {
    println!("    starting {} cluster-mode nodes", s.cluster_nodes);
    let cluster = Cluster::start(s.cluster_nodes, ClusterOpts::default());
    let n = cluster.nodes.len();
    let sets: Vec<String> = (0..s.id_pods).map(|k| format!("new-{k}")).collect();
    let started = Instant::now();
    // (node, label set) → the pod, every ADD at once.
    let results: Vec<((usize, usize), Result<Pod>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .flat_map(|j| (0..sets.len()).map(move |k| (j, k)))
            .map(|(j, k)| {
                let cluster = &cluster;
                let set = sets[k].as_str();
                let handle = scope
                    .spawn(move || add_pod(cluster, j, &format!("id{j}x{k}"), &[("app", set)]));
                ((j, k), handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(at, h)| {
                let result = h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("the ADD thread panicked")));
                (at, result)
            })
            .collect()
    });
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut pods = BTreeMap::new();
    let mut failures = Vec::new();
    for ((j, k), result) in results {
        match result {
            Ok(pod) => {
                pods.insert((j, k), pod);
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    println!(
        "    {} concurrent ADDs ({} new label sets on {n} nodes) in {wall_ms:.0} ms, {} failed",
        n * sets.len(),
        sets.len(),
        failures.len()
    );

    // Every node's view of every pod, once every node has them all.
    let ipcaches = cluster
        .nodes
        .iter()
        .map(|node| open_ipcache(&node.pin_dir))
        .collect::<Result<Vec<_>>>()?;
    let addresses: Vec<(usize, Ipv4Addr)> =
        pods.iter().map(|(&(_, k), p)| (k, p.address)).collect();
    let synced = time_until(Instant::now(), || {
        ipcaches.iter().all(|map| {
            addresses
                .iter()
                .all(|(_, a)| label_identity(map, *a).is_some())
        })
    });
    // label set → the identities any node gives any of its pods.
    let mut by_set: BTreeMap<usize, BTreeSet<u32>> = BTreeMap::new();
    let mut unseen = 0;
    for map in &ipcaches {
        for (k, address) in &addresses {
            match label_identity(map, *address) {
                Some(id) => {
                    by_set.entry(*k).or_default().insert(id);
                }
                None => unseen += 1,
            }
        }
    }
    let split_sets = by_set.values().filter(|ids| ids.len() > 1).count();
    let mut owners: BTreeMap<u32, BTreeSet<usize>> = BTreeMap::new();
    for (k, ids) in &by_set {
        for id in ids {
            owners.entry(*id).or_default().insert(*k);
        }
    }
    let shared_ids = owners.values().filter(|sets| sets.len() > 1).count();
    println!(
        "    label sets with more than one identity: {split_sets}; identities shared by label sets: {shared_ids}; entries missing: {unseen}"
    );
    if !failures.is_empty() {
        bail!("{} ADDs failed; the first: {}", failures.len(), failures[0]);
    }
    Ok(json!({
        "nodes": n,
        "adds": n * sets.len(),
        "label_sets": sets.len(),
        "wall_ms": wall_ms,
        "all_nodes_synced_ms": synced,
        "label_sets_with_several_identities": split_sets,
        "identities_shared_by_label_sets": shared_ids,
        "entries_missing": unseen,
    }))
}
