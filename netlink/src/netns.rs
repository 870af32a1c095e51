//! Entering a network namespace for a moment, on the current thread only.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

use crate::Error;

/// The calling thread is in another network namespace while this lives; dropping it (or
/// [`Guard::restore`]) goes back. `!Send`: `setns` moved this thread, not the process.
pub(crate) struct Guard {
    original: Option<File>,
    path: PathBuf,
    _not_send: PhantomData<*const ()>,
}

impl Guard {
    /// Remembers the thread's current network namespace and enters `target`.
    pub(crate) fn enter(target: BorrowedFd<'_>, path: &Path) -> Result<Self, Error> {
        let original =
            File::open("/proc/thread-self/ns/net").map_err(|source| Error::OpenNetns {
                path: "/proc/thread-self/ns/net".into(),
                source,
            })?;
        setns(target, CloneFlags::CLONE_NEWNET).map_err(|errno| Error::EnterNetns {
            path: path.to_owned(),
            source: io::Error::from(errno),
        })?;
        Ok(Self {
            original: Some(original),
            path: path.to_owned(),
            _not_send: PhantomData,
        })
    }

    /// Goes back to the original namespace, reporting a failure (after which the thread is
    /// still in the target namespace).
    pub(crate) fn restore(mut self) -> Result<(), Error> {
        let original = self.original.take();
        match original {
            Some(file) => {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| Error::RestoreNetns {
                    path: self.path.clone(),
                    source: io::Error::from(errno),
                })
            }
            None => Ok(()),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(file) = self.original.take() {
            // Only reached when unwinding; nothing can be reported from here.
            let _ = setns(file.as_fd(), CloneFlags::CLONE_NEWNET);
        }
    }
}

/// `SO_NETNS_COOKIE` (include/uapi/asm-generic/socket.h): the cookie of the socket's
/// network namespace, what `bpf_get_netns_cookie` returns for its sockets.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace at `path` (`/run/netns/<name>`,
/// `/proc/<pid>/ns/net`): the calling thread enters it for as long as it takes to make a
/// socket there, then comes back.
pub fn cookie(path: &Path) -> Result<u64, Error> {
    let file = File::open(path).map_err(|source| Error::OpenNetns {
        path: path.to_owned(),
        source,
    })?;
    let guard = Guard::enter(file.as_fd(), path)?;
    let cookie = socket_cookie(path);
    guard.restore()?;
    cookie
}

/// The cookie of the calling thread's own network namespace.
pub fn own_cookie() -> Result<u64, Error> {
    socket_cookie(Path::new("/proc/thread-self/ns/net"))
}

/// Makes a socket in the current network namespace and reads its namespace's cookie;
/// `path` names the namespace in errors.
fn socket_cookie(path: &Path) -> Result<u64, Error> {
    let err = |source| Error::NetnsCookie {
        path: path.to_owned(),
        source,
    };
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| err(io::Error::from(errno)))?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` outlive the call, and `len` is the size of `cookie`.
    let ret = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_own_namespace_has_a_cookie_and_the_same_one_each_time() {
        let first = super::own_cookie().expect("own netns cookie");
        assert_ne!(first, 0);
        assert_eq!(super::own_cookie().expect("own netns cookie again"), first);
        let by_path = super::cookie(std::path::Path::new("/proc/self/ns/net"));
        // Entering a namespace needs CAP_SYS_ADMIN; as root it is the same namespace.
        if nix::unistd::geteuid().is_root() {
            assert_eq!(by_path.expect("cookie by path"), first);
        }
    }
}
