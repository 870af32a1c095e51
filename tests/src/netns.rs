//! Named network namespaces for tests, and looking for interfaces in them.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use hypha_netlink::Netlink;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `<prefix>-<pid>-<n>`: unique across the tests of a run and across concurrent runs.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace made with `ip netns add`, deleted (with everything in it) on drop,
/// also when the test panics.
pub struct NamedNetns {
    name: String,
}

impl NamedNetns {
    /// A new namespace named [`unique_name`]`(prefix)`.
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run `ip netns add`");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, what a runtime passes as `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Whether an interface named `ifname` exists in this namespace.
    pub fn has_link(&self, ifname: &str) -> bool {
        Netlink::in_netns(&self.path())
            .and_then(|mut nl| nl.link_by_name(ifname))
            .unwrap_or_else(|e| panic!("look for {ifname} in {}: {e}", self.name))
            .is_some()
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Whether an interface named `ifname` exists in the test's own (host) namespace.
pub fn host_has_link(ifname: &str) -> bool {
    Netlink::new()
        .and_then(|mut nl| nl.link_by_name(ifname))
        .unwrap_or_else(|e| panic!("look for {ifname} in the host namespace: {e}"))
        .is_some()
}
