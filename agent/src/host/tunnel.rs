//! The Linux side of cross-node traffic: the node's VXLAN device and the routes Hypha
//! owns to other nodes' pods (route protocol [`RTPROT_HYPHA`]), for
//! [`super::LinuxHost`]'s `ensure_vxlan` and `set_cluster_routes`.

use std::collections::BTreeSet;
use std::path::Path;

use hypha_netlink::{
    AddrGenMode, Link, Netlink, RTPROT_HYPHA, RouteTarget, TaggedRoute, VxlanInfo,
};

use super::{ClusterRoute, HostError, VxlanSpec};

/// Creates the VXLAN device `spec` names, or takes over the one an earlier agent made
/// (a device in external mode on the same port), then gives it `spec.mtu`, no ARP, IPv6
/// on (without a link-local address), and sets it up. A device in external mode on another port is made anew (the kernel
/// cannot change a VXLAN device's port); a device of that name that is anything else is
/// someone else's, and refused.
pub(super) fn ensure_vxlan(nl: &mut Netlink, spec: &VxlanSpec) -> Result<Link, HostError> {
    let existing = match nl.link_by_name(&spec.name)? {
        Some(link) => {
            let info = nl.vxlan(link.index)?;
            match takeover(&link, info, spec)? {
                Takeover::Keep => Some(link),
                Takeover::Recreate => {
                    tracing::info!(
                        device = %spec.name,
                        port = spec.port,
                        "re-creating the VXLAN device: it listens on another UDP port"
                    );
                    nl.delete_link(link.index)?;
                    None
                }
            }
        }
        None => None,
    };
    let link = match existing {
        Some(link) => link,
        None => {
            nl.create_vxlan(&hypha_netlink::VxlanSpec {
                name: &spec.name,
                port: spec.port,
                mtu: Some(spec.mtu),
            })?;
            let link = find(nl, &spec.name)?;
            // No link-local address (and so no multicast listener reports) on a device
            // whose every packet the eBPF programs route: set before it comes up, when
            // the kernel would make one. Without IPv6 in the kernel there is nothing to
            // switch off.
            if Path::new("/proc/sys/net/ipv6").exists() {
                nl.set_addr_gen_mode(link.index, AddrGenMode::None)?;
            }
            link
        }
    };
    // IPv6 on, whatever the namespace's default for new devices: the kernel refuses
    // IPv6 routes through a device with IPv6 off.
    let conf = Path::new("/proc/sys/net/ipv6/conf").join(&spec.name);
    if conf.exists() {
        super::write_sysctl(conf.join("disable_ipv6"), "0")?;
    }
    // A route's MTU (`ip route ... mtu N`) counts for forwarding: the datapath asks
    // the kernel (`bpf_fib_lookup`) whether a pod's packet fits the path to a peer
    // node, and the kernel answers with the route's MTU only with this on (or locked).
    super::write_sysctl("/proc/sys/net/ipv4/ip_forward_use_pmtu", "1")?;
    if link.mtu != spec.mtu {
        nl.set_mtu(link.index, spec.mtu)?;
    }
    if !nl.vxlan(link.index)?.is_some_and(|v| v.noarp) {
        nl.set_noarp(link.index)?;
    }
    if !link.up {
        nl.set_up(link.index)?;
    }
    find(nl, &spec.name)
}

fn find(nl: &mut Netlink, name: &str) -> Result<Link, HostError> {
    nl.link_by_name(name)?.ok_or_else(|| {
        HostError::Netlink(hypha_netlink::Error::LinkNotFound {
            link: name.to_owned(),
            netns: "the agent's network namespace".into(),
        })
    })
}

/// What to do with an existing interface named as the tunnel device.
#[derive(Debug, PartialEq, Eq)]
enum Takeover {
    Keep,
    Recreate,
}

/// Whether `link` (with its VXLAN settings, `None` when it is no VXLAN device) is a
/// device Hypha made, and so can be taken over.
fn takeover(link: &Link, info: Option<VxlanInfo>, spec: &VxlanSpec) -> Result<Takeover, HostError> {
    match info {
        Some(v) if v.collect_metadata && v.port == spec.port => Ok(Takeover::Keep),
        Some(v) if v.collect_metadata => Ok(Takeover::Recreate),
        Some(v) => Err(HostError::NotOurVxlan {
            name: spec.name.clone(),
            found: format!(
                "a VXLAN device with fixed VNI {} on UDP port {}",
                v.vni.unwrap_or(0),
                v.port
            ),
        }),
        None => Err(HostError::NotOurVxlan {
            name: spec.name.clone(),
            found: match &link.kind {
                Some(kind) => format!("a {kind} device"),
                None => "a device of no kind (physical or loopback)".to_owned(),
            },
        }),
    }
}

/// The netlink route of a cluster route, Hypha's protocol number on it.
pub(super) fn tagged(route: &ClusterRoute) -> TaggedRoute {
    match *route {
        ClusterRoute::Device { dst, ifindex, src } => TaggedRoute {
            dst: dst.trunc(),
            target: RouteTarget::Device { oif: ifindex, src },
            protocol: RTPROT_HYPHA,
        },
        ClusterRoute::Via { dst, gateway } => TaggedRoute {
            dst: dst.trunc(),
            target: RouteTarget::Gateway(gateway),
            protocol: RTPROT_HYPHA,
        },
    }
}

/// What to change to go from the routes of Hypha's protocol there are (`have`) to those
/// wanted (`want`).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct RoutePlan {
    /// Added, or replacing the route to the same destination (`NLM_F_REPLACE`).
    pub put: Vec<TaggedRoute>,
    /// Routes to destinations no longer wanted.
    pub delete: Vec<TaggedRoute>,
}

/// Plans [`super::HostNetwork::set_cluster_routes`]: wanted routes not there as they are
/// get put (a route to the same destination is replaced in place, so traffic there never
/// lacks a route), and routes to destinations nobody wants any more are deleted. Of two
/// wanted routes to one destination the first counts.
pub(super) fn plan(want: &[TaggedRoute], have: &[TaggedRoute]) -> RoutePlan {
    let mut seen = BTreeSet::new();
    let want: Vec<&TaggedRoute> = want.iter().filter(|r| seen.insert(r.dst)).collect();
    RoutePlan {
        put: want
            .iter()
            .filter(|r| !have.contains(r))
            .map(|r| (*r).clone())
            .collect(),
        delete: have
            .iter()
            .filter(|r| !seen.contains(&r.dst))
            .cloned()
            .collect(),
    }
}

/// Makes the routes of Hypha's protocol exactly `routes`; goes on past a failing route
/// and reports every failure, each naming its route.
pub(super) fn set_cluster_routes(
    nl: &mut Netlink,
    routes: &[ClusterRoute],
) -> Result<(), HostError> {
    let want: Vec<TaggedRoute> = routes.iter().map(tagged).collect();
    let have = nl.tagged_routes(RTPROT_HYPHA)?;
    let plan = plan(&want, &have);
    let mut errors = Vec::new();
    for route in &plan.put {
        if let Err(e) = nl.replace_tagged_route(route) {
            errors.push(e);
        }
    }
    for route in &plan.delete {
        if let Err(e) = nl.delete_tagged_route(route) {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(HostError::ClusterRoutes(errors))
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn dev(dst: &str, oif: u32, src: Option<&str>) -> TaggedRoute {
        TaggedRoute {
            dst: dst.parse().unwrap(),
            target: RouteTarget::Device {
                oif,
                src: src.map(|s| s.parse().unwrap()),
            },
            protocol: RTPROT_HYPHA,
        }
    }

    fn via(dst: &str, gw: &str) -> TaggedRoute {
        TaggedRoute {
            dst: dst.parse().unwrap(),
            target: RouteTarget::Gateway(gw.parse().unwrap()),
            protocol: RTPROT_HYPHA,
        }
    }

    #[test]
    fn cluster_routes_become_routes_of_hypha_s_protocol() {
        let src: IpAddr = "10.244.1.1".parse().unwrap();
        assert_eq!(
            tagged(&ClusterRoute::Device {
                // Not the network address: the kernel keeps the network.
                dst: "10.244.7.7/16".parse().unwrap(),
                ifindex: 9,
                src: Some(src),
            }),
            dev("10.244.0.0/16", 9, Some("10.244.1.1"))
        );
        assert_eq!(
            tagged(&ClusterRoute::Via {
                dst: "fd00:10:244:2::/64".parse().unwrap(),
                gateway: "fd00:50::3".parse().unwrap(),
            }),
            via("fd00:10:244:2::/64", "fd00:50::3")
        );
    }

    #[test]
    fn the_plan_adds_the_missing_replaces_the_different_and_deletes_the_stale() {
        let have = vec![
            dev("10.244.0.0/16", 9, Some("10.244.1.1")),
            via("10.245.2.0/24", "192.168.50.3"),
            via("10.245.3.0/24", "192.168.50.4"),
        ];
        let want = vec![
            // Kept as it is.
            dev("10.244.0.0/16", 9, Some("10.244.1.1")),
            // Moved to another gateway: replaced, not deleted.
            via("10.245.2.0/24", "192.168.50.5"),
            // New.
            dev("fd00:10:244::/56", 9, Some("fd00:10:244:1::1")),
            // A second route to a destination already wanted: ignored.
            via("fd00:10:244::/56", "fd00:50::9"),
        ];
        assert_eq!(
            plan(&want, &have),
            RoutePlan {
                put: vec![
                    via("10.245.2.0/24", "192.168.50.5"),
                    dev("fd00:10:244::/56", 9, Some("fd00:10:244:1::1")),
                ],
                delete: vec![via("10.245.3.0/24", "192.168.50.4")],
            }
        );
        assert_eq!(plan(&have, &have), RoutePlan::default(), "nothing to do");
        assert_eq!(
            plan(&[], &have),
            RoutePlan {
                put: vec![],
                delete: have.clone()
            }
        );
    }

    fn link(kind: Option<&str>) -> Link {
        Link {
            index: 4,
            name: "hypha_vxlan".into(),
            mac: [0; 6],
            mtu: 1450,
            up: true,
            kind: kind.map(str::to_owned),
            addr_gen_mode: None,
        }
    }

    fn vxlan(collect_metadata: bool, port: u16) -> VxlanInfo {
        VxlanInfo {
            collect_metadata,
            port,
            learning: false,
            vni: (!collect_metadata).then_some(1),
            noarp: true,
        }
    }

    #[test]
    fn only_hypha_s_kind_of_device_is_taken_over() {
        let spec = VxlanSpec {
            name: "hypha_vxlan".into(),
            port: 8472,
            mtu: 1450,
        };
        let vx = link(Some("vxlan"));
        assert_eq!(
            takeover(&vx, Some(vxlan(true, 8472)), &spec).unwrap(),
            Takeover::Keep
        );
        assert_eq!(
            takeover(&vx, Some(vxlan(true, 4789)), &spec).unwrap(),
            Takeover::Recreate
        );
        let err = takeover(&vx, Some(vxlan(false, 8472)), &spec).unwrap_err();
        assert_eq!(
            err.to_string(),
            "interface hypha_vxlan exists and is a VXLAN device with fixed VNI 1 on UDP port 8472, not one in external mode made by Hypha: delete it or choose another --tunnel-device"
        );
        let err = takeover(&link(Some("veth")), None, &spec).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("interface hypha_vxlan exists and is a veth device, not"),
            "{err}"
        );
        let err = takeover(&link(None), None, &spec).unwrap_err();
        assert!(err.to_string().contains("a device of no kind"), "{err}");
    }

    /// Privileged (root; skipped otherwise): `LinuxHost`'s tunnel operations against the
    /// kernel, on a thread inside a network namespace of the test's own.
    mod privileged {
        use std::process::Command;
        use std::time::{SystemTime, UNIX_EPOCH};

        use super::super::super::{HostNetwork, LinuxHost};
        use super::*;

        /// A network namespace with a unique name, deleted on drop.
        struct TestNetns(String);

        impl TestNetns {
            fn new(what: &str) -> Self {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("clock after 1970")
                    .subsec_nanos();
                let name = format!("hypha-t-{what}-{}-{nanos}", std::process::id());
                ip(&["netns", "add", &name]);
                Self(name)
            }

            /// `ip -n <netns> args`, which must succeed; its output.
            fn ip(&self, args: &[&str]) -> String {
                let mut all = vec!["-n", &self.0];
                all.extend_from_slice(args);
                ip(&all)
            }

            /// Runs `f` on a thread of its own inside the namespace.
            fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
                let path = format!("/run/netns/{}", self.0);
                std::thread::scope(|s| {
                    s.spawn(|| {
                        let ns = std::fs::File::open(&path).expect("open the test netns");
                        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                            .expect("enter the test netns");
                        f()
                    })
                    .join()
                    .expect("thread in the test netns")
                })
            }
        }

        impl Drop for TestNetns {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            }
        }

        fn ip(args: &[&str]) -> String {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        fn root() -> bool {
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            if !root {
                eprintln!("skipped: needs root");
            }
            root
        }

        fn spec(port: u16, mtu: u32) -> VxlanSpec {
            VxlanSpec {
                name: "hypha_vxlan".into(),
                port,
                mtu,
            }
        }

        #[test]
        fn the_vxlan_device_is_made_taken_over_and_someone_else_s_refused() {
            if !root() {
                return;
            }
            let ns = TestNetns::new("vxlan");
            let host = ns.run(|| LinuxHost::new().expect("netlink"));
            let first = ns
                .run(|| host.ensure_vxlan(&spec(8472, 1450)))
                .expect("create the device");
            let shown = ns.ip(&["-d", "link", "show", "hypha_vxlan"]);
            for want in [
                "mtu 1450",
                "external",
                "dstport 8472",
                "nolearning",
                "NOARP",
                "UP",
            ] {
                assert!(shown.contains(want), "{want} in {shown}");
            }
            assert_eq!(
                ns.ip(&["-6", "addr", "show", "dev", "hypha_vxlan"]),
                "",
                "no link-local address"
            );
            // An earlier agent's device is taken over as it is, with the new MTU.
            let again = ns
                .run(|| host.ensure_vxlan(&spec(8472, 1400)))
                .expect("take over");
            assert_eq!(again, first);
            assert!(ns.ip(&["link", "show", "hypha_vxlan"]).contains("mtu 1400"));
            // Down, with ARP on: set back.
            ns.ip(&["link", "set", "hypha_vxlan", "down", "arp", "on"]);
            ns.run(|| host.ensure_vxlan(&spec(8472, 1400)))
                .expect("take over");
            let shown = ns.ip(&["link", "show", "hypha_vxlan"]);
            assert!(shown.contains("NOARP") && shown.contains(",UP"), "{shown}");
            // Another port: made anew.
            let other = ns
                .run(|| host.ensure_vxlan(&spec(4789, 1400)))
                .expect("re-create");
            assert_ne!(other.index, first.index);
            assert!(
                ns.ip(&["-d", "link", "show", "hypha_vxlan"])
                    .contains("dstport 4789")
            );
            // Someone else's VXLAN device or a veth of that name: refused, named.
            ns.ip(&["link", "del", "hypha_vxlan"]);
            ns.ip(&[
                "link",
                "add",
                "hypha_vxlan",
                "type",
                "vxlan",
                "id",
                "7",
                "dstport",
                "8472",
            ]);
            let err = ns
                .run(|| host.ensure_vxlan(&spec(8472, 1450)))
                .unwrap_err()
                .to_string();
            assert!(err.contains("fixed VNI 7"), "{err}");
            ns.ip(&["link", "del", "hypha_vxlan"]);
            ns.ip(&[
                "link",
                "add",
                "hypha_vxlan",
                "type",
                "veth",
                "peer",
                "name",
                "p0",
            ]);
            let err = ns
                .run(|| host.ensure_vxlan(&spec(8472, 1450)))
                .unwrap_err()
                .to_string();
            assert!(err.contains("is a veth device"), "{err}");
        }

        #[test]
        fn cluster_routes_follow_the_wanted_set_and_leave_others_alone() {
            if !root() {
                return;
            }
            let ns = TestNetns::new("routes");
            let host = ns.run(|| LinuxHost::new().expect("netlink"));
            // Devices made now start with IPv6 off: the VXLAN device must not keep it off
            // (no IPv6 route could go through it).
            let default_ipv6 = |disable: &str| {
                ip(&[
                    "netns",
                    "exec",
                    &ns.0,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.default.disable_ipv6={disable}"),
                ])
            };
            default_ipv6("1");
            let vx = ns
                .run(|| host.ensure_vxlan(&spec(8472, 1450)))
                .expect("create the device");
            default_ipv6("0");
            ns.ip(&["link", "set", "lo", "up"]);
            ns.ip(&[
                "link", "add", "u0", "mtu", "9000", "type", "veth", "peer", "name", "u1",
            ]);
            ns.ip(&["link", "set", "u1", "up"]);
            ns.ip(&["link", "set", "u0", "up"]);
            ns.ip(&["addr", "add", "192.168.50.2/24", "dev", "u0"]);
            ns.ip(&["addr", "add", "fd00:50::2/64", "dev", "u0", "nodad"]);
            ns.ip(&["addr", "add", "10.244.1.1/32", "dev", "lo"]);
            ns.ip(&["addr", "add", "fd00:10:244:1::1/128", "dev", "lo"]);
            ns.ip(&["route", "add", "10.9.0.0/16", "via", "192.168.50.9"]);

            for (a, mtu) in [
                ("192.168.50.2", Some(9000)),
                ("fd00:50::2", Some(9000)),
                ("192.168.50.7", None),
            ] {
                let got = ns.run(|| host.mtu_of_address(a.parse().unwrap())).unwrap();
                assert_eq!(got, mtu, "{a}");
            }

            let tunnel = vec![
                ClusterRoute::Device {
                    dst: "10.244.0.0/16".parse().unwrap(),
                    ifindex: vx.index,
                    src: Some("10.244.1.1".parse().unwrap()),
                },
                ClusterRoute::Device {
                    dst: "fd00:10:244::/56".parse().unwrap(),
                    ifindex: vx.index,
                    src: Some("fd00:10:244:1::1".parse().unwrap()),
                },
            ];
            ns.run(|| host.set_cluster_routes(&tunnel))
                .expect("tunnel routes");
            let shown = ns.ip(&["route", "show", "proto", "201"]);
            assert_eq!(
                shown,
                "10.244.0.0/16 dev hypha_vxlan scope link src 10.244.1.1 \n"
            );
            let shown6 = ns.ip(&["-6", "route", "show", "proto", "201"]);
            assert!(
                shown6.starts_with("fd00:10:244::/56 dev hypha_vxlan src fd00:10:244:1::1 "),
                "{shown6}"
            );
            // The same again changes nothing; native routing replaces it all.
            ns.run(|| host.set_cluster_routes(&tunnel)).expect("again");
            let native = vec![
                ClusterRoute::Via {
                    dst: "10.244.2.0/24".parse().unwrap(),
                    gateway: "192.168.50.3".parse().unwrap(),
                },
                ClusterRoute::Via {
                    dst: "fd00:10:244:2::/64".parse().unwrap(),
                    gateway: "fd00:50::3".parse().unwrap(),
                },
            ];
            ns.run(|| host.set_cluster_routes(&native))
                .expect("native routes");
            assert_eq!(
                ns.ip(&["route", "show", "proto", "201"]),
                "10.244.2.0/24 via 192.168.50.3 dev u0 \n"
            );
            assert!(
                ns.ip(&["-6", "route", "show", "proto", "201"])
                    .starts_with("fd00:10:244:2::/64 via fd00:50::3 dev u0 ")
            );
            // A route that cannot be made is named; the others are still made.
            let err = ns
                .run(|| {
                    host.set_cluster_routes(&[
                        ClusterRoute::Via {
                            dst: "10.244.3.0/24".parse().unwrap(),
                            gateway: "10.99.0.1".parse().unwrap(),
                        },
                        native[0].clone(),
                    ])
                })
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(
                    "cannot set the cluster routes: add route 10.244.3.0/24 via 10.99.0.1 proto 201"
                ),
                "{err}"
            );
            assert_eq!(
                ns.ip(&["route", "show", "proto", "201"]),
                "10.244.2.0/24 via 192.168.50.3 dev u0 \n"
            );
            assert_eq!(ns.ip(&["-6", "route", "show", "proto", "201"]), "");
            // None at all: none of Hypha's left, someone else's kept.
            ns.run(|| host.set_cluster_routes(&[])).expect("no routes");
            assert_eq!(ns.ip(&["route", "show", "proto", "201"]), "");
            assert!(
                ns.ip(&["route", "show"])
                    .contains("10.9.0.0/16 via 192.168.50.9")
            );
        }
    }
}
