//! The API: HTTP/1.1 + JSON on a unix socket (mode 0600), routes as in `hypha_api`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hypha_api::{AllocateRequest, ApiError, CreateEndpointRequest, GcRequest};
use tokio::net::UnixListener;
use tokio::sync::Mutex;

use crate::control::{Agent, ControlError};
use crate::datapath::Datapath;
use crate::host::HostNetwork;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another agent is already listening on {0}")]
    InUse(PathBuf),
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Shared<D, H> = Arc<Mutex<Agent<D, H>>>;

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!("{self}");
        }
        (
            status,
            Json(ApiError {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

pub fn router<D, H>(agent: Shared<D, H>) -> Router
where
    D: Datapath + 'static,
    H: HostNetwork + 'static,
{
    Router::new()
        .route("/v1/status", get(status::<D, H>))
        .route("/v1/endpoints", get(list::<D, H>).post(create::<D, H>))
        .route(
            "/v1/endpoints/{container_id}/{ifname}",
            get(check::<D, H>).delete(remove::<D, H>),
        )
        .route("/v1/gc", post(gc::<D, H>))
        .route("/v1/ipam/allocate", post(allocate::<D, H>))
        .with_state(agent)
}

async fn status<D: Datapath, H: HostNetwork>(State(a): State<Shared<D, H>>) -> Response {
    Json(a.lock().await.status()).into_response()
}

async fn list<D: Datapath, H: HostNetwork>(State(a): State<Shared<D, H>>) -> Response {
    Json(a.lock().await.list()).into_response()
}

async fn allocate<D: Datapath, H: HostNetwork>(
    State(a): State<Shared<D, H>>,
    Json(req): Json<AllocateRequest>,
) -> Result<Response, ControlError> {
    let alloc = a.lock().await.allocate(&req)?;
    tracing::info!(container = %req.container_id, ifname = %req.ifname, address = %alloc.address, "allocated");
    Ok(Json(alloc).into_response())
}

async fn create<D: Datapath, H: HostNetwork>(
    State(a): State<Shared<D, H>>,
    Json(req): Json<CreateEndpointRequest>,
) -> Result<Response, ControlError> {
    let ep = a.lock().await.create_endpoint(&req)?;
    tracing::info!(id = ep.id, container = %ep.container_id, host_if = %ep.host_ifname, address = %ep.address, "endpoint created");
    Ok((StatusCode::CREATED, Json(ep)).into_response())
}

async fn check<D: Datapath, H: HostNetwork>(
    State(a): State<Shared<D, H>>,
    UrlPath((container_id, ifname)): UrlPath<(String, String)>,
) -> Result<Response, ControlError> {
    let check = a.lock().await.check_endpoint(&container_id, &ifname)?;
    Ok(Json(check).into_response())
}

async fn gc<D: Datapath, H: HostNetwork>(
    State(a): State<Shared<D, H>>,
    Json(req): Json<GcRequest>,
) -> Result<Response, ControlError> {
    let resp = a.lock().await.gc(&req)?;
    tracing::info!(removed = resp.removed.len(), released = ?resp.released, errors = ?resp.errors, "garbage collected");
    Ok(Json(resp).into_response())
}

async fn remove<D: Datapath, H: HostNetwork>(
    State(a): State<Shared<D, H>>,
    UrlPath((container_id, ifname)): UrlPath<(String, String)>,
) -> Result<Response, ControlError> {
    let resp = a.lock().await.delete_endpoint(&container_id, &ifname)?;
    if resp.endpoint_removed || resp.address_released.is_some() {
        tracing::info!(container = %container_id, %ifname, released = ?resp.address_released, "endpoint deleted");
    }
    Ok(Json(resp).into_response())
}

/// Binds the socket with mode 0600, replacing a stale socket file but never a live agent's.
pub async fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let io = |op, source| ServerError::Io {
        op,
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServerError::Io {
            op: "create",
            path: dir.to_owned(),
            source,
        })?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(|e| io("remove the stale socket", e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| io("listen on", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("set the mode of", e))?;
    Ok(listener)
}
