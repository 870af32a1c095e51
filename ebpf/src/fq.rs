//! `hypha_flow_class`: the classifier of the per-flow queues under a bandwidth limit (see
//! `agent/src/bandwidth.rs`). A `cls_bpf` filter in classic mode on Hypha's `htb` root
//! qdisc: the return value is the class id of the leaf the packet queues in, so each flow
//! waits only behind its own packets and `htb` shares the limit round-robin between
//! active flows.
//!
//! Classic rather than direct-action mode (setting `skb->tc_classid`): the class is the
//! return value, which `BPF_PROG_TEST_RUN` reports, so the tests see exactly what the
//! qdisc gets; and there is no verdict to get wrong (the filter only classifies).
//!
//! The flow is hashed (MurmurHash3's mixing, a fixed seed) over:
//! - IPv4 and IPv6 TCP, UDP and SCTP: addresses, protocol and ports;
//! - IPv4 fragments (MF or an offset), IPv6 packets whose first next header is not one of
//!   those (a fragment header, other extension headers, ICMP, ...), other IPv4
//!   protocols: addresses and protocol only, so every fragment of a datagram lands in
//!   the same class and keeps its order;
//! - anything else (ARP, non-IP) and packets too short for their headers: leaf 0.
//!
//! The hash is per direction (a flow's two directions need not share a class: they are
//! shaped on different interfaces anyway) and has no secret: a pod could aim two of its
//! own flows at one class, which only costs that pod.

use aya_ebpf::{macros::classifier, programs::TcContext};
use hypha_common::{
    fq::{DEFAULT_QUEUES, QUEUES_GLOBAL, leaf_classid},
    programs,
};

use crate::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6};

const _: () = assert!(crate::str_eq(programs::FLOW_CLASS, "hypha_flow_class"));

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
/// IPv4 `frag_off`: the MF flag and the offset (not DF).
const IP_MF_OFFSET: u16 = 0x3fff;
const SEED: u32 = 0x4859_7170;

/// How many leaf classes the agent's `htb` trees have (`--fq-queues`): set by the agent
/// when it loads the object (aya's `override_global`, symbol [`QUEUES_GLOBAL`]); the default
/// is what the tests' loads see.
#[unsafe(no_mangle)]
static HYPHA_FQ_QUEUES: u32 = DEFAULT_QUEUES as u32;

const _: () = assert!(crate::str_eq(QUEUES_GLOBAL, "HYPHA_FQ_QUEUES"));

/// Classifier of Hypha's `htb` root qdisc: returns the leaf class of the packet's flow.
#[classifier]
pub fn hypha_flow_class(ctx: TcContext) -> i32 {
    let leaf = try_flow_class(&ctx).unwrap_or(0);
    leaf_classid(leaf) as i32
}

/// The packet's leaf (`0..HYPHA_FQ_QUEUES`); `Err` when a header is cut short.
fn try_flow_class(ctx: &TcContext) -> Result<u16, i64> {
    let ether_type = u16::from_be(ctx.load::<u16>(12)?);
    let hash = match ether_type {
        ETH_P_IP => hash4(ctx)?,
        ETH_P_IPV6 => hash6(ctx)?,
        _ => return Ok(0),
    };
    // Read at run time: a plain read would be folded into the default at compile time.
    let queues = unsafe { core::ptr::read_volatile(&HYPHA_FQ_QUEUES) }.max(1);
    Ok((fmix(hash) % queues) as u16)
}

fn hash4(ctx: &TcContext) -> Result<u32, i64> {
    let version_ihl = ctx.load::<u8>(ETH_HLEN)?;
    let frag_off = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6)?);
    let proto = ctx.load::<u8>(ETH_HLEN + 9)?;
    let saddr = ctx.load::<u32>(ETH_HLEN + 12)?;
    let daddr = ctx.load::<u32>(ETH_HLEN + 16)?;
    let mut h = mix(SEED, saddr);
    h = mix(h, daddr);
    h = mix(h, u32::from(proto));
    if frag_off & IP_MF_OFFSET == 0 && has_ports(proto) {
        let ihl = usize::from(version_ihl & 0x0f) * 4;
        if ihl < 20 {
            return Err(0);
        }
        h = mix(h, ctx.load::<u32>(ETH_HLEN + ihl)?);
    }
    Ok(h)
}

fn hash6(ctx: &TcContext) -> Result<u32, i64> {
    let next = ctx.load::<u8>(ETH_HLEN + 6)?;
    let addrs = ctx.load::<[u32; 8]>(ETH_HLEN + 8)?;
    let mut h = SEED;
    for w in addrs {
        h = mix(h, w);
    }
    h = mix(h, u32::from(next));
    if has_ports(next) {
        h = mix(h, ctx.load::<u32>(ETH_HLEN + 40)?);
    }
    Ok(h)
}

fn has_ports(proto: u8) -> bool {
    matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
}

/// One MurmurHash3 (x86, 32-bit) block.
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// MurmurHash3's finaliser: every input bit reaches the low bits the class is taken from.
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
