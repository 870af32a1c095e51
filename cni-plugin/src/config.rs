//! The network configuration the runtime writes on stdin (pure).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use hypha_api::{Attachment, Bandwidth, MacAddr};
use serde_json::{Map, Value};

/// The CNI versions this plugin speaks, oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The plugin's configuration, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    pub name: String,
    /// The agent's API socket (`agentSocket`).
    pub agent_socket: PathBuf,
    /// MTU of both ends of the veth; the kernel's default when `None`.
    pub mtu: Option<u32>,
    /// The previous plugin's result (a chained ADD) or this plugin's (CHECK, DEL).
    pub prev_result: Option<Value>,
    /// `ipam.type`: an IPAM plugin to delegate addressing to, instead of the agent's
    /// allocator.
    pub ipam_type: Option<String>,
    /// The well-known capabilities the runtime passed in `runtimeConfig`.
    pub runtime: RuntimeConfig,
    /// `args.cni.labels`, in order.
    pub labels: Vec<(String, String)>,
    /// `disableCheck`: CHECK succeeds without looking.
    pub disable_check: bool,
    /// `disableGC`: GC succeeds without removing anything.
    pub disable_gc: bool,
    /// GC's `cni.dev/valid-attachments` (or the older `cni.dev/attachments`).
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The whole configuration as received, for delegated plugins (unknown keys included).
    pub raw: Map<String, Value>,
}

/// `runtimeConfig`: the capabilities this plugin honours.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// `ips`: requested addresses, IPv4 and IPv6 alike (the prefix lengths are dropped).
    pub ips: Vec<IpAddr>,
    /// `mac`: the container interface's MAC.
    pub mac: Option<MacAddr>,
    /// `bandwidth`: rate limits, stored on the endpoint.
    pub bandwidth: Option<Bandwidth>,
}

impl RuntimeConfig {
    /// The first IPv4 address of `ips`.
    pub fn requested_ipv4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON (CNI error 6). serde's message carries the line and column.
    #[error("cannot decode the network configuration on stdin: {0}")]
    Decode(#[source] serde_json::Error),
    /// JSON, but not an object (CNI error 6).
    #[error("cannot decode the network configuration on stdin: expected a JSON object, found {0}")]
    NotAnObject(&'static str),
    /// A version this plugin does not speak (CNI error 1).
    #[error(
        "unsupported cniVersion {0:?} in the network configuration (this plugin supports 0.3.0, 0.3.1, 0.4.0, 1.0.0 and 1.1.0)"
    )]
    UnsupportedVersion(String),
    /// A required key is absent (CNI error 7).
    #[error("invalid network configuration: {0} is missing")]
    Missing(&'static str),
    /// A key has the wrong type or an invalid value (CNI error 7).
    #[error("invalid network configuration: {key} {problem}, found {found}")]
    Invalid {
        key: &'static str,
        problem: &'static str,
        found: String,
    },
}

/// Parses the network configuration on stdin. Unknown keys are ignored; `type` is not
/// checked, since the runtime chose this binary by it.
pub fn parse(stdin: &[u8]) -> Result<NetConf, ConfigError> {
    let value: Value = serde_json::from_slice(stdin).map_err(ConfigError::Decode)?;
    let Value::Object(obj) = value else {
        return Err(ConfigError::NotAnObject(json_kind(&value)));
    };
    let version = string(&obj, "cniVersion")?.ok_or(ConfigError::Missing("cniVersion"))?;
    let cni_version = CniVersion::parse(version)
        .ok_or_else(|| ConfigError::UnsupportedVersion(version.to_owned()))?;
    let name = string(&obj, "name")?.ok_or(ConfigError::Missing("name"))?;
    string(&obj, "type")?;
    let agent_socket = match string(&obj, "agentSocket")? {
        Some("") => {
            return Err(ConfigError::Invalid {
                key: "agentSocket",
                problem: "must be a socket path",
                found: "\"\"".into(),
            });
        }
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(hypha_api::DEFAULT_SOCKET),
    };
    let mtu = match obj.get("mtu") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(m) if (68..=65535).contains(&m) => Some(m as u32),
            _ => {
                return Err(ConfigError::Invalid {
                    key: "mtu",
                    problem: "must be an integer from 68 to 65535",
                    found: v.to_string(),
                });
            }
        },
    };
    let prev_result = match obj.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(v) => {
            return Err(ConfigError::Invalid {
                key: "prevResult",
                problem: "must be an object",
                found: json_kind(v).into(),
            });
        }
    };
    let ipam_type = match obj.get("ipam") {
        None | Some(Value::Null) => None,
        Some(Value::Object(ipam)) => {
            match string(ipam, "type").map_err(|e| e.under("ipam.type"))? {
                None | Some("") => None,
                Some(t) if t.contains('/') || t == "." || t == ".." => {
                    return Err(ConfigError::Invalid {
                        key: "ipam.type",
                        problem: "must be the name of a plugin in CNI_PATH",
                        found: format!("{t:?}"),
                    });
                }
                Some(t) => Some(t.to_owned()),
            }
        }
        Some(v) => {
            return Err(ConfigError::Invalid {
                key: "ipam",
                problem: "must be an object",
                found: json_kind(v).into(),
            });
        }
    };
    let runtime = match obj.get("runtimeConfig") {
        None | Some(Value::Null) => RuntimeConfig::default(),
        Some(Value::Object(rc)) => runtime_config(rc)?,
        Some(v) => {
            return Err(ConfigError::Invalid {
                key: "runtimeConfig",
                problem: "must be an object",
                found: json_kind(v).into(),
            });
        }
    };
    let valid_attachments = match obj.get("cni.dev/valid-attachments") {
        Some(v) if !v.is_null() => Some(attachments(v, "cni.dev/valid-attachments")?),
        _ => match obj.get("cni.dev/attachments") {
            Some(v) if !v.is_null() => Some(attachments(v, "cni.dev/attachments")?),
            _ => None,
        },
    };
    Ok(NetConf {
        cni_version,
        name: name.to_owned(),
        agent_socket,
        mtu,
        prev_result,
        ipam_type,
        runtime,
        labels: labels(&obj)?,
        disable_check: boolean(&obj, "disableCheck")?,
        disable_gc: boolean(&obj, "disableGC")?,
        valid_attachments,
        raw: obj,
    })
}

/// `runtimeConfig.ips`, `.mac` and `.bandwidth`; other capabilities are for other plugins.
fn runtime_config(rc: &Map<String, Value>) -> Result<RuntimeConfig, ConfigError> {
    let mut out = RuntimeConfig::default();
    match rc.get("ips") {
        None | Some(Value::Null) => {}
        Some(Value::Array(ips)) => {
            for ip in ips {
                let parsed = ip.as_str().and_then(|s| {
                    let addr = s.split_once('/').map_or(s, |(a, len)| {
                        // A prefix length, if given, must be one.
                        if len.parse::<u8>().is_ok() { a } else { "" }
                    });
                    addr.parse::<IpAddr>().ok()
                });
                match parsed {
                    Some(a) => out.ips.push(a),
                    None => {
                        return Err(ConfigError::Invalid {
                            key: "runtimeConfig.ips",
                            problem: "must be a list of IP addresses (with or without a prefix length)",
                            found: ip.to_string(),
                        });
                    }
                }
            }
        }
        Some(v) => {
            return Err(ConfigError::Invalid {
                key: "runtimeConfig.ips",
                problem: "must be a list of IP addresses",
                found: json_kind(v).into(),
            });
        }
    }
    match string(rc, "mac").map_err(|e| e.under("runtimeConfig.mac"))? {
        None | Some("") => {}
        Some(m) => match m.parse::<MacAddr>() {
            // The multicast bit: the kernel refuses such an address on an Ethernet device.
            Ok(mac) if mac.0[0] & 1 == 0 && mac.0 != [0; 6] => out.mac = Some(mac),
            _ => {
                return Err(ConfigError::Invalid {
                    key: "runtimeConfig.mac",
                    problem: "must be a unicast MAC address such as 02:42:ac:11:00:02",
                    found: format!("{m:?}"),
                });
            }
        },
    }
    match rc.get("bandwidth") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let bw = serde_json::from_value::<Bandwidth>(v.clone())
                .ok()
                .filter(|_| v.is_object());
            match bw {
                Some(bw) => out.bandwidth = Some(bw),
                None => {
                    return Err(ConfigError::Invalid {
                        key: "runtimeConfig.bandwidth",
                        problem: "must be an object with non-negative integers ingressRate, ingressBurst, egressRate and egressBurst",
                        found: v.to_string(),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// `args.cni.labels`: `[{"key": "app", "value": "web"}, ...]` (CONVENTIONS.md).
fn labels(obj: &Map<String, Value>) -> Result<Vec<(String, String)>, ConfigError> {
    let invalid = |problem, found: &Value| ConfigError::Invalid {
        key: "args.cni.labels",
        problem,
        found: found.to_string(),
    };
    let Some(args) = obj.get("args").filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let Some(cni) = args
        .as_object()
        .and_then(|a| a.get("cni"))
        .filter(|v| !v.is_null())
    else {
        if !args.is_object() {
            return Err(ConfigError::Invalid {
                key: "args",
                problem: "must be an object",
                found: json_kind(args).into(),
            });
        }
        return Ok(Vec::new());
    };
    let Some(labels) = cni
        .as_object()
        .and_then(|c| c.get("labels"))
        .filter(|v| !v.is_null())
    else {
        if !cni.is_object() {
            return Err(ConfigError::Invalid {
                key: "args.cni",
                problem: "must be an object",
                found: json_kind(cni).into(),
            });
        }
        return Ok(Vec::new());
    };
    let list = labels
        .as_array()
        .ok_or_else(|| invalid("must be a list of {\"key\", \"value\"} objects", labels))?;
    list.iter()
        .map(|l| {
            let key = l.get("key").and_then(Value::as_str);
            let value = l.get("value").and_then(Value::as_str);
            match (key, value) {
                (Some(k), Some(v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
                _ => Err(invalid(
                    "entries must be {\"key\": string, \"value\": string} with a non-empty key",
                    l,
                )),
            }
        })
        .collect()
}

/// GC's list of attachments: `[{"containerID": "...", "ifname": "..."}, ...]`.
fn attachments(v: &Value, key: &'static str) -> Result<Vec<Attachment>, ConfigError> {
    let invalid = |found: &Value| ConfigError::Invalid {
        key,
        problem: "must be a list of {\"containerID\": string, \"ifname\": string} objects",
        found: found.to_string(),
    };
    v.as_array()
        .ok_or_else(|| invalid(v))?
        .iter()
        .map(|a| {
            let id = a.get("containerID").and_then(Value::as_str);
            let ifname = a.get("ifname").and_then(Value::as_str);
            match (id, ifname) {
                (Some(id), Some(ifname)) => Ok(Attachment {
                    container_id: id.to_owned(),
                    ifname: ifname.to_owned(),
                }),
                _ => Err(invalid(a)),
            }
        })
        .collect()
}

fn boolean(obj: &Map<String, Value>, key: &'static str) -> Result<bool, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ConfigError::Invalid {
            key,
            problem: "must be true or false",
            found: v.to_string(),
        }),
    }
}

impl ConfigError {
    /// The same error about a nested key (`ipam.type` rather than `type`).
    fn under(self, key: &'static str) -> Self {
        match self {
            ConfigError::Invalid { problem, found, .. } => ConfigError::Invalid {
                key,
                problem,
                found,
            },
            ConfigError::Missing(_) => ConfigError::Missing(key),
            e => e,
        }
    }
}

/// The configuration's `cniVersion` if it is one this plugin speaks; for replies that
/// must be written whatever went wrong (errors, VERSION).
pub fn version_hint(stdin: &[u8]) -> Option<CniVersion> {
    #[derive(serde::Deserialize)]
    struct Version {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    let v: Version = serde_json::from_slice(stdin).ok()?;
    CniVersion::parse(&v.cni_version?)
}

fn string<'a>(
    obj: &'a Map<String, Value>,
    key: &'static str,
) -> Result<Option<&'a str>, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(ConfigError::Invalid {
            key,
            problem: "must be a string",
            found: json_kind(v).into(),
        }),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_conflist_entry_works() {
        let conf =
            parse(br#"{"cniVersion": "1.0.0", "name": "hypha", "type": "hypha-cni"}"#).unwrap();
        assert_eq!(conf.cni_version, CniVersion::V1_0_0);
        assert_eq!(conf.name, "hypha");
        assert_eq!(conf.agent_socket, PathBuf::from(hypha_api::DEFAULT_SOCKET));
        assert_eq!(conf.mtu, None);
        assert_eq!(conf.prev_result, None);
        assert_eq!(conf.ipam_type, None);
        assert_eq!(conf.runtime, RuntimeConfig::default());
        assert!(conf.labels.is_empty());
        assert!(!conf.disable_check && !conf.disable_gc);
        assert_eq!(conf.valid_attachments, None);
        assert_eq!(conf.raw.len(), 3);
    }

    #[test]
    fn options_and_unknown_keys() {
        let conf = parse(
            br#"{"cniVersion": "0.4.0", "name": "n", "type": "hypha-cni", "agentSocket": "/tmp/a.sock",
                 "mtu": 1400, "prevResult": {"ips": []}, "runtimeConfig": {}, "whatever": [1]}"#,
        )
        .unwrap();
        assert_eq!(conf.cni_version, CniVersion::V0_4_0);
        assert_eq!(conf.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(conf.mtu, Some(1400));
        assert_eq!(conf.prev_result, Some(serde_json::json!({"ips": []})));
    }

    #[test]
    fn malformed_json_names_the_position() {
        let e = parse(b"{\"cniVersion\": \"1.0.0\",\n \"name\": }").unwrap_err();
        assert!(matches!(e, ConfigError::Decode(_)));
        assert!(e.to_string().contains("line 2 column"), "{e}");
        let e = parse(b"").unwrap_err();
        assert!(matches!(e, ConfigError::Decode(_)));
        let e = parse(b"[1]").unwrap_err();
        assert!(matches!(e, ConfigError::NotAnObject("an array")), "{e:?}");
    }

    #[test]
    fn versions() {
        for v in CniVersion::ALL {
            assert_eq!(CniVersion::parse(v.as_str()), Some(v));
        }
        let e = parse(br#"{"cniVersion": "0.2.0", "name": "n"}"#).unwrap_err();
        assert!(matches!(&e, ConfigError::UnsupportedVersion(v) if v == "0.2.0"));
        assert!(e.to_string().contains("\"0.2.0\""), "{e}");
        let e = parse(br#"{"name": "n"}"#).unwrap_err();
        assert!(matches!(e, ConfigError::Missing("cniVersion")));
        assert!(CniVersion::V0_3_1 < CniVersion::V0_4_0);
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (json, key) in [
            (r#"{"cniVersion": "1.0.0"}"#, "name"),
            (r#"{"cniVersion": "1.0.0", "name": 3}"#, "name"),
            (r#"{"cniVersion": "1.0.0", "name": "n", "mtu": 10}"#, "mtu"),
            (
                r#"{"cniVersion": "1.0.0", "name": "n", "mtu": "1500"}"#,
                "mtu",
            ),
            (
                r#"{"cniVersion": "1.0.0", "name": "n", "agentSocket": ""}"#,
                "agentSocket",
            ),
            (r#"{"cniVersion": "1.0.0", "name": "n", "type": 1}"#, "type"),
            (
                r#"{"cniVersion": "1.0.0", "name": "n", "prevResult": []}"#,
                "prevResult",
            ),
        ] {
            let e = parse(json.as_bytes()).unwrap_err();
            assert!(
                matches!(e, ConfigError::Missing(_) | ConfigError::Invalid { .. }),
                "{json}: {e:?}"
            );
            assert!(e.to_string().contains(key), "{json}: {e}");
        }
    }

    #[test]
    fn capabilities_args_and_gc_keys() {
        let conf = parse(
            br#"{"cniVersion": "1.1.0", "name": "n", "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"},
                 "runtimeConfig": {"ips": ["fd00::5/64", "10.1.0.5/24", "10.1.0.6"], "mac": "02:42:ac:11:00:02",
                                   "bandwidth": {"ingressRate": 1000, "egressBurst": 50}, "portMappings": []},
                 "args": {"cni": {"labels": [{"key": "app", "value": "web"}]}},
                 "disableCheck": true, "disableGC": false,
                 "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(conf.ipam_type.as_deref(), Some("host-local"));
        assert_eq!(
            conf.runtime.requested_ipv4(),
            Some(Ipv4Addr::new(10, 1, 0, 5))
        );
        assert_eq!(conf.runtime.ips.len(), 3);
        assert_eq!(
            conf.runtime.mac,
            Some(MacAddr([0x02, 0x42, 0xac, 0x11, 0, 2]))
        );
        assert_eq!(
            conf.runtime.bandwidth,
            Some(Bandwidth {
                ingress_rate: Some(1000),
                egress_burst: Some(50),
                ..Bandwidth::default()
            })
        );
        assert_eq!(conf.labels, vec![("app".to_owned(), "web".to_owned())]);
        assert!(conf.disable_check && !conf.disable_gc);
        assert_eq!(
            conf.valid_attachments,
            Some(vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }])
        );
        // The older key.
        let conf = parse(
            br#"{"cniVersion": "1.1.0", "name": "n", "cni.dev/attachments": [{"containerID": "c2", "ifname": "net1"}]}"#,
        )
        .unwrap();
        assert_eq!(conf.valid_attachments.map(|v| v.len()), Some(1));
    }

    #[test]
    fn bad_capabilities_name_the_key() {
        for (extra, key) in [
            (
                r#""runtimeConfig": {"ips": ["10.1.0.300"]}"#,
                "runtimeConfig.ips",
            ),
            (
                r#""runtimeConfig": {"ips": "10.1.0.3"}"#,
                "runtimeConfig.ips",
            ),
            (
                r#""runtimeConfig": {"mac": "01:00:5e:00:00:01"}"#,
                "runtimeConfig.mac",
            ),
            (r#""runtimeConfig": {"mac": "zz"}"#, "runtimeConfig.mac"),
            (
                r#""runtimeConfig": {"bandwidth": {"ingressRate": -1}}"#,
                "runtimeConfig.bandwidth",
            ),
            (r#""runtimeConfig": []"#, "runtimeConfig"),
            (
                r#""args": {"cni": {"labels": [{"key": "a"}]}}"#,
                "args.cni.labels",
            ),
            (r#""args": {"cni": {"labels": {}}}"#, "args.cni.labels"),
            (r#""args": 3"#, "args"),
            (r#""ipam": {"type": 3}"#, "ipam.type"),
            (r#""ipam": {"type": "../bin/sh"}"#, "ipam.type"),
            (r#""ipam": "host-local""#, "ipam"),
            (r#""disableCheck": "yes""#, "disableCheck"),
            (
                r#""cni.dev/valid-attachments": [{"containerID": "c"}]"#,
                "cni.dev/valid-attachments",
            ),
        ] {
            let json = format!(r#"{{"cniVersion": "1.1.0", "name": "n", {extra}}}"#);
            let e = parse(json.as_bytes()).unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { .. }), "{json}: {e:?}");
            assert!(e.to_string().contains(key), "{json}: {e}");
        }
    }

    #[test]
    fn version_hint_is_lenient() {
        assert_eq!(
            version_hint(br#"{"cniVersion": "0.3.1"}"#),
            Some(CniVersion::V0_3_1)
        );
        assert_eq!(version_hint(br#"{"cniVersion": "9.9.9"}"#), None);
        assert_eq!(version_hint(b"garbage"), None);
        assert_eq!(version_hint(b""), None);
    }
}
