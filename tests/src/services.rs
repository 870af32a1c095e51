//! Helpers of the service tests (`tests/tests/services.rs`): backends that answer with
//! their own name (so a client learns which one served it), clients that ask a VIP or a
//! NodePort once or many times, the `hypha service` commands, and the `hypha_lb_*` maps a
//! node pinned.

use std::collections::BTreeMap;
use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, Map, MapData};
use hypha_api::{ServiceBackendInfo, ServiceInfo};
use hypha_common::lb::{self, LbBackend4, LbBackend6, LbKey4, LbKey6, LbMaglev, LbService};

use crate::cluster::{Cluster, ClusterOpts};
use crate::netns::NamedNetns;
use crate::node::Node;
use crate::traffic::{listen_any, udp_any};

/// How long a client waits for a connection or an answer (a fresh pod's first IPv6
/// packets wait about 2 s for its veth's DAD).
pub const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// A backend: on TCP `port` it writes its name and a newline to every connection, then
/// echoes what it reads until the client closes; on UDP `port` it answers every datagram
/// with its name. Both families ([`listen_any`], [`udp_any`]). It records the address of
/// every client it sees (a NodePort with `externalTrafficPolicy: Local` keeps the
/// client's). Runs until dropped.
pub struct NameServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl NameServer {
    pub fn start(ns: &NamedNetns, name: &str, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();

        let (flag, seen, answer, ready) = (
            stop.clone(),
            peers.clone(),
            format!("{name}\n"),
            ready_tx.clone(),
        );
        let tcp = ns.spawn(move || {
            let listener = listen_any(port);
            listener.set_nonblocking(true).expect("nonblocking");
            ready.send(()).expect("ready");
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, peer)) => {
                        seen.lock().expect("peers").push(peer);
                        let (flag, answer) = (flag.clone(), answer.clone());
                        std::thread::spawn(move || serve_tcp(s, &answer, &flag));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });

        let (flag, seen, answer) = (stop.clone(), peers.clone(), name.to_owned());
        let udp = ns.spawn(move || {
            let sock = udp_any(port);
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                    seen.lock().expect("peers").push(peer);
                    let _ = sock.send_to(answer.as_bytes(), peer);
                }
            }
        });
        for _ in 0..2 {
            ready_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("name server ready");
        }
        NameServer {
            stop,
            threads: vec![tcp, udp],
            peers,
        }
    }

    /// The client addresses seen so far (TCP connections and UDP datagrams), in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }
}

/// One TCP connection of a [`NameServer`]: the name, then an echo until EOF or stop.
fn serve_tcp(mut s: TcpStream, answer: &str, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    if s.write_all(answer.as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a client got: the backend's name, and the peer the client's socket shows
/// (`getpeername` for TCP, the source of the reply for UDP): the VIP, never the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub name: String,
    pub peer: SocketAddr,
}

/// Connects from the calling thread (already in the client's namespace) and reads the
/// backend's name; the stream stays open for the caller.
fn connect_here(to: SocketAddr) -> io::Result<(TcpStream, Answer)> {
    let s = TcpStream::connect_timeout(&to, ASK_TIMEOUT)?;
    s.set_read_timeout(Some(ASK_TIMEOUT))?;
    let peer = s.peer_addr()?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    if !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("no name from {to}: {line:?}"),
        ));
    }
    let name = line.trim_end().to_owned();
    Ok((s, Answer { name, peer }))
}

/// One TCP connection from `from` to `to:port`: which backend answered, and what
/// `getpeername` said. The connection is closed.
pub fn ask_tcp(from: &NamedNetns, to: impl Into<IpAddr>, port: u16) -> io::Result<Answer> {
    let to = SocketAddr::new(to.into(), port);
    from.spawn(move || connect_here(to).map(|(_, a)| a))
        .join()
        .expect("client thread")
}

/// One UDP datagram from `from` to `to:port` (an unconnected socket: `sendto` and
/// `recvfrom`): which backend answered, and the source address of its reply.
pub fn ask_udp(from: &NamedNetns, to: impl Into<IpAddr>, port: u16) -> io::Result<Answer> {
    let to = SocketAddr::new(to.into(), port);
    from.spawn(move || {
        let any = match to {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let sock = UdpSocket::bind(any)?;
        sock.set_read_timeout(Some(ASK_TIMEOUT))?;
        sock.send_to(b"who", to)?;
        let mut buf = [0u8; 256];
        let (n, peer) = sock.recv_from(&mut buf)?;
        let name = String::from_utf8_lossy(&buf[..n]).into_owned();
        Ok(Answer { name, peer })
    })
    .join()
    .expect("client thread")
}

/// Failed connections after which [`tally_tcp`] stops (each may cost [`ASK_TIMEOUT`]).
const TALLY_MAX_ERRORS: usize = 5;

/// `n` TCP connections, one after the other, from `from` to `to:port`: how many each
/// backend served. A failed connection is counted under `error: <kind>` (after
/// [`TALLY_MAX_ERRORS`] of them it stops); a connection whose `getpeername` is not
/// `to:port` under `peer <address>`.
pub fn tally_tcp(
    from: &NamedNetns,
    to: impl Into<IpAddr>,
    port: u16,
    n: usize,
) -> BTreeMap<String, usize> {
    let to = SocketAddr::new(to.into(), port);
    from.spawn(move || {
        let (mut tally, mut errors) = (BTreeMap::new(), 0);
        for _ in 0..n {
            let key = match connect_here(to) {
                Ok((_, a)) if a.peer == to => a.name,
                Ok((_, a)) => format!("peer {}", a.peer),
                Err(e) => {
                    errors += 1;
                    format!("error: {:?}", e.kind())
                }
            };
            *tally.entry(key).or_insert(0) += 1;
            if errors == TALLY_MAX_ERRORS {
                break;
            }
        }
        tally
    })
    .join()
    .expect("client thread")
}

/// An open TCP connection through a service, kept for the test to use later.
pub struct Held {
    stream: TcpStream,
    /// The backend that answered.
    pub name: String,
}

impl Held {
    /// Connects `from` to `to:port` and reads the backend's name.
    pub fn open(from: &NamedNetns, to: impl Into<IpAddr>, port: u16) -> Self {
        let to = SocketAddr::new(to.into(), port);
        let (stream, answer) = from
            .spawn(move || connect_here(to))
            .join()
            .expect("client thread")
            .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
        Held {
            stream,
            name: answer.name,
        }
    }

    /// Sends `rounds` messages and reads each back; the error if any round trip fails.
    pub fn talk(&mut self, rounds: usize) -> io::Result<()> {
        for i in 0..rounds {
            let msg = [i as u8; 512];
            self.stream.write_all(&msg)?;
            let mut back = [0u8; 512];
            self.stream.read_exact(&mut back)?;
            if back != msg {
                return Err(io::Error::other("the echo differs"));
            }
        }
        Ok(())
    }
}

/// A TCP connect from `from` to `to:port` that must fail: its error and how long it took
/// (a refusal, not a timeout: no backend answers at once). Panics if it connects.
pub fn refused_tcp(from: &NamedNetns, to: impl Into<IpAddr>, port: u16) -> (io::Error, Duration) {
    let to = SocketAddr::new(to.into(), port);
    from.spawn(move || {
        let start = Instant::now();
        match TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
            Ok(s) => panic!(
                "connect to {to} succeeded (peer {:?}), expected a refusal",
                s.peer_addr()
            ),
            Err(e) => (e, start.elapsed()),
        }
    })
    .join()
    .expect("client thread")
}

/// A `Service` document: `namespace/name`, selecting `app=<app>` (no selector when `app`
/// is empty), with `spec_extra` (YAML lines at the spec's level, e.g. `type: NodePort`)
/// and `ports` (flow mappings, e.g. `{name: web, protocol: TCP, port: 80, targetPort:
/// 8080}`).
pub fn service_yaml(
    namespace: &str,
    name: &str,
    app: &str,
    spec_extra: &[&str],
    ports: &[&str],
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n"
    );
    if !app.is_empty() {
        y.push_str(&format!("  selector:\n    app: {app}\n"));
    }
    for line in spec_extra {
        y.push_str(&format!("  {line}\n"));
    }
    y.push_str("  ports:\n");
    for p in ports {
        y.push_str(&format!("  - {p}\n"));
    }
    y
}

/// `hypha service apply -f` of `yaml` written to `<node dir>/<file>.yaml`: (success,
/// stdout, stderr).
pub fn try_apply(node: &Node, file: &str, yaml: &str) -> (bool, String, String) {
    let path = node.dir.join(format!("{file}.yaml"));
    std::fs::write(&path, yaml).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    node.hypha(&["service", "apply", "-f", &path.display().to_string()])
}

/// As [`try_apply`], panicking with the CLI's error and the agent's log.
pub fn apply(node: &Node, file: &str, yaml: &str) {
    let (ok, out, err) = try_apply(node, file, yaml);
    assert!(
        ok,
        "hypha service apply {file}: {out}{err}\n{yaml}\nagent log:\n{}",
        node.log()
    );
}

/// `hypha service delete NAMESPACE/NAME`, panicking on failure.
pub fn delete(node: &Node, key: &str) {
    let (ok, out, err) = node.hypha(&["service", "delete", key]);
    assert!(ok, "hypha service delete {key}: {out}{err}");
}

/// `hypha service list -o json`.
pub fn list(node: &Node) -> Vec<ServiceInfo> {
    let (ok, out, err) = node.hypha(&["service", "list", "-o", "json"]);
    assert!(ok, "hypha service list -o json: {out}{err}");
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("hypha service list -o json is not a service list ({e}): {out}"))
}

/// The service `key` (`namespace/name`) as `node` lists it, if it does.
pub fn find(node: &Node, key: &str) -> Option<ServiceInfo> {
    list(node)
        .into_iter()
        .find(|s| format!("{}/{}", s.namespace, s.name) == key)
}

/// The backends of `svc`'s port `i` of its primary family (that of its first ClusterIP;
/// a dual-stack service lists each pod once per family).
pub fn primary_backends(svc: &ServiceInfo, i: usize) -> Vec<&ServiceBackendInfo> {
    let v6 = svc.cluster_ips.first().is_some_and(IpAddr::is_ipv6);
    svc.ports[i]
        .backends
        .iter()
        .filter(|b| b.address.is_ipv6() == v6)
        .collect()
}

/// The service `key` once every one of its ports has exactly `n` backends of its primary
/// family on `node` (backends follow pods asynchronously in cluster mode); panics after
/// `limit` with what it lists.
pub fn wait_backends(node: &Node, key: &str, n: usize, limit: Duration) -> ServiceInfo {
    let start = Instant::now();
    loop {
        let svc = find(node, key);
        if let Some(s) = &svc
            && !s.ports.is_empty()
            && (0..s.ports.len()).all(|i| primary_backends(s, i).len() == n)
        {
            return svc.expect("just matched");
        }
        if start.elapsed() > limit {
            panic!(
                "{key} has not {n} backends per port on {} after {limit:?}: {svc:#?}",
                node.tag
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The ClusterIP of `svc` of the family of `v6`.
pub fn vip(svc: &ServiceInfo, v6: bool) -> IpAddr {
    svc.cluster_ips
        .iter()
        .copied()
        .find(|a| a.is_ipv6() == v6)
        .unwrap_or_else(|| {
            panic!(
                "{}/{} has no IPv{} ClusterIP: {svc:#?}",
                svc.namespace,
                svc.name,
                if v6 { 6 } else { 4 }
            )
        })
}

/// The NodePort of `svc`'s port `port_name`.
pub fn node_port(svc: &ServiceInfo, port_name: &str) -> u16 {
    svc.ports
        .iter()
        .find(|p| p.name == port_name)
        .and_then(|p| p.node_port)
        .unwrap_or_else(|| panic!("no NodePort for port {port_name:?}: {svc:#?}"))
}

/// How many entries each `hypha_lb_*` map the agent writes holds in `node`'s pins
/// (a map not pinned counts as empty: it was never used).
pub fn lb_map_entries(node: &Node) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::new();
    out.insert(
        lb::maps::SERVICES4,
        count::<LbKey4, LbService>(node, lb::maps::SERVICES4),
    );
    out.insert(
        lb::maps::SERVICES6,
        count::<LbKey6, LbService>(node, lb::maps::SERVICES6),
    );
    out.insert(
        lb::maps::BACKENDS4,
        count::<u32, LbBackend4>(node, lb::maps::BACKENDS4),
    );
    out.insert(
        lb::maps::BACKENDS6,
        count::<u32, LbBackend6>(node, lb::maps::BACKENDS6),
    );
    out.insert(
        lb::maps::MAGLEV,
        count::<u32, LbMaglev>(node, lb::maps::MAGLEV),
    );
    out
}

/// Entries of the hash map `name` pinned by `node`.
fn count<K: aya::Pod, V: aya::Pod>(node: &Node, name: &str) -> usize {
    let path = node.pin_dir.join(name);
    if !path.exists() {
        return 0;
    }
    let data = MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("open the pinned {}: {e}", path.display()));
    let map: HashMap<MapData, K, V> = HashMap::try_from(Map::HashMap(data))
        .unwrap_or_else(|e| panic!("{name} is a hash map: {e}"));
    map.keys().filter(Result::is_ok).count()
}

/// The name the cluster tests give each node's underlay veth, the device `hypha_from_netdev`
/// serves NodePorts on (`--nodeport-device`).
pub const UNDERLAY_DEVICE: &str = "ul0";

/// The world's IPv6 address on the underlay bridge of a [`nodeport_cluster`]; node `i`
/// has [`underlay6`]`(i)` on its [`UNDERLAY_DEVICE`]. Outside every cluster CIDR (those
/// are `fd00:<y>::/48`).
pub const WORLD6: Ipv6Addr = Ipv6Addr::new(0xfdde, 0x5e, 0, 0, 0, 0, 0, 1);

/// Node `i`'s IPv6 address on the underlay of a [`nodeport_cluster`]: a NodePort
/// address of its own (the tunnel itself runs over IPv4).
pub fn underlay6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfdde, 0x5e, 0, 0, 0, 0, 0, 10 + i as u16)
}

/// A [`Cluster`] of `n` nodes whose underlay veths are renamed [`UNDERLAY_DEVICE`] before
/// their agents start with `--nodeport-device ul0`: the underlay namespace (etcd's, no
/// node) is then the "world" NodePorts are reached from, over IPv4 and IPv6 ([`WORLD6`],
/// [`underlay6`]).
pub fn nodeport_cluster(n: usize) -> Cluster {
    let mut c = Cluster::start(0, ClusterOpts::default());
    c.underlay.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{WORLD6}/64"),
        "dev",
        c.bridge(),
        "nodad",
    ]);
    for i in 0..n {
        let node = c.new_node(None, &["--nodeport-device", UNDERLAY_DEVICE]);
        let out = node.netns.exec(&["ip", "-4", "-o", "addr", "show"]);
        let veth = out
            .lines()
            .find(|l| l.contains(" inet 172."))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_else(|| panic!("no underlay veth in {}: {out}", node.netns.name()))
            .to_owned();
        node.netns.exec(&["ip", "link", "set", &veth, "down"]);
        node.netns
            .exec(&["ip", "link", "set", &veth, "name", UNDERLAY_DEVICE]);
        node.netns
            .exec(&["ip", "link", "set", UNDERLAY_DEVICE, "up"]);
        node.netns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{}/64", underlay6(i)),
            "dev",
            UNDERLAY_DEVICE,
            "nodad",
        ]);
        c.nodes.push(node);
        c.nodes.last_mut().expect("just pushed").start_agent();
    }
    c
}

/// The Maglev table `node` programmed for the IPv4 frontend `vip:port`/`proto` as its
/// pods and host reach it ([`lb::LB_SCOPE_INTERNAL`]): each slot's backend, as
/// (address, port).
pub fn maglev_table4(node: &Node, vip: Ipv4Addr, port: u16, proto: u8) -> Vec<(Ipv4Addr, u16)> {
    let open = |name: &str| {
        let path = node.pin_dir.join(name);
        MapData::from_pin(&path)
            .unwrap_or_else(|e| panic!("open the pinned {}: {e}", path.display()))
    };
    let services: HashMap<MapData, LbKey4, LbService> =
        HashMap::try_from(Map::HashMap(open(lb::maps::SERVICES4))).expect("a hash map");
    let key = LbKey4 {
        addr: u32::from_ne_bytes(vip.octets()),
        port: port.to_be(),
        proto,
        scope: lb::LB_SCOPE_INTERNAL,
    };
    let svc = services
        .get(&key, 0)
        .unwrap_or_else(|e| panic!("no frontend {vip}:{port}/{proto} in {}: {e}", node.tag));
    let maglev: HashMap<MapData, u32, LbMaglev> =
        HashMap::try_from(Map::HashMap(open(lb::maps::MAGLEV))).expect("a hash map");
    let table = maglev
        .get(&svc.id, 0)
        .unwrap_or_else(|e| panic!("no Maglev table for service id {}: {e}", svc.id));
    let backends: HashMap<MapData, u32, LbBackend4> =
        HashMap::try_from(Map::HashMap(open(lb::maps::BACKENDS4))).expect("a hash map");
    table
        .slots
        .iter()
        .map(|id| {
            let b = backends
                .get(id, 0)
                .unwrap_or_else(|e| panic!("slot names backend {id}, not in the map: {e}"));
            (Ipv4Addr::from(b.addr.to_ne_bytes()), u16::from_be(b.port))
        })
        .collect()
}
