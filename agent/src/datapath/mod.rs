//! The datapath as the control plane sees it: a small trait with an eBPF implementation
//! (`ebpf.rs`, needs root) and a recording fake (`fake.rs`), so that the control plane is
//! unit-tested without privileges.

pub mod debug_log;
mod ebpf;
mod endpoint_maps;
#[cfg(test)]
pub mod fake;
mod link_info;
pub mod policy_maps;

use hypha_common::{DropKey, EndpointStats};

pub use ebpf::{EbpfDatapath, EbpfError};

use crate::policy::PolicyDiff;
use crate::state::EndpointRecord;

/// The policy contents of the datapath's maps, as read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstalledPolicy {
    /// `hypha_ipcache4` and `hypha_ipcache6` together.
    pub ipcache: std::collections::BTreeMap<ipnet::IpNet, u32>,
    pub entries: std::collections::BTreeMap<hypha_common::PolicyKey, hypha_common::PolicyEntry>,
}

/// What became of an endpoint found at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// Its programs were still attached; they now run this agent's programs, in place,
    /// without a moment of detachment.
    Adopted,
    /// Its attachments were gone and have been made anew.
    Reattached,
}

/// The datapath operations the control plane needs. Shared between threads: every
/// operation takes `&self`, and operations on different endpoints may run at once (an
/// implementation keeps its own state consistent and holds no lock across a wait in the
/// kernel).
pub trait Datapath: Send + Sync {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Attaches the programs to the endpoint's host veth and fills its map entries;
    /// `flags` (`ENDPOINT_F_*`: its policy's and its bandwidth's, OR-ed by the control
    /// plane) go into its `EndpointInfo::flags`. The endpoint's policy entries and ipcache
    /// entries are already in place (see [`PolicyDiff`]).
    fn attach(&self, ep: &EndpointRecord, flags: u32) -> Result<(), Self::Error>;

    /// Takes over an endpoint that was attached by an earlier agent process, with its
    /// current flags (as for `attach`).
    fn adopt(&self, ep: &EndpointRecord, flags: u32) -> Result<Adoption, Self::Error>;

    /// Sets the bits of `mask` in the endpoint's `EndpointInfo::flags` to those of
    /// `flags`, leaving the other bits as they are (the bandwidth code changes
    /// `ENDPOINT_F_INGRESS_LIMIT` this way without touching the policy bits).
    fn set_flags(&self, ep: &EndpointRecord, mask: u32, flags: u32) -> Result<(), Self::Error>;

    /// Turns the tracing of the endpoint's packets by the programs on or off (its
    /// lines go to the agent's log). `attach` and `adopt` take it from `ep.debug`.
    fn set_debug(&self, ep: &EndpointRecord, on: bool) -> Result<(), Self::Error>;

    /// Applies a policy diff to the ipcache, the policy map and the attached endpoints'
    /// flags, in the order [`PolicyDiff`] documents. Only the policy bits
    /// (`ENDPOINT_F_POLICY_MASK`) of the flags are written; the others are kept.
    fn apply_policy(&self, diff: &PolicyDiff) -> Result<(), Self::Error>;

    /// What the ipcache and the policy map hold now (an earlier agent's work, at start),
    /// so that the first diff also removes what no policy wants any more. The default
    /// says "nothing", which only leaves stale entries behind.
    fn installed_policy(&self) -> Result<InstalledPolicy, Self::Error> {
        Ok(InstalledPolicy::default())
    }

    /// Flows decided per policy id, summed over CPUs.
    fn policy_stats(&self) -> Result<Vec<(u32, hypha_common::PolicyStats)>, Self::Error> {
        Ok(Vec::new())
    }

    /// Removes everything `attach` made; keeps going past errors and returns them all.
    fn detach(&self, ep: &EndpointRecord) -> Vec<Self::Error>;

    /// What of `ep` is missing or different in the datapath (empty when all is in place).
    fn check(&self, ep: &EndpointRecord) -> Vec<String>;

    /// Removes map entries and pinned links that belong to none of `keep`.
    fn sweep(&self, keep: &[EndpointRecord]) -> Vec<Self::Error>;

    /// Counters of the endpoint on host ifindex `ifindex`, summed over CPUs.
    fn stats(&self, ifindex: u32) -> Result<EndpointStats, Self::Error>;

    /// All drop counters, summed over CPUs.
    fn drops(&self) -> Result<Vec<(DropKey, hypha_common::Counter)>, Self::Error>;

    /// Names of the loaded programs.
    fn programs(&self) -> Vec<String>;
}
