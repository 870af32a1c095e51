//! Container state under the run directory: one directory per container name, holding
//! `state.json` (replaced atomically), the network namespace bind mount `netns`, the log
//! and a lock file. A second `hypha` process sees the same containers through it.
//!
//! The directory is made with one `mkdir`, so two launchers cannot both take a name.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::cgroup;
use crate::cni::Network;
use crate::limits::Limits;
use crate::process::User;
use crate::security::Security;

/// The default run directory.
pub const DEFAULT_RUN_DIR: &str = "/run/hypha/containers";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The name is taken by another container (running or not yet removed).
    #[error("container name {0:?} is already in use (remove it with `hypha rm`)")]
    NameInUse(String),
    /// No container has this name.
    #[error("no container named {0:?}")]
    NotFound(String),
    /// The name cannot be a directory name and a hostname.
    #[error(
        "invalid container name {0:?}: use 1 to 63 letters, digits and '-', not starting with '-'"
    )]
    InvalidName(String),
    /// A file of the state directory could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// `state.json` is not valid.
    #[error("invalid container state {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being set up; a launcher killed now leaves this for `hypha rm` to clean.
    Creating,
    Running,
    /// Exited and released (network, cgroup); only the state entry remains.
    Exited,
}

/// A process identified beyond its pid: the start time (in clock ticks since boot, from
/// `/proc/PID/stat`) tells a reused pid apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    pub start_time: u64,
}

impl ProcessId {
    pub fn of(pid: i32) -> Option<Self> {
        start_time(pid).map(|start_time| Self { pid, start_time })
    }

    /// Whether this very process still exists (a zombie counts as gone).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }
}

/// Field 22 of `/proc/PID/stat`, or `None` when the process is gone or a zombie.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The cgroup a container was placed in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CgroupState {
    pub version: cgroup::Version,
    pub limits: Limits,
}

/// Everything known about one container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub command: Vec<String>,
    pub status: Status,
    /// The container's init, as seen from the host.
    pub init: Option<ProcessId>,
    /// The launcher process that waits for the container and releases it.
    pub monitor: Option<ProcessId>,
    pub exit_code: Option<i32>,
    pub detached: bool,
    /// Unix seconds.
    pub created: u64,
    pub cgroup: Option<CgroupState>,
    pub network: Option<Network>,
    pub security: Security,
    pub userns: bool,
    pub rootfs: Option<PathBuf>,
    /// `--image`: the image the root is made of, held in its store until `hypha rm`.
    #[serde(default)]
    pub image: Option<ImageState>,
    /// The command's environment (`hypha exec` runs with it too); empty in the state of
    /// an older launcher, which used the defaults.
    #[serde(default)]
    pub env: Vec<String>,
    /// The command's working directory; `None` is `/`.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// The user the command runs as; `None` is root.
    #[serde(default)]
    pub user: Option<User>,
}

/// The image a container runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageState {
    /// The image's id in its store.
    pub id: String,
    /// `NAME:TAG`.
    pub reference: String,
    /// The store's directory.
    pub store: PathBuf,
    /// The unpacked layer directories, topmost first (the overlay's lower directories).
    pub layers: Vec<PathBuf>,
}

impl State {
    /// The status as it really is: a container whose init died without its launcher
    /// recording it (a killed launcher) shows as `dead` until `hypha rm`.
    pub fn live_status(&self) -> &'static str {
        match self.status {
            Status::Exited => "exited",
            Status::Running if self.init.is_some_and(|p| p.alive()) => "running",
            Status::Creating if self.monitor.is_some_and(|p| p.alive()) => "creating",
            _ => "dead",
        }
    }

    /// The container's cgroup directory name: its name (for people and tests) and id.
    pub fn cgroup_name(&self) -> String {
        format!("{}-{}", self.name, &self.id[..self.id.len().min(12)])
    }

    pub fn ips(&self) -> Vec<String> {
        self.network.as_ref().map(Network::ips).unwrap_or_default()
    }
}

/// A container name: 1 to 63 of `[A-Za-z0-9-]`, not starting with `-` (a hostname label).
pub fn check_name(name: &str) -> Result<(), StateError> {
    let ok = (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StateError::InvalidName(name.to_owned()))
    }
}

/// The run directory.
#[derive(Debug, Clone)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn dir(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Takes `name`: makes its directory, failing with [`StateError::NameInUse`] if taken.
    pub fn reserve(&self, name: &str) -> Result<PathBuf, StateError> {
        check_name(name)?;
        std::fs::create_dir_all(&self.0).map_err(io("creating", &self.0))?;
        let dir = self.dir(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StateError::NameInUse(name.to_owned()))
            }
            Err(e) => Err(io("creating", &dir)(e)),
        }
    }

    pub fn load(&self, name: &str) -> Result<State, StateError> {
        check_name(name).map_err(|_| StateError::NotFound(name.to_owned()))?;
        let path = self.dir(name).join("state.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(name.to_owned()));
            }
            Err(e) => return Err(io("reading", &path)(e)),
        };
        serde_json::from_str(&text).map_err(|source| StateError::Parse { path, source })
    }

    /// Writes the state atomically (a temporary file renamed over the old one).
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let dir = self.dir(&state.name);
        let tmp = dir.join("state.json.tmp");
        let path = dir.join("state.json");
        let text = serde_json::to_vec_pretty(state).expect("state serializes");
        let mut f = File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(&text).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("replacing", &path))
    }

    /// Every container with a readable state, by name. Directories without a state yet
    /// (a launcher between `reserve` and its first `save`) are skipped.
    pub fn list(&self) -> Result<Vec<State>, StateError> {
        let entries = match std::fs::read_dir(&self.0) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io("listing", &self.0)(e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names.iter().filter_map(|n| self.load(n).ok()).collect())
    }

    /// An exclusive lock on the container, held while it is set up or released.
    pub fn lock(&self, name: &str) -> Result<Flock<File>, StateError> {
        let path = self.dir(name).join("lock");
        let f = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io("opening", &path))?;
        Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| io("locking", &path)(std::io::Error::from(e)))
    }

    /// Removes the container's directory and everything in it.
    pub fn remove(&self, name: &str) -> Result<(), StateError> {
        let dir = self.dir(name);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &dir)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(name: &str) -> State {
        State {
            id: "0123456789abcdef".into(),
            name: name.into(),
            namespace: "default".into(),
            command: vec!["/bin/true".into()],
            status: Status::Creating,
            init: None,
            monitor: None,
            exit_code: None,
            detached: false,
            created: 1,
            cgroup: None,
            network: None,
            security: Security::new(false, &[], &[]).unwrap(),
            userns: false,
            rootfs: None,
            image: None,
            env: vec![],
            workdir: None,
            user: None,
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "web-1", "A9", &"x".repeat(63)] {
            check_name(ok).unwrap();
        }
        for bad in ["", "-a", "a/b", "..", "a b", "ü", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reserve_save_load_list_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir(tmp.path().join("containers"));
        run.reserve("a").unwrap();
        let e = run.reserve("a").unwrap_err();
        assert!(matches!(e, StateError::NameInUse(_)), "{e}");
        assert!(e.to_string().contains("already in use"));
        assert!(matches!(run.load("a"), Err(StateError::NotFound(_))));
        assert!(run.list().unwrap().is_empty(), "no state yet: skipped");
        let mut s = state("a");
        run.save(&s).unwrap();
        s.status = Status::Running;
        run.save(&s).unwrap();
        assert_eq!(run.load("a").unwrap(), s);
        run.reserve("b").unwrap();
        run.save(&state("b")).unwrap();
        let names: Vec<_> = run.list().unwrap().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["a", "b"]);
        drop(run.lock("a").unwrap());
        run.remove("a").unwrap();
        run.remove("a").unwrap();
        assert!(matches!(run.load("a"), Err(StateError::NotFound(_))));
        assert!(matches!(run.load("../x"), Err(StateError::NotFound(_))));
    }

    #[test]
    fn live_status() {
        let mut s = state("a");
        assert_eq!(s.live_status(), "dead", "creating without a live launcher");
        s.monitor = ProcessId::of(std::process::id() as i32);
        assert_eq!(s.live_status(), "creating");
        s.status = Status::Running;
        s.init = s.monitor;
        assert_eq!(s.live_status(), "running");
        s.init = Some(ProcessId {
            start_time: 1,
            ..s.init.unwrap()
        });
        assert_eq!(s.live_status(), "dead", "a reused pid is not the init");
        s.status = Status::Exited;
        assert_eq!(s.live_status(), "exited");
    }
}
