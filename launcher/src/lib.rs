//! `hypha run` and its companions: a minimal container launcher that hosts containers as
//! a real runtime does, with CNI networking, cgroups (v1 and v2) and security defaults.

pub mod cgroup;
pub mod cli;
pub mod cni;
pub mod image;
pub mod init;
pub mod lifecycle;
pub mod limits;
pub mod ports;
pub mod process;
pub mod rootfs;
pub mod run;
pub mod security;
pub mod state;
pub mod sys;
