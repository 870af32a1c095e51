//! TCX links (and the socket programs' cgroup links) through bpf(2) directly: creating one (`BPF_LINK_CREATE`), pinning it
//! (`BPF_OBJ_PIN`), opening a pin (`BPF_OBJ_GET`), swapping its program
//! (`BPF_LINK_UPDATE`) and reading what it holds (`BPF_OBJ_GET_INFO_BY_FD`): its program,
//! and the device and hook it is attached to.
//!
//! aya's `SchedClassifier::attach` takes `&mut self` (it records the link in the
//! program), so two endpoints could not be attached at once through one loaded program;
//! these calls need only the program's fd, so concurrent attaches each wait out their own
//! RCU grace period in parallel, with no lock held.
//!
//! aya's `LinkInfo` gives the program id but not the device, and a link detached from
//! its device (`BPF_LINK_DETACH`, or its device deleted) keeps its program: only the
//! device's ifindex, 0 once detached, tells a detached link from an attached one.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_F_AFTER`: with no relative program, the new one goes last (what aya's
/// `LinkOrder::default()` asks for).
const BPF_F_AFTER: u32 = 1 << 4;
/// `enum bpf_link_type`: `BPF_LINK_TYPE_TCX`.
pub const BPF_LINK_TYPE_TCX: u32 = 11;
/// `enum bpf_attach_type`: `BPF_TCX_INGRESS`, `BPF_TCX_EGRESS`.
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;

/// The `obj_get` member of `union bpf_attr` (`obj_pin` has the same layout).
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// The `link_create` member of `union bpf_attr`, with its `tcx` member.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

/// The `link_update` member of `union bpf_attr`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// The `info` member of `union bpf_attr`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The start of `struct bpf_link_info` with its `tcx` member (the union starts at 16:
/// it holds 64-bit members).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcxLinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    _pad: u32,
    /// The device the link is attached to; 0 once it is detached.
    pub ifindex: u32,
    pub attach_type: u32,
}

/// bpf(2) with `attr`; the non-negative return value.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is one of the `#[repr(C)]` members of `union bpf_attr` above, of
    // the size given; the pointers inside it (paths, info buffers) outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A descriptor bpf(2) just returned.
fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn c_path(pin: &Path) -> io::Result<CString> {
    CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))
}

/// Opens the bpf object pinned at `pin`.
pub fn open_pin(pin: &Path) -> io::Result<OwnedFd> {
    let path = c_path(pin)?;
    let get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    bpf(BPF_OBJ_GET, &get).map(owned)
}

/// Pins the bpf object `fd` at `pin` (which must not exist).
pub fn pin(fd: BorrowedFd<'_>, pin: &Path) -> io::Result<()> {
    let path = c_path(pin)?;
    let attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    bpf(BPF_OBJ_PIN, &attr).map(drop)
}

/// Attaches program `prog` last on the TCX hook `attach_type` ([`BPF_TCX_INGRESS`] or
/// [`BPF_TCX_EGRESS`]) of device `ifindex`; the link lives as long as the returned fd
/// or a pin of it. Waits for an RCU grace period in the kernel.
pub fn tcx_attach(prog: BorrowedFd<'_>, ifindex: u32, attach_type: u32) -> io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        flags: BPF_F_AFTER,
        relative_fd: 0,
        _pad: 0,
        expected_revision: 0,
    };
    bpf(BPF_LINK_CREATE, &attr).map(owned)
}

/// Swaps program `prog` into `link` in place: the hook never runs without a program.
pub fn update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &attr).map(drop)
}

/// Reads what link `fd` holds.
pub fn info(fd: BorrowedFd<'_>) -> io::Result<TcxLinkInfo> {
    let mut info = TcxLinkInfo::default();
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<TcxLinkInfo>() as u32,
        info: &mut info as *mut TcxLinkInfo as u64,
    };
    // The kernel writes at most `info_len` bytes into `info`.
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok(info)
}

/// Reads the link pinned at `pin`.
pub fn read(pin: &Path) -> io::Result<TcxLinkInfo> {
    info(open_pin(pin)?.as_fd())
}

/// `enum bpf_link_type`: `BPF_LINK_TYPE_CGROUP`.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// The start of `struct bpf_link_info` with its `cgroup` member.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    _pad: u32,
    /// The cgroup's id (its directory's inode on cgroup2); 0 once the cgroup is gone.
    pub cgroup_id: u64,
    pub attach_type: u32,
    _pad2: u32,
}

/// Attaches program `prog` to the cgroup open as `cgroup` at `attach_type` (a
/// `BPF_CGROUP_*` hook) with a bpf_link: always in the multi mode (`BPF_F_ALLOW_MULTI`
/// is implied; the kernel refuses the flag itself for links). The link lives as long as
/// the returned fd or a pin of it.
pub fn cgroup_attach(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        // `target_fd` shares its place with `target_ifindex`.
        target_ifindex: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
        relative_fd: 0,
        _pad: 0,
        expected_revision: 0,
    };
    bpf(BPF_LINK_CREATE, &attr).map(owned)
}

/// Reads what the cgroup link `fd` holds.
pub fn cgroup_info(fd: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    let mut info = CgroupLinkInfo::default();
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<CgroupLinkInfo>() as u32,
        info: &mut info as *mut CgroupLinkInfo as u64,
    };
    // The kernel writes at most `info_len` bytes into `info`.
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(size_of::<ObjGetAttr>(), 24);
        assert_eq!(size_of::<InfoAttr>(), 16);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, expected_revision), 24);
        assert_eq!(size_of::<LinkCreateAttr>(), 32);
        assert_eq!(size_of::<LinkUpdateAttr>(), 16);
        assert_eq!(std::mem::offset_of!(TcxLinkInfo, ifindex), 16);
        assert_eq!(size_of::<TcxLinkInfo>(), 24);
        assert_eq!(std::mem::offset_of!(CgroupLinkInfo, cgroup_id), 16);
        assert_eq!(std::mem::offset_of!(CgroupLinkInfo, attach_type), 24);
    }
}
