//! `hypha ps`, `stop`, `rm`, `logs` and `exec`: what a second `hypha` process does to the
//! containers it finds in the run directory.

use std::ffi::CString;
use std::fs::File;
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{ForkResult, Pid};
use serde::Serialize;

use crate::cgroup;
use crate::run::{RunError, container_env, io_err, release, remove_entry, sys_err, wait_gone};
use crate::state::{RunDir, State, Status};
use crate::sys;

/// One line of `hypha ps`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub name: String,
    pub id: String,
    pub namespace: String,
    /// The init's pid on the host, while running.
    pub pid: Option<i32>,
    pub ips: Vec<String>,
    pub status: String,
    pub exit_code: Option<i32>,
    pub command: Vec<String>,
    pub created: u64,
}

impl From<&State> for Summary {
    fn from(s: &State) -> Self {
        let status = s.live_status().to_owned();
        Self {
            name: s.name.clone(),
            id: s.id.clone(),
            namespace: s.namespace.clone(),
            pid: s.init.filter(|_| status == "running").map(|p| p.pid),
            ips: s.ips(),
            status,
            exit_code: s.exit_code,
            command: s.command.clone(),
            created: s.created,
        }
    }
}

pub fn ps(run: &RunDir) -> Result<Vec<Summary>, RunError> {
    Ok(run.list()?.iter().map(Summary::from).collect())
}

/// The table `hypha ps` prints.
pub fn format_ps(list: &[Summary]) -> String {
    let mut rows = vec![[
        "NAME".to_owned(),
        "ID".to_owned(),
        "PID".to_owned(),
        "IPS".to_owned(),
        "STATUS".to_owned(),
        "COMMAND".to_owned(),
    ]];
    for s in list {
        let status = match (s.status.as_str(), s.exit_code) {
            ("exited", Some(c)) => format!("exited ({c})"),
            (st, _) => st.to_owned(),
        };
        rows.push([
            s.name.clone(),
            s.id.chars().take(12).collect(),
            s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            if s.ips.is_empty() {
                "-".into()
            } else {
                s.ips.join(",")
            },
            status,
            s.command.join(" "),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Releases a container no launcher looks after any more (killed launcher) and records
/// it as exited; a no-op when it was released already.
fn release_now(run: &RunDir, name: &str) -> Result<(), RunError> {
    let _lock = run.lock(name)?;
    let mut state = run.load(name)?;
    if state.status == Status::Exited {
        return Ok(());
    }
    let errors = release(run, &mut state);
    state.status = Status::Exited;
    run.save(&state)?;
    released(name, errors)
}

/// `hypha stop`: SIGTERM to the container (its init passes it on to the command), SIGKILL
/// after `timeout`; then the container is released (by its launcher, or here when the
/// launcher is gone).
pub fn stop(run: &RunDir, name: &str, timeout: Duration) -> Result<(), RunError> {
    let state = run.load(name)?;
    if state.status == Status::Exited {
        return Ok(());
    }
    if let Some(init) = state.init.filter(|p| p.alive()) {
        let _ = kill(Pid::from_raw(init.pid), Signal::SIGTERM);
        if !wait_gone(init, timeout) {
            let _ = kill(Pid::from_raw(init.pid), Signal::SIGKILL);
            wait_gone(init, Duration::from_secs(10));
        }
    }
    // The launcher releases the container when its init exits: give it the time to.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        match run.load(name) {
            Ok(s) if s.status == Status::Exited => return Ok(()),
            Ok(s) if s.monitor.is_some_and(|m| m.alive()) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(_) => break,
            // Removed meanwhile (`--rm`).
            Err(crate::state::StateError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    release_now(run, name)
}

/// `hypha rm`: removes a stopped container (with `force`, kills a running one first),
/// releasing whatever is still held (after a killed launcher).
pub fn rm(run: &RunDir, name: &str, force: bool) -> Result<(), RunError> {
    let state = run.load(name)?;
    match state.live_status() {
        "running" | "creating" if !force => return Err(RunError::Running(name.to_owned())),
        "creating" => {
            // Its launcher is mid-start: killing it takes the init with it (PDEATHSIG).
            if let Some(m) = state.monitor {
                let _ = kill(Pid::from_raw(m.pid), Signal::SIGKILL);
                wait_gone(m, Duration::from_secs(10));
            }
        }
        _ => {}
    }
    // On failure the entry stays, so that `hypha rm` can be tried again.
    release_now(run, name)?;
    let _lock = run.lock(name)?;
    let state = run.load(name)?;
    let errors = remove_entry(run, &state);
    released(name, errors)
}

/// `hypha logs`: the output of a detached container.
pub fn logs(run: &RunDir, name: &str, out: &mut dyn std::io::Write) -> Result<(), RunError> {
    let state = run.load(name)?;
    if !state.detached {
        return Err(RunError::NoLogs(name.to_owned()));
    }
    let path = run.dir(name).join("log");
    let mut f = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
    std::io::copy(&mut f, out).map_err(io_err(format!("reading {}", path.display())))?;
    Ok(())
}

/// `hypha exec`: runs a command in every namespace and the cgroup of a running container,
/// with its security settings; returns the command's exit code.
///
/// A helper process joins the namespaces (user first, then IPC, UTS, network, PID and the
/// mount namespace last, as the paths to the others are opened before), and forks the
/// command, which is then inside the PID namespace; the helper waits for it and passes
/// signals on, as this process does for the helper.
pub fn exec(run: &RunDir, name: &str, command: &[String]) -> Result<i32, RunError> {
    use std::os::fd::AsFd as _;
    if command.is_empty() {
        return Err(RunError::NoCommand);
    }
    let state = run.load(name)?;
    let init = match state.init {
        Some(p) if state.status == Status::Running && p.alive() => p,
        _ => return Err(RunError::NotRunning(name.to_owned())),
    };
    let mut kinds = vec![];
    if state.userns {
        kinds.push(("user", CloneFlags::CLONE_NEWUSER));
    }
    kinds.extend([
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ]);
    let namespaces = kinds
        .into_iter()
        .map(|(k, flag)| {
            let path = format!("/proc/{}/ns/{k}", init.pid);
            File::open(&path)
                .map(|f| (f, flag))
                .map_err(io_err(format!("opening {path}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let filters = state.security.seccomp()?;
    let argv = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| RunError::NulInCommand)?;
    let env = container_env(&state)?;
    sys::block_signals().map_err(sys_err("blocking signals"))?;
    let (go_r, mut go_w) = sys::pipe().map_err(sys_err("pipe"))?;
    let switch = state.user.as_ref().map(crate::init::UserSwitch::new);
    // SAFETY: this process is single-threaded; the child only does async-signal-safe work
    // and system calls before it execs or exits.
    let helper = match unsafe { nix::unistd::fork() }.map_err(sys_err("fork"))? {
        ForkResult::Child => {
            drop(go_w);
            if !sys::wait_go(go_r) {
                sys::exit_now(1);
            }
            for (f, flag) in &namespaces {
                if let Err(e) = nix::sched::setns(f.as_fd(), *flag) {
                    eprintln!("hypha exec: joining the container's namespaces: {e}");
                    sys::exit_now(126);
                }
            }
            drop(namespaces);
            if state.userns {
                let _ = nix::unistd::setresgid(0.into(), 0.into(), 0.into());
                let _ = nix::unistd::setresuid(0.into(), 0.into(), 0.into());
            }
            // SAFETY: as above.
            match unsafe { nix::unistd::fork() } {
                Ok(ForkResult::Child) => {
                    let wd = state
                        .workdir
                        .as_deref()
                        .unwrap_or(std::path::Path::new("/"));
                    let _ = nix::unistd::chdir(wd);
                    if let Err(e) = state.security.apply(&filters) {
                        eprintln!("hypha exec: {e}");
                        sys::exit_now(126);
                    }
                    if let Some(switch) = &switch
                        && let Err(e) = switch.apply()
                    {
                        eprintln!("hypha exec: {e}");
                        sys::exit_now(126);
                    }
                    sys::reset_signals();
                    // Looked up in the container's mount namespace, on its PATH.
                    let program = match crate::init::find_program(&argv[0], &env) {
                        Ok(p) => p,
                        Err(e) => {
                            eprintln!("hypha exec: {e}");
                            sys::exit_now(127)
                        }
                    };
                    let e = nix::unistd::execve(&program, &argv, &env)
                        .expect_err("execve returns only on error");
                    eprintln!("hypha exec: {}: {}", command[0], e.desc());
                    sys::exit_now(127)
                }
                Ok(ForkResult::Parent { child }) => {
                    sys::exit_now(sys::forward_until_exit(child, false))
                }
                Err(e) => {
                    eprintln!("hypha exec: fork: {e}");
                    sys::exit_now(126)
                }
            }
        }
        ForkResult::Parent { child } => child,
    };
    drop(go_r);
    if let Some(cg) = &state.cgroup
        && let Err(e) =
            cgroup::manager(cg.version, &state.cgroup_name()).add_process(helper.as_raw())
    {
        let _ = kill(helper, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(helper, None);
        return Err(e.into());
    }
    std::io::Write::write_all(&mut go_w, b"g").map_err(io_err("starting hypha exec"))?;
    drop(go_w);
    Ok(sys::forward_until_exit(helper, false))
}

/// `Ok` when releasing `name`'s resources met no error, else every error met.
fn released(name: &str, errors: Vec<String>) -> Result<(), RunError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(RunError::Release {
            name: name.to_owned(),
            errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps_table() {
        let s = Summary {
            name: "web".into(),
            id: "0123456789abcdef".into(),
            namespace: "default".into(),
            pid: Some(42),
            ips: vec!["10.0.0.2".into()],
            status: "running".into(),
            exit_code: None,
            command: vec!["sleep".into(), "1".into()],
            created: 0,
        };
        let exited = Summary {
            name: "b".into(),
            pid: None,
            ips: vec![],
            status: "exited".into(),
            exit_code: Some(3),
            ..s.clone()
        };
        let dual = Summary {
            name: "d".into(),
            ips: vec!["10.0.0.3".into(), "fd00:10:244::3".into()],
            ..s.clone()
        };
        let t = format_ps(&[s, exited, dual]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME  ID"), "{t}");
        assert!(
            lines[1].contains("0123456789ab ") && lines[1].contains("10.0.0.2"),
            "{t}"
        );
        assert!(
            lines[2].contains("exited (3)") && lines[2].contains(" - "),
            "{t}"
        );
        assert!(lines[3].contains(" 10.0.0.3,fd00:10:244::3 "), "{t}");
    }
}
