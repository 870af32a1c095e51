//! Privileged (root; skipped otherwise, with a message): what the datapath writes for the
//! tunnel. The peer maps hold exactly the nodes given (written, changed, removed, read
//! back), a kept node keeps its counters and a new one starts at zero; the tunnel
//! programs are attached to a real VXLAN device with pinned TCX links and the config map
//! written; a second load (a restarted agent) swaps its programs into the same links
//! without detaching them; a device made anew gets new links; `sweep` leaves the
//! tunnel's links and drop counters alone; no tunnel zeroes the config and unpins.
//!
//! Each test works in a network namespace and a pin directory of its own (see
//! [`Fixture`]), removed on drop.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::fd::AsFd as _;

use aya::maps::PerCpuValues;
use hypha_common::{Counter, DIR_INGRESS, DropKey, DropReason, NodeStats, TunnelConfig};
use hypha_netlink::{Netlink, VxlanSpec};

use super::concurrency_tests::{Fixture, privileged};
use super::{EbpfDatapath, lock};
use crate::config::AttachMode;
use crate::datapath::tunnel_maps::tests::peer;
use crate::datapath::{Datapath, TunnelSetup, link_info};

macro_rules! require_root {
    () => {
        if !privileged() {
            eprintln!("skipped: {}:{} needs root", file!(), line!());
            return;
        }
    };
}

/// `n` per-CPU values of `value`.
fn per_cpu(value: NodeStats) -> PerCpuValues<NodeStats> {
    let n = aya::util::nr_cpus().expect("number of CPUs");
    PerCpuValues::try_from(vec![value; n]).expect("per-CPU values")
}

fn counted(packets: u64) -> NodeStats {
    let c = Counter {
        packets,
        bytes: packets * 100,
    };
    NodeStats {
        tx: c,
        rx: c,
        dropped: Counter::default(),
    }
}

#[test]
fn peers_are_written_changed_and_removed_and_kept_nodes_keep_their_counters() {
    require_root!();
    let fx = Fixture::new("tpeers");
    let dp = fx.load(AttachMode::Tcx);
    let mut b = peer(
        "b",
        7,
        "192.168.50.3",
        "10.244.2.0/24",
        "fd00:10:244:2::/64",
    );
    b.addresses.push("fd00:50::3".parse().unwrap());
    let c = peer(
        "c",
        9,
        "192.168.50.4",
        "10.244.3.0/24",
        "fd00:10:244:3::/64",
    );
    let errors = dp.set_tunnel_peers(&[b.clone(), c.clone()]);
    assert!(errors.is_empty(), "{errors:?}");
    let (want, _) = super::tunnel_maps::wanted(&[b.clone(), c.clone()]);
    let got = dp.maps.tunnel.installed().expect("read the maps");
    assert_eq!(got, want);
    assert_eq!(got.tunnel4.len(), 2);
    assert_eq!(got.nodes6.len(), 1);
    assert_eq!(
        dp.node_stats().unwrap(),
        vec![(7, NodeStats::default()), (9, NodeStats::default())],
        "new nodes start at zero"
    );

    // Traffic with b, as the programs would count it.
    lock(&dp.maps.tunnel.stats)
        .insert(7, per_cpu(counted(3)), 0)
        .expect("count");
    let cpus = aya::util::nr_cpus().unwrap() as u64;
    let summed = dp.node_stats().unwrap();
    assert_eq!(summed[0], (7, counted(3 * cpus)), "summed over CPUs");

    // b moves to another address and CIDR; c goes; d comes.
    let b2 = peer("b", 7, "192.168.50.13", "10.244.12.0/24", "");
    let d = peer("d", 11, "fd00:50::5", "", "fd00:10:244:5::/64");
    let errors = dp.set_tunnel_peers(&[b2.clone(), d.clone()]);
    assert!(errors.is_empty(), "{errors:?}");
    let (want, _) = super::tunnel_maps::wanted(&[b2.clone(), d.clone()]);
    assert_eq!(dp.maps.tunnel.installed().unwrap(), want);
    assert_eq!(
        dp.node_stats().unwrap(),
        vec![(7, counted(3 * cpus)), (11, NodeStats::default())],
        "b keeps its counters, c's are gone, d's start at zero"
    );
    // The same again changes nothing.
    assert!(dp.set_tunnel_peers(&[b2.clone(), d.clone()]).is_empty());
    assert_eq!(dp.node_stats().unwrap()[0], (7, counted(3 * cpus)));

    // A conflict is reported; the rest is written.
    let e = peer("e", 13, "192.168.50.13", "10.244.14.0/24", "");
    let errors: Vec<String> = dp
        .set_tunnel_peers(&[b2.clone(), e])
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errors,
        vec![
            "tunnel peers: underlay address 192.168.50.13 is claimed by nodes b and e; it stays with b"
                .to_owned()
        ]
    );
    let got = dp.maps.tunnel.installed().unwrap();
    assert_eq!(
        got.tunnel4
            .keys()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["10.244.12.0/24", "10.244.14.0/24"]
    );
    assert_eq!(
        got.nodes4,
        BTreeMap::from([(Ipv4Addr::new(192, 168, 50, 13), 7)])
    );

    // No peers: nothing left.
    assert!(dp.set_tunnel_peers(&[]).is_empty());
    let got = dp.maps.tunnel.installed().unwrap();
    assert_eq!(got, Default::default());
    assert_eq!(got.node_ids, BTreeSet::new());
}

/// Creates an up VXLAN device in external mode named `name` in the fixture's namespace.
fn vxlan(fx: &Fixture, name: &str) -> TunnelSetup {
    let mut nl = Netlink::in_netns(&fx.netns_path()).expect("netlink in the test netns");
    nl.create_vxlan(&VxlanSpec {
        name,
        port: 8472,
        mtu: Some(1450),
    })
    .expect("create a VXLAN device");
    let link = nl.link_by_name(name).unwrap().expect("the device");
    nl.set_up(link.index).expect("set it up");
    TunnelSetup {
        ifindex: link.index,
        ifname: name.to_owned(),
        local4: Some(Ipv4Addr::new(192, 168, 50, 2)),
        local6: None,
        snat6: Some("fd00:10:244:2::1".parse().unwrap()),
    }
}

/// (link id, program id, ifindex, attach type) of the tunnel's pinned link on `hook`.
fn tunnel_link(dp: &EbpfDatapath, hook: &str) -> (u32, u32, u32, u32) {
    let info = link_info::read(&dp.tunnel_pin(hook))
        .unwrap_or_else(|e| panic!("read the tunnel's {hook} link: {e}"));
    (info.id, info.prog_id, info.ifindex, info.attach_type)
}

#[test]
fn tunnel_programs_are_attached_adopted_in_place_moved_and_removed() {
    require_root!();
    let fx = Fixture::new("tprogs");
    let dp = fx.load(AttachMode::Tcx);
    let tunnel = vxlan(&fx, "vx0");
    fx.in_netns(|| dp.set_tunnel(Some(&tunnel)))
        .expect("set the tunnel");
    assert_eq!(dp.check_tunnel(&tunnel), Vec::<String>::new());
    let (ingress_id, from_prog, ifindex, attach) = tunnel_link(&dp, "ingress");
    assert_eq!(
        (ifindex, attach),
        (tunnel.ifindex, link_info::BPF_TCX_INGRESS)
    );
    assert_eq!(from_prog, dp.tunnel_programs[0].id);
    let (egress_id, to_prog, ifindex, attach) = tunnel_link(&dp, "egress");
    assert_eq!(
        (ifindex, attach),
        (tunnel.ifindex, link_info::BPF_TCX_EGRESS)
    );
    assert_eq!(to_prog, dp.tunnel_programs[1].id);
    let config = dp.maps.tunnel.read_config().unwrap();
    assert_eq!(
        config,
        TunnelConfig {
            ifindex: tunnel.ifindex,
            flags: 0,
            local4: u32::from_ne_bytes([192, 168, 50, 2]),
            _pad: 0,
            local6: [0; 16],
        }
    );
    assert_eq!(
        dp.maps.tunnel.read_snat6().unwrap(),
        Some("fd00:10:244:2::1".parse().unwrap()),
        "the IPv6 SNAT address is written with the tunnel"
    );

    // Sweeping the endpoints keeps the tunnel's links and the device's drop counters.
    let device_drop = DropKey {
        ifindex: tunnel.ifindex,
        reason: DropReason::UnknownTunnelSource as u16,
        direction: DIR_INGRESS,
        _pad: 0,
    };
    let one = vec![
        Counter {
            packets: 1,
            bytes: 90
        };
        aya::util::nr_cpus().unwrap()
    ];
    lock(&dp.maps.drops)
        .insert(device_drop, PerCpuValues::try_from(one).unwrap(), 0)
        .expect("count a drop");
    let errors = fx.in_netns(|| dp.sweep(&[]));
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(dp.check_tunnel(&tunnel), Vec::<String>::new());
    assert!(
        dp.drops()
            .unwrap()
            .iter()
            .any(|(k, c)| *k == device_drop && c.packets > 0),
        "the device's drops are kept"
    );

    // A restarted agent: its programs go into the same links, never detached.
    let again = fx.load(AttachMode::Tcx);
    fx.in_netns(|| again.set_tunnel(Some(&tunnel)))
        .expect("set the tunnel again");
    assert_eq!(again.check_tunnel(&tunnel), Vec::<String>::new());
    let (id, prog, ifindex, _) = tunnel_link(&again, "ingress");
    assert_eq!(
        (id, prog, ifindex),
        (ingress_id, again.tunnel_programs[0].id, tunnel.ifindex),
        "the same link runs the new program"
    );
    assert_ne!(prog, from_prog);
    let (id, prog, _, _) = tunnel_link(&again, "egress");
    assert_eq!((id, prog), (egress_id, again.tunnel_programs[1].id));
    // The first agent's view says its program is no longer what runs.
    let stale = dp.check_tunnel(&tunnel);
    assert_eq!(stale.len(), 2, "{stale:?}");
    assert!(
        stale[0].starts_with("program hypha_from_tunnel is not what runs on the ingress of vx0"),
        "{stale:?}"
    );
    drop(dp);

    // The device made anew (another ifindex): new links there.
    {
        let mut nl = Netlink::in_netns(&fx.netns_path()).unwrap();
        nl.delete_link(tunnel.ifindex).expect("delete the device");
    }
    let moved = vxlan(&fx, "vx1");
    assert_ne!(moved.ifindex, tunnel.ifindex);
    assert!(!again.check_tunnel(&moved).is_empty(), "not attached yet");
    fx.in_netns(|| again.set_tunnel(Some(&moved)))
        .expect("set the new tunnel");
    assert_eq!(again.check_tunnel(&moved), Vec::<String>::new());
    let (id, _, ifindex, _) = tunnel_link(&again, "ingress");
    assert_ne!(id, ingress_id);
    assert_eq!(ifindex, moved.ifindex);

    // No tunnel: config zeroed, links unpinned (and so detached).
    let link = link_info::open_pin(&again.tunnel_pin("egress")).expect("open the link");
    again.set_tunnel(None).expect("no tunnel");
    assert_eq!(
        again.maps.tunnel.read_config().unwrap(),
        TunnelConfig::default()
    );
    assert_eq!(
        again.maps.tunnel.read_snat6().unwrap(),
        None,
        "no tunnel, no IPv6 SNAT address"
    );
    for hook in ["ingress", "egress"] {
        assert!(!again.tunnel_pin(hook).exists(), "{hook} pin removed");
    }
    // The fd held here is the link's last holder: closing it detaches it.
    let info = link_info::info(link.as_fd()).unwrap();
    assert_eq!(info.ifindex, moved.ifindex, "still held by this fd only");
    drop(link);
    let attached = fx.in_netns(|| {
        Netlink::new()
            .unwrap()
            .link_by_index(moved.ifindex)
            .unwrap()
            .is_some()
    });
    assert!(attached, "the device itself stays");
}
