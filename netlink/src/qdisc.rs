//! Queueing disciplines: the `tbf` root qdisc Hypha shapes a pod's traffic with, as pure
//! message builders and parsers (unit-tested here) for the methods on [`crate::Netlink`].
//!
//! netlink-packet-route 0.25 has no typed `tbf` options, so `TCA_OPTIONS` is built from
//! the kernel's layout (`include/uapi/linux/pkt_sched.h`): `TCA_TBF_PARMS` (a
//! `struct tc_tbf_qopt`), `TCA_TBF_RATE64` and `TCA_TBF_BURST`. No rate table
//! (`TCA_TBF_RTAB`) is sent: `tbf_change` only looks one up when the rate's link layer is
//! `TC_LINKLAYER_UNAWARE`, and computes the rate with `psched_ratecfg_precompute`, so
//! giving `TC_LINKLAYER_ETHERNET` and the 64-bit rate is all it needs. `TCA_TBF_BURST`
//! gives the bucket in bytes (the kernel derives the `buffer` time from it), which also
//! caps the largest packet that passes without being segmented.

use netlink_packet_core::{DefaultNla, Nla};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcHeader, TcMessage, TcOption, TcStats2};

/// `TCA_TBF_PARMS`: a `struct tc_tbf_qopt`.
const TCA_TBF_PARMS: u16 = 1;
/// `TCA_TBF_RATE64`: the rate in bytes per second, when it does not fit 32 bits (sent
/// always: simpler, and the kernel takes the larger of the two).
const TCA_TBF_RATE64: u16 = 4;
/// `TCA_TBF_BURST`: the bucket size in bytes.
const TCA_TBF_BURST: u16 = 6;
/// `tc_ratespec::linklayer` for Ethernet: tells the kernel no rate table follows.
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// Size of `struct tc_ratespec`.
const RATESPEC_LEN: usize = 12;
/// Size of `struct tc_tbf_qopt`: two rate specs, then `limit`, `buffer`, `mtu`.
const TBF_QOPT_LEN: usize = 2 * RATESPEC_LEN + 12;

/// The major number of the handle Hypha gives its root qdiscs (`4859:` = "HY"), so that
/// the agent recognises its own and never removes someone else's.
pub const HYPHA_QDISC_MAJOR: u16 = 0x4859;

/// A token bucket filter (`tbf`) to install as the root qdisc of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TbfSpec {
    /// Rate in bytes per second (at least 1).
    pub rate_bytes_per_sec: u64,
    /// Bucket size in bytes: what may pass at line rate after an idle period, and the
    /// largest packet that passes whole (larger GSO packets are segmented, larger
    /// others dropped); at least one full frame of the interface.
    pub burst_bytes: u32,
    /// Queue length in bytes: packets wait here for tokens; beyond it they are dropped.
    pub limit_bytes: u32,
}

/// The root qdisc of an interface, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qdisc {
    /// `tbf`, `noqueue`, `pfifo_fast`, ...
    pub kind: String,
    pub handle_major: u16,
    /// Packets and bytes it sent, and packets it dropped (queue full, or too large).
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
    /// Times a packet had to wait for tokens.
    pub overlimits: u64,
    /// `tbf` only: its rate in bytes per second and bucket in bytes, as the kernel
    /// reports them back (`None` for other kinds).
    pub tbf: Option<TbfSpec>,
}

impl Qdisc {
    /// Whether Hypha installed this qdisc (a `tbf` with Hypha's handle).
    pub fn is_hypha_tbf(&self) -> bool {
        self.kind == "tbf" && self.handle_major == HYPHA_QDISC_MAJOR
    }

    /// Whether Hypha installed this qdisc: its per-flow `htb` or an older agent's `tbf`,
    /// with Hypha's handle.
    pub fn is_hypha(&self) -> bool {
        matches!(self.kind.as_str(), "tbf" | "htb") && self.handle_major == HYPHA_QDISC_MAJOR
    }
}

/// The bytes of a `struct tc_tbf_qopt` for `spec`.
pub(crate) fn tbf_qopt(spec: &TbfSpec) -> [u8; TBF_QOPT_LEN] {
    let mut b = [0u8; TBF_QOPT_LEN];
    // rate: cell_log (u8), linklayer (u8), overhead (u16), cell_align (i16), mpu (u16),
    // rate (u32); the 32-bit rate saturates, TCA_TBF_RATE64 carries the real one.
    b[1] = TC_LINKLAYER_ETHERNET;
    let rate32 = u32::try_from(spec.rate_bytes_per_sec).unwrap_or(u32::MAX);
    b[8..12].copy_from_slice(&rate32.to_ne_bytes());
    // peakrate: all zero (no peak rate).
    let tail = 2 * RATESPEC_LEN;
    b[tail..tail + 4].copy_from_slice(&spec.limit_bytes.to_ne_bytes());
    // buffer (in scheduler ticks) and mtu stay zero: TCA_TBF_BURST replaces the buffer,
    // and mtu only matters with a peak rate.
    b
}

/// `RTM_NEWQDISC` of a `tbf` root qdisc with Hypha's handle on interface `index`; sent
/// with `NLM_F_CREATE|NLM_F_REPLACE`, it creates one or changes the existing one in place.
pub(crate) fn tbf_message(index: u32, spec: &TbfSpec) -> TcMessage {
    let options = vec![
        TcOption::Other(DefaultNla::new(TCA_TBF_PARMS, tbf_qopt(spec).to_vec())),
        TcOption::Other(DefaultNla::new(
            TCA_TBF_RATE64,
            spec.rate_bytes_per_sec.to_ne_bytes().to_vec(),
        )),
        TcOption::Other(DefaultNla::new(
            TCA_TBF_BURST,
            spec.burst_bytes.to_ne_bytes().to_vec(),
        )),
    ];
    TcMessage::from_parts(
        root_header(index, HYPHA_QDISC_MAJOR),
        vec![
            TcAttribute::Kind("tbf".to_owned()),
            TcAttribute::Options(options),
        ],
    )
}

/// `RTM_GETQDISC` or `RTM_DELQDISC` of the root qdisc of interface `index` (handle 0:
/// whatever is there; a handle: only that one).
pub(crate) fn root_qdisc_message(index: u32, handle_major: u16) -> TcMessage {
    TcMessage::from_parts(root_header(index, handle_major), Vec::new())
}

fn root_header(index: u32, handle_major: u16) -> TcHeader {
    TcHeader {
        family: AddressFamily::Unspec,
        index: index as i32,
        handle: TcHandle {
            major: handle_major,
            minor: 0,
        },
        parent: TcHandle::ROOT,
        info: 0,
    }
}

/// The root qdisc of interface `index` in an `RTM_NEWQDISC` answer, if it is one.
pub(crate) fn parse_root_qdisc(msg: &TcMessage, index: u32) -> Option<Qdisc> {
    if msg.header.index != index as i32 || msg.header.parent != TcHandle::ROOT {
        return None;
    }
    let mut q = Qdisc {
        kind: String::new(),
        handle_major: msg.header.handle.major,
        packets: 0,
        bytes: 0,
        drops: 0,
        overlimits: 0,
        tbf: None,
    };
    let mut tbf_options = None;
    for attr in &msg.attributes {
        match attr {
            TcAttribute::Kind(k) => q.kind = k.clone(),
            TcAttribute::Options(opts) => tbf_options = Some(opts),
            _ => {}
        }
    }
    (q.packets, q.bytes, q.drops, q.overlimits) = stats_of(msg);
    if q.kind == "tbf"
        && let Some(opts) = tbf_options
    {
        q.tbf = parse_tbf_options(opts);
    }
    Some(q)
}

/// Packets, bytes, drops and overlimits of a qdisc or class message: `TCA_STATS2`, the
/// newer and wider form, where present, else `TCA_STATS`.
pub(crate) fn stats_of(msg: &TcMessage) -> (u64, u64, u64, u64) {
    let mut out = (0, 0, 0, 0);
    for attr in &msg.attributes {
        if let TcAttribute::Stats(s) = attr {
            out = (
                u64::from(s.packets),
                s.bytes,
                u64::from(s.drops),
                u64::from(s.overlimits),
            );
        }
    }
    for attr in &msg.attributes {
        if let TcAttribute::Stats2(stats) = attr {
            for s in stats {
                match s {
                    TcStats2::Basic(b) => {
                        out.1 = b.bytes;
                        out.0 = u64::from(b.packets);
                    }
                    TcStats2::Queue(qs) => {
                        out.2 = u64::from(qs.drops);
                        out.3 = u64::from(qs.overlimits);
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// Rate, bucket and limit of a `tbf` from its dumped options. The library keeps the
/// options of a kind it does not know as one attribute: `TCA_OPTIONS` itself, whose value
/// holds `TCA_TBF_PARMS` (the buffer in ticks, not bytes) and, for large rates,
/// `TCA_TBF_RATE64`. The bucket is recomputed from the buffer time, as `tc` does.
fn parse_tbf_options(opts: &[TcOption]) -> Option<TbfSpec> {
    const TCA_OPTIONS: u16 = 2;
    let mut parms = None;
    let mut rate64 = None;
    for o in opts {
        let TcOption::Other(nla) = o else { continue };
        if nla.kind() != TCA_OPTIONS {
            continue;
        }
        let mut value = vec![0u8; nla.value_len()];
        nla.emit_value(&mut value);
        for_each_nla(&value, &mut |kind, v| match kind {
            TCA_TBF_PARMS if v.len() >= TBF_QOPT_LEN => parms = Some(v[..TBF_QOPT_LEN].to_vec()),
            TCA_TBF_RATE64 if v.len() >= 8 => {
                rate64 = Some(u64::from_ne_bytes(v[..8].try_into().expect("8 bytes")));
            }
            _ => {}
        });
    }
    let p = parms?;
    let rate32 = u32::from_ne_bytes(p[8..12].try_into().expect("4 bytes"));
    let rate = rate64.unwrap_or(0).max(u64::from(rate32));
    let tail = 2 * RATESPEC_LEN;
    let limit = u32::from_ne_bytes(p[tail..tail + 4].try_into().expect("4 bytes"));
    let buffer_ticks = u32::from_ne_bytes(p[tail + 4..tail + 8].try_into().expect("4 bytes"));
    // A scheduler tick is 64 ns (PSCHED_SHIFT 6).
    let burst = u128::from(buffer_ticks) * 64 * u128::from(rate) / 1_000_000_000;
    Some(TbfSpec {
        rate_bytes_per_sec: rate,
        burst_bytes: u32::try_from(burst).unwrap_or(u32::MAX),
        limit_bytes: limit,
    })
}

/// Calls `f(kind, value)` for each netlink attribute in `buf`.
pub(crate) fn for_each_nla(mut buf: &[u8], f: &mut impl FnMut(u16, &[u8])) {
    while buf.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return;
        }
        f(kind, &buf[4..len]);
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::Emitable;

    use super::*;

    fn spec() -> TbfSpec {
        TbfSpec {
            rate_bytes_per_sec: 1_250_000,
            burst_bytes: 6_250,
            limit_bytes: 12_500,
        }
    }

    #[test]
    fn tbf_qopt_has_the_kernel_layout() {
        let b = tbf_qopt(&spec());
        assert_eq!(b.len(), 36);
        assert_eq!(b[0], 0, "cell_log");
        assert_eq!(b[1], TC_LINKLAYER_ETHERNET, "linklayer: no rate table");
        assert_eq!(&b[8..12], &1_250_000u32.to_ne_bytes(), "rate");
        assert!(b[12..24].iter().all(|&x| x == 0), "no peak rate");
        assert_eq!(&b[24..28], &12_500u32.to_ne_bytes(), "limit");
        assert_eq!(
            &b[28..36],
            &[0; 8],
            "buffer and mtu come from TCA_TBF_BURST"
        );
    }

    #[test]
    fn a_rate_above_32_bits_saturates_the_old_field() {
        let mut s = spec();
        s.rate_bytes_per_sec = 125_000_000_000; // 1 Tbit/s
        let b = tbf_qopt(&s);
        assert_eq!(&b[8..12], &u32::MAX.to_ne_bytes());
    }

    #[test]
    fn tbf_message_is_a_root_qdisc_with_hypha_s_handle_and_three_options() {
        let msg = tbf_message(7, &spec());
        assert_eq!(msg.header.index, 7);
        assert_eq!(msg.header.parent, TcHandle::ROOT);
        assert_eq!(msg.header.handle.major, HYPHA_QDISC_MAJOR);
        assert_eq!(msg.header.handle.minor, 0);
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        // tcmsg (20 bytes), then TCA_KIND "tbf\0" (8), then TCA_OPTIONS nested.
        assert_eq!(&buf[20..28], &[8, 0, 1, 0, b't', b'b', b'f', 0]);
        let mut seen = Vec::new();
        for_each_nla(&buf[28..], &mut |kind, value| {
            assert_eq!(kind, 2, "TCA_OPTIONS");
            for_each_nla(value, &mut |k, v| seen.push((k, v.to_vec())));
        });
        assert_eq!(
            seen,
            vec![
                (TCA_TBF_PARMS, tbf_qopt(&spec()).to_vec()),
                (TCA_TBF_RATE64, 1_250_000u64.to_ne_bytes().to_vec()),
                (TCA_TBF_BURST, 6_250u32.to_ne_bytes().to_vec()),
            ]
        );
    }

    #[test]
    fn dumped_tbf_options_give_back_rate_burst_and_limit() {
        // What the kernel dumps: PARMS with the buffer in ticks, and RATE64.
        let mut parms = tbf_qopt(&spec());
        // 6250 bytes at 1.25 MB/s = 5 ms = 78125 ticks of 64 ns.
        parms[28..32].copy_from_slice(&78_125u32.to_ne_bytes());
        let members = [
            DefaultNla::new(TCA_TBF_PARMS, parms.to_vec()),
            DefaultNla::new(TCA_TBF_RATE64, 1_250_000u64.to_ne_bytes().to_vec()),
        ];
        let mut nested = vec![0u8; members.as_slice().buffer_len()];
        members.as_slice().emit(&mut nested);
        let opts = vec![TcOption::Other(DefaultNla::new(2, nested))];
        assert_eq!(parse_tbf_options(&opts), Some(spec()));
    }

    #[test]
    fn root_qdisc_is_parsed_with_its_stats() {
        use netlink_packet_route::tc::{TcStats, TcStatsQueue};
        let mut msg = tbf_message(7, &spec());
        msg.attributes.retain(|a| matches!(a, TcAttribute::Kind(_)));
        let mut stats = TcStats::default();
        stats.bytes = 1000;
        stats.packets = 10;
        stats.drops = 3;
        stats.overlimits = 5;
        msg.attributes.push(TcAttribute::Stats(stats));
        let mut queue = TcStatsQueue::default();
        queue.drops = 4;
        queue.overlimits = 6;
        msg.attributes
            .push(TcAttribute::Stats2(vec![TcStats2::Queue(queue)]));
        let q = parse_root_qdisc(&msg, 7).expect("root qdisc of #7");
        assert!(q.is_hypha_tbf());
        assert_eq!(
            (q.packets, q.bytes, q.drops, q.overlimits),
            (10, 1000, 4, 6)
        );
        assert_eq!(parse_root_qdisc(&msg, 8), None, "another interface");
    }
}
