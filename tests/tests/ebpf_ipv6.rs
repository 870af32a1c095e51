//! `BPF_PROG_TEST_RUN` tests of the datapath's IPv6: neighbour discovery for the gateway,
//! routing between pods, the extension header walk, anti-spoofing, policy and
//! connection tracking over IPv6 (ICMPv6 errors and echo included), and the families an
//! endpoint does not have.
//!
//! **Privileged**, like `ebpf_verdicts.rs`: every test loads the eBPF object (CAP_BPF,
//! CAP_SYS_ADMIN for a private bpffs) and creates veths in a fresh network namespace of
//! its own (CAP_NET_ADMIN). Run as root, after `cargo xtask build-ebpf`.

use std::time::{Duration, Instant};

use aya::programs::TcAttachType;
use hypha_common::{
    DIR_EGRESS, DIR_INGRESS, DropKey, DropReason, ENDPOINT_F_INGRESS_POLICY, EVENT_DROP,
    EndpointInfo, FamilyStats, GATEWAY6, IDENTITY_WORLD, IDENTITY_WORLD6, NodeConfig, POLICY_ALLOW,
    PolicyEntry, PolicyKey, link_local_of,
    programs::{FROM_POD, TO_POD},
};
use hypha_tests::ebpf::{
    Datapath, Run, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestNetns, counter, eth, stats_with,
};

const A4: [u8; 4] = [10, 244, 0, 7];
const B4: [u8; 4] = [10, 244, 0, 8];
const D4: [u8; 4] = [10, 244, 0, 10];
const GATEWAY4: [u8; 4] = [10, 244, 0, 1];
const A6: [u8; 16] = addr6(7);
const B6: [u8; 16] = addr6(8);
const C6: [u8; 16] = addr6(9);
/// An address outside the node (documentation prefix 2001:db8::/32).
const WORLD6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

const A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x07];
const HOST_A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];
const B_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x08];
const HOST_B_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];
const C_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x09];
const HOST_C_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x01];
const D_MAC: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 0x0a];
const HOST_D_MAC: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 0x01];

const ID_A: u32 = 300;
const ID_B: u32 = 301;
const DNS: u16 = 53;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_HLEN: usize = 14;
const IPV6_HLEN: usize = 40;

const UDP: u8 = 17;
const ICMPV6: u8 = 58;
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST_OPTS: u8 = 60;

/// `fd00:10:244::N`.
const fn addr6(n: u8) -> [u8; 16] {
    [0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, n]
}

/// A: dual stack. B: dual stack. C: IPv6 only. D: IPv4 only. Each behind the host side
/// of a veth pair in the test's own network namespace.
struct Node {
    dp: Datapath,
    a: u32,
    b: u32,
    c: u32,
    d: u32,
    // Last: the namespace, and the veths in it, go after everything else.
    netns: TestNetns,
}

fn info(ifindex: u32, endpoint_id: u32, pod_mac: [u8; 6], host_mac: [u8; 6]) -> EndpointInfo {
    EndpointInfo {
        ifindex,
        endpoint_id,
        pod_mac,
        host_mac,
        flags: 0,
    }
}

impl Node {
    fn new() -> Self {
        Self::with_flags(0, 0)
    }

    /// With the policy flags of A and B.
    fn with_flags(a_flags: u32, b_flags: u32) -> Self {
        let netns = TestNetns::enter();
        let a = netns.add_veth("hy-host-a", "hy-pod-a");
        let b = netns.add_veth("hy-host-b", "hy-pod-b");
        let c = netns.add_veth("hy-host-c", "hy-pod-c");
        let d = netns.add_veth("hy-host-d", "hy-pod-d");
        let mut dp = Datapath::load();
        dp.set_config(NodeConfig {
            gateway: u32::from_ne_bytes(GATEWAY4),
            flags: 0,
        });
        let mut ia = info(a, 1, A_MAC, HOST_A_MAC);
        ia.flags = a_flags;
        let mut ib = info(b, 2, B_MAC, HOST_B_MAC);
        ib.flags = b_flags;
        dp.add_endpoint_with(Some(A4), Some(A6), ia);
        dp.add_endpoint_with(Some(B4), Some(B6), ib);
        dp.add_endpoint_with(None, Some(C6), info(c, 3, C_MAC, HOST_C_MAC));
        dp.add_endpoint_with(Some(D4), None, info(d, 4, D_MAC, HOST_D_MAC));
        dp.set_identity6(A6, 128, ID_A);
        dp.set_identity6(B6, 128, ID_B);
        dp.set_identity6([0; 16], 0, IDENTITY_WORLD6);
        Self {
            dp,
            a,
            b,
            c,
            d,
            netns,
        }
    }

    fn send_from_a(&self, frame: &[u8]) -> Run {
        self.dp.run(FROM_POD, frame, self.a)
    }

    /// Asserts that the only drop counted is one of `len` bytes on `ifindex` in
    /// `direction` for `reason`.
    fn assert_single_drop(&self, ifindex: u32, direction: u8, reason: DropReason, len: usize) {
        let key = DropKey {
            ifindex,
            reason: reason as u16,
            direction,
            _pad: 0,
        };
        assert_eq!(self.dp.drops(), vec![(key, counter(1, len))], "hypha_drops");
    }
}

// ---- frames ----

/// An IPv6 packet: the fixed header, then `payload` (extension headers included), whose
/// first header is `next`.
fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, hop_limit: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.push(next);
    p.push(hop_limit);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// A frame pod A sends to its gateway's MAC.
fn from_a(src: [u8; 16], dst: [u8; 16], next: u8, hop_limit: u8, payload: &[u8]) -> Vec<u8> {
    eth(
        HOST_A_MAC,
        A_MAC,
        ETH_P_IPV6,
        &ipv6(src, dst, next, hop_limit, payload),
    )
}

/// A UDP header and 4 bytes of data (checksum not filled in: the datapath reads none).
fn udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&12u16.to_be_bytes());
    u.extend_from_slice(&[0, 0, b'h', b'y', b'p', b'h']);
    u
}

/// Extension headers of the given kinds in front of `upper` (of protocol `proto`);
/// returns the first next-header value and the bytes. A fragment header has offset 0
/// and the more-fragments flag (the first fragment) unless `later_fragment`.
fn with_ext(kinds: &[u8], proto: u8, upper: &[u8], later_fragment: bool) -> (u8, Vec<u8>) {
    let mut bytes = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(proto);
        match *kind {
            FRAGMENT => {
                let off: u16 = if later_fragment { 185 << 3 } else { 1 };
                bytes.push(next);
                bytes.push(0);
                bytes.extend_from_slice(&off.to_be_bytes());
                bytes.extend_from_slice(&0x1234_5678u32.to_be_bytes());
            }
            ROUTING => {
                // Length 0 (8 bytes), routing type 4, no segments left, reserved.
                bytes.extend_from_slice(&[next, 0, 4, 0, 0, 0, 0, 0]);
            }
            _ => {
                // Hop-by-hop or destination options: length 0 (8 bytes), a PadN option.
                bytes.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
            }
        }
    }
    bytes.extend_from_slice(upper);
    (kinds.first().copied().unwrap_or(proto), bytes)
}

/// An ICMPv6 echo request (128) or reply (129) with `id`.
fn echo(kind: u8, id: u16) -> Vec<u8> {
    let mut e = vec![kind, 0, 0, 0];
    e.extend_from_slice(&id.to_be_bytes());
    e.extend_from_slice(&1u16.to_be_bytes());
    e.extend_from_slice(b"hypha-ping");
    e
}

/// `ff02::1:ffXX:XXXX`, the solicited-node multicast address of `target`.
fn solicited_node(target: [u8; 16]) -> [u8; 16] {
    let mut a = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0];
    a[13..].copy_from_slice(&target[13..]);
    a
}

/// A neighbour solicitation for `target`, with a source link-layer address option when
/// `slla` is given.
fn solicitation(target: [u8; 16], slla: Option<[u8; 6]>) -> Vec<u8> {
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&target);
    if let Some(mac) = slla {
        ns.extend_from_slice(&[1, 1]);
        ns.extend_from_slice(&mac);
    }
    ns
}

/// The Internet checksum of ICMPv6 `message` from `src` to `dst` (RFC 4443 2.3); 0 when
/// the message's own checksum field is right.
fn icmpv6_checksum(src: &[u8], dst: &[u8], message: &[u8]) -> u16 {
    let mut data = Vec::new();
    data.extend_from_slice(src);
    data.extend_from_slice(dst);
    data.extend_from_slice(&(message.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, ICMPV6]);
    data.extend_from_slice(message);
    if data.len() % 2 == 1 {
        data.push(0);
    }
    let mut sum: u32 = data
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ll(mac: [u8; 6]) -> [u8; 16] {
    link_local_of(mac)
}

// ---- neighbour discovery ----

/// Checks every byte of the advertisement the datapath made of a solicitation by A:
/// to `dst_ip` / `dst_mac`, with `flags`.
fn assert_advertisement(run: &Run, dst_ip: [u8; 16], dst_mac: [u8; 6], flags: u8) {
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "verdict");
    let f = &run.frame;
    assert_eq!(f.len(), ETH_HLEN + IPV6_HLEN + 32, "length: {f:02x?}");
    assert_eq!(f[0..6], dst_mac, "destination MAC");
    assert_eq!(f[6..12], HOST_A_MAC, "source MAC");
    assert_eq!(f[12..14], ETH_P_IPV6.to_be_bytes(), "EtherType");
    let ip = &f[ETH_HLEN..];
    assert_eq!(ip[0..4], [0x60, 0, 0, 0], "version, class, flow label");
    assert_eq!(ip[4..6], 32u16.to_be_bytes(), "payload length");
    assert_eq!((ip[6], ip[7]), (ICMPV6, 255), "next header, hop limit");
    assert_eq!(ip[8..24], GATEWAY6, "source");
    assert_eq!(ip[24..40], dst_ip, "destination");
    let na = &ip[IPV6_HLEN..];
    assert_eq!((na[0], na[1]), (136, 0), "type, code");
    assert_eq!(na[4..8], [flags, 0, 0, 0], "flags");
    assert_eq!(na[8..24], GATEWAY6, "target");
    assert_eq!(na[24..26], [2, 1], "target link-layer address option");
    assert_eq!(na[26..32], HOST_A_MAC, "target link-layer address");
    assert_eq!(
        icmpv6_checksum(&ip[8..24], &ip[24..40], na),
        0,
        "ICMPv6 checksum of {na:02x?}"
    );
}

#[test]
fn a_solicitation_for_the_gateway_is_answered_with_an_advertisement() {
    hypha_tests::require_root!();
    let node = Node::new();
    let frame = eth(
        [0x33, 0x33, 0xff, 0, 0, 1],
        A_MAC,
        ETH_P_IPV6,
        &ipv6(
            ll(A_MAC),
            solicited_node(GATEWAY6),
            ICMPV6,
            255,
            &solicitation(GATEWAY6, Some(A_MAC)),
        ),
    );

    let run = node.send_from_a(&frame);

    // Router, solicited, override.
    assert_advertisement(&run, ll(A_MAC), A_MAC, 0xe0);
    let stats = node.dp.stats_by_family(node.a);
    assert_eq!(
        stats.ipv6,
        stats_with(|s| &mut s.egress.passed, counter(1, frame.len())),
        "A's IPv6 counters"
    );
    assert_eq!(stats.ipv4, FamilyStats::default(), "A's IPv4 counters");
    assert_eq!(node.dp.drops(), vec![], "hypha_drops");
}

#[test]
fn a_solicitation_without_options_or_from_its_global_address_is_answered_too() {
    hypha_tests::require_root!();
    // Without the source link-layer address option the answer is longer than the
    // question: the frame grows.
    let node = Node::new();
    let frame = from_a(A6, GATEWAY6, ICMPV6, 255, &solicitation(GATEWAY6, None));
    let run = node.send_from_a(&frame);
    assert_advertisement(&run, A6, A_MAC, 0xe0);
}

#[test]
fn a_solicitation_for_the_gateway_from_the_unspecified_address_is_answered_to_all_nodes() {
    hypha_tests::require_root!();
    let node = Node::new();
    let frame = from_a(
        [0; 16],
        solicited_node(GATEWAY6),
        ICMPV6,
        255,
        &solicitation(GATEWAY6, None),
    );
    let run = node.send_from_a(&frame);
    // Not solicited (RFC 4861 7.2.4): router and override only, to ff02::1.
    let mut all_nodes = [0; 16];
    all_nodes[0] = 0xff;
    all_nodes[1] = 2;
    all_nodes[15] = 1;
    assert_advertisement(&run, all_nodes, [0x33, 0x33, 0, 0, 0, 1], 0xa0);
}

/// Asserts that A's `frame` goes to the host stack untouched, counted as IPv6.
fn assert_to_host(node: &Node, frame: &[u8]) {
    let run = node.send_from_a(frame);
    assert_eq!(run.verdict, TC_ACT_OK, "verdict");
    assert_eq!(run.frame, frame, "frame must be untouched");
    assert_eq!(
        node.dp.stats_by_family(node.a).ipv6,
        stats_with(|s| &mut s.egress.passed, counter(1, frame.len())),
        "A's IPv6 counters"
    );
    assert_eq!(node.dp.drops(), vec![], "hypha_drops");
}

#[test]
fn a_solicitation_for_another_address_goes_to_the_host() {
    hypha_tests::require_root!();
    let node = Node::new();
    let host_ll = ll(HOST_A_MAC);
    let frame = from_a(
        ll(A_MAC),
        solicited_node(host_ll),
        ICMPV6,
        255,
        &solicitation(host_ll, Some(A_MAC)),
    );
    assert_to_host(&node, &frame);
}

#[test]
fn duplicate_address_detection_from_the_unspecified_address_goes_to_the_host() {
    hypha_tests::require_root!();
    let node = Node::new();
    let frame = from_a(
        [0; 16],
        solicited_node(A6),
        ICMPV6,
        255,
        &solicitation(A6, None),
    );
    assert_to_host(&node, &frame);
}

#[test]
fn a_listener_report_from_the_unspecified_address_goes_to_the_host() {
    hypha_tests::require_root!();
    // RFC 3810 5.2.13: before its link-local address is valid (during DAD), a pod sends
    // its MLDv2 reports (joining its solicited-node group) from `::`, with a hop-by-hop
    // router alert, to ff02::16.
    let node = Node::new();
    let mut report = vec![143, 0, 0, 0, 0, 0, 0, 1];
    report.extend_from_slice(&[4, 0, 0, 0]);
    report.extend_from_slice(&solicited_node(A6));
    let router_alert = [0x05, 0x02, 0, 0, 0x01, 0];
    let (next, mut payload) = (HOP_BY_HOP, vec![ICMPV6, 0]);
    payload.extend_from_slice(&router_alert);
    payload.extend_from_slice(&report);
    let mut mld_routers = [0; 16];
    mld_routers[0] = 0xff;
    mld_routers[1] = 2;
    mld_routers[15] = 0x16;
    let frame = eth(
        [0x33, 0x33, 0, 0, 0, 0x16],
        A_MAC,
        ETH_P_IPV6,
        &ipv6([0; 16], mld_routers, next, 1, &payload),
    );
    assert_to_host(&node, &frame);

    // The same report from `::` to another pod would be routed: spoofed.
    let node = Node::new();
    let mut to_b = frame.clone();
    to_b[ETH_HLEN + 24..ETH_HLEN + 40].copy_from_slice(&B6);
    assert_eq!(node.send_from_a(&to_b).verdict, TC_ACT_SHOT, "to B");
    node.assert_single_drop(node.a, DIR_EGRESS, DropReason::SpoofedSource, to_b.len());
}

#[test]
fn neighbour_discovery_with_a_hop_limit_below_255_or_cut_short_is_dropped() {
    hypha_tests::require_root!();
    let node = Node::new();
    let forwarded = from_a(
        ll(A_MAC),
        solicited_node(GATEWAY6),
        ICMPV6,
        254,
        &solicitation(GATEWAY6, Some(A_MAC)),
    );
    assert_eq!(
        node.send_from_a(&forwarded).verdict,
        TC_ACT_SHOT,
        "hop limit 254"
    );
    node.assert_single_drop(
        node.a,
        DIR_EGRESS,
        DropReason::InvalidNeighborDiscovery,
        forwarded.len(),
    );

    let node = Node::new();
    let mut short = solicitation(GATEWAY6, None);
    short.truncate(12);
    let short = from_a(ll(A_MAC), solicited_node(GATEWAY6), ICMPV6, 255, &short);
    assert_eq!(node.send_from_a(&short).verdict, TC_ACT_SHOT, "cut short");
    node.assert_single_drop(
        node.a,
        DIR_EGRESS,
        DropReason::InvalidNeighborDiscovery,
        short.len(),
    );
}

#[test]
fn neighbour_discovery_from_the_host_reaches_the_pod() {
    hypha_tests::require_root!();
    // Even when the pod enforces an ingress policy that allows nothing.
    let node = Node::with_flags(ENDPOINT_F_INGRESS_POLICY, 0);
    let host_ll = ll(HOST_A_MAC);
    let frame = eth(
        [0x33, 0x33, 0xff, 0, 0, 7],
        HOST_A_MAC,
        ETH_P_IPV6,
        &ipv6(
            host_ll,
            solicited_node(A6),
            ICMPV6,
            255,
            &solicitation(A6, Some(HOST_A_MAC)),
        ),
    );
    let run = node.dp.run(TO_POD, &frame, node.a);
    assert_eq!(run.verdict, TC_ACT_OK, "verdict");
    assert_eq!(
        node.dp.stats_by_family(node.a).ipv6,
        stats_with(|s| &mut s.ingress.passed, counter(1, frame.len())),
        "A's IPv6 counters"
    );
}

// ---- routing ----

/// `frame` as the datapath should deliver it to B: MACs rewritten, hop limit one lower.
fn forwarded_to_b(frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&B_MAC);
    out[6..12].copy_from_slice(&HOST_B_MAC);
    out[ETH_HLEN + 7] -= 1;
    out
}

/// Asserts a redirect of A's `frame` to B and the counters it leaves.
fn assert_redirected_to_b(node: &Node, frame: &[u8]) {
    let run = node.send_from_a(frame);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "verdict");
    assert_eq!(run.frame, forwarded_to_b(frame), "forwarded frame");
    let a = node.dp.stats_by_family(node.a);
    let b = node.dp.stats_by_family(node.b);
    assert_eq!(
        a.ipv6,
        stats_with(|s| &mut s.egress.redirected, counter(1, frame.len())),
        "A's IPv6 counters"
    );
    assert_eq!(
        b.ipv6,
        stats_with(|s| &mut s.ingress.redirected, counter(1, frame.len())),
        "B's IPv6 counters"
    );
    assert_eq!(a.ipv4, FamilyStats::default(), "A's IPv4 counters");
    assert_eq!(node.dp.drops(), vec![], "hypha_drops");
}

#[test]
fn echo_to_a_local_pod_is_redirected_with_the_hop_limit_decremented() {
    hypha_tests::require_root!();
    let node = Node::new();
    let frame = from_a(A6, B6, ICMPV6, 64, &echo(128, 0x4242));
    assert_redirected_to_b(&node, &frame);
}

#[test]
fn hop_limit_1_to_a_local_pod_goes_to_the_host() {
    hypha_tests::require_root!();
    let node = Node::new();
    let frame = from_a(A6, B6, ICMPV6, 1, &echo(128, 0x4242));
    assert_to_host(&node, &frame);
}

#[test]
fn ipv6_to_the_world_and_from_the_link_local_address_goes_to_the_host() {
    hypha_tests::require_root!();
    let node = Node::new();
    assert_to_host(&node, &from_a(A6, WORLD6, UDP, 64, &udp(4000, DNS)));
    let node = Node::new();
    assert_to_host(
        &node,
        &from_a(ll(A_MAC), ll(HOST_A_MAC), UDP, 64, &udp(4000, DNS)),
    );
}

#[test]
fn every_extension_header_and_combinations_are_walked_to_the_ports() {
    hypha_tests::require_root!();
    // B admits only UDP to port 53 from A: a packet passes only if the walk found its
    // UDP header, and the wrong port is refused only if it read the right bytes.
    let combinations: [&[u8]; 6] = [
        &[HOP_BY_HOP],
        &[ROUTING],
        &[DEST_OPTS],
        &[FRAGMENT],
        &[HOP_BY_HOP, DEST_OPTS, ROUTING, FRAGMENT, DEST_OPTS],
        &[
            HOP_BY_HOP, DEST_OPTS, DEST_OPTS, DEST_OPTS, DEST_OPTS, DEST_OPTS, DEST_OPTS, DEST_OPTS,
        ],
    ];
    for kinds in combinations {
        let mut node = Node::with_flags(0, ENDPOINT_F_INGRESS_POLICY);
        allow_b_ingress(&mut node, ID_A, UDP, DNS);
        let (next, payload) = with_ext(kinds, UDP, &udp(4000, DNS), false);
        let frame = from_a(A6, B6, next, 64, &payload);
        assert_redirected_to_b(&node, &frame);

        let (next, payload) = with_ext(kinds, UDP, &udp(4000, DNS + 1), false);
        let frame = from_a(A6, B6, next, 64, &payload);
        assert_eq!(
            node.send_from_a(&frame).verdict,
            TC_ACT_SHOT,
            "port 54 behind {kinds:?}"
        );
        let key = DropKey {
            ifindex: node.b,
            reason: DropReason::PolicyDenied as u16,
            direction: DIR_INGRESS,
            _pad: 0,
        };
        assert_eq!(
            node.dp.drops(),
            vec![(key, counter(1, frame.len()))],
            "behind {kinds:?}"
        );
    }
}

fn allow_b_ingress(node: &mut Node, identity: u32, proto: u8, dport: u16) {
    node.dp.set_policy(
        PolicyKey {
            endpoint_id: 2,
            identity,
            dport,
            proto,
            direction: DIR_INGRESS,
        },
        PolicyEntry {
            policy_id: 7,
            action: POLICY_ALLOW,
            flags: 0,
            _pad: 0,
        },
    );
}

#[test]
fn a_later_fragment_has_no_ports_and_needs_a_portless_rule() {
    hypha_tests::require_root!();
    let mut node = Node::with_flags(0, ENDPOINT_F_INGRESS_POLICY);
    allow_b_ingress(&mut node, ID_A, UDP, DNS);
    // The first fragment carries the UDP header: the port rule admits it.
    let (next, first) = with_ext(&[FRAGMENT], UDP, &udp(4000, DNS), false);
    let first = from_a(A6, B6, next, 64, &first);
    assert_eq!(
        node.send_from_a(&first).verdict,
        TC_ACT_REDIRECT,
        "first fragment"
    );

    // A later one carries the middle of the datagram (which here looks like port 53):
    // a port-less flow, which the port rule does not match.
    let (next, later) = with_ext(&[FRAGMENT], UDP, &udp(4000, DNS), true);
    let later = from_a(A6, B6, next, 64, &later);
    assert_eq!(
        node.send_from_a(&later).verdict,
        TC_ACT_SHOT,
        "later fragment"
    );
    let events = node.dp.events();
    let e = events.last().expect("a drop event");
    assert_eq!(
        (e.kind, e.reason, e.family, e.proto, e.sport, e.dport),
        (EVENT_DROP, DropReason::PolicyDenied as u16, 6, UDP, 0, 0),
        "{e:?}"
    );
    assert_eq!((e.saddr, e.daddr), (A6, B6));

    // A port-less allow lets it through.
    allow_b_ingress(&mut node, ID_A, UDP, 0);
    assert_eq!(
        node.send_from_a(&later).verdict,
        TC_ACT_REDIRECT,
        "later fragment"
    );
}

#[test]
fn a_truncated_extension_header_is_dropped() {
    hypha_tests::require_root!();
    let node = Node::new();
    // Hop-by-hop options claiming 16 bytes, with 8 in the frame.
    let frame = from_a(A6, B6, HOP_BY_HOP, 64, &[UDP, 1, 1, 4, 0, 0, 0, 0]);
    assert_eq!(node.send_from_a(&frame).verdict, TC_ACT_SHOT, "verdict");
    node.assert_single_drop(
        node.a,
        DIR_EGRESS,
        DropReason::InvalidExtensionHeader,
        frame.len(),
    );
    assert_eq!(
        node.dp.stats_by_family(node.a).ipv6,
        stats_with(|s| &mut s.egress.dropped, counter(1, frame.len())),
        "A's IPv6 counters"
    );
}

#[test]
fn nine_extension_headers_are_too_many() {
    hypha_tests::require_root!();
    let node = Node::new();
    let (next, payload) = with_ext(&[DEST_OPTS; 9], UDP, &udp(4000, DNS), false);
    let frame = from_a(A6, B6, next, 64, &payload);
    assert_eq!(node.send_from_a(&frame).verdict, TC_ACT_SHOT, "verdict");
    node.assert_single_drop(
        node.a,
        DIR_EGRESS,
        DropReason::TooManyExtensionHeaders,
        frame.len(),
    );
}

#[test]
fn a_version_other_than_6_is_dropped() {
    hypha_tests::require_root!();
    let node = Node::new();
    let mut frame = from_a(A6, B6, UDP, 64, &udp(4000, DNS));
    frame[ETH_HLEN] = 0x40;
    assert_eq!(node.send_from_a(&frame).verdict, TC_ACT_SHOT, "verdict");
    node.assert_single_drop(node.a, DIR_EGRESS, DropReason::MalformedIpv6, frame.len());
}

#[test]
fn a_truncated_ipv6_header_is_dropped() {
    hypha_tests::require_root!();
    // BPF_PROG_TEST_RUN refuses an IPv6 frame shorter than its header, but a pod can send
    // one: live, through the veth, as for IPv4's truncated header.
    let mut node = Node::new();
    node.dp.attach(FROM_POD, "hy-host-a", TcAttachType::Ingress);
    node.netns.set_up("hy-host-a");
    node.netns.set_up("hy-pod-a");
    let mut frame = from_a(A6, B6, UDP, 64, &udp(4000, DNS));
    frame.truncate(ETH_HLEN + 20);

    node.netns.send_frame("hy-pod-a", &frame);

    let deadline = Instant::now() + Duration::from_secs(5);
    while node.dp.drops().is_empty() {
        assert!(Instant::now() < deadline, "no drop counted within 5 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    node.assert_single_drop(
        node.a,
        DIR_EGRESS,
        DropReason::InvalidIpv6Header,
        frame.len(),
    );
}

// ---- anti-spoofing ----

#[test]
fn a_spoofed_ipv6_source_is_dropped_and_reported_with_its_addresses() {
    hypha_tests::require_root!();
    let not_derived = {
        let mut a = ll(A_MAC);
        a[15] ^= 1;
        a
    };
    let cases = [
        ("another pod's address", B6, A_MAC),
        ("another MAC", A6, B_MAC),
        ("a link-local address not of its MAC", not_derived, A_MAC),
        ("the unspecified address outside DAD", [0; 16], A_MAC),
    ];
    for (what, src, mac) in cases {
        let mut node = Node::new();
        let frame = eth(
            HOST_A_MAC,
            mac,
            ETH_P_IPV6,
            &ipv6(src, WORLD6, UDP, 64, &udp(4000, DNS)),
        );
        assert_eq!(node.send_from_a(&frame).verdict, TC_ACT_SHOT, "{what}");
        node.assert_single_drop(node.a, DIR_EGRESS, DropReason::SpoofedSource, frame.len());
        let events = node.dp.events();
        assert_eq!(events.len(), 1, "{what}: {events:?}");
        let e = events[0];
        assert_eq!(
            (e.kind, e.reason, e.family, e.proto, e.ifindex),
            (EVENT_DROP, DropReason::SpoofedSource as u16, 6, UDP, node.a),
            "{what}"
        );
        assert_eq!((e.saddr, e.daddr), (src, WORLD6), "{what}");
    }
}

// ---- policy and connection tracking ----

#[test]
fn packet_too_big_for_a_tracked_flow_passes_and_one_for_an_unknown_flow_does_not() {
    hypha_tests::require_root!();
    // A admits nothing new, so its flows are tracked.
    let node = Node::with_flags(ENDPOINT_F_INGRESS_POLICY, 0);
    let out = from_a(A6, WORLD6, UDP, 64, &udp(4000, DNS));
    assert_eq!(
        node.send_from_a(&out).verdict,
        TC_ACT_OK,
        "A's datagram out"
    );
    assert_eq!(node.dp.connections6().len(), 1, "the flow is tracked");

    // A router on the way answers "packet too big", quoting A's packet.
    let too_big = |quoted: &[u8]| {
        let mut m = vec![2, 0, 0, 0];
        m.extend_from_slice(&1280u32.to_be_bytes());
        m.extend_from_slice(&quoted[ETH_HLEN..]);
        let router = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        eth(
            A_MAC,
            HOST_A_MAC,
            ETH_P_IPV6,
            &ipv6(router, A6, ICMPV6, 60, &m),
        )
    };
    let related = too_big(&out);
    assert_eq!(
        node.dp.run(TO_POD, &related, node.a).verdict,
        TC_ACT_OK,
        "an error quoting the tracked flow"
    );
    let unknown = too_big(&from_a(A6, WORLD6, UDP, 64, &udp(4001, DNS)));
    assert_eq!(
        node.dp.run(TO_POD, &unknown, node.a).verdict,
        TC_ACT_SHOT,
        "an error quoting no flow"
    );
    node.assert_single_drop(node.a, DIR_INGRESS, DropReason::PolicyDenied, unknown.len());
}

#[test]
fn echo_replies_match_their_request_by_identifier() {
    hypha_tests::require_root!();
    // A admits nothing new; its echo request to B is tracked with its identifier.
    let node = Node::with_flags(ENDPOINT_F_INGRESS_POLICY, 0);
    let request = from_a(A6, B6, ICMPV6, 64, &echo(128, 0x4242));
    assert_eq!(
        node.send_from_a(&request).verdict,
        TC_ACT_REDIRECT,
        "request"
    );

    let reply = |id| {
        eth(
            HOST_B_MAC,
            B_MAC,
            ETH_P_IPV6,
            &ipv6(B6, A6, ICMPV6, 64, &echo(129, id)),
        )
    };
    assert_eq!(
        node.dp.run(FROM_POD, &reply(0x4242), node.b).verdict,
        TC_ACT_REDIRECT,
        "the reply"
    );
    assert_eq!(
        node.dp.run(FROM_POD, &reply(0x4343), node.b).verdict,
        TC_ACT_SHOT,
        "a reply to another request"
    );
}

#[test]
fn ingress_policy_applies_to_ipv6_the_host_delivers() {
    hypha_tests::require_root!();
    let mut node = Node::with_flags(0, ENDPOINT_F_INGRESS_POLICY);
    allow_b_ingress(&mut node, IDENTITY_WORLD6, UDP, DNS);
    let to_b = |dport| {
        eth(
            B_MAC,
            HOST_B_MAC,
            ETH_P_IPV6,
            &ipv6(WORLD6, B6, UDP, 60, &udp(5000, dport)),
        )
    };
    assert_eq!(node.dp.run(TO_POD, &to_b(DNS), node.b).verdict, TC_ACT_OK);
    assert_eq!(
        node.dp.run(TO_POD, &to_b(DNS + 1), node.b).verdict,
        TC_ACT_SHOT
    );
}

// ---- families an endpoint does not have ----

#[test]
fn ipv6_to_or_from_an_ipv4_only_endpoint_is_an_unsupported_family() {
    hypha_tests::require_root!();
    let node = Node::new();
    let from_d = eth(
        HOST_D_MAC,
        D_MAC,
        ETH_P_IPV6,
        &ipv6(ll(D_MAC), B6, UDP, 64, &udp(4000, DNS)),
    );
    assert_eq!(node.dp.run(FROM_POD, &from_d, node.d).verdict, TC_ACT_SHOT);
    node.assert_single_drop(
        node.d,
        DIR_EGRESS,
        DropReason::UnsupportedFamily,
        from_d.len(),
    );

    let node = Node::new();
    let to_d = eth(
        D_MAC,
        HOST_D_MAC,
        ETH_P_IPV6,
        &ipv6(WORLD6, ll(D_MAC), UDP, 64, &udp(4000, DNS)),
    );
    assert_eq!(node.dp.run(TO_POD, &to_d, node.d).verdict, TC_ACT_SHOT);
    node.assert_single_drop(
        node.d,
        DIR_INGRESS,
        DropReason::UnsupportedFamily,
        to_d.len(),
    );
    assert_eq!(
        node.dp.stats_by_family(node.d).ipv6,
        stats_with(|s| &mut s.ingress.dropped, counter(1, to_d.len())),
        "D's IPv6 counters"
    );
}

/// An IPv4/UDP packet from C's would-be address (checksum not filled in).
fn ipv4_from_c() -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, UDP, 0, 0];
    ip.extend_from_slice(&[10, 244, 0, 9]);
    ip.extend_from_slice(&B4);
    ip.extend_from_slice(&udp(4000, DNS));
    eth(HOST_C_MAC, C_MAC, ETH_P_IP, &ip)
}

#[test]
fn ipv4_and_arp_to_or_from_an_ipv6_only_endpoint_are_an_unsupported_family() {
    hypha_tests::require_root!();
    let node = Node::new();
    let ipv4 = ipv4_from_c();
    assert_eq!(node.dp.run(FROM_POD, &ipv4, node.c).verdict, TC_ACT_SHOT);
    node.assert_single_drop(
        node.c,
        DIR_EGRESS,
        DropReason::UnsupportedFamily,
        ipv4.len(),
    );

    let node = Node::new();
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&C_MAC);
    arp.extend_from_slice(&[10, 244, 0, 9]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&GATEWAY4);
    let arp = eth([0xff; 6], C_MAC, ETH_P_ARP, &arp);
    assert_eq!(node.dp.run(FROM_POD, &arp, node.c).verdict, TC_ACT_SHOT);
    node.assert_single_drop(node.c, DIR_EGRESS, DropReason::UnsupportedFamily, arp.len());

    let node = Node::new();
    let mut to_c = ipv4_from_c();
    to_c[0..6].copy_from_slice(&C_MAC);
    to_c[6..12].copy_from_slice(&HOST_C_MAC);
    assert_eq!(node.dp.run(TO_POD, &to_c, node.c).verdict, TC_ACT_SHOT);
    node.assert_single_drop(
        node.c,
        DIR_INGRESS,
        DropReason::UnsupportedFamily,
        to_c.len(),
    );
    assert_eq!(
        node.dp.stats_by_family(node.c).ipv4,
        stats_with(|s| &mut s.ingress.dropped, counter(1, to_c.len())),
        "C's IPv4 counters"
    );
}

#[test]
fn an_ipv6_only_endpoint_routes_ipv6() {
    hypha_tests::require_root!();
    let node = Node::new();
    let frame = eth(
        HOST_C_MAC,
        C_MAC,
        ETH_P_IPV6,
        &ipv6(C6, B6, UDP, 64, &udp(4000, DNS)),
    );
    let run = node.dp.run(FROM_POD, &frame, node.c);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "verdict");
    assert_eq!(run.frame[0..6], B_MAC, "to B");
    assert_eq!(run.frame[ETH_HLEN + 7], 63, "hop limit");
}

#[test]
fn an_ipv6_address_in_no_prefix_of_the_ipcache_is_the_ipv6_world() {
    hypha_tests::require_root!();
    // Without even `::/0` in hypha_ipcache6, a remote IPv6 address is world over IPv6,
    // never the IPv4 world (which a rule for 0.0.0.0/0 allows).
    let netns = TestNetns::enter();
    let b = netns.add_veth("hy-host-b", "hy-pod-b");
    let mut dp = Datapath::load();
    let mut ib = info(b, 2, B_MAC, HOST_B_MAC);
    ib.flags = ENDPOINT_F_INGRESS_POLICY;
    dp.add_endpoint_with(Some(B4), Some(B6), ib);
    let rule = |identity| {
        (
            PolicyKey {
                endpoint_id: 2,
                identity,
                dport: DNS,
                proto: UDP,
                direction: DIR_INGRESS,
            },
            PolicyEntry {
                policy_id: 7,
                action: POLICY_ALLOW,
                flags: 0,
                _pad: 0,
            },
        )
    };
    let to_b = eth(
        B_MAC,
        HOST_B_MAC,
        ETH_P_IPV6,
        &ipv6(WORLD6, B6, UDP, 60, &udp(5000, DNS)),
    );
    let (key, entry) = rule(IDENTITY_WORLD);
    dp.set_policy(key, entry);
    assert_eq!(
        dp.run(TO_POD, &to_b, b).verdict,
        TC_ACT_SHOT,
        "IPv4 world rule"
    );
    let (key, entry) = rule(IDENTITY_WORLD6);
    dp.set_policy(key, entry);
    assert_eq!(
        dp.run(TO_POD, &to_b, b).verdict,
        TC_ACT_OK,
        "IPv6 world rule"
    );
    drop(dp);
    drop(netns);
}
