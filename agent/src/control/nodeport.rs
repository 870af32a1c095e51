//! NodePort at start: which of the node's interfaces take NodePort traffic (the
//! `--nodeport-device`s, or in cluster mode the interface holding the first
//! `--node-ip`), their addresses handed to the service control plane (the NodePort
//! frontends' addresses), and the NodePort program attached to them (and detached from
//! any other an earlier agent had).

use std::net::IpAddr;

use super::{Agent, ControlError};
use crate::config::AgentConfig;
use crate::datapath::{Datapath, NodePortDevice};
use crate::host::HostNetwork;

/// Where the NodePort devices come from: the names given, or the address whose
/// interface is the device, or none (a single node without `--nodeport-device`).
#[derive(Debug, PartialEq, Eq)]
enum Source {
    Named(Vec<String>),
    NodeIp(IpAddr),
    None,
}

fn source(config: &AgentConfig) -> Source {
    if !config.nodeport_devices.is_empty() {
        return Source::Named(config.nodeport_devices.clone());
    }
    match config.cluster.as_ref().and_then(|c| c.node_ips.first()) {
        Some(ip) => Source::NodeIp(*ip),
        None => Source::None,
    }
}

impl<D: Datapath, H: HostNetwork> Agent<D, H> {
    /// Resolves the NodePort devices, hands their addresses to the services
    /// (`set_nodeport_addresses`) and attaches the NodePort program to them. A named
    /// device that does not exist fails the start, naming it; no interface holding the
    /// node-ip is a warning (NodePort is then served nowhere).
    pub(super) fn start_nodeport(&self, warnings: &mut Vec<String>) -> Result<(), ControlError> {
        let names = match source(&self.config) {
            Source::Named(names) => names,
            Source::NodeIp(ip) => match self.host.link_name_of_address(ip)? {
                Some(name) => vec![name],
                None => {
                    warnings.push(format!(
                        "no interface holds node-ip {ip}: NodePort services are not served (set --nodeport-device)"
                    ));
                    Vec::new()
                }
            },
            Source::None => Vec::new(),
        };
        let mut devices = Vec::with_capacity(names.len());
        for name in names {
            let Some((ifindex, addresses)) = self.host.link_addresses(&name)? else {
                return Err(ControlError::BadRequest(format!(
                    "NodePort device {name} (--nodeport-device) does not exist"
                )));
            };
            if addresses.is_empty() {
                warnings.push(format!(
                    "NodePort device {name} has no address: no NodePort frontend on it"
                ));
            }
            devices.push(NodePortDevice {
                name,
                ifindex,
                addresses,
            });
        }
        let addresses: Vec<IpAddr> = devices
            .iter()
            .flat_map(|d| d.addresses.iter().copied())
            .collect();
        self.set_nodeport_addresses(addresses);
        self.datapath.set_nodeport(&devices).map_err(|e| {
            let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
            ControlError::Datapath(format!(
                "cannot attach the NodePort program to {}: {e}",
                names.join(", ")
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MemStore, host_with};
    use super::*;
    use crate::datapath::fake::FakeDatapath;
    use crate::host::fake::FakeHost;
    use crate::state::PersistedState;

    fn start(
        config: AgentConfig,
        host: FakeHost,
    ) -> Result<(Agent<FakeDatapath, FakeHost>, super::super::StartReport), ControlError> {
        let saved = PersistedState::default();
        Agent::start(
            config,
            FakeDatapath::default(),
            host,
            Box::new(MemStore::with(saved.clone())),
            saved,
        )
    }

    #[test]
    fn named_devices_come_first_then_the_node_ip() {
        let mut config = AgentConfig::default();
        assert_eq!(source(&config), Source::None);
        config.nodeport_devices = vec!["eth1".into()];
        assert_eq!(source(&config), Source::Named(vec!["eth1".into()]));
    }

    #[test]
    fn a_named_device_that_does_not_exist_fails_the_start_naming_it() {
        let config = AgentConfig {
            nodeport_devices: vec!["eth0".into(), "nope0".into()],
            ..AgentConfig::default()
        };
        let host = host_with(&[("eth0", 2)]);
        let Err(e) = start(config, host) else {
            panic!("the start succeeded with a missing NodePort device");
        };
        assert_eq!(
            e.to_string(),
            "NodePort device nope0 (--nodeport-device) does not exist"
        );
    }

    #[test]
    fn named_devices_that_exist_start_with_a_warning_for_one_without_addresses() {
        let config = AgentConfig {
            nodeport_devices: vec!["eth0".into(), "eth1".into()],
            ..AgentConfig::default()
        };
        let host = host_with(&[("eth0", 2), ("eth1", 3)]);
        host.state()
            .link_addresses
            .insert("192.0.2.10".parse().unwrap(), "eth0".into());
        let (_, report) = start(config, host).expect("start");
        assert_eq!(
            report
                .warnings
                .iter()
                .filter(|w| w.contains("NodePort"))
                .collect::<Vec<_>>(),
            ["NodePort device eth1 has no address: no NodePort frontend on it"]
        );
    }
}
