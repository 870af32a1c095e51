//! End-to-end tests of IPv6 and dual stack (privileged: run as root, here and in CI):
//! dual-stack, IPv6-only and IPv4-only nodes, pod to pod, pod ↔ host and pod → world over
//! IPv6, CHECK and DEL of both families, and what the CLI and the monitor show of them.
//!
//! Each test starts its own agent in its own network namespace (`hypha_tests::node`),
//! with a pod CIDR of its own (`fd00:4879:<pid>:<n>::/64` for IPv6), makes pods through
//! the real `hypha-cni`, and sends traffic only between namespaces it created (the
//! "world" is one of them, on the documentation prefix `2001:db8::/32`); everything goes
//! with the namespaces when the test ends, also on panic.

use std::net::{IpAddr, Ipv6Addr};
use std::process::{Command, Output};
use std::time::Duration;

use hypha_common::maps;
use hypha_tests::monitor::Monitor;
use hypha_tests::node::{Node, Pod, result_addresses};
use hypha_tests::traffic::{
    TcpEcho, assert_ping, ping, ping_ok, tcp_accept_peer, tcp_ok, tcp_send, tcp_sink,
};

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The packets of `reason` in `direction` counted for the pod's endpoint.
fn drops(node: &Node, pod: &Pod, reason: &str, direction: &str) -> u64 {
    node.endpoint(&pod.container_id)
        .drops
        .iter()
        .filter(|d| d.reason == reason && d.direction == direction)
        .map(|d| d.packets)
        .sum()
}

/// `hypha endpoint list -o json` of `node`, parsed.
fn endpoint_list_json(node: &Node) -> serde_json::Value {
    let (ok, out, err) = node.hypha(&["endpoint", "list", "-o", "json"]);
    assert!(ok, "hypha endpoint list -o json: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The entries of the pinned map `name` of `node` (`bpftool map dump`), as JSON.
fn map_entries(node: &Node, name: &str) -> Vec<serde_json::Value> {
    let path = node.pin_dir.join(name);
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool map dump pinned {}: {}",
        path.display(),
        output_text(&out)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool's dump of {} is not JSON: {e}", path.display()))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Asserts the pod's IPv6 default route is the decided one: via `fe80::1` on eth0.
fn assert_ipv6_default_route(pod: &Pod) {
    let routes = pod.netns.exec(&["ip", "-6", "route", "show", "default"]);
    assert!(
        routes.contains("via fe80::1") && routes.contains("dev eth0"),
        "the pod's IPv6 default route goes via fe80::1 dev eth0: {routes}"
    );
}

#[test]
fn dual_stack_pods_ping_and_transfer_tcp_over_both_families() {
    hypha_tests::require_root!();
    let node = Node::start_dual();
    let a = node.add_pod("a");
    let b = node.add_pod("b");

    // One address per family, each in its pod CIDR, and both default routes.
    let status = node.status();
    let cidr6 = status
        .node
        .pod_cidr6
        .expect("the node has an IPv6 pod CIDR");
    let cidr4 = status.node.pod_cidr.expect("the node has an IPv4 pod CIDR");
    assert_eq!(
        Some(cidr6),
        node.pod_cidr6
            .as_deref()
            .map(|c| c.parse().expect("a CIDR")),
        "the node's IPv6 pod CIDR is the one asked for"
    );
    for pod in [&a, &b] {
        let addrs = result_addresses(&pod.result);
        assert_eq!(addrs.len(), 2, "one address per family: {}", pod.result);
        assert!(cidr4.contains(&pod.address), "{} in {cidr4}", pod.address);
        assert!(cidr6.contains(&pod.v6()), "{} in {cidr6}", pod.v6());
        let dsts: Vec<&str> = pod.result["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .filter_map(|r| r["dst"].as_str())
            .collect();
        assert!(
            dsts.contains(&"0.0.0.0/0") && dsts.contains(&"::/0"),
            "a default route per family: {}",
            pod.result
        );
        assert_ipv6_default_route(pod);
    }
    assert_ne!(a.v6(), b.v6());

    let monitor = Monitor::start(&node, &["--type", "drop"]);
    for (to_b, to_a) in [
        (IpAddr::V4(b.address), IpAddr::V4(a.address)),
        (IpAddr::V6(b.v6()), IpAddr::V6(a.v6())),
    ] {
        assert_ping(&a.netns, to_b);
        assert_ping(&b.netns, to_a);
    }
    let before = node.endpoint(&a.container_id);
    for (port, to) in [(5001, IpAddr::V4(b.address)), (5002, IpAddr::V6(b.v6()))] {
        let rx = tcp_sink(&b.netns, port);
        tcp_send(&a.netns, to, port, 8 << 20);
        assert_eq!(
            rx.join().expect("sink"),
            8 << 20,
            "every byte arrives over {to}"
        );
    }

    let ea = node.endpoint(&a.container_id);
    let eb = node.endpoint(&b.container_id);
    // 8 MiB in segments of at most 64 KiB is at least 128 packets, redirected pod to pod
    // in each family.
    for (family, c_before, c_a, c_b) in [
        ("IPv4", &before.counters4, &ea.counters4, &eb.counters4),
        ("IPv6", &before.counters6, &ea.counters6, &eb.counters6),
    ] {
        assert!(
            c_a.egress.redirected.packets >= c_before.egress.redirected.packets + 128
                && c_a.egress.redirected.bytes >= c_before.egress.redirected.bytes + (8 << 20),
            "{family}: a's egress was not carried by bpf_redirect_peer: {c_a:?}"
        );
        assert!(
            c_b.ingress.redirected.bytes >= 8 << 20,
            "{family}: b's ingress: {c_b:?}"
        );
    }
    // Nothing between the two pods was dropped, in either family (no family taken for
    // one the pod lacks, no own address for a spoofed one).
    let ours: Vec<String> = a
        .addresses()
        .into_iter()
        .chain(b.addresses())
        .map(|ip| ip.to_string())
        .collect();
    let dropped: Vec<serde_json::Value> = monitor
        .drain(Duration::from_secs(1))
        .into_iter()
        .filter(|e| {
            ours.iter()
                .any(|ip| e["source"] == ip.as_str() || e["destination"] == ip.as_str())
        })
        .collect();
    assert!(
        dropped.is_empty(),
        "drops of the pods' own traffic: {dropped:?}"
    );
    // Nor anything else of theirs: not the kernel's link-up messages from `::`
    // (duplicate address detection's solicitation and listener reports), which the
    // datapath lets through to the host.
    for ep in [&ea, &eb] {
        assert!(
            !ep.drops
                .iter()
                .any(|d| d.reason == "unsupported-family" || d.reason == "spoofed-source"),
            "{:?}",
            ep.drops
        );
    }
}

#[test]
fn an_ipv6_only_node_gives_pods_only_ipv6_and_they_talk() {
    hypha_tests::require_root!();
    let node = Node::start_v6_only();
    let a = node.add_pod("a");
    let b = node.add_pod("b");

    let status = node.status();
    assert_eq!(status.node.pod_cidr, None, "{:?}", status.node);
    assert!(status.node.pod_cidr6.is_some(), "{:?}", status.node);
    for pod in [&a, &b] {
        let addrs = result_addresses(&pod.result);
        assert_eq!(addrs, vec![IpAddr::V6(pod.v6())], "{}", pod.result);
        let v4 = pod.netns.exec(&["ip", "-4", "addr", "show", "dev", "eth0"]);
        assert!(!v4.contains("inet "), "no IPv4 address on eth0: {v4}");
        let v4_routes = pod.netns.exec(&["ip", "-4", "route", "show"]);
        assert!(v4_routes.trim().is_empty(), "no IPv4 route: {v4_routes}");
        assert_ipv6_default_route(pod);
    }
    let ea = node.endpoint(&a.container_id);
    assert_eq!(ea.address, None);
    assert_eq!(ea.address6, Some(a.v6()));

    assert_ping(&a.netns, b.v6());
    let _echo = TcpEcho::start(&b.netns, 5003);
    assert!(tcp_ok(&a.netns, b.v6(), 5003), "TCP over IPv6 pod to pod");
    assert_eq!(node.status().ipam.allocated6, 2);
}

#[test]
fn an_ipv4_only_node_drops_ipv6_from_its_pods_as_unsupported_family() {
    hypha_tests::require_root!();
    let node = Node::start();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert_eq!(
        a.address6, None,
        "no IPv6 address on an IPv4-only node: {}",
        a.result
    );
    assert_eq!(node.status().node.pod_cidr6, None);

    // The pod (root inside) gives itself an IPv6 address of a made-up /64 and routes it
    // to the gateway a dual-stack node would have: nothing of it gets through.
    let forged: Ipv6Addr = "fd00:4879:dead::a".parse().unwrap();
    let target: Ipv6Addr = "fd00:4879:dead::b".parse().unwrap();
    b.netns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{target}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    a.netns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{forged}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    let out = ping(&a.netns, target, 3);
    assert!(
        !out.status.success(),
        "IPv6 crossed an IPv4-only node: {}",
        output_text(&out)
    );
    assert!(
        drops(&node, &a, "unsupported-family", "egress") > 0,
        "the IPv6 frames are counted as unsupported-family: {:?}",
        node.endpoint(&a.container_id).drops
    );
    // IPv4 still works.
    assert_ping(&a.netns, b.address);
}

#[test]
fn pods_and_the_host_talk_over_ipv6() {
    hypha_tests::require_root!();
    let node = Node::start_dual();
    let a = node.add_pod("a");
    // The node's own global address (as a real node has one), on its loopback.
    let host: Ipv6Addr = "2001:db8:4879:ff::1".parse().unwrap();
    node.netns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{host}/128"),
        "dev",
        "lo",
    ]);
    let before = node.endpoint(&a.container_id);

    // Host → pod: the /128 route through the host veth, and back.
    let out = ping(&node.netns, a.v6(), 2);
    assert!(
        out.status.success(),
        "the node pings its pod over IPv6: {}\nagent log:\n{}",
        output_text(&out),
        node.log()
    );
    // Pod → host: via fe80::1 (answered by hypha_from_pod) to the host stack.
    assert_ping(&a.netns, host);
    let _echo = TcpEcho::start(&node.netns, 5004);
    assert!(tcp_ok(&a.netns, host, 5004), "TCP pod → host over IPv6");
    let _pod_echo = TcpEcho::start(&a.netns, 5005);
    assert!(
        tcp_ok(&node.netns, a.v6(), 5005),
        "TCP host → pod over IPv6"
    );

    let ep = node.endpoint(&a.container_id);
    assert!(
        ep.counters6.egress.passed.packets >= before.counters6.egress.passed.packets + 2,
        "pod → host goes to the stack, counted as IPv6: {:?}",
        ep.counters6
    );
    assert!(
        ep.counters6.ingress.passed.packets >= before.counters6.ingress.passed.packets + 2,
        "host → pod counted by hypha_to_pod as IPv6: {:?}",
        ep.counters6
    );
}

#[test]
fn pods_reach_the_world_over_ipv6_masqueraded() {
    hypha_tests::require_root!();
    let node = Node::start_dual();
    let a = node.add_pod("a");
    let world = node.join_world();
    let world6: IpAddr = Node::WORLD_ADDRESS6.parse().unwrap();

    let server = tcp_accept_peer(&world, world6, 5006);
    assert!(
        ping_ok(&a.netns, world6),
        "the pod pings the world over IPv6\nagent log:\n{}",
        node.log()
    );
    let pod_ns = a.netns.name().to_owned();
    a.netns
        .spawn(move || {
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::new(world6, 5006),
                Duration::from_secs(5),
            )
            .unwrap_or_else(|e| panic!("connect from {pod_ns} to the world: {e}"))
        })
        .join()
        .expect("connect");
    let peer = server.join().expect("accept");
    assert_eq!(
        peer.ip().to_string(),
        Node::WORLD_GATEWAY6,
        "the world sees the node's address, not the pod's {}",
        a.v6()
    );
}

#[test]
fn check_detects_a_missing_ipv6_default_route_and_address() {
    hypha_tests::require_root!();
    let node = Node::start_dual();
    let a = node.add_pod("a");
    let ok = node.check_pod(&a);
    assert!(ok.status.success(), "CHECK of an intact pod: {ok:?}");

    a.netns.exec(&["ip", "-6", "route", "del", "default"]);
    let (_, msg) = node.check_pod(&a).error();
    assert!(
        msg.contains("::/0"),
        "CHECK names the missing IPv6 default route: {msg}"
    );
    a.netns.exec(&[
        "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
    ]);
    let ok = node.check_pod(&a);
    assert!(ok.status.success(), "CHECK once the route is back: {ok:?}");

    let v6 = a.v6().to_string();
    a.netns.exec(&[
        "ip",
        "-6",
        "addr",
        "del",
        &format!("{v6}/128"),
        "dev",
        "eth0",
    ]);
    let (_, msg) = node.check_pod(&a).error();
    assert!(
        msg.contains(&v6),
        "CHECK names the missing IPv6 address {v6}: {msg}"
    );
}

#[test]
fn del_leaves_nothing_of_either_family() {
    hypha_tests::require_root!();
    let node = Node::start_dual();
    let a = node.add_pod("a");
    let ep = node.endpoint(&a.container_id);
    let status = node.status();
    assert_eq!(
        (status.ipam.allocated, status.ipam.allocated6),
        (1, 1),
        "one address of each family reserved"
    );
    assert_eq!(map_entries(&node, maps::ENDPOINTS4).len(), 1);
    assert_eq!(map_entries(&node, maps::ENDPOINTS6).len(), 1);
    assert_eq!(map_entries(&node, maps::IFACES).len(), 1);

    let del = node.del_pod(&a);
    assert!(del.status.success(), "DEL: {del:?}");

    assert!(
        !node.netns.has_link(&ep.host_ifname),
        "the host veth {} is gone",
        ep.host_ifname
    );
    assert!(node.endpoints().is_empty(), "{:?}", node.endpoints());
    let status = node.status();
    assert_eq!(
        (status.ipam.allocated, status.ipam.allocated6),
        (0, 0),
        "both addresses released: {:?}",
        status.ipam
    );
    for map in [maps::ENDPOINTS4, maps::ENDPOINTS6, maps::IFACES] {
        let left = map_entries(&node, map);
        assert!(left.is_empty(), "{map} still holds {left:?}");
    }
    let route = node
        .netns
        .exec(&["ip", "-6", "route", "show", &a.v6().to_string()]);
    assert!(
        route.trim().is_empty(),
        "the host route to the pod is gone: {route}"
    );
}

#[test]
fn endpoint_list_shows_both_addresses_and_per_family_counters_that_move() {
    hypha_tests::require_root!();
    let node = Node::start_dual();
    let a = node.add_pod("a");
    let b = node.add_pod("b");

    let find = |list: &serde_json::Value| {
        list.as_array()
            .expect("a list")
            .iter()
            .find(|e| e["container_id"] == a.container_id.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("no endpoint {} in {list}", a.container_id))
    };
    let before = find(&endpoint_list_json(&node));
    assert_eq!(before["address"], a.address.to_string());
    assert_eq!(before["address6"], a.v6().to_string());

    assert_ping(&a.netns, b.address);
    let mid = find(&endpoint_list_json(&node));
    assert_ping(&a.netns, b.v6());
    let after = find(&endpoint_list_json(&node));

    let redirected = |e: &serde_json::Value, family: &str| {
        e[family]["egress"]["redirected"]["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("no {family}.egress.redirected.packets in {e}"))
    };
    assert!(
        redirected(&mid, "counters4") >= redirected(&before, "counters4") + 2,
        "IPv4 pings move counters4: {before} → {mid}"
    );
    assert!(
        redirected(&after, "counters6") >= redirected(&mid, "counters6") + 2,
        "IPv6 pings move counters6: {mid} → {after}"
    );
    // The table shows both addresses too.
    let (ok, table, err) = node.hypha(&["endpoint", "list"]);
    assert!(ok, "{table}{err}");
    assert!(
        table.contains(&a.address.to_string()) && table.contains(&a.v6().to_string()),
        "both addresses in the table: {table}"
    );
}

#[test]
fn the_monitor_shows_an_ipv6_drop_with_ipv6_addresses() {
    hypha_tests::require_root!();
    let node = Node::start_dual();
    let a = node.add_pod("spoof");
    let b = node.add_pod("b");
    let ep = node.endpoint(&a.container_id);
    // An address of the IPv6 pod CIDR that is not the pod's: the pod adds it and sends
    // from it.
    let mut octets = a.v6().octets();
    octets[15] ^= 0x55;
    octets[14] ^= 0x55;
    let forged = Ipv6Addr::from(octets);
    a.netns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{forged}/128"),
        "dev",
        "eth0",
        "nodad",
    ]);
    // A first, honest ping resolves the gateway fe80::1 (from the pod's link-local
    // address), so that the forged echo requests go out at once rather than behind a
    // neighbour solicitation that would itself carry the forged source.
    assert_ping(&a.netns, b.v6());
    let id = ep.id.to_string();
    let monitor = Monitor::start(&node, &["--type", "drop", "--endpoint", &id]);

    let out = a.netns.try_exec(&[
        "ping",
        "-6",
        "-c",
        "2",
        "-i",
        "0.3",
        "-W",
        "1",
        "-I",
        &forged.to_string(),
        &b.v6().to_string(),
    ]);
    assert!(
        !out.status.success(),
        "a spoofed IPv6 source got through: {}",
        output_text(&out)
    );
    let event = monitor
        .find(Duration::from_secs(5), |e| {
            e["source"] == forged.to_string().as_str()
                && e["destination"] == b.v6().to_string().as_str()
        })
        .expect("the monitor reports the spoofed IPv6 packets");
    assert_eq!(event["reason"], "spoofed-source");
    assert_eq!(event["direction"], "egress");
    assert_eq!(event["ifindex"], ep.host_ifindex);
    assert!(drops(&node, &a, "spoofed-source", "egress") > 0);
}
