//! The service control plane's diff and ids, over the fake datapath: what the maps hold
//! after each change, that only what changed is written, and that ids are kept, freed
//! and reused.

use std::collections::BTreeSet;
use std::net::IpAddr;

use hypha_common::lb::{LB_F_AFFINITY, LB_SCOPE_EXTERNAL, LB_SCOPE_INTERNAL};

use super::*;
use crate::datapath::fake::FakeDatapath;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn backend(addr: &str, port: u16) -> service::Backend {
    service::Backend {
        addr: ip(addr),
        port,
        node: String::new(),
        local: true,
        pod: format!("pod-{addr}"),
    }
}

fn frontend(service: &str, vip: &str, port: u16, backends: &[(&str, u16)]) -> Frontend {
    Frontend {
        service: service.into(),
        port_name: String::new(),
        addr: ip(vip),
        port,
        proto: PROTO_TCP,
        scope: LB_SCOPE_INTERNAL,
        flags: 0,
        affinity_timeout_s: 0,
        backends: backends.iter().map(|(a, p)| backend(a, *p)).collect(),
    }
}

fn empty_state() -> ServiceState {
    ServiceState::new(Vec::new(), Vec::new(), InstalledLb::default())
}

/// Diffs `plan` for `only` and writes it to `dp`.
fn program(
    st: &mut ServiceState,
    dp: &FakeDatapath,
    plan: Vec<Frontend>,
    only: Option<&[&str]>,
) -> LbDiff {
    let only: Option<BTreeSet<String>> = only.map(|o| o.iter().map(|s| s.to_string()).collect());
    let d = st.diff(plan, only.as_ref());
    assert!(dp.apply_lb(&d).is_empty());
    d
}

fn key(vip: &str, port: u16) -> LbFrontendKey {
    LbFrontendKey {
        addr: ip(vip),
        port,
        proto: PROTO_TCP,
        scope: LB_SCOPE_INTERNAL,
    }
}

#[test]
fn a_plan_becomes_frontends_backends_tables_and_counters() {
    let dp = FakeDatapath::default();
    let mut st = empty_state();
    let web = frontend(
        "default/web",
        "10.96.0.10",
        80,
        &[("10.244.0.2", 8080), ("10.244.0.3", 8080)],
    );
    let mut np = web.clone();
    np.addr = ip("192.168.1.5");
    np.port = 30080;
    np.scope = LB_SCOPE_EXTERNAL;
    np.flags = hypha_common::lb::LB_F_NODEPORT;
    let dns = frontend("kube-system/dns", "fd00:10:96::a", 53, &[("fd00::5", 53)]);
    program(&mut st, &dp, vec![web, np, dns], None);
    let fake = dp.state();
    assert_eq!(fake.lb.services.len(), 3);
    let v = fake.lb.services[&key("10.96.0.10", 80)];
    assert_eq!(v.count, 2);
    assert_ne!(v.id, 0);
    // The NodePort frontend shares the ClusterIP's backends (one id each).
    assert_eq!(fake.lb.backends.len(), 3, "{:?}", fake.lb.backends);
    assert_eq!(fake.lb_stats.len(), 3);
    let table = &fake.lb.maglev[&v.id];
    assert_eq!(table.len(), LB_MAGLEV_SIZE);
    let ids: BTreeSet<u32> = fake
        .lb
        .backends
        .iter()
        .filter(|(_, b)| b.port == 8080)
        .map(|(id, _)| *id)
        .collect();
    assert!(table.iter().all(|b| ids.contains(b)), "{ids:?}");
    let b = fake
        .lb
        .backends
        .values()
        .find(|b| b.addr == ip("fd00::5"))
        .unwrap();
    assert_eq!(
        (b.port, b.proto, b.flags),
        (53, PROTO_TCP, LB_BACKEND_F_LOCAL)
    );
}

#[test]
fn a_changed_service_writes_only_its_own_entries_and_frees_what_it_left() {
    let dp = FakeDatapath::default();
    let mut st = empty_state();
    let a = frontend(
        "ns/a",
        "10.96.0.1",
        80,
        &[("10.0.0.1", 80), ("10.0.0.2", 80)],
    );
    let b = frontend("ns/b", "10.96.0.2", 80, &[("10.0.0.3", 80)]);
    program(&mut st, &dp, vec![a, b.clone()], None);
    let before = dp.state().lb.clone();
    let gone_id = st
        .backend_ids
        .get(&(ip("10.0.0.2"), 80, PROTO_TCP))
        .unwrap();

    // Only a is re-planned: b is not even looked at.
    let a2 = frontend("ns/a", "10.96.0.1", 80, &[("10.0.0.1", 80)]);
    let d = program(&mut st, &dp, vec![a2], Some(&["ns/a"]));
    assert_eq!(d.services_set.len(), 1, "{d:?}");
    assert_eq!(d.maglev_set.len(), 1);
    assert!(d.backends_set.is_empty(), "10.0.0.1 is unchanged: {d:?}");
    assert_eq!(d.backends_del, vec![(gone_id, before.backends[&gone_id])]);
    let fake = dp.state();
    assert_eq!(fake.lb.services[&key("10.96.0.1", 80)].count, 1);
    assert_eq!(
        fake.lb.services[&key("10.96.0.2", 80)],
        before.services[&key("10.96.0.2", 80)]
    );
    assert!(
        !fake.lb_stats.contains_key(&gone_id),
        "its counters go with it"
    );
    drop(fake);

    // The same plan again writes nothing.
    let a2 = frontend("ns/a", "10.96.0.1", 80, &[("10.0.0.1", 80)]);
    assert!(program(&mut st, &dp, vec![a2], Some(&["ns/a"])).is_empty());
    // The freed backend id is the next one given.
    let c = frontend("ns/c", "10.96.0.3", 80, &[("10.0.0.9", 80)]);
    program(&mut st, &dp, vec![c], Some(&["ns/c"]));
    assert_eq!(
        st.backend_ids.get(&(ip("10.0.0.9"), 80, PROTO_TCP)),
        Some(gone_id)
    );
}

#[test]
fn a_frontend_without_backends_refuses_and_a_removed_service_leaves_nothing() {
    let dp = FakeDatapath::default();
    let mut st = empty_state();
    let mut a = frontend("ns/a", "10.96.0.1", 80, &[("10.0.0.1", 80)]);
    a.flags = LB_F_AFFINITY;
    a.affinity_timeout_s = 10;
    program(&mut st, &dp, vec![a.clone()], None);
    let id = dp.state().lb.services[&key("10.96.0.1", 80)].id;

    a.backends.clear();
    let d = program(&mut st, &dp, vec![a], Some(&["ns/a"]));
    assert_eq!(d.maglev_del, vec![id]);
    {
        let fake = dp.state();
        let v = fake.lb.services[&key("10.96.0.1", 80)];
        assert_eq!((v.id, v.count), (id, 0), "refuses, same id");
        assert!(fake.lb.maglev.is_empty() && fake.lb.backends.is_empty());
    }

    let d = program(&mut st, &dp, Vec::new(), Some(&["ns/a"]));
    assert_eq!(d.affinity_del, vec![id], "a gone frontend's affinities go");
    let fake = dp.state();
    assert_eq!(fake.lb, InstalledLb::default());
    assert!(fake.lb_stats.is_empty());
    assert!(st.installed.is_empty() && st.backends.is_empty() && st.by_service.is_empty());
    assert_eq!((st.service_ids.in_use(), st.backend_ids.in_use()), (0, 0));
}

#[test]
fn ids_freed_in_a_diff_are_not_reused_by_the_same_diff() {
    let dp = FakeDatapath::default();
    let mut st = empty_state();
    program(
        &mut st,
        &dp,
        vec![frontend("ns/a", "10.96.0.1", 80, &[("10.0.0.1", 80)])],
        None,
    );
    // a goes and b comes in one diff: b must not get a's ids, whose removal comes after
    // b's writes.
    let d = program(
        &mut st,
        &dp,
        vec![frontend("ns/b", "10.96.0.2", 80, &[("10.0.0.2", 80)])],
        Some(&["ns/a", "ns/b"]),
    );
    let new_id = d.services_set[0].1.id;
    assert!(!d.maglev_del.contains(&new_id), "{d:?}");
    assert_eq!(dp.state().lb.services.len(), 1);
    assert!(dp.state().lb.maglev.contains_key(&new_id));
    // Now they are free again.
    program(
        &mut st,
        &dp,
        vec![frontend("ns/c", "10.96.0.3", 80, &[("10.0.0.3", 80)])],
        Some(&["ns/c"]),
    );
    assert_eq!(st.service_ids.get(&key("10.96.0.3", 80)), Some(1));
}

#[test]
fn a_restarted_agent_keeps_every_id_and_rewrites_nothing() {
    let dp = FakeDatapath::default();
    let mut st = empty_state();
    let plan = || {
        vec![
            frontend(
                "ns/a",
                "10.96.0.1",
                80,
                &[("10.0.0.1", 80), ("10.0.0.2", 80)],
            ),
            frontend("ns/b", "10.96.0.2", 443, &[("10.0.0.2", 443)]),
        ]
    };
    // Ids that are not the first ones: a gap from a removed service.
    program(
        &mut st,
        &dp,
        vec![frontend("ns/y", "10.96.0.8", 80, &[("10.0.0.8", 80)])],
        None,
    );
    let mut with_z = plan();
    with_z.push(frontend("ns/z", "10.96.0.9", 80, &[("10.0.0.9", 80)]));
    program(&mut st, &dp, with_z, None);
    let before = dp.state().lb.clone();

    let mut restarted = ServiceState::new(Vec::new(), Vec::new(), dp.installed_lb().unwrap());
    let d = restarted.diff(plan(), None);
    assert!(dp.apply_lb(&d).is_empty());
    assert!(
        d.services_set.is_empty() && d.maglev_set.is_empty() && d.backends_set.is_empty(),
        "{d:?}"
    );
    // What only z had is removed: its frontend, table and backend.
    assert_eq!(d.services_del, vec![key("10.96.0.9", 80)]);
    assert_eq!(d.backends_del.len(), 1);
    let after = dp.state().lb.clone();
    for k in [key("10.96.0.1", 80), key("10.96.0.2", 443)] {
        assert_eq!(after.services[&k], before.services[&k]);
    }
    // A change after the restart touches only the changed frontend.
    let mut changed = plan();
    changed[1].backends.push(backend("10.0.0.1", 443));
    let d = restarted.diff(changed, Some(&BTreeSet::from(["ns/b".to_owned()])));
    assert_eq!(d.services_set.len(), 1);
    assert_eq!(d.backends_set.len(), 1);
}

#[test]
fn ten_thousand_services_are_planned_quickly_and_one_change_touches_one() {
    let dp = FakeDatapath::default();
    let mut st = empty_state();
    let plan: Vec<Frontend> = (0..10_000u32)
        .map(|i| {
            let vip = std::net::Ipv4Addr::from(0x0a60_0000 + i + 1).to_string();
            let pods: Vec<(String, u16)> = (0..3)
                .map(|j| {
                    let a = std::net::Ipv4Addr::from(0x0af4_0000 + i * 3 + j + 1);
                    (a.to_string(), 8080)
                })
                .collect();
            let pods: Vec<(&str, u16)> = pods.iter().map(|(a, p)| (a.as_str(), *p)).collect();
            frontend(&format!("ns/s{i}"), &vip, 80, &pods)
        })
        .collect();
    let changed = plan[42].clone();
    let started = Instant::now();
    let d = program(&mut st, &dp, plan, None);
    let took = started.elapsed();
    assert_eq!(d.services_set.len(), 10_000);
    assert_eq!(d.backends_set.len(), 30_000);
    assert_eq!(dp.state().lb.maglev.len(), 10_000);
    // The targets are for a release build (2 s for all, 20 ms for one change, with the
    // kernel's maps); a debug build on a busy machine gets far more room.
    let slow = if cfg!(debug_assertions) { 60 } else { 1 };
    assert!(took.as_secs_f64() < 2.0 * slow as f64, "{took:?}");

    let mut one = changed;
    one.backends.pop();
    let started = Instant::now();
    let d = program(&mut st, &dp, vec![one], Some(&["ns/s42"]));
    assert!(
        started.elapsed().as_secs_f64() < 0.02 * slow as f64,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        (
            d.services_set.len(),
            d.maglev_set.len(),
            d.backends_del.len()
        ),
        (1, 1, 1)
    );
}

fn stored(name: &str, ip: &str) -> StoredService {
    StoredService {
        service: Service {
            namespace: "default".into(),
            name: name.into(),
            kind: ServiceType::NodePort,
            cluster_ips: vec![self::ip(ip)],
            ip_families: vec![service::IpFamily::IPv4],
            ip_family_policy: service::IpFamilyPolicy::SingleStack,
            ports: vec![service::ServicePort {
                name: "http".into(),
                protocol: PROTO_TCP,
                port: 80,
                target_port: TargetPort::Name("web".into()),
                node_port: Some(30080),
            }],
            selector: Some([("app".to_owned(), "web".to_owned())].into()),
            session_affinity: Some(60),
            external_local: true,
            internal_local: false,
        },
        origin: PolicyOrigin::Api("web.yaml".into()),
    }
}

#[test]
fn services_and_slices_survive_a_restart_of_the_state_store() {
    use crate::state::{Persist as _, StateStore};
    let dir = tempfile::tempdir().unwrap();
    let web = stored("web", "10.96.0.10");
    let slice = StoredSlice {
        slice: EndpointSlice {
            namespace: "default".into(),
            name: "ext-1".into(),
            service: "ext".into(),
            family: service::IpFamily::IPv4,
            endpoints: vec![service::SliceEndpoint {
                addresses: vec![ip("192.0.2.7")],
                ready: true,
                node: None,
            }],
            ports: vec![service::SlicePort {
                name: String::new(),
                protocol: PROTO_TCP,
                port: 443,
            }],
        },
        origin: PolicyOrigin::Dir("/etc/hypha/ext.yaml".into()),
    };
    {
        let store = StateStore::open(dir.path()).unwrap();
        store
            .submit(vec![
                Change::Service(stored("gone", "10.96.0.11")),
                Change::Service(web.clone()),
                Change::Slice(slice.clone()),
                Change::ServiceGone {
                    namespace: "default".into(),
                    name: "gone".into(),
                },
            ])
            .wait()
            .unwrap();
    }
    let state = StateStore::open(dir.path()).unwrap().load().unwrap();
    assert_eq!(state.services, vec![web.clone()]);
    assert_eq!(state.slices, vec![slice.clone()]);
    // The in-memory meaning of the changes is the same.
    let mut mem = crate::state::PersistedState::default();
    for c in crate::state::changes_between(&crate::state::PersistedState::default(), &state) {
        crate::state::apply(&mut mem, &c);
    }
    assert_eq!((mem.services, mem.slices), (vec![web], vec![slice]));
}

#[test]
fn a_restarted_state_takes_its_allocation_back_and_unknown_deletes_are_404() {
    let st = ServiceState::new(
        vec![stored("web", "10.96.0.10")],
        Vec::new(),
        InstalledLb::default(),
    );
    assert_eq!(st.taken.ips[&ip("10.96.0.10")], "default/web");
    assert_eq!(st.taken.node_ports[&(PROTO_TCP, 30080)], "default/web");

    let (agent, _, _) = super::super::tests::start(
        super::super::tests::host_with(&[]),
        crate::state::PersistedState::default(),
        FakeDatapath::default(),
    );
    let err = agent.delete_service("default", "nope").unwrap_err();
    assert_eq!(err.http_status(), 404);
    assert!(err.to_string().contains("default/nope"), "{err}");
    assert!(agent.list_services().is_empty());
    assert_eq!(
        agent.service_of_backend(ip("10.0.0.1"), 80, PROTO_TCP),
        None
    );
    assert!(
        agent.service_metrics().contains("hypha_services 0"),
        "{}",
        agent.service_metrics()
    );
}

/// `n` ClusterIP services `svc-0`.. as one file, each on `port`, the first `fixed` of them
/// asking for 10.96.1.i.
fn services_file(n: u32, port: u16, fixed: u32) -> hypha_api::PolicySource {
    let doc = |i: u32| {
        let ip = if i < fixed {
            format!("  clusterIP: 10.96.1.{i}\n")
        } else {
            String::new()
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: default\nspec:\n{ip}  selector:\n    app: web\n  ports:\n  - port: {port}\n    targetPort: 8080\n"
        )
    };
    hypha_api::PolicySource {
        source: "services.yaml".to_owned(),
        content: (0..n).map(doc).collect::<Vec<_>>().join("---\n"),
    }
}

#[test]
fn the_allocation_index_stays_current_through_applies_updates_and_deletes() {
    // Out of date, `assign` scans every address for every service: 10,000 services took
    // seconds instead of milliseconds.
    let (agent, _, _) = super::super::tests::start(
        super::super::tests::host_with(&[]),
        crate::state::PersistedState::default(),
        FakeDatapath::default(),
    );
    let check = |what: &str, services: usize| {
        let st = agent.service_state();
        assert!(st.taken.in_sync(), "{what}: the allocation index is stale");
        assert_eq!(st.taken.ips.len(), services, "{what}: {:?}", st.taken.ips);
    };
    agent.apply_services(&[services_file(50, 80, 5)]).unwrap();
    check("first apply", 50);
    // The same services again on another port: each keeps its address.
    let before = agent.service_state().taken.ips.clone();
    agent.apply_services(&[services_file(50, 81, 5)]).unwrap();
    check("update", 50);
    assert_eq!(agent.service_state().taken.ips, before);
    agent.delete_service("default", "svc-3").unwrap();
    agent.delete_service("default", "svc-40").unwrap();
    check("deletes", 48);
    // The freed requested address can be taken by a new service.
    let mut file = services_file(1, 80, 0);
    file.content = file
        .content
        .replace("svc-0", "other")
        .replace("spec:\n", "spec:\n  clusterIP: 10.96.1.3\n");
    agent.apply_services(&[file]).unwrap();
    check("a new service on a freed address", 49);
    assert_eq!(
        agent.service_state().taken.ips[&ip("10.96.1.3")],
        "default/other"
    );
    // A file refused half-way (its second service asks for an address outside the
    // service CIDR) leaves the allocation as it was, though its first service moved and a
    // new one had taken an address.
    let before = agent.service_state().taken.ips.clone();
    let bad = hypha_api::PolicySource {
        source: "bad.yaml".to_owned(),
        content: format!(
            "{}---\n{}---\n{}",
            services_file(1, 80, 0)
                .content
                .replace("svc-0", "brand-new"),
            services_file(1, 80, 0)
                .content
                .replace("spec:\n", "spec:\n  clusterIP: 10.96.1.200\n"),
            services_file(1, 80, 0)
                .content
                .replace("svc-0", "svc-1")
                .replace("spec:\n", "spec:\n  clusterIP: 192.0.2.1\n"),
        ),
    };
    let err = agent.apply_services(&[bad]).unwrap_err();
    assert!(err.to_string().contains("192.0.2.1"), "{err}");
    check("a refused file", 49);
    assert_eq!(agent.service_state().taken.ips, before);
}
