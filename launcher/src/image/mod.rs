//! Hypha's image store (issue 15): OCI images imported from an OCI image layout, an OCI
//! archive or a Docker archive, kept as content-addressed blobs and as layers unpacked once
//! and shared, read-only, by every image and container that uses them.
//!
//! Layout under the store's root (`/var/lib/hypha/images` by default):
//!
//! - `blobs/sha256/<hex>`: manifests, configs and compressed layers, by digest; written to a
//!   temporary file inside the store, fsynced and renamed into place.
//! - `layers/<diff-id hex>/`: a layer unpacked into a temporary directory and renamed into
//!   place when complete; an existing layer directory is reused and never written again.
//! - `images/<id hex>.json`: one record per image (name, tag, manifest and config digests);
//!   written under `lock` (an `flock`), which serialises index changes.
//! - `holds/<image hex>/<container id>`: a container using the image; the file holds the
//!   container's run directory.
//! - `tmp/`: imports in progress; removed when an import fails.
//!
//! Unpacking is hostile-input safe; the rules (in [`unpack`]):
//!
//! - An entry whose path has a `..` component is refused. An absolute path (`/etc/passwd`)
//!   is taken relative to the layer root (`etc/passwd`), as every image tool does.
//! - A symlink whose target, resolved lexically from the link's directory (an absolute
//!   target from the layer root), leaves the layer root is refused. A hard link must name
//!   an entry already unpacked in the same layer.
//! - Nothing is written through a symlink: every parent directory of an entry is checked
//!   with `symlink_metadata` and must be a real directory inside the layer.
//! - Block and character devices are refused unless the import is privileged; fifos are
//!   allowed. Setuid and setgid bits are stripped unless privileged.
//! - The unpacked size of one layer is bounded (`max_layer_bytes`, 4 GiB by default): a
//!   layer that exceeds it is refused, naming the layer and the limit.
//! - Whiteouts become overlayfs' form: `.wh.NAME` a 0/0 character device `NAME`,
//!   `.wh..wh..opq` the xattr `trusted.overlay.opaque=y` on its directory.
//! - Owners (uid, gid), modes and mtimes are kept.
//!
//! Any failure of an import (a digest that does not match, a hostile entry, a limit) leaves
//! nothing new in the store.

pub mod cli;
mod source;
pub mod unpack;

use std::path::{Path, PathBuf};

use serde::Serialize;

/// The default root of the image store.
pub const DEFAULT_IMAGE_DIR: &str = "/var/lib/hypha/images";
/// The default bound on the unpacked size of one layer (a tar bomb's).
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 4 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file of the store or of the imported image could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The source is none of the image formats Hypha imports.
    #[error(
        "{0}: not an OCI image layout, OCI archive or Docker archive (no oci-layout/index.json or manifest.json)"
    )]
    UnknownFormat(PathBuf),
    /// The source is malformed (missing or invalid JSON, missing blob, unsupported media type).
    #[error("invalid image {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// A blob or an unpacked layer does not have the digest its descriptor or the config
    /// names.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// A layer entry breaks an unpacking rule (see the module doc).
    #[error("layer {layer}: refused entry {entry:?}: {reason}")]
    Hostile {
        layer: String,
        entry: String,
        reason: String,
    },
    /// A layer unpacks to more than the limit.
    #[error(
        "layer {layer} unpacks to more than the limit of {limit} bytes (raise it with --max-layer-size)"
    )]
    TooLarge { layer: String, limit: u64 },
    /// Neither `--name` nor the image itself gives a name.
    #[error("{0}: the image has no name of its own; give one with --name NAME[:TAG]")]
    NoName(PathBuf),
    /// A name or tag that cannot be used.
    #[error("invalid image reference {0:?}: {1}")]
    InvalidReference(String, &'static str),
    /// No image matches the reference.
    #[error("no image {0:?} (see `hypha image ls`)")]
    NotFound(String),
    /// An id prefix matching more than one image.
    #[error("image id prefix {0:?} is ambiguous: it matches {1}")]
    Ambiguous(String, String),
    /// The image is used by containers.
    #[error("image {image} is in use by container(s) {containers} (remove them with `hypha rm`)")]
    InUse { image: String, containers: String },
    /// A record or config of the store is not valid JSON.
    #[error("invalid store file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// What to import and how.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// `NAME[:TAG]`; `None`: the image's own reference.
    pub name: Option<String>,
    /// Bound on the unpacked size of each layer.
    pub max_layer_bytes: u64,
    /// Keep device nodes and setuid/setgid bits.
    pub privileged: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            name: None,
            max_layer_bytes: DEFAULT_MAX_LAYER_BYTES,
            privileged: false,
        }
    }
}

/// An image in the store, as `hypha image ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ImageRecord {
    /// `sha256:<config digest hex>`.
    pub id: String,
    pub name: String,
    pub tag: String,
    /// The manifest's digest.
    pub digest: String,
    /// Bytes of the manifest, the config and the compressed layers.
    pub size: u64,
    pub layers: usize,
    /// The config's `created` (RFC 3339), if any.
    pub created: Option<String>,
}

/// An image ready to run.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub id: String,
    pub name: String,
    pub tag: String,
    /// The unpacked layer directories, lowest (base) first.
    pub layers: Vec<PathBuf>,
    pub config: ImageConfig,
}

/// The parts of an image's config that say how to run it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// The image store under one root directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the store at `root`, creating its layout if missing.
    pub fn open(root: &Path) -> Result<Store, ImageError> {
        let _ = root;
        todo!()
    }

    /// Imports an OCI image layout directory, an OCI archive or a Docker archive.
    pub fn import(&self, src: &Path, opts: &ImportOptions) -> Result<ImageRecord, ImageError> {
        let _ = (src, opts);
        todo!()
    }

    /// Every image, by name and tag.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        todo!()
    }

    /// `NAME[:TAG]` (tag `latest` by default), or an id or unambiguous id prefix
    /// (`sha256:…` or bare hex).
    pub fn resolve(&self, reference: &str) -> Result<ResolvedImage, ImageError> {
        let _ = reference;
        todo!()
    }

    /// Removes an image and the blobs and layers no other image uses; refused while a
    /// container holds it.
    pub fn remove(&self, reference: &str) -> Result<ImageRecord, ImageError> {
        let _ = reference;
        todo!()
    }

    /// Records that container `container_id` (of run directory `run_dir`) uses the image.
    pub fn hold(
        &self,
        image_id: &str,
        container_id: &str,
        run_dir: &Path,
    ) -> Result<(), ImageError> {
        let _ = (image_id, container_id, run_dir);
        todo!()
    }

    /// Drops the record of [`Store::hold`]; a missing hold is not an error.
    pub fn release(&self, image_id: &str, container_id: &str) -> Result<(), ImageError> {
        let _ = (image_id, container_id);
        todo!()
    }

    /// The store's root.
    pub fn root(&self) -> &Path {
        &self.root
    }
}
