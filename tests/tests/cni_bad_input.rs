//! Privileged: the real `hypha-cni` binary given bad input, as a runtime would give it.
//! Each case checks the exact CNI code, that `msg` names what is at fault, the non-zero
//! exit status and that nothing was left behind. No agent runs here.
//!
//! Needs `cargo build -p hypha-cni` first (cargo does not build other packages' binaries
//! for a test).

use std::path::{Path, PathBuf};

use hypha_tests::cni::{self, CniRun};
use hypha_tests::netns::{self, NamedNetns};

/// A socket path where no agent listens.
fn no_agent() -> PathBuf {
    PathBuf::from(format!(
        "/run/hypha-test-{}/no-agent.sock",
        netns::unique_name("absent")
    ))
}

/// A container id unique to this test.
fn container_id() -> String {
    netns::unique_name("ctr")
}

/// The variables of an ADD that would be valid, minus what a case changes.
fn add_env<'a>(cid: &'a str, netns: &'a str, ifname: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", ifname),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

fn without<'a>(env: &[(&'a str, &'a str)], var: &str) -> Vec<(&'a str, &'a str)> {
    env.iter().filter(|(k, _)| *k != var).copied().collect()
}

fn with<'a>(env: &[(&'a str, &'a str)], var: &'a str, value: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut env = without(env, var);
    env.push((var, value));
    env
}

/// Asserts the run failed with `code` and a `msg` containing every one of `names`.
fn assert_error(run: &CniRun, code: u64, names: &[&str]) {
    let (got, msg) = run.error();
    assert_eq!(got, code, "wrong code for {msg:?}: {run:?}");
    for name in names {
        assert!(msg.contains(name), "msg {msg:?} does not name {name:?}");
    }
}

/// Neither end of the veth ADD would have made exists.
fn assert_nothing_left(cid: &str, ifname: &str, netns: &NamedNetns) {
    let host = cni::host_ifname(cid, ifname);
    assert!(
        !netns::host_has_link(&host),
        "host veth {host} was left behind"
    );
    assert!(
        !netns.has_link(ifname),
        "{ifname} was left in {}",
        netns.name()
    );
}

#[test]
fn missing_cni_command() {
    hypha_tests::require_root!();
    let ns = NamedNetns::new("hypcni");
    let cid = container_id();
    let path = ns.path().display().to_string();
    let env = without(&add_env(&cid, &path, "eth0"), "CNI_COMMAND");
    let run = cni::run(&env, &cni::conf("1.1.0", &no_agent()));
    assert_error(&run, 4, &["CNI_COMMAND"]);
    assert_nothing_left(&cid, "eth0", &ns);
}

#[test]
fn unknown_cni_command() {
    hypha_tests::require_root!();
    let ns = NamedNetns::new("hypcni");
    let cid = container_id();
    let path = ns.path().display().to_string();
    let env = with(&add_env(&cid, &path, "eth0"), "CNI_COMMAND", "FROBNICATE");
    let run = cni::run(&env, &cni::conf("1.1.0", &no_agent()));
    assert_error(&run, 4, &["CNI_COMMAND", "FROBNICATE"]);
    assert_nothing_left(&cid, "eth0", &ns);
}

#[test]
fn missing_container_id() {
    hypha_tests::require_root!();
    let ns = NamedNetns::new("hypcni");
    let path = ns.path().display().to_string();
    let env = without(&add_env("unused", &path, "eth0"), "CNI_CONTAINERID");
    let run = cni::run(&env, &cni::conf("1.1.0", &no_agent()));
    assert_error(&run, 4, &["CNI_CONTAINERID"]);
    assert!(!ns.has_link("eth0"));
}

#[test]
fn invalid_container_id() {
    hypha_tests::require_root!();
    let ns = NamedNetns::new("hypcni");
    let path = ns.path().display().to_string();
    let env = add_env("-not/valid", &path, "eth0");
    let run = cni::run(&env, &cni::conf("1.1.0", &no_agent()));
    assert_error(&run, 4, &["CNI_CONTAINERID", "-not/valid"]);
    assert!(!ns.has_link("eth0"));
}

#[test]
fn missing_netns() {
    hypha_tests::require_root!();
    let cid = container_id();
    let env = without(&add_env(&cid, "unused", "eth0"), "CNI_NETNS");
    let run = cni::run(&env, &cni::conf("1.1.0", &no_agent()));
    assert_error(&run, 4, &["CNI_NETNS"]);
    assert!(!netns::host_has_link(&cni::host_ifname(&cid, "eth0")));
}

#[test]
fn nonexistent_netns() {
    hypha_tests::require_root!();
    let cid = container_id();
    let path = format!("/run/netns/{}", netns::unique_name("hypcni-absent"));
    let run = cni::run(
        &add_env(&cid, &path, "eth0"),
        &cni::conf("1.1.0", &no_agent()),
    );
    assert_error(&run, 4, &["CNI_NETNS", &path]);
    assert!(!Path::new(&path).exists());
    assert!(!netns::host_has_link(&cni::host_ifname(&cid, "eth0")));
}

#[test]
fn netns_that_is_not_a_network_namespace() {
    hypha_tests::require_root!();
    let cid = container_id();
    let run = cni::run(
        &add_env(&cid, "/dev/null", "eth0"),
        &cni::conf("1.1.0", &no_agent()),
    );
    assert_error(&run, 4, &["CNI_NETNS", "/dev/null"]);
    assert!(!netns::host_has_link(&cni::host_ifname(&cid, "eth0")));
}

#[test]
fn ifname_too_long() {
    hypha_tests::require_root!();
    let ns = NamedNetns::new("hypcni");
    let cid = container_id();
    let path = ns.path().display().to_string();
    let ifname = "eth0123456789abc"; // 16 bytes
    let run = cni::run(
        &add_env(&cid, &path, ifname),
        &cni::conf("1.1.0", &no_agent()),
    );
    assert_error(&run, 4, &["CNI_IFNAME", ifname]);
    assert!(!netns::host_has_link(&cni::host_ifname(&cid, ifname)));
    assert!(!ns.has_link("eth0123456789ab"), "not even truncated");
}

#[test]
fn ifname_with_a_slash() {
    hypha_tests::require_root!();
    let ns = NamedNetns::new("hypcni");
    let cid = container_id();
    let path = ns.path().display().to_string();
    let run = cni::run(
        &add_env(&cid, &path, "eth/0"),
        &cni::conf("1.1.0", &no_agent()),
    );
    assert_error(&run, 4, &["CNI_IFNAME", "eth/0"]);
    assert!(!netns::host_has_link(&cni::host_ifname(&cid, "eth/0")));
}

#[test]
fn malformed_json() {
    hypha_tests::require_root!();
    let ns = NamedNetns::new("hypcni");
    let cid = container_id();
    let path = ns.path().display().to_string();
    let run = cni::run(
        &add_env(&cid, &path, "eth0"),
        "{\"cniVersion\": \"1.1.0\",\n \"name\": \"hypha\", \"type\": }",
    );
    assert_error(&run, 6, &["line 2 column"]);
    assert_nothing_left(&cid, "eth0", &ns);
}

#[test]
fn unsupported_cni_version() {
    hypha_tests::require_root!();
    let ns = NamedNetns::new("hypcni");
    let cid = container_id();
    let path = ns.path().display().to_string();
    let run = cni::run(
        &add_env(&cid, &path, "eth0"),
        &cni::conf("0.2.0", &no_agent()),
    );
    assert_error(&run, 1, &["cniVersion", "0.2.0"]);
    assert_nothing_left(&cid, "eth0", &ns);
}

#[test]
fn agent_not_running() {
    hypha_tests::require_root!();
    let ns = NamedNetns::new("hypcni");
    let cid = container_id();
    let path = ns.path().display().to_string();
    let socket = no_agent();
    let socket_text = socket.display().to_string();

    let run = cni::run(&add_env(&cid, &path, "eth0"), &cni::conf("1.0.0", &socket));
    assert_error(&run, 11, &[&socket_text]);
    assert_eq!(
        run.reply()["cniVersion"],
        "1.0.0",
        "errors answer in the conf's version"
    );
    assert_nothing_left(&cid, "eth0", &ns);

    // DEL is best effort and succeeds. No agent ever listened there (its directory does
    // not exist), so nothing is left for one, and nothing is created.
    let del = with(&add_env(&cid, &path, "eth0"), "CNI_COMMAND", "DEL");
    let run = cni::run(&del, &cni::conf("1.0.0", &socket));
    assert!(run.status.success(), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert!(
        !hypha_api::deferred_deletes_dir(&socket).exists(),
        "no directory made for an agent that never ran"
    );

    // STATUS says the plugin is not available.
    let run = cni::run(&[("CNI_COMMAND", "STATUS")], &cni::conf("1.1.0", &socket));
    assert_error(&run, 50, &[&socket_text]);
}

#[test]
fn version_needs_nothing_else() {
    hypha_tests::require_root!();
    let run = cni::run(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion": "0.4.0"}"#);
    assert!(run.status.success(), "{run:?}");
    let reply = run.reply();
    assert_eq!(reply["cniVersion"], "0.4.0");
    assert_eq!(
        reply["supportedVersions"],
        serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

/// A limit, an address or a MAC that cannot be read is refused by its key before
/// anything is made: never dropped, never half-applied.
#[test]
fn unreadable_capabilities_and_args_are_named() {
    hypha_tests::require_root!();
    let ns = NamedNetns::new("hypcni");
    let path = ns.path().display().to_string();
    let socket = no_agent();
    for (runtime_config, args, code, names) in [
        (
            r#"{"bandwidth": {"EgressRate": "1M"}}"#,
            "",
            7,
            &["runtimeConfig.bandwidth.egressRate", "\"1M\""][..],
        ),
        (
            r#"{"bandwidth": {"egress_rate": 1000000}}"#,
            "",
            7,
            &["runtimeConfig.bandwidth", "egress_rate"][..],
        ),
        (
            r#"{"bandwidth": {"ingressRate": 0, "ingressBurst": 4294967295}}"#,
            "",
            7,
            &["runtimeConfig.bandwidth.ingressBurst"][..],
        ),
        (
            r#"{"ips": ["10.1.0.5", "10.1.0.6"]}"#,
            "",
            7,
            &["runtimeConfig.ips", "more than one IPv4"][..],
        ),
        (
            r#"{}"#,
            "IgnoreUnknown=1;IP=10.1.0.300",
            4,
            &["CNI_ARGS", "IP=\"10.1.0.300\""][..],
        ),
        (
            r#"{}"#,
            "IgnoreUnknown=1;MAC=01:00:5e:00:00:01",
            4,
            &["CNI_ARGS", "MAC="][..],
        ),
        (
            r#"{"mac": "02:00:00:00:00:01"}"#,
            "IgnoreUnknown=1;MAC=02:00:00:00:00:02",
            7,
            &["runtimeConfig.mac", "CNI_ARGS"][..],
        ),
    ] {
        let cid = container_id();
        let mut env = add_env(&cid, &path, "eth0");
        env.push(("CNI_ARGS", args));
        let mut conf: serde_json::Value =
            serde_json::from_str(&cni::conf("1.0.0", &socket)).unwrap();
        conf["runtimeConfig"] = serde_json::from_str(runtime_config).unwrap();
        let run = cni::run(&env, &conf.to_string());
        assert_error(&run, code, names);
        assert_nothing_left(&cid, "eth0", &ns);
    }
}

/// `agentTimeout` must be a positive number of seconds, named when it is not.
#[test]
fn bad_agent_timeout() {
    hypha_tests::require_root!();
    let ns = NamedNetns::new("hypcni");
    let cid = container_id();
    let path = ns.path().display().to_string();
    let mut conf: serde_json::Value =
        serde_json::from_str(&cni::conf("1.0.0", &no_agent())).unwrap();
    conf["agentTimeout"] = serde_json::json!("10s");
    let run = cni::run(&add_env(&cid, &path, "eth0"), &conf.to_string());
    assert_error(&run, 7, &["agentTimeout"]);
    assert_nothing_left(&cid, "eth0", &ns);
}

/// IPv6 in `ips` and CNI_ARGS `IP`: two of one family (whichever the sources), or an
/// address that is not one, are refused naming them before anything is made or any agent
/// is asked; with a delegated IPAM plugin too (which would otherwise read them itself).
#[test]
fn bad_ipv6_requests_are_named() {
    hypha_tests::require_root!();
    let ns = NamedNetns::new("hypcni");
    let path = ns.path().display().to_string();
    let socket = no_agent();
    for (runtime_config, args, ipam, code, names) in [
        (
            r#"{"ips": ["fd00:1::5/64", "10.1.0.5", "fd00:1::6"]}"#,
            "",
            false,
            7,
            &[
                "runtimeConfig.ips",
                "more than one IPv6",
                "fd00:1::5",
                "fd00:1::6",
            ][..],
        ),
        (
            r#"{"ips": ["fd00:1::5"]}"#,
            "IgnoreUnknown=1;IP=fd00:1::7",
            false,
            7,
            &["more than one IPv6", "fd00:1::5", "fd00:1::7"][..],
        ),
        (
            r#"{"ips": ["fd00:1::5", "fd00:1::6"]}"#,
            "",
            true,
            7,
            &["more than one IPv6", "fd00:1::5", "fd00:1::6"][..],
        ),
        (
            r#"{"ips": ["fd00:1::zz/64"]}"#,
            "",
            false,
            7,
            &["runtimeConfig.ips", "fd00:1::zz"][..],
        ),
        (
            r#"{"ips": ["fd00:1::5:"]}"#,
            "",
            true,
            7,
            &["runtimeConfig.ips", "fd00:1::5:"][..],
        ),
        (
            r#"{}"#,
            "IgnoreUnknown=1;IP=fd00::1::2",
            false,
            4,
            &["CNI_ARGS", "fd00::1::2"][..],
        ),
    ] {
        let cid = container_id();
        let mut env = add_env(&cid, &path, "eth0");
        env.push(("CNI_ARGS", args));
        let mut conf: serde_json::Value =
            serde_json::from_str(&cni::conf("1.0.0", &socket)).unwrap();
        conf["runtimeConfig"] = serde_json::from_str(runtime_config).unwrap();
        if ipam {
            conf["ipam"] =
                serde_json::json!({"type": "host-local", "ranges": [[{"subnet": "fd00:1::/64"}]]});
            env = with(&env, "CNI_PATH", cni::REFERENCE_PLUGINS);
        }
        let run = cni::run(&env, &conf.to_string());
        assert_error(&run, code, names);
        assert_nothing_left(&cid, "eth0", &ns);
    }
}
