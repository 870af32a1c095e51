//! The agent's configuration: defaults, an optional YAML file, then command-line flags.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

pub mod cluster;
pub mod routing;

use cluster::{ClusterCidrs, ClusterStore, NodeCidrSizes, NodeIps, Span};
use routing::{Routing, RoutingMode};

/// Errors in the agent's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file cannot be read.
    #[error("cannot read the agent configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid YAML for the agent's settings.
    #[error("invalid agent configuration {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A value is well-formed but unusable.
    #[error("invalid agent configuration: {0}")]
    Invalid(String),
}

/// Every setting of the agent. Each path can be set so that several agents (tests,
/// benchmarks) run side by side on one machine without sharing anything.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    /// The API's unix socket.
    pub socket: PathBuf,
    /// Where the agent keeps its state (endpoints, address reservations).
    pub state_dir: PathBuf,
    /// Where maps and program links are pinned; must be on a bpf filesystem.
    pub pin_dir: PathBuf,
    /// This node's pod CIDRs, at most one per family: pods get one address from each.
    pub pod_cidrs: PodCidrs,
    /// The pods' IPv4 gateway; defaults to the first address of the IPv4 pod CIDR. (The
    /// IPv6 gateway is always [`hypha_common::GATEWAY6`].)
    pub gateway: Option<Ipv4Addr>,
    /// The host device that carries the gateway address (a /32). Loopback by default; a
    /// name that does not exist is created as a dummy device.
    pub host_device: String,
    /// Masquerade traffic from pods to destinations outside the pod CIDR.
    pub masquerade: bool,
    /// Directory of policy files the agent applies and watches (`*.yaml`, `*.yml`,
    /// `*.json`); a directory that does not exist holds no policies.
    pub policy_dir: PathBuf,
    /// Where to serve Prometheus metrics (`GET /metrics`); off when unset.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How the programs are attached to each endpoint's veth.
    pub attach: AttachMode,
    /// Cluster mode (`--cluster-store`); `None`: a single node, the embedded default.
    /// Resolved from the file's and the flags' cluster keys, not read as one.
    #[serde(skip)]
    pub cluster: Option<ClusterConfig>,
    /// Services' ClusterIPs come from these (`--service-cidr`, repeatable, at most one
    /// per family; file key `service-cidrs`). Resolved from a list, not read as one.
    #[serde(skip)]
    pub service_cidrs: crate::service::ServiceCidrs,
    /// Node interfaces that take NodePort traffic from outside the node
    /// (`--nodeport-device`, repeatable; file key `nodeport-devices`); empty: in cluster
    /// mode the interface holding the node's address, on a single node none (NodePorts
    /// are then reached from the node's own pods and host only).
    #[serde(skip)]
    pub nodeport_devices: Vec<String>,
    /// Leaf classes (per-flow queues) of each bandwidth limiter (`--fq-queues`, file key
    /// `fq-queues`; 1 to [`hypha_common::fq::MAX_QUEUES`]).
    pub fq_queues: u16,
}

/// Cluster mode's settings: the store, who this node is, and the cluster CIDRs its pod
/// CIDRs are allocated from (then `pod_cidrs` holds what the store gave this node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd's client URLs (`--cluster-store etcd=http://IP:2379[,http://IP2:2379]`).
    pub store: Vec<String>,
    pub node_name: String,
    /// Underlay addresses (`--node-ip IP[,IPv6]`), at most one per family.
    pub node_ips: Vec<std::net::IpAddr>,
    /// TLS to etcd: the CA that signs its certificate, and this agent's client
    /// certificate and key.
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    /// The cluster CIDRs and each node's share of them, per family.
    pub cidrs: hypha_cluster::node::CidrPlan,
    /// Prefix of every key (default `/hypha/v1/`).
    pub prefix: String,
    /// How long a cluster identity no endpoint uses stays before it is deleted.
    pub identity_gc_grace: std::time::Duration,
    /// The lease of this node's record: it lives this long after the agent's last
    /// heartbeat (sent every third of it).
    pub node_ttl: std::time::Duration,
    /// How pods reach other nodes' pods (`--routing`, the tunnel's keys).
    pub routing: Routing,
}

/// How the eBPF programs are attached to an endpoint's host veth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// Legacy tc: a `clsact` qdisc with two direct-action `cls_bpf` filters. ~0.3 ms per
    /// endpoint, but `clsact` takes the veth's one ingress-qdisc slot (handle `ffff:`),
    /// so a chained plugin that adds an `ingress` qdisc (the reference `bandwidth`) fails.
    #[default]
    Tc,
    /// TCX links (kernel 6.6+): leaves the qdiscs alone, but each attach waits out an RCU
    /// grace period and attaches do not overlap (~23 ms per endpoint here).
    Tcx,
}

impl AttachMode {
    /// `tc` or `tcx`, as the flag and the configuration file spell it.
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Tc => "tc",
            AttachMode::Tcx => "tcx",
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AttachMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tc" => Ok(AttachMode::Tc),
            "tcx" => Ok(AttachMode::Tcx),
            _ => Err(format!("attach mode {s:?} is neither tc nor tcx")),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(hypha_api::DEFAULT_SOCKET),
            state_dir: PathBuf::from("/var/lib/hypha"),
            pin_dir: PathBuf::from("/sys/fs/bpf/hypha"),
            pod_cidrs: PodCidrs {
                v4: Some("10.244.0.0/24".parse().expect("valid default")),
                v6: Some("fd00:10:244::/64".parse().expect("valid default")),
            },
            gateway: None,
            host_device: "lo".to_owned(),
            masquerade: true,
            policy_dir: PathBuf::from("/etc/hypha/policies"),
            metrics_addr: None,
            attach: AttachMode::Tc,
            cluster: None,
            service_cidrs: crate::service::ServiceCidrs {
                v4: Some("10.96.0.0/16".parse().expect("valid default")),
                v6: Some("fd00:10:96::/112".parse().expect("valid default")),
            },
            nodeport_devices: Vec::new(),
            fq_queues: hypha_common::fq::DEFAULT_QUEUES,
        }
    }
}

/// The settings as a file may give them: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    /// The pod CIDRs as a list (`pod-cidrs: [10.1.0.0/24, fd00:1::/64]`); the command
    /// line's comma-separated `--pod-cidr` lands here too.
    pub pod_cidrs: Option<PodCidrs>,
    /// The key of single-stack versions (`pod-cidr: 10.1.0.0/24`), still read: a
    /// one-element list. Setting both keys is an error.
    pub pod_cidr: Option<IpNet>,
    pub gateway: Option<Ipv4Addr>,
    pub host_device: Option<String>,
    pub masquerade: Option<bool>,
    pub policy_dir: Option<PathBuf>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub attach: Option<AttachMode>,
    /// Cluster mode: `etcd=URL[,URL]`. The keys below need it.
    pub cluster_store: Option<ClusterStore>,
    pub node_name: Option<String>,
    pub node_ip: Option<NodeIps>,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    pub cluster_cidr: Option<ClusterCidrs>,
    pub node_cidr_size: Option<NodeCidrSizes>,
    pub cluster_prefix: Option<String>,
    pub identity_gc_grace: Option<Span>,
    pub node_ttl: Option<Span>,
    /// Cluster mode: `tunnel` (the default) or `native`, and the tunnel's settings.
    pub routing: Option<RoutingMode>,
    pub tunnel_device: Option<String>,
    pub tunnel_port: Option<u16>,
    pub tunnel_mtu: Option<u32>,
    /// The service CIDRs as a list (`service-cidrs: [10.96.0.0/16, fd00:10:96::/112]`),
    /// at most one per family; `--service-cidr` (repeatable) lands here too.
    pub service_cidrs: Option<Vec<IpNet>>,
    /// NodePort devices (`nodeport-devices: [eth0]`; `--nodeport-device`, repeatable).
    pub nodeport_devices: Option<Vec<String>>,
    /// Leaf classes of each bandwidth limiter (`fq-queues: 64`).
    pub fq_queues: Option<u16>,
}

impl ConfigFile {
    /// Reads a YAML file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Parses YAML text; an empty file is an empty configuration.
    pub fn parse(text: &str) -> Result<Self, serde_yaml_ng::Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml_ng::from_str(text)
    }

    /// Lays `over` on top of `self`: what `over` sets wins.
    pub fn merge(self, over: ConfigFile) -> ConfigFile {
        let cidrs_over = over.sets_pod_cidrs();
        ConfigFile {
            socket: over.socket.or(self.socket),
            state_dir: over.state_dir.or(self.state_dir),
            pin_dir: over.pin_dir.or(self.pin_dir),
            // The pod CIDRs are one setting under two keys: whoever sets either sets both.
            pod_cidrs: if cidrs_over {
                over.pod_cidrs
            } else {
                self.pod_cidrs
            },
            pod_cidr: if cidrs_over {
                over.pod_cidr
            } else {
                self.pod_cidr
            },
            gateway: over.gateway.or(self.gateway),
            host_device: over.host_device.or(self.host_device),
            masquerade: over.masquerade.or(self.masquerade),
            policy_dir: over.policy_dir.or(self.policy_dir),
            metrics_addr: over.metrics_addr.or(self.metrics_addr),
            attach: over.attach.or(self.attach),
            cluster_store: over.cluster_store.or(self.cluster_store),
            node_name: over.node_name.or(self.node_name),
            node_ip: over.node_ip.or(self.node_ip),
            etcd_ca: over.etcd_ca.or(self.etcd_ca),
            etcd_cert: over.etcd_cert.or(self.etcd_cert),
            etcd_key: over.etcd_key.or(self.etcd_key),
            cluster_cidr: over.cluster_cidr.or(self.cluster_cidr),
            node_cidr_size: over.node_cidr_size.or(self.node_cidr_size),
            cluster_prefix: over.cluster_prefix.or(self.cluster_prefix),
            identity_gc_grace: over.identity_gc_grace.or(self.identity_gc_grace),
            node_ttl: over.node_ttl.or(self.node_ttl),
            routing: over.routing.or(self.routing),
            tunnel_device: over.tunnel_device.or(self.tunnel_device),
            tunnel_port: over.tunnel_port.or(self.tunnel_port),
            tunnel_mtu: over.tunnel_mtu.or(self.tunnel_mtu),
            service_cidrs: over.service_cidrs.or(self.service_cidrs),
            nodeport_devices: over.nodeport_devices.or(self.nodeport_devices),
            fq_queues: over.fq_queues.or(self.fq_queues),
        }
    }

    fn sets_pod_cidrs(&self) -> bool {
        self.pod_cidrs.is_some() || self.pod_cidr.is_some()
    }

    /// Fills what is unset with the defaults and checks the result.
    pub fn resolve(mut self) -> Result<AgentConfig, ConfigError> {
        let d = AgentConfig::default();
        let cluster = self.take_cluster()?;
        let pod_cidrs = match (self.pod_cidrs, self.pod_cidr) {
            (Some(list), None) => list,
            (None, Some(one)) => PodCidrs::new([one]).map_err(ConfigError::Invalid)?,
            (None, None) => cluster
                .as_ref()
                .map_or(d.pod_cidrs, ClusterConfig::placeholder_pod_cidrs),
            (Some(list), Some(one)) => {
                return Err(ConfigError::Invalid(format!(
                    "both pod-cidrs ({list}) and pod-cidr ({one}) are set; use pod-cidrs only"
                )));
            }
        };
        let config = AgentConfig {
            socket: self.socket.unwrap_or(d.socket),
            state_dir: self.state_dir.unwrap_or(d.state_dir),
            pin_dir: self.pin_dir.unwrap_or(d.pin_dir),
            pod_cidrs,
            gateway: self.gateway,
            host_device: self.host_device.unwrap_or(d.host_device),
            masquerade: self.masquerade.unwrap_or(d.masquerade),
            policy_dir: self.policy_dir.unwrap_or(d.policy_dir),
            metrics_addr: self.metrics_addr,
            attach: self.attach.unwrap_or(d.attach),
            cluster,
            service_cidrs: match &self.service_cidrs {
                Some(list) => service_cidrs(list).map_err(ConfigError::Invalid)?,
                None => d.service_cidrs,
            },
            nodeport_devices: self.nodeport_devices.unwrap_or(d.nodeport_devices),
            fq_queues: self.fq_queues.unwrap_or(d.fq_queues),
        };
        config.validate()?;
        Ok(config)
    }

    /// Resolves (and takes out) the cluster keys: `None` without `cluster-store`, where
    /// any other cluster key is an error; with it, the pod CIDR and gateway keys are
    /// refused (the store allocates the node's pod CIDR).
    fn take_cluster(&mut self) -> Result<Option<ClusterConfig>, ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let Some(store) = self.cluster_store.take() else {
            let set: Vec<&str> = [
                ("node-name", self.node_name.is_some()),
                ("node-ip", self.node_ip.is_some()),
                ("etcd-ca", self.etcd_ca.is_some()),
                ("etcd-cert", self.etcd_cert.is_some()),
                ("etcd-key", self.etcd_key.is_some()),
                ("cluster-cidr", self.cluster_cidr.is_some()),
                ("node-cidr-size", self.node_cidr_size.is_some()),
                ("cluster-prefix", self.cluster_prefix.is_some()),
                ("identity-gc-grace", self.identity_gc_grace.is_some()),
                ("node-ttl", self.node_ttl.is_some()),
                ("routing", self.routing.is_some()),
                ("tunnel-device", self.tunnel_device.is_some()),
                ("tunnel-port", self.tunnel_port.is_some()),
                ("tunnel-mtu", self.tunnel_mtu.is_some()),
            ]
            .into_iter()
            .filter_map(|(k, set)| set.then_some(k))
            .collect();
            if !set.is_empty() {
                return invalid(format!(
                    "{} {} only in cluster mode: give cluster-store (--cluster-store etcd=URL) too, or leave {} out",
                    set.join(", "),
                    if set.len() == 1 { "applies" } else { "apply" },
                    if set.len() == 1 { "it" } else { "them" },
                ));
            }
            return Ok(None);
        };
        if self.sets_pod_cidrs() {
            return invalid(
                "pod-cidr is refused in cluster mode: the cluster store allocates each node's pod CIDR from cluster-cidr (set node-cidr-size for their size)".into(),
            );
        }
        if let Some(gw) = self.gateway {
            return invalid(format!(
                "gateway {gw} is refused in cluster mode: the gateway is the first address of the pod CIDR the cluster store allocates"
            ));
        }
        let Some(node_name) = self.node_name.take() else {
            return invalid("cluster mode needs node-name (--node-name NAME): the name of this node in the cluster".into());
        };
        cluster::check_node_name(&node_name).map_err(ConfigError::Invalid)?;
        let Some(NodeIps(node_ips)) = self.node_ip.take() else {
            return invalid("cluster mode needs node-ip (--node-ip IP[,IPv6]): this node's address(es) on the network joining the nodes".into());
        };
        match (&self.etcd_cert, &self.etcd_key) {
            (Some(_), None) => {
                return invalid(
                    "etcd-cert is set without etcd-key: a client certificate needs its key".into(),
                );
            }
            (None, Some(_)) => {
                return invalid(
                    "etcd-key is set without etcd-cert: a client key needs its certificate".into(),
                );
            }
            _ => {}
        }
        for (name, path) in [
            ("etcd-ca", &self.etcd_ca),
            ("etcd-cert", &self.etcd_cert),
            ("etcd-key", &self.etcd_key),
        ] {
            if let Some(p) = path
                && !p.is_absolute()
            {
                return invalid(format!("{name} {} must be an absolute path", p.display()));
            }
        }
        let cidrs = match self.cluster_cidr.take() {
            Some(c) => c,
            None => cluster::DEFAULT_CLUSTER_CIDR
                .parse()
                .expect("the default cluster CIDR parses"),
        };
        let plan = cluster::cidr_plan(cidrs, self.node_cidr_size.as_ref())
            .map_err(ConfigError::Invalid)?;
        let prefix = cluster::check_prefix(
            self.cluster_prefix
                .as_deref()
                .unwrap_or(hypha_cluster::layout::DEFAULT_PREFIX),
        )
        .map_err(ConfigError::Invalid)?;
        let routing = Routing::resolve(
            self.routing.take(),
            self.tunnel_device.take(),
            self.tunnel_port.take(),
            self.tunnel_mtu.take(),
            plan.v6.is_some(),
        )
        .map_err(ConfigError::Invalid)?;
        Ok(Some(ClusterConfig {
            store: store.urls,
            node_name,
            node_ips,
            etcd_ca: self.etcd_ca.take(),
            etcd_cert: self.etcd_cert.take(),
            etcd_key: self.etcd_key.take(),
            cidrs: plan,
            prefix,
            identity_gc_grace: self
                .identity_gc_grace
                .map_or(cluster::DEFAULT_IDENTITY_GC_GRACE, |s| s.0),
            node_ttl: self.node_ttl.map_or(cluster::DEFAULT_NODE_TTL, |s| s.0),
            routing,
        }))
    }
}

impl ClusterConfig {
    /// The pod CIDRs of this node before the store gave them: the first share of each
    /// cluster CIDR, only to fill [`AgentConfig::pod_cidrs`] until registration replaces
    /// it (the daemon never starts the agent with it).
    pub fn placeholder_pod_cidrs(&self) -> PodCidrs {
        PodCidrs {
            v4: self
                .cidrs
                .v4
                .map(|(net, len)| Ipv4Net::new(net.network(), len).expect("checked size")),
            v6: self
                .cidrs
                .v6
                .map(|(net, len)| Ipv6Net::new(net.network(), len).expect("checked size")),
        }
    }
}

impl AgentConfig {
    /// The IPv4 gateway pods route through, on a node with an IPv4 pod CIDR.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        let cidr = self.pod_cidrs.v4?;
        Some(
            self.gateway
                .unwrap_or_else(|| first_host(cidr).unwrap_or(cidr.network())),
        )
    }

    /// The IPv6 gateway, on a node with an IPv6 pod CIDR: the link-local
    /// [`hypha_common::GATEWAY6`] the datapath answers neighbour solicitations for.
    pub fn gateway6(&self) -> Option<std::net::Ipv6Addr> {
        self.pod_cidrs
            .v6
            .map(|_| std::net::Ipv6Addr::from(hypha_common::GATEWAY6))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.pod_cidrs.check().map_err(ConfigError::Invalid)?;
        match (self.pod_cidrs.v4, self.gateway()) {
            (Some(cidr), Some(gw)) => {
                if !cidr.contains(&gw) || gw == cidr.network() || gw == cidr.broadcast() {
                    return Err(ConfigError::Invalid(format!(
                        "gateway {gw} must be a host address inside pod-cidr {cidr}"
                    )));
                }
            }
            _ => {
                if let Some(gw) = self.gateway {
                    return Err(ConfigError::Invalid(format!(
                        "gateway {gw} is set but pod-cidr {} has no IPv4 CIDR (the IPv6 gateway is always {})",
                        self.pod_cidrs,
                        std::net::Ipv6Addr::from(hypha_common::GATEWAY6)
                    )));
                }
            }
        }
        check_ifname("host-device", &self.host_device)?;
        for (i, dev) in self.nodeport_devices.iter().enumerate() {
            check_ifname("nodeport-device", dev)?;
            if self.nodeport_devices[..i].contains(dev) {
                return Err(ConfigError::Invalid(format!(
                    "nodeport-device {dev:?} is given twice"
                )));
            }
        }
        self.check_service_cidrs()?;
        let max = hypha_common::fq::MAX_QUEUES;
        if !(1..=max).contains(&self.fq_queues) {
            return Err(ConfigError::Invalid(format!(
                "fq-queues {} is out of range: a bandwidth limiter has 1 to {max} per-flow queues",
                self.fq_queues
            )));
        }
        for (name, path) in [
            ("socket", &self.socket),
            ("state-dir", &self.state_dir),
            ("pin-dir", &self.pin_dir),
            ("policy-dir", &self.policy_dir),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "{name} {} must be an absolute path",
                    path.display()
                )));
            }
        }
        Ok(())
    }
}

impl AgentConfig {
    /// The service CIDRs overlap neither the pod CIDRs nor, in cluster mode, the cluster
    /// CIDRs: a ClusterIP must never be a pod's address.
    fn check_service_cidrs(&self) -> Result<(), ConfigError> {
        let mut taken: Vec<(&str, IpNet)> = Vec::new();
        taken.extend(self.pod_cidrs.v4.map(|n| ("pod-cidr", IpNet::V4(n))));
        taken.extend(self.pod_cidrs.v6.map(|n| ("pod-cidr", IpNet::V6(n))));
        if let Some(c) = &self.cluster {
            taken.extend(c.cidrs.v4.map(|(n, _)| ("cluster-cidr", IpNet::V4(n))));
            taken.extend(c.cidrs.v6.map(|(n, _)| ("cluster-cidr", IpNet::V6(n))));
        }
        let services = [
            self.service_cidrs.v4.map(IpNet::V4),
            self.service_cidrs.v6.map(IpNet::V6),
        ];
        for svc in services.into_iter().flatten() {
            for (key, net) in &taken {
                if svc.contains(&net.network()) || net.contains(&svc.network()) {
                    return Err(ConfigError::Invalid(format!(
                        "service-cidr {svc} overlaps {key} {net}: ClusterIPs must not be pod addresses"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// An interface name as the kernel takes it: 1 to 15 characters, no '/', ':' or spaces.
fn check_ifname(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(ConfigError::Invalid(format!(
            "{key} {name:?} is not a valid interface name (1 to 15 characters, no '/', ':' or spaces)"
        )));
    }
    Ok(())
}

/// The shortest IPv4 service CIDR: a /12, about a million ClusterIPs (Kubernetes' own
/// bound).
pub const MIN_SERVICE_PREFIX4: u8 = 12;

/// The service CIDRs of a list (`--service-cidr`, `service-cidrs`): at least one, at most
/// one per family, no host bits; an IPv4 one a /12 to a /30, an IPv6 one a /64 to a
/// /120. Each refusal names the value.
pub fn service_cidrs(nets: &[IpNet]) -> Result<crate::service::ServiceCidrs, String> {
    let mut cidrs = crate::service::ServiceCidrs::default();
    if nets.is_empty() {
        return Err("service-cidr is empty: give an IPv4 CIDR, an IPv6 CIDR or both".into());
    }
    for net in nets {
        if net.trunc() != *net {
            return Err(format!(
                "service-cidr {net} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        let (min, max, family) = match net {
            IpNet::V4(_) => (MIN_SERVICE_PREFIX4, MAX_PREFIX4, "IPv4"),
            IpNet::V6(_) => (MIN_PREFIX6, MAX_PREFIX6, "IPv6"),
        };
        if !(min..=max).contains(&net.prefix_len()) {
            return Err(format!(
                "service-cidr {net} is too {}: an {family} service CIDR is a /{min} to a /{max}",
                if net.prefix_len() < min {
                    "large"
                } else {
                    "small"
                }
            ));
        }
        let first = match net {
            IpNet::V4(n) => cidrs.v4.replace(*n).map(IpNet::V4),
            IpNet::V6(n) => cidrs.v6.replace(*n).map(IpNet::V6),
        };
        if let Some(first) = first {
            return Err(format!(
                "service-cidr lists two {family} CIDRs ({first} and {net}); give at most one per family"
            ));
        }
    }
    Ok(cidrs)
}

fn first_host(net: Ipv4Net) -> Option<Ipv4Addr> {
    net.hosts().next()
}

/// A node's pod CIDRs: at most one per family, at least one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Vec<IpNet>")]
pub struct PodCidrs {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

/// The longest IPv4 pod CIDR: room for a network, a gateway, a pod and a broadcast address.
pub const MAX_PREFIX4: u8 = 30;
/// The shortest IPv6 pod CIDR: a /64, the size of one IPv6 subnet (RFC 4291).
pub const MIN_PREFIX6: u8 = 64;
/// The longest IPv6 pod CIDR.
pub const MAX_PREFIX6: u8 = 120;

impl PodCidrs {
    /// The CIDRs of a list, checked (see [`PodCidrs::check`]).
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Result<Self, String> {
        let nets: Vec<IpNet> = nets.into_iter().collect();
        let list = || {
            nets.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut cidrs = PodCidrs { v4: None, v6: None };
        for net in &nets {
            match net {
                IpNet::V4(n) => {
                    if let Some(first) = cidrs.v4.replace(*n) {
                        return Err(format!(
                            "pod-cidr {} lists two IPv4 CIDRs ({first} and {n}); a node has at most one per family",
                            list()
                        ));
                    }
                }
                IpNet::V6(n) => {
                    if let Some(first) = cidrs.v6.replace(*n) {
                        return Err(format!(
                            "pod-cidr {} lists two IPv6 CIDRs ({first} and {n}); a node has at most one per family",
                            list()
                        ));
                    }
                }
            }
        }
        cidrs.check()?;
        Ok(cidrs)
    }

    /// At least one CIDR; no host bits; an IPv4 one at most a /30, an IPv6 one a /64 to
    /// a /120.
    pub fn check(&self) -> Result<(), String> {
        if self.v4.is_none() && self.v6.is_none() {
            return Err("pod-cidr is empty: give an IPv4 CIDR, an IPv6 CIDR or both".into());
        }
        if let Some(cidr) = self.v4 {
            if cidr.trunc() != cidr {
                return Err(format!(
                    "pod-cidr {cidr} has host bits set; did you mean {}?",
                    cidr.trunc()
                ));
            }
            if cidr.prefix_len() > MAX_PREFIX4 {
                return Err(format!(
                    "pod-cidr {cidr} is too small: it needs room for a gateway and pods (at most /{MAX_PREFIX4})"
                ));
            }
        }
        if let Some(cidr) = self.v6 {
            if cidr.trunc() != cidr {
                return Err(format!(
                    "pod-cidr {cidr} has host bits set; did you mean {}?",
                    cidr.trunc()
                ));
            }
            if cidr.prefix_len() < MIN_PREFIX6 {
                return Err(format!(
                    "pod-cidr {cidr} is too large: an IPv6 pod CIDR is a /{MIN_PREFIX6} to a /{MAX_PREFIX6}"
                ));
            }
            if cidr.prefix_len() > MAX_PREFIX6 {
                return Err(format!(
                    "pod-cidr {cidr} is too small: an IPv6 pod CIDR is a /{MIN_PREFIX6} to a /{MAX_PREFIX6}"
                ));
            }
        }
        Ok(())
    }
}

impl TryFrom<Vec<IpNet>> for PodCidrs {
    type Error = String;

    fn try_from(nets: Vec<IpNet>) -> Result<Self, String> {
        PodCidrs::new(nets)
    }
}

impl std::str::FromStr for PodCidrs {
    type Err = String;

    /// A comma-separated list: `10.1.0.0/24,fd00:1::/64`.
    fn from_str(s: &str) -> Result<Self, String> {
        let nets = s
            .split(',')
            .map(|part| {
                let part = part.trim();
                part.parse::<IpNet>()
                    .map_err(|_| format!("pod-cidr {s:?}: {part:?} is not an IPv4 or IPv6 CIDR"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        PodCidrs::new(nets)
    }
}

impl std::fmt::Display for PodCidrs {
    /// The comma-separated list, IPv4 first.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.v4, self.v6) {
            (Some(a), Some(b)) => write!(f, "{a},{b}"),
            (Some(a), None) => write!(f, "{a}"),
            (None, Some(b)) => write!(f, "{b}"),
            (None, None) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve() {
        let c = ConfigFile::default().resolve().unwrap();
        assert_eq!(c, AgentConfig::default());
        assert_eq!(c.gateway(), Some(Ipv4Addr::new(10, 244, 0, 1)));
        assert_eq!(c.pod_cidrs.to_string(), "10.244.0.0/24,fd00:10:244::/64");
        assert_eq!(c.gateway6(), Some("fe80::1".parse().unwrap()));
    }

    #[test]
    fn file_then_flags_override() {
        let file =
            ConfigFile::parse("pod-cidr: 10.9.0.0/16\nsocket: /tmp/a.sock\nmasquerade: false\n")
                .unwrap();
        let flags = ConfigFile {
            socket: Some("/tmp/b.sock".into()),
            ..Default::default()
        };
        let c = file.merge(flags).resolve().unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/b.sock"));
        assert_eq!(
            c.pod_cidrs.v4,
            Some("10.9.0.0/16".parse::<Ipv4Net>().unwrap())
        );
        assert_eq!(
            c.pod_cidrs.v6, None,
            "an explicit list gives exactly its families"
        );
        assert!(!c.masquerade);
        assert_eq!(c.gateway(), Some(Ipv4Addr::new(10, 9, 0, 1)));
        assert_eq!(c.gateway6(), None);
    }

    #[test]
    fn attach_mode_defaults_to_tc_and_is_set_by_file_or_flag() {
        assert_eq!(AgentConfig::default().attach, AttachMode::Tc);
        let file = ConfigFile::parse("attach: tcx\n").unwrap();
        assert_eq!(file.resolve().unwrap().attach, AttachMode::Tcx);
        let file = ConfigFile::parse("attach: tcx\n").unwrap();
        let flags = ConfigFile {
            attach: Some("tc".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(file.merge(flags).resolve().unwrap().attach, AttachMode::Tc);
        let err = "xdp".parse::<AttachMode>().unwrap_err();
        assert!(err.contains("xdp") && err.contains("tcx"), "{err}");
        let err = ConfigFile::parse("attach: tcz\n").unwrap_err().to_string();
        assert!(err.contains("tcz"), "{err}");
    }

    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(
            ConfigFile::parse("  \n").unwrap().resolve().unwrap(),
            AgentConfig::default()
        );
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = ConfigFile::parse("pod_cidr: 10.0.0.0/24\n").unwrap_err();
        assert!(err.to_string().contains("pod_cidr"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |f: ConfigFile| f.resolve().unwrap_err().to_string();
        let msg = bad(ConfigFile {
            pod_cidr: Some("10.0.0.5/24".parse().unwrap()),
            ..Default::default()
        });
        assert!(
            msg.contains("10.0.0.5/24") && msg.contains("10.0.0.0/24"),
            "{msg}"
        );
        let msg = bad(ConfigFile {
            pod_cidr: Some("10.0.0.0/31".parse().unwrap()),
            ..Default::default()
        });
        assert!(msg.contains("too small"), "{msg}");
        let msg = bad(ConfigFile {
            gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
            ..Default::default()
        });
        assert!(msg.contains("gateway 192.0.2.1"), "{msg}");
        let msg = bad(ConfigFile {
            host_device: Some("a-name-far-too-long".into()),
            ..Default::default()
        });
        assert!(msg.contains("host-device"), "{msg}");
        let msg = bad(ConfigFile {
            state_dir: Some("relative/dir".into()),
            ..Default::default()
        });
        assert!(msg.contains("state-dir relative/dir"), "{msg}");
        for queues in [0, hypha_common::fq::MAX_QUEUES + 1] {
            let msg = bad(ConfigFile {
                fq_queues: Some(queues),
                ..Default::default()
            });
            assert!(
                msg.contains(&format!("fq-queues {queues} is out of range")),
                "{msg}"
            );
        }
        let ok = ConfigFile::parse("fq-queues: 16\n")
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(ok.fq_queues, 16);
    }

    fn cidrs(s: &str) -> Result<PodCidrs, String> {
        s.parse()
    }

    #[test]
    fn pod_cidr_lists_give_exactly_their_families() {
        let both = cidrs("10.1.0.0/24, fd00:1::/64").unwrap();
        assert_eq!(both.v4, Some("10.1.0.0/24".parse().unwrap()));
        assert_eq!(both.v6, Some("fd00:1::/64".parse().unwrap()));
        assert_eq!(both.to_string(), "10.1.0.0/24,fd00:1::/64");
        let v6 = cidrs("fd00:1::/120").unwrap();
        assert_eq!((v6.v4, v6.v6.map(|n| n.prefix_len())), (None, Some(120)));
        let v4 = cidrs("10.1.0.0/30").unwrap();
        assert_eq!((v4.v4.is_some(), v4.v6), (true, None));
        // IPv6 first is the same node.
        assert_eq!(cidrs("fd00:1::/64,10.1.0.0/24").unwrap(), both);
    }

    #[test]
    fn pod_cidr_lists_are_refused_naming_the_value() {
        let err = cidrs("10.1.0.0/24,10.2.0.0/24").unwrap_err();
        assert!(
            err.contains("two IPv4") && err.contains("10.1.0.0/24") && err.contains("10.2.0.0/24"),
            "{err}"
        );
        let err = cidrs("fd00:1::/64,fd00:2::/64").unwrap_err();
        assert!(
            err.contains("two IPv6") && err.contains("fd00:2::/64"),
            "{err}"
        );
        let err = cidrs("fd00:1::/48").unwrap_err();
        assert!(
            err.contains("fd00:1::/48") && err.contains("too large"),
            "{err}"
        );
        let err = cidrs("fd00:1::/121").unwrap_err();
        assert!(
            err.contains("fd00:1::/121") && err.contains("too small"),
            "{err}"
        );
        let err = cidrs("fd00:1::1/64").unwrap_err();
        assert!(
            err.contains("host bits") && err.contains("fd00:1::/64"),
            "{err}"
        );
        let err = cidrs("10.1.0.0/31").unwrap_err();
        assert!(
            err.contains("10.1.0.0/31") && err.contains("too small"),
            "{err}"
        );
        let err = cidrs("10.1.0.0/24,banana").unwrap_err();
        assert!(err.contains("banana"), "{err}");
        let err = cidrs("").unwrap_err();
        assert!(err.contains("\"\""), "{err}");
    }

    #[test]
    fn file_keys_old_and_new() {
        let c = ConfigFile::parse("pod-cidrs: [10.3.0.0/24, \"fd00:3::/64\"]\n")
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(c.pod_cidrs, cidrs("10.3.0.0/24,fd00:3::/64").unwrap());
        // The single-stack key still reads, as a one-element list.
        let c = ConfigFile::parse("pod-cidr: 10.3.0.0/24\n")
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(c.pod_cidrs, cidrs("10.3.0.0/24").unwrap());
        let c = ConfigFile::parse("pod-cidr: \"fd00:3::/64\"\n")
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(c.pod_cidrs, cidrs("fd00:3::/64").unwrap());
        assert_eq!(c.gateway(), None);
        let err = ConfigFile::parse("pod-cidr: 10.3.0.0/24\npod-cidrs: [10.4.0.0/24]\n")
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pod-cidrs") && err.contains("10.4.0.0/24"),
            "{err}"
        );
        let err = ConfigFile::parse("pod-cidrs: [10.3.0.0/24, 10.4.0.0/24]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("two IPv4"), "{err}");
        // A flag replaces the file's list whichever key the file used.
        let flags = ConfigFile {
            pod_cidrs: Some(cidrs("fd00:5::/64").unwrap()),
            ..Default::default()
        };
        let c = ConfigFile::parse("pod-cidr: 10.3.0.0/24\n")
            .unwrap()
            .merge(flags)
            .resolve()
            .unwrap();
        assert_eq!(c.pod_cidrs, cidrs("fd00:5::/64").unwrap());
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn service_cidrs_default_and_come_from_the_file_or_the_flags() {
        let c = ConfigFile::default().resolve().unwrap();
        assert_eq!(
            (c.service_cidrs.v4, c.service_cidrs.v6),
            (
                Some("10.96.0.0/16".parse().unwrap()),
                Some("fd00:10:96::/112".parse().unwrap())
            )
        );
        let file = ConfigFile::parse(
            "service-cidrs: [10.100.0.0/16, \"fd00:100::/108\"]\nnodeport-devices: [eth0]\n",
        )
        .unwrap();
        let c = file.resolve().unwrap();
        assert_eq!(c.service_cidrs.v4, Some("10.100.0.0/16".parse().unwrap()));
        assert_eq!(c.service_cidrs.v6, Some("fd00:100::/108".parse().unwrap()));
        assert_eq!(c.nodeport_devices, ["eth0"]);
        // A flag's list replaces the file's, and gives exactly its families.
        let file = ConfigFile::parse("service-cidrs: [10.100.0.0/16]\n").unwrap();
        let flags = ConfigFile {
            service_cidrs: Some(nets(&["fd00:200::/112"])),
            nodeport_devices: Some(vec!["eth1".into(), "eth2".into()]),
            ..Default::default()
        };
        let c = file.merge(flags).resolve().unwrap();
        assert_eq!(
            (c.service_cidrs.v4, c.service_cidrs.v6),
            (None, Some("fd00:200::/112".parse().unwrap()))
        );
        assert_eq!(c.nodeport_devices, ["eth1", "eth2"]);
    }

    #[test]
    fn service_cidrs_are_refused_naming_the_value() {
        let err = |list: &[&str]| service_cidrs(&nets(list)).unwrap_err();
        let e = err(&["10.96.0.0/16", "10.97.0.0/16"]);
        assert!(e.contains("two IPv4") && e.contains("10.97.0.0/16"), "{e}");
        let e = err(&["fd00:1::/112", "fd00:2::/112"]);
        assert!(e.contains("two IPv6") && e.contains("fd00:2::/112"), "{e}");
        let e = err(&["10.96.0.1/16"]);
        assert!(
            e.contains("10.96.0.1/16") && e.contains("10.96.0.0/16"),
            "{e}"
        );
        let e = err(&["10.0.0.0/8"]);
        assert!(e.contains("10.0.0.0/8") && e.contains("too large"), "{e}");
        let e = err(&["10.96.0.0/31"]);
        assert!(e.contains("10.96.0.0/31") && e.contains("too small"), "{e}");
        let e = err(&["fd00:1::/48"]);
        assert!(e.contains("fd00:1::/48") && e.contains("too large"), "{e}");
        let e = err(&["fd00:1::/124"]);
        assert!(e.contains("fd00:1::/124") && e.contains("too small"), "{e}");
        assert!(err(&[]).contains("empty"));
        assert!(service_cidrs(&nets(&["10.96.0.0/12", "fd00:1::/64"])).is_ok());
        assert!(service_cidrs(&nets(&["10.96.0.0/30", "fd00:1::/120"])).is_ok());
        let e = ConfigFile::parse("service-cidrs: [banana]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("service-cidrs[0]"), "{e}");
    }

    #[test]
    fn service_cidrs_must_not_overlap_the_pods() {
        let bad = |f: ConfigFile| f.resolve().unwrap_err().to_string();
        let e = bad(ConfigFile {
            service_cidrs: Some(nets(&["10.244.0.0/16"])),
            ..Default::default()
        });
        assert!(
            e.contains("service-cidr 10.244.0.0/16 overlaps pod-cidr 10.244.0.0/24"),
            "{e}"
        );
        let e = bad(ConfigFile {
            service_cidrs: Some(nets(&["fd00:10:244::/120"])),
            ..Default::default()
        });
        assert!(e.contains("overlaps pod-cidr fd00:10:244::/64"), "{e}");
        // Cluster mode: the whole cluster CIDR is the pods'.
        let e = ConfigFile::parse(
            "cluster-store: etcd=http://127.0.0.1:2379\nnode-name: n1\nnode-ip: 192.0.2.1\nservice-cidrs: [10.244.200.0/24]\n",
        )
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("service-cidr 10.244.200.0/24 overlaps cluster-cidr 10.244.0.0/16"),
            "{e}"
        );
    }

    #[test]
    fn nodeport_devices_are_interface_names() {
        let bad = |devs: &[&str]| {
            ConfigFile {
                nodeport_devices: Some(devs.iter().map(|d| (*d).to_owned()).collect()),
                ..Default::default()
            }
            .resolve()
            .unwrap_err()
            .to_string()
        };
        let e = bad(&["eth/0"]);
        assert!(e.contains("nodeport-device \"eth/0\""), "{e}");
        let e = bad(&["a-name-far-too-long"]);
        assert!(e.contains("a-name-far-too-long"), "{e}");
        let e = bad(&[""]);
        assert!(e.contains("nodeport-device \"\""), "{e}");
        let e = bad(&["eth0", "eth0"]);
        assert!(e.contains("eth0") && e.contains("twice"), "{e}");
    }

    #[test]
    fn an_ipv4_gateway_needs_an_ipv4_pod_cidr() {
        let err = ConfigFile {
            pod_cidrs: Some(cidrs("fd00:5::/64").unwrap()),
            gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("gateway 10.0.0.1") && err.contains("no IPv4"),
            "{err}"
        );
    }
}
