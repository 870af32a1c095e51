//! `BPF_PROG_TEST_RUN` tests of the datapath's verdicts: crafted frames in, verdict,
//! rewritten frame and counters out ("packets before namespaces").
//!
//! **Privileged**: every test loads the eBPF object (CAP_BPF, CAP_SYS_ADMIN for a
//! private bpffs) and creates a veth pair in a fresh network namespace of its own
//! (CAP_NET_ADMIN). Run as root. The object must be built first
//! (`cargo xtask build-ebpf`, or set `HYPHA_EBPF_OBJ`).
//!
//! `bpf_redirect` and `bpf_redirect_peer` only record their target inside a test run,
//! so a redirect shows as the verdict `TC_ACT_REDIRECT` and the frame as rewritten.

use std::time::{Duration, Instant};

use aya::programs::TcAttachType;
use hypha_common::{
    DIR_EGRESS, DIR_INGRESS, DropKey, DropReason, EVENT_DROP, EndpointInfo, FamilyStats,
    NodeConfig,
    programs::{FROM_POD, TO_POD},
};
use hypha_tests::ebpf::{
    Datapath, Run, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestNetns, counter, eth, ipv4_checksum,
    stats_with,
};

const POD_A_IP: [u8; 4] = [10, 244, 0, 7];
const POD_B_IP: [u8; 4] = [10, 244, 0, 8];
const GATEWAY_IP: [u8; 4] = [10, 244, 0, 1];
const OUTSIDE_IP: [u8; 4] = [192, 0, 2, 10];

const POD_A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x07];
const HOST_A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];
const POD_B_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x08];
const HOST_B_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];
const BROADCAST: [u8; 6] = [0xff; 6];

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_LLDP: u16 = 0x88cc;
const ETH_HLEN: usize = 14;

/// Two endpoints, A and B, each behind the host side of a veth pair in the test's own
/// network namespace, and the gateway configured. Frames are sent "by pod A", that is
/// run on A's host-side veth.
struct Node {
    dp: Datapath,
    /// ifindex of A's host-side veth.
    a: u32,
    /// ifindex of B's host-side veth.
    b: u32,
    // Last: the namespace, and the veths in it, go after everything else.
    netns: TestNetns,
}

impl Node {
    fn new() -> Self {
        let netns = TestNetns::enter();
        let a = netns.add_veth("hy-host-a", "hy-pod-a");
        let b = netns.add_veth("hy-host-b", "hy-pod-b");
        let mut dp = Datapath::load();
        dp.set_config(NodeConfig {
            gateway: u32::from_ne_bytes(GATEWAY_IP),
            flags: 0,
        });
        dp.add_endpoint(POD_A_IP, endpoint(a, 1, POD_A_MAC, HOST_A_MAC));
        dp.add_endpoint(POD_B_IP, endpoint(b, 2, POD_B_MAC, HOST_B_MAC));
        Self { dp, a, b, netns }
    }

    /// Runs `hypha_from_pod` on a frame pod A sent.
    fn send_from_a(&self, frame: &[u8]) -> Run {
        self.dp.run(FROM_POD, frame, self.a)
    }

    fn stats_a(&self) -> FamilyStats {
        self.dp.stats(self.a)
    }

    fn stats_b(&self) -> FamilyStats {
        self.dp.stats(self.b)
    }

    /// Asserts that the only drop counted is one of `frame_len` bytes from A for `reason`.
    fn assert_single_drop(&self, reason: DropReason, frame_len: usize) {
        self.assert_single_drop_n(reason, 1, frame_len);
    }

    /// Asserts that the only drops counted are `n` frames of `frame_len` bytes from A,
    /// all for `reason`.
    fn assert_single_drop_n(&self, reason: DropReason, n: u32, frame_len: usize) {
        let key = DropKey {
            ifindex: self.a,
            reason: reason as u16,
            direction: DIR_EGRESS,
            _pad: 0,
        };
        let n = u64::from(n);
        assert_eq!(
            self.dp.drops(),
            vec![(key, counter(n, n as usize * frame_len))],
            "hypha_drops"
        );
        let mut expected = FamilyStats::default();
        expected.egress.dropped = counter(n, n as usize * frame_len);
        assert_eq!(self.stats_a(), expected, "A's counters");
    }
}

fn endpoint(ifindex: u32, endpoint_id: u32, pod_mac: [u8; 6], host_mac: [u8; 6]) -> EndpointInfo {
    EndpointInfo {
        ifindex,
        endpoint_id,
        pod_mac,
        host_mac,
        flags: 0,
    }
}

// ---- frames ----

/// An Ethernet/IPv4 ARP packet (28 bytes).
fn arp(op: u16, sha: [u8; 6], spa: [u8; 4], tha: [u8; 6], tpa: [u8; 4]) -> Vec<u8> {
    let mut p = Vec::with_capacity(28);
    p.extend_from_slice(&1u16.to_be_bytes()); // htype: Ethernet
    p.extend_from_slice(&ETH_P_IP.to_be_bytes()); // ptype: IPv4
    p.extend_from_slice(&[6, 4]); // hlen, plen
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa);
    p.extend_from_slice(&tha);
    p.extend_from_slice(&tpa);
    p
}

fn arp_request(sender_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    eth(
        BROADCAST,
        sender_mac,
        ETH_P_ARP,
        &arp(1, sender_mac, sender_ip, [0; 6], target_ip),
    )
}

/// What the variable parts of a test IPv4 packet are.
struct Ipv4 {
    dst: [u8; 4],
    ttl: u8,
    /// Flags and fragment offset, host order.
    frag_off: u16,
    /// Option bytes, a multiple of 4 long.
    options: Vec<u8>,
}

impl Ipv4 {
    fn to(dst: [u8; 4]) -> Self {
        Self {
            dst,
            ttl: 64,
            frag_off: 0x4000, // DF
            options: Vec::new(),
        }
    }

    /// A UDP packet from pod A with a valid header checksum, in a frame to A's gateway.
    fn frame(&self) -> Vec<u8> {
        assert_eq!(self.options.len() % 4, 0);
        let payload = [
            0x30, 0x39, 0x00, 0x35, 0x00, 0x0c, 0x00, 0x00, b'h', b'y', b'p', b'h',
        ];
        let hlen = 20 + self.options.len();
        let mut ip = Vec::with_capacity(hlen + payload.len());
        ip.push(0x40 | (hlen / 4) as u8);
        ip.push(0); // tos
        ip.extend_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes()); // id
        ip.extend_from_slice(&self.frag_off.to_be_bytes());
        ip.push(self.ttl);
        ip.push(17); // UDP
        ip.extend_from_slice(&[0, 0]); // checksum, filled below
        ip.extend_from_slice(&POD_A_IP);
        ip.extend_from_slice(&self.dst);
        ip.extend_from_slice(&self.options);
        let csum = ipv4_checksum(&ip[..hlen]);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        ip.extend_from_slice(&payload);
        eth(HOST_A_MAC, POD_A_MAC, ETH_P_IP, &ip)
    }
}

/// `frame` as the datapath should forward it to pod B: MACs rewritten, TTL one lower,
/// and the header checksum recomputed from scratch (not incrementally, as the datapath
/// does), so a wrong incremental update shows as a mismatch.
fn forwarded_to_b(frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&POD_B_MAC);
    out[6..12].copy_from_slice(&HOST_B_MAC);
    let ip = &mut out[ETH_HLEN..];
    let hlen = usize::from(ip[0] & 0x0f) * 4;
    ip[8] -= 1;
    ip[10..12].copy_from_slice(&[0, 0]);
    let csum = ipv4_checksum(&ip[..hlen]);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    out
}

fn assert_header_checksum_valid(frame: &[u8]) {
    let ip = &frame[ETH_HLEN..];
    let hlen = usize::from(ip[0] & 0x0f) * 4;
    // Summing a header with its checksum in place gives 0xffff, i.e. a checksum of 0.
    assert_eq!(
        ipv4_checksum(&ip[..hlen]),
        0,
        "IPv4 header checksum of {ip:02x?}"
    );
}

/// Asserts a redirect to pod B of `frame` and the counters it leaves.
fn assert_redirected_to_b(node: &Node, frame: &[u8]) {
    let run = node.send_from_a(frame);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "verdict");
    assert_header_checksum_valid(&run.frame);
    assert_eq!(run.frame, forwarded_to_b(frame), "forwarded frame");
    assert_eq!(
        node.stats_a(),
        stats_with(|s| &mut s.egress.redirected, counter(1, frame.len())),
        "A's counters"
    );
    assert_eq!(
        node.stats_b(),
        stats_with(|s| &mut s.ingress.redirected, counter(1, frame.len())),
        "B's counters"
    );
    assert_eq!(node.dp.drops(), vec![], "hypha_drops");
}

/// Asserts that `frame` goes to the host stack untouched and counts as A's egress.passed.
fn assert_passed_to_host(node: &Node, frame: &[u8]) {
    let run = node.send_from_a(frame);
    assert_eq!(run.verdict, TC_ACT_OK, "verdict");
    assert_eq!(run.frame, frame, "frame must be untouched");
    assert_eq!(
        node.stats_a(),
        stats_with(|s| &mut s.egress.passed, counter(1, frame.len())),
        "A's counters"
    );
    assert_eq!(node.stats_b(), FamilyStats::default(), "B's counters");
    assert_eq!(node.dp.drops(), vec![], "hypha_drops");
}

#[test]
fn object_loads_and_both_programs_pass_the_verifier() {
    hypha_tests::require_root!();
    // Loading runs the verifier on this kernel; a rejection panics with its log.
    let _datapath = Datapath::load();
}

// ---- ARP ----

#[test]
fn arp_request_for_the_gateway_is_answered_back_to_the_pod() {
    hypha_tests::require_root!();
    let node = Node::new();
    let request = arp_request(POD_A_MAC, POD_A_IP, GATEWAY_IP);

    let run = node.send_from_a(&request);

    assert_eq!(run.verdict, TC_ACT_REDIRECT, "verdict");
    let reply = eth(
        POD_A_MAC,
        HOST_A_MAC,
        ETH_P_ARP,
        &arp(2, HOST_A_MAC, GATEWAY_IP, POD_A_MAC, POD_A_IP),
    );
    assert_eq!(run.frame, reply, "ARP reply");
    assert_eq!(
        node.stats_a(),
        stats_with(|s| &mut s.egress.passed, counter(1, request.len())),
        "A's counters"
    );
    assert_eq!(node.dp.drops(), vec![], "hypha_drops");
}

#[test]
fn arp_request_for_another_address_goes_to_the_host() {
    hypha_tests::require_root!();
    let node = Node::new();
    assert_passed_to_host(&node, &arp_request(POD_A_MAC, POD_A_IP, POD_B_IP));
}

#[test]
fn arp_request_from_an_address_of_another_veth_goes_to_the_host() {
    hypha_tests::require_root!();
    // B's address asking from A's veth: spoofed, or misplaced; not answered.
    let node = Node::new();
    assert_passed_to_host(&node, &arp_request(POD_A_MAC, POD_B_IP, GATEWAY_IP));
}

#[test]
fn arp_reply_goes_to_the_host() {
    hypha_tests::require_root!();
    let node = Node::new();
    let reply = eth(
        HOST_A_MAC,
        POD_A_MAC,
        ETH_P_ARP,
        &arp(2, POD_A_MAC, POD_A_IP, HOST_A_MAC, GATEWAY_IP),
    );
    assert_passed_to_host(&node, &reply);
}

#[test]
fn truncated_arp_is_dropped() {
    hypha_tests::require_root!();
    let node = Node::new();
    let mut frame = arp_request(POD_A_MAC, POD_A_IP, GATEWAY_IP);
    frame.truncate(ETH_HLEN + 20);

    let run = node.send_from_a(&frame);

    assert_eq!(run.verdict, TC_ACT_SHOT, "verdict");
    node.assert_single_drop(DropReason::InvalidArp, frame.len());
}

// ---- IPv4 ----

#[test]
fn ipv4_to_a_local_pod_is_redirected_with_ttl_decremented() {
    hypha_tests::require_root!();
    let node = Node::new();
    assert_redirected_to_b(&node, &Ipv4::to(POD_B_IP).frame());
}

#[test]
fn ipv4_with_options_to_a_local_pod_is_redirected() {
    hypha_tests::require_root!();
    let node = Node::new();
    let packet = Ipv4 {
        // Router alert (RFC 2113).
        options: vec![0x94, 0x04, 0x00, 0x00],
        ..Ipv4::to(POD_B_IP)
    };
    let frame = packet.frame();
    assert_eq!(frame[ETH_HLEN] & 0x0f, 6, "the test packet has IHL 6");
    assert_redirected_to_b(&node, &frame);
}

#[test]
fn ipv4_fragments_to_a_local_pod_are_redirected() {
    hypha_tests::require_root!();
    // First fragment (MF set), then a middle one (MF set, offset 185 × 8 bytes), then
    // the last (offset only).
    for frag_off in [0x2000, 0x2000 | 185, 370] {
        let node = Node::new();
        let packet = Ipv4 {
            frag_off,
            ..Ipv4::to(POD_B_IP)
        };
        assert_redirected_to_b(&node, &packet.frame());
    }
}

#[test]
fn ipv4_with_ttl_1_to_a_local_pod_goes_to_the_host() {
    hypha_tests::require_root!();
    // The host stack sends the ICMP time exceeded.
    let node = Node::new();
    let packet = Ipv4 {
        ttl: 1,
        ..Ipv4::to(POD_B_IP)
    };
    assert_passed_to_host(&node, &packet.frame());
}

#[test]
fn ipv4_to_an_unknown_address_goes_to_the_host() {
    hypha_tests::require_root!();
    let node = Node::new();
    assert_passed_to_host(&node, &Ipv4::to(OUTSIDE_IP).frame());
}

#[test]
fn ipv4_to_the_gateway_goes_to_the_host() {
    hypha_tests::require_root!();
    let node = Node::new();
    assert_passed_to_host(&node, &Ipv4::to(GATEWAY_IP).frame());
}

#[test]
fn truncated_ipv4_header_is_dropped() {
    hypha_tests::require_root!();
    // BPF_PROG_TEST_RUN (6.18) refuses an IPv4 frame shorter than a whole IPv4 header
    // with EINVAL before the program runs, but a pod can send one (through a packet
    // socket). So this case runs live: the program attached to A's host-side veth, the
    // frame sent from the pod side, the verdict read from the counters (only a drop
    // counts in `hypha_drops`).
    let mut node = Node::new();
    node.dp.attach(FROM_POD, "hy-host-a", TcAttachType::Ingress);
    node.netns.set_up("hy-host-a");
    node.netns.set_up("hy-pod-a");
    let mut frame = Ipv4::to(POD_B_IP).frame();
    frame.truncate(ETH_HLEN + 10);

    node.netns.send_frame("hy-pod-a", &frame);

    // Delivery to the peer is asynchronous (softirq); it takes microseconds.
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.dp.drops().is_empty() {
        assert!(Instant::now() < deadline, "no drop counted within 5 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    node.assert_single_drop(DropReason::InvalidIpv4Header, frame.len());
    assert_eq!(node.stats_b(), FamilyStats::default(), "B's counters");
}

#[test]
fn ipv4_with_ihl_below_5_is_dropped() {
    hypha_tests::require_root!();
    let node = Node::new();
    let mut frame = Ipv4::to(POD_B_IP).frame();
    frame[ETH_HLEN] = 0x44;

    let run = node.send_from_a(&frame);

    assert_eq!(run.verdict, TC_ACT_SHOT, "verdict");
    node.assert_single_drop(DropReason::MalformedIpv4, frame.len());
}

#[test]
fn ipv6_header_in_an_ipv4_ethertype_is_dropped() {
    hypha_tests::require_root!();
    let node = Node::new();
    let mut frame = Ipv4::to(POD_B_IP).frame();
    frame[ETH_HLEN] = 0x65;

    let run = node.send_from_a(&frame);

    assert_eq!(run.verdict, TC_ACT_SHOT, "verdict");
    node.assert_single_drop(DropReason::MalformedIpv4, frame.len());
}

#[test]
fn ipv4_ihl_beyond_the_frame_is_dropped() {
    hypha_tests::require_root!();
    // IHL 15 claims a 60-byte header; the frame holds 20 bytes of header and 12 of
    // payload.
    let node = Node::new();
    let mut frame = Ipv4::to(POD_B_IP).frame();
    frame[ETH_HLEN] = 0x4f;
    assert!(frame.len() < ETH_HLEN + 60);

    let run = node.send_from_a(&frame);

    assert_eq!(run.verdict, TC_ACT_SHOT, "verdict");
    node.assert_single_drop(DropReason::InvalidIpv4Header, frame.len());
}

// ---- other EtherTypes ----

/// An IPv6/UDP packet fd00::7 → fd00::8 with an empty payload. (The kernel's test run
/// refuses an IPv6 frame shorter than the 40-byte header.)
fn ipv6_udp() -> Vec<u8> {
    let mut packet = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
    packet.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    packet.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8]);
    packet.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0x00, 0x08, 0x00, 0x00]);
    packet
}

/// An ICMPv6 neighbour solicitation from fe80::7 for fe80::1 (to its solicited-node
/// multicast address), as a pod sends to find its gateway over IPv6.
fn ipv6_neighbour_solicitation() -> Vec<u8> {
    let mut packet = vec![0x60, 0, 0, 0, 0, 24, 58, 255];
    packet.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    packet.extend_from_slice(&[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1]);
    // Type 135, code 0, checksum (not checked by the datapath), reserved, target.
    packet.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
    packet.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    eth([0x33, 0x33, 0xff, 0, 0, 1], POD_A_MAC, ETH_P_IPV6, &packet)
}

#[test]
fn ipv6_from_a_pod_is_dropped_as_an_unsupported_family_and_reported() {
    hypha_tests::require_root!();
    // Hypha manages only IPv4 for its endpoints: IPv6 must not reach the host stack,
    // where no anti-spoofing or policy applies to it.
    let mut node = Node::new();
    let frame = eth(HOST_A_MAC, POD_A_MAC, ETH_P_IPV6, &ipv6_udp());

    let run = node.send_from_a(&frame);

    assert_eq!(run.verdict, TC_ACT_SHOT, "verdict");
    node.assert_single_drop(DropReason::UnsupportedFamily, frame.len());
    let events = node.dp.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(
        (e.kind, e.reason, e.ifindex, e.direction, e.len),
        (
            EVENT_DROP,
            DropReason::UnsupportedFamily as u16,
            node.a,
            DIR_EGRESS,
            frame.len() as u32
        )
    );
    // The event carries the IPv6 header's addresses and next header.
    assert_eq!(e.family, 6, "family");
    assert_eq!(e.saddr, frame[ETH_HLEN + 8..ETH_HLEN + 24], "source");
    assert_eq!(e.daddr, frame[ETH_HLEN + 24..ETH_HLEN + 40], "destination");
    assert_eq!(e.proto, 17, "next header");
}

#[test]
fn ipv6_neighbour_discovery_from_a_pod_is_dropped_too() {
    hypha_tests::require_root!();
    // Neighbour discovery passes only for a managed family; IPv6 is not one.
    let node = Node::new();
    let frame = ipv6_neighbour_solicitation();

    let run = node.send_from_a(&frame);

    assert_eq!(run.verdict, TC_ACT_SHOT, "verdict");
    node.assert_single_drop(DropReason::UnsupportedFamily, frame.len());
}

/// Asserts that `frame`, run through `hypha_to_pod` on A's veth, is dropped for `reason`
/// and counted in A's ingress.
fn assert_dropped_towards_a(node: &Node, frame: &[u8], reason: DropReason) {
    let run = node.dp.run(TO_POD, frame, node.a);
    assert_eq!(run.verdict, TC_ACT_SHOT, "verdict");
    let key = DropKey {
        ifindex: node.a,
        reason: reason as u16,
        direction: DIR_INGRESS,
        _pad: 0,
    };
    assert_eq!(
        node.dp.drops(),
        vec![(key, counter(1, frame.len()))],
        "hypha_drops"
    );
    assert_eq!(
        node.stats_a(),
        stats_with(|s| &mut s.ingress.dropped, counter(1, frame.len())),
        "A's counters"
    );
}

#[test]
fn ipv6_to_a_pod_is_dropped_as_an_unsupported_family() {
    hypha_tests::require_root!();
    let node = Node::new();
    let frame = eth(POD_A_MAC, HOST_A_MAC, ETH_P_IPV6, &ipv6_udp());
    assert_dropped_towards_a(&node, &frame, DropReason::UnsupportedFamily);
}

#[test]
fn ipv6_neighbour_discovery_to_a_pod_is_dropped() {
    hypha_tests::require_root!();
    let node = Node::new();
    let mut frame = ipv6_neighbour_solicitation();
    frame[6..12].copy_from_slice(&HOST_A_MAC);
    assert_dropped_towards_a(&node, &frame, DropReason::UnsupportedFamily);
}

#[test]
fn an_unknown_ethertype_to_a_pod_is_dropped() {
    hypha_tests::require_root!();
    let node = Node::new();
    let lldp = eth(
        [0x01, 0x80, 0xc2, 0, 0, 0x0e],
        HOST_A_MAC,
        ETH_P_LLDP,
        &[0; 32],
    );
    assert_dropped_towards_a(&node, &lldp, DropReason::UnknownL3);
}

#[test]
fn arp_to_a_pod_still_passes() {
    hypha_tests::require_root!();
    // The host must still be able to ARP for the pod: IPv4's neighbour discovery.
    let node = Node::new();
    let request = eth(
        BROADCAST,
        HOST_A_MAC,
        ETH_P_ARP,
        &arp(1, HOST_A_MAC, GATEWAY_IP, [0; 6], POD_A_IP),
    );

    let run = node.dp.run(TO_POD, &request, node.a);

    assert_eq!(run.verdict, TC_ACT_OK, "verdict");
    assert_eq!(run.frame, request, "frame must be untouched");
    assert_eq!(
        node.stats_a(),
        stats_with(|s| &mut s.ingress.passed, counter(1, request.len())),
        "A's counters"
    );
    assert_eq!(node.dp.drops(), vec![], "hypha_drops");
}

#[test]
fn unknown_ethertype_is_dropped_and_every_drop_is_counted() {
    hypha_tests::require_root!();
    let node = Node::new();
    let lldp = eth(
        [0x01, 0x80, 0xc2, 0, 0, 0x0e],
        POD_A_MAC,
        ETH_P_LLDP,
        &[0; 32],
    );

    let run = node.send_from_a(&lldp);
    assert_eq!(run.verdict, TC_ACT_SHOT, "verdict");
    node.assert_single_drop(DropReason::UnknownL3, lldp.len());

    // A second drop of the same kind adds to the existing entry.
    assert_eq!(node.send_from_a(&lldp).verdict, TC_ACT_SHOT, "verdict");
    let key = DropKey {
        ifindex: node.a,
        reason: DropReason::UnknownL3 as u16,
        direction: DIR_EGRESS,
        _pad: 0,
    };
    assert_eq!(
        node.dp.drops(),
        vec![(key, counter(2, 2 * lldp.len()))],
        "hypha_drops"
    );
    assert_eq!(
        node.stats_a(),
        stats_with(|s| &mut s.egress.dropped, counter(2, 2 * lldp.len())),
        "A's counters"
    );
}

#[test]
fn drops_on_an_interface_without_stats_are_still_counted_by_reason() {
    hypha_tests::require_root!();
    // An interface the agent has no endpoint for: no hypha_ep_stats entry, which the
    // datapath must not create, but the drop still lands in hypha_drops.
    let node = Node::new();
    let stranger = node.netns.add_veth("hy-host-x", "hy-pod-x");
    let lldp = eth(
        [0x01, 0x80, 0xc2, 0, 0, 0x0e],
        POD_A_MAC,
        ETH_P_LLDP,
        &[0; 32],
    );

    let run = node.dp.run(FROM_POD, &lldp, stranger);

    assert_eq!(run.verdict, TC_ACT_SHOT, "verdict");
    let key = DropKey {
        ifindex: stranger,
        reason: DropReason::UnknownL3 as u16,
        direction: DIR_EGRESS,
        _pad: 0,
    };
    assert_eq!(
        node.dp.drops(),
        vec![(key, counter(1, lldp.len()))],
        "hypha_drops"
    );
    assert_eq!(node.stats_a(), FamilyStats::default(), "A's counters");
}

#[test]
fn counters_are_kept_per_family() {
    hypha_tests::require_root!();
    // IPv4 and ARP count as IPv4, IPv6 as IPv6 (even when dropped for want of the family),
    // frames of no family as other.
    let node = Node::new();
    let ipv4 = Ipv4::to(OUTSIDE_IP).frame();
    let arp = arp_request(POD_A_MAC, POD_A_IP, GATEWAY_IP);
    let ipv6 = eth(HOST_A_MAC, POD_A_MAC, ETH_P_IPV6, &ipv6_udp());
    let lldp = eth(
        [0x01, 0x80, 0xc2, 0, 0, 0x0e],
        POD_A_MAC,
        ETH_P_LLDP,
        &[0; 32],
    );

    assert_eq!(node.send_from_a(&ipv4).verdict, TC_ACT_OK, "IPv4 verdict");
    assert_eq!(
        node.send_from_a(&arp).verdict,
        TC_ACT_REDIRECT,
        "ARP verdict"
    );
    assert_eq!(node.send_from_a(&ipv6).verdict, TC_ACT_SHOT, "IPv6 verdict");
    assert_eq!(node.send_from_a(&lldp).verdict, TC_ACT_SHOT, "LLDP verdict");
    let to_a = eth(
        POD_A_MAC,
        HOST_A_MAC,
        ETH_P_IP,
        &Ipv4::to(POD_A_IP).frame()[ETH_HLEN..],
    );
    assert_eq!(node.dp.run(TO_POD, &to_a, node.a).verdict, TC_ACT_OK);

    let stats = node.dp.stats_by_family(node.a);
    let mut ipv4_stats = FamilyStats::default();
    ipv4_stats.egress.passed = counter(2, ipv4.len() + arp.len());
    ipv4_stats.ingress.passed = counter(1, to_a.len());
    assert_eq!(stats.ipv4, ipv4_stats, "A's IPv4 counters");
    assert_eq!(
        stats.ipv6,
        stats_with(|s| &mut s.egress.dropped, counter(1, ipv6.len())),
        "A's IPv6 counters"
    );
    assert_eq!(
        stats.other,
        stats_with(|s| &mut s.egress.dropped, counter(1, lldp.len())),
        "A's other counters"
    );
}

#[test]
fn a_veth_without_an_endpoint_entry_sends_nothing_and_receives_only_ipv4() {
    hypha_tests::require_root!();
    // hypha_ifaces says which families a veth's endpoint has; a veth without an entry has
    // none, except that the host may still deliver IPv4 and ARP to it, as before the
    // entries existed.
    let node = Node::new();
    let stranger = node.netns.add_veth("hy-host-x", "hy-pod-x");
    let ipv4 = Ipv4::to(OUTSIDE_IP).frame();
    let arp = arp_request(POD_A_MAC, POD_A_IP, GATEWAY_IP);

    for frame in [&ipv4, &arp] {
        let run = node.dp.run(FROM_POD, frame, stranger);
        assert_eq!(run.verdict, TC_ACT_SHOT, "verdict from the stranger");
    }
    let key = DropKey {
        ifindex: stranger,
        reason: DropReason::UnsupportedFamily as u16,
        direction: DIR_EGRESS,
        _pad: 0,
    };
    assert_eq!(
        node.dp.drops(),
        vec![(key, counter(2, ipv4.len() + arp.len()))],
        "hypha_drops"
    );

    let to_x = eth(
        POD_A_MAC,
        HOST_A_MAC,
        ETH_P_IP,
        &Ipv4::to([10, 244, 0, 99]).frame()[ETH_HLEN..],
    );
    assert_eq!(node.dp.run(TO_POD, &to_x, stranger).verdict, TC_ACT_OK);
    let ipv6 = eth(POD_A_MAC, HOST_A_MAC, ETH_P_IPV6, &ipv6_udp());
    assert_eq!(node.dp.run(TO_POD, &ipv6, stranger).verdict, TC_ACT_SHOT);
}

// ---- hypha_to_pod ----

#[test]
fn to_pod_passes_and_counts_ingress() {
    hypha_tests::require_root!();
    let node = Node::new();
    let frame = eth(
        POD_A_MAC,
        HOST_A_MAC,
        ETH_P_IP,
        &Ipv4::to(POD_A_IP).frame()[ETH_HLEN..],
    );

    let run = node.dp.run(TO_POD, &frame, node.a);

    assert_eq!(run.verdict, TC_ACT_OK, "verdict");
    assert_eq!(run.frame, frame, "frame must be untouched");
    assert_eq!(
        node.stats_a(),
        stats_with(|s| &mut s.ingress.passed, counter(1, frame.len())),
        "A's counters"
    );
    assert_eq!(node.stats_b(), FamilyStats::default(), "B's counters");
    assert_eq!(node.dp.drops(), vec![], "hypha_drops");
}

// ---- anti-spoofing, policy and connection tracking ----

mod policy {
    use hypha_common::{
        CT_SYN, DIR_EGRESS, DIR_INGRESS, DropKey, DropReason, ENDPOINT_F_INGRESS_AUDIT,
        ENDPOINT_F_INGRESS_POLICY, EVENT_DROP, EVENT_POLICY_ALLOW, EVENT_POLICY_AUDIT,
        IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, POLICY_ALLOW, POLICY_DENY, POLICY_F_AUDIT,
        PolicyEntry, PolicyKey,
        programs::{FROM_POD, TO_POD},
    };
    use hypha_common::{DROP_EVENTS_BURST, DROP_EVENTS_PER_S, ENDPOINT_F_INGRESS_LIMIT};
    use hypha_tests::ebpf::{
        RunOptions, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, pin_to_current_cpu,
    };

    use super::*;

    const ID_A: u32 = 300;
    const ID_B: u32 = 301;
    const DNS: u16 = 53;

    /// An IPv4 packet `src` → `dst` of protocol `proto` whose L4 header starts with the
    /// ports and goes on with `rest`, sent by the pod `(src_mac, host_mac)`.
    #[expect(
        clippy::too_many_arguments,
        reason = "a frame is described field by field"
    )]
    fn ipv4_l4(
        src: [u8; 4],
        src_mac: [u8; 6],
        host_mac: [u8; 6],
        dst: [u8; 4],
        proto: u8,
        sport: u16,
        dport: u16,
        rest: &[u8],
    ) -> Vec<u8> {
        let total = (20 + 4 + rest.len()) as u16;
        let [hi, lo] = total.to_be_bytes();
        let mut ip = vec![0x45, 0, hi, lo, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let csum = ipv4_checksum(&ip);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        ip.extend_from_slice(&sport.to_be_bytes());
        ip.extend_from_slice(&dport.to_be_bytes());
        ip.extend_from_slice(rest);
        eth(host_mac, src_mac, ETH_P_IP, &ip)
    }

    /// A UDP datagram `src` → `dst` sent by the pod `(src_mac, host_mac)`.
    fn udp(
        src: [u8; 4],
        src_mac: [u8; 6],
        host_mac: [u8; 6],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
    ) -> Vec<u8> {
        let rest = [0, 12, 0, 0, b'h', b'y', b'p', b'h'];
        ipv4_l4(src, src_mac, host_mac, dst, 17, sport, dport, &rest)
    }

    fn a_to_b(dport: u16) -> Vec<u8> {
        udp(POD_A_IP, POD_A_MAC, HOST_A_MAC, POD_B_IP, 40000, dport)
    }

    fn b_to_a(sport: u16, dport: u16) -> Vec<u8> {
        udp(POD_B_IP, POD_B_MAC, HOST_B_MAC, POD_A_IP, sport, dport)
    }

    /// Pods A and B with identities, B's ingress enforced by policy (`b_flags`).
    fn node(a_flags: u32, b_flags: u32) -> Node {
        let mut node = Node::new();
        let mut a = endpoint(node.a, 1, POD_A_MAC, HOST_A_MAC);
        a.flags = a_flags;
        let mut b = endpoint(node.b, 2, POD_B_MAC, HOST_B_MAC);
        b.flags = b_flags;
        node.dp.add_endpoint(POD_A_IP, a);
        node.dp.add_endpoint(POD_B_IP, b);
        node.dp.set_identity(POD_A_IP, 32, ID_A);
        node.dp.set_identity(POD_B_IP, 32, ID_B);
        node.dp.set_identity([0, 0, 0, 0], 0, IDENTITY_WORLD);
        node
    }

    fn b_ingress(identity: u32, proto: u8, dport: u16) -> PolicyKey {
        PolicyKey {
            endpoint_id: 2,
            identity,
            dport,
            proto,
            direction: DIR_INGRESS,
        }
    }

    fn rule(policy_id: u32, action: u8, flags: u8) -> PolicyEntry {
        PolicyEntry {
            policy_id,
            action,
            flags,
            _pad: 0,
        }
    }

    #[test]
    fn a_spoofed_source_address_or_mac_is_dropped() {
        hypha_tests::require_root!();
        let node = Node::new();
        let spoofed_ip = udp([10, 244, 0, 99], POD_A_MAC, HOST_A_MAC, POD_B_IP, 1, DNS);
        assert_eq!(node.send_from_a(&spoofed_ip).verdict, TC_ACT_SHOT);
        // B's address, from A's veth.
        let b_ip_on_a = udp(POD_B_IP, POD_A_MAC, HOST_A_MAC, POD_B_IP, 1, DNS);
        assert_eq!(node.send_from_a(&b_ip_on_a).verdict, TC_ACT_SHOT);
        let spoofed_mac = udp(
            POD_A_IP,
            [0x02, 0xee, 0, 0, 0, 1],
            HOST_A_MAC,
            POD_B_IP,
            1,
            DNS,
        );
        assert_eq!(node.send_from_a(&spoofed_mac).verdict, TC_ACT_SHOT);
        let key = DropKey {
            ifindex: node.a,
            reason: DropReason::SpoofedSource as u16,
            direction: DIR_EGRESS,
            _pad: 0,
        };
        assert_eq!(
            node.dp.drops(),
            vec![(key, counter(3, 3 * spoofed_ip.len()))]
        );
        // A's own address still passes.
        assert_eq!(node.send_from_a(&a_to_b(DNS)).verdict, TC_ACT_REDIRECT);
    }

    #[test]
    fn endpoints_without_policy_are_not_tracked() {
        hypha_tests::require_root!();
        let node = node(0, 0);
        assert_eq!(node.send_from_a(&a_to_b(DNS)).verdict, TC_ACT_REDIRECT);
        assert!(
            node.dp.connections().is_empty(),
            "the fast path tracks nothing"
        );
    }

    #[test]
    fn ingress_policy_drops_what_nothing_allows_and_reports_it() {
        hypha_tests::require_root!();
        let mut node = node(0, ENDPOINT_F_INGRESS_POLICY);
        let frame = a_to_b(DNS);
        assert_eq!(node.send_from_a(&frame).verdict, TC_ACT_SHOT);
        // Counted against B, whose policy decided, in B's ingress.
        let key = DropKey {
            ifindex: node.b,
            reason: DropReason::PolicyDenied as u16,
            direction: DIR_INGRESS,
            _pad: 0,
        };
        assert_eq!(node.dp.drops(), vec![(key, counter(1, frame.len()))]);
        assert_eq!(node.stats_b().ingress.dropped, counter(1, frame.len()));
        let events = node.dp.events();
        assert_eq!(events.len(), 1, "{events:?}");
        let e = events[0];
        assert_eq!(
            (e.kind, e.reason, e.endpoint_id, e.policy_id),
            (EVENT_DROP, DropReason::PolicyDenied as u16, 2, 0)
        );
        assert_eq!(
            (e.remote_identity, e.dport, e.proto, e.direction),
            (ID_A, DNS, 17, DIR_INGRESS)
        );
        assert_eq!(e.family, 4, "family");
        assert_eq!(e.saddr, ipv4_in_event(POD_A_IP), "source");
        assert_eq!(e.daddr, ipv4_in_event(POD_B_IP), "destination");
    }

    /// An IPv4 address as an event carries it: in the first 4 of 16 bytes, the rest 0.
    fn ipv4_in_event(addr: [u8; 4]) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[..4].copy_from_slice(&addr);
        bytes
    }

    #[test]
    fn an_allowed_flow_is_tracked_and_survives_the_rule_going() {
        hypha_tests::require_root!();
        let mut node = node(0, ENDPOINT_F_INGRESS_POLICY);
        let allow = b_ingress(ID_A, 17, DNS);
        node.dp.set_policy(allow, rule(7, POLICY_ALLOW, 0));
        assert_eq!(node.send_from_a(&a_to_b(DNS)).verdict, TC_ACT_REDIRECT);
        let ct = node.dp.connections();
        assert_eq!(ct.len(), 1);
        assert_eq!(ct[0].1.policy_id, 7);
        let events = node.dp.events();
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].kind, events[0].policy_id),
            (EVENT_POLICY_ALLOW, 7)
        );
        // Another port is not allowed.
        assert_eq!(node.send_from_a(&a_to_b(80)).verdict, TC_ACT_SHOT);
        // The established flow keeps going after its rule is removed.
        node.dp.remove_policy(allow);
        assert_eq!(node.send_from_a(&a_to_b(DNS)).verdict, TC_ACT_REDIRECT);
        assert_eq!(
            node.send_from_a(&a_to_b(5353)).verdict,
            TC_ACT_SHOT,
            "but no new flow"
        );
    }

    /// A TCP segment `src` → `dst` with `flags`, sent by the pod `(src_mac, host_mac)`.
    fn tcp(
        src: [u8; 4],
        src_mac: [u8; 6],
        host_mac: [u8; 6],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        flags: u8,
    ) -> Vec<u8> {
        let rest = [0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0];
        ipv4_l4(src, src_mac, host_mac, dst, 6, sport, dport, &rest)
    }

    #[test]
    fn a_new_connection_reusing_a_tracked_port_pair_meets_the_current_policy() {
        hypha_tests::require_root!();
        const SYN: u8 = 0x02;
        const ACK: u8 = 0x10;
        let mut node = node(0, ENDPOINT_F_INGRESS_POLICY);
        let allow = b_ingress(ID_A, 6, 8080);
        node.dp.set_policy(allow, rule(3, POLICY_ALLOW, 0));
        let syn = tcp(POD_A_IP, POD_A_MAC, HOST_A_MAC, POD_B_IP, 40000, 8080, SYN);
        let ack = tcp(POD_A_IP, POD_A_MAC, HOST_A_MAC, POD_B_IP, 40000, 8080, ACK);
        assert_eq!(node.send_from_a(&syn).verdict, TC_ACT_REDIRECT);
        assert_eq!(node.send_from_a(&ack).verdict, TC_ACT_REDIRECT);
        node.dp.remove_policy(allow);
        // The established connection goes on...
        assert_eq!(node.send_from_a(&ack).verdict, TC_ACT_REDIRECT);
        // ...but a new one from the same port is a new flow, and nothing allows it now.
        assert_eq!(node.send_from_a(&syn).verdict, TC_ACT_SHOT);
    }

    #[test]
    fn replies_to_an_endpoints_own_connections_pass_its_ingress_policy() {
        hypha_tests::require_root!();
        // A accepts nothing unsolicited; B enforces nothing.
        let node = node(ENDPOINT_F_INGRESS_POLICY, 0);
        assert_eq!(node.send_from_a(&a_to_b(DNS)).verdict, TC_ACT_REDIRECT);
        assert_eq!(node.dp.connections().len(), 1, "A's flows are tracked");
        let reply = b_to_a(DNS, 40000);
        assert_eq!(
            node.dp.run(FROM_POD, &reply, node.b).verdict,
            TC_ACT_REDIRECT,
            "the reply"
        );
        let unsolicited = b_to_a(DNS, 40001);
        assert_eq!(
            node.dp.run(FROM_POD, &unsolicited, node.b).verdict,
            TC_ACT_SHOT
        );
    }

    #[test]
    fn wildcards_match_and_an_explicit_deny_wins() {
        hypha_tests::require_root!();
        let mut node = node(0, ENDPOINT_F_INGRESS_POLICY);
        node.dp
            .set_policy(b_ingress(IDENTITY_ANY, 0, 0), rule(1, POLICY_ALLOW, 0));
        assert_eq!(
            node.send_from_a(&a_to_b(80)).verdict,
            TC_ACT_REDIRECT,
            "allow all"
        );
        node.dp
            .set_policy(b_ingress(ID_A, 17, DNS), rule(9, POLICY_DENY, 0));
        let frame = a_to_b(DNS);
        assert_eq!(
            node.send_from_a(&frame).verdict,
            TC_ACT_SHOT,
            "deny beats allow-all"
        );
        let key = DropKey {
            ifindex: node.b,
            reason: DropReason::PolicyDenyRule as u16,
            direction: DIR_INGRESS,
            _pad: 0,
        };
        assert_eq!(node.dp.drops(), vec![(key, counter(1, frame.len()))]);
        let events = node.dp.events();
        let drop = events
            .iter()
            .find(|e| e.kind == EVENT_DROP)
            .expect("a drop event");
        assert_eq!(drop.policy_id, 9, "the drop names the deny policy");
    }

    #[test]
    fn audit_mode_reports_instead_of_dropping() {
        hypha_tests::require_root!();
        let mut node = node(0, ENDPOINT_F_INGRESS_POLICY | ENDPOINT_F_INGRESS_AUDIT);
        assert_eq!(node.send_from_a(&a_to_b(DNS)).verdict, TC_ACT_REDIRECT);
        node.dp.set_policy(
            b_ingress(ID_A, 17, 80),
            rule(4, POLICY_DENY, POLICY_F_AUDIT),
        );
        assert_eq!(node.send_from_a(&a_to_b(80)).verdict, TC_ACT_REDIRECT);
        let kinds: Vec<(u8, u32)> = node
            .dp
            .events()
            .iter()
            .map(|e| (e.kind, e.policy_id))
            .collect();
        assert_eq!(
            kinds,
            vec![(EVENT_POLICY_AUDIT, 0), (EVENT_POLICY_AUDIT, 4)]
        );
        assert!(node.dp.drops().is_empty());
    }

    #[test]
    fn ingress_policy_applies_to_what_the_host_delivers() {
        hypha_tests::require_root!();
        let mut node = node(0, ENDPOINT_F_INGRESS_POLICY);
        let from_world = udp(
            OUTSIDE_IP,
            [2, 0, 0, 0, 0, 9],
            POD_B_MAC,
            POD_B_IP,
            1234,
            DNS,
        );
        assert_eq!(
            node.dp.run(TO_POD, &from_world, node.b).verdict,
            TC_ACT_SHOT
        );
        node.dp
            .set_policy(b_ingress(IDENTITY_WORLD, 17, DNS), rule(5, POLICY_ALLOW, 0));
        assert_eq!(node.dp.run(TO_POD, &from_world, node.b).verdict, TC_ACT_OK);
        // The node itself may always reach its pods.
        node.dp.set_identity(GATEWAY_IP, 32, IDENTITY_HOST);
        let from_host = udp(
            GATEWAY_IP,
            [2, 0, 0, 0, 0, 9],
            POD_B_MAC,
            POD_B_IP,
            1234,
            80,
        );
        assert_eq!(node.dp.run(TO_POD, &from_host, node.b).verdict, TC_ACT_OK);
        let tracked = node.dp.connections();
        assert_eq!(tracked.len(), 2);
        assert!(
            tracked.iter().all(|(_, e)| e.tcp_flags & CT_SYN == 0),
            "UDP has no TCP state"
        );
    }

    /// The value `hypha_to_pod` once trusted in `skb->mark` as "already handled" ("HYP"
    /// + 0x01): anyone on the host can set it (nftables `meta mark set`, SO_MARK).
    const OLD_MARK_REDIRECTED: u32 = 0x4859_5001;

    #[test]
    fn a_forged_mark_does_not_skip_the_receivers_ingress_policy() {
        hypha_tests::require_root!();
        let node = node(0, ENDPOINT_F_INGRESS_POLICY);
        let from_world = udp(
            OUTSIDE_IP,
            [2, 0, 0, 0, 0, 9],
            POD_B_MAC,
            POD_B_IP,
            1234,
            DNS,
        );
        let options = RunOptions {
            mark: OLD_MARK_REDIRECTED,
            ..RunOptions::default()
        };

        let run = node.dp.run_with(TO_POD, &from_world, node.b, options);

        assert_eq!(run.verdict, TC_ACT_SHOT, "verdict");
        let key = DropKey {
            ifindex: node.b,
            reason: DropReason::PolicyDenied as u16,
            direction: DIR_INGRESS,
            _pad: 0,
        };
        assert_eq!(node.dp.drops(), vec![(key, counter(1, from_world.len()))]);
    }

    #[test]
    fn a_frame_redirected_to_a_rate_limited_pod_is_handled_once_and_only_it() {
        hypha_tests::require_root!();
        // `bpf_redirect` to B's host veth egress runs `hypha_to_pod` there next, on the
        // same CPU; the test runs the two programs one after the other on one CPU.
        pin_to_current_cpu();
        let node = node(0, ENDPOINT_F_INGRESS_LIMIT);
        let frame = a_to_b(DNS);

        let sent = node.send_from_a(&frame);
        assert_eq!(sent.verdict, TC_ACT_REDIRECT, "verdict at A");
        let delivered = node.dp.run(TO_POD, &sent.frame, node.b);

        assert_eq!(delivered.verdict, TC_ACT_OK, "verdict at B");
        assert_eq!(
            node.stats_b(),
            stats_with(|s| &mut s.ingress.redirected, counter(1, frame.len())),
            "B's counters: counted once, as redirected"
        );
        // The slot served that frame only: the same frame again is a frame the host
        // delivers, counted (and, were B enforcing a policy, checked) as such.
        assert_eq!(node.dp.run(TO_POD, &sent.frame, node.b).verdict, TC_ACT_OK);
        assert_eq!(node.stats_b().ingress.passed, counter(1, frame.len()));
        // And a frame of another length on B right after a redirect is not taken for it.
        assert_eq!(node.send_from_a(&frame).verdict, TC_ACT_REDIRECT);
        let other = udp(OUTSIDE_IP, [2, 0, 0, 0, 0, 9], POD_B_MAC, POD_B_IP, 1, 2);
        let longer = [other.as_slice(), &[0; 10]].concat();
        assert_eq!(node.dp.run(TO_POD, &longer, node.b).verdict, TC_ACT_OK);
        assert_eq!(
            node.stats_b().ingress.passed,
            counter(2, frame.len() + longer.len())
        );
    }

    #[test]
    fn fragmentation_needed_for_a_tracked_flow_passes_and_one_for_an_unknown_flow_does_not() {
        hypha_tests::require_root!();
        // A admits nothing new, so its flows are tracked; PMTU discovery needs the
        // router's "fragmentation needed" about them to reach it all the same.
        let node = node(ENDPOINT_F_INGRESS_POLICY, 0);
        let out = udp(POD_A_IP, POD_A_MAC, HOST_A_MAC, OUTSIDE_IP, 4000, DNS);
        assert_eq!(
            node.send_from_a(&out).verdict,
            TC_ACT_OK,
            "A's datagram out"
        );

        let needed = |quoted: &[u8]| {
            // Type 3 code 4, unused, next-hop MTU 1400, then the quoted header and 8 bytes.
            let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
            icmp.extend_from_slice(&quoted[ETH_HLEN..ETH_HLEN + 28]);
            let [hi, lo] = ((20 + icmp.len()) as u16).to_be_bytes();
            let mut ip = vec![0x45, 0, hi, lo, 0, 0, 0, 0, 60, 1, 0, 0];
            ip.extend_from_slice(&[192, 0, 2, 1]);
            ip.extend_from_slice(&POD_A_IP);
            let csum = ipv4_checksum(&ip);
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            ip.extend_from_slice(&icmp);
            eth(POD_A_MAC, HOST_A_MAC, ETH_P_IP, &ip)
        };
        let related = needed(&out);
        assert_eq!(
            node.dp.run(TO_POD, &related, node.a).verdict,
            TC_ACT_OK,
            "an error quoting the tracked flow"
        );
        let unknown = needed(&udp(POD_A_IP, POD_A_MAC, HOST_A_MAC, OUTSIDE_IP, 4001, DNS));
        assert_eq!(
            node.dp.run(TO_POD, &unknown, node.a).verdict,
            TC_ACT_SHOT,
            "an error quoting no flow"
        );
        let key = DropKey {
            ifindex: node.a,
            reason: DropReason::PolicyDenied as u16,
            direction: DIR_INGRESS,
            _pad: 0,
        };
        assert_eq!(node.dp.drops(), vec![(key, counter(1, unknown.len()))]);
    }

    #[test]
    fn a_spoofed_source_yields_a_drop_event_naming_the_reason() {
        hypha_tests::require_root!();
        let mut node = Node::new();
        let spoofed = udp([10, 244, 0, 99], POD_A_MAC, HOST_A_MAC, POD_B_IP, 4321, DNS);

        assert_eq!(node.send_from_a(&spoofed).verdict, TC_ACT_SHOT);

        let events = node.dp.events();
        assert_eq!(events.len(), 1, "{events:?}");
        let e = events[0];
        assert_eq!(
            (e.kind, e.reason, e.direction, e.ifindex),
            (
                EVENT_DROP,
                DropReason::SpoofedSource as u16,
                DIR_EGRESS,
                node.a
            )
        );
        assert_eq!(
            (e.family, e.saddr, e.daddr),
            (4, ipv4_in_event([10, 244, 0, 99]), ipv4_in_event(POD_B_IP))
        );
        assert_eq!((e.proto, e.sport, e.dport), (17, 4321, DNS));
        assert_eq!((e.policy_id, e.endpoint_id), (0, 0), "no policy decided");
    }

    #[test]
    fn a_flood_of_drops_is_counted_whole_and_reported_within_the_budget() {
        hypha_tests::require_root!();
        const FLOOD: u32 = 5_000;
        let mut node = Node::new();
        let spoofed = udp([10, 244, 0, 99], POD_A_MAC, HOST_A_MAC, POD_B_IP, 1, DNS);
        let options = RunOptions {
            repeat: FLOOD,
            ..RunOptions::default()
        };

        let start = Instant::now();
        let run = node.dp.run_with(FROM_POD, &spoofed, node.a, options);
        let elapsed = start.elapsed();

        assert_eq!(run.verdict, TC_ACT_SHOT);
        node.assert_single_drop_n(DropReason::SpoofedSource, FLOOD, spoofed.len());
        let events = node.dp.events();
        let budget = u64::from(DROP_EVENTS_BURST)
            + (elapsed.as_nanos() as u64 * DROP_EVENTS_PER_S).div_ceil(1_000_000_000);
        assert!(
            events.len() as u64 <= budget,
            "{} events for {FLOOD} drops in {elapsed:?}: the budget is {budget}",
            events.len()
        );
        assert!(
            events.len() >= DROP_EVENTS_BURST as usize,
            "the burst is reported: {} events",
            events.len()
        );
        assert!(
            events
                .iter()
                .all(|e| e.reason == DropReason::SpoofedSource as u16),
            "{events:?}"
        );

        // Another reason of the same endpoint has a budget of its own.
        let lldp = eth(
            [0x01, 0x80, 0xc2, 0, 0, 0x0e],
            POD_A_MAC,
            ETH_P_LLDP,
            &[0; 32],
        );
        assert_eq!(node.send_from_a(&lldp).verdict, TC_ACT_SHOT);
        let events = node.dp.events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].reason, DropReason::UnknownL3 as u16);
    }
}
