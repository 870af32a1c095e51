//! Privileged (root; skipped otherwise, with a message): what the datapath writes for
//! endpoints of each family. A dual-stack endpoint has its `hypha_ifaces` entry and one
//! entry in each endpoints map, all with the same flags (the family bits included, and
//! kept through `set_flags` and policy diffs); an IPv6-only one has no
//! `hypha_endpoints4` entry; `check` names a missing or different entry by map and
//! address; `detach` removes every entry and the endpoint's IPv6 flows; `sweep` removes
//! what no endpoint owns; and a load unpins the maps of retired layouts.
//!
//! Each test works in a network namespace and a pin directory of its own (see
//! [`Fixture`]), removed on drop.

use std::net::Ipv6Addr;

use aya::maps::IterableMap as _;
use hypha_common::{
    CtEntry, CtKey4, CtKey6, ENDPOINT_F_INGRESS_LIMIT, ENDPOINT_F_INGRESS_POLICY, ENDPOINT_F_IPV4,
    ENDPOINT_F_IPV6, EndpointIface, EndpointKey4, EndpointKey6, maps,
};

use super::concurrency_tests::{Fixture, privileged};
use super::{EbpfDatapath, lock};
use crate::config::AttachMode;
use crate::datapath::Datapath;
use crate::policy::PolicyDiff;
use crate::state::EndpointRecord;

macro_rules! require_root {
    () => {
        if !privileged() {
            eprintln!("skipped: {}:{} needs root", file!(), line!());
            return;
        }
    };
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("an IPv6 address")
}

/// Two endpoints: a dual-stack one and an IPv6-only one.
fn dual_and_v6_only(fx: &Fixture) -> (EndpointRecord, EndpointRecord) {
    let mut eps = fx.endpoints(2);
    let mut v6_only = eps.pop().expect("two endpoints");
    let mut dual = eps.pop().expect("two endpoints");
    dual.address6 = Some(v6("fd00:99::10"));
    v6_only.address = None;
    v6_only.address6 = Some(v6("fd00:99::11"));
    (dual, v6_only)
}

fn key6(a: Ipv6Addr) -> EndpointKey6 {
    EndpointKey6 { addr: a.octets() }
}

/// The flags of each of the endpoint's entries: `hypha_ifaces`, then
/// `hypha_endpoints4` and `hypha_endpoints6` (`None` for a family it does not have).
fn all_flags(dp: &EbpfDatapath, ep: &EndpointRecord) -> (u32, Option<u32>, Option<u32>) {
    let m = lock(&dp.maps.endpoints);
    let iface = m
        .ifaces
        .get(&ep.host_ifindex, 0)
        .expect("hypha_ifaces entry");
    let v4 = ep.address.map(|a| {
        m.v4.get(&EndpointKey4::from_octets(a.octets()), 0)
            .expect("hypha_endpoints4 entry")
            .flags
    });
    let v6 = ep
        .address6
        .map(|a| m.v6.get(&key6(a), 0).expect("hypha_endpoints6 entry").flags);
    (iface.flags, v4, v6)
}

#[test]
fn each_family_of_an_endpoint_has_its_entry_and_all_entries_share_the_flags() {
    require_root!();
    let fx = Fixture::new("families");
    let (dual, v6_only) = dual_and_v6_only(&fx);
    let dp = fx.load(AttachMode::Tc);
    fx.in_netns(|| {
        dp.attach(&dual, ENDPOINT_F_INGRESS_POLICY)
            .expect("attach the dual-stack endpoint");
        dp.attach(&v6_only, 0)
            .expect("attach the IPv6-only endpoint");
    });

    // Who is behind each veth, with its addresses.
    let both = ENDPOINT_F_IPV4 | ENDPOINT_F_IPV6;
    let iface = lock(&dp.maps.endpoints)
        .ifaces
        .get(&dual.host_ifindex, 0)
        .expect("hypha_ifaces entry of the dual-stack endpoint");
    assert_eq!(
        iface,
        EndpointIface {
            endpoint_id: dual.id,
            flags: ENDPOINT_F_INGRESS_POLICY | both,
            pod_mac: dual.pod_mac.0,
            host_mac: dual.host_mac.0,
            addr4: u32::from_ne_bytes(dual.address.unwrap().octets()),
            addr6: v6("fd00:99::10").octets(),
        }
    );
    let want = ENDPOINT_F_INGRESS_POLICY | both;
    assert_eq!(all_flags(&dp, &dual), (want, Some(want), Some(want)));
    assert_eq!(
        all_flags(&dp, &v6_only),
        (ENDPOINT_F_IPV6, None, Some(ENDPOINT_F_IPV6))
    );
    {
        let m = lock(&dp.maps.endpoints);
        let v4_keys: Vec<EndpointKey4> = m.v4.keys().map(|k| k.unwrap()).collect();
        assert_eq!(
            v4_keys,
            vec![EndpointKey4::from_octets(dual.address.unwrap().octets())],
            "the IPv6-only endpoint has no hypha_endpoints4 entry"
        );
        let info = m.v6.get(&key6(v6("fd00:99::11")), 0).unwrap();
        assert_eq!(
            (info.ifindex, info.endpoint_id, info.pod_mac),
            (v6_only.host_ifindex, v6_only.id, v6_only.pod_mac.0)
        );
        let iface = m.ifaces.get(&v6_only.host_ifindex, 0).unwrap();
        assert_eq!(iface.addr4, 0, "no IPv4 address");
    }
    assert_eq!(fx.in_netns(|| dp.check(&dual)), Vec::<String>::new());
    assert_eq!(fx.in_netns(|| dp.check(&v6_only)), Vec::<String>::new());

    // The bandwidth bit and the policy bits reach every entry; the family bits stay.
    dp.set_flags(&dual, ENDPOINT_F_INGRESS_LIMIT, ENDPOINT_F_INGRESS_LIMIT)
        .expect("set_flags");
    let want = ENDPOINT_F_INGRESS_POLICY | ENDPOINT_F_INGRESS_LIMIT | both;
    assert_eq!(all_flags(&dp, &dual), (want, Some(want), Some(want)));
    dp.apply_policy(&PolicyDiff {
        flags_set: vec![(dual.id, 0), (v6_only.id, ENDPOINT_F_INGRESS_POLICY)],
        ..Default::default()
    })
    .expect("apply_policy");
    let want = ENDPOINT_F_INGRESS_LIMIT | both;
    assert_eq!(all_flags(&dp, &dual), (want, Some(want), Some(want)));
    let want = ENDPOINT_F_INGRESS_POLICY | ENDPOINT_F_IPV6;
    assert_eq!(all_flags(&dp, &v6_only), (want, None, Some(want)));
    // A mask that covers the family bits does not clear them.
    dp.set_flags(&v6_only, u32::MAX, 0).expect("set_flags");
    assert_eq!(
        all_flags(&dp, &v6_only),
        (ENDPOINT_F_IPV6, None, Some(ENDPOINT_F_IPV6))
    );

    // `check` names the map and the address of what is missing or different.
    lock(&dp.maps.endpoints)
        .v6
        .remove(&key6(v6("fd00:99::10")))
        .expect("remove the entry");
    {
        let mut m = lock(&dp.maps.endpoints);
        let mut iface = m.ifaces.get(&v6_only.host_ifindex, 0).unwrap();
        iface.addr6 = v6("fd00:99::99").octets();
        m.ifaces.insert(v6_only.host_ifindex, iface, 0).unwrap();
    }
    assert_eq!(
        fx.in_netns(|| dp.check(&dual)),
        vec!["hypha_endpoints6 has no entry for fd00:99::10".to_owned()]
    );
    assert_eq!(
        fx.in_netns(|| dp.check(&v6_only)),
        vec![format!(
            "hypha_ifaces entry for ifindex {} ({}) differs: IPv6 address fd00:99::99 (want fd00:99::11)",
            v6_only.host_ifindex, v6_only.host_ifname
        )]
    );

    // Detach leaves nothing of either endpoint.
    for ep in [&dual, &v6_only] {
        let errors: Vec<String> = fx
            .in_netns(|| dp.detach(ep))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors, Vec::<String>::new(), "{}", ep.host_ifname);
    }
    let m = lock(&dp.maps.endpoints);
    assert_eq!(
        (
            m.v4.keys().count(),
            m.v6.keys().count(),
            m.ifaces.keys().count()
        ),
        (0, 0, 0),
        "entries left after detach"
    );
    drop(m);
    let problems = fx.in_netns(|| dp.check(&v6_only));
    assert!(
        problems.contains(&"hypha_endpoints6 has no entry for fd00:99::11".to_owned())
            && problems.contains(&format!(
                "hypha_ifaces has no entry for ifindex {} ({})",
                v6_only.host_ifindex, v6_only.host_ifname
            )),
        "{problems:?}"
    );
}

#[test]
fn detach_forgets_the_flows_of_both_addresses_and_sweep_removes_unowned_entries() {
    require_root!();
    let fx = Fixture::new("ct6");
    let (dual, v6_only) = dual_and_v6_only(&fx);
    let dp = fx.load(AttachMode::Tc);
    fx.in_netns(|| {
        dp.attach(&dual, 0).expect("attach");
        dp.attach(&v6_only, 0).expect("attach");
    });
    let mine = v6("fd00:99::10").octets();
    let peer = v6("fd00:99::11").octets();
    let other = v6("fd00:99::77").octets();
    let flow6 = |saddr, daddr| CtKey6 {
        saddr,
        daddr,
        sport: 40000u16.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    let raw4 = |a: std::net::Ipv4Addr| u32::from_ne_bytes(a.octets());
    let flow4 = CtKey4 {
        saddr: raw4(dual.address.unwrap()),
        daddr: raw4("10.99.0.200".parse().unwrap()),
        sport: 1,
        dport: 2,
        proto: 17,
        _pad: [0; 3],
    };
    {
        let mut ct6 = lock(&dp.maps.ct6);
        for k in [flow6(mine, peer), flow6(peer, mine), flow6(peer, other)] {
            ct6.insert(k, CtEntry::default(), 0).expect("insert a flow");
        }
        lock(&dp.maps.ct)
            .insert(flow4, CtEntry::default(), 0)
            .expect("insert a flow");
    }
    let errors = fx.in_netns(|| dp.detach(&dual));
    assert!(errors.is_empty(), "{errors:?}");
    let left: Vec<CtKey6> = lock(&dp.maps.ct6).keys().map(|k| k.unwrap()).collect();
    assert_eq!(
        left,
        vec![flow6(peer, other)],
        "only the flow of others is left"
    );
    assert_eq!(lock(&dp.maps.ct).keys().count(), 0, "the IPv4 flow is gone");

    // Sweep: the IPv6-only endpoint is no one's any more; a kept one stays.
    fx.in_netns(|| dp.attach(&dual, 0).expect("attach again"));
    let errors = fx.in_netns(|| dp.sweep(std::slice::from_ref(&dual)));
    assert!(errors.is_empty(), "{errors:?}");
    let m = lock(&dp.maps.endpoints);
    let v6_keys: Vec<EndpointKey6> = m.v6.keys().map(|k| k.unwrap()).collect();
    assert_eq!(v6_keys, vec![key6(v6("fd00:99::10"))]);
    let ifaces: Vec<u32> = m.ifaces.keys().map(|k| k.unwrap()).collect();
    assert_eq!(ifaces, vec![dual.host_ifindex]);
    drop(m);
    assert_eq!(fx.in_netns(|| dp.check(&dual)), Vec::<String>::new());
}

#[test]
fn a_load_unpins_the_maps_of_retired_layouts_and_keeps_the_others() {
    require_root!();
    let fx = Fixture::new("retired");
    let dp = fx.load(AttachMode::Tc);
    // As an older agent left them: maps pinned under the retired names (any map does:
    // the load must not open them, only unpin them).
    {
        let ct = lock(&dp.maps.ct);
        let ct: &aya::maps::HashMap<_, _, _> = &ct;
        for name in maps::RETIRED {
            ct.map()
                .pin(fx.pin_dir.join(name))
                .unwrap_or_else(|e| panic!("pin a map as {name}: {e}"));
        }
    }
    drop(dp);
    for name in maps::RETIRED {
        assert!(
            fx.pin_dir.join(name).exists(),
            "{name} pinned before the load"
        );
    }
    let _dp = fx.load(AttachMode::Tc);
    for name in maps::RETIRED {
        assert!(
            !fx.pin_dir.join(name).exists(),
            "{name} still pinned after the load"
        );
    }
    for name in [
        maps::CT4,
        maps::CT6,
        maps::IFACES,
        maps::ENDPOINTS6,
        maps::EP_STATS,
    ] {
        assert!(fx.pin_dir.join(name).exists(), "{name} is kept");
    }
}
