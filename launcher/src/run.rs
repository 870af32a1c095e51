//! `hypha run`: everything is checked first (command, network, plugins, limits, security),
//! then the container is made in a runtime's order — namespaces (one `clone`), cgroup with
//! its limits, network (CNI ADD), filesystem, security, process — with every step recorded
//! in its state before it is taken, so that [`release`] undoes exactly what was made:
//! on a failed start, when the container exits, on `hypha stop` and on `hypha rm`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{ForkResult, Pid};

use crate::cgroup::{self, CgroupError};
use crate::cni::{CniError, Network, NetworkConfig, RealExec, RuntimeInfo};
use crate::image::{ImageError, Store};
use crate::init::{self, InitConfig};
use crate::limits::Limits;
use crate::ports::{self, NamedPort, PortError};
use crate::process::{self, ImageProcess, Overrides, ProcessError};
use crate::rootfs::{self, Overlay, Plan};
use crate::security::{Security, SecurityError};
use crate::state::{CgroupState, ImageState, ProcessId, RunDir, State, StateError, Status};
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Nothing to run.
    #[error("no command given: hypha run [OPTIONS] -- COMMAND [ARGS...]")]
    NoCommand,
    /// The command is not an executable file in the container's root.
    #[error("command {cmd:?} not found (or not executable) in the container's root {root}")]
    CommandNotFound { cmd: String, root: PathBuf },
    /// `--rootfs` is not a directory.
    #[error("--rootfs {0}: not a directory")]
    BadRootfs(PathBuf),
    /// A command argument holds a NUL byte.
    #[error("a command argument holds a NUL byte")]
    NulInCommand,
    /// A `--label` is not `key=value`.
    #[error("invalid label {0:?}: expected key=value")]
    BadLabel(String),
    /// A `--port` is not `NAME:NUMBER[/PROTO]`, or names a port twice.
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(transparent)]
    State(#[from] StateError),
    /// The process cannot be made from the image and the flags.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// `--image`: the store refused.
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Cni(#[from] CniError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// A system call of the launcher failed.
    #[error("{op}: {source}")]
    Sys { op: String, source: std::io::Error },
    /// The container's init reported an error before starting the command.
    #[error("container {name:?} failed to start: {msg}")]
    Start { name: String, msg: String },
    /// The container is not running.
    #[error("container {0:?} is not running")]
    NotRunning(String),
    /// `hypha rm` of a running container without `-f`.
    #[error("container {0:?} is running: stop it first, or use `hypha rm -f`")]
    Running(String),
    /// `hypha logs` of a container that was not detached.
    #[error("container {0:?} was not started with -d: its output went to the terminal")]
    NoLogs(String),
    /// Releasing the container's resources failed in part.
    #[error("releasing container {name:?}: {}", errors.join("; "))]
    Release { name: String, errors: Vec<String> },
}

pub(crate) fn sys_err(op: impl Into<String>) -> impl FnOnce(nix::Error) -> RunError {
    let op = op.into();
    move |e| RunError::Sys {
        op,
        source: e.into(),
    }
}

pub(crate) fn io_err(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let op = op.into();
    move |source| RunError::Sys { op, source }
}

/// Everything `hypha run` takes.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub name: Option<String>,
    pub namespace: String,
    /// `key=value`.
    pub labels: Vec<String>,
    /// Named ports, passed to plugins in `args.cni.namedPorts`.
    pub ports: Vec<NamedPort>,
    /// A network name, `none`, or `None` for the first configuration in the directory.
    pub network: Option<String>,
    pub cni_conf_dir: PathBuf,
    pub cni_path: String,
    pub limits: Limits,
    pub ingress_rate: Option<u64>,
    pub egress_rate: Option<u64>,
    pub detach: bool,
    /// Remove the state entry when the container exits.
    pub remove: bool,
    pub rootfs: Option<PathBuf>,
    /// `--image NAME[:TAG]` (or id), in the store at `image_dir`.
    pub image: Option<String>,
    pub image_dir: PathBuf,
    /// `--entrypoint`.
    pub entrypoint: Option<String>,
    /// `-e KEY=VALUE` or `KEY`.
    pub env: Vec<String>,
    /// `--workdir`.
    pub workdir: Option<String>,
    /// `--user USER[:GROUP]`.
    pub user: Option<String>,
    pub privileged: bool,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub userns: bool,
    pub run_dir: PathBuf,
    pub command: Vec<String>,
}

/// A container checked and ready to be made.
struct Prepared {
    state: State,
    network: Option<Network>,
    filters: Vec<seccompiler::BpfProgram>,
    command: Vec<CString>,
}

fn new_id() -> String {
    let mut b = [0u8; 16];
    let _ = File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    if b == [0; 16] {
        // No urandom: the clock and pid are unique enough for an id.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b[..8].copy_from_slice(&t.as_nanos().to_le_bytes()[..8]);
        b[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Checks everything that can be checked before anything is made.
fn prepare(o: &RunOptions) -> Result<Prepared, RunError> {
    let id = new_id();
    let name = o.name.clone().unwrap_or_else(|| id[..12].to_owned());
    crate::state::check_name(&name)?;
    let image = match &o.image {
        None => None,
        Some(reference) => {
            // Absolute: the layer directories are recorded in the state and mounted by the
            // init.
            let dir = std::path::absolute(&o.image_dir)
                .map_err(io_err(format!("--image-dir {}", o.image_dir.display())))?;
            let store = Store::open(&dir)?;
            Some((store.resolve(reference)?, dir))
        }
    };
    let image_process = image.as_ref().map(|(i, _)| ImageProcess {
        reference: format!("{}:{}", i.name, i.tag),
        entrypoint: i.config.entrypoint.clone(),
        cmd: i.config.cmd.clone(),
        env: i.config.env.clone(),
        working_dir: i.config.working_dir.clone(),
        user: i.config.user.clone(),
    });
    let overrides = Overrides {
        entrypoint: o.entrypoint.clone(),
        command: o.command.clone(),
        env: o.env.clone(),
        workdir: o.workdir.clone(),
        user: o.user.clone(),
    };
    let mut process = process::merge(
        image_process.as_ref(),
        &overrides,
        &process::base_env(&name),
        |k| std::env::var(k).ok(),
    )?;
    // The container's root as directories, topmost first.
    let roots: Vec<PathBuf> = match (&image, &o.rootfs) {
        (Some((i, _)), _) => i.layers.iter().rev().cloned().collect(),
        (None, Some(r)) => vec![r.clone()],
        (None, None) => vec![PathBuf::from("/")],
    };
    if image.is_none() {
        let root = &roots[0];
        if !root.is_dir() {
            return Err(RunError::BadRootfs(root.clone()));
        }
        let cmd = &process.argv[0];
        if rootfs::resolve_command(root, cmd).is_none() {
            return Err(RunError::CommandNotFound {
                cmd: cmd.clone(),
                root: root.clone(),
            });
        }
    }
    // (An image's command is looked up by the init, on the container's PATH, once its
    // root is mounted: symlinks across layers resolve as they will at run time.)
    let user = match &process.user {
        None => None,
        Some(spec) => {
            let (user, home) = process::resolve_user(
                spec,
                process::read_in_roots(&roots, "/etc/passwd").as_deref(),
                process::read_in_roots(&roots, "/etc/group").as_deref(),
            )?;
            process::ensure_home(&mut process.env, home.as_deref(), user.uid);
            Some(user)
        }
    };
    process::ensure_home(&mut process.env, None, 0);
    let mut labels = BTreeMap::new();
    for l in &o.labels {
        match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                labels.insert(k.to_owned(), v.to_owned());
            }
            _ => return Err(RunError::BadLabel(l.clone())),
        }
    }
    ports::check_unique(&o.ports)?;
    let security = Security::new(o.privileged, &o.cap_add, &o.cap_drop)?;
    let filters = security.seccomp()?;
    let network = match o.network.as_deref() {
        Some("none") => None,
        wanted => {
            let config = NetworkConfig::load(&o.cni_conf_dir, wanted)?;
            let plugin_paths = config.resolve_plugins(&o.cni_path)?;
            Some(Network {
                config,
                plugin_paths,
                cni_path: o.cni_path.clone(),
                netns: o.run_dir.join(&name).join("netns"),
                info: RuntimeInfo {
                    container_id: id.clone(),
                    name: name.clone(),
                    namespace: o.namespace.clone(),
                    labels,
                    ports: o.ports.clone(),
                    ingress_rate: o.ingress_rate,
                    egress_rate: o.egress_rate,
                },
                result: None,
            })
        }
    };
    let command = process
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| RunError::NulInCommand)?;
    let state = State {
        id,
        name,
        namespace: o.namespace.clone(),
        command: process.argv.clone(),
        status: Status::Creating,
        init: None,
        monitor: None,
        exit_code: None,
        detached: o.detach,
        created: now(),
        cgroup: Some(CgroupState {
            version: cgroup::detect(),
            limits: o.limits,
        }),
        network: None,
        security,
        userns: o.userns,
        rootfs: o.rootfs.clone(),
        image: image.map(|(i, store)| ImageState {
            id: i.id,
            reference: format!("{}:{}", i.name, i.tag),
            store,
            layers: i.layers.into_iter().rev().collect(),
        }),
        env: process.env,
        workdir: process.workdir,
        user,
    };
    Ok(Prepared {
        state,
        network,
        filters,
        command,
    })
}

/// Runs a container. In the foreground, returns its exit code once it has exited and been
/// released; with `detach`, returns 0 once it has started (its launcher goes on in the
/// background, writing the container's output to its log).
pub fn run(o: &RunOptions) -> Result<i32, RunError> {
    let p = prepare(o)?;
    let run = RunDir(o.run_dir.clone());
    let name = p.state.name.clone();
    run.reserve(&name)?;
    if let Err(e) = run.save(&p.state) {
        let _ = run.remove(&name);
        return Err(e.into());
    }
    // Held from now until the entry is removed, so that `hypha image rm` refuses it.
    if let Some(img) = &p.state.image {
        let held = Store::open(&img.store).and_then(|s| s.hold(&img.id, &p.state.id, &o.run_dir));
        if let Err(e) = held {
            let _ = run.remove(&name);
            return Err(e.into());
        }
    }
    if o.detach {
        return detach(&run, p, o.remove);
    }
    let mut state = p.state.clone();
    let started = run.lock(&name).map_err(RunError::from).and_then(|_lock| {
        start(
            &run, &mut state, p.network, &p.filters, &p.command, o.remove,
        )
    });
    match started {
        Ok(pid) => {
            let code = sys::forward_until_exit(pid, false);
            finish(&run, &name, code, o.remove);
            Ok(code)
        }
        Err(e) => {
            abort(&run, &mut state);
            Err(e)
        }
    }
}

/// `-d`: a background launcher makes the container and waits for it; this process
/// reports how the start went.
fn detach(run: &RunDir, p: Prepared, remove: bool) -> Result<i32, RunError> {
    let name = p.state.name.clone();
    let log_path = run.dir(&name).join("log");
    let made = sys::pipe().map_err(sys_err("pipe")).and_then(|pipe| {
        File::create(&log_path)
            .map_err(io_err(format!("creating {}", log_path.display())))
            .map(|log| (pipe, log))
    });
    let ((r, w), log) = match made {
        Ok(x) => x,
        Err(e) => {
            remove_entry(run, &p.state);
            return Err(e);
        }
    };
    // SAFETY: the launcher is single-threaded; the child runs the container's life.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            remove_entry(run, &p.state);
            Err(sys_err("fork")(e))
        }
        Ok(ForkResult::Child) => {
            drop(r);
            let _ = nix::unistd::setsid();
            let _ = sys::redirect_stdio(&log);
            drop(log);
            let mut state = p.state;
            let started = run.lock(&name).map_err(RunError::from).and_then(|_lock| {
                start(run, &mut state, p.network, &p.filters, &p.command, remove)
            });
            match started {
                Ok(pid) => {
                    sys::send(w, init::STARTED);
                    let code = sys::forward_until_exit(pid, false);
                    finish(run, &name, code, remove);
                    sys::exit_now(0)
                }
                Err(e) => {
                    abort(run, &mut state);
                    sys::send(w, &e.to_string());
                    sys::exit_now(1)
                }
            }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(w);
            drop(log);
            let msg = sys::read_all(r);
            if msg == init::STARTED {
                println!("{name}");
                return Ok(0);
            }
            let _ = nix::sys::wait::waitpid(child, None);
            if msg.is_empty() {
                // The background launcher died without a word: clean up after it.
                if let Ok(mut state) = run.load(&name) {
                    abort(run, &mut state);
                }
                return Err(RunError::Start {
                    name,
                    msg: "its launcher died while starting it".into(),
                });
            }
            Err(RunError::Start { name, msg })
        }
    }
}

/// The environment of a container's command (and of `hypha exec`'s): the one recorded in
/// its state, or the defaults for the state of an older launcher.
pub(crate) fn container_env(state: &State) -> Result<Vec<CString>, RunError> {
    let env = if state.env.is_empty() {
        let mut env = process::base_env(&state.name);
        process::ensure_home(&mut env, None, 0);
        env
    } else {
        state.env.clone()
    };
    env.into_iter()
        .map(|e| CString::new(e).map_err(|_| RunError::NulInCommand))
        .collect()
}

/// User and group ids container root maps to with `--userns`: root's range in
/// `/etc/subuid` (`/etc/subgid`), else 100000 and up.
fn subid_range(file: &str) -> (u32, u32) {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let mut f = l.split(':');
                if f.next()? != "root" {
                    return None;
                }
                Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
            })
        })
        .unwrap_or((100_000, 65_536))
}

/// Closes every descriptor but 0, 1, 2 and `keep` (the init inherits the launcher's, such
/// as the state lock and the detach pipe, and must not hold them).
fn close_fds_except(keep: &[i32]) {
    let mut keep: Vec<u32> = keep.iter().map(|&k| k as u32).collect();
    keep.sort_unstable();
    let mut from = 3u32;
    for k in keep {
        if k > from {
            // SAFETY: close_range over descriptors this process does not use.
            unsafe { libc::syscall(libc::SYS_close_range, from, k - 1, 0) };
        }
        from = from.max(k + 1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0) };
}

/// Makes the container and starts its command; returns its init's pid. Holds the state
/// lock (taken by the caller). On error the caller runs [`abort`]. `remove`: the
/// container goes at exit (`--rm`), and its overlay's writable layer with it.
fn start(
    run: &RunDir,
    state: &mut State,
    network: Option<Network>,
    filters: &[seccompiler::BpfProgram],
    command: &[CString],
    remove: bool,
) -> Result<Pid, RunError> {
    use std::os::fd::AsRawFd as _;
    let dir = run.dir(&state.name);
    state.monitor = ProcessId::of(std::process::id() as i32);
    run.save(state)?;
    if let Some(cg) = &state.cgroup {
        cgroup::manager(cg.version, &state.cgroup_name()).create(&cg.limits)?;
    }
    let root = dir.join("root");
    std::fs::create_dir(&root).map_err(io_err(format!("creating {}", root.display())))?;
    let (subuid, subgid) = (subid_range("/etc/subuid"), subid_range("/etc/subgid"));
    let lower = match (&state.image, &state.rootfs) {
        (Some(img), _) => Some(img.layers.clone()),
        (None, Some(rootfs)) => Some(vec![rootfs.clone()]),
        (None, None) => None,
    };
    let overlay = match lower {
        None => None,
        // With --rm the writable layer is discarded at exit: it lives in a tmpfs of the
        // container's own mount namespace (as the host root's scratch directories do),
        // charged to its memory cgroup, and goes with the namespace however the
        // container ends. Otherwise it is kept on disk until `hypha rm`.
        Some(lower) if remove && !state.userns => {
            let memory = dir.join("layer");
            std::fs::create_dir(&memory)
                .map_err(io_err(format!("creating {}", memory.display())))?;
            Some(Overlay {
                lower,
                upper: memory.join("upper"),
                work: memory.join("work"),
                userxattr: false,
                memory: Some(memory),
            })
        }
        Some(lower) => {
            let o = Overlay {
                lower,
                upper: dir.join("upper"),
                work: dir.join("work"),
                userxattr: state.userns,
                memory: None,
            };
            for d in [&o.upper, &o.work] {
                std::fs::create_dir(d).map_err(io_err(format!("creating {}", d.display())))?;
                if state.userns {
                    nix::unistd::chown(d, Some(subuid.0.into()), Some(subgid.0.into()))
                        .map_err(sys_err(format!("chown {}", d.display())))?;
                }
            }
            Some(o)
        }
    };
    let cfg = InitConfig {
        hostname: state.name.clone(),
        rootfs: Plan { root, overlay },
        security: state.security.clone(),
        filters: filters.to_vec(),
        userns: state.userns,
        command: command.to_vec(),
        env: container_env(state)?,
        workdir: state.workdir.clone(),
        user: state.user.clone(),
    };
    sys::block_signals().map_err(sys_err("blocking signals"))?;
    let (go_r, go_w) = sys::pipe().map_err(sys_err("pipe"))?;
    let (report_r, report_w) = sys::pipe().map_err(sys_err("pipe"))?;
    let mut flags = libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET;
    if state.userns {
        flags |= libc::CLONE_NEWUSER;
    }
    // SAFETY: the launcher is single-threaded; the child runs the init and never returns.
    let pid = match unsafe { sys::clone_fork(flags) }
        .map_err(sys_err("creating the namespaces (clone)"))?
    {
        None => {
            close_fds_except(&[go_r.as_raw_fd(), report_w.as_raw_fd()]);
            init::main(&cfg, go_r, report_w)
        }
        Some(pid) => pid,
    };
    drop(go_r);
    drop(report_w);
    state.init = ProcessId::of(pid.as_raw());
    run.save(state)?;
    if state.userns {
        for (file, (base, len)) in [("uid_map", subuid), ("gid_map", subgid)] {
            let path = format!("/proc/{pid}/{file}");
            std::fs::write(&path, format!("0 {base} {len}\n"))
                .map_err(io_err(format!("writing {path}")))?;
        }
    }
    if let Some(cg) = &state.cgroup {
        cgroup::manager(cg.version, &state.cgroup_name()).add_process(pid.as_raw())?;
    }
    if let Some(mut net) = network {
        // The netns outlives the init through this bind mount, so DEL always finds it.
        File::create(&net.netns).map_err(io_err(format!("creating {}", net.netns.display())))?;
        mount(
            Some(Path::new(&format!("/proc/{pid}/ns/net"))),
            &net.netns,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys_err(format!(
            "binding the network namespace on {}",
            net.netns.display()
        )))?;
        // Recorded before ADD: a launcher killed during ADD leaves DEL to `hypha rm`.
        state.network = Some(net.clone());
        run.save(state)?;
        net.add(&RealExec)?;
        state.network = Some(net);
        run.save(state)?;
    }
    let mut go_w = go_w;
    go_w.write_all(b"g")
        .map_err(io_err("starting the container's init"))?;
    drop(go_w);
    let report = sys::read_all(report_r);
    if report != init::STARTED {
        return Err(RunError::Start {
            name: state.name.clone(),
            msg: if report.is_empty() {
                "its init exited before starting the command".into()
            } else {
                report
            },
        });
    }
    state.status = Status::Running;
    run.save(state)?;
    Ok(pid)
}

/// A failed start: release what was made and remove the state entry.
fn abort(run: &RunDir, state: &mut State) {
    let mut errors = release(run, state);
    errors.extend(remove_entry(run, state));
    for e in errors {
        eprintln!("hypha: while cleaning up container {:?}: {e}", state.name);
    }
}

/// The container exited with `code`: release it (unless `hypha stop`/`rm` did already)
/// and record the exit, or remove the entry with `--rm`.
fn finish(run: &RunDir, name: &str, code: i32, remove: bool) {
    let Ok(_lock) = run.lock(name) else {
        return; // removed meanwhile by `hypha rm -f`
    };
    let Ok(mut state) = run.load(name) else {
        return;
    };
    if state.status != Status::Exited {
        for e in release(run, &mut state) {
            eprintln!("hypha: while cleaning up container {name:?}: {e}");
        }
        state.status = Status::Exited;
        state.exit_code = Some(code);
        let _ = run.save(&state);
    }
    if remove {
        for e in remove_entry(run, &state) {
            eprintln!("hypha: while removing container {name:?}: {e}");
        }
    }
}

/// Removes a container's entry (its overlay's upper and work directories with it) and
/// then its hold on its image; the errors, if any. An entry that cannot be removed keeps
/// its hold, so that `hypha rm` can be tried again.
pub(crate) fn remove_entry(run: &RunDir, state: &State) -> Vec<String> {
    if let Err(e) = run.remove(&state.name) {
        return vec![e.to_string()];
    }
    match &state.image {
        Some(img) => Store::open(&img.store)
            .and_then(|s| s.release(&img.id, &state.id))
            .err()
            .map(|e| format!("releasing image {}: {e}", img.reference))
            .into_iter()
            .collect(),
        None => vec![],
    }
}

/// Waits until `p` is gone (reaping it if it is our child), at most `timeout`.
pub(crate) fn wait_gone(p: ProcessId, timeout: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    loop {
        let _ = nix::sys::wait::waitpid(
            Pid::from_raw(p.pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        if !p.alive() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Releases everything the state records, in reverse order of making, going on past
/// failures and returning them all: the processes, the network (CNI DEL through the chain
/// in reverse, then the namespace's bind mount), the cgroup. Idempotent.
pub fn release(run: &RunDir, state: &mut State) -> Vec<String> {
    let mut errors = vec![];
    if let Some(init) = state.init
        && init.alive()
    {
        let _ = kill(Pid::from_raw(init.pid), Signal::SIGKILL);
        if !wait_gone(init, std::time::Duration::from_secs(10)) {
            errors.push(format!("init {} did not exit after SIGKILL", init.pid));
        }
    }
    if let Some(net) = &state.network {
        errors.extend(net.del(&RealExec).into_iter().map(|e| e.to_string()));
    }
    let netns = run.dir(&state.name).join("netns");
    if netns.exists() {
        match umount2(&netns, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => errors.push(format!("unmounting {}: {e}", netns.display())),
        }
        let _ = std::fs::remove_file(&netns);
    }
    if let Some(cg) = &state.cgroup {
        let m = cgroup::manager(cg.version, &state.cgroup_name());
        // Processes that joined from outside the PID namespace (`hypha exec`).
        if let Ok(procs) = m.processes() {
            for p in procs {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
        if let Err(e) = m.remove() {
            errors.push(e.to_string());
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path) -> RunOptions {
        RunOptions {
            namespace: "default".into(),
            network: Some("none".into()),
            cni_conf_dir: dir.join("net.d"),
            cni_path: dir.join("bin").display().to_string(),
            run_dir: dir.join("run"),
            command: vec!["true".into()],
            ..RunOptions::default()
        }
    }

    /// Everything `prepare` refuses, it refuses before making anything.
    #[test]
    fn prepare_checks_before_making_anything() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("net.d")).unwrap();
        let o = options(tmp.path());
        let p = prepare(&o).unwrap();
        assert_eq!(p.state.name, &p.state.id[..12]);
        assert!(p.network.is_none());
        let err = |o: RunOptions| prepare(&o).err().unwrap().to_string();
        assert!(
            err(RunOptions {
                command: vec![],
                ..o.clone()
            })
            .contains("no command")
        );
        assert!(
            err(RunOptions {
                command: vec!["nope-xyz".into()],
                ..o.clone()
            })
            .contains("\"nope-xyz\" not found")
        );
        assert!(
            err(RunOptions {
                name: Some("a/b".into()),
                ..o.clone()
            })
            .contains("invalid container name")
        );
        assert!(
            err(RunOptions {
                labels: vec!["novalue".into()],
                ..o.clone()
            })
            .contains("invalid label")
        );
        assert!(
            err(RunOptions {
                ports: vec![
                    ports::parse_port("http:80").unwrap(),
                    ports::parse_port("http:81/udp").unwrap(),
                ],
                ..o.clone()
            })
            .contains("invalid --port \"http:81\"")
        );
        assert!(
            err(RunOptions {
                rootfs: Some(tmp.path().join("nothing")),
                ..o.clone()
            })
            .contains("not a directory")
        );
        assert!(
            err(RunOptions {
                cap_add: vec!["FLY".into()],
                ..o.clone()
            })
            .contains("unknown capability")
        );
        assert!(
            err(RunOptions {
                network: None,
                ..o.clone()
            })
            .contains("no CNI network configuration")
        );
        assert!(
            err(RunOptions {
                network: Some("x".into()),
                ..o.clone()
            })
            .contains("network \"x\" not found")
        );
        std::fs::write(
            tmp.path().join("net.d/1.conflist"),
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"absent"}]}"#,
        )
        .unwrap();
        assert!(
            err(RunOptions {
                network: Some("x".into()),
                ..o.clone()
            })
            .contains("\"absent\" of network \"x\" not found in CNI_PATH")
        );
        assert!(
            err(RunOptions {
                image: Some("absent:1".into()),
                image_dir: tmp.path().join("images"),
                command: vec![],
                ..o.clone()
            })
            .contains("absent")
        );
        assert!(
            err(RunOptions {
                env: vec!["=x".into()],
                ..o.clone()
            })
            .contains("invalid -e \"=x\"")
        );
        assert!(
            err(RunOptions {
                user: Some("no-such-user-here".into()),
                ..o.clone()
            })
            .contains("\"no-such-user-here\" not found in the container's /etc/passwd")
        );
        assert!(!tmp.path().join("run").exists(), "nothing made");
    }

    #[test]
    fn subid_ranges() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("subuid");
        std::fs::write(&f, "alice:100000:65536\nroot:200000:1000\n").unwrap();
        assert_eq!(subid_range(f.to_str().unwrap()), (200_000, 1000));
        assert_eq!(subid_range("/nonexistent"), (100_000, 65_536));
    }
}
