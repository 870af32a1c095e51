//! The control plane's logic (node registration, identities, the mirror) against a real
//! etcd, one per test on a free loopback port ([`hypha_cluster::testing::Etcd`]): the
//! unit tests run the same logic on the in-memory fake; these check that nothing in it
//! leans on a behaviour only the fake has.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hypha_cluster::layout::{Labels, Layout};
use hypha_cluster::mirror::{self, Delta, SyncState, Update};
use hypha_cluster::node::{self, CidrPlan, NodeSpec};
use hypha_cluster::testing::Etcd;
use hypha_cluster::{ClusterError, KvStore, identity};
use tokio::sync::mpsc;

const TTL: Duration = Duration::from_secs(30);

async fn etcd() -> (Etcd, Arc<dyn KvStore>) {
    let etcd = tokio::task::block_in_place(|| {
        Etcd::start(None, "127.0.0.1".parse().unwrap()).expect("start etcd")
    });
    let store = etcd.client().await.expect("etcd client");
    (etcd, Arc::new(store))
}

fn spec(name: &str, uid: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        uid: uid.into(),
        addresses: vec!["192.0.2.1".parse().unwrap()],
        version: "test".into(),
    }
}

fn plan() -> CidrPlan {
    CidrPlan {
        v4: Some(("10.244.0.0/16".parse().unwrap(), 24)),
        v6: Some(("fd00:10:244::/48".parse().unwrap(), 64)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_etcd() {
    let (_etcd, store) = etcd().await;
    let l = Layout::default();

    // Six nodes at once: distinct CIDRs, the first six.
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let (store, l) = (store.clone(), l.clone());
            tokio::spawn(async move {
                node::register(
                    store.as_ref(),
                    &l,
                    &spec(&format!("n{i}"), &format!("u{i}")),
                    &plan(),
                    TTL,
                )
                .await
                .unwrap()
            })
        })
        .collect();
    let mut regs = BTreeMap::new();
    for t in tasks {
        let reg = t.await.unwrap();
        regs.insert(reg.record.name.clone(), reg);
    }
    let v4: BTreeSet<_> = regs.values().map(|r| r.cidrs.v4.unwrap()).collect();
    let want: BTreeSet<_> = (0..6)
        .map(|i| format!("10.244.{i}.0/24").parse().unwrap())
        .collect();
    assert_eq!(v4, want);

    // Two agents racing for one name: exactly one wins.
    let racers: Vec<_> = ["x", "y"]
        .into_iter()
        .map(|uid| {
            let (store, l) = (store.clone(), l.clone());
            tokio::spawn(async move {
                node::register(store.as_ref(), &l, &spec("same", uid), &plan(), TTL).await
            })
        })
        .collect();
    let mut wins = 0;
    for r in racers {
        match r.await.unwrap() {
            Ok(_) => wins += 1,
            Err(ClusterError::NodeNameTaken { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(wins, 1);

    // A restart takes the node back with its CIDRs; a lost lease is restored by the
    // heartbeat.
    let n0 = &regs["n0"];
    let mut again = node::register(store.as_ref(), &l, &spec("n0", "u0"), &plan(), TTL)
        .await
        .unwrap();
    assert_eq!(again.cidrs, n0.cidrs);
    store.revoke(again.lease).await.unwrap();
    assert!(store.get(&l.node("n0")).await.unwrap().is_none());
    node::heartbeat(store.as_ref(), &l, &mut again, TTL)
        .await
        .unwrap();
    let kv = store.get(&l.node("n0")).await.unwrap().unwrap();
    assert_eq!(kv.lease, again.lease);
    node::heartbeat(store.as_ref(), &l, &mut again, TTL)
        .await
        .unwrap();

    // Removal frees the CIDRs for a new node.
    let err = node::remove(store.as_ref(), &l, "n0", false, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::NodeAlive { .. }), "{err}");
    let removed = node::remove(store.as_ref(), &l, "n0", true, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(removed.cidrs, n0.cidrs);
    let fresh = node::register(store.as_ref(), &l, &spec("fresh", "f"), &plan(), TTL)
        .await
        .unwrap();
    assert_eq!(fresh.cidrs, n0.cidrs);
    let err = node::heartbeat(store.as_ref(), &l, &mut again, TTL)
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::NodeRemoved(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_on_etcd() {
    let (_etcd, store) = etcd().await;
    let l = Layout::default();
    let labels = |set: usize| -> Labels { [("app".to_owned(), format!("app{set}"))].into() };
    // 5 agents × 20 concurrent resolves of 10 overlapping label sets.
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let (store, l) = (store.clone(), l.clone());
            let set = i % 10;
            tokio::spawn(async move {
                let id = identity::resolve(store.as_ref(), &l, "default", &labels(set))
                    .await
                    .unwrap();
                (set, id)
            })
        })
        .collect();
    let mut by_set: BTreeMap<usize, BTreeSet<u32>> = BTreeMap::new();
    for t in tasks {
        let (set, id) = t.await.unwrap();
        by_set.entry(set).or_default().insert(id);
    }
    let ids: BTreeSet<u32> = by_set
        .values()
        .map(|ids| {
            assert_eq!(ids.len(), 1, "{by_set:?}");
            *ids.first().unwrap()
        })
        .collect();
    assert_eq!(ids.len(), 10, "distinct numbers: {by_set:?}");
    assert!(
        ids.iter()
            .all(|id| (identity::FIRST..identity::END).contains(id))
    );
    let (listed, _) = identity::list(store.as_ref(), &l).await.unwrap();
    assert_eq!(listed.keys().copied().collect::<BTreeSet<_>>(), ids);

    // Collection: mark, then delete after the grace period; a resolve in between revives.
    let grace = Duration::from_secs(60);
    let keep = *ids.first().unwrap();
    let r = identity::collect_garbage(store.as_ref(), &l, &BTreeSet::from([keep]), 0, grace)
        .await
        .unwrap();
    assert_eq!(r.marked.len(), 9);
    let revived = identity::resolve(
        store.as_ref(),
        &l,
        "default",
        &labels(by_set_of(&by_set, r.marked[0])),
    )
    .await
    .unwrap();
    assert_eq!(revived, r.marked[0]);
    let r2 = identity::collect_garbage(store.as_ref(), &l, &BTreeSet::from([keep]), 60_000, grace)
        .await
        .unwrap();
    assert_eq!(r2.deleted.len(), 8, "{r2:?}");
    assert!(!r2.deleted.contains(&revived));
    assert_eq!(r2.marked, [revived], "revived, unused: marked afresh");
    assert_eq!(identity::list(store.as_ref(), &l).await.unwrap().0.len(), 2);
}

fn by_set_of(by_set: &BTreeMap<usize, BTreeSet<u32>>, id: u32) -> usize {
    by_set
        .iter()
        .find(|(_, ids)| ids.contains(&id))
        .map(|(set, _)| *set)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_on_etcd_survives_a_restart_without_false_deltas() {
    let (mut etcd, store) = etcd().await;
    for k in ["/m/a", "/m/b"] {
        hypha_cluster::store::put(store.as_ref(), k, b"1".to_vec())
            .await
            .unwrap();
    }
    let (tx, mut rx) = mpsc::channel::<Update>(16);
    let state = Arc::new(Mutex::new(SyncState::default()));
    let task = tokio::spawn(mirror::run(store.clone(), "/m/".into(), tx, state.clone()));
    let first = next(&mut rx).await;
    assert!(first.resync);
    assert_eq!(first.deltas.len(), 2);
    hypha_cluster::store::put(store.as_ref(), "/m/c", b"1".to_vec())
        .await
        .unwrap();
    let live = next(&mut rx).await;
    assert_eq!(
        live.deltas,
        [Delta::Upsert {
            key: "/m/c".into(),
            value: b"1".to_vec()
        }]
    );

    tokio::task::block_in_place(|| etcd.kill()).unwrap();
    let wait = |cond: fn(&SyncState) -> bool| {
        let state = state.clone();
        async move {
            for _ in 0..300 {
                if cond(&state.lock().unwrap()) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("sync state stayed {:?}", state.lock().unwrap());
        }
    };
    wait(|s| !s.connected).await;
    tokio::task::block_in_place(|| etcd.restart()).unwrap();
    let resync = next(&mut rx).await;
    assert!(resync.resync);
    assert!(resync.deltas.is_empty(), "nothing changed: {resync:?}");
    wait(|s| s.connected && s.resyncs >= 2).await;
    hypha_cluster::store::put(store.as_ref(), "/m/a", b"2".to_vec())
        .await
        .unwrap();
    let live = next(&mut rx).await;
    assert_eq!(
        live.deltas,
        [Delta::Upsert {
            key: "/m/a".into(),
            value: b"2".to_vec()
        }]
    );
    drop(rx);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the mirror ends with its consumer")
        .unwrap();
}

async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("an update")
        .expect("the mirror runs")
}
