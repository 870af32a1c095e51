//! Socket-level load balancing, the agent's side: the eight cgroup `sock_addr` programs
//! (`ebpf/src/sock.rs`, [`programs::SOCKET`]) attached to the cgroup v2 root with
//! bpf_links pinned in the pin directory (`link_socklb_<hook>`), and the network
//! namespaces they translate for (`hypha_lb_netns`): the agent's own (ifindex 0) and
//! each endpoint's (its host-side ifindex).
//!
//! The links outlive the agent like the endpoints' (a SIGKILLed agent leaves services
//! working); a restarted agent swaps its programs into them in place
//! (`BPF_LINK_UPDATE`), so sockets are never without translation. Removing a pin (the
//! pin directory going away) detaches its link.
//!
//! The programs are attached to the root of the whole hierarchy, and so run for every
//! socket of the machine; each agent translates only the namespaces it registered, so
//! several agents on one kernel (a simulated cluster, parallel tests) do not meet.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::Ebpf;
use aya::maps::{HashMap, MapData};
use aya::programs::{CgroupSockAddr, ProgramFd};
use hypha_common::lb::{LbNetns, maps as lb_maps, programs};

use super::ebpf::{EbpfError, is_not_found, lock, map_err};
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
    netns: Mutex<HashMap<MapData, u64, LbNetns>>,
    pin_dir: PathBuf,
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
        let netns = HashMap::try_from(map).map_err(map_err("open", lb_maps::NETNS))?;
        Ok(Self {
            programs,
            netns: Mutex::new(netns),
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
        self.insert(own, 0)
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
        self.insert(cookie, ep.host_ifindex)
    }

    fn insert(&self, cookie: u64, ifindex: u32) -> Result<(), EbpfError> {
        let value = LbNetns { ifindex, _pad: 0 };
        lock(&self.netns)
            .insert(cookie, value, 0)
            .map_err(map_err("insert into", lb_maps::NETNS))
    }

    /// Forgets the network namespace of `ep`, found by its host ifindex (the namespace
    /// itself may be gone already).
    pub(super) fn unregister(&self, ep: &EndpointRecord) -> Vec<EbpfError> {
        self.remove(|ifindex| ifindex == ep.host_ifindex)
    }

    /// Forgets every pod namespace that belongs to none of `keep` (the agent's own,
    /// ifindex 0, stays).
    pub(super) fn sweep(&self, keep: &[EndpointRecord]) -> Vec<EbpfError> {
        let ifindexes: HashSet<u32> = keep.iter().map(|e| e.host_ifindex).collect();
        self.remove(|ifindex| ifindex != 0 && !ifindexes.contains(&ifindex))
    }

    fn remove(&self, stale: impl Fn(u32) -> bool) -> Vec<EbpfError> {
        let mut map = lock(&self.netns);
        let keys: Vec<u64> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| stale(v.ifindex))
            .map(|(k, _)| k)
            .collect();
        keys.iter()
            .filter_map(|k| match map.remove(k) {
                Err(e) if !is_not_found(&e) => Some(map_err("delete from", lb_maps::NETNS)(e)),
                _ => None,
            })
            .collect()
    }

    /// What of the socket LB is missing for `ep`: its namespace's registration.
    ///
    /// Several endpoints may share a namespace (a pod with two interfaces); its entry
    /// then names the last one attached, so the namespace's cookie is what is checked.
    pub(super) fn check(&self, ep: &EndpointRecord) -> Vec<String> {
        let registered = match hypha_netlink::netns_cookie(Path::new(&ep.netns)) {
            Ok(cookie) => lock(&self.netns).get(&cookie, 0).is_ok(),
            // The namespace is gone: its entry, if any, is found by the ifindex.
            Err(_) => lock(&self.netns)
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
    let prog_err = |op| {
        move |source| EbpfError::Program {
            op,
            program: name,
            ifname: "-".into(),
            source: Box::new(source),
        }
    };
    let prog: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or(EbpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(prog_err("open"))?;
    prog.load().map_err(prog_err("load"))?;
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
    let link_err = |op: &'static str| {
        move |source: io::Error| EbpfError::Link {
            op,
            path: pin.to_owned(),
            source: Box::new(source),
        }
    };
    match link_info::open_pin(pin) {
        Ok(link) => {
            let info = link_info::cgroup_info(link.as_fd()).map_err(link_err("read"))?;
            if info.link_type == link_info::BPF_LINK_TYPE_CGROUP
                && info.cgroup_id == cgroup_id
                && info.attach_type == prog.attach_type
            {
                return link_info::update(link.as_fd(), prog.fd.as_fd())
                    .map_err(link_err("swap the program into"));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(link_err("open")(e)),
    }
    let link = link_info::cgroup_attach(prog.fd.as_fd(), dir.as_fd(), prog.attach_type).map_err(
        |source| EbpfError::Attach {
            program: prog.name,
            ifname: format!("cgroup {}", path.display()),
            hook: "sock_addr hook",
            source,
        },
    )?;
    // The old link (if any) goes with its pin once the new one is in.
    match std::fs::remove_file(pin) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(EbpfError::Io {
                op: "remove",
                path: pin.to_owned(),
                source,
            });
        }
    }
    link_info::pin(link.as_fd(), pin).map_err(link_err("pin"))
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
}
