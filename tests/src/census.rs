//! Everything a node keeps about its pods, read from every place it is kept (the agent's
//! endpoints and IPAM, the host-side veths in the node's namespace, the pinned
//! `hypha_endpoints4` map), and the check that they all agree exactly with the pods a
//! test expects: for the concurrency and crash tests, where a lost or duplicated update
//! in any one of them is the bug.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use aya::maps::{HashMap, Map, MapData};
use hypha_api::Endpoint;
use hypha_cni::naming::HOST_IFNAME_PREFIX;
use hypha_common::{EndpointInfo, EndpointKey4, maps};
use hypha_netlink::Netlink;

use crate::node::Node;

/// The node's pods as each place sees them.
#[derive(Debug)]
pub struct Census {
    pub endpoints: Vec<Endpoint>,
    /// `status.endpoints` and `status.ipam.allocated`.
    pub status_endpoints: usize,
    pub ipam_allocated: u32,
    /// Host-side veths in the node's namespace named like Hypha's (`hyp…`): name → ifindex.
    pub host_veths: BTreeMap<String, u32>,
    /// `hypha_endpoints4`: address → (host ifindex, endpoint id).
    pub map: BTreeMap<Ipv4Addr, (u32, u32)>,
}

impl Census {
    pub fn take(node: &Node) -> Self {
        let status = node.status();
        let mut nl = Netlink::in_netns(&node.netns.path())
            .unwrap_or_else(|e| panic!("netlink in {}: {e}", node.netns.name()));
        let host_veths = nl
            .links()
            .unwrap_or_else(|e| panic!("list the links of {}: {e}", node.netns.name()))
            .into_iter()
            .filter(|l| l.kind.as_deref() == Some("veth") && l.name.starts_with(HOST_IFNAME_PREFIX))
            .map(|l| (l.name, l.index))
            .collect();
        Self {
            endpoints: node.endpoints(),
            status_endpoints: status.endpoints,
            ipam_allocated: status.ipam.allocated,
            host_veths,
            map: endpoints_map(node),
        }
    }
}

/// The pinned `hypha_endpoints4` of `node`, read through aya.
pub fn endpoints_map(node: &Node) -> BTreeMap<Ipv4Addr, (u32, u32)> {
    let path = node.pin_dir.join(maps::ENDPOINTS4);
    let data = MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("open the pinned {}: {e}", path.display()));
    let map: HashMap<MapData, EndpointKey4, EndpointInfo> =
        HashMap::try_from(Map::HashMap(data)).expect("hypha_endpoints4 is a hash map");
    map.iter()
        .map(|entry| {
            let (k, v) = entry.expect("iterate hypha_endpoints4");
            (
                Ipv4Addr::from(k.addr.to_ne_bytes()),
                (v.ifindex, v.endpoint_id),
            )
        })
        .collect()
}

/// Asserts that `node` holds exactly the pods `expected` (container id → the address its
/// ADD answered) and nothing else, in every place: one endpoint each with that address,
/// all addresses distinct and in the pod CIDR, the IPAM's count, one host veth each
/// (and no other), one map entry each pointing at that veth (and no other).
pub fn assert_node_holds(node: &Node, expected: &BTreeMap<String, Ipv4Addr>) {
    let c = Census::take(node);
    let context = || format!("{c:#?}\nagent log:\n{}", tail(&node.log(), 40));
    let n = expected.len();

    let ids: BTreeSet<&str> = c
        .endpoints
        .iter()
        .map(|e| e.container_id.as_str())
        .collect();
    let want: BTreeSet<&str> = expected.keys().map(String::as_str).collect();
    assert_eq!(
        c.endpoints.len(),
        ids.len(),
        "a container has two endpoints: {}",
        context()
    );
    assert_eq!(ids, want, "the agent's endpoints are not the pods expected");
    for e in &c.endpoints {
        assert_eq!(
            e.address,
            Some(expected[&e.container_id]),
            "endpoint {} has another address than its ADD answered: {}",
            e.container_id,
            context()
        );
    }

    let (net, len) = parse_cidr(&node.pod_cidr);
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    let addresses: BTreeSet<Ipv4Addr> = c.endpoints.iter().filter_map(|e| e.address).collect();
    assert_eq!(
        addresses.len(),
        n,
        "an address is held twice: {}",
        context()
    );
    for a in &addresses {
        assert_eq!(
            u32::from(*a) & mask,
            u32::from(net),
            "{a} is outside the pod CIDR {}",
            node.pod_cidr
        );
    }

    assert_eq!(c.status_endpoints, n, "status.endpoints: {}", context());
    assert_eq!(
        c.ipam_allocated,
        u32::try_from(n).expect("few pods"),
        "status.ipam.allocated: {}",
        context()
    );

    let veths: BTreeMap<String, u32> = c
        .endpoints
        .iter()
        .map(|e| (e.host_ifname.clone(), e.host_ifindex))
        .collect();
    assert_eq!(
        c.host_veths,
        veths,
        "the host veths are not the endpoints' host_ifname/host_ifindex: {}",
        context()
    );

    let entries: BTreeMap<Ipv4Addr, (u32, u32)> = c
        .endpoints
        .iter()
        .filter_map(|e| Some((e.address?, (e.host_ifindex, e.id))))
        .collect();
    assert_eq!(
        c.map,
        entries,
        "hypha_endpoints4 does not hold exactly the endpoints (address → ifindex, id): {}",
        context()
    );
}

/// Every pod pings the next one (the last the first): the datapath connects them all.
/// Pings run a few at a time, from inside the pods' namespaces only.
pub fn assert_pods_reach_each_other(node: &Node, pods: &[(&crate::netns::NamedNetns, Ipv4Addr)]) {
    if pods.len() < 2 {
        return;
    }
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .chunks(8)
            .enumerate()
            .map(|(chunk, group)| {
                s.spawn(move || {
                    let mut failed = Vec::new();
                    for (k, (ns, from)) in group.iter().enumerate() {
                        let to = pods[(chunk * 8 + k + 1) % pods.len()].1;
                        let out = ns.try_exec(&["ping", "-c", "1", "-W", "2", &to.to_string()]);
                        if !out.status.success() {
                            failed.push(format!("{from} → {to}"));
                        }
                    }
                    failed
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("ping thread"))
            .collect()
    });
    assert!(
        failures.is_empty(),
        "pods cannot reach each other: {failures:?}\nagent log:\n{}",
        tail(&node.log(), 40)
    );
}

fn parse_cidr(cidr: &str) -> (Ipv4Addr, u8) {
    let (a, l) = cidr
        .split_once('/')
        .unwrap_or_else(|| panic!("{cidr} is no CIDR"));
    (
        a.parse().unwrap_or_else(|e| panic!("{cidr}: {e}")),
        l.parse().unwrap_or_else(|e| panic!("{cidr}: {e}")),
    )
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
