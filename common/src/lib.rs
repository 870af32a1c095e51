//! Layouts shared by Hypha's eBPF programs (`ebpf/`) and userspace (`agent/`).
//!
//! Everything here is `#[repr(C)]` with explicit padding, so that the eBPF side and
//! userspace agree byte for byte. The maps themselves are a stable interface: their
//! names are `hypha_<what>` and are pinned under the agent's pin directory. A change of
//! layout gets a new map name (a version suffix), never a silent reinterpretation.
//!
//! Every type names its readers. When you change one, change all of them.
#![no_std]

/// Maximum number of endpoints (pods) on one node. Sizes `hypha_endpoints4` and
/// `hypha_ep_stats`.
pub const MAX_ENDPOINTS: u32 = 16_384;

/// Maximum number of (endpoint, reason, direction) drop counters.
pub const MAX_DROP_COUNTERS: u32 = 65_536;

/// Names of the pinned maps. Readers: `ebpf/src/main.rs` (declarations), `agent/src/datapath`.
pub mod maps {
    /// [`crate::EndpointKey4`] → [`crate::EndpointInfo`].
    pub const ENDPOINTS4: &str = "hypha_endpoints4";
    /// Host-side ifindex (`u32`) → [`crate::EndpointStats`], per CPU.
    pub const EP_STATS: &str = "hypha_ep_stats";
    /// [`crate::DropKey`] → [`crate::Counter`], per CPU.
    pub const DROPS: &str = "hypha_drops";
    /// Index 0 → [`crate::NodeConfig`].
    pub const CONFIG: &str = "hypha_config";
}

/// Names of the eBPF programs in the object. Readers: `ebpf/src/main.rs`, `agent/src/datapath`.
pub mod programs {
    /// TCX ingress of the host-side veth: packets the pod sends.
    pub const FROM_POD: &str = "hypha_from_pod";
    /// TCX egress of the host-side veth: packets the host stack delivers to the pod.
    pub const TO_POD: &str = "hypha_to_pod";
}

/// Key of `hypha_endpoints4`: a pod's IPv4 address.
///
/// Readers: `ebpf` (`hypha_from_pod` looks up the destination to redirect, and the
/// ARP sender to answer; `hypha_to_pod` nothing), `agent` (writes on endpoint create,
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

/// Value of `hypha_endpoints4`: where a pod lives and how to address frames to it.
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

/// Per-CPU counters of one endpoint, keyed by its host-side ifindex in `hypha_ep_stats`.
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
pub struct EndpointStats {
    pub egress: DirectionStats,
    pub ingress: DirectionStats,
}

/// Counters of one direction of one endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Handed to (or received from) the host's stack: pod ↔ host and pod ↔ world.
    pub passed: Counter,
    /// Moved by the eBPF datapath straight between two pods (`bpf_redirect_peer`).
    pub redirected: Counter,
    /// Dropped by the datapath; the reasons are in `hypha_drops`.
    pub dropped: Counter,
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

/// `DropKey::direction` of what the pod sends.
pub const DIR_EGRESS: u8 = 0;
/// `DropKey::direction` of what the pod receives.
pub const DIR_INGRESS: u8 = 1;

/// Value at index 0 of the `hypha_config` array: node-wide settings of the datapath.
///
/// Readers: `ebpf` (`hypha_from_pod` answers ARP for `gateway`), `agent` (writes at start).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// The pods' gateway address, network byte order.
    pub gateway: u32,
    /// `NODE_F_*` bits.
    pub flags: u32,
}

/// Why the datapath dropped a packet.
///
/// The numbering is an interface: it is stored in `hypha_drops` and printed by the
/// agent, the CLI and (later) the monitor. Never renumber; add at the end.
/// Readers: `ebpf` (every drop), `agent` (`DropReason::name` in reports).
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The IPv4 header is cut short: the frame ends before 20 bytes of IPv4 header, or
    /// before the length its IHL field claims.
    InvalidIpv4Header = 1,
    /// The IPv4 header is malformed: version not 4 or IHL below 5.
    MalformedIpv4 = 2,
    /// An EtherType the datapath does not carry (neither IPv4, IPv6 nor ARP).
    UnknownL3 = 3,
    /// An ARP frame shorter than an Ethernet/IPv4 ARP packet.
    InvalidArp = 4,
    /// A helper call failed (a redirect or checksum rewrite), so the packet could not be
    /// forwarded.
    HelperFailed = 5,
}

impl DropReason {
    /// Every reason, in numbering order.
    pub const ALL: [DropReason; 5] = [
        DropReason::InvalidIpv4Header,
        DropReason::MalformedIpv4,
        DropReason::UnknownL3,
        DropReason::InvalidArp,
        DropReason::HelperFailed,
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
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and byte arrays,
    // with explicit padding, so every bit pattern is valid and there are no holes.
    unsafe impl aya::Pod for super::EndpointKey4 {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::EndpointStats {}
    unsafe impl aya::Pod for super::DirectionStats {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::DropKey {}
    unsafe impl aya::Pod for super::NodeConfig {}
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
        assert_eq!(size_of::<DirectionStats>(), 3 * 16);
        assert_eq!(size_of::<EndpointStats>(), 2 * 3 * 16);
        assert_eq!(size_of::<DropKey>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<NodeConfig>(), 8);
        assert_eq!(align_of::<EndpointInfo>(), 4);
    }

    #[test]
    fn endpoint_key_is_in_packet_byte_order() {
        let key = EndpointKey4::from_octets([10, 244, 0, 7]);
        assert_eq!(key.addr.to_ne_bytes(), [10, 244, 0, 7]);
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
        assert_eq!(DropReason::from_u16(u16::MAX), None);
    }
}
