//! Everything a bench makes, undone in reverse order: on success, on error, on panic and
//! on Ctrl-C.
//!
//! One process-wide list, because the Ctrl-C handler (a thread of its own) must see it.
//! The list's lock is held while a resource is made *and* while the list is undone, so
//! the handler never takes the list between "made" and "recorded", and nothing new is
//! made once the handler has started: whoever calls [`Teardown::make`] after that blocks
//! until the handler exits the process. Every undo tolerates a resource that was never
//! made, so the undo is recorded first and the resource made second.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::setups::CniCall;

/// One thing to take down.
pub enum Undo {
    /// Every process inside ended (SIGTERM, then SIGKILL), then `ip netns del NAME`.
    Netns(String),
    /// `ip link del NAME`, in the host's namespace.
    Link(String),
    /// A directory tree (a temp dir, a bpffs pin dir).
    Dir(PathBuf),
    /// `CNI_COMMAND=DEL` for a pod that was (or may have been) added.
    Cni(CniCall),
    /// SIGTERM, up to 10 s to exit, then SIGKILL.
    Process {
        name: String,
        child: Arc<Mutex<Child>>,
    },
    /// Writes back a sysctl's value.
    Sysctl { path: PathBuf, value: String },
}

static UNDO: Mutex<Vec<Undo>> = Mutex::new(Vec::new());
static HANDLER: OnceLock<()> = OnceLock::new();

/// The bench's handle on the list; dropping it undoes everything still listed.
pub struct Teardown {
    _private: (),
}

impl Teardown {
    /// Installs the Ctrl-C handler (once per process).
    pub fn install() -> Result<Self> {
        if HANDLER.get().is_none() {
            ctrlc::set_handler(|| {
                eprintln!("\ninterrupted: cleaning up");
                let errors = undo_all(lock());
                report(&errors);
                std::process::exit(130);
            })
            .context("installing the Ctrl-C handler")?;
            let _ = HANDLER.set(());
        }
        Ok(Self { _private: () })
    }

    /// Records `undo`, then runs `make`, with the list locked throughout (see the module
    /// comment). `make` must not call back into the teardown.
    pub fn make<T>(&self, undo: Undo, make: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut list = lock();
        list.push(undo);
        make()
    }

    /// Spawns a long-lived process and records it, in one step.
    pub fn spawn(&self, name: &str, cmd: &mut Command) -> Result<Arc<Mutex<Child>>> {
        let mut list = lock();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", crate::util::describe(cmd)))?;
        let child = Arc::new(Mutex::new(child));
        list.push(Undo::Process {
            name: name.to_owned(),
            child: child.clone(),
        });
        Ok(child)
    }

    /// Undoes everything now; fails with every error met (it never stops at the first).
    pub fn finish(self) -> Result<()> {
        let errors = undo_all(lock());
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("cleanup: {}", errors.join("; "))
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        report(&undo_all(lock()));
    }
}

fn lock() -> MutexGuard<'static, Vec<Undo>> {
    // A panic while the list was locked leaves it as it was: still worth undoing.
    UNDO.lock().unwrap_or_else(|p| p.into_inner())
}

fn report(errors: &[String]) {
    for e in errors {
        eprintln!("cleanup: {e}");
    }
}

/// Undoes the list, last first, keeping the lock until the end.
fn undo_all(mut list: MutexGuard<'static, Vec<Undo>>) -> Vec<String> {
    let mut errors = Vec::new();
    while let Some(u) = list.pop() {
        if let Err(e) = u.undo() {
            errors.push(format!("{e:#}"));
        }
    }
    errors
}

impl Undo {
    fn undo(self) -> Result<()> {
        match self {
            Undo::Netns(name) => {
                let path = Path::new("/run/netns").join(&name);
                if path.exists() {
                    // Keep going: the namespace still goes when a process could not be ended.
                    let ended = crate::util::end_netns_processes(&path);
                    quiet(Command::new("ip").args(["netns", "del", &name]))?;
                    ended?;
                }
            }
            Undo::Link(name) => {
                // Our /sys is the host namespace's, where these links live.
                if Path::new("/sys/class/net").join(&name).exists() {
                    quiet(Command::new("ip").args(["link", "del", &name]))?;
                }
            }
            Undo::Dir(dir) => {
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("removing {}", dir.display()))?;
                }
            }
            Undo::Cni(call) => {
                call.invoke("DEL")?;
            }
            Undo::Process { name, child } => {
                stop(&name, &mut child.lock().unwrap_or_else(|p| p.into_inner()))?
            }
            Undo::Sysctl { path, value } => {
                std::fs::write(&path, &value)
                    .with_context(|| format!("restoring {}", path.display()))?;
            }
        }
        Ok(())
    }
}

/// SIGTERM, then SIGKILL if it has not exited within 10 s.
fn stop(name: &str, child: &mut Child) -> Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's, not
    // yet reaped (try_wait just said so), so it cannot have been reused.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()?;
    bail!("{name} (pid {pid}) ignored SIGTERM for 10 s and was killed")
}

/// Runs a command, quietly; fails with its standard error.
fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", crate::util::describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            crate::util::describe(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
