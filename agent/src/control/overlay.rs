//! Cross-node routing, the agent's side: at start, the node's tunnel (the VXLAN device,
//! `hypha_tunnel_cfg`, the cluster CIDRs' routes) or native routing; then, on every
//! change of the cluster's nodes (from the runtime), the plan of `crate::overlay`
//! applied: the tunnel peers, Hypha's routes and the remote-node addresses. Also the
//! pods' MTU and the routing section of the status.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, MutexGuard};

use hypha_api::{DropCount, RoutingStatus};
use hypha_common::{DIR_EGRESS, DropReason};

use super::{Agent, ControlError};
use crate::config::AgentConfig;
use crate::config::routing::{DEFAULT_TUNNEL_DEVICE, Routing, RoutingMode};
use crate::datapath::{Datapath, TunnelSetup};
use crate::host::{ClusterNets, ClusterRoute, HostNetwork, VxlanSpec};
use crate::ipam::IpamState;
use crate::overlay::{self, ClusterNode, LocalNode};

/// The routing the agent set up at start (cluster mode), and what it last applied.
#[derive(Default)]
pub(super) struct Overlay {
    /// `None`: a single node.
    setup: Option<Setup>,
    applied: Mutex<Applied>,
}

/// Fixed at start.
struct Setup {
    mode: RoutingMode,
    /// The VXLAN device (tunnel mode): name, ifindex, UDP port.
    device: Option<(String, u32, u16)>,
    /// The pods' MTU (`None`: the kernel's default, native routing over an underlay of
    /// unknown MTU).
    mtu: Option<u32>,
    local: LocalNode,
}

#[derive(Default)]
struct Applied {
    /// The nodes of the last apply, kept while any part of it failed (to try again).
    failed: Option<Vec<ClusterNode>>,
    /// Hypha's routes as `set_cluster_routes` last made them (`None`: not yet).
    routes: Option<Vec<ClusterRoute>>,
    /// Nodes routed to.
    routed: usize,
    /// Warnings already logged (each is logged once while it holds).
    warned: BTreeSet<String>,
}

impl Overlay {
    fn applied(&self) -> MutexGuard<'_, Applied> {
        self.applied.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The node's IPv6 router address (tunnel mode with an IPv6 pod CIDR), kept out of IPAM
/// and put on the host device; `None` with a warning when a pod already holds it (an
/// agent before the overlay handed it out): the host then reaches other nodes' IPv6 pods
/// only once that pod is gone and the agent restarted.
pub(super) fn router6(
    config: &AgentConfig,
    saved: &IpamState<Ipv6Addr>,
    warnings: &mut Vec<String>,
) -> Option<Ipv6Addr> {
    let cluster = config.cluster.as_ref()?;
    if cluster.routing.mode() != RoutingMode::Tunnel {
        return None;
    }
    let r = overlay::router6(config.pod_cidrs.v6?);
    if let Some(owner) = saved.allocations.get(&r) {
        warnings.push(format!(
            "the node's IPv6 router address {r} is held by {owner}: the host cannot reach other nodes' IPv6 pods through the tunnel until it is released and the agent restarted"
        ));
        return None;
    }
    Some(r)
}

/// The cluster CIDRs masquerading leaves alone (none on a single node).
pub(super) fn cluster_nets(config: &AgentConfig) -> ClusterNets {
    config
        .cluster
        .as_ref()
        .map_or_else(ClusterNets::default, |c| ClusterNets {
            v4: c.cidrs.v4.map(|(n, _)| n),
            v6: c.cidrs.v6.map(|(n, _)| n),
        })
}

impl<D: Datapath, H: HostNetwork> Agent<D, H> {
    /// At start: the tunnel (device, programs, `hypha_tunnel_cfg`, the cluster CIDRs'
    /// routes) or native routing (no device, a leftover one deleted, no tunnel config);
    /// on a single node, no tunnel config (a node that ran in cluster mode before keeps
    /// none). What cannot make the node work (the device, the MTU) fails the start; the
    /// rest is a warning.
    pub(super) fn start_overlay(
        &mut self,
        router6: Option<Ipv6Addr>,
        warnings: &mut Vec<String>,
    ) -> Result<(), ControlError> {
        let Some(cluster) = self.config.cluster.clone() else {
            self.clear_tunnel(warnings);
            return Ok(());
        };
        let first_ip = cluster.node_ips.first().copied();
        let underlay_mtu = match first_ip {
            Some(ip) => self.host.mtu_of_address(ip).unwrap_or_else(|e| {
                warnings.push(format!(
                    "cannot read the MTU of node-ip {ip}'s interface: {e}"
                ));
                None
            }),
            None => None,
        };
        let mut local = LocalNode {
            name: cluster.node_name.clone(),
            node_ips: cluster.node_ips.clone(),
            pod_cidrs: self.config.pod_cidrs,
            gateway: self.config.gateway(),
            cluster_cidr4: cluster.cidrs.v4.map(|(n, _)| n),
            cluster_cidr6: cluster.cidrs.v6.map(|(n, _)| n),
            tunnel_ifindex: None,
            subnets: Vec::new(),
        };
        let mtu = overlay::pod_mtu(&cluster.routing, &local, underlay_mtu, warnings)
            .map_err(ControlError::BadRequest)?;
        let setup = match &cluster.routing {
            Routing::Tunnel { device, port, .. } => {
                let mtu = mtu.expect("tunnel mode always has an MTU");
                let link = self.host.ensure_vxlan(&VxlanSpec {
                    name: device.clone(),
                    port: *port,
                    mtu,
                })?;
                self.datapath
                    .set_tunnel(Some(&TunnelSetup {
                        ifindex: link.index,
                        ifname: device.clone(),
                        local4: cluster.node_ips.iter().find_map(|a| match a {
                            IpAddr::V4(a) => Some(*a),
                            IpAddr::V6(_) => None,
                        }),
                        local6: cluster.node_ips.iter().find_map(|a| match a {
                            IpAddr::V6(a) => Some(*a),
                            IpAddr::V4(_) => None,
                        }),
                        // The router address is the node's IPv6 NodePort SNAT address,
                        // as the gateway is IPv4's.
                        snat6: router6,
                    }))
                    .map_err(|e| {
                        ControlError::Datapath(format!(
                            "cannot attach the tunnel programs to {device}: {e}"
                        ))
                    })?;
                local.tunnel_ifindex = Some(link.index);
                Setup {
                    mode: RoutingMode::Tunnel,
                    device: Some((device.clone(), link.index, *port)),
                    mtu: Some(mtu),
                    local,
                }
            }
            Routing::Native => {
                match self.host.delete_link(DEFAULT_TUNNEL_DEVICE) {
                    Ok(true) => tracing::info!(
                        device = DEFAULT_TUNNEL_DEVICE,
                        "native routing: deleted the VXLAN device an earlier agent left"
                    ),
                    Ok(false) => {}
                    Err(e) => warnings.push(format!(
                        "native routing: cannot delete the VXLAN device {DEFAULT_TUNNEL_DEVICE} an earlier agent left: {e}"
                    )),
                }
                self.clear_tunnel(warnings);
                local.subnets = self.host.subnets().unwrap_or_else(|e| {
                    warnings.push(format!(
                        "cannot list this node's subnets ({e}): native routing reaches no node"
                    ));
                    Vec::new()
                });
                Setup {
                    mode: RoutingMode::Native,
                    device: None,
                    mtu,
                    local,
                }
            }
        };
        self.overlay.setup = Some(setup);
        // The tunnel's routes do not depend on the nodes: in place before any node is.
        if self
            .overlay
            .setup
            .as_ref()
            .is_some_and(|s| s.device.is_some())
        {
            self.apply_routes(&self.plan(&[]).routes, warnings);
        }
        Ok(())
    }

    /// No tunnel: `hypha_tunnel_cfg` zeroed and no peers (what an earlier agent in tunnel
    /// mode left goes).
    fn clear_tunnel(&self, warnings: &mut Vec<String>) {
        if let Err(e) = self.datapath.set_tunnel(None) {
            warnings.push(format!("cannot clear the tunnel configuration: {e}"));
        }
        for e in self.datapath.set_tunnel_peers(&[]) {
            warnings.push(format!("cannot clear the tunnel peers: {e}"));
        }
    }

    fn plan(&self, nodes: &[ClusterNode]) -> overlay::Plan {
        match &self.overlay.setup {
            Some(s) => overlay::plan(&s.local, nodes),
            None => overlay::Plan::default(),
        }
    }

    /// Makes Hypha's routes `routes` unless they already are; a failure is pushed (and
    /// retried on the next call).
    fn apply_routes(&self, routes: &[ClusterRoute], errors: &mut Vec<String>) {
        if self.overlay.applied().routes.as_deref() == Some(routes) {
            return;
        }
        match self.host.set_cluster_routes(routes) {
            Ok(()) => self.overlay.applied().routes = Some(routes.to_vec()),
            Err(e) => {
                self.overlay.applied().routes = None;
                errors.push(format!("cannot set the routes to other nodes' pods: {e}"));
            }
        }
    }

    /// The cluster's nodes (all of them, this one included or not) as the store has
    /// them now: the tunnel peers, Hypha's routes and the remote-node addresses are made
    /// to match (a node gone from the store is no longer routed nor accepted). Called by
    /// the cluster runtime's dispatch, one batch at a time. Every part is applied; the
    /// errors are returned together.
    pub fn apply_cluster_nodes(&self, nodes: Vec<ClusterNode>) -> Result<(), ControlError> {
        let Some(setup) = &self.overlay.setup else {
            return Ok(());
        };
        let plan = self.plan(&nodes);
        {
            let mut applied = self.overlay.applied();
            let current: BTreeSet<String> = plan.warnings.iter().cloned().collect();
            for w in current.difference(&applied.warned) {
                tracing::warn!("{w}");
            }
            applied.warned = current;
        }
        let mut errors: Vec<String> = Vec::new();
        if setup.device.is_some() {
            errors.extend(
                self.datapath
                    .set_tunnel_peers(&plan.peers)
                    .into_iter()
                    .map(|e| format!("tunnel peers: {e}")),
            );
        }
        self.apply_routes(&plan.routes, &mut errors);
        if let Err(e) = self.set_remote_nodes(plan.remote_nodes.clone()) {
            errors.push(format!("remote-node addresses: {e}"));
        }
        {
            let mut applied = self.overlay.applied();
            applied.routed = plan.routed.len();
            applied.failed = (!errors.is_empty()).then_some(nodes);
        }
        tracing::debug!(nodes = ?plan.routed, "routing to the cluster's nodes");
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ControlError::Datapath(errors.join("; ")))
        }
    }

    /// Applies the nodes of the last [`Agent::apply_cluster_nodes`] again if part of it
    /// failed (`None`: nothing to retry). The daemon calls it periodically: a failed apply
    /// is not followed by another batch until the nodes change.
    pub fn retry_cluster_nodes(&self) -> Option<Result<(), ControlError>> {
        let nodes = self.overlay.applied().failed.take()?;
        Some(self.apply_cluster_nodes(nodes))
    }

    /// The MTU pods get (`Allocation::mtu`): cluster mode's, `None` on a single node.
    pub(super) fn pod_mtu(&self) -> Option<u32> {
        self.overlay.setup.as_ref().and_then(|s| s.mtu)
    }

    /// The routing section of the status (cluster mode).
    pub(super) fn routing_status(&self) -> Option<RoutingStatus> {
        let setup = self.overlay.setup.as_ref()?;
        let drops = match &setup.device {
            Some((_, ifindex, _)) => {
                let all = self.datapath.drops().unwrap_or_else(|e| {
                    tracing::warn!("cannot read drop counters: {e}");
                    Vec::new()
                });
                device_drops(&all, *ifindex)
            }
            None => Vec::new(),
        };
        Some(RoutingStatus {
            mode: setup.mode.name().to_owned(),
            device: setup.device.as_ref().map(|(n, _, _)| n.clone()),
            port: setup.device.as_ref().map(|(_, _, p)| *p),
            // Unknown (native routing, no interface holds node-ip): veths' default.
            mtu: setup.mtu.unwrap_or(1500),
            peers: self.overlay.applied().routed,
            drops,
        })
    }
}

/// The drops counted against the VXLAN device `ifindex`, by reason and direction.
fn device_drops(
    all: &[(hypha_common::DropKey, hypha_common::Counter)],
    ifindex: u32,
) -> Vec<DropCount> {
    let mut by: BTreeMap<(String, &'static str), (u64, u64)> = BTreeMap::new();
    for (k, c) in all.iter().filter(|(k, _)| k.ifindex == ifindex) {
        let reason = DropReason::from_u16(k.reason)
            .map(|r| r.name().to_owned())
            .unwrap_or_else(|| format!("unknown-{}", k.reason));
        let dir = if k.direction == DIR_EGRESS {
            "egress"
        } else {
            "ingress"
        };
        let e = by.entry((reason, dir)).or_default();
        e.0 += c.packets;
        e.1 += c.bytes;
    }
    by.into_iter()
        .map(|((reason, direction), (packets, bytes))| DropCount {
            reason,
            direction: direction.to_owned(),
            packets,
            bytes,
        })
        .collect()
}

#[cfg(test)]
#[path = "overlay_tests.rs"]
mod tests;
