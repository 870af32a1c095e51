//! An in-memory [`KvStore`](crate::KvStore) with etcd's semantics where the control plane
//! depends on them (revisions, create/mod revisions, transactions, leases, prefix watches
//! from a past revision) and knobs for the faults the control plane must survive: leases
//! expired on demand, compaction, a restart (every watch lost, data kept), and an outage
//! (every call `Unavailable`).
//!
//! What it keeps from etcd:
//! - one global revision (1 for an empty store), raised once by each transaction that
//!   writes (several writes in one transaction share it); a delete of nothing writes
//!   nothing;
//! - per key its create revision (of its current incarnation) and mod revision;
//! - a transaction may not put one key twice, nor put a key it also deletes (etcd refuses
//!   both: "duplicate key given in txn request");
//! - a key put with a lease goes when the lease is revoked or expires (each key a delete
//!   event, all at one revision); a put with a lease that is gone fails with `LeaseGone`;
//!   leases expire on their own (a task per lease ends it at its deadline; every call
//!   checks deadlines too) or on demand ([`MemKv::expire_lease`]);
//! - a watch from a past revision replays the kept history, then goes on live; a watch
//!   from below the compaction revision is lost at once ("compacted").
//!
//! Every call yields to the runtime first, as a call over the network would, so that
//! concurrent tasks of a test interleave between their calls even on one thread.
//!
//! Watch messages go through an unbounded queue per watch and a small task forwarding to
//! the bounded receiver the trait returns, so a slow consumer never blocks a writer and
//! the store's lock is never held across an await.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::store::{
    Compare, KeyValue, KvStore, LeaseId, Op, Revision, Snapshot, StoreError, TxnOutcome,
    WatchEvent, WatchMessage,
};

/// Capacity of the receiver a watch returns (the forwarding task waits when it is full).
const WATCH_CHANNEL: usize = 256;

/// The in-memory store. Clones share one store (an `Arc` inside), so a test hands one to
/// several "agents".
#[derive(Clone, Default)]
pub struct MemKv {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for MemKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("MemKv")
            .field("revision", &inner.revision)
            .field("keys", &inner.data.len())
            .field("leases", &inner.leases.len())
            .field("watches", &inner.watchers.len())
            .finish()
    }
}

struct Inner {
    revision: Revision,
    data: BTreeMap<String, KeyValue>,
    /// Every write since the compaction revision, one entry per revision.
    history: Vec<(Revision, Vec<WatchEvent>)>,
    /// History below this revision is gone.
    compacted: Revision,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    watchers: Vec<Watcher>,
    reachable: bool,
    held: bool,
    /// Calls made (all of them, reachable or not), for tests that check a loop does not
    /// spin.
    calls: u64,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            revision: 1,
            data: BTreeMap::new(),
            history: Vec::new(),
            compacted: 0,
            leases: HashMap::new(),
            next_lease: 0x7a00_0000_0001,
            watchers: Vec::new(),
            reachable: true,
            held: false,
            calls: 0,
        }
    }
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    /// The next revision this watch has not been sent.
    next: Revision,
    tx: mpsc::UnboundedSender<WatchMessage>,
}

fn event_key(event: &WatchEvent) -> &str {
    match event {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

impl Inner {
    fn check(&mut self, op: &'static str, key: &str) -> Result<(), StoreError> {
        self.calls += 1;
        if !self.reachable {
            return Err(StoreError::Unavailable {
                op,
                key: key.to_owned(),
                reason: "the in-memory store is set unreachable".into(),
            });
        }
        self.expire_due();
        Ok(())
    }

    /// Ends every lease past its deadline.
    fn expire_due(&mut self) {
        let now = Instant::now();
        let mut due: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        due.sort_unstable();
        for id in due {
            self.end_lease(id);
        }
    }

    /// Removes a lease and deletes its keys in one revision.
    fn end_lease(&mut self, id: LeaseId) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        let mut events = Vec::new();
        let revision = self.revision + 1;
        for key in lease.keys {
            if self.data.remove(&key).is_some() {
                events.push(WatchEvent::Delete {
                    key,
                    mod_revision: revision,
                });
            }
        }
        self.commit(events);
        true
    }

    /// Records the events of one write (if any) at the next revision and sends them.
    fn commit(&mut self, events: Vec<WatchEvent>) {
        if events.is_empty() {
            return;
        }
        self.revision += 1;
        self.history.push((self.revision, events));
        self.pump();
    }

    /// Sends each watch what it has not been sent yet (unless watches are held).
    fn pump(&mut self) {
        if self.held {
            return;
        }
        let revision = self.revision;
        let history = &self.history;
        self.watchers.retain_mut(|w| {
            let start = history.partition_point(|(r, _)| *r < w.next);
            let events: Vec<WatchEvent> = history[start..]
                .iter()
                .flat_map(|(_, evs)| evs.iter())
                .filter(|e| event_key(e).starts_with(&w.prefix))
                .cloned()
                .collect();
            w.next = revision + 1;
            if events.is_empty() {
                return !w.tx.is_closed();
            }
            w.tx.send(WatchMessage::Events { events, revision }).is_ok()
        });
    }

    /// Ends every watch with `Lost { reason }`.
    fn lose_watches(&mut self, reason: &str) {
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(WatchMessage::Lost {
                reason: reason.to_owned(),
            });
        }
    }

    fn holds(&self, compare: &Compare) -> bool {
        match compare {
            Compare::Absent(key) => !self.data.contains_key(key),
            Compare::ModRevision(key, rev) => {
                self.data.get(key).map_or(0, |kv| kv.mod_revision) == *rev
            }
            Compare::Value(key, value) => self.data.get(key).is_some_and(|kv| kv.value == *value),
        }
    }

    /// Refuses what etcd refuses: a key put twice, a put inside a deleted range, a lease
    /// that is gone.
    fn validate(&self, ops: &[Op]) -> Result<(), StoreError> {
        let mut puts = BTreeSet::new();
        for op in ops {
            if let Op::Put { key, lease, .. } = op {
                if !puts.insert(key.as_str()) {
                    return Err(StoreError::Failed {
                        op: "txn",
                        key: key.clone(),
                        reason: "duplicate key given in txn request".into(),
                    });
                }
                if let Some(lease) = lease
                    && *lease != 0
                    && !self.leases.contains_key(lease)
                {
                    return Err(StoreError::LeaseGone {
                        op: "txn put",
                        lease: *lease,
                    });
                }
            }
        }
        for op in ops {
            let deleted = |k: &str| match op {
                Op::Delete(d) => k == d,
                Op::DeletePrefix(p) => k.starts_with(p.as_str()),
                Op::Put { .. } => false,
            };
            if let Some(k) = puts.iter().find(|k| deleted(k)) {
                return Err(StoreError::Failed {
                    op: "txn",
                    key: (*k).to_owned(),
                    reason: "duplicate key given in txn request".into(),
                });
            }
        }
        Ok(())
    }

    fn detach(&mut self, key: &str, lease: LeaseId) {
        if lease != 0
            && let Some(l) = self.leases.get_mut(&lease)
        {
            l.keys.remove(key);
        }
    }

    /// Runs validated writes at the next revision.
    fn write(&mut self, ops: Vec<Op>) {
        let revision = self.revision + 1;
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let lease = lease.unwrap_or(0);
                    let (create_revision, old_lease) = match self.data.get(&key) {
                        Some(kv) => (kv.create_revision, kv.lease),
                        None => (revision, 0),
                    };
                    if old_lease != lease {
                        self.detach(&key, old_lease);
                    }
                    if lease != 0
                        && let Some(l) = self.leases.get_mut(&lease)
                    {
                        l.keys.insert(key.clone());
                    }
                    let kv = KeyValue {
                        key: key.clone(),
                        value,
                        create_revision,
                        mod_revision: revision,
                        lease,
                    };
                    self.data.insert(key, kv.clone());
                    events.push(WatchEvent::Put(kv));
                }
                Op::Delete(key) => {
                    if let Some(kv) = self.data.remove(&key) {
                        self.detach(&key, kv.lease);
                        events.push(WatchEvent::Delete {
                            key,
                            mod_revision: revision,
                        });
                    }
                }
                Op::DeletePrefix(prefix) => {
                    let keys: Vec<String> = self
                        .data
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in keys {
                        if let Some(kv) = self.data.remove(&key) {
                            self.detach(&key, kv.lease);
                        }
                        events.push(WatchEvent::Delete {
                            key,
                            mod_revision: revision,
                        });
                    }
                }
            }
        }
        self.commit(events);
    }
}

impl MemKv {
    pub fn new() -> MemKv {
        MemKv::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store's current revision.
    pub fn revision(&self) -> Revision {
        self.lock().revision
    }

    /// Every call made so far (reachable or not).
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// Open watches.
    pub fn watch_count(&self) -> usize {
        let mut inner = self.lock();
        inner.watchers.retain(|w| !w.tx.is_closed());
        inner.watchers.len()
    }

    /// Live leases.
    pub fn lease_count(&self) -> usize {
        self.lock().leases.len()
    }

    /// Expires a lease now (its keys go, each a delete event). False if it was gone.
    pub fn expire_lease(&self, id: LeaseId) -> bool {
        self.lock().end_lease(id)
    }

    /// Drops the history below `revision` (clamped to the current revision). A watch
    /// whose next revision is below it (one held back by [`MemKv::hold_watches`]) and any
    /// new watch from below it get `Lost { "compacted ..." }`.
    pub fn compact(&self, revision: Revision) {
        let mut inner = self.lock();
        let revision = revision.min(inner.revision);
        if revision <= inner.compacted {
            return;
        }
        inner.compacted = revision;
        inner.history.retain(|(r, _)| *r >= revision);
        inner.watchers.retain(|w| {
            if w.next >= revision {
                return true;
            }
            let _ = w.tx.send(WatchMessage::Lost {
                reason: format!(
                    "compacted: revision {} was compacted (compaction revision {revision})",
                    w.next
                ),
            });
            false
        });
    }

    /// Holds every watch back (true: writes are kept in the history but not sent, like a
    /// watch stream that stalled) or lets them catch up (false).
    pub fn hold_watches(&self, held: bool) {
        let mut inner = self.lock();
        inner.held = held;
        inner.pump();
    }

    /// A store restart: every open watch is lost; data and leases are kept, and the
    /// leases' clocks start again (as etcd does on a new leader).
    pub fn restart(&self) {
        let mut inner = self.lock();
        inner.lose_watches("the store restarted");
        let now = Instant::now();
        for lease in inner.leases.values_mut() {
            lease.deadline = now + lease.ttl;
        }
    }

    /// An outage (false: every call fails `Unavailable` and open watches are lost) or its
    /// end (true). Leases keep running out meanwhile.
    pub fn set_reachable(&self, reachable: bool) {
        let mut inner = self.lock();
        inner.reachable = reachable;
        if !reachable {
            inner.lose_watches("the connection to the store was lost");
        }
    }

    fn get_now(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut inner = self.lock();
        inner.check("get", key)?;
        Ok(inner.data.get(key).cloned())
    }

    fn list_now(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        let mut inner = self.lock();
        inner.check("list", prefix)?;
        let kvs = inner
            .data
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(Snapshot {
            kvs,
            revision: inner.revision,
        })
    }

    fn txn_now(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<TxnOutcome, StoreError> {
        let mut inner = self.lock();
        let key = compares
            .first()
            .map(|c| match c {
                Compare::Absent(k) | Compare::ModRevision(k, _) | Compare::Value(k, _) => k,
            })
            .or_else(|| {
                success.first().map(|op| match op {
                    Op::Put { key, .. } => key,
                    Op::Delete(k) | Op::DeletePrefix(k) => k,
                })
            })
            .cloned()
            .unwrap_or_default();
        inner.check("txn", &key)?;
        let succeeded = compares.iter().all(|c| inner.holds(c));
        let ops = if succeeded { success } else { failure };
        inner.validate(&ops)?;
        inner.write(ops);
        Ok(TxnOutcome {
            succeeded,
            revision: inner.revision,
        })
    }

    /// Ends the lease at its deadline (pushed back by keep-alives) even if nobody calls
    /// the store, as etcd does; holds the store only weakly.
    fn reap_at_deadline(&self, id: LeaseId) {
        let store = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let deadline = {
                    let Some(inner) = store.upgrade() else { return };
                    let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
                    let Some(lease) = inner.leases.get(&id) else {
                        return;
                    };
                    if lease.deadline <= Instant::now() {
                        inner.end_lease(id);
                        return;
                    }
                    lease.deadline
                };
                tokio::time::sleep_until(deadline).await;
            }
        });
    }

    fn grant_now(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut inner = self.lock();
        inner.check("grant lease", "")?;
        let id = inner.next_lease;
        inner.next_lease += 1;
        inner.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    fn keep_alive_now(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.check("keep alive", "")?;
        match inner.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                Ok(())
            }
            None => Err(StoreError::LeaseGone {
                op: "keep alive",
                lease,
            }),
        }
    }

    fn revoke_now(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.check("revoke lease", "")?;
        if inner.end_lease(lease) {
            Ok(())
        } else {
            Err(StoreError::LeaseGone {
                op: "revoke lease",
                lease,
            })
        }
    }

    fn watch_now(
        &self,
        prefix: &str,
        from: Revision,
    ) -> Result<mpsc::UnboundedReceiver<WatchMessage>, StoreError> {
        let mut inner = self.lock();
        inner.check("watch", prefix)?;
        let (tx, rx) = mpsc::unbounded_channel();
        if from != 0 && from < inner.compacted {
            let _ = tx.send(WatchMessage::Lost {
                reason: format!(
                    "compacted: revision {from} was compacted (compaction revision {})",
                    inner.compacted
                ),
            });
            return Ok(rx);
        }
        let next = if from == 0 { inner.revision + 1 } else { from };
        inner.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            next,
            tx,
        });
        inner.pump();
        Ok(rx)
    }
}

impl KvStore for MemKv {
    fn endpoints(&self) -> Vec<String> {
        vec!["memory://".to_owned()]
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            self.get_now(key)
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Snapshot, StoreError>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            self.list_now(prefix)
        })
    }

    fn txn<'a>(
        &'a self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> BoxFuture<'a, Result<TxnOutcome, StoreError>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            self.txn_now(compares, success, failure)
        })
    }

    fn grant_lease<'a>(&'a self, ttl: Duration) -> BoxFuture<'a, Result<LeaseId, StoreError>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            let id = self.grant_now(ttl)?;
            self.reap_at_deadline(id);
            Ok(id)
        })
    }

    fn keep_alive<'a>(&'a self, lease: LeaseId) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            self.keep_alive_now(lease)
        })
    }

    fn revoke<'a>(&'a self, lease: LeaseId) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            self.revoke_now(lease)
        })
    }

    fn watch<'a>(
        &'a self,
        prefix: &'a str,
        from: Revision,
    ) -> BoxFuture<'a, Result<mpsc::Receiver<WatchMessage>, StoreError>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            let mut queue = self.watch_now(prefix, from)?;
            let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
            tokio::spawn(async move {
                loop {
                    let msg = tokio::select! {
                        _ = tx.closed() => break,
                        msg = queue.recv() => msg,
                    };
                    let Some(msg) = msg else { break };
                    if tx.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            Ok(rx)
        })
    }
}

#[cfg(test)]
#[path = "fake_tests.rs"]
mod tests;
