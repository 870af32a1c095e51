//! The container's PID 1: runs in the new namespaces right after `clone`, waits for the
//! launcher's go-ahead (cgroup, user mapping and network are ready by then), finishes the
//! container (hostname, loopback, filesystem, security), starts the command as its child,
//! then forwards signals to it and reaps every orphan until the command exits.

use std::ffi::CString;
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use nix::unistd::{ForkResult, Pid};
use seccompiler::BpfProgram;

use crate::process::User;
use crate::rootfs::{self, Plan};
use crate::security::Security;
use crate::sys;

/// What the init needs, prepared by the launcher before `clone`.
pub struct InitConfig {
    pub hostname: String,
    pub rootfs: Plan,
    pub security: Security,
    pub filters: Vec<BpfProgram>,
    pub userns: bool,
    pub command: Vec<CString>,
    pub env: Vec<CString>,
    /// The command's working directory (made if missing); `None` is `/`.
    pub workdir: Option<PathBuf>,
    /// The user the command runs as; `None` is root.
    pub user: Option<User>,
}

/// The report the init sends when the command has started.
pub const STARTED: &str = "started";

/// Runs the init; never returns. `go` is the read end of the launcher's go-ahead pipe,
/// `report` the write end the init reports [`STARTED`] or an error on.
pub fn main(cfg: &InitConfig, go: File, report: File) -> ! {
    // SAFETY: prctl with integer arguments. The launcher holds the container: if it dies,
    // so does the container, and `hypha rm` cleans what is left.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if !sys::wait_go(go) {
        sys::exit_now(1);
    }
    match prepare(cfg) {
        Ok(pid) => {
            sys::send(report, STARTED);
            sys::exit_now(sys::forward_until_exit(pid, true))
        }
        Err(msg) => {
            sys::send(report, &msg);
            sys::exit_now(1)
        }
    }
}

fn prepare(cfg: &InitConfig) -> Result<Pid, String> {
    if cfg.userns {
        // Root of the new user namespace (mapped by the launcher before the go-ahead).
        nix::unistd::setresgid(0.into(), 0.into(), 0.into())
            .map_err(|e| format!("becoming root in the user namespace: {e}"))?;
        nix::unistd::setresuid(0.into(), 0.into(), 0.into())
            .map_err(|e| format!("becoming root in the user namespace: {e}"))?;
    }
    nix::unistd::sethostname(&cfg.hostname).map_err(|e| format!("setting the hostname: {e}"))?;
    loopback_up().map_err(|e| format!("bringing up lo: {e}"))?;
    rootfs::setup(&rootfs::Linux, &cfg.rootfs).map_err(|e| e.to_string())?;
    if let Some(wd) = &cfg.workdir {
        // Made in the overlay's upper directory when the image lacks it (docker does so).
        let _ = std::fs::create_dir_all(wd);
        nix::unistd::chdir(wd).map_err(|e| format!("working directory {}: {e}", wd.display()))?;
    }
    // SAFETY: prctl with a valid NUL-terminated name.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"hypha-init".as_ptr(), 0, 0, 0) };
    cfg.security
        .apply(&cfg.filters)
        .map_err(|e| e.to_string())?;
    spawn(cfg)
}

/// Finds the program as the container sees it: a name without `/` on the container's
/// own `PATH` (from its environment, not the launcher's), as a shell would.
pub(crate) fn find_program(cmd: &std::ffi::CStr, env: &[CString]) -> Result<CString, String> {
    let name = cmd.to_string_lossy();
    if name.contains('/') {
        return Ok(cmd.to_owned());
    }
    let path = env
        .iter()
        .find_map(|e| e.to_str().ok()?.strip_prefix("PATH="))
        .unwrap_or(rootfs::DEFAULT_PATH);
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(&*name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file())
                && nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok()
        })
        .and_then(|p| CString::new(p.into_os_string().into_encoded_bytes()).ok())
        .ok_or_else(|| format!("starting {name}: not found in the container's PATH {path}"))
}

/// A switch to a user, made ready before a fork (the forked child allocates nothing):
/// its group and its supplementary groups, then its uid. The capabilities go with root,
/// as for any setuid to a non-root user.
pub(crate) struct UserSwitch {
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
    groups: Vec<nix::unistd::Gid>,
}

impl UserSwitch {
    pub(crate) fn new(user: &User) -> Self {
        Self {
            uid: nix::unistd::Uid::from_raw(user.uid),
            gid: nix::unistd::Gid::from_raw(user.gid),
            groups: std::iter::once(user.gid)
                .chain(user.groups.iter().copied())
                .map(nix::unistd::Gid::from_raw)
                .collect(),
        }
    }

    pub(crate) fn apply(&self) -> Result<(), String> {
        nix::unistd::setgroups(&self.groups)
            .and_then(|()| nix::unistd::setresgid(self.gid, self.gid, self.gid))
            .and_then(|()| nix::unistd::setresuid(self.uid, self.uid, self.uid))
            .map_err(|e| format!("switching to user {}:{}: {e}", self.uid, self.gid))
    }
}

/// Forks the command; reports a failure of its last steps (user switch, `execve`) through
/// a close-on-exec pipe.
fn spawn(cfg: &InitConfig) -> Result<Pid, String> {
    let program = find_program(&cfg.command[0], &cfg.env)?;
    let (mut r, w) = sys::pipe().map_err(|e| format!("pipe: {e}"))?;
    let switch = cfg.user.as_ref().map(UserSwitch::new);
    // SAFETY: this process is single-threaded; the child only execs or exits.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(r);
            sys::reset_signals();
            if let Some(switch) = &switch
                && let Err(msg) = switch.apply()
            {
                sys::send(w, &msg);
                sys::exit_now(127)
            }
            let e = nix::unistd::execve(&program, &cfg.command, &cfg.env)
                .expect_err("execve returns only on error");
            sys::send(
                w,
                &format!("starting {}: {}", program.to_string_lossy(), e.desc()),
            );
            sys::exit_now(127)
        }
        ForkResult::Parent { child } => {
            drop(w);
            let mut msg = String::new();
            let _ = r.read_to_string(&mut msg);
            if !msg.is_empty() {
                let _ = nix::sys::wait::waitpid(child, None);
                return Err(msg);
            }
            Ok(child)
        }
    }
}

/// `ip link set lo up` through the interface ioctls.
fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is ours.
    let sock = unsafe { sys::owned(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS with a valid ifreq on an open socket.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
