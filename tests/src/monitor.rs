//! `hypha monitor -o json` as a child process, its events read on a channel.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::node::Node;

/// A running `hypha monitor -o json`; killed (and reaped) on drop.
pub struct Monitor {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl Monitor {
    /// Starts `hypha monitor ARGS -o json` against `node`'s agent and waits a moment for
    /// it to subscribe, so that traffic that follows is seen.
    pub fn start(node: &Node, args: &[&str]) -> Self {
        let mut child = Command::new(crate::binary("hypha"))
            .arg("monitor")
            .args(args)
            .args(["-o", "json", "--socket"])
            .arg(node.socket())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start hypha monitor");
        let stdout = child.stdout.take().expect("stdout of hypha monitor");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        Monitor { child, lines }
    }

    /// The first event matching `pred` within `limit`.
    pub fn find(
        &self,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return Some(v),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    }
}

impl Monitor {
    /// Every event received so far and until none has come for `quiet` (at most ten
    /// times `quiet` in all, should events never stop).
    pub fn drain(&self, quiet: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + quiet * 10;
        let mut events = Vec::new();
        while Instant::now() < deadline {
            match self.lines.recv_timeout(quiet) {
                Ok(v) => events.push(v),
                Err(_) => break,
            }
        }
        events
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        // The child may have exited already; either way it is reaped.
        if let Err(e) = self.child.kill() {
            eprintln!("kill hypha monitor: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("wait for hypha monitor: {e}");
        }
    }
}
