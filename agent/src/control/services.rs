//! Services in the control plane: the service documents the agent holds (from the API,
//! its watched directory or the cluster store), their ClusterIPs and NodePorts, the
//! backends the cluster's endpoints give them, and the load-balancer maps that follow.
//!
//! SCAFFOLD: the method signatures are decided (the server, the CLI and the watched
//! directory call them); the service control work fills them in.

use std::net::IpAddr;
use std::path::Path;

use hypha_api::{ApplyServicesResponse, PolicySource, ServiceInfo};

use super::{Agent, ControlError};
use crate::datapath::Datapath;
use crate::host::HostNetwork;

impl<D: Datapath, H: HostNetwork> Agent<D, H> {
    /// `POST /v1/services`: parses every file (whole files or nothing), assigns
    /// ClusterIPs and NodePorts, stores the services (the cluster store in cluster mode)
    /// and returns once this node's maps hold them. Sources are `api: <file>`.
    pub fn apply_services(
        &self,
        files: &[PolicySource],
    ) -> Result<ApplyServicesResponse, ControlError> {
        // SCAFFOLD
        let _ = files;
        Err(ControlError::BadRequest(
            "services are not implemented yet".to_owned(),
        ))
    }

    /// The watched directory: `path` now holds `content` (`None`: the file is gone).
    /// Everything that came from `path` before is replaced by what it holds now (whole
    /// file or nothing: a refused file keeps what it gave before). Returns the
    /// `namespace/name`s now from `path`.
    pub fn sync_service_file(
        &self,
        path: &Path,
        content: Option<&str>,
    ) -> Result<Vec<String>, ControlError> {
        // SCAFFOLD
        let _ = (path, content);
        Ok(Vec::new())
    }

    /// `DELETE /v1/services/{namespace}/{name}`: removes the service (or the
    /// `EndpointSlice` of that name when no service has it) and its frontends.
    pub fn delete_service(&self, namespace: &str, name: &str) -> Result<(), ControlError> {
        // SCAFFOLD
        Err(ControlError::NotFound(format!(
            "service {namespace}/{name}"
        )))
    }

    /// `GET /v1/services`: every service with its ports, backends and counters.
    pub fn list_services(&self) -> Vec<ServiceInfo> {
        // SCAFFOLD
        Vec::new()
    }

    /// The service a translated flow went to, for `hypha monitor`: `namespace/name
    /// VIP:port` of the frontend whose backend is `addr:port`/`proto`, if any.
    pub fn service_of_backend(&self, addr: IpAddr, port: u16, proto: u8) -> Option<String> {
        // SCAFFOLD
        let _ = (addr, port, proto);
        None
    }

    /// The addresses of the node's NodePort devices: NodePort frontends are programmed
    /// on each. Re-plans the frontends.
    pub fn set_nodeport_addresses(&self, addresses: Vec<IpAddr>) {
        // SCAFFOLD
        let _ = addresses;
    }

    /// Prometheus text of the services' counters (`hypha_service_backend_*`).
    pub fn service_metrics(&self) -> String {
        // SCAFFOLD
        String::new()
    }
}
