//! The nodes an operator sees (`hypha node list`, `hypha node remove`): in cluster mode
//! the store's, through the [`ClusterLink`](super::ClusterLink); on a single node, the
//! node itself, and nothing to remove.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use hypha_api::{NodeInfo, NodeTraffic, PacketCount, RemoveNodeResponse};
use hypha_common::{Counter, NodeStats};

use super::{Agent, ControlError};
use crate::datapath::Datapath;
use crate::host::HostNetwork;
use crate::overlay;

/// Where the kernel keeps the host name (of the agent's UTS namespace).
const HOSTNAME_PATH: &str = "/proc/sys/kernel/hostname";

impl<D: Datapath, H: HostNetwork> Agent<D, H> {
    /// Every node of the cluster (this one marked `local`), each other node with the
    /// traffic this node's tunnel counted with it; on a single node, this node alone:
    /// named after the host, with its pod CIDRs and endpoints, alive.
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, ControlError> {
        if let Some(link) = self.cluster() {
            let mut nodes = link.nodes().map_err(|e| {
                ControlError::Unavailable(format!("cannot list the cluster's nodes: {e}"))
            })?;
            self.fill_tunnel_traffic(&mut nodes);
            return Ok(nodes);
        }
        let endpoints = self.table().endpoints.len();
        Ok(vec![NodeInfo {
            name: hostname(),
            addresses: Vec::new(),
            pod_cidr: self.config.pod_cidrs.v4,
            pod_cidr6: self.config.pod_cidrs.v6,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            heartbeat_unix_ms: Some(unix_ms_now()),
            alive: true,
            endpoints,
            local: true,
            tunnel: None,
        }])
    }

    /// Sets `tunnel` of every other node that has counters in `hypha_node_stats` (keyed by
    /// [`overlay::node_id`] of its name; the tunnel creates them for the nodes it routes
    /// to). Nodes without (no tunnel, native routing, a node not routed) keep `None`.
    /// Counters that cannot be read are logged and left out: the list is still answered.
    fn fill_tunnel_traffic(&self, nodes: &mut [NodeInfo]) {
        let stats: BTreeMap<u32, NodeStats> = match self.datapath.node_stats() {
            Ok(s) => s.into_iter().collect(),
            Err(e) => {
                tracing::warn!("cannot read the tunnel's per-node counters: {e}");
                return;
            }
        };
        for n in nodes.iter_mut().filter(|n| !n.local) {
            n.tunnel = stats.get(&overlay::node_id(&n.name)).map(node_traffic);
        }
    }

    /// Removes node `name` from the cluster store (`force`: even while its heartbeat is
    /// fresh). A single node has no cluster to remove anything from.
    pub fn remove_node(&self, name: &str, force: bool) -> Result<RemoveNodeResponse, ControlError> {
        match self.cluster() {
            Some(link) => link.remove_node(name, force),
            None => Err(ControlError::BadRequest(format!(
                "cannot remove node {name}: this agent is not in cluster mode (it runs without --cluster-store), so there are no other nodes"
            ))),
        }
    }
}

/// One node's counters as the API shows them.
pub(super) fn node_traffic(s: &NodeStats) -> NodeTraffic {
    let count = |c: &Counter| PacketCount {
        packets: c.packets,
        bytes: c.bytes,
    };
    NodeTraffic {
        tx: count(&s.tx),
        rx: count(&s.rx),
        dropped: count(&s.dropped),
    }
}

/// The host's name, or `localhost` when the kernel does not say.
fn hostname() -> String {
    std::fs::read_to_string(HOSTNAME_PATH)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
