//! ADD: an address from the agent, a veth with its peer created in the container, the
//! container side addressed and routed, then the endpoint handed to the agent.
//!
//! Everything local is checked before the agent is asked for an address. Once it has
//! given one, any failure deletes the veth this invocation created and asks the agent to
//! forget the endpoint (which releases the address), then reports the original error.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use hypha_api::{AllocateRequest, Allocation, Client, CreateEndpointRequest, MacAddr};
use hypha_netlink::{Netlink, Route, VethSpec};
use ipnet::Ipv4Net;
use serde_json::Value;

use crate::commands::open_netns;
use crate::config::NetConf;
use crate::env::Attachment;
use crate::error::{self, Error};
use crate::naming;
use crate::result::{self, Attached};

/// `0.0.0.0/0`.
pub(crate) const DEFAULT_ROUTE: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0);

pub fn run(a: &Attachment, conf: &NetConf) -> Result<Value, Error> {
    let host_ifname = naming::host_ifname(&a.container_id, &a.ifname);
    let (netns_file, mut pod_nl) = open_netns(&a.netns)?;
    let mut host_nl = Netlink::new()?;
    let client = Client::new(&conf.agent_socket).map_err(error::agent)?;

    let allocation = client
        .allocate(&AllocateRequest {
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
            address: None,
        })
        .map_err(|e| {
            if error::is_conflict(&e) {
                // The attachment belongs to an earlier ADD: leave all of it alone.
                Error::AlreadyAttached {
                    container_id: a.container_id.clone(),
                    ifname: a.ifname.clone(),
                    source: Box::new(e),
                }
            } else {
                error::agent(e)
            }
        })?;

    let mut plumbing = Plumbing {
        a,
        conf,
        host_ifname: &host_ifname,
        netns_file: &netns_file,
        pod_nl: &mut pod_nl,
        host_nl: &mut host_nl,
        veth_created: false,
    };
    match plumbing.attach(&client, &allocation) {
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
            ))
        }
    }
}

/// The steps after the allocation, with what is needed to undo them.
struct Plumbing<'a> {
    a: &'a Attachment,
    conf: &'a NetConf,
    host_ifname: &'a str,
    netns_file: &'a File,
    pod_nl: &'a mut Netlink,
    host_nl: &'a mut Netlink,
    veth_created: bool,
}

impl Plumbing<'_> {
    fn attach(&mut self, client: &Client, alloc: &Allocation) -> Result<Value, Error> {
        let a = self.a;
        self.host_nl
            .create_veth(&VethSpec {
                host_name: self.host_ifname,
                peer_name: &a.ifname,
                peer_netns: self.netns_file.as_fd(),
                mtu: self.conf.mtu,
                peer_mac: None,
            })
            .map_err(|e| match e {
                hypha_netlink::Error::PeerExists { name } => Error::IfnameTaken {
                    ifname: name,
                    netns: a.netns.clone(),
                },
                e => Error::Netlink(e),
            })?;
        self.veth_created = true;

        // The container side: address/32, up, the gateway on-link, the default route via it.
        let pod = self.pod_nl.link_by_name(&a.ifname)?.ok_or_else(|| {
            Error::Netlink(hypha_netlink::Error::LinkNotFound {
                link: a.ifname.clone(),
                netns: format!("network namespace {}", a.netns.display()),
            })
        })?;
        self.pod_nl.add_address(pod.index, alloc.address, 32)?;
        self.pod_nl.set_up(pod.index)?;
        self.pod_nl.add_route(&Route {
            dst: Ipv4Net::from(alloc.gateway),
            gateway: None,
            oif: pod.index,
            scope_link: true,
            src: None,
        })?;
        self.pod_nl.add_route(&Route {
            dst: DEFAULT_ROUTE,
            gateway: Some(alloc.gateway),
            oif: pod.index,
            scope_link: false,
            src: None,
        })?;

        // The host side: up; the agent adds the route to the pod and attaches the datapath.
        let host = self
            .host_nl
            .link_by_name(self.host_ifname)?
            .ok_or_else(|| {
                Error::Netlink(hypha_netlink::Error::LinkNotFound {
                    link: self.host_ifname.to_owned(),
                    netns: "the current network namespace".to_owned(),
                })
            })?;
        self.host_nl.set_up(host.index)?;

        client
            .create_endpoint(&CreateEndpointRequest {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
                netns: a.netns.to_string_lossy().into_owned(),
                host_ifname: self.host_ifname.to_owned(),
                address: alloc.address,
                pod_mac: MacAddr(pod.mac),
                labels: labels(a),
                external_ipam: false,
                bandwidth: None,
            })
            .map_err(error::agent)?;

        Ok(result::add_result(
            self.conf.cni_version,
            &Attached {
                host_ifname: self.host_ifname,
                host_mac: MacAddr(host.mac),
                ifname: &a.ifname,
                pod_mac: MacAddr(pod.mac),
                netns: &a.netns,
                address: alloc.address,
                gateway: alloc.gateway,
            },
        ))
    }
}

/// Undoes a failed ADD after the allocation and returns the original error, with any
/// failure of the cleanup attached. Every step is tried.
fn roll_back(
    error: Error,
    veth_created: bool,
    host_ifname: &str,
    host_nl: &mut Netlink,
    client: &Client,
    a: &Attachment,
) -> Error {
    let mut cleanup = Vec::new();
    if veth_created {
        // Deleting the host end deletes the container end with it.
        if let Err(e) = host_nl.delete_link_by_name(host_ifname) {
            cleanup.push(Error::Netlink(e));
        }
    }
    if let Err(e) = client.delete_endpoint(&a.container_id, &a.ifname) {
        cleanup.push(error::agent(e));
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

/// The endpoint's labels: the pod's namespace and name when the runtime passed them.
fn labels(a: &Attachment) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
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

    #[test]
    fn labels_come_from_the_k8s_args() {
        let mut a = Attachment {
            container_id: "c".into(),
            netns: "/x".into(),
            ifname: "eth0".into(),
            args: CniArgs::default(),
        };
        assert!(labels(&a).is_empty());
        a.args.pod_namespace = Some("default".into());
        a.args.pod_name = Some("web-0".into());
        let l = labels(&a);
        assert_eq!(l.get("k8s:namespace").map(String::as_str), Some("default"));
        assert_eq!(l.get("k8s:pod").map(String::as_str), Some("web-0"));
        assert_eq!(l.len(), 2);
    }
}
