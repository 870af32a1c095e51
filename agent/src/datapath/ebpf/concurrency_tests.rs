//! Privileged (root; skipped otherwise, with a message): one [`EbpfDatapath`] shared by
//! many threads. Endpoints attached at once all end up attached with their map entries,
//! and all detach cleanly; a bandwidth flag and policy flags written at once to one
//! endpoint both survive; an endpoint an older agent attached with TCX is converted to tc
//! filters on adopt.
//!
//! Each test works in a network namespace and a pin directory of its own, removed on drop
//! (also when the test fails).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hypha_api::MacAddr;
use hypha_common::{
    ENDPOINT_F_INGRESS_LIMIT, ENDPOINT_F_INGRESS_POLICY, ENDPOINT_F_IPV4, EndpointKey4,
};
use hypha_netlink::{Netlink, TcHook, VethSpec};

use super::{EbpfDatapath, lock};
use crate::config::AttachMode;
use crate::datapath::{Adoption, Datapath, link_info};
use crate::policy::PolicyDiff;
use crate::state::EndpointRecord;

pub(super) fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A network namespace and a bpffs pin directory, both with unique names, removed on drop.
pub(super) struct Fixture {
    netns: String,
    pub(super) pin_dir: PathBuf,
}

impl Fixture {
    pub(super) fn new(what: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let unique = format!("{what}-{}-{nanos}", std::process::id());
        let f = Self {
            netns: format!("hypha-t-{unique}"),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/hypha-test-{unique}")),
        };
        let out = Command::new("ip")
            .args(["netns", "add", &f.netns])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {}: {}",
            f.netns,
            String::from_utf8_lossy(&out.stderr)
        );
        f
    }

    pub(super) fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// `n` veth pairs inside the namespace (both ends there), as endpoints.
    pub(super) fn endpoints(&self, n: u8) -> Vec<EndpointRecord> {
        let ns = File::open(self.netns_path()).expect("open the test netns");
        let mut nl = Netlink::in_netns(&self.netns_path()).expect("netlink in the test netns");
        (0..n)
            .map(|i| {
                let host = format!("dpc{i}h");
                let peer = format!("dpc{i}p");
                nl.create_veth(&VethSpec {
                    host_name: &host,
                    peer_name: &peer,
                    peer_netns: std::os::fd::AsFd::as_fd(&ns),
                    mtu: None,
                    peer_mac: None,
                })
                .expect("create a veth pair");
                let h = nl.link_by_name(&host).unwrap().expect("host end");
                let p = nl.link_by_name(&peer).unwrap().expect("peer end");
                EndpointRecord {
                    id: 100 + u32::from(i),
                    container_id: format!("c{i}"),
                    ifname: "eth0".into(),
                    netns: self.netns_path().display().to_string(),
                    host_ifname: host,
                    host_ifindex: h.index,
                    address: Some(Ipv4Addr::new(10, 99, 0, 10 + i)),
                    pod_mac: MacAddr(p.mac),
                    host_mac: MacAddr(h.mac),
                    labels: Default::default(),
                    external_ipam: false,
                    bandwidth: None,
                    debug: false,
                    ports: Vec::new(),
                    address6: None,
                }
            })
            .collect()
    }

    /// Moves the calling thread into the namespace, where the endpoints' ifindexes mean
    /// what they say. For threads that end with their work.
    fn enter(&self) {
        let ns = File::open(self.netns_path()).expect("open the test netns");
        // SAFETY: setns on an open namespace fd; it moves this thread only.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// Runs `f` on a thread of its own inside the namespace and returns what it returns.
    pub(super) fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter();
                f()
            })
            .join()
            .expect("thread in the test netns")
        })
    }

    pub(super) fn load(&self, mode: AttachMode) -> EbpfDatapath {
        EbpfDatapath::load(
            &self.pin_dir,
            Ipv4Addr::new(10, 99, 0, 1),
            mode,
            hypha_common::fq::DEFAULT_QUEUES,
        )
        .expect("load the datapath (built with `cargo xtask build`?)")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        match Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => problems.push(format!(
                "ip netns del {}: {}",
                self.netns,
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => problems.push(format!("ip netns del {}: {e}", self.netns)),
        }
        if let Err(e) = std::fs::remove_dir_all(&self.pin_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("remove {}: {e}", self.pin_dir.display()));
        }
        for p in problems {
            eprintln!("cleanup: {p}");
        }
    }
}

macro_rules! require_root {
    () => {
        if !privileged() {
            eprintln!("skipped: {}:{} needs root", file!(), line!());
            return;
        }
    };
}

#[test]
fn endpoints_attached_with_tc_from_many_threads_at_once_are_all_attached_then_all_detach() {
    require_root!();
    attach_many_then_detach(AttachMode::Tc);
}

#[test]
fn endpoints_attached_with_tcx_from_many_threads_at_once_are_all_attached_then_all_detach() {
    require_root!();
    attach_many_then_detach(AttachMode::Tcx);
}

fn attach_many_then_detach(mode: AttachMode) {
    const N: u8 = 16;
    let fx = Fixture::new(&format!("attach-{mode}"));
    let eps = fx.endpoints(N);
    let dp = fx.load(mode);

    let started = Instant::now();
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = eps
            .iter()
            .map(|ep| {
                let (fx, dp) = (&fx, &dp);
                s.spawn(move || {
                    fx.enter();
                    dp.attach(ep, ENDPOINT_F_INGRESS_POLICY)
                        .err()
                        .map(|e| format!("{}: {e}", ep.host_ifname))
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("attach thread"))
            .collect()
    });
    eprintln!("{N} concurrent attaches took {:?}", started.elapsed());
    assert!(errors.is_empty(), "{errors:?}");

    let problems: Vec<Vec<String>> = std::thread::scope(|s| {
        let (fx, dp, eps) = (&fx, &dp, &eps);
        s.spawn(move || {
            fx.enter();
            eps.iter().map(|ep| dp.check(ep)).collect()
        })
        .join()
        .expect("check thread")
    });
    for (ep, problems) in eps.iter().zip(problems) {
        // Both filters on this veth, running the agent's programs; the endpoint and its
        // counters in the maps.
        assert_eq!(problems, Vec::<String>::new(), "{}", ep.host_ifname);
        let key = EndpointKey4::from_octets(ep.address.unwrap().octets());
        let info = lock(&dp.maps.endpoints)
            .v4
            .get(&key, 0)
            .expect("endpoint entry");
        assert_eq!(
            (info.endpoint_id, info.ifindex, info.flags),
            (
                ep.id,
                ep.host_ifindex,
                ENDPOINT_F_INGRESS_POLICY | ENDPOINT_F_IPV4
            )
        );
    }
    let pins = std::fs::read_dir(fx.pin_dir.join("links")).unwrap().count();
    match mode {
        AttachMode::Tc => assert_eq!(pins, 0, "no TCX link pinned"),
        AttachMode::Tcx => assert_eq!(pins, 2 * usize::from(N), "two pinned links per endpoint"),
    }

    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = eps
            .iter()
            .map(|ep| {
                let (fx, dp) = (&fx, &dp);
                s.spawn(move || {
                    fx.enter();
                    dp.detach(ep)
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("detach thread"))
            .collect()
    });
    assert!(errors.is_empty(), "{errors:?}");
    let left: Vec<_> = std::fs::read_dir(fx.pin_dir.join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "pins left after detach: {left:?}");
    let mut nl = Netlink::in_netns(&fx.netns_path()).expect("netlink in the test netns");
    let problems: Vec<Vec<String>> = std::thread::scope(|s| {
        let (fx, dp, eps) = (&fx, &dp, &eps);
        s.spawn(move || {
            fx.enter();
            eps.iter().map(|ep| dp.check(ep)).collect()
        })
        .join()
        .expect("check thread")
    });
    for (ep, problems) in eps.iter().zip(problems) {
        for hook in [TcHook::Ingress, TcHook::Egress] {
            assert_eq!(
                nl.bpf_filters(ep.host_ifindex, hook).unwrap(),
                Vec::new(),
                "no filter left on {}",
                ep.host_ifname
            );
        }
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&format!("has no entry for {}", ep.address.unwrap()))),
            "{problems:?}"
        );
        assert_eq!(lock(&dp.maps.ep_stats).keys().count(), 0, "counters left");
    }
}

#[test]
fn a_bandwidth_flag_and_policy_flags_written_at_once_both_survive() {
    require_root!();
    let fx = Fixture::new("flags");
    let eps = fx.endpoints(1);
    let ep = &eps[0];
    let dp = fx.load(AttachMode::Tc);
    std::thread::scope(|s| {
        let (fx, dp) = (&fx, &dp);
        s.spawn(move || {
            fx.enter();
            dp.attach(ep, 0).expect("attach");
        });
    });
    const ROUNDS: usize = 300;
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..ROUNDS {
                // Ends with the limit bit set.
                let on = if i % 2 == 0 {
                    0
                } else {
                    ENDPOINT_F_INGRESS_LIMIT
                };
                dp.set_flags(ep, ENDPOINT_F_INGRESS_LIMIT, on)
                    .expect("set_flags");
            }
        });
        s.spawn(|| {
            for i in 0..ROUNDS {
                // Ends with the ingress policy bit set.
                let flags = if i % 2 == 0 {
                    0
                } else {
                    ENDPOINT_F_INGRESS_POLICY
                };
                let diff = PolicyDiff {
                    flags_set: vec![(ep.id, flags)],
                    ..Default::default()
                };
                dp.apply_policy(&diff).expect("apply_policy");
            }
        });
    });
    let key = EndpointKey4::from_octets(ep.address.unwrap().octets());
    let endpoints = lock(&dp.maps.endpoints);
    let info = endpoints.v4.get(&key, 0).expect("endpoint entry");
    let iface = endpoints
        .ifaces
        .get(&ep.host_ifindex, 0)
        .expect("iface entry");
    drop(endpoints);
    let want = ENDPOINT_F_INGRESS_LIMIT | ENDPOINT_F_INGRESS_POLICY | ENDPOINT_F_IPV4;
    assert_eq!((info.flags, iface.flags), (want, want));
    std::thread::scope(|s| {
        let (fx, dp) = (&fx, &dp);
        s.spawn(move || {
            fx.enter();
            let errors = dp.detach(ep);
            assert!(errors.is_empty(), "{errors:?}");
        });
    });
}

#[test]
fn an_endpoint_an_older_agent_attached_with_tcx_is_converted_to_tc_filters_on_adopt() {
    require_root!();
    let fx = Fixture::new("convert");
    let eps = fx.endpoints(1);
    let ep = &eps[0];
    let dp = fx.load(AttachMode::Tc);
    // As agents before tc left it: a pinned TCX link per hook, running this object's
    // programs, and the endpoint in the maps.
    let pins: Vec<PathBuf> = dp
        .programs
        .iter()
        .map(|p| dp.link_pin(ep.host_ifindex, p.hook))
        .collect();
    std::thread::scope(|s| {
        let (fx, dp, pins) = (&fx, &dp, &pins);
        s.spawn(move || {
            fx.enter();
            for (prog, pin) in dp.programs.iter().zip(pins) {
                let attach_type = match prog.tc_hook {
                    TcHook::Ingress => link_info::BPF_TCX_INGRESS,
                    TcHook::Egress => link_info::BPF_TCX_EGRESS,
                };
                let link = link_info::tcx_attach(prog.fd.as_fd(), ep.host_ifindex, attach_type)
                    .expect("TCX attach");
                link_info::pin(link.as_fd(), pin).expect("pin the link");
            }
        });
    });
    for pin in &pins {
        let link = link_info::read(pin).expect("read the pinned link");
        assert_eq!(link.link_type, link_info::BPF_LINK_TYPE_TCX);
        assert_eq!(link.ifindex, ep.host_ifindex, "attached before the adopt");
    }
    dp.fill_maps(ep, 0).expect("the older agent's map entries");

    let adoption = fx.in_netns(|| dp.adopt(ep, 0)).expect("adopt");
    assert_eq!(adoption, Adoption::Adopted, "it was attached, by TCX");
    for pin in &pins {
        assert!(!pin.exists(), "{} removed", pin.display());
    }
    // Now as tc filters running the agent's programs (the check lists the filters in the
    // calling thread's namespace).
    let problems = std::thread::scope(|s| {
        let (fx, dp) = (&fx, &dp);
        s.spawn(move || {
            fx.enter();
            dp.check(ep)
        })
        .join()
        .expect("check thread")
    });
    assert_eq!(problems, Vec::<String>::new());
}

#[test]
fn an_endpoint_attached_with_tc_is_converted_to_tcx_links_on_adopt_in_tcx_mode() {
    require_root!();
    let fx = Fixture::new("to-tcx");
    let eps = fx.endpoints(1);
    let ep = &eps[0];
    let in_netns = |f: &(dyn Fn() + Sync)| fx.in_netns(f);
    let tc = fx.load(AttachMode::Tc);
    in_netns(&|| tc.attach(ep, 0).expect("attach with tc"));
    drop(tc);
    // A restart in TCX mode (the filters hold the old agent's programs meanwhile).
    let dp = fx.load(AttachMode::Tcx);
    let adoption = fx.in_netns(|| dp.adopt(ep, 0).map_err(|e| e.to_string()));
    assert_eq!(adoption, Ok(Adoption::Adopted), "it was attached, by tc");
    for prog in &dp.programs {
        let link = link_info::read(&dp.link_pin(ep.host_ifindex, prog.hook)).expect("pinned link");
        assert_eq!(link.link_type, link_info::BPF_LINK_TYPE_TCX);
        assert_eq!(link.ifindex, ep.host_ifindex);
        assert_eq!(link.prog_id, prog.id, "the new agent's {}", prog.name);
    }
    let mut nl = Netlink::in_netns(&fx.netns_path()).expect("netlink in the test netns");
    for hook in [TcHook::Ingress, TcHook::Egress] {
        assert_eq!(
            nl.bpf_filters(ep.host_ifindex, hook).unwrap(),
            Vec::new(),
            "the tc filters are gone"
        );
    }
    in_netns(&|| assert_eq!(dp.check(ep), Vec::<String>::new()));
    in_netns(&|| {
        assert_eq!(
            dp.detach(ep)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            Vec::<String>::new()
        )
    });
}

#[test]
fn sweep_removes_the_tc_filters_and_tcx_links_of_endpoints_nobody_owns() {
    require_root!();
    let fx = Fixture::new("sweep");
    let eps = fx.endpoints(2);
    let (tc_ep, tcx_ep) = (&eps[0], &eps[1]);
    let in_netns = |f: &(dyn Fn() + Sync)| fx.in_netns(f);
    // Orphans of both kinds, as agents in either mode could leave them.
    let tcx = fx.load(AttachMode::Tcx);
    in_netns(&|| tcx.attach(tcx_ep, 0).expect("attach with TCX"));
    drop(tcx);
    let dp = fx.load(AttachMode::Tc);
    in_netns(&|| dp.attach(tc_ep, 0).expect("attach with tc"));
    in_netns(&|| {
        let errors: Vec<String> = dp.sweep(&[]).iter().map(ToString::to_string).collect();
        assert_eq!(errors, Vec::<String>::new());
    });
    let mut nl = Netlink::in_netns(&fx.netns_path()).expect("netlink in the test netns");
    for ep in &eps {
        for hook in [TcHook::Ingress, TcHook::Egress] {
            assert_eq!(
                nl.bpf_filters(ep.host_ifindex, hook).unwrap(),
                Vec::new(),
                "no filter left on {}",
                ep.host_ifname
            );
        }
    }
    let left: Vec<_> = std::fs::read_dir(fx.pin_dir.join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "pins left after sweep: {left:?}");
}
