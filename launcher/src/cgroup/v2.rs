//! cgroup v2: one unified hierarchy, `<root>/hypha/<id>`, with the controllers enabled in
//! the parents' `cgroup.subtree_control`.

use std::path::{Path, PathBuf};

use super::{CgroupError, CgroupFs, CgroupManager, PARENT, io, parse_procs, remove_dir_retrying};
use crate::limits::{CPU_PERIOD_US, Limits};

pub struct V2Manager<F> {
    fs: F,
    root: PathBuf,
    id: String,
}

impl<F: CgroupFs> V2Manager<F> {
    pub fn new(fs: F, root: &Path, id: &str) -> Self {
        Self {
            fs,
            root: root.to_owned(),
            id: id.to_owned(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.root.join(PARENT).join(&self.id)
    }

    /// The files to write for `limits`, in order: (file, value).
    pub fn writes(limits: &Limits) -> Vec<(&'static str, String)> {
        let mut w = vec![];
        if let Some(m) = limits.memory {
            w.push(("memory.max", m.to_string()));
            w.push(("memory.swap.max", "0".to_owned()));
        }
        if let Some(q) = limits.cpu_quota_us {
            w.push(("cpu.max", format!("{q} {CPU_PERIOD_US}")));
        }
        if let Some(p) = limits.pids {
            w.push(("pids.max", p.to_string()));
        }
        w
    }

    fn try_create(&self, limits: &Limits) -> Result<(), CgroupError> {
        let parent = self.root.join(PARENT);
        self.fs
            .create_dir_all(&self.path())
            .map_err(io("creating cgroup", &self.path()))?;
        for dir in [&self.root, &parent] {
            let p = dir.join("cgroup.subtree_control");
            self.fs
                .write(&p, "+memory +cpu +pids")
                .map_err(io("enabling controllers in", &p))?;
        }
        for (file, value) in Self::writes(limits) {
            let p = self.path().join(file);
            // Without swap there is no memory.swap.max, and nothing to limit.
            if file == "memory.swap.max" && !self.fs.exists(&p) {
                continue;
            }
            self.fs.write(&p, &value).map_err(io("writing", &p))?;
        }
        Ok(())
    }
}

impl<F: CgroupFs> CgroupManager for V2Manager<F> {
    fn create(&self, limits: &Limits) -> Result<(), CgroupError> {
        self.try_create(limits).inspect_err(|_| {
            let _ = self.remove();
        })
    }

    fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        let p = self.path().join("cgroup.procs");
        self.fs
            .write(&p, &pid.to_string())
            .map_err(io("adding a process to", &p))
    }

    fn processes(&self) -> Result<Vec<i32>, CgroupError> {
        let p = self.path().join("cgroup.procs");
        match self.fs.read(&p) {
            Ok(t) => Ok(parse_procs(&t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(io("reading", &p)(e)),
        }
    }

    fn remove(&self) -> Result<(), CgroupError> {
        remove_dir_retrying(&self.fs, &self.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::FakeFs;

    #[test]
    fn paths_and_values() {
        let m = V2Manager::new(FakeFs::default(), Path::new("/cg"), "abc");
        m.create(&Limits {
            memory: Some(1 << 30),
            cpu_quota_us: Some(150_000),
            pids: Some(100),
        })
        .unwrap();
        m.add_process(7).unwrap();
        let files = m.fs.files.borrow().clone();
        let get = |p: &str| files.get(Path::new(p)).map(String::as_str);
        assert_eq!(
            get("/cg/cgroup.subtree_control"),
            Some("+memory +cpu +pids")
        );
        assert_eq!(
            get("/cg/hypha/cgroup.subtree_control"),
            Some("+memory +cpu +pids")
        );
        assert_eq!(get("/cg/hypha/abc/memory.max"), Some("1073741824"));
        assert_eq!(
            get("/cg/hypha/abc/memory.swap.max"),
            None,
            "no swap file, no write"
        );
        assert_eq!(get("/cg/hypha/abc/cpu.max"), Some("150000 100000"));
        assert_eq!(get("/cg/hypha/abc/pids.max"), Some("100"));
        assert_eq!(get("/cg/hypha/abc/cgroup.procs"), Some("7"));
        m.remove().unwrap();
        assert!(!m.fs.exists(&m.path()));
    }

    #[test]
    fn a_failed_write_removes_the_cgroup() {
        let fs = FakeFs {
            fail_write: Some("cpu.max"),
            ..FakeFs::default()
        };
        let m = V2Manager::new(fs, Path::new("/cg"), "abc");
        let limits = Limits {
            cpu_quota_us: Some(1000),
            ..Limits::default()
        };
        assert!(m.create(&limits).is_err());
        assert!(!m.fs.exists(&m.path()));
    }
}
