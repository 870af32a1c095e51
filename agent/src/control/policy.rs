//! The control plane's policy half: the policy set, namespace labels and the policy
//! engine, behind the agent's policy lock; endpoints joining, leaving and being
//! relabelled; the views status, metrics and the monitor read without that lock.
//!
//! Every change is validated and compiled before anything is touched: an invalid file, a
//! policy set that does not fit the maps, or a name already owned elsewhere leaves
//! everything as it was. The engine's compiled state is exactly what the datapath was
//! told, so each change writes only the difference. The lock is held for the engine's
//! work and the map writes (which do not wait); persistence is waited for after it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, MutexGuard};

use hypha_api::{
    ApplyPoliciesResponse, DirectionPolicy, Endpoint, EndpointLabelsRequest, EndpointPolicy,
    NamedPort, NamespaceLabels, NamespaceLabelsRequest, PolicyEntryView, PolicySource,
    PolicyStatus, PolicySummary, RefusedPolicyFile,
};
use hypha_common::{
    DIR_EGRESS, DIR_INGRESS, ENDPOINT_F_EGRESS_AUDIT, ENDPOINT_F_EGRESS_POLICY,
    ENDPOINT_F_INGRESS_AUDIT, ENDPOINT_F_INGRESS_POLICY, IDENTITY_ANY, IDENTITY_HOST,
    IDENTITY_REMOTE_NODE, IDENTITY_WORLD, IDENTITY_WORLD6, POLICY_DENY, POLICY_F_AUDIT, PolicyKey,
};

use super::{Agent, ControlError, wait_all};
use crate::datapath::Datapath;
use crate::host::HostNetwork;
use crate::policy::{
    BOOKKEEPING_PREFIX, Compiled, DirChange, IdentityAllocator, IdentitySource, Labels,
    NAMESPACE_NAME_LABEL, NamedPorts, ParsedSources, Policy, PolicyDiff, PolicyEndpoint,
    PolicyEngine, describe_labels, diff, namespace_labels, parse_dir_file, parse_policy_sources,
    proto_name,
};
use crate::state::{Change, EndpointRecord, Pending, PolicyOrigin, StoredPolicy};
use hypha_cluster::layout::EndpointEntry;

/// Policies by (namespace, name).
type PolicySet = BTreeMap<(String, String), StoredPolicy>;

type Key = (String, String);

/// What the agent holds about policy.
pub(super) struct PolicyState {
    pub(super) engine: PolicyEngine,
    pub(super) policies: PolicySet,
    /// Labels operators set on namespaces.
    pub(super) namespaces: BTreeMap<String, Labels>,
    /// Files of the watched directory that were refused (their policies, if any, stay as
    /// they were), by file.
    pub(super) dir_errors: BTreeMap<PathBuf, DirFileError>,
    /// Problems at start (policies that could not be compiled).
    pub(super) start_errors: Vec<String>,
    /// Cluster mode: the other nodes' endpoints the engine holds, by store key, with
    /// their engine ids (from [`REMOTE_ID_FIRST`]).
    pub(super) remote: BTreeMap<String, (u32, EndpointEntry)>,
    pub(super) next_remote: u32,
}

/// The first engine id of other nodes' endpoints (local ones stay below): agent-internal,
/// never written to a map.
pub(super) const REMOTE_ID_FIRST: u32 = 0x8000_0000;

/// The engine's view of another node's endpoint, engine id `id`.
pub(super) fn remote_policy_endpoint(id: u32, e: &EndpointEntry) -> PolicyEndpoint {
    PolicyEndpoint {
        id,
        address: e.address,
        address6: e.address6,
        namespace: e.namespace.clone(),
        labels: selector_labels(&e.labels),
        ports: NamedPorts::new(),
        remote: true,
    }
}

/// Labels without the bookkeeping ones (what selectors see).
pub(super) fn selector_labels(labels: &Labels) -> Labels {
    labels
        .iter()
        .filter(|(k, _)| !k.starts_with(BOOKKEEPING_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What status, metrics and the monitor read of policy: a snapshot replaced after every
/// change, so that they never wait for the policy lock.
#[derive(Default)]
pub(super) struct PolicyView {
    pub(super) status: PolicyStatus,
    /// Policy id → `namespace/name`.
    pub(super) names: Arc<BTreeMap<u32, String>>,
    /// Cluster mode: how many other nodes' endpoints the engine holds.
    pub(super) remote_endpoints: usize,
    /// The identities as the engine numbered them (and, in cluster mode, every number the
    /// store gave), for the monitor to name what an event's remote identity stands for;
    /// copied again only when the engine's identities generation moved.
    pub(super) identities: Arc<IdentityAllocator>,
    pub(super) identities_generation: Option<u64>,
}

/// The engine's view of an endpoint.
fn policy_endpoint(ep: &EndpointRecord) -> PolicyEndpoint {
    PolicyEndpoint {
        // Both of its addresses, as the record has them.
        address: ep.address,
        address6: ep.address6,
        ports: named_ports(&ep.ports),
        ..PolicyEndpoint::new(ep.id, std::net::Ipv4Addr::UNSPECIFIED, &ep.labels)
    }
}

/// Named ports as the engine takes them; validated when they were set.
fn named_ports(ports: &[NamedPort]) -> NamedPorts {
    ports
        .iter()
        .filter_map(|p| Some((p.name.clone(), (protocol_number(&p.protocol)?, p.port))))
        .collect()
}

use crate::policy::port_protocol as protocol_number;

impl PolicyState {
    /// From the saved state and the endpoints that survived start: the engine compiled
    /// from scratch. Saved policies that no longer compile are dropped (and said so);
    /// returns the changes to persist.
    ///
    /// In cluster mode (`node` is this node's name) label identities are the store's,
    /// and the other nodes' endpoints saved (`remote`) join the engine before its first
    /// compile, so that their ipcache entries are there before any resync. Out of it,
    /// saved remote endpoints are forgotten.
    #[expect(clippy::too_many_arguments, reason = "the parts of the saved state")]
    pub(super) fn start<'a>(
        policies: Vec<StoredPolicy>,
        namespaces: BTreeMap<String, Labels>,
        identities: IdentityAllocator,
        endpoints: impl Iterator<Item = &'a EndpointRecord>,
        host_addrs: Vec<std::net::IpAddr>,
        node: Option<&str>,
        remote: BTreeMap<String, EndpointEntry>,
        warnings: &mut Vec<String>,
    ) -> (Self, Vec<Change>) {
        let mut endpoints: Vec<PolicyEndpoint> = endpoints.map(policy_endpoint).collect();
        let mut set: PolicySet = policies.into_iter().map(|p| (key(&p.policy), p)).collect();
        let mut start_errors = Vec::new();
        let mut changes = Vec::new();
        let saved_identities = identities.clone();
        let mut identities = identities;
        identities.set_cluster(node.is_some());
        let mut held = BTreeMap::new();
        let mut next_remote = REMOTE_ID_FIRST;
        for (k, entry) in remote {
            if node.is_none_or(|n| n == entry.node) {
                changes.push(Change::RemoteEndpointGone(k));
                continue;
            }
            identities.assign(
                &entry.namespace,
                &selector_labels(&entry.labels),
                entry.identity,
            );
            endpoints.push(remote_policy_endpoint(next_remote, &entry));
            held.insert(k, (next_remote, entry));
            next_remote += 1;
        }
        let engine = match PolicyEngine::new(
            set.values().map(|s| s.policy.clone()).collect(),
            namespaces.clone(),
            endpoints.clone(),
            identities.clone(),
            host_addrs.clone(),
        ) {
            Ok(e) => e,
            Err(e) => {
                let msg = format!(
                    "the saved policies cannot be compiled ({e}); starting without policies"
                );
                warnings.push(msg.clone());
                start_errors.push(msg);
                changes.extend(set.keys().map(|(namespace, name)| Change::PolicyGone {
                    namespace: namespace.clone(),
                    name: name.clone(),
                }));
                set.clear();
                PolicyEngine::new(
                    Vec::new(),
                    namespaces.clone(),
                    endpoints,
                    identities.clone(),
                    host_addrs.clone(),
                )
                .or_else(|_| {
                    PolicyEngine::new(
                        Vec::new(),
                        BTreeMap::new(),
                        Vec::new(),
                        identities.clone(),
                        host_addrs.clone(),
                    )
                })
                .expect("an empty policy set compiles")
            }
        };
        if engine.compiled().identities != saved_identities {
            changes.push(Change::Identities(engine.compiled().identities.clone()));
        }
        // What did not compile left the remote endpoints out: forget them (the next
        // resync brings them back).
        if engine.remote_ids().count() != held.len() {
            changes.extend(held.keys().cloned().map(Change::RemoteEndpointGone));
            held.clear();
        }
        let state = PolicyState {
            engine,
            policies: set,
            namespaces,
            dir_errors: BTreeMap::new(),
            start_errors,
            remote: held,
            next_remote,
        };
        (state, changes)
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

fn key(p: &Policy) -> Key {
    (p.namespace.clone(), p.name.clone())
}

/// The changes that turn `current` into `candidate`: upserts and removals.
fn delta(current: &PolicySet, candidate: &PolicySet) -> (Vec<StoredPolicy>, Vec<Key>) {
    let upsert = candidate
        .iter()
        .filter(|(k, s)| current.get(*k) != Some(*s))
        .map(|(_, s)| s.clone())
        .collect();
    let remove = current
        .keys()
        .filter(|k| !candidate.contains_key(*k))
        .cloned()
        .collect();
    (upsert, remove)
}

/// Tells the engine what changed of an endpoint from `from` to `to` (its labels, its
/// named ports): one call each, in order; stops at the first refusal.
fn follow(
    engine: &mut PolicyEngine,
    from: &EndpointRecord,
    to: &EndpointRecord,
) -> Result<Vec<crate::policy::Outcome>, crate::policy::PolicyError> {
    let mut outcomes = Vec::new();
    if from.labels != to.labels {
        outcomes.push(engine.relabel(to.id, to.labels.clone())?);
    }
    if from.ports != to.ports {
        outcomes.push(engine.set_ports(to.id, named_ports(&to.ports))?);
    }
    Ok(outcomes)
}

/// `diff` without the flags of endpoint `id` (an endpoint being attached gets its flags
/// from `Datapath::attach`).
fn without_flags_of(mut d: PolicyDiff, id: u32) -> PolicyDiff {
    d.flags_set.retain(|(e, _)| *e != id);
    d
}

impl<D: Datapath, H: HostNetwork> Agent<D, H> {
    /// Gives `addresses` (other nodes' underlay and router addresses) the remote-node
    /// identity in the ipcache, replacing the set given before: one engine change, its
    /// diff written (so the addresses are part of what the engine says the maps hold,
    /// and no reconciliation removes them). If the maps cannot be written, the engine
    /// goes back to the previous set and the maps with it.
    pub fn set_remote_nodes(
        &self,
        addresses: std::collections::BTreeSet<std::net::IpAddr>,
    ) -> Result<(), ControlError> {
        let mut p = self.policy();
        let previous = p.engine.remote_nodes().clone();
        let outcome = p.engine.set_remote_nodes(addresses)?;
        if let Err(e) = self.write_policy(&outcome.diff) {
            let rollback = match p.engine.set_remote_nodes(previous) {
                Ok(back) => match self.write_policy(&back.diff) {
                    Ok(()) => Vec::new(),
                    Err(e2) => vec![format!("cannot restore the policy maps: {e2}")],
                },
                Err(e2) => vec![format!("cannot restore the other nodes' addresses: {e2}")],
            };
            return Err(e.with_rollback(rollback));
        }
        self.publish_policy(&p);
        Ok(())
    }

    pub(super) fn policy(&self) -> MutexGuard<'_, PolicyState> {
        self.policy.lock().expect("policy state")
    }

    /// Writes a diff into the datapath.
    pub(super) fn write_policy(&self, d: &PolicyDiff) -> Result<(), ControlError> {
        if d.is_empty() {
            return Ok(());
        }
        self.datapath
            .apply_policy(d)
            .map_err(|e| ControlError::Datapath(format!("cannot write the policy maps: {e}")))
    }

    /// Replaces the snapshot the readers see.
    pub(super) fn publish_policy(&self, p: &PolicyState) {
        let compiled = p.engine.compiled();
        let old = self.policy_view.load();
        let names = if *old.names == compiled.policies {
            old.names.clone()
        } else {
            Arc::new(compiled.policies.clone())
        };
        let generation = p.engine.identities_generation();
        let identities = if old.identities_generation == Some(generation) {
            old.identities.clone()
        } else {
            Arc::new(compiled.identities.clone())
        };
        self.policy_view.store(Arc::new(PolicyView {
            status: PolicyStatus {
                policies: p.policies.len(),
                entries: compiled.entries.len(),
                ipcache: compiled.ipcache.len(),
                policy_dir: self.config.policy_dir.display().to_string(),
                errors: p
                    .start_errors
                    .iter()
                    .cloned()
                    .chain(p.dir_errors.values().map(|e| e.error.clone()))
                    .collect(),
                refused_files: p
                    .dir_errors
                    .iter()
                    .map(|(path, e)| RefusedPolicyFile {
                        file: path.display().to_string(),
                        error: e.error.clone(),
                        attempts: e.attempts,
                    })
                    .collect(),
            },
            names,
            remote_endpoints: p.remote.len(),
            identities,
            identities_generation: Some(generation),
        }));
    }

    /// Compares what the maps hold (an earlier agent's work) with the engine's state,
    /// and returns the additions (to apply before the endpoints are adopted with their
    /// flags) and the removals (after).
    pub(super) fn policy_start_diff(&self, warnings: &mut Vec<String>) -> (PolicyDiff, PolicyDiff) {
        let installed = self.datapath.installed_policy().unwrap_or_else(|e| {
            warnings.push(format!("cannot read the policy maps: {e}"));
            Default::default()
        });
        let mut p = self.policy();
        // Cluster mode: the other nodes' addresses an earlier agent wrote stay until the
        // overlay gives the set again (their routing keeps running meanwhile).
        if self.config.cluster.is_some() {
            let nodes: BTreeSet<std::net::IpAddr> = installed
                .ipcache
                .iter()
                .filter(|(n, id)| {
                    **id == IDENTITY_REMOTE_NODE && n.prefix_len() == n.max_prefix_len()
                })
                .map(|(n, _)| n.addr())
                .collect();
            if !nodes.is_empty()
                && let Err(e) = p.engine.set_remote_nodes(nodes)
            {
                warnings.push(format!("cannot keep the other nodes' addresses: {e}"));
            }
        }
        let new = p.engine.compiled();
        let old = Compiled {
            ipcache: installed.ipcache,
            entries: installed.entries,
            endpoint_flags: new.endpoint_flags.clone(),
            ..Compiled::default()
        };
        diff(&old, new).split()
    }

    /// The flags an endpoint gets when it is attached or adopted.
    pub(super) fn policy_flags(&self, endpoint_id: u32) -> u32 {
        self.policy().engine.flags(endpoint_id)
    }

    /// A new endpoint joins the policy: its entries, its ipcache entry and whatever its
    /// identity changes for its peers are written; returns its flags (for `attach`) and
    /// the persistence of a new identity, if any.
    pub(super) fn policy_join(
        &self,
        record: &EndpointRecord,
    ) -> Result<(u32, Option<Pending>), ControlError> {
        let mut p = self.policy();
        let outcome = p.engine.join(policy_endpoint(record))?;
        if let Err(e) = self.write_policy(&without_flags_of(outcome.diff, record.id)) {
            let back = p.engine.leave(record.id);
            let rollback = match self.write_policy(&without_flags_of(back.diff, record.id)) {
                Ok(()) => Vec::new(),
                Err(e2) => vec![format!("cannot restore the policy maps: {e2}")],
            };
            return Err(e.with_rollback(rollback));
        }
        let flags = p.engine.flags(record.id);
        let pending = outcome.identities_changed.then(|| {
            self.store.submit(vec![Change::Identities(
                p.engine.compiled().identities.clone(),
            )])
        });
        self.publish_policy(&p);
        Ok((flags, pending))
    }

    /// Cluster mode: the identity of `record`'s labels: the one the engine has (in use,
    /// or a number the store gave), else asked of the runtime (with no lock held: it may
    /// wait for the store) and recorded. `Ok(None)` on a single node. Its error fails the
    /// change that needs it (503: the store is unreachable) before anything was done.
    pub(super) fn cluster_identity(
        &self,
        record: &EndpointRecord,
    ) -> Result<Option<u32>, ControlError> {
        let Some(link) = self.cluster() else {
            return Ok(None);
        };
        let view = policy_endpoint(record);
        let known = self
            .policy()
            .engine
            .known_identity(&view.namespace, &view.labels);
        if let Some(id) = known {
            return Ok(Some(id));
        }
        let id = link
            .resolve_identity(&view.namespace, &view.labels)
            .map_err(|e| {
                ControlError::Unavailable(format!(
                    "cannot get the cluster identity of the labels {}: {e}",
                    describe_labels(&view.namespace, &view.labels)
                ))
            })?;
        let pending = {
            let mut p = self.policy();
            let outcome = p.engine.assign_identities(
                vec![(id, view.namespace.clone(), view.labels.clone())],
                Vec::new(),
                false,
            )?;
            self.write_policy(&outcome.diff)?;
            self.publish_policy(&p);
            outcome.identities_changed.then(|| {
                self.store.submit(vec![Change::Identities(
                    p.engine.compiled().identities.clone(),
                )])
            })
        };
        pending.map(Pending::wait).transpose()?;
        Ok(Some(id))
    }

    /// Cluster mode: tells the runtime that `record` is (again) this node's endpoint, with
    /// its identity now.
    pub(super) fn cluster_publish(&self, record: &EndpointRecord) {
        if let Some(link) = self.cluster() {
            let identity = self.policy().engine.identity_of(record.id);
            match identity {
                Some(id) => link.endpoint_published(record, id),
                None => tracing::warn!(
                    endpoint = record.id,
                    "endpoint has no identity: not published to the cluster store"
                ),
            }
        }
    }

    /// The endpoint leaves the policy (after its programs were detached); returns what
    /// went wrong.
    pub(super) fn policy_leave(&self, endpoint_id: u32) -> Vec<String> {
        let mut p = self.policy();
        if p.engine.identity_of(endpoint_id).is_none() {
            return Vec::new();
        }
        let outcome = p.engine.leave(endpoint_id);
        let mut errors = Vec::new();
        if let Err(e) = self.write_policy(&without_flags_of(outcome.diff, endpoint_id)) {
            errors.push(e.to_string());
        }
        if outcome.identities_changed {
            // Not waited for: an identity released and not saved is released again at
            // the next start.
            drop(self.store.submit(vec![Change::Identities(
                p.engine.compiled().identities.clone(),
            )]));
        }
        self.publish_policy(&p);
        errors
    }

    /// Commits changes to the policy set under the policy lock: compile, write the
    /// difference, submit. On any failure before the submit nothing changes. The caller
    /// waits for the returned persistence after releasing the lock.
    pub(super) fn commit(
        &self,
        p: &mut PolicyState,
        upsert: Vec<StoredPolicy>,
        remove: Vec<Key>,
    ) -> Result<(PolicyDiff, Pending), ControlError> {
        let remove: Vec<Key> = remove
            .into_iter()
            .filter(|k| p.policies.contains_key(k))
            .collect();
        let outcome = p.engine.update(
            upsert.iter().map(|s| s.policy.clone()).collect(),
            remove.clone(),
        )?;
        if let Err(e) = self.write_policy(&outcome.diff) {
            let rollback = self.undo_update(p, &upsert, &remove);
            return Err(e.with_rollback(rollback));
        }
        let mut changes = Vec::new();
        for s in upsert {
            changes.push(Change::Policy(s.clone()));
            p.policies.insert(key(&s.policy), s);
        }
        for k in remove {
            p.policies.remove(&k);
            changes.push(Change::PolicyGone {
                namespace: k.0,
                name: k.1,
            });
        }
        if outcome.identities_changed {
            changes.push(Change::Identities(p.engine.compiled().identities.clone()));
        }
        self.publish_policy(p);
        Ok((outcome.diff, self.store.submit(changes)))
    }

    /// Puts the engine and the maps back after an update of `upsert` and `remove` whose
    /// write failed (`p.policies` still holds the old set); returns what failed.
    fn undo_update(
        &self,
        p: &mut PolicyState,
        upsert: &[StoredPolicy],
        remove: &[Key],
    ) -> Vec<String> {
        let keys: BTreeSet<Key> = upsert
            .iter()
            .map(|s| key(&s.policy))
            .chain(remove.iter().cloned())
            .collect();
        let back_upsert: Vec<Policy> = keys
            .iter()
            .filter_map(|k| p.policies.get(k).map(|s| s.policy.clone()))
            .collect();
        let back_remove: Vec<Key> = keys
            .iter()
            .filter(|k| !p.policies.contains_key(*k))
            .cloned()
            .collect();
        match p.engine.update(back_upsert, back_remove) {
            Ok(back) => match self.write_policy(&back.diff) {
                Ok(()) => Vec::new(),
                Err(e) => vec![format!("cannot restore the policy maps: {e}")],
            },
            Err(e) => vec![format!("cannot recompile the old policies: {e}")],
        }
    }

    /// [`Agent::commit`] with its own lock, waiting for persistence after releasing
    /// it; if the state cannot be saved, the change is undone and the error returned.
    fn commit_and_wait(
        &self,
        upsert: Vec<StoredPolicy>,
        remove: Vec<Key>,
    ) -> Result<PolicyDiff, ControlError> {
        let (old, d, pending) = {
            let mut p = self.policy();
            let keys: BTreeSet<Key> = upsert
                .iter()
                .map(|s| key(&s.policy))
                .chain(remove.iter().cloned())
                .collect();
            let old: Vec<(Key, Option<StoredPolicy>)> = keys
                .into_iter()
                .map(|k| {
                    let s = p.policies.get(&k).cloned();
                    (k, s)
                })
                .collect();
            let (d, pending) = self.commit(&mut p, upsert, remove)?;
            (old, d, pending)
        };
        if let Err(e) = pending.wait() {
            let mut p = self.policy();
            let back_upsert = old.iter().filter_map(|(_, s)| s.clone()).collect();
            let back_remove = old
                .iter()
                .filter(|(_, s)| s.is_none())
                .map(|(k, _)| k.clone())
                .collect();
            let rollback = match self.commit(&mut p, back_upsert, back_remove) {
                Ok((_, pending)) => {
                    drop(pending);
                    Vec::new()
                }
                Err(e2) => vec![format!("cannot restore the policy maps: {e2}")],
            };
            return Err(ControlError::from(e).with_rollback(rollback));
        }
        Ok(d)
    }

    /// `POST /v1/policies`: applies every policy of every file, or none. Parses under the
    /// caller's borrow; the API server parses first ([`parse_policy_sources`]) and calls
    /// [`Agent::apply_parsed`].
    pub fn apply_policies(
        &self,
        files: &[PolicySource],
    ) -> Result<ApplyPoliciesResponse, ControlError> {
        let parsed = parse_policy_sources(files)?;
        self.apply_parsed(parsed)
    }

    /// Applies files parsed by [`parse_policy_sources`]: every policy, or none.
    pub fn apply_parsed(
        &self,
        parsed: ParsedSources,
    ) -> Result<ApplyPoliciesResponse, ControlError> {
        if let Some(link) = self.cluster() {
            return self.apply_parsed_cluster(link.as_ref(), parsed);
        }
        let mut upsert: BTreeMap<Key, StoredPolicy> = BTreeMap::new();
        let mut applied = Vec::new();
        {
            let p = self.policy();
            for (source, policies) in parsed.files {
                for policy in policies {
                    let k = key(&policy);
                    if let Some(StoredPolicy {
                        origin: origin @ PolicyOrigin::Dir(_),
                        ..
                    }) = p.policies.get(&k)
                    {
                        return Err(ControlError::Conflict(format!(
                            "policy {} comes from the watched directory ({origin}); change that file instead",
                            policy.full_name()
                        )));
                    }
                    applied.push(policy.full_name());
                    upsert.insert(
                        k,
                        StoredPolicy {
                            policy,
                            origin: PolicyOrigin::Api(source.clone()),
                        },
                    );
                }
            }
        }
        let d = self.commit_and_wait(upsert.into_values().collect(), Vec::new())?;
        Ok(ApplyPoliciesResponse {
            applied,
            entries_set: d.entries_set.len(),
            entries_removed: d.entries_del.len(),
        })
    }

    /// Cluster mode: every policy of every file (or none) into the store, after a dry-run
    /// compile of the candidate set here (what does not fit this node is refused before
    /// it reaches the store); returns once this agent enforces them. The watched
    /// directory's policies of the same names give way to the store's.
    fn apply_parsed_cluster(
        &self,
        link: &dyn super::ClusterLink,
        parsed: ParsedSources,
    ) -> Result<ApplyPoliciesResponse, ControlError> {
        let mut upsert: BTreeMap<Key, Policy> = BTreeMap::new();
        for (_, policies) in parsed.files {
            for policy in policies {
                upsert.insert(key(&policy), policy);
            }
        }
        let policies: Vec<Policy> = upsert.into_values().collect();
        let applied = policies.iter().map(Policy::full_name).collect();
        let d = self.policy().engine.dry_run(&policies, &[])?;
        link.publish_policies(policies, Vec::new())
            .map_err(|e| ControlError::Unavailable(format!("cannot apply the policies: {e}")))?;
        Ok(ApplyPoliciesResponse {
            applied,
            entries_set: d.entries_set.len(),
            entries_removed: d.entries_del.len(),
        })
    }

    /// `DELETE /v1/policies/{namespace}/{name}`.
    pub fn delete_policy(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<PolicySummary, ControlError> {
        let k = (namespace.to_owned(), name.to_owned());
        let summary = {
            let p = self.policy();
            let stored = p
                .policies
                .get(&k)
                .ok_or_else(|| ControlError::NotFound(format!("no policy {namespace}/{name}")))?;
            if let PolicyOrigin::Dir(path) = &stored.origin {
                return Err(ControlError::Conflict(format!(
                    "policy {namespace}/{name} comes from {} in the watched directory; remove it there",
                    path.display()
                )));
            }
            self.summarize(&p, stored, &self.endpoints_by_namespace())
        };
        if let Some(link) = self.cluster() {
            link.publish_policies(Vec::new(), vec![k]).map_err(|e| {
                ControlError::Unavailable(format!("cannot delete policy {namespace}/{name}: {e}"))
            })?;
            return Ok(summary);
        }
        self.commit_and_wait(Vec::new(), vec![k])?;
        Ok(summary)
    }

    /// What a metrics scrape shows, read now (without the policy lock).
    pub fn metrics(&self) -> String {
        let status = self.status();
        let endpoints = self.list();
        let names = self.policy_view.load().names.clone();
        let mut policy_flows = BTreeMap::new();
        match self.datapath.policy_stats() {
            Ok(stats) => {
                for (id, st) in stats {
                    // Counters of an id no installed policy has are a removed policy's.
                    if let Some(name) = names.get(&id) {
                        policy_flows.insert(name.clone(), st);
                    }
                }
            }
            Err(e) => tracing::warn!("cannot read policy counters: {e}"),
        }
        let nodes = self.nodes().unwrap_or_else(|e| {
            tracing::debug!("no per-node metrics: {e}");
            Vec::new()
        });
        let mut text = crate::metrics::render(&crate::metrics::Snapshot {
            status: &status,
            endpoints: &endpoints,
            nodes: &nodes,
            policy_flows,
        });
        // The services' per-backend counters (`hypha_service_backend_*`).
        text.push_str(&self.service_metrics());
        text
    }

    /// The name (`namespace/name`) of the installed policy with this id; reads the
    /// snapshot, never the lock (the monitor calls it once per event).
    pub fn policy_name(&self, id: u32) -> Option<String> {
        self.policy_view.load().names.get(&id).cloned()
    }

    /// What identity `id` stands for (`namespace/{k=v}`, `remote-node`, ...; see
    /// `monitor::identity_name`); reads the snapshot, never the lock.
    pub fn identity_name(&self, id: u32) -> Option<String> {
        crate::monitor::identity_name(id, &self.policy_view.load().identities)
    }

    /// The policy views of this node's endpoints, by namespace.
    fn endpoints_by_namespace(&self) -> BTreeMap<String, Vec<PolicyEndpoint>> {
        let mut out: BTreeMap<String, Vec<PolicyEndpoint>> = BTreeMap::new();
        for ep in self.table().endpoints.values() {
            let view = policy_endpoint(ep);
            out.entry(view.namespace.clone()).or_default().push(view);
        }
        out
    }

    /// `GET /v1/policies`.
    pub fn list_policies(&self) -> Vec<PolicySummary> {
        let by_ns = self.endpoints_by_namespace();
        let p = self.policy();
        p.policies
            .values()
            .map(|s| self.summarize(&p, s, &by_ns))
            .collect()
    }

    fn summarize(
        &self,
        p: &PolicyState,
        s: &StoredPolicy,
        by_ns: &BTreeMap<String, Vec<PolicyEndpoint>>,
    ) -> PolicySummary {
        let policy = &s.policy;
        let (allow_rules, deny_rules) = policy.rule_counts();
        PolicySummary {
            namespace: policy.namespace.clone(),
            name: policy.name.clone(),
            kind: policy.kind.name().to_owned(),
            id: p
                .engine
                .compiled()
                .identities
                .policy_id(&policy.full_name())
                .unwrap_or(0),
            audit: policy.audit,
            source: s.origin.to_string(),
            selected_endpoints: by_ns
                .get(&policy.namespace)
                .into_iter()
                .flatten()
                .filter(|e| policy.subject.matches(&e.labels))
                .map(|e| e.id)
                .collect(),
            ingress: policy.ingress.isolate,
            egress: policy.egress.isolate,
            allow_rules,
            deny_rules,
        }
    }

    /// `PUT /v1/namespaces/{namespace}/labels`.
    pub fn set_namespace_labels(
        &self,
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
        }
        validate_labels(&req.set, &req.remove)?;
        if let Some(link) = self.cluster() {
            let labels = link
                .publish_namespace_labels(namespace, &req.set, &req.remove)
                .map_err(|e| {
                    ControlError::Unavailable(format!("cannot label namespace {namespace}: {e}"))
                })?;
            return Ok(NamespaceLabels {
                namespace: namespace.to_owned(),
                labels: namespace_labels(
                    namespace,
                    &BTreeMap::from([(namespace.to_owned(), labels)]),
                ),
            });
        }
        let (labels, pending, old) = {
            let mut p = self.policy();
            let old = p.namespaces.get(namespace).cloned().unwrap_or_default();
            let mut labels = old.clone();
            for k in &req.remove {
                labels.remove(k);
            }
            labels.extend(req.set.clone());
            let (pending, _) = self.commit_namespace(&mut p, namespace, labels.clone(), &old)?;
            (labels, pending, old)
        };
        if let Err(e) = pending.wait() {
            let mut p = self.policy();
            let rollback = match self.commit_namespace(&mut p, namespace, old, &labels) {
                Ok((pending, _)) => {
                    drop(pending);
                    Vec::new()
                }
                Err(e2) => vec![format!("cannot restore the policy maps: {e2}")],
            };
            return Err(ControlError::from(e).with_rollback(rollback));
        }
        let p = self.policy();
        Ok(NamespaceLabels {
            namespace: namespace.to_owned(),
            labels: namespace_labels(namespace, &p.namespaces),
        })
    }

    /// Gives `namespace` the operator labels `labels` (under the policy lock).
    pub(super) fn commit_namespace(
        &self,
        p: &mut PolicyState,
        namespace: &str,
        labels: Labels,
        old: &Labels,
    ) -> Result<(Pending, PolicyDiff), ControlError> {
        let outcome = p.engine.set_namespace_labels(namespace, labels.clone())?;
        if let Err(e) = self.write_policy(&outcome.diff) {
            let rollback = match p.engine.set_namespace_labels(namespace, old.clone()) {
                Ok(back) => match self.write_policy(&back.diff) {
                    Ok(()) => Vec::new(),
                    Err(e) => vec![format!("cannot restore the policy maps: {e}")],
                },
                Err(e) => vec![format!("cannot recompile: {e}")],
            };
            return Err(e.with_rollback(rollback));
        }
        if labels.is_empty() {
            p.namespaces.remove(namespace);
        } else {
            p.namespaces.insert(namespace.to_owned(), labels.clone());
        }
        let mut changes = vec![Change::NamespaceLabels {
            namespace: namespace.to_owned(),
            labels,
        }];
        if outcome.identities_changed {
            changes.push(Change::Identities(p.engine.compiled().identities.clone()));
        }
        self.publish_policy(p);
        Ok((self.store.submit(changes), outcome.diff))
    }

    /// `PUT /v1/endpoints/{endpoint}/labels`: a running endpoint's labels change; it
    /// moves to the identity of its new labels, and its policy and every peer's view of
    /// it follow (one ordered diff: new entries before the ipcache points at the new
    /// identity, so flows both identities are allowed keep flowing).
    pub fn set_endpoint_labels(
        &self,
        which: &str,
        req: &EndpointLabelsRequest,
    ) -> Result<Endpoint, ControlError> {
        validate_labels(&req.set, &req.remove)?;
        for k in req.set.keys().chain(&req.remove) {
            if k.starts_with(BOOKKEEPING_PREFIX) {
                return Err(ControlError::BadRequest(format!(
                    "label {k} is set by the runtime (its namespace and pod) and cannot be changed"
                )));
            }
        }
        let record = self.change_endpoint(which, |record| {
            for k in &req.remove {
                record.labels.remove(k);
            }
            record.labels.extend(req.set.clone());
        })?;
        tracing::info!(endpoint = record.id, labels = ?record.labels, "endpoint relabelled");
        Ok(self.describe(&record, &self.all_drops()))
    }

    /// `PUT /v1/endpoints/{endpoint}/ports`: replaces the endpoint's named ports; the
    /// policies naming ports re-resolve for it.
    pub fn set_endpoint_ports(
        &self,
        which: &str,
        ports: &[NamedPort],
    ) -> Result<Endpoint, ControlError> {
        validate_named_ports(ports)?;
        let record = self.change_endpoint(which, |record| {
            record.ports = ports.to_vec();
            record.ports.sort();
        })?;
        tracing::info!(endpoint = record.id, ports = ?record.ports, "endpoint ports set");
        Ok(self.describe(&record, &self.all_drops()))
    }

    /// Applies `edit` to the record of the endpoint `which` (an attached endpoint, its
    /// attachment locked): the engine follows what changed (labels, named ports), the
    /// diff is written and the record saved; any failure puts everything back.
    fn change_endpoint(
        &self,
        which: &str,
        edit: impl FnOnce(&mut EndpointRecord),
    ) -> Result<EndpointRecord, ControlError> {
        self.with_endpoint(which, |current| {
            let mut record = current.clone();
            edit(&mut record);
            if record == *current {
                return Ok(record);
            }
            let relabelled = record.labels != current.labels;
            if relabelled {
                self.cluster_identity(&record)?;
            }
            let pending = {
                let mut p = self.policy();
                let written = follow(&mut p.engine, current, &record)
                    .map_err(ControlError::from)
                    .and_then(|outcomes| {
                        for o in &outcomes {
                            self.write_policy(&o.diff)?;
                        }
                        Ok(outcomes.iter().any(|o| o.identities_changed))
                    });
                let identities_changed = match written {
                    Ok(changed) => changed,
                    Err(e) => {
                        let rollback = self.restore_endpoint(&mut p, current, &record);
                        return Err(e.with_rollback(rollback));
                    }
                };
                self.publish_policy(&p);
                identities_changed.then(|| {
                    self.store.submit(vec![Change::Identities(
                        p.engine.compiled().identities.clone(),
                    )])
                })
            };
            self.finish_endpoint_change(current, &record, pending)?;
            if relabelled {
                self.cluster_publish(&record);
            }
            Ok(record)
        })
    }

    /// Puts the engine's view of an endpoint back from `now` to `was`, and the maps.
    fn restore_endpoint(
        &self,
        p: &mut PolicyState,
        was: &EndpointRecord,
        now: &EndpointRecord,
    ) -> Vec<String> {
        let errors = match follow(&mut p.engine, now, was) {
            Ok(outcomes) => outcomes
                .iter()
                .filter_map(|back| self.write_policy(&back.diff).err())
                .map(|e| format!("cannot restore the policy maps: {e}"))
                .collect(),
            Err(e) => vec![format!("cannot restore the endpoint's policy: {e}")],
        };
        self.publish_policy(p);
        errors
    }

    /// Saves the changed record; if that fails, puts the policy back.
    fn finish_endpoint_change(
        &self,
        current: &EndpointRecord,
        record: &EndpointRecord,
        identities: Option<Pending>,
    ) -> Result<(), ControlError> {
        let pending = {
            let mut t = self.table();
            t.endpoints.insert(record.owner(), record.clone());
            self.store.submit(vec![Change::Endpoint(record.clone())])
        };
        if let Err(e) = wait_all(identities.into_iter().chain([pending])) {
            self.table()
                .endpoints
                .insert(current.owner(), current.clone());
            let rollback = {
                let mut p = self.policy();
                self.restore_endpoint(&mut p, current, record)
            };
            return Err(ControlError::from(e).with_rollback(rollback));
        }
        self.services_follow([
            Self::endpoint_namespace(current),
            Self::endpoint_namespace(record),
        ]);
        Ok(())
    }

    /// Brings the watched directory's policies in line with its files (each read, or why
    /// not): parses them here, then [`Agent::sync_policy_files`]. Returns lines for the log.
    pub fn sync_policy_dir(&self, files: Vec<(PathBuf, Result<String, String>)>) -> Vec<String> {
        let present: BTreeSet<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
        let mut changes: Vec<DirChange> = files
            .into_iter()
            .map(|(path, content)| parse_dir_file(&path, content))
            .collect();
        // Files gone: those that had policies, and those that were refused.
        let gone: BTreeSet<PathBuf> = {
            let p = self.policy();
            p.policies
                .values()
                .filter_map(|s| match &s.origin {
                    PolicyOrigin::Dir(p) => Some(p),
                    PolicyOrigin::Api(_) | PolicyOrigin::Cluster => None,
                })
                .chain(p.dir_errors.keys())
                .filter(|p| !present.contains(*p))
                .cloned()
                .collect()
        };
        changes.extend(gone.into_iter().map(DirChange::Removed));
        self.sync_policy_files(changes).log
    }

    /// Applies changes to files of the watched directory, each file on its own and whole
    /// or not at all: a file that cannot be read or parsed, whose policies are defined
    /// elsewhere too, or whose policies do not fit the maps (or that the datapath
    /// refuses) is refused and keeps the policies it had (the last good version: what an
    /// operator expects while fixing it), and is reported in the status until a later
    /// attempt succeeds or the file goes. A file removed takes its policies along. All
    /// the files are committed together first; when that fails, one at a time in name
    /// order, so that one bad file does not hold back the others. Persistence is waited
    /// for after the policy lock is released; a failure to save is logged (the files
    /// are read again at the next start).
    pub fn sync_policy_files(&self, changes: Vec<DirChange>) -> DirSyncReport {
        let mut report = DirSyncReport::default();
        let mut pending = Vec::new();
        {
            let mut guard = self.policy();
            let p = &mut *guard;
            let before = p.policies.clone();
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
                next.retain(
                    |_, s| !matches!(&s.origin, PolicyOrigin::Dir(p) if removed.contains(p)),
                );
                next
            };
            let mut commit_set = |p: &mut PolicyState, next: &PolicySet| {
                let (upsert, remove) = delta(&p.policies, next);
                if upsert.is_empty() && remove.is_empty() {
                    return Ok(());
                }
                self.commit(p, upsert, remove).map(|(_, w)| pending.push(w))
            };
            // Everything at once.
            let mut batch = without_removed(&p.policies);
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
            match commit_set(p, &batch) {
                Ok(()) => {
                    for path in removed.iter().chain(&in_batch) {
                        report.outcomes.insert(path.clone(), Ok(()));
                    }
                }
                Err(e) if units <= 1 => {
                    for path in removed.iter().chain(&in_batch) {
                        report
                            .outcomes
                            .insert(path.clone(), Err(format!("{}: {e}", path.display())));
                    }
                }
                Err(_) => {
                    // One at a time: removals first (they only free room), then each file.
                    if !removed.is_empty() {
                        let next = without_removed(&p.policies);
                        let r = commit_set(p, &next);
                        for path in &removed {
                            let outcome = match &r {
                                Ok(()) => Ok(()),
                                Err(e) => Err(format!(
                                    "{}: the file is gone but its policies cannot be removed: {e}",
                                    path.display()
                                )),
                            };
                            report.outcomes.insert(path.clone(), outcome);
                        }
                    }
                    for (path, policies) in files.iter().filter(|(f, _)| in_batch.contains(f)) {
                        let outcome = with_dir_file(&p.policies, path, policies).and_then(|next| {
                            commit_set(p, &next).map_err(|e| format!("{}: {e}", path.display()))
                        });
                        report.outcomes.insert(path.clone(), outcome);
                    }
                }
            }
            for (path, outcome) in &report.outcomes {
                match outcome {
                    Ok(()) => {
                        p.dir_errors.remove(path);
                    }
                    Err(e) => {
                        let entry =
                            p.dir_errors
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
            self.publish_policy(p);
            if p.policies != before {
                let changed: Vec<String> = p
                    .policies
                    .iter()
                    .filter(|(k, s)| before.get(*k) != Some(*s))
                    .map(|(_, s)| s.policy.full_name())
                    .collect();
                let gone: Vec<String> = before
                    .iter()
                    .filter(|(k, _)| !p.policies.contains_key(*k))
                    .map(|(_, s)| s.policy.full_name())
                    .collect();
                report.log.push(format!(
                    "policy directory applied: changed {changed:?}, removed {gone:?}"
                ));
            }
        }
        if let Err(e) = wait_all(pending) {
            report.log.push(format!(
                "the policy directory's changes are in force but cannot be saved: {e}"
            ));
        }
        report
    }

    /// `GET /v1/endpoints/{endpoint}/policy`: by endpoint id, container id, or a unique
    /// prefix of a container id.
    pub fn endpoint_policy(&self, which: &str) -> Result<EndpointPolicy, ControlError> {
        let ep = self.find_endpoint(which)?;
        let view = policy_endpoint(&ep);
        let p = self.policy();
        let installed = p.engine.compiled();
        let flags = p.engine.flags(ep.id);
        let identity = p.engine.identity_of(ep.id).unwrap_or(0);
        let direction = |dir: u8| {
            let (enforce_flag, audit_flag) = if dir == DIR_INGRESS {
                (ENDPOINT_F_INGRESS_POLICY, ENDPOINT_F_INGRESS_AUDIT)
            } else {
                (ENDPOINT_F_EGRESS_POLICY, ENDPOINT_F_EGRESS_AUDIT)
            };
            let policies = p
                .policies
                .range((view.namespace.clone(), String::new())..)
                .take_while(|((ns, _), _)| *ns == view.namespace)
                .map(|(_, s)| &s.policy)
                .filter(|policy| policy.subject.matches(&view.labels))
                .filter(|policy| {
                    let r = if dir == DIR_INGRESS {
                        &policy.ingress
                    } else {
                        &policy.egress
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
                    peer: describe_identity(installed, k.identity),
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
            identity_labels: describe_identity(installed, identity),
            ingress: direction(DIR_INGRESS),
            egress: direction(DIR_EGRESS),
            unresolved_ports: p.engine.unresolved_ports(ep.id),
        })
    }

    /// The endpoint `which` names: its id, its container id, or a unique prefix of one.
    pub(super) fn find_endpoint(&self, which: &str) -> Result<EndpointRecord, ControlError> {
        let t = self.table();
        if let Ok(id) = which.parse::<u32>()
            && let Some(owner) = t.ids.get(&id)
        {
            return Ok(t.endpoints[owner].clone());
        }
        let matches: Vec<&EndpointRecord> = t
            .endpoints
            .values()
            .filter(|e| !which.is_empty() && e.container_id.starts_with(which))
            .collect();
        if let Some(e) = matches.iter().find(|e| e.container_id == which) {
            return Ok((*e).clone());
        }
        match matches.as_slice() {
            [e] => Ok((*e).clone()),
            [] => Err(ControlError::NotFound(format!(
                "no endpoint with id or container id {which}"
            ))),
            _ => Err(ControlError::BadRequest(format!(
                "{which} is the prefix of {} containers' ids; give more of it",
                matches.len()
            ))),
        }
    }
}

/// What an identity stands for, for people.
fn describe_identity(installed: &Compiled, id: u32) -> String {
    match id {
        IDENTITY_ANY => "any".into(),
        IDENTITY_HOST => "host".into(),
        IDENTITY_WORLD => "world (IPv4)".into(),
        IDENTITY_WORLD6 => "world (IPv6)".into(),
        IDENTITY_REMOTE_NODE => "remote-node (the cluster's other nodes)".into(),
        _ => match installed.identities.source(id) {
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

/// Label keys and values as Kubernetes takes them: a key is an optional DNS-subdomain
/// prefix and `/`, then a name of 1 to 63 alphanumerics, `-`, `_` and `.` starting and
/// ending with an alphanumeric; a value is empty or such a name.
fn validate_labels(set: &BTreeMap<String, String>, remove: &[String]) -> Result<(), ControlError> {
    fn name_ok(n: &str) -> bool {
        let b = n.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    }
    fn key_ok(k: &str) -> bool {
        if let Some(name) = k.strip_prefix(BOOKKEEPING_PREFIX) {
            return name_ok(name);
        }
        match k.split_once('/') {
            Some((prefix, name)) => {
                !prefix.is_empty()
                    && prefix.len() <= 253
                    && prefix.split('.').all(|part| {
                        !part.is_empty()
                            && part.len() <= 63
                            && part
                                .bytes()
                                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                            && !part.starts_with('-')
                            && !part.ends_with('-')
                    })
                    && name_ok(name)
            }
            None => name_ok(k),
        }
    }
    for k in set.keys().chain(remove) {
        if !key_ok(k) {
            return Err(ControlError::BadRequest(format!(
                "{k:?} is not a valid label key: an optional DNS prefix and '/', then 1 to 63 alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
            )));
        }
    }
    for (k, v) in set {
        if !v.is_empty() && !name_ok(v) {
            return Err(ControlError::BadRequest(format!(
                "{v:?} is not a valid value for label {k}: empty, or 1 to 63 alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
            )));
        }
    }
    Ok(())
}

/// Named ports as Kubernetes takes container port names (IANA_SVC_NAME): 1 to 15
/// lowercase alphanumerics and '-', at least one letter, no '-' at either end or twice
/// in a row; each name once; a port from 1 to 65535; TCP, UDP or SCTP.
pub(super) fn validate_named_ports(ports: &[NamedPort]) -> Result<(), ControlError> {
    let mut seen = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let n = &p.name;
        let ok = hypha_api::is_port_name(n);
        if !ok {
            return Err(ControlError::BadRequest(format!(
                "ports[{i}]: {n:?} is not a valid port name: 1 to 15 lowercase letters, digits and '-', with at least one letter and no '-' at either end or twice in a row"
            )));
        }
        if p.port == 0 {
            return Err(ControlError::BadRequest(format!(
                "ports[{i}] ({n}): port 0 is not a port; use 1 to 65535"
            )));
        }
        if protocol_number(&p.protocol).is_none() {
            return Err(ControlError::BadRequest(format!(
                "ports[{i}] ({n}): protocol {:?} is not TCP, UDP or SCTP",
                p.protocol
            )));
        }
        if !seen.insert(n.as_str()) {
            return Err(ControlError::BadRequest(format!(
                "ports[{i}]: the name {n} is given twice"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hypha_api::{AllocateRequest, CreateEndpointRequest, MacAddr};
    use hypha_common::{DIR_INGRESS, ENDPOINT_F_INGRESS_POLICY, IDENTITY_ANY};

    use super::*;
    use crate::control::tests::{MemStore, host_with, start};
    use crate::datapath::fake::{FakeDatapath, FakeState};
    use crate::host::fake::FakeHost;
    use crate::state::PersistedState;

    type TestAgent = Agent<FakeDatapath, FakeHost>;

    fn add(agent: &mut TestAgent, cid: &str, host: &str, labels: &[(&str, &str)]) -> u32 {
        let alloc = agent
            .allocate(&AllocateRequest {
                container_id: cid.into(),
                ifname: "eth0".into(),
                address: None,
                address6: None,
            })
            .unwrap();
        agent
            .create_endpoint(&CreateEndpointRequest {
                container_id: cid.into(),
                ifname: "eth0".into(),
                netns: "/x".into(),
                host_ifname: host.into(),
                address: alloc.address,
                pod_mac: MacAddr([2, 0, 0, 0, 0, alloc.address.unwrap().octets()[3]]),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect::<BTreeMap<_, _>>(),
                external_ipam: false,
                bandwidth: None,
                ports: Vec::new(),
                address6: None,
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
        assert_eq!(a.datapath.state().flags[&web], 0);
        assert_eq!(a.datapath.state().flags[&db], ENDPOINT_F_INGRESS_POLICY);
        // The fake's maps are exactly what the agent believes is installed.
        assert_eq!(
            a.datapath.state().policy.entries,
            a.policy().engine.compiled().entries
        );
        assert_eq!(
            a.datapath.state().policy.ipcache,
            a.policy().engine.compiled().ipcache
        );
        // db's entries were written before db was attached.
        let log = a.datapath.state().log.clone();
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
        assert_eq!(saved.identities, a.policy().engine.compiled().identities);
        let list = a.list_policies();
        assert_eq!(list[0].selected_endpoints, vec![db]);
        assert_eq!(list[0].source, "api: db.yaml");
    }

    #[test]
    fn an_invalid_file_changes_nothing() {
        let (mut a, store) = agent();
        add(&mut a, "d", "hypb", &[("app", "db")]);
        let saves = store.0.lock().unwrap().len();
        let diffs = a.datapath.state().diffs.len();
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
        assert_eq!(a.datapath.state().diffs.len(), diffs);
        assert_eq!(store.0.lock().unwrap().len(), saves);
        // A failing datapath leaves the policy set as it was too.
        a.datapath.state().fail_apply = true;
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
        let n = a.datapath.state().policy.entries.len();
        assert!(n > 0);
        // web goes: db's entry for web's identity goes with it.
        a.delete_endpoint("w", "eth0").unwrap();
        assert!(a.datapath.state().policy.entries.len() < n);
        assert_eq!(
            a.datapath.state().policy.entries,
            a.policy().engine.compiled().entries
        );
        a.delete_policy("default", "db").unwrap();
        assert!(a.datapath.state().policy.entries.is_empty());
        assert_eq!(a.datapath.state().flags[&db], 0);
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
            a.policy()
                .engine
                .compiled()
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
        let installed = a.policy().engine.compiled().clone();
        let mut saved = store.last();
        // While the agent is down, the policy is gone from the state (as if deleted),
        // but the maps still hold its entries.
        saved.policies.clear();
        let dp = FakeDatapath::from(FakeState {
            pinned: vec![10, 11],
            policy: a.datapath.state().policy.clone(),
            ..Default::default()
        });
        drop(a);
        let (a, _, _) = start(host_with(&[("hypa", 10), ("hypb", 11)]), saved, dp);
        assert!(
            a.datapath.state().policy.entries.is_empty(),
            "stale entries removed"
        );
        assert_eq!(a.datapath.state().flags[&db], 0);
        assert_eq!(
            a.datapath.state().policy.ipcache,
            installed.ipcache,
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
            a.policy()
                .engine
                .compiled()
                .entries
                .keys()
                .any(|k| k.identity == IDENTITY_ANY)
        );
        a.sync_policy_dir(vec![]);
        assert!(a.list_policies().is_empty());
        assert!(a.datapath.state().policy.entries.is_empty());
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
        assert_eq!(
            a.datapath.state().policy.entries,
            a.policy().engine.compiled().entries
        );
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
        assert_eq!(
            a.datapath.state().policy.entries,
            a.policy().engine.compiled().entries
        );
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
