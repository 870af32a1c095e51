//! Loading the eBPF object and running its programs on crafted frames with
//! `BPF_PROG_TEST_RUN` ("packets before namespaces").
//!
//! Privileged: loading needs CAP_BPF and CAP_SYS_ADMIN (for a private bpffs), the
//! test-run devices need CAP_NET_ADMIN. Helpers panic with context instead of
//! returning errors: they only ever run inside tests.

use std::{
    fs::File,
    marker::PhantomData,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuHashMap, PerCpuValues, RingBuf, lpm_trie::Key},
    programs::{SchedClassifier, TcAttachType},
    util::nr_cpus,
};
use hypha_common::{
    Counter, CtEntry, CtKey4, CtKey6, DropKey, ENDPOINT_F_IPV4, ENDPOINT_F_IPV6, EndpointIface,
    EndpointInfo, EndpointKey4, EndpointKey6, EndpointStats, Event, FamilyStats, IpcacheValue,
    NodeConfig, NodeStats, PolicyEntry, PolicyKey, TunnelConfig, TunnelPeer, maps, programs,
};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    net::if_::if_nametoindex,
    sched::{CloneFlags, setns, unshare},
};

/// `TC_ACT_OK`: hand the packet on (to the host stack, at ingress).
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_SHOT`: drop the packet.
pub const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`: what `bpf_redirect` and `bpf_redirect_peer` return on success.
pub const TC_ACT_REDIRECT: u32 = 7;

/// Environment variable that overrides where the eBPF object is read from.
pub const OBJ_ENV: &str = "HYPHA_EBPF_OBJ";

/// Makes names unique within this process; the pid makes them unique across processes.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

fn unique_name(prefix: &str) -> String {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{id}", std::process::id())
}

/// The eBPF object: `$HYPHA_EBPF_OBJ`, or where `cargo xtask build-ebpf` puts it.
pub fn object_path() -> PathBuf {
    if let Some(path) = std::env::var_os(OBJ_ENV) {
        return PathBuf::from(path);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .join("target/bpfel-unknown-none/release/hypha-ebpf")
}

/// The datapath object, loaded and verified, with maps private to this instance.
///
/// The object declares its maps pinned by name, and aya pins such maps whenever it
/// loads them (under `/sys/fs/bpf` unless told otherwise). So that tests neither touch
/// nor re-use a real agent's maps, the pins go to a private bpffs mounted for this
/// instance and unmounted when it is dropped.
pub struct Datapath {
    // Dropped before `_bpffs`, so the maps are closed before their pins go.
    ebpf: Ebpf,
    _bpffs: PrivateBpffs,
}

impl Datapath {
    /// Loads the object and both programs; loading runs the verifier, so a program
    /// the kernel rejects fails here with the verifier's log.
    pub fn load() -> Self {
        let mut dp = Self::open();
        for name in [programs::FROM_POD, programs::TO_POD] {
            dp.load_program(name);
        }
        dp
    }

    /// The object with its maps created and no program loaded: for tests of other
    /// programs than the pod's two (verifying those takes seconds), which load their own
    /// through [`Datapath::ebpf_mut`].
    pub fn open() -> Self {
        Self::open_with_globals(&[])
    }

    /// [`Datapath::open`] with the object's globals `globals` (name, value) set, as the
    /// agent sets them at load (the flow classifier's leaf count).
    pub fn open_with_globals(globals: &[(&str, u32)]) -> Self {
        let path = object_path();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read the eBPF object {}: {e}; run `cargo xtask build-ebpf` \
                 (or set {OBJ_ENV})",
                path.display()
            )
        });
        let bpffs = PrivateBpffs::mount();
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&bpffs.path);
        for (name, value) in globals {
            loader.override_global(name, value, true);
        }
        let ebpf = loader
            .load(&bytes)
            .unwrap_or_else(|e| panic!("load {}: {}", path.display(), chain(&e)));
        Self {
            ebpf,
            _bpffs: bpffs,
        }
    }

    /// Loads (verifies) the tunnel device's programs, `hypha_from_tunnel` and
    /// `hypha_to_tunnel`, besides the two [`Datapath::load`] loads.
    pub fn load_tunnel_programs(&mut self) {
        for name in [programs::FROM_TUNNEL, programs::TO_TUNNEL] {
            self.load_program(name);
        }
    }

    /// Loads (verifies) one more program of the object, such as
    /// `hypha_flow_class`, besides the two [`Datapath::load`] loads.
    pub fn load_program(&mut self, name: &str) {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("program {name} missing"))
            .try_into()
            .unwrap_or_else(|e| panic!("program {name} is not a TC classifier: {e}"));
        // The verifier gives up with EAGAIN when a signal is pending on the loading
        // thread (tests run many at once, with child processes); libbpf retries such
        // loads, and so does this.
        for attempt in 1.. {
            match program.load() {
                Ok(()) => return,
                Err(e) if attempt < 5 && chain(&e).contains("os error 11") => {}
                Err(e) => panic!("load program {name} (verifier): {}", chain(&e)),
            }
        }
    }

    /// Writes index 0 of `hypha_tunnel_cfg`.
    pub fn set_tunnel_config(&mut self, config: TunnelConfig) {
        let mut map: Array<&mut MapData, TunnelConfig> = self.map_mut(maps::TUNNEL_CONFIG);
        map.set(0, config, 0)
            .unwrap_or_else(|e| panic!("write {}[0]: {e}", maps::TUNNEL_CONFIG));
    }

    /// Routes the IPv4 pod CIDR `addr/prefix_len` to `peer` in `hypha_tunnel4`.
    pub fn add_tunnel_peer4(&mut self, addr: [u8; 4], prefix_len: u32, peer: TunnelPeer) {
        let mut map: LpmTrie<&mut MapData, u32, TunnelPeer> = self.map_mut(maps::TUNNEL4);
        map.insert(&Key::new(prefix_len, u32::from_ne_bytes(addr)), peer, 0)
            .unwrap_or_else(|e| panic!("insert into {}: {e}", maps::TUNNEL4));
    }

    /// Routes the IPv6 pod CIDR `addr/prefix_len` to `peer` in `hypha_tunnel6`.
    pub fn add_tunnel_peer6(&mut self, addr: [u8; 16], prefix_len: u32, peer: TunnelPeer) {
        let mut map: LpmTrie<&mut MapData, [u8; 16], TunnelPeer> = self.map_mut(maps::TUNNEL6);
        map.insert(&Key::new(prefix_len, addr), peer, 0)
            .unwrap_or_else(|e| panic!("insert into {}: {e}", maps::TUNNEL6));
    }

    /// Makes the IPv4 underlay address `addr` the node `node_id`'s in `hypha_nodes4`.
    pub fn add_node4(&mut self, addr: [u8; 4], node_id: u32) {
        let mut map: HashMap<&mut MapData, u32, u32> = self.map_mut(maps::NODES4);
        map.insert(u32::from_ne_bytes(addr), node_id, 0)
            .unwrap_or_else(|e| panic!("insert into {}: {e}", maps::NODES4));
    }

    /// Makes the IPv6 underlay address `addr` the node `node_id`'s in `hypha_nodes6`.
    pub fn add_node6(&mut self, addr: [u8; 16], node_id: u32) {
        let mut map: HashMap<&mut MapData, [u8; 16], u32> = self.map_mut(maps::NODES6);
        map.insert(addr, node_id, 0)
            .unwrap_or_else(|e| panic!("insert into {}: {e}", maps::NODES6));
    }

    /// Creates a zeroed `hypha_node_stats` entry for the node `node_id`, as the agent does.
    pub fn add_node_stats(&mut self, node_id: u32) {
        let cpus = nr_cpus().expect("number of possible CPUs");
        let zeroed =
            PerCpuValues::try_from(vec![NodeStats::default(); cpus]).expect("per-CPU values");
        let mut stats: PerCpuHashMap<&mut MapData, u32, NodeStats> = self.map_mut(maps::NODE_STATS);
        stats
            .insert(node_id, zeroed, 0)
            .unwrap_or_else(|e| panic!("insert into {}: {e}", maps::NODE_STATS));
    }

    /// The node `node_id`'s tunnel counters, summed over CPUs; `None` without an entry.
    pub fn node_stats(&self, node_id: u32) -> Option<NodeStats> {
        let stats: PerCpuHashMap<&MapData, u32, NodeStats> = self.map(maps::NODE_STATS);
        let per_cpu = match stats.get(&node_id, 0) {
            Ok(v) => v,
            Err(aya::maps::MapError::KeyNotFound) => return None,
            Err(e) => panic!("{}[{node_id}]: {e}", maps::NODE_STATS),
        };
        let mut sum = NodeStats::default();
        for cpu in per_cpu.iter() {
            sum.add(cpu);
        }
        Some(sum)
    }

    /// Attaches the program `name` to `interface` (in the calling thread's network
    /// namespace) with TCX, as the agent does, until the datapath is dropped.
    pub fn attach(&mut self, name: &str, interface: &str, attach_type: TcAttachType) {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("program {name} missing"))
            .try_into()
            .unwrap_or_else(|e| panic!("program {name} is not a TC classifier: {e}"));
        program
            .attach(interface, attach_type)
            .unwrap_or_else(|e| panic!("attach {name} to {interface}: {}", chain(&e)));
    }

    /// [`Datapath::attach`] inside the network namespace at `netns` (such as a
    /// `NamedNetns`'s path): the calling thread enters it for the attach and returns to
    /// its own namespace, also when the attach panics.
    pub fn attach_in(
        &mut self,
        netns: &Path,
        name: &str,
        interface: &str,
        attach_type: TcAttachType,
    ) {
        let _inside = EnteredNetns::enter(netns);
        self.attach(name, interface, attach_type);
    }

    /// Writes index 0 of `hypha_config`.
    pub fn set_config(&mut self, config: NodeConfig) {
        let mut map: Array<&mut MapData, NodeConfig> = self.map_mut(maps::CONFIG);
        map.set(0, config, 0).expect("write hypha_config[0]");
    }

    /// Adds an IPv4-only endpoint as the agent does: its `hypha_endpoints4` entry, its
    /// `hypha_ifaces` entry and its zeroed `hypha_ep_stats_v3` entry, all with
    /// `ENDPOINT_F_IPV4` added to `info.flags`. Called again for the same endpoint, it
    /// replaces the entries (as the agent does when the flags change).
    pub fn add_endpoint(&mut self, addr: [u8; 4], info: EndpointInfo) {
        let info = EndpointInfo {
            flags: info.flags | ENDPOINT_F_IPV4,
            ..info
        };
        let mut endpoints: HashMap<&mut MapData, EndpointKey4, EndpointInfo> =
            self.map_mut(maps::ENDPOINTS4);
        endpoints
            .insert(EndpointKey4::from_octets(addr), info, 0)
            .unwrap_or_else(|e| panic!("insert into {}: {e}", maps::ENDPOINTS4));
        self.add_iface(
            info.ifindex,
            EndpointIface {
                endpoint_id: info.endpoint_id,
                flags: info.flags,
                pod_mac: info.pod_mac,
                host_mac: info.host_mac,
                addr4: u32::from_ne_bytes(addr),
                addr6: [0; 16],
            },
        );
        self.add_stats(info.ifindex);
    }

    /// Adds an endpoint with the addresses given (IPv4, IPv6 or both) as the agent does:
    /// an entry in `hypha_endpoints4` and `hypha_endpoints6` per address, its
    /// `hypha_ifaces` entry and its zeroed `hypha_ep_stats_v3` entry, with the family
    /// bits of its addresses added to `info.flags`.
    pub fn add_endpoint_with(
        &mut self,
        addr4: Option<[u8; 4]>,
        addr6: Option<[u8; 16]>,
        info: EndpointInfo,
    ) {
        let mut flags = info.flags & !(ENDPOINT_F_IPV4 | ENDPOINT_F_IPV6);
        if addr4.is_some() {
            flags |= ENDPOINT_F_IPV4;
        }
        if addr6.is_some() {
            flags |= ENDPOINT_F_IPV6;
        }
        let info = EndpointInfo { flags, ..info };
        if let Some(addr) = addr4 {
            let mut endpoints: HashMap<&mut MapData, EndpointKey4, EndpointInfo> =
                self.map_mut(maps::ENDPOINTS4);
            endpoints
                .insert(EndpointKey4::from_octets(addr), info, 0)
                .unwrap_or_else(|e| panic!("insert into {}: {e}", maps::ENDPOINTS4));
        }
        if let Some(addr) = addr6 {
            let mut endpoints: HashMap<&mut MapData, EndpointKey6, EndpointInfo> =
                self.map_mut(maps::ENDPOINTS6);
            endpoints
                .insert(EndpointKey6 { addr }, info, 0)
                .unwrap_or_else(|e| panic!("insert into {}: {e}", maps::ENDPOINTS6));
        }
        self.add_iface(
            info.ifindex,
            EndpointIface {
                endpoint_id: info.endpoint_id,
                flags,
                pod_mac: info.pod_mac,
                host_mac: info.host_mac,
                addr4: addr4.map_or(0, u32::from_ne_bytes),
                addr6: addr6.unwrap_or([0; 16]),
            },
        );
        self.add_stats(info.ifindex);
    }

    /// Writes the `hypha_ifaces` entry of the host-side veth `ifindex`.
    pub fn add_iface(&mut self, ifindex: u32, iface: EndpointIface) {
        let mut ifaces: HashMap<&mut MapData, u32, EndpointIface> = self.map_mut(maps::IFACES);
        ifaces
            .insert(ifindex, iface, 0)
            .unwrap_or_else(|e| panic!("insert into {}: {e}", maps::IFACES));
    }

    /// Creates a zeroed `hypha_ep_stats_v3` entry for `ifindex`.
    pub fn add_stats(&mut self, ifindex: u32) {
        let cpus = nr_cpus().expect("number of possible CPUs");
        let zeroed =
            PerCpuValues::try_from(vec![EndpointStats::default(); cpus]).expect("per-CPU values");
        let mut stats: PerCpuHashMap<&mut MapData, u32, EndpointStats> =
            self.map_mut(maps::EP_STATS);
        stats
            .insert(ifindex, zeroed, 0)
            .unwrap_or_else(|e| panic!("insert into {}: {e}", maps::EP_STATS));
    }

    /// Gives `addr/prefix_len` the security `identity` in `hypha_ipcache4`.
    pub fn set_identity(&mut self, addr: [u8; 4], prefix_len: u32, identity: u32) {
        let mut ipcache: LpmTrie<&mut MapData, u32, IpcacheValue> = self.map_mut(maps::IPCACHE4);
        ipcache
            .insert(
                &Key::new(prefix_len, u32::from_ne_bytes(addr)),
                IpcacheValue { identity, flags: 0 },
                0,
            )
            .expect("insert into hypha_ipcache4");
    }

    /// Gives `addr/prefix_len` the security `identity` in `hypha_ipcache6`.
    pub fn set_identity6(&mut self, addr: [u8; 16], prefix_len: u32, identity: u32) {
        let mut ipcache: LpmTrie<&mut MapData, [u8; 16], IpcacheValue> =
            self.map_mut(maps::IPCACHE6);
        ipcache
            .insert(
                &Key::new(prefix_len, addr),
                IpcacheValue { identity, flags: 0 },
                0,
            )
            .unwrap_or_else(|e| panic!("insert into {}: {e}", maps::IPCACHE6));
    }

    /// Every tracked IPv6 connection.
    pub fn connections6(&self) -> Vec<(CtKey6, CtEntry)> {
        let ct: HashMap<&MapData, CtKey6, CtEntry> = self.map(maps::CT6);
        ct.iter()
            .map(|e| e.unwrap_or_else(|e| panic!("iterate {}: {e}", maps::CT6)))
            .collect()
    }

    /// Writes one `hypha_policy` entry.
    pub fn set_policy(&mut self, key: PolicyKey, entry: PolicyEntry) {
        let mut policy: HashMap<&mut MapData, PolicyKey, PolicyEntry> = self.map_mut(maps::POLICY);
        policy
            .insert(key, entry, 0)
            .expect("insert into hypha_policy");
    }

    /// Removes one `hypha_policy` entry.
    pub fn remove_policy(&mut self, key: PolicyKey) {
        let mut policy: HashMap<&mut MapData, PolicyKey, PolicyEntry> = self.map_mut(maps::POLICY);
        policy.remove(&key).expect("remove from hypha_policy");
    }

    /// Every tracked connection.
    pub fn connections(&self) -> Vec<(CtKey4, CtEntry)> {
        let ct: HashMap<&MapData, CtKey4, CtEntry> = self.map(maps::CT4);
        ct.iter().map(|e| e.expect("iterate hypha_ct4")).collect()
    }

    /// The monitor events written since the last call.
    pub fn events(&mut self) -> Vec<Event> {
        let mut ring: RingBuf<&mut MapData> = self.map_mut(maps::EVENTS);
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), size_of::<Event>(), "event size");
            // SAFETY: the ring buffer holds `Event`s written by the datapath; the length
            // was checked, and `read_unaligned` copes with any alignment.
            events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
        }
        events
    }

    /// The endpoint's counters, all families together, summed over CPUs.
    pub fn stats(&self, ifindex: u32) -> FamilyStats {
        self.stats_by_family(ifindex).total()
    }

    /// The endpoint's counters per family, summed over CPUs.
    pub fn stats_by_family(&self, ifindex: u32) -> EndpointStats {
        let stats: PerCpuHashMap<&MapData, u32, EndpointStats> = self.map(maps::EP_STATS);
        let per_cpu = stats
            .get(&ifindex, 0)
            .unwrap_or_else(|e| panic!("{}[{ifindex}]: {e}", maps::EP_STATS));
        let mut sum = EndpointStats::default();
        for cpu in per_cpu.iter() {
            sum.add(cpu);
        }
        sum
    }

    /// Every `hypha_drops` entry, its counter summed over CPUs.
    pub fn drops(&self) -> Vec<(DropKey, Counter)> {
        let drops: PerCpuHashMap<&MapData, DropKey, Counter> = self.map(maps::DROPS);
        drops
            .iter()
            .map(|entry| {
                let (key, per_cpu) = entry.expect("iterate hypha_drops");
                let mut sum = Counter::default();
                per_cpu.iter().for_each(|c| sum.add(c));
                (key, sum)
            })
            .collect()
    }

    /// Runs the program `name` once on `frame`, as if it arrived on `ifindex` (which
    /// must be a device in the calling thread's network namespace, see [`TestNetns`]).
    pub fn run(&self, name: &str, frame: &[u8], ifindex: u32) -> Run {
        self.run_with(name, frame, ifindex, RunOptions::default())
    }

    /// As [`Datapath::run`], with the skb's mark and a repeat count from `options`.
    pub fn run_with(&self, name: &str, frame: &[u8], ifindex: u32, options: RunOptions) -> Run {
        self.try_run_with(name, frame, ifindex, options)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {name}: {e}"))
    }

    /// As [`Datapath::run_with`], with the kernel's refusal to run (such as `EINVAL` for a
    /// frame too short for its EtherType) returned instead of panicking.
    pub fn try_run_with(
        &self,
        name: &str,
        frame: &[u8],
        ifindex: u32,
        options: RunOptions,
    ) -> Result<Run, String> {
        let program: &SchedClassifier = self
            .ebpf
            .program(name)
            .unwrap_or_else(|| panic!("program {name} missing"))
            .try_into()
            .unwrap_or_else(|e| panic!("program {name} is not a TC classifier: {e}"));
        let ctx = SkBuffCtx {
            ingress_ifindex: ifindex,
            ifindex,
            mark: options.mark,
            ..SkBuffCtx::default()
        };
        // Room for the frame to grow, though no program here grows it.
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(ctx.as_bytes()),
                repeat: options.repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(|e| chain(&e))?;
        out.truncate(result.data_size_out as usize);
        Ok(Run {
            verdict: result.return_value,
            frame: out,
        })
    }

    /// Every `hypha_ep_stats_v3` entry's ifindex.
    pub fn stats_keys(&self) -> Vec<u32> {
        let stats: PerCpuHashMap<&MapData, u32, EndpointStats> = self.map(maps::EP_STATS);
        stats
            .keys()
            .map(|k| k.unwrap_or_else(|e| panic!("iterate {}: {e}", maps::EP_STATS)))
            .collect()
    }

    /// The loaded object, for programs and maps this type has no helper for (the socket
    /// programs' tests load and attach their own).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The private bpffs the maps are pinned in (links may be pinned there too).
    pub fn pin_dir(&self) -> &Path {
        &self._bpffs.path
    }

    /// The map `name` as a `T` (such as `HashMap<&MapData, K, V>`), for a test to read
    /// a map this module has no helper for.
    pub fn map<'a, T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>>(
        &'a self,
        name: &str,
    ) -> T {
        let map = self
            .ebpf
            .map(name)
            .unwrap_or_else(|| panic!("map {name} missing"));
        T::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"))
    }

    /// The map `name` as a `T`, for a test to write a map this module has no helper for.
    pub fn map_mut<'a, T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>>(
        &'a mut self,
        name: &str,
    ) -> T {
        let map = self
            .ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("map {name} missing"));
        T::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"))
    }
}

/// An error with its sources: aya's messages name the call, the source the errno.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        message.push_str(&format!(": {e}"));
        source = e.source();
    }
    message
}

/// How [`Datapath::run_with`] runs a program.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// `skb->mark` as the program sees it.
    pub mark: u32,
    /// How many times the kernel runs the program on the frame (0 counts as 1); the
    /// verdict and frame are the last run's.
    pub repeat: u32,
}

/// Pins the calling thread to the CPU it is on, so that consecutive test runs share the
/// per-CPU state they would share inside one kernel call chain. Returns that CPU.
pub fn pin_to_current_cpu() -> usize {
    // SAFETY: a plain libc call without arguments.
    let cpu = unsafe { libc::sched_getcpu() };
    assert!(
        cpu >= 0,
        "sched_getcpu: {}",
        std::io::Error::last_os_error()
    );
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu as usize).expect("CPU in the set");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .unwrap_or_else(|e| panic!("pin the test thread to CPU {cpu}: {e}"));
    cpu as usize
}

/// What a program did with a frame.
#[derive(Debug)]
pub struct Run {
    /// The program's return value (`TC_ACT_*`).
    pub verdict: u32,
    /// The frame after the program ran, from the Ethernet header on.
    pub frame: Vec<u8>,
}

/// The leading fields of the kernel's `struct __sk_buff`, up to `ifindex`, passed as
/// `ctx_in`; the kernel treats the rest as zero.
///
/// For TC programs the kernel accepts only a few non-zero fields here. `ifindex` names
/// the device the test skb is on (looked up in the caller's network namespace; values
/// of 0 and 1 mean loopback), which programs read as `skb->ifindex`;
/// `ingress_ifindex` becomes `skb->skb_iif`.
#[repr(C)]
#[derive(Default)]
struct SkBuffCtx {
    len: u32,
    pkt_type: u32,
    mark: u32,
    queue_mapping: u32,
    protocol: u32,
    vlan_present: u32,
    vlan_tci: u32,
    vlan_proto: u32,
    priority: u32,
    ingress_ifindex: u32,
    ifindex: u32,
}

impl SkBuffCtx {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `SkBuffCtx` is `repr(C)` and made of `u32`s only, so it has no
        // padding and every byte is initialized.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(self).cast::<u8>(), size_of::<Self>())
        }
    }
}

/// A bpffs instance of our own, mounted on a fresh directory under the temp dir;
/// unmounted and removed on drop.
struct PrivateBpffs {
    path: PathBuf,
}

impl PrivateBpffs {
    fn mount() -> Self {
        let path = std::env::temp_dir().join(unique_name("hypha-test-bpffs"));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        // Own the directory before mounting, so a failed mount still removes it.
        let fs = Self { path };
        mount(
            Some("bpf"),
            &fs.path,
            Some("bpf"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount bpffs on {}: {e}", fs.path.display()));
        fs
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        // Best effort, and both steps always run: a leftover is reported, not fatal.
        if let Err(e) = umount2(&self.path, MntFlags::MNT_DETACH) {
            eprintln!("unmount {}: {e}", self.path.display());
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("remove {}: {e}", self.path.display());
        }
    }
}

/// The calling thread inside an existing network namespace, back in its own on drop.
/// `!Send`, as [`TestNetns`].
struct EnteredNetns {
    original: File,
    _not_send: PhantomData<*const ()>,
}

impl EnteredNetns {
    fn enter(netns: &Path) -> Self {
        let original =
            File::open("/proc/thread-self/ns/net").expect("open /proc/thread-self/ns/net");
        let target = File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
        setns(&target, CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("enter {}: {e}", netns.display()));
        Self {
            original,
            _not_send: PhantomData,
        }
    }
}

impl Drop for EnteredNetns {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original, CloneFlags::CLONE_NEWNET) {
            if !std::thread::panicking() {
                panic!("restore the thread's network namespace: {e}");
            }
            eprintln!("restore the thread's network namespace: {e}");
        }
    }
}

/// Moves the calling thread into a new, anonymous network namespace and back on drop.
///
/// `BPF_PROG_TEST_RUN` looks the context's `ifindex` up in the caller's network
/// namespace, so tests create their devices here. The namespace has no name and no
/// pin: it, and every device in it, disappears when the guard restores the thread's
/// original namespace, even if the test panicked. Devices need no unique names, as
/// nothing else can see them.
///
/// `!Send`: the namespace belongs to the thread that entered it.
pub struct TestNetns {
    original: File,
    _not_send: PhantomData<*const ()>,
}

impl TestNetns {
    pub fn enter() -> Self {
        let original =
            File::open("/proc/thread-self/ns/net").expect("open /proc/thread-self/ns/net");
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        Self {
            original,
            _not_send: PhantomData,
        }
    }

    /// Creates a veth pair `host` / `peer` (like a pod's) and returns `host`'s ifindex.
    pub fn add_veth(&self, host: &str, peer: &str) -> u32 {
        // A child process starts in its parent thread's namespaces, so `ip` runs here.
        let status = Command::new("ip")
            .args(["link", "add", host, "type", "veth", "peer", "name", peer])
            .status()
            .expect("run `ip link add`");
        assert!(
            status.success(),
            "ip link add {host} type veth peer name {peer}: {status}"
        );
        if_nametoindex(host).unwrap_or_else(|e| panic!("ifindex of {host}: {e}"))
    }

    /// Brings `interface` up, with IPv6 off first so that the kernel sends nothing of its
    /// own on it (DAD, router solicitations) that a datapath would see and count.
    pub fn set_up(&self, interface: &str) {
        let disable_ipv6 = format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6");
        // Resolved in the calling thread's namespace, where the device is; absent only
        // when the kernel has no IPv6.
        if Path::new("/proc/sys/net/ipv6").exists() {
            std::fs::write(&disable_ipv6, "1")
                .unwrap_or_else(|e| panic!("write {disable_ipv6}: {e}"));
        }
        let status = Command::new("ip")
            .args(["link", "set", "dev", interface, "up"])
            .status()
            .expect("run `ip link set up`");
        assert!(status.success(), "ip link set dev {interface} up: {status}");
    }

    /// Sends `frame`, Ethernet header included, out of `interface` through an
    /// `AF_PACKET` socket; on a veth it arrives at the peer's ingress.
    pub fn send_frame(&self, interface: &str, frame: &[u8]) {
        let ifindex =
            if_nametoindex(interface).unwrap_or_else(|e| panic!("ifindex of {interface}: {e}"));
        // Protocol 0: the socket only sends, it receives nothing.
        // SAFETY: a plain syscall; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(
            fd >= 0,
            "socket(AF_PACKET): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just created and nothing else owns it.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `sockaddr_ll` is plain data, valid when zeroed.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `frame` and `addr` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            sent,
            frame.len() as isize,
            "send {} bytes on {interface}: {}",
            frame.len(),
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original, CloneFlags::CLONE_NEWNET) {
            // The thread is stuck in the test namespace; carrying on would run later
            // code in the wrong place.
            if !std::thread::panicking() {
                panic!("restore the thread's network namespace: {e}");
            }
            eprintln!("restore the thread's network namespace: {e}");
        }
    }
}

/// A packet and byte counter of `packets` packets of `bytes` bytes in all.
pub fn counter(packets: u64, bytes: usize) -> Counter {
    Counter {
        packets,
        bytes: bytes as u64,
    }
}

/// Family counters that are zero but for the one `select` picks, which is `c`.
pub fn stats_with(
    select: impl FnOnce(&mut FamilyStats) -> &mut Counter,
    c: Counter,
) -> FamilyStats {
    let mut stats = FamilyStats::default();
    *select(&mut stats) = c;
    stats
}

/// An Ethernet frame: the header, then `payload`.
pub fn eth(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// `frame` (an Ethernet frame of IPv4 or IPv6) with its TTL or hop limit set to `ttl`,
/// the IPv4 header checksum computed anew.
pub fn with_ttl(frame: &[u8], ttl: u8) -> Vec<u8> {
    const ETH_HLEN: usize = 14;
    let mut out = frame.to_vec();
    if out[12..14] == 0x86dd_u16.to_be_bytes() {
        out[ETH_HLEN + 7] = ttl;
        return out;
    }
    let ip = &mut out[ETH_HLEN..ETH_HLEN + 20];
    ip[8] = ttl;
    ip[10..12].fill(0);
    let csum = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    out
}

/// `frame` as a router sends it on: one hop less of TTL (hop limit).
pub fn hopped(frame: &[u8]) -> Vec<u8> {
    let ttl = if frame[12..14] == 0x86dd_u16.to_be_bytes() {
        frame[14 + 7]
    } else {
        frame[14 + 8]
    };
    with_ttl(frame, ttl - 1)
}

/// The Internet checksum of an IPv4 header whose checksum field is zero.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
