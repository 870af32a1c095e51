//! Interim engine: the from-scratch compiler behind the incremental interface (replaced by
//! the identity-keyed engine).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::{
    Compiled, IdentityAllocator, Labels, Policy, PolicyDiff, PolicyEndpoint, PolicyError,
    compile, diff,
};

/// Named ports of an endpoint: name → (protocol, port).
pub type NamedPorts = BTreeMap<String, (u8, u16)>;

/// What a change did: the diff to write, and whether the allocator changed.
#[derive(Debug, Default)]
pub struct Outcome {
    pub diff: PolicyDiff,
    pub identities_changed: bool,
}

pub struct PolicyEngine {
    policies: BTreeMap<(String, String), Policy>,
    namespaces: BTreeMap<String, Labels>,
    endpoints: BTreeMap<u32, PolicyEndpoint>,
    host_addrs: Vec<Ipv4Addr>,
    compiled: Compiled,
}

impl PolicyEngine {
    pub fn new(
        policies: Vec<Policy>,
        namespaces: BTreeMap<String, Labels>,
        endpoints: Vec<PolicyEndpoint>,
        identities: IdentityAllocator,
        host_addrs: Vec<Ipv4Addr>,
    ) -> Result<Self, PolicyError> {
        let mut e = PolicyEngine {
            policies: policies
                .into_iter()
                .map(|p| ((p.namespace.clone(), p.name.clone()), p))
                .collect(),
            namespaces,
            endpoints: endpoints.into_iter().map(|e| (e.id, e)).collect(),
            host_addrs,
            compiled: Compiled {
                identities,
                ..Compiled::default()
            },
        };
        e.compiled = e.build(&e.policies, &e.namespaces, &e.endpoints)?;
        Ok(e)
    }

    fn build(
        &self,
        policies: &BTreeMap<(String, String), Policy>,
        namespaces: &BTreeMap<String, Labels>,
        endpoints: &BTreeMap<u32, PolicyEndpoint>,
    ) -> Result<Compiled, PolicyError> {
        let list: Vec<Policy> = policies.values().cloned().collect();
        let eps: Vec<PolicyEndpoint> = endpoints.values().cloned().collect();
        compile(&list, &eps, namespaces, &self.compiled.identities, &self.host_addrs)
    }

    fn install(&mut self, new: Compiled) -> Outcome {
        let d = diff(&self.compiled, &new);
        let identities_changed = new.identities != self.compiled.identities;
        self.compiled = new;
        Outcome {
            diff: d,
            identities_changed,
        }
    }

    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    pub fn flags(&self, endpoint_id: u32) -> u32 {
        self.compiled
            .endpoint_flags
            .get(&endpoint_id)
            .copied()
            .unwrap_or(0)
    }

    pub fn identity_of(&self, endpoint_id: u32) -> Option<u32> {
        let ep = self.endpoints.get(&endpoint_id)?;
        self.compiled
            .ipcache
            .get(&ipnet::Ipv4Net::from(ep.address))
            .copied()
    }

    pub fn unresolved_ports(&self, _endpoint_id: u32) -> Vec<String> {
        Vec::new()
    }

    pub fn join(&mut self, ep: PolicyEndpoint) -> Result<Outcome, PolicyError> {
        let mut eps = self.endpoints.clone();
        eps.insert(ep.id, ep);
        let new = self.build(&self.policies, &self.namespaces, &eps)?;
        self.endpoints = eps;
        Ok(self.install(new))
    }

    pub fn leave(&mut self, endpoint_id: u32) -> Outcome {
        let mut eps = self.endpoints.clone();
        eps.remove(&endpoint_id);
        let new = self
            .build(&self.policies, &self.namespaces, &eps)
            .unwrap_or_else(|_| self.compiled.clone());
        self.endpoints = eps;
        self.install(new)
    }

    pub fn relabel(&mut self, endpoint_id: u32, labels: Labels) -> Result<Outcome, PolicyError> {
        let mut eps = self.endpoints.clone();
        if let Some(e) = eps.get_mut(&endpoint_id) {
            let mut view = PolicyEndpoint::new(e.id, e.address, &labels);
            view.ports = e.ports.clone();
            *e = view;
        }
        let new = self.build(&self.policies, &self.namespaces, &eps)?;
        self.endpoints = eps;
        Ok(self.install(new))
    }

    pub fn set_ports(&mut self, endpoint_id: u32, ports: NamedPorts) -> Result<Outcome, PolicyError> {
        if let Some(e) = self.endpoints.get_mut(&endpoint_id) {
            e.ports = ports;
        }
        Ok(Outcome::default())
    }

    pub fn update(
        &mut self,
        upsert: Vec<Policy>,
        remove: Vec<(String, String)>,
    ) -> Result<Outcome, PolicyError> {
        let mut policies = self.policies.clone();
        for k in remove {
            policies.remove(&k);
        }
        for p in upsert {
            policies.insert((p.namespace.clone(), p.name.clone()), p);
        }
        let new = self.build(&policies, &self.namespaces, &self.endpoints)?;
        self.policies = policies;
        Ok(self.install(new))
    }

    pub fn set_namespace_labels(
        &mut self,
        namespace: &str,
        labels: Labels,
    ) -> Result<Outcome, PolicyError> {
        let mut namespaces = self.namespaces.clone();
        if labels.is_empty() {
            namespaces.remove(namespace);
        } else {
            namespaces.insert(namespace.to_owned(), labels);
        }
        let new = self.build(&self.policies, &namespaces, &self.endpoints)?;
        self.namespaces = namespaces;
        Ok(self.install(new))
    }

    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }
}
