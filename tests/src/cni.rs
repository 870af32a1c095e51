//! Running the real `hypha-cni` binary exactly as a runtime does: `CNI_*` variables, the
//! network configuration on stdin, one JSON reply on stdout.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use serde_json::Value;

pub use hypha_cni::naming::host_ifname;

/// The `hypha-cni` binary of this build.
pub fn binary() -> PathBuf {
    crate::binary("hypha-cni")
}

/// A minimal network configuration, as a conflist entry `{"type": "hypha-cni"}` becomes
/// once the runtime has injected `cniVersion` and `name`.
pub fn conf(version: &str, agent_socket: &Path) -> String {
    serde_json::json!({
        "cniVersion": version,
        "name": "hypha",
        "type": "hypha-cni",
        "agentSocket": agent_socket,
    })
    .to_string()
}

/// What one invocation produced.
#[derive(Debug)]
pub struct CniRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CniRun {
    /// The reply on stdout, parsed; panics if it is not JSON.
    pub fn reply(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts the invocation failed as the spec says (non-zero exit, an error object on
    /// stdout) and returns its code and msg.
    pub fn error(&self) -> (u64, String) {
        assert!(!self.status.success(), "expected a failure: {self:?}");
        let reply = self.reply();
        let code = reply["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no numeric code: {self:?}"));
        let msg = reply["msg"]
            .as_str()
            .unwrap_or_else(|| panic!("no msg: {self:?}"))
            .to_owned();
        assert!(reply["cniVersion"].is_string(), "no cniVersion: {self:?}");
        (code, msg)
    }
}

/// Runs `hypha-cni` with exactly `env` (nothing inherited) and `stdin`.
pub fn run(env: &[(&str, &str)], stdin: &str) -> CniRun {
    run_command(Command::new(binary()), env, stdin)
}

/// Runs `cmd` (`hypha-cni`, possibly behind `nsenter`) as a runtime runs a plugin.
pub fn run_command(mut cmd: Command, env: &[(&str, &str)], stdin: &str) -> CniRun {
    let mut child = cmd
        .env_clear()
        // Only for `nsenter` to be found; the plugin itself reads nothing from PATH.
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hypha-cni");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin.as_bytes())
        .expect("write the configuration");
    let out = child.wait_with_output().expect("wait for hypha-cni");
    CniRun {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
