//! Unprivileged: the real `hypha-cni` binary against fake agents that fail the way a dying
//! or wedged agent does (accepts and never answers, never accepts, closes the connection
//! after reading the request, stops in the middle of its answer, answers 5xx or 4xx).
//! Every call ends within `agentTimeout`, with "try again later" (11) naming the socket
//! and the call; DEL succeeds whenever the agent did not complete the request, leaving
//! the delete in `<socket>.deferred/`.
//!
//! Only DEL and STATUS run here: neither needs a network namespace (DEL deletes a host
//! interface named after a container id of this test, which does not exist).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// How the fake agent behaves once a client connects.
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// Reads the request and never answers (the connection stays open).
    Hang,
    /// Listens but never accepts.
    NeverAccept,
    /// Reads the request and closes the connection without a byte of answer.
    CloseAfterRequest,
    /// Sends the head and half the body it announced, then closes.
    HalfAnswer,
    /// Answers this status with a JSON error.
    Status(u16),
}

/// A fake agent on a socket in a directory of its own, removed on drop. Connections it
/// holds open are kept until then.
struct FakeAgent {
    dir: PathBuf,
    socket: PathBuf,
    requests: Arc<Mutex<Vec<String>>>,
    _held: Arc<Mutex<Vec<UnixStream>>>,
    _listener: Option<UnixListener>,
}

impl FakeAgent {
    fn start(behaviour: Behaviour) -> Self {
        let dir = std::env::temp_dir().join(unique("hypcni-fail"));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(Mutex::new(Vec::new()));
        if let Behaviour::NeverAccept = behaviour {
            return Self {
                dir,
                socket,
                requests,
                _held: held,
                _listener: Some(listener),
            };
        }
        let (seen, keep) = (requests.clone(), held.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let Some(request) = read_request(&stream) else {
                    continue;
                };
                seen.lock().unwrap().push(request);
                match behaviour {
                    Behaviour::Hang => keep.lock().unwrap().push(stream),
                    Behaviour::NeverAccept | Behaviour::CloseAfterRequest => drop(stream),
                    Behaviour::HalfAnswer => {
                        let _ = stream.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"endpoint_removed\": ",
                        );
                    }
                    Behaviour::Status(code) => {
                        let body = json!({"error": format!("fake failure {code}")}).to_string();
                        let _ = write!(
                            stream,
                            "HTTP/1.1 {code} Whatever\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                }
            }
        });
        Self {
            dir,
            socket,
            requests,
            _held: held,
            _listener: None,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// The records DEL left for the agent.
    fn deferred(&self) -> Vec<Value> {
        let dir = hypha_api::deferred_deletes_dir(&self.socket);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .map(|e| {
                let path = e.unwrap().path();
                serde_json::from_slice(&std::fs::read(&path).unwrap())
                    .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
            })
            .collect()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The request line and body of one HTTP/1.1 request; `None` if the client went away.
fn read_request(stream: &UnixStream) -> Option<String> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut len = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    let mut parts = request_line.split_whitespace();
    Some(format!("{} {}", parts.next()?, parts.next()?))
}

fn conf(socket: &Path, timeout: f64) -> String {
    json!({"cniVersion": "1.1.0", "name": "hypha", "type": "hypha-cni",
           "agentSocket": socket, "agentTimeout": timeout})
    .to_string()
}

fn cni(env: &[(&str, &str)], stdin: &str) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hypha-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (out, start.elapsed())
}

fn del(agent: &FakeAgent, cid: &str, timeout: f64) -> (Output, Duration) {
    cni(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", cid),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
        ],
        &conf(&agent.socket, timeout),
    )
}

fn error_of(out: &Output) -> (u64, String) {
    assert!(!out.status.success(), "expected a failure: {out:?}");
    let reply: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out:?}"));
    (
        reply["code"].as_u64().expect("a code"),
        reply["msg"].as_str().expect("a msg").to_owned(),
    )
}

/// DEL of an attachment whose delete the agent never completes: success, and the record.
fn assert_deferred(behaviour: Behaviour) {
    let agent = FakeAgent::start(behaviour);
    let cid = unique("ctr");
    let (out, took) = del(&agent, &cid, 1.0);
    assert!(
        out.status.success(),
        "{behaviour:?}: DEL failed after {took:?}: {out:?}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        took < Duration::from_secs(5),
        "{behaviour:?}: DEL took {took:?}"
    );
    assert_eq!(
        agent.deferred(),
        vec![json!({"container_id": cid, "ifname": "eth0"})],
        "{behaviour:?}"
    );
}

#[test]
fn del_succeeds_and_defers_when_the_agent_hangs() {
    assert_deferred(Behaviour::Hang);
}

#[test]
fn del_succeeds_and_defers_when_the_agent_never_accepts() {
    assert_deferred(Behaviour::NeverAccept);
}

#[test]
fn del_succeeds_and_defers_when_the_agent_closes_after_the_request() {
    assert_deferred(Behaviour::CloseAfterRequest);
}

#[test]
fn del_succeeds_and_defers_when_the_answer_stops_midway() {
    assert_deferred(Behaviour::HalfAnswer);
}

#[test]
fn del_succeeds_and_defers_when_the_agent_fails_with_5xx() {
    assert_deferred(Behaviour::Status(500));
    assert_deferred(Behaviour::Status(503));
}

/// 408 is the agent's answer when a request's body did not arrive within its read
/// timeout: a refusal of the moment, not of the request, so DEL leaves it for the agent.
#[test]
fn del_succeeds_and_defers_when_the_agent_timed_out_reading_it() {
    assert_deferred(Behaviour::Status(408));
}

/// A completed 4xx says the request itself is wrong: leaving it for the agent would fail
/// the same way, so DEL reports it.
#[test]
fn del_fails_when_the_agent_refuses_the_request() {
    let agent = FakeAgent::start(Behaviour::Status(400));
    let cid = unique("ctr");
    let (out, _) = del(&agent, &cid, 1.0);
    let (code, msg) = error_of(&out);
    assert_eq!(code, 5, "{msg}");
    assert!(msg.contains("fake failure 400"), "{msg}");
    assert!(agent.deferred().is_empty());
    assert_eq!(
        agent.requests(),
        vec![format!("DELETE /v1/endpoints/{cid}/eth0")]
    );
}

/// STATUS against an agent that accepts and never answers: "not available" (50, STATUS's
/// code for it) within the timeout, naming the socket and the call.
#[test]
fn status_is_bounded_by_the_agent_timeout() {
    for behaviour in [Behaviour::Hang, Behaviour::CloseAfterRequest] {
        let agent = FakeAgent::start(behaviour);
        let (out, took) = cni(&[("CNI_COMMAND", "STATUS")], &conf(&agent.socket, 1.0));
        assert!(took < Duration::from_secs(5), "{behaviour:?}: {took:?}");
        let (code, msg) = error_of(&out);
        assert_eq!(code, 50, "{msg}");
        assert!(
            msg.contains(&agent.socket.display().to_string()) && msg.contains("/v1/status"),
            "{behaviour:?}: {msg}"
        );
    }
}

/// Without `agentTimeout` the default (10 s) applies, not the client's 30 s.
#[test]
fn the_default_timeout_is_ten_seconds() {
    let agent = FakeAgent::start(Behaviour::Hang);
    let (out, took) = cni(
        &[("CNI_COMMAND", "STATUS")],
        &json!({"cniVersion": "1.1.0", "name": "hypha", "agentSocket": agent.socket}).to_string(),
    );
    let (code, msg) = error_of(&out);
    assert_eq!(code, 50, "{msg}");
    assert!(msg.contains("within 10s"), "{msg}");
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(14),
        "{took:?}"
    );
}

#[test]
fn a_bad_agent_timeout_is_named() {
    for bad in [json!(0), json!(-1), json!("10s"), json!(1e9)] {
        let (out, _) = cni(
            &[("CNI_COMMAND", "STATUS")],
            &json!({"cniVersion": "1.1.0", "name": "hypha", "agentTimeout": bad}).to_string(),
        );
        let (code, msg) = error_of(&out);
        assert_eq!(code, 7, "{msg}");
        assert!(msg.contains("agentTimeout"), "{msg}");
    }
}
