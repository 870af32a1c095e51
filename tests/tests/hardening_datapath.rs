//! End-to-end tests of the datapath's hardening (privileged: run as root, here and in
//! CI): a family Hypha does not manage gets nothing through, and no mark set on the host
//! lets a packet skip a pod's ingress policy.
//!
//! Each test starts its own agent in its own network namespace (`hypha_tests::node`),
//! makes pods through the real `hypha-cni`, and sends traffic only between namespaces it
//! created; everything goes with the namespaces when the test ends, also on panic.

use std::process::Output;
use std::time::{Duration, Instant};

use hypha_tests::monitor::Monitor;
use hypha_tests::netns::NamedNetns;
use hypha_tests::node::{Node, Pod};
use hypha_tests::traffic::{TcpEcho, tcp_ok};

/// Applies `yaml` with `hypha policy apply -f`, panicking with the CLI's error.
fn apply(node: &Node, name: &str, yaml: &str) {
    let file = node.dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    let (ok, out, err) = node.hypha(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "policy apply {name}: {out}{err}");
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

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The link-local IPv6 address of `dev` in `ns`, once duplicate address detection is
/// over (the address is usable); panics after 10 s.
fn link_local(ns: &NamedNetns, dev: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ns.exec(&[
            "ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link",
        ]);
        let ready = out
            .lines()
            .find(|l| !l.contains("tentative"))
            .and_then(|l| l.split_whitespace().skip_while(|w| *w != "inet6").nth(1))
            .and_then(|a| a.split('/').next())
            .map(str::to_owned);
        if let Some(addr) = ready {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "no usable link-local address on {dev} in {} within 10 s: {out}",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const LOCKED_DOWN: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: locked-down, namespace: default}
spec:
  podSelector: {matchLabels: {app: locked}}
  policyTypes: [Egress]
"#;

#[test]
fn a_pod_locked_down_by_policy_gets_no_ipv6_through_to_the_host() {
    hypha_tests::require_root!();
    let node = Node::start();
    let pod = node.add_labelled_pod("locked", "default", &[("app", "locked")]);
    apply(&node, "locked-down", LOCKED_DOWN);
    let ep = node.endpoint(&pod.container_id);
    // Both ends have IPv6 on by default, and each gets a usable link-local address.
    let host_ll = link_local(&node.netns, &ep.host_ifname);
    link_local(&pod.netns, "eth0");
    let monitor = Monitor::start(&node, &["--type", "drop"]);

    // Over IPv4 the policy holds: the gateway is refused.
    let gateway = pod.result["ips"][0]["gateway"]
        .as_str()
        .expect("ips[0].gateway")
        .to_owned();
    let v4 = pod
        .netns
        .try_exec(&["ping", "-c", "1", "-W", "1", &gateway]);
    assert!(
        !v4.status.success(),
        "IPv4 to the gateway passed the policy"
    );
    // Over IPv6, neighbour discovery and echo requests alike get nothing through.
    let v6 = pod.netns.try_exec(&[
        "ping", "-6", "-c", "3", "-i", "0.3", "-W", "1", "-I", "eth0", &host_ll,
    ]);
    assert!(
        !v6.status.success(),
        "IPv6 from a locked-down pod reached the host: {}",
        output_text(&v6)
    );

    assert!(
        drops(&node, &pod, "unsupported-family", "egress") > 0,
        "the IPv6 drops are counted for the endpoint: {:?}",
        node.endpoint(&pod.container_id).drops
    );
    let event = monitor
        .find(Duration::from_secs(5), |e| {
            e["reason"] == "unsupported-family" && e["ifindex"] == ep.host_ifindex
        })
        .expect("the monitor reports the IPv6 drop");
    assert_eq!(event["kind"], "drop");
}

#[test]
fn an_ipv6_only_node_drops_ipv4_and_arp_from_its_pods_as_unsupported_family() {
    hypha_tests::require_root!();
    let node = Node::start_v6_only();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    let ep = node.endpoint(&a.container_id);
    let monitor = Monitor::start(&node, &["--type", "drop"]);

    // The pods (root inside) give themselves IPv4 addresses of a made-up subnet: ARP
    // from a is dropped, and so is IPv4 sent straight to the host veth's MAC.
    b.netns
        .exec(&["ip", "addr", "add", "192.0.2.11/24", "dev", "eth0"]);
    a.netns
        .exec(&["ip", "addr", "add", "192.0.2.10/24", "dev", "eth0"]);
    let arp = a
        .netns
        .try_exec(&["ping", "-c", "2", "-i", "0.3", "-W", "1", "192.0.2.11"]);
    assert!(
        !arp.status.success(),
        "IPv4 (behind ARP) crossed an IPv6-only node: {}",
        output_text(&arp)
    );
    let arp_drops = drops(&node, &a, "unsupported-family", "egress");
    assert!(
        arp_drops > 0,
        "ARP is counted as unsupported-family: {:?}",
        node.endpoint(&a.container_id).drops
    );
    a.netns.exec(&[
        "ip",
        "neigh",
        "replace",
        "192.0.2.11",
        "lladdr",
        &ep.host_mac.to_string(),
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    let v4 = a
        .netns
        .try_exec(&["ping", "-c", "2", "-i", "0.3", "-W", "1", "192.0.2.11"]);
    assert!(
        !v4.status.success(),
        "IPv4 crossed an IPv6-only node: {}",
        output_text(&v4)
    );
    assert!(
        drops(&node, &a, "unsupported-family", "egress") >= arp_drops + 2,
        "the IPv4 frames are counted as unsupported-family too: {:?}",
        node.endpoint(&a.container_id).drops
    );
    let event = monitor
        .find(Duration::from_secs(5), |e| {
            e["reason"] == "unsupported-family" && e["ifindex"] == ep.host_ifindex
        })
        .expect("the monitor reports the IPv4 drops");
    assert_eq!(event["kind"], "drop");
    // IPv6 between the same pods still works.
    let v6 = b.address6.expect("b has an IPv6 address").to_string();
    a.netns
        .exec(&["ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", &v6]);
}

/// The value `hypha_to_pod` once trusted in `skb->mark` as "already handled by Hypha"
/// (`MARK_REDIRECTED`, "HYP" + 0x01).
const OLD_MARK_REDIRECTED: &str = "0x48595001";

const SERVER_FROM_CLIENT: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-client, namespace: default}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
"#;

#[test]
fn a_mark_set_on_the_host_does_not_let_the_world_past_a_pods_ingress_policy() {
    hypha_tests::require_root!();
    let node = Node::start();
    let server = node.add_labelled_pod("srv", "default", &[("app", "server")]);
    let _web = TcpEcho::start(&server.netns, 8080);
    let world = node.join_world();
    assert!(
        tcp_ok(&world, server.address, 8080),
        "without a policy the world reaches the server (the routing works)"
    );
    apply(&node, "server-from-client", SERVER_FROM_CLIENT);
    assert!(
        !tcp_ok(&world, server.address, 8080),
        "the policy refuses the world"
    );

    // Any component on the host may mark packets: here with exactly the value the
    // datapath used as "already handled", on the world's traffic, before routing.
    let table = format!("hypha_mark_{}", node.tag.replace('-', "_"));
    let rules = format!(
        "table ip {table} {{\n  chain pre {{\n    type filter hook prerouting priority mangle;\n    \
         ip saddr {} counter meta mark set {OLD_MARK_REDIRECTED}\n  }}\n}}\n",
        Node::WORLD_ADDRESS
    );
    let file = node.dir.join("mark.nft");
    std::fs::write(&file, rules).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    node.netns.exec(&["nft", "-f", file.to_str().unwrap()]);
    let denied_before = drops(&node, &server, "policy-denied", "ingress");
    let monitor = Monitor::start(&node, &["--type", "drop"]);

    assert!(
        !tcp_ok(&world, server.address, 8080),
        "a forged mark let the world past the server's ingress policy"
    );

    let listing = node.netns.exec(&["nft", "list", "table", "ip", &table]);
    assert!(
        !listing.contains("counter packets 0 "),
        "the rule marked the world's packets: {listing}"
    );
    assert!(
        drops(&node, &server, "policy-denied", "ingress") > denied_before,
        "the refusal is counted as a policy drop"
    );
    let event = monitor
        .find(Duration::from_secs(5), |e| {
            e["source"] == Node::WORLD_ADDRESS && e["destination_port"] == 8080
        })
        .expect("the monitor reports the refusal");
    assert_eq!(event["reason"], "policy-denied");
    assert_eq!(event["direction"], "ingress");
}

#[test]
fn a_spoofed_source_reaches_the_monitor_as_a_drop_naming_its_reason() {
    hypha_tests::require_root!();
    let node = Node::start();
    let pod = node.add_pod("spoof");
    let ep = node.endpoint(&pod.container_id);
    // An address of the pod CIDR that is not the pod's: the pod (root inside) adds it and
    // sends from it.
    let prefix = node
        .pod_cidr
        .rsplit_once('.')
        .map(|(p, _)| p.to_owned())
        .expect("an IPv4 pod CIDR");
    let forged = format!("{prefix}.250");
    pod.netns
        .exec(&["ip", "addr", "add", &format!("{forged}/32"), "dev", "eth0"]);
    let gateway = pod.result["ips"][0]["gateway"]
        .as_str()
        .expect("ips[0].gateway")
        .to_owned();
    // Only this endpoint's drops: the filter must select drops that carry no endpoint id.
    let id = ep.id.to_string();
    let monitor = Monitor::start(&node, &["--type", "drop", "--endpoint", &id]);

    let out = pod.netns.try_exec(&[
        "ping", "-c", "2", "-i", "0.3", "-W", "1", "-I", &forged, &gateway,
    ]);

    assert!(
        !out.status.success(),
        "a spoofed source got through: {}",
        output_text(&out)
    );
    let event = monitor
        .find(Duration::from_secs(5), |e| e["source"] == forged.as_str())
        .expect("the monitor reports the spoofed packets");
    assert_eq!(event["reason"], "spoofed-source");
    assert_eq!(event["direction"], "egress");
    assert_eq!(event["ifindex"], ep.host_ifindex);
    assert_eq!(event["destination"], gateway.as_str());
    assert_eq!(event["protocol"], "icmp");
    assert!(drops(&node, &pod, "spoofed-source", "egress") > 0);
}
