//! The tunnel's maps as the agent writes them: `hypha_tunnel_cfg` (the node's VXLAN
//! device), `hypha_tunnel4`/`hypha_tunnel6` (other nodes' pod CIDRs → where to tunnel),
//! `hypha_nodes4`/`hypha_nodes6` (other nodes' underlay addresses → node id: the outer
//! sources accepted), `hypha_node_stats` (node id → per-CPU counters) and
//! `hypha_lb6_snat` (the node's IPv6 NodePort SNAT address, which needs the tunnel).
//!
//! [`TunnelMaps::set_peers`] makes them hold exactly the cluster's other nodes, in the
//! order that never leaves a kept node unrouted: every wanted entry is written first
//! (an LPM or hash update replaces a value in place), stale ones are removed after.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuHashMap, PerCpuValues};
use hypha_common::{NodeStats, PEER_F_IPV6, TunnelConfig, TunnelPeer, maps, nat};
use ipnet::{Ipv4Net, Ipv6Net};

use super::ebpf::{EbpfError, is_not_found, lock, map_err};
use super::{TunnelPeerSpec, TunnelSetup};

/// The tunnel's map handles, each behind its own lock, held only for syscalls on that
/// map (none of which waits). No two are held at once.
pub(super) struct TunnelMaps {
    pub(super) config: Mutex<Array<MapData, TunnelConfig>>,
    pub(super) tunnel4: Mutex<LpmTrie<MapData, u32, TunnelPeer>>,
    pub(super) tunnel6: Mutex<LpmTrie<MapData, [u8; 16], TunnelPeer>>,
    pub(super) nodes4: Mutex<HashMap<MapData, u32, u32>>,
    pub(super) nodes6: Mutex<HashMap<MapData, [u8; 16], u32>>,
    pub(super) stats: Mutex<PerCpuHashMap<MapData, u32, NodeStats>>,
    pub(super) snat6: Mutex<Array<MapData, [u8; 16]>>,
}

/// The `hypha_tunnel_cfg` value of `tunnel` (all zero: none).
pub(super) fn config(tunnel: Option<&TunnelSetup>) -> TunnelConfig {
    match tunnel {
        None => TunnelConfig::default(),
        Some(t) => TunnelConfig {
            ifindex: t.ifindex,
            flags: 0,
            local4: t.local4.map_or(0, |a| u32::from_ne_bytes(a.octets())),
            _pad: 0,
            local6: t.local6.map_or([0; 16], |a| a.octets()),
        },
    }
}

/// What the maps should hold for a set of peers.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Wanted {
    pub tunnel4: BTreeMap<Ipv4Net, TunnelPeer>,
    pub tunnel6: BTreeMap<Ipv6Net, TunnelPeer>,
    pub nodes4: BTreeMap<Ipv4Addr, u32>,
    pub nodes6: BTreeMap<Ipv6Addr, u32>,
    pub node_ids: BTreeSet<u32>,
}

/// The `hypha_tunnel4/6` value of `peer`: its id and its underlay address.
fn tunnel_peer(peer: &TunnelPeerSpec) -> TunnelPeer {
    match peer.underlay {
        IpAddr::V4(a) => TunnelPeer {
            node_id: peer.node_id,
            flags: 0,
            addr4: u32::from_ne_bytes(a.octets()),
            _pad: 0,
            addr6: [0; 16],
        },
        IpAddr::V6(a) => TunnelPeer {
            node_id: peer.node_id,
            flags: PEER_F_IPV6,
            addr4: 0,
            _pad: 0,
            addr6: a.octets(),
        },
    }
}

/// What `peers` want in the maps, and the conflicts found: a pod CIDR or an underlay
/// address claimed by two nodes stays with the first (each conflict is described).
pub(super) fn wanted(peers: &[TunnelPeerSpec]) -> (Wanted, Vec<String>) {
    let mut w = Wanted::default();
    let mut conflicts = Vec::new();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut claim = |what: String, node: &TunnelPeerSpec| -> bool {
        match owner.get(&what) {
            Some(first) if *first != node.name => {
                conflicts.push(format!(
                    "{what} is claimed by nodes {first} and {}; it stays with {first}",
                    node.name
                ));
                false
            }
            Some(_) => false,
            None => {
                owner.insert(what, node.name.clone());
                true
            }
        }
    };
    for peer in peers {
        w.node_ids.insert(peer.node_id);
        let value = tunnel_peer(peer);
        if let Some(cidr) = peer.pod_cidr
            && claim(format!("pod CIDR {}", cidr.trunc()), peer)
        {
            w.tunnel4.insert(cidr.trunc(), value);
        }
        if let Some(cidr) = peer.pod_cidr6
            && claim(format!("pod CIDR {}", cidr.trunc()), peer)
        {
            w.tunnel6.insert(cidr.trunc(), value);
        }
        let addresses: BTreeSet<IpAddr> = std::iter::once(peer.underlay)
            .chain(peer.addresses.iter().copied())
            .collect();
        for address in addresses {
            if !claim(format!("underlay address {address}"), peer) {
                continue;
            }
            match address {
                IpAddr::V4(a) => w.nodes4.insert(a, peer.node_id),
                IpAddr::V6(a) => w.nodes6.insert(a, peer.node_id),
            };
        }
    }
    (w, conflicts)
}

fn key4(net: &Ipv4Net) -> Key<u32> {
    Key::new(
        u32::from(net.prefix_len()),
        u32::from_ne_bytes(net.network().octets()),
    )
}

fn key6(net: &Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

fn net4(key: &Key<u32>) -> Ipv4Net {
    let prefix = key.prefix_len().min(32) as u8;
    Ipv4Net::new(Ipv4Addr::from(key.data().to_ne_bytes()), prefix)
        .expect("prefix length clamped to 32")
}

fn net6(key: &Key<[u8; 16]>) -> Ipv6Net {
    let prefix = key.prefix_len().min(128) as u8;
    Ipv6Net::new(Ipv6Addr::from(key.data()), prefix).expect("prefix length clamped to 128")
}

/// A removal that found nothing to remove is fine.
fn removed(result: Result<(), aya::maps::MapError>, map: &'static str) -> Option<EbpfError> {
    match result {
        Err(e) if !is_not_found(&e) => Some(map_err("delete from", map)(e)),
        _ => None,
    }
}

/// A per-CPU value of zeroes for every possible CPU.
pub(super) fn zeroed<T: aya::Pod + Default>(
    map: &'static str,
) -> Result<PerCpuValues<T>, EbpfError> {
    let nr_cpus = aya::util::nr_cpus().map_err(|(path, source)| EbpfError::Io {
        op: "read",
        path: path.into(),
        source,
    })?;
    let zeroes: Vec<T> = (0..nr_cpus).map(|_| T::default()).collect();
    PerCpuValues::try_from(zeroes).map_err(|source| EbpfError::Io {
        op: "size per-CPU values for",
        path: map.into(),
        source,
    })
}

impl TunnelMaps {
    /// Writes `hypha_tunnel_cfg`.
    pub(super) fn write_config(&self, value: TunnelConfig) -> Result<(), EbpfError> {
        lock(&self.config)
            .set(0, value, 0)
            .map_err(map_err("write", maps::TUNNEL_CONFIG))
    }

    /// Writes `hypha_lb6_snat` (all zero for `None`).
    pub(super) fn write_snat6(&self, addr: Option<Ipv6Addr>) -> Result<(), EbpfError> {
        lock(&self.snat6)
            .set(0, addr.map_or([0; 16], |a| a.octets()), 0)
            .map_err(map_err("write", nat::SNAT6))
    }

    /// What `hypha_lb6_snat` holds (`None`: all zero).
    #[cfg(test)]
    pub(super) fn read_snat6(&self) -> Result<Option<Ipv6Addr>, EbpfError> {
        let addr = lock(&self.snat6)
            .get(&0, 0)
            .map_err(map_err("read", nat::SNAT6))?;
        Ok((addr != [0; 16]).then(|| Ipv6Addr::from(addr)))
    }

    /// What `hypha_tunnel_cfg` holds.
    pub(super) fn read_config(&self) -> Result<TunnelConfig, EbpfError> {
        lock(&self.config)
            .get(&0, 0)
            .map_err(map_err("read", maps::TUNNEL_CONFIG))
    }

    /// Makes the peer maps hold exactly `peers` (see the module's documentation); a kept
    /// node's counters are kept, a new node's are created zeroed. Goes on past errors and
    /// returns them all (conflicting claims included).
    pub(super) fn set_peers(&self, peers: &[TunnelPeerSpec]) -> Vec<EbpfError> {
        let (w, conflicts) = wanted(peers);
        let mut errors: Vec<EbpfError> = conflicts
            .into_iter()
            .map(|problem| EbpfError::TunnelPeers { problem })
            .collect();

        // Counters first: a packet counted against a node finds its entry.
        {
            let mut stats = lock(&self.stats);
            let have: BTreeSet<u32> = stats.keys().filter_map(Result::ok).collect();
            for id in w.node_ids.difference(&have) {
                let result = zeroed::<NodeStats>(maps::NODE_STATS).and_then(|zero| {
                    stats
                        .insert(id, zero, 0)
                        .map_err(map_err("insert into", maps::NODE_STATS))
                });
                if let Err(e) = result {
                    errors.push(e);
                }
            }
        }
        {
            let mut m = lock(&self.nodes4);
            for (addr, id) in &w.nodes4 {
                if let Err(e) = m.insert(u32::from_ne_bytes(addr.octets()), id, 0) {
                    errors.push(map_err("insert into", maps::NODES4)(e));
                }
            }
        }
        {
            let mut m = lock(&self.nodes6);
            for (addr, id) in &w.nodes6 {
                if let Err(e) = m.insert(addr.octets(), id, 0) {
                    errors.push(map_err("insert into", maps::NODES6)(e));
                }
            }
        }
        {
            let mut m = lock(&self.tunnel4);
            for (net, peer) in &w.tunnel4 {
                if let Err(e) = m.insert(&key4(net), peer, 0) {
                    errors.push(map_err("insert into", maps::TUNNEL4)(e));
                }
            }
        }
        {
            let mut m = lock(&self.tunnel6);
            for (net, peer) in &w.tunnel6 {
                if let Err(e) = m.insert(&key6(net), peer, 0) {
                    errors.push(map_err("insert into", maps::TUNNEL6)(e));
                }
            }
        }

        // Then what no node wants any more: routes first, accepted sources, counters.
        {
            let mut m = lock(&self.tunnel4);
            let stale: Vec<Key<u32>> = m
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !w.tunnel4.contains_key(&net4(k)))
                .collect();
            errors.extend(
                stale
                    .iter()
                    .filter_map(|k| removed(m.remove(k), maps::TUNNEL4)),
            );
        }
        {
            let mut m = lock(&self.tunnel6);
            let stale: Vec<Key<[u8; 16]>> = m
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !w.tunnel6.contains_key(&net6(k)))
                .collect();
            errors.extend(
                stale
                    .iter()
                    .filter_map(|k| removed(m.remove(k), maps::TUNNEL6)),
            );
        }
        {
            let mut m = lock(&self.nodes4);
            let stale: Vec<u32> = m
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !w.nodes4.contains_key(&Ipv4Addr::from(k.to_ne_bytes())))
                .collect();
            errors.extend(
                stale
                    .iter()
                    .filter_map(|k| removed(m.remove(k), maps::NODES4)),
            );
        }
        {
            let mut m = lock(&self.nodes6);
            let stale: Vec<[u8; 16]> = m
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !w.nodes6.contains_key(&Ipv6Addr::from(*k)))
                .collect();
            errors.extend(
                stale
                    .iter()
                    .filter_map(|k| removed(m.remove(k), maps::NODES6)),
            );
        }
        {
            let mut m = lock(&self.stats);
            let stale: Vec<u32> = m
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !w.node_ids.contains(k))
                .collect();
            errors.extend(
                stale
                    .iter()
                    .filter_map(|k| removed(m.remove(k), maps::NODE_STATS)),
            );
        }
        errors
    }

    /// Every node's counters, summed over CPUs, by node id.
    pub(super) fn node_stats(&self) -> Result<Vec<(u32, NodeStats)>, EbpfError> {
        let stats = lock(&self.stats);
        let mut out = Vec::new();
        for item in stats.iter() {
            let (id, per_cpu) = item.map_err(map_err("read", maps::NODE_STATS))?;
            let mut sum = NodeStats::default();
            per_cpu.iter().for_each(|c| sum.add(c));
            out.push((id, sum));
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// What the peer maps hold, as [`Wanted`].
    #[cfg(test)]
    pub(super) fn installed(&self) -> Result<Wanted, EbpfError> {
        let mut w = Wanted::default();
        for item in lock(&self.tunnel4).iter() {
            let (k, v) = item.map_err(map_err("read", maps::TUNNEL4))?;
            w.tunnel4.insert(net4(&k), v);
        }
        for item in lock(&self.tunnel6).iter() {
            let (k, v) = item.map_err(map_err("read", maps::TUNNEL6))?;
            w.tunnel6.insert(net6(&k), v);
        }
        for item in lock(&self.nodes4).iter() {
            let (k, v) = item.map_err(map_err("read", maps::NODES4))?;
            w.nodes4.insert(Ipv4Addr::from(k.to_ne_bytes()), v);
        }
        for item in lock(&self.nodes6).iter() {
            let (k, v) = item.map_err(map_err("read", maps::NODES6))?;
            w.nodes6.insert(Ipv6Addr::from(k), v);
        }
        for item in lock(&self.stats).keys() {
            w.node_ids
                .insert(item.map_err(map_err("read", maps::NODE_STATS))?);
        }
        Ok(w)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn peer(name: &str, id: u32, underlay: &str, v4: &str, v6: &str) -> TunnelPeerSpec {
        TunnelPeerSpec {
            node_id: id,
            name: name.into(),
            underlay: underlay.parse().unwrap(),
            addresses: vec![underlay.parse().unwrap()],
            pod_cidr: (!v4.is_empty()).then(|| v4.parse().unwrap()),
            pod_cidr6: (!v6.is_empty()).then(|| v6.parse().unwrap()),
        }
    }

    #[test]
    fn peers_become_routes_sources_and_counters() {
        let mut b = peer(
            "b",
            7,
            "192.168.50.3",
            "10.244.2.0/24",
            "fd00:10:244:2::/64",
        );
        b.addresses.push("fd00:50::3".parse().unwrap());
        let c = peer("c", 9, "fd00:50::4", "", "fd00:10:244:3::/64");
        let (w, conflicts) = wanted(&[b, c]);
        assert!(conflicts.is_empty(), "{conflicts:?}");
        let to_b = TunnelPeer {
            node_id: 7,
            flags: 0,
            addr4: u32::from_ne_bytes([192, 168, 50, 3]),
            _pad: 0,
            addr6: [0; 16],
        };
        let to_c = TunnelPeer {
            node_id: 9,
            flags: PEER_F_IPV6,
            addr4: 0,
            _pad: 0,
            addr6: "fd00:50::4".parse::<Ipv6Addr>().unwrap().octets(),
        };
        assert_eq!(
            w.tunnel4,
            BTreeMap::from([("10.244.2.0/24".parse().unwrap(), to_b)])
        );
        assert_eq!(
            w.tunnel6,
            BTreeMap::from([
                ("fd00:10:244:2::/64".parse().unwrap(), to_b),
                ("fd00:10:244:3::/64".parse().unwrap(), to_c),
            ])
        );
        assert_eq!(
            w.nodes4,
            BTreeMap::from([("192.168.50.3".parse().unwrap(), 7)])
        );
        assert_eq!(
            w.nodes6,
            BTreeMap::from([
                ("fd00:50::3".parse().unwrap(), 7),
                ("fd00:50::4".parse().unwrap(), 9),
            ])
        );
        assert_eq!(w.node_ids, BTreeSet::from([7, 9]));
    }

    #[test]
    fn a_cidr_or_address_claimed_twice_stays_with_the_first_and_is_reported() {
        let b = peer("b", 7, "192.168.50.3", "10.244.2.0/24", "");
        let c = peer("c", 9, "192.168.50.3", "10.244.2.0/24", "");
        let (w, conflicts) = wanted(&[b, c]);
        assert_eq!(
            conflicts,
            vec![
                "pod CIDR 10.244.2.0/24 is claimed by nodes b and c; it stays with b".to_owned(),
                "underlay address 192.168.50.3 is claimed by nodes b and c; it stays with b"
                    .to_owned(),
            ]
        );
        assert_eq!(w.tunnel4.values().next().map(|p| p.node_id), Some(7));
        assert_eq!(w.nodes4.values().copied().collect::<Vec<_>>(), vec![7]);
        // The node is still counted: it may own other things.
        assert_eq!(w.node_ids, BTreeSet::from([7, 9]));
    }

    #[test]
    fn the_config_holds_the_device_and_the_local_addresses() {
        assert_eq!(config(None), TunnelConfig::default());
        let c = config(Some(&TunnelSetup {
            ifindex: 12,
            ifname: "hypha_vxlan".into(),
            local4: Some("192.168.50.2".parse().unwrap()),
            local6: None,
            snat6: None,
        }));
        assert_eq!(c.ifindex, 12);
        assert_eq!(c.local4.to_ne_bytes(), [192, 168, 50, 2]);
        assert_eq!(c.local6, [0; 16]);
    }
}
