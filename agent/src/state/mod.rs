//! What the agent persists: endpoints, address reservations, policies, namespace labels
//! and identities, in a redb database (`state.redb`) in the state directory.
//!
//! Callers describe what changed ([`Change`]), not the whole state: one change writes one
//! row. [`Persist::submit`] only queues the changes; one writer thread commits everything
//! queued in one write transaction with one fsync (group commit), and answers every
//! [`Pending`] of the group once the group is durable. A SIGKILL at any moment therefore
//! loses nothing that was acknowledged, and redb's copy-on-write commit never leaves a
//! torn state.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use hypha_api::{Bandwidth, MacAddr};
use serde::{Deserialize, Serialize};

use hypha_cluster::layout::EndpointEntry;

use crate::ipam::{IpamState, Owner};
use crate::policy::{IdentityAllocator, Policy};

mod change;
mod lock;
#[cfg(test)]
pub mod mem;
mod store;
#[cfg(test)]
mod tests;

pub use change::{Change, apply, changes_between};
pub use store::{StateStore, WriterStats};

/// Format version of the state (`state.redb`'s `meta` table, and the old `state.json`);
/// bump on an incompatible change.
const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The old `state.json` is not valid.
    #[error("cannot parse the agent state {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A row of the database does not decode.
    #[error("cannot parse the agent state {path}: table {table}, key {key}: {source}")]
    Row {
        path: PathBuf,
        table: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// The database refused an operation. Shared (`Arc`): every request of a failed group
    /// gets the same error.
    #[error("cannot {op} {path}: {source}")]
    Db {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<redb::Error>,
    },
    /// The writer thread is gone (the store is being dropped, or the thread panicked).
    #[error("cannot commit to {path}: the state writer has stopped")]
    WriterGone { path: PathBuf },
    #[error(
        "agent state {path} has format version {found}; this agent reads version {STATE_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    /// Another process holds the directory's lock, and still did after [`LOCK_WAIT`].
    #[error(
        "another hypha agent already uses the state directory {path} (its lock is held{holder}; waited {waited:?} for it)"
    )]
    Locked {
        path: PathBuf,
        /// ` by process PID (NAME)` when `/proc/locks` tells who, else empty.
        holder: String,
        waited: Duration,
    },
}

/// Where persistence goes; a trait object so tests can run without a state directory.
pub trait Persist: Send + Sync {
    /// Queues `changes`, to be applied in this order after every change submitted before
    /// them. Never blocks on I/O: callers submit under a short lock (which fixes the order
    /// of their changes) and [`Pending::wait`] after releasing it.
    fn submit(&self, changes: Vec<Change>) -> Pending;

    /// What is durably committed now (a read transaction; it does not wait for the queue).
    fn committed(&self) -> Result<PersistedState, StateError>;
}

/// The outcome of a [`Persist::submit`], to be waited for.
#[must_use = "changes are durable only once wait() returns Ok"]
pub struct Pending(PendingInner);

enum PendingInner {
    Done(Result<(), StateError>),
    Queued {
        reply: mpsc::Receiver<Result<(), StateError>>,
        /// For the error if the writer goes away without answering.
        path: PathBuf,
    },
}

impl Pending {
    /// An outcome known at submission (nothing to write, or the writer is gone).
    pub fn done(result: Result<(), StateError>) -> Self {
        Pending(PendingInner::Done(result))
    }

    fn queued(reply: mpsc::Receiver<Result<(), StateError>>, path: PathBuf) -> Self {
        Pending(PendingInner::Queued { reply, path })
    }

    /// Blocks until the group holding these changes is durable (Ok) or has failed; never
    /// hangs on a writer that has gone away. Call it from a blocking thread, with no
    /// lock held.
    pub fn wait(self) -> Result<(), StateError> {
        match self.0 {
            PendingInner::Done(result) => result,
            PendingInner::Queued { reply, path } => {
                reply.recv().unwrap_or(Err(StateError::WriterGone { path }))
            }
        }
    }
}

/// How long [`StateStore::open`] waits for the lock. A SIGKILLed agent releases it only
/// once the kernel has torn the process down, and a thread in an uninterruptible call (an
/// fsync of the state, a netlink or bpf call) delays that: a restart right after the
/// kill must not take the dying agent for a live one. A live agent still holds it after.
pub const LOCK_WAIT: Duration = Duration::from_secs(3);

/// One endpoint as the agent remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub id: u32,
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    /// Its IPv4 and IPv6 addresses: at least one of the two. Records from before dual
    /// stack have `address` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    pub pod_mac: MacAddr,
    pub host_mac: MacAddr,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The address came from a delegated IPAM plugin; the agent holds no reservation.
    #[serde(default)]
    pub external_ipam: bool,
    #[serde(default)]
    pub bandwidth: Option<Bandwidth>,
    /// The datapath traces its packets (`hypha endpoint debug`).
    #[serde(default)]
    pub debug: bool,
    /// Its named ports (`hypha endpoint ports`, `args.cni.namedPorts`), for policies
    /// that name ports.
    #[serde(default)]
    pub ports: Vec<hypha_api::NamedPort>,
}

impl EndpointRecord {
    pub fn owner(&self) -> Owner {
        Owner {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }

    /// Its addresses: the IPv4 one first.
    pub fn addresses(&self) -> impl Iterator<Item = std::net::IpAddr> + use<> {
        let v4 = self.address.map(std::net::IpAddr::V4);
        v4.into_iter()
            .chain(self.address6.map(std::net::IpAddr::V6))
    }

    /// Its addresses for messages: `10.0.0.2, fd00::2`.
    pub fn describe_addresses(&self) -> String {
        let all: Vec<String> = self.addresses().map(|a| a.to_string()).collect();
        if all.is_empty() {
            "no address".into()
        } else {
            all.join(", ")
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    pub version: u32,
    pub next_endpoint_id: u32,
    /// The IPv4 allocator's reservations and cursor.
    pub ipam: IpamState,
    /// The IPv6 allocator's (empty in states from before dual stack).
    #[serde(default)]
    pub ipam6: IpamState<Ipv6Addr>,
    pub endpoints: Vec<EndpointRecord>,
    /// Policies in force, with where each came from (those of the watched directory
    /// too, so that a restart enforces them before the directory is read again).
    #[serde(default)]
    pub policies: Vec<StoredPolicy>,
    /// Labels operators gave namespaces (`hypha namespace label`).
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Security identities and policy ids, so that they survive restarts.
    #[serde(default)]
    pub identities: IdentityAllocator,
    /// Cluster mode: the other nodes' endpoints, by store key, so that an agent
    /// restarted while the store is unreachable keeps them in its ipcache.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub remote_endpoints: BTreeMap<String, EndpointEntry>,
    /// Services applied through the API or from the watched directory, with their
    /// allocated ClusterIPs and NodePorts, sorted by (namespace, name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<StoredService>,
    /// `EndpointSlice`s likewise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slices: Vec<StoredSlice>,
}

/// A service in force (its ClusterIPs and NodePorts as allocated) and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredService {
    pub service: crate::service::Service,
    pub origin: PolicyOrigin,
}

/// An `EndpointSlice` in force and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSlice {
    pub slice: crate::service::EndpointSlice,
    pub origin: PolicyOrigin,
}

/// A policy in force and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPolicy {
    pub policy: Policy,
    pub origin: PolicyOrigin,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyOrigin {
    /// `POST /v1/policies` (`hypha policy apply`), from the named file.
    Api(String),
    /// A file of the watched policy directory.
    Dir(PathBuf),
    /// Cluster mode: the cluster store (`hypha policy apply` on any node).
    Cluster,
}

impl std::fmt::Display for PolicyOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyOrigin::Api(s) => write!(f, "api: {s}"),
            PolicyOrigin::Dir(p) => write!(f, "dir: {}", p.display()),
            PolicyOrigin::Cluster => write!(f, "cluster store"),
        }
    }
}

impl Default for PersistedState {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            next_endpoint_id: 1,
            ipam: IpamState::default(),
            ipam6: IpamState::default(),
            endpoints: Vec::new(),
            policies: Vec::new(),
            namespace_labels: BTreeMap::new(),
            identities: IdentityAllocator::default(),
            remote_endpoints: BTreeMap::new(),
            services: Vec::new(),
            slices: Vec::new(),
        }
    }
}
