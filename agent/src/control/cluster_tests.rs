//! Cluster mode, the agent's half: what the runtime tells the agent (remote endpoints,
//! cluster identities, policies, namespace labels) and the local paths that ask the
//! runtime (`ClusterLink`), over the fake datapath, the in-memory state store and a fake
//! link.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use hypha_api::{
    AllocateRequest, ClusterStatus, CreateEndpointRequest, MacAddr, NamespaceLabelsRequest,
    NodeInfo, PolicySource, RemoveNodeResponse,
};
use hypha_cluster::layout::EndpointEntry;
use hypha_common::DIR_INGRESS;
use ipnet::IpNet;

use super::tests::{MemStore, host_with};
use super::*;
use crate::config::ClusterConfig;
use crate::datapath::fake::FakeDatapath;
use crate::host::fake::FakeHost;
use crate::policy::{Labels, Policy, parse_file};
use crate::state::PolicyOrigin;

type TestAgent = Agent<FakeDatapath, FakeHost>;

const NODE: &str = "node-a";

fn cluster_config() -> AgentConfig {
    AgentConfig {
        pod_cidrs: "10.244.0.0/24".parse().unwrap(),
        cluster: Some(ClusterConfig {
            store: vec!["http://192.0.2.1:2379".into()],
            node_name: NODE.into(),
            node_ips: Vec::new(),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            cidrs: Default::default(),
            prefix: "/hypha/v1/".into(),
            identity_gc_grace: std::time::Duration::from_secs(600),
            node_ttl: std::time::Duration::from_secs(15),
            routing: Default::default(),
        }),
        ..AgentConfig::default()
    }
}

fn start_cluster(saved: PersistedState) -> (TestAgent, MemStore) {
    let store = MemStore::with(saved.clone());
    let (a, _) = Agent::start(
        cluster_config(),
        FakeDatapath::default(),
        host_with(&[("hypa", 10), ("hypb", 11), ("hypc", 12)]),
        Box::new(store.clone()),
        saved,
    )
    .unwrap();
    (a, store)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect()
}

fn remote(
    key: &str,
    node: &str,
    last: u8,
    identity: u32,
    pairs: &[(&str, &str)],
) -> RemoteEndpoint {
    RemoteEndpoint {
        key: format!("/hypha/v1/endpoints/{node}/{key}/eth0"),
        entry: EndpointEntry {
            node: node.into(),
            address: Some(Ipv4Addr::new(10, 244, 1, last)),
            address6: None,
            identity,
            namespace: "default".into(),
            labels: labels(pairs),
            ports: Vec::new(),
        },
    }
}

fn batch<T>(upserts: Vec<T>, removes: Vec<String>, resync: bool) -> RemoteBatch<T> {
    RemoteBatch {
        upserts,
        removes,
        resync,
    }
}

fn host_prefix(last: u8) -> IpNet {
    IpNet::from(std::net::IpAddr::V4(Ipv4Addr::new(10, 244, 1, last)))
}

fn policy(yaml: &str) -> Policy {
    parse_file("cluster.yaml", yaml).unwrap().remove(0)
}

const SERVER_FROM_CLIENT: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]\n";

/// ADDs endpoint `cid` on `host` with `pairs`, as the plugin does.
fn add(
    agent: &TestAgent,
    cid: &str,
    host: &str,
    pairs: &[(&str, &str)],
) -> Result<Endpoint, ControlError> {
    let alloc = agent.allocate(&AllocateRequest {
        container_id: cid.into(),
        ifname: "eth0".into(),
        address: None,
        address6: None,
    })?;
    agent.create_endpoint(&CreateEndpointRequest {
        container_id: cid.into(),
        ifname: "eth0".into(),
        netns: "/x".into(),
        host_ifname: host.into(),
        address: alloc.address,
        pod_mac: MacAddr([2, 0, 0, 0, 0, alloc.address.unwrap().octets()[3]]),
        labels: labels(pairs),
        external_ipam: false,
        bandwidth: None,
        ports: Vec::new(),
        address6: None,
    })
}

// ---------------------------------------------------------------- from the runtime

#[test]
fn remote_endpoints_enter_the_ipcache_and_local_policies_admit_them() {
    let (agent, store) = start_cluster(PersistedState::default());
    agent
        .apply_cluster_identities(batch(
            vec![(300, "default".into(), labels(&[("app", "server")]))],
            Vec::new(),
            true,
        ))
        .unwrap();
    agent
        .apply_cluster_policies(batch(vec![policy(SERVER_FROM_CLIENT)], Vec::new(), true))
        .unwrap();
    let server = add(&agent, "srv", "hypa", &[("app", "server")]).unwrap();
    assert_eq!(server.identity, Some(300));

    let client = remote("c1", "node-b", 2, 400, &[("app", "client")]);
    let other = remote("o1", "node-b", 3, 401, &[("app", "other")]);
    // This node's own endpoints come back from the store too: skipped.
    let own = remote("mine", NODE, 9, 300, &[("app", "server")]);
    agent
        .apply_remote_endpoints(batch(
            vec![client.clone(), other.clone(), own],
            Vec::new(),
            true,
        ))
        .unwrap();
    assert_eq!(agent.remote_endpoint_count(), 2);
    {
        let st = agent.datapath.state();
        assert_eq!(st.policy.ipcache.get(&host_prefix(2)), Some(&400));
        assert_eq!(st.policy.ipcache.get(&host_prefix(3)), Some(&401));
        assert!(!st.policy.ipcache.contains_key(&host_prefix(9)));
        let admitted = |identity| {
            st.policy.entries.keys().any(|k| {
                k.endpoint_id == server.id && k.identity == identity && k.direction == DIR_INGRESS
            })
        };
        assert!(admitted(400), "{:?}", st.policy.entries);
        assert!(!admitted(401));
        // Nothing keyed by a remote's id, no flags of its own.
        assert!(st.policy.entries.keys().all(|k| k.endpoint_id == server.id));
        assert!(st.flags.keys().all(|id| *id == server.id));
    }
    let persisted = store.last().remote_endpoints;
    assert_eq!(persisted.len(), 2);
    assert_eq!(persisted[&client.key], client.entry);

    // The identities listing counts them.
    let ids = agent.identities();
    let client_id = ids.iter().find(|i| i.id == 400).expect("client identity");
    assert_eq!(
        (client_id.local_endpoints, client_id.remote_endpoints),
        (0, 1)
    );
    let server_id = ids.iter().find(|i| i.id == 300).unwrap();
    assert_eq!(
        (server_id.local_endpoints, server_id.remote_endpoints),
        (1, 0)
    );
    assert!(ids.iter().any(|i| i.reserved.as_deref() == Some("host")));
    assert!(
        ids.iter()
            .any(|i| i.id == hypha_common::IDENTITY_REMOTE_NODE
                && i.reserved.as_deref() == Some("remote-node"))
    );

    // The client goes: its ipcache entry and the server's entry for it go.
    agent
        .apply_remote_endpoints(batch(Vec::new(), vec![client.key.clone()], false))
        .unwrap();
    {
        let st = agent.datapath.state();
        assert!(!st.policy.ipcache.contains_key(&host_prefix(2)));
        assert!(st.policy.entries.keys().all(|k| k.identity != 400));
        assert_eq!(st.policy.ipcache.get(&host_prefix(3)), Some(&401));
    }
    assert!(!store.last().remote_endpoints.contains_key(&client.key));
    assert_eq!(agent.remote_endpoint_count(), 1);
}

#[test]
fn a_resync_of_the_same_set_writes_nothing_and_a_smaller_one_sweeps_the_rest() {
    let (agent, store) = start_cluster(PersistedState::default());
    let set: Vec<RemoteEndpoint> = (2..7)
        .map(|i| {
            remote(
                &format!("c{i}"),
                "node-b",
                i,
                500 + u32::from(i),
                &[("app", "x")],
            )
        })
        .map(|mut r| {
            // One label set, one identity: the store gives them all 500.
            r.entry.identity = 500;
            r
        })
        .collect();
    agent
        .apply_remote_endpoints(batch(set.clone(), Vec::new(), true))
        .unwrap();
    let diffs = agent.datapath.state().diffs.len();
    let groups = store.groups();

    agent
        .apply_remote_endpoints(batch(set.clone(), Vec::new(), true))
        .unwrap();
    assert_eq!(
        agent.datapath.state().diffs.len(),
        diffs,
        "a resync of the same set wrote"
    );
    assert_eq!(
        store.groups(),
        groups,
        "a resync of the same set persisted something"
    );

    // A smaller set: only the missing go; what stays is not written again.
    agent
        .apply_remote_endpoints(batch(set[..3].to_vec(), Vec::new(), true))
        .unwrap();
    let st = agent.datapath.state();
    let last = st.diffs.last().unwrap();
    assert!(last.ipcache_set.is_empty(), "{last:?}");
    let mut gone = last.ipcache_del.clone();
    gone.sort();
    assert_eq!(gone, vec![host_prefix(5), host_prefix(6)]);
    for i in 2..5 {
        assert_eq!(st.policy.ipcache.get(&host_prefix(i)), Some(&500));
    }
    assert_eq!(store.last().remote_endpoints.len(), 3);
}

#[test]
fn persisted_remote_endpoints_are_in_the_ipcache_at_restart_before_any_resync() {
    let (agent, store) = start_cluster(PersistedState::default());
    let client = remote("c1", "node-b", 2, 400, &[("app", "client")]);
    agent
        .apply_remote_endpoints(batch(vec![client.clone()], Vec::new(), true))
        .unwrap();
    let saved = store.last();
    drop(agent);

    // Restart with the store unreachable: nothing from the runtime yet.
    let (agent, _) = start_cluster(saved.clone());
    assert_eq!(
        agent.datapath.state().policy.ipcache.get(&host_prefix(2)),
        Some(&400)
    );
    assert_eq!(agent.remote_endpoint_count(), 1);
    // The first resync of the same set changes nothing.
    let diffs = agent.datapath.state().diffs.len();
    agent
        .apply_remote_endpoints(batch(vec![client], Vec::new(), true))
        .unwrap();
    assert_eq!(agent.datapath.state().diffs.len(), diffs);

    // A single-node agent forgets them.
    let store = MemStore::with(saved.clone());
    let (single, _) = Agent::start(
        AgentConfig {
            pod_cidrs: "10.244.0.0/24".parse().unwrap(),
            ..AgentConfig::default()
        },
        FakeDatapath::default(),
        host_with(&[]),
        Box::new(store.clone()),
        saved,
    )
    .unwrap();
    assert_eq!(single.remote_endpoint_count(), 0);
    assert!(store.last().remote_endpoints.is_empty());
    assert!(!store.last().identities.is_cluster());
}

#[test]
fn cluster_policies_are_enforced_and_their_removal_unenforces() {
    let (agent, store) = start_cluster(PersistedState::default());
    agent
        .apply_cluster_identities(batch(
            vec![(300, "default".into(), labels(&[("app", "server")]))],
            Vec::new(),
            false,
        ))
        .unwrap();
    let server = add(&agent, "srv", "hypa", &[("app", "server")]).unwrap();
    assert_eq!(agent.datapath.state().flags[&server.id] & 1, 0);

    agent
        .apply_cluster_policies(batch(vec![policy(SERVER_FROM_CLIENT)], Vec::new(), false))
        .unwrap();
    let listed = agent.list_policies();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].source, "cluster store");
    assert_eq!(listed[0].selected_endpoints, vec![server.id]);
    assert_ne!(
        agent.datapath.state().flags[&server.id] & hypha_common::ENDPOINT_F_INGRESS_POLICY,
        0
    );
    assert!(
        store
            .last()
            .policies
            .iter()
            .any(|p| p.origin == PolicyOrigin::Cluster)
    );

    // Removed by key (resync with an empty set would do the same).
    agent
        .apply_cluster_policies(batch(
            Vec::new(),
            vec!["/hypha/v1/policies/default/server".into()],
            false,
        ))
        .unwrap();
    assert!(agent.list_policies().is_empty());
    assert_eq!(
        agent.datapath.state().flags[&server.id] & hypha_common::ENDPOINT_F_INGRESS_POLICY,
        0
    );
    assert!(
        agent
            .datapath
            .state()
            .policy
            .entries
            .keys()
            .all(|k| k.endpoint_id != server.id)
    );
}

#[test]
fn a_cluster_policy_replaces_a_watched_files_policy_of_the_same_name() {
    let (agent, _) = start_cluster(PersistedState::default());
    let report = agent.sync_policy_files(vec![crate::policy::DirChange::File {
        path: "/etc/hypha/policies/server.yaml".into(),
        parsed: Ok(vec![policy(SERVER_FROM_CLIENT)]),
    }]);
    assert!(report.outcomes.values().all(Result::is_ok), "{report:?}");
    let mut from_store = policy(SERVER_FROM_CLIENT);
    from_store.audit = true;
    agent
        .apply_cluster_policies(batch(vec![from_store], Vec::new(), true))
        .unwrap();
    let listed = agent.list_policies();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].source, "cluster store");
    assert!(listed[0].audit);
    let status = agent.status();
    let refused = &status.policy.refused_files;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].error.contains("default/server") && refused[0].error.contains("cluster store"),
        "{}",
        refused[0].error
    );
}

#[test]
fn cluster_namespace_labels_feed_namespace_selectors() {
    let (agent, store) = start_cluster(PersistedState::default());
    agent
        .apply_cluster_namespaces(batch(
            vec![("prod".into(), labels(&[("env", "prod")]))],
            Vec::new(),
            true,
        ))
        .unwrap();
    assert_eq!(
        store.last().namespace_labels.get("prod"),
        Some(&labels(&[("env", "prod")]))
    );
    agent
        .apply_cluster_namespaces(batch(Vec::new(), Vec::new(), true))
        .unwrap();
    assert!(store.last().namespace_labels.is_empty());
}

#[test]
fn the_stores_identity_numbers_win_for_remote_data() {
    let (agent, _) = start_cluster(PersistedState::default());
    agent
        .apply_cluster_identities(batch(
            vec![(300, "default".into(), labels(&[("app", "server")]))],
            Vec::new(),
            false,
        ))
        .unwrap();
    let server = add(&agent, "srv", "hypa", &[("app", "server")]).unwrap();
    // A remote endpoint of the same labels says the store now numbers them 310 (its
    // data was rebuilt): the local endpoint moves too, in the maps.
    agent
        .apply_remote_endpoints(batch(
            vec![remote("s2", "node-b", 2, 310, &[("app", "server")])],
            Vec::new(),
            false,
        ))
        .unwrap();
    let st = agent.datapath.state();
    assert_eq!(st.policy.ipcache.get(&host_prefix(2)), Some(&310));
    let local = IpNet::from(std::net::IpAddr::V4(server.address.unwrap()));
    assert_eq!(st.policy.ipcache.get(&local), Some(&310));
    drop(st);
    assert_eq!(agent.list()[0].identity, Some(310));
}

// ---------------------------------------------------------------- to the runtime

/// A cluster runtime in memory: numbers label sets from 1000 (or fails, as an
/// unreachable store does), records what is published and withdrawn, and applies what
/// is written to "the store" back to the agent, as the runtime's watch does.
#[derive(Default)]
struct FakeLink {
    agent: Mutex<Weak<TestAgent>>,
    numbers: Mutex<BTreeMap<(String, Labels), u32>>,
    resolved: Mutex<Vec<(String, Labels)>>,
    unreachable: AtomicBool,
    published: Mutex<Vec<(u32, u32)>>,
    withdrawn: Mutex<Vec<u32>>,
    namespaces: Mutex<BTreeMap<String, Labels>>,
    /// What `nodes` answers.
    nodes: Mutex<Vec<NodeInfo>>,
}

impl FakeLink {
    fn agent(&self) -> Arc<TestAgent> {
        self.agent
            .lock()
            .unwrap()
            .upgrade()
            .expect("the agent lives")
    }

    fn down(&self) -> Result<(), String> {
        if self.unreachable.load(Ordering::Relaxed) {
            Err("the cluster store is unreachable (waited 2s)".into())
        } else {
            Ok(())
        }
    }
}

impl ClusterLink for FakeLink {
    fn resolve_identity(&self, namespace: &str, labels: &Labels) -> Result<u32, String> {
        self.down()?;
        self.resolved
            .lock()
            .unwrap()
            .push((namespace.to_owned(), labels.clone()));
        let mut numbers = self.numbers.lock().unwrap();
        let next = 1000 + numbers.len() as u32;
        Ok(*numbers
            .entry((namespace.to_owned(), labels.clone()))
            .or_insert(next))
    }

    fn endpoint_published(&self, ep: &EndpointRecord, identity: u32) {
        self.published.lock().unwrap().push((ep.id, identity));
    }

    fn endpoint_withdrawn(&self, ep: &EndpointRecord) {
        self.withdrawn.lock().unwrap().push(ep.id);
    }

    fn publish_policies(
        &self,
        policies: Vec<Policy>,
        deletes: Vec<(String, String)>,
    ) -> Result<(), String> {
        self.down()?;
        let removes = deletes
            .into_iter()
            .map(|(ns, name)| format!("/hypha/v1/policies/{ns}/{name}"))
            .collect();
        self.agent()
            .apply_cluster_policies(batch(policies, removes, false))
            .map_err(|e| e.to_string())
    }

    fn publish_services(&self, txn: ServiceTxn) -> Result<bool, String> {
        self.down()?;
        let services = RemoteBatch {
            upserts: txn.put.into_iter().map(|(s, _)| s).collect(),
            removes: txn
                .delete
                .iter()
                .map(crate::service::Service::key)
                .collect(),
            resync: false,
        };
        let slices = RemoteBatch {
            upserts: txn.put_slices,
            removes: txn
                .delete_slices
                .iter()
                .map(|(ns, name)| format!("{ns}/{name}"))
                .collect(),
            resync: false,
        };
        self.agent()
            .apply_cluster_services(Some(services), Some(slices))
            .map(|()| true)
            .map_err(|e| e.to_string())
    }

    fn publish_namespace_labels(
        &self,
        namespace: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Labels, String> {
        self.down()?;
        let labels = {
            let mut all = self.namespaces.lock().unwrap();
            let l = all.entry(namespace.to_owned()).or_default();
            for k in remove {
                l.remove(k);
            }
            l.extend(set.clone());
            l.clone()
        };
        self.agent()
            .apply_cluster_namespaces(batch(
                vec![(namespace.to_owned(), labels.clone())],
                Vec::new(),
                false,
            ))
            .map_err(|e| e.to_string())?;
        Ok(labels)
    }

    fn status(&self) -> ClusterStatus {
        ClusterStatus::default()
    }

    fn nodes(&self) -> Result<Vec<NodeInfo>, String> {
        Ok(self.nodes.lock().unwrap().clone())
    }

    fn remove_node(&self, name: &str, _force: bool) -> Result<RemoveNodeResponse, ControlError> {
        Err(ControlError::NotFound(format!("no node {name}")))
    }
}

fn linked(saved: PersistedState) -> (Arc<TestAgent>, Arc<FakeLink>, MemStore) {
    let (agent, store) = start_cluster(saved);
    let agent = Arc::new(agent);
    let link = Arc::new(FakeLink::default());
    *link.agent.lock().unwrap() = Arc::downgrade(&agent);
    agent.set_cluster(link.clone());
    (agent, link, store)
}

#[test]
fn local_adds_take_the_clusters_numbers_and_are_published_and_withdrawn() {
    let (agent, link, store) = linked(PersistedState::default());
    let web = add(&agent, "w1", "hypa", &[("app", "web"), ("k8s:pod", "w1")]).unwrap();
    assert_eq!(web.identity, Some(1000));
    assert_eq!(
        *link.resolved.lock().unwrap(),
        vec![("default".to_owned(), labels(&[("app", "web")]))],
        "asked once, without the bookkeeping labels"
    );
    // A second endpoint of the same labels: the number is known, the store not asked.
    let web2 = add(&agent, "w2", "hypb", &[("app", "web")]).unwrap();
    assert_eq!(web2.identity, Some(1000));
    assert_eq!(link.resolved.lock().unwrap().len(), 1);
    assert_eq!(
        *link.published.lock().unwrap(),
        vec![(web.id, 1000), (web2.id, 1000)]
    );
    let ip = IpNet::from(std::net::IpAddr::V4(web.address.unwrap()));
    assert_eq!(agent.datapath.state().policy.ipcache.get(&ip), Some(&1000));
    // The number is persisted with the allocator.
    assert_eq!(
        store
            .last()
            .identities
            .assigned("default", &labels(&[("app", "web")])),
        Some(1000)
    );

    // Relabelled: the new labels' number, published again.
    let relabelled = agent
        .set_endpoint_labels(
            &web2.id.to_string(),
            &hypha_api::EndpointLabelsRequest {
                set: labels(&[("app", "api")]),
                remove: Vec::new(),
            },
        )
        .unwrap();
    assert_eq!(relabelled.identity, Some(1001));
    assert_eq!(
        link.published.lock().unwrap().last(),
        Some(&(web2.id, 1001))
    );

    agent.delete_endpoint("w1", "eth0").unwrap();
    assert_eq!(*link.withdrawn.lock().unwrap(), vec![web.id]);
    // GC withdraws too.
    agent
        .gc(&hypha_api::GcRequest {
            valid_attachments: Vec::new(),
        })
        .unwrap();
    assert_eq!(*link.withdrawn.lock().unwrap(), vec![web.id, web2.id]);
}

#[test]
fn an_add_with_unknown_labels_and_the_store_down_fails_and_leaves_nothing() {
    let (agent, link, store) = linked(PersistedState::default());
    link.unreachable.store(true, Ordering::Relaxed);
    let diffs = agent.datapath.state().diffs.len();
    let err = add(&agent, "a", "hypa", &[("app", "new")]).unwrap_err();
    assert_eq!(err.http_status(), 503, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("app=new") && text.contains("unreachable"),
        "{text}"
    );
    assert!(agent.list().is_empty());
    {
        let st = agent.datapath.state();
        assert!(st.attached.is_empty());
        assert_eq!(st.diffs.len(), diffs, "nothing written to the maps");
        assert!(st.policy.entries.is_empty());
        let pod: IpNet = "10.244.0.2/32".parse().unwrap();
        assert!(
            !st.policy.ipcache.contains_key(&pod),
            "{:?}",
            st.policy.ipcache
        );
    }
    assert!(link.published.lock().unwrap().is_empty());
    // The plugin's cleanup after a failed ADD releases the address.
    let del = agent.delete_endpoint("a", "eth0").unwrap();
    assert!(del.address_released.is_some());
    assert!(store.last().ipam.allocations.is_empty());
    assert!(store.last().endpoints.is_empty());

    // Labels whose number is already known still work with the store down.
    agent
        .apply_cluster_identities(batch(
            vec![(777, "default".into(), labels(&[("app", "known")]))],
            Vec::new(),
            false,
        ))
        .unwrap();
    let ep = add(&agent, "b", "hypb", &[("app", "known")]).unwrap();
    assert_eq!(ep.identity, Some(777));
}

#[test]
fn policies_and_namespace_labels_go_through_the_store_and_are_enforced_on_return() {
    let (agent, link, store) = linked(PersistedState::default());
    let server = add(&agent, "s", "hypa", &[("app", "server")]).unwrap();
    let resp = agent
        .apply_policies(&[PolicySource {
            source: "server.yaml".into(),
            content: SERVER_FROM_CLIENT.into(),
        }])
        .unwrap();
    assert_eq!(resp.applied, vec!["default/server".to_owned()]);
    assert!(resp.entries_set > 0);
    // Enforced on return, as a cluster policy.
    let listed = agent.list_policies();
    assert_eq!(listed[0].source, "cluster store");
    assert_ne!(
        agent.datapath.state().flags[&server.id] & hypha_common::ENDPOINT_F_INGRESS_POLICY,
        0
    );
    assert!(
        store
            .last()
            .policies
            .iter()
            .all(|p| p.origin == PolicyOrigin::Cluster)
    );

    // An invalid file changes nothing and never reaches the store.
    link.unreachable.store(true, Ordering::Relaxed);
    let err = agent
        .apply_policies(&[PolicySource {
            source: "bad.yaml".into(),
            content: "kind: NetworkPolicy\n".into(),
        }])
        .unwrap_err();
    assert_eq!(err.http_status(), 400, "{err}");
    // The store down: a valid change is refused with 503.
    let err = agent.delete_policy("default", "server").unwrap_err();
    assert_eq!(err.http_status(), 503, "{err}");
    assert_eq!(agent.list_policies().len(), 1);
    link.unreachable.store(false, Ordering::Relaxed);

    let summary = agent.delete_policy("default", "server").unwrap();
    assert_eq!(summary.selected_endpoints, vec![server.id]);
    assert!(agent.list_policies().is_empty());
    assert_eq!(
        agent.datapath.state().flags[&server.id] & hypha_common::ENDPOINT_F_INGRESS_POLICY,
        0
    );

    let ns = agent
        .set_namespace_labels(
            "prod",
            &NamespaceLabelsRequest {
                set: labels(&[("env", "prod")]),
                remove: Vec::new(),
            },
        )
        .unwrap();
    assert_eq!(ns.labels.get("env").map(String::as_str), Some("prod"));
    assert_eq!(
        ns.labels
            .get(crate::policy::NAMESPACE_NAME_LABEL)
            .map(String::as_str),
        Some("prod")
    );
    assert_eq!(
        store.last().namespace_labels.get("prod"),
        Some(&labels(&[("env", "prod")]))
    );
}

#[test]
fn node_list_carries_the_tunnel_counters_of_the_other_nodes() {
    let (agent, link, _store) = linked(PersistedState::default());
    let node = |name: &str| NodeInfo {
        name: name.into(),
        addresses: Vec::new(),
        pod_cidr: None,
        pod_cidr6: None,
        version: "0".into(),
        heartbeat_unix_ms: None,
        alive: true,
        endpoints: 0,
        local: name == NODE,
        tunnel: None,
    };
    *link.nodes.lock().unwrap() = vec![node(NODE), node("node-b"), node("node-c")];
    let stats = |n: u64| hypha_common::NodeStats {
        tx: hypha_common::Counter {
            packets: n,
            bytes: n * 100,
        },
        rx: hypha_common::Counter {
            packets: n + 1,
            bytes: 7,
        },
        dropped: hypha_common::Counter {
            packets: 2,
            bytes: 120,
        },
    };
    {
        let mut st = agent.datapath.state();
        st.node_stats
            .insert(crate::overlay::node_id("node-b"), stats(5));
        // This node's own id never shows (a node does not tunnel to itself).
        st.node_stats
            .insert(crate::overlay::node_id(NODE), stats(9));
    }
    let nodes = agent.nodes().unwrap();
    let by_name: BTreeMap<&str, &NodeInfo> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let b = by_name["node-b"]
        .tunnel
        .expect("node-b is routed through the tunnel");
    assert_eq!((b.tx.packets, b.tx.bytes), (5, 500));
    assert_eq!((b.rx.packets, b.rx.bytes), (6, 7));
    assert_eq!((b.dropped.packets, b.dropped.bytes), (2, 120));
    assert_eq!(by_name[NODE].tunnel, None, "the answering node itself");
    assert_eq!(
        by_name["node-c"].tunnel, None,
        "no counters: not tunnelled to"
    );
}

#[test]
fn the_monitor_names_identities_only_the_store_knows() {
    let (agent, _link, _store) = linked(PersistedState::default());
    assert_eq!(agent.identity_name(1500), None);
    // A number the store gave labels no endpoint of this node has (another node's pod).
    agent
        .apply_cluster_identities(batch(
            vec![(1500, "shop".to_owned(), labels(&[("app", "client")]))],
            Vec::new(),
            false,
        ))
        .unwrap();
    assert_eq!(
        agent.identity_name(1500).as_deref(),
        Some("shop/{app=client}")
    );
    assert_eq!(
        agent
            .identity_name(hypha_common::IDENTITY_REMOTE_NODE)
            .as_deref(),
        Some("remote-node")
    );
}

#[test]
fn other_nodes_addresses_get_the_remote_node_identity_and_survive_a_restart() {
    use hypha_common::IDENTITY_REMOTE_NODE;
    let (agent, store) = start_cluster(PersistedState::default());
    let node_b: std::net::IpAddr = Ipv4Addr::new(172, 16, 0, 12).into();
    let gw_b: std::net::IpAddr = Ipv4Addr::new(10, 244, 1, 1).into();
    let router6_b: std::net::IpAddr = "fd00:10:244:1::1".parse().unwrap();
    agent
        .set_remote_nodes([node_b, gw_b, router6_b].into())
        .unwrap();
    let ipcache = agent.datapath.state().policy.ipcache.clone();
    for a in [node_b, gw_b, router6_b] {
        assert_eq!(
            ipcache.get(&IpNet::from(a)),
            Some(&IDENTITY_REMOTE_NODE),
            "{a}"
        );
    }
    // A policy change does not take them out (the engine holds them).
    agent
        .apply_cluster_identities(batch(
            vec![(300, "default".into(), labels(&[("app", "server")]))],
            Vec::new(),
            false,
        ))
        .unwrap();
    add(&agent, "srv", "hypa", &[("app", "server")]).unwrap();
    agent
        .apply_cluster_policies(batch(vec![policy(SERVER_FROM_CLIENT)], Vec::new(), false))
        .unwrap();
    // Replaced as a set.
    agent.set_remote_nodes([node_b].into()).unwrap();
    {
        let st = agent.datapath.state();
        assert_eq!(
            st.policy.ipcache.get(&IpNet::from(node_b)),
            Some(&IDENTITY_REMOTE_NODE)
        );
        assert!(!st.policy.ipcache.contains_key(&IpNet::from(gw_b)));
        assert!(!st.policy.ipcache.contains_key(&IpNet::from(router6_b)));
    }

    // A restarted agent finds them in the maps and keeps them until the overlay gives the
    // set again (its start-up reconciliation removes what the engine does not hold).
    let installed = agent.datapath.state().policy.clone();
    let saved = store.last();
    let (again, _) = Agent::start(
        cluster_config(),
        FakeDatapath::from(crate::datapath::fake::FakeState {
            policy: installed,
            ..Default::default()
        }),
        host_with(&[("hypa", 10), ("hypb", 11), ("hypc", 12)]),
        Box::new(MemStore::with(saved.clone())),
        saved,
    )
    .unwrap();
    assert_eq!(
        again
            .datapath
            .state()
            .policy
            .ipcache
            .get(&IpNet::from(node_b)),
        Some(&IDENTITY_REMOTE_NODE)
    );
    again.set_remote_nodes(Default::default()).unwrap();
    assert!(
        !again
            .datapath
            .state()
            .policy
            .ipcache
            .contains_key(&IpNet::from(node_b))
    );
}

#[test]
fn a_failed_write_of_other_nodes_addresses_leaves_the_engine_as_it_was() {
    let (agent, _store) = start_cluster(PersistedState::default());
    let node_b: std::net::IpAddr = Ipv4Addr::new(172, 16, 0, 12).into();
    agent.set_remote_nodes([node_b].into()).unwrap();
    agent.datapath.state().fail_apply = true;
    let node_c: std::net::IpAddr = Ipv4Addr::new(172, 16, 0, 13).into();
    assert!(agent.set_remote_nodes([node_c].into()).is_err());
    agent.datapath.state().fail_apply = false;
    // The engine still holds node b: setting it again writes nothing.
    let diffs = agent.datapath.state().diffs.len();
    agent.set_remote_nodes([node_b].into()).unwrap();
    assert_eq!(agent.datapath.state().diffs.len(), diffs);
}
