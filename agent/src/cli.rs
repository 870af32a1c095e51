//! The operator's commands that talk to a running agent: `hypha status`, `hypha endpoint list`.

use std::fmt::Write as _;

use hypha_api::{Endpoint, PacketCount, Status};

/// Renders `hypha status` as text.
pub fn format_status(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Agent:      running, version {}, up {}s",
        s.version, s.uptime_seconds
    );
    let _ = writeln!(out, "Socket:     {}", s.node.socket);
    let _ = writeln!(out, "State dir:  {}", s.node.state_dir);
    let _ = writeln!(
        out,
        "Pod CIDR:   {} (gateway {} on {})",
        s.node.pod_cidr, s.node.gateway, s.node.host_device
    );
    let _ = writeln!(
        out,
        "Masquerade: {}",
        if s.node.masquerade { "on" } else { "off" }
    );
    let _ = writeln!(
        out,
        "IPAM:       {} of {} addresses in use, {} available",
        s.ipam.allocated, s.ipam.capacity, s.ipam.available
    );
    let _ = writeln!(
        out,
        "Endpoints:  {} ({} re-adopted at start)",
        s.endpoints, s.datapath.adopted_endpoints
    );
    let _ = writeln!(
        out,
        "Datapath:   {} pinned under {}",
        s.datapath.programs.join(", "),
        s.datapath.pin_dir
    );
    out
}

fn pkts(c: PacketCount) -> String {
    format!("{}/{}", c.packets, human_bytes(c.bytes))
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

/// Renders `hypha endpoint list` as a table. Counters are packets/bytes in the pod's
/// directions: TX is what the pod sent, RX what it received; REDIR is the part moved
/// pod-to-pod by the eBPF datapath.
pub fn format_endpoints(eps: &[Endpoint]) -> String {
    let header = [
        "ID",
        "CONTAINER",
        "IF",
        "ADDRESS",
        "HOST-IF",
        "TX",
        "TX-REDIR",
        "RX",
        "RX-REDIR",
        "DROPPED",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for e in eps {
        let c = &e.counters;
        let dropped = PacketCount {
            packets: c.egress.dropped.packets + c.ingress.dropped.packets,
            bytes: c.egress.dropped.bytes + c.ingress.dropped.bytes,
        };
        rows.push(vec![
            e.id.to_string(),
            e.container_id.chars().take(12).collect(),
            e.ifname.clone(),
            e.address.to_string(),
            e.host_ifname.clone(),
            pkts(c.egress.forwarded()),
            pkts(c.egress.redirected),
            pkts(c.ingress.forwarded()),
            pkts(c.ingress.redirected),
            pkts(dropped),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    for e in eps.iter().filter(|e| !e.drops.is_empty()) {
        for d in &e.drops {
            let _ = writeln!(
                out,
                "  endpoint {} dropped {} {} packets ({}): {}",
                e.id,
                d.packets,
                d.direction,
                human_bytes(d.bytes),
                d.reason
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use hypha_api::{DirectionCounters, DropCount, EndpointCounters, MacAddr};

    use super::*;

    #[test]
    fn endpoint_table_shows_counters_and_drops() {
        let ep = Endpoint {
            id: 3,
            container_id: "0123456789abcdef".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/a".into(),
            host_ifname: "hyp0123456789ab".into(),
            host_ifindex: 9,
            address: "10.244.0.2".parse().unwrap(),
            pod_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            host_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            labels: Default::default(),
            external_ipam: false,
            bandwidth: None,
            counters: EndpointCounters {
                egress: DirectionCounters {
                    passed: PacketCount {
                        packets: 1,
                        bytes: 100,
                    },
                    redirected: PacketCount {
                        packets: 9,
                        bytes: 2048,
                    },
                    dropped: PacketCount {
                        packets: 2,
                        bytes: 60,
                    },
                },
                ingress: DirectionCounters::default(),
            },
            drops: vec![DropCount {
                reason: "unknown-l3-protocol".into(),
                direction: "egress".into(),
                packets: 2,
                bytes: 60,
            }],
        };
        let text = format_endpoints(&[ep]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID  CONTAINER"), "{text}");
        assert!(
            lines[1].contains("0123456789ab ") && !lines[1].contains("0123456789abc"),
            "{text}"
        );
        assert!(
            lines[1].contains("10/2.1KiB"),
            "forwarded = passed + redirected: {text}"
        );
        assert!(lines[1].contains("9/2.0KiB"), "{text}");
        assert!(lines[1].ends_with("2/60B"), "{text}");
        assert!(
            lines[2].contains("dropped 2 egress packets (60B): unknown-l3-protocol"),
            "{text}"
        );
    }
}
