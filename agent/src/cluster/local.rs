//! `<state_dir>/cluster.json`: who this state directory is in the cluster. The uid
//! (generated once) lets a restarted agent take its node back while its old lease is
//! still alive; the pod CIDRs last registered let an agent whose store is unreachable at
//! start come up with them. One state directory is one node: another `--node-name` over
//! it is refused.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use hypha_cluster::layout::NodeCidrs;
use serde::{Deserialize, Serialize};

/// The file's name in the state directory.
pub const FILE: &str = "cluster.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalCluster {
    /// 128 random bits, hex.
    pub uid: String,
    pub node_name: String,
    /// The pod CIDRs the store last gave this node.
    #[serde(default)]
    pub cidrs: NodeCidrs,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not valid: {source}; it says who this state directory is in the cluster (remove it only with the node: `hypha node remove`)"
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot generate the node's uid from /dev/urandom: {0}")]
    Random(#[source] std::io::Error),
    /// One state directory is one node.
    #[error(
        "the state directory belongs to node {saved} ({path}), not to --node-name {asked}; give this agent its own --state-dir, or its old name"
    )]
    NameMismatch {
        path: PathBuf,
        saved: String,
        asked: String,
    },
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The file, if there is one.
pub fn load(state_dir: &Path) -> Result<Option<LocalCluster>, LocalError> {
    let path = path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LocalError::Read { path, source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| LocalError::Parse { path, source })
}

/// Writes the file atomically (a temporary file, fsync, rename, fsync of the directory).
pub fn save(state_dir: &Path, local: &LocalCluster) -> Result<(), LocalError> {
    let path = path(state_dir);
    let tmp = state_dir.join(format!("{FILE}.tmp"));
    let write = |p: &Path, source| LocalError::Write {
        path: p.to_owned(),
        source,
    };
    let text = serde_json::to_vec_pretty(local).expect("the cluster file serializes");
    let mut f = std::fs::File::create(&tmp).map_err(|e| write(&tmp, e))?;
    f.write_all(&text)
        .and_then(|()| f.sync_all())
        .map_err(|e| write(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| write(&path, e))?;
    std::fs::File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| write(state_dir, e))
}

/// The file of `node_name`: the saved one (refused if it names another node), else a new
/// one with a fresh uid and no CIDRs yet, written at once so that the uid is stable.
pub fn load_or_create(state_dir: &Path, node_name: &str) -> Result<LocalCluster, LocalError> {
    if let Some(local) = load(state_dir)? {
        if local.node_name != node_name {
            return Err(LocalError::NameMismatch {
                path: path(state_dir),
                saved: local.node_name,
                asked: node_name.to_owned(),
            });
        }
        return Ok(local);
    }
    let local = LocalCluster {
        uid: new_uid()?,
        node_name: node_name.to_owned(),
        cidrs: NodeCidrs::default(),
    };
    save(state_dir, &local)?;
    Ok(local)
}

/// 128 random bits from the kernel, as 32 hex digits.
pub fn new_uid() -> Result<String, LocalError> {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(LocalError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_a_stable_uid() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let first = load_or_create(dir.path(), "node-a").unwrap();
        assert_eq!(first.uid.len(), 32);
        assert!(first.uid.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(first.cidrs, NodeCidrs::default());
        let again = load_or_create(dir.path(), "node-a").unwrap();
        assert_eq!(again, first, "the uid is generated once");
        let mut with = first.clone();
        with.cidrs = NodeCidrs {
            v4: Some("10.244.3.0/24".parse().unwrap()),
            v6: Some("fd00:10:244:3::/64".parse().unwrap()),
            ..Default::default()
        };
        save(dir.path(), &with).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(with));
        assert!(!dir.path().join("cluster.json.tmp").exists());
        assert_ne!(new_uid().unwrap(), new_uid().unwrap());
    }

    #[test]
    fn another_name_over_the_state_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path(), "node-a").unwrap();
        let err = load_or_create(dir.path(), "node-b")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("belongs to node node-a") && err.contains("--node-name node-b"),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{\"uid\": 1").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cluster.json is not valid"), "{err}");
    }
}
