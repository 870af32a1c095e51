//! The cluster runtime: what links an agent to the cluster store in cluster mode
//! (`--cluster-store`). It registers the node before the agent starts (its pod CIDRs
//! come from the store), then runs beside it on the tokio runtime:
//!
//! - the heartbeat of the node's lease (and its registration, when the store was
//!   unreachable at start and the agent came up from `cluster.json`);
//! - one mirror of the whole prefix, whose updates are split by key kind
//!   ([`dispatch`]) into the agent's batches, applied in order on a blocking thread; the
//!   applied revision is what `publish_*` wait for;
//! - the endpoint publisher: this node's `endpoints/<node>/` keys, written in batches
//!   (one transaction each) and reconciled against the agent's table after every full
//!   sync (missing or different written, strays deleted);
//! - the identity garbage collector.
//!
//! The agent reaches it through [`ClusterLink`]; it reaches the agent through
//! [`ClusterAgent`] (so that it can be tested without one). Stopping the agent stops the
//! tasks and leaves the lease to expire: the node stays registered (its CIDRs and
//! endpoints with it) and its pods keep running.

pub mod dispatch;
pub mod local;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use hypha_api::{ClusterStatus, NodeInfo, RemoveNodeResponse};
use hypha_cluster::layout::{EndpointEntry, Labels, Layout, NodeCidrs, now_ms};
use hypha_cluster::mirror::{self, SyncState, Update};
use hypha_cluster::node::{self, NodeSpec, Registration};
use hypha_cluster::{ClusterError, Compare, KvStore, Op, Revision, identity};
use tokio::sync::{mpsc, watch};

use crate::config::{ClusterConfig, PodCidrs};
use crate::control::{Agent, ClusterLink, ControlError, RemoteBatch, RemoteEndpoint, ServiceTxn};
use crate::datapath::Datapath;
use crate::host::HostNetwork;
use crate::overlay::ClusterNode;
use crate::policy::{Policy, PolicyEndpoint};
use crate::service::{EndpointSlice, Service};
use crate::state::EndpointRecord;
use dispatch::{Batches, View};
use local::LocalCluster;

/// How long registration at start waits for the store before an agent with saved CIDRs
/// starts from them.
pub const REGISTER_WAIT: Duration = Duration::from_secs(5);
/// How long `resolve_identity` and `publish_*` wait for the store (retries included).
pub const STORE_WAIT: Duration = Duration::from_secs(5);
/// Backoff between retries of an unreachable store.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Writes per transaction of the endpoint publisher (etcd refuses more than 128).
const TXN_OPS: usize = 100;
/// A node is stale (removable without `--force`) after this many lease lifetimes.
const STALE_TTLS: u32 = 3;

/// How long the runtime waits for the store (tests shorten them).
#[derive(Clone, Copy, Debug)]
pub struct Waits {
    /// See [`REGISTER_WAIT`].
    pub register: Duration,
    /// See [`STORE_WAIT`].
    pub store: Duration,
}

impl Default for Waits {
    fn default() -> Self {
        Waits {
            register: REGISTER_WAIT,
            store: STORE_WAIT,
        }
    }
}

/// What the runtime asks of the agent (implemented by [`Agent`]; by a recorder in tests).
pub trait ClusterAgent: Send + Sync {
    fn apply_identities(
        &self,
        batch: RemoteBatch<(u32, String, Labels)>,
    ) -> Result<(), ControlError>;
    fn apply_endpoints(&self, batch: RemoteBatch<RemoteEndpoint>) -> Result<(), ControlError>;
    fn apply_policies(&self, batch: RemoteBatch<Policy>) -> Result<(), ControlError>;
    fn apply_namespaces(&self, batch: RemoteBatch<(String, Labels)>) -> Result<(), ControlError>;
    /// Every node with pod CIDRs, whenever what routing needs of them changed.
    fn apply_nodes(&self, nodes: Vec<ClusterNode>) -> Result<(), ControlError>;
    /// Services and `EndpointSlice`s of the store (either batch may be absent).
    fn apply_services(
        &self,
        services: Option<RemoteBatch<Service>>,
        slices: Option<RemoteBatch<EndpointSlice>>,
    ) -> Result<(), ControlError>;
    fn local_endpoints(&self) -> Vec<(EndpointRecord, Option<u32>)>;
    fn remote_endpoint_count(&self) -> usize;
}

impl<D: Datapath + 'static, H: HostNetwork + 'static> ClusterAgent for Agent<D, H> {
    fn apply_identities(
        &self,
        batch: RemoteBatch<(u32, String, Labels)>,
    ) -> Result<(), ControlError> {
        self.apply_cluster_identities(batch)
    }
    fn apply_endpoints(&self, batch: RemoteBatch<RemoteEndpoint>) -> Result<(), ControlError> {
        self.apply_remote_endpoints(batch)
    }
    fn apply_policies(&self, batch: RemoteBatch<Policy>) -> Result<(), ControlError> {
        self.apply_cluster_policies(batch)
    }
    fn apply_namespaces(&self, batch: RemoteBatch<(String, Labels)>) -> Result<(), ControlError> {
        self.apply_cluster_namespaces(batch)
    }
    fn apply_nodes(&self, nodes: Vec<ClusterNode>) -> Result<(), ControlError> {
        self.apply_cluster_nodes(nodes)
    }
    fn apply_services(
        &self,
        services: Option<RemoteBatch<Service>>,
        slices: Option<RemoteBatch<EndpointSlice>>,
    ) -> Result<(), ControlError> {
        self.apply_cluster_services(services, slices)
    }
    fn local_endpoints(&self) -> Vec<(EndpointRecord, Option<u32>)> {
        Agent::local_endpoints(self)
    }
    fn remote_endpoint_count(&self) -> usize {
        Agent::remote_endpoint_count(self)
    }
}

/// Why the runtime cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Local(#[from] local::LocalError),
    #[error("registering node {node} in the cluster store {store}: {source}")]
    Register {
        node: String,
        store: String,
        #[source]
        source: ClusterError,
    },
    #[error("the cluster store gave node {0} no pod CIDR (the cluster CIDR plan has no family)")]
    NoCidr(String),
}

/// A change of this node's endpoint keys, for the publisher.
#[derive(Debug)]
enum Publish {
    Put(String, EndpointEntry),
    Delete(String),
    /// Compare the store's keys with the agent's table.
    Reconcile,
}

/// The cluster runtime (see the module's documentation).
pub struct Runtime {
    config: ClusterConfig,
    layout: Layout,
    store: Arc<dyn KvStore>,
    waits: Waits,
    handle: tokio::runtime::Handle,
    state_dir: PathBuf,
    local: Mutex<LocalCluster>,
    sync: Arc<Mutex<SyncState>>,
    view: Mutex<View>,
    applied: watch::Sender<Revision>,
    registration: Mutex<Option<Registration>>,
    /// Why the node is not (or no longer) registered, for status.
    node_error: Mutex<Option<String>>,
    publish_tx: mpsc::UnboundedSender<Publish>,
    publish_rx: Mutex<Option<mpsc::UnboundedReceiver<Publish>>>,
    agent: OnceLock<Weak<dyn ClusterAgent>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Runtime {
    /// Registers the node (see [`REGISTER_WAIT`]) and returns the runtime with the pod
    /// CIDRs the agent starts with. `NodeNameTaken`, `CidrExhausted` and other refusals
    /// are errors; an unreachable store is waited for, unless `cluster.json` has this
    /// node's CIDRs: then the agent starts with them and registers in the background.
    pub async fn connect(
        config: ClusterConfig,
        state_dir: &Path,
        store: Arc<dyn KvStore>,
    ) -> Result<(Arc<Runtime>, PodCidrs), RuntimeError> {
        Self::connect_with(config, state_dir, store, Waits::default()).await
    }

    /// [`Runtime::connect`] with other waits.
    pub async fn connect_with(
        config: ClusterConfig,
        state_dir: &Path,
        store: Arc<dyn KvStore>,
        waits: Waits,
    ) -> Result<(Arc<Runtime>, PodCidrs), RuntimeError> {
        let dir = state_dir.to_owned();
        let name = config.node_name.clone();
        let local = tokio::task::spawn_blocking(move || local::load_or_create(&dir, &name))
            .await
            .expect("reading cluster.json does not panic")?;
        let (publish_tx, publish_rx) = mpsc::unbounded_channel();
        let runtime = Arc::new(Runtime {
            layout: Layout::new(&config.prefix),
            config,
            store,
            waits,
            handle: tokio::runtime::Handle::current(),
            state_dir: state_dir.to_owned(),
            local: Mutex::new(local.clone()),
            sync: Arc::new(Mutex::new(SyncState::default())),
            view: Mutex::new(View::default()),
            applied: watch::Sender::new(0),
            registration: Mutex::new(None),
            node_error: Mutex::new(None),
            publish_tx,
            publish_rx: Mutex::new(Some(publish_rx)),
            agent: OnceLock::new(),
            tasks: Mutex::new(Vec::new()),
        });
        let saved = (local.cidrs.v4.is_some() || local.cidrs.v6.is_some()).then_some(local.cidrs);
        let deadline = tokio::time::Instant::now() + waits.register;
        let mut backoff = BACKOFF_FIRST;
        loop {
            let error = match runtime.register().await {
                Ok(cidrs) => {
                    let cidrs = runtime.pod_cidrs(&cidrs)?;
                    runtime.spawn_heartbeat();
                    return Ok((runtime.clone(), cidrs));
                }
                Err(e) if e.is_unavailable() => e,
                Err(source) => {
                    return Err(RuntimeError::Register {
                        node: runtime.config.node_name.clone(),
                        store: runtime.store_urls(),
                        source,
                    });
                }
            };
            if let Some(cidrs) = &saved
                && tokio::time::Instant::now() >= deadline
            {
                tracing::warn!(
                    node = runtime.config.node_name,
                    error = %error,
                    "the cluster store is unreachable: starting with the pod CIDRs saved in {}; registering in the background",
                    local::path(state_dir).display()
                );
                *lock(&runtime.node_error) = Some(error.to_string());
                let cidrs = runtime.pod_cidrs(cidrs)?;
                runtime.spawn_heartbeat();
                return Ok((runtime.clone(), cidrs));
            }
            tracing::warn!(
                node = runtime.config.node_name,
                error = %error,
                retry_in_ms = backoff.as_millis() as u64,
                "cannot register with the cluster store; this node has no pod CIDR yet, so the agent waits for it"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One registration attempt; on success the CIDRs are saved to `cluster.json` first.
    async fn register(&self) -> Result<NodeCidrs, ClusterError> {
        let spec = {
            let local = lock(&self.local);
            NodeSpec {
                name: self.config.node_name.clone(),
                uid: local.uid.clone(),
                addresses: self.config.node_ips.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            }
        };
        let reg = node::register(
            self.store.as_ref(),
            &self.layout,
            &spec,
            &self.config.cidrs,
            self.config.node_ttl,
        )
        .await?;
        let cidrs = reg.cidrs.clone();
        let updated = {
            let mut local = lock(&self.local);
            local.cidrs = cidrs.clone();
            local.clone()
        };
        let dir = self.state_dir.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || local::save(&dir, &updated))
            .await
            .expect("writing cluster.json does not panic")
        {
            // The registration stands; only a disconnected restart would miss the CIDRs.
            tracing::error!("{e}");
        }
        tracing::info!(
            node = self.config.node_name,
            pod_cidr = ?cidrs.v4,
            pod_cidr6 = ?cidrs.v6,
            lease = reg.lease,
            "registered with the cluster store"
        );
        *lock(&self.registration) = Some(reg);
        *lock(&self.node_error) = None;
        Ok(cidrs)
    }

    fn pod_cidrs(&self, cidrs: &NodeCidrs) -> Result<PodCidrs, RuntimeError> {
        if cidrs.v4.is_none() && cidrs.v6.is_none() {
            return Err(RuntimeError::NoCidr(self.config.node_name.clone()));
        }
        Ok(PodCidrs {
            v4: cidrs.v4,
            v6: cidrs.v6,
        })
    }

    fn store_urls(&self) -> String {
        self.config.store.join(",")
    }

    fn me(&self) -> &str {
        &self.config.node_name
    }

    /// Starts the tasks (once, right after `Agent::start` and `set_cluster`).
    pub fn start(self: &Arc<Self>, agent: Arc<dyn ClusterAgent>) {
        let _ = self.agent.set(Arc::downgrade(&agent));
        let (tx, rx) = mpsc::channel(64);
        let mut tasks = lock(&self.tasks);
        tasks.push(self.handle.spawn(mirror::run(
            self.store.clone(),
            self.layout.prefix().to_owned(),
            tx,
            self.sync.clone(),
        )));
        tasks.push(self.handle.spawn(self.clone().dispatch_loop(rx)));
        if let Some(rx) = lock(&self.publish_rx).take() {
            tasks.push(self.handle.spawn(self.clone().publish_loop(rx)));
        }
        tasks.push(self.handle.spawn(self.clone().gc_loop()));
    }

    /// Starts the heartbeat as soon as the node is registered (or starts disconnected),
    /// not after `Agent::start`: loading and verifying the eBPF programs may take longer
    /// than the lease on a loaded machine, and the node's record would lapse meanwhile.
    fn spawn_heartbeat(self: &Arc<Self>) {
        let task = self.handle.spawn(self.clone().heartbeat_loop());
        lock(&self.tasks).push(task);
    }

    /// Stops the tasks; the lease is left to expire (the node stays registered).
    pub fn stop(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    fn agent(&self) -> Option<Arc<dyn ClusterAgent>> {
        self.agent.get().and_then(Weak::upgrade)
    }

    /// Applies the mirror's updates to the view and the agent, in order.
    async fn dispatch_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Update>) {
        while let Some(update) = rx.recv().await {
            let revision = update.revision;
            let resync = update.resync;
            let batches =
                lock(&self.view).apply(&self.layout, &self.config.node_name, update.deltas, resync);
            for w in &batches.warnings {
                tracing::warn!("{w}");
            }
            let Some(agent) = self.agent() else { return };
            match tokio::task::spawn_blocking(move || apply_batches(agent.as_ref(), batches)).await
            {
                Ok(errors) => {
                    for e in errors {
                        tracing::error!("applying the cluster store's changes: {e}");
                    }
                }
                Err(e) => tracing::error!("applying the cluster store's changes failed: {e}"),
            }
            self.applied.send_replace(revision);
            if resync {
                let _ = self.publish_tx.send(Publish::Reconcile);
            }
        }
    }

    /// Writes this node's endpoint keys: what is queued, in batches, retried with backoff
    /// while the store is unreachable; and the reconciliations after full syncs.
    async fn publish_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Publish>) {
        // Key → value to put (`None`: delete), the last change winning.
        let mut pending: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        let mut reconcile = false;
        let mut backoff = BACKOFF_FIRST;
        loop {
            if pending.is_empty() && !reconcile {
                match rx.recv().await {
                    Some(p) => take(&mut pending, &mut reconcile, p),
                    None => return,
                }
            }
            while let Ok(p) = rx.try_recv() {
                take(&mut pending, &mut reconcile, p);
            }
            if reconcile {
                reconcile = false;
                let Some(agent) = self.agent() else { return };
                let local = match tokio::task::spawn_blocking(move || agent.local_endpoints()).await
                {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("reading the local endpoints failed: {e}");
                        continue;
                    }
                };
                let stored = lock(&self.view).own_endpoints(self.me());
                let desired = self.entries(&local);
                pending = reconcile_ops(&stored, &desired);
                if !pending.is_empty() {
                    tracing::info!(
                        node = self.me(),
                        changes = pending.len(),
                        "reconciling this node's endpoints in the cluster store"
                    );
                }
            }
            if pending.is_empty() {
                continue;
            }
            match self.write(&pending).await {
                Ok(()) => {
                    pending.clear();
                    backoff = BACKOFF_FIRST;
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        pending = pending.len(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "cannot publish this node's endpoints to the cluster store"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Writes the changes, [`TXN_OPS`] per transaction.
    async fn write(&self, pending: &BTreeMap<String, Option<Vec<u8>>>) -> Result<(), ClusterError> {
        let ops: Vec<Op> = pending
            .iter()
            .map(|(k, v)| match v {
                Some(v) => Op::put(k.clone(), v.clone()),
                None => Op::Delete(k.clone()),
            })
            .collect();
        for chunk in ops.chunks(TXN_OPS) {
            self.store
                .txn(Vec::new(), chunk.to_vec(), Vec::new())
                .await?;
        }
        Ok(())
    }

    /// The store entries of local endpoints (those with an identity).
    fn entries(&self, local: &[(EndpointRecord, Option<u32>)]) -> BTreeMap<String, EndpointEntry> {
        local
            .iter()
            .filter_map(|(ep, id)| {
                let id = (*id)?;
                Some((self.endpoint_key(ep), endpoint_entry(self.me(), ep, id)))
            })
            .collect()
    }

    fn endpoint_key(&self, ep: &EndpointRecord) -> String {
        self.layout
            .endpoint(self.me(), &ep.container_id, &ep.ifname)
    }

    /// Heartbeats every third of the lease; registers first if the start was
    /// disconnected.
    async fn heartbeat_loop(self: Arc<Self>) {
        let every = self.config.node_ttl / 3;
        let mut last_error: Option<String> = None;
        // Until registered (a disconnected start), retries come faster, with backoff.
        let mut backoff = BACKOFF_FIRST;
        loop {
            let current = lock(&self.registration).clone();
            if current.is_some() {
                tokio::time::sleep(every).await;
            } else {
                tokio::time::sleep(backoff.min(every)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            let current = lock(&self.registration).clone();
            let result = match current {
                None => self.register().await.map(|cidrs| {
                    let local = lock(&self.local).cidrs.clone();
                    if cidrs != local {
                        tracing::error!(
                            "the cluster store gave node {} the pod CIDRs {cidrs:?}, not {local:?} it started with; restart the agent",
                            self.me()
                        );
                    }
                }),
                Some(mut reg) => {
                    let r = node::heartbeat(
                        self.store.as_ref(),
                        &self.layout,
                        &mut reg,
                        self.config.node_ttl,
                    )
                    .await;
                    *lock(&self.registration) = Some(reg);
                    r
                }
            };
            match result {
                Ok(()) => {
                    if last_error.take().is_some() {
                        tracing::info!(node = self.me(), "node heartbeat back");
                    }
                    *lock(&self.node_error) = None;
                }
                Err(e) => {
                    let msg = e.to_string();
                    if last_error.as_ref() != Some(&msg) {
                        if e.is_unavailable() {
                            tracing::warn!(node = self.me(), "node heartbeat: {msg}");
                        } else {
                            tracing::error!(node = self.me(), "node heartbeat: {msg}");
                        }
                    }
                    *lock(&self.node_error) = Some(msg.clone());
                    last_error = Some(msg);
                }
            }
        }
    }

    /// Collects unused identities every quarter of the grace period (at least every
    /// second), while the mirror is in sync.
    async fn gc_loop(self: Arc<Self>) {
        let every = (self.config.identity_gc_grace / 4).max(Duration::from_secs(1));
        loop {
            tokio::time::sleep(every).await;
            if !lock(&self.sync).connected {
                continue;
            }
            let mut used = lock(&self.view).used_identities();
            if let Some(agent) = self.agent() {
                match tokio::task::spawn_blocking(move || agent.local_endpoints()).await {
                    Ok(l) => used.extend(l.into_iter().filter_map(|(_, id)| id)),
                    Err(_) => continue,
                }
            }
            match identity::collect_garbage(
                self.store.as_ref(),
                &self.layout,
                &used,
                now_ms(),
                self.config.identity_gc_grace,
            )
            .await
            {
                Ok(r) if !(r.marked.is_empty() && r.deleted.is_empty() && r.revived.is_empty()) => {
                    tracing::info!(marked = ?r.marked, revived = ?r.revived, deleted = ?r.deleted, "identity garbage collection");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("identity garbage collection: {e}"),
            }
        }
    }

    /// Runs `f` on the runtime from a blocking thread, within `wait`.
    fn block_on<T>(
        &self,
        wait: Duration,
        f: impl Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        self.handle
            .block_on(async { tokio::time::timeout(wait, f).await })
            .unwrap_or_else(|_| {
                Err(format!(
                    "the cluster store {} did not answer within {} s",
                    self.store_urls(),
                    wait.as_secs_f32()
                ))
            })
    }

    /// Waits (bounded) until the agent has applied the store up to `revision`.
    async fn applied(&self, revision: Revision) -> Result<(), String> {
        let mut rx = self.applied.subscribe();
        rx.wait_for(|r| *r >= revision)
            .await
            .map(|_| ())
            .map_err(|_| "the cluster runtime stopped".to_owned())
    }

    fn known_identity(&self, namespace: &str, labels: &Labels) -> Option<u32> {
        lock(&self.view)
            .by_labels
            .get(&(namespace.to_owned(), labels.clone()))
            .copied()
    }
}

/// Queues one publisher message.
fn take(pending: &mut BTreeMap<String, Option<Vec<u8>>>, reconcile: &mut bool, p: Publish) {
    match p {
        Publish::Put(k, e) => {
            pending.insert(k, Some(hypha_cluster::encode(&e)));
        }
        Publish::Delete(k) => {
            pending.insert(k, None);
        }
        Publish::Reconcile => *reconcile = true,
    }
}

/// What brings the store's keys of this node (`stored`) to the agent's (`desired`):
/// puts of what is missing or different, deletes of strays.
pub fn reconcile_ops(
    stored: &BTreeMap<String, EndpointEntry>,
    desired: &BTreeMap<String, EndpointEntry>,
) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut ops = BTreeMap::new();
    for (k, e) in desired {
        if stored.get(k) != Some(e) {
            ops.insert(k.clone(), Some(hypha_cluster::encode(e)));
        }
    }
    for k in stored.keys() {
        if !desired.contains_key(k) {
            ops.insert(k.clone(), None);
        }
    }
    ops
}

/// The transaction of a [`ServiceTxn`]: its compares (each service key as the caller
/// saw it; each ClusterIP and NodePort claim it newly takes absent) and its writes
/// (services, slices, the claims taken and those given back).
pub fn service_txn(layout: &Layout, t: &ServiceTxn) -> (Vec<Compare>, Vec<Op>) {
    fn claims(layout: &Layout, s: &Service) -> Vec<String> {
        let ips = s.cluster_ips.iter().map(|ip| layout.service_ip(*ip));
        let ports = s
            .ports
            .iter()
            .filter_map(|p| Some(layout.service_node_port(p.protocol, p.node_port?)));
        ips.chain(ports).collect()
    }
    let mut compares = Vec::new();
    let mut ops = Vec::new();
    for (svc, seen) in &t.put {
        let key = layout.service(&svc.namespace, &svc.name);
        compares.push(match seen {
            Some(old) => Compare::Value(key.clone(), hypha_cluster::encode(old)),
            None => Compare::Absent(key.clone()),
        });
        let old: Vec<String> = seen.iter().flat_map(|o| claims(layout, o)).collect();
        let new = claims(layout, svc);
        for c in &new {
            if !old.contains(c) {
                compares.push(Compare::Absent(c.clone()));
                ops.push(Op::put(c.clone(), hypha_cluster::encode(&svc.key())));
            }
        }
        for c in old.iter().filter(|c| !new.contains(c)) {
            ops.push(Op::Delete(c.clone()));
        }
        ops.push(Op::put(key, hypha_cluster::encode(svc)));
    }
    for svc in &t.delete {
        let key = layout.service(&svc.namespace, &svc.name);
        compares.push(Compare::Value(key.clone(), hypha_cluster::encode(svc)));
        ops.extend(claims(layout, svc).into_iter().map(Op::Delete));
        ops.push(Op::Delete(key));
    }
    for s in &t.put_slices {
        ops.push(Op::put(
            layout.endpoint_slice(&s.namespace, &s.name),
            hypha_cluster::encode(s),
        ));
    }
    for (ns, name) in &t.delete_slices {
        ops.push(Op::Delete(layout.endpoint_slice(ns, name)));
    }
    (compares, ops)
}

/// A local endpoint as the store keeps it.
pub fn endpoint_entry(node: &str, ep: &EndpointRecord, identity: u32) -> EndpointEntry {
    let seen = PolicyEndpoint::new(ep.id, std::net::Ipv4Addr::UNSPECIFIED, &ep.labels);
    EndpointEntry {
        node: node.to_owned(),
        address: ep.address,
        address6: ep.address6,
        identity,
        namespace: seen.namespace,
        labels: seen.labels,
        ports: ep
            .ports
            .iter()
            .filter_map(|p| {
                Some(hypha_cluster::layout::EndpointPort {
                    name: p.name.clone(),
                    protocol: crate::policy::port_protocol(&p.protocol)?,
                    port: p.port,
                })
            })
            .collect(),
    }
}

/// Applies each kind's batch, identities first (endpoints and policies refer to them),
/// nodes last; returns the errors.
fn apply_batches(agent: &dyn ClusterAgent, b: Batches) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(x) = b.identities
        && let Err(e) = agent.apply_identities(x)
    {
        errors.push(format!("identities: {e}"));
    }
    if let Some(x) = b.namespaces
        && let Err(e) = agent.apply_namespaces(x)
    {
        errors.push(format!("namespaces: {e}"));
    }
    if let Some(x) = b.endpoints
        && let Err(e) = agent.apply_endpoints(x)
    {
        errors.push(format!("remote endpoints: {e}"));
    }
    if let Some(x) = b.policies
        && let Err(e) = agent.apply_policies(x)
    {
        errors.push(format!("policies: {e}"));
    }
    if (b.services.is_some() || b.slices.is_some())
        && let Err(e) = agent.apply_services(b.services, b.slices)
    {
        errors.push(format!("services: {e}"));
    }
    if let Some(x) = b.nodes
        && let Err(e) = agent.apply_nodes(x)
    {
        errors.push(format!("nodes: {e}"));
    }
    errors
}

impl ClusterLink for Runtime {
    fn resolve_identity(&self, namespace: &str, labels: &Labels) -> Result<u32, String> {
        if let Some(id) = self.known_identity(namespace, labels) {
            return Ok(id);
        }
        let mut last: Option<String> = None;
        let outcome = self
            .handle
            .block_on(tokio::time::timeout(self.waits.store, async {
                let mut backoff = BACKOFF_FIRST;
                loop {
                    match identity::resolve(self.store.as_ref(), &self.layout, namespace, labels)
                        .await
                    {
                        Ok(id) => return Ok(id),
                        Err(e) if e.is_unavailable() => {
                            last = Some(e.to_string());
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
            }));
        let what = format!(
            "cannot get a cluster identity for namespace {namespace} labels {{{}}}",
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        match outcome {
            Ok(Ok(id)) => {
                lock(&self.view)
                    .by_labels
                    .insert((namespace.to_owned(), labels.clone()), id);
                Ok(id)
            }
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Err(_) => Err(format!(
                "{what}: the cluster store {} is unreachable ({}); pods whose labels the cluster already knows still start",
                self.store_urls(),
                last.unwrap_or_else(|| format!(
                    "no answer within {} s",
                    self.waits.store.as_secs_f32()
                ))
            )),
        }
    }

    fn endpoint_published(&self, ep: &EndpointRecord, identity: u32) {
        let key = self.endpoint_key(ep);
        let _ = self
            .publish_tx
            .send(Publish::Put(key, endpoint_entry(self.me(), ep, identity)));
    }

    fn endpoint_withdrawn(&self, ep: &EndpointRecord) {
        let _ = self.publish_tx.send(Publish::Delete(self.endpoint_key(ep)));
    }

    fn publish_policies(
        &self,
        policies: Vec<Policy>,
        deletes: Vec<(String, String)>,
    ) -> Result<(), String> {
        let mut ops: Vec<Op> = policies
            .iter()
            .map(|p| {
                Op::put(
                    self.layout.policy(&p.namespace, &p.name),
                    hypha_cluster::encode(p),
                )
            })
            .collect();
        ops.extend(
            deletes
                .iter()
                .map(|(ns, name)| Op::Delete(self.layout.policy(ns, name))),
        );
        if ops.is_empty() {
            return Ok(());
        }
        let store = self.store_urls();
        self.block_on(self.waits.store, async {
            let out = self
                .store
                .txn(Vec::new(), ops, Vec::new())
                .await
                .map_err(|e| format!("writing the policies to the cluster store {store}: {e}"))?;
            self.applied(out.revision).await
        })
    }

    fn publish_services(&self, txn: ServiceTxn) -> Result<bool, String> {
        let (compares, ops) = service_txn(&self.layout, &txn);
        if ops.is_empty() {
            return Ok(true);
        }
        let store = self.store_urls();
        self.block_on(self.waits.store, async {
            let out = self
                .store
                .txn(compares, ops, Vec::new())
                .await
                .map_err(|e| format!("writing the services to the cluster store {store}: {e}"))?;
            // Either way this agent catches up with the store first: with the services
            // written, or with what made the compares fail (for the caller's retry).
            self.applied(out.revision).await?;
            Ok(out.succeeded)
        })
    }

    fn publish_namespace_labels(
        &self,
        namespace: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Labels, String> {
        let key = self.layout.namespace(namespace);
        let store = self.store_urls();
        let failed = |e: &dyn std::fmt::Display| {
            format!("labelling namespace {namespace} in the cluster store {store}: {e}")
        };
        self.block_on(self.waits.store, async {
            for _ in 0..16 {
                let current = self.store.get(&key).await.map_err(|e| failed(&e))?;
                let mut labels: Labels = match &current {
                    Some(kv) => hypha_cluster::decode(&key, &kv.value).map_err(|e| failed(&e))?,
                    None => Labels::new(),
                };
                labels.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
                for k in remove {
                    labels.remove(k);
                }
                let compare = match &current {
                    Some(kv) => hypha_cluster::Compare::ModRevision(key.clone(), kv.mod_revision),
                    None => hypha_cluster::Compare::Absent(key.clone()),
                };
                let op = if labels.is_empty() {
                    Op::Delete(key.clone())
                } else {
                    Op::put(key.clone(), hypha_cluster::encode(&labels))
                };
                let out = self
                    .store
                    .txn(vec![compare], vec![op], Vec::new())
                    .await
                    .map_err(|e| failed(&e))?;
                if out.succeeded {
                    self.applied(out.revision).await?;
                    return Ok(labels);
                }
            }
            Err(failed(&"too many concurrent changes; try again"))
        })
    }

    fn status(&self) -> ClusterStatus {
        let sync = lock(&self.sync).clone();
        let nodes = lock(&self.view).node_names().len();
        let node_error = lock(&self.node_error).clone();
        ClusterStatus {
            node_name: self.config.node_name.clone(),
            store: self.config.store.clone(),
            connected: sync.connected,
            revision: *self.applied.borrow(),
            last_sync_unix_ms: sync.last_sync_ms,
            nodes,
            remote_endpoints: self.agent().map_or(0, |a| a.remote_endpoint_count()),
            resyncs: sync.resyncs,
            error: match (sync.error.filter(|_| !sync.connected), node_error) {
                (Some(a), Some(b)) if a != b => Some(format!("{a}; node: {b}")),
                (Some(a), _) => Some(a),
                (None, b) => b,
            },
        }
    }

    fn nodes(&self) -> Result<Vec<NodeInfo>, String> {
        let view = lock(&self.view);
        if !view.synced {
            return Err(format!(
                "the cluster store {} has not been read yet: {}",
                self.store_urls(),
                lock(&self.sync)
                    .error
                    .clone()
                    .unwrap_or_else(|| "connecting".into())
            ));
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for e in view.endpoints.values() {
            *counts.entry(e.node.as_str()).or_default() += 1;
        }
        Ok(view
            .node_names()
            .into_iter()
            .map(|name| {
                let record = view.nodes.get(&name);
                let cidrs = view.cidrs.get(&name);
                NodeInfo {
                    addresses: record.map(|r| r.addresses.clone()).unwrap_or_default(),
                    pod_cidr: cidrs.and_then(|c| c.v4).or(record.and_then(|r| r.pod_cidr)),
                    pod_cidr6: cidrs
                        .and_then(|c| c.v6)
                        .or(record.and_then(|r| r.pod_cidr6)),
                    version: record.map(|r| r.version.clone()).unwrap_or_default(),
                    heartbeat_unix_ms: record.map(|r| r.heartbeat_ms),
                    alive: record.is_some(),
                    endpoints: counts.get(name.as_str()).copied().unwrap_or(0),
                    local: name == self.config.node_name,
                    // Filled in by the agent from its tunnel counters (helper "obs").
                    tunnel: None,
                    name,
                }
            })
            .collect())
    }

    fn remove_node(&self, name: &str, force: bool) -> Result<RemoveNodeResponse, ControlError> {
        let stale_after = self.config.node_ttl * STALE_TTLS;
        let result = self.handle.block_on(async {
            tokio::time::timeout(
                self.waits.store,
                node::remove(self.store.as_ref(), &self.layout, name, force, stale_after),
            )
            .await
        });
        match result {
            Ok(Ok(removed)) => Ok(RemoveNodeResponse {
                name: name.to_owned(),
                pod_cidr: removed.cidrs.v4,
                pod_cidr6: removed.cidrs.v6,
                endpoints: removed.endpoints,
            }),
            Ok(Err(e @ ClusterError::NodeAlive { .. })) => {
                Err(ControlError::Conflict(e.to_string()))
            }
            Ok(Err(e @ ClusterError::NoSuchNode(_))) => Err(ControlError::NotFound(e.to_string())),
            Ok(Err(e)) if e.is_unavailable() => Err(ControlError::Unavailable(format!(
                "removing node {name}: {e}"
            ))),
            Ok(Err(e)) => Err(ControlError::Conflict(format!("removing node {name}: {e}"))),
            Err(_) => Err(ControlError::Unavailable(format!(
                "removing node {name}: the cluster store {} did not answer within {} s",
                self.store_urls(),
                self.waits.store.as_secs_f32()
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
