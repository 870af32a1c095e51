//! STATUS: whether the plugin could serve an ADD now.
//!
//! - the agent does not answer: 50 (existing pods keep their network: the datapath is
//!   pinned and outlives the agent);
//! - the agent answers but its datapath has no programs loaded: 51, since existing pods
//!   may have lost connectivity too;
//! - no address left in one of the agent's pod CIDRs (when the agent allocates; a pod
//!   gets one address per family the node has): 50;
//! - a delegated IPAM plugin that knows STATUS fails it: its own error.

use std::ffi::OsString;

use hypha_api::{IpamStatus, NodeStatus};

use crate::config::{CniVersion, NetConf};
use crate::delegate::Ipam;
use crate::error::Error;

pub fn run(conf: &NetConf, cni_path: Option<&OsString>) -> Result<(), Error> {
    if conf.cni_version < CniVersion::V1_1_0 {
        return Err(Error::VersionTooOld {
            command: "STATUS",
            version: conf.cni_version,
            min: CniVersion::V1_1_0,
        });
    }
    let ipam = Ipam::of(conf, cni_path)?;
    let client = conf
        .client()
        .map_err(|e| Error::AgentNotAvailable(Box::new(e)))?;
    let status = client
        .status()
        .map_err(|e| Error::AgentNotAvailable(Box::new(e)))?;
    if status.datapath.programs.is_empty() {
        return Err(Error::Degraded(format!(
            "the agent at {} has no eBPF programs loaded (pin directory {})",
            conf.agent_socket.display(),
            status.datapath.pin_dir
        )));
    }
    match ipam {
        Some(ipam) => {
            ipam.status()?;
        }
        None => {
            if let Some(reason) = exhausted(&status.node, &status.ipam) {
                return Err(Error::NotReady(reason));
            }
        }
    }
    Ok(())
}

/// Why an ADD through the agent's allocator cannot get its addresses: a pod CIDR of the
/// node (of either family) with none left. `None` when every family the node has some.
fn exhausted(node: &NodeStatus, ipam: &IpamStatus) -> Option<String> {
    let mut full = Vec::new();
    if let Some(cidr) = node.pod_cidr
        && ipam.available == 0
    {
        full.push(format!(
            "pod CIDR {cidr}: all {} are allocated",
            ipam.capacity
        ));
    }
    if let Some(cidr) = node.pod_cidr6
        && ipam.available6 == 0
    {
        full.push(format!(
            "pod CIDR {cidr}: all {} are allocated",
            ipam.capacity6
        ));
    }
    (!full.is_empty()).then(|| format!("no address left in {}", full.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(v4: bool, v6: bool) -> NodeStatus {
        NodeStatus {
            pod_cidr: v4.then(|| "10.1.0.0/24".parse().unwrap()),
            gateway: v4.then(|| "10.1.0.1".parse().unwrap()),
            pod_cidr6: v6.then(|| "fd00:1::/64".parse().unwrap()),
            gateway6: v6.then(|| "fe80::1".parse().unwrap()),
            host_device: "lo".into(),
            masquerade: true,
            socket: "/s".into(),
            state_dir: "/d".into(),
        }
    }

    fn ipam(available: u32, available6: u64) -> IpamStatus {
        IpamStatus {
            capacity: 253,
            allocated: 253 - available,
            available,
            capacity6: 1 << 40,
            allocated6: (1 << 40) - available6,
            available6,
        }
    }

    /// An IPv6-only node has no IPv4 addresses to give and is still ready; a dual-stack
    /// node is not when either family is used up.
    #[test]
    fn each_family_the_node_has_needs_an_address_left() {
        assert_eq!(exhausted(&node(false, true), &ipam(0, 5)), None);
        assert_eq!(exhausted(&node(true, false), &ipam(5, 0)), None);
        assert_eq!(exhausted(&node(true, true), &ipam(5, 5)), None);
        assert_eq!(
            exhausted(&node(true, true), &ipam(0, 5)).as_deref(),
            Some("no address left in pod CIDR 10.1.0.0/24: all 253 are allocated")
        );
        assert_eq!(
            exhausted(&node(false, true), &ipam(0, 0)).as_deref(),
            Some("no address left in pod CIDR fd00:1::/64: all 1099511627776 are allocated")
        );
        let both = exhausted(&node(true, true), &ipam(0, 0)).unwrap();
        assert!(
            both.contains("10.1.0.0/24") && both.contains("fd00:1::/64"),
            "{both}"
        );
    }
}
