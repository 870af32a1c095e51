//! Socket-level load balancing on a real kernel: the eight cgroup `sock_addr` programs of
//! `ebpf/src/sock.rs` attached to the cgroup v2 root (the real attach point), the
//! service, backend and Maglev maps written directly, and sockets opened from threads
//! inside fresh network namespaces with backends listening on loopback addresses there.
//!
//! Only the test's own namespaces are registered in `hypha_lb_netns`, so every other
//! socket on the machine (other tests, other agents) is left alone by these programs.
//! Each test checks at its end that no program it attached is left on the cgroup root.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData, PerCpuHashMap, PerCpuValues};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};
use aya::util::nr_cpus;
use hypha_common::lb::{
    LB_F_AFFINITY, LB_MAGLEV_SIZE, LB_SCOPE_INTERNAL, LbBackend4, LbBackend6, LbBackendStats,
    LbKey4, LbKey6, LbMaglev, LbNetns, LbService, maps as lb_maps, programs,
};
use hypha_tests::ebpf::{Datapath, chain};
use hypha_tests::netns::{NamedNetns, ip};
use hypha_tests::node::Node;
use hypha_tests::require_root;

/// The cgroup v2 root on this machine (cgroup v1 hybrid: v2 mounted beside the v1
/// controllers).
const CGROUP: &str = "/sys/fs/cgroup/unified";

/// How long a refused connect may take: "at once", not a timeout.
const REFUSED_WITHIN: Duration = Duration::from_millis(100);

/// The datapath with the socket programs attached to the cgroup root through links
/// pinned in its private bpffs (`link_socklb_<program>`), as the agent pins them.
/// Dropping it removes the pins (which detaches the links) before the object goes.
struct SockLb {
    dp: Datapath,
    pins: Vec<std::path::PathBuf>,
    prog_ids: Vec<u32>,
}

impl SockLb {
    fn attach() -> Self {
        let mut dp = Datapath::open();
        let cgroup = std::fs::File::open(CGROUP)
            .unwrap_or_else(|e| panic!("open the cgroup v2 root {CGROUP}: {e}"));
        let pin_dir = dp.pin_dir().to_owned();
        let mut pins = Vec::new();
        let mut prog_ids = Vec::new();
        for name in programs::SOCKET {
            let prog: &mut CgroupSockAddr = dp
                .ebpf_mut()
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} missing"))
                .try_into()
                .unwrap_or_else(|e| panic!("program {name} is not cgroup sock_addr: {e}"));
            prog.load()
                .unwrap_or_else(|e| panic!("load program {name} (verifier): {}", chain(&e)));
            prog_ids.push(prog.info().expect("program info").id());
            // A cgroup bpf_link is always attached as BPF_F_ALLOW_MULTI; the kernel
            // refuses the flag itself in BPF_LINK_CREATE (EINVAL), and aya passes the
            // mode as those flags, so `Single` (no flags) is what gives a multi link.
            let link_id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .unwrap_or_else(|e| panic!("attach {name} to {CGROUP}: {}", chain(&e)));
            let link: FdLink = prog
                .take_link(link_id)
                .expect("take the link")
                .try_into()
                .expect("a bpf_link");
            let pin = pin_dir.join(format!("link_socklb_{name}"));
            link.pin(&pin)
                .unwrap_or_else(|e| panic!("pin {}: {e}", pin.display()));
            pins.push(pin);
        }
        Self { dp, pins, prog_ids }
    }

    /// Registers the network namespace at `path` in `hypha_lb_netns`.
    fn register(&mut self, path: &Path) {
        let cookie = hypha_netlink::netns_cookie(path)
            .unwrap_or_else(|e| panic!("cookie of {}: {e}", path.display()));
        let mut map: HashMap<&mut MapData, u64, LbNetns> = self.map_mut(lb_maps::NETNS);
        map.insert(cookie, LbNetns::default(), 0)
            .expect("insert into hypha_lb_netns");
    }

    fn map_mut<'a, T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>>(
        &'a mut self,
        name: &str,
    ) -> T {
        let map = self
            .dp
            .ebpf_mut()
            .map_mut(name)
            .unwrap_or_else(|| panic!("map {name} missing"));
        T::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"))
    }

    /// Writes backend `id` (IPv4) with a zeroed counter.
    fn add_backend4(&mut self, id: u32, addr: SocketAddr, proto: u8) {
        let SocketAddr::V4(a) = addr else {
            panic!("{addr} is not IPv4")
        };
        let backend = LbBackend4 {
            addr: u32::from_ne_bytes(a.ip().octets()),
            port: a.port().to_be(),
            proto,
            flags: 0,
            node_id: 0,
        };
        let mut map: HashMap<&mut MapData, u32, LbBackend4> = self.map_mut(lb_maps::BACKENDS4);
        map.insert(id, backend, 0)
            .expect("insert into hypha_lb4_backends");
        self.zero_stats(id);
    }

    /// Writes backend `id` (IPv6) with a zeroed counter.
    fn add_backend6(&mut self, id: u32, addr: SocketAddr, proto: u8) {
        let SocketAddr::V6(a) = addr else {
            panic!("{addr} is not IPv6")
        };
        let backend = LbBackend6 {
            addr: a.ip().octets(),
            port: a.port().to_be(),
            proto,
            flags: 0,
            node_id: 0,
        };
        let mut map: HashMap<&mut MapData, u32, LbBackend6> = self.map_mut(lb_maps::BACKENDS6);
        map.insert(id, backend, 0)
            .expect("insert into hypha_lb6_backends");
        self.zero_stats(id);
    }

    fn remove_backend4(&mut self, id: u32) {
        let mut map: HashMap<&mut MapData, u32, LbBackend4> = self.map_mut(lb_maps::BACKENDS4);
        map.remove(&id).expect("remove from hypha_lb4_backends");
    }

    fn zero_stats(&mut self, id: u32) {
        let cpus = nr_cpus().expect("number of possible CPUs");
        let zero =
            PerCpuValues::try_from(vec![LbBackendStats::default(); cpus]).expect("per-CPU values");
        let mut map: PerCpuHashMap<&mut MapData, u32, LbBackendStats> =
            self.map_mut(lb_maps::BACKEND_STATS);
        map.insert(id, zero, 0)
            .expect("insert into hypha_lb_backend_stats");
    }

    /// Connections counted for backend `id`, summed over CPUs.
    fn connections(&mut self, id: u32) -> u64 {
        let map: PerCpuHashMap<&mut MapData, u32, LbBackendStats> =
            self.map_mut(lb_maps::BACKEND_STATS);
        map.get(&id, 0)
            .expect("read hypha_lb_backend_stats")
            .iter()
            .map(|s| s.connections)
            .sum()
    }

    /// Writes the frontend `vip` (scope internal) of service `id` with `backends` in a
    /// round-robin table (empty: the frontend refuses).
    fn set_service(&mut self, id: u32, vip: SocketAddr, proto: u8, backends: &[u32], flags: u32) {
        let mut table = LbMaglev {
            slots: [0; LB_MAGLEV_SIZE],
        };
        if !backends.is_empty() {
            for (i, slot) in table.slots.iter_mut().enumerate() {
                *slot = backends[i % backends.len()];
            }
            let mut maglev: HashMap<&mut MapData, u32, LbMaglev> = self.map_mut(lb_maps::MAGLEV);
            maglev
                .insert(id, table, 0)
                .expect("insert into hypha_lb_maglev");
        }
        let svc = LbService {
            id,
            count: backends.len() as u32,
            flags,
            affinity_timeout_s: 60,
        };
        let port = vip.port().to_be();
        match vip.ip() {
            IpAddr::V4(a) => {
                let key = LbKey4 {
                    addr: u32::from_ne_bytes(a.octets()),
                    port,
                    proto,
                    scope: LB_SCOPE_INTERNAL,
                };
                let mut map: HashMap<&mut MapData, LbKey4, LbService> =
                    self.map_mut(lb_maps::SERVICES4);
                map.insert(key, svc, 0)
                    .expect("insert into hypha_lb4_services");
            }
            IpAddr::V6(a) => {
                let key = LbKey6 {
                    addr: a.octets(),
                    port,
                    proto,
                    scope: LB_SCOPE_INTERNAL,
                };
                let mut map: HashMap<&mut MapData, LbKey6, LbService> =
                    self.map_mut(lb_maps::SERVICES6);
                map.insert(key, svc, 0)
                    .expect("insert into hypha_lb6_services");
            }
        }
    }

    /// Detaches everything (pins removed, object closed) and checks that none of the
    /// test's programs is left attached to the cgroup root.
    fn close(self) {
        let ids = self.prog_ids.clone();
        drop(self);
        let left: Vec<u32> = attached_to_root()
            .into_iter()
            .filter(|id| ids.contains(id))
            .collect();
        assert!(
            left.is_empty(),
            "programs {left:?} of this test are still attached to {CGROUP}"
        );
    }
}

impl Drop for SockLb {
    fn drop(&mut self) {
        for pin in &self.pins {
            if let Err(e) = std::fs::remove_file(pin) {
                eprintln!("remove {}: {e}", pin.display());
            }
        }
    }
}

/// The ids of the programs attached to the cgroup v2 root, from `bpftool cgroup show`
/// (bpftool is installed by `cargo xtask setup`).
fn attached_to_root() -> Vec<u32> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show", CGROUP])
        .output()
        .expect("run bpftool (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "bpftool cgroup show {CGROUP}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    let json: serde_json::Value = serde_json::from_str(&text).expect("bpftool's JSON");
    json.as_array()
        .map(|progs| {
            progs
                .iter()
                .filter_map(|p| p["id"].as_u64())
                .map(|id| id as u32)
                .collect()
        })
        .unwrap_or_default()
}

const TCP: u8 = 6;
const UDP: u8 = 17;

/// Backends in a namespace: each answers every byte it reads (TCP) or every datagram
/// (UDP) with its own index, so a client knows which one it reached. Stopped on drop.
struct Backends {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backends {
    fn tcp(ns: &NamedNetns, addrs: &[SocketAddr]) -> Self {
        let addrs = addrs.to_vec();
        let listeners = ns
            .spawn(move || {
                addrs
                    .iter()
                    .map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}")))
                    .collect::<Vec<_>>()
            })
            .join()
            .expect("bind the backends");
        let stop = Arc::new(AtomicBool::new(false));
        let threads = listeners
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let stop = stop.clone();
                l.set_nonblocking(true).expect("nonblocking listener");
                std::thread::spawn(move || serve_tcp(l, i as u8, &stop))
            })
            .collect();
        Self { stop, threads }
    }

    fn udp(ns: &NamedNetns, addrs: &[SocketAddr]) -> Self {
        let addrs = addrs.to_vec();
        let sockets = ns
            .spawn(move || {
                addrs
                    .iter()
                    .map(|a| UdpSocket::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}")))
                    .collect::<Vec<_>>()
            })
            .join()
            .expect("bind the backends");
        let stop = Arc::new(AtomicBool::new(false));
        let threads = sockets
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let stop = stop.clone();
                s.set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("read timeout");
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((_, from)) = s.recv_from(&mut buf) {
                            let _ = s.send_to(&[i as u8], from);
                        }
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

fn serve_tcp(listener: TcpListener, index: u8, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut conn, _)) => {
                conn.set_nonblocking(false).expect("blocking connection");
                std::thread::spawn(move || {
                    let mut b = [0u8; 1];
                    while matches!(conn.read(&mut b), Ok(1)) {
                        if conn.write_all(&[index]).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Asks a backend over `conn` which one it is.
fn which(conn: &mut TcpStream) -> u8 {
    conn.write_all(&[1]).expect("write to the backend");
    let mut b = [0u8; 1];
    conn.read_exact(&mut b).expect("the backend's answer");
    b[0]
}

/// Connects `count` times to `vip` from inside `ns`; returns which backend answered
/// each time and the peer each socket showed.
fn connect_many(ns: &NamedNetns, vip: SocketAddr, count: usize) -> Vec<(u8, SocketAddr)> {
    ns.spawn(move || {
        (0..count)
            .map(|_| {
                let mut conn = TcpStream::connect_timeout(&vip, Duration::from_secs(2))
                    .unwrap_or_else(|e| panic!("connect {vip}: {e}"));
                conn.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("read timeout");
                let peer = conn.peer_addr().expect("getpeername");
                (which(&mut conn), peer)
            })
            .collect()
    })
    .join()
    .expect("the client thread")
}

fn v4(a: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(a), port))
}

fn vip4() -> SocketAddr {
    v4([10, 96, 0, 10], 80)
}

fn loopback_backends4(port: u16) -> Vec<SocketAddr> {
    vec![
        v4([127, 0, 0, 2], port),
        v4([127, 0, 0, 3], port),
        v4([127, 0, 0, 4], port),
    ]
}

/// A registered namespace, the programs attached, and a TCP service of three backends.
fn tcp_service(flags: u32) -> (SockLb, NamedNetns, Backends) {
    let mut lb = SockLb::attach();
    let ns = NamedNetns::new("socklb");
    lb.register(&ns.path());
    let addrs = loopback_backends4(8080);
    let backends = Backends::tcp(&ns, &addrs);
    for (i, a) in addrs.iter().enumerate() {
        lb.add_backend4(i as u32 + 1, *a, TCP);
    }
    lb.set_service(1, vip4(), TCP, &[1, 2, 3], flags);
    (lb, ns, backends)
}

#[test]
fn a_tcp_connect_to_a_vip_reaches_a_backend_and_getpeername_shows_the_vip() {
    require_root!();
    let (mut lb, ns, backends) = tcp_service(0);
    let answers = connect_many(&ns, vip4(), 300);
    for (_, peer) in &answers {
        assert_eq!(*peer, vip4(), "getpeername shows the VIP, not the backend");
    }
    // Without affinity, 300 connections spread over the three backends.
    let mut seen = [0usize; 3];
    for (b, _) in &answers {
        seen[*b as usize] += 1;
    }
    for (i, n) in seen.iter().enumerate() {
        assert!(
            *n >= 50,
            "backend {i} got {n} of 300 connections ({seen:?}): not spread"
        );
    }
    // The counters count each connection once, for the backend that got it.
    for (i, n) in seen.iter().enumerate() {
        assert_eq!(
            lb.connections(i as u32 + 1),
            *n as u64,
            "backend {i}'s counter"
        );
    }
    drop(backends);
    drop(ns);
    lb.close();
}

#[test]
fn affinity_keeps_a_namespace_on_one_backend() {
    require_root!();
    let (mut lb, ns, backends) = tcp_service(LB_F_AFFINITY);
    let answers = connect_many(&ns, vip4(), 20);
    let first = answers[0].0;
    assert!(
        answers.iter().all(|(b, _)| *b == first),
        "with ClientIP affinity every connection goes to backend {first}: {answers:?}"
    );
    assert_eq!(lb.connections(first as u32 + 1), 20);
    drop(backends);
    drop(ns);
    lb.close();
}

#[test]
fn a_frontend_without_backends_refuses_at_once() {
    require_root!();
    let mut lb = SockLb::attach();
    let ns = NamedNetns::new("socklb");
    lb.register(&ns.path());
    lb.set_service(7, vip4(), TCP, &[], 0);
    let vip6 = SocketAddr::from((Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10), 80));
    lb.set_service(8, vip6, TCP, &[], 0);
    lb.set_service(9, vip4(), UDP, &[], 0);
    let results = ns
        .spawn(move || {
            let mapped = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10).to_ipv6_mapped(), 80));
            let mut out = Vec::new();
            for target in [vip4(), vip6, mapped] {
                let start = Instant::now();
                let r = TcpStream::connect_timeout(&target, Duration::from_secs(3));
                out.push((target, r.map(|_| ()), start.elapsed()));
            }
            let udp = UdpSocket::bind("0.0.0.0:0").expect("bind udp");
            let start = Instant::now();
            out.push((vip4(), udp.connect(vip4()), start.elapsed()));
            out
        })
        .join()
        .expect("client");
    for (target, r, took) in results {
        let e = r.expect_err(&format!("connect to {target} without backends must fail"));
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ECONNREFUSED),
            "connect to {target}: {e}"
        );
        assert!(took < REFUSED_WITHIN, "connect to {target} took {took:?}");
    }
    drop(ns);
    lb.close();
}

#[test]
fn udp_to_a_vip_reaches_a_backend_and_replies_come_from_the_vip() {
    require_root!();
    let mut lb = SockLb::attach();
    let ns = NamedNetns::new("socklb");
    lb.register(&ns.path());
    let addrs = loopback_backends4(5353);
    let backends = Backends::udp(&ns, &addrs);
    for (i, a) in addrs.iter().enumerate() {
        lb.add_backend4(i as u32 + 10, *a, UDP);
    }
    let vip = v4([10, 96, 0, 53], 53);
    lb.set_service(2, vip, UDP, &[10, 11, 12], 0);
    let (unconnected, connected) = ns
        .spawn(move || {
            let mut buf = [0u8; 8];
            // Unconnected: sendto the VIP, recvfrom shows the VIP.
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut unconnected = Vec::new();
            for _ in 0..5 {
                s.send_to(b"q", vip).expect("sendto the VIP");
                let (_, from) = s.recv_from(&mut buf).expect("the backend's answer");
                unconnected.push((buf[0], from));
            }
            // Connected: connect to the VIP, send, recv; the peer is the VIP.
            let c = UdpSocket::bind("0.0.0.0:0").expect("bind");
            c.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            c.connect(vip).expect("connect the UDP socket to the VIP");
            let peer = c.peer_addr().expect("getpeername");
            c.send(b"q").expect("send");
            let (_, from) = c.recv_from(&mut buf).expect("the backend's answer");
            (unconnected, (buf[0], from, peer))
        })
        .join()
        .expect("client");
    for (b, from) in &unconnected {
        assert!(*b < 3);
        assert_eq!(*from, vip, "recvfrom shows the VIP as the source");
    }
    let (b, from, peer) = connected;
    assert!(b < 3);
    assert_eq!(from, vip, "recvfrom on the connected socket shows the VIP");
    assert_eq!(
        peer, vip,
        "getpeername on the connected socket shows the VIP"
    );
    // Five sends and one connect, each counted once.
    let total: u64 = (10..13).map(|id| lb.connections(id)).sum();
    assert_eq!(total, 6);
    drop(backends);
    drop(ns);
    lb.close();
}

#[test]
fn ipv6_and_ipv4_mapped_frontends_are_translated() {
    require_root!();
    let mut lb = SockLb::attach();
    let ns = NamedNetns::new("socklb");
    lb.register(&ns.path());
    // IPv6 backends on ::1, told apart by their ports.
    let addrs6: Vec<SocketAddr> = (0..3)
        .map(|i| SocketAddr::from((Ipv6Addr::LOCALHOST, 9100 + i)))
        .collect();
    let backends6 = Backends::tcp(&ns, &addrs6);
    for (i, a) in addrs6.iter().enumerate() {
        lb.add_backend6(i as u32 + 20, *a, TCP);
    }
    let vip6 = SocketAddr::from((Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x20), 443));
    lb.set_service(3, vip6, TCP, &[20, 21, 22], 0);
    // IPv4 backends, reached from an IPv6 socket through the mapped VIP.
    let addrs4 = loopback_backends4(8081);
    let backends4 = Backends::tcp(&ns, &addrs4);
    for (i, a) in addrs4.iter().enumerate() {
        lb.add_backend4(i as u32 + 30, *a, TCP);
    }
    let vip = v4([10, 96, 0, 30], 80);
    lb.set_service(4, vip, TCP, &[30, 31, 32], 0);
    let udp_addrs6: Vec<SocketAddr> = vec![SocketAddr::from((Ipv6Addr::LOCALHOST, 9200))];
    let udp6 = Backends::udp(&ns, &udp_addrs6);
    lb.add_backend6(40, udp_addrs6[0], UDP);
    let udp_vip6 = SocketAddr::from((Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x53), 53));
    lb.set_service(5, udp_vip6, UDP, &[40], 0);

    let answers6 = connect_many(&ns, vip6, 30);
    assert!(
        answers6.iter().all(|(b, p)| *b < 3 && *p == vip6),
        "{answers6:?}"
    );
    let mapped = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 30).to_ipv6_mapped(), 80));
    let answers_mapped = connect_many(&ns, mapped, 30);
    assert!(
        answers_mapped.iter().all(|(b, p)| *b < 3 && *p == mapped),
        "an IPv6 socket connecting to the mapped VIP reaches an IPv4 backend and sees the mapped VIP: {answers_mapped:?}"
    );
    let from = ns
        .spawn(move || {
            let s = UdpSocket::bind("[::]:0").expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            s.send_to(b"q", udp_vip6).expect("sendto the IPv6 VIP");
            let mut buf = [0u8; 4];
            s.recv_from(&mut buf).expect("the backend's answer").1
        })
        .join()
        .expect("client");
    assert_eq!(from, udp_vip6, "recvfrom shows the IPv6 VIP");
    let v6: u64 = (20..23).map(|id| lb.connections(id)).sum();
    let v4: u64 = (30..33).map(|id| lb.connections(id)).sum();
    assert_eq!((v6, v4, lb.connections(40)), (30, 30, 1));
    drop((backends6, backends4, udp6));
    drop(ns);
    lb.close();
}

#[test]
fn an_unregistered_namespace_is_not_translated() {
    require_root!();
    let (mut lb, ns, backends) = tcp_service(0);
    // Another namespace, not registered, with the VIP itself on its loopback.
    let other = NamedNetns::new("socklb-other");
    ip(&[
        "-n",
        other.name(),
        "addr",
        "add",
        "10.96.0.10/32",
        "dev",
        "lo",
    ]);
    let own = Backends::tcp(&other, &[vip4()]);
    let answers = connect_many(&other, vip4(), 5);
    // Its own listener (index 0 of `own`) answered, and the peer is the VIP itself.
    assert!(answers.iter().all(|(b, p)| *b == 0 && *p == vip4()));
    let counted: u64 = (1..4).map(|id| lb.connections(id)).sum();
    assert_eq!(
        counted, 0,
        "no backend of the service was given a connection"
    );
    drop((own, backends));
    drop((other, ns));
    lb.close();
}

#[test]
fn a_removed_backend_gets_no_new_connections_but_keeps_its_established_one() {
    require_root!();
    let (mut lb, ns, backends) = tcp_service(0);
    let vip = vip4();
    // Established connections, until one reaches backend index 0 (id 1).
    let mut kept = ns
        .spawn(move || {
            for _ in 0..200 {
                let mut conn = TcpStream::connect(vip).expect("connect");
                conn.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                if which(&mut conn) == 0 {
                    return conn;
                }
            }
            panic!("no connection reached backend 0 in 200");
        })
        .join()
        .expect("client");
    // Backend 1 leaves: the table names only 2 and 3, and its entry is gone.
    lb.set_service(1, vip, TCP, &[2, 3], 0);
    lb.remove_backend4(1);
    let before = lb.connections(1);
    let answers = connect_many(&ns, vip, 60);
    assert!(
        answers.iter().all(|(b, _)| *b != 0),
        "a removed backend gets no new connection: {answers:?}"
    );
    assert_eq!(lb.connections(1), before);
    // The established connection still talks to it: socket LB never touches it.
    for _ in 0..3 {
        assert_eq!(which(&mut kept), 0);
    }
    drop(kept);
    drop(backends);
    drop(ns);
    lb.close();
}

/// The program id the link pinned at `pin` runs, from `bpftool link show pinned`.
fn pinned_link_prog(pin: &Path) -> u32 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(pin)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool link show pinned {}: {}",
        pin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    json["prog_id"].as_u64().expect("prog_id") as u32
}

/// An agent's pinned map, opened as a `T`.
fn pinned<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    pin_dir: &Path,
    name: &str,
) -> T {
    let data = MapData::from_pin(pin_dir.join(name))
        .unwrap_or_else(|e| panic!("open the pinned map {name}: {e}"));
    T::try_from(aya::maps::Map::HashMap(data)).unwrap_or_else(|e| panic!("map {name}: {e}"))
}

#[test]
fn the_agent_attaches_the_socket_programs_registers_its_pods_and_leaves_nothing() {
    require_root!();
    let mut node = Node::start();
    let pins: Vec<_> = programs::SOCKET
        .iter()
        .map(|name| {
            let hook = name.trim_start_matches("hypha_sock_");
            node.pin_dir.join(format!("link_socklb_{hook}"))
        })
        .collect();
    let ids: Vec<u32> = pins.iter().map(|p| pinned_link_prog(p)).collect();
    let attached = attached_to_root();
    for (pin, id) in pins.iter().zip(&ids) {
        assert!(
            attached.contains(id),
            "the program of {} (id {id}) is attached to {CGROUP}",
            pin.display()
        );
    }
    // A pod's namespace is registered: a service written into the agent's maps is
    // translated for its sockets.
    let pod = node.add_pod("socklb");
    let addrs = loopback_backends4(8080);
    let backends = Backends::tcp(&pod.netns, &addrs);
    write_service(&node.pin_dir, &addrs);
    let vip = v4([10, 96, 9, 9], 80);
    let answers = connect_many(&pod.netns, vip, 10);
    assert!(
        answers.iter().all(|(b, p)| *b < 3 && *p == vip),
        "{answers:?}"
    );
    let netns: HashMap<MapData, u64, LbNetns> = pinned(&node.pin_dir, lb_maps::NETNS);
    let registered = |netns: &HashMap<MapData, u64, LbNetns>| {
        netns
            .iter()
            .map(|e| e.expect("iterate hypha_lb_netns").1.ifindex)
            .collect::<Vec<_>>()
    };
    let with_pod = registered(&netns);
    assert_eq!(
        with_pod.len(),
        2,
        "the agent's namespace and the pod's: {with_pod:?}"
    );
    assert!(with_pod.contains(&0));
    // A restarted agent swaps its programs into the same links. It also removes what no
    // service of its own holds from the maps, so the test writes its service again.
    node.kill_agent();
    node.start_agent();
    write_service(&node.pin_dir, &addrs);
    let again: Vec<u32> = pins.iter().map(|p| pinned_link_prog(p)).collect();
    let attached = attached_to_root();
    for id in &again {
        assert!(
            attached.contains(id),
            "restarted agent's program {id} attached"
        );
    }
    for id in &ids {
        assert!(
            !attached.contains(id),
            "the old program {id} was swapped out"
        );
    }
    let answers = connect_many(&pod.netns, vip, 3);
    assert!(answers.iter().all(|(_, p)| *p == vip));
    // The pod goes: its namespace is forgotten.
    drop(backends);
    node.del_pod(&pod);
    assert_eq!(
        registered(&netns),
        vec![0],
        "only the agent's namespace is left"
    );
    drop(netns);
    drop(pod);
    // The node goes (its pin directory removed): nothing is left on the cgroup root.
    drop(node);
    let attached = attached_to_root();
    for id in &again {
        assert!(
            !attached.contains(id),
            "program {id} left attached to {CGROUP}"
        );
    }
}

/// Two endpoints in one namespace (a pod with a second interface): the namespace's
/// entry stores the later one; deleting that one keeps the namespace translated for the
/// other, and only the last endpoint's delete forgets it.
#[test]
fn a_namespace_shared_by_two_endpoints_stays_registered_until_the_last_goes() {
    require_root!();
    let node = Node::start();
    let pod = node.add_pod("shared");
    let path = pod.netns.path().display().to_string();
    let second = format!("{}-eth1", pod.container_id);
    let env = |command| {
        let mut env = Node::cni_env(command, &second, &path);
        env.retain(|(k, _)| *k != "CNI_IFNAME");
        env.push(("CNI_IFNAME", "eth1"));
        env
    };
    let added = node.cni(&env("ADD"), &node.conf("1.1.0"));
    assert!(
        added.status.success(),
        "ADD of a second interface: {}\n{}",
        added.stdout,
        node.log()
    );
    let netns: HashMap<MapData, u64, LbNetns> = pinned(&node.pin_dir, lb_maps::NETNS);
    let registered = || {
        let mut ifindexes: Vec<u32> = netns
            .iter()
            .map(|e| e.expect("iterate hypha_lb_netns").1.ifindex)
            .collect();
        ifindexes.sort_unstable();
        ifindexes
    };
    let first = node.endpoint(&pod.container_id).host_ifindex;
    let later = node.endpoint(&second).host_ifindex;
    assert_eq!(registered(), vec![0, later], "one entry for the namespace");

    let addrs = loopback_backends4(8080);
    let backends = Backends::tcp(&pod.netns, &addrs);
    write_service(&node.pin_dir, &addrs);
    let vip = v4([10, 96, 9, 9], 80);
    let deleted = node.cni(&env("DEL"), &node.conf("1.1.0"));
    assert!(deleted.status.success(), "DEL of eth1: {}", deleted.stdout);
    assert_eq!(
        registered(),
        vec![0, first],
        "the namespace stays, held by its first endpoint"
    );
    let answers = connect_many(&pod.netns, vip, 3);
    assert!(
        answers.iter().all(|(b, p)| *b < 3 && *p == vip),
        "still translated: {answers:?}"
    );
    drop(backends);
    let deleted = node.del_pod(&pod);
    assert!(deleted.status.success(), "DEL of eth0: {}", deleted.stdout);
    assert_eq!(registered(), vec![0], "gone with its last endpoint");
}

/// Writes a TCP service 10.96.9.9:80 of the backends `addrs` straight into the agent's
/// pinned maps (ids 900 and up, which the agent's own services do not reach here).
fn write_service(pin_dir: &std::path::Path, addrs: &[SocketAddr]) {
    let mut backends4: HashMap<MapData, u32, LbBackend4> = pinned(pin_dir, lb_maps::BACKENDS4);
    let mut maglev: HashMap<MapData, u32, LbMaglev> = pinned(pin_dir, lb_maps::MAGLEV);
    let mut services: HashMap<MapData, LbKey4, LbService> = pinned(pin_dir, lb_maps::SERVICES4);
    for (i, a) in addrs.iter().enumerate() {
        let SocketAddr::V4(a) = a else { unreachable!() };
        let backend = LbBackend4 {
            addr: u32::from_ne_bytes(a.ip().octets()),
            port: a.port().to_be(),
            proto: TCP,
            flags: 0,
            node_id: 0,
        };
        backends4
            .insert(i as u32 + 900, backend, 0)
            .expect("backend");
    }
    let mut table = LbMaglev {
        slots: [0; LB_MAGLEV_SIZE],
    };
    for (i, slot) in table.slots.iter_mut().enumerate() {
        *slot = 900 + (i % 3) as u32;
    }
    maglev.insert(900, table, 0).expect("maglev");
    let key = LbKey4 {
        addr: u32::from_ne_bytes([10, 96, 9, 9]),
        port: 80u16.to_be(),
        proto: TCP,
        scope: LB_SCOPE_INTERNAL,
    };
    let svc = LbService {
        id: 900,
        count: 3,
        flags: 0,
        affinity_timeout_s: 0,
    };
    services.insert(key, svc, 0).expect("service");
}
