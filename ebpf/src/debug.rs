//! Per-endpoint packet tracing through aya-log (`hypha endpoint debug ENDPOINT on`).
//!
//! For an endpoint listed in `hypha_debug`, each program run logs what it received
//! (family, protocol, addresses and ports) and its verdict (to the host stack,
//! redirected to which pod, answered, dropped for which reason and by which policy).
//! The agent reads the lines from the `AYA_LOGS` ring buffer into its log, and
//! `agent/src/datapath/debug_log.rs` turns them into words: a line here carries numbers
//! and the frame's first bytes, so that each costs a few bytes of stack and one copy of
//! constant size (the programs' own frames leave little of the 512 bytes of stack).
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
    cty::c_void,
    helpers::generated::bpf_skb_load_bytes,
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

/// What decided the verdict, logged as 16 bytes (four `u32` in the machine's order).
/// Second reader: `agent/src/datapath/debug_log.rs` (`verdict`), which decodes it.
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

/// Bytes of the frame's head a trace line carries: Ethernet and an IPv6 header, or
/// Ethernet, an IPv4 header with up to 16 bytes of options and the ports, or an ARP packet.
const HEAD: usize = 54;

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
    unsafe { DEBUG.get(ifindex).copied() }
}

/// Which program is tracing. The numbers are read by `agent/src/datapath/debug_log.rs`.
#[derive(Clone, Copy)]
#[repr(u8)]
pub enum Hook {
    /// `hypha_from_pod`: what the pod sends.
    FromPod = 0,
    /// `hypha_to_pod`: what the host stack delivers to the pod.
    ToPod = 1,
}

/// `received`'s hook number for a packet another pod's program redirected straight into
/// the traced pod (`bpf_redirect_peer` skips the traced pod's own hook).
const FROM_OTHER_POD: u8 = 2;

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
            received(ctx, id, hook as u8, 0);
        }
        Trace { endpoint, hook }
    }

    /// At the end of the run: logs the verdict `action` with the note's details.
    #[inline(always)]
    pub fn verdict(self, ctx: &TcContext, action: i32) {
        if let Some(id) = self.endpoint {
            verdict(ctx, id, self.hook as u8, action);
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
            received(ctx, id, FROM_OTHER_POD, from);
        }
    }
}

/// Logs `hypha-trace ENDPOINT HOOK FROM LEN HEAD` (decoded by
/// `agent/src/datapath/debug_log.rs`): the frame's length and its first
/// [`HEAD`] bytes in hex (zeros past a shorter frame), as seen at `hook` (or, with
/// [`FROM_OTHER_POD`], redirected from the pod on ifindex `from`).
#[inline(never)]
fn received(ctx: &TcContext, id: u32, hook: u8, from: u32) {
    let mut head = [0u8; HEAD];
    let skb = ctx.skb.skb as *const c_void;
    let to = head.as_mut_ptr() as *mut c_void;
    // Constant sizes only (the helper refuses a size that may be zero), longest first:
    // a frame shorter than one is read with the next.
    // SAFETY: each call writes at most its size (≤ HEAD) bytes into `head`.
    unsafe {
        if bpf_skb_load_bytes(skb, 0, to, HEAD as u32) != 0
            && bpf_skb_load_bytes(skb, 0, to, 42) != 0
            && bpf_skb_load_bytes(skb, 0, to, 34) != 0
        {
            bpf_skb_load_bytes(skb, 0, to, 14);
        }
    }
    info!(
        ctx,
        "hypha-trace {} {} {} {} {:x}",
        id,
        hook,
        from,
        ctx.len(),
        &head[..]
    );
}

/// Logs `hypha-verdict ENDPOINT HOOK ACTION NOTE`: the program's return value and the
/// note (drop reason, redirect target, policy, policy's endpoint) in hex.
#[inline(never)]
fn verdict(ctx: &TcContext, id: u32, hook: u8, action: i32) {
    let Some(note) = NOTE.get_ptr(0) else {
        return;
    };
    // SAFETY: a pointer to this CPU's note from a successful lookup, read as its bytes
    // (`Note` is four `u32`s, no padding).
    let bytes = unsafe { core::slice::from_raw_parts(note as *const u8, size_of::<Note>()) };
    info!(ctx, "hypha-verdict {} {} {} {:x}", id, hook, action, bytes);
}
