//! CNI CHECK looks at the tc filters behind an endpoint (privileged: run as root, here and
//! in CI): a filter whose program was replaced by someone else, or a filter removed, fails
//! the check with the program named.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::EbpfLoader;
use aya::programs::SchedClassifier;
use hypha_common::programs;
use hypha_netlink::{BpfFilter, Netlink, TcHook};
use hypha_tests::node::{Node, Pod};

/// The priority and handle of the agent's filters (`TC_PRIORITY`, `TC_HANDLE` in the
/// agent's datapath).
const PRIORITY: u16 = 1;
const HANDLE: u32 = 1;

/// CNI CHECK of `pod` through hypha-cni, as a runtime runs it: `Ok` or the CNI error.
fn cni_check(node: &Node, pod: &Pod) -> Result<(), (u64, String)> {
    let mut conf: serde_json::Value = serde_json::from_str(&node.conf("1.1.0")).unwrap();
    conf["prevResult"] = pod.result.clone();
    let path = pod.netns.path().display().to_string();
    let run = node.cni(
        &Node::cni_env("CHECK", &pod.container_id, &path),
        &conf.to_string(),
    );
    if run.status.success() {
        Ok(())
    } else {
        Err(run.error())
    }
}

/// Another load of the datapath object (on the node's pinned maps, as a second agent
/// would), with its `name` put into the agent's filter on `hook` of `ifindex`; the id of
/// that program.
fn replace_program(node: &Node, name: &str, hook: TcHook, ifindex: u32) -> u32 {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&node.pin_dir)
        .load_file(hypha_tests::ebpf::object_path())
        .expect("load the object again");
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .expect("program in the object")
        .try_into()
        .expect("a classifier");
    prog.load().expect("verify the program");
    let id = prog.info().expect("program info").id();
    let fd = prog.fd().expect("program fd");
    let mut nl = Netlink::in_netns(&node.netns.path()).expect("netlink in the node");
    nl.add_bpf_filter(
        ifindex,
        &BpfFilter {
            hook,
            priority: PRIORITY,
            handle: HANDLE,
            prog_fd: fd.as_fd().as_raw_fd(),
            name,
        },
        true,
    )
    .expect("replace the filter's program");
    // The filter holds the program now.
    id
}

#[test]
fn check_names_a_program_replaced_or_removed_behind_a_filter() {
    hypha_tests::require_root!();
    let mut node = Node::start();
    let a = node.add_pod("a");
    let ep = node.endpoint(&a.container_id);
    assert_eq!(cni_check(&node, &a), Ok(()));
    let check = node
        .client()
        .check_endpoint(&a.container_id, "eth0")
        .unwrap();
    assert!(check.problems.is_empty(), "{:?}", check.problems);

    // Another hypha_from_pod in the ingress filter: same name and code, another program
    // than the one the agent loaded.
    let foreign = replace_program(&node, programs::FROM_POD, TcHook::Ingress, ep.host_ifindex);
    let problems = node
        .client()
        .check_endpoint(&a.container_id, "eth0")
        .unwrap()
        .problems;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains(&format!(
            "program hypha_from_pod is not what runs on the ingress of {}: its tc filter runs program hypha_from_pod (id {foreign})",
            ep.host_ifname,
        )),
        "{problems:?}"
    );
    let (code, msg) = cni_check(&node, &a).unwrap_err();
    assert!(
        msg.contains("program hypha_from_pod is not what runs"),
        "{code} {msg}"
    );

    // A restarted agent swaps its own program back in.
    node.kill_agent();
    node.start_agent();
    assert_eq!(cni_check(&node, &a), Ok(()));

    // The egress filter removed.
    let mut nl = Netlink::in_netns(&node.netns.path()).expect("netlink in the node");
    assert!(
        nl.delete_bpf_filter(ep.host_ifindex, TcHook::Egress, PRIORITY, HANDLE)
            .unwrap()
    );
    let (code, msg) = cni_check(&node, &a).unwrap_err();
    assert!(
        msg.contains(&format!(
            "program hypha_to_pod is not attached to the egress of {}: it has no tc filter with priority 1 and handle 1",
            ep.host_ifname,
        )),
        "{code} {msg}"
    );
    assert!(!msg.contains("hypha_from_pod"), "ingress is fine: {msg}");
}
