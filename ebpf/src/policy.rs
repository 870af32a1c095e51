//! Identity-based policy and connection tracking for IPv4 and IPv6 flows.
//!
//! The code is the same for both families, generic over the address type ([`Addr`]:
//! `u32` for IPv4, `[u8; 16]` for IPv6), which picks the conntrack map (`hypha_ct4`,
//! `hypha_ct6`) and the ipcache (`hypha_ipcache4`, `hypha_ipcache6`). Identities do not
//! depend on the family, so one policy entry serves both.
//!
//! A packet's flow is looked up in the family's conntrack map first: a packet of a known flow, or a
//! reply to one, passes without a policy lookup, so replies of allowed connections pass
//! and established flows survive policy changes. A new flow is checked against the
//! policy of each endpoint that enforces one in the flow's direction (the sender's
//! egress, the receiver's ingress) and, when allowed, tracked.
//!
//! Endpoints selected by no policy (no `ENDPOINT_F_*_POLICY` bit) are not tracked at all:
//! the common case stays a single map lookup.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::LruHashMap, programs::TcContext};
use hypha_common::{
    CT_CLOSING, CT_REPLIED, CT_SYN, CT_TIMEOUT_CLOSE_S, CT_TIMEOUT_OTHER_S, CT_TIMEOUT_SYN_S,
    CT_TIMEOUT_TCP_S, CtEntry, CtKey4, CtKey6, DIR_INGRESS, DropReason, ENDPOINT_F_EGRESS_AUDIT,
    ENDPOINT_F_EGRESS_POLICY, ENDPOINT_F_INGRESS_AUDIT, ENDPOINT_F_INGRESS_POLICY,
    EVENT_POLICY_ALLOW, EVENT_POLICY_AUDIT, Event, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD,
    IDENTITY_WORLD6, POLICY_DENY, POLICY_F_AUDIT, PolicyKey, PolicyStats,
};

use crate::{
    CT4, CT6, EVENTS, IPCACHE4, IPCACHE6, POLICY, POLICY_STATS, family::Family, stats::count_denied,
};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const NS_PER_S: u64 = 1_000_000_000;

/// An address of one family, as the packet has it, with what the policy code needs of
/// its family.
pub trait Addr: Copy {
    /// Key of the family's conntrack map.
    type CtKey: 'static;
    /// The family, for counters.
    const FAMILY: Family;
    /// `Event::family`.
    const EVENT_FAMILY: u8;
    /// The family's conntrack map.
    fn ct() -> &'static LruHashMap<Self::CtKey, CtEntry>;
    fn ct_key(saddr: Self, daddr: Self, sport: u16, dport: u16, proto: u8) -> Self::CtKey;
    /// The identity of the address: its longest prefix in the family's ipcache, the
    /// family's world otherwise (`IDENTITY_WORLD`, `IDENTITY_WORLD6`).
    fn identity(self) -> u32;
    /// The address as an event carries it.
    fn event_bytes(self) -> [u8; 16];
}

/// IPv4: the address in network byte order.
impl Addr for u32 {
    type CtKey = CtKey4;
    const FAMILY: Family = Family::Ipv4;
    const EVENT_FAMILY: u8 = 4;

    #[inline(always)]
    fn ct() -> &'static LruHashMap<CtKey4, CtEntry> {
        &CT4
    }

    #[inline(always)]
    fn ct_key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> CtKey4 {
        CtKey4 {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    fn identity(self) -> u32 {
        let key = aya_ebpf::maps::lpm_trie::Key::new(32, self);
        match IPCACHE4.get(&key) {
            Some(v) => v.identity,
            None => IDENTITY_WORLD,
        }
    }

    #[inline(always)]
    fn event_bytes(self) -> [u8; 16] {
        let b = self.to_ne_bytes();
        [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    }
}

/// An IPv6 address, aligned to 8 bytes so that it is copied and compared as two 64-bit
/// words (a `[u8; 16]` alone has alignment 1: the eBPF backend, which has no unaligned
/// access, would move it byte by byte, and each byte could take a stack slot of its own).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Ip6(pub [u8; 16]);

impl Ip6 {
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        // SAFETY: `Ip6` is 16 bytes aligned to 8: two `u64`s exactly.
        unsafe { *(self as *const Ip6 as *const [u64; 2]) }
    }

    #[inline(always)]
    pub fn same(&self, other: &Ip6) -> bool {
        let (a, b) = (self.words(), other.words());
        a[0] == b[0] && a[1] == b[1]
    }

    #[inline(always)]
    pub fn is_unspecified(&self) -> bool {
        let w = self.words();
        w[0] == 0 && w[1] == 0
    }
}

/// IPv6.
impl Addr for Ip6 {
    type CtKey = CtKey6;
    const FAMILY: Family = Family::Ipv6;
    const EVENT_FAMILY: u8 = 6;

    #[inline(always)]
    fn ct() -> &'static LruHashMap<CtKey6, CtEntry> {
        &CT6
    }

    #[inline(always)]
    fn ct_key(saddr: Self, daddr: Self, sport: u16, dport: u16, proto: u8) -> CtKey6 {
        CtKey6 {
            saddr: saddr.0,
            daddr: daddr.0,
            sport,
            dport,
            proto,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    fn identity(self) -> u32 {
        let key = aya_ebpf::maps::lpm_trie::Key::new(128, self.0);
        match IPCACHE6.get(&key) {
            Some(v) => v.identity,
            None => IDENTITY_WORLD6,
        }
    }

    #[inline(always)]
    fn event_bytes(self) -> [u8; 16] {
        self.0
    }
}

/// What the datapath knows of a packet's flow.
#[derive(Clone, Copy)]
pub struct Flow<A: Addr> {
    /// Addresses as in the packet.
    pub saddr: A,
    pub daddr: A,
    /// Ports as in the packet (network byte order); 0 without ports. An ICMPv6 echo
    /// request or reply has its identifier in `sport` (see `echo`).
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags, 0 for other protocols.
    pub tcp_flags: u8,
    /// An ICMPv6 echo request or reply: `sport` is the identifier, the same both ways,
    /// so the reply's key keeps it in `sport` instead of swapping it.
    pub echo: bool,
    pub len: u32,
}

/// An IPv4 flow.
pub type Flow4 = Flow<u32>;
/// An IPv6 flow.
pub type Flow6 = Flow<Ip6>;

impl<A: Addr> Flow<A> {
    /// Fills in what `event` says of this flow (seen in `direction`, as `kind`); the
    /// caller fills in who decided.
    #[inline(always)]
    pub fn describe(&self, event: &mut Event, kind: u8, direction: u8) {
        event.kind = kind;
        event.direction = direction;
        event.proto = self.proto;
        event.family = A::EVENT_FAMILY;
        event.dport = u16::from_be(self.dport);
        event.sport = u16::from_be(self.sport);
        event.len = self.len;
        event.saddr = self.saddr.event_bytes();
        event.daddr = self.daddr.event_bytes();
    }

    #[inline(always)]
    fn key(&self) -> A::CtKey {
        A::ct_key(self.saddr, self.daddr, self.sport, self.dport, self.proto)
    }

    #[inline(always)]
    fn reverse_key(&self) -> A::CtKey {
        if self.echo {
            A::ct_key(self.daddr, self.saddr, self.sport, self.dport, self.proto)
        } else {
            A::ct_key(self.daddr, self.saddr, self.dport, self.sport, self.proto)
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

/// The flags that make an endpoint's flows tracked and checked.
pub const POLICY_FLAGS: u32 = ENDPOINT_F_INGRESS_POLICY | ENDPOINT_F_EGRESS_POLICY;

/// Whether a party enforces any policy, i.e. whether its flows must be tracked.
#[inline(always)]
pub fn enforces(p: &Party) -> bool {
    p.flags & POLICY_FLAGS != 0
}

/// Checks a packet against conntrack and, for a new flow, against the sender's egress
/// policy (`sender`, when it is a local endpoint) and the receiver's ingress policy
/// (`receiver`, likewise). Tracks the flow when it passes; when it does not, counts and
/// reports the drop against the endpoint whose policy refused it (`count_denied`).
/// Returns whether the packet may pass.
///
/// Never inlined: the lookups' keys and the verdict live in a stack frame of their own,
/// not in the frame of each caller (see `stats::report_drop`).
#[inline(never)]
pub fn allow<A: Addr>(
    ctx: &TcContext,
    flow: &Flow<A>,
    sender: Option<&Party>,
    receiver: Option<&Party>,
) -> bool {
    match check(flow, sender, receiver) {
        Ok(()) => true,
        Err(denied) => {
            count_denied(ctx, flow, &denied);
            false
        }
    }
}

/// [`allow`] for a packet from another node through the tunnel to the local endpoint
/// `receiver`: the source's identity is `source` (the tunnel's VNI), not the ipcache's
/// identity of the source address, and only the receiver's ingress policy applies (the
/// sender's egress was enforced on its own node). Conntrack as in [`allow`]: a known
/// flow, or a reply to one, passes without a policy lookup; a new one that passes is
/// tracked.
#[inline(never)]
pub fn allow_from<A: Addr>(ctx: &TcContext, flow: &Flow<A>, source: u32, receiver: &Party) -> bool {
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if ct_refresh(flow, now) {
        return true;
    }
    match decide(flow, receiver, DIR_INGRESS, source) {
        Ok(policy_id) => {
            ct_create(flow, now, policy_id);
            true
        }
        Err(denied) => {
            count_denied(ctx, flow, &denied);
            false
        }
    }
}

#[inline(always)]
fn check<A: Addr>(
    flow: &Flow<A>,
    sender: Option<&Party>,
    receiver: Option<&Party>,
) -> Result<(), Denied> {
    let now = unsafe { bpf_ktime_get_ns() };
    if ct_refresh(flow, now) {
        return Ok(());
    }
    let mut policy_id = 0;
    if let Some(s) = sender {
        policy_id = decide(flow, s, hypha_common::DIR_EGRESS, flow.daddr.identity())?;
    }
    if let Some(r) = receiver {
        let id = decide(flow, r, DIR_INGRESS, flow.saddr.identity())?;
        if id != 0 {
            policy_id = id;
        }
    }
    ct_create(flow, now, policy_id);
    Ok(())
}

/// A known flow (either way) gets its timeout and TCP state refreshed.
#[inline(always)]
fn ct_refresh<A: Addr>(flow: &Flow<A>, now: u64) -> bool {
    // A connection opening (SYN without ACK) is always a new flow: a client reusing the
    // address and port pair of an earlier connection must meet today's policy, not ride
    // the old connection's entry (ports come round again after a few thousand
    // connections, and a closing entry lingers). Its entry is replaced if it passes.
    let opening = flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if opening {
        return false;
    }
    if let Some(entry) = A::ct().get_ptr_mut(flow.key()) {
        // SAFETY: a pointer from a successful lookup; concurrent updates of the same
        // entry from two CPUs only race on timestamps and flag bits, which is harmless.
        let entry = unsafe { &mut *entry };
        if entry.expires_ns > now {
            update(entry, flow.tcp_flags, false, now);
            return true;
        }
    }
    if let Some(entry) = A::ct().get_ptr_mut(flow.reverse_key()) {
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
fn ct_create<A: Addr>(flow: &Flow<A>, now: u64, policy_id: u32) {
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
    let _ = A::ct().insert(flow.key(), entry, 0);
}

/// Whether the flow `flow` (an ICMP error's quoted packet) is tracked, either way,
/// and not stale. Nothing is refreshed: an error keeps no flow alive.
#[inline(always)]
pub fn tracked<A: Addr>(flow: &Flow<A>) -> bool {
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the entries are only read, at once.
    let live = |e: Option<&CtEntry>| e.is_some_and(|e| e.expires_ns > now);
    live(unsafe { A::ct().get(flow.key()) }) || live(unsafe { A::ct().get(flow.reverse_key()) })
}

/// The verdict of `party`'s policy for a new flow in `direction` with `remote`; returns
/// the deciding policy's id (0 when the party enforces nothing in this direction).
#[inline(always)]
fn decide<A: Addr>(
    flow: &Flow<A>,
    party: &Party,
    direction: u8,
    remote: u32,
) -> Result<u32, Denied> {
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
pub fn emit<A: Addr>(
    flow: &Flow<A>,
    kind: u8,
    direction: u8,
    party: &Party,
    policy_id: u32,
    remote: u32,
) {
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
fn report_verdict<A: Addr>(flow: &Flow<A>, party: &Party, verdict: &Verdict) {
    emit_event(|event| {
        flow.describe(event, verdict.kind, verdict.direction);
        event.ifindex = party.ifindex;
        event.endpoint_id = party.endpoint_id;
        event.policy_id = verdict.policy_id;
        event.remote_identity = verdict.remote;
    });
}

///
/// The event is written in place in the ring buffer, zeroed first, then filled in by
/// `fill`: it never sits on the stack.
#[inline(always)]
pub fn emit_event(fill: impl FnOnce(&mut Event)) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: the entry is reserved for us and holds an `Event`; zeroing it first makes
    // every field (padding included) initialized before `fill` sees it as an `Event`.
    unsafe {
        core::ptr::write_bytes(event, 0, 1);
        fill(&mut *event);
    }
    entry.submit(0);
}

/// `true` for protocols whose first four L4 bytes are the source and destination ports.
#[inline(always)]
pub fn has_ports(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP
}
