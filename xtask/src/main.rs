//! `cargo xtask`: what cargo alone cannot do for Hypha.
//!
//! - `setup`: install every prerequisite, idempotently (rust-src for nightly, bpf-linker
//!   linked against the nightly toolchain's own LLVM, the Debian packages tests and
//!   benchmarks use).
//! - `build-ebpf`, `build`: the eBPF object (nightly, `bpfel-unknown-none`), then userspace.
//! - `test`: setup, build, formatting and lints, every test.
//! - `demo`: an agent, two pods made through `hypha-cni`, traffic between them, counters;
//!   `--cluster`: etcd and three nodes, cross-node traffic over the overlay.
//! - `install`: binaries and a default CNI configuration onto this machine.
//! - `bench`: side-by-side measurements, written under `target/bench/`.
//! - `soak`: ADD/DEL cycles with agent and plugin SIGKILLs, then a count of what leaked.

mod bench;
mod demo;
mod setup;
mod soak;
mod util;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::util::{cargo, run, workspace_root};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install every prerequisite (idempotent).
    Setup,
    /// Build the eBPF object with the nightly toolchain.
    BuildEbpf,
    /// Build the eBPF object and all binaries.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, check formatting and lints, and run every test.
    Test {
        /// Skip `cargo xtask setup` (when you know the machine is ready).
        #[arg(long)]
        no_setup: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Set up, build and show two pods talking through the eBPF datapath.
    Demo {
        /// The cluster variant: etcd and three nodes (network namespaces on an underlay
        /// bridge), two pods each, cross-node traffic over the VXLAN overlay, a policy
        /// applied on one node and its drop seen on another, `hypha node list`.
        #[arg(long)]
        cluster: bool,
    },
    /// Install hypha and hypha-cni on this machine.
    Install {
        /// Where `hypha` goes.
        #[arg(long, default_value = "/usr/local/bin")]
        bin_dir: PathBuf,
        /// Where CNI plugins live.
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// Where CNI network configurations live.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
    },
    /// Benchmarks, side by side with the baselines; results under target/bench/.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// ADD/DEL cycles through hypha-cni with the agent and plugins SIGKILLed at random,
    /// two long-lived flows measured throughout; fails on any leak or a gap over 1 s.
    Soak(soak::Options),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::setup(),
        Task::BuildEbpf => build_ebpf(),
        Task::Build { release } => build(release),
        Task::Test {
            no_setup,
            cargo_args,
        } => test(no_setup, &cargo_args),
        Task::Demo { cluster } => {
            setup::setup()?;
            build(false)?;
            if cluster {
                demo::run_cluster()
            } else {
                demo::run()
            }
        }
        Task::Install {
            bin_dir,
            cni_bin_dir,
            cni_conf_dir,
        } => install(&bin_dir, &cni_bin_dir, &cni_conf_dir),
        Task::Bench(b) => {
            setup::setup()?;
            if b.own_binaries() {
                // The binaries given are used as they are; only the eBPF object is rebuilt.
                build_ebpf()?;
            } else {
                build(true)?;
            }
            bench::run(b)
        }
        Task::Soak(options) => {
            setup::setup()?;
            build(false)?;
            soak::run(options)
        }
    }
}

/// The eBPF object, built by the nightly toolchain for the BPF target.
pub fn build_ebpf() -> Result<()> {
    run(&mut nightly_ebpf_cargo("build", &["--release"]))
}

/// The eBPF crate's lints, with the toolchain and target it is built with.
fn clippy_ebpf() -> Result<()> {
    run(&mut nightly_ebpf_cargo("clippy", &["--", "-D", "warnings"]))
}

/// `cargo +nightly SUBCOMMAND -p hypha-ebpf` for `bpfel-unknown-none`, then `extra`.
fn nightly_ebpf_cargo(subcommand: &str, extra: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args([
            "+nightly",
            subcommand,
            "--package",
            "hypha-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(extra)
        // The outer cargo (stable, from rust-toolchain.toml) must not leak its choice of
        // compiler into the nightly build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

fn build(release: bool) -> Result<()> {
    build_ebpf()?;
    let mut args = vec!["build", "--workspace", "--exclude", "hypha-ebpf", "--bins"];
    if release {
        args.push("--release");
    }
    cargo(&args)
}

fn test(no_setup: bool, cargo_args: &[String]) -> Result<()> {
    if !no_setup {
        setup::setup()?;
    }
    build(false)?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "hypha-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    clippy_ebpf()?;
    let mut args: Vec<&str> = vec!["test", "--workspace", "--exclude", "hypha-ebpf"];
    if !cargo_args.is_empty() {
        args.push("--");
        args.extend(cargo_args.iter().map(String::as_str));
    }
    cargo(&args)?;
    // A filtered run is someone looking at a few tests; the whole run ends with a short soak.
    if cargo_args.is_empty() {
        soak::run(soak::Options::ci())?;
    }
    Ok(())
}

fn install(
    bin_dir: &std::path::Path,
    cni_bin_dir: &std::path::Path,
    conf_dir: &std::path::Path,
) -> Result<()> {
    build(true)?;
    let release = workspace_root().join("target/release");
    util::install_file(&release.join("hypha"), &bin_dir.join("hypha"), 0o755)?;
    util::install_file(
        &release.join("hypha-cni"),
        &cni_bin_dir.join("hypha-cni"),
        0o755,
    )?;
    let conf = conf_dir.join("10-hypha.conflist");
    if conf.exists() {
        println!("kept the existing {}", conf.display());
    } else {
        std::fs::create_dir_all(conf_dir)?;
        std::fs::write(
            &conf,
            "{\n  \"cniVersion\": \"1.1.0\",\n  \"name\": \"hypha\",\n  \"plugins\": [\n    { \"type\": \"hypha-cni\" }\n  ]\n}\n",
        )?;
        println!("wrote {}", conf.display());
    }
    println!("installed; start the agent with `hypha agent` (as root)");
    Ok(())
}
