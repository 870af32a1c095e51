//! ClusterIP and NodePort allocation.

use std::net::IpAddr;
use std::time::Instant;

use super::*;
use crate::policy::{PROTO_TCP, PROTO_UDP};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn dual() -> ServiceCidrs {
    ServiceCidrs {
        v4: Some("10.96.0.0/16".parse().unwrap()),
        v6: Some("fd00:10:96::/112".parse().unwrap()),
    }
}

fn v4_only(cidr: &str) -> ServiceCidrs {
    ServiceCidrs {
        v4: Some(cidr.parse().unwrap()),
        v6: None,
    }
}

fn v6_only() -> ServiceCidrs {
    ServiceCidrs {
        v4: None,
        v6: Some("fd00:10:96::/112".parse().unwrap()),
    }
}

fn port(name: &str, protocol: u8, port: u16) -> ServicePort {
    ServicePort {
        name: name.to_owned(),
        protocol,
        port,
        target_port: TargetPort::Number(port),
        node_port: None,
    }
}

fn svc(name: &str) -> Service {
    Service {
        namespace: "default".to_owned(),
        name: name.to_owned(),
        kind: ServiceType::ClusterIP,
        cluster_ips: Vec::new(),
        ip_families: Vec::new(),
        ip_family_policy: IpFamilyPolicy::SingleStack,
        ports: vec![port("", PROTO_TCP, 80)],
        selector: Some(Labels::new()),
        session_affinity: None,
        external_local: false,
        internal_local: false,
    }
}

fn node_port_svc(name: &str) -> Service {
    Service {
        kind: ServiceType::NodePort,
        ports: vec![port("http", PROTO_TCP, 80), port("dns", PROTO_UDP, 53)],
        ..svc(name)
    }
}

/// Assigns and holds, returning the service.
fn give(cidrs: &ServiceCidrs, taken: &mut Taken, mut s: Service) -> Service {
    assign(cidrs, taken, &mut s).unwrap_or_else(|e| panic!("{e}"));
    taken.hold(&s);
    s
}

fn refused(cidrs: &ServiceCidrs, taken: &Taken, mut s: Service, want: &str) {
    let msg = assign(cidrs, taken, &mut s).unwrap_err().to_string();
    assert!(msg.contains(want), "want {want:?} in: {msg}");
    assert!(msg.starts_with(&format!("service {}: ", s.key())), "{msg}");
}

#[test]
fn the_lowest_free_address_is_allocated_skipping_the_network_address() {
    let cidrs = dual();
    let mut taken = Taken::default();
    let a = give(&cidrs, &mut taken, svc("a"));
    assert_eq!(a.cluster_ips, vec![ip("10.96.0.1")]);
    assert_eq!(a.ip_families, vec![IpFamily::IPv4], "IPv4 first when both");
    let b = give(&cidrs, &mut taken, svc("b"));
    assert_eq!(b.cluster_ips, vec![ip("10.96.0.2")]);
    // A hole is filled first.
    taken.release("default/a");
    let c = give(&cidrs, &mut taken, svc("c"));
    assert_eq!(c.cluster_ips, vec![ip("10.96.0.1")]);
    let d = give(&cidrs, &mut taken, svc("d"));
    assert_eq!(d.cluster_ips, vec![ip("10.96.0.3")]);
    assert_eq!(taken.ips.len(), 3);
    assert_eq!(taken.ips[&ip("10.96.0.3")], "default/d");
}

#[test]
fn requested_addresses_are_checked() {
    let cidrs = dual();
    let mut taken = Taken::default();
    let mut a = svc("a");
    a.cluster_ips = vec![ip("10.96.0.10")];
    let a = give(&cidrs, &mut taken, a);
    assert_eq!(a.cluster_ips, vec![ip("10.96.0.10")]);

    let with = |addr: &str| {
        let mut s = svc("b");
        s.cluster_ips = vec![ip(addr)];
        s
    };
    refused(
        &cidrs,
        &taken,
        with("10.96.0.10"),
        "clusterIP 10.96.0.10 is taken by service default/a",
    );
    refused(
        &cidrs,
        &taken,
        with("10.97.0.1"),
        "clusterIP 10.97.0.1 is outside the service CIDR 10.96.0.0/16",
    );
    refused(
        &cidrs,
        &taken,
        with("10.96.0.0"),
        "clusterIP 10.96.0.0 is the network address of 10.96.0.0/16",
    );
    refused(
        &cidrs,
        &taken,
        with("10.96.255.255"),
        "clusterIP 10.96.255.255 is the broadcast address of 10.96.0.0/16",
    );
    refused(
        &cidrs,
        &taken,
        with("fd00:10:96::"),
        "clusterIP fd00:10:96:: is the network address of fd00:10:96::/112",
    );
    refused(
        &v4_only("10.96.0.0/16"),
        &taken,
        with("fd00:10:96::5"),
        "it asks for an IPv6 ClusterIP but no IPv6 service CIDR is configured",
    );
    // Its own address, asked again: fine. Allocation skips a requested one.
    let mut again = svc("a");
    again.cluster_ips = vec![ip("10.96.0.10")];
    give(&cidrs, &mut taken, again);
    let b = give(&cidrs, &mut taken, svc("b"));
    assert_eq!(b.cluster_ips, vec![ip("10.96.0.1")]);
}

#[test]
fn family_policies() {
    let mut taken = Taken::default();
    // SingleStack on an IPv6-only cluster: IPv6.
    let s = give(&v6_only(), &mut taken, svc("v6"));
    assert_eq!(s.cluster_ips, vec![ip("fd00:10:96::1")]);

    // SingleStack asking IPv6 on a dual-stack cluster.
    let mut s = svc("one6");
    s.ip_families = vec![IpFamily::IPv6];
    let s = give(&dual(), &mut Taken::default(), s);
    assert_eq!(s.cluster_ips, vec![ip("fd00:10:96::1")]);

    // PreferDualStack: both when configured, primary first; one otherwise.
    let mut s = svc("pref");
    s.ip_family_policy = IpFamilyPolicy::PreferDualStack;
    s.ip_families = vec![IpFamily::IPv6];
    let got = give(&dual(), &mut Taken::default(), s.clone());
    assert_eq!(got.cluster_ips, vec![ip("fd00:10:96::1"), ip("10.96.0.1")]);
    assert_eq!(got.ip_families, vec![IpFamily::IPv6, IpFamily::IPv4]);
    let mut s4 = s.clone();
    s4.ip_families.clear();
    let got = give(&v4_only("10.96.0.0/16"), &mut Taken::default(), s4);
    assert_eq!(got.cluster_ips, vec![ip("10.96.0.1")]);

    // RequireDualStack: both, or an error.
    let mut r = svc("req");
    r.ip_family_policy = IpFamilyPolicy::RequireDualStack;
    let got = give(&dual(), &mut Taken::default(), r.clone());
    assert_eq!(got.cluster_ips, vec![ip("10.96.0.1"), ip("fd00:10:96::1")]);
    refused(
        &v4_only("10.96.0.0/16"),
        &Taken::default(),
        r,
        "ipFamilyPolicy RequireDualStack needs an IPv4 and an IPv6 service CIDR; only IPv4 is \
         configured",
    );
    // Dual-stack with one address requested: the other allocated.
    let mut d = svc("d");
    d.ip_family_policy = IpFamilyPolicy::RequireDualStack;
    d.cluster_ips = vec![ip("fd00:10:96::99")];
    let got = give(&dual(), &mut Taken::default(), d);
    assert_eq!(got.cluster_ips, vec![ip("fd00:10:96::99"), ip("10.96.0.1")]);

    refused(
        &ServiceCidrs::default(),
        &Taken::default(),
        svc("none"),
        "no service CIDR is configured",
    );
    let mut s = svc("x");
    s.ip_families = vec![IpFamily::IPv6];
    refused(
        &v4_only("10.96.0.0/16"),
        &Taken::default(),
        s,
        "no IPv6 service CIDR is configured",
    );
}

#[test]
fn an_update_keeps_its_addresses_and_node_ports() {
    let cidrs = dual();
    let mut taken = Taken::default();
    give(&cidrs, &mut taken, svc("first"));
    let a = give(&cidrs, &mut taken, node_port_svc("a"));
    assert_eq!(a.cluster_ips, vec![ip("10.96.0.2")]);
    assert_eq!(a.ports[0].node_port, Some(30000));
    assert_eq!(a.ports[1].node_port, Some(30000), "UDP has its own numbers");
    give(&cidrs, &mut taken, node_port_svc("b"));
    taken.release("default/first");

    // The same service again, as parsed (asking nothing): the same addresses and ports,
    // even with its ports reordered and one added.
    let mut again = node_port_svc("a");
    again.ports.reverse();
    again.ports.push(port("extra", PROTO_TCP, 8080));
    let again = give(&cidrs, &mut taken, again);
    assert_eq!(again.cluster_ips, vec![ip("10.96.0.2")]);
    assert_eq!(again.ports[0].node_port, Some(30000)); // dns/UDP
    assert_eq!(again.ports[1].node_port, Some(30000)); // http/TCP
    assert_eq!(again.ports[2].node_port, Some(30002), "after b's 30001");

    // Asking for another address: it gets it (the old one is released by hold).
    let mut moved = node_port_svc("a");
    moved.cluster_ips = vec![ip("10.96.1.1")];
    let moved = give(&cidrs, &mut taken, moved);
    assert_eq!(moved.cluster_ips, vec![ip("10.96.1.1")]);
    assert!(!taken.ips.contains_key(&ip("10.96.0.2")));
    let c = give(&cidrs, &mut taken, svc("c"));
    assert_eq!(c.cluster_ips, vec![ip("10.96.0.1")]);

    // Becoming ClusterIP drops its node ports.
    let plain = give(&cidrs, &mut taken, svc("a"));
    assert!(plain.ports.iter().all(|p| p.node_port.is_none()));
    assert!(taken.node_ports.values().all(|k| k != "default/a"));
}

#[test]
fn node_ports_are_checked_and_allocated() {
    let cidrs = dual();
    let mut taken = Taken::default();
    let mut a = node_port_svc("a");
    a.ports[0].node_port = Some(30000);
    let a = give(&cidrs, &mut taken, a);
    assert_eq!(a.ports[0].node_port, Some(30000));
    let b = give(&cidrs, &mut taken, node_port_svc("b"));
    assert_eq!(b.ports[0].node_port, Some(30001));
    assert_eq!(b.ports[1].node_port, Some(30001));

    let mut c = node_port_svc("c");
    c.ports[0].node_port = Some(30001);
    refused(
        &cidrs,
        &taken,
        c,
        "nodePort 30001/TCP is taken by service default/b",
    );
    let mut c = node_port_svc("c");
    c.ports[0].node_port = Some(80);
    refused(
        &cidrs,
        &taken,
        c,
        "nodePort 80 is outside the NodePort range (30000-32767)",
    );

    // Two unrequested ports of one protocol get two numbers; a requested one is skipped.
    let mut d = node_port_svc("d");
    d.ports = vec![
        port("a", PROTO_TCP, 1),
        port("b", PROTO_TCP, 2),
        ServicePort {
            node_port: Some(30003),
            ..port("c", PROTO_TCP, 3)
        },
    ];
    let d = give(&cidrs, &mut taken, d);
    let got: Vec<_> = d.ports.iter().map(|p| p.node_port).collect();
    assert_eq!(got, vec![Some(30002), Some(30004), Some(30003)]);
}

#[test]
fn full_ranges_are_clear_errors() {
    // A /30: two usable addresses.
    let cidrs = v4_only("10.96.0.0/30");
    let mut taken = Taken::default();
    assert_eq!(
        give(&cidrs, &mut taken, svc("a")).cluster_ips,
        vec![ip("10.96.0.1")]
    );
    assert_eq!(
        give(&cidrs, &mut taken, svc("b")).cluster_ips,
        vec![ip("10.96.0.2")]
    );
    refused(
        &cidrs,
        &taken,
        svc("c"),
        "no free address is left in the service CIDR 10.96.0.0/30",
    );

    // Every TCP node port.
    let mut taken = Taken::default();
    for p in NODE_PORT_RANGE {
        taken
            .node_ports
            .insert((PROTO_TCP, p), "default/x".to_owned());
    }
    refused(
        &dual(),
        &taken,
        node_port_svc("n"),
        "no free NodePort is left for TCP in 30000-32767",
    );
}

#[test]
fn maps_changed_directly_are_still_honoured() {
    let cidrs = dual();
    let mut taken = Taken::default();
    give(&cidrs, &mut taken, svc("a"));
    // Entries written straight into the maps (no index): scanned, never handed out twice.
    taken
        .ips
        .insert(ip("10.96.0.2"), "default/direct".to_owned());
    taken
        .node_ports
        .insert((PROTO_TCP, 30000), "default/direct".to_owned());
    let b = give(&cidrs, &mut taken, node_port_svc("b"));
    assert_eq!(b.cluster_ips, vec![ip("10.96.0.3")]);
    assert_eq!(b.ports[0].node_port, Some(30001));
    // The direct holder keeps its address on an update, found by value.
    let direct = give(&cidrs, &mut taken, svc("direct"));
    assert_eq!(direct.cluster_ips, vec![ip("10.96.0.2")]);

    let rebuilt = Taken::from_services([&b, &direct]);
    assert_eq!(rebuilt.ips.len(), 2);
}

/// Assigns `n` services one after another (a tenth NodePort, half dual-stack), holding
/// each; returns the time it took.
fn assign_many(n: usize) -> (Taken, std::time::Duration) {
    let cidrs = dual();
    let mut taken = Taken::default();
    let start = Instant::now();
    for i in 0..n {
        let mut s = if i % 10 == 0 {
            node_port_svc(&format!("s{i}"))
        } else {
            svc(&format!("s{i}"))
        };
        if i % 2 == 0 {
            s.ip_family_policy = IpFamilyPolicy::PreferDualStack;
        }
        assign(&cidrs, &taken, &mut s).unwrap();
        taken.hold(&s);
    }
    (taken, start.elapsed())
}

#[test]
fn ten_thousand_services_are_assigned_quickly() {
    let (_, quarter) = assign_many(2_500);
    let (mut taken, elapsed) = assign_many(10_000);
    assert!(taken.in_sync(), "the index follows hold()");
    assert_eq!(taken.ips.len(), 15_000);
    assert_eq!(taken.node_ports.len(), 2_000);
    assert!(
        taken.ips.contains_key(&ip("10.96.39.16")),
        "the 10,000th address"
    );
    // Linear: four times the services take about four times as long (a scan from the
    // start each time, quadratic, takes sixteen times as long and many seconds). The
    // absolute bound is loose: this machine is shared with parallel builds (unloaded,
    // a debug build takes about 0.2 s).
    assert!(
        elapsed.as_secs_f64() < quarter.as_secs_f64() * 8.0 + 0.05,
        "2,500 took {quarter:?}, 10,000 took {elapsed:?}"
    );
    assert!(elapsed.as_secs_f64() < 5.0, "took {elapsed:?}");
    // Releases and new services stay quick too.
    let cidrs = dual();
    let start = Instant::now();
    for i in (0..10_000).step_by(3) {
        taken.release(&format!("default/s{i}"));
    }
    for i in 0..3_000 {
        give(&cidrs, &mut taken, svc(&format!("t{i}")));
    }
    assert!(taken.in_sync());
    assert!(
        start.elapsed().as_secs_f64() < 5.0,
        "took {:?}",
        start.elapsed()
    );
}
