//! ClusterIP and NodePort allocation: a service's addresses per its family policy,
//! from the service CIDRs, and its node ports, from [`NODE_PORT_RANGE`].
//!
//! [`Taken`] maps what is held to its holder; besides it keeps an index (what each
//! service holds, and the runs of consecutive held addresses and ports) so that one
//! assignment costs a few map lookups however many services there are: the lowest free
//! address is the end of the run holding the range's first address, plus one. The index
//! is kept by [`Taken::hold`] and [`Taken::release`]; when `ips` or `node_ports` were
//! changed directly instead (the index no longer counts the same entries), [`assign`]
//! falls back to scanning them, which is correct but linear.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    IpFamily, IpFamilyPolicy, NODE_PORT_RANGE, Service, ServiceCidrs, ServiceError, ServiceType,
    Taken, family_of, proto_name,
};

/// The index [`Taken`] keeps beside its maps (see the module's comment). Opaque: build a
/// `Taken` with `Taken::default()` and [`Taken::hold`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TakenIndex {
    /// `namespace/name` → what it holds.
    by_service: BTreeMap<String, Held>,
    /// Maximal runs of consecutive held addresses: (family tag, first) → last.
    ip_runs: Runs,
    /// Maximal runs of consecutive held node ports: (protocol, first) → last.
    port_runs: Runs,
    /// Entries of `ips` plus `node_ports` recorded here: the index is current only when
    /// this is their count.
    entries: usize,
}

/// What one service holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Held {
    ips: Vec<IpAddr>,
    /// (service port name, protocol, node port).
    node_ports: Vec<(String, u8, u16)>,
}

impl Taken {
    /// What `services` hold (as [`Taken::hold`] for each).
    pub fn from_services<'a>(services: impl IntoIterator<Item = &'a Service>) -> Self {
        let mut taken = Self::default();
        for s in services {
            taken.hold(s);
        }
        taken
    }

    /// Records what `svc` holds (its `cluster_ips` and node ports, as [`assign`] left
    /// them), replacing what it held before.
    pub fn hold(&mut self, svc: &Service) {
        let key = svc.key();
        self.release(&key);
        let mut held = Held::default();
        for ip in &svc.cluster_ips {
            if self.ips.insert(*ip, key.clone()).is_none() {
                self.index.entries += 1;
                let (f, x) = ip_key(*ip);
                self.index.ip_runs.insert(f, x);
            } else {
                self.forget_other(*ip, &key);
            }
            held.ips.push(*ip);
        }
        for p in &svc.ports {
            let Some(np) = p.node_port else { continue };
            if self
                .node_ports
                .insert((p.protocol, np), key.clone())
                .is_none()
            {
                self.index.entries += 1;
                self.index.port_runs.insert(p.protocol, np.into());
            } else {
                self.forget_other_port(p.protocol, np, &key);
            }
            held.node_ports.push((p.name.clone(), p.protocol, np));
        }
        self.index.by_service.insert(key, held);
    }

    /// Releases everything `key` (`namespace/name`) holds.
    pub fn release(&mut self, key: &str) {
        let recorded = self.index.by_service.remove(key);
        let held = match recorded {
            Some(h) if self.in_sync() => h,
            None if self.in_sync() => return,
            // Changed directly: find its entries by value.
            _ => Held {
                ips: self
                    .ips
                    .iter()
                    .filter(|(_, k)| *k == key)
                    .map(|(ip, _)| *ip)
                    .collect(),
                node_ports: self
                    .node_ports
                    .iter()
                    .filter(|(_, k)| *k == key)
                    .map(|((proto, port), _)| (String::new(), *proto, *port))
                    .collect(),
            },
        };
        for ip in held.ips {
            if self.ips.get(&ip).is_some_and(|k| k == key) {
                self.ips.remove(&ip);
                self.index.entries = self.index.entries.saturating_sub(1);
                let (f, x) = ip_key(ip);
                self.index.ip_runs.remove(f, x);
            }
        }
        for (_, proto, port) in held.node_ports {
            if self
                .node_ports
                .get(&(proto, port))
                .is_some_and(|k| k == key)
            {
                self.node_ports.remove(&(proto, port));
                self.index.entries = self.index.entries.saturating_sub(1);
                self.index.port_runs.remove(proto, port.into());
            }
        }
    }

    /// What `key` holds: its addresses and (service port name, protocol, node port)s (the
    /// name is "" when the maps were changed directly).
    fn held_by(&self, key: &str) -> Held {
        if self.in_sync() {
            return self.index.by_service.get(key).cloned().unwrap_or_default();
        }
        Held {
            ips: self
                .ips
                .iter()
                .filter(|(_, k)| *k == key)
                .map(|(ip, _)| *ip)
                .collect(),
            node_ports: self
                .node_ports
                .iter()
                .filter(|(_, k)| *k == key)
                .map(|((proto, port), _)| (String::new(), *proto, *port))
                .collect(),
        }
    }

    /// Whether the index counts what the maps hold (else [`assign`] scans them).
    pub fn in_sync(&self) -> bool {
        self.index.entries == self.ips.len() + self.node_ports.len()
    }

    /// `ip`, now `key`'s, is no longer another service's.
    fn forget_other(&mut self, ip: IpAddr, key: &str) {
        for (k, h) in self.index.by_service.iter_mut() {
            if k != key {
                h.ips.retain(|x| *x != ip);
            }
        }
    }

    fn forget_other_port(&mut self, proto: u8, port: u16, key: &str) {
        for (k, h) in self.index.by_service.iter_mut() {
            if k != key {
                h.node_ports.retain(|(_, p, n)| (*p, *n) != (proto, port));
            }
        }
    }

    /// The lowest address in `lo..=hi` of family tag `f` that nobody holds.
    fn lowest_free_ip(&self, f: u8, lo: u128, hi: u128, also: &BTreeSet<IpAddr>) -> Option<u128> {
        let free = |x: u128| {
            let ip = key_ip(f, x);
            !self.ips.contains_key(&ip) && !also.contains(&ip)
        };
        let mut from = lo;
        if self.in_sync() {
            while from <= hi {
                let cand = self.index.ip_runs.first_free(f, from)?;
                if cand > hi {
                    return None;
                }
                if free(cand) {
                    return Some(cand);
                }
                // Taken in this very assignment (or a stale index): look on.
                from = cand.checked_add(1)?;
            }
            return None;
        }
        (from..=hi).find(|x| free(*x))
    }

    /// The lowest node port of `proto` nobody holds.
    fn lowest_free_port(&self, proto: u8, also: &BTreeSet<(u8, u16)>) -> Option<u16> {
        let (lo, hi) = (*NODE_PORT_RANGE.start(), *NODE_PORT_RANGE.end());
        let free =
            |p: u16| !self.node_ports.contains_key(&(proto, p)) && !also.contains(&(proto, p));
        if self.in_sync() {
            let mut from = u128::from(lo);
            while from <= u128::from(hi) {
                let cand = self.index.port_runs.first_free(proto, from)?;
                if cand > u128::from(hi) {
                    return None;
                }
                let p = cand as u16;
                if free(p) {
                    return Some(p);
                }
                from = cand + 1;
            }
            return None;
        }
        (lo..=hi).find(|p| free(*p))
    }
}

/// Maximal runs of consecutive held values, per tag: (tag, first) → last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Runs(BTreeMap<(u8, u128), u128>);

impl Runs {
    /// The run holding `x`: (first, last).
    fn containing(&self, tag: u8, x: u128) -> Option<(u128, u128)> {
        let (&(t, first), &last) = self.0.range(..=(tag, x)).next_back()?;
        (t == tag && last >= x).then_some((first, last))
    }

    fn insert(&mut self, tag: u8, x: u128) {
        if self.containing(tag, x).is_some() {
            return;
        }
        let mut first = x;
        let mut last = x;
        if let Some(before) = x.checked_sub(1)
            && let Some((f, _)) = self.containing(tag, before)
        {
            self.0.remove(&(tag, f));
            first = f;
        }
        if let Some(after) = x.checked_add(1)
            && let Some(l) = self.0.remove(&(tag, after))
        {
            last = l;
        }
        self.0.insert((tag, first), last);
    }

    fn remove(&mut self, tag: u8, x: u128) {
        let Some((first, last)) = self.containing(tag, x) else {
            return;
        };
        self.0.remove(&(tag, first));
        if first < x {
            self.0.insert((tag, first), x - 1);
        }
        if x < last {
            self.0.insert((tag, x + 1), last);
        }
    }

    /// The first value from `from` on that no run holds (`None`: past the type's end).
    fn first_free(&self, tag: u8, from: u128) -> Option<u128> {
        match self.containing(tag, from) {
            Some((_, last)) => last.checked_add(1),
            None => Some(from),
        }
    }
}

fn ip_key(ip: IpAddr) -> (u8, u128) {
    match ip {
        IpAddr::V4(a) => (4, u32::from(a).into()),
        IpAddr::V6(a) => (6, u128::from(a)),
    }
}

fn key_ip(tag: u8, x: u128) -> IpAddr {
    if tag == 4 {
        IpAddr::V4(Ipv4Addr::from(x as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(x))
    }
}

fn family_name(f: IpFamily) -> &'static str {
    match f {
        IpFamily::IPv4 => "IPv4",
        IpFamily::IPv6 => "IPv6",
    }
}

/// A CIDR's allocatable range: (family tag, first, last), and its text.
fn range_of(cidrs: &ServiceCidrs, f: IpFamily) -> Option<(u8, u128, u128, String)> {
    match f {
        IpFamily::IPv4 => cidrs.v4.map(|n| {
            let net = u32::from(n.network()) as u128;
            let bcast = u32::from(n.broadcast()) as u128;
            // Neither the network's first address nor its broadcast.
            (4, net + 1, bcast.saturating_sub(1), n.to_string())
        }),
        IpFamily::IPv6 => cidrs.v6.map(|n| {
            let net = u128::from(n.network());
            let last = u128::from(n.broadcast());
            (6, net + 1, last, n.to_string())
        }),
    }
}

/// Gives `svc` its ClusterIPs and NodePorts: see [`super::assign`]'s documentation.
pub fn assign(cidrs: &ServiceCidrs, taken: &Taken, svc: &mut Service) -> Result<(), ServiceError> {
    let key = svc.key();
    let fail = |message: String| ServiceError::Allocation {
        service: key.clone(),
        message,
    };
    let own = taken.held_by(&key);

    // The families asked for, in order: ipFamilies, completed by the written addresses'.
    let mut asked: Vec<IpFamily> = svc.ip_families.clone();
    for ip in &svc.cluster_ips {
        let f = family_of(*ip);
        if !asked.contains(&f) {
            asked.push(f);
        }
    }
    let configured: Vec<IpFamily> = [
        cidrs.v4.map(|_| IpFamily::IPv4),
        cidrs.v6.map(|_| IpFamily::IPv6),
    ]
    .into_iter()
    .flatten()
    .collect();
    let primary = asked
        .first()
        .copied()
        // An update asking nothing keeps its primary family.
        .or_else(|| own.ips.first().map(|ip| family_of(*ip)))
        .or_else(|| configured.first().copied())
        .ok_or_else(|| fail("no service CIDR is configured (--service-cidr)".to_owned()))?;
    let other = match primary {
        IpFamily::IPv4 => IpFamily::IPv6,
        IpFamily::IPv6 => IpFamily::IPv4,
    };
    let families: Vec<IpFamily> = match svc.ip_family_policy {
        IpFamilyPolicy::SingleStack => vec![primary],
        IpFamilyPolicy::PreferDualStack => {
            let mut f = vec![primary];
            if configured.contains(&other) || asked.contains(&other) {
                f.push(other);
            }
            f
        }
        IpFamilyPolicy::RequireDualStack => {
            if configured.len() < 2 {
                return Err(fail(format!(
                    "ipFamilyPolicy RequireDualStack needs an IPv4 and an IPv6 service CIDR; \
                     only {} is configured (--service-cidr)",
                    configured
                        .first()
                        .map(|f| family_name(*f))
                        .unwrap_or("none")
                )));
            }
            vec![primary, other]
        }
    };

    let mut ips = Vec::with_capacity(families.len());
    let mut claimed: BTreeSet<IpAddr> = BTreeSet::new();
    for f in &families {
        let Some((tag, lo, hi, cidr)) = range_of(cidrs, *f) else {
            return Err(fail(format!(
                "it asks for an {} ClusterIP but no {} service CIDR is configured \
                 (--service-cidr)",
                family_name(*f),
                family_name(*f)
            )));
        };
        let ip = match svc.cluster_ips.iter().find(|ip| family_of(**ip) == *f) {
            Some(ip) => {
                let (_, x) = ip_key(*ip);
                let net = match f {
                    IpFamily::IPv4 => cidrs.v4.is_some_and(|n| n.contains(&ip_v4(*ip))),
                    IpFamily::IPv6 => cidrs.v6.is_some_and(|n| n.contains(&ip_v6(*ip))),
                };
                if !net {
                    return Err(fail(format!(
                        "clusterIP {ip} is outside the service CIDR {cidr}"
                    )));
                }
                if x == lo - 1 {
                    return Err(fail(format!(
                        "clusterIP {ip} is the network address of {cidr}"
                    )));
                }
                if x > hi {
                    return Err(fail(format!(
                        "clusterIP {ip} is the broadcast address of {cidr}"
                    )));
                }
                if let Some(holder) = taken.ips.get(ip).filter(|h| **h != key) {
                    return Err(fail(format!("clusterIP {ip} is taken by service {holder}")));
                }
                *ip
            }
            None => match own.ips.iter().find(|ip| {
                family_of(**ip) == *f && {
                    let (_, x) = ip_key(**ip);
                    (lo..=hi).contains(&x)
                }
            }) {
                Some(ip) => *ip,
                None => {
                    let x = taken.lowest_free_ip(tag, lo, hi, &claimed).ok_or_else(|| {
                        fail(format!(
                            "no free address is left in the service CIDR {cidr} (every \
                             allocatable address is taken)"
                        ))
                    })?;
                    key_ip(tag, x)
                }
            },
        };
        claimed.insert(ip);
        ips.push(ip);
    }

    // Node ports: NodePort services only; the requested ones checked, the ones it had
    // kept, the others the lowest free.
    let mut node_ports: Vec<Option<u16>> = Vec::with_capacity(svc.ports.len());
    let mut used: BTreeSet<(u8, u16)> = BTreeSet::new();
    if svc.kind == ServiceType::NodePort {
        for p in &svc.ports {
            if let Some(np) = p.node_port {
                if !NODE_PORT_RANGE.contains(&np) {
                    return Err(fail(format!(
                        "nodePort {np} is outside the NodePort range ({}-{})",
                        NODE_PORT_RANGE.start(),
                        NODE_PORT_RANGE.end()
                    )));
                }
                if let Some(holder) = taken
                    .node_ports
                    .get(&(p.protocol, np))
                    .filter(|h| **h != key)
                {
                    return Err(fail(format!(
                        "nodePort {np}/{} is taken by service {holder}",
                        proto_name(p.protocol)
                    )));
                }
                used.insert((p.protocol, np));
            }
        }
        // What it had, by port name first, then any of the protocol left.
        let mut kept: Vec<(String, u8, u16)> = own
            .node_ports
            .iter()
            .filter(|(_, proto, np)| !used.contains(&(*proto, *np)))
            .cloned()
            .collect();
        for p in &svc.ports {
            let np = match p.node_port {
                Some(np) => np,
                None => {
                    let by_name = kept
                        .iter()
                        .position(|(n, proto, _)| *n == p.name && *proto == p.protocol)
                        .or_else(|| {
                            kept.iter()
                                .position(|(n, proto, _)| n.is_empty() && *proto == p.protocol)
                        });
                    match by_name {
                        Some(i) => kept.remove(i).2,
                        None => taken.lowest_free_port(p.protocol, &used).ok_or_else(|| {
                            fail(format!(
                                "no free NodePort is left for {} in {}-{}",
                                proto_name(p.protocol),
                                NODE_PORT_RANGE.start(),
                                NODE_PORT_RANGE.end()
                            ))
                        })?,
                    }
                }
            };
            used.insert((p.protocol, np));
            node_ports.push(Some(np));
        }
    } else {
        node_ports.resize(svc.ports.len(), None);
    }

    svc.cluster_ips = ips;
    svc.ip_families = families;
    for (p, np) in svc.ports.iter_mut().zip(node_ports) {
        p.node_port = np;
    }
    Ok(())
}

fn ip_v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    }
}

fn ip_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
    }
}
