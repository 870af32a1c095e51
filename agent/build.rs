//! Embeds the eBPF object that `cargo xtask build-ebpf` produced.
//!
//! The object is built by the nightly toolchain for `bpfel-unknown-none`, which cargo
//! cannot do from here on stable; xtask builds it first and this script only copies it
//! into OUT_DIR so that `include_bytes_aligned!` finds it at a fixed place.
//!
//! Without the object (a machine without nightly, rust-src or bpf-linker, where someone
//! works on the control plane and runs its unit tests), the build goes on with a warning
//! and an empty object: the agent then refuses to load its datapath at run time with an
//! error that says how to build it properly (`EbpfError::NoObject`).

use std::path::PathBuf;
use std::{env, fs};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = match env::var_os("HYPHA_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => manifest.join("../target/bpfel-unknown-none/release/hypha-ebpf"),
    };
    println!("cargo:rerun-if-env-changed=HYPHA_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("hypha-ebpf.o");
    if let Err(e) = fs::copy(&object, &out) {
        println!(
            "cargo:warning=no eBPF object at {} ({e}): this hypha can run its unit tests but not \
             its datapath; build it with `cargo xtask build` (or set HYPHA_EBPF_OBJECT)",
            object.display()
        );
        if let Err(e) = fs::write(&out, []) {
            panic!("cannot write {}: {e}", out.display());
        }
    }
}
