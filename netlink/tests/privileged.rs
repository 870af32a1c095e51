//! Privileged tests: they run as root against the real kernel, each in its own network
//! namespace (`hypnl-<pid>-<n>`) removed by a guard even when the test fails.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use hypha_netlink::{
    AddrGenMode, Error, Netlink, RTPROT_HYPHA, Route, Route6, RouteTarget, TaggedRoute, VethSpec,
    VxlanSpec,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The first line of every test here: without root, says the test is skipped and returns
/// (straight to stderr, which libtest does not capture). `cargo xtask test` runs as root.
macro_rules! require_root {
    () => {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "skipped ({}:{}): needs root (CAP_NET_ADMIN)",
                file!(),
                line!()
            );
            return;
        }
    };
}

/// A named network namespace, deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new() -> Self {
        let name = format!(
            "hypnl-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        Self { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        // Whatever runs inside goes first, or it would outlive the namespace's name.
        if let Err(e) = hypha_netlink::procs::end_processes_in(
            &self.path(),
            std::time::Duration::from_millis(500),
        ) {
            eprintln!("{e}");
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Host-side interface names used by a test, deleted on drop.
struct HostLinks(Vec<String>);

impl Drop for HostLinks {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["link", "del", name]).output();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A host interface name unique to this process and test.
fn host_name(tag: &str) -> String {
    format!(
        "hnl{tag}{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[test]
fn veth_into_netns_with_addresses_and_routes() {
    require_root!();
    let ns = TestNetns::new();
    let host = host_name("v");
    let _cleanup = HostLinks(vec![host.clone()]);
    let ns_file = File::open(ns.path()).unwrap();

    let mut host_nl = Netlink::new().unwrap();
    let mut pod_nl = Netlink::in_netns_fd(ns_file.as_fd(), &ns.path()).unwrap();

    host_nl
        .create_veth(&VethSpec {
            host_name: &host,
            peer_name: "eth0",
            peer_netns: ns_file.as_fd(),
            mtu: Some(1400),
            peer_mac: Some([0x02, 0xaa, 0, 0, 0, 0x01]),
        })
        .unwrap();

    // Both ends exist where they belong, and only there.
    let h = host_nl.link_by_name(&host).unwrap().expect("host end");
    assert_eq!(h.kind.as_deref(), Some("veth"));
    assert_eq!(h.mtu, 1400);
    assert!(h.up, "the host end is created up");
    assert_eq!(host_nl.link_by_index(h.index).unwrap().unwrap().name, host);
    let p = pod_nl
        .link_by_name("eth0")
        .unwrap()
        .expect("peer in the netns");
    assert_eq!(p.mac, [0x02, 0xaa, 0, 0, 0, 0x01]);
    assert_eq!(p.mtu, 1400);
    assert_eq!(p.kind.as_deref(), Some("veth"));
    assert!(!p.up, "the peer is left down");
    // The current namespace is still the host's.
    assert_eq!(
        Netlink::new()
            .unwrap()
            .link_by_name(&host)
            .unwrap()
            .map(|l| l.index),
        Some(h.index)
    );

    // Creating it again names the interface that is taken.
    let again = host_nl.create_veth(&VethSpec {
        host_name: &host,
        peer_name: "eth1",
        peer_netns: ns_file.as_fd(),
        mtu: None,
        peer_mac: None,
    });
    assert!(
        matches!(&again, Err(Error::LinkExists { name, .. }) if *name == host),
        "{again:?}"
    );
    let other = host_name("w");
    let _cleanup2 = HostLinks(vec![other.clone()]);
    let peer_taken = host_nl.create_veth(&VethSpec {
        host_name: &other,
        peer_name: "eth0",
        peer_netns: ns_file.as_fd(),
        mtu: None,
        peer_mac: None,
    });
    assert!(
        matches!(&peer_taken, Err(Error::PeerExists { name }) if name == "eth0"),
        "{peer_taken:?}"
    );
    assert!(
        host_nl.link_by_name(&other).unwrap().is_none(),
        "nothing left after a failed create"
    );

    // Address, up, routes inside the namespace.
    let addr = Ipv4Addr::new(10, 99, 0, 5);
    let gw = Ipv4Addr::new(10, 99, 0, 1);
    pod_nl.add_address(p.index, addr, 32).unwrap();
    pod_nl.add_address(p.index, addr, 32).unwrap(); // idempotent
    assert_eq!(pod_nl.addresses(p.index).unwrap(), vec![(addr, 32)]);
    pod_nl.set_up(p.index).unwrap();
    host_nl.set_up(h.index).unwrap();
    assert!(pod_nl.link_by_index(p.index).unwrap().unwrap().up);
    assert!(host_nl.link_by_index(h.index).unwrap().unwrap().up);

    let link_route = Route {
        dst: format!("{gw}/32").parse().unwrap(),
        gateway: None,
        oif: p.index,
        scope_link: true,
        src: None,
    };
    let default = Route {
        dst: "0.0.0.0/0".parse().unwrap(),
        gateway: Some(gw),
        oif: p.index,
        scope_link: false,
        src: None,
    };
    pod_nl.add_route(&link_route).unwrap();
    pod_nl.add_route(&default).unwrap();
    pod_nl.add_route(&default).unwrap(); // replace: idempotent
    let routes = pod_nl.routes(p.index).unwrap();
    assert!(routes.contains(&link_route), "{routes:?}");
    assert!(routes.contains(&default), "{routes:?}");
    assert_eq!(routes.len(), 2, "{routes:?}");

    assert!(pod_nl.delete_route(&default).unwrap());
    assert!(!pod_nl.delete_route(&default).unwrap());
    assert!(!pod_nl.routes(p.index).unwrap().contains(&default));

    // Deleting the host end removes the pair; deleting again reports absence.
    assert!(host_nl.delete_link_by_name(&host).unwrap());
    assert!(!host_nl.delete_link_by_name(&host).unwrap());
    assert!(host_nl.link_by_name(&host).unwrap().is_none());
    assert!(pod_nl.link_by_name("eth0").unwrap().is_none());
}

#[test]
fn dummy_links() {
    require_root!();
    let ns = TestNetns::new();
    let mut nl = Netlink::in_netns(&ns.path()).unwrap();

    match nl.create_dummy("dummy0") {
        Ok(()) => {}
        Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => {
            eprintln!("skipped: this kernel has no dummy interfaces ({e})");
            return;
        }
        Err(e) => panic!("create dummy0: {e}"),
    }
    let d = nl.link_by_name("dummy0").unwrap().unwrap();
    assert_eq!(d.kind.as_deref(), Some("dummy"));
    let err = nl.create_dummy("dummy0").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "interface dummy0 already exists in network namespace {}",
            ns.path().display()
        )
    );
    nl.delete_link(d.index).unwrap();
    assert!(nl.link_by_index(d.index).unwrap().is_none());
}

#[test]
fn errors_name_the_operation_and_interface() {
    require_root!();
    let ns = TestNetns::new();
    let mut nl = Netlink::in_netns(&ns.path()).unwrap();

    assert!(nl.link_by_name("nope0").unwrap().is_none());
    assert!(nl.link_by_index(999_999).unwrap().is_none());
    assert!(!nl.delete_link_by_name("nope0").unwrap());
    let err = nl.set_up(999_999).unwrap_err();
    assert!(matches!(err, Error::LinkNotFound { .. }), "{err:?}");
    let err = nl.delete_link(999_999).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "interface #999999 not found in network namespace {}",
            ns.path().display()
        )
    );

    // lo exists in every namespace and has no kind.
    let lo = nl.link_by_name("lo").unwrap().unwrap();
    assert_eq!(lo.kind, None);

    // A bad request comes back as a kernel error naming the operation.
    let err = nl
        .add_address(lo.index, Ipv4Addr::new(10, 0, 0, 1), 40)
        .unwrap_err();
    assert!(matches!(err, Error::Kernel { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("add address 10.0.0.1/40 to interface #1 in network namespace"),
        "{err}"
    );
    let err = nl
        .add_route(&Route {
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
            oif: lo.index,
            scope_link: false,
            src: None,
        })
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("add route 0.0.0.0/0 via 192.0.2.1 dev #1 in network namespace"),
        "{err}"
    );
}

#[test]
fn missing_netns_is_reported_with_its_path() {
    require_root!();
    let path = PathBuf::from(format!("/run/netns/hypnl-{}-absent", std::process::id()));
    let err = Netlink::in_netns(&path).err().expect("no such netns");
    assert!(matches!(err, Error::OpenNetns { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    // A file that is not a network namespace cannot be entered, and the thread stays home.
    let before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let err = Netlink::in_netns(std::path::Path::new("/dev/null"))
        .err()
        .expect("not a netns");
    assert!(matches!(err, Error::EnterNetns { .. }), "{err:?}");
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
        before
    );
}

/// A `tbf` root qdisc is installed without a rate table, reads back with the rate, bucket
/// and limit asked for, is changed in place, and only Hypha's is deleted.
#[test]
fn tbf_root_qdisc_is_installed_read_changed_and_deleted() {
    require_root!();
    use hypha_netlink::TbfSpec;
    let ns = TestNetns::new();
    let mut nl = Netlink::in_netns(&ns.path()).expect("socket in netns");
    // This kernel has no dummy driver: a veth pair inside the namespace.
    ip(&[
        "-n", &ns.name, "link", "add", "shaped0", "type", "veth", "peer", "name", "shaped1",
    ]);
    let link = nl.link_by_name("shaped0").unwrap().expect("veth exists");
    nl.set_up(link.index).unwrap();
    let spec = TbfSpec {
        rate_bytes_per_sec: 1_250_000,
        burst_bytes: 6_250,
        limit_bytes: 12_500,
    };
    nl.replace_tbf(link.index, &spec).expect("install tbf");
    let q = nl.root_qdisc(link.index).unwrap().expect("root qdisc");
    assert!(q.is_hypha_tbf(), "{q:?}");
    let got = q.tbf.expect("tbf options");
    assert_eq!(got.rate_bytes_per_sec, spec.rate_bytes_per_sec);
    assert_eq!(got.limit_bytes, spec.limit_bytes);
    assert!(got.burst_bytes.abs_diff(spec.burst_bytes) <= 2, "{got:?}");

    // 1 Tbit/s needs the 64-bit rate.
    let fast = TbfSpec {
        rate_bytes_per_sec: 125_000_000_000,
        burst_bytes: 1 << 20,
        limit_bytes: 1 << 22,
    };
    nl.replace_tbf(link.index, &fast)
        .expect("change tbf in place");
    let got = nl.root_qdisc(link.index).unwrap().unwrap().tbf.unwrap();
    assert_eq!(got.rate_bytes_per_sec, fast.rate_bytes_per_sec);

    assert!(nl.delete_hypha_root_qdisc(link.index).unwrap());
    let q = nl.root_qdisc(link.index).unwrap().expect("default qdisc");
    assert!(!q.is_hypha_tbf(), "{q:?}");
    assert!(
        !nl.delete_hypha_root_qdisc(link.index).unwrap(),
        "nothing of ours left"
    );

    // Someone else's root qdisc is left alone.
    let out = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "tc", "qdisc", "add", "dev", "shaped0",
        ])
        .args([
            "root", "handle", "1:", "tbf", "rate", "1mbit", "burst", "10k",
        ])
        .args(["latency", "10ms"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!nl.delete_hypha_root_qdisc(link.index).unwrap());
    assert_eq!(nl.root_qdisc(link.index).unwrap().unwrap().kind, "tbf");
    assert_eq!(nl.root_qdisc(9999).unwrap(), None, "no such interface");
}

/// The link-local address the kernel derives from `mac` in EUI-64 mode (RFC 4291 app. A).
fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    let b = [
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ];
    Ipv6Addr::from(b)
}

/// IPv6 on both ends of a veth: the pod's link-local address follows the MAC whatever
/// the namespace's default generation mode, a /128 is added without DAD, listed, deleted;
/// the default route via a link-local gateway and the host's `/128 dev` route are added,
/// replaced, listed and deleted.
#[test]
fn ipv6_addresses_routes_and_addr_gen_mode() {
    require_root!();
    let ns = TestNetns::new();
    // New interfaces of this namespace get random link-local addresses by default, so
    // that only set_addr_gen_mode can make the EUI-64 one appear.
    ip(&[
        "netns",
        "exec",
        &ns.name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.default.addr_gen_mode=3",
    ]);
    let host = host_name("6");
    let _cleanup = HostLinks(vec![host.clone()]);
    let ns_file = File::open(ns.path()).unwrap();
    let mut host_nl = Netlink::new().unwrap();
    let mut pod_nl = Netlink::in_netns_fd(ns_file.as_fd(), &ns.path()).unwrap();
    let mac = [0x02, 0xaa, 0, 0, 0x06, 0x01];
    host_nl
        .create_veth(&VethSpec {
            host_name: &host,
            peer_name: "eth0",
            peer_netns: ns_file.as_fd(),
            mtu: None,
            peer_mac: Some(mac),
        })
        .unwrap();
    let h = host_nl.link_by_name(&host).unwrap().unwrap();
    let p = pod_nl.link_by_name("eth0").unwrap().unwrap();
    assert_eq!(p.addr_gen_mode, Some(AddrGenMode::Random), "{p:?}");

    pod_nl
        .set_addr_gen_mode(p.index, AddrGenMode::Eui64)
        .unwrap();
    assert_eq!(
        pod_nl
            .link_by_index(p.index)
            .unwrap()
            .unwrap()
            .addr_gen_mode,
        Some(AddrGenMode::Eui64)
    );

    let addr: Ipv6Addr = "fd00:99::5".parse().unwrap();
    pod_nl.add_address6(p.index, addr, 128).unwrap();
    pod_nl.add_address6(p.index, addr, 128).unwrap(); // idempotent
    let err = pod_nl.add_address6(p.index, addr, 64).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("add address {addr}/64 to interface #{}", p.index)),
        "{err}"
    );
    pod_nl.set_up(p.index).unwrap();

    let ours = pod_nl.addresses6(p.index).unwrap();
    let a = ours.iter().find(|a| a.address == addr).expect("the /128");
    assert_eq!(a.prefix_len, 128);
    assert!(a.nodad && a.usable(), "{a:?}");
    // The link-local address appears once the link is up (DAD may still run on it).
    let ll = eui64_link_local(mac);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let list = pod_nl.addresses6(p.index).unwrap();
        if let Some(found) = list.iter().find(|a| a.address == ll) {
            assert_eq!(found.prefix_len, 64);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no link-local {ll} on eth0: {list:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        pod_nl.addresses6(p.index).unwrap().iter().all(|a| {
            let s = a.address.segments();
            s[0] != 0xfe80 || a.address == ll
        }),
        "only the EUI-64 link-local address"
    );
    assert!(pod_nl.addresses(p.index).unwrap().is_empty(), "no IPv4");

    // The pod's default route via a link-local gateway.
    let default = Route6 {
        dst: "::/0".parse().unwrap(),
        gateway: Some("fe80::1".parse().unwrap()),
        oif: p.index,
        src: None,
    };
    pod_nl.add_route6(&default).unwrap();
    pod_nl.add_route6(&default).unwrap(); // replace: idempotent
    let routes = pod_nl.routes6(p.index).unwrap();
    assert_eq!(
        routes.iter().filter(|r| **r == default).count(),
        1,
        "{routes:?}"
    );
    assert!(pod_nl.routes(p.index).unwrap().is_empty(), "no IPv4 routes");

    // The host's route to the pod: no gateway, through the host end.
    let to_pod = Route6 {
        dst: format!("{addr}/128").parse().unwrap(),
        gateway: None,
        oif: h.index,
        src: None,
    };
    host_nl.add_route6(&to_pod).unwrap();
    host_nl.add_route6(&to_pod).unwrap();
    assert!(host_nl.routes6(h.index).unwrap().contains(&to_pod));
    assert!(host_nl.delete_route6(&to_pod).unwrap());
    assert!(!host_nl.delete_route6(&to_pod).unwrap());
    assert!(!host_nl.routes6(h.index).unwrap().contains(&to_pod));

    assert!(pod_nl.delete_route6(&default).unwrap());
    assert!(!pod_nl.delete_route6(&default).unwrap());
    assert!(!pod_nl.routes6(p.index).unwrap().contains(&default));

    assert!(pod_nl.delete_address6(p.index, addr, 128).unwrap());
    assert!(!pod_nl.delete_address6(p.index, addr, 128).unwrap());
    assert!(
        !pod_nl
            .addresses6(p.index)
            .unwrap()
            .iter()
            .any(|a| a.address == addr)
    );

    // A bad request names the operation.
    let err = pod_nl
        .add_route6(&Route6 {
            dst: "::/0".parse().unwrap(),
            gateway: Some("fe80::1".parse().unwrap()),
            oif: 999_999,
            src: None,
        })
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("add route ::/0 via fe80::1 dev #999999 in network namespace"),
        "{err}"
    );
}

/// `disable_ipv6` of another namespace is turned off where it is on, only there, and the
/// thread comes home; an interface that does not exist is named in the error.
#[test]
fn ipv6_is_enabled_in_another_namespace() {
    require_root!();
    let ns = TestNetns::new();
    ip(&[
        "-n", &ns.name, "link", "add", "v6a", "type", "veth", "peer", "name", "v6b",
    ]);
    ip(&[
        "netns",
        "exec",
        &ns.name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.v6a.disable_ipv6=1",
    ]);
    let read = |ifname: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "cat"])
            .arg(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(read("v6a"), "1");
    let before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let file = File::open(ns.path()).unwrap();
    let enabled =
        hypha_netlink::sysctl::enable_ipv6(file.as_fd(), &ns.path(), &["lo", "v6a", "v6b"])
            .unwrap();
    assert_eq!(enabled, vec!["v6a".to_owned()]);
    assert_eq!(read("v6a"), "0");
    assert_eq!(read("v6b"), "0");
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
        before
    );
    // Nothing to do the second time.
    let again = hypha_netlink::sysctl::enable_ipv6(file.as_fd(), &ns.path(), &["v6a"]).unwrap();
    assert!(again.is_empty());

    let err = hypha_netlink::sysctl::enable_ipv6(file.as_fd(), &ns.path(), &["nope0"]).unwrap_err();
    assert!(matches!(err, Error::Sysctl { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot read /proc/sys/net/ipv6/conf/nope0/disable_ipv6 in network namespace {}: \
             No such file or directory (os error 2)",
            ns.path().display()
        )
    );
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
        before
    );
}

/// Output of `ip <args>` inside namespace `ns`.
fn ip_in(ns: &TestNetns, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", &ns.name])
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip -n {} {}: {}",
        ns.name,
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn vxlan_device_in_external_mode_is_created_read_back_and_changed() {
    require_root!();
    let ns = TestNetns::new();
    let mut nl = Netlink::in_netns(&ns.path()).unwrap();
    let spec = VxlanSpec {
        name: "vx0",
        port: 8472,
        mtu: Some(1450),
    };
    match nl.create_vxlan(&spec) {
        Ok(()) => {}
        Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => {
            eprintln!("skipped: this kernel has no VXLAN ({e})");
            return;
        }
        Err(e) => panic!("create vx0: {e}"),
    }
    let link = nl.link_by_name("vx0").unwrap().expect("vx0 exists");
    assert_eq!(link.kind.as_deref(), Some("vxlan"));
    assert_eq!(link.mtu, 1450);
    assert!(!link.up, "created down");
    let info = nl.vxlan(link.index).unwrap().expect("a VXLAN device");
    assert!(info.collect_metadata, "{info:?}");
    assert_eq!(info.port, 8472);
    assert!(!info.learning, "{info:?}");
    assert!(info.noarp, "{info:?}");
    // What `ip` sees: external mode, the port, no learning, no ARP.
    let details = ip_in(&ns, &["-d", "link", "show", "vx0"]);
    assert!(details.contains("external"), "{details}");
    assert!(details.contains("dstport 8472"), "{details}");
    assert!(details.contains("nolearning"), "{details}");
    assert!(details.contains("NOARP"), "{details}");

    nl.set_mtu(link.index, 1400).unwrap();
    nl.set_up(link.index).unwrap();
    let link = nl.link_by_index(link.index).unwrap().unwrap();
    assert_eq!((link.mtu, link.up), (1400, true));

    // The name is taken.
    let err = nl.create_vxlan(&spec).unwrap_err();
    assert!(matches!(err, Error::LinkExists { .. }), "{err:?}");
    // Another external device on the same port is refused by the kernel, named.
    let err = nl
        .create_vxlan(&VxlanSpec {
            name: "vx1",
            port: 8472,
            mtu: None,
        })
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("create VXLAN device vx1 (external, UDP port 8472) in network namespace"),
        "{err}"
    );

    // A device of another kind is no VXLAN device; one that is gone is none either.
    ip_in(
        &ns,
        &["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
    );
    let d0 = nl.link_by_name("d0").unwrap().unwrap();
    assert_eq!(nl.vxlan(d0.index).unwrap(), None);
    nl.set_noarp(d0.index).unwrap();
    assert!(ip_in(&ns, &["link", "show", "d0"]).contains("NOARP"));
    nl.delete_link(link.index).unwrap();
    assert_eq!(nl.vxlan(link.index).unwrap(), None);
    // A VXLAN device someone made without external mode reads as such.
    ip_in(
        &ns,
        &[
            "link", "add", "vx2", "type", "vxlan", "id", "42", "dstport", "4789",
        ],
    );
    let vx2 = nl.link_by_name("vx2").unwrap().unwrap();
    let info = nl.vxlan(vx2.index).unwrap().expect("a VXLAN device");
    assert!(!info.collect_metadata, "{info:?}");
    assert_eq!((info.vni, info.port), (Some(42), 4789));
}

#[test]
fn routes_of_a_protocol_are_added_listed_replaced_and_deleted_alone() {
    require_root!();
    let ns = TestNetns::new();
    let mut nl = Netlink::in_netns(&ns.path()).unwrap();
    // (A veth: this kernel may have no dummy interfaces.)
    ip_in(
        &ns,
        &["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
    );
    ip_in(&ns, &["link", "set", "d1", "up"]);
    ip_in(&ns, &["link", "set", "d0", "up"]);
    ip_in(&ns, &["addr", "add", "192.168.50.2/24", "dev", "d0"]);
    ip_in(&ns, &["addr", "add", "10.244.1.1/32", "dev", "d0"]);
    ip_in(&ns, &["addr", "add", "fd00:50::2/64", "dev", "d0", "nodad"]);
    ip_in(
        &ns,
        &["addr", "add", "fd00:10:244:1::1/128", "dev", "d0", "nodad"],
    );
    let d0 = nl.link_by_name("d0").unwrap().unwrap();
    // Someone else's route, which Hypha must never list or touch.
    ip_in(&ns, &["route", "add", "10.9.0.0/16", "via", "192.168.50.9"]);

    let dev4 = TaggedRoute {
        dst: "10.244.0.0/16".parse().unwrap(),
        target: RouteTarget::Device {
            oif: d0.index,
            src: Some("10.244.1.1".parse().unwrap()),
        },
        protocol: RTPROT_HYPHA,
    };
    let dev6 = TaggedRoute {
        dst: "fd00:10:244::/56".parse().unwrap(),
        target: RouteTarget::Device {
            oif: d0.index,
            src: Some("fd00:10:244:1::1".parse().unwrap()),
        },
        protocol: RTPROT_HYPHA,
    };
    let via4 = TaggedRoute {
        dst: "10.245.2.0/24".parse().unwrap(),
        target: RouteTarget::Gateway("192.168.50.3".parse().unwrap()),
        protocol: RTPROT_HYPHA,
    };
    let via6 = TaggedRoute {
        dst: "fd00:10:245:2::/64".parse().unwrap(),
        target: RouteTarget::Gateway("fd00:50::3".parse().unwrap()),
        protocol: RTPROT_HYPHA,
    };
    // IPv4 pods over an IPv6 underlay (RFC 5549).
    let via46 = TaggedRoute {
        dst: "10.245.4.0/24".parse().unwrap(),
        target: RouteTarget::Gateway("fd00:50::4".parse().unwrap()),
        protocol: RTPROT_HYPHA,
    };
    for r in [&dev4, &dev6, &via4, &via6, &via46] {
        nl.replace_tagged_route(r)
            .unwrap_or_else(|e| panic!("{r}: {e}"));
        nl.replace_tagged_route(r)
            .unwrap_or_else(|e| panic!("again {r}: {e}"));
    }
    let mut listed = nl.tagged_routes(RTPROT_HYPHA).unwrap();
    listed.sort();
    let mut want = vec![
        dev4.clone(),
        dev6.clone(),
        via4.clone(),
        via6.clone(),
        via46.clone(),
    ];
    want.sort();
    assert_eq!(listed, want);
    let shown = ip_in(&ns, &["route", "show", "proto", "201"]);
    assert!(
        shown.contains("10.244.0.0/16 dev d0 scope link src 10.244.1.1"),
        "{shown}"
    );
    assert!(
        shown.contains("10.245.4.0/24 via inet6 fd00:50::4 dev d0"),
        "{shown}"
    );
    assert!(
        shown.contains("10.245.2.0/24 via 192.168.50.3 dev d0"),
        "{shown}"
    );
    assert!(!shown.contains("10.9.0.0"), "{shown}");
    assert!(
        nl.tagged_routes(3)
            .unwrap()
            .iter()
            .all(|r| r.dst.to_string() != "10.244.0.0/16")
    );

    // Changed in place: another source, another gateway.
    let dev4b = TaggedRoute {
        target: RouteTarget::Device {
            oif: d0.index,
            src: Some("192.168.50.2".parse().unwrap()),
        },
        ..dev4.clone()
    };
    let via6b = TaggedRoute {
        target: RouteTarget::Gateway("fd00:50::4".parse().unwrap()),
        ..via6.clone()
    };
    nl.replace_tagged_route(&dev4b).unwrap();
    nl.replace_tagged_route(&via6b).unwrap();
    let mut listed = nl.tagged_routes(RTPROT_HYPHA).unwrap();
    listed.sort();
    let mut want = vec![
        dev4b.clone(),
        dev6.clone(),
        via4.clone(),
        via6b.clone(),
        via46.clone(),
    ];
    want.sort();
    assert_eq!(listed, want, "replaced, not added beside");

    for r in &want {
        assert!(nl.delete_tagged_route(r).unwrap(), "{r}");
        assert!(!nl.delete_tagged_route(r).unwrap(), "{r} again");
    }
    assert_eq!(nl.tagged_routes(RTPROT_HYPHA).unwrap(), Vec::new());
    // A delete of protocol 201 leaves a route of another protocol to the same place.
    let theirs = TaggedRoute {
        dst: "10.9.0.0/16".parse().unwrap(),
        target: RouteTarget::Gateway("192.168.50.9".parse().unwrap()),
        protocol: RTPROT_HYPHA,
    };
    assert!(!nl.delete_tagged_route(&theirs).unwrap());
    assert!(ip_in(&ns, &["route", "show"]).contains("10.9.0.0/16 via 192.168.50.9"));

    // A bad route is named in the error.
    let err = nl
        .replace_tagged_route(&TaggedRoute {
            dst: "10.250.0.0/16".parse().unwrap(),
            target: RouteTarget::Gateway("10.251.0.1".parse().unwrap()),
            protocol: RTPROT_HYPHA,
        })
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("add route 10.250.0.0/16 via 10.251.0.1 proto 201 in network namespace"),
        "{err}"
    );
}

#[test]
fn the_interface_holding_an_address_is_found() {
    require_root!();
    let ns = TestNetns::new();
    let mut nl = Netlink::in_netns(&ns.path()).unwrap();
    ip_in(
        &ns,
        &[
            "link", "add", "d0", "mtu", "9000", "type", "veth", "peer", "name", "d1",
        ],
    );
    ip_in(&ns, &["addr", "add", "192.168.50.2/24", "dev", "d0"]);
    ip_in(&ns, &["addr", "add", "fd00:50::2/64", "dev", "d0", "nodad"]);
    for a in ["192.168.50.2", "fd00:50::2"] {
        let link = nl
            .link_of_address(a.parse().unwrap())
            .unwrap()
            .unwrap_or_else(|| panic!("{a} is on d0"));
        assert_eq!((link.name.as_str(), link.mtu), ("d0", 9000), "{a}");
    }
    ip_in(&ns, &["link", "set", "lo", "up"]);
    let lo = nl.link_of_address("127.0.0.1".parse().unwrap()).unwrap();
    assert_eq!(lo.map(|l| l.name), Some("lo".to_owned()));
    assert_eq!(
        nl.link_of_address("192.168.50.3".parse().unwrap()).unwrap(),
        None
    );
    assert_eq!(
        nl.link_of_address("fd00:50::3".parse().unwrap()).unwrap(),
        None
    );
}
