//! What allocate and create refuse: malformed container ids and interface names, and a
//! MAC address another endpoint already uses.

use std::net::Ipv4Addr;

use hypha_api::MacAddr;

use super::tests::{host_with, start};
use super::*;
use crate::datapath::fake::FakeDatapath;

fn alloc(cid: &str, ifname: &str) -> AllocateRequest {
    AllocateRequest {
        container_id: cid.into(),
        ifname: ifname.into(),
        address: None,
        address6: None,
    }
}

fn create(cid: &str, host: &str, address: Ipv4Addr, mac: [u8; 6]) -> CreateEndpointRequest {
    CreateEndpointRequest {
        container_id: cid.into(),
        ifname: "eth0".into(),
        netns: "/run/netns/x".into(),
        host_ifname: host.into(),
        address: Some(address),
        pod_mac: MacAddr(mac),
        labels: Default::default(),
        external_ipam: false,
        bandwidth: None,
        ports: Vec::new(),
        address6: None,
    }
}

#[test]
fn container_ids_follow_the_cni_spec() {
    for ok in ["a", "0", "abc-DEF_1.2", &"f".repeat(64)] {
        validate_container_id(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
    }
    for bad in [
        "", "a\nb", "a b", "-a", ".a", "_a", "a/b", "a:b", "é", "a\0", "a\r",
    ] {
        let err = validate_container_id(bad).unwrap_err();
        assert_eq!(err.http_status(), 400);
        assert!(err.to_string().contains("container_id"), "{bad:?}: {err}");
    }
}

#[test]
fn interface_names_follow_the_cni_spec() {
    for ok in ["eth0", "a", "net1.100", "x-y_z", "é", &"i".repeat(15)] {
        validate_ifname(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
    }
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "a:b",
        "a b",
        "a\tb",
        "a\nb",
        "a\u{a0}b",
        &"i".repeat(16),
        // 16 bytes although 8 characters.
        &"é".repeat(8),
    ] {
        let err = validate_ifname(bad).unwrap_err();
        assert_eq!(err.http_status(), 400);
        assert!(err.to_string().contains("ifname"), "{bad:?}: {err}");
    }
}

#[test]
fn a_container_id_with_a_newline_reserves_nothing() {
    let (agent, _, store) = start(
        host_with(&[("hypa", 10)]),
        PersistedState::default(),
        FakeDatapath::default(),
    );
    let saves = store.0.lock().unwrap().len();
    let err = agent.allocate(&alloc("a\nb", "eth0")).unwrap_err();
    assert_eq!(err.http_status(), 400, "{err}");
    assert!(err.to_string().contains("container_id"), "{err}");
    let err = agent.allocate(&alloc("a", "eth0:1")).unwrap_err();
    assert!(err.to_string().contains("ifname"), "{err}");
    assert_eq!(agent.status().ipam.allocated, 0);
    assert_eq!(store.0.lock().unwrap().len(), saves, "nothing was saved");
    // The same on create, delete, check and gc.
    let err = agent
        .create_endpoint(&create(
            "a\nb",
            "hypa",
            Ipv4Addr::new(10, 7, 0, 2),
            [2, 0, 0, 0, 0, 1],
        ))
        .unwrap_err();
    assert_eq!(err.http_status(), 400, "{err}");
    assert_eq!(
        agent
            .delete_endpoint("a b", "eth0")
            .unwrap_err()
            .http_status(),
        400
    );
    assert_eq!(
        agent.check_endpoint("a", "..").unwrap_err().http_status(),
        400
    );
    let err = agent
        .gc(&GcRequest {
            valid_attachments: vec![Attachment {
                container_id: "a\n".into(),
                ifname: "eth0".into(),
            }],
        })
        .unwrap_err();
    assert!(err.to_string().contains("container_id"), "{err}");
}

#[test]
fn a_mac_another_endpoint_uses_is_refused_and_nothing_stays_reserved() {
    let (agent, _, store) = start(
        host_with(&[("hypa", 10), ("hypb", 11)]),
        PersistedState::default(),
        FakeDatapath::default(),
    );
    let a = agent.allocate(&alloc("a", "eth0")).unwrap();
    let ep = agent
        .create_endpoint(&create("a", "hypa", a.address.unwrap(), [2, 0, 0, 0, 0, 1]))
        .unwrap();
    let b = agent.allocate(&alloc("b", "eth0")).unwrap();
    let err = agent
        .create_endpoint(&create("b", "hypb", b.address.unwrap(), [2, 0, 0, 0, 0, 1]))
        .unwrap_err();
    assert_eq!(err.http_status(), 409, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("02:00:00:00:00:01") && text.contains(&format!("endpoint {}", ep.id)),
        "{text}"
    );
    // Nothing left behind: b's address is free again, in memory and on disk, and b has
    // no endpoint, route or attachment.
    assert_eq!(agent.list().len(), 1);
    assert_eq!(agent.status().ipam.allocated, 1);
    let owner = Owner {
        container_id: "b".into(),
        ifname: "eth0".into(),
    };
    assert_eq!(
        agent.table().ipam4.as_ref().unwrap().owner_address(&owner),
        None
    );
    assert!(
        !store
            .last()
            .ipam
            .allocations
            .values()
            .any(|o| o.container_id == "b")
    );
    assert_eq!(agent.host.state().routes.len(), 1);
    assert_eq!(agent.datapath.state().attached.len(), 1);
    // With another MAC it goes through, and gets an address again.
    let b = agent.allocate(&alloc("b", "eth0")).unwrap();
    agent
        .create_endpoint(&create("b", "hypb", b.address.unwrap(), [2, 0, 0, 0, 0, 2]))
        .unwrap();
    assert_eq!(agent.list().len(), 2);
}

#[test]
fn a_multicast_or_zero_mac_is_refused() {
    let (agent, _, _) = start(
        host_with(&[("hypa", 10)]),
        PersistedState::default(),
        FakeDatapath::default(),
    );
    let a = agent.allocate(&alloc("a", "eth0")).unwrap();
    for mac in [[0; 6], [1, 0, 0x5e, 0, 0, 1], [0xff; 6]] {
        let err = agent
            .create_endpoint(&create("a", "hypa", a.address.unwrap(), mac))
            .unwrap_err();
        assert_eq!(err.http_status(), 400, "{err}");
        assert!(err.to_string().contains("pod_mac"), "{err}");
    }
}
