//! A recording datapath for unit tests of the control plane.

use std::collections::BTreeMap;

use hypha_common::{Counter, DropKey, EndpointStats};

use super::{Adoption, Datapath, InstalledPolicy};
use crate::policy::PolicyDiff;
use crate::state::EndpointRecord;

#[derive(Debug, thiserror::Error)]
#[error("fake datapath: {0}")]
pub struct FakeError(pub String);

/// Keeps attached endpoints by host ifindex; can be told to fail.
#[derive(Default)]
pub struct FakeDatapath {
    pub attached: BTreeMap<u32, EndpointRecord>,
    /// Endpoints an earlier process left attached (by ifindex).
    pub pinned: Vec<u32>,
    pub fail_attach: bool,
    pub log: Vec<String>,
    /// Policy flags of attached endpoints, by endpoint id.
    pub flags: BTreeMap<u32, u32>,
    /// The policy maps as the diffs left them.
    pub policy: InstalledPolicy,
    /// Every diff applied, in order.
    pub diffs: Vec<PolicyDiff>,
    pub fail_apply: bool,
    /// Make every `apply_policy` after this many succeeded ones fail.
    pub fail_apply_after: Option<usize>,
    /// Traced endpoints (by host ifindex).
    pub debug: std::collections::BTreeSet<u32>,
    /// Make `set_debug` fail.
    pub fail_debug: bool,
    /// Make `detach` fail (it still forgets the endpoint, as the real one goes on).
    pub fail_detach: bool,
}

impl FakeDatapath {
    fn note_debug(&mut self, ifindex: u32, on: bool) {
        if on {
            self.debug.insert(ifindex);
        } else {
            self.debug.remove(&ifindex);
        }
    }
}

impl Datapath for FakeDatapath {
    type Error = FakeError;

    fn attach(&mut self, ep: &EndpointRecord, policy_flags: u32) -> Result<(), FakeError> {
        self.log.push(format!("attach {}", ep.host_ifname));
        if self.fail_attach {
            return Err(FakeError(format!("cannot attach to {}", ep.host_ifname)));
        }
        self.attached.insert(ep.host_ifindex, ep.clone());
        self.flags.insert(ep.id, policy_flags);
        self.note_debug(ep.host_ifindex, ep.debug);
        Ok(())
    }

    fn adopt(&mut self, ep: &EndpointRecord, policy_flags: u32) -> Result<Adoption, FakeError> {
        self.log.push(format!("adopt {}", ep.host_ifname));
        let was_pinned = self.pinned.contains(&ep.host_ifindex);
        self.attached.insert(ep.host_ifindex, ep.clone());
        self.flags.insert(ep.id, policy_flags);
        self.note_debug(ep.host_ifindex, ep.debug);
        Ok(if was_pinned {
            Adoption::Adopted
        } else {
            Adoption::Reattached
        })
    }

    fn detach(&mut self, ep: &EndpointRecord) -> Vec<FakeError> {
        self.log.push(format!("detach {}", ep.host_ifname));
        self.attached.remove(&ep.host_ifindex);
        self.flags.remove(&ep.id);
        self.debug.remove(&ep.host_ifindex);
        if self.fail_detach {
            return vec![FakeError(format!("cannot detach from {}", ep.host_ifname))];
        }
        Vec::new()
    }

    fn set_debug(&mut self, ep: &EndpointRecord, on: bool) -> Result<(), FakeError> {
        self.log.push(format!("set_debug {} {on}", ep.host_ifname));
        if self.fail_debug {
            return Err(FakeError(format!("cannot trace {}", ep.host_ifname)));
        }
        if !self.attached.contains_key(&ep.host_ifindex) {
            return Err(FakeError(format!("{} is not attached", ep.host_ifname)));
        }
        self.note_debug(ep.host_ifindex, on);
        Ok(())
    }

    fn set_flags(&mut self, ep: &EndpointRecord, mask: u32, flags: u32) -> Result<(), FakeError> {
        self.log
            .push(format!("set_flags {} {mask:#x} {flags:#x}", ep.host_ifname));
        let f = self
            .flags
            .get_mut(&ep.id)
            .ok_or_else(|| FakeError(format!("{} is not attached", ep.host_ifname)))?;
        *f = (*f & !mask) | (flags & mask);
        Ok(())
    }

    fn apply_policy(&mut self, diff: &PolicyDiff) -> Result<(), FakeError> {
        if self.fail_apply || self.fail_apply_after.is_some_and(|n| self.diffs.len() >= n) {
            return Err(FakeError("cannot write the policy maps".into()));
        }
        self.log.push("apply_policy".into());
        // The documented order.
        self.policy.ipcache.extend(diff.ipcache_set.iter().copied());
        self.policy.entries.extend(diff.entries_set.iter().copied());
        for (id, flags) in &diff.flags_set {
            // Like the real maps: only attached endpoints have flags to change.
            if let Some(f) = self.flags.get_mut(id) {
                let mask = hypha_common::ENDPOINT_F_POLICY_MASK;
                *f = (*f & !mask) | (*flags & mask);
            }
        }
        for k in &diff.entries_del {
            self.policy.entries.remove(k);
        }
        for n in &diff.ipcache_del {
            self.policy.ipcache.remove(n);
        }
        self.diffs.push(diff.clone());
        Ok(())
    }

    fn installed_policy(&self) -> Result<InstalledPolicy, FakeError> {
        Ok(self.policy.clone())
    }

    fn check(&self, ep: &EndpointRecord) -> Vec<String> {
        if self.attached.get(&ep.host_ifindex) == Some(ep) {
            Vec::new()
        } else {
            vec![format!("{} is not attached", ep.host_ifname)]
        }
    }

    fn sweep(&mut self, keep: &[EndpointRecord]) -> Vec<FakeError> {
        self.pinned
            .retain(|i| keep.iter().any(|k| k.host_ifindex == *i));
        self.log.push("sweep".into());
        Vec::new()
    }

    fn stats(&self, ifindex: u32) -> Result<EndpointStats, FakeError> {
        let mut s = EndpointStats::default();
        if self.attached.contains_key(&ifindex) {
            s.egress.redirected = Counter {
                packets: 1,
                bytes: 100,
            };
        }
        Ok(s)
    }

    fn drops(&self) -> Result<Vec<(DropKey, Counter)>, FakeError> {
        Ok(Vec::new())
    }

    fn programs(&self) -> Vec<String> {
        vec!["fake".into()]
    }
}
