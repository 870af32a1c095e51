//! The API server under abuse, in process: the real router and server over a unix socket
//! in a temporary directory, the fake datapath and host behind it, and raw HTTP written
//! by hand so that the requests can be as broken as an attacker makes them.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypha_api::{AllocateRequest, Bandwidth, CreateEndpointRequest, MacAddr};
use tokio::sync::broadcast;

use super::*;
use crate::config::AgentConfig;
use crate::control::Persist;
use crate::datapath::fake::FakeDatapath;
use crate::host::HostLink;
use crate::host::fake::FakeHost;
use crate::state::{Change, Pending, PersistedState, StateError};

pub(super) struct NoStore;

impl Persist for NoStore {
    fn submit(&self, _: Vec<Change>) -> Pending {
        Pending::done(Ok(()))
    }

    fn committed(&self) -> Result<PersistedState, StateError> {
        Ok(PersistedState::default())
    }
}

/// Limits short enough for tests to wait them out.
pub(super) fn test_limits() -> Limits {
    Limits {
        header_read_timeout: Duration::from_secs(1),
        body_read_timeout: Duration::from_secs(2),
        ..Limits::default()
    }
}

/// An agent (fake datapath, host links `hyp1`..`hyp4`) served on a socket of its own.
pub(super) struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub socket: PathBuf,
    pub events: broadcast::Sender<hypha_common::Event>,
    pub agent: Arc<Agent<FakeDatapath, FakeHost>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), ServerError>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub fn start(limits: Limits) -> Self {
        Self::start_named(limits, "hypha-test-server")
    }

    /// As [`TestServer::start`], with the server's threads named `threads`.
    pub fn start_named(limits: Limits, threads: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let host = FakeHost::default();
        for i in 1..=4u8 {
            host.state().links.insert(
                format!("hyp{i}"),
                HostLink {
                    index: u32::from(i) + 10,
                    mac: MacAddr([2, 0xee, 0, 0, 0, i]),
                },
            );
        }
        let config = AgentConfig {
            pod_cidrs: "10.7.0.0/28".parse().unwrap(),
            ..AgentConfig::default()
        };
        let (agent, _) = Agent::start(
            config,
            FakeDatapath::default(),
            host,
            Box::new(NoStore),
            PersistedState::default(),
        )
        .unwrap();
        let agent = Arc::new(agent);
        let (events, _) = broadcast::channel(16);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(threads)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(bind(&socket)).unwrap();
        let app = app(router(agent.clone()), events.clone(), &limits);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = rt.spawn(serve(listener, app, limits, async move {
            let _ = stopped.await;
        }));
        Self {
            rt,
            socket,
            events,
            agent,
            stop: Some(stop),
            served: Some(served),
            _dir: dir,
        }
    }

    /// Asks the server to stop and waits (at most `within`) for it to return.
    pub fn shut_down(&mut self, within: Duration) -> Result<(), String> {
        self.stop.take().map(|s| s.send(()));
        let served = self.served.take().expect("served once");
        self.rt
            .block_on(async { tokio::time::timeout(within, served).await })
            .map_err(|_| format!("the server did not stop within {within:?}"))?
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// An endpoint made the way hypha-cni makes it: allocate, then create.
    pub fn add_endpoint(&self, cid: &str, host: &str, mac: u8, bw: Option<Bandwidth>) -> u32 {
        let agent = &self.agent;
        let alloc = agent
            .allocate(&AllocateRequest {
                container_id: cid.into(),
                ifname: "eth0".into(),
                address: None,
                address6: None,
            })
            .unwrap();
        agent
            .create_endpoint(&CreateEndpointRequest {
                container_id: cid.into(),
                ifname: "eth0".into(),
                netns: "/run/netns/x".into(),
                host_ifname: host.into(),
                address: alloc.address,
                pod_mac: MacAddr([2, 0, 0, 0, 0, mac]),
                labels: Default::default(),
                external_ipam: false,
                bandwidth: bw,
                ports: Vec::new(),
                address6: None,
            })
            .unwrap()
            .id
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// One HTTP answer, as read off the socket.
#[derive(Debug)]
pub(super) struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Reply {
    /// The `error` of an `ApiError` body; panics when the body is not one.
    pub fn error(&self) -> String {
        assert!(
            self.head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "not JSON: {self:?}"
        );
        serde_json::from_str::<ApiError>(&self.body)
            .unwrap_or_else(|e| panic!("not an ApiError ({e}): {self:?}"))
            .error
    }
}

/// Parses what a server wrote back: a status line, headers, and a body (de-chunked).
/// `None` when nothing (or no status line) came back.
pub(super) fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
                break;
            };
            if n == 0 || after.len() < n {
                out.push_str(&after[..n.min(after.len())]);
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        // What follows the declared length is the answer to a pipelined request.
        let declared = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        });
        match declared {
            Some(n) if n <= rest.len() && rest.is_char_boundary(n) => rest[..n].to_owned(),
            _ => rest.to_owned(),
        }
    };
    Some(Reply {
        status,
        head: head.to_owned(),
        body,
    })
}

/// Sends `raw` as it is and reads until the server closes (at most 10 s). The write
/// side stays open: a client that closes it is gone, for the server.
pub(super) fn send_raw(socket: &Path, raw: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer (and close) before it has read everything: a failed write
    // is then expected, and what it answered is read below.
    if let Err(e) = s.write_all(raw) {
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        );
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

/// One request with `Connection: close`; a JSON body when `body` is given.
pub(super) fn request(socket: &Path, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: hypha\r\nConnection: close\r\n");
    if let Some(b) = body {
        raw.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body.unwrap_or_default());
    let got = send_raw(socket, &raw);
    parse_reply(&got).unwrap_or_else(|| {
        panic!(
            "no answer to {method} {path}: {:?}",
            String::from_utf8_lossy(&got)
        )
    })
}

/// Unix sockets bound to `path` in this network namespace: the listener and every
/// connection the server accepted on it (clients' sockets are unbound). Unlike a count
/// of this process's descriptors, other tests running beside this one do not change it.
fn server_sockets(path: &Path) -> usize {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let path = path.to_str().unwrap();
    table
        .lines()
        .filter(|l| l.split_whitespace().nth(7) == Some(path))
        .count()
}

/// [`server_sockets`] once `ok` holds for it, or after 2 s.
fn settled(path: &Path, ok: impl Fn(usize) -> bool) -> usize {
    let start = Instant::now();
    loop {
        let n = server_sockets(path);
        if ok(n) || start.elapsed() > Duration::from_secs(2) {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the server closed `s` (EOF or reset) within `within`.
fn closed_within(s: &mut UnixStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // an error answer before the close is fine
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn an_unknown_bandwidth_key_is_refused_by_name_and_the_limit_stays() {
    let srv = TestServer::start(test_limits());
    let limit = Bandwidth {
        egress_rate: Some(10_000_000),
        ..Bandwidth::default()
    };
    let id = srv.add_endpoint("a", "hyp1", 1, Some(limit));
    let reply = request(
        &srv.socket,
        "PUT",
        &format!("/v1/endpoints/{id}/bandwidth"),
        Some(br#"{"EgressRate":5000000}"#),
    );
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(reply.error().contains("EgressRate"), "{reply:?}");
    let eps = srv.agent.list();
    assert_eq!(eps[0].bandwidth, Some(limit), "the limit must stay");
}

#[test]
fn every_request_body_refuses_unknown_keys_by_name() {
    let srv = TestServer::start(test_limits());
    srv.add_endpoint("a", "hyp1", 1, None);
    let cases: &[(&str, &str, &str)] = &[
        (
            "POST",
            "/v1/ipam/allocate",
            r#"{"container_id":"b","ifname":"eth0","adress":"10.7.0.9"}"#,
        ),
        (
            "POST",
            "/v1/endpoints",
            r#"{"container_id":"b","ifname":"eth0","netns":"/x","host_ifname":"hyp2","address":"10.7.0.9","pod_mac":"02:00:00:00:00:09","lables":{}}"#,
        ),
        (
            "POST",
            "/v1/endpoints",
            r#"{"container_id":"b","ifname":"eth0","netns":"/x","host_ifname":"hyp2","address":"10.7.0.9","pod_mac":"02:00:00:00:00:09","bandwidth":{"IngressRate":1}}"#,
        ),
        (
            "POST",
            "/v1/gc",
            r#"{"valid_attachments":[{"container_id":"a","ifname":"eth0","netns":"/x"}]}"#,
        ),
        (
            "POST",
            "/v1/gc",
            r#"{"valid_attachments":[],"dry_run":true}"#,
        ),
        (
            "POST",
            "/v1/policies",
            r#"[{"source":"p.yaml","content":"","encoding":"base64"}]"#,
        ),
        (
            "PUT",
            "/v1/namespaces/shop/labels",
            r#"{"set":{"team":"a"},"delete":["x"]}"#,
        ),
        ("PUT", "/v1/endpoints/1/bandwidth", r#"{"egressrate":1}"#),
    ];
    let expected = [
        "adress",
        "lables",
        "IngressRate",
        "netns",
        "dry_run",
        "encoding",
        "delete",
        "egressrate",
    ];
    for ((method, path, body), key) in cases.iter().zip(expected) {
        let reply = request(&srv.socket, method, path, Some(body.as_bytes()));
        assert_eq!(reply.status, 400, "{method} {path} {body}: {reply:?}");
        let error = reply.error();
        assert!(
            error.contains(&format!("`{key}`")),
            "{method} {path}: {error}"
        );
    }
    // Nothing happened: no allocation, no second endpoint, the first one kept by gc.
    let agent = &srv.agent;
    assert_eq!(agent.list().len(), 1);
    assert_eq!(agent.status().ipam.allocated, 1);
}

#[test]
fn an_oversized_body_gets_413_naming_the_limit() {
    let srv = TestServer::start(test_limits());
    let big = vec![b' '; 65 * 1024];
    let reply = request(&srv.socket, "POST", "/v1/ipam/allocate", Some(&big));
    assert_eq!(reply.status, 413, "{reply:?}");
    assert!(reply.error().contains("65536 bytes"), "{reply:?}");
    // Policy files may be larger: a 1 MiB apply is parsed (and refused as invalid YAML).
    let content = "#".repeat(1 << 20);
    let body = serde_json::to_vec(&[hypha_api::PolicySource {
        source: "big.yaml".into(),
        content,
    }])
    .unwrap();
    let reply = request(&srv.socket, "POST", "/v1/policies", Some(&body));
    assert_ne!(reply.status, 413, "{reply:?}");
    let huge = vec![b' '; (16 << 20) + 1];
    let reply = request(&srv.socket, "POST", "/v1/policies", Some(&huge));
    assert_eq!(reply.status, 413, "{reply:?}");
    assert!(reply.error().contains("16777216 bytes"), "{reply:?}");
}

#[test]
fn stalled_headers_neither_block_status_nor_stay_open() {
    let limits = test_limits();
    let header_timeout = limits.header_read_timeout;
    let srv = TestServer::start(limits);
    let mut stalled: Vec<UnixStream> = (0..2000)
        .map(|_| {
            let mut s = UnixStream::connect(&srv.socket).unwrap();
            s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: hy").unwrap();
            s
        })
        .collect();
    // The listener and at most `max_connections` connections, once the evicted ones
    // are closed.
    let max = Limits::default().max_connections;
    let held = settled(&srv.socket, |n| n <= 1 + max);
    assert!(
        held <= 1 + max,
        "the server holds {held} sockets for 2000 stalled clients"
    );
    let start = Instant::now();
    let reply = request(&srv.socket, "GET", "/v1/status", None);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "status took {:?} beside 2000 stalled connections",
        start.elapsed()
    );
    // All of them are closed by the header timeout (or earlier, to make room).
    let deadline = Instant::now() + header_timeout + Duration::from_secs(3);
    for (i, s) in stalled.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            closed_within(s, left.max(Duration::from_millis(1))),
            "stalled connection {i} still open after the header timeout"
        );
    }
    // The server holds none of them any more: only its listener is left.
    let held = settled(&srv.socket, |n| n == 1);
    assert_eq!(held, 1, "the server still holds {held} sockets");
}

#[test]
fn an_idle_connection_is_closed_after_the_header_timeout() {
    let limits = test_limits();
    let srv = TestServer::start(limits.clone());
    let mut s = UnixStream::connect(&srv.socket).unwrap();
    let start = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(5)));
    assert!(start.elapsed() >= limits.header_read_timeout.mul_f32(0.9));
    // Between two requests of a kept-alive connection too.
    let mut s = UnixStream::connect(&srv.socket).unwrap();
    s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: hypha\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert!(closed_within(&mut s, Duration::from_secs(5)));
}

#[test]
fn a_slow_body_is_cut_at_the_timeout_without_blocking_others() {
    let limits = test_limits();
    let body_timeout = limits.body_read_timeout;
    let srv = TestServer::start(limits);
    let socket = srv.socket.clone();
    let slow = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(
            b"POST /v1/ipam/allocate HTTP/1.1\r\nHost: hypha\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{",
        )
        .unwrap();
        let start = Instant::now();
        s.set_read_timeout(Some(Duration::from_millis(1000)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        // One byte a second until the server answers or closes.
        while start.elapsed() < Duration::from_secs(20) {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if s.write_all(b" ").is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        (start.elapsed(), got)
    });
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let start = Instant::now();
        let reply = request(&srv.socket, "GET", "/v1/status", None);
        assert_eq!(reply.status, 200);
        assert!(start.elapsed() < Duration::from_secs(1));
    }
    let (took, got) = slow.join().unwrap();
    assert!(
        took < body_timeout + Duration::from_secs(3),
        "the slow body was read for {took:?}"
    );
    let reply = parse_reply(&got).expect("an answer before the close");
    assert_eq!(reply.status, 408, "{reply:?}");
    assert!(reply.error().contains("body"), "{reply:?}");
}

#[test]
fn the_monitor_stream_outlives_the_read_timeouts_and_does_not_hold_up_shutdown() {
    let limits = test_limits();
    let wait = limits.body_read_timeout + limits.header_read_timeout + Duration::from_secs(1);
    let mut srv = TestServer::start(limits);
    let mut s = UnixStream::connect(&srv.socket).unwrap();
    s.write_all(b"GET /v1/monitor HTTP/1.1\r\nHost: hypha\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    std::thread::sleep(wait);
    srv.events
        .send(hypha_common::Event {
            kind: hypha_common::EVENT_DROP,
            endpoint_id: 77,
            ..Default::default()
        })
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\"endpoint_id\":77") {
        let n = s.read(&mut buf).expect("the event arrives");
        assert!(n > 0, "the stream was closed after {wait:?}");
        got.extend_from_slice(&buf[..n]);
    }
    // A stop does not wait for the stream to end by itself.
    srv.shut_down(Duration::from_secs(5)).unwrap();
}

#[test]
fn unknown_routes_methods_and_bad_paths_answer_api_errors() {
    let srv = TestServer::start(test_limits());
    let reply = request(&srv.socket, "GET", "/v2/nothing", None);
    assert_eq!(reply.status, 404, "{reply:?}");
    assert!(reply.error().contains("/v2/nothing"), "{reply:?}");
    let reply = request(&srv.socket, "DELETE", "/v1/gc", None);
    assert_eq!(reply.status, 405, "{reply:?}");
    assert!(reply.error().contains("DELETE"), "{reply:?}");
    assert!(
        reply.head.to_ascii_lowercase().contains("allow: post"),
        "{reply:?}"
    );
    let reply = request(&srv.socket, "GET", "/v1/endpoints/%FF%FE/eth0", None);
    assert_eq!(reply.status, 400, "{reply:?}");
    reply.error();
    let reply = request(&srv.socket, "GET", "/v1/monitor?endpoint=x", None);
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(reply.error().contains("endpoint"), "{reply:?}");
    // A body that is not JSON, and JSON without a content type.
    let reply = request(&srv.socket, "POST", "/v1/gc", Some(b"{valid_attachments"));
    assert_eq!(reply.status, 400, "{reply:?}");
    reply.error();
    let got = send_raw(
        &srv.socket,
        b"POST /v1/gc HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
    );
    let reply = parse_reply(&got).unwrap();
    assert_eq!(reply.status, 415, "{reply:?}");
    assert!(reply.error().contains("application/json"), "{reply:?}");
}

#[test]
fn container_ids_and_ifnames_are_validated_on_every_route() {
    let srv = TestServer::start(test_limits());
    let bad_allocs = [
        (r#"{"container_id":"a\nb","ifname":"eth0"}"#, "container_id"),
        (r#"{"container_id":"","ifname":"eth0"}"#, "container_id"),
        (r#"{"container_id":"-a","ifname":"eth0"}"#, "container_id"),
        (r#"{"container_id":"a","ifname":"eth 0"}"#, "ifname"),
        (r#"{"container_id":"a","ifname":"a/b"}"#, "ifname"),
        (r#"{"container_id":"a","ifname":".."}"#, "ifname"),
    ];
    for (body, field) in bad_allocs {
        let reply = request(
            &srv.socket,
            "POST",
            "/v1/ipam/allocate",
            Some(body.as_bytes()),
        );
        assert_eq!(reply.status, 400, "{body}: {reply:?}");
        assert!(reply.error().contains(field), "{body}: {reply:?}");
    }
    assert_eq!(srv.agent.status().ipam.allocated, 0);
    for path in [
        "/v1/endpoints/a%0Ab/eth0",
        "/v1/endpoints/a/eth%3A0",
        "/v1/endpoints/a/..",
    ] {
        for method in ["GET", "DELETE"] {
            let reply = request(&srv.socket, method, path, None);
            assert_eq!(reply.status, 400, "{method} {path}: {reply:?}");
        }
    }
    let reply = request(
        &srv.socket,
        "POST",
        "/v1/gc",
        Some(br#"{"valid_attachments":[{"container_id":"a b","ifname":"eth0"}]}"#),
    );
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(reply.error().contains("container_id"), "{reply:?}");
}

#[test]
fn when_every_connection_is_busy_a_new_one_gets_503() {
    let limits = Limits {
        max_connections: 3,
        ..test_limits()
    };
    let srv = TestServer::start(limits);
    // Three monitor streams: busy for as long as they are open.
    let monitors: Vec<UnixStream> = (0..3)
        .map(|_| {
            let mut s = UnixStream::connect(&srv.socket).unwrap();
            s.write_all(b"GET /v1/monitor HTTP/1.1\r\nHost: hypha\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 1024];
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            s
        })
        .collect();
    let reply = request(&srv.socket, "GET", "/v1/status", None);
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.error().contains("busy"), "{reply:?}");
    // One stream ends: there is room again.
    drop(monitors.into_iter().next());
    let start = Instant::now();
    loop {
        let reply = request(&srv.socket, "GET", "/v1/status", None);
        if reply.status == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{reply:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The ADD's lock moment travels in its header: a request of an ADD that took the lock
/// before a DEL the agent handled is refused (409) and takes nothing; a later ADD's is
/// served; a malformed header is refused naming it.
#[test]
fn the_attachment_lock_header_keeps_a_killed_adds_request_from_taking_an_address() {
    let srv = TestServer::start(test_limits());
    let req = AllocateRequest {
        container_id: "c9".into(),
        ifname: "eth0".into(),
        address: None,
        address6: None,
    };
    let killed_add = hypha_api::boottime_ns();
    hypha_api::Client::new(&srv.socket)
        .unwrap()
        .delete_endpoint("c9", "eth0")
        .unwrap();
    let stale = hypha_api::Client::new(&srv.socket)
        .unwrap()
        .with_attachment_locked_at(killed_add);
    let e = stale.allocate(&req).unwrap_err();
    assert!(
        e.to_string().contains("409") && e.to_string().contains("given up on this ADD"),
        "{e}"
    );
    assert_eq!(srv.agent.status().ipam.allocated, 0);

    let body = serde_json::to_vec(&req).unwrap();
    let raw = format!(
        "POST /v1/ipam/allocate HTTP/1.1\r\nHost: hypha\r\nConnection: close\r\n\
         {}: soon\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        hypha_api::ATTACHMENT_LOCKED_AT,
        body.len()
    );
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(&body);
    let reply = parse_reply(&send_raw(&srv.socket, &raw)).expect("an answer");
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        reply.error().contains(hypha_api::ATTACHMENT_LOCKED_AT),
        "{reply:?}"
    );
    assert_eq!(srv.agent.status().ipam.allocated, 0);

    let next_add = hypha_api::Client::new(&srv.socket)
        .unwrap()
        .with_attachment_locked_at(hypha_api::boottime_ns());
    assert!(next_add.allocate(&req).unwrap().address.is_some());
    assert_eq!(srv.agent.status().ipam.allocated, 1);
}
