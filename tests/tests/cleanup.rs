//! Nothing outlives the namespaces the tests make (privileged: run as root).
//!
//! `ip netns del` alone removes a namespace's name, not what runs inside: a process left
//! there keeps running, orphaned, with no name to reach it by.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hypha_tests::netns::NamedNetns;
use hypha_tests::require_root;

/// Whether `pid` names a live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses: "PID (comm) S ...".
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn dropping_a_namespace_ends_the_processes_inside() {
    require_root!();
    let ns = NamedNetns::new("hypcl");
    // Started through `ip netns exec` and detached from this test (not our child), as a
    // server a demo or a bench leaves running would be.
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "sh", "-c"])
        .arg("sleep 1000 >/dev/null 2>&1 & echo $!")
        .stdin(Stdio::null())
        .output()
        .expect("start sleep in the namespace");
    assert!(out.status.success(), "{out:?}");
    let sleeper: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("pid of sleep");
    // One more, a child of this test that ignores SIGTERM, so the SIGKILL path is taken.
    let mut stubborn = Command::new("ip")
        .args(["netns", "exec", ns.name(), "sh", "-c"])
        .arg("trap '' TERM; exec sleep 1000")
        .stdin(Stdio::null())
        .spawn()
        .expect("start a SIGTERM-ignoring sleep in the namespace");
    // Until the shell has exec'd into sleep, SIGTERM could end it: wait for sleep.
    let start = Instant::now();
    while !std::fs::read_to_string(format!("/proc/{}/comm", stubborn.id()))
        .is_ok_and(|c| c.trim() == "sleep")
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "sleep did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(alive(sleeper), "sleep {sleeper} is not running");
    let name = ns.name().to_owned();

    drop(ns);

    assert!(
        !Path::new("/run/netns").join(&name).exists(),
        "{name} still exists"
    );
    let start = Instant::now();
    while alive(sleeper) && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let sleeper_alive = alive(sleeper);
    let stubborn_exited = stubborn.try_wait().expect("try_wait").is_some();
    if sleeper_alive {
        // SAFETY: plain kill(2); do not leave it behind when the assertion fails.
        unsafe { libc::kill(sleeper as i32, libc::SIGKILL) };
    }
    if !stubborn_exited {
        let _ = stubborn.kill();
    }
    let _ = stubborn.wait();
    assert!(
        !sleeper_alive,
        "sleep {sleeper} still runs after its namespace {name} was dropped"
    );
    assert!(
        stubborn_exited,
        "a SIGTERM-ignoring sleep still runs after its namespace {name} was dropped"
    );
}
