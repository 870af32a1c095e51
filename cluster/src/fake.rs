//! An in-memory [`KvStore`](crate::KvStore) with etcd's semantics where the control plane
//! depends on them (revisions, create/mod revisions, transactions, leases, prefix watches
//! from a past revision) and knobs for the faults the control plane must survive: leases
//! expired on demand, compaction, a restart (every watch lost, data kept), and an outage
//! (every call `Unavailable`).
//!
//! SCAFFOLD: to be written (issue 12, helper "logic").
