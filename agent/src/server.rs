//! The API: HTTP/1.1 + JSON on a unix socket (mode 0600), routes as in `hypha_api`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use hypha_api::{
    AllocateRequest, ApiError, CreateEndpointRequest, GcRequest, NamespaceLabelsRequest,
    PolicySource,
};
use tokio::net::UnixListener;

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

/// The agent, shared by every request; its methods take `&self` and lock only what
/// they need.
pub type Shared<D, H> = Arc<Agent<D, H>>;

/// Runs `f` on the agent on a blocking thread: the control plane's calls make syscalls
/// (netlink, bpf, fsync) that must not hold up the async workers.
async fn blocking<D, H, T>(
    a: Shared<D, H>,
    f: impl FnOnce(&Agent<D, H>) -> Result<T, ControlError> + Send + 'static,
) -> Result<T, ControlError>
where
    D: Datapath + 'static,
    H: HostNetwork + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || f(&a))
        .await
        .map_err(|e| ControlError::Datapath(format!("the request's worker failed: {e}")))?
}

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
        // An interface named `policy` cannot be checked through the route above; the
        // router prefers the static segment.
        .route(
            "/v1/endpoints/{container_id}/policy",
            get(endpoint_policy::<D, H>),
        )
        // Likewise an interface named `bandwidth`.
        .route(
            "/v1/endpoints/{endpoint}/bandwidth",
            put(set_bandwidth::<D, H>),
        )
        // Likewise an interface named `debug`.
        .route("/v1/endpoints/{endpoint}/debug", put(set_debug::<D, H>))
        // Likewise interfaces named `labels` and `ports`.
        .route("/v1/endpoints/{endpoint}/labels", put(set_labels::<D, H>))
        .route("/v1/endpoints/{endpoint}/ports", put(set_ports::<D, H>))
        .route(
            "/v1/policies",
            get(list_policies::<D, H>).post(apply_policies::<D, H>),
        )
        .route(
            "/v1/policies/{namespace}/{name}",
            axum::routing::delete(delete_policy::<D, H>),
        )
        .route(
            "/v1/services",
            get(list_services::<D, H>).post(apply_services::<D, H>),
        )
        .route(
            "/v1/services/{namespace}/{name}",
            axum::routing::delete(delete_service::<D, H>),
        )
        .route(
            "/v1/namespaces/{namespace}/labels",
            put(namespace_labels::<D, H>),
        )
        .route("/v1/nodes", get(nodes::<D, H>))
        .route(
            "/v1/nodes/{name}",
            axum::routing::delete(remove_node::<D, H>),
        )
        .route("/v1/identities", get(identities::<D, H>))
        .route("/v1/gc", post(gc::<D, H>))
        .route("/v1/monitor", get(monitor::<D, H>))
        .route("/v1/ipam/allocate", post(allocate::<D, H>))
        .route("/v1/state", get(committed_state::<D, H>))
        .with_state(agent)
}

async fn status<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
) -> Result<Response, ControlError> {
    Ok(Json(blocking(a, |a| Ok(a.status())).await?).into_response())
}

/// The cluster's nodes (`hypha node list`); a single node lists itself.
async fn nodes<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
) -> Result<Response, ControlError> {
    Ok(Json(blocking(a, |a| a.nodes()).await?).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveNodeQuery {
    #[serde(default)]
    force: bool,
}

/// `hypha node remove NAME [--force]`: its record, CIDRs, claims and endpoints leave the
/// store in one transaction.
async fn remove_node<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    UrlPath(name): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<RemoveNodeQuery>,
) -> Result<Response, ControlError> {
    let resp = {
        let name = name.clone();
        blocking(a, move |a| a.remove_node(&name, q.force)).await?
    };
    tracing::info!(node = %name, force = q.force, endpoints = resp.endpoints, pod_cidr = ?resp.pod_cidr, pod_cidr6 = ?resp.pod_cidr6, "node removed");
    Ok(Json(resp).into_response())
}

/// The identities this node knows (`hypha identity list`).
async fn identities<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
) -> Result<Response, ControlError> {
    Ok(Json(blocking(a, |a| Ok(a.identities())).await?).into_response())
}

/// What the state store holds (`hypha state`; the soak's leak counts).
async fn committed_state<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
) -> Result<Response, ControlError> {
    Ok(Json(blocking(a, |a| Ok(a.committed_state()?)).await?).into_response())
}

async fn list<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
) -> Result<Response, ControlError> {
    Ok(Json(blocking(a, |a| Ok(a.list())).await?).into_response())
}

/// The [`hypha_api::ATTACHMENT_LOCKED_AT`] header, if the request has one.
fn locked_at(headers: &HeaderMap) -> Result<Option<u64>, ControlError> {
    headers
        .get(hypha_api::ATTACHMENT_LOCKED_AT)
        .map(|v| {
            v.to_str().ok().and_then(|v| v.parse().ok()).ok_or_else(|| {
                ControlError::BadRequest(format!(
                    "header {}: {v:?} is not a number of nanoseconds",
                    hypha_api::ATTACHMENT_LOCKED_AT
                ))
            })
        })
        .transpose()
}

async fn allocate<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    headers: HeaderMap,
    Json(req): Json<AllocateRequest>,
) -> Result<Response, ControlError> {
    let locked_at = locked_at(&headers)?;
    let alloc = {
        let req = req.clone();
        blocking(a, move |a| a.allocate_for(&req, locked_at)).await?
    };
    tracing::info!(container = %req.container_id, ifname = %req.ifname, address = ?alloc.address, address6 = ?alloc.address6, "allocated");
    Ok(Json(alloc).into_response())
}

async fn create<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    headers: HeaderMap,
    Json(req): Json<CreateEndpointRequest>,
) -> Result<Response, ControlError> {
    let locked_at = locked_at(&headers)?;
    let ep = blocking(a, move |a| a.create_endpoint_for(&req, locked_at)).await?;
    tracing::info!(id = ep.id, container = %ep.container_id, host_if = %ep.host_ifname, address = ?ep.address, address6 = ?ep.address6, "endpoint created");
    Ok((StatusCode::CREATED, Json(ep)).into_response())
}

#[derive(serde::Deserialize)]
struct MonitorQuery {
    endpoint: Option<u32>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Streams events as newline-delimited JSON until the client goes away.
async fn monitor<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    axum::extract::Extension(events): axum::extract::Extension<
        tokio::sync::broadcast::Sender<hypha_common::Event>,
    >,
    axum::extract::Query(q): axum::extract::Query<MonitorQuery>,
) -> Result<Response, ControlError> {
    if let Some(kind) = q.kind.as_deref()
        && !matches!(kind, "drop" | "policy" | "all")
    {
        return Err(ControlError::BadRequest(format!(
            "unknown event type {kind:?}: expected drop, policy or all"
        )));
    }
    // Drops that are not policy verdicts name their endpoint by its host ifindex only.
    let ifindex = match q.endpoint {
        Some(id) => blocking(a.clone(), move |a| Ok(a.endpoint_ifindex(id))).await?,
        None => None,
    };
    let filter = crate::monitor::Filter {
        endpoint: q.endpoint,
        ifindex,
        kind: q.kind,
    };
    let rx = events.subscribe();
    let stream = futures_util::stream::unfold((rx, a, filter), |(mut rx, a, filter)| async move {
        loop {
            let line = match rx.recv().await {
                Ok(e) if filter.matches(&e) => {
                    let mut event = crate::monitor::render(
                        &e,
                        |id| a.policy_name(id),
                        |id| a.identity_name(id),
                    );
                    event.service = crate::monitor::service_of(&e, |addr, port, proto| {
                        a.service_of_backend(addr, port, proto)
                    });
                    serde_json::to_string(&event).expect("events serialize")
                }
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    format!("{{\"lost\":{n}}}")
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            let bytes = axum::body::Bytes::from(line + "\n");
            return Some((Ok::<_, std::convert::Infallible>(bytes), (rx, a, filter)));
        }
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

async fn check<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    UrlPath((container_id, ifname)): UrlPath<(String, String)>,
) -> Result<Response, ControlError> {
    let check = blocking(a, move |a| a.check_endpoint(&container_id, &ifname)).await?;
    Ok(Json(check).into_response())
}

async fn gc<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    Json(req): Json<GcRequest>,
) -> Result<Response, ControlError> {
    let resp = blocking(a, move |a| a.gc(&req)).await?;
    tracing::info!(removed = resp.removed.len(), released = ?resp.released, errors = ?resp.errors, "garbage collected");
    Ok(Json(resp).into_response())
}

async fn remove<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    UrlPath((container_id, ifname)): UrlPath<(String, String)>,
) -> Result<Response, ControlError> {
    let resp = {
        let (container_id, ifname) = (container_id.clone(), ifname.clone());
        blocking(a, move |a| a.delete_endpoint(&container_id, &ifname)).await?
    };
    if resp.endpoint_removed || resp.address_released.is_some() || resp.address6_released.is_some()
    {
        tracing::info!(container = %container_id, %ifname, released = ?resp.address_released, released6 = ?resp.address6_released, "endpoint deleted");
    }
    Ok(Json(resp).into_response())
}

async fn apply_policies<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    Json(files): Json<Vec<PolicySource>>,
) -> Result<Response, ControlError> {
    let sources: Vec<String> = files.iter().map(|f| f.source.clone()).collect();
    // Parse (bounded, see policy::limits) on a blocking thread before taking the policy
    // lock, so that ADD and status never wait for a parse.
    let parsed = tokio::task::spawn_blocking(move || crate::policy::parse_policy_sources(&files))
        .await
        .map_err(|e| {
            // A panic in the parser: a bug (the fuzz tests look for them); the files are
            // refused rather than the connection dropped.
            ControlError::Policy(crate::policy::PolicyError::Invalid {
                source_name: sources.join(", "),
                message: format!("the policy parser failed, please report it with the file: {e}"),
            })
        })
        .and_then(|r| r.map_err(ControlError::from));
    let result = match parsed {
        Ok(parsed) => blocking(a, move |a| a.apply_parsed(parsed)).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(resp) => {
            tracing::info!(files = ?sources, applied = ?resp.applied, entries_set = resp.entries_set, entries_removed = resp.entries_removed, "policies applied");
            Ok(Json(resp).into_response())
        }
        Err(e) => {
            tracing::warn!(files = ?sources, "policies refused: {e}");
            Err(e)
        }
    }
}

async fn list_policies<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
) -> Result<Response, ControlError> {
    Ok(Json(blocking(a, |a| Ok(a.list_policies())).await?).into_response())
}

async fn delete_policy<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> Result<Response, ControlError> {
    let resp = {
        let (namespace, name) = (namespace.clone(), name.clone());
        blocking(a, move |a| a.delete_policy(&namespace, &name)).await?
    };
    tracing::info!(%namespace, %name, "policy deleted");
    Ok(Json(resp).into_response())
}

/// `hypha service apply`: the files are parsed, checked and applied whole or not at all
/// on a blocking thread (the control plane parses before it takes its lock).
async fn apply_services<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    Json(files): Json<Vec<PolicySource>>,
) -> Result<Response, ControlError> {
    let sources: Vec<String> = files.iter().map(|f| f.source.clone()).collect();
    match blocking(a, move |a| a.apply_services(&files)).await {
        Ok(resp) => {
            tracing::info!(files = ?sources, applied = ?resp.applied, slices = ?resp.slices, program_us = resp.program_us, "services applied");
            Ok(Json(resp).into_response())
        }
        Err(e) => {
            tracing::warn!(files = ?sources, "services refused: {e}");
            Err(e)
        }
    }
}

async fn list_services<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
) -> Result<Response, ControlError> {
    Ok(Json(blocking(a, |a| Ok(a.list_services())).await?).into_response())
}

/// `hypha service delete`: answers `{"deleted": "namespace/name"}`.
async fn delete_service<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> Result<Response, ControlError> {
    {
        let (namespace, name) = (namespace.clone(), name.clone());
        blocking(a, move |a| a.delete_service(&namespace, &name)).await?;
    }
    tracing::info!(%namespace, %name, "service deleted");
    Ok(Json(serde_json::json!({ "deleted": format!("{namespace}/{name}") })).into_response())
}

async fn endpoint_policy<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    UrlPath(endpoint): UrlPath<String>,
) -> Result<Response, ControlError> {
    Ok(Json(blocking(a, move |a| a.endpoint_policy(&endpoint)).await?).into_response())
}

async fn set_bandwidth<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    UrlPath(endpoint): UrlPath<String>,
    Json(bw): Json<hypha_api::Bandwidth>,
) -> Result<Response, ControlError> {
    Ok(Json(blocking(a, move |a| a.set_bandwidth(&endpoint, &bw)).await?).into_response())
}

async fn set_debug<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    UrlPath(endpoint): UrlPath<String>,
    Json(req): Json<hypha_api::DebugRequest>,
) -> Result<Response, ControlError> {
    Ok(Json(blocking(a, move |a| a.set_debug(&endpoint, req.enabled)).await?).into_response())
}

async fn set_labels<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    UrlPath(endpoint): UrlPath<String>,
    Json(req): Json<hypha_api::EndpointLabelsRequest>,
) -> Result<Response, ControlError> {
    Ok(Json(blocking(a, move |a| a.set_endpoint_labels(&endpoint, &req)).await?).into_response())
}

async fn set_ports<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    UrlPath(endpoint): UrlPath<String>,
    Json(req): Json<hypha_api::EndpointPortsRequest>,
) -> Result<Response, ControlError> {
    Ok(
        Json(blocking(a, move |a| a.set_endpoint_ports(&endpoint, &req.ports)).await?)
            .into_response(),
    )
}

async fn namespace_labels<D: Datapath + 'static, H: HostNetwork + 'static>(
    State(a): State<Shared<D, H>>,
    UrlPath(namespace): UrlPath<String>,
    Json(req): Json<NamespaceLabelsRequest>,
) -> Result<Response, ControlError> {
    let resp = {
        let namespace = namespace.clone();
        blocking(a, move |a| a.set_namespace_labels(&namespace, &req)).await?
    };
    tracing::info!(%namespace, labels = ?resp.labels, "namespace labels set");
    Ok(Json(resp).into_response())
}

/// The API as the agent serves it: `router` with the events for the monitor, the
/// [`Limits`] the body extractor reads, and every refusal turned into an [`ApiError`].
pub fn app(
    router: Router,
    events: tokio::sync::broadcast::Sender<hypha_common::Event>,
    limits: &Limits,
) -> Router {
    router
        .fallback(no_route)
        .layer(axum::middleware::from_fn(api_errors))
        // For a handler that takes the body as bytes: the largest limit; [`Json`] applies
        // the limit of each route.
        .layer(axum::extract::DefaultBodyLimit::max(
            limits.policy_body_limit,
        ))
        .layer(axum::extract::Extension(limits.clone()))
        .layer(axum::extract::Extension(events))
}

async fn no_route(req: axum::extract::Request) -> Response {
    json::error(
        StatusCode::NOT_FOUND,
        format!("no API route {} {}", req.method(), req.uri().path()),
    )
}

/// Gives the refusals of axum's own extractors and of the router (a path segment that is
/// not UTF-8, a bad query, a method the route does not take) an [`ApiError`] body that
/// names the request, as every other error has.
async fn api_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let what = format!("{} {}", req.method(), req.uri().path());
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let allow = resp.headers().get(axum::http::header::ALLOW).cloned();
    let text = match axum::body::to_bytes(resp.into_body(), 64 << 10).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(e) => format!("(unreadable: {e})"),
    };
    let message = match status {
        _ if !text.is_empty() => format!("{what}: {text}"),
        StatusCode::METHOD_NOT_ALLOWED => format!("{what}: this route does not take that method"),
        _ => format!("{what}: {status}"),
    };
    // axum answers 422 for a body of the wrong shape; the API says 400 for every bad input.
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    let mut answer = json::error(status, message);
    if let Some(allow) = allow {
        answer
            .headers_mut()
            .insert(axum::http::header::ALLOW, allow);
    }
    answer
}

mod json;
mod listen;

pub use json::Json;
pub use listen::{Limits, serve};

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod hardening_tests;

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

#[cfg(test)]
mod tests {
    use hypha_api::{Client, NamespaceLabelsRequest, PolicySource};

    use super::*;
    use crate::config::AgentConfig;
    use crate::control::Persist;
    use crate::datapath::fake::FakeDatapath;
    use crate::host::fake::FakeHost;
    use crate::state::{Change, Pending, PersistedState, StateError};

    struct NoStore;

    impl Persist for NoStore {
        fn submit(&self, _: Vec<Change>) -> Pending {
            Pending::done(Ok(()))
        }

        fn committed(&self) -> Result<PersistedState, StateError> {
            Ok(PersistedState::default())
        }
    }

    /// `GET /v1/state` (`hypha state`) answers what the store committed.
    #[test]
    fn the_state_route_answers_what_the_store_committed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let store = crate::state::mem::MemStore::default();
        let (agent, _) = Agent::start(
            AgentConfig::default(),
            FakeDatapath::default(),
            FakeHost::default(),
            Box::new(store.clone()),
            PersistedState::default(),
        )
        .unwrap();
        let app = router(Arc::new(agent));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt.block_on(bind(&socket)).unwrap();
        rt.spawn(async move { axum::serve(listener, app).await });

        let client = Client::new(&socket).unwrap();
        let alloc = client
            .allocate(&hypha_api::AllocateRequest {
                container_id: "c1".into(),
                ifname: "eth0".into(),
                address: None,
                address6: None,
            })
            .unwrap();
        let state: PersistedState = client.state().unwrap();
        assert_eq!(state, store.last());
        let owner = &state.ipam.allocations[&alloc.address.unwrap()];
        assert_eq!(
            (owner.container_id.as_str(), owner.ifname.as_str()),
            ("c1", "eth0")
        );
    }

    /// The policy routes, through the real client over a unix socket.
    #[test]
    fn policy_routes_answer_through_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let (agent, _) = Agent::start(
            AgentConfig::default(),
            FakeDatapath::default(),
            FakeHost::default(),
            Box::new(NoStore),
            PersistedState::default(),
        )
        .unwrap();
        let app = router(Arc::new(agent));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt.block_on(bind(&socket)).unwrap();
        rt.spawn(async move { axum::serve(listener, app).await });

        let client = Client::new(&socket).unwrap();
        let applied = client
            .apply_policies(&[PolicySource {
                source: "p.yaml".into(),
                content: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\nspec: {podSelector: {}}\n".into(),
            }])
            .unwrap();
        assert_eq!(applied.applied, vec!["shop/p"]);
        let list = client.policies().unwrap();
        assert_eq!(
            (list[0].namespace.as_str(), list[0].name.as_str()),
            ("shop", "p")
        );
        let err = client
            .apply_policies(&[PolicySource {
                source: "bad.yaml".into(),
                content: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: q}\nspec: {podSelectr: {}}\n".into(),
            }])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.yaml") && err.contains("podSelectr") && err.contains("HTTP 400"),
            "{err}"
        );
        let ns = client
            .set_namespace_labels(
                "shop",
                &NamespaceLabelsRequest {
                    set: [("team".to_owned(), "a".to_owned())].into(),
                    remove: vec![],
                },
            )
            .unwrap();
        assert_eq!(ns.labels.len(), 2);
        let err = client.endpoint_policy("42").unwrap_err().to_string();
        assert!(err.contains("HTTP 404"), "{err}");
        client.delete_policy("shop", "p").unwrap();
        assert!(client.policies().unwrap().is_empty());
        assert_eq!(client.status().unwrap().policy.policies, 0);
    }

    /// Serves `agent` on a socket in `dir`; the runtime must outlive the client's calls.
    fn serve_agent(
        agent: Agent<FakeDatapath, FakeHost>,
        dir: &Path,
    ) -> (Client, tokio::runtime::Runtime) {
        let socket = dir.join("agent.sock");
        let app = app(
            router(Arc::new(agent)),
            tokio::sync::broadcast::channel(1).0,
            &Limits::default(),
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt.block_on(bind(&socket)).unwrap();
        rt.spawn(async move { axum::serve(listener, app).await });
        (Client::new(&socket).unwrap(), rt)
    }

    fn single_node() -> Agent<FakeDatapath, FakeHost> {
        Agent::start(
            AgentConfig::default(),
            FakeDatapath::default(),
            FakeHost::default(),
            Box::new(NoStore),
            PersistedState::default(),
        )
        .unwrap()
        .0
    }

    /// The service routes, through the real client over a unix socket: an empty list,
    /// a delete of nothing is a 404 naming the service, a body of the wrong shape a 400
    /// naming the field, and a body of service files as large as policy files is taken.
    #[test]
    fn service_routes_answer_through_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let (client, _rt) = serve_agent(single_node(), dir.path());
        assert_eq!(client.services().unwrap(), []);
        assert_eq!(client.status().unwrap().services, Default::default());
        let err = client
            .delete_service("shop", "web")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HTTP 404") && err.contains("shop/web"),
            "{err}"
        );
        let socket = dir.path().join("agent.sock");
        let reply = hardening_tests::request(
            &socket,
            "POST",
            "/v1/services",
            Some(br#"[{"source": "a.yaml", "contents": "x"}]"#),
        );
        assert_eq!(reply.status, 400, "{reply:?}");
        assert!(reply.error().contains("contents"), "{reply:?}");
        // Larger than the 64 KiB of other routes: the parser, not the size limit, answers.
        let big = serde_json::to_string(&[PolicySource {
            source: "big.yaml".into(),
            content: format!("# {}\n", "x".repeat(200 << 10)),
        }])
        .unwrap();
        let reply = hardening_tests::request(&socket, "POST", "/v1/services", Some(big.as_bytes()));
        assert_ne!(reply.status, 413, "{reply:?}");
        assert!(reply.status < 500, "{reply:?}");
        // Only DELETE on a service.
        let reply = hardening_tests::request(&socket, "GET", "/v1/services/shop/web", None);
        assert_eq!(reply.status, 405, "{reply:?}");
    }

    /// A service applied through the API is listed with its ClusterIP from the service
    /// CIDR and its port, counted in the status, and deleted; an invalid file is refused
    /// naming it.
    #[test]
    fn a_service_applied_through_the_api_is_listed_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (client, _rt) = serve_agent(single_node(), dir.path());
        let web = PolicySource {
            source: "web.yaml".into(),
            content: "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n".into(),
        };
        let applied = client.apply_services(std::slice::from_ref(&web)).unwrap();
        assert_eq!(applied.applied, ["shop/web"]);
        let list = client.services().unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        let svc = &list[0];
        assert_eq!(
            (svc.namespace.as_str(), svc.name.as_str(), svc.kind.as_str()),
            ("shop", "web", "ClusterIP")
        );
        let cidr: ipnet::IpNet = "10.96.0.0/16".parse().unwrap();
        assert!(cidr.contains(&svc.cluster_ips[0]), "{svc:?}");
        assert_eq!(
            (svc.ports[0].port, svc.ports[0].protocol.as_str()),
            (80, "TCP")
        );
        assert_eq!(client.status().unwrap().services.services, 1);
        let err = client
            .apply_services(&[PolicySource {
                source: "bad.yaml".into(),
                content: "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: [{port: 0}]}\n".into(),
            }])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HTTP 400") && err.contains("bad.yaml"),
            "{err}"
        );
        client.delete_service("shop", "web").unwrap();
        assert_eq!(client.services().unwrap(), []);
    }

    /// On a single node, `GET /v1/nodes` lists the node itself (its pod CIDRs, alive,
    /// local) and `DELETE /v1/nodes/{name}` is refused with a 400 saying why.
    #[test]
    fn a_single_node_lists_itself_and_removes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (client, _rt) = serve_agent(single_node(), dir.path());
        let config = AgentConfig::default();
        let nodes = client.nodes().unwrap();
        assert_eq!(nodes.len(), 1, "{nodes:?}");
        let n = &nodes[0];
        assert!(n.local && n.alive, "{n:?}");
        assert!(!n.name.is_empty(), "{n:?}");
        assert_eq!(
            (n.pod_cidr, n.pod_cidr6),
            (config.pod_cidrs.v4, config.pod_cidrs.v6)
        );
        assert_eq!(n.endpoints, 0);
        assert_eq!(n.version, env!("CARGO_PKG_VERSION"));
        assert!(n.heartbeat_unix_ms.is_some());

        let err = client.remove_node("node-2", false).unwrap_err().to_string();
        assert!(
            err.contains("HTTP 400")
                && err.contains("node-2")
                && err.contains("not in cluster mode"),
            "{err}"
        );
        // The identities route answers what the agent knows.
        let ids = client.identities().unwrap();
        assert_eq!(ids, single_node().identities());
    }

    /// What a fake cluster runtime was asked.
    #[derive(Default)]
    struct FakeLink {
        removals: std::sync::Mutex<Vec<(String, bool)>>,
        unreachable: bool,
    }

    impl crate::control::ClusterLink for FakeLink {
        fn resolve_identity(&self, _: &str, _: &crate::policy::Labels) -> Result<u32, String> {
            Err("not in this test".into())
        }
        fn endpoint_published(&self, _: &crate::state::EndpointRecord, _: u32) {}
        fn endpoint_withdrawn(&self, _: &crate::state::EndpointRecord) {}
        fn publish_policies(
            &self,
            _: Vec<crate::policy::Policy>,
            _: Vec<(String, String)>,
        ) -> Result<(), String> {
            Err("not in this test".into())
        }
        fn publish_namespace_labels(
            &self,
            _: &str,
            _: &std::collections::BTreeMap<String, String>,
            _: &[String],
        ) -> Result<crate::policy::Labels, String> {
            Err("not in this test".into())
        }
        fn status(&self) -> hypha_api::ClusterStatus {
            hypha_api::ClusterStatus::default()
        }
        fn nodes(&self) -> Result<Vec<hypha_api::NodeInfo>, String> {
            if self.unreachable {
                return Err("etcd at http://192.0.2.1:2379: connection refused".into());
            }
            Ok(["node-0", "node-1"]
                .iter()
                .map(|name| hypha_api::NodeInfo {
                    name: (*name).into(),
                    addresses: vec!["192.0.2.10".parse().unwrap()],
                    pod_cidr: Some("10.244.7.0/24".parse().unwrap()),
                    pod_cidr6: None,
                    version: "9".into(),
                    heartbeat_unix_ms: Some(1),
                    alive: true,
                    endpoints: 2,
                    local: *name == "node-0",
                    tunnel: None,
                })
                .collect())
        }
        fn remove_node(
            &self,
            name: &str,
            force: bool,
        ) -> Result<hypha_api::RemoveNodeResponse, ControlError> {
            self.removals.lock().unwrap().push((name.to_owned(), force));
            if name == "node-0" {
                return Err(ControlError::Conflict(format!(
                    "node {name} is alive; --force to remove it anyway"
                )));
            }
            Ok(hypha_api::RemoveNodeResponse {
                name: name.to_owned(),
                pod_cidr: Some("10.244.7.0/24".parse().unwrap()),
                pod_cidr6: None,
                endpoints: 2,
            })
        }
    }

    /// In cluster mode the node routes answer what the cluster runtime says, pass
    /// `force` through, and refuse an unknown query key; a store that cannot answer is a
    /// 503.
    #[test]
    fn cluster_mode_node_routes_go_to_the_cluster_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let link = Arc::new(FakeLink::default());
        let agent = single_node();
        agent.set_cluster(link.clone());
        let (client, _rt) = serve_agent(agent, dir.path());

        let nodes = client.nodes().unwrap();
        assert_eq!(
            nodes
                .iter()
                .map(|n| (n.name.as_str(), n.local))
                .collect::<Vec<_>>(),
            [("node-0", true), ("node-1", false)]
        );
        let removed = client.remove_node("node-1", false).unwrap();
        assert_eq!((removed.name.as_str(), removed.endpoints), ("node-1", 2));
        client.remove_node("node/1", true).unwrap();
        let err = client.remove_node("node-0", false).unwrap_err().to_string();
        assert!(err.contains("HTTP 409") && err.contains("alive"), "{err}");
        assert_eq!(
            *link.removals.lock().unwrap(),
            [
                ("node-1".to_owned(), false),
                ("node/1".to_owned(), true),
                ("node-0".to_owned(), false)
            ]
        );

        // A misspelt query key is refused, not taken for "no force".
        let reply = hardening_tests::request(
            &dir.path().join("agent.sock"),
            "DELETE",
            "/v1/nodes/node-1?forse=true",
            None,
        );
        assert_eq!(reply.status, 400, "{reply:?}");
        assert!(reply.error().contains("forse"), "{reply:?}");
        assert_eq!(link.removals.lock().unwrap().len(), 3);

        let dir2 = tempfile::tempdir().unwrap();
        let agent = single_node();
        agent.set_cluster(Arc::new(FakeLink {
            unreachable: true,
            ..FakeLink::default()
        }));
        let (client, _rt2) = serve_agent(agent, dir2.path());
        let err = client.nodes().unwrap_err().to_string();
        assert!(
            err.contains("HTTP 503") && err.contains("connection refused"),
            "{err}"
        );
    }
}
