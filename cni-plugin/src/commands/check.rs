//! CHECK: whether what ADD set up still matches `prevResult`, reporting every difference
//! found: the container's interface (present, up, its MAC), its addresses and routes, the
//! host end, and the agent's endpoint with the datapath's own findings (programs
//! attached, map entries). A delegated IPAM plugin is asked to CHECK too.

use std::ffi::OsString;
use std::net::IpAddr;

use hypha_netlink::Netlink;
use ipnet::IpNet;

use crate::commands::open_netns;
use crate::config::{CniVersion, NetConf};
use crate::delegate::Ipam;
use crate::env::Attachment;
use crate::error::{self, Error};
use crate::lock::AttachmentLock;
use crate::naming;
use crate::result::{self, Expected};

pub fn run(a: &Attachment, conf: &NetConf, cni_path: Option<&OsString>) -> Result<(), Error> {
    if conf.cni_version < CniVersion::V0_4_0 {
        return Err(Error::VersionTooOld {
            command: "CHECK",
            version: conf.cni_version,
            min: CniVersion::V0_4_0,
        });
    }
    // The conflist asks for no CHECK: a runtime following the spec does not even call it.
    if conf.disable_check {
        return Ok(());
    }
    let prev = conf.prev_result.as_ref().ok_or(Error::MissingPrevResult)?;
    let expected =
        result::expected_from_prev_result(prev, &a.ifname).map_err(Error::InvalidPrevResult)?;
    let ipam = Ipam::of(conf, cni_path)?;
    let (_netns_file, mut pod_nl) = open_netns(&a.netns)?;
    // Not while an ADD or DEL of this attachment is halfway.
    let _lock = AttachmentLock::acquire(
        &conf.agent_socket,
        &a.container_id,
        &a.ifname,
        conf.agent_timeout,
    )?;
    let mut problems = Vec::new();

    check_container(a, &expected, &mut pod_nl, &mut problems)?;

    let host_ifname = naming::host_ifname(&a.container_id, &a.ifname);
    match Netlink::new()?.link_by_name(&host_ifname)? {
        None => problems.push(format!("host interface {host_ifname} is missing")),
        Some(link) if !link.up => problems.push(format!("host interface {host_ifname} is down")),
        Some(_) => {}
    }

    // The agent's endpoint and what the agent finds wrong with its datapath.
    let client = conf.client().map_err(error::agent)?;
    match client.check_endpoint(&a.container_id, &a.ifname) {
        Ok(check) => {
            let ep = &check.endpoint;
            if ep.address != expected.address.map(|a| a.addr()) {
                problems.push(format!(
                    "the agent's endpoint has IPv4 address {}, prevResult says {}",
                    or_none(ep.address),
                    or_none(expected.address.map(|a| a.addr()))
                ));
            }
            if ep.address6 != expected.address6.map(|a| a.addr()) {
                problems.push(format!(
                    "the agent's endpoint has IPv6 address {}, prevResult says {}",
                    or_none(ep.address6),
                    or_none(expected.address6.map(|a| a.addr()))
                ));
            }
            if ep.host_ifname != host_ifname {
                problems.push(format!(
                    "the agent's endpoint uses host interface {}, expected {host_ifname}",
                    ep.host_ifname
                ));
            }
            problems.extend(check.problems.into_iter().map(|p| format!("agent: {p}")));
        }
        Err(e) if error::is_not_found(&e) => problems.push(format!(
            "the agent has no endpoint for container {} interface {}",
            a.container_id, a.ifname
        )),
        Err(e) => return Err(error::agent(e)),
    }

    if let Some(ipam) = ipam
        && let Err(e) = ipam.check()
    {
        problems.push(e.to_string());
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::CheckFailed(problems))
    }
}

/// The container's interface against `prevResult`.
fn check_container(
    a: &Attachment,
    expected: &Expected,
    pod_nl: &mut Netlink,
    problems: &mut Vec<String>,
) -> Result<(), Error> {
    let netns = a.netns.display();
    let Some(link) = pod_nl.link_by_name(&a.ifname)? else {
        problems.push(format!("interface {} is missing from {netns}", a.ifname));
        return Ok(());
    };
    if !link.up {
        problems.push(format!("interface {} in {netns} is down", a.ifname));
    }
    if let Some(mac) = expected.mac
        && mac.0 != link.mac
    {
        problems.push(format!(
            "interface {} in {netns} has MAC {}, prevResult says {mac}",
            a.ifname,
            hypha_api::MacAddr(link.mac)
        ));
    }
    if let Some(want) = expected.address {
        let addresses = pod_nl.addresses(link.index)?;
        if !addresses.contains(&(want.addr(), want.prefix_len())) {
            let have: Vec<String> = addresses.iter().map(|(a, p)| format!("{a}/{p}")).collect();
            problems.push(format!(
                "interface {} in {netns} has IPv4 addresses [{}], prevResult says {want}",
                a.ifname,
                have.join(", "),
            ));
        }
    }
    if let Some(want) = expected.address6 {
        let addresses = pod_nl.addresses6(link.index)?;
        match addresses
            .iter()
            .find(|x| x.address == want.addr() && x.prefix_len == want.prefix_len())
        {
            Some(x) if x.dad_failed => problems.push(format!(
                "IPv6 address {want} on interface {} in {netns} failed duplicate address \
                 detection",
                a.ifname
            )),
            Some(x) if x.tentative => problems.push(format!(
                "IPv6 address {want} on interface {} in {netns} is tentative (duplicate \
                 address detection has not finished)",
                a.ifname
            )),
            Some(_) => {}
            None => {
                let have: Vec<String> = addresses
                    .iter()
                    .map(|x| format!("{}/{}", x.address, x.prefix_len))
                    .collect();
                problems.push(format!(
                    "interface {} in {netns} has IPv6 addresses [{}], prevResult says {want}",
                    a.ifname,
                    have.join(", "),
                ));
            }
        }
    }
    let wants_v4 = expected
        .routes
        .iter()
        .any(|(d, _)| matches!(d, IpNet::V4(_)));
    let wants_v6 = expected
        .routes
        .iter()
        .any(|(d, _)| matches!(d, IpNet::V6(_)));
    let routes = if wants_v4 {
        pod_nl.routes(link.index)?
    } else {
        Vec::new()
    };
    let routes6 = if wants_v6 {
        pod_nl.routes6(link.index)?
    } else {
        Vec::new()
    };
    for (dst, gw) in &expected.routes {
        let found = match dst {
            IpNet::V4(dst) => routes
                .iter()
                .any(|r| r.dst == *dst && (gw.is_none() || r.gateway.map(IpAddr::V4) == *gw)),
            IpNet::V6(dst) => routes6
                .iter()
                .any(|r| r.dst == *dst && (gw.is_none() || r.gateway.map(IpAddr::V6) == *gw)),
        };
        if !found {
            let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
            problems.push(format!(
                "no route to {dst}{via} on interface {} in {netns}",
                a.ifname
            ));
        }
    }
    Ok(())
}

fn or_none(address: Option<impl std::fmt::Display>) -> String {
    address.map_or_else(|| "none".to_owned(), |a| a.to_string())
}
