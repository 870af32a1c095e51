//! The runtime against the in-memory store, with a recording agent: registration (and its
//! fallback to `cluster.json` while the store is unreachable), the endpoint publisher's
//! reconciliation, the dispatch of remote changes, and the operator's calls.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypha_api::MacAddr;
use hypha_cluster::fake::MemKv;
use hypha_cluster::layout::{EndpointEntry, Labels, Layout, NodeCidrs};
use hypha_cluster::node::{self, CidrPlan, NodeSpec};
use hypha_cluster::{KvStore, store};

use super::*;
use crate::config::cluster::{DEFAULT_IDENTITY_GC_GRACE, check_prefix};
use crate::policy::{DirectionRules, LabelSelector, PolicyKind};

/// A recording agent: keeps what the runtime applied, as the agent would.
#[derive(Default)]
struct Recorder {
    local: Mutex<Vec<(EndpointRecord, Option<u32>)>>,
    remote: Mutex<BTreeMap<String, RemoteEndpoint>>,
    remote_batches: Mutex<Vec<RemoteBatch<RemoteEndpoint>>>,
    policies: Mutex<BTreeMap<String, Policy>>,
    namespaces: Mutex<BTreeMap<String, Labels>>,
    identities: Mutex<BTreeMap<u32, (String, Labels)>>,
    nodes: Mutex<Option<Vec<ClusterNode>>>,
    services: Mutex<BTreeMap<String, crate::service::Service>>,
}

fn merge<T: Clone>(
    map: &Mutex<BTreeMap<String, T>>,
    b: RemoteBatch<T>,
    key: impl Fn(&T) -> String,
) {
    let mut m = map.lock().unwrap();
    if b.resync {
        m.clear();
    }
    for r in &b.removes {
        m.remove(r);
    }
    for u in b.upserts {
        m.insert(key(&u), u);
    }
}

impl ClusterAgent for Recorder {
    fn apply_identities(
        &self,
        batch: RemoteBatch<(u32, String, Labels)>,
    ) -> Result<(), ControlError> {
        let mut m = self.identities.lock().unwrap();
        if batch.resync {
            m.clear();
        }
        for r in &batch.removes {
            m.remove(&r.parse().unwrap());
        }
        for (id, ns, l) in batch.upserts {
            m.insert(id, (ns, l));
        }
        Ok(())
    }
    fn apply_endpoints(&self, batch: RemoteBatch<RemoteEndpoint>) -> Result<(), ControlError> {
        self.remote_batches.lock().unwrap().push(batch.clone());
        merge(&self.remote, batch, |e| e.key.clone());
        Ok(())
    }
    fn apply_policies(&self, batch: RemoteBatch<Policy>) -> Result<(), ControlError> {
        merge(&self.policies, batch, Policy::full_name);
        Ok(())
    }
    fn apply_namespaces(&self, batch: RemoteBatch<(String, Labels)>) -> Result<(), ControlError> {
        let mut m = self.namespaces.lock().unwrap();
        if batch.resync {
            m.clear();
        }
        for r in &batch.removes {
            m.remove(r);
        }
        for (ns, l) in batch.upserts {
            m.insert(ns, l);
        }
        Ok(())
    }
    fn apply_nodes(&self, nodes: Vec<ClusterNode>) -> Result<(), ControlError> {
        *self.nodes.lock().unwrap() = Some(nodes);
        Ok(())
    }
    fn apply_services(
        &self,
        services: Option<RemoteBatch<crate::service::Service>>,
        _slices: Option<RemoteBatch<crate::service::EndpointSlice>>,
    ) -> Result<(), ControlError> {
        if let Some(b) = services {
            merge(&self.services, b, crate::service::Service::key);
        }
        Ok(())
    }
    fn local_endpoints(&self) -> Vec<(EndpointRecord, Option<u32>)> {
        self.local.lock().unwrap().clone()
    }
    fn remote_endpoint_count(&self) -> usize {
        self.remote.lock().unwrap().len()
    }
}

fn config(name: &str) -> ClusterConfig {
    ClusterConfig {
        store: vec!["http://192.0.2.10:2379".into()],
        node_name: name.into(),
        node_ips: vec!["192.0.2.1".parse().unwrap()],
        etcd_ca: None,
        etcd_cert: None,
        etcd_key: None,
        cidrs: CidrPlan {
            v4: Some(("10.244.0.0/16".parse().unwrap(), 24)),
            v6: Some(("fd00:10:244::/48".parse().unwrap(), 64)),
        },
        prefix: check_prefix("/hypha/v1/").unwrap(),
        identity_gc_grace: DEFAULT_IDENTITY_GC_GRACE,
        node_ttl: Duration::from_millis(900),
        routing: Default::default(),
    }
}

const SHORT: Waits = Waits {
    register: Duration::from_millis(300),
    store: Duration::from_millis(500),
};

fn endpoint(id: u32, cid: &str, app: &str) -> EndpointRecord {
    EndpointRecord {
        id,
        container_id: cid.into(),
        ifname: "eth0".into(),
        netns: format!("/run/netns/{cid}"),
        host_ifname: format!("hyp{id:012x}"),
        host_ifindex: id + 100,
        address: Some(Ipv4Addr::new(10, 244, 0, id as u8)),
        address6: None,
        pod_mac: MacAddr([2, 0, 0, 0, 0, id as u8]),
        host_mac: MacAddr([2, 0, 0, 1, 0, id as u8]),
        labels: BTreeMap::from([
            ("app".into(), app.into()),
            (crate::policy::NAMESPACE_LABEL.into(), "prod".into()),
        ]),
        external_ipam: false,
        bandwidth: None,
        debug: false,
        ports: Vec::new(),
    }
}

/// Polls `f` until it holds (10 s at most).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn own_keys(kv: &MemKv, layout: &Layout, node: &str) -> BTreeMap<String, EndpointEntry> {
    kv.list(&layout.node_endpoints(node))
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| {
            let e = hypha_cluster::decode(&kv.key, &kv.value).unwrap();
            (kv.key, e)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_at_start_uses_saved_cidrs_then_registers_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(MemKv::new());
    let saved = NodeCidrs {
        v4: Some("10.244.7.0/24".parse().unwrap()),
        v6: Some("fd00:10:244:7::/64".parse().unwrap()),
        ..Default::default()
    };
    local::save(
        dir.path(),
        &local::LocalCluster {
            uid: "00112233445566778899aabbccddeeff".into(),
            node_name: "node-a".into(),
            cidrs: saved.clone(),
        },
    )
    .unwrap();
    // The store holds the node's CIDRs from before (it registered then).
    let layout = Layout::default();
    let spec = NodeSpec {
        name: "node-a".into(),
        uid: "00112233445566778899aabbccddeeff".into(),
        addresses: vec![],
        version: "0".into(),
    };
    store::put(
        kv.as_ref(),
        &layout.node_cidrs("node-a"),
        hypha_cluster::encode(&saved),
    )
    .await
    .unwrap();
    kv.set_reachable(false);
    let started = Instant::now();
    let (rt, cidrs) = Runtime::connect_with(config("node-a"), dir.path(), kv.clone(), SHORT)
        .await
        .unwrap();
    assert_eq!(cidrs.v4, saved.v4);
    assert_eq!(cidrs.v6, saved.v6);
    assert!(
        started.elapsed() >= SHORT.register,
        "it waited for the store first"
    );
    let agent = Arc::new(Recorder::default());
    rt.start(agent.clone());
    let status = rt.status();
    assert!(!status.connected);
    assert!(
        status
            .error
            .as_deref()
            .unwrap_or("")
            .contains("unreachable"),
        "{status:?}"
    );
    kv.set_reachable(true);
    let node_key = layout.node("node-a");
    for _ in 0..500 {
        if kv.get(&node_key).await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let record = kv.get(&node_key).await.unwrap().expect("registered");
    let record: hypha_cluster::layout::NodeRecord =
        hypha_cluster::decode(&node_key, &record.value).unwrap();
    assert_eq!(record.uid, spec.uid);
    assert_eq!(record.pod_cidr, saved.v4, "same CIDRs as before");
    until("connected", || rt.status().connected).await;
    until("error cleared", || rt.status().error.is_none()).await;
    rt.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_saved_cidrs_registration_waits_for_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(MemKv::new());
    kv.set_reachable(false);
    let task = tokio::spawn({
        let kv = kv.clone();
        let path = dir.path().to_owned();
        async move { Runtime::connect_with(config("node-a"), &path, kv, SHORT).await }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!task.is_finished(), "no CIDR to start with: it waits");
    kv.set_reachable(true);
    let (rt, cidrs) = task.await.unwrap().unwrap();
    assert_eq!(cidrs.v4, Some("10.244.0.0/24".parse().unwrap()));
    let saved = local::load(dir.path()).unwrap().unwrap();
    assert_eq!(saved.cidrs.v4, cidrs.v4, "cluster.json has the CIDRs");
    assert_eq!(saved.cidrs.v6, cidrs.v6);
    rt.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_claiming_the_name_is_refused() {
    let kv = Arc::new(MemKv::new());
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (rt, _) = Runtime::connect_with(config("node-a"), a.path(), kv.clone(), SHORT)
        .await
        .unwrap();
    let err = Runtime::connect_with(config("node-a"), b.path(), kv.clone(), SHORT)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("registering node node-a") && err.contains("already taken"),
        "{err}"
    );
    // The same state directory (a restart) takes its node back, with its CIDRs.
    let (again, cidrs) = Runtime::connect_with(config("node-a"), a.path(), kv.clone(), SHORT)
        .await
        .unwrap();
    assert_eq!(cidrs.v4, Some("10.244.0.0/24".parse().unwrap()));
    rt.stop();
    again.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_reconciles_this_nodes_keys_and_remote_changes_reach_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(MemKv::new());
    let layout = Layout::default();
    let me = "node-a";
    let (rt, _) = Runtime::connect_with(config(me), dir.path(), kv.clone(), SHORT)
        .await
        .unwrap();
    let kept = endpoint(2, "c-kept", "web");
    let changed = endpoint(3, "c-changed", "db");
    let agent = Arc::new(Recorder::default());
    *agent.local.lock().unwrap() = vec![
        (kept.clone(), Some(300)),
        (changed.clone(), Some(301)),
        // No identity yet: not published.
        (endpoint(4, "c-new", "x"), None),
    ];
    // What the store has of this node from before: one stray, one stale.
    let stray = layout.endpoint(me, "c-gone", "eth0");
    store::put(
        kv.as_ref(),
        &stray,
        hypha_cluster::encode(&endpoint_entry(me, &endpoint(9, "c-gone", "web"), 300)),
    )
    .await
    .unwrap();
    store::put(
        kv.as_ref(),
        &layout.endpoint(me, "c-changed", "eth0"),
        hypha_cluster::encode(&endpoint_entry(me, &changed, 999)),
    )
    .await
    .unwrap();
    // Another node's endpoint.
    let remote_key = layout.endpoint("node-b", "c-b", "eth0");
    let remote = EndpointEntry {
        node: "node-b".into(),
        address: Some(Ipv4Addr::new(10, 244, 1, 2)),
        address6: None,
        identity: 300,
        namespace: "prod".into(),
        labels: [("app".to_owned(), "web".to_owned())].into(),
        ports: Vec::new(),
    };
    store::put(kv.as_ref(), &remote_key, hypha_cluster::encode(&remote))
        .await
        .unwrap();
    rt.start(agent.clone());
    let want: BTreeMap<String, EndpointEntry> = [
        (
            layout.endpoint(me, "c-kept", "eth0"),
            endpoint_entry(me, &kept, 300),
        ),
        (
            layout.endpoint(me, "c-changed", "eth0"),
            endpoint_entry(me, &changed, 301),
        ),
    ]
    .into();
    let mut got = BTreeMap::new();
    for _ in 0..500 {
        got = own_keys(&kv, &layout, me).await;
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got, want, "strays deleted, missing and stale written");
    assert_eq!(want.values().next().unwrap().namespace, "prod");
    // The first sync gives the agent the whole set of remote endpoints, its own left out.
    until("remote endpoint applied", || {
        agent.remote_endpoint_count() == 1
    })
    .await;
    let first = agent.remote_batches.lock().unwrap()[0].clone();
    assert!(first.resync);
    assert_eq!(first.upserts[0].key, remote_key);
    // Endpoints published and withdrawn by the agent reach the store.
    let added = endpoint(5, "c-added", "web");
    {
        // The agent's table changes, then it tells the runtime.
        let mut local = agent.local.lock().unwrap();
        local.retain(|(e, _)| e.id != kept.id);
        local.push((added.clone(), Some(300)));
    }
    rt.endpoint_published(&added, 300);
    rt.endpoint_withdrawn(&kept);
    let mut want = want;
    want.remove(&layout.endpoint(me, "c-kept", "eth0"));
    want.insert(
        layout.endpoint(me, "c-added", "eth0"),
        endpoint_entry(me, &added, 300),
    );
    for _ in 0..500 {
        got = own_keys(&kv, &layout, me).await;
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got, want);
    // A remote removal reaches the agent.
    kv.txn(vec![], vec![Op::Delete(remote_key.clone())], vec![])
        .await
        .unwrap();
    until("remote endpoint removed", || {
        agent.remote_endpoint_count() == 0
    })
    .await;
    // After a lost watch, a stray written meanwhile is swept again.
    kv.restart();
    store::put(
        kv.as_ref(),
        &stray,
        hypha_cluster::encode(&endpoint_entry(me, &endpoint(9, "c-gone", "web"), 300)),
    )
    .await
    .unwrap();
    until("resynced", || rt.status().resyncs >= 2).await;
    for _ in 0..500 {
        got = own_keys(&kv, &layout, me).await;
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got, want, "the stray is gone after the resync");
    rt.stop();
}

fn policy(ns: &str, name: &str) -> Policy {
    Policy {
        kind: PolicyKind::NetworkPolicy,
        namespace: ns.into(),
        name: name.into(),
        audit: false,
        subject: LabelSelector::default(),
        ingress: DirectionRules {
            isolate: true,
            ..Default::default()
        },
        egress: DirectionRules::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_namespace_labels_are_written_and_applied_before_returning() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(MemKv::new());
    let (rt, _) = Runtime::connect_with(config("node-a"), dir.path(), kv.clone(), SHORT)
        .await
        .unwrap();
    let agent = Arc::new(Recorder::default());
    rt.start(agent.clone());
    until("synced", || rt.status().connected).await;
    let (r, a) = (rt.clone(), agent.clone());
    tokio::task::spawn_blocking(move || {
        r.publish_policies(
            vec![policy("prod", "deny"), policy("prod", "other")],
            vec![],
        )
        .unwrap();
        // Returned only once applied.
        assert_eq!(a.policies.lock().unwrap().len(), 2);
        r.publish_policies(vec![], vec![("prod".into(), "other".into())])
            .unwrap();
        assert_eq!(
            a.policies.lock().unwrap().keys().collect::<Vec<_>>(),
            vec!["prod/deny"]
        );
        let set: BTreeMap<String, String> = [("team".into(), "a".into())].into();
        let l = r.publish_namespace_labels("prod", &set, &[]).unwrap();
        assert_eq!(l, set);
        let more: BTreeMap<String, String> = [("env".into(), "x".into())].into();
        let l = r
            .publish_namespace_labels("prod", &more, &["team".into()])
            .unwrap();
        assert_eq!(l, more, "merged with what the store had");
        assert_eq!(a.namespaces.lock().unwrap().get("prod"), Some(&more));
        assert!(r.status().revision > 0);
    })
    .await
    .unwrap();
    rt.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_known_answer_at_once_and_unknown_fail_clearly_while_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(MemKv::new());
    let layout = Layout::default();
    let (rt, _) = Runtime::connect_with(config("node-a"), dir.path(), kv.clone(), SHORT)
        .await
        .unwrap();
    let known: Labels = [("app".to_owned(), "web".to_owned())].into();
    store::put(
        kv.as_ref(),
        &layout.identity(4000),
        hypha_cluster::encode(&hypha_cluster::layout::IdentityRecord {
            namespace: "prod".into(),
            labels: known.clone(),
            unused_since_ms: None,
        }),
    )
    .await
    .unwrap();
    let agent = Arc::new(Recorder::default());
    rt.start(agent.clone());
    until("identity mirrored", || {
        agent.identities.lock().unwrap().contains_key(&4000)
    })
    .await;
    kv.set_reachable(false);
    let r = rt.clone();
    tokio::task::spawn_blocking(move || {
        assert_eq!(r.resolve_identity("prod", &known), Ok(4000));
        let started = Instant::now();
        let err = r
            .resolve_identity("prod", &[("app".to_owned(), "new".to_owned())].into())
            .unwrap_err();
        assert!(started.elapsed() >= SHORT.store, "bounded wait first");
        assert!(
            err.contains("cannot get a cluster identity for namespace prod labels {app=new}")
                && err.contains("http://192.0.2.10:2379 is unreachable")
                && err.contains("already knows still start"),
            "{err}"
        );
    })
    .await
    .unwrap();
    rt.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_removal() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(MemKv::new());
    let layout = Layout::default();
    let (rt, _) = Runtime::connect_with(config("node-a"), dir.path(), kv.clone(), SHORT)
        .await
        .unwrap();
    // Node b, alive (a long lease).
    let b = node::register(
        kv.as_ref(),
        &layout,
        &NodeSpec {
            name: "node-b".into(),
            uid: "b".into(),
            addresses: vec!["192.0.2.2".parse().unwrap()],
            version: "0".into(),
        },
        &config("node-b").cidrs,
        Duration::from_secs(600),
    )
    .await
    .unwrap();
    let agent = Arc::new(Recorder::default());
    rt.start(agent.clone());
    until("both nodes", || {
        rt.nodes().map(|n| n.len()).unwrap_or(0) == 2
    })
    .await;
    let nodes = rt.nodes().unwrap();
    let a = nodes.iter().find(|n| n.name == "node-a").unwrap();
    assert!(a.local && a.alive);
    let nb = nodes.iter().find(|n| n.name == "node-b").unwrap();
    assert_eq!(nb.pod_cidr, b.cidrs.v4);
    assert!(!nb.local && nb.alive);
    assert_eq!(rt.status().nodes, 2);
    // The agent was given both nodes, with their addresses (for the overlay).
    let routed = |agent: &Recorder| -> Vec<(String, Vec<std::net::IpAddr>)> {
        agent
            .nodes
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .map(|n| (n.name.clone(), n.addresses.clone()))
            .collect()
    };
    until("the agent has both nodes", || routed(&agent).len() == 2).await;
    assert_eq!(
        routed(&agent),
        vec![
            ("node-a".to_owned(), vec!["192.0.2.1".parse().unwrap()]),
            ("node-b".to_owned(), vec!["192.0.2.2".parse().unwrap()]),
        ]
    );
    // Node c registers, then its agent is killed: its record lapses, and it is still
    // given, by the addresses its CIDRs key kept; removed, it is no longer.
    let c = node::register(
        kv.as_ref(),
        &layout,
        &NodeSpec {
            name: "node-c".into(),
            uid: "c".into(),
            addresses: vec!["192.0.2.3".parse().unwrap()],
            version: "0".into(),
        },
        &config("node-c").cidrs,
        Duration::from_secs(600),
    )
    .await
    .unwrap();
    until("the agent has node c", || routed(&agent).len() == 3).await;
    assert!(kv.expire_lease(c.lease));
    until("node c's record gone", || {
        rt.nodes()
            .is_ok_and(|n| n.iter().any(|n| n.name == "node-c" && !n.alive))
    })
    .await;
    assert_eq!(
        routed(&agent)[2],
        ("node-c".to_owned(), vec!["192.0.2.3".parse().unwrap()])
    );
    let r = rt.clone();
    tokio::task::spawn_blocking(move || r.remove_node("node-c", false).unwrap())
        .await
        .unwrap();
    until("the agent no longer has node c", || {
        routed(&agent).len() == 2
    })
    .await;
    let r = rt.clone();
    tokio::task::spawn_blocking(move || {
        let err = r.remove_node("node-b", false).unwrap_err();
        assert_eq!(err.http_status(), 409, "{err}");
        let removed = r.remove_node("node-b", true).unwrap();
        assert_eq!(removed.pod_cidr, b.cidrs.v4);
        let err = r.remove_node("node-b", true).unwrap_err();
        assert_eq!(err.http_status(), 404, "{err}");
    })
    .await
    .unwrap();
    until("node b gone", || {
        rt.nodes().map(|n| n.len()).unwrap_or(0) == 1
    })
    .await;
    until("the agent no longer routes node b", || {
        routed(&agent).len() == 1
    })
    .await;
    rt.stop();
}

fn clusterip_service(name: &str, ip: &str) -> crate::service::Service {
    crate::service::Service {
        namespace: "default".into(),
        name: name.into(),
        kind: crate::service::ServiceType::NodePort,
        cluster_ips: vec![ip.parse().unwrap()],
        ip_families: Vec::new(),
        ip_family_policy: crate::service::IpFamilyPolicy::SingleStack,
        ports: vec![crate::service::ServicePort {
            name: String::new(),
            protocol: 6,
            port: 80,
            target_port: crate::service::TargetPort::Number(8080),
            node_port: Some(30080),
        }],
        selector: Some([("app".to_owned(), "web".to_owned())].into()),
        session_affinity: None,
        external_local: false,
        internal_local: false,
    }
}

/// Two nodes that allocated the same ClusterIP from the same view: the store takes the
/// first transaction and refuses the second (its claim is no longer absent), so no VIP
/// ever has two services; an update by the holder keeps its claims, a delete frees them.
#[tokio::test]
async fn two_nodes_racing_for_one_clusterip_cannot_both_take_it() {
    let kv = MemKv::new();
    let layout = Layout::default();
    let run = |t: ServiceTxn| {
        let (compares, ops) = service_txn(&layout, &t);
        let kv = &kv;
        async move { kv.txn(compares, ops, Vec::new()).await.unwrap().succeeded }
    };
    let a = clusterip_service("a", "10.96.0.10");
    let b = clusterip_service("b", "10.96.0.10");
    let put = |s: &crate::service::Service, seen: Option<crate::service::Service>| ServiceTxn {
        put: vec![(s.clone(), seen)],
        ..ServiceTxn::default()
    };
    assert!(run(put(&a, None)).await, "the first node wins");
    assert!(!run(put(&b, None)).await, "the second is refused");
    let claim = kv
        .get(&layout.service_ip("10.96.0.10".parse().unwrap()))
        .await;
    assert_eq!(
        claim.unwrap().unwrap().value,
        hypha_cluster::encode(&"default/a")
    );
    assert!(
        kv.get(&layout.service("default", "b"))
            .await
            .unwrap()
            .is_none()
    );
    // Its NodePort too, even on another ClusterIP.
    let b2 = clusterip_service("b", "10.96.0.11");
    assert!(!run(put(&b2, None)).await, "30080/TCP is a's");
    let mut b3 = b2.clone();
    b3.ports[0].node_port = Some(30081);
    assert!(run(put(&b3, None)).await);

    // A writer that allocated against an older a is refused; the holder's update passes.
    let mut a2 = a.clone();
    a2.ports[0].port = 81;
    assert!(!run(put(&a2, Some(b3.clone()))).await);
    assert!(run(put(&a2, Some(a.clone()))).await);
    // Deleting a frees its claims for others.
    assert!(
        run(ServiceTxn {
            delete: vec![a2.clone()],
            ..ServiceTxn::default()
        })
        .await
    );
    let c = clusterip_service("c", "10.96.0.10");
    assert!(
        run(put(&c, None)).await,
        "a's ClusterIP and NodePort are free again"
    );
}
