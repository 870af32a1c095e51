//! `cargo xtask soak`: ADD/DEL cycles through the real `hypha-cni` against a real agent,
//! with the agent and plugin processes SIGKILLed at random moments, while two long-lived
//! pods keep a ping and a TCP stream going; then it counts what was left behind.
//!
//! The node is a network namespace of its own (`hyps-<pid>-node`) with its own socket,
//! state directory, pin directory and pod CIDR, as the tests' `Node` has; the pods are
//! namespaces `hyps-<pid>-c<cycle>` (and `-l1`, `-l2` for the long-lived pair). Every
//! worker thread does, for one cycle after another: make the pod's namespace, ADD, keep
//! the pod a moment, then DEL as a runtime does (again and again until it succeeds,
//! whatever the ADD did), check the pod's `eth0` went, delete the namespace. About one
//! plugin run in ten is SIGKILLed mid-ADD or mid-DEL; about every 50 cycles the agent is
//! SIGKILLed while ADDs and DELs are in flight and started again at once. A policy selects
//! the long-lived pods (so their flows are tracked in `hypha_ct4`) and every worker pod,
//! each with a label of its own (so each one gets an identity, policy entries and an
//! ipcache entry that must all go with it).
//!
//! At the end, after DEL of everything and the agent's reconcile interval: leaked host
//! veths, routes, addresses, state records, identities, map entries, pinned links and
//! namespaces are counted, and the longest gap in the two flows is measured. The task
//! fails if anything leaked, a DEL never succeeded, or a flow stopped for more than 1 s.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use hypha_netlink::Netlink;
use ipnet::Ipv4Net;

use crate::bench::measure::enter_netns;
use crate::bench::teardown::{Teardown, Undo};
use crate::util::{describe, end_netns_processes, output, workspace_root};

#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// ADD/DEL cycles in all.
    #[arg(long, default_value_t = 1000)]
    pub cycles: u32,
    /// Worker threads; each has one pod of its own alive at a time.
    #[arg(long, default_value_t = 8)]
    pub workers: u32,
    /// The agent is SIGKILLed (and started again) about every this many cycles.
    #[arg(long, default_value_t = 50)]
    pub agent_kill_every: u32,
    /// Percentage of plugin runs SIGKILLed mid-ADD or mid-DEL.
    #[arg(long, default_value_t = 10)]
    pub plugin_kill_percent: u32,
    /// Seed of the random choices (default: from the clock); printed, so that a run's
    /// choices can be made again.
    #[arg(long)]
    pub seed: Option<u64>,
    /// The longest gap allowed in the long-lived flows, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub max_gap: f64,
}

impl Options {
    /// The short version `cargo xtask test` runs.
    pub fn ci() -> Self {
        Self {
            cycles: 100,
            workers: 8,
            agent_kill_every: 50,
            plugin_kill_percent: 10,
            seed: None,
            max_gap: 1.0,
        }
    }
}

/// How long the agent may take to answer after a start.
const AGENT_READY: Duration = Duration::from_secs(15);
/// How long a runtime keeps retrying one pod's DEL before the soak calls it stuck.
const DEL_PATIENCE: Duration = Duration::from_secs(60);
/// The agent finishes deferred deletes every 5 s (`RECONCILE_EVERY` in agent/src/daemon.rs);
/// the final count waits for two rounds at most.
const RECONCILE_WAIT: Duration = Duration::from_secs(12);
/// Port of the long-lived TCP stream.
const STREAM_PORT: u16 = 7411;

/// Small, seedable, good enough for choosing moments (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn millis(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.below(max + 1))
    }
}

/// What one plugin run came to.
enum Run {
    Ok(String),
    Failed(String),
    /// SIGKILLed by the soak before it finished.
    Killed,
}

impl Run {
    /// One line for a pod's history: the command, when it was killed, how it ended.
    fn describe(&self, command: &str, kill_after: Option<Duration>) -> String {
        let kill = kill_after.map_or(String::new(), |d| format!(" (SIGKILL due after {d:?})"));
        match self {
            Run::Ok(_) => format!("{command}{kill}: ok"),
            Run::Failed(e) => format!("{command}{kill}: failed: {e}"),
            Run::Killed => format!("{command}{kill}: killed"),
        }
    }
}

/// Counters of the run, printed at the end.
#[derive(Default)]
struct Stats {
    adds_ok: AtomicU32,
    adds_failed: AtomicU32,
    adds_killed: AtomicU32,
    dels_ok_first: AtomicU32,
    dels_killed: AtomicU32,
    dels_failed: AtomicU32,
    dels_retried_pods: AtomicU32,
    dels_max_attempts: AtomicU32,
    /// Pods whose DEL never succeeded within [`DEL_PATIENCE`].
    dels_stuck: AtomicU32,
    /// Pods whose `eth0` was still there after a successful DEL.
    veths_after_del: AtomicU32,
    agent_kills: AtomicU32,
    /// When each SIGKILL was sent (seconds since the epoch).
    agent_kill_times: Mutex<Vec<f64>>,
    agent_start_failures: AtomicU32,
    /// Total time the agent did not answer after a kill, in ms.
    agent_down_ms: AtomicU64,
    max_agent_down_ms: AtomicU64,
    problems: Mutex<Vec<String>>,
    add_errors: Mutex<BTreeMap<String, u32>>,
    /// What each pod's plugin runs came to, by container id, for the report of a leak.
    history: Mutex<BTreeMap<String, Vec<String>>>,
}

impl Stats {
    fn problem(&self, p: String) {
        eprintln!("soak: {p}");
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p);
    }

    fn event(&self, container_id: &str, what: String) {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(container_id.to_owned())
            .or_default()
            .push(what);
    }

    fn add_error(&self, msg: &str) {
        // Group errors by their text without the container-specific parts.
        let key: String = msg.chars().take(160).collect();
        *self
            .add_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }
}

struct Soak {
    opts: Options,
    uniq: u32,
    bin: PathBuf,
    tmp: PathBuf,
    pin_dir: PathBuf,
    node_ns: String,
    pod_cidr: Ipv4Net,
    td: Teardown,
    agent: Mutex<Option<Arc<Mutex<Child>>>>,
    stats: Stats,
}

pub fn run(opts: Options) -> Result<()> {
    if opts.workers == 0 || opts.cycles == 0 {
        bail!("--workers and --cycles must be at least 1");
    }
    let uniq = std::process::id();
    let seed = opts.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let soak = Arc::new(Soak {
        uniq,
        bin: workspace_root().join("target/debug"),
        tmp: std::env::temp_dir().join(format!("hypha-soak-{uniq}")),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/hypha-soak-{uniq}")),
        node_ns: format!("hyps-{uniq}-node"),
        // Inside the node's own namespace, so no host route can collide with it.
        pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, 97, 0, 0), 24).expect("a valid prefix length"),
        td: Teardown::install()?,
        agent: Mutex::new(None),
        stats: Stats::default(),
        opts,
    });
    println!(
        "soak: {} cycles, {} workers, agent SIGKILL about every {} cycles, {}% of plugin runs SIGKILLed, seed {seed}",
        soak.opts.cycles,
        soak.opts.workers,
        soak.opts.agent_kill_every,
        soak.opts.plugin_kill_percent
    );
    let result = soak.clone().drive(seed);
    let soak = Arc::into_inner(soak).context("a soak thread outlived the run")?;
    let cleanup = soak.td.finish();
    let verdict = result?;
    cleanup?;
    verdict
}

/// The figures of the final count.
struct Counts {
    rows: Vec<(&'static str, u64)>,
    /// What the leaked map entries are, for the report.
    details: Vec<String>,
}

impl Soak {
    fn node_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.node_ns)
    }

    fn socket(&self) -> PathBuf {
        self.tmp.join("agent.sock")
    }

    fn state_dir(&self) -> PathBuf {
        self.tmp.join("state")
    }

    /// Runs the whole soak; the outer `Result` is a failure to run it, the inner one its
    /// verdict.
    fn drive(self: Arc<Self>, seed: u64) -> Result<Result<()>> {
        self.prepare()?;
        self.start_agent()?;
        self.apply_policy()?;

        // The long-lived pair and its flows.
        let l1 = self.long_pod("l1")?;
        let l2 = self.long_pod("l2")?;
        let stop_flows = Arc::new(AtomicBool::new(false));
        let ping_log = self.tmp.join("ping.log");
        self.td.spawn(
            "ping",
            Command::new("ip")
                .args(["netns", "exec", &l1.0, "ping", "-D", "-i", "0.05"])
                .arg(l2.1.to_string())
                .stdout(std::fs::File::create(&ping_log)?)
                .stderr(Stdio::null()),
        )?;
        let stream = tcp_stream(&l1.0, &l2.0, l2.1, stop_flows.clone())?;

        // Workers and the agent killer.
        let next = Arc::new(AtomicU32::new(0));
        let done = Arc::new(AtomicU32::new(0));
        let started = Instant::now();
        let workers: Vec<_> = (0..self.opts.workers)
            .map(|w| {
                let (soak, next, done) = (self.clone(), next.clone(), done.clone());
                let rng = Rng(seed ^ (u64::from(w) + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
                std::thread::spawn(move || soak.worker(rng, &next, &done))
            })
            .collect();
        let killer = {
            let (soak, done) = (self.clone(), done.clone());
            let rng = Rng(seed ^ 0x5eed);
            std::thread::spawn(move || soak.agent_killer(rng, &done))
        };
        let mut last_report = Instant::now();
        // The same counts while pods come and go, so that the final zeros are zeros of
        // things that did exist (a count the agent's restarts interrupt is skipped).
        let mut peaks: Vec<u64> = Vec::new();
        let mut last_sample = Instant::now();
        while !workers.iter().all(|w| w.is_finished()) {
            std::thread::sleep(Duration::from_millis(200));
            if last_sample.elapsed() > Duration::from_secs(3) {
                last_sample = Instant::now();
                if let Ok(c) = self.count() {
                    peaks.resize(c.rows.len(), 0);
                    for (p, (_, n)) in peaks.iter_mut().zip(&c.rows) {
                        *p = (*p).max(*n);
                    }
                }
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                last_report = Instant::now();
                println!(
                    "soak: {}/{} cycles, {} agent kills, {:.0} s",
                    done.load(Ordering::Relaxed),
                    self.opts.cycles,
                    self.stats.agent_kills.load(Ordering::Relaxed),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        for w in workers {
            if let Err(e) = w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))? {
                self.stats.problem(format!("a worker stopped: {e:#}"));
            }
        }
        killer
            .join()
            .map_err(|_| anyhow::anyhow!("the agent killer panicked"))??;
        let cycles_time = started.elapsed();
        // The agent must be up for the last DELs to be done at once (as a runtime's would).
        self.ensure_agent()?;

        // Flows: stop, measure.
        stop_flows.store(true, Ordering::Relaxed);
        let stream = stream
            .join()
            .map_err(|_| anyhow::anyhow!("the TCP stream thread panicked"))?;
        end_netns_processes(&Path::new("/run/netns").join(&l1.0))?;
        let ping = ping_gap(&std::fs::read_to_string(&ping_log)?);

        // DEL of the long-lived pair, then their namespaces.
        for (ns, _, id) in [&l1, &l2] {
            self.del_until_done(id, ns, &mut Rng(seed), false);
            self.delete_netns(ns)?;
        }

        let counts = self.final_counts()?;
        let gap_ping = ping.as_ref().map(|p| p.max_gap).unwrap_or(f64::INFINITY);
        let gap_tcp = stream.as_ref().map(|s| s.max_gap).unwrap_or(f64::INFINITY);
        self.report(cycles_time, &counts, &peaks, &ping, &stream);
        let mut failures = Vec::new();
        for (what, n) in &counts.rows {
            if *n != 0 {
                failures.push(format!("{n} leaked {what}"));
            }
        }
        for (name, gap) in [("ping", gap_ping), ("TCP stream", gap_tcp)] {
            if gap > self.opts.max_gap {
                failures.push(format!(
                    "the {name} stopped for {gap:.3} s (limit {} s)",
                    self.opts.max_gap
                ));
            }
        }
        if let Err(e) = &ping {
            failures.push(format!("ping: {e:#}"));
        }
        if let Err(e) = &stream {
            failures.push(format!("TCP stream: {e:#}"));
        }
        failures.extend(
            self.stats
                .problems
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        Ok(if failures.is_empty() {
            println!("soak: PASS");
            Ok(())
        } else {
            Err(anyhow::anyhow!("soak failed: {}", failures.join("; ")))
        })
    }

    fn prepare(&self) -> Result<()> {
        for (what, p) in [("node namespace", self.node_path())] {
            if p.exists() {
                bail!("{what} {} already exists", p.display());
            }
        }
        let tmp = self.tmp.clone();
        self.td.make(Undo::Dir(tmp.clone()), || {
            std::fs::create_dir_all(tmp.join("policies"))
                .with_context(|| format!("creating {}", tmp.display()))
        })?;
        let pin = self.pin_dir.clone();
        self.td.make(Undo::Dir(pin), || Ok(()))?;
        let ns = self.node_ns.clone();
        self.td.make(Undo::Netns(ns.clone()), || {
            output(Command::new("ip").args(["netns", "add", &ns]))?;
            output(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]))
        })?;
        Ok(())
    }

    /// Starts the agent in the node's namespace and waits until it answers. A start that
    /// fails (such as a lock still held by the process just killed) is retried a few times
    /// and counted.
    fn start_agent(&self) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let log = std::fs::File::options()
                .create(true)
                .append(true)
                .open(self.tmp.join("agent.log"))?;
            let child = self.td.spawn(
                "hypha agent",
                Command::new("nsenter")
                    .arg(format!("--net={}", self.node_path().display()))
                    .arg(self.bin.join("hypha"))
                    .arg("agent")
                    .arg("--socket")
                    .arg(self.socket())
                    .arg("--state-dir")
                    .arg(self.state_dir())
                    .arg("--pin-dir")
                    .arg(&self.pin_dir)
                    .arg("--pod-cidr")
                    .arg(self.pod_cidr.to_string())
                    .arg("--policy-dir")
                    .arg(self.tmp.join("policies"))
                    .stdout(Stdio::null())
                    .stderr(log),
            )?;
            *self.agent.lock().unwrap_or_else(|e| e.into_inner()) = Some(child.clone());
            let start = Instant::now();
            let exited = loop {
                if self.hypha(&["status"]).is_ok() {
                    return Ok(());
                }
                if let Some(status) = child.lock().unwrap_or_else(|e| e.into_inner()).try_wait()? {
                    break Some(status);
                }
                if start.elapsed() > AGENT_READY {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            self.stats
                .agent_start_failures
                .fetch_add(1, Ordering::Relaxed);
            let why = match exited {
                Some(status) => format!("exited with {status}"),
                None => format!("did not answer within {AGENT_READY:?}"),
            };
            let tail = self.agent_log_tail();
            if attempt >= 5 {
                bail!("the agent did not start ({why}) after {attempt} attempts: {tail}");
            }
            eprintln!("soak: agent start {attempt} {why}: {tail}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn agent_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.tmp.join("agent.log")).unwrap_or_default();
        log.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
    }

    /// The agent's log lines that name `container_id`, for the report of a leak.
    fn agent_log_of(&self, container_id: &str) -> Vec<String> {
        let log = std::fs::read_to_string(self.tmp.join("agent.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains(container_id))
            .map(|l| format!("  agent log: {l}"))
            .collect()
    }

    /// Starts the agent if it is not running.
    fn ensure_agent(&self) -> Result<()> {
        let running = self
            .agent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|c| {
                c.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .try_wait()
                    .is_ok_and(|s| s.is_none())
            });
        if running { Ok(()) } else { self.start_agent() }
    }

    fn kill_agent(&self) -> Result<()> {
        let child = self.agent.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(child) = child {
            let mut c = child.lock().unwrap_or_else(|e| e.into_inner());
            if c.try_wait()?.is_none() {
                c.kill().context("SIGKILL to the agent")?;
            }
            c.wait().context("reaping the agent")?;
        }
        Ok(())
    }

    fn hypha(&self, args: &[&str]) -> Result<String> {
        output(
            Command::new(self.bin.join("hypha"))
                .args(args)
                .arg("--socket")
                .arg(self.socket()),
        )
    }

    fn apply_policy(&self) -> Result<()> {
        let file = self.tmp.join("soak-policy.yaml");
        std::fs::write(&file, POLICY)?;
        self.hypha(&["policy", "apply", "-f", &file.display().to_string()])?;
        Ok(())
    }

    /// The network configuration for one pod, with its labels as a runtime passes them.
    fn conf(&self, labels: &[(&str, &str)]) -> String {
        serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "hypha-soak",
            "type": "hypha-cni",
            "agentSocket": self.socket(),
            "args": { "cni": { "labels": labels
                .iter()
                .map(|(k, v)| serde_json::json!({"key": k, "value": v}))
                .collect::<Vec<_>>() } },
        })
        .to_string()
    }

    /// Runs `hypha-cni` in the node's namespace as a runtime does; SIGKILLs it after
    /// `kill_after` if it is still running then.
    fn plugin(
        &self,
        command: &str,
        container_id: &str,
        netns: &str,
        conf: &str,
        kill_after: Option<Duration>,
    ) -> Result<Run> {
        let pod_name = container_id.to_owned();
        let cni_args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod_name}");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.node_path().display()))
            .arg(self.bin.join("hypha-cni"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", format!("/run/netns/{netns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin:/usr/lib/cni")
            .env("CNI_ARGS", cni_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", describe(&cmd)))?;
        // A plugin killed before reading its stdin breaks the pipe: that is the point.
        let wrote = child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(conf.as_bytes());
        let mut killed = false;
        if let Some(after) = kill_after {
            std::thread::sleep(after);
            if child.try_wait()?.is_none() {
                child.kill().context("SIGKILL to hypha-cni")?;
                killed = true;
            }
        }
        let out = child.wait_with_output()?;
        if killed {
            return Ok(Run::Killed);
        }
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            wrote.context("writing the configuration to hypha-cni")?;
            Ok(Run::Ok(stdout))
        } else {
            Ok(Run::Failed(format!(
                "{} {}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    fn make_netns(&self, name: &str) -> Result<()> {
        let ns = name.to_owned();
        self.td.make(Undo::Netns(ns.clone()), || {
            output(Command::new("ip").args(["netns", "add", &ns]))?;
            output(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]))
        })?;
        Ok(())
    }

    fn delete_netns(&self, name: &str) -> Result<()> {
        let path = Path::new("/run/netns").join(name);
        end_netns_processes(&path)?;
        output(Command::new("ip").args(["netns", "del", name]))?;
        Ok(())
    }

    /// One of the long-lived pods: (netns, address, container id).
    fn long_pod(&self, name: &str) -> Result<(String, Ipv4Addr, String)> {
        let ns = format!("hyps-{}-{name}", self.uniq);
        let id = format!("soak{}{name}", self.uniq);
        self.make_netns(&ns)?;
        let conf = self.conf(&[("app", "long")]);
        match self.plugin("ADD", &id, &ns, &conf, None)? {
            Run::Ok(out) => {
                let v: serde_json::Value = serde_json::from_str(&out)?;
                let addr = v["ips"][0]["address"]
                    .as_str()
                    .and_then(|a| a.split('/').next())
                    .and_then(|a| a.parse().ok())
                    .with_context(|| format!("no ips[0].address in {out}"))?;
                Ok((ns, addr, id))
            }
            Run::Failed(e) => bail!("ADD of the long-lived pod {name}: {e}"),
            Run::Killed => bail!("ADD of the long-lived pod {name} was killed"),
        }
    }

    /// One worker: cycle after cycle until all are taken.
    fn worker(&self, mut rng: Rng, next: &AtomicU32, done: &AtomicU32) -> Result<()> {
        loop {
            let cycle = next.fetch_add(1, Ordering::Relaxed);
            if cycle >= self.opts.cycles {
                return Ok(());
            }
            let ns = format!("hyps-{}-c{cycle}", self.uniq);
            let id = format!("soak{}c{cycle}", self.uniq);
            self.make_netns(&ns)?;
            // Which run, if any, is SIGKILLed: ADD or DEL, half each.
            let kill = rng.below(100) < u64::from(self.opts.plugin_kill_percent);
            let kill_add = kill && rng.below(2) == 0;
            let kill_del = kill && !kill_add;
            // ADD takes some 30 to 100 ms here: a kill within 80 ms lands mid-ADD.
            let after = kill_add.then(|| rng.millis(80));
            let cycle_label = cycle.to_string();
            let conf = self.conf(&[("app", "soak"), ("cycle", &cycle_label)]);
            let outcome = self.plugin("ADD", &id, &ns, &conf, after)?;
            self.stats.event(&id, outcome.describe("ADD", after));
            match outcome {
                Run::Ok(_) => {
                    self.stats.adds_ok.fetch_add(1, Ordering::Relaxed);
                    // Keep the pod a moment, so several are alive at once.
                    std::thread::sleep(rng.millis(100));
                }
                Run::Failed(e) => {
                    self.stats.adds_failed.fetch_add(1, Ordering::Relaxed);
                    self.stats.add_error(&e);
                }
                Run::Killed => {
                    self.stats.adds_killed.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.del_until_done(&id, &ns, &mut rng, kill_del);
            self.delete_netns(&ns)?;
            done.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// DEL as a runtime does it: again until it succeeds (the first one SIGKILLed when
    /// `kill_first`); then the pod's `eth0` must be gone.
    fn del_until_done(&self, id: &str, ns: &str, rng: &mut Rng, kill_first: bool) {
        let conf = self.conf(&[]);
        let start = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let after = (kill_first && attempts == 1).then(|| rng.millis(60));
            let outcome = match self.plugin("DEL", id, ns, &conf, after) {
                Ok(o) => o,
                Err(e) => Run::Failed(format!("{e:#}")),
            };
            self.stats.event(id, outcome.describe("DEL", after));
            match outcome {
                Run::Ok(_) => break,
                Run::Killed => {
                    self.stats.dels_killed.fetch_add(1, Ordering::Relaxed);
                }
                Run::Failed(e) => {
                    self.stats.dels_failed.fetch_add(1, Ordering::Relaxed);
                    if start.elapsed() > DEL_PATIENCE {
                        self.stats.dels_stuck.fetch_add(1, Ordering::Relaxed);
                        self.stats.problem(format!(
                            "DEL of {id} never succeeded ({attempts} attempts in {:?}): {e}",
                            start.elapsed()
                        ));
                        return;
                    }
                    eprintln!("soak: DEL of {id} failed (attempt {attempts}): {e}");
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if attempts == 1 {
            self.stats.dels_ok_first.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.dels_retried_pods.fetch_add(1, Ordering::Relaxed);
        }
        self.stats
            .dels_max_attempts
            .fetch_max(attempts, Ordering::Relaxed);
        let left = Netlink::in_netns(&Path::new("/run/netns").join(ns))
            .and_then(|mut nl| nl.links())
            .map(|links| links.into_iter().filter(|l| l.name != "lo").count());
        match left {
            Ok(0) => {}
            Ok(n) => {
                self.stats.veths_after_del.fetch_add(1, Ordering::Relaxed);
                self.stats.problem(format!(
                    "{n} interface(s) still in {ns} after a successful DEL"
                ));
            }
            Err(e) => self
                .stats
                .problem(format!("listing the links of {ns}: {e}")),
        }
    }

    /// SIGKILLs the agent about every `agent_kill_every` cycles, at a random moment while
    /// workers are mid-cycle, and starts it again at once.
    fn agent_killer(&self, mut rng: Rng, done: &AtomicU32) -> Result<()> {
        let every = self.opts.agent_kill_every.max(1);
        let mut next_kill = u64::from(every / 2) + rng.below(u64::from(every));
        loop {
            let d = u64::from(done.load(Ordering::Relaxed));
            if d + u64::from(self.opts.workers) >= u64::from(self.opts.cycles) {
                return Ok(());
            }
            if d >= next_kill {
                // Into the middle of whatever the workers are doing.
                std::thread::sleep(rng.millis(40));
                self.kill_agent()?;
                self.stats.agent_kills.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .agent_kill_times
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(wall_now());
                let down = Instant::now();
                self.start_agent()?;
                let ms = down.elapsed().as_millis() as u64;
                self.stats.agent_down_ms.fetch_add(ms, Ordering::Relaxed);
                self.stats
                    .max_agent_down_ms
                    .fetch_max(ms, Ordering::Relaxed);
                next_kill = d + u64::from(every / 2) + rng.below(u64::from(every));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Counts what is left, waiting for the agent's reconcile rounds to finish deferred
    /// deletes (recounting until all is zero or [`RECONCILE_WAIT`] has passed).
    fn final_counts(&self) -> Result<Counts> {
        let start = Instant::now();
        loop {
            let counts = self.count()?;
            let deferred = std::fs::read_dir(hypha_deferred_dir(&self.socket()))
                .map(|d| d.count())
                .unwrap_or(0);
            if (counts.rows.iter().all(|(_, n)| *n == 0) && deferred == 0)
                || start.elapsed() > RECONCILE_WAIT
            {
                return Ok(counts);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn count(&self) -> Result<Counts> {
        let mut rows = Vec::new();
        let node = self.node_path();
        let links = Netlink::in_netns(&node)
            .and_then(|mut nl| nl.links())
            .with_context(|| format!("listing the links of {}", node.display()))?;
        rows.push((
            "host veths (hyp* in the node namespace)",
            links.iter().filter(|l| l.name.starts_with("hyp")).count() as u64,
        ));
        let routes: serde_json::Value = serde_json::from_str(&output(Command::new("ip").args([
            "-n",
            &self.node_ns,
            "-j",
            "-4",
            "route",
            "show",
            "table",
            "all",
        ]))?)?;
        // The agent's default gateway: the first address of the pod CIDR.
        let gateway = Ipv4Addr::from(u32::from(self.pod_cidr.network()) + 1);
        let pod_routes = routes
            .as_array()
            .map(|rs| {
                rs.iter()
                    .filter(|r| r["type"].as_str().is_none_or(|t| t == "unicast"))
                    .filter_map(|r| r["dst"].as_str()?.split('/').next()?.parse().ok())
                    .filter(|a: &Ipv4Addr| self.pod_cidr.contains(a) && *a != gateway)
                    .count()
            })
            .unwrap_or(0);
        rows.push((
            "routes to pod addresses (node namespace)",
            pod_routes as u64,
        ));

        let status: serde_json::Value =
            serde_json::from_str(&self.hypha(&["status", "-o", "json"])?)?;
        rows.push((
            "addresses (hypha status: ipam.allocated)",
            status["ipam"]["allocated"].as_u64().unwrap_or(u64::MAX),
        ));
        rows.push((
            "endpoints (hypha status)",
            status["endpoints"].as_u64().unwrap_or(u64::MAX),
        ));
        // The agent's committed state, read through it (the database is its own while
        // it runs).
        let state: serde_json::Value = serde_json::from_str(&self.hypha(&["state", "-o", "json"])?)
            .context("parsing `hypha state -o json`")?;
        let len = |v: &serde_json::Value| {
            v.as_array()
                .map(|a| a.len())
                .or_else(|| v.as_object().map(|o| o.len()))
                .unwrap_or(0) as u64
        };
        rows.push(("state records: endpoints", len(&state["endpoints"])));
        rows.push((
            "state records: address reservations",
            len(&state["ipam"]["allocations"]),
        ));
        let mut details = Vec::new();
        if let Some(reservations) = state["ipam"]["allocations"].as_object() {
            for (address, owner) in reservations {
                details.push(format!("address reservation: {address} held by {owner}"));
                let id = owner["container_id"].as_str().unwrap_or("?");
                if let Some(h) = self
                    .stats
                    .history
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(id)
                {
                    details.extend(h.iter().map(|e| format!("  soak: {e}")));
                }
                details.extend(self.agent_log_of(id));
            }
        }
        rows.push((
            "identities (state)",
            len(&state["identities"]["identities"]),
        ));

        for (what, map) in [
            ("hypha_endpoints4 entries", "hypha_endpoints4"),
            ("hypha_endpoints6 entries", "hypha_endpoints6"),
            ("hypha_ifaces entries", "hypha_ifaces"),
            ("hypha_ep_stats_v3 entries", "hypha_ep_stats_v3"),
            ("hypha_policy entries", "hypha_policy"),
        ] {
            let entries = self.map_entries(map)?;
            details.extend(entries.iter().map(|e| format!("{map}: {e}")));
            rows.push((what, entries.len() as u64));
        }
        // LPM key: prefix length (u32, host order), then the address.
        let ipcache: Vec<_> = self
            .map_entries("hypha_ipcache4")?
            .into_iter()
            .filter(|e| {
                key_bytes(e).is_some_and(|k| {
                    let a = (k.len() >= 8).then(|| Ipv4Addr::new(k[4], k[5], k[6], k[7]));
                    // The gateway is the host's (identity 1), not a pod's.
                    a.is_some_and(|a| self.pod_cidr.contains(&a) && a != gateway)
                })
            })
            .collect();
        details.extend(ipcache.iter().map(|e| format!("hypha_ipcache4: {e}")));
        rows.push((
            "hypha_ipcache4 entries in the pod CIDR",
            ipcache.len() as u64,
        ));
        // Key: source and destination address first, as in the packet. Value: expiry
        // first (`bpf_ktime_get_ns`, CLOCK_MONOTONIC). An expired entry is as good as
        // absent; a live one of a deleted pod would be inherited by the next pod given
        // its address.
        let now = monotonic_ns();
        let ct: Vec<_> = self
            .map_entries("hypha_ct4")?
            .into_iter()
            .filter(|e| {
                let of_pods = key_bytes(e).is_some_and(|k| {
                    k.len() >= 8
                        && (self
                            .pod_cidr
                            .contains(&Ipv4Addr::new(k[0], k[1], k[2], k[3]))
                            || self
                                .pod_cidr
                                .contains(&Ipv4Addr::new(k[4], k[5], k[6], k[7])))
                });
                let live = value_bytes(e).is_some_and(|v| {
                    v.len() >= 8 && u64::from_le_bytes(v[..8].try_into().expect("8 bytes")) > now
                });
                of_pods && live
            })
            .collect();
        details.extend(ct.iter().map(|e| format!("hypha_ct4: {e}")));
        rows.push(("live hypha_ct4 entries of pod addresses", ct.len() as u64));
        let links_dir = self.pin_dir.join("links");
        rows.push((
            "pinned links",
            std::fs::read_dir(&links_dir)
                .with_context(|| format!("listing {}", links_dir.display()))?
                .count() as u64,
        ));
        let prefix = format!("hyps-{}-", self.uniq);
        let namespaces = std::fs::read_dir("/run/netns")?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(&prefix) && n != self.node_ns
            })
            .count();
        rows.push(("pod namespaces", namespaces as u64));
        Ok(Counts { rows, details })
    }

    /// The entries of a pinned map, from `bpftool map dump`.
    fn map_entries(&self, map: &str) -> Result<Vec<serde_json::Value>> {
        let path = self.pin_dir.join(map);
        let out = output(
            Command::new("bpftool")
                .args(["-j", "map", "dump", "pinned"])
                .arg(&path),
        )
        .with_context(|| {
            format!(
                "dumping {} (bpftool is in `cargo xtask setup`)",
                path.display()
            )
        })?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("parsing bpftool's dump of {}", path.display()))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    fn report(
        &self,
        cycles_time: Duration,
        counts: &Counts,
        peaks: &[u64],
        ping: &Result<Flow>,
        stream: &Result<Flow>,
    ) {
        let s = &self.stats;
        let n = |a: &AtomicU32| a.load(Ordering::Relaxed);
        println!(
            "\n==> soak: {} cycles in {:.1} s",
            self.opts.cycles,
            cycles_time.as_secs_f64()
        );
        println!(
            "ADD: {} ok, {} failed, {} SIGKILLed mid-ADD",
            n(&s.adds_ok),
            n(&s.adds_failed),
            n(&s.adds_killed)
        );
        for (msg, count) in s
            .add_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            println!("  ADD failed {count}x: {msg}");
        }
        println!(
            "DEL: {} pods done at the first attempt, {} after retries (at most {} attempts), {} SIGKILLed mid-DEL, {} failed attempts, {} never succeeded",
            n(&s.dels_ok_first),
            n(&s.dels_retried_pods),
            n(&s.dels_max_attempts),
            n(&s.dels_killed),
            n(&s.dels_failed),
            n(&s.dels_stuck)
        );
        println!(
            "pods with an interface left after a successful DEL: {}",
            n(&s.veths_after_del)
        );
        let log = std::fs::read_to_string(self.tmp.join("agent.log")).unwrap_or_default();
        println!(
            "requests of killed ADDs the agent refused (their DEL came first): {}",
            log.matches("refused a request of a killed ADD").count()
        );
        println!(
            "agent: {} SIGKILLs, {} failed starts, down {:.2} s in all (longest {:.2} s)",
            n(&s.agent_kills),
            n(&s.agent_start_failures),
            s.agent_down_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            s.max_agent_down_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        println!("left behind after DEL of everything (and the most seen during the cycles):");
        for (i, (what, n)) in counts.rows.iter().enumerate() {
            let peak = peaks.get(i).map_or("-".to_owned(), |p| p.to_string());
            println!(
                "  {:>6}  ({peak:>4})  {what}{}",
                n,
                if *n == 0 { "" } else { "  <-- LEAK" }
            );
        }
        for d in &counts.details {
            println!("  leaked: {d}");
        }
        for (name, flow) in [("ping -i 0.05", ping), ("TCP stream (10 ms)", stream)] {
            match flow {
                Ok(f) => {
                    let kills = s.agent_kill_times.lock().unwrap_or_else(|e| e.into_inner());
                    let since_kill = kills
                        .iter()
                        .filter(|k| **k <= f.max_gap_end)
                        .map(|k| f.max_gap_end - k)
                        .reduce(f64::min)
                        .map_or(String::new(), |d| {
                            format!(", which ended {d:.2} s after the last agent SIGKILL before it")
                        });
                    println!(
                        "{name}: {} replies, {} lost, longest gap {:.3} s{since_kill}",
                        f.received, f.lost, f.max_gap
                    )
                }
                Err(e) => println!("{name}: FAILED: {e:#}"),
            }
        }
    }
}

/// The key of a `bpftool -j map dump` entry as bytes (`"key": ["0x0a", ...]`).
fn key_bytes(entry: &serde_json::Value) -> Option<Vec<u8>> {
    hex_bytes(&entry["key"])
}

/// The value of a `bpftool -j map dump` entry of a plain (not per-CPU) map as bytes.
fn value_bytes(entry: &serde_json::Value) -> Option<Vec<u8>> {
    hex_bytes(&entry["value"])
}

fn hex_bytes(v: &serde_json::Value) -> Option<Vec<u8>> {
    v.as_array()?
        .iter()
        .map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect()
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn hypha_deferred_dir(socket: &Path) -> PathBuf {
    // As hypha_api::deferred_deletes_dir: `<socket>.deferred` beside the socket.
    let mut name = socket.file_name().unwrap_or_default().to_os_string();
    name.push(".deferred");
    socket.with_file_name(name)
}

/// A long-lived flow's figures.
struct Flow {
    received: u64,
    lost: u64,
    /// Longest time between two consecutive replies, in seconds.
    max_gap: f64,
    /// When that gap ended (seconds since the epoch).
    max_gap_end: f64,
}

/// Seconds since the epoch, as `ping -D` prints them.
fn wall_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Reads `ping -D` output: `[1733090000.123456] 64 bytes from ...: icmp_seq=12 ...`.
fn ping_gap(log: &str) -> Result<Flow> {
    let mut last: Option<f64> = None;
    let (mut received, mut max_seq, mut max_gap, mut max_gap_end) = (0u64, 0u64, 0f64, 0f64);
    for line in log.lines() {
        let Some(rest) = line.strip_prefix('[') else {
            continue;
        };
        let Some((ts, reply)) = rest.split_once(']') else {
            continue;
        };
        if !reply.contains("bytes from") {
            continue;
        }
        let ts: f64 = ts
            .parse()
            .with_context(|| format!("ping timestamp in {line:?}"))?;
        if let Some(seq) = reply
            .split_whitespace()
            .find_map(|w| w.strip_prefix("icmp_seq="))
            .and_then(|s| s.parse::<u64>().ok())
        {
            max_seq = max_seq.max(seq);
        }
        received += 1;
        if let Some(prev) = last
            && ts - prev > max_gap
        {
            max_gap = ts - prev;
            max_gap_end = ts;
        }
        last = Some(ts);
    }
    if received < 2 {
        bail!("ping got {received} replies");
    }
    Ok(Flow {
        received,
        lost: max_seq.saturating_sub(received),
        max_gap,
        max_gap_end,
    })
}

/// A TCP echo between the long-lived pods: the client in `client_ns` writes 8 bytes every
/// 10 ms and reads them back; the gap is the longest time between two echoes.
fn tcp_stream(
    client_ns: &str,
    server_ns: &str,
    server_ip: Ipv4Addr,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<Flow>>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server_ns = server_ns.to_owned();
    // The server thread ends when its client closes the connection.
    std::thread::spawn(move || -> Result<()> {
        enter_netns(&server_ns)?;
        let listener = TcpListener::bind(("0.0.0.0", STREAM_PORT))?;
        ready_tx.send(()).ok();
        let (mut s, _) = listener.accept()?;
        let mut buf = [0u8; 8];
        loop {
            if s.read_exact(&mut buf).is_err() {
                return Ok(());
            }
            s.write_all(&buf)?;
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("the TCP stream's server did not start")?;
    let client_ns = client_ns.to_owned();
    Ok(std::thread::spawn(move || -> Result<Flow> {
        enter_netns(&client_ns)?;
        let mut s =
            TcpStream::connect_timeout(&(server_ip, STREAM_PORT).into(), Duration::from_secs(5))
                .context("connecting the TCP stream")?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_nodelay(true)?;
        let (mut n, mut max_gap, mut max_gap_end) = (0u64, 0f64, 0f64);
        let mut last = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            s.write_all(&n.to_be_bytes())
                .with_context(|| format!("TCP stream write after {n} echoes"))?;
            let mut buf = [0u8; 8];
            s.read_exact(&mut buf)
                .with_context(|| format!("TCP stream read after {n} echoes"))?;
            if u64::from_be_bytes(buf) != n {
                bail!("TCP stream echoed {} for {n}", u64::from_be_bytes(buf));
            }
            let now = Instant::now();
            if (now - last).as_secs_f64() > max_gap {
                max_gap = (now - last).as_secs_f64();
                max_gap_end = wall_now();
            }
            last = now;
            n += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Flow {
            received: n,
            lost: 0,
            max_gap,
            max_gap_end,
        })
    }))
}

/// Selects the long-lived pods (their flows tracked in `hypha_ct4`) and every worker pod
/// (each with an identity of its own, from its `cycle` label).
const POLICY: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: soak-long, namespace: default}
spec:
  podSelector: {matchLabels: {app: long}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: long}}}]
  egress:
  - to: [{podSelector: {matchLabels: {app: long}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: soak-workers, namespace: default}
spec:
  podSelector: {matchLabels: {app: soak}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: long}}}]
    ports: [{port: 8080, protocol: TCP}]
"#;
