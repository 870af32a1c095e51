//! A recording datapath for unit tests of the control plane.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use hypha_common::{Counter, DropKey, EndpointStats, NodeStats};

use super::{
    Adoption, Datapath, InstalledLb, InstalledPolicy, LbDiff, TunnelPeerSpec, TunnelSetup,
};
use crate::policy::PolicyDiff;
use crate::state::EndpointRecord;

#[derive(Debug, thiserror::Error)]
#[error("fake datapath: {0}")]
pub struct FakeError(pub String);

/// Keeps attached endpoints by host ifindex; can be told to fail. Its state sits behind
/// a lock (the trait takes `&self`); tests read and change it through [`Self::state`].
#[derive(Default)]
pub struct FakeDatapath(Mutex<FakeState>);

impl From<FakeState> for FakeDatapath {
    fn from(state: FakeState) -> Self {
        Self(Mutex::new(state))
    }
}

impl FakeDatapath {
    /// What the fake recorded, and its failure switches. A test that panicked while
    /// holding it leaves it as it was.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a [`FakeDatapath`] recorded, and its failure switches.
#[derive(Default)]
pub struct FakeState {
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
    /// When set, `attach` to that host interface waits (without holding the fake's
    /// state) until the gate is released, as a real attach waits for the kernel.
    pub attach_gate: Option<(String, Gate)>,
    /// The tunnel as `set_tunnel` last left it.
    pub tunnel: Option<TunnelSetup>,
    /// The tunnel peers as `set_tunnel_peers` last left them, by node id.
    pub peers: BTreeMap<u32, TunnelPeerSpec>,
    /// What `node_stats` answers.
    pub node_stats: BTreeMap<u32, NodeStats>,
    /// The load balancer's maps as the diffs left them.
    pub lb: InstalledLb,
    /// Backend counters (created zeroed with a backend, removed with it).
    pub lb_stats: BTreeMap<u32, hypha_common::lb::LbBackendStats>,
    /// How many `apply_lb` calls, and how many entries they wrote or removed.
    pub lb_applies: usize,
    pub lb_writes: usize,
    /// Make `apply_lb` fail.
    pub fail_lb: bool,
}

/// Holds the fake's attaches until released (or dropped).
#[derive(Clone, Default)]
pub struct Gate(std::sync::Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    fn wait(&self) {
        let (open, cv) = &*self.0;
        let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
        while !*open {
            open = cv.wait(open).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Lets every held and later attach through.
    pub fn release(&self) {
        let (open, cv) = &*self.0;
        *open.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_all();
    }
}

impl FakeState {
    /// Makes `attach` to `host_ifname` wait until the returned gate is released.
    pub fn hold_attach(&mut self, host_ifname: &str) -> Gate {
        let gate = Gate::default();
        self.attach_gate = Some((host_ifname.to_owned(), gate.clone()));
        gate
    }

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

    fn attach(&self, ep: &EndpointRecord, policy_flags: u32) -> Result<(), FakeError> {
        let gate = {
            let mut st = self.state();
            st.log.push(format!("attach {}", ep.host_ifname));
            st.attach_gate
                .clone()
                .filter(|(name, _)| *name == ep.host_ifname)
                .map(|(_, gate)| gate)
        };
        if let Some(gate) = gate {
            gate.wait();
        }
        let mut st = self.state();
        if st.fail_attach {
            return Err(FakeError(format!("cannot attach to {}", ep.host_ifname)));
        }
        st.attached.insert(ep.host_ifindex, ep.clone());
        st.flags.insert(ep.id, policy_flags);
        st.note_debug(ep.host_ifindex, ep.debug);
        Ok(())
    }

    fn adopt(&self, ep: &EndpointRecord, policy_flags: u32) -> Result<Adoption, FakeError> {
        let mut st = self.state();
        st.log.push(format!("adopt {}", ep.host_ifname));
        let was_pinned = st.pinned.contains(&ep.host_ifindex);
        st.attached.insert(ep.host_ifindex, ep.clone());
        st.flags.insert(ep.id, policy_flags);
        st.note_debug(ep.host_ifindex, ep.debug);
        Ok(if was_pinned {
            Adoption::Adopted
        } else {
            Adoption::Reattached
        })
    }

    fn detach(&self, ep: &EndpointRecord) -> Vec<FakeError> {
        let mut st = self.state();
        st.log.push(format!("detach {}", ep.host_ifname));
        st.attached.remove(&ep.host_ifindex);
        st.flags.remove(&ep.id);
        st.debug.remove(&ep.host_ifindex);
        if st.fail_detach {
            return vec![FakeError(format!("cannot detach from {}", ep.host_ifname))];
        }
        Vec::new()
    }

    fn set_debug(&self, ep: &EndpointRecord, on: bool) -> Result<(), FakeError> {
        let mut st = self.state();
        st.log.push(format!("set_debug {} {on}", ep.host_ifname));
        if st.fail_debug {
            return Err(FakeError(format!("cannot trace {}", ep.host_ifname)));
        }
        if !st.attached.contains_key(&ep.host_ifindex) {
            return Err(FakeError(format!("{} is not attached", ep.host_ifname)));
        }
        st.note_debug(ep.host_ifindex, on);
        Ok(())
    }

    fn set_flags(&self, ep: &EndpointRecord, mask: u32, flags: u32) -> Result<(), FakeError> {
        let mut st = self.state();
        st.log
            .push(format!("set_flags {} {mask:#x} {flags:#x}", ep.host_ifname));
        let f = st
            .flags
            .get_mut(&ep.id)
            .ok_or_else(|| FakeError(format!("{} is not attached", ep.host_ifname)))?;
        *f = (*f & !mask) | (flags & mask);
        Ok(())
    }

    fn apply_policy(&self, diff: &PolicyDiff) -> Result<(), FakeError> {
        let mut st = self.state();
        if st.fail_apply || st.fail_apply_after.is_some_and(|n| st.diffs.len() >= n) {
            return Err(FakeError("cannot write the policy maps".into()));
        }
        st.log.push("apply_policy".into());
        // The documented order.
        st.policy.ipcache.extend(diff.ipcache_set.iter().copied());
        st.policy.entries.extend(diff.entries_set.iter().copied());
        for (id, flags) in &diff.flags_set {
            // Like the real maps: only attached endpoints have flags to change.
            if let Some(f) = st.flags.get_mut(id) {
                let mask = hypha_common::ENDPOINT_F_POLICY_MASK;
                *f = (*f & !mask) | (*flags & mask);
            }
        }
        for k in &diff.entries_del {
            st.policy.entries.remove(k);
        }
        for n in &diff.ipcache_del {
            st.policy.ipcache.remove(n);
        }
        st.diffs.push(diff.clone());
        Ok(())
    }

    fn installed_policy(&self) -> Result<InstalledPolicy, FakeError> {
        Ok(self.state().policy.clone())
    }

    fn check(&self, ep: &EndpointRecord) -> Vec<String> {
        if self.state().attached.get(&ep.host_ifindex) == Some(ep) {
            Vec::new()
        } else {
            vec![format!("{} is not attached", ep.host_ifname)]
        }
    }

    fn sweep(&self, keep: &[EndpointRecord]) -> Vec<FakeError> {
        let mut st = self.state();
        st.pinned
            .retain(|i| keep.iter().any(|k| k.host_ifindex == *i));
        st.log.push("sweep".into());
        Vec::new()
    }

    fn stats(&self, ifindex: u32) -> Result<EndpointStats, FakeError> {
        let mut s = EndpointStats::default();
        if self.state().attached.contains_key(&ifindex) {
            s.ipv4.egress.redirected = Counter {
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

    fn set_tunnel(&self, tunnel: Option<&TunnelSetup>) -> Result<(), FakeError> {
        let mut st = self.state();
        st.log.push(match tunnel {
            Some(t) => format!("tunnel {}", t.ifname),
            None => "no tunnel".into(),
        });
        st.tunnel = tunnel.cloned();
        Ok(())
    }

    fn set_tunnel_peers(&self, peers: &[TunnelPeerSpec]) -> Vec<FakeError> {
        let mut st = self.state();
        st.peers = peers.iter().map(|p| (p.node_id, p.clone())).collect();
        let ids: Vec<u32> = st.peers.keys().copied().collect();
        st.node_stats.retain(|id, _| ids.contains(id));
        Vec::new()
    }

    fn node_stats(&self) -> Result<Vec<(u32, NodeStats)>, FakeError> {
        Ok(self
            .state()
            .node_stats
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect())
    }

    fn apply_lb(&self, diff: &LbDiff) -> Vec<FakeError> {
        let mut st = self.state();
        if st.fail_lb {
            return vec![FakeError("cannot write the load balancer's maps".into())];
        }
        st.lb_applies += 1;
        st.lb_writes += diff.backends_set.len()
            + diff.maglev_set.len()
            + diff.services_set.len()
            + diff.services_del.len()
            + diff.maglev_del.len()
            + diff.backends_del.len();
        // The documented order, each step checked against what the eBPF side reads.
        for (id, b) in &diff.backends_set {
            st.lb_stats.entry(*id).or_default();
            st.lb.backends.insert(*id, *b);
        }
        for (id, t) in &diff.maglev_set {
            let mut named: Vec<u32> = Vec::new();
            for b in t.iter() {
                if !named.contains(b) {
                    named.push(*b);
                }
            }
            assert!(
                named.iter().all(|b| st.lb.backends.contains_key(b)),
                "maglev table {id} names a backend not written before it"
            );
            st.lb.maglev.insert(*id, t.clone());
        }
        for (k, v) in &diff.services_set {
            assert!(
                v.count == 0 || st.lb.maglev.contains_key(&v.id),
                "frontend {k:?} written before its maglev table {}",
                v.id
            );
            st.lb.services.insert(*k, *v);
        }
        for k in &diff.services_del {
            st.lb.services.remove(k);
        }
        for id in &diff.maglev_del {
            assert!(
                !st.lb.services.values().any(|v| v.id == *id && v.count > 0),
                "maglev table {id} removed while a frontend uses it"
            );
            st.lb.maglev.remove(id);
        }
        for (id, _) in &diff.backends_del {
            st.lb.backends.remove(id);
            st.lb_stats.remove(id);
        }
        Vec::new()
    }

    fn installed_lb(&self) -> Result<InstalledLb, FakeError> {
        Ok(self.state().lb.clone())
    }

    fn lb_stats(&self) -> Result<Vec<(u32, hypha_common::lb::LbBackendStats)>, FakeError> {
        Ok(self
            .state()
            .lb_stats
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect())
    }
}
