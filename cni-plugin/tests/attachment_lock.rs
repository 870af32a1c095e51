//! Unprivileged: two real `hypha-cni` invocations on one attachment against a fake agent
//! that never answers (so each holds the attachment's lock for its whole `agentTimeout`).
//! The second waits for the first and only then calls the agent; when its own
//! `agentTimeout` ends first, it fails with "try again later" (11) naming the lock file.
//! DEL is used because it needs no network namespace.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
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

/// An agent that reads each request, notes when it came, and never answers. Its
/// directory (with the lock directory beside the socket) goes on drop.
struct SilentAgent {
    dir: PathBuf,
    socket: PathBuf,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl SilentAgent {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(unique("hypcni-lock"));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let held: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_ok() {
                    log.lock()
                        .unwrap()
                        .push((Instant::now(), line.trim().to_owned()));
                }
                held.lock().unwrap().push(stream);
            }
        });
        Self { dir, socket, seen }
    }

    fn requests(&self) -> Vec<(Instant, String)> {
        self.seen.lock().unwrap().clone()
    }

    fn conf(&self, timeout: f64) -> String {
        json!({"cniVersion": "1.1.0", "name": "hypha", "type": "hypha-cni",
               "agentSocket": self.socket, "agentTimeout": timeout})
        .to_string()
    }
}

impl Drop for SilentAgent {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

fn spawn_del(agent: &SilentAgent, cid: &str, timeout: f64) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hypha-cni"))
        .env_clear()
        .envs([
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", cid),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(agent.conf(timeout).as_bytes())
        .unwrap();
    child
}

/// Waits until the agent has seen `n` requests (the first invocation holds the lock).
fn wait_for_requests(agent: &SilentAgent, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.requests().len() < n {
        assert!(Instant::now() < deadline, "the agent never got request {n}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_second_operation_on_one_attachment_waits_for_the_first() {
    let agent = SilentAgent::start();
    let cid = unique("ctr");
    let first = spawn_del(&agent, &cid, 1.0);
    wait_for_requests(&agent, 1);
    let second = spawn_del(&agent, &cid, 5.0);
    let first: Output = first.wait_with_output().unwrap();
    assert!(first.status.success(), "first DEL: {first:?}");
    let second = second.wait_with_output().unwrap();
    assert!(second.status.success(), "second DEL: {second:?}");
    let requests = agent.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    // The first holds the lock until its call has waited out its 1 s agentTimeout.
    let gap = requests[1].0 - requests[0].0;
    assert!(
        gap >= Duration::from_millis(950),
        "the second DEL called the agent {gap:?} after the first: it did not wait"
    );
    // DEL removes the lock file of the attachment it deleted.
    let lock = hypha_cni::lock::lock_path(&agent.socket, &cid, "eth0");
    assert!(!lock.exists(), "{} left after DEL", lock.display());
}

#[test]
fn waiting_past_the_agent_timeout_is_try_again_later_naming_the_lock_file() {
    let agent = SilentAgent::start();
    let cid = unique("ctr");
    let first = spawn_del(&agent, &cid, 3.0);
    wait_for_requests(&agent, 1);
    let start = Instant::now();
    let second = spawn_del(&agent, &cid, 0.3).wait_with_output().unwrap();
    let took = start.elapsed();
    assert!(!second.status.success(), "{second:?}");
    let reply: Value = serde_json::from_slice(&second.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {second:?}"));
    let lock = hypha_cni::lock::lock_path(&agent.socket, &cid, "eth0");
    assert_eq!(reply["code"], 11, "{reply}");
    let msg = reply["msg"].as_str().unwrap();
    assert!(msg.contains(&lock.display().to_string()), "{msg}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(
        agent.requests().len(),
        1,
        "the waiting DEL reached the agent"
    );
    // The lock directory is the caller's alone.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(hypha_cni::lock::locks_dir(&agent.socket))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "first DEL: {first:?}");
}

#[test]
fn del_tears_down_even_when_the_lock_cannot_be_made_and_says_so() {
    let agent = SilentAgent::start();
    let cid = unique("ctr");
    let dir = hypha_cni::lock::locks_dir(&agent.socket);
    // Something that is not a directory where the lock files go.
    std::fs::write(&dir, b"").unwrap();
    let out = spawn_del(&agent, &cid, 0.3).wait_with_output().unwrap();
    assert!(!out.status.success(), "{out:?}");
    let reply: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out:?}"));
    assert_eq!(reply["code"], 5, "{reply}");
    let msg = reply["msg"].as_str().unwrap();
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    // The rest of the teardown ran: the agent was asked, and the delete left for it.
    assert_eq!(agent.requests().len(), 1);
    let deferred = hypha_api::deferred_deletes_dir(&agent.socket);
    assert_eq!(std::fs::read_dir(&deferred).unwrap().count(), 1);
}
