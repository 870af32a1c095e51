//! Cgroups for containers, v1 and v2 behind one [`CgroupManager`] trait, chosen at run time
//! by what is mounted on `/sys/fs/cgroup` ([`detect`]).
//!
//! Both managers do their file work through [`CgroupFs`], so paths and values are
//! unit-tested with [`FakeFs`] without root or cgroups.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::limits::Limits;

pub mod v1;
pub mod v2;

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The directory every container's cgroup is made under, in each hierarchy.
pub const PARENT: &str = "hypha";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file or directory operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A controller the limits need is not mounted.
    #[error("the cgroup v1 {controller} controller is not mounted at {path}")]
    NoController {
        controller: &'static str,
        path: PathBuf,
    },
}

/// File operations on cgroup filesystems.
pub trait CgroupFs {
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()>;
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()>;
    fn read(&self, path: &Path) -> std::io::Result<String>;
    fn exists(&self, path: &Path) -> bool;
    fn remove_dir(&self, path: &Path) -> std::io::Result<()>;
}

/// The real filesystem.
pub struct RealFs;

impl CgroupFs for RealFs {
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
        std::fs::write(path, value)
    }
    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn remove_dir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_dir(path)
    }
}

/// One container's cgroup.
pub trait CgroupManager {
    /// Makes the cgroup and writes the limits. On error, whatever was made is removed.
    fn create(&self, limits: &Limits) -> Result<(), CgroupError>;
    /// Moves a process (and so its future children) into the cgroup.
    fn add_process(&self, pid: i32) -> Result<(), CgroupError>;
    /// The processes in the cgroup.
    fn processes(&self) -> Result<Vec<i32>, CgroupError>;
    /// Removes the cgroup (it must be empty); a cgroup already gone is not an error.
    fn remove(&self) -> Result<(), CgroupError>;
}

/// Which cgroup layout a container's cgroup lives in; kept in its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

/// The layout of this host: v2 when `/sys/fs/cgroup` itself is cgroup2 (the unified
/// hierarchy), v1 otherwise (legacy, or hybrid with an empty cgroup2 beside the v1
/// controllers).
pub fn detect() -> Version {
    match nix::sys::statfs::statfs(CGROUP_ROOT) {
        Ok(s) if s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => Version::V2,
        _ => Version::V1,
    }
}

/// The manager for container `id` in the given layout, on the real filesystem.
pub fn manager(version: Version, id: &str) -> Box<dyn CgroupManager> {
    match version {
        Version::V1 => Box::new(v1::V1Manager::new(RealFs, Path::new(CGROUP_ROOT), id)),
        Version::V2 => Box::new(v2::V2Manager::new(RealFs, Path::new(CGROUP_ROOT), id)),
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn parse_procs(text: &str) -> Vec<i32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Removes a cgroup directory, retrying briefly while the kernel still counts exiting
/// processes in it (EBUSY).
fn remove_dir_retrying(fs: &dyn CgroupFs, path: &Path) -> Result<(), CgroupError> {
    for attempt in 0.. {
        match fs.remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 200 => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(io("removing cgroup", path)(e)),
        }
    }
    unreachable!("the loop returns")
}

/// An in-memory cgroup filesystem for unit tests: directories and file contents.
#[cfg(test)]
#[derive(Default)]
pub struct FakeFs {
    pub dirs: std::cell::RefCell<std::collections::BTreeSet<PathBuf>>,
    pub files: std::cell::RefCell<std::collections::BTreeMap<PathBuf, String>>,
    /// Writes to a path ending like this fail with EINVAL.
    pub fail_write: Option<&'static str>,
}

#[cfg(test)]
impl CgroupFs for FakeFs {
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        let mut dirs = self.dirs.borrow_mut();
        for a in path.ancestors() {
            dirs.insert(a.to_owned());
        }
        Ok(())
    }
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
        if self.fail_write.is_some_and(|f| path.ends_with(f)) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        if !self.dirs.borrow().contains(path.parent().unwrap()) {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        self.files
            .borrow_mut()
            .insert(path.to_owned(), value.to_owned());
        Ok(())
    }
    fn read(&self, path: &Path) -> std::io::Result<String> {
        self.files
            .borrow()
            .get(path)
            .cloned()
            .ok_or_else(|| std::io::ErrorKind::NotFound.into())
    }
    fn exists(&self, path: &Path) -> bool {
        self.dirs.borrow().contains(path) || self.files.borrow().contains_key(path)
    }
    fn remove_dir(&self, path: &Path) -> std::io::Result<()> {
        if !self.dirs.borrow_mut().remove(path) {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        self.files.borrow_mut().retain(|p, _| !p.starts_with(path));
        Ok(())
    }
}
