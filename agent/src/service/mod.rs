//! Services as operators write them (Kubernetes `Service` and `EndpointSlice`), and the
//! pure functions that turn them, with the cluster's endpoints, into the load balancer's
//! plan: ClusterIP allocation from the service CIDRs, backends from selectors (what
//! Kubernetes' EndpointSlice controller does) or from explicit slices, named target
//! ports resolved per backend, and Maglev tables. No I/O here: the control plane
//! (`control/services.rs`) stores, diffs and writes the maps (`datapath/lb_maps.rs`).
//!
//! SCAFFOLD: the types are decided; the functions are placeholders the service-model
//! work fills in (parse.rs, alloc.rs, backends.rs, maglev.rs).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

mod maglev;
mod parse;
#[cfg(test)]
mod parse_tests;

pub use maglev::maglev;
pub use parse::{MAX_AFFINITY_TIMEOUT_S, SERVICE_NAME_LABEL, family_of, parse_file, proto_name};

/// Labels: key → value.
pub type Labels = BTreeMap<String, String>;

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when not given (Kubernetes' default).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Kubernetes' default NodePort range (`--service-node-port-range`).
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30_000..=32_767;

/// Why a service document or a change was refused. Every message names the source, the
/// document and the field.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ServiceError {
    /// A document is malformed or names an impossible value.
    #[error("{source_name}: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
    /// A ClusterIP or NodePort is taken, outside its range, or the range is full.
    #[error("service {service}: {message}")]
    Allocation { service: String, message: String },
}

/// `spec.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
}

/// An address family of `spec.ipFamilies`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

/// `spec.ipFamilyPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IpFamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

/// `spec.ports[]`'s `targetPort`: a number, or a name the backends' named ports resolve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// One of `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// Required (and unique) when the service has more than one port.
    pub name: String,
    /// `PROTO_TCP` or `PROTO_UDP` (`policy::PROTO_*`).
    pub protocol: u8,
    pub port: u16,
    /// Defaults to `port`.
    pub target_port: TargetPort,
    /// NodePort services: given, or allocated from [`NODE_PORT_RANGE`].
    pub node_port: Option<u16>,
}

/// A Kubernetes `v1` `Service` of type ClusterIP or NodePort.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub kind: ServiceType,
    /// `spec.clusterIPs` (or `spec.clusterIP`) as written; after allocation, the
    /// service's addresses, one per family, primary first.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.ipFamilies` as written (may be empty: the cluster's first family).
    pub ip_families: Vec<IpFamily>,
    pub ip_family_policy: IpFamilyPolicy,
    pub ports: Vec<ServicePort>,
    /// `None`: no selector (backends come from `EndpointSlice` documents).
    pub selector: Option<Labels>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds; `None`: no affinity.
    pub session_affinity: Option<u32>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One endpoint of an [`EndpointSlice`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready` (absent: ready, as Kubernetes reads it).
    pub ready: bool,
    /// `nodeName`.
    pub node: Option<String>,
}

/// One of an [`EndpointSlice`]'s `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlicePort {
    /// Matches the service port of that name ("" for an unnamed one).
    pub name: String,
    pub protocol: u8,
    pub port: u16,
}

/// A `discovery.k8s.io/v1` `EndpointSlice`: backends for a service without a selector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// Its `kubernetes.io/service-name` label: the service it serves.
    pub service: String,
    pub family: IpFamily,
    pub endpoints: Vec<SliceEndpoint>,
    pub ports: Vec<SlicePort>,
}

impl EndpointSlice {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One document of a service file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Document {
    Service(Service),
    Slice(EndpointSlice),
}

/// The service CIDRs (`--service-cidr`, one per family).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCidrs {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

/// What is taken: ClusterIPs and NodePorts → the service (`namespace/name`) holding them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    pub ips: BTreeMap<IpAddr, String>,
    pub node_ports: BTreeMap<(u8, u16), String>,
}

/// Gives `svc` its ClusterIPs (those it asks for, checked to lie in the CIDR of their
/// family and to be free or its own; the others allocated: the lowest free address,
/// never the network's first nor, for IPv4, its last) and its NodePorts, per its family
/// policy. Pure: `taken` is what the other services hold (an update of `svc` keeps what
/// it has when it asks for nothing else).
pub fn assign(cidrs: &ServiceCidrs, taken: &Taken, svc: &mut Service) -> Result<(), ServiceError> {
    // SCAFFOLD
    let _ = (cidrs, taken);
    Err(ServiceError::Allocation {
        service: svc.key(),
        message: "allocation is not implemented yet".to_owned(),
    })
}

/// An endpoint anywhere in the cluster, as backend selection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// For display: `<node>/<container id>` or the endpoint's name.
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub addresses: Vec<IpAddr>,
    /// Its node's name.
    pub node: String,
    /// On this node.
    pub local: bool,
    /// Its named ports: name → (protocol, port).
    pub ports: BTreeMap<String, (u8, u16)>,
}

/// One backend of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// The node it runs on ("" when an `EndpointSlice` does not say).
    pub node: String,
    pub local: bool,
    /// For display: the pod's name, or `slice <namespace/name>`.
    pub pod: String,
}

/// One frontend the node programs: an address, a port, a protocol and a scope
/// (`hypha_common::lb::LB_SCOPE_*`), with its backends in a stable order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// `namespace/name` of the service.
    pub service: String,
    /// The service port's name.
    pub port_name: String,
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    /// `hypha_common::lb::LB_F_*`.
    pub flags: u32,
    pub affinity_timeout_s: u32,
    pub backends: Vec<Backend>,
}

/// The frontends of every service on this node: each ClusterIP and port (internal
/// scope, only local backends under `internalTrafficPolicy: Local`), and for NodePort
/// services each of `node_addrs` and node port twice (internal scope: all backends;
/// external: only local ones under `externalTrafficPolicy: Local`). Backends are the
/// ready endpoints the selector matches in the service's namespace with an address of
/// the frontend's family (or the slices' endpoints), the target port resolved per pod (a
/// pod without the named port is no backend of that port). Pure and deterministic.
pub fn plan(
    services: &[Service],
    slices: &[EndpointSlice],
    pods: &[Pod],
    node_addrs: &[IpAddr],
) -> Vec<Frontend> {
    // SCAFFOLD
    let _ = (services, slices, pods, node_addrs);
    Vec::new()
}
