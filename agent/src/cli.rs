//! The operator's commands that talk to a running agent: `hypha status`, `hypha endpoint
//! list`, `hypha policy ...`, `hypha namespace label`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hypha_api::{
    ApplyPoliciesResponse, DirectionPolicy, Endpoint, EndpointPolicy, NamespaceLabelsRequest,
    PacketCount, PolicySource, PolicySummary, Status,
};

/// Whether a directory entry is a policy file: `*.yaml`, `*.yml` or `*.json`.
pub fn is_policy_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

/// Why policy files cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct ReadPoliciesError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The files `hypha policy apply -f` sends: a file as it is, a directory's `*.yaml`,
/// `*.yml` and `*.json` files in name order.
pub fn read_policy_files(paths: &[PathBuf]) -> Result<Vec<PolicySource>, ReadPoliciesError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| ReadPoliciesError { path, source }
    };
    let mut out = Vec::new();
    for path in paths {
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(err(path))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_policy_file(p) && p.is_file())
                .collect();
            files.sort();
            files
        } else {
            vec![path.clone()]
        };
        for f in files {
            let content = std::fs::read_to_string(&f).map_err(err(&f))?;
            out.push(PolicySource {
                source: f.display().to_string(),
                content,
            });
        }
    }
    Ok(out)
}

/// `k=v` sets, `k-` removes (as `kubectl label`).
pub fn parse_label_args(args: &[String]) -> Result<NamespaceLabelsRequest, String> {
    let mut req = NamespaceLabelsRequest::default();
    for a in args {
        if let Some((k, v)) = a.split_once('=') {
            if k.is_empty() {
                return Err(format!("{a:?}: the label key is empty"));
            }
            req.set.insert(k.to_owned(), v.to_owned());
        } else if let Some(k) = a.strip_suffix('-')
            && !k.is_empty()
        {
            req.remove.push(k.to_owned());
        } else {
            return Err(format!(
                "{a:?} is neither KEY=VALUE (to set a label) nor KEY- (to remove one)"
            ));
        }
    }
    Ok(req)
}

/// Renders `hypha policy apply`'s answer.
pub fn format_applied(r: &ApplyPoliciesResponse) -> String {
    let mut out = String::new();
    for name in &r.applied {
        let _ = writeln!(out, "policy {name} applied");
    }
    let _ = writeln!(
        out,
        "{} policy entries written, {} removed",
        r.entries_set, r.entries_removed
    );
    out
}

/// Renders `hypha policy list` as a table.
pub fn format_policies(ps: &[PolicySummary]) -> String {
    let header = [
        "NAMESPACE",
        "NAME",
        "KIND",
        "ID",
        "DIRECTIONS",
        "AUDIT",
        "RULES",
        "ENDPOINTS",
        "SOURCE",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for p in ps {
        let dirs: Vec<&str> = [(p.ingress, "ingress"), (p.egress, "egress")]
            .into_iter()
            .filter_map(|(on, n)| on.then_some(n))
            .collect();
        rows.push(vec![
            p.namespace.clone(),
            p.name.clone(),
            p.kind.clone(),
            p.id.to_string(),
            if dirs.is_empty() {
                "-".into()
            } else {
                dirs.join(",")
            },
            if p.audit { "yes" } else { "no" }.into(),
            format!("{} allow, {} deny", p.allow_rules, p.deny_rules),
            if p.selected_endpoints.is_empty() {
                "-".into()
            } else {
                p.selected_endpoints
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
            p.source.clone(),
        ]);
    }
    table(&rows)
}

/// Renders `hypha policy get ENDPOINT`.
pub fn format_endpoint_policy(p: &EndpointPolicy) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Endpoint {} (container {}), namespace {}, identity {} ({})",
        p.endpoint_id,
        p.container_id.chars().take(12).collect::<String>(),
        p.namespace,
        p.identity,
        p.identity_labels
    );
    for (name, d) in [("Ingress", &p.ingress), ("Egress", &p.egress)] {
        let _ = writeln!(out, "{name}: {}", direction_state(d));
        if d.entries.is_empty() {
            continue;
        }
        let mut rows = vec![
            ["ACTION", "PEER", "IDENTITY", "PROTO", "PORT", "POLICY"]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        ];
        for e in &d.entries {
            rows.push(vec![
                format!("{}{}", e.action, if e.audit { " (audit)" } else { "" }),
                e.peer.clone(),
                e.identity.to_string(),
                e.protocol.clone(),
                if e.port == 0 {
                    "any".into()
                } else {
                    e.port.to_string()
                },
                e.policy.clone(),
            ]);
        }
        for line in table(&rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    for u in &p.unresolved_ports {
        let _ = writeln!(out, "Unresolved: {u} (matches nothing)");
    }
    out
}

fn direction_state(d: &DirectionPolicy) -> String {
    if !d.enforced {
        return "not enforced: no policy selects it, everything passes".into();
    }
    let mode = if d.audit {
        "audit (what no entry allows is reported and passed)"
    } else {
        "enforced (only what an entry allows passes)"
    };
    format!("{mode}; policies: {}", d.policies.join(", "))
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// Renders a namespace's labels, `k=v` per line.
pub fn format_labels(labels: &BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

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
    // One line per family the node has: the IPv4 one first, as single-stack agents
    // printed it.
    let mut cidrs = Vec::new();
    if let Some(c) = s.node.pod_cidr {
        let gw = s.node.gateway.map(|g| g.to_string()).unwrap_or_default();
        cidrs.push(format!("{c} (gateway {gw} on {})", s.node.host_device));
    }
    if let Some(c) = s.node.pod_cidr6 {
        let gw = s.node.gateway6.map(|g| g.to_string()).unwrap_or_default();
        cidrs.push(format!("{c} (gateway {gw}, answered by the datapath)"));
    }
    if cidrs.is_empty() {
        cidrs.push("none".into());
    }
    for (i, c) in cidrs.iter().enumerate() {
        let label = if i == 0 { "Pod CIDR:" } else { "" };
        let _ = writeln!(out, "{label:<12}{c}");
    }
    let _ = writeln!(
        out,
        "Masquerade: {}",
        if s.node.masquerade { "on" } else { "off" }
    );
    let mut pools = Vec::new();
    if s.node.pod_cidr.is_some() {
        pools.push(format!(
            "IPv4 {} of {} addresses in use, {} available",
            s.ipam.allocated, s.ipam.capacity, s.ipam.available
        ));
    }
    if s.node.pod_cidr6.is_some() {
        pools.push(format!(
            "IPv6 {} of {} addresses in use, {} available",
            s.ipam.allocated6, s.ipam.capacity6, s.ipam.available6
        ));
    }
    for (i, p) in pools.iter().enumerate() {
        let label = if i == 0 { "IPAM:" } else { "" };
        let _ = writeln!(out, "{label:<12}{p}");
    }
    let _ = writeln!(
        out,
        "Endpoints:  {} ({} re-adopted at start)",
        s.endpoints, s.datapath.adopted_endpoints
    );
    let _ = writeln!(
        out,
        "Datapath:   {} pinned under {}, attached with {}",
        s.datapath.programs.join(", "),
        s.datapath.pin_dir,
        if s.datapath.attach.is_empty() {
            "tcx"
        } else {
            &s.datapath.attach
        }
    );
    let _ = writeln!(
        out,
        "Policy:     {} policies, {} entries, {} ipcache prefixes; watching {}",
        s.policy.policies, s.policy.entries, s.policy.ipcache, s.policy.policy_dir
    );
    for e in &s.policy.errors {
        if !s.policy.refused_files.iter().any(|r| r.error == *e) {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    for r in &s.policy.refused_files {
        let _ = writeln!(
            out,
            "  refused ({} attempts, retried with backoff; its previous policies stay): {}",
            r.attempts, r.error
        );
    }
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

/// A rate limit as `10M` (bits per second), or `-` for none.
fn limit(rate: Option<u64>) -> String {
    rate.map_or_else(|| "-".to_owned(), crate::bandwidth::human)
}

/// Renders `hypha endpoint list` as a table. Counters are packets/bytes in the pod's
/// directions: TX is what the pod sent, RX what it received; REDIR is the part moved
/// pod-to-pod by the eBPF datapath; LIMIT is the rate limit in bits per second. IPV4 and
/// IPV6 are its addresses (`-` for a family it has none of).
pub fn format_endpoints(eps: &[Endpoint]) -> String {
    let header = [
        "ID",
        "CONTAINER",
        "IF",
        "IPV4",
        "IPV6",
        "HOST-IF",
        "TX",
        "TX-REDIR",
        "RX",
        "RX-REDIR",
        "TX-LIMIT",
        "RX-LIMIT",
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
            e.address.map_or_else(|| "-".into(), |a| a.to_string()),
            e.address6.map_or_else(|| "-".into(), |a| a.to_string()),
            e.host_ifname.clone(),
            pkts(c.egress.forwarded()),
            pkts(c.egress.redirected),
            pkts(c.ingress.forwarded()),
            pkts(c.ingress.redirected),
            limit(e.bandwidth.and_then(|b| b.egress_rate)),
            limit(e.bandwidth.and_then(|b| b.ingress_rate)),
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
    for e in eps.iter().filter(|e| e.debug) {
        let _ = writeln!(
            out,
            "  endpoint {}: packets traced into the agent's log (hypha endpoint debug {} off)",
            e.id, e.id
        );
    }
    out
}

/// Renders one `hypha monitor` line (JSON from the agent) as text; anything that is not
/// an event (a note of lost events) is shown as it came.
pub fn format_event(line: &str) -> String {
    let Ok(e) = serde_json::from_str::<hypha_api::MonitorEvent>(line) else {
        return line.to_owned();
    };
    let what = match (&e.reason, e.kind.as_str()) {
        (Some(reason), _) => format!("DROP ({reason})"),
        (None, "policy-allow") => "ALLOW".to_owned(),
        (None, "policy-audit") => "AUDIT (would drop)".to_owned(),
        (None, other) => other.to_uppercase(),
    };
    let ports = |addr: std::net::IpAddr, port: u16| match (addr, port) {
        (_, 0) => addr.to_string(),
        (std::net::IpAddr::V6(a), _) => format!("[{a}]:{port}"),
        (std::net::IpAddr::V4(a), _) => format!("{a}:{port}"),
    };
    // Drops that are not policy verdicts name the endpoint by its host veth's ifindex.
    let endpoint = if e.endpoint_id == 0 {
        format!("ifindex {}", e.ifindex)
    } else {
        format!("endpoint {}", e.endpoint_id)
    };
    let mut text = format!(
        "{what} {endpoint} {}: {} -> {} {} {}B identity {}",
        e.direction,
        ports(e.source, e.source_port),
        ports(e.destination, e.destination_port),
        e.protocol,
        e.bytes,
        e.remote_identity
    );
    if let Some(policy) = &e.policy {
        text.push_str(&format!(" policy: {policy}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use hypha_api::{DirectionCounters, DropCount, EndpointCounters, MacAddr};

    use super::*;

    #[test]
    fn monitor_lines_read_as_sentences() {
        let line = r#"{"kind":"drop","direction":"ingress","endpoint_id":2,"ifindex":7,"reason":"policy-denied","policy":"no policy allows this","remote_identity":300,"protocol":"tcp","source":"10.0.0.1","source_port":40000,"destination":"10.0.0.2","destination_port":80,"bytes":60}"#;
        assert_eq!(
            format_event(line),
            "DROP (policy-denied) endpoint 2 ingress: 10.0.0.1:40000 -> 10.0.0.2:80 tcp 60B identity 300 policy: no policy allows this"
        );
        assert_eq!(format_event("{\"lost\":3}"), "{\"lost\":3}");
        let ipv6 = r#"{"kind":"drop","direction":"egress","endpoint_id":0,"ifindex":7,"reason":"unsupported-family","policy":null,"remote_identity":0,"protocol":"-","source":"0.0.0.0","source_port":0,"destination":"0.0.0.0","destination_port":0,"bytes":70}"#;
        assert_eq!(
            format_event(ipv6),
            "DROP (unsupported-family) ifindex 7 egress: 0.0.0.0 -> 0.0.0.0 - 70B identity 0"
        );
    }

    #[test]
    fn endpoint_table_shows_counters_and_drops() {
        let ep = Endpoint {
            id: 3,
            container_id: "0123456789abcdef".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/a".into(),
            host_ifname: "hyp0123456789ab".into(),
            host_ifindex: 9,
            address: Some("10.244.0.2".parse().unwrap()),
            address6: Some("fd00:10:244::2".parse().unwrap()),
            counters4: Default::default(),
            counters6: Default::default(),
            pod_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            host_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            labels: Default::default(),
            external_ipam: false,
            bandwidth: Some(hypha_api::Bandwidth {
                egress_rate: Some(10_000_000),
                ..hypha_api::Bandwidth::default()
            }),
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
            debug: true,
            ports: Vec::new(),
            identity: Some(300),
        };
        let text = format_endpoints(&[ep]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID  CONTAINER"), "{text}");
        assert!(
            lines[0].contains(" IPV4 ") && lines[0].contains(" IPV6 "),
            "{text}"
        );
        assert!(
            lines[1].contains(" 10.244.0.2 ") && lines[1].contains(" fd00:10:244::2 "),
            "both addresses: {text}"
        );
        assert!(
            lines[1].contains("0123456789ab ") && !lines[1].contains("0123456789abc"),
            "{text}"
        );
        assert!(
            lines[1].contains("10/2.1KiB"),
            "forwarded = passed + redirected: {text}"
        );
        assert!(lines[1].contains("9/2.0KiB"), "{text}");
        assert!(lines[1].ends_with("10M       -         2/60B"), "{text}");
        assert!(
            lines[2].contains("dropped 2 egress packets (60B): unknown-l3-protocol"),
            "{text}"
        );
        assert_eq!(
            lines[3],
            "  endpoint 3: packets traced into the agent's log (hypha endpoint debug 3 off)",
            "{text}"
        );
    }

    fn status(v4: bool, v6: bool) -> Status {
        serde_json::from_value(serde_json::json!({
            "version": "1", "uptime_seconds": 5,
            "node": {
                "pod_cidr": v4.then_some("10.244.0.0/24"),
                "gateway": v4.then_some("10.244.0.1"),
                "pod_cidr6": v6.then_some("fd00:10:244::/64"),
                "gateway6": v6.then_some("fe80::1"),
                "host_device": "lo", "masquerade": true, "socket": "/s", "state_dir": "/d"
            },
            "ipam": {
                "capacity": if v4 { 253 } else { 0 }, "allocated": if v4 { 2 } else { 0 },
                "available": if v4 { 251 } else { 0 },
                "capacity6": if v6 { u64::MAX - 128 } else { 0 },
                "allocated6": if v6 { 2 } else { 0 },
                "available6": if v6 { u64::MAX - 130 } else { 0 }
            },
            "datapath": {"pin_dir": "/p", "adopted_endpoints": 0, "programs": [], "attach": "tc"},
            "endpoints": 2,
            "policy": {"policies": 0, "entries": 0, "ipcache": 0, "policy_dir": "/e",
                       "errors": [], "refused_files": []}
        }))
        .unwrap()
    }

    #[test]
    fn status_shows_both_families() {
        let text = format_status(&status(true, true));
        for line in [
            "Pod CIDR:   10.244.0.0/24 (gateway 10.244.0.1 on lo)",
            "            fd00:10:244::/64 (gateway fe80::1, answered by the datapath)",
            "IPAM:       IPv4 2 of 253 addresses in use, 251 available",
            "            IPv6 2 of 18446744073709551487 addresses in use, 18446744073709551485 available",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let text = format_status(&status(false, true));
        assert!(
            text.contains("Pod CIDR:   fd00:10:244::/64 (gateway fe80::1"),
            "{text}"
        );
        assert!(text.contains("IPAM:       IPv6 2 of"), "{text}");
        assert!(!text.contains("IPv4"), "{text}");
        let text = format_status(&status(true, false));
        assert!(!text.contains("fd00") && !text.contains("IPv6"), "{text}");
    }
}
