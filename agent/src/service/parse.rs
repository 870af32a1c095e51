//! Service files as operators write them: Kubernetes `v1` `Service` and
//! `discovery.k8s.io/v1` `EndpointSlice`, YAML (several documents per file) or JSON, and
//! `v1` `List`s of them (what `kubectl get -o yaml` writes). Strict, as the policy parser
//! is: an unknown field, a malformed value or a feature Hypha does not implement rejects
//! the whole file, with a message naming the file, the document, the field path and the
//! reason; nothing asked for is dropped silently.
//!
//! Each document is read into a `serde_json::Value` first (YAML through serde_yaml_ng, so
//! syntax errors carry their line), then into the typed shapes below through
//! `serde_path_to_error`, so that type errors name their field path the same way for
//! YAML and JSON; what serde cannot check is checked by hand with the same paths.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::Value;

use super::{
    DEFAULT_AFFINITY_TIMEOUT_S, Document, EndpointSlice, IpFamily, IpFamilyPolicy, Labels,
    NODE_PORT_RANGE, Service, ServiceError, ServicePort, ServiceType, SliceEndpoint, SlicePort,
    TargetPort,
};
use crate::policy::{
    LabelSelector, ObjectMeta, PROTO_TCP, PROTO_UDP, is_dns_label, validate_port_name,
};

const SERVICE_API: &str = "v1";
const SLICE_API: &str = "discovery.k8s.io/v1";
/// The label naming the service an `EndpointSlice` serves.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Longest `sessionAffinityConfig.clientIP.timeoutSeconds` (Kubernetes' bound: a day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// Parses every document of one file; any error rejects the whole file. Any input costs
/// a bounded time and memory: the policy parser's limits are checked first
/// ([`crate::policy::limits`]).
pub fn parse_file(source: &str, content: &str) -> Result<Vec<Document>, ServiceError> {
    let invalid = |message: String| ServiceError::Invalid {
        source_name: source.to_owned(),
        message,
    };
    crate::policy::limits::check(source, content).map_err(|e| match e {
        crate::policy::PolicyError::Invalid { message, .. } => invalid(message),
        other => invalid(other.to_string()),
    })?;

    let values = if crate::policy::limits::is_json(content) {
        // JSON: one object (a document, or a List).
        vec![serde_json::from_str::<Value>(content).map_err(|e| invalid(e.to_string()))?]
    } else {
        let mut values = Vec::new();
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(content).enumerate() {
            match Value::deserialize(doc) {
                Ok(v) => values.push(v),
                // After a syntax error the iterator repeats it forever: stop at the first.
                Err(e) => {
                    let at = if i > 0 {
                        format!("document {}: ", i + 1)
                    } else {
                        String::new()
                    };
                    return Err(invalid(format!("{at}{e}")));
                }
            }
        }
        values
    };

    let many = values.len() > 1;
    let mut docs = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        let at = if many {
            format!("document {}: ", i + 1)
        } else {
            String::new()
        };
        if value.is_null() {
            continue; // an empty document, as after a trailing `---`
        }
        document(value, "", &mut docs).map_err(|m| invalid(format!("{at}{m}")))?;
    }

    let mut seen = BTreeSet::new();
    for d in &docs {
        let (kind, key) = match d {
            Document::Service(s) => ("Service", s.key()),
            Document::Slice(s) => ("EndpointSlice", s.key()),
        };
        if !seen.insert((kind, key.clone())) {
            return Err(invalid(format!(
                "{kind} {key} is defined twice in this file"
            )));
        }
    }
    Ok(docs)
}

/// Reads one document (`path` is its place in a List: `items[3].`, or empty) into `out`.
fn document(value: Value, path: &str, out: &mut Vec<Document>) -> Result<(), String> {
    let Value::Object(map) = &value else {
        return Err(format!(
            "{}a document must be a mapping with apiVersion and kind",
            at_path(path)
        ));
    };
    let text = |k: &str| map.get(k).and_then(Value::as_str).map(str::to_owned);
    let (Some(api), Some(kind)) = (text("apiVersion"), text("kind")) else {
        return Err(format!(
            "{}a document needs apiVersion and kind: `apiVersion: {SERVICE_API}` with \
             `kind: Service`, or `apiVersion: {SLICE_API}` with `kind: EndpointSlice`",
            at_path(path)
        ));
    };
    match (api.as_str(), kind.as_str()) {
        (SERVICE_API, "Service") => {
            let raw: RawService = typed(value, path)?;
            out.push(Document::Service(raw.into_service(path)?));
        }
        (SLICE_API, "EndpointSlice") => {
            let raw: RawSlice = typed(value, path)?;
            out.push(Document::Slice(raw.into_slice(path)?));
        }
        (SERVICE_API, "List") if path.is_empty() => {
            let raw: RawList = typed(value, path)?;
            for (i, item) in raw.items.into_iter().enumerate() {
                document(item, &format!("items[{i}]."), out)?;
            }
        }
        (_, "List") if path.is_empty() => {
            return Err(format!(
                "apiVersion {api} is not supported for List; use {SERVICE_API}"
            ));
        }
        (_, "List") => return Err(format!("{}a List may not hold a List", at_path(path))),
        (_, "Service") => {
            return Err(format!(
                "{}apiVersion {api} is not supported for Service; use {SERVICE_API}",
                at_path(path)
            ));
        }
        (_, "EndpointSlice") => {
            return Err(format!(
                "{}apiVersion {api} is not supported for EndpointSlice; use {SLICE_API}",
                at_path(path)
            ));
        }
        (SERVICE_API, "Endpoints") => {
            return Err(format!(
                "{}kind Endpoints is not supported: write the backends of a service without \
                 a selector as an EndpointSlice ({SLICE_API})",
                at_path(path)
            ));
        }
        _ => {
            return Err(format!(
                "{}kind {kind} ({api}) is not a service document: Hypha reads Service \
                 ({SERVICE_API}), EndpointSlice ({SLICE_API}) and List ({SERVICE_API}) of them",
                at_path(path)
            ));
        }
    }
    Ok(())
}

/// `items[3].` → `items[3]: `; empty stays empty.
fn at_path(path: &str) -> String {
    match path.strip_suffix('.') {
        Some(p) => format!("{p}: "),
        None => String::new(),
    }
}

/// Deserializes `value` as `T`, the error naming the field path under `path`.
fn typed<T: DeserializeOwned>(value: Value, path: &str) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        if field == "." || field.is_empty() {
            format!("{}{}", at_path(path), e.inner())
        } else {
            format!("{path}{field}: {}", e.inner())
        }
    })
}

// ---------------------------------------------------------------- metadata, List

/// An object's metadata ([`ObjectMeta`]), labels read (for slices).
type Meta = ObjectMeta<Labels>;

/// The object's namespace and name, checked, errors prefixed with `path`.
fn names(meta: &Meta, path: &str) -> Result<(String, String), String> {
    meta.names().map_err(|m| format!("{path}{m}"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawList {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(default)]
    items: Vec<Value>,
    #[serde(default, rename = "metadata")]
    _metadata: Option<IgnoredAny>,
}

// ---------------------------------------------------------------- Service

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawService {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: Meta,
    #[serde(default)]
    spec: RawServiceSpec,
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawServiceSpec {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Option<Vec<String>>,
    #[serde(default)]
    ip_families: Option<Vec<String>>,
    #[serde(default)]
    ip_family_policy: Option<String>,
    #[serde(default)]
    ports: Option<Vec<RawServicePort>>,
    #[serde(default)]
    selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    session_affinity: Option<String>,
    #[serde(default)]
    session_affinity_config: Option<RawAffinityConfig>,
    #[serde(default)]
    external_traffic_policy: Option<String>,
    #[serde(default)]
    internal_traffic_policy: Option<String>,
    #[serde(default)]
    publish_not_ready_addresses: Option<bool>,
    // Kubernetes fields Hypha does not implement: read only to be refused by name.
    #[serde(default, rename = "externalIPs")]
    external_ips: Option<IgnoredAny>,
    #[serde(default, rename = "externalName")]
    external_name: Option<IgnoredAny>,
    #[serde(default, rename = "loadBalancerIP")]
    load_balancer_ip: Option<IgnoredAny>,
    #[serde(default)]
    load_balancer_source_ranges: Option<IgnoredAny>,
    #[serde(default)]
    load_balancer_class: Option<IgnoredAny>,
    #[serde(default)]
    allocate_load_balancer_node_ports: Option<IgnoredAny>,
    #[serde(default)]
    health_check_node_port: Option<IgnoredAny>,
    #[serde(default)]
    traffic_distribution: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawServicePort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    port: i64,
    #[serde(default)]
    target_port: Option<Value>,
    #[serde(default)]
    node_port: Option<i64>,
    #[serde(default, rename = "appProtocol")]
    _app_protocol: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAffinityConfig {
    #[serde(default, rename = "clientIP")]
    client_ip: Option<RawClientIpConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawClientIpConfig {
    #[serde(default)]
    timeout_seconds: Option<i64>,
}

impl RawService {
    fn into_service(self, path: &str) -> Result<Service, String> {
        let (namespace, name) = names(&self.metadata, path)?;
        if !is_dns_label(&name) {
            return Err(format!(
                "{path}metadata.name {name:?} is not a valid service name (a DNS label: \
                 lowercase letters, digits and '-', at most 63, no '.')"
            ));
        }
        let spec = self.spec;
        let p = |field: &str| format!("{path}spec.{field}");

        let refused = [
            ("externalIPs", spec.external_ips.is_some()),
            ("externalName", spec.external_name.is_some()),
            ("loadBalancerIP", spec.load_balancer_ip.is_some()),
            (
                "loadBalancerSourceRanges",
                spec.load_balancer_source_ranges.is_some(),
            ),
            ("loadBalancerClass", spec.load_balancer_class.is_some()),
            (
                "allocateLoadBalancerNodePorts",
                spec.allocate_load_balancer_node_ports.is_some(),
            ),
            ("healthCheckNodePort", spec.health_check_node_port.is_some()),
            ("trafficDistribution", spec.traffic_distribution.is_some()),
        ];
        if let Some((field, _)) = refused.iter().find(|(_, given)| *given) {
            return Err(format!(
                "{}: is not supported by Hypha (it implements ClusterIP and NodePort \
                 services); remove it",
                p(field)
            ));
        }

        let kind = match spec.kind.as_deref() {
            None | Some("ClusterIP") => ServiceType::ClusterIP,
            Some("NodePort") => ServiceType::NodePort,
            Some(t @ ("LoadBalancer" | "ExternalName")) => {
                return Err(format!(
                    "{}: {t} services are not supported; Hypha implements ClusterIP and NodePort",
                    p("type")
                ));
            }
            Some(t) => {
                return Err(format!(
                    "{}: unknown type {t:?} (ClusterIP or NodePort)",
                    p("type")
                ));
            }
        };

        // Addresses as written: clusterIPs, or clusterIP; "" is "allocate one".
        let address = |s: &str, field: String| -> Result<IpAddr, String> {
            if s == "None" {
                return Err(format!(
                    "{field}: headless services (clusterIP: None) are not supported: Hypha \
                     load-balances a virtual address; give no clusterIP to have one allocated"
                ));
            }
            s.parse::<IpAddr>()
                .map_err(|_| format!("{field}: {s:?} is not an IP address"))
        };
        let mut cluster_ips = Vec::new();
        for (i, s) in spec.cluster_ips.iter().flatten().enumerate() {
            if s.is_empty() {
                continue;
            }
            cluster_ips.push(address(s, p(&format!("clusterIPs[{i}]")))?);
        }
        if let Some(s) = spec.cluster_ip.as_deref().filter(|s| !s.is_empty()) {
            let ip = address(s, p("clusterIP"))?;
            match cluster_ips.first() {
                None => cluster_ips.push(ip),
                Some(first) if *first == ip => {}
                Some(first) => {
                    return Err(format!(
                        "{}: {ip} does not agree with clusterIPs[0] {first} (give one, or the \
                         same address first in both)",
                        p("clusterIP")
                    ));
                }
            }
        }
        if cluster_ips.len() > 2 {
            return Err(format!(
                "{}: at most two addresses (one IPv4, one IPv6)",
                p("clusterIPs")
            ));
        }
        if cluster_ips.len() == 2 && cluster_ips[0].is_ipv4() == cluster_ips[1].is_ipv4() {
            return Err(format!(
                "{}: two addresses must be of different families (one IPv4, one IPv6)",
                p("clusterIPs")
            ));
        }

        let mut ip_families = Vec::new();
        for (i, f) in spec.ip_families.iter().flatten().enumerate() {
            let family = match f.as_str() {
                "IPv4" => IpFamily::IPv4,
                "IPv6" => IpFamily::IPv6,
                other => {
                    return Err(format!(
                        "{}: unknown family {other:?} (IPv4 or IPv6)",
                        p(&format!("ipFamilies[{i}]"))
                    ));
                }
            };
            if ip_families.contains(&family) {
                return Err(format!(
                    "{}: {f} is given twice",
                    p(&format!("ipFamilies[{i}]"))
                ));
            }
            if let Some(ip) = cluster_ips.get(i)
                && family_of(*ip) != family
            {
                return Err(format!(
                    "{}: {f} does not agree with clusterIPs[{i}] {ip}",
                    p(&format!("ipFamilies[{i}]"))
                ));
            }
            ip_families.push(family);
        }
        let two = ip_families.len() == 2 || cluster_ips.len() == 2;
        let ip_family_policy = match spec.ip_family_policy.as_deref() {
            None if two => IpFamilyPolicy::RequireDualStack,
            None | Some("SingleStack") => IpFamilyPolicy::SingleStack,
            Some("PreferDualStack") => IpFamilyPolicy::PreferDualStack,
            Some("RequireDualStack") => IpFamilyPolicy::RequireDualStack,
            Some(other) => {
                return Err(format!(
                    "{}: unknown policy {other:?} (SingleStack, PreferDualStack or \
                     RequireDualStack)",
                    p("ipFamilyPolicy")
                ));
            }
        };
        if ip_family_policy == IpFamilyPolicy::SingleStack && two {
            return Err(format!(
                "{}: SingleStack, but two families or addresses are given (use \
                 PreferDualStack or RequireDualStack)",
                p("ipFamilyPolicy")
            ));
        }

        let ports = service_ports(spec.ports.unwrap_or_default(), kind, path)?;

        let selector = match spec.selector {
            None => None,
            Some(labels) => {
                let sel = LabelSelector {
                    match_labels: labels,
                    match_expressions: Vec::new(),
                };
                sel.validate(&p("selector"))
                    .map_err(|m| m.replace(".matchLabels", ""))?;
                Some(sel.match_labels)
            }
        };

        let session_affinity = match spec.session_affinity.as_deref() {
            None | Some("None") => {
                if spec.session_affinity_config.is_some() {
                    return Err(format!(
                        "{}: only with sessionAffinity: ClientIP",
                        p("sessionAffinityConfig")
                    ));
                }
                None
            }
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .and_then(|c| c.client_ip)
                    .and_then(|c| c.timeout_seconds);
                match timeout {
                    None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                    Some(t) if (1..=i64::from(MAX_AFFINITY_TIMEOUT_S)).contains(&t) => {
                        Some(t as u32)
                    }
                    Some(t) => {
                        return Err(format!(
                            "{}: {t} is out of range (1 to {MAX_AFFINITY_TIMEOUT_S} seconds)",
                            p("sessionAffinityConfig.clientIP.timeoutSeconds")
                        ));
                    }
                }
            }
            Some(other) => {
                return Err(format!(
                    "{}: unknown affinity {other:?} (None or ClientIP)",
                    p("sessionAffinity")
                ));
            }
        };

        let external_local = match spec.external_traffic_policy.as_deref() {
            None | Some("Cluster") => false,
            Some("Local") if kind == ServiceType::NodePort => true,
            Some("Local") => {
                return Err(format!(
                    "{}: Local applies to NodePort services only (this one is ClusterIP)",
                    p("externalTrafficPolicy")
                ));
            }
            Some(other) => {
                return Err(format!(
                    "{}: unknown policy {other:?} (Cluster or Local)",
                    p("externalTrafficPolicy")
                ));
            }
        };
        let internal_local = match spec.internal_traffic_policy.as_deref() {
            None | Some("Cluster") => false,
            Some("Local") => true,
            Some(other) => {
                return Err(format!(
                    "{}: unknown policy {other:?} (Cluster or Local)",
                    p("internalTrafficPolicy")
                ));
            }
        };
        if spec.publish_not_ready_addresses == Some(true) {
            return Err(format!(
                "{}: true is not supported (only ready endpoints are backends)",
                p("publishNotReadyAddresses")
            ));
        }

        Ok(Service {
            namespace,
            name,
            kind,
            cluster_ips,
            ip_families,
            ip_family_policy,
            ports,
            selector,
            session_affinity,
            external_local,
            internal_local,
        })
    }
}

/// The family of an address.
pub fn family_of(ip: IpAddr) -> IpFamily {
    match ip {
        IpAddr::V4(_) => IpFamily::IPv4,
        IpAddr::V6(_) => IpFamily::IPv6,
    }
}

/// `protocol` of a port: TCP (absent) or UDP.
fn protocol(value: Option<&str>, field: &str) -> Result<u8, String> {
    match value {
        None | Some("TCP") => Ok(PROTO_TCP),
        Some("UDP") => Ok(PROTO_UDP),
        Some("SCTP") => Err(format!("{field}: SCTP is not supported (TCP or UDP)")),
        Some(other) => Err(format!("{field}: unknown protocol {other:?} (TCP or UDP)")),
    }
}

/// A port number, 1 to 65535.
fn port_number(v: i64, field: &str) -> Result<u16, String> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{field}: port {v} is out of range (1 to 65535)"))
}

fn service_ports(
    raw: Vec<RawServicePort>,
    kind: ServiceType,
    path: &str,
) -> Result<Vec<ServicePort>, String> {
    if raw.is_empty() {
        return Err(format!(
            "{path}spec.ports: a service needs at least one port"
        ));
    }
    let many = raw.len() > 1;
    let mut ports: Vec<ServicePort> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let here = format!("{path}spec.ports[{i}]");
        let name = r.name.unwrap_or_default();
        if name.is_empty() {
            if many {
                return Err(format!(
                    "{here}.name: required when a service has more than one port"
                ));
            }
        } else if !is_dns_label(&name) {
            return Err(format!(
                "{here}.name: {name:?} is not a valid port name (a DNS label: lowercase \
                 letters, digits and '-', at most 63)"
            ));
        }
        let protocol = protocol(r.protocol.as_deref(), &format!("{here}.protocol"))?;
        let port = port_number(r.port, &format!("{here}.port"))?;
        let target_port = match r.target_port {
            None => TargetPort::Number(port),
            Some(Value::Number(n)) => {
                let v = n.as_i64().ok_or_else(|| {
                    format!("{here}.targetPort: {n} is not a port number (1 to 65535)")
                })?;
                TargetPort::Number(port_number(v, &format!("{here}.targetPort"))?)
            }
            Some(Value::String(s)) => {
                if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!(
                        "{here}.targetPort: {s:?} is a string of digits, which Kubernetes reads \
                         as a port name (and no name is only digits); write the number without \
                         quotes"
                    ));
                }
                validate_port_name(&s).map_err(|m| format!("{here}.targetPort: {m}"))?;
                TargetPort::Name(s)
            }
            Some(other) => {
                return Err(format!(
                    "{here}.targetPort: {other} is neither a port number nor a port name"
                ));
            }
        };
        let node_port = match r.node_port {
            None | Some(0) => None,
            Some(n) if kind != ServiceType::NodePort => {
                return Err(format!(
                    "{here}.nodePort: {n} is given but the service is not of type NodePort"
                ));
            }
            Some(n) => {
                let in_range = u16::try_from(n)
                    .ok()
                    .filter(|n| NODE_PORT_RANGE.contains(n));
                let Some(n) = in_range else {
                    return Err(format!(
                        "{here}.nodePort: {n} is outside the NodePort range ({}-{})",
                        NODE_PORT_RANGE.start(),
                        NODE_PORT_RANGE.end()
                    ));
                };
                Some(n)
            }
        };
        for (j, q) in ports.iter().enumerate() {
            if !name.is_empty() && q.name == name {
                return Err(format!(
                    "{here}.name: {name:?} is also the name of spec.ports[{j}]"
                ));
            }
            if q.port == port && q.protocol == protocol {
                return Err(format!(
                    "{here}: port {port}/{} is also spec.ports[{j}]",
                    proto_name(protocol)
                ));
            }
            if node_port.is_some() && q.node_port == node_port && q.protocol == protocol {
                return Err(format!(
                    "{here}.nodePort: {}/{} is also the nodePort of spec.ports[{j}]",
                    node_port.unwrap_or_default(),
                    proto_name(protocol)
                ));
            }
        }
        ports.push(ServicePort {
            name,
            protocol,
            port,
            target_port,
            node_port,
        });
    }
    Ok(ports)
}

/// `TCP` or `UDP`, for messages.
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        _ => "?",
    }
}

// ---------------------------------------------------------------- EndpointSlice

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSlice {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: Meta,
    address_type: String,
    #[serde(default)]
    endpoints: Option<Vec<RawEndpoint>>,
    #[serde(default)]
    ports: Option<Vec<RawSlicePort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawEndpoint {
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<RawConditions>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default, rename = "hostname")]
    _hostname: Option<IgnoredAny>,
    #[serde(default, rename = "targetRef")]
    _target_ref: Option<IgnoredAny>,
    #[serde(default, rename = "zone")]
    _zone: Option<IgnoredAny>,
    #[serde(default, rename = "hints")]
    _hints: Option<IgnoredAny>,
    #[serde(default, rename = "deprecatedTopology")]
    _deprecated_topology: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConditions {
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default, rename = "serving")]
    _serving: Option<bool>,
    #[serde(default, rename = "terminating")]
    _terminating: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSlicePort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    port: Option<i64>,
    #[serde(default, rename = "appProtocol")]
    _app_protocol: Option<IgnoredAny>,
}

impl RawSlice {
    fn into_slice(self, path: &str) -> Result<EndpointSlice, String> {
        let (namespace, name) = names(&self.metadata, path)?;
        let labels: Labels = self.metadata.labels.unwrap_or_default();
        let service = match labels.get(SERVICE_NAME_LABEL) {
            Some(s) if is_dns_label(s) => s.clone(),
            Some(s) => {
                return Err(format!(
                    "{path}metadata.labels.{SERVICE_NAME_LABEL}: {s:?} is not a valid service \
                     name"
                ));
            }
            None => {
                return Err(format!(
                    "{path}metadata.labels: the label {SERVICE_NAME_LABEL} (the service this \
                     slice serves) is required"
                ));
            }
        };
        let family = match self.address_type.as_str() {
            "IPv4" => IpFamily::IPv4,
            "IPv6" => IpFamily::IPv6,
            "FQDN" => {
                return Err(format!(
                    "{path}addressType: FQDN is not supported (IPv4 or IPv6)"
                ));
            }
            other => {
                return Err(format!(
                    "{path}addressType: unknown type {other:?} (IPv4 or IPv6)"
                ));
            }
        };
        let mut endpoints = Vec::new();
        for (i, e) in self.endpoints.unwrap_or_default().into_iter().enumerate() {
            let here = format!("{path}endpoints[{i}]");
            if e.addresses.is_empty() {
                return Err(format!(
                    "{here}.addresses: an endpoint needs at least one address"
                ));
            }
            let mut addresses = Vec::with_capacity(e.addresses.len());
            for (j, a) in e.addresses.iter().enumerate() {
                let field = format!("{here}.addresses[{j}]");
                let ip: IpAddr = a
                    .parse()
                    .map_err(|_| format!("{field}: {a:?} is not an IP address"))?;
                if family_of(ip) != family {
                    return Err(format!(
                        "{field}: {ip} is not of the slice's addressType {}",
                        self.address_type
                    ));
                }
                addresses.push(ip);
            }
            endpoints.push(SliceEndpoint {
                addresses,
                ready: e.conditions.and_then(|c| c.ready).unwrap_or(true),
                node: e.node_name.filter(|n| !n.is_empty()),
            });
        }
        let mut ports: Vec<SlicePort> = Vec::new();
        for (i, r) in self.ports.unwrap_or_default().into_iter().enumerate() {
            let here = format!("{path}ports[{i}]");
            let name = r.name.unwrap_or_default();
            if !name.is_empty() && !is_dns_label(&name) {
                return Err(format!(
                    "{here}.name: {name:?} is not a valid port name (a DNS label)"
                ));
            }
            let protocol = protocol(r.protocol.as_deref(), &format!("{here}.protocol"))?;
            let Some(port) = r.port else {
                return Err(format!(
                    "{here}.port: required (a slice port without a number means \"all \
                     ports\", which Hypha does not support)"
                ));
            };
            let port = port_number(port, &format!("{here}.port"))?;
            if let Some(j) = ports
                .iter()
                .position(|q| q.name == name && q.protocol == protocol)
            {
                return Err(format!(
                    "{here}: name {name:?}/{} is also ports[{j}]",
                    proto_name(protocol)
                ));
            }
            ports.push(SlicePort {
                name,
                protocol,
                port,
            });
        }
        Ok(EndpointSlice {
            namespace,
            name,
            service,
            family,
            endpoints,
            ports,
        })
    }
}
