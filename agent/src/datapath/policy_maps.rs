//! Writing a policy diff into the datapath's maps (`hypha_ipcache4`, `hypha_policy` and
//! the flags of the endpoint maps), in the order that never drops traffic both the old
//! and the new policy allow: new identities first, then new entries, then the endpoints'
//! enforcement flags, then the removal of old entries and identities.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use aya::maps::lpm_trie::Key;
use hypha_common::{ENDPOINT_F_POLICY_MASK, IpcacheValue, maps};
use ipnet::Ipv4Net;

use super::InstalledPolicy;
use super::ebpf::{EbpfError, Maps, is_not_found, lock, map_err};
use crate::policy::PolicyDiff;

fn lpm_key(net: &Ipv4Net) -> Key<u32> {
    Key::new(
        u32::from(net.prefix_len()),
        u32::from_ne_bytes(net.network().octets()),
    )
}

/// Applies `diff`; stops at the first error, which names the map and the operation.
/// Each map is locked for its own steps only.
pub(super) fn apply(m: &Maps, diff: &PolicyDiff) -> Result<(), EbpfError> {
    {
        let mut ipcache = lock(&m.ipcache);
        for (net, identity) in &diff.ipcache_set {
            ipcache
                .insert(
                    &lpm_key(net),
                    IpcacheValue {
                        identity: *identity,
                        flags: 0,
                    },
                    0,
                )
                .map_err(map_err("insert into", maps::IPCACHE4))?;
        }
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
    let mut ipcache = lock(&m.ipcache);
    for net in &diff.ipcache_del {
        match ipcache.remove(&lpm_key(net)) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(map_err("delete from", maps::IPCACHE4)(e)),
        }
    }
    Ok(())
}

/// What `hypha_ipcache4` and `hypha_policy` hold now.
pub(super) fn installed(m: &Maps) -> Result<InstalledPolicy, EbpfError> {
    let mut out = InstalledPolicy::default();
    {
        let ipcache = lock(&m.ipcache);
        for item in ipcache.iter() {
            let (key, value) = item.map_err(map_err("read", maps::IPCACHE4))?;
            let addr = Ipv4Addr::from(key.data().to_ne_bytes());
            let prefix = key.prefix_len().min(32) as u8;
            let net = Ipv4Net::new(addr, prefix).expect("prefix length clamped to 32");
            out.ipcache.insert(net, value.identity);
        }
    }
    let policy = lock(&m.policy);
    for item in policy.iter() {
        let (key, entry) = item.map_err(map_err("read", maps::POLICY))?;
        out.entries.insert(key, entry);
    }
    Ok(out)
}
