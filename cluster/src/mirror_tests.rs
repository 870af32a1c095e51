use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Delta, Mirror, SyncState, Update, run};
use crate::fake::MemKv;
use crate::store::{KeyValue, KvStore, Op, Snapshot, WatchEvent, put};

fn kv(key: &str, value: &str, rev: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.into(),
        create_revision: rev,
        mod_revision: rev,
        lease: 0,
    }
}

fn up(key: &str, value: &str) -> Delta {
    Delta::Upsert {
        key: key.into(),
        value: value.into(),
    }
}

fn rm(key: &str) -> Delta {
    Delta::Remove { key: key.into() }
}

#[test]
fn resync_reports_only_the_difference() {
    let mut m = Mirror::default();
    let first = m.resync(Snapshot {
        kvs: vec![kv("/a", "1", 2), kv("/b", "1", 3), kv("/c", "1", 4)],
        revision: 4,
    });
    assert_eq!(first, [up("/a", "1"), up("/b", "1"), up("/c", "1")]);
    let second = m.resync(Snapshot {
        // /a unchanged, /b rewritten with its value (no change), /c gone, /b0 and /d new:
        // the deltas come in key order.
        kvs: vec![
            kv("/a", "1", 2),
            kv("/b", "1", 9),
            kv("/b0", "x", 8),
            kv("/d", "2", 7),
        ],
        revision: 9,
    });
    assert_eq!(second, [up("/b0", "x"), rm("/c"), up("/d", "2")]);
    assert_eq!(m.revision(), 9);
    assert_eq!(m.len(), 4);
    assert_eq!(m.get("/b0"), Some(&b"x"[..]));
}

#[test]
fn apply_skips_what_the_mirror_has() {
    let mut m = Mirror::default();
    m.resync(Snapshot {
        kvs: vec![kv("/a", "1", 2), kv("/b", "1", 5)],
        revision: 5,
    });
    let deltas = m.apply(
        vec![
            // At or below the mirror's revision: already in.
            WatchEvent::Put(kv("/old", "1", 5)),
            WatchEvent::Delete {
                key: "/a".into(),
                mod_revision: 4,
            },
            // New.
            WatchEvent::Put(kv("/c", "1", 6)),
            WatchEvent::Put(kv("/b", "1", 6)),
            WatchEvent::Delete {
                key: "/a".into(),
                mod_revision: 7,
            },
            WatchEvent::Delete {
                key: "/never".into(),
                mod_revision: 7,
            },
        ],
        7,
    );
    assert_eq!(deltas, [up("/c", "1"), rm("/a")]);
    assert_eq!(m.revision(), 7);
    assert!(m.get("/old").is_none());
}

struct Running {
    store: MemKv,
    rx: mpsc::Receiver<Update>,
    state: Arc<Mutex<SyncState>>,
    task: tokio::task::JoinHandle<()>,
}

fn start(store: &MemKv, prefix: &str) -> Running {
    let (tx, rx) = mpsc::channel(16);
    let state = Arc::new(Mutex::new(SyncState::default()));
    let task = tokio::spawn(run(
        Arc::new(store.clone()),
        prefix.to_owned(),
        tx,
        state.clone(),
    ));
    Running {
        store: store.clone(),
        rx,
        state,
        task,
    }
}

impl Running {
    async fn next(&mut self) -> Update {
        tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
            .await
            .expect("an update within 5 s")
            .expect("the mirror runs")
    }

    fn state(&self) -> SyncState {
        self.state.lock().unwrap().clone()
    }

    async fn wait_state(&self, what: &str, cond: impl Fn(&SyncState) -> bool) -> SyncState {
        for _ in 0..500 {
            let s = self.state();
            if cond(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: sync state stayed {:?}", self.state());
    }

    /// No update arrives for a while.
    async fn quiet(&mut self) {
        let got = tokio::time::timeout(Duration::from_millis(300), self.rx.recv()).await;
        assert!(got.is_err(), "unexpected update {got:?}");
    }
}

#[tokio::test]
async fn an_empty_store_still_sends_a_resync() {
    let store = MemKv::new();
    let mut m = start(&store, "/p/");
    let u = m.next().await;
    assert!(u.resync);
    assert!(u.deltas.is_empty());
    assert_eq!(u.revision, store.revision());
    let s = m.state();
    assert!(s.connected);
    assert_eq!(s.resyncs, 1);
    assert!(s.last_sync_ms.is_some());
}

#[tokio::test]
async fn lists_then_follows_live_events() {
    let store = MemKv::new();
    put(&store, "/p/a", b"1".to_vec()).await.unwrap();
    put(&store, "/q/a", b"1".to_vec()).await.unwrap();
    let mut m = start(&store, "/p/");
    let u = m.next().await;
    assert!(u.resync);
    assert_eq!(u.deltas, [up("/p/a", "1")]);

    store
        .txn(
            vec![],
            vec![
                Op::put("/p/b", "2"),
                Op::put("/p/c", "3"),
                Op::put("/q/b", "1"),
            ],
            vec![],
        )
        .await
        .unwrap();
    let u = m.next().await;
    assert!(!u.resync);
    assert_eq!(u.deltas, [up("/p/b", "2"), up("/p/c", "3")]);
    assert_eq!(u.revision, store.revision());
    store
        .txn(vec![], vec![Op::DeletePrefix("/p/".into())], vec![])
        .await
        .unwrap();
    let u = m.next().await;
    assert_eq!(u.deltas, [rm("/p/a"), rm("/p/b"), rm("/p/c")]);
    m.wait_state("revision followed", |s| s.revision == store.revision())
        .await;
    assert_eq!(m.state().resyncs, 1);
}

/// Changes made while the mirror's watch is stalled, then a lost watch: the resync reports
/// exactly what changed, nothing for what did not.
async fn lost_watch_reports_exactly_the_difference(lose: impl FnOnce(&MemKv)) {
    let store = MemKv::new();
    for k in ["/p/same", "/p/changed", "/p/deleted"] {
        put(&store, k, b"1".to_vec()).await.unwrap();
    }
    let mut m = start(&store, "/p/");
    assert_eq!(m.next().await.deltas.len(), 3);
    store.hold_watches(true);
    put(&store, "/p/changed", b"2".to_vec()).await.unwrap();
    put(&store, "/p/added", b"1".to_vec()).await.unwrap();
    store
        .txn(vec![], vec![Op::Delete("/p/deleted".into())], vec![])
        .await
        .unwrap();
    put(&store, "/p/same", b"1".to_vec()).await.unwrap(); // same value again
    lose(&store);
    store.hold_watches(false);
    let u = m.next().await;
    assert!(u.resync, "{u:?}");
    assert_eq!(
        u.deltas,
        [up("/p/added", "1"), up("/p/changed", "2"), rm("/p/deleted")]
    );
    assert_eq!(u.revision, store.revision());
    let s = m
        .wait_state("reconnected", |s| s.connected && s.resyncs == 2)
        .await;
    assert_eq!(s.error, None);
    // And it follows live events again.
    put(&m.store, "/p/after", b"1".to_vec()).await.unwrap();
    assert_eq!(m.next().await.deltas, [up("/p/after", "1")]);
}

#[tokio::test]
async fn a_store_restart_resyncs_by_difference() {
    lost_watch_reports_exactly_the_difference(|s| s.restart()).await;
}

#[tokio::test]
async fn a_compaction_resyncs_by_difference() {
    lost_watch_reports_exactly_the_difference(|s| s.compact(s.revision())).await;
}

#[tokio::test]
async fn an_outage_disconnects_backs_off_and_comes_back() {
    let store = MemKv::new();
    put(&store, "/p/a", b"1".to_vec()).await.unwrap();
    let mut m = start(&store, "/p/");
    m.next().await;
    store.set_reachable(false);
    let s = m.wait_state("disconnected", |s| !s.connected).await;
    let error = s.error.expect("an error while disconnected");
    assert!(error.contains("lost"), "{error}");
    let calls = store.calls();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let during = store.calls() - calls;
    // 100 + 200 + 400 + 800 ms: at most five attempts in 1.6 s (one list each).
    assert!(
        (2..=6).contains(&during),
        "{during} calls during a 1.6 s outage"
    );
    let s = m.state();
    assert!(!s.connected);
    assert!(
        s.error.as_deref().unwrap_or("").contains("unreachable"),
        "{s:?}"
    );
    m.quiet().await;
    store.set_reachable(true);
    let u = m.next().await;
    assert!(u.resync);
    assert!(u.deltas.is_empty(), "nothing changed: {u:?}");
    let s = m.wait_state("reconnected", |s| s.connected).await;
    assert_eq!(s.error, None);
}

#[tokio::test]
async fn ends_when_the_consumer_goes() {
    let store = MemKv::new();
    let mut m = start(&store, "/p/");
    m.next().await;
    drop(m.rx);
    tokio::time::timeout(Duration::from_secs(5), m.task)
        .await
        .expect("the mirror ends")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    put(&store, "/p/a", b"1".to_vec()).await.unwrap();
    assert_eq!(store.watch_count(), 0, "its watch went with it");
}

#[tokio::test]
async fn the_trait_object_is_what_runs() {
    // The mirror takes any store: an Arc<dyn KvStore> built from the fake.
    let store = MemKv::new();
    let dynamic: Arc<dyn KvStore> = Arc::new(store.clone());
    let (tx, mut rx) = mpsc::channel(4);
    let state = Arc::new(Mutex::new(SyncState::default()));
    let task = tokio::spawn(run(dynamic, "/".into(), tx, state));
    assert!(rx.recv().await.unwrap().resync);
    task.abort();
}
