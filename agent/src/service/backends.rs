//! The load balancer's plan: every service's frontends with their backends, what
//! Kubernetes' EndpointSlice controller and kube-proxy compute between them. Backends
//! come from the selector (pods of the service's namespace whose labels hold every pair,
//! the target port resolved per pod) or, for a service without one, from its
//! `EndpointSlice`s (ready endpoints, the slice port of the service port's name).
//!
//! Linear in services × ports × addresses plus the pods of each service's namespace:
//! pods are indexed by namespace, slices by service, once per plan.

use std::collections::HashMap;
use std::net::IpAddr;

use hypha_common::lb::{
    LB_F_AFFINITY, LB_F_LOCAL, LB_F_NODEPORT, LB_SCOPE_EXTERNAL, LB_SCOPE_INTERNAL,
    MAX_LB_BACKENDS_PER_SERVICE,
};

use super::{
    Backend, EndpointSlice, Frontend, IpFamily, Pod, Service, ServicePort, ServiceType, TargetPort,
    family_of, proto_name,
};

/// A frontend that had more backends than [`MAX_LB_BACKENDS_PER_SERVICE`]: it keeps the
/// first ones in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncated {
    /// `namespace/name`.
    pub service: String,
    pub port_name: String,
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    /// How many backends it had.
    pub backends: usize,
}

impl std::fmt::Display for Truncated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addr = match self.addr {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        write!(
            f,
            "service {} frontend {addr}:{}/{}: {} backends, only the first \
             {MAX_LB_BACKENDS_PER_SERVICE} are used",
            self.service,
            self.port,
            proto_name(self.proto),
            self.backends
        )
    }
}

/// [`super::plan`], and the frontends it had to cut to [`MAX_LB_BACKENDS_PER_SERVICE`]
/// backends (one entry per frontend), for the control plane to report.
pub fn plan_checked(
    services: &[Service],
    slices: &[EndpointSlice],
    pods: &[Pod],
    node_addrs: &[IpAddr],
) -> (Vec<Frontend>, Vec<Truncated>) {
    let mut by_namespace: HashMap<&str, Vec<&Pod>> = HashMap::new();
    let mut by_addr: HashMap<IpAddr, &Pod> = HashMap::new();
    for p in pods {
        by_namespace
            .entry(p.namespace.as_str())
            .or_default()
            .push(p);
        for a in &p.addresses {
            by_addr.entry(*a).or_insert(p);
        }
    }
    let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for s in slices {
        slices_of
            .entry((s.namespace.as_str(), s.service.as_str()))
            .or_default()
            .push(s);
    }
    // Slices in a stable order whatever the caller's.
    for v in slices_of.values_mut() {
        v.sort_by(|a, b| a.name.cmp(&b.name));
    }

    let mut frontends = Vec::new();
    let mut truncated = Vec::new();
    let max = MAX_LB_BACKENDS_PER_SERVICE as usize;
    for svc in services {
        let key = svc.key();
        let selected: Vec<&Pod> = match &svc.selector {
            Some(sel) => by_namespace
                .get(svc.namespace.as_str())
                .map(|pods| {
                    pods.iter()
                        .copied()
                        .filter(|p| sel.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
                        .collect()
                })
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let its_slices = slices_of
            .get(&(svc.namespace.as_str(), svc.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let flags = if svc.session_affinity.is_some() {
            LB_F_AFFINITY
        } else {
            0
        };
        let affinity_timeout_s = svc.session_affinity.unwrap_or(0);
        let mut families: Vec<IpFamily> = svc.cluster_ips.iter().map(|a| family_of(*a)).collect();
        if families.is_empty() {
            families = svc.ip_families.clone();
        }

        for sp in &svc.ports {
            for family in &families {
                let all = if svc.selector.is_some() {
                    from_pods(&selected, sp, *family)
                } else {
                    from_slices(its_slices, sp, *family, &by_addr)
                };
                let local: Vec<Backend> = all.iter().filter(|b| b.local).cloned().collect();
                let internal = if svc.internal_local { &local } else { &all };
                let mut push = |addr: IpAddr, port: u16, scope: u8, flags: u32, b: &[Backend]| {
                    if b.len() > max {
                        truncated.push(Truncated {
                            service: key.clone(),
                            port_name: sp.name.clone(),
                            addr,
                            port,
                            proto: sp.protocol,
                            backends: b.len(),
                        });
                    }
                    frontends.push(Frontend {
                        service: key.clone(),
                        port_name: sp.name.clone(),
                        addr,
                        port,
                        proto: sp.protocol,
                        scope,
                        flags,
                        affinity_timeout_s,
                        backends: b.iter().take(max).cloned().collect(),
                    });
                };
                for vip in svc.cluster_ips.iter().filter(|a| family_of(**a) == *family) {
                    push(*vip, sp.port, LB_SCOPE_INTERNAL, flags, internal);
                }
                let Some(node_port) = sp.node_port.filter(|_| svc.kind == ServiceType::NodePort)
                else {
                    continue;
                };
                for addr in node_addrs.iter().filter(|a| family_of(**a) == *family) {
                    push(
                        *addr,
                        node_port,
                        LB_SCOPE_INTERNAL,
                        flags | LB_F_NODEPORT,
                        internal,
                    );
                    if svc.external_local {
                        push(
                            *addr,
                            node_port,
                            LB_SCOPE_EXTERNAL,
                            flags | LB_F_NODEPORT | LB_F_LOCAL,
                            &local,
                        );
                    } else {
                        push(
                            *addr,
                            node_port,
                            LB_SCOPE_EXTERNAL,
                            flags | LB_F_NODEPORT,
                            &all,
                        );
                    }
                }
            }
        }
    }
    // Sorted by service, port, family, address and scope; the sort is stable and every
    // frontend differs in one of these.
    frontends.sort_by(|a, b| {
        (
            &a.service,
            a.port,
            a.proto,
            family_of(a.addr),
            a.addr,
            a.scope,
        )
            .cmp(&(
                &b.service,
                b.port,
                b.proto,
                family_of(b.addr),
                b.addr,
                b.scope,
            ))
    });
    truncated.sort_by(|a, b| {
        (&a.service, a.port, a.proto, a.addr).cmp(&(&b.service, b.port, b.proto, b.addr))
    });
    (frontends, truncated)
}

/// Sorted by address and port, one per address and port.
fn normalize(mut backends: Vec<Backend>) -> Vec<Backend> {
    backends.sort();
    backends.dedup_by(|a, b| a.addr == b.addr && a.port == b.port);
    backends
}

/// The selected pods' backends for `sp` in `family`: each pod's first address of the
/// family, with the target port resolved (a pod without the named port is none).
fn from_pods(pods: &[&Pod], sp: &ServicePort, family: IpFamily) -> Vec<Backend> {
    let mut out = Vec::with_capacity(pods.len());
    for pod in pods {
        let Some(addr) = pod.addresses.iter().find(|a| family_of(**a) == family) else {
            continue;
        };
        let port = match &sp.target_port {
            TargetPort::Number(n) => *n,
            TargetPort::Name(name) => match pod.ports.get(name) {
                Some((proto, port)) if *proto == sp.protocol => *port,
                _ => continue,
            },
        };
        out.push(Backend {
            addr: *addr,
            port,
            node: pod.node.clone(),
            local: pod.local,
            pod: pod.name.clone(),
        });
    }
    normalize(out)
}

/// The slices' backends for `sp` in `family`: ready endpoints, with the port of the
/// slice port named as `sp` (and of its protocol). Whether one is local comes from the
/// pod holding its address, if any.
fn from_slices(
    slices: &[&EndpointSlice],
    sp: &ServicePort,
    family: IpFamily,
    by_addr: &HashMap<IpAddr, &Pod>,
) -> Vec<Backend> {
    let mut out = Vec::new();
    for slice in slices.iter().filter(|s| s.family == family) {
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| p.name == sp.name && p.protocol == sp.protocol)
        else {
            continue;
        };
        for ep in slice.endpoints.iter().filter(|e| e.ready) {
            for addr in &ep.addresses {
                let pod = by_addr.get(addr);
                out.push(Backend {
                    addr: *addr,
                    port: port.port,
                    node: ep
                        .node
                        .clone()
                        .or_else(|| pod.map(|p| p.node.clone()))
                        .unwrap_or_default(),
                    local: pod.is_some_and(|p| p.local),
                    pod: format!("slice {}", slice.key()),
                });
            }
        }
    }
    normalize(out)
}
