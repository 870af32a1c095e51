//! Per-endpoint counters per family (`hypha_ep_stats_v3`), drop counters
//! (`hypha_drops`) and drop events for `hypha monitor`, rate limited by
//! `hypha_drop_events`.
//!
//! A frame is counted in the family of its EtherType ([`Family`]): IPv4 and ARP in
//! `ipv4`, IPv6 (neighbour discovery included) in `ipv6`, and `None` (runts, unknown
//! EtherTypes) in `other`.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use hypha_common::{
    Counter, DIR_INGRESS, DROP_EVENTS_BURST, DROP_EVENTS_PER_S, DropKey, DropReason, EVENT_DROP,
    Event, EventBudget, FamilyStats, NodeStats,
};

use crate::family::Family;
use crate::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6};
use crate::policy::{self, Addr, Denied, Flow};
use crate::{DROP_EVENTS, DROPS, EP_STATS, NODE_STATS};

/// Nanoseconds it takes a drop-event budget to earn one event back.
const NS_PER_EVENT: u64 = 1_000_000_000 / DROP_EVENTS_PER_S;

/// Adds one packet of `bytes` to the counter `select` picks in the `family` stats of the
/// endpoint whose host-side veth is `ifindex` (`None`: the `other` counters).
///
/// The agent creates an endpoint's entry (zeroed) when it creates the endpoint and
/// deletes it with the endpoint; the datapath never creates one, so a missing entry
/// (an interface the agent does not know, or a race with deletion) is simply not
/// counted.
#[inline(always)]
pub fn count(
    ifindex: u32,
    family: Option<Family>,
    bytes: u32,
    select: impl FnOnce(&mut FamilyStats) -> &mut Counter,
) {
    if let Some(stats) = EP_STATS.get_ptr_mut(ifindex) {
        // SAFETY: the map is per-CPU and a program runs to completion on one CPU, so no
        // one else writes this CPU's copy while we hold the reference; the pointer comes
        // from a successful lookup, so it is valid and aligned.
        let stats = unsafe { &mut *stats };
        let family = match family {
            Some(Family::Ipv4) => &mut stats.ipv4,
            Some(Family::Ipv6) => &mut stats.ipv6,
            None => &mut stats.other,
        };
        add(select(family), bytes);
    }
}

/// Adds one packet of `bytes` to the counter `select` picks in the `hypha_node_stats`
/// entry of the node `node_id`. The agent creates a node's entry when it routes to the
/// node; the datapath never creates one, so a node without one is not counted.
#[inline(always)]
pub fn count_node(node_id: u32, bytes: u32, select: impl FnOnce(&mut NodeStats) -> &mut Counter) {
    if let Some(stats) = NODE_STATS.get_ptr_mut(node_id) {
        // SAFETY: as in `count`: a per-CPU value from a successful lookup.
        add(select(unsafe { &mut *stats }), bytes);
    }
}

/// Counts a drop of `reason` for the endpoint `ifindex` in `direction`, both in its
/// `dropped` counter (via `select`) and in `hypha_drops`, reports it to the monitor
/// (within the key's event budget), and returns the verdict `TC_ACT_SHOT` for the caller
/// to return.
///
/// This is the one place every drop that is not a policy verdict goes through
/// ([`count_denied`] reports those with the deciding policy).
#[inline(always)]
pub fn count_drop(
    ctx: &TcContext,
    ifindex: u32,
    direction: u8,
    family: Option<Family>,
    reason: DropReason,
    select: impl FnOnce(&mut FamilyStats) -> &mut Counter,
) -> i32 {
    let key = record_drop(ctx, ifindex, direction, family, reason, select);
    if may_report(&key) {
        report_drop(ctx, ifindex, direction, reason);
    }
    TC_ACT_SHOT
}

/// Counts a drop in the endpoint's counters and `hypha_drops`; returns its key.
#[inline(always)]
fn record_drop(
    ctx: &TcContext,
    ifindex: u32,
    direction: u8,
    family: Option<Family>,
    reason: DropReason,
    select: impl FnOnce(&mut FamilyStats) -> &mut Counter,
) -> DropKey {
    crate::debug::note_drop(reason);
    let bytes = ctx.len();
    count(ifindex, family, bytes, select);

    let key = DropKey {
        ifindex,
        reason: reason as u16,
        direction,
        _pad: 0,
    };
    let counter = match DROPS.get_ptr_mut(key) {
        Some(counter) => counter,
        None => {
            // First drop of this kind for this endpoint. BPF_NOEXIST: if another CPU
            // created the entry in the meantime, keep its counts (an update of a per-CPU
            // entry would reset every CPU's copy). Either way, look it up again.
            let zero = Counter {
                packets: 0,
                bytes: 0,
            };
            let _ = DROPS.insert(key, zero, u64::from(BPF_NOEXIST));
            match DROPS.get_ptr_mut(key) {
                Some(counter) => counter,
                // The map is full: the endpoint's `dropped` counter still saw it.
                None => return key,
            }
        }
    };
    // SAFETY: per-CPU value from a successful lookup, as in `count`.
    add(unsafe { &mut *counter }, bytes);
    key
}

/// Takes one event from the budget of `key` (a token bucket in `hypha_drop_events`, see
/// `EventBudget`); `false` when it is spent.
#[inline(always)]
fn may_report(key: &DropKey) -> bool {
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(budget) = DROP_EVENTS.get_ptr_mut(key) else {
        // First drop of this kind (or its budget was evicted): a full budget, less this
        // event. LRU: a full map evicts the least recently used budget, so the insert
        // fails only when the kernel cannot allocate; the next drop then tries again.
        let budget = EventBudget {
            refilled_ns: now,
            tokens: DROP_EVENTS_BURST - 1,
            _pad: 0,
        };
        let _ = DROP_EVENTS.insert(key, budget, 0);
        return true;
    };
    // SAFETY: a pointer from a successful lookup. Two CPUs updating one budget at once
    // may both spend the same token: a few more events, never fewer counts.
    let budget = unsafe { &mut *budget };
    let elapsed = now.saturating_sub(budget.refilled_ns);
    let earned = elapsed / NS_PER_EVENT;
    if earned > 0 {
        let tokens = u64::from(budget.tokens) + earned;
        if tokens >= u64::from(DROP_EVENTS_BURST) {
            budget.tokens = DROP_EVENTS_BURST;
            budget.refilled_ns = now;
        } else {
            budget.tokens = tokens as u32;
            // Keep the fraction of a token earned so far.
            budget.refilled_ns += earned * NS_PER_EVENT;
        }
    }
    if budget.tokens == 0 {
        return false;
    }
    budget.tokens -= 1;
    true
}

/// Sends a drop event for a frame dropped before (or without) a policy verdict: what
/// can be read of its IPv4 or IPv6 header with `bpf_skb_load_bytes`, zeros for other
/// frames.
///
/// Never inlined, like every function that builds an [`Event`]: a BPF-to-BPF call has a
/// stack frame of its own, so the event is not in the frame of each program's main
/// function once per place that drops (the stacks of a call chain must fit in 512 bytes
/// together, and the debug functions need their share).
#[inline(never)]
fn report_drop(ctx: &TcContext, ifindex: u32, direction: u8, reason: DropReason) {
    policy::emit_event(|event| {
        event.kind = EVENT_DROP;
        event.direction = direction;
        event.reason = reason as u16;
        event.ifindex = ifindex;
        event.len = ctx.len();
        match ctx.load::<[u8; 2]>(12).map(u16::from_be_bytes) {
            Ok(ETH_P_IP) => ipv4_drop_event(ctx, event),
            Ok(ETH_P_IPV6) => ipv6_drop_event(ctx, event),
            _ => {}
        }
    });
}

/// Fills in what an IPv4 header says (addresses, protocol, ports of a first fragment).
#[inline(always)]
fn ipv4_drop_event(ctx: &TcContext, event: &mut Event) {
    // version/IHL .. destination address: the fixed 20 bytes.
    let Ok(ip) = ctx.load::<[u8; 20]>(ETH_HLEN) else {
        return;
    };
    event.family = 4;
    event.proto = ip[9];
    event.saddr[..4].copy_from_slice(&ip[12..16]);
    event.daddr[..4].copy_from_slice(&ip[16..20]);
    let first_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0;
    if first_fragment && policy::has_ports(event.proto) {
        let l4 = ETH_HLEN + usize::from(ip[0] & 0x0f) * 4;
        if let Ok(ports) = ctx.load::<[u8; 4]>(l4) {
            event.sport = u16::from_be_bytes([ports[0], ports[1]]);
            event.dport = u16::from_be_bytes([ports[2], ports[3]]);
        }
    }
}

/// Fills in what a fixed IPv6 header says: the addresses and its next header (the
/// extension headers are not walked for an event).
#[inline(always)]
fn ipv6_drop_event(ctx: &TcContext, event: &mut Event) {
    let Ok(next_header) = ctx.load::<u8>(ETH_HLEN + 6) else {
        return;
    };
    let (Ok(saddr), Ok(daddr)) = (
        ctx.load::<[u8; 16]>(ETH_HLEN + 8),
        ctx.load::<[u8; 16]>(ETH_HLEN + 24),
    ) else {
        return;
    };
    event.family = 6;
    event.proto = next_header;
    event.saddr = saddr;
    event.daddr = daddr;
}

/// Counts a flow a policy refused against the endpoint whose policy decided, in the
/// direction it decided for, and reports it to the monitor with the deciding policy
/// (within the same event budget as every other drop).
#[inline(always)]
pub fn count_denied<A: Addr>(ctx: &TcContext, flow: &Flow<A>, denied: &Denied) -> i32 {
    crate::debug::note_denied(denied.policy_id, denied.endpoint_id);
    let family = Some(A::FAMILY);
    let key = if denied.direction == DIR_INGRESS {
        record_drop(
            ctx,
            denied.ifindex,
            denied.direction,
            family,
            denied.reason,
            |s| &mut s.ingress.dropped,
        )
    } else {
        record_drop(
            ctx,
            denied.ifindex,
            denied.direction,
            family,
            denied.reason,
            |s| &mut s.egress.dropped,
        )
    };
    if may_report(&key) {
        report_denied(flow, denied);
    }
    TC_ACT_SHOT
}

/// Sends the drop event of a flow a policy refused (out of line, see [`report_drop`]).
#[inline(never)]
fn report_denied<A: Addr>(flow: &Flow<A>, denied: &Denied) {
    policy::emit_event(|event| {
        flow.describe(event, EVENT_DROP, denied.direction);
        event.reason = denied.reason as u16;
        event.ifindex = denied.ifindex;
        event.endpoint_id = denied.endpoint_id;
        event.policy_id = denied.policy_id;
        event.remote_identity = denied.remote_identity;
    });
}

#[inline(always)]
fn add(counter: &mut Counter, bytes: u32) {
    counter.packets = counter.packets.wrapping_add(1);
    counter.bytes = counter.bytes.wrapping_add(u64::from(bytes));
}
