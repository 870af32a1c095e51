//! Ending the processes that live in a network namespace, before the namespace goes.
//!
//! `ip netns del` only removes the namespace's bind mount: a process still inside keeps
//! the namespace alive, and keeps running with no way to reach it by name (an `iperf3`
//! left behind by an interrupted demo, a `sleep` of a test). Whoever deletes a namespace
//! it made (the demo, the benchmarks, the tests' helpers) calls [`end_processes_in`]
//! first. It lives here, beside the other namespace code, because both the tests crate and
//! xtask already depend on (or can cheaply depend on) this crate and nothing smaller.

use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What can go wrong ending a namespace's processes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcsError {
    /// The namespace file (`/run/netns/NAME`) could not be examined.
    #[error("cannot stat network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `/proc` could not be listed.
    #[error("cannot list /proc while looking for processes in {path}: {source}")]
    ListProc {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A signal could not be sent (other than to a process that had already gone).
    #[error("cannot send signal {signal} to pid {pid} (in network namespace {path}): {source}")]
    Signal {
        pid: i32,
        signal: i32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Processes still ran in the namespace after SIGKILL and the wait that follows it.
    #[error("processes {pids:?} still run in network namespace {path} after SIGKILL")]
    Survivors { pids: Vec<i32>, path: PathBuf },
}

/// The (device, inode) pair that identifies a network namespace.
fn identity(path: &Path) -> io::Result<(u64, u64)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Pids of the processes (other than the caller's) whose network namespace is `ns`.
/// Zombies have no namespace links any more and are not listed.
fn pids_in(ns: (u64, u64), path: &Path) -> Result<Vec<i32>, ProcsError> {
    let me = std::process::id() as i32;
    let entries = std::fs::read_dir("/proc").map_err(|source| ProcsError::ListProc {
        path: path.to_owned(),
        source,
    })?;
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // A process that exits meanwhile has no links any more: not ours to end.
        if identity(&entry.path().join("ns/net")).is_ok_and(|id| id == ns) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

fn signal(pids: &[i32], sig: i32, path: &Path) -> Result<(), ProcsError> {
    for &pid in pids {
        // SAFETY: kill(2) has no memory-safety preconditions.
        if unsafe { libc::kill(pid, sig) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(ProcsError::Signal {
                    pid,
                    signal: sig,
                    path: path.to_owned(),
                    source: err,
                });
            }
        }
    }
    Ok(())
}

/// Waits up to `limit` for no process to be left in `ns`; returns those left.
fn wait_gone(ns: (u64, u64), path: &Path, limit: Duration) -> Result<Vec<i32>, ProcsError> {
    let deadline = Instant::now() + limit;
    loop {
        let left = pids_in(ns, path)?;
        if left.is_empty() || Instant::now() >= deadline {
            return Ok(left);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ends every process in the network namespace at `netns` (a bind mount such as
/// `/run/netns/NAME`, or `/proc/PID/ns/net`): SIGTERM, up to `grace` for them to exit,
/// then SIGKILL to those left and up to a second more. Processes are found by comparing
/// each `/proc/PID/ns/net` with the namespace (what `ip netns pids` does); the caller's
/// own process is never signalled. Returns the pids that were signalled; a namespace that
/// no longer exists has none.
pub fn end_processes_in(netns: &Path, grace: Duration) -> Result<Vec<i32>, ProcsError> {
    let ns = match identity(netns) {
        Ok(ns) => ns,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ProcsError::Netns {
                path: netns.to_owned(),
                source,
            });
        }
    };
    let found = pids_in(ns, netns)?;
    if found.is_empty() {
        return Ok(found);
    }
    signal(&found, libc::SIGTERM, netns)?;
    let left = wait_gone(ns, netns, grace)?;
    if !left.is_empty() {
        signal(&left, libc::SIGKILL, netns)?;
        let survivors = wait_gone(ns, netns, Duration::from_secs(1))?;
        if !survivors.is_empty() {
            return Err(ProcsError::Survivors {
                pids: survivors,
                path: netns.to_owned(),
            });
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_that_is_gone_has_no_processes() {
        let path = PathBuf::from(format!("/run/netns/hypha-absent-{}", std::process::id()));
        assert_eq!(
            end_processes_in(&path, Duration::ZERO).expect("absent is not an error"),
            Vec::<i32>::new()
        );
    }

    #[test]
    fn the_callers_own_process_is_never_listed() {
        // This process is in the namespace of /proc/self/ns/net by definition.
        let ns = identity(Path::new("/proc/self/ns/net")).expect("stat our own namespace");
        let pids = pids_in(ns, Path::new("/proc/self/ns/net")).expect("list /proc");
        assert!(!pids.contains(&(std::process::id() as i32)), "{pids:?}");
    }
}
