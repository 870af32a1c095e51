//! `BPF_PROG_TEST_RUN` tests of NodePort: `hypha_from_netdev` (the node's external
//! device) translating what a client outside the node sends to a NodePort frontend,
//! and the reverse translation of the backend's replies in `hypha_from_pod` (a backend
//! on this node) and in `hypha_from_netdev` itself (a backend on another node reached
//! by native routing, whose reply comes back to the SNAT address).
//!
//! **Privileged**: every test loads the eBPF object (CAP_BPF, CAP_SYS_ADMIN for a
//! private bpffs) and creates devices, addresses, routes and neighbours in a fresh
//! network namespace of its own (CAP_NET_ADMIN), which `bpf_fib_lookup` answers from.
//! Run as root, after `cargo xtask build-ebpf`.
//!
//! A test run gives no tunnel metadata, so `hypha_from_tunnel`'s reverse translation
//! (the same `reply4` / `reply6` as here) is covered end to end only; here the tunnel shows as the
//! verdict `TC_ACT_REDIRECT` and the node's `tx` counter. Expected frames are built from
//! scratch with their checksums computed anew, so comparing whole frames checks every
//! checksum the programs updated incrementally.

use aya::maps::{Array, HashMap, MapData, PerCpuHashMap, PerCpuValues};
use hypha_common::{
    Counter, DIR_INGRESS, DropKey, DropReason, EndpointInfo, NodeConfig, TunnelConfig, TunnelPeer,
    lb::{
        LB_BACKEND_F_LOCAL, LB_F_LOCAL, LB_F_NODEPORT, LB_MAGLEV_SIZE, LB_SCOPE_EXTERNAL,
        LB_SCOPE_INTERNAL, LbBackend4, LbBackend6, LbBackendStats, LbKey4, LbKey6, LbMaglev,
        LbService, maps as lb_maps,
    },
    nat::{
        FROM_NETDEV, NAT_DIR_FORWARD, NAT_DIR_REVERSE, NAT_PORT_FIRST, NAT4, NAT6, NatKey4,
        NatKey6, NatValue4, NatValue6, SNAT6,
    },
    programs::FROM_POD,
};
use hypha_tests::ebpf::{
    Datapath, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestNetns, eth, hopped, ipv4_checksum,
    with_ttl,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_HLEN: usize = 14;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// The node's address on its external device, and a client outside.
const NODE4: [u8; 4] = [192, 168, 50, 1];
const CLIENT4: [u8; 4] = [192, 168, 50, 9];
const NODE6: [u8; 16] = [0xfd, 0, 0, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
const EXT_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x09];
/// The MAC of 192.168.50.2, the router to node 2's pod CIDR under native routing.
const ROUTER_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x02];

/// This node's pods' gateway, and pod B, a backend on this node.
const GATEWAY4: [u8; 4] = [10, 244, 0, 1];
const B4: [u8; 4] = [10, 244, 0, 5];
const B6: [u8; 16] = [0xfd, 0, 0x02, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
const B_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x05];
const HOST_B_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];
/// Pod R, a backend on node 2 (10.244.1.0/24).
const R4: [u8; 4] = [10, 244, 1, 7];
const NODE2_CIDR4: [u8; 4] = [10, 244, 1, 0];
const NODE2_UNDERLAY: [u8; 4] = [192, 168, 77, 2];
const NODE2: u32 = 0x5eed_0002;

const NODE_PORT: u16 = 30080;
const TARGET_PORT: u16 = 8080;
const CLIENT_PORT: u16 = 40000;

/// Service (frontend) ids and backend ids.
const SVC4: u32 = 7;
const SVC6: u32 = 8;
const BACKEND_B: u32 = 1;
const BACKEND_B2: u32 = 2;
const BACKEND_R: u32 = 3;
const BACKEND_B6: u32 = 11;
const BACKEND_R6: u32 = 12;
/// Pod R6 on node 2 (fd00:244:0:1::/64), and this node's router address: its IPv6 SNAT
/// address.
const R6: [u8; 16] = [0xfd, 0, 0x02, 0x44, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7];
const NODE2_CIDR6: [u8; 16] = [0xfd, 0, 0x02, 0x44, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
const ROUTER6: [u8; 16] = [0xfd, 0, 0x02, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

// ---- frames ----

/// The Internet checksum of `data` (odd lengths padded with zero), added to `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for w in data.chunks(2) {
        let hi = u32::from(w[0]) << 8;
        sum += hi | w.get(1).map_or(0, |b| u32::from(*b));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP SYN (or, for UDP, a datagram) from `sport` to `dport` with a payload, its
/// checksum over `pseudo` (the pseudo-header) computed.
fn l4(proto: u8, sport: u16, dport: u16, pseudo: &[u8]) -> Vec<u8> {
    let payload = b"hypha!";
    let mut seg = Vec::new();
    seg.extend_from_slice(&sport.to_be_bytes());
    seg.extend_from_slice(&dport.to_be_bytes());
    if proto == TCP {
        seg.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // sequence
        seg.extend_from_slice(&[0; 4]); // acknowledgement
        seg.extend_from_slice(&[0x50, 0x02]); // data offset 5, SYN
        seg.extend_from_slice(&64240u16.to_be_bytes()); // window
        seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    } else {
        seg.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        seg.extend_from_slice(&[0, 0]);
    }
    seg.extend_from_slice(payload);
    let mut p = pseudo.to_vec();
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    let mut sum = 0u32;
    for w in p.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    let csum = checksum(&seg, sum);
    let off = if proto == TCP { 16 } else { 6 };
    seg[off..off + 2].copy_from_slice(&csum.to_be_bytes());
    seg
}

/// An IPv4 packet of `proto` with valid checksums.
fn ip4(proto: u8, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let pseudo = [src, dst].concat();
    let payload = l4(proto, sport, dport, &pseudo);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0]); // id, DF
    ip.extend_from_slice(&[64, proto, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let csum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    ip.extend_from_slice(&payload);
    ip
}

/// An IPv6 packet of `proto` with a valid checksum.
fn ip6(proto: u8, src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16) -> Vec<u8> {
    let pseudo = [src, dst].concat();
    let payload = l4(proto, sport, dport, &pseudo);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[proto, 64]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(&payload);
    ip
}

/// What the client sends to the NodePort, as it arrives on the external device.
fn from_client4(proto: u8, sport: u16) -> Vec<u8> {
    eth(
        EXT_MAC,
        CLIENT_MAC,
        ETH_P_IP,
        &ip4(proto, CLIENT4, sport, NODE4, NODE_PORT),
    )
}

fn from_client6(proto: u8, sport: u16) -> Vec<u8> {
    eth(
        EXT_MAC,
        CLIENT_MAC,
        ETH_P_IPV6,
        &ip6(proto, CLIENT6, sport, NODE6, NODE_PORT),
    )
}

/// What the client must get back: from the NodePort, out of the external device.
fn to_client4(proto: u8, sport: u16) -> Vec<u8> {
    eth(
        CLIENT_MAC,
        EXT_MAC,
        ETH_P_IP,
        &ip4(proto, NODE4, NODE_PORT, CLIENT4, sport),
    )
}

fn to_client6(proto: u8, sport: u16) -> Vec<u8> {
    eth(
        CLIENT_MAC,
        EXT_MAC,
        ETH_P_IPV6,
        &ip6(proto, NODE6, NODE_PORT, CLIENT6, sport),
    )
}

fn run(cmd: &str) {
    let args: Vec<_> = cmd.split_whitespace().collect();
    // The child is forked from this thread, inside the test's namespace.
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd}: {out:?}");
}

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

// ---- the node ----

/// A node: its external device `hy-ext` (192.168.50.1/24, fd00:50::1/64) with the
/// client and a router as permanent neighbours, pod B behind a veth, a "VXLAN device"
/// (a veth: a test run only needs an ifindex), forwarding on.
struct Node {
    dp: Datapath,
    ext: u32,
    b: u32,
    vxlan: u32,
    // Last: the namespace, and the devices in it, go after everything else.
    _netns: TestNetns,
}

impl Node {
    /// The VXLAN device as the tunnel, and node 2 known by its underlay address with
    /// counters: the peer to route a family's CIDR of node 2 to.
    fn tunnel_to_node2(&mut self) -> TunnelPeer {
        self.dp.set_tunnel_config(TunnelConfig {
            ifindex: self.vxlan,
            flags: 0,
            local4: u32::from_ne_bytes([192, 168, 77, 1]),
            _pad: 0,
            local6: [0; 16],
        });
        self.dp.add_node4(NODE2_UNDERLAY, NODE2);
        self.dp.add_node_stats(NODE2);
        TunnelPeer {
            node_id: NODE2,
            flags: 0,
            addr4: u32::from_ne_bytes(NODE2_UNDERLAY),
            _pad: 0,
            addr6: [0; 16],
        }
    }

    fn new() -> Self {
        let netns = TestNetns::enter();
        let ext = netns.add_veth("hy-ext", "hy-ext-peer");
        let b = netns.add_veth("hy-host-b", "hy-pod-b");
        let vxlan = netns.add_veth("hy-vxlan", "hy-vxlan-peer");
        for cmd in [
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1".to_owned(),
            format!("ip link set hy-ext address {}", mac(EXT_MAC)),
            "ip link set hy-ext up".to_owned(),
            "ip link set hy-ext-peer up".to_owned(),
            "ip addr add 192.168.50.1/24 dev hy-ext".to_owned(),
            "ip -6 addr add fd00:50::1/64 dev hy-ext nodad".to_owned(),
            format!(
                "ip neigh add 192.168.50.9 lladdr {} dev hy-ext nud permanent",
                mac(CLIENT_MAC)
            ),
            format!(
                "ip neigh add 192.168.50.2 lladdr {} dev hy-ext nud permanent",
                mac(ROUTER_MAC)
            ),
            format!(
                "ip -6 neigh add fd00:50::9 lladdr {} dev hy-ext nud permanent",
                mac(CLIENT_MAC)
            ),
        ] {
            run(&cmd);
        }
        let mut dp = Datapath::load();
        dp.load_tunnel_programs();
        dp.load_program(FROM_NETDEV);
        dp.set_config(NodeConfig {
            gateway: u32::from_ne_bytes(GATEWAY4),
            flags: 0,
        });
        dp.add_endpoint_with(
            Some(B4),
            Some(B6),
            EndpointInfo {
                ifindex: b,
                endpoint_id: 1,
                pod_mac: B_MAC,
                host_mac: HOST_B_MAC,
                flags: 0,
            },
        );
        let mut node = Self {
            dp,
            ext,
            b,
            vxlan,
            _netns: netns,
        };
        node.backend4(BACKEND_B, B4, TARGET_PORT, LB_BACKEND_F_LOCAL);
        node.backend4(BACKEND_B2, B4, TARGET_PORT + 1, LB_BACKEND_F_LOCAL);
        node.backend4(BACKEND_R, R4, TARGET_PORT, 0);
        node.backend6(BACKEND_B6, B6, TARGET_PORT, LB_BACKEND_F_LOCAL);
        node
    }

    /// Makes `NODE4:NODE_PORT/proto` (external scope) frontend `SVC4` with `count`
    /// backends and `flags`, every Maglev slot naming `backend`.
    fn frontend4(&mut self, proto: u8, count: u32, flags: u32, backend: u32) {
        let mut services: HashMap<&mut MapData, LbKey4, LbService> =
            self.dp.map_mut(lb_maps::SERVICES4);
        let key = LbKey4 {
            addr: u32::from_ne_bytes(NODE4),
            port: NODE_PORT.to_be(),
            proto,
            scope: LB_SCOPE_EXTERNAL,
        };
        let svc = LbService {
            id: SVC4,
            count,
            flags: flags | LB_F_NODEPORT,
            affinity_timeout_s: 0,
        };
        services.insert(key, svc, 0).expect("insert a frontend");
        self.maglev(SVC4, backend);
    }

    fn frontend6(&mut self, proto: u8, count: u32, backend: u32) {
        let mut services: HashMap<&mut MapData, LbKey6, LbService> =
            self.dp.map_mut(lb_maps::SERVICES6);
        let key = LbKey6 {
            addr: NODE6,
            port: NODE_PORT.to_be(),
            proto,
            scope: LB_SCOPE_EXTERNAL,
        };
        let svc = LbService {
            id: SVC6,
            count,
            flags: LB_F_NODEPORT,
            affinity_timeout_s: 0,
        };
        services.insert(key, svc, 0).expect("insert a frontend");
        self.maglev(SVC6, backend);
    }

    /// Every Maglev slot of service `id` names `backend` (as the agent rewrites it
    /// whole).
    fn maglev(&mut self, id: u32, backend: u32) {
        let mut maglev: HashMap<&mut MapData, u32, LbMaglev> = self.dp.map_mut(lb_maps::MAGLEV);
        maglev
            .insert(
                id,
                LbMaglev {
                    slots: [backend; LB_MAGLEV_SIZE],
                },
                0,
            )
            .expect("insert a Maglev table");
    }

    fn backend4(&mut self, id: u32, addr: [u8; 4], port: u16, flags: u8) {
        let mut backends: HashMap<&mut MapData, u32, LbBackend4> =
            self.dp.map_mut(lb_maps::BACKENDS4);
        let backend = LbBackend4 {
            addr: u32::from_ne_bytes(addr),
            port: port.to_be(),
            proto: TCP,
            flags,
            node_id: 0,
        };
        backends.insert(id, backend, 0).expect("insert a backend");
        self.backend_stats_entry(id);
    }

    fn backend6(&mut self, id: u32, addr: [u8; 16], port: u16, flags: u8) {
        let mut backends: HashMap<&mut MapData, u32, LbBackend6> =
            self.dp.map_mut(lb_maps::BACKENDS6);
        let backend = LbBackend6 {
            addr,
            port: port.to_be(),
            proto: TCP,
            flags,
            node_id: 0,
        };
        backends.insert(id, backend, 0).expect("insert a backend");
        self.backend_stats_entry(id);
    }

    /// A zeroed `hypha_lb_backend_stats` entry, as the agent creates with the backend.
    fn backend_stats_entry(&mut self, id: u32) {
        let cpus = aya::util::nr_cpus().expect("number of possible CPUs");
        let zeroed =
            PerCpuValues::try_from(vec![LbBackendStats::default(); cpus]).expect("per-CPU values");
        let mut stats: PerCpuHashMap<&mut MapData, u32, LbBackendStats> =
            self.dp.map_mut(lb_maps::BACKEND_STATS);
        stats.insert(id, zeroed, 0).expect("insert backend stats");
    }

    fn backend_stats(&self, id: u32) -> LbBackendStats {
        let stats: PerCpuHashMap<&MapData, u32, LbBackendStats> =
            self.dp.map(lb_maps::BACKEND_STATS);
        let mut sum = LbBackendStats::default();
        for cpu in stats.get(&id, 0).expect("backend stats").iter() {
            sum.connections += cpu.connections;
            sum.packets += cpu.packets;
            sum.bytes += cpu.bytes;
        }
        sum
    }

    fn nat4(&self) -> Vec<(NatKey4, NatValue4)> {
        let nat: HashMap<&MapData, NatKey4, NatValue4> = self.dp.map(NAT4);
        nat.iter()
            .map(|e| e.expect("iterate hypha_lb4_nat"))
            .collect()
    }

    fn nat6(&self) -> Vec<(NatKey6, NatValue6)> {
        let nat: HashMap<&MapData, NatKey6, NatValue6> = self.dp.map(NAT6);
        nat.iter()
            .map(|e| e.expect("iterate hypha_lb6_nat"))
            .collect()
    }

    /// Writes this node's IPv6 SNAT address, as the agent does with the tunnel.
    fn set_snat6(&mut self, addr: [u8; 16]) {
        let mut snat: Array<&mut MapData, [u8; 16]> = self.dp.map_mut(SNAT6);
        snat.set(0, addr, 0).expect("write hypha_lb6_snat");
    }

    fn run_from_netdev(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let run = self.dp.run(FROM_NETDEV, frame, self.ext);
        (run.verdict, run.frame)
    }

    /// A node whose IPv6 NodePort has one backend, R, on node 2, reached by native
    /// routing (a route through a router on the external device), with its SNAT address.
    fn native_routing6() -> Self {
        let mut node = Node::new();
        run(&format!(
            "ip -6 neigh add fd00:50::2 lladdr {} dev hy-ext nud permanent",
            mac(ROUTER_MAC)
        ));
        run("ip -6 route add fd00:244:0:1::/64 via fd00:50::2 dev hy-ext");
        node.set_snat6(ROUTER6);
        node.backend6(BACKEND_R6, R6, TARGET_PORT, 0);
        node.frontend6(TCP, 1, BACKEND_R6);
        node
    }

    /// Checks that the only drops counted are `frames`, for `reason`, as they came in
    /// through the external device.
    fn assert_drops(&self, reason: DropReason, frames: &[&[u8]]) {
        let key = DropKey {
            ifindex: self.ext,
            reason: reason as u16,
            direction: DIR_INGRESS,
            _pad: 0,
        };
        let counted = Counter {
            packets: frames.len() as u64,
            bytes: frames.iter().map(|f| f.len() as u64).sum(),
        };
        assert_eq!(self.dp.drops(), vec![(key, counted)]);
    }
}

fn key4(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16, dir: u8) -> NatKey4 {
    NatKey4 {
        saddr: u32::from_ne_bytes(saddr),
        daddr: u32::from_ne_bytes(daddr),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: TCP,
        dir,
        _pad: [0; 2],
    }
}

fn value4(addr: [u8; 4], port: u16, nat_addr: [u8; 4], nat_port: u16, id: u32) -> NatValue4 {
    NatValue4 {
        addr: u32::from_ne_bytes(addr),
        nat_addr: u32::from_ne_bytes(nat_addr),
        port: port.to_be(),
        nat_port: nat_port.to_be(),
        backend_id: id,
    }
}

fn key6(saddr: [u8; 16], sport: u16, daddr: [u8; 16], dport: u16, dir: u8) -> NatKey6 {
    NatKey6 {
        saddr,
        daddr,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: TCP,
        dir,
        _pad: [0; 2],
    }
}

fn value6(addr: [u8; 16], port: u16, nat_addr: [u8; 16], nat_port: u16, id: u32) -> NatValue6 {
    NatValue6 {
        addr,
        nat_addr,
        port: port.to_be(),
        nat_port: nat_port.to_be(),
        backend_id: id,
    }
}

// ---- IPv4 ----

#[test]
fn a_local_backend_gets_the_flow_with_the_client_address_and_both_nat_entries() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    node.frontend4(TCP, 1, 0, BACKEND_B);
    let frame = from_client4(TCP, CLIENT_PORT);
    let (verdict, out) = node.run_from_netdev(&frame);
    assert_eq!(
        verdict, TC_ACT_OK,
        "on to the host stack, which routes to B"
    );
    let expected = eth(
        EXT_MAC,
        CLIENT_MAC,
        ETH_P_IP,
        &ip4(TCP, CLIENT4, CLIENT_PORT, B4, TARGET_PORT),
    );
    assert_eq!(out, expected, "DNAT to B:8080, checksums as computed anew");

    let mut nat = node.nat4();
    nat.sort_by_key(|(k, _)| k.dir);
    assert_eq!(
        nat,
        vec![
            (
                key4(CLIENT4, CLIENT_PORT, NODE4, NODE_PORT, NAT_DIR_FORWARD),
                value4(B4, TARGET_PORT, [0; 4], 0, BACKEND_B),
            ),
            (
                key4(B4, TARGET_PORT, CLIENT4, CLIENT_PORT, NAT_DIR_REVERSE),
                value4(NODE4, NODE_PORT, CLIENT4, CLIENT_PORT, BACKEND_B),
            ),
        ]
    );
    assert_eq!(
        node.backend_stats(BACKEND_B),
        LbBackendStats {
            connections: 1,
            packets: 1,
            bytes: frame.len() as u64,
        }
    );
}

#[test]
fn udp_to_a_udp_node_port_is_translated_too() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    node.frontend4(UDP, 1, 0, BACKEND_B);
    let (verdict, out) = node.run_from_netdev(&from_client4(UDP, CLIENT_PORT));
    assert_eq!(verdict, TC_ACT_OK);
    let expected = eth(
        EXT_MAC,
        CLIENT_MAC,
        ETH_P_IP,
        &ip4(UDP, CLIENT4, CLIENT_PORT, B4, TARGET_PORT),
    );
    assert_eq!(out, expected);
}

#[test]
fn a_flow_keeps_its_backend_when_the_maglev_table_changes() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    node.frontend4(TCP, 1, 0, BACKEND_B);
    let first = from_client4(TCP, CLIENT_PORT);
    assert_eq!(node.run_from_netdev(&first).0, TC_ACT_OK);
    // The frontend now sends every new flow to B:8081.
    node.maglev(SVC4, BACKEND_B2);
    let (verdict, out) = node.run_from_netdev(&first);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        eth(
            EXT_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &ip4(TCP, CLIENT4, CLIENT_PORT, B4, TARGET_PORT)
        ),
        "the established flow stays on B:8080"
    );
    let (_, out) = node.run_from_netdev(&from_client4(TCP, CLIENT_PORT + 1));
    assert_eq!(
        out,
        eth(
            EXT_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &ip4(TCP, CLIENT4, CLIENT_PORT + 1, B4, TARGET_PORT + 1)
        ),
        "a new flow goes to B:8081"
    );
    let stats = node.backend_stats(BACKEND_B);
    assert_eq!((stats.connections, stats.packets), (1, 2));
    let stats = node.backend_stats(BACKEND_B2);
    assert_eq!((stats.connections, stats.packets), (1, 1));
}

#[test]
fn the_reply_of_a_local_backend_is_translated_back_in_from_pod_and_sent_out() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    node.frontend4(TCP, 1, 0, BACKEND_B);
    assert_eq!(
        node.run_from_netdev(&from_client4(TCP, CLIENT_PORT)).0,
        TC_ACT_OK
    );
    let reply = eth(
        HOST_B_MAC,
        B_MAC,
        ETH_P_IP,
        &ip4(TCP, B4, TARGET_PORT, CLIENT4, CLIENT_PORT),
    );
    let run = node.dp.run(FROM_POD, &reply, node.b);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "redirected out of hy-ext");
    assert_eq!(
        run.frame,
        hopped(&to_client4(TCP, CLIENT_PORT)),
        "from the NodePort, to the client's MAC (the route's neighbour), a hop less"
    );
    assert_eq!(node.dp.stats(node.b).egress.passed.packets, 1);

    // B's traffic to the client that is no NodePort reply goes to the host stack as is.
    let other = eth(
        HOST_B_MAC,
        B_MAC,
        ETH_P_IP,
        &ip4(TCP, B4, TARGET_PORT, CLIENT4, CLIENT_PORT + 1),
    );
    let run = node.dp.run(FROM_POD, &other, node.b);
    assert_eq!((run.verdict, run.frame), (TC_ACT_OK, other));

    // A reply with its TTL spent is dropped untouched, and counted on B.
    let spent = with_ttl(&reply, 1);
    let run = node.dp.run(FROM_POD, &spent, node.b);
    assert_eq!((run.verdict, run.frame), (TC_ACT_SHOT, spent));
    let drops = node.dp.drops();
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert_eq!(
        (drops[0].0.ifindex, drops[0].0.reason),
        (node.b, DropReason::TtlExceeded as u16)
    );
}

#[test]
fn a_remote_backend_is_snated_to_the_gateway_and_sent_into_the_tunnel() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    let node2 = node.tunnel_to_node2();
    node.dp.add_tunnel_peer4(NODE2_CIDR4, 24, node2);
    node.frontend4(TCP, 1, 0, BACKEND_R);

    let frame = from_client4(TCP, CLIENT_PORT);
    let (verdict, out) = node.run_from_netdev(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT, "into the tunnel");
    let port = u16::from_be_bytes([out[ETH_HLEN + 20], out[ETH_HLEN + 21]]);
    assert!(port >= NAT_PORT_FIRST, "SNAT port {port}");
    assert_eq!(
        out,
        hopped(&eth(
            EXT_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &ip4(TCP, GATEWAY4, port, R4, TARGET_PORT)
        )),
        "from the gateway, to R, a hop less"
    );
    assert_eq!(node.dp.node_stats(NODE2).expect("node 2").tx.packets, 1);
    let mut nat = node.nat4();
    nat.sort_by_key(|(k, _)| k.dir);
    assert_eq!(
        nat,
        vec![
            (
                key4(CLIENT4, CLIENT_PORT, NODE4, NODE_PORT, NAT_DIR_FORWARD),
                value4(R4, TARGET_PORT, GATEWAY4, port, BACKEND_R),
            ),
            (
                key4(R4, TARGET_PORT, GATEWAY4, port, NAT_DIR_REVERSE),
                value4(NODE4, NODE_PORT, CLIENT4, CLIENT_PORT, BACKEND_R),
            ),
        ]
    );
    // The second packet of the flow takes the same port.
    let (_, again) = node.run_from_netdev(&frame);
    assert_eq!(again, out);

    // Another client on the same port gets a port of its own.
    let mut other = ip4(TCP, [192, 168, 50, 10], CLIENT_PORT, NODE4, NODE_PORT);
    other = eth(EXT_MAC, CLIENT_MAC, ETH_P_IP, &other);
    let (_, out2) = node.run_from_netdev(&other);
    let port2 = u16::from_be_bytes([out2[ETH_HLEN + 20], out2[ETH_HLEN + 21]]);
    assert!(
        port2 >= NAT_PORT_FIRST && port2 != port,
        "{port2} vs {port}"
    );
    assert_eq!(node.nat4().len(), 4, "two entries per flow");
}

#[test]
fn over_native_routing_a_remote_backend_is_routed_to_and_its_reply_translated_back() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    run("ip route add 10.244.1.0/24 via 192.168.50.2 dev hy-ext");
    node.frontend4(TCP, 1, 0, BACKEND_R);

    let (verdict, out) = node.run_from_netdev(&from_client4(TCP, CLIENT_PORT));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "out of the route to node 2's pods"
    );
    let port = u16::from_be_bytes([out[ETH_HLEN + 20], out[ETH_HLEN + 21]]);
    assert!(port >= NAT_PORT_FIRST, "SNAT port {port}");
    assert_eq!(
        out,
        hopped(&eth(
            ROUTER_MAC,
            EXT_MAC,
            ETH_P_IP,
            &ip4(TCP, GATEWAY4, port, R4, TARGET_PORT)
        ))
    );

    // R's reply, to the gateway, comes back in through the external device.
    let reply = eth(
        EXT_MAC,
        ROUTER_MAC,
        ETH_P_IP,
        &ip4(TCP, R4, TARGET_PORT, GATEWAY4, port),
    );
    let (verdict, out) = node.run_from_netdev(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        out,
        hopped(&to_client4(TCP, CLIENT_PORT)),
        "from the NodePort to the client"
    );
}

/// On the hop to another node this program is the router: a client's packet whose TTL
/// is spent is answered "time exceeded" from the node's address, quoting the packet as
/// it came; a backend's reply whose TTL is spent is dropped. Both are counted.
#[test]
fn a_spent_ttl_is_answered_time_exceeded_and_a_spent_reply_is_dropped() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    run("ip route add 10.244.1.0/24 via 192.168.50.2 dev hy-ext");
    node.frontend4(TCP, 1, 0, BACKEND_R);

    let spent = with_ttl(&from_client4(TCP, CLIENT_PORT), 1);
    let (verdict, out) = node.run_from_netdev(&spent);
    assert_eq!(verdict, TC_ACT_REDIRECT, "answered");
    assert_icmp4(&out, &spent, (11, 0));

    // TTL 2 goes on with 1.
    let last = with_ttl(&from_client4(TCP, CLIENT_PORT), 2);
    let (verdict, out) = node.run_from_netdev(&last);
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed on");
    let port = u16::from_be_bytes([out[ETH_HLEN + 20], out[ETH_HLEN + 21]]);
    assert_eq!(
        out,
        with_ttl(
            &eth(
                ROUTER_MAC,
                EXT_MAC,
                ETH_P_IP,
                &ip4(TCP, GATEWAY4, port, R4, TARGET_PORT)
            ),
            1
        )
    );

    let reply = with_ttl(
        &eth(
            EXT_MAC,
            ROUTER_MAC,
            ETH_P_IP,
            &ip4(TCP, R4, TARGET_PORT, GATEWAY4, port),
        ),
        1,
    );
    assert_eq!(node.run_from_netdev(&reply), (TC_ACT_SHOT, reply.clone()));
    node.assert_drops(DropReason::TtlExceeded, &[&spent, &reply]);
}

#[test]
fn external_traffic_policy_local_never_snats() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    // Even a backend not flagged local (the agent gives `Local` frontends none) keeps
    // the client's address.
    node.frontend4(TCP, 1, LB_F_LOCAL, BACKEND_R);
    let (verdict, out) = node.run_from_netdev(&from_client4(TCP, CLIENT_PORT));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        eth(
            EXT_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &ip4(TCP, CLIENT4, CLIENT_PORT, R4, TARGET_PORT)
        )
    );
    node.frontend4(TCP, 1, LB_F_LOCAL, BACKEND_B);
    let (_, out) = node.run_from_netdev(&from_client4(TCP, CLIENT_PORT + 1));
    assert_eq!(
        out,
        eth(
            EXT_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &ip4(TCP, CLIENT4, CLIENT_PORT + 1, B4, TARGET_PORT)
        )
    );
}

/// Checks an ICMP error of `kind` (type, code) from the node's address answering `sent`
/// (an IPv4 frame from the client), out of the device it came in by.
fn assert_icmp4(out: &[u8], sent: &[u8], kind: (u8, u8)) {
    assert_eq!(out.len(), ETH_HLEN + 20 + 8 + 28, "{out:02x?}");
    assert_eq!((&out[0..6], &out[6..12]), (&CLIENT_MAC[..], &EXT_MAC[..]));
    assert_eq!(&out[12..14], &ETH_P_IP.to_be_bytes());
    let ip = &out[ETH_HLEN..ETH_HLEN + 20];
    assert_eq!(ip[9], 1, "ICMP");
    assert_eq!(ipv4_checksum(ip), 0, "header checksum");
    assert_eq!((&ip[12..16], &ip[16..20]), (&NODE4[..], &CLIENT4[..]));
    let icmp = &out[ETH_HLEN + 20..];
    assert_eq!((icmp[0], icmp[1]), kind, "ICMP type and code");
    assert_eq!(checksum(icmp, 0), 0, "ICMP checksum");
    assert_eq!(&icmp[8..], &sent[ETH_HLEN..ETH_HLEN + 28], "the quote");
}

/// [`assert_icmp4`] for ICMPv6.
fn assert_icmp6(out: &[u8], sent: &[u8], kind: (u8, u8)) {
    assert_eq!((&out[0..6], &out[6..12]), (&CLIENT_MAC[..], &EXT_MAC[..]));
    let ip = &out[ETH_HLEN..];
    assert_eq!(ip[6], 58, "ICMPv6");
    assert_eq!((&ip[8..24], &ip[24..40]), (&NODE6[..], &CLIENT6[..]));
    let icmp = &ip[40..];
    assert_eq!((icmp[0], icmp[1]), kind, "ICMPv6 type and code");
    let sum = pseudo_sum(&ip[8..40], 58, icmp.len());
    assert_eq!(checksum(icmp, sum), 0, "ICMPv6 checksum");
    assert_eq!(&icmp[8..], &sent[ETH_HLEN..ETH_HLEN + 48], "the quote");
}

/// The sum of a pseudo-header's words: `addrs` (source and destination), `proto` and
/// the upper-layer length `len`.
fn pseudo_sum(addrs: &[u8], proto: u8, len: usize) -> u32 {
    let mut p = addrs.to_vec();
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum()
}

/// Gives the TCP segment of an IPv4 frame `flags` and acknowledgment number `ack`,
/// with its checksum.
fn with_flags4(mut frame: Vec<u8>, flags: u8, ack: u32) -> Vec<u8> {
    let l4 = ETH_HLEN + 20;
    frame[l4 + 8..l4 + 12].copy_from_slice(&ack.to_be_bytes());
    frame[l4 + 13] = flags;
    frame[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
    let sum = pseudo_sum(&frame[ETH_HLEN + 12..l4], TCP, frame.len() - l4);
    let csum = checksum(&frame[l4..], sum);
    frame[l4 + 16..l4 + 18].copy_from_slice(&csum.to_be_bytes());
    frame
}

/// Checks a TCP reset from the NodePort to the client's `sport` (IPv4 when `addrs`
/// are 4 bytes each, IPv6 otherwise) with sequence `seq`, acknowledging `ack` when
/// given.
fn assert_reset(out: &[u8], addrs: (&[u8], &[u8]), seq: u32, ack: Option<u32>) {
    let ip_len = if addrs.0.len() == 4 { 20 } else { 40 };
    assert_eq!(out.len(), ETH_HLEN + ip_len + 20, "{out:02x?}");
    assert_eq!((&out[0..6], &out[6..12]), (&CLIENT_MAC[..], &EXT_MAC[..]));
    let ip = &out[ETH_HLEN..ETH_HLEN + ip_len];
    let (proto, saddr, daddr) = if ip_len == 20 {
        assert_eq!(ipv4_checksum(ip), 0, "header checksum");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 40, "total length");
        (ip[9], &ip[12..16], &ip[16..20])
    } else {
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 20, "payload length");
        (ip[6], &ip[8..24], &ip[24..40])
    };
    assert_eq!(proto, TCP);
    assert_eq!((saddr, daddr), addrs, "from the frontend to the client");
    let tcp = &out[ETH_HLEN + ip_len..];
    let sum = pseudo_sum(&ip[ip_len - addrs.0.len() * 2..], TCP, 20);
    assert_eq!(checksum(tcp, sum), 0, "TCP checksum");
    assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), NODE_PORT);
    assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), CLIENT_PORT);
    assert_eq!(
        u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        seq,
        "sequence"
    );
    let (flags, acked) = match ack {
        Some(a) => (0x14, a),
        None => (0x04, 0),
    };
    assert_eq!(tcp[12], 0x50, "data offset 5");
    assert_eq!(tcp[13], flags, "RST (and ACK when acknowledging)");
    assert_eq!(
        u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
        acked,
        "acknowledgment"
    );
}

/// The sequence number of the test's SYNs and what a reset acknowledges of one: the
/// SYN and its 6 bytes of payload.
const SYN_SEQ: u32 = 0x0102_0304;
const SYN_ACKED: u32 = SYN_SEQ + 1 + 6;

/// TCP is refused with a reset, not ICMP: a client on this host holds its socket's lock
/// while its SYN is sent and the answer comes back in that call, so Linux keeps an ICMP
/// error as a soft one and refuses only on the retransmission, a second later.
#[test]
fn a_frontend_without_backends_resets_tcp_answers_udp_port_unreachable_and_counts() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    node.frontend4(TCP, 0, 0, BACKEND_B);
    let frame = from_client4(TCP, CLIENT_PORT);
    let (verdict, out) = node.run_from_netdev(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT, "answered at once");
    assert_reset(&out, (&NODE4, &CLIENT4), 0, Some(SYN_ACKED));

    node.frontend4(UDP, 0, 0, BACKEND_B);
    let udp = from_client4(UDP, CLIENT_PORT);
    let (verdict, out) = node.run_from_netdev(&udp);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_icmp4(&out, &udp, (3, 3));
    node.assert_drops(DropReason::NoServiceBackend, &[&frame, &udp]);
    assert!(node.nat4().is_empty(), "no flow recorded");
}

/// A segment with an acknowledgment (a flow whose backends went) is reset at that
/// sequence; a reset is never answered, only dropped and counted.
#[test]
fn a_reset_answers_an_ack_with_its_sequence_and_a_reset_gets_no_answer() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    node.frontend4(TCP, 0, 0, BACKEND_B);
    let ack = with_flags4(from_client4(TCP, CLIENT_PORT), 0x10, 0xa1b2_c3d4);
    let (verdict, out) = node.run_from_netdev(&ack);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_reset(&out, (&NODE4, &CLIENT4), 0xa1b2_c3d4, None);

    let rst = with_flags4(from_client4(TCP, CLIENT_PORT), 0x04, 0);
    let (verdict, out) = node.run_from_netdev(&rst);
    assert_eq!(verdict, TC_ACT_SHOT, "dropped without an answer");
    assert_eq!(out, rst, "untouched");
    // Both refused segments, counted once each.
    node.assert_drops(DropReason::NoServiceBackend, &[&ack, &rst]);
}

#[test]
fn ipv6_a_frontend_without_backends_resets_tcp() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    node.frontend6(TCP, 0, BACKEND_B6);
    let syn = from_client6(TCP, CLIENT_PORT);
    let (verdict, out) = node.run_from_netdev(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "answered at once");
    assert_reset(&out, (&NODE6, &CLIENT6), 0, Some(SYN_ACKED));
    node.assert_drops(DropReason::NoServiceBackend, &[&syn]);
}

#[test]
fn traffic_to_no_frontend_passes_untouched() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    node.frontend4(TCP, 1, 0, BACKEND_B);
    // An internal-scope frontend is the socket programs', not this one's.
    let mut services: HashMap<&mut MapData, LbKey4, LbService> =
        node.dp.map_mut(lb_maps::SERVICES4);
    let internal = LbKey4 {
        addr: u32::from_ne_bytes(NODE4),
        port: 30081u16.to_be(),
        proto: TCP,
        scope: LB_SCOPE_INTERNAL,
    };
    let svc = LbService {
        id: 9,
        count: 1,
        flags: 0,
        affinity_timeout_s: 0,
    };
    services.insert(internal, svc, 0).expect("insert");
    let mut fragment = ip4(TCP, CLIENT4, CLIENT_PORT, NODE4, NODE_PORT);
    fragment[6] |= 0x20; // more fragments
    fragment[10..12].copy_from_slice(&[0, 0]);
    let csum = ipv4_checksum(&fragment[..20]);
    fragment[10..12].copy_from_slice(&csum.to_be_bytes());
    for frame in [
        eth(
            EXT_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &ip4(TCP, CLIENT4, CLIENT_PORT, NODE4, 22),
        ),
        eth(
            EXT_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &ip4(TCP, CLIENT4, CLIENT_PORT, NODE4, 30081),
        ),
        eth(
            EXT_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &ip4(TCP, CLIENT4, CLIENT_PORT, [192, 168, 50, 3], NODE_PORT),
        ),
        from_client4(UDP, CLIENT_PORT),
        eth(EXT_MAC, CLIENT_MAC, ETH_P_IP, &fragment),
        eth(EXT_MAC, CLIENT_MAC, 0x0806, &[0; 28]),
        from_client6(TCP, CLIENT_PORT),
    ] {
        let (verdict, out) = node.run_from_netdev(&frame);
        assert_eq!((verdict, &out), (TC_ACT_OK, &frame));
    }
    assert!(node.nat4().is_empty() && node.nat6().is_empty());
    assert!(node.dp.drops().is_empty());
}

// ---- IPv6 ----

#[test]
fn ipv6_a_local_backend_gets_the_flow_and_its_reply_is_translated_back() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    node.frontend6(TCP, 1, BACKEND_B6);
    let (verdict, out) = node.run_from_netdev(&from_client6(TCP, CLIENT_PORT));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        eth(
            EXT_MAC,
            CLIENT_MAC,
            ETH_P_IPV6,
            &ip6(TCP, CLIENT6, CLIENT_PORT, B6, TARGET_PORT)
        ),
        "DNAT to [B]:8080, checksum as computed anew"
    );
    let nat = node.nat6();
    assert_eq!(nat.len(), 2, "{nat:?}");
    let reverse = NatKey6 {
        saddr: B6,
        daddr: CLIENT6,
        sport: TARGET_PORT.to_be(),
        dport: CLIENT_PORT.to_be(),
        proto: TCP,
        dir: NAT_DIR_REVERSE,
        _pad: [0; 2],
    };
    assert!(
        nat.contains(&(
            reverse,
            NatValue6 {
                addr: NODE6,
                nat_addr: CLIENT6,
                port: NODE_PORT.to_be(),
                nat_port: CLIENT_PORT.to_be(),
                backend_id: BACKEND_B6,
            }
        )),
        "{nat:?}"
    );

    let reply = eth(
        HOST_B_MAC,
        B_MAC,
        ETH_P_IPV6,
        &ip6(TCP, B6, TARGET_PORT, CLIENT6, CLIENT_PORT),
    );
    let run = node.dp.run(FROM_POD, &reply, node.b);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "drops: {:?}", node.dp.drops());
    assert_eq!(run.frame, hopped(&to_client6(TCP, CLIENT_PORT)));
    let stats = node.backend_stats(BACKEND_B6);
    assert_eq!((stats.connections, stats.packets), (1, 1));
}

#[test]
fn ipv6_a_frontend_without_backends_answers_port_unreachable() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    node.frontend6(UDP, 0, BACKEND_B6);
    let frame = from_client6(UDP, CLIENT_PORT);
    let (verdict, out) = node.run_from_netdev(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_icmp6(&out, &frame, (1, 4));
    node.assert_drops(DropReason::NoServiceBackend, &[&frame]);
}

#[test]
fn ipv6_without_an_snat_address_a_remote_backend_is_refused() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    node.backend6(BACKEND_R6, R6, TARGET_PORT, 0);
    node.frontend6(TCP, 1, BACKEND_R6);
    let (verdict, out) = node.run_from_netdev(&from_client6(TCP, CLIENT_PORT));
    assert_eq!(verdict, TC_ACT_REDIRECT, "answered, never left to time out");
    assert_reset(&out, (&NODE6, &CLIENT6), 0, Some(SYN_ACKED));
    assert!(node.nat6().is_empty());
}

#[test]
fn ipv6_a_remote_backend_is_snated_to_the_router_address_and_sent_into_the_tunnel() {
    hypha_tests::require_root!();
    let mut node = Node::new();
    let node2 = node.tunnel_to_node2();
    node.dp.add_tunnel_peer6(NODE2_CIDR6, 64, node2);
    node.set_snat6(ROUTER6);
    node.backend6(BACKEND_R6, R6, TARGET_PORT, 0);
    node.frontend6(TCP, 1, BACKEND_R6);

    let frame = from_client6(TCP, CLIENT_PORT);
    let (verdict, out) = node.run_from_netdev(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT, "into the tunnel");
    let port = u16::from_be_bytes([out[ETH_HLEN + 40], out[ETH_HLEN + 41]]);
    assert!(port >= NAT_PORT_FIRST, "SNAT port {port}");
    assert_eq!(
        out,
        hopped(&eth(
            EXT_MAC,
            CLIENT_MAC,
            ETH_P_IPV6,
            &ip6(TCP, ROUTER6, port, R6, TARGET_PORT)
        )),
        "from the router address, to R, a hop less; checksum as computed anew"
    );
    assert_eq!(node.dp.node_stats(NODE2).expect("node 2").tx.packets, 1);
    let mut nat = node.nat6();
    nat.sort_by_key(|(k, _)| k.dir);
    assert_eq!(
        nat,
        vec![
            (
                key6(CLIENT6, CLIENT_PORT, NODE6, NODE_PORT, NAT_DIR_FORWARD),
                value6(R6, TARGET_PORT, ROUTER6, port, BACKEND_R6),
            ),
            (
                key6(R6, TARGET_PORT, ROUTER6, port, NAT_DIR_REVERSE),
                value6(NODE6, NODE_PORT, CLIENT6, CLIENT_PORT, BACKEND_R6),
            ),
        ]
    );
    // The second packet of the flow takes the same port.
    let (_, again) = node.run_from_netdev(&frame);
    assert_eq!(again, out);
    let stats = node.backend_stats(BACKEND_R6);
    assert_eq!((stats.connections, stats.packets), (1, 2));

    // Another client on the same port gets a port of its own.
    let mut client = CLIENT6;
    client[15] = 10;
    let other = eth(
        EXT_MAC,
        CLIENT_MAC,
        ETH_P_IPV6,
        &ip6(TCP, client, CLIENT_PORT, NODE6, NODE_PORT),
    );
    let (_, out2) = node.run_from_netdev(&other);
    let port2 = u16::from_be_bytes([out2[ETH_HLEN + 40], out2[ETH_HLEN + 41]]);
    assert!(
        port2 >= NAT_PORT_FIRST && port2 != port,
        "{port2} vs {port}"
    );
    assert_eq!(node.nat6().len(), 4, "two entries per flow");
}

#[test]
fn ipv6_over_native_routing_a_remote_backend_is_routed_to_and_its_reply_translated_back() {
    hypha_tests::require_root!();
    let node = Node::native_routing6();

    let (verdict, out) = node.run_from_netdev(&from_client6(TCP, CLIENT_PORT));
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "out of the route to node 2's pods; drops: {:?}",
        node.dp.drops()
    );
    let port = u16::from_be_bytes([out[ETH_HLEN + 40], out[ETH_HLEN + 41]]);
    assert!(port >= NAT_PORT_FIRST, "SNAT port {port}");
    assert_eq!(
        out,
        hopped(&eth(
            ROUTER_MAC,
            EXT_MAC,
            ETH_P_IPV6,
            &ip6(TCP, ROUTER6, port, R6, TARGET_PORT)
        ))
    );

    // R's reply, to the router address, comes back in through the external device:
    // the reverse translation `hypha_from_tunnel` applies to it in tunnel mode.
    let reply = eth(
        EXT_MAC,
        ROUTER_MAC,
        ETH_P_IPV6,
        &ip6(TCP, R6, TARGET_PORT, ROUTER6, port),
    );
    let (verdict, out) = node.run_from_netdev(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT, "drops: {:?}", node.dp.drops());
    assert_eq!(
        out,
        hopped(&to_client6(TCP, CLIENT_PORT)),
        "from the NodePort to the client, a hop less, checksum as computed anew"
    );
    // A reply to the router address that is no flow's passes untouched.
    let stray = eth(
        EXT_MAC,
        ROUTER_MAC,
        ETH_P_IPV6,
        &ip6(TCP, R6, TARGET_PORT, ROUTER6, port.wrapping_add(1)),
    );
    assert_eq!(node.run_from_netdev(&stray), (TC_ACT_OK, stray.clone()));
}

/// [`a_spent_ttl_is_answered_time_exceeded_and_a_spent_reply_is_dropped`] for IPv6's hop
/// limit.
#[test]
fn ipv6_a_spent_hop_limit_is_answered_time_exceeded_and_a_spent_reply_is_dropped() {
    hypha_tests::require_root!();
    let node = Node::native_routing6();

    let spent = with_ttl(&from_client6(TCP, CLIENT_PORT), 1);
    let (verdict, out) = node.run_from_netdev(&spent);
    assert_eq!(verdict, TC_ACT_REDIRECT, "answered");
    assert_icmp6(&out, &spent, (3, 0));

    let (verdict, out) = node.run_from_netdev(&with_ttl(&from_client6(TCP, CLIENT_PORT), 2));
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed on");
    assert_eq!(out[ETH_HLEN + 7], 1, "hop limit");
    let port = u16::from_be_bytes([out[ETH_HLEN + 40], out[ETH_HLEN + 41]]);

    let reply = with_ttl(
        &eth(
            EXT_MAC,
            ROUTER_MAC,
            ETH_P_IPV6,
            &ip6(TCP, R6, TARGET_PORT, ROUTER6, port),
        ),
        1,
    );
    assert_eq!(node.run_from_netdev(&reply), (TC_ACT_SHOT, reply.clone()));
    node.assert_drops(DropReason::TtlExceeded, &[&spent, &reply]);
}
