//! A local copy of the keys under a prefix, kept by list and watch. When a watch is lost
//! (compaction, store restart, outage), the mirror lists again and reports only the
//! difference: keys that changed or appeared as upserts, keys no longer there as
//! removals (mark and sweep), so that a consumer never sees a valid entry vanish and come
//! back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::{KvStore, Revision, Snapshot, WatchEvent, WatchMessage};

/// One change to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    Upsert { key: String, value: Vec<u8> },
    Remove { key: String },
}

impl Delta {
    pub fn key(&self) -> &str {
        match self {
            Delta::Upsert { key, .. } | Delta::Remove { key } => key,
        }
    }
}

/// A batch of changes, in store order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub deltas: Vec<Delta>,
    /// The store revision the mirror has reached with this batch.
    pub revision: Revision,
    /// The batch comes from a fresh list (the first, or after a lost watch).
    pub resync: bool,
}

/// The mirror itself: pure, no I/O.
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    entries: BTreeMap<String, (Vec<u8>, Revision)>,
    revision: Revision,
}

impl Mirror {
    /// Reconciles with a full list: the deltas that bring a consumer from the mirror's
    /// old content to the snapshot's (mark and sweep): a key new or with another value is
    /// an upsert, a key no longer listed a removal, an unchanged key nothing. In key
    /// order.
    pub fn resync(&mut self, snapshot: Snapshot) -> Vec<Delta> {
        let mut fresh = BTreeMap::new();
        let mut deltas = Vec::new();
        for kv in snapshot.kvs {
            if self.entries.get(&kv.key).map(|(v, _)| v) != Some(&kv.value) {
                deltas.push(Delta::Upsert {
                    key: kv.key.clone(),
                    value: kv.value.clone(),
                });
            }
            fresh.insert(kv.key, (kv.value, kv.mod_revision));
        }
        for key in self.entries.keys() {
            if !fresh.contains_key(key) {
                deltas.push(Delta::Remove { key: key.clone() });
            }
        }
        deltas.sort_by(|a, b| a.key().cmp(b.key()));
        self.entries = fresh;
        self.revision = snapshot.revision;
        deltas
    }

    /// Applies watched events (those at or below the mirror's revision are skipped: the
    /// mirror has them already), in order; a put of the value the mirror holds and a
    /// delete of a key it does not hold report nothing.
    pub fn apply(&mut self, events: Vec<WatchEvent>, revision: Revision) -> Vec<Delta> {
        let mut deltas = Vec::new();
        for event in events {
            match event {
                WatchEvent::Put(kv) => {
                    if kv.mod_revision <= self.revision {
                        continue;
                    }
                    let old = self
                        .entries
                        .insert(kv.key.clone(), (kv.value.clone(), kv.mod_revision));
                    if old.map(|(v, _)| v).as_ref() != Some(&kv.value) {
                        deltas.push(Delta::Upsert {
                            key: kv.key,
                            value: kv.value,
                        });
                    }
                }
                WatchEvent::Delete { key, mod_revision } => {
                    if mod_revision <= self.revision {
                        continue;
                    }
                    if self.entries.remove(&key).is_some() {
                        deltas.push(Delta::Remove { key });
                    }
                }
            }
        }
        self.revision = self.revision.max(revision);
        deltas
    }

    /// Every key and value held, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries
            .iter()
            .map(|(k, (v, _))| (k.as_str(), v.as_slice()))
    }

    pub fn revision(&self) -> Revision {
        self.revision
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key).map(|(v, _)| v.as_slice())
    }
}

/// How the mirror's connection is, for `hypha status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncState {
    pub connected: bool,
    pub revision: Revision,
    /// Unix milliseconds of the last completed list (the last full sync).
    pub last_sync_ms: Option<u64>,
    /// The last error, while disconnected.
    pub error: Option<String>,
    /// Full lists so far (1 + lost watches).
    pub resyncs: u64,
}

/// The first wait after a failure.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Keeps a mirror of `prefix` and sends each batch of deltas to `out`: lists, watches
/// from the list's revision + 1, and on a lost watch or an error lists again, with
/// backoff (100 ms doubling to 5 s) while the store is unreachable. Ends when `out` is
/// closed.
///
/// The first batch after each list has `resync: true`, even when empty (a consumer takes
/// it as "synced"); what a watch reports together goes in one batch.
pub async fn run(
    store: Arc<dyn KvStore>,
    prefix: String,
    out: mpsc::Sender<Update>,
    state: Arc<Mutex<SyncState>>,
) {
    let mut mirror = Mirror::default();
    let mut backoff = BACKOFF_FIRST;
    loop {
        let reason = match round(store.as_ref(), &prefix, &out, &state, &mut mirror).await {
            RoundEnd::OutClosed => return,
            RoundEnd::Synced(reason) => {
                // The list and the watch worked: the next failure starts the backoff over.
                backoff = BACKOFF_FIRST;
                reason
            }
            RoundEnd::Failed(reason) => reason,
        };
        tracing::warn!(prefix, error = %reason, retry_in_ms = backoff.as_millis() as u64, "cluster store mirror lost");
        {
            let mut s = lock(&state);
            s.connected = false;
            s.error = Some(reason);
        }
        tokio::select! {
            _ = out.closed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

enum RoundEnd {
    /// The consumer is gone.
    OutClosed,
    /// Listed and watched, then lost the watch.
    Synced(String),
    /// The list or the watch failed.
    Failed(String),
}

fn lock(state: &Mutex<SyncState>) -> std::sync::MutexGuard<'_, SyncState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// One list, then the watch until it is lost.
async fn round(
    store: &dyn KvStore,
    prefix: &str,
    out: &mpsc::Sender<Update>,
    state: &Mutex<SyncState>,
    mirror: &mut Mirror,
) -> RoundEnd {
    let snapshot = match store.list(prefix).await {
        Ok(s) => s,
        Err(e) => return RoundEnd::Failed(e.to_string()),
    };
    let revision = snapshot.revision;
    let mut watch = match store.watch(prefix, revision + 1).await {
        Ok(w) => w,
        Err(e) => return RoundEnd::Failed(e.to_string()),
    };
    let deltas = mirror.resync(snapshot);
    {
        let mut s = lock(state);
        s.connected = true;
        s.error = None;
        s.revision = revision;
        s.last_sync_ms = Some(crate::layout::now_ms());
        s.resyncs += 1;
    }
    let update = Update {
        deltas,
        revision,
        resync: true,
    };
    if out.send(update).await.is_err() {
        return RoundEnd::OutClosed;
    }
    loop {
        let first = tokio::select! {
            _ = out.closed() => return RoundEnd::OutClosed,
            msg = watch.recv() => msg,
        };
        let mut lost = None;
        let mut deltas = Vec::new();
        let mut next = first;
        // Everything that arrived together goes in one batch.
        loop {
            match next {
                None => {
                    lost = Some("the watch ended".to_owned());
                    break;
                }
                Some(WatchMessage::Lost { reason }) => {
                    lost = Some(format!("watch of {prefix} lost: {reason}"));
                    break;
                }
                Some(WatchMessage::Events { events, revision }) => {
                    deltas.extend(mirror.apply(events, revision));
                }
            }
            match watch.try_recv() {
                Ok(msg) => next = Some(msg),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => next = None,
            }
        }
        lock(state).revision = mirror.revision();
        if !deltas.is_empty() {
            let update = Update {
                deltas,
                revision: mirror.revision(),
                resync: false,
            };
            if out.send(update).await.is_err() {
                return RoundEnd::OutClosed;
            }
        }
        if let Some(reason) = lost {
            return RoundEnd::Synced(reason);
        }
    }
}

#[cfg(test)]
#[path = "mirror_tests.rs"]
mod tests;
