//! `cargo xtask setup`: every prerequisite, installed only when missing.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::util::{output, run};

/// bpf-linker release that fits the nightly toolchain's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests, the demo and the benchmarks use:
/// iproute2 (`ip netns`), nftables (the agent's masquerade rules), iperf3 (throughput),
/// containernetworking-plugins (the reference `bridge`/`host-local` baseline), procps,
/// iputils-ping (the tests' and the demo's pings), curl (the API is plain HTTP on a socket),
/// crun and runc (the OCI runtimes `hypha run` is compared with in `bench launcher`),
/// podman (the container engine `hypha run --image` and `hypha image import` are compared
/// with there),
/// bpftool (the soak reads the pinned maps with it), etcd-server (the cluster store the
/// cluster tests, demo and benchmark start on a free loopback port), protobuf-compiler
/// (`protoc`, which the etcd client's build compiles etcd's API with), busybox-static (the
/// base layer of the test images `hypha image import` and `hypha run --image` are tested with).
const PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "iperf3",
    "containernetworking-plugins",
    "procps",
    "iputils-ping",
    "curl",
    "crun",
    "runc",
    "podman",
    "bpftool",
    "etcd-server",
    "protobuf-compiler",
    "busybox-static",
];

pub fn setup() -> Result<()> {
    nightly_components()?;
    bpf_linker()?;
    debian_packages()?;
    Ok(())
}

/// The nightly toolchain's components: `rust-src` for the eBPF build (`-Z build-std=core`)
/// and `clippy` for the eBPF crate's lints in `cargo xtask test`.
fn nightly_components() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is needed for the eBPF build (rustup toolchain list)")?;
    for component in ["rust-src", "clippy"] {
        if installed.lines().any(|l| l.starts_with(component)) {
            continue;
        }
        run(Command::new("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

fn bpf_linker() -> Result<()> {
    let bin = cargo_home().join("bin/bpf-linker");
    if let Ok(v) = output(Command::new(&bin).arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    // bpf-linker must use exactly rustc's LLVM: point LLVM_PREFIX at a folder whose lib/
    // links to the nightly toolchain's own libLLVM, under both names the build looks for.
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let soname = std::fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = std::env::temp_dir().join("hypha-llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&soname), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN"))
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f", "${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!(
            "Debian packages missing: {}; run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
