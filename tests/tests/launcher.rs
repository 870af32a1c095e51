//! Privileged: `hypha run` and its companions, run as a user runs them. Containers get
//! their network from a test node's agent through the real `hypha-cni` (the launcher runs
//! inside the node's network namespace), or `--network none`.
//!
//! Needs the binaries built first (`cargo build --workspace --exclude hypha-ebpf --bins`).
//! Every name is unique; every container, node and directory is removed on drop.

use std::time::{Duration, Instant};

use hypha_tests::cni::host_ifname;
use hypha_tests::launcher::{Launcher, NETWORK, cgroups_of, mounts_under, write_recorder_plugin};
use hypha_tests::netns::unique_name;
use hypha_tests::node::Node;

/// A unique container name.
fn name(prefix: &str) -> String {
    unique_name(prefix)
}

/// Asserts that no trace of container `name` is left: no state entry, no cgroup, no
/// mount under the run directory.
fn assert_nothing_left(l: &Launcher, name: &str) {
    assert!(
        !l.entries().contains(&name.to_owned()),
        "state entry {name} left in {:?}",
        l.entries()
    );
    assert_eq!(
        cgroups_of(name),
        Vec::<std::path::PathBuf>::new(),
        "cgroups left"
    );
    assert_eq!(
        mounts_under(&l.run_dir()),
        Vec::<String>::new(),
        "mounts left"
    );
}

/// Waits until `f` holds, at most 10 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn runs_in_namespaces_of_its_own() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let n = name("ns");
    let out = l.hypha(&[
        "run",
        "--network",
        "none",
        "--name",
        &n,
        "--",
        "sh",
        "-c",
        "hostname; echo pid=$$; ps -e -o pid=,comm=; ip -o link | wc -l; \
         touch /etc/hypha-x 2>/dev/null && echo etc-writable; \
         echo data > /tmp/$(hostname) && echo tmp-writable; ls /run | wc -l; exit 7",
    ]);
    assert_eq!(out.code, Some(7), "the container's exit code: {out:?}");
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    assert_eq!(lines[0], n, "hostname is the name: {out:?}");
    assert_eq!(
        lines[1], "pid=2",
        "the command is the init's child: {out:?}"
    );
    // ps sees only the container's processes: its init, the shell, ps itself.
    let procs: Vec<&str> = lines[2..5].to_vec();
    assert!(procs[0].starts_with("1 "), "{out:?}");
    assert!(procs[1].starts_with("2 sh"), "{out:?}");
    assert!(procs[2].ends_with(" ps"), "{out:?}");
    assert_eq!(lines[5], "1", "only lo in a new netns: {out:?}");
    assert!(
        !out.stdout.contains("etc-writable"),
        "the host root is read-only"
    );
    assert!(out.stdout.contains("tmp-writable"), "{out:?}");
    assert_eq!(lines.last(), Some(&"0"), "an empty private /run: {out:?}");
    // The container's /tmp was its own.
    assert!(
        !std::path::Path::new(&format!("/tmp/{n}")).exists(),
        "the container's /tmp is its own"
    );
    let c = l.container(&n).expect("an exited container stays listed");
    assert_eq!(
        (c["status"].as_str(), c["exit_code"].as_i64()),
        (Some("exited"), Some(7))
    );
    l.hypha(&["rm", &n]).ok();
    assert_nothing_left(&l, &n);
}

#[test]
fn default_security_refuses_modules_mount_and_bpf() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    // perl's syscall() reaches the raw system calls (x86_64 numbers: bpf 321,
    // init_module 175, finit_module 313, delete_module 176, kexec_load 246, ptrace 101).
    let script = "for n in 321 175 313 176 246 101; do \
                    perl -e '$r = syscall($ARGV[0], 0, 0, 0); print \"$ARGV[0]:\", ($r == -1 ? $!+0 : 0), \"\\n\"' $n; \
                  done; \
                  mount -t tmpfs none /mnt; echo mountrc=$?; \
                  grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status";
    if !cfg!(target_arch = "x86_64") {
        eprintln!("skipped: the syscall numbers are x86_64's");
        return;
    }
    let n = name("sec");
    let out = l.hypha(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--name",
        &n,
        "--",
        "sh",
        "-c",
        script,
    ]);
    let s = out.ok();
    for nr in ["321", "175", "313", "176", "246", "101"] {
        assert!(
            s.contains(&format!("{nr}:1\n")),
            "syscall {nr} must fail with EPERM: {out:?}"
        );
    }
    // mount(8) exits 32 when the mount(2) call fails.
    assert!(s.contains("mountrc=32"), "mount must fail: {out:?}");
    assert!(out.stderr.contains("permission denied"), "{out:?}");
    assert!(
        s.contains("CapEff:\t00000000a80425fb"),
        "Docker's default set: {out:?}"
    );
    assert!(s.contains("CapBnd:\t00000000a80425fb"), "{out:?}");
    assert!(s.contains("NoNewPrivs:\t1"), "{out:?}");
    assert!(s.contains("Seccomp:\t2"), "{out:?}");

    // --privileged lifts it: the same calls now fail only on their bad arguments.
    let n = name("priv");
    let out = l.hypha(&[
        "run",
        "--rm",
        "--privileged",
        "--network",
        "none",
        "--name",
        &n,
        "--",
        "sh",
        "-c",
        script,
    ]);
    let s = out.ok();
    assert!(
        !s.contains("321:1\n"),
        "bpf() is allowed when privileged: {out:?}"
    );
    assert!(
        s.contains("mountrc=0"),
        "mount works when privileged: {out:?}"
    );
    assert!(
        s.contains("NoNewPrivs:\t0") && s.contains("Seccomp:\t0"),
        "{out:?}"
    );
    assert!(!s.contains("CapEff:\t00000000a80425fb"), "{out:?}");
}

#[test]
fn cap_add_and_cap_drop() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let n = name("caps");
    let out = l.hypha(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--name",
        &n,
        "--cap-add",
        "NET_ADMIN",
        "--cap-drop",
        "CAP_NET_RAW",
        "--",
        "sh",
        "-c",
        "ip link set lo mtu 1300 && echo mtu-set; grep CapEff /proc/self/status",
    ]);
    let s = out.ok();
    assert!(s.contains("mtu-set"), "NET_ADMIN added: {out:?}");
    // a80425fb + NET_ADMIN (bit 12) - NET_RAW (bit 13)
    assert!(s.contains("CapEff:\t00000000a80415fb"), "{out:?}");
    let n = name("nocap");
    let out = l.hypha(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--name",
        &n,
        "--",
        "ip",
        "link",
        "set",
        "lo",
        "mtu",
        "1300",
    ]);
    assert_ne!(out.code, Some(0), "no NET_ADMIN by default: {out:?}");
    let out = l.hypha(&["run", "--network", "none", "--cap-add", "FLY", "--", "true"]);
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("unknown capability \"FLY\""), "{out:?}");
}

#[test]
fn userns_maps_root_to_an_unprivileged_range() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let n = name("userns");
    let out = l.hypha(&[
        "run",
        "--rm",
        "--userns",
        "--network",
        "none",
        "--name",
        &n,
        "--",
        "sh",
        "-c",
        "id -u; cat /proc/self/uid_map",
    ]);
    let s = out.ok();
    let mut lines = s.lines();
    assert_eq!(lines.next(), Some("0"), "{out:?}");
    let map: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(map.first(), Some(&"0"), "{out:?}");
    assert_ne!(
        map.get(1),
        Some(&"0"),
        "root maps to an unprivileged id: {out:?}"
    );
    assert_nothing_left(&l, &n);
}

#[test]
fn rootfs_gets_an_overlay() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let n = name("rootfs");
    let marker = format!("/etc/hypha-overlay-{n}");
    let out = l.hypha(&[
        "run",
        "--rm",
        "--rootfs",
        "/",
        "--network",
        "none",
        "--name",
        &n,
        "--",
        "sh",
        "-c",
        &format!("echo x > {marker} && cat {marker}"),
    ]);
    assert_eq!(out.ok(), "x\n");
    assert!(
        !std::path::Path::new(&marker).exists(),
        "the write went to the overlay"
    );
    assert_nothing_left(&l, &n);
}

#[test]
fn memory_limit_oom_kills() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let n = name("oom");
    // tail keeps a "line" of /dev/zero (no newline) in memory until it is killed.
    let out = l.hypha(&[
        "run",
        "--rm",
        "--memory",
        "32M",
        "--network",
        "none",
        "--name",
        &n,
        "--",
        "tail",
        "/dev/zero",
    ]);
    assert_eq!(out.code, Some(137), "SIGKILLed by the OOM killer: {out:?}");
    assert_nothing_left(&l, &n);
}

#[test]
fn pids_limit_stops_the_21st_process() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let n = name("pids");
    // init + sh + 18 sleeps = 20 processes; forking the 21st fails, and the shell gives up.
    let out = l.hypha(&[
        "run",
        "--rm",
        "--pids",
        "20",
        "--network",
        "none",
        "--name",
        &n,
        "--",
        "sh",
        "-c",
        "for i in $(seq 1 25); do sleep 30 & echo started=$i; done",
    ]);
    assert!(out.stdout.contains("started=18\n"), "{out:?}");
    assert!(!out.stdout.contains("started=19"), "{out:?}");
    assert!(out.stderr.contains("Cannot fork"), "forks refused: {out:?}");
    assert_nothing_left(&l, &n);
}

#[test]
fn cpu_limit_is_written() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let n = name("cpu");
    l.hypha(&[
        "run",
        "-d",
        "--cpus",
        "0.5",
        "--memory",
        "64M",
        "--network",
        "none",
        "--name",
        &n,
        "--",
        "sleep",
        "300",
    ])
    .ok();
    let dirs = cgroups_of(&n);
    let read = |file: &str| {
        dirs.iter()
            .map(|d| d.join(file))
            .find(|p| p.exists())
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    };
    if dirs.iter().any(|d| d.starts_with("/sys/fs/cgroup/cpu")) {
        assert_eq!(read("cpu.cfs_quota_us").trim(), "50000");
        assert_eq!(read("memory.limit_in_bytes").trim(), (64 << 20).to_string());
    } else {
        assert_eq!(read("cpu.max").trim(), "50000 100000");
    }
    l.hypha(&["stop", "-t", "1", &n]).ok();
    l.hypha(&["rm", &n]).ok();
    assert_nothing_left(&l, &n);
}

#[test]
fn detached_logs_exec_stop_and_signal_forwarding() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let n = name("det");
    let out = l.hypha(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        &n,
        "--",
        "sh",
        "-c",
        "echo hello; trap 'echo bye; exit 3' TERM; while true; do sleep 0.1; done",
    ]);
    assert_eq!(out.ok().trim(), n, "-d prints the name");
    eventually("hello in the log", || {
        l.hypha(&["logs", &n]).stdout.contains("hello")
    });
    let c = l.container(&n).expect("listed");
    assert_eq!(c["status"], "running");
    assert!(c["pid"].as_i64().is_some());
    // exec enters every namespace: the container's hostname and its PID namespace.
    let out = l.hypha(&[
        "exec",
        &n,
        "--",
        "sh",
        "-c",
        "hostname; ps -e -o comm= | head -2",
    ]);
    let s = out.ok();
    assert!(s.starts_with(&format!("{n}\n")), "{out:?}");
    assert!(
        s.lines().nth(2) == Some("sh") || s.contains("\nsh\n"),
        "{out:?}"
    );
    let out = l.hypha(&["exec", &n, "--", "sh", "-c", "exit 5"]);
    assert_eq!(out.code, Some(5));
    // rm refuses a running container.
    let out = l.hypha(&["rm", &n]);
    assert!(
        out.code != Some(0) && out.stderr.contains("is running"),
        "{out:?}"
    );
    // SIGTERM reaches the command through the init.
    l.hypha(&["stop", &n]).ok();
    let c = l.container(&n).expect("listed");
    assert_eq!(
        (c["status"].as_str(), c["exit_code"].as_i64()),
        (Some("exited"), Some(3)),
        "{c}"
    );
    assert!(l.hypha(&["logs", &n]).stdout.contains("bye"));
    let out = l.hypha(&["exec", &n, "--", "true"]);
    assert!(out.stderr.contains("is not running"), "{out:?}");
    l.hypha(&["rm", &n]).ok();
    assert_nothing_left(&l, &n);
}

#[test]
fn bad_input_leaves_nothing_behind() {
    hypha_tests::require_root!();
    let node = Node::start();
    let l = Launcher::for_node(&node);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--network".into(),
                "nosuchnet".into(),
                "--".into(),
                "true".into(),
            ],
            "network \"nosuchnet\" not found",
        ),
        (vec![], "no command given"),
        (
            vec!["--".into(), "no-such-command-xyz".into()],
            "\"no-such-command-xyz\" not found",
        ),
        (
            vec!["--memory".into(), "64X".into(), "--".into(), "true".into()],
            "invalid --memory value",
        ),
        (
            vec!["--cpus=-1".into(), "--".into(), "true".into()],
            "--cpus",
        ),
        (
            vec!["--pids".into(), "zero".into(), "--".into(), "true".into()],
            "--pids",
        ),
        (
            vec![
                "--egress-rate".into(),
                "fast".into(),
                "--".into(),
                "true".into(),
            ],
            "--egress-rate",
        ),
        (
            vec![
                "--rootfs".into(),
                "/nonexistent-root".into(),
                "--".into(),
                "true".into(),
            ],
            "--rootfs",
        ),
        (
            vec![
                "--port".into(),
                "HTTP:80".into(),
                "--".into(),
                "true".into(),
            ],
            "invalid --port \"HTTP:80\": NAME must be a port name",
        ),
        (
            vec![
                "--port".into(),
                "http:80".into(),
                "--port".into(),
                "http:81/udp".into(),
                "--".into(),
                "true".into(),
            ],
            "invalid --port \"http:81\": the name is given to another --port already",
        ),
    ];
    for (args, msg) in cases {
        let n = name("bad");
        let mut all = vec!["run".to_owned(), "--name".into(), n.clone()];
        all.extend(args);
        let argv: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = l.hypha(&argv);
        assert!(
            out.code.is_some_and(|c| c != 0),
            "{argv:?} must fail: {out:?}"
        );
        assert!(
            out.stderr.contains(msg),
            "{argv:?}: stderr must say {msg:?}: {out:?}"
        );
        assert_nothing_left(&l, &n);
    }
    // A name in use: the first container is untouched, the second run leaves nothing.
    let n = name("dup");
    l.hypha(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        &n,
        "--",
        "sleep",
        "300",
    ])
    .ok();
    let out = l.hypha(&["run", "--network", "none", "--name", &n, "--", "true"]);
    assert!(
        out.code != Some(0) && out.stderr.contains("already in use"),
        "{out:?}"
    );
    assert_eq!(l.container(&n).expect("still there")["status"], "running");
    l.hypha(&["rm", "-f", &n]).ok();
    assert_nothing_left(&l, &n);

    // A CNI plugin failure: the agent's socket does not exist.
    l.write_conflist(
        "20-broken.conflist",
        &serde_json::json!({
            "cniVersion": "1.0.0", "name": "broken",
            "plugins": [{"type": "hypha-cni", "agentSocket": "/nonexistent/agent.sock"}],
        }),
    );
    let n = name("cnifail");
    let out = l.hypha(&["run", "--network", "broken", "--name", &n, "--", "true"]);
    assert!(
        out.code != Some(0) && out.stderr.contains("CNI plugin hypha-cni failed ADD"),
        "{out:?}"
    );
    assert_nothing_left(&l, &n);
    // A plugin not on CNI_PATH.
    l.write_conflist(
        "30-missing.conflist",
        &serde_json::json!({
            "cniVersion": "1.0.0", "name": "missing", "plugins": [{"type": "no-such-plugin"}],
        }),
    );
    let out = l.hypha(&["run", "--network", "missing", "--name", &n, "--", "true"]);
    assert!(out.stderr.contains("\"no-such-plugin\""), "{out:?}");
    assert_nothing_left(&l, &n);
    // Nothing reached the node: no endpoint, no address, no veth.
    assert!(node.endpoints().is_empty());
    assert_eq!(node.status().ipam.allocated, 0);
    let links = node.netns.exec(&["ip", "-o", "link"]);
    assert!(!links.contains("hyp"), "veth left: {links}");
}

#[test]
fn two_containers_reach_each_other_and_stop_releases_the_network() {
    hypha_tests::require_root!();
    let node = Node::start();
    let l = Launcher::for_node(&node);
    let (a, b) = (name("a"), name("b"));
    for n in [&a, &b] {
        l.hypha(&[
            "run",
            "-d",
            "--network",
            NETWORK,
            "--label",
            "app=test",
            "--name",
            n,
            "--",
            "sleep",
            "300",
        ])
        .ok();
    }
    let (ip_a, ip_b) = (l.ip(&a), l.ip(&b));
    assert_ne!(ip_a, ip_b);
    for (from, to) in [(&a, &ip_b), (&b, &ip_a)] {
        let out = l.hypha(&["exec", from, "--", "ping", "-c", "1", "-W", "2", to]);
        assert_eq!(
            out.code,
            Some(0),
            "{from} → {to}: {out:?}\nagent log:\n{}",
            node.log()
        );
    }
    assert_eq!(node.endpoints().len(), 2);
    // The first file by name is used when no --network is given.
    let c = name("c");
    let out = l.hypha(&[
        "run",
        "--rm",
        "--name",
        &c,
        "--",
        "sh",
        "-c",
        "ip -o -4 addr show eth0",
    ]);
    assert!(out.ok().contains("eth0"), "{out:?}");

    let id_a = l.container(&a).expect("a")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let veth = host_ifname(&id_a, "eth0");
    assert!(node.netns.exec(&["ip", "-o", "link"]).contains(&veth));
    l.hypha(&["stop", "-t", "1", &a]).ok();
    let links = node.netns.exec(&["ip", "-o", "link"]);
    assert!(
        !links.contains(&veth),
        "veth {veth} left after stop: {links}"
    );
    let eps = node.endpoints();
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert!(eps.iter().all(|e| e.container_id != id_a));
    assert_eq!(node.status().ipam.allocated, 1, "a's address released");
    let ca = l.container(&a).expect("a listed");
    assert_eq!(ca["status"], "exited");
    // Foreground: exiting releases the network as well.
    assert_eq!(node.endpoints().len(), 1);
    l.hypha(&["rm", &a]).ok();
    l.hypha(&["rm", "-f", &b]).ok();
    assert!(node.endpoints().is_empty());
    assert_eq!(node.status().ipam.allocated, 0);
    assert_nothing_left(&l, &a);
    assert_nothing_left(&l, &b);
}

#[test]
fn a_killed_launcher_is_cleaned_by_rm() {
    hypha_tests::require_root!();
    let node = Node::start();
    let l = Launcher::for_node(&node);
    let n = name("killed");
    let mut child = l.spawn(&["run", "--name", &n, "--", "sleep", "300"]);
    eventually("the container runs", || {
        l.container(&n).is_some_and(|c| c["status"] == "running")
    });
    assert_eq!(node.endpoints().len(), 1);
    // nsenter execs hypha: the child is the launcher itself.
    child.kill().expect("kill the launcher");
    child.wait().expect("reap");
    eventually("the container dies with its launcher", || {
        l.container(&n).is_some_and(|c| c["status"] == "dead")
    });
    let out = l.hypha(&["rm", &n]);
    out.ok();
    assert!(node.endpoints().is_empty(), "DEL ran");
    assert_eq!(node.status().ipam.allocated, 0);
    assert!(!node.netns.exec(&["ip", "-o", "link"]).contains("hyp"));
    assert_nothing_left(&l, &n);
}

#[test]
fn the_chain_gets_prev_results_runtime_config_labels_and_reverse_del() {
    hypha_tests::require_root!();
    let node = Node::start();
    let mut l = Launcher::for_node(&node);
    let plugins = l.dir.join("plugins");
    write_recorder_plugin(&plugins, "rec-one");
    write_recorder_plugin(&plugins, "rec-two");
    l.extra_cni_dir = Some(plugins.clone());
    l.write_conflist(
        "20-chain.conflist",
        &serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "chain",
            "plugins": [
                {"type": "hypha-cni", "agentSocket": node.socket()},
                {"type": "rec-one", "capabilities": {"bandwidth": true}},
                {"type": "rec-two", "capabilities": {"portMappings": true}},
            ],
        }),
    );
    let n = name("chain");
    let out = l.hypha(&[
        "run",
        "--network",
        "chain",
        "--namespace",
        "team",
        "--label",
        "app=web",
        "--egress-rate",
        "10mbit",
        "--ingress-rate",
        "2mbit",
        "--name",
        &n,
        "--",
        "ip",
        "-o",
        "-4",
        "addr",
        "show",
        "eth0",
    ]);
    let s = out.ok().to_owned();
    let ip = l.ip(&n);
    assert!(
        s.contains(&ip),
        "the container has the address of the result: {out:?}"
    );
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(plugins.join(f)).expect(f)).expect(f)
    };
    let (one, two) = (read("ADD-rec-one.json"), read("ADD-rec-two.json"));
    assert_eq!(one["name"], "chain");
    assert_eq!(one["cniVersion"], "1.0.0");
    assert!(
        one["prevResult"]["ips"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with(&ip),
        "{one}"
    );
    assert_eq!(
        two["prevResult"], one["prevResult"],
        "rec-one passed its result on"
    );
    assert_eq!(
        one["runtimeConfig"]["bandwidth"],
        serde_json::json!({"egressRate": 10_000_000, "egressBurst": i32::MAX,
                           "ingressRate": 2_000_000, "ingressBurst": i32::MAX})
    );
    assert!(
        two.get("runtimeConfig").is_none(),
        "no capability it declares has a value"
    );
    for conf in [&one, &two] {
        assert_eq!(
            conf["args"]["cni"]["labels"],
            serde_json::json!([{"key": "app", "value": "web"}])
        );
    }
    let calls = std::fs::read_to_string(plugins.join("calls")).unwrap();
    let order: Vec<String> = calls
        .lines()
        .map(|l| l.splitn(3, ' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        order,
        ["ADD rec-one", "ADD rec-two", "DEL rec-two", "DEL rec-one"],
        "{calls}"
    );
    assert!(
        calls.contains("K8S_POD_NAMESPACE=team;K8S_POD_NAME=") && calls.contains(&n),
        "{calls}"
    );
    // DEL got the cached final result.
    assert_eq!(read("DEL-rec-one.json")["prevResult"], one["prevResult"]);
    assert!(node.endpoints().is_empty(), "hypha-cni's DEL ran too");
    l.hypha(&["rm", &n]).ok();
    assert_nothing_left(&l, &n);
}

/// The named ports of `--port` as every plugin of the chain gets them: `args.cni.namedPorts`
/// beside the labels, protocols upper case, TCP by default; hypha-cni sends them to the
/// agent in its create request, which the real agent accepts (its request body refuses
/// unknown keys). That they reach the create request is `fake_agent.rs`'s
/// `named_ports_reach_the_agent`; that the agent keeps them is
/// [`run_with_ports_gives_the_endpoint_its_named_ports`].
#[test]
fn run_with_ports_passes_them_to_every_plugin() {
    hypha_tests::require_root!();
    let node = Node::start();
    let mut l = Launcher::for_node(&node);
    let plugins = l.dir.join("plugins");
    write_recorder_plugin(&plugins, "rec-one");
    l.extra_cni_dir = Some(plugins.clone());
    l.write_conflist(
        "20-ports.conflist",
        &serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "ports",
            "plugins": [
                {"type": "hypha-cni", "agentSocket": node.socket()},
                {"type": "rec-one"},
            ],
        }),
    );
    let n = name("ports");
    let out = l.hypha(&[
        "run",
        "--network",
        "ports",
        "--label",
        "app=web",
        "--port",
        "http:8080/tcp",
        "--port",
        "dns:53/udp",
        "--port",
        "metrics:9090",
        "--name",
        &n,
        "--",
        "ip",
        "-o",
        "-4",
        "addr",
        "show",
        "eth0",
    ]);
    let s = out.ok().to_owned();
    assert!(s.contains(&l.ip(&n)), "addressed by hypha-cni: {out:?}");
    let add: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(plugins.join("ADD-rec-one.json")).expect("rec-one's ADD"),
    )
    .expect("rec-one's configuration");
    assert_eq!(
        add["args"]["cni"],
        serde_json::json!({
            "labels": [{"key": "app", "value": "web"}],
            "namedPorts": [
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "metrics", "port": 9090, "protocol": "TCP"},
            ],
        })
    );
    // The container's state keeps them, for DEL's configuration.
    let del: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(plugins.join("DEL-rec-one.json")).expect("rec-one's DEL"),
    )
    .expect("rec-one's DEL configuration");
    assert_eq!(
        del["args"]["cni"]["namedPorts"],
        add["args"]["cni"]["namedPorts"]
    );
    assert!(node.endpoints().is_empty(), "hypha-cni's DEL ran too");
    l.hypha(&["rm", &n]).ok();
    assert_nothing_left(&l, &n);
}

/// `GET /v1/endpoints` as JSON, read without the client's types (which gain `ports` with
/// the agent's change).
fn endpoints_json(node: &Node) -> serde_json::Value {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--unix-socket"])
        .arg(node.socket())
        .arg("http://hypha/v1/endpoints")
        .output()
        .expect("run curl");
    assert!(out.status.success(), "GET /v1/endpoints: {out:?}");
    serde_json::from_slice(&out.stdout).expect("the endpoint list is JSON")
}

/// End to end: `hypha run --port` with hypha-cni networking gives the agent's endpoint its
/// named ports, which policies naming a port resolve against.
#[test]
fn run_with_ports_gives_the_endpoint_its_named_ports() {
    hypha_tests::require_root!();
    let node = Node::start();
    let l = Launcher::for_node(&node);
    let n = name("eports");
    l.hypha(&[
        "run",
        "-d",
        "--network",
        NETWORK,
        "--port",
        "http:8080/tcp",
        "--port",
        "dns:53/udp",
        "--name",
        &n,
        "--",
        "sleep",
        "300",
    ])
    .ok();
    let id = l.container(&n).expect("running")["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let list = endpoints_json(&node);
    let ep = list
        .as_array()
        .expect("a list")
        .iter()
        .find(|e| e["container_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no endpoint for {id}: {list}"));
    // In any order (the agent may keep them sorted).
    let mut ports = ep["ports"].as_array().cloned().unwrap_or_default();
    ports.sort_by_key(|p| p["name"].as_str().map(str::to_owned));
    assert_eq!(
        serde_json::Value::Array(ports),
        serde_json::json!([
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "http", "port": 8080, "protocol": "TCP"},
        ]),
        "{ep}"
    );
    l.hypha(&["rm", "-f", &n]).ok();
    assert!(node.endpoints().is_empty());
    assert_nothing_left(&l, &n);
}

/// On a dual-stack node a container gets both addresses through CNI: `ps` lists them
/// (IPv4 first), its eth0 has the /128, its default routes go via both gateways, and two
/// containers reach each other over both families; stopping releases both.
#[test]
fn dual_stack_containers_get_both_addresses() {
    hypha_tests::require_root!();
    let node = Node::start_dual();
    let l = Launcher::for_node(&node);
    let (a, b) = (name("a6"), name("b6"));
    for n in [&a, &b] {
        l.hypha(&[
            "run",
            "-d",
            "--network",
            NETWORK,
            "--name",
            n,
            "--",
            "sleep",
            "300",
        ])
        .ok();
    }
    for n in [&a, &b] {
        let ips = l.ips(n);
        assert_eq!(ips.len(), 2, "{ips:?}");
        assert!(ips[0].parse::<std::net::Ipv4Addr>().is_ok(), "{ips:?}");
        assert!(ips[1].parse::<std::net::Ipv6Addr>().is_ok(), "{ips:?}");
        let table = l.hypha(&["ps"]);
        assert!(
            table.ok().contains(&format!("{},{}", ips[0], ips[1])),
            "{table:?}"
        );
        let addr = l.hypha(&["exec", n, "--", "ip", "-o", "-6", "addr", "show", "eth0"]);
        assert!(addr.ok().contains(&format!("{}/128", ips[1])), "{addr:?}");
        let routes = l.hypha(&["exec", n, "--", "ip", "-6", "route", "show", "default"]);
        assert!(routes.ok().contains("via fe80::1 dev eth0"), "{routes:?}");
    }
    let (ip_b, ip6_b) = (l.ip(&b), l.ip6(&b));
    for to in [&ip_b, &ip6_b] {
        let out = l.hypha(&["exec", &a, "--", "ping", "-c", "1", "-W", "2", to]);
        assert_eq!(
            out.code,
            Some(0),
            "{a} → {to}: {out:?}\nagent log:\n{}",
            node.log()
        );
    }
    l.hypha(&["rm", "-f", &a]).ok();
    l.hypha(&["rm", "-f", &b]).ok();
    assert!(node.endpoints().is_empty());
    let ipam = node.status().ipam;
    assert_eq!((ipam.allocated, ipam.allocated6), (0, 0), "{ipam:?}");
    assert_nothing_left(&l, &a);
    assert_nothing_left(&l, &b);
}
