//! The eBPF datapath: loads Hypha's programs, pins its maps under the pin directory, and
//! attaches the programs to each endpoint's host veth in one of two modes
//! ([`AttachMode`]):
//!
//! - **tc** (the default): `cls_bpf` filters of a `clsact` qdisc, in direct-action mode,
//!   at priority 1 and handle 1. ~0.3 ms per endpoint, and attaches overlap; but `clsact`
//!   takes the veth's one ingress-qdisc slot (`ffff:`).
//! - **tcx**: TCX links pinned under `links/`. Each attach waits out an RCU grace period
//!   and attaches do not overlap (~23 ms per endpoint here; `cargo xtask bench attach`),
//!   but the qdiscs stay free for a chained plugin such as the reference `bandwidth`.
//!
//! Either way the programs stay attached while the agent is down (filters and pinned
//! links hold them): a SIGKILLed agent leaves the datapath forwarding, and the next agent
//! process swaps its own programs in place (`NLM_F_REPLACE` of the same filter, or
//! `bpf_link_update` of the same link) without a moment of detachment. An endpoint
//! attached in the other mode (a restart after a change of mode, or an upgrade from an
//! agent that only knew TCX) is converted on adopt: attached the new way first, the old
//! way removed after, so it is never without programs.

use std::collections::HashSet;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use aya::maps::{
    Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuHashMap, PerCpuValues,
};
use aya::programs::{ProgramError, ProgramFd, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use hypha_common::debug::{MAP as DEBUG_MAP, NODE_F_DEBUG};
use hypha_common::{
    Counter, CtEntry, CtKey4, CtKey6, DropKey, EndpointStats, IpcacheValue, NodeConfig, NodeStats,
    PolicyEntry, PolicyKey, PolicyStats, maps, programs,
};
use hypha_netlink::{BpfFilter, Netlink, TcHook};

use super::endpoint_maps::EndpointMaps;
use super::lb_maps::LbMaps;
use super::socklb::SockLb;
use super::tunnel_maps::{self, TunnelMaps};
use super::{Adoption, Datapath, InstalledLb, LbDiff, TunnelPeerSpec, TunnelSetup, link_info};
use crate::config::AttachMode;
use crate::policy::PolicyDiff;
use crate::state::EndpointRecord;

/// The object `cargo xtask build-ebpf` builds; `build.rs` puts it in OUT_DIR.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hypha-ebpf.o"));

/// `statfs` magic of the bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted when nothing is.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// The programs, the TCX hook and the tc hook each is attached to, and the hook's name
/// in pins.
const ATTACHMENTS: [(&str, u32, TcHook, &str); 2] = [
    (
        programs::FROM_POD,
        link_info::BPF_TCX_INGRESS,
        TcHook::Ingress,
        "ingress",
    ),
    (
        programs::TO_POD,
        link_info::BPF_TCX_EGRESS,
        TcHook::Egress,
        "egress",
    ),
];

/// The priority of Hypha's `cls_bpf` filters: 1, the first to run on the hook, so no
/// other tc filter's verdict can bypass them (they run in direct-action mode: their
/// verdict is final, and they never hand over to a later filter). With the handle, it
/// names the filter: a restarted agent replaces the program of this very filter.
pub const TC_PRIORITY: u16 = 1;
/// The handle of Hypha's `cls_bpf` filters (see [`TC_PRIORITY`]).
pub const TC_HANDLE: u32 = 1;

/// The programs of the node's VXLAN device, the TCX hook each is attached to, and the
/// hook's name in the pins of their links (`links/tunnel-<hook>`). Not per endpoint:
/// one device per node, attached by [`Datapath::set_tunnel`].
const TUNNEL_ATTACHMENTS: [(&str, u32, TcHook, &str); 2] = [
    (
        programs::FROM_TUNNEL,
        link_info::BPF_TCX_INGRESS,
        TcHook::Ingress,
        "ingress",
    ),
    (
        programs::TO_TUNNEL,
        link_info::BPF_TCX_EGRESS,
        TcHook::Egress,
        "egress",
    ),
];

/// The prefix of the tunnel's link pins under `links/` (endpoints' are `tcx-<ifindex>-`).
const TUNNEL_PIN_PREFIX: &str = "tunnel-";

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
    #[error("cannot {op} on {ifname}: {source}")]
    Netlink {
        op: &'static str,
        ifname: String,
        #[source]
        source: Box<hypha_netlink::Error>,
    },
    #[error("cannot attach program {program} to the {hook} of {ifname}: {source}")]
    Attach {
        program: &'static str,
        ifname: String,
        hook: &'static str,
        #[source]
        source: io::Error,
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
    /// The cluster's nodes claim the same pod CIDR or underlay address.
    #[error("tunnel peers: {problem}")]
    TunnelPeers { problem: String },
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

/// The maps the agent reads and writes, each taken out of the object once at load and
/// kept behind its own lock, held only for syscalls on that map (none of which waits).
///
/// Lock order where two nest: `debug` before `config` (the node's tracing flag follows
/// what the debug map holds). No other two are held at once.
pub(super) struct Maps {
    /// `hypha_ifaces`, `hypha_endpoints4` and `hypha_endpoints6` under one lock, which is
    /// also the one that keeps a read-modify-write of an endpoint's flags (`set_flags`,
    /// `apply_policy`) atomic across all of its entries.
    pub(super) endpoints: Mutex<EndpointMaps>,
    pub(super) ep_stats: Mutex<PerCpuHashMap<MapData, u32, EndpointStats>>,
    drops: Mutex<PerCpuHashMap<MapData, DropKey, Counter>>,
    /// For deletions; `ct_read`, a second handle on the same map, scans it without a lock.
    ct: Mutex<HashMap<MapData, CtKey4, CtEntry>>,
    ct_read: HashMap<MapData, CtKey4, CtEntry>,
    /// As `ct` and `ct_read`, for `hypha_ct6`.
    ct6: Mutex<HashMap<MapData, CtKey6, CtEntry>>,
    ct6_read: HashMap<MapData, CtKey6, CtEntry>,
    debug: Mutex<HashMap<MapData, u32, u32>>,
    config: Mutex<Array<MapData, NodeConfig>>,
    pub(super) ipcache: Mutex<LpmTrie<MapData, u32, IpcacheValue>>,
    pub(super) ipcache6: Mutex<LpmTrie<MapData, [u8; 16], IpcacheValue>>,
    pub(super) policy: Mutex<HashMap<MapData, PolicyKey, PolicyEntry>>,
    policy_stats: Mutex<PerCpuHashMap<MapData, u32, PolicyStats>>,
    /// The tunnel's maps, each behind its own lock too.
    pub(super) tunnel: TunnelMaps,
}

/// Locks a map handle. A panic while one was held leaves nothing half done in the handle
/// (the kernel map changed or it did not), so a poisoned lock is taken as it is.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes map `name` out of the object.
fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, EbpfError> {
    ebpf.take_map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })
}

/// Takes map `name` out of the object as a `T`.
fn take<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, EbpfError> {
    T::try_from(take_map(ebpf, name)?).map_err(map_err("open", name))
}

/// A second handle on the LRU hash map behind `map`, to scan it without the first's lock.
fn second_handle<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, EbpfError> {
    let fd = map
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| EbpfError::Io {
            op: "duplicate the descriptor of map",
            path: name.into(),
            source,
        })?;
    let again = Map::LruHashMap(MapData::from_fd(fd).map_err(map_err("reopen", name))?);
    HashMap::try_from(again).map_err(map_err("open", name))
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        let ct: HashMap<MapData, CtKey4, CtEntry> = take(ebpf, maps::CT4)?;
        let ct_read = second_handle(&ct, maps::CT4)?;
        let ct6: HashMap<MapData, CtKey6, CtEntry> = take(ebpf, maps::CT6)?;
        let ct6_read = second_handle(&ct6, maps::CT6)?;
        Ok(Self {
            endpoints: Mutex::new(EndpointMaps {
                v4: take(ebpf, maps::ENDPOINTS4)?,
                v6: take(ebpf, maps::ENDPOINTS6)?,
                ifaces: take(ebpf, maps::IFACES)?,
            }),
            ep_stats: Mutex::new(take(ebpf, maps::EP_STATS)?),
            drops: Mutex::new(take(ebpf, maps::DROPS)?),
            ct: Mutex::new(ct),
            ct_read,
            ct6: Mutex::new(ct6),
            ct6_read,
            debug: Mutex::new(take(ebpf, DEBUG_MAP)?),
            config: Mutex::new(take(ebpf, maps::CONFIG)?),
            ipcache: Mutex::new(take(ebpf, maps::IPCACHE4)?),
            ipcache6: Mutex::new(take(ebpf, maps::IPCACHE6)?),
            policy: Mutex::new(take(ebpf, maps::POLICY)?),
            policy_stats: Mutex::new(take(ebpf, maps::POLICY_STATS)?),
            tunnel: TunnelMaps {
                config: Mutex::new(take(ebpf, maps::TUNNEL_CONFIG)?),
                tunnel4: Mutex::new(take(ebpf, maps::TUNNEL4)?),
                tunnel6: Mutex::new(take(ebpf, maps::TUNNEL6)?),
                nodes4: Mutex::new(take(ebpf, maps::NODES4)?),
                nodes6: Mutex::new(take(ebpf, maps::NODES6)?),
                stats: Mutex::new(take(ebpf, maps::NODE_STATS)?),
                snat6: Mutex::new(take(ebpf, hypha_common::nat::SNAT6)?),
            },
        })
    }
}

/// A loaded program, as attaching it needs: its fd (taken once at load) and its id.
struct Program {
    name: &'static str,
    fd: ProgramFd,
    id: u32,
    /// `BPF_TCX_INGRESS` or `BPF_TCX_EGRESS`.
    attach_type: u32,
    tc_hook: TcHook,
    hook: &'static str,
}

/// The eBPF datapath. Shared between threads: every operation takes `&self`; map
/// handles sit behind their own short locks (see [`Maps`]) and attaching holds none, so
/// concurrent attaches for different endpoints each wait out their own RCU grace period
/// at the same time.
pub struct EbpfDatapath {
    /// What is left in the object once the maps and programs the agent uses are taken:
    /// the events and log ring buffers (taken at start by the daemon), and the programs'
    /// ownership.
    ebpf: Ebpf,
    maps: Maps,
    programs: Vec<Program>,
    /// `hypha_from_tunnel` and `hypha_to_tunnel` (see [`TUNNEL_ATTACHMENTS`]).
    tunnel_programs: Vec<Program>,
    /// `hypha_from_netdev`, for the node's external devices (see `nodeport`).
    nodeport_program: Program,
    links_dir: PathBuf,
    mode: AttachMode,
    /// The load balancer's maps. The object is embedded and always has them, so a
    /// failure to take them is a failed load, as for the other maps.
    lb: LbMaps,
    /// The socket programs and the namespaces they translate for (`socklb`).
    socklb: SockLb,
    /// Leaf classes `hypha_flow_class` hashes into (`--fq-queues`).
    fq_queues: u16,
}

impl EbpfDatapath {
    /// Loads the programs, re-using maps already pinned under `pin_dir` (an earlier agent's),
    /// and writes the node configuration; endpoints are attached in `mode`, and the flow
    /// classifier hashes into `fq_queues` leaf classes.
    pub fn load(
        pin_dir: &Path,
        gateway: Ipv4Addr,
        mode: AttachMode,
        fq_queues: u16,
    ) -> Result<Self, EbpfError> {
        ensure_bpffs(pin_dir)?;
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&links_dir).map_err(|source| EbpfError::Io {
            op: "create",
            path: links_dir.clone(),
            source,
        })?;
        let queues = u32::from(fq_queues.max(1));
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .override_global(hypha_common::fq::QUEUES_GLOBAL, &queues, true)
            .load(embedded(OBJECT)?)
            .map_err(|source| EbpfError::Load {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(source),
            })?;
        let found: Vec<&str> = ebpf.programs().map(|(name, _)| name).collect();
        if let Some(name) = missing_program(&found) {
            return Err(EbpfError::Missing {
                kind: "program",
                name,
            });
        }
        let programs = ATTACHMENTS
            .into_iter()
            .map(|a| load_program(&mut ebpf, a))
            .collect::<Result<Vec<_>, _>>()?;
        let tunnel_programs = TUNNEL_ATTACHMENTS
            .into_iter()
            .map(|a| load_program(&mut ebpf, a))
            .collect::<Result<Vec<_>, _>>()?;
        let nodeport_program = load_program(
            &mut ebpf,
            (
                hypha_common::nat::FROM_NETDEV,
                link_info::BPF_TCX_INGRESS,
                TcHook::Ingress,
                "ingress",
            ),
        )?;
        // Not attached by the datapath: the rate limiters hand its descriptor to the
        // `htb` qdiscs they install (see `flow_classifier`).
        load_named(&mut ebpf, programs::FLOW_CLASS, |p| {
            <&mut SchedClassifier>::try_from(p)?.load()
        })?;
        let maps = Maps::take(&mut ebpf)?;
        let lb = LbMaps::take(&mut ebpf)?;
        let socklb = SockLb::load(&mut ebpf, pin_dir)?;
        // An earlier agent's traced endpoints stay traced until start-up has re-adopted
        // (or swept) them.
        let tracing = lock(&maps.debug).keys().next().is_some();
        let node = NodeConfig {
            gateway: u32::from_ne_bytes(gateway.octets()),
            flags: if tracing { NODE_F_DEBUG } else { 0 },
        };
        lock(&maps.config)
            .set(0, node, 0)
            .map_err(map_err("write", maps::CONFIG))?;
        // The new programs are loaded with the new maps; the retired ones are no one's
        // to load any more.
        unpin_retired(pin_dir)?;
        Ok(Self {
            ebpf,
            maps,
            programs,
            tunnel_programs,
            nodeport_program,
            links_dir,
            mode,
            lb,
            socklb,
            fq_queues: fq_queues.max(1),
        })
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
    fn write_debug(&self, ep: &EndpointRecord, on: bool) -> Result<(), EbpfError> {
        let mut map = lock(&self.maps.debug);
        if on {
            map.insert(ep.host_ifindex, ep.id, 0)
                .map_err(map_err("insert into", DEBUG_MAP))?;
        } else if let Err(e) = map.remove(&ep.host_ifindex)
            && !is_not_found(&e)
        {
            return Err(map_err("delete from", DEBUG_MAP)(e));
        }
        self.sync_debug_flag(&map)
    }

    /// Sets `NODE_F_DEBUG` in `hypha_config` when `hypha_debug` (held locked by the caller,
    /// so that the flag follows the last change) has an entry, clears it when it has none.
    fn sync_debug_flag(&self, debug: &HashMap<MapData, u32, u32>) -> Result<(), EbpfError> {
        let tracing = debug.keys().next().is_some();
        let mut config = lock(&self.maps.config);
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

    /// Where the link of the tunnel program on `hook` of the VXLAN device is pinned.
    fn tunnel_pin(&self, hook: &str) -> PathBuf {
        self.links_dir.join(format!("{TUNNEL_PIN_PREFIX}{hook}"))
    }

    /// What of the socket load balancer's attachment is missing or different: each
    /// socket program's pinned link on the cgroup, running this agent's program.
    pub fn check_socket_lb(&self) -> Vec<String> {
        self.socklb.check_attached()
    }

    /// What of `tunnel` is missing or different in the datapath: the programs on the
    /// device's hooks and the config map (empty when all is in place).
    pub fn check_tunnel(&self, tunnel: &TunnelSetup) -> Vec<String> {
        let mut problems = Vec::new();
        for prog in &self.tunnel_programs {
            let pin = self.tunnel_pin(prog.hook);
            problems.extend(check_tcx_link(prog, &pin, tunnel.ifindex, &tunnel.ifname));
        }
        match self.maps.tunnel.read_config() {
            Ok(c) if c == tunnel_maps::config(Some(tunnel)) => {}
            Ok(c) => problems.push(format!(
                "{} holds {c:?}, not the tunnel on {} (ifindex {})",
                maps::TUNNEL_CONFIG,
                tunnel.ifname,
                tunnel.ifindex
            )),
            Err(e) => problems.push(e.to_string()),
        }
        problems
    }

    /// Removes the tracked connections (of `hypha_ct4` and `hypha_ct6`) with one of the
    /// endpoint's addresses on either side, so that the next endpoint given the address
    /// does not inherit them (an established flow is kept for hours, and its replies pass
    /// the new endpoint's policy).
    fn forget_connections(&self, ep: &EndpointRecord) -> Vec<EbpfError> {
        let mut errors = Vec::new();
        if let Some(address) = ep.address {
            // The map holds addresses as in the packet (network byte order).
            let raw = u32::from_ne_bytes(address.octets());
            errors.extend(forget(&self.maps.ct_read, &self.maps.ct, maps::CT4, |k| {
                k.saddr == raw || k.daddr == raw
            }));
        }
        if let Some(address) = ep.address6 {
            let raw = address.octets();
            errors.extend(forget(
                &self.maps.ct6_read,
                &self.maps.ct6,
                maps::CT6,
                |k| k.saddr == raw || k.daddr == raw,
            ));
        }
        errors
    }

    /// Writes the endpoint's map entries; the stats entry is created only when missing,
    /// so that adopting an endpoint keeps its counters.
    ///
    /// `flags` are the control plane's (policy and bandwidth bits); the entries also get
    /// the family bits of the record's addresses (see [`super::endpoint_maps`]).
    fn fill_maps(&self, ep: &EndpointRecord, flags: u32) -> Result<(), EbpfError> {
        {
            let mut stats = lock(&self.maps.ep_stats);
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
        }
        lock(&self.maps.endpoints).write(ep, flags)?;
        self.write_debug(ep, ep.debug)
    }

    fn attach_all(&self, ep: &EndpointRecord, policy_flags: u32) -> Result<Adoption, EbpfError> {
        self.fill_maps(ep, policy_flags)?;
        let reused = match self.mode {
            AttachMode::Tc => self.attach_tc(ep)?,
            AttachMode::Tcx => self.attach_tcx(ep)?,
        };
        // Last: the pod's traffic does not wait on its services.
        self.socklb.register(ep)?;
        Ok(if reused {
            Adoption::Adopted
        } else {
            Adoption::Reattached
        })
    }

    /// Puts the programs on the endpoint's veth as `cls_bpf` filters of its `clsact`
    /// qdisc, replacing the programs of filters already there in place (`NLM_F_REPLACE`
    /// of the same priority and handle: the hook never runs without one). TCX links of
    /// the endpoint (an agent in TCX mode made them) are removed once the filters are
    /// in: TCX runs before tc and its verdict is final, so they decided until then, and
    /// the filters decide after. Returns whether the endpoint was attached already
    /// (filters or links).
    ///
    /// Costs ~0.3 ms (no RCU grace period); runs with no lock of ours held.
    fn attach_tc(&self, ep: &EndpointRecord) -> Result<bool, EbpfError> {
        let ifindex = ep.host_ifindex;
        let nl_err = |op| netlink_error(&ep.host_ifname, op);
        let mut nl = Netlink::new().map_err(nl_err("open a netlink socket"))?;
        let mut reused = true;
        for prog in &self.programs {
            let ours = nl
                .bpf_filters(ifindex, prog.tc_hook)
                .map_err(nl_err("list the tc filters"))?
                .iter()
                .any(|f| f.priority == TC_PRIORITY && f.handle == TC_HANDLE);
            reused &= ours || self.link_pin(ifindex, prog.hook).exists();
        }
        nl.add_clsact(ifindex)
            .map_err(nl_err("add the clsact qdisc"))?;
        for prog in &self.programs {
            let filter = BpfFilter {
                hook: prog.tc_hook,
                priority: TC_PRIORITY,
                handle: TC_HANDLE,
                prog_fd: prog.fd.as_fd().as_raw_fd(),
                name: prog.name,
            };
            nl.add_bpf_filter(ifindex, &filter, true)
                .map_err(nl_err("add a cls_bpf filter"))?;
        }
        for prog in &self.programs {
            remove_pin(&self.link_pin(ifindex, prog.hook))?;
        }
        Ok(reused)
    }

    /// Attaches the programs with TCX links (swapping the programs of links already
    /// pinned in place), then removes Hypha's tc filters from the veth (an agent in tc
    /// mode made them): TCX runs before tc with a final verdict, so the links decide from
    /// the moment they are in. Returns whether the endpoint was attached already.
    fn attach_tcx(&self, ep: &EndpointRecord) -> Result<bool, EbpfError> {
        // Each TCX attach waits for an RCU grace period in the kernel (~15 ms here); the
        // two hooks are attached concurrently so an endpoint pays for one, not two, and
        // no lock is held meanwhile, so other endpoints' attaches overlap with it.
        let results: Vec<Result<bool, EbpfError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .programs
                .iter()
                .map(|prog| {
                    let pin = self.link_pin(ep.host_ifindex, prog.hook);
                    scope.spawn(move || attach_program(prog, ep, &pin))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("attach thread does not panic"))
                .collect()
        });
        let mut linked = true;
        for r in results {
            linked &= r?;
        }
        let filtered = self.remove_tc_filters(ep.host_ifindex, &ep.host_ifname)?;
        Ok(linked || filtered)
    }

    /// Removes Hypha's `cls_bpf` filters (priority [`TC_PRIORITY`], handle [`TC_HANDLE`])
    /// from veth `ifname`, if it is still the interface at `ifindex`, and
    /// the `clsact` qdisc with them once it holds no other filter. Returns whether both
    /// hooks had one.
    fn remove_tc_filters(&self, ifindex: u32, ifname: &str) -> Result<bool, EbpfError> {
        let nl_err = |op| netlink_error(ifname, op);
        let mut nl = Netlink::new().map_err(nl_err("open a netlink socket"))?;
        // A veth deleted already took its qdisc along; its ifindex may be another's now.
        let same = nl
            .link_by_index(ifindex)
            .map_err(nl_err("look up the veth"))?
            .is_some_and(|l| l.name == ifname);
        if !same {
            return Ok(false);
        }
        let (mut all, mut any, mut others) = (true, false, false);
        for prog in &self.programs {
            let filters = nl
                .bpf_filters(ifindex, prog.tc_hook)
                .map_err(nl_err("list the tc filters"))?;
            others |= filters
                .iter()
                .any(|f| f.priority != TC_PRIORITY || f.handle != TC_HANDLE);
            let ours = filters
                .iter()
                .any(|f| f.priority == TC_PRIORITY && f.handle == TC_HANDLE);
            if ours {
                nl.delete_bpf_filter(ifindex, prog.tc_hook, TC_PRIORITY, TC_HANDLE)
                    .map_err(nl_err("delete a cls_bpf filter"))?;
            }
            all &= ours;
            any |= ours;
        }
        // Without a filter of ours there may be no clsact at all (deleting it would fail),
        // or one that is someone else's.
        if any && !others {
            nl.delete_clsact(ifindex)
                .map_err(nl_err("delete the clsact qdisc"))?;
        }
        Ok(all)
    }
}

impl EbpfDatapath {
    /// Removes Hypha's `cls_bpf` filters (ours by priority, handle and program name) from
    /// every interface that is not one of `keep`'s, whatever the mode: filters outlive
    /// the agent, unlike pins they are not listed anywhere of ours. This assumes one agent
    /// per network namespace: another agent's filters there would look like orphans.
    fn sweep_tc_filters(&self, keep: &HashSet<u32>) -> Vec<EbpfError> {
        let nl_err = |op| {
            move |source| EbpfError::Netlink {
                op,
                ifname: "-".into(),
                source: Box::new(source),
            }
        };
        let mut errors = Vec::new();
        let mut nl = match Netlink::new() {
            Ok(nl) => nl,
            Err(e) => return vec![nl_err("open a netlink socket")(e)],
        };
        let links = match nl.links() {
            Ok(links) => links,
            Err(e) => return vec![nl_err("list the interfaces")(e)],
        };
        for link in links.iter().filter(|l| !keep.contains(&l.index)) {
            let mut ours = false;
            for prog in &self.programs {
                match nl.bpf_filters(link.index, prog.tc_hook) {
                    Ok(filters) => {
                        ours |= filters.iter().any(|f| {
                            f.priority == TC_PRIORITY
                                && f.handle == TC_HANDLE
                                && f.name.starts_with(prog.name)
                        });
                    }
                    Err(source) => errors.push(EbpfError::Netlink {
                        op: "list the tc filters",
                        ifname: link.name.clone(),
                        source: Box::new(source),
                    }),
                }
            }
            if ours && let Err(e) = self.remove_tc_filters(link.index, &link.name) {
                errors.push(e);
            }
        }
        errors
    }
}

/// Turns a netlink error into one naming the operation and the endpoint's veth.
fn netlink_error(
    ifname: &str,
    op: &'static str,
) -> impl FnOnce(hypha_netlink::Error) -> EbpfError + use<> {
    let ifname = ifname.to_owned();
    move |source| EbpfError::Netlink {
        op,
        ifname,
        source: Box::new(source),
    }
}

impl Datapath for EbpfDatapath {
    type Error = EbpfError;

    fn attach(&self, ep: &EndpointRecord, policy_flags: u32) -> Result<(), EbpfError> {
        // A fresh endpoint must not inherit links of an earlier veth with the same ifindex.
        for (_, _, _, suffix) in ATTACHMENTS {
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

    fn adopt(&self, ep: &EndpointRecord, policy_flags: u32) -> Result<Adoption, EbpfError> {
        self.attach_all(ep, policy_flags)
    }

    fn set_flags(&self, ep: &EndpointRecord, mask: u32, flags: u32) -> Result<(), EbpfError> {
        // One lock over the reads and the writes: `apply_policy` changes other bits of the
        // same values under it.
        lock(&self.maps.endpoints).set_flags(ep, mask, flags)
    }

    fn set_debug(&self, ep: &EndpointRecord, on: bool) -> Result<(), EbpfError> {
        self.write_debug(ep, on)
    }

    fn apply_policy(&self, diff: &PolicyDiff) -> Result<(), EbpfError> {
        super::policy_maps::apply(&self.maps, diff)
    }

    fn policy_stats(&self) -> Result<Vec<(u32, PolicyStats)>, EbpfError> {
        let stats = lock(&self.maps.policy_stats);
        let mut out = Vec::new();
        for item in stats.iter() {
            let (id, per_cpu) = item.map_err(map_err("read", maps::POLICY_STATS))?;
            let mut sum = PolicyStats::default();
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
        super::policy_maps::installed(&self.maps)
    }

    fn detach(&self, ep: &EndpointRecord) -> Vec<EbpfError> {
        let mut errors = Vec::new();
        // Both modes: an endpoint may be left attached the other way.
        if let Err(e) = self.remove_tc_filters(ep.host_ifindex, &ep.host_ifname) {
            errors.push(e);
        }
        for (_, _, _, suffix) in ATTACHMENTS {
            if let Err(e) = remove_pin(&self.link_pin(ep.host_ifindex, suffix)) {
                errors.push(e);
            }
        }
        errors.extend(lock(&self.maps.endpoints).remove(ep));
        if let Err(e) = lock(&self.maps.ep_stats).remove(&ep.host_ifindex)
            && !is_not_found(&e)
        {
            errors.push(map_err("delete from", maps::EP_STATS)(e));
        }
        errors.extend(self.remove_drops(|k| k.ifindex == ep.host_ifindex));
        errors.extend(self.forget_connections(ep));
        errors.extend(self.socklb.unregister(ep));
        if let Err(e) = self.write_debug(ep, false) {
            errors.push(e);
        }
        errors
    }

    fn check(&self, ep: &EndpointRecord) -> Vec<String> {
        let mut problems = lock(&self.maps.endpoints).check(ep);
        problems.extend(self.socklb.check(ep));
        if lock(&self.maps.ep_stats).get(&ep.host_ifindex, 0).is_err() {
            problems.push(format!(
                "{} has no counters for ifindex {}",
                maps::EP_STATS,
                ep.host_ifindex
            ));
        }
        match self.mode {
            AttachMode::Tc => problems.extend(self.check_filters(ep)),
            AttachMode::Tcx => {
                for prog in &self.programs {
                    let pin = self.link_pin(ep.host_ifindex, prog.hook);
                    problems.extend(check_link(ep, prog, &pin));
                }
            }
        }
        problems
    }

    fn sweep(&self, keep: &[EndpointRecord]) -> Vec<EbpfError> {
        let mut errors = lock(&self.maps.endpoints).sweep(keep);
        errors.extend(self.socklb.sweep(keep));
        let ifindexes: HashSet<u32> = keep.iter().map(|e| e.host_ifindex).collect();
        {
            let mut m = lock(&self.maps.ep_stats);
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
        // The VXLAN device's drops are the tunnel's, not an endpoint's.
        let tunnel = match self.maps.tunnel.read_config() {
            Ok(c) => c.ifindex,
            Err(e) => {
                errors.push(e);
                0
            }
        };
        errors.extend(self.remove_drops(|k| {
            !ifindexes.contains(&k.ifindex) && (tunnel == 0 || k.ifindex != tunnel)
        }));
        let traced: HashSet<u32> = keep
            .iter()
            .filter(|e| e.debug)
            .map(|e| e.host_ifindex)
            .collect();
        {
            let mut m = lock(&self.maps.debug);
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
            if let Err(e) = self.sync_debug_flag(&m) {
                errors.push(e);
            }
        }
        match std::fs::read_dir(&self.links_dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    // The tunnel's links are set_tunnel's to keep or remove, the
                    // NodePort devices' set_nodeport's.
                    if name.to_str().is_some_and(|n| {
                        n.starts_with(TUNNEL_PIN_PREFIX)
                            || n.starts_with(super::nodeport::PIN_PREFIX)
                    }) {
                        continue;
                    }
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
        errors.extend(self.sweep_tc_filters(&ifindexes));
        errors
    }

    fn stats(&self, ifindex: u32) -> Result<EndpointStats, EbpfError> {
        let per_cpu = match lock(&self.maps.ep_stats).get(&ifindex, 0) {
            Ok(v) => v,
            Err(e) if is_not_found(&e) => return Ok(EndpointStats::default()),
            Err(e) => return Err(map_err("read", maps::EP_STATS)(e)),
        };
        let mut sum = EndpointStats::default();
        for cpu in per_cpu.iter() {
            sum.add(cpu);
        }
        Ok(sum)
    }

    fn drops(&self) -> Result<Vec<(DropKey, Counter)>, EbpfError> {
        let drops = lock(&self.maps.drops);
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

    fn flow_classifier(&self) -> Option<super::FlowClassifier<'_>> {
        let prog = self.ebpf.program(programs::FLOW_CLASS)?;
        prog.fd().ok().map(|fd| super::FlowClassifier {
            fd: fd.as_fd(),
            queues: self.fq_queues,
        })
    }

    fn set_tunnel(&self, tunnel: Option<&TunnelSetup>) -> Result<(), EbpfError> {
        match tunnel {
            Some(t) => {
                // Programs first: the config tells hypha_from_pod to send into the
                // device, whose egress program must be there by then.
                for prog in &self.tunnel_programs {
                    attach_tunnel_program(prog, t, &self.tunnel_pin(prog.hook))?;
                }
                self.maps
                    .tunnel
                    .write_config(tunnel_maps::config(Some(t)))?;
                self.maps.tunnel.write_snat6(t.snat6)
            }
            None => {
                // Config first: nothing is sent into the device once it is zero. No SNAT
                // address either: its replies would have no tunnel to come back by.
                let mut result = self.maps.tunnel.write_config(tunnel_maps::config(None));
                let cleared = self.maps.tunnel.write_snat6(None);
                if result.is_ok() {
                    result = cleared;
                }
                for prog in &self.tunnel_programs {
                    let removed = remove_pin(&self.tunnel_pin(prog.hook));
                    if result.is_ok() {
                        result = removed;
                    }
                }
                result
            }
        }
    }

    fn set_nodeport(&self, devices: &[super::NodePortDevice]) -> Result<(), EbpfError> {
        super::nodeport::set(self.nodeport_program.fd.as_fd(), &self.links_dir, devices)
    }

    fn set_tunnel_peers(&self, peers: &[TunnelPeerSpec]) -> Vec<EbpfError> {
        self.maps.tunnel.set_peers(peers)
    }

    fn node_stats(&self) -> Result<Vec<(u32, NodeStats)>, EbpfError> {
        self.maps.tunnel.node_stats()
    }

    fn apply_lb(&self, diff: &LbDiff) -> Vec<EbpfError> {
        self.lb.apply(diff)
    }

    fn installed_lb(&self) -> Result<InstalledLb, EbpfError> {
        self.lb.installed()
    }

    fn lb_stats(&self) -> Result<Vec<(u32, hypha_common::lb::LbBackendStats)>, EbpfError> {
        self.lb.stats()
    }

    fn set_socket_lb(&self, cgroup: &Path) -> Result<(), EbpfError> {
        self.socklb.attach(cgroup)
    }
}

impl EbpfDatapath {
    fn remove_drops(&self, stale: impl Fn(&DropKey) -> bool) -> Vec<EbpfError> {
        let mut errors = Vec::new();
        let mut m = lock(&self.maps.drops);
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
        errors
    }
}

/// Whether the link pinned at `pin` is attached to the endpoint's veth at the program's
/// hook and runs the program this agent loaded: a link can stay pinned after its
/// program was replaced through it or after it was detached from its device.
fn check_link(ep: &EndpointRecord, prog: &Program, pin: &Path) -> Vec<String> {
    check_tcx_link(prog, pin, ep.host_ifindex, &ep.host_ifname)
}

/// Whether the link pinned at `pin` is attached to device `ifindex` (`ifname`) at the
/// program's hook and runs the program this agent loaded.
fn check_tcx_link(prog: &Program, pin: &Path, ifindex: u32, ifname: &str) -> Vec<String> {
    let name = prog.name;
    let hook_name = prog.hook;
    let mut problems = Vec::new();
    let link = match link_info::read(pin) {
        Ok(link) => link,
        Err(e) => {
            return vec![format!(
                "program {name} is not attached to {}: cannot open its pinned link {}: {e}",
                ifname,
                pin.display()
            )];
        }
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
            ifname,
            pin.display(),
            link.id
        ));
    } else if link.ifindex != ifindex || link.attach_type != prog.attach_type {
        problems.push(format!(
            "the pinned link {} of program {name} is attached to ifindex {} (attach type {}), not to the {hook_name} of {} (ifindex {})",
            pin.display(),
            link.ifindex,
            link.attach_type,
            ifname,
            ifindex
        ));
    }
    if prog.id != link.prog_id {
        problems.push(format!(
            "program {name} is not what runs on the {hook_name} of {}: its pinned link {} runs program {} (id {}), not the agent's {name} (id {})",
            ifname,
            pin.display(),
            program_name(link.prog_id),
            link.prog_id,
            prog.id
        ));
    }
    problems
}

impl EbpfDatapath {
    /// Whether each program is the one that runs in Hypha's filter on its hook of the
    /// endpoint's veth, in direct-action mode.
    fn check_filters(&self, ep: &EndpointRecord) -> Vec<String> {
        let mut nl = match Netlink::new() {
            Ok(nl) => nl,
            Err(e) => return vec![format!("cannot open a netlink socket: {e}")],
        };
        let mut problems = Vec::new();
        for prog in &self.programs {
            let (name, hook) = (prog.name, prog.hook);
            let filters = match nl.bpf_filters(ep.host_ifindex, prog.tc_hook) {
                Ok(f) => f,
                Err(e) => {
                    problems.push(format!(
                        "cannot list the tc filters on the {hook} of {}: {e}",
                        ep.host_ifname
                    ));
                    continue;
                }
            };
            let Some(f) = filters
                .iter()
                .find(|f| f.priority == TC_PRIORITY && f.handle == TC_HANDLE)
            else {
                problems.push(format!(
                    "program {name} is not attached to the {hook} of {}: it has no tc filter with priority {TC_PRIORITY} and handle {TC_HANDLE}",
                    ep.host_ifname
                ));
                continue;
            };
            if f.prog_id != prog.id {
                problems.push(format!(
                    "program {name} is not what runs on the {hook} of {}: its tc filter runs program {} (id {}), not the agent's {name} (id {})",
                    ep.host_ifname,
                    program_name(f.prog_id),
                    f.prog_id,
                    prog.id
                ));
            }
            if !f.direct_action {
                problems.push(format!(
                    "the tc filter of program {name} on the {hook} of {} is not in direct-action mode",
                    ep.host_ifname
                ));
            }
        }
        problems
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
        .map(|(name, _, _, _)| *name)
        .find(|name| !found.contains(name))
}

/// How many times a load the verifier gave up on with EAGAIN is tried.
const LOAD_ATTEMPTS: u32 = 5;

/// Loads program `name` of `ebpf` with `load` (the load of its type), then returns a
/// descriptor of its own and the kernel's id of it. The verifier gives up with EAGAIN
/// when a signal is pending on the loading thread; such a load is tried again, as
/// libbpf does.
pub(super) fn load_named(
    ebpf: &mut Ebpf,
    name: &'static str,
    load: impl Fn(&mut aya::programs::Program) -> Result<(), ProgramError>,
) -> Result<(ProgramFd, u32), EbpfError> {
    let prog_err = |op| {
        move |source| EbpfError::Program {
            op,
            program: name,
            ifname: "-".into(),
            source: Box::new(source),
        }
    };
    let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing {
        kind: "program",
        name,
    })?;
    let mut attempt = 1;
    loop {
        match load(prog) {
            Ok(()) => break,
            Err(ProgramError::LoadError { io_error, .. })
                if attempt < LOAD_ATTEMPTS && io_error.raw_os_error() == Some(libc::EAGAIN) =>
            {
                tracing::debug!(
                    program = name,
                    attempt,
                    "the verifier gave up (EAGAIN); loading again"
                );
                attempt += 1;
            }
            Err(e) => return Err(prog_err("load")(e)),
        }
    }
    let fd = prog
        .fd()
        .map_err(prog_err("open"))?
        .try_clone()
        .map_err(|source| EbpfError::Io {
            op: "duplicate the descriptor of program",
            path: name.into(),
            source,
        })?;
    let id = prog.info().map_err(prog_err("read"))?.id();
    Ok((fd, id))
}

/// Loads the program of `attachment` (one of [`ATTACHMENTS`] or [`TUNNEL_ATTACHMENTS`])
/// and keeps what attaching it needs.
fn load_program(
    ebpf: &mut Ebpf,
    (name, attach_type, tc_hook, hook): (&'static str, u32, TcHook, &'static str),
) -> Result<Program, EbpfError> {
    let (fd, id) = load_named(ebpf, name, |p| <&mut SchedClassifier>::try_from(p)?.load())?;
    Ok(Program {
        name,
        fd,
        id,
        attach_type,
        tc_hook,
        hook,
    })
}

/// Attaches the tunnel program `prog` to the VXLAN device, swapping it in place into
/// the link pinned at `pin` when that link is on this device's hook (an earlier agent's:
/// the device never runs without the program). A pinned link on anything else (the
/// device was made anew, so the old link is detached) is replaced by a new one.
fn attach_tunnel_program(
    prog: &Program,
    tunnel: &TunnelSetup,
    pin: &Path,
) -> Result<(), EbpfError> {
    attach_pinned(
        prog.fd.as_fd(),
        pin,
        |link| {
            let info = link_info::info(link)?;
            Ok(info.ifindex == tunnel.ifindex && info.attach_type == prog.attach_type)
        },
        || {
            link_info::tcx_attach(prog.fd.as_fd(), tunnel.ifindex, prog.attach_type).map_err(
                |source| EbpfError::Attach {
                    program: prog.name,
                    ifname: tunnel.ifname.clone(),
                    hook: prog.hook,
                    source,
                },
            )
        },
    )
}

/// Puts `prog` on a hook through the link pinned at `pin`: swapped into that link in
/// place (`BPF_LINK_UPDATE`, the hook never runs without a program) when `on_hook`
/// says the link is on this hook, otherwise attached anew by `attach` and pinned in
/// place of the old link (which its pin's removal detaches).
pub(super) fn attach_pinned(
    prog: BorrowedFd<'_>,
    pin: &Path,
    on_hook: impl FnOnce(BorrowedFd<'_>) -> io::Result<bool>,
    attach: impl FnOnce() -> Result<OwnedFd, EbpfError>,
) -> Result<(), EbpfError> {
    let link_err = |op: &'static str| {
        move |source: io::Error| EbpfError::Link {
            op,
            path: pin.to_owned(),
            source: Box::new(source),
        }
    };
    match link_info::open_pin(pin) {
        Ok(link) => {
            if on_hook(link.as_fd()).map_err(link_err("read"))? {
                return link_info::update(link.as_fd(), prog)
                    .map_err(link_err("swap the program into"));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(link_err("open")(e)),
    }
    let link = attach()?;
    // The old link (if any) goes with its pin once the new one is in.
    remove_pin(pin)?;
    link_info::pin(link.as_fd(), pin).map_err(link_err("pin"))
}

/// Attaches `prog` to the endpoint's veth, swapping it into the link pinned at `pin` in
/// place when one is there. Returns whether an existing link was re-used. Takes no lock:
/// the attach waits for an RCU grace period.
fn attach_program(prog: &Program, ep: &EndpointRecord, pin: &Path) -> Result<bool, EbpfError> {
    let link_err = |op: &'static str| {
        move |source: io::Error| EbpfError::Link {
            op,
            path: pin.to_owned(),
            source: Box::new(source),
        }
    };
    match link_info::open_pin(pin) {
        Ok(link) => {
            link_info::update(link.as_fd(), prog.fd.as_fd())
                .map_err(link_err("swap the program into"))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let link = link_info::tcx_attach(prog.fd.as_fd(), ep.host_ifindex, prog.attach_type)
                .map_err(|source| EbpfError::Attach {
                    program: prog.name,
                    ifname: ep.host_ifname.clone(),
                    hook: prog.hook,
                    source,
                })?;
            // The pin keeps the link alive once our fd is closed.
            link_info::pin(link.as_fd(), pin).map_err(link_err("pin"))?;
            Ok(false)
        }
        Err(e) => Err(link_err("open")(e)),
    }
}

/// Removing a link's pin detaches it (nothing else holds it); absent is fine.
pub(super) fn remove_pin(path: &Path) -> Result<(), EbpfError> {
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

/// Removes the entries of the LRU map (`write`, scanned through `read`, its second
/// handle, without the lock) whose keys are `stale`.
fn forget<K: aya::Pod>(
    read: &HashMap<MapData, K, CtEntry>,
    write: &Mutex<HashMap<MapData, K, CtEntry>>,
    map: &'static str,
    stale: impl Fn(&K) -> bool,
) -> Vec<EbpfError> {
    // The scan reads through the second handle: concurrent DELs do not queue on it.
    let keys: Vec<K> = read.keys().filter_map(Result::ok).filter(stale).collect();
    if keys.is_empty() {
        return Vec::new();
    }
    let mut m = lock(write);
    keys.iter()
        .filter_map(|k| match m.remove(k) {
            // The LRU may have evicted it meanwhile.
            Err(e) if !is_not_found(&e) => Some(map_err("delete from", map)(e)),
            _ => None,
        })
        .collect()
}

/// Unpins the maps earlier versions pinned under names whose layouts are gone
/// ([`maps::RETIRED`]). Programs still attached keep the maps they hold; the pins only
/// kept them alive for the next load. Absent is fine.
fn unpin_retired(pin_dir: &Path) -> Result<(), EbpfError> {
    for name in maps::RETIRED {
        remove_pin(&pin_dir.join(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod concurrency_tests;
#[cfg(test)]
mod tunnel_tests;
#[cfg(test)]
mod writer_tests;

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
