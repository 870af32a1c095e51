//! The cgroup v2 hierarchy the socket load balancer's programs attach to: found in
//! `/proc/self/mountinfo` (on a cgroup v1 "hybrid" host such as this project's, v2 is
//! mounted beside the v1 controllers at `/sys/fs/cgroup/unified`), or mounted there when
//! the host has none.

use std::io;
use std::path::{Path, PathBuf};

/// Where a cgroup v2 hierarchy is mounted when the host has none.
pub const DEFAULT_MOUNT: &str = "/sys/fs/cgroup/unified";

const MOUNTINFO: &str = "/proc/self/mountinfo";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The mount table could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No cgroup v2 hierarchy was mounted, and mounting one failed.
    #[error("no cgroup v2 hierarchy is mounted, and mounting one at {path} failed: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The mount point of the cgroup v2 hierarchy, mounting one at [`DEFAULT_MOUNT`] when
/// there is none (and saying so in the log).
pub fn root() -> Result<PathBuf, CgroupError> {
    let text = std::fs::read_to_string(MOUNTINFO).map_err(|source| CgroupError::Read {
        path: MOUNTINFO.into(),
        source,
    })?;
    if let Some(found) = cgroup2_mount(&text) {
        return Ok(found);
    }
    let path = Path::new(DEFAULT_MOUNT);
    let mount_err = |source| CgroupError::Mount {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(mount_err)?;
    nix::mount::mount(
        Some("cgroup2"),
        path,
        Some("cgroup2"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|errno| mount_err(io::Error::from(errno)))?;
    tracing::info!(
        path = DEFAULT_MOUNT,
        "mounted a cgroup v2 hierarchy (none was mounted)"
    );
    Ok(path.to_owned())
}

/// The first cgroup2 mount point in a `/proc/<pid>/mountinfo` text, preferring the
/// shortest (the host's own mount over bind mounts of it inside containers' trees).
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE ...`
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mut fields = left.split_whitespace();
            let root = fields.nth(3)?;
            let mount_point = fields.next()?;
            (fstype == "cgroup2" && root == "/").then(|| unescape(mount_point))
        })
        .min_by_key(|p| p.as_os_str().len())
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This project's machines: cgroup v1 controllers with v2 beside them.
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn the_hybrid_hosts_v2_mount_is_found() {
        assert_eq!(
            cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn a_unified_host_and_optional_fields_and_escapes() {
        let text = "\
25 1 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
90 25 0:22 /kubepods /var/lib/x rw shared:9 - cgroup2 cgroup2 rw
91 1 0:50 / /mnt/with\\040space rw - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mount(text), Some(PathBuf::from("/sys/fs/cgroup")));
        let only_escaped = "91 1 0:50 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(only_escaped),
            Some(PathBuf::from("/mnt/with space"))
        );
    }

    #[test]
    fn v1_only_has_none() {
        let text = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount(text), None);
    }
}
