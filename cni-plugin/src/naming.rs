//! Names the plugin gives to what it creates.

use sha2::{Digest, Sha256};

/// Prefix of every host-side veth the plugin creates.
pub const HOST_IFNAME_PREFIX: &str = "hyp";

/// Name of the host-side veth for interface `ifname` of container `container_id`:
/// `hyp` followed by the first 12 hex digits of `sha256(container_id + "/" + ifname)`,
/// 15 bytes, the longest name Linux allows.
///
/// Stable, so that DEL and CHECK find what ADD created without any state, and distinct
/// per (container, interface) with overwhelming probability. The agent and the tests
/// compute it with this same function.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::new()
        .chain_update(container_id.as_bytes())
        .chain_update(b"/")
        .chain_update(ifname.as_bytes())
        .finalize();
    let mut name = String::with_capacity(15);
    name.push_str(HOST_IFNAME_PREFIX);
    for byte in &digest[..6] {
        name.push(char::from(HEX[usize::from(byte >> 4)]));
        name.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    name
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// 16 hex digits of `sha256(container_id + "/" + ifname)`: the name of the files kept per
/// attachment beside the agent's socket (deferred deletes, locks).
pub fn attachment_digest(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::new()
        .chain_update(container_id.as_bytes())
        .chain_update(b"/")
        .chain_update(ifname.as_bytes())
        .finalize();
    digest[..8]
        .iter()
        .flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]])
        .map(char::from)
        .collect()
}

/// Whether `name` has the shape of [`host_ifname`]'s names: `hyp` and 12 lowercase hex
/// digits. GC deletes stray veths of that shape, and only those.
pub fn is_host_ifname(name: &str) -> bool {
    name.len() == 15
        && name.starts_with(HOST_IFNAME_PREFIX)
        && name[HOST_IFNAME_PREFIX.len()..]
            .bytes()
            .all(|b| HEX.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifname_is_hyp_and_12_hex_digits_of_the_sha256() {
        // printf 'abc/eth0' | sha256sum → 538f587a2365...
        assert_eq!(host_ifname("abc", "eth0"), "hyp538f587a2365");
        // printf '0123456789abcdef/net1' | sha256sum → 0d963bad2d11...
        assert_eq!(host_ifname("0123456789abcdef", "net1"), "hyp0d963bad2d11");
    }

    #[test]
    fn host_ifname_fits_linux_and_depends_on_both_parts() {
        let a = host_ifname("c1", "eth0");
        assert_eq!(a.len(), 15);
        assert_ne!(a, host_ifname("c1", "eth1"));
        assert_ne!(a, host_ifname("c2", "eth0"));
        // The separator keeps ("a/b", "c") and ("a", "b/c") apart in principle; ifnames
        // cannot contain '/', so ids and names never collide this way.
        assert_eq!(host_ifname("", "").len(), 15);
    }

    #[test]
    fn host_ifnames_are_recognised() {
        assert!(is_host_ifname(&host_ifname("c1", "eth0")));
        for other in [
            "hyp",
            "hyp538f587a236",
            "hyp538f587a2365x",
            "hypG38f587a2365",
            "eth0",
            "hybr12345678901",
        ] {
            assert!(!is_host_ifname(other), "{other}");
        }
    }
}
