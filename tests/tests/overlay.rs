//! The overlay end to end (privileged: run as root): three nodes of a real cluster
//! ([`hypha_tests::cluster::Cluster`]: an underlay bridge, etcd, an agent per node
//! namespace) in tunnel mode, pods made through `hypha-cni`, traffic between pods on
//! different nodes over the agents' VXLAN devices, and what the receiving node makes of
//! crafted VXLAN packets. One cluster walks through every phase, in an order where each
//! phase leaves the next a working cluster (CI time: the whole file runs in well under
//! 90 s).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use hypha_api::RoutingStatus;
use hypha_tests::cluster::{Cluster, ClusterOpts, ipcache_identity};
use hypha_tests::monitor::Monitor;
use hypha_tests::netns::{NamedNetns, host_has_link};
use hypha_tests::node::{Node, Pod};
use hypha_tests::overlay::{
    Capture, Footprint, Inner, TUNNEL_DEVICE, TUNNEL_PORT, ifname_of, ip_packet, link_json,
    link_mac, link_mtu, peer_addr4, send_udp, snmp, tunnel4, tunnel6, vxlan_payload,
};
use hypha_tests::policies::ALLOW_CLIENT_8080;
use hypha_tests::traffic::{
    Conversation, TcpEcho, UdpEcho, assert_ping, ping, ping_ok, tcp_accept_peer, tcp_ok, tcp_send,
    tcp_sink, udp_ok,
};

/// How long a change made on one node may take to show on another.
const CONVERGE: Duration = Duration::from_secs(10);

/// Pods `app=server` in namespaces labelled `team=blue` may reach on TCP 9090; with
/// [`ALLOW_CLIENT_8080`], the server's whole ingress.
const ALLOW_BLUE_9090: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: server-from-blue
  namespace: default
spec:
  podSelector:
    matchLabels:
      app: server
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          team: blue
    ports:
    - protocol: TCP
      port: 9090
"#;

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn hypha_ok(node: &Node, args: &[&str]) -> String {
    let (ok, out, err) = node.hypha(args);
    assert!(ok, "hypha {}: {out}{err}", args.join(" "));
    out
}

fn routing(node: &Node) -> RoutingStatus {
    node.status()
        .routing
        .unwrap_or_else(|| panic!("no routing section in the status of {}", node.tag))
}

/// Packets `node` counted against its tunnel for `reason` (`hypha status`'s routing
/// drops).
fn tunnel_drops(node: &Node, reason: &str) -> u64 {
    routing(node)
        .drops
        .iter()
        .filter(|d| d.reason == reason)
        .map(|d| d.packets)
        .sum()
}

/// Packets `pod`'s endpoint on `node` dropped for `reason` in `direction`.
fn pod_drops(node: &Node, pod: &Pod, reason: &str, direction: &str) -> u64 {
    node.endpoint(&pod.container_id)
        .drops
        .iter()
        .filter(|d| d.reason == reason && d.direction == direction)
        .map(|d| d.packets)
        .sum()
}

/// Packets `pod` received from the tunnel and sent into it.
fn pod_tunnel(node: &Node, pod: &Pod) -> (u64, u64) {
    let c = node.endpoint(&pod.container_id).counters;
    (c.ingress.tunnel.packets, c.egress.tunnel.packets)
}

/// The output of a command, both streams.
fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `ping -M do -s SIZE` of `to` from `ns`: three echoes that may not be fragmented.
fn ping_df(ns: &NamedNetns, to: IpAddr, size: u32) -> std::process::Output {
    let (size, to_text) = (size.to_string(), to.to_string());
    let mut cmd = vec!["ping"];
    if to.is_ipv6() {
        cmd.push("-6");
    }
    cmd.extend([
        "-M", "do", "-s", &size, "-c", "3", "-i", "0.3", "-W", "1", &to_text,
    ]);
    ns.try_exec(&cmd)
}

/// Whether a TCP connection from `ns` to `to:port` opens (a listener that only accepts
/// is there: [`tcp_accept_peer`]).
fn connects(ns: &NamedNetns, to: IpAddr, port: u16) -> bool {
    ns.spawn(move || {
        TcpStream::connect_timeout(&SocketAddr::new(to, port), Duration::from_secs(2)).is_ok()
    })
    .join()
    .expect("connect thread")
}

/// Whether a UDP datagram from `ns` to `to:port` (nobody listening) is answered with a
/// port unreachable: the connected socket's next receive fails with ECONNREFUSED.
fn udp_refused(ns: &NamedNetns, to: IpAddr, port: u16) -> bool {
    ns.spawn(move || {
        let local: SocketAddr = match to {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = std::net::UdpSocket::bind(local).expect("bind a UDP socket");
        sock.connect((to, port)).expect("connect the UDP socket");
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let _ = sock.send(b"anyone?");
        let mut buf = [0u8; 16];
        matches!(sock.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .join()
    .expect("UDP probe thread")
}

/// Whether ping's output names `mtu` as the path's MTU: "Frag needed and DF set (mtu =
/// N)", "Packet too big: mtu=N", or a local error "message too long, mtu=N" / "mtu: N".
fn reports_mtu(said: &str, mtu: u32) -> bool {
    [
        format!("mtu = {mtu}"),
        format!("mtu={mtu}"),
        format!("mtu: {mtu}"),
    ]
    .iter()
    .any(|m| said.contains(m.as_str()))
}

/// The IPv6 router address of a node with `cidr6` (its CIDR's `::1`).
fn router6(cidr6: &str) -> Ipv6Addr {
    let net: Ipv6Addr = cidr6
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not an IPv6 CIDR: {cidr6}"));
    Ipv6Addr::from(u128::from(net) + 1)
}

/// Everything the overlay promises, on one 3-node cluster, phase by phase: the device
/// and the pods' MTU; pod ↔ pod ICMP, TCP and UDP across nodes in both families with
/// the sources preserved; host ↔ remote pod; pod → world masqueraded; NetworkPolicy
/// peers on other nodes; the VNI as the sender's identity (crafted VXLAN packets); PMTU
/// across the tunnel; an agent SIGKILLed; a node removed; nothing left behind.
#[test]
fn three_nodes_carry_pod_traffic_over_the_tunnel() {
    hypha_tests::require_root!();
    let host_had_tunnel = host_has_link(TUNNEL_DEVICE);
    let mut c = Cluster::start(3, ClusterOpts::default());
    let ips: Vec<Ipv4Addr> = (0..3).map(|i| c.node_ip(i)).collect();

    // 1. Every node runs a collect-metadata VXLAN device on port 8472, MTU = its
    // underlay's less 50, and tunnels to the other two.
    let mut mtus = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let underlay = ifname_of(&node.netns, IpAddr::V4(ips[i]));
        let expected = link_mtu(&node.netns, &underlay) - 50;
        let r = routing(node);
        assert_eq!(r.mode, "tunnel", "node-{i}: {r:?}");
        assert_eq!(r.device.as_deref(), Some(TUNNEL_DEVICE), "node-{i}: {r:?}");
        assert_eq!(r.port, Some(TUNNEL_PORT), "node-{i}: {r:?}");
        assert_eq!(r.mtu, expected, "node-{i}: the pods' MTU");
        let link = link_json(&node.netns, TUNNEL_DEVICE);
        let info = &link["linkinfo"];
        assert_eq!(info["info_kind"], "vxlan", "node-{i}: {link}");
        assert_eq!(info["info_data"]["port"], TUNNEL_PORT, "node-{i}: {link}");
        assert_eq!(info["info_data"]["external"], true, "node-{i}: {link}");
        assert_eq!(link["mtu"], expected, "node-{i}: {link}");
        let converged = Cluster::eventually(CONVERGE, || {
            routing(node).peers == 2 && tunnel4(node).len() == 2 && tunnel6(node).len() == 2
        });
        assert!(
            converged,
            "node-{i} tunnels to {:?} / {:?} ({:?})\n{}",
            tunnel4(node),
            tunnel6(node),
            routing(node),
            tail(&node.log())
        );
        mtus.push(expected);
    }
    // node-0's tunnel entries: the others' CIDRs → their underlay addresses.
    let t4 = tunnel4(&c.nodes[0]);
    for j in [1, 2] {
        let cidr: ipnet::Ipv4Net = c.nodes[j].pod_cidr.parse().unwrap();
        let peer = t4
            .get(&(cidr.network(), u32::from(cidr.prefix_len())))
            .unwrap_or_else(|| panic!("node-0's hypha_tunnel4 lacks node-{j}'s {cidr}: {t4:?}"));
        assert_eq!(peer_addr4(peer), ips[j], "node-{j}'s underlay address");
        assert_eq!(
            peer.flags & hypha_common::PEER_F_IPV6,
            0,
            "an IPv4 underlay"
        );
    }

    // 2. Pods: a server on node-0, a client on node-1, another pod and one of a
    // namespace labelled team=blue on node-2. Their MTU: eth0 and the CNI result's.
    hypha_ok(&c.nodes[2], &["namespace", "label", "blue", "team=blue"]);
    let srv = c.nodes[0].add_labelled_pod("srv", "default", &[("app", "server")]);
    let cli = c.nodes[1].add_labelled_pod("cli", "default", &[("app", "client")]);
    let oth = c.nodes[2].add_labelled_pod("oth", "default", &[("app", "other")]);
    let blue = c.nodes[2].add_labelled_pod("blue", "blue", &[("app", "other")]);
    for (i, pod) in [(0, &srv), (1, &cli), (2, &oth), (2, &blue)] {
        assert_eq!(
            link_mtu(&pod.netns, "eth0"),
            mtus[i],
            "eth0 of a pod on node-{i}"
        );
        let interfaces = pod.result["interfaces"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let eth0 = interfaces
            .iter()
            .find(|i| i["name"] == "eth0" && i["sandbox"].is_string())
            .unwrap_or_else(|| panic!("no eth0 in the CNI result: {}", pod.result));
        assert_eq!(
            eth0["mtu"], mtus[i],
            "the CNI result's eth0: {}",
            pod.result
        );
    }
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let identity = |pod: &Pod| {
        ipcache_identity(&c.nodes[0], pod.address)
            .or_else(|| ipcache_identity(&c.nodes[1], pod.address))
            .or_else(|| ipcache_identity(&c.nodes[2], pod.address))
            .unwrap_or_else(|| panic!("{} in no node's ipcache", pod.address))
    };
    for pod in [&srv, &cli, &oth, &blue] {
        let id = identity(pod);
        for (i, node) in c.nodes.iter().enumerate() {
            assert!(
                Cluster::eventually(CONVERGE, || ipcache_identity(node, pod.address) == Some(id)),
                "node-{i} does not know {} as {id}",
                pod.address
            );
        }
    }
    let (id_client, id_other) = (identity(&cli), identity(&oth));

    // 3. Pod ↔ pod across nodes: ICMP, TCP and UDP, both families; the server sees the
    // client's own address.
    let _echo = TcpEcho::start(&srv.netns, 8080);
    let _echo9090 = TcpEcho::start(&srv.netns, 9090);
    let _udp = UdpEcho::start(&srv.netns, 8080);
    let _cli_echo = TcpEcho::start(&cli.netns, 8081);
    for to in [IpAddr::V4(srv.address), IpAddr::V6(srv.v6())] {
        assert_ping(&cli.netns, to);
        assert!(tcp_ok(&cli.netns, to, 8080), "TCP node-1 → node-0 {to}");
        assert!(udp_ok(&cli.netns, to, 8080), "UDP node-1 → node-0 {to}");
    }
    for to in [IpAddr::V4(cli.address), IpAddr::V6(cli.v6())] {
        assert_ping(&oth.netns, to);
        assert!(tcp_ok(&oth.netns, to, 8081), "TCP node-2 → node-1 {to}");
    }
    for (from, listen) in [
        (IpAddr::V4(cli.address), IpAddr::V4(srv.address)),
        (IpAddr::V6(cli.v6()), IpAddr::V6(srv.v6())),
    ] {
        let peer = tcp_accept_peer(&srv.netns, listen, 7000);
        assert!(
            connects(&cli.netns, listen, 7000),
            "node-1 → node-0 {listen}"
        );
        let peer = peer.join().expect("accept");
        assert_eq!(peer.ip(), from, "the server sees the client pod's address");
    }
    let (srv_in, _) = pod_tunnel(a, &srv);
    let (_, cli_out) = pod_tunnel(b, &cli);
    assert!(
        srv_in > 0 && cli_out > 0,
        "the endpoints count tunnel traffic: server in {srv_in}, client out {cli_out}"
    );
    let nodes = a.client().nodes().expect("node list");
    let n1 = nodes
        .iter()
        .find(|n| n.name == "node-1")
        .unwrap_or_else(|| panic!("node-0 does not list node-1: {nodes:?}"));
    let traffic = n1
        .tunnel
        .unwrap_or_else(|| panic!("no tunnel traffic with node-1 on node-0: {n1:?}"));
    assert!(
        traffic.tx.packets > 0 && traffic.rx.packets > 0,
        "node-0 ↔ node-1: {traffic:?}"
    );

    // 4. Host ↔ remote pod, both ways: node-0's host reaches node-1's pod; node-1's pod
    // reaches node-0's gateway and router6, unmasqueraded.
    assert_ping(&a.netns, cli.address);
    assert_ping(&a.netns, cli.v6());
    assert!(
        tcp_ok(&a.netns, cli.address, 8081),
        "node-0 host → node-1 pod"
    );
    let gateway = a.status().node.gateway.expect("node-0's gateway");
    let r6 = router6(a.pod_cidr6.as_deref().expect("node-0's IPv6 CIDR"));
    for (listen, from) in [
        (IpAddr::V4(gateway), IpAddr::V4(cli.address)),
        (IpAddr::V6(r6), IpAddr::V6(cli.v6())),
    ] {
        assert_ping(&cli.netns, listen);
        let peer = tcp_accept_peer(&a.netns, listen, 7001);
        let connected = connects(&cli.netns, listen, 7001);
        let peer = peer.join().expect("accept on node-0's host");
        assert!(connected, "node-1 pod → node-0 host {listen}");
        assert_eq!(peer.ip(), from, "node-0's host sees the pod's own address");
    }

    // 5. Pod → world still leaves through its own node, masqueraded.
    let world = a.join_world();
    for (listen, seen) in [
        (Node::WORLD_ADDRESS, Node::WORLD_GATEWAY),
        (Node::WORLD_ADDRESS6, Node::WORLD_GATEWAY6),
    ] {
        let listen: IpAddr = listen.parse().unwrap();
        let peer = tcp_accept_peer(&world, listen, 7002);
        assert!(connects(&srv.netns, listen, 7002), "pod → world {listen}");
        let peer = peer.join().expect("accept in the world");
        assert_eq!(peer.ip(), seen.parse::<IpAddr>().unwrap(), "masqueraded");
    }
    drop(world);

    // 6. NetworkPolicy peers on other nodes, applied on node-1 (through the store):
    // app=client may reach the server's 8080, namespaces team=blue its 9090, nothing
    // else.
    let file = b.dir.join("server.yaml");
    std::fs::write(&file, format!("{ALLOW_CLIENT_8080}---{ALLOW_BLUE_9090}")).unwrap();
    hypha_ok(b, &["policy", "apply", "-f", file.to_str().unwrap()]);
    let monitor = Monitor::start(a, &["--type", "drop"]);
    assert!(
        Cluster::eventually(CONVERGE, || !tcp_ok(&oth.netns, srv.address, 8080)),
        "node-0 never enforced node-1's policy\n{}",
        tail(&a.log())
    );
    for to in [IpAddr::V4(srv.address), IpAddr::V6(srv.v6())] {
        assert!(tcp_ok(&cli.netns, to, 8080), "app=client → 8080 {to}");
        assert!(!tcp_ok(&cli.netns, to, 9090), "app=client → 9090 {to}");
        assert!(tcp_ok(&blue.netns, to, 9090), "team=blue → 9090 {to}");
        assert!(!tcp_ok(&blue.netns, to, 8080), "team=blue → 8080 {to}");
        assert!(!tcp_ok(&oth.netns, to, 8080), "app=other → 8080 {to}");
        assert!(!tcp_ok(&oth.netns, to, 9090), "app=other → 9090 {to}");
    }
    let event = monitor
        .find(Duration::from_secs(5), |e| {
            e["source"] == oth.address.to_string() && e["destination_port"] == 8080
        })
        .expect("node-0's monitor reports node-2's pod dropped");
    assert_eq!(event["reason"], "policy-denied", "{event}");
    assert_eq!(event["direction"], "ingress", "{event}");
    assert_eq!(
        event["remote_identity"], id_other,
        "the identity from the VNI: {event}"
    );

    // 7. The VNI is the identity. From node-1's underlay address, SYNs to the server's
    // 8080 with the inner source of the allowed client and the VNI of app=other are
    // dropped by policy; with the VNI of app=client and the inner source of app=other,
    // they are delivered. From an address that is no node's, nothing is; a VNI that is
    // no identity a node sends is refused.
    let dst_mac = link_mac(&a.netns, TUNNEL_DEVICE);
    let src_mac = link_mac(&b.netns, TUNNEL_DEVICE);
    let to = SocketAddr::from((ips[0], TUNNEL_PORT));
    let mut sport = 45000;
    let mut syn = |vni: u32, src: IpAddr, dst: IpAddr| {
        sport += 1;
        let ip = ip_packet(src, dst, Inner::TcpSyn { sport, dport: 8080 });
        (sport, vxlan_payload(vni, dst_mac, src_mac, &ip))
    };
    // What reaches the server pod's eth0: the crafted SYNs, by their source ports.
    let capture = Capture::start(&srv.netns, "eth0");
    let arrived = |port: u16, limit: Duration| {
        capture.saw(limit, |s| {
            s.proto == 6 && s.sport == port && s.dport == 8080
        })
    };
    let segs = || snmp(&srv.netns, "Tcp", "InSegs");
    let denied = || pod_drops(a, &srv, "policy-denied", "ingress");
    for (allowed_src, other_src, dst) in [
        (
            IpAddr::V4(cli.address),
            IpAddr::V4(oth.address),
            IpAddr::V4(srv.address),
        ),
        (
            IpAddr::V6(cli.v6()),
            IpAddr::V6(oth.v6()),
            IpAddr::V6(srv.v6()),
        ),
    ] {
        let (segs0, denied0) = (segs(), denied());
        let (port, packet) = syn(id_other, allowed_src, dst);
        send_udp(&b.netns, IpAddr::V4(ips[1]), to, packet);
        let event = monitor
            .find(Duration::from_secs(5), |e| e["source_port"] == port)
            .unwrap_or_else(|| panic!("no drop of the SYN with VNI {id_other} to {dst}"));
        assert_eq!(event["reason"], "policy-denied", "{event}");
        assert_eq!(event["remote_identity"], id_other, "{event}");
        assert_eq!(event["source"], allowed_src.to_string(), "{event}");
        assert!(
            Cluster::eventually(CONVERGE, || denied() > denied0),
            "the server's policy-denied drops stay at {denied0}"
        );
        assert!(
            !arrived(port, Duration::ZERO),
            "the server pod saw the SYN with VNI {id_other}"
        );

        let (in0, _) = pod_tunnel(a, &srv);
        let (port, packet) = syn(id_client, other_src, dst);
        send_udp(&b.netns, IpAddr::V4(ips[1]), to, packet);
        assert!(
            arrived(port, CONVERGE),
            "the SYN with VNI {id_client} from {other_src} never reached the server pod"
        );
        assert!(segs() > segs0, "the server's TCP took the SYN");
        assert!(pod_tunnel(a, &srv).0 > in0, "delivered from the tunnel");
    }
    let unknown0 = tunnel_drops(a, "unknown-tunnel-source");
    let (intruder, packet) = syn(id_client, IpAddr::V4(cli.address), IpAddr::V4(srv.address));
    send_udp(&c.underlay, IpAddr::V4(c.store_ip()), to, packet);
    assert!(
        Cluster::eventually(CONVERGE, || tunnel_drops(a, "unknown-tunnel-source")
            > unknown0),
        "a VXLAN packet from the bridge's {} was not dropped unknown-tunnel-source: {:?}",
        c.store_ip(),
        routing(a)
    );
    let invalid0 = tunnel_drops(a, "invalid-tunnel-identity");
    let mut invalid = Vec::new();
    for vni in [0, 5] {
        let (port, packet) = syn(vni, IpAddr::V4(cli.address), IpAddr::V4(srv.address));
        send_udp(&b.netns, IpAddr::V4(ips[1]), to, packet);
        invalid.push(port);
    }
    assert!(
        Cluster::eventually(CONVERGE, || tunnel_drops(a, "invalid-tunnel-identity")
            >= invalid0 + 2),
        "VNIs 0 and 5 were not dropped invalid-tunnel-identity: {:?}",
        routing(a)
    );
    for port in invalid.into_iter().chain([intruder]) {
        assert!(
            !arrived(port, Duration::ZERO),
            "the server pod saw the SYN from port {port}"
        );
    }
    drop((capture, monitor));

    // 8. node-0's agent SIGKILLed: an established flow and new ones keep working, the
    // policy holds; restarted, still.
    let conversation = Conversation::open(&cli.netns, srv.address, 8080);
    conversation.talk(10);
    c.kill_agent(0);
    conversation.talk(50);
    assert!(
        tcp_ok(&cli.netns, srv.address, 8080),
        "a new flow, agent down"
    );
    assert!(
        !tcp_ok(&oth.netns, srv.address, 8080),
        "the policy, agent down"
    );
    assert!(ping_ok(&srv.netns, oth.v6()), "node-0 → node-2, agent down");
    c.restart_agent(0);
    conversation.talk(50);
    assert!(
        tcp_ok(&cli.netns, srv.address, 8080),
        "a new flow, agent back"
    );
    assert!(
        !tcp_ok(&oth.netns, srv.address, 8080),
        "the policy, agent back"
    );
    drop(conversation);

    // 9. node-2 stopped and removed: the others stop tunnelling to it.
    assert_ping(&srv.netns, oth.address);
    c.kill_agent(2);
    hypha_ok(&c.nodes[0], &["node", "remove", "node-2", "--force"]);
    let cidr2: ipnet::Ipv4Net = c.nodes[2].pod_cidr.parse().unwrap();
    let key2 = (cidr2.network(), u32::from(cidr2.prefix_len()));
    for i in [0, 1] {
        let node = &c.nodes[i];
        assert!(
            Cluster::eventually(CONVERGE, || {
                let t4 = tunnel4(node);
                !t4.contains_key(&key2) && t4.len() == 1 && tunnel6(node).len() == 1
            }),
            "node-{i} still tunnels to node-2: {:?} {:?}",
            tunnel4(node),
            tunnel6(node)
        );
        assert_eq!(routing(node).peers, 1, "node-{i}");
    }
    let a = &c.nodes[0];
    let no_peer0 = tunnel_drops(a, "no-tunnel-peer");
    for to in [IpAddr::V4(oth.address), IpAddr::V6(oth.v6())] {
        let out = ping(&srv.netns, to, 1);
        assert!(!out.status.success(), "node-2's pod {to} still answers");
    }
    assert!(
        tunnel_drops(a, "no-tunnel-peer") > no_peer0,
        "node-0 drops what it routes to node-2's CIDR no-tunnel-peer: {:?}",
        routing(a)
    );
    assert!(
        tcp_ok(&cli.netns, srv.address, 8080),
        "node-1 ↔ node-0 unaffected"
    );

    // 10. ICMP errors from the far side reach the sender through the tunnel, into a
    // pod whose ingress policy allows none of their sources (errors of its own tracked
    // flows): a port unreachable from node-1's pod; "frag needed" / "packet too big"
    // from node-1's host, which forwards to a smaller-MTU link (1300) the addresses the
    // server pings in node-1's pod CIDR, and the server pod learns the path MTU.
    for to in [IpAddr::V4(cli.address), IpAddr::V6(cli.v6())] {
        assert!(
            udp_refused(&srv.netns, to, 9),
            "no port unreachable from {to} reached the server pod"
        );
    }
    let far = &c.nodes[1];
    // (A veth pair inside node-1, both ends at 1300: this kernel has no dummy links.)
    far.netns.exec(&[
        "ip", "link", "add", "hpmtu", "mtu", "1300", "type", "veth", "peer", "name", "hpmtu2",
        "mtu", "1300",
    ]);
    far.netns.exec(&["ip", "link", "set", "hpmtu2", "up"]);
    far.netns.exec(&["ip", "link", "set", "hpmtu", "up"]);
    let cidr1: ipnet::Ipv4Net = far.pod_cidr.parse().unwrap();
    let behind4 = Ipv4Addr::from(u32::from(cidr1.network()) + 200);
    let cidr1_6 = far.pod_cidr6.clone().expect("node-1's IPv6 CIDR");
    let behind6 = Ipv6Addr::from(u128::from(router6(&cidr1_6)) + 0xc7);
    far.netns.exec(&[
        "ip",
        "route",
        "add",
        &format!("{behind4}/32"),
        "dev",
        "hpmtu",
    ]);
    far.netns.exec(&[
        "ip",
        "-6",
        "route",
        "add",
        &format!("{behind6}/128"),
        "dev",
        "hpmtu",
    ]);
    for to in [IpAddr::V4(behind4), IpAddr::V6(behind6)] {
        let said = text(&ping_df(&srv.netns, to, 1400));
        assert!(
            reports_mtu(&said, 1300),
            "a 1428-byte DF ping of {to}, forwarded by node-1 to a 1300-byte link: {said}"
        );
        // The pod keeps the path MTU: its next big DF packet is refused locally.
        let said = text(&ping_df(&srv.netns, to, 1400));
        assert!(
            reports_mtu(&said, 1300),
            "the server pod did not keep the path MTU of {to}: {said}"
        );
    }

    // 11. Nothing left behind: namespaces (with the VXLAN devices in them), pins,
    // directories, agents, etcd.
    let footprint = Footprint::of(&c, &[&srv.netns, &cli.netns, &oth.netns, &blue.netns]);
    drop((srv, cli, oth, blue, _echo, _echo9090, _udp, _cli_echo));
    drop(c);
    let left = footprint.left();
    assert!(left.is_empty(), "left behind: {left:#?}");
    assert!(
        host_had_tunnel || !host_has_link(TUNNEL_DEVICE),
        "a {TUNNEL_DEVICE} appeared in the host namespace"
    );
}

/// PMTU when the underlay's path shrinks after pods exist: node-0's route to node-1
/// gets an MTU of 1400 (1350 inside the tunnel); a DF packet of 1428 from node-0's pod
/// gets "frag needed" / "packet too big" with 1350, both families, and TCP adapts. The
/// datapath answers them (`ebpf/src/pmtu.rs`): the vxlan driver sends none for a
/// device that is no bridge port.
#[test]
fn a_shrunk_underlay_path_is_discovered_by_the_pods() {
    hypha_tests::require_root!();
    let c = Cluster::start(2, ClusterOpts::default());
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let srv = a.add_pod("srv");
    let cli = b.add_pod("cli");
    assert!(
        Cluster::eventually(CONVERGE, || ping_ok(&srv.netns, cli.address)),
        "node-0's pod never reached node-1's"
    );
    let ip1 = c.node_ip(1);
    let underlay0 = ifname_of(&a.netns, IpAddr::V4(c.node_ip(0)));
    let route = format!("{ip1}/32");
    a.netns.exec(&[
        "ip", "route", "add", &route, "dev", &underlay0, "mtu", "1400",
    ]);
    for to in [IpAddr::V4(cli.address), IpAddr::V6(cli.v6())] {
        let said = text(&ping_df(&srv.netns, to, 1400));
        assert!(
            reports_mtu(&said, 1350),
            "a 1428-byte DF ping of {to} over a 1400-byte path: {said}"
        );
        let out = ping_df(&srv.netns, to, 1250);
        assert!(out.status.success(), "a ping that fits: {}", text(&out));
    }
    let sink = tcp_sink(&cli.netns, 7003);
    tcp_send(&srv.netns, cli.address, 7003, 2 << 20);
    assert_eq!(
        sink.join().expect("sink"),
        2 << 20,
        "TCP over the smaller path"
    );
}

/// Native routing (`--routing native`): no VXLAN device, the pods' MTU is the
/// underlay's, each node routes the other's IPv4 pod CIDR via its underlay address
/// (route protocol 201), and pods on the two nodes reach each other over ICMP and TCP
/// with the receiver's own address seen (no tunnel counted). The harness's underlay is
/// IPv4 only, so IPv6 pod CIDRs are left unrouted (with a warning).
#[test]
fn native_routing_routes_pod_cidrs_over_the_underlay() {
    hypha_tests::require_root!();
    let c = Cluster::start(
        2,
        ClusterOpts {
            agent_args: vec!["--routing".into(), "native".into()],
            ..ClusterOpts::default()
        },
    );
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    for (i, node) in c.nodes.iter().enumerate() {
        let r = routing(node);
        assert_eq!(r.mode, "native", "node-{i}: {r:?}");
        assert_eq!(r.device, None, "node-{i}: {r:?}");
        let underlay = ifname_of(&node.netns, IpAddr::V4(c.node_ip(i)));
        assert_eq!(
            r.mtu,
            link_mtu(&node.netns, &underlay),
            "node-{i}: the pods' MTU"
        );
        assert!(
            !node.netns.has_link(TUNNEL_DEVICE),
            "node-{i} has {TUNNEL_DEVICE} in native mode"
        );
    }
    // node-0 routes node-1's IPv4 pod CIDR via node-1's underlay address, as Hypha's.
    let want = format!("{} via {}", b.pod_cidr, c.node_ip(1));
    assert!(
        Cluster::eventually(CONVERGE, || {
            a.netns
                .exec(&["ip", "route", "show", "proto", "201"])
                .contains(&want)
        }),
        "node-0 has no route `{want}` of protocol 201\n{}",
        tail(&a.log())
    );
    let srv = a.add_pod("srv");
    let cli = b.add_pod("cli");
    let _echo = TcpEcho::start(&srv.netns, 8090);
    assert!(
        Cluster::eventually(CONVERGE, || ping_ok(&cli.netns, srv.address)),
        "node-1's pod never reached node-0's over the underlay"
    );
    assert!(tcp_ok(&cli.netns, srv.address, 8090), "TCP node-1 → node-0");
    assert_eq!(
        pod_tunnel(b, &cli),
        (0, 0),
        "native routing sends nothing through a tunnel"
    );
}
