//! End-to-end tests of network policy (privileged: run as root, here and in CI): real pods
//! made through `hypha-cni`, policies applied with `hypha policy apply` or dropped into the
//! agent's watched directory, traffic that passes or not, and `hypha monitor`.

use std::process::Command;
use std::time::{Duration, Instant};

use hypha_tests::monitor::Monitor;
use hypha_tests::node::{Node, Pod};
use hypha_tests::policies::ALLOW_CLIENT_8080;
use hypha_tests::traffic::{Conversation, TcpEcho, UdpEcho, tcp_ok, udp_ok};

/// A server, a client and an outsider, labelled `app=server|client|other` in `default`.
struct Cluster {
    node: Node,
    server: Pod,
    client: Pod,
    other: Pod,
}

fn cluster() -> Cluster {
    let node = Node::start();
    let server = node.add_labelled_pod("srv", "default", &[("app", "server")]);
    let client = node.add_labelled_pod("cli", "default", &[("app", "client")]);
    let other = node.add_labelled_pod("oth", "default", &[("app", "other")]);
    Cluster {
        node,
        server,
        client,
        other,
    }
}

/// Applies `yaml` with `hypha policy apply -f`, panicking with the CLI's error.
fn apply(node: &Node, name: &str, yaml: &str) {
    let file = node.dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let (ok, out, err) = node.hypha(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "policy apply {name}: {out}{err}");
}

/// Polls `cond` for up to `limit`; the datapath applies policy synchronously with the API,
/// but the watched directory is polled.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn a_network_policy_allows_exactly_what_it_says() {
    hypha_tests::require_root!();
    let c = cluster();
    let _web = TcpEcho::start(&c.server.netns, 8080);
    let _admin = TcpEcho::start(&c.server.netns, 9090);
    let _dns = UdpEcho::start(&c.server.netns, 5353);
    let _back = TcpEcho::start(&c.client.netns, 7000);
    let s = c.server.address;
    // No policy selects the server: everything passes.
    assert!(tcp_ok(&c.other.netns, s, 8080) && udp_ok(&c.other.netns, s, 5353));

    apply(&c.node, "allow", ALLOW_CLIENT_8080);
    assert!(
        tcp_ok(&c.client.netns, s, 8080),
        "client → server:8080 is allowed"
    );
    assert!(!tcp_ok(&c.client.netns, s, 9090), "another port is not");
    assert!(!tcp_ok(&c.other.netns, s, 8080), "another pod is not");
    assert!(!udp_ok(&c.client.netns, s, 5353), "nor UDP");
    assert!(
        tcp_ok(&c.server.netns, c.client.address, 7000),
        "the server's egress is not selected, so it is not restricted"
    );
    let ep = c.node.endpoint(&c.server.container_id);
    assert!(
        ep.drops
            .iter()
            .any(|d| d.reason == "policy-denied" && d.direction == "ingress"),
        "{:?}",
        ep.drops
    );

    let (ok, out, err) = c.node.hypha(&["policy", "delete", "server-from-client"]);
    assert!(ok, "{out}{err}");
    assert!(
        tcp_ok(&c.other.netns, s, 8080),
        "deleting the policy opens the server again"
    );
}

#[test]
fn an_egress_policy_restricts_what_a_pod_sends() {
    hypha_tests::require_root!();
    let c = cluster();
    let _dns = UdpEcho::start(&c.server.netns, 5353);
    let _dns_other = UdpEcho::start(&c.other.netns, 5353);
    let _web = TcpEcho::start(&c.other.netns, 80);
    apply(
        &c.node,
        "egress",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-dns-only, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector: {matchLabels: {app: server}}
    ports:
    - {protocol: UDP, port: 5353}
"#,
    );
    assert!(
        udp_ok(&c.client.netns, c.server.address, 5353),
        "allowed UDP, and its reply"
    );
    assert!(
        !udp_ok(&c.client.netns, c.other.address, 5353),
        "UDP elsewhere is not"
    );
    assert!(!tcp_ok(&c.client.netns, c.other.address, 80), "nor TCP");
    assert!(
        tcp_ok(&c.server.netns, c.other.address, 80),
        "pods the policy does not select are unaffected"
    );
}

#[test]
fn an_explicit_deny_wins_and_the_monitor_names_it() {
    hypha_tests::require_root!();
    let c = cluster();
    let _web = TcpEcho::start(&c.server.netns, 8080);
    let _admin = TcpEcho::start(&c.server.netns, 9090);
    apply(
        &c.node,
        "policies",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-open, namespace: default}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - {}
---
apiVersion: hypha.dev/v1
kind: HyphaNetworkPolicy
metadata: {name: no-admin-for-client, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: client}
    toPorts:
    - ports:
      - {port: "9090", protocol: TCP}
"#,
    );
    let monitor = Monitor::start(&c.node, &["--type", "drop"]);
    let s = c.server.address;
    assert!(
        tcp_ok(&c.client.netns, s, 8080),
        "the allow-all lets 8080 through"
    );
    assert!(
        tcp_ok(&c.other.netns, s, 9090),
        "the deny is only for the client"
    );
    assert!(
        !tcp_ok(&c.client.netns, s, 9090),
        "the deny wins over the allow-all"
    );
    let drop = monitor
        .find(Duration::from_secs(5), |e| e["destination_port"] == 9090)
        .expect("the monitor reports the drop");
    assert_eq!(drop["kind"], "drop");
    assert_eq!(drop["reason"], "policy-deny-rule");
    assert_eq!(drop["policy"], "default/no-admin-for-client");
    assert_eq!(drop["source"], c.client.address.to_string());
    assert_eq!(drop["direction"], "ingress");
}

#[test]
fn a_policy_change_applies_to_new_connections_while_an_allowed_one_keeps_flowing() {
    hypha_tests::require_root!();
    let c = cluster();
    let _web = TcpEcho::start(&c.server.netns, 8080);
    apply(&c.node, "allow", ALLOW_CLIENT_8080);
    let conversation = Conversation::open(&c.client.netns, c.server.address, 8080);
    conversation.talk(20);
    // Now only app=nobody may reach the server.
    apply(
        &c.node,
        "allow",
        &ALLOW_CLIENT_8080.replace("app: client", "app: nobody"),
    );
    assert!(
        !tcp_ok(&c.client.netns, c.server.address, 8080),
        "new connections are refused"
    );
    conversation.talk(200);
}

#[test]
fn audit_mode_reports_what_it_would_drop_and_drops_nothing() {
    hypha_tests::require_root!();
    let c = cluster();
    let _web = TcpEcho::start(&c.server.netns, 8080);
    apply(
        &c.node,
        "audit",
        r#"
apiVersion: hypha.dev/v1
kind: HyphaNetworkPolicy
metadata: {name: server-audit, namespace: default}
spec:
  auditMode: true
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: client}
"#,
    );
    let monitor = Monitor::start(&c.node, &["--type", "policy"]);
    assert!(
        tcp_ok(&c.other.netns, c.server.address, 8080),
        "audit mode drops nothing"
    );
    let audit = monitor
        .find(Duration::from_secs(5), |e| e["kind"] == "policy-audit")
        .expect("the would-be drop is reported");
    assert_eq!(audit["source"], c.other.address.to_string());
    let ep = c.node.endpoint(&c.server.container_id);
    // No policy drop. (The pod's own IPv6 chatter is dropped: Hypha does not manage IPv6.)
    assert!(
        ep.drops.iter().all(|d| d.reason == "unsupported-family"),
        "{:?}",
        ep.drops
    );
}

#[test]
fn the_watched_directory_applies_and_removes_policies() {
    hypha_tests::require_root!();
    let c = cluster();
    let _web = TcpEcho::start(&c.server.netns, 8080);
    let dir = c.node.policy_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("server.yaml");
    std::fs::write(&file, ALLOW_CLIENT_8080).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !tcp_ok(
            &c.other.netns,
            c.server.address,
            8080
        )),
        "a file landing in the directory is enforced"
    );
    assert!(tcp_ok(&c.client.netns, c.server.address, 8080));
    std::fs::remove_file(&file).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || tcp_ok(
            &c.other.netns,
            c.server.address,
            8080
        )),
        "removing the file removes its policy"
    );
}

#[test]
fn an_invalid_file_is_rejected_whole_and_nothing_changes() {
    hypha_tests::require_root!();
    let c = cluster();
    let _web = TcpEcho::start(&c.server.netns, 8080);
    let file = c.node.dir.join("bad.yaml");
    let bad = format!(
        "{ALLOW_CLIENT_8080}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: broken, namespace: default}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - ports:\n    - {{protocol: TCP, port: 70000}}\n"
    );
    std::fs::write(&file, bad).unwrap();
    let (ok, out, err) = c
        .node
        .hypha(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("bad.yaml") && err.contains("70000"),
        "names the file and value: {err}"
    );
    let (_, list, _) = c.node.hypha(&["policy", "list", "-o", "json"]);
    assert_eq!(
        list.trim(),
        "[]",
        "nothing was applied, not even the valid first document"
    );
    assert!(tcp_ok(&c.other.netns, c.server.address, 8080));
}

#[test]
fn metrics_show_forwarded_dropped_and_policy_counts() {
    hypha_tests::require_root!();
    let node = Node::start_with(&["--metrics-addr", "127.0.0.1:9962"]);
    let server = node.add_labelled_pod("srv", "default", &[("app", "server")]);
    let client = node.add_labelled_pod("cli", "default", &[("app", "client")]);
    let other = node.add_labelled_pod("oth", "default", &[("app", "other")]);
    let _web = TcpEcho::start(&server.netns, 8080);
    apply(&node, "allow", ALLOW_CLIENT_8080);
    assert!(tcp_ok(&client.netns, server.address, 8080));
    assert!(!tcp_ok(&other.netns, server.address, 8080));
    let scrape = node
        .netns
        .exec(&["curl", "-sf", "http://127.0.0.1:9962/metrics"]);
    let value = |prefix: &str| -> u64 {
        scrape
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert!(
        value(r#"hypha_drops_total{reason="policy-denied",direction="ingress"}"#) >= 1,
        "{scrape}"
    );
    assert!(
        value(r#"hypha_policy_flows_total{policy="default/server-from-client",verdict="allowed"}"#)
            >= 1,
        "{scrape}"
    );
    assert!(value("hypha_packets_total{") > 0, "{scrape}");
    assert!(
        value(r#"hypha_map_entries{map="hypha_policy"}"#) > 0,
        "{scrape}"
    );
    assert_eq!(value("hypha_endpoints "), 3, "{scrape}");
}

/// `hypha status -o json`'s policy part, read as JSON.
fn policy_status(node: &Node) -> serde_json::Value {
    let (ok, out, err) = node.hypha(&["status", "-o", "json"]);
    assert!(ok, "hypha status: {out}{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    status["policy"].clone()
}

/// The errors `hypha status -o json` shows about policy.
fn policy_errors(node: &Node) -> Vec<String> {
    policy_status(node)["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Names of the files `hypha status -o json` lists as refused.
fn refused_files(node: &Node) -> Vec<String> {
    let status = policy_status(node);
    let mut files: Vec<String> = status["refused_files"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let f = r["file"].as_str().unwrap_or_default();
                    f.rsplit('/').next().unwrap_or(f).to_owned()
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// A 200 KB file of 100,000 nested `[` (minutes of libyaml time before the parser's own
/// limit) dropped into the watched directory and posted to the API at once: `hypha status`
/// keeps answering within a second, a pod ADD succeeds, and both copies are refused with
/// the limit and the line.
#[test]
fn a_nesting_bomb_is_refused_while_status_and_add_go_on() {
    hypha_tests::require_root!();
    let node = Node::start();
    let dir = node.policy_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let bomb = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bomb}}\nspec: {}\n",
        "[".repeat(100_000)
    );
    let posted = node.dir.join("posted-bomb.yaml");
    std::fs::write(&posted, &bomb).unwrap();
    std::fs::write(dir.join("bomb.yaml"), &bomb).unwrap();
    let apply = {
        let args = [
            "policy".to_owned(),
            "apply".to_owned(),
            "-f".to_owned(),
            posted.display().to_string(),
            "--socket".to_owned(),
            node.socket().display().to_string(),
        ];
        std::thread::spawn(move || {
            Command::new(hypha_tests::binary("hypha"))
                .args(args)
                .output()
                .expect("run hypha policy apply")
        })
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let asked = Instant::now();
        let (ok, out, err) = node.hypha(&["status"]);
        let took = asked.elapsed();
        assert!(ok, "hypha status: {out}{err}");
        assert!(took < Duration::from_secs(1), "hypha status took {took:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let asked = Instant::now();
    let _pod = node.add_pod("afterbomb");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "ADD took {:?}",
        asked.elapsed()
    );
    let out = apply.join().expect("apply thread");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the bomb was applied");
    assert!(
        err.contains("posted-bomb.yaml: line 4: nesting deeper than 64 levels"),
        "{err}"
    );
    assert!(
        eventually(Duration::from_secs(5), || refused_files(&node)
            == ["bomb.yaml"]),
        "{:?}",
        policy_status(&node)
    );
    let errors = policy_errors(&node);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("bomb.yaml: line 4: nesting deeper than 64 levels")),
        "{errors:?}"
    );
    let (_, list, _) = node.hypha(&["policy", "list", "-o", "json"]);
    assert_eq!(list.trim(), "[]");
}

/// Allows TCP, UDP and SCTP on ports 1 to 40,000 to every pod: 120,000 entries per pod,
/// more than `hypha_policy` holds for three pods.
const EVERY_PORT_FOR_EVERY_POD: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: every-port, namespace: default}
spec:
  podSelector: {}
  ingress:
  - ports:
    - {protocol: TCP, port: 1, endPort: 40000}
    - {protocol: UDP, port: 1, endPort: 40000}
    - {protocol: SCTP, port: 1, endPort: 40000}
"#;

/// A valid file beside an invalid one, one that does not fit the maps and a dangling
/// symlink is enforced; the status names each refused file until it is fixed or removed,
/// and a file that becomes readable is applied without any other change.
#[test]
fn each_file_of_the_watched_directory_is_applied_or_refused_on_its_own() {
    hypha_tests::require_root!();
    let c = cluster();
    let _web = TcpEcho::start(&c.server.netns, 8080);
    let dir = c.node.policy_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("broken.yaml"), "spec: [\n").unwrap();
    std::fs::write(dir.join("big.yaml"), EVERY_PORT_FOR_EVERY_POD).unwrap();
    let target = c.node.dir.join("later.yaml");
    std::os::unix::fs::symlink(&target, dir.join("dangling.yaml")).unwrap();
    std::fs::write(dir.join("good.yaml"), ALLOW_CLIENT_8080).unwrap();
    let s = c.server.address;
    let landed = Instant::now();
    // Finding that big.yaml does not fit means compiling 262,144 entries, twice (all the
    // files together, then big.yaml alone), under the agent's lock: seconds in a debug
    // build.
    assert!(
        eventually(Duration::from_secs(30), || !tcp_ok(&c.other.netns, s, 8080)),
        "good.yaml is enforced beside the refused files; status: {:?}",
        policy_status(&c.node)
    );
    println!("good.yaml enforced after {:?}", landed.elapsed());
    assert!(tcp_ok(&c.client.netns, s, 8080));
    assert!(
        eventually(Duration::from_secs(5), || refused_files(&c.node)
            == ["big.yaml", "broken.yaml", "dangling.yaml"]),
        "{:?}",
        policy_status(&c.node)
    );
    let errors = policy_errors(&c.node);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("big.yaml: ") && e.contains("hypha_policy")),
        "{errors:?}"
    );
    let (_, text, _) = c.node.hypha(&["status"]);
    assert!(
        text.contains("broken.yaml") && text.contains("refused"),
        "{text}"
    );

    // The symlink's target appears (nothing in the directory changes): it is applied.
    std::fs::write(
        &target,
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-closed, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Ingress]
"#,
    )
    .unwrap();
    let _back = TcpEcho::start(&c.client.netns, 7000);
    // Meanwhile big.yaml is retried with backoff, each attempt a compile that overflows
    // the map under the agent's lock (seconds in a debug build): allow for it.
    assert!(
        eventually(Duration::from_secs(30), || !tcp_ok(
            &c.server.netns,
            c.client.address,
            7000
        )),
        "the file behind the symlink is enforced once it can be read"
    );
    // broken.yaml fixed, big.yaml removed: nothing refused any more.
    std::fs::write(
        dir.join("broken.yaml"),
        ALLOW_CLIENT_8080.replace("server-from-client", "fixed"),
    )
    .unwrap();
    std::fs::remove_file(dir.join("big.yaml")).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || refused_files(&c.node)
            .is_empty()
            && policy_errors(&c.node).is_empty()),
        "{:?}",
        policy_status(&c.node)
    );
    let (_, list, _) = c.node.hypha(&["policy", "list", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let mut names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["client-closed", "fixed", "server-from-client"]);
}

/// A file refused because its policy is already defined through the API is applied,
/// with no change to the directory, once the API's policy is deleted: the loop retries
/// refused files with backoff.
#[test]
fn a_refused_file_is_retried_until_it_applies() {
    hypha_tests::require_root!();
    let c = cluster();
    let _web = TcpEcho::start(&c.server.netns, 8080);
    // Through the API: the server is open to every pod.
    apply(
        &c.node,
        "open",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-client, namespace: default}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress: [{}]
"#,
    );
    let dir = c.node.policy_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("server.yaml"), ALLOW_CLIENT_8080).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || policy_errors(&c.node)
            .iter()
            .any(
                |e| e.contains("server.yaml") && e.contains("already defined (api: ")
            )),
        "{:?}",
        policy_status(&c.node)
    );
    assert!(tcp_ok(&c.other.netns, c.server.address, 8080));
    let (ok, out, err) = c.node.hypha(&["policy", "delete", "server-from-client"]);
    assert!(ok, "{out}{err}");
    let applied = Instant::now();
    assert!(
        eventually(Duration::from_secs(15), || {
            let (_, list, _) = c.node.hypha(&["policy", "list", "-o", "json"]);
            list.contains("dir: ")
        }),
        "the refused file is applied once the conflict is gone; {:?}",
        policy_status(&c.node)
    );
    println!("applied {:?} after the conflict went", applied.elapsed());
    assert!(refused_files(&c.node).is_empty() && policy_errors(&c.node).is_empty());
    assert!(!tcp_ok(&c.other.netns, c.server.address, 8080));
    assert!(tcp_ok(&c.client.netns, c.server.address, 8080));
}

// ------------------------------------------------------------------ IPv6

/// As [`cluster`], on a dual-stack node: every pod has an IPv4 and an IPv6 address.
fn dual_cluster() -> Cluster {
    let node = Node::start_dual();
    let server = node.add_labelled_pod("srv", "default", &[("app", "server")]);
    let client = node.add_labelled_pod("cli", "default", &[("app", "client")]);
    let other = node.add_labelled_pod("oth", "default", &[("app", "other")]);
    for pod in [&server, &client, &other] {
        assert_eq!(pod.addresses().len(), 2, "dual-stack pod: {}", pod.result);
    }
    Cluster {
        node,
        server,
        client,
        other,
    }
}

#[test]
fn one_selector_rule_allows_both_families_of_a_peer_and_denies_the_rest_over_ipv6() {
    hypha_tests::require_root!();
    let c = dual_cluster();
    let _web = TcpEcho::start(&c.server.netns, 8080);
    let _admin = TcpEcho::start(&c.server.netns, 9090);
    let _back = TcpEcho::start(&c.client.netns, 7000);
    let s6 = c.server.v6();
    assert!(
        tcp_ok(&c.other.netns, s6, 8080),
        "no policy selects the server: IPv6 passes"
    );

    apply(&c.node, "allow", ALLOW_CLIENT_8080);
    // The rule names the client by its labels: both of its addresses are its identity.
    assert!(
        tcp_ok(&c.client.netns, s6, 8080),
        "client → [server]:8080 over IPv6 is allowed"
    );
    assert!(
        tcp_ok(&c.client.netns, c.server.address, 8080),
        "and over IPv4, by the same rule"
    );
    assert!(
        !tcp_ok(&c.client.netns, s6, 9090),
        "another port is not, over IPv6"
    );
    assert!(
        !tcp_ok(&c.other.netns, s6, 8080),
        "another pod is not, over IPv6"
    );
    assert!(
        !tcp_ok(&c.other.netns, c.server.address, 8080),
        "nor over IPv4"
    );
    assert!(
        tcp_ok(&c.server.netns, c.client.v6(), 7000),
        "the server's egress is not selected: its IPv6 connections pass"
    );
    // The node always reaches its pods (health checks): over IPv6 it sends from its
    // link-local or its own addresses, both the host's identity.
    assert!(
        tcp_ok(&c.node.netns, s6, 9090),
        "the node reaches the isolated server over IPv6"
    );
    let ep = c.node.endpoint(&c.server.container_id);
    assert!(
        ep.drops
            .iter()
            .any(|d| d.reason == "policy-denied" && d.direction == "ingress"),
        "{:?}",
        ep.drops
    );
}

#[test]
fn an_ipv6_egress_policy_restricts_what_a_pod_sends() {
    hypha_tests::require_root!();
    let c = dual_cluster();
    let _dns = UdpEcho::start(&c.server.netns, 5353);
    let _dns_other = UdpEcho::start(&c.other.netns, 5353);
    let _web = TcpEcho::start(&c.other.netns, 80);
    assert!(
        udp_ok(&c.client.netns, c.other.v6(), 5353) && tcp_ok(&c.client.netns, c.other.v6(), 80),
        "before the policy, the client reaches the other pod over IPv6"
    );
    apply(
        &c.node,
        "egress",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-dns-only, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector: {matchLabels: {app: server}}
    ports:
    - {protocol: UDP, port: 5353}
"#,
    );
    assert!(
        udp_ok(&c.client.netns, c.server.v6(), 5353),
        "allowed UDP over IPv6, and its reply"
    );
    assert!(
        !udp_ok(&c.client.netns, c.other.v6(), 5353),
        "UDP elsewhere is not"
    );
    assert!(
        !tcp_ok(&c.client.netns, c.other.v6(), 80),
        "nor TCP over IPv6"
    );
    assert!(
        tcp_ok(&c.server.netns, c.other.v6(), 80),
        "pods the policy does not select are unaffected"
    );
}

#[test]
fn an_ipv6_ip_block_with_except_allows_its_prefix_but_the_hole() {
    hypha_tests::require_root!();
    let c = dual_cluster();
    let _web = TcpEcho::start(&c.server.netns, 8080);
    let cidr6 = c.node.pod_cidr6.clone().expect("a dual-stack node");
    let hole = format!("{}/128", c.other.v6());
    assert!(
        tcp_ok(&c.other.netns, c.server.v6(), 8080),
        "before the policy, the other pod reaches the server over IPv6"
    );
    apply(
        &c.node,
        "block6",
        &format!(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: server-from-pods6, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: server}}}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - ipBlock: {{cidr: '{cidr6}', except: ['{hole}']}}
    ports:
    - {{protocol: TCP, port: 8080}}
"#
        ),
    );
    assert!(
        tcp_ok(&c.client.netns, c.server.v6(), 8080),
        "the client is inside {cidr6}"
    );
    assert!(
        !tcp_ok(&c.other.netns, c.server.v6(), 8080),
        "{hole} is excepted"
    );
    assert!(
        !tcp_ok(&c.other.netns, c.server.address, 8080),
        "an IPv6 ipBlock allows no IPv4 from outside it"
    );
    let (ok, out, err) = c.node.hypha(&["policy", "get", &c.server.container_id]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("cidr {cidr6}")),
        "hypha policy get names the IPv6 CIDR peer: {out}"
    );
}

#[test]
fn an_ipv6_deny_is_reported_by_the_monitor_with_ipv6_addresses() {
    hypha_tests::require_root!();
    let c = dual_cluster();
    let _admin = TcpEcho::start(&c.server.netns, 9090);
    assert!(
        tcp_ok(&c.client.netns, c.server.v6(), 9090),
        "before the policy, the client reaches [server]:9090"
    );
    apply(
        &c.node,
        "deny6",
        r#"
apiVersion: hypha.dev/v1
kind: HyphaNetworkPolicy
metadata: {name: no-admin-for-client, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: client}
    toPorts:
    - ports:
      - {port: "9090", protocol: TCP}
"#,
    );
    let monitor = Monitor::start(&c.node, &["--type", "drop"]);
    assert!(
        !tcp_ok(&c.client.netns, c.server.v6(), 9090),
        "the deny holds over IPv6"
    );
    assert!(
        tcp_ok(&c.other.netns, c.server.v6(), 9090),
        "and only for the client"
    );
    let drop = monitor
        .find(Duration::from_secs(5), |e| {
            e["destination_port"] == 9090 && e["destination"] == c.server.v6().to_string()
        })
        .expect("the monitor reports the IPv6 drop");
    assert_eq!(drop["reason"], "policy-deny-rule");
    assert_eq!(drop["policy"], "default/no-admin-for-client");
    assert_eq!(drop["source"], c.client.v6().to_string());
    assert_eq!(drop["protocol"], "tcp");
}
