//! What one round measures between a client and a server namespace: TCP throughput with
//! iperf3 (one stream or several), the system's busy CPU time over it from `/proc/stat`,
//! and 1-byte request/response latency over one TCP connection (TCP_NODELAY), timed in
//! threads of this process that entered the two namespaces (the approach of xtask's
//! `bench datapath`).

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};

/// Round trips timed in one latency run, at most.
const MAX_SAMPLES: usize = 2_000_000;
/// How long the background CPU load is sampled before each throughput run.
const BACKGROUND_SAMPLE: Duration = Duration::from_millis(1000);

/// Who talks to whom: namespace names (under /run/netns) and the server's address.
#[derive(Clone, Debug)]
pub struct Peers {
    pub client_ns: String,
    pub server_ns: String,
    pub client_ip: IpAddr,
    pub server_ip: IpAddr,
}

/// Where the latency client and server threads run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    /// Both on the last CPU: each round trip is the datapath's own cost, without waking
    /// another (possibly idle, on a VM slow to wake) CPU.
    Same,
    /// Client on the first CPU, server on the last.
    Split,
    /// Wherever the scheduler puts them.
    None,
}

impl Pin {
    pub fn parse(s: &str) -> Result<Pin> {
        Ok(match s {
            "same" => Pin::Same,
            "split" => Pin::Split,
            "none" => Pin::None,
            _ => bail!("--latency-pin {s}: expected same, split or none"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Pin::Same => "same",
            Pin::Split => "split",
            Pin::None => "none",
        }
    }

    /// (client CPU, server CPU).
    fn cpus(self) -> (Option<usize>, Option<usize>) {
        let last = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
        match self {
            Pin::Same => (Some(last), Some(last)),
            Pin::Split => (Some(0), Some(last)),
            Pin::None => (None, None),
        }
    }
}

/// The aggregate `cpu` line of `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq + steal (guest time is inside user).
    pub busy: u64,
    /// idle + iowait.
    pub idle: u64,
}

impl CpuTimes {
    pub fn read() -> Result<CpuTimes> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        parse_proc_stat(&text).context("/proc/stat has no aggregate cpu line")
    }
}

/// The aggregate `cpu` line of a `/proc/stat` text.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|w| w.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    if v.len() < 8 {
        return None;
    }
    Some(CpuTimes {
        busy: v[0] + v[1] + v[2] + v[5] + v[6] + v[7],
        idle: v[3] + v[4],
    })
}

/// Clock ticks per second of `/proc/stat`.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system; no memory is involved.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// Busy CPU of the whole system over a span, in percent of one CPU (so up to 100 × the
/// number of CPUs).
fn busy_pct(before: CpuTimes, after: CpuTimes, elapsed: Duration) -> f64 {
    let ticks = after.busy.saturating_sub(before.busy) as f64;
    100.0 * ticks / ticks_per_second() / elapsed.as_secs_f64().max(1e-3)
}

/// One throughput run.
pub struct Throughput {
    pub gbps: f64,
    pub retransmits: Option<u64>,
    /// The system's busy CPU over the run, percent of one CPU.
    pub busy_pct: f64,
    /// The same over a second just before it (everything else this machine was doing).
    pub background_pct: f64,
    /// The iperf3 client's and server's own CPU (user + system, as iperf3 reports it from
    /// their rusage), percent of one CPU, summed. With tick-based accounting this holds
    /// the softirq work done in their context (most of a veth path's, send and receive),
    /// and unlike `busy_pct` it stays meaningful when other work fills the machine.
    pub processes_pct: Option<f64>,
}

impl Throughput {
    /// The run's own CPU cost: busy minus background, percent of one CPU per Gbit/s.
    pub fn cpu_pct_per_gbps(&self) -> Option<f64> {
        (self.gbps > 0.0).then(|| (self.busy_pct - self.background_pct).max(0.0) / self.gbps)
    }

    /// The iperf3 processes' CPU, percent of one CPU per Gbit/s.
    pub fn processes_pct_per_gbps(&self) -> Option<f64> {
        let p = self.processes_pct?;
        (self.gbps > 0.0).then(|| p / self.gbps)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "gbps": self.gbps,
            "retransmits": self.retransmits,
            "cpu_busy_pct": self.busy_pct,
            "cpu_background_pct": self.background_pct,
            "cpu_pct_per_gbps": self.cpu_pct_per_gbps(),
            "cpu_processes_pct": self.processes_pct,
            "cpu_processes_pct_per_gbps": self.processes_pct_per_gbps(),
        })
    }
}

/// TCP throughput from the client to the server over `seconds` with `streams` parallel
/// streams (iperf3 `-P`), as the server received it; with the system's busy CPU over the
/// run and over a second before it.
pub fn throughput(p: &Peers, streams: u32, seconds: u32) -> Result<Throughput> {
    let server = Killed(
        Command::new("ip")
            .args(["netns", "exec", &p.server_ns, "iperf3", "-s", "-1", "-B"])
            .arg(p.server_ip.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the iperf3 server")?,
    );
    // The server's start-up falls in the background sample, not in the run.
    let before = CpuTimes::read()?;
    let t = Instant::now();
    std::thread::sleep(BACKGROUND_SAMPLE);
    let background_pct = busy_pct(before, CpuTimes::read()?, t.elapsed());
    let limit = Duration::from_secs(u64::from(seconds) + 30);
    let start = Instant::now();
    let (json, busy_pct) = loop {
        let before = CpuTimes::read()?;
        let t = Instant::now();
        let out = with_deadline(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &p.client_ns,
                    "iperf3",
                    "-J",
                    "--connect-timeout",
                    "3000",
                    "-c",
                ])
                .arg(p.server_ip.to_string())
                .args(["-t", &seconds.to_string(), "-P", &streams.to_string()]),
            limit,
        )?;
        let busy = busy_pct(before, CpuTimes::read()?, t.elapsed());
        let json: Value = serde_json::from_str(&out)
            .with_context(|| format!("iperf3 -J printed no JSON: {out}"))?;
        match json["error"].as_str() {
            None => break (json, busy),
            // A refused connection does not use up the server's single (-1) test.
            Some(e)
                if e.contains("unable to connect") && start.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(e) => bail!("iperf3 -c {} -P {streams}: {e}", p.server_ip),
        }
    };
    drop(server);
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3's JSON has no end.sum_received.bits_per_second")?;
    let cpu = &json["end"]["cpu_utilization_percent"];
    let processes_pct = cpu["host_total"]
        .as_f64()
        .zip(cpu["remote_total"].as_f64())
        .map(|(client, server)| client + server);
    Ok(Throughput {
        gbps: bps / 1e9,
        retransmits: json["end"]["sum_sent"]["retransmits"].as_u64(),
        busy_pct,
        background_pct,
        processes_pct,
    })
}

/// One latency run's summary (microseconds).
#[derive(Clone, Debug, PartialEq)]
pub struct Latency {
    pub round_trips: usize,
    pub min_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Latency {
    /// From nanosecond samples sorted ascending (at least one).
    pub fn from_sorted(s: &[u32]) -> Latency {
        let us = |ns: u32| f64::from(ns) / 1000.0;
        Latency {
            round_trips: s.len(),
            min_us: us(s[0]),
            p50_us: us(percentile(s, 50.0)),
            p90_us: us(percentile(s, 90.0)),
            p99_us: us(percentile(s, 99.0)),
            max_us: us(s[s.len() - 1]),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "round_trips": self.round_trips,
            "min_us": self.min_us,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "max_us": self.max_us,
        })
    }
}

/// Nearest-rank percentile of samples sorted ascending.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// 1-byte request/response over one TCP connection from the client to the server: a
/// short warm-up, then round trips for `seconds`, each timed.
pub fn latency(p: &Peers, seconds: u32, pin: Pin) -> Result<Latency> {
    let (client_cpu, server_cpu) = pin.cpus();
    let (port_tx, port_rx) = mpsc::channel();
    let (server_ns, server_ip) = (p.server_ns.clone(), p.server_ip);
    let server = std::thread::spawn(move || rr_server(&server_ns, server_cpu, server_ip, &port_tx));
    let port = match port_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(port) => port,
        Err(_) => {
            let why = match server.join() {
                Ok(Err(e)) => e,
                Ok(Ok(())) => anyhow!("it stopped"),
                Err(_) => anyhow!("it panicked"),
            };
            return Err(why.context("the latency server did not start"));
        }
    };
    let client_ns = p.client_ns.clone();
    let addr = SocketAddr::from((p.server_ip, port));
    let duration = Duration::from_secs(u64::from(seconds));
    let client = std::thread::spawn(move || rr_client(&client_ns, client_cpu, addr, duration));
    let samples = client
        .join()
        .map_err(|_| anyhow!("the latency client panicked"))?;
    let served = server
        .join()
        .map_err(|_| anyhow!("the latency server panicked"))?;
    let mut samples = samples.context("latency client")?;
    served.context("latency server")?;
    if samples.is_empty() {
        bail!("no round trips completed");
    }
    samples.sort_unstable();
    Ok(Latency::from_sorted(&samples))
}

/// Moves the calling thread (only) into the network namespace `/run/netns/<name>`.
fn enter_netns(name: &str) -> Result<()> {
    let path = std::path::Path::new("/run/netns").join(name);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns into {name}"))
}

/// Keeps the calling thread (only) on one CPU.
fn pin_to(cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning to CPU {cpu}"))
}

fn rr_server(netns: &str, cpu: Option<usize>, ip: IpAddr, bound: &mpsc::Sender<u16>) -> Result<()> {
    enter_netns(netns)?;
    pin_to(cpu)?;
    let listener =
        TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip} in {netns}"))?;
    let _ = bound.send(listener.local_addr()?.port());
    // Bounded: a client that never comes does not leave this thread behind for good.
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accepting the latency client"),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut byte = [0u8; 1];
    loop {
        match conn.read(&mut byte)? {
            0 => return Ok(()),
            _ => conn.write_all(&byte)?,
        }
    }
}

fn rr_client(
    netns: &str,
    cpu: Option<usize>,
    addr: SocketAddr,
    duration: Duration,
) -> Result<Vec<u32>> {
    enter_netns(netns)?;
    pin_to(cpu)?;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr} from {netns}"))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut byte = [b'x'];
    let mut round_trip = |conn: &mut TcpStream| -> Result<()> {
        conn.write_all(&byte)?;
        conn.read_exact(&mut byte)?;
        Ok(())
    };
    let warm_up = Instant::now();
    for _ in 0..10_000 {
        if warm_up.elapsed() > duration / 10 {
            break;
        }
        round_trip(&mut conn)?;
    }
    let mut samples = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    while start.elapsed() < duration && samples.len() < MAX_SAMPLES {
        let t = Instant::now();
        round_trip(&mut conn)?;
        samples.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
    }
    Ok(samples)
}

/// Runs a command with a time limit; its standard output, whatever its exit status
/// (iperf3 -J reports its errors in the JSON).
fn with_deadline(cmd: &mut Command, limit: Duration) -> Result<String> {
    let what = format!("{cmd:?}");
    let mut child = Killed(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {what}"))?,
    );
    let mut stdout = child.0.stdout.take().expect("stdout is piped");
    // Read while waiting: a long run's JSON can fill the pipe.
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let deadline = Instant::now() + limit;
    while child.0.try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    reader
        .join()
        .map_err(|_| anyhow!("reading {what}: the reader panicked"))?
        .with_context(|| format!("reading the output of {what}"))
}

/// A child process killed and reaped when dropped (if still running).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_cpu_line() {
        let text = "cpu  100 5 50 1000 20 3 7 2 40 0\ncpu0 50 2 25 500 10 1 3 1 20 0\nintr 1\n";
        assert_eq!(
            parse_proc_stat(text),
            Some(CpuTimes {
                busy: 100 + 5 + 50 + 3 + 7 + 2,
                idle: 1020
            })
        );
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 2 3\n"), None);
        assert!(CpuTimes::read().expect("this machine's /proc/stat").idle > 0);
    }

    #[test]
    fn percentiles_and_cpu_cost() {
        let s: Vec<u32> = (1..=100).map(|x| x * 1000).collect();
        let l = Latency::from_sorted(&s);
        assert_eq!((l.p50_us, l.p99_us, l.max_us), (50.0, 99.0, 100.0));
        let t = Throughput {
            gbps: 4.0,
            retransmits: None,
            busy_pct: 130.0,
            background_pct: 10.0,
            processes_pct: Some(100.0),
        };
        assert_eq!(t.cpu_pct_per_gbps(), Some(30.0));
        assert_eq!(t.processes_pct_per_gbps(), Some(25.0));
        let idle = Throughput { gbps: 0.0, ..t };
        assert_eq!(idle.cpu_pct_per_gbps(), None);
    }
}
