//! Cross-node routing: what the node's tunnel (or native routes) should hold, planned from
//! the cluster's nodes as pure functions; the agent applies the plan through the datapath
//! and host traits.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hypha_common::{MAX_NODES, VXLAN_OVERHEAD4, VXLAN_OVERHEAD6};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sha2::{Digest as _, Sha256};

use crate::config::PodCidrs;
use crate::config::routing::{MIN_MTU4, MIN_MTU6, Routing};
use crate::datapath::TunnelPeerSpec;
use crate::host::ClusterRoute;

/// The id of node `name` in `hypha_node_stats` and the tunnel maps: the first four bytes
/// of the SHA-256 of its name, never 0. The same on every agent and across restarts, so
/// counters survive an agent restart and a node's id needs no coordination. (Two names of
/// one cluster sharing an id, odds about n²/2³³, are detected by the planner.)
pub fn node_id(name: &str) -> u32 {
    let digest = Sha256::digest(name.as_bytes());
    let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    id.max(1)
}

/// The node's own IPv6 address inside its IPv6 pod CIDR (the CIDR's `::1`), the source of
/// what the host sends to other nodes' pods through the tunnel, so that their replies come
/// back through it, and the source IPv6 NodePort flows to a backend on another node are
/// SNATed to (`hypha_lb6_snat`); never handed to a pod (IPv4's counterpart is the
/// gateway).
pub fn router6(cidr: Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(cidr.network()) + 1)
}

/// Another node as the cluster store has it: routed while its `cidrs/<node>` key exists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    /// Its underlay addresses, IPv4 first (its live record's, else those its CIDRs key
    /// kept).
    pub addresses: Vec<IpAddr>,
    pub pod_cidr: Option<Ipv4Net>,
    pub pod_cidr6: Option<Ipv6Net>,
}

/// This node, as the plan needs it.
#[derive(Clone, Debug)]
pub struct LocalNode {
    pub name: String,
    /// `--node-ip`: the family of the first decides the underlay's (IPv4 when there is
    /// an IPv4 one).
    pub node_ips: Vec<IpAddr>,
    pub pod_cidrs: PodCidrs,
    /// The IPv4 gateway (the host's source towards other nodes' IPv4 pods).
    pub gateway: Option<Ipv4Addr>,
    /// The cluster CIDRs, routed through the tunnel as a whole.
    pub cluster_cidr4: Option<Ipv4Net>,
    pub cluster_cidr6: Option<Ipv6Net>,
    /// The VXLAN device (tunnel mode); `None`: native routing.
    pub tunnel_ifindex: Option<u32>,
    /// The subnets of this node's addresses: native routing's on-link test.
    pub subnets: Vec<IpNet>,
}

impl LocalNode {
    /// Whether the underlay is IPv4 (this node has an IPv4 `--node-ip`).
    pub fn underlay_v4(&self) -> bool {
        self.node_ips.iter().any(IpAddr::is_ipv4) || self.node_ips.is_empty()
    }
}

/// What the tunnel maps, the routes and the ipcache should hold for the cluster's nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Tunnel mode: one per routed node (none with native routing).
    pub peers: Vec<TunnelPeerSpec>,
    /// Exactly the routes Hypha owns (see `HostNetwork::set_cluster_routes`).
    pub routes: Vec<ClusterRoute>,
    /// Other nodes' underlay addresses, gateways and IPv6 router addresses: the
    /// remote-node identity's.
    pub remote_nodes: BTreeSet<IpAddr>,
    /// Names of the nodes routed to.
    pub routed: Vec<String>,
    /// Nodes left out, and why (to log once each).
    pub warnings: Vec<String>,
}

/// The plan for `nodes` (this node among them or not: it is left out). Nodes are taken
/// in name order; one whose id or pod CIDR collides with an earlier one (or with this
/// node's CIDRs) is left out with a warning, never a panic.
pub fn plan(local: &LocalNode, nodes: &[ClusterNode]) -> Plan {
    let mut out = Plan::default();
    let mut sorted: Vec<&ClusterNode> = nodes.iter().filter(|n| n.name != local.name).collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    sorted.dedup_by(|a, b| a.name == b.name);
    // Every pod CIDR taken so far, with its owner: ours first.
    let mut taken: Vec<(IpNet, String)> = local
        .pod_cidrs
        .v4
        .map(IpNet::V4)
        .into_iter()
        .chain(local.pod_cidrs.v6.map(IpNet::V6))
        .map(|n| (n, format!("this node ({})", local.name)))
        .collect();
    let mut ids: BTreeMap<u32, String> = BTreeMap::new();
    let v4_underlay = local.underlay_v4();
    let mut routes: BTreeSet<ClusterRoute> = BTreeSet::new();
    if let Some(ifindex) = local.tunnel_ifindex {
        if let Some(c) = local.cluster_cidr4 {
            routes.insert(ClusterRoute::Device {
                dst: IpNet::V4(c),
                ifindex,
                src: local.gateway.map(IpAddr::V4),
            });
        }
        if let Some(c) = local.cluster_cidr6 {
            routes.insert(ClusterRoute::Device {
                dst: IpNet::V6(c),
                ifindex,
                src: local.pod_cidrs.v6.map(|own| IpAddr::V6(router6(own))),
            });
        }
    }
    for node in sorted {
        let cidrs: Vec<IpNet> = node
            .pod_cidr
            .map(IpNet::V4)
            .into_iter()
            .chain(node.pod_cidr6.map(IpNet::V6))
            .collect();
        if cidrs.is_empty() {
            continue;
        }
        let addrs = node
            .addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        if let Some((net, owner)) = cidrs.iter().find_map(|c| {
            taken
                .iter()
                .find(|(t, _)| t.contains(c) || c.contains(t))
                .map(|(t, o)| (*c, format!("{t} of {o}")))
        }) {
            out.warnings.push(format!(
                "node {}: its pod CIDR {net} overlaps {owner}; it is not routed",
                node.name
            ));
            continue;
        }
        let id = node_id(&node.name);
        if let Some(first) = ids.get(&id) {
            out.warnings.push(format!(
                "node {}: its node id {id:#010x} is also node {first}'s (a hash collision of their names); it is not routed",
                node.name
            ));
            continue;
        }
        let mut routed = false;
        match local.tunnel_ifindex {
            Some(ifindex) => {
                let Some(underlay) = node
                    .addresses
                    .iter()
                    .copied()
                    .find(|a| a.is_ipv4() == v4_underlay)
                else {
                    out.warnings.push(format!(
                        "node {}: it has no {} underlay address ({}) while this node's underlay is {}; it is not routed",
                        node.name,
                        if v4_underlay { "IPv4" } else { "IPv6" },
                        if addrs.is_empty() { "none known" } else { &addrs },
                        if v4_underlay { "IPv4" } else { "IPv6" },
                    ));
                    continue;
                };
                if out.peers.len() >= MAX_NODES as usize {
                    out.warnings.push(format!(
                        "node {}: the tunnel maps hold at most {MAX_NODES} nodes; it is not routed",
                        node.name
                    ));
                    continue;
                }
                // A CIDR the node kept from an earlier plan, outside the cluster CIDR.
                for c in &cidrs {
                    let covered = match c {
                        IpNet::V4(n) => local.cluster_cidr4.is_some_and(|k| k.contains(n)),
                        IpNet::V6(n) => local.cluster_cidr6.is_some_and(|k| k.contains(n)),
                    };
                    if !covered {
                        let src = match c {
                            IpNet::V4(_) => local.gateway.map(IpAddr::V4),
                            IpNet::V6(_) => local.pod_cidrs.v6.map(|o| IpAddr::V6(router6(o))),
                        };
                        routes.insert(ClusterRoute::Device {
                            dst: *c,
                            ifindex,
                            src,
                        });
                    }
                }
                out.peers.push(TunnelPeerSpec {
                    node_id: id,
                    name: node.name.clone(),
                    underlay,
                    addresses: node.addresses.clone(),
                    pod_cidr: node.pod_cidr,
                    pod_cidr6: node.pod_cidr6,
                });
                routed = true;
            }
            None => {
                for c in &cidrs {
                    // A gateway of the CIDR's family (a route of one family via the
                    // other's, RFC 5549, is not made).
                    let v4 = matches!(c, IpNet::V4(_));
                    let gateway = node.addresses.iter().find(|a| {
                        a.is_ipv4() == v4 && local.subnets.iter().any(|s| s.contains(*a))
                    });
                    match gateway {
                        Some(g) => {
                            routes.insert(ClusterRoute::Via {
                                dst: *c,
                                gateway: *g,
                            });
                            routed = true;
                        }
                        None => out.warnings.push(format!(
                            "node {}: it has no {} address in a subnet of this node (its addresses: {}), so native routing cannot reach its pod CIDR {c}; it is not routed",
                            node.name,
                            if v4 { "IPv4" } else { "IPv6" },
                            if addrs.is_empty() { "none known" } else { &addrs },
                        )),
                    }
                }
            }
        }
        if !routed {
            continue;
        }
        ids.insert(id, node.name.clone());
        taken.extend(cidrs.iter().map(|c| (*c, format!("node {}", node.name))));
        out.remote_nodes.extend(node.addresses.iter().copied());
        if let Some(gw) = node.pod_cidr.and_then(|c| c.hosts().next()) {
            out.remote_nodes.insert(IpAddr::V4(gw));
        }
        if let Some(c6) = node.pod_cidr6 {
            out.remote_nodes.insert(IpAddr::V6(router6(c6)));
        }
        out.routed.push(node.name.clone());
    }
    out.routes = routes.into_iter().collect();
    out
}

/// The pods' MTU: `--tunnel-mtu`, else the underlay's (`underlay`: the MTU of the
/// interface holding `--node-ip`) less the tunnel's overhead (50 over IPv4, 70 over
/// IPv6); native routing: the underlay's. An unknown underlay MTU is taken as 1500, with
/// a warning. Refused (naming the values) when the result is below what the pods' families
/// need.
pub fn pod_mtu(
    routing: &Routing,
    local: &LocalNode,
    underlay: Option<u32>,
    warnings: &mut Vec<String>,
) -> Result<Option<u32>, String> {
    let ipv6 = local.pod_cidrs.v6.is_some();
    let floor = if ipv6 { MIN_MTU6 } else { MIN_MTU4 };
    let node_ip = local
        .node_ips
        .first()
        .map_or_else(|| "(none)".to_owned(), ToString::to_string);
    match routing {
        Routing::Native => Ok(underlay),
        Routing::Tunnel { mtu: Some(m), .. } => Ok(Some(*m)),
        Routing::Tunnel { mtu: None, .. } => {
            let underlay = underlay.unwrap_or_else(|| {
                warnings.push(format!(
                    "no interface holds node-ip {node_ip}: its MTU is taken as 1500 (set --tunnel-mtu to choose)"
                ));
                1500
            });
            let overhead = if local.underlay_v4() {
                VXLAN_OVERHEAD4
            } else {
                VXLAN_OVERHEAD6
            };
            let mtu = underlay.saturating_sub(overhead);
            if mtu < floor {
                return Err(format!(
                    "the underlay's MTU {underlay} (the interface of node-ip {node_ip}) less the tunnel's {overhead} bytes leaves {mtu}, below the {floor} the pods need{}; set --tunnel-mtu or raise the underlay's MTU",
                    if ipv6 { " for IPv6" } else { "" }
                ));
            }
            Ok(Some(mtu))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_nonzero_and_differ_by_name() {
        assert_eq!(node_id("node-0"), node_id("node-0"));
        assert_ne!(node_id("node-0"), node_id("node-1"));
        assert_ne!(node_id(""), 0);
    }

    #[test]
    fn router6_is_the_first_address_after_the_network() {
        let cidr: Ipv6Net = "fd00:10:244:3::/64".parse().unwrap();
        assert_eq!(
            router6(cidr),
            "fd00:10:244:3::1".parse::<Ipv6Addr>().unwrap()
        );
    }

    fn local(tunnel: Option<u32>) -> LocalNode {
        LocalNode {
            name: "node-0".into(),
            node_ips: vec![
                "172.16.0.10".parse().unwrap(),
                "fd00:16::10".parse().unwrap(),
            ],
            pod_cidrs: "10.244.0.0/24,fd00:10:244::/64".parse().unwrap(),
            gateway: Some("10.244.0.1".parse().unwrap()),
            cluster_cidr4: Some("10.244.0.0/16".parse().unwrap()),
            cluster_cidr6: Some("fd00:10:244::/48".parse().unwrap()),
            tunnel_ifindex: tunnel,
            subnets: vec![
                "172.16.0.0/24".parse().unwrap(),
                "fd00:16::/64".parse().unwrap(),
            ],
        }
    }

    fn node(name: &str, addrs: &[&str], v4: Option<&str>, v6: Option<&str>) -> ClusterNode {
        ClusterNode {
            name: name.into(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            pod_cidr: v4.map(|c| c.parse().unwrap()),
            pod_cidr6: v6.map(|c| c.parse().unwrap()),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn three() -> Vec<ClusterNode> {
        vec![
            node(
                "node-2",
                &["172.16.0.12", "fd00:16::12"],
                Some("10.244.2.0/24"),
                Some("fd00:10:244:2::/64"),
            ),
            node(
                "node-0",
                &["172.16.0.10"],
                Some("10.244.0.0/24"),
                Some("fd00:10:244::/64"),
            ),
            node(
                "node-1",
                &["172.16.0.11", "fd00:16::11"],
                Some("10.244.1.0/24"),
                Some("fd00:10:244:1::/64"),
            ),
        ]
    }

    #[test]
    fn tunnel_plan_peers_every_other_node_over_the_underlay_family() {
        let p = plan(&local(Some(9)), &three());
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(
            p.routed,
            vec!["node-1", "node-2"],
            "this node left out, name order"
        );
        assert_eq!(
            p.peers[0],
            TunnelPeerSpec {
                node_id: node_id("node-1"),
                name: "node-1".into(),
                underlay: ip("172.16.0.11"),
                addresses: vec![ip("172.16.0.11"), ip("fd00:16::11")],
                pod_cidr: Some("10.244.1.0/24".parse().unwrap()),
                pod_cidr6: Some("fd00:10:244:1::/64".parse().unwrap()),
            }
        );
        assert_eq!(p.peers[1].underlay, ip("172.16.0.12"));
        // One route per family of the cluster CIDR through the device, with the node's
        // own source inside its pod CIDR.
        assert_eq!(
            p.routes,
            vec![
                ClusterRoute::Device {
                    dst: "10.244.0.0/16".parse().unwrap(),
                    ifindex: 9,
                    src: Some(ip("10.244.0.1")),
                },
                ClusterRoute::Device {
                    dst: "fd00:10:244::/48".parse().unwrap(),
                    ifindex: 9,
                    src: Some(ip("fd00:10:244::1")),
                },
            ]
        );
        let want: BTreeSet<IpAddr> = [
            "172.16.0.11",
            "fd00:16::11",
            "10.244.1.1",
            "fd00:10:244:1::1",
            "172.16.0.12",
            "fd00:16::12",
            "10.244.2.1",
            "fd00:10:244:2::1",
        ]
        .into_iter()
        .map(ip)
        .collect();
        assert_eq!(p.remote_nodes, want);
        // No node: only the device routes.
        let empty = plan(&local(Some(9)), &[]);
        assert!(empty.peers.is_empty() && empty.remote_nodes.is_empty());
        assert_eq!(empty.routes, p.routes);
    }

    #[test]
    fn an_ipv6_underlay_tunnels_to_ipv6_addresses() {
        let mut me = local(Some(9));
        me.node_ips = vec![ip("fd00:16::10")];
        let mut nodes = three();
        nodes.push(node(
            "node-3",
            &["172.16.0.13"],
            Some("10.244.3.0/24"),
            None,
        ));
        let p = plan(&me, &nodes);
        assert_eq!(p.peers[0].underlay, ip("fd00:16::11"));
        assert_eq!(p.peers[1].underlay, ip("fd00:16::12"));
        assert_eq!(p.routed, vec!["node-1", "node-2"]);
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(
            p.warnings[0].contains("node node-3")
                && p.warnings[0].contains("no IPv6 underlay address (172.16.0.13)"),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn collisions_leave_the_later_node_out() {
        let nodes = vec![
            node("node-1", &["172.16.0.11"], Some("10.244.1.0/24"), None),
            // Overlaps node-1's.
            node("node-2", &["172.16.0.12"], Some("10.244.1.128/25"), None),
            // Overlaps this node's IPv6 CIDR.
            node("node-3", &["172.16.0.13"], None, Some("fd00:10:244::/60")),
            // Without CIDRs: nothing to route, no warning.
            node("node-4", &["172.16.0.14"], None, None),
        ];
        let p = plan(&local(Some(9)), &nodes);
        assert_eq!(p.routed, vec!["node-1"]);
        assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
        assert!(
            p.warnings[0].contains("node node-2")
                && p.warnings[0].contains("10.244.1.128/25 overlaps 10.244.1.0/24 of node node-1"),
            "{:?}",
            p.warnings
        );
        assert!(
            p.warnings[1].contains("fd00:10:244::/60 overlaps fd00:10:244::/64 of this node"),
            "{:?}",
            p.warnings
        );
        // One name twice (two keys can't, but the plan does not rely on it): one peer.
        let dup = vec![
            node("node-1", &["172.16.0.11"], Some("10.244.1.0/24"), None),
            node("node-1", &["172.16.0.99"], Some("10.244.9.0/24"), None),
        ];
        let p = plan(&local(Some(9)), &dup);
        assert_eq!(p.peers.len(), 1, "{p:?}");
    }

    #[test]
    fn node_id_collisions_leave_the_later_node_out() {
        // Two names of one id (found by search: the first 32-bit collision of
        // `node-<n>`).
        assert_eq!(node_id("node-31705"), node_id("node-40730"));
        let nodes = vec![
            node("node-40730", &["172.16.0.12"], Some("10.244.2.0/24"), None),
            node("node-31705", &["172.16.0.11"], Some("10.244.1.0/24"), None),
        ];
        let p = plan(&local(Some(9)), &nodes);
        assert_eq!(p.routed, vec!["node-31705"]);
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(
            p.warnings[0].contains("node node-40730")
                && p.warnings[0].contains("0x99bfcfcb")
                && p.warnings[0].contains("node-31705"),
            "{:?}",
            p.warnings
        );
        assert!(!p.remote_nodes.contains(&ip("172.16.0.12")));
    }

    #[test]
    fn a_node_routed_outside_the_cluster_cidr_gets_its_own_device_route() {
        let nodes = vec![node("node-1", &["172.16.0.11"], Some("10.9.1.0/24"), None)];
        let p = plan(&local(Some(9)), &nodes);
        assert!(p.routes.contains(&ClusterRoute::Device {
            dst: "10.9.1.0/24".parse().unwrap(),
            ifindex: 9,
            src: Some(ip("10.244.0.1")),
        }));
    }

    #[test]
    fn native_plan_routes_on_link_nodes_via_their_addresses() {
        let mut nodes = three();
        nodes.push(node(
            "node-3",
            &["192.0.2.13"],
            Some("10.244.3.0/24"),
            Some("fd00:10:244:3::/64"),
        ));
        // Only an IPv4 address on-link: its IPv6 CIDR is not routed (no route of one
        // family via the other's).
        nodes.push(node(
            "node-4",
            &["172.16.0.14", "2001:db8::14"],
            Some("10.244.4.0/24"),
            Some("fd00:10:244:4::/64"),
        ));
        let p = plan(&local(None), &nodes);
        assert!(p.peers.is_empty(), "no tunnel: {:?}", p.peers);
        let via = |dst: &str, gw: &str| ClusterRoute::Via {
            dst: dst.parse().unwrap(),
            gateway: ip(gw),
        };
        assert_eq!(
            p.routes,
            vec![
                via("10.244.1.0/24", "172.16.0.11"),
                via("10.244.2.0/24", "172.16.0.12"),
                via("10.244.4.0/24", "172.16.0.14"),
                via("fd00:10:244:1::/64", "fd00:16::11"),
                via("fd00:10:244:2::/64", "fd00:16::12"),
            ]
        );
        assert_eq!(p.routed, vec!["node-1", "node-2", "node-4"]);
        assert_eq!(
            p.warnings.len(),
            3,
            "one per CIDR of node-3, node-4's IPv6: {:?}",
            p.warnings
        );
        assert!(
            p.warnings[0].contains("node node-3")
                && p.warnings[0].contains(
                    "no IPv4 address in a subnet of this node (its addresses: 192.0.2.13)"
                ),
            "{:?}",
            p.warnings
        );
        assert!(
            p.warnings[2].contains("node node-4")
                && p.warnings[2].contains("no IPv6 address")
                && p.warnings[2].contains("fd00:10:244:4::/64"),
            "{:?}",
            p.warnings
        );
        assert!(p.remote_nodes.contains(&ip("172.16.0.14")));
        assert!(!p.remote_nodes.contains(&ip("192.0.2.13")));
    }

    #[test]
    fn pod_mtu_is_the_underlay_less_the_overhead_or_the_flag() {
        let tunnel = Routing::default();
        let mut w = Vec::new();
        let me = local(Some(9));
        assert_eq!(pod_mtu(&tunnel, &me, Some(1500), &mut w), Ok(Some(1450)));
        assert_eq!(pod_mtu(&tunnel, &me, Some(9000), &mut w), Ok(Some(8950)));
        let mut six = local(Some(9));
        six.node_ips = vec![ip("fd00:16::10")];
        assert_eq!(pod_mtu(&tunnel, &six, Some(1500), &mut w), Ok(Some(1430)));
        assert!(w.is_empty());
        let set = Routing::Tunnel {
            device: "vx".into(),
            port: 4789,
            mtu: Some(1400),
        };
        assert_eq!(pod_mtu(&set, &me, Some(9000), &mut w), Ok(Some(1400)));
        assert_eq!(
            pod_mtu(&Routing::Native, &me, Some(9000), &mut w),
            Ok(Some(9000))
        );
        assert_eq!(pod_mtu(&Routing::Native, &me, None, &mut w), Ok(None));
        // Unknown underlay: 1500 assumed, said once.
        assert_eq!(pod_mtu(&tunnel, &me, None, &mut w), Ok(Some(1450)));
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("172.16.0.10") && w[0].contains("1500"),
            "{w:?}"
        );
        // Too small for IPv6 pods.
        let err = pod_mtu(&tunnel, &me, Some(1300), &mut w).unwrap_err();
        assert!(
            err.contains("1300") && err.contains("1250") && err.contains("1280"),
            "{err}"
        );
        let mut v4 = local(Some(9));
        v4.pod_cidrs = "10.244.0.0/24".parse().unwrap();
        assert_eq!(pod_mtu(&tunnel, &v4, Some(1300), &mut w), Ok(Some(1250)));
    }
}
