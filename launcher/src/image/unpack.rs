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
        let xattrs = self.xattrs(&mut entry, kind)?;
        match kind {
            tar::EntryType::Directory => {
                if !self.clear(&path, true)? {
                    std::fs::create_dir(&path).map_err(self.io("creating", &path))?;
                }
                self.set_xattrs(&path, &xattrs)?;
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
                // After the chown, which clears security.capability.
                self.set_xattrs(&path, &xattrs)?;
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

    /// The extended attributes of a file or directory entry (from its PAX header) that
    /// [`keep_xattr`] keeps. Other entry kinds keep none (`user.*` cannot be set on them).
    fn xattrs(
        &self,
        entry: &mut tar::Entry<'_, impl Read>,
        kind: tar::EntryType,
    ) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
        if !(kind.is_dir() || kind.is_file()) {
            return Ok(Vec::new());
        }
        let Some(pax) = entry.pax_extensions().map_err(|e| self.read_error(e))? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for ext in pax {
            let ext = ext.map_err(|e| self.read_error(e))?;
            if let Ok(key) = ext.key()
                && let Some(name) = key.strip_prefix(PAX_XATTR)
                && keep_xattr(name, self.opts.privileged)
            {
                out.push((name.to_owned(), ext.value_bytes().to_vec()));
            }
        }
        Ok(out)
    }

    fn set_xattrs(&self, path: &Path, xattrs: &[(String, Vec<u8>)]) -> Result<(), ImageError> {
        for (name, value) in xattrs {
            set_xattr(path, name, value).map_err(|e| ImageError::Io {
                op: "setting an extended attribute of",
                path: path.to_owned(),
                source: io::Error::new(e.kind(), format!("{name}: {e}")),
            })?;
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

/// The PAX record prefix of an extended attribute (GNU tar's and every image tool's).
const PAX_XATTR: &str = "SCHILY.xattr.";

/// Whether a layer entry's extended attribute `name` is kept: `user.*` and POSIX ACLs
/// always; file capabilities (`security.capability`) only in a privileged import, as
/// setuid bits; nothing else: `trusted.*` is where overlayfs keeps its own state
/// (`trusted.overlay.*`, which an image must never set), and other `security.*` labels
/// belong to the host's security modules.
pub fn keep_xattr(name: &str, privileged: bool) -> bool {
    name.starts_with("user.")
        || name == "system.posix_acl_access"
        || name == "system.posix_acl_default"
        || (privileged && name == "security.capability")
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};

    use super::*;

    /// A tar of entries: (path, type, mode, uid, contents or link target).
    fn tar(entries: &[(&str, tar::EntryType, u32, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, mode, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_uid(1234);
            h.set_gid(5678);
            h.set_mtime(1_600_000_000);
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
                h.as_old_mut().linkname[..data.len()].copy_from_slice(data);
                h.set_size(0);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            } else {
                h.set_size(data.len() as u64);
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    /// A tar of one file `f` carrying the extended attributes `xattrs` in a PAX header.
    fn tar_with_xattrs(xattrs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let records: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("{PAX_XATTR}{k}"), *v))
            .collect();
        b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("f").unwrap();
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(2);
        h.set_cksum();
        b.append(&h, &b"x\n"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn which_extended_attributes_are_kept() {
        for (name, privileged, kept) in [
            ("user.mime_type", false, true),
            ("system.posix_acl_access", false, true),
            ("security.capability", false, false),
            ("security.capability", true, true),
            ("trusted.overlay.opaque", true, false),
            ("trusted.overlay.redirect", false, false),
            ("security.selinux", true, false),
        ] {
            assert_eq!(keep_xattr(name, privileged), kept, "{name} {privileged}");
        }
    }

    #[test]
    fn a_files_user_xattrs_are_kept_its_capabilities_only_if_privileged() {
        if !root() {
            eprintln!("skipped: security.capability needs root");
            return;
        }
        // v2 file capabilities: cap_net_raw permitted and effective.
        let mut caps = vec![0u8; 20];
        caps[..4].copy_from_slice(&0x0200_0001_u32.to_le_bytes());
        caps[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
        let bytes = tar_with_xattrs(&[
            ("user.origin", b"layer"),
            ("security.capability", &caps),
            ("trusted.overlay.redirect", b"/etc"),
        ]);
        for privileged in [false, true] {
            let (tmp, r) = run(&bytes, 1 << 20, privileged);
            r.unwrap();
            let f = tmp.path().join("layer/f");
            assert_eq!(
                get_xattr(&f, "user.origin").unwrap().as_deref(),
                Some(&b"layer"[..])
            );
            assert_eq!(
                get_xattr(&f, "security.capability").unwrap().is_some(),
                privileged,
                "file capabilities with --privileged only"
            );
            assert_eq!(get_xattr(&f, "trusted.overlay.redirect").unwrap(), None);
        }
    }

    const DIR: tar::EntryType = tar::EntryType::Directory;
    const FILE: tar::EntryType = tar::EntryType::Regular;
    const SYMLINK: tar::EntryType = tar::EntryType::Symlink;
    const LINK: tar::EntryType = tar::EntryType::Link;

    fn run(
        bytes: &[u8],
        max_bytes: u64,
        privileged: bool,
    ) -> (tempfile::TempDir, Result<u64, ImageError>) {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("layer");
        std::fs::create_dir(&dest).unwrap();
        let r = unpack(
            bytes,
            &dest,
            "sha256:test",
            &UnpackOptions {
                max_bytes,
                privileged,
            },
        );
        (tmp, r)
    }

    fn refused(bytes: &[u8], privileged: bool) -> String {
        let (_tmp, r) = run(bytes, 1 << 20, privileged);
        let e = r.expect_err("refused");
        assert!(matches!(e, ImageError::Hostile { .. }), "{e}");
        e.to_string()
    }

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn entry_paths() {
        assert_eq!(entry_path(b"./a/b").unwrap(), Some(PathBuf::from("a/b")));
        assert_eq!(
            entry_path(b"/etc//x").unwrap(),
            Some(PathBuf::from("etc/x"))
        );
        assert_eq!(entry_path(b"./").unwrap(), None);
        assert_eq!(entry_path(b"/").unwrap(), None);
        assert!(entry_path(b"a/../b").is_err());
        assert!(entry_path(b"../x").is_err());
    }

    #[test]
    fn symlink_targets() {
        let at = |l: &str, t: &str| symlink_escapes(Path::new(l), t.as_bytes());
        assert!(!at("bin/sh", "busybox"));
        assert!(!at("bin/sh", "../usr/bin/x"));
        assert!(!at("bin/sh", "/usr/bin/busybox"));
        assert!(!at("a/b/c", "../../x"));
        assert!(at("a/b/c", "../../../x"));
        assert!(at("x", ".."));
        assert!(at("x", "/../etc"));
        assert!(at("a/x", "./../../etc"));
        assert!(!at("a/x", "b/../../a"));
    }

    #[test]
    fn dotdot_entry_is_refused() {
        let e = refused(&tar(&[("a/../../evil", FILE, 0o644, b"x")]), false);
        assert!(e.contains("a/../../evil") && e.contains("`..`"), "{e}");
    }

    #[test]
    fn absolute_entry_is_taken_from_the_layer_root() {
        let (tmp, r) = run(&tar(&[("/etc/hosts", FILE, 0o644, b"x")]), 1 << 20, false);
        r.unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("layer/etc/hosts")).unwrap(),
            b"x"
        );
    }

    #[test]
    fn escaping_symlink_is_refused() {
        let e = refused(
            &tar(&[
                ("etc", DIR, 0o755, b""),
                ("etc/evil", SYMLINK, 0o777, b"../../tmp"),
            ]),
            false,
        );
        assert!(
            e.contains("outside the layer") && e.contains("etc/evil"),
            "{e}"
        );
        // Inside the layer, relative or absolute: kept as written.
        let (tmp, r) = run(
            &tar(&[
                ("bin/busybox", FILE, 0o755, b"x"),
                ("bin/sh", SYMLINK, 0o777, b"busybox"),
                ("usr/bin/sh", SYMLINK, 0o777, b"/bin/busybox"),
            ]),
            1 << 20,
            false,
        );
        r.unwrap();
        let l = tmp.path().join("layer");
        assert_eq!(
            std::fs::read_link(l.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert_eq!(
            std::fs::read_link(l.join("usr/bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
    }

    #[test]
    fn nothing_is_written_through_a_symlink() {
        let e = refused(
            &tar(&[
                ("sub", DIR, 0o755, b""),
                ("lnk", SYMLINK, 0o777, b"sub"),
                ("lnk/x", FILE, 0o644, b"x"),
            ]),
            false,
        );
        assert!(e.contains("parent lnk is a symlink"), "{e}");
        // A file entry over a symlink replaces the link, never writes its target.
        let (tmp, r) = run(
            &tar(&[
                ("target", FILE, 0o644, b"old"),
                ("lnk", SYMLINK, 0o777, b"target"),
                ("lnk", FILE, 0o644, b"new"),
            ]),
            1 << 20,
            false,
        );
        r.unwrap();
        let l = tmp.path().join("layer");
        assert_eq!(std::fs::read(l.join("target")).unwrap(), b"old");
        assert!(std::fs::symlink_metadata(l.join("lnk")).unwrap().is_file());
    }

    #[test]
    fn hard_links_must_name_an_earlier_file_of_the_layer() {
        let e = refused(&tar(&[("x", LINK, 0o644, b"/etc/shadow")]), false);
        assert!(e.contains("not an earlier file of this layer"), "{e}");
        let e = refused(&tar(&[("x", LINK, 0o644, b"../outside")]), false);
        assert!(e.contains("not an earlier file"), "{e}");
        let e = refused(
            &tar(&[
                ("d", DIR, 0o755, b""),
                ("l", SYMLINK, 0o777, b"d"),
                ("d/f", FILE, 0o644, b"x"),
                ("x", LINK, 0o644, b"l/f"),
            ]),
            false,
        );
        assert!(e.contains("not an earlier file"), "{e}");
        let (tmp, r) = run(
            &tar(&[("a", FILE, 0o644, b"x"), ("b", LINK, 0o644, b"a")]),
            1 << 20,
            false,
        );
        r.unwrap();
        let l = tmp.path().join("layer");
        assert_eq!(
            std::fs::metadata(l.join("a")).unwrap().ino(),
            std::fs::metadata(l.join("b")).unwrap().ino()
        );
    }

    #[test]
    fn devices_need_privilege_fifos_do_not() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Char);
        h.set_mode(0o666);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        b.append_data(&mut h, "dev/null", std::io::empty()).unwrap();
        let dev = b.into_inner().unwrap();
        let e = refused(&dev, false);
        assert!(e.contains("dev/null") && e.contains("--privileged"), "{e}");
        if root() {
            let (tmp, r) = run(&dev, 1 << 20, true);
            r.unwrap();
            let m = std::fs::symlink_metadata(tmp.path().join("layer/dev/null")).unwrap();
            assert!(m.file_type().is_char_device());
            assert_eq!(m.rdev(), nix::sys::stat::makedev(1, 3));
        }
        let (tmp, r) = run(
            &tar(&[("p", tar::EntryType::Fifo, 0o600, b"")]),
            1 << 20,
            false,
        );
        r.unwrap();
        let m = std::fs::symlink_metadata(tmp.path().join("layer/p")).unwrap();
        assert!(m.file_type().is_fifo());
    }

    #[test]
    fn setuid_is_stripped_unless_privileged() {
        let t = tar(&[("su", FILE, 0o4755, b"x"), ("sg", DIR, 0o2775, b"")]);
        let (tmp, r) = run(&t, 1 << 20, false);
        r.unwrap();
        let mode = |p: &str| {
            std::fs::metadata(tmp.path().join("layer").join(p))
                .unwrap()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("su"), 0o755);
        assert_eq!(mode("sg"), 0o775);
        if root() {
            let (tmp, r) = run(&t, 1 << 20, true);
            r.unwrap();
            let m = std::fs::metadata(tmp.path().join("layer/su"))
                .unwrap()
                .mode();
            assert_eq!(m & 0o7777, 0o4755);
        }
    }

    #[test]
    fn owners_modes_and_times_are_kept() {
        let (tmp, r) = run(
            &tar(&[
                ("d", DIR, 0o750, b""),
                ("d/f", FILE, 0o640, b"abc"),
                ("d/l", SYMLINK, 0o777, b"f"),
            ]),
            1 << 20,
            false,
        );
        assert_eq!(r.unwrap(), 3);
        let l = tmp.path().join("layer");
        for (p, mode) in [("d", 0o750), ("d/f", 0o640)] {
            let m = std::fs::metadata(l.join(p)).unwrap();
            assert_eq!(m.mode() & 0o7777, mode, "{p}");
            assert_eq!(m.mtime(), 1_600_000_000, "{p}");
            if root() {
                assert_eq!((m.uid(), m.gid()), (1234, 5678), "{p}");
            }
        }
        let m = std::fs::symlink_metadata(l.join("d/l")).unwrap();
        assert_eq!(m.mtime(), 1_600_000_000);
    }

    #[test]
    fn a_layer_over_the_limit_is_refused() {
        let big = vec![0u8; 5000];
        let (_tmp, r) = run(
            &tar(&[("a", FILE, 0o644, &big), ("b", FILE, 0o644, &big)]),
            8000,
            false,
        );
        let e = r.unwrap_err();
        assert!(matches!(e, ImageError::TooLarge { limit: 8000, .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains("sha256:test") && e.contains("8000 bytes"), "{e}");
        let (_tmp, r) = run(&tar(&[("a", FILE, 0o644, &big)]), 5000, false);
        assert_eq!(r.unwrap(), 5000, "exactly the limit is allowed");
    }

    #[test]
    fn whiteouts_become_overlayfs_whiteouts() {
        if !root() {
            eprintln!("skipped: whiteouts (mknod, trusted.* xattrs) need root");
            return;
        }
        let (tmp, r) = run(
            &tar(&[
                ("etc", DIR, 0o755, b""),
                ("etc/.wh.passwd", FILE, 0o644, b""),
                ("data", DIR, 0o755, b""),
                ("data/.wh..wh..opq", FILE, 0o644, b""),
                ("data/new", FILE, 0o644, b"n"),
            ]),
            1 << 20,
            false,
        );
        r.unwrap();
        let l = tmp.path().join("layer");
        let m = std::fs::symlink_metadata(l.join("etc/passwd")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!((m.rdev(), m.uid(), m.gid()), (0, 0, 0));
        assert!(!l.join("etc/.wh.passwd").exists());
        assert_eq!(
            get_xattr(&l.join("data"), OPAQUE_XATTR).unwrap().as_deref(),
            Some(&b"y"[..])
        );
        assert!(!l.join("data/.wh..wh..opq").exists());
        assert_eq!(get_xattr(&l.join("etc"), OPAQUE_XATTR).unwrap(), None);
    }
}
