//! Dual stack in the control plane (against the fake datapath and host): one address per
//! family the node has, both routed, released, persisted and restored; IPv4-only and
//! IPv6-only nodes; refusals that name what is wrong.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hypha_api::{AllocateRequest, CreateEndpointRequest, GcRequest, MacAddr};

use super::*;
use crate::datapath::fake::FakeDatapath;
use crate::host::HostLink;
use crate::host::fake::FakeHost;
use crate::state::mem::MemStore;

type TestAgent = Agent<FakeDatapath, FakeHost>;

fn host(n: u32) -> FakeHost {
    let h = FakeHost::default();
    for i in 0..n {
        h.state().links.insert(
            format!("hyp{i}"),
            HostLink {
                index: 100 + i,
                mac: MacAddr([2, 0, 0, 0, 0, i as u8]),
            },
        );
    }
    h
}

fn config(cidrs: &str) -> AgentConfig {
    AgentConfig {
        pod_cidrs: cidrs.parse().unwrap(),
        ..AgentConfig::default()
    }
}

fn start_with(cidrs: &str, h: FakeHost, saved: PersistedState) -> (TestAgent, MemStore) {
    let store = MemStore::with(saved.clone());
    let (a, _) = Agent::start(
        config(cidrs),
        FakeDatapath::default(),
        h,
        Box::new(store.clone()),
        saved,
    )
    .unwrap();
    (a, store)
}

fn alloc_req(cid: &str) -> AllocateRequest {
    AllocateRequest {
        container_id: cid.into(),
        ifname: "eth0".into(),
        address: None,
        address6: None,
    }
}

fn create_req(i: u32, alloc: &Allocation) -> CreateEndpointRequest {
    CreateEndpointRequest {
        container_id: format!("pod{i}"),
        ifname: "eth0".into(),
        netns: "/run/netns/x".into(),
        host_ifname: format!("hyp{i}"),
        address: alloc.address,
        address6: alloc.address6,
        pod_mac: MacAddr([2, 1, 0, 0, 0, i as u8]),
        labels: Default::default(),
        external_ipam: false,
        bandwidth: None,
        ports: Vec::new(),
    }
}

fn add(a: &TestAgent, i: u32) -> Result<Endpoint, ControlError> {
    let alloc = a.allocate(&alloc_req(&format!("pod{i}")))?;
    a.create_endpoint(&create_req(i, &alloc))
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

#[test]
fn a_dual_stack_pod_gets_routes_records_and_releases_both_families() {
    let (a, store) = start_with(
        "10.7.0.0/24,fd00:7::/64",
        host(2),
        PersistedState::default(),
    );
    let alloc = a.allocate(&alloc_req("pod0")).unwrap();
    assert_eq!(alloc.address, Some(Ipv4Addr::new(10, 7, 0, 2)));
    assert_eq!(alloc.gateway, Some(Ipv4Addr::new(10, 7, 0, 1)));
    assert_eq!(alloc.address6, Some(v6("fd00:7::1")));
    assert_eq!(alloc.gateway6, Some(v6("fe80::1")));
    assert_eq!(alloc.pod_cidr6, Some("fd00:7::/64".parse().unwrap()));
    // Asking again gives the same addresses and persists nothing new.
    assert_eq!(a.allocate(&alloc_req("pod0")).unwrap(), alloc);
    let saved = store.last();
    assert_eq!(saved.ipam.allocations.len(), 1);
    assert_eq!(saved.ipam6.allocations.len(), 1);
    assert_eq!(saved.ipam6.last, Some(v6("fd00:7::1")));

    let ep = a.create_endpoint(&create_req(0, &alloc)).unwrap();
    assert_eq!((ep.address, ep.address6), (alloc.address, alloc.address6));
    assert_eq!(
        a.host.state().routes,
        vec![(100, Ipv4Addr::new(10, 7, 0, 2))]
    );
    assert_eq!(a.host.state().routes6, vec![(100, v6("fd00:7::1"))]);
    assert_eq!(store.last().endpoints[0].address6, Some(v6("fd00:7::1")));
    let listed = a.list();
    assert_eq!(listed[0].address6, Some(v6("fd00:7::1")));

    let status = a.status();
    assert_eq!(status.node.pod_cidr6, Some("fd00:7::/64".parse().unwrap()));
    assert_eq!(status.node.gateway6, Some(v6("fe80::1")));
    assert_eq!(status.ipam.allocated6, 1);
    assert_eq!(status.ipam.capacity6, u64::MAX - 128);
    assert_eq!(status.ipam.available6, u64::MAX - 129);
    assert_eq!(status.ipam.allocated, 1);

    // A second pod's addresses differ in both families.
    let other = add(&a, 1).unwrap();
    assert_eq!(other.address6, Some(v6("fd00:7::2")));

    let del = a.delete_endpoint("pod0", "eth0").unwrap();
    assert!(del.endpoint_removed);
    assert_eq!(del.address_released, Some(Ipv4Addr::new(10, 7, 0, 2)));
    assert_eq!(del.address6_released, Some(v6("fd00:7::1")));
    let saved = store.last();
    assert_eq!(saved.ipam6.allocations.len(), 1, "only pod1's is left");
    assert!(!saved.ipam6.allocations.contains_key(&v6("fd00:7::1")));

    // GC releases and reports both families.
    let gc = a
        .gc(&GcRequest {
            valid_attachments: Vec::new(),
        })
        .unwrap();
    let mut released = gc.released.clone();
    released.sort();
    assert_eq!(
        released,
        vec![
            IpAddr::V4(Ipv4Addr::new(10, 7, 0, 3)),
            IpAddr::V6(v6("fd00:7::2"))
        ]
    );
    let saved = store.last();
    assert!(saved.ipam.allocations.is_empty() && saved.ipam6.allocations.is_empty());
}

#[test]
fn a_restart_restores_both_families() {
    let (a, store) = start_with(
        "10.7.0.0/24,fd00:7::/64",
        host(3),
        PersistedState::default(),
    );
    let ep = add(&a, 0).unwrap();
    // An allocation without an endpoint yet (an ADD cut short) is kept too.
    let pending = a.allocate(&alloc_req("pod2")).unwrap();
    drop(a);
    let (b, store_b) = start_with("10.7.0.0/24,fd00:7::/64", host(3), store.last());
    assert_eq!(b.host.state().routes6, vec![(100, ep.address6.unwrap())]);
    assert_eq!(b.list()[0].address6, ep.address6);
    // The restored allocator neither hands out a held address nor restarts its walk.
    assert_eq!(b.allocate(&alloc_req("pod2")).unwrap(), pending);
    let next = b.allocate(&alloc_req("pod1")).unwrap();
    assert_eq!(next.address6, Some(v6("fd00:7::3")));
    let del = b.delete_endpoint("pod0", "eth0").unwrap();
    assert_eq!(del.address6_released, ep.address6);

    // An endpoint whose veth vanished while the agent was down goes with both addresses.
    let (c, store_c) = start_with("10.7.0.0/24,fd00:7::/64", host(3), store_b.last());
    let e = add(&c, 0).unwrap();
    drop(c);
    let (d, store_d) = start_with("10.7.0.0/24,fd00:7::/64", host(0), store_c.last());
    assert!(d.list().is_empty());
    let saved = store_d.last();
    assert!(!saved.ipam6.allocations.contains_key(&e.address6.unwrap()));
}

#[test]
fn ipv6_only_and_ipv4_only_nodes() {
    let (a, store) = start_with("fd00:7::/120", host(1), PersistedState::default());
    let alloc = a.allocate(&alloc_req("pod0")).unwrap();
    assert_eq!(
        (alloc.address, alloc.gateway, alloc.pod_cidr),
        (None, None, None)
    );
    assert_eq!(alloc.address6, Some(v6("fd00:7::1")));
    let ep = a.create_endpoint(&create_req(0, &alloc)).unwrap();
    assert_eq!((ep.address, ep.address6), (None, Some(v6("fd00:7::1"))));
    assert!(a.host.state().routes.is_empty());
    assert_eq!(a.host.state().routes6.len(), 1);
    let node = a.host.state().node.clone().unwrap();
    assert_eq!(node.gateway, None);
    let status = a.status();
    assert_eq!((status.node.pod_cidr, status.node.gateway), (None, None));
    assert_eq!((status.ipam.capacity, status.ipam.capacity6), (0, 255));
    assert!(store.last().ipam.allocations.is_empty());

    let (b, store) = start_with("10.8.0.0/24", host(1), PersistedState::default());
    let alloc = b.allocate(&alloc_req("pod0")).unwrap();
    assert_eq!(
        (alloc.address6, alloc.gateway6, alloc.pod_cidr6),
        (None, None, None)
    );
    b.create_endpoint(&create_req(0, &alloc)).unwrap();
    assert!(b.host.state().routes6.is_empty());
    assert!(store.last().ipam6.allocations.is_empty());
    assert_eq!(b.status().ipam.capacity6, 0);
}

#[test]
fn a_family_the_node_lacks_is_refused_by_name() {
    let (a, store) = start_with("10.8.0.0/24", host(1), PersistedState::default());
    let err = a
        .allocate(&AllocateRequest {
            address6: Some(v6("fd00:8::5")),
            ..alloc_req("pod0")
        })
        .unwrap_err();
    assert_eq!(err.http_status(), 400, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("fd00:8::5") && msg.contains("no IPv6 pod CIDR"),
        "{msg}"
    );
    assert!(store.last().ipam.allocations.is_empty(), "nothing taken");

    let (b, _) = start_with("fd00:8::/64", host(1), PersistedState::default());
    let err = b
        .allocate(&AllocateRequest {
            address: Some(Ipv4Addr::new(10, 8, 0, 5)),
            ..alloc_req("pod0")
        })
        .unwrap_err();
    assert_eq!(err.http_status(), 400, "{err}");
    assert!(err.to_string().contains("10.8.0.5") && err.to_string().contains("no IPv4 pod CIDR"));

    // A create request with an address of a missing family, even from a delegated IPAM.
    let alloc = b.allocate(&alloc_req("pod0")).unwrap();
    let err = b
        .create_endpoint(&CreateEndpointRequest {
            address: Some(Ipv4Addr::new(10, 8, 0, 5)),
            external_ipam: true,
            ..create_req(0, &alloc)
        })
        .unwrap_err();
    assert_eq!(err.http_status(), 400, "{err}");
    assert!(err.to_string().contains("no IPv4 pod CIDR"), "{err}");
}

#[test]
fn specific_addresses_per_family_and_their_refusals() {
    let (a, store) = start_with(
        "10.7.0.0/24,fd00:7::/64",
        host(2),
        PersistedState::default(),
    );
    let alloc = a
        .allocate(&AllocateRequest {
            address: Some(Ipv4Addr::new(10, 7, 0, 50)),
            address6: Some(v6("fd00:7::50")),
            ..alloc_req("pod0")
        })
        .unwrap();
    assert_eq!(alloc.address, Some(Ipv4Addr::new(10, 7, 0, 50)));
    assert_eq!(alloc.address6, Some(v6("fd00:7::50")));
    // Only one family asked for: the other is allocated.
    let other = a
        .allocate(&AllocateRequest {
            address6: Some(v6("fd00:7::51")),
            ..alloc_req("pod1")
        })
        .unwrap();
    assert_eq!(other.address6, Some(v6("fd00:7::51")));
    assert!(other.address.is_some());
    // Taken in IPv6: refused, and the IPv4 address it would have got is not kept.
    let before = store.last();
    let err = a
        .allocate(&AllocateRequest {
            address6: Some(v6("fd00:7::50")),
            ..alloc_req("pod2")
        })
        .unwrap_err();
    assert_eq!(err.http_status(), 409, "{err}");
    assert!(err.to_string().contains("fd00:7::50"), "{err}");
    assert_eq!(store.last(), before);
    assert_eq!(a.status().ipam.allocated, 2);
    // Outside the prefix, or the subnet-router anycast.
    for bad in ["fd00:9::1", "fd00:7::"] {
        let err = a
            .allocate(&AllocateRequest {
                address6: Some(v6(bad)),
                ..alloc_req("pod3")
            })
            .unwrap_err();
        assert_eq!(err.http_status(), 400, "{bad}: {err}");
        assert!(err.to_string().contains(bad), "{err}");
    }
}

#[test]
fn create_requests_must_match_the_allocation_in_every_family() {
    let (a, _) = start_with(
        "10.7.0.0/24,fd00:7::/64",
        host(2),
        PersistedState::default(),
    );
    let alloc = a.allocate(&alloc_req("pod0")).unwrap();
    let err = a
        .create_endpoint(&CreateEndpointRequest {
            address6: Some(v6("fd00:7::99")),
            ..create_req(0, &alloc)
        })
        .unwrap_err();
    assert_eq!(err.http_status(), 400, "{err}");
    assert!(err.to_string().contains("fd00:7::99"), "{err}");
    let err = a
        .create_endpoint(&CreateEndpointRequest {
            address6: None,
            ..create_req(0, &alloc)
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("IPv6 address fd00:7::1")
            && err.to_string().contains("does not give it"),
        "{err}"
    );
    let err = a
        .create_endpoint(&CreateEndpointRequest {
            address: None,
            address6: None,
            ..create_req(0, &alloc)
        })
        .unwrap_err();
    assert!(err.to_string().contains("no address"), "{err}");
    // The right request still works after the refusals (nothing was left claimed).
    a.create_endpoint(&create_req(0, &alloc)).unwrap();

    // A delegated IPAM may give one family only, but not an address the agent reserved.
    let err = a
        .create_endpoint(&CreateEndpointRequest {
            address: None,
            address6: alloc.address6,
            external_ipam: true,
            ..create_req(1, &alloc)
        })
        .unwrap_err();
    assert_eq!(err.http_status(), 409, "{err}");
    let ep = a
        .create_endpoint(&CreateEndpointRequest {
            address: None,
            address6: Some(v6("fd00:7::abc")),
            external_ipam: true,
            ..create_req(1, &alloc)
        })
        .unwrap();
    assert_eq!((ep.address, ep.address6), (None, Some(v6("fd00:7::abc"))));
    let del = a.delete_endpoint("pod1", "eth0").unwrap();
    assert_eq!(
        del.address6_released, None,
        "a delegated address is not the agent's"
    );
}

#[test]
fn a_mac_conflict_releases_both_reservations() {
    let (a, store) = start_with(
        "10.7.0.0/24,fd00:7::/64",
        host(2),
        PersistedState::default(),
    );
    add(&a, 0).unwrap();
    let alloc = a.allocate(&alloc_req("pod1")).unwrap();
    let err = a
        .create_endpoint(&CreateEndpointRequest {
            pod_mac: MacAddr([2, 1, 0, 0, 0, 0]),
            ..create_req(1, &alloc)
        })
        .unwrap_err();
    assert_eq!(err.http_status(), 409, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&alloc.address.unwrap().to_string())
            && msg.contains(&alloc.address6.unwrap().to_string()),
        "{msg}"
    );
    assert_eq!(store.last().ipam6.allocations.len(), 1);
}

#[test]
fn a_saved_reservation_of_a_family_the_node_no_longer_has_stops_the_start() {
    let (a, store) = start_with(
        "10.7.0.0/24,fd00:7::/64",
        host(1),
        PersistedState::default(),
    );
    add(&a, 0).unwrap();
    drop(a);
    let saved = store.last();
    let err = Agent::start(
        config("10.7.0.0/24"),
        FakeDatapath::default(),
        host(1),
        Box::new(MemStore::with(saved.clone())),
        saved,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("fd00:7::1") && err.contains("no IPv6 pod CIDR"),
        "{err}"
    );
}

#[test]
fn the_node_s_own_addresses_and_ipv6_link_local_are_the_host_identity() {
    let h = host(0);
    let node6: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
    let node4: Ipv4Addr = "192.0.2.7".parse().unwrap();
    h.state().addresses = vec![IpAddr::V4(node4), IpAddr::V6(node6)];
    let (a, _) = start_with("10.7.0.0/24,fd00:7::/64", h, PersistedState::default());
    let ipcache = a.datapath.state().policy.ipcache.clone();
    let host = hypha_common::IDENTITY_HOST;
    for net in [
        "2001:db8:1::1/128",
        "192.0.2.7/32",
        "10.7.0.1/32",
        "fe80::/10",
    ] {
        assert_eq!(
            ipcache.get(&net.parse::<ipnet::IpNet>().unwrap()),
            Some(&host),
            "{net} in {ipcache:?}"
        );
    }
}
