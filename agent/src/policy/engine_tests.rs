//! The engine against the from-scratch compiler: after every change its output equals
//! `compile` of the same inputs, and the diff it returns equals `diff` of the two.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use hypha_common::{DIR_EGRESS, DIR_INGRESS, PolicyKey};
use ipnet::IpNet;
use proptest::prelude::*;

use super::*;

const HOST: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
const HOST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1);

fn hosts() -> Vec<IpAddr> {
    vec![HOST.into(), HOST6.into()]
}

fn prefix(a: impl Into<IpAddr>) -> IpNet {
    IpNet::from(a.into())
}

fn labels(ns: &str, pairs: &[(&str, &str)]) -> Labels {
    let mut l: Labels = pairs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    l.insert(NAMESPACE_LABEL.into(), ns.into());
    l
}

/// Endpoint `id` at 10.244.<id / 250>.<id % 250 + 2>.
fn ep(id: u32, ns: &str, pairs: &[(&str, &str)]) -> PolicyEndpoint {
    PolicyEndpoint::new(id, addr(id), &labels(ns, pairs))
}

fn addr(id: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, (id / 250) as u8, (id % 250 + 2) as u8)
}

/// fd00:10:244::<id + 2>.
fn addr6(id: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, (id + 2) as u16)
}

/// `e` with the addresses endpoint `id` has in the property test: IPv6 only, both
/// families or IPv4 only, by `id % 3`.
fn mixed_families(mut e: PolicyEndpoint, id: u32) -> PolicyEndpoint {
    e.id = id;
    e.address = (!id.is_multiple_of(3)).then(|| addr(id));
    e.address6 = (id % 3 != 2).then(|| addr6(id));
    e
}

fn ports(pairs: &[(&str, u8, u16)]) -> NamedPorts {
    pairs
        .iter()
        .map(|(n, proto, port)| ((*n).to_owned(), (*proto, *port)))
        .collect()
}

fn k8s(name: &str, ns: &str, spec: &str) -> Policy {
    let yaml = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    );
    let mut p = parse_file("test.yaml", &yaml).unwrap_or_else(|e| panic!("{e}"));
    p.remove(0)
}

/// The inputs, kept beside the engine, and the from-scratch compile of them.
struct Model {
    policies: BTreeMap<(String, String), Policy>,
    namespaces: BTreeMap<String, Labels>,
    endpoints: BTreeMap<u32, PolicyEndpoint>,
    remote_nodes: BTreeSet<IpAddr>,
}

impl Model {
    fn new(policies: &[Policy], endpoints: &[PolicyEndpoint]) -> Self {
        Self {
            policies: policies
                .iter()
                .map(|p| ((p.namespace.clone(), p.name.clone()), p.clone()))
                .collect(),
            namespaces: BTreeMap::new(),
            endpoints: endpoints.iter().map(|e| (e.id, e.clone())).collect(),
            remote_nodes: BTreeSet::new(),
        }
    }

    fn engine(&self) -> PolicyEngine {
        PolicyEngine::new(
            self.policies.values().cloned().collect(),
            self.namespaces.clone(),
            self.endpoints.values().cloned().collect(),
            IdentityAllocator::default(),
            hosts(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn compile(&self, identities: &IdentityAllocator) -> Result<Compiled, PolicyError> {
        let policies: Vec<Policy> = self.policies.values().cloned().collect();
        let endpoints: Vec<PolicyEndpoint> = self.endpoints.values().cloned().collect();
        compile(
            &policies,
            &endpoints,
            &self.namespaces,
            identities,
            &hosts(),
            &self.remote_nodes.iter().copied().collect::<Vec<_>>(),
        )
    }

    /// Checks `outcome` of a change from `before` against the from-scratch compile.
    fn check(
        &self,
        engine: &PolicyEngine,
        before: &Compiled,
        outcome: &Outcome,
    ) -> Result<(), TestCaseError> {
        let want = self
            .compile(&before.identities)
            .unwrap_or_else(|e| panic!("{e}"));
        prop_assert_eq!(engine.compiled(), &want);
        prop_assert_eq!(&outcome.diff, &diff(before, &want));
        prop_assert_eq!(
            outcome.identities_changed,
            before.identities != want.identities
        );
        Ok(())
    }
}

// ---------------------------------------------------------------- property test

const NAMESPACES: [&str; 2] = ["ns1", "ns2"];

fn label_set() -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
    (
        prop::option::of(prop::sample::select(vec!["a", "b"])),
        prop::option::of(prop::sample::select(vec!["x", "y"])),
    )
        .prop_map(|(app, tier)| {
            let mut v = Vec::new();
            if let Some(a) = app {
                v.push(("app", a));
            }
            if let Some(t) = tier {
                v.push(("tier", t));
            }
            v
        })
}

fn named_ports() -> impl Strategy<Value = NamedPorts> {
    prop::collection::btree_map(
        prop::sample::select(vec!["http", "dns"]),
        (
            prop::sample::select(vec![PROTO_TCP, PROTO_UDP]),
            prop::sample::select(vec![80u16, 81, 53]),
        ),
        0..=2,
    )
    .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::default()),
        label_set().prop_map(|l| LabelSelector {
            match_labels: l
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            match_expressions: Vec::new(),
        }),
        prop::sample::select(vec!["a", "b"]).prop_map(|v| LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![Requirement {
                key: "app".into(),
                operator: Operator::NotIn,
                values: vec![v.into()],
            }],
        }),
    ]
}

fn ns_selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::default()),
        prop::sample::select(vec!["prod", "dev"]).prop_map(|v| LabelSelector {
            match_labels: [("env".to_owned(), v.to_owned())].into(),
            match_expressions: Vec::new(),
        }),
        prop::sample::select(NAMESPACES.to_vec()).prop_map(|v| LabelSelector {
            match_labels: [(NAMESPACE_NAME_LABEL.to_owned(), v.to_owned())].into(),
            match_expressions: Vec::new(),
        }),
    ]
}

fn peer() -> impl Strategy<Value = Peer> {
    let net = |s: &str| -> IpNet { s.parse().unwrap() };
    prop_oneof![
        4 => (prop::sample::select(NAMESPACES.to_vec()), selector()).prop_map(|(ns, pods)| {
            Peer::Endpoints {
                namespaces: NamespaceScope::Named(ns.into()),
                pods,
            }
        }),
        2 => (ns_selector(), selector()).prop_map(|(ns, pods)| Peer::Endpoints {
            namespaces: NamespaceScope::Selected(ns),
            pods,
        }),
        2 => prop::sample::select(vec![
            Peer::Cidr { net: net("10.244.0.0/24"), except: vec![net("10.244.0.0/30")] },
            Peer::Cidr { net: net("10.0.0.0/8"), except: vec![] },
            Peer::Cidr { net: net("0.0.0.0/0"), except: vec![net("10.244.0.4/31")] },
            Peer::Cidr { net: net("10.244.0.5/32"), except: vec![] },
        ]),
        2 => prop::sample::select(vec![
            Peer::Cidr { net: net("fd00:10:244::/64"), except: vec![net("fd00:10:244::/126")] },
            Peer::Cidr { net: net("fd00::/8"), except: vec![] },
            Peer::Cidr { net: net("::/0"), except: vec![net("fd00:10:244::6/127")] },
            Peer::Cidr { net: net("fd00:10:244::5/128"), except: vec![] },
            Peer::Cidr { net: net("::/0"), except: vec![] },
        ]),
        1 => prop::sample::select(vec![
            Peer::Entity(Entity::Host),
            Peer::Entity(Entity::World),
            Peer::Entity(Entity::Cluster),
            Peer::Entity(Entity::All),
            Peer::Entity(Entity::RemoteNode),
        ]),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    let range = prop::sample::select(vec![
        PortRange {
            proto: PROTO_TCP,
            first: 80,
            last: 80,
        },
        PortRange {
            proto: PROTO_TCP,
            first: 0,
            last: 0,
        },
        PortRange {
            proto: PROTO_UDP,
            first: 53,
            last: 53,
        },
        PortRange {
            proto: PROTO_TCP,
            first: 80,
            last: 82,
        },
    ]);
    let named = prop::sample::select(vec![
        NamedPort {
            proto: PROTO_TCP,
            name: "http".into(),
        },
        NamedPort {
            proto: PROTO_UDP,
            name: "dns".into(),
        },
        NamedPort {
            proto: PROTO_TCP,
            name: "dns".into(),
        },
    ]);
    (
        prop::option::of(prop::collection::vec(peer(), 1..=2)),
        prop::option::of((
            prop::collection::vec(range, 0..=2),
            prop::collection::vec(named, 0..=2),
        )),
    )
        .prop_map(|(peers, ports)| match ports {
            None => Rule {
                peers,
                ports: None,
                named_ports: Vec::new(),
            },
            Some((ranges, named)) if ranges.is_empty() && named.is_empty() => Rule {
                peers,
                ports: None,
                named_ports: Vec::new(),
            },
            Some((ranges, named)) => Rule {
                peers,
                ports: Some(ranges),
                named_ports: named,
            },
        })
}

fn direction_rules() -> impl Strategy<Value = DirectionRules> {
    (
        any::<bool>(),
        prop::collection::vec(rule(), 0..=2),
        prop::collection::vec(rule(), 0..=1),
    )
        .prop_map(|(isolate, allow, deny)| DirectionRules {
            isolate,
            allow,
            deny,
        })
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        prop::sample::select(NAMESPACES.to_vec()),
        prop::sample::select(vec!["p0", "p1", "p2"]),
        prop::bool::weighted(0.2),
        selector(),
        direction_rules(),
        direction_rules(),
    )
        .prop_map(|(ns, name, audit, subject, ingress, egress)| Policy {
            kind: PolicyKind::HyphaNetworkPolicy,
            namespace: ns.into(),
            name: name.into(),
            audit,
            subject,
            ingress,
            egress,
        })
}

fn endpoint() -> impl Strategy<Value = PolicyEndpoint> {
    (
        1u32..=8,
        prop::sample::select(NAMESPACES.to_vec()),
        label_set(),
        named_ports(),
    )
        .prop_map(|(id, ns, l, p)| mixed_families(ep(id, ns, &l).with_ports(p), id))
}

#[derive(Clone, Debug)]
enum Op {
    Join(PolicyEndpoint),
    Leave(u32),
    Relabel(u32, &'static str, Vec<(&'static str, &'static str)>),
    SetPorts(u32, NamedPorts),
    Update(Vec<Policy>, Vec<(String, String)>),
    SetNamespace(&'static str, Option<&'static str>),
    /// Other nodes' endpoints: upserts and removals, in one batch.
    Remote(Vec<PolicyEndpoint>, Vec<u32>),
    /// Other nodes' addresses, the whole set.
    RemoteNodes(BTreeSet<IpAddr>),
}

/// Other nodes' addresses the property test draws from: some nobody else has (inside
/// and outside the policies' CIDRs, both families), the host's, and local endpoint 1's
/// (which win the ipcache over a remote node's).
fn remote_node_addresses() -> impl Strategy<Value = BTreeSet<IpAddr>> {
    let pool: Vec<IpAddr> = vec![
        Ipv4Addr::new(172, 16, 0, 12).into(),
        Ipv4Addr::new(10, 9, 0, 1).into(),
        Ipv4Addr::new(10, 244, 1, 1).into(),
        "fd00:10:244:1::1".parse().unwrap(),
        "2001:db8::12".parse().unwrap(),
        HOST.into(),
        addr(1).into(),
    ];
    prop::collection::btree_set(prop::sample::select(pool), 0..=4)
}

/// The first engine id of the property test's remote endpoints.
const REMOTE: u32 = 0x8000_0000;

/// Remote endpoint `REMOTE + k` with the addresses of local endpoint `k` (so that
/// local and remote ones sometimes claim one address).
fn remote_endpoint() -> impl Strategy<Value = PolicyEndpoint> {
    (
        1u32..=4,
        prop::sample::select(NAMESPACES.to_vec()),
        label_set(),
    )
        .prop_map(|(k, ns, l)| {
            let mut e = mixed_families(ep(k, ns, &l), k).into_remote();
            e.id = REMOTE + k;
            e
        })
}

fn op() -> impl Strategy<Value = Op> {
    let remove = (
        prop::sample::select(NAMESPACES.to_vec()),
        prop::sample::select(vec!["p0", "p1", "p2"]),
    )
        .prop_map(|(ns, n)| (ns.to_owned(), n.to_owned()));
    prop_oneof![
        3 => endpoint().prop_map(Op::Join),
        2 => (1u32..=8).prop_map(Op::Leave),
        2 => (1u32..=8, prop::sample::select(NAMESPACES.to_vec()), label_set())
            .prop_map(|(id, ns, l)| Op::Relabel(id, ns, l)),
        2 => (1u32..=8, named_ports()).prop_map(|(id, p)| Op::SetPorts(id, p)),
        3 => (
            prop::collection::vec(policy(), 0..=2),
            prop::collection::vec(remove, 0..=1)
        )
            .prop_map(|(u, r)| Op::Update(u, r)),
        1 => (
            prop::sample::select(NAMESPACES.to_vec()),
            prop::option::of(prop::sample::select(vec!["prod", "dev"]))
        )
            .prop_map(|(ns, env)| Op::SetNamespace(ns, env)),
        2 => (
            prop::collection::vec(remote_endpoint(), 0..=3),
            prop::collection::vec((1u32..=4).prop_map(|k| REMOTE + k), 0..=2)
        )
            .prop_map(|(u, r)| Op::Remote(u, r)),
        1 => remote_node_addresses().prop_map(Op::RemoteNodes),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn the_engine_is_the_full_compile_after_every_change(
        policies in prop::collection::vec(policy(), 0..=3),
        endpoints in prop::collection::btree_map(1u32..=8, endpoint(), 0..=4),
        ops in prop::collection::vec(op(), 1..=12),
    ) {
        let endpoints: Vec<PolicyEndpoint> = endpoints
            .into_iter()
            .map(|(id, e)| mixed_families(e, id))
            .collect();
        let mut model = Model::new(&policies, &endpoints);
        let mut engine = model.engine();
        prop_assert_eq!(
            engine.compiled(),
            &model.compile(&IdentityAllocator::default()).unwrap()
        );
        for op in ops {
            let before = engine.compiled().clone();
            let outcome = match op {
                Op::Join(e) => {
                    if model.endpoints.contains_key(&e.id) {
                        prop_assert!(engine.join(e).is_err());
                        prop_assert_eq!(engine.compiled(), &before);
                        continue;
                    }
                    model.endpoints.insert(e.id, e.clone());
                    engine.join(e).unwrap()
                }
                Op::Leave(id) => {
                    model.endpoints.remove(&id);
                    engine.leave(id)
                }
                Op::Relabel(id, ns, l) => {
                    let Some(old) = model.endpoints.get(&id).cloned() else {
                        prop_assert!(engine.relabel(id, labels(ns, &l)).is_err());
                        continue;
                    };
                    let new = old.relabelled(&labels(ns, &l));
                    model.endpoints.insert(id, new);
                    engine.relabel(id, labels(ns, &l)).unwrap()
                }
                Op::SetPorts(id, p) => {
                    let Some(e) = model.endpoints.get_mut(&id) else {
                        prop_assert!(engine.set_ports(id, p).is_err());
                        continue;
                    };
                    e.ports = p.clone();
                    engine.set_ports(id, p).unwrap()
                }
                Op::Update(upsert, remove) => {
                    for r in &remove {
                        model.policies.remove(r);
                    }
                    for p in &upsert {
                        model.policies.insert((p.namespace.clone(), p.name.clone()), p.clone());
                    }
                    engine.update(upsert, remove).unwrap()
                }
                Op::SetNamespace(ns, env) => {
                    let l: Labels = env
                        .map(|v| [("env".to_owned(), v.to_owned())].into())
                        .unwrap_or_default();
                    model.namespaces.insert(ns.to_owned(), l.clone());
                    engine.set_namespace_labels(ns, l).unwrap()
                }
                Op::Remote(upserts, removes) => {
                    for id in &removes {
                        model.endpoints.remove(id);
                    }
                    for e in &upserts {
                        model.endpoints.insert(e.id, e.clone());
                    }
                    engine.update_remote(upserts, removes).unwrap()
                }
                Op::RemoteNodes(addresses) => {
                    model.remote_nodes = addresses.clone();
                    engine.set_remote_nodes(addresses).unwrap()
                }
            };
            for id in engine.remote_ids() {
                prop_assert!(!engine.compiled().endpoint_flags.contains_key(&id));
            }
            model.check(&engine, &before, &outcome)?;
            let want: Vec<&Policy> = model.policies.values().collect();
            prop_assert_eq!(engine.policies().collect::<Vec<_>>(), want);
        }
    }
}

// ---------------------------------------------------------------- targeted tests

fn keys_of(d: &PolicyDiff) -> impl Iterator<Item = &PolicyKey> {
    d.entries_set.iter().map(|(k, _)| k).chain(&d.entries_del)
}

#[test]
fn an_endpoint_joining_an_existing_identity_costs_its_own_entries() {
    let policies = vec![
        k8s(
            "web",
            "default",
            "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 80}, {port: 443}]}]\n  egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]\n",
        ),
        k8s(
            "db",
            "default",
            "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n",
        ),
    ];
    let endpoints = vec![
        ep(1, "default", &[("app", "web")]),
        ep(2, "default", &[("app", "client")]),
        ep(3, "default", &[("app", "db")]),
    ];
    let mut model = Model::new(&policies, &endpoints);
    let mut engine = model.engine();
    let before = engine.compiled().clone();
    let work = engine.recompiled_identities();

    let second = ep(4, "default", &[("app", "web")]);
    model.endpoints.insert(4, second.clone());
    let outcome = engine.join(second).unwrap();
    model.check(&engine, &before, &outcome).unwrap();

    assert_eq!(
        engine.recompiled_identities(),
        work,
        "no identity recompiled"
    );
    assert!(!outcome.identities_changed);
    assert_eq!(engine.identity_of(4), engine.identity_of(1));
    assert!(outcome.diff.entries_del.is_empty());
    assert!(keys_of(&outcome.diff).all(|k| k.endpoint_id == 4));
    // Its entries are endpoint 1's, with its id.
    let own = |id: u32| -> Vec<(u32, u16, u8, u8)> {
        engine
            .compiled()
            .entries
            .keys()
            .filter(|k| k.endpoint_id == id)
            .map(|k| (k.identity, k.dport, k.proto, k.direction))
            .collect()
    };
    assert_eq!(own(4), own(1));
    assert_eq!(outcome.diff.entries_set.len(), own(1).len());
    assert_eq!(outcome.diff.flags_set, vec![(4, engine.flags(1))]);
    assert_eq!(
        outcome.diff.ipcache_set,
        vec![(prefix(addr(4)), engine.identity_of(1).unwrap())]
    );
}

/// 1,000 policies over 10 namespaces, 5 identities per namespace.
fn thousand() -> (Vec<Policy>, Vec<PolicyEndpoint>) {
    let mut policies = Vec::new();
    for i in 0..1000 {
        let ns = format!("ns{}", i % 10);
        let app = (i / 10) % 5;
        let peer = (app + 1) % 5;
        policies.push(k8s(
            &format!("p{i}"),
            &ns,
            &format!(
                "  podSelector: {{matchLabels: {{app: a{app}}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: a{peer}}}}}}}], ports: [{{port: {}}}]}}]\n",
                1000 + i
            ),
        ));
    }
    let endpoints = (0..50)
        .map(|i| {
            ep(
                i + 1,
                &format!("ns{}", i % 10),
                &[("app", &format!("a{}", (i / 10) % 5))],
            )
        })
        .collect();
    (policies, endpoints)
}

#[test]
fn one_changed_policy_among_a_thousand_recompiles_what_it_selects() {
    let (policies, endpoints) = thousand();
    let mut model = Model::new(&policies, &endpoints);
    let mut engine = model.engine();
    let before = engine.compiled().clone();
    let work = engine.recompiled_identities();

    // p42: ns2, selects app=a4 (endpoint 43 alone), allows from a0 on port 1042.
    let changed = k8s(
        "p42",
        "ns2",
        "  podSelector: {matchLabels: {app: a4}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: a0}}}], ports: [{port: 9999}]}]\n",
    );
    model
        .policies
        .insert(("ns2".into(), "p42".into()), changed.clone());
    let outcome = engine.update(vec![changed], Vec::new()).unwrap();
    model.check(&engine, &before, &outcome).unwrap();

    assert_eq!(engine.recompiled_identities() - work, 1, "only a4 in ns2");
    let selected = engine.identity_of(43).unwrap();
    assert!(keys_of(&outcome.diff).all(|k| engine.identity_of(k.endpoint_id) == Some(selected)));
    let ports: Vec<(u16, bool)> = outcome
        .diff
        .entries_set
        .iter()
        .map(|(k, _)| (k.dport, true))
        .chain(outcome.diff.entries_del.iter().map(|k| (k.dport, false)))
        .collect();
    assert_eq!(ports, vec![(9999, true), (1042, false)]);
    assert!(outcome.diff.ipcache_set.is_empty() && outcome.diff.flags_set.is_empty());
}

#[test]
fn a_relabelled_endpoint_moves_and_its_peers_follow() {
    let policies = vec![
        k8s(
            "db",
            "default",
            "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n",
        ),
        k8s(
            "web",
            "default",
            "  podSelector: {matchLabels: {app: web}}\n  ingress: [{ports: [{port: 80}]}]\n",
        ),
    ];
    let endpoints = vec![
        ep(1, "default", &[("app", "web")]),
        ep(2, "default", &[("app", "web")]),
        ep(3, "default", &[("app", "db")]),
        ep(4, "default", &[("app", "other")]),
    ];
    let mut model = Model::new(&policies, &endpoints);
    let mut engine = model.engine();
    let web = engine.identity_of(1).unwrap();
    let allowed_into_db = |e: &PolicyEngine| -> Vec<u32> {
        e.compiled()
            .entries
            .keys()
            .filter(|k| k.endpoint_id == 3 && k.identity != hypha_common::IDENTITY_HOST)
            .map(|k| k.identity)
            .collect()
    };
    assert_eq!(allowed_into_db(&engine), vec![web]);

    // Endpoint 2 leaves app=web for a label set nobody has: a new identity.
    let before = engine.compiled().clone();
    let new_labels = labels("default", &[("app", "web"), ("canary", "yes")]);
    model
        .endpoints
        .insert(2, PolicyEndpoint::new(2, addr(2), &new_labels));
    let outcome = engine.relabel(2, new_labels).unwrap();
    model.check(&engine, &before, &outcome).unwrap();
    let canary = engine.identity_of(2).unwrap();
    assert_ne!(canary, web);
    assert!(outcome.identities_changed);
    assert_eq!(outcome.diff.ipcache_set, vec![(prefix(addr(2)), canary)]);
    // db's view follows: the new identity is a web pod too.
    assert_eq!(allowed_into_db(&engine), vec![web, canary]);
    // Endpoint 1 (same labels as before) and 4 (no policy) are untouched.
    assert!(keys_of(&outcome.diff).all(|k| k.endpoint_id == 2 || k.endpoint_id == 3));

    // Endpoint 1 stops being web: db stops allowing it, it loses web's ingress rules.
    let before = engine.compiled().clone();
    let other = labels("default", &[("app", "other")]);
    model
        .endpoints
        .insert(1, PolicyEndpoint::new(1, addr(1), &other));
    let outcome = engine.relabel(1, other).unwrap();
    model.check(&engine, &before, &outcome).unwrap();
    assert_eq!(engine.identity_of(1), engine.identity_of(4));
    assert_eq!(engine.flags(1), 0);
    assert_eq!(allowed_into_db(&engine), vec![canary]);
    assert!(keys_of(&outcome.diff).all(|k| k.endpoint_id != 4));
    // web's identity has no endpoint left: released.
    assert!(outcome.identities_changed);
    assert!(engine.compiled().identities.source(web).is_none());
}

#[test]
fn named_ports_resolve_per_endpoint_and_unresolved_ones_are_reported() {
    let policies = vec![
        k8s(
            "web",
            "default",
            "  podSelector: {matchLabels: {app: web}}\n  ingress: [{ports: [{port: http}]}]\n",
        ),
        k8s(
            "client",
            "default",
            "  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: http}, {port: metrics}]}]\n",
        ),
    ];
    let endpoints = vec![
        ep(1, "default", &[("app", "web")]).with_ports(ports(&[("http", PROTO_TCP, 80)])),
        ep(2, "default", &[("app", "web")]).with_ports(ports(&[("http", PROTO_TCP, 8080)])),
        ep(3, "default", &[("app", "web")]),
        ep(4, "default", &[("app", "client")]),
    ];
    let mut model = Model::new(&policies, &endpoints);
    let mut engine = model.engine();
    assert_eq!(
        engine.compiled(),
        &model.compile(&IdentityAllocator::default()).unwrap()
    );
    let entry_ports = |e: &PolicyEngine, id: u32, dir: u8| -> Vec<u16> {
        e.compiled()
            .entries
            .keys()
            .filter(|k| k.endpoint_id == id && k.direction == dir && k.dport != 0)
            .map(|k| k.dport)
            .collect()
    };
    // Ingress: each web pod's own port; the one without it matches nothing.
    assert_eq!(entry_ports(&engine, 1, DIR_INGRESS), vec![80]);
    assert_eq!(entry_ports(&engine, 2, DIR_INGRESS), vec![8080]);
    assert_eq!(entry_ports(&engine, 3, DIR_INGRESS), Vec::<u16>::new());
    assert_eq!(
        engine.flags(3) & hypha_common::ENDPOINT_F_INGRESS_POLICY,
        hypha_common::ENDPOINT_F_INGRESS_POLICY
    );
    assert_eq!(engine.unresolved_ports(1), Vec::<String>::new());
    assert_eq!(
        engine.unresolved_ports(3),
        vec!["ingress port 'http' of default/web".to_owned()]
    );
    // Egress: the union of the selected peers' ports; `metrics` resolves nowhere.
    assert_eq!(entry_ports(&engine, 4, DIR_EGRESS), vec![80, 8080]);
    assert_eq!(
        engine.unresolved_ports(4),
        vec!["egress port 'metrics' of default/client".to_owned()]
    );

    // Endpoint 3 gets the port: it resolves, and the client's egress follows.
    let before = engine.compiled().clone();
    let p3 = ports(&[("http", PROTO_TCP, 81), ("metrics", PROTO_TCP, 9090)]);
    model.endpoints.get_mut(&3).unwrap().ports = p3.clone();
    let outcome = engine.set_ports(3, p3).unwrap();
    model.check(&engine, &before, &outcome).unwrap();
    assert_eq!(entry_ports(&engine, 3, DIR_INGRESS), vec![81]);
    assert_eq!(engine.unresolved_ports(3), Vec::<String>::new());
    assert_eq!(
        entry_ports(&engine, 4, DIR_EGRESS),
        vec![80, 81, 8080, 9090]
    );
    assert_eq!(engine.unresolved_ports(4), Vec::<String>::new());

    // A UDP port of that name is not the TCP one the rule names.
    let before = engine.compiled().clone();
    let p1 = ports(&[("http", PROTO_UDP, 80)]);
    model.endpoints.get_mut(&1).unwrap().ports = p1.clone();
    let outcome = engine.set_ports(1, p1).unwrap();
    model.check(&engine, &before, &outcome).unwrap();
    assert_eq!(entry_ports(&engine, 1, DIR_INGRESS), Vec::<u16>::new());
    assert_eq!(engine.unresolved_ports(1).len(), 1);
}

#[test]
fn a_change_that_does_not_fit_leaves_the_engine_as_it_was() {
    // 40,000 entries per selected endpoint: six fit in hypha_policy, seven do not.
    let big = k8s(
        "big",
        "default",
        "  podSelector: {matchLabels: {app: big}}\n  ingress: [{ports: [{port: 1, endPort: 40000}]}]\n",
    );
    let endpoints: Vec<PolicyEndpoint> = (1..=6)
        .map(|i| ep(i, "default", &[("app", "big")]))
        .collect();
    let mut engine = Model::new(&[big], &endpoints).engine();
    let before = engine.compiled().clone();

    let err = engine
        .join(ep(7, "default", &[("app", "big")]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            PolicyError::Capacity {
                map: "hypha_policy",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(engine.compiled(), &before);
    assert_eq!(engine.identity_of(7), None);

    // An update that would select one more endpoint, from a new identity: refused too,
    // and the allocator is as it was.
    engine.join(ep(8, "default", &[("app", "small")])).unwrap();
    let before = engine.compiled().clone();
    let wider = k8s(
        "big",
        "default",
        "  podSelector: {matchExpressions: [{key: app, operator: Exists}]}\n  ingress: [{from: [{ipBlock: {cidr: 192.168.0.0/16}}], ports: [{port: 1, endPort: 40000}]}]\n",
    );
    let err = engine.update(vec![wider], Vec::new()).unwrap_err();
    assert!(matches!(err, PolicyError::Capacity { .. }), "{err}");
    assert_eq!(engine.compiled(), &before);
    // And it still works afterwards.
    let outcome = engine.leave(8);
    assert_eq!(outcome.diff.ipcache_del, vec![prefix(addr(8))]);
}

/// Times the engine alone at the scale: `cargo test -p hypha-agent --release --lib
/// engine_at_scale -- --ignored --nocapture`.
#[test]
#[ignore = "a timing, not a check: run it by name"]
fn engine_at_scale() {
    let (policies, endpoints) = many_policies(10_000, 100, 250);
    let t = Instant::now();
    let mut engine = PolicyEngine::new(
        policies.clone(),
        BTreeMap::new(),
        endpoints,
        IdentityAllocator::default(),
        hosts(),
    )
    .unwrap();
    let build = t.elapsed();
    let entries = engine.compiled().entries.len();

    // ns42's 1st policy: selects a0 (pod 43), allows a1 (pod 143) on port 1000.
    let update = |engine: &mut PolicyEngine, port: u16| {
        let mut changed = policies[42].clone();
        changed.ingress.allow[0].ports = Some(vec![PortRange {
            proto: PROTO_TCP,
            first: port,
            last: port,
        }]);
        let t = Instant::now();
        let outcome = engine.update(vec![changed], Vec::new()).unwrap();
        (t.elapsed(), outcome)
    };
    let (update_first, _) = update(&mut engine, 65000);
    let (update, outcome) = update(&mut engine, 65001);
    let existing = engine.endpoint(1).unwrap().clone();
    let mut joining = existing.clone();
    joining.id = 1000;
    joining.address = Some(Ipv4Addr::new(10, 245, 0, 1));
    let t = Instant::now();
    let joined = engine.join(joining).unwrap();
    let join = t.elapsed();
    println!(
        "engine: full build of 10,000 policies / 250 endpoints: {build:?} ({entries} entries); \
         one policy update: {update:?} ({} entries changed; the first one: {update_first:?}); \
         join with an existing identity: {join:?} ({} entries)",
        outcome.diff.entries_set.len() + outcome.diff.entries_del.len(),
        joined.diff.entries_set.len()
    );
}

/// `n` NetworkPolicies over `namespaces` namespaces and `pods` endpoints, as the bench's
/// "many policies" case makes them: pod `i` is in namespace `ns<i % namespaces>` with
/// `app: a<i / namespaces % 3>`; policy `j` is the `i = j / namespaces`-th of namespace
/// `ns<j % namespaces>`, selects `app: a<i % 3>` and allows `app: a<(i + 1) % 3>` of its
/// namespace on TCP port `1000 + i`.
pub(super) fn many_policies(
    n: usize,
    namespaces: usize,
    pods: usize,
) -> (Vec<Policy>, Vec<PolicyEndpoint>) {
    let mut policies = Vec::new();
    for j in 0..n {
        let (k, i) = (j % namespaces, j / namespaces);
        policies.push(k8s(
            &format!("p{i}"),
            &format!("ns{k}"),
            &format!(
                "  podSelector: {{matchLabels: {{app: a{}}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: a{}}}}}}}], ports: [{{port: {}}}]}}]\n",
                i % 3,
                (i + 1) % 3,
                1000 + i
            ),
        ));
    }
    let endpoints = (0..pods)
        .map(|i| {
            ep(
                i as u32 + 1,
                &format!("ns{}", i % namespaces),
                &[("app", &format!("a{}", i / namespaces % 3))],
            )
        })
        .collect();
    (policies, endpoints)
}

// ---------------------------------------------------------------- other nodes' endpoints

/// Remote endpoint `n` (engine id `REMOTE + n`) at 10.245.<n / 250>.<n % 250 + 2>.
fn remote(n: u32, ns: &str, pairs: &[(&str, &str)]) -> PolicyEndpoint {
    let a = Ipv4Addr::new(10, 245, (n / 250 % 256) as u8, (n % 250 + 2) as u8);
    let mut e = PolicyEndpoint::new(REMOTE + n, a, &labels(ns, pairs)).into_remote();
    e.address = Some(a);
    e
}

#[test]
fn remote_endpoints_are_peers_with_no_entries_of_their_own() {
    let server_policy = k8s(
        "server",
        "default",
        "  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: client}}\n",
    );
    // A policy selecting the remote's own labels: it must still get nothing.
    let client_policy = k8s(
        "client",
        "default",
        "  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Ingress, Egress]\n",
    );
    let server = ep(1, "default", &[("app", "server")]);
    let mut model = Model::new(
        &[server_policy, client_policy],
        std::slice::from_ref(&server),
    );
    let mut engine = model.engine();
    let before = engine.compiled().clone();
    let client = remote(1, "default", &[("app", "client")]);
    let other = remote(2, "default", &[("app", "other")]);
    model.endpoints.insert(client.id, client.clone());
    model.endpoints.insert(other.id, other.clone());
    let outcome = engine
        .update_remote(vec![client.clone(), other.clone()], Vec::new())
        .unwrap();
    model.check(&engine, &before, &outcome).unwrap();

    let client_id = engine
        .identity_of(client.id)
        .expect("the remote has an identity");
    let other_id = engine.identity_of(other.id).unwrap();
    let c = engine.compiled();
    assert_eq!(
        c.ipcache.get(&prefix(client.address.unwrap())),
        Some(&client_id)
    );
    assert_eq!(
        c.ipcache.get(&prefix(other.address.unwrap())),
        Some(&other_id)
    );
    // The local server admits the remote client's identity, not the other's.
    let admits = |identity| {
        c.entries.keys().any(|k| {
            k.endpoint_id == server.id && k.identity == identity && k.direction == DIR_INGRESS
        })
    };
    assert!(admits(client_id), "{:?}", c.entries);
    assert!(!admits(other_id));
    // Nothing is keyed by a remote's id, and it has no flags.
    assert!(c.entries.keys().all(|k| k.endpoint_id < REMOTE));
    assert!(c.endpoint_flags.keys().all(|id| *id < REMOTE));
    assert!(keys_of(&outcome.diff).all(|k| k.endpoint_id < REMOTE));
    assert!(outcome.diff.flags_set.is_empty());
    assert_eq!(engine.remote_ids().count(), 2);

    // The same batch again changes nothing.
    let again = engine
        .update_remote(vec![client.clone(), other.clone()], Vec::new())
        .unwrap();
    assert!(again.diff.is_empty(), "{:?}", again.diff);

    // The client goes: its ipcache entry and the server's entry for it go.
    let before = engine.compiled().clone();
    model.endpoints.remove(&client.id);
    let outcome = engine.update_remote(Vec::new(), vec![client.id]).unwrap();
    model.check(&engine, &before, &outcome).unwrap();
    assert!(
        outcome
            .diff
            .ipcache_del
            .contains(&prefix(client.address.unwrap()))
    );
    assert!(
        !engine
            .compiled()
            .ipcache
            .contains_key(&prefix(client.address.unwrap()))
    );
    assert!(
        !engine
            .compiled()
            .entries
            .keys()
            .any(|k| k.identity == client_id)
    );

    // A local endpoint's id is not a remote's to replace.
    let mut fake = server.clone().into_remote();
    fake.labels = labels("default", &[("app", "client")]);
    assert!(engine.update_remote(vec![fake], Vec::new()).is_err());
}

#[test]
fn a_local_endpoint_wins_an_address_a_remote_one_claims() {
    let local = ep(1, "default", &[("app", "web")]);
    let mut model = Model::new(&[], std::slice::from_ref(&local));
    let mut engine = model.engine();
    let mut stale = remote(7, "default", &[("app", "db")]);
    stale.address = local.address;
    let before = engine.compiled().clone();
    model.endpoints.insert(stale.id, stale.clone());
    let outcome = engine.update_remote(vec![stale], Vec::new()).unwrap();
    model.check(&engine, &before, &outcome).unwrap();
    assert_eq!(
        engine.compiled().ipcache[&prefix(local.address.unwrap())],
        engine.identity_of(local.id).unwrap()
    );
}

/// 50,000 remote endpoints (1,000 label sets) joining in one batch, with a policy that
/// selects some of them. Release figure: `cargo test --release -p hypha-agent
/// fifty_thousand_remote -- --nocapture`.
#[test]
fn fifty_thousand_remote_endpoints_sync_in_one_batch() {
    let policy = k8s(
        "server",
        "default",
        "  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {tier: front}}\n",
    );
    let server = ep(1, "default", &[("app", "server")]);
    let mut engine = PolicyEngine::new(
        vec![policy],
        BTreeMap::new(),
        vec![server.clone()],
        IdentityAllocator::default(),
        hosts(),
    )
    .unwrap();
    let batch: Vec<PolicyEndpoint> = (0..50_000u32)
        .map(|n| {
            let app = format!("app{}", n % 1000);
            let tier = if n % 2 == 0 { "front" } else { "back" };
            let mut e = remote(n, "default", &[("app", &app), ("tier", tier)]);
            e.address = Some(Ipv4Addr::new(10, 245, (n / 250) as u8, (n % 250 + 2) as u8));
            e
        })
        .collect();
    let t = Instant::now();
    let outcome = engine.update_remote(batch, Vec::new()).unwrap();
    let took = t.elapsed();
    eprintln!("50,000 remote endpoints in one batch: {took:?}");
    assert_eq!(outcome.diff.ipcache_set.len(), 50_000);
    assert_eq!(engine.remote_ids().count(), 50_000);
    // The server admits the 500 "front" label sets (app0, app2, ...), nothing else.
    let admitted: std::collections::BTreeSet<u32> = engine
        .compiled()
        .entries
        .keys()
        .filter(|k| k.endpoint_id == server.id && k.direction == DIR_INGRESS)
        .map(|k| k.identity)
        .collect();
    assert_eq!(admitted.len(), 500 + 1, "the front identities and the host");
    // Debug builds are several times slower than release; the bound is generous.
    let bound = if cfg!(debug_assertions) { 60 } else { 5 };
    assert!(took.as_secs() < bound, "{took:?}");
}

// ---------------------------------------------------------------- cluster identities

/// A store's assignment: number, namespace, labels.
type Assignment<'a> = (u32, &'a str, &'a [(&'a str, &'a str)]);

fn cluster_allocator(assigned: &[Assignment<'_>]) -> IdentityAllocator {
    let mut a = IdentityAllocator::default();
    a.set_cluster(true);
    for (id, ns, pairs) in assigned {
        let l: Labels = pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        a.assign(ns, &l, *id);
    }
    a
}

fn plain(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect()
}

#[test]
fn cluster_mode_takes_the_stores_numbers_and_refuses_unassigned_labels() {
    let alloc = cluster_allocator(&[(4242, "default", &[("app", "web")])]);
    let web = ep(1, "default", &[("app", "web")]);
    let mut engine = PolicyEngine::new(
        Vec::new(),
        BTreeMap::new(),
        vec![web.clone()],
        alloc,
        hosts(),
    )
    .unwrap();
    assert_eq!(engine.identity_of(web.id), Some(4242));
    assert_eq!(
        engine.compiled().ipcache[&prefix(web.address.unwrap())],
        4242
    );

    // Unassigned labels: refused, naming them; nothing changes.
    let before = engine.compiled().clone();
    let err = engine.join(ep(2, "default", &[("app", "db")])).unwrap_err();
    assert!(
        matches!(&err, PolicyError::Unassigned { labels } if labels == "default/{app=db}"),
        "{err}"
    );
    assert!(err.to_string().contains("app=db"), "{err}");
    assert_eq!(engine.compiled(), &before);

    // Once the store numbers them, the same join works and takes that number.
    let outcome = engine
        .assign_identities(
            vec![(777, "default".into(), plain(&[("app", "db")]))],
            vec![],
            false,
        )
        .unwrap();
    assert!(outcome.identities_changed && outcome.diff.is_empty());
    assert_eq!(
        engine.known_identity("default", &plain(&[("app", "db")])),
        Some(777)
    );
    engine.join(ep(2, "default", &[("app", "db")])).unwrap();
    assert_eq!(engine.identity_of(2), Some(777));

    // CIDR identities and policy ids stay local.
    let p = k8s(
        "p",
        "default",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {cidr: 192.168.0.0/16}\n",
    );
    engine.update(vec![p], Vec::new()).unwrap();
    let net: IpNet = "192.168.0.0/16".parse().unwrap();
    assert!(engine.compiled().ipcache[&net] >= hypha_common::IDENTITY_FIRST_CIDR);

    // The assignments are persisted with the allocator; leaving keeps them.
    engine.leave(2);
    let saved = serde_json::to_string(&engine.compiled().identities).unwrap();
    let back: IdentityAllocator = serde_json::from_str(&saved).unwrap();
    assert_eq!(back, engine.compiled().identities);
    assert!(back.is_cluster());
    assert_eq!(
        back.assigned("default", &plain(&[("app", "db")])),
        Some(777)
    );
}

#[test]
fn a_single_node_allocator_saves_as_before() {
    let mut a = IdentityAllocator::default();
    a.sync(
        &[("default".to_owned(), plain(&[("app", "web")]))].into(),
        &Default::default(),
        &Default::default(),
    )
    .unwrap();
    let text = serde_json::to_string(&a).unwrap();
    assert!(
        !text.contains("cluster") && !text.contains("assigned"),
        "{text}"
    );
    assert_eq!(serde_json::from_str::<IdentityAllocator>(&text).unwrap(), a);
}

/// The store wins: labels in use move to the number the store gives them, and a
/// number in use goes to the labels the store gives it when their holder is renumbered
/// in the same batch; a holder left without a number refuses the change.
#[test]
fn on_conflicting_numbers_the_store_wins() {
    let alloc = cluster_allocator(&[
        (300, "default", &[("app", "web")]),
        (301, "default", &[("app", "db")]),
    ]);
    let web = ep(1, "default", &[("app", "web")]);
    let db = remote(1, "default", &[("app", "db")]);
    let policies = vec![k8s(
        "web",
        "default",
        "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: db}}\n",
    )];
    let mut engine = PolicyEngine::new(
        policies.clone(),
        BTreeMap::new(),
        vec![web.clone(), db.clone()],
        alloc,
        hosts(),
    )
    .unwrap();
    assert_eq!(engine.identity_of(db.id), Some(301));

    // The store says db is 500 (its data was rebuilt): db moves, web's entry follows.
    let before = engine.compiled().clone();
    let outcome = engine
        .assign_identities(
            vec![(500, "default".into(), plain(&[("app", "db")]))],
            vec![],
            false,
        )
        .unwrap();
    assert_eq!(engine.identity_of(db.id), Some(500));
    assert_eq!(engine.compiled().ipcache[&prefix(db.address.unwrap())], 500);
    assert!(
        engine
            .compiled()
            .entries
            .keys()
            .any(|k| k.endpoint_id == web.id && k.identity == 500)
    );
    assert!(!engine.compiled().entries.keys().any(|k| k.identity == 301));
    assert_eq!(outcome.diff, diff(&before, engine.compiled()));

    // The store gives 300 (web's) to db without renumbering web: refused, unchanged.
    let before = engine.compiled().clone();
    let err = engine
        .assign_identities(
            vec![(300, "default".into(), plain(&[("app", "db")]))],
            vec![],
            false,
        )
        .unwrap_err();
    assert!(
        matches!(&err, PolicyError::IdentityConflict { id: 300, held, .. } if held == "default/{app=web}"),
        "{err}"
    );
    assert_eq!(engine.compiled(), &before);

    // Both renumbered in one batch: swapped.
    engine
        .assign_identities(
            vec![
                (300, "default".into(), plain(&[("app", "db")])),
                (500, "default".into(), plain(&[("app", "web")])),
            ],
            vec![],
            false,
        )
        .unwrap();
    assert_eq!(engine.identity_of(db.id), Some(300));
    assert_eq!(engine.identity_of(web.id), Some(500));

    // A resync forgets what the store no longer has, except numbers in use.
    engine
        .assign_identities(
            vec![(300, "default".into(), plain(&[("app", "db")]))],
            vec![],
            true,
        )
        .unwrap();
    let a = &engine.compiled().identities;
    assert_eq!(a.assigned("default", &plain(&[("app", "web")])), Some(500));
    assert_eq!(a.assignments().len(), 2);
}

#[test]
fn other_nodes_addresses_are_replaced_as_a_set_and_rules_follow() {
    let db = ep(1, "ns1", &[("app", "db")]);
    let from_nodes = k8s(
        "nodes",
        "ns1",
        "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 172.16.0.0/16}}]}]\n",
    );
    let mut model = Model::new(&[from_nodes], &[db]);
    let mut engine = model.engine();
    let node = |last: u8| -> IpAddr { Ipv4Addr::new(172, 16, 0, last).into() };
    let router6: IpAddr = "fd00:10:244:1::1".parse().unwrap();
    let allows_nodes = |e: &PolicyEngine| {
        e.compiled().entries.keys().any(|k| {
            k.endpoint_id == 1
                && k.direction == DIR_INGRESS
                && k.identity == hypha_common::IDENTITY_REMOTE_NODE
        })
    };
    assert!(!allows_nodes(&engine), "no node known yet");

    let before = engine.compiled().clone();
    model.remote_nodes = BTreeSet::from([node(12), node(13), router6]);
    let out = engine.set_remote_nodes(model.remote_nodes.clone()).unwrap();
    model.check(&engine, &before, &out).unwrap();
    let set: BTreeSet<IpNet> = out.diff.ipcache_set.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        set,
        BTreeSet::from([prefix(node(12)), prefix(node(13)), prefix(router6)])
    );
    assert!(
        out.diff
            .ipcache_set
            .iter()
            .all(|(_, id)| *id == hypha_common::IDENTITY_REMOTE_NODE)
    );
    assert!(allows_nodes(&engine), "the CIDR rule covers the nodes now");

    // Replaced: node 13 goes, node 14 comes, the others are not rewritten.
    let before = engine.compiled().clone();
    model.remote_nodes = BTreeSet::from([node(12), node(14), router6]);
    let out = engine.set_remote_nodes(model.remote_nodes.clone()).unwrap();
    model.check(&engine, &before, &out).unwrap();
    assert_eq!(
        out.diff.ipcache_set,
        vec![(prefix(node(14)), hypha_common::IDENTITY_REMOTE_NODE)]
    );
    assert_eq!(out.diff.ipcache_del, vec![prefix(node(13))]);
    assert!(out.diff.entries_set.is_empty() && out.diff.entries_del.is_empty());

    // The same set again changes nothing; the empty set removes them all.
    let out = engine.set_remote_nodes(model.remote_nodes.clone()).unwrap();
    assert!(out.diff.is_empty());
    let before = engine.compiled().clone();
    model.remote_nodes.clear();
    let out = engine.set_remote_nodes(BTreeSet::new()).unwrap();
    model.check(&engine, &before, &out).unwrap();
    assert_eq!(out.diff.ipcache_del.len(), 3);
    assert!(!allows_nodes(&engine));

    // Other changes keep them (a rebuild after a conflict too).
    model.remote_nodes = BTreeSet::from([node(12)]);
    engine.set_remote_nodes(model.remote_nodes.clone()).unwrap();
    let before = engine.compiled().clone();
    let web = ep(2, "ns1", &[("app", "web")]);
    model.endpoints.insert(2, web.clone());
    let out = engine.join(web).unwrap();
    model.check(&engine, &before, &out).unwrap();
    assert_eq!(
        engine.compiled().ipcache.get(&prefix(node(12))),
        Some(&hypha_common::IDENTITY_REMOTE_NODE)
    );
    assert_eq!(engine.remote_nodes(), &model.remote_nodes);
}

#[test]
fn the_identities_generation_moves_exactly_when_the_allocator_changes() {
    let mut engine = Model::new(&[], &[ep(1, "ns1", &[("app", "db")])]).engine();
    let mut last = engine.identities_generation();
    let mut moved = |e: &PolicyEngine, want: bool, what: &str| {
        let now = e.identities_generation();
        assert_eq!(now != last, want, "{what}");
        last = now;
    };
    engine.join(ep(2, "ns1", &[("app", "db")])).unwrap();
    moved(&engine, false, "an endpoint of an identity in use");
    let before = engine.compiled().identities.clone();
    engine.join(ep(3, "ns1", &[("app", "web")])).unwrap();
    assert_ne!(engine.compiled().identities, before);
    moved(&engine, true, "a new label set");
    engine
        .set_remote_nodes([IpAddr::from(Ipv4Addr::new(172, 16, 0, 12))].into())
        .unwrap();
    moved(&engine, false, "other nodes' addresses number nothing");
    engine.leave(3);
    moved(&engine, true, "a label set released");
    engine
        .assign_identities(vec![(5000, "ns2".into(), Labels::new())], Vec::new(), false)
        .unwrap();
    moved(&engine, true, "a number the store gave");
}
