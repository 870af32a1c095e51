//! What a change to the persisted state is, and what it means ([`apply`]).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::{EndpointRecord, PersistedState, StoredPolicy, StoredService, StoredSlice};
use hypha_cluster::layout::EndpointEntry;

use crate::ipam::Owner;
use crate::policy::IdentityAllocator;

/// One change to the persisted state; each writes (or removes) one row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Puts an endpoint, keyed by its owner (container id, ifname).
    Endpoint(EndpointRecord),
    EndpointGone(Owner),
    /// An IPAM reservation: `owner` holds `address` (and no other address). The IPAM
    /// never gives one address to two owners; the rows are keyed by owner.
    Address {
        owner: Owner,
        address: Ipv4Addr,
    },
    AddressReleased(Owner),
    /// `IpamState::last`, where the next address search starts.
    IpamCursor(Option<Ipv4Addr>),
    /// An IPv6 reservation: `owner` holds `address` (and no other IPv6 address). Kept
    /// apart from the IPv4 ones: an owner holds one address of each family.
    Address6 {
        owner: Owner,
        address: Ipv6Addr,
    },
    Address6Released(Owner),
    /// The IPv6 allocator's cursor.
    Ipam6Cursor(Option<Ipv6Addr>),
    /// Stored as max(stored, n): endpoint ids are never reused.
    NextEndpointId(u32),
    /// Puts a policy, keyed by (namespace, name).
    Policy(StoredPolicy),
    PolicyGone {
        namespace: String,
        name: String,
    },
    /// A namespace's labels; empty labels remove the namespace's row.
    NamespaceLabels {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
    /// Replaces the stored identity allocator.
    Identities(IdentityAllocator),
    /// Cluster mode: puts another node's endpoint, keyed by its store key.
    RemoteEndpoint {
        key: String,
        entry: EndpointEntry,
    },
    RemoteEndpointGone(String),
    /// Puts a service, keyed by (namespace, name).
    Service(StoredService),
    ServiceGone {
        namespace: String,
        name: String,
    },
    /// Puts an `EndpointSlice`, keyed by (namespace, name).
    Slice(StoredSlice),
    SliceGone {
        namespace: String,
        name: String,
    },
}

/// Applies one change to an in-memory state: the one definition of what a change means,
/// used by the fake and by the tests that compare redb with it.
///
/// Endpoints are kept sorted by owner and policies by (namespace, name): the order in
/// which the database returns them.
pub fn apply(state: &mut PersistedState, change: &Change) {
    match change {
        Change::Endpoint(ep) => {
            let owner = ep.owner();
            match state
                .endpoints
                .binary_search_by(|e| endpoint_key(e).cmp(&owner_key(&owner)))
            {
                Ok(i) => state.endpoints[i] = ep.clone(),
                Err(i) => state.endpoints.insert(i, ep.clone()),
            }
        }
        Change::EndpointGone(owner) => {
            if let Ok(i) = state
                .endpoints
                .binary_search_by(|e| endpoint_key(e).cmp(&owner_key(owner)))
            {
                state.endpoints.remove(i);
            }
        }
        Change::Address { owner, address } => {
            state.ipam.allocations.retain(|_, o| o != owner);
            state.ipam.allocations.insert(*address, owner.clone());
        }
        Change::AddressReleased(owner) => state.ipam.allocations.retain(|_, o| o != owner),
        Change::IpamCursor(last) => state.ipam.last = *last,
        Change::Address6 { owner, address } => {
            state.ipam6.allocations.retain(|_, o| o != owner);
            state.ipam6.allocations.insert(*address, owner.clone());
        }
        Change::Address6Released(owner) => state.ipam6.allocations.retain(|_, o| o != owner),
        Change::Ipam6Cursor(last) => state.ipam6.last = *last,
        Change::NextEndpointId(n) => state.next_endpoint_id = state.next_endpoint_id.max(*n),
        Change::Policy(p) => {
            let key = policy_key(p);
            match state.policies.binary_search_by(|q| policy_key(q).cmp(&key)) {
                Ok(i) => state.policies[i] = p.clone(),
                Err(i) => state.policies.insert(i, p.clone()),
            }
        }
        Change::PolicyGone { namespace, name } => {
            let key = (namespace.as_str(), name.as_str());
            if let Ok(i) = state.policies.binary_search_by(|q| policy_key(q).cmp(&key)) {
                state.policies.remove(i);
            }
        }
        Change::NamespaceLabels { namespace, labels } => {
            if labels.is_empty() {
                state.namespace_labels.remove(namespace);
            } else {
                state
                    .namespace_labels
                    .insert(namespace.clone(), labels.clone());
            }
        }
        Change::Identities(a) => state.identities = a.clone(),
        Change::RemoteEndpoint { key, entry } => {
            state.remote_endpoints.insert(key.clone(), entry.clone());
        }
        Change::RemoteEndpointGone(key) => {
            state.remote_endpoints.remove(key);
        }
        Change::Service(s) => {
            let key = (s.service.namespace.as_str(), s.service.name.as_str());
            match state
                .services
                .binary_search_by(|q| service_key(q).cmp(&key))
            {
                Ok(i) => state.services[i] = s.clone(),
                Err(i) => state.services.insert(i, s.clone()),
            }
        }
        Change::ServiceGone { namespace, name } => {
            let key = (namespace.as_str(), name.as_str());
            if let Ok(i) = state
                .services
                .binary_search_by(|q| service_key(q).cmp(&key))
            {
                state.services.remove(i);
            }
        }
        Change::Slice(s) => {
            let key = (s.slice.namespace.as_str(), s.slice.name.as_str());
            match state.slices.binary_search_by(|q| slice_key(q).cmp(&key)) {
                Ok(i) => state.slices[i] = s.clone(),
                Err(i) => state.slices.insert(i, s.clone()),
            }
        }
        Change::SliceGone { namespace, name } => {
            let key = (namespace.as_str(), name.as_str());
            if let Ok(i) = state.slices.binary_search_by(|q| slice_key(q).cmp(&key)) {
                state.slices.remove(i);
            }
        }
    }
}

fn service_key(s: &StoredService) -> (&str, &str) {
    (&s.service.namespace, &s.service.name)
}

fn slice_key(s: &StoredSlice) -> (&str, &str) {
    (&s.slice.namespace, &s.slice.name)
}

fn endpoint_key(e: &EndpointRecord) -> (&str, &str) {
    (&e.container_id, &e.ifname)
}

fn owner_key(o: &Owner) -> (&str, &str) {
    (&o.container_id, &o.ifname)
}

fn policy_key(p: &StoredPolicy) -> (&str, &str) {
    (&p.policy.namespace, &p.policy.name)
}

/// The changes that turn `old` into `new` (as far as [`apply`] goes: entry order aside),
/// each key written at most once. For callers that still hold whole snapshots, and for
/// importing one (`changes_between(&PersistedState::default(), &state)`).
pub fn changes_between(old: &PersistedState, new: &PersistedState) -> Vec<Change> {
    let mut changes = Vec::new();

    let old_eps: BTreeMap<_, _> = old.endpoints.iter().map(|e| (endpoint_key(e), e)).collect();
    let new_eps: BTreeMap<_, _> = new.endpoints.iter().map(|e| (endpoint_key(e), e)).collect();
    for (key, ep) in &new_eps {
        if old_eps.get(key) != Some(ep) {
            changes.push(Change::Endpoint((*ep).clone()));
        }
    }
    for (key, ep) in &old_eps {
        if !new_eps.contains_key(key) {
            changes.push(Change::EndpointGone(ep.owner()));
        }
    }

    let by_owner = |s: &PersistedState| -> BTreeMap<Owner, Ipv4Addr> {
        s.ipam
            .allocations
            .iter()
            .map(|(a, o)| (o.clone(), *a))
            .collect()
    };
    let (old_addrs, new_addrs) = (by_owner(old), by_owner(new));
    // Releases first: an address moving from one owner to another is free before it is
    // taken again.
    for owner in old_addrs.keys() {
        if !new_addrs.contains_key(owner) {
            changes.push(Change::AddressReleased(owner.clone()));
        }
    }
    for (owner, address) in &new_addrs {
        if old_addrs.get(owner) != Some(address) {
            changes.push(Change::Address {
                owner: owner.clone(),
                address: *address,
            });
        }
    }
    if old.ipam.last != new.ipam.last {
        changes.push(Change::IpamCursor(new.ipam.last));
    }
    let by_owner6 = |s: &PersistedState| -> BTreeMap<Owner, Ipv6Addr> {
        s.ipam6
            .allocations
            .iter()
            .map(|(a, o)| (o.clone(), *a))
            .collect()
    };
    let (old_addrs6, new_addrs6) = (by_owner6(old), by_owner6(new));
    for owner in old_addrs6.keys() {
        if !new_addrs6.contains_key(owner) {
            changes.push(Change::Address6Released(owner.clone()));
        }
    }
    for (owner, address) in &new_addrs6 {
        if old_addrs6.get(owner) != Some(address) {
            changes.push(Change::Address6 {
                owner: owner.clone(),
                address: *address,
            });
        }
    }
    if old.ipam6.last != new.ipam6.last {
        changes.push(Change::Ipam6Cursor(new.ipam6.last));
    }
    if new.next_endpoint_id > old.next_endpoint_id {
        changes.push(Change::NextEndpointId(new.next_endpoint_id));
    }

    let old_pols: BTreeMap<_, _> = old.policies.iter().map(|p| (policy_key(p), p)).collect();
    let new_pols: BTreeMap<_, _> = new.policies.iter().map(|p| (policy_key(p), p)).collect();
    for (key, p) in &new_pols {
        if old_pols.get(key) != Some(p) {
            changes.push(Change::Policy((*p).clone()));
        }
    }
    for (namespace, name) in old_pols.keys() {
        if !new_pols.contains_key(&(*namespace, *name)) {
            changes.push(Change::PolicyGone {
                namespace: (*namespace).to_owned(),
                name: (*name).to_owned(),
            });
        }
    }

    let empty = BTreeMap::new();
    for (namespace, labels) in &new.namespace_labels {
        if old.namespace_labels.get(namespace).unwrap_or(&empty) != labels {
            changes.push(Change::NamespaceLabels {
                namespace: namespace.clone(),
                labels: labels.clone(),
            });
        }
    }
    for namespace in old.namespace_labels.keys() {
        if !new.namespace_labels.contains_key(namespace) {
            changes.push(Change::NamespaceLabels {
                namespace: namespace.clone(),
                labels: BTreeMap::new(),
            });
        }
    }

    if old.identities != new.identities {
        changes.push(Change::Identities(new.identities.clone()));
    }
    for (key, entry) in &new.remote_endpoints {
        if old.remote_endpoints.get(key) != Some(entry) {
            changes.push(Change::RemoteEndpoint {
                key: key.clone(),
                entry: entry.clone(),
            });
        }
    }
    for key in old.remote_endpoints.keys() {
        if !new.remote_endpoints.contains_key(key) {
            changes.push(Change::RemoteEndpointGone(key.clone()));
        }
    }

    let old_svcs: BTreeMap<_, _> = old.services.iter().map(|s| (service_key(s), s)).collect();
    let new_svcs: BTreeMap<_, _> = new.services.iter().map(|s| (service_key(s), s)).collect();
    for (key, s) in &new_svcs {
        if old_svcs.get(key) != Some(s) {
            changes.push(Change::Service((*s).clone()));
        }
    }
    for (namespace, name) in old_svcs.keys() {
        if !new_svcs.contains_key(&(*namespace, *name)) {
            changes.push(Change::ServiceGone {
                namespace: (*namespace).to_owned(),
                name: (*name).to_owned(),
            });
        }
    }
    let old_slices: BTreeMap<_, _> = old.slices.iter().map(|s| (slice_key(s), s)).collect();
    let new_slices: BTreeMap<_, _> = new.slices.iter().map(|s| (slice_key(s), s)).collect();
    for (key, s) in &new_slices {
        if old_slices.get(key) != Some(s) {
            changes.push(Change::Slice((*s).clone()));
        }
    }
    for (namespace, name) in old_slices.keys() {
        if !new_slices.contains_key(&(*namespace, *name)) {
            changes.push(Change::SliceGone {
                namespace: (*namespace).to_owned(),
                name: (*name).to_owned(),
            });
        }
    }
    changes
}
