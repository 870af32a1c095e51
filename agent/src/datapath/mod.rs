//! The datapath as the control plane sees it: a small trait with an eBPF implementation
//! (`ebpf.rs`, needs root) and a recording fake (`fake.rs`), so that the control plane is
//! unit-tested without privileges.

pub mod debug_log;
mod ebpf;
mod endpoint_maps;
#[cfg(test)]
pub mod fake;
pub mod lb_maps;
mod link_info;
mod nodeport;
pub mod policy_maps;
mod socklb;
mod tunnel_maps;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hypha_common::{DropKey, EndpointStats, NodeStats};
use ipnet::{Ipv4Net, Ipv6Net};

pub use ebpf::{EbpfDatapath, EbpfError};
pub use lb_maps::{InstalledLb, LbBackendSpec, LbDiff, LbFrontendKey, MaglevTable};

use crate::policy::PolicyDiff;
use crate::state::EndpointRecord;

/// The policy contents of the datapath's maps, as read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstalledPolicy {
    /// `hypha_ipcache4` and `hypha_ipcache6` together.
    pub ipcache: std::collections::BTreeMap<ipnet::IpNet, u32>,
    pub entries: std::collections::BTreeMap<hypha_common::PolicyKey, hypha_common::PolicyEntry>,
}

/// The node's tunnel, as the datapath needs it (see [`Datapath::set_tunnel`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelSetup {
    /// The VXLAN device (collect-metadata mode) the agent made.
    pub ifindex: u32,
    pub ifname: String,
    /// This node's underlay addresses: the outer source of what it tunnels (`None`: the
    /// kernel's route lookup picks it).
    pub local4: Option<Ipv4Addr>,
    pub local6: Option<Ipv6Addr>,
    /// The node's IPv6 SNAT address (`hypha_lb6_snat`): the source IPv6 NodePort flows
    /// to a backend on another node are given, whose replies come back through the
    /// tunnel (the router address, `overlay::router6`). `None`: such flows are refused.
    pub snat6: Option<Ipv6Addr>,
}

/// Another node, as the tunnel maps hold it (see [`Datapath::set_tunnel_peers`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelPeerSpec {
    /// Key of its `hypha_node_stats` entry; stable for a node name (see `overlay`).
    pub node_id: u32,
    pub name: String,
    /// The underlay address to tunnel to (outer destination).
    pub underlay: IpAddr,
    /// All its underlay addresses: the outer sources accepted from it.
    pub addresses: Vec<IpAddr>,
    pub pod_cidr: Option<Ipv4Net>,
    pub pod_cidr6: Option<Ipv6Net>,
}

/// What became of an endpoint found at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// Its programs were still attached; they now run this agent's programs, in place,
    /// without a moment of detachment.
    Adopted,
    /// Its attachments were gone and have been made anew.
    Reattached,
}

/// The datapath operations the control plane needs. Shared between threads: every
/// operation takes `&self`, and operations on different endpoints may run at once (an
/// implementation keeps its own state consistent and holds no lock across a wait in the
/// kernel).
pub trait Datapath: Send + Sync {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Attaches the programs to the endpoint's host veth and fills its map entries;
    /// `flags` (`ENDPOINT_F_*`: its policy's and its bandwidth's, OR-ed by the control
    /// plane) go into its `EndpointInfo::flags`. The endpoint's policy entries and ipcache
    /// entries are already in place (see [`PolicyDiff`]).
    fn attach(&self, ep: &EndpointRecord, flags: u32) -> Result<(), Self::Error>;

    /// Takes over an endpoint that was attached by an earlier agent process, with its
    /// current flags (as for `attach`).
    fn adopt(&self, ep: &EndpointRecord, flags: u32) -> Result<Adoption, Self::Error>;

    /// Sets the bits of `mask` in the endpoint's `EndpointInfo::flags` to those of
    /// `flags`, leaving the other bits as they are (the bandwidth code changes
    /// `ENDPOINT_F_INGRESS_LIMIT` this way without touching the policy bits).
    fn set_flags(&self, ep: &EndpointRecord, mask: u32, flags: u32) -> Result<(), Self::Error>;

    /// Turns the tracing of the endpoint's packets by the programs on or off (its
    /// lines go to the agent's log). `attach` and `adopt` take it from `ep.debug`.
    fn set_debug(&self, ep: &EndpointRecord, on: bool) -> Result<(), Self::Error>;

    /// Applies a policy diff to the ipcache, the policy map and the attached endpoints'
    /// flags, in the order [`PolicyDiff`] documents. Only the policy bits
    /// (`ENDPOINT_F_POLICY_MASK`) of the flags are written; the others are kept.
    fn apply_policy(&self, diff: &PolicyDiff) -> Result<(), Self::Error>;

    /// What the ipcache and the policy map hold now (an earlier agent's work, at start),
    /// so that the first diff also removes what no policy wants any more. The default
    /// says "nothing", which only leaves stale entries behind.
    fn installed_policy(&self) -> Result<InstalledPolicy, Self::Error> {
        Ok(InstalledPolicy::default())
    }

    /// Flows decided per policy id, summed over CPUs.
    fn policy_stats(&self) -> Result<Vec<(u32, hypha_common::PolicyStats)>, Self::Error> {
        Ok(Vec::new())
    }

    /// Removes everything `attach` made; keeps going past errors and returns them all.
    fn detach(&self, ep: &EndpointRecord) -> Vec<Self::Error>;

    /// What of `ep` is missing or different in the datapath (empty when all is in place).
    fn check(&self, ep: &EndpointRecord) -> Vec<String>;

    /// Removes map entries and pinned links that belong to none of `keep`.
    fn sweep(&self, keep: &[EndpointRecord]) -> Vec<Self::Error>;

    /// Counters of the endpoint on host ifindex `ifindex`, summed over CPUs.
    fn stats(&self, ifindex: u32) -> Result<EndpointStats, Self::Error>;

    /// All drop counters, summed over CPUs.
    fn drops(&self) -> Result<Vec<(DropKey, hypha_common::Counter)>, Self::Error>;

    /// Names of the loaded programs.
    fn programs(&self) -> Vec<String>;

    /// The flow classifier (`hypha_flow_class`) the rate limiters' `htb` qdiscs are given,
    /// with the number of leaf classes it hashes into; `None` where there is no eBPF (the
    /// fakes), in which case a limited interface gets one class.
    fn flow_classifier(&self) -> Option<FlowClassifier<'_>> {
        None
    }

    /// Sets the node's tunnel: attaches `hypha_from_tunnel` and `hypha_to_tunnel` to the
    /// VXLAN device (pinned links, replaced in place when an earlier agent's are there)
    /// and writes `hypha_tunnel_cfg`. `None` (single node, native routing): the config is
    /// zeroed, so `hypha_from_pod` tunnels nothing.
    fn set_tunnel(&self, tunnel: Option<&TunnelSetup>) -> Result<(), Self::Error>;

    /// Makes `hypha_tunnel4`, `hypha_tunnel6`, `hypha_nodes4`, `hypha_nodes6` and
    /// `hypha_node_stats` hold exactly `peers`: entries of nodes not in it are removed
    /// (a removed node is no longer routed nor accepted), a kept node keeps its counters.
    /// Every entry is written; errors are collected and the others still written.
    fn set_tunnel_peers(&self, peers: &[TunnelPeerSpec]) -> Vec<Self::Error>;

    /// Tunnel counters per node id, summed over CPUs.
    fn node_stats(&self) -> Result<Vec<(u32, NodeStats)>, Self::Error>;

    /// Services: writes `diff` to the load balancer's maps in its order (see
    /// [`LbDiff`]); goes on past errors and returns them all.
    fn apply_lb(&self, diff: &LbDiff) -> Vec<Self::Error>;

    /// What the load balancer's maps hold now (an earlier agent's work, at start), so
    /// that ids are kept across restarts and the first diff removes what no service
    /// wants any more.
    fn installed_lb(&self) -> Result<InstalledLb, Self::Error> {
        Ok(InstalledLb::default())
    }

    /// Every backend's counters (`hypha_lb_backend_stats`) by backend id, summed over
    /// CPUs.
    fn lb_stats(&self) -> Result<Vec<(u32, hypha_common::lb::LbBackendStats)>, Self::Error> {
        Ok(Vec::new())
    }

    /// Services, socket side: attaches the socket programs (`hypha_common::lb::programs`)
    /// to the cgroup v2 hierarchy mounted at `cgroup` (pinned links, replaced in place on
    /// restart) and registers this agent's own network namespace in `hypha_lb_netns`;
    /// pods' namespaces are registered by `attach`/`adopt` and removed by `detach`. The
    /// default (fakes) does nothing.
    fn set_socket_lb(&self, cgroup: &std::path::Path) -> Result<(), Self::Error> {
        let _ = cgroup;
        Ok(())
    }

    /// Services, NodePort side: attaches the NodePort program (`hypha_from_netdev`) to
    /// the TCX ingress of `devices` (the node's external interfaces; pinned links,
    /// replaced in place on restart) and detaches it from any other. Empty: NodePort is
    /// served nowhere.
    fn set_nodeport(&self, devices: &[NodePortDevice]) -> Result<(), Self::Error> {
        let _ = devices;
        Ok(())
    }
}

/// A node interface that takes NodePort traffic from outside the node (`--nodeport-device`,
/// or the interface holding `--node-ip`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePortDevice {
    pub name: String,
    pub ifindex: u32,
    /// Its addresses: the NodePort frontends' addresses.
    pub addresses: Vec<std::net::IpAddr>,
}

/// The loaded `hypha_flow_class` program and the leaf count it was loaded with.
#[derive(Debug, Clone, Copy)]
pub struct FlowClassifier<'a> {
    pub fd: std::os::fd::BorrowedFd<'a>,
    /// Leaf classes the program hashes flows into (`--fq-queues`).
    pub queues: u16,
}
