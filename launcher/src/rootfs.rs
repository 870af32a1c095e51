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

/// The system calls the filesystem setup makes, so that its sequence is unit-tested with
/// [`Recorder`] without root or a mount namespace (youki's `Syscall`).
pub trait Syscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), nix::Error>;
    /// `mount_setattr(path, AT_RECURSIVE, MOUNT_ATTR_RDONLY)`.
    fn set_readonly_recursive(&self, path: &Path) -> std::io::Result<()>;
    fn create_file(&self, path: &Path) -> std::io::Result<()>;
    /// Best effort: a directory that cannot be made shows up as the mount that fails.
    fn mkdir_all(&self, path: &Path);
    fn symlink(&self, target: &str, link: &Path);
    /// chdir into `root`, `pivot_root(".", ".")`, detach the old root, chdir to `/`.
    fn pivot_root(&self, root: &Path) -> Result<(), nix::Error>;
}

/// The real system calls.
pub struct Linux;

impl Syscall for Linux {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), nix::Error> {
        mount(source, target, fstype, flags, data)
    }

    fn set_readonly_recursive(&self, path: &Path) -> std::io::Result<()> {
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
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?;
        // SAFETY: a valid C string and a correctly sized, initialised mount_attr (no
        // wrapper in nix or glibc 2.36).
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
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn create_file(&self, path: &Path) -> std::io::Result<()> {
        std::fs::File::create(path).map(drop)
    }

    fn mkdir_all(&self, path: &Path) {
        let _ = std::fs::create_dir_all(path);
    }

    fn symlink(&self, target: &str, link: &Path) {
        let _ = std::os::unix::fs::symlink(target, link);
    }

    fn pivot_root(&self, root: &Path) -> Result<(), nix::Error> {
        // pivot_root(".", ".") stacks the old root under the new one, and detaching it
        // works on a read-only root, where no directory for the old root can be made.
        nix::unistd::chdir(root)?;
        nix::unistd::pivot_root(".", ".")?;
        umount2(".", MntFlags::MNT_DETACH)?;
        nix::unistd::chdir("/")
    }
}

fn mount_fs(
    sys: &dyn Syscall,
    fstype: &'static str,
    target: &Path,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), RootfsError> {
    sys.mount(Some(Path::new(fstype)), target, Some(fstype), flags, data)
        .map_err(err("mounting", target))
}

/// Builds the root and pivots into it. Runs in the container's init, in its own mount
/// namespace, before the security settings (which refuse `mount`).
pub fn setup(sys: &dyn Syscall, plan: &Plan) -> Result<(), RootfsError> {
    let root = &plan.root;
    // Nothing mounted from here on propagates back to the host, nor the other way.
    sys.mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )
    .map_err(err("making private", Path::new("/")))?;
    match &plan.overlay {
        None => {
            sys.mount(
                Some(Path::new("/")),
                root,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )
            .map_err(err("binding / on", root))?;
            sys.set_readonly_recursive(root)
                .map_err(|source| RootfsError {
                    op: "making read-only",
                    path: root.clone(),
                    source,
                })?;
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
            mount_fs(sys, "overlay", root, MsFlags::empty(), Some(&data))?;
            for d in ["proc", "sys", "dev", "tmp", "run", "var/tmp"] {
                sys.mkdir_all(&root.join(d));
            }
        }
    }
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs(sys, "proc", &root.join("proc"), nosuid, None)?;
    mount_fs(
        sys,
        "sysfs",
        &root.join("sys"),
        nosuid | MsFlags::MS_RDONLY,
        None,
    )?;
    dev(sys, &root.join("dev"))?;
    for (d, mode) in [("tmp", "1777"), ("run", "755"), ("var/tmp", "1777")] {
        let data = format!("mode={mode}");
        mount_fs(
            sys,
            "tmpfs",
            &root.join(d),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(&data),
        )?;
    }
    sys.pivot_root(root).map_err(err("pivot_root into", root))
}

/// A tmpfs `/dev` with the usual device nodes bound from the host, its own `devpts`, a
/// `/dev/shm` and the standard symlinks.
fn dev(sys: &dyn Syscall, dev: &Path) -> Result<(), RootfsError> {
    mount_fs(
        sys,
        "tmpfs",
        dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )?;
    for d in DEVICES {
        let target = dev.join(d);
        sys.create_file(&target).map_err(|source| RootfsError {
            op: "creating",
            path: target.clone(),
            source,
        })?;
        let source = Path::new("/dev").join(d);
        sys.mount(Some(&source), &target, None, MsFlags::MS_BIND, None)
            .map_err(err("binding a device on", &target))?;
    }
    sys.mkdir_all(&dev.join("pts"));
    mount_fs(
        sys,
        "devpts",
        &dev.join("pts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    sys.mkdir_all(&dev.join("shm"));
    mount_fs(
        sys,
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
        sys.symlink(target, &dev.join(link));
    }
    Ok(())
}

/// Records every call as a line of text, failing the mount whose target ends like
/// `fail_mount`.
#[cfg(test)]
#[derive(Default)]
pub struct Recorder {
    pub calls: std::cell::RefCell<Vec<String>>,
    pub fail_mount: Option<&'static str>,
}

#[cfg(test)]
impl Syscall for Recorder {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), nix::Error> {
        self.calls.borrow_mut().push(format!(
            "mount {} {} {} {} {}",
            source.map_or("-".into(), |s| s.display().to_string()),
            target.display(),
            fstype.unwrap_or("-"),
            if flags.is_empty() {
                "0".to_owned()
            } else {
                flags
                    .iter_names()
                    .map(|(n, _)| n)
                    .collect::<Vec<_>>()
                    .join("|")
            },
            data.unwrap_or("-")
        ));
        if self.fail_mount.is_some_and(|f| target.ends_with(f)) {
            return Err(nix::Error::EPERM);
        }
        Ok(())
    }
    fn set_readonly_recursive(&self, path: &Path) -> std::io::Result<()> {
        self.calls
            .borrow_mut()
            .push(format!("readonly {}", path.display()));
        Ok(())
    }
    fn create_file(&self, path: &Path) -> std::io::Result<()> {
        self.calls
            .borrow_mut()
            .push(format!("file {}", path.display()));
        Ok(())
    }
    fn mkdir_all(&self, path: &Path) {
        self.calls
            .borrow_mut()
            .push(format!("mkdir {}", path.display()));
    }
    fn symlink(&self, target: &str, link: &Path) {
        self.calls
            .borrow_mut()
            .push(format!("symlink {} -> {target}", link.display()));
    }
    fn pivot_root(&self, root: &Path) -> Result<(), nix::Error> {
        self.calls
            .borrow_mut()
            .push(format!("pivot {}", root.display()));
        Ok(())
    }
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

    fn plan(overlay: Option<Overlay>) -> Plan {
        Plan {
            root: "/r".into(),
            overlay,
        }
    }

    #[test]
    fn host_root_read_only_sequence() {
        let rec = Recorder::default();
        setup(&rec, &plan(None)).unwrap();
        let calls = rec.calls.borrow();
        // Private first, then the read-only host root, the fresh filesystems, the pivot.
        assert!(calls[0] == "mount - / - MS_REC|MS_PRIVATE -", "{calls:?}");
        assert!(calls[1] == "mount / /r - MS_BIND|MS_REC -", "{calls:?}");
        assert_eq!(calls[2], "readonly /r");
        assert!(calls[3].starts_with("mount proc /r/proc proc"), "{calls:?}");
        assert!(calls[4].contains("/r/sys sysfs") && calls[4].contains("MS_RDONLY"));
        assert!(
            calls[5].starts_with("mount tmpfs /r/dev tmpfs"),
            "{calls:?}"
        );
        for d in DEVICES {
            let bind = format!("mount /dev/{d} /r/dev/{d} - MS_BIND -");
            assert!(calls.contains(&bind), "{bind} in {calls:?}");
        }
        let pos = |prefix: &str| calls.iter().position(|c| c.starts_with(prefix)).unwrap();
        assert!(pos("mount devpts /r/dev/pts") > pos("mkdir /r/dev/pts"));
        for (d, mode) in [("tmp", "1777"), ("run", "755"), ("var/tmp", "1777")] {
            let c = &calls[pos(&format!("mount tmpfs /r/{d} "))];
            assert!(c.ends_with(&format!("mode={mode}")), "{c}");
        }
        assert!(calls.contains(&"symlink /r/dev/fd -> /proc/self/fd".to_owned()));
        assert_eq!(calls.last().unwrap(), "pivot /r");
    }

    #[test]
    fn overlay_sequence() {
        let rec = Recorder::default();
        let o = Overlay {
            lower: "/img".into(),
            upper: "/s/upper".into(),
            work: "/s/work".into(),
            userxattr: true,
        };
        setup(&rec, &plan(Some(o))).unwrap();
        let calls = rec.calls.borrow();
        assert_eq!(
            calls[1],
            "mount overlay /r overlay 0 lowerdir=/img,upperdir=/s/upper,workdir=/s/work,userxattr"
        );
        assert!(
            !calls.iter().any(|c| c.starts_with("readonly")),
            "the overlay stays writable"
        );
        assert!(calls.contains(&"mkdir /r/var/tmp".to_owned()));
    }

    #[test]
    fn a_failed_mount_is_named_and_stops_before_the_pivot() {
        let rec = Recorder {
            fail_mount: Some("sys"),
            ..Recorder::default()
        };
        let e = setup(&rec, &plan(None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mounting /r/sys: Operation not permitted (os error 1)"
        );
        assert!(!rec.calls.borrow().iter().any(|c| c.starts_with("pivot")));
    }

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
