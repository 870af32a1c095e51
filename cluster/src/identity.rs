//! Cluster-wide label identities: one number per (namespace, labels) for the whole
//! cluster, allocated by compare-and-swap so that concurrent agents agree, in
//! `[FIRST, END)` (below 2^24: it travels in a VXLAN VNI), and collected when no endpoint
//! of the cluster has used it for a grace period. CIDR identities stay node-local.
//!
//! SCAFFOLD: signatures decided; bodies to be written (issue 12, helper "logic").

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::ClusterError;
use crate::layout::{IdentityRecord, Labels, Layout};
use crate::store::{KvStore, Revision};

/// The first cluster identity ([`hypha_common::IDENTITY_FIRST_LABELS`]).
pub const FIRST: u32 = 256;
/// One past the last ([`hypha_common::IDENTITY_FIRST_CIDR`], 2^24).
pub const END: u32 = 1 << 24;

/// The number of (namespace, labels): the existing one (clearing a garbage collector's
/// mark on it), or a new one allocated by compare-and-swap.
pub async fn resolve(
    store: &dyn KvStore,
    layout: &Layout,
    namespace: &str,
    labels: &Labels,
) -> Result<u32, ClusterError> {
    let _ = (store, layout, namespace, labels);
    Err(ClusterError::Contention {
        what: "identity allocation is not written yet".into(),
        attempts: 0,
    })
}

/// Every identity of the cluster.
pub async fn list(
    store: &dyn KvStore,
    layout: &Layout,
) -> Result<(BTreeMap<u32, IdentityRecord>, Revision), ClusterError> {
    let _ = (store, layout);
    Ok((BTreeMap::new(), 0))
}

/// What one garbage collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Identities found unused and marked (their grace period starts).
    pub marked: Vec<u32>,
    /// Identities used again whose mark was cleared.
    pub revived: Vec<u32>,
    /// Identities unused for the whole grace period, deleted (both keys).
    pub deleted: Vec<u32>,
}

/// One pass of the collector: `used` is every identity the cluster's endpoints hold (as
/// the caller's mirror of `endpoints/` has them). Safe to run on every agent at once:
/// each step is a compare-and-swap on the identity's revision.
pub async fn collect_garbage(
    store: &dyn KvStore,
    layout: &Layout,
    used: &BTreeSet<u32>,
    now_ms: u64,
    grace: Duration,
) -> Result<GcReport, ClusterError> {
    let _ = (store, layout, used, now_ms, grace);
    Ok(GcReport::default())
}
