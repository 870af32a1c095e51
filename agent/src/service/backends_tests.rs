//! The plan: frontends and backends from services, pods and slices.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use hypha_common::lb::{
    LB_F_AFFINITY, LB_F_LOCAL, LB_F_NODEPORT, LB_SCOPE_EXTERNAL, LB_SCOPE_INTERNAL,
    MAX_LB_BACKENDS_PER_SERVICE,
};

use super::*;
use crate::policy::{PROTO_TCP, PROTO_UDP};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn pod(name: &str, ns: &str, app: &str, addrs: &[&str], local: bool) -> Pod {
    Pod {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        labels: labels(&[("app", app)]),
        addresses: addrs.iter().map(|a| ip(a)).collect(),
        node: if local { "here" } else { "there" }.to_owned(),
        local,
        ports: BTreeMap::new(),
    }
}

fn port(name: &str, protocol: u8, port: u16, target: TargetPort) -> ServicePort {
    ServicePort {
        name: name.to_owned(),
        protocol,
        port,
        target_port: target,
        node_port: None,
    }
}

fn svc(name: &str, vips: &[&str], app: &str) -> Service {
    Service {
        namespace: "default".to_owned(),
        name: name.to_owned(),
        kind: ServiceType::ClusterIP,
        cluster_ips: vips.iter().map(|a| ip(a)).collect(),
        ip_families: Vec::new(),
        ip_family_policy: IpFamilyPolicy::SingleStack,
        ports: vec![port("", PROTO_TCP, 80, TargetPort::Number(8080))],
        selector: Some(labels(&[("app", app)])),
        session_affinity: None,
        external_local: false,
        internal_local: false,
    }
}

fn addrs(f: &Frontend) -> Vec<(IpAddr, u16)> {
    f.backends.iter().map(|b| (b.addr, b.port)).collect()
}

#[test]
fn a_selector_picks_the_pods_of_its_namespace_with_every_label() {
    let mut web2 = pod("web-2", "default", "web", &["10.0.0.2"], false);
    web2.labels.insert("tier".to_owned(), "front".to_owned());
    let pods = vec![
        pod("web-1", "default", "web", &["10.0.0.1"], true),
        web2,
        pod("db", "default", "db", &["10.0.0.3"], true),
        pod("web-other", "other", "web", &["10.0.0.4"], true),
    ];
    let plan = plan(&[svc("web", &["10.96.0.1"], "web")], &[], &pods, &[]);
    assert_eq!(plan.len(), 1);
    let f = &plan[0];
    assert_eq!(f.service, "default/web");
    assert_eq!((f.addr, f.port, f.proto), (ip("10.96.0.1"), 80, PROTO_TCP));
    assert_eq!(f.scope, LB_SCOPE_INTERNAL);
    assert_eq!(f.flags, 0);
    assert_eq!(
        addrs(f),
        vec![(ip("10.0.0.1"), 8080), (ip("10.0.0.2"), 8080)]
    );
    assert_eq!(f.backends[0].pod, "web-1");
    assert_eq!(f.backends[0].node, "here");
    assert!(f.backends[0].local && !f.backends[1].local);

    // Two pairs: both must match.
    let mut s = svc("front", &["10.96.0.2"], "web");
    s.selector
        .as_mut()
        .unwrap()
        .insert("tier".to_owned(), "front".to_owned());
    let plan = super::plan(&[s], &[], &pods, &[]);
    assert_eq!(addrs(&plan[0]), vec![(ip("10.0.0.2"), 8080)]);

    // `{}` selects every pod of the namespace.
    let mut all = svc("all", &["10.96.0.3"], "x");
    all.selector = Some(Labels::new());
    let plan = super::plan(&[all], &[], &pods, &[]);
    assert_eq!(plan[0].backends.len(), 3);

    // No matching pod: the frontend is there, without backends (connections refused).
    let plan = super::plan(&[svc("none", &["10.96.0.4"], "nothing")], &[], &pods, &[]);
    assert_eq!(plan.len(), 1);
    assert!(plan[0].backends.is_empty());
}

#[test]
fn dual_stack_services_get_a_frontend_per_family_with_that_familys_addresses() {
    let pods = vec![
        pod("a", "default", "web", &["10.0.0.1", "fd00::1"], true),
        pod("b", "default", "web", &["fd00::2"], true),
    ];
    let s = svc("web", &["fd00:10:96::1", "10.96.0.1"], "web");
    let plan = plan(&[s], &[], &pods, &[]);
    assert_eq!(plan.len(), 2);
    // IPv4 sorts first.
    assert_eq!(plan[0].addr, ip("10.96.0.1"));
    assert_eq!(addrs(&plan[0]), vec![(ip("10.0.0.1"), 8080)]);
    assert_eq!(plan[1].addr, ip("fd00:10:96::1"));
    assert_eq!(
        addrs(&plan[1]),
        vec![(ip("fd00::1"), 8080), (ip("fd00::2"), 8080)]
    );
}

#[test]
fn named_target_ports_resolve_per_pod_and_protocol() {
    let mut a = pod("a", "default", "web", &["10.0.0.1"], true);
    a.ports.insert("http".to_owned(), (PROTO_TCP, 8080));
    let mut b = pod("b", "default", "web", &["10.0.0.2"], true);
    b.ports.insert("http".to_owned(), (PROTO_TCP, 9090));
    let mut c = pod("c", "default", "web", &["10.0.0.3"], true);
    c.ports.insert("http".to_owned(), (PROTO_UDP, 8080)); // wrong protocol
    let d = pod("d", "default", "web", &["10.0.0.4"], true); // no such port
    let mut s = svc("web", &["10.96.0.1"], "web");
    s.ports = vec![port("", PROTO_TCP, 80, TargetPort::Name("http".to_owned()))];
    let plan = plan(&[s], &[], &[a, b, c, d], &[]);
    assert_eq!(
        addrs(&plan[0]),
        vec![(ip("10.0.0.1"), 8080), (ip("10.0.0.2"), 9090)]
    );
}

#[test]
fn node_port_services_get_internal_and_external_frontends_per_node_address() {
    let pods = vec![
        pod("a", "default", "web", &["10.0.0.1"], true),
        pod("b", "default", "web", &["10.0.0.2"], false),
    ];
    let mut s = svc("web", &["10.96.0.1"], "web");
    s.kind = ServiceType::NodePort;
    s.ports[0].node_port = Some(30080);
    s.session_affinity = Some(60);
    let nodes = [ip("192.168.1.10"), ip("fd00:1::10"), ip("192.168.2.10")];
    let plan = plan(&[s.clone()], &[], &pods, &nodes);
    let shape: Vec<_> = plan
        .iter()
        .map(|f| (f.addr, f.port, f.scope, f.flags, f.backends.len()))
        .collect();
    let np = LB_F_NODEPORT | LB_F_AFFINITY;
    assert_eq!(
        shape,
        vec![
            (ip("10.96.0.1"), 80, LB_SCOPE_INTERNAL, LB_F_AFFINITY, 2),
            (ip("192.168.1.10"), 30080, LB_SCOPE_INTERNAL, np, 2),
            (ip("192.168.1.10"), 30080, LB_SCOPE_EXTERNAL, np, 2),
            (ip("192.168.2.10"), 30080, LB_SCOPE_INTERNAL, np, 2),
            (ip("192.168.2.10"), 30080, LB_SCOPE_EXTERNAL, np, 2),
        ],
        "no IPv6 frontend for an IPv4-only service"
    );
    assert!(plan.iter().all(|f| f.affinity_timeout_s == 60));

    // externalTrafficPolicy: Local: the external scope keeps local backends only.
    s.external_local = true;
    let plan = super::plan(&[s.clone()], &[], &pods, &nodes[..1]);
    let ext = plan.iter().find(|f| f.scope == LB_SCOPE_EXTERNAL).unwrap();
    assert_eq!(ext.flags, LB_F_NODEPORT | LB_F_AFFINITY | LB_F_LOCAL);
    assert_eq!(addrs(ext), vec![(ip("10.0.0.1"), 8080)]);
    let int = plan
        .iter()
        .find(|f| f.scope == LB_SCOPE_INTERNAL && f.port == 30080)
        .unwrap();
    assert_eq!(int.backends.len(), 2);

    // internalTrafficPolicy: Local: the internal scope (ClusterIP and NodePort) too.
    s.external_local = false;
    s.internal_local = true;
    let plan = super::plan(&[s], &[], &pods, &nodes[..1]);
    for f in &plan {
        let want = if f.scope == LB_SCOPE_INTERNAL { 1 } else { 2 };
        assert_eq!(f.backends.len(), want, "{f:?}");
    }
}

fn slice(name: &str, service: &str, family: IpFamily, eps: Vec<SliceEndpoint>) -> EndpointSlice {
    EndpointSlice {
        namespace: "default".to_owned(),
        name: name.to_owned(),
        service: service.to_owned(),
        family,
        endpoints: eps,
        ports: vec![
            SlicePort {
                name: "sql".to_owned(),
                protocol: PROTO_TCP,
                port: 5432,
            },
            SlicePort {
                name: "metrics".to_owned(),
                protocol: PROTO_TCP,
                port: 9000,
            },
        ],
    }
}

fn ep(addrs: &[&str], ready: bool, node: Option<&str>) -> SliceEndpoint {
    SliceEndpoint {
        addresses: addrs.iter().map(|a| ip(a)).collect(),
        ready,
        node: node.map(str::to_owned),
    }
}

#[test]
fn services_without_a_selector_take_their_slices_ready_endpoints() {
    let mut s = svc("db", &["10.96.0.5"], "");
    s.selector = None;
    s.ports = vec![
        port("sql", PROTO_TCP, 5432, TargetPort::Number(1)),
        port("other", PROTO_TCP, 7000, TargetPort::Number(1)),
    ];
    let slices = vec![
        slice(
            "db-b",
            "db",
            IpFamily::IPv4,
            vec![ep(&["10.0.0.9"], true, Some("n2"))],
        ),
        slice(
            "db-a",
            "db",
            IpFamily::IPv4,
            vec![
                ep(&["10.0.0.1", "10.0.0.2"], true, Some("n1")),
                ep(&["10.0.0.3"], false, Some("n1")),
                ep(&["10.0.0.9"], true, Some("n2")), // also in db-b: once
            ],
        ),
        slice(
            "db-6",
            "db",
            IpFamily::IPv6,
            vec![ep(&["fd00::1"], true, None)],
        ),
        slice(
            "web-a",
            "web",
            IpFamily::IPv4,
            vec![ep(&["10.0.0.7"], true, None)],
        ),
        EndpointSlice {
            namespace: "other".to_owned(),
            ..slice(
                "db-x",
                "db",
                IpFamily::IPv4,
                vec![ep(&["10.0.0.8"], true, None)],
            )
        },
    ];
    // A pod holding one of the addresses makes it local.
    let pods = vec![pod("p", "default", "x", &["10.0.0.2"], true)];
    let plan = plan(&[s], &slices, &pods, &[]);
    assert_eq!(plan.len(), 2);
    let sql = plan.iter().find(|f| f.port == 5432).unwrap();
    assert_eq!(
        addrs(sql),
        vec![
            (ip("10.0.0.1"), 5432),
            (ip("10.0.0.2"), 5432),
            (ip("10.0.0.9"), 5432)
        ]
    );
    assert_eq!(sql.backends[0].node, "n1");
    assert_eq!(sql.backends[0].pod, "slice default/db-a");
    assert!(!sql.backends[0].local && sql.backends[1].local);
    // No slice port named "other": no backends.
    let other = plan.iter().find(|f| f.port == 7000).unwrap();
    assert!(other.backends.is_empty());
}

#[test]
fn backends_are_capped_and_the_cut_is_reported() {
    let pods: Vec<Pod> = (0..150u32)
        .map(|i| {
            let a = format!("10.0.{}.{}", i / 200, i % 200 + 1);
            pod(&format!("p{i}"), "default", "web", &[a.as_str()], true)
        })
        .collect();
    let (plan, cut) = plan_checked(&[svc("web", &["10.96.0.1"], "web")], &[], &pods, &[]);
    assert_eq!(plan[0].backends.len(), MAX_LB_BACKENDS_PER_SERVICE as usize);
    // The first ones in address order.
    assert_eq!(plan[0].backends[0].addr, ip("10.0.0.1"));
    assert_eq!(plan[0].backends[99].addr, ip("10.0.0.100"));
    assert_eq!(cut.len(), 1);
    assert_eq!(cut[0].backends, 150);
    assert_eq!(
        cut[0].to_string(),
        "service default/web frontend 10.96.0.1:80/TCP: 150 backends, only the first 100 are used"
    );
}

#[test]
fn the_plan_is_deterministic_and_sorted() {
    let pods = vec![
        pod("b", "default", "web", &["10.0.0.2"], true),
        pod("a", "default", "web", &["10.0.0.1"], true),
    ];
    let mut b = svc("b", &["10.96.0.2"], "web");
    b.ports = vec![
        port("z", PROTO_UDP, 53, TargetPort::Number(53)),
        port("y", PROTO_TCP, 53, TargetPort::Number(53)),
        port("x", PROTO_TCP, 1, TargetPort::Number(1)),
    ];
    let a = svc("a", &["10.96.0.1"], "web");
    let one = plan(&[b.clone(), a.clone()], &[], &pods, &[]);
    let mut reversed = pods.clone();
    reversed.reverse();
    let two = plan(&[a, b], &[], &reversed, &[]);
    assert_eq!(one, two);
    let order: Vec<_> = one
        .iter()
        .map(|f| (f.service.as_str(), f.port, f.proto))
        .collect();
    assert_eq!(
        order,
        vec![
            ("default/a", 80, PROTO_TCP),
            ("default/b", 1, PROTO_TCP),
            ("default/b", 53, PROTO_TCP),
            ("default/b", 53, PROTO_UDP),
        ]
    );
}

#[test]
fn ten_thousand_services_are_planned_quickly() {
    // 30 pods in 10 namespaces, 10,000 services of 3 backends each.
    let pods: Vec<Pod> = (0..30u32)
        .map(|i| {
            let a = format!("10.0.0.{}", i + 1);
            pod(
                &format!("p{i}"),
                &format!("ns{}", i % 10),
                "web",
                &[a.as_str()],
                i % 2 == 0,
            )
        })
        .collect();
    let services: Vec<Service> = (0..10_000u32)
        .map(|i| {
            let vip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
            Service {
                namespace: format!("ns{}", i % 10),
                ..svc(&format!("s{i}"), &[vip.as_str()], "web")
            }
        })
        .collect();
    let start = Instant::now();
    let plan = plan(&services, &[], &pods, &[]);
    let elapsed = start.elapsed();
    assert_eq!(plan.len(), 10_000);
    assert!(
        plan.iter().all(|f| f.backends.len() == 3),
        "three per namespace"
    );
    // Loose: the machine is shared with parallel builds (unloaded, well under 0.5 s).
    assert!(elapsed.as_secs_f64() < 3.0, "took {elapsed:?}");
}
