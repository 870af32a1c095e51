//! The control plane: endpoints and addresses, over the datapath and host traits.
//!
//! Every change is persisted before it is answered, and every answer says what went
//! wrong in words an operator can act on.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Instant;

use hypha_api::{
    AllocateRequest, Allocation, Attachment, CreateEndpointRequest, DatapathStatus, DeleteResponse,
    DirectionCounters, DropCount, Endpoint, EndpointCheck, EndpointCounters, GcRequest, GcResponse,
    IpamStatus, NodeStatus, PacketCount, Status,
};
use hypha_common::{DIR_EGRESS, DropReason, EndpointStats};

use crate::bandwidth::{self, Limit};
use crate::config::AgentConfig;
use crate::datapath::{Adoption, Datapath};
use crate::host::{HostNetwork, LimitSide, NodeNetwork};
use crate::ipam::{Ipam, IpamError, Owner};
use crate::state::{EndpointRecord, PersistedState, StateError, StateStore};

mod policy;

use policy::PolicyState;

/// Why a request failed; `status` maps each to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
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
            ControlError::Policy(_) => 400,
            ControlError::Ipam(IpamError::Exhausted { .. }) => 507,
            // What the request asked for is taken or not to be had: the caller's doing.
            ControlError::Ipam(IpamError::InUse { .. } | IpamError::OwnerHoldsOther { .. }) => 409,
            ControlError::Ipam(IpamError::NotAllocatable { .. }) => 400,
            ControlError::RollbackFailed { error, .. } => error.http_status(),
            _ => 500,
        }
    }
}

/// Where persistence goes; a trait object so tests can run without a state directory.
pub trait Persist: Send {
    fn save(&self, state: &PersistedState) -> Result<(), StateError>;
}

impl Persist for StateStore {
    fn save(&self, state: &PersistedState) -> Result<(), StateError> {
        StateStore::save(self, state)
    }
}

pub struct Agent<D: Datapath, H: HostNetwork> {
    config: AgentConfig,
    datapath: D,
    host: H,
    store: Box<dyn Persist>,
    ipam: Ipam,
    endpoints: Vec<EndpointRecord>,
    next_endpoint_id: u32,
    adopted: usize,
    started: Instant,
    policy: PolicyState,
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
        mut host: H,
        store: Box<dyn Persist>,
        saved: PersistedState,
    ) -> Result<(Self, StartReport), ControlError> {
        let gateway = config.gateway();
        host.setup_node(&NodeNetwork {
            pod_cidr: config.pod_cidr,
            gateway,
            host_device: config.host_device.clone(),
            masquerade: config.masquerade,
        })?;
        let ipam = Ipam::restore(config.pod_cidr, gateway, saved.ipam)?;
        let mut agent = Agent {
            config,
            datapath,
            host,
            store,
            ipam,
            endpoints: Vec::new(),
            next_endpoint_id: saved.next_endpoint_id.max(1),
            adopted: 0,
            started: Instant::now(),
            policy: PolicyState::restore(saved.policies, saved.namespace_labels, saved.identities),
        };
        let mut report = StartReport::default();
        for ep in saved.endpoints {
            let name = format!("{} ({})", ep.host_ifname, ep.address);
            let alive = agent
                .host
                .link(&ep.host_ifname)?
                .is_some_and(|l| l.index == ep.host_ifindex);
            if !alive {
                for e in agent.datapath.detach(&ep) {
                    report.warnings.push(format!("{name}: {e}"));
                }
                agent.ipam.release(&ep.owner());
                report.removed.push(name);
                continue;
            }
            agent.endpoints.push(ep);
        }
        // Policy entries and identities first, then the endpoints with their flags, then
        // the removal of what no policy wants any more.
        let (additions, removals) = agent.policy_start(&mut report.warnings);
        if let Err(e) = agent.datapath.apply_policy(&additions) {
            report
                .warnings
                .push(format!("cannot write the policy maps: {e}"));
        }
        for ep in agent.endpoints.clone() {
            let name = format!("{} ({})", ep.host_ifname, ep.address);
            if let Err(e) = agent.host.route_pod(ep.host_ifindex, ep.address, gateway) {
                report
                    .warnings
                    .push(format!("{name}: cannot restore its route: {e}"));
            }
            // Rate limiters first (their qdiscs), so that the ingress flag never points
            // same-node traffic at a qdisc that is not there.
            if ep.bandwidth.is_some()
                && let Err(e) = agent.apply_limits(&ep, None, false)
            {
                report
                    .warnings
                    .push(format!("{name}: cannot restore its bandwidth limits: {e}"));
            }
            let flags =
                agent.policy_flags(ep.id) | bandwidth::endpoint_flags(ep.bandwidth.as_ref());
            match agent.datapath.adopt(&ep, flags) {
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
        for e in agent.datapath.sweep(&agent.endpoints) {
            report
                .warnings
                .push(format!("sweeping stale datapath entries: {e}"));
        }
        agent.persist()?;
        Ok((agent, report))
    }

    fn persist(&self) -> Result<(), StateError> {
        self.store.save(&PersistedState {
            next_endpoint_id: self.next_endpoint_id,
            ipam: self.ipam.state().clone(),
            endpoints: self.endpoints.clone(),
            policies: self.policy.stored(),
            namespace_labels: self.policy.namespaces.clone(),
            identities: self.policy.installed.identities.clone(),
            ..PersistedState::default()
        })
    }

    fn find(&self, container_id: &str, ifname: &str) -> Option<usize> {
        self.endpoints
            .iter()
            .position(|e| e.container_id == container_id && e.ifname == ifname)
    }

    pub fn allocate(&mut self, req: &AllocateRequest) -> Result<Allocation, ControlError> {
        validate_owner(&req.container_id, &req.ifname)?;
        if let Some(i) = self.find(&req.container_id, &req.ifname) {
            let ep = &self.endpoints[i];
            return Err(ControlError::Conflict(format!(
                "container {} already has interface {} attached as endpoint {} ({}); delete it first",
                ep.container_id, ep.ifname, ep.id, ep.address
            )));
        }
        let owner = Owner {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
        };
        let before = self.ipam.owner_address(&owner);
        let address = match req.address {
            Some(wanted) => self.ipam.allocate_specific(&owner, wanted)?,
            None => self.ipam.allocate(&owner)?,
        };
        if before.is_none()
            && let Err(e) = self.persist()
        {
            self.ipam.release(&owner);
            return Err(e.into());
        }
        Ok(Allocation {
            address,
            gateway: self.config.gateway(),
            pod_cidr: self.config.pod_cidr,
        })
    }

    pub fn create_endpoint(
        &mut self,
        req: &CreateEndpointRequest,
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
        if let Some(i) = self.find(&req.container_id, &req.ifname) {
            return Err(ControlError::Conflict(format!(
                "container {} interface {} is already endpoint {}",
                req.container_id, req.ifname, self.endpoints[i].id
            )));
        }
        let owner = Owner {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
        };
        if let Some(other) = self.endpoints.iter().find(|e| e.address == req.address) {
            return Err(ControlError::Conflict(format!(
                "address {} is already used by endpoint {} (container {} interface {})",
                req.address, other.id, other.container_id, other.ifname
            )));
        }
        match self.ipam.owner_address(&owner) {
            _ if req.external_ipam => {
                if let Some(holder) = self.ipam.holder(req.address) {
                    return Err(ControlError::Conflict(format!(
                        "address {} from the delegated IPAM plugin is reserved for {holder} by the agent's own allocator",
                        req.address
                    )));
                }
            }
            Some(a) if a == req.address => {}
            Some(a) => {
                return Err(ControlError::BadRequest(format!(
                    "{owner} was allocated {a}, not {}",
                    req.address
                )));
            }
            None => {
                return Err(ControlError::BadRequest(format!(
                    "no address is allocated to {owner}; call /v1/ipam/allocate first"
                )));
            }
        }
        if let Some(other) = self.endpoints.iter().find(|e| e.pod_mac == req.pod_mac) {
            // The pod's MAC is how the datapath knows it (anti-spoofing, the MAC it
            // rewrites to): two endpoints cannot share one. The reservation made for this
            // request goes back, so that a refused ADD leaves nothing behind.
            let released = if req.external_ipam {
                None
            } else {
                self.ipam.release(&owner)
            };
            if released.is_some()
                && let Err(e) = self.persist()
            {
                tracing::error!("cannot save the release of {owner}'s address: {e}");
            }
            return Err(ControlError::Conflict(format!(
                "MAC address {} is already used by endpoint {} (container {} interface {}){}",
                req.pod_mac,
                other.id,
                other.container_id,
                other.ifname,
                released
                    .map(|a| format!("; address {a} reserved for {owner} released"))
                    .unwrap_or_default()
            )));
        }
        let link = self.host.link(&req.host_ifname)?.ok_or_else(|| {
            ControlError::BadRequest(format!(
                "host interface {} does not exist in the agent's network namespace",
                req.host_ifname
            ))
        })?;
        let record = EndpointRecord {
            id: self.next_endpoint_id,
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            netns: req.netns.clone(),
            host_ifname: req.host_ifname.clone(),
            host_ifindex: link.index,
            address: req.address,
            pod_mac: req.pod_mac,
            host_mac: link.mac,
            labels: req.labels.clone(),
            external_ipam: req.external_ipam,
            bandwidth: req.bandwidth,
            debug: false,
        };
        self.host
            .route_pod(link.index, req.address, self.config.gateway())?;
        // The limiters before the programs: the ingress flag set by `attach` must find its
        // qdisc in place. If a later step fails, they go with the veth hypha-cni deletes.
        if record.bandwidth.is_some() {
            self.apply_limits(&record, None, false)?;
        }
        // Compiled with the new endpoint before it is attached, so that it starts with
        // its flags, entries and ipcache in place.
        self.attach_with_policy(&record)?;
        self.next_endpoint_id += 1;
        self.endpoints.push(record.clone());
        if let Err(e) = self.persist() {
            self.endpoints.pop();
            let mut rollback: Vec<String> = self
                .datapath
                .detach(&record)
                .into_iter()
                .map(|e| format!("detaching {}: {e}", record.host_ifname))
                .collect();
            rollback.extend(self.policy_refresh());
            return Err(ControlError::from(e).with_rollback(rollback));
        }
        Ok(self.describe(&record, &[]))
    }

    /// Removes the endpoint and releases its address; both may already be gone.
    pub fn delete_endpoint(
        &mut self,
        container_id: &str,
        ifname: &str,
    ) -> Result<DeleteResponse, ControlError> {
        validate_owner(container_id, ifname)?;
        let owner = Owner {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
        };
        let (removed, released, mut errors) = self.remove(&owner, false);
        if removed {
            errors.extend(self.policy_refresh());
        }
        if removed || released.is_some() {
            self.persist()?;
        }
        if !errors.is_empty() {
            return Err(ControlError::Datapath(format!(
                "endpoint of {owner} removed, but cleaning the datapath failed: {}",
                errors.join("; ")
            )));
        }
        Ok(DeleteResponse {
            endpoint_removed: removed,
            address_released: released,
        })
    }

    /// The endpoint of one attachment and what of it is missing, for CNI CHECK.
    pub fn check_endpoint(
        &mut self,
        container_id: &str,
        ifname: &str,
    ) -> Result<EndpointCheck, ControlError> {
        validate_owner(container_id, ifname)?;
        let i = self.find(container_id, ifname).ok_or_else(|| {
            ControlError::NotFound(format!(
                "no endpoint for container {container_id} interface {ifname}"
            ))
        })?;
        let ep = self.endpoints[i].clone();
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
    pub fn gc(&mut self, req: &GcRequest) -> Result<GcResponse, ControlError> {
        for (i, a) in req.valid_attachments.iter().enumerate() {
            validate_owner(&a.container_id, &a.ifname)
                .map_err(|e| ControlError::BadRequest(format!("valid_attachments[{i}]: {e}")))?;
        }
        let valid: BTreeSet<(&str, &str)> = req
            .valid_attachments
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        let mut stale: BTreeSet<Owner> = self
            .endpoints
            .iter()
            .map(EndpointRecord::owner)
            .chain(self.ipam.owners().cloned())
            .collect();
        stale.retain(|o| !valid.contains(&(o.container_id.as_str(), o.ifname.as_str())));
        let mut resp = GcResponse::default();
        for owner in stale {
            let (removed, released, errors) = self.remove(&owner, true);
            resp.errors.extend(errors);
            resp.released.extend(released);
            if removed || released.is_some() {
                resp.removed.push(Attachment {
                    container_id: owner.container_id,
                    ifname: owner.ifname,
                });
            }
        }
        resp.errors.extend(self.policy_refresh());
        self.persist()?;
        Ok(resp)
    }

    /// Finishes the deletes `hypha-cni` could not hand over while the agent was down, and
    /// removes endpoints whose host veth vanished (their pod is gone). Returns what it did.
    pub fn reconcile(&mut self, deferred: &[Attachment]) -> Vec<String> {
        let mut done = Vec::new();
        let mut owners: Vec<Owner> = deferred
            .iter()
            .map(|a| Owner {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            })
            .collect();
        for e in &self.endpoints {
            match self.host.link(&e.host_ifname) {
                Ok(Some(l)) if l.index == e.host_ifindex => {}
                Ok(_) => owners.push(e.owner()),
                Err(err) => done.push(format!("cannot look up {}: {err}", e.host_ifname)),
            }
        }
        owners.sort();
        owners.dedup();
        for owner in owners {
            let (removed, released, errors) = self.remove(&owner, false);
            if removed || released.is_some() {
                done.push(format!("removed {owner} (address {released:?})"));
            }
            done.extend(errors);
        }
        if !done.is_empty() {
            done.extend(self.policy_refresh());
        }
        if !done.is_empty()
            && let Err(e) = self.persist()
        {
            done.push(format!("cannot save the state: {e}"));
        }
        done
    }

    /// Takes one attachment down: endpoint, datapath, optionally its host veth, address.
    /// Does not persist.
    fn remove(
        &mut self,
        owner: &Owner,
        delete_veth: bool,
    ) -> (bool, Option<Ipv4Addr>, Vec<String>) {
        let mut errors = Vec::new();
        let removed = self
            .find(&owner.container_id, &owner.ifname)
            .map(|i| self.endpoints.remove(i));
        if let Some(ep) = &removed {
            if delete_veth && let Err(e) = self.host.delete_link(&ep.host_ifname) {
                errors.push(format!("{owner}: cannot delete {}: {e}", ep.host_ifname));
            }
            errors.extend(
                self.datapath
                    .detach(ep)
                    .into_iter()
                    .map(|e| format!("{owner}: {e}")),
            );
        }
        let released = self.ipam.release(owner);
        (removed.is_some(), released, errors)
    }

    /// Sets (replaces) the bandwidth limits of the endpoint `which` (its id, container
    /// id or a unique prefix of one); an empty [`Bandwidth`] removes them. Validated
    /// first: a bad field changes nothing. If the kernel refuses, the old limits are put
    /// back.
    pub fn set_bandwidth(
        &mut self,
        which: &str,
        bw: &hypha_api::Bandwidth,
    ) -> Result<Endpoint, ControlError> {
        bandwidth::validate(bw)
            .map_err(|e| ControlError::BadRequest(format!("invalid bandwidth: {e}")))?;
        let id = self.find_endpoint(which)?.id;
        let i = self
            .endpoints
            .iter()
            .position(|e| e.id == id)
            .expect("found above");
        let old = self.endpoints[i].bandwidth;
        let mut record = self.endpoints[i].clone();
        record.bandwidth = (*bw != hypha_api::Bandwidth::default()).then_some(*bw);
        if let Err(e) = self.apply_limits(&record, old.as_ref(), true) {
            let new = record.bandwidth;
            record.bandwidth = old;
            let rollback = match self.apply_limits(&record, new.as_ref(), true) {
                Ok(()) => Vec::new(),
                Err(undo) => vec![format!("cannot restore the old bandwidth limits: {undo}")],
            };
            return Err(e.with_rollback(rollback));
        }
        self.endpoints[i] = record.clone();
        if let Err(e) = self.persist() {
            // The limits are in force but not saved: say so, and keep the record in line
            // with the kernel.
            return Err(e.into());
        }
        tracing::info!(endpoint = id, bandwidth = ?record.bandwidth, "bandwidth set");
        Ok(self.describe(&record, &self.all_drops()))
    }

    /// Turns the datapath's tracing of the endpoint `which` (its id, container id or a
    /// unique prefix of one) on or off, and saves the setting with the endpoint (a
    /// restarted agent traces it again). If the state cannot be saved, the datapath is
    /// put back as it was.
    pub fn set_debug(&mut self, which: &str, on: bool) -> Result<Endpoint, ControlError> {
        let id = self.find_endpoint(which)?.id;
        let i = self
            .endpoints
            .iter()
            .position(|e| e.id == id)
            .expect("found above");
        let was = self.endpoints[i].debug;
        let switch = |on: bool| if on { "on" } else { "off" };
        self.datapath
            .set_debug(&self.endpoints[i], on)
            .map_err(|e| {
                ControlError::Datapath(format!(
                    "cannot turn tracing {} for endpoint {id}: {e}",
                    switch(on)
                ))
            })?;
        self.endpoints[i].debug = on;
        if let Err(e) = self.persist() {
            self.endpoints[i].debug = was;
            let rollback = match self.datapath.set_debug(&self.endpoints[i], was) {
                Ok(()) => Vec::new(),
                Err(undo) => vec![format!(
                    "cannot turn tracing back {} for endpoint {id}: {undo}",
                    switch(was)
                )],
            };
            return Err(ControlError::from(e).with_rollback(rollback));
        }
        tracing::info!(endpoint = id, "datapath tracing {}", switch(on));
        let record = self.endpoints[i].clone();
        Ok(self.describe(&record, &self.all_drops()))
    }

    /// Installs, changes or removes the endpoint's rate limiters so that they match
    /// `ep.bandwidth`, given the `old` limits (`None` when nothing is installed, which
    /// also installs what is unchanged). With `attached`, also sets or clears the
    /// ingress flag in the datapath: when adding, after the qdisc is in place; when
    /// removing, before the qdisc goes.
    fn apply_limits(
        &mut self,
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
            self.host.set_rate_limit(pod, eg_new)?;
        }
        let (in_new, in_old) = (Limit::ingress(new), Limit::ingress(old));
        let flag = hypha_common::ENDPOINT_F_INGRESS_LIMIT;
        let set_flag = |agent: &mut Self, on: bool| {
            if !attached {
                return Ok(());
            }
            agent
                .datapath
                .set_flags(ep, flag, if on { flag } else { 0 })
                .map_err(|e| ControlError::Datapath(e.to_string()))
        };
        match (in_new, in_old) {
            (Some(l), _) => {
                if in_new != in_old || fresh {
                    self.host.set_rate_limit(host, Some(l))?;
                }
                set_flag(self, true)?;
            }
            (None, Some(_)) => {
                set_flag(self, false)?;
                self.host.set_rate_limit(host, None)?;
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
        for ep in self.endpoints.iter().filter(|e| e.bandwidth.is_some()) {
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

    pub fn list(&self) -> Vec<Endpoint> {
        let drops = self.all_drops();
        self.endpoints
            .iter()
            .map(|e| self.describe(e, &drops))
            .collect()
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
            pod_mac: ep.pod_mac,
            host_mac: ep.host_mac,
            labels: ep.labels.clone(),
            external_ipam: ep.external_ipam,
            bandwidth: ep.bandwidth,
            counters: counters(&stats),
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
        }
    }

    pub fn status(&self) -> Status {
        let capacity = self.ipam.capacity();
        let allocated = self.ipam.allocated();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            node: NodeStatus {
                pod_cidr: self.config.pod_cidr,
                gateway: self.config.gateway(),
                host_device: self.config.host_device.clone(),
                masquerade: self.config.masquerade,
                socket: self.config.socket.display().to_string(),
                state_dir: self.config.state_dir.display().to_string(),
            },
            ipam: IpamStatus {
                capacity,
                allocated,
                available: capacity.saturating_sub(allocated),
            },
            datapath: DatapathStatus {
                pin_dir: self.config.pin_dir.display().to_string(),
                adopted_endpoints: self.adopted,
                programs: self.datapath.programs(),
            },
            endpoints: self.endpoints.len(),
            policy: self.policy_status(),
        }
    }
}

fn counters(s: &EndpointStats) -> EndpointCounters {
    let dir = |d: &hypha_common::DirectionStats| DirectionCounters {
        passed: count(&d.passed),
        redirected: count(&d.redirected),
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
mod validation_tests;

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::{Arc, Mutex};

    use hypha_api::MacAddr;

    use super::*;
    use crate::datapath::fake::FakeDatapath;
    use crate::host::HostLink;
    use crate::host::fake::FakeHost;

    #[derive(Clone, Default)]
    pub(super) struct MemStore(
        pub(super) Arc<Mutex<Vec<PersistedState>>>,
        /// Make `save` fail, as a full disk would.
        pub(super) Arc<std::sync::atomic::AtomicBool>,
    );

    impl Persist for MemStore {
        fn save(&self, state: &PersistedState) -> Result<(), StateError> {
            if self.1.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StateError::Io {
                    op: "write",
                    path: "/var/lib/hypha/state.json".into(),
                    source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                });
            }
            self.0.lock().unwrap().push(state.clone());
            Ok(())
        }
    }

    impl MemStore {
        fn fail(&self, on: bool) {
            self.1.store(on, std::sync::atomic::Ordering::Relaxed);
        }
    }

    impl MemStore {
        pub(super) fn last(&self) -> PersistedState {
            self.0.lock().unwrap().last().cloned().unwrap()
        }
    }

    fn config() -> AgentConfig {
        AgentConfig {
            pod_cidr: "10.7.0.0/29".parse().unwrap(),
            ..AgentConfig::default()
        }
    }

    pub(super) fn host_with(names: &[(&str, u32)]) -> FakeHost {
        let mut h = FakeHost::default();
        for (n, i) in names {
            h.links.insert(
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
        let store = MemStore::default();
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
        })?;
        agent.create_endpoint(&CreateEndpointRequest {
            bandwidth,
            ..create_request(cid, host, alloc.address)
        })
    }

    /// The plugin's create request for `cid`'s eth0 with `address`, with a MAC of its own.
    fn create_request(cid: &str, host: &str, address: Ipv4Addr) -> CreateEndpointRequest {
        CreateEndpointRequest {
            container_id: cid.into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            host_ifname: host.into(),
            address,
            pod_mac: MacAddr([2, 1, 1, 1, 1, address.octets()[3]]),
            labels: Default::default(),
            external_ipam: false,
            bandwidth: None,
            ports: Vec::new(),
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
        assert_eq!(ep.address, Ipv4Addr::new(10, 7, 0, 2));
        assert_eq!(ep.host_ifindex, 10);
        assert_eq!(agent.host.routes, vec![(10, ep.address)]);
        assert!(agent.datapath.attached.contains_key(&10));
        assert_eq!(store.last().endpoints.len(), 1);
        let listed = agent.list();
        assert_eq!(listed[0].counters.egress.redirected.packets, 1);

        let del = agent.delete_endpoint("a", "eth0").unwrap();
        assert!(del.endpoint_removed);
        assert_eq!(del.address_released, Some(ep.address));
        assert!(agent.datapath.attached.is_empty());
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
            agent.ipam.owner_address(&Owner {
                container_id: "a".into(),
                ifname: "eth0".into()
            }),
            Some(ep.address)
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
        assert_eq!(agent.datapath.flags[&ep.id], 0);
        assert!(agent.host.limits.is_empty());

        let bw = Bandwidth {
            egress_rate: Some(10_000_000),
            ingress_rate: Some(20_000_000),
            ..Bandwidth::default()
        };
        let shown = agent.set_bandwidth("a", &bw).unwrap();
        assert_eq!(shown.bandwidth, Some(bw));
        assert_eq!(agent.host.limits["host veth #5"].rate_bits, 20_000_000);
        assert_eq!(
            agent.host.limits["eth0 in /run/netns/x"].rate_bits,
            10_000_000
        );
        assert_eq!(agent.datapath.flags[&ep.id], ENDPOINT_F_INGRESS_LIMIT);
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
            agent.datapath.flags[&ep.id],
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
        assert_eq!(agent.endpoints[0].bandwidth, Some(bw));

        // A kernel refusal leaves the old limits in the record.
        agent.host.fail_limits = true;
        let other = Bandwidth {
            egress_rate: Some(1_000_000),
            ..Bandwidth::default()
        };
        assert!(agent.set_bandwidth("a", &other).is_err());
        assert_eq!(agent.endpoints[0].bandwidth, Some(bw));
        agent.host.fail_limits = false;

        // Removing clears the flag, keeps the policy bit, and removes both qdiscs.
        agent.set_bandwidth("a", &Bandwidth::default()).unwrap();
        assert!(agent.host.limits.is_empty());
        assert_eq!(agent.datapath.flags[&ep.id], ENDPOINT_F_INGRESS_POLICY);
        assert_eq!(agent.endpoints[0].bandwidth, None);
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
            agent.datapath.flags[&ep.id],
            hypha_common::ENDPOINT_F_INGRESS_LIMIT
        );
        assert!(agent.host.limits.contains_key("host veth #6"));
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
                address: Ipv4Addr::new(10, 7, 0, 5),
                pod_mac: MacAddr([2, 0, 0, 0, 0, 5]),
                labels: Default::default(),
                external_ipam: false,
                bandwidth: None,
                ports: Vec::new(),
            })
            .unwrap_err();
        assert!(err.to_string().contains("no address is allocated"), "{err}");
    }

    #[test]
    fn failed_attach_leaves_no_endpoint_and_delete_releases_the_address() {
        let dp = FakeDatapath {
            fail_attach: true,
            ..Default::default()
        };
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
        let dp = FakeDatapath {
            pinned: vec![10, 11],
            ..Default::default()
        };
        let (mut agent, report, store) = start(host_with(&[("hypa", 10)]), saved, dp);
        assert_eq!(report.adopted, vec![format!("hypa ({})", a.address)]);
        assert_eq!(report.removed, vec![format!("hypb ({})", b.address)]);
        assert_eq!(agent.status().datapath.adopted_endpoints, 1);
        assert_eq!(agent.list().len(), 1);
        assert_eq!(
            agent.datapath.pinned,
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
        assert!(!agent.host.links.contains_key("hypa"), "a's veth deleted");
        assert!(agent.host.links.contains_key("hypb"));
        assert_eq!(agent.list().len(), 1);
        assert_eq!(store.last().ipam.allocations.len(), 1);
        assert_eq!(
            store.last().ipam.allocations.keys().next(),
            Some(&b.address)
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
        agent.host.links.remove("hypb"); // pod b deleted behind our back
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
            })
            .unwrap();
        assert_eq!(alloc.address, want);
        let err = agent
            .allocate(&AllocateRequest {
                container_id: "b".into(),
                ifname: "eth0".into(),
                address: Some(want),
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
                    pod_mac: MacAddr([2, 0, 0, 0, 0, address.octets()[3]]),
                    labels: Default::default(),
                    external_ipam: true,
                    bandwidth: None,
                    ports: Vec::new(),
                })
            };
        // An address from a delegated plugin needs no allocation, and releases none.
        let ep = external(&mut agent, "b", "hypb", Ipv4Addr::new(192, 0, 2, 10)).unwrap();
        assert!(ep.external_ipam);
        // It may not take an address the agent reserved for someone else.
        let err = external(&mut agent, "c", "hypc", want).unwrap_err();
        assert_eq!(err.http_status(), 409, "{err}");
        let del = agent.delete_endpoint("b", "eth0").unwrap();
        assert!(del.endpoint_removed && del.address_released.is_none());
    }

    #[test]
    fn a_failed_save_after_attach_reports_the_failed_detach_too() {
        let (mut agent, _, store) = start(
            host_with(&[("hypa", 10)]),
            PersistedState::default(),
            FakeDatapath::default(),
        );
        let alloc = agent
            .allocate(&AllocateRequest {
                container_id: "a".into(),
                ifname: "eth0".into(),
                address: None,
            })
            .unwrap();
        store.fail(true);
        agent.datapath.fail_detach = true;
        let err = agent
            .create_endpoint(&create_request("a", "hypa", alloc.address))
            .unwrap_err()
            .to_string();
        // The step that failed and the rollback step that failed, both named.
        assert!(
            err.contains("cannot write /var/lib/hypha/state.json"),
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
        agent.host.fail_limits = true;
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
        let dp = FakeDatapath {
            fail_attach: true,
            ..Default::default()
        };
        let (mut agent, _, _) = start(host_with(&[("hypa", 10)]), PersistedState::default(), dp);
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
            })
            .unwrap();
        // The attach fails; the policy write before it (the additions) succeeds, the
        // one that restores fails.
        agent.datapath.fail_apply_after = Some(agent.datapath.diffs.len() + 1);
        let err = agent
            .create_endpoint(&create_request("a", "hypa", alloc.address))
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
            !a.debug && agent.datapath.debug.is_empty(),
            "off by default"
        );

        let shown = agent.set_debug("a", true).unwrap();
        assert!(shown.debug);
        assert_eq!(agent.datapath.debug, [10].into());
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
        let dp = FakeDatapath {
            pinned: vec![10, 11],
            ..Default::default()
        };
        let (mut agent, _, store) = start(host_with(&[("hypa", 10), ("hypb", 11)]), saved, dp);
        assert_eq!(agent.datapath.debug, [10].into());

        // A save that fails puts the datapath back and says what failed.
        store.fail(true);
        let err = agent.set_debug(&b.id.to_string(), true).unwrap_err();
        assert!(err.to_string().contains("cannot write"), "{err}");
        assert_eq!(agent.datapath.debug, [10].into());
        assert!(!agent.list()[1].debug);
        store.fail(false);

        agent.set_debug(&a.id.to_string(), false).unwrap();
        assert!(agent.datapath.debug.is_empty());
        assert!(store.last().endpoints.iter().all(|e| !e.debug));
        // Detaching removes the tracing with the endpoint.
        agent.set_debug("b", true).unwrap();
        agent.delete_endpoint("b", "eth0").unwrap();
        assert!(agent.datapath.debug.is_empty());
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
        agent.datapath.attached.clear();
        agent.host.links.remove("hypa");
        let problems = agent.check_endpoint("a", "eth0").unwrap().problems;
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("host interface hypa is gone"));
        assert_eq!(
            agent.check_endpoint("x", "eth0").unwrap_err().http_status(),
            404
        );
    }
}
