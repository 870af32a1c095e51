//! The node's address allocators, one per family: pure and persisted by the caller.
//!
//! Addresses come from the node's pod CIDR of that family, minus what is reserved:
//! - IPv4: the network address, the broadcast address and the gateway.
//! - IPv6: the subnet-router anycast address (the prefix's `::0`, RFC 4291 2.6.1) and the
//!   reserved subnet anycast addresses (interface identifiers
//!   `fdff:ffff:ffff:ff80` to `fdff:ffff:ffff:ffff`, RFC 2526), where they fall inside the
//!   prefix. The gateway is the link-local `fe80::1`, outside every pod CIDR. In cluster
//!   tunnel mode also the node's router address (the prefix's `::1`, `overlay::router6`),
//!   passed as the allocator's gateway.
//!
//! Allocation walks forward from the last address handed out (wrapping), so a
//! just-released address is not handed out again at once (a late packet for a deleted
//! pod then does not reach its successor). Positions are `u128` offsets from the
//! network address, and what is held is a `BTreeMap`: nothing is sized by the range, so
//! a /64 costs what a /24 does. A walk looks at no more candidates than there are held
//! and reserved addresses plus one, so it ends quickly even in a /64.

use std::collections::BTreeMap;
use std::fmt::{Debug, Display};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// Who holds an address: one interface of one container.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "container {} interface {}",
            self.container_id, self.ifname
        )
    }
}

/// An address family the allocator works in: its addresses as `u128` positions.
pub trait Family: Copy + Ord + Display + Debug + Send + Sync + 'static {
    /// The family's prefix type.
    type Net: Copy + Display + Debug + PartialEq + Send + Sync + 'static;
    /// `IPv4` or `IPv6`, for messages.
    const NAME: &'static str;
    fn to_bits(self) -> u128;
    fn from_bits(bits: u128) -> Self;
    /// The network address of `net` and its prefix length.
    fn network(net: Self::Net) -> (Self, u8);
    /// Address width in bits.
    const WIDTH: u8;
    /// Addresses of `net` that are never handed out, other than the gateway: in order.
    fn reserved(net: Self::Net) -> Vec<Self>;
}

impl Family for Ipv4Addr {
    type Net = Ipv4Net;
    const NAME: &'static str = "IPv4";
    const WIDTH: u8 = 32;

    fn to_bits(self) -> u128 {
        u128::from(u32::from(self))
    }

    fn from_bits(bits: u128) -> Self {
        Ipv4Addr::from(bits as u32)
    }

    fn network(net: Ipv4Net) -> (Self, u8) {
        (net.network(), net.prefix_len())
    }

    /// The network and broadcast addresses.
    fn reserved(net: Ipv4Net) -> Vec<Self> {
        vec![net.network(), net.broadcast()]
    }
}

/// The reserved subnet anycast interface identifiers of RFC 2526 (EUI-64 format):
/// `fdff:ffff:ffff:ff80` to `fdff:ffff:ffff:ffff`.
const ANYCAST6_FIRST: u64 = 0xfdff_ffff_ffff_ff80;
const ANYCAST6_COUNT: u64 = 128;

impl Family for Ipv6Addr {
    type Net = Ipv6Net;
    const NAME: &'static str = "IPv6";
    const WIDTH: u8 = 128;

    fn to_bits(self) -> u128 {
        u128::from(self)
    }

    fn from_bits(bits: u128) -> Self {
        Ipv6Addr::from(bits)
    }

    fn network(net: Ipv6Net) -> (Self, u8) {
        (net.network(), net.prefix_len())
    }

    /// The subnet-router anycast address and the RFC 2526 anycast addresses in `net`.
    fn reserved(net: Ipv6Net) -> Vec<Self> {
        let mut out = vec![net.network()];
        let upper = u128::from(net.network()) & !u128::from(u64::MAX);
        for i in 0..ANYCAST6_COUNT {
            let a = Ipv6Addr::from(upper | u128::from(ANYCAST6_FIRST + i));
            if net.contains(&a) && a != net.network() {
                out.push(a);
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    /// Every address of the pod CIDR is held.
    #[error("no address left in pod CIDR {cidr}: all {capacity} addresses are in use")]
    Exhausted { cidr: String, capacity: u64 },
    /// A persisted reservation does not fit this allocator (the pod CIDR changed).
    #[error("address {address} held by {owner} is outside pod CIDR {cidr} or reserved")]
    OutOfRange {
        address: String,
        owner: Owner,
        cidr: String,
    },
    /// A requested address is held by someone else.
    #[error("address {address} is already in use by {owner}")]
    InUse { address: String, owner: Owner },
    /// A requested address cannot be handed out.
    #[error(
        "address {address} cannot be requested: it is not a pod address of pod CIDR {cidr} ({reserved} are reserved)"
    )]
    NotAllocatable {
        address: String,
        cidr: String,
        reserved: &'static str,
    },
    /// An address of a family the node has no pod CIDR for.
    #[error("address {address} cannot be requested: this node has no {family} pod CIDR")]
    NoFamily {
        address: String,
        family: &'static str,
    },
    /// The owner already holds another address.
    #[error("{owner} already holds {held}, not {requested}")]
    OwnerHoldsOther {
        owner: Owner,
        held: String,
        requested: String,
    },
    /// One owner holds two addresses of one family in persisted state.
    #[error("{owner} holds both {first} and {second}")]
    DuplicateOwner {
        owner: Owner,
        first: String,
        second: String,
    },
}

/// The persisted form of one family's allocator: what is held, and where the next
/// search starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(
    serialize = "A: Serialize + Ord",
    deserialize = "A: Deserialize<'de> + Ord"
))]
pub struct IpamState<A = Ipv4Addr> {
    pub last: Option<A>,
    pub allocations: BTreeMap<A, Owner>,
}

impl<A> Default for IpamState<A> {
    fn default() -> Self {
        Self {
            last: None,
            allocations: BTreeMap::new(),
        }
    }
}

/// One family's allocator over its pod CIDR.
#[derive(Clone, Debug)]
pub struct Ipam<A: Family = Ipv4Addr> {
    cidr: A::Net,
    /// The network address as bits, and the number of host bits.
    base: u128,
    host_bits: u8,
    /// What is never handed out: the family's reserved addresses and the gateway (IPv4),
    /// those inside the CIDR only.
    reserved: Vec<A>,
    state: IpamState<A>,
}

/// The IPv6 allocator.
pub type Ipam6 = Ipam<Ipv6Addr>;

impl<A: Family> Ipam<A> {
    /// An allocator over `cidr`; `gateway` (if inside it) is never handed out.
    pub fn new(cidr: A::Net, gateway: Option<A>) -> Self {
        let (network, prefix) = A::network(cidr);
        let base = network.to_bits();
        let host_bits = A::WIDTH - prefix;
        let mut reserved = A::reserved(cidr);
        if let Some(gw) = gateway
            && contains(base, host_bits, gw.to_bits())
        {
            reserved.push(gw);
        }
        reserved.sort();
        reserved.dedup();
        Self {
            cidr,
            base,
            host_bits,
            reserved,
            state: IpamState::default(),
        }
    }

    /// An allocator holding what `state` holds, after checking it fits.
    pub fn restore(
        cidr: A::Net,
        gateway: Option<A>,
        state: IpamState<A>,
    ) -> Result<Self, IpamError> {
        let mut restored = Self::new(cidr, gateway);
        for (address, owner) in state.allocations {
            if !restored.usable(address) {
                return Err(IpamError::OutOfRange {
                    address: address.to_string(),
                    owner,
                    cidr: cidr.to_string(),
                });
            }
            if let Some(first) = restored.owner_address(&owner) {
                return Err(IpamError::DuplicateOwner {
                    owner,
                    first: first.to_string(),
                    second: address.to_string(),
                });
            }
            restored.state.allocations.insert(address, owner);
        }
        restored.state.last = state.last.filter(|a| restored.contains(*a));
        Ok(restored)
    }

    pub fn cidr(&self) -> A::Net {
        self.cidr
    }

    pub fn state(&self) -> &IpamState<A> {
        &self.state
    }

    /// The number of addresses in the CIDR (2^host bits), saturated to `u128::MAX`.
    fn size(&self) -> u128 {
        1u128
            .checked_shl(u32::from(self.host_bits))
            .unwrap_or(u128::MAX)
    }

    /// Addresses pods can hold in all (saturating at `u64::MAX`).
    pub fn capacity(&self) -> u64 {
        let usable = self.size().saturating_sub(self.reserved.len() as u128);
        u64::try_from(usable).unwrap_or(u64::MAX)
    }

    pub fn allocated(&self) -> u64 {
        self.state.allocations.len() as u64
    }

    /// Addresses left (capacity minus allocated).
    pub fn available(&self) -> u64 {
        self.capacity().saturating_sub(self.allocated())
    }

    /// The address `owner` holds, if any.
    pub fn owner_address(&self, owner: &Owner) -> Option<A> {
        self.state
            .allocations
            .iter()
            .find(|(_, o)| *o == owner)
            .map(|(a, _)| *a)
    }

    /// Gives `owner` an address; asking twice gives the same one.
    pub fn allocate(&mut self, owner: &Owner) -> Result<A, IpamError> {
        if let Some(address) = self.owner_address(owner) {
            return Ok(address);
        }
        let size = self.size();
        let mask = size.wrapping_sub(1);
        let start = self
            .state
            .last
            .map(|a| (a.to_bits() - self.base).wrapping_add(1) & mask)
            .unwrap_or(0);
        // Among this many consecutive positions at least one is free, unless the range
        // is smaller: the walk never visits more.
        let bound = (self.state.allocations.len() as u128)
            .saturating_add(self.reserved.len() as u128)
            .saturating_add(1)
            .min(size);
        let mut step = 0u128;
        while step < bound {
            let offset = start.wrapping_add(step) & mask;
            let candidate = A::from_bits(self.base + offset);
            if self.usable(candidate) && !self.state.allocations.contains_key(&candidate) {
                self.state.allocations.insert(candidate, owner.clone());
                self.state.last = Some(candidate);
                return Ok(candidate);
            }
            step += 1;
        }
        Err(IpamError::Exhausted {
            cidr: self.cidr.to_string(),
            capacity: self.capacity(),
        })
    }

    /// Gives `owner` exactly `address` (the CNI `ips` capability); asking twice is fine.
    pub fn allocate_specific(&mut self, owner: &Owner, address: A) -> Result<A, IpamError> {
        if let Some(held) = self.owner_address(owner) {
            return if held == address {
                Ok(held)
            } else {
                Err(IpamError::OwnerHoldsOther {
                    owner: owner.clone(),
                    held: held.to_string(),
                    requested: address.to_string(),
                })
            };
        }
        if !self.usable(address) {
            return Err(IpamError::NotAllocatable {
                address: address.to_string(),
                cidr: self.cidr.to_string(),
                reserved: if A::WIDTH == 32 {
                    "the network, broadcast and gateway addresses"
                } else {
                    "the subnet-router and RFC 2526 anycast addresses, and the node's router address in cluster tunnel mode"
                },
            });
        }
        if let Some(other) = self.state.allocations.get(&address) {
            return Err(IpamError::InUse {
                address: address.to_string(),
                owner: other.clone(),
            });
        }
        self.state.allocations.insert(address, owner.clone());
        Ok(address)
    }

    /// Who holds `address`, if anyone.
    pub fn holder(&self, address: A) -> Option<&Owner> {
        self.state.allocations.get(&address)
    }

    /// Every reservation.
    pub fn owners(&self) -> impl Iterator<Item = &Owner> {
        self.state.allocations.values()
    }

    /// Gives back what `owner` holds; releasing nothing is not an error.
    pub fn release(&mut self, owner: &Owner) -> Option<A> {
        let address = self.owner_address(owner)?;
        self.state.allocations.remove(&address);
        Some(address)
    }

    fn contains(&self, a: A) -> bool {
        contains(self.base, self.host_bits, a.to_bits())
    }

    fn usable(&self, a: A) -> bool {
        self.contains(a) && self.reserved.binary_search(&a).is_err()
    }
}

fn contains(base: u128, host_bits: u8, a: u128) -> bool {
    match 1u128.checked_shl(u32::from(host_bits)) {
        Some(size) => a >= base && a - base < size,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn owner(i: usize) -> Owner {
        Owner {
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        }
    }

    fn ipam(cidr: &str) -> Ipam {
        let cidr: Ipv4Net = cidr.parse().unwrap();
        Ipam::new(cidr, cidr.hosts().next())
    }

    #[test]
    fn skips_network_gateway_and_broadcast() {
        let mut ipam = ipam("10.1.0.0/29"); // .0 network, .1 gateway, .7 broadcast
        assert_eq!(ipam.capacity(), 5);
        let got: Vec<_> = (0..5).map(|i| ipam.allocate(&owner(i)).unwrap()).collect();
        let want: Vec<Ipv4Addr> = (2..=6).map(|h| Ipv4Addr::new(10, 1, 0, h)).collect();
        assert_eq!(got, want);
        assert_eq!(
            ipam.allocate(&owner(9)),
            Err(IpamError::Exhausted {
                cidr: "10.1.0.0/29".into(),
                capacity: 5
            })
        );
    }

    #[test]
    fn same_owner_same_address() {
        let mut ipam = ipam("10.1.0.0/24");
        let a = ipam.allocate(&owner(1)).unwrap();
        assert_eq!(ipam.allocate(&owner(1)).unwrap(), a);
        assert_eq!(ipam.allocated(), 1);
    }

    #[test]
    fn released_addresses_are_reused_last() {
        let mut ipam = ipam("10.1.0.0/29");
        let a = ipam.allocate(&owner(1)).unwrap();
        assert_eq!(ipam.release(&owner(1)), Some(a));
        assert_eq!(ipam.release(&owner(1)), None);
        let b = ipam.allocate(&owner(2)).unwrap();
        assert_ne!(a, b, "a just-released address must not come straight back");
        // Wrapping around finds it again once the rest is used.
        for i in 3..7 {
            ipam.allocate(&owner(i)).unwrap();
        }
        assert_eq!(ipam.allocated(), 5);
        assert!(ipam.state().allocations.contains_key(&a));
    }

    #[test]
    fn restore_keeps_reservations_and_rejects_bad_state() {
        let mut ipam1 = ipam("10.1.0.0/24");
        let addrs: HashSet<_> = (0..20)
            .map(|i| ipam1.allocate(&owner(i)).unwrap())
            .collect();
        let cidr = "10.1.0.0/24".parse().unwrap();
        let mut ipam2 = Ipam::restore(
            cidr,
            Some(Ipv4Addr::new(10, 1, 0, 1)),
            ipam1.state().clone(),
        )
        .unwrap();
        let fresh = ipam2.allocate(&owner(100)).unwrap();
        assert!(
            !addrs.contains(&fresh),
            "restart must never hand out a held address"
        );

        let mut state = IpamState::default();
        state
            .allocations
            .insert(Ipv4Addr::new(10, 2, 0, 5), owner(1));
        let err = Ipam::restore(cidr, Some(Ipv4Addr::new(10, 1, 0, 1)), state).unwrap_err();
        assert!(err.to_string().contains("10.2.0.5"), "{err}");

        let mut state = IpamState::default();
        state
            .allocations
            .insert(Ipv4Addr::new(10, 1, 0, 5), owner(1));
        state
            .allocations
            .insert(Ipv4Addr::new(10, 1, 0, 6), owner(1));
        assert!(matches!(
            Ipam::restore(cidr, Some(Ipv4Addr::new(10, 1, 0, 1)), state),
            Err(IpamError::DuplicateOwner { .. })
        ));
    }

    #[test]
    fn specific_addresses() {
        let mut ipam = ipam("10.1.0.0/24");
        let want = Ipv4Addr::new(10, 1, 0, 77);
        assert_eq!(ipam.allocate_specific(&owner(1), want), Ok(want));
        assert_eq!(ipam.allocate_specific(&owner(1), want), Ok(want));
        assert!(matches!(
            ipam.allocate_specific(&owner(2), want),
            Err(IpamError::InUse { .. })
        ));
        assert!(matches!(
            ipam.allocate_specific(&owner(1), Ipv4Addr::new(10, 1, 0, 78)),
            Err(IpamError::OwnerHoldsOther { .. })
        ));
        for reserved in [[10, 1, 0, 0], [10, 1, 0, 1], [10, 1, 0, 255], [10, 2, 0, 5]] {
            let err = ipam
                .allocate_specific(&owner(3), Ipv4Addr::from(reserved))
                .unwrap_err();
            assert!(matches!(err, IpamError::NotAllocatable { .. }), "{err}");
        }
        // The walk skips it.
        for i in 10..20 {
            assert_ne!(ipam.allocate(&owner(i)).unwrap(), want);
        }
    }

    #[test]
    fn every_address_of_a_slash_24_is_handed_out_once() {
        let mut ipam = ipam("10.1.0.0/24");
        let mut seen = HashSet::new();
        for i in 0..253 {
            assert!(seen.insert(ipam.allocate(&owner(i)).unwrap()));
        }
        assert!(ipam.allocate(&owner(999)).is_err());
    }

    fn ipam6(cidr: &str) -> Ipam6 {
        Ipam6::new(cidr.parse().unwrap(), None)
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn a_slash_64_allocates_from_the_start_skipping_the_subnet_router_anycast() {
        let mut ipam = ipam6("fd00:10:244::/64");
        assert_eq!(
            ipam.capacity(),
            u64::MAX - 128,
            "2^64 - ::0 - 128 RFC 2526 anycast"
        );
        assert_eq!(ipam.allocate(&owner(0)).unwrap(), v6("fd00:10:244::1"));
        assert_eq!(ipam.allocate(&owner(1)).unwrap(), v6("fd00:10:244::2"));
        assert_eq!(ipam.allocate(&owner(0)).unwrap(), v6("fd00:10:244::1"));
        assert_eq!(ipam.allocated(), 2);
        assert_eq!(ipam.available(), u64::MAX - 130);
        for reserved in [
            "fd00:10:244::",
            "fd00:10:244:0:fdff:ffff:ffff:ff80",
            "fd00:10:244:0:fdff:ffff:ffff:ffff",
        ] {
            let err = ipam.allocate_specific(&owner(5), v6(reserved)).unwrap_err();
            assert!(
                matches!(err, IpamError::NotAllocatable { .. }),
                "{reserved}: {err}"
            );
            assert!(err.to_string().contains(reserved), "{err}");
        }
        // Just below the anycast block is an ordinary address.
        let below = v6("fd00:10:244:0:fdff:ffff:ffff:ff7f");
        assert_eq!(ipam.allocate_specific(&owner(6), below), Ok(below));
    }

    #[test]
    fn a_slash_64_walk_wraps_past_the_top_and_skips_what_is_reserved() {
        let mut ipam = ipam6("fd00:1::/64");
        let top = v6("fd00:1::ffff:ffff:ffff:fffe");
        // The cursor just before the top: the walk goes to the last address, then wraps
        // to ::1 (::0 is the subnet-router anycast).
        let mut state = IpamState {
            last: Some(top),
            ..Default::default()
        };
        state.allocations.insert(top, owner(0));
        let mut ipam2 = Ipam6::restore(ipam.cidr(), None, state).unwrap();
        assert_eq!(
            ipam2.allocate(&owner(1)).unwrap(),
            v6("fd00:1::ffff:ffff:ffff:ffff")
        );
        assert_eq!(ipam2.allocate(&owner(2)).unwrap(), v6("fd00:1::1"));
        // A cursor before the anycast block jumps over it.
        let state = IpamState {
            last: Some(v6("fd00:1::fdff:ffff:ffff:ff7f")),
            ..Default::default()
        };
        let mut ipam3 = Ipam6::restore(ipam.cidr(), None, state).unwrap();
        assert_eq!(ipam3.allocate(&owner(1)).unwrap(), v6("fd00:1::fe00:0:0:0"));
        // A just-released address does not come straight back.
        let a = ipam.allocate(&owner(7)).unwrap();
        ipam.release(&owner(7));
        assert_ne!(ipam.allocate(&owner(8)).unwrap(), a);
    }

    #[test]
    fn a_slash_120_runs_out() {
        let mut ipam = ipam6("fd00:1::/120");
        assert_eq!(ipam.capacity(), 255);
        let mut seen = HashSet::new();
        for i in 0..255 {
            assert!(seen.insert(ipam.allocate(&owner(i)).unwrap()));
        }
        assert!(!seen.contains(&v6("fd00:1::")));
        let err = ipam.allocate(&owner(999)).unwrap_err();
        assert_eq!(
            err,
            IpamError::Exhausted {
                cidr: "fd00:1::/120".into(),
                capacity: 255
            }
        );
        assert!(err.to_string().contains("fd00:1::/120"), "{err}");
        // One released is the one found, wherever the cursor is.
        let freed = ipam.release(&owner(100)).unwrap();
        assert_eq!(ipam.allocate(&owner(1000)).unwrap(), freed);
    }

    #[test]
    fn a_slash_120_at_the_top_of_a_slash_64_holds_the_anycast_block() {
        let ipam = ipam6("fd00:1::fdff:ffff:ffff:ff00/120");
        assert_eq!(ipam.capacity(), 256 - 1 - 128);
    }

    #[test]
    fn restore6_keeps_reservations_and_refuses_out_of_range_ones() {
        let mut ipam = ipam6("fd00:1::/64");
        let held: HashSet<_> = (0..10).map(|i| ipam.allocate(&owner(i)).unwrap()).collect();
        let mut again = Ipam6::restore(ipam.cidr(), None, ipam.state().clone()).unwrap();
        assert_eq!(again.allocated(), 10);
        assert!(!held.contains(&again.allocate(&owner(50)).unwrap()));
        for bad in ["fd00:2::5", "fd00:1::"] {
            let mut state = IpamState::default();
            state.allocations.insert(v6(bad), owner(1));
            let err = Ipam6::restore(ipam.cidr(), None, state).unwrap_err();
            assert!(matches!(err, IpamError::OutOfRange { .. }), "{err}");
            assert!(err.to_string().contains(bad), "{err}");
        }
        // A cursor outside the CIDR is forgotten, not followed.
        let state = IpamState {
            last: Some(v6("fd00:9::9")),
            ..Default::default()
        };
        let mut fresh = Ipam6::restore(ipam.cidr(), None, state).unwrap();
        assert_eq!(fresh.allocate(&owner(1)).unwrap(), v6("fd00:1::1"));
    }

    #[test]
    fn specific6_addresses() {
        let mut ipam = ipam6("fd00:1::/64");
        let want = v6("fd00:1::abcd");
        assert_eq!(ipam.allocate_specific(&owner(1), want), Ok(want));
        assert!(matches!(
            ipam.allocate_specific(&owner(2), want),
            Err(IpamError::InUse { .. })
        ));
        assert!(matches!(
            ipam.allocate_specific(&owner(1), v6("fd00:1::abce")),
            Err(IpamError::OwnerHoldsOther { .. })
        ));
        let err = ipam
            .allocate_specific(&owner(3), v6("fd00:2::1"))
            .unwrap_err();
        assert!(err.to_string().contains("fd00:2::1"), "{err}");
        assert_eq!(ipam.release(&owner(1)), Some(want));
    }

    #[test]
    fn state6_round_trips_through_json() {
        let mut ipam = ipam6("fd00:1::/64");
        ipam.allocate(&owner(1)).unwrap();
        let json = serde_json::to_string(ipam.state()).unwrap();
        let back: IpamState<Ipv6Addr> = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, ipam.state());
    }
}
