//! Helpers shared by Hypha's integration tests (`tests/tests/*.rs`).
//!
//! Every test here is privileged: it needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF)
//! and runs for real, here and in CI.

pub mod cni;
pub mod ebpf;
pub mod netns;
pub mod node;
