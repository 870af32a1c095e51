//! `hypha image import`, `ls` and `rm`: clap arguments and one function per verb returning
//! the process's exit code.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{DEFAULT_IMAGE_DIR, ImageError};
use crate::cli::Output;

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
    #[arg(long = "max-layer-size", default_value = "4G")]
    pub max_layer_size: String,
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
    let _ = cmd;
    todo!()
}
