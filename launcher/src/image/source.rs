//! Reading an image source: an OCI image layout directory, an OCI archive (a tar of that
//! layout) or a Docker archive (`manifest.json` with `Config`, `RepoTags`, `Layers`).
//!
//! An archive is first extracted (regular files only, `..` refused) into the import's
//! temporary directory; then both archive kinds are read as directories. The manifest and
//! the config are read and their digests checked here; layers are checked as the store
//! copies and unpacks them.

use std::fs::File;
use std::io::{self, BufRead as _, BufReader, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::ImageError;
use super::unpack::entry_path;

/// Bound on a manifest, index or config read into memory.
const MAX_JSON_BYTES: u64 = 16 << 20;
/// How deep image indexes may nest.
const MAX_INDEX_DEPTH: usize = 4;

/// A parsed image, its small blobs verified.
pub(super) struct Parsed {
    /// `NAME[:TAG]` the image names itself by, if any.
    pub reference: Option<String>,
    /// The manifest's digest and bytes; `None` for a Docker archive (the store writes one).
    pub manifest: Option<(String, Vec<u8>)>,
    pub config: (String, Vec<u8>),
    pub config_parsed: ImageConfiguration,
    pub layers: Vec<LayerSource>,
}

/// Where a layer's blob is and what it must be.
pub(super) struct LayerSource {
    pub path: PathBuf,
    /// `sha256:<hex>` the blob must hash to, when the source names it.
    pub digest: Option<String>,
    pub size: Option<u64>,
    pub media_type: Option<String>,
}

fn invalid(path: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { op, path, source }
}

/// `sha256:<hex>` of `bytes`.
pub(super) fn sha256_digest(bytes: &[u8]) -> String {
    format_digest(Sha256::digest(bytes).as_slice())
}

/// `sha256:<hex>` of a finished hash.
pub(super) fn format_digest(hash: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in hash {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The hex of a `sha256:<64 hex>` digest, or `None` if it is not one (any other algorithm
/// or form is refused: the hex becomes a file name in the store).
pub(super) fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

/// Opens `path`, decompressing it when it starts with gzip's or zstd's magic bytes.
pub(super) fn decompressed(path: &Path) -> Result<Box<dyn Read>, ImageError> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    let mut r = BufReader::with_capacity(1 << 16, file);
    let magic = r.fill_buf().map_err(io_err("reading", path))?;
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::Decoder::with_buffer(r).map_err(io_err("decompressing", path))?)
    } else {
        Box::new(r)
    })
}

/// Bound on the files an image archive extracts to (a manifest, a config and the layers
/// each; an OCI archive has a few more).
const MAX_ARCHIVE_FILES: usize = 10_000;

/// Extracts the archive `file` (tar, possibly gzip- or zstd-compressed) into `dest`:
/// regular files only, paths with `..` refused, at most `max_bytes` in all and
/// [`MAX_ARCHIVE_FILES`] files; what else it holds is ignored.
pub(super) fn extract_archive(file: &Path, dest: &Path, max_bytes: u64) -> Result<(), ImageError> {
    let mut archive = tar::Archive::new(decompressed(file)?);
    let not_image = |_| ImageError::UnknownFormat(file.to_owned());
    let (mut bytes, mut files) = (0u64, 0usize);
    for entry in archive.entries().map_err(not_image)? {
        let mut entry = entry.map_err(not_image)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        // The header's size is what the tar reader copies out for this entry.
        bytes = bytes.saturating_add(entry.size());
        files += 1;
        if bytes > max_bytes {
            return Err(ImageError::ArchiveTooLarge {
                archive: file.to_owned(),
                limit: format!("the limit of {max_bytes} bytes (raise it with --max-archive-size)"),
            });
        }
        if files > MAX_ARCHIVE_FILES {
            return Err(ImageError::ArchiveTooLarge {
                archive: file.to_owned(),
                limit: format!("{MAX_ARCHIVE_FILES} files"),
            });
        }
        let raw = entry.path_bytes().into_owned();
        let rel = entry_path(&raw)
            .map_err(|r| invalid(file, format!("{}: {r}", String::from_utf8_lossy(&raw))))?
            .ok_or_else(|| invalid(file, "a file entry without a name"))?;
        let path = dest.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        let mut out = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("creating", &path))?;
        io::copy(&mut entry, &mut out).map_err(io_err("extracting", &path))?;
    }
    Ok(())
}

/// Reads the image in `dir` (the source `shown` in messages).
pub(super) fn read(dir: &Path, shown: &Path) -> Result<Parsed, ImageError> {
    if dir.join("index.json").is_file() {
        read_oci(dir, shown)
    } else if dir.join("manifest.json").is_file() {
        read_docker(dir, shown)
    } else {
        Err(ImageError::UnknownFormat(shown.to_owned()))
    }
}

/// Reads a small file whole, bounded.
fn read_small(path: &Path, shown: &Path) -> Result<Vec<u8>, ImageError> {
    let f = File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            let rel = path.file_name().unwrap_or_default().to_string_lossy();
            invalid(shown, format!("missing file {rel}"))
        } else {
            io_err("opening", path)(e)
        }
    })?;
    let mut bytes = Vec::new();
    f.take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("reading", path))?;
    if bytes.len() as u64 > MAX_JSON_BYTES {
        return Err(invalid(
            shown,
            format!("{} is larger than {MAX_JSON_BYTES} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

/// The path of a descriptor's blob in an OCI layout.
fn blob_path(dir: &Path, shown: &Path, d: &Descriptor) -> Result<PathBuf, ImageError> {
    let digest = d.digest().to_string();
    let hex = sha256_hex(&digest).ok_or_else(|| {
        invalid(
            shown,
            format!("unsupported digest {digest:?} (sha256 only)"),
        )
    })?;
    Ok(dir.join("blobs/sha256").join(hex))
}

/// A descriptor's blob, its digest and size checked.
fn read_blob(dir: &Path, shown: &Path, d: &Descriptor, what: &str) -> Result<Vec<u8>, ImageError> {
    let path = blob_path(dir, shown, d)?;
    let bytes = read_small(&path, shown)?;
    let actual = sha256_digest(&bytes);
    let expected = d.digest().to_string();
    if actual != expected {
        return Err(ImageError::DigestMismatch {
            what: format!("{what} {}", path.display()),
            expected,
            actual,
        });
    }
    if bytes.len() as u64 != d.size() {
        return Err(invalid(
            shown,
            format!(
                "{what} {expected} is {} bytes, its descriptor says {}",
                bytes.len(),
                d.size()
            ),
        ));
    }
    Ok(bytes)
}

/// This machine's architecture as OCI names it.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The manifest of an index: the only one, else the one for this machine, else the first.
fn pick<'a>(index: &'a ImageIndex, shown: &Path) -> Result<&'a Descriptor, ImageError> {
    let manifests = index.manifests();
    let this = manifests.iter().find(|d| {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == "linux" && p.architecture().to_string() == oci_arch()
        })
    });
    this.or_else(|| manifests.first())
        .ok_or_else(|| invalid(shown, "index.json lists no manifest"))
}

fn reference_of(d: &Descriptor) -> Option<String> {
    let a = d.annotations().as_ref()?;
    a.get("io.containerd.image.name")
        .or_else(|| a.get("org.opencontainers.image.ref.name"))
        .cloned()
}

fn read_oci(dir: &Path, shown: &Path) -> Result<Parsed, ImageError> {
    let index_path = dir.join("index.json");
    let index_bytes = read_small(&index_path, shown)?;
    let mut index = ImageIndex::from_reader(index_bytes.as_slice())
        .map_err(|e| invalid(shown, format!("index.json: {e}")))?;
    let top = pick(&index, shown)?.clone();
    let reference = reference_of(&top);
    let mut desc = top;
    let mut depth = 0;
    while desc.media_type().to_string() == "application/vnd.oci.image.index.v1+json"
        || desc.media_type().to_string()
            == "application/vnd.docker.distribution.manifest.list.v2+json"
    {
        depth += 1;
        if depth > MAX_INDEX_DEPTH {
            return Err(invalid(shown, "image indexes nest too deep"));
        }
        let bytes = read_blob(dir, shown, &desc, "index")?;
        index = ImageIndex::from_reader(bytes.as_slice())
            .map_err(|e| invalid(shown, format!("index {}: {e}", desc.digest())))?;
        desc = pick(&index, shown)?.clone();
    }
    let manifest_bytes = read_blob(dir, shown, &desc, "manifest")?;
    let manifest = ImageManifest::from_reader(manifest_bytes.as_slice())
        .map_err(|e| invalid(shown, format!("manifest {}: {e}", desc.digest())))?;
    let config_bytes = read_blob(dir, shown, manifest.config(), "config")?;
    let config_parsed = ImageConfiguration::from_reader(config_bytes.as_slice())
        .map_err(|e| invalid(shown, format!("config {}: {e}", manifest.config().digest())))?;
    let layers = manifest
        .layers()
        .iter()
        .map(|d| {
            Ok(LayerSource {
                path: blob_path(dir, shown, d)?,
                digest: Some(d.digest().to_string()),
                size: Some(d.size()),
                media_type: Some(d.media_type().to_string()),
            })
        })
        .collect::<Result<_, ImageError>>()?;
    Ok(Parsed {
        reference,
        manifest: Some((desc.digest().to_string(), manifest_bytes)),
        config: (manifest.config().digest().to_string(), config_bytes),
        config_parsed,
        layers,
    })
}

/// One image of a Docker archive's `manifest.json`.
#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The digest a Docker archive's file name promises: `blobs/sha256/<hex>` or
/// `<hex>.json` (a config).
fn named_digest(name: &str) -> Option<String> {
    let base = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json").filter(|n| !n.contains('/')))?;
    let digest = format!("sha256:{base}");
    sha256_hex(&digest).is_some().then_some(digest)
}

fn docker_file(dir: &Path, shown: &Path, name: &str) -> Result<PathBuf, ImageError> {
    let rel = entry_path(name.as_bytes())
        .map_err(|r| invalid(shown, format!("manifest.json names {name:?}: {r}")))?
        .ok_or_else(|| invalid(shown, "manifest.json names an empty path"))?;
    Ok(dir.join(rel))
}

fn read_docker(dir: &Path, shown: &Path) -> Result<Parsed, ImageError> {
    let bytes = read_small(&dir.join("manifest.json"), shown)?;
    let manifests: Vec<DockerManifest> = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(shown, format!("manifest.json: {e}")))?;
    let m = match manifests.as_slice() {
        [m] => m,
        [] => return Err(invalid(shown, "manifest.json lists no image")),
        _ => {
            return Err(invalid(
                shown,
                "manifest.json lists several images; import archives of one image",
            ));
        }
    };
    let config_path = docker_file(dir, shown, &m.config)?;
    let config_bytes = read_small(&config_path, shown)?;
    let config_digest = sha256_digest(&config_bytes);
    if let Some(expected) = named_digest(&m.config)
        && expected != config_digest
    {
        return Err(ImageError::DigestMismatch {
            what: format!("config {}", m.config),
            expected,
            actual: config_digest,
        });
    }
    let config_parsed = ImageConfiguration::from_reader(config_bytes.as_slice())
        .map_err(|e| invalid(shown, format!("config {}: {e}", m.config)))?;
    let layers = m
        .layers
        .iter()
        .map(|name| {
            Ok(LayerSource {
                path: docker_file(dir, shown, name)?,
                digest: named_digest(name),
                size: None,
                media_type: None,
            })
        })
        .collect::<Result<_, ImageError>>()?;
    Ok(Parsed {
        reference: m.repo_tags.as_ref().and_then(|t| t.first()).cloned(),
        manifest: None,
        config: (config_digest, config_bytes),
        config_parsed,
        layers,
    })
}
