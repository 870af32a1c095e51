//! A Hypha node for tests: an agent running in a network namespace of its own, with its
//! own socket, state and pin directories, and pods made through the real `hypha-cni`
//! exactly as a runtime makes them (environment plus stdin).
//!
//! Everything is named uniquely (process id plus a counter), so that tests and test runs
//! cannot collide, and everything is taken down in `Drop`, also when a test panics.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hypha_api::{Client, Endpoint, Status};

use crate::cni::{self, CniRun};
use crate::netns::{NamedNetns, unique_name};

/// A pod made by `Node::add_pod`.
pub struct Pod {
    pub netns: NamedNetns,
    pub container_id: String,
    pub address: Ipv4Addr,
    pub result: serde_json::Value,
}

/// A pod's namespace and container id, made by [`Node::pod_slot`] before any CNI call.
pub struct PodSlot {
    pub netns: NamedNetns,
    pub container_id: String,
}

impl PodSlot {
    /// The address a successful ADD's reply gave.
    pub fn address_in(run: &CniRun) -> Ipv4Addr {
        let reply = run.reply();
        reply["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no ips[0].address in {}", run.stdout))
    }
}

/// An agent in its own network namespace (the "host" of the pods).
pub struct Node {
    pub netns: NamedNetns,
    pub tag: String,
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    pub pod_cidr: String,
    extra_args: Vec<String>,
    agent: Option<Child>,
}

impl Node {
    /// Starts an agent with a pod CIDR `10.<a>.<b>.0/24` of its own (from the unique tag),
    /// in a namespace `hyp-<pid>-<n>-node`.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// As [`Node::start`], with extra `hypha agent` arguments.
    pub fn start_with(extra_args: &[&str]) -> Self {
        let tag = unique_name("hyp");
        let n: u32 = tag
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("numbered tag");
        let pod_cidr = format!("10.{}.{}.0/24", 160 + (std::process::id() % 40), n % 250);
        let dir = std::env::temp_dir().join(format!("hypha-test-{tag}"));
        std::fs::create_dir_all(&dir).expect("create test dir");
        let mut node = Node {
            netns: NamedNetns::named(format!("{tag}-node")),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/hypha-test-{tag}")),
            tag,
            dir,
            pod_cidr,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            agent: None,
        };
        node.start_agent();
        node
    }

    /// The address of the "world" host [`Node::join_world`] makes.
    pub const WORLD_ADDRESS: &str = "198.18.0.2";

    /// A "world" host joined to this node by a veth, `198.18.0.2/30` on its side and
    /// `198.18.0.1/30` on the node's, routing the node's pod CIDR through the node (so
    /// pods are reachable from it unless masqueraded traffic is all it needs).
    pub fn join_world(&self) -> NamedNetns {
        let world = NamedNetns::named(format!("{}-w", self.tag));
        let tag = unique_name("hw").replace('-', "");
        let (nv, wv) = (format!("{tag}n"), format!("{tag}w"));
        crate::netns::ip(&[
            "link",
            "add",
            &nv,
            "netns",
            self.netns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &wv,
            "netns",
            world.name(),
        ]);
        self.netns
            .exec(&["ip", "addr", "add", "198.18.0.1/30", "dev", &nv]);
        self.netns.exec(&["ip", "link", "set", &nv, "up"]);
        world.exec(&["ip", "addr", "add", "198.18.0.2/30", "dev", &wv]);
        world.exec(&["ip", "link", "set", &wv, "up"]);
        world.exec(&["ip", "route", "add", &self.pod_cidr, "via", "198.18.0.1"]);
        world
    }

    /// The directory this node's agent watches for policy files.
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.join("policies")
    }

    /// Runs `hypha ARGS --socket <this node's>`; returns (success, stdout, stderr).
    pub fn hypha(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(crate::binary("hypha"))
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .expect("run hypha");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    pub fn client(&self) -> Client {
        Client::new(self.socket())
            .expect("client")
            .with_timeout(Duration::from_secs(10))
    }

    /// Replaces the extra `hypha agent` arguments the next [`Node::start_agent`] passes
    /// (a restart with other settings).
    pub fn set_agent_args(&mut self, extra_args: &[&str]) {
        self.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
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
            .arg(crate::binary("hypha"))
            .arg("agent")
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--pod-cidr")
            .arg(&self.pod_cidr)
            .arg("--policy-dir")
            .arg(self.policy_dir())
            .args(&self.extra_args)
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

    /// The running agent's pid (that of `nsenter`, which execs the agent in place).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// SIGKILLs the agent without waiting for it, from any thread (a test's pods may be
    /// mid-ADD); [`Node::kill_agent`] reaps it afterwards.
    pub fn sigkill_agent(&self) {
        if let Some(pid) = self.agent_pid() {
            // SAFETY: plain kill(2) on our own child's pid; it is not reaped before
            // `kill_agent` or `Drop` (both need `&mut self`), so it cannot be reused.
            let rc = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            assert_eq!(
                rc,
                0,
                "SIGKILL the agent {pid}: {}",
                std::io::Error::last_os_error()
            );
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
        cni::conf(version, &self.socket())
    }

    /// Runs `hypha-cni` inside the node's namespace, as a runtime on this node would.
    pub fn cni(&self, env: &[(&str, &str)], stdin: &str) -> CniRun {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.path().display()))
            .arg(cni::binary());
        cni::run_command(cmd, env, stdin)
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
        self.add_labelled_pod(name, "default", &[])
    }

    /// Makes a pod in Kubernetes namespace `namespace` with `labels`, passed as a runtime
    /// passes them: `K8S_POD_NAMESPACE`/`K8S_POD_NAME` in `CNI_ARGS` and the labels in
    /// `args.cni.labels`.
    pub fn add_labelled_pod(&self, name: &str, namespace: &str, labels: &[(&str, &str)]) -> Pod {
        self.add_pod_with(name, namespace, labels, None)
    }

    /// Makes a pod with rate limits, passed as a runtime passes the CNI `bandwidth`
    /// capability: `runtimeConfig.bandwidth` (`ingressRate`, `egressBurst`, ... in bits).
    pub fn add_pod_with_bandwidth(&self, name: &str, bandwidth: serde_json::Value) -> Pod {
        self.add_pod_with(name, "default", &[], Some(bandwidth))
    }

    fn add_pod_with(
        &self,
        name: &str,
        namespace: &str,
        labels: &[(&str, &str)],
        bandwidth: Option<serde_json::Value>,
    ) -> Pod {
        let netns = NamedNetns::named(format!("{}-{name}", self.tag));
        let container_id = format!("ctr{}{name}", self.tag);
        let path = netns.path().display().to_string();
        let mut conf: serde_json::Value = serde_json::from_str(&self.conf("1.1.0")).expect("conf");
        conf["args"] = serde_json::json!({
            "cni": {
                "labels": labels
                    .iter()
                    .map(|(k, v)| serde_json::json!({"key": k, "value": v}))
                    .collect::<Vec<_>>()
            }
        });
        if let Some(bw) = bandwidth {
            conf["runtimeConfig"] = serde_json::json!({ "bandwidth": bw });
        }
        let cni_args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}");
        let mut env = Self::cni_env("ADD", &container_id, &path);
        env.push(("CNI_ARGS", &cni_args));
        let out = self.cni(&env, &conf.to_string());
        assert!(
            out.status.success(),
            "CNI ADD of {name} failed: {}\nagent log:\n{}",
            out.stdout,
            self.log()
        );
        let result = out.reply();
        let address = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no ips[0].address in {}", out.stdout));
        Pod {
            netns,
            container_id,
            address,
            result,
        }
    }

    /// A namespace and a container id for a pod named `name`, for a test that runs its
    /// CNI calls itself ([`Node::cni_add`], [`Node::cni_del`]) and judges what they did.
    pub fn pod_slot(&self, name: &str) -> PodSlot {
        PodSlot {
            netns: NamedNetns::named(format!("{}-{name}", self.tag)),
            container_id: format!("ctr{}{name}", self.tag),
        }
    }

    /// `hypha-cni ADD` of `slot` (no labels), whatever comes of it.
    pub fn cni_add(&self, slot: &PodSlot) -> CniRun {
        let path = slot.netns.path().display().to_string();
        self.cni(
            &Self::cni_env("ADD", &slot.container_id, &path),
            &self.conf("1.1.0"),
        )
    }

    /// `hypha-cni DEL` of `slot`, whatever comes of it.
    pub fn cni_del(&self, slot: &PodSlot) -> CniRun {
        let path = slot.netns.path().display().to_string();
        self.cni(
            &Self::cni_env("DEL", &slot.container_id, &path),
            &self.conf("1.1.0"),
        )
    }

    /// Runs `hypha-cni DEL` for a pod.
    pub fn del_pod(&self, pod: &Pod) -> CniRun {
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
