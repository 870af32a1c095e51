//! What the agent persists: endpoints and address reservations, in one JSON file that is
//! replaced atomically (write, fsync, rename) before any answer is given, so that a
//! SIGKILL at any moment leaves either the old or the new state, never a torn one.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypha_api::{Bandwidth, MacAddr};
use nix::errno::Errno;
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

/// How long [`StateStore::open`] waits for the lock. A SIGKILLed agent releases it only
/// once the kernel has torn the process down, and a thread in an uninterruptible call (an
/// fsync of the state, a netlink or bpf call) delays that: a restart right after the
/// kill must not take the dying agent for a live one. A live agent still holds it after.
pub const LOCK_WAIT: Duration = Duration::from_secs(3);

/// How often the lock is tried while waiting.
const LOCK_POLL: Duration = Duration::from_millis(50);

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
    /// Its named ports (`hypha endpoint ports`), for policies that name ports.
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
    /// Opens (creating) `dir` and locks it against a second agent, waiting up to
    /// [`LOCK_WAIT`] for a previous holder to go away.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        Self::open_waiting(dir, LOCK_WAIT)
    }

    /// As [`StateStore::open`], waiting at most `wait` for the lock.
    pub fn open_waiting(dir: &Path, wait: Duration) -> Result<Self, StateError> {
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
        // The descriptor is close-on-exec (std opens every file with O_CLOEXEC), so the
        // children the agent runs (nft) never hold the lock.
        let deadline = Instant::now() + wait;
        let mut file = lock_file;
        let mut told = false;
        let lock = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => break lock,
                Err((f, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    if !told {
                        tracing::info!(
                            "the lock of {} is held{}; waiting up to {wait:?} for it",
                            dir.display(),
                            lock_holder(&f)
                        );
                        told = true;
                    }
                    file = f;
                    std::thread::sleep(LOCK_POLL);
                }
                Err((f, Errno::EWOULDBLOCK)) => {
                    return Err(StateError::Locked {
                        path: dir.to_owned(),
                        holder: lock_holder(&f),
                        waited: wait,
                    });
                }
                Err((_, errno)) => {
                    return Err(StateError::Io {
                        op: "lock",
                        path: lock_path,
                        source: errno.into(),
                    });
                }
            }
        };
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
        })?;
        // The rename is durable only once the directory is: without this, a power loss
        // may bring back the old state (or no state) after the agent has answered.
        let dir = self.path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StateError::Io {
                op: "sync the state directory",
                path: dir.to_owned(),
                source,
            })
    }
}

/// ` by process PID (NAME)` for the process holding `file`'s flock, from `/proc/locks`;
/// empty when it cannot be told.
fn lock_holder(file: &File) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = file.metadata() else {
        return String::new();
    };
    let id = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(meta.dev()),
        nix::sys::stat::minor(meta.dev()),
        meta.ino()
    );
    let Ok(locks) = fs::read_to_string("/proc/locks") else {
        return String::new();
    };
    // `1: FLOCK  ADVISORY  WRITE 4242 00:2b:1234 0 EOF`; waiters have `->` after the number.
    let pid = locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() >= 6 && fields[1] == "FLOCK" && fields[5] == id).then(|| fields[4])
    });
    match pid {
        Some(pid) => match fs::read_to_string(format!("/proc/{pid}/comm")) {
            Ok(name) => format!(" by process {pid} ({})", name.trim()),
            Err(_) => format!(" by process {pid}"),
        },
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use nix::errno::Errno;

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

        let err = StateStore::open_waiting(dir.path(), Duration::ZERO).unwrap_err();
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

    /// `flock LOCK -c 'touch READY; CMD'` in a process group of its own, started once
    /// the lock is held.
    fn hold_lock(dir: &Path, cmd: &str) -> std::process::Child {
        use std::os::unix::process::CommandExt as _;
        let ready = dir.join("ready");
        let child = std::process::Command::new("flock")
            .arg(dir.join("agent.lock"))
            .arg("-c")
            .arg(format!("touch {}; {cmd}", ready.display()))
            .process_group(0)
            .spawn()
            .expect("flock(1) runs");
        let start = Instant::now();
        while !ready.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "flock never held the lock"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    /// Kills a process group started by `hold_lock` and reaps its leader.
    fn kill_group(mut child: std::process::Child) {
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        if let Err(e) = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL) {
            assert_eq!(e, Errno::ESRCH, "cannot kill the lock holder");
        }
        child.wait().expect("reap the lock holder");
    }

    #[test]
    fn a_holder_that_goes_away_within_the_wait_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let holder = hold_lock(dir.path(), "sleep 0.5");
        let start = Instant::now();
        let store = StateStore::open(dir.path());
        let waited = start.elapsed();
        kill_group(holder);
        store.expect("the lock is free once the holder is gone");
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
    }

    #[test]
    fn the_lock_is_not_inherited_by_what_the_agent_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let lock = dir.path().join("agent.lock");
        let fds = fs::read_dir(format!("/proc/{}/fd", child.id())).unwrap();
        for fd in fds {
            let target = fs::read_link(fd.unwrap().path()).unwrap_or_default();
            assert_ne!(target, lock, "the child holds the lock's descriptor");
        }
        drop(store);
        let again = StateStore::open(dir.path());
        child.kill().unwrap();
        child.wait().unwrap();
        again.expect("the lock went with the store, not with the child");
    }

    /// Re-runs this test binary under strace to see the syscalls of one save.
    #[test]
    fn a_save_syncs_the_directory_after_the_rename() {
        const CHILD: &str = "HYPHA_TEST_SAVE_INTO";
        if let Some(dir) = std::env::var_os(CHILD) {
            let store = StateStore::open(Path::new(&dir)).unwrap();
            store.save(&PersistedState::default()).unwrap();
            return;
        }
        if std::process::Command::new("strace")
            .arg("-V")
            .output()
            .is_err()
        {
            eprintln!("skipped: strace is not installed, and only it shows the fsync");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("trace");
        let state = dir.path().join("state");
        let out = std::process::Command::new("strace")
            .args([
                "-f",
                "-e",
                "trace=openat,rename,renameat,renameat2,fsync,fdatasync",
                "-o",
            ])
            .arg(&trace)
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "state::tests::a_save_syncs_the_directory_after_the_rename",
                "--test-threads=1",
            ])
            .env(CHILD, &state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let trace = fs::read_to_string(trace).unwrap();
        let lines: Vec<&str> = trace.lines().collect();
        let renamed = lines
            .iter()
            .position(|l| l.contains("rename") && l.contains("state.json.tmp"))
            .unwrap_or_else(|| panic!("no rename of the state file:\n{trace}"));
        // After it: the directory opened (fd N) and fsync(N).
        let dir_fd = lines[renamed..]
            .iter()
            .find(|l| l.contains("openat") && l.contains(&format!("\"{}\"", state.display())))
            .and_then(|l| l.rsplit("= ").next())
            .and_then(|fd| fd.trim().parse::<u32>().ok())
            .unwrap_or_else(|| panic!("the directory is not opened after the rename:\n{trace}"));
        assert!(
            lines[renamed..]
                .iter()
                .any(|l| l.contains(&format!("fsync({dir_fd})"))),
            "the directory is not fsynced after the rename:\n{trace}"
        );
    }

    #[test]
    fn a_live_holder_is_refused_after_the_wait_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let holder = hold_lock(dir.path(), "sleep 30");
        let start = Instant::now();
        let err = StateStore::open_waiting(dir.path(), Duration::from_millis(400));
        let waited = start.elapsed();
        let pid = holder.id();
        kill_group(holder);
        let err = err.unwrap_err();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("another hypha agent already uses the state directory")
                && text.contains(&format!("by process {pid} (flock)")),
            "{text}"
        );
        assert!(waited >= Duration::from_millis(400), "{waited:?}");
    }
}

// ---- Interim: the store's change interface (replaced by the redb group-commit store).

/// One change to the persisted state.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Endpoint(EndpointRecord),
    EndpointGone(Owner),
    Address { owner: Owner, address: Ipv4Addr },
    AddressReleased(Owner),
    IpamCursor(Option<Ipv4Addr>),
    NextEndpointId(u32),
    Policy(StoredPolicy),
    PolicyGone { namespace: String, name: String },
    NamespaceLabels {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
    Identities(IdentityAllocator),
}

/// Applies one change to an in-memory state.
pub fn apply(state: &mut PersistedState, change: &Change) {
    match change {
        Change::Endpoint(ep) => {
            state
                .endpoints
                .retain(|e| !(e.container_id == ep.container_id && e.ifname == ep.ifname));
            state.endpoints.push(ep.clone());
        }
        Change::EndpointGone(o) => state
            .endpoints
            .retain(|e| !(e.container_id == o.container_id && e.ifname == o.ifname)),
        Change::Address { owner, address } => {
            state.ipam.allocations.retain(|_, o| o != owner);
            state.ipam.allocations.insert(*address, owner.clone());
        }
        Change::AddressReleased(owner) => state.ipam.allocations.retain(|_, o| o != owner),
        Change::IpamCursor(last) => state.ipam.last = *last,
        Change::NextEndpointId(n) => state.next_endpoint_id = state.next_endpoint_id.max(*n),
        Change::Policy(p) => {
            state.policies.retain(|s| {
                !(s.policy.namespace == p.policy.namespace && s.policy.name == p.policy.name)
            });
            state.policies.push(p.clone());
        }
        Change::PolicyGone { namespace, name } => state
            .policies
            .retain(|s| !(s.policy.namespace == *namespace && s.policy.name == *name)),
        Change::NamespaceLabels { namespace, labels } => {
            if labels.is_empty() {
                state.namespace_labels.remove(namespace);
            } else {
                state
                    .namespace_labels
                    .insert(namespace.clone(), labels.clone());
            }
        }
        Change::Identities(i) => state.identities = i.clone(),
    }
}

/// Where changes go.
pub trait Persist: Send + Sync {
    fn submit(&self, changes: Vec<Change>) -> Pending;
}

/// A submitted change; `wait` says whether it was saved.
#[must_use]
pub struct Pending(Result<(), StateError>);

impl Pending {
    pub fn wait(self) -> Result<(), StateError> {
        self.0
    }
}

/// The whole-file store behind the change interface.
pub struct FileStore {
    store: StateStore,
    state: std::sync::Mutex<PersistedState>,
}

impl FileStore {
    pub fn new(store: StateStore, state: PersistedState) -> Self {
        Self {
            store,
            state: std::sync::Mutex::new(state),
        }
    }
}

impl Persist for FileStore {
    fn submit(&self, changes: Vec<Change>) -> Pending {
        let mut s = self.state.lock().expect("state");
        for c in &changes {
            apply(&mut s, c);
        }
        Pending(self.store.save(&s))
    }
}

#[cfg(test)]
pub mod mem {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    /// The fake store: applies changes in memory; can be made to fail as a full disk.
    #[derive(Clone, Default)]
    pub struct MemStore {
        pub groups: Arc<Mutex<Vec<PersistedState>>>,
        state: Arc<Mutex<PersistedState>>,
        failing: Arc<AtomicBool>,
    }

    impl MemStore {
        pub fn with(state: PersistedState) -> Self {
            let s = Self::default();
            *s.state.lock().unwrap() = state;
            s
        }

        pub fn fail(&self, on: bool) {
            self.failing.store(on, Ordering::Relaxed);
        }

        pub fn last(&self) -> PersistedState {
            self.state.lock().unwrap().clone()
        }
    }

    impl Persist for MemStore {
        fn submit(&self, changes: Vec<Change>) -> Pending {
            if self.failing.load(Ordering::Relaxed) {
                return Pending(Err(StateError::Io {
                    op: "write",
                    path: "/var/lib/hypha/state.redb".into(),
                    source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                }));
            }
            let mut s = self.state.lock().unwrap();
            for c in &changes {
                apply(&mut s, c);
            }
            self.groups.lock().unwrap().push(s.clone());
            Pending(Ok(()))
        }
    }
}
