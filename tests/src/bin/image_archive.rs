//! `image-archive`: the images `cargo xtask bench launcher` runs and imports, written by the
//! tests' own image builder ([`hypha_tests::images`]), and the layer directories the store
//! unpacked for an image (the rootfs of the bench's crun and runc bundles).
//!
//! ```text
//! image-archive busybox --reference NAME:TAG --out FILE
//! image-archive random --mb N --layers K --reference NAME:TAG --out FILE
//! image-archive layers --image-dir DIR NAME[:TAG]
//! ```
//! `busybox` and `random` write a Docker archive; `layers` prints one directory a line,
//! base first.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use hypha_launcher::image::Store;
use hypha_tests::images::{ImageSpec, LayerBuilder};

/// Bytes of each incompressible file of a `random` layer.
const FILE_BYTES: usize = 4 << 20;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(verb) = args.first() else {
        bail!("usage: image-archive busybox|random|layers ...");
    };
    let flag = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let need = |name: &str| flag(name).with_context(|| format!("{verb}: {name} is required"));
    match verb.as_str() {
        "busybox" => {
            let out = PathBuf::from(need("--out")?);
            ImageSpec::busybox_app(Some(&need("--reference")?)).write_docker_archive(&out);
        }
        "random" => {
            let out = PathBuf::from(need("--out")?);
            let mb: usize = need("--mb")?.parse().context("--mb: a number")?;
            let layers: usize = need("--layers")?.parse().context("--layers: a number")?;
            if layers == 0 {
                bail!("--layers: at least 1");
            }
            let per_layer = (mb << 20) / layers;
            let mut state = 0x9e37_79b9_7f4a_7c15_u64;
            let built = (0..layers)
                .map(|l| {
                    let mut b = LayerBuilder::new().dir("data", 0o755);
                    let mut left = per_layer;
                    let mut i = 0;
                    while left > 0 {
                        let n = left.min(FILE_BYTES);
                        let bytes = random_bytes(&mut state, n);
                        b = b.file(&format!("data/l{l}-f{i}"), 0o644, &bytes);
                        left -= n;
                        i += 1;
                    }
                    b.finish()
                })
                .collect();
            ImageSpec::new(Some(&need("--reference")?), built).write_docker_archive(&out);
        }
        "layers" => {
            let dir = PathBuf::from(need("--image-dir")?);
            let reference = args
                .last()
                .filter(|_| args.len() >= 4)
                .context("layers: usage: image-archive layers --image-dir DIR NAME[:TAG]")?;
            let image = Store::open(&dir)
                .and_then(|s| s.resolve(reference))
                .with_context(|| format!("resolving {reference} in {}", dir.display()))?;
            for l in image.layers {
                println!("{}", l.display());
            }
        }
        other => bail!("unknown verb {other:?}: busybox, random or layers"),
    }
    Ok(())
}

/// Incompressible bytes (xorshift64*), so that no compression makes the import cheaper.
fn random_bytes(state: &mut u64, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        v.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(n);
    v
}
