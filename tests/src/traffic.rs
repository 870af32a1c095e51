//! Traffic between pods for tests: TCP and UDP echo servers that run until dropped, and
//! one-shot probes that say whether a flow got through, over IPv4 or IPv6 (the servers
//! listen on both families; a probe speaks its destination's).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::NamedNetns;

/// How long a probe waits before calling a flow blocked.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

/// A TCP listener on `port` for both families: `[::]` (which takes IPv4 too, as
/// `net.ipv6.bindv6only` is 0 in a fresh namespace), or `0.0.0.0` where IPv6 is off.
pub fn listen_any(port: u16) -> TcpListener {
    TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
        .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
        .unwrap_or_else(|e| panic!("bind a TCP listener on port {port}: {e}"))
}

/// A UDP socket on `port` for both families, as [`listen_any`].
pub fn udp_any(port: u16) -> UdpSocket {
    UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))
        .or_else(|_| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))
        .unwrap_or_else(|e| panic!("bind a UDP socket on port {port}: {e}"))
}

/// The unspecified address of `to`'s family, port 0: what a client binds to reach `to`.
fn unspecified_for(to: IpAddr) -> SocketAddr {
    match to {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// `ping` of `to` from `ns` (`-6` for IPv6): `count` echoes 0.2 s apart, 2 s to answer.
pub fn ping(ns: &NamedNetns, to: impl Into<IpAddr>, count: u32) -> Output {
    let to = to.into();
    let (count, to_text) = (count.to_string(), to.to_string());
    let mut cmd = vec!["ping"];
    if to.is_ipv6() {
        cmd.push("-6");
    }
    cmd.extend(["-c", &count, "-i", "0.2", "-W", "2", &to_text]);
    ns.try_exec(&cmd)
}

/// Whether every one of two pings of `to` from `ns` is answered.
pub fn ping_ok(ns: &NamedNetns, to: impl Into<IpAddr>) -> bool {
    ping(ns, to, 2).status.success()
}

/// Pings `to` from `ns` twice; panics with ping's output unless both are answered.
pub fn assert_ping(ns: &NamedNetns, to: impl Into<IpAddr>) {
    let to = to.into();
    let out = ping(ns, to, 2);
    assert!(
        out.status.success(),
        "ping {to} from {}: {}{}",
        ns.name(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP echo server on `port` (both families, [`listen_any`]) in a namespace, serving every connection on its
/// own thread, until dropped.
pub struct TcpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEcho {
    pub fn start(ns: &NamedNetns, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let flag = stop.clone();
        let thread = ns.spawn(move || {
            let listener = listen_any(port);
            listener.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("ready");
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = s.read(&mut buf) {
                                if n == 0 || s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("echo server ready");
        TcpEcho {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a TCP connection from `from` to `to:port` opens and echoes a byte.
pub fn tcp_ok(from: &NamedNetns, to: impl Into<IpAddr>, port: u16) -> bool {
    let to = to.into();
    from.spawn(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::from((to, port)), PROBE_TIMEOUT)
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
        let mut b = [0u8; 1];
        s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"x"
    })
    .join()
    .expect("probe thread")
}

/// A UDP echo server on `port` (both families, [`udp_any`]), until dropped.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(ns: &NamedNetns, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let flag = stop.clone();
        let thread = ns.spawn(move || {
            let sock = udp_any(port);
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("echo server ready");
        UdpEcho {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a UDP datagram from `from` to `to:port` is echoed back.
pub fn udp_ok(from: &NamedNetns, to: impl Into<IpAddr>, port: u16) -> bool {
    let to = to.into();
    from.spawn(move || {
        let sock = UdpSocket::bind(unspecified_for(to)).expect("bind");
        sock.set_read_timeout(Some(PROBE_TIMEOUT)).expect("timeout");
        if sock.send_to(b"hypha", (to, port)).is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(sock.recv_from(&mut buf), Ok((5, _)))
    })
    .join()
    .expect("probe thread")
}

/// One long-lived TCP connection from a pod to an echo server, driven from the test.
pub struct Conversation {
    ask: mpsc::Sender<usize>,
    answer: mpsc::Receiver<Result<(), String>>,
}

impl Conversation {
    /// Connects `from` to `to:port` (an echo server must listen there).
    pub fn open(from: &NamedNetns, to: impl Into<IpAddr>, port: u16) -> Self {
        let to = to.into();
        let (ask, ask_rx) = mpsc::channel::<usize>();
        let (answer_tx, answer) = mpsc::channel();
        let (connected_tx, connected_rx) = mpsc::channel();
        from.spawn(move || {
            let mut s = TcpStream::connect((to, port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            connected_tx.send(()).expect("connected");
            for rounds in ask_rx {
                let r = (0..rounds).try_for_each(|i| {
                    let msg = [i as u8; 1024];
                    s.write_all(&msg).map_err(|e| e.to_string())?;
                    let mut back = [0u8; 1024];
                    s.read_exact(&mut back).map_err(|e| e.to_string())?;
                    if back != msg {
                        return Err("echo differs".to_string());
                    }
                    Ok(())
                });
                let _ = answer_tx.send(r);
            }
        });
        connected_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("conversation connected");
        Conversation { ask, answer }
    }

    /// Exchanges `rounds` 1 KiB messages; panics if any fails.
    pub fn talk(&self, rounds: usize) {
        self.ask.send(rounds).expect("conversation alive");
        self.answer
            .recv_timeout(Duration::from_secs(20))
            .expect("conversation answers")
            .expect("round trips succeed");
    }
}

/// A TCP server on `port` (both families) in `ns` that takes one connection, reads it to
/// the end and returns the byte count.
pub fn tcp_sink(ns: &NamedNetns, port: u16) -> JoinHandle<u64> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = ns.spawn(move || {
        let l = listen_any(port);
        ready_tx.send(()).expect("ready");
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut buf = vec![0u8; 65536];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf).expect("read") {
                0 => return total,
                n => total += n as u64,
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("listener ready");
    h
}

/// Sends `bytes` over one TCP connection from `ns` to `to:port`; panics on failure.
pub fn tcp_send(ns: &NamedNetns, to: impl Into<IpAddr>, port: u16, bytes: usize) {
    let to = to.into();
    ns.spawn(move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connect to {to} port {port}: {e}"));
        let chunk = vec![7u8; 65536];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n])
                .unwrap_or_else(|e| panic!("send to {to} port {port}: {e}"));
            left -= n;
        }
    })
    .join()
    .expect("sender");
}

/// The peer address of the first TCP connection `ns` accepts on `listen:port`, read on a
/// thread (join it after connecting).
pub fn tcp_accept_peer(ns: &NamedNetns, listen: IpAddr, port: u16) -> JoinHandle<SocketAddr> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = ns.spawn(move || {
        let l = TcpListener::bind((listen, port))
            .unwrap_or_else(|e| panic!("bind {listen} port {port}: {e}"));
        ready_tx.send(()).expect("ready");
        let (_, peer) = l.accept().expect("accept");
        peer
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("listener ready");
    h
}
