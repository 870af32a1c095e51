//! The agent's API under abuse, end to end (privileged: a real agent in its own network
//! namespace, as `hypha_tests::node` makes it): stalled connections, unknown keys,
//! malformed container ids.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use hypha_api::AllocateRequest;
use hypha_tests::netns::NamedNetns;
use hypha_tests::node::Node;

/// The agent's process: the one whose command line names this node's socket.
fn agent_pid(node: &Node) -> u32 {
    let socket = node.socket().display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_agent = args.contains(&b"agent".as_slice())
            && args.contains(&socket.as_bytes())
            && args
                .first()
                .is_some_and(|a| a.ends_with(b"hypha") && !a.ends_with(b"nsenter"));
        if is_agent {
            return pid;
        }
    }
    panic!("no agent process for {socket}");
}

/// The agent's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn stalled_connections_neither_block_status_and_add_nor_stay_open() {
    hypha_tests::require_root!();
    let node = Node::start();
    let pid = agent_pid(&node);
    let baseline = fds(pid);
    let rss_before = rss_kib(pid);
    let mut stalled: Vec<UnixStream> = (0..2000)
        .map(|_| {
            let mut s = UnixStream::connect(node.socket()).unwrap();
            s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: hy").unwrap();
            s
        })
        .collect();
    let start = Instant::now();
    let (ok, out, err) = node.hypha(&["status"]);
    let took = start.elapsed();
    assert!(ok, "hypha status: {err}");
    assert!(out.contains("Pod CIDR"), "{out}");
    assert!(
        took < Duration::from_secs(2),
        "hypha status took {took:?} beside 2000 stalled connections"
    );
    // A CNI ADD gets through as well.
    let pod = node.add_pod("a");
    let held = fds(pid);
    let rss_during = rss_kib(pid);
    println!(
        "agent: {baseline} descriptors and {rss_before} KiB before, {held} and {rss_during} KiB with 2000 stalled connections"
    );
    // At most 1,024 connections with at most 64 KiB of buffers each, and far less here.
    assert!(
        rss_during < rss_before + 64 * 1024,
        "the agent grew from {rss_before} to {rss_during} KiB"
    );
    assert!(
        held <= baseline + 1024 + 64,
        "the agent holds {held} descriptors (baseline {baseline})"
    );
    // The header timeout (5 s) closes all of them.
    let deadline = Instant::now() + Duration::from_secs(9);
    for (i, s) in stalled.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 256];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("stalled connection {i} still open after 9 s: {other:?}"),
        }
    }
    drop(stalled);
    let after = fds(pid);
    println!(
        "agent: {after} descriptors and {} KiB after the header timeout",
        rss_kib(pid)
    );
    // The pod's endpoint may hold a few descriptors of its own (links, maps).
    assert!(
        after <= baseline + 16,
        "the agent still holds {after} descriptors (baseline {baseline})"
    );
    node.del_pod(&pod);
}

#[test]
fn an_unknown_bandwidth_key_changes_nothing() {
    hypha_tests::require_root!();
    let node = Node::start();
    let pod = node.add_pod_with_bandwidth("a", serde_json::json!({"egressRate": 10_000_000}));
    let ep = node.endpoint(&pod.container_id);
    let before = ep.bandwidth;
    assert!(before.is_some());
    let body = br#"{"EgressRate":5000000}"#;
    let mut s = UnixStream::connect(node.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "PUT /v1/endpoints/{}/bandwidth HTTP/1.1\r\nHost: hypha\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        ep.id,
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("EgressRate"), "{answer}");
    assert_eq!(node.endpoint(&pod.container_id).bandwidth, before);
    node.del_pod(&pod);
}

#[test]
fn a_container_id_with_a_newline_reserves_nothing() {
    hypha_tests::require_root!();
    let node = Node::start();
    let err = node
        .client()
        .allocate(&AllocateRequest {
            container_id: "a\nb".into(),
            ifname: "eth0".into(),
            address: None,
            address6: None,
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HTTP 400") && err.contains("container_id"),
        "{err}"
    );
    assert_eq!(node.status().ipam.allocated, 0);
    assert!(!node.log().contains("a\nb"), "{}", node.log());
}

#[test]
fn a_mac_another_pod_uses_is_refused_and_nothing_stays() {
    hypha_tests::require_root!();
    let node = Node::start();
    let a = node.add_pod("a");
    let first = node.endpoint(&a.container_id);
    let mac = first.pod_mac.to_string();
    let netns = NamedNetns::named(format!("{}-b", node.tag));
    let cid = format!("ctr{}b", node.tag);
    let mut conf: serde_json::Value = serde_json::from_str(&node.conf("1.1.0")).unwrap();
    conf["runtimeConfig"] = serde_json::json!({ "mac": mac });
    let path = netns.path().display().to_string();
    let (_, msg) = node
        .cni(&Node::cni_env("ADD", &cid, &path), &conf.to_string())
        .error();
    assert!(
        msg.contains(&mac) && msg.contains(&format!("endpoint {}", first.id)),
        "{msg}"
    );
    // Nothing of b is left: no endpoint, no reservation, no interface.
    assert_eq!(node.endpoints().len(), 1);
    assert_eq!(node.status().ipam.allocated, 1);
    assert!(!netns.has_link("eth0"));
    node.del_pod(&a);
}
