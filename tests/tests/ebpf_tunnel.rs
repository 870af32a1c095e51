//! `BPF_PROG_TEST_RUN` tests of the tunnel datapath: `hypha_from_pod` sending to pods on
//! other nodes (`hypha_tunnel4/6`), and the VXLAN device's programs, `hypha_from_tunnel`
//! and `hypha_to_tunnel`, on what a test run can give them.
//!
//! **Privileged**: every test loads the eBPF object (CAP_BPF, CAP_SYS_ADMIN for a
//! private bpffs) and creates veth pairs in a fresh network namespace of its own
//! (CAP_NET_ADMIN). Run as root, after `cargo xtask build-ebpf`.
//!
//! A test run cannot give a packet tunnel metadata (the VNI and outer source a VXLAN
//! device attaches on receive), nor show the key `bpf_skb_set_tunnel_key` sets; the
//! cluster tests cover those end to end. Here: `bpf_redirect` shows as the verdict
//! `TC_ACT_REDIRECT`, the frame as rewritten, and the counters.

use hypha_common::{
    Counter, DIR_EGRESS, DIR_INGRESS, DropKey, DropReason, ENDPOINT_F_EGRESS_POLICY, EndpointInfo,
    FamilyStats, NodeConfig, NodeStats, PEER_F_IPV6, POLICY_ALLOW, PolicyEntry, PolicyKey,
    TunnelConfig, TunnelPeer,
    programs::{FROM_POD, FROM_TUNNEL, TO_TUNNEL},
};
use hypha_tests::ebpf::{Datapath, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestNetns};

/// Pod A on this node (10.244.0.0/24, fd00:244::/64).
const A4: [u8; 4] = [10, 244, 0, 7];
const A6: [u8; 16] = [0xfd, 0, 0x02, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const GATEWAY4: [u8; 4] = [10, 244, 0, 1];
/// Pod R on node 2 (10.244.1.0/24, fd00:244:0:1::/64), reached through the tunnel.
const R4: [u8; 4] = [10, 244, 1, 9];
const R6: [u8; 16] = [0xfd, 0, 0x02, 0x44, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9];
const NODE2_CIDR4: [u8; 4] = [10, 244, 1, 0];
const NODE2_CIDR6: [u8; 16] = [0xfd, 0, 0x02, 0x44, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
/// In the cluster CIDR, but in no node's pod CIDR.
const NOWHERE4: [u8; 4] = [10, 244, 200, 1];
/// Node 2's underlay address, and its node id.
const NODE2_UNDERLAY: [u8; 4] = [192, 168, 77, 2];
const NODE2: u32 = 0x5eed_0002;

const A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x07];
const HOST_A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];
const VXLAN_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];

const ID_A: u32 = 300;
const ID_R: u32 = 301;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_HLEN: usize = 14;
const UDP: u8 = 17;

/// Pod A behind a veth, a "VXLAN device" (a veth: a test run only needs an ifindex), and
/// node 2 as a tunnel peer for both families.
struct Node {
    dp: Datapath,
    /// ifindex of A's host-side veth.
    a: u32,
    /// ifindex of the tunnel device.
    vxlan: u32,
    // Last: the namespace, and the devices in it, go after everything else.
    _netns: TestNetns,
}

impl Node {
    /// A node with a tunnel (`hypha_tunnel_cfg` set) when `tunnel`, and node 2's pod
    /// CIDRs routed to it when `peer`.
    fn new(tunnel: bool, peer: bool) -> Self {
        Self::with_flags(tunnel, peer, 0)
    }

    fn with_flags(tunnel: bool, peer: bool, a_flags: u32) -> Self {
        let netns = TestNetns::enter();
        let a = netns.add_veth("hy-host-a", "hy-pod-a");
        let vxlan = netns.add_veth("hy-vxlan", "hy-vxlan-peer");
        let mut dp = Datapath::load();
        dp.load_tunnel_programs();
        dp.set_config(NodeConfig {
            gateway: u32::from_ne_bytes(GATEWAY4),
            flags: 0,
        });
        dp.add_endpoint_with(
            Some(A4),
            Some(A6),
            EndpointInfo {
                ifindex: a,
                endpoint_id: 1,
                pod_mac: A_MAC,
                host_mac: HOST_A_MAC,
                flags: a_flags,
            },
        );
        dp.set_identity(A4, 32, ID_A);
        dp.set_identity6(A6, 128, ID_A);
        // Other nodes' pods are in the ipcache (issue 12).
        dp.set_identity(R4, 32, ID_R);
        dp.set_identity6(R6, 128, ID_R);
        if tunnel {
            dp.set_tunnel_config(TunnelConfig {
                ifindex: vxlan,
                flags: 0,
                local4: u32::from_ne_bytes([192, 168, 77, 1]),
                _pad: 0,
                local6: [0; 16],
            });
        }
        if peer {
            let node2 = TunnelPeer {
                node_id: NODE2,
                flags: 0,
                addr4: u32::from_ne_bytes(NODE2_UNDERLAY),
                _pad: 0,
                addr6: [0; 16],
            };
            dp.add_tunnel_peer4(NODE2_CIDR4, 24, node2);
            dp.add_tunnel_peer6(NODE2_CIDR6, 64, node2);
            dp.add_node4(NODE2_UNDERLAY, NODE2);
            dp.add_node_stats(NODE2);
        }
        Self {
            dp,
            a,
            vxlan,
            _netns: netns,
        }
    }

    fn stats_a(&self) -> FamilyStats {
        self.dp.stats(self.a)
    }

    fn node2(&self) -> NodeStats {
        self.dp
            .node_stats(NODE2)
            .expect("node 2's hypha_node_stats entry")
    }

    /// Asserts that the only drop counted is `reason` against the tunnel device in
    /// `direction`, for one frame of `len` bytes.
    fn assert_device_drop(&self, reason: DropReason, direction: u8, len: usize) {
        let key = DropKey {
            ifindex: self.vxlan,
            reason: reason as u16,
            direction,
            _pad: 0,
        };
        assert_eq!(self.dp.drops(), vec![(key, counter(1, len))], "hypha_drops");
    }
}

fn counter(packets: u64, bytes: usize) -> Counter {
    Counter {
        packets,
        bytes: bytes as u64,
    }
}

fn stats_with(select: impl FnOnce(&mut FamilyStats) -> &mut Counter, c: Counter) -> FamilyStats {
    let mut stats = FamilyStats::default();
    *select(&mut stats) = c;
    stats
}

// ---- frames ----

fn eth(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_HLEN + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn udp(dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&12u16.to_be_bytes());
    p.extend_from_slice(&[0, 0, b'h', b'y', b'p', b'h']);
    p
}

/// An IPv4 UDP packet with a valid header checksum.
fn ipv4(src: [u8; 4], dst: [u8; 4], ttl: u8, dport: u16) -> Vec<u8> {
    let payload = udp(dport);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0]); // id, DF
    ip.extend_from_slice(&[ttl, UDP, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let csum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    ip.extend_from_slice(&payload);
    ip
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv6(src: [u8; 16], dst: [u8; 16], hop_limit: u8, dport: u16) -> Vec<u8> {
    let payload = udp(dport);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[UDP, hop_limit]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(&payload);
    ip
}

/// A frame pod A sends to `dst` through its gateway.
fn a_to4(dst: [u8; 4], ttl: u8) -> Vec<u8> {
    eth(HOST_A_MAC, A_MAC, ETH_P_IP, &ipv4(A4, dst, ttl, 53))
}

fn a_to6(dst: [u8; 16], hop_limit: u8) -> Vec<u8> {
    eth(HOST_A_MAC, A_MAC, ETH_P_IPV6, &ipv6(A6, dst, hop_limit, 53))
}

/// `frame` with its TTL one lower and the header checksum recomputed from scratch.
fn ttl_decremented(frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    let ip = &mut out[ETH_HLEN..ETH_HLEN + 20];
    ip[8] -= 1;
    ip[10..12].copy_from_slice(&[0, 0]);
    let csum = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    out
}

// ---- hypha_from_pod ----

#[test]
fn ipv4_to_a_pod_on_another_node_goes_into_the_tunnel() {
    hypha_tests::require_root!();
    let node = Node::new(true, true);
    let frame = a_to4(R4, 64);
    let run = node.dp.run(FROM_POD, &frame, node.a);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "verdict");
    // TTL one lower, checksum updated; the inner Ethernet header as the pod sent it.
    assert_eq!(run.frame, ttl_decremented(&frame), "frame");
    assert_eq!(
        node.stats_a(),
        stats_with(|s| &mut s.egress.tunnel, counter(1, frame.len())),
        "A's counters"
    );
    assert_eq!(
        node.node2(),
        NodeStats {
            tx: counter(1, frame.len()),
            ..NodeStats::default()
        },
        "node 2's counters"
    );
    assert!(node.dp.drops().is_empty(), "drops: {:?}", node.dp.drops());
}

#[test]
fn ipv6_to_a_pod_on_another_node_goes_into_the_tunnel() {
    hypha_tests::require_root!();
    let node = Node::new(true, true);
    let frame = a_to6(R6, 64);
    let run = node.dp.run(FROM_POD, &frame, node.a);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "verdict");
    let mut expected = frame.clone();
    expected[ETH_HLEN + 7] = 63;
    assert_eq!(run.frame, expected, "frame: hop limit one lower");
    assert_eq!(
        node.dp.stats_by_family(node.a).ipv6,
        stats_with(|s| &mut s.egress.tunnel, counter(1, frame.len())),
        "A's IPv6 counters"
    );
    assert_eq!(node.node2().tx, counter(1, frame.len()), "node 2's tx");
}

#[test]
fn a_peer_over_an_ipv6_underlay_is_tunnelled_to_as_well() {
    hypha_tests::require_root!();
    let mut node = Node::new(true, false);
    let node3 = TunnelPeer {
        node_id: 3,
        flags: PEER_F_IPV6,
        addr4: 0,
        _pad: 0,
        addr6: [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
    };
    node.dp.add_tunnel_peer4(NODE2_CIDR4, 24, node3);
    node.dp.add_node_stats(3);
    let frame = a_to4(R4, 64);
    assert_eq!(
        node.dp.run(FROM_POD, &frame, node.a).verdict,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        node.dp.node_stats(3).map(|s| s.tx),
        Some(counter(1, frame.len()))
    );
}

#[test]
fn without_a_peer_or_a_tunnel_a_remote_address_goes_to_the_host_stack() {
    hypha_tests::require_root!();
    for (tunnel, peer) in [(true, false), (false, true), (false, false)] {
        let node = Node::new(tunnel, peer);
        for frame in [a_to4(R4, 64), a_to6(R6, 64)] {
            let run = node.dp.run(FROM_POD, &frame, node.a);
            assert_eq!(
                (run.verdict, &run.frame),
                (TC_ACT_OK, &frame),
                "tunnel {tunnel}, peer {peer}: to the host stack, untouched"
            );
        }
        let total = a_to4(R4, 64).len() + a_to6(R6, 64).len();
        assert_eq!(
            node.stats_a(),
            stats_with(|s| &mut s.egress.passed, counter(2, total)),
            "tunnel {tunnel}, peer {peer}"
        );
        if peer {
            assert_eq!(node.node2(), NodeStats::default());
        }
    }
}

#[test]
fn a_spent_ttl_or_hop_limit_goes_to_the_host_stack_for_its_time_exceeded() {
    hypha_tests::require_root!();
    let node = Node::new(true, true);
    for frame in [a_to4(R4, 1), a_to6(R6, 1)] {
        let run = node.dp.run(FROM_POD, &frame, node.a);
        assert_eq!((run.verdict, &run.frame), (TC_ACT_OK, &frame));
    }
    assert_eq!(node.node2(), NodeStats::default());
}

#[test]
fn a_node_without_a_stats_entry_is_tunnelled_to_but_not_counted() {
    hypha_tests::require_root!();
    let mut node = Node::new(true, false);
    let peer = TunnelPeer {
        node_id: 9,
        flags: 0,
        addr4: u32::from_ne_bytes([192, 168, 77, 9]),
        _pad: 0,
        addr6: [0; 16],
    };
    node.dp.add_tunnel_peer4(NODE2_CIDR4, 24, peer);
    let frame = a_to4(R4, 64);
    assert_eq!(
        node.dp.run(FROM_POD, &frame, node.a).verdict,
        TC_ACT_REDIRECT
    );
    assert_eq!(node.dp.node_stats(9), None, "the datapath creates no entry");
}

#[test]
fn the_senders_egress_policy_decides_on_a_remote_destination() {
    hypha_tests::require_root!();
    let mut node = Node::with_flags(true, true, ENDPOINT_F_EGRESS_POLICY);
    // Nothing allows A to reach R (identity ID_R, from the ipcache): refused, counted
    // against A.
    for frame in [a_to4(R4, 64), a_to6(R6, 64)] {
        assert_eq!(node.dp.run(FROM_POD, &frame, node.a).verdict, TC_ACT_SHOT);
    }
    let key = DropKey {
        ifindex: node.a,
        reason: DropReason::PolicyDenied as u16,
        direction: DIR_EGRESS,
        _pad: 0,
    };
    let drops = node.dp.drops();
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert_eq!((drops[0].0, drops[0].1.packets), (key, 2));
    let events = node.dp.events();
    assert_eq!(events.len(), 2, "a drop event each");
    assert!(events.iter().all(|e| e.remote_identity == ID_R));
    assert_eq!(node.node2(), NodeStats::default(), "nothing sent to node 2");

    // Allowed to port 53 of ID_R: through the tunnel.
    node.dp.set_policy(
        PolicyKey {
            endpoint_id: 1,
            identity: ID_R,
            dport: 53,
            proto: UDP,
            direction: DIR_EGRESS,
        },
        PolicyEntry {
            policy_id: 5,
            action: POLICY_ALLOW,
            flags: 0,
            _pad: 0,
        },
    );
    for frame in [a_to4(R4, 64), a_to6(R6, 64)] {
        assert_eq!(
            node.dp.run(FROM_POD, &frame, node.a).verdict,
            TC_ACT_REDIRECT
        );
    }
    assert_eq!(node.node2().tx.packets, 2);
    assert_eq!(node.dp.connections().len(), 1, "the IPv4 flow is tracked");
    assert_eq!(node.dp.connections6().len(), 1, "the IPv6 flow is tracked");
}

// ---- the tunnel device's programs, without tunnel metadata ----

#[test]
fn from_tunnel_drops_a_frame_without_tunnel_metadata_as_of_an_unknown_source() {
    hypha_tests::require_root!();
    let node = Node::new(true, true);
    let frame = eth(VXLAN_MAC, VXLAN_MAC, ETH_P_IP, &ipv4(R4, A4, 63, 53));
    let run = node.dp.run(FROM_TUNNEL, &frame, node.vxlan);
    assert_eq!(run.verdict, TC_ACT_SHOT);
    node.assert_device_drop(DropReason::UnknownTunnelSource, DIR_INGRESS, frame.len());
    assert_eq!(node.stats_a(), FamilyStats::default(), "nothing reached A");
    assert_eq!(
        node.node2(),
        NodeStats::default(),
        "no node is known to have sent it"
    );
}

#[test]
fn to_tunnel_gives_what_the_host_routes_there_its_key() {
    hypha_tests::require_root!();
    let node = Node::new(true, true);
    // The host (its gateway address) to R, and a forwarded packet from outside.
    let from_host = eth(VXLAN_MAC, VXLAN_MAC, ETH_P_IP, &ipv4(GATEWAY4, R4, 64, 53));
    let from_world = eth(
        VXLAN_MAC,
        VXLAN_MAC,
        ETH_P_IP,
        &ipv4([192, 0, 2, 1], R4, 63, 53),
    );
    let v6 = eth(VXLAN_MAC, VXLAN_MAC, ETH_P_IPV6, &ipv6(A6, R6, 64, 53));
    for frame in [&from_host, &from_world, &v6] {
        let run = node.dp.run(TO_TUNNEL, frame, node.vxlan);
        assert_eq!(
            (run.verdict, &run.frame),
            (TC_ACT_OK, frame),
            "passes, untouched"
        );
    }
    assert_eq!(
        node.node2().tx,
        counter(3, from_host.len() + from_world.len() + v6.len()),
        "counted as sent to node 2"
    );
    assert!(node.dp.drops().is_empty(), "drops: {:?}", node.dp.drops());
}

#[test]
fn to_tunnel_drops_what_no_node_holds() {
    hypha_tests::require_root!();
    let node = Node::new(true, true);
    let frame = eth(
        VXLAN_MAC,
        VXLAN_MAC,
        ETH_P_IP,
        &ipv4(GATEWAY4, NOWHERE4, 64, 53),
    );
    assert_eq!(
        node.dp.run(TO_TUNNEL, &frame, node.vxlan).verdict,
        TC_ACT_SHOT
    );
    node.assert_device_drop(DropReason::NoTunnelPeer, DIR_EGRESS, frame.len());
    assert_eq!(node.node2(), NodeStats::default());
}

#[test]
fn to_tunnel_drops_frames_of_no_ip_family() {
    hypha_tests::require_root!();
    let node = Node::new(true, true);
    let frame = eth([0xff; 6], VXLAN_MAC, ETH_P_ARP, &[0; 28]);
    assert_eq!(
        node.dp.run(TO_TUNNEL, &frame, node.vxlan).verdict,
        TC_ACT_SHOT
    );
    node.assert_device_drop(DropReason::UnknownL3, DIR_EGRESS, frame.len());
}
