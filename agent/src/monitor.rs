//! `hypha monitor`: drop and policy-verdict events from the datapath's ring buffer
//! (`hypha_events_v2`), fanned out to every client that watches.
//!
//! One task drains the ring buffer as the kernel signals it (epoll on the map's fd) and
//! broadcasts each event; a slow client loses events (it is told how many) rather than
//! slowing the datapath or the other clients.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{MapData, RingBuf};
use hypha_api::MonitorEvent;
use hypha_common::{
    DIR_EGRESS, DropReason, EVENT_DROP, EVENT_POLICY_ALLOW, EVENT_POLICY_AUDIT, Event,
    IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD, IDENTITY_WORLD6,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;

use crate::policy::{IdentityAllocator, IdentitySource, describe_labels};

/// Events a client may lag behind before it starts losing them.
pub const BACKLOG: usize = 4096;

/// What identity `id` stands for, as the monitor prints it: the reserved names, a label
/// identity's `namespace/{k=v,...}` (one in use here, or, in cluster mode, any number the
/// store gave, so that another node's pods are named even before their endpoints
/// arrive), a CIDR identity's `cidr:<prefix>`. `None` for 0 and numbers nobody gave.
pub fn identity_name(id: u32, identities: &IdentityAllocator) -> Option<String> {
    let reserved = match id {
        IDENTITY_HOST => Some("host"),
        IDENTITY_WORLD => Some("world"),
        IDENTITY_WORLD6 => Some("world6"),
        IDENTITY_REMOTE_NODE => Some("remote-node"),
        _ => None,
    };
    if let Some(name) = reserved {
        return Some(name.to_owned());
    }
    match identities
        .source(id)
        .or_else(|| identities.assignments().get(&id))?
    {
        IdentitySource::Labels { namespace, labels } => Some(describe_labels(namespace, labels)),
        IdentitySource::Cidr(net) => Some(format!("cidr:{net}")),
    }
}

/// Turns a raw event into what clients see; `policy_name` resolves policy ids,
/// `identity_name` security identities (see [`identity_name`]).
pub fn render(
    e: &Event,
    policy_name: impl Fn(u32) -> Option<String>,
    identity_name: impl Fn(u32) -> Option<String>,
) -> MonitorEvent {
    let kind = match e.kind {
        EVENT_DROP => "drop",
        EVENT_POLICY_ALLOW => "policy-allow",
        EVENT_POLICY_AUDIT => "policy-audit",
        _ => "unknown",
    };
    let reason = (e.kind == EVENT_DROP).then(|| {
        DropReason::from_u16(e.reason)
            .map(|r| r.name().to_owned())
            .unwrap_or_else(|| format!("unknown-{}", e.reason))
    });
    let policy = if e.policy_id == 0 {
        match e.kind {
            EVENT_DROP if e.reason == DropReason::PolicyDenied as u16 => {
                Some("no policy allows this".to_owned())
            }
            EVENT_POLICY_AUDIT => Some("no policy allows this (audit)".to_owned()),
            _ => None,
        }
    } else {
        Some(policy_name(e.policy_id).unwrap_or_else(|| format!("policy #{}", e.policy_id)))
    };
    MonitorEvent {
        kind: kind.to_owned(),
        direction: if e.direction == DIR_EGRESS {
            "egress"
        } else {
            "ingress"
        }
        .to_owned(),
        endpoint_id: e.endpoint_id,
        ifindex: e.ifindex,
        reason,
        policy,
        remote_identity: e.remote_identity,
        remote_labels: identity_name(e.remote_identity),
        protocol: protocol_name(e.proto),
        source: address(e.family, e.saddr),
        source_port: e.sport,
        destination: address(e.family, e.daddr),
        destination_port: e.dport,
        bytes: e.len,
        service: None,
    }
}

/// The service an event's flow was translated from, when its destination is a service
/// backend (the socket LB and NodePort hand the backend's address and port to the
/// policy that judges the flow): `lookup(addr, port, proto)` is
/// `Agent::service_of_backend`. Only TCP and UDP flows with a port are looked up.
pub fn service_of(e: &Event, lookup: impl Fn(IpAddr, u16, u8) -> Option<String>) -> Option<String> {
    let l4 = e.proto == crate::policy::PROTO_TCP || e.proto == crate::policy::PROTO_UDP;
    if !l4 || e.dport == 0 || !matches!(e.family, 4 | 6) {
        return None;
    }
    lookup(address(e.family, e.daddr), e.dport, e.proto)
}

/// An event's address: 16 bytes for IPv6, the first 4 for IPv4, none for a frame of no
/// family (`0.0.0.0`).
fn address(family: u8, bytes: [u8; 16]) -> IpAddr {
    match family {
        6 => IpAddr::V6(Ipv6Addr::from(bytes)),
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    }
}

fn protocol_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        0 => "-".into(),
        p => format!("proto-{p}"),
    }
}

/// Drains the ring buffer into `tx` until the process ends.
pub async fn pump(ring: RingBuf<MapData>, tx: broadcast::Sender<Event>) {
    // SAFETY: the ring buffer owns its map fd for as long as it lives, and it lives inside
    // the `AsyncFd` until the end of this function; `as_raw_fd` always returns that fd.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(
                "cannot watch the events ring buffer: {e}; hypha monitor will be silent"
            );
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("events ring buffer: {e}");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() != size_of::<Event>() {
                continue;
            }
            // SAFETY: the datapath writes whole `Event`s (length checked above);
            // `read_unaligned` copes with the ring's 8-byte alignment.
            let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) };
            // No receivers is fine: nobody is watching.
            let _ = tx.send(event);
        }
        guard.clear_ready();
    }
}

/// What a client asked to see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub endpoint: Option<u32>,
    /// The host ifindex of `endpoint`, for the drops that name their endpoint by it
    /// alone (those that are not policy verdicts carry endpoint id 0).
    pub ifindex: Option<u32>,
    /// `drop`, `policy` (allow and audit verdicts) or everything.
    pub kind: Option<String>,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        if let Some(id) = self.endpoint {
            let by_ifindex = e.endpoint_id == 0 && self.ifindex == Some(e.ifindex);
            if id != e.endpoint_id && !by_ifindex {
                return false;
            }
        }
        match self.kind.as_deref() {
            Some("drop") => e.kind == EVENT_DROP,
            Some("policy") => e.kind == EVENT_POLICY_ALLOW || e.kind == EVENT_POLICY_AUDIT,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_identity(_: u32) -> Option<String> {
        None
    }

    fn event(kind: u8, reason: u16, policy_id: u32) -> Event {
        Event {
            kind,
            direction: hypha_common::DIR_INGRESS,
            proto: 6,
            reason,
            dport: 8080,
            sport: 40000,
            endpoint_id: 3,
            policy_id,
            remote_identity: 300,
            family: 4,
            saddr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            len: 60,
            ..Event::default()
        }
    }

    #[test]
    fn drops_name_their_reason_and_policy() {
        let names = |id| (id == 9).then(|| "prod/deny-web".to_owned());
        let e = render(
            &event(EVENT_DROP, DropReason::PolicyDenyRule as u16, 9),
            names,
            no_identity,
        );
        assert_eq!(e.kind, "drop");
        assert_eq!(e.reason.as_deref(), Some("policy-deny-rule"));
        assert_eq!(e.policy.as_deref(), Some("prod/deny-web"));
        assert_eq!((e.protocol.as_str(), e.destination_port), ("tcp", 8080));
        assert_eq!(e.source, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        let e = render(
            &event(EVENT_DROP, DropReason::PolicyDenied as u16, 0),
            names,
            no_identity,
        );
        assert_eq!(e.policy.as_deref(), Some("no policy allows this"));
        let e = render(&event(EVENT_POLICY_ALLOW, 0, 4), names, no_identity);
        assert_eq!((e.kind.as_str(), e.reason), ("policy-allow", None));
        assert_eq!(e.policy.as_deref(), Some("policy #4"));
    }

    #[test]
    fn drops_that_are_not_policy_verdicts_name_their_reason_and_no_policy() {
        let spoofed = Event {
            endpoint_id: 0,
            remote_identity: 0,
            ifindex: 12,
            ..event(EVENT_DROP, DropReason::SpoofedSource as u16, 0)
        };
        let e = render(&spoofed, |_| None, no_identity);
        assert_eq!(
            (e.kind.as_str(), e.reason.as_deref(), e.policy, e.ifindex),
            ("drop", Some("spoofed-source"), None, 12)
        );
        let ipv6 = Event {
            kind: EVENT_DROP,
            reason: DropReason::UnsupportedFamily as u16,
            ifindex: 12,
            ..Event::default()
        };
        let e = render(&ipv6, |_| None, no_identity);
        assert_eq!(e.reason.as_deref(), Some("unsupported-family"));
        assert_eq!(e.protocol, "-");
    }

    #[test]
    fn ipv6_events_carry_their_addresses_and_read_bracketed_with_ports() {
        let saddr: Ipv6Addr = "fd00:10:244::2".parse().unwrap();
        let daddr: Ipv6Addr = "fd00:10:244::3".parse().unwrap();
        let e = render(
            &Event {
                family: 6,
                saddr: saddr.octets(),
                daddr: daddr.octets(),
                ..event(EVENT_DROP, DropReason::PolicyDenied as u16, 0)
            },
            |_| None,
            no_identity,
        );
        assert_eq!(
            (e.source, e.destination),
            (IpAddr::V6(saddr), IpAddr::V6(daddr))
        );
        let line = serde_json::to_string(&e).expect("serialize the event");
        assert_eq!(
            crate::cli::format_event(&line),
            "DROP (policy-denied) endpoint 3 ingress: [fd00:10:244::2]:40000 -> [fd00:10:244::3]:8080 tcp 60B identity 300 policy: no policy allows this"
        );
        // ICMPv6 has no ports: bare addresses.
        let echo = render(
            &Event {
                family: 6,
                proto: 58,
                sport: 0,
                dport: 0,
                saddr: saddr.octets(),
                daddr: daddr.octets(),
                ..event(EVENT_POLICY_ALLOW, 0, 4)
            },
            |_| Some("default/allow-ping".to_owned()),
            no_identity,
        );
        let line = serde_json::to_string(&echo).expect("serialize the event");
        assert_eq!(
            crate::cli::format_event(&line),
            "ALLOW endpoint 3 ingress: fd00:10:244::2 -> fd00:10:244::3 icmpv6 60B identity 300 policy: default/allow-ping"
        );
        // An IPv4 event keeps its first four bytes only; a frame of no family reads 0.0.0.0.
        assert_eq!(
            render(&event(EVENT_DROP, 6, 0), |_| None, no_identity).source,
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(address(0, [0xff; 16]), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }

    #[test]
    fn remote_identities_are_named_by_their_labels_even_when_only_the_store_knows_them() {
        let labels = |pairs: &[(&str, &str)]| -> crate::policy::Labels {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let mut alloc = IdentityAllocator::default();
        alloc.set_cluster(true);
        // A number the store gave labels no endpoint of this node has: another node's pod.
        alloc.assign("shop", &labels(&[("app", "client")]), 70_000);
        // Numbers in use here: a label identity (the store's) and a CIDR identity.
        alloc.assign("shop", &labels(&[("app", "web")]), 70_001);
        alloc
            .sync(
                &[("shop".to_owned(), labels(&[("app", "web")]))].into(),
                &["192.0.2.0/24".parse().unwrap()].into(),
                &Default::default(),
            )
            .unwrap();
        let name = |id| identity_name(id, &alloc);
        assert_eq!(name(70_000).as_deref(), Some("shop/{app=client}"));
        assert_eq!(name(70_001).as_deref(), Some("shop/{app=web}"));
        let cidr = alloc
            .by_source()
            .into_iter()
            .find_map(|(s, id)| matches!(s, IdentitySource::Cidr(_)).then_some(id))
            .unwrap();
        assert_eq!(name(cidr).as_deref(), Some("cidr:192.0.2.0/24"));
        assert_eq!(name(IDENTITY_REMOTE_NODE).as_deref(), Some("remote-node"));
        assert_eq!(name(IDENTITY_HOST).as_deref(), Some("host"));
        assert_eq!(name(IDENTITY_WORLD6).as_deref(), Some("world6"));
        assert_eq!(name(0), None);
        assert_eq!(name(70_002), None, "a number nobody gave");

        // A cross-node drop reads with the sender's labels and the deciding policy.
        let e = render(
            &Event {
                remote_identity: 70_000,
                ..event(EVENT_DROP, DropReason::PolicyDenied as u16, 0)
            },
            |_| None,
            name,
        );
        assert_eq!(e.remote_labels.as_deref(), Some("shop/{app=client}"));
        let line = serde_json::to_string(&e).expect("serialize the event");
        assert_eq!(
            crate::cli::format_event(&line),
            "DROP (policy-denied) endpoint 3 ingress: 10.0.0.1:40000 -> 10.0.0.2:8080 tcp 60B identity 70000 (shop/{app=client}) policy: no policy allows this"
        );
        let e = render(
            &Event {
                remote_identity: IDENTITY_REMOTE_NODE,
                ..event(EVENT_DROP, DropReason::PolicyDenyRule as u16, 9)
            },
            |id| (id == 9).then(|| "prod/no-nodes".to_owned()),
            name,
        );
        let line = serde_json::to_string(&e).expect("serialize the event");
        assert!(
            crate::cli::format_event(&line)
                .ends_with("identity 4 (remote-node) policy: prod/no-nodes"),
            "{line}"
        );
    }

    /// A verdict on a flow to a service backend names the service it was reached
    /// through; other destinations, and flows without ports, are not looked up.
    #[test]
    fn verdicts_to_a_service_backend_name_the_service() {
        let asked = std::cell::RefCell::new(Vec::new());
        let lookup = |addr: IpAddr, port: u16, proto: u8| {
            asked.borrow_mut().push((addr, port, proto));
            (addr == IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)) && port == 8080 && proto == 6)
                .then(|| "default/web 10.96.0.10:80".to_owned())
        };
        let allow = event(EVENT_POLICY_ALLOW, 0, 4);
        let mut e = render(
            &allow,
            |_| Some("default/allow-web".to_owned()),
            no_identity,
        );
        e.service = service_of(&allow, lookup);
        assert_eq!(e.service.as_deref(), Some("default/web 10.96.0.10:80"));
        assert_eq!(
            *asked.borrow(),
            [(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 8080, 6)]
        );
        let line = serde_json::to_string(&e).expect("serialize the event");
        assert_eq!(
            crate::cli::format_event(&line),
            "ALLOW endpoint 3 ingress: 10.0.0.1:40000 -> 10.0.0.2:8080 (svc default/web 10.96.0.10:80) tcp 60B identity 300 policy: default/allow-web"
        );
        // A drop on the way to a backend too.
        let drop = event(EVENT_DROP, DropReason::PolicyDenied as u16, 0);
        assert!(service_of(&drop, lookup).is_some());
        // Another port: no service.
        let other = Event {
            dport: 9090,
            ..allow
        };
        assert_eq!(service_of(&other, lookup), None);
        // ICMP and frames of no family are not looked up.
        asked.borrow_mut().clear();
        let icmp = Event {
            proto: 1,
            dport: 0,
            ..allow
        };
        assert_eq!(service_of(&icmp, lookup), None);
        let nofamily = Event { family: 0, ..allow };
        assert_eq!(service_of(&nofamily, lookup), None);
        assert!(asked.borrow().is_empty());
        // Older agents' events have no service: the line reads as before.
        let e = render(&allow, |_| None, no_identity);
        let line = serde_json::to_string(&e).expect("serialize the event");
        assert!(!line.contains("service"), "{line}");
        assert!(!crate::cli::format_event(&line).contains("svc"));
    }

    #[test]
    fn filters_by_endpoint_and_kind() {
        let drop = event(EVENT_DROP, 6, 0);
        let allow = event(EVENT_POLICY_ALLOW, 0, 1);
        let f = |endpoint, kind: Option<&str>| Filter {
            endpoint,
            ifindex: None,
            kind: kind.map(str::to_owned),
        };
        assert!(f(None, None).matches(&drop) && f(None, None).matches(&allow));
        assert!(f(Some(3), Some("drop")).matches(&drop));
        assert!(!f(Some(3), Some("drop")).matches(&allow));
        assert!(f(None, Some("policy")).matches(&allow));
        assert!(!f(Some(4), None).matches(&drop));

        // A drop that is not a policy verdict names its endpoint by ifindex.
        let spoofed = Event {
            endpoint_id: 0,
            ifindex: 12,
            ..event(EVENT_DROP, DropReason::SpoofedSource as u16, 0)
        };
        let of = |ifindex| Filter {
            endpoint: Some(4),
            ifindex,
            kind: Some("drop".to_owned()),
        };
        assert!(of(Some(12)).matches(&spoofed));
        assert!(!of(Some(13)).matches(&spoofed));
        assert!(!of(None).matches(&spoofed));
        assert!(
            !of(Some(12)).matches(&drop),
            "another endpoint's policy drop"
        );
    }
}
