//! The agent's API: HTTP/1.1 with JSON bodies over a unix socket.
//!
//! | method and path                               | body                      | answer              |
//! |-----------------------------------------------|---------------------------|---------------------|
//! | `GET /v1/status`                              |                           | [`Status`]          |
//! | `GET /v1/endpoints`                           |                           | `Vec<`[`Endpoint`]`>` |
//! | `POST /v1/ipam/allocate`                      | [`AllocateRequest`]       | [`Allocation`]      |
//! | `POST /v1/endpoints`                          | [`CreateEndpointRequest`] | [`Endpoint`]        |
//! | `GET /v1/endpoints/{container_id}/{ifname}`   |                           | [`EndpointCheck`]   |
//! | `DELETE /v1/endpoints/{container_id}/{ifname}`|                           | [`DeleteResponse`]  |
//! | `POST /v1/gc`                                 | [`GcRequest`]             | [`GcResponse`]      |
//! | `POST /v1/policies`                           | `Vec<`[`PolicySource`]`>` | [`ApplyPoliciesResponse`] |
//! | `GET /v1/policies`                            |                           | `Vec<`[`PolicySummary`]`>` |
//! | `DELETE /v1/policies/{namespace}/{name}`      |                           | [`PolicySummary`]   |
//! | `GET /v1/endpoints/{id or container}/policy`  |                           | [`EndpointPolicy`]  |
//! | `PUT /v1/namespaces/{namespace}/labels`       | [`NamespaceLabelsRequest`]| [`NamespaceLabels`] |
//! | `PUT /v1/endpoints/{id or container}/debug`   | [`DebugRequest`]          | [`Endpoint`]        |
//! | `PUT /v1/endpoints/{id or container}/labels`  | [`EndpointLabelsRequest`] | [`Endpoint`]        |
//! | `PUT /v1/endpoints/{id or container}/ports`   | [`EndpointPortsRequest`]  | [`Endpoint`]        |
//! | `GET /v1/nodes`                               |                           | `Vec<`[`NodeInfo`]`>` |
//! | `DELETE /v1/nodes/{name}[?force=true]`        |                           | [`RemoveNodeResponse`] |
//! | `GET /v1/identities`                          |                           | `Vec<`[`IdentityInfo`]`>` |
//!
//! Request bodies refuse keys they do not know (`400`, the key named), so that a
//! misspelt or wrongly cased field is never taken for an absent one.
//!
//! `hypha-cni` sends, with each request of an ADD, the header
//! [`ATTACHMENT_LOCKED_AT`]: the moment it took the attachment's lock, in nanoseconds of
//! [`boottime_ns`]. The agent refuses an ALLOCATE or a create whose moment is before a DEL
//! of the same attachment it has handled (`409`): that request comes from an ADD the
//! runtime killed and then deleted, and what it would take would belong to no one.
//!
//! Errors come back with a 4xx/5xx status and an [`ApiError`] body. Because it is plain
//! HTTP, `curl --unix-socket /run/hypha/agent.sock http://hypha/v1/status` works too.

mod client;
mod mac;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

pub use client::{Client, ClientError};

/// The request header that carries when the sending `hypha-cni` invocation took the
/// attachment's lock, as decimal nanoseconds of [`boottime_ns`].
pub const ATTACHMENT_LOCKED_AT: &str = "hypha-attachment-locked-at";

/// Nanoseconds of `CLOCK_BOOTTIME`: the host's one clock since boot, the same in every
/// process (it never jumps with the wall clock), so the plugin's moments and the agent's
/// can be compared.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill; CLOCK_BOOTTIME exists on
    // every kernel Hypha runs on, so the call cannot fail.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    debug_assert_eq!(ret, 0, "clock_gettime(CLOCK_BOOTTIME)");
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
pub use mac::{MacAddr, ParseMacError};

/// Default path of the agent's API socket.
pub const DEFAULT_SOCKET: &str = "/run/hypha/agent.sock";

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Version of the agent binary.
    pub version: String,
    /// Seconds since this agent process started.
    pub uptime_seconds: u64,
    pub node: NodeStatus,
    pub ipam: IpamStatus,
    pub datapath: DatapathStatus,
    /// Number of endpoints the agent manages.
    pub endpoints: usize,
    #[serde(default)]
    pub policy: PolicyStatus,
    /// Services this node programs (absent from older agents: zeros).
    #[serde(default)]
    pub services: ServicesStatus,
    /// Cluster mode: the store, this node and what it has seen (absent on a single node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
    /// Cluster mode: how pods reach other nodes' pods (absent on a single node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingStatus>,
}

/// `Status::routing`: the overlay (or native routing) as this agent runs it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoutingStatus {
    /// `tunnel` (VXLAN, the default) or `native`.
    pub mode: String,
    /// The VXLAN device and its UDP port (tunnel mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The pods' MTU.
    pub mtu: u32,
    /// Other nodes routed to.
    pub peers: usize,
    /// Packets the tunnel refused before reaching any endpoint, by reason
    /// (`unknown-tunnel-source`, `invalid-tunnel-identity`, `no-tunnel-peer`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drops: Vec<DropCount>,
}

/// `Status::cluster`: the cluster store as this agent sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterStatus {
    /// This node's name (`--node-name`).
    pub node_name: String,
    /// The store's endpoints (`--cluster-store`).
    pub store: Vec<String>,
    /// Whether the agent's watch of the store is up.
    pub connected: bool,
    /// The store revision the agent has applied.
    pub revision: i64,
    /// Unix milliseconds of the last full sync (list) of the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_unix_ms: Option<u64>,
    /// Nodes known (this one included).
    pub nodes: usize,
    /// Endpoints of other nodes in this node's ipcache.
    pub remote_endpoints: usize,
    /// Full syncs so far (the first, then one per lost watch).
    pub resyncs: u64,
    /// Why the store is unreachable, while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/nodes`: one node of the cluster (on a single node, the node itself).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// Underlay addresses.
    pub addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr6: Option<Ipv6Net>,
    pub version: String,
    /// Unix milliseconds of its last heartbeat (absent: its lease is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_unix_ms: Option<u64>,
    /// Whether its agent holds a live lease.
    pub alive: bool,
    /// Endpoints it has in the store.
    pub endpoints: usize,
    /// Whether it is the node answering.
    #[serde(default)]
    pub local: bool,
    /// Traffic with it through the tunnel, as the answering node counted it (absent for
    /// the answering node itself, and without a tunnel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<NodeTraffic>,
}

/// `NodeInfo::tunnel`: inner packets and bytes to and from one other node.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeTraffic {
    pub tx: PacketCount,
    pub rx: PacketCount,
    /// Received from it and dropped.
    pub dropped: PacketCount,
}

/// `DELETE /v1/nodes/{name}` (`hypha node remove`): what left the store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoveNodeResponse {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr6: Option<Ipv6Net>,
    /// Its endpoints removed from the store.
    pub endpoints: usize,
}

/// `GET /v1/identities`: one security identity this node knows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdentityInfo {
    pub id: u32,
    /// `labels` (cluster-wide in cluster mode), `cidr` (node-local), or `reserved`
    /// (host, world).
    pub kind: String,
    /// What it stands for: `namespace` and `labels`, or the `cidr`, or the reserved name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<ipnet::IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved: Option<String>,
    /// Endpoints of this node with it.
    pub local_endpoints: usize,
    /// Endpoints of other nodes with it (cluster mode).
    #[serde(default)]
    pub remote_endpoints: usize,
}

/// The node's pod CIDRs, at most one per family: dual stack by default, IPv4-only or
/// IPv6-only when configured so.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    /// The IPv4 pod CIDR and gateway (absent on an IPv6-only node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// The IPv6 pod CIDR and gateway (the link-local `fe80::1`; absent on an IPv4-only
    /// node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr6: Option<Ipv6Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
    /// Host device that carries the gateway address.
    pub host_device: String,
    pub masquerade: bool,
    pub socket: String,
    pub state_dir: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IpamStatus {
    /// IPv4 addresses pods can get in the IPv4 pod CIDR (0 without one).
    pub capacity: u32,
    pub allocated: u32,
    pub available: u32,
    /// IPv6 addresses pods can get in the IPv6 pod CIDR (0 without one).
    #[serde(default)]
    pub capacity6: u64,
    #[serde(default)]
    pub allocated6: u64,
    #[serde(default)]
    pub available6: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DatapathStatus {
    pub pin_dir: String,
    /// Endpoints found at start-up with their programs still attached and kept as they were.
    pub adopted_endpoints: usize,
    /// Names of the loaded eBPF programs.
    pub programs: Vec<String>,
    /// How the programs are attached to endpoints: `tc` or `tcx` (empty from an agent
    /// older than the setting, which attached with TCX).
    #[serde(default)]
    pub attach: String,
}

/// `POST /v1/ipam/allocate`: reserve one address per family of the node for one
/// interface of one container. Asking again for the same container and interface
/// returns the same addresses.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AllocateRequest {
    pub container_id: String,
    pub ifname: String,
    /// A specific IPv4 address (the CNI `ips` capability); it must be free and in the
    /// IPv4 pod CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    /// As `address`, for IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
}

/// The pod's addresses, one per family the node has: configured as a /32 and a /128
/// on the pod's interface, each with a default route through its family's gateway,
/// which the host side answers for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Allocation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// Always the link-local `fe80::1` when there is an IPv6 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr6: Option<Ipv6Net>,
    /// The MTU of the pod's interface (both ends of its veth): in cluster mode, the
    /// underlay's MTU less the tunnel's overhead (or the underlay's with native routing).
    /// Absent: the kernel's default (a single node). A network configuration's own
    /// `mtu` wins, up to this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// `POST /v1/endpoints`: the veth exists and the pod is addressed; attach the datapath.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpointRequest {
    pub container_id: String,
    pub ifname: String,
    /// Path of the container's network namespace, as the runtime gave it.
    pub netns: String,
    /// Name of the host-side veth (in the agent's network namespace).
    pub host_ifname: String,
    /// Addresses previously allocated for this container and interface (or given by
    /// the delegated IPAM plugin): at least one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// MAC of the container-side interface.
    pub pod_mac: MacAddr,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The address came from a delegated IPAM plugin, not from the agent's allocator: the
    /// agent records it without an allocation (and releases nothing on delete).
    #[serde(default)]
    pub external_ipam: bool,
    /// Rate limits from the CNI `bandwidth` capability, stored for the datapath to enforce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    /// The pod's named ports (from `args.cni.namedPorts`), for policies naming ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NamedPort>,
}

/// Rate limits as the CNI `bandwidth` capability gives them: rates in bits per second,
/// bursts in bits. Absent fields mean no limit in that direction.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bandwidth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_rate: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_rate: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_burst: Option<u64>,
}

/// One endpoint, as `GET /v1/endpoints` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Endpoint {
    pub id: u32,
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    /// Its IPv4 and IPv6 addresses: at least one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    pub pod_mac: MacAddr,
    pub host_mac: MacAddr,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Whether the address came from a delegated IPAM plugin.
    #[serde(default)]
    pub external_ipam: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    /// Counters read from the datapath, all families together; zero when they could
    /// not be read.
    #[serde(default)]
    pub counters: EndpointCounters,
    /// The IPv4 (with ARP) and IPv6 (with neighbour discovery) parts of `counters`.
    #[serde(default)]
    pub counters4: EndpointCounters,
    #[serde(default)]
    pub counters6: EndpointCounters,
    /// Drops by reason.
    #[serde(default)]
    pub drops: Vec<DropCount>,
    /// The datapath traces this endpoint's packets into the agent's log
    /// (`PUT /v1/endpoints/{id}/debug`).
    #[serde(default)]
    pub debug: bool,
    /// The pod's named ports, for NetworkPolicy ports given by name
    /// (`PUT /v1/endpoints/{id}/ports`).
    #[serde(default)]
    pub ports: Vec<NamedPort>,
    /// Its security identity (cluster-wide in cluster mode); absent while it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<u32>,
}

/// A named container port (`http` = 8080/TCP), which a NetworkPolicy may name instead of
/// a number. The CNI carries no port names, so they come from `hypha run --port` or
/// `hypha endpoint ports`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    /// `TCP` (the default), `UDP` or `SCTP`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_protocol() -> String {
    "TCP".to_owned()
}

/// A port name as Kubernetes validates a container port's (`IsValidPortName`, an
/// IANA_SVC_NAME): 1 to 15 characters of `a-z`, `0-9` and `-`, at least one letter, no
/// `-` first, last or twice in a row. The one check of the agent (policies, the API) and
/// hypha-cni (`args.cni.namedPorts`); the launcher, a runtime of its own that does not
/// depend on this crate, checks `--port` the same way.
pub fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// Parses `NAME<sep>NUMBER[/PROTOCOL]` (`http=8080/tcp` for `hypha endpoint ports`,
/// `http:8080/tcp` for `hypha run --port`); the protocol is TCP unless given (tcp, udp
/// or sctp, any case). The agent checks the name.
pub fn parse_named_port(spec: &str, sep: char) -> Result<NamedPort, String> {
    let form = format!("NAME{sep}NUMBER[/PROTOCOL]");
    let (name, rest) = spec
        .split_once(sep)
        .ok_or_else(|| format!("{spec:?} is not {form}"))?;
    let (number, protocol) = match rest.split_once('/') {
        Some((n, p)) => (n, p.to_ascii_uppercase()),
        None => (rest, "TCP".to_owned()),
    };
    let port: u16 = number
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{spec:?}: {number:?} is not a port number (1 to 65535)"))?;
    if !matches!(protocol.as_str(), "TCP" | "UDP" | "SCTP") {
        return Err(format!(
            "{spec:?}: protocol {protocol:?} is not tcp, udp or sctp"
        ));
    }
    if name.is_empty() {
        return Err(format!("{spec:?}: the port name is empty"));
    }
    Ok(NamedPort {
        name: name.to_owned(),
        port,
        protocol,
    })
}

/// `PUT /v1/endpoints/{id or container id}/ports`: replaces the endpoint's named ports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointPortsRequest {
    pub ports: Vec<NamedPort>,
}

/// `PUT /v1/endpoints/{id or container id}/labels`: sets and removes a running
/// endpoint's labels; it moves to the identity of its new labels.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointLabelsRequest {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `PUT /v1/endpoints/{id or container id}/debug`: turns the tracing of an endpoint's
/// packets by the eBPF programs on or off. Saved with the endpoint.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DebugRequest {
    pub enabled: bool,
}

/// Per-endpoint counters, in the pod's directions.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointCounters {
    /// What the pod sent.
    pub egress: DirectionCounters,
    /// What the pod received.
    pub ingress: DirectionCounters,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirectionCounters {
    /// To or from the host's stack (pod ↔ host, pod ↔ world).
    pub passed: PacketCount,
    /// Straight between two pods by the eBPF datapath.
    pub redirected: PacketCount,
    /// To or from pods on other nodes through the tunnel.
    #[serde(default)]
    pub tunnel: PacketCount,
    pub dropped: PacketCount,
}

impl DirectionCounters {
    /// Packets and bytes forwarded either way (passed, redirected and tunnelled).
    pub fn forwarded(&self) -> PacketCount {
        PacketCount {
            packets: self.passed.packets + self.redirected.packets + self.tunnel.packets,
            bytes: self.passed.bytes + self.redirected.bytes + self.tunnel.bytes,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PacketCount {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DropCount {
    /// Stable name of the drop reason, such as `invalid-ipv4-header`.
    pub reason: String,
    /// `egress` or `ingress`, in the pod's terms.
    pub direction: String,
    pub packets: u64,
    pub bytes: u64,
}

/// `DELETE /v1/endpoints/{container_id}/{ifname}`. Deleting what is not there succeeds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeleteResponse {
    /// Whether an endpoint existed and was removed.
    pub endpoint_removed: bool,
    /// The addresses given back to the pools, if any were held.
    pub address_released: Option<Ipv4Addr>,
    #[serde(default)]
    pub address6_released: Option<Ipv6Addr>,
}

/// `GET /v1/endpoints/{container_id}/{ifname}`: the endpoint and whether the datapath
/// still holds everything it should, for CNI CHECK.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EndpointCheck {
    pub endpoint: Endpoint,
    /// Problems found: the host veth gone or replaced, a program detached, a map entry
    /// missing or different. Empty when all is well.
    pub problems: Vec<String>,
}

/// One attachment a runtime still considers valid (CNI GC's `cni.dev/valid-attachments`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// `POST /v1/gc`: remove every endpoint and address reservation not listed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    pub valid_attachments: Vec<Attachment>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GcResponse {
    /// Attachments whose endpoint, veth, map entries and address were removed.
    pub removed: Vec<Attachment>,
    /// Addresses given back to the pools.
    pub released: Vec<IpAddr>,
    /// What could not be cleaned; the rest was cleaned anyway.
    pub errors: Vec<String>,
}

/// Where `hypha-cni` leaves a DEL it could not hand to the agent (the agent was down):
/// one [`Attachment`] as JSON per file, in a directory beside the agent's socket. The
/// agent finishes those deletes when it is back, at start and then periodically.
pub fn deferred_deletes_dir(socket: &std::path::Path) -> std::path::PathBuf {
    let mut name = socket.file_name().unwrap_or_default().to_os_string();
    name.push(".deferred");
    socket.with_file_name(name)
}

/// One line of `GET /v1/monitor` (newline-delimited JSON, streamed as events happen).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MonitorEvent {
    /// `drop`, `policy-allow` or `policy-audit`.
    pub kind: String,
    /// `ingress` or `egress`, of the endpoint `endpoint_id`.
    pub direction: String,
    pub endpoint_id: u32,
    pub ifindex: u32,
    /// Why it was dropped (drops only), such as `policy-denied`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The deciding policy, or "no policy allows this".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub remote_identity: u32,
    /// What `remote_identity` stands for: `namespace/{k=v,...}` for a label identity
    /// (cluster-wide ones too: another node's pods), `host`, `remote-node`, `world`,
    /// `world6`, `cidr:<prefix>`; absent when the agent does not know it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_labels: Option<String>,
    pub protocol: String,
    /// IPv4 or IPv6; `0.0.0.0` for a frame that had no addresses.
    pub source: IpAddr,
    pub source_port: u16,
    pub destination: IpAddr,
    pub destination_port: u16,
    pub bytes: u32,
    /// When the destination is a service backend: the service the flow was translated
    /// from, `namespace/name VIP:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// One policy file as `POST /v1/policies` takes it: the agent parses it (the same way
/// it parses the files of its watched directory).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicySource {
    /// The file's name, for messages.
    pub source: String,
    /// Its text: YAML (several documents allowed) or JSON.
    pub content: String,
}

/// Answer to `POST /v1/policies`: the files were valid and are all in force.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyPoliciesResponse {
    /// `namespace/name` of every policy applied (new or replaced).
    pub applied: Vec<String>,
    /// Policy map entries written and removed by the change.
    pub entries_set: usize,
    pub entries_removed: usize,
}

/// Answer to `POST /v1/services` (a body of [`PolicySource`]s, the service files): the
/// files were valid and every node-local map holds them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyServicesResponse {
    /// `namespace/name` of every service applied (new or replaced).
    pub applied: Vec<String>,
    /// `namespace/name` of every `EndpointSlice` applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slices: Vec<String>,
    /// How long programming the datapath took, in microseconds (for benchmarks).
    pub program_us: u64,
}

/// One service, as `GET /v1/services` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// `ClusterIP` or `NodePort`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its ClusterIPs, primary first.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortInfo>,
    /// `sessionAffinity: ClientIP`'s timeout in seconds; absent without affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_timeout: Option<u32>,
    /// `Cluster` or `Local`.
    pub external_traffic_policy: String,
    /// `Cluster` or `Local`.
    pub internal_traffic_policy: String,
    /// Where it came from: `api: <file>` or `dir: <path>` (or `store` in cluster mode).
    pub source: String,
}

/// One port of a [`ServiceInfo`], with the backends it has on this node's view.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub name: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    pub port: u16,
    /// A number or a port name, as written.
    pub target_port: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
    pub backends: Vec<ServiceBackendInfo>,
}

/// One backend of a service port, with what this node's datapath gave it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceBackendInfo {
    pub address: IpAddr,
    pub port: u16,
    /// The node it runs on ("" when an `EndpointSlice` does not say).
    pub node: String,
    /// The pod (`<node>/<container id>` or endpoint name), or `slice <namespace/name>`.
    pub pod: String,
    /// Connections (and UDP sends) this node translated to it.
    pub connections: u64,
    /// Packets and bytes this node translated to it per packet (NodePort).
    pub packets: u64,
    pub bytes: u64,
}

/// One policy, as `GET /v1/policies` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicySummary {
    pub namespace: String,
    pub name: String,
    /// `NetworkPolicy` or `HyphaNetworkPolicy`.
    pub kind: String,
    /// The policy id the datapath reports it by (monitor, counters).
    pub id: u32,
    pub audit: bool,
    /// Where it came from: `api: <file>` or `dir: <path>`.
    pub source: String,
    /// Endpoints it applies to (ids).
    pub selected_endpoints: Vec<u32>,
    /// Whether it isolates its endpoints for ingress / egress.
    pub ingress: bool,
    pub egress: bool,
    pub allow_rules: usize,
    pub deny_rules: usize,
}

/// `GET /v1/endpoints/{id or container id}/policy`: what an endpoint enforces.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub endpoint_id: u32,
    pub container_id: String,
    pub namespace: String,
    /// Its security identity and what it stands for.
    pub identity: u32,
    pub identity_labels: String,
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
    /// Named ports of the policies selecting it that resolve to no port (they match
    /// nothing, as in Kubernetes), e.g. `ingress port 'http' of default/web`.
    #[serde(default)]
    pub unresolved_ports: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirectionPolicy {
    /// Some policy selects the endpoint for this direction: only what an entry allows
    /// passes. When false, everything passes.
    pub enforced: bool,
    /// Every selecting policy is in audit mode: what would be dropped is reported and
    /// passed.
    pub audit: bool,
    /// Policies selecting it for this direction (`namespace/name`).
    pub policies: Vec<String>,
    pub entries: Vec<PolicyEntryView>,
}

/// One entry of the policy map, readable.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyEntryView {
    /// `allow` or `deny`.
    pub action: String,
    pub audit: bool,
    pub identity: u32,
    /// What the identity stands for: labels, a CIDR, `host`, `world`, `any`.
    pub peer: String,
    /// `TCP`, `UDP`, `SCTP`, `ICMP` or `any`.
    pub protocol: String,
    /// 0: any port.
    pub port: u16,
    /// `namespace/name`, or `(implicit)` for the agent's own entries.
    pub policy: String,
}

/// `PUT /v1/namespaces/{namespace}/labels`: sets and removes a namespace's labels.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceLabelsRequest {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A namespace's labels after a change (including `kubernetes.io/metadata.name`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NamespaceLabels {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// Services part of [`Status`]: what `GET /v1/services` lists, counted.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServicesStatus {
    pub services: usize,
    /// ClusterIP:port pairs and NodePorts, each once per protocol.
    pub frontends: usize,
    /// Distinct backends (address, port) over every service port.
    pub backends: usize,
}

impl ServicesStatus {
    /// Counts what `GET /v1/services` lists.
    pub fn of(services: &[ServiceInfo]) -> Self {
        let frontends = services
            .iter()
            .flat_map(|s| {
                s.ports
                    .iter()
                    .map(|p| s.cluster_ips.len() + usize::from(p.node_port.is_some()))
            })
            .sum();
        let backends: std::collections::BTreeSet<(IpAddr, u16)> = services
            .iter()
            .flat_map(|s| &s.ports)
            .flat_map(|p| &p.backends)
            .map(|b| (b.address, b.port))
            .collect();
        Self {
            services: services.len(),
            frontends,
            backends: backends.len(),
        }
    }
}

/// Policy part of [`Status`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyStatus {
    pub policies: usize,
    /// Entries in the policy map and prefixes in the ipcache.
    pub entries: usize,
    pub ipcache: usize,
    /// Directory the agent watches for policy files.
    pub policy_dir: String,
    /// Problems with policy files or the last recompilation, such as an invalid file in
    /// the watched directory (its policies stay as they were).
    pub errors: Vec<String>,
    /// Files of the watched directory that are refused, retried with backoff until they
    /// are applied, fixed or removed.
    #[serde(default)]
    pub refused_files: Vec<RefusedPolicyFile>,
}

/// A file of the watched policy directory that the agent refuses; the policies it had
/// before stay as they were.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusedPolicyFile {
    pub file: String,
    /// Why, naming the file.
    pub error: String,
    /// Attempts in a row that failed.
    pub attempts: u32,
}

/// The body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ApiError {
    pub error: String,
}

/// An error and its causes on one line, `outer: inner: innermost`, leaving out a cause
/// whose text the message before it already contains (many errors here quote their cause).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer ({0})")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("quiet")]
    struct Quiet(#[source] Inner);

    #[test]
    fn chain_skips_quoted_causes() {
        assert_eq!(error_chain(&Outer(Inner)), "outer (inner)");
        assert_eq!(error_chain(&Quiet(Inner)), "quiet: inner");
    }
}
