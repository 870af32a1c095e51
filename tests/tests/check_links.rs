//! CNI CHECK looks behind an endpoint's attachments, in both attach modes (privileged:
//! run as root, here and in CI): with tc, a filter whose program someone else replaced or
//! a filter removed; with TCX, a link that stays pinned after its program was replaced
//! through it, or after it was detached from its device. Each fails the check with the
//! program named. An agent restarted in the other mode converts its endpoints: attached
//! the new way, the old way gone, still forwarding.

use std::ffi::CString;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use aya::EbpfLoader;
use aya::programs::SchedClassifier;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use hypha_common::programs;
use hypha_netlink::{BpfFilter, Netlink, TcHook};
use hypha_tests::netns::NamedNetns;
use hypha_tests::node::{Node, Pod};

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// The priority and handle of the agent's filters (`TC_PRIORITY`, `TC_HANDLE` in the
/// agent's datapath).
const PRIORITY: u16 = 1;
const HANDLE: u32 = 1;

fn link_pin(node: &Node, ifindex: u32, hook: &str) -> PathBuf {
    node.pin_dir
        .join("links")
        .join(format!("tcx-{ifindex}-{hook}"))
}

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

/// The agent's own check of the endpoint: its problems.
fn problems(node: &Node, pod: &Pod) -> Vec<String> {
    node.client()
        .check_endpoint(&pod.container_id, "eth0")
        .unwrap()
        .problems
}

fn ping(ns: &NamedNetns, to: &str) {
    ns.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", to]);
}

/// Another load of the datapath object (on the node's pinned maps, as a second agent
/// would), with `name` loaded and verified; the program stays loaded while `Ebpf` lives.
fn load_again(node: &Node, name: &str) -> (aya::Ebpf, u32) {
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
    (ebpf, id)
}

/// Puts another load of program `name` into the agent's filter on `hook` of `ifindex`;
/// the id of that program.
fn replace_filter_program(node: &Node, name: &str, hook: TcHook, ifindex: u32) -> u32 {
    let (mut ebpf, id) = load_again(node, name);
    let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
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

/// Swaps another load of program `name` into the link pinned at `pin`; its id.
fn replace_link_program(node: &Node, name: &str, pin: &Path) -> u32 {
    let (mut ebpf, id) = load_again(node, name);
    let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
    let link = PinnedLink::from_pin(pin).expect("open the pinned link");
    let link = SchedClassifierLink::try_from(FdLink::from(link)).expect("a TCX link");
    let link_id = prog.attach_to_link(link).expect("swap the program in");
    // The pin keeps the link (now running this program) alive.
    drop(prog.take_link(link_id).expect("take the link"));
    id
}

/// Detaches the link pinned at `pin` from its device (`BPF_LINK_DETACH`), leaving the
/// pin and the link's program in place.
fn detach_link(pin: &Path) {
    let path = CString::new(pin.as_os_str().as_bytes()).unwrap();
    // `obj_get` of `union bpf_attr`: pathname, bpf_fd, file_flags, path_fd.
    let get: [u64; 3] = [path.as_ptr() as u64, 0, 0];
    // SAFETY: bpf(2) with an attribute of the size given; `path` outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, get.as_ptr(), 24) };
    assert!(
        fd >= 0,
        "open {}: {}",
        pin.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor the kernel just returned.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // `link_detach` of `union bpf_attr`: link_fd.
    let detach: [u32; 2] = [fd.as_raw_fd() as u32, 0];
    // SAFETY: as above.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, detach.as_ptr(), 8) };
    assert_eq!(
        ret,
        0,
        "detach {}: {}",
        pin.display(),
        std::io::Error::last_os_error()
    );
}

/// The agent's filters (priority and handle) on the veth `ifindex`: ingress, egress.
fn agent_filters(node: &Node, ifindex: u32) -> [bool; 2] {
    let mut nl = Netlink::in_netns(&node.netns.path()).expect("netlink in the node");
    [TcHook::Ingress, TcHook::Egress].map(|hook| {
        nl.bpf_filters(ifindex, hook)
            .expect("list the filters")
            .iter()
            .any(|f| f.priority == PRIORITY && f.handle == HANDLE)
    })
}

fn pinned_links(node: &Node, ifindex: u32) -> [bool; 2] {
    ["ingress", "egress"].map(|hook| link_pin(node, ifindex, hook).exists())
}

#[test]
fn check_names_a_program_replaced_or_removed_behind_a_tc_filter() {
    hypha_tests::require_root!();
    // The default mode is tc.
    let mut node = Node::start();
    assert_eq!(node.status().datapath.attach, "tc");
    let a = node.add_pod("a");
    let ep = node.endpoint(&a.container_id);
    assert_eq!(cni_check(&node, &a), Ok(()));
    assert_eq!(problems(&node, &a), Vec::<String>::new());
    assert_eq!(agent_filters(&node, ep.host_ifindex), [true, true]);
    assert_eq!(pinned_links(&node, ep.host_ifindex), [false, false]);

    // Another hypha_from_pod in the ingress filter: same name and code, another program
    // than the one the agent loaded.
    let foreign =
        replace_filter_program(&node, programs::FROM_POD, TcHook::Ingress, ep.host_ifindex);
    let problems = problems(&node, &a);
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

#[test]
fn check_names_a_program_replaced_or_detached_behind_a_pinned_tcx_link() {
    hypha_tests::require_root!();
    let mut node = Node::start_with(&["--attach", "tcx"]);
    assert_eq!(node.status().datapath.attach, "tcx");
    let a = node.add_pod("a");
    let ep = node.endpoint(&a.container_id);
    assert_eq!(cni_check(&node, &a), Ok(()));
    assert_eq!(problems(&node, &a), Vec::<String>::new());
    assert_eq!(pinned_links(&node, ep.host_ifindex), [true, true]);
    assert_eq!(agent_filters(&node, ep.host_ifindex), [false, false]);

    // Another hypha_from_pod swapped into the ingress link: same name and code, another
    // program than the one the agent loaded.
    let ingress = link_pin(&node, ep.host_ifindex, "ingress");
    let foreign = replace_link_program(&node, programs::FROM_POD, &ingress);
    let problems = problems(&node, &a);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains(&format!(
            "program hypha_from_pod is not what runs on the ingress of {}: its pinned link {} runs program hypha_from_pod (id {foreign})",
            ep.host_ifname,
            ingress.display()
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

    // The egress link detached from the veth: still pinned, still holding the agent's
    // program, attached to nothing.
    let egress = link_pin(&node, ep.host_ifindex, "egress");
    detach_link(&egress);
    assert!(egress.exists(), "the pin stays");
    let (code, msg) = cni_check(&node, &a).unwrap_err();
    assert!(
        msg.contains(&format!(
            "program hypha_to_pod is detached from {}: its pinned link {}",
            ep.host_ifname,
            egress.display()
        )),
        "{code} {msg}"
    );
    assert!(!msg.contains("hypha_from_pod"), "ingress is fine: {msg}");
}

/// Starts in `from` mode with two pods, restarts the agent in `to` mode, and checks that
/// both endpoints are attached the new way only and still forward.
fn restart_in_the_other_mode(from: &str, to: &str) {
    let mut node = Node::start_with(&["--attach", from]);
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    ping(&a.netns, &b.address.to_string());
    node.kill_agent();
    node.set_agent_args(&["--attach", to]);
    node.start_agent();
    assert_eq!(node.status().datapath.attach, to);
    for pod in [&a, &b] {
        let ep = node.endpoint(&pod.container_id);
        // Attached the new way, running the new agent's programs.
        assert_eq!(problems(&node, pod), Vec::<String>::new(), "{to}");
        assert_eq!(cni_check(&node, pod), Ok(()));
        let (filters, links) = match to {
            "tc" => ([true, true], [false, false]),
            _ => ([false, false], [true, true]),
        };
        assert_eq!(agent_filters(&node, ep.host_ifindex), filters, "tc filters");
        assert_eq!(pinned_links(&node, ep.host_ifindex), links, "TCX links");
    }
    ping(&a.netns, &b.address.to_string());
    ping(&b.netns, &a.address.to_string());
    // And a pod added after the restart gets the new mode too.
    let c = node.add_pod("c");
    let ep = node.endpoint(&c.container_id);
    assert_eq!(problems(&node, &c), Vec::<String>::new());
    assert_eq!(
        agent_filters(&node, ep.host_ifindex),
        if to == "tc" {
            [true, true]
        } else {
            [false, false]
        }
    );
    ping(&c.netns, &a.address.to_string());
}

#[test]
fn an_agent_restarted_with_tcx_converts_tc_endpoints_to_tcx_links() {
    hypha_tests::require_root!();
    restart_in_the_other_mode("tc", "tcx");
}

#[test]
fn an_agent_restarted_with_tc_converts_tcx_endpoints_to_tc_filters() {
    hypha_tests::require_root!();
    restart_in_the_other_mode("tcx", "tc");
}
