//! The runtime's view of the store (pure, no I/O): the mirror's deltas classified by key
//! kind ([`Layout::parse`]), decoded, kept, and turned into the agent's batches.
//!
//! Batch keys, as the agent's `apply_*` receive them in `RemoteBatch::removes`:
//! identities: the number in decimal; endpoints: the full store key (as
//! `RemoteEndpoint::key`); policies: `namespace/name`; namespaces: the namespace.
//!
//! Nodes are not batched by key: any change of what routing needs of them (a `cidrs/`
//! key, or the addresses of a `nodes/` record; not a heartbeat) gives the whole set of
//! nodes that have CIDRs, as `Batches::nodes`, and so does every resync.
//!
//! An incremental update gives each kind's changes, one per key (the last one wins when a
//! watch batch touched a key twice). A resync (the first list, and every list after a lost
//! watch) gives each kind's whole set with `resync: true`, so that the agent sweeps what
//! it kept from before (its persisted remote endpoints of a disconnected start included)
//! without removing anything still valid in between.

use std::collections::{BTreeMap, BTreeSet};

use hypha_cluster::layout::{
    EndpointEntry, IdentityRecord, Key, Labels, Layout, NodeCidrs, NodeRecord,
};
use hypha_cluster::mirror::Delta;

use crate::control::{RemoteBatch, RemoteEndpoint};
use crate::overlay::ClusterNode;
use crate::policy::Policy;
use crate::service::{EndpointSlice, Service};

/// Everything of the store the runtime keeps, decoded.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub nodes: BTreeMap<String, NodeRecord>,
    pub cidrs: BTreeMap<String, NodeCidrs>,
    pub identities: BTreeMap<u32, IdentityRecord>,
    /// (namespace, labels) → number, the reverse of `identities` (plus numbers the store
    /// just gave `resolve_identity`, until the mirror brings their record).
    pub by_labels: BTreeMap<(String, Labels), u32>,
    /// Every node's endpoints (this node's too), by store key.
    pub endpoints: BTreeMap<String, EndpointEntry>,
    /// By `namespace/name`.
    pub policies: BTreeMap<String, Policy>,
    pub namespaces: BTreeMap<String, Labels>,
    /// By `namespace/name`.
    pub services: BTreeMap<String, Service>,
    pub slices: BTreeMap<String, EndpointSlice>,
    /// Whether a full list has been applied.
    pub synced: bool,
    /// The nodes as the last `Batches::nodes` gave them.
    pub routed_nodes: Option<Vec<ClusterNode>>,
}

/// The agent's batches for one update (a kind without changes: `None`).
#[derive(Debug, Default, PartialEq)]
pub struct Batches {
    pub identities: Option<RemoteBatch<(u32, String, Labels)>>,
    pub endpoints: Option<RemoteBatch<RemoteEndpoint>>,
    pub policies: Option<RemoteBatch<Policy>>,
    pub namespaces: Option<RemoteBatch<(String, Labels)>>,
    /// Services and `EndpointSlice`s (removals: `namespace/name`).
    pub services: Option<RemoteBatch<Service>>,
    pub slices: Option<RemoteBatch<EndpointSlice>>,
    /// Every node with pod CIDRs (this one included), when they changed.
    pub nodes: Option<Vec<ClusterNode>>,
    /// Values that cannot be read (logged; the key counts as absent).
    pub warnings: Vec<String>,
}

/// One kind's changes by key: `Some` upserted, `None` removed (the last one wins).
type Changes<T> = BTreeMap<String, Option<T>>;

fn batch<T>(changes: Changes<T>) -> Option<RemoteBatch<T>> {
    if changes.is_empty() {
        return None;
    }
    let mut b = RemoteBatch {
        upserts: Vec::new(),
        removes: Vec::new(),
        resync: false,
    };
    for (key, v) in changes {
        match v {
            Some(v) => b.upserts.push(v),
            None => b.removes.push(key),
        }
    }
    Some(b)
}

fn full<T>(upserts: Vec<T>) -> Option<RemoteBatch<T>> {
    Some(RemoteBatch {
        upserts,
        removes: Vec::new(),
        resync: true,
    })
}

impl View {
    /// Applies the mirror's deltas; `me` is this node (its endpoints stay out of the
    /// agent's batches: they are its own).
    pub fn apply(
        &mut self,
        layout: &Layout,
        me: &str,
        deltas: Vec<Delta>,
        resync: bool,
    ) -> Batches {
        let mut out = Batches::default();
        let mut ids: Changes<(u32, String, Labels)> = BTreeMap::new();
        let mut eps: Changes<RemoteEndpoint> = BTreeMap::new();
        let mut pols: Changes<Policy> = BTreeMap::new();
        let mut nss: Changes<(String, Labels)> = BTreeMap::new();
        let mut svcs: Changes<Service> = BTreeMap::new();
        let mut slcs: Changes<EndpointSlice> = BTreeMap::new();
        for delta in deltas {
            let (key, value) = match delta {
                Delta::Upsert { key, value } => (key, Some(value)),
                Delta::Remove { key } => (key, None),
            };
            let mut decode = |v: &[u8]| -> Option<serde_json::Value> {
                match serde_json::from_slice(v) {
                    Ok(j) => Some(j),
                    Err(e) => {
                        out.warnings
                            .push(format!("{key} in the cluster store is not valid JSON: {e}"));
                        None
                    }
                }
            };
            let json = value.as_deref().and_then(&mut decode);
            match layout.parse(&key) {
                Some(Key::Node(name)) => {
                    match json.clone().map(serde_json::from_value::<NodeRecord>) {
                        Some(Ok(r)) => {
                            self.nodes.insert(name.to_owned(), r);
                        }
                        Some(Err(e)) => {
                            out.warnings.push(invalid(&key, e));
                            self.nodes.remove(name);
                        }
                        None => {
                            self.nodes.remove(name);
                        }
                    }
                }
                Some(Key::Cidrs(name)) => {
                    match json.clone().map(serde_json::from_value::<NodeCidrs>) {
                        Some(Ok(c)) => {
                            self.cidrs.insert(name.to_owned(), c);
                        }
                        Some(Err(e)) => {
                            out.warnings.push(invalid(&key, e));
                            self.cidrs.remove(name);
                        }
                        None => {
                            self.cidrs.remove(name);
                        }
                    }
                }
                Some(Key::Identity(id)) => {
                    if let Some(old) = self.identities.remove(&id) {
                        let k = (old.namespace, old.labels);
                        if self.by_labels.get(&k) == Some(&id) {
                            self.by_labels.remove(&k);
                        }
                    }
                    let rec = match json.clone().map(serde_json::from_value::<IdentityRecord>) {
                        Some(Ok(r)) => Some(r),
                        Some(Err(e)) => {
                            out.warnings.push(invalid(&key, e));
                            None
                        }
                        None => None,
                    };
                    match rec {
                        Some(r) => {
                            self.by_labels
                                .insert((r.namespace.clone(), r.labels.clone()), id);
                            ids.insert(
                                id.to_string(),
                                Some((id, r.namespace.clone(), r.labels.clone())),
                            );
                            self.identities.insert(id, r);
                        }
                        None => {
                            ids.insert(id.to_string(), None);
                        }
                    }
                }
                Some(Key::Endpoint { node, .. }) => {
                    let entry = match json.clone().map(serde_json::from_value::<EndpointEntry>) {
                        Some(Ok(mut e)) => {
                            // The key says whose it is.
                            e.node = node.to_owned();
                            Some(e)
                        }
                        Some(Err(e)) => {
                            out.warnings.push(invalid(&key, e));
                            None
                        }
                        None => None,
                    };
                    let mine = node == me;
                    match entry {
                        Some(e) => {
                            if !mine {
                                eps.insert(
                                    key.clone(),
                                    Some(RemoteEndpoint {
                                        key: key.clone(),
                                        entry: e.clone(),
                                    }),
                                );
                            }
                            self.endpoints.insert(key, e);
                        }
                        None => {
                            if !mine {
                                eps.insert(key.clone(), None);
                            }
                            self.endpoints.remove(&key);
                        }
                    }
                }
                Some(Key::Namespace(ns)) => {
                    let labels = match json.clone().map(serde_json::from_value::<Labels>) {
                        Some(Ok(l)) => Some(l),
                        Some(Err(e)) => {
                            out.warnings.push(invalid(&key, e));
                            None
                        }
                        None => None,
                    };
                    match labels {
                        Some(l) => {
                            self.namespaces.insert(ns.to_owned(), l.clone());
                            nss.insert(ns.to_owned(), Some((ns.to_owned(), l)));
                        }
                        None => {
                            self.namespaces.remove(ns);
                            nss.insert(ns.to_owned(), None);
                        }
                    }
                }
                Some(Key::Policy { namespace, name }) => {
                    let full_name = format!("{namespace}/{name}");
                    let policy = match json.clone().map(serde_json::from_value::<Policy>) {
                        Some(Ok(p)) if p.namespace == namespace && p.name == name => Some(p),
                        Some(Ok(p)) => {
                            out.warnings.push(format!(
                                "{key} in the cluster store holds policy {}, not {full_name}; it is ignored",
                                p.full_name()
                            ));
                            None
                        }
                        Some(Err(e)) => {
                            out.warnings.push(invalid(&key, e));
                            None
                        }
                        None => None,
                    };
                    match policy {
                        Some(p) => {
                            self.policies.insert(full_name.clone(), p.clone());
                            pols.insert(full_name, Some(p));
                        }
                        None => {
                            self.policies.remove(&full_name);
                            pols.insert(full_name, None);
                        }
                    }
                }
                Some(
                    Key::CidrClaim(_)
                    | Key::IdentityLabels(_)
                    | Key::ServiceIp(_)
                    | Key::ServiceNodePort { .. },
                ) => {}
                Some(Key::Service { namespace, name }) => {
                    let full_name = format!("{namespace}/{name}");
                    match json.clone().map(serde_json::from_value::<Service>) {
                        Some(Ok(s)) if s.namespace == namespace && s.name == name => {
                            self.services.insert(full_name.clone(), s.clone());
                            svcs.insert(full_name, Some(s));
                        }
                        other => {
                            if let Some(Err(e)) = other {
                                out.warnings.push(invalid(&key, e));
                            } else if other.is_some() {
                                out.warnings.push(format!(
                                    "{key} in the cluster store holds another service; it is ignored"
                                ));
                            }
                            self.services.remove(&full_name);
                            svcs.insert(full_name, None);
                        }
                    }
                }
                Some(Key::EndpointSlice { namespace, name }) => {
                    let full_name = format!("{namespace}/{name}");
                    match json.clone().map(serde_json::from_value::<EndpointSlice>) {
                        Some(Ok(s)) if s.namespace == namespace && s.name == name => {
                            self.slices.insert(full_name.clone(), s.clone());
                            slcs.insert(full_name, Some(s));
                        }
                        other => {
                            if let Some(Err(e)) = other {
                                out.warnings.push(invalid(&key, e));
                            } else if other.is_some() {
                                out.warnings.push(format!(
                                    "{key} in the cluster store holds another EndpointSlice; it is ignored"
                                ));
                            }
                            self.slices.remove(&full_name);
                            slcs.insert(full_name, None);
                        }
                    }
                }
                None => {
                    if value.is_some() {
                        out.warnings.push(format!(
                            "{key} is not a key of the cluster store's layout under {}; it is ignored",
                            layout.prefix()
                        ));
                    }
                }
            }
        }
        let nodes = self.cluster_nodes();
        if resync || self.routed_nodes.as_ref() != Some(&nodes) {
            self.routed_nodes = Some(nodes.clone());
            out.nodes = Some(nodes);
        }
        if resync {
            self.synced = true;
            out.identities = full(
                self.identities
                    .iter()
                    .map(|(id, r)| (*id, r.namespace.clone(), r.labels.clone()))
                    .collect(),
            );
            out.endpoints = full(self.remote_endpoints(me));
            out.policies = full(self.policies.values().cloned().collect());
            out.services = full(self.services.values().cloned().collect());
            out.slices = full(self.slices.values().cloned().collect());
            out.namespaces = full(
                self.namespaces
                    .iter()
                    .map(|(n, l)| (n.clone(), l.clone()))
                    .collect(),
            );
        } else {
            out.identities = batch(ids);
            out.endpoints = batch(eps);
            out.policies = batch(pols);
            out.namespaces = batch(nss);
            out.services = batch(svcs);
            out.slices = batch(slcs);
        }
        out
    }

    /// The nodes that have pod CIDRs (`cidrs/<node>`), with the addresses of their live
    /// record, else those their CIDRs key kept.
    pub fn cluster_nodes(&self) -> Vec<ClusterNode> {
        self.cidrs
            .iter()
            .map(|(name, c)| ClusterNode {
                name: name.clone(),
                addresses: self
                    .nodes
                    .get(name)
                    .map(|r| r.addresses.clone())
                    .filter(|a| !a.is_empty())
                    .unwrap_or_else(|| c.addresses.clone()),
                pod_cidr: c.v4,
                pod_cidr6: c.v6,
            })
            .collect()
    }

    /// Endpoints of the other nodes.
    pub fn remote_endpoints(&self, me: &str) -> Vec<RemoteEndpoint> {
        self.endpoints
            .iter()
            .filter(|(_, e)| e.node != me)
            .map(|(k, e)| RemoteEndpoint {
                key: k.clone(),
                entry: e.clone(),
            })
            .collect()
    }

    /// This node's endpoints in the store, by key.
    pub fn own_endpoints(&self, me: &str) -> BTreeMap<String, EndpointEntry> {
        self.endpoints
            .iter()
            .filter(|(_, e)| e.node == me)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    /// Every identity an endpoint of the cluster holds.
    pub fn used_identities(&self) -> BTreeSet<u32> {
        self.endpoints.values().map(|e| e.identity).collect()
    }

    /// Every node name the store knows (a record, or CIDRs still allocated).
    pub fn node_names(&self) -> BTreeSet<String> {
        self.nodes
            .keys()
            .chain(self.cidrs.keys())
            .cloned()
            .collect()
    }
}

fn invalid(key: &str, e: serde_json::Error) -> String {
    format!("{key} in the cluster store is not valid: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/hypha/v1/";

    fn up(key: &str, value: serde_json::Value) -> Delta {
        Delta::Upsert {
            key: format!("{P}{key}"),
            value: serde_json::to_vec(&value).unwrap(),
        }
    }

    fn rm(key: &str) -> Delta {
        Delta::Remove {
            key: format!("{P}{key}"),
        }
    }

    fn ep(node: &str, ip: &str, id: u32) -> serde_json::Value {
        serde_json::json!({"node": node, "address": ip, "identity": id,
            "namespace": "default", "labels": {"app": "web"}})
    }

    #[test]
    fn incremental_batches_hold_each_key_once_and_leave_own_endpoints_out() {
        let mut v = View::default();
        let b = v.apply(
            &Layout::new(P),
            "a",
            vec![
                up("endpoints/b/c1/eth0", ep("b", "10.244.1.2", 300)),
                up("endpoints/a/c2/eth0", ep("a", "10.244.0.2", 300)),
                up("endpoints/b/c3/eth0", ep("b", "10.244.1.3", 301)),
                rm("endpoints/b/c3/eth0"),
                up(
                    "identities/id/300",
                    serde_json::json!({"namespace": "default", "labels": {"app": "web"}}),
                ),
                up("namespaces/prod", serde_json::json!({"team": "x"})),
                up("cidr-claims/v4/10.244.1.0_24", serde_json::json!("b")),
            ],
            false,
        );
        let eps = b.endpoints.unwrap();
        assert!(!eps.resync);
        assert_eq!(eps.upserts.len(), 1, "{eps:?}");
        assert_eq!(eps.upserts[0].key, format!("{P}endpoints/b/c1/eth0"));
        assert_eq!(eps.removes, vec![format!("{P}endpoints/b/c3/eth0")]);
        let ids = b.identities.unwrap();
        assert_eq!(ids.upserts[0].0, 300);
        assert_eq!(
            v.by_labels
                .get(&("default".to_owned(), [("app".into(), "web".into())].into())),
            Some(&300)
        );
        assert_eq!(b.namespaces.unwrap().upserts[0].0, "prod");
        assert!(b.policies.is_none(), "no policy changed");
        assert_eq!(v.own_endpoints("a").len(), 1);
        assert_eq!(v.remote_endpoints("a").len(), 1);
        assert_eq!(v.used_identities(), [300].into());
        assert!(b.warnings.is_empty(), "{:?}", b.warnings);
        // Removing the identity clears the reverse map.
        let b = v.apply(&Layout::new(P), "a", vec![rm("identities/id/300")], false);
        assert_eq!(b.identities.unwrap().removes, vec!["300".to_owned()]);
        assert!(v.by_labels.is_empty());
    }

    #[test]
    fn a_resync_gives_whole_sets() {
        let mut v = View::default();
        v.apply(
            &Layout::new(P),
            "a",
            vec![
                up("endpoints/b/c1/eth0", ep("b", "10.244.1.2", 300)),
                up("endpoints/c/c1/eth0", ep("c", "10.244.2.2", 300)),
            ],
            false,
        );
        // The list after a lost watch: c's endpoint went, b's stayed (no delta for it).
        let b = v.apply(&Layout::new(P), "a", vec![rm("endpoints/c/c1/eth0")], true);
        assert!(v.synced);
        let eps = b.endpoints.unwrap();
        assert!(eps.resync && eps.removes.is_empty());
        assert_eq!(eps.upserts.len(), 1);
        assert_eq!(eps.upserts[0].entry.node, "b");
        // Every kind comes, even empty: the agent sweeps what it had.
        assert_eq!(b.policies.unwrap().upserts, vec![]);
        assert!(b.identities.unwrap().resync);
        assert!(b.namespaces.unwrap().resync);
    }

    #[test]
    fn nodes_come_whole_when_what_routing_needs_changes() {
        let l = Layout::new(P);
        let mut v = View::default();
        let record = |ip: &str, beat: u64| {
            serde_json::json!({"name": "b", "uid": "u", "addresses": [ip],
                "version": "t", "heartbeat_ms": beat})
        };
        // The first list: no node yet, said.
        let b = v.apply(&l, "a", vec![], true);
        assert_eq!(b.nodes, Some(vec![]));
        // A record without CIDRs: nothing routed yet, and nothing changed.
        let b = v.apply(&l, "a", vec![up("nodes/b", record("172.16.0.2", 1))], false);
        assert_eq!(b.nodes, None);
        // Its CIDRs (with the addresses registration kept) and ours.
        let b = v.apply(
            &l,
            "a",
            vec![
                up(
                    "cidrs/b",
                    serde_json::json!({"v4": "10.244.1.0/24", "addresses": ["172.16.0.9"]}),
                ),
                up("cidrs/a", serde_json::json!({"v4": "10.244.0.0/24"})),
            ],
            false,
        );
        let nodes = b.nodes.unwrap();
        assert_eq!(nodes.len(), 2, "{nodes:?}");
        assert_eq!(nodes[1].name, "b");
        assert_eq!(
            nodes[1].addresses,
            vec!["172.16.0.2".parse::<std::net::IpAddr>().unwrap()],
            "the live record's addresses win"
        );
        assert_eq!(nodes[1].pod_cidr, Some("10.244.1.0/24".parse().unwrap()));
        // A heartbeat changes nothing routing needs.
        let b = v.apply(&l, "a", vec![up("nodes/b", record("172.16.0.2", 2))], false);
        assert_eq!(b.nodes, None);
        // The record lapses (SIGKILLed agent): still routed, by the kept addresses.
        let b = v.apply(&l, "a", vec![rm("nodes/b")], false);
        let nodes = b.nodes.unwrap();
        assert_eq!(
            nodes[1].addresses,
            vec!["172.16.0.9".parse::<std::net::IpAddr>().unwrap()]
        );
        // A resync gives them even unchanged.
        let b = v.apply(&l, "a", vec![], true);
        assert_eq!(b.nodes.unwrap().len(), 2);
        // `hypha node remove`: its CIDRs go, so does its routing.
        let b = v.apply(&l, "a", vec![rm("cidrs/b")], false);
        let nodes = b.nodes.unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].name, "a");
    }

    #[test]
    fn unreadable_values_are_reported_and_count_as_absent() {
        let mut v = View::default();
        v.apply(
            &Layout::new(P),
            "a",
            vec![up("endpoints/b/c1/eth0", ep("b", "10.244.1.2", 300))],
            false,
        );
        let b = v.apply(
            &Layout::new(P),
            "a",
            vec![
                Delta::Upsert {
                    key: format!("{P}endpoints/b/c1/eth0"),
                    value: b"{not json".to_vec(),
                },
                up("policies/prod/p", serde_json::json!({"namespace": "prod"})),
                up("stray/key", serde_json::json!(1)),
            ],
            false,
        );
        assert_eq!(b.warnings.len(), 3, "{:?}", b.warnings);
        assert!(
            b.warnings[0].contains("endpoints/b/c1/eth0"),
            "{:?}",
            b.warnings
        );
        assert_eq!(
            b.endpoints.unwrap().removes,
            vec![format!("{P}endpoints/b/c1/eth0")]
        );
        assert_eq!(b.policies.unwrap().removes, vec!["prod/p".to_owned()]);
        assert!(v.endpoints.is_empty());
    }
}
