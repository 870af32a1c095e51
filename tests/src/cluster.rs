//! A Hypha cluster for tests: an "underlay" network namespace with a bridge and a real
//! etcd listening on the bridge's address, and N nodes ([`Node`]s in cluster mode), each
//! in a namespace of its own joined to the bridge by a veth, its agent started with
//! `--cluster-store etcd=http://<bridge>:2379 --node-name node-<i> --node-ip <its veth>`
//! and a cluster CIDR unique to the test.
//!
//! Addresses (from the unique tag, so that parallel tests never share one): the underlay
//! is `172.<a>.<b>.0/24`, the bridge `.1`, node i `.<10+i>`; the cluster CIDR is
//! `10.<x>.0.0/16,fd00:<y>::/48`.
//!
//! Everything is taken down in `Drop`, also on panic: the agents (killed), their
//! namespaces (with their veths and pods' namespaces), their pin and state directories,
//! etcd (stopped, its data directory removed), the underlay with its bridge.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap, Map, MapData};
use hypha_cluster::KvStore as _;
use hypha_cluster::etcd::EtcdKv;
use hypha_cluster::testing::{Etcd, NetnsRuntime};
use hypha_common::{IpcacheValue, PolicyEntry, PolicyKey, maps};

use crate::netns::{NamedNetns, ip, unique_name};
use crate::node::Node;

/// The store's key prefix (the agent's default).
pub const PREFIX: &str = "/hypha/v1/";

/// How a [`Cluster`] is set up.
#[derive(Clone, Debug, Default)]
pub struct ClusterOpts {
    /// `--cluster-cidr`; unique to the test when `None`.
    pub cluster_cidr: Option<String>,
    /// `--node-cidr-size`; the agent's default (`24,64`) when `None`.
    pub node_cidr_size: Option<String>,
    /// More `hypha agent` arguments for every node (e.g. `--identity-gc-grace 2s`).
    pub agent_args: Vec<String>,
}

/// The underlay, etcd and the nodes. Fields drop in order: nodes (agents killed, their
/// namespaces deleted), then etcd, then the runtime that talks to it, then the underlay.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub etcd: Etcd,
    store: NetnsRuntime,
    pub underlay: NamedNetns,
    /// `172.<a>.<b>`: the underlay's /24.
    net: [u8; 3],
    bridge: String,
    pub cluster_cidr: String,
    opts: ClusterOpts,
    /// Nodes made so far (the next gets this index in its address and name).
    made: u8,
}

impl Cluster {
    /// The underlay, etcd in it, and `n` nodes `node-0` .. `node-<n-1>` with their agents
    /// running.
    pub fn start(n: usize, opts: ClusterOpts) -> Cluster {
        let tag = unique_name("hcl");
        let seq: u32 = tag
            .rsplit('-')
            .next()
            .and_then(|s| s.parse().ok())
            .expect("numbered tag");
        let pid = std::process::id();
        let net = [16 + (pid % 16) as u8, (seq % 256) as u8, 0];
        let underlay = NamedNetns::named(format!("{tag}-u"));
        let bridge = "hbr0".to_owned();
        underlay.exec(&["ip", "link", "add", &bridge, "type", "bridge"]);
        let bridge_ip = format!("172.{}.{}.1", net[0], net[1]);
        underlay.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{bridge_ip}/24"),
            "dev",
            &bridge,
        ]);
        underlay.exec(&["ip", "link", "set", &bridge, "up"]);
        let etcd = Etcd::start(Some(underlay.name()), bridge_ip.parse().expect("address"))
            .unwrap_or_else(|e| panic!("start etcd in {}: {e}", underlay.name()));
        let store = NetnsRuntime::new(underlay.name())
            .unwrap_or_else(|e| panic!("a runtime in {}: {e}", underlay.name()));
        let x = 200 + (pid.wrapping_add(seq) % 50);
        let y = 0x4800 + ((pid.wrapping_mul(64).wrapping_add(seq)) & 0x7ff);
        let cluster_cidr = opts
            .cluster_cidr
            .clone()
            .unwrap_or_else(|| format!("10.{x}.0.0/16,fd00:{y:x}::/48"));
        let mut cluster = Cluster {
            nodes: Vec::new(),
            etcd,
            store,
            underlay,
            net,
            bridge,
            cluster_cidr,
            opts,
            made: 0,
        };
        for _ in 0..n {
            let node = cluster.new_node(None, &[]);
            cluster.nodes.push(node);
            let i = cluster.nodes.len() - 1;
            cluster.nodes[i].start_agent();
        }
        cluster
    }

    /// The underlay bridge's name (in [`Cluster::underlay`]).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The bridge's address, where etcd listens.
    pub fn store_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(172, self.net[0], self.net[1], 1)
    }

    /// `--cluster-store`'s value.
    pub fn store_url(&self) -> String {
        format!("http://{}:2379", self.store_ip())
    }

    /// A node's namespace wired to the underlay (`172.<a>.<b>.<10+i>/24`), with its
    /// agent's cluster arguments (`--node-name name`, `node-<i>` by default, and `extra`
    /// after the cluster's), the agent not started. Not added to [`Cluster::nodes`].
    pub fn new_node(&mut self, name: Option<&str>, extra: &[&str]) -> Node {
        let i = self.made;
        self.made += 1;
        let address = Ipv4Addr::new(172, self.net[0], self.net[1], 10 + i);
        let name = name.map_or_else(|| format!("node-{i}"), str::to_owned);
        let mut args = vec![
            "--cluster-store".to_owned(),
            format!("etcd={}", self.store_url()),
            "--node-name".to_owned(),
            name,
            "--node-ip".to_owned(),
            address.to_string(),
            "--cluster-cidr".to_owned(),
            self.cluster_cidr.clone(),
        ];
        if let Some(size) = &self.opts.node_cidr_size {
            args.extend(["--node-cidr-size".to_owned(), size.clone()]);
        }
        args.extend(self.opts.agent_args.iter().cloned());
        args.extend(extra.iter().map(|a| a.to_string()));
        let node = Node::cluster_member(args);
        // The veth: `u<n>` on the bridge, `ul0` in the node.
        let tag = unique_name("hu").replace('-', "");
        let (bridge_side, node_side) = (format!("{tag}b"), format!("{tag}n"));
        ip(&[
            "link",
            "add",
            &bridge_side,
            "netns",
            self.underlay.name(),
            "type",
            "veth",
            "peer",
            "name",
            &node_side,
            "netns",
            node.netns.name(),
        ]);
        self.underlay.exec(&[
            "ip",
            "link",
            "set",
            &bridge_side,
            "master",
            &self.bridge,
            "up",
        ]);
        node.netns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            &node_side,
        ]);
        node.netns.exec(&["ip", "link", "set", &node_side, "up"]);
        node
    }

    /// Node `i`'s underlay address.
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        let node = &self.nodes[i];
        let out = node.netns.exec(&["ip", "-4", "-o", "addr", "show"]);
        out.split_whitespace()
            .filter_map(|w| w.split('/').next()?.parse::<Ipv4Addr>().ok())
            .find(|a| a.octets()[..3] == [172, self.net[0], self.net[1]])
            .unwrap_or_else(|| panic!("no underlay address in {out}"))
    }

    /// Runs `f` with a client of the test's etcd, on a thread of the underlay.
    pub fn with_store<T, F>(&self, f: impl FnOnce(EtcdKv) -> F + Send + 'static) -> T
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let endpoints = self.etcd.endpoints();
        self.store.run(async move {
            let kv = EtcdKv::connect(&endpoints, None)
                .await
                .unwrap_or_else(|e| panic!("connect to etcd at {endpoints:?}: {e}"));
            f(kv).await
        })
    }

    /// Every key under `prefix` (relative to [`PREFIX`]) with its value as text and its
    /// lease.
    pub fn keys(&self, prefix: &str) -> BTreeMap<String, (String, i64)> {
        let prefix = format!("{PREFIX}{prefix}");
        self.with_store(move |kv| async move {
            let snap = kv
                .list(&prefix)
                .await
                .unwrap_or_else(|e| panic!("list {prefix}: {e}"));
            snap.kvs
                .into_iter()
                .map(|kv| {
                    (
                        kv.key,
                        (String::from_utf8_lossy(&kv.value).into_owned(), kv.lease),
                    )
                })
                .collect()
        })
    }

    /// Compacts etcd's history up to its current revision (a watch from before it is
    /// lost); returns that revision.
    pub fn compact_etcd(&self) -> i64 {
        self.with_store(|kv| async move {
            let rev = kv
                .list(PREFIX)
                .await
                .unwrap_or_else(|e| panic!("list {PREFIX}: {e}"))
                .revision;
            kv.compact(rev)
                .await
                .unwrap_or_else(|e| panic!("compact etcd to {rev}: {e}"));
            rev
        })
    }

    /// Stops etcd (SIGTERM), keeping its data.
    pub fn stop_etcd(&mut self) {
        self.etcd
            .stop()
            .unwrap_or_else(|e| panic!("stop etcd: {e}\n{}", self.etcd.log_tail()));
    }

    /// Starts etcd again with its data (stopping it first if it runs).
    pub fn restart_etcd(&mut self) {
        self.etcd
            .restart()
            .unwrap_or_else(|e| panic!("restart etcd: {e}\n{}", self.etcd.log_tail()));
    }

    /// SIGKILLs node `i`'s agent.
    pub fn kill_agent(&mut self, i: usize) {
        self.nodes[i].kill_agent();
    }

    /// Starts node `i`'s agent again (same state directory, same pins).
    pub fn restart_agent(&mut self, i: usize) {
        self.nodes[i].start_agent();
    }

    /// Polls `cond` every 50 ms for up to `limit`; whether it held.
    pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        loop {
            if cond() {
                return true;
            }
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The pinned `hypha_ipcache4` of `node`: `(address, prefix length)` → identity.
pub fn ipcache4(node: &Node) -> BTreeMap<(Ipv4Addr, u32), u32> {
    ipcache4_in(&node.pin_dir)
}

/// The `hypha_ipcache4` pinned in `pin_dir` (a node's, read from any thread).
pub fn ipcache4_in(pin_dir: &Path) -> BTreeMap<(Ipv4Addr, u32), u32> {
    let path = pin_dir.join(maps::IPCACHE4);
    let data = MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("open the pinned {}: {e}", path.display()));
    let trie: LpmTrie<MapData, u32, IpcacheValue> =
        LpmTrie::try_from(Map::LpmTrie(data)).expect("hypha_ipcache4 is an LPM trie");
    trie.iter()
        .map(|entry| {
            let (k, v) = entry.expect("iterate hypha_ipcache4");
            (
                (Ipv4Addr::from(k.data().to_ne_bytes()), k.prefix_len()),
                v.identity,
            )
        })
        .collect()
}

/// The pinned `hypha_ipcache6` of `node`: `(address, prefix length)` → identity.
pub fn ipcache6(node: &Node) -> BTreeMap<(Ipv6Addr, u32), u32> {
    let path = node.pin_dir.join(maps::IPCACHE6);
    let data = MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("open the pinned {}: {e}", path.display()));
    let trie: LpmTrie<MapData, [u8; 16], IpcacheValue> =
        LpmTrie::try_from(Map::LpmTrie(data)).expect("hypha_ipcache6 is an LPM trie");
    trie.iter()
        .map(|entry| {
            let (k, v) = entry.expect("iterate hypha_ipcache6");
            ((Ipv6Addr::from(k.data()), k.prefix_len()), v.identity)
        })
        .collect()
}

/// The identity `node`'s `hypha_ipcache4` gives `address` as a host entry (/32).
pub fn ipcache_identity(node: &Node, address: Ipv4Addr) -> Option<u32> {
    ipcache4(node).get(&(address, 32)).copied()
}

/// The pinned `hypha_policy` of `node`: every compiled entry.
pub fn policy_entries(node: &Node) -> Vec<(PolicyKey, PolicyEntry)> {
    let path = node.pin_dir.join(maps::POLICY);
    let data = MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("open the pinned {}: {e}", path.display()));
    let map: HashMap<MapData, PolicyKey, PolicyEntry> =
        HashMap::try_from(Map::HashMap(data)).expect("hypha_policy is a hash map");
    map.iter()
        .map(|e| e.expect("iterate hypha_policy"))
        .collect()
}
