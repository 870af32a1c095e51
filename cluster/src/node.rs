//! Nodes: registration (the node's record under its agent's lease, its pod CIDRs
//! allocated from the cluster CIDRs in one transaction, stable across restarts),
//! heartbeats, and removal.
//!
//! SCAFFOLD: signatures decided; bodies to be written (issue 12, helper "logic").

use std::net::IpAddr;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::ClusterError;
use crate::layout::{Layout, NodeCidrs, NodeRecord};
use crate::store::{KvStore, LeaseId, Revision};

/// Who this agent is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    /// The id of the agent's state directory (see [`NodeRecord::uid`]).
    pub uid: String,
    pub addresses: Vec<IpAddr>,
    pub version: String,
}

/// The cluster CIDRs and the size of each node's share, per family (a family without one
/// gets no pod CIDR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrPlan {
    pub v4: Option<(Ipv4Net, u8)>,
    pub v6: Option<(Ipv6Net, u8)>,
}

/// A registered node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub record: NodeRecord,
    pub cidrs: NodeCidrs,
    pub lease: LeaseId,
    pub revision: Revision,
}

/// What `remove` took out of the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub cidrs: NodeCidrs,
    pub endpoints: usize,
    pub was_registered: bool,
}

/// Registers the node: refuses a name a live agent of another uid holds
/// ([`ClusterError::NodeNameTaken`]); takes the node's CIDRs back if it has them, else
/// allocates the first free share of each family in one transaction
/// ([`ClusterError::CidrExhausted`] when none is left); puts the node's record under a new
/// lease of `ttl`.
pub async fn register(
    store: &dyn KvStore,
    layout: &Layout,
    spec: &NodeSpec,
    plan: &CidrPlan,
    ttl: Duration,
) -> Result<Registration, ClusterError> {
    let _ = (store, layout, spec, plan, ttl);
    Err(ClusterError::NoSuchNode(
        "registration is not written yet".into(),
    ))
}

/// Keeps the lease alive and writes a fresh heartbeat; when the lease was lost (the store
/// restarted without it, or an outage outlasted it), grants a new one and puts the record
/// again, unless another agent took the name meanwhile.
pub async fn heartbeat(
    store: &dyn KvStore,
    layout: &Layout,
    reg: &mut Registration,
    ttl: Duration,
) -> Result<(), ClusterError> {
    let _ = (store, layout, reg, ttl);
    Ok(())
}

/// Removes node `name`: its record, CIDRs and claims, and every endpoint it wrote, in one
/// transaction. Refused while its heartbeat is younger than `stale_after` unless `force`.
pub async fn remove(
    store: &dyn KvStore,
    layout: &Layout,
    name: &str,
    force: bool,
    stale_after: Duration,
) -> Result<Removed, ClusterError> {
    let _ = (store, layout, name, force, stale_after);
    Err(ClusterError::NoSuchNode(name.to_owned()))
}
