//! What the agent persists: endpoints and address reservations, in one JSON file that is
//! replaced atomically (write, fsync, rename) before any answer is given, so that a
//! SIGKILL at any moment leaves either the old or the new state, never a torn one.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hypha_api::{Bandwidth, MacAddr};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::ipam::{IpamState, Owner};
use crate::policy::{IdentityAllocator, Policy};

/// Format version of `state.json`; bump on an incompatible change.
const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse the agent state {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "agent state {path} has format version {found}; this agent reads version {STATE_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("another hypha agent already uses the state directory {path} (its lock is held)")]
    Locked { path: PathBuf },
}

/// One endpoint as the agent remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub id: u32,
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub address: Ipv4Addr,
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
}

impl EndpointRecord {
    pub fn owner(&self) -> Owner {
        Owner {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    pub version: u32,
    pub next_endpoint_id: u32,
    pub ipam: IpamState,
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
}

impl std::fmt::Display for PolicyOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyOrigin::Api(s) => write!(f, "api: {s}"),
            PolicyOrigin::Dir(p) => write!(f, "dir: {}", p.display()),
        }
    }
}

impl Default for PersistedState {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            next_endpoint_id: 1,
            ipam: IpamState::default(),
            endpoints: Vec::new(),
            policies: Vec::new(),
            namespace_labels: BTreeMap::new(),
            identities: IdentityAllocator::default(),
        }
    }
}

/// Where the state lives. Holding a `StateStore` holds an exclusive lock on the directory.
#[derive(Debug)]
pub struct StateStore {
    path: PathBuf,
    _lock: Flock<File>,
}

impl StateStore {
    /// Opens (creating) `dir` and locks it against a second agent.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::create_dir_all(dir).map_err(|source| StateError::Io {
            op: "create the state directory",
            path: dir.to_owned(),
            source,
        })?;
        let lock_path = dir.join("agent.lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| StateError::Io {
                op: "open",
                path: lock_path.clone(),
                source,
            })?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            StateError::Locked {
                path: dir.to_owned(),
            }
        })?;
        Ok(Self {
            path: dir.join("state.json"),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state, or the empty state on first start.
    pub fn load(&self) -> Result<PersistedState, StateError> {
        let text = match fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(PersistedState::default());
            }
            Err(source) => {
                return Err(StateError::Io {
                    op: "read",
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let state: PersistedState =
            serde_json::from_slice(&text).map_err(|source| StateError::Parse {
                path: self.path.clone(),
                source,
            })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Version {
                path: self.path.clone(),
                found: state.version,
            });
        }
        Ok(state)
    }

    /// Replaces the saved state atomically.
    pub fn save(&self, state: &PersistedState) -> Result<(), StateError> {
        let tmp = self.path.with_extension("json.tmp");
        let io = |op, source| StateError::Io {
            op,
            path: tmp.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("create", e))?;
        file.write_all(&bytes).map_err(|e| io("write", e))?;
        file.sync_all().map_err(|e| io("sync", e))?;
        fs::rename(&tmp, &self.path).map_err(|source| StateError::Io {
            op: "replace",
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), PersistedState::default());
        let mut state = PersistedState {
            next_endpoint_id: 7,
            ..Default::default()
        };
        state.endpoints.push(EndpointRecord {
            id: 6,
            container_id: "abc".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            host_ifname: "hyp0123456789ab".into(),
            host_ifindex: 42,
            address: Ipv4Addr::new(10, 244, 0, 9),
            pod_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            host_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            external_ipam: false,
            bandwidth: None,
            debug: true,
        });
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);

        let err = StateStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        drop(store);
        StateStore::open(dir.path()).expect("lock is released with the store");
    }

    #[test]
    fn garbage_and_future_versions_are_refused_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        fs::write(store.path(), b"{not json").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
        let future = PersistedState {
            version: 99,
            ..Default::default()
        };
        fs::write(store.path(), serde_json::to_vec(&future).unwrap()).unwrap();
        assert!(matches!(
            store.load(),
            Err(StateError::Version { found: 99, .. })
        ));
    }
}
