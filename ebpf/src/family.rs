//! Which L3 families the datapath lets through for an endpoint.
//!
//! Traffic of a family an endpoint does not have is dropped in both directions
//! ([`DropReason::UnsupportedFamily`]): a family that is not routed, anti-spoofed and
//! policy-checked here must not reach or leave the pod through the host stack instead.
//! A family's neighbour discovery belongs to it: ARP goes with IPv4, and IPv6's (ICMPv6
//! inside IPv6) with IPv6.
//!
//! The families of an endpoint are the `ENDPOINT_F_IPV4` / `ENDPOINT_F_IPV6` bits of its
//! `hypha_ifaces` entry, keyed by the host-side veth's ifindex, which the agent writes
//! from the endpoint's addresses. A veth without an entry is no endpoint's: nothing is
//! managed on it, with one exception kept from before the entries existed, in
//! [`admit_to_pod`].

use hypha_common::{DropReason, ENDPOINT_F_IPV4, ENDPOINT_F_IPV6, EndpointIface};

use crate::{
    IFACES,
    packet::{ETH_P_ARP, ETH_P_IP, ETH_P_IPV6},
};

/// An L3 family, with its neighbour discovery.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// The family a frame of `ether_type` belongs to; `None` for EtherTypes the datapath
/// does not carry at all.
#[inline(always)]
pub fn of(ether_type: u16) -> Option<Family> {
    match ether_type {
        ETH_P_IP | ETH_P_ARP => Some(Family::Ipv4),
        ETH_P_IPV6 => Some(Family::Ipv6),
        _ => None,
    }
}

/// The endpoint behind the host-side veth `ifindex`, from `hypha_ifaces`.
///
/// A reference into the map: the agent replaces an entry whole (a hash map update
/// allocates a new element and frees the old one only after every program that may hold
/// it has returned), so it stays valid and consistent for the whole program run.
#[inline(always)]
pub fn iface(ifindex: u32) -> Option<&'static EndpointIface> {
    // SAFETY: see above; the value is only read.
    unsafe { IFACES.get(ifindex) }
}

/// Whether the endpoint `iface` has `family`.
#[inline(always)]
pub fn managed(iface: &EndpointIface, family: Family) -> bool {
    let bit = match family {
        Family::Ipv4 => ENDPOINT_F_IPV4,
        Family::Ipv6 => ENDPOINT_F_IPV6,
    };
    iface.flags & bit != 0
}

/// What the pod on `ifindex` may send with `ether_type`: its family and the endpoint,
/// or the drop reason (an EtherType of no family, a family the endpoint does not have,
/// or a veth of no endpoint).
#[inline(always)]
pub fn admit_from_pod(
    ifindex: u32,
    ether_type: u16,
) -> Result<(Family, &'static EndpointIface), DropReason> {
    let family = of(ether_type).ok_or(DropReason::UnknownL3)?;
    match iface(ifindex) {
        Some(iface) if managed(iface, family) => Ok((family, iface)),
        _ => Err(DropReason::UnsupportedFamily),
    }
}

/// Whether the host stack may deliver a frame of `ether_type` to the pod on `ifindex`:
/// its family and the endpoint (if the veth has one), or the drop reason.
///
/// On a veth without a `hypha_ifaces` entry, IPv4 and ARP still pass as they did before
/// the entries existed (the IPv4 ingress policy is then found through the destination's
/// `hypha_endpoints4` entry, see `to_pod_flow`); IPv6 does not.
#[inline(always)]
pub fn admit_to_pod(
    ifindex: u32,
    ether_type: u16,
) -> Result<(Family, Option<&'static EndpointIface>), DropReason> {
    let family = of(ether_type).ok_or(DropReason::UnknownL3)?;
    match iface(ifindex) {
        Some(iface) if managed(iface, family) => Ok((family, Some(iface))),
        None if family == Family::Ipv4 => Ok((family, None)),
        _ => Err(DropReason::UnsupportedFamily),
    }
}
