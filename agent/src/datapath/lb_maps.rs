//! The load balancer's maps as the agent writes them (`hypha_common::lb`):
//! `hypha_lb4_services`/`hypha_lb6_services` (frontend → service id, backend count,
//! flags), `hypha_lb4_backends`/`hypha_lb6_backends` (backend id → address),
//! `hypha_lb_maglev` (service id → Maglev table of backend ids) and
//! `hypha_lb_backend_stats` (backend id → per-CPU counters). The affinity entries of a
//! removed frontend are removed with it; the socket and NAT tables are the datapath's.
//!
//! [`LbDiff`] is what changes, computed by the control plane (`control/services.rs`)
//! per frontend; [`LbMaps::apply`] writes it in the order that never lets a program
//! follow an id to nothing: backends (their counters first), then Maglev tables, then
//! frontends; then removed frontends, their tables and affinity entries, and the
//! backends no frontend uses any more (their counters last).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use aya::Ebpf;
use aya::maps::{HashMap, MapData, PerCpuHashMap, PerCpuValues};
use hypha_common::lb::{
    LB_MAGLEV_SIZE, LbAffinity, LbAffinityKey, LbBackend4, LbBackend6, LbBackendStats, LbKey4,
    LbKey6, LbMaglev, LbService, maps,
};

use super::ebpf::{EbpfError, is_not_found, lock, map_err};

/// A frontend: the key of its `hypha_lb4_services` or `hypha_lb6_services` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbFrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    /// `hypha_common::lb::LB_SCOPE_*`.
    pub scope: u8,
}

/// A backend as `hypha_lb4_backends`/`hypha_lb6_backends` hold it (the family is its
/// address's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbBackendSpec {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    /// `hypha_common::lb::LB_BACKEND_F_*`.
    pub flags: u8,
    pub node_id: u32,
}

/// A Maglev table: [`LB_MAGLEV_SIZE`] backend ids, shared between the plan and the
/// diffs that write it.
pub type MaglevTable = Arc<[u32]>;

/// What changes in the load balancer's maps, applied in the order of the fields (see the
/// module's documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbDiff {
    /// New or changed backends, by id. A new one's counters are created zeroed first; a
    /// changed one keeps its counters.
    pub backends_set: Vec<(u32, LbBackendSpec)>,
    /// Maglev tables written whole, by service id.
    pub maglev_set: Vec<(u32, MaglevTable)>,
    /// New or changed frontends.
    pub services_set: Vec<(LbFrontendKey, LbService)>,
    /// Removed frontends.
    pub services_del: Vec<LbFrontendKey>,
    /// Maglev tables no frontend uses any more (removed frontends, frontends left
    /// without backends), by service id.
    pub maglev_del: Vec<u32>,
    /// Service ids whose `hypha_lb_affinity` entries go (removed frontends, so that a
    /// reused id inherits no client).
    pub affinity_del: Vec<u32>,
    /// Backends no frontend uses any more, with their counters.
    pub backends_del: Vec<(u32, LbBackendSpec)>,
}

impl LbDiff {
    pub fn is_empty(&self) -> bool {
        self.backends_set.is_empty()
            && self.maglev_set.is_empty()
            && self.services_set.is_empty()
            && self.services_del.is_empty()
            && self.maglev_del.is_empty()
            && self.affinity_del.is_empty()
            && self.backends_del.is_empty()
    }
}

/// What the load balancer's maps hold, as read back (an earlier agent's work, at
/// start): the ids it finds are kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstalledLb {
    pub services: BTreeMap<LbFrontendKey, LbService>,
    pub backends: BTreeMap<u32, LbBackendSpec>,
    pub maglev: BTreeMap<u32, MaglevTable>,
}

fn key4(k: &LbFrontendKey, addr: Ipv4Addr) -> LbKey4 {
    LbKey4 {
        addr: u32::from_ne_bytes(addr.octets()),
        port: k.port.to_be(),
        proto: k.proto,
        scope: k.scope,
    }
}

fn key6(k: &LbFrontendKey, addr: Ipv6Addr) -> LbKey6 {
    LbKey6 {
        addr: addr.octets(),
        port: k.port.to_be(),
        proto: k.proto,
        scope: k.scope,
    }
}

fn backend4(b: &LbBackendSpec, addr: Ipv4Addr) -> LbBackend4 {
    LbBackend4 {
        addr: u32::from_ne_bytes(addr.octets()),
        port: b.port.to_be(),
        proto: b.proto,
        flags: b.flags,
        node_id: b.node_id,
    }
}

fn backend6(b: &LbBackendSpec, addr: Ipv6Addr) -> LbBackend6 {
    LbBackend6 {
        addr: addr.octets(),
        port: b.port.to_be(),
        proto: b.proto,
        flags: b.flags,
        node_id: b.node_id,
    }
}

/// The map value of a table; a table of another length (a bug) is cut or padded with
/// its first slot.
fn maglev_value(slots: &[u32]) -> LbMaglev {
    let mut value = LbMaglev {
        slots: [slots.first().copied().unwrap_or(0); LB_MAGLEV_SIZE],
    };
    let n = slots.len().min(LB_MAGLEV_SIZE);
    value.slots[..n].copy_from_slice(&slots[..n]);
    value
}

/// The load balancer's map handles, each behind its own lock, held only for syscalls on
/// that map (none of which waits). No two are held at once.
pub(super) struct LbMaps {
    services4: Mutex<HashMap<MapData, LbKey4, LbService>>,
    services6: Mutex<HashMap<MapData, LbKey6, LbService>>,
    backends4: Mutex<HashMap<MapData, u32, LbBackend4>>,
    backends6: Mutex<HashMap<MapData, u32, LbBackend6>>,
    maglev: Mutex<HashMap<MapData, u32, LbMaglev>>,
    affinity: Mutex<HashMap<MapData, LbAffinityKey, LbAffinity>>,
    stats: Mutex<PerCpuHashMap<MapData, u32, LbBackendStats>>,
}

/// Another copy of per-CPU zeroes (`PerCpuValues` is not `Clone`).
fn zeroed_again(zero: &PerCpuValues<LbBackendStats>) -> PerCpuValues<LbBackendStats> {
    PerCpuValues::try_from(vec![LbBackendStats::default(); zero.len()])
        .expect("the same number of CPUs as before")
}

/// `BPF_NOEXIST`: create only.
const BPF_NOEXIST: u64 = 1;

impl LbMaps {
    /// Takes the maps out of the object.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<Mutex<T>, EbpfError> {
            let map = ebpf
                .take_map(name)
                .ok_or(EbpfError::Missing { kind: "map", name })?;
            T::try_from(map)
                .map(Mutex::new)
                .map_err(map_err("open", name))
        }
        Ok(Self {
            services4: take(ebpf, maps::SERVICES4)?,
            services6: take(ebpf, maps::SERVICES6)?,
            backends4: take(ebpf, maps::BACKENDS4)?,
            backends6: take(ebpf, maps::BACKENDS6)?,
            maglev: take(ebpf, maps::MAGLEV)?,
            affinity: take(ebpf, maps::AFFINITY)?,
            stats: take(ebpf, maps::BACKEND_STATS)?,
        })
    }

    /// Writes `diff` in its order; goes on past errors and returns them all.
    pub(super) fn apply(&self, diff: &LbDiff) -> Vec<EbpfError> {
        let mut errors = Vec::new();
        let mut note = |r: Result<(), EbpfError>| {
            if let Err(e) = r {
                errors.push(e);
            }
        };
        if !diff.backends_set.is_empty() {
            match super::tunnel_maps::zeroed::<LbBackendStats>(maps::BACKEND_STATS) {
                Ok(zero) => {
                    let mut stats = lock(&self.stats);
                    for (id, _) in &diff.backends_set {
                        match stats.insert(id, zeroed_again(&zero), BPF_NOEXIST) {
                            Ok(()) => {}
                            Err(aya::maps::MapError::SyscallError(s))
                                if s.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                            Err(e) => note(Err(map_err("insert into", maps::BACKEND_STATS)(e))),
                        }
                    }
                }
                Err(e) => note(Err(e)),
            }
        }
        for (id, b) in &diff.backends_set {
            note(self.set_backend(*id, b));
        }
        {
            let mut maglev = lock(&self.maglev);
            for (id, table) in &diff.maglev_set {
                note(
                    maglev
                        .insert(id, maglev_value(table), 0)
                        .map_err(map_err("insert into", maps::MAGLEV)),
                );
            }
        }
        for (k, v) in &diff.services_set {
            note(self.set_service(k, v));
        }
        for k in &diff.services_del {
            note(self.remove_service(k));
        }
        {
            let mut maglev = lock(&self.maglev);
            for id in &diff.maglev_del {
                note(removed(maglev.remove(id), maps::MAGLEV));
            }
        }
        if !diff.affinity_del.is_empty() {
            let ids: BTreeSet<u32> = diff.affinity_del.iter().copied().collect();
            let mut affinity = lock(&self.affinity);
            let stale: Vec<LbAffinityKey> = affinity
                .keys()
                .filter_map(Result::ok)
                .filter(|k| ids.contains(&k.service_id))
                .collect();
            for k in &stale {
                note(removed(affinity.remove(k), maps::AFFINITY));
            }
        }
        for (id, b) in &diff.backends_del {
            note(match b.addr {
                IpAddr::V4(_) => removed(lock(&self.backends4).remove(id), maps::BACKENDS4),
                IpAddr::V6(_) => removed(lock(&self.backends6).remove(id), maps::BACKENDS6),
            });
        }
        {
            let mut stats = lock(&self.stats);
            for (id, _) in &diff.backends_del {
                note(removed(stats.remove(id), maps::BACKEND_STATS));
            }
        }
        errors
    }

    fn set_backend(&self, id: u32, b: &LbBackendSpec) -> Result<(), EbpfError> {
        match b.addr {
            IpAddr::V4(a) => lock(&self.backends4)
                .insert(id, backend4(b, a), 0)
                .map_err(map_err("insert into", maps::BACKENDS4)),
            IpAddr::V6(a) => lock(&self.backends6)
                .insert(id, backend6(b, a), 0)
                .map_err(map_err("insert into", maps::BACKENDS6)),
        }
    }

    fn set_service(&self, k: &LbFrontendKey, v: &LbService) -> Result<(), EbpfError> {
        match k.addr {
            IpAddr::V4(a) => lock(&self.services4)
                .insert(key4(k, a), v, 0)
                .map_err(map_err("insert into", maps::SERVICES4)),
            IpAddr::V6(a) => lock(&self.services6)
                .insert(key6(k, a), v, 0)
                .map_err(map_err("insert into", maps::SERVICES6)),
        }
    }

    fn remove_service(&self, k: &LbFrontendKey) -> Result<(), EbpfError> {
        match k.addr {
            IpAddr::V4(a) => removed(lock(&self.services4).remove(&key4(k, a)), maps::SERVICES4),
            IpAddr::V6(a) => removed(lock(&self.services6).remove(&key6(k, a)), maps::SERVICES6),
        }
    }

    /// What the maps hold now.
    pub(super) fn installed(&self) -> Result<InstalledLb, EbpfError> {
        let mut lb = InstalledLb::default();
        for item in lock(&self.services4).iter() {
            let (k, v) = item.map_err(map_err("read", maps::SERVICES4))?;
            let key = LbFrontendKey {
                addr: IpAddr::V4(Ipv4Addr::from(k.addr.to_ne_bytes())),
                port: u16::from_be(k.port),
                proto: k.proto,
                scope: k.scope,
            };
            lb.services.insert(key, v);
        }
        for item in lock(&self.services6).iter() {
            let (k, v) = item.map_err(map_err("read", maps::SERVICES6))?;
            let key = LbFrontendKey {
                addr: IpAddr::V6(Ipv6Addr::from(k.addr)),
                port: u16::from_be(k.port),
                proto: k.proto,
                scope: k.scope,
            };
            lb.services.insert(key, v);
        }
        for item in lock(&self.backends4).iter() {
            let (id, b) = item.map_err(map_err("read", maps::BACKENDS4))?;
            let spec = LbBackendSpec {
                addr: IpAddr::V4(Ipv4Addr::from(b.addr.to_ne_bytes())),
                port: u16::from_be(b.port),
                proto: b.proto,
                flags: b.flags,
                node_id: b.node_id,
            };
            lb.backends.insert(id, spec);
        }
        for item in lock(&self.backends6).iter() {
            let (id, b) = item.map_err(map_err("read", maps::BACKENDS6))?;
            let spec = LbBackendSpec {
                addr: IpAddr::V6(Ipv6Addr::from(b.addr)),
                port: u16::from_be(b.port),
                proto: b.proto,
                flags: b.flags,
                node_id: b.node_id,
            };
            lb.backends.insert(id, spec);
        }
        for item in lock(&self.maglev).iter() {
            let (id, t) = item.map_err(map_err("read", maps::MAGLEV))?;
            lb.maglev.insert(id, Arc::from(&t.slots[..]));
        }
        Ok(lb)
    }

    /// Every backend's counters, summed over CPUs.
    pub(super) fn stats(&self) -> Result<Vec<(u32, LbBackendStats)>, EbpfError> {
        let mut out = Vec::new();
        for item in lock(&self.stats).iter() {
            let (id, per_cpu): (u32, PerCpuValues<LbBackendStats>) =
                item.map_err(map_err("read", maps::BACKEND_STATS))?;
            let mut sum = LbBackendStats::default();
            for s in per_cpu.iter() {
                sum.connections += s.connections;
                sum.packets += s.packets;
                sum.bytes += s.bytes;
            }
            out.push((id, sum));
        }
        Ok(out)
    }
}

/// A removal's error, unless the entry was already gone.
fn removed(result: Result<(), aya::maps::MapError>, map: &'static str) -> Result<(), EbpfError> {
    match result {
        Err(e) if !is_not_found(&e) => Err(map_err("delete from", map)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_in_network_byte_order() {
        let k = LbFrontendKey {
            addr: "10.96.0.10".parse().unwrap(),
            port: 53,
            proto: 17,
            scope: 1,
        };
        let IpAddr::V4(a) = k.addr else {
            unreachable!()
        };
        let raw = key4(&k, a);
        assert_eq!(raw.addr.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(raw.port.to_ne_bytes(), [0, 53]);
        assert_eq!((raw.proto, raw.scope), (17, 1));
    }

    #[test]
    fn maglev_values_are_whole_tables() {
        let v = maglev_value(&[3, 4]);
        assert_eq!(&v.slots[..3], &[3, 4, 3]);
        let full: Vec<u32> = (0..LB_MAGLEV_SIZE as u32).collect();
        assert_eq!(maglev_value(&full).slots.to_vec(), full);
    }
}
