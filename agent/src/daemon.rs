//! `hypha agent`: wires the state store, the datapath, the host network and the API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hypha_api::Attachment;
use hypha_cluster::etcd::{EtcdKv, Tls};

use crate::cluster;
use crate::config::AgentConfig;
use crate::control::Agent;
use crate::datapath::{Datapath, EbpfDatapath};
use crate::host::{HostNetwork, LinuxHost};
use crate::policy::limits::{MAX_FILE_BYTES, too_big};
use crate::policy::watch::{DirWatch, Due, Scan, Seen};
use crate::policy::{DirChange, route_dir_file};
use crate::server;
use crate::state::StateStore;

/// Runs the agent until SIGTERM or SIGINT. Stopping the agent leaves the datapath as it
/// is: pods keep their connectivity, and the next agent re-adopts them.
pub async fn run(mut config: AgentConfig) -> anyhow::Result<()> {
    raise_fd_limit();
    // Off the runtime's threads: it may wait a few seconds for a dying agent's lock.
    let state_dir = config.state_dir.clone();
    let store = tokio::task::spawn_blocking(move || StateStore::open(&state_dir))
        .await
        .context("opening the state directory")??;
    let saved = store.load()?;
    // Cluster mode: the node registers (and gets its pod CIDRs) before anything uses them.
    // The state directory is locked by now: one agent per cluster.json.
    let cluster = match config.cluster.clone() {
        Some(c) => {
            let (runtime, pod_cidrs) = connect_cluster(c, &config.state_dir).await?;
            config.pod_cidrs = pod_cidrs;
            Some(runtime)
        }
        None => None,
    };
    let listener = server::bind(&config.socket).await?;
    let mut datapath = EbpfDatapath::load(
        &config.pin_dir,
        config.gateway().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
        config.attach,
        config.fq_queues,
    )
    .context("loading the eBPF datapath")?;
    crate::host::cgroup::root()
        .map_err(anyhow::Error::from)
        .and_then(|cgroup| Ok(datapath.set_socket_lb(&cgroup)?))
        .context("attaching the socket load balancer to the cgroup v2 root")?;
    let (events, _) = tokio::sync::broadcast::channel(crate::monitor::BACKLOG);
    match datapath.take_events() {
        Some(ring) => {
            tokio::spawn(crate::monitor::pump(ring, events.clone()));
        }
        None => tracing::warn!(
            "the eBPF object has no events ring buffer; hypha monitor will be silent"
        ),
    }
    match datapath.take_logger() {
        Ok(logger) => {
            tokio::spawn(crate::datapath::debug_log::pump(logger));
        }
        Err(e) => {
            tracing::warn!("cannot read the datapath's log: {e}; endpoint tracing will be silent")
        }
    }
    let host = LinuxHost::new().context("opening the host's netlink socket")?;
    let socket = config.socket.clone();
    let policy_dir = config.policy_dir.clone();
    let metrics_addr = config.metrics_addr;
    let (agent, report) = Agent::start(config, datapath, host, Box::new(store), saved)
        .context("starting the agent")?;
    for w in &report.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(
        adopted = ?report.adopted,
        reattached = ?report.reattached,
        removed = ?report.removed,
        "endpoints restored"
    );
    let status = agent.status();
    tracing::info!(
        socket = %socket.display(),
        pod_cidr = ?status.node.pod_cidr,
        gateway = ?status.node.gateway,
        pod_cidr6 = ?status.node.pod_cidr6,
        pin_dir = %status.datapath.pin_dir,
        routing = status.routing.as_ref().map(|r| r.mode.as_str()),
        tunnel_device = status.routing.as_ref().and_then(|r| r.device.as_deref()),
        pod_mtu = status.routing.as_ref().map(|r| r.mtu),
        "hypha agent ready"
    );
    let agent = Arc::new(agent);
    if let Some(runtime) = &cluster {
        agent.set_cluster(runtime.clone());
        runtime.start(agent.clone());
    }
    tokio::spawn(reconcile_loop(
        agent.clone(),
        hypha_api::deferred_deletes_dir(&socket),
    ));
    tokio::spawn(policy_dir_loop(agent.clone(), policy_dir));
    if let Some(addr) = metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for metrics on {addr}"))?;
        let agent = agent.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let agent = agent.clone();
                async move {
                    let text = tokio::task::spawn_blocking(move || agent.metrics())
                        .await
                        .unwrap_or_else(|e| format!("# the metrics worker failed: {e}\n"));
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        text,
                    )
                }
            }),
        );
        tracing::info!(%addr, "serving metrics on /metrics");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("metrics server: {e}");
            }
        });
    }
    let limits = server::Limits::default();
    let app = server::app(server::router(agent), events, &limits);
    let served = server::serve(listener, app, limits, shutdown()).await;
    if let Some(runtime) = &cluster {
        // The lease is left to expire: the node stays registered, its pods keep running.
        runtime.stop();
    }
    if let Err(e) = std::fs::remove_file(&socket) {
        tracing::warn!("cannot remove {}: {e}", socket.display());
    }
    served.context("serving the API")?;
    tracing::info!("hypha agent stopped; the datapath stays in place");
    Ok(())
}

/// Opens the cluster store and registers the node: its pod CIDRs come back (see
/// [`cluster::Runtime::connect`]).
async fn connect_cluster(
    c: crate::config::ClusterConfig,
    state_dir: &Path,
) -> anyhow::Result<(Arc<cluster::Runtime>, crate::config::PodCidrs)> {
    let tls = (c.etcd_ca.is_some() || c.etcd_cert.is_some()).then(|| Tls {
        ca: c.etcd_ca.clone(),
        cert: c.etcd_cert.clone(),
        key: c.etcd_key.clone(),
    });
    let store = EtcdKv::connect(&c.store, tls.as_ref())
        .await
        .with_context(|| format!("opening the cluster store {}", c.store.join(",")))?;
    let node = c.node_name.clone();
    let (runtime, pod_cidrs) = cluster::Runtime::connect(c, state_dir, Arc::new(store))
        .await
        .with_context(|| format!("joining the cluster as node {node}"))?;
    tracing::info!(node, pod_cidrs = %pod_cidrs, "cluster mode");
    Ok((runtime, pod_cidrs))
}

/// Raises the soft limit of open descriptors to the hard one (systemd gives services a
/// soft 1,024), so that the API's connection limit, not the descriptor limit, is what a
/// flood of connections meets.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            lim.rlim_cur >= lim.rlim_max || libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0
        }
    };
    if !raised {
        tracing::warn!(
            "cannot raise the limit of open files: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// How often the agent looks for deletes left by `hypha-cni` and for vanished veths.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Finishes deferred deletes and removes endpoints whose veth vanished, and retries what
/// failed of the routing to other nodes, at start and then every [`RECONCILE_EVERY`].
async fn reconcile_loop<D: Datapath + 'static, H: HostNetwork + 'static>(
    agent: Arc<Agent<D, H>>,
    deferred_dir: PathBuf,
) {
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    let mut routing_error: Option<String> = None;
    loop {
        tick.tick().await;
        let (attachments, files) = read_deferred(&deferred_dir);
        let a = agent.clone();
        let done = match tokio::task::spawn_blocking(move || a.reconcile(&attachments)).await {
            Ok(done) => done,
            Err(e) => {
                tracing::error!("reconcile failed: {e}");
                continue;
            }
        };
        for line in done {
            tracing::info!("reconcile: {line}");
        }
        // Cluster mode: what failed of the last routing change, tried again (a failure
        // logged when it is new).
        let a = agent.clone();
        if let Ok(Some(result)) = tokio::task::spawn_blocking(move || a.retry_cluster_nodes()).await
        {
            match result {
                Ok(()) => {
                    routing_error = None;
                    tracing::info!("routing to the cluster's nodes applied on retry");
                }
                Err(e) => {
                    let e = e.to_string();
                    if routing_error.as_ref() != Some(&e) {
                        tracing::warn!("routing to the cluster's nodes, retried: {e}");
                        routing_error = Some(e);
                    }
                }
            }
        }
        for file in files {
            if let Err(e) = std::fs::remove_file(&file) {
                tracing::warn!("cannot remove {}: {e}", file.display());
            }
        }
    }
}

/// How often the agent looks at the policy directory's files.
/// Scanning is a readdir and a stat per file without the agent's lock, so a short period
/// costs little; with the compile time of a large policy set (~60 ms for 10,000 rules) it
/// keeps a file's enforcement under 100 ms after it lands. (inotify would remove the
/// polling; the `notify` crate is the candidate.)
const POLICY_DIR_EVERY: Duration = Duration::from_millis(25);

/// Applies the policy directory's files at start and whenever one of them changes
/// (appears, goes, or gets another modification time or size), checked every
/// [`POLICY_DIR_EVERY`]. Each file is applied or refused on its own; a refused file is
/// retried with backoff ([`crate::policy::watch`]) and shown in the status until it is
/// applied, fixed or removed. Files are read and parsed on a blocking thread before the
/// agent's lock is taken.
async fn policy_dir_loop<D: Datapath + 'static, H: HostNetwork + 'static>(
    agent: Arc<Agent<D, H>>,
    dir: PathBuf,
) {
    let mut tick = tokio::time::interval(POLICY_DIR_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = DirWatch::default();
    let mut last_error: Option<String> = None;
    // The last refusal of each service file, logged once.
    let mut services_failed: BTreeMap<PathBuf, String> = BTreeMap::new();
    loop {
        tick.tick().await;
        let scan_dir = dir.clone();
        let scan = match tokio::task::spawn_blocking(move || scan_policy_dir(&scan_dir)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                if last_error.as_ref() != Some(&e) {
                    tracing::warn!("{e}; its policies stay as they were");
                    last_error = Some(e);
                }
                continue;
            }
            Err(e) => {
                tracing::error!("scanning the policy directory: {e}");
                continue;
            }
        };
        last_error = None;
        let due = watch.due(&scan, std::time::Instant::now());
        if due.is_empty() {
            continue;
        }
        let (changes, services, seen) =
            match tokio::task::spawn_blocking(move || read_due(due)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("reading the policy directory: {e}");
                    continue;
                }
            };
        let a = agent.clone();
        let synced = tokio::task::spawn_blocking(move || {
            let report = a.sync_policy_files(changes);
            let services = sync_service_files(&a, services);
            (report, services)
        })
        .await;
        let (mut report, services) = match synced {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("applying the policy directory failed: {e}");
                continue;
            }
        };
        // A file's outcome is both sides': refused if either refused it.
        for (path, outcome) in services {
            match (report.outcomes.get(&path), outcome) {
                (Some(Err(_)), _) => {}
                (_, Err(e)) => {
                    if services_failed.get(&path) != Some(&e) {
                        tracing::warn!("service file refused, its services stay as they were: {e}");
                        services_failed.insert(path.clone(), e.clone());
                    }
                    report.outcomes.insert(path, Err(e));
                }
                (_, Ok(names)) => {
                    if services_failed.remove(&path).is_some() || !names.is_empty() {
                        tracing::info!(file = %path.display(), services = ?names, "service file applied");
                    }
                    report.outcomes.entry(path).or_insert(Ok(()));
                }
            }
        }
        let now = std::time::Instant::now();
        for (path, outcome) in &report.outcomes {
            watch.record(path.clone(), seen.get(path).cloned(), outcome, now);
        }
        for line in report.log {
            if line.starts_with("policy directory applied") {
                tracing::info!("{line}");
            } else {
                tracing::warn!("{line}");
            }
        }
    }
}

/// A file of the watched directory for the service side: its text, or `None` when it
/// holds no services (any more).
type ServiceChange = (PathBuf, Option<String>);

/// Reads the files that are due (no lock held) and routes each by its kinds
/// ([`route_dir_file`]): returns the policy side's changes (parsed), the service side's,
/// and what the scan saw of each file still there. A file gone leaves both sides.
fn read_due(due: Due) -> (Vec<DirChange>, Vec<ServiceChange>, BTreeMap<PathBuf, Seen>) {
    let mut changes = Vec::new();
    let mut services = Vec::new();
    let mut seen_now = BTreeMap::new();
    for (path, seen) in due.files {
        let content = match &seen {
            Ok(_) => read_policy_file(&path),
            Err(e) => Err(e.clone()),
        };
        let routed = route_dir_file(&path, content);
        changes.push(routed.policy);
        services.extend(routed.service);
        seen_now.insert(path, seen);
    }
    for path in due.removed {
        services.push((path.clone(), None));
        changes.push(DirChange::Removed(path));
    }
    (changes, services, seen_now)
}

/// Hands the service side its files: each one's `namespace/name`s, or why it is refused
/// (the message names the file).
fn sync_service_files<D: Datapath, H: HostNetwork>(
    agent: &Agent<D, H>,
    changes: Vec<ServiceChange>,
) -> Vec<(PathBuf, Result<Vec<String>, String>)> {
    changes
        .into_iter()
        .map(|(path, content)| {
            let outcome = agent
                .sync_service_file(&path, content.as_deref())
                .map_err(|e| {
                    let e = e.to_string();
                    let file = path.display().to_string();
                    if e.contains(&file) {
                        e
                    } else {
                        format!("{file}: {e}")
                    }
                });
            (path, outcome)
        })
        .collect()
}

/// A policy file's text, reading no more than the size limit allows.
fn read_policy_file(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() > MAX_FILE_BYTES {
        let len = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Err(format!("{}: {}", path.display(), too_big(len)));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// The policy files of a directory (`*.yaml`, `*.yml`, `*.json`) with their modification
/// times and sizes, or why one cannot be read (a dangling symlink, a directory or a FIFO
/// named like a policy file): such a file is refused on its own.
fn scan_policy_dir(dir: &Path) -> Result<Scan, String> {
    let mut out = Scan::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // No directory: no policies from it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(format!(
                "cannot read the policy directory {}: {e}",
                dir.display()
            ));
        }
    };
    for entry in entries {
        let entry = entry
            .map_err(|e| format!("cannot read the policy directory {}: {e}", dir.display()))?;
        let path = entry.path();
        if !crate::cli::is_policy_file(&path) {
            continue;
        }
        // Follows symlinks, as with files mounted from a ConfigMap.
        let seen = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok((m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len())),
            Ok(m) => Err(format!(
                "{} is not a regular file ({}); it is ignored",
                path.display(),
                if m.is_dir() {
                    "a directory"
                } else {
                    "a special file"
                }
            )),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        };
        out.insert(path, seen);
    }
    Ok(out)
}

/// The deferred deletes waiting in `dir`; unreadable files are reported and left alone.
fn read_deferred(dir: &Path) -> (Vec<Attachment>, Vec<PathBuf>) {
    let mut attachments = Vec::new();
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (attachments, files);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue; // a plugin still writing it (it renames into place)
        }
        match std::fs::read(&path).map(|b| serde_json::from_slice::<Attachment>(&b)) {
            Ok(Ok(a)) => {
                attachments.push(a);
                files.push(path);
            }
            Ok(Err(e)) => {
                tracing::warn!("ignoring malformed deferred delete {}: {e}", path.display())
            }
            Err(e) => tracing::warn!("cannot read {}: {e}", path.display()),
        }
    }
    (attachments, files)
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
