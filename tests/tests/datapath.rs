//! End-to-end tests of the same-node datapath (privileged: run as root, here and in CI).
//!
//! Each test starts its own agent in its own network namespace (see `hypha_tests::node`)
//! and makes pods through the real `hypha-cni`, as a runtime would.

use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use hypha_tests::netns::NamedNetns;
use hypha_tests::node::Node;
use hypha_tests::traffic::{Conversation, TcpEcho, assert_ping, tcp_send, tcp_sink};

fn ping(ns: &NamedNetns, to: &str) {
    assert_ping(ns, to.parse::<IpAddr>().expect("an address"));
}

#[test]
fn pods_talk_through_the_ebpf_redirect() {
    hypha_tests::require_root!();
    let node = Node::start();
    let a = node.add_pod("a");
    let b = node.add_pod("b");

    // The CNI result names both ends of the veth and the pod's address and route.
    let ifaces = a.result["interfaces"].as_array().expect("interfaces");
    assert_eq!(ifaces.len(), 2, "{}", a.result);
    assert_eq!(ifaces[1]["name"], "eth0");
    assert_eq!(ifaces[1]["sandbox"], a.netns.path().display().to_string());
    assert!(node.netns.has_link(ifaces[0]["name"].as_str().unwrap()));
    assert_eq!(a.result["routes"][0]["dst"], "0.0.0.0/0");

    ping(&a.netns, &b.address.to_string());
    let rx = tcp_sink(&b.netns, 5001);
    tcp_send(&a.netns, b.address, 5001, 16 << 20);
    assert_eq!(rx.join().unwrap(), 16 << 20, "every byte arrives");

    let ea = node.endpoint(&a.container_id);
    let eb = node.endpoint(&b.container_id);
    // 16 MiB in segments of at most 64 KiB (GSO) is at least 256 packets each way
    // counted on a's egress and b's ingress by the redirect path.
    assert!(
        ea.counters.egress.redirected.packets >= 256
            && ea.counters.egress.redirected.bytes >= 16 << 20,
        "a's egress was not carried by bpf_redirect_peer: {:?}",
        ea.counters
    );
    assert!(
        eb.counters.ingress.redirected.bytes >= 16 << 20,
        "{:?}",
        eb.counters
    );
    // The replies (ACKs) went the other way, also redirected.
    assert!(
        eb.counters.egress.redirected.packets > 0,
        "{:?}",
        eb.counters
    );
    // Nothing of the transfer was dropped. (The pods' own IPv6 chatter, router
    // solicitations and DAD, is: Hypha does not manage IPv6 for them.)
    assert!(
        ea.drops.iter().all(|d| d.reason == "unsupported-family"),
        "{:?}",
        ea.drops
    );
}

#[test]
fn pods_reach_the_host_and_the_host_reaches_pods() {
    hypha_tests::require_root!();
    let node = Node::start();
    let a = node.add_pod("a");
    let gateway = node
        .status()
        .node
        .gateway
        .expect("an IPv4 gateway")
        .to_string();
    ping(&a.netns, &gateway);
    node.netns.exec(&[
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "2",
        &a.address.to_string(),
    ]);
    let ep = node.endpoint(&a.container_id);
    assert!(
        ep.counters.egress.passed.packets >= 2,
        "pod → host goes to the stack: {:?}",
        ep.counters
    );
    assert!(
        ep.counters.ingress.passed.packets >= 2,
        "host → pod counted by hypha_to_pod: {:?}",
        ep.counters
    );
}

#[test]
fn pods_reach_the_world_masqueraded() {
    hypha_tests::require_root!();
    let node = Node::start();
    let a = node.add_pod("a");
    // A "world" host joined to the node by a veth: the node routes and masquerades.
    let world = node.join_world();

    let (tx, rx) = mpsc::channel();
    let server = world.spawn(move || {
        let l = TcpListener::bind("198.18.0.2:5002").expect("bind");
        tx.send(()).unwrap();
        let (_, peer) = l.accept().expect("accept");
        peer
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    a.netns
        .spawn(|| {
            TcpStream::connect_timeout(&"198.18.0.2:5002".parse().unwrap(), Duration::from_secs(5))
                .expect("connect")
        })
        .join()
        .unwrap();
    let peer = server.join().unwrap();
    assert_eq!(
        peer.ip().to_string(),
        "198.18.0.1",
        "the world sees the node's address, not the pod's {}",
        a.address
    );
}

#[test]
fn connections_survive_an_agent_sigkill_and_the_agent_readopts() {
    hypha_tests::require_root!();
    let mut node = Node::start();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    let before: Vec<_> = node
        .endpoints()
        .into_iter()
        .map(|e| (e.id, e.host_ifindex, e.address))
        .collect();
    let _echo = TcpEcho::start(&b.netns, 5003);
    let conv = Conversation::open(&a.netns, b.address, 5003);
    conv.talk(50);

    node.kill_agent();
    conv.talk(200); // the datapath works while the agent is down
    ping(&a.netns, &b.address.to_string());

    node.start_agent();
    let status = node.status();
    assert_eq!(status.endpoints, 2);
    assert_eq!(
        status.datapath.adopted_endpoints, 2,
        "both endpoints re-adopted, not recreated"
    );
    let after: Vec<_> = node
        .endpoints()
        .into_iter()
        .map(|e| (e.id, e.host_ifindex, e.address))
        .collect();
    assert_eq!(before, after, "same endpoints, ids, veths and addresses");
    conv.talk(200); // and keeps working after the restart
    let ea = node.endpoint(&a.container_id);
    assert!(
        ea.counters.egress.redirected.packets >= 450,
        "counters survive the restart: {:?}",
        ea.counters
    );

    // The new agent serves new pods that reach the old ones, and never reuses their addresses.
    let c = node.add_pod("c");
    assert!(c.address != a.address && c.address != b.address);
    ping(&c.netns, &a.address.to_string());
}

#[test]
fn del_is_idempotent_and_leaves_nothing() {
    hypha_tests::require_root!();
    let node = Node::start();
    let a = node.add_pod("a");
    let host_if = a.result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(node.del_pod(&a).status.success());
    assert!(!node.netns.has_link(&host_if), "host veth removed");
    assert!(!a.netns.has_link("eth0"), "pod interface removed");
    assert!(node.endpoints().is_empty());
    assert_eq!(node.status().ipam.allocated, 0);
    let again = node.del_pod(&a);
    assert!(
        again.status.success(),
        "repeated DEL succeeds: {}",
        again.stdout
    );

    // DEL after the netns is gone (the runtime tore the sandbox down first).
    let b = node.add_pod("b");
    let path = b.netns.path().display().to_string();
    let container_id = b.container_id.clone();
    drop(b);
    let out = node.cni(
        &Node::cni_env("DEL", &container_id, &path),
        &node.conf("1.1.0"),
    );
    assert!(
        out.status.success(),
        "DEL with the netns gone succeeds: {}",
        out.stdout
    );
    assert!(node.endpoints().is_empty());
    assert_eq!(node.status().ipam.allocated, 0);
    let pins = std::fs::read_dir(node.pin_dir.join("links"))
        .unwrap()
        .count();
    assert_eq!(pins, 0, "no pinned link left behind");
}

#[test]
fn interface_name_taken_in_the_pod_fails_cleanly() {
    hypha_tests::require_root!();
    let node = Node::start();
    let pod = NamedNetns::named(format!("{}-t", node.tag));
    // Something already called eth0 in the pod.
    pod.exec(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    let id = format!("ctr{}taken", node.tag);
    let path = pod.path().display().to_string();
    let out = node.cni(&Node::cni_env("ADD", &id, &path), &node.conf("1.1.0"));
    let (code, msg) = out.error();
    assert!(
        msg.contains("eth0") && msg.contains("already exists"),
        "{msg}"
    );
    assert_eq!(code, 4, "{msg}");
    // Nothing left behind: no host veth, no address held, no endpoint.
    let links = node.netns.exec(&["ip", "-o", "link", "show"]);
    assert!(!links.contains("hyp"), "no host veth left: {links}");
    assert_eq!(node.status().ipam.allocated, 0);
    assert!(node.endpoints().is_empty());
}

#[test]
fn add_with_the_agent_down_fails_cleanly() {
    hypha_tests::require_root!();
    let mut node = Node::start();
    node.stop_agent();
    let pod = NamedNetns::named(format!("{}-d", node.tag));
    let id = format!("ctr{}down", node.tag);
    let path = pod.path().display().to_string();
    let out = node.cni(&Node::cni_env("ADD", &id, &path), &node.conf("1.1.0"));
    let (code, msg) = out.error();
    assert_eq!(code, 11, "try again later: {msg}");
    assert!(msg.contains("agent.sock"), "{msg}");
    assert!(!pod.has_link("eth0"));
    let links = node.netns.exec(&["ip", "-o", "link", "show"]);
    assert!(!links.contains("hyp"), "no host veth left: {links}");
}

#[test]
fn the_api_is_plain_http_on_a_private_socket() {
    hypha_tests::require_root!();
    use std::os::unix::fs::PermissionsExt as _;
    let node = Node::start();
    let mode = std::fs::metadata(node.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode");
    let out = std::process::Command::new("curl")
        .args(["-sf", "--unix-socket"])
        .arg(node.socket())
        .arg("http://hypha/v1/status")
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["node"]["pod_cidr"], node.pod_cidr);
    // The CLI speaks the same API, in text and JSON.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(hypha_tests::binary("hypha"))
            .args(args)
            .arg("--socket")
            .arg(node.socket())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "hypha {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let _pod = node.add_pod("a");
    assert!(cli(&["status"]).contains(&format!("Pod CIDR:   {}", node.pod_cidr)));
    let list: serde_json::Value =
        serde_json::from_str(&cli(&["endpoint", "list", "-o", "json"])).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert!(
        cli(&["endpoint", "list"])
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains("eth0"))
    );
}

#[test]
fn a_second_agent_on_the_same_socket_or_state_is_refused() {
    hypha_tests::require_root!();
    let node = Node::start();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node.netns.path().display()))
        .arg(hypha_tests::binary("hypha"))
        .arg("agent")
        .arg("--socket")
        .arg(node.socket())
        .arg("--state-dir")
        .arg(node.dir.join("state"))
        .arg("--pin-dir")
        .arg(&node.pin_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another hypha agent already uses the state directory"),
        "{err}"
    );
    assert!(
        node.client().status().is_ok(),
        "the first agent is unharmed"
    );
}

#[test]
fn a_node_takes_everything_down_with_it() {
    hypha_tests::require_root!();
    let node = Node::start();
    let pod = node.add_pod("a");
    let tag = node.tag.clone();
    let pin_dir = node.pin_dir.clone();
    let dir = node.dir.clone();
    drop(pod);
    drop(node);
    let namespaces = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!namespaces.contains(&tag), "namespaces left: {namespaces}");
    assert!(!pin_dir.exists() && !dir.exists());
    let procs = std::process::Command::new("pgrep")
        .args(["-f", &tag])
        .output()
        .unwrap();
    assert!(
        procs.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
}
