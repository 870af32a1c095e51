//! What can go wrong talking rtnetlink, with the operation and the namespace in every message.

use std::io;
use std::path::PathBuf;

/// Errors of [`crate::Netlink`]. Each one names the operation, the interface and the
/// network namespace concerned, so that callers can report it as is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The network namespace file could not be opened (absent, not readable, ...).
    #[error("cannot open network namespace {path}: {source}")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `setns(CLONE_NEWNET)` into the target namespace failed (for instance because the
    /// file is not a network namespace).
    #[error("cannot enter network namespace {path}: {source}")]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The thread could not go back to its original network namespace. The thread is left
    /// in `path`; the caller should stop using it.
    #[error("cannot return to the original network namespace after entering {path}: {source}")]
    RestoreNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The cookie of a network namespace could not be read (a socket made inside it, then
    /// `getsockopt(SO_NETNS_COOKIE)`, Linux 5.14 and later).
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    NetnsCookie {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A sysctl of another network namespace could not be read or written (see
    /// [`crate::sysctl`]); no such file means the kernel has no IPv6.
    #[error("cannot {op} {} in network namespace {}: {source}", .file.display(), .netns.display())]
    Sysctl {
        op: &'static str,
        file: PathBuf,
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The netlink socket could not be created, bound or configured.
    #[error("cannot open a netlink socket in {netns}: {source}")]
    Socket {
        netns: String,
        #[source]
        source: io::Error,
    },
    /// An interface with this name already exists (`EEXIST` on creation).
    #[error("interface {name} already exists in {netns}")]
    LinkExists { name: String, netns: String },
    /// The peer of a veth could not be created because its name is taken in the peer's
    /// network namespace.
    #[error("interface {name} already exists in the veth peer's network namespace")]
    PeerExists { name: String },
    /// The interface (a name or `#index`) does not exist (`ENODEV`/`ENOENT`).
    #[error("interface {link} not found in {netns}")]
    LinkNotFound { link: String, netns: String },
    /// The kernel refused the request with another errno.
    #[error("{op} in {netns} failed: {source}{}", ext_ack_suffix(.ext_ack))]
    Kernel {
        op: String,
        netns: String,
        #[source]
        source: io::Error,
        /// The kernel's extended-ack message, when it gave one.
        ext_ack: Option<String>,
    },
    /// Sending the request or reading the answer failed.
    #[error("{op} in {netns}: netlink I/O failed: {source}")]
    Io {
        op: String,
        netns: String,
        #[source]
        source: io::Error,
    },
    /// The kernel's answer could not be decoded or did not follow the protocol.
    #[error("{op} in {netns}: unexpected answer from the kernel: {detail}")]
    Protocol {
        op: String,
        netns: String,
        detail: String,
    },
}

impl Error {
    /// The errno behind this error, if it came from the kernel or a system call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::LinkExists { .. } | Error::PeerExists { .. } => Some(libc::EEXIST),
            Error::LinkNotFound { .. } => Some(libc::ENODEV),
            Error::OpenNetns { source, .. }
            | Error::EnterNetns { source, .. }
            | Error::RestoreNetns { source, .. }
            | Error::NetnsCookie { source, .. }
            | Error::Socket { source, .. }
            | Error::Sysctl { source, .. }
            | Error::Kernel { source, .. }
            | Error::Io { source, .. } => source.raw_os_error(),
            Error::Protocol { .. } => None,
        }
    }
}

fn ext_ack_suffix(ext_ack: &Option<String>) -> String {
    match ext_ack {
        Some(msg) => format!(" ({msg})"),
        None => String::new(),
    }
}

/// A failed request, before the typed method that sent it adds its context.
#[derive(Debug)]
pub(crate) enum RequestError {
    /// The kernel answered with a negative errno.
    Errno {
        errno: i32,
        ext_ack: Option<String>,
    },
    Io(io::Error),
    Protocol(String),
}

impl RequestError {
    pub(crate) fn errno(&self) -> Option<i32> {
        match self {
            RequestError::Errno { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Turns this into an [`Error`] for operation `op` in namespace `netns`, mapping
    /// `ENODEV`/`ENOENT` to [`Error::LinkNotFound`] when `link` names the interface.
    pub(crate) fn into_error(self, op: String, netns: &str, link: Option<&str>) -> Error {
        let netns = netns.to_owned();
        match self {
            RequestError::Errno { errno, .. }
                if link.is_some() && (errno == libc::ENODEV || errno == libc::ENOENT) =>
            {
                Error::LinkNotFound {
                    link: link.unwrap_or_default().to_owned(),
                    netns,
                }
            }
            RequestError::Errno { errno, ext_ack } => Error::Kernel {
                op,
                netns,
                source: io::Error::from_raw_os_error(errno),
                ext_ack,
            },
            RequestError::Io(source) => Error::Io { op, netns, source },
            RequestError::Protocol(detail) => Error::Protocol { op, netns, detail },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_names_the_link() {
        let e = RequestError::Errno {
            errno: libc::ENODEV,
            ext_ack: None,
        }
        .into_error(
            "set eth0 up".into(),
            "network namespace /run/netns/x",
            Some("eth0"),
        );
        assert_eq!(
            e.to_string(),
            "interface eth0 not found in network namespace /run/netns/x"
        );
        assert_eq!(e.errno(), Some(libc::ENODEV));
    }

    #[test]
    fn kernel_errors_carry_op_errno_and_ext_ack() {
        let e = RequestError::Errno {
            errno: libc::EINVAL,
            ext_ack: Some("Invalid prefix length".into()),
        }
        .into_error(
            "add address 10.0.0.1/40 to #3".into(),
            "the host network namespace",
            None,
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with("add address 10.0.0.1/40 to #3 in the host network namespace failed: "),
            "{msg}"
        );
        assert!(msg.ends_with(" (Invalid prefix length)"), "{msg}");
        assert_eq!(e.errno(), Some(libc::EINVAL));
    }
}
