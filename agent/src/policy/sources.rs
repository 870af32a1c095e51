//! What the agent applies, parsed before it takes its lock: the files posted to the API
//! and the files of the watched directory. Pure, and bounded in time and memory by
//! [`super::limits`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hypha_api::PolicySource;

use super::{Policy, PolicyError, parse_file};

/// A change to one file of the watched directory, read and parsed before the agent's lock
/// is taken.
#[derive(Clone, Debug)]
pub enum DirChange {
    /// The file's policies, or why it cannot be read or parsed (the message names it).
    File {
        path: PathBuf,
        parsed: Result<Vec<Policy>, String>,
    },
    /// The file is gone: its policies go too.
    Removed(PathBuf),
}

/// The policies of files posted to the API, parsed and checked for duplicates; see
/// [`parse_policy_sources`].
pub struct ParsedSources {
    pub files: Vec<(String, Vec<Policy>)>,
}

/// Parses the files of `POST /v1/policies`: pure, bounded in time and memory
/// ([`crate::policy::limits`]), and meant to run before the agent's lock is taken.
pub fn parse_policy_sources(files: &[PolicySource]) -> Result<ParsedSources, PolicyError> {
    let mut out = Vec::new();
    let mut seen: BTreeMap<(String, String), &str> = BTreeMap::new();
    for f in files {
        let policies = parse_file(&f.source, &f.content)?;
        for p in &policies {
            let k = key(p);
            if let Some(first) = seen.insert(k.clone(), &f.source) {
                return Err(PolicyError::Duplicate {
                    namespace: k.0,
                    name: k.1,
                    first: first.to_owned(),
                    second: f.source.clone(),
                });
            }
        }
        out.push((f.source.clone(), policies));
    }
    Ok(ParsedSources { files: out })
}

/// Parses one file of the watched directory (read as `content`); the error names it.
pub fn parse_dir_file(path: &Path, content: Result<String, String>) -> DirChange {
    let parsed = content
        .and_then(|c| parse_file(&path.display().to_string(), &c).map_err(|e| e.to_string()));
    DirChange::File {
        path: path.to_owned(),
        parsed,
    }
}

fn key(p: &Policy) -> (String, String) {
    (p.namespace.clone(), p.name.clone())
}
