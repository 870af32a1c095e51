//! CNI CHECK looks behind the pinned links (privileged: run as root, here and in CI): a
//! link that stays pinned after its program was replaced through it, or after it was
//! detached from its device, fails the check with the program named.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use aya::EbpfLoader;
use aya::programs::SchedClassifier;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use hypha_common::programs;
use hypha_tests::node::{Node, Pod};

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

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

/// Another load of the datapath object (on the node's pinned maps, as a second agent
/// would), with `name` swapped into the link pinned at `pin`.
fn replace_program(node: &Node, name: &str, pin: &Path) -> u32 {
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

#[test]
fn check_names_a_program_replaced_or_detached_behind_a_pinned_link() {
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

    // Another hypha_from_pod swapped into the ingress link: same name and code, another
    // program than the one the agent loaded.
    let ingress = link_pin(&node, ep.host_ifindex, "ingress");
    let foreign = replace_program(&node, programs::FROM_POD, &ingress);
    let problems = node
        .client()
        .check_endpoint(&a.container_id, "eth0")
        .unwrap()
        .problems;
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
