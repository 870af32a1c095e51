//! `hypha image import`, `ls` and `rm`: clap arguments and one function per verb returning
//! the process's exit code.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{DEFAULT_IMAGE_DIR, ImageError, ImageRecord, ImportOptions, Store};
use crate::cli::Output;
use crate::limits::{self, LimitError};

fn layer_size(v: &str) -> Result<u64, LimitError> {
    limits::parse_bytes("--max-layer-size", v)
}

// Where the image store lives; shared by every verb. (A plain comment: a doc comment here
// would become the `about` of every command that flattens it.)
#[derive(Args, Debug, Clone)]
pub struct ImageDirArg {
    /// Directory of the image store.
    #[arg(long = "image-dir", env = "HYPHA_IMAGE_DIR", default_value = DEFAULT_IMAGE_DIR)]
    pub image_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Import an OCI image layout directory, an OCI archive or a Docker archive.
    Import(ImportArgs),
    /// List images.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Remove an image (refused while a container uses it).
    #[command(alias = "remove")]
    Rm(ImageRmArgs),
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The image: a directory (OCI layout) or a tar file (OCI or Docker archive).
    pub source: PathBuf,
    /// NAME[:TAG] [default: the image's own reference]
    #[arg(long)]
    pub name: Option<String>,
    /// Bound on the unpacked size of each layer: bytes or 100M, 4G...
    #[arg(long = "max-layer-size", default_value = "4G", value_parser = layer_size)]
    pub max_layer_size: u64,
    /// Bound on what an image archive extracts to (a compressed archive can expand
    /// without bound): bytes or 100M, 16G...
    #[arg(long = "max-archive-size", default_value = "16G", value_parser = layer_size)]
    pub max_archive_size: u64,
    /// Keep device nodes and setuid/setgid bits of the layers.
    #[arg(long)]
    pub privileged: bool,
    #[command(flatten)]
    pub image_dir: ImageDirArg,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: Output,
    #[command(flatten)]
    pub image_dir: ImageDirArg,
}

#[derive(Args, Debug)]
pub struct ImageRmArgs {
    /// Images: NAME[:TAG] or ID (prefix).
    #[arg(required = true)]
    pub references: Vec<String>,
    #[command(flatten)]
    pub image_dir: ImageDirArg,
}

/// Runs one `hypha image` verb; its exit code.
pub fn image(cmd: ImageCommand) -> Result<i32, ImageError> {
    match cmd {
        ImageCommand::Import(args) => {
            let store = Store::open(&args.image_dir.image_dir)?;
            let record = store.import(
                &args.source,
                &ImportOptions {
                    name: args.name,
                    max_layer_bytes: args.max_layer_size,
                    max_archive_bytes: args.max_archive_size,
                    privileged: args.privileged,
                },
            )?;
            println!("{}:{} {}", record.name, record.tag, record.id);
            Ok(0)
        }
        ImageCommand::Ls(args) => {
            let list = Store::open(&args.image_dir.image_dir)?.list()?;
            match args.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&list).expect("records serialize")
                ),
                Output::Text => print!("{}", format_images(&list)),
            }
            Ok(0)
        }
        ImageCommand::Rm(args) => {
            let store = Store::open(&args.image_dir.image_dir)?;
            let mut first = None;
            for r in &args.references {
                match store.remove(r) {
                    Ok(rec) => println!("removed {}:{} {}", rec.name, rec.tag, short_id(&rec.id)),
                    Err(e) if first.is_none() => first = Some(e),
                    Err(e) => eprintln!("hypha: {e}"),
                }
            }
            first.map_or(Ok(0), Err)
        }
    }
}

/// The first 12 hex digits of an id.
pub fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

/// A byte count as people read it: `512B`, `1.5MB`, `2.0GB` (powers of 1000, as image
/// tools show sizes).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes}B");
    }
    let mut v = bytes as f64 / 1000.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

/// `hypha image ls`'s table.
pub fn format_images(list: &[ImageRecord]) -> String {
    let rows: Vec<[String; 6]> = list
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.tag.clone(),
                short_id(&r.id).to_owned(),
                human_size(r.size),
                r.layers.to_string(),
                r.created.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let header = ["NAME", "TAG", "ID", "SIZE", "LAYERS", "CREATED"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        image: ImageCommand,
    }

    #[test]
    fn import_flags() {
        let c = Cli::try_parse_from([
            "image",
            "import",
            "x.tar",
            "--name",
            "web:1",
            "--max-layer-size",
            "100M",
            "--privileged",
            "--image-dir",
            "/tmp/s",
        ])
        .unwrap();
        let ImageCommand::Import(a) = c.image else {
            panic!("not import")
        };
        assert_eq!(a.max_layer_size, 100 << 20);
        assert_eq!(a.name.as_deref(), Some("web:1"));
        assert!(a.privileged);
        assert_eq!(a.image_dir.image_dir, PathBuf::from("/tmp/s"));
        let e = Cli::try_parse_from(["image", "import", "x", "--max-layer-size", "lots"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("invalid --max-layer-size value \"lots\""), "{e}");
    }

    #[test]
    fn table() {
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1_500_000), "1.5MB");
        let r = ImageRecord {
            id: format!("sha256:{}", "ab".repeat(32)),
            name: "busybox".into(),
            tag: "latest".into(),
            digest: "sha256:00".into(),
            size: 2_000_000,
            layers: 2,
            created: None,
        };
        assert_eq!(
            format_images(&[r]),
            "NAME     TAG     ID            SIZE   LAYERS  CREATED\n\
             busybox  latest  abababababab  2.0MB  2       -\n"
        );
    }
}
