//! A Hypha node for tests: an agent running in a network namespace of its own, with its
//! own socket, state and pin directories, and pods made through the real `hypha-cni`
//! exactly as a runtime makes them (environment plus stdin).
//!
//! Everything is named uniquely (process id plus a counter), so that tests and test runs
//! cannot collide, and everything is taken down in `Drop`, also when a test panics.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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
    /// Its IPv4 address: `0.0.0.0` on an IPv6-only node, where it has none (the tests of
    /// such nodes use [`Pod::addresses`] or [`Pod::v6`]).
    pub address: Ipv4Addr,
    /// Its IPv6 address, on a node with an IPv6 pod CIDR.
    pub address6: Option<Ipv6Addr>,
    pub result: serde_json::Value,
}

impl Pod {
    /// Its IPv6 address; panics (naming the pod) on a pod without one.
    pub fn v6(&self) -> Ipv6Addr {
        self.address6.unwrap_or_else(|| {
            panic!(
                "pod {} has no IPv6 address: {}",
                self.container_id, self.result
            )
        })
    }

    /// Every address it has, IPv4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let v4 = (!self.address.is_unspecified()).then_some(IpAddr::V4(self.address));
        v4.into_iter()
            .chain(self.address6.map(IpAddr::V6))
            .collect()
    }
}

/// The addresses of an ADD result's `ips`, in their order (prefix lengths dropped).
pub fn result_addresses(result: &serde_json::Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|ip| {
            ip["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("an ips entry without a valid address: {ip}"))
        })
        .collect()
}

/// A pod's namespace and container id, made by [`Node::pod_slot`] before any CNI call.
pub struct PodSlot {
    pub netns: NamedNetns,
    pub container_id: String,
}

impl PodSlot {
    /// The IPv4 address a successful ADD's reply gave.
    pub fn address_in(run: &CniRun) -> Ipv4Addr {
        result_addresses(&run.reply())
            .into_iter()
            .find_map(|a| match a {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .unwrap_or_else(|| panic!("no IPv4 address in the ips of {}", run.stdout))
    }

    /// The IPv6 address a successful ADD's reply gave.
    pub fn address6_in(run: &CniRun) -> Ipv6Addr {
        result_addresses(&run.reply())
            .into_iter()
            .find_map(|a| match a {
                IpAddr::V6(a) => Some(a),
                IpAddr::V4(_) => None,
            })
            .unwrap_or_else(|| panic!("no IPv6 address in the ips of {}", run.stdout))
    }
}

/// An agent in its own network namespace (the "host" of the pods).
pub struct Node {
    pub netns: NamedNetns,
    pub tag: String,
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    /// The IPv4 pod CIDR; empty on an IPv6-only node.
    pub pod_cidr: String,
    /// The IPv6 pod CIDR, on a dual-stack or IPv6-only node.
    pub pod_cidr6: Option<String>,
    extra_args: Vec<String>,
    /// Whether the agent is given `--pod-cidr` (not in cluster mode, where the store
    /// allocates the node's CIDRs and the fields above are read back from its status).
    pod_cidr_flag: bool,
    /// How long [`Node::start_agent`] waits for the agent's API.
    start_timeout: Duration,
    agent: Option<Child>,
}

impl Node {
    /// Starts an IPv4-only agent with a pod CIDR `10.<a>.<b>.0/24` of its own (from the
    /// unique tag), in a namespace `hyp-<pid>-<n>-node`.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// As [`Node::start`], with extra `hypha agent` arguments.
    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::start_families(true, false, extra_args)
    }

    /// Starts a dual-stack agent: `--pod-cidr 10.<a>.<b>.0/24,fd00:4879:<c>:<d>::/64`,
    /// both unique to the node (the IPv6 one in fd00::/16, never `fd00::/64`).
    pub fn start_dual() -> Self {
        Self::start_families(true, true, &[])
    }

    /// Starts an IPv6-only agent: `--pod-cidr fd00:4879:<c>:<d>::/64`, unique to the node.
    pub fn start_v6_only() -> Self {
        Self::start_families(false, true, &[])
    }

    /// Starts an agent with an IPv4 pod CIDR, an IPv6 one, or both (at least one).
    pub fn start_families(ipv4: bool, ipv6: bool, extra_args: &[&str]) -> Self {
        assert!(ipv4 || ipv6, "a node needs at least one family");
        let tag = unique_name("hyp");
        let n: u32 = tag
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("numbered tag");
        let pid = std::process::id();
        let pod_cidr = if ipv4 {
            format!("10.{}.{}.0/24", 160 + (pid % 40), n % 250)
        } else {
            String::new()
        };
        // `fd00:4879` ("Hy") keeps every node's /64 away from the host's own `fd00::/64`;
        // the process id and the counter make it unique across tests and runs.
        let pod_cidr6 = ipv6.then(|| format!("fd00:4879:{:x}:{:x}::/64", pid & 0xffff, n & 0xffff));
        let dir = std::env::temp_dir().join(format!("hypha-test-{tag}"));
        std::fs::create_dir_all(&dir).expect("create test dir");
        let mut node = Node {
            netns: NamedNetns::named(format!("{tag}-node")),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/hypha-test-{tag}")),
            tag,
            dir,
            pod_cidr,
            pod_cidr6,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            pod_cidr_flag: true,
            start_timeout: Duration::from_secs(15),
            agent: None,
        };
        node.start_agent();
        node
    }

    /// A node of a cluster ([`crate::cluster::Cluster`]): its namespace, directories and
    /// the agent's arguments (the cluster flags, no `--pod-cidr`), the agent not started
    /// (the caller wires the namespace to the underlay first). Its pod CIDRs are read
    /// from the agent's status each time it starts.
    pub fn cluster_member(extra_args: Vec<String>) -> Self {
        let tag = unique_name("hyc");
        let dir = std::env::temp_dir().join(format!("hypha-test-{tag}"));
        std::fs::create_dir_all(&dir).expect("create test dir");
        Node {
            netns: NamedNetns::named(format!("{tag}-node")),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/hypha-test-{tag}")),
            tag,
            dir,
            pod_cidr: String::new(),
            pod_cidr6: None,
            extra_args,
            pod_cidr_flag: false,
            // Registration in the store comes first.
            start_timeout: Duration::from_secs(30),
            agent: None,
        }
    }

    /// The address of the "world" host [`Node::join_world`] makes.
    pub const WORLD_ADDRESS: &str = "198.18.0.2";
    /// The node's address on the world link, the source the world sees for masqueraded
    /// pod traffic.
    pub const WORLD_GATEWAY: &str = "198.18.0.1";
    /// The world host's IPv6 address (documentation prefix, RFC 3849: no real network).
    pub const WORLD_ADDRESS6: &str = "2001:db8:4879::2";
    /// The node's IPv6 address on the world link.
    pub const WORLD_GATEWAY6: &str = "2001:db8:4879::1";

    /// A "world" host joined to this node by a veth, `198.18.0.2/30` on its side and
    /// `198.18.0.1/30` on the node's (and for IPv6 `2001:db8:4879::2/64` and `::1/64`),
    /// routing the node's pod CIDRs through the node (so pods are reachable from it
    /// unless masqueraded traffic is all it needs). Only the node's families are set up.
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
        if !self.pod_cidr.is_empty() {
            let (node_side, world_side) = (
                format!("{}/30", Self::WORLD_GATEWAY),
                format!("{}/30", Self::WORLD_ADDRESS),
            );
            self.netns
                .exec(&["ip", "addr", "add", &node_side, "dev", &nv]);
            world.exec(&["ip", "addr", "add", &world_side, "dev", &wv]);
        }
        if self.pod_cidr6.is_some() {
            // `nodad`: both ends are fresh and unique; the addresses are usable at once.
            let (node_side, world_side) = (
                format!("{}/64", Self::WORLD_GATEWAY6),
                format!("{}/64", Self::WORLD_ADDRESS6),
            );
            self.netns
                .exec(&["ip", "-6", "addr", "add", &node_side, "dev", &nv, "nodad"]);
            world.exec(&["ip", "-6", "addr", "add", &world_side, "dev", &wv, "nodad"]);
        }
        self.netns.exec(&["ip", "link", "set", &nv, "up"]);
        world.exec(&["ip", "link", "set", &wv, "up"]);
        if !self.pod_cidr.is_empty() {
            world.exec(&[
                "ip",
                "route",
                "add",
                &self.pod_cidr,
                "via",
                Self::WORLD_GATEWAY,
            ]);
        }
        if let Some(cidr6) = &self.pod_cidr6 {
            world.exec(&[
                "ip",
                "-6",
                "route",
                "add",
                cidr6,
                "via",
                Self::WORLD_GATEWAY6,
            ]);
        }
        world
    }

    /// The `--pod-cidr` argument: the node's CIDRs, comma-separated, IPv4 first.
    pub fn pod_cidrs(&self) -> String {
        let v4 = (!self.pod_cidr.is_empty()).then_some(self.pod_cidr.as_str());
        v4.into_iter()
            .chain(self.pod_cidr6.as_deref())
            .collect::<Vec<_>>()
            .join(",")
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
        if let Err(e) = self.try_start_agent() {
            panic!("{e}");
        }
    }

    /// As [`Node::start_agent`], but an agent that exits or does not answer in time is an
    /// error (its exit status and log), not a panic.
    pub fn try_start_agent(&mut self) -> Result<(), String> {
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
            .args(
                self.pod_cidr_flag
                    .then(|| ["--pod-cidr".to_owned(), self.pod_cidrs()])
                    .into_iter()
                    .flatten(),
            )
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
            if let Ok(status) = self.client().status() {
                if !self.pod_cidr_flag {
                    self.pod_cidr = status
                        .node
                        .pod_cidr
                        .map(|c| c.to_string())
                        .unwrap_or_default();
                    self.pod_cidr6 = status.node.pod_cidr6.map(|c| c.to_string());
                }
                return Ok(());
            }
            if let Some(status) = self
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.agent = None;
                return Err(format!("the agent exited with {status}: {}", self.log()));
            }
            if start.elapsed() > self.start_timeout {
                return Err(format!(
                    "the agent did not answer within {:?}: {}",
                    self.start_timeout,
                    self.log()
                ));
            }
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
        self.try_add_pod_with(name, namespace, labels, bandwidth)
            .unwrap_or_else(|out| {
                panic!(
                    "CNI ADD of {name} failed: {}\nagent log:\n{}",
                    out.stdout,
                    self.log()
                )
            })
    }

    /// As [`Node::add_labelled_pod`], but a failed ADD is returned (what `hypha-cni`
    /// answered), not a panic.
    pub fn try_add_labelled_pod(
        &self,
        name: &str,
        namespace: &str,
        labels: &[(&str, &str)],
    ) -> Result<Pod, CniRun> {
        self.try_add_pod_with(name, namespace, labels, None)
    }

    fn try_add_pod_with(
        &self,
        name: &str,
        namespace: &str,
        labels: &[(&str, &str)],
        bandwidth: Option<serde_json::Value>,
    ) -> Result<Pod, CniRun> {
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
        if !out.status.success() {
            return Err(out);
        }
        let result = out.reply();
        let addresses = result_addresses(&result);
        assert!(
            !addresses.is_empty(),
            "no address in the ips of {}",
            out.stdout
        );
        let address = addresses
            .iter()
            .find_map(|a| match a {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let address6 = addresses.iter().find_map(|a| match a {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        });
        Ok(Pod {
            netns,
            container_id,
            address,
            address6,
            result,
        })
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

    /// Runs `hypha-cni CHECK` for a pod, with its ADD result as `prevResult` (as a
    /// runtime passes the cached result).
    pub fn check_pod(&self, pod: &Pod) -> CniRun {
        let path = pod.netns.path().display().to_string();
        let mut conf: serde_json::Value = serde_json::from_str(&self.conf("1.1.0")).expect("conf");
        conf["prevResult"] = pod.result.clone();
        self.cni(
            &Self::cni_env("CHECK", &pod.container_id, &path),
            &conf.to_string(),
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
