//! Service load balancing: the layouts of the `hypha_lb_*` maps.
//!
//! A *frontend* is one (address, port, protocol, scope) a client reaches a Service by: a
//! ClusterIP and one of its ports, or a node address and a NodePort. Each frontend has a
//! *service id* (its own number, also the key of its Maglev table, its affinity entries
//! and its reverse translation) and a set of backends, each with a *backend id*.
//!
//! Two datapaths read them:
//! - the socket programs (`ebpf/src/sock.rs`, cgroup `connect4/6`, `sendmsg4/6`,
//!   `recvmsg4/6`, `getpeername4/6` on the cgroup v2 root) translate a frontend to a
//!   backend once per connection, for the sockets of this node's pods and of its host
//!   (`hypha_lb_netns`), with [`LB_SCOPE_INTERNAL`];
//! - the TC program on the node's external device (`ebpf/src/nodeport.rs`) translates
//!   what arrives from outside the node for a NodePort, per packet, with
//!   [`LB_SCOPE_EXTERNAL`], and keeps its translations in the NAT maps
//!   (`crate::nat`).
//!
//! The shared lookup (frontend → Maglev slot → backend, affinity) is `ebpf/src/lb.rs`.
//! The agent (`agent/src/datapath/lb_maps.rs`) writes every map here except the affinity,
//! socket and NAT tables, which the datapath fills.

/// Slots in each frontend's Maglev table: a prime, at least 10 per backend at the
/// [`MAX_LB_BACKENDS_PER_SERVICE`] the agent accepts (Maglev, NSDI 2016, section 5.3:
/// M ≫ N keeps the shares even). 4 KiB a table keeps 10,000 services at 40 MiB.
pub const LB_MAGLEV_SIZE: usize = 1021;
/// Most backends one frontend may have; the agent refuses (names) a service with more.
pub const MAX_LB_BACKENDS_PER_SERVICE: u32 = 100;
/// Capacity of `hypha_lb4_services` and `hypha_lb6_services` (frontends, NodePort ones
/// counted once per node address and scope), and of `hypha_lb_maglev`.
pub const MAX_LB_SERVICES: u32 = 65_536;
/// Capacity of `hypha_lb4_backends` and `hypha_lb6_backends`.
pub const MAX_LB_BACKENDS: u32 = 65_536;
/// Capacity of `hypha_lb_affinity` (least recently used first out).
pub const MAX_LB_AFFINITY: u32 = 65_536;
/// Capacity of `hypha_lb4_sock` and `hypha_lb6_sock` (least recently used first out).
pub const MAX_LB_SOCK: u32 = 262_144;
/// Capacity of `hypha_lb_netns`: this node's pods and its host.
pub const MAX_LB_NETNS: u32 = 16_384 + 1;

/// Map names. Readers: `ebpf/src/lb.rs` and `ebpf/src/sock.rs` (declarations),
/// `agent/src/datapath/lb_maps.rs`.
pub mod maps {
    /// [`super::LbKey4`] → [`super::LbService`].
    pub const SERVICES4: &str = "hypha_lb4_services";
    /// [`super::LbKey6`] → [`super::LbService`].
    pub const SERVICES6: &str = "hypha_lb6_services";
    /// Backend id (`u32`) → [`super::LbBackend4`].
    pub const BACKENDS4: &str = "hypha_lb4_backends";
    /// Backend id (`u32`) → [`super::LbBackend6`].
    pub const BACKENDS6: &str = "hypha_lb6_backends";
    /// Service id (`u32`) → [`super::LbMaglev`] (hash, not preallocated: a table costs
    /// its 4 KiB only while its frontend exists).
    pub const MAGLEV: &str = "hypha_lb_maglev";
    /// LRU [`super::LbAffinityKey`] → [`super::LbAffinity`]: `sessionAffinity: ClientIP`.
    pub const AFFINITY: &str = "hypha_lb_affinity";
    /// LRU [`super::LbSockKey4`] → [`super::LbSockValue4`]: what a socket's backend stands
    /// for, for `recvmsg4` and `getpeername4` to show the client the frontend.
    pub const SOCK4: &str = "hypha_lb4_sock";
    /// LRU [`super::LbSockKey6`] → [`super::LbSockValue6`].
    pub const SOCK6: &str = "hypha_lb6_sock";
    /// Network namespace cookie (`u64`) → [`super::LbNetns`]: the sockets this agent's
    /// socket programs translate (its pods' namespaces and its host's). Several agents
    /// on one kernel (a simulated cluster, parallel tests) each attach their programs to
    /// the cgroup v2 root; each translates only its own namespaces'.
    pub const NETNS: &str = "hypha_lb_netns";
    /// Backend id (`u32`) → per-CPU [`super::LbBackendStats`]. Entries are created by the
    /// agent only.
    pub const BACKEND_STATS: &str = "hypha_lb_backend_stats";
}

/// Program names (`ebpf/src/sock.rs`). Readers: the eBPF object, `agent/src/datapath`.
pub mod programs {
    pub const CONNECT4: &str = "hypha_sock_connect4";
    pub const CONNECT6: &str = "hypha_sock_connect6";
    pub const SENDMSG4: &str = "hypha_sock_sendmsg4";
    pub const SENDMSG6: &str = "hypha_sock_sendmsg6";
    pub const RECVMSG4: &str = "hypha_sock_recvmsg4";
    pub const RECVMSG6: &str = "hypha_sock_recvmsg6";
    pub const GETPEERNAME4: &str = "hypha_sock_getpeername4";
    pub const GETPEERNAME6: &str = "hypha_sock_getpeername6";
    /// Every socket program, in attach order.
    pub const SOCKET: [&str; 8] = [
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        RECVMSG4,
        RECVMSG6,
        GETPEERNAME4,
        GETPEERNAME6,
    ];
}

/// [`LbKey4::scope`] / [`LbKey6::scope`]: the frontend as this node's pods and host
/// reach it (socket programs). `internalTrafficPolicy: Local` keeps only node-local
/// backends here.
pub const LB_SCOPE_INTERNAL: u8 = 0;
/// The frontend as clients outside the node reach it (NodePort, TC program).
/// `externalTrafficPolicy: Local` keeps only node-local backends here.
pub const LB_SCOPE_EXTERNAL: u8 = 1;

/// Key of `hypha_lb4_services`.
///
/// Readers: `ebpf` (socket programs with [`LB_SCOPE_INTERNAL`], the NodePort program
/// with [`LB_SCOPE_EXTERNAL`]), `agent` (writes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbKey4 {
    /// The ClusterIP or node address, network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    /// IPPROTO_TCP (6) or IPPROTO_UDP (17).
    pub proto: u8,
    /// `LB_SCOPE_*`.
    pub scope: u8,
}

/// Key of `hypha_lb6_services`. Readers: as [`LbKey4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbKey6 {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// `LB_SCOPE_*`.
    pub scope: u8,
}

/// [`LbService::flags`]: `sessionAffinity: ClientIP`; `affinity_timeout_s` applies.
pub const LB_F_AFFINITY: u32 = 1 << 0;
/// [`LbService::flags`]: a NodePort frontend (a node address).
pub const LB_F_NODEPORT: u32 = 1 << 1;
/// [`LbService::flags`]: `externalTrafficPolicy: Local` on an external frontend: the
/// client's address is kept (no SNAT) and every backend is on this node.
pub const LB_F_LOCAL: u32 = 1 << 2;

/// Value of `hypha_lb4_services` and `hypha_lb6_services`.
///
/// Readers: `ebpf` (socket programs, NodePort program), `agent` (writes; `hypha service
/// list` shows the service ids).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbService {
    /// This frontend's service id: the key of its Maglev table. Never 0.
    pub id: u32,
    /// Number of backends. 0: the frontend refuses (connect gets `ECONNREFUSED`, a
    /// NodePort packet gets ICMP unreachable), never a silent timeout.
    pub count: u32,
    /// `LB_F_*`.
    pub flags: u32,
    /// `sessionAffinity: ClientIP`'s timeout, in seconds.
    pub affinity_timeout_s: u32,
}

/// [`LbBackend4::flags`]: the backend is a pod of this node.
pub const LB_BACKEND_F_LOCAL: u8 = 1 << 0;

/// Value of `hypha_lb4_backends`.
///
/// Readers: `ebpf` (the backend a Maglev slot names), `agent` (writes; backends are
/// shared by every frontend that has them and removed with the last).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbBackend4 {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// `LB_BACKEND_F_*`.
    pub flags: u8,
    /// The node the backend runs on (0: this one, or unknown on a single node).
    pub node_id: u32,
}

/// Value of `hypha_lb6_backends`. Readers: as [`LbBackend4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbBackend6 {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// `LB_BACKEND_F_*`.
    pub flags: u8,
    pub node_id: u32,
}

/// Value of `hypha_lb_maglev`: each slot holds a backend id (of the frontend's family's
/// backend map). A flow's hash modulo [`LB_MAGLEV_SIZE`] picks its slot.
///
/// Readers: `ebpf` (selection), `agent` (computes with `agent/src/service/maglev.rs`,
/// writes whole).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbMaglev {
    pub slots: [u32; LB_MAGLEV_SIZE],
}

/// [`LbAffinityKey::kind`]: `client` holds a network namespace cookie (socket
/// programs: the client is a pod or the host of this node).
pub const LB_AFFINITY_NETNS: u32 = 1;
/// [`LbAffinityKey::kind`]: `client` holds an address (IPv4 in the first 4 bytes).
pub const LB_AFFINITY_ADDR: u32 = 2;

/// Key of `hypha_lb_affinity`. Readers: `ebpf` (socket and NodePort programs, which
/// read and refresh it), `agent` (removes a frontend's entries with it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LbAffinityKey {
    pub service_id: u32,
    /// `LB_AFFINITY_*`.
    pub kind: u32,
    pub client: [u8; 16],
}

/// Value of `hypha_lb_affinity`. An entry older than its frontend's
/// `affinity_timeout_s`, or whose backend is gone from the backend map, is ignored and
/// replaced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbAffinity {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last connection that used it.
    pub last_ns: u64,
}

/// Key of `hypha_lb4_sock`: a socket (its cookie) and the backend it was sent to.
///
/// Readers: `ebpf` (`connect4`/`sendmsg4` write it, `recvmsg4`/`getpeername4` read
/// it). Not read by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LbSockKey4 {
    pub cookie: u64,
    /// The backend, network byte order.
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Value of `hypha_lb4_sock`: the frontend the client asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbSockValue4 {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
}

/// Key of `hypha_lb6_sock`. Readers: as [`LbSockKey4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LbSockKey6 {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Value of `hypha_lb6_sock`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbSockValue6 {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
}

/// Value of `hypha_lb_netns`: a network namespace whose sockets this agent translates.
///
/// Readers: `ebpf` (socket programs), `agent` (writes its own namespace at start and
/// each pod's on endpoint create, removes it on delete).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbNetns {
    /// The pod's host-side ifindex; 0 for the host.
    pub ifindex: u32,
    pub _pad: u32,
}

/// Value of `hypha_lb_backend_stats`, per CPU: what each backend was given.
///
/// Readers: `ebpf` (socket programs count connections and UDP sends, the NodePort
/// program connections and packets), `agent` (creates zeroed with the backend, sums for
/// `hypha service list` and the metrics, deletes with the backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbBackendStats {
    /// Connections (TCP connects, NodePort flows) and UDP sends translated to it.
    pub connections: u64,
    /// Packets translated per packet (NodePort); socket translations count none.
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod user_pod {
    // SAFETY: every type is `repr(C)`, `Copy`, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::LbKey4 {}
    unsafe impl aya::Pod for super::LbKey6 {}
    unsafe impl aya::Pod for super::LbService {}
    unsafe impl aya::Pod for super::LbBackend4 {}
    unsafe impl aya::Pod for super::LbBackend6 {}
    unsafe impl aya::Pod for super::LbMaglev {}
    unsafe impl aya::Pod for super::LbAffinityKey {}
    unsafe impl aya::Pod for super::LbAffinity {}
    unsafe impl aya::Pod for super::LbSockKey4 {}
    unsafe impl aya::Pod for super::LbSockValue4 {}
    unsafe impl aya::Pod for super::LbSockKey6 {}
    unsafe impl aya::Pod for super::LbSockValue6 {}
    unsafe impl aya::Pod for super::LbNetns {}
    unsafe impl aya::Pod for super::LbBackendStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<LbKey4>(), 8);
        assert_eq!(core::mem::size_of::<LbKey6>(), 20);
        assert_eq!(core::mem::size_of::<LbService>(), 16);
        assert_eq!(core::mem::size_of::<LbBackend4>(), 12);
        assert_eq!(core::mem::size_of::<LbBackend6>(), 24);
        assert_eq!(core::mem::size_of::<LbMaglev>(), 4 * LB_MAGLEV_SIZE);
        assert_eq!(core::mem::size_of::<LbAffinityKey>(), 24);
        assert_eq!(core::mem::size_of::<LbAffinity>(), 16);
        assert_eq!(core::mem::size_of::<LbSockKey4>(), 16);
        assert_eq!(core::mem::size_of::<LbSockValue4>(), 12);
        assert_eq!(core::mem::size_of::<LbSockKey6>(), 32);
        assert_eq!(core::mem::size_of::<LbSockValue6>(), 24);
        assert_eq!(core::mem::size_of::<LbNetns>(), 8);
        assert_eq!(core::mem::size_of::<LbBackendStats>(), 24);
    }
}
