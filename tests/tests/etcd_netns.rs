//! The test etcd inside a network namespace (the cluster tests' underlay): it listens on
//! an address of the namespace, a store client reaches it through a runtime whose threads
//! live there, and dropping it ends the process (before the namespace goes).

use hypha_cluster::KvStore as _;
use hypha_cluster::store::put;
use hypha_cluster::testing::{Etcd, NetnsRuntime};
use hypha_tests::netns::NamedNetns;

#[test]
fn etcd_in_a_netns() {
    hypha_tests::require_root!();
    let ns = NamedNetns::new("etcd");
    ns.exec(&["ip", "link", "add", "underlay", "type", "bridge"]);
    ns.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", "underlay"]);
    ns.exec(&["ip", "link", "set", "underlay", "up"]);

    let mut etcd =
        Etcd::start(Some(ns.name()), "10.77.0.1".parse().unwrap()).expect("etcd in the netns");
    assert_eq!(etcd.url(), "http://10.77.0.1:2379");
    assert_eq!(etcd.netns(), Some(ns.name()));

    let rt = NetnsRuntime::new(ns.name()).expect("runtime in the netns");
    let endpoints = etcd.endpoints();
    let store = rt
        .run(async move { hypha_cluster::etcd::EtcdKv::connect(&endpoints, None).await })
        .expect("client");
    let s = store.clone();
    rt.run(async move { put(&s, "/t/ns", b"here".to_vec()).await })
        .expect("put through the netns");

    // Restarted in the same namespace, with its data.
    etcd.restart().expect("restart in the netns");
    let s = store.clone();
    let got = rt
        .run(async move { s.get("/t/ns").await })
        .expect("get after restart");
    assert_eq!(got.expect("/t/ns kept").value, b"here");

    let pid = etcd.pid().expect("running");
    let dir = etcd.data_dir();
    drop(etcd);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "drop ends etcd"
    );
    assert!(!dir.exists(), "drop removes its data");
}
