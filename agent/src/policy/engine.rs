//! The policy engine: the compiler of [`super::compile`], kept up to date change by change
//! instead of rebuilt from scratch.
//!
//! Its output is always exactly what [`compile`](super::compile) gives for the same
//! inputs and the allocator as it was, and every change returns exactly
//! [`diff`](super::diff) of the two (the tests hold it to that). The semantics are
//! `compile.rs`'s; what differs is the work:
//!
//! - **Keyed by identity.** Selectors resolve to label identities (namespace + labels),
//!   never to endpoints. Each identity keeps its compiled rule set (remote identity,
//!   port, protocol, direction → entry) and its endpoint flags, the *template*; an
//!   endpoint's entries are its identity's template with its id in the key, plus the
//!   ingress named ports resolved against its own ports. An endpoint joining an identity
//!   that exists costs its own entries.
//! - **Selector cache** (as Cilium's): every distinct peer selector keeps the identities
//!   it matches and the policies using it. A new (or released) identity is matched
//!   against the selectors once; the identities selected by the policies whose selectors
//!   changed are recompiled, nothing else.
//! - **Policies by namespace**: a policy selects only in its namespace, so an identity
//!   reads only its namespace's policies, and a policy looks only at its namespace's
//!   identities.
//! - **Global rules**: rules naming CIDRs or the `world`/`cluster` entities depend on the
//!   whole ipcache (and only they can collapse to [`IDENTITY_ANY`], since only they can
//!   cover [`IDENTITY_WORLD`]); the identities their policies select are recompiled when
//!   the set of identities changes, or when a prefix inside one of their CIDRs changes.
//! - **Named egress ports** resolve against the ports of the peer endpoints the rule
//!   selects (the union over them: as in Cilium, a name that means port 80 on one peer
//!   and 8080 on another allows both towards every selected peer); the identities
//!   selected by such policies are recompiled when an endpoint with named ports comes,
//!   goes or changes its ports.
//!
//! - **Other nodes' endpoints** (cluster mode, [`PolicyEndpoint::remote`]) are peers:
//!   members of their label identities (which selectors match) with their addresses in
//!   the ipcache, but they get no entries and no flags. They come and go in batches
//!   ([`PolicyEngine::update_remote`]), each reconciled once. On an address both a local
//!   and a remote endpoint claim, the local one wins the ipcache (a stale remote entry
//!   never hides a pod of this node).
//! - **Other nodes' addresses** (cluster mode, [`PolicyEngine::set_remote_nodes`]) map to
//!   the remote-node identity in the ipcache, below the endpoints and the host on an
//!   address they share.
//!
//! A change that fails (a map's capacity, identities exhausted) leaves the engine as it
//! was: its inputs are restored and the engine rebuilt from them, which is a full
//! compile, paid only on that error path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use hypha_common::{
    DIR_EGRESS, DIR_INGRESS, ENDPOINT_F_EGRESS_AUDIT, ENDPOINT_F_EGRESS_POLICY,
    ENDPOINT_F_INGRESS_AUDIT, ENDPOINT_F_INGRESS_POLICY, IDENTITY_ANY, IDENTITY_HOST,
    IDENTITY_REMOTE_NODE, MAX_POLICY_ENTRIES, POLICY_ALLOW, POLICY_DENY, POLICY_F_AUDIT,
    PolicyEntry, PolicyKey, maps,
};
use ipnet::IpNet;

use super::compile::{
    Compiled, PolicyDiff, all_rules, check_ipcache_capacity, direction, expand_ports,
    resolve_named, rule_ports, wins, worlds,
};
use super::identity::{IdentityAllocator, IdentitySource};
use super::{
    Entity, LabelSelector, Labels, NamedPort, NamedPorts, NamespaceScope, Peer, Policy,
    PolicyEndpoint, PolicyError, Rule, namespace_labels,
};

/// What a change did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The minimal ordered changes to the datapath's maps.
    pub diff: PolicyDiff,
    /// The identity allocator changed: the agent persists it.
    pub identities_changed: bool,
}

/// `(namespace, name)` of a policy.
type PolicyRef = (String, String);
/// A label identity's source: `(namespace, labels)`.
type LabelKey = (String, Labels);
/// A peer selector: the namespaces, then the pods.
type SelKey = (NamespaceScope, LabelSelector);
/// A template key: remote identity, port, protocol, direction.
type TKey = (u32, u16, u8, u8);

/// See the module's doc.
pub struct PolicyEngine {
    policies: BTreeMap<PolicyRef, PolicyState>,
    namespaces: BTreeMap<String, Labels>,
    endpoints: BTreeMap<u32, PolicyEndpoint>,
    host_addrs: Vec<IpAddr>,
    /// Other nodes' addresses: the remote-node identity's.
    remote_nodes: BTreeSet<IpAddr>,
    /// Endpoint ids by address, of both families (the highest id wins the ipcache, as in
    /// `compile`).
    by_addr: BTreeMap<IpAddr, BTreeSet<u32>>,
    /// The prefixes policies name (not 0.0.0.0/0 nor ::/0), with how many times.
    cidr_refs: BTreeMap<IpNet, usize>,
    /// Endpoints of each label set.
    members: HashMap<LabelKey, BTreeSet<u32>>,
    label_ids: HashMap<LabelKey, u32>,
    cidr_ids: BTreeMap<IpNet, u32>,
    policy_ids: HashMap<String, u32>,
    /// Label identities, with their templates.
    identities: BTreeMap<u32, IdentityState>,
    ns_identities: BTreeMap<String, BTreeSet<u32>>,
    ep_identity: BTreeMap<u32, u32>,
    /// How many ipcache prefixes map to each identity.
    identity_counts: BTreeMap<u32, usize>,
    selectors: HashMap<SelKey, SelState>,
    /// Policies with rules that depend on the whole ipcache (see the module's doc).
    global: BTreeSet<PolicyRef>,
    /// Policies with named ports in egress rules.
    named_egress: BTreeSet<PolicyRef>,
    compiled: Compiled,
    recompiled: u64,
    /// Counts changes of `compiled.identities` (see [`Self::identities_generation`]).
    generation: u64,
}

struct PolicyState {
    policy: Policy,
    /// Its distinct peer selectors.
    selectors: Vec<SelKey>,
    /// The CIDRs its rules name.
    nets: Vec<IpNet>,
}

struct IdentityState {
    namespace: String,
    labels: Labels,
    template: Template,
}

#[derive(Default)]
struct SelState {
    matched: BTreeSet<u32>,
    users: BTreeSet<PolicyRef>,
}

/// What an identity's endpoints hold (see the module's doc).
#[derive(Default, PartialEq)]
struct Template {
    flags: u32,
    base: BTreeMap<TKey, PolicyEntry>,
    /// Ingress rules with named ports, resolved per endpoint.
    named: Vec<NamedRule>,
    /// Egress named ports that resolved to nothing, described.
    unresolved: BTreeSet<String>,
}

#[derive(PartialEq)]
struct NamedRule {
    identities: Vec<u32>,
    named: Vec<NamedPort>,
    /// Protocols the rule allows on every port: a named port of these adds nothing.
    wild: BTreeSet<u8>,
    entry: PolicyEntry,
    policy: String,
}

/// The work one change leaves for [`PolicyEngine::reconcile`].
#[derive(Default)]
struct Work {
    labels: BTreeSet<LabelKey>,
    cidrs: BTreeSet<IpNet>,
    policy_names: BTreeSet<String>,
    /// Policies added or replaced, to register once identities are settled.
    policies: BTreeSet<PolicyRef>,
    dirty: BTreeSet<u32>,
    endpoints: BTreeSet<u32>,
    prefixes: BTreeSet<IpNet>,
    ports_changed: bool,
    /// Namespaces whose labels changed.
    namespaces: BTreeSet<String>,
    /// The allocator before its first change (only cloned when it changes).
    saved: Option<IdentityAllocator>,
}

/// The inputs a failed change restores.
#[derive(Default)]
struct Undo {
    endpoints: Vec<(u32, Option<PolicyEndpoint>)>,
    policies: Vec<(PolicyRef, Option<Policy>)>,
    namespaces: Vec<(String, Option<Labels>)>,
    remote_nodes: Option<BTreeSet<IpAddr>>,
}

impl PolicyEngine {
    /// Full compile at agent start (and the reference the tests compare against), without
    /// other nodes' addresses ([`Self::set_remote_nodes`] gives them).
    pub fn new(
        policies: Vec<Policy>,
        namespaces: BTreeMap<String, Labels>,
        endpoints: Vec<PolicyEndpoint>,
        identities: IdentityAllocator,
        host_addrs: Vec<IpAddr>,
    ) -> Result<Self, PolicyError> {
        Self::build(
            policies,
            namespaces,
            endpoints,
            identities,
            host_addrs,
            BTreeSet::new(),
        )
    }

    /// [`Self::new`] with other nodes' addresses `remote_nodes`.
    fn build(
        policies: Vec<Policy>,
        namespaces: BTreeMap<String, Labels>,
        endpoints: Vec<PolicyEndpoint>,
        identities: IdentityAllocator,
        host_addrs: Vec<IpAddr>,
        remote_nodes: BTreeSet<IpAddr>,
    ) -> Result<Self, PolicyError> {
        // The allocator as `compile` syncs it.
        let mut identities = identities;
        let label_sets: BTreeSet<LabelKey> = endpoints
            .iter()
            .map(|e| (e.namespace.clone(), e.labels.clone()))
            .collect();
        let mut cidrs = BTreeSet::new();
        for p in &policies {
            cidrs.extend(policy_cidrs(p));
        }
        let names: BTreeSet<String> = policies.iter().map(Policy::full_name).collect();
        identities.sync(&label_sets, &cidrs, &names)?;

        let mut e = Self {
            policies: BTreeMap::new(),
            namespaces,
            endpoints: BTreeMap::new(),
            host_addrs: host_addrs.clone(),
            remote_nodes: remote_nodes.clone(),
            by_addr: BTreeMap::new(),
            cidr_refs: BTreeMap::new(),
            members: HashMap::new(),
            label_ids: HashMap::new(),
            cidr_ids: BTreeMap::new(),
            policy_ids: HashMap::new(),
            identities: BTreeMap::new(),
            ns_identities: BTreeMap::new(),
            ep_identity: BTreeMap::new(),
            identity_counts: BTreeMap::new(),
            selectors: HashMap::new(),
            global: BTreeSet::new(),
            named_egress: BTreeSet::new(),
            compiled: Compiled {
                policies: identities.policies().clone(),
                ..Compiled::default()
            },
            recompiled: 0,
            generation: 0,
        };
        for (id, name) in identities.policies() {
            e.policy_ids.insert(name.clone(), *id);
        }
        for (src, id) in identities.by_source() {
            match src {
                IdentitySource::Labels { namespace, labels } => {
                    e.label_ids.insert((namespace.clone(), labels.clone()), id);
                    e.identities.insert(
                        id,
                        IdentityState {
                            namespace: namespace.clone(),
                            labels: labels.clone(),
                            template: Template::default(),
                        },
                    );
                    e.ns_identities
                        .entry(namespace.clone())
                        .or_default()
                        .insert(id);
                }
                IdentitySource::Cidr(net) => {
                    e.cidr_ids.insert(*net, id);
                }
            }
        }
        e.compiled.identities = identities;

        let mut work = Work::default();
        work.prefixes.extend(worlds().map(|(w, _)| w));
        for a in host_addrs.iter().chain(&remote_nodes) {
            work.prefixes.insert(IpNet::from(*a));
        }
        for p in policies {
            e.insert_policy(p, &mut work);
        }
        for ep in endpoints {
            e.insert_endpoint(ep, &mut work);
        }
        // Every identity gets its template (those no policy selects too: their flags).
        work.dirty.extend(e.identities.keys().copied());
        e.reconcile(&mut work)?;
        Ok(e)
    }

    /// What the datapath holds according to the engine.
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    /// `EndpointInfo::flags` of endpoint `endpoint_id` (0 when unknown or unselected).
    pub fn flags(&self, endpoint_id: u32) -> u32 {
        self.compiled
            .endpoint_flags
            .get(&endpoint_id)
            .copied()
            .unwrap_or(0)
    }

    /// The label identity of endpoint `endpoint_id`.
    pub fn identity_of(&self, endpoint_id: u32) -> Option<u32> {
        self.ep_identity.get(&endpoint_id).copied()
    }

    /// The policies, by namespace and name.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values().map(|s| &s.policy)
    }

    /// The endpoint `endpoint_id` as the engine knows it.
    pub fn endpoint(&self, endpoint_id: u32) -> Option<&PolicyEndpoint> {
        self.endpoints.get(&endpoint_id)
    }

    /// A number that changes whenever the identity allocator does (numbers allocated,
    /// released, assigned by the store): readers keep a copy of the allocator and copy
    /// it again only when this moved, instead of comparing it.
    pub fn identities_generation(&self) -> u64 {
        self.generation
    }

    /// Identities compiled since the engine was built (what the tests count work by).
    pub fn recompiled_identities(&self) -> u64 {
        self.recompiled
    }

    /// The named ports the policies of endpoint `endpoint_id` use that resolve to
    /// nothing, described (`ingress port 'http' of default/web`): they match nothing.
    pub fn unresolved_ports(&self, endpoint_id: u32) -> Vec<String> {
        let (Some(ep), Some(id)) = (
            self.endpoints.get(&endpoint_id),
            self.ep_identity.get(&endpoint_id),
        ) else {
            return Vec::new();
        };
        let template = &self.identities[id].template;
        let mut out = template.unresolved.clone();
        for rule in &template.named {
            for n in &rule.named {
                if ep
                    .ports
                    .get(&n.name)
                    .is_none_or(|(proto, _)| *proto != n.proto)
                {
                    out.insert(format!("ingress port '{}' of {}", n.name, rule.policy));
                }
            }
        }
        out.into_iter().collect()
    }

    /// An endpoint comes. Its flags are in the diff's `flags_set`, as the full compile
    /// would have them.
    pub fn join(&mut self, ep: PolicyEndpoint) -> Result<Outcome, PolicyError> {
        if self.endpoints.contains_key(&ep.id) {
            return Err(invalid_endpoint(ep.id, "has already joined"));
        }
        let undo = Undo {
            endpoints: vec![(ep.id, None)],
            ..Undo::default()
        };
        self.transact(undo, |e, work| e.insert_endpoint(ep, work))
    }

    /// Other nodes' endpoints come (or change) and go, in one batch reconciled once:
    /// every upsert must be [`PolicyEndpoint::remote`] (an id of a local endpoint is
    /// refused), removals go first (of unknown ids: ignored), and an upsert equal to what
    /// the engine holds changes nothing.
    pub fn update_remote(
        &mut self,
        upserts: Vec<PolicyEndpoint>,
        removes: Vec<u32>,
    ) -> Result<Outcome, PolicyError> {
        for ep in &upserts {
            if !ep.remote || self.endpoints.get(&ep.id).is_some_and(|e| !e.remote) {
                return Err(invalid_endpoint(ep.id, "is not another node's endpoint"));
            }
        }
        // An id both removed and upserted is upserted (removals go first).
        let upserted: BTreeSet<u32> = upserts.iter().map(|e| e.id).collect();
        let removes: Vec<u32> = removes
            .into_iter()
            .filter(|id| !upserted.contains(id) && self.endpoints.get(id).is_some_and(|e| e.remote))
            .collect();
        // The last upsert of an id wins.
        let last: BTreeMap<u32, PolicyEndpoint> = upserts.into_iter().map(|e| (e.id, e)).collect();
        let upserts: Vec<PolicyEndpoint> = last
            .into_values()
            .filter(|ep| self.endpoints.get(&ep.id) != Some(ep))
            .collect();
        if upserts.is_empty() && removes.is_empty() {
            return Ok(Outcome::default());
        }
        let mut undo = Undo::default();
        let mut seen = BTreeSet::new();
        for id in removes.iter().copied().chain(upserts.iter().map(|e| e.id)) {
            if seen.insert(id) {
                undo.endpoints.push((id, self.endpoints.get(&id).cloned()));
            }
        }
        self.transact(undo, |e, work| {
            for id in removes {
                e.remove_endpoint(id, work);
            }
            for ep in upserts {
                e.remove_endpoint(ep.id, work);
                e.insert_endpoint(ep, work);
            }
        })
    }

    /// The ids of the other nodes' endpoints the engine holds.
    pub fn remote_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.endpoints.values().filter(|e| e.remote).map(|e| e.id)
    }

    /// Cluster mode: numbers the store gave label sets (`assign`: number, namespace,
    /// labels) and took back (`unassign`); with `resync`, `assign` is the store's whole
    /// set and every other assignment is forgotten. A number in use here is never
    /// forgotten (the store only collects numbers no endpoint uses).
    ///
    /// Conflicts (the store gives labels in use here another number, or gives a number
    /// in use here to other labels): **the store wins**. The engine is rebuilt with the
    /// store's numbers, so the endpoints of those labels (local and remote) move to
    /// them in one diff. If labels in use here would be left without a number (theirs
    /// went to other labels and the store has not given them a new one), nothing
    /// changes and [`PolicyError::IdentityConflict`] says which: the assignment is
    /// taken once the store has numbered both (the runtime sends the identities and the
    /// endpoints of one batch together).
    pub fn assign_identities(
        &mut self,
        assign: Vec<(u32, String, Labels)>,
        unassign: Vec<u32>,
        resync: bool,
    ) -> Result<Outcome, PolicyError> {
        let mut alloc = self.compiled.identities.clone();
        let mut changed = false;
        let mut gone: BTreeSet<u32> = unassign.into_iter().collect();
        if resync {
            let wanted: BTreeSet<u32> = assign.iter().map(|(id, _, _)| *id).collect();
            gone.extend(
                alloc
                    .assignments()
                    .keys()
                    .filter(|id| !wanted.contains(id))
                    .copied(),
            );
        }
        for id in gone {
            if !self.identities.contains_key(&id) {
                changed |= alloc.unassign(id);
            }
        }
        // (number in use, the labels holding it, the labels the store gives it).
        let mut conflicts: Vec<(u32, LabelKey, LabelKey)> = Vec::new();
        for (id, namespace, labels) in assign {
            let key = (namespace, labels);
            if let Some(live) = self.label_ids.get(&key)
                && *live != id
            {
                conflicts.push((*live, key.clone(), key.clone()));
            }
            if let Some(s) = self.identities.get(&id)
                && (s.namespace != key.0 || s.labels != key.1)
            {
                conflicts.push((id, (s.namespace.clone(), s.labels.clone()), key.clone()));
            }
            changed |= alloc.assign(&key.0, &key.1, id);
        }
        if conflicts.is_empty() {
            self.compiled.identities = alloc;
            self.generation += u64::from(changed);
            return Ok(Outcome {
                diff: PolicyDiff::default(),
                identities_changed: changed,
            });
        }
        // The store wins: rebuild with its numbers.
        for (id, _, _) in &conflicts {
            alloc.release(*id);
        }
        let rebuilt = Self::build(
            self.policies.values().map(|s| s.policy.clone()).collect(),
            self.namespaces.clone(),
            self.endpoints.values().cloned().collect(),
            alloc,
            self.host_addrs.clone(),
            self.remote_nodes.clone(),
        );
        match rebuilt {
            Ok(mut new) => {
                let d = super::compile::diff(&self.compiled, &new.compiled);
                new.recompiled += self.recompiled;
                new.generation = self.generation + 1;
                *self = new;
                Ok(Outcome {
                    diff: d,
                    identities_changed: true,
                })
            }
            Err(PolicyError::Unassigned { labels }) => {
                let (id, _, to) = conflicts
                    .iter()
                    .find(|(_, held, _)| super::describe_labels(&held.0, &held.1) == labels)
                    .unwrap_or(&conflicts[0]);
                Err(PolicyError::IdentityConflict {
                    id: *id,
                    labels: super::describe_labels(&to.0, &to.1),
                    held: labels,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// What the maps would get if policies `upsert` were added (or replaced) and
    /// `remove` removed, without changing anything: a full compile of the candidate set,
    /// so that what does not fit is refused before it goes anywhere (cluster mode
    /// validates a change this way before writing it to the store).
    pub fn dry_run(
        &self,
        upsert: &[Policy],
        remove: &[(String, String)],
    ) -> Result<PolicyDiff, PolicyError> {
        let mut policies: BTreeMap<PolicyRef, Policy> = self
            .policies
            .iter()
            .map(|(r, s)| (r.clone(), s.policy.clone()))
            .collect();
        for r in remove {
            policies.remove(r);
        }
        for p in upsert {
            policies.insert((p.namespace.clone(), p.name.clone()), p.clone());
        }
        let policies: Vec<Policy> = policies.into_values().collect();
        let endpoints: Vec<PolicyEndpoint> = self.endpoints.values().cloned().collect();
        let candidate = super::compile::compile(
            &policies,
            &endpoints,
            &self.namespaces,
            &self.compiled.identities,
            &self.host_addrs,
            &self.remote_nodes.iter().copied().collect::<Vec<_>>(),
        )?;
        Ok(super::compile::diff(&self.compiled, &candidate))
    }

    /// Cluster mode on or off for the allocator (at start, before any endpoint).
    pub fn set_cluster(&mut self, on: bool) {
        self.generation += 1;
        self.compiled.identities.set_cluster(on);
    }

    /// The number of `(namespace, labels)`: the one in use, else (cluster mode) the one
    /// the store gave.
    pub fn known_identity(&self, namespace: &str, labels: &Labels) -> Option<u32> {
        self.label_ids
            .get(&(namespace.to_owned(), labels.clone()))
            .copied()
            .or_else(|| self.compiled.identities.assigned(namespace, labels))
    }

    /// The label identities in use: number, namespace, labels, and how many local and
    /// remote endpoints have it.
    pub fn label_identities(&self) -> Vec<(u32, &str, &Labels, usize, usize)> {
        self.identities
            .iter()
            .map(|(id, s)| {
                let key = (s.namespace.clone(), s.labels.clone());
                let (mut local, mut remote) = (0, 0);
                for ep in self.members.get(&key).into_iter().flatten() {
                    if self.endpoints[ep].remote {
                        remote += 1;
                    } else {
                        local += 1;
                    }
                }
                (*id, s.namespace.as_str(), &s.labels, local, remote)
            })
            .collect()
    }

    /// An endpoint goes (nothing happens for one the engine does not know).
    pub fn leave(&mut self, endpoint_id: u32) -> Outcome {
        let Some(old) = self.endpoints.get(&endpoint_id).cloned() else {
            return Outcome::default();
        };
        let undo = Undo {
            endpoints: vec![(endpoint_id, Some(old))],
            ..Undo::default()
        };
        // Only ever shrinks the maps and releases numbers: nothing can fail.
        self.transact(undo, |e, work| {
            e.remove_endpoint(endpoint_id, work);
        })
        .expect("a leave only removes")
    }

    /// Endpoint `endpoint_id` gets `labels` (with [`super::NAMESPACE_LABEL`], as it was
    /// created with).
    pub fn relabel(&mut self, endpoint_id: u32, labels: Labels) -> Result<Outcome, PolicyError> {
        let Some(old) = self.endpoints.get(&endpoint_id).cloned() else {
            return Err(invalid_endpoint(endpoint_id, "is not known"));
        };
        let new = old.relabelled(&labels);
        self.replace_endpoint(old, new)
    }

    /// Endpoint `endpoint_id`'s named ports become `ports`.
    pub fn set_ports(
        &mut self,
        endpoint_id: u32,
        ports: NamedPorts,
    ) -> Result<Outcome, PolicyError> {
        let Some(old) = self.endpoints.get(&endpoint_id).cloned() else {
            return Err(invalid_endpoint(endpoint_id, "is not known"));
        };
        let new = old.clone().with_ports(ports);
        self.replace_endpoint(old, new)
    }

    /// Adds or replaces the policies of `upsert` and removes those named in `remove`
    /// (`(namespace, name)`; unknown names are ignored).
    pub fn update(
        &mut self,
        upsert: Vec<Policy>,
        remove: Vec<(String, String)>,
    ) -> Result<Outcome, PolicyError> {
        let mut undo = Undo::default();
        let mut seen = BTreeSet::new();
        for r in remove
            .iter()
            .cloned()
            .chain(upsert.iter().map(|p| (p.namespace.clone(), p.name.clone())))
        {
            if seen.insert(r.clone()) {
                let old = self.policies.get(&r).map(|s| s.policy.clone());
                undo.policies.push((r, old));
            }
        }
        self.transact(undo, |e, work| {
            for r in &remove {
                e.remove_policy(r, work);
            }
            for p in upsert {
                let r = (p.namespace.clone(), p.name.clone());
                e.remove_policy(&r, work);
                e.insert_policy(p, work);
            }
        })
    }

    /// Other nodes' addresses (underlay addresses, gateways, IPv6 router addresses)
    /// become `addresses`, replacing the set given before: they get the remote-node
    /// identity in the ipcache (unless an endpoint or the host has the address), and the
    /// rules that depend on the whole ipcache follow.
    pub fn set_remote_nodes(
        &mut self,
        addresses: BTreeSet<IpAddr>,
    ) -> Result<Outcome, PolicyError> {
        if addresses == self.remote_nodes {
            return Ok(Outcome::default());
        }
        let undo = Undo {
            remote_nodes: Some(self.remote_nodes.clone()),
            ..Undo::default()
        };
        self.transact(undo, |e, work| {
            let old = std::mem::replace(&mut e.remote_nodes, addresses);
            for a in old.symmetric_difference(&e.remote_nodes) {
                work.prefixes.insert(IpNet::from(*a));
            }
        })
    }

    /// Other nodes' addresses, as [`Self::set_remote_nodes`] last gave them.
    pub fn remote_nodes(&self) -> &BTreeSet<IpAddr> {
        &self.remote_nodes
    }

    /// Namespace `namespace`'s labels (as the operator set them) become `labels`.
    pub fn set_namespace_labels(
        &mut self,
        namespace: &str,
        labels: Labels,
    ) -> Result<Outcome, PolicyError> {
        let undo = Undo {
            namespaces: vec![(
                namespace.to_owned(),
                self.namespaces.get(namespace).cloned(),
            )],
            ..Undo::default()
        };
        self.transact(undo, |e, work| {
            e.namespaces.insert(namespace.to_owned(), labels);
            work.namespaces.insert(namespace.to_owned());
        })
    }

    fn replace_endpoint(
        &mut self,
        old: PolicyEndpoint,
        new: PolicyEndpoint,
    ) -> Result<Outcome, PolicyError> {
        let undo = Undo {
            endpoints: vec![(old.id, Some(old.clone()))],
            ..Undo::default()
        };
        self.transact(undo, |e, work| {
            e.remove_endpoint(old.id, work);
            e.insert_endpoint(new, work);
        })
    }

    /// Changes the inputs with `change`, then brings everything else up to date; on an
    /// error, restores the inputs of `undo` and rebuilds.
    fn transact(
        &mut self,
        undo: Undo,
        change: impl FnOnce(&mut Self, &mut Work),
    ) -> Result<Outcome, PolicyError> {
        let mut work = Work::default();
        change(self, &mut work);
        match self.reconcile(&mut work) {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                let saved = work
                    .saved
                    .take()
                    .unwrap_or_else(|| self.compiled.identities.clone());
                self.rollback(undo, saved);
                Err(e)
            }
        }
    }

    fn rollback(&mut self, undo: Undo, identities: IdentityAllocator) {
        for (id, ep) in undo.endpoints {
            match ep {
                Some(ep) => self.endpoints.insert(id, ep),
                None => self.endpoints.remove(&id),
            };
        }
        let mut policies: BTreeMap<PolicyRef, Policy> = std::mem::take(&mut self.policies)
            .into_iter()
            .map(|(r, s)| (r, s.policy))
            .collect();
        for (r, p) in undo.policies {
            match p {
                Some(p) => policies.insert(r, p),
                None => policies.remove(&r),
            };
        }
        for (ns, labels) in undo.namespaces {
            match labels {
                Some(l) => self.namespaces.insert(ns, l),
                None => self.namespaces.remove(&ns),
            };
        }
        if let Some(nodes) = undo.remote_nodes {
            self.remote_nodes = nodes;
        }
        let recompiled = self.recompiled;
        let generation = self.generation + 1;
        let rebuilt = Self::build(
            policies.into_values().collect(),
            std::mem::take(&mut self.namespaces),
            std::mem::take(&mut self.endpoints).into_values().collect(),
            identities,
            std::mem::take(&mut self.host_addrs),
            std::mem::take(&mut self.remote_nodes),
        )
        .expect("the inputs before the change compiled");
        *self = rebuilt;
        self.recompiled = recompiled;
        self.generation = generation;
    }

    // ------------------------------------------------------------ input changes

    fn insert_endpoint(&mut self, ep: PolicyEndpoint, work: &mut Work) {
        let key = (ep.namespace.clone(), ep.labels.clone());
        self.members.entry(key.clone()).or_default().insert(ep.id);
        work.labels.insert(key);
        for a in ep.addresses() {
            self.by_addr.entry(a).or_default().insert(ep.id);
            work.prefixes.insert(IpNet::from(a));
        }
        work.endpoints.insert(ep.id);
        work.ports_changed |= !ep.ports.is_empty();
        self.endpoints.insert(ep.id, ep);
    }

    fn remove_endpoint(&mut self, id: u32, work: &mut Work) {
        let Some(ep) = self.endpoints.remove(&id) else {
            return;
        };
        let addresses: Vec<IpAddr> = ep.addresses().collect();
        let key = (ep.namespace, ep.labels);
        if let Some(m) = self.members.get_mut(&key) {
            m.remove(&id);
            if m.is_empty() {
                self.members.remove(&key);
            }
        }
        work.labels.insert(key);
        for a in addresses {
            if let Some(ids) = self.by_addr.get_mut(&a) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_addr.remove(&a);
                }
            }
            work.prefixes.insert(IpNet::from(a));
        }
        work.endpoints.insert(id);
        work.ports_changed |= !ep.ports.is_empty();
    }

    fn insert_policy(&mut self, p: Policy, work: &mut Work) {
        for c in policy_cidrs(&p) {
            *self.cidr_refs.entry(c).or_default() += 1;
            work.cidrs.insert(c);
        }
        work.policy_names.insert(p.full_name());
        let r = (p.namespace.clone(), p.name.clone());
        work.policies.insert(r.clone());
        let mut selectors = Vec::new();
        let mut nets = Vec::new();
        for rule in all_rules(&p) {
            for peer in rule.peers.iter().flatten() {
                match peer {
                    Peer::Endpoints { namespaces, pods } => {
                        let k = (namespaces.clone(), pods.clone());
                        if !selectors.contains(&k) {
                            selectors.push(k);
                        }
                    }
                    Peer::Cidr { net, .. } => nets.push(*net),
                    Peer::Entity(_) => {}
                }
            }
        }
        self.policies.insert(
            r,
            PolicyState {
                policy: p,
                selectors,
                nets,
            },
        );
    }

    /// Removes policy `r` and its registrations; its identities are dirty.
    fn remove_policy(&mut self, r: &PolicyRef, work: &mut Work) {
        let Some(state) = self.policies.remove(r) else {
            return;
        };
        work.dirty.extend(self.selected(&state.policy));
        for c in policy_cidrs(&state.policy) {
            if let Some(n) = self.cidr_refs.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.cidr_refs.remove(&c);
                }
            }
            work.cidrs.insert(c);
        }
        work.policy_names.insert(state.policy.full_name());
        for k in &state.selectors {
            if let Some(s) = self.selectors.get_mut(k) {
                s.users.remove(r);
                if s.users.is_empty() {
                    self.selectors.remove(k);
                }
            }
        }
        self.global.remove(r);
        self.named_egress.remove(r);
        work.policies.remove(r);
    }

    // ------------------------------------------------------------ bringing up to date

    fn reconcile(&mut self, work: &mut Work) -> Result<Outcome, PolicyError> {
        let (added, removed) = self.settle(work)?;
        let identities_changed = work.saved.is_some();
        self.generation += u64::from(identities_changed);

        // Policies added or replaced: their selectors, their dependencies, what they
        // select.
        for r in std::mem::take(&mut work.policies) {
            self.register_policy(&r, work);
        }

        // Selectors against the identities that came and went, and against the
        // namespaces whose labels changed.
        let mut changed_users = BTreeSet::new();
        for id in &removed {
            for s in self.selectors.values_mut() {
                if s.matched.remove(id) {
                    changed_users.extend(s.users.iter().cloned());
                }
            }
        }
        let mut rematch: Vec<u32> = added.clone();
        for ns in &work.namespaces {
            rematch.extend(self.ns_identities.get(ns).into_iter().flatten().copied());
        }
        for id in rematch {
            let state = &self.identities[&id];
            let ns_labels = namespace_labels(&state.namespace, &self.namespaces);
            for (k, s) in self.selectors.iter_mut() {
                let m = sel_matches(k, &state.namespace, &ns_labels, &state.labels);
                let changed = if m {
                    s.matched.insert(id)
                } else {
                    s.matched.remove(&id)
                };
                if changed {
                    changed_users.extend(s.users.iter().cloned());
                }
            }
        }
        for r in changed_users {
            if let Some(s) = self.policies.get(&r) {
                work.dirty.extend(self.selected(&s.policy));
            }
        }
        work.dirty.extend(added.iter().copied());

        // The ipcache.
        let mut ipcache_changes: BTreeMap<IpNet, Option<u32>> = BTreeMap::new();
        for c in &work.cidrs {
            work.prefixes.insert(*c);
        }
        let mut identity_set_changed = false;
        for prefix in &work.prefixes {
            let new = self.ipcache_value(prefix);
            let old = self.compiled.ipcache.get(prefix).copied();
            if new == old {
                continue;
            }
            ipcache_changes.insert(*prefix, new);
            if let Some(o) = old {
                let n = self.identity_counts.get_mut(&o).expect("counted");
                *n -= 1;
                if *n == 0 {
                    self.identity_counts.remove(&o);
                    identity_set_changed = true;
                }
                self.compiled.ipcache.remove(prefix);
            }
            if let Some(n) = new {
                let c = self.identity_counts.entry(n).or_default();
                *c += 1;
                identity_set_changed |= *c == 1;
                self.compiled.ipcache.insert(*prefix, n);
            }
        }
        check_ipcache_capacity(&self.compiled.ipcache)?;

        // Rules depending on the whole ipcache, and named egress ports.
        let mut touched: Vec<PolicyRef> = Vec::new();
        for r in &self.global {
            let s = &self.policies[r];
            // `cluster` covers every label identity, even one whose addresses another
            // endpoint's hide in the ipcache.
            if identity_set_changed
                || !added.is_empty()
                || !removed.is_empty()
                || s.nets
                    .iter()
                    .any(|n| ipcache_changes.keys().any(|p| n.contains(p)))
            {
                touched.push(r.clone());
            }
        }
        if work.ports_changed {
            touched.extend(self.named_egress.iter().cloned());
        }
        for r in touched {
            work.dirty.extend(self.selected(&self.policies[&r].policy));
        }

        // Templates.
        let mut cache = HashMap::new();
        for id in &work.dirty {
            let Some(state) = self.identities.get(id) else {
                continue;
            };
            let template = self.template(&state.namespace, &state.labels, &mut cache);
            self.recompiled += 1;
            let state = self.identities.get_mut(id).expect("looked up above");
            if state.template != template {
                state.template = template;
                let key = (state.namespace.clone(), state.labels.clone());
                work.endpoints
                    .extend(self.members.get(&key).into_iter().flatten().copied());
            }
        }

        // Entries and flags of the endpoints concerned.
        let mut entries_set = BTreeMap::new();
        let mut entries_del = BTreeSet::new();
        let mut flags_set = BTreeMap::new();
        let mut added_keys = 0usize;
        for ep in &work.endpoints {
            if self.endpoints.get(ep).is_some_and(|e| e.remote) {
                continue;
            }
            let low = PolicyKey {
                endpoint_id: *ep,
                identity: 0,
                dport: 0,
                proto: 0,
                direction: 0,
            };
            let high = PolicyKey {
                endpoint_id: *ep,
                identity: u32::MAX,
                dport: u16::MAX,
                proto: u8::MAX,
                direction: u8::MAX,
            };
            let old: BTreeMap<PolicyKey, PolicyEntry> = self
                .compiled
                .entries
                .range(low..=high)
                .map(|(k, v)| (*k, *v))
                .collect();
            let (new, flags) = match self.endpoints.get(ep) {
                Some(e) => {
                    let t = &self.identities[&self.ep_identity[ep]].template;
                    (materialize(e, t), Some(t.flags))
                }
                None => (BTreeMap::new(), None),
            };
            for (k, v) in &new {
                match old.get(k) {
                    Some(o) if o == v => {}
                    Some(_) => {
                        entries_set.insert(*k, *v);
                    }
                    None => {
                        entries_set.insert(*k, *v);
                        added_keys += 1;
                    }
                }
            }
            for k in old.keys() {
                if !new.contains_key(k) {
                    entries_del.insert(*k);
                }
            }
            if let Some(f) = flags
                && self.flags(*ep) != f
            {
                flags_set.insert(*ep, f);
            }
        }
        if self.compiled.entries.len() + added_keys - entries_del.len()
            > MAX_POLICY_ENTRIES as usize
        {
            return Err(PolicyError::Capacity {
                map: maps::POLICY,
                capacity: MAX_POLICY_ENTRIES,
            });
        }
        for (k, v) in &entries_set {
            self.compiled.entries.insert(*k, *v);
        }
        for k in &entries_del {
            self.compiled.entries.remove(k);
        }
        for ep in &work.endpoints {
            match self.endpoints.get(ep) {
                Some(e) if e.remote => {}
                Some(_) => {
                    let f = self.identities[&self.ep_identity[ep]].template.flags;
                    self.compiled.endpoint_flags.insert(*ep, f);
                }
                None => {
                    self.compiled.endpoint_flags.remove(ep);
                }
            }
        }

        let mut diff = PolicyDiff::default();
        for (net, id) in ipcache_changes {
            match id {
                Some(id) => diff.ipcache_set.push((net, id)),
                None => diff.ipcache_del.push(net),
            }
        }
        diff.entries_set = entries_set.into_iter().collect();
        diff.entries_del = entries_del.into_iter().collect();
        diff.flags_set = flags_set.into_iter().collect();
        Ok(Outcome {
            diff,
            identities_changed,
        })
    }

    /// Releases and allocates numbers for what `work` touched, in the order
    /// [`IdentityAllocator::sync`] does; returns the label identities added and removed.
    fn settle(&mut self, work: &mut Work) -> Result<(Vec<u32>, Vec<u32>), PolicyError> {
        let mut removed = Vec::new();
        for key in &work.labels {
            if !self.members.contains_key(key)
                && let Some(id) = self.label_ids.remove(key)
            {
                snapshot(&mut work.saved, &self.compiled.identities);
                self.compiled.identities.release(id);
                self.identities.remove(&id);
                if let Some(ids) = self.ns_identities.get_mut(&key.0) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.ns_identities.remove(&key.0);
                    }
                }
                removed.push(id);
            }
        }
        for c in &work.cidrs {
            if !self.cidr_refs.contains_key(c)
                && let Some(id) = self.cidr_ids.remove(c)
            {
                snapshot(&mut work.saved, &self.compiled.identities);
                self.compiled.identities.release(id);
            }
        }
        for name in &work.policy_names {
            let (ns, n) = name.split_once('/').expect("namespace/name");
            if !self.policies.contains_key(&(ns.to_owned(), n.to_owned()))
                && let Some(id) = self.policy_ids.remove(name)
            {
                snapshot(&mut work.saved, &self.compiled.identities);
                self.compiled.identities.release_policy(id);
                self.compiled.policies.remove(&id);
            }
        }
        let mut added = Vec::new();
        for key in &work.labels {
            if self.members.contains_key(key) && !self.label_ids.contains_key(key) {
                snapshot(&mut work.saved, &self.compiled.identities);
                let id = self.compiled.identities.allocate(IdentitySource::Labels {
                    namespace: key.0.clone(),
                    labels: key.1.clone(),
                })?;
                self.label_ids.insert(key.clone(), id);
                self.identities.insert(
                    id,
                    IdentityState {
                        namespace: key.0.clone(),
                        labels: key.1.clone(),
                        template: Template::default(),
                    },
                );
                self.ns_identities
                    .entry(key.0.clone())
                    .or_default()
                    .insert(id);
                added.push(id);
            }
        }
        for c in &work.cidrs {
            if self.cidr_refs.contains_key(c) && !self.cidr_ids.contains_key(c) {
                snapshot(&mut work.saved, &self.compiled.identities);
                let id = self
                    .compiled
                    .identities
                    .allocate(IdentitySource::Cidr(*c))?;
                self.cidr_ids.insert(*c, id);
            }
        }
        for name in &work.policy_names {
            let (ns, n) = name.split_once('/').expect("namespace/name");
            if self.policies.contains_key(&(ns.to_owned(), n.to_owned()))
                && !self.policy_ids.contains_key(name)
            {
                snapshot(&mut work.saved, &self.compiled.identities);
                let id = self.compiled.identities.allocate_policy(name)?;
                self.policy_ids.insert(name.clone(), id);
                self.compiled.policies.insert(id, name.clone());
            }
        }
        for ep in &work.endpoints {
            match self.endpoints.get(ep) {
                Some(e) => {
                    let id = self.label_ids[&(e.namespace.clone(), e.labels.clone())];
                    self.ep_identity.insert(*ep, id);
                }
                None => {
                    self.ep_identity.remove(ep);
                }
            }
        }
        Ok((added, removed))
    }

    /// Registers policy `r`'s selectors and dependencies; what it selects is dirty.
    fn register_policy(&mut self, r: &PolicyRef, work: &mut Work) {
        let Some(state) = self.policies.get(r) else {
            return;
        };
        for k in &state.selectors {
            if !self.selectors.contains_key(k) {
                let mut matched = BTreeSet::new();
                let candidates: Box<dyn Iterator<Item = &u32>> = match &k.0 {
                    NamespaceScope::Named(ns) => {
                        Box::new(self.ns_identities.get(ns).into_iter().flatten())
                    }
                    NamespaceScope::Selected(_) => Box::new(self.identities.keys()),
                };
                for id in candidates {
                    let s = &self.identities[id];
                    let ns_labels = namespace_labels(&s.namespace, &self.namespaces);
                    if sel_matches(k, &s.namespace, &ns_labels, &s.labels) {
                        matched.insert(*id);
                    }
                }
                self.selectors.insert(
                    k.clone(),
                    SelState {
                        matched,
                        users: BTreeSet::new(),
                    },
                );
            }
            self.selectors
                .get_mut(k)
                .expect("inserted above")
                .users
                .insert(r.clone());
        }
        let p = &state.policy;
        let global = all_rules(p)
            .flat_map(|rule| rule.peers.iter().flatten())
            .any(|peer| {
                matches!(
                    peer,
                    Peer::Cidr { .. } | Peer::Entity(Entity::World | Entity::Cluster)
                )
            });
        if global {
            self.global.insert(r.clone());
        }
        if p.egress
            .allow
            .iter()
            .chain(&p.egress.deny)
            .any(|rule| !rule.named_ports.is_empty())
        {
            self.named_egress.insert(r.clone());
        }
        work.dirty.extend(self.selected(p));
    }

    /// The label identities policy `p` selects.
    fn selected(&self, p: &Policy) -> Vec<u32> {
        self.ns_identities
            .get(&p.namespace)
            .into_iter()
            .flatten()
            .copied()
            .filter(|id| p.subject.matches(&self.identities[id].labels))
            .collect()
    }

    fn ipcache_value(&self, prefix: &IpNet) -> Option<u32> {
        if prefix.prefix_len() == prefix.max_prefix_len() {
            if let Some(ep) = self.by_addr.get(&prefix.addr()).and_then(|ids| {
                ids.iter()
                    .rev()
                    .find(|id| !self.endpoints[*id].remote)
                    .or(ids.last())
            }) {
                return self.ep_identity.get(ep).copied().or_else(|| {
                    let e = &self.endpoints[ep];
                    self.label_ids
                        .get(&(e.namespace.clone(), e.labels.clone()))
                        .copied()
                });
            }
            if self.host_addrs.contains(&prefix.addr()) {
                return Some(IDENTITY_HOST);
            }
            if self.remote_nodes.contains(&prefix.addr()) {
                return Some(IDENTITY_REMOTE_NODE);
            }
        }
        if let Some(id) = self.cidr_ids.get(prefix) {
            return Some(*id);
        }
        worlds()
            .into_iter()
            .find(|(w, _)| w == prefix)
            .map(|(_, id)| id)
    }

    /// Identity `(namespace, labels)`'s template: `compile`'s loop body for one endpoint,
    /// without the endpoint.
    fn template(
        &self,
        namespace: &str,
        labels: &Labels,
        cache: &mut HashMap<(PolicyRef, u8, bool, usize), BTreeSet<u32>>,
    ) -> Template {
        let selecting: Vec<(&PolicyRef, &Policy)> = self
            .policies
            .range((namespace.to_owned(), String::new())..)
            .take_while(|(r, _)| r.0 == namespace)
            .filter(|(_, s)| s.policy.subject.matches(labels))
            .map(|(r, s)| (r, &s.policy))
            .collect();
        let mut t = Template::default();
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let isolating = selecting.iter().filter(|(_, p)| direction(p, dir).isolate);
            let isolating: Vec<&Policy> = isolating.map(|(_, p)| *p).collect();
            let denying: Vec<&Policy> = selecting
                .iter()
                .filter(|(_, p)| !direction(p, dir).deny.is_empty())
                .map(|(_, p)| *p)
                .collect();
            if isolating.is_empty() && denying.is_empty() {
                continue;
            }
            let (policy_flag, audit_flag) = if dir == DIR_INGRESS {
                (ENDPOINT_F_INGRESS_POLICY, ENDPOINT_F_INGRESS_AUDIT)
            } else {
                (ENDPOINT_F_EGRESS_POLICY, ENDPOINT_F_EGRESS_AUDIT)
            };
            t.flags |= policy_flag;
            let deciding = if isolating.is_empty() {
                &denying
            } else {
                &isolating
            };
            let all_audit = deciding.iter().all(|p| p.audit);
            if all_audit {
                t.flags |= audit_flag;
            }
            if isolating.is_empty() {
                merge(
                    &mut t.base,
                    (IDENTITY_ANY, 0, 0, dir),
                    entry(0, POLICY_ALLOW, 0),
                );
            } else if dir == DIR_INGRESS {
                merge(
                    &mut t.base,
                    (IDENTITY_HOST, 0, 0, dir),
                    entry(0, POLICY_ALLOW, 0),
                );
            }
            for (r, p) in &selecting {
                let policy_id = self.policy_ids[&p.full_name()];
                let entry_flags = if p.audit { POLICY_F_AUDIT } else { 0 };
                let rules = direction(p, dir);
                let mut lists: Vec<(bool, &Vec<Rule>)> = vec![(true, &rules.deny)];
                if !p.audit || all_audit {
                    lists.push((false, &rules.allow));
                }
                for (deny, list) in lists {
                    let action = if deny { POLICY_DENY } else { POLICY_ALLOW };
                    let e = entry(policy_id, action, entry_flags);
                    for (j, rule) in list.iter().enumerate() {
                        let idents = cache
                            .entry(((*r).clone(), dir, deny, j))
                            .or_insert_with(|| self.rule_identities(rule));
                        let ports = if rule.named_ports.is_empty() {
                            expand_ports(rule.ports.as_deref())
                        } else if dir == DIR_INGRESS {
                            let numeric = rule_ports(rule, BTreeSet::new());
                            t.named.push(NamedRule {
                                identities: idents.iter().copied().collect(),
                                named: rule.named_ports.clone(),
                                wild: numeric
                                    .iter()
                                    .filter(|(_, port)| *port == 0)
                                    .map(|(proto, _)| *proto)
                                    .collect(),
                                entry: e,
                                policy: p.full_name(),
                            });
                            numeric
                        } else {
                            let peers = self.peer_ports(idents);
                            for n in &rule.named_ports {
                                if resolve_named(std::slice::from_ref(n), peers.iter().copied())
                                    .is_empty()
                                {
                                    t.unresolved.insert(format!(
                                        "egress port '{}' of {}",
                                        n.name,
                                        p.full_name()
                                    ));
                                }
                            }
                            rule_ports(rule, resolve_named(&rule.named_ports, peers))
                        };
                        for identity in idents.iter() {
                            for (proto, dport) in &ports {
                                merge(&mut t.base, (*identity, *dport, *proto, dir), e);
                            }
                        }
                    }
                }
            }
        }
        t
    }

    /// The named ports of the endpoints with one of `identities` (every endpoint for
    /// [`IDENTITY_ANY`]).
    fn peer_ports(&self, identities: &BTreeSet<u32>) -> Vec<&NamedPorts> {
        if identities.contains(&IDENTITY_ANY) {
            return self.endpoints.values().map(|e| &e.ports).collect();
        }
        let mut out = Vec::new();
        for id in identities {
            if let Some(s) = self.identities.get(id) {
                let key = (s.namespace.clone(), s.labels.clone());
                for ep in self.members.get(&key).into_iter().flatten() {
                    out.push(&self.endpoints[ep].ports);
                }
            }
        }
        out
    }

    /// The remote identities a rule covers; `{IDENTITY_ANY}` when it covers them all (as
    /// `compile`'s).
    fn rule_identities(&self, rule: &Rule) -> BTreeSet<u32> {
        let Some(peers) = &rule.peers else {
            return BTreeSet::from([IDENTITY_ANY]);
        };
        let mut ids = BTreeSet::new();
        for peer in peers {
            match peer {
                Peer::Endpoints { namespaces, pods } => {
                    let k = (namespaces.clone(), pods.clone());
                    if let Some(s) = self.selectors.get(&k) {
                        ids.extend(s.matched.iter().copied());
                    }
                }
                Peer::Cidr { net, except } => {
                    ids.extend(super::compile::cidr_identities(
                        &self.compiled.ipcache,
                        net,
                        except,
                    ));
                }
                Peer::Entity(Entity::All) => return BTreeSet::from([IDENTITY_ANY]),
                Peer::Entity(Entity::Host) => {
                    ids.insert(IDENTITY_HOST);
                }
                Peer::Entity(Entity::RemoteNode) => {
                    ids.insert(IDENTITY_REMOTE_NODE);
                }
                Peer::Entity(Entity::Cluster) => {
                    ids.insert(IDENTITY_HOST);
                    ids.insert(IDENTITY_REMOTE_NODE);
                    ids.extend(self.ep_identity.values().copied());
                }
                Peer::Entity(Entity::World) => {
                    ids.extend(self.identity_counts.keys().filter(|i| {
                        **i != IDENTITY_HOST
                            && **i != IDENTITY_REMOTE_NODE
                            && !self.identities.contains_key(i)
                    }));
                }
            }
        }
        if !ids.is_empty()
            && ids.len() >= self.identity_counts.len()
            && self.identity_counts.keys().all(|i| ids.contains(i))
        {
            return BTreeSet::from([IDENTITY_ANY]);
        }
        ids
    }
}

/// The policy prefixes of `p` that get a CIDR identity.
fn policy_cidrs(p: &Policy) -> BTreeSet<IpNet> {
    let mut out = BTreeSet::new();
    for rule in all_rules(p) {
        for peer in rule.peers.iter().flatten() {
            if let Peer::Cidr { net, except } = peer {
                out.insert(*net);
                out.extend(except.iter().copied());
            }
        }
    }
    for (w, _) in worlds() {
        out.remove(&w);
    }
    out
}

fn snapshot(saved: &mut Option<IdentityAllocator>, current: &IdentityAllocator) {
    if saved.is_none() {
        *saved = Some(current.clone());
    }
}

fn sel_matches(k: &SelKey, namespace: &str, ns_labels: &Labels, labels: &Labels) -> bool {
    let ns_ok = match &k.0 {
        NamespaceScope::Named(n) => n == namespace,
        NamespaceScope::Selected(sel) => sel.matches(ns_labels),
    };
    ns_ok && k.1.matches(labels)
}

fn entry(policy_id: u32, action: u8, flags: u8) -> PolicyEntry {
    PolicyEntry {
        policy_id,
        action,
        flags,
        _pad: 0,
    }
}

fn merge<K: Ord>(map: &mut BTreeMap<K, PolicyEntry>, key: K, new: PolicyEntry) {
    match map.get_mut(&key) {
        Some(old) => {
            if wins(&new, old) {
                *old = new;
            }
        }
        None => {
            map.insert(key, new);
        }
    }
}

/// Endpoint `e`'s entries: its identity's template with its id, and its ingress named
/// ports.
fn materialize(e: &PolicyEndpoint, t: &Template) -> BTreeMap<PolicyKey, PolicyEntry> {
    let key = |(identity, dport, proto, direction): TKey| PolicyKey {
        endpoint_id: e.id,
        identity,
        dport,
        proto,
        direction,
    };
    let mut out: BTreeMap<PolicyKey, PolicyEntry> =
        t.base.iter().map(|(k, v)| (key(*k), *v)).collect();
    for rule in &t.named {
        for (proto, port) in resolve_named(&rule.named, [&e.ports]) {
            if rule.wild.contains(&proto) {
                continue;
            }
            for identity in &rule.identities {
                merge(
                    &mut out,
                    key((*identity, port, proto, DIR_INGRESS)),
                    rule.entry,
                );
            }
        }
    }
    out
}

fn invalid_endpoint(id: u32, what: &str) -> PolicyError {
    PolicyError::Invalid {
        source_name: format!("endpoint {id}"),
        message: format!("endpoint {id} {what}"),
    }
}
