//! eBPF programs on an interface through legacy tc: a `clsact` qdisc and `cls_bpf`
//! filters in direct-action mode, as pure message builders and parsers (unit-tested here)
//! for the methods on [`crate::Netlink`].
//!
//! netlink-packet-route 0.25 has no typed `cls_bpf` options, so `TCA_OPTIONS` is built
//! from the kernel's layout (`include/uapi/linux/pkt_cls.h`): `TCA_BPF_FD` (the
//! program), `TCA_BPF_NAME` (shown by `tc filter show`) and `TCA_BPF_FLAGS` with
//! `TCA_BPF_FLAG_ACT_DIRECT` (the program's return value is the verdict).

use netlink_packet_core::{DefaultNla, Nla as _};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcHeader, TcMessage, TcOption};

use crate::qdisc::for_each_nla;

/// `TCA_OPTIONS`, as the one attribute netlink-packet-route parses a `bpf` filter's
/// options into.
const TCA_OPTIONS: u16 = 2;
/// `TCA_BPF_FD`: the program, as an fd of the sender.
const TCA_BPF_FD: u16 = 6;
/// `TCA_BPF_NAME`: a name for `tc filter show`.
const TCA_BPF_NAME: u16 = 7;
/// `TCA_BPF_FLAGS`.
const TCA_BPF_FLAGS: u16 = 8;
/// `TCA_BPF_ID`: the program's id, in dumps.
const TCA_BPF_ID: u16 = 11;
/// `TCA_BPF_FLAG_ACT_DIRECT`: the program's return value is the filter's action.
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
/// `ETH_P_ALL`, in network byte order as the filter's protocol.
const ETH_P_ALL: u16 = 0x0003;

/// Which side of the interface a filter is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    /// Packets the interface receives.
    Ingress,
    /// Packets the interface sends.
    Egress,
}

impl TcHook {
    fn parent(self) -> TcHandle {
        TcHandle {
            major: 0xffff,
            minor: match self {
                TcHook::Ingress => TcHandle::MIN_INGRESS,
                TcHook::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }

    /// `ingress` or `egress`.
    pub fn name(self) -> &'static str {
        match self {
            TcHook::Ingress => "ingress",
            TcHook::Egress => "egress",
        }
    }
}

/// A `cls_bpf` filter in direct-action mode.
#[derive(Clone, Copy, Debug)]
pub struct BpfFilter<'a> {
    pub hook: TcHook,
    /// The filter's priority (lower runs first) and handle: together they name it, so a
    /// replace with the same two swaps its program in place.
    pub priority: u16,
    pub handle: u32,
    /// The program's fd.
    pub prog_fd: i32,
    pub name: &'a str,
}

/// A `cls_bpf` filter as a dump reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstalledBpfFilter {
    pub priority: u16,
    pub handle: u32,
    /// Its program's id (0 if the dump did not say).
    pub prog_id: u32,
    pub name: String,
    pub direct_action: bool,
}

/// `RTM_NEWQDISC`/`RTM_DELQDISC` of the `clsact` qdisc of interface `index`.
pub(crate) fn clsact_message(index: u32) -> TcMessage {
    TcMessage::from_parts(
        TcHeader {
            family: AddressFamily::Unspec,
            index: index as i32,
            handle: TcHandle {
                major: 0xffff,
                minor: 0,
            },
            parent: TcHandle::CLSACT,
            info: 0,
        },
        vec![TcAttribute::Kind("clsact".to_owned())],
    )
}

/// `tcm_info` of a filter: its priority in the upper half, its protocol in the lower.
fn filter_info(priority: u16) -> u32 {
    (u32::from(priority) << 16) | u32::from(ETH_P_ALL.to_be())
}

/// `RTM_NEWTFILTER` of `filter` on interface `index`.
pub(crate) fn bpf_filter_message(index: u32, filter: &BpfFilter<'_>) -> TcMessage {
    let mut name = filter.name.as_bytes().to_vec();
    name.push(0);
    TcMessage::from_parts(
        TcHeader {
            family: AddressFamily::Unspec,
            index: index as i32,
            handle: TcHandle::from(filter.handle),
            parent: filter.hook.parent(),
            info: filter_info(filter.priority),
        },
        vec![
            TcAttribute::Kind("bpf".to_owned()),
            TcAttribute::Options(vec![
                TcOption::Other(DefaultNla::new(
                    TCA_BPF_FD,
                    filter.prog_fd.to_ne_bytes().to_vec(),
                )),
                TcOption::Other(DefaultNla::new(TCA_BPF_NAME, name)),
                TcOption::Other(DefaultNla::new(
                    TCA_BPF_FLAGS,
                    TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes().to_vec(),
                )),
            ]),
        ],
    )
}

/// `RTM_NEWTFILTER` of a `cls_bpf` filter in classic mode (no direct action: the
/// program's return value is a class id, 0 for no match) on the qdisc or class `parent`
/// of interface `index`: how Hypha's flow classifier picks an `htb` leaf.
pub(crate) fn bpf_classifier_message(
    index: u32,
    parent: TcHandle,
    priority: u16,
    handle: u32,
    prog_fd: i32,
    name: &str,
) -> TcMessage {
    let mut name = name.as_bytes().to_vec();
    name.push(0);
    TcMessage::from_parts(
        TcHeader {
            family: AddressFamily::Unspec,
            index: index as i32,
            handle: TcHandle::from(handle),
            parent,
            info: filter_info(priority),
        },
        vec![
            TcAttribute::Kind("bpf".to_owned()),
            TcAttribute::Options(vec![
                TcOption::Other(DefaultNla::new(TCA_BPF_FD, prog_fd.to_ne_bytes().to_vec())),
                TcOption::Other(DefaultNla::new(TCA_BPF_NAME, name)),
            ]),
        ],
    )
}

/// `RTM_DELTFILTER` of the filter `priority`/`handle` on `hook` of interface `index`.
pub(crate) fn filter_delete_message(
    index: u32,
    hook: TcHook,
    priority: u16,
    handle: u32,
) -> TcMessage {
    TcMessage::from_parts(
        TcHeader {
            family: AddressFamily::Unspec,
            index: index as i32,
            handle: TcHandle::from(handle),
            parent: hook.parent(),
            info: filter_info(priority),
        },
        vec![TcAttribute::Kind("bpf".to_owned())],
    )
}

/// `RTM_GETTFILTER` dump of the filters on `hook` of interface `index`.
pub(crate) fn filter_dump_message(index: u32, hook: TcHook) -> TcMessage {
    TcMessage::from_parts(
        TcHeader {
            family: AddressFamily::Unspec,
            index: index as i32,
            handle: TcHandle::UNSPEC,
            parent: hook.parent(),
            info: 0,
        },
        Vec::new(),
    )
}

/// A `cls_bpf` filter in a dump answer (the dump also reports each priority's chain
/// head, which has no options: skipped).
pub(crate) fn parse_bpf_filter(msg: &TcMessage) -> Option<InstalledBpfFilter> {
    let is_bpf = msg
        .attributes
        .iter()
        .any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"));
    let options = msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(o) => Some(o),
        _ => None,
    })?;
    if !is_bpf {
        return None;
    }
    let mut f = InstalledBpfFilter {
        priority: (msg.header.info >> 16) as u16,
        handle: u32::from(msg.header.handle),
        prog_id: 0,
        name: String::new(),
        direct_action: false,
    };
    let mut read = |kind: u16, value: &[u8]| {
        let word = value
            .get(..4)
            .map(|b| u32::from_ne_bytes(b.try_into().expect("four bytes")));
        match kind {
            TCA_BPF_ID => f.prog_id = word.unwrap_or(0),
            TCA_BPF_FLAGS => {
                f.direct_action = word.is_some_and(|w| w & TCA_BPF_FLAG_ACT_DIRECT != 0);
            }
            TCA_BPF_NAME => {
                let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
                f.name = String::from_utf8_lossy(&value[..end]).into_owned();
            }
            _ => {}
        }
    };
    for o in options {
        let TcOption::Other(nla) = o else { continue };
        let mut value = vec![0u8; nla.value_len()];
        nla.emit_value(&mut value);
        if nla.kind() == TCA_OPTIONS {
            // How netlink-packet-route hands over the options of a kind it does not know:
            // one attribute holding the nested ones.
            for_each_nla(&value, &mut read);
        } else {
            read(nla.kind(), &value);
        }
    }
    Some(f)
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::Emitable as _;

    use super::*;

    fn filter() -> BpfFilter<'static> {
        BpfFilter {
            hook: TcHook::Egress,
            priority: 1,
            handle: 1,
            prog_fd: 42,
            name: "to_pod",
        }
    }

    #[test]
    fn a_filter_names_its_hook_priority_and_program_in_direct_action() {
        let msg = bpf_filter_message(7, &filter());
        assert_eq!(msg.header.index, 7);
        assert_eq!(
            u32::from(msg.header.parent),
            0xffff_fff3,
            "the clsact egress"
        );
        assert_eq!(
            msg.header.info,
            (1 << 16) | 0x0300,
            "prio 1, ETH_P_ALL (be)"
        );
        assert_eq!(u32::from(msg.header.handle), 1);
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        let parsed = parse_bpf_filter(&msg).expect("a bpf filter");
        assert_eq!(parsed.name, "to_pod");
        assert!(parsed.direct_action);
        assert_eq!(parsed.priority, 1);
        let ingress = bpf_filter_message(
            7,
            &BpfFilter {
                hook: TcHook::Ingress,
                ..filter()
            },
        );
        assert_eq!(u32::from(ingress.header.parent), 0xffff_fff2);
    }

    #[test]
    fn a_dumped_filter_gives_back_its_program_id_name_and_mode() {
        use netlink_packet_core::{Emitable as _, Parseable as _};
        use netlink_packet_route::tc::TcMessageBuffer;
        // As the kernel dumps it: TCA_OPTIONS holding the filter's attributes, as bytes.
        let mut msg = bpf_filter_message(7, &filter());
        msg.attributes = vec![
            TcAttribute::Kind("bpf".into()),
            TcAttribute::Options(vec![
                TcOption::Other(DefaultNla::new(TCA_BPF_ID, 77u32.to_ne_bytes().to_vec())),
                TcOption::Other(DefaultNla::new(TCA_BPF_NAME, b"to_pod\0".to_vec())),
                TcOption::Other(DefaultNla::new(TCA_BPF_FLAGS, 1u32.to_ne_bytes().to_vec())),
            ]),
        ];
        let mut bytes = vec![0u8; msg.buffer_len()];
        msg.emit(&mut bytes);
        let parsed = TcMessage::parse(&TcMessageBuffer::new(&bytes)).expect("parse");
        let f = parse_bpf_filter(&parsed).expect("a bpf filter");
        assert_eq!(
            f,
            InstalledBpfFilter {
                priority: 1,
                handle: 1,
                prog_id: 77,
                name: "to_pod".into(),
                direct_action: true,
            }
        );
    }

    #[test]
    fn a_classifier_sits_on_its_qdisc_without_direct_action() {
        let parent = TcHandle {
            major: 0x4859,
            minor: 0,
        };
        let msg = bpf_classifier_message(7, parent, 1, 1, 42, "hypha_flow_class");
        assert_eq!(u32::from(msg.header.parent), 0x4859_0000);
        let f = parse_bpf_filter(&msg).expect("a bpf filter");
        assert_eq!(f.name, "hypha_flow_class");
        assert!(
            !f.direct_action,
            "classic mode: the return value is the class"
        );
    }

    #[test]
    fn the_clsact_qdisc_has_its_fixed_handle_and_parent() {
        let msg = clsact_message(3);
        assert_eq!(u32::from(msg.header.handle), 0xffff_0000);
        assert_eq!(u32::from(msg.header.parent), 0xffff_fff1);
        assert!(msg.attributes.contains(&TcAttribute::Kind("clsact".into())));
    }
}
