//! Serving the API socket with bounds on what a client may hold: how long it may take to
//! send its headers and its body, how large the body may be, and how many connections
//! may be open at once.
//!
//! Beyond [`Limits::max_connections`] a new connection is not kept waiting: the oldest
//! *idle* connection (one that is waiting for a request's headers, whether it never sent
//! them or is kept alive between requests) is closed to make room. Idle connections cost
//! the agent nothing but a descriptor, and a client that sends a request sends its
//! headers at once, so the first to go are those that stall on purpose: `hypha status`
//! and a CNI ADD get through while thousands of stalled connections knock. Only when
//! every connection is busy (a request being read or answered, a `hypha monitor`
//! stream) is a new one refused, with `503` and an [`hypha_api::ApiError`].

use std::collections::BTreeMap;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, watch};
use tower_service::Service as _;

/// Bounds on the API's clients. The defaults are what the agent runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A connection that has not sent a request's complete headers within this time of
    /// opening (or of its previous answer) is closed.
    pub header_read_timeout: Duration,
    /// A request whose body has not arrived whole within this time of its headers is
    /// answered `408` and its connection closed. Answers have no timeout: the monitor
    /// streams as long as its client reads.
    pub body_read_timeout: Duration,
    /// Largest request body, except for `POST /v1/policies` and `POST /v1/services`.
    pub body_limit: usize,
    /// Largest body of `POST /v1/policies` and `POST /v1/services` (policy and service
    /// files).
    pub policy_body_limit: usize,
    /// Connections open at once; see the module's documentation for what happens beyond.
    pub max_connections: usize,
    /// How long a stopping agent lets requests in progress finish.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(10),
            body_limit: 64 << 10,
            policy_body_limit: 16 << 20,
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

impl Limits {
    /// The body limit of a request to `path`.
    pub fn body_limit(&self, path: &str) -> usize {
        if path == "/v1/policies" || path == "/v1/services" {
            self.policy_body_limit
        } else {
            self.body_limit
        }
    }
}

/// Largest buffer hyper keeps per connection (headers included): bounds the memory a
/// connection can pin to 64 KiB whatever it sends (hyper's default is ~400 KB).
const MAX_BUF_SIZE: usize = 64 << 10;

/// One open connection, as the accept loop sees it.
struct Open {
    /// Requests being read or answered; 0 when the connection waits for headers.
    busy: Arc<AtomicUsize>,
    close: Arc<Notify>,
}

/// Open connections by accept order (oldest first).
type Table = Arc<Mutex<BTreeMap<u64, Open>>>;

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting, lets
/// requests in progress finish for [`Limits::shutdown_grace`] and closes the rest (a
/// monitor stream does not hold up a stop).
pub async fn serve(
    listener: UnixListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), super::ServerError> {
    let table: Table = Arc::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    let mut next_id = 0u64;
    let mut accept_errors = AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or memory: give the connections being closed time
                // to free some instead of spinning.
                accept_errors.report(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        next_id += 1;
        let busy = Arc::new(AtomicUsize::new(0));
        let close = Arc::new(Notify::new());
        if !admit(&table, limits.max_connections, next_id, &busy, &close) {
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        }
        tokio::spawn(connection(
            stream,
            app.clone(),
            limits.clone(),
            ConnectionState {
                id: next_id,
                table: table.clone(),
                busy,
                close,
                stop: stop_rx.clone(),
            },
        ));
    }
    drop(listener);
    // `send` fails only when no connection is left to tell.
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while !table.lock().expect("connection table").is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if drained.is_err() {
        let left = std::mem::take(&mut *table.lock().expect("connection table"));
        tracing::info!(
            connections = left.len(),
            "closing API connections still open after {:?}",
            limits.shutdown_grace
        );
        for open in left.values() {
            open.close.notify_one();
        }
    }
    Ok(())
}

/// Failed accepts, logged at most every 10 s with how many there were.
#[derive(Default)]
struct AcceptErrors {
    last_logged: Option<std::time::Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    fn report(&mut self, e: &std::io::Error) {
        self.unlogged += 1;
        if self
            .last_logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(
                failures = self.unlogged,
                "cannot accept API connections: {e}"
            );
            self.last_logged = Some(std::time::Instant::now());
            self.unlogged = 0;
        }
    }
}

/// Registers connection `id`, closing the oldest idle connection when the table is full.
/// `false`: every connection is busy and this one must be refused.
fn admit(table: &Table, max: usize, id: u64, busy: &Arc<AtomicUsize>, close: &Arc<Notify>) -> bool {
    let mut open = table.lock().expect("connection table");
    if open.len() >= max {
        let idle = open
            .iter()
            .find(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id);
        match idle.and_then(|id| open.remove(&id)) {
            Some(evicted) => evicted.close.notify_one(),
            None => return false,
        }
    }
    open.insert(
        id,
        Open {
            busy: busy.clone(),
            close: close.clone(),
        },
    );
    true
}

/// Answers `503` on a connection that cannot be served, without reading it.
async fn refuse(mut stream: UnixStream, max: usize) {
    let body = serde_json::to_string(&hypha_api::ApiError {
        error: format!(
            "the agent is busy: all of its {max} API connections are serving requests; try again"
        ),
    })
    .expect("an ApiError serializes");
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer.as_bytes()));
    match write.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("cannot tell a refused API client: {e}"),
        Err(_) => tracing::debug!("a refused API client does not read its answer"),
    }
}

struct ConnectionState {
    id: u64,
    table: Table,
    busy: Arc<AtomicUsize>,
    close: Arc<Notify>,
    stop: watch::Receiver<bool>,
}

async fn connection(stream: UnixStream, app: Router, limits: Limits, mut st: ConnectionState) {
    let busy = st.busy.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = Busy::enter(&busy);
        let mut app = app.clone();
        async move {
            let resp = app.call(req.map(Body::new)).await?;
            Ok::<_, std::convert::Infallible>(resp.map(|body| {
                Body::new(Guarded {
                    inner: body,
                    _busy: guard,
                })
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_BUF_SIZE)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("API connection closed: {e}");
                }
                break;
            }
            () = st.close.notified() => break,
            _ = st.stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    st.table.lock().expect("connection table").remove(&st.id);
}

/// Counts a request as in progress from its headers until its answer is sent (or
/// dropped): a busy connection is never closed to make room for another.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body that keeps its connection busy until it is sent.
struct Guarded {
    inner: Body,
    _busy: Busy,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
