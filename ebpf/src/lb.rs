//! Service lookup shared by the socket programs (`sock`) and the NodePort program
//! (`nodeport`): a frontend's entry, then a backend by its Maglev table, with
//! `sessionAffinity: ClientIP`. Layouts and readers: `hypha_common::lb`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuHashMap},
};
use hypha_common::lb::{
    LB_F_AFFINITY, LB_MAGLEV_SIZE, LbAffinity, LbAffinityKey, LbBackend4, LbBackend6,
    LbBackendStats, LbKey4, LbKey6, LbMaglev, LbService, MAX_LB_AFFINITY, MAX_LB_BACKENDS,
    MAX_LB_SERVICES,
};

/// IPv4 frontends. Written by the agent.
#[map(name = "hypha_lb4_services")]
pub static SERVICES4: HashMap<LbKey4, LbService> = HashMap::pinned(MAX_LB_SERVICES, 0);

/// IPv6 frontends. Written by the agent.
#[map(name = "hypha_lb6_services")]
pub static SERVICES6: HashMap<LbKey6, LbService> = HashMap::pinned(MAX_LB_SERVICES, 0);

/// IPv4 backends by id. Written by the agent.
#[map(name = "hypha_lb4_backends")]
pub static BACKENDS4: HashMap<u32, LbBackend4> = HashMap::pinned(MAX_LB_BACKENDS, 0);

/// IPv6 backends by id. Written by the agent.
#[map(name = "hypha_lb6_backends")]
pub static BACKENDS6: HashMap<u32, LbBackend6> = HashMap::pinned(MAX_LB_BACKENDS, 0);

/// Each frontend's Maglev table, by service id. Written by the agent; not preallocated.
#[map(name = "hypha_lb_maglev")]
pub static MAGLEV: HashMap<u32, LbMaglev> = HashMap::pinned(MAX_LB_SERVICES, BPF_F_NO_PREALLOC);

/// `sessionAffinity: ClientIP`: (service id, client) → backend, refreshed on use.
#[map(name = "hypha_lb_affinity")]
pub static AFFINITY: LruHashMap<LbAffinityKey, LbAffinity> = LruHashMap::pinned(MAX_LB_AFFINITY, 0);

/// What each backend was given. Entries are created by the agent only.
#[map(name = "hypha_lb_backend_stats")]
pub static BACKEND_STATS: PerCpuHashMap<u32, LbBackendStats> =
    PerCpuHashMap::pinned(MAX_LB_BACKENDS, 0);

/// The IPv4 frontend `addr:port/proto` (network byte order) in `scope`.
#[inline(always)]
pub fn service4(addr: u32, port: u16, proto: u8, scope: u8) -> Option<LbService> {
    let key = LbKey4 {
        addr,
        port,
        proto,
        scope,
    };
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    unsafe { SERVICES4.get(&key) }.copied()
}

/// The IPv6 frontend `addr:port/proto` in `scope`.
#[inline(always)]
pub fn service6(addr: [u8; 16], port: u16, proto: u8, scope: u8) -> Option<LbService> {
    let key = LbKey6 {
        addr,
        port,
        proto,
        scope,
    };
    // SAFETY: as in `service4`.
    unsafe { SERVICES6.get(&key) }.copied()
}

/// Who a client is, for `sessionAffinity: ClientIP`: `kind` is `LB_AFFINITY_NETNS` or
/// `LB_AFFINITY_ADDR`.
#[derive(Clone, Copy)]
pub struct Client {
    pub kind: u32,
    pub id: [u8; 16],
}

/// The backend id for a new connection of hash `hash` to `svc`, or `None` when the
/// frontend has no backends (the caller refuses the connection) or its table is
/// missing.
///
/// With affinity, the client's entry is used while it is younger than the frontend's
/// timeout and its backend still exists (`exists`); otherwise the Maglev slot decides
/// and the entry is (re)written.
#[inline(always)]
pub fn select(
    svc: &LbService,
    hash: u32,
    client: &Client,
    exists: impl Fn(u32) -> bool,
) -> Option<u32> {
    if svc.count == 0 {
        return None;
    }
    let affinity = svc.flags & LB_F_AFFINITY != 0;
    let key = LbAffinityKey {
        service_id: svc.id,
        kind: client.kind,
        client: client.id,
    };
    // SAFETY: `bpf_ktime_get_ns` has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if affinity {
        // SAFETY: copied out at once.
        if let Some(entry) = unsafe { AFFINITY.get(&key) }.copied() {
            let timeout_ns = svc.affinity_timeout_s as u64 * 1_000_000_000;
            if now.wrapping_sub(entry.last_ns) <= timeout_ns && exists(entry.backend_id) {
                remember(&key, entry.backend_id, now);
                return Some(entry.backend_id);
            }
        }
    }
    // SAFETY: the table is replaced whole by the agent; one slot is read.
    let table = unsafe { MAGLEV.get(&svc.id) }?;
    let slot = (hash as usize) % LB_MAGLEV_SIZE;
    // LLVM turns the modulo into a multiply-and-shift the verifier cannot bound, and then
    // drops `get`'s check as proven; reading the slot back through a volatile load keeps
    // the check, which the verifier does see.
    // SAFETY: a read of a local.
    let slot = unsafe { core::ptr::read_volatile(&slot) };
    let backend = *table.slots.get(slot)?;
    if affinity {
        remember(&key, backend, now);
    }
    Some(backend)
}

#[inline(always)]
fn remember(key: &LbAffinityKey, backend_id: u32, now: u64) {
    let value = LbAffinity {
        backend_id,
        _pad: 0,
        last_ns: now,
    };
    // A full LRU evicts its oldest entry; a failed write only loses affinity.
    let _ = AFFINITY.insert(key, &value, 0);
}

/// The IPv4 backend `id`.
#[inline(always)]
pub fn backend4(id: u32) -> Option<LbBackend4> {
    // SAFETY: copied out at once.
    unsafe { BACKENDS4.get(&id) }.copied()
}

/// The IPv6 backend `id`.
#[inline(always)]
pub fn backend6(id: u32) -> Option<LbBackend6> {
    // SAFETY: copied out at once.
    unsafe { BACKENDS6.get(&id) }.copied()
}

/// Counts a translation to backend `id`: a connection (`connection`), and a packet of
/// `bytes` when `bytes` is not 0.
#[inline(always)]
pub fn count_backend(id: u32, connection: bool, bytes: u32) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU entry, no concurrent writer on this CPU; pointer from a lookup.
        let stats = unsafe { &mut *stats };
        if connection {
            stats.connections += 1;
        }
        if bytes != 0 {
            stats.packets += 1;
            stats.bytes += bytes as u64;
        }
    }
}

/// A 32-bit hash of `words` (murmur3's finaliser over a running mix): spreads flows
/// over the Maglev slots. Not keyed: a frontend's table, not the hash, is what a
/// client cannot choose.
#[inline(always)]
pub fn hash(words: &[u32]) -> u32 {
    let mut h: u32 = 0x9747_b28c;
    for w in words {
        let mut k = w.wrapping_mul(0xcc9e_2d51);
        k = k.rotate_left(15).wrapping_mul(0x1b87_3593);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
