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

/// Where Debian's `containernetworking-plugins` installs the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A command running `program` inside the network namespace at `netns` (changing only
/// the network namespace, as a runtime on that node would run it).
pub fn in_netns(netns: &Path, program: &Path) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display())).arg(program);
    cmd
}

/// A network configuration list driven as libcni drives one: ADD through each plugin in
/// order, each given the previous one's result as `prevResult`; CHECK in order and DEL in
/// reverse order, each given the list's final result. Every plugin gets the list's
/// `name` and `cniVersion`, and `runtimeConfig` with the capabilities it declares.
/// Plugins run inside `node` (the namespace of the host ends).
pub struct Chain {
    pub node: PathBuf,
    pub list: Value,
    /// Capability name → value (`portMappings`, `bandwidth`, `ips`, `mac`, ...).
    pub runtime_config: Value,
    /// The final ADD result, cached as libcni caches it for CHECK and DEL.
    pub result: Option<Value>,
}

/// A failed step of a chain: which plugin, and what it did.
#[derive(Debug)]
pub struct ChainError {
    pub plugin: String,
    pub run: CniRun,
}

impl Chain {
    pub fn new(node: &Path, list: Value, runtime_config: Value) -> Self {
        Self {
            node: node.to_owned(),
            list,
            runtime_config,
            result: None,
        }
    }

    fn plugins(&self) -> Vec<Value> {
        self.list["plugins"]
            .as_array()
            .cloned()
            .expect("the list has plugins")
    }

    /// The configuration plugin `conf` receives.
    fn plugin_conf(&self, conf: &Value, prev_result: Option<&Value>) -> Value {
        let mut c = conf.clone();
        c["name"] = self.list["name"].clone();
        c["cniVersion"] = self.list["cniVersion"].clone();
        let mut rc = serde_json::Map::new();
        if let Some(caps) = conf["capabilities"].as_object() {
            for (cap, on) in caps {
                if on.as_bool() == Some(true)
                    && let Some(v) = self.runtime_config.get(cap)
                {
                    rc.insert(cap.clone(), v.clone());
                }
            }
        }
        if !rc.is_empty() {
            c["runtimeConfig"] = Value::Object(rc);
        }
        if let Some(prev) = prev_result {
            c["prevResult"] = prev.clone();
        }
        c
    }

    fn program(&self, conf: &Value) -> PathBuf {
        match conf["type"].as_str().expect("every plugin has a type") {
            "hypha-cni" => binary(),
            other => Path::new(REFERENCE_PLUGINS).join(other),
        }
    }

    /// `env` is the runtime's variables but `CNI_COMMAND`.
    fn call(
        &self,
        command: &str,
        conf: &Value,
        prev: Option<&Value>,
        env: &[(&str, &str)],
    ) -> Result<CniRun, ChainError> {
        let mut env: Vec<(&str, &str)> = env.to_vec();
        env.retain(|(k, _)| *k != "CNI_COMMAND");
        env.push(("CNI_COMMAND", command));
        let stdin = self.plugin_conf(conf, prev).to_string();
        let run = run_command(in_netns(&self.node, &self.program(conf)), &env, &stdin);
        if run.status.success() {
            Ok(run)
        } else {
            Err(ChainError {
                plugin: conf["type"].as_str().unwrap_or_default().to_owned(),
                run,
            })
        }
    }

    /// ADD through every plugin; the final result is kept for CHECK and DEL.
    pub fn add(&mut self, env: &[(&str, &str)]) -> Result<Value, ChainError> {
        let mut prev: Option<Value> = None;
        for conf in self.plugins() {
            let run = self.call("ADD", &conf, prev.as_ref(), env)?;
            prev = Some(run.reply());
        }
        self.result = prev.clone();
        Ok(prev.unwrap_or(Value::Null))
    }

    /// CHECK through every plugin, with the cached result.
    pub fn check(&self, env: &[(&str, &str)]) -> Result<(), ChainError> {
        for conf in self.plugins() {
            self.call("CHECK", &conf, self.result.as_ref(), env)?;
        }
        Ok(())
    }

    /// DEL through every plugin in reverse order, with the cached result; every plugin is
    /// called even when one fails, and the first failure is returned.
    pub fn del(&self, env: &[(&str, &str)]) -> Result<(), ChainError> {
        let mut first = None;
        for conf in self.plugins().iter().rev() {
            if let Err(e) = self.call("DEL", conf, self.result.as_ref(), env) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// The runtimes' invocations in `cni-plugin/tests/fixtures/` (see its README), each with
/// its placeholders replaced: `@SOCKET@` by `socket`, `@CID@` by `container_id`, `@IP@` by
/// `ip`, `@IP6@` by `ip6`. Returns (file name, fixture).
pub fn runtime_fixtures(
    socket: &Path,
    container_id: &str,
    ip: &str,
    ip6: &str,
) -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cni-plugin/tests/fixtures");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .replace("@SOCKET@", &socket.display().to_string())
                .replace("@CID@", container_id)
                .replace("@IP@", ip)
                .replace("@IP6@", ip6);
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let fixture =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (name.into_owned(), fixture)
        })
        .collect()
}
