//! Privileged: the CNI 1.1 contract of the real `hypha-cni`, driven as a runtime drives it
//! (libcni's order of calls, its environment, its `prevResult`s), against a real agent in
//! a node namespace of its own: every operation, the chain with Debian's reference plugins,
//! delegated IPAM (`host-local`, `static`), the capabilities, concurrency, and ADD/DEL
//! cycles with the plugin SIGKILLed midway.
//!
//! Needs the binaries built first (`cargo build --workspace --exclude hypha-ebpf --bins`)
//! and Debian's `containernetworking-plugins` (`cargo xtask setup` installs it).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hypha_tests::cni::{self, Chain, CniRun};
use hypha_tests::netns::NamedNetns;
use hypha_tests::node::Node;
use serde_json::{Value, json};

/// The node's configuration with `extra` keys merged in.
fn conf(node: &Node, version: &str, extra: Value) -> String {
    let mut c = json!({
        "cniVersion": version,
        "name": "hypha",
        "type": "hypha-cni",
        "agentSocket": node.socket(),
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c.to_string()
}

/// A pod namespace of this node.
fn pod_netns(node: &Node, name: &str) -> NamedNetns {
    NamedNetns::named(format!("{}-{name}", node.tag))
}

fn cid(node: &Node, name: &str) -> String {
    format!("ctr{}{name}", node.tag)
}

fn path_of(ns: &NamedNetns) -> String {
    ns.path().display().to_string()
}

fn ok(run: &CniRun, what: &str) -> Value {
    assert!(run.status.success(), "{what} failed: {run:?}");
    if run.stdout.trim().is_empty() {
        Value::Null
    } else {
        run.reply()
    }
}

fn address_of(result: &Value) -> Ipv4Addr {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no ips[0].address in {result}"))
}

/// The hypha host veths in the node's namespace.
fn host_veths(node: &Node) -> Vec<String> {
    node.netns
        .exec(&["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| hypha_cni::naming::is_host_ifname(n))
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn version_probe_with_placeholders() {
    hypha_tests::require_root!();
    // libcni's probe: VERSION with dummy values in the other variables.
    let run = cni::run(
        &[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_CONTAINERID", "dummy"),
            ("CNI_NETNS", "dummy"),
            ("CNI_IFNAME", "dummy"),
            ("CNI_PATH", "dummy"),
        ],
        r#"{"cniVersion": "1.1.0", "name": "probe", "type": "hypha-cni"}"#,
    );
    let reply = ok(&run, "VERSION");
    assert_eq!(reply["cniVersion"], "1.1.0");
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(
            reply["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&json!(v)),
            "{reply}"
        );
    }
}

/// hypha-cni first, then portmap, tuning and firewall, at 1.0.0 (what Debian's plugins
/// speak): ADD, CHECK and DEL as libcni runs them. The reference `bandwidth` plugin is not
/// chained: hypha-cni takes the `bandwidth` capability and the agent enforces it (a root
/// root qdisc of its own on the host veth, which the reference plugin's would collide with).
#[test]
fn chain_with_the_reference_plugins() {
    hypha_tests::require_root!();
    let node = Node::start();
    let pod = pod_netns(&node, "chain");
    let id = cid(&node, "chain");
    let path = path_of(&pod);
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "hypha-chain",
        "plugins": [
            {"type": "hypha-cni", "agentSocket": node.socket(), "someUnknownKey": {"kept": true},
             "capabilities": {"bandwidth": true, "mac": true}},
            {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.arp_notify": "1"}},
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "firewall", "backend": "iptables"},
        ],
    });
    let runtime_config = json!({
        "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 8_000_000, "ingressBurst": 800_000,
                      "egressRate": 8_000_000, "egressBurst": 800_000},
        "mac": "02:68:79:70:68:61",
    });
    let mut chain = Chain::new(&node.netns.path(), list, runtime_config);
    let env = Node::cni_env("ADD", &id, &path);
    let result = chain.add(&env).unwrap_or_else(|e| {
        panic!(
            "chained ADD failed at {}: {:?}\n{}",
            e.plugin,
            e.run,
            node.log()
        )
    });

    // The result carries what the chained plugins need.
    assert_eq!(result["cniVersion"], "1.0.0");
    let host_if = cni::host_ifname(&id, "eth0");
    let ifaces = result["interfaces"].as_array().unwrap();
    assert!(
        ifaces
            .iter()
            .any(|i| i["name"] == host_if && i.get("sandbox").is_none()),
        "{result}"
    );
    assert!(
        ifaces
            .iter()
            .any(|i| i["name"] == "eth0" && i["sandbox"] == path),
        "{result}"
    );
    assert_eq!(result["ips"][0]["interface"], 1, "{result}");
    let address = address_of(&result);

    // mac (hypha-cni), tuning's sysctl in the pod.
    let link = pod.exec(&["ip", "-o", "link", "show", "eth0"]);
    assert!(link.contains("02:68:79:70:68:61"), "{link}");
    let sysctl = pod.exec(&["cat", "/proc/sys/net/ipv4/conf/eth0/arp_notify"]);
    assert_eq!(sysctl.trim(), "1");
    // bandwidth: stored on the endpoint by hypha-cni, and shaped by the agent with its
    // per-flow htb on the host veth (ingress) and on the pod's eth0 (egress).
    let ep = node.endpoint(&id);
    assert_eq!(ep.bandwidth.and_then(|b| b.ingress_rate), Some(8_000_000));
    let qdisc = node.netns.exec(&["tc", "qdisc", "show", "dev", &host_if]);
    assert!(qdisc.contains("htb"), "no htb qdisc on {host_if}: {qdisc}");
    let qdisc = pod.exec(&["tc", "qdisc", "show", "dev", "eth0"]);
    assert!(
        qdisc.contains("htb"),
        "no htb qdisc on the pod's eth0: {qdisc}"
    );
    // portmap's DNAT rule, firewall's forward rules for the pod.
    let nat = node.netns.exec(&["iptables-save", "-t", "nat"]);
    assert!(
        nat.contains("18080") && nat.contains(&address.to_string()),
        "{nat}"
    );
    let filter = node.netns.exec(&["iptables-save", "-t", "filter"]);
    assert!(
        filter.contains("CNI-FORWARD") && filter.contains(&address.to_string()),
        "{filter}"
    );

    // CHECK through the chain, with the final result.
    // Debian's portmap 1.1.1 always checks for IPv6 rules, even for an IPv4-only pod, and
    // fails (containernetworking/plugins#819, fixed after 1.1.1): it is left out here.
    let mut check_chain = Chain::new(
        &node.netns.path(),
        chain.list.clone(),
        chain.runtime_config.clone(),
    );
    check_chain.result = chain.result.clone();
    if let Some(plugins) = check_chain.list["plugins"].as_array_mut() {
        plugins.retain(|p| p["type"] != "portmap");
    }
    check_chain
        .check(&Node::cni_env("CHECK", &id, &path))
        .unwrap_or_else(|e| panic!("chained CHECK failed at {}: {:?}", e.plugin, e.run));

    // DEL in reverse order takes everything down, and can be repeated.
    let del = Node::cni_env("DEL", &id, &path);
    chain
        .del(&del)
        .unwrap_or_else(|e| panic!("chained DEL failed at {}: {:?}", e.plugin, e.run));
    assert!(host_veths(&node).is_empty(), "{:?}", host_veths(&node));
    assert_eq!(node.status().ipam.allocated, 0);
    let nat = node.netns.exec(&["iptables-save", "-t", "nat"]);
    assert!(!nat.contains("18080"), "portmap's rule is gone: {nat}");
    chain
        .del(&del)
        .unwrap_or_else(|e| panic!("repeated chained DEL failed at {}: {:?}", e.plugin, e.run));
}

/// The reference `bandwidth` plugin chained after hypha-cni, for operators who shape with
/// it: hypha-cni's entry does not declare the `bandwidth` capability, so the runtime gives
/// it only to the reference plugin, and the two never both claim the host veth's root
/// qdisc.
#[test]
fn chain_with_the_reference_bandwidth_plugin() {
    hypha_tests::require_root!();
    // The bandwidth plugin adds an ingress qdisc to the host veth; tc mode's clsact
    // would hold that slot (both are ffff:), so chaining it needs TCX.
    let node = Node::start_with(&["--attach", "tcx"]);
    let pod = pod_netns(&node, "rbw");
    let id = cid(&node, "rbw");
    let path = path_of(&pod);
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "hypha-chain-bw",
        "plugins": [
            {"type": "hypha-cni", "agentSocket": node.socket()},
            {"type": "bandwidth", "capabilities": {"bandwidth": true}},
        ],
    });
    let runtime_config = json!({
        "bandwidth": {"ingressRate": 8_000_000, "ingressBurst": 800_000,
                      "egressRate": 8_000_000, "egressBurst": 800_000},
    });
    let mut chain = Chain::new(&node.netns.path(), list, runtime_config);
    chain
        .add(&Node::cni_env("ADD", &id, &path))
        .unwrap_or_else(|e| {
            panic!(
                "chained ADD failed at {}: {:?}\n{}",
                e.plugin,
                e.run,
                node.log()
            )
        });
    let host_if = cni::host_ifname(&id, "eth0");
    let qdisc = node.netns.exec(&["tc", "qdisc", "show", "dev", &host_if]);
    assert!(
        qdisc.contains("tbf"),
        "the reference plugin's tbf on {host_if}: {qdisc}"
    );
    assert_eq!(
        node.endpoint(&id).bandwidth,
        None,
        "hypha-cni was not given the capability"
    );
    let links = node.netns.exec(&["ip", "-o", "link", "show"]);
    assert!(
        links.contains("bwp"),
        "the reference plugin's ifb for egress: {links}"
    );
    let del = Node::cni_env("DEL", &id, &path);
    chain
        .del(&del)
        .unwrap_or_else(|e| panic!("chained DEL failed at {}: {:?}", e.plugin, e.run));
    assert!(host_veths(&node).is_empty(), "{:?}", host_veths(&node));
    assert_eq!(node.status().ipam.allocated, 0);
    let links = node.netns.exec(&["ip", "-o", "link", "show"]);
    assert!(
        !links.contains("bwp"),
        "the reference plugin's ifb is gone: {links}"
    );
}

#[test]
fn check_reports_precisely_what_differs() {
    hypha_tests::require_root!();
    let node = Node::start();
    let pod = pod_netns(&node, "chk");
    let id = cid(&node, "chk");
    let path = path_of(&pod);
    let result = ok(
        &node.cni(&Node::cni_env("ADD", &id, &path), &node.conf("1.1.0")),
        "ADD",
    );
    let address = address_of(&result);
    let check = |extra: Value| {
        node.cni(
            &Node::cni_env("CHECK", &id, &path),
            &conf(&node, "1.1.0", extra),
        )
    };
    ok(&check(json!({"prevResult": result})), "CHECK");

    // Address and default route gone in the pod, host end down.
    pod.exec(&["ip", "addr", "del", &format!("{address}/32"), "dev", "eth0"]);
    node.netns
        .exec(&["ip", "link", "set", &cni::host_ifname(&id, "eth0"), "down"]);
    let (code, msg) = check(json!({"prevResult": result})).error();
    assert_eq!(code, 100, "{msg}");
    assert!(
        msg.contains(&format!("expected {address}/32"))
            || msg.contains(&format!("prevResult says {address}/32")),
        "{msg}"
    );
    assert!(msg.contains("no route to 0.0.0.0/0"), "{msg}");
    assert!(msg.contains("is down"), "{msg}");

    // disableCheck: a runtime would not call it; called anyway, it succeeds.
    ok(
        &check(json!({"prevResult": result, "disableCheck": true})),
        "CHECK with disableCheck",
    );
    // CHECK needs prevResult, and 0.4.0 or later.
    let (code, msg) = check(json!({})).error();
    assert_eq!(code, 7, "{msg}");
    assert!(msg.contains("prevResult"), "{msg}");
    let (code, _) = node
        .cni(
            &Node::cni_env("CHECK", &id, &path),
            &conf(&node, "0.3.1", json!({"prevResult": result})),
        )
        .error();
    assert_eq!(code, 1);

    // The agent's endpoint gone: reported as such.
    ok(
        &node.cni(&Node::cni_env("DEL", &id, &path), &node.conf("1.1.0")),
        "DEL",
    );
    let (code, msg) = check(json!({"prevResult": result})).error();
    assert_eq!(code, 100);
    assert!(msg.contains("interface eth0 is missing"), "{msg}");
    assert!(msg.contains("the agent has no endpoint"), "{msg}");
}

#[test]
fn del_is_best_effort_and_idempotent() {
    hypha_tests::require_root!();
    let mut node = Node::start();
    let del = |node: &Node, id: &str, path: &str| {
        node.cni(&Node::cni_env("DEL", id, path), &node.conf("1.1.0"))
    };

    // The interface gone (deleted inside the pod: the host end goes with it).
    let a = node.add_pod("ifgone");
    a.netns.exec(&["ip", "link", "del", "eth0"]);
    ok(
        &del(&node, &a.container_id, &path_of(&a.netns)),
        "DEL with eth0 gone",
    );
    ok(
        &del(&node, &a.container_id, &path_of(&a.netns)),
        "repeated DEL",
    );

    // The netns gone, and no CNI_NETNS at all.
    let b = node.add_pod("nsgone");
    let (b_id, b_path) = (b.container_id.clone(), path_of(&b.netns));
    drop(b);
    ok(&del(&node, &b_id, &b_path), "DEL with the netns gone");
    let env: Vec<_> = Node::cni_env("DEL", &b_id, "")
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    ok(
        &node.cni(&env, &node.conf("1.1.0")),
        "DEL without CNI_NETNS",
    );
    assert!(node.endpoints().is_empty());
    assert_eq!(node.status().ipam.allocated, 0);

    // The agent down: the delete is left beside its socket and DEL succeeds; the agent
    // finishes it when it is back.
    let c = node.add_pod("agentdown");
    assert_eq!(node.status().ipam.allocated, 1);
    node.kill_agent();
    ok(
        &del(&node, &c.container_id, &path_of(&c.netns)),
        "DEL with the agent down",
    );
    ok(
        &del(&node, &c.container_id, &path_of(&c.netns)),
        "repeated DEL with the agent down",
    );
    assert!(!c.netns.has_link("eth0"), "the veth went anyway");
    let deferred = hypha_api::deferred_deletes_dir(&node.socket());
    assert_eq!(
        std::fs::read_dir(&deferred).unwrap().count(),
        1,
        "one record for both DELs"
    );
    node.start_agent();
    wait_for("the deferred delete", Duration::from_secs(15), || {
        node.status().ipam.allocated == 0 && node.endpoints().is_empty()
    });
    wait_for("the record's removal", Duration::from_secs(10), || {
        std::fs::read_dir(&deferred).map_or(true, |d| d.count() == 0)
    });
    assert!(host_veths(&node).is_empty());
}

#[test]
fn status_reports_50_with_a_reason() {
    hypha_tests::require_root!();
    let mut node = Node::start();
    let status =
        |node: &Node, version: &str| node.cni(&[("CNI_COMMAND", "STATUS")], &node.conf(version));
    ok(&status(&node, "1.1.0"), "STATUS");
    let (code, _) = status(&node, "1.0.0").error();
    assert_eq!(code, 1, "STATUS is a 1.1.0 operation");

    // A pod CIDR with no address left: ADD fails clearly (try again later) and STATUS says
    // the plugin cannot serve ADD.
    node.kill_agent();
    node.pod_cidr = node.pod_cidr.replace(".0/24", ".0/29");
    node.start_agent();
    let capacity = node.status().ipam.capacity as usize;
    assert!(capacity > 0 && capacity < 8, "{capacity}");
    let pods: Vec<_> = (0..capacity)
        .map(|i| node.add_pod(&format!("full{i}")))
        .collect();
    let extra = pod_netns(&node, "extra");
    let start = Instant::now();
    let (code, msg) = node
        .cni(
            &Node::cni_env("ADD", &cid(&node, "extra"), &path_of(&extra)),
            &node.conf("1.1.0"),
        )
        .error();
    assert!(start.elapsed() < Duration::from_secs(5), "no hang");
    assert_eq!(code, 11, "{msg}");
    assert!(msg.contains("no address left"), "{msg}");
    assert!(!extra.has_link("eth0"));
    let (code, msg) = status(&node, "1.1.0").error();
    assert_eq!(code, 50, "{msg}");
    assert!(msg.contains("no address left"), "{msg}");
    drop(pods);

    // The agent down.
    node.kill_agent();
    let (code, msg) = status(&node, "1.1.0").error();
    assert_eq!(code, 50, "{msg}");
    assert!(msg.contains(&node.socket().display().to_string()), "{msg}");
}

#[test]
fn gc_removes_everything_no_valid_attachment_owns() {
    hypha_tests::require_root!();
    let node = Node::start();
    let keep1 = node.add_pod("keep1");
    let keep2 = node.add_pod("keep2");
    let stray = node.add_pod("stray");
    // An ADD killed between the veth and the endpoint: a veth and an address, no endpoint.
    let ghost = cid(&node, "ghost");
    let ghost_if = cni::host_ifname(&ghost, "eth0");
    node.netns.exec(&[
        "ip",
        "link",
        "add",
        &ghost_if,
        "type",
        "veth",
        "peer",
        "name",
        "ghostpeer",
    ]);
    node.client()
        .allocate(&hypha_api::AllocateRequest {
            container_id: ghost.clone(),
            ifname: "eth0".into(),
            address: None,
            address6: None,
        })
        .unwrap();
    assert_eq!(node.status().ipam.allocated, 4);
    // Something else's veth that only looks a bit like ours stays.
    node.netns.exec(&[
        "ip",
        "link",
        "add",
        "hypnotic0",
        "type",
        "veth",
        "peer",
        "name",
        "hypnotic1",
    ]);

    let valid = |pods: &[&hypha_tests::node::Pod]| -> Value {
        pods.iter()
            .map(|p| json!({"containerID": p.container_id, "ifname": "eth0"}))
            .collect()
    };
    let gc = |extra: Value| node.cni(&[("CNI_COMMAND", "GC")], &conf(&node, "1.1.0", extra));

    // disableGC: nothing happens.
    ok(
        &gc(json!({"disableGC": true, "cni.dev/valid-attachments": []})),
        "GC with disableGC",
    );
    assert_eq!(node.status().ipam.allocated, 4);

    ok(
        &gc(json!({"cni.dev/valid-attachments": valid(&[&keep1, &keep2])})),
        "GC",
    );
    let left: Vec<String> = node
        .endpoints()
        .into_iter()
        .map(|e| e.container_id)
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&keep1.container_id) && left.contains(&keep2.container_id));
    assert_eq!(node.status().ipam.allocated, 2);
    let veths = host_veths(&node);
    assert_eq!(veths.len(), 2, "{veths:?}");
    assert!(
        !veths.contains(&ghost_if)
            && !veths.contains(&cni::host_ifname(&stray.container_id, "eth0"))
    );
    assert!(!stray.netns.has_link("eth0"));
    assert!(node.netns.has_link("hypnotic0"));

    // The older key works too.
    ok(
        &gc(json!({"cni.dev/attachments": valid(&[&keep1])})),
        "GC with cni.dev/attachments",
    );
    assert_eq!(node.status().ipam.allocated, 1);
    assert!(keep1.netns.has_link("eth0") && !keep2.netns.has_link("eth0"));
}

#[test]
fn capabilities_and_labels() {
    hypha_tests::require_root!();
    let node = Node::start();
    let base: Ipv4Addr = node.pod_cidr.split('/').next().unwrap().parse().unwrap();
    let wanted = Ipv4Addr::from(u32::from(base) + 77);
    let pod = pod_netns(&node, "caps");
    let id = cid(&node, "caps");
    let path = path_of(&pod);
    let mut env = Node::cni_env("ADD", &id, &path);
    env.push((
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u",
    ));
    let extra = json!({
        "runtimeConfig": {
            "ips": [format!("{wanted}/24")],
            "mac": "02:00:00:aa:bb:cc",
            "bandwidth": {"egressRate": 1000, "egressBurst": 100},
        },
        "args": {"cni": {"labels": [{"key": "app", "value": "web"}, {"key": "tier", "value": "front"}]}},
    });
    let result = ok(
        &node.cni(&env, &conf(&node, "1.1.0", extra.clone())),
        "ADD with capabilities",
    );
    assert_eq!(address_of(&result), wanted);
    assert_eq!(result["interfaces"][1]["mac"], "02:00:00:aa:bb:cc");
    assert!(
        pod.exec(&["ip", "link", "show", "eth0"])
            .contains("02:00:00:aa:bb:cc")
    );
    let ep = node.endpoint(&id);
    assert_eq!(ep.bandwidth.and_then(|b| b.egress_rate), Some(1000));
    let labels: Vec<(&str, &str)> = ep
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        labels,
        vec![
            ("app", "web"),
            ("k8s:namespace", "shop"),
            ("k8s:pod", "web-0"),
            ("tier", "front")
        ]
    );

    // The same address for another pod: refused, naming the capability and the address.
    let other = pod_netns(&node, "caps2");
    let (code, msg) = node
        .cni(
            &Node::cni_env("ADD", &cid(&node, "caps2"), &path_of(&other)),
            &conf(&node, "1.1.0", extra),
        )
        .error();
    assert_eq!(code, 7, "{msg}");
    assert!(
        msg.contains("runtimeConfig.ips") && msg.contains(&wanted.to_string()),
        "{msg}"
    );
    assert!(!other.has_link("eth0"));
    // Unknown CNI_ARGS without IgnoreUnknown: named.
    let id3 = cid(&node, "caps3");
    let mut env = Node::cni_env("ADD", &id3, "/run/netns/x");
    env.push(("CNI_ARGS", "FOO=bar"));
    let (code, msg) = node.cni(&env, &node.conf("1.1.0")).error();
    assert_eq!(code, 4);
    assert!(msg.contains("FOO"), "{msg}");
    assert_eq!(node.status().ipam.allocated, 1);
}

/// A private data directory for host-local, removed at the end.
struct DataDir(PathBuf);

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The addresses host-local holds (one file per address in its data dir).
fn host_local_held(dir: &Path, network: &str) -> Vec<String> {
    std::fs::read_dir(dir.join(network))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn delegated_host_local_and_static() {
    hypha_tests::require_root!();
    let node = Node::start();
    let data = DataDir(node.dir.with_extension("host-local"));
    let subnet_octet = 100 + (std::process::id() % 100);
    let ipam = json!({"ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": format!("172.30.{subnet_octet}.0/24")}]],
        "dataDir": data.0,
    }});
    // The configuration says 1.1.0; Debian's host-local speaks up to 1.0.0, so it is
    // called in 1.0.0.
    let conf_hl = conf(&node, "1.1.0", ipam);
    let pod = pod_netns(&node, "hl");
    let id = cid(&node, "hl");
    let path = path_of(&pod);
    let result = ok(
        &node.cni(&Node::cni_env("ADD", &id, &path), &conf_hl),
        "ADD via host-local",
    );
    let address = address_of(&result);
    assert!(
        address
            .to_string()
            .starts_with(&format!("172.30.{subnet_octet}.")),
        "{result}"
    );
    assert_eq!(result["ips"][0]["address"], format!("{address}/32"));
    let gateway = node.status().node.gateway.expect("an IPv4 gateway");
    assert_eq!(
        result["routes"][0]["gw"],
        gateway.to_string(),
        "routed via the agent's gateway"
    );
    assert_eq!(host_local_held(&data.0, "hypha"), vec![address.to_string()]);
    let ep = node.endpoint(&id);
    assert!(ep.external_ipam);
    assert_eq!(
        node.status().ipam.allocated,
        0,
        "the agent allocated nothing"
    );
    // The pod reaches the gateway through the datapath.
    pod.exec(&["ping", "-c", "1", "-W", "2", &gateway.to_string()]);

    // CHECK is passed on to host-local (which knows the reservation).
    let mut with_prev: Value = serde_json::from_str(&conf_hl).unwrap();
    with_prev["prevResult"] = result.clone();
    ok(
        &node.cni(&Node::cni_env("CHECK", &id, &path), &with_prev.to_string()),
        "CHECK via host-local",
    );

    // DEL releases host-local's address; repeated, it still succeeds.
    ok(
        &node.cni(&Node::cni_env("DEL", &id, &path), &with_prev.to_string()),
        "DEL",
    );
    assert!(host_local_held(&data.0, "hypha").is_empty());
    ok(
        &node.cni(&Node::cni_env("DEL", &id, &path), &conf_hl),
        "repeated DEL",
    );

    // A failure after host-local gave an address runs its DEL: eth0 taken in the pod.
    let taken = pod_netns(&node, "hltaken");
    taken.exec(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    let (code, msg) = node
        .cni(
            &Node::cni_env("ADD", &cid(&node, "hltaken"), &path_of(&taken)),
            &conf_hl,
        )
        .error();
    assert_eq!(code, 4, "{msg}");
    assert!(
        host_local_held(&data.0, "hypha").is_empty(),
        "host-local's address was released"
    );
    assert!(host_veths(&node).is_empty());

    // static: the address of the configuration.
    let conf_static = conf(
        &node,
        "1.0.0",
        json!({"ipam": {"type": "static", "addresses": [{"address": format!("172.31.{subnet_octet}.9/24")}]}}),
    );
    let pod = pod_netns(&node, "st");
    let id = cid(&node, "st");
    let result = ok(
        &node.cni(&Node::cni_env("ADD", &id, &path_of(&pod)), &conf_static),
        "ADD via static",
    );
    assert_eq!(
        result["ips"][0]["address"],
        format!("172.31.{subnet_octet}.9/32")
    );
    ok(
        &node.cni(&Node::cni_env("DEL", &id, &path_of(&pod)), &conf_static),
        "DEL via static",
    );
    assert!(node.endpoints().is_empty());

    // An IPAM plugin that is nowhere in CNI_PATH, or no CNI_PATH: named.
    let missing = conf(&node, "1.0.0", json!({"ipam": {"type": "no-such-ipam"}}));
    let (code, msg) = node
        .cni(&Node::cni_env("ADD", &id, &path_of(&pod)), &missing)
        .error();
    assert_eq!(code, 7);
    assert!(
        msg.contains("ipam.type") && msg.contains("no-such-ipam") && msg.contains("CNI_PATH"),
        "{msg}"
    );
    let path = path_of(&pod);
    let env: Vec<_> = Node::cni_env("ADD", &id, &path)
        .into_iter()
        .filter(|(k, _)| *k != "CNI_PATH")
        .collect();
    let (code, msg) = node.cni(&env, &conf_static).error();
    assert_eq!(code, 4);
    assert!(msg.contains("CNI_PATH"), "{msg}");
}

#[test]
fn thirty_concurrent_adds_get_distinct_addresses() {
    hypha_tests::require_root!();
    let node = Node::start();
    let pods: Vec<(NamedNetns, String)> = (0..30)
        .map(|i| {
            (
                pod_netns(&node, &format!("c{i}")),
                cid(&node, &format!("c{i}")),
            )
        })
        .collect();
    let conf = node.conf("1.1.0");
    let start = Instant::now();
    let results: Vec<CniRun> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|(ns, id)| {
                let (path, conf, node) = (path_of(ns), conf.clone(), &node);
                s.spawn(move || node.cni(&Node::cni_env("ADD", id, &path), &conf))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    let took = start.elapsed();
    let mut addresses: Vec<Ipv4Addr> = results
        .iter()
        .map(|r| address_of(&ok(r, "concurrent ADD")))
        .collect();
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), 30, "distinct addresses");
    assert_eq!(node.status().ipam.allocated, 30);
    assert_eq!(host_veths(&node).len(), 30);
    println!("30 concurrent ADDs took {took:?}");
    for (ns, id) in &pods {
        ok(
            &node.cni(&Node::cni_env("DEL", id, &path_of(ns)), &conf),
            "DEL",
        );
    }
    assert_eq!(node.status().ipam.allocated, 0);
}

/// 200 ADD/DEL cycles, one in five with the plugin SIGKILLed during its ADD (then DEL as a
/// runtime would, or, for some, only the final GC): no address held, no veth left.
#[test]
fn add_del_cycles_with_the_plugin_killed_leave_nothing() {
    hypha_tests::require_root!();
    let node = Node::start();
    let slots: Vec<NamedNetns> = (0..4)
        .map(|i| pod_netns(&node, &format!("cy{i}")))
        .collect();
    let conf = node.conf("1.1.0");
    let mut killed = 0;
    for cycle in 0..200usize {
        let ns = &slots[cycle % slots.len()];
        let id = cid(&node, &format!("cy{cycle}"));
        let path = path_of(ns);
        if cycle % 5 == 4 {
            // SIGKILL somewhere in the ADD: before, between or after the agent's calls.
            let mut cmd = cni::in_netns(&node.netns.path(), &cni::binary());
            let mut child = cmd
                .env_clear()
                .envs(Node::cni_env("ADD", &id, &path))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn hypha-cni");
            use std::io::Write as _;
            let _ = child.stdin.take().unwrap().write_all(conf.as_bytes());
            std::thread::sleep(Duration::from_millis((cycle as u64 * 7) % 40));
            let _ = child.kill();
            let _ = child.wait();
            killed += 1;
            if cycle % 10 == 4 {
                // Left for GC; its namespace must be free for the next cycle.
                let _ = ns.try_exec(&["ip", "link", "del", "eth0"]);
                continue;
            }
        } else {
            ok(&node.cni(&Node::cni_env("ADD", &id, &path), &conf), "ADD");
        }
        ok(&node.cni(&Node::cni_env("DEL", &id, &path), &conf), "DEL");
        assert!(!ns.has_link("eth0"), "cycle {cycle}: eth0 left in the pod");
    }
    assert_eq!(killed, 40);
    ok(
        &node.cni(&[("CNI_COMMAND", "GC")], &conf_with_valid(&node, &[])),
        "GC",
    );
    assert_eq!(node.status().ipam.allocated, 0, "no address held");
    assert!(node.endpoints().is_empty());
    assert!(
        host_veths(&node).is_empty(),
        "no veth left: {:?}",
        host_veths(&node)
    );
}

fn conf_with_valid(node: &Node, valid: &[(&str, &str)]) -> String {
    let list: Vec<Value> = valid
        .iter()
        .map(|(c, i)| json!({"containerID": c, "ifname": i}))
        .collect();
    conf(node, "1.1.0", json!({"cni.dev/valid-attachments": list}))
}

/// An address of the node's pod CIDR, `offset` after its base.
fn pod_address(node: &Node, offset: u32) -> Ipv4Addr {
    let base: Ipv4Addr = node.pod_cidr.split('/').next().unwrap().parse().unwrap();
    Ipv4Addr::from(u32::from(base) + offset)
}

/// Asserts the limit of one direction as `tc qdisc show` and `tc class show` (`shown`)
/// show it: Hypha's `htb` whose top class is at `rate` (bits per second) on that device,
/// or no shaper at all when `rate` is `None`.
fn assert_shaper(shown: &str, rate: Option<u64>, what: &str) {
    match rate {
        Some(rate) => {
            assert!(shown.contains("htb"), "{what}: no htb: {shown}");
            let top = format!("class htb 4859:1 root rate {}Mbit", rate / 1_000_000);
            assert!(shown.contains(&top), "{what}: not {top}: {shown}");
        }
        None => assert!(
            !shown.contains("htb") && !shown.contains("tbf"),
            "{what}: a shaper with no limit: {shown}"
        ),
    }
}

/// The IPv6 address the runtime fixtures ask for, where one asks for one.
const FIXTURE_IP6: &str = "fd00:4879:f1::5";

/// The exact stdin and CNI_ARGS that containerd (go-cni), CRI-O (ocicni) and podman 4
/// (libnetwork/cni) give hypha-cni (`cni-plugin/tests/fixtures/`, each citing the runtime's
/// types), through the real plugin and agent: each limit really shapes (a `tbf` at its
/// rate on the pod's eth0 for egress, on the host veth for ingress; none for a direction
/// sent as 0), the requested address and MAC are the pod's, the labels reach the
/// endpoint, and DEL takes it all down. On this IPv4-only node, a fixture that asks for an
/// IPv6 address too is refused, naming it.
#[test]
fn runtime_fixtures_through_the_real_agent() {
    hypha_tests::require_root!();
    let node = Node::start();
    let count = cni::runtime_fixtures(&node.socket(), "x", "0.0.0.0", "::").len();
    assert!(count >= 4, "{count} fixtures");
    for i in 0..count {
        let pod = pod_netns(&node, &format!("fx{i}"));
        let id = cid(&node, &format!("fx{i}"));
        let path = path_of(&pod);
        let wanted = pod_address(&node, 40 + i as u32);
        let (name, fixture) =
            cni::runtime_fixtures(&node.socket(), &id, &wanted.to_string(), FIXTURE_IP6)
                .swap_remove(i);
        let expect = &fixture["expect"];
        let mut env = Node::cni_env("ADD", &id, &path);
        env.push(("CNI_ARGS", fixture["cniArgs"].as_str().unwrap()));
        let run = node.cni(&env, &fixture["stdin"].to_string());
        if let Some(address6) = expect["address6"].as_str() {
            // This node is IPv4-only: the IPv6 address asked for is refused, named, and
            // nothing is made (the dual-stack run is hypha-cni's fake-agent test).
            let (code, msg) = run.error();
            assert_eq!(code, 7, "{name}: {msg}");
            assert!(msg.contains(address6), "{name}: {msg}");
            assert!(!pod.has_link("eth0"), "{name}");
            assert!(node.endpoints().is_empty(), "{name}");
            continue;
        }
        let result = ok(&run, &name);

        if let Some(address) = expect["address"].as_str() {
            assert_eq!(address_of(&result).to_string(), address, "{name}: {result}");
        }
        let shown = pod.exec(&["ip", "-o", "addr", "show", "dev", "eth0"]);
        assert!(
            shown.contains(&format!("{}/32", address_of(&result))),
            "{name}: {shown}"
        );
        if let Some(mac) = expect["mac"].as_str() {
            let link = pod.exec(&["ip", "-o", "link", "show", "eth0"]);
            assert!(link.contains(mac), "{name}: {link}");
            assert_eq!(result["interfaces"][1]["mac"], mac, "{name}: {result}");
        }
        let ep = node.endpoint(&id);
        let labels = serde_json::to_value(&ep.labels).unwrap();
        assert_eq!(labels, expect["labels"], "{name}");
        let bw = ep.bandwidth.unwrap_or_default();
        assert_eq!(bw.egress_rate, expect["egressRate"].as_u64(), "{name}");
        assert_eq!(bw.ingress_rate, expect["ingressRate"].as_u64(), "{name}");
        let host_if = cni::host_ifname(&id, "eth0");
        assert_shaper(
            &(pod.exec(&["tc", "qdisc", "show", "dev", "eth0"])
                + &pod.exec(&["tc", "class", "show", "dev", "eth0"])),
            expect["egressRate"].as_u64(),
            &format!("{name}: egress on the pod's eth0"),
        );
        assert_shaper(
            &(node.netns.exec(&["tc", "qdisc", "show", "dev", &host_if])
                + &node.netns.exec(&["tc", "class", "show", "dev", &host_if])),
            expect["ingressRate"].as_u64(),
            &format!("{name}: ingress on {host_if}"),
        );

        let mut del = Node::cni_env("DEL", &id, &path);
        del.push(("CNI_ARGS", fixture["cniArgs"].as_str().unwrap()));
        ok(&node.cni(&del, &fixture["stdin"].to_string()), &name);
        assert!(!pod.has_link("eth0"), "{name}");
    }
    assert!(node.endpoints().is_empty());
    assert_eq!(node.status().ipam.allocated, 0);
    assert!(host_veths(&node).is_empty(), "{:?}", host_veths(&node));
}

/// The runtimes' capability arguments in their own shapes (containerd's untagged go-cni
/// `PortMapping` with `HostPort`, ...; CRI-O's and podman's camelCase) given, as libcni
/// does, to a chain of hypha-cni (declaring `bandwidth`, `ips`, `mac`) and the reference
/// `portmap` (declaring `portMappings`): portmap gets its `portMappings` and hypha-cni's
/// result as `prevResult`, and its DNAT rule goes to the pod's address; DEL through the
/// chain removes it.
#[test]
fn runtime_fixtures_chained_with_portmap() {
    hypha_tests::require_root!();
    let node = Node::start();
    let count = cni::runtime_fixtures(&node.socket(), "x", "0.0.0.0", "::").len();
    let mut chained = 0;
    for i in 0..count {
        let id = cid(&node, &format!("pm{i}"));
        let wanted = pod_address(&node, 80 + i as u32);
        let (name, fixture) =
            cni::runtime_fixtures(&node.socket(), &id, &wanted.to_string(), FIXTURE_IP6)
                .swap_remove(i);
        let Some(host_port) = fixture["expect"]["hostPort"].as_u64() else {
            continue;
        };
        chained += 1;
        let pod = pod_netns(&node, &format!("pm{i}"));
        let path = path_of(&pod);
        let stdin = &fixture["stdin"];
        let list = json!({
            "cniVersion": stdin["cniVersion"],
            "name": stdin["name"],
            "plugins": [
                {"type": "hypha-cni", "agentSocket": node.socket(),
                 "capabilities": {"bandwidth": true, "ips": true, "mac": true}},
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        let mut chain = Chain::new(&node.netns.path(), list, fixture["capabilityArgs"].clone());
        let mut env = Node::cni_env("ADD", &id, &path);
        env.push(("CNI_ARGS", fixture["cniArgs"].as_str().unwrap()));
        let result = chain.add(&env).unwrap_or_else(|e| {
            panic!(
                "{name}: chained ADD failed at {}: {:?}\n{}",
                e.plugin,
                e.run,
                node.log()
            )
        });
        let address = address_of(&result);
        if let Some(a) = fixture["expect"]["address"].as_str() {
            assert_eq!(address.to_string(), a, "{name}");
        }
        let nat = node.netns.exec(&["iptables-save", "-t", "nat"]);
        let rule = nat
            .lines()
            .find(|l| l.contains(&format!("--dport {host_port} ")) && l.contains("DNAT"))
            .unwrap_or_else(|| panic!("{name}: no DNAT for port {host_port}: {nat}"));
        assert!(rule.contains(&address.to_string()), "{name}: {rule}");

        let mut del = Node::cni_env("DEL", &id, &path);
        del.push(("CNI_ARGS", fixture["cniArgs"].as_str().unwrap()));
        chain
            .del(&del)
            .unwrap_or_else(|e| panic!("{name}: chained DEL failed at {}: {:?}", e.plugin, e.run));
        let nat = node.netns.exec(&["iptables-save", "-t", "nat"]);
        assert!(
            !nat.contains(&format!("--dport {host_port} ")),
            "{name}: portmap's rule is gone: {nat}"
        );
    }
    assert!(chained >= 3, "{chained} fixtures with port mappings");
    assert!(node.endpoints().is_empty());
    assert!(host_veths(&node).is_empty(), "{:?}", host_veths(&node));
}

/// A global IPv6 address of a test node (in the documentation prefix), on its loopback.
const NODE_ADDRESS6: &str = "2001:db8:4879:ff::1";

/// The eth0 link-local address the kernel makes from `mac` in EUI-64 mode.
fn eui64_link_local(mac: &str) -> String {
    let b: Vec<u8> = mac
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).expect("a MAC"))
        .collect();
    std::net::Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        b[0] ^ 0x02,
        b[1],
        b[2],
        0xff,
        0xfe,
        b[3],
        b[4],
        b[5],
    ])
    .to_string()
}

/// hypha-cni with dual-stack `host-local` delegated (one range per family) chained with
/// the reference `tuning` plugin at 1.0.0 on a dual-stack node, as libcni runs it: the
/// pod gets one address of each range (a /32 and a /128), a default route per family
/// (IPv6 via `fe80::1`), a link-local address made from its MAC; it reaches its gateway
/// over IPv4 and the node over IPv6 via `fe80::1` (neighbour discovery answered by the
/// datapath); an
/// IPv6 address asked for through `ips` is the one it gets; CHECK passes; DEL releases
/// both of host-local's addresses and can be repeated.
#[test]
fn chain_with_dual_stack_host_local() {
    hypha_tests::require_root!();
    let node = Node::start_dual();
    let data = DataDir(node.dir.with_extension("host-local6"));
    let octet = 100 + (std::process::id() % 100);
    let subnet6 = format!("fd00:4879:cafe:{:x}::/64", std::process::id() & 0xffff);
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "hypha-dual",
        "plugins": [
            {"type": "hypha-cni", "agentSocket": node.socket(),
             "capabilities": {"ips": true},
             "ipam": {"type": "host-local", "dataDir": data.0, "ranges": [
                 [{"subnet": format!("172.29.{octet}.0/24")}],
                 [{"subnet": subnet6}],
             ]}},
            {"type": "tuning", "sysctl": {"net.ipv6.conf.eth0.accept_ra": "0"}},
        ],
    });
    let gateway = node.status().node.gateway.expect("an IPv4 gateway");
    // The node's own global IPv6 address, as a real node has one, on its loopback.
    node.netns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{NODE_ADDRESS6}/128"),
        "dev",
        "lo",
    ]);
    for (name, wanted6) in [
        ("dual", None),
        ("dualips", Some(subnet6.replace("::/64", "::99"))),
    ] {
        let pod = pod_netns(&node, name);
        let id = cid(&node, name);
        let path = path_of(&pod);
        let runtime_config = match &wanted6 {
            Some(a) => json!({"ips": [a]}),
            None => json!({}),
        };
        let mut chain = Chain::new(&node.netns.path(), list.clone(), runtime_config);
        let result = chain
            .add(&Node::cni_env("ADD", &id, &path))
            .unwrap_or_else(|e| panic!("ADD failed at {}: {:?}\n{}", e.plugin, e.run, node.log()));
        assert_eq!(result["cniVersion"], "1.0.0");
        let ips = result["ips"].as_array().expect("ips");
        assert_eq!(ips.len(), 2, "{result}");
        let v4 = ips[0]["address"].as_str().unwrap().to_owned();
        let v6 = ips[1]["address"].as_str().unwrap().to_owned();
        assert!(
            v4.starts_with(&format!("172.29.{octet}.")) && v4.ends_with("/32"),
            "{result}"
        );
        assert!(v6.ends_with("/128"), "{result}");
        let addr6: std::net::Ipv6Addr = v6.trim_end_matches("/128").parse().unwrap();
        let base: std::net::Ipv6Addr = subnet6.trim_end_matches("/64").parse().unwrap();
        assert_eq!(
            addr6.segments()[..4],
            base.segments()[..4],
            "{v6} not in {subnet6}"
        );
        if let Some(wanted) = &wanted6 {
            assert_eq!(addr6.to_string(), *wanted, "the requested IPv6 address");
        }
        assert_eq!(ips[0]["gateway"], gateway.to_string());
        assert_eq!(ips[1]["gateway"], "fe80::1");
        assert!(ips.iter().all(|ip| ip["interface"] == 1), "{result}");
        assert_eq!(
            result["routes"],
            json!([
                {"dst": "0.0.0.0/0", "gw": gateway.to_string()},
                {"dst": "::/0", "gw": "fe80::1"},
            ])
        );
        let mut held = host_local_held(&data.0, "hypha-dual");
        held.sort();
        let mut want = vec![v4.trim_end_matches("/32").to_owned(), addr6.to_string()];
        want.sort();
        assert_eq!(held, want);
        let ep = node.endpoint(&id);
        assert!(ep.external_ipam);
        assert_eq!(
            ep.address.map(|a| a.to_string()),
            Some(v4.trim_end_matches("/32").to_owned())
        );
        assert_eq!(ep.address6, Some(addr6));

        // In the pod: the /128, the EUI-64 link-local address, the routes, tuning's sysctl.
        let mac = result["interfaces"][1]["mac"].as_str().unwrap().to_owned();
        let ll = eui64_link_local(&mac);
        let mut shown = String::new();
        wait_for(
            "the pod's link-local address",
            Duration::from_secs(3),
            || {
                shown = pod.exec(&["ip", "-o", "-6", "addr", "show", "dev", "eth0"]);
                shown.contains(&format!("{ll}/64")) && !shown.contains("tentative")
            },
        );
        assert!(shown.contains(&v6), "{shown}");
        let routes = pod.exec(&["ip", "-6", "route", "show", "default"]);
        assert!(routes.contains("via fe80::1 dev eth0"), "{routes}");
        let ra = pod.exec(&["cat", "/proc/sys/net/ipv6/conf/eth0/accept_ra"]);
        assert_eq!(ra.trim(), "0");

        // Both families through their gateways: the IPv4 gateway answers (ARP by
        // hypha_from_pod, the address on the node); IPv6 reaches the node's address via
        // fe80::1, whose neighbour solicitation hypha_from_pod answers with the host
        // veth's MAC.
        pod.exec(&["ping", "-c", "1", "-W", "2", &gateway.to_string()]);
        pod.exec(&["ping", "-6", "-c", "1", "-W", "2", NODE_ADDRESS6]);
        let host_mac = result["interfaces"][0]["mac"].as_str().unwrap().to_owned();
        let neigh = pod.exec(&["ip", "-6", "neigh", "show", "fe80::1", "dev", "eth0"]);
        assert!(
            neigh.contains(&format!("lladdr {host_mac}")) && !neigh.contains("FAILED"),
            "fe80::1 resolved to the host veth's MAC {host_mac}: {neigh}"
        );

        let mut check = Chain::new(
            &node.netns.path(),
            chain.list.clone(),
            chain.runtime_config.clone(),
        );
        check.result = chain.result.clone();
        check
            .check(&Node::cni_env("CHECK", &id, &path))
            .unwrap_or_else(|e| panic!("CHECK failed at {}: {:?}", e.plugin, e.run));

        let del = Node::cni_env("DEL", &id, &path);
        for _ in 0..2 {
            chain
                .del(&del)
                .unwrap_or_else(|e| panic!("DEL failed at {}: {:?}", e.plugin, e.run));
            assert!(host_veths(&node).is_empty(), "{:?}", host_veths(&node));
            assert!(host_local_held(&data.0, "hypha-dual").is_empty());
        }
    }
    assert!(node.endpoints().is_empty());
}

/// Addresses an IPv4-only node cannot give: an IPv6 address asked for through `ips` from
/// the agent's allocator, or from a delegated `host-local` whose only range is IPv4, or a
/// delegated IPv6 address: refused naming it, nothing held and nothing left behind.
#[test]
fn ipv6_on_an_ipv4_only_node_is_refused() {
    hypha_tests::require_root!();
    let node = Node::start();
    let data = DataDir(node.dir.with_extension("host-local4"));
    let octet = 100 + (std::process::id() % 100);
    let cases = [
        (
            "agentips",
            json!({"runtimeConfig": {"ips": ["fd00:4879:beef::9"]}}),
            "fd00:4879:beef::9",
            7,
        ),
        (
            "hlips",
            json!({"runtimeConfig": {"ips": ["fd00:4879:beef::9"]},
                   "ipam": {"type": "host-local", "dataDir": data.0,
                            "ranges": [[{"subnet": format!("172.28.{octet}.0/24")}]]}}),
            "fd00:4879:beef::9",
            // host-local's own error, passed on.
            999,
        ),
        (
            "hl6",
            json!({"ipam": {"type": "host-local", "dataDir": data.0,
                            "ranges": [[{"subnet": "fd00:4879:beef::/64"}]]}}),
            "gave fd00:4879:beef::2, but this node has no IPv6 pod CIDR",
            7,
        ),
    ];
    for (name, extra, names, want) in cases {
        let pod = pod_netns(&node, name);
        let id = cid(&node, name);
        let (code, msg) = node
            .cni(
                &Node::cni_env("ADD", &id, &path_of(&pod)),
                &conf(&node, "1.0.0", extra),
            )
            .error();
        assert!(msg.contains(names), "{name}: {msg}");
        assert_eq!(code, want, "{name}: {msg}");
        assert!(host_veths(&node).is_empty(), "{name}");
        assert!(!pod.has_link("eth0"), "{name}");
        assert!(host_local_held(&data.0, "hypha").is_empty(), "{name}");
        assert!(node.endpoints().is_empty(), "{name}");
        assert_eq!(node.status().ipam.allocated, 0, "{name}");
    }
}
