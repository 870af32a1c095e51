//! Writing a policy diff into the datapath's maps (`hypha_ipcache4`, `hypha_policy` and
//! the flags of `hypha_endpoints4`), in the order that never drops traffic both the old
//! and the new policy allow: new identities first, then new entries, then the endpoints'
//! enforcement flags, then the removal of old entries and identities.

use std::net::Ipv4Addr;

use aya::Ebpf;
use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, LpmTrie, MapData};
use hypha_common::{
    ENDPOINT_F_POLICY_MASK, EndpointInfo, EndpointKey4, IpcacheValue, PolicyEntry, PolicyKey, maps,
};
use ipnet::Ipv4Net;

use super::InstalledPolicy;
use super::ebpf::{EbpfError, is_not_found, map_err};
use crate::policy::PolicyDiff;

fn lpm_key(net: &Ipv4Net) -> Key<u32> {
    Key::new(
        u32::from(net.prefix_len()),
        u32::from_ne_bytes(net.network().octets()),
    )
}

fn missing(name: &'static str) -> EbpfError {
    EbpfError::Missing { kind: "map", name }
}

/// Applies `diff`; stops at the first error, which names the map and the operation.
pub fn apply(ebpf: &mut Ebpf, diff: &PolicyDiff) -> Result<(), EbpfError> {
    {
        let mut ipcache: LpmTrie<&mut MapData, u32, IpcacheValue> = LpmTrie::try_from(
            ebpf.map_mut(maps::IPCACHE4)
                .ok_or_else(|| missing(maps::IPCACHE4))?,
        )
        .map_err(map_err("open", maps::IPCACHE4))?;
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
        let mut policy: HashMap<&mut MapData, PolicyKey, PolicyEntry> = HashMap::try_from(
            ebpf.map_mut(maps::POLICY)
                .ok_or_else(|| missing(maps::POLICY))?,
        )
        .map_err(map_err("open", maps::POLICY))?;
        for (key, entry) in &diff.entries_set {
            policy
                .insert(key, entry, 0)
                .map_err(map_err("insert into", maps::POLICY))?;
        }
    }
    if !diff.flags_set.is_empty() {
        let mut endpoints: HashMap<&mut MapData, EndpointKey4, EndpointInfo> = HashMap::try_from(
            ebpf.map_mut(maps::ENDPOINTS4)
                .ok_or_else(|| missing(maps::ENDPOINTS4))?,
        )
        .map_err(map_err("open", maps::ENDPOINTS4))?;
        let current: Vec<(EndpointKey4, EndpointInfo)> =
            endpoints.iter().filter_map(Result::ok).collect();
        for (id, flags) in &diff.flags_set {
            // An endpoint not attached yet gets its flags when it is (see `attach`).
            for (key, mut info) in current
                .iter()
                .copied()
                .filter(|(_, i)| i.endpoint_id == *id)
            {
                // The policy's bits only: the bandwidth bit is the agent's, set apart.
                info.flags =
                    (info.flags & !ENDPOINT_F_POLICY_MASK) | (*flags & ENDPOINT_F_POLICY_MASK);
                endpoints
                    .insert(key, info, 0)
                    .map_err(map_err("update", maps::ENDPOINTS4))?;
            }
        }
    }
    {
        let mut policy: HashMap<&mut MapData, PolicyKey, PolicyEntry> = HashMap::try_from(
            ebpf.map_mut(maps::POLICY)
                .ok_or_else(|| missing(maps::POLICY))?,
        )
        .map_err(map_err("open", maps::POLICY))?;
        for key in &diff.entries_del {
            match policy.remove(key) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err("delete from", maps::POLICY)(e)),
            }
        }
    }
    let mut ipcache: LpmTrie<&mut MapData, u32, IpcacheValue> = LpmTrie::try_from(
        ebpf.map_mut(maps::IPCACHE4)
            .ok_or_else(|| missing(maps::IPCACHE4))?,
    )
    .map_err(map_err("open", maps::IPCACHE4))?;
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
pub fn installed(ebpf: &Ebpf) -> Result<InstalledPolicy, EbpfError> {
    let mut out = InstalledPolicy::default();
    let ipcache: LpmTrie<&MapData, u32, IpcacheValue> = LpmTrie::try_from(
        ebpf.map(maps::IPCACHE4)
            .ok_or_else(|| missing(maps::IPCACHE4))?,
    )
    .map_err(map_err("open", maps::IPCACHE4))?;
    for item in ipcache.iter() {
        let (key, value) = item.map_err(map_err("read", maps::IPCACHE4))?;
        let addr = Ipv4Addr::from(key.data().to_ne_bytes());
        let prefix = key.prefix_len().min(32) as u8;
        let net = Ipv4Net::new(addr, prefix).expect("prefix length clamped to 32");
        out.ipcache.insert(net, value.identity);
    }
    let policy: HashMap<&MapData, PolicyKey, PolicyEntry> = HashMap::try_from(
        ebpf.map(maps::POLICY)
            .ok_or_else(|| missing(maps::POLICY))?,
    )
    .map_err(map_err("open", maps::POLICY))?;
    for item in policy.iter() {
        let (key, entry) = item.map_err(map_err("read", maps::POLICY))?;
        out.entries.insert(key, entry);
    }
    Ok(out)
}
