//! The per-interface IPv6 switch of another network namespace (`disable_ipv6`), which
//! netlink cannot set: `/proc/sys/net` shows the namespace of the thread that opens it,
//! so the thread enters the namespace for the few reads and writes.

use std::io;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use crate::{Error, netns};

/// Makes sure IPv6 is enabled on each of `ifnames` in the network namespace `netns`
/// (`path` only names it in messages): where `net/ipv6/conf/<ifname>/disable_ipv6` reads
/// 1, writes 0. Returns the interfaces it enabled. A kernel without IPv6 (no
/// `/proc/sys/net/ipv6`) fails with [`Error::Sysctl`] naming the file.
///
/// Like [`crate::Netlink::in_netns`], the calling thread is in the namespace for the
/// duration of the call (a guard brings it back, even on unwinding).
pub fn enable_ipv6(
    netns: BorrowedFd<'_>,
    path: &Path,
    ifnames: &[&str],
) -> Result<Vec<String>, Error> {
    let guard = netns::Guard::enter(netns, path)?;
    let result = ifnames
        .iter()
        .filter_map(|ifname| enable_one(ifname, path).transpose())
        .collect::<Result<Vec<_>, _>>();
    guard.restore()?;
    result
}

fn enable_one(ifname: &str, netns: &Path) -> Result<Option<String>, Error> {
    let file = PathBuf::from(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"));
    let error = |op: &'static str| {
        let file = file.clone();
        move |source: io::Error| Error::Sysctl {
            op,
            file,
            netns: netns.to_owned(),
            source,
        }
    };
    let value = std::fs::read_to_string(&file).map_err(error("read"))?;
    if value.trim() == "0" {
        return Ok(None);
    }
    std::fs::write(&file, "0\n").map_err(error("write 0 to"))?;
    Ok(Some(ifname.to_owned()))
}
