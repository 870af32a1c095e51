//! What the agent applies, parsed before it takes its lock: the files posted to the API
//! and the files of the watched directory. Pure, and bounded in time and memory by
//! [`super::limits`]. The watched directory holds policy files and service files; each
//! file goes to one side by the kinds of its documents ([`route_dir_file`]).

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

/// The kinds of a service file's documents: a file of only these is a service file.
pub const SERVICE_KINDS: [&str; 2] = ["Service", "EndpointSlice"];

/// What a file of the watched directory holds, by the `kind` of each document (a `List`
/// counts its items' kinds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileKinds {
    /// Policies, or nothing (an empty file): the policy side reads it.
    Policies,
    /// Only `Service` and `EndpointSlice` documents.
    Services,
    /// Both; the kinds found, each once, in order.
    Mixed(Vec<String>),
}

/// Just the `kind` of a document (and of a `List`'s items); every other field is skipped.
#[derive(serde::Deserialize)]
struct KindOnly {
    kind: Option<String>,
    #[serde(default)]
    items: Vec<KindOnly>,
}

impl KindOnly {
    fn kinds(self, out: &mut Vec<String>) {
        match self.kind {
            Some(k) if k == "List" => self.items.into_iter().for_each(|i| i.kinds(out)),
            Some(k) => out.push(k),
            None => out.push(String::new()),
        }
    }
}

/// Sniffs the kinds of `content`'s documents without parsing them further. `None` when
/// the file is beyond the limits or not YAML/JSON at all: the policy side then refuses it
/// with the parser's message.
pub fn file_kinds(content: &str) -> Option<FileKinds> {
    super::limits::check("", content).ok()?;
    let mut kinds = Vec::new();
    if super::limits::is_json(content) {
        serde_json::from_str::<KindOnly>(content)
            .ok()?
            .kinds(&mut kinds);
    } else {
        use serde::Deserialize as _;
        for doc in serde_yaml_ng::Deserializer::from_str(content) {
            if let Some(k) = Option::<KindOnly>::deserialize(doc).ok()? {
                k.kinds(&mut kinds);
            }
        }
    }
    let is_service = |k: &String| SERVICE_KINDS.contains(&k.as_str());
    Some(
        match (kinds.iter().any(is_service), kinds.iter().all(is_service)) {
            (false, _) => FileKinds::Policies,
            (true, true) => FileKinds::Services,
            (true, false) => {
                let mut seen: Vec<String> = Vec::new();
                for k in kinds {
                    let k = if k.is_empty() {
                        "(no kind)".to_owned()
                    } else {
                        k
                    };
                    if !seen.contains(&k) {
                        seen.push(k);
                    }
                }
                FileKinds::Mixed(seen)
            }
        },
    )
}

/// Where a change to one file of the watched directory goes: the policy side (always: a
/// file that now holds services takes its former policies along) and, when the service
/// side is to hear of it, `Agent::sync_service_file`'s arguments (`None`: the file holds
/// no services, or is gone).
#[derive(Clone, Debug)]
pub struct RoutedChange {
    pub policy: DirChange,
    pub service: Option<(PathBuf, Option<String>)>,
}

/// Routes a file of the watched directory (read as `content`) by its kinds: services to
/// the service side, policies (and what cannot be read or parsed) to the policy side,
/// a file mixing both refused on the policy side naming the file and the kinds. A file
/// refused keeps what it gave before on both sides.
pub fn route_dir_file(path: &Path, content: Result<String, String>) -> RoutedChange {
    let kinds = content.as_ref().ok().and_then(|c| file_kinds(c));
    match kinds {
        Some(FileKinds::Services) => RoutedChange {
            policy: DirChange::Removed(path.to_owned()),
            service: Some((path.to_owned(), content.ok())),
        },
        Some(FileKinds::Mixed(kinds)) => RoutedChange {
            policy: DirChange::File {
                path: path.to_owned(),
                parsed: Err(format!(
                    "{}: the file mixes services and policies (kinds {}): put Service and EndpointSlice documents in a file of their own",
                    path.display(),
                    kinds.join(", ")
                )),
            },
            service: None,
        },
        Some(FileKinds::Policies) => RoutedChange {
            policy: parse_dir_file(path, content),
            service: Some((path.to_owned(), None)),
        },
        // Unreadable or unparsable: the policy side says why; the services stay.
        None => RoutedChange {
            policy: parse_dir_file(path, content),
            service: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str =
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";
    const SLICE: &str =
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1}\n";
    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {podSelector: {}}\n";

    #[test]
    fn kinds_are_sniffed_per_document() {
        assert_eq!(file_kinds(SVC), Some(FileKinds::Services));
        assert_eq!(
            file_kinds(&format!("{SVC}---\n{SLICE}---\n")),
            Some(FileKinds::Services)
        );
        assert_eq!(file_kinds(POLICY), Some(FileKinds::Policies));
        assert_eq!(file_kinds(""), Some(FileKinds::Policies));
        assert_eq!(
            file_kinds(&format!("{POLICY}---\n{SVC}---\n{SLICE}")),
            Some(FileKinds::Mixed(vec![
                "NetworkPolicy".into(),
                "Service".into(),
                "EndpointSlice".into()
            ]))
        );
        // JSON, and a v1 List of services.
        assert_eq!(
            file_kinds(r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}}"#),
            Some(FileKinds::Services)
        );
        assert_eq!(
            file_kinds(
                "apiVersion: v1\nkind: List\nitems:\n- {kind: Service}\n- {kind: EndpointSlice}\n"
            ),
            Some(FileKinds::Services)
        );
        assert_eq!(
            file_kinds("kind: List\nitems: [{kind: Service}, {kind: NetworkPolicy}]\n"),
            Some(FileKinds::Mixed(vec![
                "Service".into(),
                "NetworkPolicy".into()
            ]))
        );
        // A document without a kind next to a service: mixed (the policy side would
        // refuse it too).
        assert_eq!(
            file_kinds(&format!("{SVC}---\nmetadata: {{name: x}}\n")),
            Some(FileKinds::Mixed(vec!["Service".into(), "(no kind)".into()]))
        );
        // Not YAML, or beyond the limits: unknown.
        assert_eq!(file_kinds("kind: [unclosed\n"), None);
        assert_eq!(file_kinds(&"[".repeat(100)), None);
    }

    #[test]
    fn files_go_to_the_side_of_their_kinds() {
        let path = Path::new("/p/web.yaml");
        let r = route_dir_file(path, Ok(SVC.into()));
        assert!(matches!(&r.policy, DirChange::Removed(p) if p == path));
        assert_eq!(r.service, Some((path.to_owned(), Some(SVC.to_owned()))));

        let r = route_dir_file(path, Ok(POLICY.into()));
        assert!(
            matches!(&r.policy, DirChange::File { parsed: Ok(p), .. } if p.len() == 1),
            "{r:?}"
        );
        assert_eq!(r.service, Some((path.to_owned(), None)));

        let r = route_dir_file(path, Ok(format!("{POLICY}---\n{SVC}")));
        let DirChange::File { parsed: Err(e), .. } = &r.policy else {
            panic!("a mixed file is refused: {r:?}");
        };
        assert!(
            e.contains("/p/web.yaml") && e.contains("NetworkPolicy, Service"),
            "{e}"
        );
        assert_eq!(r.service, None, "a refused file keeps its services");

        let r = route_dir_file(path, Err("cannot read /p/web.yaml: denied".into()));
        assert!(
            matches!(&r.policy, DirChange::File { parsed: Err(e), .. } if e.contains("denied"))
        );
        assert_eq!(r.service, None);

        let r = route_dir_file(path, Ok("kind: [unclosed\n".into()));
        assert!(matches!(&r.policy, DirChange::File { parsed: Err(_), .. }));
        assert_eq!(r.service, None);
    }
}
