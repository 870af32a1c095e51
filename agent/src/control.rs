//! The control plane: endpoints and addresses, over the datapath and host traits.
//!
//! Requests run in parallel: each holds the lock of its own attachment (container id,
//! ifname) for its whole run, and the shared state (the endpoint table and allocator,
//! the policy engine) only for in-memory work; netlink, qdiscs, attaches and fsyncs run
//! outside those. Every change is persisted (by the store's group commit) before it is
//! answered, and every answer says what went wrong in words an operator can act on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::ArcSwap;

use hypha_api::{
    AllocateRequest, Allocation, Attachment, CreateEndpointRequest, DatapathStatus, DeleteResponse,
    DirectionCounters, DropCount, Endpoint, EndpointCheck, EndpointCounters, GcRequest, GcResponse,
    IpamStatus, MacAddr, NodeStatus, PacketCount, Status,
};
use hypha_common::{DIR_EGRESS, DropReason, EndpointStats};

use crate::bandwidth::{self, Limit};
use crate::config::AgentConfig;
use crate::datapath::{Adoption, Datapath};
use crate::host::{HostNetwork, LimitSide, NodeNetwork};
use crate::ipam::{Family, Ipam, Ipam6, IpamError, IpamState, Owner};
pub use crate::state::Persist;
use crate::state::{Change, EndpointRecord, Pending, PersistedState, StateError};

mod cluster;
mod deleted;
mod nodeport;
mod nodes;
mod overlay;
mod policy;
mod services;

pub use cluster::{ClusterLink, RemoteBatch, RemoteEndpoint, ServiceTxn};
pub use policy::DirSyncReport;
use policy::{PolicyState, PolicyView};

/// Why a request failed; `status` maps each to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// Something the request needs (the cluster store) cannot be reached: 503.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("host network: {0}")]
    Host(#[from] crate::host::HostError),
    #[error("datapath: {0}")]
    Datapath(String),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// A step failed, and so did part of undoing what came before it.
    #[error("{error}; undoing it also failed: {}", rollback.join("; "))]
    RollbackFailed {
        error: Box<ControlError>,
        rollback: Vec<String>,
    },
}

impl ControlError {
    /// `self`, with the failures of the rollback that followed it, if any.
    pub fn with_rollback(self, rollback: Vec<String>) -> ControlError {
        if rollback.is_empty() {
            self
        } else {
            ControlError::RollbackFailed {
                error: Box::new(self),
                rollback,
            }
        }
    }
}

impl ControlError {
    pub fn http_status(&self) -> u16 {
        match self {
            ControlError::BadRequest(_) => 400,
            ControlError::Conflict(_) => 409,
            ControlError::NotFound(_) => 404,
            ControlError::Unavailable(_) => 503,
            ControlError::Policy(_) => 400,
            ControlError::Ipam(IpamError::Exhausted { .. }) => 507,
            // What the request asked for is taken or not to be had: the caller's doing.
            ControlError::Ipam(IpamError::InUse { .. } | IpamError::OwnerHoldsOther { .. }) => 409,
            ControlError::Ipam(IpamError::NotAllocatable { .. } | IpamError::NoFamily { .. }) => {
                400
            }
            ControlError::RollbackFailed { error, .. } => error.http_status(),
            _ => 500,
        }
    }
}

/// The endpoint table and the address allocator: what every ADD and DEL reads and
/// changes, behind one lock that is only ever held for in-memory work (never across
/// netlink, bpf or fsync).
struct Table {
    /// One allocator per family the node has a pod CIDR for.
    ipam4: Option<Ipam>,
    ipam6: Option<Ipam6>,
    endpoints: BTreeMap<Owner, EndpointRecord>,
    ids: BTreeMap<u32, Owner>,
    /// Addresses (both families) and MACs of the endpoints and of the ADDs in progress,
    /// so that two concurrent ADDs cannot both take one.
    addresses: HashMap<IpAddr, Owner>,
    macs: HashMap<[u8; 6], Owner>,
    next_endpoint_id: u32,
}

impl Table {
    fn insert(&mut self, ep: EndpointRecord) {
        let owner = ep.owner();
        for a in ep.addresses() {
            self.addresses.insert(a, owner.clone());
        }
        self.macs.insert(ep.pod_mac.0, owner.clone());
        self.ids.insert(ep.id, owner.clone());
        self.endpoints.insert(owner, ep);
    }

    fn remove(&mut self, owner: &Owner) -> Option<EndpointRecord> {
        let ep = self.endpoints.remove(owner)?;
        self.ids.remove(&ep.id);
        for a in ep.addresses() {
            self.addresses.remove(&a);
        }
        self.macs.remove(&ep.pod_mac.0);
        Some(ep)
    }

    /// Gives back both families' reservations of `owner`, with the changes that say so.
    fn release(&mut self, owner: &Owner) -> (Released, Vec<Change>) {
        let released = Released {
            v4: self.ipam4.as_mut().and_then(|i| i.release(owner)),
            v6: self.ipam6.as_mut().and_then(|i| i.release(owner)),
        };
        let mut changes = Vec::new();
        if released.v4.is_some() {
            changes.push(Change::AddressReleased(owner.clone()));
        }
        if released.v6.is_some() {
            changes.push(Change::Address6Released(owner.clone()));
        }
        (released, changes)
    }

    /// Every owner holding a reservation of either family.
    fn ipam_owners(&self) -> impl Iterator<Item = &Owner> {
        let v4 = self.ipam4.iter().flat_map(|i| i.owners());
        let v6 = self.ipam6.iter().flat_map(|i| i.owners());
        v4.chain(v6)
    }

    /// Who holds `address` (an endpoint or an ADD in progress), described.
    fn address_holder(&self, address: IpAddr) -> Option<String> {
        let owner = self.addresses.get(&address)?;
        Some(self.describe_owner(owner))
    }

    fn mac_holder(&self, mac: &MacAddr) -> Option<String> {
        let owner = self.macs.get(&mac.0)?;
        Some(self.describe_owner(owner))
    }

    fn describe_owner(&self, owner: &Owner) -> String {
        match self.endpoints.get(owner) {
            Some(ep) => format!(
                "endpoint {} (container {} interface {})",
                ep.id, ep.container_id, ep.ifname
            ),
            None => format!("the ADD in progress of {owner}"),
        }
    }
}

/// Serialises the operations on one attachment (ADD, DEL, CHECK, changes of its
/// bandwidth, labels...), so that different attachments proceed in parallel while one
/// attachment's steps never interleave. Held across kernel work: only operations on the
/// same attachment wait for it.
#[derive(Default)]
struct OwnerLocks {
    busy: Mutex<BTreeSet<Owner>>,
    freed: Condvar,
}

struct OwnerGuard<'a> {
    locks: &'a OwnerLocks,
    owner: Owner,
}

impl OwnerLocks {
    fn lock(&self, owner: &Owner) -> OwnerGuard<'_> {
        let mut busy = self.busy.lock().expect("owner locks");
        while busy.contains(owner) {
            busy = self.freed.wait(busy).expect("owner locks");
        }
        busy.insert(owner.clone());
        OwnerGuard {
            locks: self,
            owner: owner.clone(),
        }
    }
}

impl Drop for OwnerGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.locks.busy.lock().expect("owner locks");
        busy.remove(&self.owner);
        drop(busy);
        self.locks.freed.notify_all();
    }
}

/// The address and MAC an ADD in progress holds in the table; given back on drop unless
/// the ADD completed.
struct Claim<'a> {
    table: &'a Mutex<Table>,
    addresses: Vec<IpAddr>,
    mac: [u8; 6],
    done: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut t = self.table.lock().expect("endpoint table");
        for a in &self.addresses {
            t.addresses.remove(a);
        }
        t.macs.remove(&self.mac);
    }
}

/// Waits for every pending change; the first error, if any.
fn wait_all(pending: impl IntoIterator<Item = Pending>) -> Result<(), StateError> {
    let mut first = None;
    for p in pending {
        if let Err(e) = p.wait() {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// The agent: the endpoint table and allocator, the policy engine, the datapath and the
/// host network. Every method takes `&self`: requests run in parallel on blocking
/// threads, each holding the short locks it needs only for its in-memory work.
///
/// Locks: an owner lock (one attachment) may be held while taking `table` or `policy`;
/// `table` and `policy` are never held together.
pub struct Agent<D: Datapath, H: HostNetwork> {
    config: AgentConfig,
    datapath: D,
    host: H,
    store: Box<dyn Persist>,
    table: Mutex<Table>,
    owners: OwnerLocks,
    /// The attachments deleted lately, against requests of ADDs the runtime gave up on.
    deleted: Mutex<deleted::RecentDeletes>,
    policy: Mutex<PolicyState>,
    /// What status, metrics and the monitor show of policy, replaced after each change.
    policy_view: ArcSwap<PolicyView>,
    adopted: usize,
    started: Instant,
    /// Cluster mode: the runtime that links the agent to the store (set after start).
    cluster: std::sync::OnceLock<std::sync::Arc<dyn ClusterLink>>,
    /// Cluster mode: the tunnel or native routing to other nodes' pods.
    overlay: overlay::Overlay,
    /// Services: their documents, allocation, plan and load-balancer maps, behind their
    /// own locks (never held with `table` or `policy`).
    services: services::ServiceControl,
}

/// What start-up found and did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StartReport {
    pub adopted: Vec<String>,
    pub reattached: Vec<String>,
    /// Endpoints whose host veth was gone: removed and their addresses released.
    pub removed: Vec<String>,
    /// Problems met while cleaning up; the agent starts anyway.
    pub warnings: Vec<String>,
}

impl<D: Datapath, H: HostNetwork> Agent<D, H> {
    /// Restores the saved state, sets up the node and re-adopts the endpoints that still
    /// exist; removes those whose veth is gone and everything in the maps nobody owns.
    pub fn start(
        config: AgentConfig,
        datapath: D,
        host: H,
        store: Box<dyn Persist>,
        saved: PersistedState,
    ) -> Result<(Self, StartReport), ControlError> {
        let gateway = config.gateway();
        let mut report = StartReport::default();
        let router6 = overlay::router6(&config, &saved.ipam6, &mut report.warnings);
        host.setup_node(&NodeNetwork {
            pod_cidrs: config.pod_cidrs,
            gateway,
            host_device: config.host_device.clone(),
            masquerade: config.masquerade,
            router6,
            cluster_cidrs: overlay::cluster_nets(&config),
        })?;
        let ipam4 = restore_ipam(config.pod_cidrs.v4, gateway, saved.ipam)?;
        // The IPv6 router address (cluster tunnel mode) is never a pod's.
        let ipam6 = restore_ipam(config.pod_cidrs.v6, router6, saved.ipam6)?;
        let mut table = Table {
            ipam4,
            ipam6,
            endpoints: BTreeMap::new(),
            ids: BTreeMap::new(),
            addresses: HashMap::new(),
            macs: HashMap::new(),
            next_endpoint_id: saved.next_endpoint_id.max(1),
        };
        let mut changes = Vec::new();
        for ep in saved.endpoints {
            let name = format!("{} ({})", ep.host_ifname, ep.describe_addresses());
            let alive = host
                .link(&ep.host_ifname)?
                .is_some_and(|l| l.index == ep.host_ifindex);
            if !alive {
                for e in datapath.detach(&ep) {
                    report.warnings.push(format!("{name}: {e}"));
                }
                let owner = ep.owner();
                changes.push(Change::EndpointGone(owner.clone()));
                changes.extend(table.release(&owner).1);
                report.removed.push(name);
                continue;
            }
            table.insert(ep);
        }
        // The node's own addresses are the host identity's: the IPv4 gateway (the source
        // of what the host sends to pods), and whatever else the namespace holds now.
        let mut host_addrs: Vec<std::net::IpAddr> = gateway
            .map(IpAddr::V4)
            .into_iter()
            .chain(router6.map(IpAddr::V6))
            .collect();
        match host.addresses() {
            Ok(found) => host_addrs.extend(found),
            Err(e) => report.warnings.push(format!(
                "cannot list the node's addresses ({e}); policy knows only the gateway as the host"
            )),
        }
        let (policy, policy_changes) = PolicyState::start(
            saved.policies,
            saved.namespace_labels,
            saved.identities,
            table.endpoints.values(),
            host_addrs,
            config.cluster.as_ref().map(|c| c.node_name.as_str()),
            saved.remote_endpoints,
            &mut report.warnings,
        );
        changes.extend(policy_changes);
        let view = ArcSwap::from_pointee(PolicyView::default());
        let installed_lb = datapath.installed_lb().unwrap_or_else(|e| {
            report.warnings.push(format!(
                "cannot read the load balancer's maps ({e}); service ids start afresh"
            ));
            Default::default()
        });
        let services = services::ServiceControl::start(saved.services, saved.slices, installed_lb);
        let agent = Agent {
            config,
            datapath,
            host,
            store,
            table: Mutex::new(table),
            owners: OwnerLocks::default(),
            deleted: Mutex::default(),
            policy: Mutex::new(policy),
            policy_view: view,
            adopted: 0,
            started: Instant::now(),
            cluster: std::sync::OnceLock::new(),
            overlay: overlay::Overlay::default(),
            services,
        };
        let mut agent = agent;
        agent.start_overlay(router6, &mut report.warnings)?;
        agent.start_nodeport(&mut report.warnings)?;
        // Policy entries and identities first, then the endpoints with their flags, then
        // the removal of what no policy wants any more.
        let (additions, removals) = agent.policy_start_diff(&mut report.warnings);
        if let Err(e) = agent.datapath.apply_policy(&additions) {
            report
                .warnings
                .push(format!("cannot write the policy maps: {e}"));
        }
        let endpoints: Vec<EndpointRecord> = agent.table().endpoints.values().cloned().collect();
        for ep in &endpoints {
            let name = format!("{} ({})", ep.host_ifname, ep.describe_addresses());
            for e in agent.route_pod(ep) {
                report
                    .warnings
                    .push(format!("{name}: cannot restore its route: {e}"));
            }
            // Rate limiters first (their qdiscs), so that the ingress flag never points
            // same-node traffic at a qdisc that is not there.
            if ep.bandwidth.is_some()
                && let Err(e) = agent.apply_limits(ep, None, false)
            {
                report
                    .warnings
                    .push(format!("{name}: cannot restore its bandwidth limits: {e}"));
            }
            let flags =
                agent.policy_flags(ep.id) | bandwidth::endpoint_flags(ep.bandwidth.as_ref());
            match agent.datapath.adopt(ep, flags) {
                Ok(Adoption::Adopted) => report.adopted.push(name),
                Ok(Adoption::Reattached) => report.reattached.push(name),
                Err(e) => {
                    report
                        .warnings
                        .push(format!("{name}: cannot re-adopt: {e}"));
                }
            }
        }
        if let Err(e) = agent.datapath.apply_policy(&removals) {
            report
                .warnings
                .push(format!("cannot remove stale policy entries: {e}"));
        }
        agent.adopted = report.adopted.len();
        for e in agent.datapath.sweep(&endpoints) {
            report
                .warnings
                .push(format!("sweeping stale datapath entries: {e}"));
        }
        agent.publish_policy(&agent.policy());
        agent.start_services(&mut report.warnings);
        if !changes.is_empty() {
            agent.store.submit(changes).wait()?;
        }
        Ok((agent, report))
    }

    /// What the state store holds now (`GET /v1/state`).
    pub fn committed_state(&self) -> Result<PersistedState, StateError> {
        self.store.committed()
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().expect("endpoint table")
    }

    /// The record of `owner`'s endpoint, if it has one.
    fn record(&self, owner: &Owner) -> Option<EndpointRecord> {
        self.table().endpoints.get(owner).cloned()
    }

    /// Refuses a request of an ADD that took the attachment's lock at `locked_at` when a
    /// DEL of the attachment was handled since (see [`deleted`]). Call with the
    /// attachment's lock held.
    fn check_not_deleted_since(
        &self,
        owner: &Owner,
        locked_at: Option<u64>,
    ) -> Result<(), ControlError> {
        let Some(locked_at) = locked_at else {
            return Ok(());
        };
        let deleted = self
            .deleted
            .lock()
            .expect("recent deletes")
            .after(owner, locked_at);
        match deleted {
            Some(at) => {
                let e = ControlError::Conflict(format!(
                    "{owner} was deleted {:.3} s after this ADD took the attachment's lock: \
                     the runtime has given up on this ADD, so nothing is done for it",
                    (at - locked_at) as f64 / 1e9
                ));
                tracing::warn!("refused a request of a killed ADD: {e}");
                Err(e)
            }
            None => Ok(()),
        }
    }

    pub fn allocate(&self, req: &AllocateRequest) -> Result<Allocation, ControlError> {
        self.allocate_for(req, None)
    }

    /// [`Self::allocate`] for an ADD that took the attachment's lock at `locked_at`
    /// (nanoseconds of `CLOCK_BOOTTIME`), refused when a DEL of the attachment came since.
    pub fn allocate_for(
        &self,
        req: &AllocateRequest,
        locked_at: Option<u64>,
    ) -> Result<Allocation, ControlError> {
        validate_owner(&req.container_id, &req.ifname)?;
        let owner = Owner {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
        };
        let _busy = self.owners.lock(&owner);
        self.check_not_deleted_since(&owner, locked_at)?;
        let (a4, a6, pending) = {
            let mut t = self.table();
            if let Some(ep) = t.endpoints.get(&owner) {
                return Err(ControlError::Conflict(format!(
                    "container {} already has interface {} attached as endpoint {} ({}); delete it first",
                    ep.container_id,
                    ep.ifname,
                    ep.id,
                    ep.describe_addresses()
                )));
            }
            // Both requests are checked before anything is taken.
            if let (Some(a), None) = (req.address, &t.ipam4) {
                return Err(no_family(a).into());
            }
            if let (Some(a), None) = (req.address6, &t.ipam6) {
                return Err(no_family(a).into());
            }
            let mut changes = Vec::new();
            let a4 = match t.ipam4.as_mut() {
                Some(ipam) => Some(allocate_in(ipam, &owner, req.address, &mut changes)?),
                None => None,
            };
            let a6 = match t.ipam6.as_mut() {
                Some(ipam) => match allocate_in(ipam, &owner, req.address6, &mut changes) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        // A refused ADD leaves nothing: the IPv4 address just taken goes
                        // back (one held from an earlier ALLOCATE stays).
                        if changes.iter().any(|c| matches!(c, Change::Address { .. }))
                            && let Some(ipam) = t.ipam4.as_mut()
                        {
                            ipam.release(&owner);
                        }
                        return Err(e.into());
                    }
                },
                None => None,
            };
            let pending = (!changes.is_empty()).then(|| self.store.submit(changes));
            (a4, a6, pending)
        };
        if let Some(p) = pending
            && let Err(e) = p.wait()
        {
            self.table().release(&owner);
            return Err(e.into());
        }
        Ok(Allocation {
            address: a4,
            gateway: a4.and(self.config.gateway()),
            pod_cidr: a4.and(self.config.pod_cidrs.v4),
            address6: a6,
            gateway6: a6.and(self.config.gateway6()),
            pod_cidr6: a6.and(self.config.pod_cidrs.v6),
            mtu: self.pod_mtu(),
        })
    }

    /// Routes the endpoint's addresses to its host veth: the errors, per family.
    fn route_pod(&self, ep: &EndpointRecord) -> Vec<crate::host::HostError> {
        let mut errors = Vec::new();
        if let (Some(a), Some(gw)) = (ep.address, self.config.gateway())
            && let Err(e) = self.host.route_pod(ep.host_ifindex, a, gw)
        {
            errors.push(e);
        }
        if let Some(a) = ep.address6
            && let Err(e) = self.host.route_pod6(ep.host_ifindex, a)
        {
            errors.push(e);
        }
        errors
    }

    /// Checks a create request against the table and claims its address and MAC; on a
    /// MAC conflict the address reserved for it goes back (a refused ADD leaves nothing).
    fn claim(
        &self,
        req: &CreateEndpointRequest,
        owner: &Owner,
    ) -> Result<(u32, Claim<'_>), ControlError> {
        let mut t = self.table();
        if let Some(ep) = t.endpoints.get(owner) {
            return Err(ControlError::Conflict(format!(
                "container {} interface {} is already endpoint {}",
                req.container_id, req.ifname, ep.id
            )));
        }
        if req.address.is_none() && req.address6.is_none() {
            return Err(ControlError::BadRequest(
                "the request has no address: give address, address6 or both".into(),
            ));
        }
        if let (Some(a), None) = (req.address, &t.ipam4) {
            return Err(ControlError::BadRequest(no_family(a).to_string()));
        }
        if let (Some(a), None) = (req.address6, &t.ipam6) {
            return Err(ControlError::BadRequest(no_family(a).to_string()));
        }
        let addresses: Vec<IpAddr> = req
            .address
            .map(IpAddr::V4)
            .into_iter()
            .chain(req.address6.map(IpAddr::V6))
            .collect();
        for address in &addresses {
            if let Some(other) = t.address_holder(*address) {
                return Err(ControlError::Conflict(format!(
                    "address {address} is already used by {other}"
                )));
            }
        }
        if let Some(ipam) = &t.ipam4 {
            check_claim(ipam, owner, req.address, req.external_ipam)?;
        }
        if let Some(ipam) = &t.ipam6 {
            check_claim(ipam, owner, req.address6, req.external_ipam)?;
        }
        if let Some(other) = t.mac_holder(&req.pod_mac) {
            // The pod's MAC is how the datapath knows it (anti-spoofing, the MAC it
            // rewrites to): two endpoints cannot share one.
            let (released, changes) = if req.external_ipam {
                (Released::default(), Vec::new())
            } else {
                t.release(owner)
            };
            let pending = (!changes.is_empty()).then(|| self.store.submit(changes));
            drop(t);
            if let Some(p) = pending
                && let Err(e) = p.wait()
            {
                tracing::error!("cannot save the release of {owner}'s address: {e}");
            }
            let released: Vec<String> = released.iter().map(|a| a.to_string()).collect();
            return Err(ControlError::Conflict(format!(
                "MAC address {} is already used by {other}{}",
                req.pod_mac,
                if released.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; address {} reserved for {owner} released",
                        released.join(" and ")
                    )
                }
            )));
        }
        let id = t.next_endpoint_id;
        t.next_endpoint_id += 1;
        for address in &addresses {
            t.addresses.insert(*address, owner.clone());
        }
        t.macs.insert(req.pod_mac.0, owner.clone());
        Ok((
            id,
            Claim {
                table: &self.table,
                addresses,
                mac: req.pod_mac.0,
                done: false,
            },
        ))
    }

    pub fn create_endpoint(&self, req: &CreateEndpointRequest) -> Result<Endpoint, ControlError> {
        self.create_endpoint_for(req, None)
    }

    /// [`Self::create_endpoint`] for an ADD that took the attachment's lock at
    /// `locked_at`, refused when a DEL of the attachment came since.
    pub fn create_endpoint_for(
        &self,
        req: &CreateEndpointRequest,
        locked_at: Option<u64>,
    ) -> Result<Endpoint, ControlError> {
        validate_owner(&req.container_id, &req.ifname)?;
        if req.pod_mac.0[0] & 1 != 0 || req.pod_mac.0 == [0; 6] {
            return Err(ControlError::BadRequest(format!(
                "pod_mac {} is not a unicast MAC address",
                req.pod_mac
            )));
        }
        if let Some(bw) = &req.bandwidth {
            bandwidth::validate(bw)
                .map_err(|e| ControlError::BadRequest(format!("invalid bandwidth: {e}")))?;
        }
        policy::validate_named_ports(&req.ports)?;
        let mut ports = req.ports.clone();
        ports.sort();
        let owner = Owner {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
        };
        let _busy = self.owners.lock(&owner);
        self.check_not_deleted_since(&owner, locked_at)?;
        let (id, mut claim) = self.claim(req, &owner)?;
        let link = self.host.link(&req.host_ifname)?.ok_or_else(|| {
            ControlError::BadRequest(format!(
                "host interface {} does not exist in the agent's network namespace",
                req.host_ifname
            ))
        })?;
        let record = EndpointRecord {
            id,
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            netns: req.netns.clone(),
            host_ifname: req.host_ifname.clone(),
            host_ifindex: link.index,
            address: req.address,
            address6: req.address6,
            pod_mac: req.pod_mac,
            host_mac: link.mac,
            labels: req.labels.clone(),
            external_ipam: req.external_ipam,
            bandwidth: req.bandwidth,
            debug: false,
            ports,
        };
        // Cluster mode: the store's number for its labels, before anything is done.
        self.cluster_identity(&record)?;
        if let Some(e) = self.route_pod(&record).into_iter().next() {
            return Err(e.into());
        }
        // The limiters before the programs: the ingress flag set by `attach` must find its
        // qdisc in place. If a later step fails, they go with the veth hypha-cni deletes.
        if record.bandwidth.is_some() {
            self.apply_limits(&record, None, false)?;
        }
        // Its policy entries and ipcache entry first, so that it starts with them.
        let (flags, identities) = self.policy_join(&record)?;
        let flags = flags | bandwidth::endpoint_flags(record.bandwidth.as_ref());
        if let Err(e) = self.datapath.attach(&record, flags) {
            let rollback = self
                .policy_leave(record.id)
                .into_iter()
                .map(|e| format!("cannot restore the policy maps: {e}"))
                .collect();
            return Err(ControlError::Datapath(e.to_string()).with_rollback(rollback));
        }
        let pending = {
            let mut t = self.table();
            t.insert(record.clone());
            claim.done = true;
            self.store.submit(vec![
                Change::Endpoint(record.clone()),
                Change::NextEndpointId(t.next_endpoint_id),
            ])
        };
        if let Err(e) = wait_all(identities.into_iter().chain([pending])) {
            self.table().remove(&owner);
            let mut rollback: Vec<String> = self
                .datapath
                .detach(&record)
                .into_iter()
                .map(|e| format!("detaching {}: {e}", record.host_ifname))
                .collect();
            rollback.extend(self.policy_leave(record.id));
            return Err(ControlError::from(e).with_rollback(rollback));
        }
        self.cluster_publish(&record);
        self.services_follow([Self::endpoint_namespace(&record)]);
        Ok(self.describe(&record, &[]))
    }

    /// Removes the endpoint and releases its address; both may already be gone.
    pub fn delete_endpoint(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<DeleteResponse, ControlError> {
        validate_owner(container_id, ifname)?;
        let owner = Owner {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
        };
        // Noted before the removal: a request of a killed ADD handled after this point
        // is refused; one handled before is undone by the removal.
        self.deleted
            .lock()
            .expect("recent deletes")
            .deleted(&owner, hypha_api::boottime_ns());
        let removal = self.remove(&owner, false);
        removal.pending.map(|p| p.wait()).transpose()?;
        if !removal.errors.is_empty() {
            return Err(ControlError::Datapath(format!(
                "endpoint of {owner} removed, but cleaning the datapath failed: {}",
                removal.errors.join("; ")
            )));
        }
        Ok(DeleteResponse {
            endpoint_removed: removal.removed,
            address_released: removal.released.v4,
            address6_released: removal.released.v6,
        })
    }

    /// The endpoint of one attachment and what of it is missing, for CNI CHECK.
    pub fn check_endpoint(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<EndpointCheck, ControlError> {
        validate_owner(container_id, ifname)?;
        let owner = Owner {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
        };
        let _busy = self.owners.lock(&owner);
        let ep = self.record(&owner).ok_or_else(|| {
            ControlError::NotFound(format!(
                "no endpoint for container {container_id} interface {ifname}"
            ))
        })?;
        let mut problems = Vec::new();
        match self.host.link(&ep.host_ifname)? {
            Some(l) if l.index == ep.host_ifindex => {}
            Some(l) => problems.push(format!(
                "host interface {} was replaced: ifindex {} instead of {}",
                ep.host_ifname, l.index, ep.host_ifindex
            )),
            None => problems.push(format!("host interface {} is gone", ep.host_ifname)),
        }
        problems.extend(self.datapath.check(&ep));
        Ok(EndpointCheck {
            endpoint: self.describe(&ep, &[]),
            problems,
        })
    }

    /// Removes every endpoint and reservation that belongs to no valid attachment, with
    /// its host veth, map entries and links; keeps going past errors and reports them.
    pub fn gc(&self, req: &GcRequest) -> Result<GcResponse, ControlError> {
        for (i, a) in req.valid_attachments.iter().enumerate() {
            validate_owner(&a.container_id, &a.ifname)
                .map_err(|e| ControlError::BadRequest(format!("valid_attachments[{i}]: {e}")))?;
        }
        let valid: BTreeSet<(&str, &str)> = req
            .valid_attachments
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        let mut stale: BTreeSet<Owner> = {
            let t = self.table();
            t.endpoints
                .keys()
                .cloned()
                .chain(t.ipam_owners().cloned())
                .collect()
        };
        stale.retain(|o| !valid.contains(&(o.container_id.as_str(), o.ifname.as_str())));
        let mut resp = GcResponse::default();
        let mut pending = Vec::new();
        for owner in stale {
            let removal = self.remove(&owner, true);
            resp.errors.extend(removal.errors);
            resp.released.extend(removal.released.iter());
            pending.extend(removal.pending);
            if removal.removed || !removal.released.is_empty() {
                resp.removed.push(Attachment {
                    container_id: owner.container_id,
                    ifname: owner.ifname,
                });
            }
        }
        wait_all(pending)?;
        Ok(resp)
    }

    /// Finishes the deletes `hypha-cni` could not hand over while the agent was down, and
    /// removes endpoints whose host veth vanished (their pod is gone). Returns what it did.
    pub fn reconcile(&self, deferred: &[Attachment]) -> Vec<String> {
        let mut done = Vec::new();
        let mut owners: Vec<Owner> = deferred
            .iter()
            .map(|a| Owner {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            })
            .collect();
        let endpoints: Vec<EndpointRecord> = self.table().endpoints.values().cloned().collect();
        for e in &endpoints {
            match self.host.link(&e.host_ifname) {
                Ok(Some(l)) if l.index == e.host_ifindex => {}
                Ok(_) => owners.push(e.owner()),
                Err(err) => done.push(format!("cannot look up {}: {err}", e.host_ifname)),
            }
        }
        owners.sort();
        owners.dedup();
        let mut pending = Vec::new();
        for owner in owners {
            let removal = self.remove(&owner, false);
            if removal.removed || !removal.released.is_empty() {
                done.push(format!("removed {owner} (addresses {})", removal.released));
            }
            done.extend(removal.errors);
            pending.extend(removal.pending);
        }
        if let Err(e) = wait_all(pending) {
            done.push(format!("cannot save the state: {e}"));
        }
        done
    }

    /// Takes one attachment down: its datapath and policy entries, optionally its host
    /// veth, then its record and address. Submits the change; the caller waits for it.
    fn remove(&self, owner: &Owner, delete_veth: bool) -> Removal {
        let _busy = self.owners.lock(owner);
        let mut errors = Vec::new();
        let record = self.record(owner);
        if let Some(ep) = &record {
            if delete_veth && let Err(e) = self.host.delete_link(&ep.host_ifname) {
                errors.push(format!("{owner}: cannot delete {}: {e}", ep.host_ifname));
            }
            errors.extend(
                self.datapath
                    .detach(ep)
                    .into_iter()
                    .map(|e| format!("{owner}: {e}")),
            );
            errors.extend(self.policy_leave(ep.id));
        }
        // The address goes back last: until the datapath has forgotten the endpoint, a
        // new pod must not get it.
        let mut t = self.table();
        let removed = t.remove(owner).is_some();
        let (released, released_changes) = t.release(owner);
        let mut changes = Vec::new();
        if removed {
            changes.push(Change::EndpointGone(owner.clone()));
        }
        changes.extend(released_changes);
        let pending = (!changes.is_empty()).then(|| self.store.submit(changes));
        drop(t);
        if removed && let (Some(link), Some(ep)) = (self.cluster(), &record) {
            link.endpoint_withdrawn(ep);
        }
        if removed && let Some(ep) = &record {
            self.services_follow([Self::endpoint_namespace(ep)]);
        }
        Removal {
            removed,
            released,
            errors,
            pending,
        }
    }

    /// Resolves `which` (an endpoint id, a container id or a unique prefix of one) and
    /// runs `f` on its current record with its attachment locked.
    fn with_endpoint<T>(
        &self,
        which: &str,
        f: impl FnOnce(&EndpointRecord) -> Result<T, ControlError>,
    ) -> Result<T, ControlError> {
        let owner = self.find_endpoint(which)?.owner();
        let _busy = self.owners.lock(&owner);
        // It may have gone while we waited.
        let record = self.record(&owner).ok_or_else(|| {
            ControlError::NotFound(format!("endpoint {which} was deleted meanwhile"))
        })?;
        f(&record)
    }

    /// Replaces the record of an endpoint in the table and persists it.
    fn save_record(&self, record: &EndpointRecord) -> Result<(), StateError> {
        let pending = {
            let mut t = self.table();
            t.endpoints.insert(record.owner(), record.clone());
            self.store.submit(vec![Change::Endpoint(record.clone())])
        };
        pending.wait()
    }

    /// Sets (replaces) the bandwidth limits of the endpoint `which` (its id, container
    /// id or a unique prefix of one); an empty [`Bandwidth`] removes them. Validated
    /// first: a bad field changes nothing. If the kernel refuses, the old limits are put
    /// back.
    pub fn set_bandwidth(
        &self,
        which: &str,
        bw: &hypha_api::Bandwidth,
    ) -> Result<Endpoint, ControlError> {
        bandwidth::validate(bw)
            .map_err(|e| ControlError::BadRequest(format!("invalid bandwidth: {e}")))?;
        let record = self.with_endpoint(which, |current| {
            let old = current.bandwidth;
            let mut record = current.clone();
            record.bandwidth = (*bw != hypha_api::Bandwidth::default()).then_some(*bw);
            if let Err(e) = self.apply_limits(&record, old.as_ref(), true) {
                let mut back = record.clone();
                back.bandwidth = old;
                let rollback = match self.apply_limits(&back, record.bandwidth.as_ref(), true) {
                    Ok(()) => Vec::new(),
                    Err(undo) => {
                        vec![format!("cannot restore the old bandwidth limits: {undo}")]
                    }
                };
                return Err(e.with_rollback(rollback));
            }
            // The limits are in force: the record says so even if it cannot be saved.
            self.save_record(&record)?;
            Ok(record)
        })?;
        tracing::info!(endpoint = record.id, bandwidth = ?record.bandwidth, "bandwidth set");
        Ok(self.describe(&record, &self.all_drops()))
    }

    /// Turns the datapath's tracing of the endpoint `which` (its id, container id or a
    /// unique prefix of one) on or off, and saves the setting with the endpoint (a
    /// restarted agent traces it again). If the state cannot be saved, the datapath is
    /// put back as it was.
    pub fn set_debug(&self, which: &str, on: bool) -> Result<Endpoint, ControlError> {
        let switch = |on: bool| if on { "on" } else { "off" };
        let record = self.with_endpoint(which, |current| {
            let id = current.id;
            let was = current.debug;
            self.datapath.set_debug(current, on).map_err(|e| {
                ControlError::Datapath(format!(
                    "cannot turn tracing {} for endpoint {id}: {e}",
                    switch(on)
                ))
            })?;
            let mut record = current.clone();
            record.debug = on;
            if let Err(e) = self.save_record(&record) {
                self.table()
                    .endpoints
                    .insert(current.owner(), current.clone());
                let rollback = match self.datapath.set_debug(current, was) {
                    Ok(()) => Vec::new(),
                    Err(undo) => vec![format!(
                        "cannot turn tracing back {} for endpoint {id}: {undo}",
                        switch(was)
                    )],
                };
                return Err(ControlError::from(e).with_rollback(rollback));
            }
            Ok(record)
        })?;
        tracing::info!(endpoint = record.id, "datapath tracing {}", switch(on));
        Ok(self.describe(&record, &self.all_drops()))
    }

    /// Installs, changes or removes the endpoint's rate limiters so that they match
    /// `ep.bandwidth`, given the `old` limits (`None` when nothing is installed, which
    /// also installs what is unchanged). With `attached`, also sets or clears the
    /// ingress flag in the datapath: when adding, after the qdisc is in place; when
    /// removing, before the qdisc goes.
    fn apply_limits(
        &self,
        ep: &EndpointRecord,
        old: Option<&hypha_api::Bandwidth>,
        attached: bool,
    ) -> Result<(), ControlError> {
        let new = ep.bandwidth.as_ref();
        let netns = std::path::Path::new(&ep.netns);
        let pod = LimitSide::Pod {
            netns,
            ifname: &ep.ifname,
        };
        let host = LimitSide::HostVeth {
            ifindex: ep.host_ifindex,
        };
        let fresh = old.is_none();
        let (eg_new, eg_old) = (Limit::egress(new), Limit::egress(old));
        if eg_new != eg_old || (fresh && eg_new.is_some()) {
            self.host
                .set_rate_limit(pod, eg_new, self.datapath.flow_classifier())?;
        }
        let (in_new, in_old) = (Limit::ingress(new), Limit::ingress(old));
        let flag = hypha_common::ENDPOINT_F_INGRESS_LIMIT;
        let set_flag = |on: bool| -> Result<(), ControlError> {
            if !attached {
                return Ok(());
            }
            self.datapath
                .set_flags(ep, flag, if on { flag } else { 0 })
                .map_err(|e| ControlError::Datapath(e.to_string()))
        };
        match (in_new, in_old) {
            (Some(l), _) => {
                if in_new != in_old || fresh {
                    self.host
                        .set_rate_limit(host, Some(l), self.datapath.flow_classifier())?;
                }
                set_flag(true)?;
            }
            (None, Some(_)) => {
                set_flag(false)?;
                self.host.set_rate_limit(host, None, None)?;
            }
            (None, None) => {}
        }
        Ok(())
    }

    /// The datapath's drop counters, with the rate limiters' drops (counted by the
    /// kernel's qdiscs, not by the eBPF programs) as `DropReason::BandwidthLimit`
    /// (packets only: a qdisc does not count dropped bytes).
    fn all_drops(&self) -> Vec<(hypha_common::DropKey, hypha_common::Counter)> {
        let mut drops = self.datapath.drops().unwrap_or_else(|e| {
            tracing::warn!("cannot read drop counters: {e}");
            Vec::new()
        });
        let limited: Vec<EndpointRecord> = self
            .table()
            .endpoints
            .values()
            .filter(|e| e.bandwidth.is_some())
            .cloned()
            .collect();
        for ep in &limited {
            let bw = ep.bandwidth.as_ref();
            let sides = [
                (
                    Limit::egress(bw).is_some(),
                    LimitSide::Pod {
                        netns: std::path::Path::new(&ep.netns),
                        ifname: &ep.ifname,
                    },
                    DIR_EGRESS,
                ),
                (
                    Limit::ingress(bw).is_some(),
                    LimitSide::HostVeth {
                        ifindex: ep.host_ifindex,
                    },
                    hypha_common::DIR_INGRESS,
                ),
            ];
            for (limited, side, direction) in sides {
                if !limited {
                    continue;
                }
                match self.host.rate_limit_drops(side) {
                    Ok(Some(packets)) if packets > 0 => drops.push((
                        hypha_common::DropKey {
                            ifindex: ep.host_ifindex,
                            reason: DropReason::BandwidthLimit as u16,
                            direction,
                            _pad: 0,
                        },
                        hypha_common::Counter { packets, bytes: 0 },
                    )),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(endpoint = ep.id, "cannot read rate limiter drops: {e}")
                    }
                }
            }
        }
        drops
    }

    /// The host ifindex of endpoint `id` (the monitor filters drops by it).
    pub fn endpoint_ifindex(&self, id: u32) -> Option<u32> {
        let t = self.table();
        let owner = t.ids.get(&id)?;
        Some(t.endpoints[owner].host_ifindex)
    }

    /// Every endpoint with its counters; reads a copy of the table, so it never waits
    /// for an ADD's kernel work.
    pub fn list(&self) -> Vec<Endpoint> {
        let drops = self.all_drops();
        let endpoints: Vec<EndpointRecord> = self.table().endpoints.values().cloned().collect();
        let mut out: Vec<Endpoint> = endpoints.iter().map(|e| self.describe(e, &drops)).collect();
        out.sort_by_key(|e| e.id);
        out
    }

    fn describe(
        &self,
        ep: &EndpointRecord,
        drops: &[(hypha_common::DropKey, hypha_common::Counter)],
    ) -> Endpoint {
        let stats = self.datapath.stats(ep.host_ifindex).unwrap_or_else(|e| {
            tracing::warn!(endpoint = ep.id, "cannot read counters: {e}");
            EndpointStats::default()
        });
        Endpoint {
            id: ep.id,
            container_id: ep.container_id.clone(),
            ifname: ep.ifname.clone(),
            netns: ep.netns.clone(),
            host_ifname: ep.host_ifname.clone(),
            host_ifindex: ep.host_ifindex,
            address: ep.address,
            address6: ep.address6,
            pod_mac: ep.pod_mac,
            host_mac: ep.host_mac,
            labels: ep.labels.clone(),
            external_ipam: ep.external_ipam,
            bandwidth: ep.bandwidth,
            counters: counters(&stats.total()),
            counters4: counters(&stats.ipv4),
            counters6: counters(&stats.ipv6),
            drops: drops
                .iter()
                .filter(|(k, _)| k.ifindex == ep.host_ifindex)
                .map(|(k, c)| DropCount {
                    reason: DropReason::from_u16(k.reason)
                        .map(|r| r.name().to_owned())
                        .unwrap_or_else(|| format!("unknown-{}", k.reason)),
                    direction: if k.direction == DIR_EGRESS {
                        "egress"
                    } else {
                        "ingress"
                    }
                    .into(),
                    packets: c.packets,
                    bytes: c.bytes,
                })
                .collect(),
            debug: ep.debug,
            ports: ep.ports.clone(),
            identity: self.policy().engine.identity_of(ep.id),
        }
    }

    /// The agent's status; reads counts and the policy snapshot, never waiting for an
    /// ADD or a policy change.
    pub fn status(&self) -> Status {
        let (ipam, endpoints) = {
            let t = self.table();
            let four = t.ipam4.as_ref().map(|i| (i.capacity(), i.allocated()));
            let six = t.ipam6.as_ref().map(|i| (i.capacity(), i.allocated()));
            let (capacity, allocated) = four.unwrap_or_default();
            let (capacity6, allocated6) = six.unwrap_or_default();
            let small = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
            let ipam = IpamStatus {
                capacity: small(capacity),
                allocated: small(allocated),
                available: small(capacity.saturating_sub(allocated)),
                capacity6,
                allocated6,
                available6: capacity6.saturating_sub(allocated6),
            };
            (ipam, t.endpoints.len())
        };
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            node: NodeStatus {
                pod_cidr: self.config.pod_cidrs.v4,
                gateway: self.config.gateway(),
                pod_cidr6: self.config.pod_cidrs.v6,
                gateway6: self.config.gateway6(),
                host_device: self.config.host_device.clone(),
                masquerade: self.config.masquerade,
                socket: self.config.socket.display().to_string(),
                state_dir: self.config.state_dir.display().to_string(),
            },
            ipam,
            datapath: DatapathStatus {
                pin_dir: self.config.pin_dir.display().to_string(),
                adopted_endpoints: self.adopted,
                programs: self.datapath.programs(),
                attach: self.config.attach.name().to_owned(),
            },
            endpoints,
            policy: self.policy_view.load().status.clone(),
            services: hypha_api::ServicesStatus::of(&self.list_services()),
            cluster: self.cluster().map(|c| c.status()),
            routing: self.routing_status(),
        }
    }
}

/// What [`Agent::remove`] did.
struct Removal {
    removed: bool,
    released: Released,
    errors: Vec<String>,
    pending: Option<Pending>,
}

/// The addresses given back for one attachment, per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Released {
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

impl Released {
    fn iter(&self) -> impl Iterator<Item = IpAddr> {
        let v4 = self.v4.map(IpAddr::V4);
        v4.into_iter().chain(self.v6.map(IpAddr::V6))
    }

    fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

impl std::fmt::Display for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let all: Vec<String> = self.iter().map(|a| a.to_string()).collect();
        if all.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&all.join(", "))
        }
    }
}

/// The allocator of one family, restored from what was saved; `None` for a family the
/// node has no pod CIDR for, which must then hold nothing.
fn restore_ipam<A: Family>(
    cidr: Option<A::Net>,
    gateway: Option<A>,
    saved: IpamState<A>,
) -> Result<Option<Ipam<A>>, IpamError> {
    match cidr {
        Some(cidr) => Ipam::restore(cidr, gateway, saved).map(Some),
        None => match saved.allocations.into_iter().next() {
            Some((address, owner)) => Err(IpamError::OutOfRange {
                address: address.to_string(),
                owner,
                cidr: format!("(none: this node has no {} pod CIDR)", A::NAME),
            }),
            None => Ok(None),
        },
    }
}

/// `owner`'s address in one family: `wanted` (the `ips` capability) or the next free
/// one; the changes to persist if it is a new reservation.
fn allocate_in<A: Family>(
    ipam: &mut Ipam<A>,
    owner: &Owner,
    wanted: Option<A>,
    changes: &mut Vec<Change>,
) -> Result<A, IpamError>
where
    Change: FromReservation<A>,
{
    let before = ipam.owner_address(owner);
    let address = match wanted {
        Some(a) => ipam.allocate_specific(owner, a)?,
        None => ipam.allocate(owner)?,
    };
    if before.is_none() {
        changes.push(Change::reserved(owner.clone(), address));
        changes.push(Change::cursor(ipam.state().last));
    }
    Ok(address)
}

/// The [`Change`]s of one family's reservations.
trait FromReservation<A> {
    fn reserved(owner: Owner, address: A) -> Change;
    fn cursor(last: Option<A>) -> Change;
}

impl FromReservation<Ipv4Addr> for Change {
    fn reserved(owner: Owner, address: Ipv4Addr) -> Change {
        Change::Address { owner, address }
    }
    fn cursor(last: Option<Ipv4Addr>) -> Change {
        Change::IpamCursor(last)
    }
}

impl FromReservation<Ipv6Addr> for Change {
    fn reserved(owner: Owner, address: Ipv6Addr) -> Change {
        Change::Address6 { owner, address }
    }
    fn cursor(last: Option<Ipv6Addr>) -> Change {
        Change::Ipam6Cursor(last)
    }
}

/// The refusal of an address of a family the node has no pod CIDR for.
fn no_family(address: impl Into<IpAddr>) -> IpamError {
    let address = address.into();
    IpamError::NoFamily {
        address: address.to_string(),
        family: if address.is_ipv4() { "IPv4" } else { "IPv6" },
    }
}

/// Checks one family's address of a create request against the agent's allocator: for
/// the agent's IPAM it must be what was allocated (and one allocated must be given); for
/// a delegated IPAM it must not be one the agent reserved for someone.
fn check_claim<A: Family>(
    ipam: &Ipam<A>,
    owner: &Owner,
    address: Option<A>,
    external_ipam: bool,
) -> Result<(), ControlError> {
    match (ipam.owner_address(owner), address) {
        _ if external_ipam => {
            if let Some(address) = address
                && let Some(holder) = ipam.holder(address)
            {
                return Err(ControlError::Conflict(format!(
                    "address {address} from the delegated IPAM plugin is reserved for {holder} by the agent's own allocator"
                )));
            }
        }
        (Some(a), Some(address)) if a == address => {}
        (Some(a), Some(address)) => {
            return Err(ControlError::BadRequest(format!(
                "{owner} was allocated {a}, not {address}"
            )));
        }
        (Some(a), None) => {
            return Err(ControlError::BadRequest(format!(
                "{owner} was allocated {} address {a}, but the request does not give it",
                A::NAME
            )));
        }
        (None, Some(address)) => {
            return Err(ControlError::BadRequest(format!(
                "no address is allocated to {owner} in the {} pod CIDR (the request gives {address}); call /v1/ipam/allocate first",
                A::NAME
            )));
        }
        (None, None) => {}
    }
    Ok(())
}

fn counters(s: &hypha_common::FamilyStats) -> EndpointCounters {
    let dir = |d: &hypha_common::DirectionStats| DirectionCounters {
        passed: count(&d.passed),
        redirected: count(&d.redirected),
        tunnel: count(&d.tunnel),
        dropped: count(&d.dropped),
    };
    EndpointCounters {
        egress: dir(&s.egress),
        ingress: dir(&s.ingress),
    }
}

fn count(c: &hypha_common::Counter) -> PacketCount {
    PacketCount {
        packets: c.packets,
        bytes: c.bytes,
    }
}

fn validate_owner(container_id: &str, ifname: &str) -> Result<(), ControlError> {
    validate_container_id(container_id)?;
    validate_ifname(ifname)
}

/// A container id as the CNI specification defines it: an alphanumeric character, then
/// alphanumerics, `_`, `.` and `-` (libcni's `ValidateContainerID`). It reaches logs,
/// file names and map keys, so nothing else gets in.
fn validate_container_id(container_id: &str) -> Result<(), ControlError> {
    let mut bytes = container_id.bytes();
    let valid = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        return Ok(());
    }
    Err(ControlError::BadRequest(format!(
        "container_id {container_id:?} is not a valid container id: it must be an alphanumeric character followed by alphanumerics, '_', '.' or '-'"
    )))
}

/// An interface name as the CNI specification and the kernel take it (libcni's
/// `ValidateInterfaceName`, the kernel's `dev_valid_name`): 1 to 15 bytes, not `.` or
/// `..`, no `/`, `:` or white space.
fn validate_ifname(ifname: &str) -> Result<(), ControlError> {
    let problem = if ifname.is_empty() {
        Some("it is empty")
    } else if ifname.len() > 15 {
        Some("it is longer than 15 bytes")
    } else if ifname == "." || ifname == ".." {
        Some("it may not be '.' or '..'")
    } else if ifname
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some("it may not contain '/', ':', white space or control characters")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(ControlError::BadRequest(format!(
            "ifname {ifname:?} is not a valid interface name: {p}"
        ))),
    }
}

#[cfg(test)]
mod core_tests;
#[cfg(test)]
mod dual_stack_tests;
#[cfg(test)]
mod validation_tests;

#[cfg(test)]
mod cluster_tests;

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hypha_api::MacAddr;

    use super::*;
    use crate::datapath::fake::{FakeDatapath, FakeState};
    use crate::host::HostLink;
    use crate::host::fake::FakeHost;

    pub(super) use crate::state::mem::MemStore;

    fn config() -> AgentConfig {
        AgentConfig {
            pod_cidrs: "10.7.0.0/29".parse().unwrap(),
            ..AgentConfig::default()
        }
    }

    pub(super) fn host_with(names: &[(&str, u32)]) -> FakeHost {
        let h = FakeHost::default();
        for (n, i) in names {
            h.state().links.insert(
                (*n).into(),
                HostLink {
                    index: *i,
                    mac: MacAddr([2, 0, 0, 0, 0, *i as u8]),
                },
            );
        }
        h
    }

    pub(super) fn start(
        host: FakeHost,
        saved: PersistedState,
        dp: FakeDatapath,
    ) -> (Agent<FakeDatapath, FakeHost>, StartReport, MemStore) {
        let store = MemStore::with(saved.clone());
        let (a, r) = Agent::start(config(), dp, host, Box::new(store.clone()), saved).unwrap();
        (a, r, store)
    }

    fn add(
        agent: &mut Agent<FakeDatapath, FakeHost>,
        cid: &str,
        host: &str,
    ) -> Result<Endpoint, ControlError> {
        add_with_bandwidth(agent, cid, host, None)
    }

    /// As the plugin does: allocate, then create the endpoint.
    fn add_with_bandwidth(
        agent: &mut Agent<FakeDatapath, FakeHost>,
        cid: &str,
        host: &str,
        bandwidth: Option<hypha_api::Bandwidth>,
    ) -> Result<Endpoint, ControlError> {
        let alloc = agent.allocate(&AllocateRequest {
            container_id: cid.into(),
            ifname: "eth0".into(),
            address: None,
            address6: None,
        })?;
        agent.create_endpoint(&CreateEndpointRequest {
            bandwidth,
            ..create_request(cid, host, alloc.address.unwrap())
        })
    }

    /// The plugin's create request for `cid`'s eth0 with `address`, with a MAC of its own.
    fn create_request(cid: &str, host: &str, address: Ipv4Addr) -> CreateEndpointRequest {
        CreateEndpointRequest {
            container_id: cid.into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            host_ifname: host.into(),
            address: Some(address),
            pod_mac: MacAddr([2, 1, 1, 1, 1, address.octets()[3]]),
            labels: Default::default(),
            external_ipam: false,
            bandwidth: None,
            ports: Vec::new(),
            address6: None,
        }
    }

    #[test]
    fn add_list_delete_round_trip_persists_every_step() {
        let (mut agent, _, store) = start(
            host_with(&[("hypa", 10)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        let ep = add(&mut agent, "a", "hypa").unwrap();
        assert_eq!(ep.address, Some(Ipv4Addr::new(10, 7, 0, 2)));
        assert_eq!(ep.host_ifindex, 10);
        assert_eq!(agent.host.state().routes, vec![(10, ep.address.unwrap())]);
        assert!(agent.datapath.state().attached.contains_key(&10));
        assert_eq!(store.last().endpoints.len(), 1);
        let listed = agent.list();
        assert_eq!(listed[0].counters.egress.redirected.packets, 1);

        let del = agent.delete_endpoint("a", "eth0").unwrap();
        assert!(del.endpoint_removed);
        assert_eq!(del.address_released, ep.address);
        assert!(agent.datapath.state().attached.is_empty());
        assert!(store.last().endpoints.is_empty());
        assert!(store.last().ipam.allocations.is_empty());
        // Idempotent.
        let again = agent.delete_endpoint("a", "eth0").unwrap();
        assert!(!again.endpoint_removed && again.address_released.is_none());
    }

    #[test]
    fn second_add_for_the_same_attachment_conflicts_and_keeps_the_first() {
        let (mut agent, _, _) = start(
            host_with(&[("hypa", 10)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        let ep = add(&mut agent, "a", "hypa").unwrap();
        let err = add(&mut agent, "a", "hypa").unwrap_err();
        assert_eq!(err.http_status(), 409, "{err}");
        assert_eq!(agent.list().len(), 1);
        assert_eq!(
            agent.table().ipam4.as_ref().unwrap().owner_address(&Owner {
                container_id: "a".into(),
                ifname: "eth0".into()
            }),
            ep.address
        );
    }

    #[test]
    fn bandwidth_installs_limiters_sets_the_ingress_flag_and_survives_policy_diffs() {
        use hypha_api::Bandwidth;
        use hypha_common::{ENDPOINT_F_INGRESS_LIMIT, ENDPOINT_F_INGRESS_POLICY};
        let (mut agent, _, store) = start(
            host_with(&[("veth0", 5)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        let ep = add(&mut agent, "a", "veth0").unwrap();
        assert_eq!(agent.datapath.state().flags[&ep.id], 0);
        assert!(agent.host.state().limits.is_empty());

        let bw = Bandwidth {
            egress_rate: Some(10_000_000),
            ingress_rate: Some(20_000_000),
            ..Bandwidth::default()
        };
        let shown = agent.set_bandwidth("a", &bw).unwrap();
        assert_eq!(shown.bandwidth, Some(bw));
        assert_eq!(
            agent.host.state().limits["host veth #5"].rate_bits,
            20_000_000
        );
        assert_eq!(
            agent.host.state().limits["eth0 in /run/netns/x"].rate_bits,
            10_000_000
        );
        assert_eq!(
            agent.datapath.state().flags[&ep.id],
            ENDPOINT_F_INGRESS_LIMIT
        );
        assert_eq!(store.last().endpoints[0].bandwidth, Some(bw));
        // The limiters' drops show under their own reason.
        let listed = agent.list();
        assert!(
            listed[0]
                .drops
                .iter()
                .any(|d| d.reason == "bandwidth-limit" && d.direction == "ingress"),
            "{:?}",
            listed[0].drops
        );

        // A policy diff writes the policy bits and keeps the bandwidth bit.
        let diff = crate::policy::PolicyDiff {
            flags_set: vec![(ep.id, ENDPOINT_F_INGRESS_POLICY)],
            ..Default::default()
        };
        agent.datapath.apply_policy(&diff).unwrap();
        assert_eq!(
            agent.datapath.state().flags[&ep.id],
            ENDPOINT_F_INGRESS_POLICY | ENDPOINT_F_INGRESS_LIMIT
        );

        // Bad input: named, nothing changes.
        let bad = Bandwidth {
            egress_rate: Some(0),
            ..Bandwidth::default()
        };
        let err = agent.set_bandwidth(&ep.id.to_string(), &bad).unwrap_err();
        assert_eq!(err.http_status(), 400);
        assert!(err.to_string().contains("egressRate"), "{err}");
        assert_eq!(agent.list()[0].bandwidth, Some(bw));

        // A kernel refusal leaves the old limits in the record.
        agent.host.state().fail_limits = true;
        let other = Bandwidth {
            egress_rate: Some(1_000_000),
            ..Bandwidth::default()
        };
        assert!(agent.set_bandwidth("a", &other).is_err());
        assert_eq!(agent.list()[0].bandwidth, Some(bw));
        agent.host.state().fail_limits = false;

        // Removing clears the flag, keeps the policy bit, and removes both qdiscs.
        agent.set_bandwidth("a", &Bandwidth::default()).unwrap();
        assert!(agent.host.state().limits.is_empty());
        assert_eq!(
            agent.datapath.state().flags[&ep.id],
            ENDPOINT_F_INGRESS_POLICY
        );
        assert_eq!(agent.list()[0].bandwidth, None);
    }

    #[test]
    fn bandwidth_of_a_new_endpoint_is_validated_and_applied_before_attach() {
        let (mut agent, _, _) = start(
            host_with(&[("veth0", 5), ("veth1", 6)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        let mut req = |cid: &str, host: &str, bw: hypha_api::Bandwidth| {
            add_with_bandwidth(&mut agent, cid, host, Some(bw))
        };
        let err = req(
            "a",
            "veth0",
            hypha_api::Bandwidth {
                ingress_burst: Some(100),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("ingressBurst"), "{err}");
        let ep = req(
            "b",
            "veth1",
            hypha_api::Bandwidth {
                ingress_rate: Some(1_000_000),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            agent.datapath.state().flags[&ep.id],
            hypha_common::ENDPOINT_F_INGRESS_LIMIT
        );
        assert!(agent.host.state().limits.contains_key("host veth #6"));
    }

    #[test]
    fn create_needs_the_allocated_address_and_an_existing_veth() {
        let (mut agent, _, _) = start(
            host_with(&[]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        let err = add(&mut agent, "a", "missing0").unwrap_err();
        assert_eq!(err.http_status(), 400);
        assert!(
            err.to_string()
                .contains("host interface missing0 does not exist"),
            "{err}"
        );
        let err = agent
            .create_endpoint(&CreateEndpointRequest {
                container_id: "b".into(),
                ifname: "eth0".into(),
                netns: "/x".into(),
                host_ifname: "x".into(),
                address: Some(Ipv4Addr::new(10, 7, 0, 5)),
                pod_mac: MacAddr([2, 0, 0, 0, 0, 5]),
                labels: Default::default(),
                external_ipam: false,
                bandwidth: None,
                ports: Vec::new(),
                address6: None,
            })
            .unwrap_err();
        assert!(err.to_string().contains("no address is allocated"), "{err}");
    }

    #[test]
    fn failed_attach_leaves_no_endpoint_and_delete_releases_the_address() {
        let dp = FakeDatapath::from(FakeState {
            fail_attach: true,
            ..Default::default()
        });
        let (mut agent, _, store) =
            start(host_with(&[("hypa", 10)]), PersistedState::default(), dp);
        let err = add(&mut agent, "a", "hypa").unwrap_err();
        assert!(err.to_string().contains("cannot attach to hypa"), "{err}");
        assert!(agent.list().is_empty());
        // The plugin cleans up after a failed ADD:
        let del = agent.delete_endpoint("a", "eth0").unwrap();
        assert!(del.address_released.is_some());
        assert!(store.last().ipam.allocations.is_empty());
    }

    #[test]
    fn exhausted_pool_is_a_clear_error() {
        let names: Vec<(String, u32)> = (0..6).map(|i| (format!("h{i}"), 10 + i)).collect();
        let refs: Vec<(&str, u32)> = names.iter().map(|(n, i)| (n.as_str(), *i)).collect();
        let (mut agent, _, _) = start(
            host_with(&refs),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        for i in 0..5 {
            add(&mut agent, &format!("c{i}"), &format!("h{i}")).unwrap();
        }
        let err = add(&mut agent, "c5", "h5").unwrap_err();
        assert_eq!(err.http_status(), 507);
        assert!(
            err.to_string()
                .contains("no address left in pod CIDR 10.7.0.0/29"),
            "{err}"
        );
        assert_eq!(agent.status().ipam.available, 0);
    }

    #[test]
    fn restart_adopts_live_endpoints_and_cleans_dead_ones() {
        let (mut agent, _, store) = start(
            host_with(&[("hypa", 10), ("hypb", 11)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        let a = add(&mut agent, "a", "hypa").unwrap();
        let b = add(&mut agent, "b", "hypb").unwrap();
        let saved = store.last();
        drop(agent);

        // hypb vanished while the agent was down (its pod was deleted).
        let dp = FakeDatapath::from(FakeState {
            pinned: vec![10, 11],
            ..Default::default()
        });
        let (mut agent, report, store) = start(host_with(&[("hypa", 10)]), saved, dp);
        assert_eq!(
            report.adopted,
            vec![format!("hypa ({})", a.address.unwrap())]
        );
        assert_eq!(
            report.removed,
            vec![format!("hypb ({})", b.address.unwrap())]
        );
        assert_eq!(agent.status().datapath.adopted_endpoints, 1);
        assert_eq!(agent.list().len(), 1);
        assert_eq!(
            agent.datapath.state().pinned,
            vec![10],
            "sweep drops what nobody owns"
        );
        assert_eq!(store.last().ipam.allocations.len(), 1);
        // Endpoint ids keep counting up across restarts.
        let c = add(&mut agent, "c", "hypa2").err();
        assert!(c.is_some(), "hypa2 does not exist");
        assert!(store.last().next_endpoint_id > b.id);
    }

    #[test]
    fn gc_removes_what_no_valid_attachment_owns() {
        let (mut agent, _, store) = start(
            host_with(&[("hypa", 10), ("hypb", 11)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        add(&mut agent, "a", "hypa").unwrap();
        let b = add(&mut agent, "b", "hypb").unwrap();
        // An ADD that died after allocating: a reservation without endpoint.
        agent
            .allocate(&AllocateRequest {
                container_id: "c".into(),
                ifname: "eth0".into(),
                address: None,
                address6: None,
            })
            .unwrap();
        let resp = agent
            .gc(&GcRequest {
                valid_attachments: vec![Attachment {
                    container_id: "b".into(),
                    ifname: "eth0".into(),
                }],
            })
            .unwrap();
        let removed: Vec<&str> = resp
            .removed
            .iter()
            .map(|a| a.container_id.as_str())
            .collect();
        assert_eq!(removed, vec!["a", "c"]);
        assert_eq!(resp.released.len(), 2);
        assert!(resp.errors.is_empty());
        assert!(
            !agent.host.state().links.contains_key("hypa"),
            "a's veth deleted"
        );
        assert!(agent.host.state().links.contains_key("hypb"));
        assert_eq!(agent.list().len(), 1);
        assert_eq!(store.last().ipam.allocations.len(), 1);
        assert_eq!(
            store.last().ipam.allocations.keys().next(),
            b.address.as_ref()
        );
    }

    #[test]
    fn reconcile_finishes_deferred_deletes_and_reaps_vanished_veths() {
        let (mut agent, _, store) = start(
            host_with(&[("hypa", 10), ("hypb", 11), ("hypc", 12)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        for (c, h) in [("a", "hypa"), ("b", "hypb"), ("c", "hypc")] {
            add(&mut agent, c, h).unwrap();
        }
        assert!(agent.reconcile(&[]).is_empty(), "nothing to do");
        agent.host.state().links.remove("hypb"); // pod b deleted behind our back
        let done = agent.reconcile(&[Attachment {
            container_id: "a".into(),
            ifname: "eth0".into(),
        }]);
        assert_eq!(done.len(), 2, "{done:?}");
        let left: Vec<String> = agent.list().into_iter().map(|e| e.container_id).collect();
        assert_eq!(left, vec!["c"]);
        assert_eq!(store.last().ipam.allocations.len(), 1);
    }

    #[test]
    fn specific_and_external_addresses() {
        let (mut agent, _, _) = start(
            host_with(&[("hypa", 10), ("hypb", 11), ("hypc", 12)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        let want = Ipv4Addr::new(10, 7, 0, 5);
        let alloc = agent
            .allocate(&AllocateRequest {
                container_id: "a".into(),
                ifname: "eth0".into(),
                address: Some(want),
                address6: None,
            })
            .unwrap();
        assert_eq!(alloc.address, Some(want));
        let err = agent
            .allocate(&AllocateRequest {
                container_id: "b".into(),
                ifname: "eth0".into(),
                address: Some(want),
                address6: None,
            })
            .unwrap_err();
        assert!(err.to_string().contains("already in use"), "{err}");

        let external =
            |agent: &mut Agent<FakeDatapath, FakeHost>, cid: &str, host: &str, address| {
                agent.create_endpoint(&CreateEndpointRequest {
                    container_id: cid.into(),
                    ifname: "eth0".into(),
                    netns: "/x".into(),
                    host_ifname: host.into(),
                    address,
                    pod_mac: MacAddr([2, 0, 0, 0, 0, address.unwrap().octets()[3]]),
                    labels: Default::default(),
                    external_ipam: true,
                    bandwidth: None,
                    ports: Vec::new(),
                    address6: None,
                })
            };
        // An address from a delegated plugin needs no allocation, and releases none.
        let ep = external(&mut agent, "b", "hypb", Some(Ipv4Addr::new(192, 0, 2, 10))).unwrap();
        assert!(ep.external_ipam);
        // It may not take an address the agent reserved for someone else.
        let err = external(&mut agent, "c", "hypc", Some(want)).unwrap_err();
        assert_eq!(err.http_status(), 409, "{err}");
        let del = agent.delete_endpoint("b", "eth0").unwrap();
        assert!(del.endpoint_removed && del.address_released.is_none());
    }

    #[test]
    fn a_failed_save_after_attach_reports_the_failed_detach_too() {
        let (agent, _, store) = start(
            host_with(&[("hypa", 10)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        let alloc = agent
            .allocate(&AllocateRequest {
                container_id: "a".into(),
                ifname: "eth0".into(),
                address: None,
                address6: None,
            })
            .unwrap();
        store.fail(true);
        agent.datapath.state().fail_detach = true;
        let err = agent
            .create_endpoint(&create_request("a", "hypa", alloc.address.unwrap()))
            .unwrap_err()
            .to_string();
        // The step that failed and the rollback step that failed, both named.
        assert!(
            err.contains("cannot write /var/lib/hypha/state.redb"),
            "{err}"
        );
        assert!(
            err.contains("detaching hypa: fake datapath: cannot detach from hypa"),
            "{err}"
        );
        assert!(agent.list().is_empty());
    }

    #[test]
    fn a_failed_bandwidth_change_reports_the_failed_restore_too() {
        let (mut agent, _, _) = start(
            host_with(&[("veth0", 5)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        add(&mut agent, "a", "veth0").unwrap();
        agent.host.state().fail_limits = true;
        let bw = hypha_api::Bandwidth {
            egress_rate: Some(1_000_000),
            ..Default::default()
        };
        let err = agent.set_bandwidth("a", &bw).unwrap_err().to_string();
        assert!(
            err.contains("undoing it also failed: cannot restore the old bandwidth limits"),
            "{err}"
        );
    }

    #[test]
    fn a_failed_attach_reports_the_failed_policy_restore_too() {
        let dp = FakeDatapath::from(FakeState {
            fail_attach: true,
            ..Default::default()
        });
        let (agent, _, _) = start(host_with(&[("hypa", 10)]), PersistedState::default(), dp);
        // A policy that selects every pod, so that attaching writes policy entries first.
        agent
            .apply_policies(&[hypha_api::PolicySource {
                source: "p.yaml".into(),
                content: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: default}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n".into(),
            }])
            .unwrap();
        let alloc = agent
            .allocate(&AllocateRequest {
                container_id: "a".into(),
                ifname: "eth0".into(),
                address: None,
                address6: None,
            })
            .unwrap();
        // The attach fails; the policy write before it (the additions) succeeds, the
        // one that restores fails.
        let applied = agent.datapath.state().diffs.len();
        agent.datapath.state().fail_apply_after = Some(applied + 1);
        let err = agent
            .create_endpoint(&create_request("a", "hypa", alloc.address.unwrap()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot attach to hypa"), "{err}");
        assert!(
            err.contains("undoing it also failed: cannot restore the policy maps"),
            "{err}"
        );
    }

    #[test]
    fn debug_is_switched_saved_listed_and_restored() {
        let (mut agent, _, store) = start(
            host_with(&[("hypa", 10), ("hypb", 11)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        let a = add(&mut agent, "a", "hypa").unwrap();
        let b = add(&mut agent, "b", "hypb").unwrap();
        assert!(
            !a.debug && agent.datapath.state().debug.is_empty(),
            "off by default"
        );

        let shown = agent.set_debug("a", true).unwrap();
        assert!(shown.debug);
        assert_eq!(agent.datapath.state().debug, [10].into());
        assert!(
            store
                .last()
                .endpoints
                .iter()
                .any(|e| e.id == a.id && e.debug)
        );
        let listed = agent.list();
        assert_eq!(
            listed.iter().map(|e| e.debug).collect::<Vec<_>>(),
            vec![true, false]
        );
        let err = agent.set_debug("nobody", true).unwrap_err();
        assert_eq!(err.http_status(), 404, "{err}");

        // Saved: a restarted agent traces it again.
        let saved = store.last();
        drop(agent);
        let dp = FakeDatapath::from(FakeState {
            pinned: vec![10, 11],
            ..Default::default()
        });
        let (agent, _, store) = start(host_with(&[("hypa", 10), ("hypb", 11)]), saved, dp);
        assert_eq!(agent.datapath.state().debug, [10].into());

        // A save that fails puts the datapath back and says what failed.
        store.fail(true);
        let err = agent.set_debug(&b.id.to_string(), true).unwrap_err();
        assert!(err.to_string().contains("cannot write"), "{err}");
        assert_eq!(agent.datapath.state().debug, [10].into());
        assert!(!agent.list()[1].debug);
        store.fail(false);

        agent.set_debug(&a.id.to_string(), false).unwrap();
        assert!(agent.datapath.state().debug.is_empty());
        assert!(store.last().endpoints.iter().all(|e| !e.debug));
        // Detaching removes the tracing with the endpoint.
        agent.set_debug("b", true).unwrap();
        agent.delete_endpoint("b", "eth0").unwrap();
        assert!(agent.datapath.state().debug.is_empty());
    }

    #[test]
    fn check_reports_what_is_missing() {
        let (mut agent, _, _) = start(
            host_with(&[("hypa", 10)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        add(&mut agent, "a", "hypa").unwrap();
        assert!(
            agent
                .check_endpoint("a", "eth0")
                .unwrap()
                .problems
                .is_empty()
        );
        agent.datapath.state().attached.clear();
        agent.host.state().links.remove("hypa");
        let problems = agent.check_endpoint("a", "eth0").unwrap().problems;
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("host interface hypa is gone"));
        assert_eq!(
            agent.check_endpoint("x", "eth0").unwrap_err().http_status(),
            404
        );
    }
}
