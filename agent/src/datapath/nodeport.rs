//! NodePort in the eBPF datapath: `hypha_from_netdev` (`ebpf/src/nodeport.rs`) on the
//! TCX ingress of each of the node's external devices, as links pinned under the pin
//! directory's `links/` as `nodeport-<ifindex>`.
//!
//! A restarted agent swaps its program into the link already on a device
//! (`bpf_link_update`), so NodePort traffic is never left untranslated; a pinned link
//! on a device no longer listed is detached by removing its pin.

use std::{
    io,
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
};

use hypha_common::nat::FROM_NETDEV;

use super::{
    NodePortDevice,
    ebpf::{EbpfError, attach_pinned, remove_pin},
    link_info,
};

/// The prefix of the NodePort links' pins under `links/` (which `sweep` leaves alone).
pub(super) const PIN_PREFIX: &str = "nodeport-";

/// Where the link of the NodePort program on device `ifindex` is pinned.
fn pin_path(links_dir: &Path, ifindex: u32) -> PathBuf {
    links_dir.join(format!("{PIN_PREFIX}{ifindex}"))
}

/// Attaches the NodePort program (`prog`, loaded) to the TCX ingress of every device
/// of `devices` and detaches it from every other device it is pinned on. Keeps going
/// past a failed device and returns the first error with the others' as its cleanup.
pub(super) fn set(
    prog: BorrowedFd<'_>,
    links_dir: &Path,
    devices: &[NodePortDevice],
) -> Result<(), EbpfError> {
    let mut errors = Vec::new();
    for device in devices {
        if let Err(e) = attach(prog, &pin_path(links_dir, device.ifindex), device) {
            errors.push(e);
        }
    }
    errors.extend(detach_others(links_dir, devices));
    let mut errors = errors.into_iter();
    match errors.next() {
        None => Ok(()),
        Some(first) => {
            let cleanup: Vec<_> = errors.collect();
            if cleanup.is_empty() {
                Err(first)
            } else {
                Err(EbpfError::WithCleanup {
                    error: Box::new(first),
                    cleanup,
                })
            }
        }
    }
}

/// Attaches `prog` to `device`, swapping it into the link pinned at `pin` when that
/// link is on the device's TCX ingress (an earlier agent's); a pinned link on anything
/// else (the device was made anew) is replaced by a new one.
fn attach(prog: BorrowedFd<'_>, pin: &Path, device: &NodePortDevice) -> Result<(), EbpfError> {
    attach_pinned(
        prog,
        pin,
        |link| {
            let info = link_info::info(link)?;
            Ok(info.ifindex == device.ifindex && info.attach_type == link_info::BPF_TCX_INGRESS)
        },
        || {
            link_info::tcx_attach(prog, device.ifindex, link_info::BPF_TCX_INGRESS).map_err(
                |source| EbpfError::Attach {
                    program: FROM_NETDEV,
                    ifname: device.name.clone(),
                    hook: "ingress",
                    source,
                },
            )
        },
    )
}

/// Removes the pins (and so the links) of the NodePort program on devices not in
/// `devices`; collects errors and keeps going.
fn detach_others(links_dir: &Path, devices: &[NodePortDevice]) -> Vec<EbpfError> {
    let entries = match std::fs::read_dir(links_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(source) => {
            return vec![EbpfError::Io {
                op: "list",
                path: links_dir.to_owned(),
                source,
            }];
        }
    };
    let keep: Vec<PathBuf> = devices
        .iter()
        .map(|d| pin_path(links_dir, d.ifindex))
        .collect();
    let mut errors = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(PIN_PREFIX));
        if ours
            && !keep.contains(&path)
            && let Err(e) = remove_pin(&path)
        {
            errors.push(e);
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_named_by_the_devices_ifindex() {
        assert_eq!(
            pin_path(Path::new("/sys/fs/bpf/hypha/links"), 7),
            Path::new("/sys/fs/bpf/hypha/links/nodeport-7")
        );
    }

    #[test]
    fn only_nodeport_pins_of_devices_no_longer_listed_are_removed() {
        let dir = std::env::temp_dir().join(format!("hypha-nodeport-pins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        for name in [
            "nodeport-2",
            "nodeport-3",
            "tcx-2-ingress",
            "tunnel-ingress",
        ] {
            std::fs::write(dir.join(name), b"").expect("create a stand-in pin");
        }
        let kept = NodePortDevice {
            name: "eth0".into(),
            ifindex: 2,
            addresses: Vec::new(),
        };
        let errors = detach_others(&dir, &[kept]);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().into_string().expect("name"))
            .collect();
        left.sort();
        std::fs::remove_dir_all(&dir).expect("remove the test directory");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(left, ["nodeport-2", "tcx-2-ingress", "tunnel-ingress"]);
    }
}
