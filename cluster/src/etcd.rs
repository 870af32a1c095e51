//! [`KvStore`](crate::KvStore) on etcd's v3 API through the `etcd-client` crate, with
//! TLS when given a CA (and a client certificate and key).
//!
//! Reachability is bounded everywhere: connecting to a member gives up after
//! [`CONNECT_TIMEOUT`], a request after [`REQUEST_TIMEOUT`], so an unreachable store gives
//! [`StoreError::Unavailable`] within seconds rather than a call that hangs. The channel
//! reconnects by itself: after etcd restarts, the next call works again.
//!
//! A watch notices a dead connection: the stream fails when the connection is reset, and
//! while it is quiet the watch task probes the store with a cheap request every
//! [`WATCH_PROBE_INTERVAL`]; a failed probe ends the watch with
//! [`WatchMessage::Lost`](crate::WatchMessage::Lost) (etcd 3.4's own progress
//! notifications come every ten minutes, far too late to tell an agent it is cut off).

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, CompactionOptions, Compare as EtcdCompare, CompareOp, ConnectOptions,
    DeleteOptions, EventType, GetOptions, Identity, KvClient, PutOptions, TlsOptions, Txn, TxnOp,
    WatchClient, WatchOptions,
};
use futures_util::future::{BoxFuture, FutureExt as _};
use tokio::sync::mpsc;

use crate::store::{
    Compare, KeyValue, KvStore, LeaseId, Op, Revision, Snapshot, StoreError, TxnOutcome,
    WatchEvent, WatchMessage,
};

/// How long connecting to a member may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request may take (connecting included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a watch may stay silent before it checks the store is still there.
pub const WATCH_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long the watch's liveness probe may take before the watch is declared lost.
const WATCH_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest response read (a list of the whole prefix of a large cluster is tens of
/// MB; tonic's default is 4 MB).
const MAX_MESSAGE: usize = 512 << 20;
/// Room for a burst of watch messages before the watch task waits for its reader.
const WATCH_QUEUE: usize = 256;

// gRPC status codes (tonic::Code as i32; tonic is not a direct dependency).
const CODE_CANCELLED: i32 = 1;
const CODE_DEADLINE_EXCEEDED: i32 = 4;
const CODE_NOT_FOUND: i32 = 5;
const CODE_UNAVAILABLE: i32 = 14;

/// The PEM files of a TLS connection to etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tls {
    /// The CA that signed etcd's server certificate.
    pub ca: Option<PathBuf>,
    /// The client certificate (with `key`), when etcd asks for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The cluster store on an etcd cluster.
#[derive(Clone)]
pub struct EtcdKv {
    endpoints: Vec<String>,
    client: Client,
    kv: KvClient,
    watch: WatchClient,
    /// Dropped with the last clone: every watch task then ends (its receiver closes).
    alive: std::sync::Arc<tokio::sync::watch::Sender<()>>,
}

impl std::fmt::Debug for EtcdKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdKv")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl EtcdKv {
    /// A client of the etcd members at `endpoints` (`http://IP:PORT`, or `https://...`
    /// with `tls`). Connects lazily: this fails only on bad input (a URL, a TLS file), and
    /// an unreachable store shows in the first call.
    ///
    /// Must be called inside a tokio runtime (the channel's worker is spawned on it).
    pub async fn connect(endpoints: &[String], tls: Option<&Tls>) -> Result<EtcdKv, StoreError> {
        let failed = |reason: String| StoreError::Failed {
            op: "connect",
            key: endpoints.join(","),
            reason,
        };
        if endpoints.is_empty() {
            return Err(failed("no etcd endpoint given".to_owned()));
        }
        for url in endpoints {
            let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
            if !scheme_ok {
                return Err(failed(format!(
                    "{url} is not an etcd URL: expected http://IP:PORT or https://IP:PORT"
                )));
            }
            if tls.is_some() != url.starts_with("https://") {
                return Err(failed(format!(
                    "{url}: TLS files go with https:// URLs, plain http:// URLs take none"
                )));
            }
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            // HTTP/2 pings only while a stream (a watch) is open: etcd refuses idle pings
            // and pings more often than every 5 s (its --grpc-keepalive-min-time).
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(false);
        if let Some(tls) = tls {
            options = options.with_tls(tls_options(tls).map_err(failed)?);
        }
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| failed(e.to_string()))?;
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let watch = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        Ok(EtcdKv {
            endpoints: endpoints.to_vec(),
            client,
            kv,
            watch,
            alive: std::sync::Arc::new(tokio::sync::watch::channel(()).0),
        })
    }

    /// Compacts the store's history up to `revision` (tests: a watch from before it is
    /// then lost).
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut kv = self.kv.clone();
        let key = format!("revision {revision}");
        bounded(
            "compact",
            &key,
            kv.compact(revision, Some(CompactionOptions::new().with_physical())),
        )
        .await?;
        Ok(())
    }
}

/// The TLS options from the PEM files, each read with an error naming it.
fn tls_options(tls: &Tls) -> Result<TlsOptions, String> {
    fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
        std::fs::read(path)
            .map_err(|e| format!("cannot read the etcd {what} {}: {e}", path.display()))
    }
    let mut options = TlsOptions::new();
    if let Some(ca) = &tls.ca {
        options = options.ca_certificate(Certificate::from_pem(read("CA", ca)?));
    }
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            options = options.identity(Identity::from_pem(
                read("client certificate", cert)?,
                read("client key", key)?,
            ));
        }
        (None, None) => {}
        _ => return Err("--etcd-cert and --etcd-key go together: give both or neither".to_owned()),
    }
    Ok(options)
}

/// A request bounded by [`REQUEST_TIMEOUT`], its error mapped to a [`StoreError`].
async fn bounded<T>(
    op: &'static str,
    key: &str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(store_error(op, key, e)),
        Err(_) => Err(StoreError::Unavailable {
            op,
            key: key.to_owned(),
            reason: format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
        }),
    }
}

/// Unreachable (transport errors, timeouts, gRPC `Unavailable`) or failed (anything else).
fn store_error(op: &'static str, key: &str, e: etcd_client::Error) -> StoreError {
    let unavailable = match &e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            i32::from(status.code()),
            CODE_UNAVAILABLE | CODE_DEADLINE_EXCEEDED | CODE_CANCELLED
        ),
        _ => false,
    };
    let reason = match &e {
        etcd_client::Error::GRpcStatus(status) => status.message().to_owned(),
        other => other.to_string(),
    };
    if unavailable {
        StoreError::Unavailable {
            op,
            key: key.to_owned(),
            reason,
        }
    } else {
        StoreError::Failed {
            op,
            key: key.to_owned(),
            reason,
        }
    }
}

/// Whether etcd answered that a lease does not exist.
fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            i32::from(status.code()) == CODE_NOT_FOUND && status.message().contains("lease")
        }
        etcd_client::Error::LeaseKeepAliveError(reason) => reason.contains("not found"),
        _ => false,
    }
}

fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

fn compare(c: Compare) -> EtcdCompare {
    match c {
        Compare::Absent(key) => EtcdCompare::create_revision(key, CompareOp::Equal, 0),
        Compare::ModRevision(key, rev) => EtcdCompare::mod_revision(key, CompareOp::Equal, rev),
        Compare::Value(key, value) => EtcdCompare::value(key, CompareOp::Equal, value),
    }
}

fn txn_op(op: Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let options = lease.map(|lease| PutOptions::new().with_lease(lease));
            TxnOp::put(key, value, options)
        }
        Op::Delete(key) => TxnOp::delete(key, None),
        Op::DeletePrefix(prefix) => TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix())),
    }
}

/// The key a transaction is about, for its errors: its first key (and how many ops).
fn txn_key(compares: &[Compare], success: &[Op], failure: &[Op]) -> String {
    let first = compares
        .iter()
        .map(|c| match c {
            Compare::Absent(k) | Compare::ModRevision(k, _) | Compare::Value(k, _) => k,
        })
        .chain(success.iter().chain(failure).map(|op| match op {
            Op::Put { key, .. } | Op::Delete(key) | Op::DeletePrefix(key) => key,
        }))
        .next()
        .cloned()
        .unwrap_or_default();
    let ops = success.len() + failure.len();
    if ops > 1 {
        format!("{first} (+{} more ops)", ops - 1)
    } else {
        first
    }
}

/// The lease a transaction puts keys on, if any (for `LeaseGone`).
fn txn_lease(success: &[Op], failure: &[Op]) -> Option<LeaseId> {
    success.iter().chain(failure).find_map(|op| match op {
        Op::Put { lease, .. } => *lease,
        _ => None,
    })
}

impl KvStore for EtcdKv {
    fn endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>> {
        async move {
            let mut kv = self.kv.clone();
            let answer = bounded("get", key, kv.get(key, None)).await?;
            Ok(answer.kvs().first().map(key_value))
        }
        .boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Snapshot, StoreError>> {
        async move {
            let mut kv = self.kv.clone();
            let answer = bounded(
                "list",
                prefix,
                kv.get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
            let revision = answer.header().map(|h| h.revision()).unwrap_or_default();
            Ok(Snapshot {
                kvs: answer.kvs().iter().map(key_value).collect(),
                revision,
            })
        }
        .boxed()
    }

    fn txn<'a>(
        &'a self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> BoxFuture<'a, Result<TxnOutcome, StoreError>> {
        async move {
            let key = txn_key(&compares, &success, &failure);
            let lease = txn_lease(&success, &failure);
            let txn = Txn::new()
                .when(compares.into_iter().map(compare).collect::<Vec<_>>())
                .and_then(success.into_iter().map(txn_op).collect::<Vec<_>>())
                .or_else(failure.into_iter().map(txn_op).collect::<Vec<_>>());
            let mut kv = self.kv.clone();
            let answer = match tokio::time::timeout(REQUEST_TIMEOUT, kv.txn(txn)).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) if lease.is_some() && lease_not_found(&e) => {
                    return Err(StoreError::LeaseGone {
                        op: "txn",
                        lease: lease.unwrap_or_default(),
                    });
                }
                Ok(Err(e)) => return Err(store_error("txn", &key, e)),
                Err(_) => {
                    return Err(StoreError::Unavailable {
                        op: "txn",
                        key,
                        reason: format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
                    });
                }
            };
            Ok(TxnOutcome {
                succeeded: answer.succeeded(),
                revision: answer.header().map(|h| h.revision()).unwrap_or_default(),
            })
        }
        .boxed()
    }

    fn grant_lease<'a>(&'a self, ttl: Duration) -> BoxFuture<'a, Result<LeaseId, StoreError>> {
        async move {
            let mut client = self.client.clone();
            let secs = ttl.as_secs().max(1) as i64;
            let key = format!("ttl {secs} s");
            let answer = bounded("grant lease", &key, client.lease_grant(secs, None)).await?;
            if !answer.error().is_empty() {
                return Err(StoreError::Failed {
                    op: "grant lease",
                    key,
                    reason: answer.error().to_owned(),
                });
            }
            Ok(answer.id())
        }
        .boxed()
    }

    fn keep_alive<'a>(&'a self, lease: LeaseId) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let mut client = self.client.clone();
            // One refresh: etcd-client sends one keepalive on a new stream and reads one
            // answer (TTL 0: the lease is gone); the stream is dropped after it.
            match tokio::time::timeout(REQUEST_TIMEOUT, client.lease_keep_alive(lease)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) if lease_not_found(&e) => Err(StoreError::LeaseGone {
                    op: "keep lease alive",
                    lease,
                }),
                Ok(Err(e)) => Err(store_error("keep lease alive", &format!("{lease:x}"), e)),
                Err(_) => Err(StoreError::Unavailable {
                    op: "keep lease alive",
                    key: format!("{lease:x}"),
                    reason: format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
                }),
            }
        }
        .boxed()
    }

    fn revoke<'a>(&'a self, lease: LeaseId) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let mut client = self.client.clone();
            match tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(lease)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) if lease_not_found(&e) => Err(StoreError::LeaseGone {
                    op: "revoke lease",
                    lease,
                }),
                Ok(Err(e)) => Err(store_error("revoke lease", &format!("{lease:x}"), e)),
                Err(_) => Err(StoreError::Unavailable {
                    op: "revoke lease",
                    key: format!("{lease:x}"),
                    reason: format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
                }),
            }
        }
        .boxed()
    }

    fn watch<'a>(
        &'a self,
        prefix: &'a str,
        from: Revision,
    ) -> BoxFuture<'a, Result<mpsc::Receiver<WatchMessage>, StoreError>> {
        async move {
            let mut options = WatchOptions::new().with_prefix().with_progress_notify();
            if from > 0 {
                options = options.with_start_revision(from);
            }
            let mut client = self.watch.clone();
            let mut stream = bounded("watch", prefix, client.watch(prefix, Some(options))).await?;
            // A start revision already compacted shows in the first answer: a Lost.
            let (tx, rx) = mpsc::channel(WATCH_QUEUE);
            let kv = self.kv.clone();
            let prefix = prefix.to_owned();
            let mut alive = self.alive.subscribe();
            tokio::spawn(async move {
                tokio::select! {
                    reason = forward_watch(&mut stream, &tx, kv, &prefix) => {
                        tracing::debug!(prefix, reason, "etcd watch lost");
                        let _ = tx.send(WatchMessage::Lost { reason }).await;
                    }
                    // The store was dropped: the receiver ends without a Lost.
                    _ = alive.changed() => {}
                }
            });
            Ok(rx)
        }
        .boxed()
    }
}

/// Forwards a watch stream's events until it cannot go on; returns why.
async fn forward_watch(
    stream: &mut etcd_client::WatchStream,
    tx: &mpsc::Sender<WatchMessage>,
    kv: KvClient,
    prefix: &str,
) -> String {
    loop {
        let message = match tokio::time::timeout(WATCH_PROBE_INTERVAL, stream.message()).await {
            Ok(message) => message,
            Err(_) => {
                // Quiet: is the store still there? (A dead peer that did not reset the
                // connection leaves the stream silent forever.)
                // One exact key (the prefix itself, normally absent): the cheapest read,
                // whatever the size of the prefix.
                let mut kv = kv.clone();
                let probe = kv.get(prefix, None);
                match tokio::time::timeout(WATCH_PROBE_TIMEOUT, probe).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return format!("the store does not answer: {e}"),
                    Err(_) => {
                        return format!(
                            "the store does not answer (no reply within {} s)",
                            WATCH_PROBE_TIMEOUT.as_secs()
                        );
                    }
                }
            }
        };
        let answer = match message {
            Ok(Some(answer)) => answer,
            Ok(None) => return "the store closed the watch stream (restarted?)".to_owned(),
            Err(e) => return format!("the watch stream failed: {e}"),
        };
        if answer.compact_revision() != 0 {
            return format!(
                "history compacted up to revision {}, past the watch's revision",
                answer.compact_revision()
            );
        }
        if answer.canceled() {
            let why = answer.cancel_reason();
            return if why.is_empty() {
                "the store cancelled the watch".to_owned()
            } else {
                format!("the store cancelled the watch: {why}")
            };
        }
        if answer.created() && answer.events().is_empty() {
            // Its header revision is the store's now, not how far events were delivered.
            continue;
        }
        let events: Vec<WatchEvent> = answer
            .events()
            .iter()
            .filter_map(|event| {
                let kv = event.kv()?;
                Some(match event.event_type() {
                    EventType::Put => WatchEvent::Put(key_value(kv)),
                    EventType::Delete => WatchEvent::Delete {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        mod_revision: kv.mod_revision(),
                    },
                })
            })
            .collect();
        // How far this batch brings the reader. Not the header's revision when there are
        // events: etcd catches a watcher up from its history 1,000 revisions a response,
        // each with the store's current revision in its header, so older events can
        // still follow. A batch ends with whole revisions (a transaction's events are
        // never split without fragmenting, which is off), so its last event's revision
        // is safe. An empty response is a progress notification, which etcd sends only
        // to a watcher that has caught up: its header is.
        let revision = match events.last() {
            Some(WatchEvent::Put(kv)) => kv.mod_revision,
            Some(WatchEvent::Delete { mod_revision, .. }) => *mod_revision,
            None => answer.header().map(|h| h.revision()).unwrap_or_default(),
        };
        // An empty batch is a progress notification: every change up to `revision` was
        // sent.
        if tx
            .send(WatchMessage::Events { events, revision })
            .await
            .is_err()
        {
            return "the reader went away".to_owned();
        }
    }
}
