//! Per-flow queues under one rate: an `htb` root qdisc whose one top class carries the
//! limit, leaf classes that share it, a `bfifo` on each leaf and a `cls_bpf` filter (in
//! classic mode: the program's return value is the class) that spreads flows over the
//! leaves. Pure message builders (unit-tested here) for the methods on
//! [`crate::Netlink`].
//!
//! netlink-packet-route 0.25 has no typed `htb` or `bfifo` options, so they are built
//! from the kernel's layout (`include/uapi/linux/pkt_sched.h`):
//!
//! - the qdisc: `TCA_HTB_INIT`, a `struct tc_htb_glob` (version 3, `rate2quantum`, the
//!   default class's minor);
//! - a class: `TCA_HTB_PARMS`, a `struct tc_htb_opt` (rate and ceil as `tc_ratespec`s
//!   with `TC_LINKLAYER_ETHERNET`, so no rate table is needed, as for `tbf`; `buffer` and
//!   `cbuffer` in scheduler ticks of 64 ns; `quantum` in bytes), with `TCA_HTB_RATE64`
//!   and `TCA_HTB_CEIL64`;
//! - `bfifo`: `TCA_OPTIONS` is not nested there but a bare `struct tc_fifo_qopt` (the
//!   limit in bytes).

use netlink_packet_core::DefaultNla;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcHeader, TcMessage, TcOption};

use crate::qdisc::HYPHA_QDISC_MAJOR;

/// `TCA_HTB_PARMS`: a `struct tc_htb_opt`.
const TCA_HTB_PARMS: u16 = 1;
/// `TCA_HTB_INIT`: a `struct tc_htb_glob`.
const TCA_HTB_INIT: u16 = 2;
/// `TCA_HTB_RATE64` and `TCA_HTB_CEIL64`: rates in bytes per second beyond 32 bits.
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;
/// `TCA_OPTIONS` at the top level of a tc message.
const TCA_OPTIONS: u16 = 2;
/// The `htb` version the kernel checks (`HTB_VER >> 16`).
const HTB_VERSION: u32 = 3;
/// `rate2quantum`: only used for classes without an explicit quantum (none of Hypha's).
const HTB_R2Q: u32 = 10;
/// `tc_ratespec::linklayer` for Ethernet: no rate table follows.
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// Size of `struct tc_ratespec`.
const RATESPEC_LEN: usize = 12;
/// Size of `struct tc_htb_opt`: two rate specs, then buffer, cbuffer, quantum, level,
/// prio.
const HTB_OPT_LEN: usize = 2 * RATESPEC_LEN + 20;
/// Nanoseconds in a scheduler tick (`PSCHED_SHIFT` 6).
const TICK_NS: u128 = 64;
/// The minor of the top class, which carries the limit.
pub const HTB_TOP_MINOR: u16 = 1;

/// An `htb` tree with `leaves` leaf classes sharing one rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtbSpec {
    /// The limit, in bytes per second (the top class's rate and ceil).
    pub rate_bytes_per_sec: u64,
    /// The top class's bucket in bytes: what may pass at line rate after an idle moment.
    pub burst_bytes: u32,
    /// How many leaf classes; leaf `i` has minor `leaf_minor_base + i`.
    pub leaves: u16,
    pub leaf_minor_base: u16,
    /// Each leaf's own guaranteed rate (what it sends without borrowing from the top
    /// class, ahead of borrowers) and its bucket, in bytes.
    pub leaf_rate_bytes_per_sec: u64,
    pub leaf_burst_bytes: u32,
    /// Bytes a leaf sends per round when leaves share what the top class lends.
    pub quantum: u32,
    /// Each leaf's `bfifo`, in bytes.
    pub leaf_limit_bytes: u32,
}

impl HtbSpec {
    /// The handle of leaf `i` (`4859:<base + i>`).
    pub fn leaf(&self, i: u16) -> TcHandle {
        TcHandle {
            major: HYPHA_QDISC_MAJOR,
            minor: self.leaf_minor_base + i,
        }
    }

    /// The top class (`4859:1`).
    pub fn top(&self) -> TcHandle {
        TcHandle {
            major: HYPHA_QDISC_MAJOR,
            minor: HTB_TOP_MINOR,
        }
    }
}

fn qdisc_handle() -> TcHandle {
    TcHandle {
        major: HYPHA_QDISC_MAJOR,
        minor: 0,
    }
}

fn header(index: u32, handle: TcHandle, parent: TcHandle) -> TcHeader {
    TcHeader {
        family: AddressFamily::Unspec,
        index: index as i32,
        handle,
        parent,
        info: 0,
    }
}

/// `RTM_NEWQDISC` of the `htb` root qdisc (`4859:`), whose default class is leaf 0 (what
/// the filter does not classify, or all of it while there is no filter).
pub(crate) fn htb_qdisc_message(index: u32, spec: &HtbSpec) -> TcMessage {
    let mut glob = [0u8; 20];
    glob[0..4].copy_from_slice(&HTB_VERSION.to_ne_bytes());
    glob[4..8].copy_from_slice(&HTB_R2Q.to_ne_bytes());
    glob[8..12].copy_from_slice(&u32::from(spec.leaf(0).minor).to_ne_bytes());
    TcMessage::from_parts(
        header(index, qdisc_handle(), TcHandle::ROOT),
        vec![
            TcAttribute::Kind("htb".to_owned()),
            TcAttribute::Options(vec![TcOption::Other(DefaultNla::new(
                TCA_HTB_INIT,
                glob.to_vec(),
            ))]),
        ],
    )
}

/// Scheduler ticks it takes to send `bytes` at `rate` bytes per second.
fn ticks(bytes: u32, rate: u64) -> u32 {
    let ns = u128::from(bytes) * 1_000_000_000 / u128::from(rate.max(1));
    u32::try_from(ns / TICK_NS).unwrap_or(u32::MAX)
}

/// The bytes of a `struct tc_htb_opt`.
pub(crate) fn htb_opt(rate: u64, burst: u32, ceil: u64, cburst: u32, quantum: u32) -> Vec<u8> {
    let mut b = vec![0u8; HTB_OPT_LEN];
    for (at, r) in [(0, rate), (RATESPEC_LEN, ceil)] {
        b[at + 1] = TC_LINKLAYER_ETHERNET;
        // The kernel refuses a zero 32-bit rate; the 64-bit attribute carries the real one.
        let r32 = u32::try_from(r.max(1)).unwrap_or(u32::MAX);
        b[at + 8..at + 12].copy_from_slice(&r32.to_ne_bytes());
    }
    let tail = 2 * RATESPEC_LEN;
    b[tail..tail + 4].copy_from_slice(&ticks(burst, rate).to_ne_bytes());
    b[tail + 4..tail + 8].copy_from_slice(&ticks(cburst, ceil).to_ne_bytes());
    b[tail + 8..tail + 12].copy_from_slice(&quantum.to_ne_bytes());
    // level (output only) and prio stay 0.
    b
}

fn class_message(
    index: u32,
    handle: TcHandle,
    parent: TcHandle,
    (rate, burst): (u64, u32),
    (ceil, cburst): (u64, u32),
    quantum: u32,
) -> TcMessage {
    TcMessage::from_parts(
        header(index, handle, parent),
        vec![
            TcAttribute::Kind("htb".to_owned()),
            TcAttribute::Options(vec![
                TcOption::Other(DefaultNla::new(
                    TCA_HTB_PARMS,
                    htb_opt(rate, burst, ceil, cburst, quantum),
                )),
                TcOption::Other(DefaultNla::new(
                    TCA_HTB_RATE64,
                    rate.max(1).to_ne_bytes().to_vec(),
                )),
                TcOption::Other(DefaultNla::new(
                    TCA_HTB_CEIL64,
                    ceil.max(1).to_ne_bytes().to_vec(),
                )),
            ]),
        ],
    )
}

/// `RTM_NEWTCLASS` of the top class: rate and ceil the limit, the bucket its burst.
pub(crate) fn top_class_message(index: u32, spec: &HtbSpec) -> TcMessage {
    let r = (spec.rate_bytes_per_sec, spec.burst_bytes);
    class_message(index, spec.top(), qdisc_handle(), r, r, spec.quantum)
}

/// `RTM_NEWTCLASS` of leaf `i`: its own rate and bucket, and the limit as its ceil (with
/// the top class's bucket).
pub(crate) fn leaf_class_message(index: u32, spec: &HtbSpec, i: u16) -> TcMessage {
    class_message(
        index,
        spec.leaf(i),
        spec.top(),
        (spec.leaf_rate_bytes_per_sec, spec.leaf_burst_bytes),
        (spec.rate_bytes_per_sec, spec.burst_bytes),
        spec.quantum,
    )
}

/// `RTM_NEWQDISC` of leaf `i`'s `bfifo` (handle 0: the kernel picks one when creating it;
/// with `NLM_F_CREATE|NLM_F_REPLACE` an existing `bfifo` there is changed in place).
pub(crate) fn leaf_fifo_message(index: u32, spec: &HtbSpec, i: u16) -> TcMessage {
    TcMessage::from_parts(
        header(index, TcHandle::UNSPEC, spec.leaf(i)),
        vec![
            TcAttribute::Kind("bfifo".to_owned()),
            TcAttribute::Other(DefaultNla::new(
                TCA_OPTIONS,
                spec.leaf_limit_bytes.to_ne_bytes().to_vec(),
            )),
        ],
    )
}

/// `RTM_GETTCLASS` dump of the classes of interface `index`.
pub(crate) fn class_dump_message(index: u32) -> TcMessage {
    TcMessage::from_parts(
        header(index, TcHandle::UNSPEC, TcHandle::UNSPEC),
        Vec::new(),
    )
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::Emitable;

    use super::*;
    use crate::qdisc::for_each_nla;

    fn spec() -> HtbSpec {
        HtbSpec {
            rate_bytes_per_sec: 1_250_000,
            burst_bytes: 6_250,
            leaves: 64,
            leaf_minor_base: 0x100,
            leaf_rate_bytes_per_sec: 19_531,
            leaf_burst_bytes: 3_028,
            quantum: 1_514,
            leaf_limit_bytes: 18_750,
        }
    }

    fn options(msg: &TcMessage) -> Vec<(u16, Vec<u8>)> {
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        let mut out = Vec::new();
        for_each_nla(&buf[20..], &mut |kind, value| {
            if kind == TCA_OPTIONS {
                for_each_nla(value, &mut |k, v| out.push((k, v.to_vec())));
            }
        });
        out
    }

    #[test]
    fn the_qdisc_is_the_root_with_hypha_s_handle_and_leaf_0_by_default() {
        let msg = htb_qdisc_message(7, &spec());
        assert_eq!(msg.header.index, 7);
        assert_eq!(msg.header.parent, TcHandle::ROOT);
        assert_eq!(u32::from(msg.header.handle), 0x4859_0000);
        let opts = options(&msg);
        assert_eq!(opts.len(), 1);
        let (kind, glob) = &opts[0];
        assert_eq!(*kind, TCA_HTB_INIT);
        assert_eq!(&glob[0..4], &3u32.to_ne_bytes(), "version");
        assert_eq!(&glob[8..12], &0x100u32.to_ne_bytes(), "defcls");
    }

    #[test]
    fn classes_carry_rate_ceil_buffers_in_ticks_and_quantum() {
        let top = top_class_message(7, &spec());
        assert_eq!(u32::from(top.header.handle), 0x4859_0001);
        assert_eq!(u32::from(top.header.parent), 0x4859_0000);
        let leaf = leaf_class_message(7, &spec(), 3);
        assert_eq!(u32::from(leaf.header.handle), 0x4859_0103);
        assert_eq!(u32::from(leaf.header.parent), 0x4859_0001);
        let opts = options(&leaf);
        assert_eq!(opts.len(), 3);
        let parms = &opts[0].1;
        assert_eq!(opts[0].0, TCA_HTB_PARMS);
        assert_eq!(parms.len(), 44);
        assert_eq!(parms[1], TC_LINKLAYER_ETHERNET);
        assert_eq!(&parms[8..12], &19_531u32.to_ne_bytes(), "rate");
        assert_eq!(&parms[20..24], &1_250_000u32.to_ne_bytes(), "ceil");
        // 6250 B at 1.25 MB/s = 5 ms = 78125 ticks.
        assert_eq!(&parms[28..32], &78_125u32.to_ne_bytes(), "cbuffer");
        assert_eq!(&parms[32..36], &1_514u32.to_ne_bytes(), "quantum");
        assert_eq!(
            opts[2],
            (TCA_HTB_CEIL64, 1_250_000u64.to_ne_bytes().to_vec())
        );
    }

    #[test]
    fn a_huge_rate_saturates_the_32_bit_fields() {
        let b = htb_opt(125_000_000_000, 1 << 20, 125_000_000_000, 1 << 20, 1514);
        assert_eq!(&b[8..12], &u32::MAX.to_ne_bytes());
        assert_eq!(&b[20..24], &u32::MAX.to_ne_bytes());
    }

    #[test]
    fn a_leaf_fifo_has_bare_options_under_its_class() {
        let msg = leaf_fifo_message(7, &spec(), 0);
        assert_eq!(u32::from(msg.header.parent), 0x4859_0100);
        assert_eq!(u32::from(msg.header.handle), 0);
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        let mut seen = Vec::new();
        for_each_nla(&buf[20..], &mut |kind, value| {
            seen.push((kind, value.to_vec()))
        });
        assert_eq!(seen[1], (TCA_OPTIONS, 18_750u32.to_ne_bytes().to_vec()));
    }
}
