//! The store conformance suite: what the control plane relies on from a [`KvStore`],
//! checked against a real etcd (one per test, on a free loopback port, through
//! [`hypha_cluster::testing::Etcd`]) and against the in-memory fake, so that the fake
//! behaves like etcd where the logic above depends on it.
//!
//! Each check is a function over `&dyn KvStore` (plus, for faults, a [`Backend`] that
//! can compact, restart and cut the store off); the `etcd_*` and `mem_*` tests run it on
//! each backend. etcd is not optional: a test fails when it cannot start it.

use std::time::{Duration, Instant};

use hypha_cluster::etcd::{EtcdKv, Tls};
use hypha_cluster::fake::MemKv;
use hypha_cluster::store::put;
use hypha_cluster::testing::Etcd;
use hypha_cluster::{Compare, KvStore, Op, StoreError, WatchEvent, WatchMessage};
use tokio::sync::mpsc;

/// How long a watch may take to deliver what the test expects.
const WATCH_WAIT: Duration = Duration::from_secs(10);

/// The faults a backend can be put through.
trait Backend {
    fn store(&self) -> &dyn KvStore;
    /// Drops the history below `revision`.
    async fn compact(&self, revision: i64);
    /// Restarts the store with its data.
    fn restart(&mut self);
}

struct RealEtcd {
    etcd: Etcd,
    store: EtcdKv,
}

impl RealEtcd {
    async fn start() -> RealEtcd {
        let etcd = tokio::task::block_in_place(|| {
            Etcd::start(None, "127.0.0.1".parse().unwrap()).expect("start etcd")
        });
        let store = etcd.client().await.expect("etcd client");
        RealEtcd { etcd, store }
    }
}

impl Backend for RealEtcd {
    fn store(&self) -> &dyn KvStore {
        &self.store
    }
    async fn compact(&self, revision: i64) {
        self.store.compact(revision).await.expect("compact");
    }
    fn restart(&mut self) {
        tokio::task::block_in_place(|| self.etcd.restart()).expect("restart etcd");
    }
}

async fn put_str(store: &dyn KvStore, key: &str, value: &str) -> i64 {
    put(store, key, value.as_bytes().to_vec())
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"))
}

/// The next watch message, or a panic after [`WATCH_WAIT`].
async fn next(rx: &mut mpsc::Receiver<WatchMessage>) -> WatchMessage {
    match tokio::time::timeout(WATCH_WAIT, rx.recv()).await {
        Ok(Some(message)) => message,
        Ok(None) => panic!("the watch ended without a Lost"),
        Err(_) => panic!("no watch message within {WATCH_WAIT:?}"),
    }
}

/// Watch events until `count` have arrived (progress notifications skipped).
async fn events(rx: &mut mpsc::Receiver<WatchMessage>, count: usize) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    while out.len() < count {
        match next(rx).await {
            WatchMessage::Events { events, revision } => {
                for e in &events {
                    let rev = match e {
                        WatchEvent::Put(kv) => kv.mod_revision,
                        WatchEvent::Delete { mod_revision, .. } => *mod_revision,
                    };
                    assert!(
                        rev <= revision,
                        "event at {rev} in a batch of revision {revision}"
                    );
                }
                out.extend(events);
            }
            WatchMessage::Lost { reason } => panic!("watch lost: {reason}"),
        }
    }
    out
}

/// Waits for the watch's Lost (events before it are allowed); returns its reason.
async fn lost(rx: &mut mpsc::Receiver<WatchMessage>) -> String {
    loop {
        if let WatchMessage::Lost { reason } = next(rx).await {
            return reason;
        }
    }
}

fn keys(events: &[WatchEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            WatchEvent::Put(kv) => format!("put {}={}", kv.key, String::from_utf8_lossy(&kv.value)),
            WatchEvent::Delete { key, .. } => format!("delete {key}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The checks, over any store.

async fn check_get_list(store: &dyn KvStore) {
    assert_eq!(store.get("/t/a/1").await.unwrap(), None, "empty store");
    let r1 = put_str(store, "/t/a/1", "one").await;
    let r2 = put_str(store, "/t/a/2", "two").await;
    put_str(store, "/t/ab", "not under /t/a/").await;
    assert!(r2 > r1, "every write raises the revision");

    let kv = store.get("/t/a/1").await.unwrap().expect("/t/a/1");
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"one"[..], r1, r1)
    );
    assert_eq!(kv.lease, 0);

    // A second write keeps the create revision and moves the mod revision.
    let r3 = put_str(store, "/t/a/1", "uno").await;
    let kv = store.get("/t/a/1").await.unwrap().expect("/t/a/1");
    assert_eq!((kv.create_revision, kv.mod_revision), (r1, r3));

    let snap = store.list("/t/a/").await.unwrap();
    let listed: Vec<_> = snap
        .kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
        .collect();
    assert_eq!(listed, [("/t/a/1", &b"uno"[..]), ("/t/a/2", &b"two"[..])]);
    assert_eq!(snap.revision, r3, "the list's revision is the store's");
    assert!(store.list("/t/none/").await.unwrap().kvs.is_empty());
}

async fn check_txn_compares(store: &dyn KvStore) {
    let (k, other) = ("/t/k", "/t/other");
    // Absent holds: success ops run.
    let out = store
        .txn(
            vec![Compare::Absent(k.into())],
            vec![Op::put(k, "v1")],
            vec![Op::put(other, "failed")],
        )
        .await
        .unwrap();
    assert!(out.succeeded);
    let created = store.get(k).await.unwrap().expect("k");
    assert_eq!(created.mod_revision, out.revision);
    // Absent fails now: failure ops run, success ops do not.
    let out = store
        .txn(
            vec![Compare::Absent(k.into())],
            vec![Op::put(k, "v2")],
            vec![Op::put(other, "failed")],
        )
        .await
        .unwrap();
    assert!(!out.succeeded);
    assert_eq!(store.get(k).await.unwrap().unwrap().value, b"v1");
    assert_eq!(store.get(other).await.unwrap().unwrap().value, b"failed");

    // ModRevision: only the current one holds.
    let stale = store
        .txn(
            vec![Compare::ModRevision(k.into(), created.mod_revision - 1)],
            vec![Op::put(k, "stale")],
            vec![],
        )
        .await
        .unwrap();
    assert!(!stale.succeeded);
    let fresh = store
        .txn(
            vec![Compare::ModRevision(k.into(), created.mod_revision)],
            vec![Op::put(k, "v3")],
            vec![],
        )
        .await
        .unwrap();
    assert!(fresh.succeeded);
    assert_eq!(store.get(k).await.unwrap().unwrap().value, b"v3");
    // ModRevision of a missing key does not hold.
    let missing = store
        .txn(
            vec![Compare::ModRevision(
                "/t/missing".into(),
                created.mod_revision,
            )],
            vec![Op::put(k, "x")],
            vec![],
        )
        .await
        .unwrap();
    assert!(!missing.succeeded);

    // Value.
    let wrong = store
        .txn(
            vec![Compare::Value(k.into(), b"v1".to_vec())],
            vec![Op::put(k, "wrong")],
            vec![],
        )
        .await
        .unwrap();
    assert!(!wrong.succeeded);
    let right = store
        .txn(
            vec![Compare::Value(k.into(), b"v3".to_vec())],
            vec![Op::put(k, "v4")],
            vec![],
        )
        .await
        .unwrap();
    assert!(right.succeeded);

    // Several compares: all must hold; several writes: all or none.
    let out = store
        .txn(
            vec![
                Compare::Value(k.into(), b"v4".to_vec()),
                Compare::Absent("/t/n1".into()),
            ],
            vec![
                Op::put("/t/n1", "a"),
                Op::put("/t/n2", "b"),
                Op::Delete(other.into()),
            ],
            vec![],
        )
        .await
        .unwrap();
    assert!(out.succeeded);
    assert!(store.get(other).await.unwrap().is_none());
    let n1 = store.get("/t/n1").await.unwrap().unwrap();
    let n2 = store.get("/t/n2").await.unwrap().unwrap();
    assert_eq!(
        (n1.mod_revision, n2.mod_revision),
        (out.revision, out.revision),
        "one revision for one txn"
    );

    // A failed txn without failure ops changes nothing (not even the revision).
    let before = store.list("/t/").await.unwrap().revision;
    let out = store
        .txn(
            vec![Compare::Absent(k.into())],
            vec![Op::put(k, "no")],
            vec![],
        )
        .await
        .unwrap();
    assert!(!out.succeeded);
    assert_eq!(out.revision, before);

    // The same key written twice in one txn is refused (etcd: "duplicate key given in txn
    // request"), so no caller may rely on the last write winning.
    let dup = store
        .txn(
            vec![],
            vec![Op::put("/t/dup", "1"), Op::put("/t/dup", "2")],
            vec![],
        )
        .await;
    assert!(matches!(dup, Err(StoreError::Failed { .. })), "{dup:?}");
}

async fn check_delete_prefix(store: &dyn KvStore) {
    for key in ["/t/d/1", "/t/d/2/x", "/t/d2", "/t/e"] {
        put_str(store, key, "v").await;
    }
    let out = store
        .txn(vec![], vec![Op::DeletePrefix("/t/d/".into())], vec![])
        .await
        .unwrap();
    assert!(out.succeeded);
    let left: Vec<_> = store
        .list("/t/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(left, ["/t/d2", "/t/e"]);
    store
        .txn(vec![], vec![Op::Delete("/t/e".into())], vec![])
        .await
        .unwrap();
    assert!(store.get("/t/e").await.unwrap().is_none());
    // Deleting what is not there is no error.
    store
        .txn(vec![], vec![Op::Delete("/t/e".into())], vec![])
        .await
        .unwrap();
}

async fn check_leases(store: &dyn KvStore) {
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    assert_ne!(lease, 0);
    store
        .txn(
            vec![],
            vec![
                Op::Put {
                    key: "/t/l/1".into(),
                    value: b"a".to_vec(),
                    lease: Some(lease),
                },
                Op::Put {
                    key: "/t/l/2".into(),
                    value: b"b".to_vec(),
                    lease: Some(lease),
                },
            ],
            vec![],
        )
        .await
        .unwrap();
    put_str(store, "/t/l/kept", "no lease").await;
    assert_eq!(store.get("/t/l/1").await.unwrap().unwrap().lease, lease);
    store.keep_alive(lease).await.unwrap();

    store.revoke(lease).await.unwrap();
    let left: Vec<_> = store
        .list("/t/l/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(left, ["/t/l/kept"], "the lease's keys went with it");

    let gone = store.keep_alive(lease).await;
    assert!(
        matches!(gone, Err(StoreError::LeaseGone { lease: l, .. }) if l == lease),
        "{gone:?}"
    );
    let gone = store.revoke(lease).await;
    assert!(
        matches!(gone, Err(StoreError::LeaseGone { .. })),
        "{gone:?}"
    );
    let gone = store
        .txn(
            vec![],
            vec![Op::Put {
                key: "/t/l/3".into(),
                value: b"c".to_vec(),
                lease: Some(lease),
            }],
            vec![],
        )
        .await;
    assert!(
        matches!(gone, Err(StoreError::LeaseGone { .. })),
        "{gone:?}"
    );
}

/// A lease that is not refreshed expires by itself, its keys deleted (seen by a watch).
async fn check_lease_expiry(store: &dyn KvStore) {
    let lease = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    store
        .txn(
            vec![],
            vec![Op::Put {
                key: "/t/x/1".into(),
                value: b"a".to_vec(),
                lease: Some(lease),
            }],
            vec![],
        )
        .await
        .unwrap();
    let mut rx = store.watch("/t/x/", 0).await.unwrap();
    let started = Instant::now();
    // Nothing else touches the store meanwhile: the expiry must come by itself.
    let got = loop {
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Some(WatchMessage::Events { events, .. })) if !events.is_empty() => break events,
            Ok(Some(WatchMessage::Lost { reason })) => panic!("lost: {reason}"),
            Ok(None) => panic!("watch ended"),
            _ => assert!(started.elapsed() < WATCH_WAIT, "the lease never expired"),
        }
    };
    assert_eq!(keys(&got), ["delete /t/x/1"]);
    // etcd's lease TTL has a floor of a few seconds (its election timeout).
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseGone { .. })
    ));
}

async fn check_watch_from_past(store: &dyn KvStore) {
    let r1 = put_str(store, "/t/w/1", "a").await;
    put_str(store, "/t/w/2", "b").await;
    put_str(store, "/t/outside", "not watched").await;
    store
        .txn(vec![], vec![Op::Delete("/t/w/1".into())], vec![])
        .await
        .unwrap();

    // From r1: the history replayed, in order, with its revisions.
    let mut rx = store.watch("/t/w/", r1).await.unwrap();
    let past = events(&mut rx, 3).await;
    assert_eq!(
        keys(&past),
        ["put /t/w/1=a", "put /t/w/2=b", "delete /t/w/1"]
    );
    let WatchEvent::Put(first) = &past[0] else {
        unreachable!()
    };
    assert_eq!((first.create_revision, first.mod_revision), (r1, r1));
    let WatchEvent::Delete { mod_revision, .. } = &past[2] else {
        unreachable!()
    };
    assert_eq!(*mod_revision, r1 + 3, "a delete carries its own revision");

    // Then what happens now.
    let r5 = put_str(store, "/t/w/3", "c").await;
    let live = events(&mut rx, 1).await;
    let WatchEvent::Put(kv) = &live[0] else {
        panic!("{live:?}")
    };
    assert_eq!((kv.key.as_str(), kv.mod_revision), ("/t/w/3", r5));

    // From 0: only what happens after.
    let mut now = store.watch("/t/w/", 0).await.unwrap();
    // etcd registers the watch asynchronously: write until it shows.
    let mut n = 0;
    let seen = loop {
        n += 1;
        put_str(store, "/t/w/4", &n.to_string()).await;
        match tokio::time::timeout(Duration::from_millis(200), now.recv()).await {
            Ok(Some(WatchMessage::Events { events, .. })) if !events.is_empty() => break events,
            Ok(Some(WatchMessage::Lost { reason })) => panic!("lost: {reason}"),
            Ok(None) => panic!("watch ended"),
            _ => assert!(n < 50, "the watch from now never saw a write"),
        }
    };
    assert!(
        keys(&seen).iter().all(|k| k.starts_with("put /t/w/4=")),
        "{seen:?}"
    );

    // Dropping the receiver is fine (the watch ends quietly).
    drop(rx);
    put_str(store, "/t/w/5", "e").await;
}

/// A watch from far back (etcd catches a watcher up 1,000 revisions a response, each
/// response's header carrying the store's current revision): the revision a batch reports
/// must not be ahead of events still to come, or a consumer that skips what is at or
/// below the revision it reached (the mirror) would drop them.
async fn check_watch_long_history(store: &dyn KvStore) {
    const WRITES: usize = 1300;
    let first = put_str(store, "/t/h/0000", "v").await;
    for chunk in (1..WRITES).collect::<Vec<_>>().chunks(50) {
        let writes = chunk.iter().map(|i| {
            let key = format!("/t/h/{i:04}");
            async move { put_str(store, &key, "v").await }
        });
        futures_util::future::join_all(writes).await;
    }
    let mut rx = store.watch("/t/h/", first).await.unwrap();
    let mut reached = 0;
    let mut seen = 0;
    while seen < WRITES {
        match next(&mut rx).await {
            WatchMessage::Events { events, revision } => {
                for e in &events {
                    let WatchEvent::Put(kv) = e else {
                        panic!("{e:?}")
                    };
                    assert!(
                        kv.mod_revision > reached,
                        "event at {} after a batch that reported revision {reached}",
                        kv.mod_revision
                    );
                    assert!(kv.mod_revision <= revision);
                }
                seen += events.len();
                reached = reached.max(revision);
            }
            WatchMessage::Lost { reason } => panic!("lost: {reason}"),
        }
    }
    assert_eq!(seen, WRITES);
}

async fn check_watch_compacted(backend: &impl Backend) {
    let store = backend.store();
    let r1 = put_str(store, "/t/c/1", "a").await;
    put_str(store, "/t/c/2", "b").await;
    let r3 = put_str(store, "/t/c/3", "c").await;
    backend.compact(r3).await;
    let mut rx = store.watch("/t/c/", r1).await.unwrap();
    let reason = lost(&mut rx).await;
    assert!(reason.contains("compact"), "{reason}");
    assert!(rx.recv().await.is_none(), "the receiver ends after Lost");
    // From the compaction revision on, watching works.
    let mut rx = store.watch("/t/c/", r3).await.unwrap();
    assert_eq!(keys(&events(&mut rx, 1).await), ["put /t/c/3=c"]);
    // The data is all there.
    assert_eq!(store.list("/t/c/").await.unwrap().kvs.len(), 3);
}

async fn check_restart(backend: &mut impl Backend) {
    let r1 = put_str(backend.store(), "/t/r/1", "a").await;
    let mut rx = backend.store().watch("/t/r/", r1).await.unwrap();
    assert_eq!(keys(&events(&mut rx, 1).await), ["put /t/r/1=a"]);
    backend.restart();
    let reason = lost(&mut rx).await;
    assert!(!reason.is_empty());
    assert!(rx.recv().await.is_none(), "the receiver ends after Lost");
    // The same client works again, with the data kept.
    let snap = backend
        .store()
        .list("/t/r/")
        .await
        .expect("list after restart");
    assert_eq!(snap.kvs.len(), 1);
    assert!(snap.revision >= r1);
    let mut rx = backend
        .store()
        .watch("/t/r/", snap.revision + 1)
        .await
        .unwrap();
    put_str(backend.store(), "/t/r/2", "b").await;
    assert_eq!(keys(&events(&mut rx, 1).await), ["put /t/r/2=b"]);
}

// ---------------------------------------------------------------------------------------
// Against etcd.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_get_list() {
    check_get_list(RealEtcd::start().await.store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_txn_compares() {
    check_txn_compares(RealEtcd::start().await.store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_delete_prefix() {
    check_delete_prefix(RealEtcd::start().await.store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leases() {
    let backend = RealEtcd::start().await;
    check_leases(backend.store()).await;
    check_lease_expiry(backend.store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_from_past() {
    check_watch_from_past(RealEtcd::start().await.store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_long_history() {
    check_watch_long_history(RealEtcd::start().await.store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_compacted() {
    check_watch_compacted(&RealEtcd::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart() {
    check_restart(&mut RealEtcd::start().await).await;
}

/// etcd killed: calls fail `Unavailable` within the request bound, a watch is lost; once
/// it is back (same data, same URL), the same client works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_is_unavailable_quickly() {
    let mut backend = RealEtcd::start().await;
    put_str(&backend.store, "/t/u/1", "a").await;
    let mut rx = backend.store.watch("/t/u/", 0).await.unwrap();
    tokio::task::block_in_place(|| backend.etcd.kill()).unwrap();

    let reason = lost(&mut rx).await;
    assert!(!reason.is_empty());
    for _ in 0..2 {
        let started = Instant::now();
        let err = backend.store.get("/t/u/1").await.expect_err("etcd is down");
        let took = started.elapsed();
        assert!(err.is_unavailable(), "{err}");
        assert!(
            err.to_string().contains("/t/u/1"),
            "the error names the key: {err}"
        );
        assert!(took < Duration::from_secs(6), "took {took:?}");
    }
    let started = Instant::now();
    let err = put(&backend.store, "/t/u/2", b"b".to_vec())
        .await
        .expect_err("etcd is down");
    assert!(
        err.is_unavailable() && started.elapsed() < Duration::from_secs(6),
        "{err} after {:?}",
        started.elapsed()
    );
    let err = backend
        .store
        .watch("/t/u/", 0)
        .await
        .expect_err("etcd is down");
    assert!(err.is_unavailable(), "{err}");

    tokio::task::block_in_place(|| backend.etcd.restart()).unwrap();
    let kv = backend
        .store
        .get("/t/u/1")
        .await
        .expect("get after etcd is back");
    assert_eq!(kv.unwrap().value, b"a");
}

/// etcd frozen (SIGSTOP: the connection stays open, nothing answers, as when the network
/// drops packets): a quiet watch notices within seconds, calls time out `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_frozen_loses_the_watch() {
    let backend = RealEtcd::start().await;
    let mut rx = backend.store.watch("/t/f/", 0).await.unwrap();
    // Let the watch settle, then freeze etcd.
    tokio::time::sleep(Duration::from_millis(300)).await;
    backend.etcd.pause().unwrap();
    let started = Instant::now();
    let reason = lost(&mut rx).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "the watch noticed after {took:?}: {reason}"
    );
    let started = Instant::now();
    let err = backend
        .store
        .get("/t/f/1")
        .await
        .expect_err("etcd is frozen");
    assert!(err.is_unavailable(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    backend.etcd.resume().unwrap();
    backend
        .store
        .get("/t/f/1")
        .await
        .expect("get after etcd thawed");
}

/// A list larger than gRPC's default 4 MB message still arrives (a big cluster's prefix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_large_list() {
    let backend = RealEtcd::start().await;
    let value = vec![b'x'; 1000];
    for batch in 0..60 {
        let ops = (0..100)
            .map(|i| Op::put(format!("/t/big/{batch:03}-{i:03}"), value.clone()))
            .collect();
        backend.store.txn(vec![], ops, vec![]).await.unwrap();
    }
    let snap = backend.store.list("/t/big/").await.expect("list 6 MB");
    assert_eq!(snap.kvs.len(), 6000);
}

/// A store that is not there at start: connecting works (lazily), and every call fails
/// `Unavailable` within the request bound, so an agent can start and retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_absent_at_connect() {
    // A loopback port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = EtcdKv::connect(&[format!("http://127.0.0.1:{port}")], None)
        .await
        .expect("connecting does not need the store");
    let started = Instant::now();
    let err = store.list("/t/").await.expect_err("nothing listens");
    assert!(err.is_unavailable(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let err = store.watch("/t/", 0).await.expect_err("nothing listens");
    assert!(err.is_unavailable(), "{err}");
}

/// TLS: a client with the CA and a client certificate works (get, txn, watch); one
/// without a client certificate is refused, and one with the wrong CA cannot connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_tls() {
    let etcd = tokio::task::block_in_place(|| {
        Etcd::start_tls(None, "127.0.0.1".parse().unwrap()).expect("start etcd with TLS")
    });
    assert!(
        etcd.url().starts_with("https://127.0.0.1:"),
        "{}",
        etcd.url()
    );
    let store = etcd.client().await.expect("TLS client");
    let mut rx = store.watch("/t/tls/", 0).await.expect("watch over TLS");
    put_str(&store, "/t/tls/1", "secret").await;
    assert_eq!(
        store.get("/t/tls/1").await.unwrap().unwrap().value,
        b"secret"
    );
    assert!(!events(&mut rx, 1).await.is_empty());

    let tls = etcd.tls().unwrap();
    let no_cert = Tls {
        ca: tls.ca.clone(),
        ..Tls::default()
    };
    let anonymous = EtcdKv::connect(&etcd.endpoints(), Some(&no_cert))
        .await
        .unwrap();
    assert!(
        anonymous.get("/t/tls/1").await.is_err(),
        "etcd requires a client certificate"
    );

    // Another CA (the client's own certificate): the server is not trusted.
    let wrong_ca = Tls {
        ca: tls.cert.clone(),
        ..tls.clone()
    };
    let untrusting = EtcdKv::connect(&etcd.endpoints(), Some(&wrong_ca))
        .await
        .unwrap();
    assert!(
        untrusting.get("/t/tls/1").await.is_err(),
        "the server's certificate is not trusted"
    );

    let only_cert = Tls { key: None, ..tls };
    let err = EtcdKv::connect(&etcd.endpoints(), Some(&only_cert))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("--etcd-cert and --etcd-key go together"),
        "{err}"
    );
}

/// Bad input is refused with the URL or the file named.
#[tokio::test]
async fn etcd_bad_connect_input() {
    let err = EtcdKv::connect(&["127.0.0.1:2379".to_owned()], None)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("127.0.0.1:2379 is not an etcd URL"),
        "{err}"
    );
    let err = EtcdKv::connect(&[], None).await.unwrap_err();
    assert!(err.to_string().contains("no etcd endpoint"), "{err}");
    let tls = Tls {
        ca: Some("/nonexistent/ca.pem".into()),
        ..Tls::default()
    };
    let err = EtcdKv::connect(&["https://127.0.0.1:2379".to_owned()], Some(&tls))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    let err = EtcdKv::connect(&["http://127.0.0.1:2379".to_owned()], Some(&tls))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("https://"), "{err}");
}

/// The harness: stop, then restart keeps the data and the URL; drop removes the data
/// directory and ends the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_harness_lifecycle() {
    let mut backend = RealEtcd::start().await;
    let url = backend.etcd.url();
    put_str(&backend.store, "/t/h", "kept").await;
    tokio::task::block_in_place(|| {
        backend.etcd.stop().unwrap();
        assert!(backend.etcd.pid().is_none());
        backend.etcd.restart().unwrap();
    });
    assert_eq!(backend.etcd.url(), url);
    assert_eq!(
        backend.store.get("/t/h").await.unwrap().unwrap().value,
        b"kept"
    );
    let pid = backend.etcd.pid().unwrap();
    let dir = backend.etcd.data_dir();
    assert!(dir.exists());
    drop(backend);
    assert!(!dir.exists(), "drop removes the data directory");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "drop ends etcd (pid {pid})"
    );
}

// ---------------------------------------------------------------------------------------
// Against the in-memory fake: the same checks.

struct Fake(MemKv);

impl Backend for Fake {
    fn store(&self) -> &dyn KvStore {
        &self.0
    }
    async fn compact(&self, revision: i64) {
        self.0.compact(revision);
    }
    fn restart(&mut self) {
        self.0.restart();
    }
}

#[tokio::test]
async fn mem_get_list() {
    check_get_list(&MemKv::new()).await;
}

#[tokio::test]
async fn mem_txn_compares() {
    check_txn_compares(&MemKv::new()).await;
}

#[tokio::test]
async fn mem_delete_prefix() {
    check_delete_prefix(&MemKv::new()).await;
}

#[tokio::test]
async fn mem_leases() {
    let store = MemKv::new();
    check_leases(&store).await;
    check_lease_expiry(&store).await;
}

#[tokio::test]
async fn mem_watch_from_past() {
    check_watch_from_past(&MemKv::new()).await;
}

#[tokio::test]
async fn mem_watch_long_history() {
    check_watch_long_history(&MemKv::new()).await;
}

#[tokio::test]
async fn mem_watch_compacted() {
    check_watch_compacted(&Fake(MemKv::new())).await;
}

#[tokio::test]
async fn mem_restart() {
    check_restart(&mut Fake(MemKv::new())).await;
}

/// The fake's outage: calls fail `Unavailable` naming the key, a watch is lost, and
/// everything works again after it.
#[tokio::test]
async fn mem_outage_is_unavailable() {
    let store = MemKv::new();
    put_str(&store, "/t/u/1", "a").await;
    let mut rx = store.watch("/t/u/", 0).await.unwrap();
    store.set_reachable(false);
    assert!(!lost(&mut rx).await.is_empty());
    let err = store.get("/t/u/1").await.expect_err("unreachable");
    assert!(
        err.is_unavailable() && err.to_string().contains("/t/u/1"),
        "{err}"
    );
    let err = store.watch("/t/u/", 0).await.expect_err("unreachable");
    assert!(err.is_unavailable(), "{err}");
    store.set_reachable(true);
    assert_eq!(store.get("/t/u/1").await.unwrap().unwrap().value, b"a");
}
