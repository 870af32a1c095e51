//! One module per CNI operation.

pub mod add;
pub mod check;
pub mod del;
pub mod gc;
pub mod status;
pub mod version;

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use hypha_netlink::Netlink;

use crate::error::Error;

/// Opens the container's network namespace and a netlink socket inside it: the file is
/// kept to hand the veth peer to the kernel, the socket for everything done in there.
pub(crate) fn open_netns(path: &Path) -> Result<(File, Netlink), Error> {
    let file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => Error::NetnsMissing {
            path: path.to_owned(),
        },
        _ => Error::Netns {
            path: path.to_owned(),
            source: hypha_netlink::Error::OpenNetns {
                path: path.to_owned(),
                source,
            },
        },
    })?;
    let netlink = Netlink::in_netns_fd(file.as_fd(), path).map_err(|source| Error::Netns {
        path: path.to_owned(),
        source,
    })?;
    Ok((file, netlink))
}
