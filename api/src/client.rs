//! A blocking client for the agent's unix socket, for the CLI and the CNI plugin.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::{
    AllocateRequest, Allocation, ApiError, ApplyPoliciesResponse, ApplyServicesResponse, Bandwidth,
    CreateEndpointRequest, DebugRequest, DeleteResponse, Endpoint, EndpointCheck,
    EndpointLabelsRequest, EndpointPolicy, EndpointPortsRequest, GcRequest, GcResponse,
    IdentityInfo, NamedPort, NamespaceLabels, NamespaceLabelsRequest, NodeInfo, PolicySource,
    PolicySummary, RemoveNodeResponse, ServiceInfo, Status,
};

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket (the agent is not running) or it cannot be opened.
    #[error("cannot reach the hypha agent at {path}: {source} (is `hypha agent` running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent did not answer in time.
    #[error("the hypha agent at {path} did not answer {method} {uri} within {timeout:?}")]
    Timeout {
        path: PathBuf,
        method: Method,
        uri: String,
        timeout: Duration,
    },
    /// The HTTP exchange failed part way.
    #[error("{method} {uri} to the hypha agent at {path} failed: {source}")]
    Http {
        path: PathBuf,
        method: Method,
        uri: String,
        #[source]
        source: hyper::Error,
    },
    /// The agent answered with an error.
    #[error("the hypha agent refused {method} {uri}: {message} (HTTP {status})")]
    Api {
        method: Method,
        uri: String,
        status: StatusCode,
        message: String,
    },
    /// The answer was not the JSON expected.
    #[error("cannot decode the hypha agent's answer to {method} {uri}: {source}")]
    Decode {
        method: Method,
        uri: String,
        #[source]
        source: serde_json::Error,
    },
    /// The local async runtime could not be built.
    #[error("cannot start the client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl ClientError {
    /// Whether the agent could not be reached at all (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Timeout { .. }
        )
    }
}

/// A blocking client: each call opens a connection, sends one request and reads the answer.
pub struct Client {
    path: PathBuf,
    timeout: Duration,
    /// Sent as [`crate::ATTACHMENT_LOCKED_AT`] with every request, when set.
    locked_at: Option<u64>,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    /// A client for the agent listening on `path`, with a 30 s timeout per call.
    pub fn new(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(Self {
            path: path.as_ref().to_path_buf(),
            timeout: Duration::from_secs(30),
            locked_at: None,
            runtime,
        })
    }

    /// Changes the per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends, with every request, that this invocation took its attachment's lock at
    /// `at` (nanoseconds of [`crate::boottime_ns`]).
    pub fn with_attachment_locked_at(mut self, at: u64) -> Self {
        self.locked_at = Some(at);
        self
    }

    pub fn socket(&self) -> &Path {
        &self.path
    }

    pub fn status(&self) -> Result<Status, ClientError> {
        self.call(Method::GET, "/v1/status", None::<&()>)
    }

    /// What the agent's state store holds (`GET /v1/state`), in the agent's own type.
    pub fn state<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        self.call(Method::GET, "/v1/state", None::<&()>)
    }

    pub fn endpoints(&self) -> Result<Vec<Endpoint>, ClientError> {
        self.call(Method::GET, "/v1/endpoints", None::<&()>)
    }

    pub fn allocate(&self, req: &AllocateRequest) -> Result<Allocation, ClientError> {
        self.call(Method::POST, "/v1/ipam/allocate", Some(req))
    }

    pub fn create_endpoint(&self, req: &CreateEndpointRequest) -> Result<Endpoint, ClientError> {
        self.call(Method::POST, "/v1/endpoints", Some(req))
    }

    /// The endpoint of one attachment with the datapath's health (`404` when unknown).
    pub fn check_endpoint(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<EndpointCheck, ClientError> {
        let uri = endpoint_uri(container_id, ifname);
        self.call(Method::GET, &uri, None::<&()>)
    }

    /// The cluster's nodes (`GET /v1/nodes`); on a single node, the node itself.
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, ClientError> {
        self.call(Method::GET, "/v1/nodes", None::<&()>)
    }

    /// Removes node `name` from the cluster store (`DELETE /v1/nodes/{name}`); refused
    /// while its heartbeat is fresh unless `force`.
    pub fn remove_node(&self, name: &str, force: bool) -> Result<RemoveNodeResponse, ClientError> {
        let mut uri = format!("/v1/nodes/{}", percent_encode(name));
        if force {
            uri.push_str("?force=true");
        }
        self.call(Method::DELETE, &uri, None::<&()>)
    }

    /// The security identities the node knows (`GET /v1/identities`).
    pub fn identities(&self) -> Result<Vec<IdentityInfo>, ClientError> {
        self.call(Method::GET, "/v1/identities", None::<&()>)
    }

    /// Removes everything that belongs to no valid attachment.
    pub fn gc(&self, req: &GcRequest) -> Result<GcResponse, ClientError> {
        self.call(Method::POST, "/v1/gc", Some(req))
    }

    pub fn delete_endpoint(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<DeleteResponse, ClientError> {
        let uri = endpoint_uri(container_id, ifname);
        self.call(Method::DELETE, &uri, None::<&()>)
    }

    /// Applies policy files, all or nothing: the agent parses them and refuses them all
    /// if any is invalid.
    pub fn apply_policies(
        &self,
        files: &[PolicySource],
    ) -> Result<ApplyPoliciesResponse, ClientError> {
        self.call(Method::POST, "/v1/policies", Some(&files))
    }

    pub fn policies(&self) -> Result<Vec<PolicySummary>, ClientError> {
        self.call(Method::GET, "/v1/policies", None::<&()>)
    }

    /// Deletes policy `namespace/name` (`404` when there is none).
    pub fn delete_policy(&self, namespace: &str, name: &str) -> Result<PolicySummary, ClientError> {
        let uri = format!(
            "/v1/policies/{}/{}",
            percent_encode(namespace),
            percent_encode(name)
        );
        self.call(Method::DELETE, &uri, None::<&()>)
    }

    /// Applies service files (`Service`, `EndpointSlice`; YAML or JSON), all or nothing:
    /// the agent refuses them all if any is invalid or a ClusterIP or NodePort is taken.
    pub fn apply_services(
        &self,
        files: &[PolicySource],
    ) -> Result<ApplyServicesResponse, ClientError> {
        self.call(Method::POST, "/v1/services", Some(&files))
    }

    /// Every service with its ports, backends and counters.
    pub fn services(&self) -> Result<Vec<ServiceInfo>, ClientError> {
        self.call(Method::GET, "/v1/services", None::<&()>)
    }

    /// Deletes service `namespace/name` (or the `EndpointSlice` of that name when no
    /// service has it); `404` when there is neither.
    pub fn delete_service(&self, namespace: &str, name: &str) -> Result<(), ClientError> {
        let uri = format!(
            "/v1/services/{}/{}",
            percent_encode(namespace),
            percent_encode(name)
        );
        self.call::<_, serde::de::IgnoredAny>(Method::DELETE, &uri, None::<&()>)
            .map(|_| ())
    }

    /// What an endpoint (by id, container id or a unique prefix of one) enforces.
    pub fn endpoint_policy(&self, endpoint: &str) -> Result<EndpointPolicy, ClientError> {
        let uri = format!("/v1/endpoints/{}/policy", percent_encode(endpoint));
        self.call(Method::GET, &uri, None::<&()>)
    }

    /// Sets (replaces) the bandwidth limits of an endpoint (by id, container id or a
    /// unique prefix of one); an empty [`Bandwidth`] removes them.
    pub fn set_bandwidth(&self, endpoint: &str, bw: &Bandwidth) -> Result<Endpoint, ClientError> {
        let uri = format!("/v1/endpoints/{}/bandwidth", percent_encode(endpoint));
        self.call(Method::PUT, &uri, Some(bw))
    }

    /// Turns the datapath's tracing of an endpoint's packets (by id, container id or a
    /// unique prefix of one) on or off.
    pub fn set_debug(&self, endpoint: &str, enabled: bool) -> Result<Endpoint, ClientError> {
        let uri = format!("/v1/endpoints/{}/debug", percent_encode(endpoint));
        self.call(Method::PUT, &uri, Some(&DebugRequest { enabled }))
    }

    /// Sets and removes labels of a running endpoint (by id, container id or a unique
    /// prefix of one).
    pub fn set_endpoint_labels(
        &self,
        endpoint: &str,
        req: &EndpointLabelsRequest,
    ) -> Result<Endpoint, ClientError> {
        let uri = format!("/v1/endpoints/{}/labels", percent_encode(endpoint));
        self.call(Method::PUT, &uri, Some(req))
    }

    /// Replaces the named ports of an endpoint (by id, container id or a unique prefix
    /// of one).
    pub fn set_endpoint_ports(
        &self,
        endpoint: &str,
        ports: &[NamedPort],
    ) -> Result<Endpoint, ClientError> {
        let uri = format!("/v1/endpoints/{}/ports", percent_encode(endpoint));
        let req = EndpointPortsRequest {
            ports: ports.to_vec(),
        };
        self.call(Method::PUT, &uri, Some(&req))
    }

    pub fn set_namespace_labels(
        &self,
        namespace: &str,
        req: &NamespaceLabelsRequest,
    ) -> Result<NamespaceLabels, ClientError> {
        let uri = format!("/v1/namespaces/{}/labels", percent_encode(namespace));
        self.call(Method::PUT, &uri, Some(req))
    }

    /// Streams `GET /v1/monitor` (events as they happen), calling `on_event` for each
    /// until it returns `false` or the agent closes the stream. No timeout applies.
    pub fn monitor(
        &self,
        endpoint: Option<u32>,
        kind: Option<&str>,
        mut on_event: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        let mut uri = String::from("/v1/monitor?");
        if let Some(id) = endpoint {
            uri.push_str(&format!("endpoint={id}&"));
        }
        if let Some(kind) = kind {
            uri.push_str(&format!("type={}", percent_encode(kind)));
        }
        let method = Method::GET;
        self.runtime.block_on(async {
            let (resp, conn) = self.send(method.clone(), &uri, Vec::new()).await?;
            let status = resp.status();
            let mut body = resp.into_body();
            let http_err = |source| ClientError::Http {
                path: self.path.clone(),
                method: method.clone(),
                uri: uri.clone(),
                source,
            };
            if !status.is_success() {
                let bytes = body.collect().await.map_err(http_err)?.to_bytes();
                conn.abort();
                return Err(api_error(method.clone(), &uri, status, &bytes));
            }
            let mut pending = Vec::new();
            'frames: while let Some(frame) = body.frame().await {
                let frame = frame.map_err(http_err)?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                pending.extend_from_slice(data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    if !on_event(String::from_utf8_lossy(&line[..end]).trim()) {
                        break 'frames;
                    }
                }
            }
            conn.abort();
            Ok(())
        })
    }

    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        uri: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = match body {
            // Serializing our own request types cannot fail: they are plain data.
            Some(b) => serde_json::to_vec(b).expect("API request types serialize"),
            None => Vec::new(),
        };
        let fut = self.exchange(method.clone(), uri, body);
        let (status, bytes) = self
            .runtime
            .block_on(async { tokio::time::timeout(self.timeout, fut).await })
            .map_err(|_| ClientError::Timeout {
                path: self.path.clone(),
                method: method.clone(),
                uri: uri.to_owned(),
                timeout: self.timeout,
            })??;
        if !status.is_success() {
            return Err(api_error(method, uri, status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            method,
            uri: uri.to_owned(),
            source,
        })
    }

    /// Connects, sends one request and returns the answer's head with the connection task,
    /// which the caller aborts once it has read what it wants.
    async fn send(
        &self,
        method: Method,
        uri: &str,
        body: Vec<u8>,
    ) -> Result<
        (
            hyper::Response<hyper::body::Incoming>,
            tokio::task::JoinHandle<()>,
        ),
        ClientError,
    > {
        let http_err = |source| ClientError::Http {
            path: self.path.clone(),
            method: method.clone(),
            uri: uri.to_owned(),
            source,
        };
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_err)?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(hyper::header::HOST, "hypha")
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(at) = self.locked_at {
            req = req.header(crate::ATTACHMENT_LOCKED_AT, at);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .expect("request parts are valid");
        let resp = sender.send_request(req).await.map_err(http_err)?;
        Ok((resp, conn))
    }

    async fn exchange(
        &self,
        method: Method,
        uri: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let (resp, conn) = self.send(method.clone(), uri, body).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|source| ClientError::Http {
                path: self.path.clone(),
                method,
                uri: uri.to_owned(),
                source,
            })?
            .to_bytes();
        conn.abort();
        Ok((status, bytes))
    }
}

/// The error of an answer with a failure status: the agent's `ApiError` message, or the
/// body as text when it is not one.
fn api_error(method: Method, uri: &str, status: StatusCode, bytes: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ApiError>(bytes)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned());
    ClientError::Api {
        method,
        uri: uri.to_owned(),
        status,
        message,
    }
}

fn endpoint_uri(container_id: &str, ifname: &str) -> String {
    format!(
        "/v1/endpoints/{}/{}",
        percent_encode(container_id),
        percent_encode(ifname)
    )
}

/// Escapes a path segment: container ids are usually hex, but runtimes may send anything.
fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on a fresh socket that, for every connection, reads the request and then
    /// does `then` with the stream (kept alive by the thread until the test ends).
    fn fake_server(
        name: &str,
        then: fn(&mut std::os::unix::net::UnixStream),
    ) -> (PathBuf, std::thread::JoinHandle<()>) {
        use std::io::Read;
        let dir = std::env::temp_dir().join(format!("hypha-client-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0);
            then(&mut stream);
            std::thread::sleep(Duration::from_secs(3));
        });
        (socket, handle)
    }

    /// Every part of a call is under the one timeout: here the head of the answer comes
    /// and its body stalls.
    #[test]
    fn a_stalled_body_times_out_naming_the_socket_and_the_call() {
        use std::io::Write;
        let (socket, _server) = fake_server("stall", |s| {
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"a\"")
                .unwrap();
        });
        let client = Client::new(&socket)
            .unwrap()
            .with_timeout(Duration::from_millis(500));
        let start = std::time::Instant::now();
        let e = client.status().unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
        assert!(e.is_unreachable());
        let msg = e.to_string();
        assert!(
            msg.contains(&socket.display().to_string()) && msg.contains("GET /v1/status"),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(socket.parent().unwrap());
    }

    /// A server that goes away after reading the request: an HTTP error naming the call,
    /// not a timeout (callers tell the two apart).
    #[test]
    fn a_connection_closed_mid_call_is_an_http_error() {
        let (socket, server) = fake_server("close", |s| {
            s.shutdown(std::net::Shutdown::Both).unwrap();
        });
        let client = Client::new(&socket)
            .unwrap()
            .with_timeout(Duration::from_secs(2));
        let e = client.delete_endpoint("c", "eth0").unwrap_err();
        assert!(matches!(e, ClientError::Http { .. }), "{e:?}");
        assert!(e.to_string().contains("DELETE /v1/endpoints/c/eth0"), "{e}");
        drop(server);
        let _ = std::fs::remove_dir_all(socket.parent().unwrap());
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(percent_encode("abc-123_x.y"), "abc-123_x.y");
        assert_eq!(percent_encode("a/b c"), "a%2Fb%20c");
    }
}
