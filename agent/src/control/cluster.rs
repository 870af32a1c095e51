//! The control plane in cluster mode: what the agent asks of the cluster runtime
//! ([`ClusterLink`], implemented by `crate::cluster::Runtime` over the store and by a
//! fake in the tests), and what the runtime tells the agent (remote endpoints, cluster
//! identities, policies and namespace labels, each as a batch or as a full resync).
//!
//! On a single node there is no link: identities are allocated locally, policies and
//! namespace labels are applied locally, as before.
//!
//! SCAFFOLD (issue 12): the trait and the method signatures are decided; the bodies marked
//! so are written by the helper "agent-core".

use std::collections::BTreeMap;

use hypha_api::{ClusterStatus, IdentityInfo, NodeInfo, RemoveNodeResponse};
use hypha_cluster::layout::EndpointEntry;

use super::{Agent, ControlError};
use crate::datapath::Datapath;
use crate::host::HostNetwork;
use crate::policy::{Labels, Policy};
use crate::state::EndpointRecord;

/// What the agent needs from the cluster runtime. Every method may block (it runs on the
/// request's blocking thread), but never while the agent holds its table or policy lock.
pub trait ClusterLink: Send + Sync {
    /// The cluster-wide number of (namespace, labels): known ones at once (from the
    /// runtime's mirror), new ones allocated in the store; while the store is unreachable
    /// an unknown label set waits a bounded time, then fails with a message that says so.
    fn resolve_identity(&self, namespace: &str, labels: &Labels) -> Result<u32, String>;

    /// A local endpoint was created (or relabelled): publish it. Must not wait for the
    /// store: the runtime queues the write and retries it until the store has it.
    fn endpoint_published(&self, ep: &EndpointRecord, identity: u32);

    /// A local endpoint was deleted: withdraw it (queued, as above).
    fn endpoint_withdrawn(&self, ep: &EndpointRecord);

    /// Writes policies (already validated) to the store in one transaction and waits
    /// until this agent enforces them; `deletes` are (namespace, name).
    fn publish_policies(
        &self,
        policies: Vec<Policy>,
        deletes: Vec<(String, String)>,
    ) -> Result<(), String>;

    /// Sets (and removes) labels of a namespace in the store and waits until this agent
    /// has them; returns the namespace's labels after the change.
    fn publish_namespace_labels(
        &self,
        namespace: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Labels, String>;

    fn status(&self) -> ClusterStatus;

    fn nodes(&self) -> Result<Vec<NodeInfo>, String>;

    fn remove_node(&self, name: &str, force: bool) -> Result<RemoveNodeResponse, ControlError>;
}

/// An endpoint of another node, as the store has it; `key` is its store key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteEndpoint {
    pub key: String,
    pub entry: EndpointEntry,
}

/// A batch the runtime applies: changes, or (with `resync`) the whole set, everything
/// not in it removed (mark and sweep: entries present before and after stay in the maps
/// throughout).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteBatch<T> {
    pub upserts: Vec<T>,
    /// Keys removed (ignored with `resync`).
    pub removes: Vec<String>,
    pub resync: bool,
}

impl<D: Datapath, H: HostNetwork> Agent<D, H> {
    /// Links the agent to the cluster runtime (once, right after start, before the API
    /// serves).
    pub fn set_cluster(&self, link: std::sync::Arc<dyn ClusterLink>) {
        let _ = self.cluster.set(link);
    }

    pub(super) fn cluster(&self) -> Option<&std::sync::Arc<dyn ClusterLink>> {
        self.cluster.get()
    }

    /// Cluster identities known from the store: `(number, namespace, labels)`. The
    /// engine records them so that remote endpoints and local ones of those labels get
    /// these numbers (SCAFFOLD: body by "agent-core").
    pub fn apply_cluster_identities(
        &self,
        batch: RemoteBatch<(u32, String, Labels)>,
    ) -> Result<(), ControlError> {
        let _ = batch;
        Ok(())
    }

    /// Endpoints of other nodes: their addresses go into the ipcache with their
    /// identities, and the policy engine sees them as peers (SCAFFOLD: body by
    /// "agent-core").
    pub fn apply_remote_endpoints(
        &self,
        batch: RemoteBatch<RemoteEndpoint>,
    ) -> Result<(), ControlError> {
        let _ = batch;
        Ok(())
    }

    /// Policies of the store (keys `namespace/name`), enforced like applied ones
    /// (SCAFFOLD: body by "agent-core").
    pub fn apply_cluster_policies(&self, batch: RemoteBatch<Policy>) -> Result<(), ControlError> {
        let _ = batch;
        Ok(())
    }

    /// Namespace labels of the store, by namespace (SCAFFOLD: body by "agent-core").
    pub fn apply_cluster_namespaces(
        &self,
        batch: RemoteBatch<(String, Labels)>,
    ) -> Result<(), ControlError> {
        let _ = batch;
        Ok(())
    }

    /// Every local endpoint with its identity, for the runtime to publish (at start and
    /// after a resync of its own keys).
    pub fn local_endpoints(&self) -> Vec<(EndpointRecord, Option<u32>)> {
        let endpoints: Vec<EndpointRecord> = self.table().endpoints.values().cloned().collect();
        let p = self.policy();
        endpoints
            .into_iter()
            .map(|ep| {
                let id = p.engine.identity_of(ep.id);
                (ep, id)
            })
            .collect()
    }

    /// The identities this node knows, for `hypha identity list` (SCAFFOLD: body by
    /// "agent-core").
    pub fn identities(&self) -> Vec<IdentityInfo> {
        Vec::new()
    }

    /// How many remote endpoints the engine holds (status).
    pub fn remote_endpoint_count(&self) -> usize {
        0
    }
}
