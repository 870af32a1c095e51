//! Frame layouts and bounds-checked access to the packet.
//!
//! Every header is a `#[repr(C)]` struct of bytes (alignment 1, no padding), so a field
//! read is a plain byte load whatever the packet's alignment, and multi-byte fields
//! stay in network byte order until someone explicitly converts them.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use hypha_common::DropReason;

/// Length of an Ethernet header without VLAN tags.
pub const ETH_HLEN: usize = size_of::<EthHdr>();
/// Length of an IPv4 header without options.
pub const IPV4_MIN_HLEN: usize = size_of::<Ipv4Hdr>();

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

/// ARP `htype` of Ethernet.
pub const ARPHRD_ETHER: u16 = 1;
pub const ARPOP_REQUEST: u16 = 1;
pub const ARPOP_REPLY: u16 = 2;

/// Offset of the IPv4 header checksum from the start of the frame.
pub const IPV4_CSUM_OFF: usize = ETH_HLEN + 10;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

/// An ARP packet for Ethernet hardware and IPv4 protocol addresses (RFC 826), the only
/// kind the datapath answers.
#[repr(C)]
pub struct ArpEthIpv4 {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub oper: [u8; 2],
    /// Sender hardware address.
    pub sha: [u8; 6],
    /// Sender protocol address.
    pub spa: [u8; 4],
    /// Target hardware address.
    pub tha: [u8; 6],
    /// Target protocol address.
    pub tpa: [u8; 4],
}

/// The fixed 20 bytes of an IPv4 header; options, if any, follow.
#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// A TCP header without options.
#[repr(C)]
pub struct TcpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: [u8; 4],
    pub ack_seq: [u8; 4],
    /// The data offset (high 4 bits), then the flags.
    pub doff_flags: [u8; 2],
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg_ptr: [u8; 2],
}

/// Why the first bytes of a packet could not be made directly accessible.
pub enum PullError {
    /// The packet is shorter than asked for.
    Short,
    /// The packet is long enough but `bpf_skb_pull_data` failed.
    Helper,
}

/// Makes the first `len` bytes of the packet directly accessible through
/// `ctx.data()..ctx.data_end()`.
///
/// Headers are almost always in the linear part already; when they are not (a frame
/// built from fragments), `bpf_skb_pull_data` moves them there. Telling the two
/// failures apart matters: a short packet is malformed, a failed pull is our problem.
///
/// The pull invalidates every packet pointer taken before it, so call this before
/// taking any with [`header`].
#[inline(always)]
pub fn pull(ctx: &TcContext, len: usize) -> Result<(), PullError> {
    if ctx.data() + len <= ctx.data_end() {
        return Ok(());
    }
    if (ctx.len() as usize) < len {
        return Err(PullError::Short);
    }
    ctx.pull_data(len as u32).map_err(|_| PullError::Helper)?;
    if ctx.data() + len <= ctx.data_end() {
        Ok(())
    } else {
        Err(PullError::Helper)
    }
}

/// [`pull`], with a short packet dropped for `short` and a failed pull for
/// [`DropReason::HelperFailed`].
#[inline(always)]
pub fn pull_or(ctx: &TcContext, len: usize, short: DropReason) -> Result<(), DropReason> {
    pull(ctx, len).map_err(|e| match e {
        PullError::Short => short,
        PullError::Helper => DropReason::HelperFailed,
    })
}

/// Takes one from the IPv4 packet's TTL, with the header checksum, as a router does
/// before it sends a packet on: `false`, the packet untouched, when the TTL is spent (1
/// or 0) and the packet must not be sent on. Every path that forwards a packet itself
/// (to a pod, into the tunnel, NodePort's) calls this. It pulls the header into the
/// linear data and its checksum helper moves packet data: take header pointers after.
#[inline(always)]
pub fn dec_ttl4(ctx: &TcContext) -> Result<bool, DropReason> {
    pull_or(ctx, ETH_HLEN + IPV4_MIN_HLEN, DropReason::InvalidIpv4Header)?;
    let ip: *mut Ipv4Hdr = header(ctx, ETH_HLEN).ok_or(DropReason::InvalidIpv4Header)?;
    // SAFETY: `header` checked that the IPv4 header lies within the packet; the only
    // helper that moves packet data (`l3_csum_replace`) is called after the last access.
    let (ttl, proto) = unsafe { ((*ip).ttl, (*ip).protocol) };
    if ttl <= 1 {
        return Ok(false);
    }
    // SAFETY: as above.
    unsafe { (*ip).ttl = ttl - 1 };
    // TTL shares a 16-bit word of the header with the protocol; the checksum is updated
    // for that word, as it sits in the packet.
    ctx.l3_csum_replace(
        IPV4_CSUM_OFF,
        u64::from(u16::from_ne_bytes([ttl, proto])),
        u64::from(u16::from_ne_bytes([ttl - 1, proto])),
        size_of::<u16>() as u64,
    )
    .map_err(|_| DropReason::HelperFailed)?;
    Ok(true)
}

/// [`dec_ttl4`] for IPv6's hop limit (no header checksum).
#[inline(always)]
pub fn dec_hop_limit6(ctx: &TcContext) -> Result<bool, DropReason> {
    pull_or(ctx, ETH_HLEN + IPV6_HLEN, DropReason::InvalidIpv6Header)?;
    let ip: *mut Ipv6Hdr = header(ctx, ETH_HLEN).ok_or(DropReason::InvalidIpv6Header)?;
    // SAFETY: `header` checked that the IPv6 header lies within the packet.
    unsafe {
        let hops = (*ip).hop_limit;
        if hops <= 1 {
            return Ok(false);
        }
        (*ip).hop_limit = hops - 1;
    }
    Ok(true)
}

/// A pointer to a `T` at `offset` from the start of the frame, if the whole `T` lies
/// within the packet's linear data.
///
/// The comparison against `data_end` is what lets the verifier accept the accesses
/// through the returned pointer, so it is done here, right where the pointer is made,
/// with constants the verifier can track.
#[inline(always)]
pub fn header<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Length of the fixed IPv6 header; extension headers, if any, follow.
pub const IPV6_HLEN: usize = size_of::<Ipv6Hdr>();

/// The fixed 40 bytes of an IPv6 header (RFC 8200).
#[repr(C)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class, flow label.
    pub version_tc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// A neighbour advertisement for the gateway as `hypha_from_pod` builds it, frame and
/// all: Ethernet, IPv6, the ICMPv6 message (RFC 4861 section 4.4) and its target
/// link-layer address option.
#[repr(C)]
pub struct NeighbourAdvert {
    pub eth: EthHdr,
    pub ip: Ipv6Hdr,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub checksum: [u8; 2],
    /// Router, Solicited, Override (the top three bits), then 29 reserved bits.
    pub flags: [u8; 4],
    pub target: [u8; 16],
    /// Option type 2 (target link-layer address).
    pub opt_type: u8,
    /// Option length in units of 8 bytes: 1.
    pub opt_len: u8,
    pub opt_mac: [u8; 6],
}
