use std::time::Duration;

use tokio::sync::mpsc;

use super::MemKv;
use crate::store::{Compare, KvStore, Op, StoreError, WatchEvent, WatchMessage, put};

async fn next(rx: &mut mpsc::Receiver<WatchMessage>) -> WatchMessage {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a watch message within 5 s")
        .expect("the watch is still open")
}

fn keys(msg: &WatchMessage) -> Vec<String> {
    match msg {
        WatchMessage::Events { events, .. } => events
            .iter()
            .map(|e| match e {
                WatchEvent::Put(kv) => format!("put {}", kv.key),
                WatchEvent::Delete { key, .. } => format!("del {key}"),
            })
            .collect(),
        WatchMessage::Lost { reason } => vec![format!("lost {reason}")],
    }
}

#[tokio::test]
async fn revisions_rise_once_per_writing_txn() {
    let kv = MemKv::new();
    assert_eq!(kv.revision(), 1, "an empty store is at revision 1, as etcd");
    let r = put(&kv, "/a", b"1".to_vec()).await.unwrap();
    assert_eq!(r, 2);
    let out = kv
        .txn(
            vec![],
            vec![
                Op::put("/b", "2"),
                Op::put("/c", "3"),
                Op::Delete("/a".into()),
            ],
            vec![],
        )
        .await
        .unwrap();
    assert!(out.succeeded);
    assert_eq!(out.revision, 3, "three writes in one txn are one revision");
    let b = kv.get("/b").await.unwrap().unwrap();
    assert_eq!((b.create_revision, b.mod_revision), (3, 3));
    put(&kv, "/b", b"x".to_vec()).await.unwrap();
    let b = kv.get("/b").await.unwrap().unwrap();
    assert_eq!((b.create_revision, b.mod_revision), (3, 4));
    assert!(kv.get("/a").await.unwrap().is_none());

    // A delete of nothing writes nothing.
    let out = kv
        .txn(vec![], vec![Op::Delete("/nothing".into())], vec![])
        .await
        .unwrap();
    assert_eq!(out.revision, 4);
    // A txn without writes neither.
    let out = kv
        .txn(vec![Compare::Absent("/b".into())], vec![], vec![])
        .await
        .unwrap();
    assert!(!out.succeeded);
    assert_eq!(out.revision, 4);
}

#[tokio::test]
async fn compares_choose_the_branch() {
    let kv = MemKv::new();
    put(&kv, "/k", b"v".to_vec()).await.unwrap();
    let rev = kv.get("/k").await.unwrap().unwrap().mod_revision;
    let cases = [
        (Compare::Absent("/k".into()), false),
        (Compare::Absent("/other".into()), true),
        (Compare::ModRevision("/k".into(), rev), true),
        (Compare::ModRevision("/k".into(), rev + 1), false),
        (Compare::ModRevision("/other".into(), rev), false),
        (Compare::Value("/k".into(), b"v".to_vec()), true),
        (Compare::Value("/k".into(), b"w".to_vec()), false),
        (Compare::Value("/other".into(), b"v".to_vec()), false),
    ];
    for (compare, holds) in cases {
        let out = kv
            .txn(
                vec![compare.clone()],
                vec![Op::put("/branch", "success")],
                vec![Op::put("/branch", "failure")],
            )
            .await
            .unwrap();
        assert_eq!(out.succeeded, holds, "{compare:?}");
        let branch = kv.get("/branch").await.unwrap().unwrap().value;
        assert_eq!(
            branch,
            if holds {
                b"success".to_vec()
            } else {
                b"failure".to_vec()
            },
            "{compare:?}"
        );
    }
}

#[tokio::test]
async fn duplicate_keys_in_a_txn_are_refused() {
    let kv = MemKv::new();
    let err = kv
        .txn(vec![], vec![Op::put("/a", "1"), Op::put("/a", "2")], vec![])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("duplicate key"), "{err}");
    let err = kv
        .txn(
            vec![],
            vec![Op::put("/p/a", "1"), Op::DeletePrefix("/p/".into())],
            vec![],
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("/p/a"), "{err}");
    assert_eq!(kv.revision(), 1, "nothing was written");
}

#[tokio::test]
async fn list_is_sorted_and_delete_prefix_takes_only_the_prefix() {
    let kv = MemKv::new();
    for k in ["/p/b", "/p/a", "/q/a", "/p/c/d", "/pa"] {
        put(&kv, k, k.as_bytes().to_vec()).await.unwrap();
    }
    let snap = kv.list("/p/").await.unwrap();
    let listed: Vec<_> = snap.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(listed, ["/p/a", "/p/b", "/p/c/d"]);
    assert_eq!(snap.revision, kv.revision());
    let out = kv
        .txn(vec![], vec![Op::DeletePrefix("/p/".into())], vec![])
        .await
        .unwrap();
    assert_eq!(out.revision, 7, "one revision for the whole prefix");
    let left: Vec<_> = kv
        .list("/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(left, ["/pa", "/q/a"]);
}

#[tokio::test]
async fn leased_keys_go_with_their_lease() {
    let kv = MemKv::new();
    let a = kv.grant_lease(Duration::from_secs(60)).await.unwrap();
    let b = kv.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert_ne!(a, b, "lease ids are distinct");
    let mut watch = kv.watch("/", 0).await.unwrap();
    kv.txn(
        vec![],
        vec![
            Op::Put {
                key: "/a1".into(),
                value: b"1".to_vec(),
                lease: Some(a),
            },
            Op::Put {
                key: "/a2".into(),
                value: b"1".to_vec(),
                lease: Some(a),
            },
            Op::Put {
                key: "/b1".into(),
                value: b"1".to_vec(),
                lease: Some(b),
            },
        ],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(kv.get("/a1").await.unwrap().unwrap().lease, a);
    // Re-put without a lease: the key leaves the lease.
    put(&kv, "/a2", b"2".to_vec()).await.unwrap();
    assert_eq!(kv.get("/a2").await.unwrap().unwrap().lease, 0);
    assert_eq!(
        keys(&next(&mut watch).await),
        ["put /a1", "put /a2", "put /b1"]
    );
    assert_eq!(keys(&next(&mut watch).await), ["put /a2"]);

    assert!(kv.expire_lease(a));
    assert_eq!(keys(&next(&mut watch).await), ["del /a1"]);
    assert!(kv.get("/a1").await.unwrap().is_none());
    assert!(
        kv.get("/a2").await.unwrap().is_some(),
        "detached from the lease"
    );
    let err = kv.keep_alive(a).await.unwrap_err();
    assert!(matches!(err, StoreError::LeaseGone { .. }), "{err}");
    let err = kv
        .txn(
            vec![],
            vec![Op::Put {
                key: "/x".into(),
                value: vec![],
                lease: Some(a),
            }],
            vec![],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::LeaseGone { .. }), "{err}");

    kv.revoke(b).await.unwrap();
    assert_eq!(keys(&next(&mut watch).await), ["del /b1"]);
    assert_eq!(kv.lease_count(), 0);
}

#[tokio::test]
async fn leases_expire_on_their_own() {
    let kv = MemKv::new();
    let lease = kv.grant_lease(Duration::from_millis(50)).await.unwrap();
    kv.txn(
        vec![],
        vec![Op::Put {
            key: "/n".into(),
            value: vec![],
            lease: Some(lease),
        }],
        vec![],
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    kv.keep_alive(lease).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(kv.get("/n").await.unwrap().is_some(), "kept alive");
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(kv.get("/n").await.unwrap().is_none(), "expired");
}

#[tokio::test]
async fn a_watch_replays_history_from_an_inclusive_revision() {
    let kv = MemKv::new();
    let r1 = put(&kv, "/w/a", b"1".to_vec()).await.unwrap();
    put(&kv, "/other", b"1".to_vec()).await.unwrap();
    let r3 = put(&kv, "/w/b", b"1".to_vec()).await.unwrap();
    let mut from_r1 = kv.watch("/w/", r1).await.unwrap();
    let mut from_r3 = kv.watch("/w/", r3).await.unwrap();
    assert_eq!(keys(&next(&mut from_r1).await), ["put /w/a", "put /w/b"]);
    assert_eq!(keys(&next(&mut from_r3).await), ["put /w/b"]);
    put(&kv, "/w/c", b"1".to_vec()).await.unwrap();
    for rx in [&mut from_r1, &mut from_r3] {
        let msg = next(rx).await;
        assert_eq!(keys(&msg), ["put /w/c"]);
        let WatchMessage::Events { revision, .. } = msg else {
            unreachable!()
        };
        assert_eq!(revision, kv.revision());
    }
}

#[tokio::test]
async fn compaction_loses_old_watches() {
    let kv = MemKv::new();
    let r1 = put(&kv, "/a", b"1".to_vec()).await.unwrap();
    let mut live = kv.watch("/", 0).await.unwrap();
    kv.hold_watches(true);
    let mut held = kv.watch("/", 0).await.unwrap();
    kv.hold_watches(false);
    kv.hold_watches(true);
    put(&kv, "/b", b"1".to_vec()).await.unwrap();
    let r3 = put(&kv, "/c", b"1".to_vec()).await.unwrap();
    kv.compact(r3);
    let msg = next(&mut held).await;
    assert!(
        matches!(&msg, WatchMessage::Lost { reason } if reason.contains("compacted")),
        "{msg:?}"
    );
    assert!(held.recv().await.is_none(), "the watch ends after Lost");
    // The other one was held too: it was at r1+1 < r3, so lost as well.
    assert!(matches!(next(&mut live).await, WatchMessage::Lost { .. }));
    kv.hold_watches(false);

    let mut old = kv.watch("/", r1).await.unwrap();
    assert!(
        matches!(next(&mut old).await, WatchMessage::Lost { reason } if reason.contains("compacted"))
    );
    let mut ok = kv.watch("/", r3).await.unwrap();
    assert_eq!(keys(&next(&mut ok).await), ["put /c"]);
}

#[tokio::test]
async fn restart_and_outage_lose_watches() {
    let kv = MemKv::new();
    put(&kv, "/a", b"1".to_vec()).await.unwrap();
    let lease = kv.grant_lease(Duration::from_secs(60)).await.unwrap();
    let mut w = kv.watch("/", 0).await.unwrap();
    kv.restart();
    assert!(
        matches!(next(&mut w).await, WatchMessage::Lost { reason } if reason.contains("restarted"))
    );
    assert!(w.recv().await.is_none());
    assert!(kv.get("/a").await.unwrap().is_some(), "data kept");
    kv.keep_alive(lease).await.unwrap();

    let mut w = kv.watch("/", 0).await.unwrap();
    kv.set_reachable(false);
    assert!(matches!(next(&mut w).await, WatchMessage::Lost { .. }));
    let err = kv.get("/a").await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("get /a"), "{err}");
    assert!(kv.watch("/", 0).await.unwrap_err().is_unavailable());
    assert!(
        kv.grant_lease(Duration::from_secs(1))
            .await
            .unwrap_err()
            .is_unavailable()
    );
    kv.set_reachable(true);
    assert!(kv.get("/a").await.unwrap().is_some());
}

#[tokio::test]
async fn a_dropped_receiver_ends_its_watch() {
    let kv = MemKv::new();
    let w = kv.watch("/", 0).await.unwrap();
    assert_eq!(kv.watch_count(), 1);
    drop(w);
    put(&kv, "/a", b"1".to_vec()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    put(&kv, "/b", b"1".to_vec()).await.unwrap();
    assert_eq!(kv.watch_count(), 0);
}

#[tokio::test]
async fn an_expiry_is_seen_by_a_watch_without_any_call() {
    let kv = MemKv::new();
    let lease = kv.grant_lease(Duration::from_millis(100)).await.unwrap();
    kv.txn(
        vec![],
        vec![Op::Put {
            key: "/n".into(),
            value: vec![],
            lease: Some(lease),
        }],
        vec![],
    )
    .await
    .unwrap();
    let mut watch = kv.watch("/", 0).await.unwrap();
    let calls = kv.calls();
    assert_eq!(keys(&next(&mut watch).await), ["del /n"]);
    assert_eq!(kv.calls(), calls, "nobody called the store meanwhile");
}
