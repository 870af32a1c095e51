//! The attachments whose DEL the agent handled lately, so that an ALLOCATE or a create
//! of an ADD the runtime has already given up on is refused instead of served.
//!
//! A runtime that kills `hypha-cni` mid-ADD (its own timeout, a SIGKILL) runs DEL next.
//! The killed ADD's last request may still be in the agent's socket and be handled after
//! that DEL: the address it takes would then belong to no one. `hypha-cni` sends with each
//! request of an ADD the moment it took the attachment's lock
//! ([`hypha_api::ATTACHMENT_LOCKED_AT`], on `CLOCK_BOOTTIME`). That lock orders the
//! invocations of one attachment, so a request whose moment comes before a DEL the agent
//! handled belongs to an ADD that ended before that DEL began. An ADD that follows the
//! DEL takes the lock after the DEL's plugin let it go, which is after the agent answered
//! it: its requests pass.

use std::collections::{HashMap, VecDeque};

use super::Owner;

/// How long a DEL is remembered: far longer than a request of a killed plugin waits in
/// the agent's socket, short enough that the record stays small (one entry per DEL).
pub(super) const REMEMBERED_NS: u64 = 10 * 60 * 1_000_000_000;

/// The moment of each attachment's last DEL within [`REMEMBERED_NS`].
#[derive(Default)]
pub(super) struct RecentDeletes {
    last: HashMap<Owner, u64>,
    /// The same DELs in the order they came, to forget the old ones cheaply.
    order: VecDeque<(u64, Owner)>,
}

impl RecentDeletes {
    /// Notes that `owner`'s DEL was handled at `now`; forgets DELs older than
    /// [`REMEMBERED_NS`].
    pub(super) fn deleted(&mut self, owner: &Owner, now: u64) {
        while let Some((at, _)) = self.order.front()
            && now.saturating_sub(*at) > REMEMBERED_NS
        {
            let (at, old) = self.order.pop_front().expect("front exists");
            if self.last.get(&old) == Some(&at) {
                self.last.remove(&old);
            }
        }
        self.last.insert(owner.clone(), now);
        self.order.push_back((now, owner.clone()));
    }

    /// The moment of a DEL of `owner` handled after `locked_at`, if there was one: then a
    /// request whose ADD took the lock at `locked_at` is stale.
    pub(super) fn after(&self, owner: &Owner, locked_at: u64) -> Option<u64> {
        self.last.get(owner).copied().filter(|at| *at > locked_at)
    }

    /// How many DELs are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.last.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(id: &str) -> Owner {
        Owner {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn a_request_locked_before_the_del_is_stale_and_one_after_is_not() {
        let mut d = RecentDeletes::default();
        d.deleted(&owner("a"), 1_000);
        assert_eq!(d.after(&owner("a"), 999), Some(1_000));
        assert_eq!(d.after(&owner("a"), 1_000), None);
        assert_eq!(d.after(&owner("a"), 1_001), None);
        assert_eq!(d.after(&owner("b"), 0), None, "another attachment");
    }

    #[test]
    fn the_latest_del_counts_and_old_ones_are_forgotten() {
        let mut d = RecentDeletes::default();
        d.deleted(&owner("a"), 1_000);
        d.deleted(&owner("b"), 2_000);
        d.deleted(&owner("a"), 3_000);
        assert_eq!(d.after(&owner("a"), 2_500), Some(3_000));
        // Past the memory of the first two entries: "a"'s first DEL goes without taking
        // its second with it; "b" goes.
        d.deleted(&owner("c"), 2_000 + REMEMBERED_NS + 1);
        assert_eq!(d.len(), 2);
        assert_eq!(d.after(&owner("a"), 2_500), Some(3_000));
        assert_eq!(d.after(&owner("b"), 0), None);
        d.deleted(&owner("c"), 3_000 + REMEMBERED_NS + 1);
        assert_eq!(d.after(&owner("a"), 0), None);
        assert_eq!(d.len(), 1);
    }
}
