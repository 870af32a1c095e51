//! Helpers shared by Hypha's integration tests (`tests/tests/*.rs`).
//!
//! Almost every test here is privileged: it needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN,
//! CAP_BPF) and runs for real, here and in CI (`cargo xtask test` runs as root). Such a
//! test starts with [`require_root!`], so that `cargo test` as an ordinary user runs the
//! rest and reports these as skipped instead of failing them.

use std::path::PathBuf;

pub mod census;
pub mod cluster;
pub mod cni;
pub mod ebpf;
pub mod images;
pub mod launcher;
pub mod monitor;
pub mod netns;
pub mod node;
pub mod overlay;
pub mod policies;
pub mod services;
pub mod traffic;

/// Whether this process may do what privileged tests do (its effective uid is root).
pub fn privileged() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The first line of a privileged test: without root, prints why the test is skipped and
/// returns from it. Written straight to stderr, which libtest does not capture, so the
/// reason shows in `cargo test`'s output.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::privileged() {
            $crate::skip_message(file!(), line!());
            return;
        }
    };
}

#[doc(hidden)]
pub fn skip_message(file: &str, line: u32) {
    use std::io::Write as _;
    // Nothing to do if stderr is gone; the test is skipped either way.
    let _ = writeln!(
        std::io::stderr(),
        "skipped ({file}:{line}): needs root (CAP_NET_ADMIN/CAP_BPF)"
    );
}

/// A binary of this build (`hypha`, `hypha-cni`): `target/<profile>/NAME`, next to the
/// `deps/` directory of the test executable, or next to a binary of this crate
/// (`cluster-bench`, in `target/<profile>/` itself). Cargo does not build other packages'
/// binaries for a test; `cargo xtask test` builds them first.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("the executable is in a directory");
    let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent()
            .expect("the test executable is in target/<profile>/deps/")
    } else {
        dir
    };
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build the binaries first (`cargo xtask build`)",
        bin.display()
    );
    bin
}
