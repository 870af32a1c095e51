//! The network configuration the runtime writes on stdin (pure).

use std::fmt;
use std::path::PathBuf;

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
    Ok(NetConf {
        cni_version,
        name: name.to_owned(),
        agent_socket,
        mtu,
        prev_result,
    })
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
        assert_eq!(
            conf,
            NetConf {
                cni_version: CniVersion::V1_0_0,
                name: "hypha".into(),
                agent_socket: hypha_api::DEFAULT_SOCKET.into(),
                mtu: None,
                prev_result: None,
            }
        );
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
