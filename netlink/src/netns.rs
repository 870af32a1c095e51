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
