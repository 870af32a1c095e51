//! Pure conversions between Hypha's option structs and rtnetlink messages, so that what
//! is sent to the kernel can be unit-tested without privileges.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVeth, InfoVxlan,
    LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
    RouteVia,
};

use crate::{
    AddrGenMode, Address6, Link, Route, Route6, RouteTarget, TaggedRoute, VethSpec, VxlanInfo,
    VxlanSpec,
};

/// `RTM_NEWLINK` body creating a veth pair: the host end named `host_name` in the socket's
/// namespace and, in its `IFLA_INFO_DATA`/`VETH_INFO_PEER`, the peer named `peer_name`
/// placed directly in `peer_netns` through `IFLA_NET_NS_FD`.
///
/// The host end's ifinfomsg carries `IFF_UP` (in flags and change mask): the kernel
/// brings it up once the pair exists, saving the `RTM_NEWLINK` that would do it later.
/// The peer's cannot: the kernel configures the peer before the two ends are linked,
/// when opening a veth fails with `ENOTCONN`.
pub(crate) fn veth_message(spec: &VethSpec<'_>) -> LinkMessage {
    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(spec.peer_name.to_owned()));
    peer.attributes
        .push(LinkAttribute::NetNsFd(spec.peer_netns.as_raw_fd()));
    if let Some(mtu) = spec.mtu {
        peer.attributes.push(LinkAttribute::Mtu(mtu));
    }
    if let Some(mac) = spec.peer_mac {
        peer.attributes.push(LinkAttribute::Address(mac.to_vec()));
    }

    let mut msg = LinkMessage::default();
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg.attributes
        .push(LinkAttribute::IfName(spec.host_name.to_owned()));
    if let Some(mtu) = spec.mtu {
        msg.attributes.push(LinkAttribute::Mtu(mtu));
    }
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    msg
}

/// `RTM_NEWLINK` body creating a dummy interface.
pub(crate) fn dummy_message(name: &str) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    msg.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Dummy,
        )]));
    msg
}

/// `RTM_NEWLINK` body creating a VXLAN device in collect-metadata (external) mode: no
/// VNI, remote, local address or lower device (each packet's tunnel key says where it
/// goes), `port` as the UDP port it sends to and listens on, learning off, and
/// `IFF_NOARP` (see [`crate::Netlink::create_vxlan`]).
pub(crate) fn vxlan_message(spec: &VxlanSpec<'_>) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.flags = LinkFlags::Noarp;
    msg.header.change_mask = LinkFlags::Noarp;
    msg.attributes
        .push(LinkAttribute::IfName(spec.name.to_owned()));
    if let Some(mtu) = spec.mtu {
        msg.attributes.push(LinkAttribute::Mtu(mtu));
    }
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Vxlan),
        LinkInfo::Data(InfoData::Vxlan(vec![
            InfoVxlan::CollectMetadata(true),
            InfoVxlan::Port(spec.port),
            InfoVxlan::Learning(false),
        ])),
    ]));
    msg
}

/// The VXLAN settings of an `RTM_NEWLINK` answer, if the interface is a VXLAN device.
pub(crate) fn parse_vxlan(msg: &LinkMessage) -> Option<VxlanInfo> {
    let mut kind_vxlan = false;
    let mut info = VxlanInfo {
        collect_metadata: false,
        port: 0,
        learning: false,
        vni: None,
        noarp: msg.header.flags.contains(LinkFlags::Noarp),
    };
    for attr in &msg.attributes {
        let LinkAttribute::LinkInfo(infos) = attr else {
            continue;
        };
        for i in infos {
            match i {
                LinkInfo::Kind(InfoKind::Vxlan) => kind_vxlan = true,
                LinkInfo::Data(InfoData::Vxlan(data)) => {
                    for d in data {
                        match d {
                            InfoVxlan::CollectMetadata(on) => info.collect_metadata = *on,
                            InfoVxlan::Port(port) => info.port = *port,
                            InfoVxlan::Learning(on) => info.learning = *on,
                            InfoVxlan::Id(vni) => info.vni = Some(*vni),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    kind_vxlan.then_some(info)
}

/// `RTM_NEWLINK` body changing the MTU of interface `index`.
pub(crate) fn mtu_message(index: u32, mtu: u32) -> LinkMessage {
    let mut msg = link_index_message(index);
    msg.attributes.push(LinkAttribute::Mtu(mtu));
    msg
}

/// `RTM_NEWLINK` body switching ARP (and IPv6 neighbour discovery) off on interface
/// `index` (`IFF_NOARP`, as `ip link set ... arp off`).
pub(crate) fn noarp_message(index: u32) -> LinkMessage {
    let mut msg = link_index_message(index);
    msg.header.flags = LinkFlags::Noarp;
    msg.header.change_mask = LinkFlags::Noarp;
    msg
}

/// `RTM_GETLINK` dump body: every interface of the namespace.
pub(crate) fn link_dump_message() -> LinkMessage {
    LinkMessage::default()
}

/// `RTM_NEWLINK` body setting interface `index` up.
pub(crate) fn set_up_message(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg
}

/// `RTM_NEWLINK` body changing the largest GSO packet the stack builds for `index`.
pub(crate) fn gso_max_size_message(index: u32, size: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes.push(LinkAttribute::GsoMaxSize(size));
    msg
}

/// `RTM_GETLINK`/`RTM_DELLINK` body selecting an interface by index.
/// `RTM_NEWLINK` moving interface `index` into the network namespace `netns`.
pub(crate) fn netns_move_message(index: u32, netns: BorrowedFd<'_>) -> LinkMessage {
    let mut msg = link_index_message(index);
    msg.attributes
        .push(LinkAttribute::NetNsFd(netns.as_raw_fd()));
    msg
}

pub(crate) fn link_index_message(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg
}

/// `RTM_GETLINK`/`RTM_DELLINK` body selecting an interface by name.
pub(crate) fn link_name_message(name: &str) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    msg
}

/// Reads a [`Link`] out of an `RTM_NEWLINK` answer.
pub(crate) fn parse_link(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: [0; 6],
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        kind: None,
        addr_gen_mode: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::Address(mac) if mac.len() == 6 => link.mac.copy_from_slice(mac),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(kind.to_string());
                    }
                }
            }
            LinkAttribute::AfSpecUnspec(specs) => {
                for spec in specs {
                    if let AfSpecUnspec::Inet6(inet6) = spec {
                        for attr in inet6 {
                            if let AfSpecInet6::AddrGenMode(mode) = attr {
                                link.addr_gen_mode = Some(from_kernel_mode(*mode));
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// `RTM_NEWADDR` body putting `address/prefix_len` on interface `index`.
pub(crate) fn address_message(index: u32, address: Ipv4Addr, prefix_len: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.prefix_len = prefix_len;
    msg.header.index = index;
    msg.attributes
        .push(AddressAttribute::Local(IpAddr::V4(address)));
    msg.attributes
        .push(AddressAttribute::Address(IpAddr::V4(address)));
    msg
}

/// `RTM_GETADDR` dump body for IPv4 addresses.
pub(crate) fn address_dump_message() -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg
}

/// The IPv4 address of an `RTM_NEWADDR` answer on interface `index`, if it is one.
pub(crate) fn parse_address(msg: &AddressMessage, index: u32) -> Option<(Ipv4Addr, u8)> {
    if msg.header.family != AddressFamily::Inet || msg.header.index != index {
        return None;
    }
    let mut local = None;
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V4(a)) => local = Some(*a),
            AddressAttribute::Address(IpAddr::V4(a)) => address = Some(*a),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on
    // point-to-point links and equal to it otherwise.
    local.or(address).map(|a| (a, msg.header.prefix_len))
}

/// `RTM_NEWLINK` body setting the IPv6 address generation mode of interface `index`
/// (`IFLA_AF_SPEC` → `AF_INET6` → `IFLA_INET6_ADDR_GEN_MODE`).
pub(crate) fn addr_gen_mode_message(index: u32, mode: AddrGenMode) -> LinkMessage {
    let mut msg = link_index_message(index);
    msg.attributes
        .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
            vec![AfSpecInet6::AddrGenMode(to_kernel_mode(mode))],
        )]));
    msg
}

fn to_kernel_mode(mode: AddrGenMode) -> In6AddrGenMode {
    match mode {
        AddrGenMode::Eui64 => In6AddrGenMode::Eui64,
        AddrGenMode::None => In6AddrGenMode::None,
        AddrGenMode::StablePrivacy => In6AddrGenMode::StablePrivacy,
        AddrGenMode::Random => In6AddrGenMode::Random,
        AddrGenMode::Other(n) => In6AddrGenMode::Other(n),
    }
}

fn from_kernel_mode(mode: In6AddrGenMode) -> AddrGenMode {
    match mode {
        In6AddrGenMode::Eui64 => AddrGenMode::Eui64,
        In6AddrGenMode::None => AddrGenMode::None,
        In6AddrGenMode::StablePrivacy => AddrGenMode::StablePrivacy,
        In6AddrGenMode::Random => AddrGenMode::Random,
        other => AddrGenMode::Other(u8::from(&other)),
    }
}

/// `RTM_NEWADDR`/`RTM_DELADDR` body for the IPv6 `address/prefix_len` on interface
/// `index`, flagged `IFA_F_NODAD` (in the header, and in `IFA_FLAGS`, which the kernel
/// reads in preference).
pub(crate) fn address6_message(index: u32, address: Ipv6Addr, prefix_len: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet6;
    msg.header.prefix_len = prefix_len;
    msg.header.index = index;
    msg.header.flags = AddressHeaderFlags::Nodad;
    msg.attributes
        .push(AddressAttribute::Local(IpAddr::V6(address)));
    msg.attributes
        .push(AddressAttribute::Address(IpAddr::V6(address)));
    msg.attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    msg
}

/// `RTM_GETADDR` dump body for IPv6 addresses.
pub(crate) fn address6_dump_message() -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet6;
    msg
}

/// The IPv6 address of an `RTM_NEWADDR` answer on interface `index`, if it is one.
pub(crate) fn parse_address6(msg: &AddressMessage, index: u32) -> Option<Address6> {
    if msg.header.family != AddressFamily::Inet6 || msg.header.index != index {
        return None;
    }
    let mut local = None;
    let mut address = None;
    // The header holds the low 8 bits of the flags; `IFA_FLAGS`, when present, all 32.
    let mut flags = AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits()));
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V6(a)) => local = Some(*a),
            AddressAttribute::Address(IpAddr::V6(a)) => address = Some(*a),
            AddressAttribute::Flags(f) => flags = *f,
            _ => {}
        }
    }
    Some(Address6 {
        address: local.or(address)?,
        prefix_len: msg.header.prefix_len,
        tentative: flags.contains(AddressFlags::Tentative),
        dad_failed: flags.contains(AddressFlags::Dadfailed),
        nodad: flags.contains(AddressFlags::Nodad),
    })
}

/// What both families' main-table unicast route messages are made of.
struct RouteParts {
    family: AddressFamily,
    prefix_len: u8,
    scope: RouteScope,
    /// `None` for a default route (no `RTA_DST`).
    dst: Option<RouteAddress>,
    gateway: Option<RouteAddress>,
    src: Option<RouteAddress>,
    oif: u32,
}

/// `RTM_NEWROUTE`/`RTM_DELROUTE` body of `parts` in the main table; `for_delete` leaves
/// the protocol as a wildcard, as `ip route del` does.
fn unicast_route_message(parts: RouteParts, for_delete: bool) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = parts.family;
    msg.header.destination_prefix_length = parts.prefix_len;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.kind = RouteType::Unicast;
    msg.header.scope = parts.scope;
    msg.header.protocol = if for_delete {
        RouteProtocol::Unspec
    } else {
        RouteProtocol::Boot
    };
    msg.attributes.extend(
        [
            parts.dst.map(RouteAttribute::Destination),
            parts.gateway.map(RouteAttribute::Gateway),
            parts.src.map(RouteAttribute::PrefSource),
        ]
        .into_iter()
        .flatten(),
    );
    msg.attributes.push(RouteAttribute::Oif(parts.oif));
    msg
}

/// `RTM_GETROUTE` dump body for the routes of `family`.
fn route_dump(family: AddressFamily) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family;
    msg
}

/// The addresses of an `RTM_NEWROUTE` answer if it is a unicast route of `family` in the
/// main table leaving through `oif`: destination (`None`: the default route), gateway,
/// preferred source.
type RouteAddresses<'a> = (
    Option<&'a RouteAddress>,
    Option<&'a RouteAddress>,
    Option<&'a RouteAddress>,
);
fn parse_unicast_route(
    msg: &RouteMessage,
    family: AddressFamily,
    oif: u32,
) -> Option<RouteAddresses<'_>> {
    let h = &msg.header;
    if h.address_family != family || h.kind != RouteType::Unicast {
        return None;
    }
    let (mut table, mut out_if) = (u32::from(h.table), 0);
    let (mut dst, mut gateway, mut src) = (None, None, None);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => dst = Some(a),
            RouteAttribute::Gateway(a) => gateway = Some(a),
            RouteAttribute::PrefSource(a) => src = Some(a),
            RouteAttribute::Oif(o) => out_if = *o,
            _ => {}
        }
    }
    (table == u32::from(RouteHeader::RT_TABLE_MAIN) && out_if == oif).then_some((dst, gateway, src))
}

fn inet(a: &RouteAddress) -> Option<Ipv4Addr> {
    match a {
        RouteAddress::Inet(a) => Some(*a),
        _ => None,
    }
}

fn inet6(a: &RouteAddress) -> Option<Ipv6Addr> {
    match a {
        RouteAddress::Inet6(a) => Some(*a),
        _ => None,
    }
}

/// `RTM_NEWROUTE`/`RTM_DELROUTE` body for the IPv6 `route` in the main table. The scope
/// is always `RT_SCOPE_UNIVERSE`: IPv6 routes have no other.
pub(crate) fn route6_message(route: &Route6, for_delete: bool) -> RouteMessage {
    unicast_route_message(
        RouteParts {
            family: AddressFamily::Inet6,
            prefix_len: route.dst.prefix_len(),
            scope: RouteScope::Universe,
            dst: (route.dst.prefix_len() > 0).then(|| RouteAddress::Inet6(route.dst.network())),
            gateway: route.gateway.map(RouteAddress::Inet6),
            src: route.src.map(RouteAddress::Inet6),
            oif: route.oif,
        },
        for_delete,
    )
}

/// `RTM_GETROUTE` dump body for IPv6 routes.
pub(crate) fn route6_dump_message() -> RouteMessage {
    route_dump(AddressFamily::Inet6)
}

/// The [`Route6`] of an `RTM_NEWROUTE` answer if it is an IPv6 unicast route of the main
/// table leaving through `oif`.
pub(crate) fn parse_route6(msg: &RouteMessage, oif: u32) -> Option<Route6> {
    let (dst, gateway, src) = parse_unicast_route(msg, AddressFamily::Inet6, oif)?;
    let dst = dst.and_then(inet6).unwrap_or(Ipv6Addr::UNSPECIFIED);
    Some(Route6 {
        dst: Ipv6Net::new(dst, msg.header.destination_prefix_length).ok()?,
        gateway: gateway.and_then(inet6),
        oif,
        src: src.and_then(inet6),
    })
}

/// `RTM_NEWROUTE`/`RTM_DELROUTE` body for `route` in the main table. `for_delete` also
/// leaves the scope as a wildcard (`RT_SCOPE_NOWHERE`), as `ip route del` does.
pub(crate) fn route_message(route: &Route, for_delete: bool) -> RouteMessage {
    let scope = match (for_delete, route.scope_link) {
        (true, _) => RouteScope::NoWhere,
        (false, true) => RouteScope::Link,
        (false, false) => RouteScope::Universe,
    };
    unicast_route_message(
        RouteParts {
            family: AddressFamily::Inet,
            prefix_len: route.dst.prefix_len(),
            scope,
            dst: (route.dst.prefix_len() > 0).then(|| RouteAddress::Inet(route.dst.network())),
            gateway: route.gateway.map(RouteAddress::Inet),
            src: route.src.map(RouteAddress::Inet),
            oif: route.oif,
        },
        for_delete,
    )
}

/// `RTM_GETROUTE` dump body for IPv4 routes.
pub(crate) fn route_dump_message() -> RouteMessage {
    route_dump(AddressFamily::Inet)
}

/// The [`Route`] of an `RTM_NEWROUTE` answer if it is an IPv4 unicast route of the main
/// table leaving through `oif`.
pub(crate) fn parse_route(msg: &RouteMessage, oif: u32) -> Option<Route> {
    let (dst, gateway, src) = parse_unicast_route(msg, AddressFamily::Inet, oif)?;
    let dst = dst.and_then(inet).unwrap_or(Ipv4Addr::UNSPECIFIED);
    Some(Route {
        dst: Ipv4Net::new(dst, msg.header.destination_prefix_length).ok()?,
        gateway: gateway.and_then(inet),
        oif,
        scope_link: msg.header.scope == RouteScope::Link,
        src: src.and_then(inet),
    })
}

/// `RTM_NEWROUTE`/`RTM_DELROUTE` body for `route` in the main table, with its protocol
/// number (a delete names it too: the kernel then deletes only a route of that
/// protocol). An IPv4 route through a device has `scope link`, one via a gateway
/// `scope global`; a delete leaves the IPv4 scope as a wildcard.
pub(crate) fn tagged_route_message(route: &TaggedRoute, for_delete: bool) -> RouteMessage {
    let (family, dst) = match route.dst {
        IpNet::V4(n) => (AddressFamily::Inet, RouteAddress::Inet(n.network())),
        IpNet::V6(n) => (AddressFamily::Inet6, RouteAddress::Inet6(n.network())),
    };
    let scope = match (&route.target, route.dst) {
        (_, IpNet::V6(_)) => RouteScope::Universe,
        _ if for_delete => RouteScope::NoWhere,
        (RouteTarget::Device { .. }, IpNet::V4(_)) => RouteScope::Link,
        (RouteTarget::Gateway(_), IpNet::V4(_)) => RouteScope::Universe,
    };
    let mut msg = RouteMessage::default();
    msg.header.address_family = family;
    msg.header.destination_prefix_length = route.dst.prefix_len();
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.kind = RouteType::Unicast;
    msg.header.scope = scope;
    msg.header.protocol = RouteProtocol::from(route.protocol);
    if route.dst.prefix_len() > 0 {
        msg.attributes.push(RouteAttribute::Destination(dst));
    }
    match route.target {
        RouteTarget::Device { oif, src } => {
            if let Some(src) = src {
                msg.attributes
                    .push(RouteAttribute::PrefSource(route_address(src)));
            }
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        // An IPv4 route via an IPv6 gateway (RFC 5549) names it in `RTA_VIA`, which
        // carries its family; IPv6 routes have no such thing (the kernel refuses).
        RouteTarget::Gateway(IpAddr::V6(gateway)) if matches!(route.dst, IpNet::V4(_)) => {
            msg.attributes
                .push(RouteAttribute::Via(RouteVia::Inet6(gateway)));
        }
        RouteTarget::Gateway(gateway) => {
            msg.attributes
                .push(RouteAttribute::Gateway(route_address(gateway)));
        }
    }
    msg
}

fn route_address(a: IpAddr) -> RouteAddress {
    match a {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// The [`TaggedRoute`] of an `RTM_NEWROUTE` answer if it is a unicast route of the main
/// table with protocol number `protocol` (either family). A route with a gateway is a
/// [`RouteTarget::Gateway`] whatever its device.
pub(crate) fn parse_tagged_route(msg: &RouteMessage, protocol: u8) -> Option<TaggedRoute> {
    let h = &msg.header;
    if h.kind != RouteType::Unicast || u8::from(h.protocol) != protocol {
        return None;
    }
    let (mut table, mut oif) = (u32::from(h.table), 0);
    let (mut dst, mut gateway, mut src) = (None, None, None);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => dst = ip_of(a),
            RouteAttribute::Gateway(a) => gateway = ip_of(a),
            RouteAttribute::Via(RouteVia::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
            RouteAttribute::Via(RouteVia::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
            RouteAttribute::PrefSource(a) => src = ip_of(a),
            RouteAttribute::Oif(o) => oif = *o,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let len = h.destination_prefix_length;
    let dst = match (h.address_family, dst) {
        (AddressFamily::Inet, Some(IpAddr::V4(a))) => IpNet::V4(Ipv4Net::new(a, len).ok()?),
        (AddressFamily::Inet, None) => IpNet::V4(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, len).ok()?),
        (AddressFamily::Inet6, Some(IpAddr::V6(a))) => IpNet::V6(Ipv6Net::new(a, len).ok()?),
        (AddressFamily::Inet6, None) => IpNet::V6(Ipv6Net::new(Ipv6Addr::UNSPECIFIED, len).ok()?),
        _ => return None,
    };
    let target = match gateway {
        Some(gateway) => RouteTarget::Gateway(gateway),
        None => RouteTarget::Device { oif, src },
    };
    Some(TaggedRoute {
        dst,
        target,
        protocol,
    })
}

/// The interface index and address of an `RTM_NEWADDR` answer, either family.
pub(crate) fn parse_any_address(msg: &AddressMessage) -> Option<(u32, IpAddr)> {
    let index = msg.header.index;
    match msg.header.family {
        AddressFamily::Inet => parse_address(msg, index).map(|(a, _)| (index, IpAddr::V4(a))),
        AddressFamily::Inet6 => parse_address6(msg, index).map(|a| (index, IpAddr::V6(a.address))),
        _ => None,
    }
}

/// The kernel's extended-ack text (`NLMSGERR_ATTR_MSG`) in the payload of an
/// `NLMSG_ERROR`, after the request's header, when the socket asked for capped acks.
pub(crate) fn ext_ack_message(error_payload: &[u8], capped: bool) -> Option<String> {
    const NLMSGERR_ATTR_MSG: u16 = 1;
    const NLMSG_HDRLEN: usize = 16;
    // With NETLINK_CAP_ACK only the request's header is echoed; otherwise the whole
    // request, whose length is in its header.
    let echoed = if capped {
        NLMSG_HDRLEN
    } else {
        let len = error_payload.get(..4)?;
        u32::from_ne_bytes(len.try_into().ok()?) as usize
    };
    let tlvs = error_payload.get(echoed.next_multiple_of(4)..)?;
    for nla in netlink_packet_core::NlasIterator::new(tlvs) {
        let nla = nla.ok()?;
        if nla.kind() == NLMSGERR_ATTR_MSG {
            let text = nla.value();
            let text = text.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, BorrowedFd};

    use netlink_packet_core::{Emitable, Parseable};
    use netlink_packet_route::link::LinkMessageBuffer;

    use super::*;
    use crate::{RouteTarget, TaggedRoute, VxlanInfo, VxlanSpec};

    fn peer_of(msg: &LinkMessage) -> &LinkMessage {
        for attr in &msg.attributes {
            if let LinkAttribute::LinkInfo(infos) = attr {
                for info in infos {
                    if let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))) = info {
                        return peer;
                    }
                }
            }
        }
        panic!("no veth peer in {msg:?}");
    }

    fn spec(fd: BorrowedFd<'_>) -> VethSpec<'_> {
        VethSpec {
            host_name: "hyp0123456789ab",
            peer_name: "eth0",
            peer_netns: fd,
            mtu: Some(1400),
            peer_mac: Some([2, 0, 0, 0, 0, 1]),
        }
    }

    #[test]
    fn veth_puts_the_peer_in_its_netns_in_one_message() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = file.as_fd();
        let msg = veth_message(&spec(fd));

        assert!(
            msg.attributes
                .contains(&LinkAttribute::IfName("hyp0123456789ab".into()))
        );
        assert!(msg.attributes.contains(&LinkAttribute::Mtu(1400)));
        // The host end stays where the socket is.
        assert!(
            !msg.attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::NetNsFd(_)))
        );
        let kind = msg.attributes.iter().any(|a| {
            matches!(a, LinkAttribute::LinkInfo(i) if i.contains(&LinkInfo::Kind(InfoKind::Veth)))
        });
        assert!(kind, "{msg:?}");

        // The host end is created up, the peer down (see `veth_message`).
        assert_eq!(msg.header.flags, LinkFlags::Up);
        assert_eq!(msg.header.change_mask, LinkFlags::Up);
        let peer = peer_of(&msg);
        assert!(peer.header.change_mask.is_empty());
        assert!(
            peer.attributes
                .contains(&LinkAttribute::IfName("eth0".into()))
        );
        assert!(
            peer.attributes
                .contains(&LinkAttribute::NetNsFd(fd.as_raw_fd()))
        );
        assert!(peer.attributes.contains(&LinkAttribute::Mtu(1400)));
        assert!(
            peer.attributes
                .contains(&LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1]))
        );
    }

    #[test]
    fn veth_message_survives_the_wire() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let msg = veth_message(&spec(file.as_fd()));
        let mut buf = vec![0; msg.buffer_len()];
        msg.emit(&mut buf);
        let parsed = LinkMessage::parse(&LinkMessageBuffer::new(&buf)).unwrap();
        assert_eq!(parsed, msg);
    }

    #[test]
    fn veth_without_options_has_no_mtu_or_mac() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut s = spec(file.as_fd());
        s.mtu = None;
        s.peer_mac = None;
        let msg = veth_message(&s);
        let peer = peer_of(&msg);
        for attrs in [&msg.attributes, &peer.attributes] {
            assert!(
                !attrs
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::Mtu(_) | LinkAttribute::Address(_)))
            );
        }
    }

    #[test]
    fn set_up_changes_only_the_up_flag() {
        let msg = set_up_message(7);
        assert_eq!(msg.header.index, 7);
        assert_eq!(msg.header.flags, LinkFlags::Up);
        assert_eq!(msg.header.change_mask, LinkFlags::Up);
        assert!(msg.attributes.is_empty());
    }

    #[test]
    fn links_are_read_from_answers() {
        let mut msg = LinkMessage::default();
        msg.header.index = 4;
        msg.header.flags = LinkFlags::Up | LinkFlags::Broadcast;
        msg.attributes = vec![
            LinkAttribute::IfName("eth0".into()),
            LinkAttribute::Address(vec![2, 1, 2, 3, 4, 5]),
            LinkAttribute::Mtu(1500),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
        ];
        assert_eq!(
            parse_link(&msg),
            Link {
                index: 4,
                name: "eth0".into(),
                mac: [2, 1, 2, 3, 4, 5],
                mtu: 1500,
                up: true,
                kind: Some("veth".into()),
                addr_gen_mode: None,
            }
        );
    }

    #[test]
    fn addresses_are_built_and_read() {
        let a = Ipv4Addr::new(10, 1, 0, 5);
        let msg = address_message(3, a, 32);
        assert_eq!(msg.header.index, 3);
        assert_eq!(msg.header.prefix_len, 32);
        assert!(
            msg.attributes
                .contains(&AddressAttribute::Local(IpAddr::V4(a)))
        );
        assert_eq!(parse_address(&msg, 3), Some((a, 32)));
        assert_eq!(parse_address(&msg, 4), None);
    }

    #[test]
    fn routes_round_trip() {
        let route = Route {
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(10, 1, 0, 1)),
            oif: 9,
            scope_link: false,
            src: Some(Ipv4Addr::new(10, 1, 0, 5)),
        };
        let msg = route_message(&route, false);
        assert_eq!(msg.header.table, RouteHeader::RT_TABLE_MAIN);
        assert_eq!(msg.header.scope, RouteScope::Universe);
        // The default route has no RTA_DST.
        assert!(
            !msg.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Destination(_)))
        );
        assert_eq!(parse_route(&msg, 9), Some(route.clone()));
        assert_eq!(parse_route(&msg, 8), None);

        let link = Route {
            dst: "10.1.0.1/32".parse().unwrap(),
            gateway: None,
            oif: 9,
            scope_link: true,
            src: None,
        };
        let msg = route_message(&link, false);
        assert_eq!(msg.header.scope, RouteScope::Link);
        assert_eq!(msg.header.destination_prefix_length, 32);
        assert_eq!(parse_route(&msg, 9), Some(link.clone()));

        let del = route_message(&link, true);
        assert_eq!(del.header.scope, RouteScope::NoWhere);
        assert_eq!(del.header.protocol, RouteProtocol::Unspec);
    }

    #[test]
    fn other_tables_are_ignored() {
        let route = Route {
            dst: "10.0.0.0/8".parse().unwrap(),
            gateway: None,
            oif: 2,
            scope_link: true,
            src: None,
        };
        let mut msg = route_message(&route, false);
        msg.header.table = 255;
        assert_eq!(parse_route(&msg, 2), None);
    }

    #[test]
    fn ext_ack_text_is_found_after_the_echoed_header() {
        let mut payload = vec![0u8; 16];
        payload[..4].copy_from_slice(&16u32.to_ne_bytes());
        let text = b"Invalid prefix\0";
        let nla_len = 4 + text.len();
        payload.extend_from_slice(&(nla_len as u16).to_ne_bytes());
        payload.extend_from_slice(&1u16.to_ne_bytes());
        payload.extend_from_slice(text);
        payload.resize(payload.len().next_multiple_of(4), 0);
        assert_eq!(
            ext_ack_message(&payload, true).as_deref(),
            Some("Invalid prefix")
        );
        assert_eq!(
            ext_ack_message(&payload, false).as_deref(),
            Some("Invalid prefix")
        );
        assert_eq!(ext_ack_message(&payload[..16], true), None);
        assert_eq!(ext_ack_message(&[], true), None);
    }

    #[test]
    fn gso_message_names_the_interface_and_size() {
        let msg = gso_max_size_message(7, 16_384);
        assert_eq!(msg.header.index, 7);
        assert_eq!(msg.attributes, vec![LinkAttribute::GsoMaxSize(16_384)]);
    }

    #[test]
    fn ipv6_addresses_are_nodad_and_read_with_their_dad_state() {
        let a: Ipv6Addr = "fd00:10:244::5".parse().unwrap();
        let msg = address6_message(3, a, 128);
        assert_eq!(msg.header.family, AddressFamily::Inet6);
        assert_eq!(msg.header.prefix_len, 128);
        assert!(msg.header.flags.contains(AddressHeaderFlags::Nodad));
        assert!(
            msg.attributes
                .contains(&AddressAttribute::Flags(AddressFlags::Nodad))
        );
        assert!(
            msg.attributes
                .contains(&AddressAttribute::Local(IpAddr::V6(a)))
        );
        let got = parse_address6(&msg, 3).unwrap();
        assert_eq!(
            got,
            Address6 {
                address: a,
                prefix_len: 128,
                tentative: false,
                dad_failed: false,
                nodad: true,
            }
        );
        assert!(got.usable());
        assert_eq!(parse_address6(&msg, 4), None);
        // An IPv4 answer is not an IPv6 address.
        let v4 = address_message(3, Ipv4Addr::new(10, 0, 0, 1), 32);
        assert_eq!(parse_address6(&v4, 3), None);
        assert_eq!(parse_address(&msg, 3), None);

        // IFA_FLAGS wins over the header's 8 bits.
        let mut tentative = msg.clone();
        tentative
            .attributes
            .retain(|a| !matches!(a, AddressAttribute::Flags(_)));
        tentative.attributes.push(AddressAttribute::Flags(
            AddressFlags::Tentative | AddressFlags::Dadfailed,
        ));
        let got = parse_address6(&tentative, 3).unwrap();
        assert!(got.tentative && got.dad_failed && !got.nodad && !got.usable());
    }

    #[test]
    fn ipv6_routes_round_trip() {
        let default = Route6 {
            dst: "::/0".parse().unwrap(),
            gateway: Some("fe80::1".parse().unwrap()),
            oif: 9,
            src: None,
        };
        let msg = route6_message(&default, false);
        assert_eq!(msg.header.address_family, AddressFamily::Inet6);
        assert_eq!(msg.header.table, RouteHeader::RT_TABLE_MAIN);
        assert_eq!(msg.header.scope, RouteScope::Universe);
        assert!(
            !msg.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Destination(_)))
        );
        assert_eq!(parse_route6(&msg, 9), Some(default.clone()));
        assert_eq!(parse_route6(&msg, 8), None);
        assert_eq!(parse_route(&msg, 9), None, "not an IPv4 route");

        let host = Route6 {
            dst: "fd00:10:244::5/128".parse().unwrap(),
            gateway: None,
            oif: 9,
            src: Some("fd00:10:244::1".parse().unwrap()),
        };
        let msg = route6_message(&host, false);
        assert_eq!(msg.header.destination_prefix_length, 128);
        assert_eq!(parse_route6(&msg, 9), Some(host.clone()));
        let del = route6_message(&host, true);
        assert_eq!(del.header.protocol, RouteProtocol::Unspec);

        let mut local = route6_message(&host, false);
        local.header.table = 255;
        assert_eq!(parse_route6(&local, 9), None, "other tables are ignored");
    }

    #[test]
    fn addr_gen_mode_is_set_and_read_through_af_spec() {
        let msg = addr_gen_mode_message(5, AddrGenMode::Eui64);
        assert_eq!(msg.header.index, 5);
        assert_eq!(
            msg.attributes,
            vec![LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::Eui64)]
            )])]
        );
        // The kernel's answer to RTM_GETLINK carries it the same way.
        let mut buf = vec![0; msg.buffer_len()];
        msg.emit(&mut buf);
        let parsed = LinkMessage::parse(&LinkMessageBuffer::new(&buf)).unwrap();
        assert_eq!(parse_link(&parsed).addr_gen_mode, Some(AddrGenMode::Eui64));
        for mode in [
            AddrGenMode::None,
            AddrGenMode::StablePrivacy,
            AddrGenMode::Random,
            AddrGenMode::Other(9),
        ] {
            let msg = addr_gen_mode_message(5, mode);
            assert_eq!(parse_link(&msg).addr_gen_mode, Some(mode));
        }
    }

    #[test]
    fn vxlan_is_external_without_learning_and_reads_back() {
        let msg = vxlan_message(&VxlanSpec {
            name: "hypha_vxlan",
            port: 8472,
            mtu: Some(1450),
        });
        assert_eq!(msg.header.flags, LinkFlags::Noarp);
        assert_eq!(msg.header.change_mask, LinkFlags::Noarp);
        assert!(msg.attributes.contains(&LinkAttribute::Mtu(1450)));
        // No VNI, remote, local address or lower device: the tunnel key says it all.
        let data = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(i) => i.iter().find_map(|i| match i {
                    LinkInfo::Data(InfoData::Vxlan(d)) => Some(d.clone()),
                    _ => None,
                }),
                _ => None,
            })
            .expect("vxlan data");
        assert_eq!(
            data,
            vec![
                InfoVxlan::CollectMetadata(true),
                InfoVxlan::Port(8472),
                InfoVxlan::Learning(false)
            ]
        );
        // What the kernel answers has the same attributes, through the wire.
        let mut buf = vec![0; msg.buffer_len()];
        msg.emit(&mut buf);
        let parsed = LinkMessage::parse(&LinkMessageBuffer::new(&buf)).unwrap();
        assert_eq!(
            parse_vxlan(&parsed),
            Some(VxlanInfo {
                collect_metadata: true,
                port: 8472,
                learning: false,
                vni: None,
                noarp: true,
            })
        );
        assert_eq!(
            parse_vxlan(&dummy_message("d0")),
            None,
            "not a VXLAN device"
        );
    }

    #[test]
    fn link_changes_touch_only_what_they_say() {
        let msg = mtu_message(4, 1450);
        assert_eq!(msg.header.index, 4);
        assert!(msg.header.change_mask.is_empty());
        assert_eq!(msg.attributes, vec![LinkAttribute::Mtu(1450)]);
        let msg = noarp_message(4);
        assert_eq!(msg.header.index, 4);
        assert_eq!(msg.header.change_mask, LinkFlags::Noarp);
        assert!(msg.attributes.is_empty());
    }

    #[test]
    fn tagged_routes_carry_their_protocol_both_ways() {
        let routes = [
            TaggedRoute {
                dst: "10.244.0.0/16".parse().unwrap(),
                target: RouteTarget::Device {
                    oif: 5,
                    src: Some("10.244.1.1".parse().unwrap()),
                },
                protocol: 201,
            },
            TaggedRoute {
                dst: "fd00:10:244::/56".parse().unwrap(),
                target: RouteTarget::Device {
                    oif: 5,
                    src: Some("fd00:10:244:1::1".parse().unwrap()),
                },
                protocol: 201,
            },
            TaggedRoute {
                dst: "10.244.2.0/24".parse().unwrap(),
                target: RouteTarget::Gateway("192.168.50.3".parse().unwrap()),
                protocol: 201,
            },
            TaggedRoute {
                dst: "fd00:10:244:2::/64".parse().unwrap(),
                target: RouteTarget::Gateway("fd00:50::3".parse().unwrap()),
                protocol: 201,
            },
            TaggedRoute {
                dst: "10.244.3.0/24".parse().unwrap(),
                target: RouteTarget::Gateway("fd00:50::4".parse().unwrap()),
                protocol: 201,
            },
        ];
        for route in &routes {
            let msg = tagged_route_message(route, false);
            assert_eq!(msg.header.protocol, RouteProtocol::Other(201), "{route}");
            assert_eq!(msg.header.table, RouteHeader::RT_TABLE_MAIN);
            assert_eq!(parse_tagged_route(&msg, 201).as_ref(), Some(route));
            assert_eq!(parse_tagged_route(&msg, 3), None, "another protocol");
            // A delete names the protocol too, so only Hypha's route goes.
            let del = tagged_route_message(route, true);
            assert_eq!(del.header.protocol, RouteProtocol::Other(201));
        }
        assert_eq!(
            tagged_route_message(&routes[0], false).header.scope,
            RouteScope::Link
        );
        assert_eq!(
            tagged_route_message(&routes[0], true).header.scope,
            RouteScope::NoWhere
        );
        assert_eq!(
            tagged_route_message(&routes[2], false).header.scope,
            RouteScope::Universe
        );
        assert!(
            !tagged_route_message(&routes[2], false)
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(_))),
            "the kernel finds the interface of a gateway"
        );
        assert_eq!(
            routes[0].to_string(),
            "10.244.0.0/16 dev #5 src 10.244.1.1 proto 201"
        );
        assert_eq!(
            routes[2].to_string(),
            "10.244.2.0/24 via 192.168.50.3 proto 201"
        );
        assert!(
            tagged_route_message(&routes[4], false)
                .attributes
                .contains(&RouteAttribute::Via(RouteVia::Inet6(
                    "fd00:50::4".parse().unwrap()
                ))),
            "an IPv6 gateway of an IPv4 route is an RTA_VIA"
        );
        // A route of another table is not one of ours.
        let mut other = tagged_route_message(&routes[2], false);
        other.header.table = 255;
        assert_eq!(parse_tagged_route(&other, 201), None);
    }

    #[test]
    fn any_address_gives_its_interface() {
        let a = Ipv4Addr::new(192, 168, 50, 2);
        assert_eq!(
            parse_any_address(&address_message(7, a, 24)),
            Some((7, IpAddr::V4(a)))
        );
        let b: Ipv6Addr = "fd00:50::2".parse().unwrap();
        assert_eq!(
            parse_any_address(&address6_message(8, b, 64)),
            Some((8, IpAddr::V6(b)))
        );
    }
}
