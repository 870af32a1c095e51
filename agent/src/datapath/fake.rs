//! A recording datapath for unit tests of the control plane.

use std::collections::BTreeMap;

use hypha_common::{Counter, DropKey, EndpointStats};

use super::{Adoption, Datapath};
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
}

impl Datapath for FakeDatapath {
    type Error = FakeError;

    fn attach(&mut self, ep: &EndpointRecord) -> Result<(), FakeError> {
        self.log.push(format!("attach {}", ep.host_ifname));
        if self.fail_attach {
            return Err(FakeError(format!("cannot attach to {}", ep.host_ifname)));
        }
        self.attached.insert(ep.host_ifindex, ep.clone());
        Ok(())
    }

    fn adopt(&mut self, ep: &EndpointRecord) -> Result<Adoption, FakeError> {
        self.log.push(format!("adopt {}", ep.host_ifname));
        let was_pinned = self.pinned.contains(&ep.host_ifindex);
        self.attached.insert(ep.host_ifindex, ep.clone());
        Ok(if was_pinned {
            Adoption::Adopted
        } else {
            Adoption::Reattached
        })
    }

    fn detach(&mut self, ep: &EndpointRecord) -> Vec<FakeError> {
        self.log.push(format!("detach {}", ep.host_ifname));
        self.attached.remove(&ep.host_ifindex);
        Vec::new()
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
