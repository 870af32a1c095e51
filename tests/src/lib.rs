//! Helpers shared by Hypha's integration tests (`tests/tests/*.rs`).
//!
//! Every test here is privileged: it needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF)
//! and runs for real, here and in CI.

use std::path::{Path, PathBuf};

pub mod cni;
pub mod ebpf;
pub mod launcher;
pub mod monitor;
pub mod netns;
pub mod node;
pub mod traffic;

/// A binary of this build (`hypha`, `hypha-cni`): `target/<profile>/NAME`, next to the
/// `deps/` directory of the test executable. Cargo does not build other packages'
/// binaries for a test; `cargo xtask test` builds them first.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable is in target/<profile>/deps/")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: build the binaries first (`cargo xtask build`)",
        bin.display()
    );
    bin
}
