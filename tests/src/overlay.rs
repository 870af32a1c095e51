//! Helpers of the overlay tests (`tests/tests/overlay.rs`) and the cluster demo: the
//! tunnel maps a node pinned, its VXLAN device and underlay link, VXLAN packets crafted
//! byte by byte (to show what the receiving node makes of a VNI and an outer source),
//! kernel counters of a namespace, and a census of what a [`Cluster`] leaves behind.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Map, MapData};
use hypha_common::{TunnelPeer, maps};

use crate::cluster::Cluster;
use crate::netns::NamedNetns;
use crate::node::Node;

/// The agent's VXLAN device by default (`--tunnel-device`).
pub const TUNNEL_DEVICE: &str = "hypha_vxlan";
/// The tunnel's UDP port by default (`--tunnel-port`).
pub const TUNNEL_PORT: u16 = hypha_common::DEFAULT_TUNNEL_PORT;

/// The pinned `hypha_tunnel4` of `node`: `(pod CIDR address, prefix length)` → peer.
pub fn tunnel4(node: &Node) -> BTreeMap<(Ipv4Addr, u32), TunnelPeer> {
    let path = node.pin_dir.join(maps::TUNNEL4);
    let data = MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("open the pinned {}: {e}", path.display()));
    let trie: LpmTrie<MapData, u32, TunnelPeer> =
        LpmTrie::try_from(Map::LpmTrie(data)).expect("hypha_tunnel4 is an LPM trie");
    trie.iter()
        .map(|entry| {
            let (k, v) = entry.expect("iterate hypha_tunnel4");
            ((Ipv4Addr::from(k.data().to_ne_bytes()), k.prefix_len()), v)
        })
        .collect()
}

/// The pinned `hypha_tunnel6` of `node`: `(pod CIDR address, prefix length)` → peer.
pub fn tunnel6(node: &Node) -> BTreeMap<(Ipv6Addr, u32), TunnelPeer> {
    let path = node.pin_dir.join(maps::TUNNEL6);
    let data = MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("open the pinned {}: {e}", path.display()));
    let trie: LpmTrie<MapData, [u8; 16], TunnelPeer> =
        LpmTrie::try_from(Map::LpmTrie(data)).expect("hypha_tunnel6 is an LPM trie");
    trie.iter()
        .map(|entry| {
            let (k, v) = entry.expect("iterate hypha_tunnel6");
            ((Ipv6Addr::from(k.data()), k.prefix_len()), v)
        })
        .collect()
}

/// A peer's IPv4 underlay address (`TunnelPeer::addr4` is in network byte order).
pub fn peer_addr4(peer: &TunnelPeer) -> Ipv4Addr {
    Ipv4Addr::from(peer.addr4.to_ne_bytes())
}

/// `ip -j link show IFNAME` in `ns`, parsed (with `-d`: the kind's details).
pub fn link_json(ns: &NamedNetns, ifname: &str) -> serde_json::Value {
    let out = ns.exec(&["ip", "-d", "-j", "link", "show", "dev", ifname]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j link ({e}): {out}"));
    v.as_array()
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or_else(|| panic!("no link {ifname} in {}: {out}", ns.name()))
}

/// The MTU of `ifname` in `ns`.
pub fn link_mtu(ns: &NamedNetns, ifname: &str) -> u32 {
    let link = link_json(ns, ifname);
    link["mtu"]
        .as_u64()
        .unwrap_or_else(|| panic!("no mtu in {link}")) as u32
}

/// The MAC address of `ifname` in `ns`.
pub fn link_mac(ns: &NamedNetns, ifname: &str) -> [u8; 6] {
    let link = link_json(ns, ifname);
    let text = link["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in {link}"));
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("MAC {text}: {e}")))
        .collect();
    bytes
        .try_into()
        .unwrap_or_else(|_| panic!("MAC {text} is not 6 bytes"))
}

/// The name of the interface holding `address` in `ns` (a node's underlay veth).
pub fn ifname_of(ns: &NamedNetns, address: IpAddr) -> String {
    let out = ns.exec(&["ip", "-j", "addr", "show"]);
    let links: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j addr ({e}): {out}"));
    links
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| {
            l["addr_info"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["local"].as_str() == Some(&address.to_string()))
        })
        .and_then(|l| l["ifname"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no interface holds {address} in {}: {out}", ns.name()))
}

/// A counter of `/proc/net/snmp` (`Tcp` `PassiveOpens`, `Icmp` `InEchos`, ...) as
/// `ns` sees it.
pub fn snmp(ns: &NamedNetns, group: &str, name: &str) -> u64 {
    let text = ns.exec(&["cat", "/proc/net/snmp"]);
    let prefix = format!("{group}:");
    let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
        panic!("no {group} rows in /proc/net/snmp of {}: {text}", ns.name());
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {group} {name} in /proc/net/snmp: {text}"))
}

/// The Internet checksum (RFC 1071) of `parts`, concatenated (each of even length but
/// the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            let word = if pair.len() == 2 {
                u16::from_be_bytes([pair[0], pair[1]])
            } else {
                u16::from_be_bytes([pair[0], 0])
            };
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What a crafted inner packet carries above IP.
#[derive(Clone, Copy, Debug)]
pub enum Inner {
    /// A TCP SYN from `sport` to `dport`.
    TcpSyn { sport: u16, dport: u16 },
    /// An ICMP (IPv4) or ICMPv6 (IPv6) echo request.
    Echo { id: u16, seq: u16 },
}

/// The L4 header and payload of `inner`, its checksum computed over `pseudo` (the IP
/// pseudo header; empty for ICMPv4, which has none).
fn l4(inner: Inner, v6: bool, pseudo: impl Fn(u8, usize) -> Vec<u8>) -> (u8, Vec<u8>) {
    match inner {
        Inner::TcpSyn { sport, dport } => {
            let mut tcp = Vec::with_capacity(20);
            tcp.extend(sport.to_be_bytes());
            tcp.extend(dport.to_be_bytes());
            tcp.extend(0x4879_0001u32.to_be_bytes()); // sequence
            tcp.extend(0u32.to_be_bytes()); // acknowledgement
            tcp.extend([5 << 4, 0x02]); // data offset 5 words; SYN
            tcp.extend(64240u16.to_be_bytes()); // window
            tcp.extend([0, 0, 0, 0]); // checksum, urgent pointer
            let sum = checksum(&[&pseudo(6, tcp.len()), &tcp]);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            (6, tcp)
        }
        Inner::Echo { id, seq } => {
            let (proto, kind) = if v6 { (58u8, 128u8) } else { (1, 8) };
            let mut icmp = vec![kind, 0, 0, 0];
            icmp.extend(id.to_be_bytes());
            icmp.extend(seq.to_be_bytes());
            icmp.extend(b"hypha-vni-test");
            let sum = if v6 {
                checksum(&[&pseudo(proto, icmp.len()), &icmp])
            } else {
                checksum(&[&icmp])
            };
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            (proto, icmp)
        }
    }
}

/// An IPv4 packet from `src` to `dst` carrying `inner`, DF set, TTL 64, checksums right.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, inner: Inner) -> Vec<u8> {
    let pseudo = |proto: u8, len: usize| {
        let mut p = Vec::with_capacity(12);
        p.extend(src.octets());
        p.extend(dst.octets());
        p.extend([0, proto]);
        p.extend((len as u16).to_be_bytes());
        p
    };
    let (proto, payload) = l4(inner, false, pseudo);
    let total = 20 + payload.len();
    let mut ip = vec![0x45, 0];
    ip.extend((total as u16).to_be_bytes());
    ip.extend(0x4879u16.to_be_bytes()); // identification
    ip.extend(0x4000u16.to_be_bytes()); // DF
    ip.extend([64, proto, 0, 0]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend(payload);
    ip
}

/// An IPv6 packet from `src` to `dst` carrying `inner`, hop limit 64, checksum right.
pub fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, inner: Inner) -> Vec<u8> {
    let pseudo = |proto: u8, len: usize| {
        let mut p = Vec::with_capacity(40);
        p.extend(src.octets());
        p.extend(dst.octets());
        p.extend((len as u32).to_be_bytes());
        p.extend([0, 0, 0, proto]);
        p
    };
    let (proto, payload) = l4(inner, true, pseudo);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend((payload.len() as u16).to_be_bytes());
    ip.extend([proto, 64]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    ip.extend(payload);
    ip
}

/// An inner IP packet from `src` to `dst` (one family) carrying `inner`.
pub fn ip_packet(src: IpAddr, dst: IpAddr, inner: Inner) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_packet(s, d, inner),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_packet(s, d, inner),
        _ => panic!("an inner packet from {src} to {dst} mixes families"),
    }
}

/// A VXLAN payload (RFC 7348: flags with the I bit, the 24-bit VNI) around an Ethernet
/// frame `dst_mac` ← `src_mac` carrying `ip` (its EtherType from its version nibble).
pub fn vxlan_payload(vni: u32, dst_mac: [u8; 6], src_mac: [u8; 6], ip: &[u8]) -> Vec<u8> {
    assert!(vni < 1 << 24, "a VNI has 24 bits: {vni}");
    let mut out = vec![0x08, 0, 0, 0];
    out.extend(&(vni << 8).to_be_bytes());
    out.extend(dst_mac);
    out.extend(src_mac);
    let ethertype: u16 = if ip.first().is_some_and(|b| b >> 4 == 6) {
        0x86dd
    } else {
        0x0800
    };
    out.extend(ethertype.to_be_bytes());
    out.extend(ip);
    out
}

/// Sends `payload` in one UDP datagram from `from` (an address of `ns`, any port) to
/// `to`: a VXLAN packet as another node (or an intruder on the underlay) sends it.
pub fn send_udp(ns: &NamedNetns, from: IpAddr, to: SocketAddr, payload: Vec<u8>) {
    ns.spawn(move || {
        let sock = UdpSocket::bind(SocketAddr::new(from, 0))
            .unwrap_or_else(|e| panic!("bind a UDP socket to {from}: {e}"));
        sock.send_to(&payload, to)
            .unwrap_or_else(|e| panic!("send a VXLAN packet from {from} to {to}: {e}"));
    })
    .join()
    .expect("sender thread");
}

/// A TCP segment or ICMP message a [`Capture`] saw (ports 0 for ICMP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6: TCP, 1: ICMP, 58: ICMPv6, ...).
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// The addresses, protocol and ports of an IP packet (no IPv6 extension headers).
pub fn parse_seen(ip: &[u8]) -> Option<Seen> {
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match ip.first()? >> 4 {
        4 => {
            let ihl = usize::from(ip[0] & 0xf) * 4;
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (src.into(), dst.into(), *ip.get(9)?, ip.get(ihl..)?)
        }
        6 => {
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (src.into(), dst.into(), *ip.get(6)?, ip.get(40..)?)
        }
        _ => return None,
    };
    let (sport, dport) = match (proto, l4.get(..4)) {
        (6 | 17, Some(p)) => (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ),
        _ => (0, 0),
    };
    Some(Seen {
        src,
        dst,
        proto,
        sport,
        dport,
    })
}

/// Every IP packet crossing `ifname` in a namespace (both ways), read from an
/// `AF_PACKET` socket on a thread of that namespace until dropped: proof that a packet
/// reached a pod, or did not.
pub struct Capture {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    pub fn start(ns: &NamedNetns, ifname: &str) -> Capture {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (list, flag, ifname, ns_name) = (
            seen.clone(),
            stop.clone(),
            ifname.to_owned(),
            ns.name().to_owned(),
        );
        let thread = ns.spawn(move || {
            let fd = packet_socket(&ifname)
                .unwrap_or_else(|e| panic!("a packet socket on {ifname} in {ns_name}: {e}"));
            ready_tx.send(()).expect("capture ready");
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: reads into a buffer we own, of the length given.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0
                    && let Some(s) = parse_seen(&buf[..n as usize])
                {
                    list.lock().expect("capture list").push(s);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("capture ready");
        Capture {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Whether a packet matching `pred` has been seen, waiting up to `limit` for one.
    pub fn saw(&self, limit: Duration, pred: impl Fn(&Seen) -> bool) -> bool {
        let start = Instant::now();
        loop {
            if self.seen.lock().expect("capture list").iter().any(&pred) {
                return true;
            }
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An `AF_PACKET`/`SOCK_DGRAM` socket for every protocol, bound to `ifname` of the
/// calling thread's namespace, its reads timing out after 50 ms.
fn packet_socket(ifname: &str) -> std::io::Result<OwnedFd> {
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(all)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).expect("no NUL in an interface name");
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: zeroed sockaddr_ll is valid; the fields set are plain integers.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = index as i32;
    // SAFETY: addr outlives the call; the length is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: timeout outlives the call; the length is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// What a cluster made outside the test process's memory: namespaces, directories,
/// pins and processes. Taken before the cluster drops, checked after.
pub struct Footprint {
    netns: Vec<String>,
    paths: Vec<PathBuf>,
    pids: Vec<(String, u32)>,
}

impl Footprint {
    /// Everything `cluster` and `pods` (namespaces of pods made on its nodes) hold now.
    pub fn of(cluster: &Cluster, pods: &[&NamedNetns]) -> Footprint {
        let mut netns = vec![cluster.underlay.name().to_owned()];
        let mut paths = vec![cluster.etcd.data_dir()];
        let mut pids = Vec::new();
        for (i, node) in cluster.nodes.iter().enumerate() {
            netns.push(node.netns.name().to_owned());
            paths.extend([node.pin_dir.clone(), node.dir.clone()]);
            if let Some(pid) = node.agent_pid() {
                pids.push((format!("node-{i}'s agent"), pid));
            }
        }
        if let Some(pid) = cluster.etcd.pid() {
            pids.push(("etcd".to_owned(), pid));
        }
        netns.extend(pods.iter().map(|p| p.name().to_owned()));
        Footprint { netns, paths, pids }
    }

    /// What is still there, one line each (empty: nothing).
    pub fn left(&self) -> Vec<String> {
        let mut left = Vec::new();
        let listed = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for n in &self.netns {
            if listed.contains(n) {
                left.push(format!("network namespace {n}"));
            }
        }
        for p in &self.paths {
            if p.exists() {
                left.push(format!("path {}", p.display()));
            }
        }
        for (what, pid) in &self.pids {
            // A zombie would still answer kill(0); /proc/<pid>/stat says which.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            if state.is_some_and(|s| s != "Z") {
                left.push(format!("{what} (pid {pid}): {}", stat.trim()));
            }
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let ip = ipv4_packet(
            Ipv4Addr::new(10, 1, 2, 3),
            Ipv4Addr::new(10, 4, 5, 6),
            Inner::TcpSyn {
                sport: 40000,
                dport: 8080,
            },
        );
        assert_eq!(ip.len(), 40);
        assert_eq!(checksum(&[&ip[..20]]), 0, "IPv4 header");
        let mut pseudo = Vec::new();
        pseudo.extend([10, 1, 2, 3, 10, 4, 5, 6, 0, 6, 0, 20]);
        assert_eq!(checksum(&[&pseudo, &ip[20..]]), 0, "TCP");

        let ip = ipv4_packet(
            Ipv4Addr::new(10, 1, 2, 3),
            Ipv4Addr::new(10, 4, 5, 6),
            Inner::Echo { id: 7, seq: 1 },
        );
        assert_eq!(checksum(&[&ip[20..]]), 0, "ICMP");

        let (s, d): (Ipv6Addr, Ipv6Addr) = ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        let ip = ipv6_packet(s, d, Inner::Echo { id: 7, seq: 1 });
        let len = ip.len() - 40;
        let mut pseudo = Vec::new();
        pseudo.extend(s.octets());
        pseudo.extend(d.octets());
        pseudo.extend((len as u32).to_be_bytes());
        pseudo.extend([0, 0, 0, 58]);
        assert_eq!(checksum(&[&pseudo, &ip[40..]]), 0, "ICMPv6");
    }

    #[test]
    fn packets_are_read_back_as_they_were_made() {
        let (s, d) = (Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(10, 4, 5, 6));
        let ip = ipv4_packet(
            s,
            d,
            Inner::TcpSyn {
                sport: 4000,
                dport: 8080,
            },
        );
        assert_eq!(
            parse_seen(&ip),
            Some(Seen {
                src: s.into(),
                dst: d.into(),
                proto: 6,
                sport: 4000,
                dport: 8080
            })
        );
        let (s, d): (Ipv6Addr, Ipv6Addr) = ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        let ip = ipv6_packet(s, d, Inner::Echo { id: 1, seq: 2 });
        assert_eq!(
            parse_seen(&ip),
            Some(Seen {
                src: s.into(),
                dst: d.into(),
                proto: 58,
                sport: 0,
                dport: 0
            })
        );
        assert_eq!(parse_seen(&[0x45, 0, 0]), None);
    }

    #[test]
    fn a_vxlan_payload_carries_the_vni_and_the_ethertype() {
        let p = vxlan_payload(0x012345, [1; 6], [2; 6], &[0x60, 0, 0, 0]);
        assert_eq!(&p[..8], &[0x08, 0, 0, 0, 0x01, 0x23, 0x45, 0]);
        assert_eq!(&p[8..14], &[1; 6]);
        assert_eq!(&p[14..20], &[2; 6]);
        assert_eq!(&p[20..22], &[0x86, 0xdd]);
        let p = vxlan_payload(300, [1; 6], [2; 6], &[0x45]);
        assert_eq!(&p[20..22], &[0x08, 0x00]);
    }
}
