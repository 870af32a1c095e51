//! Path MTU discovery across the tunnel.
//!
//! `hypha_from_pod` redirects a pod's packet into the VXLAN device with a metadata dst:
//! the vxlan driver cannot tell the pod that the path to the peer node shrank (it
//! answers with ICMP only for bridge ports, a metadata dst keeps no PMTU, and the key
//! `hypha_to_tunnel` sets on what the host forwards replaces that packet's route too),
//! so the outer packet would leave without DF and be fragmented. Instead a packet that
//! might not fit ([`path_mtu`]: asked only for an L3 length above [`MIN_CHECKED`] or a
//! GSO packet) is checked against the kernel's own view of the path to the peer's
//! underlay address (`bpf_fib_lookup` with `tot_len`: the route's MTU when locked or
//! with `net.ipv4.ip_forward_use_pmtu`, the device's MTU, learnt PMTU exceptions). One
//! that does not fit is answered here, as a router would: the frame becomes an ICMP
//! "fragmentation needed" ([`answer4`]) or ICMPv6 "packet too big" ([`answer6`]) with
//! the path's MTU less the VXLAN overhead, from the gateway, back to the pod. Paths
//! that cannot carry [`MIN_CHECKED`] bytes inside the tunnel are not reported (the
//! outer packet is fragmented as before).

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LOOKUP_SKIP_NEIGH, TC_ACT_REDIRECT, bpf_fib_lookup,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes,
    },
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use hypha_common::{
    DropReason, GATEWAY6, PEER_F_IPV6, TunnelPeer, VXLAN_OVERHEAD4, VXLAN_OVERHEAD6,
};

use crate::{
    CONFIG,
    ipv6::Outcome,
    packet::{ETH_HLEN, EthHdr, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr},
    skb_ifindex,
};

/// Inner packets of at most this L3 length are never checked: the IPv6 minimum MTU,
/// which every underlay path carries with the VXLAN overhead.
pub const MIN_CHECKED: u32 = 1280;

/// This CPU's room for the lookup's parameters and the error frames, off the stack
/// (the stages that use them run deep in `hypha_from_pod`'s calls).
#[map]
static PMTU_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct Scratch {
    fib: bpf_fib_lookup,
    v4: FragNeeded,
    v6: PacketTooBig,
}

/// This CPU's scratch.
#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: a per-CPU slot from a successful lookup; a program runs to completion on
    // one CPU and uses the slot for one packet at a time.
    PMTU_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const UDP_HLEN: u32 = 8;

/// The MTU inside the tunnel of the path to `peer`'s underlay address when the pod's
/// packet (IPv6 when `ipv6`, IPv4 otherwise), encapsulated, would not fit it; 0 when it
/// fits, when the path carries less than [`MIN_CHECKED`] inside the tunnel, or when the
/// lookup fails (the packet is tunnelled as before). A GSO packet is measured by its
/// segments (the L3 and L4 headers plus `gso_size`), so that a full-size segment at the
/// pod's MTU never counts. Never inlined: the lookup's 64-byte parameters have a stack
/// frame of their own.
#[inline(never)]
pub fn path_mtu(ctx: &TcContext, peer: &TunnelPeer, ipv6: bool) -> u32 {
    // SAFETY: the context's `__sk_buff`, which the kernel passed.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let l3_len = if gso_size == 0 {
        let len = ctx.len().saturating_sub(ETH_HLEN as u32);
        if len <= MIN_CHECKED {
            return 0;
        }
        len
    } else {
        let Some(headers) = headers_len(ctx, ipv6) else {
            return 0;
        };
        headers + gso_size
    };
    let outer6 = peer.flags & PEER_F_IPV6 != 0;
    let overhead = if outer6 {
        VXLAN_OVERHEAD6
    } else {
        VXLAN_OVERHEAD4
    };
    let Ok(tot_len) = u16::try_from(l3_len + overhead) else {
        return 0;
    };
    let Some(scratch) = scratch() else {
        return 0;
    };
    let params = &mut scratch.fib;
    // SAFETY: `bpf_fib_lookup` is plain data (integers and unions of integer arrays),
    // valid when zeroed.
    *params = unsafe { core::mem::zeroed() };
    params.__bindgen_anon_1.tot_len = tot_len;
    // An input lookup, as if the host forwarded the outer packet from the pod's veth:
    // the routes and exceptions for the peer's address, whatever the device.
    params.ifindex = skb_ifindex(ctx);
    if outer6 {
        params.family = AF_INET6;
        params.__bindgen_anon_4.ipv6_dst = words(peer.addr6);
    } else {
        params.family = AF_INET;
        params.__bindgen_anon_4.ipv4_dst = peer.addr4;
    }
    params.l4_protocol = IPPROTO_UDP;
    // SAFETY: the parameters live in this CPU's scratch for the call, with their size.
    let ret = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            params,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if ret != i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        return 0;
    }
    // SAFETY: on FRAG_NEEDED the kernel wrote the path's MTU over `tot_len`.
    let mtu = u32::from(unsafe { scratch.fib.__bindgen_anon_1.mtu_result });
    match mtu.checked_sub(overhead) {
        Some(inner) if inner >= MIN_CHECKED => inner,
        _ => 0,
    }
}

/// The length of the L3 and L4 headers of each segment of a GSO packet: the IPv4
/// header (its IHL) or the fixed IPv6 header, and the TCP header (its data offset) or
/// UDP's; a transport neither TCP nor UDP (IPv6 extension headers among them) counts
/// none, which can only make a segment look smaller.
#[inline(always)]
fn headers_len(ctx: &TcContext, ipv6: bool) -> Option<u32> {
    let (l3, proto) = if ipv6 {
        let next: u8 = ctx.load(ETH_HLEN + 6).ok()?;
        (IPV6_HLEN as u32, next)
    } else {
        let [version_ihl]: [u8; 1] = ctx.load(ETH_HLEN).ok()?;
        let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        (u32::from(version_ihl & 0x0f) * 4, proto)
    };
    let l4 = match proto {
        IPPROTO_TCP => {
            // Bounded, so the verifier knows the offset's range.
            let offset = (l3 & 0x3c) as usize;
            let doff: u8 = ctx.load(ETH_HLEN + offset + 12).ok()?;
            u32::from(doff >> 4) * 4
        }
        IPPROTO_UDP => UDP_HLEN,
        _ => 0,
    };
    Some(l3 + l4)
}

/// An IPv6 address as the four 32-bit words of `bpf_fib_lookup`, bytes unchanged.
#[inline(always)]
fn words(addr: [u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Bytes of the packet an ICMP error quotes: the IPv4 header (without options) and the
/// first 8 bytes of its payload, as RFC 792 asks and the pod's stack needs (the ports,
/// TCP's sequence number).
const QUOTE4: usize = 28;
/// For IPv6: the fixed header and 8 bytes of what follows (RFC 4443 allows more).
const QUOTE6: usize = 48;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// ICMP "destination unreachable" (also `nodeport`'s "port unreachable").
pub const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
/// The TTL / hop limit of the errors (and of NodePort's resets).
pub const ERROR_TTL: u8 = 64;

/// An ICMP "fragmentation needed" in its frame.
#[repr(C)]
struct FragNeeded {
    eth: EthHdr,
    ip: Ipv4Hdr,
    icmp_type: u8,
    code: u8,
    checksum: [u8; 2],
    unused: [u8; 2],
    mtu: [u8; 2],
    quote: [u8; QUOTE4],
}

/// An ICMPv6 "packet too big" in its frame.
#[repr(C)]
struct PacketTooBig {
    eth: EthHdr,
    ip: Ipv6Hdr,
    icmp_type: u8,
    code: u8,
    checksum: [u8; 2],
    mtu: [u8; 4],
    quote: [u8; QUOTE6],
}

/// The one's complement sum of `bytes` as 16-bit big-endian words, added to `sum`.
#[inline(always)]
pub fn add_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// Copies the packet's first `N` bytes after the Ethernet header into `quote`
/// (`bpf_skb_load_bytes` with a constant length, which the verifier needs).
#[inline(always)]
fn load_quote<const N: usize>(ctx: &TcContext, quote: &mut [u8; N]) -> bool {
    // SAFETY: `quote` is `N` writable bytes.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast_const().cast(),
            ETH_HLEN as u32,
            quote.as_mut_ptr().cast(),
            N as u32,
        )
    };
    ret == 0
}

/// `sum` folded to 16 bits and complemented: a checksum field, big-endian.
#[inline(always)]
pub fn fold(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// The Ethernet header of an answer to a frame whose header is `eth`: back to its
/// sender.
#[inline(always)]
pub fn answer_eth(eth: &EthHdr) -> EthHdr {
    EthHdr {
        dst: eth.src,
        src: eth.dst,
        ether_type: eth.ether_type,
    }
}

/// The IPv4 header (no options, not fragmented, TTL [`ERROR_TTL`]) of an answer of
/// `protocol` and `len` bytes from `saddr` to `daddr`, with its checksum.
#[inline(always)]
pub fn answer_ipv4(tos: u8, len: usize, protocol: u8, saddr: [u8; 4], daddr: [u8; 4]) -> Ipv4Hdr {
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos,
        tot_len: (len as u16).to_be_bytes(),
        id: [0; 2],
        frag_off: [0; 2],
        ttl: ERROR_TTL,
        protocol,
        check: [0; 2],
        saddr,
        daddr,
    };
    let mut sum = u32::from(u16::from_be_bytes([ip.version_ihl, ip.tos]));
    sum = add_words(sum, &ip.tot_len);
    sum += u32::from(u16::from_be_bytes([ip.ttl, ip.protocol]));
    sum = add_words(sum, &ip.saddr);
    sum = add_words(sum, &ip.daddr);
    ip.check = fold(sum);
    ip
}

/// Sends `frame`, `len` bytes, back where the packet came from in place of it: the
/// packet cut to that length and overwritten, redirected to the egress of the device it
/// arrived on (a pod's host veth, or the node's external device for `nodeport`, whose
/// TCP resets leave this way too).
#[inline(always)]
pub fn send_back<T>(ctx: &TcContext, frame: &T) -> Result<Outcome, Outcome> {
    // SAFETY: plain helper calls on the context the kernel passed; the frame lives on
    // the caller's stack for the call, with its size.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, size_of::<T>() as u32, 0) != 0 {
            return Err(DropReason::HelperFailed.into());
        }
    }
    ctx.store(0, frame, 0)
        .map_err(|_| DropReason::HelperFailed)?;
    // SAFETY: a plain helper call with scalar arguments.
    let ret = unsafe { bpf_redirect(skb_ifindex(ctx), 0) };
    if ret != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::HelperFailed.into());
    }
    Ok(Outcome::new(Outcome::ANSWERED, 0))
}

/// Answers the pod's IPv4 packet, too big for a path of `mtu` inside the tunnel, with
/// an ICMP "fragmentation needed" from its gateway: `ANSWERED`; `PASS` for a packet
/// this cannot quote (IPv4 options, no gateway: the host stack forwards it, fragmented
/// outside).
#[inline(never)]
pub fn answer4(ctx: &TcContext, mtu: u32) -> u64 {
    let gateway = CONFIG.get(0).map_or(0, |c| c.gateway);
    error4(
        ctx,
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        mtu as u16,
        gateway,
    )
}

/// Answers the IPv4 packet with an ICMP error of `icmp_type` and `code` (with the
/// next-hop MTU `mtu` for "fragmentation needed", 0 otherwise) from `saddr` (network
/// byte order), quoting it, sent back out of the device it came in by: `ANSWERED`;
/// `PASS` for a packet this cannot quote (IPv4 options) or without a source. Also the
/// NodePort program's "port unreachable" and "time exceeded" (`nodeport`).
#[inline(never)]
pub fn error4(ctx: &TcContext, icmp_type: u8, code: u8, mtu: u16, saddr: u32) -> u64 {
    match try_error4(ctx, icmp_type, code, mtu, saddr) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_error4(
    ctx: &TcContext,
    icmp_type: u8,
    code: u8,
    mtu: u16,
    gateway: u32,
) -> Result<Outcome, Outcome> {
    let pass = Outcome::new(Outcome::PASS, 0);
    let scratch = scratch().ok_or(DropReason::HelperFailed)?;
    let frame = &mut scratch.v4;
    let eth: EthHdr = ctx.load(0).map_err(|_| DropReason::InvalidIpv4Header)?;
    if !load_quote(ctx, &mut frame.quote) {
        return Err(DropReason::InvalidIpv4Header.into());
    }
    let quote = &frame.quote;
    if quote[0] != 0x45 || gateway == 0 {
        return Ok(pass);
    }
    let daddr = [quote[12], quote[13], quote[14], quote[15]];
    frame.eth = answer_eth(&eth);
    // Internetwork control, as the kernel's ICMP errors.
    frame.ip = answer_ipv4(
        0xc0,
        size_of::<FragNeeded>() - ETH_HLEN,
        IPPROTO_ICMP,
        gateway.to_ne_bytes(),
        daddr,
    );
    frame.icmp_type = icmp_type;
    frame.code = code;
    frame.checksum = [0; 2];
    frame.unused = [0; 2];
    frame.mtu = mtu.to_be_bytes();
    let mut sum = u32::from(u16::from_be_bytes([frame.icmp_type, frame.code]));
    sum = add_words(sum, &frame.mtu);
    sum = add_words(sum, &frame.quote);
    frame.checksum = fold(sum);
    send_back(ctx, frame)
}

/// Answers the pod's IPv6 packet, too big for a path of `mtu` inside the tunnel, with
/// an ICMPv6 "packet too big" from its gateway (`fe80::1`): `ANSWERED`.
#[inline(never)]
pub fn answer6(ctx: &TcContext, mtu: u32) -> u64 {
    error6(ctx, ICMPV6_PKT_TOOBIG, 0, mtu, &GATEWAY6)
}

/// Answers the IPv6 packet with an ICMPv6 error of `icmp_type` and `code` whose 32-bit
/// field is `value` (the MTU of "packet too big", 0 for "destination unreachable"),
/// from `saddr`, quoting it, sent back out of the device it came in by: `ANSWERED`.
/// Also the NodePort program's "port unreachable" (`nodeport`).
#[inline(never)]
pub fn error6(ctx: &TcContext, icmp_type: u8, code: u8, value: u32, saddr: &[u8; 16]) -> u64 {
    match try_error6(ctx, icmp_type, code, value, saddr) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_error6(
    ctx: &TcContext,
    icmp_type: u8,
    code: u8,
    mtu: u32,
    saddr: &[u8; 16],
) -> Result<Outcome, Outcome> {
    let scratch = scratch().ok_or(DropReason::HelperFailed)?;
    let frame = &mut scratch.v6;
    let eth: EthHdr = ctx.load(0).map_err(|_| DropReason::InvalidIpv6Header)?;
    if !load_quote(ctx, &mut frame.quote) {
        return Err(DropReason::InvalidIpv6Header.into());
    }
    let payload = (size_of::<PacketTooBig>() - ETH_HLEN - IPV6_HLEN) as u16;
    frame.eth = answer_eth(&eth);
    frame.ip.version_tc_flow = [0x60, 0, 0, 0];
    frame.ip.payload_len = payload.to_be_bytes();
    frame.ip.next_header = IPPROTO_ICMPV6;
    frame.ip.hop_limit = ERROR_TTL;
    frame.ip.saddr = *saddr;
    let mut i = 0;
    while i < 16 {
        frame.ip.daddr[i] = frame.quote[8 + i];
        i += 1;
    }
    frame.icmp_type = icmp_type;
    frame.code = code;
    frame.checksum = [0; 2];
    frame.mtu = mtu.to_be_bytes();
    // The pseudo-header (addresses, upper-layer length, next header), then the message.
    let mut sum = add_words(0, &frame.ip.saddr);
    sum = add_words(sum, &frame.ip.daddr);
    sum += u32::from(payload) + u32::from(IPPROTO_ICMPV6);
    sum += u32::from(u16::from_be_bytes([frame.icmp_type, frame.code]));
    sum = add_words(sum, &frame.mtu);
    sum = add_words(sum, &frame.quote);
    frame.checksum = fold(sum);
    send_back(ctx, frame)
}
