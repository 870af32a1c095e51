//! The redb store (`state.redb`) and its group-commit writer.
//!
//! Tables, each keyed so that one [`Change`] writes one row (values are serde JSON):
//! - `endpoints`: (container id, ifname) → [`EndpointRecord`]
//! - `addresses`: (container id, ifname) → IPv4 address (u32), the IPv4 IPAM's
//!   reservations (as issue 10's agents wrote it)
//! - `addresses6`: (container id, ifname) → IPv6 address (u128), the IPv6 IPAM's; absent
//!   in a store from before dual stack, which therefore opens unchanged
//! - `policies`: (namespace, name) → [`StoredPolicy`]
//! - `namespace_labels`: namespace → labels
//! - `services`: (namespace, name) → [`StoredService`]; `endpoint_slices`: (namespace,
//!   name) → [`StoredSlice`]; absent in a store from before services
//! - `meta`: `version`, `next_endpoint_id`, `ipam_last` (the IPv4 IPAM's cursor),
//!   `ipam6_last` (the IPv6 one's), `identities`
//!   (the whole [`IdentityAllocator`](crate::policy::IdentityAllocator), one row)

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::fcntl::Flock;
use redb::{
    Database, Durability, ReadableDatabase as _, ReadableTable as _, TableDefinition, TableError,
    WriteTransaction,
};

use super::change::changes_between;
use super::{
    Change, EndpointRecord, LOCK_WAIT, Pending, Persist, PersistedState, STATE_VERSION, StateError,
    StoredPolicy, StoredService, StoredSlice, lock,
};
use crate::ipam::Owner;
use hypha_cluster::layout::EndpointEntry;

/// redb's page cache: its default ceiling is 1 GiB, which a cluster node's 50,000 remote
/// endpoints filled with pages the agent never reads again (the agent reads the database
/// only at start). 32 MiB holds the B-trees' interior pages many times over.
const CACHE_BYTES: usize = 32 << 20;

pub(super) const ENDPOINTS: TableDefinition<'_, (&str, &str), &[u8]> =
    TableDefinition::new("endpoints");
pub(super) const ADDRESSES: TableDefinition<'_, (&str, &str), u32> =
    TableDefinition::new("addresses");
const ADDRESSES6: TableDefinition<'_, (&str, &str), u128> = TableDefinition::new("addresses6");
const POLICIES: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("policies");
const NAMESPACE_LABELS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("namespace_labels");
/// Cluster mode: other nodes' endpoints, store key → `EndpointEntry` as JSON.
const REMOTE_ENDPOINTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("remote_endpoints");
const SERVICES: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("services");
const SLICES: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("endpoint_slices");
pub(super) const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

const META_VERSION: &str = "version";
const META_NEXT_ENDPOINT_ID: &str = "next_endpoint_id";
const META_IPAM_LAST: &str = "ipam_last";
const META_IPAM6_LAST: &str = "ipam6_last";
const META_IDENTITIES: &str = "identities";

/// The database's file name in the state directory.
const DB_FILE: &str = "state.redb";
/// The state file of agents before the database; imported once, then renamed to
/// `state.json.migrated`.
const JSON_FILE: &str = "state.json";

/// What the writer has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Write transactions committed or attempted (one per group).
    pub transactions: u64,
    /// `submit` calls whose group was written.
    pub submits: u64,
    /// The most submits one transaction carried.
    pub largest_group: usize,
}

#[derive(Default)]
struct Counters {
    transactions: AtomicU64,
    submits: AtomicU64,
    largest_group: AtomicUsize,
}

/// One `submit`: its changes and where its outcome goes.
struct Job {
    changes: Vec<Change>,
    reply: mpsc::SyncSender<Result<(), StateError>>,
}

/// Where the state lives. Holding a `StateStore` holds an exclusive lock on the directory.
pub struct StateStore {
    path: PathBuf,
    db: Arc<Database>,
    /// `None` once dropping: the writer then drains the queue and stops.
    queue: Option<mpsc::Sender<Job>>,
    writer: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    /// Fault injection: the writer fails every group (as a full disk would) while set.
    fail: Arc<AtomicBool>,
    /// Last: released after the database is closed.
    _lock: Flock<File>,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl StateStore {
    /// Opens (creating) `dir` and locks it against a second agent, waiting up to
    /// [`LOCK_WAIT`] for a previous holder to go away; imports an old `state.json`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        Self::open_waiting(dir, LOCK_WAIT)
    }

    /// As [`StateStore::open`], waiting at most `wait` for the lock.
    pub fn open_waiting(dir: &Path, wait: Duration) -> Result<Self, StateError> {
        let lock = lock::lock_dir(dir, wait)?;
        let path = dir.join(DB_FILE);
        let json = dir.join(JSON_FILE);
        let old = if json.exists() {
            Some(read_json(&json)?)
        } else {
            None
        };
        let created = !path.exists();
        if created {
            create(dir, &path, old.as_ref())?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .open(&path)
            .map_err(|e| db_error("open", &path, e))?;
        if let Some(state) = &old {
            // `state.json` is renamed only once its import is committed: if it is still
            // here and the database was not created just now, a crash came in between,
            // and importing it again replaces the rows with the same ones.
            if !created {
                import(&db, state).map_err(|e| db_error("import state.json into", &path, e))?;
            }
            let migrated = dir.join("state.json.migrated");
            fs::rename(&json, &migrated).map_err(|source| StateError::Io {
                op: "rename the imported state file to state.json.migrated",
                path: json.clone(),
                source,
            })?;
            sync_dir(dir)?;
            tracing::info!(
                "imported {} into {}; the old file is now {}",
                json.display(),
                path.display(),
                migrated.display()
            );
        }
        let db = Arc::new(db);
        let found = read_version(&db, &path)?;
        if found != STATE_VERSION {
            return Err(StateError::Version { path, found });
        }
        let (queue, jobs) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let fail = Arc::new(AtomicBool::new(false));
        let writer = {
            let (db, db_path, counters, fail) =
                (db.clone(), path.clone(), counters.clone(), fail.clone());
            std::thread::Builder::new()
                .name("hypha-state".into())
                .spawn(move || write_loop(&db, &db_path, &jobs, &counters, &fail))
                .map_err(|source| StateError::Io {
                    op: "start the writer thread for",
                    path: path.clone(),
                    source,
                })?
        };
        Ok(Self {
            path,
            db,
            queue: Some(queue),
            writer: Some(writer),
            counters,
            fail,
            _lock: lock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The committed state (the empty state on first start).
    pub fn load(&self) -> Result<PersistedState, StateError> {
        read_all(&self.db, &self.path)
    }

    pub fn stats(&self) -> WriterStats {
        WriterStats {
            transactions: self.counters.transactions.load(Ordering::Relaxed),
            submits: self.counters.submits.load(Ordering::Relaxed),
            largest_group: self.counters.largest_group.load(Ordering::Relaxed),
        }
    }

    /// Fault injection, for tests: while on, every group fails (ENOSPC) and is rolled back.
    #[doc(hidden)]
    pub fn fail_writes(&self, on: bool) {
        self.fail.store(on, Ordering::Relaxed);
    }
}

impl Persist for StateStore {
    fn submit(&self, changes: Vec<Change>) -> Pending {
        let gone = || {
            Pending::done(Err(StateError::WriterGone {
                path: self.path.clone(),
            }))
        };
        let Some(queue) = &self.queue else {
            return gone();
        };
        let (reply, outcome) = mpsc::sync_channel(1);
        match queue.send(Job { changes, reply }) {
            Ok(()) => Pending::queued(outcome, self.path.clone()),
            Err(_) => gone(),
        }
    }

    fn committed(&self) -> Result<PersistedState, StateError> {
        self.load()
    }
}

impl Drop for StateStore {
    /// Finishes what is queued, then stops the writer.
    fn drop(&mut self) {
        self.queue = None;
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("the state writer of {} panicked", self.path.display());
        }
    }
}

/// The writer: takes everything queued, writes it in one transaction (one fsync), answers
/// every submit of the group. Stops once the queue is closed and empty.
fn write_loop(
    db: &Database,
    path: &Path,
    jobs: &mpsc::Receiver<Job>,
    counters: &Counters,
    fail: &AtomicBool,
) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        group.extend(jobs.try_iter());
        let result = write_group(db, group.iter().flat_map(|j| &j.changes), fail);
        counters.transactions.fetch_add(1, Ordering::Relaxed);
        counters
            .submits
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        counters
            .largest_group
            .fetch_max(group.len(), Ordering::Relaxed);
        let shared = result.map_err(|(op, e)| (op, Arc::new(e)));
        for job in group {
            let outcome = match &shared {
                Ok(()) => Ok(()),
                Err((op, e)) => Err(StateError::Db {
                    op,
                    path: path.to_owned(),
                    source: e.clone(),
                }),
            };
            // The submitter may have stopped waiting; nothing is lost by not telling it.
            job.reply.send(outcome).ok();
        }
    }
}

fn write_group<'a>(
    db: &Database,
    changes: impl Iterator<Item = &'a Change>,
    fail: &AtomicBool,
) -> Result<(), (&'static str, redb::Error)> {
    let mut tx = db
        .begin_write()
        .map_err(|e| ("begin a write transaction on", e.into()))?;
    tx.set_durability(Durability::Immediate)
        .map_err(|e| ("set the durability of", e.into()))?;
    write_changes(&tx, changes).map_err(|e| ("write", e))?;
    if fail.load(Ordering::Relaxed) {
        let enospc = redb::Error::Io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        tx.abort()
            .map_err(|e| ("abort a transaction on", e.into()))?;
        return Err(("commit", enospc));
    }
    tx.commit().map_err(|e| ("commit", e.into()))
}

fn write_changes<'a>(
    tx: &WriteTransaction,
    changes: impl Iterator<Item = &'a Change>,
) -> Result<(), redb::Error> {
    let mut endpoints = tx.open_table(ENDPOINTS)?;
    let mut addresses = tx.open_table(ADDRESSES)?;
    let mut addresses6 = tx.open_table(ADDRESSES6)?;
    let mut policies = tx.open_table(POLICIES)?;
    let mut namespaces = tx.open_table(NAMESPACE_LABELS)?;
    let mut meta = tx.open_table(META)?;
    let mut remote = tx.open_table(REMOTE_ENDPOINTS)?;
    let mut services = tx.open_table(SERVICES)?;
    let mut slices = tx.open_table(SLICES)?;
    for change in changes {
        match change {
            Change::Endpoint(ep) => {
                endpoints.insert(
                    (ep.container_id.as_str(), ep.ifname.as_str()),
                    encode(ep).as_slice(),
                )?;
            }
            Change::EndpointGone(o) => {
                endpoints.remove((o.container_id.as_str(), o.ifname.as_str()))?;
            }
            Change::Address { owner, address } => {
                addresses.insert(
                    (owner.container_id.as_str(), owner.ifname.as_str()),
                    u32::from(*address),
                )?;
            }
            Change::AddressReleased(o) => {
                addresses.remove((o.container_id.as_str(), o.ifname.as_str()))?;
            }
            Change::IpamCursor(Some(last)) => {
                meta.insert(META_IPAM_LAST, encode(last).as_slice())?;
            }
            Change::IpamCursor(None) => {
                meta.remove(META_IPAM_LAST)?;
            }
            Change::Address6 { owner, address } => {
                addresses6.insert(
                    (owner.container_id.as_str(), owner.ifname.as_str()),
                    u128::from(*address),
                )?;
            }
            Change::Address6Released(o) => {
                addresses6.remove((o.container_id.as_str(), o.ifname.as_str()))?;
            }
            Change::Ipam6Cursor(Some(last)) => {
                meta.insert(META_IPAM6_LAST, encode(last).as_slice())?;
            }
            Change::Ipam6Cursor(None) => {
                meta.remove(META_IPAM6_LAST)?;
            }
            Change::NextEndpointId(n) => {
                let stored = match meta.get(META_NEXT_ENDPOINT_ID)? {
                    Some(v) => serde_json::from_slice::<u32>(v.value()).map_err(|e| {
                        redb::Error::Corrupted(format!("meta {META_NEXT_ENDPOINT_ID}: {e}"))
                    })?,
                    None => 0,
                };
                if *n > stored {
                    meta.insert(META_NEXT_ENDPOINT_ID, encode(n).as_slice())?;
                }
            }
            Change::Policy(p) => {
                policies.insert(
                    (p.policy.namespace.as_str(), p.policy.name.as_str()),
                    encode(p).as_slice(),
                )?;
            }
            Change::PolicyGone { namespace, name } => {
                policies.remove((namespace.as_str(), name.as_str()))?;
            }
            Change::NamespaceLabels { namespace, labels } if labels.is_empty() => {
                namespaces.remove(namespace.as_str())?;
            }
            Change::NamespaceLabels { namespace, labels } => {
                namespaces.insert(namespace.as_str(), encode(labels).as_slice())?;
            }
            Change::Identities(a) => {
                meta.insert(META_IDENTITIES, encode(a).as_slice())?;
            }
            Change::RemoteEndpoint { key, entry } => {
                remote.insert(key.as_str(), encode(entry).as_slice())?;
            }
            Change::RemoteEndpointGone(key) => {
                remote.remove(key.as_str())?;
            }
            Change::Service(s) => {
                services.insert(
                    (s.service.namespace.as_str(), s.service.name.as_str()),
                    encode(s).as_slice(),
                )?;
            }
            Change::ServiceGone { namespace, name } => {
                services.remove((namespace.as_str(), name.as_str()))?;
            }
            Change::Slice(s) => {
                slices.insert(
                    (s.slice.namespace.as_str(), s.slice.name.as_str()),
                    encode(s).as_slice(),
                )?;
            }
            Change::SliceGone { namespace, name } => {
                slices.remove((namespace.as_str(), name.as_str()))?;
            }
        }
    }
    Ok(())
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("the state's types serialize")
}

fn db_error(op: &'static str, path: &Path, e: impl Into<redb::Error>) -> StateError {
    StateError::Db {
        op,
        path: path.to_owned(),
        source: Arc::new(e.into()),
    }
}

/// Creates the database whole or not at all: built as `state.redb.tmp` (the format
/// version, every table, and the old state if any), then renamed into place. A crash
/// while redb writes a new file's header would otherwise leave a file it cannot open.
fn create(dir: &Path, path: &Path, old: Option<&PersistedState>) -> Result<(), StateError> {
    let tmp = path.with_extension("redb.tmp");
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StateError::Io {
                op: "remove the unfinished",
                path: tmp,
                source,
            });
        }
    }
    let db = Database::create(&tmp).map_err(|e| db_error("create", &tmp, e))?;
    let empty = PersistedState::default();
    import(&db, old.unwrap_or(&empty)).map_err(|e| db_error("initialise", &tmp, e))?;
    drop(db);
    fs::rename(&tmp, path).map_err(|source| StateError::Io {
        op: "rename the new database to state.redb",
        path: tmp.clone(),
        source,
    })?;
    sync_dir(dir)
}

/// Replaces everything in the database with `state`, in one transaction.
fn import(db: &Database, state: &PersistedState) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
    tx.delete_table(ENDPOINTS)?;
    tx.delete_table(ADDRESSES)?;
    tx.delete_table(ADDRESSES6)?;
    tx.delete_table(POLICIES)?;
    tx.delete_table(NAMESPACE_LABELS)?;
    tx.delete_table(REMOTE_ENDPOINTS)?;
    tx.delete_table(SERVICES)?;
    tx.delete_table(SLICES)?;
    tx.delete_table(META)?;
    {
        let mut meta = tx.open_table(META)?;
        meta.insert(META_VERSION, encode(&state.version).as_slice())?;
    }
    let changes = changes_between(&PersistedState::default(), state);
    // `changes_between` leaves out a `next_endpoint_id` of 1 (the default).
    let next = Change::NextEndpointId(state.next_endpoint_id);
    write_changes(&tx, changes.iter().chain([&next]))?;
    tx.commit()?;
    Ok(())
}

/// The old `state.json`, checked as the agents that wrote it checked it.
fn read_json(path: &Path) -> Result<PersistedState, StateError> {
    let text = fs::read(path).map_err(|source| StateError::Io {
        op: "read",
        path: path.to_owned(),
        source,
    })?;
    let state: PersistedState =
        serde_json::from_slice(&text).map_err(|source| StateError::Parse {
            path: path.to_owned(),
            source,
        })?;
    if state.version != STATE_VERSION {
        return Err(StateError::Version {
            path: path.to_owned(),
            found: state.version,
        });
    }
    Ok(state)
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StateError::Io {
            op: "sync the state directory",
            path: dir.to_owned(),
            source,
        })
}

fn read_version(db: &Database, path: &Path) -> Result<u32, StateError> {
    let tx = db
        .begin_read()
        .map_err(|e| db_error("begin a read transaction on", path, e))?;
    let meta = tx
        .open_table(META)
        .map_err(|e| db_error("open the meta table of", path, e))?;
    let row = meta
        .get(META_VERSION)
        .map_err(|e| db_error("read", path, e))?;
    match row {
        Some(v) => decode(path, "meta", META_VERSION, v.value()),
        None => Ok(STATE_VERSION),
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    path: &Path,
    table: &'static str,
    key: impl std::fmt::Display,
    bytes: &[u8],
) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|source| StateError::Row {
        path: path.to_owned(),
        table,
        key: key.to_string(),
        source,
    })
}

/// Every table, read in one read transaction.
fn read_all(db: &Database, path: &Path) -> Result<PersistedState, StateError> {
    let dbe = |op| move |e: redb::Error| db_error(op, path, e);
    let tx = db
        .begin_read()
        .map_err(|e| db_error("begin a read transaction on", path, e))?;
    let mut state = PersistedState::default();

    macro_rules! rows {
        ($def:expr) => {
            match tx.open_table($def) {
                Ok(t) => Some(t),
                Err(TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(db_error("open a table of", path, e)),
            }
        };
    }

    if let Some(meta) = rows!(META) {
        for row in meta.iter().map_err(|e| dbe("read")(e.into()))? {
            let (k, v) = row.map_err(|e| dbe("read")(e.into()))?;
            let (key, bytes) = (k.value(), v.value());
            match key {
                META_VERSION => {
                    let found: u32 = decode(path, "meta", key, bytes)?;
                    if found != STATE_VERSION {
                        return Err(StateError::Version {
                            path: path.to_owned(),
                            found,
                        });
                    }
                    state.version = found;
                }
                META_NEXT_ENDPOINT_ID => {
                    state.next_endpoint_id = decode(path, "meta", key, bytes)?;
                }
                META_IPAM_LAST => state.ipam.last = Some(decode(path, "meta", key, bytes)?),
                META_IPAM6_LAST => state.ipam6.last = Some(decode(path, "meta", key, bytes)?),
                META_IDENTITIES => state.identities = decode(path, "meta", key, bytes)?,
                other => tracing::warn!("{}: unknown meta row {other:?}", path.display()),
            }
        }
    }
    if let Some(t) = rows!(ENDPOINTS) {
        for row in t.iter().map_err(|e| dbe("read")(e.into()))? {
            let (k, v) = row.map_err(|e| dbe("read")(e.into()))?;
            let (cid, ifname) = k.value();
            let ep: EndpointRecord =
                decode(path, "endpoints", format!("{cid}/{ifname}"), v.value())?;
            state.endpoints.push(ep);
        }
    }
    if let Some(t) = rows!(ADDRESSES) {
        for row in t.iter().map_err(|e| dbe("read")(e.into()))? {
            let (k, v) = row.map_err(|e| dbe("read")(e.into()))?;
            let (container_id, ifname) = k.value();
            state.ipam.allocations.insert(
                Ipv4Addr::from(v.value()),
                Owner {
                    container_id: container_id.to_owned(),
                    ifname: ifname.to_owned(),
                },
            );
        }
    }
    if let Some(t) = rows!(ADDRESSES6) {
        for row in t.iter().map_err(|e| dbe("read")(e.into()))? {
            let (k, v) = row.map_err(|e| dbe("read")(e.into()))?;
            let (container_id, ifname) = k.value();
            state.ipam6.allocations.insert(
                Ipv6Addr::from(v.value()),
                Owner {
                    container_id: container_id.to_owned(),
                    ifname: ifname.to_owned(),
                },
            );
        }
    }
    if let Some(t) = rows!(POLICIES) {
        for row in t.iter().map_err(|e| dbe("read")(e.into()))? {
            let (k, v) = row.map_err(|e| dbe("read")(e.into()))?;
            let (ns, name) = k.value();
            let p: StoredPolicy = decode(path, "policies", format!("{ns}/{name}"), v.value())?;
            state.policies.push(p);
        }
    }
    if let Some(t) = rows!(NAMESPACE_LABELS) {
        for row in t.iter().map_err(|e| dbe("read")(e.into()))? {
            let (k, v) = row.map_err(|e| dbe("read")(e.into()))?;
            let labels: BTreeMap<String, String> =
                decode(path, "namespace_labels", k.value(), v.value())?;
            state.namespace_labels.insert(k.value().to_owned(), labels);
        }
    }
    if let Some(t) = rows!(SERVICES) {
        for row in t.iter().map_err(|e| dbe("read")(e.into()))? {
            let (k, v) = row.map_err(|e| dbe("read")(e.into()))?;
            let (ns, name) = k.value();
            let s: StoredService = decode(path, "services", format!("{ns}/{name}"), v.value())?;
            state.services.push(s);
        }
    }
    if let Some(t) = rows!(SLICES) {
        for row in t.iter().map_err(|e| dbe("read")(e.into()))? {
            let (k, v) = row.map_err(|e| dbe("read")(e.into()))?;
            let (ns, name) = k.value();
            let s: StoredSlice =
                decode(path, "endpoint_slices", format!("{ns}/{name}"), v.value())?;
            state.slices.push(s);
        }
    }
    if let Some(t) = rows!(REMOTE_ENDPOINTS) {
        for row in t.iter().map_err(|e| dbe("read")(e.into()))? {
            let (k, v) = row.map_err(|e| dbe("read")(e.into()))?;
            let entry: EndpointEntry = decode(path, "remote_endpoints", k.value(), v.value())?;
            state.remote_endpoints.insert(k.value().to_owned(), entry);
        }
    }
    Ok(state)
}
