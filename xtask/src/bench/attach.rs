//! `cargo xtask bench attach`: what plumbing an endpoint's programs onto its host veth
//! costs on this kernel, method by method, to choose the cheapest (issue 10).
//!
//! Everything happens in two network namespaces the bench creates ("host" and "pod"):
//! each run creates a veth pair with its peer in the pod namespace (as hypha-cni does),
//! times one method, and deletes the pair. The program attached is a two-instruction
//! `SCHED_CLS` program (`return TC_ACT_OK`) loaded for the bench: what an attach costs
//! does not depend on the program. Methods:
//!
//! - `tcx (2 hooks, concurrent)`: today's attach: a TCX link on ingress and one on egress,
//!   created from two threads (each `BPF_LINK_CREATE` waits for an RCU grace period).
//! - `tcx (1 hook)`: one TCX link: the price of one grace period.
//! - `tcx (2 hooks, veth down)`: as the first, on a host end that is still down.
//! - `tcx link update`: `BPF_LINK_UPDATE` of an existing link (what a restarted agent
//!   does to adopt an endpoint).
//! - `tc clsact + 2 cls_bpf`: legacy tc through netlink: a `clsact` qdisc, then a
//!   direct-action `cls_bpf` filter on each side.
//! - `tc 2 cls_bpf (clsact made)`: the two filters alone.
//! - `tc filter replace`: `NLM_F_REPLACE` of an existing filter (tc's adoption).
//! - `move peer to pod netns`: a pool's cost at ADD: the pair created in the host
//!   namespace with programs attached beforehand (untimed), then only the move of the
//!   peer into the pod's namespace is timed.
//! - `burst of 16: tcx` / `burst of 16: tc`: 16 endpoints attached from 16 threads at
//!   once (wall time of the whole burst), to see whether grace periods overlap.
//!
//! The report goes to `target/bench/attach.json`; everything is removed on exit (the two
//! namespaces, and with them every veth, qdisc, filter and link).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use hypha_netlink::{BpfFilter, Netlink, TcHook, VethSpec};

use super::teardown::{Teardown, Undo};

#[derive(clap::Args)]
pub struct Options {
    /// Runs per method (median and p90 are over these).
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Endpoints attached at once in the burst cases.
    #[arg(long, default_value_t = 16)]
    burst: usize,
}

#[derive(serde::Serialize)]
struct Row {
    method: String,
    runs: usize,
    median_ms: f64,
    p90_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

#[derive(serde::Serialize)]
struct Report {
    kernel: String,
    runs: usize,
    burst: usize,
    rows: Vec<Row>,
}

/// `bpf_attr` members used here (`include/uapi/linux/bpf.h`).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// `BPF_F_AFTER` with no relative program: last (as the agent attaches).
const BPF_F_AFTER: u32 = 1 << 4;

/// The `prog_load` member of `union bpf_attr`, up to `expected_attach_type`.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `link_create` member of `union bpf_attr`, with its `tcx` member.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

/// The `link_update` member of `union bpf_attr`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a `#[repr(C)]` member of `union bpf_attr` of the size given;
    // the pointers in it outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor (or 0 for commands that return none, never closed: see
    // `bpf_no_fd`).
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

fn bpf_no_fd<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<()> {
    // SAFETY: as in `bpf`.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Loads `r0 = 0 (TC_ACT_OK); exit` as a `SCHED_CLS` program.
fn load_program() -> Result<OwnedFd> {
    // BPF_ALU64 | BPF_MOV | BPF_K to r0, imm 0; BPF_JMP | BPF_EXIT.
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = CString::new("GPL").expect("no NUL");
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"bench_noop\0");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: 0,
    };
    bpf(BPF_PROG_LOAD, &attr).context("loading the bench's SCHED_CLS program (bpf PROG_LOAD)")
}

fn tcx_attach(prog: BorrowedFd<'_>, ifindex: u32, attach_type: u32) -> Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        flags: BPF_F_AFTER,
        relative_fd: 0,
        _pad: 0,
        expected_revision: 0,
    };
    bpf(BPF_LINK_CREATE, &attr)
        .with_context(|| format!("TCX attach (type {attach_type}) to ifindex {ifindex}"))
}

fn tcx_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf_no_fd(BPF_LINK_UPDATE, &attr).context("BPF_LINK_UPDATE")
}

/// Both TCX hooks, from two threads (as the agent does).
fn tcx_both(prog: BorrowedFd<'_>, ifindex: u32) -> Result<(OwnedFd, OwnedFd)> {
    std::thread::scope(|s| {
        let eg = s.spawn(|| tcx_attach(prog, ifindex, BPF_TCX_EGRESS));
        let ing = tcx_attach(prog, ifindex, BPF_TCX_INGRESS);
        let eg = eg.join().expect("attach thread does not panic");
        Ok((ing?, eg?))
    })
}

fn filter(hook: TcHook, prog: BorrowedFd<'_>) -> BpfFilter<'static> {
    BpfFilter {
        hook,
        priority: 1,
        handle: 1,
        prog_fd: prog.as_raw_fd(),
        name: "bench_noop",
    }
}

fn tc_filters(nl: &mut Netlink, prog: BorrowedFd<'_>, ifindex: u32, replace: bool) -> Result<()> {
    for hook in [TcHook::Ingress, TcHook::Egress] {
        nl.add_bpf_filter(ifindex, &filter(hook, prog), replace)?;
    }
    Ok(())
}

fn tc_all(nl: &mut Netlink, prog: BorrowedFd<'_>, ifindex: u32) -> Result<()> {
    nl.add_clsact(ifindex)?;
    tc_filters(nl, prog, ifindex, false)
}

/// The bench's two namespaces, and a counter for unique veth names.
struct Bench {
    host_ns: String,
    pod_ns: String,
    pod_fd: File,
    prog: OwnedFd,
    next: std::sync::atomic::AtomicUsize,
}

/// A veth pair of one run; the caller deletes it.
struct Pair {
    host: String,
    peer: String,
    ifindex: u32,
}

impl Bench {
    fn names(&self) -> (String, String) {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (format!("hba{n}"), format!("hbp{n}"))
    }

    /// A pair with the host end here (up) and the peer in the pod namespace.
    fn pair(&self, nl: &mut Netlink) -> Result<Pair> {
        self.pair_with_peer_in(nl, self.pod_fd.as_fd())
    }

    /// A pair with the host end here (up) and the peer in `peer_netns`.
    fn pair_with_peer_in(&self, nl: &mut Netlink, peer_netns: BorrowedFd<'_>) -> Result<Pair> {
        let (host, peer) = self.names();
        nl.create_veth(&VethSpec {
            host_name: &host,
            peer_name: &peer,
            peer_netns,
            mtu: None,
            peer_mac: None,
        })?;
        let ifindex = nl
            .link_by_name(&host)?
            .with_context(|| format!("{host} vanished"))?
            .index;
        Ok(Pair {
            host,
            peer,
            ifindex,
        })
    }

    fn delete(&self, nl: &mut Netlink, pair: &Pair) -> Result<()> {
        nl.delete_link(pair.ifindex)
            .with_context(|| format!("deleting {} (peer {})", pair.host, pair.peer))
    }
}

/// Milliseconds since `start`.
fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

fn row(method: &str, mut samples: Vec<f64>) -> Row {
    samples.sort_by(f64::total_cmp);
    let p = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i]
    };
    Row {
        method: method.to_owned(),
        runs: samples.len(),
        median_ms: super::median(samples.iter().copied()).unwrap_or(f64::NAN),
        p90_ms: p(0.9),
        min_ms: samples[0],
        max_ms: samples[samples.len() - 1],
    }
}

/// Runs `once` `runs` times on a fresh pair each; `once` returns the timed part.
fn each_pair(
    b: &Bench,
    nl: &mut Netlink,
    runs: usize,
    mut once: impl FnMut(&mut Netlink, &Pair) -> Result<f64>,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(runs);
    for _ in 0..runs {
        let pair = b.pair(nl)?;
        let r = once(nl, &pair);
        b.delete(nl, &pair)?;
        out.push(r?);
    }
    Ok(out)
}

pub fn run(o: &Options) -> Result<()> {
    if o.runs == 0 || o.burst == 0 {
        bail!("--runs and --burst must be at least 1");
    }
    let td = Teardown::install()?;
    let tag = std::process::id();
    let host_ns = format!("hypha-bench-attach-h{tag}");
    let pod_ns = format!("hypha-bench-attach-p{tag}");
    for ns in [&host_ns, &pod_ns] {
        td.make(Undo::Netns(ns.clone()), || {
            crate::util::run(Command::new("ip").args(["netns", "add", ns]))
        })?;
    }
    let pod_path = PathBuf::from("/run/netns").join(&pod_ns);
    let pod_fd =
        File::open(&pod_path).with_context(|| format!("opening {}", pod_path.display()))?;
    // This thread (and the threads it starts) works inside the bench's host namespace.
    super::measure::enter_netns(&host_ns)?;
    let host_path = PathBuf::from("/run/netns").join(&host_ns);
    let host_fd =
        File::open(&host_path).with_context(|| format!("opening {}", host_path.display()))?;
    let b = Bench {
        host_ns,
        pod_ns,
        pod_fd,
        prog: load_program()?,
        next: 0.into(),
    };
    let mut nl = Netlink::new()?;
    let prog = b.prog.as_fd();
    let runs = o.runs;
    let mut rows = Vec::new();

    println!(
        "measuring in {} (peers in {}), {runs} runs each",
        b.host_ns, b.pod_ns
    );
    rows.push(row(
        "veth pair create (reference)",
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                let pair = b.pair(&mut nl)?;
                let took = ms(t);
                b.delete(&mut nl, &pair)?;
                Ok(took)
            })
            .collect::<Result<_>>()?,
    ));
    rows.push(row(
        "tcx (2 hooks, concurrent)",
        each_pair(&b, &mut nl, runs, |_, p| {
            let t = Instant::now();
            let links = tcx_both(prog, p.ifindex)?;
            let took = ms(t);
            drop(links);
            Ok(took)
        })?,
    ));
    rows.push(row(
        "tcx (1 hook)",
        each_pair(&b, &mut nl, runs, |_, p| {
            let t = Instant::now();
            let link = tcx_attach(prog, p.ifindex, BPF_TCX_INGRESS)?;
            let took = ms(t);
            drop(link);
            Ok(took)
        })?,
    ));
    rows.push(row(
        "tcx (2 hooks, veth down)",
        each_pair(&b, &mut nl, runs, |_, p| {
            crate::util::output(Command::new("ip").args(["link", "set", &p.host, "down"]))?;
            let t = Instant::now();
            let links = tcx_both(prog, p.ifindex)?;
            let took = ms(t);
            drop(links);
            Ok(took)
        })?,
    ));
    rows.push(row(
        "tcx link update (adopt)",
        each_pair(&b, &mut nl, runs, |_, p| {
            let (ing, eg) = tcx_both(prog, p.ifindex)?;
            let t = Instant::now();
            tcx_update(ing.as_fd(), prog)?;
            tcx_update(eg.as_fd(), prog)?;
            Ok(ms(t))
        })?,
    ));
    rows.push(row(
        "tc clsact + 2 cls_bpf",
        each_pair(&b, &mut nl, runs, |nl, p| {
            let t = Instant::now();
            tc_all(nl, prog, p.ifindex)?;
            Ok(ms(t))
        })?,
    ));
    rows.push(row(
        "tc 2 cls_bpf (clsact made)",
        each_pair(&b, &mut nl, runs, |nl, p| {
            nl.add_clsact(p.ifindex)?;
            let t = Instant::now();
            tc_filters(nl, prog, p.ifindex, false)?;
            Ok(ms(t))
        })?,
    ));
    rows.push(row(
        "tc filter replace (adopt)",
        each_pair(&b, &mut nl, runs, |nl, p| {
            tc_all(nl, prog, p.ifindex)?;
            let t = Instant::now();
            tc_filters(nl, prog, p.ifindex, true)?;
            Ok(ms(t))
        })?,
    ));
    rows.push(row(
        "move peer to pod netns (pool)",
        (0..runs)
            .map(|_| {
                // Both ends here first, as a pool would hold them.
                let pair = b.pair_with_peer_in(&mut nl, host_fd.as_fd())?;
                let host_index = pair.ifindex;
                let peer_index = nl
                    .link_by_name(&pair.peer)?
                    .with_context(|| format!("{} vanished", pair.peer))?
                    .index;
                let timed = (|| {
                    let links = tcx_both(prog, host_index)?;
                    let t = Instant::now();
                    nl.move_to_netns(peer_index, b.pod_fd.as_fd(), &pod_path)?;
                    let took = ms(t);
                    drop(links);
                    Ok(took)
                })();
                b.delete(&mut nl, &pair)?;
                timed
            })
            .collect::<Result<_>>()?,
    ));
    let burst_runs = runs.div_ceil(5).max(3);
    for (name, tc) in [("tcx", false), ("tc", true)] {
        let mut walls = Vec::new();
        for _ in 0..burst_runs {
            let pairs: Vec<Pair> = (0..o.burst)
                .map(|_| b.pair(&mut nl))
                .collect::<Result<_>>()?;
            let t = Instant::now();
            let results: Vec<Result<()>> = std::thread::scope(|s| {
                let handles: Vec<_> = pairs
                    .iter()
                    .map(|p| {
                        s.spawn(move || {
                            if tc {
                                tc_all(&mut Netlink::new()?, prog, p.ifindex)
                            } else {
                                tcx_both(prog, p.ifindex).map(drop)
                            }
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("burst thread does not panic"))
                    .collect()
            });
            let wall = ms(t);
            for p in &pairs {
                b.delete(&mut nl, p)?;
            }
            for r in results {
                r?;
            }
            walls.push(wall);
        }
        rows.push(row(&format!("burst of {}: {name} (wall)", o.burst), walls));
    }

    print_table(&rows);
    let report = Report {
        kernel: crate::util::output(Command::new("uname").arg("-r"))?
            .trim()
            .to_owned(),
        runs,
        burst: o.burst,
        rows,
    };
    let out_dir = crate::util::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let path = out_dir.join("attach.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    drop(nl);
    td.finish()
}

fn print_table(rows: &[Row]) {
    let w = rows.iter().map(|r| r.method.len()).max().unwrap_or(0);
    println!(
        "{:<w$}  {:>5}  {:>9}  {:>9}  {:>9}  {:>9}",
        "method", "runs", "median ms", "p90 ms", "min ms", "max ms"
    );
    for r in rows {
        println!(
            "{:<w$}  {:>5}  {:>9.2}  {:>9.2}  {:>9.2}  {:>9.2}",
            r.method, r.runs, r.median_ms, r.p90_ms, r.min_ms, r.max_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel() {
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(size_of::<LinkCreateAttr>(), 32);
        assert_eq!(size_of::<LinkUpdateAttr>(), 16);
    }

    #[test]
    fn rows_give_median_and_p90() {
        let r = row("x", (1..=10).map(f64::from).collect());
        assert_eq!(
            (r.median_ms, r.p90_ms, r.min_ms, r.max_ms),
            (5.5, 9.0, 1.0, 10.0)
        );
    }
}
