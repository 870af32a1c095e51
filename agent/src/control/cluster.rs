//! The control plane in cluster mode: what the agent asks of the cluster runtime
//! ([`ClusterLink`], implemented by `crate::cluster::Runtime` over the store and by a
//! fake in the tests), and what the runtime tells the agent (remote endpoints, cluster
//! identities, policies and namespace labels, each as a batch or as a full resync).
//!
//! On a single node there is no link: identities are allocated locally, policies and
//! namespace labels are applied locally, as before.
//!
//! In cluster mode label identities are the store's (the engine's allocator only records
//! the numbers it gave), other nodes' endpoints are peers in the policy engine (engine ids
//! from `REMOTE_ID_FIRST`, mapped from their store keys here, never written to a map), and
//! policies and namespace labels come from the store. Every batch is applied under the
//! policy lock as one engine change and one diff, then persisted (waited for after the
//! lock is released).

use std::collections::{BTreeMap, BTreeSet};

use hypha_api::{ClusterStatus, IdentityInfo, NodeInfo, RemoveNodeResponse};
use hypha_cluster::layout::EndpointEntry;
use hypha_common::{IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD, IDENTITY_WORLD6};

use super::policy::{DirFileError, remote_policy_endpoint, selector_labels};
use super::{Agent, ControlError, wait_all};
use crate::datapath::Datapath;
use crate::host::HostNetwork;
use crate::policy::{IdentitySource, Labels, NAMESPACE_NAME_LABEL, Policy, PolicyEndpoint};
use crate::state::{Change, EndpointRecord, Pending, PolicyOrigin, StoredPolicy};

/// What the agent needs from the cluster runtime. Every method may block (it runs on the
/// request's blocking thread), but never while the agent holds its table or policy lock.
pub trait ClusterLink: Send + Sync {
    /// The cluster-wide number of (namespace, labels): known ones at once (from the
    /// runtime's mirror), new ones allocated in the store; while the store is unreachable
    /// an unknown label set waits a bounded time, then fails with a message that says so.
    fn resolve_identity(&self, namespace: &str, labels: &Labels) -> Result<u32, String>;

    /// A local endpoint was created (or relabelled): publish it. Must not wait for the
    /// store: the runtime queues the write and retries it until the store has it.
    fn endpoint_published(&self, ep: &EndpointRecord, identity: u32);

    /// A local endpoint was deleted: withdraw it (queued, as above).
    fn endpoint_withdrawn(&self, ep: &EndpointRecord);

    /// Writes policies (already validated) to the store in one transaction and waits
    /// until this agent enforces them; `deletes` are (namespace, name).
    fn publish_policies(
        &self,
        policies: Vec<Policy>,
        deletes: Vec<(String, String)>,
    ) -> Result<(), String>;

    /// Sets (and removes) labels of a namespace in the store and waits until this agent
    /// has them; returns the namespace's labels after the change.
    fn publish_namespace_labels(
        &self,
        namespace: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Labels, String>;

    /// Writes services and `EndpointSlice`s to the store in one transaction that holds
    /// only if every service key is as the caller allocated against and every ClusterIP
    /// and NodePort claim it takes is free (see [`ServiceTxn`]); then waits until this
    /// agent has them. `Ok(false)`: another node was faster; by then this agent has the
    /// store's newer services, and the caller allocates again.
    /// The default (links that carry no services, e.g. test doubles) refuses.
    fn publish_services(&self, txn: ServiceTxn) -> Result<bool, String> {
        let _ = txn;
        Err("this cluster link does not carry services".into())
    }

    fn status(&self) -> ClusterStatus;

    fn nodes(&self) -> Result<Vec<NodeInfo>, String>;

    fn remove_node(&self, name: &str, force: bool) -> Result<RemoveNodeResponse, ControlError>;
}

/// A change of the store's services, written as one conditional transaction
/// (`crate::cluster::service_txn` builds it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTxn {
    /// Services to write, each with the one the caller allocated against (`None`: there
    /// was none): the key must still hold exactly that.
    pub put: Vec<(crate::service::Service, Option<crate::service::Service>)>,
    /// Services to delete, as the caller saw them.
    pub delete: Vec<crate::service::Service>,
    pub put_slices: Vec<crate::service::EndpointSlice>,
    /// (namespace, name).
    pub delete_slices: Vec<(String, String)>,
}

/// An endpoint of another node, as the store has it; `key` is its store key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteEndpoint {
    pub key: String,
    pub entry: EndpointEntry,
}

/// A batch the runtime applies: changes, or (with `resync`) the whole set, everything
/// not in it removed (mark and sweep: entries present before and after stay in the maps
/// throughout).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteBatch<T> {
    pub upserts: Vec<T>,
    /// Keys removed (ignored with `resync`).
    pub removes: Vec<String>,
    pub resync: bool,
}

impl<D: Datapath, H: HostNetwork> Agent<D, H> {
    /// Links the agent to the cluster runtime (once, right after start, before the API
    /// serves).
    pub fn set_cluster(&self, link: std::sync::Arc<dyn ClusterLink>) {
        let _ = self.cluster.set(link);
    }

    pub(super) fn cluster(&self) -> Option<&std::sync::Arc<dyn ClusterLink>> {
        self.cluster.get()
    }

    /// Cluster identities known from the store: `(number, namespace, labels)`; removals
    /// are keys ending in the number (`.../identities/id/<n>`, or `<n>`). The engine
    /// records them so that local and remote endpoints of those labels get these numbers.
    /// On a conflict the store wins (see `PolicyEngine::assign_identities`).
    pub fn apply_cluster_identities(
        &self,
        batch: RemoteBatch<(u32, String, Labels)>,
    ) -> Result<(), ControlError> {
        let unassign: Vec<u32> = batch
            .removes
            .iter()
            .filter_map(|k| k.rsplit('/').next()?.parse().ok())
            .collect();
        let assign = batch
            .upserts
            .into_iter()
            .map(|(id, ns, labels)| (id, ns, selector_labels(&labels)))
            .collect();
        let pending = {
            let mut p = self.policy();
            let outcome = p.engine.assign_identities(assign, unassign, batch.resync)?;
            self.write_policy(&outcome.diff)?;
            self.publish_policy(&p);
            outcome.identities_changed.then(|| {
                self.store.submit(vec![Change::Identities(
                    p.engine.compiled().identities.clone(),
                )])
            })
        };
        pending.map(Pending::wait).transpose()?;
        Ok(())
    }

    /// Endpoints of other nodes: their addresses go into the ipcache with their
    /// identities (the store's numbers: it wins a conflict), and the policy engine sees
    /// them as peers; persisted, so that a restart with the store down keeps them.
    /// Entries of this node's own name are skipped. With `resync` the batch is the whole
    /// set: what the engine holds and the batch does not is removed, what is unchanged is
    /// not touched (mark and sweep, never flush and refill). One engine batch, one diff.
    pub fn apply_remote_endpoints(
        &self,
        batch: RemoteBatch<RemoteEndpoint>,
    ) -> Result<(), ControlError> {
        let own = self.config.cluster.as_ref().map(|c| c.node_name.as_str());
        let mut upserts: BTreeMap<String, EndpointEntry> = BTreeMap::new();
        for r in batch.upserts {
            if Some(r.entry.node.as_str()) == own {
                tracing::debug!(key = %r.key, "skipping this node's own endpoint from the store");
                continue;
            }
            upserts.insert(r.key, r.entry);
        }
        let mut namespaces: BTreeSet<String> =
            upserts.values().map(|e| e.namespace.clone()).collect();
        let pending = {
            let mut guard = self.policy();
            let p = &mut *guard;
            let removes: Vec<String> = if batch.resync {
                p.remote
                    .keys()
                    .filter(|k| !upserts.contains_key(*k))
                    .cloned()
                    .collect()
            } else {
                let mut r: Vec<String> = batch
                    .removes
                    .into_iter()
                    .filter(|k| p.remote.contains_key(k) && !upserts.contains_key(k))
                    .collect();
                r.sort();
                r.dedup();
                r
            };
            upserts.retain(|k, e| p.remote.get(k).map(|(_, old)| old) != Some(e));
            if upserts.is_empty() && removes.is_empty() {
                return Ok(());
            }
            let assign = upserts
                .values()
                .map(|e| (e.identity, e.namespace.clone(), selector_labels(&e.labels)))
                .collect();
            let assigned = p.engine.assign_identities(assign, Vec::new(), false)?;
            self.write_policy(&assigned.diff)?;

            let mut next = p.next_remote;
            let mut joining = Vec::with_capacity(upserts.len());
            let mut ids = BTreeMap::new();
            for (k, e) in &upserts {
                let id = match p.remote.get(k) {
                    Some((id, _)) => *id,
                    None => {
                        let id = next;
                        next += 1;
                        id
                    }
                };
                ids.insert(k.clone(), id);
                joining.push(remote_policy_endpoint(id, e));
            }
            let leaving: Vec<u32> = removes.iter().map(|k| p.remote[k].0).collect();
            let outcome = p.engine.update_remote(joining, leaving)?;
            if let Err(e) = self.write_policy(&outcome.diff) {
                // Back to what the engine held (the maps are as the diff left them).
                let back: Vec<PolicyEndpoint> = upserts
                    .keys()
                    .chain(&removes)
                    .filter_map(|k| p.remote.get(k))
                    .map(|(id, e)| remote_policy_endpoint(*id, e))
                    .collect();
                let added: Vec<u32> = upserts
                    .keys()
                    .filter(|k| !p.remote.contains_key(*k))
                    .map(|k| ids[k])
                    .collect();
                let rollback = match p.engine.update_remote(back, added) {
                    Ok(b) => match self.write_policy(&b.diff) {
                        Ok(()) => Vec::new(),
                        Err(e2) => vec![format!("cannot restore the policy maps: {e2}")],
                    },
                    Err(e2) => vec![format!("cannot restore the remote endpoints: {e2}")],
                };
                self.publish_policy(p);
                return Err(e.with_rollback(rollback));
            }
            p.next_remote = next;
            let mut changes = Vec::with_capacity(upserts.len() + removes.len() + 1);
            for k in removes {
                if let Some((_, e)) = p.remote.remove(&k) {
                    namespaces.insert(e.namespace);
                }
                changes.push(Change::RemoteEndpointGone(k));
            }
            for (k, e) in upserts {
                if let Some((_, old)) = p.remote.insert(k.clone(), (ids[&k], e.clone())) {
                    namespaces.insert(old.namespace);
                }
                changes.push(Change::RemoteEndpoint { key: k, entry: e });
            }
            if assigned.identities_changed || outcome.identities_changed {
                changes.push(Change::Identities(p.engine.compiled().identities.clone()));
            }
            self.publish_policy(p);
            self.store.submit(changes)
        };
        pending.wait()?;
        self.services_follow(namespaces);
        Ok(())
    }

    /// Policies of the store (removals: keys ending in `namespace/name`), enforced like
    /// applied ones, with origin [`PolicyOrigin::Cluster`], the batch as one engine
    /// update; with `resync`, cluster policies not in the batch are removed. A policy of
    /// the watched directory with the same name is replaced, and its file reported
    /// refused (the directory is node-local; the store's policy wins).
    pub fn apply_cluster_policies(&self, batch: RemoteBatch<Policy>) -> Result<(), ControlError> {
        let pending = {
            let mut guard = self.policy();
            let p = &mut *guard;
            let incoming: BTreeMap<(String, String), Policy> = batch
                .upserts
                .into_iter()
                .map(|pol| ((pol.namespace.clone(), pol.name.clone()), pol))
                .collect();
            let cluster_keys = p
                .policies
                .iter()
                .filter(|(_, s)| s.origin == PolicyOrigin::Cluster)
                .map(|(k, _)| k.clone());
            let remove: Vec<(String, String)> = if batch.resync {
                cluster_keys.filter(|k| !incoming.contains_key(k)).collect()
            } else {
                let named: BTreeSet<(String, String)> = batch
                    .removes
                    .iter()
                    .filter_map(|k| {
                        let mut parts = k.rsplit('/');
                        let name = parts.next()?;
                        let ns = parts.next()?;
                        Some((ns.to_owned(), name.to_owned()))
                    })
                    .collect();
                cluster_keys
                    .filter(|k| named.contains(k) && !incoming.contains_key(k))
                    .collect()
            };
            let mut replaced_files = Vec::new();
            let upsert: Vec<StoredPolicy> = incoming
                .into_iter()
                .filter_map(|(k, policy)| {
                    let stored = StoredPolicy {
                        policy,
                        origin: PolicyOrigin::Cluster,
                    };
                    match p.policies.get(&k) {
                        Some(old) if *old == stored => None,
                        Some(StoredPolicy {
                            origin: PolicyOrigin::Dir(path),
                            ..
                        }) => {
                            replaced_files.push((path.clone(), k));
                            Some(stored)
                        }
                        _ => Some(stored),
                    }
                })
                .collect();
            if upsert.is_empty() && remove.is_empty() {
                return Ok(());
            }
            let (_, pending) = self.commit(p, upsert, remove)?;
            for (path, (ns, name)) in replaced_files {
                let error = format!(
                    "{}: policy {ns}/{name} is defined in the cluster store, which wins; the \
                     file's policy is ignored",
                    path.display()
                );
                tracing::warn!("{error}");
                p.dir_errors
                    .entry(path)
                    .or_insert_with(|| DirFileError {
                        error: String::new(),
                        attempts: 0,
                    })
                    .error = error;
            }
            self.publish_policy(p);
            pending
        };
        pending.wait()?;
        Ok(())
    }

    /// Namespace labels of the store, by namespace (removals: keys ending in the
    /// namespace); with `resync`, namespaces not in the batch lose their labels.
    pub fn apply_cluster_namespaces(
        &self,
        batch: RemoteBatch<(String, Labels)>,
    ) -> Result<(), ControlError> {
        let mut pending = Vec::new();
        {
            let mut guard = self.policy();
            let p = &mut *guard;
            let mut wanted: BTreeMap<String, Labels> = BTreeMap::new();
            if batch.resync {
                for ns in p.namespaces.keys() {
                    wanted.insert(ns.clone(), Labels::new());
                }
            } else {
                for k in &batch.removes {
                    if let Some(ns) = k.rsplit('/').next() {
                        wanted.insert(ns.to_owned(), Labels::new());
                    }
                }
            }
            for (ns, mut labels) in batch.upserts {
                labels.remove(NAMESPACE_NAME_LABEL);
                wanted.insert(ns, labels);
            }
            for (ns, labels) in wanted {
                let old = p.namespaces.get(&ns).cloned().unwrap_or_default();
                if old == labels {
                    continue;
                }
                let (w, _) = self.commit_namespace(p, &ns, labels, &old)?;
                pending.push(w);
            }
        }
        wait_all(pending)?;
        Ok(())
    }

    /// Every local endpoint with its identity, for the runtime to publish (at start and
    /// after a resync of its own keys).
    pub fn local_endpoints(&self) -> Vec<(EndpointRecord, Option<u32>)> {
        let endpoints: Vec<EndpointRecord> = self.table().endpoints.values().cloned().collect();
        let p = self.policy();
        endpoints
            .into_iter()
            .map(|ep| {
                let id = p.engine.identity_of(ep.id);
                (ep, id)
            })
            .collect()
    }

    /// The identities this node knows, for `hypha identity list`: the reserved ones,
    /// the label identities in use (with their local and remote endpoint counts) and, in
    /// cluster mode, those the store gave that no endpoint here has; the CIDR identities
    /// (node-local).
    pub fn identities(&self) -> Vec<IdentityInfo> {
        let reserved = |id: u32, name: &str| IdentityInfo {
            id,
            kind: "reserved".into(),
            namespace: None,
            labels: BTreeMap::new(),
            cidr: None,
            reserved: Some(name.into()),
            local_endpoints: 0,
            remote_endpoints: 0,
        };
        let mut out = vec![
            reserved(IDENTITY_HOST, "host"),
            reserved(IDENTITY_WORLD, "world"),
            reserved(IDENTITY_WORLD6, "world6"),
            reserved(IDENTITY_REMOTE_NODE, "remote-node"),
        ];
        let p = self.policy();
        let mut seen = BTreeSet::new();
        for (id, namespace, labels, local, remote) in p.engine.label_identities() {
            seen.insert(id);
            out.push(IdentityInfo {
                id,
                kind: "labels".into(),
                namespace: Some(namespace.to_owned()),
                labels: labels.clone(),
                cidr: None,
                reserved: None,
                local_endpoints: local,
                remote_endpoints: remote,
            });
        }
        let alloc = &p.engine.compiled().identities;
        for (id, src) in alloc.assignments() {
            if let IdentitySource::Labels { namespace, labels } = src
                && !seen.contains(id)
            {
                out.push(IdentityInfo {
                    id: *id,
                    kind: "labels".into(),
                    namespace: Some(namespace.clone()),
                    labels: labels.clone(),
                    cidr: None,
                    reserved: None,
                    local_endpoints: 0,
                    remote_endpoints: 0,
                });
            }
        }
        for (src, id) in alloc.by_source() {
            if let IdentitySource::Cidr(net) = src {
                out.push(IdentityInfo {
                    id,
                    kind: "cidr".into(),
                    namespace: None,
                    labels: BTreeMap::new(),
                    cidr: Some(*net),
                    reserved: None,
                    local_endpoints: 0,
                    remote_endpoints: 0,
                });
            }
        }
        drop(p);
        out.sort_by_key(|i| i.id);
        out
    }

    /// How many remote endpoints the engine holds (status; reads the snapshot).
    pub fn remote_endpoint_count(&self) -> usize {
        self.policy_view.load().remote_endpoints
    }
}
