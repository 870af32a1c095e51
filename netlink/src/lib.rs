//! Hypha's one netlink layer: a synchronous rtnetlink socket with typed methods, used by
//! the CNI plugin, the agent and the launcher.
//!
//! A [`Netlink`] is bound to one network namespace for its whole life: [`Netlink::new`]
//! to the caller's, [`Netlink::in_netns`] to another one, entered only for the time it
//! takes to create the socket. Every request asks for an acknowledgement, checks the
//! sequence number of what comes back and turns the kernel's errno into an [`Error`]
//! naming the operation, the interface and the namespace.
//!
//! ```no_run
//! # fn main() -> Result<(), hypha_netlink::Error> {
//! let mut nl = hypha_netlink::Netlink::new()?;
//! if let Some(lo) = nl.link_by_name("lo")? {
//!     println!("lo is #{} with mtu {}", lo.index, lo.mtu);
//! }
//! # Ok(()) }
//! ```

mod error;
mod htb;
mod messages;
mod netns;
pub mod procs;
mod qdisc;
pub mod sysctl;
mod tc;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_ECHO,
    NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::route::RouteMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

pub use error::Error;
use error::RequestError;
pub use htb::{HTB_TOP_MINOR, HtbSpec};
pub use netns::{cookie as netns_cookie, own_cookie as own_netns_cookie};
pub use qdisc::{HYPHA_QDISC_MAJOR, Qdisc, TbfSpec};
pub use tc::{BpfFilter, InstalledBpfFilter, TcHook};

/// Result of the netlink layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Size of the receive buffer. The kernel sizes dump datagrams after the largest buffer
/// it has seen a reader use, capped at 32 KiB, so this is always large enough.
const RECV_BUFFER: usize = 64 * 1024;

/// How many times a dump interrupted by a concurrent change (`NLM_F_DUMP_INTR`) is redone.
const DUMP_ATTEMPTS: usize = 3;

/// A network interface, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Hardware address; all zeroes for interfaces without one (such as `lo`).
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Whether the interface is administratively up (`IFF_UP`).
    pub up: bool,
    /// `IFLA_INFO_KIND`: `veth`, `dummy`, ... `None` for physical devices and `lo`.
    pub kind: Option<String>,
    /// How the kernel makes the interface's IPv6 link-local address
    /// (`IFLA_AF_SPEC`/`AF_INET6`/`IFLA_INET6_ADDR_GEN_MODE`); `None` when the kernel did
    /// not say (IPv6 disabled in the kernel).
    pub addr_gen_mode: Option<AddrGenMode>,
}

/// How the kernel generates an interface's IPv6 link-local address when it comes up
/// (`IN6_ADDR_GEN_MODE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrGenMode {
    /// `fe80::` + the modified EUI-64 of the MAC (RFC 4291 appendix A).
    Eui64,
    /// No link-local address at all.
    None,
    /// RFC 7217 stable privacy addresses.
    StablePrivacy,
    /// A random interface identifier.
    Random,
    /// A mode this crate does not know, by number.
    Other(u8),
}

/// An IPv6 address of an interface, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address6 {
    pub address: Ipv6Addr,
    pub prefix_len: u8,
    /// Duplicate address detection has not finished (`IFA_F_TENTATIVE`): the address
    /// cannot be used as a source yet.
    pub tentative: bool,
    /// Duplicate address detection found the address in use elsewhere
    /// (`IFA_F_DADFAILED`): the address is never used.
    pub dad_failed: bool,
    /// Added without duplicate address detection (`IFA_F_NODAD`).
    pub nodad: bool,
}

impl Address6 {
    /// Whether the kernel uses the address: neither tentative nor failed DAD.
    pub fn usable(&self) -> bool {
        !self.tentative && !self.dad_failed
    }
}

/// A veth pair to create with [`Netlink::create_veth`].
#[derive(Clone, Copy, Debug)]
pub struct VethSpec<'a> {
    /// Name of the end created in the socket's network namespace.
    pub host_name: &'a str,
    /// Name of the end created directly in `peer_netns`.
    pub peer_name: &'a str,
    /// The peer's network namespace (an open `/proc/<pid>/ns/net` or `/run/netns/<name>`).
    pub peer_netns: BorrowedFd<'a>,
    /// MTU of both ends; the kernel's default (1500) when `None`.
    pub mtu: Option<u32>,
    /// MAC of the peer; random when `None`.
    pub peer_mac: Option<[u8; 6]>,
}

/// An IPv4 route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    /// Index of the outgoing interface.
    pub oif: u32,
    /// `scope link` (directly reachable) rather than `scope global`.
    pub scope_link: bool,
    /// Preferred source address.
    pub src: Option<Ipv4Addr>,
}

/// An IPv6 route of the main table.
///
/// IPv6 has no route scopes (the kernel reports every IPv6 route as `scope global`): a
/// route without a gateway is on-link through `oif`, which is what `scope link` says for
/// IPv4. A link-local gateway (`fe80::/10`) needs `oif`, which every route here has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route6 {
    pub dst: Ipv6Net,
    pub gateway: Option<Ipv6Addr>,
    /// Index of the outgoing interface.
    pub oif: u32,
    /// Preferred source address.
    pub src: Option<Ipv6Addr>,
}

/// The route protocol number (`rtm_protocol`, `proto 201` in `ip route`) of the routes
/// Hypha owns beside its per-pod ones: cluster routes to other nodes' pods. The kernel
/// only stores it; Hypha lists its routes by it and deletes only routes that carry it.
/// Numbers above 200 are free for local use (`/etc/iproute2/rt_protos`: up to 252).
pub const RTPROT_HYPHA: u8 = 201;

/// A VXLAN device to create with [`Netlink::create_vxlan`].
#[derive(Clone, Copy, Debug)]
pub struct VxlanSpec<'a> {
    pub name: &'a str,
    /// UDP port it sends to and listens on.
    pub port: u16,
    /// The kernel's default (1500 without a lower device) when `None`.
    pub mtu: Option<u32>,
}

/// What the kernel says of a VXLAN device (see [`Netlink::vxlan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanInfo {
    /// External mode (`IFLA_VXLAN_COLLECT_METADATA`): each packet's tunnel key, set by a
    /// program, says where it goes and with which VNI.
    pub collect_metadata: bool,
    /// UDP destination port.
    pub port: u16,
    /// Source MAC learning (`IFLA_VXLAN_LEARNING`).
    pub learning: bool,
    /// Its fixed VNI (`IFLA_VXLAN_ID`), which a device in external mode has none of
    /// (the kernel may report 0).
    pub vni: Option<u32>,
    /// `IFF_NOARP`: the stack resolves no neighbours on it.
    pub noarp: bool,
}

/// A main-table route of either family that carries a route protocol number (see
/// [`RTPROT_HYPHA`] and [`Netlink::tagged_routes`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaggedRoute {
    pub dst: IpNet,
    pub target: RouteTarget,
    pub protocol: u8,
}

/// Where a [`TaggedRoute`] sends its packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteTarget {
    /// On-link through interface `oif` (`dev`), with the preferred source `src`.
    Device { oif: u32, src: Option<IpAddr> },
    /// To a gateway of the same family (`via`); the kernel finds the interface.
    Gateway(IpAddr),
}

impl std::fmt::Display for TaggedRoute {
    /// As `ip route` writes it, with the interface by index: `10.244.0.0/16 dev #5 src
    /// 10.244.1.1 proto 201`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.dst)?;
        match self.target {
            RouteTarget::Device { oif, src } => {
                write!(f, " dev #{oif}")?;
                if let Some(src) = src {
                    write!(f, " src {src}")?;
                }
            }
            RouteTarget::Gateway(gw) => write!(f, " via {gw}")?,
        }
        write!(f, " proto {}", self.protocol)
    }
}

/// A synchronous rtnetlink socket bound to one network namespace.
///
/// Requests are sent one at a time and their answers read to the end before the next
/// one; the handle is `Send` but not meant to be shared.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// Where the socket lives, for error messages.
    netns: String,
}

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn new() -> Result<Self> {
        let netns = "the current network namespace".to_owned();
        let socket = open_socket().map_err(|source| Error::Socket {
            netns: netns.clone(),
            source,
        })?;
        Ok(Self::with_socket(socket, netns))
    }

    /// A socket inside the network namespace at `path` (`/run/netns/<name>`,
    /// `/proc/<pid>/ns/net`, ...).
    ///
    /// The calling thread enters the namespace with `setns(CLONE_NEWNET)`, creates the
    /// socket and goes back to its original namespace before returning (a guard restores
    /// it even on error or unwinding); the socket stays bound to the target namespace.
    /// `setns` only moves the calling thread, so another thread of the process that opens
    /// sockets meanwhile is unaffected, but anything this thread does during the call
    /// happens inside the namespace: callers should be single-threaded or accept that.
    pub fn in_netns(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::OpenNetns {
            path: path.to_owned(),
            source,
        })?;
        Self::in_netns_fd(file.as_fd(), path)
    }

    /// Like [`Netlink::in_netns`] with the namespace already open (for instance to also
    /// pass it as a [`VethSpec::peer_netns`]); `path` is only used in messages.
    pub fn in_netns_fd(netns: BorrowedFd<'_>, path: &Path) -> Result<Self> {
        let guard = netns::Guard::enter(netns, path)?;
        let socket = open_socket();
        guard.restore()?;
        let label = format!("network namespace {}", path.display());
        let socket = socket.map_err(|source| Error::Socket {
            netns: label.clone(),
            source,
        })?;
        Ok(Self::with_socket(socket, label))
    }

    fn with_socket(socket: Socket, netns: String) -> Self {
        Self {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUFFER),
            netns,
        }
    }

    /// The interface named `name`, or `None` if there is none.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let msg = RouteNetlinkMessage::GetLink(messages::link_name_message(name));
        self.get_link(msg, || format!("get interface {name}"))
    }

    /// The interface with index `index`, or `None` if there is none.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>> {
        let msg = RouteNetlinkMessage::GetLink(messages::link_index_message(index));
        self.get_link(msg, || format!("get interface #{index}"))
    }

    /// Every interface of the socket's namespace.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let msg = RouteNetlinkMessage::GetLink(messages::link_dump_message());
        let answers = self
            .dump(msg)
            .map_err(|e| e.into_error("list interfaces".to_owned(), &self.netns, None))?;
        Ok(answers
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(messages::parse_link(link)),
                _ => None,
            })
            .collect())
    }

    fn get_link(
        &mut self,
        msg: RouteNetlinkMessage,
        op: impl FnOnce() -> String,
    ) -> Result<Option<Link>> {
        match self.request(msg, 0) {
            Ok(answers) => Ok(answers.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(messages::parse_link(link)),
                _ => None,
            })),
            Err(e) if matches!(e.errno(), Some(libc::ENODEV | libc::ENOENT)) => Ok(None),
            Err(e) => Err(e.into_error(op(), &self.netns, None)),
        }
    }

    /// Creates a veth pair in one `RTM_NEWLINK` (`NLM_F_CREATE|NLM_F_EXCL`): the host end in
    /// this socket's namespace and the peer directly in `spec.peer_netns`. The host end is
    /// created up; the peer is left down (the kernel cannot open it before the pair is
    /// linked), for the caller to address and set up.
    ///
    /// Fails with [`Error::LinkExists`] if the host name is taken here and with
    /// [`Error::PeerExists`] if the peer name is taken in the peer's namespace.
    pub fn create_veth(&mut self, spec: &VethSpec<'_>) -> Result<()> {
        let msg = RouteNetlinkMessage::NewLink(messages::veth_message(spec));
        match self.request(msg, NLM_F_CREATE | NLM_F_EXCL) {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == Some(libc::EEXIST) => {
                // The kernel says EEXIST for either name; the host one is checked first
                // (before anything is created), so if it is free the peer's was taken.
                if self.link_by_name(spec.host_name)?.is_some() {
                    Err(Error::LinkExists {
                        name: spec.host_name.to_owned(),
                        netns: self.netns.clone(),
                    })
                } else {
                    Err(Error::PeerExists {
                        name: spec.peer_name.to_owned(),
                    })
                }
            }
            Err(e) => Err(e.into_error(
                format!("create veth {} (peer {})", spec.host_name, spec.peer_name),
                &self.netns,
                None,
            )),
        }
    }

    /// Creates a dummy interface named `name` (left down).
    pub fn create_dummy(&mut self, name: &str) -> Result<()> {
        let msg = RouteNetlinkMessage::NewLink(messages::dummy_message(name));
        match self.request(msg, NLM_F_CREATE | NLM_F_EXCL) {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == Some(libc::EEXIST) => Err(Error::LinkExists {
                name: name.to_owned(),
                netns: self.netns.clone(),
            }),
            Err(e) => Err(e.into_error(format!("create dummy {name}"), &self.netns, None)),
        }
    }

    /// Creates a VXLAN device in collect-metadata (external) mode as `spec` says, left
    /// down (see [`messages::vxlan_message`]). It is created with `IFF_NOARP`: a device
    /// in external mode has no fixed peer to ask, so the stack sends what it routes there
    /// straight to the device (with the device's own MAC as the destination) and the
    /// program on its egress decides where it goes.
    ///
    /// Fails with [`Error::LinkExists`] if the name is taken; the kernel also refuses a
    /// second external device on the same port in one namespace (`EEXIST`, another
    /// error naming the operation).
    pub fn create_vxlan(&mut self, spec: &VxlanSpec<'_>) -> Result<()> {
        let msg = RouteNetlinkMessage::NewLink(messages::vxlan_message(spec));
        let op = || {
            format!(
                "create VXLAN device {} (external, UDP port {})",
                spec.name, spec.port
            )
        };
        match self.request(msg, NLM_F_CREATE | NLM_F_EXCL) {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == Some(libc::EEXIST) => {
                if self.link_by_name(spec.name)?.is_some() {
                    Err(Error::LinkExists {
                        name: spec.name.to_owned(),
                        netns: self.netns.clone(),
                    })
                } else {
                    Err(e.into_error(op(), &self.netns, None))
                }
            }
            Err(e) => Err(e.into_error(op(), &self.netns, None)),
        }
    }

    /// The VXLAN settings of interface `index`; `None` if it is gone or not a VXLAN
    /// device.
    pub fn vxlan(&mut self, index: u32) -> Result<Option<VxlanInfo>> {
        let msg = RouteNetlinkMessage::GetLink(messages::link_index_message(index));
        match self.request(msg, 0) {
            Ok(answers) => Ok(answers.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => messages::parse_vxlan(link),
                _ => None,
            })),
            Err(e) if matches!(e.errno(), Some(libc::ENODEV | libc::ENOENT)) => Ok(None),
            Err(e) => Err(e.into_error(format!("get interface #{index}"), &self.netns, None)),
        }
    }

    /// Sets the MTU of interface `index`.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<()> {
        let msg = RouteNetlinkMessage::NewLink(messages::mtu_message(index, mtu));
        self.request(msg, 0).map(drop).map_err(|e| {
            e.into_error(
                format!("set the MTU of interface #{index} to {mtu}"),
                &self.netns,
                Some(&format!("#{index}")),
            )
        })
    }

    /// Switches neighbour resolution off on interface `index` (`IFF_NOARP`).
    pub fn set_noarp(&mut self, index: u32) -> Result<()> {
        let msg = RouteNetlinkMessage::NewLink(messages::noarp_message(index));
        self.request(msg, 0).map(drop).map_err(|e| {
            e.into_error(
                format!("switch ARP off on interface #{index}"),
                &self.netns,
                Some(&format!("#{index}")),
            )
        })
    }

    /// The interface that holds `address` (either family), if one does.
    pub fn link_of_address(&mut self, address: IpAddr) -> Result<Option<Link>> {
        let dump = match address {
            IpAddr::V4(_) => messages::address_dump_message(),
            IpAddr::V6(_) => messages::address6_dump_message(),
        };
        let answers = self
            .dump(RouteNetlinkMessage::GetAddress(dump))
            .map_err(|e| {
                e.into_error(
                    format!("find the interface holding {address}"),
                    &self.netns,
                    None,
                )
            })?;
        let index = answers.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => messages::parse_any_address(a)
                .filter(|(_, a)| *a == address)
                .map(|(index, _)| index),
            _ => None,
        });
        match index {
            Some(index) => self.link_by_index(index),
            None => Ok(None),
        }
    }

    /// Adds `route` to the main table with its protocol number, replacing a route to the
    /// same destination and metric (`NLM_F_CREATE|NLM_F_REPLACE`, whoever made it), so
    /// that it can be repeated and changed in place.
    pub fn replace_tagged_route(&mut self, route: &TaggedRoute) -> Result<()> {
        self.put_route(
            messages::tagged_route_message(route, false),
            route.to_string(),
        )
    }

    /// The main-table unicast routes of both families that carry protocol number
    /// `protocol`.
    pub fn tagged_routes(&mut self, protocol: u8) -> Result<Vec<TaggedRoute>> {
        let mut routes = self.list_routes(
            messages::route_dump_message(),
            format!("list the IPv4 routes of protocol {protocol}"),
            |r| messages::parse_tagged_route(r, protocol),
        )?;
        routes.extend(self.list_routes(
            messages::route6_dump_message(),
            format!("list the IPv6 routes of protocol {protocol}"),
            |r| messages::parse_tagged_route(r, protocol),
        )?);
        Ok(routes)
    }

    /// Deletes `route` (only a route with its protocol number). Returns `false` if there
    /// was none.
    pub fn delete_tagged_route(&mut self, route: &TaggedRoute) -> Result<bool> {
        self.remove_route(
            messages::tagged_route_message(route, true),
            route.to_string(),
        )
    }

    /// Sets interface `index` administratively up.
    pub fn set_up(&mut self, index: u32) -> Result<()> {
        let msg = RouteNetlinkMessage::NewLink(messages::set_up_message(index));
        self.request(msg, 0).map(drop).map_err(|e| {
            e.into_error(
                format!("set interface #{index} up"),
                &self.netns,
                Some(&format!("#{index}")),
            )
        })
    }

    /// Sets the largest GSO packet the stack builds for interface `index` (bytes).
    pub fn set_gso_max_size(&mut self, index: u32, size: u32) -> Result<()> {
        let msg = RouteNetlinkMessage::NewLink(messages::gso_max_size_message(index, size));
        self.request(msg, 0).map(drop).map_err(|e| {
            e.into_error(
                format!("set the GSO size of interface #{index} to {size}"),
                &self.netns,
                Some(&format!("#{index}")),
            )
        })
    }

    /// Deletes interface `index` (for a veth, both ends).
    pub fn delete_link(&mut self, index: u32) -> Result<()> {
        let msg = RouteNetlinkMessage::DelLink(messages::link_index_message(index));
        self.request(msg, 0).map(drop).map_err(|e| {
            e.into_error(
                format!("delete interface #{index}"),
                &self.netns,
                Some(&format!("#{index}")),
            )
        })
    }

    /// Deletes the interface named `name` (for a veth, both ends). Returns `false` if there
    /// was none, so that teardown can be repeated.
    pub fn delete_link_by_name(&mut self, name: &str) -> Result<bool> {
        let msg = RouteNetlinkMessage::DelLink(messages::link_name_message(name));
        match self.request(msg, 0) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.errno(), Some(libc::ENODEV | libc::ENOENT)) => Ok(false),
            Err(e) => Err(e.into_error(format!("delete interface {name}"), &self.netns, None)),
        }
    }

    /// Adds `address/prefix_len` to interface `index`. Adding an address the interface
    /// already has with the same prefix length succeeds.
    pub fn add_address(&mut self, index: u32, address: Ipv4Addr, prefix_len: u8) -> Result<()> {
        let msg =
            RouteNetlinkMessage::NewAddress(messages::address_message(index, address, prefix_len));
        match self.request(msg, NLM_F_CREATE | NLM_F_EXCL) {
            Ok(_) => Ok(()),
            // IPv4 answers EEXIST only for the same local address with the same mask.
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e.into_error(
                format!("add address {address}/{prefix_len} to interface #{index}"),
                &self.netns,
                Some(&format!("#{index}")),
            )),
        }
    }

    /// The IPv4 addresses of interface `index`, with their prefix lengths.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
        let msg = RouteNetlinkMessage::GetAddress(messages::address_dump_message());
        let answers = self.dump(msg).map_err(|e| {
            e.into_error(
                format!("list addresses of interface #{index}"),
                &self.netns,
                None,
            )
        })?;
        Ok(answers
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => messages::parse_address(a, index),
                _ => None,
            })
            .collect())
    }

    /// Adds `route` to the main table, replacing a route to the same destination
    /// (`NLM_F_CREATE|NLM_F_REPLACE`), so that it can be repeated.
    pub fn add_route(&mut self, route: &Route) -> Result<()> {
        self.put_route(messages::route_message(route, false), describe(route))
    }

    /// The IPv4 unicast routes of the main table that leave through interface `oif`.
    pub fn routes(&mut self, oif: u32) -> Result<Vec<Route>> {
        self.list_routes(
            messages::route_dump_message(),
            format!("list routes via interface #{oif}"),
            |r| messages::parse_route(r, oif),
        )
    }

    /// Deletes `route` from the main table. Returns `false` if there was no such route.
    pub fn delete_route(&mut self, route: &Route) -> Result<bool> {
        self.remove_route(messages::route_message(route, true), describe(route))
    }

    /// Adds (or replaces) the route of `msg`, described as `what` in the error.
    fn put_route(&mut self, msg: RouteMessage, what: String) -> Result<()> {
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
        .map_err(|e| e.into_error(format!("add route {what}"), &self.netns, None))
    }

    /// Dumps the routes `dump` asks for and keeps what `parse` makes of each.
    fn list_routes<T>(
        &mut self,
        dump: RouteMessage,
        what: String,
        parse: impl Fn(&RouteMessage) -> Option<T>,
    ) -> Result<Vec<T>> {
        let answers = self
            .dump(RouteNetlinkMessage::GetRoute(dump))
            .map_err(|e| e.into_error(what, &self.netns, None))?;
        Ok(answers
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => parse(r),
                _ => None,
            })
            .collect())
    }

    /// Deletes the route of `msg`; `false` if there was none.
    fn remove_route(&mut self, msg: RouteMessage, what: String) -> Result<bool> {
        match self.request(RouteNetlinkMessage::DelRoute(msg), 0) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(false),
            Err(e) => Err(e.into_error(format!("delete route {what}"), &self.netns, None)),
        }
    }

    /// Adds the IPv6 `address/prefix_len` to interface `index` with `IFA_F_NODAD`: the
    /// address is usable at once, without the second of duplicate address detection
    /// (whoever allocated it made it unique). Adding an address the interface already has
    /// with the same prefix length succeeds; with another prefix length it fails (`EEXIST`:
    /// the kernel keeps one entry per IPv6 address and interface).
    pub fn add_address6(&mut self, index: u32, address: Ipv6Addr, prefix_len: u8) -> Result<()> {
        let op = || format!("add address {address}/{prefix_len} to interface #{index}");
        let msg =
            RouteNetlinkMessage::NewAddress(messages::address6_message(index, address, prefix_len));
        match self.request(msg, NLM_F_CREATE | NLM_F_EXCL) {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == Some(libc::EEXIST) => {
                let same = self
                    .addresses6(index)?
                    .iter()
                    .any(|a| a.address == address && a.prefix_len == prefix_len);
                if same {
                    Ok(())
                } else {
                    Err(e.into_error(op(), &self.netns, Some(&format!("#{index}"))))
                }
            }
            Err(e) => Err(e.into_error(op(), &self.netns, Some(&format!("#{index}")))),
        }
    }

    /// The IPv6 addresses of interface `index` (link-local ones included), with their
    /// prefix lengths and DAD state.
    pub fn addresses6(&mut self, index: u32) -> Result<Vec<Address6>> {
        let msg = RouteNetlinkMessage::GetAddress(messages::address6_dump_message());
        let answers = self.dump(msg).map_err(|e| {
            e.into_error(
                format!("list IPv6 addresses of interface #{index}"),
                &self.netns,
                None,
            )
        })?;
        Ok(answers
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => messages::parse_address6(a, index),
                _ => None,
            })
            .collect())
    }

    /// Deletes the IPv6 `address/prefix_len` from interface `index`. Returns `false` if
    /// the interface had no such address, so that teardown can be repeated.
    pub fn delete_address6(
        &mut self,
        index: u32,
        address: Ipv6Addr,
        prefix_len: u8,
    ) -> Result<bool> {
        let msg =
            RouteNetlinkMessage::DelAddress(messages::address6_message(index, address, prefix_len));
        match self.request(msg, 0) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(e) => Err(e.into_error(
                format!("delete address {address}/{prefix_len} from interface #{index}"),
                &self.netns,
                Some(&format!("#{index}")),
            )),
        }
    }

    /// Sets how interface `index` gets its IPv6 link-local address. The kernel makes that
    /// address when the interface comes up, so this must come before [`Netlink::set_up`]
    /// to have an effect (with [`AddrGenMode::Eui64`] the link-local address is
    /// `fe80::` + the EUI-64 of the MAC whatever the namespace's default mode).
    pub fn set_addr_gen_mode(&mut self, index: u32, mode: AddrGenMode) -> Result<()> {
        let msg = RouteNetlinkMessage::NewLink(messages::addr_gen_mode_message(index, mode));
        self.request(msg, 0).map(drop).map_err(|e| {
            e.into_error(
                format!("set the IPv6 address generation mode of interface #{index} to {mode:?}"),
                &self.netns,
                Some(&format!("#{index}")),
            )
        })
    }

    /// Adds the IPv6 `route` to the main table, replacing a route to the same destination
    /// and metric (`NLM_F_CREATE|NLM_F_REPLACE`), so that it can be repeated.
    pub fn add_route6(&mut self, route: &Route6) -> Result<()> {
        self.put_route(messages::route6_message(route, false), describe6(route))
    }

    /// The IPv6 unicast routes of the main table that leave through interface `oif`
    /// (the kernel's own `fe80::/64` and address prefix routes included).
    pub fn routes6(&mut self, oif: u32) -> Result<Vec<Route6>> {
        self.list_routes(
            messages::route6_dump_message(),
            format!("list IPv6 routes via interface #{oif}"),
            |r| messages::parse_route6(r, oif),
        )
    }

    /// Deletes the IPv6 `route` from the main table. Returns `false` if there was no such
    /// route.
    pub fn delete_route6(&mut self, route: &Route6) -> Result<bool> {
        self.remove_route(messages::route6_message(route, true), describe6(route))
    }

    /// Installs `spec` as the root qdisc of interface `index` (`NLM_F_CREATE|NLM_F_REPLACE`):
    /// a Hypha `tbf` already there is changed in place, without dropping its queue; any
    /// other root qdisc is replaced.
    pub fn replace_tbf(&mut self, index: u32, spec: &TbfSpec) -> Result<()> {
        let msg = RouteNetlinkMessage::NewQueueDiscipline(qdisc::tbf_message(index, spec));
        self.request(msg, NLM_F_CREATE | NLM_F_REPLACE)
            .map(drop)
            .map_err(|e| {
                e.into_error(
                    format!(
                        "install a tbf qdisc ({} B/s, burst {} B, limit {} B) on interface #{index}",
                        spec.rate_bytes_per_sec, spec.burst_bytes, spec.limit_bytes
                    ),
                    &self.netns,
                    Some(&format!("#{index}")),
                )
            })
    }

    /// Installs or changes Hypha's per-flow queues as the root of interface `index` (see
    /// [`HtbSpec`]): the `htb` qdisc, its top class, the leaves and their `bfifo`s. An
    /// `htb` of Hypha's already there is kept and its classes and queues changed in
    /// place (nothing queued is lost); a Hypha `tbf` (an older agent's) is removed first;
    /// any other root qdisc is replaced.
    pub fn replace_htb(&mut self, index: u32, spec: &HtbSpec) -> Result<()> {
        let link = format!("#{index}");
        let root = self.root_qdisc(index)?;
        let ours = root.as_ref().is_some_and(|q| q.is_hypha());
        let is_htb = root.as_ref().is_some_and(|q| q.kind == "htb");
        if ours && !is_htb {
            self.delete_hypha_root_qdisc(index)?;
        }
        if !(ours && is_htb) {
            let msg = RouteNetlinkMessage::NewQueueDiscipline(htb::htb_qdisc_message(index, spec));
            self.request(msg, NLM_F_CREATE | NLM_F_REPLACE)
                .map_err(|e| {
                    e.into_error(
                        format!("install an htb qdisc on interface #{index}"),
                        &self.netns,
                        Some(&link),
                    )
                })?;
        }
        let top = RouteNetlinkMessage::NewTrafficClass(htb::top_class_message(index, spec));
        self.request(top, NLM_F_CREATE).map_err(|e| {
            e.into_error(
                format!(
                    "set the htb class {} ({} B/s, burst {} B) of interface #{index}",
                    spec.top(),
                    spec.rate_bytes_per_sec,
                    spec.burst_bytes
                ),
                &self.netns,
                Some(&link),
            )
        })?;
        for i in 0..spec.leaves {
            let class =
                RouteNetlinkMessage::NewTrafficClass(htb::leaf_class_message(index, spec, i));
            self.request(class, NLM_F_CREATE).map_err(|e| {
                e.into_error(
                    format!(
                        "set the htb leaf class {} ({} B/s, quantum {} B) of interface #{index}",
                        spec.leaf(i),
                        spec.leaf_rate_bytes_per_sec,
                        spec.quantum
                    ),
                    &self.netns,
                    Some(&link),
                )
            })?;
            let fifo =
                RouteNetlinkMessage::NewQueueDiscipline(htb::leaf_fifo_message(index, spec, i));
            self.request(fifo, NLM_F_CREATE | NLM_F_REPLACE)
                .map_err(|e| {
                    e.into_error(
                        format!(
                            "set the bfifo ({} B) of htb class {} of interface #{index}",
                            spec.leaf_limit_bytes,
                            spec.leaf(i)
                        ),
                        &self.netns,
                        Some(&link),
                    )
                })?;
        }
        Ok(())
    }

    /// Attaches (or swaps in place) the program `prog_fd` as the classifier of Hypha's
    /// `htb` root qdisc on interface `index`: a `cls_bpf` filter in classic mode, whose
    /// return value is the leaf class (see [`HtbSpec`]), at priority 1 handle 1.
    pub fn replace_htb_classifier(&mut self, index: u32, prog_fd: i32, name: &str) -> Result<()> {
        let parent = netlink_packet_route::tc::TcHandle {
            major: HYPHA_QDISC_MAJOR,
            minor: 0,
        };
        let msg = RouteNetlinkMessage::NewTrafficFilter(tc::bpf_classifier_message(
            index, parent, 1, 1, prog_fd, name,
        ));
        self.request(msg, NLM_F_CREATE | NLM_F_REPLACE)
            .map(drop)
            .map_err(|e| {
                e.into_error(
                    format!("attach the classifier {name} to the htb qdisc of interface #{index}"),
                    &self.netns,
                    Some(&format!("#{index}")),
                )
            })
    }

    /// Drops of each `htb` leaf class of interface `index` (by minor), from the classes'
    /// statistics; empty without Hypha's `htb`.
    pub fn htb_class_drops(&mut self, index: u32) -> Result<Vec<(u16, u64)>> {
        let msg = RouteNetlinkMessage::GetTrafficClass(htb::class_dump_message(index));
        match self.dump(msg) {
            Ok(answers) => Ok(answers
                .iter()
                .filter_map(|m| match m {
                    RouteNetlinkMessage::NewTrafficClass(c)
                        if c.header.index == index as i32
                            && c.header.handle.major == HYPHA_QDISC_MAJOR
                            && c.header.handle.minor != HTB_TOP_MINOR =>
                    {
                        Some((c.header.handle.minor, qdisc::stats_of(c).2))
                    }
                    _ => None,
                })
                .collect()),
            Err(e) if matches!(e.errno(), Some(libc::ENODEV | libc::ENOENT | libc::EINVAL)) => {
                Ok(Vec::new())
            }
            Err(e) => Err(e.into_error(
                format!("list the classes of interface #{index}"),
                &self.netns,
                None,
            )),
        }
    }

    /// The root qdisc of interface `index` with its statistics; `None` if the interface is
    /// gone.
    pub fn root_qdisc(&mut self, index: u32) -> Result<Option<Qdisc>> {
        let msg = RouteNetlinkMessage::GetQueueDiscipline(qdisc::root_qdisc_message(index, 0));
        // The kernel answers a qdisc GET only to its multicast group unless asked to echo.
        match self.request(msg, NLM_F_ECHO) {
            Ok(answers) => Ok(answers.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewQueueDiscipline(q) => qdisc::parse_root_qdisc(q, index),
                _ => None,
            })),
            Err(e) if matches!(e.errno(), Some(libc::ENODEV | libc::ENOENT)) => Ok(None),
            Err(e) => Err(e.into_error(
                format!("get the root qdisc of interface #{index}"),
                &self.netns,
                None,
            )),
        }
    }

    /// Deletes the root qdisc of interface `index` if it is Hypha's (see
    /// [`Qdisc::is_hypha_tbf`]), which gives the interface back its default qdisc.
    /// Returns whether there was one to delete; someone else's root qdisc is left alone.
    pub fn delete_hypha_root_qdisc(&mut self, index: u32) -> Result<bool> {
        if !self.root_qdisc(index)?.is_some_and(|q| q.is_hypha()) {
            return Ok(false);
        }
        let msg = RouteNetlinkMessage::DelQueueDiscipline(qdisc::root_qdisc_message(
            index,
            HYPHA_QDISC_MAJOR,
        ));
        match self.request(msg, 0) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.errno(), Some(libc::ENODEV | libc::ENOENT)) => Ok(false),
            Err(e) => Err(e.into_error(
                format!("delete the root qdisc of interface #{index}"),
                &self.netns,
                Some(&format!("#{index}")),
            )),
        }
    }

    /// Moves interface `index` into the network namespace `netns` (`path` only names it in
    /// messages).
    pub fn move_to_netns(&mut self, index: u32, netns: BorrowedFd<'_>, path: &Path) -> Result<()> {
        let msg = RouteNetlinkMessage::NewLink(messages::netns_move_message(index, netns));
        self.request(msg, 0).map(drop).map_err(|e| {
            e.into_error(
                format!("move interface #{index} into {}", path.display()),
                &self.netns,
                Some(&format!("#{index}")),
            )
        })
    }

    /// Adds the `clsact` qdisc to interface `index` (where tc filters hook its ingress and
    /// egress); one already there is kept. Returns whether it was added.
    pub fn add_clsact(&mut self, index: u32) -> Result<bool> {
        let msg = RouteNetlinkMessage::NewQueueDiscipline(tc::clsact_message(index));
        match self.request(msg, NLM_F_CREATE | NLM_F_EXCL) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e.into_error(
                format!("add a clsact qdisc to interface #{index}"),
                &self.netns,
                Some(&format!("#{index}")),
            )),
        }
    }

    /// Deletes the `clsact` qdisc of interface `index` and every filter on it; whether
    /// there was one.
    pub fn delete_clsact(&mut self, index: u32) -> Result<bool> {
        let msg = RouteNetlinkMessage::DelQueueDiscipline(tc::clsact_message(index));
        match self.request(msg, 0) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.errno(), Some(libc::ENODEV | libc::ENOENT)) => Ok(false),
            Err(e) => Err(e.into_error(
                format!("delete the clsact qdisc of interface #{index}"),
                &self.netns,
                Some(&format!("#{index}")),
            )),
        }
    }

    /// Adds `filter` to interface `index` (which needs a `clsact` qdisc), or with
    /// `replace` swaps the program of the filter with the same priority and handle in
    /// place (`NLM_F_REPLACE`: the hook never runs without it), creating it if missing.
    pub fn add_bpf_filter(
        &mut self,
        index: u32,
        filter: &BpfFilter<'_>,
        replace: bool,
    ) -> Result<()> {
        let msg = RouteNetlinkMessage::NewTrafficFilter(tc::bpf_filter_message(index, filter));
        let flags = if replace {
            NLM_F_CREATE | NLM_F_REPLACE
        } else {
            NLM_F_CREATE | NLM_F_EXCL
        };
        self.request(msg, flags).map(drop).map_err(|e| {
            e.into_error(
                format!(
                    "add bpf filter {} (prio {}, handle {}) to the {} of interface #{index}",
                    filter.name,
                    filter.priority,
                    filter.handle,
                    filter.hook.name()
                ),
                &self.netns,
                Some(&format!("#{index}")),
            )
        })
    }

    /// Deletes the filter `priority`/`handle` on `hook` of interface `index`; whether it
    /// was there.
    pub fn delete_bpf_filter(
        &mut self,
        index: u32,
        hook: TcHook,
        priority: u16,
        handle: u32,
    ) -> Result<bool> {
        let msg = RouteNetlinkMessage::DelTrafficFilter(tc::filter_delete_message(
            index, hook, priority, handle,
        ));
        match self.request(msg, 0) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.errno(), Some(libc::ENODEV | libc::ENOENT | libc::EINVAL)) => {
                Ok(false)
            }
            Err(e) => Err(e.into_error(
                format!(
                    "delete the filter prio {priority} handle {handle} on the {} of interface #{index}",
                    hook.name()
                ),
                &self.netns,
                Some(&format!("#{index}")),
            )),
        }
    }

    /// The `cls_bpf` filters on `hook` of interface `index` (none without a `clsact`).
    pub fn bpf_filters(&mut self, index: u32, hook: TcHook) -> Result<Vec<InstalledBpfFilter>> {
        let msg = RouteNetlinkMessage::GetTrafficFilter(tc::filter_dump_message(index, hook));
        match self.dump(msg) {
            Ok(answers) => Ok(answers
                .iter()
                .filter_map(|m| match m {
                    RouteNetlinkMessage::NewTrafficFilter(f) => tc::parse_bpf_filter(f),
                    _ => None,
                })
                .collect()),
            Err(e) if matches!(e.errno(), Some(libc::ENODEV | libc::ENOENT | libc::EINVAL)) => {
                Ok(Vec::new())
            }
            Err(e) => Err(e.into_error(
                format!(
                    "list the filters on the {} of interface #{index}",
                    hook.name()
                ),
                &self.netns,
                None,
            )),
        }
    }

    /// Sends a dump request and returns every answer, redoing it if a concurrent change
    /// interrupted it.
    fn dump(&mut self, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, RequestError> {
        for _ in 0..DUMP_ATTEMPTS {
            match self.exchange(msg.clone(), NLM_F_DUMP)? {
                Exchange::Complete(answers) => return Ok(answers),
                Exchange::Interrupted => continue,
            }
        }
        Err(RequestError::Protocol(format!(
            "the dump was interrupted by concurrent changes {DUMP_ATTEMPTS} times"
        )))
    }

    /// Sends a request that is not a dump and returns its answers (often none).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, RequestError> {
        match self.exchange(msg, flags)? {
            Exchange::Complete(answers) => Ok(answers),
            Exchange::Interrupted => Err(RequestError::Protocol("interrupted answer".into())),
        }
    }

    /// Sends `msg` with `NLM_F_REQUEST|NLM_F_ACK|flags` and a new sequence number, then
    /// reads until the ACK, the error or (for dumps) `NLMSG_DONE` of that sequence number.
    /// Messages with another sequence number are answers to earlier requests that were
    /// abandoned, and are skipped.
    fn exchange(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<Exchange, RequestError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let is_dump = flags & NLM_F_DUMP == NLM_F_DUMP;

        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0).map_err(RequestError::Io)?;

        let mut answers = Vec::new();
        let mut interrupted = false;
        loop {
            self.buf.clear();
            let len = self
                .socket
                .recv(&mut self.buf, libc::MSG_TRUNC)
                .map_err(RequestError::Io)?;
            if len > self.buf.len() {
                return Err(RequestError::Protocol(format!(
                    "a {len}-byte datagram did not fit the {RECV_BUFFER}-byte buffer"
                )));
            }
            let mut offset = 0;
            while offset < len {
                let bytes = &self.buf[offset..len];
                let frame = NetlinkBuffer::new_checked(bytes)
                    .map_err(|e| RequestError::Protocol(e.to_string()))?;
                let frame_len = frame.length() as usize;
                let frame_seq = frame.sequence_number();
                offset += frame_len.next_multiple_of(4);
                if frame_seq != seq {
                    continue;
                }
                if frame.flags() & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                let parsed =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..frame_len]);
                let parsed = match parsed {
                    Ok(p) => p,
                    // An entry of a dump the library cannot decode (an attribute layout it
                    // does not know) is one we do not ask about: skip it.
                    Err(_)
                        if is_dump && frame.message_type() > netlink_packet_core::NLMSG_OVERRUN =>
                    {
                        continue;
                    }
                    Err(e) => return Err(RequestError::Protocol(e.to_string())),
                };
                match parsed.payload {
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    NetlinkPayload::Error(err) => match err.code {
                        None if is_dump => {}
                        None => return Ok(Exchange::Complete(answers)),
                        Some(code) => {
                            let ext_ack = if parsed.header.flags & NLM_F_ACK_TLVS != 0 {
                                messages::ext_ack_message(
                                    &err.header,
                                    parsed.header.flags & NLM_F_CAPPED != 0,
                                )
                            } else {
                                None
                            };
                            return Err(RequestError::Errno {
                                errno: -code.get(),
                                ext_ack,
                            });
                        }
                    },
                    NetlinkPayload::Done(done) => {
                        if done.code < 0 {
                            return Err(RequestError::Errno {
                                errno: -done.code,
                                ext_ack: None,
                            });
                        }
                        return Ok(if interrupted {
                            Exchange::Interrupted
                        } else {
                            Exchange::Complete(answers)
                        });
                    }
                    NetlinkPayload::Noop => {}
                    NetlinkPayload::Overrun(_) => {
                        return Err(RequestError::Protocol("overrun".into()));
                    }
                    _ => {}
                }
            }
        }
    }
}

enum Exchange {
    Complete(Vec<RouteNetlinkMessage>),
    Interrupted,
}

/// Creates a route socket connected to the kernel, asking for capped acks with the
/// kernel's extended error messages.
fn open_socket() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    // Both are optional refinements (shorter acks, readable errors); old kernels lack them.
    let _ = socket.set_cap_ack(true);
    let _ = socket.set_ext_ack(true);
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// `ip route`-like text of a route, for messages.
fn describe6(route: &Route6) -> String {
    let mut s = route.dst.to_string();
    if let Some(gw) = route.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    s.push_str(&format!(" dev #{}", route.oif));
    if let Some(src) = route.src {
        s.push_str(&format!(" src {src}"));
    }
    s
}

fn describe(route: &Route) -> String {
    let mut s = route.dst.to_string();
    if let Some(gw) = route.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    s.push_str(&format!(" dev #{}", route.oif));
    if route.scope_link {
        s.push_str(" scope link");
    }
    if let Some(src) = route.src {
        s.push_str(&format!(" src {src}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_described_like_ip_route() {
        let route = Route {
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            oif: 3,
            scope_link: false,
            src: None,
        };
        assert_eq!(describe(&route), "0.0.0.0/0 via 10.0.0.1 dev #3");
        let route = Route {
            dst: "10.0.0.1/32".parse().unwrap(),
            gateway: None,
            oif: 3,
            scope_link: true,
            src: Some(Ipv4Addr::new(10, 0, 0, 7)),
        };
        assert_eq!(
            describe(&route),
            "10.0.0.1/32 dev #3 scope link src 10.0.0.7"
        );
    }
}
