//! Running `hypha run` and its companions as a user would, against a test [`Node`]:
//! the launcher runs inside the node's network namespace (`nsenter --net`), so that for
//! it and its CNI plugins "the host" is the node, with a CNI configuration directory, a
//! plugin path (the built `hypha-cni`) and a run directory of its own.
//!
//! Every container is removed (`hypha rm -f`) and every directory deleted in `Drop`,
//! also when a test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::unique_name;
use crate::node::Node;

/// The name of the network every [`Launcher`] configures.
pub const NETWORK: &str = "hyphatest";

pub struct Launcher {
    pub dir: PathBuf,
    /// The node's netns path, when the launcher runs against a node.
    node_netns: Option<PathBuf>,
    /// A directory searched for plugins after the one of `hypha-cni`.
    pub extra_cni_dir: Option<PathBuf>,
}

/// What one `hypha` invocation produced.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics unless the exit code was 0; returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "hypha failed: {self:?}");
        &self.stdout
    }
}

impl Launcher {
    /// A launcher without a node: `--network none` only (the configuration directory is
    /// empty).
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("hypha-launcher-{}", unique_name("l")));
        std::fs::create_dir_all(dir.join("net.d")).expect("create the test dirs");
        Self {
            dir,
            node_netns: None,
            extra_cni_dir: None,
        }
    }

    /// A launcher against `node`: its network [`NETWORK`] is one `hypha-cni` plugin
    /// talking to the node's agent, and the launcher runs in the node's namespace.
    pub fn for_node(node: &Node) -> Self {
        let mut l = Self::new();
        l.write_conflist(
            "10-hypha.conflist",
            &serde_json::json!({
                "cniVersion": "1.0.0",
                "name": NETWORK,
                "plugins": [{"type": "hypha-cni", "agentSocket": node.socket()}],
            }),
        );
        l.node_netns = Some(node.netns.path());
        l
    }

    pub fn write_conflist(&self, file: &str, conf: &Value) {
        std::fs::write(self.dir.join("net.d").join(file), conf.to_string()).expect("write conf");
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// The launcher's own image store (`HYPHA_IMAGE_DIR` of every command).
    pub fn image_dir(&self) -> PathBuf {
        self.dir.join("images")
    }

    /// `hypha ARGS` with this launcher's directories, in the node's netns if any.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match &self.node_netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg(crate::binary("hypha"));
                c
            }
            None => Command::new(crate::binary("hypha")),
        };
        let mut cni_path = crate::cni::binary()
            .parent()
            .expect("hypha-cni has a directory")
            .as_os_str()
            .to_owned();
        if let Some(extra) = &self.extra_cni_dir {
            cni_path.push(":");
            cni_path.push(extra);
        }
        cmd.args(args)
            .env("HYPHA_RUN_DIR", self.run_dir())
            .env("HYPHA_IMAGE_DIR", self.image_dir())
            .env("CNI_CONF_DIR", self.dir.join("net.d"))
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `hypha ARGS` to completion (at most 60 s).
    pub fn hypha(&self, args: &[&str]) -> Run {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hypha");
        let start = Instant::now();
        while child.try_wait().expect("wait for hypha").is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("hypha {} did not finish within 60 s", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Run::from(child.wait_with_output().expect("hypha output"))
    }

    /// Starts `hypha ARGS` without waiting (a foreground container to be killed).
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start hypha")
    }

    /// `hypha ps -o json`.
    pub fn ps(&self) -> Vec<Value> {
        let out = self.hypha(&["ps", "-o", "json"]);
        serde_json::from_str::<Value>(out.ok())
            .unwrap_or_else(|e| panic!("ps -o json is not JSON ({e}): {out:?}"))
            .as_array()
            .cloned()
            .expect("ps -o json is an array")
    }

    /// The `ps` entry of one container, if any.
    pub fn container(&self, name: &str) -> Option<Value> {
        self.ps().into_iter().find(|c| c["name"] == name)
    }

    /// The first IPv4 address of a container.
    pub fn ip(&self, name: &str) -> String {
        self.address_of(name, |a| a.is_ipv4())
    }

    /// The first IPv6 address of a container.
    pub fn ip6(&self, name: &str) -> String {
        self.address_of(name, |a| a.is_ipv6())
    }

    /// Every address `ps` lists for a container, in its order.
    pub fn ips(&self, name: &str) -> Vec<String> {
        let c = self
            .container(name)
            .unwrap_or_else(|| panic!("no container {name}"));
        c["ips"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has no ips list: {c}"))
            .iter()
            .map(|a| a.as_str().expect("an address string").to_owned())
            .collect()
    }

    fn address_of(&self, name: &str, family: impl Fn(&std::net::IpAddr) -> bool) -> String {
        let ips = self.ips(name);
        ips.iter()
            .find(|a| a.parse().is_ok_and(|a| family(&a)))
            .unwrap_or_else(|| panic!("{name} has no address of that family: {ips:?}"))
            .clone()
    }

    /// Names of entries in the run directory.
    pub fn entries(&self) -> Vec<String> {
        std::fs::read_dir(self.run_dir())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A CNI plugin that records each call (in `<dir>/calls`: `COMMAND NAME CNI_ARGS`, and its
/// configuration in `<dir>/<COMMAND>-<NAME>.json`) and answers ADD with its `prevResult`.
pub fn write_recorder_plugin(dir: &Path, name: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).expect("plugin dir");
    let path = dir.join(name);
    let d = dir.display();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             echo \"$CNI_COMMAND {name} $CNI_ARGS\" >> {d}/calls\n\
             cat > {d}/$CNI_COMMAND-{name}.json\n\
             [ \"$CNI_COMMAND\" = ADD ] || exit 0\n\
             exec perl -MJSON::PP -0777 -e 'print encode_json(decode_json(<STDIN>)->{{prevResult}})' \
             < {d}/ADD-{name}.json\n"
        ),
    )
    .expect("write the plugin");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

impl Default for Launcher {
    fn default() -> Self {
        Self::new()
    }
}

/// Cgroup directories of the container named `name` in any v1 controller or in the v2
/// hierarchy (`hypha/<name>-<id>`).
pub fn cgroups_of(name: &str) -> Vec<PathBuf> {
    let mut found = vec![];
    let root = Path::new("/sys/fs/cgroup");
    let mut parents = vec![root.join("hypha")];
    for c in ["memory", "cpu", "pids"] {
        parents.push(root.join(c).join("hypha"));
    }
    for p in parents {
        if let Ok(d) = std::fs::read_dir(&p) {
            for e in d.filter_map(|e| e.ok()) {
                if e.file_name()
                    .to_string_lossy()
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('-'))
                {
                    found.push(e.path());
                }
            }
        }
    }
    found
}

/// Mounts (of this process's mount namespace) whose mount point is under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&dir)))
        .map(str::to_owned)
        .collect()
}

impl Drop for Launcher {
    fn drop(&mut self) {
        for name in self.entries() {
            let _ = self
                .command(&["rm", "-f", &name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
