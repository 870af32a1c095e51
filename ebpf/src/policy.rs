//! Identity-based policy and connection tracking for IPv4 flows.
//!
//! A packet's flow is looked up in `hypha_ct4` first: a packet of a known flow, or a
//! reply to one, passes without a policy lookup, so replies of allowed connections pass
//! and established flows survive policy changes. A new flow is checked against the
//! policy of each endpoint that enforces one in the flow's direction (the sender's
//! egress, the receiver's ingress) and, when allowed, tracked.
//!
//! Endpoints selected by no policy (no `ENDPOINT_F_*_POLICY` bit) are not tracked at all:
//! the common case stays a single map lookup.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use hypha_common::{
    CT_CLOSING, CT_REPLIED, CT_SYN, CT_TIMEOUT_CLOSE_S, CT_TIMEOUT_OTHER_S, CT_TIMEOUT_SYN_S,
    CT_TIMEOUT_TCP_S, CtEntry, CtKey4, DIR_INGRESS, DropReason, ENDPOINT_F_EGRESS_AUDIT,
    ENDPOINT_F_EGRESS_POLICY, ENDPOINT_F_INGRESS_AUDIT, ENDPOINT_F_INGRESS_POLICY,
    EVENT_POLICY_ALLOW, EVENT_POLICY_AUDIT, Event, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD,
    POLICY_DENY, POLICY_F_AUDIT, PolicyKey, PolicyStats,
};

use crate::{CT4, EVENTS, IPCACHE4, POLICY, POLICY_STATS};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const NS_PER_S: u64 = 1_000_000_000;

/// What the datapath knows of a packet's flow.
#[derive(Clone, Copy)]
pub struct Flow {
    /// Addresses in network byte order.
    pub saddr: u32,
    pub daddr: u32,
    /// Ports as in the packet (network byte order); 0 without ports.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags, 0 for other protocols.
    pub tcp_flags: u8,
    pub len: u32,
}

impl Flow {
    /// An event of `kind` about this flow, seen in `direction`; the caller fills in who
    /// decided.
    #[inline(always)]
    pub fn event(&self, kind: u8, direction: u8) -> Event {
        let mut event = Event {
            kind,
            direction,
            proto: self.proto,
            family: 4,
            dport: u16::from_be(self.dport),
            sport: u16::from_be(self.sport),
            len: self.len,
            ..Event::default()
        };
        event.saddr[..4].copy_from_slice(&self.saddr.to_ne_bytes());
        event.daddr[..4].copy_from_slice(&self.daddr.to_ne_bytes());
        event
    }

    fn key(&self) -> CtKey4 {
        CtKey4 {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    fn reverse_key(&self) -> CtKey4 {
        CtKey4 {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// An endpoint taking part in a flow, with what its policy needs.
#[derive(Clone, Copy)]
pub struct Party {
    pub endpoint_id: u32,
    pub ifindex: u32,
    pub flags: u32,
}

/// Why a flow may not pass, and who decided.
pub struct Denied {
    pub reason: DropReason,
    pub policy_id: u32,
    pub remote_identity: u32,
    pub endpoint_id: u32,
    pub ifindex: u32,
    pub direction: u8,
}

/// Whether a party enforces any policy, i.e. whether its flows must be tracked.
#[inline(always)]
pub fn enforces(p: &Party) -> bool {
    p.flags & (ENDPOINT_F_INGRESS_POLICY | ENDPOINT_F_EGRESS_POLICY) != 0
}

/// Checks a packet against conntrack and, for a new flow, against the sender's egress
/// policy (`sender`, when it is a local endpoint) and the receiver's ingress policy
/// (`receiver`, likewise). Tracks the flow when it passes.
#[inline(always)]
pub fn check(flow: &Flow, sender: Option<Party>, receiver: Option<Party>) -> Result<(), Denied> {
    let now = unsafe { bpf_ktime_get_ns() };
    if ct_refresh(flow, now) {
        return Ok(());
    }
    let mut policy_id = 0;
    if let Some(s) = sender {
        policy_id = decide(flow, &s, hypha_common::DIR_EGRESS, identity_of(flow.daddr))?;
    }
    if let Some(r) = receiver {
        let id = decide(flow, &r, DIR_INGRESS, identity_of(flow.saddr))?;
        if id != 0 {
            policy_id = id;
        }
    }
    ct_create(flow, now, policy_id);
    Ok(())
}

/// A known flow (either way) gets its timeout and TCP state refreshed.
#[inline(always)]
fn ct_refresh(flow: &Flow, now: u64) -> bool {
    // A connection opening (SYN without ACK) is always a new flow: a client reusing the
    // address and port pair of an earlier connection must meet today's policy, not ride
    // the old connection's entry (ports come round again after a few thousand
    // connections, and a closing entry lingers). Its entry is replaced if it passes.
    let opening = flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if opening {
        return false;
    }
    if let Some(entry) = CT4.get_ptr_mut(flow.key()) {
        // SAFETY: a pointer from a successful lookup; concurrent updates of the same
        // entry from two CPUs only race on timestamps and flag bits, which is harmless.
        let entry = unsafe { &mut *entry };
        if entry.expires_ns > now {
            update(entry, flow.tcp_flags, false, now);
            return true;
        }
    }
    if let Some(entry) = CT4.get_ptr_mut(flow.reverse_key()) {
        // SAFETY: as above.
        let entry = unsafe { &mut *entry };
        if entry.expires_ns > now {
            update(entry, flow.tcp_flags, true, now);
            return true;
        }
    }
    false
}

#[inline(always)]
fn update(entry: &mut CtEntry, tcp_flags: u8, reply: bool, now: u64) {
    if reply {
        entry.tcp_flags |= CT_REPLIED;
    }
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        entry.tcp_flags |= CT_CLOSING;
    }
    entry.expires_ns = now + timeout(entry.tcp_flags, tcp_flags);
}

/// TCP-state-aware timeouts: short while opening or closing, long when established.
#[inline(always)]
fn timeout(state: u8, tcp_flags: u8) -> u64 {
    let seconds = if state & CT_CLOSING != 0 {
        CT_TIMEOUT_CLOSE_S
    } else if state & CT_SYN != 0 && state & CT_REPLIED == 0 {
        CT_TIMEOUT_SYN_S
    } else if state & CT_SYN != 0 || tcp_flags & TCP_ACK != 0 {
        CT_TIMEOUT_TCP_S
    } else {
        CT_TIMEOUT_OTHER_S
    };
    seconds * NS_PER_S
}

#[inline(always)]
fn ct_create(flow: &Flow, now: u64, policy_id: u32) {
    let mut state = 0;
    if flow.proto == IPPROTO_TCP {
        state = CT_SYN;
        if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            state |= CT_CLOSING;
        }
    }
    let entry = CtEntry {
        expires_ns: now + timeout(state, flow.tcp_flags & !TCP_SYN),
        policy_id,
        tcp_flags: state,
        _pad: [0; 3],
    };
    // LRU: a full table evicts the least recently used flow rather than failing.
    let _ = CT4.insert(flow.key(), entry, 0);
}

/// The identity of an address: the longest prefix in `hypha_ipcache4`, world otherwise.
#[inline(always)]
fn identity_of(addr: u32) -> u32 {
    let key = aya_ebpf::maps::lpm_trie::Key::new(32, addr);
    match IPCACHE4.get(&key) {
        Some(v) => v.identity,
        None => IDENTITY_WORLD,
    }
}

/// The verdict of `party`'s policy for a new flow in `direction` with `remote`; returns
/// the deciding policy's id (0 when the party enforces nothing in this direction).
#[inline(always)]
fn decide(flow: &Flow, party: &Party, direction: u8, remote: u32) -> Result<u32, Denied> {
    let (enforced, audit) = if direction == DIR_INGRESS {
        (ENDPOINT_F_INGRESS_POLICY, ENDPOINT_F_INGRESS_AUDIT)
    } else {
        (ENDPOINT_F_EGRESS_POLICY, ENDPOINT_F_EGRESS_AUDIT)
    };
    if party.flags & enforced == 0 {
        return Ok(0);
    }
    // The node may always reach its pods (health checks), as with Cilium's default.
    if direction == DIR_INGRESS && remote == IDENTITY_HOST {
        return Ok(0);
    }
    let dport = u16::from_be(flow.dport);
    let keys = [
        (remote, flow.proto, dport),
        (remote, flow.proto, 0),
        (remote, 0, 0),
        (IDENTITY_ANY, flow.proto, dport),
        (IDENTITY_ANY, flow.proto, 0),
        (IDENTITY_ANY, 0, 0),
    ];
    let mut allowed: Option<u32> = None;
    let mut audited_deny: Option<u32> = None;
    for (identity, proto, port) in keys {
        let key = PolicyKey {
            endpoint_id: party.endpoint_id,
            identity,
            dport: port,
            proto,
            direction,
        };
        // SAFETY: the value is copied out before any other map operation.
        let Some(entry) = (unsafe { POLICY.get(key) }).copied() else {
            continue;
        };
        if entry.action == POLICY_DENY {
            if entry.flags & POLICY_F_AUDIT == 0 {
                count_policy(entry.policy_id, |s| &mut s.denied);
                return Err(Denied {
                    reason: DropReason::PolicyDenyRule,
                    policy_id: entry.policy_id,
                    remote_identity: remote,
                    endpoint_id: party.endpoint_id,
                    ifindex: party.ifindex,
                    direction,
                });
            }
            audited_deny.get_or_insert(entry.policy_id);
        } else if allowed.is_none() {
            allowed = Some(entry.policy_id);
        }
    }
    if let Some(policy_id) = audited_deny {
        count_policy(policy_id, |s| &mut s.audited);
        emit(
            flow,
            EVENT_POLICY_AUDIT,
            direction,
            party,
            policy_id,
            remote,
        );
        return Ok(policy_id);
    }
    match allowed {
        Some(policy_id) => {
            count_policy(policy_id, |s| &mut s.allowed);
            emit(
                flow,
                EVENT_POLICY_ALLOW,
                direction,
                party,
                policy_id,
                remote,
            );
            Ok(policy_id)
        }
        None if party.flags & audit != 0 => {
            emit(flow, EVENT_POLICY_AUDIT, direction, party, 0, remote);
            Ok(0)
        }
        None => Err(Denied {
            reason: DropReason::PolicyDenied,
            policy_id: 0,
            remote_identity: remote,
            endpoint_id: party.endpoint_id,
            ifindex: party.ifindex,
            direction,
        }),
    }
}

#[inline(always)]
fn count_policy(policy_id: u32, select: impl FnOnce(&mut PolicyStats) -> &mut u64) {
    if policy_id == 0 {
        return;
    }
    let ptr = match POLICY_STATS.get_ptr_mut(policy_id) {
        Some(p) => p,
        None => {
            let _ = POLICY_STATS.insert(
                policy_id,
                PolicyStats::default(),
                u64::from(aya_ebpf::bindings::BPF_NOEXIST),
            );
            match POLICY_STATS.get_ptr_mut(policy_id) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU value from a successful lookup.
    let v = select(unsafe { &mut *ptr });
    *v = v.wrapping_add(1);
}

/// Sends an event to `hypha monitor`; when the ring buffer is full the event is lost
/// (the counters still have it).
#[inline(always)]
pub fn emit(flow: &Flow, kind: u8, direction: u8, party: &Party, policy_id: u32, remote: u32) {
    let verdict = Verdict {
        kind,
        direction,
        _pad: 0,
        policy_id,
        remote,
    };
    report_verdict(flow, party, &verdict);
}

/// What [`report_verdict`] reports besides the flow and the party (a BPF-to-BPF call
/// takes at most five arguments).
struct Verdict {
    kind: u8,
    direction: u8,
    _pad: u16,
    policy_id: u32,
    remote: u32,
}

/// Builds and sends a policy verdict's event. Never inlined, so that the event is not in
/// the caller's stack frame once per verdict (see `stats::report_drop`).
#[inline(never)]
fn report_verdict(flow: &Flow, party: &Party, verdict: &Verdict) {
    let mut event = flow.event(verdict.kind, verdict.direction);
    event.ifindex = party.ifindex;
    event.endpoint_id = party.endpoint_id;
    event.policy_id = verdict.policy_id;
    event.remote_identity = verdict.remote;
    emit_event(&event);
}

#[inline(always)]
pub fn emit_event(event: &Event) {
    let _ = EVENTS.output::<Event>(event, 0);
}

/// `true` for protocols whose first four L4 bytes are the source and destination ports.
#[inline(always)]
pub fn has_ports(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP
}
