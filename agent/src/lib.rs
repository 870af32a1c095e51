//! Hypha's per-host agent: IPAM, endpoints, the eBPF datapath and the API socket; plus the
//! operator's commands that talk to it. The binary `hypha` (src/main.rs) is a thin shell
//! over this library.

pub mod bandwidth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod host;
pub mod ipam;
pub mod metrics;
pub mod monitor;
pub mod overlay;
pub mod policy;
pub mod server;
pub mod service;
pub mod state;
