//! Socket-level load balancing, the agent's side: the eight cgroup `sock_addr` programs
//! (`ebpf/src/sock.rs`, [`programs::SOCKET`]) attached to the cgroup v2 root with
//! bpf_links pinned in the pin directory (`link_socklb_<hook>`), and the network
//! namespaces they translate for (`hypha_lb_netns`): the agent's own (ifindex 0) and
//! each endpoint's (its host-side ifindex). Several endpoints may share a namespace (a
//! pod with two interfaces): [`Holders`] counts them per namespace, so that its entry
//! goes with the last of them only.
//!
//! The links outlive the agent like the endpoints' (a SIGKILLed agent leaves services
//! working); a restarted agent swaps its programs into them in place
//! (`BPF_LINK_UPDATE`), so sockets are never without translation. Removing a pin (the
//! pin directory going away) detaches its link.
//!
//! The programs are attached to the root of the whole hierarchy, and so run for every
//! socket of the machine; each agent translates only the namespaces it registered, so
//! several agents on one kernel (a simulated cluster, parallel tests) do not meet.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::Ebpf;
use aya::maps::{HashMap, MapData};
use aya::programs::{CgroupSockAddr, ProgramFd};
use hypha_common::lb::{LbNetns, maps as lb_maps, programs};

use super::ebpf::{EbpfError, attach_pinned, is_not_found, load_named, lock, map_err};
use super::link_info;
use crate::state::EndpointRecord;

/// `enum bpf_attach_type` (include/uapi/linux/bpf.h) of each socket program, and the
/// hook's name in its link's pin.
const HOOKS: [(&str, u32, &str); 8] = [
    (programs::CONNECT4, 10, "connect4"),
    (programs::CONNECT6, 11, "connect6"),
    (programs::SENDMSG4, 14, "sendmsg4"),
    (programs::SENDMSG6, 15, "sendmsg6"),
    (programs::RECVMSG4, 19, "recvmsg4"),
    (programs::RECVMSG6, 20, "recvmsg6"),
    (programs::GETPEERNAME4, 29, "getpeername4"),
    (programs::GETPEERNAME6, 30, "getpeername6"),
];

/// The prefix of the socket programs' link pins, directly in the pin directory.
pub const PIN_PREFIX: &str = "link_socklb_";

/// A loaded socket program, as attaching it needs.
struct SockProgram {
    name: &'static str,
    fd: ProgramFd,
    id: u32,
    attach_type: u32,
    hook: &'static str,
}

/// The socket programs and `hypha_lb_netns`, taken out of the object at load.
pub(super) struct SockLb {
    programs: Vec<SockProgram>,
    /// Its own lock, held only for syscalls on the map (none waits).
    netns: Mutex<Registry>,
    pin_dir: PathBuf,
}

/// `hypha_lb_netns` and the endpoints that hold each of its entries.
struct Registry {
    map: HashMap<MapData, u64, LbNetns>,
    holders: Holders,
}

/// The endpoints (host-side ifindexes) registered in each network namespace (by
/// cookie) since the agent started; those of an earlier agent are counted again as it
/// re-adopts them. Pure, so the counting is unit-tested.
#[derive(Debug, Default)]
struct Holders {
    by_netns: BTreeMap<u64, BTreeSet<u32>>,
}

impl Holders {
    /// The endpoint at `ifindex` is in the namespace `cookie` (and no longer in any
    /// other: an ifindex names one device at a time).
    fn add(&mut self, cookie: u64, ifindex: u32) {
        self.release(ifindex);
        self.by_netns.entry(cookie).or_default().insert(ifindex);
    }

    /// The endpoint at `ifindex` is gone.
    fn release(&mut self, ifindex: u32) {
        self.by_netns.retain(|_, held| {
            held.remove(&ifindex);
            !held.is_empty()
        });
    }

    /// Only the endpoints at `keep` remain.
    fn retain(&mut self, keep: &HashSet<u32>) {
        self.by_netns.retain(|_, held| {
            held.retain(|i| keep.contains(i));
            !held.is_empty()
        });
    }

    /// An endpoint still in the namespace `cookie`, if any.
    fn holder(&self, cookie: u64) -> Option<u32> {
        self.by_netns.get(&cookie)?.first().copied()
    }

    /// What becomes of the map's `entries` (cookie, stored ifindex) whose ifindex is
    /// `stale`: `(cookie, Some(ifindex))` to store another endpoint of the namespace
    /// still there, `(cookie, None)` to remove the entry (no endpoint holds it).
    /// Entries of the agent's own namespace (ifindex 0) are never stale.
    fn plan(
        &self,
        entries: impl IntoIterator<Item = (u64, u32)>,
        stale: impl Fn(u32) -> bool,
    ) -> Vec<(u64, Option<u32>)> {
        entries
            .into_iter()
            .filter(|&(_, ifindex)| ifindex != 0 && stale(ifindex))
            .map(|(cookie, _)| (cookie, self.holder(cookie)))
            .collect()
    }
}

impl SockLb {
    /// Loads (verifies) the socket programs and opens `hypha_lb_netns`.
    pub(super) fn load(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<Self, EbpfError> {
        let programs = HOOKS
            .into_iter()
            .map(|hook| load_program(ebpf, hook))
            .collect::<Result<Vec<_>, _>>()?;
        let map = ebpf.take_map(lb_maps::NETNS).ok_or(EbpfError::Missing {
            kind: "map",
            name: lb_maps::NETNS,
        })?;
        let map = HashMap::try_from(map).map_err(map_err("open", lb_maps::NETNS))?;
        Ok(Self {
            programs,
            netns: Mutex::new(Registry {
                map,
                holders: Holders::default(),
            }),
            pin_dir: pin_dir.to_owned(),
        })
    }

    fn pin(&self, hook: &str) -> PathBuf {
        self.pin_dir.join(format!("{PIN_PREFIX}{hook}"))
    }

    /// Attaches every socket program to the cgroup v2 hierarchy mounted at `cgroup`
    /// (swapping it into the link already pinned there, an earlier agent's), then
    /// registers the agent's own network namespace.
    pub(super) fn attach(&self, cgroup: &Path) -> Result<(), EbpfError> {
        let dir = File::open(cgroup).map_err(|source| EbpfError::Io {
            op: "open the cgroup v2 hierarchy at",
            path: cgroup.to_owned(),
            source,
        })?;
        let cgroup_id = cgroup_id(cgroup)?;
        for prog in &self.programs {
            attach_program(prog, &dir, cgroup, cgroup_id, &self.pin(prog.hook))?;
        }
        let own = hypha_netlink::own_netns_cookie().map_err(|source| EbpfError::Netlink {
            op: "read the cookie of the agent's network namespace",
            ifname: "-".into(),
            source: Box::new(source),
        })?;
        let value = LbNetns {
            ifindex: 0,
            _pad: 0,
        };
        lock(&self.netns)
            .map
            .insert(own, value, 0)
            .map_err(map_err("insert into", lb_maps::NETNS))
    }

    /// Registers the network namespace of `ep` (its `netns` path), so that its sockets
    /// are translated.
    pub(super) fn register(&self, ep: &EndpointRecord) -> Result<(), EbpfError> {
        let cookie = hypha_netlink::netns_cookie(Path::new(&ep.netns)).map_err(|source| {
            EbpfError::Netlink {
                op: "read the cookie of the pod's network namespace",
                ifname: ep.host_ifname.clone(),
                source: Box::new(source),
            }
        })?;
        let ifindex = ep.host_ifindex;
        let mut registry = lock(&self.netns);
        registry
            .map
            .insert(cookie, LbNetns { ifindex, _pad: 0 }, 0)
            .map_err(map_err("insert into", lb_maps::NETNS))?;
        registry.holders.add(cookie, ifindex);
        Ok(())
    }

    /// Forgets `ep` in its network namespace, found by its host ifindex (the namespace
    /// itself may be gone already): the namespace's entry goes with its last endpoint.
    pub(super) fn unregister(&self, ep: &EndpointRecord) -> Vec<EbpfError> {
        let mut registry = lock(&self.netns);
        registry.holders.release(ep.host_ifindex);
        registry.remove(|ifindex| ifindex == ep.host_ifindex)
    }

    /// Forgets every pod namespace that belongs to none of `keep` (the agent's own,
    /// ifindex 0, stays).
    pub(super) fn sweep(&self, keep: &[EndpointRecord]) -> Vec<EbpfError> {
        let ifindexes: HashSet<u32> = keep.iter().map(|e| e.host_ifindex).collect();
        let mut registry = lock(&self.netns);
        registry.holders.retain(&ifindexes);
        registry.remove(|ifindex| !ifindexes.contains(&ifindex))
    }

    /// What of the socket LB is missing for `ep`: its namespace's registration.
    ///
    /// Several endpoints may share a namespace (a pod with two interfaces); its entry
    /// then names one of them, so the namespace's cookie is what is checked.
    pub(super) fn check(&self, ep: &EndpointRecord) -> Vec<String> {
        let registered = match hypha_netlink::netns_cookie(Path::new(&ep.netns)) {
            Ok(cookie) => lock(&self.netns).map.get(&cookie, 0).is_ok(),
            // The namespace is gone: its entry, if any, is found by the ifindex.
            Err(_) => lock(&self.netns)
                .map
                .iter()
                .filter_map(Result::ok)
                .any(|(_, v)| v.ifindex == ep.host_ifindex),
        };
        if registered {
            Vec::new()
        } else {
            vec![format!(
                "the network namespace {} of {} is not in {}: services are not translated for its sockets",
                ep.netns,
                ep.host_ifname,
                lb_maps::NETNS
            )]
        }
    }

    /// What of the socket programs' attachment is missing or different: each pinned
    /// link on the cgroup at its hook, running this agent's program.
    pub fn check_attached(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for prog in &self.programs {
            let pin = self.pin(prog.hook);
            match link_info::open_pin(&pin).and_then(|l| link_info::cgroup_info(l.as_fd())) {
                Ok(info) if info.cgroup_id == 0 => problems.push(format!(
                    "program {} is detached: its pinned link {} is on no cgroup",
                    prog.name,
                    pin.display()
                )),
                Ok(info) if info.prog_id != prog.id || info.attach_type != prog.attach_type => {
                    problems.push(format!(
                        "the pinned link {} runs program id {} at attach type {}, not {} (id {}) at {}",
                        pin.display(),
                        info.prog_id,
                        info.attach_type,
                        prog.name,
                        prog.id,
                        prog.attach_type
                    ))
                }
                Ok(_) => {}
                Err(e) => problems.push(format!(
                    "program {} is not attached: cannot read its pinned link {}: {e}",
                    prog.name,
                    pin.display()
                )),
            }
        }
        problems
    }
}

impl Registry {
    /// Applies [`Holders::plan`] for the entries whose ifindex is `stale`: each is
    /// handed to another endpoint of its namespace, or removed.
    fn remove(&mut self, stale: impl Fn(u32) -> bool) -> Vec<EbpfError> {
        let entries: Vec<(u64, u32)> = self
            .map
            .iter()
            .filter_map(Result::ok)
            .map(|(cookie, v)| (cookie, v.ifindex))
            .collect();
        let mut errors = Vec::new();
        for (cookie, holder) in self.holders.plan(entries, stale) {
            let done = match holder {
                Some(ifindex) => self
                    .map
                    .insert(cookie, LbNetns { ifindex, _pad: 0 }, 0)
                    .map_err(map_err("insert into", lb_maps::NETNS)),
                None => match self.map.remove(&cookie) {
                    Err(e) if !is_not_found(&e) => Err(map_err("delete from", lb_maps::NETNS)(e)),
                    _ => Ok(()),
                },
            };
            if let Err(e) = done {
                errors.push(e);
            }
        }
        errors
    }
}

/// The id the kernel gives the cgroup at `path`: the inode of its directory (cgroup2).
fn cgroup_id(path: &Path) -> Result<u64, EbpfError> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| EbpfError::Io {
            op: "stat",
            path: path.to_owned(),
            source,
        })
}

fn load_program(
    ebpf: &mut Ebpf,
    (name, attach_type, hook): (&'static str, u32, &'static str),
) -> Result<SockProgram, EbpfError> {
    let (fd, id) = load_named(ebpf, name, |p| <&mut CgroupSockAddr>::try_from(p)?.load())?;
    Ok(SockProgram {
        name,
        fd,
        id,
        attach_type,
        hook,
    })
}

/// Attaches `prog` to the cgroup `dir` (at `path`, id `cgroup_id`), swapping it in place
/// into the link pinned at `pin` when that link is on this cgroup's hook; any other
/// pinned link is replaced by a new one.
fn attach_program(
    prog: &SockProgram,
    dir: &File,
    path: &Path,
    cgroup_id: u64,
    pin: &Path,
) -> Result<(), EbpfError> {
    attach_pinned(
        prog.fd.as_fd(),
        pin,
        |link| {
            let info = link_info::cgroup_info(link)?;
            Ok(info.link_type == link_info::BPF_LINK_TYPE_CGROUP
                && info.cgroup_id == cgroup_id
                && info.attach_type == prog.attach_type)
        },
        || {
            link_info::cgroup_attach(prog.fd.as_fd(), dir.as_fd(), prog.attach_type).map_err(
                |source| EbpfError::Attach {
                    program: prog.name,
                    ifname: format!("cgroup {}", path.display()),
                    hook: "sock_addr hook",
                    source,
                },
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_socket_program_has_its_hook() {
        let named: Vec<&str> = HOOKS.iter().map(|(n, _, _)| *n).collect();
        assert_eq!(named, programs::SOCKET);
        for (name, _, hook) in HOOKS {
            assert!(name.ends_with(hook), "{name} is attached at {hook}");
        }
    }

    /// Two endpoints in one namespace: the entry stores the second; deleting it hands
    /// the entry to the first, and only deleting that one too removes it.
    #[test]
    fn a_shared_namespace_goes_with_its_last_endpoint() {
        let mut holders = Holders::default();
        holders.add(7, 10);
        holders.add(7, 11);
        holders.add(8, 12);
        let entries = [(1, 0), (7, 11), (8, 12)];

        holders.release(11);
        assert_eq!(holders.plan(entries, |i| i == 11), [(7, Some(10))]);
        // Deleting the endpoint the entry does not store changes nothing.
        let mut other = Holders::default();
        other.add(7, 10);
        other.add(7, 11);
        other.release(10);
        assert_eq!(other.plan(entries, |i| i == 10), []);

        let entries = [(1, 0), (7, 10), (8, 12)];
        holders.release(10);
        assert_eq!(holders.plan(entries, |i| i == 10), [(7, None)]);
        assert_eq!(holders.holder(8), Some(12));
    }

    #[test]
    fn a_sweep_keeps_namespaces_with_a_live_endpoint_and_the_agents_own() {
        let mut holders = Holders::default();
        holders.add(7, 10);
        holders.add(7, 11);
        holders.add(8, 12);
        let keep: HashSet<u32> = [10].into();
        holders.retain(&keep);
        let entries = [(1, 0), (7, 11), (8, 12), (9, 13)];
        assert_eq!(
            holders.plan(entries, |i| !keep.contains(&i)),
            [(7, Some(10)), (8, None), (9, None)]
        );
    }

    #[test]
    fn an_ifindex_moved_to_another_namespace_leaves_the_first() {
        let mut holders = Holders::default();
        holders.add(7, 10);
        holders.add(8, 10);
        assert_eq!(holders.holder(7), None);
        assert_eq!(holders.holder(8), Some(10));
    }
}
