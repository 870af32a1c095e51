//! Cross-node routing: what the node's tunnel (or native routes) should hold, planned from
//! the cluster's nodes as pure functions; the agent applies the plan through the datapath
//! and host traits.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;
use sha2::{Digest as _, Sha256};

/// The id of node `name` in `hypha_node_stats` and the tunnel maps: the first four bytes
/// of the SHA-256 of its name, never 0. The same on every agent and across restarts, so
/// counters survive an agent restart and a node's id needs no coordination. (Two names of
/// one cluster sharing an id, odds about n²/2³³, are detected by the planner.)
pub fn node_id(name: &str) -> u32 {
    let digest = Sha256::digest(name.as_bytes());
    let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    id.max(1)
}

/// The node's own IPv6 address inside its IPv6 pod CIDR (the CIDR's `::1`), the source of
/// what the host sends to other nodes' pods through the tunnel, so that their replies come
/// back through it; never handed to a pod (IPv4's counterpart is the gateway).
pub fn router6(cidr: Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(cidr.network()) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_nonzero_and_differ_by_name() {
        assert_eq!(node_id("node-0"), node_id("node-0"));
        assert_ne!(node_id("node-0"), node_id("node-1"));
        assert_ne!(node_id(""), 0);
    }

    #[test]
    fn router6_is_the_first_address_after_the_network() {
        let cidr: Ipv6Net = "fd00:10:244:3::/64".parse().unwrap();
        assert_eq!(
            router6(cidr),
            "fd00:10:244:3::1".parse::<Ipv6Addr>().unwrap()
        );
    }
}
