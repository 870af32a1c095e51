//! A Hypha node for tests: an agent running in a network namespace of its own, with its
//! own socket, state and pin directories, and pods made through the real `hypha-cni`
//! exactly as a runtime makes them (environment plus stdin).
//!
//! Everything is named uniquely (process id plus a counter), so that tests and test runs
//! cannot collide, and everything is taken down in `Drop`, also when a test panics.

use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hypha_api::{Client, Endpoint, Status};
use nix::sched::CloneFlags;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short unique tag: `<pid>x<n>`, short enough for interface and namespace names.
pub fn unique() -> String {
    format!(
        "{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where cargo put the workspace's binaries (next to the test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf();
    for bin in ["hypha", "hypha-cni"] {
        assert!(
            dir.join(bin).exists(),
            "{} is missing: build the binaries first (`cargo xtask build`)",
            dir.join(bin).display()
        );
    }
    dir
}

/// Runs `ip ARGS`, panicking with its error output on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs a command inside, panicking on failure.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let out = self.try_exec(cmd);
        assert!(
            out.status.success(),
            "in {}: {} failed: {}{}",
            self.name,
            cmd.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .expect("run ip netns exec")
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets it opens live here.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let file = File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// Whether an interface with this name exists inside.
    pub fn has_link(&self, name: &str) -> bool {
        self.try_exec(&["ip", "link", "show", "dev", name])
            .status
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// What `hypha-cni` said.
#[derive(Debug)]
pub struct CniOutput {
    pub success: bool,
    pub stdout: String,
    pub json: serde_json::Value,
}

/// A pod made by `Node::add_pod`.
pub struct Pod {
    pub netns: Netns,
    pub container_id: String,
    pub address: Ipv4Addr,
    pub result: serde_json::Value,
}

/// An agent in its own network namespace (the "host" of the pods).
pub struct Node {
    pub netns: Netns,
    pub tag: String,
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    pub pod_cidr: String,
    bins: PathBuf,
    agent: Option<Child>,
}

impl Node {
    /// Starts an agent with pod CIDR `10.<a>.<b>.0/24` chosen from the unique tag.
    pub fn start() -> Self {
        let tag = unique();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pod_cidr = format!("10.{}.{}.0/24", 160 + (std::process::id() % 40), n % 250);
        let dir = std::env::temp_dir().join(format!("hypha-test-{tag}"));
        std::fs::create_dir_all(&dir).expect("create test dir");
        let mut node = Node {
            netns: Netns::new(format!("hyp-{tag}-node")),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/hyp-test-{tag}")),
            tag,
            dir,
            pod_cidr,
            bins: bin_dir(),
            agent: None,
        };
        node.start_agent();
        node
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    pub fn client(&self) -> Client {
        Client::new(self.socket())
            .expect("client")
            .with_timeout(Duration::from_secs(10))
    }

    /// (Re)starts the agent process inside the node's namespace. `nsenter` changes only the
    /// network namespace, so the agent's bpffs pins outlive it as in production.
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.path().display()))
            .arg(self.bins.join("hypha"))
            .arg("agent")
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--pod-cidr")
            .arg(&self.pod_cidr)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn the agent");
        self.agent = Some(child);
        let start = Instant::now();
        loop {
            if self.client().status().is_ok() {
                return;
            }
            if let Some(status) = self
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("the agent exited with {status}: {}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "the agent did not answer within 15 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the agent, as a crash or an OOM kill would.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            child.kill().expect("kill agent");
            child.wait().expect("reap agent");
        }
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn status(&self) -> Status {
        self.client().status().expect("agent status")
    }

    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.client().endpoints().expect("endpoint list")
    }

    pub fn endpoint(&self, container_id: &str) -> Endpoint {
        self.endpoints()
            .into_iter()
            .find(|e| e.container_id == container_id)
            .unwrap_or_else(|| panic!("no endpoint for {container_id}"))
    }

    /// The network configuration a runtime would pass for this node.
    pub fn conf(&self, version: &str) -> String {
        serde_json::json!({
            "cniVersion": version,
            "name": "hypha-test",
            "type": "hypha-cni",
            "agentSocket": self.socket(),
        })
        .to_string()
    }

    /// Runs `hypha-cni` inside the node's namespace, as a runtime on this node would.
    pub fn cni(&self, env: &[(&str, &str)], stdin: &str) -> CniOutput {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.path().display()))
            .arg(self.bins.join("hypha-cni"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn hypha-cni");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("hypha-cni output");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
        CniOutput {
            success: out.status.success(),
            stdout,
            json,
        }
    }

    /// Standard CNI environment for one container.
    pub fn cni_env<'a>(
        command: &'a str,
        container_id: &'a str,
        netns: &'a str,
    ) -> Vec<(&'a str, &'a str)> {
        vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container_id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ]
    }

    /// Makes a pod through `hypha-cni ADD`, panicking with the CNI error on failure.
    pub fn add_pod(&self, name: &str) -> Pod {
        let netns = Netns::new(format!("hyp-{}-{name}", self.tag));
        let container_id = format!("ctr{}{name}", self.tag);
        let path = netns.path().display().to_string();
        let out = self.cni(
            &Self::cni_env("ADD", &container_id, &path),
            &self.conf("1.1.0"),
        );
        assert!(
            out.success,
            "CNI ADD of {name} failed: {}\nagent log:\n{}",
            out.stdout,
            self.log()
        );
        let address = out.json["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no ips[0].address in {}", out.stdout));
        Pod {
            netns,
            container_id,
            address,
            result: out.json,
        }
    }

    /// Runs `hypha-cni DEL` for a pod.
    pub fn del_pod(&self, pod: &Pod) -> CniOutput {
        let path = pod.netns.path().display().to_string();
        self.cni(
            &Self::cni_env("DEL", &pod.container_id, &path),
            &self.conf("1.1.0"),
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        // The node namespace goes with its Netns field, and with it every host veth.
    }
}
