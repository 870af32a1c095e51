//! Prometheus text exposition of the agent's counters (`--metrics-addr`, off by default).
//!
//! Rendering is a pure function of what the agent reports, so it is unit-tested; the
//! daemon serves it on `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hypha_api::{Endpoint, NodeInfo, PacketCount, Status};
use hypha_common::PolicyStats;

/// Everything one scrape shows.
pub struct Snapshot<'a> {
    pub status: &'a Status,
    pub endpoints: &'a [Endpoint],
    /// The cluster's nodes; those with tunnel counters (other nodes the tunnel routes to)
    /// get the per-node families.
    pub nodes: &'a [NodeInfo],
    /// Flows decided, by policy name.
    pub policy_flows: BTreeMap<String, PolicyStats>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The Prometheus text format (version 0.0.4) of a snapshot.
pub fn render(s: &Snapshot<'_>) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "hypha_endpoints",
        "gauge",
        "Endpoints the agent manages.",
    );
    let _ = writeln!(out, "hypha_endpoints {}", s.status.endpoints);
    let svc = &s.status.services;
    for (name, help, n) in [
        (
            "hypha_services",
            "Services the node programs.",
            svc.services,
        ),
        (
            "hypha_service_frontends",
            "Service frontends: each ClusterIP and port, and each NodePort.",
            svc.frontends,
        ),
        (
            "hypha_service_backends",
            "Distinct service backends (address and port).",
            svc.backends,
        ),
    ] {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {n}");
    }
    family(
        &mut out,
        "hypha_ipam_addresses",
        "gauge",
        "Pod CIDR addresses by family (of the pod CIDRs the node has) and state.",
    );
    let ipam = &s.status.ipam;
    let pools = [
        (
            s.status.node.pod_cidr.is_some(),
            "ipv4",
            u64::from(ipam.allocated),
            u64::from(ipam.available),
        ),
        (
            s.status.node.pod_cidr6.is_some(),
            "ipv6",
            ipam.allocated6,
            ipam.available6,
        ),
    ];
    for (_, fam, allocated, available) in pools.iter().filter(|p| p.0) {
        for (state, n) in [("allocated", allocated), ("available", available)] {
            let _ = writeln!(
                out,
                "hypha_ipam_addresses{{family=\"{fam}\",state=\"{state}\"}} {n}"
            );
        }
    }

    family(
        &mut out,
        "hypha_packets_total",
        "counter",
        "Packets by endpoint, direction (the pod's) and path: passed (host stack), redirected (pod to pod), tunnel (to or from pods of other nodes), dropped.",
    );
    let mut bytes = String::new();
    family(
        &mut bytes,
        "hypha_bytes_total",
        "counter",
        "Bytes, labelled as hypha_packets_total.",
    );
    for e in s.endpoints {
        for (direction, d) in [
            ("egress", &e.counters.egress),
            ("ingress", &e.counters.ingress),
        ] {
            for (path, c) in [
                ("passed", d.passed),
                ("redirected", d.redirected),
                ("tunnel", d.tunnel),
                ("dropped", d.dropped),
            ] {
                let labels = format!(
                    "endpoint=\"{}\",container=\"{}\",direction=\"{direction}\",path=\"{path}\"",
                    e.id,
                    escape(&e.container_id)
                );
                let _ = writeln!(out, "hypha_packets_total{{{labels}}} {}", c.packets);
                let _ = writeln!(bytes, "hypha_bytes_total{{{labels}}} {}", c.bytes);
            }
        }
    }
    out.push_str(&bytes);

    family(
        &mut out,
        "hypha_family_packets_total",
        "counter",
        "Packets as hypha_packets_total, by family too: ipv4 (with ARP), ipv6 (with neighbour discovery). Frames of neither count only in hypha_packets_total.",
    );
    let mut bytes = String::new();
    family(
        &mut bytes,
        "hypha_family_bytes_total",
        "counter",
        "Bytes, labelled as hypha_family_packets_total.",
    );
    for e in s.endpoints {
        for (fam, counters) in [("ipv4", &e.counters4), ("ipv6", &e.counters6)] {
            for (direction, d) in [("egress", &counters.egress), ("ingress", &counters.ingress)] {
                for (path, c) in [
                    ("passed", d.passed),
                    ("redirected", d.redirected),
                    ("tunnel", d.tunnel),
                    ("dropped", d.dropped),
                ] {
                    let labels = format!(
                        "endpoint=\"{}\",container=\"{}\",family=\"{fam}\",direction=\"{direction}\",path=\"{path}\"",
                        e.id,
                        escape(&e.container_id)
                    );
                    let _ = writeln!(out, "hypha_family_packets_total{{{labels}}} {}", c.packets);
                    let _ = writeln!(bytes, "hypha_family_bytes_total{{{labels}}} {}", c.bytes);
                }
            }
        }
    }
    out.push_str(&bytes);

    family(
        &mut out,
        "hypha_drops_total",
        "counter",
        "Dropped packets by reason and direction, over all endpoints.",
    );
    let mut drops: BTreeMap<(String, String), u64> = BTreeMap::new();
    for d in s.endpoints.iter().flat_map(|e| &e.drops) {
        *drops
            .entry((d.reason.clone(), d.direction.clone()))
            .or_default() += d.packets;
    }
    for ((reason, direction), packets) in drops {
        let _ = writeln!(
            out,
            "hypha_drops_total{{reason=\"{}\",direction=\"{}\"}} {packets}",
            escape(&reason),
            escape(&direction)
        );
    }

    render_tunnel(&mut out, s);

    family(
        &mut out,
        "hypha_policy_flows_total",
        "counter",
        "New flows each policy decided, by verdict.",
    );
    for (name, st) in &s.policy_flows {
        for (verdict, n) in [
            ("allowed", st.allowed),
            ("denied", st.denied),
            ("audited", st.audited),
        ] {
            let _ = writeln!(
                out,
                "hypha_policy_flows_total{{policy=\"{}\",verdict=\"{verdict}\"}} {n}",
                escape(name)
            );
        }
    }
    let p = &s.status.policy;
    family(&mut out, "hypha_policies", "gauge", "Policies in force.");
    let _ = writeln!(out, "hypha_policies {}", p.policies);
    family(
        &mut out,
        "hypha_map_entries",
        "gauge",
        "Entries in the policy maps.",
    );
    let _ = writeln!(
        out,
        "hypha_map_entries{{map=\"{}\"}} {}",
        hypha_common::maps::POLICY,
        p.entries
    );
    let _ = writeln!(
        out,
        "hypha_map_entries{{map=\"{}\"}} {}",
        hypha_common::maps::IPCACHE4,
        p.ipcache
    );
    family(
        &mut out,
        "hypha_map_capacity",
        "gauge",
        "Capacity of the policy maps; the agent refuses policy that would not fit.",
    );
    let _ = writeln!(
        out,
        "hypha_map_capacity{{map=\"{}\"}} {}",
        hypha_common::maps::POLICY,
        hypha_common::MAX_POLICY_ENTRIES
    );
    let _ = writeln!(
        out,
        "hypha_map_capacity{{map=\"{}\"}} {}",
        hypha_common::maps::IPCACHE4,
        hypha_common::MAX_IPCACHE
    );
    family(
        &mut out,
        "hypha_policy_errors",
        "gauge",
        "Policy problems reported in hypha status (invalid files, failed recompilations).",
    );
    let _ = writeln!(out, "hypha_policy_errors {}", p.errors.len());
    out
}

/// One way of a node's tunnel traffic.
type Way = fn(&hypha_api::NodeTraffic) -> PacketCount;

/// Per other node: inner packets and bytes sent to it, received from it and received and
/// dropped, through the tunnel; and what the tunnel refused before any endpoint, by
/// reason.
fn render_tunnel(out: &mut String, s: &Snapshot<'_>) {
    let traffic: Vec<(&str, &hypha_api::NodeTraffic)> = s
        .nodes
        .iter()
        .filter_map(|n| Some((n.name.as_str(), n.tunnel.as_ref()?)))
        .collect();
    let ways: [(&str, &str, Way); 3] = [
        ("tx", "sent to", |t| t.tx),
        ("rx", "received from", |t| t.rx),
        ("dropped", "received and dropped from", |t| t.dropped),
    ];
    for (way, what, get) in ways {
        for (unit, value) in [
            (
                "packets",
                (|c: PacketCount| c.packets) as fn(PacketCount) -> u64,
            ),
            ("bytes", |c: PacketCount| c.bytes),
        ] {
            let name = format!("hypha_tunnel_{way}_{unit}_total");
            family(
                out,
                &name,
                "counter",
                &format!("Inner {unit} {what} another node through the tunnel, by node."),
            );
            for (node, t) in &traffic {
                let _ = writeln!(out, "{name}{{node=\"{}\"}} {}", escape(node), value(get(t)));
            }
        }
    }
    family(
        out,
        "hypha_tunnel_drops_total",
        "counter",
        "Packets the tunnel refused before reaching any endpoint, by reason (unknown-tunnel-source, invalid-tunnel-identity, no-tunnel-peer).",
    );
    let mut drops: BTreeMap<&str, u64> = BTreeMap::new();
    for d in s.status.routing.iter().flat_map(|r| &r.drops) {
        *drops.entry(d.reason.as_str()).or_default() += d.packets;
    }
    for (reason, packets) in drops {
        let _ = writeln!(
            out,
            "hypha_tunnel_drops_total{{reason=\"{}\"}} {packets}",
            escape(reason)
        );
    }
}

#[cfg(test)]
mod tests {
    use hypha_api::{DatapathStatus, DropCount, IpamStatus, NodeStatus, NodeTraffic, PolicyStatus};

    use super::*;

    #[test]
    fn exposition_has_families_labels_and_values() {
        let status = Status {
            version: "0".into(),
            uptime_seconds: 1,
            node: NodeStatus {
                pod_cidr: Some("10.0.0.0/24".parse().unwrap()),
                gateway: Some("10.0.0.1".parse().unwrap()),
                host_device: "lo".into(),
                masquerade: true,
                socket: "/s".into(),
                state_dir: "/d".into(),
                gateway6: Some("fe80::1".parse().unwrap()),
                pod_cidr6: Some("fd00::/64".parse().unwrap()),
            },
            ipam: IpamStatus {
                capacity: 253,
                allocated: 1,
                available: 252,
                allocated6: 1,
                available6: u64::MAX - 129,
                capacity6: u64::MAX - 128,
            },
            datapath: DatapathStatus {
                pin_dir: "/p".into(),
                adopted_endpoints: 0,
                programs: vec![],
                attach: "tc".into(),
            },
            endpoints: 1,
            policy: PolicyStatus {
                policies: 2,
                entries: 40,
                ipcache: 5,
                policy_dir: "/etc".into(),
                errors: vec![],
                refused_files: vec![],
            },
            services: hypha_api::ServicesStatus {
                services: 2,
                frontends: 5,
                backends: 6,
            },
            cluster: None,
            routing: Some(hypha_api::RoutingStatus {
                mode: "tunnel".into(),
                device: Some("hypha_vxlan".into()),
                port: Some(8472),
                mtu: 1450,
                peers: 2,
                drops: vec![DropCount {
                    reason: "unknown-tunnel-source".into(),
                    direction: "ingress".into(),
                    packets: 6,
                    bytes: 600,
                }],
            }),
        };
        let mut ep: Endpoint = serde_json::from_value(serde_json::json!({
            "id": 7, "container_id": "c\"1", "ifname": "eth0", "netns": "/n", "host_ifname": "h",
            "host_ifindex": 3, "address": "10.0.0.2", "pod_mac": "02:00:00:00:00:01",
            "host_mac": "02:00:00:00:00:02"
        }))
        .unwrap();
        ep.counters.egress.redirected.packets = 9;
        ep.counters4.egress.redirected.packets = 5;
        ep.counters6.egress.redirected.packets = 4;
        ep.counters6.ingress.passed.bytes = 1200;
        ep.counters.egress.tunnel.packets = 11;
        ep.counters.ingress.tunnel.bytes = 4096;
        ep.counters4.egress.tunnel.packets = 11;
        ep.drops.push(DropCount {
            reason: "policy-denied".into(),
            direction: "ingress".into(),
            packets: 4,
            bytes: 240,
        });
        let flows = BTreeMap::from([(
            "default/web".to_owned(),
            PolicyStats {
                allowed: 3,
                denied: 1,
                audited: 0,
            },
        )]);
        let node = |name: &str, tunnel: Option<NodeTraffic>| NodeInfo {
            name: name.into(),
            addresses: vec![],
            pod_cidr: None,
            pod_cidr6: None,
            version: "0".into(),
            heartbeat_unix_ms: None,
            alive: true,
            endpoints: 0,
            local: tunnel.is_none(),
            tunnel,
        };
        let count = |packets, bytes| PacketCount { packets, bytes };
        let nodes = [
            node("node-a", None),
            node(
                "node-\"b\"",
                Some(NodeTraffic {
                    tx: count(12, 1200),
                    rx: count(10, 900),
                    dropped: count(3, 180),
                }),
            ),
        ];
        let text = render(&Snapshot {
            status: &status,
            endpoints: &[ep],
            nodes: &nodes,
            policy_flows: flows,
        });
        for line in [
            "# TYPE hypha_packets_total counter",
            r#"hypha_packets_total{endpoint="7",container="c\"1",direction="egress",path="redirected"} 9"#,
            r#"hypha_drops_total{reason="policy-denied",direction="ingress"} 4"#,
            r#"hypha_policy_flows_total{policy="default/web",verdict="allowed"} 3"#,
            r#"hypha_map_entries{map="hypha_policy"} 40"#,
            "hypha_services 2",
            "hypha_service_frontends 5",
            "hypha_service_backends 6",
            r#"hypha_ipam_addresses{family="ipv4",state="available"} 252"#,
            r#"hypha_ipam_addresses{family="ipv6",state="allocated"} 1"#,
            r#"hypha_ipam_addresses{family="ipv6",state="available"} 18446744073709551486"#,
            r#"hypha_family_packets_total{endpoint="7",container="c\"1",family="ipv4",direction="egress",path="redirected"} 5"#,
            r#"hypha_family_packets_total{endpoint="7",container="c\"1",family="ipv6",direction="egress",path="redirected"} 4"#,
            r#"hypha_family_bytes_total{endpoint="7",container="c\"1",family="ipv6",direction="ingress",path="passed"} 1200"#,
            r#"hypha_packets_total{endpoint="7",container="c\"1",direction="egress",path="tunnel"} 11"#,
            r#"hypha_bytes_total{endpoint="7",container="c\"1",direction="ingress",path="tunnel"} 4096"#,
            r#"hypha_family_packets_total{endpoint="7",container="c\"1",family="ipv4",direction="egress",path="tunnel"} 11"#,
            "# TYPE hypha_tunnel_tx_packets_total counter",
            r#"hypha_tunnel_tx_packets_total{node="node-\"b\""} 12"#,
            r#"hypha_tunnel_tx_bytes_total{node="node-\"b\""} 1200"#,
            r#"hypha_tunnel_rx_packets_total{node="node-\"b\""} 10"#,
            r#"hypha_tunnel_rx_bytes_total{node="node-\"b\""} 900"#,
            r#"hypha_tunnel_dropped_packets_total{node="node-\"b\""} 3"#,
            r#"hypha_tunnel_dropped_bytes_total{node="node-\"b\""} 180"#,
            r#"hypha_tunnel_drops_total{reason="unknown-tunnel-source"} 6"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            !text.contains(r#"node="node-a""#),
            "the answering node has no tunnel counters: {text}"
        );
        // An IPv4-only node has no IPv6 pool.
        let mut v4_only = status.clone();
        v4_only.node.pod_cidr6 = None;
        let text4 = render(&Snapshot {
            status: &v4_only,
            endpoints: &[],
            nodes: &[],
            policy_flows: BTreeMap::new(),
        });
        assert!(
            text4.contains(r#"hypha_ipam_addresses{family="ipv4",state="allocated"} 1"#)
                && !text4.contains(r#"family="ipv6""#),
            "{text4}"
        );
        // Every sample line belongs to a declared family.
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap();
            assert!(families.contains(&name), "{name} has no TYPE line");
        }
    }
}
