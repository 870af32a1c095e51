//! Many CNI calls at once through the real `hypha-cni` and a real agent (privileged: run
//! as root): whatever order the agent serves them in, the node ends up holding exactly
//! the pods whose ADD succeeded, the same in the agent's endpoints and IPAM, the host
//! veths and the pinned endpoint map.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Barrier;

use hypha_tests::census::{assert_node_holds, assert_pods_reach_each_other};
use hypha_tests::cni::CniRun;
use hypha_tests::node::{Node, PodSlot};

/// Runs `calls` all at once, one thread each, released together; their results in order.
fn all_at_once<'a>(calls: Vec<Box<dyn FnOnce() -> CniRun + Send + 'a>>) -> Vec<CniRun> {
    let barrier = Barrier::new(calls.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = calls
            .into_iter()
            .map(|call| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    call()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("CNI thread"))
            .collect()
    })
}

#[test]
fn fifty_adds_and_fifty_dels_at_once_leave_exactly_the_new_pods() {
    hypha_tests::require_root!();
    let node = Node::start();
    let old: Vec<PodSlot> = (0..50).map(|i| node.pod_slot(&format!("o{i}"))).collect();
    let new: Vec<PodSlot> = (0..50).map(|i| node.pod_slot(&format!("n{i}"))).collect();
    for pod in &old {
        let run = node.cni_add(pod);
        assert!(run.status.success(), "ADD of {}: {run:?}", pod.container_id);
    }

    // 50 DELs of the old pods and 50 ADDs of new ones, from 100 threads released at once.
    let mut calls: Vec<Box<dyn FnOnce() -> CniRun + Send + '_>> = Vec::new();
    for (o, n) in old.iter().zip(&new) {
        calls.push(Box::new(|| node.cni_del(o)));
        calls.push(Box::new(|| node.cni_add(n)));
    }
    let runs = all_at_once(calls);
    let mut expected = BTreeMap::new();
    for (k, run) in runs.iter().enumerate() {
        let (what, pod) = if k % 2 == 0 {
            ("DEL", &old[k / 2])
        } else {
            ("ADD", &new[k / 2])
        };
        assert!(
            run.status.success(),
            "concurrent {what} of {}: {run:?}\nagent log:\n{}",
            pod.container_id,
            node.log()
        );
        if what == "ADD" {
            expected.insert(pod.container_id.clone(), PodSlot::address_in(run));
        }
    }
    assert_node_holds(&node, &expected);
    for pod in &old {
        assert!(
            !pod.netns.has_link("eth0"),
            "{}'s eth0 is still in its namespace after DEL",
            pod.container_id
        );
    }
    let pods: Vec<(&_, Ipv4Addr)> = new
        .iter()
        .map(|p| (&p.netns, expected[&p.container_id]))
        .collect();
    assert_pods_reach_each_other(&node, &pods);

    for pod in &new {
        let run = node.cni_del(pod);
        assert!(run.status.success(), "DEL of {}: {run:?}", pod.container_id);
    }
    assert_node_holds(&node, &BTreeMap::new());
}

/// 20 ADDs of the same container and interface at once; the runs, after checking
/// that none succeeded twice, every failure is a CNI error object, that a successful
/// one's pod reaches `peer` (a pod already on the node, left as it is) and that once the
/// runtime has DELed the container (it would, whatever the outcome, when it gives up
/// on the sandbox) nothing of it is left.
fn same_container_adds(
    node: &Node,
    pod: &PodSlot,
    peer: Option<(&PodSlot, Ipv4Addr)>,
) -> Vec<CniRun> {
    let peers: BTreeMap<String, Ipv4Addr> = peer
        .iter()
        .map(|(p, a)| (p.container_id.clone(), *a))
        .collect();
    let calls: Vec<Box<dyn FnOnce() -> CniRun + Send + '_>> = (0..20)
        .map(|_| Box::new(|| node.cni_add(pod)) as Box<dyn FnOnce() -> CniRun + Send + '_>)
        .collect();
    let runs = all_at_once(calls);
    let ok: Vec<&CniRun> = runs.iter().filter(|r| r.status.success()).collect();
    assert!(
        ok.len() <= 1,
        "{} ADDs of the same container succeeded: {runs:#?}",
        ok.len()
    );
    for run in runs.iter().filter(|r| !r.status.success()) {
        let (code, msg) = run.error();
        assert!(
            code != 0 && !msg.is_empty(),
            "an unclear CNI error: {run:?}"
        );
    }
    if let Some(run) = ok.first() {
        let address = PodSlot::address_in(run);
        let mut expected = peers.clone();
        expected.insert(pod.container_id.clone(), address);
        assert_node_holds(node, &expected);
        assert!(pod.netns.has_link("eth0"), "the pod has no eth0");
        if let Some((peer, peer_address)) = peer {
            assert_pods_reach_each_other(
                node,
                &[(&pod.netns, address), (&peer.netns, peer_address)],
            );
        }
    }
    let del = node.cni_del(pod);
    assert!(
        del.status.success(),
        "DEL: {del:?}\nagent log:\n{}",
        node.log()
    );
    assert_node_holds(node, &peers);
    assert!(
        !pod.netns.has_link("eth0"),
        "eth0 left in the pod after DEL"
    );
    runs
}

#[test]
fn twenty_concurrent_adds_of_one_container_leak_nothing() {
    hypha_tests::require_root!();
    let node = Node::start();
    let pod = node.pod_slot("same");
    same_container_adds(&node, &pod, None);
}

/// hypha-cni runs the operations of one attachment one at a time (a lock per container
/// and interface): the first ADD makes the pod, every later one finds its endpoint and
/// fails saying so, and leaves the pod alone. Without the lock (before this was fixed)
/// the 20 ADDs interleaved step by step (address, host veth, pod end, routes, endpoint)
/// and each loser's rollback undid the winner's work, so none succeeded.
#[test]
fn twenty_concurrent_adds_of_one_container_make_exactly_one_pod() {
    hypha_tests::require_root!();
    let node = Node::start();
    let peer = node.pod_slot("peer");
    let run = node.cni_add(&peer);
    assert!(run.status.success(), "ADD of the peer: {run:?}");
    let peer_address = PodSlot::address_in(&run);
    let pod = node.pod_slot("one");
    let runs = same_container_adds(&node, &pod, Some((&peer, peer_address)));
    let ok = runs.iter().filter(|r| r.status.success()).count();
    assert_eq!(
        ok, 1,
        "exactly one of 20 concurrent ADDs of one container must succeed: {runs:#?}"
    );
    for run in runs.iter().filter(|r| !r.status.success()) {
        let (code, msg) = run.error();
        assert!(
            code == 4 && msg.contains("is already attached"),
            "a losing ADD that does not say the attachment is already there: {run:?}"
        );
    }
    let del = node.cni_del(&peer);
    assert!(del.status.success(), "DEL of the peer: {del:?}");
    assert_node_holds(&node, &BTreeMap::new());
}

/// The census these tests rely on does see a leak: a `hyp…` veth no endpoint owns.
#[test]
fn the_census_catches_a_leaked_host_veth() {
    hypha_tests::require_root!();
    let node = Node::start();
    assert_node_holds(&node, &BTreeMap::new());
    node.netns.exec(&[
        "ip",
        "link",
        "add",
        "hypstray0",
        "type",
        "veth",
        "peer",
        "name",
        "stray1",
    ]);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_node_holds(&node, &BTreeMap::new())
    }));
    assert!(
        caught.is_err(),
        "a stray hyp* veth in the node went unnoticed"
    );
}
