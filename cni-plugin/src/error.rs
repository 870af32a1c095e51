//! Every way the plugin can fail, and the one place that gives each its CNI error code.

use std::io;
use std::path::PathBuf;

use hypha_api::ClientError;
use serde_json::{Value, json};

use crate::config::{CniVersion, ConfigError};
use crate::env::EnvError;

/// Code of CHECK finding that the attachment differs from what ADD set up. Codes from 100
/// are the plugin's own, per the spec.
pub const CHECK_FAILED: u32 = 100;

/// An error reply, as the spec defines it: `{"cniVersion", "code", "msg", "details"}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// 1: incompatible CNI version.
    pub fn incompatible_version(msg: impl Into<String>) -> Self {
        Self::new(1, msg, "")
    }
    /// 2: unsupported field in the network configuration (or operation).
    #[expect(
        dead_code,
        reason = "every spec code has its constructor; no failure needs this one yet"
    )]
    pub fn unsupported_field(msg: impl Into<String>) -> Self {
        Self::new(2, msg, "")
    }
    /// 3: container unknown or does not exist.
    #[expect(
        dead_code,
        reason = "every spec code has its constructor; no failure needs this one yet"
    )]
    pub fn container_unknown(msg: impl Into<String>) -> Self {
        Self::new(3, msg, "")
    }
    /// 4: invalid necessary environment variables.
    pub fn invalid_env(msg: impl Into<String>) -> Self {
        Self::new(4, msg, "")
    }
    /// 5: I/O failure.
    pub fn io_failure(msg: impl Into<String>) -> Self {
        Self::new(5, msg, "")
    }
    /// 6: failed to decode content.
    pub fn decode_failure(msg: impl Into<String>) -> Self {
        Self::new(6, msg, "")
    }
    /// 7: invalid network configuration.
    pub fn invalid_config(msg: impl Into<String>) -> Self {
        Self::new(7, msg, "")
    }
    /// 11: try again later.
    pub fn try_again_later(msg: impl Into<String>) -> Self {
        Self::new(11, msg, "")
    }
    /// 50: the plugin is not available (STATUS).
    pub fn plugin_not_available(msg: impl Into<String>) -> Self {
        Self::new(50, msg, "")
    }
    /// 51: the plugin is not available, existing containers may have limited connectivity.
    pub fn plugin_not_available_limited(msg: impl Into<String>) -> Self {
        Self::new(51, msg, "")
    }
    /// A plugin-specific code (100 and up).
    pub fn plugin(code: u32, msg: impl Into<String>) -> Self {
        Self::new(code, msg, "")
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The reply's JSON; `details` is left out when empty.
    pub fn to_json(&self, version: CniVersion) -> Value {
        let mut v = json!({
            "cniVersion": version.as_str(),
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

/// Why an operation failed, in the plugin's terms.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// stdin could not be read.
    #[error("cannot read the network configuration from stdin: {0}")]
    Stdin(#[source] io::Error),
    /// The operation needs a newer configuration version.
    #[error("cniVersion {version} does not allow {command} (it needs {min} or later)")]
    VersionTooOld {
        command: &'static str,
        version: CniVersion,
        min: CniVersion,
    },
    /// GC: the agent could not clean something (it cleaned the rest).
    #[error("agent GC: {0}")]
    GcAgent(String),
    /// `CNI_NETNS` names nothing.
    #[error("CNI_NETNS={} does not exist", .path.display())]
    NetnsMissing { path: PathBuf },
    /// `CNI_NETNS` could not be opened or entered.
    #[error("CNI_NETNS={}: {source}", .path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: hypha_netlink::Error,
    },
    /// `CNI_IFNAME` is already taken in the container.
    #[error("interface {ifname} already exists in the container's network namespace {}", .netns.display())]
    IfnameTaken { ifname: String, netns: PathBuf },
    /// Netlink failed.
    #[error(transparent)]
    Netlink(#[from] hypha_netlink::Error),
    /// The agent's socket does not answer.
    #[error("{0}")]
    AgentUnreachable(#[source] Box<ClientError>),
    /// The agent already has this (container, interface): ADD was called twice.
    #[error(
        "CNI_CONTAINERID={container_id} CNI_IFNAME={ifname} is already attached (ADD called again without DEL): {detail}"
    )]
    AlreadyAttached {
        container_id: String,
        ifname: String,
        detail: String,
    },
    /// Another invocation on the same attachment held its lock for all of `agentTimeout`.
    #[error(
        "another CNI operation on CNI_CONTAINERID={container_id} CNI_IFNAME={ifname} held its lock {} for all of agentTimeout ({waited:?}); try again later",
        .path.display()
    )]
    Busy {
        container_id: String,
        ifname: String,
        path: PathBuf,
        waited: std::time::Duration,
    },
    /// The attachment's lock file could not be made, locked or removed.
    #[error("cannot {op} the attachment lock {}: {source}", .path.display())]
    Lock {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Any other failure of a call to the agent.
    #[error("{0}")]
    Agent(#[source] Box<ClientError>),
    /// STATUS: the agent cannot serve ADD.
    #[error("the hypha agent is not available: {0}")]
    AgentNotAvailable(#[source] Box<ClientError>),
    /// STATUS: the agent answers but cannot serve ADD (no address left, ...).
    #[error("the hypha agent cannot serve ADD: {0}")]
    NotReady(String),
    /// STATUS: the agent's datapath is broken; existing pods may have lost connectivity.
    #[error(
        "the hypha agent is not available and existing pods may have limited connectivity: {0}"
    )]
    Degraded(String),
    /// A requested address (`runtimeConfig.ips`) cannot be had.
    #[error("runtimeConfig.ips: {} cannot be given to this pod: {source}", list(.addresses))]
    RequestedAddress {
        addresses: Vec<std::net::IpAddr>,
        #[source]
        source: Box<ClientError>,
    },
    /// The agent's allocation or the delegated IPAM plugin's result lacks a requested
    /// address (of a family the node does not have, for the agent); what was had was
    /// given back.
    #[error(
        "runtimeConfig.ips: {} cannot be given to this pod: {by} has {}",
        list(.addresses),
        if .given.is_empty() { "no address".to_owned() } else { list(.given) }
    )]
    RequestedNotGiven {
        addresses: Vec<std::net::IpAddr>,
        /// Whose answer: "the node's allocation", "IPAM plugin host-local's result".
        by: String,
        given: Vec<std::net::IpAddr>,
    },
    /// The delegated IPAM plugin gave an address of a family the node has no pod CIDR
    /// for: the datapath would not route it.
    #[error(
        "IPAM plugin {plugin} (ADD) gave {address}, but this node has no IPv{} pod CIDR",
        if .address.is_ipv4() { 4 } else { 6 }
    )]
    FamilyNotOnNode {
        plugin: String,
        address: std::net::IpAddr,
    },
    /// The network configuration's `mtu` is larger than the pods' MTU on this node (the
    /// underlay's, less the tunnel's overhead in cluster mode).
    #[error(
        "mtu {configured} in the network configuration is above this node's pod MTU {node} (in cluster mode the underlay's MTU less the tunnel's overhead): set mtu to at most {node}, or leave it out to get {node}"
    )]
    MtuAboveNode { configured: u32, node: u32 },
    /// The pod gets an IPv6 address, but IPv6 cannot be enabled in its network namespace.
    #[error("cannot give the pod IPv6 address {address}: {source}")]
    Ipv6Unavailable {
        address: std::net::Ipv6Addr,
        #[source]
        source: hypha_netlink::Error,
    },
    /// The agent's allocator has no address left.
    #[error("{0}")]
    Exhausted(#[source] Box<ClientError>),
    /// DEL could not reach the agent and could not leave the delete for it either.
    #[error("cannot leave the delete for the hypha agent in {}: {source}", .path.display())]
    DeferredDelete {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `ipam.type` is set but `CNI_PATH` is not.
    #[error("CNI_PATH is not set (required to run the IPAM plugin {plugin:?} named in ipam.type)")]
    NoCniPath { plugin: String },
    /// The IPAM plugin is in no directory of `CNI_PATH`.
    #[error(
        "invalid network configuration: ipam.type={plugin:?}: no such plugin in CNI_PATH={cni_path}"
    )]
    DelegateNotFound { plugin: String, cni_path: String },
    /// The IPAM plugin could not be run.
    #[error("cannot run the IPAM plugin {}: {source}", .plugin.display())]
    DelegateExec {
        plugin: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The IPAM plugin answered with a CNI error; its code is kept.
    #[error("IPAM plugin {plugin} ({command}): {msg}")]
    Delegated {
        plugin: String,
        command: &'static str,
        code: u32,
        msg: String,
    },
    /// The IPAM plugin failed without a CNI error.
    #[error("IPAM plugin {plugin} ({command}) failed: {problem}")]
    DelegateFailed {
        plugin: String,
        command: &'static str,
        problem: String,
    },
    /// The IPAM plugin's answer cannot be used.
    #[error("IPAM plugin {plugin} ({command}): {problem}")]
    DelegateBadResult {
        plugin: String,
        command: &'static str,
        problem: String,
    },
    /// CHECK without a previous result.
    #[error("invalid network configuration: prevResult is required for CHECK")]
    MissingPrevResult,
    /// CHECK with a previous result it cannot read.
    #[error("invalid network configuration: {0}")]
    InvalidPrevResult(String),
    /// CHECK found differences.
    #[error("the attachment differs from its result: {}", .0.join("; "))]
    CheckFailed(Vec<String>),
    /// A failure, after which cleaning up failed too.
    #[error("{error}")]
    WithCleanup {
        error: Box<Error>,
        cleanup: Vec<Error>,
    },
    /// Several failures of a best-effort teardown; the first decides the code.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Teardown(Vec<Error>),
}

impl From<Error> for CniError {
    /// The one place where failures get their CNI code.
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::Env(_) | Error::NetnsMissing { .. } => CniError::invalid_env(msg),
            Error::Config(c) => match c {
                ConfigError::Decode(_) | ConfigError::NotAnObject(_) => {
                    CniError::decode_failure(msg)
                }
                ConfigError::UnsupportedVersion(_) => CniError::incompatible_version(msg),
                ConfigError::Missing(_)
                | ConfigError::Invalid { .. }
                | ConfigError::InvalidEntry { .. } => CniError::invalid_config(msg),
            },
            Error::Stdin(_) => CniError::io_failure(msg),
            Error::VersionTooOld { .. } => CniError::incompatible_version(msg),
            Error::GcAgent(_) => CniError::io_failure(msg),
            // Not a network namespace (EINVAL from setns) is the variable's fault.
            Error::Netns { source, .. } => match source {
                hypha_netlink::Error::EnterNetns { .. } => CniError::invalid_env(msg),
                _ => CniError::io_failure(msg),
            },
            Error::IfnameTaken { .. } | Error::AlreadyAttached { .. } => CniError::invalid_env(msg),
            Error::Netlink(_) => CniError::io_failure(msg),
            Error::AgentUnreachable(_) => CniError::try_again_later(msg),
            Error::Busy { .. } => CniError::try_again_later(msg),
            Error::Lock { .. } => CniError::io_failure(msg),
            Error::Agent(ref c) => match c.as_ref() {
                ClientError::Api { status, .. }
                    if status.as_u16() == hyper_status::SERVICE_UNAVAILABLE =>
                {
                    CniError::try_again_later(msg)
                }
                _ => CniError::io_failure(msg),
            },
            // Addresses come back as pods go: the runtime's retry can succeed.
            Error::Exhausted(_) => CniError::try_again_later(msg),
            Error::RequestedAddress { .. } | Error::RequestedNotGiven { .. } => {
                CniError::invalid_config(msg)
            }
            Error::Ipv6Unavailable { .. } => CniError::invalid_env(msg),
            Error::FamilyNotOnNode { .. } => CniError::invalid_config(msg),
            Error::MtuAboveNode { .. } => CniError::invalid_config(msg),
            Error::AgentNotAvailable(_) | Error::NotReady(_) => CniError::plugin_not_available(msg),
            Error::Degraded(_) => CniError::plugin_not_available_limited(msg),
            Error::DeferredDelete { .. } | Error::DelegateExec { .. } => CniError::io_failure(msg),
            Error::NoCniPath { .. } => CniError::invalid_env(msg),
            Error::DelegateNotFound { .. } => CniError::invalid_config(msg),
            Error::Delegated { code, .. } => CniError::new(code, msg, ""),
            Error::DelegateFailed { .. } => CniError::io_failure(msg),
            Error::DelegateBadResult { .. } => CniError::decode_failure(msg),
            Error::MissingPrevResult | Error::InvalidPrevResult(_) => CniError::invalid_config(msg),
            Error::CheckFailed(_) => CniError::plugin(CHECK_FAILED, msg),
            Error::WithCleanup { error, cleanup } => {
                let details = format!(
                    "cleaning up after the failure also failed: {}",
                    cleanup
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                CniError::from(*error).with_details(details)
            }
            Error::Teardown(mut errors) => {
                if errors.is_empty() {
                    return CniError::io_failure(msg);
                }
                let first = errors.remove(0);
                let code = CniError::from(first).code;
                CniError::new(code, msg, "")
            }
        }
    }
}

/// HTTP status codes the mapping looks at, without depending on `http` directly.
mod hyper_status {
    pub const REQUEST_TIMEOUT: u16 = 408;
    pub const SERVICE_UNAVAILABLE: u16 = 503;
    pub const CONFLICT: u16 = 409;
    pub const NOT_FOUND: u16 = 404;
    pub const INSUFFICIENT_STORAGE: u16 = 507;
}

/// `a, b` for error messages.
fn list(addresses: &[std::net::IpAddr]) -> String {
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether the agent answered 409 Conflict.
pub fn is_conflict(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { status, .. } if status.as_u16() == hyper_status::CONFLICT)
}

/// Whether the agent answered 507 Insufficient Storage: no address left.
pub fn is_exhausted(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { status, .. } if status.as_u16() == hyper_status::INSUFFICIENT_STORAGE)
}

/// Whether the agent answered 404 Not Found.
pub fn is_not_found(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { status, .. } if status.as_u16() == hyper_status::NOT_FOUND)
}

/// Whether the agent answered the whole request with a refusal of the request itself
/// (4xx): the one failure of a call that neither a retry nor leaving the call for the
/// agent would change.
pub fn is_refusal(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { status, .. } if status.is_client_error()) && !is_busy(e)
}

/// Whether the agent answered that it could not take the request now: 503 (every one of
/// its connections is busy) or 408 (the request's body did not arrive within its read
/// timeout). The request itself was fine; a retry can succeed.
pub fn is_busy(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { status, .. }
        if matches!(status.as_u16(), hyper_status::SERVICE_UNAVAILABLE | hyper_status::REQUEST_TIMEOUT))
}

/// Whether the call never got a complete answer: nothing listening, no answer within the
/// timeout, or the connection closed before the answer was whole (the agent died or was
/// restarted while answering), or the agent said it was too busy to take it. A retry once
/// the agent is back can succeed.
pub fn is_incomplete(e: &ClientError) -> bool {
    e.is_unreachable() || matches!(e, ClientError::Http { .. }) || is_busy(e)
}

/// Classifies a failed call to the agent: unreachable or cut off (try again later) or not.
pub fn agent(e: ClientError) -> Error {
    if is_incomplete(&e) {
        Error::AgentUnreachable(Box::new(e))
    } else if is_exhausted(&e) {
        Error::Exhausted(Box::new(e))
    } else {
        Error::Agent(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn unreachable() -> ClientError {
        ClientError::Connect {
            path: PathBuf::from("/nowhere/agent.sock"),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        }
    }

    #[test]
    fn codes() {
        let cases: Vec<(Error, u32)> = vec![
            (EnvError::UnknownCommand("X".into()).into(), 4),
            (ConfigError::UnsupportedVersion("0.1.0".into()).into(), 1),
            (ConfigError::Missing("name").into(), 7),
            (ConfigError::NotAnObject("a number").into(), 6),
            (Error::NetnsMissing { path: "/x".into() }, 4),
            (Error::GcAgent("cannot delete hyp0".into()), 5),
            (Error::Degraded("no programs".into()), 51),
            (Error::NotReady("no address left".into()), 50),
            (
                Error::NoCniPath {
                    plugin: "host-local".into(),
                },
                4,
            ),
            (
                Error::DelegateNotFound {
                    plugin: "x".into(),
                    cni_path: "/opt/cni/bin".into(),
                },
                7,
            ),
            (
                Error::Delegated {
                    plugin: "host-local".into(),
                    command: "ADD",
                    code: 999,
                    msg: "no IP addresses available".into(),
                },
                999,
            ),
            (agent(unreachable()), 11),
            (Error::AgentNotAvailable(Box::new(unreachable())), 50),
            (Error::MissingPrevResult, 7),
            (Error::CheckFailed(vec!["a".into()]), CHECK_FAILED),
            (
                Error::IfnameTaken {
                    ifname: "eth0".into(),
                    netns: "/run/netns/p".into(),
                },
                4,
            ),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            assert_eq!(CniError::from(e).code, code, "{text}");
        }
    }

    #[test]
    fn unreachable_names_the_socket() {
        let e = CniError::from(agent(unreachable()));
        assert_eq!(e.code, 11);
        assert!(e.msg.contains("/nowhere/agent.sock"), "{}", e.msg);
    }

    #[test]
    fn cleanup_failures_go_to_details_and_keep_the_code() {
        let e = Error::WithCleanup {
            error: Box::new(Error::IfnameTaken {
                ifname: "eth0".into(),
                netns: "/run/netns/p".into(),
            }),
            cleanup: vec![agent(unreachable())],
        };
        let e = CniError::from(e);
        assert_eq!(e.code, 4);
        assert_eq!(
            e.msg,
            "interface eth0 already exists in the container's network namespace /run/netns/p"
        );
        assert!(e.details.contains("/nowhere/agent.sock"), "{}", e.details);
    }

    #[test]
    fn teardown_takes_the_first_code_and_lists_all() {
        let e = CniError::from(Error::Teardown(vec![
            agent(unreachable()),
            Error::NetnsMissing { path: "/x".into() },
        ]));
        assert_eq!(e.code, 11);
        assert!(
            e.msg.contains("agent.sock") && e.msg.contains("CNI_NETNS=/x"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn replies_follow_the_spec() {
        let e = CniError::invalid_env("CNI_COMMAND is not set");
        assert_eq!(
            e.to_json(CniVersion::V1_0_0),
            json!({"cniVersion": "1.0.0", "code": 4, "msg": "CNI_COMMAND is not set"})
        );
        let e = e.with_details("more");
        assert_eq!(e.to_json(CniVersion::V1_1_0)["details"], "more");
    }
}
