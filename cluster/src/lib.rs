//! Hypha's cluster control plane, below the agent: what nodes share through the cluster
//! store (etcd), as functions over a small store trait.
//!
//! - [`store`]: the trait ([`KvStore`]), with etcd ([`etcd::EtcdKv`]) and an in-memory
//!   fake ([`fake::MemKv`], with lease expiry, compaction, restarts and outages on demand).
//! - [`layout`]: the keys and values, under one versioned prefix.
//! - [`node`]: registering a node (its lease, heartbeat and pod CIDRs, allocated in one
//!   transaction) and removing one.
//! - [`identity`]: cluster-wide label identities by compare-and-swap, and their garbage
//!   collection.
//! - [`mirror`]: a local copy of the store's keys kept by list and watch, reconciled by
//!   mark and sweep when a watch is lost.
//!
//! Nothing here knows the agent: it applies what the mirror reports to its maps.

pub mod etcd;
pub mod fake;
pub mod identity;
pub mod layout;
pub mod mirror;
pub mod node;
pub mod store;
pub mod testing;

pub use layout::Layout;
pub use store::{
    Compare, KeyValue, KvStore, LeaseId, Op, Revision, Snapshot, StoreError, TxnOutcome,
    WatchEvent, WatchMessage,
};

use ipnet::IpNet;

/// Why a cluster operation failed, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another agent (another state directory) holds the node name.
    #[error(
        "node name {name} is already taken by a live agent (addresses {addresses}, last heartbeat {age_ms} ms ago); give this agent another --node-name, or stop the other one"
    )]
    NodeNameTaken {
        name: String,
        addresses: String,
        age_ms: u64,
    },
    /// No free pod CIDR is left in the cluster CIDR.
    #[error(
        "the cluster CIDR {cluster} has no free /{prefix_len} left for node {node} ({used} allocated); widen --cluster-cidr or remove nodes with `hypha node remove`"
    )]
    CidrExhausted {
        node: String,
        cluster: IpNet,
        prefix_len: u8,
        used: usize,
    },
    /// The node's agent is alive: removing it would pull its pods' state from under it.
    #[error(
        "node {name} is alive (last heartbeat {age_ms} ms ago); stop its agent first, or pass --force"
    )]
    NodeAlive { name: String, age_ms: u64 },
    #[error("node {0} is not in the cluster store")]
    NoSuchNode(String),
    /// The node's share of a cluster CIDR cannot be cut from it.
    #[error(
        "cannot cut /{prefix_len} pod CIDRs out of the cluster CIDR {cluster}: the node CIDR size must be between the cluster CIDR's prefix length and the family's address length"
    )]
    InvalidCidrPlan { cluster: IpNet, prefix_len: u8 },
    /// The node was removed from the store (`hypha node remove --force`) while its agent
    /// ran: its CIDRs may already be another node's.
    #[error(
        "node {0} was removed from the cluster store while its agent ran (its pod CIDRs were released); restart the agent with a fresh state directory to register again"
    )]
    NodeRemoved(String),
    /// Label identities are all taken.
    #[error("no cluster identity is left for {namespace} {labels}: all {count} numbers are in use")]
    IdentitiesExhausted {
        namespace: String,
        labels: String,
        count: usize,
    },
    /// A value in the store cannot be read.
    #[error("{key} in the cluster store is not valid: {reason}")]
    Corrupt { key: String, reason: String },
    /// Too many concurrent writers won a compare-and-swap in a row.
    #[error("{what}: gave up after {attempts} conflicting attempts")]
    Contention { what: String, attempts: u32 },
}

impl ClusterError {
    /// Whether retrying later may succeed (the store was unreachable).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ClusterError::Store(e) if e.is_unavailable())
    }
}

/// Reads a JSON value of the store, naming the key when it is not valid.
pub fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(value).map_err(|e| ClusterError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// A value as the store holds it.
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("cluster records serialize")
}
