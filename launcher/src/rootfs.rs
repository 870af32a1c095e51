//! The container's filesystem, made inside its new mount namespace by its init: the host
//! root bound read-only, or an overlay over `--rootfs` or an image's layers, a fresh `/proc` for the PID
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
    /// `--rootfs` or `--image`: the overlay, its upper and work directories in the
    /// container's state directory.
    pub overlay: Option<Overlay>,
}

#[derive(Debug, Clone)]
pub struct Overlay {
    /// The read-only lower directories, TOPMOST FIRST (overlayfs' order in `lowerdir=`):
    /// `--rootfs` alone, or an image's layers from the last one down to its base.
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Mounted inside a user namespace.
    pub userxattr: bool,
    /// A directory to mount a tmpfs on first, holding `upper` and `work` (made in it):
    /// the writable layer in memory, gone with the container's mount namespace.
    pub memory: Option<PathBuf>,
}

/// The most `mount(2)` takes as its data: one page, NUL included. An overlay whose
/// options do not fit is mounted through the new mount API instead.
const MOUNT_DATA_MAX: usize = 4095;

impl Overlay {
    /// The `mount(2)` data of this overlay, or `None` when it cannot be given that way:
    /// longer than a page (many layers), or with a path holding `,`, `:` or `\`, which
    /// `lowerdir=` would need escaped.
    pub fn mount_data(&self) -> Option<String> {
        let paths = self.lower.iter().chain([&self.upper, &self.work]);
        let plain = paths
            .map(|p| p.as_os_str().as_encoded_bytes())
            .all(|p| !p.iter().any(|b| matches!(b, b',' | b':' | b'\\')));
        let lower = self
            .lower
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        // In a user namespace overlayfs may not use trusted.* xattrs: user.* then.
        let data = format!(
            "lowerdir={lower},upperdir={},workdir={}{}",
            self.upper.display(),
            self.work.display(),
            if self.userxattr { ",userxattr" } else { "" }
        );
        (plain && data.len() <= MOUNT_DATA_MAX).then_some(data)
    }

    /// The overlay's parameters for the new mount API, in order: one `lowerdir+` per
    /// lower directory (topmost first, no escaping, no length limit; Linux 6.8+), the
    /// upper and work directories, and the `userxattr` flag (`None` value).
    pub fn fs_params(&self) -> Vec<(&'static str, Option<&Path>)> {
        let mut params: Vec<(&'static str, Option<&Path>)> = self
            .lower
            .iter()
            .map(|l| ("lowerdir+", Some(l.as_path())))
            .collect();
        params.push(("upperdir", Some(&self.upper)));
        params.push(("workdir", Some(&self.work)));
        if self.userxattr {
            params.push(("userxattr", None));
        }
        params
    }
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
    /// A filesystem mounted through the new mount API: `fsopen(fstype)`, one `fsconfig`
    /// per parameter (a string, or a flag when the value is `None`), `FSCONFIG_CMD_CREATE`,
    /// `fsmount` and `move_mount` onto `target`.
    fn mount_fs_context(
        &self,
        fstype: &str,
        params: &[(&str, Option<&Path>)],
        target: &Path,
    ) -> std::io::Result<()>;
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

    fn mount_fs_context(
        &self,
        fstype: &str,
        params: &[(&str, Option<&Path>)],
        target: &Path,
    ) -> std::io::Result<()> {
        fs_context_mount(fstype, params, target)
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

fn cstring(s: impl AsRef<std::ffi::OsStr>) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(s.as_ref().as_encoded_bytes()).map_err(std::io::Error::other)
}

/// Checks a raw system call's return value, giving back the value (a descriptor).
fn syscall_ret(r: libc::c_long, what: &str) -> std::io::Result<libc::c_long> {
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r)
}

/// The new mount API (no wrappers in nix or glibc 2.36): see [`Syscall::mount_fs_context`].
fn fs_context_mount(
    fstype: &str,
    params: &[(&str, Option<&Path>)],
    target: &Path,
) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    const FSCONFIG_SET_FLAG: libc::c_uint = 0;
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    let fstype_c = cstring(fstype)?;
    // SAFETY: a valid C string; the returned descriptor is owned at once.
    let fs = syscall_ret(
        unsafe { libc::syscall(libc::SYS_fsopen, fstype_c.as_ptr(), FSOPEN_CLOEXEC) },
        "fsopen",
    )?;
    // SAFETY: fsopen returned a new descriptor that nothing else owns.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as i32) };
    for (key, value) in params {
        let key_c = cstring(key)?;
        let r = match value {
            // SAFETY: a valid C string key, no value, on the open fs context.
            None => unsafe {
                libc::syscall(
                    libc::SYS_fsconfig,
                    fs.as_raw_fd(),
                    FSCONFIG_SET_FLAG,
                    key_c.as_ptr(),
                    std::ptr::null::<libc::c_char>(),
                    0,
                )
            },
            Some(v) => {
                let v_c = cstring(v)?;
                // SAFETY: valid C strings for the key and value, on the open fs context.
                unsafe {
                    libc::syscall(
                        libc::SYS_fsconfig,
                        fs.as_raw_fd(),
                        FSCONFIG_SET_STRING,
                        key_c.as_ptr(),
                        v_c.as_ptr(),
                        0,
                    )
                }
            }
        };
        let what = match value {
            None => format!("{fstype} option {key}"),
            Some(v) => format!("{fstype} option {key}={}", v.display()),
        };
        syscall_ret(r, &what)?;
    }
    // SAFETY: the command takes no key or value.
    syscall_ret(
        unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_CMD_CREATE,
                std::ptr::null::<libc::c_char>(),
                std::ptr::null::<libc::c_char>(),
                0,
            )
        },
        &format!("creating the {fstype} filesystem"),
    )?;
    // SAFETY: fsmount on the created context; the descriptor is owned at once.
    let mnt = syscall_ret(
        unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, 0) },
        "fsmount",
    )?;
    // SAFETY: fsmount returned a new descriptor that nothing else owns.
    let mnt = unsafe { OwnedFd::from_raw_fd(mnt as i32) };
    let target_c = cstring(target)?;
    // SAFETY: the detached mount's descriptor, an empty path with F_EMPTY_PATH, a valid
    // target C string.
    syscall_ret(
        unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                mnt.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                target_c.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        },
        "move_mount",
    )?;
    Ok(())
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
            if let Some(memory) = &o.memory {
                mount_fs(
                    sys,
                    "tmpfs",
                    memory,
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some("mode=755"),
                )?;
                sys.mkdir_all(&o.upper);
                sys.mkdir_all(&o.work);
            }
            match o.mount_data() {
                Some(data) => mount_fs(sys, "overlay", root, MsFlags::empty(), Some(&data))?,
                None => sys
                    .mount_fs_context("overlay", &o.fs_params(), root)
                    .map_err(|source| RootfsError {
                        op: "mounting the overlay on",
                        path: root.clone(),
                        source,
                    })?,
            }
            for d in ["proc", "sys", "dev"] {
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
    // The read-only host root gets private writable scratch directories. An overlay is
    // writable itself: there the image's own /tmp, /run and /var/tmp are written in the
    // container's upper layer, as with any image runtime (and a mount point the image
    // lacks would be one more directory made in that layer).
    let scratch: &[(&str, &str)] = match plan.overlay {
        None => &[("tmp", "1777"), ("run", "755"), ("var/tmp", "1777")],
        Some(_) => &[],
    };
    for (d, mode) in scratch {
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
    fn mount_fs_context(
        &self,
        fstype: &str,
        params: &[(&str, Option<&Path>)],
        target: &Path,
    ) -> std::io::Result<()> {
        let params: Vec<String> = params
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={}", v.display()),
                None => (*k).to_owned(),
            })
            .collect();
        self.calls.borrow_mut().push(format!(
            "fsmount {fstype} {} {}",
            target.display(),
            params.join(" ")
        ));
        if self.fail_mount.is_some_and(|f| target.ends_with(f)) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
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
            lower: vec!["/img".into()],
            upper: "/s/upper".into(),
            work: "/s/work".into(),
            userxattr: true,
            memory: None,
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
        assert!(
            !calls
                .iter()
                .any(|c| c.contains("/r/tmp") || c.contains("/r/var/tmp")),
            "no scratch tmpfs over the writable overlay: {calls:?}"
        );
    }

    fn layers(n: usize, len: usize) -> Overlay {
        Overlay {
            // Topmost first: layer n-1 down to the base, layer 0.
            lower: (0..n)
                .rev()
                .map(|i| PathBuf::from(format!("/l/{i:0>len$}")))
                .collect(),
            upper: "/s/upper".into(),
            work: "/s/work".into(),
            userxattr: false,
            memory: None,
        }
    }

    #[test]
    fn a_memory_layer_is_a_tmpfs_mounted_before_the_overlay() {
        let rec = Recorder::default();
        let o = Overlay {
            memory: Some("/s/layer".into()),
            upper: "/s/layer/upper".into(),
            work: "/s/layer/work".into(),
            ..layers(1, 1)
        };
        setup(&rec, &plan(Some(o))).unwrap();
        let calls = rec.calls.borrow();
        assert_eq!(
            calls[1..5],
            [
                "mount tmpfs /s/layer tmpfs MS_NOSUID|MS_NODEV mode=755",
                "mkdir /s/layer/upper",
                "mkdir /s/layer/work",
                "mount overlay /r overlay 0 lowerdir=/l/0,upperdir=/s/layer/upper,workdir=/s/layer/work",
            ],
            "{calls:?}"
        );
    }

    #[test]
    fn image_layers_are_lower_dirs_topmost_first() {
        let rec = Recorder::default();
        setup(&rec, &plan(Some(layers(3, 1)))).unwrap();
        let calls = rec.calls.borrow();
        assert_eq!(
            calls[1],
            "mount overlay /r overlay 0 lowerdir=/l/2:/l/1:/l/0,upperdir=/s/upper,workdir=/s/work"
        );
    }

    #[test]
    fn many_layers_go_through_the_new_mount_api() {
        // 40 layers of paths as long as a store's (sha256 digests): far over a page.
        let o = layers(40, 100);
        assert!(o.mount_data().is_none());
        let rec = Recorder::default();
        setup(&rec, &plan(Some(o))).unwrap();
        let calls = rec.calls.borrow();
        let fsmount = &calls[1];
        assert!(
            fsmount.starts_with(&format!("fsmount overlay /r lowerdir+=/l/{:0>100} ", 39)),
            "{fsmount}"
        );
        let lowers: Vec<&str> = fsmount
            .split(' ')
            .filter_map(|p| p.strip_prefix("lowerdir+=/l/"))
            .collect();
        assert_eq!(lowers.len(), 40, "one lowerdir+ per layer");
        assert_eq!(
            lowers.last().unwrap().trim_start_matches('0'),
            "",
            "base last"
        );
        assert!(
            fsmount.ends_with(" upperdir=/s/upper workdir=/s/work"),
            "{fsmount}"
        );
        assert!(
            calls
                .iter()
                .filter(|c| c.starts_with("mount overlay"))
                .count()
                == 0
        );
        assert_eq!(calls.last().unwrap(), "pivot /r");

        // Just under a page: still mount(2); userxattr as a flag of the new API.
        let mut o = layers(1, 4000);
        assert!(o.mount_data().unwrap().len() <= MOUNT_DATA_MAX);
        o.userxattr = true;
        o.lower.push("/a,b".into());
        assert!(o.mount_data().is_none(), "a comma would need escaping");
        assert_eq!(o.fs_params().last(), Some(&("userxattr", None)));
    }

    #[test]
    fn a_failed_overlay_is_named() {
        let rec = Recorder {
            fail_mount: Some("r"),
            ..Recorder::default()
        };
        let e = setup(&rec, &plan(Some(layers(60, 100)))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mounting the overlay on /r: Invalid argument (os error 22)"
        );
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
