//! Fuzzing the API server's request handling, in process: the real router, server and
//! limits over a unix socket, the fake datapath and host behind them, and requests built
//! by proptest from the seed corpus in `agent/tests/corpus/api/`: the seeds as they are,
//! their bytes mutated (bad HTTP, bad chunked encoding), their JSON bodies mutated
//! (unknown keys, wrong types, deep nesting, huge numbers, trailing garbage), random
//! percent-encoded paths and methods, and bodies above the limit.
//!
//! What must hold for every case: the server never panics; a readable request gets an
//! answer, 2xx or 4xx (507 when the pod CIDR is full), and every error answer is an
//! `ApiError` with a message; a request whose HTTP is unreadable gets a 4xx or a closed
//! connection; and the agent keeps answering `GET /v1/status` within 2 s.
//!
//! `cargo test` runs a short, fixed campaign (`HYPHA_API_FUZZ_CASES`, default 2,000: a few
//! seconds; `HYPHA_API_FUZZ_RANDOM=1` for new cases each run); set it higher
//! for a longer run, e.g. `HYPHA_API_FUZZ_CASES=200000 cargo test -p hypha-agent --lib
//! fuzz_tests -- --nocapture`, which prints the cases run and the time taken.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;

use super::hardening_tests::{Reply, TestServer, parse_reply, test_limits};

/// The server's threads: a panic on one of them is a failure of the campaign.
const SERVER_THREAD: &str = "hypha-fuzz-server";

static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

/// One seed request of the corpus.
#[derive(Clone, Debug)]
struct Seed {
    name: String,
    method: String,
    path: String,
    /// Header lines other than Content-Length.
    headers: Vec<String>,
    body: Vec<u8>,
    chunked: bool,
}

impl Seed {
    fn bytes(&self) -> Vec<u8> {
        build(
            &self.method,
            &self.path,
            &self.headers,
            &self.body,
            self.chunked,
        )
    }
}

/// A request from its parts; a `Content-Length` for a body that is not chunked, and
/// `Connection: close` so that the answer ends with the connection.
fn build(method: &str, path: &str, headers: &[String], body: &[u8], chunked: bool) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n");
    if !chunked && !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/api")
}

fn load_corpus() -> Vec<Seed> {
    let mut seeds = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("the API corpus")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "http"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let (head, body) = text.split_once("\n\n").unwrap_or((text.as_str(), ""));
        let mut lines = head.lines();
        let request_line = lines.next().expect("a request line");
        let mut parts = request_line.split(' ');
        let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
            panic!("{}: bad request line {request_line:?}", file.display());
        };
        let headers: Vec<String> = lines
            .filter(|l| !l.is_empty() && !l.starts_with("Content-Length"))
            .map(str::to_owned)
            .collect();
        let chunked = headers
            .iter()
            .any(|h| h.to_ascii_lowercase().starts_with("transfer-encoding"));
        let body = if chunked {
            body.replace('\n', "\r\n").into_bytes()
        } else {
            body.as_bytes().to_vec()
        };
        seeds.push(Seed {
            name: file.file_name().unwrap().to_string_lossy().into_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            headers,
            body,
            chunked,
        });
    }
    assert!(
        seeds.len() >= 10,
        "the API corpus has {} seeds",
        seeds.len()
    );
    seeds
}

/// What a case sends, and how strictly the answer is judged.
#[derive(Clone)]
enum Case {
    /// A well-formed request: it must be answered.
    Readable(Vec<u8>),
    /// HTTP that may be unreadable: a 4xx or a closed connection is fine too.
    Garbage(Vec<u8>),
    /// A body above the limit: 413 naming it.
    Oversized { raw: Vec<u8>, limit: usize },
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, raw) = match self {
            Case::Readable(r) => ("Readable", r),
            Case::Garbage(r) => ("Garbage", r),
            Case::Oversized { raw, .. } => ("Oversized", raw),
        };
        let shown = &raw[..raw.len().min(600)];
        write!(f, "{kind}({:?}", String::from_utf8_lossy(shown))?;
        if raw.len() > shown.len() {
            write!(f, "... {} bytes in all", raw.len())?;
        }
        write!(f, ")")
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::from),
        prop_oneof![
            Just("eth0"),
            Just("10.7.0.3"),
            Just("02:00:00:00:00:44"),
            Just("hyp2"),
            Just("a\nb"),
            Just("../../etc"),
            Just(""),
            Just("ff:ff:ff:ff:ff:ff"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Keys the request types know, their near misses, and anything.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "container_id", "ifname", "address", "netns", "host_ifname", "pod_mac", "labels",
            "external_ipam", "bandwidth", "ingressRate", "egressRate", "ingressBurst",
            "egressBurst", "valid_attachments", "source", "content", "set", "remove",
            "EgressRate", "Container_ID", "ifName", "",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

/// A change to a seed's JSON body, as a value or as text.
#[derive(Clone, Debug)]
enum JsonMutation {
    Replace(Value),
    InsertKey(String, Value),
    RemoveKey(prop::sample::Index),
    SetKey(prop::sample::Index, Value),
    /// `[[[...]]]` (or `{"a":{"a":...}}`) this deep around the body.
    Nest(usize, bool),
    HugeNumber(prop::sample::Index, &'static str),
    TrailingGarbage(Vec<u8>),
    Truncate(prop::sample::Index),
    DuplicateKey(prop::sample::Index),
    InvalidUtf8(prop::sample::Index),
}

fn json_mutation() -> impl Strategy<Value = JsonMutation> {
    prop_oneof![
        json_value().prop_map(JsonMutation::Replace),
        (key(), json_value()).prop_map(|(k, v)| JsonMutation::InsertKey(k, v)),
        any::<prop::sample::Index>().prop_map(JsonMutation::RemoveKey),
        (any::<prop::sample::Index>(), json_value()).prop_map(|(i, v)| JsonMutation::SetKey(i, v)),
        (1usize..3000, any::<bool>()).prop_map(|(d, o)| JsonMutation::Nest(d, o)),
        (
            any::<prop::sample::Index>(),
            prop::sample::select(vec![
                "18446744073709551616",
                "-1",
                "1e400",
                "-0.0",
                "99999999999999999999999999999999999999",
                "4294967296",
            ])
        )
            .prop_map(|(i, n)| JsonMutation::HugeNumber(i, n)),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(JsonMutation::TrailingGarbage),
        any::<prop::sample::Index>().prop_map(JsonMutation::Truncate),
        any::<prop::sample::Index>().prop_map(JsonMutation::DuplicateKey),
        any::<prop::sample::Index>().prop_map(JsonMutation::InvalidUtf8),
    ]
}

fn mutate_json(body: &[u8], m: &JsonMutation) -> Vec<u8> {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut obj = value.clone();
    let keys: Vec<String> = obj
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    let text = serde_json::to_vec(&value).unwrap();
    match m {
        JsonMutation::Replace(v) => serde_json::to_vec(v).unwrap(),
        JsonMutation::InsertKey(k, v) => {
            if let Some(o) = obj.as_object_mut() {
                o.insert(k.clone(), v.clone());
            }
            serde_json::to_vec(&obj).unwrap()
        }
        JsonMutation::RemoveKey(i) if !keys.is_empty() => {
            obj.as_object_mut()
                .unwrap()
                .remove(&keys[i.index(keys.len())]);
            serde_json::to_vec(&obj).unwrap()
        }
        JsonMutation::SetKey(i, v) if !keys.is_empty() => {
            obj.as_object_mut()
                .unwrap()
                .insert(keys[i.index(keys.len())].clone(), v.clone());
            serde_json::to_vec(&obj).unwrap()
        }
        JsonMutation::HugeNumber(i, n) if !keys.is_empty() => {
            let k = &keys[i.index(keys.len())];
            let mut o = obj.as_object().unwrap().clone();
            o.insert(k.clone(), Value::from("\u{1}NUMBER\u{1}"));
            serde_json::to_string(&Value::Object(o))
                .unwrap()
                .replace("\"\\u0001NUMBER\\u0001\"", n)
                .into_bytes()
        }
        JsonMutation::Nest(depth, object) => {
            let (open, close) = if *object {
                ("{\"a\":", "}")
            } else {
                ("[", "]")
            };
            let mut out = open.repeat(*depth).into_bytes();
            out.extend_from_slice(&text);
            out.extend_from_slice(close.repeat(*depth).as_bytes());
            out
        }
        JsonMutation::TrailingGarbage(g) => {
            let mut out = text;
            out.extend_from_slice(g);
            out
        }
        JsonMutation::Truncate(i) => text[..i.index(text.len().max(1))].to_vec(),
        JsonMutation::DuplicateKey(i) if !keys.is_empty() => {
            let k = &keys[i.index(keys.len())];
            let s = String::from_utf8(text).unwrap();
            s.replacen('{', &format!("{{{}:null,", Value::from(k.as_str())), 1)
                .into_bytes()
        }
        JsonMutation::InvalidUtf8(i) => {
            let mut out = text;
            let at = i.index(out.len().max(1));
            out.insert(at.min(out.len()), 0xff);
            out
        }
        _ => text,
    }
}

/// A changed byte, a cut, an insertion, a repeated stretch.
#[derive(Clone, Debug)]
enum ByteMutation {
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Remove(prop::sample::Index, usize),
    Truncate(prop::sample::Index),
    Repeat(prop::sample::Index, usize, usize),
}

fn byte_mutation() -> impl Strategy<Value = ByteMutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| ByteMutation::Flip(i, b)),
        (
            any::<prop::sample::Index>(),
            prop_oneof![
                prop::collection::vec(any::<u8>(), 1..8),
                prop::sample::select(vec![
                    b"\r\n".to_vec(),
                    b"\r\n\r\n".to_vec(),
                    b"\n".to_vec(),
                    b":".to_vec(),
                    b" ".to_vec(),
                    b"\0".to_vec(),
                    b"Transfer-Encoding: chunked\r\n".to_vec(),
                    b"Content-Length: 99999999999999999999\r\n".to_vec(),
                    b"Content-Length: 3\r\nContent-Length: 5\r\n".to_vec(),
                    b"Expect: 100-continue\r\n".to_vec(),
                    b"Upgrade: h2c\r\nConnection: Upgrade\r\n".to_vec(),
                    b"ffffffffffffffff\r\n".to_vec(),
                    b"0\r\n\r\n".to_vec(),
                ]),
            ]
        )
            .prop_map(|(i, b)| ByteMutation::Insert(i, b)),
        (any::<prop::sample::Index>(), 1usize..16).prop_map(|(i, n)| ByteMutation::Remove(i, n)),
        any::<prop::sample::Index>().prop_map(ByteMutation::Truncate),
        (any::<prop::sample::Index>(), 1usize..64, 1usize..200)
            .prop_map(|(i, n, r)| ByteMutation::Repeat(i, n, r)),
    ]
}

fn mutate_bytes(mut raw: Vec<u8>, muts: &[ByteMutation]) -> Vec<u8> {
    for m in muts {
        let len = raw.len().max(1);
        match m {
            ByteMutation::Flip(i, b) if !raw.is_empty() => raw[i.index(len)] = *b,
            ByteMutation::Insert(i, bytes) => {
                let at = i.index(len + 1).min(raw.len());
                raw.splice(at..at, bytes.iter().copied());
            }
            ByteMutation::Remove(i, n) if !raw.is_empty() => {
                let at = i.index(len);
                let end = (at + n).min(raw.len());
                raw.drain(at..end);
            }
            ByteMutation::Truncate(i) => raw.truncate(i.index(len)),
            ByteMutation::Repeat(i, n, times) if !raw.is_empty() => {
                let at = i.index(len);
                let end = (at + n).min(raw.len());
                let stretch = raw[at..end].to_vec();
                for _ in 0..*times {
                    raw.splice(end..end, stretch.iter().copied());
                }
            }
            _ => {}
        }
    }
    raw
}

/// A path under a real route's prefix, with random segments: plain, percent-encoded
/// bytes of any value, dot segments, empty ones.
fn path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        "[a-zA-Z0-9._~-]{0,20}",
        prop::collection::vec(any::<u8>(), 0..12)
            .prop_map(|b| b.iter().map(|b| format!("%{b:02X}")).collect::<String>()),
        prop::sample::select(vec![
            "..",
            ".",
            "",
            "%2e%2e",
            "%2F",
            "%00",
            "%",
            "%zz",
            "%C3%A9",
            "%ED%A0%80",
            "policy",
            "bandwidth",
            "labels",
            "eth0",
            "a",
        ])
        .prop_map(str::to_owned),
    ];
    (
        prop::sample::select(vec![
            "/v1/endpoints/",
            "/v1/policies/",
            "/v1/namespaces/",
            "/v1/ipam/",
            "/v1/",
            "/",
            "//v1/endpoints/",
        ]),
        prop::collection::vec(segment, 0..4),
        prop::option::of("[a-z=&%0-9]{0,20}"),
    )
        .prop_map(|(prefix, segs, query)| {
            let mut p = format!("{prefix}{}", segs.join("/"));
            // A random GET on the monitor would stream forever.
            if p.trim_end_matches('/') == "/v1/monitor" {
                p.push('x');
            }
            if let Some(q) = query {
                p.push('?');
                p.push_str(&q);
            }
            p
        })
}

fn case(seeds: Vec<Seed>, limit: usize) -> impl Strategy<Value = Case> {
    let n = seeds.len();
    let s1 = seeds.clone();
    let s2 = seeds.clone();
    let s3 = seeds.clone();
    let s4 = seeds;
    prop_oneof![
        // The seeds as they are.
        1 => (0..n).prop_map(move |i| Case::Readable(s1[i].bytes())),
        // Their JSON bodies mutated, the HTTP kept well-formed.
        4 => (0..n, json_mutation()).prop_map(move |(i, m)| {
            let s = &s2[i];
            let body = mutate_json(&s.body, &m);
            Case::Readable(build(&s.method, &s.path, &without_te(&s.headers), &body, false))
        }),
        // Random paths and methods, with or without a seed's body.
        2 => (
            prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW"]),
            path(),
            0..n,
            any::<bool>(),
        )
            .prop_map(move |(method, path, i, with_body)| {
                let s = &s3[i];
                let body: &[u8] = if with_body && !s.chunked { &s.body } else { &[] };
                Case::Readable(build(method, &path, &without_te(&s.headers), body, false))
            }),
        // Their bytes mutated: bad request lines, headers, chunked encoding.
        4 => (0..n, prop::collection::vec(byte_mutation(), 1..4))
            .prop_map(move |(i, m)| Case::Garbage(mutate_bytes(s4[i].bytes(), &m))),
        // Anything at all.
        1 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Case::Garbage),
        // Bodies above the limit, declared or chunked.
        1 => (limit + 1..limit + 4096, any::<bool>(), prop::sample::select(vec![
            "/v1/ipam/allocate", "/v1/endpoints", "/v1/gc", "/v1/namespaces/x/labels",
            "/v1/endpoints/a/bandwidth",
        ]))
            .prop_map(move |(size, chunked, path)| {
                let method = if path.ends_with("labels") || path.ends_with("bandwidth") {
                    "PUT"
                } else {
                    "POST"
                };
                let mut body = b"{\"container_id\":\"".to_vec();
                body.resize(size, b'a');
                let headers = vec!["Host: hypha".to_owned(), "Content-Type: application/json".to_owned()];
                let raw = if chunked {
                    let mut chunked_body = Vec::new();
                    for chunk in body.chunks(1000) {
                        chunked_body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                        chunked_body.extend_from_slice(chunk);
                        chunked_body.extend_from_slice(b"\r\n");
                    }
                    chunked_body.extend_from_slice(b"0\r\n\r\n");
                    let mut h = headers.clone();
                    h.push("Transfer-Encoding: chunked".to_owned());
                    build(method, path, &h, &chunked_body, true)
                } else {
                    build(method, path, &headers, &body, false)
                };
                Case::Oversized { raw, limit }
            }),
    ]
}

fn without_te(headers: &[String]) -> Vec<String> {
    headers
        .iter()
        .filter(|h| !h.to_ascii_lowercase().starts_with("transfer-encoding"))
        .cloned()
        .collect()
}

/// Sends `raw`; for garbage, closes the write side (a client that stops sending, so the
/// server need not wait for the header timeout). Returns what came back.
fn exchange(socket: &Path, raw: &[u8], half_close: bool) -> Result<Vec<u8>, TestCaseError> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    // The server may refuse (and close) before reading it all: a failed write is fine,
    // the answer is what counts.
    let wrote = s.write_all(raw);
    if half_close && wrote.is_ok() {
        s.shutdown(std::net::Shutdown::Write).ok();
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                // A mutation may make a valid monitor request: its answer streams until
                // an event comes; its head is the answer.
                if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n")
                    && String::from_utf8_lossy(&out[..end]).contains("application/x-ndjson")
                {
                    out.truncate(end + 4);
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => {
                return Err(TestCaseError::fail(format!(
                    "reading the answer: {e} after {:?}",
                    String::from_utf8_lossy(&out)
                )));
            }
        }
    }
    Ok(out)
}

/// Longer than any of the server's timeouts in these tests: an answer or a close must
/// come before.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Every answer of a failure is an `ApiError` with a message; the server's own answer to
/// unreadable HTTP (hyper's, before any handler) is a bare 4xx.
fn check_reply(reply: &Reply, garbage: bool) -> Result<(), TestCaseError> {
    let bare_http_error = garbage && reply.body.is_empty() && (400..500).contains(&reply.status);
    prop_assert!(
        (200..300).contains(&reply.status)
            || (400..500).contains(&reply.status)
            || reply.status == 507,
        "status {}: {reply:?}",
        reply.status
    );
    if reply.status >= 400 && !bare_http_error {
        let lower = reply.head.to_ascii_lowercase();
        prop_assert!(
            lower.contains("content-type: application/json"),
            "an error without a JSON body: {reply:?}"
        );
        let err: hypha_api::ApiError = serde_json::from_str(&reply.body)
            .map_err(|e| TestCaseError::fail(format!("not an ApiError ({e}): {reply:?}")))?;
        prop_assert!(!err.error.trim().is_empty(), "an empty error: {reply:?}");
    }
    Ok(())
}

fn run_case(srv: &TestServer, case: &Case) -> Result<(), TestCaseError> {
    match case {
        Case::Readable(raw) => {
            let got = exchange(&srv.socket, raw, false)?;
            let reply = final_reply(&got).ok_or_else(|| {
                TestCaseError::fail(format!(
                    "no answer to {:?}: {:?}",
                    String::from_utf8_lossy(&raw[..raw.len().min(300)]),
                    String::from_utf8_lossy(&got)
                ))
            })?;
            // The answer to HEAD has no body, errors included.
            check_reply(&reply, raw.starts_with(b"HEAD "))
        }
        Case::Garbage(raw) => {
            let got = exchange(&srv.socket, raw, true)?;
            match final_reply(&got) {
                Some(reply) => check_reply(&reply, true),
                None => {
                    // Nothing readable back: the connection was closed, which is the
                    // answer to unreadable HTTP.
                    prop_assert!(
                        got.is_empty() || !got.starts_with(b"HTTP/1.1 5"),
                        "{:?}",
                        String::from_utf8_lossy(&got)
                    );
                    Ok(())
                }
            }
        }
        Case::Oversized { raw, limit } => {
            let got = exchange(&srv.socket, raw, false)?;
            let reply = parse_reply(&got)
                .ok_or_else(|| TestCaseError::fail("no answer to an oversized body"))?;
            prop_assert_eq!(reply.status, 413, "{:?}", reply);
            check_reply(&reply, false)?;
            prop_assert!(
                reply.body.contains(&format!("{limit} bytes")),
                "{:?}",
                reply
            );
            Ok(())
        }
    }
}

/// The answer after any `100 Continue`.
fn final_reply(mut got: &[u8]) -> Option<Reply> {
    while got.starts_with(b"HTTP/1.1 1") {
        let end = got.windows(4).position(|w| w == b"\r\n\r\n")?;
        got = &got[end + 4..];
    }
    parse_reply(got)
}

/// `GET /v1/status` answers within 2 s.
fn responsive(srv: &TestServer) -> Result<(), TestCaseError> {
    let start = Instant::now();
    let got = exchange(
        &srv.socket,
        b"GET /v1/status HTTP/1.1\r\nHost: hypha\r\nConnection: close\r\n\r\n",
        false,
    )?;
    let took = start.elapsed();
    let reply = parse_reply(&got).ok_or_else(|| TestCaseError::fail("status: no answer"))?;
    prop_assert_eq!(reply.status, 200, "{:?}", reply);
    prop_assert!(took < Duration::from_secs(2), "status took {took:?}");
    Ok(())
}

#[test]
fn the_api_survives_fuzzed_requests() {
    let cases: u32 = std::env::var("HYPHA_API_FUZZ_CASES")
        .ok()
        .map(|v| v.parse().expect("HYPHA_API_FUZZ_CASES is a number"))
        .unwrap_or(2000);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some(SERVER_THREAD) {
            SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
    let limits = test_limits();
    let limit = limits.body_limit;
    let srv = TestServer::start_named(limits, SERVER_THREAD);
    srv.add_endpoint("a", "hyp1", 1, None);
    let seeds = load_corpus();
    // Every seed as it is, first.
    for seed in &seeds {
        let got = exchange(&srv.socket, &seed.bytes(), false)
            .unwrap_or_else(|e| panic!("{}: {e}", seed.name));
        let reply = parse_reply(&got).unwrap_or_else(|| panic!("{}: no answer", seed.name));
        assert!(
            reply.status < 500,
            "seed {} got {}: {reply:?}",
            seed.name,
            reply.status
        );
        check_reply(&reply, false).unwrap_or_else(|e| panic!("seed {}: {e}", seed.name));
    }
    let config = Config {
        cases,
        failure_persistence: None,
        // A case that hangs costs READ_TIMEOUT per shrinking step.
        max_shrink_time: 120_000,
        ..Config::default()
    };
    // The same cases on every `cargo test`; HYPHA_API_FUZZ_RANDOM=1 for new ones.
    let mut runner = if std::env::var_os("HYPHA_API_FUZZ_RANDOM").is_some() {
        TestRunner::new(config)
    } else {
        TestRunner::new_with_rng(
            config,
            proptest::test_runner::TestRng::deterministic_rng(
                proptest::test_runner::RngAlgorithm::ChaCha,
            ),
        )
    };
    let start = Instant::now();
    let run = AtomicUsize::new(0);
    let result = runner.run(&case(seeds, limit), |c| {
        run_case(&srv, &c)?;
        if run.fetch_add(1, Ordering::Relaxed).is_multiple_of(20) {
            responsive(&srv)?;
        }
        prop_assert_eq!(
            SERVER_PANICS.load(Ordering::SeqCst),
            0,
            "the server panicked"
        );
        Ok(())
    });
    let took = start.elapsed();
    let executed = run.load(Ordering::Relaxed);
    println!("API fuzz: {executed} requests in {took:.1?}");
    if let Err(e) = result {
        panic!("after {executed} requests: {e}");
    }
    responsive(&srv).unwrap();
    assert_eq!(
        SERVER_PANICS.load(Ordering::SeqCst),
        0,
        "the server panicked"
    );
}
