//! A deleted pod's tracked connections go with it (privileged: run as root).
//!
//! Found by `cargo xtask soak`: `hypha_ct4` kept the entries of deleted pods (6 hours for
//! an established TCP flow), so the next pod given the same address would inherit its
//! predecessor's established flows, and the replies to them would pass its policy.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap, Map, MapData};
use hypha_common::{CtEntry, CtKey4, CtKey6, maps};
use hypha_tests::node::Node;
use hypha_tests::policies::ALLOW_CLIENT_8080;
use hypha_tests::traffic::{TcpEcho, tcp_ok};

/// The tracked connections with `addr` on either side, read from the node's pinned map.
fn connections_of(node: &Node, addr: Ipv4Addr) -> Vec<CtKey4> {
    let path = node.pin_dir.join(maps::CT4);
    let data = MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("open the pinned {}: {e}", path.display()));
    let ct: HashMap<MapData, CtKey4, CtEntry> =
        HashMap::try_from(Map::LruHashMap(data)).expect("hypha_ct4 is an LRU hash map");
    let raw = u32::from_ne_bytes(addr.octets());
    ct.keys()
        .map(|k| k.expect("iterate hypha_ct4"))
        .filter(|k| k.saddr == raw || k.daddr == raw)
        .collect()
}

/// As [`connections_of`], in `hypha_ct6`.
fn connections6_of(node: &Node, addr: Ipv6Addr) -> Vec<CtKey6> {
    let path = node.pin_dir.join(maps::CT6);
    let data = MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("open the pinned {}: {e}", path.display()));
    let ct: HashMap<MapData, CtKey6, CtEntry> =
        HashMap::try_from(Map::LruHashMap(data)).expect("hypha_ct6 is an LRU hash map");
    let raw = addr.octets();
    ct.keys()
        .map(|k| k.expect("iterate hypha_ct6"))
        .filter(|k| k.saddr == raw || k.daddr == raw)
        .collect()
}

#[test]
fn del_removes_the_pods_tracked_ipv6_connections() {
    hypha_tests::require_root!();
    let node = Node::start_dual();
    let server = node.add_labelled_pod("srv", "default", &[("app", "server")]);
    let client = node.add_labelled_pod("cli", "default", &[("app", "client")]);
    let file = node.dir.join("allow.yaml");
    std::fs::write(&file, ALLOW_CLIENT_8080).unwrap();
    let (ok, out, err) = node.hypha(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "policy apply: {out}{err}");
    let _web = TcpEcho::start(&server.netns, 8080);
    assert!(
        tcp_ok(&client.netns, server.v6(), 8080),
        "client → [server]:8080"
    );
    assert!(
        !connections6_of(&node, client.v6()).is_empty(),
        "the allowed flow is not tracked in hypha_ct6; the test proves nothing"
    );

    let run = node.del_pod(&client);
    assert!(run.status.success(), "DEL of the client: {run:?}");

    let left = connections6_of(&node, client.v6());
    assert!(
        left.is_empty(),
        "hypha_ct6 still tracks {} connection(s) of the deleted client {}: {left:?}",
        left.len(),
        client.v6()
    );
}

#[test]
fn del_removes_the_pods_tracked_connections() {
    hypha_tests::require_root!();
    let node = Node::start();
    let server = node.add_labelled_pod("srv", "default", &[("app", "server")]);
    let client = node.add_labelled_pod("cli", "default", &[("app", "client")]);
    let file = node.dir.join("allow.yaml");
    std::fs::write(&file, ALLOW_CLIENT_8080).unwrap();
    let (ok, out, err) = node.hypha(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "policy apply: {out}{err}");
    let _web = TcpEcho::start(&server.netns, 8080);
    assert!(
        tcp_ok(&client.netns, server.address, 8080),
        "client → server:8080"
    );
    assert!(
        !connections_of(&node, client.address).is_empty(),
        "the allowed flow is not tracked in hypha_ct4; the test proves nothing"
    );

    let run = node.del_pod(&client);
    assert!(run.status.success(), "DEL of the client: {run:?}");

    let left = connections_of(&node, client.address);
    assert!(
        left.is_empty(),
        "hypha_ct4 still tracks {} connection(s) of the deleted client {}: {left:?}",
        left.len(),
        client.address
    );
}
