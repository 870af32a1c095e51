//! The agent's side of the host network: the gateway device, forwarding, masquerading
//! and the per-pod host routes. Behind a trait so the control plane is testable without
//! root; the Linux implementation uses the project's netlink layer (`hypha-netlink`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hypha_api::MacAddr;
use hypha_netlink::{Netlink, Route};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::bandwidth::Limit;
use crate::config::PodCidrs;
use crate::datapath::FlowClassifier;

pub mod cgroup;
mod tunnel;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Netlink(#[from] hypha_netlink::Error),
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up masquerading with nft (is the nftables package installed?): {0}")]
    Nft(String),
    /// The node has an IPv6 pod CIDR but the kernel runs without IPv6.
    #[error(
        "the node has IPv6 pod CIDR {cidr} but IPv6 is off in the agent's network namespace ({path} is missing: is the kernel booted with ipv6.disable=1?)"
    )]
    NoIpv6 { cidr: Ipv6Net, path: PathBuf },
    /// The tunnel device's name is taken by a device Hypha did not make.
    #[error(
        "interface {name} exists and is {found}, not one in external mode made by Hypha: delete it or choose another --tunnel-device"
    )]
    NotOurVxlan { name: String, found: String },
    /// Some cluster routes could not be set (each error names its route); the others were.
    #[error("cannot set the cluster routes: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    ClusterRoutes(Vec<hypha_netlink::Error>),
}

/// A host-side interface as the agent needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLink {
    pub index: u32,
    pub mac: MacAddr,
}

/// The host network operations of the control plane. Shared between threads: every
/// operation takes `&self` and may run at the same time as any other.
pub trait HostNetwork: Send + Sync {
    /// Makes the node ready for pods: gateway device and address, forwarding, masquerade.
    fn setup_node(&self, node: &NodeNetwork) -> Result<(), HostError>;
    /// The interface named `name` in the agent's network namespace, if it exists.
    fn link(&self, name: &str) -> Result<Option<HostLink>, HostError>;
    /// Deletes a host interface (a pod's host veth, which takes its peer along); whether
    /// it existed.
    fn delete_link(&self, name: &str) -> Result<bool, HostError>;
    /// Routes `address` to the pod behind host interface `ifindex`.
    fn route_pod(
        &self,
        ifindex: u32,
        address: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Result<(), HostError>;
    /// Routes the pod's IPv6 `address` (a /128, no gateway) to host interface `ifindex`.
    fn route_pod6(&self, ifindex: u32, address: Ipv6Addr) -> Result<(), HostError>;
    /// The subnets of the addresses the agent's network namespace holds (IPv6 link-local
    /// ones aside): what native routing reaches on-link.
    fn subnets(&self) -> Result<Vec<ipnet::IpNet>, HostError>;
    /// The addresses the agent's network namespace holds, both families, link-local
    /// IPv6 ones aside (policy gives all of fe80::/10 the host's identity): traffic from
    /// them is the node's own, as from the IPv4 gateway.
    fn addresses(&self) -> Result<Vec<IpAddr>, HostError>;
    /// Installs or changes (`Some`) or removes (`None`) the rate limiter on `side`: Hypha's
    /// per-flow `htb` (see [`crate::bandwidth`]), with the classifier's leaf count,
    /// classified by `classifier` (`hypha_flow_class`; without one, one leaf).
    /// Removal of a limiter that is not there, or on an interface that is gone, succeeds.
    fn set_rate_limit(
        &self,
        side: LimitSide<'_>,
        limit: Option<Limit>,
        classifier: Option<FlowClassifier<'_>>,
    ) -> Result<(), HostError>;
    /// Packets the rate limiter on `side` dropped since it was installed (`None` when
    /// there is none).
    fn rate_limit_drops(&self, side: LimitSide<'_>) -> Result<Option<u64>, HostError>;

    /// Creates the node's VXLAN device in collect-metadata (external) mode as `spec` says
    /// and sets it up; an existing device of that name made by an earlier agent is taken
    /// over (its MTU set to `spec.mtu`); a device of that name that is anything else is
    /// refused, naming it. Returns the device.
    fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<HostLink, HostError>;
    /// The MTU of the interface that holds `address` (`None`: no interface holds it).
    fn mtu_of_address(&self, address: IpAddr) -> Result<Option<u32>, HostError>;
    /// The name of the interface that holds `address` (`None`: no interface holds it):
    /// the node's NodePort device by default.
    fn link_name_of_address(&self, address: IpAddr) -> Result<Option<String>, HostError>;
    /// The interface named `name`: its ifindex and its addresses, both families, IPv6
    /// link-local ones aside (a NodePort device's frontend addresses); `None` when no
    /// interface has that name.
    fn link_addresses(&self, name: &str) -> Result<Option<(u32, Vec<IpAddr>)>, HostError>;
    /// Makes the routes Hypha owns to other nodes' pods exactly `routes`: adds what is
    /// missing, replaces what differs, removes Hypha's other cluster routes (they carry
    /// Hypha's own route protocol number, so nobody else's routes are touched).
    fn set_cluster_routes(&self, routes: &[ClusterRoute]) -> Result<(), HostError>;
}

/// The node's VXLAN device (see [`HostNetwork::ensure_vxlan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    /// UDP destination port (and the port it listens on).
    pub port: u16,
    pub mtu: u32,
}

/// A route to other nodes' pods (see [`HostNetwork::set_cluster_routes`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClusterRoute {
    /// Tunnel mode: `dst` (the cluster CIDR of a family) through the VXLAN device, with
    /// `src` (an address of this node inside its own pod CIDR) as the source, so that
    /// replies come back through the tunnel.
    Device {
        dst: ipnet::IpNet,
        ifindex: u32,
        src: Option<IpAddr>,
    },
    /// Native routing: another node's pod CIDR `dst` via its underlay address.
    Via { dst: ipnet::IpNet, gateway: IpAddr },
}

/// Where an endpoint's rate limiter sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitSide<'a> {
    /// The root qdisc of the host veth (the pod's ingress).
    HostVeth { ifindex: u32 },
    /// The root qdisc of the pod's interface, inside its network namespace (its egress).
    Pod { netns: &'a Path, ifname: &'a str },
}

/// What the node's network looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNetwork {
    pub pod_cidrs: PodCidrs,
    /// The IPv4 gateway, on a node with an IPv4 pod CIDR.
    pub gateway: Option<Ipv4Addr>,
    pub host_device: String,
    pub masquerade: bool,
    /// Cluster tunnel mode with an IPv6 pod CIDR: the node's own address inside it
    /// (`overlay::router6`), put on the host device as a /128: the source of what the
    /// host sends to other nodes' IPv6 pods.
    pub router6: Option<Ipv6Addr>,
    /// Cluster mode: the cluster CIDRs, which masquerading leaves alone (pod ↔ pod keeps
    /// its addresses across nodes).
    pub cluster_cidrs: ClusterNets,
}

/// The cluster CIDRs, per family (see [`NodeNetwork::cluster_cidrs`]); none: a single
/// node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterNets {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

/// The real thing, in the agent's own network namespace. Each call opens its own netlink
/// socket (a socket costs a few microseconds; a netlink call that waits for the kernel
/// then holds nothing another call needs).
pub struct LinuxHost {
    _private: (),
}

impl LinuxHost {
    /// Checks that a netlink socket can be opened here (the calls open their own).
    pub fn new() -> Result<Self, HostError> {
        Netlink::new()?;
        Ok(Self { _private: () })
    }

    /// A socket for one call, in the agent's network namespace.
    fn nl(&self) -> Result<Netlink, HostError> {
        Ok(Netlink::new()?)
    }
}

impl HostNetwork for LinuxHost {
    fn setup_node(&self, node: &NodeNetwork) -> Result<(), HostError> {
        let mut nl = self.nl()?;
        // The gateway address sits on an existing device (loopback by default: every
        // kernel has it, unlike `dummy`); any other named device is created as a dummy.
        let dev = match nl.link_by_name(&node.host_device)? {
            Some(l) => l,
            None => {
                nl.create_dummy(&node.host_device)?;
                nl.link_by_name(&node.host_device)?.ok_or_else(|| {
                    hypha_netlink::Error::LinkNotFound {
                        link: node.host_device.clone(),
                        netns: "the agent's network namespace".into(),
                    }
                })?
            }
        };
        if let Some(gateway) = node.gateway {
            nl.add_address(dev.index, gateway, 32)?;
        }
        nl.set_up(dev.index)?;
        if node.pod_cidrs.v4.is_some() {
            write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        }
        if let Some(cidr) = node.pod_cidrs.v6 {
            enable_ipv6_forwarding(Path::new("/proc/sys/net/ipv6/conf"), cidr)?;
        }
        // After IPv6 is known to be on.
        if let Some(router6) = node.router6 {
            nl.add_address6(dev.index, router6, 128)?;
        }
        if node.masquerade {
            masquerade(&masquerade_ruleset(node.pod_cidrs, node.cluster_cidrs))?;
        }
        Ok(())
    }

    fn subnets(&self) -> Result<Vec<ipnet::IpNet>, HostError> {
        let mut nl = self.nl()?;
        let mut out = Vec::new();
        for link in nl.links()? {
            for (a, len) in nl.addresses(link.index)? {
                if let Ok(n) = Ipv4Net::new(a, len) {
                    out.push(ipnet::IpNet::V4(n.trunc()));
                }
            }
            for a in nl.addresses6(link.index)? {
                if a.address.is_unicast_link_local() {
                    continue;
                }
                if let Ok(n) = Ipv6Net::new(a.address, a.prefix_len) {
                    out.push(ipnet::IpNet::V6(n.trunc()));
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn link(&self, name: &str) -> Result<Option<HostLink>, HostError> {
        Ok(self.nl()?.link_by_name(name)?.map(|l| HostLink {
            index: l.index,
            mac: MacAddr(l.mac),
        }))
    }

    fn delete_link(&self, name: &str) -> Result<bool, HostError> {
        Ok(self.nl()?.delete_link_by_name(name)?)
    }

    fn route_pod(
        &self,
        ifindex: u32,
        address: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Result<(), HostError> {
        self.nl()?.add_route(&Route {
            dst: Ipv4Net::new(address, 32).expect("/32 is a valid prefix"),
            gateway: None,
            oif: ifindex,
            scope_link: true,
            src: Some(gateway),
        })?;
        Ok(())
    }

    fn addresses(&self) -> Result<Vec<IpAddr>, HostError> {
        let mut nl = self.nl()?;
        let mut out = Vec::new();
        for link in nl.links()? {
            out.extend(
                nl.addresses(link.index)?
                    .into_iter()
                    .map(|(a, _)| IpAddr::V4(a)),
            );
            out.extend(
                nl.addresses6(link.index)?
                    .into_iter()
                    .map(|a| a.address)
                    .filter(|a| !a.is_unicast_link_local())
                    .map(IpAddr::V6),
            );
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn route_pod6(&self, ifindex: u32, address: Ipv6Addr) -> Result<(), HostError> {
        // No gateway and no source: the route is on-link through the host veth, which
        // keeps its own kernel link-local address for neighbour discovery.
        self.nl()?.add_route6(&hypha_netlink::Route6 {
            dst: Ipv6Net::new(address, 128).expect("/128 is a valid prefix"),
            gateway: None,
            oif: ifindex,
            src: None,
        })?;
        Ok(())
    }

    fn set_rate_limit(
        &self,
        side: LimitSide<'_>,
        limit: Option<Limit>,
        classifier: Option<FlowClassifier<'_>>,
    ) -> Result<(), HostError> {
        let (pod_nl, index) = Self::limiter_socket(side)?;
        let mut nl = match pod_nl {
            Some(n) => n,
            None => self.nl()?,
        };
        let Some(index) = index else {
            return match limit {
                None => Ok(()),
                Some(_) => Err(HostError::Netlink(hypha_netlink::Error::LinkNotFound {
                    link: describe_side(side),
                    netns: "its network namespace".into(),
                })),
            };
        };
        let egress = matches!(side, LimitSide::Pod { .. });
        match limit {
            Some(l) => {
                let mtu = nl.link_by_index(index)?.map(|l| l.mtu).unwrap_or(1500);
                let tbf = l.tbf(mtu);
                // The classifier after the classes it names, and before the GSO size: until
                // it is there, everything queues in the default leaf, still shaped.
                let queues = classifier.map_or(1, |c| c.queues);
                nl.replace_htb(index, &l.htb(mtu, queues))?;
                if let Some(prog) = classifier {
                    nl.replace_htb_classifier(
                        index,
                        prog.fd.as_raw_fd(),
                        hypha_common::programs::FLOW_CLASS,
                    )?;
                }
                if egress {
                    // The pod's own stack builds its GSO packets: small enough to fit the
                    // queue whole, a full queue refuses them to the socket instead of `tbf`
                    // cutting a 64 KB packet up and dropping the pieces it cannot hold.
                    nl.set_gso_max_size(index, crate::bandwidth::gso_size(&tbf, mtu))?;
                }
            }
            None => {
                nl.delete_hypha_root_qdisc(index)?;
                if egress {
                    nl.set_gso_max_size(index, crate::bandwidth::GSO_MAX)?;
                }
            }
        }
        Ok(())
    }

    fn rate_limit_drops(&self, side: LimitSide<'_>) -> Result<Option<u64>, HostError> {
        let (pod_nl, index) = Self::limiter_socket(side)?;
        let Some(index) = index else {
            return Ok(None);
        };
        let mut nl = match pod_nl {
            Some(n) => n,
            None => self.nl()?,
        };
        Ok(nl
            .root_qdisc(index)?
            .filter(|q| q.is_hypha())
            .map(|q| q.drops))
    }

    fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<HostLink, HostError> {
        let link = tunnel::ensure_vxlan(&mut self.nl()?, spec)?;
        Ok(HostLink {
            index: link.index,
            mac: MacAddr(link.mac),
        })
    }

    fn mtu_of_address(&self, address: IpAddr) -> Result<Option<u32>, HostError> {
        Ok(self.nl()?.link_of_address(address)?.map(|l| l.mtu))
    }

    fn link_name_of_address(&self, address: IpAddr) -> Result<Option<String>, HostError> {
        Ok(self.nl()?.link_of_address(address)?.map(|l| l.name))
    }

    fn link_addresses(&self, name: &str) -> Result<Option<(u32, Vec<IpAddr>)>, HostError> {
        let mut nl = self.nl()?;
        let Some(link) = nl.link_by_name(name)? else {
            return Ok(None);
        };
        let mut out: Vec<IpAddr> = nl
            .addresses(link.index)?
            .into_iter()
            .map(|(a, _)| IpAddr::V4(a))
            .collect();
        for a in nl.addresses6(link.index)? {
            if !a.address.is_unicast_link_local() {
                out.push(IpAddr::V6(a.address));
            }
        }
        Ok(Some((link.index, out)))
    }

    fn set_cluster_routes(&self, routes: &[ClusterRoute]) -> Result<(), HostError> {
        tunnel::set_cluster_routes(&mut self.nl()?, routes)
    }
}

/// How a limiter's interface is named in messages.
fn describe_side(side: LimitSide<'_>) -> String {
    match side {
        LimitSide::HostVeth { ifindex } => format!("host veth #{ifindex}"),
        LimitSide::Pod { netns, ifname } => format!("{ifname} in {}", netns.display()),
    }
}

impl LinuxHost {
    /// A socket where `side` lives and the interface index there (`None` if it is gone):
    /// for the pod's side, a socket opened in its namespace (entered once, for the time
    /// it takes to open it); for the host veth, `None`: a socket of the agent's serves.
    fn limiter_socket(side: LimitSide<'_>) -> Result<(Option<Netlink>, Option<u32>), HostError> {
        match side {
            LimitSide::HostVeth { ifindex } => Ok((None, Some(ifindex))),
            LimitSide::Pod { netns, ifname } => {
                if !netns.exists() {
                    return Ok((None, None));
                }
                let mut nl = Netlink::in_netns(netns)?;
                let index = nl.link_by_name(ifname)?.map(|l| l.index);
                Ok((Some(nl), index))
            }
        }
    }
}

/// Turns IPv6 on (`disable_ipv6` = 0, for every interface and for those created later)
/// and IPv6 forwarding on, under `conf` (`/proc/sys/net/ipv6/conf`).
///
/// Forwarding on makes the kernel ignore router advertisements on interfaces whose
/// `accept_ra` is 1 (RFC 4861: a router does not take them); a host that configures
/// itself by SLAAC needs `accept_ra` = 2 on its uplink.
fn enable_ipv6_forwarding(conf: &Path, cidr: Ipv6Net) -> Result<(), HostError> {
    if !conf.exists() {
        return Err(HostError::NoIpv6 {
            cidr,
            path: conf.to_owned(),
        });
    }
    for dir in ["default", "all"] {
        write_sysctl(conf.join(dir).join("disable_ipv6"), "0")?;
    }
    write_sysctl(conf.join("all").join("forwarding"), "1")
}

fn write_sysctl(path: impl AsRef<Path>, value: &str) -> Result<(), HostError> {
    let path = path.as_ref();
    std::fs::write(path, value).map_err(|source| HostError::Io {
        op: "write",
        path: path.into(),
        source,
    })
}

/// The nftables table of the agent serving `pod_cidr`, as agents before dual stack named
/// it (in family `ip`); a dual-stack or IPv4 agent keeps the name, in family `inet`.
pub fn nft_table(pod_cidr: Ipv4Net) -> String {
    let [a, b, c, d] = pod_cidr.network().octets();
    format!("hypha_{a}_{b}_{c}_{d}_{}", pod_cidr.prefix_len())
}

/// The name of the agent's `inet` table: one per agent, so that agents with different pod
/// CIDRs in one network namespace do not touch each other's rules. From the IPv4 pod
/// CIDR when there is one (the name agents before dual stack used), else from the IPv6
/// one (`hypha_fd00_10_244_0_0_0_0_0_64`).
pub fn nft_table_of(cidrs: PodCidrs) -> String {
    match (cidrs.v4, cidrs.v6) {
        (Some(v4), _) => nft_table(v4),
        (None, Some(v6)) => {
            let groups: Vec<String> = v6
                .network()
                .segments()
                .iter()
                .map(|g| format!("{g:x}"))
                .collect();
            format!("hypha_{}_{}", groups.join("_"), v6.prefix_len())
        }
        (None, None) => "hypha".into(),
    }
}

/// The nftables script that masquerades pod traffic leaving the pod CIDR of its family
/// (in cluster mode: leaving the cluster CIDR, so that pods of different nodes see each
/// other's addresses), both families in one `inet` table. It replaces the table whole
/// and removes the `ip` table of an agent before dual stack, in one transaction (`nft -f`
/// applies a file atomically), so re-running is idempotent and no packet sees half a
/// ruleset.
pub fn masquerade_ruleset(cidrs: PodCidrs, cluster: ClusterNets) -> String {
    let table = nft_table_of(cidrs);
    let mut script = String::new();
    if let Some(v4) = cidrs.v4 {
        // The table of the single-stack agents (family ip): declared, so that deleting it
        // works whether it exists or not.
        let old = nft_table(v4);
        script.push_str(&format!("table ip {old} {{}}\ndelete table ip {old}\n"));
    }
    script.push_str(&format!(
        "table inet {table} {{}}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n"
    ));
    if let Some(v4) = cidrs.v4 {
        let keep = kept_destinations(v4.into(), cluster.v4.map(Into::into));
        script.push_str(&format!(
            "\t\tip saddr {v4} ip daddr != {keep} masquerade\n"
        ));
    }
    if let Some(v6) = cidrs.v6 {
        let keep = kept_destinations(v6.into(), cluster.v6.map(Into::into));
        script.push_str(&format!(
            "\t\tip6 saddr {v6} ip6 daddr != {keep} masquerade\n"
        ));
    }
    script.push_str("\t}\n}\n");
    script
}

/// What pods of `pod` reach without masquerading: their own CIDR, and the cluster CIDR
/// (which holds it, unless the node kept a CIDR from an earlier plan: then both, as an
/// nft set, whose intervals may not overlap).
fn kept_destinations(pod: ipnet::IpNet, cluster: Option<ipnet::IpNet>) -> String {
    match cluster {
        None => pod.to_string(),
        Some(c) if c.contains(&pod) => c.to_string(),
        Some(c) if pod.contains(&c) => pod.to_string(),
        Some(c) => format!("{{ {pod}, {c} }}"),
    }
}

fn masquerade(script: &str) -> Result<(), HostError> {
    use std::io::Write as _;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HostError::Nft(format!("cannot run nft: {e}")))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .map_err(|e| HostError::Nft(e.to_string()))?;
    let out = child
        .wait_with_output()
        .map_err(|e| HostError::Nft(e.to_string()))?;
    if !out.status.success() {
        return Err(HostError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub mod fake {
    use std::collections::BTreeMap;
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use super::*;

    /// Host interfaces by name; routes recorded. Its state sits behind a lock (the trait
    /// takes `&self`); tests read and change it through [`Self::state`].
    #[derive(Default)]
    pub struct FakeHost(Mutex<FakeHostState>);

    impl FakeHost {
        /// What the fake holds, and its failure switch.
        pub fn state(&self) -> MutexGuard<'_, FakeHostState> {
            self.0.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }

    /// What a [`FakeHost`] holds.
    #[derive(Default)]
    pub struct FakeHostState {
        pub links: BTreeMap<String, HostLink>,
        pub routes: Vec<(u32, Ipv4Addr)>,
        pub routes6: Vec<(u32, Ipv6Addr)>,
        /// What `addresses` answers.
        pub addresses: Vec<IpAddr>,
        /// What `subnets` answers.
        pub subnets: Vec<ipnet::IpNet>,
        pub node: Option<NodeNetwork>,
        /// Installed rate limiters, by `describe_side`.
        pub limits: BTreeMap<String, Limit>,
        pub fail_limits: bool,
        /// The VXLAN device `ensure_vxlan` made.
        pub vxlan: Option<VxlanSpec>,
        /// What `mtu_of_address` answers for every address.
        pub underlay_mtu: Option<u32>,
        /// The cluster routes as `set_cluster_routes` last left them.
        pub cluster_routes: Vec<ClusterRoute>,
        /// Make `set_cluster_routes` fail (leaving the routes as they were).
        pub fail_cluster_routes: bool,
        /// Which interface (of `links`) holds each address, for `link_name_of_address`
        /// and `link_addresses`.
        pub link_addresses: BTreeMap<IpAddr, String>,
    }

    impl HostNetwork for FakeHost {
        fn setup_node(&self, node: &NodeNetwork) -> Result<(), HostError> {
            self.state().node = Some(node.clone());
            Ok(())
        }
        fn link(&self, name: &str) -> Result<Option<HostLink>, HostError> {
            Ok(self.state().links.get(name).copied())
        }
        fn delete_link(&self, name: &str) -> Result<bool, HostError> {
            Ok(self.state().links.remove(name).is_some())
        }
        fn route_pod(&self, ifindex: u32, address: Ipv4Addr, _: Ipv4Addr) -> Result<(), HostError> {
            self.state().routes.push((ifindex, address));
            Ok(())
        }
        fn route_pod6(&self, ifindex: u32, address: Ipv6Addr) -> Result<(), HostError> {
            self.state().routes6.push((ifindex, address));
            Ok(())
        }
        fn subnets(&self) -> Result<Vec<ipnet::IpNet>, HostError> {
            Ok(self.state().subnets.clone())
        }
        fn addresses(&self) -> Result<Vec<IpAddr>, HostError> {
            Ok(self.state().addresses.clone())
        }
        fn set_rate_limit(
            &self,
            side: LimitSide<'_>,
            limit: Option<Limit>,
            _classifier: Option<FlowClassifier<'_>>,
        ) -> Result<(), HostError> {
            let mut st = self.state();
            if st.fail_limits {
                return Err(HostError::Nft("fake: cannot install a qdisc".into()));
            }
            match limit {
                Some(l) => st.limits.insert(describe_side(side), l),
                None => st.limits.remove(&describe_side(side)),
            };
            Ok(())
        }
        fn rate_limit_drops(&self, side: LimitSide<'_>) -> Result<Option<u64>, HostError> {
            Ok(self.state().limits.get(&describe_side(side)).map(|_| 7))
        }
        fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<HostLink, HostError> {
            let mut st = self.state();
            st.vxlan = Some(spec.clone());
            let index = 1000 + st.links.len() as u32;
            let link = *st.links.entry(spec.name.clone()).or_insert(HostLink {
                index,
                mac: MacAddr([2, 0, 0, 0, 0x0a, 0x0a]),
            });
            Ok(link)
        }
        fn mtu_of_address(&self, _address: IpAddr) -> Result<Option<u32>, HostError> {
            Ok(self.state().underlay_mtu)
        }
        fn link_name_of_address(&self, address: IpAddr) -> Result<Option<String>, HostError> {
            Ok(self.state().link_addresses.get(&address).cloned())
        }
        fn link_addresses(&self, name: &str) -> Result<Option<(u32, Vec<IpAddr>)>, HostError> {
            let st = self.state();
            Ok(st.links.get(name).map(|l| {
                let held = st.link_addresses.iter().filter(|(_, n)| *n == name);
                (l.index, held.map(|(a, _)| *a).collect())
            }))
        }
        fn set_cluster_routes(&self, routes: &[ClusterRoute]) -> Result<(), HostError> {
            let mut st = self.state();
            if st.fail_cluster_routes {
                return Err(HostError::Io {
                    op: "replace routes in",
                    path: "the fake host".into(),
                    source: std::io::Error::other("injected failure"),
                });
            }
            st.cluster_routes = routes.to_vec();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(s: &str) -> PodCidrs {
        s.parse().unwrap()
    }

    #[test]
    fn ruleset_masquerades_only_traffic_leaving_the_pod_cidr() {
        let rules = masquerade_ruleset(
            cidrs("10.244.0.0/24,fd00:10:244::/64"),
            ClusterNets::default(),
        );
        assert_eq!(
            rules,
            "table ip hypha_10_244_0_0_24 {}\n\
             delete table ip hypha_10_244_0_0_24\n\
             table inet hypha_10_244_0_0_24 {}\n\
             delete table inet hypha_10_244_0_0_24\n\
             table inet hypha_10_244_0_0_24 {\n\
             \tchain postrouting {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr 10.244.0.0/24 ip daddr != 10.244.0.0/24 masquerade\n\
             \t\tip6 saddr fd00:10:244::/64 ip6 daddr != fd00:10:244::/64 masquerade\n\
             \t}\n\
             }\n"
        );
    }

    #[test]
    fn single_family_rulesets() {
        let v4 = masquerade_ruleset(cidrs("10.1.0.0/24"), ClusterNets::default());
        assert!(v4.contains("delete table ip hypha_10_1_0_0_24\n"), "{v4}");
        assert!(v4.contains("ip saddr 10.1.0.0/24 ip daddr != 10.1.0.0/24 masquerade"));
        assert!(!v4.contains("ip6"), "{v4}");
        let v6 = masquerade_ruleset(cidrs("fd00:1::/120"), ClusterNets::default());
        assert_eq!(
            nft_table_of(cidrs("fd00:1::/120")),
            "hypha_fd00_1_0_0_0_0_0_0_120"
        );
        assert!(
            v6.contains("table inet hypha_fd00_1_0_0_0_0_0_0_120 {\n"),
            "{v6}"
        );
        assert!(v6.contains("ip6 saddr fd00:1::/120 ip6 daddr != fd00:1::/120 masquerade"));
        assert!(!v6.contains("table ip "), "no IPv4 table to remove: {v6}");
        assert!(!v6.contains("ip saddr"), "{v6}");
    }

    #[test]
    fn cluster_rulesets_leave_the_cluster_cidr_alone() {
        let cluster = ClusterNets {
            v4: Some("10.244.0.0/16".parse().unwrap()),
            v6: Some("fd00:10:244::/48".parse().unwrap()),
        };
        let rules = masquerade_ruleset(cidrs("10.244.3.0/24,fd00:10:244:3::/64"), cluster);
        assert!(
            rules.contains("\t\tip saddr 10.244.3.0/24 ip daddr != 10.244.0.0/16 masquerade\n"),
            "{rules}"
        );
        assert!(
            rules.contains(
                "\t\tip6 saddr fd00:10:244:3::/64 ip6 daddr != fd00:10:244::/48 masquerade\n"
            ),
            "{rules}"
        );
        // A pod CIDR kept from an earlier plan, outside the cluster CIDR: both kept.
        let rules = masquerade_ruleset(cidrs("10.9.0.0/24"), cluster);
        assert!(
            rules.contains(
                "ip saddr 10.9.0.0/24 ip daddr != { 10.9.0.0/24, 10.244.0.0/16 } masquerade"
            ),
            "{rules}"
        );
    }

    #[test]
    fn ipv6_forwarding_is_switched_on_and_a_kernel_without_ipv6_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        let cidr: Ipv6Net = "fd00:1::/64".parse().unwrap();
        let err = enable_ipv6_forwarding(&conf, cidr).unwrap_err().to_string();
        assert!(
            err.contains("fd00:1::/64") && err.contains("ipv6.disable"),
            "{err}"
        );
        for d in ["all", "default"] {
            std::fs::create_dir_all(conf.join(d)).unwrap();
            std::fs::write(conf.join(d).join("disable_ipv6"), "1").unwrap();
        }
        enable_ipv6_forwarding(&conf, cidr).unwrap();
        let read = |p: &str| std::fs::read_to_string(conf.join(p)).unwrap();
        assert_eq!(read("all/forwarding"), "1");
        assert_eq!(read("all/disable_ipv6"), "0");
        assert_eq!(read("default/disable_ipv6"), "0");
    }
}
