//! Per-endpoint counters (`hypha_ep_stats`) and drop counters (`hypha_drops`).

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_SHOT},
    programs::TcContext,
};
use hypha_common::{Counter, DIR_INGRESS, DropKey, DropReason, EVENT_DROP, EndpointStats, Event};

use crate::policy::{self, Denied, Flow};
use crate::{DROPS, EP_STATS};

/// Adds one packet of `bytes` to the counter `select` picks in the stats of the endpoint
/// whose host-side veth is `ifindex`.
///
/// The agent creates an endpoint's entry (zeroed) when it creates the endpoint and
/// deletes it with the endpoint; the datapath never creates one, so a missing entry
/// (an interface the agent does not know, or a race with deletion) is simply not
/// counted.
#[inline(always)]
pub fn count(ifindex: u32, bytes: u32, select: impl FnOnce(&mut EndpointStats) -> &mut Counter) {
    if let Some(stats) = EP_STATS.get_ptr_mut(ifindex) {
        // SAFETY: the map is per-CPU and a program runs to completion on one CPU, so no
        // one else writes this CPU's copy while we hold the reference; the pointer comes
        // from a successful lookup, so it is valid and aligned.
        add(select(unsafe { &mut *stats }), bytes);
    }
}

/// Counts a drop of `reason` for the endpoint `ifindex` in `direction`, both in its
/// `dropped` counter (via `select`) and in `hypha_drops`, and returns the verdict
/// `TC_ACT_SHOT` for the caller to return.
#[inline(always)]
pub fn count_drop(
    ctx: &TcContext,
    ifindex: u32,
    direction: u8,
    reason: DropReason,
    select: impl FnOnce(&mut EndpointStats) -> &mut Counter,
) -> i32 {
    crate::debug::note_drop(reason);
    let bytes = ctx.len();
    count(ifindex, bytes, select);

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
                None => return TC_ACT_SHOT,
            }
        }
    };
    // SAFETY: per-CPU value from a successful lookup, as in `count`.
    add(unsafe { &mut *counter }, bytes);
    TC_ACT_SHOT
}

/// Counts a flow a policy refused against the endpoint whose policy decided, in the
/// direction it decided for, and reports it to the monitor with the deciding policy.
#[inline(always)]
pub fn count_denied(ctx: &TcContext, flow: &Flow, denied: &Denied) -> i32 {
    crate::debug::note_denied(denied.policy_id, denied.endpoint_id);
    policy::emit_event(&Event {
        kind: EVENT_DROP,
        direction: denied.direction,
        proto: flow.proto,
        _pad: 0,
        reason: denied.reason as u16,
        dport: u16::from_be(flow.dport),
        sport: u16::from_be(flow.sport),
        _pad2: 0,
        ifindex: denied.ifindex,
        endpoint_id: denied.endpoint_id,
        policy_id: denied.policy_id,
        remote_identity: denied.remote_identity,
        saddr: flow.saddr,
        daddr: flow.daddr,
        len: flow.len,
    });
    if denied.direction == DIR_INGRESS {
        count_drop(ctx, denied.ifindex, denied.direction, denied.reason, |s| {
            &mut s.ingress.dropped
        })
    } else {
        count_drop(ctx, denied.ifindex, denied.direction, denied.reason, |s| {
            &mut s.egress.dropped
        })
    }
}

#[inline(always)]
fn add(counter: &mut Counter, bytes: u32) {
    counter.packets = counter.packets.wrapping_add(1);
    counter.bytes = counter.bytes.wrapping_add(u64::from(bytes));
}
