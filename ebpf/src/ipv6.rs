//! IPv6 in both programs: header checks, the extension header walk, neighbour discovery
//! for the gateway, anti-spoofing, routing to pods on this node, and policy with
//! `hypha_ct6`.
//!
//! The work is split in stages that are never inlined, each a BPF-to-BPF call with a
//! stack frame of its own, called one after the other by the programs' main functions
//! (never one inside the other): the frames of a call chain must fit in 512 bytes
//! together, and the policy check alone takes half of that. [`from_pod`] and [`to_pod`]
//! check and classify a frame; then, as they say, the main function has
//! [`answer_solicitation`] answer it, or checks it against policy (`policy::allow`) and
//! has [`forward`] deliver it. The stages return their decision as one scalar, an
//! [`Outcome`], and leave the flow and its destination for the next stage in this
//! CPU's `SCRATCH6` (a program runs to completion on one CPU).
//!
//! Every read past the fixed header goes through `bpf_skb_load_bytes` (`ctx.load`),
//! which takes any offset, so the verifier accepts the variable offsets the walk makes.

use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::generated::{bpf_redirect, bpf_skb_change_tail},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use hypha_common::{
    DropReason, EndpointIface, EndpointInfo, EndpointKey6, GATEWAY6, MAX_IPV6_EXT_HEADERS,
    link_local_of,
};

use crate::{
    ENDPOINTS6,
    packet::{self, ETH_HLEN, EthHdr, IPV6_HLEN, Ipv6Hdr, NeighbourAdvert, pull_or},
    policy::{self, Flow6, IPPROTO_ICMPV6, IPPROTO_TCP, Ip6},
};

/// Extension headers the walk steps over (RFC 8200 section 4).
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

/// ICMPv6 errors (RFC 4443), policy-checked as the flow they quote.
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAM_PROB: u8 = 4;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// Multicast listener discovery (RFC 2710, RFC 3810): query, report, done, v2 report.
const ICMPV6_MLD_QUERY: u8 = 130;
const ICMPV6_MLD_REPORT: u8 = 131;
const ICMPV6_MLD_DONE: u8 = 132;
const ICMPV6_MLD2_REPORT: u8 = 143;
/// Neighbour discovery (RFC 4861): router solicitation .. redirect.
const ICMPV6_ROUTER_SOLICIT: u8 = 133;
const ICMPV6_NEIGH_SOLICIT: u8 = 135;
const ICMPV6_NEIGH_ADVERT: u8 = 136;
const ICMPV6_REDIRECT: u8 = 137;

/// Neighbour advertisement flags (first byte): router, solicited, override.
const NA_ROUTER: u8 = 0x80;
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;

/// `ff02::1`, all nodes, and its Ethernet multicast address.
const ALL_NODES: Ip6 = Ip6([0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
const GATEWAY: Ip6 = Ip6(GATEWAY6);

/// This CPU's IPv6 state between the stages of one program run. Private to the programs.
#[map(name = "hypha_scratch6")]
static SCRATCH6: PerCpuArray<Scratch6> = PerCpuArray::with_max_entries(1, 0);

/// What [`from_pod`] and [`to_pod`] leave for the next stage.
pub struct Scratch6 {
    /// The packet's flow (filled in when a policy applies).
    pub flow: Flow6,
    /// The pod the destination address belongs to, if `has_dst`.
    pub dst: EndpointInfo,
    pub has_dst: bool,
    pub hop_limit: u8,
}

/// This CPU's scratch.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch6> {
    // SAFETY: a per-CPU slot from a successful lookup; a program runs to completion on
    // one CPU, and the stages run one after the other, so nothing else uses it meanwhile.
    SCRATCH6.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// A decision of a stage in one scalar (a BPF-to-BPF call returns one
/// register): the kind in the low byte, a value (an ifindex, a drop reason) in the high
/// 32 bits.
#[derive(Clone, Copy)]
pub struct Outcome(pub u64);

impl Outcome {
    /// To the host stack (or, at `hypha_to_pod`, on to the pod).
    pub const PASS: u8 = 0;
    /// Answered back to the pod (the neighbour advertisement).
    pub const ANSWERED: u8 = 1;
    /// Redirected to the pod behind the host veth in the value.
    pub const POD: u8 = 2;
    /// To be dropped for the reason in the value, counted against the program's own
    /// endpoint.
    pub const DROP: u8 = 3;
    /// Dropped by a policy, and already counted and reported (`count_denied`).
    pub const DENIED: u8 = 4;
    /// A neighbour solicitation for the gateway: for [`answer_solicitation`].
    pub const SOLICITATION: u8 = 5;
    /// To be routed (from the pod) or delivered (to it), after a policy check of the
    /// flow in the scratch when the value is [`Outcome::CHECK`].
    pub const ROUTE: u8 = 6;
    /// `ROUTE`'s value when the flow must pass policy first.
    pub const CHECK: u32 = 1;
    /// Sent into the tunnel to the node whose id is the value (`hypha_from_pod`,
    /// `hypha_to_tunnel`).
    pub const TUNNEL: u8 = 7;
    /// A NodePort reply, translated back (`nodeport`) and redirected out of the node's
    /// device with the ifindex in the value.
    pub const NODEPORT: u8 = 8;

    pub const fn new(kind: u8, value: u32) -> Self {
        Outcome(kind as u64 | (value as u64) << 32)
    }

    pub fn kind(self) -> u8 {
        self.0 as u8
    }

    pub fn value(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The drop reason of a [`Outcome::DROP`].
    pub fn reason(self) -> DropReason {
        // Only `drop` makes this kind, from a `DropReason`; the match keeps it total.
        match DropReason::ALL.iter().find(|r| **r as u32 == self.value()) {
            Some(reason) => *reason,
            None => DropReason::HelperFailed,
        }
    }

    fn drop(reason: DropReason) -> Self {
        Outcome::new(Outcome::DROP, reason as u32)
    }
}

impl From<DropReason> for Outcome {
    fn from(reason: DropReason) -> Self {
        Outcome::drop(reason)
    }
}

/// Where a packet's upper-layer header is, after the extension headers.
#[derive(Clone, Copy)]
struct Upper {
    /// The upper-layer protocol (the last next-header value).
    proto: u8,
    /// Its offset from the start of the frame.
    offset: usize,
    /// A fragment other than the first: its upper-layer header is in the first one, so
    /// it has no ports (a port-less flow, as for IPv4).
    later_fragment: bool,
}

/// The fixed header's fields the programs use, read once.
struct Header {
    next_header: u8,
    hop_limit: u8,
    saddr: Ip6,
    daddr: Ip6,
    src_mac: [u8; 6],
}

/// Checks the fixed header and reads it: shorter than 40 bytes, `InvalidIpv6Header`;
/// a version other than 6, `MalformedIpv6`.
#[inline(always)]
fn header(ctx: &TcContext) -> Result<Header, DropReason> {
    pull_or(ctx, ETH_HLEN + IPV6_HLEN, DropReason::InvalidIpv6Header)?;
    let eth: *mut EthHdr = packet::header(ctx, 0).ok_or(DropReason::InvalidIpv6Header)?;
    let ip: *mut Ipv6Hdr = packet::header(ctx, ETH_HLEN).ok_or(DropReason::InvalidIpv6Header)?;
    // SAFETY: `header` checked that both headers lie within the packet.
    let (version, next_header, hop_limit, src_mac) = unsafe {
        (
            (*ip).version_tc_flow[0] >> 4,
            (*ip).next_header,
            (*ip).hop_limit,
            (*eth).src,
        )
    };
    if version != 6 {
        return Err(DropReason::MalformedIpv6);
    }
    // The addresses with one `bpf_skb_load_bytes` into one buffer: copied field by field
    // from the packet (byte arrays, alignment 1), each byte would take a stack slot.
    let [saddr, daddr] = ctx
        .load::<[Ip6; 2]>(ETH_HLEN + 8)
        .map_err(|_| DropReason::InvalidIpv6Header)?;
    Ok(Header {
        next_header,
        hop_limit,
        saddr,
        daddr,
        src_mac,
    })
}

/// Walks the extension headers from the fixed header's `next_header`: at most
/// [`MAX_IPV6_EXT_HEADERS`] of hop-by-hop options, routing, destination options and
/// fragment headers. Any other next header ends the walk and is taken as the
/// upper-layer protocol: TCP, UDP, ICMPv6 and the like, but also AH and ESP (whose
/// contents the datapath does not read: they are flows of protocol 51 and 50) and "no
/// next header" (59). A fragment with a non-zero offset ends it too: what follows is the
/// middle of the fragmented payload.
///
/// A header cut short (the frame ends before the length it claims) is
/// `InvalidExtensionHeader`; more headers than the limit, `TooManyExtensionHeaders`.
#[inline(always)]
fn walk(ctx: &TcContext, first: u8) -> Result<Upper, DropReason> {
    let packed = walk_packed(ctx, first);
    let reason = (packed >> 32) as u32;
    if reason != 0 {
        return Err(
            match DropReason::ALL.iter().find(|r| **r as u32 == reason) {
                Some(r) => *r,
                None => DropReason::InvalidExtensionHeader,
            },
        );
    }
    Ok(Upper {
        proto: packed as u8,
        offset: ((packed >> 8) & 0xffff) as usize,
        later_fragment: (packed >> 24) & 1 != 0,
    })
}

/// [`walk`] in a frame of its own, its result in one scalar: the protocol in bits 0-7,
/// the offset in 8-23 (at most 14 + 40 + 8 × 2,048), a later fragment in bit 24, or a
/// drop reason in the high 32 bits.
#[inline(never)]
fn walk_packed(ctx: &TcContext, first: u8) -> u64 {
    match walk_headers(ctx, first) {
        Ok(u) => u64::from(u.proto) | (u.offset as u64) << 8 | u64::from(u.later_fragment) << 24,
        Err(reason) => (reason as u64) << 32,
    }
}

#[inline(always)]
fn walk_headers(ctx: &TcContext, first: u8) -> Result<Upper, DropReason> {
    let len = ctx.len() as usize;
    let mut next = first;
    let mut offset = ETH_HLEN + IPV6_HLEN;
    let mut i = 0;
    while i < MAX_IPV6_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                // Next header, then the length in 8-byte units, not counting the first 8.
                let h = ctx
                    .load::<[u8; 2]>(offset)
                    .map_err(|_| DropReason::InvalidExtensionHeader)?;
                let size = (usize::from(h[1]) + 1) * 8;
                if offset + size > len {
                    return Err(DropReason::InvalidExtensionHeader);
                }
                next = h[0];
                offset += size;
            }
            NEXTHDR_FRAGMENT => {
                // Next header, reserved, offset (13 bits) and flags, identification.
                if offset + 8 > len {
                    return Err(DropReason::InvalidExtensionHeader);
                }
                let h = ctx
                    .load::<[u8; 4]>(offset)
                    .map_err(|_| DropReason::InvalidExtensionHeader)?;
                next = h[0];
                offset += 8;
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return Ok(Upper {
                        proto: next,
                        offset,
                        later_fragment: true,
                    });
                }
            }
            _ => {
                return Ok(Upper {
                    proto: next,
                    offset,
                    later_fragment: false,
                });
            }
        }
        i += 1;
    }
    match next {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT => {
            Err(DropReason::TooManyExtensionHeaders)
        }
        _ => Ok(Upper {
            proto: next,
            offset,
            later_fragment: false,
        }),
    }
}

/// The ICMPv6 type of the packet, if it is ICMPv6 and its header is there.
#[inline(always)]
fn icmp_type(ctx: &TcContext, upper: &Upper) -> Option<u8> {
    if upper.proto != IPPROTO_ICMPV6 || upper.later_fragment {
        return None;
    }
    ctx.load::<u8>(upper.offset).ok()
}

/// Neighbour discovery: RS, RA, NS, NA, redirect.
#[inline(always)]
fn is_ndp(icmp_type: Option<u8>) -> bool {
    matches!(icmp_type, Some(t) if (ICMPV6_ROUTER_SOLICIT..=ICMPV6_REDIRECT).contains(&t))
}

/// Link-scoped control traffic between a pod and its host veth: neighbour discovery, and
/// multicast listener discovery to a link-local or link-scope multicast destination.
/// It never leaves the link, so it goes to (or comes from) the host without policy.
#[inline(always)]
fn is_link_control(icmp_type: Option<u8>, daddr: &Ip6) -> bool {
    let daddr = &daddr.0;
    if is_ndp(icmp_type) {
        return true;
    }
    let mld = matches!(icmp_type, Some(t) if (ICMPV6_MLD_QUERY..=ICMPV6_MLD_DONE).contains(&t)
        || t == ICMPV6_MLD2_REPORT);
    let link_scope =
        (daddr[0] == 0xff && daddr[1] & 0x0f == 2) || (daddr[0] == 0xfe && daddr[1] & 0xc0 == 0x80);
    mld && link_scope
}

/// The flow of a packet: ports (or, for ICMPv6 echo, the identifier) and TCP flags when
/// the upper-layer header is there.
#[inline(always)]
fn flow(ctx: &TcContext, h: &Header, upper: &Upper, icmp_type: Option<u8>) -> Flow6 {
    let mut flow = Flow6 {
        saddr: h.saddr,
        daddr: h.daddr,
        sport: 0,
        dport: 0,
        proto: upper.proto,
        tcp_flags: 0,
        echo: false,
        len: ctx.len(),
    };
    if upper.later_fragment {
        return flow;
    }
    if policy::has_ports(upper.proto) {
        if let Ok(ports) = ctx.load::<[u8; 4]>(upper.offset) {
            flow.sport = u16::from_ne_bytes([ports[0], ports[1]]);
            flow.dport = u16::from_ne_bytes([ports[2], ports[3]]);
        }
        if upper.proto == IPPROTO_TCP
            && let Ok(flags) = ctx.load::<u8>(upper.offset + 13)
        {
            flow.tcp_flags = flags;
        }
    } else if matches!(icmp_type, Some(ICMPV6_ECHO_REQUEST | ICMPV6_ECHO_REPLY))
        && let Ok(id) = ctx.load::<u16>(upper.offset + 4)
    {
        flow.sport = id;
        flow.echo = true;
    }
    flow
}

/// Whether an ICMPv6 error (destination unreachable, packet too big, time exceeded,
/// parameter problem) quotes a flow `hypha_ct6` tracks (either way): such an error is
/// part of that flow and passes without a policy lookup; any other is a new flow of
/// ICMPv6 like any other. Never inlined: the quoted flow has a frame of its own.
#[inline(never)]
fn related(ctx: &TcContext, upper: &Upper, icmp_type: Option<u8>) -> bool {
    if !matches!(icmp_type, Some(t) if (ICMPV6_DEST_UNREACH..=ICMPV6_PARAM_PROB).contains(&t)) {
        return false;
    }
    // The quoted packet starts after the 8-byte error header: its fixed header, then
    // (without extension headers, as the datapath reads it) its ports.
    let inner = upper.offset + 8;
    let (Ok(next), Ok(saddr), Ok(daddr)) = (
        ctx.load::<u8>(inner + 6),
        ctx.load::<Ip6>(inner + 8),
        ctx.load::<Ip6>(inner + 24),
    ) else {
        return false;
    };
    let mut quoted = Flow6 {
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        proto: next,
        tcp_flags: 0,
        echo: false,
        len: 0,
    };
    let l4 = inner + IPV6_HLEN;
    if policy::has_ports(next) {
        let Ok(ports) = ctx.load::<[u8; 4]>(l4) else {
            return false;
        };
        quoted.sport = u16::from_ne_bytes([ports[0], ports[1]]);
        quoted.dport = u16::from_ne_bytes([ports[2], ports[3]]);
    } else if next == IPPROTO_ICMPV6 {
        let Ok(quoted_type) = ctx.load::<u8>(l4) else {
            return false;
        };
        if quoted_type == ICMPV6_ECHO_REQUEST || quoted_type == ICMPV6_ECHO_REPLY {
            let Ok(id) = ctx.load::<u16>(l4 + 4) else {
                return false;
            };
            quoted.sport = id;
            quoted.echo = true;
        }
    }
    policy::tracked(&quoted)
}

/// `hypha_from_pod`'s first stage for an IPv6 frame of the endpoint `iface` (which has
/// `ENDPOINT_F_IPV6`): header checks, the extension header walk, anti-spoofing,
/// neighbour discovery; then, for a frame to route, the destination pod and (when a
/// policy applies) the flow, in the scratch.
#[inline(never)]
pub fn from_pod(ctx: &TcContext, iface: &EndpointIface) -> u64 {
    match try_from_pod(ctx, iface) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext, iface: &EndpointIface) -> Result<Outcome, Outcome> {
    let h = header(ctx)?;
    let upper = walk(ctx, h.next_header)?;
    let icmp_type = icmp_type(ctx, &upper);

    // A pod sends only as itself: its MAC, and its address, or its link-local address,
    // or none (`::`) for what a host sends before it has an address: the neighbour
    // solicitation of duplicate address detection (RFC 4862 5.4.2), the multicast
    // listener reports that go with it (RFC 3810 5.2.13, v1 and v2), and router
    // solicitations (RFC 4861 4.1). None of these is routed: they go to the host stack
    // (`is_link_control`: neighbour discovery always, listener reports only to a
    // link-scope destination; one from `::` to anything else is spoofed).
    let addr6 = Ip6(iface.addr6);
    let own = !addr6.is_unspecified() && h.saddr.same(&addr6);
    let dad = h.saddr.is_unspecified()
        && matches!(
            icmp_type,
            Some(
                ICMPV6_NEIGH_SOLICIT
                    | ICMPV6_MLD_REPORT
                    | ICMPV6_MLD2_REPORT
                    | ICMPV6_ROUTER_SOLICIT
            )
        )
        && is_link_control(icmp_type, &h.daddr);
    let link_local = h.saddr.same(&Ip6(link_local_of(iface.pod_mac)));
    if h.src_mac != iface.pod_mac || !(own || dad || link_local) {
        return Err(DropReason::SpoofedSource.into());
    }

    if is_ndp(icmp_type) {
        // RFC 4861 section 7.1: a hop limit of 255 shows it was not forwarded. Every
        // message has at least 8 bytes; a solicitation has its 16-byte target after them.
        let needed = if icmp_type == Some(ICMPV6_NEIGH_SOLICIT) {
            24
        } else {
            8
        };
        if h.hop_limit != 255 || (ctx.len() as usize) < upper.offset + needed {
            return Err(DropReason::InvalidNeighborDiscovery.into());
        }
        if icmp_type == Some(ICMPV6_NEIGH_SOLICIT) {
            let target = ctx
                .load::<Ip6>(upper.offset + 8)
                .map_err(|_| DropReason::InvalidNeighborDiscovery)?;
            if target.same(&GATEWAY) {
                return Ok(Outcome::new(Outcome::SOLICITATION, 0));
            }
        }
        // Any other neighbour discovery is the host's (it never reaches another pod).
        return Ok(Outcome::new(Outcome::PASS, 0));
    }
    if is_link_control(icmp_type, &h.daddr) {
        return Ok(Outcome::new(Outcome::PASS, 0));
    }

    let scratch = scratch().ok_or(DropReason::HelperFailed)?;
    // SAFETY: the value is copied out at once.
    match unsafe { ENDPOINTS6.get(EndpointKey6 { addr: h.daddr.0 }) } {
        Some(dst) => {
            scratch.dst = *dst;
            scratch.has_dst = true;
        }
        None => scratch.has_dst = false,
    }
    scratch.hop_limit = h.hop_limit;
    let receiver_enforces = scratch.has_dst && scratch.dst.flags & policy::POLICY_FLAGS != 0;
    if (iface.flags & policy::POLICY_FLAGS != 0 || receiver_enforces)
        && !related(ctx, &upper, icmp_type)
    {
        scratch.flow = flow(ctx, &h, &upper, icmp_type);
        return Ok(Outcome::new(Outcome::ROUTE, Outcome::CHECK));
    }
    Ok(Outcome::new(Outcome::ROUTE, 0))
}

/// `hypha_from_tunnel`'s stage for an inner IPv6 frame: the header checks and walk of
/// [`from_pod`], then the local endpoint its destination belongs to, in the scratch,
/// with (when that endpoint enforces a policy and the packet is not an ICMPv6 error of
/// a tracked flow) the flow: `ROUTE` (with `CHECK` when the flow must pass policy), or
/// `PASS` for a destination that is no local endpoint (the host's own addresses).
#[inline(never)]
pub fn from_tunnel(ctx: &TcContext) -> u64 {
    match try_from_tunnel(ctx) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_from_tunnel(ctx: &TcContext) -> Result<Outcome, Outcome> {
    let h = header(ctx)?;
    let upper = walk(ctx, h.next_header)?;
    let scratch = scratch().ok_or(DropReason::HelperFailed)?;
    // SAFETY: the value is copied out at once.
    match unsafe { ENDPOINTS6.get(EndpointKey6 { addr: h.daddr.0 }) } {
        Some(dst) => {
            scratch.dst = *dst;
            scratch.has_dst = true;
        }
        None => {
            scratch.has_dst = false;
            return Ok(Outcome::new(Outcome::PASS, 0));
        }
    }
    let icmp_type = icmp_type(ctx, &upper);
    if scratch.dst.flags & policy::POLICY_FLAGS != 0 && !related(ctx, &upper, icmp_type) {
        scratch.flow = flow(ctx, &h, &upper, icmp_type);
        return Ok(Outcome::new(Outcome::ROUTE, Outcome::CHECK));
    }
    Ok(Outcome::new(Outcome::ROUTE, 0))
}

/// Delivers a frame [`from_pod`] classified as `ROUTE` (and the policy let through) to
/// the pod its destination belongs to, with the hop limit decremented and the MACs
/// rewritten; or into the tunnel, for a pod on another node (`tunnel::from_pod6`); or
/// to the host stack, when it is for no pod or its hop limit is spent (the kernel then
/// sends the time exceeded).
#[inline(never)]
pub fn forward(ctx: &TcContext) -> u64 {
    match try_forward(ctx) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_forward(ctx: &TcContext) -> Result<Outcome, Outcome> {
    let scratch = scratch().ok_or(DropReason::HelperFailed)?;
    if scratch.hop_limit <= 1 {
        return Ok(Outcome::new(Outcome::PASS, 0));
    }
    if !scratch.has_dst {
        // A pod on another node, if a tunnel peer has its address; the host stack
        // otherwise.
        return Ok(Outcome(crate::tunnel::from_pod6(ctx, scratch.hop_limit)));
    }
    let dst = scratch.dst;
    let eth: *mut EthHdr = packet::header(ctx, 0).ok_or(DropReason::InvalidIpv6Header)?;
    let ip: *mut Ipv6Hdr = packet::header(ctx, ETH_HLEN).ok_or(DropReason::InvalidIpv6Header)?;
    // SAFETY: `header` checked that both headers lie within the packet. IPv6 has no
    // header checksum to update.
    unsafe {
        (*ip).hop_limit = scratch.hop_limit - 1;
        (*eth).dst = dst.pod_mac;
        (*eth).src = dst.host_mac;
    }
    crate::redirect_to_pod(ctx, &dst)?;
    Ok(Outcome::new(Outcome::POD, dst.ifindex))
}

/// Turns a neighbour solicitation for the gateway into the advertisement answering it,
/// in place, and sends it back to the pod: "fe80::1 is at the host veth's MAC". To the
/// solicitation's source (solicited), or to all nodes when it came from `::` (a DAD
/// probe, which is answered unsolicited, RFC 4861 section 7.2.4). Never inlined, as
/// rare as it is.
#[inline(never)]
pub fn answer_solicitation(ctx: &TcContext, ifindex: u32, iface: &EndpointIface) -> u64 {
    match try_answer(ctx, ifindex, iface) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_answer(ctx: &TcContext, ifindex: u32, iface: &EndpointIface) -> Result<Outcome, Outcome> {
    const LEN: usize = size_of::<NeighbourAdvert>();
    let source = ctx
        .load::<Ip6>(ETH_HLEN + 8)
        .map_err(|_| DropReason::InvalidIpv6Header)?;
    let (dst_ip, dst_mac, flags) = if source.is_unspecified() {
        (ALL_NODES, ALL_NODES_MAC, NA_ROUTER | NA_OVERRIDE)
    } else {
        (
            source,
            iface.pod_mac,
            NA_ROUTER | NA_SOLICITED | NA_OVERRIDE,
        )
    };
    // The advertisement has exactly one option; the solicitation may have had none, or
    // more.
    if ctx.len() as usize != LEN {
        // SAFETY: a plain helper call on the context the kernel passed.
        let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, LEN as u32, 0) };
        if ret != 0 {
            return Err(DropReason::HelperFailed.into());
        }
    }
    pull_or(ctx, LEN, DropReason::HelperFailed)?;
    let na: *mut NeighbourAdvert = packet::header(ctx, 0).ok_or(DropReason::HelperFailed)?;
    let host_mac = iface.host_mac;
    // SAFETY: `header` checked that the whole advertisement lies within the packet.
    unsafe {
        (*na).eth.dst = dst_mac;
        (*na).eth.src = host_mac;
        (*na).ip.version_tc_flow = [0x60, 0, 0, 0];
        (*na).ip.payload_len = ((LEN - ETH_HLEN - IPV6_HLEN) as u16).to_be_bytes();
        (*na).ip.next_header = IPPROTO_ICMPV6;
        (*na).ip.hop_limit = 255;
        (*na).ip.saddr = GATEWAY6;
        (*na).ip.daddr = dst_ip.0;
        (*na).icmp_type = ICMPV6_NEIGH_ADVERT;
        (*na).icmp_code = 0;
        (*na).checksum = [0, 0];
        (*na).flags = [flags, 0, 0, 0];
        (*na).target = GATEWAY6;
        (*na).opt_type = 2;
        (*na).opt_len = 1;
        (*na).opt_mac = host_mac;
        (*na).checksum = na_checksum(&dst_ip, flags, &host_mac).to_be_bytes();
    }
    // Back out of the same veth, which delivers it to the pod.
    // SAFETY: a plain helper call with scalar arguments.
    let ret = unsafe { bpf_redirect(ifindex, 0) };
    if ret != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::HelperFailed.into());
    }
    Ok(Outcome::new(Outcome::ANSWERED, 0))
}

/// The ICMPv6 checksum (RFC 4443 section 2.3) of the advertisement `answer_solicitation`
/// builds: from `fe80::1` to `dst`, with `flags`, target `fe80::1` and the target
/// link-layer address `mac`, summed over the pseudo-header and the 32-byte message.
#[inline(always)]
fn na_checksum(dst: &Ip6, flags: u8, mac: &[u8; 6]) -> u16 {
    let dst = &dst.0;
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 16 {
        // Source and target are both the gateway.
        sum += 2 * u32::from(u16::from_be_bytes([GATEWAY6[i], GATEWAY6[i + 1]]));
        sum += u32::from(u16::from_be_bytes([dst[i], dst[i + 1]]));
        i += 2;
    }
    // Upper-layer length and next header, then the message: type and code, checksum
    // (zero), flags and reserved, target (above), option type and length, MAC.
    sum += 32 + u32::from(IPPROTO_ICMPV6);
    sum += u32::from(u16::from_be_bytes([ICMPV6_NEIGH_ADVERT, 0]));
    sum += u32::from(u16::from_be_bytes([flags, 0]));
    sum += u32::from(u16::from_be_bytes([2, 1]));
    sum += u32::from(u16::from_be_bytes([mac[0], mac[1]]));
    sum += u32::from(u16::from_be_bytes([mac[2], mac[3]]));
    sum += u32::from(u16::from_be_bytes([mac[4], mac[5]]));
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// `hypha_to_pod` for an IPv6 frame to the endpoint `iface` (which has
/// `ENDPOINT_F_IPV6`) on the host veth `ifindex`: the header checks and walk of
/// [`from_pod`], then the receiver's ingress policy; neighbour discovery (and multicast
/// listener discovery) between the pod and its host always passes. A `ROUTE` outcome
/// (always with `CHECK`) leaves the flow in the scratch for the receiver's ingress
/// policy.
#[inline(never)]
pub fn to_pod(ctx: &TcContext, iface: &EndpointIface) -> u64 {
    match try_to_pod(ctx, iface) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext, iface: &EndpointIface) -> Result<Outcome, Outcome> {
    let h = header(ctx)?;
    let upper = walk(ctx, h.next_header)?;
    let icmp_type = icmp_type(ctx, &upper);
    if is_link_control(icmp_type, &h.daddr) {
        return Ok(Outcome::new(Outcome::PASS, 0));
    }
    if iface.flags & policy::POLICY_FLAGS != 0 && !related(ctx, &upper, icmp_type) {
        let scratch = scratch().ok_or(DropReason::HelperFailed)?;
        scratch.flow = flow(ctx, &h, &upper, icmp_type);
        return Ok(Outcome::new(Outcome::ROUTE, Outcome::CHECK));
    }
    Ok(Outcome::new(Outcome::PASS, 0))
}
