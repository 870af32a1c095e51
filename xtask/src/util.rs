//! Running commands and finding things.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Runs a command to completion, echoing it; fails with its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", describe(cmd));
    }
    Ok(())
}

/// Runs a command and returns its standard output; fails with its standard error.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed with {}: {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo ARGS` in the workspace root, with the toolchain from rust-toolchain.toml.
pub fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new("cargo")
        .current_dir(workspace_root())
        .args(args))
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Copies `from` to `to` with `mode`, creating the directory.
pub fn install_file(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Copy beside, then rename: a running binary is replaced, not overwritten in place.
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))?;
    println!("installed {}", to.display());
    Ok(())
}

/// How long processes in a namespace about to be deleted get to exit on SIGTERM.
pub const NETNS_PROCESS_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Ends every process inside the network namespace at `path` (SIGTERM, then SIGKILL), so
/// that none outlives it, orphaned: call it before `ip netns del`.
pub fn end_netns_processes(path: &Path) -> Result<()> {
    hypha_netlink::procs::end_processes_in(path, NETNS_PROCESS_GRACE)
        .with_context(|| format!("ending the processes in {}", path.display()))?;
    Ok(())
}
