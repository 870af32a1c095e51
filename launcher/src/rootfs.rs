//! The container's filesystem, made inside its new mount namespace by its init: the host
//! root bound read-only (or an overlay over `--rootfs`), a fresh `/proc` for the PID
//! namespace, a read-only `/sys`, a minimal `/dev`, private writable `/tmp`, `/run` and
//! `/var/tmp`, then `pivot_root` into it.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct RootfsError {
    pub op: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> RootfsError + 'a {
    move |e| RootfsError {
        op,
        path: path.to_owned(),
        source: e.into(),
    }
}

/// What the root filesystem is made of.
#[derive(Debug, Clone)]
pub struct Plan {
    /// An empty directory the new root is mounted on.
    pub root: PathBuf,
    /// `--rootfs`: the overlay's lower directory, with `upper` and `work` beside it.
    pub overlay: Option<Overlay>,
}

#[derive(Debug, Clone)]
pub struct Overlay {
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Mounted inside a user namespace.
    pub userxattr: bool,
}

/// Devices bound from the host into the container's `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// `mount_setattr(2)` (no wrapper in nix or glibc 2.36).
fn set_readonly_recursive(path: &Path) -> Result<(), RootfsError> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in path");
    // SAFETY: valid C string and a correctly sized, initialised mount_attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(RootfsError {
            op: "making read-only",
            path: path.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn mkdir(p: &Path) {
    let _ = std::fs::create_dir_all(p);
}

fn mount_fs(
    fstype: &'static str,
    target: &Path,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), RootfsError> {
    mount(Some(fstype), target, Some(fstype), flags, data).map_err(err("mounting", target))
}

/// Builds the root and pivots into it. Runs in the container's init, in its own mount
/// namespace, before the security settings (which refuse `mount`).
pub fn setup(plan: &Plan) -> Result<(), RootfsError> {
    let root = &plan.root;
    // Nothing mounted from here on propagates back to the host, nor the other way.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(err("making private", Path::new("/")))?;
    match &plan.overlay {
        None => {
            mount(
                Some("/"),
                root,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(err("binding / on", root))?;
            set_readonly_recursive(root)?;
        }
        Some(o) => {
            // In a user namespace overlayfs may not use trusted.* xattrs: user.* then.
            let data = format!(
                "lowerdir={},upperdir={},workdir={}{}",
                o.lower.display(),
                o.upper.display(),
                o.work.display(),
                if o.userxattr { ",userxattr" } else { "" }
            );
            mount(
                Some("overlay"),
                root,
                Some("overlay"),
                MsFlags::empty(),
                Some(data.as_str()),
            )
            .map_err(err("mounting an overlay on", root))?;
            for d in ["proc", "sys", "dev", "tmp", "run", "var/tmp"] {
                mkdir(&root.join(d));
            }
        }
    }
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", &root.join("proc"), nosuid, None)?;
    mount_fs(
        "sysfs",
        &root.join("sys"),
        nosuid | MsFlags::MS_RDONLY,
        None,
    )?;
    dev(&root.join("dev"))?;
    for (d, mode) in [("tmp", "1777"), ("run", "755"), ("var/tmp", "1777")] {
        let data = format!("mode={mode}");
        mount_fs(
            "tmpfs",
            &root.join(d),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(&data),
        )?;
    }
    pivot(root)
}

/// A tmpfs `/dev` with the usual device nodes bound from the host, its own `devpts`, a
/// `/dev/shm` and the standard symlinks.
fn dev(dev: &Path) -> Result<(), RootfsError> {
    mount_fs(
        "tmpfs",
        dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )?;
    for d in DEVICES {
        let target = dev.join(d);
        std::fs::File::create(&target).map_err(|source| RootfsError {
            op: "creating",
            path: target.clone(),
            source,
        })?;
        let source = Path::new("/dev").join(d);
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err("binding a device on", &target))?;
    }
    mkdir(&dev.join("pts"));
    mount_fs(
        "devpts",
        &dev.join("pts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mkdir(&dev.join("shm"));
    mount_fs(
        "tmpfs",
        &dev.join("shm"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, dev.join(link));
    }
    Ok(())
}

/// `pivot_root(".", ".")` then detaching the old root stacked under the new one: works on
/// a read-only root, where no directory for the old root can be made.
fn pivot(root: &Path) -> Result<(), RootfsError> {
    nix::unistd::chdir(root).map_err(err("entering", root))?;
    nix::unistd::pivot_root(".", ".").map_err(err("pivot_root into", root))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(err("detaching the old root under", root))?;
    nix::unistd::chdir("/").map_err(err("entering", Path::new("/")))
}

/// Finds `cmd` as the container will: a path with a `/` as it is, a bare name on the
/// usual `PATH`; both looked up under `root` (the host root or `--rootfs`). Returns the
/// path inside the container.
pub fn resolve_command(root: &Path, cmd: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let exec = |p: &Path| {
        let host = root.join(p.strip_prefix("/").unwrap_or(p));
        std::fs::metadata(&host).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if cmd.contains('/') {
        let p = if cmd.starts_with('/') {
            PathBuf::from(cmd)
        } else {
            Path::new("/").join(cmd)
        };
        return exec(&p).then_some(p);
    }
    DEFAULT_PATH
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| exec(p))
}

/// The `PATH` commands run with.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_commands_under_the_root() {
        let root = Path::new("/");
        assert_eq!(
            resolve_command(root, "sh").unwrap().file_name().unwrap(),
            "sh"
        );
        assert!(resolve_command(root, "/bin/sh").is_some());
        assert!(resolve_command(root, "no-such-command-here").is_none());
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("data"), "x").unwrap();
        assert!(
            resolve_command(tmp.path(), "/data").is_none(),
            "not executable"
        );
        assert!(resolve_command(tmp.path(), "sh").is_none(), "empty root");
    }
}
