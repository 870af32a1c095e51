//! STATUS: whether the plugin could serve an ADD now.
//!
//! - the agent does not answer: 50 (existing pods keep their network: the datapath is
//!   pinned and outlives the agent);
//! - the agent answers but its datapath has no programs loaded: 51, since existing pods
//!   may have lost connectivity too;
//! - no address left in the agent's pod CIDR (when the agent allocates): 50;
//! - a delegated IPAM plugin that knows STATUS fails it: its own error.

use std::ffi::OsString;

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
        None if status.ipam.available == 0 => {
            return Err(Error::NotReady(format!(
                "no address left in pod CIDR {}: all {} are allocated",
                status
                    .node
                    .pod_cidr
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
                status.ipam.capacity
            )));
        }
        None => {}
    }
    Ok(())
}
