//! Which L3 families the datapath lets through for an endpoint.
//!
//! Traffic of a family Hypha does not manage for an endpoint is dropped in both
//! directions ([`DropReason::UnsupportedFamily`]): a family that is not routed,
//! anti-spoofed and policy-checked here must not reach or leave the pod through the host
//! stack instead. A family's neighbour discovery belongs to it: ARP passes with IPv4,
//! and IPv6's (ICMPv6 inside IPv6) goes with IPv6.

use hypha_common::DropReason;

use crate::packet::{ETH_P_ARP, ETH_P_IP, ETH_P_IPV6};

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

/// Whether Hypha manages `family` for the endpoint behind the host-side veth `ifindex`.
///
/// Every endpoint has an IPv4 address, so IPv4 is managed for all of them. No endpoint
/// has an IPv6 address yet: the IPv6 work makes this answer from the endpoint's own
/// record (a family flag in its `EndpointInfo`), so that an IPv4-only pod keeps this
/// rule when other pods get IPv6.
#[inline(always)]
pub fn managed(_ifindex: u32, family: Family) -> bool {
    match family {
        Family::Ipv4 => true,
        Family::Ipv6 => false,
    }
}

/// The family of a frame of `ether_type` on `ifindex`, if the datapath may carry it
/// there; the drop reason otherwise.
#[inline(always)]
pub fn admit(ifindex: u32, ether_type: u16) -> Result<Family, DropReason> {
    let family = of(ether_type).ok_or(DropReason::UnknownL3)?;
    if managed(ifindex, family) {
        Ok(family)
    } else {
        Err(DropReason::UnsupportedFamily)
    }
}
