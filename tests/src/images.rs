//! Test images, built offline (issue 15): layers as tar bytes and whole images written as an
//! OCI image layout directory, an OCI archive or a Docker archive, plus hostile variants
//! (a `../` entry, an escaping symlink, a blob whose digest does not match, a layer over a
//! size limit) for the import's refusals.
//!
//! The base layer is the host's static busybox (`/bin/busybox`, Debian's `busybox-static`,
//! installed by `cargo xtask setup`) with its applets as symlinks under `/bin`.

use std::io::Write as _;
use std::path::Path;

use serde_json::json;
use sha2::{Digest as _, Sha256};

/// The mtime of every entry the builders write (any fixed time keeps layers reproducible,
/// so two builds of one layer have one digest).
pub const MTIME: u64 = 1_700_000_000;

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The hex part of a `sha256:<hex>` digest.
pub fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// A layer's tar stream, entry by entry.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Complete);
        Self { tar }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    /// A directory.
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .expect("tar dir");
        self
    }

    /// A regular file, owned by root.
    pub fn file(self, path: &str, mode: u32, contents: &[u8]) -> Self {
        self.file_owned(path, mode, 0, 0, contents)
    }

    /// A regular file with an owner.
    pub fn file_owned(
        mut self,
        path: &str,
        mode: u32,
        uid: u64,
        gid: u64,
        contents: &[u8],
    ) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, contents.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.tar
            .append_data(&mut h, path, contents)
            .expect("tar file");
        self
    }

    /// A regular file of `size` zero bytes, streamed (for size limits).
    pub fn zeros(mut self, path: &str, size: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, size);
        self.tar
            .append_data(&mut h, path, std::io::Read::take(std::io::repeat(0), size))
            .expect("tar zeros");
        self
    }

    /// A symlink at `path` to `target` (taken as written, `..` and absolute included).
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut h, path, target)
            .expect("tar symlink");
        self
    }

    /// A hard link at `path` to the earlier entry `target`.
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.tar
            .append_link(&mut h, path, target)
            .expect("tar hard link");
        self
    }

    /// A fifo.
    pub fn fifo(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Fifo, 0o644, 0);
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .expect("tar fifo");
        self
    }

    /// A character device.
    pub fn char_device(mut self, path: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Char, 0o666, 0);
        h.set_device_major(major).expect("gnu header");
        h.set_device_minor(minor).expect("gnu header");
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .expect("tar char device");
        self
    }

    /// A whiteout deleting `path` from the layers below (`dir/.wh.name`).
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&wh, 0o644, b"")
    }

    /// An opaque-directory marker: `dir` hides everything below it in lower layers.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, b"")
    }

    /// A regular file whose name is written into the header as is, without the checks
    /// the tar crate makes (for `../` and absolute entries).
    pub fn raw_file(mut self, name: &str, contents: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, contents.len() as u64);
        let bytes = name.as_bytes();
        let field = &mut h.as_old_mut().name;
        assert!(bytes.len() < field.len(), "raw name too long: {name}");
        field[..bytes.len()].copy_from_slice(bytes);
        h.set_cksum();
        self.tar.append(&h, contents).expect("tar raw entry");
        self
    }

    /// The finished (uncompressed) tar bytes.
    pub fn finish(self) -> Vec<u8> {
        self.tar.into_inner().expect("tar finish")
    }
}

/// The applets of the host's busybox (`busybox --list`), without `busybox` itself.
pub fn busybox_applets() -> Vec<String> {
    let out = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("running /bin/busybox --list (install busybox-static)");
    assert!(out.status.success(), "busybox --list failed");
    String::from_utf8(out.stdout)
        .expect("applet names are UTF-8")
        .lines()
        .filter(|l| !l.is_empty() && *l != "busybox")
        .map(str::to_owned)
        .collect()
}

/// The base layer: `/bin/busybox` and its applet symlinks, `/etc/passwd`, `/etc/group`,
/// the usual empty directories, `/etc/deleteme` (for a whiteout above) and `/data/old`
/// (for an opaque directory above).
pub fn busybox_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox")
        .expect("reading /bin/busybox (install busybox-static: cargo xtask setup)");
    let mut b = LayerBuilder::new()
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox);
    for applet in busybox_applets() {
        b = b.symlink(&format!("bin/{applet}"), "busybox");
    }
    b.dir("etc", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )
        .file(
            "etc/group",
            0o644,
            b"root:x:0:\nnogroup:x:65534:\nstaff:x:50:nobody\n",
        )
        .file("etc/deleteme", 0o644, b"deleted by the layer above\n")
        .dir("data", 0o755)
        .file("data/old", 0o644, b"hidden by the opaque directory above\n")
        .dir("root", 0o700)
        .dir("tmp", 0o1777)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("dev", 0o755)
        .finish()
}

/// The second layer: deletes `/etc/deleteme` (a whiteout), makes `/data` opaque with a new
/// `/data/new`, adds `/app/hello.txt` and `/app/run.sh`.
pub fn app_layer() -> Vec<u8> {
    LayerBuilder::new()
        .dir("etc", 0o755)
        .whiteout("etc/deleteme")
        .dir("data", 0o755)
        .opaque("data")
        .file("data/new", 0o644, b"new\n")
        .dir("app", 0o755)
        .file("app/hello.txt", 0o644, b"hello from the app layer\n")
        .file(
            "app/run.sh",
            0o755,
            b"#!/bin/sh\necho \"cwd=$(pwd) greeting=$GREETING\"\n",
        )
        .finish()
}

/// A layer with a `../` entry.
pub fn dotdot_layer() -> Vec<u8> {
    LayerBuilder::new()
        .dir("etc", 0o755)
        .raw_file("../escaped", b"outside\n")
        .finish()
}

/// A layer whose symlink points outside the layer root, then a file written through it.
pub fn escaping_symlink_layer() -> Vec<u8> {
    LayerBuilder::new()
        .dir("etc", 0o755)
        .symlink("etc/evil", "../../../../tmp")
        .finish()
}

/// A layer that unpacks to `size` bytes (one file of zeros).
pub fn big_layer(size: u64) -> Vec<u8> {
    LayerBuilder::new()
        .dir("big", 0o755)
        .zeros("big/zeros", size)
        .finish()
}

/// How layers are stored in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// `tar` compressed this way.
    pub fn apply(self, tar: &[u8]) -> Vec<u8> {
        match self {
            Compression::None => tar.to_vec(),
            Compression::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(tar).expect("gzip");
                gz.finish().expect("gzip")
            }
            Compression::Zstd => zstd::encode_all(tar, 1).expect("zstd"),
        }
    }
}

/// A deliberate defect of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    None,
    /// The first layer's blob differs from the bytes its descriptor's digest names.
    LayerBlob,
    /// The config's first `diff_ids` entry names other bytes than the uncompressed layer.
    DiffId,
}

/// What an image holds: its layers (uncompressed tars, base first) and its config.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// `NAME:TAG` recorded in the image (`org.opencontainers.image.ref.name`, `RepoTags`).
    pub reference: Option<String>,
    pub layers: Vec<Vec<u8>>,
    pub compression: Compression,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub tamper: Tamper,
}

impl ImageSpec {
    /// An image of these layers with no config beyond `PATH`.
    pub fn new(reference: Option<&str>, layers: Vec<Vec<u8>>) -> Self {
        Self {
            reference: reference.map(str::to_owned),
            layers,
            compression: Compression::None,
            entrypoint: vec![],
            cmd: vec![],
            env: vec!["PATH=/bin".to_owned()],
            working_dir: None,
            user: None,
            tamper: Tamper::None,
        }
    }

    /// The busybox base layer and the app layer, with an entrypoint (`/bin/sh -c`), a
    /// command (`/app/run.sh`), `GREETING=hi` and working directory `/app`.
    pub fn busybox_app(reference: Option<&str>) -> Self {
        Self {
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["/app/run.sh".into()],
            env: vec!["PATH=/bin".into(), "GREETING=hi".into()],
            working_dir: Some("/app".into()),
            ..Self::new(reference, vec![busybox_layer(), app_layer()])
        }
    }

    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }

    pub fn tamper(mut self, t: Tamper) -> Self {
        self.tamper = t;
        self
    }

    /// The blobs: (digest, bytes) of each stored layer, the config and the manifest.
    fn blobs(&self) -> Blobs {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, tar) in self.layers.iter().enumerate() {
            let stored = self.compression.apply(tar);
            let mut diff_id = digest(tar);
            if i == 0 && self.tamper == Tamper::DiffId {
                diff_id = digest(b"not this layer");
            }
            diff_ids.push(diff_id);
            let d = digest(&stored);
            let mut bytes = stored;
            if i == 0 && self.tamper == Tamper::LayerBlob {
                let last = bytes.len() - 1;
                bytes[last] ^= 0xff;
            }
            layers.push((d, bytes));
        }
        let mut config = json!({
            "created": "2026-01-02T03:04:05Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": self.env,
            },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let c = &mut config["config"];
        if !self.entrypoint.is_empty() {
            c["Entrypoint"] = json!(self.entrypoint);
        }
        if !self.cmd.is_empty() {
            c["Cmd"] = json!(self.cmd);
        }
        if let Some(w) = &self.working_dir {
            c["WorkingDir"] = json!(w);
        }
        if let Some(u) = &self.user {
            c["User"] = json!(u);
        }
        let config = serde_json::to_vec(&config).expect("config serializes");
        let config = (digest(&config), config);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.0,
                "size": config.1.len(),
            },
            "layers": layers.iter().map(|(d, b)| json!({
                "mediaType": self.compression.media_type(),
                "digest": d,
                // The real size, so that a tampered blob fails on its digest only.
                "size": b.len(),
            })).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest).expect("manifest serializes");
        Blobs {
            layers,
            config,
            manifest: (digest(&manifest), manifest),
        }
    }

    /// Writes the image as an OCI image layout directory at `dir` (created).
    pub fn write_oci_layout(&self, dir: &Path) {
        let files = self.oci_files();
        for (name, bytes) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }

    /// Writes the image as an OCI archive (a tar of the layout) at `path`.
    pub fn write_oci_archive(&self, path: &Path) {
        write_tar(path, self.oci_files());
    }

    /// Writes the image as a Docker archive (`docker save`'s `manifest.json` form) at `path`.
    pub fn write_docker_archive(&self, path: &Path) {
        let blobs = self.blobs();
        let mut files = Vec::new();
        let config_name = format!("{}.json", hex(&blobs.config.0));
        let mut layer_names = Vec::new();
        for (d, bytes) in &blobs.layers {
            let name = format!("{}/layer.tar", hex(d));
            files.push((name.clone(), bytes.clone()));
            layer_names.push(name);
        }
        files.push((config_name.clone(), blobs.config.1.clone()));
        let manifest = json!([{
            "Config": config_name,
            "RepoTags": self.reference.iter().collect::<Vec<_>>(),
            "Layers": layer_names,
        }]);
        files.push((
            "manifest.json".to_owned(),
            serde_json::to_vec(&manifest).expect("manifest serializes"),
        ));
        write_tar(path, files);
    }

    /// The files of the OCI layout: (relative path, bytes).
    fn oci_files(&self) -> Vec<(String, Vec<u8>)> {
        let blobs = self.blobs();
        let mut files = vec![(
            "oci-layout".to_owned(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        )];
        let mut descriptor = json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": blobs.manifest.0,
            "size": blobs.manifest.1.len(),
        });
        if let Some(r) = &self.reference {
            descriptor["annotations"] = json!({ "org.opencontainers.image.ref.name": r });
        }
        let index = json!({ "schemaVersion": 2, "manifests": [descriptor] });
        files.push((
            "index.json".to_owned(),
            serde_json::to_vec(&index).expect("index serializes"),
        ));
        for (d, bytes) in blobs.layers.iter().chain([&blobs.config, &blobs.manifest]) {
            files.push((format!("blobs/sha256/{}", hex(d)), bytes.clone()));
        }
        files
    }

    /// The digest of the image's config, which is its id in the store (`sha256:<hex>`).
    pub fn id(&self) -> String {
        self.blobs().config.0
    }

    /// The digest of each layer's uncompressed tar (the store's layer directory names).
    pub fn diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| digest(l)).collect()
    }
}

struct Blobs {
    layers: Vec<(String, Vec<u8>)>,
    config: (String, Vec<u8>),
    manifest: (String, Vec<u8>),
}

fn write_tar(path: &Path, files: Vec<(String, Vec<u8>)>) {
    let f = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut tar = tar::Builder::new(f);
    let mut dirs = std::collections::BTreeSet::new();
    for (name, _) in &files {
        let mut p = Path::new(name).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_owned());
            p = d.parent();
        }
    }
    for d in dirs {
        let mut h = LayerBuilder::header(tar::EntryType::Directory, 0o755, 0);
        tar.append_data(&mut h, &d, std::io::empty())
            .expect("tar dir");
    }
    for (name, bytes) in files {
        let mut h = LayerBuilder::header(tar::EntryType::Regular, 0o644, bytes.len() as u64);
        tar.append_data(&mut h, &name, bytes.as_slice())
            .expect("tar file");
    }
    tar.into_inner()
        .expect("tar finish")
        .sync_all()
        .expect("sync");
}

/// Every path under `root` with its kind and size, sorted: a store before and after a
/// refused import must list the same.
pub fn listing(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            let rel = path.strip_prefix(root).expect("under root").display();
            if meta.is_dir() {
                out.push(format!("{rel}/"));
                walk(root, &path, out);
            } else {
                out.push(format!("{rel} {}", meta.len()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// A unique, temporary image store for one test (`--image-dir`), removed on drop, also when
/// the test panics.
pub struct ImageDir {
    pub dir: std::path::PathBuf,
}

impl Default for ImageDir {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(crate::netns::unique_name("hypha-images"));
        Self { dir }
    }

    /// `hypha ARGS --image-dir DIR` to completion.
    pub fn hypha(&self, args: &[&str]) -> crate::launcher::Run {
        let out = std::process::Command::new(crate::binary("hypha"))
            .args(args)
            .env("HYPHA_IMAGE_DIR", &self.dir)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("start hypha");
        crate::launcher::Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `hypha image import SRC ARGS...`.
    pub fn import(&self, src: &Path, args: &[&str]) -> crate::launcher::Run {
        let src = src.to_str().expect("a UTF-8 path");
        let mut all = vec!["image", "import", src];
        all.extend_from_slice(args);
        self.hypha(&all)
    }

    /// Writes `spec` as an OCI layout at `dir` and imports it; panics on failure.
    pub fn import_layout(&self, spec: &ImageSpec, dir: &Path) {
        spec.write_oci_layout(dir);
        self.import(dir, &[]).ok();
    }

    /// `hypha image ls -o json`.
    pub fn ls(&self) -> Vec<serde_json::Value> {
        let out = self.hypha(&["image", "ls", "-o", "json"]);
        serde_json::from_str::<serde_json::Value>(out.ok())
            .unwrap_or_else(|e| panic!("image ls -o json is not JSON ({e}): {out:?}"))
            .as_array()
            .cloned()
            .expect("image ls -o json is an array")
    }
}

impl Drop for ImageDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
