//! The cluster store as the control plane needs it: a small slice of etcd's v3 API
//! (get, prefix list, transactions with compares, leases, prefix watches), behind a trait
//! so that the logic above it runs against [`crate::fake::MemKv`] in unit tests and
//! against [`crate::etcd::EtcdKv`] in the agent.
//!
//! Every method names the operation and the key in its error. Watches report through a
//! channel; when a watch cannot go on from where it was (its start revision compacted,
//! the connection lost, the store restarted), it sends [`WatchMessage::Lost`] and ends:
//! the caller lists again and reconciles (mark and sweep).

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

/// An etcd revision: the store's logical clock, raised by every write.
pub type Revision = i64;
/// An etcd lease id (0: no lease).
pub type LeaseId = i64;

/// One key and its value, with etcd's bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that created the key (its current incarnation).
    pub create_revision: Revision,
    /// The revision of its last write.
    pub mod_revision: Revision,
    /// The lease holding the key (0: none).
    pub lease: LeaseId,
}

/// A list of keys under a prefix, as of one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
}

/// A condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist (its create revision is 0).
    Absent(String),
    /// The key exists and was last written at this revision.
    ModRevision(String, Revision),
    /// The key holds exactly this value.
    Value(String, Vec<u8>),
}

/// A write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        /// Attach the key to this lease: it goes when the lease expires or is revoked.
        lease: Option<LeaseId>,
    },
    Delete(String),
    /// Every key starting with the prefix.
    DeletePrefix(String),
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }
}

/// What a transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every compare held (and so the writes were made).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, mod_revision: Revision },
}

/// What a watch reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchMessage {
    /// Changes, in revision order; `revision` is the store's revision with them.
    Events {
        events: Vec<WatchEvent>,
        revision: Revision,
    },
    /// The watch cannot continue (compacted past its revision, connection lost, store
    /// restarted): it ends after this. List again, then watch from the list's revision.
    Lost { reason: String },
}

/// Why a store operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (or did not answer in time): worth retrying.
    #[error("{op} {key}: the cluster store is unreachable: {reason}")]
    Unavailable {
        op: &'static str,
        key: String,
        reason: String,
    },
    /// The lease does not exist (expired or revoked).
    #[error("{op}: lease {lease:x} is gone (expired or revoked)")]
    LeaseGone { op: &'static str, lease: LeaseId },
    /// The store answered with an error.
    #[error("{op} {key}: {reason}")]
    Failed {
        op: &'static str,
        key: String,
        reason: String,
    },
}

impl StoreError {
    /// Whether retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// The cluster store. Object-safe (`Arc<dyn KvStore>`): the agent holds one store and
/// hands it to every task.
pub trait KvStore: Send + Sync + 'static {
    /// The addresses of the store's members, for status.
    fn endpoints(&self) -> Vec<String>;

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>>;

    /// Every key starting with `prefix`, sorted by key, as of one revision.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Snapshot, StoreError>>;

    /// All of `success` if every compare holds, else all of `failure`; atomically.
    fn txn<'a>(
        &'a self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> BoxFuture<'a, Result<TxnOutcome, StoreError>>;

    /// A new lease that expires `ttl` after its last refresh.
    fn grant_lease<'a>(&'a self, ttl: Duration) -> BoxFuture<'a, Result<LeaseId, StoreError>>;

    /// Refreshes the lease once; `LeaseGone` if it expired.
    fn keep_alive<'a>(&'a self, lease: LeaseId) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Ends the lease now; its keys go.
    fn revoke<'a>(&'a self, lease: LeaseId) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Changes under `prefix` from revision `from` on (inclusive; 0: from now). The
    /// receiver ends after a [`WatchMessage::Lost`] or when the store is dropped.
    fn watch<'a>(
        &'a self,
        prefix: &'a str,
        from: Revision,
    ) -> BoxFuture<'a, Result<mpsc::Receiver<WatchMessage>, StoreError>>;
}

/// A simple put, no lease, no condition.
pub async fn put(store: &dyn KvStore, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
    let out = store
        .txn(Vec::new(), vec![Op::put(key, value)], Vec::new())
        .await?;
    Ok(out.revision)
}
