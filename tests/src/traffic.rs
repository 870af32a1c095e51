//! Traffic between pods for tests: TCP and UDP echo servers that run until dropped, and
//! one-shot probes that say whether a flow got through.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::NamedNetns;

/// How long a probe waits before calling a flow blocked.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

/// A TCP echo server on `0.0.0.0:port` in a namespace, serving every connection on its
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
            let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
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
pub fn tcp_ok(from: &NamedNetns, to: Ipv4Addr, port: u16) -> bool {
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

/// A UDP echo server on `0.0.0.0:port`, until dropped.
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
            let sock = UdpSocket::bind(("0.0.0.0", port)).expect("bind");
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
pub fn udp_ok(from: &NamedNetns, to: Ipv4Addr, port: u16) -> bool {
    from.spawn(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
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
    pub fn open(from: &NamedNetns, to: Ipv4Addr, port: u16) -> Self {
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
