//! The eBPF datapath: loads Hypha's programs, pins its maps and links under the pin
//! directory, and attaches the programs to each endpoint's host veth with TCX.
//!
//! Links are pinned so that the programs stay attached while the agent is down: a
//! SIGKILLed agent leaves the datapath forwarding, and the next agent process swaps its
//! own programs into the same links (`bpf_link_update`) without a moment of detachment.

use std::collections::HashSet;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuHashMap, PerCpuValues};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use hypha_common::debug::{MAP as DEBUG_MAP, NODE_F_DEBUG};
use hypha_common::{
    Counter, CtEntry, CtKey4, DropKey, EndpointInfo, EndpointKey4, EndpointStats, NodeConfig, maps,
    programs,
};

use super::{Adoption, Datapath, link_info};
use crate::policy::PolicyDiff;
use crate::state::EndpointRecord;

/// The object `cargo xtask build-ebpf` builds; `build.rs` puts it in OUT_DIR.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hypha-ebpf.o"));

/// `statfs` magic of the bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted when nothing is.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// The programs and where each is attached.
const ATTACHMENTS: [(&str, TcAttachType, &str); 2] = [
    (programs::FROM_POD, TcAttachType::Ingress, "ingress"),
    (programs::TO_POD, TcAttachType::Egress, "egress"),
];

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "pin directory {path} is not on a bpf filesystem; mount one there (mount -t bpf bpf {path}) or choose a directory under {BPFFS_MOUNT}"
    )]
    NotBpffs { path: PathBuf },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot load the eBPF object with maps pinned under {pin_dir}: {source}")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// `build.rs` found no eBPF object and embedded an empty one.
    #[error("this hypha was built without its eBPF object; build with `cargo xtask build`")]
    NoObject,
    #[error("eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("cannot {op} program {program} on {ifname}: {source}")]
    Program {
        op: &'static str,
        program: &'static str,
        ifname: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot {op} pinned link {path}: {source}")]
    Link {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An attach failed, and so did part of removing what it had made.
    #[error("{error}; cleaning up also failed: {}", cleanup.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    WithCleanup {
        error: Box<EbpfError>,
        cleanup: Vec<EbpfError>,
    },
    #[error("cannot {op} map {map}: {source}")]
    Map {
        op: &'static str,
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

/// The embedded object, unless `build.rs` had none to embed (it then embeds nothing).
fn embedded(object: &'static [u8]) -> Result<&'static [u8], EbpfError> {
    if object.is_empty() {
        Err(EbpfError::NoObject)
    } else {
        Ok(object)
    }
}

pub(super) fn map_err(op: &'static str, map: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::Map {
        op,
        map,
        source: Box::new(source),
    }
}

/// Whether a map error means "no such key".
pub(super) fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

pub struct EbpfDatapath {
    ebpf: Ebpf,
    links_dir: PathBuf,
}

impl EbpfDatapath {
    /// Loads the programs, re-using maps already pinned under `pin_dir` (an earlier agent's),
    /// and writes the node configuration.
    pub fn load(pin_dir: &Path, gateway: Ipv4Addr) -> Result<Self, EbpfError> {
        ensure_bpffs(pin_dir)?;
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&links_dir).map_err(|source| EbpfError::Io {
            op: "create",
            path: links_dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(embedded(OBJECT)?)
            .map_err(|source| EbpfError::Load {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(source),
            })?;
        for (name, _, _) in ATTACHMENTS {
            let prog = classifier(&mut ebpf, name)?;
            prog.load().map_err(|source| EbpfError::Program {
                op: "load",
                program: name,
                ifname: "-".into(),
                source: Box::new(source),
            })?;
        }
        // An earlier agent's traced endpoints stay traced until start-up has re-adopted
        // (or swept) them.
        let tracing = debug_map(&ebpf)?.keys().next().is_some();
        let mut config: Array<&mut MapData, NodeConfig> =
            Array::try_from(ebpf.map_mut(maps::CONFIG).ok_or(EbpfError::Missing {
                kind: "map",
                name: maps::CONFIG,
            })?)
            .map_err(map_err("open", maps::CONFIG))?;
        let node = NodeConfig {
            gateway: u32::from_ne_bytes(gateway.octets()),
            flags: if tracing { NODE_F_DEBUG } else { 0 },
        };
        config
            .set(0, node, 0)
            .map_err(map_err("write", maps::CONFIG))?;
        Ok(Self { ebpf, links_dir })
    }

    /// Takes the events ring buffer out, for the monitor to drain on its own task.
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        let map = self.ebpf.take_map(maps::EVENTS)?;
        aya::maps::RingBuf::try_from(map).ok()
    }

    /// Takes the programs' log ring buffer (aya-log's `AYA_LOGS`) out, for the agent to
    /// drain into its log on its own task (see [`super::debug_log`]).
    pub fn take_logger(
        &mut self,
    ) -> Result<aya_log::EbpfLogger<super::debug_log::DatapathLog>, aya_log::Error> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, super::debug_log::DatapathLog)
    }

    /// Writes or removes the endpoint's entry in `hypha_debug`, then the node flag that
    /// says whether the map has any entry.
    fn write_debug(&mut self, ep: &EndpointRecord, on: bool) -> Result<(), EbpfError> {
        let mut map = debug_map_mut(&mut self.ebpf)?;
        if on {
            map.insert(ep.host_ifindex, ep.id, 0)
                .map_err(map_err("insert into", DEBUG_MAP))?;
        } else if let Err(e) = map.remove(&ep.host_ifindex)
            && !is_not_found(&e)
        {
            return Err(map_err("delete from", DEBUG_MAP)(e));
        }
        self.sync_debug_flag()
    }

    /// Sets `NODE_F_DEBUG` in `hypha_config` when `hypha_debug` has an entry, clears it
    /// when it has none.
    fn sync_debug_flag(&mut self) -> Result<(), EbpfError> {
        let tracing = debug_map(&self.ebpf)?.keys().next().is_some();
        let mut config: Array<&mut MapData, NodeConfig> =
            Array::try_from(self.ebpf.map_mut(maps::CONFIG).ok_or(EbpfError::Missing {
                kind: "map",
                name: maps::CONFIG,
            })?)
            .map_err(map_err("open", maps::CONFIG))?;
        let mut node = config.get(&0, 0).map_err(map_err("read", maps::CONFIG))?;
        let flags = if tracing {
            node.flags | NODE_F_DEBUG
        } else {
            node.flags & !NODE_F_DEBUG
        };
        if flags != node.flags {
            node.flags = flags;
            config
                .set(0, node, 0)
                .map_err(map_err("write", maps::CONFIG))?;
        }
        Ok(())
    }

    fn link_pin(&self, ifindex: u32, hook: &str) -> PathBuf {
        self.links_dir.join(format!("tcx-{ifindex}-{hook}"))
    }

    fn endpoints(
        &mut self,
    ) -> Result<HashMap<&mut MapData, EndpointKey4, EndpointInfo>, EbpfError> {
        let map = self
            .ebpf
            .map_mut(maps::ENDPOINTS4)
            .ok_or(EbpfError::Missing {
                kind: "map",
                name: maps::ENDPOINTS4,
            })?;
        HashMap::try_from(map).map_err(map_err("open", maps::ENDPOINTS4))
    }

    /// Removes the tracked connections with `address` on either side, so that the next
    /// endpoint given the address does not inherit them (an established flow is kept for
    /// hours, and its replies pass the new endpoint's policy).
    fn forget_connections(&mut self, address: Ipv4Addr) -> Vec<EbpfError> {
        let Some(map) = self.ebpf.map_mut(maps::CT4) else {
            return vec![EbpfError::Missing {
                kind: "map",
                name: maps::CT4,
            }];
        };
        let mut ct: HashMap<&mut MapData, CtKey4, CtEntry> = match HashMap::try_from(map) {
            Ok(ct) => ct,
            Err(e) => return vec![map_err("open", maps::CT4)(e)],
        };
        // The map holds addresses as in the packet (network byte order).
        let raw = u32::from_ne_bytes(address.octets());
        let stale: Vec<CtKey4> = ct
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.saddr == raw || k.daddr == raw)
            .collect();
        stale
            .iter()
            .filter_map(|k| match ct.remove(k) {
                // The LRU may have evicted it meanwhile.
                Err(e) if !is_not_found(&e) => Some(map_err("delete from", maps::CT4)(e)),
                _ => None,
            })
            .collect()
    }

    fn ep_stats_mut(
        &mut self,
    ) -> Result<PerCpuHashMap<&mut MapData, u32, EndpointStats>, EbpfError> {
        let map = self
            .ebpf
            .map_mut(maps::EP_STATS)
            .ok_or(EbpfError::Missing {
                kind: "map",
                name: maps::EP_STATS,
            })?;
        PerCpuHashMap::try_from(map).map_err(map_err("open", maps::EP_STATS))
    }

    fn drops_mut(&mut self) -> Result<PerCpuHashMap<&mut MapData, DropKey, Counter>, EbpfError> {
        let map = self.ebpf.map_mut(maps::DROPS).ok_or(EbpfError::Missing {
            kind: "map",
            name: maps::DROPS,
        })?;
        PerCpuHashMap::try_from(map).map_err(map_err("open", maps::DROPS))
    }

    /// Writes the endpoint's map entries; the stats entry is created only when missing,
    /// so that adopting an endpoint keeps its counters.
    fn fill_maps(&mut self, ep: &EndpointRecord, policy_flags: u32) -> Result<(), EbpfError> {
        let key = EndpointKey4::from_octets(ep.address.octets());
        let info = EndpointInfo {
            ifindex: ep.host_ifindex,
            endpoint_id: ep.id,
            pod_mac: ep.pod_mac.0,
            host_mac: ep.host_mac.0,
            flags: policy_flags,
        };
        let mut stats = self.ep_stats_mut()?;
        match stats.get(&ep.host_ifindex, 0) {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {
                let nr_cpus = aya::util::nr_cpus().map_err(|(path, source)| EbpfError::Io {
                    op: "read",
                    path: path.into(),
                    source,
                })?;
                let zero = PerCpuValues::try_from(vec![EndpointStats::default(); nr_cpus])
                    .map_err(|source| EbpfError::Io {
                        op: "size per-CPU values for",
                        path: maps::EP_STATS.into(),
                        source,
                    })?;
                stats
                    .insert(ep.host_ifindex, zero, 0)
                    .map_err(map_err("insert into", maps::EP_STATS))?;
            }
            Err(e) => return Err(map_err("read", maps::EP_STATS)(e)),
        }
        self.endpoints()?
            .insert(key, info, 0)
            .map_err(map_err("insert into", maps::ENDPOINTS4))?;
        self.write_debug(ep, ep.debug)
    }

    fn attach_all(
        &mut self,
        ep: &EndpointRecord,
        policy_flags: u32,
    ) -> Result<Adoption, EbpfError> {
        self.fill_maps(ep, policy_flags)?;
        // Each TCX attach waits for an RCU grace period in the kernel (~15 ms here); the
        // two hooks are attached concurrently so an endpoint pays for one, not two.
        let pins: Vec<PathBuf> = ATTACHMENTS
            .iter()
            .map(|(_, _, suffix)| self.link_pin(ep.host_ifindex, suffix))
            .collect();
        let mut progs: Vec<(&'static str, &mut SchedClassifier)> = Vec::new();
        for (name, program) in self.ebpf.programs_mut() {
            let Some((known, _, _)) = ATTACHMENTS.iter().find(|(n, _, _)| *n == name) else {
                continue;
            };
            let prog: &mut SchedClassifier =
                program.try_into().map_err(|source| EbpfError::Program {
                    op: "open",
                    program: known,
                    ifname: ep.host_ifname.clone(),
                    source: Box::new(source),
                })?;
            progs.push((known, prog));
        }
        let found: Vec<&str> = progs.iter().map(|(name, _)| *name).collect();
        if let Some(name) = missing_program(&found) {
            return Err(EbpfError::Missing {
                kind: "program",
                name,
            });
        }
        let results: Vec<Result<bool, EbpfError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = progs
                .into_iter()
                .map(|(name, prog)| {
                    let (i, (_, hook, _)) = ATTACHMENTS
                        .iter()
                        .enumerate()
                        .find(|(_, (n, _, _))| *n == name)
                        .expect("found above");
                    let pin = &pins[i];
                    let hook = *hook;
                    scope.spawn(move || attach_program(prog, ep, name, hook, pin))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("attach thread does not panic"))
                .collect()
        });
        let mut reused = true;
        for r in results {
            reused &= r?;
        }
        Ok(if reused {
            Adoption::Adopted
        } else {
            Adoption::Reattached
        })
    }
}

impl Datapath for EbpfDatapath {
    type Error = EbpfError;

    fn attach(&mut self, ep: &EndpointRecord, policy_flags: u32) -> Result<(), EbpfError> {
        // A fresh endpoint must not inherit links of an earlier veth with the same ifindex.
        for (_, _, suffix) in ATTACHMENTS {
            remove_pin(&self.link_pin(ep.host_ifindex, suffix))?;
        }
        match self.attach_all(ep, policy_flags) {
            Ok(_) => Ok(()),
            Err(e) => {
                // Leave nothing half attached; report the first error with whatever of
                // the cleanup failed.
                let cleanup = self.detach(ep);
                Err(if cleanup.is_empty() {
                    e
                } else {
                    EbpfError::WithCleanup {
                        error: Box::new(e),
                        cleanup,
                    }
                })
            }
        }
    }

    fn adopt(&mut self, ep: &EndpointRecord, policy_flags: u32) -> Result<Adoption, EbpfError> {
        self.attach_all(ep, policy_flags)
    }

    fn set_flags(&mut self, ep: &EndpointRecord, mask: u32, flags: u32) -> Result<(), EbpfError> {
        let key = EndpointKey4::from_octets(ep.address.octets());
        let mut endpoints = self.endpoints()?;
        let mut info = endpoints
            .get(&key, 0)
            .map_err(map_err("read", maps::ENDPOINTS4))?;
        info.flags = (info.flags & !mask) | (flags & mask);
        endpoints
            .insert(key, info, 0)
            .map_err(map_err("update", maps::ENDPOINTS4))
    }

    fn set_debug(&mut self, ep: &EndpointRecord, on: bool) -> Result<(), EbpfError> {
        self.write_debug(ep, on)
    }

    fn apply_policy(&mut self, diff: &PolicyDiff) -> Result<(), EbpfError> {
        super::policy_maps::apply(&mut self.ebpf, diff)
    }

    fn policy_stats(&self) -> Result<Vec<(u32, hypha_common::PolicyStats)>, EbpfError> {
        let map = self
            .ebpf
            .map(maps::POLICY_STATS)
            .ok_or(EbpfError::Missing {
                kind: "map",
                name: maps::POLICY_STATS,
            })?;
        let stats: PerCpuHashMap<&MapData, u32, hypha_common::PolicyStats> =
            PerCpuHashMap::try_from(map).map_err(map_err("open", maps::POLICY_STATS))?;
        let mut out = Vec::new();
        for item in stats.iter() {
            let (id, per_cpu) = item.map_err(map_err("read", maps::POLICY_STATS))?;
            let mut sum = hypha_common::PolicyStats::default();
            for c in per_cpu.iter() {
                sum.allowed += c.allowed;
                sum.denied += c.denied;
                sum.audited += c.audited;
            }
            out.push((id, sum));
        }
        Ok(out)
    }

    fn installed_policy(&self) -> Result<super::InstalledPolicy, EbpfError> {
        super::policy_maps::installed(&self.ebpf)
    }

    fn detach(&mut self, ep: &EndpointRecord) -> Vec<EbpfError> {
        let mut errors = Vec::new();
        for (_, _, suffix) in ATTACHMENTS {
            if let Err(e) = remove_pin(&self.link_pin(ep.host_ifindex, suffix)) {
                errors.push(e);
            }
        }
        let key = EndpointKey4::from_octets(ep.address.octets());
        match self.endpoints() {
            Ok(mut m) => match m.get(&key, 0) {
                Ok(info) if info.ifindex == ep.host_ifindex => {
                    if let Err(e) = m.remove(&key)
                        && !is_not_found(&e)
                    {
                        errors.push(map_err("delete from", maps::ENDPOINTS4)(e));
                    }
                }
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => errors.push(map_err("read", maps::ENDPOINTS4)(e)),
            },
            Err(e) => errors.push(e),
        }
        match self.ep_stats_mut() {
            Ok(mut m) => {
                if let Err(e) = m.remove(&ep.host_ifindex)
                    && !is_not_found(&e)
                {
                    errors.push(map_err("delete from", maps::EP_STATS)(e));
                }
            }
            Err(e) => errors.push(e),
        }
        errors.extend(self.remove_drops(|k| k.ifindex == ep.host_ifindex));
        errors.extend(self.forget_connections(ep.address));
        if let Err(e) = self.write_debug(ep, false) {
            errors.push(e);
        }
        errors
    }

    fn check(&self, ep: &EndpointRecord) -> Vec<String> {
        let mut problems = Vec::new();
        let key = EndpointKey4::from_octets(ep.address.octets());
        match self
            .ebpf
            .map(maps::ENDPOINTS4)
            .map(HashMap::<&MapData, EndpointKey4, EndpointInfo>::try_from)
        {
            Some(Ok(m)) => match m.get(&key, 0) {
                Ok(info)
                    if info.ifindex == ep.host_ifindex
                        && info.endpoint_id == ep.id
                        && info.pod_mac == ep.pod_mac.0
                        && info.host_mac == ep.host_mac.0 => {}
                Ok(info) => problems.push(format!(
                    "{} entry for {} differs: ifindex {} (want {}), endpoint {} (want {})",
                    maps::ENDPOINTS4,
                    ep.address,
                    info.ifindex,
                    ep.host_ifindex,
                    info.endpoint_id,
                    ep.id
                )),
                Err(e) if is_not_found(&e) => problems.push(format!(
                    "{} has no entry for {}",
                    maps::ENDPOINTS4,
                    ep.address
                )),
                Err(e) => problems.push(format!("cannot read {}: {e}", maps::ENDPOINTS4)),
            },
            _ => problems.push(format!("map {} is not loaded", maps::ENDPOINTS4)),
        }
        match self
            .ebpf
            .map(maps::EP_STATS)
            .map(PerCpuHashMap::<&MapData, u32, EndpointStats>::try_from)
        {
            Some(Ok(m)) => {
                if m.get(&ep.host_ifindex, 0).is_err() {
                    problems.push(format!(
                        "{} has no counters for ifindex {}",
                        maps::EP_STATS,
                        ep.host_ifindex
                    ));
                }
            }
            _ => problems.push(format!("map {} is not loaded", maps::EP_STATS)),
        }
        for (name, hook, suffix) in ATTACHMENTS {
            let pin = self.link_pin(ep.host_ifindex, suffix);
            problems.extend(self.check_link(ep, name, hook, &pin));
        }
        problems
    }

    fn sweep(&mut self, keep: &[EndpointRecord]) -> Vec<EbpfError> {
        let mut errors = Vec::new();
        let addrs: HashSet<EndpointKey4> = keep
            .iter()
            .map(|e| EndpointKey4::from_octets(e.address.octets()))
            .collect();
        let ifindexes: HashSet<u32> = keep.iter().map(|e| e.host_ifindex).collect();
        match self.endpoints() {
            Ok(mut m) => {
                let stale: Vec<_> = m
                    .keys()
                    .filter_map(Result::ok)
                    .filter(|k| !addrs.contains(k))
                    .collect();
                for k in stale {
                    if let Err(e) = m.remove(&k) {
                        errors.push(map_err("delete from", maps::ENDPOINTS4)(e));
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        match self.ep_stats_mut() {
            Ok(mut m) => {
                let stale: Vec<_> = m
                    .keys()
                    .filter_map(Result::ok)
                    .filter(|k| !ifindexes.contains(k))
                    .collect();
                for k in stale {
                    if let Err(e) = m.remove(&k) {
                        errors.push(map_err("delete from", maps::EP_STATS)(e));
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        errors.extend(self.remove_drops(|k| !ifindexes.contains(&k.ifindex)));
        let traced: HashSet<u32> = keep
            .iter()
            .filter(|e| e.debug)
            .map(|e| e.host_ifindex)
            .collect();
        match debug_map_mut(&mut self.ebpf) {
            Ok(mut m) => {
                let stale: Vec<u32> = m
                    .keys()
                    .filter_map(Result::ok)
                    .filter(|k| !traced.contains(k))
                    .collect();
                for k in stale {
                    if let Err(e) = m.remove(&k)
                        && !is_not_found(&e)
                    {
                        errors.push(map_err("delete from", DEBUG_MAP)(e));
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        if let Err(e) = self.sync_debug_flag() {
            errors.push(e);
        }
        match std::fs::read_dir(&self.links_dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    let ifindex = name
                        .to_str()
                        .and_then(|n| n.strip_prefix("tcx-"))
                        .and_then(|n| n.split('-').next())
                        .and_then(|n| n.parse::<u32>().ok());
                    if ifindex.is_none_or(|i| !ifindexes.contains(&i))
                        && let Err(e) = remove_pin(&entry.path())
                    {
                        errors.push(e);
                    }
                }
            }
            Err(source) => errors.push(EbpfError::Io {
                op: "list",
                path: self.links_dir.clone(),
                source,
            }),
        }
        errors
    }

    fn stats(&self, ifindex: u32) -> Result<EndpointStats, EbpfError> {
        let map = self.ebpf.map(maps::EP_STATS).ok_or(EbpfError::Missing {
            kind: "map",
            name: maps::EP_STATS,
        })?;
        let stats: PerCpuHashMap<&MapData, u32, EndpointStats> =
            PerCpuHashMap::try_from(map).map_err(map_err("open", maps::EP_STATS))?;
        let per_cpu = match stats.get(&ifindex, 0) {
            Ok(v) => v,
            Err(e) if is_not_found(&e) => return Ok(EndpointStats::default()),
            Err(e) => return Err(map_err("read", maps::EP_STATS)(e)),
        };
        let mut sum = EndpointStats::default();
        for cpu in per_cpu.iter() {
            for (total, part) in [
                (&mut sum.egress, &cpu.egress),
                (&mut sum.ingress, &cpu.ingress),
            ] {
                total.passed.add(&part.passed);
                total.redirected.add(&part.redirected);
                total.dropped.add(&part.dropped);
            }
        }
        Ok(sum)
    }

    fn drops(&self) -> Result<Vec<(DropKey, Counter)>, EbpfError> {
        let map = self.ebpf.map(maps::DROPS).ok_or(EbpfError::Missing {
            kind: "map",
            name: maps::DROPS,
        })?;
        let drops: PerCpuHashMap<&MapData, DropKey, Counter> =
            PerCpuHashMap::try_from(map).map_err(map_err("open", maps::DROPS))?;
        let mut out = Vec::new();
        for item in drops.iter() {
            let (key, per_cpu) = item.map_err(map_err("read", maps::DROPS))?;
            let mut sum = Counter::default();
            per_cpu.iter().for_each(|c| sum.add(c));
            out.push((key, sum));
        }
        Ok(out)
    }

    fn programs(&self) -> Vec<String> {
        self.ebpf.programs().map(|(n, _)| n.to_owned()).collect()
    }
}

impl EbpfDatapath {
    /// Whether the link pinned at `pin` is attached to the endpoint's veth at `hook` and
    /// runs the program `name` this agent loaded: a link can stay pinned after its
    /// program was replaced through it or after it was detached from its device.
    fn check_link(
        &self,
        ep: &EndpointRecord,
        name: &'static str,
        hook: TcAttachType,
        pin: &Path,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        let link = match link_info::read(pin) {
            Ok(link) => link,
            Err(e) => {
                return vec![format!(
                    "program {name} is not attached to {}: cannot open its pinned link {}: {e}",
                    ep.host_ifname,
                    pin.display()
                )];
            }
        };
        let (want_type, hook_name) = match hook {
            TcAttachType::Ingress => (link_info::BPF_TCX_INGRESS, "ingress"),
            _ => (link_info::BPF_TCX_EGRESS, "egress"),
        };
        if link.link_type != link_info::BPF_LINK_TYPE_TCX {
            problems.push(format!(
                "the pinned link {} of program {name} is not a TCX link (type {})",
                pin.display(),
                link.link_type
            ));
        } else if link.ifindex == 0 {
            problems.push(format!(
                "program {name} is detached from {}: its pinned link {} (link id {}) is attached to no device",
                ep.host_ifname,
                pin.display(),
                link.id
            ));
        } else if link.ifindex != ep.host_ifindex || link.attach_type != want_type {
            problems.push(format!(
                "the pinned link {} of program {name} is attached to ifindex {} (attach type {}), not to the {hook_name} of {} (ifindex {})",
                pin.display(),
                link.ifindex,
                link.attach_type,
                ep.host_ifname,
                ep.host_ifindex
            ));
        }
        match self.ebpf.program(name).map(aya::programs::Program::info) {
            Some(Ok(ours)) if ours.id() == link.prog_id => {}
            Some(Ok(ours)) => problems.push(format!(
                "program {name} is not what runs on the {hook_name} of {}: its pinned link {} runs program {} (id {}), not the agent's {name} (id {})",
                ep.host_ifname,
                pin.display(),
                program_name(link.prog_id),
                link.prog_id,
                ours.id()
            )),
            Some(Err(e)) => problems.push(format!("cannot read program {name}: {e}")),
            None => problems.push(format!("the eBPF object has no program {name}")),
        }
        problems
    }

    fn remove_drops(&mut self, stale: impl Fn(&DropKey) -> bool) -> Vec<EbpfError> {
        let mut errors = Vec::new();
        match self.drops_mut() {
            Ok(mut m) => {
                let keys: Vec<_> = m
                    .keys()
                    .filter_map(Result::ok)
                    .filter(|k| stale(k))
                    .collect();
                for k in keys {
                    if let Err(e) = m.remove(&k)
                        && !is_not_found(&e)
                    {
                        errors.push(map_err("delete from", maps::DROPS)(e));
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        errors
    }
}

/// The name of the loaded program `id`, or `?`.
fn program_name(id: u32) -> String {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// The first program of [`ATTACHMENTS`] that is not among `found`.
fn missing_program(found: &[&str]) -> Option<&'static str> {
    ATTACHMENTS
        .iter()
        .map(|(name, _, _)| *name)
        .find(|name| !found.contains(name))
}

fn debug_map(ebpf: &Ebpf) -> Result<HashMap<&MapData, u32, u32>, EbpfError> {
    let map = ebpf.map(DEBUG_MAP).ok_or(EbpfError::Missing {
        kind: "map",
        name: DEBUG_MAP,
    })?;
    HashMap::try_from(map).map_err(map_err("open", DEBUG_MAP))
}

fn debug_map_mut(ebpf: &mut Ebpf) -> Result<HashMap<&mut MapData, u32, u32>, EbpfError> {
    let map = ebpf.map_mut(DEBUG_MAP).ok_or(EbpfError::Missing {
        kind: "map",
        name: DEBUG_MAP,
    })?;
    HashMap::try_from(map).map_err(map_err("open", DEBUG_MAP))
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
    let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into().map_err(|source| EbpfError::Program {
        op: "open",
        program: name,
        ifname: "-".into(),
        source: Box::new(source),
    })
}

/// Removing a link's pin detaches it (nothing else holds it); absent is fine.
fn remove_pin(path: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(EbpfError::Io {
            op: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure `pin_dir` exists on a bpf filesystem, mounting bpffs at /sys/fs/bpf when the
/// pin directory is below it and nothing is mounted there.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), EbpfError> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        let mount_point = Path::new(BPFFS_MOUNT);
        if !pin_dir.starts_with(mount_point) || is_bpffs(mount_point) {
            return Err(EbpfError::NotBpffs {
                path: pin_dir.to_owned(),
            });
        }
        std::fs::create_dir_all(mount_point).map_err(|source| EbpfError::Io {
            op: "create",
            path: mount_point.to_owned(),
            source,
        })?;
        nix::mount::mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|errno| EbpfError::Io {
            op: "mount bpffs on",
            path: mount_point.to_owned(),
            source: errno.into(),
        })?;
        tracing::info!(path = BPFFS_MOUNT, "mounted the bpf filesystem");
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| EbpfError::Io {
        op: "create",
        path: pin_dir.to_owned(),
        source,
    })
}

/// Attaches `name` to the endpoint's veth, replacing the program in a pinned link when
/// one is there. Returns whether an existing link was re-used.
fn attach_program(
    prog: &mut SchedClassifier,
    ep: &EndpointRecord,
    name: &'static str,
    hook: TcAttachType,
    pin: &Path,
) -> Result<bool, EbpfError> {
    let prog_err = |op| {
        let ifname = ep.host_ifname.clone();
        move |source| EbpfError::Program {
            op,
            program: name,
            ifname,
            source: Box::new(source),
        }
    };
    let link_err = |op: &'static str| {
        move |source: LinkError| EbpfError::Link {
            op,
            path: pin.to_owned(),
            source: Box::new(source),
        }
    };
    match PinnedLink::from_pin(pin) {
        Ok(old) => {
            let link =
                SchedClassifierLink::try_from(FdLink::from(old)).map_err(link_err("open"))?;
            let id = prog
                .attach_to_link(link)
                .map_err(prog_err("swap into the link of"))?;
            // The pin keeps the link (now running this program) alive; our fd can go.
            drop(prog.take_link(id).map_err(prog_err("take the link of"))?);
            Ok(true)
        }
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
            let id = prog
                .attach_with_options(
                    &ep.host_ifname,
                    hook,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(prog_err("attach"))?;
            let link = prog.take_link(id).map_err(prog_err("take the link of"))?;
            let fd = FdLink::try_from(link).map_err(link_err("convert"))?;
            fd.pin(pin).map_err(|source| EbpfError::Link {
                op: "pin",
                path: pin.to_owned(),
                source: Box::new(source),
            })?;
            Ok(false)
        }
        Err(e) => Err(link_err("open")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_without_the_ebpf_object_fails_at_load_with_what_to_do() {
        let e = super::embedded(&[]).expect_err("an empty object must not load");
        assert_eq!(
            e.to_string(),
            "this hypha was built without its eBPF object; build with `cargo xtask build`"
        );
        assert!(super::embedded(b"\x7fELF").is_ok());
    }

    #[test]
    fn the_missing_program_is_the_one_named() {
        assert_eq!(
            missing_program(&[programs::FROM_POD]),
            Some(programs::TO_POD),
            "to_pod is missing, not from_pod"
        );
        assert_eq!(
            missing_program(&[programs::TO_POD]),
            Some(programs::FROM_POD)
        );
        assert_eq!(missing_program(&[]), Some(programs::FROM_POD));
        assert_eq!(
            missing_program(&[programs::TO_POD, programs::FROM_POD]),
            None
        );
    }
}
