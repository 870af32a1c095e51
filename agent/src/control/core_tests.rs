//! The agent core under concurrency: many ADDs and DELs at once, readers that do not wait
//! for an ADD, relabelling and named ports (against the fake datapath and host).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use hypha_api::{
    AllocateRequest, CreateEndpointRequest, EndpointLabelsRequest, MacAddr, NamedPort, PolicySource,
};
use hypha_common::{DIR_INGRESS, ENDPOINT_F_INGRESS_POLICY, PolicyKey};

use super::*;
use crate::datapath::fake::FakeDatapath;
use crate::host::HostLink;
use crate::host::fake::FakeHost;
use crate::state::mem::MemStore;

type TestAgent = Agent<FakeDatapath, FakeHost>;

/// A host with `n` veths `hyp0..`, ifindex 100 + i.
fn host(n: u32) -> FakeHost {
    let h = FakeHost::default();
    for i in 0..n {
        h.state().links.insert(
            format!("hyp{i}"),
            HostLink {
                index: 100 + i,
                mac: MacAddr([2, 0, 0, 0, (i >> 8) as u8, i as u8]),
            },
        );
    }
    h
}

fn agent_with(cidr: &str, links: u32) -> (TestAgent, MemStore) {
    let store = MemStore::default();
    let config = AgentConfig {
        pod_cidrs: cidr.parse().unwrap(),
        ..AgentConfig::default()
    };
    let (a, _) = Agent::start(
        config,
        FakeDatapath::default(),
        host(links),
        Box::new(store.clone()),
        PersistedState::default(),
    )
    .unwrap();
    (a, store)
}

/// ADD as the plugin does it: allocate, then create, for pod `i` on veth `hyp{i}`.
fn add(a: &TestAgent, i: u32, labels: &[(&str, &str)]) -> Result<Endpoint, ControlError> {
    let cid = format!("pod{i}");
    let alloc = a.allocate(&AllocateRequest {
        container_id: cid.clone(),
        ifname: "eth0".into(),
        address: None,
        address6: None,
    })?;
    a.create_endpoint(&CreateEndpointRequest {
        container_id: cid,
        ifname: "eth0".into(),
        netns: "/run/netns/x".into(),
        host_ifname: format!("hyp{i}"),
        address: alloc.address,
        pod_mac: MacAddr([2, 1, 0, 0, (i >> 8) as u8, i as u8]),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        external_ipam: false,
        bandwidth: None,
        ports: Vec::new(),
        address6: None,
    })
}

fn del(a: &TestAgent, i: u32) -> Result<DeleteResponse, ControlError> {
    a.delete_endpoint(&format!("pod{i}"), "eth0")
}

/// Everything the agent knows agrees: table, allocator, store, datapath, policy maps.
fn assert_consistent(a: &TestAgent, store: &MemStore, expect: &BTreeSet<String>) {
    let listed: BTreeSet<String> = a.list().into_iter().map(|e| e.container_id).collect();
    assert_eq!(&listed, expect, "endpoints listed");
    let saved = store.last();
    let saved_eps: BTreeSet<String> = saved
        .endpoints
        .iter()
        .map(|e| e.container_id.clone())
        .collect();
    assert_eq!(&saved_eps, expect, "endpoints saved");
    let saved_owners: BTreeSet<String> = saved
        .ipam
        .allocations
        .values()
        .map(|o| o.container_id.clone())
        .collect();
    assert_eq!(&saved_owners, expect, "reservations saved");
    let addresses: BTreeSet<Ipv4Addr> = a.list().iter().filter_map(|e| e.address).collect();
    assert_eq!(addresses.len(), expect.len(), "every address is unique");
    assert_eq!(a.status().ipam.allocated as usize, expect.len());
    assert_eq!(a.status().endpoints, expect.len());
    let dp = a.datapath.state();
    let attached: BTreeSet<String> = dp
        .attached
        .values()
        .map(|e| e.container_id.clone())
        .collect();
    assert_eq!(&attached, expect, "endpoints attached");
    let p = a.policy();
    assert_eq!(dp.policy.entries, p.engine.compiled().entries, "policy map");
    assert_eq!(dp.policy.ipcache, p.engine.compiled().ipcache, "ipcache");
    let table = a.table();
    assert_eq!(table.addresses.len(), expect.len(), "no claim left behind");
    assert_eq!(table.macs.len(), expect.len(), "no claim left behind");
}

const WEB_ONLY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]\n";

#[test]
fn concurrent_adds_and_dels_of_different_pods_leave_everything_in_agreement() {
    let (a, store) = agent_with("10.9.0.0/24", 120);
    a.apply_policies(&[PolicySource {
        source: "db.yaml".into(),
        content: WEB_ONLY.into(),
    }])
    .unwrap();
    for i in 0..40 {
        add(&a, i, &[("app", if i % 2 == 0 { "web" } else { "db" })]).unwrap();
    }
    // 40 DELs of the first pods and 40 ADDs of new ones, all at once.
    let a = Arc::new(a);
    let barrier = Arc::new(Barrier::new(80));
    let handles: Vec<_> = (0..80)
        .map(|k| {
            let (a, barrier) = (a.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                if k < 40 {
                    del(&a, k).map(|_| ())
                } else {
                    add(&a, k + 40, &[("app", "web")]).map(|_| ())
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    let expect: BTreeSet<String> = (80..120).map(|i| format!("pod{i}")).collect();
    assert_consistent(&a, &store, &expect);
    for i in 80..120 {
        del(&a, i).unwrap();
    }
    assert_consistent(&a, &store, &BTreeSet::new());
}

#[test]
fn concurrent_adds_of_one_attachment_make_one_endpoint() {
    let (a, store) = agent_with("10.9.0.0/24", 20);
    let a = Arc::new(a);
    let barrier = Arc::new(Barrier::new(20));
    let handles: Vec<_> = (0..20)
        .map(|k| {
            let (a, barrier) = (a.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                // The same container and interface, each with its own veth and MAC.
                let alloc = a.allocate(&AllocateRequest {
                    container_id: "same".into(),
                    ifname: "eth0".into(),
                    address: None,
                    address6: None,
                })?;
                a.create_endpoint(&CreateEndpointRequest {
                    container_id: "same".into(),
                    ifname: "eth0".into(),
                    netns: "/run/netns/x".into(),
                    host_ifname: format!("hyp{k}"),
                    address: alloc.address,
                    pod_mac: MacAddr([2, 3, 0, 0, 0, k as u8]),
                    labels: BTreeMap::new(),
                    external_ipam: false,
                    bandwidth: None,
                    ports: Vec::new(),
                    address6: None,
                })
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.http_status(), 409, "{r}");
    }
    assert_consistent(&a, &store, &BTreeSet::from(["same".to_owned()]));
}

#[test]
fn status_list_and_policy_names_do_not_wait_for_an_add_in_the_kernel() {
    let (a, _store) = agent_with("10.9.0.0/24", 4);
    a.apply_policies(&[PolicySource {
        source: "db.yaml".into(),
        content: WEB_ONLY.into(),
    }])
    .unwrap();
    let gate = a.datapath.state().hold_attach("hyp0");
    let a = Arc::new(a);
    let adder = {
        let a = a.clone();
        std::thread::spawn(move || add(&a, 0, &[("app", "db")]))
    };
    // Wait until the ADD is inside the datapath's attach.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !a.datapath.state().log.iter().any(|l| l == "attach hyp0") {
        assert!(
            std::time::Instant::now() < deadline,
            "the ADD never attached"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Readers answer while it is held there; so does another pod's ADD.
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let a = a.clone();
        std::thread::spawn(move || {
            let status = a.status();
            let list = a.list();
            let names: Vec<String> = (0..4096).filter_map(|id| a.policy_name(id)).collect();
            let metrics = a.metrics();
            tx.send((status.endpoints, list.len(), names, metrics.len()))
                .unwrap();
        });
    }
    let (endpoints, listed, names, metrics) = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("status, list and metrics answered while an ADD was in the kernel");
    assert_eq!((endpoints, listed), (0, 0));
    assert_eq!(names, vec!["default/db".to_owned()]);
    assert!(metrics > 0);
    let other = {
        let a = a.clone();
        std::thread::spawn(move || add(&a, 1, &[("app", "web")]))
    };
    let other = other.join().unwrap();
    assert!(other.is_ok(), "{other:?}");
    gate.release();
    adder.join().unwrap().unwrap();
    assert_eq!(a.status().endpoints, 2);
}

#[test]
fn relabelling_moves_the_endpoint_and_its_peers_follow() {
    let (a, store) = agent_with("10.9.0.0/24", 4);
    a.apply_policies(&[PolicySource {
        source: "db.yaml".into(),
        content: WEB_ONLY.into(),
    }])
    .unwrap();
    let db = add(&a, 0, &[("app", "db")]).unwrap();
    let client = add(&a, 1, &[("app", "other")]).unwrap();
    let entries_for = |a: &TestAgent, identity: u32| -> Vec<PolicyKey> {
        a.datapath
            .state()
            .policy
            .entries
            .keys()
            .filter(|k| {
                k.endpoint_id == db.id && k.direction == DIR_INGRESS && k.identity == identity
            })
            .copied()
            .collect()
    };
    let old_identity = a.policy().engine.identity_of(client.id).unwrap();
    assert!(
        entries_for(&a, old_identity).is_empty(),
        "not a web pod yet"
    );

    let ep = a
        .set_endpoint_labels(
            &client.id.to_string(),
            &EndpointLabelsRequest {
                set: BTreeMap::from([("app".into(), "web".into())]),
                remove: Vec::new(),
            },
        )
        .unwrap();
    assert_eq!(ep.labels.get("app").map(String::as_str), Some("web"));
    let new_identity = a.policy().engine.identity_of(client.id).unwrap();
    assert_ne!(new_identity, old_identity);
    let keys = entries_for(&a, new_identity);
    assert_eq!(keys.len(), 1, "db now allows the relabelled pod: {keys:?}");
    assert_eq!(keys[0].dport, 5432);
    assert_eq!(
        a.datapath.state().flags[&db.id] & ENDPOINT_F_INGRESS_POLICY,
        ENDPOINT_F_INGRESS_POLICY
    );
    // Saved with the endpoint; the maps are what the engine says.
    let saved = store.last();
    let rec = saved.endpoints.iter().find(|e| e.id == client.id).unwrap();
    assert_eq!(rec.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(
        a.datapath.state().policy.entries,
        a.policy().engine.compiled().entries
    );

    // And back: the entry goes.
    a.set_endpoint_labels(
        &client.container_id,
        &EndpointLabelsRequest {
            set: BTreeMap::new(),
            remove: vec!["app".into()],
        },
    )
    .unwrap();
    let back = a.policy().engine.identity_of(client.id).unwrap();
    assert!(entries_for(&a, back).is_empty());
}

#[test]
fn bad_labels_and_ports_are_refused_naming_what_is_wrong() {
    let (a, store) = agent_with("10.9.0.0/24", 2);
    let ep = add(&a, 0, &[]).unwrap();
    let groups = store.groups();
    let which = ep.id.to_string();
    for (set, remove, needle) in [
        (vec![("bad key", "x")], vec![], "bad key"),
        (vec![("app", "not valid!")], vec![], "not valid!"),
        (vec![("k8s:namespace", "other")], vec![], "k8s:namespace"),
        (vec![], vec!["k8s:namespace"], "k8s:namespace"),
    ] {
        let req = EndpointLabelsRequest {
            set: set
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            remove: remove.iter().map(|k| (*k).to_owned()).collect(),
        };
        let err = a.set_endpoint_labels(&which, &req).unwrap_err();
        assert_eq!(err.http_status(), 400, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    let port = |name: &str, port: u16, protocol: &str| NamedPort {
        name: name.into(),
        port,
        protocol: protocol.into(),
    };
    for (ports, needle) in [
        (vec![port("HTTP", 80, "TCP")], "HTTP"),
        (vec![port("http", 0, "TCP")], "port 0"),
        (vec![port("http", 80, "ICMP")], "ICMP"),
        (
            vec![port("http", 80, "TCP"), port("http", 81, "TCP")],
            "twice",
        ),
        (
            vec![port("a-very-long-port-name", 80, "TCP")],
            "a-very-long-port-name",
        ),
        (vec![port("123", 80, "TCP")], "123"),
    ] {
        let err = a.set_endpoint_ports(&which, &ports).unwrap_err();
        assert_eq!(err.http_status(), 400, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    assert_eq!(store.groups(), groups, "nothing was saved");
    let err = a
        .set_endpoint_ports("no-such-endpoint", &[port("http", 80, "TCP")])
        .unwrap_err();
    assert_eq!(err.http_status(), 404);
}

#[test]
fn named_ports_are_saved_listed_and_resolved_by_the_policy() {
    let named = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{ports: [{port: pg}]}]\n";
    let (a, store) = agent_with("10.9.0.0/24", 2);
    a.apply_policies(&[PolicySource {
        source: "db.yaml".into(),
        content: named.into(),
    }])
    .unwrap();
    let db = add(&a, 0, &[("app", "db")]).unwrap();
    let ports_of = |a: &TestAgent| -> Vec<u16> {
        a.datapath
            .state()
            .policy
            .entries
            .keys()
            .filter(|k| k.endpoint_id == db.id && k.direction == DIR_INGRESS && k.dport != 0)
            .map(|k| k.dport)
            .collect()
    };
    assert!(
        ports_of(&a).is_empty(),
        "an unresolved name matches nothing"
    );
    let view = a.endpoint_policy(&db.container_id).unwrap();
    assert!(
        view.unresolved_ports.iter().any(|u| u.contains("pg")),
        "{:?}",
        view.unresolved_ports
    );
    let ep = a
        .set_endpoint_ports(
            &db.container_id,
            &[NamedPort {
                name: "pg".into(),
                port: 5432,
                protocol: "TCP".into(),
            }],
        )
        .unwrap();
    assert_eq!(ep.ports.len(), 1);
    assert_eq!(ports_of(&a), vec![5432]);
    assert!(
        a.endpoint_policy(&db.container_id)
            .unwrap()
            .unresolved_ports
            .is_empty()
    );
    let saved = store.last();
    assert_eq!(saved.endpoints[0].ports, ep.ports);
    assert_eq!(
        a.datapath.state().policy.entries,
        a.policy().engine.compiled().entries
    );
}

#[test]
fn requests_of_an_add_locked_before_a_handled_del_are_refused_and_take_nothing() {
    let (a, store) = agent_with("10.9.0.0/24", 4);
    let request = AllocateRequest {
        container_id: "pod1".into(),
        ifname: "eth0".into(),
        address: None,
        address6: None,
    };
    // The killed ADD took the lock; the runtime's DEL came after it and was handled
    // before the ADD's last request.
    let killed_add_locked = hypha_api::boottime_ns();
    del(&a, 1).unwrap();
    let e = a
        .allocate_for(&request, Some(killed_add_locked))
        .unwrap_err();
    assert_eq!(e.http_status(), 409, "{e}");
    assert!(
        e.to_string().contains("pod1") && e.to_string().contains("given up on this ADD"),
        "{e}"
    );
    assert_consistent(&a, &store, &BTreeSet::new());
    // A create of that ADD (its ALLOCATE came before the DEL) is refused the same way.
    let create = CreateEndpointRequest {
        container_id: "pod1".into(),
        ifname: "eth0".into(),
        netns: "/run/netns/x".into(),
        host_ifname: "hyp1".into(),
        address: Some(Ipv4Addr::new(10, 9, 0, 5)),
        pod_mac: MacAddr([2, 1, 0, 0, 0, 1]),
        labels: BTreeMap::new(),
        external_ipam: true,
        bandwidth: None,
        ports: Vec::new(),
        address6: None,
    };
    let e = a
        .create_endpoint_for(&create, Some(killed_add_locked))
        .unwrap_err();
    assert_eq!(e.http_status(), 409, "{e}");
    assert_consistent(&a, &store, &BTreeSet::new());
    // The runtime's next ADD of the same attachment takes the lock after the DEL: served.
    let next_add_locked = hypha_api::boottime_ns();
    let alloc = a.allocate_for(&request, Some(next_add_locked)).unwrap();
    assert!(alloc.address.is_some());
    a.create_endpoint_for(
        &CreateEndpointRequest {
            address: alloc.address,
            external_ipam: false,
            ..create
        },
        Some(next_add_locked),
    )
    .unwrap();
    assert_consistent(&a, &store, &["pod1".to_owned()].into());
}
