//! Cluster mode end to end (privileged: run as root): a real etcd in an underlay network
//! namespace and agents in namespaces of their own standing for nodes
//! ([`hypha_tests::cluster::Cluster`]), pods made through `hypha-cni`, and what every
//! node's pinned maps hold, read directly. One cluster serves several assertions where
//! sharing it does not weaken them (the file must run in minutes on two cores).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hypha_cluster::KvStore as _;
use hypha_tests::cluster::{
    Cluster, ClusterOpts, PREFIX, ipcache_identity, ipcache4_in, ipcache6, policy_entries,
};
use hypha_tests::node::{Node, Pod};
use hypha_tests::policies::ALLOW_CLIENT_8080;
use hypha_tests::traffic::{TcpEcho, tcp_ok};

/// How long a change made on one node may take to show on another.
const CONVERGE: Duration = Duration::from_secs(10);

/// Runs `hypha ARGS` against `node`, panicking with its output on failure.
fn hypha_ok(node: &Node, args: &[&str]) -> String {
    let (ok, out, err) = node.hypha(args);
    assert!(ok, "hypha {}: {out}{err}", args.join(" "));
    out
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Waits until every node in `nodes` has `address` in its ipcache with `identity`
/// (`None`: until none has it at all); panics naming the node that does not.
fn await_ipcache(c: &Cluster, nodes: &[usize], address: Ipv4Addr, identity: Option<u32>) {
    for &i in nodes {
        let node = &c.nodes[i];
        let ok = Cluster::eventually(CONVERGE, || ipcache_identity(node, address) == identity);
        assert!(
            ok,
            "node-{i}'s hypha_ipcache4 gives {address} {:?}, expected {identity:?}\nagent log:\n{}",
            ipcache_identity(node, address),
            tail(&node.log())
        );
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The store's keys of node `name`'s endpoints.
fn endpoint_keys(c: &Cluster, name: &str) -> BTreeSet<String> {
    c.keys(&format!("endpoints/{name}/")).into_keys().collect()
}

/// Waits until the store holds `n` endpoint keys of node `name` (its agent publishes them
/// asynchronously); panics with what it holds.
fn await_endpoint_keys(c: &Cluster, name: &str, n: usize) {
    let ok = Cluster::eventually(CONVERGE, || endpoint_keys(c, name).len() == n);
    assert!(
        ok,
        "expected {n} endpoint keys of {name} in the store: {:#?}",
        c.keys("endpoints/")
    );
}

/// Three nodes: their pod CIDRs come from the store, inside the cluster CIDR and apart;
/// the same labels get one identity on all three (read from every node's pinned
/// ipcache); a pod on one node shows in the others' maps and leaves them on DEL; a
/// policy applied on node-1 is enforced on node-0's pods; `hypha node list` and
/// `hypha identity list` show it all; `hypha node remove` of a stopped node takes its
/// CIDR, endpoints and lease out of the store and its pods out of the other nodes' maps.
#[test]
fn three_nodes_share_cidrs_identities_endpoints_and_policies() {
    hypha_tests::require_root!();
    let mut c = Cluster::start(3, ClusterOpts::default());

    // Distinct pod CIDRs, from the store, in the cluster CIDR.
    let cluster4: ipnet::Ipv4Net = c.cluster_cidr.split(',').next().unwrap().parse().unwrap();
    let cluster6: ipnet::Ipv6Net = c.cluster_cidr.split(',').nth(1).unwrap().parse().unwrap();
    let mut cidrs4 = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let status = node.status();
        let v4 = status
            .node
            .pod_cidr
            .unwrap_or_else(|| panic!("node-{i} has no IPv4 pod CIDR"));
        let v6 = status
            .node
            .pod_cidr6
            .unwrap_or_else(|| panic!("node-{i} has no IPv6 pod CIDR"));
        assert!(
            cluster4.contains(&v4) && v4.prefix_len() == 24,
            "node-{i}: {v4} in {cluster4}"
        );
        assert!(
            cluster6.contains(&v6) && v6.prefix_len() == 64,
            "node-{i}: {v6} in {cluster6}"
        );
        let stored =
            json(&c.keys(&format!("cidrs/node-{i}"))[&format!("{PREFIX}cidrs/node-{i}")].0);
        assert_eq!(
            stored["v4"],
            v4.to_string(),
            "the store's CIDRs of node-{i}: {stored}"
        );
        let cluster = status.cluster.expect("a cluster section in status");
        assert_eq!(cluster.node_name, format!("node-{i}"));
        assert!(cluster.connected, "node-{i}: {cluster:?}");
        cidrs4.push((v4, v6));
    }
    for (i, a) in cidrs4.iter().enumerate() {
        for b in &cidrs4[i + 1..] {
            assert!(
                !a.0.contains(&b.0.network()) && !b.0.contains(&a.0.network()) && a.1 != b.1,
                "overlapping pod CIDRs: {cidrs4:?}"
            );
        }
    }

    // Every node lists the three, itself marked local, all alive.
    let await_nodes = |c: &Cluster, n: usize| {
        Cluster::eventually(CONVERGE, || {
            let list = json(&hypha_ok(&c.nodes[n], &["node", "list", "-o", "json"]));
            list.as_array().is_some_and(|l| l.len() == 3)
        })
    };
    for i in 0..3 {
        assert!(await_nodes(&c, i), "node-{i} does not list three nodes");
        let list = json(&hypha_ok(&c.nodes[i], &["node", "list", "-o", "json"]));
        let names: BTreeSet<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            BTreeSet::from(["node-0", "node-1", "node-2"]),
            "{list}"
        );
        for n in list.as_array().unwrap() {
            assert_eq!(n["alive"], true, "{n}");
            assert_eq!(n["local"], n["name"] == format!("node-{i}"), "{n}");
        }
    }
    let table = hypha_ok(&c.nodes[0], &["node", "list"]);
    assert!(table.starts_with("NAME "), "{table}");
    for (i, (v4, _)) in cidrs4.iter().enumerate() {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("node-{i}")))
            .unwrap_or_else(|| panic!("no row for node-{i}: {table}"));
        assert!(
            row.contains(&v4.to_string()) && row.contains(&c.node_ip(i).to_string()),
            "{table}"
        );
    }

    // Pods: a server, a client and another on node-0; a client on node-1 (the labels of
    // node-0's); a server on node-2.
    let (a, b, cc) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    let server = a.add_labelled_pod("srv", "default", &[("app", "server")]);
    let client = a.add_labelled_pod("cli", "default", &[("app", "client")]);
    let other = a.add_labelled_pod("oth", "default", &[("app", "other")]);
    let client_b = b.add_labelled_pod("cli", "default", &[("app", "client")]);
    let server_c = cc.add_labelled_pod("srv", "default", &[("app", "server")]);

    // Each pod's identity, read from its own node's map, matches the API's...
    let own = |node: &Node, pod: &Pod| {
        let id = ipcache_identity(node, pod.address)
            .unwrap_or_else(|| panic!("{} is not in its own node's ipcache", pod.address));
        assert_eq!(node.endpoint(&pod.container_id).identity, Some(id));
        id
    };
    let id_server = own(a, &server);
    let id_client = own(a, &client);
    let id_other = own(a, &other);
    assert!(id_server < 1 << 24 && id_client < 1 << 24 && id_other < 1 << 24);
    assert_eq!(BTreeSet::from([id_server, id_client, id_other]).len(), 3);
    // ... the same labels give the same number on every node ...
    assert_eq!(own(b, &client_b), id_client, "app=client on node-1");
    assert_eq!(own(cc, &server_c), id_server, "app=server on node-2");
    // ... and every node's map holds every pod with that number.
    let pods = [
        (&server, id_server),
        (&client, id_client),
        (&other, id_other),
        (&client_b, id_client),
        (&server_c, id_server),
    ];
    for (pod, id) in pods {
        await_ipcache(&c, &[0, 1, 2], pod.address, Some(id));
        // Its IPv6 address too (the nodes are dual stack).
        let v6 = pod.v6();
        for (i, node) in c.nodes.iter().enumerate() {
            let ok = Cluster::eventually(CONVERGE, || ipcache6(node).get(&(v6, 128)) == Some(&id));
            assert!(
                ok,
                "node-{i}'s hypha_ipcache6 gives {v6} {:?}, expected {id}",
                ipcache6(node).get(&(v6, 128))
            );
        }
    }
    // The store holds one endpoint key per pod, under its node.
    await_endpoint_keys(&c, "node-0", 3);
    await_endpoint_keys(&c, "node-1", 1);

    // The operator's views: the identity list and the endpoint list's IDENTITY column.
    let ids = json(&hypha_ok(b, &["identity", "list", "-o", "json"]));
    let client_entry = ids
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id_client)
        .unwrap_or_else(|| panic!("no identity {id_client} on node-1: {ids}"));
    assert_eq!(client_entry["labels"]["app"], "client", "{client_entry}");
    assert_eq!(client_entry["local_endpoints"], 1, "{client_entry}");
    assert_eq!(
        client_entry["remote_endpoints"], 1,
        "node-0's client: {client_entry}"
    );
    let eps = hypha_ok(a, &["endpoint", "list"]);
    let col = eps
        .lines()
        .next()
        .unwrap()
        .find("IDENTITY")
        .expect("an IDENTITY column");
    let row = eps
        .lines()
        .find(|l| l.contains(&format!(" {} ", server.address)))
        .unwrap();
    assert!(row[col..].starts_with(&format!("{id_server} ")), "{eps}");

    // A policy applied on node-1 is enforced on node-0's pods.
    let _web = TcpEcho::start(&server.netns, 8080);
    assert!(tcp_ok(&other.netns, server.address, 8080), "no policy yet");
    let file = b.dir.join("allow.yaml");
    std::fs::write(&file, ALLOW_CLIENT_8080).unwrap();
    hypha_ok(b, &["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(
        Cluster::eventually(CONVERGE, || !tcp_ok(&other.netns, server.address, 8080)),
        "node-0 never enforced node-1's policy\n{}",
        tail(&a.log())
    );
    assert!(
        tcp_ok(&client.netns, server.address, 8080),
        "the allowed client passes"
    );
    let server_id = a.endpoint(&server.container_id).id;
    assert!(
        policy_entries(a)
            .iter()
            .any(|(k, _)| k.endpoint_id == server_id && k.identity == id_client && k.dport == 8080),
        "node-0's hypha_policy allows app=client (node-1's client too) into its server"
    );
    let policies = json(&hypha_ok(cc, &["policy", "list", "-o", "json"]));
    assert!(
        policies.to_string().contains("server-from-client"),
        "node-2: {policies}"
    );

    // A DEL on node-0 takes its pod out of every map.
    let del = a.del_pod(&other);
    assert!(del.status.success(), "DEL: {}", del.stdout);
    await_ipcache(&c, &[0, 1, 2], other.address, None);
    await_endpoint_keys(&c, "node-0", 2);

    // `hypha node remove` of a stopped node: refused while its heartbeat is fresh, then
    // forced: its record, lease, CIDRs, claims and endpoints leave the store, its pods
    // the other nodes' maps.
    let record = c.keys("nodes/node-2");
    let lease = record[&format!("{PREFIX}nodes/node-2")].1;
    assert_ne!(lease, 0, "node-2's record hangs on a lease: {record:?}");
    c.kill_agent(2);
    let (ok, out, err) = c.nodes[0].hypha(&["node", "remove", "node-2"]);
    assert!(
        !ok,
        "removing a node with a fresh heartbeat needs --force: {out}"
    );
    assert!(err.contains("node-2"), "{err}");
    let removed = json(&hypha_ok(
        &c.nodes[0],
        &["node", "remove", "node-2", "--force", "-o", "json"],
    ));
    assert_eq!(removed["endpoints"], 1, "{removed}");
    assert_eq!(removed["pod_cidr"], cidrs4[2].0.to_string(), "{removed}");
    let left: Vec<String> = c
        .keys("")
        .into_iter()
        .filter(|(k, (v, _))| k.contains("node-2") || v.contains("\"node-2\""))
        .map(|(k, _)| k)
        .collect();
    assert!(left.is_empty(), "node-2 left keys in the store: {left:?}");
    let gone = c.with_store(move |kv| async move { kv.keep_alive(lease).await });
    assert!(gone.is_err(), "node-2's lease {lease} is still alive");
    await_ipcache(&c, &[0, 1], server_c.address, None);
    assert!(
        Cluster::eventually(CONVERGE, || {
            json(&hypha_ok(&c.nodes[1], &["node", "list", "-o", "json"]))
                .as_array()
                .is_some_and(|l| l.len() == 2)
        }),
        "node-1 still lists node-2"
    );
    // The pods of the nodes that stay are untouched.
    await_ipcache(&c, &[0, 1], client_b.address, Some(id_client));
}

/// Polls `node`'s ipcache on a thread until told to stop: the smallest count of the
/// `watched` addresses seen at once, and how many reads it made.
struct IpcacheWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, usize)>>,
}

impl IpcacheWatch {
    fn start(node: &Node, watched: Vec<Ipv4Addr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let pin_dir = node.pin_dir.clone();
        let thread = std::thread::spawn(move || {
            let (mut min, mut reads) = (usize::MAX, 0);
            while !flag.load(Ordering::Relaxed) {
                let present: BTreeSet<Ipv4Addr> = ipcache4_in(&pin_dir)
                    .into_keys()
                    .filter(|(_, len)| *len == 32)
                    .map(|(a, _)| a)
                    .collect();
                min = min.min(watched.iter().filter(|a| present.contains(a)).count());
                reads += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            (min, reads)
        });
        IpcacheWatch {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("ipcache watch")
    }
}

impl Drop for IpcacheWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn resyncs(node: &Node) -> u64 {
    node.status().cluster.map_or(0, |c| c.resyncs)
}

fn connected(node: &Node) -> bool {
    node.status().cluster.is_some_and(|c| c.connected)
}

/// Faults on one two-node cluster, in turn: an agent SIGKILLed and restarted (same
/// CIDRs, same endpoints, nothing duplicated in the store); etcd restarted with its data,
/// then a watch lost to compaction (every node resyncs; the other node's pods never
/// leave the maps meanwhile); etcd unreachable while an agent starts (it starts from its
/// state, says disconnected, starts pods of known labels, fails those of new labels in
/// bounded time and clearly, and once etcd is back reconnects and starts them).
#[test]
fn faults_keep_what_is_valid_and_come_back() {
    hypha_tests::require_root!();
    let mut c = Cluster::start(2, ClusterOpts::default());
    let a_pods = [
        c.nodes[0].add_labelled_pod("web", "default", &[("app", "web")]),
        c.nodes[0].add_labelled_pod("db", "default", &[("app", "db")]),
    ];
    let b_pods = [
        c.nodes[1].add_labelled_pod("web", "default", &[("app", "web")]),
        c.nodes[1].add_labelled_pod("api", "default", &[("app", "api")]),
    ];
    let all: Vec<Ipv4Addr> = a_pods.iter().chain(&b_pods).map(|p| p.address).collect();
    for p in &all {
        let id = ipcache_identity(&c.nodes[0], *p).or_else(|| ipcache_identity(&c.nodes[1], *p));
        assert!(id.is_some(), "{p} in no map");
        await_ipcache(&c, &[0, 1], *p, id);
    }
    let snapshot = |c: &Cluster| {
        let mut keys = c.keys("");
        // Heartbeats change; which keys exist, and the endpoints' values, do not.
        keys.retain(|k, _| !k.starts_with(&format!("{PREFIX}nodes/")));
        keys
    };

    // 1. SIGKILL and restart node-1's agent: same CIDRs, same endpoints, same keys.
    let before = snapshot(&c);
    let status_before = c.nodes[1].status();
    c.kill_agent(1);
    c.restart_agent(1);
    let status_after = c.nodes[1].status();
    assert_eq!(
        (status_after.node.pod_cidr, status_after.node.pod_cidr6),
        (status_before.node.pod_cidr, status_before.node.pod_cidr6),
        "node-1's CIDRs after a restart"
    );
    let eps = |n: &Node| -> BTreeMap<String, Option<Ipv4Addr>> {
        n.endpoints()
            .into_iter()
            .map(|e| (e.container_id, e.address))
            .collect()
    };
    assert_eq!(eps(&c.nodes[1]).len(), 2);
    assert!(
        Cluster::eventually(CONVERGE, || connected(&c.nodes[1])),
        "node-1 reconnects"
    );
    std::thread::sleep(Duration::from_millis(500));
    let after = snapshot(&c);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the store's keys after node-1's restart (nothing duplicated, nothing lost)"
    );
    assert_eq!(c.keys("nodes/").len(), 2, "{:?}", c.keys("nodes/"));
    for p in &all {
        assert!(
            ipcache_identity(&c.nodes[1], *p).is_some(),
            "{p} on node-1 after its restart"
        );
    }

    // 2. etcd restarted with its data, while both nodes' maps are watched.
    let watches = [
        IpcacheWatch::start(&c.nodes[0], all.clone()),
        IpcacheWatch::start(&c.nodes[1], all.clone()),
    ];
    let resyncs_before = [resyncs(&c.nodes[0]), resyncs(&c.nodes[1])];
    c.restart_etcd();
    for (i, before) in resyncs_before.into_iter().enumerate() {
        assert!(
            Cluster::eventually(Duration::from_secs(20), || connected(&c.nodes[i])
                && resyncs(&c.nodes[i]) > before),
            "node-{i} did not resync after etcd's restart: {:?}\n{}",
            c.nodes[i].status().cluster,
            tail(&c.nodes[i].log())
        );
    }

    // 3. A watch lost to compaction: etcd stopped and started again, a write and a
    // compaction past every agent's revision before they watch again.
    let resyncs_before = [resyncs(&c.nodes[0]), resyncs(&c.nodes[1])];
    c.stop_etcd();
    c.restart_etcd();
    c.with_store(|kv| async move {
        kv.txn(
            Vec::new(),
            vec![hypha_cluster::Op::Put {
                key: "/hypha-test/compaction".into(),
                value: b"x".to_vec(),
                lease: None,
            }],
            Vec::new(),
        )
        .await
        .expect("write past the agents' revision");
    });
    c.compact_etcd();
    for (i, before) in resyncs_before.into_iter().enumerate() {
        assert!(
            Cluster::eventually(Duration::from_secs(20), || connected(&c.nodes[i])
                && resyncs(&c.nodes[i]) > before),
            "node-{i} did not resync after the compaction: {:?}\n{}",
            c.nodes[i].status().cluster,
            tail(&c.nodes[i].log())
        );
    }
    for (i, w) in watches.into_iter().enumerate() {
        let (min, reads) = w.finish();
        assert!(reads > 10, "node-{i}'s map read {reads} times only");
        assert_eq!(
            min,
            all.len(),
            "node-{i}'s ipcache lost valid entries during the resyncs"
        );
    }

    // 4. etcd unreachable while node-1's agent starts.
    c.stop_etcd();
    c.kill_agent(1);
    c.restart_agent(1);
    let status = c.nodes[1].status();
    assert_eq!(
        status.node.pod_cidr, status_before.node.pod_cidr,
        "CIDRs from its state"
    );
    let cluster = status.cluster.expect("a cluster section");
    assert!(!cluster.connected, "{cluster:?}");
    let text = hypha_ok(&c.nodes[1], &["status"]);
    assert!(text.contains("disconnected"), "{text}");
    for p in &all {
        assert!(
            ipcache_identity(&c.nodes[1], *p).is_some(),
            "{p} kept from node-1's state"
        );
    }
    let known = c.nodes[1]
        .try_add_labelled_pod("web2", "default", &[("app", "web")])
        .unwrap_or_else(|out| panic!("an ADD of known labels while etcd is down: {}", out.stdout));
    let started = Instant::now();
    let refused = c.nodes[1].try_add_labelled_pod("new", "default", &[("app", "brand-new")]);
    let waited = started.elapsed();
    let Err(out) = refused else {
        panic!("an ADD of new labels succeeded while etcd is down");
    };
    assert!(
        waited < Duration::from_secs(20),
        "the ADD failed only after {waited:?}"
    );
    out.error();
    // The agent's words, in the error's msg or details.
    let message = out.stdout.clone();
    assert!(
        message.contains("unreachable") && message.contains("brand-new"),
        "the ADD's error says the store is unreachable and names the labels: {message}"
    );
    c.restart_etcd();
    assert!(
        Cluster::eventually(Duration::from_secs(20), || connected(&c.nodes[1])),
        "node-1 reconnects once etcd is back: {:?}",
        c.nodes[1].status().cluster
    );
    let new = c.nodes[1].add_labelled_pod("new", "default", &[("app", "brand-new")]);
    let id = ipcache_identity(&c.nodes[1], new.address).expect("the new pod's identity");
    // Both pods started on node-1 reach node-0.
    await_ipcache(&c, &[0], new.address, Some(id));
    let web = ipcache_identity(&c.nodes[1], known.address);
    await_ipcache(&c, &[0], known.address, web);
    await_endpoint_keys(&c, "node-1", 4);
}

/// A node name already held by a live agent, and a cluster CIDR whose room is taken:
/// the agent exits at start with a clear error.
#[test]
fn a_taken_name_and_an_exhausted_cluster_cidr_are_refused_at_start() {
    hypha_tests::require_root!();
    let pid = std::process::id();
    // Room for two nodes (a node's CIDR must be longer than the cluster's).
    let mut c = Cluster::start(
        2,
        ClusterOpts {
            cluster_cidr: Some(format!(
                "10.{}.{}.0/24,fd00:4877:{:x}::/63",
                250 + pid % 5,
                pid % 200,
                pid & 0xffff
            )),
            node_cidr_size: Some("25,64".into()),
            ..ClusterOpts::default()
        },
    );
    let mut twin = c.new_node(Some("node-0"), &[]);
    let err = twin
        .try_start_agent()
        .expect_err("a second agent named node-0 started");
    assert!(
        err.contains("node name node-0 is already taken"),
        "the error names the taken name: {}",
        tail(&err)
    );
    let mut third = c.new_node(None, &[]);
    let err = third
        .try_start_agent()
        .expect_err("a third node got a CIDR from a /24 of /25s");
    assert!(
        err.contains("has no free /25") || err.contains("has no free /64"),
        "the error says the cluster CIDR is exhausted: {}",
        tail(&err)
    );
    // The first nodes are untouched.
    assert!(connected(&c.nodes[0]) && connected(&c.nodes[1]));
    assert_eq!(c.keys("nodes/").len(), 2, "{:?}", c.keys("nodes/"));
}

/// Without cluster flags nothing changes, and the operator's cluster commands say what a
/// single node is: `hypha node list` shows the node itself, `hypha node remove` is refused
/// as not in cluster mode, `hypha status` has no cluster section.
#[test]
fn a_single_node_lists_itself_and_has_no_cluster() {
    hypha_tests::require_root!();
    let node = Node::start_dual();
    let pod = node.add_labelled_pod("web", "default", &[("app", "web")]);
    let list = json(&hypha_ok(&node, &["node", "list", "-o", "json"]));
    let nodes = list.as_array().expect("a list");
    assert_eq!(nodes.len(), 1, "{list}");
    let me = &nodes[0];
    assert_eq!(
        (me["local"].clone(), me["alive"].clone()),
        (true.into(), true.into()),
        "{me}"
    );
    assert_eq!(me["pod_cidr"], node.pod_cidr, "{me}");
    let cidr6 = node.status().node.pod_cidr6.expect("an IPv6 pod CIDR");
    assert_eq!(me["pod_cidr6"], cidr6.to_string(), "{me}");
    assert_eq!(me["endpoints"], 1, "{me}");
    let table = hypha_ok(&node, &["node", "list"]);
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains(&node.pod_cidr)),
        "{table}"
    );

    let (ok, out, err) = node.hypha(&["node", "remove", "node-9", "--force"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("not in cluster mode") && err.contains("node-9"),
        "{err}"
    );

    let status = node.status();
    assert!(status.cluster.is_none(), "{:?}", status.cluster);
    assert!(!hypha_ok(&node, &["status"]).contains("Cluster:"));

    // The pod's identity, in the API, the endpoint list and the identity list, is the
    // one its node's map gives its address.
    let id = ipcache_identity(&node, pod.address).expect("the pod in hypha_ipcache4");
    assert_eq!(node.endpoint(&pod.container_id).identity, Some(id));
    let ids = json(&hypha_ok(&node, &["identity", "list", "-o", "json"]));
    assert!(
        ids.as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == id && i["labels"]["app"] == "web"),
        "{ids}"
    );
}
