//! The operator's commands that talk to a running agent: `hypha status`, `hypha endpoint
//! list`, `hypha policy ...`, `hypha service ...`, `hypha namespace label`, `hypha node
//! ...`, `hypha identity list`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hypha_api::{
    ApplyPoliciesResponse, ApplyServicesResponse, ClusterStatus, DirectionPolicy, Endpoint,
    EndpointPolicy, IdentityInfo, NamespaceLabelsRequest, NodeInfo, PacketCount, PolicySource,
    PolicySummary, RemoveNodeResponse, RoutingStatus, ServiceInfo, Status,
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

/// The files `hypha policy apply -f` and `hypha service apply -f` send: a file as it is,
/// a directory's `*.yaml`, `*.yml` and `*.json` files in name order.
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

/// `hypha service delete`'s target: `NAMESPACE/NAME`, or `NAME` in `namespace` (`-n`,
/// default `default`); both a `NAMESPACE/` and another `-n` is an error.
pub fn parse_service_ref(arg: &str, namespace: Option<&str>) -> Result<(String, String), String> {
    let (ns, name) = match arg.split_once('/') {
        Some((ns, name)) => {
            if let Some(n) = namespace
                && n != ns
            {
                return Err(format!(
                    "{arg:?} names namespace {ns:?} but -n says {n:?}: give one of them"
                ));
            }
            (ns, name)
        }
        None => (namespace.unwrap_or(crate::policy::DEFAULT_NAMESPACE), arg),
    };
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        return Err(format!(
            "{arg:?} is not a service: give NAMESPACE/NAME, or NAME with -n NAMESPACE"
        ));
    }
    Ok((ns.to_owned(), name.to_owned()))
}

/// Renders `hypha service apply`'s answer.
pub fn format_services_applied(r: &ApplyServicesResponse) -> String {
    let mut out = String::new();
    for name in &r.applied {
        let _ = writeln!(out, "service {name} applied");
    }
    for name in &r.slices {
        let _ = writeln!(out, "endpointslice {name} applied");
    }
    let _ = writeln!(
        out,
        "datapath programmed in {:.1} ms",
        r.program_us as f64 / 1000.0
    );
    out
}

/// `address:port`, the IPv6 address bracketed.
fn host_port(addr: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

/// Renders `hypha service list`: a row per service as `kubectl get services` has it
/// (PORT(S) `80/TCP`, or `80:30080/TCP` with a NodePort), then under it each port with
/// its target and backends, `addr:port (node) conns=N`.
pub fn format_services(services: &[ServiceInfo]) -> String {
    let header = [
        "NAMESPACE/NAME",
        "TYPE",
        "CLUSTER-IP(S)",
        "PORT(S)",
        "AFFINITY",
        "TRAFFIC(EXT/INT)",
        "SOURCE",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for s in services {
        let ports = s.ports.iter().map(|p| match p.node_port {
            Some(np) => format!("{}:{np}/{}", p.port, p.protocol),
            None => format!("{}/{}", p.port, p.protocol),
        });
        rows.push(vec![
            format!("{}/{}", s.namespace, s.name),
            s.kind.clone(),
            list_or_dash(s.cluster_ips.iter().map(|a| a.to_string())),
            list_or_dash(ports),
            s.session_affinity_timeout
                .map_or_else(|| "-".to_owned(), |t| format!("ClientIP {t}s")),
            format!(
                "{}/{}",
                s.external_traffic_policy, s.internal_traffic_policy
            ),
            s.source.clone(),
        ]);
    }
    let text = table(&rows);
    let mut lines = text.lines();
    let mut out = String::new();
    if let Some(h) = lines.next() {
        let _ = writeln!(out, "{h}");
    }
    for (s, line) in services.iter().zip(lines) {
        let _ = writeln!(out, "{line}");
        for p in &s.ports {
            let name = if p.name.is_empty() {
                String::new()
            } else {
                format!(" {}", p.name)
            };
            let backends = match p.backends.len() {
                0 => "no backends (connections are refused)".to_owned(),
                1 => "1 backend".to_owned(),
                n => format!("{n} backends"),
            };
            let _ = writeln!(
                out,
                "  port{name} {}/{} -> {}: {backends}",
                p.port, p.protocol, p.target_port
            );
            for b in &p.backends {
                let node = if b.node.is_empty() { "-" } else { &b.node };
                let mut line = format!(
                    "    {} ({node}) conns={}",
                    host_port(b.address, b.port),
                    b.connections
                );
                if b.packets > 0 {
                    let _ = write!(
                        line,
                        " nodeport={}",
                        pkts(PacketCount {
                            packets: b.packets,
                            bytes: b.bytes
                        })
                    );
                }
                let _ = writeln!(out, "{line}");
            }
        }
    }
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
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let _ = writeln!(
        out,
        "Services:   {}, {}, {}",
        plural(s.services.services, "service", "services"),
        plural(s.services.frontends, "frontend", "frontends"),
        plural(s.services.backends, "backend", "backends"),
    );
    if let Some(c) = &s.cluster {
        out.push_str(&format_cluster_status(c, unix_ms_now()));
    }
    if let Some(r) = &s.routing {
        out.push_str(&format_routing_status(r));
    }
    out
}

/// The routing section of `hypha status` (cluster mode): how pods reach other nodes'
/// pods, and what the tunnel refused before reaching any endpoint.
pub fn format_routing_status(r: &RoutingStatus) -> String {
    let mut out = String::new();
    let mut parts = vec![r.mode.clone()];
    match (&r.device, r.port) {
        (Some(d), Some(p)) => parts.push(format!("device {d} (UDP {p})")),
        (Some(d), None) => parts.push(format!("device {d}")),
        (None, Some(p)) => parts.push(format!("UDP {p}")),
        (None, None) => {}
    }
    parts.push(format!("pod MTU {}", r.mtu));
    parts.push(format!(
        "{} {}",
        r.peers,
        if r.peers == 1 { "peer" } else { "peers" }
    ));
    let _ = writeln!(out, "Routing:    {}", parts.join(", "));
    for d in &r.drops {
        let _ = writeln!(
            out,
            "            dropped {} {} packets ({}): {}",
            d.packets,
            d.direction,
            human_bytes(d.bytes),
            d.reason
        );
    }
    out
}

/// The cluster section of `hypha status`; `now_ms` (Unix milliseconds) dates the last
/// sync.
pub fn format_cluster_status(c: &ClusterStatus, now_ms: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Cluster:    node {}, store {}",
        c.node_name,
        c.store.join(",")
    );
    let state = if c.connected {
        "connected".to_owned()
    } else {
        match &c.error {
            Some(e) => format!("disconnected ({e}); retrying with backoff"),
            None => "disconnected; retrying with backoff".to_owned(),
        }
    };
    let _ = writeln!(out, "            {state}");
    let sync = c
        .last_sync_unix_ms
        .map_or_else(|| "never".to_owned(), |t| age(now_ms, t));
    let _ = writeln!(
        out,
        "            revision {} seen, last full sync {sync} ({} so far)",
        c.revision, c.resyncs
    );
    let _ = writeln!(
        out,
        "            {} nodes known, {} remote endpoints",
        c.nodes, c.remote_endpoints
    );
    out
}

/// How long before `now_ms` the moment `then_ms` was (both Unix milliseconds): `1.5s
/// ago`, `3m20s ago`; a moment in the future (clocks apart) is `just now`.
fn age(now_ms: u64, then_ms: u64) -> String {
    let Some(ms) = now_ms.checked_sub(then_ms) else {
        return "just now".to_owned();
    };
    let secs = ms / 1000;
    match secs {
        0..60 => format!("{}.{}s ago", secs, (ms % 1000) / 100),
        60..3600 => format!("{}m{}s ago", secs / 60, secs % 60),
        _ => format!("{}h{}m ago", secs / 3600, (secs % 3600) / 60),
    }
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Renders `hypha node list` as a table, `now_ms` (Unix milliseconds) dating the
/// heartbeats. The answering node's name is marked `*`; a node whose lease is gone says
/// so in HEARTBEAT. TX, RX and DROP are the packets/bytes the answering node sent to,
/// received from and dropped of each other node through the tunnel (`-` without one).
pub fn format_nodes(nodes: &[NodeInfo], now_ms: u64) -> String {
    let header = [
        "NAME",
        "ADDRESSES",
        "POD-CIDRS",
        "HEARTBEAT",
        "ENDPOINTS",
        "TX",
        "RX",
        "DROP",
        "VERSION",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for n in nodes {
        // Tunnel traffic with that node as this one counted it (`-`: this node, or no
        // tunnel).
        let traffic = |c: fn(&hypha_api::NodeTraffic) -> PacketCount| {
            n.tunnel
                .as_ref()
                .map_or_else(|| "-".to_owned(), |t| pkts(c(t)))
        };
        let cidrs: Vec<String> = n
            .pod_cidr
            .map(|c| c.to_string())
            .into_iter()
            .chain(n.pod_cidr6.map(|c| c.to_string()))
            .collect();
        let heartbeat = match (n.heartbeat_unix_ms, n.alive) {
            (Some(t), true) => age(now_ms, t),
            (Some(t), false) => format!("{} (lease gone)", age(now_ms, t)),
            (None, _) => "- (lease gone)".to_owned(),
        };
        rows.push(vec![
            if n.local {
                format!("{}*", n.name)
            } else {
                n.name.clone()
            },
            list_or_dash(n.addresses.iter().map(|a| a.to_string())),
            list_or_dash(cidrs.into_iter()),
            heartbeat,
            n.endpoints.to_string(),
            traffic(|t| t.tx),
            traffic(|t| t.rx),
            traffic(|t| t.dropped),
            n.version.clone(),
        ]);
    }
    table(&rows)
}

fn list_or_dash(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "-".to_owned()
    } else {
        v.join(",")
    }
}

/// Renders `hypha node remove`'s answer.
pub fn format_removed_node(r: &RemoveNodeResponse) -> String {
    let cidrs = list_or_dash(
        r.pod_cidr
            .map(|c| c.to_string())
            .into_iter()
            .chain(r.pod_cidr6.map(|c| c.to_string())),
    );
    format!(
        "node {} removed: pod CIDRs {cidrs} released, {} endpoints withdrawn\n",
        r.name, r.endpoints
    )
}

/// Renders `hypha identity list` as a table: ID, KIND (`labels`, `cidr`, `reserved`),
/// what it stands for (`namespace` and labels, the CIDR, or the reserved name), and how
/// many endpoints of this node and of others have it.
pub fn format_identities(ids: &[IdentityInfo]) -> String {
    let header = ["ID", "KIND", "NAMESPACE", "LABELS", "LOCAL", "REMOTE"];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for i in ids {
        let what = if let Some(cidr) = i.cidr {
            format!("cidr={cidr}")
        } else if let Some(r) = &i.reserved {
            format!("reserved:{r}")
        } else {
            list_or_dash(i.labels.iter().map(|(k, v)| format!("{k}={v}")))
        };
        rows.push(vec![
            i.id.to_string(),
            i.kind.clone(),
            i.namespace.clone().unwrap_or_else(|| "-".to_owned()),
            what,
            i.local_endpoints.to_string(),
            i.remote_endpoints.to_string(),
        ]);
    }
    table(&rows)
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
/// pod-to-pod by the eBPF datapath; TUNNEL the part to and from pods of other nodes
/// through the tunnel; LIMIT is the rate limit in bits per second. IPV4 and
/// IPV6 are its addresses (`-` for a family it has none of).
pub fn format_endpoints(eps: &[Endpoint]) -> String {
    let header = [
        "ID",
        "CONTAINER",
        "IF",
        "IPV4",
        "IPV6",
        "IDENTITY",
        "HOST-IF",
        "TX",
        "TX-REDIR",
        "TX-TUNNEL",
        "RX",
        "RX-REDIR",
        "RX-TUNNEL",
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
            e.identity.map_or_else(|| "-".into(), |i| i.to_string()),
            e.host_ifname.clone(),
            pkts(c.egress.forwarded()),
            pkts(c.egress.redirected),
            pkts(c.egress.tunnel),
            pkts(c.ingress.forwarded()),
            pkts(c.ingress.redirected),
            pkts(c.ingress.tunnel),
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
    // A service backend's destination: the service it was reached through.
    let destination = match &e.service {
        Some(svc) => format!("{} (svc {svc})", ports(e.destination, e.destination_port)),
        None => ports(e.destination, e.destination_port),
    };
    let mut text = format!(
        "{what} {endpoint} {}: {} -> {destination} {} {}B identity {}",
        e.direction,
        ports(e.source, e.source_port),
        e.protocol,
        e.bytes,
        e.remote_identity
    );
    if let Some(labels) = &e.remote_labels {
        text.push_str(&format!(" ({labels})"));
    }
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
                    tunnel: PacketCount {
                        packets: 5,
                        bytes: 3 * 1024 * 1024,
                    },
                    dropped: PacketCount {
                        packets: 2,
                        bytes: 60,
                    },
                },
                ingress: DirectionCounters {
                    tunnel: PacketCount {
                        packets: 4,
                        bytes: 400,
                    },
                    ..DirectionCounters::default()
                },
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
        let identity_col = lines[0].find("IDENTITY").expect("an IDENTITY column");
        assert!(
            lines[1][identity_col..].starts_with("300 "),
            "the endpoint's identity under IDENTITY: {text}"
        );
        assert!(
            lines[1].contains("15/3.0MiB"),
            "forwarded = passed + redirected + tunnel: {text}"
        );
        assert!(lines[1].contains("9/2.0KiB"), "{text}");
        // The tunnel's share each way, under its own column.
        let cell = |name: &str| {
            let col = lines[0].find(name).expect(name);
            lines[1][col..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(cell("TX-TUNNEL"), "5/3.0MiB", "{text}");
        assert_eq!(cell("RX-TUNNEL"), "4/400B", "{text}");
        assert_eq!(cell("RX "), "4/400B", "received = its tunnel part: {text}");
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

    fn service(name: &str, ips: &[&str], ports: Vec<hypha_api::ServicePortInfo>) -> ServiceInfo {
        ServiceInfo {
            namespace: "default".into(),
            name: name.into(),
            kind: "ClusterIP".into(),
            cluster_ips: ips.iter().map(|a| a.parse().unwrap()).collect(),
            ports,
            session_affinity_timeout: None,
            external_traffic_policy: "Cluster".into(),
            internal_traffic_policy: "Cluster".into(),
            source: "api: web.yaml".into(),
        }
    }

    fn port(
        name: &str,
        proto: &str,
        port: u16,
        node_port: Option<u16>,
        backends: Vec<hypha_api::ServiceBackendInfo>,
    ) -> hypha_api::ServicePortInfo {
        hypha_api::ServicePortInfo {
            name: name.into(),
            protocol: proto.into(),
            port,
            target_port: "8080".into(),
            node_port,
            backends,
        }
    }

    fn backend(addr: &str, node: &str, conns: u64) -> hypha_api::ServiceBackendInfo {
        hypha_api::ServiceBackendInfo {
            address: addr.parse().unwrap(),
            port: 8080,
            node: node.into(),
            pod: "p".into(),
            connections: conns,
            packets: 0,
            bytes: 0,
        }
    }

    #[test]
    fn service_table_prints_ports_as_kubectl_and_backends_per_port() {
        let web = ServiceInfo {
            kind: "NodePort".into(),
            session_affinity_timeout: Some(10_800),
            external_traffic_policy: "Local".into(),
            ..service(
                "web",
                &["10.96.0.10", "fd00:10:96::a"],
                vec![
                    port(
                        "http",
                        "TCP",
                        80,
                        Some(30_080),
                        vec![
                            backend("10.244.0.5", "node-0", 12),
                            hypha_api::ServiceBackendInfo {
                                packets: 4,
                                bytes: 2048,
                                ..backend("fd00:10:244:1::7", "", 3)
                            },
                        ],
                    ),
                    port("dns", "UDP", 53, None, vec![]),
                ],
            )
        };
        let db = service(
            "db",
            &["10.96.0.11"],
            vec![port("", "TCP", 5432, None, vec![])],
        );
        let text = format_services(&[web, db]);
        let lines: Vec<&str> = text.lines().collect();
        let rows: Vec<Vec<&str>> = [lines[0], lines[1]]
            .iter()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0],
            [
                "NAMESPACE/NAME",
                "TYPE",
                "CLUSTER-IP(S)",
                "PORT(S)",
                "AFFINITY",
                "TRAFFIC(EXT/INT)",
                "SOURCE"
            ],
            "{text}"
        );
        assert_eq!(
            rows[1],
            [
                "default/web",
                "NodePort",
                "10.96.0.10,fd00:10:96::a",
                "80:30080/TCP,53/UDP",
                "ClientIP",
                "10800s",
                "Local/Cluster",
                "api:",
                "web.yaml"
            ],
            "{text}"
        );
        assert_eq!(lines[2], "  port http 80/TCP -> 8080: 2 backends", "{text}");
        assert_eq!(lines[3], "    10.244.0.5:8080 (node-0) conns=12", "{text}");
        assert_eq!(
            lines[4], "    [fd00:10:244:1::7]:8080 (-) conns=3 nodeport=4/2.0KiB",
            "{text}"
        );
        assert_eq!(
            lines[5], "  port dns 53/UDP -> 8080: no backends (connections are refused)",
            "{text}"
        );
        assert!(lines[6].starts_with("default/db "), "{text}");
        assert!(lines[6].contains(" 5432/TCP "), "{text}");
        assert!(lines[6].contains(" - "), "no affinity: {text}");
        assert_eq!(
            lines[7], "  port 5432/TCP -> 8080: no backends (connections are refused)",
            "{text}"
        );
        assert_eq!(lines.len(), 8, "{text}");
        // The columns line up.
        let col = lines[0].find("PORT(S)").unwrap();
        assert_eq!(&lines[1][col..col + 12], "80:30080/TCP", "{text}");
        assert_eq!(&lines[6][col..col + 8], "5432/TCP", "{text}");
        assert_eq!(format_services(&[]).lines().count(), 1);
    }

    #[test]
    fn service_refs_take_a_namespace_from_the_name_or_from_n() {
        let r = |arg: &str, ns: Option<&str>| parse_service_ref(arg, ns);
        assert_eq!(r("shop/web", None).unwrap(), ("shop".into(), "web".into()));
        assert_eq!(r("web", None).unwrap(), ("default".into(), "web".into()));
        assert_eq!(
            r("web", Some("shop")).unwrap(),
            ("shop".into(), "web".into())
        );
        assert_eq!(
            r("shop/web", Some("shop")).unwrap(),
            ("shop".into(), "web".into())
        );
        let err = r("shop/web", Some("prod")).unwrap_err();
        assert!(err.contains("shop") && err.contains("prod"), "{err}");
        for bad in ["/web", "shop/", "a/b/c", ""] {
            let err = r(bad, None).unwrap_err();
            assert!(err.contains("NAMESPACE/NAME"), "{bad}: {err}");
        }
    }

    #[test]
    fn applied_services_are_named_with_the_programming_time() {
        let r = ApplyServicesResponse {
            applied: vec!["default/web".into()],
            slices: vec!["default/web-1".into()],
            program_us: 1_250,
        };
        assert_eq!(
            format_services_applied(&r),
            "service default/web applied\nendpointslice default/web-1 applied\ndatapath programmed in 1.2 ms\n"
        );
    }

    #[test]
    fn status_counts_services_frontends_and_backends() {
        let text = format_status(&status(true, true));
        assert!(
            text.lines()
                .any(|l| l == "Services:   0 services, 0 frontends, 0 backends"),
            "{text}"
        );
        let mut s = status(true, true);
        let svcs = [
            ServiceInfo {
                kind: "NodePort".into(),
                ..service(
                    "web",
                    &["10.96.0.10", "fd00:10:96::a"],
                    vec![port(
                        "http",
                        "TCP",
                        80,
                        Some(30_080),
                        vec![backend("10.244.0.5", "n", 0), backend("10.244.0.6", "n", 0)],
                    )],
                )
            },
            // The same backend behind another service counts once.
            service(
                "web2",
                &["10.96.0.12"],
                vec![port(
                    "",
                    "TCP",
                    80,
                    None,
                    vec![backend("10.244.0.5", "n", 0)],
                )],
            ),
        ];
        s.services = hypha_api::ServicesStatus::of(&svcs);
        assert_eq!(
            (
                s.services.services,
                s.services.frontends,
                s.services.backends
            ),
            (2, 4, 2)
        );
        let text = format_status(&s);
        assert!(
            text.contains("\nServices:   2 services, 4 frontends, 2 backends\n"),
            "{text}"
        );
        s.services = hypha_api::ServicesStatus {
            services: 1,
            frontends: 1,
            backends: 1,
        };
        assert!(
            format_status(&s).contains("Services:   1 service, 1 frontend, 1 backend\n"),
            "{text}"
        );
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

    fn node(name: &str, heartbeat: Option<u64>, alive: bool, local: bool) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            addresses: vec![
                "172.16.0.11".parse().unwrap(),
                "fd00:1::11".parse().unwrap(),
            ],
            pod_cidr: Some("10.244.1.0/24".parse().unwrap()),
            pod_cidr6: Some("fd00:10:244:1::/64".parse().unwrap()),
            version: "0.1.0".into(),
            heartbeat_unix_ms: heartbeat,
            alive,
            endpoints: 4,
            local,
            tunnel: None,
        }
    }

    #[test]
    fn node_table_has_one_row_per_node_with_its_heartbeat_age() {
        let now = 1_000_000;
        let nodes = [
            node("node-0", Some(now - 1_500), true, true),
            NodeInfo {
                tunnel: Some(hypha_api::NodeTraffic {
                    tx: PacketCount {
                        packets: 12,
                        bytes: 2048,
                    },
                    rx: PacketCount {
                        packets: 10,
                        bytes: 1000,
                    },
                    dropped: PacketCount {
                        packets: 3,
                        bytes: 180,
                    },
                }),
                ..node("node-1", Some(now - 200_000), false, false)
            },
            NodeInfo {
                addresses: vec![],
                pod_cidr6: None,
                ..node("node-2", None, false, false)
            },
        ];
        let text = format_nodes(&nodes, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            [
                "NAME",
                "ADDRESSES",
                "POD-CIDRS",
                "HEARTBEAT",
                "ENDPOINTS",
                "TX",
                "RX",
                "DROP",
                "VERSION"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "node-0*",
                "172.16.0.11,fd00:1::11",
                "10.244.1.0/24,fd00:10:244:1::/64",
                "1.5s",
                "ago",
                "4",
                "-",
                "-",
                "-",
                "0.1.0"
            ],
            "{text}"
        );
        assert!(
            lines[2].starts_with("node-1 ") && lines[2].contains(" 3m20s ago (lease gone) "),
            "{text}"
        );
        // Its tunnel traffic, under TX, RX and DROP.
        let cell = |name: &str| {
            let col = lines[0].find(name).expect(name);
            lines[2][col..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            [cell(" TX "), cell(" RX "), cell(" DROP ")],
            ["12/2.0KiB", "10/1000B", "3/180B"],
            "{text}"
        );
        assert!(
            lines[3].starts_with("node-2 ")
                && lines[3].contains(" - ")
                && lines[3].contains(" 10.244.1.0/24 ")
                && lines[3].contains("- (lease gone)"),
            "{text}"
        );
        // The columns line up: every row's HEARTBEAT starts where the header's does.
        let col = lines[0].find("HEARTBEAT").unwrap();
        for l in &lines[1..] {
            assert_eq!(&l[col - 1..col], " ", "{text}");
            assert!(!l[col..].starts_with(' '), "{text}");
        }
        assert_eq!(format_nodes(&[], now).lines().count(), 1);
    }

    #[test]
    fn heartbeat_ages_read_naturally() {
        assert_eq!(age(10_000, 10_000), "0.0s ago");
        assert_eq!(age(10_000, 9_750), "0.2s ago");
        assert_eq!(age(100_000, 40_000), "1m0s ago");
        assert_eq!(age(10_000_000, 0), "2h46m ago");
        assert_eq!(age(0, 5), "just now");
    }

    #[test]
    fn identity_table_names_what_each_identity_stands_for() {
        let ids = [
            IdentityInfo {
                id: 1,
                kind: "reserved".into(),
                namespace: None,
                labels: Default::default(),
                cidr: None,
                reserved: Some("host".into()),
                local_endpoints: 0,
                remote_endpoints: 0,
            },
            IdentityInfo {
                id: 300,
                kind: "labels".into(),
                namespace: Some("shop".into()),
                labels: [
                    ("app".to_owned(), "web".to_owned()),
                    ("tier".to_owned(), "a".to_owned()),
                ]
                .into(),
                cidr: None,
                reserved: None,
                local_endpoints: 2,
                remote_endpoints: 5,
            },
            IdentityInfo {
                id: 16_777_217,
                kind: "cidr".into(),
                namespace: None,
                labels: Default::default(),
                cidr: Some("192.0.2.0/24".parse().unwrap()),
                reserved: None,
                local_endpoints: 0,
                remote_endpoints: 0,
            },
        ];
        let text = format_identities(&ids);
        let rows: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec!["ID", "KIND", "NAMESPACE", "LABELS", "LOCAL", "REMOTE"],
                vec!["1", "reserved", "-", "reserved:host", "0", "0"],
                vec!["300", "labels", "shop", "app=web,tier=a", "2", "5"],
                vec!["16777217", "cidr", "-", "cidr=192.0.2.0/24", "0", "0"],
            ],
            "{text}"
        );
    }

    #[test]
    fn removed_node_says_what_left_the_store() {
        let r = RemoveNodeResponse {
            name: "node-2".into(),
            pod_cidr: Some("10.244.2.0/24".parse().unwrap()),
            pod_cidr6: None,
            endpoints: 3,
        };
        assert_eq!(
            format_removed_node(&r),
            "node node-2 removed: pod CIDRs 10.244.2.0/24 released, 3 endpoints withdrawn\n"
        );
    }

    #[test]
    fn status_shows_the_routing_section_only_in_cluster_mode() {
        let text = format_status(&status(true, true));
        assert!(!text.contains("Routing:"), "{text}");

        let mut s = status(true, true);
        s.routing = Some(RoutingStatus {
            mode: "tunnel".into(),
            device: Some("hypha_vxlan".into()),
            port: Some(8472),
            mtu: 1450,
            peers: 2,
            drops: vec![hypha_api::DropCount {
                reason: "unknown-tunnel-source".into(),
                direction: "ingress".into(),
                packets: 3,
                bytes: 2048,
            }],
        });
        let text = format_status(&s);
        assert!(
            text.contains(
                "Routing:    tunnel, device hypha_vxlan (UDP 8472), pod MTU 1450, 2 peers\n            dropped 3 ingress packets (2.0KiB): unknown-tunnel-source\n"
            ),
            "{text}"
        );
        let native = RoutingStatus {
            mode: "native".into(),
            device: None,
            port: None,
            mtu: 1500,
            peers: 1,
            drops: vec![],
        };
        assert_eq!(
            format_routing_status(&native),
            "Routing:    native, pod MTU 1500, 1 peer\n"
        );
    }

    #[test]
    fn status_shows_the_cluster_section_only_in_cluster_mode() {
        let text = format_status(&status(true, true));
        assert!(!text.contains("Cluster:"), "{text}");

        let mut s = status(true, true);
        s.cluster = Some(ClusterStatus {
            node_name: "node-1".into(),
            store: vec![
                "http://172.16.0.1:2379".into(),
                "http://172.16.0.2:2379".into(),
            ],
            connected: true,
            revision: 42,
            last_sync_unix_ms: Some(unix_ms_now()),
            nodes: 3,
            remote_endpoints: 7,
            resyncs: 2,
            error: None,
        });
        let text = format_status(&s);
        assert!(
            text.contains(
                "Cluster:    node node-1, store http://172.16.0.1:2379,http://172.16.0.2:2379\n            connected\n"
            ),
            "{text}"
        );
        assert!(text.contains("revision 42 seen, last full sync "), "{text}");
        assert!(text.contains(" (2 so far)"), "{text}");
        assert!(text.contains("3 nodes known, 7 remote endpoints"), "{text}");

        let c = ClusterStatus {
            connected: false,
            error: Some("etcd at http://172.16.0.1:2379: connection refused".into()),
            last_sync_unix_ms: None,
            ..s.cluster.clone().unwrap()
        };
        let text = format_cluster_status(&c, 0);
        assert!(
            text.contains("disconnected (etcd at http://172.16.0.1:2379: connection refused); retrying with backoff"),
            "{text}"
        );
        assert!(text.contains("last full sync never"), "{text}");
        let c = ClusterStatus {
            last_sync_unix_ms: Some(1_000),
            ..c
        };
        assert!(
            format_cluster_status(&c, 4_000).contains("last full sync 3.0s ago (2 so far)"),
            "{text}"
        );
    }
}
