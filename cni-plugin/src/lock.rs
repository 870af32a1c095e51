//! The per-attachment lock: ADD, CHECK and DEL of one (container id, ifname) run one at
//! a time, whoever started them (a runtime retrying an ADD after its own timeout, two
//! runtimes). The spec says runtimes never do that; the plugin holds up when they do.
//!
//! The lock is an `flock` on `<socket>.locks/<16 hex digits of sha256(id/ifname)>.lock`
//! beside the agent's socket (as `<socket>.deferred/` is), so the kernel releases it when
//! the holder exits however it exits, SIGKILL included. Waiting for it is bounded by
//! `agentTimeout`; then the operation fails with "try again later" naming the file.
//!
//! DEL removes the file it held; any other file stays (a few bytes of inode per
//! attachment, gone with the next DEL of that attachment or a reboot, `/run` being a
//! tmpfs). Removal is safe against a concurrent waiter: whoever gets the lock checks that
//! the path still names the file it locked, and opens the path again if not.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::naming;

/// The longest sleep between two tries of a held lock.
const MAX_POLL: Duration = Duration::from_millis(20);

/// Where the lock files of the agent at `socket` go: `<socket>.locks`.
pub fn locks_dir(socket: &Path) -> PathBuf {
    let mut name = socket.file_name().unwrap_or_default().to_os_string();
    name.push(".locks");
    socket.with_file_name(name)
}

/// The lock file of (`container_id`, `ifname`) for the agent at `socket`.
pub fn lock_path(socket: &Path, container_id: &str, ifname: &str) -> PathBuf {
    locks_dir(socket).join(format!(
        "{}.lock",
        naming::attachment_digest(container_id, ifname)
    ))
}

/// A held attachment lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub(crate) struct AttachmentLock {
    /// Holds the flock: closing the descriptor releases it.
    _file: File,
    path: PathBuf,
    /// When it was taken, in nanoseconds of `CLOCK_BOOTTIME` ([`hypha_api::boottime_ns`]):
    /// sent to the agent with every request made under it.
    taken_at: u64,
}

impl AttachmentLock {
    /// Takes the lock of (`container_id`, `ifname`), waiting up to `wait` for another
    /// invocation to release it. `None` when the socket's directory does not exist: no
    /// agent ever ran there, so nothing this invocation does can reach one and there is
    /// nothing to protect (and no directory is made for an agent that is not there).
    pub(crate) fn acquire(
        socket: &Path,
        container_id: &str,
        ifname: &str,
        wait: Duration,
    ) -> Result<Option<Self>, Error> {
        let dir = locks_dir(socket);
        if !dir.parent().is_some_and(Path::is_dir) {
            return Ok(None);
        }
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(Error::Lock {
                    op: "create the lock directory",
                    path: dir,
                    source: e,
                });
            }
            _ => {}
        }
        let path = lock_path(socket, container_id, ifname);
        let deadline = Instant::now() + wait;
        let mut poll = Duration::from_millis(1);
        loop {
            // std opens with O_CLOEXEC: the delegated IPAM plugin never inherits the lock.
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(|source| Error::Lock {
                    op: "open",
                    path: path.clone(),
                    source,
                })?;
            loop {
                // SAFETY: flock on a descriptor this function owns; no memory is passed.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EWOULDBLOCK) => {
                        let now = Instant::now();
                        if now >= deadline {
                            return Err(Error::Busy {
                                container_id: container_id.to_owned(),
                                ifname: ifname.to_owned(),
                                path,
                                waited: wait,
                            });
                        }
                        std::thread::sleep(poll.min(deadline - now));
                        poll = (poll * 2).min(MAX_POLL);
                    }
                    _ => {
                        return Err(Error::Lock {
                            op: "lock",
                            path,
                            source: e,
                        });
                    }
                }
            }
            // A DEL that held it may have removed the file while this one waited on it:
            // then the lock is on a file nobody else will open, and the path is tried again.
            let held = file.metadata().map_err(|source| Error::Lock {
                op: "stat",
                path: path.clone(),
                source,
            })?;
            match fs::metadata(&path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(Some(Self {
                        _file: file,
                        path,
                        taken_at: hypha_api::boottime_ns(),
                    }));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Lock {
                        op: "stat",
                        path,
                        source,
                    });
                }
            }
        }
    }

    /// When it was taken, in nanoseconds of `CLOCK_BOOTTIME`.
    pub(crate) fn taken_at(&self) -> u64 {
        self.taken_at
    }

    /// Removes the lock file, then releases the lock (DEL: the attachment is gone).
    pub(crate) fn remove(self) -> Result<(), Error> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Lock {
                op: "remove",
                path: self.path.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("agent.sock")
    }

    #[test]
    fn a_held_lock_makes_the_second_taker_wait_and_then_give_up_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_in(&dir);
        let first = AttachmentLock::acquire(&socket, "c1", "eth0", Duration::ZERO)
            .unwrap()
            .expect("the socket's directory exists");
        let mode = fs::metadata(locks_dir(&socket))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let start = Instant::now();
        let e =
            AttachmentLock::acquire(&socket, "c1", "eth0", Duration::from_millis(200)).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(200));
        let path = lock_path(&socket, "c1", "eth0");
        assert!(
            matches!(&e, Error::Busy { path: p, .. } if *p == path),
            "{e:?}"
        );
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        // Another attachment is not held up.
        AttachmentLock::acquire(&socket, "c1", "eth1", Duration::ZERO)
            .unwrap()
            .unwrap();
        drop(first);
        AttachmentLock::acquire(&socket, "c1", "eth0", Duration::ZERO)
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_waiter_gets_the_lock_when_the_holder_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_in(&dir);
        let first = AttachmentLock::acquire(&socket, "c", "eth0", Duration::ZERO)
            .unwrap()
            .unwrap();
        let waiter = std::thread::spawn({
            let socket = socket.clone();
            move || {
                let lock = AttachmentLock::acquire(&socket, "c", "eth0", Duration::from_secs(5));
                (
                    lock.map(|l| l.is_some()).map_err(|e| e.to_string()),
                    Instant::now(),
                )
            }
        });
        std::thread::sleep(Duration::from_millis(150));
        // Released by removal (DEL): the waiter locked the removed file, sees it, and
        // takes a lock on the path anew.
        let released = Instant::now();
        first.remove().unwrap();
        let (got, acquired) = waiter.join().unwrap();
        assert_eq!(got, Ok(true));
        assert!(acquired >= released, "the waiter got a held lock");
        assert!(lock_path(&socket, "c", "eth0").exists());
    }

    #[test]
    fn no_lock_where_no_agent_ever_ran() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("missing/agent.sock");
        assert!(
            AttachmentLock::acquire(&socket, "c", "eth0", Duration::ZERO)
                .unwrap()
                .is_none()
        );
        assert!(!dir.path().join("missing").exists());
    }
}
