//! CHECK: whether what ADD set up is still there, reporting every difference found.

use hypha_api::Client;

use crate::commands::add::DEFAULT_ROUTE;
use crate::commands::open_netns;
use crate::config::{CniVersion, NetConf};
use crate::env::Attachment;
use crate::error::{self, Error};
use crate::naming;
use crate::result;

pub fn run(a: &Attachment, conf: &NetConf) -> Result<(), Error> {
    if conf.cni_version < CniVersion::V0_4_0 {
        return Err(Error::VersionTooOld {
            command: "CHECK",
            version: conf.cni_version,
            min: CniVersion::V0_4_0,
        });
    }
    let prev = conf.prev_result.as_ref().ok_or(Error::MissingPrevResult)?;
    let expected =
        result::expected_from_prev_result(prev, &a.ifname).map_err(Error::InvalidPrevResult)?;
    let (_netns_file, mut pod_nl) = open_netns(&a.netns)?;
    let netns = a.netns.display();
    let mut problems = Vec::new();

    // The container's interface, its address and its default route.
    match pod_nl.link_by_name(&a.ifname)? {
        None => problems.push(format!("interface {} is missing from {netns}", a.ifname)),
        Some(link) => {
            if !link.up {
                problems.push(format!("interface {} in {netns} is down", a.ifname));
            }
            let addresses = pod_nl.addresses(link.index)?;
            let want = (expected.address.addr(), expected.address.prefix_len());
            if !addresses.contains(&want) {
                let have: Vec<String> = addresses.iter().map(|(a, p)| format!("{a}/{p}")).collect();
                problems.push(format!(
                    "interface {} in {netns} has addresses [{}], expected {}",
                    a.ifname,
                    have.join(", "),
                    expected.address
                ));
            }
            if let Some(gw) = expected.default_gateway {
                let routes = pod_nl.routes(link.index)?;
                let found = routes
                    .iter()
                    .any(|r| r.dst == DEFAULT_ROUTE && r.gateway == Some(gw));
                if !found {
                    problems.push(format!(
                        "no default route via {gw} on interface {} in {netns}",
                        a.ifname
                    ));
                }
            }
        }
    }

    // The host end.
    let host_ifname = naming::host_ifname(&a.container_id, &a.ifname);
    let mut host_nl = hypha_netlink::Netlink::new()?;
    match host_nl.link_by_name(&host_ifname)? {
        None => problems.push(format!("host interface {host_ifname} is missing")),
        Some(link) if !link.up => problems.push(format!("host interface {host_ifname} is down")),
        Some(_) => {}
    }

    // The agent's endpoint.
    let client = Client::new(&conf.agent_socket).map_err(error::agent)?;
    let endpoints = client.endpoints().map_err(error::agent)?;
    match endpoints
        .iter()
        .find(|e| e.container_id == a.container_id && e.ifname == a.ifname)
    {
        None => problems.push(format!(
            "the agent has no endpoint for container {} interface {}",
            a.container_id, a.ifname
        )),
        Some(ep) => {
            if ep.address != expected.address.addr() {
                problems.push(format!(
                    "the agent's endpoint has address {}, expected {}",
                    ep.address,
                    expected.address.addr()
                ));
            }
            if ep.host_ifname != host_ifname {
                problems.push(format!(
                    "the agent's endpoint uses host interface {}, expected {host_ifname}",
                    ep.host_ifname
                ));
            }
        }
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::CheckFailed(problems))
    }
}
