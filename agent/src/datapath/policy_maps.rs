//! Writing a policy diff into the datapath's maps (`hypha_ipcache4` and `hypha_ipcache6`,
//! `hypha_policy` and the flags of the endpoint maps), in the order that never drops
//! traffic both the old and the new policy allow: new identities first, then new entries,
//! then the endpoints' enforcement flags, then the removal of old entries and identities.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::lpm_trie::Key;
use hypha_common::{ENDPOINT_F_POLICY_MASK, IpcacheValue, maps};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::InstalledPolicy;
use super::ebpf::{EbpfError, Maps, is_not_found, lock, map_err};
use crate::policy::PolicyDiff;

fn lpm_key4(net: &Ipv4Net) -> Key<u32> {
    Key::new(
        u32::from(net.prefix_len()),
        u32::from_ne_bytes(net.network().octets()),
    )
}

fn lpm_key6(net: &Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

fn value(identity: u32) -> IpcacheValue {
    IpcacheValue { identity, flags: 0 }
}

/// Writes `net` → `identity` into the ipcache of its family.
fn ipcache_insert(m: &Maps, net: &IpNet, identity: u32) -> Result<(), EbpfError> {
    match net {
        IpNet::V4(n) => lock(&m.ipcache)
            .insert(&lpm_key4(n), value(identity), 0)
            .map_err(map_err("insert into", maps::IPCACHE4)),
        IpNet::V6(n) => lock(&m.ipcache6)
            .insert(&lpm_key6(n), value(identity), 0)
            .map_err(map_err("insert into", maps::IPCACHE6)),
    }
}

/// Removes `net` from the ipcache of its family; absent is fine.
fn ipcache_remove(m: &Maps, net: &IpNet) -> Result<(), EbpfError> {
    let (result, map) = match net {
        IpNet::V4(n) => (lock(&m.ipcache).remove(&lpm_key4(n)), maps::IPCACHE4),
        IpNet::V6(n) => (lock(&m.ipcache6).remove(&lpm_key6(n)), maps::IPCACHE6),
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(map_err("delete from", map)(e)),
    }
}

/// Applies `diff`; stops at the first error, which names the map and the operation.
/// Each map is locked for its own steps only.
pub(super) fn apply(m: &Maps, diff: &PolicyDiff) -> Result<(), EbpfError> {
    for (net, identity) in &diff.ipcache_set {
        ipcache_insert(m, net, *identity)?;
    }
    {
        let mut policy = lock(&m.policy);
        for (key, entry) in &diff.entries_set {
            policy
                .insert(key, entry, 0)
                .map_err(map_err("insert into", maps::POLICY))?;
        }
    }
    if !diff.flags_set.is_empty() {
        // One lock over the reads and writes: `set_flags` changes other bits of the same
        // values under it. The policy's bits only: the bandwidth and family bits are the
        // agent's, set apart.
        let wanted: BTreeMap<u32, u32> = diff.flags_set.iter().copied().collect();
        lock(&m.endpoints).set_flags_by_id(ENDPOINT_F_POLICY_MASK, &wanted)?;
    }
    {
        let mut policy = lock(&m.policy);
        for key in &diff.entries_del {
            match policy.remove(key) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err("delete from", maps::POLICY)(e)),
            }
        }
    }
    for net in &diff.ipcache_del {
        ipcache_remove(m, net)?;
    }
    Ok(())
}

/// What `hypha_ipcache4`, `hypha_ipcache6` and `hypha_policy` hold now.
pub(super) fn installed(m: &Maps) -> Result<InstalledPolicy, EbpfError> {
    let mut out = InstalledPolicy::default();
    {
        let ipcache = lock(&m.ipcache);
        for item in ipcache.iter() {
            let (key, value) = item.map_err(map_err("read", maps::IPCACHE4))?;
            let addr = Ipv4Addr::from(key.data().to_ne_bytes());
            let prefix = key.prefix_len().min(32) as u8;
            let net = Ipv4Net::new(addr, prefix).expect("prefix length clamped to 32");
            out.ipcache.insert(IpNet::V4(net), value.identity);
        }
    }
    {
        let ipcache = lock(&m.ipcache6);
        for item in ipcache.iter() {
            let (key, value) = item.map_err(map_err("read", maps::IPCACHE6))?;
            let addr = Ipv6Addr::from(key.data());
            let prefix = key.prefix_len().min(128) as u8;
            let net = Ipv6Net::new(addr, prefix).expect("prefix length clamped to 128");
            out.ipcache.insert(IpNet::V6(net), value.identity);
        }
    }
    let policy = lock(&m.policy);
    for item in policy.iter() {
        let (key, entry) = item.map_err(map_err("read", maps::POLICY))?;
        out.entries.insert(key, entry);
    }
    Ok(out)
}
