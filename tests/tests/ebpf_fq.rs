//! `BPF_PROG_TEST_RUN` tests of `hypha_flow_class`, the classifier of the per-flow queues
//! under a bandwidth limit: it returns an `htb` leaf's class id, the same for every
//! packet of a flow (IPv4 and IPv6, TCP and UDP, every fragment of a datagram), and
//! different flows spread over the leaves; non-IP goes to leaf 0.
//!
//! **Privileged**: loads the eBPF object (CAP_BPF, CAP_SYS_ADMIN for a private bpffs).
//! Run as root, after `cargo xtask build-ebpf`. No traffic: the runs use a fresh network
//! namespace's devices only as the skb's device.

use std::collections::HashMap;

use hypha_common::fq::{QUEUES_GLOBAL, leaf_classid};
use hypha_common::programs::FLOW_CLASS;
use hypha_tests::ebpf::{Datapath, TestNetns, eth, ipv4_checksum};

/// Leaves of the spread tests: 256 flows over 64 leaves use nearly all of them.
const SPREAD_QUEUES: u16 = 64;

const MAC_A: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x07];
const MAC_B: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const IPV6_FRAGMENT: u8 = 44;

const A4: [u8; 4] = [10, 244, 0, 7];
const B4: [u8; 4] = [10, 244, 0, 9];
const A6: [u8; 16] = [0xfd, 0, 0x02, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const B6: [u8; 16] = [0xfd, 0, 0x02, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];

/// The loaded classifier and a device to run it on.
struct Classifier {
    dp: Datapath,
    ifindex: u32,
    /// Leaf classes it was loaded with.
    queues: u16,
    // Last: the namespace, and its devices, go after everything else.
    _netns: TestNetns,
}

impl Classifier {
    /// With [`SPREAD_QUEUES`] leaves, so that a poor spread shows.
    fn new() -> Self {
        Self::with_queues(SPREAD_QUEUES)
    }

    /// The classifier loaded as the agent loads it with `--fq-queues queues`.
    fn with_queues(queues: u16) -> Self {
        let netns = TestNetns::enter();
        let ifindex = netns.add_veth("hy-fq-a", "hy-fq-b");
        let mut dp = Datapath::open_with_globals(&[(QUEUES_GLOBAL, u32::from(queues))]);
        dp.load_program(FLOW_CLASS);
        Self {
            dp,
            ifindex,
            queues,
            _netns: netns,
        }
    }

    /// The class `frame` is given, checked to be one of the leaves'.
    fn class(&self, frame: &[u8]) -> u32 {
        let class = self.dp.run(FLOW_CLASS, frame, self.ifindex).verdict;
        assert!(
            (0..self.queues).any(|i| leaf_classid(i) == class),
            "{class:#x} is none of the {} leaves' class ids",
            self.queues
        );
        class
    }
}

/// An IPv4 packet: `proto`, fragment field `frag_off` (flags and offset), and `l4` after
/// a 20-byte header.
fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, frag_off: u16, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag_off.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let sum = ipv4_checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(l4);
    eth(MAC_B, MAC_A, ETH_P_IP, &h)
}

fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(payload);
    eth(MAC_B, MAC_A, ETH_P_IPV6, &h)
}

/// A TCP header (20 bytes) with `flags`, then `data`.
fn tcp(sport: u16, dport: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(data);
    t
}

fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

/// How flows given by `frame(i)` for `i` in `0..n` spread: (distinct classes, the most
/// flows in one class).
fn spread(c: &Classifier, n: u16, frame: impl Fn(u16) -> Vec<u8>) -> (usize, usize) {
    let mut per_class: HashMap<u32, usize> = HashMap::new();
    for i in 0..n {
        *per_class.entry(c.class(&frame(i))).or_default() += 1;
    }
    (
        per_class.len(),
        per_class.values().copied().max().unwrap_or(0),
    )
}

/// 256 flows over 64 leaves: about 63 classes used, 4 flows per class on average.
fn assert_spread((used, most): (usize, usize), what: &str) {
    assert!(
        used >= 56 && most <= 12,
        "{what}: 256 flows used {used} of {SPREAD_QUEUES} classes, up to {most} in one"
    );
}

#[test]
fn a_tcp_or_udp_flow_keeps_its_class_and_flows_spread_ipv4() {
    hypha_tests::require_root!();
    let c = Classifier::new();
    // Every packet of a flow: SYN, data, ACK, FIN.
    let syn = c.class(&ipv4(A4, B4, TCP, 0x4000, &tcp(40000, 80, 0x02, &[])));
    for (flags, data) in [(0x18, &b"GET /"[..]), (0x10, &[][..]), (0x11, &[][..])] {
        assert_eq!(
            c.class(&ipv4(A4, B4, TCP, 0x4000, &tcp(40000, 80, flags, data))),
            syn
        );
    }
    // Any field of the 5-tuple makes another flow; 256 of them spread.
    assert_spread(
        spread(&c, 256, |i| {
            ipv4(A4, B4, TCP, 0x4000, &tcp(40000 + i, 80, 0x10, b"x"))
        }),
        "IPv4 TCP, by source port",
    );
    assert_spread(
        spread(&c, 256, |i| ipv4(A4, B4, UDP, 0, &udp(53, 1000 + i, b"q"))),
        "IPv4 UDP, by destination port",
    );
    assert_spread(
        spread(&c, 256, |i| {
            let src = [10, 244, (i >> 8) as u8, i as u8];
            ipv4(src, B4, TCP, 0x4000, &tcp(40000, 80, 0x10, b"x"))
        }),
        "IPv4 TCP, by source address",
    );
    // The same ports over UDP are another flow than over TCP (most of the time).
    let differ = (0..64)
        .filter(|&i| {
            c.class(&ipv4(A4, B4, TCP, 0, &tcp(2000 + i, 80, 0x10, &[])))
                != c.class(&ipv4(A4, B4, UDP, 0, &udp(2000 + i, 80, &[])))
        })
        .count();
    assert!(
        differ >= 48,
        "only {differ} of 64 port pairs differ by protocol"
    );
}

#[test]
fn a_tcp_or_udp_flow_keeps_its_class_and_flows_spread_ipv6() {
    hypha_tests::require_root!();
    let c = Classifier::new();
    let first = c.class(&ipv6(A6, B6, TCP, &tcp(40000, 443, 0x02, &[])));
    for data in [&b"hello"[..], &[0u8; 1000][..]] {
        assert_eq!(
            c.class(&ipv6(A6, B6, TCP, &tcp(40000, 443, 0x18, data))),
            first
        );
    }
    assert_spread(
        spread(&c, 256, |i| {
            ipv6(A6, B6, TCP, &tcp(40000 + i, 443, 0x10, b"x"))
        }),
        "IPv6 TCP, by source port",
    );
    assert_spread(
        spread(&c, 256, |i| ipv6(A6, B6, UDP, &udp(5000, 1000 + i, b"q"))),
        "IPv6 UDP, by destination port",
    );
    assert_spread(
        spread(&c, 256, |i| {
            let mut src = A6;
            src[14] = (i >> 8) as u8;
            src[15] = i as u8;
            ipv6(src, B6, UDP, &udp(5000, 53, b"q"))
        }),
        "IPv6 UDP, by source address",
    );
}

#[test]
fn every_fragment_of_a_datagram_shares_one_class() {
    hypha_tests::require_root!();
    let c = Classifier::new();
    // IPv4: the first fragment (MF, offset 0) carries the ports, the others do not; all
    // hash on addresses and protocol, so they stay together and in order.
    let first = c.class(&ipv4(A4, B4, UDP, 0x2000, &udp(5000, 53, &[7; 64])));
    let middle = c.class(&ipv4(A4, B4, UDP, 0x2000 | 9, &[7; 72]));
    let last = c.class(&ipv4(A4, B4, UDP, 18, &[7; 10]));
    assert_eq!((first, middle), (last, last));
    // Another datagram of other ports between the same hosts: the same class (the
    // fragments of a flow cannot be told apart by ports).
    assert_eq!(
        c.class(&ipv4(A4, B4, UDP, 0x2000, &udp(6000, 99, &[7; 64]))),
        last
    );
    // Fragments of other host pairs spread.
    assert_spread(
        spread(&c, 256, |i| {
            ipv4([10, 1, (i >> 8) as u8, i as u8], B4, UDP, 18, &[7; 10])
        }),
        "IPv4 fragments, by source address",
    );

    // IPv6: the fragment header comes first; the first fragment (offset 0, M) carries the
    // UDP header, the last does not.
    let frag = |offset_m: u16, rest: &[u8]| {
        let mut p = vec![UDP, 0];
        p.extend_from_slice(&offset_m.to_be_bytes());
        p.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        p.extend_from_slice(rest);
        ipv6(A6, B6, IPV6_FRAGMENT, &p)
    };
    let first6 = c.class(&frag(1, &udp(5000, 53, &[7; 64])));
    let last6 = c.class(&frag(9 << 3, &[7; 10]));
    assert_eq!(first6, last6);
}

#[test]
fn non_ip_goes_to_leaf_0_and_other_protocols_by_addresses() {
    hypha_tests::require_root!();
    let c = Classifier::new();
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&A4);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&B4);
    assert_eq!(
        c.class(&eth(MAC_B, MAC_A, ETH_P_ARP, &arp)),
        leaf_classid(0)
    );
    assert_eq!(
        c.class(&eth(MAC_B, MAC_A, 0x88b5, &[0; 46])),
        leaf_classid(0),
        "a local experimental EtherType"
    );
    // ICMP has no ports: every echo between two hosts is one flow.
    let echo = |id: u8| ipv4(A4, B4, ICMP, 0, &[8, 0, 0, 0, 0, id, 0, 1]);
    assert_eq!(c.class(&echo(1)), c.class(&echo(2)));
}

#[test]
fn the_leaf_count_is_the_one_the_agent_loads_it_with() {
    hypha_tests::require_root!();
    for queues in [1u16, 4, 16] {
        let c = Classifier::with_queues(queues);
        // `class` checks every answer is one of the first `queues` leaves; 128 flows
        // reach all of them.
        let (used, _) = spread(&c, 128, |i| {
            ipv4(A4, B4, TCP, 0x4000, &tcp(40000 + i, 80, 0x10, b"x"))
        });
        assert_eq!(
            used,
            usize::from(queues),
            "128 flows over {queues} leaves used {used}"
        );
    }
}
