//! The state directory's lock (`agent.lock`, flock): one agent per state directory.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::StateError;

/// How often the lock is tried while waiting.
const LOCK_POLL: Duration = Duration::from_millis(50);

/// Creates `dir` and locks it against a second agent, waiting up to `wait` for a previous
/// holder to go away.
pub(super) fn lock_dir(dir: &Path, wait: Duration) -> Result<Flock<File>, StateError> {
    fs::create_dir_all(dir).map_err(|source| StateError::Io {
        op: "create the state directory",
        path: dir.to_owned(),
        source,
    })?;
    let lock_path = dir.join("agent.lock");
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|source| StateError::Io {
            op: "open",
            path: lock_path.clone(),
            source,
        })?;
    // The descriptor is close-on-exec (std opens every file with O_CLOEXEC), so the
    // children the agent runs (nft) never hold the lock.
    let deadline = Instant::now() + wait;
    let mut file = lock_file;
    let mut told = false;
    let lock = loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => break lock,
            Err((f, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                if !told {
                    tracing::info!(
                        "the lock of {} is held{}; waiting up to {wait:?} for it",
                        dir.display(),
                        lock_holder(&f)
                    );
                    told = true;
                }
                file = f;
                std::thread::sleep(LOCK_POLL);
            }
            Err((f, Errno::EWOULDBLOCK)) => {
                return Err(StateError::Locked {
                    path: dir.to_owned(),
                    holder: lock_holder(&f),
                    waited: wait,
                });
            }
            Err((_, errno)) => {
                return Err(StateError::Io {
                    op: "lock",
                    path: lock_path,
                    source: errno.into(),
                });
            }
        }
    };
    Ok(lock)
}

/// ` by process PID (NAME)` for the process holding `file`'s flock, from `/proc/locks`;
/// empty when it cannot be told.
fn lock_holder(file: &File) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = file.metadata() else {
        return String::new();
    };
    let id = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(meta.dev()),
        nix::sys::stat::minor(meta.dev()),
        meta.ino()
    );
    let Ok(locks) = fs::read_to_string("/proc/locks") else {
        return String::new();
    };
    // `1: FLOCK  ADVISORY  WRITE 4242 00:2b:1234 0 EOF`; waiters have `->` after the number.
    let pid = locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() >= 6 && fields[1] == "FLOCK" && fields[5] == id).then(|| fields[4])
    });
    match pid {
        Some(pid) => match fs::read_to_string(format!("/proc/{pid}/comm")) {
            Ok(name) => format!(" by process {pid} ({})", name.trim()),
            Err(_) => format!(" by process {pid}"),
        },
        None => String::new(),
    }
}
