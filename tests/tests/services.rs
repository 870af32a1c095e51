//! End-to-end tests of Services (issue 14; privileged: run as root, here and in CI): real
//! agents, pods made through `hypha-cni` running a server that answers with its own name
//! (so a client learns which backend served it), services applied with `hypha service
//! apply` and read back with `hypha service list -o json`; ClusterIPs reached from pods
//! and from the host through the socket load balancer, NodePorts reached from a "world"
//! namespace outside the cluster through `hypha_from_netdev`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hypha_api::{EndpointLabelsRequest, NamedPort, ServiceInfo};
use hypha_common::lb;
use hypha_tests::cluster::Cluster;
use hypha_tests::monitor::Monitor;
use hypha_tests::node::{Node, Pod};
use hypha_tests::overlay::{Footprint, ifname_of};
use hypha_tests::policies::ALLOW_CLIENT_8080;
use hypha_tests::services::{
    self, Held, NameServer, ask_tcp, ask_udp, node_port, refused_tcp, service_yaml, tally_tcp, vip,
    wait_backends,
};

/// Where every backend's name server listens.
const BACKEND_PORT: u16 = 8080;
/// How long backends get to follow pods, labels and the store.
const SETTLE: Duration = Duration::from_secs(10);
/// Cluster mode: the store carries services and endpoints to every node.
const CONVERGE: Duration = Duration::from_secs(20);

/// `n` backend pods `<prefix>0..` labelled `app=<app>` in `default` on `node`, each with
/// a name server on [`BACKEND_PORT`] answering its pod's name.
fn backends(node: &Node, prefix: &str, app: &str, n: usize) -> Vec<(Pod, NameServer)> {
    (0..n)
        .map(|i| {
            let name = format!("{prefix}{i}");
            let pod = node.add_labelled_pod(&name, "default", &[("app", app)]);
            let server = NameServer::start(&pod.netns, &name, BACKEND_PORT);
            (pod, server)
        })
        .collect()
}

/// The names of `pods`' backends, as their servers answer.
fn names(prefix: &str, n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// The (address, port) of every backend of `svc`'s port `port_name`.
fn backend_set(svc: &ServiceInfo, port_name: &str) -> BTreeSet<(IpAddr, u16)> {
    svc.ports
        .iter()
        .find(|p| p.name == port_name)
        .unwrap_or_else(|| panic!("no port {port_name:?}: {svc:#?}"))
        .backends
        .iter()
        .map(|b| (b.address, b.port))
        .collect()
}

/// A dual-stack service `default/<name>` selecting `app=<app>`: TCP 80 (`web`) and UDP 53
/// (`dns`), both to [`BACKEND_PORT`], with `extra` spec lines.
fn web_service(name: &str, app: &str, extra: &[&str]) -> String {
    let mut spec = vec![
        "ipFamilyPolicy: RequireDualStack",
        "ipFamilies: [IPv4, IPv6]",
    ];
    spec.extend_from_slice(extra);
    service_yaml(
        "default",
        name,
        app,
        &spec,
        &[
            "{name: web, protocol: TCP, port: 80, targetPort: 8080}",
            "{name: dns, protocol: UDP, port: 53, targetPort: 8080}",
        ],
    )
}

/// The node's own global IPv6 address, on its loopback, as a real node has one (the
/// agent's namespace has none of its own to talk to pods from).
fn give_the_host_an_ipv6_address(node: &Node) {
    node.netns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "2001:db8:4879:ff::1/128",
        "dev",
        "lo",
    ]);
}

/// 1 and 10: a dual-stack ClusterIP service over TCP and UDP, from a pod, from a pod of
/// another namespace and from the host (the agent's namespace), IPv4 and IPv6: every
/// answer comes from a backend, and the client's socket shows the VIP (`getpeername`, the
/// source of a UDP reply). The list counts the connections. Then the pods go (the
/// service refuses at once), then the service: nothing is left in the maps.
#[test]
fn a_cluster_ip_serves_pods_and_the_host_over_tcp_and_udp_in_both_families() {
    hypha_tests::require_root!();
    let node = Node::start_dual();
    give_the_host_an_ipv6_address(&node);
    let bes = backends(&node, "web", "web", 2);
    let client = node.add_labelled_pod("cli", "default", &[("app", "client")]);
    let stranger = node.add_labelled_pod("str", "elsewhere", &[("app", "client")]);
    services::apply(&node, "web", &web_service("web", "web", &[]));
    let svc = wait_backends(&node, "default/web", 2, SETTLE);
    assert_eq!(svc.kind, "ClusterIP");
    assert_eq!(svc.cluster_ips.len(), 2, "one VIP per family: {svc:#?}");
    let expected: BTreeSet<(IpAddr, u16)> = bes
        .iter()
        .flat_map(|(p, _)| p.addresses())
        .filter(IpAddr::is_ipv4)
        .map(|a| (a, BACKEND_PORT))
        .collect();
    let listed4: BTreeSet<_> = backend_set(&svc, "web")
        .into_iter()
        .filter(|(a, _)| a.is_ipv4())
        .collect();
    assert_eq!(listed4, expected, "the IPv4 backends are the two pods");
    let served = names("web", 2);
    // The host's first IPv6 packets to a fresh pod wait out its veth's DAD; past that,
    // every backend answers the host directly, in both families.
    for (pod, _) in &bes {
        for to in pod.addresses() {
            assert!(
                Cluster::eventually(SETTLE, || ask_tcp(&node.netns, to, BACKEND_PORT).is_ok()),
                "the host never reached the backend at {to} directly"
            );
        }
    }

    let clients = [
        ("a pod", &client.netns),
        ("a pod of another namespace", &stranger.netns),
        ("the host", &node.netns),
    ];
    for v6 in [false, true] {
        let vip = vip(&svc, v6);
        for (who, ns) in clients {
            let a = ask_tcp(ns, vip, 80)
                .unwrap_or_else(|e| panic!("TCP from {who} to {vip}:80: {e}\n{}", node.log()));
            assert!(served.contains(&a.name), "{who}: answered by {a:?}");
            assert_eq!(
                a.peer,
                SocketAddr::new(vip, 80),
                "{who}: getpeername shows the VIP"
            );
            let a = ask_udp(ns, vip, 53)
                .unwrap_or_else(|e| panic!("UDP from {who} to {vip}:53: {e}\n{}", node.log()));
            assert!(served.contains(&a.name), "{who}: answered by {a:?}");
            assert_eq!(
                a.peer,
                SocketAddr::new(vip, 53),
                "{who}: the UDP reply comes from the VIP"
            );
        }
    }
    let svc = services::find(&node, "default/web").expect("still listed");
    let connections: u64 = svc
        .ports
        .iter()
        .flat_map(|p| &p.backends)
        .map(|b| b.connections)
        .sum();
    assert!(
        connections >= 12,
        "12 connections and datagrams were translated, the list counts {connections}: {svc:#?}"
    );

    // The pods go: no backend is left and a connection is refused at once.
    for (pod, _) in &bes {
        let out = node.del_pod(pod);
        assert!(out.status.success(), "CNI DEL: {out:?}");
    }
    wait_backends(&node, "default/web", 0, SETTLE);
    let (e, took) = refused_tcp(&client.netns, vip(&svc, false), 80);
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");

    // The service goes: nothing is left in the maps, nothing in the list.
    services::delete(&node, "default/web");
    assert!(
        services::list(&node).is_empty(),
        "{:#?}",
        services::list(&node)
    );
    assert!(
        Cluster::eventually(SETTLE, || services::lb_map_entries(&node)
            .values()
            .all(|&n| n == 0)),
        "left in the maps: {:?}",
        services::lb_map_entries(&node)
    );
    let footprint_netns: Vec<String> = [&client.netns, &stranger.netns, &node.netns]
        .iter()
        .map(|n| n.name().to_owned())
        .chain(bes.iter().map(|(p, _)| p.netns.name().to_owned()))
        .collect();
    let (pin_dir, dir) = (node.pin_dir.clone(), node.dir.clone());
    drop((bes, client, stranger, node));
    let netns = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let left: Vec<&String> = footprint_netns
        .iter()
        .filter(|n| netns.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(!pin_dir.exists() && !dir.exists(), "pins or state left");
}

/// 2 and 3: Maglev spreads 1,000 connections over three backends within ±15% of a third
/// each; a backend relabelled out of the selector takes no new connection while one
/// opened to it before keeps working until closed.
#[test]
fn maglev_spreads_connections_and_a_removed_backend_takes_no_new_ones() {
    hypha_tests::require_root!();
    let node = Node::start();
    let bes = backends(&node, "mg", "mg", 3);
    let client = node.add_labelled_pod("cli", "default", &[("app", "client")]);
    services::apply(
        &node,
        "mg",
        &service_yaml(
            "default",
            "mg",
            "mg",
            &[],
            &["{name: web, protocol: TCP, port: 80, targetPort: 8080}"],
        ),
    );
    let svc = wait_backends(&node, "default/mg", 3, SETTLE);
    let vip = vip(&svc, false);

    let tally = tally_tcp(&client.netns, vip, 80, 1000);
    assert_eq!(
        tally.keys().cloned().collect::<BTreeSet<_>>(),
        names("mg", 3),
        "every connection answered by a backend, through the VIP: {tally:?}"
    );
    for (name, n) in &tally {
        assert!(
            (283..=383).contains(n),
            "{name} served {n} of 1,000 (a third ±15%: 283..=383): {tally:?}"
        );
    }

    let IpAddr::V4(vip4) = vip else {
        panic!("an IPv4 service has an IPv4 VIP: {vip}")
    };
    let table_before = services::maglev_table4(&node, vip4, 80, 6);

    // A connection to some backend, held open; that backend is relabelled away.
    let mut held = Held::open(&client.netns, vip, 80);
    held.talk(5).expect("the held connection talks");
    let (gone, _) = bes
        .iter()
        .find(|(p, _)| p.netns.name().ends_with(&format!("-{}", held.name)))
        .unwrap_or_else(|| panic!("no pod served as {}", held.name));
    let req = EndpointLabelsRequest {
        set: BTreeMap::from([("app".to_owned(), "retired".to_owned())]),
        remove: Vec::new(),
    };
    node.client()
        .set_endpoint_labels(&gone.container_id, &req)
        .expect("relabel the backend");
    let svc = wait_backends(&node, "default/mg", 2, SETTLE);
    assert!(
        !backend_set(&svc, "web").contains(&(IpAddr::V4(gone.address), BACKEND_PORT)),
        "{} is no backend any more: {svc:#?}",
        held.name
    );
    let tally = tally_tcp(&client.netns, vip, 80, 300);
    assert!(
        !tally.contains_key(&held.name),
        "{} was removed, yet served new connections: {tally:?}",
        held.name
    );
    assert_eq!(tally.values().sum::<usize>(), 300);
    assert_eq!(tally.len(), 2, "the other two serve: {tally:?}");
    held.talk(50)
        .expect("the connection opened before the removal keeps working");

    // Maglev moved little: the removed backend's slots went to the others, and at most a
    // few of the others' slots changed hands (the whole change ≤ 40% of the table).
    let table_after = services::maglev_table4(&node, vip4, 80, 6);
    let removed = (gone.address, BACKEND_PORT);
    assert!(
        !table_after.contains(&removed),
        "the table still names {removed:?}"
    );
    let moved = table_before
        .iter()
        .zip(&table_after)
        .filter(|(b, a)| b != a)
        .count();
    let kept_moved = table_before
        .iter()
        .zip(&table_after)
        .filter(|(b, a)| **b != removed && b != a)
        .count();
    assert!(
        moved * 10 <= table_before.len() * 4,
        "{moved} of {} slots changed when one of three backends went",
        table_before.len()
    );
    eprintln!("maglev: {moved} slots moved, {kept_moved} of them from a surviving backend");
}

/// 4: `sessionAffinity: ClientIP` keeps each client on one backend: 50 connections from
/// one pod all reach the same one.
#[test]
fn session_affinity_keeps_a_client_on_one_backend() {
    hypha_tests::require_root!();
    let node = Node::start();
    let _bes = backends(&node, "af", "af", 3);
    let clients: Vec<Pod> = (0..2)
        .map(|i| node.add_labelled_pod(&format!("cli{i}"), "default", &[("app", "client")]))
        .collect();
    services::apply(
        &node,
        "af",
        &service_yaml(
            "default",
            "af",
            "af",
            &[
                "sessionAffinity: ClientIP",
                "sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
            ],
            &["{name: web, protocol: TCP, port: 80, targetPort: 8080}"],
        ),
    );
    let svc = wait_backends(&node, "default/af", 3, SETTLE);
    assert_eq!(svc.session_affinity_timeout, Some(60), "{svc:#?}");
    let vip = vip(&svc, false);
    for c in &clients {
        let tally = tally_tcp(&c.netns, vip, 80, 50);
        assert_eq!(
            tally.len(),
            1,
            "50 connections of one client, one backend: {tally:?}"
        );
        let (name, n) = tally.iter().next().expect("one entry");
        assert!(names("af", 3).contains(name) && *n == 50, "{tally:?}");
    }
}

/// 5: a named `targetPort` resolves per backend: two backends name `http` on different
/// container ports (8080 and 9090); both serve, each on its own port.
#[test]
fn a_named_target_port_resolves_per_backend() {
    hypha_tests::require_root!();
    let node = Node::start();
    let a = node.add_labelled_pod("np0", "default", &[("app", "named")]);
    let b = node.add_labelled_pod("np1", "default", &[("app", "named")]);
    let _sa = NameServer::start(&a.netns, "np0", 8080);
    let _sb = NameServer::start(&b.netns, "np1", 9090);
    for (pod, port) in [(&a, 8080), (&b, 9090)] {
        let http = NamedPort {
            name: "http".to_owned(),
            port,
            protocol: "TCP".to_owned(),
        };
        node.client()
            .set_endpoint_ports(&pod.container_id, &[http])
            .expect("name the pod's port");
    }
    services::apply(
        &node,
        "named",
        &service_yaml(
            "default",
            "named",
            "named",
            &[],
            &["{name: web, protocol: TCP, port: 80, targetPort: http}"],
        ),
    );
    let svc = wait_backends(&node, "default/named", 2, SETTLE);
    assert_eq!(
        backend_set(&svc, "web"),
        BTreeSet::from([(IpAddr::V4(a.address), 8080), (IpAddr::V4(b.address), 9090)]),
        "each backend on the port its `http` names: {svc:#?}"
    );
    assert_eq!(svc.ports[0].target_port, "http");
    let tally = tally_tcp(&node.netns, vip(&svc, false), 80, 100);
    assert_eq!(
        tally.keys().cloned().collect::<BTreeSet<_>>(),
        names("np", 2),
        "both backends serve through the VIP: {tally:?}"
    );
}

/// 6 and 7 on one node: NodePorts reached from a "world" namespace joined to the node
/// (the agent serving NodePorts on the node's side of that link): `Cluster` and `Local`
/// over TCP and UDP, IPv4 and IPv6; `Local` keeps the client's address (the backend sees
/// the world's); a NodePort without backends refuses at once.
#[test]
fn node_ports_answer_the_world_with_both_traffic_policies() {
    hypha_tests::require_root!();
    let mut node = Node::start_dual();
    let world = node.join_world();
    let device = ifname_of(
        &node.netns,
        Node::WORLD_GATEWAY.parse().expect("an address"),
    );
    node.stop_agent();
    node.set_agent_args(&["--nodeport-device", &device]);
    node.start_agent();
    let bes = backends(&node, "np", "np", 2);
    let served = names("np", 2);
    let mut yaml = String::new();
    for (name, policy) in [("np-cluster", "Cluster"), ("np-local", "Local")] {
        yaml.push_str(&web_service(
            name,
            "np",
            &[
                "type: NodePort",
                &format!("externalTrafficPolicy: {policy}"),
            ],
        ));
        yaml.push_str("---\n");
    }
    yaml.push_str(&web_service("np-none", "nobody", &["type: NodePort"]));
    services::apply(&node, "nodeports", &yaml);
    wait_backends(&node, "default/np-cluster", 2, SETTLE);
    wait_backends(&node, "default/np-local", 2, SETTLE);
    let gateways: [IpAddr; 2] = [
        Node::WORLD_GATEWAY.parse().expect("an address"),
        Node::WORLD_GATEWAY6.parse().expect("an address"),
    ];
    let worlds: [IpAddr; 2] = [
        Node::WORLD_ADDRESS.parse().expect("an address"),
        Node::WORLD_ADDRESS6.parse().expect("an address"),
    ];

    for name in ["np-cluster", "np-local"] {
        let svc = services::find(&node, &format!("default/{name}")).expect("listed");
        assert_eq!(svc.kind, "NodePort");
        let (tcp, udp) = (node_port(&svc, "web"), node_port(&svc, "dns"));
        for gw in gateways {
            let a = ask_tcp(&world, gw, tcp).unwrap_or_else(|e| {
                panic!(
                    "{name}: TCP from the world to {gw}:{tcp}: {e}\n{}",
                    node.log()
                )
            });
            assert!(served.contains(&a.name), "{name}: {a:?}");
            assert_eq!(a.peer, SocketAddr::new(gw, tcp), "{name}");
            let a = ask_udp(&world, gw, udp).unwrap_or_else(|e| {
                panic!(
                    "{name}: UDP from the world to {gw}:{udp}: {e}\n{}",
                    node.log()
                )
            });
            assert!(served.contains(&a.name), "{name}: {a:?}");
            assert_eq!(
                a.peer,
                SocketAddr::new(gw, udp),
                "{name}: the reply comes from the node's address and NodePort"
            );
        }
    }
    // `Local`: the backends saw the world's own addresses (no SNAT). Asked last, so the
    // newest peers of whichever backend served are the world's.
    let peers: Vec<IpAddr> = bes
        .iter()
        .flat_map(|(_, s)| s.peers())
        .map(|p| p.ip().to_canonical())
        .collect();
    for w in worlds {
        assert!(
            peers.contains(&w),
            "a backend saw the world's {w} (Local keeps the client): {peers:?}"
        );
    }

    // No backends: refused at once, not a timeout.
    let none = services::find(&node, "default/np-none").expect("listed");
    let port = node_port(&none, "web");
    for gw in gateways {
        // A reset, refused on the SYN itself (an ICMP error would be taken only on its
        // retransmission, a second later: see `ebpf/src/nodeport.rs`).
        let (e, took) = refused_tcp(&world, gw, port);
        assert_eq!(
            e.kind(),
            ErrorKind::ConnectionRefused,
            "NodePort {gw}:{port} without backends: {e}"
        );
        assert!(
            took < Duration::from_millis(300),
            "NodePort {gw}:{port} refused after {took:?}"
        );
    }
    // And from a pod, its ClusterIP refuses too.
    let client = node.add_pod("cli");
    let (e, took) = refused_tcp(&client.netns, vip(&none, false), 80);
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
}

/// 8: policy applies after translation: the backends allow TCP 8080 from `app=client`
/// only, so a client connects through the VIP and another pod is dropped (a timeout, not
/// a refusal), and the monitor names the service on that drop.
#[test]
fn policy_on_the_backends_holds_through_the_vip() {
    hypha_tests::require_root!();
    let node = Node::start();
    let _bes = backends(&node, "srv", "server", 2);
    let client = node.add_labelled_pod("cli", "default", &[("app", "client")]);
    let other = node.add_labelled_pod("oth", "default", &[("app", "other")]);
    let policy = node.dir.join("allow.yaml");
    std::fs::write(&policy, ALLOW_CLIENT_8080).expect("write the policy");
    let (ok, out, err) = node.hypha(&["policy", "apply", "-f", &policy.display().to_string()]);
    assert!(ok, "policy apply: {out}{err}");
    services::apply(
        &node,
        "guarded",
        &service_yaml(
            "default",
            "guarded",
            "server",
            &[],
            &["{name: web, protocol: TCP, port: 80, targetPort: 8080}"],
        ),
    );
    let svc = wait_backends(&node, "default/guarded", 2, SETTLE);
    let vip = vip(&svc, false);
    let monitor = Monitor::start(&node, &["--type", "drop"]);

    let tally = tally_tcp(&client.netns, vip, 80, 20);
    assert_eq!(
        tally.values().sum::<usize>(),
        20,
        "the allowed client connects through the VIP: {tally:?}"
    );
    assert!(
        tally.keys().all(|k| names("srv", 2).contains(k)),
        "{tally:?}"
    );
    let e = ask_tcp(&other.netns, vip, 80).expect_err("the other pod is refused by policy");
    assert!(
        matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "a policy drop is silent (a timeout), got {e}"
    );
    let drop = monitor
        .find(Duration::from_secs(5), |ev| {
            ev["destination_port"] == BACKEND_PORT && ev["source"] == other.address.to_string()
        })
        .expect("the monitor reports the drop at the backend, after translation");
    assert_eq!(drop["direction"], "ingress", "{drop}");
    assert!(
        drop.to_string().contains("default/guarded"),
        "the monitor names the service the drop came through: {drop}"
    );
}

/// 6 and 9 across three nodes: a service applied on node-0 is programmed on every node;
/// a pod on node-0 reaches backends on node-1 and node-2 through its ClusterIP; a
/// NodePort of node-0 (`Cluster`) reaches a backend on another node through the overlay,
/// over IPv4 and IPv6 (SNATed to node-0's gateway, or its IPv6 router address), while a `Local`
/// NodePort refuses on node-0 (no backend there) and keeps the client's address on
/// node-1. The world is the underlay namespace (etcd's, no node). Then
/// everything goes and nothing is left: maps, lists, namespaces, processes.
#[test]
fn services_span_the_cluster_and_node_ports_cross_the_overlay() {
    hypha_tests::require_root!();
    let c = services::nodeport_cluster(3);
    let b1 = c.nodes[1].add_labelled_pod("cb1", "default", &[("app", "spread")]);
    let b2 = c.nodes[2].add_labelled_pod("cb2", "default", &[("app", "spread")]);
    let s1 = NameServer::start(&b1.netns, "cb1", BACKEND_PORT);
    let s2 = NameServer::start(&b2.netns, "cb2", BACKEND_PORT);
    let client = c.nodes[0].add_labelled_pod("cli", "default", &[("app", "client")]);
    let mut yaml = service_yaml(
        "default",
        "spread",
        "spread",
        &[],
        &["{name: web, protocol: TCP, port: 80, targetPort: 8080}"],
    );
    for (name, policy) in [("spread-cluster", "Cluster"), ("spread-local", "Local")] {
        yaml.push_str("---\n");
        yaml.push_str(&service_yaml(
            "default",
            name,
            "spread",
            &[
                "type: NodePort",
                &format!("externalTrafficPolicy: {policy}"),
                "ipFamilyPolicy: RequireDualStack",
                "ipFamilies: [IPv4, IPv6]",
            ],
            &["{name: web, protocol: TCP, port: 80, targetPort: 8080}"],
        ));
    }
    services::apply(&c.nodes[0], "spread", &yaml);
    for (i, node) in c.nodes.iter().enumerate() {
        for key in [
            "default/spread",
            "default/spread-cluster",
            "default/spread-local",
        ] {
            wait_backends(node, key, 2, CONVERGE);
        }
        let maps = services::lb_map_entries(node);
        assert!(
            maps[lb::maps::SERVICES4] >= 3 && maps[lb::maps::BACKENDS4] >= 2,
            "node-{i} programmed the services: {maps:?}"
        );
    }
    let on0 = services::find(&c.nodes[0], "default/spread").expect("listed");
    for (i, node) in c.nodes.iter().enumerate().skip(1) {
        let svc = services::find(node, "default/spread").expect("listed");
        assert_eq!(
            svc.cluster_ips, on0.cluster_ips,
            "node-{i} has the ClusterIP node-0 allocated"
        );
    }

    // ClusterIP from node-0's pod: both remote backends serve (once the overlay carries
    // node-0's pod to them).
    for (b, name) in [(&b1, "cb1"), (&b2, "cb2")] {
        assert!(
            Cluster::eventually(CONVERGE, || ask_tcp(&client.netns, b.address, BACKEND_PORT)
                .is_ok_and(|a| a.name == name)),
            "node-0's pod never reached {name} at {} directly",
            b.address
        );
    }
    let tally = tally_tcp(&client.netns, vip(&on0, false), 80, 200);
    assert_eq!(
        tally.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["cb1".to_owned(), "cb2".to_owned()]),
        "node-0's pod reaches the backends of node-1 and node-2: {tally:?}"
    );

    // NodePorts from the world (the underlay).
    let world = &c.underlay;
    let world_ip = IpAddr::V4(c.store_ip());
    let (n0, n1) = (IpAddr::V4(c.node_ip(0)), IpAddr::V4(c.node_ip(1)));
    let cluster_np = node_port(
        &services::find(&c.nodes[0], "default/spread-cluster").expect("listed"),
        "web",
    );
    for _ in 0..5 {
        let a = ask_tcp(world, n0, cluster_np).unwrap_or_else(|e| {
            panic!(
                "Cluster NodePort {n0}:{cluster_np} from the world: {e}\n{}",
                c.nodes[0].log()
            )
        });
        assert!(a.name == "cb1" || a.name == "cb2", "{a:?}");
        assert_eq!(a.peer, SocketAddr::new(n0, cluster_np));
    }
    // Over IPv6 too: SNATed to node-0's router address, the reply back through the
    // tunnel. Both remote backends serve.
    let n0_6 = IpAddr::V6(services::underlay6(0));
    let mut served6 = BTreeSet::new();
    for _ in 0..20 {
        let a = ask_tcp(world, n0_6, cluster_np).unwrap_or_else(|e| {
            panic!(
                "Cluster NodePort [{n0_6}]:{cluster_np} from the world: {e}\n{}",
                c.nodes[0].log()
            )
        });
        assert_eq!(a.peer, SocketAddr::new(n0_6, cluster_np));
        served6.insert(a.name);
    }
    assert_eq!(
        served6,
        BTreeSet::from(["cb1".to_owned(), "cb2".to_owned()]),
        "the IPv6 Cluster NodePort of node-0 reaches both remote backends"
    );
    let local_np = node_port(
        &services::find(&c.nodes[0], "default/spread-local").expect("listed"),
        "web",
    );
    let (e, took) = refused_tcp(world, n0, local_np);
    assert!(
        matches!(
            e.kind(),
            ErrorKind::ConnectionRefused | ErrorKind::HostUnreachable
        ),
        "a Local NodePort of a node without backends refuses: {e}"
    );
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    let a = ask_tcp(world, n1, local_np).unwrap_or_else(|e| {
        panic!(
            "Local NodePort {n1}:{local_np} from the world: {e}\n{}",
            c.nodes[1].log()
        )
    });
    assert_eq!(
        a.name, "cb1",
        "node-1's Local NodePort serves node-1's backend"
    );
    assert!(
        s1.peers().iter().any(|p| p.ip().to_canonical() == world_ip),
        "Local keeps the world's address {world_ip}: {:?}",
        s1.peers()
    );

    // Everything goes: services from every node's list and maps, then the cluster.
    for key in [
        "default/spread",
        "default/spread-cluster",
        "default/spread-local",
    ] {
        services::delete(&c.nodes[0], key);
    }
    for (i, node) in c.nodes.iter().enumerate() {
        assert!(
            Cluster::eventually(CONVERGE, || services::list(node).is_empty()),
            "node-{i} still lists {:#?}",
            services::list(node)
        );
        assert!(
            Cluster::eventually(SETTLE, || services::lb_map_entries(node)
                .values()
                .all(|&n| n == 0)),
            "node-{i}'s maps keep {:?}",
            services::lb_map_entries(node)
        );
    }
    let footprint = Footprint::of(&c, &[&b1.netns, &b2.netns, &client.netns]);
    drop((s1, s2, b1, b2, client));
    drop(c);
    let left = footprint.left();
    assert!(left.is_empty(), "left behind: {left:#?}");
}
