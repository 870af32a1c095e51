//! Services in the control plane: the service documents the agent holds (from the API,
//! its watched directory or the cluster store), their ClusterIPs and NodePorts, the
//! backends the cluster's endpoints give them, and the load-balancer maps that follow.
//!
//! The state sits behind its own lock ([`ServiceControl::state`]), held only for
//! in-memory work. Changes are serialised by a second lock ([`ServiceControl::program`])
//! that is held while a diff is computed and written: readers (`list_services`, the
//! monitor's `service_of_backend`, metrics) never wait for map writes.
//!
//! Every change re-plans only the services it touches (`service::plan` over them and the
//! endpoints of their namespaces) and diffs the result per frontend against what is
//! installed: unchanged frontends cost a comparison, no write. Ids are stable: a service
//! id per frontend (address, port, protocol, scope), a backend id per (address, port,
//! protocol), kept while used, reused after, and read back from the maps at start so that
//! a restarted agent keeps established flows and affinities valid.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use hypha_api::{
    ApplyServicesResponse, PolicySource, ServiceBackendInfo, ServiceInfo, ServicePortInfo,
};
use hypha_common::lb::{
    LB_BACKEND_F_LOCAL, LB_F_AFFINITY, LB_F_NODEPORT, LB_MAGLEV_SIZE, LB_SCOPE_INTERNAL,
    LbBackendStats, LbService, MAX_LB_BACKENDS, MAX_LB_BACKENDS_PER_SERVICE, MAX_LB_SERVICES,
};

use super::{Agent, ControlError, RemoteBatch, ServiceTxn};
use crate::datapath::{Datapath, InstalledLb, LbBackendSpec, LbDiff, LbFrontendKey, MaglevTable};
use crate::host::HostNetwork;
use crate::policy::{PROTO_TCP, PROTO_UDP, PolicyEndpoint};
use crate::service::{
    self, Document, EndpointSlice, Frontend, Pod, Service, ServiceCidrs, ServiceType, Taken,
    TargetPort,
};
use crate::state::{Change, EndpointRecord, PolicyOrigin, StoredService, StoredSlice};

#[cfg(test)]
#[path = "services_tests.rs"]
mod tests;

/// A backend's identity for its id: (address, port, protocol).
type BackendKey = (IpAddr, u16, u8);

/// Numbers handed out per key, kept while the key is in use, the lowest free one reused
/// after. Ids freed while a diff is computed are reusable only once it is written
/// ([`IdPool::settle`]), so that one diff never removes what it also gives a new owner.
#[derive(Debug)]
struct IdPool<K> {
    by_key: HashMap<K, u32>,
    /// The ids `by_key` holds.
    used: std::collections::HashSet<u32>,
    free: BTreeSet<u32>,
    freed: Vec<u32>,
    /// The next never-used id.
    next: u32,
    max: u32,
}

impl<K: std::hash::Hash + Eq + Clone> IdPool<K> {
    fn new(max: u32) -> Self {
        Self {
            by_key: HashMap::new(),
            used: std::collections::HashSet::new(),
            free: BTreeSet::new(),
            freed: Vec::new(),
            next: 1,
            max,
        }
    }

    /// Takes `id` for `key` (an id found in the maps at start).
    fn adopt(&mut self, key: K, id: u32) {
        if id == 0 || id > self.max || !self.used.insert(id) {
            return;
        }
        self.by_key.insert(key, id);
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
        }
        self.free.remove(&id);
    }

    fn get(&self, key: &K) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// `key`'s id, given one if it has none; `None` when every id is taken.
    fn take(&mut self, key: &K) -> Option<u32> {
        if let Some(id) = self.by_key.get(key) {
            return Some(*id);
        }
        let id = match self.free.pop_first() {
            Some(id) => id,
            None if self.next <= self.max => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        self.by_key.insert(key.clone(), id);
        self.used.insert(id);
        Some(id)
    }

    fn release(&mut self, key: &K) {
        if let Some(id) = self.by_key.remove(key) {
            self.used.remove(&id);
            self.freed.push(id);
        }
    }

    /// Makes the ids released since the last call reusable.
    fn settle(&mut self) {
        self.free.extend(self.freed.drain(..));
    }

    fn in_use(&self) -> usize {
        self.by_key.len()
    }
}

/// A frontend as the maps hold it.
#[derive(Debug)]
struct Installed {
    /// What the plan made of it; `None` for a frontend found in the maps at start and
    /// not planned since.
    frontend: Option<Frontend>,
    value: LbService,
    /// Its backends' ids, in the plan's order (the Maglev table's input); `None` when
    /// unknown (found at start).
    backends: Option<Vec<u32>>,
}

/// What the agent holds about services.
#[derive(Debug)]
pub(super) struct ServiceState {
    services: BTreeMap<String, StoredService>,
    slices: BTreeMap<String, StoredSlice>,
    taken: Taken,
    node_addrs: Vec<IpAddr>,
    service_ids: IdPool<LbFrontendKey>,
    backend_ids: IdPool<BackendKey>,
    installed: HashMap<LbFrontendKey, Installed>,
    /// Backends in the maps, with the frontends using them.
    backends: HashMap<u32, (LbBackendSpec, BTreeSet<LbFrontendKey>)>,
    /// The frontends of each service (`namespace/name`).
    by_service: HashMap<String, BTreeSet<LbFrontendKey>>,
    /// Maglev tables found at start, by service id: a frontend whose table is the same is
    /// not rewritten.
    start_tables: HashMap<u32, MaglevTable>,
    /// A write failed: the next re-plan reads the maps back and re-plans everything.
    resync: bool,
    /// Refused files of the watched directory, with why.
    dir_errors: BTreeMap<PathBuf, String>,
}

/// The service state and the lock that serialises programming.
pub(super) struct ServiceControl {
    state: Mutex<ServiceState>,
    /// Held while a change is computed and written to the maps (never by readers).
    program: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ServiceState {
    /// From the saved documents and what the maps hold: ids are taken from the maps.
    fn new(services: Vec<StoredService>, slices: Vec<StoredSlice>, installed: InstalledLb) -> Self {
        let mut st = ServiceState {
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            taken: Taken::default(),
            node_addrs: Vec::new(),
            service_ids: IdPool::new(MAX_LB_SERVICES),
            backend_ids: IdPool::new(MAX_LB_BACKENDS),
            installed: HashMap::new(),
            backends: HashMap::new(),
            by_service: HashMap::new(),
            start_tables: HashMap::new(),
            resync: false,
            dir_errors: BTreeMap::new(),
        };
        for s in services {
            st.taken.hold(&s.service);
            st.services.insert(s.service.key(), s);
        }
        for s in slices {
            st.slices.insert(s.slice.key(), s);
        }
        st.adopt(installed);
        st
    }

    /// Takes over what the maps hold (start, or a resync after a failed write).
    fn adopt(&mut self, installed: InstalledLb) {
        for (key, value) in installed.services {
            self.service_ids.adopt(key, value.id);
            self.installed.insert(
                key,
                Installed {
                    frontend: None,
                    value,
                    backends: None,
                },
            );
        }
        for (id, spec) in installed.backends {
            self.backend_ids
                .adopt((spec.addr, spec.port, spec.proto), id);
            self.backends.insert(id, (spec, BTreeSet::new()));
        }
        self.start_tables = installed.maglev.into_iter().collect();
    }

    /// The services (and slices) to plan: `only`'s, or all.
    fn selection(&self, only: Option<&BTreeSet<String>>) -> (Vec<Service>, Vec<EndpointSlice>) {
        match only {
            None => (
                self.services.values().map(|s| s.service.clone()).collect(),
                self.slices.values().map(|s| s.slice.clone()).collect(),
            ),
            Some(keys) => (
                keys.iter()
                    .filter_map(|k| self.services.get(k))
                    .map(|s| s.service.clone())
                    .collect(),
                self.slices
                    .values()
                    .filter(|s| keys.contains(&slice_service(&s.slice)))
                    .map(|s| s.slice.clone())
                    .collect(),
            ),
        }
    }

    /// The diff that makes the maps hold `plan` for the services `only` (all with
    /// `None`: every other frontend and unused backend goes too), and the installed
    /// view updated to it.
    fn diff(&mut self, plan: Vec<Frontend>, only: Option<&BTreeSet<String>>) -> LbDiff {
        let mut d = LbDiff::default();
        let mut wanted: HashMap<LbFrontendKey, Frontend> = HashMap::with_capacity(plan.len());
        for mut f in plan {
            if f.backends.len() > MAX_LB_BACKENDS_PER_SERVICE as usize {
                tracing::warn!(
                    "service {} port {}: {} backends, only the first {MAX_LB_BACKENDS_PER_SERVICE} are used",
                    f.service,
                    f.port,
                    f.backends.len()
                );
                f.backends.truncate(MAX_LB_BACKENDS_PER_SERVICE as usize);
            }
            wanted.insert(frontend_key(&f), f);
        }
        // The frontends now there that the plan covers.
        let old: Vec<LbFrontendKey> = match only {
            None => self.installed.keys().copied().collect(),
            Some(keys) => keys
                .iter()
                .filter_map(|k| self.by_service.get(k))
                .flatten()
                .copied()
                .collect(),
        };
        let mut touched_backends: BTreeSet<u32> = BTreeSet::new();
        for key in old {
            if wanted.contains_key(&key) {
                continue;
            }
            let Some(gone) = self.installed.remove(&key) else {
                continue;
            };
            d.services_del.push(key);
            if gone.value.count > 0 || self.start_tables.contains_key(&gone.value.id) {
                d.maglev_del.push(gone.value.id);
            }
            self.start_tables.remove(&gone.value.id);
            if gone.value.flags & LB_F_AFFINITY != 0 {
                d.affinity_del.push(gone.value.id);
            }
            for id in gone.backends.unwrap_or_default() {
                if let Some((_, users)) = self.backends.get_mut(&id) {
                    users.remove(&key);
                    touched_backends.insert(id);
                }
            }
            if let Some(f) = gone.frontend
                && let Some(set) = self.by_service.get_mut(&f.service)
            {
                set.remove(&key);
                if set.is_empty() {
                    self.by_service.remove(&f.service);
                }
            }
            self.service_ids.release(&key);
        }
        let mut wanted: Vec<(LbFrontendKey, Frontend)> = wanted.into_iter().collect();
        wanted.sort_by_key(|(k, _)| *k);
        for (key, f) in wanted {
            self.plan_frontend(key, f, &mut d, &mut touched_backends);
        }
        if only.is_none() {
            touched_backends.extend(self.backends.keys().copied());
            // Frontends found at start that no service has any more are gone above;
            // their tables too.
            for (id, _) in self.start_tables.drain() {
                if !self.installed.values().any(|i| i.value.id == id) {
                    d.maglev_del.push(id);
                }
            }
        }
        for id in touched_backends {
            if let Some((spec, users)) = self.backends.get(&id)
                && users.is_empty()
            {
                let spec = *spec;
                self.backends.remove(&id);
                self.backend_ids
                    .release(&(spec.addr, spec.port, spec.proto));
                d.backends_del.push((id, spec));
            }
        }
        self.service_ids.settle();
        self.backend_ids.settle();
        d
    }

    /// Adds to `d` what frontend `f` needs written.
    fn plan_frontend(
        &mut self,
        key: LbFrontendKey,
        f: Frontend,
        d: &mut LbDiff,
        touched: &mut BTreeSet<u32>,
    ) {
        let Some(id) = self.service_ids.take(&key) else {
            tracing::warn!(
                "service {}: {}:{} not programmed: all {MAX_LB_SERVICES} service ids are taken",
                f.service,
                f.addr,
                f.port
            );
            return;
        };
        let mut ids = Vec::with_capacity(f.backends.len());
        for b in &f.backends {
            let spec = LbBackendSpec {
                addr: b.addr,
                port: b.port,
                proto: f.proto,
                flags: if b.local { LB_BACKEND_F_LOCAL } else { 0 },
                node_id: 0,
            };
            let Some(bid) = self.backend_ids.take(&(b.addr, b.port, f.proto)) else {
                tracing::warn!(
                    "service {}: backend {}:{} left out: all {MAX_LB_BACKENDS} backend ids are taken",
                    f.service,
                    b.addr,
                    b.port
                );
                continue;
            };
            match self.backends.entry(bid) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert((spec, BTreeSet::from([key])));
                    d.backends_set.push((bid, spec));
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    let (have, users) = o.get_mut();
                    if *have != spec {
                        *have = spec;
                        d.backends_set.push((bid, spec));
                    }
                    users.insert(key);
                }
            }
            ids.push(bid);
        }
        let value = LbService {
            id,
            count: ids.len() as u32,
            flags: f.flags,
            affinity_timeout_s: f.affinity_timeout_s,
        };
        let previous = self.installed.get(&key);
        let old_ids: Option<Vec<u32>> = previous.and_then(|p| p.backends.clone());
        let had_table = previous.is_some_and(|p| p.value.count > 0 && p.value.id == id)
            || self.start_tables.contains_key(&id);
        if !ids.is_empty() {
            let same = old_ids.as_ref() == Some(&ids) && had_table;
            if !same {
                let table = maglev_table(&f, &ids);
                let unchanged = self.start_tables.get(&id).is_some_and(|t| *t == table);
                if !unchanged {
                    d.maglev_set.push((id, table));
                }
            }
        } else if had_table {
            d.maglev_del.push(id);
        }
        self.start_tables.remove(&id);
        if previous.map(|p| p.value) != Some(value) {
            d.services_set.push((key, value));
        }
        for old in old_ids.unwrap_or_default() {
            if !ids.contains(&old)
                && let Some((_, users)) = self.backends.get_mut(&old)
            {
                users.remove(&key);
                touched.insert(old);
            }
        }
        self.by_service
            .entry(f.service.clone())
            .or_default()
            .insert(key);
        self.installed.insert(
            key,
            Installed {
                frontend: Some(f),
                value,
                backends: Some(ids),
            },
        );
    }
}

fn frontend_key(f: &Frontend) -> LbFrontendKey {
    LbFrontendKey {
        addr: f.addr,
        port: f.port,
        proto: f.proto,
        scope: f.scope,
    }
}

/// The Maglev table of `f`, whose backends have ids `ids` (in order).
fn maglev_table(f: &Frontend, ids: &[u32]) -> MaglevTable {
    let names: Vec<String> = f
        .backends
        .iter()
        .map(|b| format!("{}:{}", b.addr, b.port))
        .collect();
    service::maglev(&names, LB_MAGLEV_SIZE)
        .into_iter()
        .map(|i| ids.get(i as usize).copied().unwrap_or(ids[0]))
        .collect()
}

/// `namespace/service` of the service a slice serves.
fn slice_service(s: &EndpointSlice) -> String {
    format!("{}/{}", s.namespace, s.service)
}

fn proto_name(p: u8) -> String {
    match p {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        other => other.to_string(),
    }
}

fn target_port(t: &TargetPort) -> String {
    match t {
        TargetPort::Number(n) => n.to_string(),
        TargetPort::Name(n) => n.clone(),
    }
}

/// The model's errors as the API's: allocation conflicts are 409, the rest 400.
fn model_error(e: service::ServiceError) -> ControlError {
    match &e {
        service::ServiceError::Allocation { message, .. }
            if message.contains("taken") || message.contains("held") =>
        {
            ControlError::Conflict(e.to_string())
        }
        _ => ControlError::BadRequest(e.to_string()),
    }
}

/// The documents of parsed files, each with its file's name.
type Parsed = (Vec<(String, Service)>, Vec<(String, EndpointSlice)>);

/// Documents as they would be stored (by `namespace/name`), and the services whose
/// allocation changed in the state's [`Taken`] (for [`restore_taken`]).
type Allocated = (
    BTreeMap<String, StoredService>,
    BTreeMap<String, StoredSlice>,
    BTreeSet<String>,
);

/// Puts `taken` back to what `services` hold, for the services `touched` (an allocation
/// that failed, or that only computed what would be taken).
fn restore_taken(
    taken: &mut Taken,
    services: &BTreeMap<String, StoredService>,
    touched: &BTreeSet<String>,
) {
    // All released first: a touched service may hold what another one held before.
    for key in touched {
        taken.release(key);
    }
    for key in touched {
        if let Some(s) = services.get(key) {
            taken.hold(&s.service);
        }
    }
}

/// How many times a cluster-mode change is retried when the store changed under it.
const STORE_RETRIES: usize = 8;

fn parse_files(files: &[(String, &str)]) -> Result<Parsed, ControlError> {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for (source, content) in files {
        for doc in service::parse_file(source, content).map_err(model_error)? {
            match doc {
                Document::Service(s) => services.push((source.clone(), s)),
                Document::Slice(s) => {
                    let n = s.endpoints.iter().filter(|e| e.ready).count();
                    if n > MAX_LB_BACKENDS_PER_SERVICE as usize {
                        return Err(ControlError::BadRequest(format!(
                            "{source}: EndpointSlice {}: {n} ready endpoints; a service takes at most {MAX_LB_BACKENDS_PER_SERVICE}",
                            s.key()
                        )));
                    }
                    slices.push((source.clone(), s));
                }
            }
        }
    }
    Ok((services, slices))
}

impl ServiceControl {
    pub(super) fn start(
        services: Vec<StoredService>,
        slices: Vec<StoredSlice>,
        installed: InstalledLb,
    ) -> Self {
        Self {
            state: Mutex::new(ServiceState::new(services, slices, installed)),
            program: Mutex::new(()),
        }
    }
}

/// Applies one kind's cluster batch (services or slices) to its map `stored`: the
/// store's entries (`is_cluster`: origin `Cluster`) it removes, or with `resync`
/// leaves out, go; each upsert (keyed by `key`) that differs from what is stored
/// replaces it. `changed` hears of each: the key, the old entry if any, the new one
/// (`None` when removed). Entries of another origin are never removed; an upsert
/// replaces them (the store's win over a watched file's).
fn apply_cluster_batch<T, S: PartialEq>(
    stored: &mut BTreeMap<String, S>,
    batch: RemoteBatch<T>,
    key: impl Fn(&T) -> String,
    wrap: impl Fn(T) -> S,
    is_cluster: impl Fn(&S) -> bool,
    mut changed: impl FnMut(&str, Option<S>, Option<&S>),
) {
    let incoming: BTreeMap<String, S> = batch
        .upserts
        .into_iter()
        .map(|t| (key(&t), wrap(t)))
        .collect();
    let removes: Vec<String> = if batch.resync {
        stored
            .iter()
            .filter(|(k, s)| is_cluster(s) && !incoming.contains_key(*k))
            .map(|(k, _)| k.clone())
            .collect()
    } else {
        batch.removes
    };
    for k in removes {
        if stored.get(&k).is_some_and(&is_cluster)
            && let Some(s) = stored.remove(&k)
        {
            changed(&k, Some(s), None);
        }
    }
    for (k, s) in incoming {
        if stored.get(&k) == Some(&s) {
            continue;
        }
        let old = stored.remove(&k);
        changed(&k, old, Some(&s));
        stored.insert(k, s);
    }
}

/// What [`Agent::stage_services`] changes.
#[derive(Default)]
struct Staged {
    changes: Vec<Change>,
    affected: BTreeSet<String>,
    applied: Vec<String>,
    slices: Vec<String>,
}

impl<D: Datapath, H: HostNetwork> Agent<D, H> {
    fn service_state(&self) -> MutexGuard<'_, ServiceState> {
        lock(&self.services.state)
    }

    /// Every endpoint of the cluster that backend selection sees (only those of
    /// `namespaces`, if given). Takes the endpoint table's lock, then the policy lock,
    /// never both.
    fn service_pods(&self, namespaces: Option<&BTreeSet<String>>) -> Vec<Pod> {
        let node = self
            .config
            .cluster
            .as_ref()
            .map(|c| c.node_name.clone())
            .unwrap_or_default();
        let wanted = |ns: &str| namespaces.is_none_or(|set| set.contains(ns));
        let mut pods: Vec<Pod> = self
            .table()
            .endpoints
            .values()
            .filter_map(|ep| {
                let pe = PolicyEndpoint::new(ep.id, std::net::Ipv4Addr::UNSPECIFIED, &ep.labels);
                wanted(&pe.namespace).then(|| local_pod(ep, pe, &node))
            })
            .collect();
        if self.cluster().is_some() {
            let p = self.policy();
            for (key, (_, e)) in &p.remote {
                if !wanted(&e.namespace) {
                    continue;
                }
                pods.push(Pod {
                    name: format!("{}/{}", e.node, key.rsplit('/').nth(1).unwrap_or(key)),
                    namespace: e.namespace.clone(),
                    labels: super::policy::selector_labels(&e.labels),
                    addresses: e.addresses().collect(),
                    node: e.node.clone(),
                    local: false,
                    ports: e
                        .ports
                        .iter()
                        .map(|p| (p.name.clone(), (p.protocol, p.port)))
                        .collect(),
                });
            }
        }
        pods
    }

    /// Re-plans the services `only` (all with `None`) and writes the difference; returns
    /// how long the writes took, in microseconds.
    pub(super) fn replan_services(
        &self,
        only: Option<&BTreeSet<String>>,
    ) -> Result<u64, ControlError> {
        let _program = lock(&self.services.program);
        self.replan_locked(only)
    }

    /// [`Self::replan_services`] with the programming lock held by the caller.
    fn replan_locked(&self, only: Option<&BTreeSet<String>>) -> Result<u64, ControlError> {
        let resync = self.service_state().resync;
        let only = if resync { None } else { only };
        if resync {
            let installed = self
                .datapath
                .installed_lb()
                .map_err(|e| ControlError::Datapath(e.to_string()))?;
            let mut st = self.service_state();
            st.installed.clear();
            st.backends.clear();
            st.by_service.clear();
            st.adopt(installed);
            st.resync = false;
        }
        let (services, slices, node_addrs) = {
            let st = self.service_state();
            let (services, slices) = st.selection(only);
            (services, slices, st.node_addrs.clone())
        };
        if services.is_empty() && only.is_some_and(|o| o.iter().all(|k| !self.has_frontends(k))) {
            return Ok(0);
        }
        let namespaces: BTreeSet<String> = services.iter().map(|s| s.namespace.clone()).collect();
        let pods = self.service_pods(only.map(|_| &namespaces));
        let plan = service::plan(&services, &slices, &pods, &node_addrs);
        let diff = self.service_state().diff(plan, only);
        if diff.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let errors = self.datapath.apply_lb(&diff);
        let took = started.elapsed().as_micros() as u64;
        if !errors.is_empty() {
            self.service_state().resync = true;
            let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return Err(ControlError::Datapath(format!(
                "cannot write the load balancer's maps: {}",
                all.join("; ")
            )));
        }
        Ok(took)
    }

    fn has_frontends(&self, service: &str) -> bool {
        self.service_state().by_service.contains_key(service)
    }

    /// Start: the first plan of every service, which also removes what an earlier agent
    /// left that no service wants.
    pub(super) fn start_services(&self, warnings: &mut Vec<String>) {
        if let Err(e) = self.replan_services(None) {
            warnings.push(format!("cannot program the services: {e}"));
        }
    }

    /// Endpoints of `namespaces` came, went, or changed labels or named ports: their
    /// services follow. Failures are logged (the endpoint change stands).
    pub(super) fn services_follow(&self, namespaces: impl IntoIterator<Item = String>) {
        let only: BTreeSet<String> = {
            let st = self.service_state();
            let mut keys = BTreeSet::new();
            for ns in namespaces {
                let prefix = format!("{ns}/");
                keys.extend(
                    st.services
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                        .filter(|(_, s)| s.service.selector.is_some())
                        .map(|(k, _)| k.clone()),
                );
            }
            keys
        };
        if only.is_empty() {
            return;
        }
        if let Err(e) = self.replan_services(Some(&only)) {
            tracing::warn!("services after an endpoint change: {e}");
        }
    }

    /// The namespace of a local endpoint, as selectors see it.
    pub(super) fn endpoint_namespace(ep: &EndpointRecord) -> String {
        PolicyEndpoint::new(ep.id, std::net::Ipv4Addr::UNSPECIFIED, &ep.labels).namespace
    }

    /// Stages documents from `origin`: validates and allocates against the state (held
    /// locked by the caller), and on success changes it. `replace` (a watched file) also
    /// removes every document `origin` gave before and does not give now.
    /// Validates `parsed` against the state and allocates ClusterIPs and NodePorts:
    /// the documents as they would be stored, and what would then be taken.
    ///
    /// The allocation is made in `st.taken` itself (a copy would cost more than the
    /// change at 10,000 services); on an error it is put back.
    fn allocate_services(
        &self,
        st: &mut ServiceState,
        parsed: Parsed,
        origin: &dyn Fn(&str) -> PolicyOrigin,
    ) -> Result<Allocated, ControlError> {
        let mut touched = BTreeSet::new();
        let allocated = self.allocate_in(st, parsed, origin, &mut touched);
        if allocated.is_err() {
            restore_taken(&mut st.taken, &st.services, &touched);
        }
        allocated
    }

    fn allocate_in(
        &self,
        st: &mut ServiceState,
        parsed: Parsed,
        origin: &dyn Fn(&str) -> PolicyOrigin,
        touched: &mut BTreeSet<String>,
    ) -> Result<Allocated, ControlError> {
        let (services, slices) = parsed;
        let taken = &mut st.taken;
        let mut new_services: BTreeMap<String, StoredService> = BTreeMap::new();
        let cidrs: ServiceCidrs = self.config.service_cidrs;
        for (source, mut svc) in services {
            let key = svc.key();
            if let Some(old) = st.services.get(&key) {
                check_origin(&key, "service", &old.origin, &origin(&source))?;
                keep_allocation(&old.service, &mut svc);
            }
            // What it held before (or what an earlier document of this batch took) is
            // its own to keep or give up.
            touched.insert(key.clone());
            taken.release(&key);
            service::assign(&cidrs, taken, &mut svc).map_err(model_error)?;
            // Through the index, so that the next `assign` looks up rather than scans.
            taken.hold(&svc);
            new_services.insert(
                key,
                StoredService {
                    service: svc,
                    origin: origin(&source),
                },
            );
        }
        let mut new_slices: BTreeMap<String, StoredSlice> = BTreeMap::new();
        for (source, slice) in slices {
            let key = slice.key();
            if let Some(old) = st.slices.get(&key) {
                check_origin(&key, "EndpointSlice", &old.origin, &origin(&source))?;
            }
            new_slices.insert(
                key,
                StoredSlice {
                    slice,
                    origin: origin(&source),
                },
            );
        }
        Ok((new_services, new_slices, std::mem::take(touched)))
    }

    /// Stages documents from `origin`: validates and allocates against the state (held
    /// locked by the caller), and on success changes it. `replace` (a watched file) also
    /// removes every document `origin` gave before and does not give now.
    fn stage_services(
        &self,
        st: &mut ServiceState,
        parsed: Parsed,
        origin: &dyn Fn(&str) -> PolicyOrigin,
        replace: Option<&PolicyOrigin>,
    ) -> Result<Staged, ControlError> {
        let (new_services, new_slices, _) = self.allocate_services(st, parsed, origin)?;
        let mut staged = Staged {
            changes: Vec::new(),
            affected: BTreeSet::new(),
            applied: new_services.keys().cloned().collect(),
            slices: new_slices.keys().cloned().collect(),
        };
        if let Some(from) = replace {
            let gone: Vec<String> = st
                .services
                .iter()
                .filter(|(k, s)| s.origin == *from && !new_services.contains_key(*k))
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                if let Some(s) = st.services.remove(&k) {
                    st.taken.release(&k);
                    staged.changes.push(Change::ServiceGone {
                        namespace: s.service.namespace.clone(),
                        name: s.service.name.clone(),
                    });
                    staged.affected.insert(k);
                }
            }
            let gone: Vec<String> = st
                .slices
                .iter()
                .filter(|(k, s)| s.origin == *from && !new_slices.contains_key(*k))
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                if let Some(s) = st.slices.remove(&k) {
                    staged.affected.insert(slice_service(&s.slice));
                    staged.changes.push(Change::SliceGone {
                        namespace: s.slice.namespace.clone(),
                        name: s.slice.name.clone(),
                    });
                }
            }
        }
        for (k, s) in new_services {
            if st.services.get(&k) != Some(&s) {
                staged.changes.push(Change::Service(s.clone()));
                staged.affected.insert(k.clone());
            }
            st.services.insert(k, s);
        }
        for (k, s) in new_slices {
            if st.slices.get(&k) != Some(&s) {
                staged.affected.insert(slice_service(&s.slice));
                // The slice's old service, if it moved to another.
                if let Some(old) = st.slices.get(&k) {
                    staged.affected.insert(slice_service(&old.slice));
                }
                staged.changes.push(Change::Slice(s.clone()));
            }
            st.slices.insert(k, s);
        }
        Ok(staged)
    }

    /// Persists and programs staged changes (the programming lock held by the caller).
    fn commit_services(&self, staged: Staged) -> Result<u64, ControlError> {
        let pending = (!staged.changes.is_empty()).then(|| self.store.submit(staged.changes));
        let took = if staged.affected.is_empty() {
            0
        } else {
            self.replan_locked(Some(&staged.affected))?
        };
        if let Some(p) = pending {
            p.wait()?;
        }
        Ok(took)
    }

    /// `POST /v1/services`: parses every file (whole files or nothing), assigns
    /// ClusterIPs and NodePorts, stores the services (the cluster store in cluster mode)
    /// and returns once this node's maps hold them. Sources are `api: <file>`.
    pub fn apply_services(
        &self,
        files: &[PolicySource],
    ) -> Result<ApplyServicesResponse, ControlError> {
        let texts: Vec<(String, &str)> = files
            .iter()
            .map(|f| (f.source.clone(), f.content.as_str()))
            .collect();
        let parsed = parse_files(&texts)?;
        if let Some(link) = self.cluster() {
            return self.apply_services_cluster(link.as_ref(), parsed);
        }
        let _program = lock(&self.services.program);
        let staged = {
            let mut st = self.service_state();
            self.stage_services(&mut st, parsed, &|s| PolicyOrigin::Api(s.to_owned()), None)?
        };
        let (applied, slices) = (staged.applied.clone(), staged.slices.clone());
        let program_us = self.commit_services(staged)?;
        Ok(ApplyServicesResponse {
            applied,
            slices,
            program_us,
        })
    }

    /// The watched directory: `path` now holds `content` (`None`: the file is gone).
    /// Everything that came from `path` before is replaced by what it holds now (whole
    /// file or nothing: a refused file keeps what it gave before). Returns the
    /// `namespace/name`s now from `path`.
    pub fn sync_service_file(
        &self,
        path: &Path,
        content: Option<&str>,
    ) -> Result<Vec<String>, ControlError> {
        let origin = PolicyOrigin::Dir(path.to_owned());
        let parsed = match content {
            Some(text) => match parse_files(&[(path.display().to_string(), text)]) {
                Ok(p) => p,
                Err(e) => {
                    self.service_state()
                        .dir_errors
                        .insert(path.to_owned(), e.to_string());
                    return Err(e);
                }
            },
            None => (Vec::new(), Vec::new()),
        };
        let _program = lock(&self.services.program);
        let staged = {
            let mut st = self.service_state();
            match self.stage_services(&mut st, parsed, &|_| origin.clone(), Some(&origin)) {
                Ok(s) => {
                    st.dir_errors.remove(path);
                    s
                }
                Err(e) => {
                    st.dir_errors.insert(path.to_owned(), e.to_string());
                    return Err(e);
                }
            }
        };
        let mut names = staged.applied.clone();
        names.extend(staged.slices.iter().cloned());
        self.commit_services(staged)?;
        Ok(names)
    }

    /// `DELETE /v1/services/{namespace}/{name}`: removes the service (or the
    /// `EndpointSlice` of that name when no service has it) and its frontends.
    pub fn delete_service(&self, namespace: &str, name: &str) -> Result<(), ControlError> {
        let key = format!("{namespace}/{name}");
        if let Some(link) = self.cluster() {
            return self.delete_service_cluster(link.as_ref(), namespace, name);
        }
        let _program = lock(&self.services.program);
        let staged = {
            let mut st = self.service_state();
            let mut staged = Staged::default();
            if let Some(s) = st.services.get(&key) {
                if let PolicyOrigin::Dir(p) = &s.origin {
                    return Err(ControlError::Conflict(format!(
                        "service {key} comes from {} in the watched directory; remove it there",
                        p.display()
                    )));
                }
                st.services.remove(&key);
                st.taken.release(&key);
                staged.changes.push(Change::ServiceGone {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                });
                staged.affected.insert(key);
            } else if let Some(s) = st.slices.get(&key) {
                if let PolicyOrigin::Dir(p) = &s.origin {
                    return Err(ControlError::Conflict(format!(
                        "EndpointSlice {key} comes from {} in the watched directory; remove it there",
                        p.display()
                    )));
                }
                let s = st.slices.remove(&key).expect("just found");
                staged.affected.insert(slice_service(&s.slice));
                staged.changes.push(Change::SliceGone {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                });
            } else {
                return Err(ControlError::NotFound(format!(
                    "no service or EndpointSlice {key}"
                )));
            }
            staged
        };
        self.commit_services(staged).map(|_| ())
    }

    /// Cluster mode: allocates against the store's services as this node sees them and
    /// writes them in one conditional transaction; when another node was faster (a key
    /// or a claim changed), allocates again on the newer view. Returns once this node
    /// programs them.
    fn apply_services_cluster(
        &self,
        link: &dyn super::ClusterLink,
        parsed: Parsed,
    ) -> Result<ApplyServicesResponse, ControlError> {
        let started = Instant::now();
        for _ in 0..STORE_RETRIES {
            let (txn, applied, slices) = {
                let mut guard = self.service_state();
                let st = &mut *guard;
                let (services, new_slices, touched) =
                    self.allocate_services(st, parsed.clone(), &|_| PolicyOrigin::Cluster)?;
                // Only computed here: this node takes them when the store says so.
                restore_taken(&mut st.taken, &st.services, &touched);
                let applied: Vec<String> = services.keys().cloned().collect();
                let slices: Vec<String> = new_slices.keys().cloned().collect();
                let txn = ServiceTxn {
                    put: services
                        .into_iter()
                        .map(|(k, s)| (s.service, st.services.get(&k).map(|o| o.service.clone())))
                        .collect(),
                    put_slices: new_slices.into_values().map(|s| s.slice).collect(),
                    ..ServiceTxn::default()
                };
                (txn, applied, slices)
            };
            match link.publish_services(txn) {
                Ok(true) => {
                    return Ok(ApplyServicesResponse {
                        applied,
                        slices,
                        program_us: started.elapsed().as_micros() as u64,
                    });
                }
                Ok(false) => continue,
                Err(e) => {
                    return Err(ControlError::Unavailable(format!(
                        "cannot apply the services: {e}"
                    )));
                }
            }
        }
        Err(ControlError::Conflict(format!(
            "the cluster store's services kept changing while this node allocated (tried {STORE_RETRIES} times); apply again"
        )))
    }

    /// Cluster mode: deletes a service (with its claims) or an `EndpointSlice` from the
    /// store, if it is still as this node sees it.
    fn delete_service_cluster(
        &self,
        link: &dyn super::ClusterLink,
        namespace: &str,
        name: &str,
    ) -> Result<(), ControlError> {
        let key = format!("{namespace}/{name}");
        for _ in 0..STORE_RETRIES {
            let txn = {
                let st = self.service_state();
                if let Some(s) = st.services.get(&key) {
                    if let PolicyOrigin::Dir(p) = &s.origin {
                        return Err(ControlError::Conflict(format!(
                            "service {key} comes from {} in the watched directory; remove it there",
                            p.display()
                        )));
                    }
                    ServiceTxn {
                        delete: vec![s.service.clone()],
                        ..ServiceTxn::default()
                    }
                } else if st.slices.contains_key(&key) {
                    ServiceTxn {
                        delete_slices: vec![(namespace.to_owned(), name.to_owned())],
                        ..ServiceTxn::default()
                    }
                } else {
                    return Err(ControlError::NotFound(format!(
                        "no service or EndpointSlice {key}"
                    )));
                }
            };
            match link.publish_services(txn) {
                Ok(true) => return Ok(()),
                Ok(false) => continue,
                Err(e) => {
                    return Err(ControlError::Unavailable(format!(
                        "cannot delete service {key}: {e}"
                    )));
                }
            }
        }
        Err(ControlError::Conflict(format!(
            "service {key} kept changing in the cluster store; delete it again"
        )))
    }

    /// Cluster mode: the store's services and slices (origin `Cluster`; the store's
    /// win over a watched file's of the same name). With `resync` a batch is the whole
    /// set: store services and slices not in it go. Re-plans what changed.
    pub fn apply_cluster_services(
        &self,
        services: Option<RemoteBatch<Service>>,
        slices: Option<RemoteBatch<EndpointSlice>>,
    ) -> Result<(), ControlError> {
        let _program = lock(&self.services.program);
        let staged = {
            let mut guard = self.service_state();
            let st = &mut *guard;
            let mut staged = Staged::default();
            if let Some(b) = services {
                let taken = &mut st.taken;
                apply_cluster_batch(
                    &mut st.services,
                    b,
                    Service::key,
                    |service| StoredService {
                        service,
                        origin: PolicyOrigin::Cluster,
                    },
                    |s| s.origin == PolicyOrigin::Cluster,
                    |key, old, new| {
                        if old.is_some() {
                            taken.release(key);
                        }
                        match (old, new) {
                            (_, Some(new)) => {
                                taken.hold(&new.service);
                                staged.changes.push(Change::Service(new.clone()));
                            }
                            (Some(old), None) => staged.changes.push(Change::ServiceGone {
                                namespace: old.service.namespace,
                                name: old.service.name,
                            }),
                            (None, None) => return,
                        }
                        staged.affected.insert(key.to_owned());
                    },
                );
            }
            if let Some(b) = slices {
                apply_cluster_batch(
                    &mut st.slices,
                    b,
                    EndpointSlice::key,
                    |slice| StoredSlice {
                        slice,
                        origin: PolicyOrigin::Cluster,
                    },
                    |s| s.origin == PolicyOrigin::Cluster,
                    |_, old, new| {
                        if let Some(old) = &old {
                            staged.affected.insert(slice_service(&old.slice));
                        }
                        match (old, new) {
                            (_, Some(new)) => {
                                staged.affected.insert(slice_service(&new.slice));
                                staged.changes.push(Change::Slice(new.clone()));
                            }
                            (Some(old), None) => staged.changes.push(Change::SliceGone {
                                namespace: old.slice.namespace,
                                name: old.slice.name,
                            }),
                            (None, None) => {}
                        }
                    },
                );
            }
            staged
        };
        self.commit_services(staged).map(|_| ())
    }

    /// Backend counters by backend id (empty when they cannot be read).
    fn backend_counters(&self) -> HashMap<u32, LbBackendStats> {
        match self.datapath.lb_stats() {
            Ok(v) => v.into_iter().collect(),
            Err(e) => {
                tracing::warn!("cannot read the service backends' counters: {e}");
                HashMap::new()
            }
        }
    }

    /// `GET /v1/services`: every service with its ports, backends and counters.
    pub fn list_services(&self) -> Vec<ServiceInfo> {
        let counters = self.backend_counters();
        let st = self.service_state();
        st.services
            .values()
            .map(|s| describe(&st, s, &counters))
            .collect()
    }

    /// The service a translated flow went to, for `hypha monitor`: `namespace/name
    /// VIP:port` of the frontend whose backend is `addr:port`/`proto`, if any.
    pub fn service_of_backend(&self, addr: IpAddr, port: u16, proto: u8) -> Option<String> {
        let st = self.service_state();
        let id = st.backend_ids.get(&(addr, port, proto))?;
        let (_, users) = st.backends.get(&id)?;
        let frontends = users
            .iter()
            .filter_map(|k| st.installed.get(k)?.frontend.as_ref());
        let mut best: Option<&Frontend> = None;
        for f in frontends {
            let clusterip = f.scope == LB_SCOPE_INTERNAL && f.flags & LB_F_NODEPORT == 0;
            if best.is_none() || clusterip {
                best = Some(f);
                if clusterip {
                    break;
                }
            }
        }
        let f = best?;
        Some(match f.addr {
            IpAddr::V4(a) => format!("{} {a}:{}", f.service, f.port),
            IpAddr::V6(a) => format!("{} [{a}]:{}", f.service, f.port),
        })
    }

    /// The addresses of the node's NodePort devices: NodePort frontends are programmed
    /// on each. Re-plans the frontends.
    pub fn set_nodeport_addresses(&self, addresses: Vec<IpAddr>) {
        let nodeports: BTreeSet<String> = {
            let mut st = self.service_state();
            if st.node_addrs == addresses {
                return;
            }
            st.node_addrs = addresses;
            st.services
                .iter()
                .filter(|(_, s)| s.service.kind == ServiceType::NodePort)
                .map(|(k, _)| k.clone())
                .collect()
        };
        if nodeports.is_empty() {
            return;
        }
        if let Err(e) = self.replan_services(Some(&nodeports)) {
            tracing::warn!("NodePort frontends after a change of node addresses: {e}");
        }
    }

    /// Prometheus text of the services' counters (`hypha_service_backend_*`).
    pub fn service_metrics(&self) -> String {
        use std::fmt::Write as _;
        let counters = self.backend_counters();
        let st = self.service_state();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP hypha_services Services the agent holds.\n# TYPE hypha_services gauge\nhypha_services {}",
            st.services.len()
        );
        let _ = writeln!(
            out,
            "# HELP hypha_service_frontends Frontends programmed (ClusterIP and NodePort, per scope).\n# TYPE hypha_service_frontends gauge\nhypha_service_frontends {}",
            st.installed.len()
        );
        let _ = writeln!(
            out,
            "# HELP hypha_service_backends Backends programmed.\n# TYPE hypha_service_backends gauge\nhypha_service_backends {}",
            st.backend_ids.in_use()
        );
        let mut rows: BTreeMap<(String, String, String), LbBackendStats> = BTreeMap::new();
        for inst in st.installed.values() {
            let (Some(f), Some(ids)) = (&inst.frontend, &inst.backends) else {
                continue;
            };
            if f.scope != LB_SCOPE_INTERNAL || f.flags & LB_F_NODEPORT != 0 {
                continue;
            }
            for (b, id) in f.backends.iter().zip(ids) {
                let backend = match b.addr {
                    IpAddr::V4(a) => format!("{a}:{}", b.port),
                    IpAddr::V6(a) => format!("[{a}]:{}", b.port),
                };
                let port = if f.port_name.is_empty() {
                    f.port.to_string()
                } else {
                    f.port_name.clone()
                };
                rows.insert(
                    (f.service.clone(), port, backend),
                    counters.get(id).copied().unwrap_or_default(),
                );
            }
        }
        for (name, help, get) in [
            (
                "hypha_service_backend_connections_total",
                "Connections (and UDP sends) translated to a service backend.",
                (|s: &LbBackendStats| s.connections) as fn(&LbBackendStats) -> u64,
            ),
            (
                "hypha_service_backend_packets_total",
                "Packets translated per packet (NodePort) to a service backend.",
                |s: &LbBackendStats| s.packets,
            ),
            (
                "hypha_service_backend_bytes_total",
                "Bytes translated per packet (NodePort) to a service backend.",
                |s: &LbBackendStats| s.bytes,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((service, port, backend), s) in &rows {
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{service}\",port=\"{port}\",backend=\"{backend}\"}} {}",
                    get(s)
                );
            }
        }
        out
    }
}

/// A refused change of a document held from elsewhere: the API may not replace one of
/// the watched directory, nor one file of the directory another's.
fn check_origin(
    key: &str,
    what: &str,
    held: &PolicyOrigin,
    new: &PolicyOrigin,
) -> Result<(), ControlError> {
    match (held, new) {
        (PolicyOrigin::Dir(p), PolicyOrigin::Dir(q)) if p != q => Err(ControlError::Conflict(
            format!("{what} {key} already comes from {}", p.display()),
        )),
        (PolicyOrigin::Dir(p), PolicyOrigin::Api(_)) => Err(ControlError::Conflict(format!(
            "{what} {key} comes from {} in the watched directory; change that file instead",
            p.display()
        ))),
        (PolicyOrigin::Api(_), PolicyOrigin::Dir(q)) => Err(ControlError::Conflict(format!(
            "{what} {key} of {} is held by the API ({held}); delete it there first",
            q.display()
        ))),
        _ => Ok(()),
    }
}

/// An update keeps the ClusterIPs and NodePorts its service has when it asks for none.
fn keep_allocation(old: &Service, new: &mut Service) {
    if new.cluster_ips.is_empty() && old.ip_families == new.ip_families {
        new.cluster_ips = old.cluster_ips.clone();
    }
    if new.kind == ServiceType::NodePort {
        for p in &mut new.ports {
            if p.node_port.is_none() {
                p.node_port = old
                    .ports
                    .iter()
                    .find(|o| o.name == p.name && o.protocol == p.protocol)
                    .and_then(|o| o.node_port);
            }
        }
    }
}

/// A local endpoint as backend selection sees it.
fn local_pod(ep: &EndpointRecord, pe: PolicyEndpoint, node: &str) -> Pod {
    Pod {
        name: if node.is_empty() {
            ep.container_id.clone()
        } else {
            format!("{node}/{}", ep.container_id)
        },
        namespace: pe.namespace,
        labels: pe.labels,
        addresses: ep.addresses().collect(),
        node: node.to_owned(),
        local: true,
        ports: ep
            .ports
            .iter()
            .filter_map(|p| {
                let proto = crate::policy::port_protocol(&p.protocol)?;
                Some((p.name.clone(), (proto, p.port)))
            })
            .collect(),
    }
}

/// `GET /v1/services`' view of one service.
fn describe(
    st: &ServiceState,
    s: &StoredService,
    counters: &HashMap<u32, LbBackendStats>,
) -> ServiceInfo {
    let svc = &s.service;
    let key = svc.key();
    let frontends: Vec<&Installed> = st
        .by_service
        .get(&key)
        .into_iter()
        .flatten()
        .filter_map(|k| st.installed.get(k))
        .collect();
    let ports = svc
        .ports
        .iter()
        .map(|p| {
            let mut backends: BTreeMap<(IpAddr, u16), ServiceBackendInfo> = BTreeMap::new();
            for inst in &frontends {
                let (Some(f), Some(ids)) = (&inst.frontend, &inst.backends) else {
                    continue;
                };
                if f.port_name != p.name
                    || f.proto != p.protocol
                    || f.scope != LB_SCOPE_INTERNAL
                    || f.flags & LB_F_NODEPORT != 0
                {
                    continue;
                }
                for (b, id) in f.backends.iter().zip(ids) {
                    let c = counters.get(id).copied().unwrap_or_default();
                    backends
                        .entry((b.addr, b.port))
                        .or_insert_with(|| ServiceBackendInfo {
                            address: b.addr,
                            port: b.port,
                            node: b.node.clone(),
                            pod: b.pod.clone(),
                            connections: c.connections,
                            packets: c.packets,
                            bytes: c.bytes,
                        });
                }
            }
            ServicePortInfo {
                name: p.name.clone(),
                protocol: proto_name(p.protocol),
                port: p.port,
                target_port: target_port(&p.target_port),
                node_port: p.node_port,
                backends: backends.into_values().collect(),
            }
        })
        .collect();
    ServiceInfo {
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        kind: match svc.kind {
            ServiceType::ClusterIP => "ClusterIP".into(),
            ServiceType::NodePort => "NodePort".into(),
        },
        cluster_ips: svc.cluster_ips.clone(),
        ports,
        session_affinity_timeout: svc.session_affinity,
        external_traffic_policy: if svc.external_local {
            "Local"
        } else {
            "Cluster"
        }
        .into(),
        internal_traffic_policy: if svc.internal_local {
            "Local"
        } else {
            "Cluster"
        }
        .into(),
        source: match &s.origin {
            PolicyOrigin::Cluster => "store".into(),
            other => other.to_string(),
        },
    }
}
