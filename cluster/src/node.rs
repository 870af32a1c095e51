//! Nodes: registration (the node's record under its agent's lease, its pod CIDRs
//! allocated from the cluster CIDRs in one transaction, stable across restarts),
//! heartbeats, and removal.
//!
//! Who may hold a name: the record `nodes/<name>` lives under its agent's lease, so its
//! existence means a live agent; a record of another uid refuses the name
//! ([`ClusterError::NodeNameTaken`]), a record of our uid is our own from before a restart
//! (taken back). The CIDRs (`cidrs/<name>` and a claim per network under
//! `cidr-claims/v4|v6/`) are not leased: they stay with the name until `hypha node
//! remove`. Every write compares what it read, so two agents racing cannot both win.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::layout::{Layout, NodeCidrs, NodeRecord, now_ms};
use crate::store::{Compare, KvStore, LeaseId, Op, Revision, StoreError};
use crate::{ClusterError, decode, encode};

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

/// How many conflicting compare-and-swaps a step tolerates before `Contention`.
const ATTEMPTS: u32 = 64;

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
    let node_key = layout.node(&spec.name);
    for _ in 0..ATTEMPTS {
        // (1) The name: free, ours from before a restart, or someone else's.
        let existing = store.get(&node_key).await?;
        let node_compare = match &existing {
            Some(kv) => {
                let record: NodeRecord = decode(&node_key, &kv.value)?;
                if record.uid != spec.uid {
                    return Err(taken(&record));
                }
                Compare::ModRevision(node_key.clone(), kv.mod_revision)
            }
            None => Compare::Absent(node_key.clone()),
        };
        // (2) The CIDRs: kept, or allocated (with the node's current addresses).
        let (cidrs, cidrs_revision) =
            cidrs(store, layout, &spec.name, plan, &spec.addresses).await?;
        // (3) The record, under a new lease, if nobody wrote it since (1).
        let lease = store.grant_lease(ttl).await?;
        let record = NodeRecord {
            name: spec.name.clone(),
            uid: spec.uid.clone(),
            addresses: spec.addresses.clone(),
            pod_cidr: cidrs.v4,
            pod_cidr6: cidrs.v6,
            version: spec.version.clone(),
            heartbeat_ms: now_ms(),
        };
        let out = store
            .txn(
                vec![
                    node_compare,
                    Compare::ModRevision(layout.node_cidrs(&spec.name), cidrs_revision),
                ],
                vec![put_leased(&node_key, &record, lease)],
                Vec::new(),
            )
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                revoke_quietly(store, lease).await;
                return Err(e.into());
            }
        };
        if !out.succeeded {
            // Someone wrote the record or the CIDRs meanwhile: read again.
            revoke_quietly(store, lease).await;
            continue;
        }
        if let Some(old) = existing
            && old.lease != 0
            && old.lease != lease
        {
            // Our record from before the restart moved to the new lease; the old one
            // holds nothing now.
            revoke_quietly(store, old.lease).await;
        }
        tracing::info!(
            node = spec.name,
            ?cidrs,
            lease,
            "registered the node in the cluster store"
        );
        return Ok(Registration {
            record,
            cidrs,
            lease,
            revision: out.revision,
        });
    }
    Err(ClusterError::Contention {
        what: format!("registering node {}", spec.name),
        attempts: ATTEMPTS,
    })
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
    let node_key = layout.node(&reg.record.name);
    let lease_alive = match store.keep_alive(reg.lease).await {
        Ok(()) => true,
        Err(StoreError::LeaseGone { .. }) => false,
        Err(e) => return Err(e.into()),
    };
    if lease_alive {
        let mut record = reg.record.clone();
        record.heartbeat_ms = now_ms();
        let out = store
            .txn(
                vec![Compare::ModRevision(node_key.clone(), reg.revision)],
                vec![put_leased(&node_key, &record, reg.lease)],
                Vec::new(),
            )
            .await?;
        if out.succeeded {
            reg.record = record;
            reg.revision = out.revision;
            return Ok(());
        }
        // The record changed under us (removed, or taken after a lapse): check it as
        // after a lost lease.
    }
    for _ in 0..ATTEMPTS {
        let existing = store.get(&node_key).await?;
        let node_compare = match &existing {
            Some(kv) => {
                let record: NodeRecord = decode(&node_key, &kv.value)?;
                if record.uid != reg.record.uid {
                    return Err(taken(&record));
                }
                Compare::ModRevision(node_key.clone(), kv.mod_revision)
            }
            None => Compare::Absent(node_key.clone()),
        };
        // Our CIDRs must still be ours: a forced removal released them.
        let cidrs_key = layout.node_cidrs(&reg.record.name);
        let cidrs_revision = match store.get(&cidrs_key).await? {
            Some(kv) if same_nets(&decode::<NodeCidrs>(&cidrs_key, &kv.value)?, &reg.cidrs) => {
                kv.mod_revision
            }
            _ => return Err(ClusterError::NodeRemoved(reg.record.name.clone())),
        };
        let lease = match existing.as_ref() {
            Some(kv) if kv.lease == reg.lease && lease_alive => reg.lease,
            _ => store.grant_lease(ttl).await?,
        };
        let mut record = reg.record.clone();
        record.heartbeat_ms = now_ms();
        let out = store
            .txn(
                vec![
                    node_compare,
                    Compare::ModRevision(cidrs_key, cidrs_revision),
                ],
                vec![put_leased(&node_key, &record, lease)],
                Vec::new(),
            )
            .await;
        match out {
            Ok(out) if out.succeeded => {
                if lease != reg.lease {
                    tracing::warn!(
                        node = reg.record.name,
                        old = reg.lease,
                        new = lease,
                        "the node's lease was lost; registered again under a new one"
                    );
                }
                reg.record = record;
                reg.lease = lease;
                reg.revision = out.revision;
                return Ok(());
            }
            Ok(_) => {
                if lease != reg.lease {
                    revoke_quietly(store, lease).await;
                }
            }
            Err(e) => {
                if lease != reg.lease {
                    revoke_quietly(store, lease).await;
                }
                return Err(e.into());
            }
        }
    }
    Err(ClusterError::Contention {
        what: format!("heartbeat of node {}", reg.record.name),
        attempts: ATTEMPTS,
    })
}

/// Removes node `name`: its record, CIDRs and claims, and every endpoint it wrote, in one
/// transaction. Refused while its heartbeat is younger than `stale_after` unless `force`.
///
/// A node whose record is gone (its lease expired) still has its CIDRs and endpoints:
/// those are removed; `NoSuchNode` only when nothing of the node is left.
pub async fn remove(
    store: &dyn KvStore,
    layout: &Layout,
    name: &str,
    force: bool,
    stale_after: Duration,
) -> Result<Removed, ClusterError> {
    let node_key = layout.node(name);
    let cidrs_key = layout.node_cidrs(name);
    let endpoints_prefix = layout.node_endpoints(name);
    let claim_value = encode(&name);
    for _ in 0..ATTEMPTS {
        let record = store.get(&node_key).await?;
        if let Some(kv) = &record {
            let rec: NodeRecord = decode(&node_key, &kv.value)?;
            let age_ms = now_ms().saturating_sub(rec.heartbeat_ms);
            if !force && u128::from(age_ms) < stale_after.as_millis() {
                return Err(ClusterError::NodeAlive {
                    name: name.to_owned(),
                    age_ms,
                });
            }
        }
        let cidrs_kv = store.get(&cidrs_key).await?;
        let endpoints = store.list(&endpoints_prefix).await?.kvs.len();
        if record.is_none() && cidrs_kv.is_none() && endpoints == 0 {
            return Err(ClusterError::NoSuchNode(name.to_owned()));
        }
        let cidrs: NodeCidrs = match &cidrs_kv {
            Some(kv) => decode(&cidrs_key, &kv.value)?,
            None => NodeCidrs::default(),
        };
        let mut compares = vec![
            match &record {
                Some(kv) => Compare::ModRevision(node_key.clone(), kv.mod_revision),
                None => Compare::Absent(node_key.clone()),
            },
            match &cidrs_kv {
                Some(kv) => Compare::ModRevision(cidrs_key.clone(), kv.mod_revision),
                None => Compare::Absent(cidrs_key.clone()),
            },
        ];
        let mut ops = vec![
            Op::Delete(node_key.clone()),
            Op::Delete(cidrs_key.clone()),
            Op::DeletePrefix(endpoints_prefix.clone()),
        ];
        let nets = cidrs
            .v4
            .map(IpNet::V4)
            .into_iter()
            .chain(cidrs.v6.map(IpNet::V6));
        for net in nets {
            // Only a claim that names this node is its own.
            let claim = layout.cidr_claim(net);
            if let Some(kv) = store.get(&claim).await?
                && kv.value == claim_value
            {
                compares.push(Compare::ModRevision(claim.clone(), kv.mod_revision));
                ops.push(Op::Delete(claim));
            }
        }
        let out = store.txn(compares, ops, Vec::new()).await?;
        if !out.succeeded {
            continue;
        }
        if let Some(kv) = &record
            && kv.lease != 0
        {
            revoke_quietly(store, kv.lease).await;
        }
        tracing::info!(
            node = name,
            ?cidrs,
            endpoints,
            "removed the node from the cluster store"
        );
        return Ok(Removed {
            cidrs,
            endpoints,
            was_registered: record.is_some(),
        });
    }
    Err(ClusterError::Contention {
        what: format!("removing node {name}"),
        attempts: ATTEMPTS,
    })
}

fn taken(record: &NodeRecord) -> ClusterError {
    ClusterError::NodeNameTaken {
        name: record.name.clone(),
        addresses: record
            .addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        age_ms: now_ms().saturating_sub(record.heartbeat_ms),
    }
}

fn put_leased(key: &str, record: &NodeRecord, lease: LeaseId) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: encode(record),
        lease: Some(lease),
    }
}

async fn revoke_quietly(store: &dyn KvStore, lease: LeaseId) {
    if let Err(e) = store.revoke(lease).await {
        tracing::debug!(lease, error = %e, "revoking a lease that is no longer needed");
    }
}

/// Whether two `cidrs/<node>` values hold the same pod CIDRs (whatever their addresses).
fn same_nets(a: &NodeCidrs, b: &NodeCidrs) -> bool {
    a.v4 == b.v4 && a.v6 == b.v6
}

/// The node's CIDRs and the revision of `cidrs/<name>`: kept if there, else (or for a
/// family the plan has and they lack) allocated in one transaction with their claims.
/// The key's `addresses` are made `addresses` (rewritten when the node comes back with
/// other underlay addresses).
async fn cidrs(
    store: &dyn KvStore,
    layout: &Layout,
    name: &str,
    plan: &CidrPlan,
    addresses: &[IpAddr],
) -> Result<(NodeCidrs, Revision), ClusterError> {
    let key = layout.node_cidrs(name);
    let families = [
        plan.v4.map(|(net, len)| (IpNet::V4(net), len)),
        plan.v6.map(|(net, len)| (IpNet::V6(net), len)),
    ];
    for _ in 0..ATTEMPTS {
        let current = store.get(&key).await?;
        let mut cidrs = match &current {
            Some(kv) => decode::<NodeCidrs>(&key, &kv.value)?,
            None => NodeCidrs::default(),
        };
        let mut compares = vec![match &current {
            Some(kv) => Compare::ModRevision(key.clone(), kv.mod_revision),
            None => Compare::Absent(key.clone()),
        }];
        let mut ops = Vec::new();
        for (cluster, len) in families.into_iter().flatten() {
            let v6 = matches!(cluster, IpNet::V6(_));
            let held = if v6 {
                cidrs.v6.map(IpNet::V6)
            } else {
                cidrs.v4.map(IpNet::V4)
            };
            if let Some(held) = held {
                if !cluster.contains(&held) || held.prefix_len() != len {
                    tracing::warn!(
                        node = name,
                        %held,
                        %cluster,
                        len,
                        "the node keeps the pod CIDR it was given, outside the current plan"
                    );
                }
                continue;
            }
            let net = allocate(store, layout, name, cluster, len).await?;
            let claim = layout.cidr_claim(net);
            compares.push(Compare::Absent(claim.clone()));
            ops.push(Op::put(claim, encode(&name)));
            match net {
                IpNet::V4(n) => cidrs.v4 = Some(n),
                IpNet::V6(n) => cidrs.v6 = Some(n),
            }
        }
        let readdressed = cidrs.addresses != addresses;
        cidrs.addresses = addresses.to_vec();
        match &current {
            Some(kv) if ops.is_empty() && !readdressed => return Ok((cidrs, kv.mod_revision)),
            _ => {}
        }
        ops.push(Op::put(key.clone(), encode(&cidrs)));
        let out = store.txn(compares, ops, Vec::new()).await?;
        if out.succeeded {
            return Ok((cidrs, out.revision));
        }
        // Another node took one of the nets (or our CIDRs were written meanwhile): again.
    }
    Err(ClusterError::Contention {
        what: format!("allocating pod CIDRs for node {name}"),
        attempts: ATTEMPTS,
    })
}

/// The first share of `cluster` of prefix length `len` that no claim overlaps.
async fn allocate(
    store: &dyn KvStore,
    layout: &Layout,
    name: &str,
    cluster: IpNet,
    len: u8,
) -> Result<IpNet, ClusterError> {
    let invalid = || ClusterError::InvalidCidrPlan {
        cluster,
        prefix_len: len,
    };
    let mut subnets = cluster.subnets(len).map_err(|_| invalid())?;
    let prefix = layout.cidr_claims(matches!(cluster, IpNet::V6(_)));
    let claims = store.list(&prefix).await?;
    let mut claimed = Vec::new();
    for kv in &claims.kvs {
        let net: IpNet = kv.key[prefix.len()..]
            .replace('_', "/")
            .parse()
            .map_err(|e| ClusterError::Corrupt {
                key: kv.key.clone(),
                reason: format!("not a CIDR claim: {e}"),
            })?;
        if overlap(net, cluster) {
            claimed.push(net);
        }
    }
    claimed.sort();
    subnets
        .find(|candidate| !claimed.iter().any(|c| overlap(*c, *candidate)))
        .ok_or_else(|| ClusterError::CidrExhausted {
            node: name.to_owned(),
            cluster,
            prefix_len: len,
            used: claimed.len(),
        })
}

fn overlap(a: IpNet, b: IpNet) -> bool {
    a.contains(&b) || b.contains(&a)
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
