//! The agent's side of the host network: the gateway device, forwarding, masquerading
//! and the per-pod host routes. Behind a trait so the control plane is testable without
//! root; the Linux implementation uses the project's netlink layer (`hypha-netlink`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hypha_api::MacAddr;
use hypha_netlink::{Netlink, Route};

use crate::bandwidth::Limit;
use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Netlink(#[from] hypha_netlink::Error),
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up masquerading with nft (is the nftables package installed?): {0}")]
    Nft(String),
}

/// A host-side interface as the agent needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLink {
    pub index: u32,
    pub mac: MacAddr,
}

/// The host network operations of the control plane. Shared between threads: every
/// operation takes `&self` and may run at the same time as any other.
pub trait HostNetwork: Send + Sync {
    /// Makes the node ready for pods: gateway device and address, forwarding, masquerade.
    fn setup_node(&self, node: &NodeNetwork) -> Result<(), HostError>;
    /// The interface named `name` in the agent's network namespace, if it exists.
    fn link(&self, name: &str) -> Result<Option<HostLink>, HostError>;
    /// Deletes a host interface (a pod's host veth, which takes its peer along); whether
    /// it existed.
    fn delete_link(&self, name: &str) -> Result<bool, HostError>;
    /// Routes `address` to the pod behind host interface `ifindex`.
    fn route_pod(
        &self,
        ifindex: u32,
        address: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Result<(), HostError>;
    /// Installs or changes (`Some`) or removes (`None`) the rate limiter on `side`. Removal
    /// of a limiter that is not there, or on an interface that is gone, succeeds.
    fn set_rate_limit(&self, side: LimitSide<'_>, limit: Option<Limit>) -> Result<(), HostError>;
    /// Packets the rate limiter on `side` dropped since it was installed (`None` when
    /// there is none).
    fn rate_limit_drops(&self, side: LimitSide<'_>) -> Result<Option<u64>, HostError>;
}

/// Where an endpoint's rate limiter sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitSide<'a> {
    /// The root qdisc of the host veth (the pod's ingress).
    HostVeth { ifindex: u32 },
    /// The root qdisc of the pod's interface, inside its network namespace (its egress).
    Pod { netns: &'a Path, ifname: &'a str },
}

/// What the node's network looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNetwork {
    pub pod_cidr: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub host_device: String,
    pub masquerade: bool,
}

/// The real thing, in the agent's own network namespace. Each call opens its own netlink
/// socket (a socket costs a few microseconds; a netlink call that waits for the kernel
/// then holds nothing another call needs).
pub struct LinuxHost {
    _private: (),
}

impl LinuxHost {
    /// Checks that a netlink socket can be opened here (the calls open their own).
    pub fn new() -> Result<Self, HostError> {
        Netlink::new()?;
        Ok(Self { _private: () })
    }

    /// A socket for one call, in the agent's network namespace.
    fn nl(&self) -> Result<Netlink, HostError> {
        Ok(Netlink::new()?)
    }
}

impl HostNetwork for LinuxHost {
    fn setup_node(&self, node: &NodeNetwork) -> Result<(), HostError> {
        let mut nl = self.nl()?;
        // The gateway address sits on an existing device (loopback by default: every
        // kernel has it, unlike `dummy`); any other named device is created as a dummy.
        let dev = match nl.link_by_name(&node.host_device)? {
            Some(l) => l,
            None => {
                nl.create_dummy(&node.host_device)?;
                nl.link_by_name(&node.host_device)?.ok_or_else(|| {
                    hypha_netlink::Error::LinkNotFound {
                        link: node.host_device.clone(),
                        netns: "the agent's network namespace".into(),
                    }
                })?
            }
        };
        nl.add_address(dev.index, node.gateway, 32)?;
        nl.set_up(dev.index)?;
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        if node.masquerade {
            masquerade(&nft_table(node.pod_cidr), node.pod_cidr)?;
        }
        Ok(())
    }

    fn link(&self, name: &str) -> Result<Option<HostLink>, HostError> {
        Ok(self.nl()?.link_by_name(name)?.map(|l| HostLink {
            index: l.index,
            mac: MacAddr(l.mac),
        }))
    }

    fn delete_link(&self, name: &str) -> Result<bool, HostError> {
        Ok(self.nl()?.delete_link_by_name(name)?)
    }

    fn route_pod(
        &self,
        ifindex: u32,
        address: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Result<(), HostError> {
        self.nl()?.add_route(&Route {
            dst: Ipv4Net::new(address, 32).expect("/32 is a valid prefix"),
            gateway: None,
            oif: ifindex,
            scope_link: true,
            src: Some(gateway),
        })?;
        Ok(())
    }

    fn set_rate_limit(&self, side: LimitSide<'_>, limit: Option<Limit>) -> Result<(), HostError> {
        let (pod_nl, index) = Self::limiter_socket(side)?;
        let mut nl = match pod_nl {
            Some(n) => n,
            None => self.nl()?,
        };
        let Some(index) = index else {
            return match limit {
                None => Ok(()),
                Some(_) => Err(HostError::Netlink(hypha_netlink::Error::LinkNotFound {
                    link: describe_side(side),
                    netns: "its network namespace".into(),
                })),
            };
        };
        let egress = matches!(side, LimitSide::Pod { .. });
        match limit {
            Some(l) => {
                let mtu = nl.link_by_index(index)?.map(|l| l.mtu).unwrap_or(1500);
                let tbf = l.tbf(mtu);
                nl.replace_tbf(index, &tbf)?;
                if egress {
                    // The pod's own stack builds its GSO packets: small enough to fit the
                    // queue whole, a full queue refuses them to the socket instead of `tbf`
                    // cutting a 64 KB packet up and dropping the pieces it cannot hold.
                    nl.set_gso_max_size(index, crate::bandwidth::gso_size(&tbf, mtu))?;
                }
            }
            None => {
                nl.delete_hypha_root_qdisc(index)?;
                if egress {
                    nl.set_gso_max_size(index, crate::bandwidth::GSO_MAX)?;
                }
            }
        }
        Ok(())
    }

    fn rate_limit_drops(&self, side: LimitSide<'_>) -> Result<Option<u64>, HostError> {
        let (pod_nl, index) = Self::limiter_socket(side)?;
        let Some(index) = index else {
            return Ok(None);
        };
        let mut nl = match pod_nl {
            Some(n) => n,
            None => self.nl()?,
        };
        Ok(nl
            .root_qdisc(index)?
            .filter(|q| q.is_hypha_tbf())
            .map(|q| q.drops))
    }
}

/// How a limiter's interface is named in messages.
fn describe_side(side: LimitSide<'_>) -> String {
    match side {
        LimitSide::HostVeth { ifindex } => format!("host veth #{ifindex}"),
        LimitSide::Pod { netns, ifname } => format!("{ifname} in {}", netns.display()),
    }
}

impl LinuxHost {
    /// A socket where `side` lives and the interface index there (`None` if it is gone):
    /// for the pod's side, a socket opened in its namespace (entered once, for the time
    /// it takes to open it); for the host veth, `None`: a socket of the agent's serves.
    fn limiter_socket(side: LimitSide<'_>) -> Result<(Option<Netlink>, Option<u32>), HostError> {
        match side {
            LimitSide::HostVeth { ifindex } => Ok((None, Some(ifindex))),
            LimitSide::Pod { netns, ifname } => {
                if !netns.exists() {
                    return Ok((None, None));
                }
                let mut nl = Netlink::in_netns(netns)?;
                let index = nl.link_by_name(ifname)?.map(|l| l.index);
                Ok((Some(nl), index))
            }
        }
    }
}

fn write_sysctl(path: &str, value: &str) -> Result<(), HostError> {
    std::fs::write(path, value).map_err(|source| HostError::Io {
        op: "write",
        path: path.into(),
        source,
    })
}

/// The nftables table of the agent serving `pod_cidr`: one per agent, so that agents with
/// different pod CIDRs in one network namespace do not touch each other's rules.
pub fn nft_table(pod_cidr: Ipv4Net) -> String {
    let [a, b, c, d] = pod_cidr.network().octets();
    format!("hypha_{a}_{b}_{c}_{d}_{}", pod_cidr.prefix_len())
}

/// The nftables ruleset that masquerades pod traffic leaving the pod CIDR, replaced whole
/// so that re-running is idempotent.
pub fn masquerade_ruleset(table: &str, pod_cidr: Ipv4Net) -> String {
    format!(
        "table ip {table} {{}}\n\
         delete table ip {table}\n\
         table ip {table} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {pod_cidr} ip daddr != {pod_cidr} masquerade\n\
         \t}}\n\
         }}\n"
    )
}

fn masquerade(table: &str, pod_cidr: Ipv4Net) -> Result<(), HostError> {
    use std::io::Write as _;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HostError::Nft(format!("cannot run nft: {e}")))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(masquerade_ruleset(table, pod_cidr).as_bytes())
        .map_err(|e| HostError::Nft(e.to_string()))?;
    let out = child
        .wait_with_output()
        .map_err(|e| HostError::Nft(e.to_string()))?;
    if !out.status.success() {
        return Err(HostError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub mod fake {
    use std::collections::BTreeMap;
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use super::*;

    /// Host interfaces by name; routes recorded. Its state sits behind a lock (the trait
    /// takes `&self`); tests read and change it through [`Self::state`].
    #[derive(Default)]
    pub struct FakeHost(Mutex<FakeHostState>);

    impl FakeHost {
        /// What the fake holds, and its failure switch.
        pub fn state(&self) -> MutexGuard<'_, FakeHostState> {
            self.0.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }

    /// What a [`FakeHost`] holds.
    #[derive(Default)]
    pub struct FakeHostState {
        pub links: BTreeMap<String, HostLink>,
        pub routes: Vec<(u32, Ipv4Addr)>,
        pub node: Option<NodeNetwork>,
        /// Installed rate limiters, by `describe_side`.
        pub limits: BTreeMap<String, Limit>,
        pub fail_limits: bool,
    }

    impl HostNetwork for FakeHost {
        fn setup_node(&self, node: &NodeNetwork) -> Result<(), HostError> {
            self.state().node = Some(node.clone());
            Ok(())
        }
        fn link(&self, name: &str) -> Result<Option<HostLink>, HostError> {
            Ok(self.state().links.get(name).copied())
        }
        fn delete_link(&self, name: &str) -> Result<bool, HostError> {
            Ok(self.state().links.remove(name).is_some())
        }
        fn route_pod(&self, ifindex: u32, address: Ipv4Addr, _: Ipv4Addr) -> Result<(), HostError> {
            self.state().routes.push((ifindex, address));
            Ok(())
        }
        fn set_rate_limit(
            &self,
            side: LimitSide<'_>,
            limit: Option<Limit>,
        ) -> Result<(), HostError> {
            let mut st = self.state();
            if st.fail_limits {
                return Err(HostError::Nft("fake: cannot install a qdisc".into()));
            }
            match limit {
                Some(l) => st.limits.insert(describe_side(side), l),
                None => st.limits.remove(&describe_side(side)),
            };
            Ok(())
        }
        fn rate_limit_drops(&self, side: LimitSide<'_>) -> Result<Option<u64>, HostError> {
            Ok(self.state().limits.get(&describe_side(side)).map(|_| 7))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_masquerades_only_traffic_leaving_the_pod_cidr() {
        let cidr = "10.244.0.0/24".parse().unwrap();
        assert_eq!(nft_table(cidr), "hypha_10_244_0_0_24");
        let rules = masquerade_ruleset(&nft_table(cidr), cidr);
        assert!(rules.contains("delete table ip hypha_10_244_0_0_24"));
        assert!(rules.contains("ip saddr 10.244.0.0/24 ip daddr != 10.244.0.0/24 masquerade"));
        assert!(rules.contains("type nat hook postrouting priority srcnat"));
    }
}
