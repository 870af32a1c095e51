//! Process plumbing shared by the launcher, the container's init and `hypha exec`: a
//! fork-like `clone` into new namespaces, signal forwarding with reaping, sync pipes.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::{FromRawFd as _, OwnedFd};

use nix::errno::Errno;
use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Signals a waiting process passes on to its child instead of acting on them.
pub const FORWARDED: [Signal; 8] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGCONT,
];

extern "C" fn nothing(_: libc::c_int) {}

/// Blocks the forwarded signals and SIGCHLD (to be taken with [`forward_until_exit`]),
/// after giving them a handler: a PID 1 gets no signal whose disposition is the default.
/// Call before starting the child, so that its exit cannot be missed.
pub fn block_signals() -> Result<(), Errno> {
    let mut set = SigSet::empty();
    for s in FORWARDED.into_iter().chain([Signal::SIGCHLD]) {
        // SAFETY: the handler does nothing, so it is async-signal-safe.
        unsafe { signal::signal(s, SigHandler::Handler(nothing)) }?;
        set.add(s);
    }
    signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
}

/// Undoes [`block_signals`] in a child about to exec its command.
pub fn reset_signals() {
    for s in FORWARDED.into_iter().chain([Signal::SIGCHLD]) {
        // SAFETY: restoring the default disposition.
        let _ = unsafe { signal::signal(s, SigHandler::SigDfl) };
    }
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// The shell convention: the exit code, or 128 + the signal that killed it.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Waits for `child`, passing on every forwarded signal to it. With `reap_all` (the
/// container's PID 1) every other exited process is reaped too. Needs [`block_signals`].
pub fn forward_until_exit(child: Pid, reap_all: bool) -> i32 {
    let mut set = SigSet::empty();
    for s in FORWARDED.into_iter().chain([Signal::SIGCHLD]) {
        set.add(s);
    }
    loop {
        // Reap first: the child may have exited before the first wait.
        loop {
            let target = if reap_all { None } else { Some(child) };
            match waitpid(target, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(status) => {
                    if status.pid() == Some(child)
                        && let Some(code) = exit_code(status)
                    {
                        return code;
                    }
                }
                Err(Errno::EINTR) => {}
                // ECHILD: nothing left to wait for, so the child is gone.
                Err(_) => return 255,
            }
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = signal::kill(child, sig);
            }
        }
    }
}

/// `clone(2)` used like `fork(2)` (same stack, copy-on-write) with namespace flags: the
/// child of a new PID namespace is its PID 1. Returns `None` in the child.
///
/// # Safety
/// As `fork`: the caller must be single-threaded, and the child must only do what is
/// safe after a fork of such a process before it execs or exits.
pub unsafe fn clone_fork(flags: libc::c_int) -> Result<Option<Pid>, Errno> {
    // SAFETY: with a null stack the child runs on a copy of this stack, as after fork.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match ret {
        -1 => Err(Errno::last()),
        0 => Ok(None),
        pid => Ok(Some(Pid::from_raw(pid as i32))),
    }
}

/// A close-on-exec pipe as (read end, write end).
pub fn pipe() -> Result<(File, File), Errno> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((File::from(r), File::from(w)))
}

/// Reads everything until the writer closes.
pub fn read_all(mut f: File) -> String {
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s
}

/// Writes a message and closes.
pub fn send(mut f: File, msg: &str) {
    let _ = f.write_all(msg.as_bytes());
}

/// Reads one byte: `true` when the other side sent the go-ahead, `false` on EOF (it gave
/// up or died).
pub fn wait_go(mut f: File) -> bool {
    let mut b = [0u8; 1];
    matches!(f.read(&mut b), Ok(1))
}

/// Points fds 0, 1 and 2 at `out` (stdout and stderr) and /dev/null (stdin).
pub fn redirect_stdio(out: &File) -> Result<(), Errno> {
    use std::os::fd::AsRawFd as _;
    let null = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: dup2 onto the standard descriptors, which this process owns.
    unsafe {
        if libc::dup2(null.as_raw_fd(), 0) < 0
            || libc::dup2(out.as_raw_fd(), 1) < 0
            || libc::dup2(out.as_raw_fd(), 2) < 0
        {
            return Err(Errno::last());
        }
    }
    Ok(())
}

/// Exits at once, without running destructors or flushing (what a forked child that
/// must not touch its parent's state does).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Duplicates a raw fd into an owned one (for fds inherited across fork).
///
/// # Safety
/// `fd` must be open and owned by the caller.
pub unsafe fn owned(fd: i32) -> OwnedFd {
    // SAFETY: the caller guarantees `fd` is open and theirs.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
