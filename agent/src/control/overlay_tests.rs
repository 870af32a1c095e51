//! The agent's overlay over the fake datapath and host: start-up in each mode, the nodes
//! applied (and removed), the pods' MTU, the router address kept out of IPAM, the status.

use std::net::{IpAddr, Ipv6Addr};

use hypha_api::AllocateRequest;
use hypha_cluster::node::CidrPlan;
use hypha_common::{Counter, DIR_INGRESS, DropKey, DropReason};

use super::super::tests::{MemStore, host_with};
use super::*;
use crate::config::ClusterConfig;
use crate::datapath::fake::FakeDatapath;
use crate::host::fake::FakeHost;
use crate::ipam::Owner;
use crate::state::PersistedState;

type TestAgent = Agent<FakeDatapath, FakeHost>;

fn config(routing: Routing) -> AgentConfig {
    AgentConfig {
        pod_cidrs: "10.244.3.0/24,fd00:10:244:3::/64".parse().unwrap(),
        cluster: Some(ClusterConfig {
            store: vec!["http://192.0.2.1:2379".into()],
            node_name: "node-3".into(),
            node_ips: vec!["172.16.0.13".parse().unwrap()],
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            cidrs: CidrPlan {
                v4: Some(("10.244.0.0/16".parse().unwrap(), 24)),
                v6: Some(("fd00:10:244::/48".parse().unwrap(), 64)),
            },
            prefix: "/hypha/v1/".into(),
            identity_gc_grace: std::time::Duration::from_secs(600),
            node_ttl: std::time::Duration::from_secs(15),
            routing,
        }),
        ..AgentConfig::default()
    }
}

fn host(underlay_mtu: Option<u32>) -> FakeHost {
    let h = host_with(&[("eth0", 2), ("hypa", 10)]);
    h.state().underlay_mtu = underlay_mtu;
    h.state().subnets = vec![
        "172.16.0.0/24".parse().unwrap(),
        "fd00:16::/64".parse().unwrap(),
    ];
    h
}

fn start_with(
    config: AgentConfig,
    host: FakeHost,
    saved: PersistedState,
) -> Result<(TestAgent, super::super::StartReport), ControlError> {
    let store = MemStore::with(saved.clone());
    Agent::start(
        config,
        FakeDatapath::default(),
        host,
        Box::new(store),
        saved,
    )
}

fn start(routing: Routing) -> TestAgent {
    start_with(config(routing), host(Some(1500)), PersistedState::default())
        .unwrap()
        .0
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn node(name: &str, last: u8) -> ClusterNode {
    ClusterNode {
        name: name.into(),
        addresses: vec![
            ip(&format!("172.16.0.{last}")),
            ip(&format!("fd00:16::{last}")),
        ],
        pod_cidr: Some(format!("10.244.{}.0/24", last - 10).parse().unwrap()),
        pod_cidr6: Some(format!("fd00:10:244:{}::/64", last - 10).parse().unwrap()),
    }
}

fn allocate(agent: &TestAgent, cid: &str) -> hypha_api::Allocation {
    agent
        .allocate(&AllocateRequest {
            container_id: cid.into(),
            ifname: "eth0".into(),
            address: None,
            address6: None,
        })
        .unwrap()
}

#[test]
fn a_single_node_has_no_tunnel_no_mtu_and_no_routing_status() {
    let (agent, _) = start_with(
        AgentConfig {
            pod_cidrs: "10.7.0.0/24".parse().unwrap(),
            ..AgentConfig::default()
        },
        host(Some(1500)),
        PersistedState::default(),
    )
    .unwrap();
    let st = agent.datapath.state();
    assert!(st.log.iter().any(|l| l == "no tunnel"), "{:?}", st.log);
    assert_eq!(st.tunnel, None);
    drop(st);
    assert_eq!(agent.host.state().vxlan, None);
    let net = agent.host.state().node.clone().unwrap();
    assert_eq!(
        (net.router6, net.cluster_cidrs),
        (None, ClusterNets::default())
    );
    assert_eq!(allocate(&agent, "a").mtu, None);
    assert_eq!(agent.status().routing, None);
    // Nodes change nothing.
    agent.apply_cluster_nodes(vec![node("node-1", 11)]).unwrap();
    assert!(agent.datapath.state().peers.is_empty());
}

#[test]
fn tunnel_mode_starts_the_device_the_routes_and_hands_pods_its_mtu() {
    let agent = start(Routing::default());
    let vxlan = agent.host.state().vxlan.clone().unwrap();
    assert_eq!(
        vxlan,
        VxlanSpec {
            name: "hypha_vxlan".into(),
            port: 8472,
            mtu: 1450,
        }
    );
    let link = agent.host.state().links["hypha_vxlan"];
    assert_eq!(
        agent.datapath.state().tunnel,
        Some(TunnelSetup {
            ifindex: link.index,
            ifname: "hypha_vxlan".into(),
            local4: Some("172.16.0.13".parse().unwrap()),
            local6: None,
            // The router address is the IPv6 NodePort SNAT address.
            snat6: Some("fd00:10:244:3::1".parse().unwrap()),
        })
    );
    // The cluster CIDRs through the device, from the node's own addresses in its CIDRs,
    // before any node is known.
    assert_eq!(
        agent.host.state().cluster_routes,
        vec![
            ClusterRoute::Device {
                dst: "10.244.0.0/16".parse().unwrap(),
                ifindex: link.index,
                src: Some(ip("10.244.3.1")),
            },
            ClusterRoute::Device {
                dst: "fd00:10:244::/48".parse().unwrap(),
                ifindex: link.index,
                src: Some(ip("fd00:10:244:3::1")),
            },
        ]
    );
    // router6 on the host device, masquerading leaves the cluster CIDRs alone.
    let net = agent.host.state().node.clone().unwrap();
    assert_eq!(net.router6, Some("fd00:10:244:3::1".parse().unwrap()));
    assert_eq!(
        net.cluster_cidrs,
        ClusterNets {
            v4: Some("10.244.0.0/16".parse().unwrap()),
            v6: Some("fd00:10:244::/48".parse().unwrap()),
        }
    );
    // The first pod gets the MTU, and not the router address.
    let a = allocate(&agent, "a");
    assert_eq!(a.mtu, Some(1450));
    assert_eq!(
        a.address6,
        Some("fd00:10:244:3::2".parse::<Ipv6Addr>().unwrap())
    );
    let routing = agent.status().routing.unwrap();
    assert_eq!(
        routing,
        RoutingStatus {
            mode: "tunnel".into(),
            device: Some("hypha_vxlan".into()),
            port: Some(8472),
            mtu: 1450,
            peers: 0,
            drops: Vec::new(),
        }
    );
}

#[test]
fn tunnel_flags_set_the_device_port_and_mtu() {
    let agent = start(Routing::Tunnel {
        device: "vx0".into(),
        port: 4789,
        mtu: Some(1400),
    });
    assert_eq!(
        agent.host.state().vxlan,
        Some(VxlanSpec {
            name: "vx0".into(),
            port: 4789,
            mtu: 1400,
        })
    );
    assert_eq!(allocate(&agent, "a").mtu, Some(1400));
    let r = agent.status().routing.unwrap();
    assert_eq!(
        (r.device.as_deref(), r.port, r.mtu),
        (Some("vx0"), Some(4789), 1400)
    );
}

#[test]
fn an_underlay_too_small_for_the_tunnel_fails_the_start_naming_it() {
    let err = start_with(
        config(Routing::default()),
        host(Some(1300)),
        PersistedState::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("1300") && err.contains("1250") && err.contains("1280"),
        "{err}"
    );
    // Unknown underlay MTU: 1500 assumed, with a warning.
    let (agent, report) = start_with(
        config(Routing::default()),
        host(None),
        PersistedState::default(),
    )
    .unwrap();
    assert_eq!(allocate(&agent, "a").mtu, Some(1450));
    assert!(
        report.warnings.iter().any(|w| w.contains("172.16.0.13")),
        "{:?}",
        report.warnings
    );
}

#[test]
fn nodes_become_peers_and_remote_nodes_and_go_when_removed() {
    let agent = start(Routing::default());
    agent
        .apply_cluster_nodes(vec![
            node("node-3", 13),
            node("node-1", 11),
            node("node-2", 12),
        ])
        .unwrap();
    let peers = agent.datapath.state().peers.clone();
    assert_eq!(peers.len(), 2, "this node is not its own peer: {peers:?}");
    let p1 = &peers[&crate::overlay::node_id("node-1")];
    assert_eq!(
        (p1.name.as_str(), p1.underlay),
        ("node-1", ip("172.16.0.11"))
    );
    assert_eq!(p1.pod_cidr, Some("10.244.1.0/24".parse().unwrap()));
    assert_eq!(agent.status().routing.unwrap().peers, 2);
    // The routes stay the cluster CIDRs' (tunnel mode).
    assert_eq!(agent.host.state().cluster_routes.len(), 2);
    // node-2 removed from the store.
    agent
        .apply_cluster_nodes(vec![node("node-3", 13), node("node-1", 11)])
        .unwrap();
    let peers = agent.datapath.state().peers.clone();
    assert_eq!(
        peers.keys().copied().collect::<Vec<_>>(),
        vec![crate::overlay::node_id("node-1")]
    );
    assert_eq!(agent.status().routing.unwrap().peers, 1);
    agent.apply_cluster_nodes(Vec::new()).unwrap();
    assert!(agent.datapath.state().peers.is_empty());
}

#[test]
fn native_routing_routes_on_link_nodes_and_deletes_a_leftover_device() {
    let h = host(Some(9000));
    h.state().links.insert(
        "hypha_vxlan".into(),
        crate::host::HostLink {
            index: 77,
            mac: hypha_api::MacAddr([2, 0, 0, 0, 0, 77]),
        },
    );
    let (agent, _) = start_with(config(Routing::Native), h, PersistedState::default()).unwrap();
    assert!(!agent.host.state().links.contains_key("hypha_vxlan"));
    assert_eq!(agent.host.state().vxlan, None);
    assert_eq!(agent.datapath.state().tunnel, None);
    assert!(agent.datapath.state().log.iter().any(|l| l == "no tunnel"));
    assert_eq!(agent.host.state().node.clone().unwrap().router6, None);
    let a = allocate(&agent, "a");
    assert_eq!(a.mtu, Some(9000), "the underlay's own");
    assert_eq!(
        a.address6,
        Some("fd00:10:244:3::1".parse::<Ipv6Addr>().unwrap()),
        "no router address to keep out"
    );
    let mut far = node("node-4", 14);
    far.addresses = vec![ip("192.0.2.14")];
    agent
        .apply_cluster_nodes(vec![node("node-1", 11), far])
        .unwrap();
    assert!(agent.datapath.state().peers.is_empty(), "no tunnel peers");
    let via = |dst: &str, gw: &str| ClusterRoute::Via {
        dst: dst.parse().unwrap(),
        gateway: ip(gw),
    };
    assert_eq!(
        agent.host.state().cluster_routes,
        vec![
            via("10.244.1.0/24", "172.16.0.11"),
            via("fd00:10:244:1::/64", "fd00:16::11"),
        ]
    );
    let r = agent.status().routing.unwrap();
    assert_eq!(
        (r.mode.as_str(), r.device, r.port, r.mtu, r.peers),
        ("native", None, None, 9000, 1)
    );
    // node-1 removed: its routes go.
    agent.apply_cluster_nodes(Vec::new()).unwrap();
    assert!(agent.host.state().cluster_routes.is_empty());
}

#[test]
fn a_failed_apply_is_retried_until_it_succeeds() {
    let agent = start(Routing::Native);
    agent.host.state().fail_cluster_routes = true;
    let err = agent
        .apply_cluster_nodes(vec![node("node-1", 11)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("injected failure"), "{err}");
    assert!(agent.host.state().cluster_routes.is_empty());
    // Still failing: reported again, kept for the next try.
    assert!(matches!(agent.retry_cluster_nodes(), Some(Err(_))));
    agent.host.state().fail_cluster_routes = false;
    assert!(matches!(agent.retry_cluster_nodes(), Some(Ok(()))));
    assert_eq!(agent.host.state().cluster_routes.len(), 2);
    assert!(
        agent.retry_cluster_nodes().is_none(),
        "nothing left to retry"
    );
}

#[test]
fn leaving_tunnel_mode_clears_the_peers() {
    let dp = FakeDatapath::default();
    dp.state().peers.insert(
        7,
        crate::datapath::TunnelPeerSpec {
            node_id: 7,
            name: "old".into(),
            underlay: ip("172.16.0.7"),
            addresses: vec![ip("172.16.0.7")],
            pod_cidr: None,
            pod_cidr6: None,
        },
    );
    let saved = PersistedState::default();
    let (agent, _) = Agent::start(
        config(Routing::Native),
        dp,
        host(Some(1500)),
        Box::new(MemStore::with(saved.clone())),
        saved,
    )
    .unwrap();
    assert!(agent.datapath.state().peers.is_empty());
}

#[test]
fn a_router_address_a_pod_already_holds_is_left_to_it() {
    let mut saved = PersistedState::default();
    let owner = Owner {
        container_id: "old".into(),
        ifname: "eth0".into(),
    };
    saved
        .ipam6
        .allocations
        .insert("fd00:10:244:3::1".parse().unwrap(), owner);
    let (agent, report) = start_with(config(Routing::default()), host(Some(1500)), saved).unwrap();
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("fd00:10:244:3::1") && w.contains("old")),
        "{:?}",
        report.warnings
    );
    assert_eq!(agent.host.state().node.clone().unwrap().router6, None);
}

#[test]
fn device_drops_are_the_devices_by_reason() {
    let key = |ifindex, reason: DropReason, direction| DropKey {
        ifindex,
        reason: reason as u16,
        direction,
        _pad: 0,
    };
    let c = |packets| Counter {
        packets,
        bytes: packets * 100,
    };
    let all = vec![
        (key(5, DropReason::UnknownTunnelSource, DIR_INGRESS), c(3)),
        (key(5, DropReason::NoTunnelPeer, DIR_EGRESS), c(2)),
        (key(6, DropReason::NoTunnelPeer, DIR_EGRESS), c(9)),
    ];
    let drops = device_drops(&all, 5);
    assert_eq!(drops.len(), 2, "{drops:?}");
    assert_eq!(
        drops[0],
        DropCount {
            reason: "no-tunnel-peer".into(),
            direction: "egress".into(),
            packets: 2,
            bytes: 200,
        }
    );
    assert_eq!(drops[1].reason, "unknown-tunnel-source");
    assert_eq!(drops[1].direction, "ingress");
}
