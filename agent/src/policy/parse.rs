//! Policy files as operators write them: Kubernetes `NetworkPolicy` and Hypha's
//! `HyphaNetworkPolicy` (CiliumNetworkPolicy's shape), YAML (several documents per file)
//! or JSON. Strict: an unknown field, a malformed value, an impossible port or CIDR
//! rejects the whole file, with a message naming the file, the document, the line or the
//! field, and the reason.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use serde::de::{self, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};

use super::selector::{LabelSelector, Requirement};
use super::{
    DEFAULT_NAMESPACE, DirectionRules, Entity, NAMESPACE_NAME_LABEL, NamedPort, NamespaceScope,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, Peer, Policy, PolicyError,
    PolicyKind, PortRange, Rule, validate_port_name,
};

const K8S_API: &str = "networking.k8s.io/v1";
const HYPHA_API: &str = "hypha.dev/v1";

/// A file to parse: its name (for messages) and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyFile {
    pub source: String,
    pub content: String,
}

/// Parses every policy of one file; any error rejects the whole file. Any input costs a
/// bounded time and memory: see [`super::limits`].
pub fn parse_file(source: &str, content: &str) -> Result<Vec<Policy>, PolicyError> {
    let invalid = |message: String| PolicyError::Invalid {
        source_name: source.to_owned(),
        message,
    };
    // Size, nesting and aliases are bounded before any parser sees the text.
    super::limits::check(source, content)?;
    if super::limits::is_json(content) {
        // JSON: one object. (YAML would read most JSON too, but not tab indentation, and
        // serde_json's messages are the ones JSON writers expect.)
        let header: Header = serde_json::from_str(content).map_err(|e| invalid(e.to_string()))?;
        let policy = match header.dispatch().map_err(&invalid)? {
            Kind::K8s => serde_json::from_str::<K8sPolicy>(content)
                .map_err(|e| invalid(e.to_string()))?
                .into_policy(),
            Kind::Hypha => serde_json::from_str::<HyphaPolicy>(content)
                .map_err(|e| invalid(e.to_string()))?
                .into_policy(),
        };
        return Ok(vec![policy.map_err(&invalid)?]);
    }

    // YAML: read the headers of every document, then each document as its kind.
    let mut headers = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(content) {
        let header = Option::<Header>::deserialize(doc);
        let failed = header.is_err();
        headers.push(header);
        if failed {
            break; // after a syntax error the iterator repeats it forever
        }
    }
    let many = headers.len() > 1;
    let at = |i: usize| {
        if many {
            format!("document {}: ", i + 1)
        } else {
            String::new()
        }
    };
    let mut policies = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(content)
        .take(headers.len())
        .enumerate()
    {
        let header = match &headers[i] {
            Ok(Some(h)) => h,
            Ok(None) => continue, // an empty document, as after a trailing `---`
            Err(e) => return Err(invalid(format!("{}{e}", at(i)))),
        };
        let kind = header
            .dispatch()
            .map_err(|m| invalid(format!("{}{m}", at(i))))?;
        let policy = match kind {
            Kind::K8s => K8sPolicy::deserialize(doc)
                .map_err(|e| invalid(format!("{}{e}", at(i))))?
                .into_policy(),
            Kind::Hypha => HyphaPolicy::deserialize(doc)
                .map_err(|e| invalid(format!("{}{e}", at(i))))?
                .into_policy(),
        };
        policies.push(policy.map_err(|m| invalid(format!("{}{m}", at(i))))?);
    }
    let mut seen: BTreeMap<(String, String), ()> = BTreeMap::new();
    for p in &policies {
        if seen
            .insert((p.namespace.clone(), p.name.clone()), ())
            .is_some()
        {
            return Err(invalid(format!(
                "policy {} is defined twice in this file",
                p.full_name()
            )));
        }
    }
    Ok(policies)
}

/// What every document starts with; the rest is read once the kind is known.
#[derive(Deserialize)]
struct Header {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

enum Kind {
    K8s,
    Hypha,
}

impl Header {
    fn dispatch(&self) -> Result<Kind, String> {
        let (Some(api), Some(kind)) = (self.api_version.as_deref(), self.kind.as_deref()) else {
            return Err(format!(
                "a policy needs apiVersion and kind: `apiVersion: {K8S_API}` with \
                 `kind: NetworkPolicy`, or `apiVersion: {HYPHA_API}` with `kind: HyphaNetworkPolicy`"
            ));
        };
        match (api, kind) {
            (K8S_API, "NetworkPolicy") => Ok(Kind::K8s),
            (HYPHA_API, "HyphaNetworkPolicy") => Ok(Kind::Hypha),
            (_, "NetworkPolicy") => Err(format!(
                "apiVersion {api} is not supported for NetworkPolicy; use {K8S_API}"
            )),
            (_, "HyphaNetworkPolicy") => Err(format!(
                "apiVersion {api} is not supported for HyphaNetworkPolicy; use {HYPHA_API}"
            )),
            (_, "CiliumNetworkPolicy") => Err(format!(
                "kind CiliumNetworkPolicy is not accepted as such; Hypha reads the same shape as \
                 `apiVersion: {HYPHA_API}`, `kind: HyphaNetworkPolicy`"
            )),
            _ => Err(format!(
                "kind {kind} ({api}) is not a policy Hypha knows: it reads NetworkPolicy \
                 ({K8S_API}) and HyphaNetworkPolicy ({HYPHA_API})"
            )),
        }
    }
}

/// Kubernetes' ObjectMeta: name and namespace are used, and labels as `L` (ignored by
/// default: policies do not read them, Services' EndpointSlices do); what `kubectl get
/// -o yaml` writes besides is accepted and ignored. Also read by the service parser.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ObjectMeta<L = IgnoredAny> {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) namespace: Option<String>,
    #[serde(default = "Option::default")]
    pub(crate) labels: Option<L>,
    #[serde(default, rename = "annotations")]
    _annotations: Option<IgnoredAny>,
    #[serde(default, rename = "uid")]
    _uid: Option<IgnoredAny>,
    #[serde(default, rename = "resourceVersion")]
    _resource_version: Option<IgnoredAny>,
    #[serde(default, rename = "generation")]
    _generation: Option<IgnoredAny>,
    #[serde(default, rename = "creationTimestamp")]
    _creation_timestamp: Option<IgnoredAny>,
    #[serde(default, rename = "managedFields")]
    _managed_fields: Option<IgnoredAny>,
    #[serde(default, rename = "selfLink")]
    _self_link: Option<IgnoredAny>,
    #[serde(default, rename = "finalizers")]
    _finalizers: Option<IgnoredAny>,
    #[serde(default, rename = "ownerReferences")]
    _owner_references: Option<IgnoredAny>,
    #[serde(default, rename = "generateName")]
    _generate_name: Option<IgnoredAny>,
    #[serde(default, rename = "deletionTimestamp")]
    _deletion_timestamp: Option<IgnoredAny>,
    #[serde(default, rename = "deletionGracePeriodSeconds")]
    _deletion_grace_period_seconds: Option<IgnoredAny>,
}

impl<L> ObjectMeta<L> {
    /// The object's namespace and name, checked ([`object_names`]).
    pub(crate) fn names(&self) -> Result<(String, String), String> {
        object_names(self.namespace.as_deref(), &self.name)
    }
}

/// Checks an object's `metadata.namespace` (absent: `default`) and `metadata.name` as
/// Kubernetes does (a DNS label; a DNS subdomain).
pub(crate) fn object_names(
    namespace: Option<&str>,
    name: &str,
) -> Result<(String, String), String> {
    let ns = namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned();
    if !is_dns_label(&ns) {
        return Err(format!(
            "metadata.namespace {ns:?} is not a valid namespace name (lowercase letters, \
             digits and '-', at most 63, starting and ending with a letter or digit)"
        ));
    }
    if name.is_empty() || name.len() > 253 || !name.split('.').all(is_dns_label) {
        return Err(format!(
            "metadata.name {name:?} is not a valid name (lowercase letters, digits, '-' \
             and '.', at most 253, starting and ending with a letter or digit)"
        ));
    }
    Ok((ns, name.to_owned()))
}

/// A DNS label (RFC 1123): lowercase letters, digits and '-', at most 63, no '-' at
/// either end. Also read by the service parser.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

// ---------------------------------------------------------------- Kubernetes NetworkPolicy

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct K8sPolicy {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: ObjectMeta,
    #[serde(default)]
    spec: K8sSpec,
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct K8sSpec {
    #[serde(default)]
    pod_selector: LabelSelector,
    #[serde(default)]
    policy_types: Option<Vec<PolicyType>>,
    #[serde(default)]
    ingress: Option<Vec<K8sIngressRule>>,
    #[serde(default)]
    egress: Option<Vec<K8sEgressRule>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
enum PolicyType {
    Ingress,
    Egress,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct K8sIngressRule {
    #[serde(default)]
    from: Option<Vec<K8sPeer>>,
    #[serde(default)]
    ports: Option<Vec<K8sPort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct K8sEgressRule {
    #[serde(default)]
    to: Option<Vec<K8sPeer>>,
    #[serde(default)]
    ports: Option<Vec<K8sPort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct K8sPeer {
    #[serde(default)]
    pod_selector: Option<LabelSelector>,
    #[serde(default)]
    namespace_selector: Option<LabelSelector>,
    #[serde(default)]
    ip_block: Option<IpBlock>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IpBlock {
    cidr: StrictCidr,
    #[serde(default)]
    except: Vec<StrictCidr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct K8sPort {
    #[serde(default)]
    protocol: Option<K8sProtocol>,
    #[serde(default)]
    port: Option<K8sPortValue>,
    #[serde(default)]
    end_port: Option<PortNumber>,
}

#[derive(Clone, Copy, Deserialize)]
enum K8sProtocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl K8sProtocol {
    fn number(self) -> u8 {
        match self {
            K8sProtocol::Tcp => PROTO_TCP,
            K8sProtocol::Udp => PROTO_UDP,
            K8sProtocol::Sctp => PROTO_SCTP,
        }
    }
}

impl K8sPolicy {
    fn into_policy(self) -> Result<Policy, String> {
        let (namespace, name) = self.metadata.names()?;
        let spec = self.spec;
        spec.pod_selector.validate("spec.podSelector")?;
        // Kubernetes' defaulting: Ingress always; Egress when there are egress rules.
        let types = spec.policy_types.unwrap_or_else(|| {
            let mut t = vec![PolicyType::Ingress];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push(PolicyType::Egress);
            }
            t
        });
        let mut ingress = DirectionRules {
            isolate: types.contains(&PolicyType::Ingress),
            ..Default::default()
        };
        let mut egress = DirectionRules {
            isolate: types.contains(&PolicyType::Egress),
            ..Default::default()
        };
        // Rules of a direction the policy does not govern are ignored, as in Kubernetes.
        if ingress.isolate {
            for (i, r) in spec.ingress.unwrap_or_default().into_iter().enumerate() {
                let path = format!("spec.ingress[{i}]");
                ingress.allow.push(k8s_rule(
                    &namespace,
                    r.from,
                    r.ports,
                    &format!("{path}.from"),
                    &path,
                )?);
            }
        }
        if egress.isolate {
            for (i, r) in spec.egress.unwrap_or_default().into_iter().enumerate() {
                let path = format!("spec.egress[{i}]");
                egress.allow.push(k8s_rule(
                    &namespace,
                    r.to,
                    r.ports,
                    &format!("{path}.to"),
                    &path,
                )?);
            }
        }
        Ok(Policy {
            kind: PolicyKind::NetworkPolicy,
            namespace,
            name,
            audit: false,
            subject: spec.pod_selector,
            ingress,
            egress,
        })
    }
}

fn k8s_rule(
    namespace: &str,
    peers: Option<Vec<K8sPeer>>,
    ports: Option<Vec<K8sPort>>,
    peers_path: &str,
    path: &str,
) -> Result<Rule, String> {
    // Empty or missing `from`/`to`: every peer. Empty or missing `ports`: all traffic.
    let peers = match peers {
        None => None,
        Some(p) if p.is_empty() => None,
        Some(list) => Some(
            list.into_iter()
                .enumerate()
                .map(|(i, p)| k8s_peer(namespace, p, &format!("{peers_path}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    // Named ports go apart: the compiler resolves them per endpoint. A rule with only
    // named ports has `Some` of no numeric port, which alone matches nothing.
    let mut named_ports = Vec::new();
    let ports = match ports {
        None => None,
        Some(p) if p.is_empty() => None,
        Some(list) => {
            let mut numeric = Vec::new();
            for (i, p) in list.into_iter().enumerate() {
                match k8s_port(p, &format!("{path}.ports[{i}]"))? {
                    K8sRulePort::Range(r) => numeric.push(r),
                    K8sRulePort::Named(n) => named_ports.push(n),
                }
            }
            Some(numeric)
        }
    };
    Ok(Rule {
        peers,
        ports,
        named_ports,
    })
}

fn k8s_peer(namespace: &str, p: K8sPeer, path: &str) -> Result<Peer, String> {
    if let Some(s) = &p.pod_selector {
        s.validate(&format!("{path}.podSelector"))?;
    }
    if let Some(s) = &p.namespace_selector {
        s.validate(&format!("{path}.namespaceSelector"))?;
    }
    match (p.pod_selector, p.namespace_selector, p.ip_block) {
        (None, None, Some(b)) => cidr_peer(b.cidr.0, b.except.into_iter().map(|c| c.0), path),
        (_, _, Some(_)) => Err(format!(
            "{path}: ipBlock cannot be combined with podSelector or namespaceSelector in one peer; \
             write them as two peers"
        )),
        (None, None, None) => Err(format!(
            "{path}: a peer needs podSelector, namespaceSelector or ipBlock (to allow every \
             source, leave `from`/`to` out)"
        )),
        (pods, None, None) => Ok(Peer::Endpoints {
            namespaces: NamespaceScope::Named(namespace.to_owned()),
            pods: pods.unwrap_or_default(),
        }),
        (pods, Some(ns), None) => Ok(Peer::Endpoints {
            namespaces: NamespaceScope::Selected(ns),
            pods: pods.unwrap_or_default(),
        }),
    }
}

fn cidr_peer(net: IpNet, except: impl Iterator<Item = IpNet>, path: &str) -> Result<Peer, String> {
    let except: Vec<IpNet> = except.collect();
    for e in &except {
        if family(e) != family(&net) {
            return Err(format!(
                "{path}: except {e} is {} but cidr {net} is {}: an except must be of its \
                 CIDR's family (write one CIDR per family)",
                family(e),
                family(&net)
            ));
        }
        if !(net.contains(e) && e.prefix_len() > net.prefix_len()) {
            return Err(format!(
                "{path}: except {e} is not a strict subset of {net}"
            ));
        }
    }
    Ok(Peer::Cidr { net, except })
}

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    }
}

/// A Kubernetes rule port: numbers, or a name.
enum K8sRulePort {
    Range(PortRange),
    Named(NamedPort),
}

fn k8s_port(p: K8sPort, path: &str) -> Result<K8sRulePort, String> {
    let proto = p.protocol.unwrap_or(K8sProtocol::Tcp).number();
    match (p.port, p.end_port) {
        (None, None) => Ok(K8sRulePort::Range(PortRange {
            proto,
            first: 0,
            last: 0,
        })),
        (None, Some(_)) => Err(format!("{path}: endPort needs port")),
        (Some(K8sPortValue::Name(name)), None) => Ok(K8sRulePort::Named(NamedPort { proto, name })),
        (Some(K8sPortValue::Name(name)), Some(_)) => Err(format!(
            "{path}: endPort needs a numeric port, not the named port {name:?}"
        )),
        (Some(K8sPortValue::Number(port)), end) => {
            port_range(proto, port, end.map(|e| e.0), path).map(K8sRulePort::Range)
        }
    }
}

fn port_range(proto: u8, port: u16, end: Option<u16>, path: &str) -> Result<PortRange, String> {
    let last = end.unwrap_or(port);
    if last < port {
        return Err(format!("{path}: endPort {last} is below port {port}"));
    }
    Ok(PortRange {
        proto,
        first: port,
        last,
    })
}

// ---------------------------------------------------------------- HyphaNetworkPolicy

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HyphaPolicy {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: ObjectMeta,
    spec: HyphaSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HyphaSpec {
    #[serde(default, rename = "description")]
    _description: Option<String>,
    endpoint_selector: LabelSelector,
    #[serde(default)]
    ingress: Option<Vec<HyphaIngressRule>>,
    #[serde(default)]
    egress: Option<Vec<HyphaEgressRule>>,
    #[serde(default)]
    ingress_deny: Option<Vec<HyphaIngressRule>>,
    #[serde(default)]
    egress_deny: Option<Vec<HyphaEgressRule>>,
    #[serde(default)]
    audit_mode: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HyphaIngressRule {
    #[serde(default)]
    from_endpoints: Option<Vec<LabelSelector>>,
    #[serde(default, rename = "fromCIDR")]
    from_cidr: Option<Vec<LooseCidr>>,
    #[serde(default, rename = "fromCIDRSet")]
    from_cidr_set: Option<Vec<CidrSet>>,
    #[serde(default)]
    from_entities: Option<Vec<EntityName>>,
    #[serde(default)]
    to_ports: Option<Vec<PortRuleSet>>,
    #[serde(default)]
    icmps: Option<Vec<IcmpRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HyphaEgressRule {
    #[serde(default)]
    to_endpoints: Option<Vec<LabelSelector>>,
    #[serde(default, rename = "toCIDR")]
    to_cidr: Option<Vec<LooseCidr>>,
    #[serde(default, rename = "toCIDRSet")]
    to_cidr_set: Option<Vec<CidrSet>>,
    #[serde(default)]
    to_entities: Option<Vec<EntityName>>,
    #[serde(default)]
    to_ports: Option<Vec<PortRuleSet>>,
    #[serde(default)]
    icmps: Option<Vec<IcmpRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CidrSet {
    cidr: LooseCidr,
    #[serde(default)]
    except: Vec<LooseCidr>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum EntityName {
    Host,
    /// The cluster's other nodes.
    RemoteNode,
    World,
    Cluster,
    All,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortRuleSet {
    ports: Vec<HyphaPort>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HyphaPort {
    port: HyphaPortValue,
    #[serde(default)]
    end_port: Option<PortNumber>,
    #[serde(default)]
    protocol: Option<HyphaProtocol>,
}

#[derive(Clone, Copy, Deserialize)]
enum HyphaProtocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
    #[serde(rename = "ANY")]
    Any,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IcmpRule {
    fields: Vec<IcmpField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IcmpField {
    #[serde(rename = "type")]
    _icmp_type: IcmpType,
    #[serde(default)]
    family: Option<IcmpFamily>,
}

#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
enum IcmpFamily {
    IPv4,
    IPv6,
}

/// An ICMP type by number (0 to 255) or by CiliumNetworkPolicy's names; read and checked,
/// not enforced (the datapath matches ICMP as a protocol).
#[derive(Deserialize)]
#[serde(untagged)]
#[expect(
    dead_code,
    reason = "read to check the syntax; the datapath does not match ICMP types"
)]
enum IcmpType {
    Number(u8),
    Name(IcmpTypeName),
}

#[derive(Deserialize)]
enum IcmpTypeName {
    EchoReply,
    DestinationUnreachable,
    Redirect,
    Echo,
    EchoRequest,
    RouterAdvertisement,
    RouterSelection,
    TimeExceeded,
    ParameterProblem,
    Timestamp,
    TimestampReply,
    Photuris,
    ExtendedEchoRequest,
    ExtendedEchoReply,
}

impl HyphaPolicy {
    fn into_policy(self) -> Result<Policy, String> {
        let (namespace, name) = self.metadata.names()?;
        let spec = self.spec;
        let subject = split_selector(&spec.endpoint_selector, &namespace, "spec.endpointSelector")?;
        let subject = match subject {
            Peer::Endpoints {
                namespaces: NamespaceScope::Named(_),
                pods,
            } => pods,
            _ => {
                return Err(
                    "spec.endpointSelector: a HyphaNetworkPolicy applies to endpoints of its own \
                     namespace (metadata.namespace); it cannot select by namespace"
                        .into(),
                );
            }
        };
        let ns = namespace.as_str();
        let ingress_rules = |rules: Option<Vec<HyphaIngressRule>>, field: &str| {
            rules
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    hypha_rule(
                        ns,
                        L3 {
                            endpoints: r.from_endpoints,
                            cidr: r.from_cidr,
                            cidr_set: r.from_cidr_set,
                            entities: r.from_entities,
                        },
                        r.to_ports,
                        r.icmps,
                        &format!("spec.{field}[{i}]"),
                        "from",
                    )
                })
                .collect::<Result<Vec<_>, String>>()
        };
        let egress_rules = |rules: Option<Vec<HyphaEgressRule>>, field: &str| {
            rules
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    hypha_rule(
                        ns,
                        L3 {
                            endpoints: r.to_endpoints,
                            cidr: r.to_cidr,
                            cidr_set: r.to_cidr_set,
                            entities: r.to_entities,
                        },
                        r.to_ports,
                        r.icmps,
                        &format!("spec.{field}[{i}]"),
                        "to",
                    )
                })
                .collect::<Result<Vec<_>, String>>()
        };
        // As in Cilium: ingress (egress) rules, even `[{}]`, put the endpoints in default
        // deny for that direction; deny rules alone do not.
        let ingress = DirectionRules {
            isolate: spec.ingress.as_ref().is_some_and(|r| !r.is_empty()),
            allow: ingress_rules(spec.ingress, "ingress")?,
            deny: ingress_rules(spec.ingress_deny, "ingressDeny")?,
        };
        let egress = DirectionRules {
            isolate: spec.egress.as_ref().is_some_and(|r| !r.is_empty()),
            allow: egress_rules(spec.egress, "egress")?,
            deny: egress_rules(spec.egress_deny, "egressDeny")?,
        };
        Ok(Policy {
            kind: PolicyKind::HyphaNetworkPolicy,
            namespace,
            name,
            audit: spec.audit_mode,
            subject,
            ingress,
            egress,
        })
    }
}

struct L3 {
    endpoints: Option<Vec<LabelSelector>>,
    cidr: Option<Vec<LooseCidr>>,
    cidr_set: Option<Vec<CidrSet>>,
    entities: Option<Vec<EntityName>>,
}

fn hypha_rule(
    namespace: &str,
    l3: L3,
    to_ports: Option<Vec<PortRuleSet>>,
    icmps: Option<Vec<IcmpRule>>,
    path: &str,
    dir: &str,
) -> Result<Rule, String> {
    let has_l3 = l3.endpoints.is_some()
        || l3.cidr.is_some()
        || l3.cidr_set.is_some()
        || l3.entities.is_some();
    let has_l4 = to_ports.is_some() || icmps.is_some();
    let mut peers = Vec::new();
    for (i, sel) in l3.endpoints.into_iter().flatten().enumerate() {
        let here = format!("{path}.{dir}Endpoints[{i}]");
        peers.push(split_selector(&sel, namespace, &here)?);
    }
    for (i, c) in l3.cidr.into_iter().flatten().enumerate() {
        peers.push(cidr_peer(
            c.0,
            std::iter::empty(),
            &format!("{path}.{dir}CIDR[{i}]"),
        )?);
    }
    for (i, s) in l3.cidr_set.into_iter().flatten().enumerate() {
        peers.push(cidr_peer(
            s.cidr.0,
            s.except.into_iter().map(|c| c.0),
            &format!("{path}.{dir}CIDRSet[{i}]"),
        )?);
    }
    for e in l3.entities.into_iter().flatten() {
        peers.push(Peer::Entity(match e {
            EntityName::Host => Entity::Host,
            EntityName::RemoteNode => Entity::RemoteNode,
            EntityName::World => Entity::World,
            EntityName::Cluster => Entity::Cluster,
            EntityName::All => Entity::All,
        }));
    }
    let mut ports = Vec::new();
    for (i, set) in to_ports.into_iter().flatten().enumerate() {
        for (j, p) in set.ports.into_iter().enumerate() {
            let here = format!("{path}.toPorts[{i}].ports[{j}]");
            let protos: &[u8] = match p.protocol.unwrap_or(HyphaProtocol::Any) {
                HyphaProtocol::Tcp => &[PROTO_TCP],
                HyphaProtocol::Udp => &[PROTO_UDP],
                HyphaProtocol::Sctp => &[PROTO_SCTP],
                HyphaProtocol::Any => &[PROTO_TCP, PROTO_UDP, PROTO_SCTP],
            };
            for proto in protos {
                ports.push(port_range(
                    *proto,
                    p.port.0,
                    p.end_port.as_ref().map(|e| e.0),
                    &here,
                )?);
            }
        }
    }
    for rule in icmps.into_iter().flatten() {
        // ICMP types are not matched (see the compiler's doc): a field allows its family's
        // ICMP, IPv4's when it names none (as in Cilium).
        let families = rule.fields.iter().map(|f| f.family);
        // A rule without fields allows IPv4's ICMP, as before fields had families.
        let families: Vec<Option<IcmpFamily>> = if rule.fields.is_empty() {
            vec![None]
        } else {
            families.collect()
        };
        for family in families {
            let proto = match family {
                Some(IcmpFamily::IPv6) => PROTO_ICMPV6,
                _ => PROTO_ICMP,
            };
            let range = PortRange {
                proto,
                first: 0,
                last: 0,
            };
            if !ports.contains(&range) {
                ports.push(range);
            }
        }
    }
    Ok(match (has_l3, has_l4) {
        // `{}`: selects nothing (it only isolates, as in Cilium).
        (false, false) => Rule {
            peers: Some(Vec::new()),
            ports: None,
            named_ports: Vec::new(),
        },
        (false, true) => Rule {
            peers: None,
            ports: Some(ports),
            named_ports: Vec::new(),
        },
        (true, false) => Rule {
            peers: Some(peers),
            ports: None,
            named_ports: Vec::new(),
        },
        (true, true) => Rule {
            peers: Some(peers),
            ports: Some(ports),
            named_ports: Vec::new(),
        },
    })
}

/// Namespace keys of CiliumNetworkPolicy selectors (after an optional `k8s:`/`any:`
/// source prefix): the endpoint's namespace, and a namespace label.
const CILIUM_NS_KEY: &str = "io.kubernetes.pod.namespace";
const CILIUM_NS_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// Splits a Cilium-style endpoint selector into its namespace part and its pod part.
/// Without a namespace key, the selector is confined to the policy's namespace, as in
/// Cilium; with `io.kubernetes.pod.namespace` or `io.cilium.k8s.namespace.labels.*` it
/// reaches the namespaces that match.
fn split_selector(sel: &LabelSelector, namespace: &str, path: &str) -> Result<Peer, String> {
    sel.validate(path)?;
    let mut pods = LabelSelector::default();
    let mut nss = LabelSelector::default();
    let mut scoped = false;
    let classify = |key: &str| -> Result<(bool, String), String> {
        let bare = key
            .strip_prefix("k8s:")
            .or_else(|| key.strip_prefix("any:"))
            .unwrap_or(key);
        if let Some(k) = bare.strip_prefix(CILIUM_NS_LABELS_PREFIX) {
            Ok((true, k.to_owned()))
        } else if bare == CILIUM_NS_KEY {
            Ok((true, NAMESPACE_NAME_LABEL.to_owned()))
        } else if bare.contains(':') && !bare.contains('/') {
            Err(format!(
                "{path}: label source of {key:?} is not supported (only k8s: and any:); for \
                 the host or the world, use fromEntities/toEntities"
            ))
        } else {
            Ok((false, bare.to_owned()))
        }
    };
    for (k, v) in &sel.match_labels {
        let (is_ns, key) = classify(k)?;
        scoped |= is_ns;
        let target = if is_ns { &mut nss } else { &mut pods };
        target.match_labels.insert(key, v.clone());
    }
    for r in &sel.match_expressions {
        let (is_ns, key) = classify(&r.key)?;
        scoped |= is_ns;
        let target = if is_ns { &mut nss } else { &mut pods };
        target.match_expressions.push(Requirement {
            key,
            operator: r.operator,
            values: r.values.clone(),
        });
    }
    Ok(Peer::Endpoints {
        namespaces: if scoped {
            NamespaceScope::Selected(nss)
        } else {
            NamespaceScope::Named(namespace.to_owned())
        },
        pods,
    })
}

// ---------------------------------------------------------------- checked scalars
//
// Checked while deserializing, so that serde_yaml_ng's message carries the field path
// and the line.

/// A port number, 1 to 65535.
struct PortNumber(u16);

fn check_port<E: de::Error>(v: i128) -> Result<u16, E> {
    if (1..=65535).contains(&v) {
        Ok(v as u16)
    } else {
        Err(E::custom(format!("port {v} is out of range (1 to 65535)")))
    }
}

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortNumber;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1 to 65535)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortNumber, E> {
                check_port(v.into()).map(PortNumber)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortNumber, E> {
                check_port(v.into()).map(PortNumber)
            }
        }
        d.deserialize_u64(V)
    }
}

/// Kubernetes' `port`: an int, or a string naming a port of the endpoints (checked as
/// IANA_SVC_NAME).
enum K8sPortValue {
    Number(u16),
    Name(String),
}

impl<'de> Deserialize<'de> for K8sPortValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = K8sPortValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1 to 65535) or a port name")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<K8sPortValue, E> {
                check_port(v.into()).map(K8sPortValue::Number)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<K8sPortValue, E> {
                check_port(v.into()).map(K8sPortValue::Number)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<K8sPortValue, E> {
                if v.parse::<u32>().is_ok() {
                    return Err(E::custom(format!(
                        "port {v:?} is a string; write the number without quotes"
                    )));
                }
                validate_port_name(v).map_err(E::custom)?;
                Ok(K8sPortValue::Name(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Cilium's `port`: a string of digits (or a number).
struct HyphaPortValue(u16);

impl<'de> Deserialize<'de> for HyphaPortValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HyphaPortValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1 to 65535), as a string or a number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HyphaPortValue, E> {
                check_port(v.into()).map(HyphaPortValue)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HyphaPortValue, E> {
                check_port(v.into()).map(HyphaPortValue)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HyphaPortValue, E> {
                match v.parse::<i128>() {
                    Ok(n) => check_port(n).map(HyphaPortValue),
                    Err(_) => Err(E::custom(format!(
                        "named port {v:?} is not supported: resolving it needs the pod's \
                         container spec, which Hypha does not have; use the port number"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// An IPv4 or IPv6 CIDR with its prefix length and no host bits (Kubernetes' `ipBlock`).
struct StrictCidr(IpNet);

/// An IPv4 or IPv6 CIDR, or a bare address meaning /32 or /128 (Cilium's
/// `fromCIDR`/`toCIDR`).
struct LooseCidr(IpNet);

fn parse_cidr(v: &str, bare_ok: bool) -> Result<IpNet, String> {
    if !v.contains('/') {
        if bare_ok && let Ok(a) = v.parse::<std::net::IpAddr>() {
            return Ok(IpNet::from(a));
        }
        return Err(format!(
            "{v:?} is not a CIDR (an address, '/', a prefix length: 10.0.0.0/8, fd00::/64)"
        ));
    }
    let net: IpNet = v
        .parse()
        .map_err(|_| format!("{v:?} is not a valid CIDR (such as 10.0.0.0/8 or fd00::/64)"))?;
    if net.trunc() != net {
        return Err(format!(
            "CIDR {v} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

macro_rules! cidr_type {
    ($t:ident, $bare:expr) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a CIDR such as 10.0.0.0/8 or fd00::/64")
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$t, E> {
                        parse_cidr(v, $bare).map($t).map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

cidr_type!(StrictCidr, false);
cidr_type!(LooseCidr, true);
