//! Security settings of a container: capabilities, `no_new_privs` and the default seccomp
//! filter, as Docker's and podman's defaults have them. `--privileged` lifts all three.

use std::collections::BTreeMap;
use std::str::FromStr as _;

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// `--cap-add`/`--cap-drop` named no capability.
    #[error("unknown capability {0:?} (for example NET_ADMIN or CAP_NET_ADMIN, or ALL)")]
    UnknownCapability(String),
    /// Building the seccomp filter failed.
    #[error("building the seccomp filter: {0}")]
    Seccomp(#[from] seccompiler::Error),
    /// Changing a capability set failed.
    #[error("setting the {set} capability set: {source}")]
    Caps {
        set: &'static str,
        source: caps::errors::CapsError,
    },
    /// A prctl or seccomp call failed.
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        source: std::io::Error,
    },
}

/// Docker's default capability set.
pub const DEFAULT_CAPS: [Capability; 14] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

/// What a container runs with; kept in its state so `hypha exec` applies the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Security {
    pub privileged: bool,
    /// Capability names (`CAP_…`), sorted.
    pub capabilities: Vec<String>,
}

fn parse_cap(name: &str) -> Result<Option<Capability>, SecurityError> {
    let upper = name.trim().to_ascii_uppercase();
    if upper == "ALL" {
        return Ok(None);
    }
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    Capability::from_str(&full)
        .map(Some)
        .map_err(|_| SecurityError::UnknownCapability(name.to_owned()))
}

impl Security {
    /// The default set, then `--cap-drop`, then `--cap-add` (so `--cap-drop ALL --cap-add
    /// NET_RAW` leaves just NET_RAW, as with Docker). `--privileged` gives every capability.
    pub fn new(privileged: bool, add: &[String], drop: &[String]) -> Result<Self, SecurityError> {
        let mut set: CapsHashSet = if privileged {
            caps::all()
        } else {
            DEFAULT_CAPS.into_iter().collect()
        };
        for d in drop {
            match parse_cap(d)? {
                Some(c) => {
                    set.remove(&c);
                }
                None => set.clear(),
            }
        }
        for a in add {
            match parse_cap(a)? {
                Some(c) => {
                    set.insert(c);
                }
                None => set.extend(caps::all()),
            }
        }
        let mut capabilities: Vec<String> = set.iter().map(ToString::to_string).collect();
        capabilities.sort();
        Ok(Self {
            privileged,
            capabilities,
        })
    }

    /// The set as the kernel's bit mask (as `CapEff` in `/proc/PID/status` shows it).
    pub fn mask(&self) -> u64 {
        self.caps()
            .iter()
            .map(Capability::bitmask)
            .fold(0, |a, b| a | b)
    }

    fn caps(&self) -> CapsHashSet {
        self.capabilities
            .iter()
            .filter_map(|c| Capability::from_str(c).ok())
            .collect()
    }

    /// The seccomp programs to load, none when privileged. Built before the container
    /// starts, so a failure leaves nothing behind and the child only loads them.
    pub fn seccomp(&self) -> Result<Vec<BpfProgram>, SecurityError> {
        if self.privileged {
            return Ok(vec![]);
        }
        default_filters()
    }

    /// Applies the capability set and `no_new_privs`, and loads `filters`, to the calling
    /// process, in that order (seccomp last, as it may refuse what the others need).
    pub fn apply(&self, filters: &[BpfProgram]) -> Result<(), SecurityError> {
        if self.privileged {
            return Ok(());
        }
        let keep = self.caps();
        let set = |cset: CapSet, name: &'static str| {
            caps::set(None, cset, &keep).map_err(|source| SecurityError::Caps { set: name, source })
        };
        for cap in caps::all() {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(|source| SecurityError::Caps {
                    set: "bounding",
                    source,
                })?;
            }
        }
        caps::clear(None, CapSet::Ambient).map_err(|source| SecurityError::Caps {
            set: "ambient",
            source,
        })?;
        // Effective first: it must stay within permitted at every step.
        set(CapSet::Effective, "effective")?;
        set(CapSet::Inheritable, "inheritable")?;
        set(CapSet::Permitted, "permitted")?;
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(SecurityError::Sys {
                op: "prctl(PR_SET_NO_NEW_PRIVS)",
                source: std::io::Error::last_os_error(),
            });
        }
        for f in filters {
            seccompiler::apply_filter(f).map_err(|e| SecurityError::Sys {
                op: "loading the seccomp filter",
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        Ok(())
    }
}

/// System calls the default filter refuses with EPERM: kernel modules, kexec, mounting,
/// BPF, tracing and reading other processes, keyrings, clocks, swap, reboot, namespaces,
/// file handles and the like (Docker's default profile refuses these to a container
/// without CAP_SYS_ADMIN).
pub fn refused_syscalls() -> Vec<(&'static str, i64)> {
    let mut v = vec![
        ("init_module", libc::SYS_init_module),
        ("finit_module", libc::SYS_finit_module),
        ("delete_module", libc::SYS_delete_module),
        ("kexec_load", libc::SYS_kexec_load),
        ("kexec_file_load", libc::SYS_kexec_file_load),
        ("mount", libc::SYS_mount),
        ("umount2", libc::SYS_umount2),
        ("fsopen", libc::SYS_fsopen),
        ("fsconfig", libc::SYS_fsconfig),
        ("fsmount", libc::SYS_fsmount),
        ("fspick", libc::SYS_fspick),
        ("move_mount", libc::SYS_move_mount),
        ("open_tree", libc::SYS_open_tree),
        ("mount_setattr", libc::SYS_mount_setattr),
        ("pivot_root", libc::SYS_pivot_root),
        ("bpf", libc::SYS_bpf),
        ("perf_event_open", libc::SYS_perf_event_open),
        ("ptrace", libc::SYS_ptrace),
        ("process_vm_readv", libc::SYS_process_vm_readv),
        ("process_vm_writev", libc::SYS_process_vm_writev),
        ("kcmp", libc::SYS_kcmp),
        ("add_key", libc::SYS_add_key),
        ("request_key", libc::SYS_request_key),
        ("keyctl", libc::SYS_keyctl),
        ("reboot", libc::SYS_reboot),
        ("swapon", libc::SYS_swapon),
        ("swapoff", libc::SYS_swapoff),
        ("acct", libc::SYS_acct),
        ("settimeofday", libc::SYS_settimeofday),
        ("clock_settime", libc::SYS_clock_settime),
        ("clock_adjtime", libc::SYS_clock_adjtime),
        ("adjtimex", libc::SYS_adjtimex),
        ("syslog", libc::SYS_syslog),
        ("quotactl", libc::SYS_quotactl),
        ("open_by_handle_at", libc::SYS_open_by_handle_at),
        ("name_to_handle_at", libc::SYS_name_to_handle_at),
        ("userfaultfd", libc::SYS_userfaultfd),
        ("unshare", libc::SYS_unshare),
        ("setns", libc::SYS_setns),
        ("vhangup", libc::SYS_vhangup),
        ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        ("iopl", libc::SYS_iopl),
        ("ioperm", libc::SYS_ioperm),
        ("uselib", libc::SYS_uselib),
        ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ]);
    v
}

/// Namespace flags `clone` is refused with (creating namespaces needs CAP_SYS_ADMIN in
/// Docker's profile; the user namespace needs no capability, so it must be filtered).
const CLONE_NS_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

/// The default filter as two programs: EPERM for [`refused_syscalls`] and for `clone`
/// with a namespace flag, and ENOSYS for `clone3` (its flags are behind a pointer that
/// seccomp cannot read; libc then falls back to `clone`, as with Docker's profile).
pub fn default_filters() -> Result<Vec<BpfProgram>, SecurityError> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(seccompiler::Error::Backend)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = refused_syscalls()
        .into_iter()
        .map(|(_, nr)| (nr, vec![]))
        .collect();
    let clone_rules = CLONE_NS_FLAGS
        .iter()
        .map(|&f| {
            let cond = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(f as u64),
                f as u64,
            )?;
            SeccompRule::new(vec![cond])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(seccompiler::Error::Backend)?;
    rules.insert(libc::SYS_clone, clone_rules);
    let eperm = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(seccompiler::Error::Backend)?;
    let enosys = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(seccompiler::Error::Backend)?;
    Ok(vec![
        eperm.try_into().map_err(seccompiler::Error::Backend)?,
        enosys.try_into().map_err(seccompiler::Error::Backend)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_set_is_dockers() {
        let s = Security::new(false, &[], &[]).unwrap();
        assert_eq!(s.capabilities.len(), 14);
        // Docker's default CapEff.
        assert_eq!(s.mask(), 0xa80425fb);
        assert!(!s.capabilities.contains(&"CAP_SYS_ADMIN".to_owned()));
    }

    #[test]
    fn add_and_drop() {
        let s = Security::new(false, &["net_admin".into()], &["CAP_CHOWN".into()]).unwrap();
        assert!(s.capabilities.contains(&"CAP_NET_ADMIN".to_owned()));
        assert!(!s.capabilities.contains(&"CAP_CHOWN".to_owned()));
        let s = Security::new(false, &["NET_RAW".into()], &["ALL".into()]).unwrap();
        assert_eq!(s.capabilities, ["CAP_NET_RAW"]);
        let s = Security::new(false, &["ALL".into()], &[]).unwrap();
        assert_eq!(s.capabilities.len(), caps::all().len());
        let e = Security::new(false, &["FLY".into()], &[]).unwrap_err();
        assert!(e.to_string().contains("\"FLY\""), "{e}");
    }

    #[test]
    fn privileged_has_everything_and_no_filter() {
        let s = Security::new(true, &[], &[]).unwrap();
        assert_eq!(s.capabilities.len(), caps::all().len());
        assert!(s.seccomp().unwrap().is_empty());
    }

    #[test]
    fn the_default_filter_compiles() {
        let f = Security::new(false, &[], &[]).unwrap().seccomp().unwrap();
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|p| !p.is_empty()));
        let names: Vec<_> = refused_syscalls().into_iter().map(|(n, _)| n).collect();
        for must in [
            "init_module",
            "kexec_load",
            "mount",
            "bpf",
            "ptrace",
            "fsopen",
        ] {
            assert!(names.contains(&must), "{must}");
        }
    }
}
