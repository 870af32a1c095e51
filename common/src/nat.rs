//! NodePort translation state: the layouts of the `hypha_lb4_nat` / `hypha_lb6_nat`
//! maps.
//!
//! A flow from outside the node to a NodePort frontend (`crate::lb`,
//! `LB_SCOPE_EXTERNAL`) is translated by `hypha_from_netdev` (`ebpf/src/nodeport.rs`,
//! TCX ingress of the node's external devices), which writes two entries per flow, one
//! per direction, both in the family's map:
//!
//! - **forward** ([`NAT_DIR_FORWARD`]), keyed by the packet as the client sends it
//!   (client address/port → node address/NodePort): the backend (address, port, id) and,
//!   for `externalTrafficPolicy: Cluster` to a backend on another node, the source the
//!   packet is given (this node's SNAT address of the family, see [`SNAT6`], and a port
//!   chosen for the flow). A packet whose forward entry exists takes that translation whatever the
//!   frontend's backends are now: a flow keeps its backend for its lifetime.
//! - **reverse** ([`NAT_DIR_REVERSE`]), keyed by the reply as the backend sends it
//!   (backend address/port → client-or-SNAT address/port): the node address and the
//!   NodePort the reply must come from, and the client it goes back to. Read by
//!   `hypha_from_pod` (replies of a backend on this node, after its egress policy) and
//!   `hypha_from_tunnel` (replies of a backend on another node, sent to the SNAT
//!   address), which rewrite the reply and send it out of the device the route to the
//!   client takes.
//!
//! Both maps are LRU: a flow's entries live until evicted by newer flows (there is no
//! per-flow timer), so the capacity is what bounds the state. The agent does not read
//! them (`hypha service list` counts per backend in `hypha_lb_backend_stats`).
//!
//! Addresses and ports are in network byte order, as in the packet.

/// The NodePort program (TCX ingress of the node's external devices). Readers: the
/// eBPF object, `agent/src/datapath/nodeport.rs`, the tests.
pub const FROM_NETDEV: &str = "hypha_from_netdev";

/// Name of the IPv4 NAT map ([`NatKey4`] → [`NatValue4`]). Readers: `ebpf/src/nodeport.rs`
/// (declaration), the tests (`tests/tests/ebpf_nodeport.rs`).
pub const NAT4: &str = "hypha_lb4_nat";
/// Name of the IPv6 NAT map ([`NatKey6`] → [`NatValue6`]). Readers: as [`NAT4`].
pub const NAT6: &str = "hypha_lb6_nat";

/// Name of the array holding this node's IPv6 SNAT address: index 0 → the 16 bytes of
/// the address (all zero: none). The IPv4 one is the pods' gateway (`NodeConfig`); IPv6
/// has no such address in `NodeConfig` (the pods' gateway is the link-local `fe80::1`),
/// so the agent writes the node's router address (the IPv6 pod CIDR's `::1`, on the host
/// device in tunnel mode) here when it sets up the tunnel, and zero without one: IPv6
/// NodePort flows to a backend on another node are then refused. A map of its own
/// rather than a field of the pinned `hypha_config`, whose layout stays as it is.
///
/// Readers: `ebpf/src/nodeport.rs` (declaration; `hypha_from_netdev` SNATs remote-backend
/// flows to it and takes replies addressed to it), `agent/src/datapath/tunnel_maps.rs`
/// (writes it with the tunnel config), the tests.
pub const SNAT6: &str = "hypha_lb6_snat";

/// Capacity of each NAT map: two entries per translated flow.
pub const MAX_NAT_ENTRIES: u32 = 262_144;

/// [`NatKey4::dir`]: the key is the client's packet to the frontend.
pub const NAT_DIR_FORWARD: u8 = 0;
/// [`NatKey4::dir`]: the key is the backend's reply.
pub const NAT_DIR_REVERSE: u8 = 1;

/// The source ports given to flows SNATed to a backend on another node are taken from
/// `NAT_PORT_FIRST..=NAT_PORT_LAST`: above Linux's default ephemeral range
/// (32768-60999), so that they do not collide with the host's own connections from its
/// SNAT addresses. A port is unique per (backend address, backend port, protocol),
/// which the reverse key holds.
pub const NAT_PORT_FIRST: u16 = 61_000;
/// Last SNAT port (see [`NAT_PORT_FIRST`]).
pub const NAT_PORT_LAST: u16 = 65_535;

/// Key of `hypha_lb4_nat`: a packet's addresses, ports and protocol, and which
/// direction of a translated flow it is.
///
/// Readers: `ebpf` (`nodeport.rs` writes both directions and reads the forward entry in
/// `hypha_from_netdev`, the reverse one in `hypha_from_pod` / `hypha_from_tunnel`), the
/// tests.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatKey4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// IPPROTO_TCP (6) or IPPROTO_UDP (17).
    pub proto: u8,
    /// `NAT_DIR_*`.
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// Value of `hypha_lb4_nat`. Readers: as [`NatKey4`].
///
/// Forward entry: the packet's destination becomes `addr:port` (the backend) and, when
/// `nat_addr` is not 0, its source `nat_addr:nat_port` (SNAT).
/// Reverse entry: the reply's source becomes `addr:port` (the node address and the
/// NodePort) and its destination `nat_addr:nat_port` (the client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatValue4 {
    pub addr: u32,
    pub nat_addr: u32,
    pub port: u16,
    pub nat_port: u16,
    /// The backend (`hypha_lb4_backends`), for its counters.
    pub backend_id: u32,
}

/// Key of `hypha_lb6_nat`. Readers: as [`NatKey4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatKey6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `NAT_DIR_*`.
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// Value of `hypha_lb6_nat`, as [`NatValue4`]. Readers: as [`NatKey4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatValue6 {
    pub addr: [u8; 16],
    pub nat_addr: [u8; 16],
    pub port: u16,
    pub nat_port: u16,
    pub backend_id: u32,
}

#[cfg(feature = "user")]
mod user_pod {
    // SAFETY: every type is `repr(C)`, `Copy`, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::NatKey4 {}
    unsafe impl aya::Pod for super::NatValue4 {}
    unsafe impl aya::Pod for super::NatKey6 {}
    unsafe impl aya::Pod for super::NatValue6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<NatKey4>(), 16);
        assert_eq!(core::mem::size_of::<NatValue4>(), 16);
        assert_eq!(core::mem::size_of::<NatKey6>(), 40);
        assert_eq!(core::mem::size_of::<NatValue6>(), 40);
    }
}
