//! Unpacking one layer, hostile-input safe (the rules are in the module doc of
//! [`crate::image`]).
//!
//! The destination is a fresh directory that only this unpacker writes, so anything found in
//! it came from earlier entries of the same layer. Nothing is ever written through a
//! symlink: each parent directory of an entry is checked with `symlink_metadata` (and made
//! if missing), files are created with `O_NOFOLLOW | O_EXCL`, and owners and times are set
//! with the no-follow calls. Directories' modes, owners and times are applied last, deepest
//! first, so a read-only directory or a child's creation does not undo them.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

use super::ImageError;

/// Prefix of a whiteout entry (`.wh.NAME` deletes `NAME` from the layers below).
const WHITEOUT_PREFIX: &str = ".wh.";
/// An opaque-directory marker: its directory hides everything below it in lower layers.
const OPAQUE: &str = ".wh..wh..opq";
/// The xattr overlayfs reads to treat a directory as opaque.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// How a layer is unpacked.
#[derive(Debug, Clone, Copy)]
pub struct UnpackOptions {
    /// Bound on the total bytes of the layer's files.
    pub max_bytes: u64,
    /// Keep device nodes and setuid/setgid bits.
    pub privileged: bool,
}

/// What a directory gets once every entry is written.
struct DirMeta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

/// Unpacks the tar stream `reader` (layer `layer`, for messages) into the empty directory
/// `dest`; the bytes of its files. On error `dest` holds a partial layer the caller removes.
pub fn unpack(
    reader: impl Read,
    dest: &Path,
    layer: &str,
    opts: &UnpackOptions,
) -> Result<u64, ImageError> {
    let mut archive = tar::Archive::new(reader);
    let mut unpacker = Unpacker {
        dest,
        layer,
        opts,
        total: 0,
        dirs: BTreeMap::new(),
    };
    let entries = archive.entries().map_err(|e| unpacker.read_error(e))?;
    for entry in entries {
        let entry = entry.map_err(|e| unpacker.read_error(e))?;
        unpacker.entry(entry)?;
    }
    unpacker.finish_dirs()?;
    Ok(unpacker.total)
}

struct Unpacker<'a> {
    dest: &'a Path,
    layer: &'a str,
    opts: &'a UnpackOptions,
    total: u64,
    /// Directories by their path relative to `dest` ("" is `dest` itself).
    dirs: BTreeMap<PathBuf, DirMeta>,
}

impl Unpacker<'_> {
    fn hostile(&self, entry: &str, reason: impl Into<String>) -> ImageError {
        ImageError::Hostile {
            layer: self.layer.to_owned(),
            entry: entry.to_owned(),
            reason: reason.into(),
        }
    }

    fn read_error(&self, e: io::Error) -> ImageError {
        ImageError::Invalid {
            path: PathBuf::from(self.layer),
            reason: format!("reading the layer's tar stream: {e}"),
        }
    }

    fn io(&self, op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
        let path = path.to_owned();
        move |source| ImageError::Io { op, path, source }
    }

    fn entry(&mut self, mut entry: tar::Entry<'_, impl Read>) -> Result<(), ImageError> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        let Some(rel) = entry_path(&raw).map_err(|r| self.hostile(&shown, r))? else {
            // The layer's root ("./"): its metadata goes to `dest`.
            if kind.is_dir() {
                let meta = self.meta(&entry)?;
                self.dirs.insert(PathBuf::new(), meta);
            }
            return Ok(());
        };
        self.ensure_parents(&rel, &shown)?;
        let path = self.dest.join(&rel);
        let name = rel.file_name().unwrap_or_default().to_string_lossy();
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(&rel, hidden, &shown);
        }
        let meta = self.meta(&entry)?;
        match kind {
            tar::EntryType::Directory => {
                if !self.clear(&path, true)? {
                    std::fs::create_dir(&path).map_err(self.io("creating", &path))?;
                }
                self.dirs.insert(rel, meta);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.clear(&path, false)?;
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(self.io("creating", &path))?;
                let budget = self.opts.max_bytes.saturating_sub(self.total);
                let mut writer = io::BufWriter::new(&file);
                let n = io::copy(
                    &mut (&mut entry).take(budget.saturating_add(1)),
                    &mut writer,
                )
                .map_err(|e| self.read_error(e))?;
                if n > budget {
                    return Err(ImageError::TooLarge {
                        layer: self.layer.to_owned(),
                        limit: self.opts.max_bytes,
                    });
                }
                drop(writer);
                self.total += n;
                chown_ok(std::os::unix::fs::fchown(
                    &file,
                    Some(meta.uid as u32),
                    Some(meta.gid as u32),
                ))
                .map_err(self.io("chown", &path))?;
                file.set_permissions(std::fs::Permissions::from_mode(meta.mode))
                    .map_err(self.io("chmod", &path))?;
                let t = TimeSpec::new(meta.mtime as i64, 0);
                nix::sys::stat::futimens(&file, &t, &t)
                    .map_err(|e| self.io("setting times of", &path)(e.into()))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.hostile(&shown, "a symlink without a target"))?
                    .into_owned();
                if symlink_escapes(&rel, &target) {
                    return Err(self.hostile(
                        &shown,
                        format!(
                            "symlink target {:?} is outside the layer",
                            String::from_utf8_lossy(&target)
                        ),
                    ));
                }
                self.clear(&path, false)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(self.io("creating symlink", &path))?;
                self.finish_special(&path, &meta, false)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.hostile(&shown, "a hard link without a target"))?
                    .into_owned();
                let not_earlier = || {
                    self.hostile(
                        &shown,
                        format!(
                            "hard link target {:?} is not an earlier file of this layer",
                            String::from_utf8_lossy(&target)
                        ),
                    )
                };
                let target_rel = entry_path(&target).ok().flatten().ok_or_else(not_earlier)?;
                if !self.real_parents(&target_rel) {
                    return Err(not_earlier());
                }
                let target_path = self.dest.join(&target_rel);
                match std::fs::symlink_metadata(&target_path) {
                    Ok(m) if !m.is_dir() => {}
                    _ => return Err(not_earlier()),
                }
                if target_path == path {
                    return Ok(());
                }
                self.clear(&path, false)?;
                std::fs::hard_link(&target_path, &path).map_err(self.io("linking", &path))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                if !self.opts.privileged {
                    return Err(self.hostile(
                        &shown,
                        "a device node (import with --privileged to keep device nodes)",
                    ));
                }
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                let sflag = if kind == tar::EntryType::Char {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                self.clear(&path, false)?;
                self.mknod(
                    &path,
                    sflag,
                    nix::sys::stat::makedev(major.into(), minor.into()),
                )?;
                self.finish_special(&path, &meta, true)?;
            }
            tar::EntryType::Fifo => {
                self.clear(&path, false)?;
                self.mknod(&path, SFlag::S_IFIFO, 0)?;
                self.finish_special(&path, &meta, true)?;
            }
            other => {
                return Err(self.hostile(&shown, format!("unsupported entry type {other:?}")));
            }
        }
        Ok(())
    }

    /// The entry's mode (setuid/setgid stripped unless privileged), owner and mtime.
    fn meta(&self, entry: &tar::Entry<'_, impl Read>) -> Result<DirMeta, ImageError> {
        let h = entry.header();
        let bad = |what: &str, e: io::Error| ImageError::Invalid {
            path: PathBuf::from(self.layer),
            reason: format!("an entry's {what}: {e}"),
        };
        let mut mode = h.mode().map_err(|e| bad("mode", e))? & 0o7777;
        if !self.opts.privileged {
            mode &= !0o6000;
        }
        Ok(DirMeta {
            mode,
            uid: h.uid().map_err(|e| bad("uid", e))?,
            gid: h.gid().map_err(|e| bad("gid", e))?,
            mtime: h.mtime().map_err(|e| bad("mtime", e))?,
        })
    }

    /// Makes the missing parents of `rel` and checks the present ones are real
    /// directories (not symlinks, not files).
    fn ensure_parents(&self, rel: &Path, shown: &str) -> Result<(), ImageError> {
        let mut cur = self.dest.to_path_buf();
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        for c in parent.components() {
            cur.push(c);
            match std::fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    let p = cur.strip_prefix(self.dest).unwrap_or(&cur);
                    return Err(self.hostile(
                        shown,
                        format!("its parent {} is a symlink or not a directory", p.display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir(&cur).map_err(self.io("creating", &cur))?;
                }
                Err(e) => return Err(self.io("inspecting", &cur)(e)),
            }
        }
        Ok(())
    }

    /// Whether every parent of `rel` exists and is a real directory.
    fn real_parents(&self, rel: &Path) -> bool {
        let mut cur = self.dest.to_path_buf();
        rel.parent().is_none_or(|parent| {
            parent.components().all(|c| {
                cur.push(c);
                std::fs::symlink_metadata(&cur).is_ok_and(|m| m.is_dir())
            })
        })
    }

    /// Makes room for a new entry at `path`: removes what is there, except a directory when
    /// the new entry is one too (then `true`: it is kept).
    fn clear(&self, path: &Path, new_is_dir: bool) -> Result<bool, ImageError> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io("inspecting", path)(e)),
            Ok(m) if m.is_dir() && new_is_dir => Ok(true),
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(path)
                .map(|()| false)
                .map_err(self.io("replacing", path)),
            Ok(_) => std::fs::remove_file(path)
                .map(|()| false)
                .map_err(self.io("replacing", path)),
        }
    }

    fn mknod(&self, path: &Path, kind: SFlag, dev: libc::dev_t) -> Result<(), ImageError> {
        nix::sys::stat::mknod(path, kind, Mode::from_bits_truncate(0o600), dev)
            .map_err(|e| self.io("creating node", path)(e.into()))
    }

    /// A whiteout entry `.wh.NAME` (`rel`): the overlayfs form of it.
    fn whiteout(&mut self, rel: &Path, hidden: &str, shown: &str) -> Result<(), ImageError> {
        let parent = self.dest.join(rel.parent().unwrap_or(Path::new("")));
        if format!("{WHITEOUT_PREFIX}{hidden}") == OPAQUE {
            return set_xattr(&parent, OPAQUE_XATTR, b"y")
                .map_err(self.io("marking opaque", &parent));
        }
        if hidden.starts_with(WHITEOUT_PREFIX) {
            // Other `.wh..wh.` names are another tool's bookkeeping, not whiteouts.
            return Ok(());
        }
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(self.hostile(shown, "a whiteout naming no file"));
        }
        let path = parent.join(hidden);
        self.clear(&path, false)?;
        self.mknod(&path, SFlag::S_IFCHR, 0)?;
        chown_ok(std::os::unix::fs::lchown(&path, Some(0), Some(0)))
            .map_err(self.io("chown", &path))
    }

    /// Owner, mode (unless a symlink) and mtime of a node that is not a regular file.
    fn finish_special(&self, path: &Path, meta: &DirMeta, chmod: bool) -> Result<(), ImageError> {
        chown_ok(std::os::unix::fs::lchown(
            path,
            Some(meta.uid as u32),
            Some(meta.gid as u32),
        ))
        .map_err(self.io("chown", path))?;
        if chmod {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(meta.mode))
                .map_err(self.io("chmod", path))?;
        }
        let t = TimeSpec::new(meta.mtime as i64, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            path,
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| self.io("setting times of", path)(e.into()))
    }

    /// Directories' owners, modes and times, deepest first.
    fn finish_dirs(&mut self) -> Result<(), ImageError> {
        for (rel, meta) in self.dirs.iter().rev() {
            let path = self.dest.join(rel);
            // A directory replaced by a later entry keeps that entry's metadata.
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                self.finish_special(&path, meta, true)?;
            }
        }
        Ok(())
    }
}

/// An entry's path relative to the layer root: `.` and empty components dropped, a leading
/// `/` dropped (absolute paths are taken from the layer root); `None` for the root itself.
/// A `..` component is refused.
pub fn entry_path(raw: &[u8]) -> Result<Option<PathBuf>, &'static str> {
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("a `..` path component"),
            Component::Prefix(_) => return Err("a path prefix"),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Whether a symlink at `link` (relative to the layer root) with `target` points outside the
/// layer: the target is resolved lexically, a relative one from the link's directory, an
/// absolute one from the layer root; going above the root at any step escapes.
pub fn symlink_escapes(link: &Path, target: &[u8]) -> bool {
    let mut depth = if target.starts_with(b"/") {
        0
    } else {
        link.components().count().saturating_sub(1)
    };
    for part in target.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                if depth == 0 {
                    return true;
                }
                depth -= 1;
            }
            _ => depth += 1,
        }
    }
    false
}

/// Accepts a failed chown when not root: an unprivileged unpack keeps its own owner.
fn chown_ok(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) && !nix::unistd::geteuid().is_root() => {
            Ok(())
        }
        r => r,
    }
}

/// Sets an xattr on `path` itself (not a symlink's target).
fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let n = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: valid NUL-terminated strings and a buffer of `value.len()` bytes.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads an xattr of `path` itself; `None` when absent.
pub fn get_xattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let n = CString::new(name).map_err(io::Error::other)?;
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of `buf.len()` bytes.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r >= 0 {
        buf.truncate(r as usize);
        return Ok(Some(buf));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENODATA) {
        Ok(None)
    } else {
        Err(e)
    }
}
