use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::{CidrPlan, NodeSpec, heartbeat, register, remove};
use crate::fake::MemKv;
use crate::layout::{Layout, NodeRecord};
use crate::store::{KvStore, Op};
use crate::{ClusterError, decode};

const TTL: Duration = Duration::from_secs(30);

fn spec(name: &str, uid: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        uid: uid.into(),
        addresses: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        version: "test".into(),
    }
}

fn plan() -> CidrPlan {
    CidrPlan {
        v4: Some(("10.244.0.0/16".parse().unwrap(), 24)),
        v6: Some(("fd00:10:244::/48".parse().unwrap(), 64)),
    }
}

async fn record(store: &MemKv, layout: &Layout, name: &str) -> Option<NodeRecord> {
    let key = layout.node(name);
    store
        .get(&key)
        .await
        .unwrap()
        .map(|kv| decode(&key, &kv.value).unwrap())
}

#[tokio::test]
async fn registers_with_the_first_free_cidrs_and_keeps_them_across_restarts() {
    let store = MemKv::new();
    let l = Layout::default();
    let a = register(&store, &l, &spec("a", "uid-a"), &plan(), TTL)
        .await
        .unwrap();
    assert_eq!(a.cidrs.v4, Some("10.244.0.0/24".parse().unwrap()));
    assert_eq!(a.cidrs.v6, Some("fd00:10:244::/64".parse().unwrap()));
    let b = register(&store, &l, &spec("b", "uid-b"), &plan(), TTL)
        .await
        .unwrap();
    assert_eq!(b.cidrs.v4, Some("10.244.1.0/24".parse().unwrap()));
    assert_eq!(b.cidrs.v6, Some("fd00:10:244:1::/64".parse().unwrap()));
    let rec = record(&store, &l, "a").await.unwrap();
    assert_eq!(rec.pod_cidr, a.cidrs.v4);
    assert_eq!(rec.pod_cidr6, a.cidrs.v6);
    assert_eq!(rec.uid, "uid-a");
    let kv = store.get(&l.node("a")).await.unwrap().unwrap();
    assert_eq!(kv.lease, a.lease, "the record hangs on the node's lease");
    let claim = store
        .get(&l.cidr_claim("10.244.1.0/24".parse().unwrap()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.value, br#""b""#);

    // The agent of a restarts (same state, same uid) while its old lease still runs.
    let again = register(&store, &l, &spec("a", "uid-a"), &plan(), TTL)
        .await
        .unwrap();
    assert_eq!(again.cidrs, a.cidrs, "same name, same CIDRs");
    assert_ne!(again.lease, a.lease);
    assert_eq!(store.lease_count(), 2, "the old lease of a was revoked");
    assert_eq!(
        store.list(&l.cidr_claims(false)).await.unwrap().kvs.len(),
        2,
        "nothing allocated twice"
    );
    // And after its lease expired (record gone, CIDRs kept).
    assert!(store.expire_lease(again.lease));
    assert!(record(&store, &l, "a").await.is_none());
    let third = register(&store, &l, &spec("a", "uid-a"), &plan(), TTL)
        .await
        .unwrap();
    assert_eq!(third.cidrs, a.cidrs);
}

#[tokio::test]
async fn concurrent_registrations_get_distinct_cidrs() {
    let store = MemKv::new();
    let l = Layout::default();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let store: Arc<dyn KvStore> = Arc::new(store.clone());
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            register(
                store.as_ref(),
                &l,
                &spec(&format!("n{i}"), &format!("u{i}")),
                &plan(),
                TTL,
            )
            .await
            .unwrap()
        }));
    }
    let mut v4 = BTreeSet::new();
    let mut v6 = BTreeSet::new();
    for t in tasks {
        let reg = t.await.unwrap();
        assert!(v4.insert(reg.cidrs.v4.unwrap()), "{:?} twice", reg.cidrs.v4);
        assert!(v6.insert(reg.cidrs.v6.unwrap()), "{:?} twice", reg.cidrs.v6);
    }
    // First free, so exactly the first 12.
    let want: BTreeSet<_> = (0..12)
        .map(|i| format!("10.244.{i}.0/24").parse().unwrap())
        .collect();
    assert_eq!(v4, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_thread_registrations_get_distinct_cidrs() {
    // The same on a multi-thread runtime, where the racers truly run in parallel.
    let store = MemKv::new();
    let l = Layout::default();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            let l = l.clone();
            tokio::spawn(async move {
                register(&store, &l, &spec(&format!("n{i}"), "u"), &plan(), TTL)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut regs = Vec::new();
    for t in tasks {
        regs.push(t.await.unwrap());
    }
    let v4: BTreeSet<_> = regs.iter().map(|r| r.cidrs.v4).collect();
    let v6: BTreeSet<_> = regs.iter().map(|r| r.cidrs.v6).collect();
    assert_eq!((v4.len(), v6.len()), (8, 8));
}

#[tokio::test]
async fn a_live_name_of_another_uid_is_refused() {
    let store = MemKv::new();
    let l = Layout::default();
    register(&store, &l, &spec("a", "uid-1"), &plan(), TTL)
        .await
        .unwrap();
    let err = register(&store, &l, &spec("a", "uid-2"), &plan(), TTL)
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::NodeNameTaken { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("node name a is already taken"), "{text}");
    assert!(text.contains("192.0.2.1,2001:db8::1"), "{text}");
    assert_eq!(record(&store, &l, "a").await.unwrap().uid, "uid-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_racers_for_one_name_exactly_one_wins() {
    for round in 0..20 {
        let store = MemKv::new();
        let l = Layout::default();
        let racers: Vec<_> = ["x", "y"]
            .into_iter()
            .map(|uid| {
                let store = store.clone();
                let l = l.clone();
                tokio::spawn(
                    async move { register(&store, &l, &spec("same", uid), &plan(), TTL).await },
                )
            })
            .collect();
        let mut wins = Vec::new();
        let mut refusals = 0;
        for r in racers {
            match r.await.unwrap() {
                Ok(reg) => wins.push(reg),
                Err(ClusterError::NodeNameTaken { .. }) => refusals += 1,
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!((wins.len(), refusals), (1, 1), "round {round}");
        let rec = record(&store, &l, "same").await.unwrap();
        assert_eq!(rec.uid, wins[0].record.uid);
        assert_eq!(store.lease_count(), 1, "the loser's lease was revoked");
        assert_eq!(
            store.list(&l.cidr_claims(false)).await.unwrap().kvs.len(),
            1
        );
    }
}

#[tokio::test]
async fn exhaustion_names_the_cluster_cidr() {
    let store = MemKv::new();
    let l = Layout::default();
    let small = CidrPlan {
        v4: Some(("10.9.0.0/23".parse().unwrap(), 24)),
        v6: None,
    };
    register(&store, &l, &spec("a", "a"), &small, TTL)
        .await
        .unwrap();
    let b = register(&store, &l, &spec("b", "b"), &small, TTL)
        .await
        .unwrap();
    assert_eq!(b.cidrs.v6, None, "no IPv6 plan, no IPv6 CIDR");
    let err = register(&store, &l, &spec("c", "c"), &small, TTL)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the cluster CIDR 10.9.0.0/23 has no free /24 left for node c (2 allocated); widen --cluster-cidr or remove nodes with `hypha node remove`"
    );
    assert!(record(&store, &l, "c").await.is_none());
    assert!(store.get(&l.node_cidrs("c")).await.unwrap().is_none());

    let bad = CidrPlan {
        v4: Some(("10.9.0.0/23".parse().unwrap(), 16)),
        v6: None,
    };
    let err = register(&store, &l, &spec("d", "d"), &bad, TTL)
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::InvalidCidrPlan { .. }), "{err}");
}

#[tokio::test]
async fn a_claim_of_another_size_is_not_overlapped() {
    let store = MemKv::new();
    let l = Layout::default();
    // An older agent cut a /23 at the start of the range.
    crate::store::put(
        &store,
        &l.cidr_claim("10.244.0.0/23".parse().unwrap()),
        br#""old""#.to_vec(),
    )
    .await
    .unwrap();
    let a = register(&store, &l, &spec("a", "a"), &plan(), TTL)
        .await
        .unwrap();
    assert_eq!(a.cidrs.v4, Some("10.244.2.0/24".parse().unwrap()));
}

#[tokio::test]
async fn removal_frees_the_cidrs_for_a_new_node() {
    let store = MemKv::new();
    let l = Layout::default();
    let a = register(&store, &l, &spec("a", "a"), &plan(), TTL)
        .await
        .unwrap();
    register(&store, &l, &spec("b", "b"), &plan(), TTL)
        .await
        .unwrap();
    for c in ["c1", "c2"] {
        crate::store::put(&store, &l.endpoint("a", c, "eth0"), b"{}".to_vec())
            .await
            .unwrap();
    }
    crate::store::put(&store, &l.endpoint("ab", "c", "eth0"), b"{}".to_vec())
        .await
        .unwrap();

    let err = remove(&store, &l, "a", false, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::NodeAlive { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");

    let removed = remove(&store, &l, "a", true, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(removed.cidrs, a.cidrs);
    assert_eq!(removed.endpoints, 2);
    assert!(removed.was_registered);
    assert!(record(&store, &l, "a").await.is_none());
    assert!(store.get(&l.node_cidrs("a")).await.unwrap().is_none());
    assert!(
        store
            .list(&l.node_endpoints("a"))
            .await
            .unwrap()
            .kvs
            .is_empty(),
        "its endpoints went"
    );
    assert_eq!(
        store.list(&l.node_endpoints("ab")).await.unwrap().kvs.len(),
        1,
        "a node whose name starts with a's keeps its endpoints"
    );
    assert_eq!(store.lease_count(), 1, "a's lease was revoked");

    let c = register(&store, &l, &spec("c", "c"), &plan(), TTL)
        .await
        .unwrap();
    assert_eq!(c.cidrs, a.cidrs, "a's CIDRs are free again: c gets them");

    let err = remove(&store, &l, "a", false, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::NoSuchNode(_)), "{err}");
}

#[tokio::test]
async fn a_dead_node_is_removed_without_force() {
    let store = MemKv::new();
    let l = Layout::default();
    let a = register(&store, &l, &spec("a", "a"), &plan(), TTL)
        .await
        .unwrap();
    // Its heartbeat is old (the stale limit is zero here)...
    let removed = remove(&store, &l, "a", false, Duration::ZERO)
        .await
        .unwrap();
    assert!(removed.was_registered);
    // ...or its record is gone with its lease, CIDRs left.
    let a2 = register(&store, &l, &spec("a2", "a"), &plan(), TTL)
        .await
        .unwrap();
    assert_eq!(a2.cidrs, a.cidrs);
    store.expire_lease(a2.lease);
    let removed = remove(&store, &l, "a2", false, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(!removed.was_registered);
    assert_eq!(removed.cidrs, a.cidrs);
    assert!(
        store
            .list(&l.cidr_claims(false))
            .await
            .unwrap()
            .kvs
            .is_empty()
    );
    assert!(
        store
            .list(&l.cidr_claims(true))
            .await
            .unwrap()
            .kvs
            .is_empty()
    );
}

#[tokio::test]
async fn heartbeat_refreshes_and_restores_after_a_lost_lease() {
    let store = MemKv::new();
    let l = Layout::default();
    let mut a = register(&store, &l, &spec("a", "a"), &plan(), TTL)
        .await
        .unwrap();
    let first = a.record.heartbeat_ms;
    tokio::time::sleep(Duration::from_millis(5)).await;
    heartbeat(&store, &l, &mut a, TTL).await.unwrap();
    let rec = record(&store, &l, "a").await.unwrap();
    assert!(rec.heartbeat_ms > first);
    assert_eq!(rec, a.record);
    let lease = a.lease;

    assert!(store.expire_lease(lease));
    assert!(record(&store, &l, "a").await.is_none());
    heartbeat(&store, &l, &mut a, TTL).await.unwrap();
    assert_ne!(a.lease, lease, "a new lease");
    let kv = store.get(&l.node("a")).await.unwrap().unwrap();
    assert_eq!(kv.lease, a.lease);
    assert_eq!(record(&store, &l, "a").await.unwrap().pod_cidr, a.cidrs.v4);
    heartbeat(&store, &l, &mut a, TTL).await.unwrap();
    assert_eq!(store.lease_count(), 1);
}

#[tokio::test]
async fn heartbeat_does_not_take_a_name_back_from_another_agent() {
    let store = MemKv::new();
    let l = Layout::default();
    let mut a = register(&store, &l, &spec("a", "first"), &plan(), TTL)
        .await
        .unwrap();
    store.expire_lease(a.lease);
    // While a's agent was cut off, another agent took the name.
    register(&store, &l, &spec("a", "second"), &plan(), TTL)
        .await
        .unwrap();
    let err = heartbeat(&store, &l, &mut a, TTL).await.unwrap_err();
    assert!(matches!(err, ClusterError::NodeNameTaken { .. }), "{err}");
    assert_eq!(record(&store, &l, "a").await.unwrap().uid, "second");
}

#[tokio::test]
async fn heartbeat_after_a_forced_removal_reports_it() {
    let store = MemKv::new();
    let l = Layout::default();
    let mut a = register(&store, &l, &spec("a", "a"), &plan(), TTL)
        .await
        .unwrap();
    remove(&store, &l, "a", true, Duration::from_secs(60))
        .await
        .unwrap();
    let err = heartbeat(&store, &l, &mut a, TTL).await.unwrap_err();
    assert!(matches!(err, ClusterError::NodeRemoved(_)), "{err}");
    assert!(record(&store, &l, "a").await.is_none(), "not resurrected");
    // A heartbeat while the store is down says so.
    store.set_reachable(false);
    let err = heartbeat(&store, &l, &mut a, TTL).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}

#[tokio::test]
async fn a_corrupt_record_is_named() {
    let store = MemKv::new();
    let l = Layout::default();
    store
        .txn(vec![], vec![Op::put(l.node("a"), "not json")], vec![])
        .await
        .unwrap();
    let err = register(&store, &l, &spec("a", "a"), &plan(), TTL)
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("/hypha/v1/nodes/a"), "{err}");
    assert_eq!(store.lease_count(), 0);
}

async fn node_cidrs(
    store: &MemKv,
    layout: &Layout,
    name: &str,
) -> Option<crate::layout::NodeCidrs> {
    let key = layout.node_cidrs(name);
    store
        .get(&key)
        .await
        .unwrap()
        .map(|kv| decode(&key, &kv.value).unwrap())
}

#[tokio::test]
async fn the_cidrs_key_keeps_the_addresses_of_the_last_registration() {
    let store = MemKv::new();
    let l = Layout::default();
    let mut reg = register(&store, &l, &spec("a", "uid-a"), &plan(), TTL)
        .await
        .unwrap();
    let kept = node_cidrs(&store, &l, "a").await.unwrap();
    assert_eq!(kept.addresses, spec("a", "").addresses);
    assert_eq!(kept, reg.cidrs);
    // The lease lapses (the agent was killed): the addresses outlive the record.
    assert!(store.expire_lease(reg.lease));
    assert!(record(&store, &l, "a").await.is_none());
    assert_eq!(
        node_cidrs(&store, &l, "a").await.unwrap().addresses,
        spec("a", "").addresses
    );
    // It comes back with another underlay address: rewritten, same CIDRs.
    let moved = NodeSpec {
        addresses: vec!["192.0.2.77".parse().unwrap()],
        ..spec("a", "uid-a")
    };
    let again = register(&store, &l, &moved, &plan(), TTL).await.unwrap();
    assert_eq!(
        (again.cidrs.v4, again.cidrs.v6),
        (reg.cidrs.v4, reg.cidrs.v6)
    );
    let kept = node_cidrs(&store, &l, "a").await.unwrap();
    assert_eq!(kept.addresses, moved.addresses);
    // Its heartbeats go on, through a lapse too.
    reg = again;
    heartbeat(&store, &l, &mut reg, TTL).await.unwrap();
    assert!(store.expire_lease(reg.lease));
    heartbeat(&store, &l, &mut reg, TTL).await.unwrap();
    assert!(record(&store, &l, "a").await.is_some(), "registered again");
    // A key written before the overlay (no addresses) still reads.
    let old: crate::layout::NodeCidrs = serde_json::from_str(r#"{"v4": "10.244.9.0/24"}"#).unwrap();
    assert!(old.addresses.is_empty());
    assert!(!crate::encode(&old).windows(9).any(|w| w == b"addresses"));
}
