//! ADD: one address per family the node has (from the agent, or from the delegated IPAM
//! plugin), a veth with its peer created in the container, the container side addressed
//! (IPv4 /32, IPv6 /128) and routed (a default route per family), then the endpoint
//! handed to the agent.
//!
//! Everything local is checked before an address is asked for. The attachment's lock
//! ([`crate::lock`]) is held from then on, so an ADD of an attachment another ADD made
//! finds its endpoint and fails with "already attached", touching nothing. Once an
//! address is held, any other failure deletes the veth this invocation created, asks the
//! agent to forget the endpoint (which releases the address: this invocation's, or one a
//! killed ADD of this attachment left, since under the lock no other ADD is running) and
//! runs the delegated plugin's DEL, then reports the original error.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;

use hypha_api::{AllocateRequest, Client, CreateEndpointRequest, MacAddr};
use hypha_netlink::{AddrGenMode, Netlink, Route, Route6, VethSpec};
use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;

use crate::commands::{del, open_netns};
use crate::config::{ConfigError, NetConf};
use crate::delegate::{self, Ipam};
use crate::env::Attachment;
use crate::error::{self, Error};
use crate::lock::AttachmentLock;
use crate::naming;
use crate::result::{self, Attached, Family};

/// `0.0.0.0/0`.
pub(crate) const DEFAULT_ROUTE: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0);

/// `::/0`.
pub(crate) const DEFAULT_ROUTE6: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0);

/// The pods' IPv6 gateway: the link-local `fe80::1` the datapath answers neighbour
/// solicitations for (`hypha_common::GATEWAY6`).
pub(crate) const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The pod's addresses and where they route, whoever gave them: one per family the pod
/// gets, at least one.
struct Addressing {
    ipv4: Option<Family<Ipv4Addr>>,
    ipv6: Option<Family<Ipv6Addr>>,
    dns: Option<Value>,
    /// The pods' MTU on this node, as the agent gives it (cluster mode); `None`: the
    /// kernel's default.
    node_mtu: Option<u32>,
}

/// The MTU of the pod's veth: the network configuration's `mtu` (refused above the
/// node's, naming both), else the node's; `None`: the kernel's default.
pub(crate) fn pod_mtu(configured: Option<u32>, node: Option<u32>) -> Result<Option<u32>, Error> {
    match (configured, node) {
        (Some(configured), Some(node)) if configured > node => {
            Err(Error::MtuAboveNode { configured, node })
        }
        (Some(c), _) => Ok(Some(c)),
        (None, n) => Ok(n),
    }
}

/// The addresses a runtime asks for, at most one per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Requested {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl Requested {
    fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

pub fn run(a: &Attachment, conf: &NetConf, cni_path: Option<&OsString>) -> Result<Value, Error> {
    let host_ifname = naming::host_ifname(&a.container_id, &a.ifname);
    let ipam = Ipam::of(conf, cni_path)?;
    // With a delegated plugin, it reads runtimeConfig.ips and CNI_ARGS IP itself; its
    // result must hold what was asked for.
    let requested = requested_addresses(a, conf)?;
    let mac = requested_mac(a, conf)?;
    let (netns_file, mut pod_nl) = open_netns(&a.netns)?;
    // Held to the end: an ADD, CHECK or DEL of this attachment started meanwhile waits.
    let lock = AttachmentLock::acquire(
        &conf.agent_socket,
        &a.container_id,
        &a.ifname,
        conf.agent_timeout,
    )?;
    let mut host_nl = Netlink::new()?;
    // The lock's moment goes with every request: should this invocation be killed and
    // the attachment deleted while a request of it is still on its way, the agent
    // refuses that request instead of taking an address for no one.
    let client = conf.client().map_err(error::agent)?;
    let client = match &lock {
        Some(l) => client.with_attachment_locked_at(l.taken_at()),
        None => client,
    };

    let addressing = match &ipam {
        Some(ipam) => delegated_address(a, &client, ipam, requested)?,
        None => agent_address(a, &client, requested)?,
    };

    let mut plumbing = Plumbing {
        a,
        conf,
        mac,
        host_ifname: &host_ifname,
        netns_file: &netns_file,
        pod_nl: &mut pod_nl,
        host_nl: &mut host_nl,
        veth_created: false,
        mtu: None,
    };
    match plumbing.attach(&client, &addressing, ipam.is_some()) {
        Ok(result) => Ok(result),
        Err(error) => {
            let created = plumbing.veth_created;
            Err(roll_back(
                error,
                created,
                &host_ifname,
                &mut host_nl,
                &client,
                a,
                ipam.as_ref(),
            ))
        }
    }
}

/// The addresses the runtime asks for: from the `ips` capability (the CNI conventions;
/// podman 4 with several static addresses) and `IP` in CNI_ARGS (CRI-O's ocicni; podman 4
/// with one). A pod gets at most one address per family: two different ones of a family
/// are refused, naming them, rather than one of them dropped.
pub(crate) fn requested_addresses(a: &Attachment, conf: &NetConf) -> Result<Requested, Error> {
    let all: Vec<IpAddr> = conf
        .runtime
        .ips
        .iter()
        .chain(&a.args.ips)
        .copied()
        .collect();
    let mut v4: Vec<Ipv4Addr> = all
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
        .collect();
    let mut v6: Vec<Ipv6Addr> = all
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
        .collect();
    v4.sort();
    v4.dedup();
    v6.sort();
    v6.dedup();
    let too_many = |family: &str, found: Vec<String>| {
        Error::Config(ConfigError::Invalid {
            key: "runtimeConfig.ips (with CNI_ARGS IP)",
            problem: if family == "4" {
                "asks for more than one IPv4 address (a pod gets one per family)"
            } else {
                "asks for more than one IPv6 address (a pod gets one per family)"
            },
            found: format!("{found:?}"),
        })
    };
    if v4.len() > 1 {
        return Err(too_many("4", v4.iter().map(ToString::to_string).collect()));
    }
    if v6.len() > 1 {
        return Err(too_many("6", v6.iter().map(ToString::to_string).collect()));
    }
    Ok(Requested {
        v4: v4.first().copied(),
        v6: v6.first().copied(),
    })
}

/// The MAC the runtime asks for: the `mac` capability or `MAC` in CNI_ARGS (CRI-O,
/// podman); two different ones are refused.
pub(crate) fn requested_mac(a: &Attachment, conf: &NetConf) -> Result<Option<MacAddr>, Error> {
    match (conf.runtime.mac, a.args.mac) {
        (Some(cap), Some(arg)) if cap != arg => Err(Error::Config(ConfigError::Invalid {
            key: "runtimeConfig.mac",
            problem: "differs from MAC in CNI_ARGS",
            found: format!("{cap} and {arg}"),
        })),
        (cap, arg) => Ok(cap.or(arg)),
    }
}

/// Addresses from the agent's allocator, one per family of the node (`requested` for the
/// `ips` capability). A requested address of a family the node does not have is refused
/// by the agent; should an answer still lack one, the allocation is released and the
/// address named.
fn agent_address(
    a: &Attachment,
    client: &Client,
    requested: Requested,
) -> Result<Addressing, Error> {
    let allocation = client
        .allocate(&AllocateRequest {
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
            address: requested.v4,
            address6: requested.v6,
        })
        .map_err(|e| {
            if error::is_conflict(&e) && attached(client, a) {
                // The attachment belongs to an earlier ADD: leave all of it alone.
                already_attached(a, e)
            } else if !requested.is_empty() && !error::is_incomplete(&e) {
                Error::RequestedAddress {
                    addresses: requested_list(requested),
                    source: Box::new(e),
                }
            } else {
                error::agent(e)
            }
        })?;
    let ipv4 = match (allocation.address, allocation.gateway) {
        (Some(address), Some(gateway)) => Some(Family { address, gateway }),
        _ => None,
    };
    let ipv6 = allocation.address6.map(|address| Family {
        address,
        gateway: allocation.gateway6.unwrap_or(GATEWAY6),
    });
    let missing: Vec<IpAddr> = [
        requested
            .v4
            .filter(|r| ipv4.map(|f| f.address) != Some(*r))
            .map(IpAddr::V4),
        requested
            .v6
            .filter(|r| ipv6.map(|f| f.address) != Some(*r))
            .map(IpAddr::V6),
    ]
    .into_iter()
    .flatten()
    .collect();
    let problem = if !missing.is_empty() {
        Some(Error::RequestedNotGiven {
            addresses: missing,
            by: "the node's allocation".to_owned(),
            given: [
                ipv4.map(|f| IpAddr::V4(f.address)),
                ipv6.map(|f| IpAddr::V6(f.address)),
            ]
            .into_iter()
            .flatten()
            .collect(),
        })
    } else if ipv4.is_none() && ipv6.is_none() {
        Some(Error::DelegateBadResult {
            plugin: "hypha agent".into(),
            command: "ADD",
            problem: "its allocation has no address of either family".into(),
        })
    } else {
        None
    };
    if let Some(error) = problem {
        // Give back what was allocated.
        return Err(match client.delete_endpoint(&a.container_id, &a.ifname) {
            Ok(_) => error,
            Err(e) => Error::WithCleanup {
                error: Box::new(error),
                cleanup: vec![error::agent(e)],
            },
        });
    }
    Ok(Addressing {
        ipv4,
        ipv6,
        dns: None,
        node_mtu: allocation.mtu,
    })
}

fn requested_list(requested: Requested) -> Vec<IpAddr> {
    [requested.v4.map(IpAddr::V4), requested.v6.map(IpAddr::V6)]
        .into_iter()
        .flatten()
        .collect()
}

/// Addresses from the delegated IPAM plugin, at most one per family, each of a family
/// the node has (the datapath routes no other); the gateways are still the agent's, since
/// the datapath answers for those only. What the runtime asked for must be in the result.
fn delegated_address(
    a: &Attachment,
    client: &Client,
    ipam: &Ipam<'_>,
    requested: Requested,
) -> Result<Addressing, Error> {
    match client.check_endpoint(&a.container_id, &a.ifname) {
        Ok(check) => {
            return Err(Error::AlreadyAttached {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
                detail: format!(
                    "the agent has it as endpoint {} ({}); delete it first",
                    check.endpoint.id,
                    [
                        check.endpoint.address.map(|a| a.to_string()),
                        check.endpoint.address6.map(|a| a.to_string()),
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(", ")
                ),
            });
        }
        Err(e) if error::is_not_found(&e) => {}
        Err(e) => return Err(error::agent(e)),
    }
    let status = client.status().map_err(error::agent)?;
    let node = status.node;
    let node_mtu = status.routing.map(|r| r.mtu);
    let result = ipam.add()?;
    let addressing = match delegate::ipam_result(&result) {
        Err(problem) => Err(Error::DelegateBadResult {
            plugin: ipam.plugin.to_owned(),
            command: "ADD",
            problem,
        }),
        Ok(r) => delegated_addressing(ipam.plugin, &node, requested, r).map(|mut a| {
            a.node_mtu = node_mtu;
            a
        }),
    };
    match addressing {
        Ok(addressing) => Ok(addressing),
        Err(error) => Err(match ipam.del() {
            Ok(()) => error,
            Err(e) => Error::WithCleanup {
                error: Box::new(error),
                cleanup: vec![e],
            },
        }),
    }
}

/// The addressing of a delegated IPAM result `r` on `node`: each address must be of a
/// family the node has, and every requested address must be there.
fn delegated_addressing(
    plugin: &str,
    node: &hypha_api::NodeStatus,
    requested: Requested,
    r: delegate::IpamResult,
) -> Result<Addressing, Error> {
    let not_on_node = |address: IpAddr| Error::FamilyNotOnNode {
        plugin: plugin.to_owned(),
        address,
    };
    let ipv4 = match r.address {
        None => None,
        Some(address) => Some(Family {
            address,
            gateway: node
                .gateway
                .ok_or_else(|| not_on_node(IpAddr::V4(address)))?,
        }),
    };
    let ipv6 = match r.address6 {
        None => None,
        Some(address) if node.pod_cidr6.is_none() && node.gateway6.is_none() => {
            return Err(not_on_node(IpAddr::V6(address)));
        }
        Some(address) => Some(Family {
            address,
            gateway: node.gateway6.unwrap_or(GATEWAY6),
        }),
    };
    let given: Vec<IpAddr> = [r.address.map(IpAddr::V4), r.address6.map(IpAddr::V6)]
        .into_iter()
        .flatten()
        .collect();
    let missing: Vec<IpAddr> = requested_list(requested)
        .into_iter()
        .filter(|want| !given.contains(want))
        .collect();
    if !missing.is_empty() {
        return Err(Error::RequestedNotGiven {
            addresses: missing,
            by: format!("IPAM plugin {plugin}'s result"),
            given,
        });
    }
    Ok(Addressing {
        ipv4,
        ipv6,
        dns: r.dns,
        node_mtu: None,
    })
}

/// Whether the agent has an endpoint for this attachment.
fn attached(client: &Client, a: &Attachment) -> bool {
    client.check_endpoint(&a.container_id, &a.ifname).is_ok()
}

fn already_attached(a: &Attachment, e: hypha_api::ClientError) -> Error {
    already_attached_by(a, e.to_string())
}

fn already_attached_by(a: &Attachment, detail: String) -> Error {
    Error::AlreadyAttached {
        container_id: a.container_id.clone(),
        ifname: a.ifname.clone(),
        detail,
    }
}

/// The steps after the address, with what is needed to undo them.
struct Plumbing<'a> {
    a: &'a Attachment,
    conf: &'a NetConf,
    /// The requested MAC of the container's interface.
    mac: Option<MacAddr>,
    host_ifname: &'a str,
    netns_file: &'a File,
    pod_nl: &'a mut Netlink,
    host_nl: &'a mut Netlink,
    veth_created: bool,
    /// The veth's MTU (see [`pod_mtu`]), set before it is created.
    mtu: Option<u32>,
}

impl Plumbing<'_> {
    fn create_veth(&mut self) -> Result<(), hypha_netlink::Error> {
        self.host_nl.create_veth(&VethSpec {
            host_name: self.host_ifname,
            peer_name: &self.a.ifname,
            peer_netns: self.netns_file.as_fd(),
            mtu: self.mtu,
            peer_mac: self.mac.map(|m| m.0),
        })
    }

    fn attach(
        &mut self,
        client: &Client,
        addr: &Addressing,
        external_ipam: bool,
    ) -> Result<Value, Error> {
        let a = self.a;
        self.mtu = pod_mtu(self.conf.mtu, addr.node_mtu)?;
        let created = match self.create_veth() {
            // The name is this attachment's. When the agent has an endpoint for it, it is
            // that endpoint's and stays; otherwise it is the leftover of an ADD that was
            // killed midway: it goes, and the pair is made anew.
            Err(e @ hypha_netlink::Error::LinkExists { .. }) => {
                if attached(client, a) {
                    return Err(already_attached_by(a, e.to_string()));
                }
                self.host_nl.delete_link_by_name(self.host_ifname)?;
                self.create_veth()
            }
            r => r,
        };
        created.map_err(|e| match e {
            hypha_netlink::Error::PeerExists { name } => Error::IfnameTaken {
                ifname: name,
                netns: a.netns.clone(),
            },
            e => Error::Netlink(e),
        })?;
        self.veth_created = true;

        // The container side: IPv6 enabled and its link-local address made from the MAC
        // (before the interface comes up, when the kernel makes it), the addresses (/32,
        // /128 without DAD), up, then the routes: the IPv4 gateway on-link and the
        // default route via it; the IPv6 default route via fe80::1 on this interface.
        let pod = self.pod_nl.link_by_name(&a.ifname)?.ok_or_else(|| {
            Error::Netlink(hypha_netlink::Error::LinkNotFound {
                link: a.ifname.clone(),
                netns: format!("network namespace {}", a.netns.display()),
            })
        })?;
        if let Some(v6) = addr.ipv6 {
            hypha_netlink::sysctl::enable_ipv6(
                self.netns_file.as_fd(),
                &a.netns,
                &["lo", &a.ifname],
            )
            .map_err(|e| Error::Ipv6Unavailable {
                address: v6.address,
                source: e,
            })?;
            self.pod_nl
                .set_addr_gen_mode(pod.index, AddrGenMode::Eui64)?;
        }
        if let Some(v4) = addr.ipv4 {
            self.pod_nl.add_address(pod.index, v4.address, 32)?;
        }
        if let Some(v6) = addr.ipv6 {
            self.pod_nl.add_address6(pod.index, v6.address, 128)?;
        }
        self.pod_nl.set_up(pod.index)?;
        if let Some(v4) = addr.ipv4 {
            self.pod_nl.add_route(&Route {
                dst: Ipv4Net::from(v4.gateway),
                gateway: None,
                oif: pod.index,
                scope_link: true,
                src: None,
            })?;
            self.pod_nl.add_route(&Route {
                dst: DEFAULT_ROUTE,
                gateway: Some(v4.gateway),
                oif: pod.index,
                scope_link: false,
                src: None,
            })?;
        }
        if let Some(v6) = addr.ipv6 {
            self.pod_nl.add_route6(&Route6 {
                dst: DEFAULT_ROUTE6,
                gateway: Some(v6.gateway),
                oif: pod.index,
                src: None,
            })?;
        }

        // The host side was created up; the agent adds the route to the pod and attaches the
        // datapath, and tells the host end's MAC.
        let endpoint = client
            .create_endpoint(&CreateEndpointRequest {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
                netns: a.netns.to_string_lossy().into_owned(),
                host_ifname: self.host_ifname.to_owned(),
                address: addr.ipv4.map(|f| f.address),
                address6: addr.ipv6.map(|f| f.address),
                pod_mac: MacAddr(pod.mac),
                labels: labels(a, self.conf),
                external_ipam,
                bandwidth: self.conf.runtime.bandwidth,
                ports: self.conf.named_ports.clone(),
            })
            .map_err(|e| {
                if error::is_conflict(&e) && attached(client, a) {
                    already_attached(a, e)
                } else {
                    error::agent(e)
                }
            })?;

        Ok(result::add_result(
            self.conf.cni_version,
            &Attached {
                host_ifname: self.host_ifname,
                host_mac: endpoint.host_mac,
                ifname: &a.ifname,
                pod_mac: MacAddr(pod.mac),
                netns: &a.netns,
                ipv4: addr.ipv4,
                ipv6: addr.ipv6,
                dns: addr.dns.clone(),
                mtu: self.mtu,
            },
        ))
    }
}

/// Undoes a failed ADD after the address was had and returns the original error, with
/// any failure of the cleanup attached. Every step is tried. Only what this invocation
/// made goes: its veth if it created one; the endpoint and address, and the delegated
/// plugin's address, unless the failure is that the attachment already has an endpoint
/// (then those are the earlier ADD's, and stay).
fn roll_back(
    error: Error,
    veth_created: bool,
    host_ifname: &str,
    host_nl: &mut Netlink,
    client: &Client,
    a: &Attachment,
    ipam: Option<&Ipam<'_>>,
) -> Error {
    let mut cleanup = Vec::new();
    let theirs = matches!(error, Error::AlreadyAttached { .. });
    if veth_created {
        // Deleting the host end deletes the container end with it.
        if let Err(e) = host_nl.delete_link_by_name(host_ifname) {
            cleanup.push(Error::Netlink(e));
        }
    }
    // The agent forgets the endpoint and its address. When it did not complete the failed
    // call, or does not complete this one, the delete is left for it (asking again would
    // only double the wait).
    let previous = match &error {
        Error::AgentUnreachable(e) => Some(e.as_ref()),
        _ => None,
    };
    let mut unanswered = None;
    if previous.is_none() && !theirs {
        match client.delete_endpoint(&a.container_id, &a.ifname) {
            Ok(_) => {}
            Err(e) if error::is_refusal(&e) => cleanup.push(error::agent(e)),
            Err(e) => unanswered = Some(e),
        }
    }
    if let Some(why) = previous.or(unanswered.as_ref())
        && let Err(e) = del::defer_after(why, client.socket(), &a.container_id, &a.ifname)
    {
        cleanup.push(e);
    }
    if let Some(ipam) = ipam.filter(|_| !theirs)
        && let Err(e) = ipam.del()
    {
        cleanup.push(e);
    }
    if cleanup.is_empty() {
        error
    } else {
        Error::WithCleanup {
            error: Box::new(error),
            cleanup,
        }
    }
}

/// The endpoint's labels: `args.cni.labels`, then the pod's namespace and name when the
/// runtime passed them in `CNI_ARGS` (those win over a label of the same key).
fn labels(a: &Attachment, conf: &NetConf) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = conf.labels.iter().cloned().collect();
    if let Some(ns) = &a.args.pod_namespace {
        labels.insert("k8s:namespace".to_owned(), ns.clone());
    }
    if let Some(pod) = &a.args.pod_name {
        labels.insert("k8s:pod".to_owned(), pod.clone());
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::CniArgs;

    fn attachment(args: &str) -> Attachment {
        Attachment {
            container_id: "c".into(),
            netns: "/x".into(),
            ifname: "eth0".into(),
            args: crate::env::parse_args(args).unwrap(),
        }
    }

    fn conf_with(runtime_config: &str) -> NetConf {
        crate::config::parse(
            format!(r#"{{"cniVersion": "1.0.0", "name": "n", "runtimeConfig": {runtime_config}}}"#)
                .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn the_mtu_is_the_configurations_up_to_the_nodes() {
        assert_eq!(pod_mtu(None, None).unwrap(), None);
        assert_eq!(pod_mtu(None, Some(1450)).unwrap(), Some(1450));
        assert_eq!(pod_mtu(Some(1400), Some(1450)).unwrap(), Some(1400));
        assert_eq!(pod_mtu(Some(1450), Some(1450)).unwrap(), Some(1450));
        assert_eq!(pod_mtu(Some(9000), None).unwrap(), Some(9000));
        let err = pod_mtu(Some(1500), Some(1450)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("mtu 1500") && msg.contains("pod MTU 1450"),
            "{msg}"
        );
        let cni = crate::error::CniError::from(err);
        assert_eq!(
            cni.code,
            crate::error::CniError::invalid_config(String::new()).code
        );
    }

    #[test]
    fn the_requested_addresses_come_from_the_capability_or_cni_args() {
        let none = conf_with("{}");
        assert_eq!(
            requested_addresses(&attachment(""), &none).unwrap(),
            Requested::default()
        );
        let v4 = Some(Ipv4Addr::new(10, 1, 0, 5));
        let v6 = Some("fd00::5".parse().unwrap());
        assert_eq!(
            requested_addresses(&attachment("IP=10.1.0.5"), &none).unwrap(),
            Requested { v4, v6: None }
        );
        assert_eq!(
            requested_addresses(&attachment("IP=fd00::5"), &none).unwrap(),
            Requested { v4: None, v6 }
        );
        let cap = conf_with(r#"{"ips": ["fd00::5/64", "10.1.0.5/24"]}"#);
        assert_eq!(
            requested_addresses(&attachment(""), &cap).unwrap(),
            Requested { v4, v6 }
        );
        // Both, agreeing.
        assert_eq!(
            requested_addresses(&attachment("IP=10.1.0.5/24"), &cap).unwrap(),
            Requested { v4, v6 }
        );
    }

    #[test]
    fn two_addresses_of_one_family_are_refused_naming_them() {
        let two = conf_with(r#"{"ips": ["10.1.0.5", "10.1.0.6"]}"#);
        let e = requested_addresses(&attachment(""), &two).unwrap_err();
        assert!(e.to_string().contains("runtimeConfig.ips"), "{e}");
        assert!(e.to_string().contains("more than one IPv4"), "{e}");
        let cap = conf_with(r#"{"ips": ["10.1.0.5"]}"#);
        let e = requested_addresses(&attachment("IP=10.1.0.7"), &cap).unwrap_err();
        assert!(
            e.to_string().contains("10.1.0.5") && e.to_string().contains("10.1.0.7"),
            "{e}"
        );
        let two6 = conf_with(r#"{"ips": ["10.1.0.5", "fd00::5/64", "fd00::6"]}"#);
        let e = requested_addresses(&attachment(""), &two6).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("more than one IPv6"), "{msg}");
        assert!(msg.contains("fd00::5") && msg.contains("fd00::6"), "{msg}");
        assert!(!msg.contains("10.1.0.5"), "{msg}");
    }

    #[test]
    fn the_requested_mac_comes_from_the_capability_or_cni_args() {
        let mac = Some(MacAddr([0x02, 0, 0, 0, 0, 0x07]));
        assert_eq!(
            requested_mac(&attachment("MAC=02:00:00:00:00:07"), &conf_with("{}")).unwrap(),
            mac
        );
        let cap = conf_with(r#"{"mac": "02:00:00:00:00:07"}"#);
        assert_eq!(requested_mac(&attachment(""), &cap).unwrap(), mac);
        assert_eq!(
            requested_mac(&attachment("MAC=02:00:00:00:00:07"), &cap).unwrap(),
            mac
        );
        let e = requested_mac(&attachment("MAC=02:00:00:00:00:08"), &cap).unwrap_err();
        assert!(e.to_string().contains("runtimeConfig.mac"), "{e}");
    }

    #[test]
    fn labels_come_from_args_and_the_k8s_args() {
        let mut a = Attachment {
            container_id: "c".into(),
            netns: "/x".into(),
            ifname: "eth0".into(),
            args: CniArgs::default(),
        };
        let mut conf = crate::config::parse(br#"{"cniVersion": "1.0.0", "name": "n"}"#).unwrap();
        assert!(labels(&a, &conf).is_empty());
        a.args.pod_namespace = Some("default".into());
        a.args.pod_name = Some("web-0".into());
        let l = labels(&a, &conf);
        assert_eq!(l.get("k8s:namespace").map(String::as_str), Some("default"));
        assert_eq!(l.get("k8s:pod").map(String::as_str), Some("web-0"));
        assert_eq!(l.len(), 2);
        conf.labels = vec![
            ("app".into(), "web".into()),
            ("k8s:pod".into(), "spoofed".into()),
        ];
        let l = labels(&a, &conf);
        assert_eq!(l.get("app").map(String::as_str), Some("web"));
        assert_eq!(l.get("k8s:pod").map(String::as_str), Some("web-0"));
        assert_eq!(l.len(), 3);
    }
}
