//! Hypha's eBPF datapath: two TC programs attached (TCX) to the host side of each pod's
//! veth, and two to the node's VXLAN device in cluster tunnel mode.
//!
//! - [`hypha_from_pod`] (TCX ingress: what the pod sends) answers the pod's ARP requests
//!   for its gateway, redirects IPv4 to pods on this node straight into their network
//!   namespace with `bpf_redirect_peer`, sends what is for pods on other nodes into the
//!   tunnel (see `tunnel`), hands the rest of IPv4 and ARP to the host stack, and drops
//!   every family Hypha does not manage for the pod (see `family`).
//! - [`hypha_to_pod`] (TCX egress: what the host stack delivers to the pod) checks the
//!   family and the pod's ingress policy, and counts.
//! - [`hypha_from_tunnel`] and [`hypha_to_tunnel`] (TCX ingress and egress of the VXLAN
//!   device): what other nodes send, delivered to pods under their policy with the
//!   sender's identity from the VNI; what the host stack routes into the tunnel, keyed.
//! - `nodeport::hypha_from_netdev` (TCX ingress of the node's external devices): NodePort
//!   translation of what clients outside the node send, whose replies `hypha_from_pod`
//!   and `hypha_from_tunnel` translate back (see `nodeport`).
//!
//! The maps are declared here with the names in [`hypha_common::maps`]; their layouts
//! live in `hypha-common`, which also names every other reader.
#![no_std]
#![no_main]

mod debug;
mod family;
mod fq;
mod ipv6;
mod lb;
mod nodeport;
mod packet;
mod pmtu;
mod policy;
mod sock;
mod stats;
mod tunnel;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::generated::{bpf_redirect, bpf_redirect_peer},
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TcContext,
};
use hypha_common::{
    Counter, CtEntry, CtKey4, CtKey6, DIR_EGRESS, DIR_INGRESS, DropKey, DropReason,
    ENDPOINT_F_INGRESS_LIMIT, EVENTS_BYTES, EndpointIface, EndpointInfo, EndpointKey4,
    EndpointKey6, EndpointStats, EventBudget, IpcacheValue, MAX_CT_ENTRIES, MAX_DROP_COUNTERS,
    MAX_DROP_EVENT_BUDGETS, MAX_ENDPOINTS, MAX_IPCACHE, MAX_NODES, MAX_POLICIES,
    MAX_POLICY_ENTRIES, NodeConfig, NodeStats, PolicyEntry, PolicyKey, PolicyStats, RedirectSlot,
    TunnelConfig, TunnelPeer, maps, programs,
};

use crate::{
    family::Family,
    ipv6::Outcome,
    packet::{
        ARPHRD_ETHER, ARPOP_REPLY, ARPOP_REQUEST, ArpEthIpv4, ETH_HLEN, ETH_P_ARP, ETH_P_IP,
        ETH_P_IPV6, EthHdr, IPV4_MIN_HLEN, Ipv4Hdr, pull_or,
    },
    policy::{Flow4, Party},
    stats::{count, count_drop, count_node},
};

// The maps are pinned by name (`PinningType::ByName`): the agent loads the object with
// its pin directory, so a restarted agent re-uses the maps, and with them the endpoints
// and counters, of the running datapath.

/// Pod IPv4 address → endpoint. Written by the agent.
#[map(name = "hypha_endpoints4")]
static ENDPOINTS4: HashMap<EndpointKey4, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);

/// Pod IPv6 address → endpoint. Written by the agent.
#[map(name = "hypha_endpoints6")]
static ENDPOINTS6: HashMap<EndpointKey6, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);

/// Host-side ifindex → the endpoint behind the veth: its families, addresses, MACs and
/// policy flags. Written by the agent.
#[map(name = "hypha_ifaces")]
static IFACES: HashMap<u32, EndpointIface> = HashMap::pinned(MAX_ENDPOINTS, 0);

/// Host-side ifindex → per-CPU counters, per family. Entries are created by the agent
/// only.
#[map(name = "hypha_ep_stats_v3")]
static EP_STATS: PerCpuHashMap<u32, EndpointStats> = PerCpuHashMap::pinned(MAX_ENDPOINTS, 0);

/// (endpoint, reason, direction) → per-CPU drop counter. Entries are created here, on
/// the first drop of their kind.
#[map(name = "hypha_drops")]
static DROPS: PerCpuHashMap<DropKey, Counter> = PerCpuHashMap::pinned(MAX_DROP_COUNTERS, 0);

/// Index 0: node-wide settings. Written by the agent at start.
#[map(name = "hypha_config")]
static CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

/// Address (longest prefix) → security identity. Written by the agent.
#[map(name = "hypha_ipcache4")]
static IPCACHE4: LpmTrie<u32, IpcacheValue> = LpmTrie::pinned(MAX_IPCACHE, 0);

/// IPv6 address (longest prefix) → security identity. Written by the agent.
#[map(name = "hypha_ipcache6")]
static IPCACHE6: LpmTrie<[u8; 16], IpcacheValue> = LpmTrie::pinned(MAX_IPCACHE, 0);

/// Every endpoint's compiled policy. Written by the agent.
#[map(name = "hypha_policy")]
static POLICY: HashMap<PolicyKey, PolicyEntry> = HashMap::pinned(MAX_POLICY_ENTRIES, 0);

/// Connection tracking of the flows of endpoints that enforce a policy.
#[map(name = "hypha_ct4")]
static CT4: LruHashMap<CtKey4, CtEntry> = LruHashMap::pinned(MAX_CT_ENTRIES, 0);

/// Connection tracking of the IPv6 flows of endpoints that enforce a policy.
#[map(name = "hypha_ct6")]
static CT6: LruHashMap<CtKey6, CtEntry> = LruHashMap::pinned(MAX_CT_ENTRIES, 0);

/// Drop and policy-verdict events for `hypha monitor`.
#[map(name = "hypha_events_v2")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

/// Flows decided per policy, per CPU.
#[map(name = "hypha_policy_stats")]
static POLICY_STATS: PerCpuHashMap<u32, PolicyStats> = PerCpuHashMap::pinned(MAX_POLICIES, 0);

/// Index 0: the frame `hypha_from_pod` is redirecting, on this CPU, to a rate-limited
/// endpoint's host veth egress, for `hypha_to_pod` there to recognise (see
/// [`RedirectSlot`]).
#[map(name = "hypha_redirect")]
static REDIRECT: PerCpuArray<RedirectSlot> = PerCpuArray::pinned(1, 0);

/// What is left of each (endpoint, reason, direction)'s budget of drop events.
#[map(name = "hypha_drop_events")]
static DROP_EVENTS: LruHashMap<DropKey, EventBudget> =
    LruHashMap::pinned(MAX_DROP_EVENT_BUDGETS, 0);

/// Index 0: the node's tunnel (VXLAN device), all zero without one. Written by the
/// agent at start.
#[map(name = "hypha_tunnel_cfg")]
static TUNNEL_CONFIG: Array<TunnelConfig> = Array::pinned(1, 0);

/// Other nodes' IPv4 pod CIDRs (longest prefix) → the node to tunnel to. Written by
/// the agent from the cluster's nodes.
#[map(name = "hypha_tunnel4")]
static TUNNEL4: LpmTrie<u32, TunnelPeer> = LpmTrie::pinned(MAX_NODES, 0);

/// Other nodes' IPv6 pod CIDRs → the node to tunnel to.
#[map(name = "hypha_tunnel6")]
static TUNNEL6: LpmTrie<[u8; 16], TunnelPeer> = LpmTrie::pinned(MAX_NODES, 0);

/// Other nodes' IPv4 underlay addresses → node id: the outer sources the tunnel takes.
#[map(name = "hypha_nodes4")]
static NODES4: HashMap<u32, u32> = HashMap::pinned(MAX_NODES, 0);

/// Other nodes' IPv6 underlay addresses → node id.
#[map(name = "hypha_nodes6")]
static NODES6: HashMap<[u8; 16], u32> = HashMap::pinned(MAX_NODES, 0);

/// Node id → per-CPU tunnel counters. Entries are created by the agent only.
#[map(name = "hypha_node_stats")]
static NODE_STATS: PerCpuHashMap<u32, NodeStats> = PerCpuHashMap::pinned(MAX_NODES, 0);

// The attribute macros take literals, so tie them to the shared names at compile time.
const _: () = {
    assert!(str_eq(maps::ENDPOINTS4, "hypha_endpoints4"));
    assert!(str_eq(maps::ENDPOINTS6, "hypha_endpoints6"));
    assert!(str_eq(maps::IFACES, "hypha_ifaces"));
    assert!(str_eq(maps::EP_STATS, "hypha_ep_stats_v3"));
    assert!(str_eq(maps::DROPS, "hypha_drops"));
    assert!(str_eq(maps::CONFIG, "hypha_config"));
    assert!(str_eq(maps::IPCACHE4, "hypha_ipcache4"));
    assert!(str_eq(maps::IPCACHE6, "hypha_ipcache6"));
    assert!(str_eq(maps::POLICY, "hypha_policy"));
    assert!(str_eq(maps::CT4, "hypha_ct4"));
    assert!(str_eq(maps::CT6, "hypha_ct6"));
    assert!(str_eq(maps::EVENTS, "hypha_events_v2"));
    assert!(str_eq(maps::POLICY_STATS, "hypha_policy_stats"));
    assert!(str_eq(maps::REDIRECT, "hypha_redirect"));
    assert!(str_eq(maps::DROP_EVENTS, "hypha_drop_events"));
    assert!(str_eq(maps::TUNNEL_CONFIG, "hypha_tunnel_cfg"));
    assert!(str_eq(maps::TUNNEL4, "hypha_tunnel4"));
    assert!(str_eq(maps::TUNNEL6, "hypha_tunnel6"));
    assert!(str_eq(maps::NODES4, "hypha_nodes4"));
    assert!(str_eq(maps::NODES6, "hypha_nodes6"));
    assert!(str_eq(maps::NODE_STATS, "hypha_node_stats"));
    assert!(str_eq(programs::FROM_TUNNEL, "hypha_from_tunnel"));
    assert!(str_eq(programs::TO_TUNNEL, "hypha_to_tunnel"));
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
    let trace = debug::Trace::start(&ctx, debug::Hook::FromPod);
    let action = match try_from_pod(&ctx) {
        Ok(action) | Err(action) => action,
    };
    trace.verdict(&ctx, action);
    action
}

/// TCX egress of the host-side veth: every frame the host stack delivers to the pod.
///
/// Frames another pod sends are not seen here: `bpf_redirect_peer` hands them to the
/// pod's interface directly. ARP replies made by [`hypha_from_pod`] are, since they are
/// redirected to this device's egress, and so are frames from another pod to a pod with
/// an ingress rate limit (redirected to this egress to pass its qdisc): those were
/// counted and policy-checked at the sender's veth, and are recognised by the
/// `hypha_redirect` slot, which only the eBPF programs write (never by a mark).
#[classifier]
pub fn hypha_to_pod(ctx: TcContext) -> i32 {
    let trace = debug::Trace::start(&ctx, debug::Hook::ToPod);
    let action = match try_to_pod(&ctx) {
        Ok(action) | Err(action) => action,
    };
    trace.verdict(&ctx, action);
    action
}

/// TCX ingress of the node's VXLAN device: what other nodes send through the tunnel.
///
/// Accepts only known nodes as outer sources, takes the sender's identity from the VNI,
/// and delivers to local pods under their ingress policy (see `tunnel`); the rest goes to
/// the host stack.
#[classifier]
pub fn hypha_from_tunnel(ctx: TcContext) -> i32 {
    match tunnel::try_from_tunnel(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

/// TCX egress of the node's VXLAN device: what enters the tunnel. Gives what the host
/// stack routes there its tunnel key (see `tunnel`); what `hypha_from_pod` redirects
/// there has one already and passes untouched.
#[classifier]
pub fn hypha_to_tunnel(ctx: TcContext) -> i32 {
    match tunnel::try_to_tunnel(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_to_pod(ctx: &TcContext) -> Result<i32, i32> {
    let ifindex = skb_ifindex(ctx);
    if take_redirected(ifindex, ctx.len()) {
        return Ok(TC_ACT_OK);
    }
    // The host stack always builds a whole Ethernet header; anything shorter is not a
    // frame this pod can take.
    let ether_type = ether_type(ctx).map_err(|reason| {
        count_drop(ctx, ifindex, DIR_INGRESS, None, reason, |s| {
            &mut s.ingress.dropped
        })
    })?;
    let family = family::of(ether_type);
    let refuse = |reason| {
        count_drop(ctx, ifindex, DIR_INGRESS, family, reason, |s| {
            &mut s.ingress.dropped
        })
    };
    let (_, iface) = family::admit_to_pod(ifindex, ether_type).map_err(refuse)?;
    if ether_type == ETH_P_IPV6
        && let Some(iface) = iface
    {
        let outcome = Outcome(ipv6::to_pod(ctx, iface));
        match outcome.kind() {
            Outcome::PASS => {}
            Outcome::ROUTE => {
                let receiver = Party {
                    endpoint_id: iface.endpoint_id,
                    ifindex,
                    flags: iface.flags,
                };
                let scratch = ipv6::scratch().ok_or_else(|| refuse(DropReason::HelperFailed))?;
                if !policy::allow(ctx, &scratch.flow, None, Some(&receiver)) {
                    return Err(TC_ACT_SHOT);
                }
            }
            _ => return Err(refuse(outcome.reason())),
        }
    } else if ether_type == ETH_P_IP {
        pull_or(ctx, ETH_HLEN + IPV4_MIN_HLEN, DropReason::InvalidIpv4Header).map_err(refuse)?;
        if let Some((flow, receiver)) = to_pod_flow(ctx, ifindex)
            && policy::enforces(&receiver)
            && !icmp_error_of_tracked_flow(ctx, flow.proto)
            && !policy::allow(ctx, &flow, None, Some(&receiver))
        {
            return Err(TC_ACT_SHOT);
        }
    }
    count(ifindex, family, ctx.len(), |s| &mut s.ingress.passed);
    Ok(TC_ACT_OK)
}

/// The EtherType of the frame, once its Ethernet header is known to be whole and in the
/// linear data; a frame without a whole Ethernet header has no EtherType to carry.
#[inline(always)]
fn ether_type(ctx: &TcContext) -> Result<u16, DropReason> {
    pull_or(ctx, ETH_HLEN, DropReason::UnknownL3)?;
    let eth: *mut EthHdr = packet::header(ctx, 0).ok_or(DropReason::UnknownL3)?;
    // SAFETY: `header` checked that the Ethernet header lies within the packet.
    Ok(u16::from_be_bytes(unsafe { (*eth).ether_type }))
}

/// Whether the frame of `len` bytes on the egress of `ifindex` is the one
/// `hypha_from_pod` just redirected there on this CPU. Consumes the slot either way, so
/// it serves at most one frame.
#[inline(always)]
fn take_redirected(ifindex: u32, len: u32) -> bool {
    let Some(slot) = REDIRECT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU array slot from a successful lookup; a program runs to completion
    // on one CPU, so nobody else touches this CPU's copy meanwhile.
    let slot = unsafe { &mut *slot };
    if slot.ifindex == 0 {
        return false;
    }
    let ours = slot.ifindex == ifindex && slot.len == len;
    slot.ifindex = 0;
    slot.len = 0;
    ours
}

/// Records in this CPU's `hypha_redirect` slot that the frame of `len` bytes is being
/// redirected to the egress of `ifindex`.
#[inline(always)]
fn mark_redirected(ifindex: u32, len: u32) {
    if let Some(slot) = REDIRECT.get_ptr_mut(0) {
        // SAFETY: as in `take_redirected`.
        unsafe { *slot = RedirectSlot { ifindex, len } };
    }
}

/// The IPv4 flow of a packet the host delivers to the endpoint on `ifindex`, with that
/// endpoint; `None` for anything else (ARP, a frame the stack built for another
/// address), which passes as before.
#[inline(always)]
fn to_pod_flow(ctx: &TcContext, ifindex: u32) -> Option<(Flow4, Party)> {
    let eth: *mut EthHdr = packet::header(ctx, 0)?;
    // SAFETY: `header` checked the Ethernet header lies within the packet.
    if u16::from_be_bytes(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return None;
    }
    let ip: *mut Ipv4Hdr = packet::header(ctx, ETH_HLEN)?;
    // SAFETY: as above, for the IPv4 header.
    let (version_ihl, frag_off, proto, saddr, daddr) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).frag_off,
            (*ip).protocol,
            u32::from_ne_bytes((*ip).saddr),
            u32::from_ne_bytes((*ip).daddr),
        )
    };
    let info = endpoint(daddr)?;
    if info.ifindex != ifindex {
        return None;
    }
    let flow = l4_flow(ctx, version_ihl, frag_off, proto, saddr, daddr);
    Some((
        flow,
        Party {
            endpoint_id: info.endpoint_id,
            ifindex,
            flags: info.flags,
        },
    ))
}

/// Whether an IPv4 packet of protocol `proto` is an ICMP error (destination unreachable,
/// fragmentation needed included; time exceeded; parameter problem) quoting a flow
/// `hypha_ct4` tracks, either way: such an error is part of that flow and passes without
/// a policy lookup (path MTU discovery needs it); any other is a new ICMP flow.
#[inline(always)]
fn icmp_error_of_tracked_flow(ctx: &TcContext, proto: u8) -> bool {
    proto == policy::IPPROTO_ICMP && related_ipv4(ctx)
}

/// [`icmp_error_of_tracked_flow`] past the protocol check, in a frame of its own.
#[inline(never)]
fn related_ipv4(ctx: &TcContext) -> bool {
    let Ok(outer) = ctx.load::<[u8; 8]>(ETH_HLEN) else {
        return false;
    };
    // Only a first fragment (or a whole packet) has the ICMP header.
    if u16::from_be_bytes([outer[6], outer[7]]) & 0x1fff != 0 {
        return false;
    }
    let l4 = ETH_HLEN + usize::from(outer[0] & 0x0f) * 4;
    let Ok(icmp_type) = ctx.load::<u8>(l4) else {
        return false;
    };
    if !matches!(icmp_type, 3 | 11 | 12) {
        return false;
    }
    // The quoted packet starts after the 8-byte ICMP header: its IPv4 header, then at
    // least 8 bytes of its payload (the ports).
    let inner = l4 + 8;
    let Ok(ip) = ctx.load::<[u8; 20]>(inner) else {
        return false;
    };
    let mut quoted = Flow4 {
        saddr: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        daddr: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        sport: 0,
        dport: 0,
        proto: ip[9],
        tcp_flags: 0,
        echo: false,
        len: 0,
    };
    if policy::has_ports(quoted.proto) {
        let Ok(ports) = ctx.load::<[u8; 4]>(inner + usize::from(ip[0] & 0x0f) * 4) else {
            return false;
        };
        quoted.sport = u16::from_ne_bytes([ports[0], ports[1]]);
        quoted.dport = u16::from_ne_bytes([ports[2], ports[3]]);
    }
    policy::tracked(&quoted)
}

/// Completes a flow with its ports and TCP flags, read with `bpf_skb_load_bytes` (which
/// needs no linear data and keeps packet pointers valid). Fragments other than the first
/// carry no L4 header: their flow has no ports, so only port-less rules match them.
#[inline(always)]
fn l4_flow(
    ctx: &TcContext,
    version_ihl: u8,
    frag_off: [u8; 2],
    proto: u8,
    saddr: u32,
    daddr: u32,
) -> Flow4 {
    let mut flow = Flow4 {
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        proto,
        tcp_flags: 0,
        echo: false,
        len: ctx.len(),
    };
    let first_fragment = u16::from_be_bytes(frag_off) & 0x1fff == 0;
    if first_fragment && policy::has_ports(proto) {
        let l4 = ETH_HLEN + usize::from(version_ihl & 0x0f) * 4;
        if let Ok(ports) = ctx.load::<[u8; 4]>(l4) {
            flow.sport = u16::from_ne_bytes([ports[0], ports[1]]);
            flow.dport = u16::from_ne_bytes([ports[2], ports[3]]);
        }
        if proto == policy::IPPROTO_TCP
            && let Ok(flags) = ctx.load::<u8>(l4 + 13)
        {
            flow.tcp_flags = flags;
        }
    }
    flow
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
    /// The frame was redirected into the tunnel, to the node `node_id`.
    Tunnel { node_id: u32 },
    /// A NodePort reply, translated back and redirected out of the device `ifindex`.
    NodePort { ifindex: u32 },
}

fn try_from_pod(ctx: &TcContext) -> Result<i32, i32> {
    // At the ingress hook the skb's device is the host-side veth, which is how
    // `hypha_ep_stats` and `hypha_drops` know the endpoint.
    let ifindex = skb_ifindex(ctx);
    let bytes = ctx.len();
    let ether_type = ether_type(ctx).map_err(|reason| {
        count_drop(ctx, ifindex, DIR_EGRESS, None, reason, |s| {
            &mut s.egress.dropped
        })
    })?;
    // Counted in the family of the EtherType, whatever happens next.
    let family = family::of(ether_type);
    // Both families' routing answer with an `Outcome`, a plain integer: a `Result` of
    // enums with payloads, merged from many paths, leaves LLVM free to read a register
    // no path wrote for a variant without a payload, which the verifier refuses.
    let outcome = if ether_type == ETH_P_IPV6 {
        route_ipv6(ctx, ifindex)
    } else {
        Outcome(route_from_pod(ctx, ifindex, ether_type))
    };
    match outcome.kind() {
        Outcome::PASS => {
            count(ifindex, family, bytes, |s| &mut s.egress.passed);
            Ok(TC_ACT_OK)
        }
        Outcome::ANSWERED => {
            // The request did what it would have done in the host stack: got an answer.
            count(ifindex, family, bytes, |s| &mut s.egress.passed);
            Ok(TC_ACT_REDIRECT)
        }
        Outcome::NODEPORT => {
            // Out of the node, as through the host stack.
            count(ifindex, family, bytes, |s| &mut s.egress.passed);
            Ok(TC_ACT_REDIRECT)
        }
        Outcome::POD => {
            let dst = outcome.value();
            debug::note_redirect(ctx, ifindex, dst);
            count(ifindex, family, bytes, |s| &mut s.egress.redirected);
            count(dst, family, bytes, |s| &mut s.ingress.redirected);
            Ok(TC_ACT_REDIRECT)
        }
        Outcome::TUNNEL => {
            // A trace shows the VXLAN device as the target.
            debug::note_redirect(ctx, ifindex, tunnel::device());
            count(ifindex, family, bytes, |s| &mut s.egress.tunnel);
            count_node(outcome.value(), bytes, |s| &mut s.tx);
            Ok(TC_ACT_REDIRECT)
        }
        Outcome::DENIED => Err(TC_ACT_SHOT),
        _ => Err(count_drop(
            ctx,
            ifindex,
            DIR_EGRESS,
            family,
            outcome.reason(),
            |s| &mut s.egress.dropped,
        )),
    }
}

impl Outcome {
    /// The outcome of IPv4 or ARP routing.
    #[inline(always)]
    fn of(routed: Result<Forward, Refusal>) -> Self {
        match routed {
            Ok(Forward::Host) => Outcome::new(Outcome::PASS, 0),
            Ok(Forward::Answered) => Outcome::new(Outcome::ANSWERED, 0),
            Ok(Forward::Pod { ifindex }) => Outcome::new(Outcome::POD, ifindex),
            Ok(Forward::Tunnel { node_id }) => Outcome::new(Outcome::TUNNEL, node_id),
            Ok(Forward::NodePort { ifindex }) => Outcome::new(Outcome::NODEPORT, ifindex),
            Err(Refusal::Malformed(reason)) => Outcome::new(Outcome::DROP, reason as u32),
            Err(Refusal::Counted) => Outcome::new(Outcome::DENIED, 0),
        }
    }
}

/// Why a frame the pod sent goes no further.
enum Refusal {
    /// Malformed, spoofed or not forwardable: counted against the sender.
    Malformed(DropReason),
    /// Refused by a policy, and already counted and reported against the endpoint whose
    /// policy decided.
    Counted,
}

impl From<DropReason> for Refusal {
    fn from(reason: DropReason) -> Self {
        Refusal::Malformed(reason)
    }
}

/// Never inlined: the IPv4 routing has a stack frame of its own, not part of the one the
/// IPv6 path runs on.
#[inline(never)]
fn route_from_pod(ctx: &TcContext, ifindex: u32, ether_type: u16) -> u64 {
    Outcome::of(route_ipv4_or_arp(ctx, ifindex, ether_type)).0
}

#[inline(always)]
fn route_ipv4_or_arp(ctx: &TcContext, ifindex: u32, ether_type: u16) -> Result<Forward, Refusal> {
    let (family, iface) = family::admit_from_pod(ifindex, ether_type)?;
    match (family, ether_type) {
        (Family::Ipv4, ETH_P_IP) => route_ipv4(ctx, ifindex, iface),
        (Family::Ipv4, ETH_P_ARP) => Ok(answer_arp(ctx, ifindex, iface)?),
        // A managed family the datapath has no routing for.
        _ => Err(DropReason::UnsupportedFamily.into()),
    }
}

/// IPv6 from the pod on `ifindex`, routed by `ipv6::from_pod`.
#[inline(always)]
fn route_ipv6(ctx: &TcContext, ifindex: u32) -> Outcome {
    let iface = match family::admit_from_pod(ifindex, ETH_P_IPV6) {
        Ok((_, iface)) => iface,
        Err(reason) => return Outcome::new(Outcome::DROP, reason as u32),
    };
    let mut outcome = Outcome(ipv6::from_pod(ctx, iface));
    if outcome.kind() == Outcome::SOLICITATION {
        outcome = Outcome(ipv6::answer_solicitation(ctx, ifindex, iface));
    } else if outcome.kind() == Outcome::ROUTE {
        if outcome.value() == Outcome::CHECK {
            let Some(scratch) = ipv6::scratch() else {
                return Outcome::new(Outcome::DROP, DropReason::HelperFailed as u32);
            };
            let sender = Party {
                endpoint_id: iface.endpoint_id,
                ifindex,
                flags: iface.flags,
            };
            let receiver = scratch.has_dst.then_some(Party {
                endpoint_id: scratch.dst.endpoint_id,
                ifindex: scratch.dst.ifindex,
                flags: scratch.dst.flags,
            });
            if !policy::allow(ctx, &scratch.flow, Some(&sender), receiver.as_ref()) {
                return Outcome::new(Outcome::DENIED, 0);
            }
        }
        outcome = Outcome(ipv6::forward(ctx));
        if outcome.kind() == Outcome::PASS {
            // A NodePort reply of this pod is translated back and sent out (`nodeport`).
            outcome = Outcome(nodeport::reply6(ctx));
        }
    }
    outcome
}

/// Answers an ARP request for the gateway from a known endpoint on its own veth;
/// every other ARP frame goes to the host stack.
///
/// The pod's default route points at the gateway address, which the host holds on its
/// gateway device (loopback by default), not on the veth; answering here with the
/// host-side veth's MAC makes the pod send everything to the host veth, where this
/// program sees it, without waiting for the host stack's ARP.
fn answer_arp(ctx: &TcContext, ifindex: u32, iface: &EndpointIface) -> Result<Forward, DropReason> {
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
        // Only the endpoint asking from its own veth, with its own address, gets an
        // answer: a request from anyone else (or a spoofed sender address) is left to
        // the host stack.
        if EndpointKey4::from_octets((*arp).spa).addr != iface.addr4 {
            return Ok(Forward::Host);
        }
        let host_mac = iface.host_mac;

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

/// Redirects IPv4 to a pod on this node, or into the tunnel to a pod on another node
/// (`tunnel::from_pod4`); everything else goes to the host stack.
///
/// The sender must use its own address and MAC (anti-spoofing). When the sender or the
/// receiving pod enforces a policy, the flow is checked and tracked (see `policy`).
/// Routing is on the destination address alone, so IP options and fragments travel
/// like any other packet.
fn route_ipv4(ctx: &TcContext, ifindex: u32, iface: &EndpointIface) -> Result<Forward, Refusal> {
    pull_or(ctx, ETH_HLEN + IPV4_MIN_HLEN, DropReason::InvalidIpv4Header)?;
    let eth: *mut EthHdr = packet::header(ctx, 0).ok_or(DropReason::InvalidIpv4Header)?;
    let ip: *mut Ipv4Hdr = packet::header(ctx, ETH_HLEN).ok_or(DropReason::InvalidIpv4Header)?;

    // SAFETY: `header` checked that both headers lie within the packet. Nothing below
    // moves packet data before these reads.
    let (version_ihl, frag_off, proto, saddr, daddr, src_mac) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).frag_off,
            (*ip).protocol,
            u32::from_ne_bytes((*ip).saddr),
            u32::from_ne_bytes((*ip).daddr),
            (*eth).src,
        )
    };
    let version = version_ihl >> 4;
    let ihl = usize::from(version_ihl & 0x0f);
    if version != 4 || ihl < 5 {
        return Err(DropReason::MalformedIpv4.into());
    }
    // The options need not be in the linear data (nothing reads them), only in the frame.
    if (ctx.len() as usize) < ETH_HLEN + ihl * 4 {
        return Err(DropReason::InvalidIpv4Header.into());
    }

    // A pod sends only as itself: the address and MAC of the endpoint behind this veth.
    if saddr != iface.addr4 || src_mac != iface.pod_mac {
        return Err(DropReason::SpoofedSource.into());
    }
    let sender = Party {
        endpoint_id: iface.endpoint_id,
        ifindex,
        flags: iface.flags,
    };
    let dst = endpoint(daddr);
    let receiver = dst.map(|d| Party {
        endpoint_id: d.endpoint_id,
        ifindex: d.ifindex,
        flags: d.flags,
    });
    if (policy::enforces(&sender) || receiver.as_ref().is_some_and(policy::enforces))
        && !icmp_error_of_tracked_flow(ctx, proto)
    {
        let flow = l4_flow(ctx, version_ihl, frag_off, proto, saddr, daddr);
        if !policy::allow(ctx, &flow, Some(&sender), receiver.as_ref()) {
            return Err(Refusal::Counted);
        }
    }

    let Some(dst) = dst else {
        // A pod on another node, if a tunnel peer has the address; the host stack
        // otherwise.
        let outcome = Outcome(tunnel::from_pod4(ctx, daddr));
        return match outcome.kind() {
            Outcome::TUNNEL => Ok(Forward::Tunnel {
                node_id: outcome.value(),
            }),
            // Too big for the path: answered with an ICMP error (`pmtu`).
            Outcome::ANSWERED => Ok(Forward::Answered),
            Outcome::DROP => Err(outcome.reason().into()),
            // A NodePort reply of this pod is translated back and sent out (`nodeport`).
            _ => {
                let reply = Outcome(nodeport::reply4(ctx));
                match reply.kind() {
                    Outcome::NODEPORT => Ok(Forward::NodePort {
                        ifindex: reply.value(),
                    }),
                    Outcome::DROP => Err(reply.reason().into()),
                    _ => Ok(Forward::Host),
                }
            }
        };
    };
    // Spent: the kernel sends the ICMP time exceeded.
    if !packet::dec_ttl4(ctx)? {
        return Ok(Forward::Host);
    }
    let eth: *mut EthHdr = packet::header(ctx, 0).ok_or(DropReason::InvalidIpv4Header)?;
    // SAFETY: `header` checked the Ethernet header lies within the packet.
    unsafe {
        (*eth).dst = dst.pod_mac;
        (*eth).src = dst.host_mac;
    }
    redirect_to_pod(ctx, &dst)?;
    Ok(Forward::Pod {
        ifindex: dst.ifindex,
    })
}

/// Sends the frame, already rewritten for it, to the pod `dst`.
///
/// Straight into the destination pod's namespace, skipping the host stack and the
/// host-side veth's egress; unless the destination's ingress is rate limited: its
/// limiter is a qdisc on that egress, so the frame goes there (`bpf_redirect` to the
/// device's egress), recorded in this CPU's `hypha_redirect` slot so that
/// `hypha_to_pod`, which the redirect runs next on this CPU, lets it through untouched.
#[inline(always)]
fn redirect_to_pod(ctx: &TcContext, dst: &EndpointInfo) -> Result<(), DropReason> {
    let ret = if dst.flags & ENDPOINT_F_INGRESS_LIMIT != 0 {
        mark_redirected(dst.ifindex, ctx.len());
        // SAFETY: a plain helper call with scalar arguments.
        unsafe { bpf_redirect(dst.ifindex, 0) }
    } else {
        // SAFETY: a plain helper call with scalar arguments.
        unsafe { bpf_redirect_peer(dst.ifindex, 0) }
    };
    if ret != i64::from(TC_ACT_REDIRECT) {
        // No redirect follows: the slot must not vouch for the next frame on this CPU.
        take_redirected(0, 0);
        return Err(DropReason::HelperFailed);
    }
    Ok(())
}

/// The endpoint that has IPv4 address `addr` (network byte order), copied out of the map.
#[inline(always)]
fn endpoint(addr: u32) -> Option<EndpointInfo> {
    // SAFETY: the value is copied before any other map operation; the agent replaces
    // entries whole, so a copy is never torn in a way that matters to a single packet.
    unsafe { ENDPOINTS4.get(EndpointKey4 { addr }).copied() }
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
