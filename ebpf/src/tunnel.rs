//! The tunnel: pod traffic between nodes through the node's VXLAN device, in
//! collect-metadata (external) mode, with the sender's security identity as the VNI.
//!
//! - `hypha_from_pod` sends a pod's packet for another node's pod CIDR
//!   (`hypha_tunnel4/6`) into the tunnel ([`from_pod4`], [`from_pod6`]): the TTL or hop
//!   limit decremented, the tunnel key set (the peer's underlay address, VNI = the
//!   sender's identity) and redirected to the device; one too big for the path to the
//!   peer is answered with an ICMP error instead (see `pmtu`).
//! - [`try_to_tunnel`] (TCX egress of the device) gives what the host stack routes into
//!   the device (the host's own packets, forwarded ones, its ICMP errors) its key, with
//!   the identity of the inner source address as the VNI; what already has a key passes.
//! - [`try_from_tunnel`] (TCX ingress of the device) accepts only known nodes as outer
//!   sources (`hypha_nodes4/6`), maps the VNI to the source's identity (never looking
//!   the inner source address up), and delivers to a local pod under its ingress
//!   policy, or hands the packet to the host stack.
//!
//! VNI ↔ identity. A sender puts in the VNI: a label identity as it is, the host (1) as
//! it is, anything else (world, world6, CIDR identities, which do not fit in 24 bits or
//! mean nothing on another node) as world (2) for IPv4 or world6 (3) for IPv6. The
//! receiver reads: 1 → `IDENTITY_REMOTE_NODE` (the sender's host is a remote node
//! here), 2 and 3 as they are, a label identity as it is; anything else (0, 4..255) is
//! dropped `invalid-tunnel-identity`.
//!
//! Drops on the device (`hypha_drops` keyed by the device's ifindex; the device has no
//! `hypha_ep_stats_v3` entry):
//! - ingress: `unknown-tunnel-source` (no tunnel metadata at all, as under
//!   `BPF_PROG_TEST_RUN`, or an outer source no node has), `invalid-tunnel-identity`,
//!   `unknown-l3` (an inner frame neither IPv4 nor IPv6), the inner header checks of
//!   each family (`invalid-ipv4-header`, `malformed-ipv4`, `invalid-ipv6-header`, ...);
//!   a policy drop is counted against the receiving endpoint as on one node. Every
//!   drop after the node is known also counts in its `hypha_node_stats` `dropped`.
//! - egress: `no-tunnel-peer` (an inner destination no node's pod CIDR holds),
//!   `unknown-l3` (a frame neither IPv4 nor IPv6, such as ARP: the device is meant to
//!   be NOARP), `invalid-ipv4-header` / `invalid-ipv6-header` (cut short).

use aya_ebpf::{
    bindings::{
        BPF_F_TUNINFO_IPV6, BPF_F_ZERO_CSUM_TX, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_tunnel_key,
    },
    helpers::generated::{
        bpf_redirect, bpf_skb_change_type, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
    },
    maps::lpm_trie::Key,
    programs::TcContext,
};
use hypha_common::{
    DIR_EGRESS, DIR_INGRESS, DropReason, EndpointInfo, IDENTITY_FIRST_CIDR, IDENTITY_FIRST_LABELS,
    IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD, IDENTITY_WORLD6, PEER_F_IPV6, TunnelPeer,
};

use crate::{
    NODES4, NODES6, TUNNEL_CONFIG, TUNNEL4, TUNNEL6, debug, endpoint, ether_type, family,
    icmp_error_of_tracked_flow,
    ipv6::{self, Outcome},
    l4_flow, nodeport,
    packet::{self, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPV4_MIN_HLEN, Ipv4Hdr, Ipv6Hdr},
    pmtu,
    policy::{self, Addr, Ip6, Party},
    pull_or, redirect_to_pod, skb_ifindex,
    stats::{count, count_drop, count_node},
};

/// The TTL of the outer header.
const TUNNEL_TTL: u8 = 64;
/// `-EPROTO`: `bpf_skb_get_tunnel_key` asked for the other family's key.
const EPROTO: i64 = 71;
/// `skb->pkt_type` of a frame for this host.
const PACKET_HOST: u32 = 0;

/// The VNI a node sends for a source of `identity` in the family whose world is `world`.
#[inline(always)]
fn vni_of(identity: u32, world: u32) -> u32 {
    if identity == IDENTITY_HOST || (IDENTITY_FIRST_LABELS..IDENTITY_FIRST_CIDR).contains(&identity)
    {
        identity
    } else {
        world
    }
}

/// The identity of the source of a packet that came with `vni`, if a node may send it.
#[inline(always)]
fn identity_of_vni(vni: u32) -> Option<u32> {
    match vni {
        IDENTITY_HOST => Some(IDENTITY_REMOTE_NODE),
        IDENTITY_WORLD | IDENTITY_WORLD6 => Some(vni),
        v if (IDENTITY_FIRST_LABELS..IDENTITY_FIRST_CIDR).contains(&v) => Some(v),
        _ => None,
    }
}

/// The tunnel device's ifindex, 0 without a tunnel.
#[inline(always)]
pub fn device() -> u32 {
    TUNNEL_CONFIG.get(0).map_or(0, |c| c.ifindex)
}

/// Sets the packet's tunnel key: to `peer`'s underlay address, from this node's
/// (`hypha_tunnel_cfg`, the kernel's choice when zero), VNI `vni`, outer TTL 64. The
/// outer UDP checksum is left out over IPv4 (as the kernel's VXLAN does by default) and
/// kept over IPv6 (where a receiver takes a zero checksum only when told to). Returns
/// whether it was set. Never inlined: the key has a stack frame of its own.
#[inline(never)]
fn set_key(ctx: &TcContext, peer: &TunnelPeer, vni: u32) -> bool {
    // SAFETY: `bpf_tunnel_key` is plain data (integers and unions of integer arrays),
    // valid when zeroed.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    key.tunnel_ttl = TUNNEL_TTL;
    let config = TUNNEL_CONFIG.get(0);
    let flags = if peer.flags & PEER_F_IPV6 != 0 {
        // Both addresses in network order, as the packet has them.
        key.__bindgen_anon_1.remote_ipv6 = words(peer.addr6);
        if let Some(c) = config {
            key.__bindgen_anon_3.local_ipv6 = words(c.local6);
        }
        BPF_F_TUNINFO_IPV6
    } else {
        // The kernel takes the IPv4 addresses in host order (it converts them).
        key.__bindgen_anon_1.remote_ipv4 = u32::from_be(peer.addr4);
        if let Some(c) = config {
            key.__bindgen_anon_3.local_ipv4 = u32::from_be(c.local4);
        }
        BPF_F_ZERO_CSUM_TX
    };
    // SAFETY: the key lives on this stack frame for the call, with its size.
    let ret = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            size_of::<bpf_tunnel_key>() as u32,
            u64::from(flags),
        )
    };
    ret == 0
}

/// An IPv6 address as the four 32-bit words of `bpf_tunnel_key`, bytes unchanged.
#[inline(always)]
fn words(addr: [u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// `hypha_from_pod` for an IPv4 packet (already anti-spoof and policy checked) whose
/// destination `daddr` (network order) is no pod on this node: with a tunnel and a peer
/// holding the address, the TTL decremented, the tunnel key set (VNI: the sender's
/// identity in `hypha_ipcache4`) and redirected to the tunnel device, `TUNNEL` with the
/// peer's node id; `PASS` (to the host stack) otherwise, and when the TTL is spent (the
/// kernel sends the time exceeded).
#[inline(never)]
pub fn from_pod4(ctx: &TcContext, daddr: u32) -> u64 {
    match try_from_pod4(ctx, daddr) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_from_pod4(ctx: &TcContext, daddr: u32) -> Result<Outcome, Outcome> {
    let pass = Outcome::new(Outcome::PASS, 0);
    let device = device();
    if device == 0 {
        return Ok(pass);
    }
    let Some(peer) = TUNNEL4.get(Key::new(32, daddr)) else {
        return Ok(pass);
    };
    // Too big for the path to the peer: answered with "fragmentation needed".
    let mtu = pmtu::path_mtu(ctx, peer, false);
    if mtu != 0 {
        return Ok(Outcome(pmtu::answer4(ctx, mtu)));
    }
    let ip: *mut Ipv4Hdr = packet::header(ctx, ETH_HLEN).ok_or(DropReason::InvalidIpv4Header)?;
    // SAFETY: `header` checked that the IPv4 header lies within the packet; read before
    // `dec_ttl4` moves packet data.
    let saddr = unsafe { u32::from_ne_bytes((*ip).saddr) };
    if !packet::dec_ttl4(ctx)? {
        return Ok(pass);
    }
    encap(ctx, peer, vni_of(saddr.identity(), IDENTITY_WORLD), device)
}

/// Sets the key and redirects to the tunnel device (also `nodeport`, for a flow SNATed
/// to a backend on another node).
#[inline(always)]
pub(crate) fn encap(
    ctx: &TcContext,
    peer: &TunnelPeer,
    vni: u32,
    device: u32,
) -> Result<Outcome, Outcome> {
    let node_id = peer.node_id;
    if !set_key(ctx, peer, vni) {
        return Err(DropReason::HelperFailed.into());
    }
    // SAFETY: a plain helper call with scalar arguments.
    let ret = unsafe { bpf_redirect(device, 0) };
    if ret != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::HelperFailed.into());
    }
    Ok(Outcome::new(Outcome::TUNNEL, node_id))
}

/// [`from_pod4`] for IPv6, called by `ipv6::forward` (which checked that the hop limit,
/// `hop_limit`, is not spent) for a destination that is no pod on this node.
#[inline(never)]
pub fn from_pod6(ctx: &TcContext, hop_limit: u8) -> u64 {
    match try_from_pod6(ctx, hop_limit) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_from_pod6(ctx: &TcContext, hop_limit: u8) -> Result<Outcome, Outcome> {
    let pass = Outcome::new(Outcome::PASS, 0);
    let device = device();
    if device == 0 {
        return Ok(pass);
    }
    let [saddr, daddr] = ctx
        .load::<[Ip6; 2]>(ETH_HLEN + 8)
        .map_err(|_| DropReason::InvalidIpv6Header)?;
    let Some(peer) = TUNNEL6.get(Key::new(128, daddr.0)) else {
        return Ok(pass);
    };
    // Too big for the path to the peer: answered with "packet too big".
    let mtu = pmtu::path_mtu(ctx, peer, true);
    if mtu != 0 {
        return Ok(Outcome(pmtu::answer6(ctx, mtu)));
    }
    let ip: *mut Ipv6Hdr = packet::header(ctx, ETH_HLEN).ok_or(DropReason::HelperFailed)?;
    // SAFETY: `header` checked that the IPv6 header lies within the packet. IPv6 has no
    // header checksum to update.
    unsafe { (*ip).hop_limit = hop_limit - 1 };
    encap(ctx, peer, vni_of(saddr.identity(), IDENTITY_WORLD6), device)
}

/// TCX egress of the tunnel device.
pub fn try_to_tunnel(ctx: &TcContext) -> Result<i32, i32> {
    if has_key(ctx) {
        return Ok(TC_ACT_OK);
    }
    let ifindex = skb_ifindex(ctx);
    let bytes = ctx.len();
    let ether_type = ether_type(ctx).map_err(|reason| {
        count_drop(ctx, ifindex, DIR_EGRESS, None, reason, |s| {
            &mut s.egress.dropped
        })
    })?;
    let family = family::of(ether_type);
    let outcome = Outcome(encap_host(ctx, ether_type));
    if outcome.kind() == Outcome::TUNNEL {
        count_node(outcome.value(), bytes, |s| &mut s.tx);
        return Ok(TC_ACT_OK);
    }
    Err(count_drop(
        ctx,
        ifindex,
        DIR_EGRESS,
        family,
        outcome.reason(),
        |s| &mut s.egress.dropped,
    ))
}

/// Whether the packet carries a tunnel key (of either family) already.
#[inline(never)]
fn has_key(ctx: &TcContext) -> bool {
    // SAFETY: as in `set_key`.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: the key lives on this stack frame for the call, with its size.
    let ret = unsafe {
        bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, size_of::<bpf_tunnel_key>() as u32, 0)
    };
    // -EPROTO: an IPv6 key (asked for IPv4); -EINVAL: none.
    ret == 0 || ret == -EPROTO
}

/// The key for a packet the host stack routed into the tunnel: `TUNNEL` with the node
/// id, or `DROP`.
#[inline(never)]
fn encap_host(ctx: &TcContext, ether_type: u16) -> u64 {
    match try_encap_host(ctx, ether_type) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_encap_host(ctx: &TcContext, ether_type: u16) -> Result<Outcome, Outcome> {
    if ether_type == ETH_P_IP {
        if (ctx.len() as usize) < ETH_HLEN + IPV4_MIN_HLEN {
            return Err(DropReason::InvalidIpv4Header.into());
        }
        let [saddr, daddr] = ctx
            .load::<[u32; 2]>(ETH_HLEN + 12)
            .map_err(|_| DropReason::InvalidIpv4Header)?;
        let peer = TUNNEL4
            .get(Key::new(32, daddr))
            .ok_or(DropReason::NoTunnelPeer)?;
        encap_here(ctx, peer, vni_of(saddr.identity(), IDENTITY_WORLD))
    } else if ether_type == ETH_P_IPV6 {
        let [saddr, daddr] = ctx
            .load::<[Ip6; 2]>(ETH_HLEN + 8)
            .map_err(|_| DropReason::InvalidIpv6Header)?;
        let peer = TUNNEL6
            .get(Key::new(128, daddr.0))
            .ok_or(DropReason::NoTunnelPeer)?;
        encap_here(ctx, peer, vni_of(saddr.identity(), IDENTITY_WORLD6))
    } else {
        Err(DropReason::UnknownL3.into())
    }
}

/// Sets the key of a packet already on its way out of the tunnel device.
#[inline(always)]
fn encap_here(ctx: &TcContext, peer: &TunnelPeer, vni: u32) -> Result<Outcome, Outcome> {
    let node_id = peer.node_id;
    if !set_key(ctx, peer, vni) {
        return Err(DropReason::HelperFailed.into());
    }
    Ok(Outcome::new(Outcome::TUNNEL, node_id))
}

/// The sending node and the VNI of a packet from the tunnel, in one scalar: the node id
/// in the low 32 bits (0: no tunnel metadata, or an outer source that is no known node),
/// the VNI in the high 32.
#[inline(never)]
fn source(ctx: &TcContext) -> u64 {
    // SAFETY: as in `set_key`.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    let size = size_of::<bpf_tunnel_key>() as u32;
    // SAFETY: the key lives on this stack frame for the calls, with its size.
    let mut ret = unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, size, 0) };
    let node = if ret == 0 {
        // SAFETY: the union's IPv4 member, which the kernel wrote (in host order).
        let addr = u32::to_be(unsafe { key.__bindgen_anon_1.remote_ipv4 });
        // SAFETY: the value is copied out at once.
        unsafe { NODES4.get(addr).copied() }
    } else if ret == -EPROTO {
        // SAFETY: as above.
        ret = unsafe {
            bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, size, u64::from(BPF_F_TUNINFO_IPV6))
        };
        if ret == 0 {
            // SAFETY: the union's IPv6 member, which the kernel wrote (network order).
            let w = unsafe { key.__bindgen_anon_1.remote_ipv6 };
            let (a, b, c, d) = (
                w[0].to_ne_bytes(),
                w[1].to_ne_bytes(),
                w[2].to_ne_bytes(),
                w[3].to_ne_bytes(),
            );
            let addr = [
                a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
                d[2], d[3],
            ];
            // SAFETY: the value is copied out at once.
            unsafe { NODES6.get(addr).copied() }
        } else {
            None
        }
    } else {
        None
    };
    match node {
        Some(node) => u64::from(node) | u64::from(key.tunnel_id) << 32,
        None => 0,
    }
}

/// TCX ingress of the tunnel device.
pub fn try_from_tunnel(ctx: &TcContext) -> Result<i32, i32> {
    let ifindex = skb_ifindex(ctx);
    let source = source(ctx);
    let node = source as u32;
    if node == 0 {
        return Err(count_drop(
            ctx,
            ifindex,
            DIR_INGRESS,
            None,
            DropReason::UnknownTunnelSource,
            |s| &mut s.ingress.dropped,
        ));
    }
    let bytes = ctx.len();
    let refuse = |family, reason| {
        count_node(node, bytes, |s| &mut s.dropped);
        count_drop(ctx, ifindex, DIR_INGRESS, family, reason, |s| {
            &mut s.ingress.dropped
        })
    };
    let identity = identity_of_vni((source >> 32) as u32)
        .ok_or_else(|| refuse(None, DropReason::InvalidTunnelIdentity))?;
    let ether_type = ether_type(ctx).map_err(|reason| refuse(None, reason))?;
    let family = family::of(ether_type);
    let outcome = if ether_type == ETH_P_IP {
        Outcome(deliver4(ctx, identity))
    } else if ether_type == ETH_P_IPV6 {
        deliver6(ctx, identity)
    } else {
        Outcome::new(Outcome::DROP, DropReason::UnknownL3 as u32)
    };
    match outcome.kind() {
        Outcome::POD => {
            // A traced receiver's trace gets the packet, from the VXLAN device.
            debug::note_redirect(ctx, ifindex, outcome.value());
            count(outcome.value(), family, bytes, |s| &mut s.ingress.tunnel);
            count_node(node, bytes, |s| &mut s.rx);
            Ok(TC_ACT_REDIRECT)
        }
        Outcome::PASS => {
            // For this host: the inner destination MAC is the sending device's (the
            // device is NOARP), which would make the frame another host's.
            // SAFETY: a plain helper call on the context the kernel passed.
            unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
            count_node(node, bytes, |s| &mut s.rx);
            Ok(TC_ACT_OK)
        }
        Outcome::NODEPORT => {
            count_node(node, bytes, |s| &mut s.rx);
            Ok(TC_ACT_REDIRECT)
        }
        Outcome::DENIED => {
            count_node(node, bytes, |s| &mut s.dropped);
            Err(TC_ACT_SHOT)
        }
        _ => Err(refuse(family, outcome.reason())),
    }
}

/// An inner IPv4 packet from the source of `identity`: `POD` (delivered to the local
/// endpoint on the value's host veth), `PASS` (for no local endpoint: the host stack),
/// `DENIED` or `DROP`.
#[inline(never)]
fn deliver4(ctx: &TcContext, identity: u32) -> u64 {
    match try_deliver4(ctx, identity) {
        Ok(o) | Err(o) => o.0,
    }
}

#[inline(always)]
fn try_deliver4(ctx: &TcContext, identity: u32) -> Result<Outcome, Outcome> {
    pull_or(ctx, ETH_HLEN + IPV4_MIN_HLEN, DropReason::InvalidIpv4Header)?;
    let ip: *mut Ipv4Hdr = packet::header(ctx, ETH_HLEN).ok_or(DropReason::InvalidIpv4Header)?;
    // SAFETY: `header` checked that the IPv4 header lies within the packet.
    let (version_ihl, frag_off, proto, saddr, daddr) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).frag_off,
            (*ip).protocol,
            u32::from_ne_bytes((*ip).saddr),
            u32::from_ne_bytes((*ip).daddr),
        )
    };
    if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
        return Err(DropReason::MalformedIpv4.into());
    }
    let Some(dst) = endpoint(daddr) else {
        // A NodePort reply to this node's SNAT address is translated back and sent out
        // (`nodeport`); the rest goes to the host stack.
        return Ok(Outcome(nodeport::reply4(ctx)));
    };
    let receiver = Party {
        endpoint_id: dst.endpoint_id,
        ifindex: dst.ifindex,
        flags: dst.flags,
    };
    if policy::enforces(&receiver) && !icmp_error_of_tracked_flow(ctx, proto) {
        let flow = l4_flow(ctx, version_ihl, frag_off, proto, saddr, daddr);
        if !policy::allow_from(ctx, &flow, identity, &receiver) {
            return Ok(Outcome::new(Outcome::DENIED, 0));
        }
    }
    to_pod(ctx, &dst)
}

/// An inner IPv6 packet from the source of `identity`, as [`deliver4`].
#[inline(always)]
fn deliver6(ctx: &TcContext, identity: u32) -> Outcome {
    let outcome = Outcome(ipv6::from_tunnel(ctx));
    if outcome.kind() == Outcome::PASS {
        // As IPv4: a NodePort reply to this node's SNAT address is translated back and
        // sent out (`nodeport`); the rest goes to the host stack.
        return Outcome(nodeport::reply6(ctx));
    }
    if outcome.kind() != Outcome::ROUTE {
        return outcome;
    }
    let Some(scratch) = ipv6::scratch() else {
        return Outcome::new(Outcome::DROP, DropReason::HelperFailed as u32);
    };
    if outcome.value() == Outcome::CHECK {
        let receiver = Party {
            endpoint_id: scratch.dst.endpoint_id,
            ifindex: scratch.dst.ifindex,
            flags: scratch.dst.flags,
        };
        if !policy::allow_from(ctx, &scratch.flow, identity, &receiver) {
            return Outcome::new(Outcome::DENIED, 0);
        }
    }
    let dst = scratch.dst;
    match to_pod(ctx, &dst) {
        Ok(o) | Err(o) => o,
    }
}

/// Rewrites the frame's MACs for the pod `dst` (from its host veth) and sends it there.
#[inline(always)]
fn to_pod(ctx: &TcContext, dst: &EndpointInfo) -> Result<Outcome, Outcome> {
    let eth: *mut EthHdr = packet::header(ctx, 0).ok_or(DropReason::HelperFailed)?;
    // SAFETY: `header` checked that the Ethernet header lies within the packet.
    unsafe {
        (*eth).dst = dst.pod_mac;
        (*eth).src = dst.host_mac;
    }
    redirect_to_pod(ctx, dst)?;
    Ok(Outcome::new(Outcome::POD, dst.ifindex))
}
