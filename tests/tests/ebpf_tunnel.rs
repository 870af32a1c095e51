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
    DIR_EGRESS, DIR_INGRESS, DropKey, DropReason, ENDPOINT_F_EGRESS_POLICY, EndpointInfo,
    FamilyStats, NodeConfig, NodeStats, PEER_F_IPV6, POLICY_ALLOW, PolicyEntry, PolicyKey,
    TunnelConfig, TunnelPeer,
    programs::{FROM_POD, FROM_TUNNEL, TO_TUNNEL},
};
use hypha_tests::ebpf::{
    Datapath, RunOptions, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestNetns, counter, eth, hopped,
    ipv4_checksum, stats_with,
};

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

// ---- frames ----

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

// ---- hypha_from_pod ----

#[test]
fn ipv4_to_a_pod_on_another_node_goes_into_the_tunnel() {
    hypha_tests::require_root!();
    let node = Node::new(true, true);
    let frame = a_to4(R4, 64);
    let run = node.dp.run(FROM_POD, &frame, node.a);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "verdict");
    // TTL one lower, checksum updated; the inner Ethernet header as the pod sent it.
    assert_eq!(run.frame, hopped(&frame), "frame");
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

/// The packets, in all, that `stats` counted in the directions and kinds a run of one
/// of the programs may count in: A's egress (pass, tunnel, drop).
fn a_egress_packets(stats: &FamilyStats) -> u64 {
    stats.egress.passed.packets + stats.egress.tunnel.packets + stats.egress.dropped.packets
}

fn drop_packets(dp: &Datapath) -> u64 {
    dp.drops().iter().map(|(_, c)| c.packets).sum()
}

#[test]
fn every_truncation_of_a_frame_for_the_tunnel_gets_a_designed_verdict_and_one_count() {
    hypha_tests::require_root!();
    let node = Node::new(true, true);
    for frame in [a_to4(R4, 64), a_to6(R6, 64)] {
        for len in 0..=frame.len() {
            let cut = &frame[..len];
            for (program, ifindex) in [
                (FROM_POD, node.a),
                (TO_TUNNEL, node.vxlan),
                (FROM_TUNNEL, node.vxlan),
            ] {
                let (stats, tx, drops) = (
                    a_egress_packets(&node.stats_a()),
                    node.node2().tx.packets,
                    drop_packets(&node.dp),
                );
                let Ok(run) = node
                    .dp
                    .try_run_with(program, cut, ifindex, RunOptions::default())
                else {
                    // The kernel refused a frame too short for its EtherType: the
                    // program never ran, so nothing may have moved.
                    assert_eq!(a_egress_packets(&node.stats_a()), stats);
                    assert_eq!(node.node2().tx.packets, tx);
                    assert_eq!(drop_packets(&node.dp), drops);
                    continue;
                };
                let what = format!("{program} on {len} of {} bytes", frame.len());
                assert!(run.frame.len() <= len, "{what}: the frame grew");
                let (stats, tx, drops) = (
                    a_egress_packets(&node.stats_a()) - stats,
                    node.node2().tx.packets - tx,
                    drop_packets(&node.dp) - drops,
                );
                match (program, run.verdict) {
                    (FROM_POD, TC_ACT_REDIRECT) => {
                        assert_eq!((stats, tx, drops), (1, 1, 0), "{what}")
                    }
                    (FROM_POD, TC_ACT_OK) => assert_eq!((stats, tx, drops), (1, 0, 0), "{what}"),
                    (FROM_POD, TC_ACT_SHOT) => assert_eq!((stats, tx, drops), (1, 0, 1), "{what}"),
                    (TO_TUNNEL, TC_ACT_OK) => assert_eq!((stats, tx, drops), (0, 1, 0), "{what}"),
                    (TO_TUNNEL | FROM_TUNNEL, TC_ACT_SHOT) => {
                        assert_eq!((stats, tx, drops), (0, 0, 1), "{what}")
                    }
                    (_, verdict) => panic!("{what}: verdict {verdict}"),
                }
                // Only a frame with its whole IP header goes into the tunnel (the
                // routing reads nothing past it, as on one node).
                let tunnelled = run.verdict == TC_ACT_REDIRECT
                    || (program == TO_TUNNEL && run.verdict == TC_ACT_OK);
                let header = if frame[12..14] == ETH_P_IP.to_be_bytes() {
                    20
                } else {
                    40
                };
                assert!(
                    !tunnelled || len >= ETH_HLEN + header,
                    "{what}: a frame without its IP header was sent"
                );
            }
        }
    }
}

// ---- path MTU ----

/// `frame` (pod A's, IPv4 or IPv6) padded with zeros to an L3 length of `l3_len`, its
/// length fields (and IPv4 checksum) to match.
fn padded(frame: &[u8], l3_len: usize) -> Vec<u8> {
    let mut out = frame.to_vec();
    out.resize(ETH_HLEN + l3_len, 0);
    let ip = &mut out[ETH_HLEN..];
    if ip[0] >> 4 == 4 {
        ip[2..4].copy_from_slice(&(l3_len as u16).to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let csum = ipv4_checksum(&ip[..20]);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
    } else {
        ip[4..6].copy_from_slice(&((l3_len - 40) as u16).to_be_bytes());
    }
    out
}

/// Node 2's underlay address behind a path of MTU 1400 (1350 inside the tunnel), and
/// forwarding on, as on a node: what `bpf_fib_lookup` answers from.
fn shrink_path_to_node2() {
    for cmd in [
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
        "ip link set hy-vxlan-peer up",
        "ip route add 192.168.77.2/32 dev hy-vxlan-peer mtu lock 1400",
    ] {
        let args: Vec<_> = cmd.split_whitespace().collect();
        // The child is forked from this thread, inside the test's namespace.
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect(cmd);
        assert!(out.status.success(), "{cmd}: {out:?}");
    }
}

#[test]
fn a_packet_too_big_for_the_path_is_answered_with_frag_needed() {
    hypha_tests::require_root!();
    let node = Node::new(true, true);
    shrink_path_to_node2();
    // What fits (1350 + 50 = 1400) is tunnelled.
    let fits = padded(&a_to4(R4, 64), 1350);
    let run = node.dp.run(FROM_POD, &fits, node.a);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(run.frame, hopped(&fits), "tunnelled as it was");
    assert_eq!(node.stats_a().egress.tunnel.packets, 1);

    // One byte more is answered: a frag needed from the gateway back to pod A.
    let big = padded(&a_to4(R4, 64), 1351);
    let run = node.dp.run(FROM_POD, &big, node.a);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "sent back to the pod");
    let f = &run.frame;
    assert_eq!(f.len(), ETH_HLEN + 20 + 8 + 28, "{f:02x?}");
    assert_eq!((&f[0..6], &f[6..12]), (&A_MAC[..], &HOST_A_MAC[..]), "MACs");
    assert_eq!(&f[12..14], &ETH_P_IP.to_be_bytes());
    let ip = &f[ETH_HLEN..ETH_HLEN + 20];
    assert_eq!(ip[0], 0x45);
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 56, "total length");
    assert_eq!(ip[9], 1, "ICMP");
    assert_eq!(ipv4_checksum(ip), 0, "header checksum");
    assert_eq!((&ip[12..16], &ip[16..20]), (&GATEWAY4[..], &A4[..]));
    let icmp = &f[ETH_HLEN + 20..];
    assert_eq!(
        (icmp[0], icmp[1]),
        (3, 4),
        "destination unreachable, frag needed"
    );
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1350, "next-hop MTU");
    assert_eq!(ipv4_checksum(icmp), 0, "ICMP checksum");
    assert_eq!(
        &icmp[8..],
        &big[ETH_HLEN..ETH_HLEN + 28],
        "the quoted header"
    );
    // Counted as passed (answered), never tunnelled.
    let stats = node.stats_a();
    assert_eq!(
        (stats.egress.tunnel.packets, stats.egress.passed.packets),
        (1, 1)
    );
    assert!(node.dp.drops().is_empty(), "drops: {:?}", node.dp.drops());
}

#[test]
fn an_ipv6_packet_too_big_for_the_path_is_answered_with_packet_too_big() {
    hypha_tests::require_root!();
    let node = Node::new(true, true);
    shrink_path_to_node2();
    let fits = padded(&a_to6(R6, 64), 1350);
    assert_eq!(
        node.dp.run(FROM_POD, &fits, node.a).verdict,
        TC_ACT_REDIRECT
    );
    assert_eq!(node.stats_a().egress.tunnel.packets, 1, "tunnelled");

    let big = padded(&a_to6(R6, 64), 1351);
    let run = node.dp.run(FROM_POD, &big, node.a);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "sent back to the pod");
    let f = &run.frame;
    assert_eq!(f.len(), ETH_HLEN + 40 + 8 + 48, "{f:02x?}");
    assert_eq!((&f[0..6], &f[6..12]), (&A_MAC[..], &HOST_A_MAC[..]), "MACs");
    let ip = &f[ETH_HLEN..ETH_HLEN + 40];
    assert_eq!(ip[0] >> 4, 6);
    assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 56, "payload length");
    assert_eq!(ip[6], 58, "ICMPv6");
    assert_eq!(&ip[8..24], &hypha_common::GATEWAY6[..], "from the gateway");
    assert_eq!(&ip[24..40], &A6[..], "to pod A");
    let icmp = &f[ETH_HLEN + 40..];
    assert_eq!((icmp[0], icmp[1]), (2, 0), "packet too big");
    assert_eq!(
        u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
        1350,
        "MTU"
    );
    // The checksum over the pseudo-header and the message.
    let mut pseudo = ip[8..40].to_vec();
    pseudo.extend_from_slice(&56u32.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(icmp);
    assert_eq!(ipv4_checksum(&pseudo), 0, "ICMPv6 checksum");
    assert_eq!(
        &icmp[8..],
        &big[ETH_HLEN..ETH_HLEN + 48],
        "the quoted packet"
    );
    let stats = node.stats_a();
    assert_eq!(
        (stats.egress.tunnel.packets, stats.egress.passed.packets),
        (1, 1)
    );
    assert!(node.dp.drops().is_empty(), "drops: {:?}", node.dp.drops());
}

// ---- end to end: two nodes joined by real VXLAN devices ----

/// What the programs do with real tunnel metadata: two node namespaces joined by an
/// underlay veth, each with a VXLAN device in collect-metadata mode and one pod, and a
/// datapath of its own attached as the agent attaches it. No agent: the maps are written
/// here, so the VNI can be made to lie about the sender.
mod end_to_end {
    use std::path::Path;

    use aya::programs::TcAttachType;
    use hypha_common::{
        DIR_INGRESS, DropReason, ENDPOINT_F_INGRESS_POLICY, EndpointInfo, IDENTITY_HOST,
        IDENTITY_REMOTE_NODE, NodeConfig, PEER_F_IPV6, POLICY_ALLOW, PolicyEntry, PolicyKey,
        TunnelConfig, TunnelPeer,
        programs::{FROM_POD, FROM_TUNNEL, TO_POD, TO_TUNNEL},
    };
    use hypha_tests::{
        ebpf::Datapath,
        netns::NamedNetns,
        traffic::{tcp_send, tcp_sink},
    };

    const UNDERLAY: [[u8; 4]; 2] = [[192, 168, 77, 1], [192, 168, 77, 2]];
    const UNDERLAY6: [[u8; 16]; 2] = [
        [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
    ];
    const CIDR4: [[u8; 4]; 2] = [[10, 244, 0, 0], [10, 244, 1, 0]];
    const GATEWAY4: [[u8; 4]; 2] = [[10, 244, 0, 1], [10, 244, 1, 1]];
    const POD4: [[u8; 4]; 2] = [[10, 244, 0, 7], [10, 244, 1, 9]];
    const CIDR6: [[u8; 16]; 2] = [six(0, 0), six(1, 0)];
    const POD6: [[u8; 16]; 2] = [six(0, 7), six(1, 9)];
    const POD_MAC: [[u8; 6]; 2] = [[2, 0xaa, 0, 0, 0, 7], [2, 0xbb, 0, 0, 0, 9]];
    const HOST_MAC: [[u8; 6]; 2] = [[2, 0xaa, 0, 0, 0, 1], [2, 0xbb, 0, 0, 0, 1]];
    const NODE_ID: [u32; 2] = [0x5eed_0001, 0x5eed_0002];
    const POD_ID: [u32; 2] = [300, 301];
    /// An identity neither pod has.
    const ID_OTHER: u32 = 302;

    const fn six(subnet: u8, host: u8) -> [u8; 16] {
        [0xfd, 0, 2, 0x44, 0, 0, 0, subnet, 0, 0, 0, 0, 0, 0, 0, host]
    }

    fn dotted(a: [u8; 4]) -> String {
        std::net::Ipv4Addr::from(a).to_string()
    }

    fn colon(a: [u8; 16]) -> String {
        std::net::Ipv6Addr::from(a).to_string()
    }

    fn mac(m: [u8; 6]) -> String {
        m.map(|b| format!("{b:02x}")).join(":")
    }

    /// One node: its namespace, its pod's, and its datapath.
    struct Node {
        // First: the datapath (and its TCX links) goes before the namespaces.
        dp: Datapath,
        /// ifindex of the pod's host-side veth.
        host_veth: u32,
        pod: NamedNetns,
        ns: NamedNetns,
    }

    fn ifindex(ns: &NamedNetns, name: &str) -> u32 {
        ns.exec(&["cat", &format!("/sys/class/net/{name}/ifindex")])
            .trim()
            .parse()
            .expect("ifindex")
    }

    /// Node `i` (0 or 1), its underlay end `underlay` already in its namespace; the
    /// nodes tunnel to each other's IPv6 underlay address when `underlay6`.
    fn node(i: usize, ns: NamedNetns, underlay: &str, underlay6: bool) -> Node {
        let j = 1 - i;
        let run = |cmd: &str| {
            ns.exec(&cmd.split_whitespace().collect::<Vec<_>>());
        };
        run(&format!(
            "ip addr add {}/24 dev {underlay}",
            dotted(UNDERLAY[i])
        ));
        run(&format!(
            "ip -6 addr add {}/64 dev {underlay} nodad",
            colon(UNDERLAY6[i])
        ));
        run(&format!("ip link set {underlay} up"));
        // Forwarding on, as the agent has it, before the VXLAN device exists (turning
        // IPv6 forwarding on later sends the all-routers group's listener report into
        // it); the route's MTU counts for forwarding (`bpf_fib_lookup`'s too).
        run("sysctl -qw net.ipv4.ip_forward=1 net.ipv4.ip_forward_use_pmtu=1");
        run("sysctl -qw net.ipv6.conf.all.forwarding=1");
        run("ip link add hyvx type vxlan external dstport 8472 nolearning");
        // NOARP: the host stack's packets need no neighbour resolution on it; no IPv6
        // link-local address: the device sends no IPv6 of its own (DAD, router
        // solicitations, listener reports), which no tunnel peer would take.
        run("ip link set hyvx arp off mtu 1450 addrgenmode none");
        run("ip link set hyvx up");
        // The host's own address in its pod CIDR, and the other node's pods through the
        // tunnel from it.
        run(&format!("ip addr add {}/32 dev lo", dotted(GATEWAY4[i])));
        run(&format!(
            "ip route add {}/24 dev hyvx src {}",
            dotted(CIDR4[j]),
            dotted(GATEWAY4[i])
        ));

        let pod = NamedNetns::new("hy-tun-pod");
        run(&format!(
            "ip link add hyhost address {} type veth peer name eth0 address {} netns {}",
            mac(HOST_MAC[i]),
            mac(POD_MAC[i]),
            pod.name()
        ));
        run("ip link set hyhost mtu 1450 up");
        let prun = |cmd: &str| {
            pod.exec(&cmd.split_whitespace().collect::<Vec<_>>());
        };
        prun("ip link set eth0 mtu 1450 up");
        prun(&format!("ip addr add {}/32 dev eth0", dotted(POD4[i])));
        prun(&format!("ip route add {} dev eth0", dotted(GATEWAY4[i])));
        prun(&format!("ip route add default via {}", dotted(GATEWAY4[i])));
        prun(&format!(
            "ip -6 addr add {}/128 dev eth0 nodad",
            colon(POD6[i])
        ));
        prun("ip -6 route add default via fe80::1 dev eth0");

        let host_veth = ifindex(&ns, "hyhost");
        let vxlan = ifindex(&ns, "hyvx");
        let mut dp = Datapath::load();
        dp.load_tunnel_programs();
        dp.set_config(NodeConfig {
            gateway: u32::from_ne_bytes(GATEWAY4[i]),
            flags: 0,
        });
        dp.add_endpoint_with(
            Some(POD4[i]),
            Some(POD6[i]),
            EndpointInfo {
                ifindex: host_veth,
                endpoint_id: 1,
                pod_mac: POD_MAC[i],
                host_mac: HOST_MAC[i],
                flags: 0,
            },
        );
        // The cluster's identities, as issue 12's ipcache has them on every node.
        for k in 0..2 {
            dp.set_identity(POD4[k], 32, POD_ID[k]);
            dp.set_identity6(POD6[k], 128, POD_ID[k]);
        }
        dp.set_identity(GATEWAY4[i], 32, IDENTITY_HOST);
        dp.set_identity(GATEWAY4[j], 32, IDENTITY_REMOTE_NODE);
        dp.set_tunnel_config(TunnelConfig {
            ifindex: vxlan,
            flags: 0,
            local4: u32::from_ne_bytes(UNDERLAY[i]),
            _pad: 0,
            local6: UNDERLAY6[i],
        });
        let peer = TunnelPeer {
            node_id: NODE_ID[j],
            flags: if underlay6 { PEER_F_IPV6 } else { 0 },
            addr4: u32::from_ne_bytes(UNDERLAY[j]),
            _pad: 0,
            addr6: UNDERLAY6[j],
        };
        dp.add_tunnel_peer4(CIDR4[j], 24, peer);
        dp.add_tunnel_peer6(CIDR6[j], 64, peer);
        dp.add_node4(UNDERLAY[j], NODE_ID[j]);
        dp.add_node6(UNDERLAY6[j], NODE_ID[j]);
        dp.add_node_stats(NODE_ID[j]);
        let path = ns.path();
        for (program, device, hook) in [
            (FROM_POD, "hyhost", TcAttachType::Ingress),
            (TO_POD, "hyhost", TcAttachType::Egress),
            (FROM_TUNNEL, "hyvx", TcAttachType::Ingress),
            (TO_TUNNEL, "hyvx", TcAttachType::Egress),
        ] {
            dp.attach_in(Path::new(&path), program, device, hook);
        }
        Node {
            dp,
            host_veth,
            pod,
            ns,
        }
    }

    struct Cluster {
        nodes: [Node; 2],
    }

    impl Cluster {
        fn new(underlay6: bool) -> Self {
            let a = NamedNetns::new("hy-tun-a");
            let b = NamedNetns::new("hy-tun-b");
            a.exec(&[
                "ip",
                "link",
                "add",
                "under",
                "type",
                "veth",
                "peer",
                "name",
                "under",
                "netns",
                b.name(),
            ]);
            let a = node(0, a, "under", underlay6);
            let b = node(1, b, "under", underlay6);
            Self { nodes: [a, b] }
        }
    }

    fn ping(ns: &NamedNetns, dst: &str) -> bool {
        ns.try_exec(&["ping", "-c", "1", "-W", "2", dst])
            .status
            .success()
    }

    #[test]
    fn pods_and_hosts_reach_each_other_through_the_tunnel_and_the_vni_is_the_identity() {
        hypha_tests::require_root!();
        let mut cluster = Cluster::new(false);
        let [a, b] = &cluster.nodes;

        // Pod to pod, both families, both ways (each ping's reply crosses back).
        assert!(ping(&a.pod, &dotted(POD4[1])), "pod A → pod B, IPv4");
        assert!(ping(&b.pod, &dotted(POD4[0])), "pod B → pod A, IPv4");
        assert!(ping(&a.pod, &colon(POD6[1])), "pod A → pod B, IPv6");
        let a_in = a.dp.stats(a.host_veth).ingress.tunnel.packets;
        let b_in = b.dp.stats(b.host_veth).ingress.tunnel.packets;
        assert!(a_in >= 3 && b_in >= 3, "ingress.tunnel: A {a_in}, B {b_in}");
        let a_node = a.dp.node_stats(NODE_ID[1]).expect("A's stats of B");
        assert!(
            a_node.tx.packets >= 3 && a_node.rx.packets >= 3,
            "{a_node:?}"
        );
        assert_eq!(a_node.dropped.packets, 0);

        // TCP in bulk, both families: segments the size of the pod's MTU and more (GSO),
        // checksummed by the receiver, in order.
        for (port, to) in [
            (5201, std::net::IpAddr::from(POD4[1])),
            (5202, std::net::IpAddr::from(POD6[1])),
        ] {
            let sink = tcp_sink(&b.pod, port);
            tcp_send(&a.pod, to, port, 8 << 20);
            assert_eq!(
                sink.join().expect("sink"),
                8 << 20,
                "bytes received over {to}"
            );
        }

        // Nothing else went into the tunnel (no neighbour discovery, no IPv6 of the
        // device's own) or came out of it refused.
        assert_eq!(a.dp.drops(), vec![], "node A's drops");
        assert_eq!(b.dp.drops(), vec![], "node B's drops");

        // Host to a remote pod: keyed by hypha_to_tunnel, the reply to the host stack.
        assert!(ping(&a.ns, &dotted(POD4[1])), "node A's host → pod B");

        // Pod B admits only pod A: pod A's pings pass...
        let b = &mut cluster.nodes[1];
        let host_veth = b.host_veth;
        b.dp.add_endpoint_with(
            Some(POD4[1]),
            Some(POD6[1]),
            EndpointInfo {
                ifindex: host_veth,
                endpoint_id: 1,
                pod_mac: POD_MAC[1],
                host_mac: HOST_MAC[1],
                flags: ENDPOINT_F_INGRESS_POLICY,
            },
        );
        b.dp.set_policy(
            PolicyKey {
                endpoint_id: 1,
                identity: POD_ID[0],
                dport: 0,
                proto: 0,
                direction: DIR_INGRESS,
            },
            PolicyEntry {
                policy_id: 7,
                action: POLICY_ALLOW,
                flags: 0,
                _pad: 0,
            },
        );
        let a = &cluster.nodes[0];
        assert!(ping(&a.pod, &dotted(POD4[1])), "allowed: pod A → pod B");
        // ...the remote host's do not (it is a remote node, not this node's host)...
        assert!(
            !ping(&a.ns, &dotted(POD4[1])),
            "node A's host → pod B refused"
        );

        // ...and when node A's datapath sends pod A as another identity, node B believes
        // the VNI, not its own ipcache (which still says pod A): refused. Over IPv6, a
        // new flow no conntrack entry lets through (an IPv4 echo's flow has no
        // identifier: the allowed ping's entry would carry it).
        let [a, b] = &mut cluster.nodes;
        a.dp.set_identity6(POD6[0], 128, ID_OTHER);
        b.dp.events();
        assert!(
            !ping(&a.pod, &colon(POD6[1])),
            "pod A as another identity refused"
        );
        let denied: Vec<_> =
            b.dp.events()
                .into_iter()
                .filter(|e| e.reason == DropReason::PolicyDenied as u16)
                .collect();
        assert!(
            denied.iter().any(|e| e.remote_identity == ID_OTHER),
            "a drop event with the VNI's identity: {denied:?}"
        );
        assert!(
            denied.iter().all(|e| e.remote_identity != POD_ID[0]),
            "never the ipcache's: {denied:?}"
        );
        let b_node = b.dp.node_stats(NODE_ID[0]).expect("B's stats of A");
        assert!(b_node.dropped.packets >= 2, "{b_node:?}");
    }

    /// What the agent sets up on a node beyond what [`node`] does, for the host stack to
    /// reach its pods and the other node's IPv6 pods: the pod's routes on its host veth
    /// and the other node's IPv6 pod CIDR through the tunnel device.
    fn host_forwarding(cluster: &Cluster) {
        for (i, node) in cluster.nodes.iter().enumerate() {
            let j = 1 - i;
            let run = |cmd: &str| {
                node.ns.exec(&cmd.split_whitespace().collect::<Vec<_>>());
            };
            run(&format!("ip route add {} dev hyhost", dotted(POD4[i])));
            run(&format!("ip -6 route add {} dev hyhost", colon(POD6[i])));
            run(&format!("ip -6 route add {}/64 dev hyvx", colon(CIDR6[j])));
        }
    }

    /// `ping -M do` (no fragmentation) of `size` bytes of payload: its output and error.
    fn ping_df(ns: &NamedNetns, dst: &str, size: usize) -> (bool, String) {
        let size = size.to_string();
        let out = ns.try_exec(&["ping", "-M", "do", "-c", "1", "-W", "1", "-s", &size, dst]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    #[test]
    fn a_path_smaller_than_the_pods_mtu_is_discovered_by_the_pod_in_both_families() {
        hypha_tests::require_root!();
        let cluster = Cluster::new(false);
        host_forwarding(&cluster);
        let [a, b] = &cluster.nodes;
        let egress = |n: &Node| {
            let s = n.dp.stats(n.host_veth).egress;
            (s.tunnel.packets, s.passed.packets, s.tunnel.bytes)
        };

        // An unchanged path: packets of the pod's full MTU (1450) go through the tunnel
        // by eBPF, the host stack sees none of them, whatever their size (GSO included).
        for dst in [dotted(POD4[1]), colon(POD6[1])] {
            assert!(ping(&a.pod, &dst), "pod A → pod B ({dst})");
        }
        let (_, passed0, bytes0) = egress(a);
        assert!(
            ping_df(&a.pod, &dotted(POD4[1]), 1450 - 28).0,
            "a full-MTU IPv4 ping"
        );
        assert!(
            ping_df(&a.pod, &colon(POD6[1]), 1450 - 48).0,
            "a full-MTU IPv6 ping"
        );
        let sink = tcp_sink(&b.pod, 5301);
        tcp_send(&a.pod, std::net::IpAddr::from(POD4[1]), 5301, 2 << 20);
        assert_eq!(sink.join().expect("sink"), 2 << 20);
        let (_, passed1, bytes1) = egress(a);
        assert!(
            bytes1 - bytes0 > 2 << 20,
            "tunnelled: {} bytes",
            bytes1 - bytes0
        );
        assert_eq!(passed1, passed0, "nothing handed to the host stack");

        // The path from node A to node B shrinks to 1400 (1350 inside the tunnel).
        a.ns.exec(&[
            "ip",
            "route",
            "add",
            &format!("{}/32", dotted(UNDERLAY[1])),
            "dev",
            "under",
            "mtu",
            "lock",
            "1400",
        ]);
        // A DF ping of 1428 bytes (IPv4), 1448 (IPv6): the pod learns the path's MTU
        // within a few attempts (the first records it on the host's route; from the
        // next the host answers; then the pod's own socket knows).
        for (dst, size) in [(dotted(POD4[1]), 1400), (colon(POD6[1]), 1400)] {
            let mut said = Vec::new();
            let learnt = (0..4).any(|_| {
                let (_, text) = ping_df(&a.pod, &dst, size);
                let learnt = text.contains("mtu = 1350") || text.contains("mtu=1350");
                said.push(text);
                learnt
            });
            assert!(learnt, "{dst}: no MTU of 1350 learnt: {said:#?}");
            // What fits still crosses, by eBPF.
            let (tunnel, passed, _) = egress(a);
            assert!(ping_df(&a.pod, &dst, 1250).0, "a ping of 1250 to {dst}");
            let (tunnel2, passed2, _) = egress(a);
            assert_eq!((tunnel2 - tunnel, passed2 - passed), (1, 0), "{dst}");
        }

        // TCP adapts: its segments (GSO packets, the answer cut from them) shrink and a
        // transfer completes, both families; what the pings taught the pod forgotten
        // first, so that TCP's own packets are answered.
        a.pod.exec(&["ip", "route", "flush", "cache"]);
        a.pod.exec(&["ip", "-6", "route", "flush", "cache"]);
        let (_, passed0, _) = egress(a);
        for (port, to) in [
            (5302, std::net::IpAddr::from(POD4[1])),
            (5303, std::net::IpAddr::from(POD6[1])),
        ] {
            let sink = tcp_sink(&b.pod, port);
            tcp_send(&a.pod, to, port, 4 << 20);
            assert_eq!(sink.join().expect("sink"), 4 << 20, "over {to}");
        }
        let (_, passed1, _) = egress(a);
        assert!(passed1 > passed0, "TCP's too-big segments were answered");
        for to in [dotted(POD4[1]), colon(POD6[1])] {
            let route = a.pod.exec(&["ip", "route", "get", &to]);
            assert!(route.contains("mtu 1350"), "pod A's route to {to}: {route}");
        }
        assert_eq!(a.dp.drops(), vec![], "node A's drops");
        assert_eq!(b.dp.drops(), vec![], "node B's drops");
    }

    #[test]
    fn over_an_ipv6_underlay_both_families_cross_too() {
        hypha_tests::require_root!();
        let cluster = Cluster::new(true);
        let [a, b] = &cluster.nodes;
        assert!(ping(&a.pod, &dotted(POD4[1])), "pod A → pod B, IPv4");
        assert!(ping(&b.pod, &colon(POD6[0])), "pod B → pod A, IPv6");
        assert!(ping(&a.ns, &dotted(POD4[1])), "node A's host → pod B");
        let a_node = a.dp.node_stats(NODE_ID[1]).expect("A's stats of B");
        assert!(
            a_node.tx.packets >= 3 && a_node.rx.packets >= 3,
            "{a_node:?}"
        );
        assert_eq!(a.dp.drops(), vec![], "node A's drops");
        assert_eq!(b.dp.drops(), vec![], "node B's drops");
    }
}
