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
//! - `images/by-id/<id hex>.json`: one record per image (manifest digest, layer blobs,
//!   diff ids, size, created), and `images/names.json`: `NAME:TAG` → image id. Both are
//!   replaced atomically under `lock` (an `flock`), which serialises every index change
//!   (import's final step, `rm`, holds).
//! - `holds/<image hex>/<container id>`: a container using the image; the file holds the
//!   container's run directory. A hold counts while that run directory has a container of
//!   that id or name, or while the hold is younger than a minute (the launcher holds the
//!   image before the container's state exists); others are stale and swept.
//!
//! An image's id is `sha256:<config digest>`; one image may have several names. `rm` by name
//! drops that name, `rm` by id (or id prefix) every name; the image's record goes with its
//! last name, and then every blob and layer no remaining image uses.
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
//!   layer that exceeds it is refused, naming the layer and the limit. So is what an
//!   image archive extracts to (`max_archive_bytes`, 16 GiB by default, and 10,000
//!   files), which a compressed archive could otherwise make without bound.
//! - Whiteouts become overlayfs' form: `.wh.NAME` a 0/0 character device `NAME`,
//!   `.wh..wh..opq` the xattr `trusted.overlay.opaque=y` on its directory.
//! - Owners (uid, gid), modes and mtimes are kept. Of the files' and directories'
//!   extended attributes, `user.*` and POSIX ACLs are kept; file capabilities
//!   (`security.capability`) only in a privileged import, as setuid bits; `trusted.*` (an
//!   image must never set overlayfs' `trusted.overlay.*`) and other `security.*` labels
//!   are dropped ([`unpack::keep_xattr`]).
//!
//! Any failure of an import (a digest that does not match, a hostile entry, a limit) leaves
//! nothing new in the store.

pub mod cli;
mod source;
pub mod unpack;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::state::RunDir;
use source::{format_digest, sha256_digest, sha256_hex};
use unpack::UnpackOptions;

/// The default root of the image store.
pub const DEFAULT_IMAGE_DIR: &str = "/var/lib/hypha/images";
/// The default bound on the unpacked size of one layer (a tar bomb's).
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 4 << 30;
/// The default bound on what an image archive extracts to: a compressed archive
/// (`docker save | gzip`) can expand without bound.
pub const DEFAULT_MAX_ARCHIVE_BYTES: u64 = 16 << 30;

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
    /// An image archive extracts to more than the limit, in bytes or in files.
    #[error("{archive} extracts to more than {limit}")]
    ArchiveTooLarge { archive: PathBuf, limit: String },
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
    /// Bound on what an image archive extracts to.
    pub max_archive_bytes: u64,
    /// Keep device nodes and setuid/setgid bits.
    pub privileged: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            name: None,
            max_layer_bytes: DEFAULT_MAX_LAYER_BYTES,
            max_archive_bytes: DEFAULT_MAX_ARCHIVE_BYTES,
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

/// A hold younger than this counts as live even before its container's state exists (the
/// launcher holds the image while it sets the container up).
const HOLD_GRACE: Duration = Duration::from_secs(60);

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { op, path, source }
}

/// What the store keeps of one image (`images/by-id/<hex>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredImage {
    id: String,
    manifest: String,
    /// Layer blobs' digests, base first.
    layer_blobs: Vec<String>,
    /// Uncompressed layers' digests (the layer directories), base first.
    diff_ids: Vec<String>,
    size: u64,
    created: Option<String>,
}

impl StoredImage {
    fn record(&self, name: &str, tag: &str) -> ImageRecord {
        ImageRecord {
            id: self.id.clone(),
            name: name.to_owned(),
            tag: tag.to_owned(),
            digest: self.manifest.clone(),
            size: self.size,
            layers: self.diff_ids.len(),
            created: self.created.clone(),
        }
    }
}

/// `NAME[:TAG]` split, the tag `latest` by default; a `:` before the last `/` is a
/// registry's port, not a tag.
pub fn parse_reference(reference: &str) -> Result<(String, String), ImageError> {
    let bad = |why| ImageError::InvalidReference(reference.to_owned(), why);
    if reference.contains('@') {
        return Err(bad(
            "digest references (NAME@sha256:...) are not supported; use NAME[:TAG] or an image id",
        ));
    }
    let (name, tag) = match reference.rfind(':') {
        Some(i) if !reference[i + 1..].contains('/') => (&reference[..i], &reference[i + 1..]),
        _ => (reference, "latest"),
    };
    let name_ok = (1..=255).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:".contains(&b))
        && !name.contains("//");
    if !name_ok {
        return Err(bad(
            "the name must start with a letter or digit and hold only letters, digits and . _ - / :",
        ));
    }
    let tag_ok = (1..=128).contains(&tag.len())
        && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !tag_ok {
        return Err(bad(
            "the tag must be 1 to 128 letters, digits, . _ or -, not starting with . or -",
        ));
    }
    Ok((name.to_owned(), tag.to_owned()))
}

/// The key of `names.json`.
fn key(name: &str, tag: &str) -> String {
    format!("{name}:{tag}")
}

/// `sha256:<hex>` or bare hex (64 digits) as the hex; `None` otherwise.
fn id_hex(id: &str) -> Option<String> {
    let full = if id.starts_with("sha256:") {
        id.to_owned()
    } else {
        format!("sha256:{id}")
    };
    sha256_hex(&full).map(str::to_owned)
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// A file written whole, fsynced and renamed into place.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(bytes).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("replacing", path))
}

/// Removes a file or a directory tree; a missing one is not an error.
fn remove_path(path: &Path) -> Result<(), ImageError> {
    let r = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
        _ => Ok(()),
    }
}

/// The image store under one root directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the store at `root`, creating its layout if missing.
    pub fn open(root: &Path) -> Result<Store, ImageError> {
        let store = Store {
            root: root.to_owned(),
        };
        for dir in [
            store.root.join("blobs/sha256"),
            store.root.join("layers"),
            store.root.join("images/by-id"),
            store.root.join("holds"),
            store.root.join("tmp"),
        ] {
            std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        }
        Ok(store)
    }

    /// The store's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob(&self, digest: &str) -> PathBuf {
        self.root
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap_or(digest))
    }

    fn layer(&self, diff_id: &str) -> PathBuf {
        self.root
            .join("layers")
            .join(diff_id.strip_prefix("sha256:").unwrap_or(diff_id))
    }

    fn by_id(&self, hex: &str) -> PathBuf {
        self.root.join("images/by-id").join(format!("{hex}.json"))
    }

    fn names_path(&self) -> PathBuf {
        self.root.join("images/names.json")
    }

    /// The store's lock: held while the index (names, records, holds) changes.
    fn lock(&self) -> Result<Flock<File>, ImageError> {
        let path = self.root.join("lock");
        let f = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err("locking", &path)(io::Error::from(e)))
    }

    fn names(&self) -> Result<BTreeMap<String, String>, ImageError> {
        let path = self.names_path();
        match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|source| ImageError::Parse { path, source })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    fn stored(&self, hex: &str) -> Result<StoredImage, ImageError> {
        let path = self.by_id(hex);
        let bytes = std::fs::read(&path).map_err(io_err("reading", &path))?;
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Parse { path, source })
    }

    /// Every stored image's hex id.
    fn ids(&self) -> Result<Vec<String>, ImageError> {
        let dir = self.root.join("images/by-id");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let e = e.map_err(io_err("listing", &dir))?;
            if let Some(hex) = e.file_name().to_str().and_then(|n| n.strip_suffix(".json")) {
                out.push(hex.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Imports an OCI image layout directory, an OCI archive or a Docker archive.
    ///
    /// Everything is verified, copied and unpacked in a temporary directory of the store
    /// first; only then are blobs and layers renamed into place and the record written,
    /// under the store's lock. Any failure before that leaves the store as it was.
    pub fn import(&self, src: &Path, opts: &ImportOptions) -> Result<ImageRecord, ImageError> {
        let given = opts.name.as_deref().map(parse_reference).transpose()?;
        let meta = std::fs::metadata(src).map_err(io_err("reading", src))?;
        let tmp_root = self.root.join("tmp");
        let work = tempfile::Builder::new()
            .prefix("import-")
            .tempdir_in(&tmp_root)
            .map_err(io_err("creating a directory in", &tmp_root))?;
        let dir = if meta.is_dir() {
            src.to_owned()
        } else {
            let d = work.path().join("src");
            source::extract_archive(src, &d, opts.max_archive_bytes)?;
            d
        };
        let parsed = source::read(&dir, src)?;
        let (name, tag) = match given {
            Some(nt) => nt,
            None => parse_reference(
                parsed
                    .reference
                    .as_deref()
                    .ok_or_else(|| ImageError::NoName(src.to_owned()))?,
            )?,
        };
        let diff_ids = parsed.config_parsed.rootfs().diff_ids().clone();
        if diff_ids.len() != parsed.layers.len() {
            return Err(ImageError::Invalid {
                path: src.to_owned(),
                reason: format!(
                    "the config lists {} layers (rootfs.diff_ids), the manifest {}",
                    diff_ids.len(),
                    parsed.layers.len()
                ),
            });
        }
        let blobs = work.path().join("blobs");
        let layers = work.path().join("layers");
        for d in [&blobs, &layers] {
            std::fs::create_dir(d).map_err(io_err("creating", d))?;
        }
        let config_hex = sha256_hex(&parsed.config.0)
            .ok_or_else(|| ImageError::Invalid {
                path: src.to_owned(),
                reason: format!("unsupported config digest {:?}", parsed.config.0),
            })?
            .to_owned();
        write_atomic(&blobs.join(&config_hex), &parsed.config.1)?;
        let mut size = parsed.config.1.len() as u64;
        let mut layer_blobs = Vec::new();
        let mut layer_descriptors = Vec::new();
        let mut reused = Vec::new();
        for (layer, diff_id) in parsed.layers.iter().zip(&diff_ids) {
            let diff_hex = sha256_hex(diff_id).ok_or_else(|| ImageError::Invalid {
                path: src.to_owned(),
                reason: format!("unsupported diff_id {diff_id:?} in the config (sha256 only)"),
            })?;
            if let Some(mt) = &layer.media_type
                && !mt.contains("tar")
            {
                return Err(ImageError::Invalid {
                    path: src.to_owned(),
                    reason: format!("unsupported layer media type {mt:?}"),
                });
            }
            let (digest, n) = copy_blob(&layer.path, &blobs, layer.digest.as_deref(), layer.size)?;
            size += n;
            let blob = blobs.join(sha256_hex(&digest).expect("a digest we made"));
            let shown = format!("{diff_id} (blob {digest})");
            let existing = self.layer(diff_id).is_dir();
            let dest = layers.join(diff_hex);
            if existing {
                reused.push(diff_id.clone());
            } else if !dest.exists() {
                std::fs::create_dir(&dest).map_err(io_err("creating", &dest))?;
            }
            let mut hashing = Hashing {
                inner: source::decompressed(&blob)?,
                hash: Sha256::new(),
                bytes: 0,
            };
            if !existing && dest.read_dir().is_ok_and(|mut d| d.next().is_none()) {
                unpack::unpack(
                    &mut hashing,
                    &dest,
                    &shown,
                    &UnpackOptions {
                        max_bytes: opts.max_layer_bytes,
                        privileged: opts.privileged,
                    },
                )?;
            }
            io::copy(&mut hashing, &mut io::sink()).map_err(|e| ImageError::Invalid {
                path: src.to_owned(),
                reason: format!("layer {digest}: {e}"),
            })?;
            let actual = format_digest(hashing.hash.finalize().as_slice());
            if &actual != diff_id {
                return Err(ImageError::DigestMismatch {
                    what: format!("the uncompressed layer {digest} (the config's diff_id)"),
                    expected: diff_id.clone(),
                    actual,
                });
            }
            layer_descriptors.push(serde_json::json!({
                "mediaType": layer_media_type(&blob)?,
                "digest": digest,
                "size": n,
            }));
            layer_blobs.push(digest);
        }
        let (manifest_digest, manifest_bytes) = match parsed.manifest {
            Some(m) => m,
            None => {
                // A Docker archive has no manifest blob: the store writes the OCI one.
                let m = serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {
                        "mediaType": "application/vnd.oci.image.config.v1+json",
                        "digest": parsed.config.0,
                        "size": parsed.config.1.len(),
                    },
                    "layers": layer_descriptors,
                });
                let bytes = serde_json::to_vec(&m).expect("a manifest serializes");
                (sha256_digest(&bytes), bytes)
            }
        };
        let manifest_hex = sha256_hex(&manifest_digest).expect("a verified digest");
        write_atomic(&blobs.join(manifest_hex), &manifest_bytes)?;
        size += manifest_bytes.len() as u64;
        let stored = StoredImage {
            id: parsed.config.0.clone(),
            manifest: manifest_digest,
            layer_blobs,
            diff_ids,
            size,
            created: parsed.config_parsed.created().clone(),
        };
        syncfs(work.path())?;
        let in_effect = self.commit(&stored, &name, &tag, &blobs, &layers, &reused)?;
        Ok(in_effect.record(&name, &tag))
    }

    /// Moves an import's verified blobs and layers into place and records the image.
    fn commit(
        &self,
        stored: &StoredImage,
        name: &str,
        tag: &str,
        blobs: &Path,
        layers: &Path,
        reused: &[String],
    ) -> Result<StoredImage, ImageError> {
        let _lock = self.lock()?;
        for diff_id in reused {
            if !self.layer(diff_id).is_dir() {
                return Err(ImageError::Invalid {
                    path: self.layer(diff_id),
                    reason: "the layer was removed while the import ran; import again".into(),
                });
            }
        }
        for (from_dir, is_layer) in [(blobs, false), (layers, true)] {
            for e in std::fs::read_dir(from_dir).map_err(io_err("listing", from_dir))? {
                let e = e.map_err(io_err("listing", from_dir))?;
                let hex = e.file_name().to_string_lossy().into_owned();
                let to = if is_layer {
                    self.layer(&hex)
                } else {
                    self.blob(&hex)
                };
                if to.exists() {
                    // Content-addressed: what is there is the same; never written again.
                    continue;
                }
                std::fs::rename(e.path(), &to).map_err(io_err("moving into place", &to))?;
            }
        }
        let hex = sha256_hex(&stored.id).expect("a verified digest");
        // An image already stored (the same config, perhaps from another format) keeps its
        // record; what this import brought that it does not use goes with the sweep below.
        let in_effect = match self.stored(hex) {
            Ok(existing) => existing,
            Err(_) => {
                write_atomic(
                    &self.by_id(hex),
                    &serde_json::to_vec_pretty(stored).expect("a record serializes"),
                )?;
                stored.clone()
            }
        };
        let mut names = self.names()?;
        names.insert(key(name, tag), stored.id.clone());
        self.write_names(&names)?;
        // A name moved off another image may have left it unused.
        self.gc(&names)?;
        Ok(in_effect)
    }

    fn write_names(&self, names: &BTreeMap<String, String>) -> Result<(), ImageError> {
        write_atomic(
            &self.names_path(),
            &serde_json::to_vec_pretty(names).expect("names serialize"),
        )
    }

    /// Every image, by name and tag.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let mut out = Vec::new();
        for (k, id) in self.names()? {
            let (name, tag) = k.rsplit_once(':').unwrap_or((&k, "latest"));
            let hex = id_hex(&id).ok_or_else(|| ImageError::Invalid {
                path: self.names_path(),
                reason: format!("bad id {id:?}"),
            })?;
            out.push(self.stored(&hex)?.record(name, tag));
        }
        out.sort_by(|a, b| (&a.name, &a.tag).cmp(&(&b.name, &b.tag)));
        Ok(out)
    }

    /// The hex id and the `name:tag` keys a reference means: a name first, else an id or id
    /// prefix (every name of that image).
    fn find(
        &self,
        reference: &str,
        names: &BTreeMap<String, String>,
    ) -> Result<(String, Vec<String>), ImageError> {
        if let Ok((n, t)) = parse_reference(reference)
            && let Some(id) = names.get(&key(&n, &t))
        {
            let hex = id_hex(id).ok_or_else(|| ImageError::NotFound(reference.to_owned()))?;
            return Ok((hex, vec![key(&n, &t)]));
        }
        let prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
        if prefix.is_empty()
            || !prefix
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(ImageError::NotFound(reference.to_owned()));
        }
        let matches: Vec<String> = self
            .ids()?
            .into_iter()
            .filter(|h| h.starts_with(prefix))
            .collect();
        match matches.as_slice() {
            [] => Err(ImageError::NotFound(reference.to_owned())),
            [hex] => {
                let id = format!("sha256:{hex}");
                let keys = names
                    .iter()
                    .filter(|(_, v)| **v == id)
                    .map(|(k, _)| k.clone())
                    .collect();
                Ok((hex.clone(), keys))
            }
            many => Err(ImageError::Ambiguous(
                reference.to_owned(),
                many.iter().map(|h| &h[..12]).collect::<Vec<_>>().join(", "),
            )),
        }
    }

    /// `NAME[:TAG]` (tag `latest` by default), or an id or unambiguous id prefix
    /// (`sha256:…` or bare hex).
    pub fn resolve(&self, reference: &str) -> Result<ResolvedImage, ImageError> {
        let names = self.names()?;
        let (hex, keys) = self.find(reference, &names)?;
        let stored = self.stored(&hex)?;
        let (name, tag) = keys
            .first()
            .and_then(|k| k.rsplit_once(':'))
            .map_or(("<none>".to_owned(), "<none>".to_owned()), |(n, t)| {
                (n.to_owned(), t.to_owned())
            });
        let config_path = self.blob(&stored.id);
        let bytes = std::fs::read(&config_path).map_err(io_err("reading", &config_path))?;
        let config =
            oci_spec::image::ImageConfiguration::from_reader(bytes.as_slice()).map_err(|e| {
                ImageError::Invalid {
                    path: config_path.clone(),
                    reason: e.to_string(),
                }
            })?;
        let c = config.config().clone().unwrap_or_default();
        let mut layers = Vec::new();
        for d in &stored.diff_ids {
            let dir = self.layer(d);
            if !dir.is_dir() {
                return Err(ImageError::Invalid {
                    path: dir,
                    reason: format!("layer {d} of image {} is missing", stored.id),
                });
            }
            layers.push(dir);
        }
        Ok(ResolvedImage {
            id: stored.id,
            name,
            tag,
            layers,
            config: ImageConfig {
                entrypoint: c.entrypoint().clone().unwrap_or_default(),
                cmd: c.cmd().clone().unwrap_or_default(),
                env: c.env().clone().unwrap_or_default(),
                working_dir: c.working_dir().clone().filter(|w| !w.is_empty()),
                user: c.user().clone().filter(|u| !u.is_empty()),
            },
        })
    }

    /// Removes an image (all its names when given by id) and the blobs and layers no other
    /// image uses; refused while a container holds it.
    pub fn remove(&self, reference: &str) -> Result<ImageRecord, ImageError> {
        let _lock = self.lock()?;
        let mut names = self.names()?;
        let (hex, keys) = self.find(reference, &names)?;
        let live = self.live_holds(&hex)?;
        if !live.is_empty() {
            return Err(ImageError::InUse {
                image: reference.to_owned(),
                containers: live.join(", "),
            });
        }
        let stored = self.stored(&hex)?;
        let (name, tag) = keys
            .first()
            .and_then(|k| k.rsplit_once(':'))
            .map_or(("<none>", "<none>"), |nt| nt);
        let record = stored.record(name, tag);
        for k in &keys {
            names.remove(k);
        }
        self.write_names(&names)?;
        if keys.is_empty() || !names.values().any(|v| *v == stored.id) {
            remove_path(&self.by_id(&hex))?;
        }
        self.gc(&names)?;
        Ok(record)
    }

    /// Drops records no name refers to and no container holds, then the blobs and layers no
    /// record uses. Keeps going past errors and reports the first.
    fn gc(&self, names: &BTreeMap<String, String>) -> Result<(), ImageError> {
        let named: BTreeSet<&String> = names.values().collect();
        let mut errors = Vec::new();
        let mut blobs = BTreeSet::new();
        let mut layers = BTreeSet::new();
        for hex in self.ids()? {
            let id = format!("sha256:{hex}");
            if !named.contains(&id) {
                match self.live_holds(&hex) {
                    Ok(live) if live.is_empty() => {
                        if let Err(e) = remove_path(&self.by_id(&hex)) {
                            errors.push(e);
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => errors.push(e),
                }
            }
            match self.stored(&hex) {
                Ok(s) => {
                    blobs.insert(sha256_hex(&s.id).unwrap_or_default().to_owned());
                    blobs.insert(sha256_hex(&s.manifest).unwrap_or_default().to_owned());
                    for b in &s.layer_blobs {
                        blobs.insert(sha256_hex(b).unwrap_or_default().to_owned());
                    }
                    for d in &s.diff_ids {
                        layers.insert(sha256_hex(d).unwrap_or_default().to_owned());
                    }
                }
                // An unreadable record: keep everything rather than guess.
                Err(e) => return Err(e),
            }
        }
        for (dir, keep) in [("blobs/sha256", &blobs), ("layers", &layers)] {
            let dir = self.root.join(dir);
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) => {
                    errors.push(io_err("listing", &dir)(e));
                    continue;
                }
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name)
                    && let Err(e) = remove_path(&e.path())
                {
                    errors.push(e);
                }
            }
        }
        errors.into_iter().next().map_or(Ok(()), Err)
    }

    /// The containers that hold image `hex` and still exist; stale holds are removed.
    fn live_holds(&self, hex: &str) -> Result<Vec<String>, ImageError> {
        let dir = self.root.join("holds").join(hex);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io_err("listing", &dir)(e)),
        };
        let mut live = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            let container = e.file_name().to_string_lossy().into_owned();
            if container.ends_with(".tmp") {
                continue;
            }
            let run_dir = std::fs::read_to_string(&path).unwrap_or_default();
            let fresh = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| {
                SystemTime::now().duration_since(t).unwrap_or_default() < HOLD_GRACE
            });
            if fresh || container_exists(Path::new(run_dir.trim_end()), &container) {
                live.push(container);
            } else {
                remove_path(&path)?;
            }
        }
        live.sort();
        // Ignored: the directory stays when another hold appeared meanwhile.
        let _ = std::fs::remove_dir(&dir);
        Ok(live)
    }

    /// Records that container `container_id` (of run directory `run_dir`) uses the image.
    pub fn hold(
        &self,
        image_id: &str,
        container_id: &str,
        run_dir: &Path,
    ) -> Result<(), ImageError> {
        let hex = id_hex(image_id).ok_or_else(|| ImageError::NotFound(image_id.to_owned()))?;
        if container_id.is_empty() || container_id.contains('/') || container_id.starts_with('.') {
            return Err(ImageError::InvalidReference(
                container_id.to_owned(),
                "not a container id",
            ));
        }
        let _lock = self.lock()?;
        if !self.by_id(&hex).exists() {
            return Err(ImageError::NotFound(image_id.to_owned()));
        }
        let dir = self.root.join("holds").join(&hex);
        std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        // Not synced: a hold only has to stop `image rm` while its container lives, and
        // after a crash its container is gone and the hold is swept as stale, so an fsync
        // on every container start would buy nothing.
        let path = dir.join(container_id);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, run_dir.as_os_str().as_encoded_bytes())
            .map_err(io_err("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("replacing", &path))
    }

    /// Drops the record of [`Store::hold`]; a missing hold is not an error.
    pub fn release(&self, image_id: &str, container_id: &str) -> Result<(), ImageError> {
        let hex = id_hex(image_id).ok_or_else(|| ImageError::NotFound(image_id.to_owned()))?;
        if container_id.is_empty() || container_id.contains('/') {
            return Ok(());
        }
        let dir = self.root.join("holds").join(&hex);
        remove_path(&dir.join(container_id))?;
        // Ignored: other containers may still hold the image.
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    }
}

/// Whether a container with this id (or name) has a state in `run_dir`.
fn container_exists(run_dir: &Path, container: &str) -> bool {
    let run = RunDir(run_dir.to_owned());
    if run.load(container).is_ok() {
        return true;
    }
    // A run directory that cannot be read: keep the hold rather than guess.
    run.list().map_or(true, |l| {
        l.iter().any(|s| s.id == container || s.name == container)
    })
}

/// The media type of a layer blob, by its magic bytes.
fn layer_media_type(blob: &Path) -> Result<&'static str, ImageError> {
    let mut magic = [0u8; 4];
    let mut f = File::open(blob).map_err(io_err("opening", blob))?;
    let n = f.read(&mut magic).map_err(io_err("reading", blob))?;
    Ok(if magic[..n].starts_with(&[0x1f, 0x8b]) {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    } else if magic[..n].starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    } else {
        "application/vnd.oci.image.layer.v1.tar"
    })
}

/// Copies a layer blob into `dir` as `<hex>`, hashing it: its digest and size, checked
/// against what the source says.
fn copy_blob(
    from: &Path,
    dir: &Path,
    expected: Option<&str>,
    expected_size: Option<u64>,
) -> Result<(String, u64), ImageError> {
    let f = File::open(from).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            ImageError::Invalid {
                path: from.to_owned(),
                reason: "the layer blob is missing".into(),
            }
        } else {
            io_err("opening", from)(e)
        }
    })?;
    let tmp = dir.join("layer.tmp");
    let mut out = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    let mut hashing = Hashing {
        inner: io::BufReader::with_capacity(1 << 16, f),
        hash: Sha256::new(),
        bytes: 0,
    };
    io::copy(&mut hashing, &mut out).map_err(io_err("copying", from))?;
    out.sync_all().map_err(io_err("syncing", &tmp))?;
    let digest = format_digest(hashing.hash.finalize().as_slice());
    if let Some(expected) = expected
        && expected != digest
    {
        return Err(ImageError::DigestMismatch {
            what: format!("layer blob {}", from.display()),
            expected: expected.to_owned(),
            actual: digest,
        });
    }
    if let Some(size) = expected_size
        && size != hashing.bytes
    {
        return Err(ImageError::Invalid {
            path: from.to_owned(),
            reason: format!(
                "the layer blob is {} bytes, its descriptor says {size}",
                hashing.bytes
            ),
        });
    }
    let to = dir.join(sha256_hex(&digest).expect("a digest we made"));
    std::fs::rename(&tmp, &to).map_err(io_err("renaming", &to))?;
    Ok((digest, hashing.bytes))
}

/// Flushes the filesystem holding `path`, so that layers renamed into place are whole after
/// a crash.
fn syncfs(path: &Path) -> Result<(), ImageError> {
    let f = File::open(path).map_err(io_err("opening", path))?;
    // SAFETY: syncfs on a valid open descriptor.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io_err("syncing", path)(io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let p = |r: &str| parse_reference(r).map_err(|e| e.to_string());
        assert_eq!(p("busybox").unwrap(), ("busybox".into(), "latest".into()));
        assert_eq!(p("web:1.2").unwrap(), ("web".into(), "1.2".into()));
        assert_eq!(
            p("localhost:5000/org/app").unwrap(),
            ("localhost:5000/org/app".into(), "latest".into())
        );
        assert_eq!(
            p("localhost:5000/app:v1").unwrap(),
            ("localhost:5000/app".into(), "v1".into())
        );
        for (bad, why) in [
            ("", "the name must"),
            ("Bad Name", "the name must"),
            ("-x", "the name must"),
            ("a//b", "the name must"),
            ("app:", "the tag must"),
            ("app:.x", "the tag must"),
            ("app@sha256:00", "digest references"),
        ] {
            let e = p(bad).unwrap_err();
            assert!(
                e.contains(why) && e.contains(&format!("{bad:?}")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn ids() {
        let hex = "ab".repeat(32);
        assert_eq!(id_hex(&hex).as_deref(), Some(hex.as_str()));
        assert_eq!(
            id_hex(&format!("sha256:{hex}")).as_deref(),
            Some(hex.as_str())
        );
        assert_eq!(id_hex("sha256:abc"), None);
        assert_eq!(id_hex(&format!("sha512:{hex}")), None);
        assert_eq!(id_hex(&"../".repeat(22)), None);
    }

    #[test]
    fn an_empty_store_lists_nothing_and_finds_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(&tmp.path().join("images")).unwrap();
        assert!(s.list().unwrap().is_empty());
        let e = s.resolve("busybox").unwrap_err().to_string();
        assert!(e.contains("no image \"busybox\""), "{e}");
        let e = s.remove("abc").unwrap_err().to_string();
        assert!(e.contains("no image \"abc\""), "{e}");
        let e = s
            .hold(&"ab".repeat(32), "c1", tmp.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no image"), "{e}");
        s.release(&"ab".repeat(32), "c1").unwrap();
    }
}
