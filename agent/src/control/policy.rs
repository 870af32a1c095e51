//! The control plane's policy half: the policy set, namespace labels and identities the
//! agent holds; recompiling and applying a diff whenever one of them or the endpoints
//! change.
//!
//! Every change is validated and compiled before anything is touched: an invalid file, a
//! policy set that does not fit the maps, or a name already owned elsewhere leaves
//! everything as it was. What is installed (`PolicyState::installed`) is exactly what
//! the datapath was told, so each change writes only the difference.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use hypha_api::{
    ApplyPoliciesResponse, DirectionPolicy, EndpointPolicy, NamespaceLabels,
    NamespaceLabelsRequest, PolicyEntryView, PolicySource, PolicyStatus, PolicySummary,
    RefusedPolicyFile,
};
use hypha_common::{
    DIR_EGRESS, DIR_INGRESS, ENDPOINT_F_EGRESS_AUDIT, ENDPOINT_F_EGRESS_POLICY,
    ENDPOINT_F_INGRESS_AUDIT, ENDPOINT_F_INGRESS_POLICY, IDENTITY_ANY, IDENTITY_HOST,
    IDENTITY_WORLD, POLICY_DENY, POLICY_F_AUDIT, PolicyKey,
};

use super::{Agent, ControlError};
use crate::datapath::Datapath;
use crate::host::HostNetwork;
use crate::policy::{
    Compiled, DirChange, IdentityAllocator, IdentitySource, Labels, NAMESPACE_NAME_LABEL,
    ParsedSources, Policy, PolicyDiff, PolicyEndpoint, PolicyError, compile, diff,
    namespace_labels, parse_dir_file, parse_policy_sources, proto_name,
};
use crate::state::{EndpointRecord, PolicyOrigin, StoredPolicy};

/// Policies by (namespace, name).
type PolicySet = BTreeMap<(String, String), StoredPolicy>;

/// What the agent holds about policy.
#[derive(Default)]
pub(super) struct PolicyState {
    pub(super) policies: PolicySet,
    /// Labels operators set on namespaces.
    pub(super) namespaces: BTreeMap<String, Labels>,
    /// What the datapath holds; its allocator is the one to persist.
    pub(super) installed: Compiled,
    /// Files of the watched directory that were refused (their policies, if any, stay as
    /// they were), by file.
    pub(super) dir_errors: BTreeMap<PathBuf, DirFileError>,
    /// Problems at start (policies that could not be compiled).
    pub(super) start_errors: Vec<String>,
}

impl PolicyState {
    /// From the saved state; `installed` is filled in at start.
    pub(super) fn restore(
        policies: Vec<StoredPolicy>,
        namespaces: BTreeMap<String, Labels>,
        identities: IdentityAllocator,
    ) -> Self {
        Self {
            policies: policies
                .into_iter()
                .map(|p| ((p.policy.namespace.clone(), p.policy.name.clone()), p))
                .collect(),
            namespaces,
            installed: Compiled {
                identities,
                ..Compiled::default()
            },
            ..Self::default()
        }
    }

    pub(super) fn stored(&self) -> Vec<StoredPolicy> {
        self.policies.values().cloned().collect()
    }
}

/// Why a file of the watched directory is refused, and how many times in a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct DirFileError {
    pub(super) error: String,
    pub(super) attempts: u32,
}

/// What [`Agent::sync_policy_files`] did: each file's outcome and lines for the log.
#[derive(Debug, Default)]
pub struct DirSyncReport {
    /// Each file of the change: applied (or removed), or why not (the message names it).
    pub outcomes: BTreeMap<PathBuf, Result<(), String>>,
    pub log: Vec<String>,
}

/// `candidate` with the policies of the watched directory's file `path` replaced by
/// `policies`; refused if one of them is already defined elsewhere.
fn with_dir_file(
    candidate: &PolicySet,
    path: &std::path::Path,
    policies: &[Policy],
) -> Result<PolicySet, String> {
    let origin = PolicyOrigin::Dir(path.to_owned());
    let mut next = candidate.clone();
    next.retain(|_, s| s.origin != origin);
    for p in policies {
        if let Some(s) = next.get(&key(p)) {
            return Err(format!(
                "{}: policy {} is already defined ({}); the file is ignored",
                path.display(),
                p.full_name(),
                s.origin
            ));
        }
        next.insert(
            key(p),
            StoredPolicy {
                policy: p.clone(),
                origin: origin.clone(),
            },
        );
    }
    Ok(next)
}

fn key(p: &Policy) -> (String, String) {
    (p.namespace.clone(), p.name.clone())
}

impl<D: Datapath, H: HostNetwork> Agent<D, H> {
    fn policy_endpoints(&self, extra: Option<&EndpointRecord>) -> Vec<PolicyEndpoint> {
        self.endpoints
            .iter()
            .chain(extra)
            .map(|e| PolicyEndpoint::new(e.id, e.address, &e.labels))
            .collect()
    }

    fn compile_with(
        &self,
        policies: &PolicySet,
        namespaces: &BTreeMap<String, Labels>,
        extra: Option<&EndpointRecord>,
    ) -> Result<Compiled, PolicyError> {
        let list: Vec<Policy> = policies.values().map(|s| s.policy.clone()).collect();
        compile(
            &list,
            &self.policy_endpoints(extra),
            namespaces,
            &self.policy.installed.identities,
            &[self.config.gateway()],
        )
    }

    /// Writes the difference to `new` into the datapath and makes it the installed
    /// state. If the datapath fails part way, tries to put back what was there.
    fn install(&mut self, new: Compiled) -> Result<PolicyDiff, ControlError> {
        let d = diff(&self.policy.installed, &new);
        if !d.is_empty()
            && let Err(e) = self.datapath.apply_policy(&d)
        {
            let back = diff(&new, &self.policy.installed);
            let rollback = match self.datapath.apply_policy(&back) {
                Ok(()) => Vec::new(),
                Err(e2) => vec![format!("cannot restore the policy maps: {e2}")],
            };
            return Err(
                ControlError::Datapath(format!("cannot write the policy maps: {e}"))
                    .with_rollback(rollback),
            );
        }
        self.policy.installed = new;
        Ok(d)
    }

    /// Compiles the policies for the endpoints found at start, compares with what the
    /// maps hold (an earlier agent's work), and returns the additions (to apply before
    /// the endpoints are adopted with their flags) and the removals (after).
    pub(super) fn policy_start(&mut self, warnings: &mut Vec<String>) -> (PolicyDiff, PolicyDiff) {
        let installed = self.datapath.installed_policy().unwrap_or_else(|e| {
            warnings.push(format!("cannot read the policy maps: {e}"));
            Default::default()
        });
        let old = Compiled {
            ipcache: installed.ipcache,
            entries: installed.entries,
            identities: self.policy.installed.identities.clone(),
            ..Compiled::default()
        };
        let new = match self.compile_with(&self.policy.policies, &self.policy.namespaces, None) {
            Ok(c) => c,
            Err(e) => {
                let msg = format!(
                    "the saved policies cannot be compiled ({e}); starting without policies"
                );
                warnings.push(msg.clone());
                self.policy.start_errors.push(msg);
                self.policy.policies.clear();
                self.compile_with(&BTreeMap::new(), &self.policy.namespaces, None)
                    .unwrap_or_default()
            }
        };
        let d = diff(&old, &new);
        self.policy.installed = new;
        d.split()
    }

    /// The flags an endpoint gets when it is attached or adopted.
    pub(super) fn policy_flags(&self, endpoint_id: u32) -> u32 {
        self.policy
            .installed
            .endpoint_flags
            .get(&endpoint_id)
            .copied()
            .unwrap_or(0)
    }

    /// Attaches a new endpoint with its policy: ipcache and entries first, then the
    /// endpoint with its flags, then what the new compilation no longer needs.
    pub(super) fn attach_with_policy(
        &mut self,
        record: &EndpointRecord,
    ) -> Result<(), ControlError> {
        let new =
            self.compile_with(&self.policy.policies, &self.policy.namespaces, Some(record))?;
        let flags = new.endpoint_flags.get(&record.id).copied().unwrap_or(0);
        let (mut adds, dels) = diff(&self.policy.installed, &new).split();
        adds.flags_set.retain(|(id, _)| *id != record.id);
        let undo = |agent: &mut Self| {
            let mut back = diff(&new, &agent.policy.installed);
            back.flags_set.retain(|(id, _)| *id != record.id);
            match agent.datapath.apply_policy(&back) {
                Ok(()) => Vec::new(),
                Err(e) => vec![format!("cannot restore the policy maps: {e}")],
            }
        };
        if !adds.is_empty()
            && let Err(e) = self.datapath.apply_policy(&adds)
        {
            let rollback = undo(self);
            return Err(
                ControlError::Datapath(format!("cannot write the policy maps: {e}"))
                    .with_rollback(rollback),
            );
        }
        let flags = flags | crate::bandwidth::endpoint_flags(record.bandwidth.as_ref());
        if let Err(e) = self.datapath.attach(record, flags) {
            let rollback = undo(self);
            return Err(ControlError::Datapath(e.to_string()).with_rollback(rollback));
        }
        if !dels.is_empty()
            && let Err(e) = self.datapath.apply_policy(&dels)
        {
            tracing::warn!("cannot remove stale policy entries: {e}");
        }
        self.policy.installed = new;
        Ok(())
    }

    /// Recompiles after endpoints went away; returns what went wrong.
    pub(super) fn policy_refresh(&mut self) -> Vec<String> {
        match self.compile_with(&self.policy.policies, &self.policy.namespaces, None) {
            Ok(new) => match self.install(new) {
                Ok(_) => Vec::new(),
                Err(e) => vec![e.to_string()],
            },
            Err(e) => vec![format!("cannot recompile the policies: {e}")],
        }
    }

    /// Commits a new policy set and namespace labels: compile, write the difference,
    /// persist; on any failure nothing changes.
    fn commit(
        &mut self,
        policies: PolicySet,
        namespaces: BTreeMap<String, Labels>,
    ) -> Result<PolicyDiff, ControlError> {
        let new = self.compile_with(&policies, &namespaces, None)?;
        let old = self.policy.installed.clone();
        let d = self.install(new)?;
        let old_policies = std::mem::replace(&mut self.policy.policies, policies);
        let old_namespaces = std::mem::replace(&mut self.policy.namespaces, namespaces);
        if let Err(e) = self.persist() {
            self.policy.policies = old_policies;
            self.policy.namespaces = old_namespaces;
            let rollback = match self.install(old) {
                Ok(_) => Vec::new(),
                Err(e2) => vec![format!("cannot restore the policy maps: {e2}")],
            };
            return Err(ControlError::from(e).with_rollback(rollback));
        }
        Ok(d)
    }

    /// `POST /v1/policies`: applies every policy of every file, or none. Parses under the
    /// caller's borrow; the API server parses first ([`parse_policy_sources`]) and calls
    /// [`Agent::apply_parsed`] under the lock.
    pub fn apply_policies(
        &mut self,
        files: &[PolicySource],
    ) -> Result<ApplyPoliciesResponse, ControlError> {
        let parsed = parse_policy_sources(files)?;
        self.apply_parsed(parsed)
    }

    /// Applies files parsed by [`parse_policy_sources`]: every policy, or none.
    pub fn apply_parsed(
        &mut self,
        parsed: ParsedSources,
    ) -> Result<ApplyPoliciesResponse, ControlError> {
        let mut candidate = self.policy.policies.clone();
        let mut applied = Vec::new();
        for (source, policies) in parsed.files {
            for p in policies {
                let k = key(&p);
                if let Some(StoredPolicy {
                    origin: origin @ PolicyOrigin::Dir(_),
                    ..
                }) = candidate.get(&k)
                {
                    return Err(ControlError::Conflict(format!(
                        "policy {} comes from the watched directory ({origin}); change that file instead",
                        p.full_name()
                    )));
                }
                applied.push(p.full_name());
                candidate.insert(
                    k,
                    StoredPolicy {
                        policy: p,
                        origin: PolicyOrigin::Api(source.clone()),
                    },
                );
            }
        }
        let namespaces = self.policy.namespaces.clone();
        let d = self.commit(candidate, namespaces)?;
        Ok(ApplyPoliciesResponse {
            applied,
            entries_set: d.entries_set.len(),
            entries_removed: d.entries_del.len(),
        })
    }

    /// `DELETE /v1/policies/{namespace}/{name}`.
    pub fn delete_policy(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<PolicySummary, ControlError> {
        let k = (namespace.to_owned(), name.to_owned());
        let stored = self
            .policy
            .policies
            .get(&k)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no policy {namespace}/{name}")))?;
        if let PolicyOrigin::Dir(path) = &stored.origin {
            return Err(ControlError::Conflict(format!(
                "policy {namespace}/{name} comes from {} in the watched directory; remove it there",
                path.display()
            )));
        }
        let summary = self.summarize(&stored);
        let mut candidate = self.policy.policies.clone();
        candidate.remove(&k);
        let namespaces = self.policy.namespaces.clone();
        self.commit(candidate, namespaces)?;
        Ok(summary)
    }

    /// `GET /v1/policies`.
    /// What a metrics scrape shows, read now.
    pub fn metrics(&self) -> String {
        let status = self.status();
        let endpoints = self.list();
        let mut policy_flows = BTreeMap::new();
        match self.datapath.policy_stats() {
            Ok(stats) => {
                for (id, st) in stats {
                    // Counters of an id no installed policy has are a removed policy's.
                    if let Some(name) = self.policy_name(id) {
                        policy_flows.insert(name, st);
                    }
                }
            }
            Err(e) => tracing::warn!("cannot read policy counters: {e}"),
        }
        crate::metrics::render(&crate::metrics::Snapshot {
            status: &status,
            endpoints: &endpoints,
            policy_flows,
        })
    }

    /// The name (`namespace/name`) of the installed policy with this id.
    pub fn policy_name(&self, id: u32) -> Option<String> {
        self.policy.installed.policies.get(&id).cloned()
    }

    pub fn list_policies(&self) -> Vec<PolicySummary> {
        self.policy
            .policies
            .values()
            .map(|s| self.summarize(s))
            .collect()
    }

    fn summarize(&self, s: &StoredPolicy) -> PolicySummary {
        let p = &s.policy;
        let (allow_rules, deny_rules) = p.rule_counts();
        PolicySummary {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            kind: p.kind.name().to_owned(),
            id: self
                .policy
                .installed
                .identities
                .policy_id(&p.full_name())
                .unwrap_or(0),
            audit: p.audit,
            source: s.origin.to_string(),
            selected_endpoints: self
                .policy_endpoints(None)
                .iter()
                .filter(|e| e.namespace == p.namespace && p.subject.matches(&e.labels))
                .map(|e| e.id)
                .collect(),
            ingress: p.ingress.isolate,
            egress: p.egress.isolate,
            allow_rules,
            deny_rules,
        }
    }

    /// `PUT /v1/namespaces/{namespace}/labels`.
    pub fn set_namespace_labels(
        &mut self,
        namespace: &str,
        req: &NamespaceLabelsRequest,
    ) -> Result<NamespaceLabels, ControlError> {
        let bad = |m: String| Err(ControlError::BadRequest(m));
        if namespace.is_empty()
            || namespace.len() > 63
            || !namespace
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad(format!("{namespace:?} is not a valid namespace name"));
        }
        for k in req.set.keys().chain(&req.remove) {
            if k == NAMESPACE_NAME_LABEL {
                return bad(format!(
                    "{NAMESPACE_NAME_LABEL} is the namespace's name; it cannot be changed"
                ));
            }
            if k.is_empty() || k.contains(|c: char| c.is_whitespace() || c == '=' || c == ',') {
                return bad(format!("{k:?} is not a valid label key"));
            }
        }
        for (k, v) in &req.set {
            if v.len() > 63 || v.contains(|c: char| c.is_whitespace() || c == ',') {
                return bad(format!("{v:?} is not a valid value for label {k}"));
            }
        }
        let mut namespaces = self.policy.namespaces.clone();
        let labels = namespaces.entry(namespace.to_owned()).or_default();
        for k in &req.remove {
            labels.remove(k);
        }
        labels.extend(req.set.clone());
        if labels.is_empty() {
            namespaces.remove(namespace);
        }
        let policies = self.policy.policies.clone();
        self.commit(policies, namespaces)?;
        Ok(NamespaceLabels {
            namespace: namespace.to_owned(),
            labels: namespace_labels(namespace, &self.policy.namespaces),
        })
    }

    /// Brings the watched directory's policies in line with its files (each read, or why
    /// not): parses them here, then [`Agent::sync_policy_files`]. Returns lines for the log.
    pub fn sync_policy_dir(
        &mut self,
        files: Vec<(PathBuf, Result<String, String>)>,
    ) -> Vec<String> {
        let present: BTreeSet<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
        let mut changes: Vec<DirChange> = files
            .into_iter()
            .map(|(path, content)| parse_dir_file(&path, content))
            .collect();
        // Files gone: those that had policies, and those that were refused.
        let gone: BTreeSet<PathBuf> = self
            .policy
            .policies
            .values()
            .filter_map(|s| match &s.origin {
                PolicyOrigin::Dir(p) => Some(p),
                PolicyOrigin::Api(_) => None,
            })
            .chain(self.policy.dir_errors.keys())
            .filter(|p| !present.contains(*p))
            .cloned()
            .collect();
        changes.extend(gone.into_iter().map(DirChange::Removed));
        self.sync_policy_files(changes).log
    }

    /// Applies changes to files of the watched directory, each file on its own and whole
    /// or not at all: a file that cannot be read or parsed, whose policies are defined
    /// elsewhere too, or whose policies do not fit the maps (or that the datapath or the
    /// state store refuses) is refused and keeps the policies it had (the last good
    /// version: what an operator expects while fixing it), and is reported in the status
    /// until a later attempt succeeds or the file goes. A file removed takes its
    /// policies along. All the files are committed together first; when that fails, one
    /// at a time in name order, so that one bad file does not hold back the others.
    ///
    /// Compilation still happens under the agent's lock (the caller holds it): splitting
    /// the lock is the agent core's next issue; parsing is done before.
    pub fn sync_policy_files(&mut self, changes: Vec<DirChange>) -> DirSyncReport {
        let mut report = DirSyncReport::default();
        let before = self.policy.policies.clone();
        let mut removed = Vec::new();
        let mut files: Vec<(PathBuf, Vec<Policy>)> = Vec::new();
        for change in changes {
            match change {
                DirChange::Removed(path) => removed.push(path),
                DirChange::File {
                    path,
                    parsed: Ok(p),
                } => files.push((path, p)),
                DirChange::File {
                    path,
                    parsed: Err(e),
                } => {
                    report.outcomes.insert(path, Err(e));
                }
            }
        }
        let without_removed = |set: &PolicySet| {
            let mut next = set.clone();
            next.retain(|_, s| !matches!(&s.origin, PolicyOrigin::Dir(p) if removed.contains(p)));
            next
        };
        // Everything at once.
        let mut batch = without_removed(&self.policy.policies);
        let mut in_batch = Vec::new();
        for (path, policies) in &files {
            match with_dir_file(&batch, path, policies) {
                Ok(next) => {
                    batch = next;
                    in_batch.push(path.clone());
                }
                Err(e) => {
                    report.outcomes.insert(path.clone(), Err(e));
                }
            }
        }
        let units = in_batch.len() + usize::from(!removed.is_empty());
        let namespaces = self.policy.namespaces.clone();
        let batch_result = if batch == self.policy.policies {
            Ok(())
        } else {
            self.commit(batch, namespaces.clone()).map(|_| ())
        };
        match batch_result {
            Ok(()) => {
                for p in removed.iter().chain(&in_batch) {
                    report.outcomes.insert(p.clone(), Ok(()));
                }
            }
            Err(e) if units <= 1 => {
                for p in removed.iter().chain(&in_batch) {
                    report
                        .outcomes
                        .insert(p.clone(), Err(format!("{}: {e}", p.display())));
                }
            }
            Err(_) => {
                // One at a time: removals first (they only free room), then each file.
                if !removed.is_empty() {
                    let next = without_removed(&self.policy.policies);
                    let r = self.commit(next, namespaces.clone());
                    for p in &removed {
                        let outcome = match &r {
                            Ok(_) => Ok(()),
                            Err(e) => Err(format!(
                                "{}: the file is gone but its policies cannot be removed: {e}",
                                p.display()
                            )),
                        };
                        report.outcomes.insert(p.clone(), outcome);
                    }
                }
                for (path, policies) in files.iter().filter(|(p, _)| in_batch.contains(p)) {
                    let outcome =
                        with_dir_file(&self.policy.policies, path, policies).and_then(|next| {
                            self.commit(next, namespaces.clone())
                                .map(|_| ())
                                .map_err(|e| format!("{}: {e}", path.display()))
                        });
                    report.outcomes.insert(path.clone(), outcome);
                }
            }
        }
        for (path, outcome) in &report.outcomes {
            match outcome {
                Ok(()) => {
                    self.policy.dir_errors.remove(path);
                }
                Err(e) => {
                    let entry = self
                        .policy
                        .dir_errors
                        .entry(path.clone())
                        .or_insert_with(|| DirFileError {
                            error: String::new(),
                            attempts: 0,
                        });
                    entry.attempts += 1;
                    if entry.error != *e {
                        entry.error = e.clone();
                        report.log.push(format!(
                            "policy file refused, its policies stay as they were: {e}"
                        ));
                    }
                }
            }
        }
        if self.policy.policies != before {
            let changed: Vec<String> = self
                .policy
                .policies
                .iter()
                .filter(|(k, s)| before.get(*k) != Some(*s))
                .map(|(_, s)| s.policy.full_name())
                .collect();
            let gone: Vec<String> = before
                .iter()
                .filter(|(k, _)| !self.policy.policies.contains_key(*k))
                .map(|(_, s)| s.policy.full_name())
                .collect();
            report.log.push(format!(
                "policy directory applied: changed {changed:?}, removed {gone:?}"
            ));
        }
        report
    }

    pub(super) fn policy_status(&self) -> PolicyStatus {
        PolicyStatus {
            policies: self.policy.policies.len(),
            entries: self.policy.installed.entries.len(),
            ipcache: self.policy.installed.ipcache.len(),
            policy_dir: self.config.policy_dir.display().to_string(),
            errors: self
                .policy
                .start_errors
                .iter()
                .cloned()
                .chain(self.policy.dir_errors.values().map(|e| e.error.clone()))
                .collect(),
            refused_files: self
                .policy
                .dir_errors
                .iter()
                .map(|(path, e)| RefusedPolicyFile {
                    file: path.display().to_string(),
                    error: e.error.clone(),
                    attempts: e.attempts,
                })
                .collect(),
        }
    }

    /// `GET /v1/endpoints/{endpoint}/policy`: by endpoint id, container id, or a unique
    /// prefix of a container id.
    pub fn endpoint_policy(&self, which: &str) -> Result<EndpointPolicy, ControlError> {
        let ep = self.find_endpoint(which)?;
        let view = PolicyEndpoint::new(ep.id, ep.address, &ep.labels);
        let installed = &self.policy.installed;
        let flags = self.policy_flags(ep.id);
        let identity = installed
            .ipcache
            .get(&ipnet::Ipv4Net::from(ep.address))
            .copied()
            .unwrap_or(0);
        let direction = |dir: u8| {
            let (enforce_flag, audit_flag) = if dir == DIR_INGRESS {
                (ENDPOINT_F_INGRESS_POLICY, ENDPOINT_F_INGRESS_AUDIT)
            } else {
                (ENDPOINT_F_EGRESS_POLICY, ENDPOINT_F_EGRESS_AUDIT)
            };
            let policies = self
                .policy
                .policies
                .values()
                .map(|s| &s.policy)
                .filter(|p| p.namespace == view.namespace && p.subject.matches(&view.labels))
                .filter(|p| {
                    let r = if dir == DIR_INGRESS {
                        &p.ingress
                    } else {
                        &p.egress
                    };
                    r.isolate || !r.deny.is_empty()
                })
                .map(Policy::full_name)
                .collect();
            let from = PolicyKey {
                endpoint_id: ep.id,
                identity: 0,
                dport: 0,
                proto: 0,
                direction: 0,
            };
            let entries = installed
                .entries
                .range(from..)
                .take_while(|(k, _)| k.endpoint_id == ep.id)
                .filter(|(k, _)| k.direction == dir)
                .map(|(k, e)| PolicyEntryView {
                    action: if e.action == POLICY_DENY {
                        "deny"
                    } else {
                        "allow"
                    }
                    .into(),
                    audit: e.flags & POLICY_F_AUDIT != 0,
                    identity: k.identity,
                    peer: self.describe_identity(k.identity),
                    protocol: proto_name(k.proto),
                    port: k.dport,
                    policy: installed
                        .policies
                        .get(&e.policy_id)
                        .cloned()
                        .unwrap_or_else(|| "(implicit)".into()),
                })
                .collect();
            DirectionPolicy {
                enforced: flags & enforce_flag != 0,
                audit: flags & audit_flag != 0,
                policies,
                entries,
            }
        };
        Ok(EndpointPolicy {
            endpoint_id: ep.id,
            container_id: ep.container_id.clone(),
            namespace: view.namespace.clone(),
            identity,
            identity_labels: self.describe_identity(identity),
            ingress: direction(DIR_INGRESS),
            egress: direction(DIR_EGRESS),
        })
    }

    pub(super) fn find_endpoint(&self, which: &str) -> Result<&EndpointRecord, ControlError> {
        if let Ok(id) = which.parse::<u32>()
            && let Some(e) = self.endpoints.iter().find(|e| e.id == id)
        {
            return Ok(e);
        }
        if let Some(e) = self.endpoints.iter().find(|e| e.container_id == which) {
            return Ok(e);
        }
        let matches: Vec<&EndpointRecord> = self
            .endpoints
            .iter()
            .filter(|e| !which.is_empty() && e.container_id.starts_with(which))
            .collect();
        match matches.as_slice() {
            [e] => Ok(e),
            [] => Err(ControlError::NotFound(format!(
                "no endpoint with id or container id {which}"
            ))),
            _ => Err(ControlError::BadRequest(format!(
                "{which} is the prefix of {} containers' ids; give more of it",
                matches.len()
            ))),
        }
    }

    fn describe_identity(&self, id: u32) -> String {
        match id {
            IDENTITY_ANY => "any".into(),
            IDENTITY_HOST => "host".into(),
            IDENTITY_WORLD => "world".into(),
            _ => match self.policy.installed.identities.source(id) {
                Some(IdentitySource::Labels { namespace, labels }) => {
                    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    if l.is_empty() {
                        format!("namespace {namespace}, no labels")
                    } else {
                        format!("namespace {namespace}: {}", l.join(","))
                    }
                }
                Some(IdentitySource::Cidr(net)) => format!("cidr {net}"),
                None => format!("unknown identity {id}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hypha_api::{AllocateRequest, CreateEndpointRequest, MacAddr};
    use hypha_common::{DIR_INGRESS, ENDPOINT_F_INGRESS_POLICY, IDENTITY_ANY};

    use super::*;
    use crate::control::tests::{MemStore, host_with, start};
    use crate::datapath::fake::FakeDatapath;
    use crate::host::fake::FakeHost;
    use crate::state::PersistedState;

    type TestAgent = Agent<FakeDatapath, FakeHost>;

    fn add(agent: &mut TestAgent, cid: &str, host: &str, labels: &[(&str, &str)]) -> u32 {
        let alloc = agent
            .allocate(&AllocateRequest {
                container_id: cid.into(),
                ifname: "eth0".into(),
                address: None,
            })
            .unwrap();
        agent
            .create_endpoint(&CreateEndpointRequest {
                container_id: cid.into(),
                ifname: "eth0".into(),
                netns: "/x".into(),
                host_ifname: host.into(),
                address: alloc.address,
                pod_mac: MacAddr([2, 0, 0, 0, 0, alloc.address.octets()[3]]),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect::<BTreeMap<_, _>>(),
                external_ipam: false,
                bandwidth: None,
                ports: Vec::new(),
            })
            .unwrap()
            .id
    }

    fn file(name: &str, content: &str) -> PolicySource {
        PolicySource {
            source: name.into(),
            content: content.into(),
        }
    }

    const DB_ONLY_FROM_WEB: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]\n";

    fn agent() -> (TestAgent, MemStore) {
        let (a, _, store) = start(
            host_with(&[("hypa", 10), ("hypb", 11), ("hypc", 12)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        (a, store)
    }

    #[test]
    fn apply_then_create_attaches_with_flags_and_entries_in_place() {
        let (mut a, store) = agent();
        a.apply_policies(&[file("db.yaml", DB_ONLY_FROM_WEB)])
            .unwrap();
        let web = add(&mut a, "w", "hypa", &[("app", "web")]);
        let db = add(&mut a, "d", "hypb", &[("app", "db")]);
        assert_eq!(a.datapath.flags[&web], 0);
        assert_eq!(a.datapath.flags[&db], ENDPOINT_F_INGRESS_POLICY);
        // The fake's maps are exactly what the agent believes is installed.
        assert_eq!(a.datapath.policy.entries, a.policy.installed.entries);
        assert_eq!(a.datapath.policy.ipcache, a.policy.installed.ipcache);
        // db's entries were written before db was attached.
        let log = &a.datapath.log;
        let attach_db = log.iter().position(|l| l == "attach hypb").unwrap();
        assert_eq!(log[attach_db - 1], "apply_policy", "{log:?}");
        let view = a.endpoint_policy(&db.to_string()).unwrap();
        assert!(view.ingress.enforced && !view.egress.enforced);
        assert_eq!(view.ingress.policies, vec!["default/db"]);
        let e = view
            .ingress
            .entries
            .iter()
            .find(|e| e.policy == "default/db")
            .unwrap();
        assert_eq!((e.protocol.as_str(), e.port), ("TCP", 5432));
        assert_eq!(e.peer, "namespace default: app=web");
        // By container id too.
        assert_eq!(a.endpoint_policy("d").unwrap().endpoint_id, db);
        // Persisted: policies, identities.
        let saved = store.last();
        assert_eq!(saved.policies.len(), 1);
        assert_eq!(saved.identities, a.policy.installed.identities);
        let list = a.list_policies();
        assert_eq!(list[0].selected_endpoints, vec![db]);
        assert_eq!(list[0].source, "api: db.yaml");
    }

    #[test]
    fn an_invalid_file_changes_nothing() {
        let (mut a, store) = agent();
        add(&mut a, "d", "hypb", &[("app", "db")]);
        let saves = store.0.lock().unwrap().len();
        let diffs = a.datapath.diffs.len();
        let err = a
            .apply_policies(&[
                file("good.yaml", DB_ONLY_FROM_WEB),
                file(
                    "bad.yaml",
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 99999}]}]\n",
                ),
            ])
            .unwrap_err();
        assert_eq!(err.http_status(), 400);
        let msg = err.to_string();
        assert!(
            msg.starts_with("bad.yaml: ") && msg.contains("line 6"),
            "{msg}"
        );
        assert!(a.list_policies().is_empty());
        assert_eq!(a.datapath.diffs.len(), diffs);
        assert_eq!(store.0.lock().unwrap().len(), saves);
        // A failing datapath leaves the policy set as it was too.
        a.datapath.fail_apply = true;
        let err = a
            .apply_policies(&[file("good.yaml", DB_ONLY_FROM_WEB)])
            .unwrap_err();
        assert!(err.to_string().contains("policy maps"), "{err}");
        assert!(a.list_policies().is_empty());
    }

    #[test]
    fn delete_policy_and_endpoint_remove_their_entries() {
        let (mut a, _) = agent();
        a.apply_policies(&[file("db.yaml", DB_ONLY_FROM_WEB)])
            .unwrap();
        add(&mut a, "w", "hypa", &[("app", "web")]);
        let db = add(&mut a, "d", "hypb", &[("app", "db")]);
        let n = a.datapath.policy.entries.len();
        assert!(n > 0);
        // web goes: db's entry for web's identity goes with it.
        a.delete_endpoint("w", "eth0").unwrap();
        assert!(a.datapath.policy.entries.len() < n);
        assert_eq!(a.datapath.policy.entries, a.policy.installed.entries);
        a.delete_policy("default", "db").unwrap();
        assert!(a.datapath.policy.entries.is_empty());
        assert_eq!(a.datapath.flags[&db], 0);
        assert_eq!(
            a.delete_policy("default", "db").unwrap_err().http_status(),
            404
        );
    }

    #[test]
    fn namespace_labels_feed_namespace_selectors() {
        let (mut a, _) = agent();
        let db = add(&mut a, "d", "hypb", &[("app", "db")]);
        let mon = add(
            &mut a,
            "m",
            "hypa",
            &[("app", "prom"), ("k8s:namespace", "monitoring")],
        );
        a.apply_policies(&[file(
            "p.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: obs}}}]}]\n",
        )])
        .unwrap();
        let peers = |a: &TestAgent| -> Vec<u32> {
            a.policy
                .installed
                .entries
                .keys()
                .filter(|k| k.endpoint_id == db && k.direction == DIR_INGRESS)
                .map(|k| k.identity)
                .filter(|i| *i != IDENTITY_HOST)
                .collect()
        };
        assert!(peers(&a).is_empty());
        let labels = a
            .set_namespace_labels(
                "monitoring",
                &NamespaceLabelsRequest {
                    set: [("team".to_owned(), "obs".to_owned())].into(),
                    remove: vec![],
                },
            )
            .unwrap();
        assert_eq!(labels.labels[NAMESPACE_NAME_LABEL], "monitoring");
        let mon_identity = a.endpoint_policy(&mon.to_string()).unwrap().identity;
        assert_eq!(peers(&a), vec![mon_identity]);
        let err = a
            .set_namespace_labels(
                "monitoring",
                &NamespaceLabelsRequest {
                    set: [(NAMESPACE_NAME_LABEL.to_owned(), "x".to_owned())].into(),
                    remove: vec![],
                },
            )
            .unwrap_err();
        assert_eq!(err.http_status(), 400);
    }

    #[test]
    fn restart_keeps_identities_and_removes_what_was_left_behind() {
        let (mut a, store) = agent();
        a.apply_policies(&[file("db.yaml", DB_ONLY_FROM_WEB)])
            .unwrap();
        add(&mut a, "w", "hypa", &[("app", "web")]);
        let db = add(&mut a, "d", "hypb", &[("app", "db")]);
        let installed = a.policy.installed.clone();
        let mut saved = store.last();
        // While the agent is down, the policy is gone from the state (as if deleted),
        // but the maps still hold its entries.
        saved.policies.clear();
        let dp = FakeDatapath {
            pinned: vec![10, 11],
            policy: a.datapath.policy.clone(),
            ..Default::default()
        };
        drop(a);
        let (a, _, _) = start(host_with(&[("hypa", 10), ("hypb", 11)]), saved, dp);
        assert!(
            a.datapath.policy.entries.is_empty(),
            "stale entries removed"
        );
        assert_eq!(a.datapath.flags[&db], 0);
        assert_eq!(
            a.datapath.policy.ipcache, installed.ipcache,
            "same identities"
        );
    }

    #[test]
    fn watched_directory_files_replace_their_policies_and_invalid_ones_keep_theirs() {
        let (mut a, _) = agent();
        add(&mut a, "d", "hypb", &[("app", "db")]);
        let f1 = PathBuf::from("/p/10-db.yaml");
        let log = a.sync_policy_dir(vec![(f1.clone(), Ok(DB_ONLY_FROM_WEB.into()))]);
        assert!(log[0].starts_with("policy directory applied"), "{log:?}");
        assert_eq!(a.list_policies()[0].source, "dir: /p/10-db.yaml");
        // The API may not replace or delete it.
        assert_eq!(
            a.apply_policies(&[file("x.yaml", DB_ONLY_FROM_WEB)])
                .unwrap_err()
                .http_status(),
            409
        );
        assert_eq!(
            a.delete_policy("default", "db").unwrap_err().http_status(),
            409
        );
        // The file turns invalid: its policy stays, the error shows in the status.
        let log = a.sync_policy_dir(vec![(f1.clone(), Ok("spec: [".into()))]);
        assert!(log[0].contains("/p/10-db.yaml"), "{log:?}");
        assert_eq!(a.list_policies().len(), 1);
        assert_eq!(a.status().policy.errors.len(), 1);
        // Fixed to allow everything, then removed.
        let open = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db}\nspec:\n  podSelector: {}\n  ingress: [{}]\n";
        a.sync_policy_dir(vec![(f1, Ok(open.into()))]);
        assert!(a.status().policy.errors.is_empty());
        assert!(
            a.policy
                .installed
                .entries
                .keys()
                .any(|k| k.identity == IDENTITY_ANY)
        );
        a.sync_policy_dir(vec![]);
        assert!(a.list_policies().is_empty());
        assert!(a.datapath.policy.entries.is_empty());
    }

    /// 5 endpoints, so that a policy on every port of every endpoint overflows
    /// `hypha_policy` (40,000 × 2 protocols × 5 entries > 262,144).
    fn agent5() -> (TestAgent, MemStore) {
        let (a, _, store) = start(
            host_with(&[
                ("hypa", 10),
                ("hypb", 11),
                ("hypc", 12),
                ("hypd", 13),
                ("hype", 14),
            ]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        (a, store)
    }

    const EVERY_PORT: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: big}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 1, endPort: 40000}, {port: 1, endPort: 40000, protocol: UDP}]}]\n";

    #[test]
    fn each_watched_file_is_applied_or_refused_on_its_own() {
        let (mut a, _) = agent5();
        for (i, h) in ["hypa", "hypb", "hypc", "hypd", "hype"].iter().enumerate() {
            add(&mut a, &format!("c{i}"), h, &[("app", "db")]);
        }
        let good = PathBuf::from("/p/good.yaml");
        let big = PathBuf::from("/p/big.yaml");
        let broken = PathBuf::from("/p/broken.yaml");
        a.sync_policy_dir(vec![
            (big.clone(), Ok(EVERY_PORT.into())),
            (broken.clone(), Ok("spec: [".into())),
            (good.clone(), Ok(DB_ONLY_FROM_WEB.into())),
        ]);
        let names: Vec<String> = a.list_policies().iter().map(|p| p.name.clone()).collect();
        assert_eq!(names, ["db"], "good.yaml is applied beside the others");
        assert_eq!(a.datapath.policy.entries, a.policy.installed.entries);
        let errors = a.status().policy.errors;
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("/p/big.yaml: ") && e.contains("hypha_policy")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.starts_with("/p/broken.yaml: ")),
            "{errors:?}"
        );
        let refused = a.status().policy.refused_files;
        let files: Vec<&str> = refused.iter().map(|r| r.file.as_str()).collect();
        assert_eq!(files, ["/p/big.yaml", "/p/broken.yaml"]);
        // Tried again, still refused: counted.
        a.sync_policy_files(vec![parse_dir_file(&big, Ok(EVERY_PORT.into()))]);
        assert_eq!(a.status().policy.refused_files[0].attempts, 2);
        // big.yaml made smaller, broken.yaml removed: both errors clear.
        let small = EVERY_PORT.replace("endPort: 40000", "endPort: 10");
        a.sync_policy_dir(vec![(big, Ok(small)), (good, Ok(DB_ONLY_FROM_WEB.into()))]);
        assert!(
            a.status().policy.errors.is_empty(),
            "{:?}",
            a.status().policy.errors
        );
        assert_eq!(a.list_policies().len(), 2);
        assert_eq!(a.datapath.policy.entries, a.policy.installed.entries);
    }

    #[test]
    fn a_watched_file_in_conflict_is_applied_once_the_conflict_goes() {
        let (mut a, _) = agent();
        add(&mut a, "d", "hypb", &[("app", "db")]);
        a.apply_policies(&[file("api.yaml", DB_ONLY_FROM_WEB)])
            .unwrap();
        let f = PathBuf::from("/p/db.yaml");
        a.sync_policy_dir(vec![(f.clone(), Ok(DB_ONLY_FROM_WEB.into()))]);
        assert_eq!(a.list_policies()[0].source, "api: api.yaml");
        let errors = a.status().policy.errors;
        assert!(
            errors[0].contains("already defined (api: api.yaml)"),
            "{errors:?}"
        );
        a.delete_policy("default", "db").unwrap();
        // The loop retries the refused file; nothing about it changed.
        a.sync_policy_dir(vec![(f, Ok(DB_ONLY_FROM_WEB.into()))]);
        assert_eq!(a.list_policies()[0].source, "dir: /p/db.yaml");
        assert!(a.status().policy.errors.is_empty());
    }
}
