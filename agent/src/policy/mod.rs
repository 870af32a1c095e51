//! Network policy, the control-plane half: parsing the operators' files, label
//! selectors, security identities, and the compiler from policies to the datapath's map
//! entries (`hypha_ipcache4` and `hypha_ipcache6`, `hypha_policy`, `EndpointInfo::flags`), with the minimal
//! diff between two compilations. Pure: no I/O, unit-tested against Kubernetes'
//! semantics.
//!
//! Both policy kinds (Kubernetes `NetworkPolicy` and Hypha's `HyphaNetworkPolicy`, in the
//! shape of CiliumNetworkPolicy) are parsed into one form, [`Policy`], which is what the
//! compiler reads and what the agent persists.

mod compile;
mod engine;
mod identity;
pub mod limits;
mod parse;
mod selector;
mod sources;
pub mod watch;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use compile::{Compiled, PolicyDiff, compile, diff};
pub use engine::{Outcome, PolicyEngine};
pub use identity::{IdentityAllocator, IdentitySource, describe_labels};
pub use parse::{PolicyFile, parse_file};
// The service parser (`service::parse`) checks names as the policy parser does.
pub(crate) use parse::{ObjectMeta, is_dns_label};
pub use selector::{LabelSelector, Labels, Operator, Requirement};
pub use sources::{
    DirChange, FileKinds, ParsedSources, RoutedChange, file_kinds, parse_dir_file,
    parse_policy_sources, route_dir_file,
};

/// Label of every namespace: its name (as Kubernetes sets it since 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Endpoint label holding the endpoint's namespace (set by `hypha-cni` from
/// `K8S_POD_NAMESPACE`, and by the launcher).
pub const NAMESPACE_LABEL: &str = "k8s:namespace";
/// Prefix of the endpoint labels that are bookkeeping (namespace, pod name), not labels
/// selectors see.
pub const BOOKKEEPING_PREFIX: &str = "k8s:";
/// The namespace of an endpoint, or of a policy, that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Why a policy file or a policy set is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// A file is not valid: names the file, the document, and the line or the field.
    #[error("{source_name}: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
    /// Two policies with the same namespace and name.
    #[error("policy {namespace}/{name} is defined twice: in {first} and in {second}")]
    Duplicate {
        namespace: String,
        name: String,
        first: String,
        second: String,
    },
    /// The compiled policies do not fit a map.
    #[error(
        "the policies need more than {capacity} entries in {map} (the map's capacity); \
         nothing was changed: use fewer or broader rules (port ranges covering all ports, \
         wider CIDRs, fewer selected endpoints)"
    )]
    Capacity { map: &'static str, capacity: u32 },
    /// Identity or policy numbers ran out.
    #[error("no {what} left: {count} are in use")]
    Exhausted { what: &'static str, count: usize },
    /// Cluster mode: a label set the cluster store has given no identity (yet).
    #[error("the cluster store has assigned no identity to the labels {labels}")]
    Unassigned { labels: String },
    /// Cluster mode: the store's numbers would take a number from labels endpoints here
    /// still use.
    #[error(
        "the cluster store gives identity {id} to {labels}, but endpoints here hold it for \
         {held}; the assignment waits until the store gives {held} its own number"
    )]
    IdentityConflict {
        id: u32,
        labels: String,
        held: String,
    },
}

/// Which kind of file a policy came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyKind {
    /// `networking.k8s.io/v1` `NetworkPolicy`.
    NetworkPolicy,
    /// `hypha.dev/v1` `HyphaNetworkPolicy`.
    HyphaNetworkPolicy,
}

impl PolicyKind {
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::HyphaNetworkPolicy => "HyphaNetworkPolicy",
        }
    }
}

/// One policy, in the form the compiler reads, whatever kind it was written as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    /// Audit mode: what the policy would drop is reported and passed.
    pub audit: bool,
    /// Selects the endpoints this policy applies to, among those of `namespace`.
    pub subject: LabelSelector,
    pub ingress: DirectionRules,
    pub egress: DirectionRules,
}

impl Policy {
    /// `namespace/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Number of allow and deny rules, both directions.
    pub fn rule_counts(&self) -> (usize, usize) {
        (
            self.ingress.allow.len() + self.egress.allow.len(),
            self.ingress.deny.len() + self.egress.deny.len(),
        )
    }
}

/// What a policy says about one direction of its endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionRules {
    /// The policy isolates its endpoints in this direction: only what some policy allows
    /// passes (Kubernetes `policyTypes`; for Hypha's kind, the presence of `ingress` or
    /// `egress` rules).
    pub isolate: bool,
    /// What passes.
    pub allow: Vec<Rule>,
    /// What never passes, whatever any policy allows.
    pub deny: Vec<Rule>,
}

/// A rule: traffic with any of `peers` on any of `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// `None`: any peer, anywhere.
    pub peers: Option<Vec<Peer>>,
    /// `None`: all traffic (every protocol, every port). With named ports, `Some` of the
    /// numeric ones (possibly none).
    pub ports: Option<Vec<PortRange>>,
    /// Ports named as the endpoints name them (Kubernetes' `port: http`), resolved per
    /// endpoint by the compiler; a name that resolves to nothing matches nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub named_ports: Vec<NamedPort>,
}

/// A port by name: `name` among an endpoint's [`NamedPorts`], with protocol `proto`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamedPort {
    pub proto: u8,
    pub name: String,
}

/// An endpoint's named ports: name → (protocol, port). The CNI carries no container port
/// names, so they come from `hypha run --port` or the API.
pub type NamedPorts = std::collections::BTreeMap<String, (u8, u16)>;

/// Checks a port name as Kubernetes does (IANA_SVC_NAME): at most 15 characters,
/// lowercase letters, digits and '-', at least one letter, no '-' at either end and no
/// "--".
pub fn validate_port_name(name: &str) -> Result<(), String> {
    if hypha_api::is_port_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid port name (at most 15 lowercase letters, digits and '-', \
             at least one letter, no '-' at either end and no \"--\")"
        ))
    }
}

/// The other side of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peer {
    /// Endpoints matching `pods` in the namespaces of `namespaces`.
    Endpoints {
        namespaces: NamespaceScope,
        pods: LabelSelector,
    },
    /// Addresses in `net` but in none of `except`. Of one family: the `except`s are of
    /// `net`'s family (the parser checks it), and an IPv4 `net` never matches an IPv6
    /// address nor the reverse.
    Cidr { net: IpNet, except: Vec<IpNet> },
    /// A well-known group of identities.
    Entity(Entity),
}

/// Where an endpoint peer's namespace may be.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NamespaceScope {
    /// Exactly this namespace.
    Named(String),
    /// Namespaces whose labels match.
    Selected(LabelSelector),
}

/// CiliumNetworkPolicy's entities (Hypha's kind: `fromEntities`/`toEntities`, written
/// `host`, `remote-node`, `world`, `cluster`, `all`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entity {
    /// The node: its addresses and the gateway.
    Host,
    /// Everything outside the cluster's endpoints and nodes: every CIDR and the world.
    World,
    /// The host, the other nodes of the cluster and every endpoint, this node's and
    /// other nodes'.
    Cluster,
    /// Everything.
    All,
    /// The other nodes of the cluster (cluster mode): their underlay addresses, gateways
    /// and IPv6 router addresses, and what their hosts send through the tunnel. Not
    /// implied by an isolated endpoint's ingress (only this node's host is).
    RemoteNode,
}

/// A protocol and a port range. `first == 0` means every port of the protocol; ICMP has
/// no ports and is always `first == last == 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    pub proto: u8,
    pub first: u16,
    pub last: u16,
}

pub const PROTO_ICMP: u8 = 1;
/// ICMPv6, as the datapath keys it (the upper-layer protocol after the extension headers).
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// The name of an IP protocol as policies write it.
pub fn proto_name(proto: u8) -> String {
    match proto {
        0 => "any".into(),
        PROTO_ICMP => "ICMP".into(),
        PROTO_ICMPV6 => "ICMPv6".into(),
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_SCTP => "SCTP".into(),
        p => format!("proto-{p}"),
    }
}

/// The number of a named port's protocol (`TCP`, `UDP`, `SCTP`), as named ports write it.
pub fn port_protocol(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

/// An endpoint as the policy compiler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyEndpoint {
    pub id: u32,
    /// Its addresses, one per family it has (at least one): both map to its identity.
    pub address: Option<Ipv4Addr>,
    pub address6: Option<Ipv6Addr>,
    pub namespace: String,
    /// The labels selectors see: the endpoint's labels without the bookkeeping ones.
    pub labels: Labels,
    /// Its named ports (what `port: http` in a policy resolves to).
    pub ports: NamedPorts,
    /// An endpoint of another node (cluster mode): a peer only. Its labels are an
    /// identity selectors match and its addresses go into the ipcache, but it gets no
    /// policy entries and no flags (nothing keyed by its id is compiled).
    pub remote: bool,
}

impl PolicyEndpoint {
    /// From the labels the endpoint was created with: the namespace comes from
    /// [`NAMESPACE_LABEL`] (default [`DEFAULT_NAMESPACE`]), and the labels starting with
    /// [`BOOKKEEPING_PREFIX`] are left out. `address` is one of its addresses; a
    /// dual-stack endpoint gets the other with [`Self::with_address`].
    pub fn new(id: u32, address: impl Into<IpAddr>, labels: &Labels) -> Self {
        Self::unaddressed(id, labels).with_address(address.into())
    }

    /// The same endpoint (id, addresses, named ports) with `labels` instead.
    pub fn relabelled(&self, labels: &Labels) -> Self {
        Self {
            address: self.address,
            address6: self.address6,
            ports: self.ports.clone(),
            remote: self.remote,
            ..Self::unaddressed(self.id, labels)
        }
    }

    fn unaddressed(id: u32, labels: &Labels) -> Self {
        let namespace = labels
            .get(NAMESPACE_LABEL)
            .filter(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let labels = labels
            .iter()
            .filter(|(k, _)| !k.starts_with(BOOKKEEPING_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Self {
            id,
            address: None,
            address6: None,
            namespace,
            labels,
            ports: NamedPorts::new(),
            remote: false,
        }
    }

    /// The same endpoint as another node's (see [`Self::remote`]).
    pub fn into_remote(mut self) -> Self {
        self.remote = true;
        self
    }

    /// With `address` as its address of that family.
    pub fn with_address(mut self, address: IpAddr) -> Self {
        match address {
            IpAddr::V4(a) => self.address = Some(a),
            IpAddr::V6(a) => self.address6 = Some(a),
        }
        self
    }

    /// Its addresses, IPv4 first.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + use<> {
        self.address
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.address6.map(IpAddr::V6))
    }

    /// With named ports `ports`.
    pub fn with_ports(mut self, ports: NamedPorts) -> Self {
        self.ports = ports;
        self
    }
}

/// The labels of namespace `ns`: what the operator set plus [`NAMESPACE_NAME_LABEL`].
pub fn namespace_labels(
    ns: &str,
    operator_set: &std::collections::BTreeMap<String, Labels>,
) -> Labels {
    let mut labels = operator_set.get(ns).cloned().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.to_owned(), ns.to_owned());
    labels
}

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod tests;
