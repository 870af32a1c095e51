//! Per-endpoint packet tracing through aya-log (`hypha endpoint debug ENDPOINT on`).
//!
//! For an endpoint listed in `hypha_debug`, each program run logs what it received
//! (family, protocol, addresses and ports) and its verdict (to the host stack,
//! redirected to which pod, answered, dropped for which reason and by which policy).
//! The agent reads the lines from the `AYA_LOGS` ring buffer into its log.
//!
//! Cost when no endpoint is traced: [`Trace::start`] reads `NodeConfig::flags` (an array
//! lookup the verifier inlines) and stops there; [`note_drop`], [`note_denied`] and
//! [`note_redirect`] do the same. The logging itself is in functions that are never
//! inlined, out of the forwarding path.
//!
//! The verdict's details (drop reason, policy, redirect target) are left by the code
//! that decides them in a per-CPU note, read back when the program returns: a TC
//! program runs to completion on one CPU, so the note is this packet's.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use aya_log_ebpf::info;
use hypha_common::{
    DropReason, MAX_ENDPOINTS,
    debug::{MAP, NODE_F_DEBUG},
};

use crate::CONFIG;

/// Host-side ifindex → endpoint id of the traced endpoints. Written by the agent.
#[map(name = "hypha_debug")]
static DEBUG: HashMap<u32, u32> = HashMap::pinned(MAX_ENDPOINTS, 0);

/// This CPU's note of the current packet's verdict. Private to the programs.
#[map(name = "hypha_debug_note")]
static NOTE: PerCpuArray<Note> = PerCpuArray::with_max_entries(1, 0);

const _: () = assert!(crate::str_eq(MAP, "hypha_debug"));

#[derive(Clone, Copy)]
#[repr(C)]
struct Note {
    /// A `DropReason` code, 0 when nothing dropped the packet.
    reason: u32,
    /// ifindex of the pod the packet was redirected to, 0 when none.
    target: u32,
    /// The policy that refused it and the endpoint whose policy that was.
    policy_id: u32,
    policy_endpoint: u32,
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;

/// Whether some endpoint is traced at all.
#[inline(always)]
fn any() -> bool {
    CONFIG.get(0).is_some_and(|c| c.flags & NODE_F_DEBUG != 0)
}

/// The traced endpoint on `ifindex`, if it is traced.
#[inline(always)]
fn traced(ifindex: u32) -> Option<u32> {
    if !any() {
        return None;
    }
    // SAFETY: the value is copied out at once.
    unsafe { DEBUG.get(&ifindex).copied() }
}

/// Which program is tracing.
#[derive(Clone, Copy)]
pub enum Hook {
    /// `hypha_from_pod`: what the pod sends.
    FromPod,
    /// `hypha_to_pod`: what the host stack delivers to the pod.
    ToPod,
}

impl Hook {
    /// `tx` (the pod sends) or `rx` (the pod receives). Both words have the same length,
    /// so the log record copies a constant number of bytes whichever it is.
    #[inline(always)]
    fn word(self) -> &'static str {
        match self {
            Hook::FromPod => "tx",
            Hook::ToPod => "rx",
        }
    }
}

/// One program run of a traced endpoint, or nothing.
#[derive(Clone, Copy)]
pub struct Trace {
    endpoint: Option<u32>,
    hook: Hook,
}

impl Trace {
    /// At the start of a program run on the host veth `ctx` is on: logs what arrived
    /// when its endpoint is traced.
    #[inline(always)]
    pub fn start(ctx: &TcContext, hook: Hook) -> Trace {
        // SAFETY: `ifindex` is a readable field of the context the kernel passed.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let endpoint = traced(ifindex);
        if let Some(id) = endpoint {
            clear_note();
            received(ctx, id, hook);
        }
        Trace { endpoint, hook }
    }

    /// At the end of the run: logs the verdict `action` with the note's details.
    #[inline(always)]
    pub fn verdict(self, ctx: &TcContext, action: i32) {
        if let Some(id) = self.endpoint {
            verdict(ctx, id, self.hook, action);
        }
    }
}

#[inline(always)]
fn clear_note() {
    if let Some(note) = NOTE.get_ptr_mut(0) {
        // SAFETY: this CPU's copy, from a successful lookup; nothing else runs on this
        // CPU while the program does.
        unsafe {
            *note = Note {
                reason: 0,
                target: 0,
                policy_id: 0,
                policy_endpoint: 0,
            }
        };
    }
}

#[inline(always)]
fn with_note(f: impl FnOnce(&mut Note)) {
    if let Some(note) = NOTE.get_ptr_mut(0) {
        // SAFETY: as in `clear_note`.
        f(unsafe { &mut *note });
    }
}

/// The packet is dropped for `reason` (called where drops are counted).
#[inline(always)]
pub fn note_drop(reason: DropReason) {
    if any() {
        with_note(|n| n.reason = reason as u32);
    }
}

/// A policy, of endpoint `endpoint_id`, refused the packet.
#[inline(always)]
pub fn note_denied(policy_id: u32, endpoint_id: u32) {
    if any() {
        with_note(|n| {
            n.policy_id = policy_id;
            n.policy_endpoint = endpoint_id;
        });
    }
}

/// The packet from the pod on `from` goes to the pod on `to`. When the receiver is
/// traced, its trace gets the packet here: `bpf_redirect_peer` skips its own hook.
#[inline(always)]
pub fn note_redirect(ctx: &TcContext, from: u32, to: u32) {
    if any() {
        with_note(|n| n.target = to);
        if let Some(id) = traced(to) {
            redirected_in(ctx, id, from);
        }
    }
}

#[inline(never)]
fn redirected_in(ctx: &TcContext, id: u32, from: u32) {
    info!(
        ctx,
        "endpoint {} receives from the pod on ifindex {}, redirected pod to pod:", id, from
    );
    received(ctx, id, Hook::ToPod);
}

#[inline(never)]
fn received(ctx: &TcContext, id: u32, hook: Hook) {
    let len = ctx.len();
    let Ok(ether_type) = ctx.load::<[u8; 2]>(12) else {
        info!(
            ctx,
            "endpoint {} {} frame of {} bytes, too short for Ethernet",
            id,
            hook.word(),
            len
        );
        return;
    };
    let dir = hook.word();
    match u16::from_be_bytes(ether_type) {
        ETH_P_IP => {
            let Ok(ip) = ctx.load::<[u8; 20]>(ETH_HLEN) else {
                info!(ctx, "endpoint {} {} IPv4 truncated, {} bytes", id, dir, len);
                return;
            };
            let proto = ip[9];
            let saddr = [ip[12], ip[13], ip[14], ip[15]];
            let daddr = [ip[16], ip[17], ip[18], ip[19]];
            let l4 = ETH_HLEN + usize::from(ip[0] & 0x0f) * 4;
            let ports = match proto {
                6 | 17 | 132 => ctx.load::<[u8; 4]>(l4).unwrap_or([0; 4]),
                _ => [0; 4],
            };
            let sport = u16::from_be_bytes([ports[0], ports[1]]);
            let dport = u16::from_be_bytes([ports[2], ports[3]]);
            info!(
                ctx,
                "endpoint {} {} IPv4 proto {} {:i}:{} -> {:i}:{} ttl {} len {}",
                id,
                dir,
                proto,
                saddr,
                sport,
                daddr,
                dport,
                ip[8],
                len
            );
        }
        ETH_P_IPV6 => {
            let Ok(ip) = ctx.load::<[u8; 40]>(ETH_HLEN) else {
                info!(ctx, "endpoint {} {} IPv6 truncated, {} bytes", id, dir, len);
                return;
            };
            let mut saddr = [0u8; 16];
            let mut daddr = [0u8; 16];
            saddr.copy_from_slice(&ip[8..24]);
            daddr.copy_from_slice(&ip[24..40]);
            info!(
                ctx,
                "endpoint {} {} IPv6 next header {} {:i} -> {:i} len {}",
                id,
                dir,
                ip[6],
                saddr,
                daddr,
                len
            );
        }
        ETH_P_ARP => {
            let Ok(arp) = ctx.load::<[u8; 28]>(ETH_HLEN) else {
                info!(ctx, "endpoint {} {} ARP truncated, {} bytes", id, dir, len);
                return;
            };
            let op = u16::from_be_bytes([arp[6], arp[7]]);
            let spa = [arp[14], arp[15], arp[16], arp[17]];
            let tpa = [arp[24], arp[25], arp[26], arp[27]];
            info!(
                ctx,
                "endpoint {} {} ARP op {} sender {:i} target {:i}", id, dir, op, spa, tpa
            );
        }
        other => {
            info!(
                ctx,
                "endpoint {} {} ethertype {:x} len {}", id, dir, other, len
            );
        }
    }
}

#[inline(never)]
fn verdict(ctx: &TcContext, id: u32, hook: Hook, action: i32) {
    let dir = hook.word();
    let Some(note) = NOTE.get(0).copied() else {
        info!(ctx, "endpoint {} {} verdict {}", id, dir, action);
        return;
    };
    match action {
        TC_ACT_OK => match hook {
            Hook::FromPod => info!(ctx, "endpoint {} tx verdict: to the host stack", id),
            Hook::ToPod => info!(ctx, "endpoint {} rx verdict: delivered to the pod", id),
        },
        TC_ACT_REDIRECT if note.target != 0 => info!(
            ctx,
            "endpoint {} {} verdict: redirected to the pod on ifindex {}", id, dir, note.target
        ),
        TC_ACT_REDIRECT => info!(
            ctx,
            "endpoint {} {} verdict: answered, sent back to the pod", id, dir
        ),
        TC_ACT_SHOT if note.policy_id != 0 || note.policy_endpoint != 0 => info!(
            ctx,
            "endpoint {} {} verdict: dropped, reason {}, policy {} of endpoint {}",
            id,
            dir,
            note.reason,
            note.policy_id,
            note.policy_endpoint
        ),
        TC_ACT_SHOT => info!(
            ctx,
            "endpoint {} {} verdict: dropped, reason {}", id, dir, note.reason
        ),
        _ => info!(ctx, "endpoint {} {} verdict {}", id, dir, action),
    }
}
