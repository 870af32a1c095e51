//! Per-endpoint tracing of the datapath (`hypha endpoint debug`), end to end (privileged:
//! run as root, here and in CI): the agent's log shows a traced pod's packets with their
//! verdicts, and nothing of the pods that are not traced.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use hypha_tests::netns::NamedNetns;
use hypha_tests::node::Node;

fn ping(ns: &NamedNetns, to: &str) {
    ns.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", to]);
}

/// The tracing lines of the agent's log.
fn trace_lines(node: &Node) -> Vec<String> {
    node.log()
        .lines()
        .filter(|l| l.contains("hypha::datapath"))
        .map(str::to_owned)
        .collect()
}

/// Waits up to 5 s for a tracing line containing every one of `parts`.
fn wait_for_line(node: &Node, parts: &[&str]) -> String {
    let start = Instant::now();
    loop {
        if let Some(l) = trace_lines(node)
            .into_iter()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no tracing line with {parts:?}; agent log:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn debug(node: &Node, endpoint: u32, switch: &str) {
    let (ok, out, err) = node.hypha(&["endpoint", "debug", &endpoint.to_string(), switch]);
    assert!(ok, "endpoint debug {endpoint} {switch}: {out}{err}");
}

#[test]
fn a_traced_pod_shows_its_packets_and_verdicts_and_no_other_pod_does() {
    hypha_tests::require_root!();
    let mut node = Node::start();
    let a = node.add_pod("a");
    let b = node.add_labelled_pod("b", "default", &[("app", "b")]);
    let c = node.add_pod("c");
    let (ea, eb, ec) = (
        node.endpoint(&a.container_id),
        node.endpoint(&b.container_id),
        node.endpoint(&c.container_id),
    );
    assert!(!ea.debug, "off by default");

    // Nothing is traced: pings leave no line.
    ping(&a.netns, &b.address.to_string());
    ping(&c.netns, &b.address.to_string());
    assert!(trace_lines(&node).is_empty(), "{:?}", trace_lines(&node));

    debug(&node, ea.id, "on");
    let listed = node.endpoints();
    let traced: Vec<u32> = listed.iter().filter(|e| e.debug).map(|e| e.id).collect();
    assert_eq!(traced, vec![ea.id], "only a is traced");
    let (_, table, _) = node.hypha(&["endpoint", "list"]);
    assert!(
        table.contains(&format!("endpoint {}: packets traced", ea.id)),
        "{table}"
    );

    ping(&a.netns, &b.address.to_string());
    // What a sent: ICMP from a to b, redirected to b's veth.
    let (a_addr, b_addr) = (a.address.to_string(), b.address.to_string());
    wait_for_line(
        &node,
        &[
            &format!(
                "endpoint {} tx: IPv4 ICMP type 8 code 0 {a_addr} -> {b_addr} ttl 64",
                ea.id
            ),
            " bytes",
        ],
    );
    wait_for_line(
        &node,
        &[&format!(
            "endpoint {} tx verdict: redirected to the pod on ifindex {}",
            ea.id, eb.host_ifindex
        )],
    );
    // The replies, which b's program redirects straight into a.
    wait_for_line(
        &node,
        &[&format!(
            "endpoint {} rx from the pod on ifindex {}: IPv4 ICMP type 0 code 0 {b_addr} -> {a_addr}",
            ea.id, eb.host_ifindex
        )],
    );
    // An untraced pod's traffic leaves nothing, even beside a traced one.
    let before = trace_lines(&node).len();
    ping(&c.netns, &b.address.to_string());
    std::thread::sleep(Duration::from_millis(300));
    let lines = trace_lines(&node);
    let c_addr = c.address.to_string();
    assert!(
        lines
            .iter()
            .all(|l| !l.contains(&format!("endpoint {} ", ec.id)) && !l.contains(&c_addr)),
        "{lines:#?}"
    );
    // (a's own lines go on: its IPv6 neighbour and listener reports, for one.)
    assert!(lines.len() >= before);

    // A drop, with its reason and the policy's endpoint: b takes ingress from nobody.
    let dir = tempfile_dir(&node);
    let file = dir.join("deny.yaml");
    std::fs::write(
        &file,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-deny, namespace: default}\nspec: {podSelector: {matchLabels: {app: b}}, policyTypes: [Ingress]}\n",
    )
    .unwrap();
    let (ok, out, err) = node.hypha(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let denied = a
        .netns
        .try_exec(&["ping", "-c", "1", "-W", "1", &b.address.to_string()]);
    assert!(!denied.status.success(), "b's policy refuses a");
    wait_for_line(
        &node,
        &[&format!(
            "endpoint {} tx verdict: dropped (policy-denied) by the policy of endpoint {}: no policy allows it",
            ea.id, eb.id
        )],
    );
    let (ok, out, err) = node.hypha(&["policy", "delete", "b-deny"]);
    assert!(ok, "{out}{err}");

    // Off: no more lines for new pings.
    debug(&node, ea.id, "off");
    assert!(node.endpoints().iter().all(|e| !e.debug));
    let before = trace_lines(&node).len();
    ping(&a.netns, &b.address.to_string());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        trace_lines(&node).len(),
        before,
        "{:#?}",
        trace_lines(&node)
    );

    // On again, and the agent killed and restarted: the setting is saved, and the new
    // agent gets the lines of the programs it swapped into the pinned links.
    debug(&node, ea.id, "on");
    node.kill_agent();
    node.start_agent();
    assert!(
        node.endpoint(&a.container_id).debug,
        "saved with the endpoint"
    );
    let before = trace_lines(&node).len();
    ping(&a.netns, &b.address.to_string());
    let line = wait_for_line(
        &node,
        &[&format!(
            "endpoint {} tx: IPv4 ICMP type 8 code 0 {a_addr} -> {b_addr}",
            ea.id
        )],
    );
    assert!(trace_lines(&node).len() > before, "{line}");
}

#[test]
fn the_debug_route_refuses_unknown_keys_and_unknown_endpoints() {
    hypha_tests::require_root!();
    let node = Node::start();
    let a = node.add_pod("a");
    let id = node.endpoint(&a.container_id).id;
    let (status, body) = put(
        &node,
        &format!("/v1/endpoints/{id}/debug"),
        r#"{"enable":true}"#,
    );
    assert!((400..500).contains(&status), "{status} {body}");
    assert!(body.contains("enable"), "the unknown key is named: {body}");
    assert!(!node.endpoint(&a.container_id).debug);

    let (status, body) = put(&node, "/v1/endpoints/nobody/debug", r#"{"enabled":true}"#);
    assert_eq!(status, 404, "{body}");
    let (ok, _, err) = node.hypha(&["endpoint", "debug", "nobody", "on"]);
    assert!(
        !ok && err.contains("no endpoint with id or container id nobody"),
        "{err}"
    );
    let (ok, _, err) = node.hypha(&["endpoint", "debug", &id.to_string(), "maybe"]);
    assert!(!ok && err.contains("maybe"), "{err}");

    let (status, body) = put(
        &node,
        &format!("/v1/endpoints/{id}/debug"),
        r#"{"enabled":true}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert!(node.endpoint(&a.container_id).debug);
}

/// A directory for the test's files, inside the node's (removed with it).
fn tempfile_dir(node: &Node) -> std::path::PathBuf {
    let dir = node.dir.join("files");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `PUT path` with a JSON body on the agent's socket; (status, body).
fn put(node: &Node, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(node.socket()).expect("connect to the agent");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: hypha\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer}"));
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}
