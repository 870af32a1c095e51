//! The endpoint maps: `hypha_ifaces` (host ifindex → who is behind the veth),
//! `hypha_endpoints4` and `hypha_endpoints6` (pod address → where it lives), written
//! together under one lock so that an endpoint's entries always carry the same flags.
//!
//! An endpoint has one `hypha_ifaces` entry, and one entry in the endpoints map of each
//! family it has an address of (none in the other). Their flags are the control plane's
//! (policy and bandwidth bits) plus the family bits ([`ENDPOINT_F_IPV4`],
//! [`ENDPOINT_F_IPV6`]), which are composed here from the record's addresses and
//! nowhere else: the control plane's masks never touch them.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap, MapData};
use hypha_common::{
    ENDPOINT_F_IPV4, ENDPOINT_F_IPV6, EndpointIface, EndpointInfo, EndpointKey4, EndpointKey6, maps,
};

use super::ebpf::{EbpfError, is_not_found, map_err};
use crate::state::EndpointRecord;

/// The family bits of the flags.
pub(super) const FAMILY_MASK: u32 = ENDPOINT_F_IPV4 | ENDPOINT_F_IPV6;

/// The family bits an endpoint's entries carry: one per address it has.
pub(super) fn family_flags(ep: &EndpointRecord) -> u32 {
    let mut flags = 0;
    if ep.address.is_some() {
        flags |= ENDPOINT_F_IPV4;
    }
    if ep.address6.is_some() {
        flags |= ENDPOINT_F_IPV6;
    }
    flags
}

/// The flags of an endpoint's entries: `flags` (the control plane's bits) with the family
/// bits replaced by the record's.
pub(super) fn with_family(ep: &EndpointRecord, flags: u32) -> u32 {
    (flags & !FAMILY_MASK) | family_flags(ep)
}

/// `old` with the bits of `mask` set to those of `flags`; the family bits always the
/// record's, whatever the mask says.
pub(super) fn update_flags(ep: &EndpointRecord, old: u32, mask: u32, flags: u32) -> u32 {
    with_family(ep, (old & !mask) | (flags & mask))
}

fn key4(addr: Ipv4Addr) -> EndpointKey4 {
    EndpointKey4::from_octets(addr.octets())
}

fn key6(addr: Ipv6Addr) -> EndpointKey6 {
    EndpointKey6 {
        addr: addr.octets(),
    }
}

/// The `hypha_endpoints4`/`hypha_endpoints6` value of the endpoint, with `flags` as they
/// are (family bits included).
pub(super) fn info_of(ep: &EndpointRecord, flags: u32) -> EndpointInfo {
    EndpointInfo {
        ifindex: ep.host_ifindex,
        endpoint_id: ep.id,
        pod_mac: ep.pod_mac.0,
        host_mac: ep.host_mac.0,
        flags,
    }
}

/// The `hypha_ifaces` value of the endpoint, with `flags` as they are.
pub(super) fn iface_of(ep: &EndpointRecord, flags: u32) -> EndpointIface {
    EndpointIface {
        endpoint_id: ep.id,
        flags,
        pod_mac: ep.pod_mac.0,
        host_mac: ep.host_mac.0,
        addr4: ep.address.map_or(0, |a| u32::from_ne_bytes(a.octets())),
        addr6: ep.address6.map_or([0; 16], |a| a.octets()),
    }
}

/// What differs between the `hypha_endpoints4`/`6` entry `found` and the endpoint, or
/// `None` when they agree (the control plane's flag bits are not compared: they change
/// apart from the record; the family bits are).
pub(super) fn info_problem(
    map: &str,
    addr: IpAddr,
    ep: &EndpointRecord,
    found: &EndpointInfo,
) -> Option<String> {
    let mut diffs = Vec::new();
    if found.ifindex != ep.host_ifindex {
        diffs.push(format!(
            "ifindex {} (want {})",
            found.ifindex, ep.host_ifindex
        ));
    }
    if found.endpoint_id != ep.id {
        diffs.push(format!("endpoint {} (want {})", found.endpoint_id, ep.id));
    }
    diffs.extend(mac_problems(found.pod_mac, found.host_mac, ep));
    diffs.extend(family_problem(found.flags, ep));
    (!diffs.is_empty()).then(|| format!("{map} entry for {addr} differs: {}", diffs.join(", ")))
}

/// As [`info_problem`], for the `hypha_ifaces` entry of the endpoint's host ifindex.
pub(super) fn iface_problem(ep: &EndpointRecord, found: &EndpointIface) -> Option<String> {
    let want = iface_of(ep, 0);
    let mut diffs = Vec::new();
    if found.endpoint_id != ep.id {
        diffs.push(format!("endpoint {} (want {})", found.endpoint_id, ep.id));
    }
    diffs.extend(mac_problems(found.pod_mac, found.host_mac, ep));
    if found.addr4 != want.addr4 {
        diffs.push(format!(
            "IPv4 address {} (want {})",
            Ipv4Addr::from(found.addr4.to_ne_bytes()),
            Ipv4Addr::from(want.addr4.to_ne_bytes())
        ));
    }
    if found.addr6 != want.addr6 {
        diffs.push(format!(
            "IPv6 address {} (want {})",
            Ipv6Addr::from(found.addr6),
            Ipv6Addr::from(want.addr6)
        ));
    }
    diffs.extend(family_problem(found.flags, ep));
    (!diffs.is_empty()).then(|| {
        format!(
            "{} entry for ifindex {} ({}) differs: {}",
            maps::IFACES,
            ep.host_ifindex,
            ep.host_ifname,
            diffs.join(", ")
        )
    })
}

fn mac_problems(pod_mac: [u8; 6], host_mac: [u8; 6], ep: &EndpointRecord) -> Vec<String> {
    let mut diffs = Vec::new();
    if pod_mac != ep.pod_mac.0 {
        diffs.push(format!(
            "pod MAC {} (want {})",
            hypha_api::MacAddr(pod_mac),
            ep.pod_mac
        ));
    }
    if host_mac != ep.host_mac.0 {
        diffs.push(format!(
            "host MAC {} (want {})",
            hypha_api::MacAddr(host_mac),
            ep.host_mac
        ));
    }
    diffs
}

fn family_problem(flags: u32, ep: &EndpointRecord) -> Option<String> {
    let (found, want) = (flags & FAMILY_MASK, family_flags(ep));
    (found != want).then(|| {
        format!(
            "families {} (want {})",
            family_names(found),
            family_names(want)
        )
    })
}

fn family_names(flags: u32) -> &'static str {
    match (flags & ENDPOINT_F_IPV4 != 0, flags & ENDPOINT_F_IPV6 != 0) {
        (true, true) => "IPv4 and IPv6",
        (true, false) => "IPv4",
        (false, true) => "IPv6",
        (false, false) => "none",
    }
}

/// The three endpoint maps, kept behind one lock (see [`super::ebpf::Maps`]): a
/// read-modify-write of an endpoint's flags covers all of its entries.
pub(super) struct EndpointMaps {
    pub(super) v4: HashMap<MapData, EndpointKey4, EndpointInfo>,
    pub(super) v6: HashMap<MapData, EndpointKey6, EndpointInfo>,
    pub(super) ifaces: HashMap<MapData, u32, EndpointIface>,
}

impl EndpointMaps {
    /// Writes every entry of the endpoint with `flags` (the control plane's bits; the
    /// family bits are the record's). `hypha_ifaces` first: it is what lets the pod send.
    pub(super) fn write(&mut self, ep: &EndpointRecord, flags: u32) -> Result<(), EbpfError> {
        let flags = with_family(ep, flags);
        self.ifaces
            .insert(ep.host_ifindex, iface_of(ep, flags), 0)
            .map_err(map_err("insert into", maps::IFACES))?;
        let info = info_of(ep, flags);
        if let Some(a) = ep.address {
            self.v4
                .insert(key4(a), info, 0)
                .map_err(map_err("insert into", maps::ENDPOINTS4))?;
        }
        if let Some(a) = ep.address6 {
            self.v6
                .insert(key6(a), info, 0)
                .map_err(map_err("insert into", maps::ENDPOINTS6))?;
        }
        Ok(())
    }

    /// Sets the bits of `mask` to those of `flags` in every entry of the endpoint,
    /// starting from what its `hypha_ifaces` entry holds.
    pub(super) fn set_flags(
        &mut self,
        ep: &EndpointRecord,
        mask: u32,
        flags: u32,
    ) -> Result<(), EbpfError> {
        let mut iface = self
            .ifaces
            .get(&ep.host_ifindex, 0)
            .map_err(map_err("read", maps::IFACES))?;
        let new = update_flags(ep, iface.flags, mask, flags);
        iface.flags = new;
        self.ifaces
            .insert(ep.host_ifindex, iface, 0)
            .map_err(map_err("update", maps::IFACES))?;
        if let Some(a) = ep.address {
            let mut info = self
                .v4
                .get(&key4(a), 0)
                .map_err(map_err("read", maps::ENDPOINTS4))?;
            info.flags = new;
            self.v4
                .insert(key4(a), info, 0)
                .map_err(map_err("update", maps::ENDPOINTS4))?;
        }
        if let Some(a) = ep.address6 {
            let mut info = self
                .v6
                .get(&key6(a), 0)
                .map_err(map_err("read", maps::ENDPOINTS6))?;
            info.flags = new;
            self.v6
                .insert(key6(a), info, 0)
                .map_err(map_err("update", maps::ENDPOINTS6))?;
        }
        Ok(())
    }

    /// Sets the bits of `mask` to those `wanted` gives each endpoint id, in every entry
    /// of the endpoints there (an endpoint not attached yet has none: it gets its flags
    /// when it is). One pass over each map.
    pub(super) fn set_flags_by_id(
        &mut self,
        mask: u32,
        wanted: &BTreeMap<u32, u32>,
    ) -> Result<(), EbpfError> {
        let mask = mask & !FAMILY_MASK;
        let new = |old: u32, id: u32| wanted.get(&id).map(|f| (old & !mask) | (f & mask));
        let ifaces: Vec<(u32, EndpointIface)> = self.ifaces.iter().filter_map(Result::ok).collect();
        for (key, mut v) in ifaces {
            if let Some(flags) = new(v.flags, v.endpoint_id)
                && flags != v.flags
            {
                v.flags = flags;
                self.ifaces
                    .insert(key, v, 0)
                    .map_err(map_err("update", maps::IFACES))?;
            }
        }
        let v4: Vec<(EndpointKey4, EndpointInfo)> = self.v4.iter().filter_map(Result::ok).collect();
        for (key, mut v) in v4 {
            if let Some(flags) = new(v.flags, v.endpoint_id)
                && flags != v.flags
            {
                v.flags = flags;
                self.v4
                    .insert(key, v, 0)
                    .map_err(map_err("update", maps::ENDPOINTS4))?;
            }
        }
        let v6: Vec<(EndpointKey6, EndpointInfo)> = self.v6.iter().filter_map(Result::ok).collect();
        for (key, mut v) in v6 {
            if let Some(flags) = new(v.flags, v.endpoint_id)
                && flags != v.flags
            {
                v.flags = flags;
                self.v6
                    .insert(key, v, 0)
                    .map_err(map_err("update", maps::ENDPOINTS6))?;
            }
        }
        Ok(())
    }

    /// Removes the endpoint's entries, those that are still its own (another endpoint
    /// may have its address or its ifindex by now); goes on past errors.
    pub(super) fn remove(&mut self, ep: &EndpointRecord) -> Vec<EbpfError> {
        let mut errors = Vec::new();
        if let Some(a) = ep.address {
            errors.extend(remove_if(&mut self.v4, &key4(a), maps::ENDPOINTS4, |i| {
                i.ifindex == ep.host_ifindex
            }));
        }
        if let Some(a) = ep.address6 {
            errors.extend(remove_if(&mut self.v6, &key6(a), maps::ENDPOINTS6, |i| {
                i.ifindex == ep.host_ifindex
            }));
        }
        errors.extend(remove_if(
            &mut self.ifaces,
            &ep.host_ifindex,
            maps::IFACES,
            |i| i.endpoint_id == ep.id,
        ));
        errors
    }

    /// What of the endpoint's entries is missing or different.
    pub(super) fn check(&self, ep: &EndpointRecord) -> Vec<String> {
        let mut problems = Vec::new();
        match self.ifaces.get(&ep.host_ifindex, 0) {
            Ok(found) => problems.extend(iface_problem(ep, &found)),
            Err(e) if is_not_found(&e) => problems.push(format!(
                "{} has no entry for ifindex {} ({})",
                maps::IFACES,
                ep.host_ifindex,
                ep.host_ifname
            )),
            Err(e) => problems.push(format!("cannot read {}: {e}", maps::IFACES)),
        }
        if let Some(a) = ep.address {
            problems.extend(check_info(
                self.v4.get(&key4(a), 0),
                maps::ENDPOINTS4,
                a.into(),
                ep,
            ));
        }
        if let Some(a) = ep.address6 {
            problems.extend(check_info(
                self.v6.get(&key6(a), 0),
                maps::ENDPOINTS6,
                a.into(),
                ep,
            ));
        }
        problems
    }

    /// Removes the entries of endpoints none of `keep` is: addresses and host ifindexes
    /// no kept endpoint has.
    pub(super) fn sweep(&mut self, keep: &[EndpointRecord]) -> Vec<EbpfError> {
        let v4: HashSet<EndpointKey4> = keep.iter().filter_map(|e| e.address).map(key4).collect();
        let v6: HashSet<EndpointKey6> = keep.iter().filter_map(|e| e.address6).map(key6).collect();
        let ifindexes: HashSet<u32> = keep.iter().map(|e| e.host_ifindex).collect();
        let mut errors = sweep_map(&mut self.v4, maps::ENDPOINTS4, |k| v4.contains(k));
        errors.extend(sweep_map(&mut self.v6, maps::ENDPOINTS6, |k| {
            v6.contains(k)
        }));
        errors.extend(sweep_map(&mut self.ifaces, maps::IFACES, |k| {
            ifindexes.contains(k)
        }));
        errors
    }
}

fn check_info(
    found: Result<EndpointInfo, aya::maps::MapError>,
    map: &'static str,
    addr: IpAddr,
    ep: &EndpointRecord,
) -> Option<String> {
    match found {
        Ok(info) => info_problem(map, addr, ep, &info),
        Err(e) if is_not_found(&e) => Some(format!("{map} has no entry for {addr}")),
        Err(e) => Some(format!("cannot read {map}: {e}")),
    }
}

fn remove_if<K: aya::Pod, V: aya::Pod>(
    m: &mut HashMap<MapData, K, V>,
    key: &K,
    map: &'static str,
    ours: impl Fn(&V) -> bool,
) -> Option<EbpfError> {
    match m.get(key, 0) {
        Ok(v) if ours(&v) => match m.remove(key) {
            Err(e) if !is_not_found(&e) => Some(map_err("delete from", map)(e)),
            _ => None,
        },
        Ok(_) => None,
        Err(e) if is_not_found(&e) => None,
        Err(e) => Some(map_err("read", map)(e)),
    }
}

fn sweep_map<K: aya::Pod, V: aya::Pod>(
    m: &mut HashMap<MapData, K, V>,
    map: &'static str,
    kept: impl Fn(&K) -> bool,
) -> Vec<EbpfError> {
    let stale: Vec<K> = m
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !kept(k))
        .collect();
    stale
        .iter()
        .filter_map(|k| match m.remove(k) {
            Err(e) if !is_not_found(&e) => Some(map_err("delete from", map)(e)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use hypha_api::MacAddr;
    use hypha_common::{ENDPOINT_F_INGRESS_LIMIT, ENDPOINT_F_INGRESS_POLICY};

    use super::*;

    fn record(v4: Option<&str>, v6: Option<&str>) -> EndpointRecord {
        EndpointRecord {
            id: 7,
            container_id: "c".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            host_ifname: "hyp0".into(),
            host_ifindex: 42,
            address: v4.map(|a| a.parse().unwrap()),
            address6: v6.map(|a| a.parse().unwrap()),
            pod_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            host_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            labels: Default::default(),
            external_ipam: false,
            bandwidth: None,
            debug: false,
            ports: Vec::new(),
        }
    }

    #[test]
    fn family_bits_follow_the_record_whatever_the_control_plane_passes() {
        let dual = record(Some("10.0.0.2"), Some("fd00::2"));
        let v4 = record(Some("10.0.0.2"), None);
        let v6 = record(None, Some("fd00::2"));
        assert_eq!(family_flags(&dual), ENDPOINT_F_IPV4 | ENDPOINT_F_IPV6);
        assert_eq!(family_flags(&v4), ENDPOINT_F_IPV4);
        assert_eq!(family_flags(&v6), ENDPOINT_F_IPV6);
        assert_eq!(
            with_family(&v6, ENDPOINT_F_INGRESS_POLICY | ENDPOINT_F_IPV4),
            ENDPOINT_F_INGRESS_POLICY | ENDPOINT_F_IPV6,
            "an IPv4 bit from outside does not give an IPv6-only endpoint IPv4"
        );
        // A mask that covers everything still leaves the family bits as they are.
        let old = ENDPOINT_F_IPV4 | ENDPOINT_F_INGRESS_LIMIT;
        assert_eq!(update_flags(&v4, old, u32::MAX, 0), ENDPOINT_F_IPV4);
        assert_eq!(
            update_flags(
                &v4,
                old,
                ENDPOINT_F_INGRESS_POLICY,
                ENDPOINT_F_INGRESS_POLICY
            ),
            old | ENDPOINT_F_INGRESS_POLICY
        );
    }

    #[test]
    fn the_iface_entry_carries_both_addresses_or_zeroes() {
        let dual = record(Some("10.0.0.2"), Some("fd00::2"));
        let i = iface_of(&dual, ENDPOINT_F_IPV4 | ENDPOINT_F_IPV6);
        assert_eq!(i.addr4.to_ne_bytes(), [10, 0, 0, 2]);
        assert_eq!(i.addr6, "fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(
            (i.endpoint_id, i.pod_mac, i.host_mac),
            (7, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        );
        let v6 = iface_of(&record(None, Some("fd00::2")), ENDPOINT_F_IPV6);
        assert_eq!(v6.addr4, 0);
        let v4 = iface_of(&record(Some("10.0.0.2"), None), ENDPOINT_F_IPV4);
        assert_eq!(v4.addr6, [0; 16]);
    }

    #[test]
    fn check_names_the_map_the_address_and_what_differs() {
        let ep = record(Some("10.0.0.2"), Some("fd00::2"));
        let flags = family_flags(&ep) | ENDPOINT_F_INGRESS_POLICY;
        assert_eq!(iface_problem(&ep, &iface_of(&ep, flags)), None);
        let addr: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(
            info_problem(maps::ENDPOINTS6, addr, &ep, &info_of(&ep, flags)),
            None
        );

        let mut other = iface_of(&ep, ENDPOINT_F_IPV4);
        other.addr6 = [0; 16];
        assert_eq!(
            iface_problem(&ep, &other).as_deref(),
            Some(
                "hypha_ifaces entry for ifindex 42 (hyp0) differs: IPv6 address :: (want fd00::2), families IPv4 (want IPv4 and IPv6)"
            )
        );
        let mut info = info_of(&ep, flags);
        info.ifindex = 3;
        info.pod_mac = [2, 0, 0, 0, 0, 9];
        assert_eq!(
            info_problem(maps::ENDPOINTS6, addr, &ep, &info).as_deref(),
            Some(
                "hypha_endpoints6 entry for fd00::2 differs: ifindex 3 (want 42), pod MAC 02:00:00:00:00:09 (want 02:00:00:00:00:01)"
            )
        );
    }
}
