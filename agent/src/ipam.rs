//! The node's address allocator: pure and persisted by the caller.
//!
//! Addresses come from the node's pod CIDR, minus its network address, its broadcast
//! address and the gateway. Allocation walks forward from the last address handed out,
//! so a just-released address is not handed out again at once (a late packet for a
//! deleted pod then does not reach its successor).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    /// Every address of the pod CIDR is held.
    #[error("no address left in pod CIDR {cidr}: all {capacity} addresses are in use")]
    Exhausted { cidr: Ipv4Net, capacity: u32 },
    /// A persisted reservation does not fit this allocator (the pod CIDR changed).
    #[error("address {address} held by {owner} is outside pod CIDR {cidr} or reserved")]
    OutOfRange {
        address: Ipv4Addr,
        owner: Owner,
        cidr: Ipv4Net,
    },
    /// A requested address is held by someone else.
    #[error("address {address} is already in use by {owner}")]
    InUse { address: Ipv4Addr, owner: Owner },
    /// A requested address cannot be handed out.
    #[error(
        "address {address} cannot be requested: it is not a pod address of pod CIDR {cidr} (the network, broadcast and gateway addresses are reserved)"
    )]
    NotAllocatable { address: Ipv4Addr, cidr: Ipv4Net },
    /// The owner already holds another address.
    #[error("{owner} already holds {held}, not {requested}")]
    OwnerHoldsOther {
        owner: Owner,
        held: Ipv4Addr,
        requested: Ipv4Addr,
    },
    /// One owner holds two addresses in persisted state.
    #[error("{owner} holds both {first} and {second}")]
    DuplicateOwner {
        owner: Owner,
        first: Ipv4Addr,
        second: Ipv4Addr,
    },
}

/// The persisted form: what is held, and where the next search starts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamState {
    pub last: Option<Ipv4Addr>,
    pub allocations: BTreeMap<Ipv4Addr, Owner>,
}

#[derive(Clone, Debug)]
pub struct Ipam {
    cidr: Ipv4Net,
    gateway: Ipv4Addr,
    state: IpamState,
}

impl Ipam {
    pub fn new(cidr: Ipv4Net, gateway: Ipv4Addr) -> Self {
        Self {
            cidr,
            gateway,
            state: IpamState::default(),
        }
    }

    /// An allocator holding what `state` holds, after checking it fits.
    pub fn restore(cidr: Ipv4Net, gateway: Ipv4Addr, state: IpamState) -> Result<Self, IpamError> {
        let mut restored = Self::new(cidr, gateway);
        for (address, owner) in state.allocations {
            if !restored.usable(address) {
                return Err(IpamError::OutOfRange {
                    address,
                    owner,
                    cidr,
                });
            }
            if let Some(first) = restored.owner_address(&owner) {
                return Err(IpamError::DuplicateOwner {
                    owner,
                    first,
                    second: address,
                });
            }
            restored.state.allocations.insert(address, owner);
        }
        restored.state.last = state.last.filter(|a| cidr.contains(a));
        Ok(restored)
    }

    pub fn state(&self) -> &IpamState {
        &self.state
    }

    /// Addresses pods can hold in all.
    pub fn capacity(&self) -> u32 {
        let hosts = self.cidr.hosts().count() as u32;
        hosts - u32::from(self.usable_range_contains_gateway())
    }

    pub fn allocated(&self) -> u32 {
        self.state.allocations.len() as u32
    }

    /// The address `owner` holds, if any.
    pub fn owner_address(&self, owner: &Owner) -> Option<Ipv4Addr> {
        self.state
            .allocations
            .iter()
            .find(|(_, o)| *o == owner)
            .map(|(a, _)| *a)
    }

    /// Gives `owner` an address; asking twice gives the same one.
    pub fn allocate(&mut self, owner: &Owner) -> Result<Ipv4Addr, IpamError> {
        if let Some(address) = self.owner_address(owner) {
            return Ok(address);
        }
        let first = u32::from(self.cidr.network());
        let size = 1u64 << (32 - self.cidr.prefix_len());
        let start = self
            .state
            .last
            .map(|a| u64::from(u32::from(a) - first) + 1)
            .unwrap_or(0);
        for step in 0..size {
            let offset = ((start + step) % size) as u32;
            let candidate = Ipv4Addr::from(first + offset);
            if self.usable(candidate) && !self.state.allocations.contains_key(&candidate) {
                self.state.allocations.insert(candidate, owner.clone());
                self.state.last = Some(candidate);
                return Ok(candidate);
            }
        }
        Err(IpamError::Exhausted {
            cidr: self.cidr,
            capacity: self.capacity(),
        })
    }

    /// Gives `owner` exactly `address` (the CNI `ips` capability); asking twice is fine.
    pub fn allocate_specific(
        &mut self,
        owner: &Owner,
        address: Ipv4Addr,
    ) -> Result<Ipv4Addr, IpamError> {
        if let Some(held) = self.owner_address(owner) {
            return if held == address {
                Ok(held)
            } else {
                Err(IpamError::OwnerHoldsOther {
                    owner: owner.clone(),
                    held,
                    requested: address,
                })
            };
        }
        if !self.usable(address) {
            return Err(IpamError::NotAllocatable {
                address,
                cidr: self.cidr,
            });
        }
        if let Some(other) = self.state.allocations.get(&address) {
            return Err(IpamError::InUse {
                address,
                owner: other.clone(),
            });
        }
        self.state.allocations.insert(address, owner.clone());
        Ok(address)
    }

    /// Who holds `address`, if anyone.
    pub fn holder(&self, address: Ipv4Addr) -> Option<&Owner> {
        self.state.allocations.get(&address)
    }

    /// Every reservation.
    pub fn owners(&self) -> impl Iterator<Item = &Owner> {
        self.state.allocations.values()
    }

    /// Gives back what `owner` holds; releasing nothing is not an error.
    pub fn release(&mut self, owner: &Owner) -> Option<Ipv4Addr> {
        let address = self.owner_address(owner)?;
        self.state.allocations.remove(&address);
        Some(address)
    }

    fn usable(&self, a: Ipv4Addr) -> bool {
        self.cidr.contains(&a)
            && a != self.cidr.network()
            && a != self.cidr.broadcast()
            && a != self.gateway
    }

    fn usable_range_contains_gateway(&self) -> bool {
        self.cidr.contains(&self.gateway)
            && self.gateway != self.cidr.network()
            && self.gateway != self.cidr.broadcast()
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
        Ipam::new(cidr, cidr.hosts().next().unwrap())
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
                cidr: "10.1.0.0/29".parse().unwrap(),
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
        let mut ipam2 =
            Ipam::restore(cidr, Ipv4Addr::new(10, 1, 0, 1), ipam1.state().clone()).unwrap();
        let fresh = ipam2.allocate(&owner(100)).unwrap();
        assert!(
            !addrs.contains(&fresh),
            "restart must never hand out a held address"
        );

        let mut state = IpamState::default();
        state
            .allocations
            .insert(Ipv4Addr::new(10, 2, 0, 5), owner(1));
        let err = Ipam::restore(cidr, Ipv4Addr::new(10, 1, 0, 1), state).unwrap_err();
        assert!(err.to_string().contains("10.2.0.5"), "{err}");

        let mut state = IpamState::default();
        state
            .allocations
            .insert(Ipv4Addr::new(10, 1, 0, 5), owner(1));
        state
            .allocations
            .insert(Ipv4Addr::new(10, 1, 0, 6), owner(1));
        assert!(matches!(
            Ipam::restore(cidr, Ipv4Addr::new(10, 1, 0, 1), state),
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
}
