//! The eBPF programs' trace lines (`hypha endpoint debug ENDPOINT on`), read from aya-log's
//! ring buffer and written to the agent's log.
//!
//! The programs log numbers and the frame's first bytes (`ebpf/src/debug.rs`: names and
//! formatting would cost them stack and instructions); [`render`] turns those into words
//! here. Lines it does not know are shown as they came.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use hypha_common::DropReason;

/// The target of the lines in the agent's log (`RUST_LOG=hypha::datapath=off` hides them).
pub const TARGET: &str = "hypha::datapath";

/// Receives aya-log's records and writes them to the agent's log at info level: they
/// exist only because an operator turned tracing on for an endpoint, so they are shown
/// without a change of log level.
#[derive(Clone, Copy, Debug, Default)]
pub struct DatapathLog;

impl log::Log for DatapathLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = render(&record.args().to_string());
        tracing::info!(target: TARGET, "{line}");
    }

    fn flush(&self) {}
}

/// `TC_ACT_*` verdicts.
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

/// One trace line of the programs in words, or the line as it came.
pub fn render(line: &str) -> String {
    let mut words = line.split(' ');
    let rendered = match words.next() {
        Some("hypha-trace") => received(&words.collect::<Vec<_>>()),
        Some("hypha-verdict") => verdict(&words.collect::<Vec<_>>()),
        _ => None,
    };
    rendered.unwrap_or_else(|| line.to_owned())
}

/// `ENDPOINT HOOK FROM LEN HEAD`.
fn received(f: &[&str]) -> Option<String> {
    let [id, hook, from, len, head] = f else {
        return None;
    };
    let id: u32 = id.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    let head = hex(head)?;
    let from: u32 = from.parse().ok()?;
    let side = match *hook {
        "0" => "tx".to_owned(),
        "1" => "rx".to_owned(),
        "2" => format!("rx from the pod on ifindex {from}"),
        _ => return None,
    };
    let valid = head.len().min(len as usize);
    Some(format!(
        "endpoint {id} {side}: {}, {len} bytes",
        describe(&head[..valid])
    ))
}

/// `ENDPOINT HOOK ACTION NOTE`.
fn verdict(f: &[&str]) -> Option<String> {
    let [id, hook, action, note] = f else {
        return None;
    };
    let id: u32 = id.parse().ok()?;
    let action: i32 = action.parse().ok()?;
    let note = hex(note)?;
    let word = |i: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(
            note.get(i * 4..i * 4 + 4)?.try_into().ok()?,
        ))
    };
    let (reason, target, policy_id, policy_endpoint) = (word(0)?, word(1)?, word(2)?, word(3)?);
    let side = match *hook {
        "0" => "tx",
        "1" => "rx",
        _ => return None,
    };
    let what = match action {
        TC_ACT_OK if side == "tx" => "to the host stack".to_owned(),
        TC_ACT_OK => "delivered to the pod".to_owned(),
        TC_ACT_REDIRECT if target != 0 => format!("redirected to the pod on ifindex {target}"),
        TC_ACT_REDIRECT => "answered: sent back to the pod".to_owned(),
        TC_ACT_SHOT => {
            let name = u16::try_from(reason)
                .ok()
                .and_then(DropReason::from_u16)
                .map_or_else(|| format!("reason {reason}"), |r| r.name().to_owned());
            let mut s = format!("dropped ({name})");
            if policy_endpoint != 0 {
                let _ = write!(s, " by the policy of endpoint {policy_endpoint}");
                if policy_id == 0 {
                    s.push_str(": no policy allows it");
                } else {
                    let _ = write!(s, ": policy {policy_id}");
                }
            }
            s
        }
        other => format!("action {other}"),
    };
    Some(format!("endpoint {id} {side} verdict: {what}"))
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A frame's head in words: family, protocol, addresses, ports.
fn describe(frame: &[u8]) -> String {
    let Some(ether_type) = frame.get(12..14) else {
        return "a frame too short for Ethernet".to_owned();
    };
    let p = &frame[14..];
    match u16::from_be_bytes([ether_type[0], ether_type[1]]) {
        0x0800 => ipv4(p).unwrap_or_else(|| "IPv4, truncated".to_owned()),
        0x86dd => ipv6(p).unwrap_or_else(|| "IPv6, truncated".to_owned()),
        0x0806 => arp(p).unwrap_or_else(|| "ARP, truncated".to_owned()),
        other => format!("EtherType {other:#06x}"),
    }
}

fn proto_name(proto: u8) -> String {
    match proto {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        p => format!("protocol {p}"),
    }
}

fn ipv4(p: &[u8]) -> Option<String> {
    let h = p.get(..20)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    let proto = h[9];
    let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
    let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
    let first_fragment = u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0;
    let l4 = p.get(ihl..).filter(|_| ihl >= 20 && first_fragment);
    let ports = l4
        .filter(|_| matches!(proto, 6 | 17 | 132))
        .and_then(|l| l.get(..4));
    let mut s = format!("IPv4 {}", proto_name(proto));
    match (ports, l4) {
        (Some(pt), _) => {
            let sp = u16::from_be_bytes([pt[0], pt[1]]);
            let dp = u16::from_be_bytes([pt[2], pt[3]]);
            let _ = write!(s, " {src}:{sp} -> {dst}:{dp}");
        }
        (None, Some(l)) if proto == 1 && l.len() >= 2 => {
            let _ = write!(s, " type {} code {} {src} -> {dst}", l[0], l[1]);
        }
        _ => {
            let _ = write!(s, " {src} -> {dst}");
        }
    }
    let _ = write!(s, " ttl {}", h[8]);
    Some(s)
}

fn ipv6(p: &[u8]) -> Option<String> {
    let h = p.get(..40)?;
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&h[8..24]).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&h[24..40]).ok()?);
    Some(format!(
        "IPv6 {} {src} -> {dst} hop limit {}",
        proto_name(h[6]),
        h[7]
    ))
}

fn arp(p: &[u8]) -> Option<String> {
    let a = p.get(..28)?;
    let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
    let tpa = Ipv4Addr::new(a[24], a[25], a[26], a[27]);
    let mac = |m: &[u8]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    Some(match u16::from_be_bytes([a[6], a[7]]) {
        1 => format!("ARP who-has {tpa} tell {spa}"),
        2 => format!("ARP {spa} is-at {}", mac(&a[8..14])),
        op => format!("ARP op {op} {spa} -> {tpa}"),
    })
}

/// Drains the programs' log ring buffer into the agent's log whenever it has records,
/// until the agent stops.
pub async fn pump(logger: aya_log::EbpfLogger<DatapathLog>) {
    // SAFETY: the logger owns its ring buffer's map fd for as long as it lives, and it
    // lives inside the `AsyncFd` until the end of this function; `as_raw_fd` always
    // returns that fd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(
                "cannot watch the datapath's log ring buffer: {e}; endpoint tracing will be silent"
            );
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                tracing::warn!(
                    "the datapath's log ring buffer failed: {e}; endpoint tracing stops"
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hexs(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 54 bytes of a frame, zero-padded as the programs send them.
    fn head(frame: &[u8]) -> String {
        let mut h = frame.to_vec();
        h.resize(54, 0);
        hexs(&h[..54])
    }

    fn eth(ether_type: u16) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        f.extend(ether_type.to_be_bytes());
        f
    }

    fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = eth(0x0800);
        f.extend([0x45, 0, 0, 84, 0, 1, 0x40, 0, 64, proto, 0, 0]);
        f.extend([10, 0, 0, 2, 10, 0, 0, 3]);
        f.extend(l4);
        f
    }

    #[test]
    fn received_frames_read_as_words() {
        let icmp = ipv4(1, &[8, 0, 0, 0]);
        assert_eq!(
            render(&format!("hypha-trace 3 0 0 98 {}", head(&icmp))),
            "endpoint 3 tx: IPv4 ICMP type 8 code 0 10.0.0.2 -> 10.0.0.3 ttl 64, 98 bytes"
        );
        let tcp = ipv4(6, &[0x9c, 0x40, 0, 80]);
        assert_eq!(
            render(&format!("hypha-trace 3 2 12 74 {}", head(&tcp))),
            "endpoint 3 rx from the pod on ifindex 12: IPv4 TCP 10.0.0.2:40000 -> 10.0.0.3:80 ttl 64, 74 bytes"
        );
        let mut v6 = eth(0x86dd);
        v6.extend([0x60, 0, 0, 0, 0, 8, 58, 255]);
        v6.extend(Ipv6Addr::LOCALHOST.octets());
        v6.extend("fe80::1".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(
            render(&format!("hypha-trace 4 1 0 62 {}", head(&v6))),
            "endpoint 4 rx: IPv6 ICMPv6 ::1 -> fe80::1 hop limit 255, 62 bytes"
        );
        let mut arp = eth(0x0806);
        arp.extend([0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 2]);
        arp.extend([0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
        assert_eq!(
            render(&format!("hypha-trace 3 0 0 42 {}", head(&arp))),
            "endpoint 3 tx: ARP who-has 10.0.0.1 tell 10.0.0.2, 42 bytes"
        );
        // The zero padding past a short frame is not read as the frame's.
        assert_eq!(
            render(&format!("hypha-trace 3 0 0 20 {}", head(&icmp[..20]))),
            "endpoint 3 tx: IPv4, truncated, 20 bytes"
        );
        assert_eq!(
            render(&format!("hypha-trace 3 0 0 60 {}", head(&eth(0x88cc)))),
            "endpoint 3 tx: EtherType 0x88cc, 60 bytes"
        );
    }

    #[test]
    fn verdicts_read_as_words() {
        let note = |r: u32, t: u32, p: u32, e: u32| {
            hexs(
                &[r, t, p, e]
                    .iter()
                    .flat_map(|w| w.to_ne_bytes())
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            render(&format!("hypha-verdict 3 0 7 {}", note(0, 14, 0, 0))),
            "endpoint 3 tx verdict: redirected to the pod on ifindex 14"
        );
        assert_eq!(
            render(&format!("hypha-verdict 3 0 0 {}", note(0, 0, 0, 0))),
            "endpoint 3 tx verdict: to the host stack"
        );
        assert_eq!(
            render(&format!("hypha-verdict 3 1 0 {}", note(0, 0, 0, 0))),
            "endpoint 3 rx verdict: delivered to the pod"
        );
        assert_eq!(
            render(&format!("hypha-verdict 3 0 7 {}", note(0, 0, 0, 0))),
            "endpoint 3 tx verdict: answered: sent back to the pod"
        );
        assert_eq!(
            render(&format!("hypha-verdict 3 0 2 {}", note(6, 0, 0, 5))),
            "endpoint 3 tx verdict: dropped (policy-denied) by the policy of endpoint 5: no policy allows it"
        );
        assert_eq!(
            render(&format!("hypha-verdict 3 1 2 {}", note(7, 0, 9, 3))),
            "endpoint 3 rx verdict: dropped (policy-deny-rule) by the policy of endpoint 3: policy 9"
        );
        assert_eq!(
            render(&format!("hypha-verdict 3 0 2 {}", note(8, 0, 0, 0))),
            "endpoint 3 tx verdict: dropped (spoofed-source)"
        );
    }

    #[test]
    fn other_lines_pass_as_they_are() {
        for line in [
            "something else",
            "hypha-trace 3 0 0 98",
            "hypha-trace x 0 0 98 00",
            "hypha-verdict 3 0 2 0102",
            "hypha-trace 3 9 0 1 0000",
        ] {
            assert_eq!(render(line), line);
        }
    }
}
