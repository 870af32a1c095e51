//! `hypha agent`: wires the state store, the datapath, the host network and the API.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::Mutex;

use crate::config::AgentConfig;
use crate::control::Agent;
use crate::datapath::EbpfDatapath;
use crate::host::LinuxHost;
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
    let app = server::router(Arc::new(Mutex::new(agent)));
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

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
