//! SIGKILL of the agent in the middle of a burst of CNI ADDs (privileged: run as root).
//!
//! Afterwards, as a runtime sees it: a pod whose ADD succeeded is an endpoint with its
//! address and connectivity after the restart; a pod whose ADD failed gets a DEL from the
//! runtime, after which nothing of it is left (no endpoint, no address, no host veth, no
//! map entry, no eth0 in its namespace). No address is held twice, no endpoint twice.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Barrier;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hypha_tests::census::{assert_node_holds, assert_pods_reach_each_other};
use hypha_tests::cni::CniRun;
use hypha_tests::node::{Node, PodSlot};

const BURST: usize = 30;

/// One burst of [`BURST`] ADDs, the agent SIGKILLed once `kill_after` of them have
/// answered; then the checks above, and every pod deleted. Whether the kill found ADDs
/// still to answer (a fast agent may have answered them all).
fn kill_mid_burst(node: &mut Node, round: usize, kill_after: usize) -> bool {
    let pods: Vec<PodSlot> = (0..BURST)
        .map(|i| node.pod_slot(&format!("k{round}p{i}")))
        .collect();
    let answered = AtomicUsize::new(0);
    let barrier = Barrier::new(BURST + 1);
    let node_ref = &*node;
    let runs: Vec<CniRun> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| {
                let (barrier, answered) = (&barrier, &answered);
                s.spawn(move || {
                    barrier.wait();
                    let run = node_ref.cni_add(pod);
                    answered.fetch_add(1, Ordering::SeqCst);
                    run
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        while answered.load(Ordering::SeqCst) < kill_after {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "only {} of {BURST} ADDs answered in 20 s",
                answered.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        node_ref.sigkill_agent();
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    node.kill_agent();
    let succeeded = runs.iter().filter(|r| r.status.success()).count();
    eprintln!(
        "round {round}: agent killed after {kill_after} answers; {succeeded} of {BURST} ADDs succeeded"
    );
    node.start_agent();

    // The runtime's view: successes are pods, failures get a DEL.
    let mut expected = BTreeMap::new();
    for (pod, run) in pods.iter().zip(&runs) {
        if run.status.success() {
            expected.insert(pod.container_id.clone(), PodSlot::address_in(run));
        } else {
            let (code, msg) = run.error();
            assert!(
                code != 0 && !msg.is_empty(),
                "an unclear CNI error: {run:?}"
            );
            let del = node.cni_del(pod);
            assert!(
                del.status.success(),
                "the runtime's DEL of failed {}: {del:?}\nagent log:\n{}",
                pod.container_id,
                node.log()
            );
            assert!(
                !pod.netns.has_link("eth0"),
                "{}'s ADD failed and it was deleted, but eth0 is left in its namespace",
                pod.container_id
            );
        }
    }
    assert_node_holds(node, &expected);
    let alive: Vec<(&_, Ipv4Addr)> = pods
        .iter()
        .filter_map(|p| expected.get(&p.container_id).map(|a| (&p.netns, *a)))
        .collect();
    assert_pods_reach_each_other(node, &alive);

    for pod in &pods {
        let del = node.cni_del(pod);
        assert!(del.status.success(), "DEL of {}: {del:?}", pod.container_id);
    }
    assert_node_holds(node, &BTreeMap::new());
    succeeded < BURST
}

#[test]
fn sigkill_of_the_agent_mid_burst_leaks_and_duplicates_nothing() {
    hypha_tests::require_root!();
    let mut node = Node::start();
    // Early, about a third, late in the burst.
    let hits: Vec<bool> = [3, 10, 20]
        .into_iter()
        .enumerate()
        .map(|(round, kill_after)| kill_mid_burst(&mut node, round, kill_after))
        .collect();
    assert!(
        hits.contains(&true),
        "no kill found an ADD in flight ({hits:?}): the test proved nothing"
    );
}
