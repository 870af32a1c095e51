//! Privileged (root; skipped otherwise, with a message): one [`EbpfDatapath`] shared by
//! many threads. Endpoints attached at once all end up attached with their map entries,
//! and all detach cleanly; a bandwidth flag and policy flags written at once to one
//! endpoint both survive.
//!
//! Each test works in a network namespace and a pin directory of its own, removed on drop
//! (also when the test fails).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hypha_api::MacAddr;
use hypha_common::{ENDPOINT_F_INGRESS_LIMIT, ENDPOINT_F_INGRESS_POLICY, EndpointKey4};
use hypha_netlink::{Netlink, VethSpec};

use super::{EbpfDatapath, lock};
use crate::datapath::Datapath;
use crate::policy::PolicyDiff;
use crate::state::EndpointRecord;

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A network namespace and a bpffs pin directory, both with unique names, removed on drop.
struct Fixture {
    netns: String,
    pin_dir: PathBuf,
}

impl Fixture {
    fn new(what: &str) -> Self {
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

    fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// `n` veth pairs inside the namespace (both ends there), as endpoints.
    fn endpoints(&self, n: u8) -> Vec<EndpointRecord> {
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
                    address: Ipv4Addr::new(10, 99, 0, 10 + i),
                    pod_mac: MacAddr(p.mac),
                    host_mac: MacAddr(h.mac),
                    labels: Default::default(),
                    external_ipam: false,
                    bandwidth: None,
                    debug: false,
                    ports: Vec::new(),
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

    fn load(&self) -> EbpfDatapath {
        EbpfDatapath::load(&self.pin_dir, Ipv4Addr::new(10, 99, 0, 1))
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
fn endpoints_attached_from_many_threads_at_once_are_all_attached_then_all_detach() {
    require_root!();
    const N: u8 = 16;
    let fx = Fixture::new("attach");
    let eps = fx.endpoints(N);
    let dp = fx.load();

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

    for ep in &eps {
        // Both links pinned, attached to this veth, running the agent's programs; the
        // endpoint and its counters in the maps.
        assert_eq!(dp.check(ep), Vec::<String>::new(), "{}", ep.host_ifname);
        let key = EndpointKey4::from_octets(ep.address.octets());
        let info = lock(&dp.maps.endpoints)
            .get(&key, 0)
            .expect("endpoint entry");
        assert_eq!(
            (info.endpoint_id, info.ifindex, info.flags),
            (ep.id, ep.host_ifindex, ENDPOINT_F_INGRESS_POLICY)
        );
    }
    let pins = std::fs::read_dir(fx.pin_dir.join("links")).unwrap().count();
    assert_eq!(pins, 2 * usize::from(N), "two pinned links per endpoint");

    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = eps
            .iter()
            .map(|ep| {
                let dp = &dp;
                s.spawn(move || {
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
    for ep in &eps {
        let problems = dp.check(ep);
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&format!("has no entry for {}", ep.address))),
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
    let dp = fx.load();
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
    let key = EndpointKey4::from_octets(ep.address.octets());
    let info = lock(&dp.maps.endpoints)
        .get(&key, 0)
        .expect("endpoint entry");
    assert_eq!(
        info.flags,
        ENDPOINT_F_INGRESS_LIMIT | ENDPOINT_F_INGRESS_POLICY
    );
    assert!(dp.detach(ep).is_empty());
}
