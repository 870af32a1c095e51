//! The compiler: policies, endpoints and namespaces in; the datapath's map contents out
//! (ipcache, policy entries, endpoint flags); and the minimal diff between two outputs.
//!
//! Semantics (Kubernetes'): an endpoint selected by no policy for a direction allows all
//! in that direction (its flag is unset and the datapath checks nothing); once some
//! policy isolates it for a direction (flag set), only what some policy allows passes.
//! Replies of allowed connections pass through the datapath's connection tracking; there
//! is nothing to compile for them.
//!
//! What the datapath is told, and why:
//! - `hypha_ipcache4` and `hypha_ipcache6` (one ipcache keyed by [`IpNet`], split by
//!   family when written) map every endpoint's /32 and /128 to its label identity (the
//!   same for both: identities are family-independent, so a selector rule allows both
//!   families of a peer), the host's addresses to [`IDENTITY_HOST`], other nodes'
//!   addresses (cluster mode: their underlay addresses, gateways and IPv6 router
//!   addresses) to [`IDENTITY_REMOTE_NODE`], every prefix a
//!   policy names (CIDRs and their `except`s, of either family) to a CIDR identity,
//!   0.0.0.0/0 to [`IDENTITY_WORLD`] and ::/0 to [`IDENTITY_WORLD6`]. The datapath
//!   takes the longest prefix, so a rule naming a CIDR covers the identity of the CIDR
//!   and of every more specific prefix inside it (endpoints, the host, nested CIDRs),
//!   except those inside an `except`, which keep identities the rule does not cover. A
//!   CIDR covers prefixes of its own family only: an IPv4 CIDR (0.0.0.0/0 included)
//!   allows no IPv6 world, CIDR or host address. (Known limit: an endpoint or the host
//!   with an address inside a CIDR is covered by its identity, which stands for both of
//!   its families.)
//! - `hypha_policy` gets one entry per (endpoint, remote identity, port, protocol,
//!   direction) some rule allows or denies. A rule with no peers restriction uses the
//!   identity wildcard [`IDENTITY_ANY`]; so does a rule whose identities cover every
//!   identity in the ipcache. Port ranges (`endPort`) are expanded to one entry per port,
//!   except the full range 1-65535, which is the port wildcard 0. A rule without ports is
//!   protocol 0 (all traffic). ICMP is protocol 1 with port 0: the ICMP type is not
//!   matched (`icmps` types are checked for syntax, not enforced).
//! - Named ports (`port: http`, with its protocol) resolve per endpoint: an ingress rule's
//!   against the selected endpoint's own named ports, an egress rule's against the union
//!   of the named ports of the peer endpoints the rule selects (every endpoint when it
//!   selects every identity). That union is an approximation, Cilium's too: a name that
//!   is port 80 on one peer and 8080 on another allows both towards every selected peer.
//!   A name that resolves to nothing (or to another protocol) matches nothing, as in
//!   Kubernetes; [`super::PolicyEngine::unresolved_ports`] reports it.
//! - Deny rules become [`POLICY_DENY`] entries for every key they cover; the datapath
//!   lets a deny in any of the lookups it makes win over every allow. When two rules
//!   produce the same key: an enforced deny wins, then an audited deny, then an enforced
//!   allow, then an audited allow; between equals, the lowest policy id.
//! - Audit mode: an audit-mode policy's entries carry [`POLICY_F_AUDIT`], and an endpoint
//!   whose isolating policies for a direction are all in audit mode gets
//!   `ENDPOINT_F_*_AUDIT`: what no policy allows is reported and passed. An audit-mode
//!   policy's allow rules are compiled only where every isolating policy is in audit mode,
//!   so that they never let through what an enforcing policy drops. (Known limit: an
//!   audit-mode deny on a key reports and passes even when the enforcing policies would
//!   not have allowed the flow.)
//! - Deny rules alone do not isolate (as in Cilium): an endpoint selected only by deny
//!   rules for a direction gets the flag and an allow-all entry (identity, port and
//!   protocol wildcards, policy id 0), so that the denies are checked and the rest passes.
//! - Traffic from the host to its endpoints is always allowed (policy id 0), as
//!   Kubernetes expects for the kubelet's probes and as Cilium does by default; a deny
//!   rule naming the host still wins. Only this node's host: other nodes
//!   ([`IDENTITY_REMOTE_NODE`]) pass an isolated endpoint's ingress only when a rule
//!   allows them (the `remote-node` or `cluster` entity, a CIDR holding their
//!   addresses).
//! - Entities: `host` is this node; `remote-node` the cluster's other nodes; `cluster`
//!   the host, the other nodes and every endpoint's identity (this node's and other
//!   nodes'); `world` every identity of the ipcache that is none of those (the worlds and
//!   the CIDR identities); `all` everything.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use hypha_common::{
    DIR_EGRESS, DIR_INGRESS, ENDPOINT_F_EGRESS_AUDIT, ENDPOINT_F_EGRESS_POLICY,
    ENDPOINT_F_INGRESS_AUDIT, ENDPOINT_F_INGRESS_POLICY, IDENTITY_ANY, IDENTITY_HOST,
    IDENTITY_REMOTE_NODE, IDENTITY_WORLD, IDENTITY_WORLD6, MAX_IPCACHE, MAX_POLICY_ENTRIES,
    POLICY_ALLOW, POLICY_DENY, POLICY_F_AUDIT, PolicyEntry, PolicyKey, maps,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::identity::{IdentityAllocator, IdentitySource};
use super::{
    Entity, Labels, NamedPort, NamedPorts, NamespaceScope, Peer, Policy, PolicyEndpoint,
    PolicyError, PortRange, Rule, namespace_labels,
};

/// What the datapath should hold for a set of policies and endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// `hypha_ipcache4` and `hypha_ipcache6`: prefix → identity.
    pub ipcache: BTreeMap<IpNet, u32>,
    /// `hypha_policy`.
    pub entries: BTreeMap<PolicyKey, PolicyEntry>,
    /// `EndpointInfo::flags` of every endpoint (0 when no policy selects it).
    pub endpoint_flags: BTreeMap<u32, u32>,
    /// Policy id → `namespace/name`.
    pub policies: BTreeMap<u32, String>,
    /// The allocator after this compilation: the agent keeps (and persists) it once the
    /// result is applied, and drops it when it is not.
    pub identities: IdentityAllocator,
}

/// The changes from one [`Compiled`] to the next, minimal: what is unchanged is not
/// rewritten.
///
/// The datapath applies them in this order, so that traffic both the old and the new
/// policy allow is never dropped in between: `ipcache_set` (new addresses and
/// identities), `entries_set` (new and changed entries, so that whatever the ipcache now
/// says is already allowed), `flags_set` (endpoints start or stop enforcing with their
/// entries in place), `entries_del`, `ipcache_del`.
///
/// `flags_set` only names endpoints that were attached when the diff was made; an
/// endpoint being attached gets its flags from `Datapath::attach`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDiff {
    pub ipcache_set: Vec<(IpNet, u32)>,
    pub ipcache_del: Vec<IpNet>,
    pub entries_set: Vec<(PolicyKey, PolicyEntry)>,
    pub entries_del: Vec<PolicyKey>,
    pub flags_set: Vec<(u32, u32)>,
}

impl PolicyDiff {
    pub fn is_empty(&self) -> bool {
        self.ipcache_set.is_empty()
            && self.ipcache_del.is_empty()
            && self.entries_set.is_empty()
            && self.entries_del.is_empty()
            && self.flags_set.is_empty()
    }

    /// Splits the diff into what adds (sets and flags) and what removes (deletions);
    /// applying the first, then the second, is applying the whole. The agent attaches a
    /// new endpoint in between.
    pub fn split(self) -> (PolicyDiff, PolicyDiff) {
        let removals = PolicyDiff {
            ipcache_del: self.ipcache_del,
            entries_del: self.entries_del,
            ..PolicyDiff::default()
        };
        let additions = PolicyDiff {
            ipcache_set: self.ipcache_set,
            entries_set: self.entries_set,
            flags_set: self.flags_set,
            ..PolicyDiff::default()
        };
        (additions, removals)
    }
}

/// The minimal changes from `old` to `new`.
pub fn diff(old: &Compiled, new: &Compiled) -> PolicyDiff {
    let mut d = PolicyDiff::default();
    for (net, id) in &new.ipcache {
        if old.ipcache.get(net) != Some(id) {
            d.ipcache_set.push((*net, *id));
        }
    }
    d.ipcache_del = old
        .ipcache
        .keys()
        .filter(|n| !new.ipcache.contains_key(n))
        .copied()
        .collect();
    for (k, e) in &new.entries {
        if old.entries.get(k) != Some(e) {
            d.entries_set.push((*k, *e));
        }
    }
    d.entries_del = old
        .entries
        .keys()
        .filter(|k| !new.entries.contains_key(k))
        .copied()
        .collect();
    for (ep, flags) in &new.endpoint_flags {
        if old.endpoint_flags.get(ep).copied().unwrap_or(0) != *flags {
            d.flags_set.push((*ep, *flags));
        }
    }
    d
}

/// Compiles `policies` for `endpoints`. `namespaces` holds the labels operators gave
/// namespaces (each also carries `kubernetes.io/metadata.name`); `identities` is the
/// allocator as persisted; `host_addrs` are the node's addresses (the gateway);
/// `remote_nodes` other nodes' addresses (cluster mode).
pub fn compile(
    policies: &[Policy],
    endpoints: &[PolicyEndpoint],
    namespaces: &BTreeMap<String, Labels>,
    identities: &IdentityAllocator,
    host_addrs: &[IpAddr],
    remote_nodes: &[IpAddr],
) -> Result<Compiled, PolicyError> {
    // Identities and policy ids.
    let label_sets: BTreeSet<(String, Labels)> = endpoints
        .iter()
        .map(|e| (e.namespace.clone(), e.labels.clone()))
        .collect();
    let mut cidrs = BTreeSet::new();
    for p in policies {
        for rule in all_rules(p) {
            for peer in rule.peers.iter().flatten() {
                if let Peer::Cidr { net, except } = peer {
                    cidrs.insert(*net);
                    cidrs.extend(except.iter().copied());
                }
            }
        }
    }
    for (w, _) in worlds() {
        cidrs.remove(&w);
    }
    let names: BTreeSet<String> = policies.iter().map(Policy::full_name).collect();
    let mut identities = identities.clone();
    identities.sync(&label_sets, &cidrs, &names)?;
    let by_source = identities.by_source();

    // The ipcache: world, policy prefixes, other nodes, the host, endpoints (the most
    // specific wins a tie on the same prefix).
    let mut ipcache = BTreeMap::from(worlds());
    for c in &cidrs {
        ipcache.insert(*c, by_source[&IdentitySource::Cidr(*c)]);
    }
    for a in remote_nodes {
        ipcache.insert(IpNet::from(*a), IDENTITY_REMOTE_NODE);
    }
    for a in host_addrs {
        ipcache.insert(IpNet::from(*a), IDENTITY_HOST);
    }
    let mut ep_identity = BTreeMap::new();
    // Local endpoints last: they win an address a remote one claims too.
    for e in endpoints
        .iter()
        .filter(|e| e.remote)
        .chain(endpoints.iter().filter(|e| !e.remote))
    {
        let id = by_source[&IdentitySource::Labels {
            namespace: e.namespace.clone(),
            labels: e.labels.clone(),
        }];
        ep_identity.insert(e.id, id);
        for a in e.addresses() {
            ipcache.insert(IpNet::from(a), id);
        }
    }
    check_ipcache_capacity(&ipcache)?;
    let all_identities: BTreeSet<u32> = ipcache.values().copied().collect();

    let ctx = Ctx {
        endpoints,
        namespaces,
        ep_identity: &ep_identity,
        ipcache: &ipcache,
        all_identities: &all_identities,
    };
    let mut out = Entries::default();
    let mut endpoint_flags = BTreeMap::new();
    let ids: Vec<u32> = policies
        .iter()
        .map(|p| identities.policy_id(&p.full_name()).expect("synced above"))
        .collect();
    // Identity sets of rules, computed once per rule rather than once per endpoint.
    let mut peer_cache: BTreeMap<(usize, u8, bool, usize), BTreeSet<u32>> = BTreeMap::new();

    // Other nodes' endpoints are peers only: no entries, no flags.
    for e in endpoints.iter().filter(|e| !e.remote) {
        let selecting: Vec<usize> = (0..policies.len())
            .filter(|&i| {
                let p = &policies[i];
                p.namespace == e.namespace && p.subject.matches(&e.labels)
            })
            .collect();
        let mut flags = 0;
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let isolating: Vec<usize> = selecting
                .iter()
                .copied()
                .filter(|&i| direction(&policies[i], dir).isolate)
                .collect();
            let denying: Vec<usize> = selecting
                .iter()
                .copied()
                .filter(|&i| !direction(&policies[i], dir).deny.is_empty())
                .collect();
            if isolating.is_empty() && denying.is_empty() {
                continue;
            }
            let (policy_flag, audit_flag) = if dir == DIR_INGRESS {
                (ENDPOINT_F_INGRESS_POLICY, ENDPOINT_F_INGRESS_AUDIT)
            } else {
                (ENDPOINT_F_EGRESS_POLICY, ENDPOINT_F_EGRESS_AUDIT)
            };
            flags |= policy_flag;
            let deciding = if isolating.is_empty() {
                &denying
            } else {
                &isolating
            };
            let all_audit = deciding.iter().all(|&i| policies[i].audit);
            if all_audit {
                flags |= audit_flag;
            }
            let key = |identity, dport, proto| PolicyKey {
                endpoint_id: e.id,
                identity,
                dport,
                proto,
                direction: dir,
            };
            if isolating.is_empty() {
                // Only denies select it: everything else passes.
                out.put(key(IDENTITY_ANY, 0, 0), 0, POLICY_ALLOW, 0)?;
            } else if dir == DIR_INGRESS {
                out.put(key(IDENTITY_HOST, 0, 0), 0, POLICY_ALLOW, 0)?;
            }
            for &i in &selecting {
                let p = &policies[i];
                let entry_flags = if p.audit { POLICY_F_AUDIT } else { 0 };
                let r = direction(p, dir);
                let mut lists: Vec<(bool, &Vec<Rule>)> = vec![(true, &r.deny)];
                // Audit-mode allows only where nothing enforces (see the module's doc).
                if !p.audit || all_audit {
                    lists.push((false, &r.allow));
                }
                for (deny, list) in lists {
                    let action = if deny { POLICY_DENY } else { POLICY_ALLOW };
                    for (j, rule) in list.iter().enumerate() {
                        let idents = peer_cache
                            .entry((i, dir, deny, j))
                            .or_insert_with(|| ctx.rule_identities(rule));
                        let ports = if rule.named_ports.is_empty() {
                            expand_ports(rule.ports.as_deref())
                        } else if dir == DIR_INGRESS {
                            rule_ports(rule, resolve_named(&rule.named_ports, [&e.ports]))
                        } else {
                            let peers = endpoints.iter().filter(|f| {
                                idents.contains(&IDENTITY_ANY)
                                    || idents.contains(&ep_identity[&f.id])
                            });
                            rule_ports(
                                rule,
                                resolve_named(&rule.named_ports, peers.map(|f| &f.ports)),
                            )
                        };
                        for identity in idents.iter() {
                            for (proto, dport) in &ports {
                                out.put(
                                    key(*identity, *dport, *proto),
                                    ids[i],
                                    action,
                                    entry_flags,
                                )?;
                            }
                        }
                    }
                }
            }
        }
        endpoint_flags.insert(e.id, flags);
    }

    Ok(Compiled {
        ipcache,
        entries: out.0,
        endpoint_flags,
        policies: identities.policies().clone(),
        identities,
    })
}

/// The (protocol, port) pairs `rule`'s named ports resolve to among `ports` (the
/// selected endpoint's own for ingress; the union of the selected peers' for egress).
pub(super) fn resolve_named<'a>(
    named: &[NamedPort],
    ports: impl IntoIterator<Item = &'a NamedPorts>,
) -> BTreeSet<(u8, u16)> {
    let mut out = BTreeSet::new();
    for ports in ports {
        for n in named {
            if let Some(&(proto, port)) = ports.get(&n.name)
                && proto == n.proto
            {
                out.insert((proto, port));
            }
        }
    }
    out
}

/// (protocol, port) keys of a rule with named ports, given what they resolved to: its
/// numeric ports (none when it has only named ones) and the resolved ones.
pub(super) fn rule_ports(rule: &Rule, resolved: BTreeSet<(u8, u16)>) -> BTreeSet<(u8, u16)> {
    let mut ranges = rule.ports.clone().unwrap_or_default();
    ranges.extend(resolved.into_iter().map(|(proto, port)| PortRange {
        proto,
        first: port,
        last: port,
    }));
    expand_ports(Some(&ranges))
}

/// The identities of the ipcache's prefixes inside `net` and outside every `except`.
/// `IpNet` orders by family, then address, then prefix length, so every prefix inside
/// `net` lies between two keys of its family: a range instead of the whole ipcache
/// (10,000 CIDR rules against a 10,000-prefix ipcache would otherwise cost 10^8
/// comparisons). Prefixes of the other family are never inside `net`.
pub(super) fn cidr_identities<'a>(
    ipcache: &'a BTreeMap<IpNet, u32>,
    net: &'a IpNet,
    except: &'a [IpNet],
) -> impl Iterator<Item = u32> + 'a {
    let low = IpNet::new(net.network(), 0).expect("0 is a valid prefix length");
    let high = IpNet::new(net.broadcast(), net.max_prefix_len())
        .expect("the family's full length is a valid prefix length");
    ipcache
        .range(low..=high)
        .filter(move |(prefix, _)| {
            net.contains(*prefix) && !except.iter().any(|x| x.contains(*prefix))
        })
        .map(|(_, id)| *id)
}

pub(super) fn direction(p: &Policy, dir: u8) -> &super::DirectionRules {
    if dir == DIR_INGRESS {
        &p.ingress
    } else {
        &p.egress
    }
}

/// The prefixes whose identity is fixed: the world of each family (0.0.0.0/0 and ::/0),
/// and the IPv6 link-local prefix fe80::/10, which is the host's: link-local addresses
/// are never routed, and the datapath redirects pod to pod only to pods' global
/// addresses, so what reaches a pod from a link-local source comes from the node itself
/// (its end of the pod's veth), as neighbour discovery does. A policy CIDR equal to one
/// of these names that identity.
pub(super) fn worlds() -> [(IpNet, u32); 3] {
    [
        (IpNet::V4(Ipv4Net::default()), IDENTITY_WORLD),
        (IpNet::V6(Ipv6Net::default()), IDENTITY_WORLD6),
        (IpNet::V6(LINK_LOCAL6), IDENTITY_HOST),
    ]
}

/// fe80::/10.
pub(super) const LINK_LOCAL6: Ipv6Net =
    Ipv6Net::new_assert(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10);

/// The ipcache fits its two maps: the IPv4 prefixes `hypha_ipcache4`, the IPv6 ones
/// `hypha_ipcache6`.
pub(super) fn check_ipcache_capacity(ipcache: &BTreeMap<IpNet, u32>) -> Result<(), PolicyError> {
    // IPv4 prefixes sort before IPv6 ones.
    let v6 = ipcache.range(IpNet::V6(Ipv6Net::default())..).count();
    for (count, map) in [(ipcache.len() - v6, maps::IPCACHE4), (v6, maps::IPCACHE6)] {
        if count > MAX_IPCACHE as usize {
            return Err(PolicyError::Capacity {
                map,
                capacity: MAX_IPCACHE,
            });
        }
    }
    Ok(())
}

pub(super) fn all_rules(p: &Policy) -> impl Iterator<Item = &Rule> {
    [&p.ingress, &p.egress]
        .into_iter()
        .flat_map(|d| d.allow.iter().chain(d.deny.iter()))
}

/// (protocol, port) keys of a rule's ports.
pub(super) fn expand_ports(ports: Option<&[PortRange]>) -> BTreeSet<(u8, u16)> {
    let Some(ports) = ports else {
        return BTreeSet::from([(0, 0)]);
    };
    let mut out = BTreeSet::new();
    for r in ports {
        if r.first == 0 || (r.first == 1 && r.last == u16::MAX) {
            out.insert((r.proto, 0));
        } else {
            out.extend((r.first..=r.last).map(|p| (r.proto, p)));
        }
    }
    // A protocol wildcard makes that protocol's single ports redundant.
    let wild: BTreeSet<u8> = out
        .iter()
        .filter(|(_, p)| *p == 0)
        .map(|(proto, _)| *proto)
        .collect();
    out.retain(|(proto, port)| *port == 0 || !wild.contains(proto));
    out
}

struct Ctx<'a> {
    endpoints: &'a [PolicyEndpoint],
    namespaces: &'a BTreeMap<String, Labels>,
    ep_identity: &'a BTreeMap<u32, u32>,
    ipcache: &'a BTreeMap<IpNet, u32>,
    all_identities: &'a BTreeSet<u32>,
}

impl Ctx<'_> {
    /// The remote identities a rule covers; `{IDENTITY_ANY}` when it covers them all.
    fn rule_identities(&self, rule: &Rule) -> BTreeSet<u32> {
        let Some(peers) = &rule.peers else {
            return BTreeSet::from([IDENTITY_ANY]);
        };
        let mut ids = BTreeSet::new();
        for peer in peers {
            match peer {
                Peer::Endpoints { namespaces, pods } => {
                    for e in self.endpoints {
                        let ns_ok = match namespaces {
                            NamespaceScope::Named(n) => *n == e.namespace,
                            NamespaceScope::Selected(sel) => {
                                sel.matches(&namespace_labels(&e.namespace, self.namespaces))
                            }
                        };
                        if ns_ok && pods.matches(&e.labels) {
                            ids.insert(self.ep_identity[&e.id]);
                        }
                    }
                }
                Peer::Cidr { net, except } => {
                    ids.extend(cidr_identities(self.ipcache, net, except));
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
                    let local: BTreeSet<u32> = self.ep_identity.values().copied().collect();
                    ids.extend(self.all_identities.iter().filter(|i| {
                        **i != IDENTITY_HOST && **i != IDENTITY_REMOTE_NODE && !local.contains(i)
                    }));
                }
            }
        }
        if !ids.is_empty() && ids.is_superset(self.all_identities) {
            return BTreeSet::from([IDENTITY_ANY]);
        }
        ids
    }
}

/// Entries being built, with the merge rule for keys two rules produce.
#[derive(Default)]
struct Entries(BTreeMap<PolicyKey, PolicyEntry>);

impl Entries {
    fn put(
        &mut self,
        key: PolicyKey,
        policy_id: u32,
        action: u8,
        flags: u8,
    ) -> Result<(), PolicyError> {
        let new = PolicyEntry {
            policy_id,
            action,
            flags,
            _pad: 0,
        };
        match self.0.get_mut(&key) {
            Some(old) => {
                if wins(&new, old) {
                    *old = new;
                }
            }
            None => {
                if self.0.len() >= MAX_POLICY_ENTRIES as usize {
                    return Err(PolicyError::Capacity {
                        map: maps::POLICY,
                        capacity: MAX_POLICY_ENTRIES,
                    });
                }
                self.0.insert(key, new);
            }
        }
        Ok(())
    }
}

/// Whether `a` takes a key `b` holds: enforced deny, audited deny, enforced allow,
/// audited allow; then a real policy over the synthetic id 0; then the lowest id.
pub(super) fn wins(a: &PolicyEntry, b: &PolicyEntry) -> bool {
    let rank = |e: &PolicyEntry| {
        let audit = e.flags & POLICY_F_AUDIT != 0;
        match (e.action == POLICY_DENY, audit) {
            (true, false) => 3,
            (true, true) => 2,
            (false, false) => 1,
            (false, true) => 0,
        }
    };
    let id = |e: &PolicyEntry| {
        if e.policy_id == 0 {
            u32::MAX
        } else {
            e.policy_id
        }
    };
    (rank(a), std::cmp::Reverse(id(a))) > (rank(b), std::cmp::Reverse(id(b)))
}
