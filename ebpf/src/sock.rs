//! Socket-level load balancing: eight cgroup `sock_addr` programs on the cgroup v2 root
//! that translate a Service frontend (ClusterIP:port) to one of its backends once per
//! connection, in the syscalls themselves, so established flows pay nothing per packet
//! and replies need no reverse NAT.
//!
//! - `connect4/6` (TCP, connected UDP) and `sendmsg4/6` (unconnected UDP): the
//!   destination, when it is a frontend of [`LB_SCOPE_INTERNAL`], becomes a backend
//!   chosen by [`lb::select`] (Maglev on the socket cookie's hash, `ClientIP` affinity
//!   keyed by the network namespace); what the backend stands for is recorded in
//!   `hypha_lb4_sock`/`hypha_lb6_sock`. A frontend without backends refuses: the
//!   syscall fails at once with `ECONNREFUSED`.
//! - `recvmsg4/6` (UDP) and `getpeername4/6`: a recorded backend is shown to the
//!   client as the frontend it asked for.
//!
//! Each program first checks that the socket's network namespace is one of this
//! agent's (`hypha_lb_netns`): several agents (simulated nodes, parallel tests) share
//! one kernel and attach to the same cgroup root, and each translates only its own.
//! Everything else passes untouched.
//!
//! An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) on an IPv6 socket is an IPv4 peer of
//! a dual-stack socket: it is looked up as the IPv4 frontend, recorded in
//! `hypha_lb4_sock`, and written back mapped.
//!
//! Layouts and readers: `hypha_common::lb`.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};
use hypha_common::lb::{
    LB_AFFINITY_NETNS, LB_SCOPE_INTERNAL, LbNetns, LbService, LbSockKey4, LbSockKey6, LbSockValue4,
    LbSockValue6, MAX_LB_NETNS, MAX_LB_SOCK, maps as lb_maps, programs,
};

use crate::{
    lb::{self, Client},
    str_eq,
};

/// The network namespaces (cookies) whose sockets this agent translates: its pods' and
/// its host's. Written by the agent.
#[map(name = "hypha_lb_netns")]
static NETNS: HashMap<u64, LbNetns> = HashMap::pinned(MAX_LB_NETNS, 0);

/// (socket cookie, IPv4 backend) → the frontend the client asked for. Written by
/// `connect4`/`sendmsg4` (and `connect6`/`sendmsg6` for IPv4-mapped peers).
#[map(name = "hypha_lb4_sock")]
static SOCK4: LruHashMap<LbSockKey4, LbSockValue4> = LruHashMap::pinned(MAX_LB_SOCK, 0);

/// (socket cookie, IPv6 backend) → the frontend the client asked for.
#[map(name = "hypha_lb6_sock")]
static SOCK6: LruHashMap<LbSockKey6, LbSockValue6> = LruHashMap::pinned(MAX_LB_SOCK, 0);

const _: () = {
    assert!(str_eq(lb_maps::NETNS, "hypha_lb_netns"));
    assert!(str_eq(lb_maps::SOCK4, "hypha_lb4_sock"));
    assert!(str_eq(lb_maps::SOCK6, "hypha_lb6_sock"));
    assert!(str_eq(lb_maps::SERVICES4, "hypha_lb4_services"));
    assert!(str_eq(lb_maps::SERVICES6, "hypha_lb6_services"));
    assert!(str_eq(lb_maps::BACKENDS4, "hypha_lb4_backends"));
    assert!(str_eq(lb_maps::BACKENDS6, "hypha_lb6_backends"));
    assert!(str_eq(lb_maps::MAGLEV, "hypha_lb_maglev"));
    assert!(str_eq(lb_maps::AFFINITY, "hypha_lb_affinity"));
    assert!(str_eq(lb_maps::BACKEND_STATS, "hypha_lb_backend_stats"));
    assert!(str_eq(programs::CONNECT4, "hypha_sock_connect4"));
    assert!(str_eq(programs::CONNECT6, "hypha_sock_connect6"));
    assert!(str_eq(programs::SENDMSG4, "hypha_sock_sendmsg4"));
    assert!(str_eq(programs::SENDMSG6, "hypha_sock_sendmsg6"));
    assert!(str_eq(programs::RECVMSG4, "hypha_sock_recvmsg4"));
    assert!(str_eq(programs::RECVMSG6, "hypha_sock_recvmsg6"));
    assert!(str_eq(programs::GETPEERNAME4, "hypha_sock_getpeername4"));
    assert!(str_eq(programs::GETPEERNAME6, "hypha_sock_getpeername6"));
};

/// A `sock_addr` program's verdict: let the syscall go on (with the address as the
/// program left it).
const ALLOW: i32 = 1;
/// Fail the syscall, with the error set by `bpf_set_retval` (`EPERM` without one).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), as it sits in memory.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// TCP and connected UDP to an IPv4 frontend.
#[cgroup_sock_addr(connect4)]
pub fn hypha_sock_connect4(ctx: SockAddrContext) -> i32 {
    match try_translate4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// Unconnected UDP to an IPv4 frontend: translated per `sendmsg`.
#[cgroup_sock_addr(sendmsg4)]
pub fn hypha_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    match try_translate4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// TCP and connected UDP to an IPv6 frontend, or to an IPv4 one through an
/// IPv4-mapped address.
#[cgroup_sock_addr(connect6)]
pub fn hypha_sock_connect6(ctx: SockAddrContext) -> i32 {
    match try_translate6(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// Unconnected UDP to an IPv6 (or IPv4-mapped) frontend.
#[cgroup_sock_addr(sendmsg6)]
pub fn hypha_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    match try_translate6(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// A datagram from a recorded backend shows the frontend as its source.
#[cgroup_sock_addr(recvmsg4)]
pub fn hypha_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx);
    ALLOW
}

/// As `recvmsg4`, for IPv6 sockets.
#[cgroup_sock_addr(recvmsg6)]
pub fn hypha_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
    ALLOW
}

/// A socket connected to a recorded backend shows the frontend as its peer.
#[cgroup_sock_addr(getpeername4)]
pub fn hypha_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx);
    ALLOW
}

/// As `getpeername4`, for IPv6 sockets.
#[cgroup_sock_addr(getpeername6)]
pub fn hypha_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
    ALLOW
}

/// The context's fields, each read and written with one 4-byte access (the verifier
/// accepts only the sizes the kernel allows for each field).
struct Sock(*mut bpf_sock_addr);

impl Sock {
    fn ip4(&self) -> u32 {
        // SAFETY: the context pointer the kernel passed; a whole field.
        unsafe { read_volatile(addr_of!((*self.0).user_ip4)) }
    }

    fn set_ip4(&self, addr: u32) {
        // SAFETY: as in `ip4`; the field is writable in these hooks.
        unsafe { write_volatile(addr_of_mut!((*self.0).user_ip4), addr) }
    }

    fn ip6_word(&self, i: usize) -> u32 {
        // SAFETY: as in `ip4`; `i` < 4 at every call.
        unsafe { read_volatile(addr_of!((*self.0).user_ip6[i])) }
    }

    fn set_ip6_word(&self, i: usize, word: u32) {
        // SAFETY: as in `set_ip4`; `i` < 4 at every call.
        unsafe { write_volatile(addr_of_mut!((*self.0).user_ip6[i]), word) }
    }

    fn ip6(&self) -> [u32; 4] {
        [
            self.ip6_word(0),
            self.ip6_word(1),
            self.ip6_word(2),
            self.ip6_word(3),
        ]
    }

    fn set_ip6(&self, addr: &[u8; 16]) {
        for i in 0..4 {
            let o = i * 4;
            let word = u32::from_ne_bytes([addr[o], addr[o + 1], addr[o + 2], addr[o + 3]]);
            self.set_ip6_word(i, word);
        }
    }

    /// The port, network byte order (the field holds it in its first two bytes).
    fn port(&self) -> u16 {
        // SAFETY: as in `ip4`.
        unsafe { read_volatile(addr_of!((*self.0).user_port)) as u16 }
    }

    fn set_port(&self, port: u16) {
        // SAFETY: as in `set_ip4`.
        unsafe { write_volatile(addr_of_mut!((*self.0).user_port), port as u32) }
    }

    /// IPPROTO_TCP or IPPROTO_UDP, or `None` for any other socket.
    fn proto(&self) -> Option<u8> {
        // SAFETY: as in `ip4`.
        match unsafe { read_volatile(addr_of!((*self.0).protocol)) } {
            p @ (IPPROTO_TCP | IPPROTO_UDP) => Some(p as u8),
            _ => None,
        }
    }
}

/// This agent's network namespace cookie of the socket, or `None` when the namespace
/// is not one of this agent's (the socket is left alone).
#[inline(always)]
fn netns(ctx: &SockAddrContext) -> Option<u64> {
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: only whether an entry exists is read.
    unsafe { NETNS.get(&cookie) }.map(|_| cookie)
}

/// Fails the syscall with `ECONNREFUSED`: the frontend has no backend.
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: allowed in cgroup sock_addr programs; only sets the syscall's error.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// The socket's cookie, its hash (the Maglev slot's) and the affinity client.
#[inline(always)]
fn flow(ctx: &SockAddrContext, netns: u64) -> (u64, u32, Client) {
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let hash = lb::hash(&[cookie as u32, (cookie >> 32) as u32]);
    let mut id = [0u8; 16];
    let ns = netns.to_ne_bytes();
    id[..8].copy_from_slice(&ns);
    let client = Client {
        kind: LB_AFFINITY_NETNS,
        id,
    };
    (cookie, hash, client)
}

/// Translates the IPv4 frontend `addr:port` of `proto`: returns the backend's address
/// and port (recorded for the socket, counted), `Ok(None)` when it is no frontend, or
/// `Err` when it has no backend.
#[inline(always)]
fn backend_for4(
    ctx: &SockAddrContext,
    netns: u64,
    addr: u32,
    port: u16,
    proto: u8,
) -> Result<Option<(u32, u16)>, ()> {
    let Some(svc) = lb::service4(addr, port, proto, LB_SCOPE_INTERNAL) else {
        return Ok(None);
    };
    let (cookie, hash, client) = flow(ctx, netns);
    let id = lb::select(&svc, hash, &client, |id| lb::backend4(id).is_some()).ok_or(())?;
    let backend = lb::backend4(id).ok_or(())?;
    record4(cookie, (backend.addr, backend.port), (addr, port), &svc);
    lb::count_backend(id, true, 0);
    Ok(Some((backend.addr, backend.port)))
}

/// Records that the socket `cookie` sent to `backend` (address, port) for the frontend
/// `front` of `svc`.
#[inline(always)]
fn record4(cookie: u64, backend: (u32, u16), front: (u32, u16), svc: &LbService) {
    let key = LbSockKey4 {
        cookie,
        addr: backend.0,
        port: backend.1,
        _pad: 0,
    };
    let value = LbSockValue4 {
        addr: front.0,
        port: front.1,
        _pad: 0,
        service_id: svc.id,
    };
    // A full LRU evicts its oldest entry; a failed write only shows the backend.
    let _ = SOCK4.insert(&key, &value, 0);
}

// Inlined: a verdict passed back from a BPF-to-BPF call through the stack is a scalar
// the verifier cannot bound to the [0, 1] a sock_addr program must return.
#[inline(always)]
fn try_translate4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(ns) = netns(ctx) else {
        return Ok(ALLOW);
    };
    let sock = Sock(ctx.sock_addr);
    let Some(proto) = sock.proto() else {
        return Ok(ALLOW);
    };
    match backend_for4(ctx, ns, sock.ip4(), sock.port(), proto) {
        Ok(Some((addr, port))) => {
            sock.set_ip4(addr);
            sock.set_port(port);
            Ok(ALLOW)
        }
        Ok(None) => Ok(ALLOW),
        Err(()) => Err(refuse()),
    }
}

#[inline(always)]
fn try_translate6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(ns) = netns(ctx) else {
        return Ok(ALLOW);
    };
    let sock = Sock(ctx.sock_addr);
    let Some(proto) = sock.proto() else {
        return Ok(ALLOW);
    };
    let words = sock.ip6();
    let port = sock.port();
    if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED {
        return match backend_for4(ctx, ns, words[3], port, proto) {
            Ok(Some((addr, port))) => {
                sock.set_ip6_word(3, addr);
                sock.set_port(port);
                Ok(ALLOW)
            }
            Ok(None) => Ok(ALLOW),
            Err(()) => Err(refuse()),
        };
    }
    let addr = bytes6(&words);
    let Some(svc) = lb::service6(addr, port, proto, LB_SCOPE_INTERNAL) else {
        return Ok(ALLOW);
    };
    let (cookie, hash, client) = flow(ctx, ns);
    let Some(id) = lb::select(&svc, hash, &client, |id| lb::backend6(id).is_some()) else {
        return Err(refuse());
    };
    let Some(backend) = lb::backend6(id) else {
        return Err(refuse());
    };
    let key = LbSockKey6 {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 6],
    };
    let value = LbSockValue6 {
        addr,
        port,
        _pad: 0,
        service_id: svc.id,
    };
    // As in `record4`.
    let _ = SOCK6.insert(&key, &value, 0);
    lb::count_backend(id, true, 0);
    sock.set_ip6(&backend.addr);
    sock.set_port(backend.port);
    Ok(ALLOW)
}

#[inline(always)]
fn bytes6(words: &[u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    addr
}

/// Shows the frontend in place of a backend recorded for this socket (IPv4 socket).
#[inline(always)]
fn reverse4(ctx: &SockAddrContext) {
    if netns(ctx).is_none() {
        return;
    }
    let sock = Sock(ctx.sock_addr);
    if let Some(front) = frontend4(ctx, sock.ip4(), sock.port()) {
        sock.set_ip4(front.addr);
        sock.set_port(front.port);
    }
}

/// The frontend recorded for this socket's backend `addr:port`.
#[inline(always)]
fn frontend4(ctx: &SockAddrContext, addr: u32, port: u16) -> Option<LbSockValue4> {
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = LbSockKey4 {
        cookie,
        addr,
        port,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    unsafe { SOCK4.get(&key) }.copied()
}

/// As [`reverse4`], for an IPv6 socket (an IPv4-mapped peer is looked up as IPv4).
#[inline(always)]
fn reverse6(ctx: &SockAddrContext) {
    if netns(ctx).is_none() {
        return;
    }
    let sock = Sock(ctx.sock_addr);
    let words = sock.ip6();
    let port = sock.port();
    if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED {
        if let Some(front) = frontend4(ctx, words[3], port) {
            sock.set_ip6_word(3, front.addr);
            sock.set_port(front.port);
        }
        return;
    }
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = LbSockKey6 {
        cookie,
        addr: bytes6(&words),
        port,
        _pad: [0; 6],
    };
    // SAFETY: copied out at once.
    if let Some(front) = unsafe { SOCK6.get(&key) }.copied() {
        sock.set_ip6(&front.addr);
        sock.set_port(front.port);
    }
}
