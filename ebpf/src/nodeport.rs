//! NodePort: per-packet translation of what reaches a Service from outside the node.
//!
//! [`hypha_from_netdev`] (TCX ingress of the node's external devices) looks every IPv4
//! and IPv6 TCP/UDP packet up as a frontend of scope `LB_SCOPE_EXTERNAL` (`lb`): the
//! node's address and a NodePort. Anything else passes untouched (the node's own
//! traffic is not ours). For a frontend:
//!
//! - the flow's forward entry in `hypha_lb4_nat` / `hypha_lb6_nat` (`hypha_common::nat`)
//!   gives its translation, whatever the frontend's backends are now; a new flow gets a
//!   backend from `lb::select` (5-tuple hash, `ClientIP` affinity on the client's
//!   address) and both of its entries;
//! - a backend on this node (`LB_BACKEND_F_LOCAL`): the destination becomes the backend
//!   (address and port, checksums updated) and the packet goes on to the host stack,
//!   which routes it to the pod's veth, where `hypha_to_pod` applies the pod's ingress
//!   policy to the client (its own address, kept): policy after translation;
//! - a backend on another node (only under `externalTrafficPolicy: Cluster`): the
//!   source also becomes this node's SNAT address (IPv4: the pod-CIDR gateway address,
//!   `hypha_config`; IPv6: the router address, `hypha_lb6_snat`) and a port chosen for
//!   the flow (`NAT_PORT_FIRST..`, unique per backend), so the
//!   backend's reply comes back through the tunnel; the packet is sent straight into
//!   the tunnel to the backend's node (VNI: the host, which the other node sees as
//!   `remote-node`), or, without a tunnel peer (native routing), out of the route to
//!   the backend. Not handed to the host stack: a packet from outside with one of the
//!   node's own addresses as its source would be dropped there as a martian.
//! - no backend (`count == 0`): dropped `no-service-backend` (counted on the device)
//!   and answered at once from the frontend's address: TCP with a reset, UDP with ICMP
//!   (ICMPv6) port unreachable. Not ICMP for TCP: Linux acts on an ICMP error to a
//!   connecting socket only when no one holds the socket's lock, and a client on this
//!   host (a container behind a veth) still holds it while its SYN is sent, in whose
//!   call the answer arrives; the error is then kept as a soft one and the connection
//!   refused only by the answer to the SYN's retransmission, a second later. A reset
//!   is queued to the socket's backlog and refuses it when `connect` lets go.
//!
//! What this program sends on itself (to a backend on another node, and every reply)
//! takes a hop from the TTL (hop limit), as a router: a client's packet whose TTL is
//! spent is answered with ICMP "time exceeded" from the frontend's address, a reply's is
//! dropped (`ttl-exceeded`). What goes to a local backend is forwarded by the host
//! stack, which does the same.
//!
//! Replies are translated back by [`reply4`] / [`reply6`], called where they arrive:
//! `hypha_from_pod` (a local backend's reply, after its egress policy) and
//! `hypha_from_tunnel` (a remote backend's reply to the SNAT address); on the
//! external device too (native routing). The reverse entry restores the node address
//! and NodePort as the source and the client as the destination, and the reply leaves
//! through `bpf_fib_lookup` and a redirect to the device of the route to the client,
//! never through the host's input path (its source is a local address).
//!
//! Limits: IPv4 fragments, IPv4 packets with options (for the ICMP answer) and IPv6
//! packets with extension headers before TCP/UDP pass untouched. A node without an
//! IPv6 SNAT address (`hypha_lb6_snat` zero: no tunnel, so no router address) sends an
//! IPv6 NodePort flow only to a local backend; a remote one is refused as if the
//! frontend had none.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference so that those in the per-CPU scratch are not copied onto the 512-byte stack"
)]

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_fib_lookup,
    },
    helpers::generated::{
        bpf_csum_diff, bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh,
    },
    macros::{classifier, map},
    maps::{Array, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use hypha_common::{
    DIR_INGRESS, DropReason, IDENTITY_HOST,
    lb::{LB_AFFINITY_ADDR, LB_BACKEND_F_LOCAL, LB_F_LOCAL, LB_SCOPE_EXTERNAL, LbService},
    nat::{
        MAX_NAT_ENTRIES, NAT_DIR_FORWARD, NAT_DIR_REVERSE, NAT_PORT_FIRST, NAT_PORT_LAST, NatKey4,
        NatKey6, NatValue4, NatValue6,
    },
};

use crate::{
    CONFIG, TUNNEL4, TUNNEL6,
    family::Family,
    ipv6::Outcome,
    lb::{self, Client},
    packet::{
        self, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPV4_CSUM_OFF, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr,
        TcpHdr,
    },
    pmtu, skb_ifindex,
    stats::{count_drop, count_node},
    tunnel,
};

/// IPv4 NodePort flows, both directions. Written and read here only.
#[map(name = "hypha_lb4_nat")]
static NAT4: LruHashMap<NatKey4, NatValue4> = LruHashMap::pinned(MAX_NAT_ENTRIES, 0);

/// IPv6 NodePort flows, both directions. Written and read here only.
#[map(name = "hypha_lb6_nat")]
static NAT6: LruHashMap<NatKey6, NatValue6> = LruHashMap::pinned(MAX_NAT_ENTRIES, 0);

/// This node's IPv6 SNAT address (all zero: none), written by the agent
/// (`hypha_common::nat::SNAT6`).
#[map(name = "hypha_lb6_snat")]
static SNAT6: Array<[u8; 16]> = Array::pinned(1, 0);

/// This node's IPv6 SNAT address, `None` without one.
#[inline(always)]
fn snat6() -> Option<[u8; 16]> {
    SNAT6.get(0).copied().filter(|a| *a != [0; 16])
}

/// This CPU's room for the route lookup's parameters and the NAT entries of a new flow,
/// off the stack (the eBPF stack of a call chain is 512 bytes, and the reverse
/// translation runs deep in `hypha_from_pod`'s calls).
#[map]
static NODEPORT_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct Scratch {
    fib: bpf_fib_lookup,
    key4: NatKey4,
    reverse4: NatValue4,
    key6: NatKey6,
    reverse_key6: NatKey6,
    nat6: NatValue6,
    reverse6: NatValue6,
    reset4: Reset4,
    reset6: Reset6,
}

/// A TCP reset in its frame, IPv4.
#[repr(C)]
struct Reset4 {
    eth: EthHdr,
    ip: Ipv4Hdr,
    tcp: TcpHdr,
}

/// A TCP reset in its frame, IPv6.
#[repr(C)]
struct Reset6 {
    eth: EthHdr,
    ip: Ipv6Hdr,
    tcp: TcpHdr,
}

/// This CPU's scratch.
#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: a per-CPU slot from a successful lookup; a program runs to completion on
    // one CPU and uses the slot for one packet at a time.
    NODEPORT_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

const _: () = {
    assert!(crate::str_eq(hypha_common::nat::NAT4, "hypha_lb4_nat"));
    assert!(crate::str_eq(hypha_common::nat::NAT6, "hypha_lb6_nat"));
    assert!(crate::str_eq(hypha_common::nat::SNAT6, "hypha_lb6_snat"));
    assert!(crate::str_eq(
        hypha_common::nat::FROM_NETDEV,
        "hypha_from_netdev"
    ));
};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// ICMP destination unreachable's code "port unreachable".
const ICMP_PORT_UNREACH: u8 = 3;
/// ICMPv6 "destination unreachable", code "port unreachable".
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
/// ICMP "time exceeded" (code 0: TTL exceeded in transit).
const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMPv6 "time exceeded" (code 0: hop limit exceeded in transit).
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// TCP's flags.
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Source ports tried for a new SNATed flow before it is refused.
const SNAT_TRIES: u32 = 8;

/// TCX ingress of the node's external devices: NodePort translation (see the module).
#[classifier]
pub fn hypha_from_netdev(ctx: TcContext) -> i32 {
    match try_from_netdev(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_from_netdev(ctx: &TcContext) -> Result<i32, i32> {
    let Ok(ether_type) = ctx.load::<[u8; 2]>(12).map(u16::from_be_bytes) else {
        return Ok(TC_ACT_OK);
    };
    let bytes = ctx.len();
    let outcome = if ether_type == ETH_P_IP {
        Outcome(netdev4(ctx))
    } else if ether_type == ETH_P_IPV6 {
        Outcome(netdev6(ctx))
    } else {
        return Ok(TC_ACT_OK);
    };
    match outcome.kind() {
        Outcome::PASS => Ok(TC_ACT_OK),
        Outcome::TUNNEL => {
            count_node(outcome.value(), bytes, |s| &mut s.tx);
            Ok(TC_ACT_REDIRECT)
        }
        // The answer, a reset or ICMP (the drop was counted before), or a reply sent on.
        Outcome::ANSWERED | Outcome::NODEPORT => Ok(TC_ACT_REDIRECT),
        // Refused without an answer, counted already.
        Outcome::DENIED => Err(TC_ACT_SHOT),
        _ => {
            let family = if ether_type == ETH_P_IP {
                Family::Ipv4
            } else {
                Family::Ipv6
            };
            Err(count_drop(
                ctx,
                skb_ifindex(ctx),
                DIR_INGRESS,
                Some(family),
                outcome.reason(),
                |s| &mut s.ingress.dropped,
            ))
        }
    }
}

/// The offset of the checksum in the L4 header of `proto`.
#[inline(always)]
fn csum_offset(proto: u8) -> usize {
    if proto == IPPROTO_TCP { 16 } else { 6 }
}

/// The flags of `bpf_l4_csum_replace` for `proto`: UDP's zero checksum (none) stays zero.
#[inline(always)]
fn csum_flags(proto: u8) -> u64 {
    if proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// An IPv4 TCP/UDP packet's addresses and ports (network byte order) and where its L4
/// header starts; `None` for anything else, fragments included.
#[derive(Clone, Copy)]
struct Packet4 {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    l4: usize,
}

#[inline(always)]
fn parse4(ctx: &TcContext) -> Option<Packet4> {
    let ip: [u8; 20] = ctx.load(ETH_HLEN).ok()?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return None;
    }
    // More fragments, or an offset: a fragment, without (all of) its ports.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None;
    }
    let proto = ip[9];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    // Bounded, so the verifier knows the offset's range.
    let l4 = ETH_HLEN + (ihl & 0x3c);
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    Some(Packet4 {
        saddr: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        daddr: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        l4,
    })
}

/// [`hypha_from_netdev`] for an IPv4 frame.
#[inline(never)]
fn netdev4(ctx: &TcContext) -> u64 {
    match try_netdev4(ctx) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_netdev4(ctx: &TcContext) -> Result<Outcome, Outcome> {
    let pass = Outcome::new(Outcome::PASS, 0);
    let Some(p) = parse4(ctx) else {
        return Ok(pass);
    };
    let Some(svc) = lb::service4(p.daddr, p.dport, p.proto, LB_SCOPE_EXTERNAL) else {
        // A reply of a remote backend over native routing comes in here, to the gateway.
        let gateway = CONFIG.get(0).map_or(0, |c| c.gateway);
        if gateway != 0 && p.daddr == gateway {
            return Ok(Outcome(reply4(ctx)));
        }
        return Ok(pass);
    };
    let key = NatKey4 {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        dir: NAT_DIR_FORWARD,
        _pad: [0; 2],
    };
    let mut nat = NatValue4::default();
    // SAFETY: copied out at once.
    if let Some(found) = unsafe { NAT4.get(&key) } {
        nat = *found;
        lb::count_backend(nat.backend_id, false, ctx.len());
    } else if new_flow4(&p, &svc, &mut nat) {
        lb::count_backend(nat.backend_id, true, ctx.len());
    } else {
        return Ok(refuse4(ctx, &p));
    }
    // To another node, this program is the router: a hop.
    if nat.nat_addr != 0 && !packet::dec_ttl4(ctx)? {
        return Ok(expired4(ctx, &p));
    }
    let rewritten = Outcome(rewrite4(ctx, &p, &nat, false));
    if rewritten.kind() != Outcome::PASS {
        return Err(rewritten);
    }
    if nat.nat_addr == 0 {
        // A local backend (or the client kept under `Local`): the host stack routes it
        // to the pod.
        return Ok(pass);
    }
    // SNATed to a backend on another node: into the tunnel, or out of the route to it.
    let device = tunnel::device();
    if device != 0
        && let Some(peer) = TUNNEL4.get(Key::new(32, nat.addr))
    {
        return tunnel::encap(ctx, peer, IDENTITY_HOST, device);
    }
    Ok(Outcome(redirect4(ctx, nat.nat_addr, nat.addr)))
}

/// Counts the refused packet `p` (`no-service-backend`) and answers it from its
/// destination (the frontend's address): a TCP reset, or "port unreachable" for UDP (see
/// the module for why not ICMP for TCP).
#[inline(always)]
fn refuse4(ctx: &TcContext, p: &Packet4) -> Outcome {
    drop_and_answer(ctx, Family::Ipv4, DropReason::NoServiceBackend, || {
        if p.proto == IPPROTO_TCP {
            reset4(ctx, p)
        } else {
            pmtu::error4(ctx, pmtu::ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, p.daddr)
        }
    })
}

/// Counts the packet as dropped for `reason` on the device it came in by, then answers
/// it with `answer` (which overwrites it): the answer, or, when there is none (the
/// packet was a reset, ICMP cannot quote IPv4 options, a helper failed), `DENIED`: the
/// packet dropped without counting it again.
#[inline(always)]
fn drop_and_answer(
    ctx: &TcContext,
    family: Family,
    reason: DropReason,
    answer: impl FnOnce() -> u64,
) -> Outcome {
    count_drop(
        ctx,
        skb_ifindex(ctx),
        DIR_INGRESS,
        Some(family),
        reason,
        |s| &mut s.ingress.dropped,
    );
    let answer = Outcome(answer());
    if answer.kind() == Outcome::ANSWERED {
        answer
    } else {
        Outcome::new(Outcome::DENIED, 0)
    }
}

/// Counts the client's packet `p`, whose TTL is spent before the hop to a backend on
/// another node, as `ttl-exceeded` and answers it with ICMP "time exceeded" from its
/// destination (the frontend's address), quoting it as it arrived.
#[inline(always)]
fn expired4(ctx: &TcContext, p: &Packet4) -> Outcome {
    drop_and_answer(ctx, Family::Ipv4, DropReason::TtlExceeded, || {
        pmtu::error4(ctx, ICMP_TIME_EXCEEDED, 0, 0, p.daddr)
    })
}

/// [`expired4`] for IPv6.
#[inline(always)]
fn expired6(ctx: &TcContext, p: &Packet6) -> Outcome {
    drop_and_answer(ctx, Family::Ipv6, DropReason::TtlExceeded, || {
        pmtu::error6(ctx, ICMPV6_TIME_EXCEEDED, 0, 0, &p.daddr)
    })
}

/// Answers the IPv4 TCP segment `p` with a reset from its destination, sent back out
/// of the device it came in by: `ANSWERED`; `PASS` (no answer) for a reset.
#[inline(never)]
fn reset4(ctx: &TcContext, p: &Packet4) -> u64 {
    match try_reset4(ctx, p) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_reset4(ctx: &TcContext, p: &Packet4) -> Result<Outcome, Outcome> {
    let invalid = |_| Outcome::from(DropReason::InvalidIpv4Header);
    let eth: EthHdr = ctx.load(0).map_err(invalid)?;
    let tot_len: [u8; 2] = ctx.load(ETH_HLEN + 2).map_err(invalid)?;
    let payload = u32::from(u16::from_be_bytes(tot_len)).saturating_sub((p.l4 - ETH_HLEN) as u32);
    let frame = &mut scratch().ok_or(DropReason::HelperFailed)?.reset4;
    if !reset_tcp(ctx, p.l4, payload, p.sport, p.dport, &mut frame.tcp)? {
        return Ok(Outcome::new(Outcome::PASS, 0));
    }
    frame.eth = pmtu::answer_eth(&eth);
    frame.ip = pmtu::answer_ipv4(
        0,
        size_of::<Reset4>() - ETH_HLEN,
        IPPROTO_TCP,
        p.daddr.to_ne_bytes(),
        p.saddr.to_ne_bytes(),
    );
    frame.tcp.check = tcp_checksum(&frame.ip.saddr, &frame.ip.daddr, &frame.tcp);
    pmtu::send_back(ctx, frame)
}

/// Fills `out` (all but its checksum) with the reset answering the TCP segment at `l4`
/// (with `len` bytes of header and data, from `sport` to `dport`), as RFC 9293 asks of
/// a closed port: the segment's acknowledgment as the sequence number when it has one,
/// otherwise sequence 0 acknowledging all of it (SYN and FIN count one). `false` when
/// the segment is a reset itself, which is never answered.
#[inline(always)]
fn reset_tcp(
    ctx: &TcContext,
    l4: usize,
    len: u32,
    sport: u16,
    dport: u16,
    out: &mut TcpHdr,
) -> Result<bool, Outcome> {
    let tcp: [u8; 14] = ctx.load(l4).map_err(|_| DropReason::HelperFailed)?;
    let flags = tcp[13];
    if flags & TCP_RST != 0 {
        return Ok(false);
    }
    out.sport = dport.to_ne_bytes();
    out.dport = sport.to_ne_bytes();
    if flags & TCP_ACK != 0 {
        out.seq = [tcp[8], tcp[9], tcp[10], tcp[11]];
        out.ack_seq = [0; 4];
        out.doff_flags = [(size_of::<TcpHdr>() as u8 / 4) << 4, TCP_RST];
    } else {
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let data = len.saturating_sub(u32::from(tcp[12] >> 4) * 4);
        let mut seg_len = data;
        if flags & TCP_SYN != 0 {
            seg_len += 1;
        }
        if flags & TCP_FIN != 0 {
            seg_len += 1;
        }
        out.seq = [0; 4];
        out.ack_seq = seq.wrapping_add(seg_len).to_be_bytes();
        out.doff_flags = [(size_of::<TcpHdr>() as u8 / 4) << 4, TCP_RST | TCP_ACK];
    }
    out.window = [0; 2];
    out.check = [0; 2];
    out.urg_ptr = [0; 2];
    Ok(true)
}

/// The checksum of the TCP header `tcp` (its checksum field zero, no data) from
/// `saddr` to `daddr` (both IPv4 or both IPv6): the pseudo-header's words (addresses,
/// protocol, TCP length), then the header's.
#[inline(always)]
fn tcp_checksum(saddr: &[u8], daddr: &[u8], tcp: &TcpHdr) -> [u8; 2] {
    let mut sum = pmtu::add_words(0, saddr);
    sum = pmtu::add_words(sum, daddr);
    sum += u32::from(IPPROTO_TCP) + size_of::<TcpHdr>() as u32;
    sum = pmtu::add_words(sum, &tcp.sport);
    sum = pmtu::add_words(sum, &tcp.dport);
    sum = pmtu::add_words(sum, &tcp.seq);
    sum = pmtu::add_words(sum, &tcp.ack_seq);
    sum = pmtu::add_words(sum, &tcp.doff_flags);
    sum = pmtu::add_words(sum, &tcp.window);
    sum = pmtu::add_words(sum, &tcp.check);
    pmtu::fold(pmtu::add_words(sum, &tcp.urg_ptr))
}

/// Chooses a backend for a new flow of `p` to `svc`, writes both of its NAT entries and
/// its forward translation to `out`; `false` when the frontend has none to give (or no
/// SNAT port is free). Never inlined: the selection has a stack frame of its own.
#[inline(never)]
fn new_flow4(p: &Packet4, svc: &LbService, out: &mut NatValue4) -> bool {
    match try_new_flow4(p, svc) {
        Some(nat) => {
            *out = nat;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn try_new_flow4(p: &Packet4, svc: &LbService) -> Option<NatValue4> {
    let hash = lb::hash(&[
        p.saddr,
        p.daddr,
        u32::from(p.sport) << 16 | u32::from(p.dport),
        u32::from(p.proto),
    ]);
    let mut client = Client {
        kind: LB_AFFINITY_ADDR,
        id: [0; 16],
    };
    let s = p.saddr.to_ne_bytes();
    client.id[..4].copy_from_slice(&s);
    let id = lb::select(svc, hash, &client, |id| lb::backend4(id).is_some())?;
    let backend = lb::backend4(id)?;
    let remote = backend.flags & LB_BACKEND_F_LOCAL == 0 && svc.flags & LB_F_LOCAL == 0;
    let scratch = scratch()?;
    scratch.reverse4 = NatValue4 {
        addr: p.daddr,
        nat_addr: p.saddr,
        port: p.dport,
        nat_port: p.sport,
        backend_id: id,
    };
    // The reply's key.
    scratch.key4 = NatKey4 {
        saddr: backend.addr,
        daddr: p.saddr,
        sport: backend.port,
        dport: p.sport,
        proto: p.proto,
        dir: NAT_DIR_REVERSE,
        _pad: [0; 2],
    };
    let mut forward = NatValue4 {
        addr: backend.addr,
        nat_addr: 0,
        port: backend.port,
        nat_port: 0,
        backend_id: id,
    };
    if remote {
        let gateway = CONFIG.get(0).map_or(0, |c| c.gateway);
        if gateway == 0 {
            return None;
        }
        scratch.key4.daddr = gateway;
        let port = snat_port(hash, |port| {
            scratch.key4.dport = port;
            NAT4.insert(&scratch.key4, &scratch.reverse4, u64::from(BPF_NOEXIST))
                .is_ok()
        })?;
        forward.nat_addr = gateway;
        forward.nat_port = port;
    } else {
        // A full LRU evicts its oldest entry; a failed write only loses the replies.
        let _ = NAT4.insert(&scratch.key4, &scratch.reverse4, 0);
    }
    scratch.key4 = NatKey4 {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        dir: NAT_DIR_FORWARD,
        _pad: [0; 2],
    };
    let _ = NAT4.insert(&scratch.key4, &forward, 0);
    Some(forward)
}

/// A source port (network byte order) for a new SNATed flow of `hash`: the first of
/// [`SNAT_TRIES`] ports derived from it that `claim` takes (writes its reverse entry
/// for, where none was).
#[inline(always)]
fn snat_port(hash: u32, mut claim: impl FnMut(u16) -> bool) -> Option<u16> {
    let range = u32::from(NAT_PORT_LAST - NAT_PORT_FIRST) + 1;
    let mut i = 0;
    while i < SNAT_TRIES {
        let port = NAT_PORT_FIRST + (hash.wrapping_add(i.wrapping_mul(0x9e37)) % range) as u16;
        let port = port.to_be();
        if claim(port) {
            return Some(port);
        }
        i += 1;
    }
    None
}

/// Rewrites the IPv4 packet `p` by the NAT entry `nat` (see `NatValue4`), with the IPv4
/// and L4 checksums: `PASS` when done, `DROP` when a helper failed. Forward: the
/// destination becomes `addr:port`, the source `nat_addr:nat_port` unless `nat_addr`
/// is 0. Reverse: the source becomes `addr:port`, the destination
/// `nat_addr:nat_port`.
#[inline(never)]
fn rewrite4(ctx: &TcContext, p: &Packet4, nat: &NatValue4, reverse: bool) -> u64 {
    let done = if reverse {
        rewrite4_to(ctx, p, nat.addr, nat.port, nat.nat_addr, nat.nat_port)
    } else {
        rewrite4_to(ctx, p, nat.nat_addr, nat.nat_port, nat.addr, nat.port)
    };
    match done {
        Ok(()) => Outcome::new(Outcome::PASS, 0).0,
        Err(o) => o.0,
    }
}

/// The packet's source becomes `saddr:sport` unless `saddr` is 0, its destination
/// `daddr:dport`.
#[inline(always)]
fn rewrite4_to(
    ctx: &TcContext,
    p: &Packet4,
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
) -> Result<(), Outcome> {
    let csum = p.l4 + csum_offset(p.proto);
    let flags = csum_flags(p.proto);
    let fail = |_| Outcome::from(DropReason::HelperFailed);
    if saddr != 0 {
        set_addr4(ctx, ETH_HLEN + 12, csum, flags, p.saddr, saddr)?;
        set_port(ctx, p.l4, csum, flags, p.sport, sport).map_err(fail)?;
    }
    set_addr4(ctx, ETH_HLEN + 16, csum, flags, p.daddr, daddr)?;
    set_port(ctx, p.l4 + 2, csum, flags, p.dport, dport).map_err(fail)?;
    Ok(())
}

/// Writes the IPv4 address at `offset` (`old` → `new`), with both checksums.
#[inline(always)]
fn set_addr4(
    ctx: &TcContext,
    offset: usize,
    csum: usize,
    flags: u64,
    old: u32,
    new: u32,
) -> Result<(), Outcome> {
    if old == new {
        return Ok(());
    }
    let fail = |_| Outcome::from(DropReason::HelperFailed);
    ctx.store(offset, &new, 0).map_err(fail)?;
    ctx.l4_csum_replace(
        csum,
        u64::from(old),
        u64::from(new),
        flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
    )
    .map_err(fail)?;
    ctx.l3_csum_replace(IPV4_CSUM_OFF, u64::from(old), u64::from(new), 4)
        .map_err(fail)
}

/// Writes the port at `offset` (`old` → `new`), with the L4 checksum at `csum`.
#[inline(always)]
fn set_port(
    ctx: &TcContext,
    offset: usize,
    csum: usize,
    flags: u64,
    old: u16,
    new: u16,
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.store(offset, &new, 0)?;
    ctx.l4_csum_replace(csum, u64::from(old), u64::from(new), flags | 2)
}

/// The reverse translation of an IPv4 reply, if it belongs to a NodePort flow: `PASS`
/// when it does not (nothing touched), `NODEPORT` with the egress ifindex once it is
/// rewritten and redirected, `DROP` when it cannot be sent on.
#[inline(never)]
pub fn reply4(ctx: &TcContext) -> u64 {
    match try_reply4(ctx) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_reply4(ctx: &TcContext) -> Result<Outcome, Outcome> {
    let pass = Outcome::new(Outcome::PASS, 0);
    let Some(p) = parse4(ctx) else {
        return Ok(pass);
    };
    let key = NatKey4 {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        dir: NAT_DIR_REVERSE,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    let Some(nat) = unsafe { NAT4.get(&key) }.copied() else {
        return Ok(pass);
    };
    if !packet::dec_ttl4(ctx)? {
        return Err(DropReason::TtlExceeded.into());
    }
    let rewritten = Outcome(rewrite4(ctx, &p, &nat, true));
    if rewritten.kind() != Outcome::PASS {
        return Err(rewritten);
    }
    Ok(Outcome(redirect4(ctx, nat.addr, nat.nat_addr)))
}

/// This CPU's route lookup parameters, zeroed.
#[inline(always)]
fn fib_params() -> Option<&'static mut bpf_fib_lookup> {
    let params = &mut scratch()?.fib;
    // SAFETY: `bpf_fib_lookup` is plain data (integers and unions of integer arrays),
    // valid when zeroed.
    *params = unsafe { core::mem::zeroed() };
    Some(params)
}

/// Sends the IPv4 packet (from `saddr` to `daddr`, network byte order) out of the
/// device of the kernel's route to `daddr`: `NODEPORT` with its ifindex, `DROP`
/// (`helper-failed`) when there is none.
#[inline(never)]
fn redirect4(ctx: &TcContext, saddr: u32, daddr: u32) -> u64 {
    let Some(params) = fib_params() else {
        return Outcome::from(DropReason::HelperFailed).0;
    };
    params.family = AF_INET;
    params.ifindex = skb_ifindex(ctx);
    params.__bindgen_anon_3.ipv4_src = saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    fib_redirect(ctx, params)
}

/// Sends the IPv6 packet out of the device of the kernel's route to `daddr`, as
/// [`redirect4`].
#[inline(never)]
fn redirect6(ctx: &TcContext, saddr: &[u8; 16], daddr: &[u8; 16]) -> u64 {
    let Some(params) = fib_params() else {
        return Outcome::from(DropReason::HelperFailed).0;
    };
    params.family = AF_INET6;
    params.ifindex = skb_ifindex(ctx);
    params.__bindgen_anon_3.ipv6_src = words(saddr);
    params.__bindgen_anon_4.ipv6_dst = words(daddr);
    fib_redirect(ctx, params)
}

/// The route lookup (an input lookup, as if the host forwarded the packet from the
/// device it is on) and the redirect: with the MACs of the lookup when the next hop's
/// is known, through `bpf_redirect_neigh` (which resolves it) when not.
#[inline(always)]
fn fib_redirect(ctx: &TcContext, params: &mut bpf_fib_lookup) -> u64 {
    let failed = Outcome::from(DropReason::HelperFailed).0;
    // SAFETY: the parameters live in this CPU's scratch for the call, with their size.
    let ret = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let ifindex = params.ifindex;
    let sent = if ret == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        let eth = EthHdr {
            dst: params.dmac,
            src: params.smac,
            ether_type: match ctx.load::<[u8; 2]>(12) {
                Ok(t) => t,
                Err(_) => return failed,
            },
        };
        if ctx.store(0, &eth, 0).is_err() {
            return failed;
        }
        // SAFETY: a plain helper call with scalar arguments.
        unsafe { bpf_redirect(ifindex, 0) }
    } else if ret == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        // SAFETY: no parameters: the helper looks the route up itself.
        unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) }
    } else {
        return failed;
    };
    if sent != i64::from(TC_ACT_REDIRECT) {
        return failed;
    }
    Outcome::new(Outcome::NODEPORT, ifindex).0
}

/// An IPv6 address as the four 32-bit words of `bpf_fib_lookup`, bytes unchanged.
#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// An IPv6 TCP/UDP packet (no extension headers) as [`Packet4`].
#[derive(Clone, Copy)]
struct Packet6 {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
    proto: u8,
}

/// The L4 header's offset in an IPv6 frame this program translates.
const L4_6: usize = ETH_HLEN + IPV6_HLEN;

#[inline(always)]
fn parse6(ctx: &TcContext) -> Option<Packet6> {
    let head: [u8; 8] = ctx.load(ETH_HLEN).ok()?;
    if head[0] >> 4 != 6 {
        return None;
    }
    let proto = head[6];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let addrs: [[u8; 16]; 2] = ctx.load(ETH_HLEN + 8).ok()?;
    let ports: [u8; 4] = ctx.load(L4_6).ok()?;
    Some(Packet6 {
        saddr: addrs[0],
        daddr: addrs[1],
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
    })
}

/// [`hypha_from_netdev`] for an IPv6 frame.
#[inline(never)]
fn netdev6(ctx: &TcContext) -> u64 {
    match try_netdev6(ctx) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_netdev6(ctx: &TcContext) -> Result<Outcome, Outcome> {
    let pass = Outcome::new(Outcome::PASS, 0);
    let Some(p) = parse6(ctx) else {
        return Ok(pass);
    };
    let Some(svc) = lb::service6(p.daddr, p.dport, p.proto, LB_SCOPE_EXTERNAL) else {
        // A reply of a remote backend over native routing comes in here, to the SNAT
        // address.
        if snat6() == Some(p.daddr) {
            return Ok(Outcome(reply6(ctx)));
        }
        return Ok(pass);
    };
    let scratch = scratch().ok_or(DropReason::HelperFailed)?;
    scratch.key6 = NatKey6 {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        dir: NAT_DIR_FORWARD,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    if let Some(found) = unsafe { NAT6.get(&scratch.key6) } {
        scratch.nat6 = *found;
        lb::count_backend(scratch.nat6.backend_id, false, ctx.len());
    } else if new_flow6(&p, &svc, scratch) {
        lb::count_backend(scratch.nat6.backend_id, true, ctx.len());
    } else {
        return Ok(refuse6(ctx, &p));
    }
    // To another node, this program is the router: a hop.
    if scratch.nat6.nat_addr != [0; 16] && !packet::dec_hop_limit6(ctx)? {
        return Ok(expired6(ctx, &p));
    }
    let rewritten = Outcome(rewrite6(ctx, &p, &scratch.nat6, false));
    if rewritten.kind() != Outcome::PASS {
        return Err(rewritten);
    }
    // Out of the scratch before `redirect6` takes it for the route lookup.
    let (backend, source) = (scratch.nat6.addr, scratch.nat6.nat_addr);
    if source == [0; 16] {
        // A local backend (or the client kept under `Local`): the host stack routes it
        // to the pod.
        return Ok(pass);
    }
    // SNATed to a backend on another node, as IPv4.
    let device = tunnel::device();
    if device != 0
        && let Some(peer) = TUNNEL6.get(Key::new(128, backend))
    {
        return tunnel::encap(ctx, peer, IDENTITY_HOST, device);
    }
    Ok(Outcome(redirect6(ctx, &source, &backend)))
}

/// [`refuse4`] for IPv6: a TCP reset, or ICMPv6 "port unreachable" for UDP.
#[inline(always)]
fn refuse6(ctx: &TcContext, p: &Packet6) -> Outcome {
    drop_and_answer(ctx, Family::Ipv6, DropReason::NoServiceBackend, || {
        if p.proto == IPPROTO_TCP {
            reset6(ctx, p)
        } else {
            pmtu::error6(ctx, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0, &p.daddr)
        }
    })
}

/// [`reset4`] for IPv6.
#[inline(never)]
fn reset6(ctx: &TcContext, p: &Packet6) -> u64 {
    match try_reset6(ctx, p) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_reset6(ctx: &TcContext, p: &Packet6) -> Result<Outcome, Outcome> {
    let invalid = |_| Outcome::from(DropReason::InvalidIpv6Header);
    let eth: EthHdr = ctx.load(0).map_err(invalid)?;
    let payload_len: [u8; 2] = ctx.load(ETH_HLEN + 4).map_err(invalid)?;
    let payload = u32::from(u16::from_be_bytes(payload_len));
    let frame = &mut scratch().ok_or(DropReason::HelperFailed)?.reset6;
    if !reset_tcp(ctx, L4_6, payload, p.sport, p.dport, &mut frame.tcp)? {
        return Ok(Outcome::new(Outcome::PASS, 0));
    }
    frame.eth = pmtu::answer_eth(&eth);
    frame.ip = Ipv6Hdr {
        version_tc_flow: [0x60, 0, 0, 0],
        payload_len: (size_of::<TcpHdr>() as u16).to_be_bytes(),
        next_header: IPPROTO_TCP,
        hop_limit: pmtu::ERROR_TTL,
        saddr: p.daddr,
        daddr: p.saddr,
    };
    frame.tcp.check = tcp_checksum(&frame.ip.saddr, &frame.ip.daddr, &frame.tcp);
    pmtu::send_back(ctx, frame)
}

/// [`new_flow4`] for IPv6, with the forward translation in the scratch's `nat6` (`key6`,
/// the flow's forward key, is read, never overwritten): a remote backend only with an
/// SNAT address (see the module's limits).
#[inline(never)]
fn new_flow6(p: &Packet6, svc: &LbService, scratch: &mut Scratch) -> bool {
    try_new_flow6(p, svc, scratch).is_some()
}

#[inline(always)]
fn try_new_flow6(p: &Packet6, svc: &LbService, scratch: &mut Scratch) -> Option<()> {
    let w = |a: &[u8; 16], i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    let hash = lb::hash(&[
        w(&p.saddr, 0),
        w(&p.saddr, 4),
        w(&p.saddr, 8),
        w(&p.saddr, 12),
        w(&p.daddr, 12),
        u32::from(p.sport) << 16 | u32::from(p.dport),
        u32::from(p.proto),
    ]);
    let client = Client {
        kind: LB_AFFINITY_ADDR,
        id: p.saddr,
    };
    let id = lb::select(svc, hash, &client, |id| lb::backend6(id).is_some())?;
    let backend = lb::backend6(id)?;
    let remote = backend.flags & LB_BACKEND_F_LOCAL == 0 && svc.flags & LB_F_LOCAL == 0;
    scratch.nat6 = NatValue6 {
        addr: backend.addr,
        nat_addr: [0; 16],
        port: backend.port,
        nat_port: 0,
        backend_id: id,
    };
    scratch.reverse6 = NatValue6 {
        addr: p.daddr,
        nat_addr: p.saddr,
        port: p.dport,
        nat_port: p.sport,
        backend_id: id,
    };
    scratch.reverse_key6 = NatKey6 {
        saddr: backend.addr,
        daddr: p.saddr,
        sport: backend.port,
        dport: p.sport,
        proto: p.proto,
        dir: NAT_DIR_REVERSE,
        _pad: [0; 2],
    };
    if remote {
        let source = snat6()?;
        scratch.reverse_key6.daddr = source;
        let port = snat_port(hash, |port| {
            scratch.reverse_key6.dport = port;
            NAT6.insert(
                &scratch.reverse_key6,
                &scratch.reverse6,
                u64::from(BPF_NOEXIST),
            )
            .is_ok()
        })?;
        scratch.nat6.nat_addr = source;
        scratch.nat6.nat_port = port;
    } else {
        // A full LRU evicts its oldest entry; a failed write only loses the replies.
        let _ = NAT6.insert(&scratch.reverse_key6, &scratch.reverse6, 0);
    }
    // `key6` is the flow's forward key still.
    let _ = NAT6.insert(&scratch.key6, &scratch.nat6, 0);
    Some(())
}

/// [`rewrite4`] for IPv6: forward, the source becomes `nat_addr:nat_port` unless
/// `nat_addr` is all zero.
#[inline(never)]
fn rewrite6(ctx: &TcContext, p: &Packet6, nat: &NatValue6, reverse: bool) -> u64 {
    let done = if reverse {
        rewrite6_to(
            ctx,
            p,
            Some((&nat.addr, nat.port)),
            &nat.nat_addr,
            nat.nat_port,
        )
    } else {
        let source = (nat.nat_addr != [0; 16]).then_some((&nat.nat_addr, nat.nat_port));
        rewrite6_to(ctx, p, source, &nat.addr, nat.port)
    };
    match done {
        Ok(()) => Outcome::new(Outcome::PASS, 0).0,
        Err(o) => o.0,
    }
}

/// The packet's source address and port become `source` when given, its destination
/// `daddr:dport`, with the L4 checksum.
#[inline(always)]
fn rewrite6_to(
    ctx: &TcContext,
    p: &Packet6,
    source: Option<(&[u8; 16], u16)>,
    daddr: &[u8; 16],
    dport: u16,
) -> Result<(), Outcome> {
    let csum = L4_6 + csum_offset(p.proto);
    let flags = csum_flags(p.proto);
    let fail = |_| Outcome::from(DropReason::HelperFailed);
    if let Some((saddr, sport)) = source {
        set_addr6(ctx, ETH_HLEN + 8, csum, flags, &p.saddr, saddr)?;
        set_port(ctx, L4_6, csum, flags, p.sport, sport).map_err(fail)?;
    }
    set_addr6(ctx, ETH_HLEN + 24, csum, flags, &p.daddr, daddr)?;
    set_port(ctx, L4_6 + 2, csum, flags, p.dport, dport).map_err(fail)?;
    Ok(())
}

/// Writes the IPv6 address at `offset` (`old` → `new`), with the L4 checksum (IPv6 has
/// no header checksum).
#[inline(always)]
fn set_addr6(
    ctx: &TcContext,
    offset: usize,
    csum: usize,
    flags: u64,
    old: &[u8; 16],
    new: &[u8; 16],
) -> Result<(), Outcome> {
    if old == new {
        return Ok(());
    }
    let fail = |_| Outcome::from(DropReason::HelperFailed);
    let mut from = words(old);
    let mut to = words(new);
    // SAFETY: both arrays live on this stack frame for the call, with their sizes.
    let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
    if diff < 0 {
        return Err(DropReason::HelperFailed.into());
    }
    ctx.store(offset, new, 0).map_err(fail)?;
    ctx.l4_csum_replace(csum, 0, diff as u64, flags | u64::from(BPF_F_PSEUDO_HDR))
        .map_err(fail)
}

/// [`reply4`] for IPv6.
#[inline(never)]
pub fn reply6(ctx: &TcContext) -> u64 {
    match try_reply6(ctx) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_reply6(ctx: &TcContext) -> Result<Outcome, Outcome> {
    let pass = Outcome::new(Outcome::PASS, 0);
    let Some(p) = parse6(ctx) else {
        return Ok(pass);
    };
    let scratch = scratch().ok_or(DropReason::HelperFailed)?;
    scratch.key6 = NatKey6 {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        dir: NAT_DIR_REVERSE,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    let Some(found) = (unsafe { NAT6.get(&scratch.key6) }) else {
        return Ok(pass);
    };
    scratch.nat6 = *found;
    if !packet::dec_hop_limit6(ctx)? {
        return Err(DropReason::TtlExceeded.into());
    }
    let rewritten = Outcome(rewrite6(ctx, &p, &scratch.nat6, true));
    if rewritten.kind() != Outcome::PASS {
        return Err(rewritten);
    }
    // Out of the scratch before `redirect6` takes it for the route lookup.
    let (saddr, daddr) = (scratch.nat6.addr, scratch.nat6.nat_addr);
    Ok(Outcome(redirect6(ctx, &saddr, &daddr)))
}
