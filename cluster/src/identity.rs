//! Cluster-wide label identities: one number per (namespace, labels) for the whole
//! cluster, allocated by compare-and-swap so that concurrent agents agree, in
//! `[FIRST, END)` (below 2^24: it travels in a VXLAN VNI), and collected when no endpoint
//! of the cluster has used it for a grace period. CIDR identities stay node-local.
//!
//! Allocation: the labels key (`identities/labels/<sha256>` → number) and the id key
//! (`identities/id/<number>` → what it stands for) are created together in one
//! transaction that requires both absent, so the first writer wins and everyone else reads
//! the winner. Candidates are drawn at random in the range rather than from a list of
//! every identity: with the range's 16.7 million numbers a random one is free with
//! overwhelming likelihood, so an allocation costs one read and one transaction whatever
//! the cluster holds; only after a few collisions in a row (a crowded range) does it list
//! the ids and take the next free one after a random start, which also tells when the
//! range is full.
//!
//! Collection is a two-step compare-and-swap: an unused identity is first marked
//! (`unused_since_ms`), and deleted only if still marked, unchanged, a grace period later.
//! An agent that resolves a marked identity clears the mark first (compare-and-swap on
//! the same revision), so a collector racing it either fails its delete or has deleted
//! before the agent reads, in which case the agent allocates afresh: no endpoint ever
//! holds a deleted number.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::layout::{IdentityRecord, Labels, Layout};
use crate::store::{Compare, KvStore, Op, Revision};
use crate::{ClusterError, decode, encode};

/// The first cluster identity ([`hypha_common::IDENTITY_FIRST_LABELS`]).
pub const FIRST: u32 = 256;
/// One past the last ([`hypha_common::IDENTITY_FIRST_CIDR`], 2^24).
pub const END: u32 = 1 << 24;

/// Conflicting compare-and-swaps tolerated before `Contention`.
const ATTEMPTS: u32 = 64;
/// Random candidates tried before listing the ids.
const RANDOM_TRIES: u32 = 4;

/// The number of (namespace, labels): the existing one (clearing a garbage collector's
/// mark on it), or a new one allocated by compare-and-swap.
pub async fn resolve(
    store: &dyn KvStore,
    layout: &Layout,
    namespace: &str,
    labels: &Labels,
) -> Result<u32, ClusterError> {
    resolve_in(store, layout, namespace, labels, FIRST..END).await
}

/// [`resolve`] within `range` (a small one in tests).
pub(crate) async fn resolve_in(
    store: &dyn KvStore,
    layout: &Layout,
    namespace: &str,
    labels: &Labels,
    range: Range<u32>,
) -> Result<u32, ClusterError> {
    let labels_key = layout.identity_labels(namespace, labels);
    let mut collisions = 0;
    let mut dangling = None;
    for _ in 0..ATTEMPTS {
        if let Some(kv) = store.get(&labels_key).await? {
            let id: u32 = decode(&labels_key, &kv.value)?;
            if !range.contains(&id) {
                return Err(ClusterError::Corrupt {
                    key: labels_key,
                    reason: format!(
                        "identity {id} is outside the cluster range [{}, {})",
                        range.start, range.end
                    ),
                });
            }
            let id_key = layout.identity(id);
            let Some(record_kv) = store.get(&id_key).await? else {
                // Collected between our two reads (both keys go together): again; but the
                // same dangling labels key twice is not a race.
                if dangling == Some(kv.mod_revision) {
                    return Err(ClusterError::Corrupt {
                        key: labels_key,
                        reason: format!("it names identity {id}, which {id_key} does not hold"),
                    });
                }
                dangling = Some(kv.mod_revision);
                continue;
            };
            let mut record: IdentityRecord = decode(&id_key, &record_kv.value)?;
            if record.namespace != namespace || record.labels != *labels {
                return Err(ClusterError::Corrupt {
                    key: id_key,
                    reason: format!(
                        "it stands for {} {} but {labels_key} names it for {namespace} {}",
                        record.namespace,
                        show(&record.labels),
                        show(labels)
                    ),
                });
            }
            if record.unused_since_ms.is_none() {
                return Ok(id);
            }
            // Used again: clear the collector's mark, on the revision we read.
            record.unused_since_ms = None;
            let out = store
                .txn(
                    vec![Compare::ModRevision(id_key.clone(), record_kv.mod_revision)],
                    vec![Op::put(id_key, encode(&record))],
                    Vec::new(),
                )
                .await?;
            if out.succeeded {
                return Ok(id);
            }
            continue;
        }
        let candidate = if collisions < RANDOM_TRIES {
            random_in(&range)
        } else {
            next_free(store, layout, namespace, labels, &range).await?
        };
        let id_key = layout.identity(candidate);
        let record = IdentityRecord {
            namespace: namespace.to_owned(),
            labels: labels.clone(),
            unused_since_ms: None,
        };
        let out = store
            .txn(
                vec![
                    Compare::Absent(labels_key.clone()),
                    Compare::Absent(id_key.clone()),
                ],
                vec![
                    Op::put(labels_key.clone(), encode(&candidate)),
                    Op::put(id_key, encode(&record)),
                ],
                Vec::new(),
            )
            .await?;
        if out.succeeded {
            tracing::debug!(namespace, labels = %show(labels), id = candidate, "allocated a cluster identity");
            return Ok(candidate);
        }
        // Either someone allocated these labels (read above next time) or the number is
        // taken.
        collisions += 1;
    }
    Err(ClusterError::Contention {
        what: format!("allocating the identity of {namespace} {}", show(labels)),
        attempts: ATTEMPTS,
    })
}

/// `k=v,k=v`.
fn show(labels: &Labels) -> String {
    let parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", parts.join(","))
}

/// A number drawn at random in `range` (std's per-process random hash keys; no generator
/// crate needed for this).
fn random_in(range: &Range<u32>) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let span = u64::from(range.end - range.start);
    range.start + (h.finish() % span) as u32
}

/// The first number after a random start (wrapping) that no id key holds.
async fn next_free(
    store: &dyn KvStore,
    layout: &Layout,
    namespace: &str,
    labels: &Labels,
    range: &Range<u32>,
) -> Result<u32, ClusterError> {
    let prefix = layout.identities_by_id();
    let taken: BTreeSet<u32> = store
        .list(&prefix)
        .await?
        .kvs
        .iter()
        .filter_map(|kv| kv.key[prefix.len()..].parse().ok())
        .collect();
    let start = random_in(range);
    (start..range.end)
        .chain(range.start..start)
        .find(|n| !taken.contains(n))
        .ok_or_else(|| ClusterError::IdentitiesExhausted {
            namespace: namespace.to_owned(),
            labels: show(labels),
            count: (range.end - range.start) as usize,
        })
}

/// Every identity of the cluster (an id key that cannot be read is skipped with a
/// warning: one bad key does not hide the others).
pub async fn list(
    store: &dyn KvStore,
    layout: &Layout,
) -> Result<(BTreeMap<u32, IdentityRecord>, Revision), ClusterError> {
    let (records, revision) = list_raw(store, layout).await?;
    Ok((
        records.into_iter().map(|(id, (r, _))| (id, r)).collect(),
        revision,
    ))
}

/// The identities with the mod revision of each id key.
async fn list_raw(
    store: &dyn KvStore,
    layout: &Layout,
) -> Result<(BTreeMap<u32, (IdentityRecord, Revision)>, Revision), ClusterError> {
    let prefix = layout.identities_by_id();
    let snapshot = store.list(&prefix).await?;
    let mut records = BTreeMap::new();
    for kv in snapshot.kvs {
        let Ok(id) = kv.key[prefix.len()..].parse::<u32>() else {
            tracing::warn!(key = kv.key, "not an identity key; skipped");
            continue;
        };
        match decode::<IdentityRecord>(&kv.key, &kv.value) {
            Ok(record) => {
                records.insert(id, (record, kv.mod_revision));
            }
            Err(e) => tracing::warn!(error = %e, "skipped"),
        }
    }
    Ok((records, snapshot.revision))
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
/// each step is a compare-and-swap on the identity's revision (a step that loses its
/// compare is left to the next pass).
pub async fn collect_garbage(
    store: &dyn KvStore,
    layout: &Layout,
    used: &BTreeSet<u32>,
    now_ms: u64,
    grace: Duration,
) -> Result<GcReport, ClusterError> {
    let (records, _) = list_raw(store, layout).await?;
    let mut report = GcReport::default();
    for (id, (mut record, revision)) in records {
        let id_key = layout.identity(id);
        let guard = vec![Compare::ModRevision(id_key.clone(), revision)];
        match (used.contains(&id), record.unused_since_ms) {
            (true, None) => {}
            (true, Some(_)) => {
                record.unused_since_ms = None;
                let out = store
                    .txn(guard, vec![Op::put(id_key, encode(&record))], Vec::new())
                    .await?;
                if out.succeeded {
                    report.revived.push(id);
                }
            }
            (false, None) => {
                record.unused_since_ms = Some(now_ms);
                let out = store
                    .txn(guard, vec![Op::put(id_key, encode(&record))], Vec::new())
                    .await?;
                if out.succeeded {
                    report.marked.push(id);
                }
            }
            (false, Some(since)) => {
                if u128::from(now_ms.saturating_sub(since)) < grace.as_millis() {
                    continue;
                }
                let labels_key = layout.identity_labels(&record.namespace, &record.labels);
                let mut compares = guard;
                // The labels key goes only if it names this number.
                compares.push(Compare::Value(labels_key.clone(), encode(&id)));
                let out = store
                    .txn(
                        compares,
                        vec![Op::Delete(id_key), Op::Delete(labels_key)],
                        Vec::new(),
                    )
                    .await?;
                if out.succeeded {
                    tracing::info!(id, namespace = record.namespace, labels = %show(&record.labels), "collected an unused cluster identity");
                    report.deleted.push(id);
                }
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
#[path = "identity_tests.rs"]
mod tests;
