//! Named network namespaces for tests: made with `ip netns add`, deleted with everything
//! in them on drop (processes first), also when the test panics.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hypha_netlink::{Netlink, procs};
use nix::sched::CloneFlags;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `<prefix>-<pid>-<n>`: unique across the tests of a run and across concurrent runs.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `ip ARGS`, panicking with its error output on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace at `/run/netns/<name>` with its loopback up.
pub struct NamedNetns {
    name: String,
}

impl NamedNetns {
    /// A new namespace named [`unique_name`]`(prefix)`.
    pub fn new(prefix: &str) -> Self {
        Self::named(unique_name(prefix))
    }

    /// A new namespace with exactly this (already unique) name.
    pub fn named(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, what a runtime passes as `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs a command inside, panicking on failure; returns its standard output.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let out = self.try_exec(cmd);
        assert!(
            out.status.success(),
            "in {}: {} failed: {}{}",
            self.name,
            cmd.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .expect("run ip netns exec")
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets it opens live here.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let file = File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// Whether an interface named `ifname` exists in this namespace.
    pub fn has_link(&self, ifname: &str) -> bool {
        Netlink::in_netns(&self.path())
            .and_then(|mut nl| nl.link_by_name(ifname))
            .unwrap_or_else(|e| panic!("look for {ifname} in {}: {e}", self.name))
            .is_some()
    }
}

/// How long a process in a namespace being dropped gets to exit on SIGTERM.
const PROCESS_GRACE: Duration = Duration::from_millis(500);

impl Drop for NamedNetns {
    fn drop(&mut self) {
        // First every process inside (servers, pings a test left running), or they would
        // outlive the namespace's name, orphaned.
        if let Err(e) = procs::end_processes_in(&self.path(), PROCESS_GRACE) {
            eprintln!("dropping network namespace {}: {e}", self.name);
        }
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if !out.status.success() => eprintln!(
                "ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Ok(_) => {}
            Err(e) => eprintln!("ip netns del {}: {e}", self.name),
        }
    }
}

/// Whether an interface named `ifname` exists in the test's own (host) namespace.
pub fn host_has_link(ifname: &str) -> bool {
    Netlink::new()
        .and_then(|mut nl| nl.link_by_name(ifname))
        .unwrap_or_else(|e| panic!("look for {ifname} in the host namespace: {e}"))
        .is_some()
}
