//! cgroup v1: one directory per controller, `<root>/<controller>/hypha/<id>`.

use std::path::{Path, PathBuf};

use super::{CgroupError, CgroupFs, CgroupManager, PARENT, io, parse_procs, remove_dir_retrying};
use crate::limits::{CPU_PERIOD_US, Limits};

/// The controllers every container gets a cgroup in, whatever its limits.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

pub struct V1Manager<F> {
    fs: F,
    root: PathBuf,
    id: String,
}

impl<F: CgroupFs> V1Manager<F> {
    pub fn new(fs: F, root: &Path, id: &str) -> Self {
        Self {
            fs,
            root: root.to_owned(),
            id: id.to_owned(),
        }
    }

    /// The container's directory in one controller's hierarchy.
    pub fn path(&self, controller: &str) -> PathBuf {
        self.root.join(controller).join(PARENT).join(&self.id)
    }

    /// The files to write for `limits`, in order: (controller, file, value).
    pub fn writes(&self, limits: &Limits) -> Vec<(&'static str, &'static str, String)> {
        let mut w = vec![];
        if let Some(m) = limits.memory {
            w.push(("memory", "memory.limit_in_bytes", m.to_string()));
            // With swap accounting, memory plus swap gets the same limit: no swap.
            if self
                .fs
                .exists(&self.path("memory").join("memory.memsw.limit_in_bytes"))
            {
                w.push(("memory", "memory.memsw.limit_in_bytes", m.to_string()));
            }
        }
        if let Some(q) = limits.cpu_quota_us {
            w.push(("cpu", "cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
            w.push(("cpu", "cpu.cfs_quota_us", q.to_string()));
        }
        if let Some(p) = limits.pids {
            w.push(("pids", "pids.max", p.to_string()));
        }
        w
    }

    fn try_create(&self, limits: &Limits) -> Result<(), CgroupError> {
        for c in CONTROLLERS {
            let base = self.root.join(c);
            if !self.fs.exists(&base) {
                return Err(CgroupError::NoController {
                    controller: c,
                    path: base,
                });
            }
            let p = self.path(c);
            self.fs
                .create_dir_all(&p)
                .map_err(io("creating cgroup", &p))?;
        }
        for (c, file, value) in self.writes(limits) {
            let p = self.path(c).join(file);
            self.fs.write(&p, &value).map_err(io("writing", &p))?;
        }
        Ok(())
    }
}

impl<F: CgroupFs> CgroupManager for V1Manager<F> {
    fn create(&self, limits: &Limits) -> Result<(), CgroupError> {
        self.try_create(limits).inspect_err(|_| {
            let _ = self.remove();
        })
    }

    fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for c in CONTROLLERS {
            let p = self.path(c).join("cgroup.procs");
            self.fs
                .write(&p, &pid.to_string())
                .map_err(io("adding a process to", &p))?;
        }
        Ok(())
    }

    fn processes(&self) -> Result<Vec<i32>, CgroupError> {
        let p = self.path("pids").join("cgroup.procs");
        match self.fs.read(&p) {
            Ok(t) => Ok(parse_procs(&t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(io("reading", &p)(e)),
        }
    }

    fn remove(&self) -> Result<(), CgroupError> {
        let mut first = None;
        for c in CONTROLLERS {
            if let Err(e) = remove_dir_retrying(&self.fs, &self.path(c)) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::FakeFs;

    fn fake() -> FakeFs {
        let fs = FakeFs::default();
        for c in ["memory", "cpu", "pids"] {
            fs.create_dir_all(&Path::new("/cg").join(c)).unwrap();
        }
        fs
    }

    #[test]
    fn paths_and_values() {
        let m = V1Manager::new(fake(), Path::new("/cg"), "abc");
        let limits = Limits {
            memory: Some(64 << 20),
            cpu_quota_us: Some(50_000),
            pids: Some(20),
        };
        m.create(&limits).unwrap();
        m.add_process(42).unwrap();
        let files = m.fs.files.borrow().clone();
        let get = |p: &str| files.get(Path::new(p)).map(String::as_str);
        assert_eq!(
            get("/cg/memory/hypha/abc/memory.limit_in_bytes"),
            Some("67108864")
        );
        assert_eq!(get("/cg/cpu/hypha/abc/cpu.cfs_quota_us"), Some("50000"));
        assert_eq!(get("/cg/cpu/hypha/abc/cpu.cfs_period_us"), Some("100000"));
        assert_eq!(get("/cg/pids/hypha/abc/pids.max"), Some("20"));
        for c in CONTROLLERS {
            assert_eq!(get(&format!("/cg/{c}/hypha/abc/cgroup.procs")), Some("42"));
        }
        assert_eq!(m.processes().unwrap(), [42]);
        m.remove().unwrap();
        assert!(!m.fs.exists(Path::new("/cg/memory/hypha/abc")));
        // Removing again is not an error.
        m.remove().unwrap();
    }

    #[test]
    fn no_limits_still_makes_the_cgroups() {
        let m = V1Manager::new(fake(), Path::new("/cg"), "x");
        m.create(&Limits::default()).unwrap();
        assert!(m.fs.exists(Path::new("/cg/pids/hypha/x")));
        assert!(m.fs.files.borrow().is_empty());
    }

    #[test]
    fn a_failed_write_removes_what_was_made() {
        let mut fs = fake();
        fs.fail_write = Some("pids.max");
        let m = V1Manager::new(fs, Path::new("/cg"), "abc");
        let e = m
            .create(&Limits {
                pids: Some(5),
                ..Limits::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("/cg/pids/hypha/abc/pids.max"), "{e}");
        for c in CONTROLLERS {
            assert!(!m.fs.exists(&m.path(c)), "{c} left behind");
        }
    }

    #[test]
    fn a_missing_controller_is_named() {
        let fs = FakeFs::default();
        let m = V1Manager::new(fs, Path::new("/cg"), "abc");
        let e = m.create(&Limits::default()).unwrap_err();
        assert!(e.to_string().contains("memory controller"), "{e}");
    }
}
