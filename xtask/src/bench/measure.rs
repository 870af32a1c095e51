//! The two measurements between a pair of pods: TCP throughput (iperf3) and 1-byte TCP
//! request/response latency (threads of this process, each inside one pod's namespace).

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Serialize;

use super::setups::Pods;

/// Round trips timed in one latency run, at most (8 bytes each).
const MAX_SAMPLES: usize = 2_000_000;

/// Bits per second received by the server, over `seconds` of one TCP stream from the
/// client pod to the server pod.
pub fn throughput(pods: &Pods, seconds: u32) -> Result<f64> {
    throughput_to(pods, IpAddr::V4(pods.server_ip), seconds)
}

/// [`throughput`] to the server's address `server` (its IPv6 one, say).
pub fn throughput_to(pods: &Pods, server: IpAddr, seconds: u32) -> Result<f64> {
    throughput_via(pods, server, server, seconds)
}

/// [`throughput`] with the server listening on `listen` and the client connecting to
/// `connect`: a service address translated to `listen` on the way, say.
pub fn throughput_via(pods: &Pods, listen: IpAddr, connect: IpAddr, seconds: u32) -> Result<f64> {
    let server = Killed(
        Command::new("ip")
            .args(["netns", "exec", &pods.server_ns, "iperf3", "-s", "-1", "-B"])
            .arg(listen.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the iperf3 server")?,
    );
    let limit = Duration::from_secs(u64::from(seconds) + 30);
    // The server needs a moment to listen; a refused connection does not use up its
    // single (-1) test, so the client just tries again.
    let start = Instant::now();
    let json = loop {
        let out = with_deadline(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &pods.client_ns,
                    "iperf3",
                    "-J",
                    "--connect-timeout",
                    "3000",
                    "-c",
                ])
                .arg(connect.to_string())
                .args(["-t", &seconds.to_string()]),
            limit,
        )?;
        let json: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("iperf3 -J printed no JSON: {out}"))?;
        match json["error"].as_str() {
            None => break json,
            Some(e)
                if e.contains("unable to connect") && start.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(e) => bail!("iperf3: {e}"),
        }
    };
    drop(server);
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3's JSON has no end.sum_received.bits_per_second")
}

/// One latency run's summary (nanoseconds).
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub round_trips: usize,
    pub min_ns: u32,
    pub mean_ns: f64,
    pub p50_ns: u32,
    pub p90_ns: u32,
    pub p99_ns: u32,
    pub p999_ns: u32,
    pub max_ns: u32,
}

impl Latency {
    /// From samples sorted ascending (at least one).
    pub fn from_sorted(s: &[u32]) -> Self {
        Self {
            round_trips: s.len(),
            min_ns: s[0],
            mean_ns: s.iter().map(|&x| f64::from(x)).sum::<f64>() / s.len() as f64,
            p50_ns: percentile(s, 50.0),
            p90_ns: percentile(s, 90.0),
            p99_ns: percentile(s, 99.0),
            p999_ns: percentile(s, 99.9),
            max_ns: s[s.len() - 1],
        }
    }
}

/// Nearest-rank percentile of samples sorted ascending.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Where the latency client and server threads run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pin {
    /// Both on the last CPU: each round trip is the datapath's own cost, without waking
    /// another (possibly idle, on a VM slow to wake) CPU.
    Same,
    /// Client on the first CPU, server on the last: adds a cross-CPU wake-up each way.
    Split,
    /// Wherever the scheduler puts them (bimodal on small VMs).
    None,
}

impl Pin {
    pub fn describe(self) -> &'static str {
        match self {
            Pin::Same => "both on one CPU",
            Pin::Split => "on two CPUs",
            Pin::None => "unpinned",
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

/// 1-byte request/response over one TCP connection (TCP_NODELAY both ways), client pod
/// to server pod's IPv4 address: a short warm-up, then round trips for `seconds`, each
/// timed; the server on `port` (0: any free port), for a firewall or policy that must
/// allow it.
pub fn latency_on(pods: &Pods, port: u16, seconds: u32, pin: Pin) -> Result<Latency> {
    latency_to(pods, IpAddr::V4(pods.server_ip), port, seconds, pin)
}

/// [`latency_on`] to the server's address `ip` (its IPv6 one, say).
pub fn latency_to(pods: &Pods, ip: IpAddr, port: u16, seconds: u32, pin: Pin) -> Result<Latency> {
    let server_ns = pods.server_ns.clone();
    let (client_cpu, server_cpu) = pin.cpus();
    let (port_tx, port_rx) = mpsc::channel();
    let server = std::thread::spawn(move || rr_server(&server_ns, server_cpu, ip, port, &port_tx));
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
    let client_ns = pods.client_ns.clone();
    let addr = SocketAddr::from((ip, port));
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

/// Moves the calling thread (only) into a named network namespace.
pub fn enter_netns(name: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(name);
    let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns reads a valid, open descriptor; joining a network namespace changes
    // only this thread's namespace, and this thread is ours alone.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns into {name}"));
    }
    Ok(())
}

/// Keeps the calling thread (only) on one CPU.
fn pin_to(cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    // SAFETY: cpu_set_t is plain bits, valid zeroed; CPU_SET stays within it for any cpu
    // below CPU_SETSIZE (available_parallelism is far below); pid 0 is this thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning to CPU {cpu}"));
    }
    Ok(())
}

fn rr_server(
    netns: &str,
    cpu: Option<usize>,
    ip: IpAddr,
    port: u16,
    bound: &mpsc::Sender<u16>,
) -> Result<()> {
    enter_netns(netns)?;
    pin_to(cpu)?;
    let listener =
        TcpListener::bind((ip, port)).with_context(|| format!("binding {ip}:{port} in {netns}"))?;
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
    let what = crate::util::describe(cmd);
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

/// The process whose command line holds `arg` as one argument and `word` as another
/// (say, the agent serving a socket: `agent` and the socket's path), found under /proc.
/// Fails when none or several do.
pub fn find_process(word: &str, arg: &Path) -> Result<u32> {
    let arg = arg.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry.context("listing /proc")?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end while we look; its entry just goes.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|&b| b == 0);
        if args.clone().any(|a| a == word.as_bytes()) && args.any(|a| a == arg) {
            found.push(pid);
        }
    }
    match found[..] {
        [pid] => Ok(pid),
        [] => bail!(
            "no process with arguments {word:?} and {:?} in /proc",
            String::from_utf8_lossy(arg)
        ),
        _ => bail!(
            "several processes with arguments {word:?} and {:?}: {found:?}",
            String::from_utf8_lossy(arg)
        ),
    }
}

/// A process's resident set size in KiB (`VmRSS` of /proc/PID/status).
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss_kib(&status).with_context(|| format!("no VmRSS line in {path}"))
}

fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let kib = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib)
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
    fn nearest_rank_percentiles() {
        let s: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&s, 50.0), 50);
        assert_eq!(percentile(&s, 99.0), 99);
        assert_eq!(percentile(&s, 100.0), 100);
        assert_eq!(percentile(&s, 0.0), 1);
        assert_eq!(percentile(&[7], 99.9), 7);
        let l = Latency::from_sorted(&s);
        assert_eq!(
            (l.min_ns, l.p90_ns, l.max_ns, l.round_trips),
            (1, 90, 100, 100)
        );
        assert!((l.mean_ns - 50.5).abs() < 1e-9);
    }

    #[test]
    fn vm_rss_from_proc_status() {
        let status = "Name:\thypha\nVmPeak:\t  90000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss_kib(status), Some(12345));
        assert_eq!(parse_vm_rss_kib("Name:\tkthreadd\n"), None);
        assert_eq!(parse_vm_rss_kib("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn finds_this_process_and_reads_its_rss() {
        let me = std::env::current_exe().expect("exe");
        // This test binary's own argv[0] is its path; no second argument matches "no-such".
        assert!(find_process("no-such-argument-anywhere", &me).is_err());
        assert!(vm_rss_kib(std::process::id()).expect("own VmRSS") > 0);
    }
}
