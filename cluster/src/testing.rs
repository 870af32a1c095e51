//! A real etcd for tests and benchmarks: one `/usr/bin/etcd` per test, on a free port,
//! with a temporary data directory, optionally inside a network namespace the test created
//! (the "underlay"), stopped and removed in `Drop` (also on panic).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use hypha_cluster::testing::Etcd;
//! let etcd = Etcd::start(None, "127.0.0.1".parse().unwrap())?;
//! let store = etcd.client().await.expect("etcd client");
//! # Ok(()) }
//! ```
//!
//! In a namespace, etcd listens on an address of that namespace, which the test process
//! (in the host's namespace) cannot reach directly: use [`NetnsRuntime`], a tokio runtime
//! whose threads live in the namespace, to talk to it.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::StoreError;
use crate::etcd::EtcdKv;

/// Where Debian's `etcd-server` (installed by `cargo xtask setup`) puts etcd.
pub const ETCD_BINARY: &str = "/usr/bin/etcd";
/// How long etcd may take to answer `/health` after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long etcd may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One etcd server, its data directory and its log; killed and removed on drop.
#[derive(Debug)]
pub struct Etcd {
    name: String,
    netns: Option<String>,
    client: SocketAddr,
    peer: SocketAddr,
    /// Plain-HTTP `/health` (and `/metrics`), whatever the client URL's scheme.
    metrics: SocketAddr,
    /// Client TLS (server certificate, client certificates required), from
    /// [`Etcd::start_tls`].
    tls: bool,
    /// Holds `data/` and `etcd.log`; removed on drop.
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Etcd {
    /// Starts etcd listening on `listen_ip` (inside `netns` when given, which must exist
    /// under /run/netns), and waits until it answers `/health`. In the host's namespace
    /// both ports are picked free; in a namespace (fresh, so every port is free) they are
    /// 2379 and 2380.
    pub fn start(netns: Option<&str>, listen_ip: IpAddr) -> io::Result<Etcd> {
        Etcd::start_with(netns, listen_ip, false)
    }

    /// As [`Etcd::start`], with TLS on the client URL (`https://`): a CA, a server
    /// certificate for `listen_ip` and a client certificate, made with `openssl` in the
    /// data directory; etcd requires a client certificate the CA signed. [`Etcd::tls`]
    /// gives the client's files.
    pub fn start_tls(netns: Option<&str>, listen_ip: IpAddr) -> io::Result<Etcd> {
        Etcd::start_with(netns, listen_ip, true)
    }

    fn start_with(netns: Option<&str>, listen_ip: IpAddr, tls: bool) -> io::Result<Etcd> {
        let (client, peer, metrics) = match netns {
            Some(_) => (
                SocketAddr::new(listen_ip, 2379),
                SocketAddr::new(listen_ip, 2380),
                SocketAddr::new(listen_ip, 2381),
            ),
            None => (
                free_port(listen_ip)?,
                free_port(listen_ip)?,
                free_port(listen_ip)?,
            ),
        };
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "hypha-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new().prefix("hypha-etcd-").tempdir()?;
        if tls {
            make_certificates(dir.path(), listen_ip)?;
        }
        let mut etcd = Etcd {
            name,
            netns: netns.map(str::to_owned),
            client,
            peer,
            metrics,
            tls,
            dir,
            child: None,
        };
        etcd.spawn()?;
        Ok(etcd)
    }

    /// The client's TLS files (CA, client certificate and key) of an etcd from
    /// [`Etcd::start_tls`]; None without TLS.
    pub fn tls(&self) -> Option<crate::etcd::Tls> {
        self.tls.then(|| crate::etcd::Tls {
            ca: Some(self.dir.path().join("ca.pem")),
            cert: Some(self.dir.path().join("client.pem")),
            key: Some(self.dir.path().join("client.key")),
        })
    }

    /// The client URL (`http://IP:PORT`, `https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
    }

    /// The client URL as a store's endpoint list.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.url()]
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    /// The network namespace etcd runs in (None: the host's).
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Its data directory (kept across [`Etcd::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Its log (stdout and stderr, every run appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A client of this etcd (from the host's namespace: for an etcd in a namespace, call
    /// it inside [`NetnsRuntime::run`]).
    pub async fn client(&self) -> Result<EtcdKv, StoreError> {
        EtcdKv::connect(&self.endpoints(), self.tls().as_ref()).await
    }

    /// Stops etcd with SIGTERM and waits for it to exit (SIGKILL after 10 s).
    pub fn stop(&mut self) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        signal(&child, Signal::SIGTERM)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                return Err(io::Error::other(format!(
                    "etcd {} did not exit within {} s of SIGTERM (killed); log tail:\n{}",
                    self.name,
                    STOP_TIMEOUT.as_secs(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills etcd with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Freezes etcd (SIGSTOP): its connections stay open but nothing answers, like a
    /// peer cut off by the network.
    pub fn pause(&self) -> io::Result<()> {
        match &self.child {
            Some(child) => signal(child, Signal::SIGSTOP),
            None => Err(io::Error::other("etcd is not running")),
        }
    }

    /// Thaws etcd after [`Etcd::pause`].
    pub fn resume(&self) -> io::Result<()> {
        match &self.child {
            Some(child) => signal(child, Signal::SIGCONT),
            None => Err(io::Error::other("etcd is not running")),
        }
    }

    /// Starts etcd again with the same data directory and URL (stopping it first if it
    /// runs) and waits until it answers.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// The last lines of etcd's log, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log_path(), 4096)
    }

    fn spawn(&mut self) -> io::Result<()> {
        if !Path::new(ETCD_BINARY).exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{ETCD_BINARY} is missing: run `cargo xtask setup` (it installs etcd-server)"
                ),
            ));
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        writeln!(&log, "=== hypha test harness: starting etcd {}", self.name)?;
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, ETCD_BINARY]);
                c
            }
            None => Command::new(ETCD_BINARY),
        };
        let client = self.url();
        let peer = format!("http://{}", self.peer);
        let metrics = format!("http://{}", self.metrics);
        command
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .arg("--initial-cluster")
            .arg(format!("{}={peer}", self.name))
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.name])
            .args(["--listen-metrics-urls", &metrics])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if self.tls {
            let file = |name: &str| self.dir.path().join(name);
            command
                .arg("--cert-file")
                .arg(file("server.pem"))
                .arg("--key-file")
                .arg(file("server.key"))
                .arg("--trusted-ca-file")
                .arg(file("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = command
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {ETCD_BINARY}: {e}")))?;
        self.child = Some(child);
        if let Err(e) = self.wait_healthy() {
            let _ = self.kill();
            return Err(e);
        }
        Ok(())
    }

    /// Polls `/health` until etcd says it is healthy (or exits, or the time is up).
    fn wait_healthy(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(io::Error::other(format!(
                    "etcd {} exited at start ({status}); log tail:\n{}",
                    self.name,
                    self.log_tail()
                )));
            }
            let addr = self.metrics;
            let last = match in_netns(self.netns.as_deref(), move || health(addr))? {
                Ok(()) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "etcd {} ({}) not healthy within {} s ({last}); log tail:\n{}",
                        self.name,
                        self.url(),
                        START_TIMEOUT.as_secs(),
                        self.log_tail()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused etcd dies of SIGKILL all the same.
            let _ = child.kill();
            let _ = child.wait();
        }
        // The TempDir removes the data directory and the log.
    }
}

fn signal(child: &Child, sig: Signal) -> io::Result<()> {
    kill(Pid::from_raw(child.id() as i32), sig).map_err(|e| {
        io::Error::other(format!(
            "cannot send {sig} to etcd (pid {}): {e}",
            child.id()
        ))
    })
}

/// A CA, a server certificate for `ip` and a client certificate (ECDSA P-256, valid a
/// day), with `openssl`, in `dir`: `ca.pem`, `server.pem`/`server.key`,
/// `client.pem`/`client.key`.
fn make_certificates(dir: &Path, ip: IpAddr) -> io::Result<()> {
    let openssl = |args: &[&str]| -> io::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run openssl: {e}")))?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "openssl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=hypha test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(&ca)?;
    std::fs::write(
        dir.join("server.ext"),
        format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth,clientAuth\n"),
    )?;
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    for (who, cn) in [("server", "etcd"), ("client", "hypha")] {
        let subj = format!("/CN={cn}");
        let (keyout, csr) = (format!("{who}.key"), format!("{who}.csr"));
        let mut req = vec!["req", "-subj", subj.as_str()];
        req.extend(ec);
        req.extend(["-keyout", keyout.as_str(), "-out", csr.as_str()]);
        openssl(&req)?;
        let (pem, ext) = (format!("{who}.pem"), format!("{who}.ext"));
        openssl(&[
            "x509",
            "-req",
            "-days",
            "1",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ])?;
    }
    Ok(())
}

/// A port nobody listens on at `ip` now.
fn free_port(ip: IpAddr) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))?;
    listener.local_addr()
}

/// One `GET /health`: Ok when etcd says `"health":"true"`.
fn health(addr: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    if answer.contains("\"health\":\"true\"") {
        Ok(())
    } else {
        let body = answer.lines().last().unwrap_or_default().to_owned();
        Err(io::Error::other(format!("/health answered {body}")))
    }
}

/// The last `bytes` of a file (lossy UTF-8), or why it cannot be read.
fn tail(path: &Path, bytes: u64) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(bytes)))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

/// Runs `f` on a thread inside the network namespace `netns` (/run/netns/NAME), or here
/// when None. Sockets opened there stay in that namespace.
pub fn in_netns<T: Send>(netns: Option<&str>, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let Some(ns) = netns else {
        return Ok(f());
    };
    let file = open_netns(ns)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            enter_netns(&file, ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other(format!("a thread in netns {ns} panicked")))?
    })
}

fn open_netns(ns: &str) -> io::Result<File> {
    let path = Path::new("/run/netns").join(ns);
    File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))
}

fn enter_netns(file: &File, ns: &str) -> io::Result<()> {
    nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|e| io::Error::other(format!("cannot enter netns {ns}: {e}")))
}

/// A tokio runtime whose every thread lives in one network namespace, to reach a store
/// (or anything) listening there from a test running in the host's namespace.
#[derive(Debug)]
pub struct NetnsRuntime {
    runtime: tokio::runtime::Runtime,
}

impl NetnsRuntime {
    pub fn new(netns: &str) -> io::Result<NetnsRuntime> {
        let file = Arc::new(open_netns(netns)?);
        let ns = netns.to_owned();
        // Fail here rather than in a worker thread.
        in_netns(Some(netns), || ())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) = enter_netns(&file, &ns) {
                    panic!("{e}");
                }
            })
            .build()?;
        Ok(NetnsRuntime { runtime })
    }

    /// Runs `future` to completion on one of the runtime's threads (so that whatever it
    /// connects is in the namespace).
    pub fn run<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = self.runtime.spawn(future);
        match self.runtime.block_on(task) {
            Ok(out) => out,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.handle()
    }
}
