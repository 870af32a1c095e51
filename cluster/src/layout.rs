//! The cluster store's key layout: every key under one versioned prefix
//! (`/hypha/v1/` by default), values in JSON. The README's "Cluster store layout" section
//! documents it for operators; a layout change that old agents cannot read takes a new
//! version prefix.
//!
//! | key                                        | value                | written by               |
//! |--------------------------------------------|----------------------|--------------------------|
//! | `nodes/<node>`                             | [`NodeRecord`]       | the node's agent, leased |
//! | `cidrs/<node>`                             | [`NodeCidrs`]        | registration (txn)       |
//! | `cidr-claims/v4/<net>` `cidr-claims/v6/<net>` | node name          | registration (same txn)  |
//! | `identities/id/<number>`                   | [`IdentityRecord`]   | any agent (CAS)          |
//! | `identities/labels/<sha256>`               | number (decimal)     | any agent (same txn)     |
//! | `endpoints/<node>/<container-id>/<ifname>` | [`EndpointEntry`]    | the owning agent         |
//! | `namespaces/<namespace>`                   | labels (JSON object) | `hypha namespace label`  |
//! | `policies/<namespace>/<name>`              | the policy (JSON)    | `hypha policy apply`     |
//! | `services/<namespace>/<name>`              | the service (JSON)   | `hypha service apply` (txn) |
//! | `endpointslices/<namespace>/<name>`        | the slice (JSON)     | `hypha service apply`    |
//! | `serviceips/<ip>`                          | `namespace/name`     | `hypha service apply` (same txn) |
//! | `servicenodeports/<proto>/<port>`          | `namespace/name`     | `hypha service apply` (same txn) |
//!
//! `<net>` is the prefix with `/` written `_` (`10.244.3.0_24`). Readers: the agent
//! (`agent/src/cluster/`), the cluster integration tests and `cargo xtask bench
//! cluster-control` (which writes synthetic nodes and endpoints).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The default prefix of every key.
pub const DEFAULT_PREFIX: &str = "/hypha/v1/";

/// Labels: key → value.
pub type Labels = BTreeMap<String, String>;

/// The keys of one cluster (one prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Default for Layout {
    fn default() -> Self {
        Layout::new(DEFAULT_PREFIX)
    }
}

impl Layout {
    /// Keys under `prefix` (a trailing `/` is added when missing).
    pub fn new(prefix: &str) -> Layout {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Layout { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }
    pub fn node(&self, name: &str) -> String {
        format!("{}{name}", self.nodes())
    }
    pub fn cidrs(&self) -> String {
        format!("{}cidrs/", self.prefix)
    }
    pub fn node_cidrs(&self, name: &str) -> String {
        format!("{}{name}", self.cidrs())
    }
    /// `cidr-claims/v4/` or `cidr-claims/v6/`.
    pub fn cidr_claims(&self, v6: bool) -> String {
        format!(
            "{}cidr-claims/{}/",
            self.prefix,
            if v6 { "v6" } else { "v4" }
        )
    }
    pub fn cidr_claim(&self, net: IpNet) -> String {
        let v6 = matches!(net, IpNet::V6(_));
        format!(
            "{}{}",
            self.cidr_claims(v6),
            net.to_string().replace('/', "_")
        )
    }
    pub fn identities_by_id(&self) -> String {
        format!("{}identities/id/", self.prefix)
    }
    pub fn identity(&self, id: u32) -> String {
        format!("{}{id}", self.identities_by_id())
    }
    pub fn identities_by_labels(&self) -> String {
        format!("{}identities/labels/", self.prefix)
    }
    pub fn identity_labels(&self, namespace: &str, labels: &Labels) -> String {
        format!(
            "{}{}",
            self.identities_by_labels(),
            labels_digest(namespace, labels)
        )
    }
    pub fn endpoints(&self) -> String {
        format!("{}endpoints/", self.prefix)
    }
    pub fn node_endpoints(&self, node: &str) -> String {
        format!("{}{node}/", self.endpoints())
    }
    pub fn endpoint(&self, node: &str, container_id: &str, ifname: &str) -> String {
        format!("{}{container_id}/{ifname}", self.node_endpoints(node))
    }
    pub fn namespaces(&self) -> String {
        format!("{}namespaces/", self.prefix)
    }
    pub fn namespace(&self, name: &str) -> String {
        format!("{}{name}", self.namespaces())
    }
    pub fn policies(&self) -> String {
        format!("{}policies/", self.prefix)
    }
    pub fn policy(&self, namespace: &str, name: &str) -> String {
        format!("{}{namespace}/{name}", self.policies())
    }
    pub fn services(&self) -> String {
        format!("{}services/", self.prefix)
    }
    pub fn service(&self, namespace: &str, name: &str) -> String {
        format!("{}{namespace}/{name}", self.services())
    }
    pub fn endpoint_slices(&self) -> String {
        format!("{}endpointslices/", self.prefix)
    }
    pub fn endpoint_slice(&self, namespace: &str, name: &str) -> String {
        format!("{}{namespace}/{name}", self.endpoint_slices())
    }
    pub fn service_ips(&self) -> String {
        format!("{}serviceips/", self.prefix)
    }
    /// The claim of a ClusterIP: the service holding it (`namespace/name`).
    pub fn service_ip(&self, ip: IpAddr) -> String {
        format!("{}{ip}", self.service_ips())
    }
    pub fn service_node_ports(&self) -> String {
        format!("{}servicenodeports/", self.prefix)
    }
    /// The claim of a NodePort (`proto` is the IP protocol number).
    pub fn service_node_port(&self, proto: u8, port: u16) -> String {
        format!("{}{proto}/{port}", self.service_node_ports())
    }
}

/// What a key under the prefix stands for (see [`Layout::parse`]); borrowed from the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key<'a> {
    /// `nodes/<node>`
    Node(&'a str),
    /// `cidrs/<node>`
    Cidrs(&'a str),
    /// `cidr-claims/v4|v6/<net>`
    CidrClaim(IpNet),
    /// `identities/id/<number>`
    Identity(u32),
    /// `identities/labels/<sha256>`
    IdentityLabels(&'a str),
    /// `endpoints/<node>/<container-id>/<ifname>`
    Endpoint {
        node: &'a str,
        container_id: &'a str,
        ifname: &'a str,
    },
    /// `namespaces/<namespace>`
    Namespace(&'a str),
    /// `policies/<namespace>/<name>`
    Policy { namespace: &'a str, name: &'a str },
    /// `services/<namespace>/<name>`
    Service { namespace: &'a str, name: &'a str },
    /// `endpointslices/<namespace>/<name>`
    EndpointSlice { namespace: &'a str, name: &'a str },
    /// `serviceips/<ip>`
    ServiceIp(IpAddr),
    /// `servicenodeports/<proto>/<port>`
    ServiceNodePort { proto: u8, port: u16 },
}

impl Layout {
    /// What `key` stands for; `None` for a key outside the prefix or of no known shape
    /// (an empty segment, one segment too many or too few, a claim that is not a network
    /// of its family, an identity that is not a number). A mirror of the whole prefix
    /// dispatches its deltas with it.
    pub fn parse<'a>(&self, key: &'a str) -> Option<Key<'a>> {
        let rest = key.strip_prefix(self.prefix.as_str())?;
        let (kind, rest) = rest.split_once('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        match (kind, parts.as_slice()) {
            ("nodes", [node]) => Some(Key::Node(node)),
            ("cidrs", [node]) => Some(Key::Cidrs(node)),
            ("cidr-claims", [family, net]) => {
                let net: IpNet = net.replace('_', "/").parse().ok()?;
                match (*family, net) {
                    ("v4", IpNet::V4(_)) | ("v6", IpNet::V6(_)) => Some(Key::CidrClaim(net)),
                    _ => None,
                }
            }
            ("identities", ["id", n]) => n.parse().ok().map(Key::Identity),
            ("identities", ["labels", digest]) => Some(Key::IdentityLabels(digest)),
            ("endpoints", [node, container_id, ifname]) => Some(Key::Endpoint {
                node,
                container_id,
                ifname,
            }),
            ("namespaces", [namespace]) => Some(Key::Namespace(namespace)),
            ("policies", [namespace, name]) => Some(Key::Policy { namespace, name }),
            ("services", [namespace, name]) => Some(Key::Service { namespace, name }),
            ("endpointslices", [namespace, name]) => Some(Key::EndpointSlice { namespace, name }),
            ("serviceips", [ip]) => ip.parse().ok().map(Key::ServiceIp),
            ("servicenodeports", [proto, port]) => Some(Key::ServiceNodePort {
                proto: proto.parse().ok()?,
                port: port.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// The sha256 (hex) of a label set's canonical JSON (`[namespace, {labels sorted}]`).
pub fn labels_digest(namespace: &str, labels: &Labels) -> String {
    let canonical = serde_json::to_vec(&(namespace, labels)).expect("labels serialize");
    let digest = Sha256::digest(&canonical);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `nodes/<node>`: a live node, held by its agent's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// Random id of the agent's state directory: a restarted agent (same state) takes its
    /// node back; another agent claiming the name is refused.
    pub uid: String,
    /// Underlay addresses (`--node-ip`), IPv4 first.
    pub addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr6: Option<Ipv6Net>,
    /// The agent's version.
    pub version: String,
    /// Unix milliseconds of the last heartbeat.
    pub heartbeat_ms: u64,
}

/// `cidrs/<node>`: the pod CIDRs allocated to a node, kept until `hypha node remove`.
/// Other nodes route to it while this key exists (readers: every agent's overlay,
/// `agent/src/overlay.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCidrs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v4: Option<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v6: Option<Ipv6Net>,
    /// The node's underlay addresses (`--node-ip`, IPv4 first) as it last registered:
    /// where other nodes tunnel to, kept here (not leased) so that a node whose agent died
    /// stays routed. Absent in keys written before the overlay: empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
}

/// `identities/id/<number>`: what a cluster-wide identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    pub namespace: String,
    pub labels: Labels,
    /// Unix milliseconds since when no endpoint of the cluster has used it (set by the
    /// garbage collector, cleared by an agent that uses it again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unused_since_ms: Option<u64>,
}

/// `endpoints/<node>/<container-id>/<ifname>`: a pod's addresses and identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointEntry {
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<std::net::Ipv6Addr>,
    pub identity: u32,
    /// The namespace and labels the identity stands for (so a reader needs no second
    /// lookup).
    pub namespace: String,
    pub labels: Labels,
    /// Its named ports, so that a service's named `targetPort` resolves on other nodes
    /// (readers: every agent's service planning, `agent/src/control/services.rs`).
    /// Absent in entries written before services: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EndpointPort>,
}

/// One named port of an [`EndpointEntry`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPort {
    pub name: String,
    /// The IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub protocol: u8,
    pub port: u16,
}

impl EndpointEntry {
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + use<> {
        self.address
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.address6.map(IpAddr::V6))
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_under_the_prefix() {
        let l = Layout::new("/x/v1");
        assert_eq!(l.node("a"), "/x/v1/nodes/a");
        assert_eq!(
            l.cidr_claim("10.244.3.0/24".parse().unwrap()),
            "/x/v1/cidr-claims/v4/10.244.3.0_24"
        );
        assert_eq!(l.endpoint("n1", "c1", "eth0"), "/x/v1/endpoints/n1/c1/eth0");
        let a: Labels = [("app".to_owned(), "web".to_owned())].into();
        assert_eq!(
            l.identity_labels("default", &a),
            l.identity_labels("default", &a.clone())
        );
        assert_ne!(
            labels_digest("default", &a),
            labels_digest("other", &a),
            "the namespace is part of the identity"
        );
    }

    #[test]
    fn keys_parse_back() {
        let l = Layout::default();
        let a: Labels = [("app".to_owned(), "web".to_owned())].into();
        let digest = labels_digest("default", &a);
        let net4: IpNet = "10.244.3.0/24".parse().unwrap();
        let net6: IpNet = "fd00:10:244:3::/64".parse().unwrap();
        let cases = [
            (l.node("n1"), Key::Node("n1")),
            (l.node_cidrs("n1"), Key::Cidrs("n1")),
            (l.cidr_claim(net4), Key::CidrClaim(net4)),
            (l.cidr_claim(net6), Key::CidrClaim(net6)),
            (l.identity(4242), Key::Identity(4242)),
            (
                l.identity_labels("default", &a),
                Key::IdentityLabels(&digest),
            ),
            (
                l.endpoint("n1", "c1", "eth0"),
                Key::Endpoint {
                    node: "n1",
                    container_id: "c1",
                    ifname: "eth0",
                },
            ),
            (l.namespace("prod"), Key::Namespace("prod")),
            (
                l.policy("prod", "web"),
                Key::Policy {
                    namespace: "prod",
                    name: "web",
                },
            ),
        ];
        for (key, want) in &cases {
            assert_eq!(l.parse(key).as_ref(), Some(want), "{key}");
        }
        for bad in [
            "/other/v1/nodes/n1",
            "/hypha/v1/nodes/",
            "/hypha/v1/nodes/a/b",
            "/hypha/v1/nodes",
            "/hypha/v1/endpoints/n1/c1",
            "/hypha/v1/endpoints/n1//eth0",
            "/hypha/v1/identities/id/x",
            "/hypha/v1/cidr-claims/v6/10.244.3.0_24",
            "/hypha/v1/cidr-claims/v4/nonsense",
            "/hypha/v1/unknown/x",
        ] {
            assert_eq!(l.parse(bad), None, "{bad}");
        }
    }
}
