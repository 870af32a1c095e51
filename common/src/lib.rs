//! Layouts shared by Hypha's eBPF programs (`ebpf/`) and userspace (`agent/`).
//!
//! Everything here is `#[repr(C)]` with explicit padding, so that the eBPF side and
//! userspace agree byte for byte. The maps themselves are a stable interface: their
//! names are `hypha_<what>` and are pinned under the agent's pin directory. A change of
//! layout gets a new map name (a version suffix), never a silent reinterpretation.
//!
//! Every type names its readers. When you change one, change all of them.
#![no_std]

pub mod lb;
pub mod nat;

/// Maximum number of endpoints (pods) on one node. Sizes `hypha_endpoints4`,
/// `hypha_endpoints6`, `hypha_ifaces` and `hypha_ep_stats_v3`.
pub const MAX_ENDPOINTS: u32 = 16_384;

/// Maximum number of other nodes a node tunnels to. Sizes `hypha_tunnel4`,
/// `hypha_tunnel6`, `hypha_nodes4`, `hypha_nodes6` and `hypha_node_stats`.
pub const MAX_NODES: u32 = 4_096;

/// Maximum number of (endpoint, reason, direction) drop counters.
pub const MAX_DROP_COUNTERS: u32 = 65_536;

/// Names of the pinned maps. Readers: `ebpf/src/main.rs` (declarations), `agent/src/datapath`.
pub mod maps {
    /// [`crate::EndpointKey4`] → [`crate::EndpointInfo`].
    pub const ENDPOINTS4: &str = "hypha_endpoints4";
    /// [`crate::EndpointKey6`] → [`crate::EndpointInfo`].
    pub const ENDPOINTS6: &str = "hypha_endpoints6";
    /// Host-side ifindex (`u32`) → [`crate::EndpointIface`]: who is behind each veth.
    pub const IFACES: &str = "hypha_ifaces";
    /// Host-side ifindex (`u32`) → [`crate::EndpointStats`], per CPU (per family since
    /// v2; with a tunnel counter per direction since v3).
    pub const EP_STATS: &str = "hypha_ep_stats_v3";
    /// [`crate::DropKey`] → [`crate::Counter`], per CPU.
    pub const DROPS: &str = "hypha_drops";
    /// Index 0 → [`crate::NodeConfig`].
    pub const CONFIG: &str = "hypha_config";
    /// LPM trie (prefix length as `u32`, then the IPv4 address in network byte order: aya's
    /// `lpm_trie::Key<u32>` on both sides) → [`crate::IpcacheValue`]: the identity of every
    /// address.
    pub const IPCACHE4: &str = "hypha_ipcache4";
    /// LPM trie (prefix length as `u32`, then the 16 bytes of the IPv6 address: aya's
    /// `lpm_trie::Key<[u8; 16]>` on both sides) → [`crate::IpcacheValue`]. Holds the IPv6
    /// prefixes, as `hypha_ipcache4` the IPv4 ones; the agent writes `::/0` → world.
    pub const IPCACHE6: &str = "hypha_ipcache6";
    /// [`crate::PolicyKey`] → [`crate::PolicyEntry`]: every endpoint's compiled policy.
    pub const POLICY: &str = "hypha_policy";
    /// LRU [`crate::CtKey4`] → [`crate::CtEntry`]: connection tracking.
    pub const CT4: &str = "hypha_ct4";
    /// LRU [`crate::CtKey6`] → [`crate::CtEntry`]: connection tracking of IPv6 flows.
    pub const CT6: &str = "hypha_ct6";
    /// Ring buffer of [`crate::Event`]s for `hypha monitor` (v2: IPv6-sized addresses).
    pub const EVENTS: &str = "hypha_events_v2";
    /// Policy id (`u32`) → per-CPU [`crate::PolicyStats`].
    pub const POLICY_STATS: &str = "hypha_policy_stats";
    /// Per-CPU array, index 0 → [`crate::RedirectSlot`]: the frame being redirected to a
    /// rate-limited endpoint's host veth egress on this CPU.
    pub const REDIRECT: &str = "hypha_redirect";
    /// LRU [`crate::DropKey`] → [`crate::EventBudget`]: what is left of each
    /// (endpoint, reason, direction)'s budget of drop events.
    pub const DROP_EVENTS: &str = "hypha_drop_events";
    /// Maps earlier versions pinned under these names, with layouts that are gone. The
    /// agent unpins them at start (their programs are replaced by then).
    pub const RETIRED: [&str; 3] = ["hypha_ep_stats", "hypha_events", "hypha_ep_stats_v2"];
    /// Array, index 0 → [`crate::TunnelConfig`]: the node's VXLAN device (none: no
    /// tunnel, as on a single node or with native routing).
    pub const TUNNEL_CONFIG: &str = "hypha_tunnel_cfg";
    /// LPM trie (aya's `lpm_trie::Key<u32>`, the IPv4 prefix in network byte order) →
    /// [`crate::TunnelPeer`]: every other node's IPv4 pod CIDR → where to tunnel it.
    pub const TUNNEL4: &str = "hypha_tunnel4";
    /// As [`TUNNEL4`], for IPv6 pod CIDRs (`lpm_trie::Key<[u8; 16]>`).
    pub const TUNNEL6: &str = "hypha_tunnel6";
    /// Hash, a node's IPv4 underlay address (`u32`, network byte order) → its node id
    /// (`u32`): the outer sources the tunnel accepts.
    pub const NODES4: &str = "hypha_nodes4";
    /// As [`NODES4`], keyed by an IPv6 underlay address (`[u8; 16]`).
    pub const NODES6: &str = "hypha_nodes6";
    /// Node id (`u32`) → [`crate::NodeStats`], per CPU: traffic to and from each other
    /// node through the tunnel. Entries are created by the agent only.
    pub const NODE_STATS: &str = "hypha_node_stats";
}

/// Capacity of `hypha_ipcache4`, and of `hypha_ipcache6`.
pub const MAX_IPCACHE: u32 = 65_536;
/// Capacity of `hypha_policy`, across all endpoints. The agent refuses a policy set whose
/// compiled entries would not fit.
pub const MAX_POLICY_ENTRIES: u32 = 262_144;
/// Capacity of `hypha_ct4`, and of `hypha_ct6`; least recently used connections are evicted first.
pub const MAX_CT_ENTRIES: u32 = 262_144;
/// Capacity of `hypha_policy_stats`.
pub const MAX_POLICIES: u32 = 16_384;
/// Size of the `hypha_events` ring buffer in bytes (a power of two, a multiple of the page).
pub const EVENTS_BYTES: u32 = 1 << 20;
/// Capacity of `hypha_drop_events`; the least recently used budgets are evicted first
/// (an evicted budget starts again full).
pub const MAX_DROP_EVENT_BUDGETS: u32 = 16_384;
/// Drop events per second each (endpoint, reason, direction) may send to `hypha monitor`
/// once its burst is spent. Counters count every drop; only events are limited.
pub const DROP_EVENTS_PER_S: u64 = 20;
/// Drop events each (endpoint, reason, direction) may send at once.
pub const DROP_EVENTS_BURST: u32 = 50;

/// Names of the eBPF programs in the object. Readers: `ebpf/src/main.rs`, `agent/src/datapath`.
pub mod programs {
    /// TCX ingress of the host-side veth: packets the pod sends.
    pub const FROM_POD: &str = "hypha_from_pod";
    /// TCX egress of the host-side veth: packets the host stack delivers to the pod.
    pub const TO_POD: &str = "hypha_to_pod";
    /// TCX ingress of the node's VXLAN device: what other nodes send through the tunnel.
    pub const FROM_TUNNEL: &str = "hypha_from_tunnel";
    /// TCX egress of the node's VXLAN device: what enters the tunnel. Sets the tunnel
    /// key of packets the host stack routes there (the host's own, forwarded ones); those
    /// `hypha_from_pod` redirects there carry theirs already.
    pub const TO_TUNNEL: &str = "hypha_to_tunnel";
    /// `cls_bpf` classifier (classic mode) of the `htb` root qdisc of a rate-limited
    /// interface (the pod's own, for its egress; the host veth, for its ingress): hashes
    /// each flow's 5-tuple into one of the [`crate::fq`] leaf classes, whose id it returns.
    pub const FLOW_CLASS: &str = "hypha_flow_class";
}

/// The per-flow queues under a bandwidth limit: an `htb` root qdisc with Hypha's handle,
/// leaf classes sharing the limit (the agent's `--fq-queues`, [`fq::DEFAULT_QUEUES`] by
/// default). Readers: `ebpf/src/fq.rs` (returns a leaf's class id), `agent/src/bandwidth.rs`
/// (builds the classes with these ids), `agent/src/datapath/ebpf.rs` (sets the count).
pub mod fq {
    /// The major number of Hypha's root qdiscs (`4859:`, "HY"); the netlink crate's
    /// `HYPHA_QDISC_MAJOR` (the agent's tests check they agree).
    pub const QDISC_MAJOR: u16 = 0x4859;
    /// How many leaf classes flows are hashed into unless the agent is told otherwise
    /// (see `agent/src/bandwidth.rs` for the measurements behind the choice).
    pub const DEFAULT_QUEUES: u16 = 16;
    /// The most leaf classes a limiter may have: installing one costs two netlink
    /// requests per leaf.
    pub const MAX_QUEUES: u16 = 256;
    /// The classifier's global holding the leaf count, which the agent sets at load.
    pub const QUEUES_GLOBAL: &str = "HYPHA_FQ_QUEUES";
    /// The minor of leaf 0; leaf `i` is `4859:(LEAF_MINOR_BASE + i)`. Non-IP packets go
    /// to leaf 0, which is also the `htb`'s default class.
    pub const LEAF_MINOR_BASE: u16 = 0x100;

    /// The class id (`major << 16 | minor`) of leaf `i`.
    pub const fn leaf_classid(i: u16) -> u32 {
        ((QDISC_MAJOR as u32) << 16) | (LEAF_MINOR_BASE + i) as u32
    }
}

/// Key of `hypha_endpoints4`: a pod's IPv4 address.
///
/// Readers: `ebpf` (`hypha_from_pod` looks up the sender to check its source, the
/// destination to redirect, and the ARP sender to answer; `hypha_to_pod` the
/// destination, for its ingress policy), `agent` (writes on endpoint create,
/// deletes on endpoint delete, reads on restart to re-adopt).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey4 {
    /// IPv4 address in network byte order, exactly as it sits in the packet, so the
    /// datapath looks it up without a byte swap.
    pub addr: u32,
}

impl EndpointKey4 {
    /// Key for an address given as its four octets.
    pub const fn from_octets(octets: [u8; 4]) -> Self {
        Self {
            addr: u32::from_ne_bytes(octets),
        }
    }
}

/// Key of `hypha_endpoints6`: a pod's IPv6 address (its global one, never its
/// link-local one).
///
/// Readers: `ebpf` (`hypha_from_pod` looks up the destination to redirect;
/// `hypha_to_pod` the destination, for its ingress policy), `agent` (writes on endpoint
/// create, deletes on endpoint delete, reads on restart to re-adopt).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey6 {
    /// The 16 bytes of the address, as in the packet.
    pub addr: [u8; 16],
}

/// Value of `hypha_endpoints4` and `hypha_endpoints6`: where a pod lives and how to
/// address frames to it. A dual-stack pod has one entry in each, with equal values.
///
/// Readers: `ebpf` (`hypha_from_pod`: redirect target and L2 rewrite, ARP replies),
/// `agent` (datapath writer, endpoint list).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// ifindex of the host-side veth: the target of `bpf_redirect_peer`.
    pub ifindex: u32,
    /// The agent's endpoint id, stable across agent restarts.
    pub endpoint_id: u32,
    /// MAC of the pod's interface (destination MAC of frames delivered to it).
    pub pod_mac: [u8; 6],
    /// MAC of the host-side veth: the pod's gateway MAC, source MAC of frames delivered
    /// to the pod and the answer to its ARP requests for the gateway.
    pub host_mac: [u8; 6],
    /// `ENDPOINT_F_*` bits.
    pub flags: u32,
}

/// Value of `hypha_ifaces`, keyed by the host-side ifindex of an endpoint's veth: the
/// endpoint behind it, with its own addresses, so that `hypha_from_pod` checks a
/// sender's family and source address with one lookup, and `hypha_to_pod` the family
/// of what it delivers.
///
/// `flags` are the endpoint's `ENDPOINT_F_*`, the same as in its `EndpointInfo`s: the
/// agent writes all of its entries whenever the flags change. The family bits
/// ([`ENDPOINT_F_IPV4`], [`ENDPOINT_F_IPV6`]) say which families the endpoint has; a
/// frame of another family is dropped (`DropReason::UnsupportedFamily`).
///
/// Readers: `ebpf` (both programs: family, anti-spoofing, the sender's policy flags),
/// `agent` (writes on endpoint create and flag changes, deletes on endpoint delete,
/// checks it in CNI CHECK and at adoption).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointIface {
    pub endpoint_id: u32,
    /// `ENDPOINT_F_*` bits.
    pub flags: u32,
    /// MAC of the pod's interface: the only source MAC it may send with.
    pub pod_mac: [u8; 6],
    /// MAC of the host-side veth (the pod's gateway MAC).
    pub host_mac: [u8; 6],
    /// The pod's IPv4 address, network byte order; 0 without IPv4.
    pub addr4: u32,
    /// The pod's IPv6 address; all zero without IPv6. The pod may also send from its
    /// link-local address, [`link_local_of`] its MAC, and from `::` for duplicate
    /// address detection.
    pub addr6: [u8; 16],
}

/// The IPv6 link-local address a pod's interface has: `fe80::/64` with the modified
/// EUI-64 interface identifier of its MAC (RFC 4291, appendix A), the address the kernel
/// gives an interface with `addr_gen_mode` eui64, which hypha-cni sets on the pod's
/// interface. Readers: `ebpf` (anti-spoofing), `cni-plugin` and `agent` (CHECK).
pub const fn link_local_of(mac: [u8; 6]) -> [u8; 16] {
    [
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
    ]
}

/// The pods' IPv6 gateway: the link-local `fe80::1`, the same on every node and every
/// veth. A pod routes `::/0` through it; `hypha_from_pod` answers the pod's neighbour
/// solicitations for it with the host-side veth's MAC (as it answers ARP for the IPv4
/// gateway), so no host interface holds it and no router advertisement is needed. It
/// can never be a pod's own link-local address, whose EUI-64 identifier has `ff:fe` in
/// its middle. Readers: `ebpf`, `agent` (allocation answers), `cni-plugin` (routes).
pub const GATEWAY6: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Most IPv6 extension headers `hypha_from_pod` and `hypha_to_pod` walk to find a
/// packet's upper-layer header; a packet with more is dropped
/// (`DropReason::TooManyExtensionHeaders`).
pub const MAX_IPV6_EXT_HEADERS: u32 = 8;

/// Per-CPU counters of one endpoint, keyed by its host-side ifindex in
/// `hypha_ep_stats_v3`, per family: IPv4 (with ARP), IPv6 (with its neighbour
/// discovery) and everything else (frames of no family: unknown EtherTypes, runts).
///
/// Readers: `ebpf` (both programs update it; the entry is created by the agent, never by
/// the datapath), `agent` (creates zeroed on endpoint create, sums per CPU for
/// `hypha endpoint list` and the metrics, deletes on endpoint delete).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    pub ipv4: FamilyStats,
    pub ipv6: FamilyStats,
    pub other: FamilyStats,
}

impl EndpointStats {
    /// The counters of all families together.
    pub fn total(&self) -> FamilyStats {
        let mut t = self.ipv4;
        t.add(&self.ipv6);
        t.add(&self.other);
        t
    }

    /// Adds another set, as when summing the per-CPU values.
    pub fn add(&mut self, other: &EndpointStats) {
        self.ipv4.add(&other.ipv4);
        self.ipv6.add(&other.ipv6);
        self.other.add(&other.other);
    }
}

/// The counters of one family of one endpoint.
///
/// Directions are the pod's: `egress` is what the pod sends (seen at the host veth's
/// ingress hook), `ingress` what it receives. A packet redirected from pod A to pod B
/// is counted in A's `egress.redirected` and in B's `ingress.redirected`.
///
/// Readers: `ebpf` (both programs update it; the entry is created by the agent, never by
/// the datapath), `agent` (creates zeroed on endpoint create, sums per CPU for
/// `hypha endpoint list`, deletes on endpoint delete).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilyStats {
    pub egress: DirectionStats,
    pub ingress: DirectionStats,
}

impl FamilyStats {
    pub fn add(&mut self, other: &FamilyStats) {
        self.egress.add(&other.egress);
        self.ingress.add(&other.ingress);
    }
}

/// Counters of one direction of one endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Handed to (or received from) the host's stack: pod ↔ host and pod ↔ world.
    pub passed: Counter,
    /// Moved by the eBPF datapath straight between two pods (`bpf_redirect_peer`).
    pub redirected: Counter,
    /// To or from a pod on another node through the tunnel (egress: redirected into the
    /// VXLAN device; ingress: delivered from it).
    pub tunnel: Counter,
    /// Dropped by the datapath; the reasons are in `hypha_drops`.
    pub dropped: Counter,
}

impl DirectionStats {
    pub fn add(&mut self, other: &DirectionStats) {
        self.passed.add(&other.passed);
        self.redirected.add(&other.redirected);
        self.tunnel.add(&other.tunnel);
        self.dropped.add(&other.dropped);
    }
}

/// A packet and byte counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    /// Adds another counter, as when summing the per-CPU values.
    pub fn add(&mut self, other: &Counter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

/// Key of `hypha_drops`: why a packet of which endpoint was dropped in which direction.
///
/// Readers: `ebpf` (inserts on first drop), `agent` (reports in `hypha endpoint list`
/// and deletes an endpoint's keys when the endpoint goes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DropKey {
    /// Host-side ifindex of the endpoint.
    pub ifindex: u32,
    /// A [`DropReason`] as `u16`.
    pub reason: u16,
    /// [`DIR_EGRESS`] or [`DIR_INGRESS`].
    pub direction: u8,
    /// Explicit padding; always zero so keys compare equal byte for byte.
    pub _pad: u8,
}

/// Value of `hypha_drop_events`: a token bucket of drop events for one [`DropKey`].
///
/// A drop sends an event to `hypha monitor` only when its key has a token left; tokens
/// come back at [`DROP_EVENTS_PER_S`] up to [`DROP_EVENTS_BURST`]. So a flood of drops of
/// one kind costs at most that many events per second, and cannot fill the ring buffer
/// for the other endpoints and reasons. The map is shared by all CPUs and updated without
/// atomics: concurrent drops of one key on several CPUs may let a few more events through.
///
/// Readers: `ebpf` (`count_drop`). Not read by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// `bpf_ktime_get_ns` up to which tokens have been added.
    pub refilled_ns: u64,
    /// Events that may still be sent.
    pub tokens: u32,
    pub _pad: u32,
}

/// `EndpointInfo::flags`: the endpoint is selected by some policy for ingress, so only
/// what a policy allows reaches it.
pub const ENDPOINT_F_INGRESS_POLICY: u32 = 1 << 0;
/// `EndpointInfo::flags`: as above, for what the endpoint sends.
pub const ENDPOINT_F_EGRESS_POLICY: u32 = 1 << 1;
/// `EndpointInfo::flags`: every policy selecting it for ingress is in audit mode: what
/// would be dropped is reported and passed.
pub const ENDPOINT_F_INGRESS_AUDIT: u32 = 1 << 2;
/// `EndpointInfo::flags`: as above, for egress.
pub const ENDPOINT_F_EGRESS_AUDIT: u32 = 1 << 3;
/// The `ENDPOINT_F_*` bits the policy compiler owns; the agent writes them from a policy
/// diff and leaves every other bit as it is.
pub const ENDPOINT_F_POLICY_MASK: u32 = ENDPOINT_F_INGRESS_POLICY
    | ENDPOINT_F_EGRESS_POLICY
    | ENDPOINT_F_INGRESS_AUDIT
    | ENDPOINT_F_EGRESS_AUDIT;
/// `EndpointInfo::flags`: what the endpoint receives is rate limited by a qdisc on the
/// egress of its host veth. `hypha_from_pod` then delivers same-node traffic to it with
/// `bpf_redirect` (the host veth's egress, through the qdisc) instead of
/// `bpf_redirect_peer` (which would skip the qdisc). Set by the agent from the endpoint's
/// bandwidth, never by the policy compiler.
pub const ENDPOINT_F_INGRESS_LIMIT: u32 = 1 << 4;
/// `EndpointInfo::flags`, `EndpointIface::flags`: the endpoint has an IPv4 address; IPv4
/// and ARP pass to and from it. Set by the agent from the endpoint's addresses.
pub const ENDPOINT_F_IPV4: u32 = 1 << 5;
/// As [`ENDPOINT_F_IPV4`], for IPv6 and its neighbour discovery.
pub const ENDPOINT_F_IPV6: u32 = 1 << 6;

/// Value of the per-CPU `hypha_redirect` slot: the frame `hypha_from_pod` is handing, on
/// this CPU, to the egress of a rate-limited endpoint's host veth (`bpf_redirect` to
/// `ifindex`).
///
/// The redirect runs the destination's TCX egress (`hypha_to_pod`) synchronously, on the
/// same CPU, with bottom halves off (`skb_do_redirect` → `dev_queue_xmit` → TCX egress,
/// before the qdisc): no other frame passes through `hypha_to_pod` on that CPU in
/// between. `hypha_to_pod` consumes the slot on every run (reads it and clears it) and
/// treats the frame as already handled (counted and policy-checked at the sender's veth)
/// only when it matches `ifindex` and `len`. Only the eBPF programs write the slot, so
/// no mark, nftables rule or socket option can make a frame skip the receiver's policy
/// (the `skb->mark` of a frame is not used for this at all). A slot left by a redirect
/// that failed before reaching the egress is consumed by the next `hypha_to_pod` run on
/// that CPU; when it does not match, that frame is simply checked like any other.
///
/// Readers: `ebpf` (both programs). Not read by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectSlot {
    /// Host-side ifindex of the destination endpoint; 0: the slot is empty.
    pub ifindex: u32,
    /// `skb->len` of the redirected frame.
    pub len: u32,
}

/// The UDP port of the VXLAN tunnel by default: Linux's historical VXLAN port, which
/// Flannel and Cilium use too (`--tunnel-port 4789` for IANA's).
pub const DEFAULT_TUNNEL_PORT: u16 = 8472;
/// Bytes VXLAN adds to an inner IP packet over an IPv4 underlay: outer IPv4 (20), UDP
/// (8), VXLAN (8) and the inner Ethernet header (14).
pub const VXLAN_OVERHEAD4: u32 = 50;
/// As [`VXLAN_OVERHEAD4`], over an IPv6 underlay (outer IPv6 header of 40).
pub const VXLAN_OVERHEAD6: u32 = 70;

/// Value at index 0 of `hypha_tunnel_cfg`: the node's tunnel.
///
/// Readers: `ebpf` (`hypha_from_pod` redirects to `ifindex`; `hypha_to_tunnel` and
/// `hypha_from_pod` set the tunnel key's source from `local4`/`local6`), `agent`
/// (writes at start: all zero without a tunnel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelConfig {
    /// ifindex of the node's VXLAN device (collect-metadata mode); 0: no tunnel.
    pub ifindex: u32,
    /// `TUNNEL_F_*` bits.
    pub flags: u32,
    /// This node's IPv4 underlay address (network byte order), the outer source; 0: the
    /// kernel's choice.
    pub local4: u32,
    pub _pad: u32,
    /// This node's IPv6 underlay address; all zero: none.
    pub local6: [u8; 16],
}

/// Value of `hypha_tunnel4` and `hypha_tunnel6`: the node behind a pod CIDR.
///
/// Readers: `ebpf` (`hypha_from_pod` for pod traffic, `hypha_to_tunnel` for the host's,
/// set the tunnel key's destination from it and count in `hypha_node_stats`), `agent`
/// (writes from the cluster's nodes; deletes a node's when it goes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelPeer {
    /// The node's id, the key of its `hypha_node_stats` entry.
    pub node_id: u32,
    /// `PEER_F_*` bits.
    pub flags: u32,
    /// Its IPv4 underlay address (network byte order); used unless [`PEER_F_IPV6`].
    pub addr4: u32,
    pub _pad: u32,
    /// Its IPv6 underlay address; used with [`PEER_F_IPV6`].
    pub addr6: [u8; 16],
}

/// `TunnelPeer::flags`: tunnel to the node's IPv6 underlay address (`addr6`).
pub const PEER_F_IPV6: u32 = 1 << 0;

/// Per-CPU value of `hypha_node_stats`: traffic with one other node through the tunnel,
/// inner packets and bytes as the pods sent them.
///
/// Readers: `ebpf` (`hypha_from_pod` and `hypha_to_tunnel` count `tx`,
/// `hypha_from_tunnel` counts `rx` and `dropped`), `agent` (creates zeroed per node,
/// sums per CPU for the metrics and `hypha node list`, deletes when the node goes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub tx: Counter,
    pub rx: Counter,
    /// Received from the node and dropped (policy, unknown family, a bad identity).
    pub dropped: Counter,
}

impl NodeStats {
    /// Adds another set, as when summing the per-CPU values.
    pub fn add(&mut self, other: &NodeStats) {
        self.tx.add(&other.tx);
        self.rx.add(&other.rx);
        self.dropped.add(&other.dropped);
    }
}

/// `DropKey::direction` of what the pod sends.
pub const DIR_EGRESS: u8 = 0;
/// `DropKey::direction` of what the pod receives.
pub const DIR_INGRESS: u8 = 1;

/// Value at index 0 of the `hypha_config` array: node-wide settings of the datapath.
///
/// Readers: `ebpf` (`hypha_from_pod` answers ARP for `gateway`), `agent` (writes at start).
/// The IPv6 gateway is the constant [`GATEWAY6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// The pods' IPv4 gateway address, network byte order (0 on an IPv6-only node).
    pub gateway: u32,
    /// `NODE_F_*` bits.
    pub flags: u32,
}

/// Well-known security identities. Label identities start at [`IDENTITY_FIRST_LABELS`],
/// CIDR identities at [`IDENTITY_FIRST_CIDR`]. Readers: `ebpf`, `agent` (policy).
pub const IDENTITY_ANY: u32 = 0;
/// The node itself (its addresses, the gateway).
pub const IDENTITY_HOST: u32 = 1;
/// Anything not otherwise known, over IPv4 (`0.0.0.0/0`).
pub const IDENTITY_WORLD: u32 = 2;
/// Anything not otherwise known, over IPv6 (`::/0`). Each family's world has its own
/// identity (as Cilium's `world-ipv4` and `world-ipv6`), so that a rule naming
/// `0.0.0.0/0` allows no IPv6 and one naming `::/0` no IPv4; the `world` entity covers
/// both. Readers: `agent` (policy), and `ebpf` only through `hypha_ipcache6`.
pub const IDENTITY_WORLD6: u32 = 3;
/// Another node of the cluster: its underlay and gateway addresses, and what it sends
/// through the tunnel as its host (a tunnel key of identity [`IDENTITY_HOST`] is the
/// sender's host, which is this one's remote node). Readers: `ebpf`
/// (`hypha_from_tunnel`), `agent` (ipcache, policy: part of the `cluster` entity).
pub const IDENTITY_REMOTE_NODE: u32 = 4;
pub const IDENTITY_FIRST_LABELS: u32 = 256;
pub const IDENTITY_FIRST_CIDR: u32 = 1 << 24;

/// Value of `hypha_ipcache4` and `hypha_ipcache6`; the longest prefix holding an address
/// gives its identity. Identities do not depend on the family: a dual-stack pod's two
/// addresses map to the same identity.
/// Readers: `ebpf` (both programs, for the remote identity of a new flow), `agent` (writes
/// endpoints' /32s and /128s, the host's addresses, policy CIDRs, and 0.0.0.0/0 and ::/0
/// → world).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    pub flags: u32,
}

/// Key of `hypha_policy`: may `endpoint_id` exchange `proto` traffic on `dport` with
/// `identity` in `direction`? Zero in `identity`, `dport` or `proto` is a wildcard; the
/// datapath looks up the exact key and the wildcard forms, and an explicit deny found in
/// any of them wins.
/// Readers: `ebpf` (policy check of new flows), `agent` (the compiler's output, applied
/// as a diff).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// The endpoint whose policy this is.
    pub endpoint_id: u32,
    /// The remote identity (source for ingress, destination for egress).
    pub identity: u32,
    /// Destination port, host byte order; 0 = any port.
    pub dport: u16,
    /// IP protocol (6 TCP, 17 UDP, 132 SCTP, 1 ICMP); 0 = any.
    pub proto: u8,
    /// [`DIR_EGRESS`] or [`DIR_INGRESS`].
    pub direction: u8,
}

/// `PolicyEntry::action`: let the flow pass.
pub const POLICY_ALLOW: u8 = 1;
/// `PolicyEntry::action`: an explicit deny, which wins over every allow.
pub const POLICY_DENY: u8 = 2;
/// `PolicyEntry::flags`: the deciding policy is in audit mode: report, do not drop.
pub const POLICY_F_AUDIT: u8 = 1;

/// Value of `hypha_policy`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyEntry {
    /// The policy that put this entry here (reported by the monitor and metrics).
    pub policy_id: u32,
    /// [`POLICY_ALLOW`] or [`POLICY_DENY`].
    pub action: u8,
    /// `POLICY_F_*` bits.
    pub flags: u8,
    pub _pad: u16,
}

/// Per-CPU value of `hypha_policy_stats`, by policy id. Readers: `ebpf` (counts the flows
/// each policy decided), `agent` (metrics, `hypha policy list`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    pub allowed: u64,
    pub denied: u64,
    /// Flows an audit-mode policy would have denied.
    pub audited: u64,
}

/// Key of `hypha_ct4`: a flow as seen from its sender. A reply matches the key with the
/// addresses and ports swapped. Readers: `ebpf`; `agent` (flushes an endpoint's flows when
/// it goes, reports the table's size).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey4 {
    pub saddr: u32,
    pub daddr: u32,
    /// Ports in network byte order as in the packet; 0 for protocols without ports.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Key of `hypha_ct6`: an IPv6 flow as seen from its sender, as [`CtKey4`]. Readers:
/// `ebpf`; `agent` (flushes an endpoint's flows when it goes, reports the table's size).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports in network byte order as in the packet; 0 for protocols without ports
    /// and for fragments after the first. For ICMPv6 echo, `sport` is the identifier.
    pub sport: u16,
    pub dport: u16,
    /// The upper-layer protocol, after the extension headers.
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of `hypha_ct4` and `hypha_ct6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` after which the entry is stale.
    pub expires_ns: u64,
    /// The policy that allowed the flow (0: no policy applied).
    pub policy_id: u32,
    /// `CT_*` TCP state bits seen so far.
    pub tcp_flags: u8,
    pub _pad: [u8; 3],
}

/// `CtEntry::tcp_flags`: a SYN was seen.
pub const CT_SYN: u8 = 1 << 0;
/// `CtEntry::tcp_flags`: the reply direction has been seen (the flow is established).
pub const CT_REPLIED: u8 = 1 << 1;
/// `CtEntry::tcp_flags`: a FIN or RST was seen: the flow is closing.
pub const CT_CLOSING: u8 = 1 << 2;

/// Timeouts of connection tracking, in seconds: a TCP flow being opened, an established
/// TCP flow, a closing TCP flow, and anything else (UDP, ICMP, SCTP).
pub const CT_TIMEOUT_SYN_S: u64 = 60;
pub const CT_TIMEOUT_TCP_S: u64 = 6 * 3600;
pub const CT_TIMEOUT_CLOSE_S: u64 = 10;
pub const CT_TIMEOUT_OTHER_S: u64 = 60;

/// `Event::kind`: a packet was dropped (`reason` says why).
pub const EVENT_DROP: u8 = 1;
/// `Event::kind`: a new flow was allowed by policy.
pub const EVENT_POLICY_ALLOW: u8 = 2;
/// `Event::kind`: an audit-mode policy would have dropped this new flow.
pub const EVENT_POLICY_AUDIT: u8 = 3;

/// One record of the `hypha_events` ring buffer. Readers: `ebpf` (writes), `agent`
/// (`hypha monitor` streams them).
///
/// Drop events are rate limited per (endpoint, reason, direction): at most
/// [`DROP_EVENTS_BURST`] at once and [`DROP_EVENTS_PER_S`] per second after that (see
/// [`EventBudget`]); the counters count every drop. A drop that is not a policy verdict
/// has `policy_id` and `remote_identity` 0 and, when its frame is neither IPv4 nor IPv6
/// (or too short to be read), `family`, addresses, ports and protocol 0 as well.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `EVENT_*`.
    pub kind: u8,
    /// [`DIR_EGRESS`] or [`DIR_INGRESS`], of the endpoint `endpoint_id`.
    pub direction: u8,
    /// The upper-layer protocol (for IPv6, after the extension headers).
    pub proto: u8,
    /// 4 or 6: how to read `saddr` and `daddr`; 0 when the frame had no addresses.
    pub family: u8,
    /// A [`DropReason`] for drops; 0 otherwise.
    pub reason: u16,
    pub dport: u16,
    pub sport: u16,
    pub _pad2: u16,
    /// Host-side ifindex of the endpoint concerned.
    pub ifindex: u32,
    /// The endpoint whose policy decided (0 when none did, as for drops that are not
    /// policy verdicts: `ifindex` names the endpoint then).
    pub endpoint_id: u32,
    /// The deciding policy (0: none, e.g. "no policy allows this").
    pub policy_id: u32,
    /// Identity of the other side.
    pub remote_identity: u32,
    /// Length of the packet.
    pub len: u32,
    /// Addresses as in the packet: all 16 bytes for IPv6, the first 4 for IPv4 (the
    /// rest zero).
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// Why the datapath dropped a packet.
///
/// The numbering is an interface: it is stored in `hypha_drops`, sent in drop
/// [`Event`]s and printed by the agent, the CLI, the metrics and `hypha monitor`. Never
/// renumber; add at the end.
///
/// Every drop the eBPF programs make is counted (`hypha_ep_stats`, `hypha_drops`) and
/// reported to `hypha monitor` as an [`EVENT_DROP`] event, policy drops and all others
/// alike; events (not counts) are rate limited per (endpoint, reason, direction) by
/// `hypha_drop_events` (see [`EventBudget`]).
/// Readers: `ebpf` (every drop), `agent` (`DropReason::name` in reports, the monitor and
/// metrics).
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The IPv4 header is cut short: the frame ends before 20 bytes of IPv4 header, or
    /// before the length its IHL field claims.
    InvalidIpv4Header = 1,
    /// The IPv4 header is malformed: version not 4 or IHL below 5.
    MalformedIpv4 = 2,
    /// An EtherType the datapath does not carry (neither IPv4, IPv6 nor ARP), in either
    /// direction.
    UnknownL3 = 3,
    /// An ARP frame shorter than an Ethernet/IPv4 ARP packet.
    InvalidArp = 4,
    /// A helper call failed (a redirect or checksum rewrite), so the packet could not be
    /// forwarded.
    HelperFailed = 5,
    /// The endpoint is selected by policy in this direction and no policy allows the flow.
    PolicyDenied = 6,
    /// An explicit deny rule matched the flow.
    PolicyDenyRule = 7,
    /// The pod sent with an address or MAC that is not its own.
    SpoofedSource = 8,
    /// The endpoint's rate limiter (a `tbf` qdisc, egress on the pod's interface, ingress
    /// on its host veth) dropped the packet because its queue was full. Counted by the
    /// kernel, not by the eBPF programs: the agent reads the qdisc's drop counter, so
    /// this reason shows in `hypha endpoint list` but never in `hypha_drops` nor in
    /// `hypha monitor`.
    BandwidthLimit = 9,
    /// A frame of an L3 family the endpoint has no address of (IPv6 to or from an
    /// IPv4-only pod, IPv4 or ARP to or from an IPv6-only one), in either direction,
    /// neighbour discovery included.
    UnsupportedFamily = 10,
    /// The IPv6 header is cut short: the frame ends before its 40 bytes.
    InvalidIpv6Header = 11,
    /// The IPv6 header is malformed: version not 6.
    MalformedIpv6 = 12,
    /// An IPv6 extension header (hop-by-hop, routing, destination options, fragment) is
    /// cut short: the frame ends before the length it claims.
    InvalidExtensionHeader = 13,
    /// More IPv6 extension headers than the datapath walks
    /// ([`MAX_IPV6_EXT_HEADERS`]).
    TooManyExtensionHeaders = 14,
    /// An ICMPv6 neighbour discovery message the pod sent is cut short, or has a hop
    /// limit other than 255 (RFC 4861 section 7.1).
    InvalidNeighborDiscovery = 15,
    /// A VXLAN packet whose outer source is not the underlay address of a known node
    /// (the underlay is trusted only as far as the nodes the cluster store lists).
    /// Counted against the VXLAN device's ifindex.
    UnknownTunnelSource = 16,
    /// A VXLAN packet whose VNI is no identity a node sends: 0, a reserved identity other
    /// than host and world, or beyond the label identities.
    InvalidTunnelIdentity = 17,
    /// A packet routed into the tunnel for an address no node's pod CIDR holds (a node
    /// gone, or an address of the cluster CIDR no node has been given).
    NoTunnelPeer = 18,
    /// A new connection to a service frontend that has no backends (none selected, none
    /// ready, or none on this node under a `Local` traffic policy): refused at once
    /// (ICMP unreachable, TCP reset or `ECONNREFUSED`), never left to time out.
    NoServiceBackend = 19,
    /// A packet NodePort forwards itself (to a backend on another node, or a backend's
    /// reply back to its client) whose TTL or hop limit is spent (1 or 0), as a router
    /// would refuse it. A client's packet is answered with ICMP (ICMPv6) "time
    /// exceeded" from the frontend's address; a reply is dropped.
    TtlExceeded = 20,
}

impl DropReason {
    /// Every reason, in numbering order.
    pub const ALL: [DropReason; 20] = [
        DropReason::InvalidIpv4Header,
        DropReason::MalformedIpv4,
        DropReason::UnknownL3,
        DropReason::InvalidArp,
        DropReason::HelperFailed,
        DropReason::PolicyDenied,
        DropReason::PolicyDenyRule,
        DropReason::SpoofedSource,
        DropReason::BandwidthLimit,
        DropReason::UnsupportedFamily,
        DropReason::InvalidIpv6Header,
        DropReason::MalformedIpv6,
        DropReason::InvalidExtensionHeader,
        DropReason::TooManyExtensionHeaders,
        DropReason::InvalidNeighborDiscovery,
        DropReason::UnknownTunnelSource,
        DropReason::InvalidTunnelIdentity,
        DropReason::NoTunnelPeer,
        DropReason::NoServiceBackend,
        DropReason::TtlExceeded,
    ];

    /// The reason for a stored code, if the code is known.
    pub fn from_u16(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u16 == code)
    }

    /// A short, stable, machine-friendly name.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::InvalidIpv4Header => "invalid-ipv4-header",
            DropReason::MalformedIpv4 => "malformed-ipv4",
            DropReason::UnknownL3 => "unknown-l3-protocol",
            DropReason::InvalidArp => "invalid-arp",
            DropReason::HelperFailed => "helper-failed",
            DropReason::PolicyDenied => "policy-denied",
            DropReason::PolicyDenyRule => "policy-deny-rule",
            DropReason::SpoofedSource => "spoofed-source",
            DropReason::BandwidthLimit => "bandwidth-limit",
            DropReason::UnsupportedFamily => "unsupported-family",
            DropReason::InvalidIpv6Header => "invalid-ipv6-header",
            DropReason::MalformedIpv6 => "malformed-ipv6",
            DropReason::InvalidExtensionHeader => "invalid-extension-header",
            DropReason::TooManyExtensionHeaders => "too-many-extension-headers",
            DropReason::InvalidNeighborDiscovery => "invalid-neighbor-discovery",
            DropReason::UnknownTunnelSource => "unknown-tunnel-source",
            DropReason::InvalidTunnelIdentity => "invalid-tunnel-identity",
            DropReason::NoTunnelPeer => "no-tunnel-peer",
            DropReason::NoServiceBackend => "no-service-backend",
            DropReason::TtlExceeded => "ttl-exceeded",
        }
    }
}

/// Per-endpoint packet tracing (`hypha endpoint debug ENDPOINT on|off`): the programs
/// write log lines through aya-log for the endpoints listed in [`debug::MAP`], and for
/// no others. Everything of it lives in this block.
///
/// Readers: `ebpf/src/debug.rs` (checks and logs), `agent/src/datapath/ebpf.rs` (writes
/// the map and the flag from the endpoints' saved setting).
pub mod debug {
    /// Name of the pinned map host-side ifindex (`u32`) → endpoint id (`u32`) of every
    /// endpoint whose packets are traced. Pinned so that tracing survives an agent
    /// restart with the datapath; the agent rewrites it from its state at start anyway.
    pub const MAP: &str = "hypha_debug";
    /// `NodeConfig::flags`: [`MAP`] is not empty. The programs read this bit first (an
    /// read of `hypha_config`) and look up [`MAP`] only when it is
    /// set: while no endpoint is traced, tracing costs one array lookup (which the
    /// verifier inlines) per program run. A bit far from the low ones, which other
    /// node-wide settings may take.
    pub const NODE_F_DEBUG: u32 = 1 << 16;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and byte arrays,
    // with explicit padding, so every bit pattern is valid and there are no holes.
    unsafe impl aya::Pod for super::EndpointKey4 {}
    unsafe impl aya::Pod for super::EndpointKey6 {}
    unsafe impl aya::Pod for super::EndpointIface {}
    unsafe impl aya::Pod for super::FamilyStats {}
    unsafe impl aya::Pod for super::CtKey6 {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::EndpointStats {}
    unsafe impl aya::Pod for super::DirectionStats {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::DropKey {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::IpcacheValue {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyEntry {}
    unsafe impl aya::Pod for super::PolicyStats {}
    unsafe impl aya::Pod for super::CtKey4 {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::RedirectSlot {}
    unsafe impl aya::Pod for super::EventBudget {}
    unsafe impl aya::Pod for super::TunnelConfig {}
    unsafe impl aya::Pod for super::TunnelPeer {}
    unsafe impl aya::Pod for super::NodeStats {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        // Sizes are the sums of the fields: any implicit padding would show here.
        assert_eq!(size_of::<EndpointKey4>(), 4);
        assert_eq!(size_of::<EndpointInfo>(), 4 + 4 + 6 + 6 + 4);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(size_of::<DirectionStats>(), 4 * 16);
        assert_eq!(size_of::<FamilyStats>(), 2 * 4 * 16);
        assert_eq!(size_of::<EndpointStats>(), 3 * 2 * 4 * 16);
        assert_eq!(size_of::<TunnelConfig>(), 4 * 4 + 16);
        assert_eq!(size_of::<TunnelPeer>(), 4 * 4 + 16);
        assert_eq!(size_of::<NodeStats>(), 3 * 16);
        assert_eq!(size_of::<EndpointKey6>(), 16);
        assert_eq!(size_of::<EndpointIface>(), 4 + 4 + 6 + 6 + 4 + 16);
        assert_eq!(size_of::<CtKey6>(), 16 + 16 + 2 + 2 + 1 + 3);
        assert_eq!(size_of::<DropKey>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<NodeConfig>(), 8);
        assert_eq!(align_of::<EndpointInfo>(), 4);
        assert_eq!(size_of::<IpcacheValue>(), 8);
        assert_eq!(size_of::<PolicyKey>(), 4 + 4 + 2 + 1 + 1);
        assert_eq!(size_of::<PolicyEntry>(), 4 + 1 + 1 + 2);
        assert_eq!(size_of::<PolicyStats>(), 24);
        assert_eq!(size_of::<CtKey4>(), 4 + 4 + 2 + 2 + 1 + 3);
        assert_eq!(size_of::<CtEntry>(), 8 + 4 + 1 + 3);
        assert_eq!(size_of::<Event>(), 4 + 2 + 2 + 2 + 2 + 4 * 5 + 16 * 2);
        assert_eq!(size_of::<RedirectSlot>(), 4 + 4);
        assert_eq!(size_of::<EventBudget>(), 8 + 4 + 4);
    }

    #[test]
    fn endpoint_key_is_in_packet_byte_order() {
        let key = EndpointKey4::from_octets([10, 244, 0, 7]);
        assert_eq!(key.addr.to_ne_bytes(), [10, 244, 0, 7]);
    }

    #[test]
    fn link_local_is_the_modified_eui64_of_the_mac() {
        // The universal/local bit (0x02 of the first octet) is flipped, ff:fe goes in
        // the middle: 02:11:22:33:44:55 → fe80::11:22ff:fe33:4455.
        let ll = link_local_of([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert_eq!(
            ll,
            [
                0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x00, 0x11, 0x22, 0xff, 0xfe, 0x33, 0x44, 0x55
            ]
        );
        assert_ne!(ll, GATEWAY6);
    }

    #[test]
    fn drop_reasons_round_trip_and_names_are_unique() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(DropReason::from_u16(*reason as u16), Some(*reason));
            for other in &DropReason::ALL[i + 1..] {
                assert_ne!(reason.name(), other.name());
                assert_ne!(*reason as u16, *other as u16);
            }
        }
        assert_eq!(DropReason::from_u16(0), None);
        assert_eq!(DropReason::BandwidthLimit.name(), "bandwidth-limit");
        assert_eq!(DropReason::BandwidthLimit as u16, 9);
        assert_eq!(DropReason::UnsupportedFamily as u16, 10);
        assert_eq!(DropReason::UnsupportedFamily.name(), "unsupported-family");
        assert_eq!(ENDPOINT_F_POLICY_MASK & ENDPOINT_F_INGRESS_LIMIT, 0);
        assert_eq!(DropReason::from_u16(u16::MAX), None);
    }
}
