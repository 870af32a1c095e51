//! Hypha's eBPF datapath: two TC programs attached (TCX) to the host side of each pod's
//! veth.
//!
//! - [`hypha_from_pod`] (TCX ingress: what the pod sends) answers the pod's ARP requests
//!   for its gateway, redirects IPv4 to pods on this node straight into their network
//!   namespace with `bpf_redirect_peer`, and hands everything else to the host stack.
//! - [`hypha_to_pod`] (TCX egress: what the host stack delivers to the pod) counts.
//!
//! The maps are declared here with the names in [`hypha_common::maps`]; their layouts
//! live in `hypha-common`, which also names every other reader.
#![no_std]
#![no_main]

mod packet;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT},
    helpers::generated::{bpf_redirect, bpf_redirect_peer},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuHashMap},
    programs::TcContext,
};
use hypha_common::{
    Counter, DIR_EGRESS, DropKey, DropReason, EndpointInfo, EndpointKey4, EndpointStats,
    MAX_DROP_COUNTERS, MAX_ENDPOINTS, NodeConfig, maps, programs,
};

use crate::{
    packet::{
        ARPHRD_ETHER, ARPOP_REPLY, ARPOP_REQUEST, ArpEthIpv4, ETH_HLEN, ETH_P_ARP, ETH_P_IP,
        ETH_P_IPV6, EthHdr, IPV4_CSUM_OFF, IPV4_MIN_HLEN, Ipv4Hdr, PullError,
    },
    stats::{count, count_drop},
};

// The maps are pinned by name (`PinningType::ByName`): the agent loads the object with
// its pin directory, so a restarted agent re-uses the maps, and with them the endpoints
// and counters, of the running datapath.

/// Pod IPv4 address → endpoint. Written by the agent.
#[map(name = "hypha_endpoints4")]
static ENDPOINTS4: HashMap<EndpointKey4, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);

/// Host-side ifindex → per-CPU counters. Entries are created by the agent only.
#[map(name = "hypha_ep_stats")]
static EP_STATS: PerCpuHashMap<u32, EndpointStats> = PerCpuHashMap::pinned(MAX_ENDPOINTS, 0);

/// (endpoint, reason, direction) → per-CPU drop counter. Entries are created here, on
/// the first drop of their kind.
#[map(name = "hypha_drops")]
static DROPS: PerCpuHashMap<DropKey, Counter> = PerCpuHashMap::pinned(MAX_DROP_COUNTERS, 0);

/// Index 0: node-wide settings. Written by the agent at start.
#[map(name = "hypha_config")]
static CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

// The attribute macros take literals, so tie them to the shared names at compile time.
const _: () = {
    assert!(str_eq(maps::ENDPOINTS4, "hypha_endpoints4"));
    assert!(str_eq(maps::EP_STATS, "hypha_ep_stats"));
    assert!(str_eq(maps::DROPS, "hypha_drops"));
    assert!(str_eq(maps::CONFIG, "hypha_config"));
    assert!(str_eq(programs::FROM_POD, "hypha_from_pod"));
    assert!(str_eq(programs::TO_POD, "hypha_to_pod"));
};

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// TCX ingress of the host-side veth: every frame the pod sends.
#[classifier]
pub fn hypha_from_pod(ctx: TcContext) -> i32 {
    match try_from_pod(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

/// TCX egress of the host-side veth: every frame the host stack delivers to the pod.
///
/// Frames another pod sends are not seen here: `bpf_redirect_peer` hands them to the
/// pod's interface directly. ARP replies made by [`hypha_from_pod`] are, since they are
/// redirected to this device's egress.
#[classifier]
pub fn hypha_to_pod(ctx: TcContext) -> i32 {
    // Policy will come here; for now everything the host delivers is accepted.
    count(skb_ifindex(&ctx), ctx.len(), |s| &mut s.ingress.passed);
    TC_ACT_OK
}

/// What to do with a frame the pod sent.
enum Forward {
    /// Hand it to the host stack (pod ↔ host, pod ↔ world with masquerade, and whatever
    /// the datapath does not route itself).
    Host,
    /// The frame was rewritten into an answer and sent back to the pod.
    Answered,
    /// The frame was redirected to the pod behind the host-side veth `ifindex`.
    Pod { ifindex: u32 },
}

fn try_from_pod(ctx: &TcContext) -> Result<i32, i32> {
    // At the ingress hook the skb's device is the host-side veth, which is how
    // `hypha_ep_stats` and `hypha_drops` know the endpoint.
    let ifindex = skb_ifindex(ctx);
    let bytes = ctx.len();
    match route_from_pod(ctx, ifindex) {
        Ok(Forward::Host) => {
            count(ifindex, bytes, |s| &mut s.egress.passed);
            Ok(TC_ACT_OK)
        }
        Ok(Forward::Answered) => {
            // The request did what it would have done in the host stack: got an answer.
            count(ifindex, bytes, |s| &mut s.egress.passed);
            Ok(TC_ACT_REDIRECT)
        }
        Ok(Forward::Pod { ifindex: dst }) => {
            count(ifindex, bytes, |s| &mut s.egress.redirected);
            count(dst, bytes, |s| &mut s.ingress.redirected);
            Ok(TC_ACT_REDIRECT)
        }
        Err(reason) => Err(count_drop(ctx, ifindex, DIR_EGRESS, reason, |s| {
            &mut s.egress.dropped
        })),
    }
}

fn route_from_pod(ctx: &TcContext, ifindex: u32) -> Result<Forward, DropReason> {
    // A frame without a whole Ethernet header has no EtherType to carry.
    pull_or(ctx, ETH_HLEN, DropReason::UnknownL3)?;
    let eth: *mut EthHdr = packet::header(ctx, 0).ok_or(DropReason::UnknownL3)?;
    // SAFETY: `header` checked that the Ethernet header lies within the packet.
    let ether_type = u16::from_be_bytes(unsafe { (*eth).ether_type });
    match ether_type {
        ETH_P_IP => route_ipv4(ctx),
        ETH_P_ARP => answer_arp(ctx, ifindex),
        // Not routed by the datapath yet: the host stack carries it.
        ETH_P_IPV6 => Ok(Forward::Host),
        _ => Err(DropReason::UnknownL3),
    }
}

/// Answers an ARP request for the gateway from a known endpoint on its own veth;
/// every other ARP frame goes to the host stack.
///
/// The pod's default route points at the gateway address, which the host holds on its
/// gateway device (loopback by default), not on the veth; answering here with the
/// host-side veth's MAC makes the pod send everything to the host veth, where this
/// program sees it, without waiting for the host stack's ARP.
fn answer_arp(ctx: &TcContext, ifindex: u32) -> Result<Forward, DropReason> {
    const ARP_FRAME_LEN: usize = ETH_HLEN + size_of::<ArpEthIpv4>();
    pull_or(ctx, ARP_FRAME_LEN, DropReason::InvalidArp)?;
    let eth: *mut EthHdr = packet::header(ctx, 0).ok_or(DropReason::InvalidArp)?;
    let arp: *mut ArpEthIpv4 = packet::header(ctx, ETH_HLEN).ok_or(DropReason::InvalidArp)?;

    // SAFETY: `header` checked that both headers lie within the packet, and nothing
    // below calls a helper that could move the packet data.
    unsafe {
        let is_eth_ipv4_request = u16::from_be_bytes((*arp).htype) == ARPHRD_ETHER
            && u16::from_be_bytes((*arp).ptype) == ETH_P_IP
            && (*arp).hlen == 6
            && (*arp).plen == 4
            && u16::from_be_bytes((*arp).oper) == ARPOP_REQUEST;
        if !is_eth_ipv4_request {
            return Ok(Forward::Host);
        }
        let target = EndpointKey4::from_octets((*arp).tpa);
        let Some(config) = CONFIG.get(0) else {
            return Ok(Forward::Host);
        };
        if target.addr != config.gateway {
            return Ok(Forward::Host);
        }
        // Only an endpoint asking from its own veth gets an answer: a request from
        // anyone else (or a spoofed sender address) is left to the host stack.
        let sender = EndpointKey4::from_octets((*arp).spa);
        let Some(endpoint) = ENDPOINTS4.get(sender) else {
            return Ok(Forward::Host);
        };
        if endpoint.ifindex != ifindex {
            return Ok(Forward::Host);
        }
        let host_mac = endpoint.host_mac;

        // Turn the request into the reply in place: "gateway is at host_mac".
        let requester_mac = (*arp).sha;
        let requester_ip = (*arp).spa;
        let gateway_ip = (*arp).tpa;
        (*arp).oper = ARPOP_REPLY.to_be_bytes();
        (*arp).sha = host_mac;
        (*arp).spa = gateway_ip;
        (*arp).tha = requester_mac;
        (*arp).tpa = requester_ip;
        (*eth).dst = (*eth).src;
        (*eth).src = host_mac;
    }

    // Back out of the same veth, which delivers it to the pod.
    // SAFETY: a plain helper call with scalar arguments.
    let ret = unsafe { bpf_redirect(ifindex, 0) };
    if ret != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::HelperFailed);
    }
    Ok(Forward::Answered)
}

/// Redirects IPv4 to a pod on this node; everything else goes to the host stack.
///
/// Routing is on the destination address alone, so IP options and fragments travel
/// like any other packet.
fn route_ipv4(ctx: &TcContext) -> Result<Forward, DropReason> {
    pull_or(ctx, ETH_HLEN + IPV4_MIN_HLEN, DropReason::InvalidIpv4Header)?;
    let eth: *mut EthHdr = packet::header(ctx, 0).ok_or(DropReason::InvalidIpv4Header)?;
    let ip: *mut Ipv4Hdr = packet::header(ctx, ETH_HLEN).ok_or(DropReason::InvalidIpv4Header)?;

    // SAFETY: `header` checked that both headers lie within the packet; the only helper
    // that moves packet data (`l3_csum_replace`) is called after the last access.
    let (dst, old_word, new_word) = unsafe {
        let version = (*ip).version_ihl >> 4;
        let ihl = usize::from((*ip).version_ihl & 0x0f);
        if version != 4 || ihl < 5 {
            return Err(DropReason::MalformedIpv4);
        }
        // The options need not be in the linear data (nothing reads them), only in the
        // frame.
        if (ctx.len() as usize) < ETH_HLEN + ihl * 4 {
            return Err(DropReason::InvalidIpv4Header);
        }

        let Some(dst) = ENDPOINTS4.get(EndpointKey4::from_octets((*ip).daddr)) else {
            return Ok(Forward::Host);
        };
        // The kernel sends the ICMP time exceeded.
        let ttl = (*ip).ttl;
        if ttl <= 1 {
            return Ok(Forward::Host);
        }

        // TTL shares a 16-bit word of the header with the protocol; the checksum is
        // updated for that word, as it sits in the packet.
        let protocol = (*ip).protocol;
        let old_word = u16::from_ne_bytes([ttl, protocol]);
        let new_word = u16::from_ne_bytes([ttl - 1, protocol]);
        (*ip).ttl = ttl - 1;
        (*eth).dst = dst.pod_mac;
        (*eth).src = dst.host_mac;
        (*dst, old_word, new_word)
    };

    ctx.l3_csum_replace(
        IPV4_CSUM_OFF,
        u64::from(old_word),
        u64::from(new_word),
        size_of::<u16>() as u64,
    )
    .map_err(|_| DropReason::HelperFailed)?;

    // Straight into the destination pod's namespace, skipping the host stack and the
    // host-side veth's egress.
    // SAFETY: a plain helper call with scalar arguments.
    let ret = unsafe { bpf_redirect_peer(dst.ifindex, 0) };
    if ret != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::HelperFailed);
    }
    Ok(Forward::Pod {
        ifindex: dst.ifindex,
    })
}

/// [`packet::pull`], with a short packet dropped for `short` and a failed pull for
/// [`DropReason::HelperFailed`].
#[inline(always)]
fn pull_or(ctx: &TcContext, len: usize, short: DropReason) -> Result<(), DropReason> {
    packet::pull(ctx, len).map_err(|e| match e {
        PullError::Short => short,
        PullError::Helper => DropReason::HelperFailed,
    })
}

/// The ifindex of the device the skb is on: at both hooks, the host-side veth.
#[inline(always)]
fn skb_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed in; `ifindex` is
    // a readable field of `__sk_buff`.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // eBPF programs cannot panic (the verifier rejects any path that would reach
    // here); this only satisfies `no_std`.
    loop {}
}
