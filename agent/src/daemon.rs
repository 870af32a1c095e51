//! `hypha agent`: wires the state store, the datapath, the host network and the API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hypha_api::Attachment;
use tokio::sync::Mutex;

use crate::config::AgentConfig;
use crate::control::Agent;
use crate::datapath::{Datapath, EbpfDatapath};
use crate::host::{HostNetwork, LinuxHost};
use crate::server;
use crate::state::StateStore;

/// Runs the agent until SIGTERM or SIGINT. Stopping the agent leaves the datapath as it
/// is: pods keep their connectivity, and the next agent re-adopts them.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let store = StateStore::open(&config.state_dir)?;
    let saved = store.load()?;
    let listener = server::bind(&config.socket).await?;
    let datapath = EbpfDatapath::load(&config.pin_dir, config.gateway())
        .context("loading the eBPF datapath")?;
    let host = LinuxHost::new().context("opening the host's netlink socket")?;
    let socket = config.socket.clone();
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
        pod_cidr = %status.node.pod_cidr,
        gateway = %status.node.gateway,
        pin_dir = %status.datapath.pin_dir,
        "hypha agent ready"
    );
    let agent = Arc::new(Mutex::new(agent));
    tokio::spawn(reconcile_loop(
        agent.clone(),
        hypha_api::deferred_deletes_dir(&socket),
    ));
    let app = server::router(agent);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await;
    if let Err(e) = std::fs::remove_file(&socket) {
        tracing::warn!("cannot remove {}: {e}", socket.display());
    }
    served.context("serving the API")?;
    tracing::info!("hypha agent stopped; the datapath stays in place");
    Ok(())
}

/// How often the agent looks for deletes left by `hypha-cni` and for vanished veths.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Finishes deferred deletes and removes endpoints whose veth vanished, at start and then
/// every [`RECONCILE_EVERY`].
async fn reconcile_loop<D: Datapath, H: HostNetwork>(
    agent: Arc<Mutex<Agent<D, H>>>,
    deferred_dir: PathBuf,
) {
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    loop {
        tick.tick().await;
        let (attachments, files) = read_deferred(&deferred_dir);
        let done = agent.lock().await.reconcile(&attachments);
        for line in done {
            tracing::info!("reconcile: {line}");
        }
        for file in files {
            if let Err(e) = std::fs::remove_file(&file) {
                tracing::warn!("cannot remove {}: {e}", file.display());
            }
        }
    }
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
