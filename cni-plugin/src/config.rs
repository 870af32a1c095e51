//! The network configuration the runtime writes on stdin (pure).

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use hypha_api::{Attachment, Bandwidth, MacAddr, NamedPort};
use serde_json::{Map, Value};

use crate::json;

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
    /// How long each call to the agent may take, connecting included (`agentTimeout`,
    /// seconds).
    pub agent_timeout: Duration,
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
    /// `args.cni.namedPorts`, in order: the pod's named ports, for policies naming ports.
    pub named_ports: Vec<NamedPort>,
    /// `disableCheck`: CHECK succeeds without looking.
    pub disable_check: bool,
    /// `disableGC`: GC succeeds without removing anything.
    pub disable_gc: bool,
    /// GC's `cni.dev/valid-attachments` (or the older `cni.dev/attachments`).
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The whole configuration as received, for delegated plugins (unknown keys included).
    pub raw: Map<String, Value>,
}

impl NetConf {
    /// A client for the agent at `agentSocket` whose every call (connecting, sending,
    /// reading the whole answer) ends within `agentTimeout`.
    pub fn client(&self) -> Result<hypha_api::Client, hypha_api::ClientError> {
        Ok(hypha_api::Client::new(&self.agent_socket)?.with_timeout(self.agent_timeout))
    }
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
    /// An entry of a list, or a field of one, is missing, has the wrong type or an
    /// invalid value (CNI error 7); `key` names it with its index
    /// (`args.cni.namedPorts[1].port`).
    #[error("invalid network configuration: {key} {problem}, found {found}")]
    InvalidEntry {
        key: String,
        problem: &'static str,
        found: String,
    },
}

/// The agent timeout when `agentTimeout` is not set: every call to the agent answers
/// within it or fails with "try again later" (DEL leaves the delete for the agent).
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest `agentTimeout`: a runtime's own deadline for a plugin is about 4 minutes.
const MAX_AGENT_TIMEOUT_SECS: f64 = 240.0;

/// Parses the network configuration on stdin. Unknown keys are ignored; `type` is not
/// checked, since the runtime chose this binary by it. Every key is matched as Go's
/// `encoding/json` matches it ([`crate::json`]).
pub fn parse(stdin: &[u8]) -> Result<NetConf, ConfigError> {
    let value: Value = serde_json::from_slice(stdin).map_err(ConfigError::Decode)?;
    let Value::Object(obj) = value else {
        return Err(ConfigError::NotAnObject(json_kind(&value)));
    };
    let version =
        string(&obj, "cniVersion", "cniVersion")?.ok_or(ConfigError::Missing("cniVersion"))?;
    let cni_version = CniVersion::parse(version)
        .ok_or_else(|| ConfigError::UnsupportedVersion(version.to_owned()))?;
    let name = string(&obj, "name", "name")?.ok_or(ConfigError::Missing("name"))?;
    string(&obj, "type", "type")?;
    let agent_socket = match string(&obj, "agentSocket", "agentSocket")? {
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
    let agent_timeout = match field(&obj, "agentTimeout", "agentTimeout")? {
        None => DEFAULT_AGENT_TIMEOUT,
        Some(v) => match v.as_f64() {
            Some(secs) if secs > 0.0 && secs <= MAX_AGENT_TIMEOUT_SECS => {
                Duration::from_secs_f64(secs)
            }
            _ => {
                return Err(ConfigError::Invalid {
                    key: "agentTimeout",
                    problem: "must be a number of seconds above 0 and at most 240",
                    found: v.to_string(),
                });
            }
        },
    };
    let mtu = match field(&obj, "mtu", "mtu")? {
        None => None,
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
    let prev_result = match field(&obj, "prevResult", "prevResult")? {
        None => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(v) => {
            return Err(ConfigError::Invalid {
                key: "prevResult",
                problem: "must be an object",
                found: json_kind(v).into(),
            });
        }
    };
    let ipam_type = match field(&obj, "ipam", "ipam")? {
        None => None,
        Some(Value::Object(ipam)) => match string(ipam, "type", "ipam.type")? {
            None | Some("") => None,
            Some(t) if t.contains('/') || t == "." || t == ".." => {
                return Err(ConfigError::Invalid {
                    key: "ipam.type",
                    problem: "must be the name of a plugin in CNI_PATH",
                    found: format!("{t:?}"),
                });
            }
            Some(t) => Some(t.to_owned()),
        },
        Some(v) => {
            return Err(ConfigError::Invalid {
                key: "ipam",
                problem: "must be an object",
                found: json_kind(v).into(),
            });
        }
    };
    let runtime = match field(&obj, "runtimeConfig", "runtimeConfig")? {
        None => RuntimeConfig::default(),
        Some(Value::Object(rc)) => runtime_config(rc)?,
        Some(v) => {
            return Err(ConfigError::Invalid {
                key: "runtimeConfig",
                problem: "must be an object",
                found: json_kind(v).into(),
            });
        }
    };
    let valid_attachments = match field(
        &obj,
        "cni.dev/valid-attachments",
        "cni.dev/valid-attachments",
    )? {
        Some(v) => Some(attachments(v, "cni.dev/valid-attachments")?),
        None => match field(&obj, "cni.dev/attachments", "cni.dev/attachments")? {
            Some(v) => Some(attachments(v, "cni.dev/attachments")?),
            None => None,
        },
    };
    let cni = cni_args(&obj)?;
    let labels = labels(cni)?;
    let named_ports = named_ports(cni)?;
    Ok(NetConf {
        cni_version,
        name: name.to_owned(),
        agent_socket,
        agent_timeout,
        mtu,
        prev_result,
        ipam_type,
        runtime,
        labels,
        named_ports,
        disable_check: boolean(&obj, "disableCheck")?,
        disable_gc: boolean(&obj, "disableGC")?,
        valid_attachments,
        raw: obj,
    })
}

/// `runtimeConfig.ips`, `.mac` and `.bandwidth`; other capabilities are for other plugins.
fn runtime_config(rc: &Map<String, Value>) -> Result<RuntimeConfig, ConfigError> {
    let mut out = RuntimeConfig::default();
    match field(rc, "ips", "runtimeConfig.ips")? {
        None => {}
        Some(Value::Array(ips)) => {
            for ip in ips {
                match ip.as_str().and_then(parse_ip) {
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
    match string(rc, "mac", "runtimeConfig.mac")? {
        None | Some("") => {}
        Some(m) => out.mac = Some(parse_mac(m, "runtimeConfig.mac")?),
    }
    if let Some(v) = field(rc, "bandwidth", "runtimeConfig.bandwidth")? {
        out.bandwidth = bandwidth(v)?;
    }
    Ok(out)
}

/// An address with or without a prefix length (`10.1.0.5`, `10.1.0.5/24`, `fd00::5/64`).
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    let (addr, len) = match s.split_once('/') {
        Some((a, len)) => (a, Some(len)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    match len {
        Some(len) if !len.parse::<u8>().is_ok_and(|l| l <= max) => None,
        _ => Some(addr),
    }
}

/// A MAC the kernel accepts on an Ethernet device: unicast (the multicast bit clear), not
/// all zeroes.
pub fn unicast_mac(m: &str) -> Option<MacAddr> {
    m.parse::<MacAddr>()
        .ok()
        .filter(|mac| mac.0[0] & 1 == 0 && mac.0 != [0; 6])
}

fn parse_mac(m: &str, key: &'static str) -> Result<MacAddr, ConfigError> {
    unicast_mac(m).ok_or_else(|| ConfigError::Invalid {
        key,
        problem: "must be a unicast MAC address such as 02:42:ac:11:00:02",
        found: format!("{m:?}"),
    })
}

/// `runtimeConfig.bandwidth`, as the CNI conventions name its keys or as Go runtimes write
/// them (go-cni's untagged `BandWidth`: `IngressRate`, ...). Rates in bits per second,
/// bursts in bits, non-negative integers. A rate of 0 is no limit in that direction, as in
/// the reference `bandwidth` plugin (containerd sends 0 for the direction without an
/// annotation); a burst without a rate is refused, as there. Keys other than the four are
/// refused by name: a misspelt limit is never dropped silently. `None` when no direction
/// is limited.
fn bandwidth(v: &Value) -> Result<Option<Bandwidth>, ConfigError> {
    let Value::Object(bw) = v else {
        return Err(ConfigError::Invalid {
            key: "runtimeConfig.bandwidth",
            problem: "must be an object with non-negative integers ingressRate, ingressBurst, egressRate and egressBurst",
            found: v.to_string(),
        });
    };
    const KEYS: [(&str, &str); 4] = [
        ("ingressRate", "runtimeConfig.bandwidth.ingressRate"),
        ("ingressBurst", "runtimeConfig.bandwidth.ingressBurst"),
        ("egressRate", "runtimeConfig.bandwidth.egressRate"),
        ("egressBurst", "runtimeConfig.bandwidth.egressBurst"),
    ];
    if let Some(unknown) = bw
        .keys()
        .find(|k| !KEYS.iter().any(|(name, _)| json::fold_eq(k, name)))
    {
        return Err(ConfigError::Invalid {
            key: "runtimeConfig.bandwidth",
            problem: "has a key that is none of ingressRate, ingressBurst, egressRate and egressBurst",
            found: format!("{unknown:?}"),
        });
    }
    let mut values = [0u64; 4];
    for (slot, (name, key)) in values.iter_mut().zip(KEYS) {
        if let Some(v) = field(bw, name, key)? {
            *slot = v.as_u64().ok_or_else(|| ConfigError::Invalid {
                key,
                problem: "must be a non-negative integer (bits per second for a rate, bits for a burst)",
                found: v.to_string(),
            })?;
        }
    }
    let [ingress_rate, ingress_burst, egress_rate, egress_burst] = values;
    let direction = |rate: u64, burst: u64, burst_key: &'static str| match (rate, burst) {
        (0, 0) => Ok((None, None)),
        (0, _) => Err(ConfigError::Invalid {
            key: burst_key,
            problem: "is set but the rate of that direction is 0 (no limit)",
            found: burst.to_string(),
        }),
        (rate, 0) => Ok((Some(rate), None)),
        (rate, burst) => Ok((Some(rate), Some(burst))),
    };
    let (ingress_rate, ingress_burst) = direction(ingress_rate, ingress_burst, KEYS[1].1)?;
    let (egress_rate, egress_burst) = direction(egress_rate, egress_burst, KEYS[3].1)?;
    let out = Bandwidth {
        ingress_rate,
        ingress_burst,
        egress_rate,
        egress_burst,
    };
    Ok((out != Bandwidth::default()).then_some(out))
}

/// `args.cni` (CONVENTIONS.md), if given: `args` and it must be objects.
fn cni_args(obj: &Map<String, Value>) -> Result<Option<&Map<String, Value>>, ConfigError> {
    let Some(args) = field(obj, "args", "args")? else {
        return Ok(None);
    };
    let Value::Object(args) = args else {
        return Err(ConfigError::Invalid {
            key: "args",
            problem: "must be an object",
            found: json_kind(args).into(),
        });
    };
    match field(args, "cni", "args.cni")? {
        None => Ok(None),
        Some(Value::Object(cni)) => Ok(Some(cni)),
        Some(cni) => Err(ConfigError::Invalid {
            key: "args.cni",
            problem: "must be an object",
            found: json_kind(cni).into(),
        }),
    }
}

/// `args.cni.labels`: `[{"key": "app", "value": "web"}, ...]` (CONVENTIONS.md).
fn labels(cni: Option<&Map<String, Value>>) -> Result<Vec<(String, String)>, ConfigError> {
    let invalid = |problem, found: &Value| ConfigError::Invalid {
        key: "args.cni.labels",
        problem,
        found: found.to_string(),
    };
    let Some(labels) = cni
        .map(|cni| field(cni, "labels", "args.cni.labels"))
        .transpose()?
        .flatten()
    else {
        return Ok(Vec::new());
    };
    let list = labels
        .as_array()
        .ok_or_else(|| invalid("must be a list of {\"key\", \"value\"} objects", labels))?;
    list.iter()
        .map(|l| {
            let entry = l.as_object();
            let key = entry
                .map(|e| string(e, "key", "args.cni.labels"))
                .transpose()?
                .flatten();
            let value = entry
                .map(|e| string(e, "value", "args.cni.labels"))
                .transpose()?
                .flatten();
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

/// The protocols of a named port, as Kubernetes writes them.
const PORT_PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

/// `args.cni.namedPorts`: `[{"name": "http", "port": 8080, "protocol": "TCP"}, ...]`, the
/// pod's named ports (`hypha run --port`), for NetworkPolicies that name a port. Read
/// strictly: each entry has a `name` (a Kubernetes port name), a `port` from 1 to 65535
/// and optionally a `protocol` (`TCP`, the default, `UDP` or `SCTP`, upper case as
/// Kubernetes writes it), and no other key; a name is given once. Errors name the entry
/// and its field (`args.cni.namedPorts[1].port`).
fn named_ports(cni: Option<&Map<String, Value>>) -> Result<Vec<NamedPort>, ConfigError> {
    let Some(list) = cni
        .map(|cni| field(cni, "namedPorts", "args.cni.namedPorts"))
        .transpose()?
        .flatten()
    else {
        return Ok(Vec::new());
    };
    let Value::Array(list) = list else {
        return Err(ConfigError::Invalid {
            key: "args.cni.namedPorts",
            problem: "must be a list of {\"name\", \"port\", \"protocol\"} objects",
            found: json_kind(list).into(),
        });
    };
    let mut out: Vec<NamedPort> = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let port = named_port(i, entry)?;
        if out.iter().any(|p| p.name == port.name) {
            return Err(ConfigError::InvalidEntry {
                key: format!("args.cni.namedPorts[{i}].name"),
                problem: "names a port given before (a pod names each port once)",
                found: format!("{:?}", port.name),
            });
        }
        out.push(port);
    }
    Ok(out)
}

/// Entry `i` of `args.cni.namedPorts`.
fn named_port(i: usize, entry: &Value) -> Result<NamedPort, ConfigError> {
    let at = |f: &str| {
        if f.is_empty() {
            format!("args.cni.namedPorts[{i}]")
        } else {
            format!("args.cni.namedPorts[{i}].{f}")
        }
    };
    let invalid = |f: &str, problem, found: String| ConfigError::InvalidEntry {
        key: at(f),
        problem,
        found,
    };
    let Value::Object(entry) = entry else {
        return Err(invalid(
            "",
            "must be an object {\"name\": string, \"port\": integer, \"protocol\": string}",
            entry.to_string(),
        ));
    };
    const FIELDS: [&str; 3] = ["name", "port", "protocol"];
    if let Some(unknown) = entry
        .keys()
        .find(|k| !FIELDS.iter().any(|f| json::fold_eq(k, f)))
    {
        return Err(invalid(
            "",
            "has a key that is none of name, port and protocol",
            format!("{unknown:?}"),
        ));
    }
    let get = |f: &'static str| match json::lookup(entry, f) {
        Ok(Some(Value::Null) | None) => Ok(None),
        Ok(Some(v)) => Ok(Some(v)),
        Err(e) => Err(invalid(
            f,
            "is given more than once with different letter case",
            e.keys.join(", "),
        )),
    };
    let name = match get("name")? {
        None => {
            return Err(invalid(
                "name",
                "is missing",
                Value::Object(entry.clone()).to_string(),
            ));
        }
        Some(Value::String(n)) if hypha_api::is_port_name(n) => n.clone(),
        Some(Value::String(n)) => {
            return Err(invalid(
                "name",
                "must be a port name as Kubernetes takes it: 1 to 15 lower-case letters, digits and '-', with a letter, no '-' at either end or next to another",
                format!("{n:?}"),
            ));
        }
        Some(v) => return Err(invalid("name", "must be a string", json_kind(v).into())),
    };
    let port = match get("port")? {
        None => {
            return Err(invalid(
                "port",
                "is missing",
                Value::Object(entry.clone()).to_string(),
            ));
        }
        Some(v) => v
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid("port", "must be an integer from 1 to 65535", v.to_string()))?,
    };
    let protocol = match get("protocol")? {
        None => "TCP".to_owned(),
        Some(Value::String(p)) if PORT_PROTOCOLS.contains(&p.as_str()) => p.clone(),
        Some(Value::String(p)) => {
            return Err(invalid(
                "protocol",
                "must be TCP, UDP or SCTP (upper case, as Kubernetes writes it)",
                format!("{p:?}"),
            ));
        }
        Some(v) => return Err(invalid("protocol", "must be a string", json_kind(v).into())),
    };
    Ok(NamedPort {
        name,
        port,
        protocol,
    })
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
            let Value::Object(entry) = a else {
                return Err(invalid(a));
            };
            let id = string(entry, "containerID", key).map_err(|_| invalid(a))?;
            let ifname = string(entry, "ifname", key).map_err(|_| invalid(a))?;
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
    match field(obj, key, key)? {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ConfigError::Invalid {
            key,
            problem: "must be true or false",
            found: v.to_string(),
        }),
    }
}

/// The configuration's `cniVersion` if it is one this plugin speaks; for replies that
/// must be written whatever went wrong (errors, VERSION).
pub fn version_hint(stdin: &[u8]) -> Option<CniVersion> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    CniVersion::parse(json::get(&v, "cniVersion").ok()??.as_str()?)
}

/// The value of `name` in `obj` as Go would find it (null is absent); `key` is the name
/// errors give it (`ipam.type` for `type` under `ipam`).
fn field<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    key: &'static str,
) -> Result<Option<&'a Value>, ConfigError> {
    match json::lookup(obj, name) {
        Ok(Some(Value::Null) | None) => Ok(None),
        Ok(Some(v)) => Ok(Some(v)),
        Err(e) => Err(ConfigError::Invalid {
            key,
            problem: "is given more than once with different letter case",
            found: e.keys.join(", "),
        }),
    }
}

fn string<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    key: &'static str,
) -> Result<Option<&'a str>, ConfigError> {
    match field(obj, name, key)? {
        None => Ok(None),
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
        assert!(conf.named_ports.is_empty());
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
                                   "bandwidth": {"ingressRate": 1000, "ingressBurst": 50}, "portMappings": []},
                 "args": {"cni": {"labels": [{"key": "app", "value": "web"}]}},
                 "disableCheck": true, "disableGC": false,
                 "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(conf.ipam_type.as_deref(), Some("host-local"));
        assert_eq!(
            conf.runtime.ips,
            ["fd00::5", "10.1.0.5", "10.1.0.6"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        assert_eq!(
            conf.runtime.mac,
            Some(MacAddr([0x02, 0x42, 0xac, 0x11, 0, 2]))
        );
        assert_eq!(
            conf.runtime.bandwidth,
            Some(Bandwidth {
                ingress_rate: Some(1000),
                ingress_burst: Some(50),
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

    /// containerd's CRI fills go-cni's untagged `BandWidth` struct (containerd/go-cni
    /// types.go, `type BandWidth struct { IngressRate, IngressBurst, EgressRate,
    /// EgressBurst uint64 }`) in `toCNIBandWidth` (containerd, internal/cri/server/
    /// sandbox_run.go): the annotated direction gets its rate and a burst of
    /// `math.MaxUint32`, the other stays 0; `encoding/json` writes the Go field names.
    #[test]
    fn go_cni_bandwidth_with_only_an_egress_limit() {
        let conf = parse(
            br#"{"cniVersion": "1.0.0", "name": "n", "runtimeConfig": {"bandwidth":
                 {"EgressBurst": 4294967295, "EgressRate": 1000000, "IngressBurst": 0, "IngressRate": 0}}}"#,
        )
        .unwrap();
        assert_eq!(
            conf.runtime.bandwidth,
            Some(Bandwidth {
                egress_rate: Some(1_000_000),
                egress_burst: Some(4_294_967_295),
                ..Bandwidth::default()
            })
        );
    }

    #[test]
    fn a_zero_rate_is_no_limit_in_that_direction() {
        let conf = parse(
            br#"{"cniVersion": "1.0.0", "name": "n", "runtimeConfig": {"bandwidth":
                 {"ingressRate": 0, "ingressBurst": 0, "egressRate": 5000000}}}"#,
        )
        .unwrap();
        assert_eq!(
            conf.runtime.bandwidth,
            Some(Bandwidth {
                egress_rate: Some(5_000_000),
                ..Bandwidth::default()
            })
        );
        // Nothing limited at all: no limit to store.
        let conf = parse(
            br#"{"cniVersion": "1.0.0", "name": "n", "runtimeConfig": {"bandwidth":
                 {"ingressRate": 0, "egressRate": 0}}}"#,
        )
        .unwrap();
        assert_eq!(conf.runtime.bandwidth, None);
    }

    #[test]
    fn every_key_is_matched_whatever_its_case() {
        let conf = parse(
            br#"{"CNIVersion": "1.1.0", "Name": "n", "TYPE": "hypha-cni", "AgentSocket": "/tmp/a.sock",
                 "MTU": 1400, "PrevResult": {"ips": []}, "IPAM": {"Type": "host-local"},
                 "RuntimeConfig": {"IPs": ["10.1.0.5/24"], "Mac": "02:42:ac:11:00:02",
                                   "Bandwidth": {"ingressrate": 1000, "INGRESSBURST": 50}},
                 "Args": {"CNI": {"Labels": [{"Key": "app", "VALUE": "web"}],
                                  "NAMEDPORTS": [{"NAME": "http", "Port": 80, "protocol": "UDP"}]}},
                 "DisableCheck": true, "disablegc": true,
                 "CNI.DEV/VALID-ATTACHMENTS": [{"ContainerID": "c1", "IfName": "eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(conf.cni_version, CniVersion::V1_1_0);
        assert_eq!(conf.name, "n");
        assert_eq!(conf.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(conf.mtu, Some(1400));
        assert_eq!(conf.prev_result, Some(serde_json::json!({"ips": []})));
        assert_eq!(conf.ipam_type.as_deref(), Some("host-local"));
        assert_eq!(conf.runtime.ips, vec![IpAddr::from([10, 1, 0, 5])]);
        assert_eq!(
            conf.runtime.mac,
            Some(MacAddr([0x02, 0x42, 0xac, 0x11, 0, 2]))
        );
        assert_eq!(
            conf.runtime.bandwidth,
            Some(Bandwidth {
                ingress_rate: Some(1000),
                ingress_burst: Some(50),
                ..Bandwidth::default()
            })
        );
        assert_eq!(conf.labels, vec![("app".to_owned(), "web".to_owned())]);
        assert_eq!(conf.named_ports, [port("http", 80, "UDP")]);
        assert!(conf.disable_check && conf.disable_gc);
        assert_eq!(
            conf.valid_attachments,
            Some(vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }])
        );
        assert_eq!(
            version_hint(br#"{"CniVersion": "0.4.0"}"#),
            Some(CniVersion::V0_4_0)
        );
    }

    #[test]
    fn a_bandwidth_that_cannot_be_read_is_refused_by_key() {
        for (bw, key) in [
            (
                r#"{"egressRate": "10M"}"#,
                "runtimeConfig.bandwidth.egressRate",
            ),
            (
                r#"{"EgressRate": 1.5}"#,
                "runtimeConfig.bandwidth.egressRate",
            ),
            (
                r#"{"ingressRate": -1}"#,
                "runtimeConfig.bandwidth.ingressRate",
            ),
            (
                r#"{"ingressRate": 18446744073709551616}"#,
                "runtimeConfig.bandwidth.ingressRate",
            ),
            (r#"{"egressLimit": 1000}"#, "egressLimit"),
            (
                r#"{"ingressRate": 0, "ingressBurst": 100}"#,
                "runtimeConfig.bandwidth.ingressBurst",
            ),
            (
                r#"{"EgressRate": 1, "egressrate": 2}"#,
                "runtimeConfig.bandwidth.egressRate",
            ),
            (r#"[1000]"#, "runtimeConfig.bandwidth"),
        ] {
            let json = format!(
                r#"{{"cniVersion": "1.1.0", "name": "n", "runtimeConfig": {{"bandwidth": {bw}}}}}"#
            );
            let e = parse(json.as_bytes()).unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { .. }), "{json}: {e:?}");
            assert!(e.to_string().contains(key), "{json}: {e}");
        }
    }

    fn port(name: &str, port: u16, protocol: &str) -> NamedPort {
        NamedPort {
            name: name.into(),
            port,
            protocol: protocol.into(),
        }
    }

    fn with_named_ports(ports: &str) -> Result<NetConf, ConfigError> {
        parse(
            format!(
                r#"{{"cniVersion": "1.1.0", "name": "n", "args": {{"cni": {{"namedPorts": {ports}}}}}}}"#
            )
            .as_bytes(),
        )
    }

    #[test]
    fn named_ports_in_order_with_tcp_by_default() {
        let conf = with_named_ports(
            r#"[{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "sig-1", "port": 65535, "protocol": "SCTP"}, {"name": "metrics", "port": 1},
                {"name": "admin", "port": 9000, "protocol": null}]"#,
        )
        .unwrap();
        assert_eq!(
            conf.named_ports,
            [
                port("http", 8080, "TCP"),
                port("dns", 53, "UDP"),
                port("sig-1", 65535, "SCTP"),
                port("metrics", 1, "TCP"),
                port("admin", 9000, "TCP"),
            ]
        );
        assert!(with_named_ports("[]").unwrap().named_ports.is_empty());
        assert!(with_named_ports("null").unwrap().named_ports.is_empty());
        // Beside labels, under the same args.cni.
        let conf = parse(
            br#"{"cniVersion": "1.1.0", "name": "n", "args": {"cni": {"labels": [{"key": "app", "value": "web"}],
                 "namedPorts": [{"name": "http", "port": 80}]}}}"#,
        )
        .unwrap();
        assert_eq!(conf.labels, vec![("app".to_owned(), "web".to_owned())]);
        assert_eq!(conf.named_ports, [port("http", 80, "TCP")]);
    }

    /// Go runtimes match keys whatever their case; the values are as Kubernetes writes them.
    #[test]
    fn named_port_keys_are_matched_whatever_their_case() {
        let conf = parse(
            br#"{"cniVersion": "1.1.0", "name": "n",
                 "Args": {"CNI": {"NamedPorts": [{"Name": "http", "PORT": 8080, "Protocol": "UDP"}]}}}"#,
        )
        .unwrap();
        assert_eq!(conf.named_ports, [port("http", 8080, "UDP")]);
    }

    #[test]
    fn bad_named_ports_name_the_entry_and_field() {
        for (ports, key, found) in [
            (r#"{}"#, "args.cni.namedPorts", "an object"),
            (r#""http:80""#, "args.cni.namedPorts", "a string"),
            (r#"[3]"#, "args.cni.namedPorts[0]", "3"),
            (
                r#"[{"port": 80}]"#,
                "args.cni.namedPorts[0].name",
                "missing",
            ),
            (
                r#"[{"name": "http"}]"#,
                "args.cni.namedPorts[0].port",
                "missing",
            ),
            (
                r#"[{"name": "a", "port": 1}, {"name": 7, "port": 80}]"#,
                "args.cni.namedPorts[1].name",
                "a number",
            ),
            (
                r#"[{"name": "", "port": 80}]"#,
                "args.cni.namedPorts[0].name",
                "\"\"",
            ),
            (
                r#"[{"name": "HTTP", "port": 80}]"#,
                "args.cni.namedPorts[0].name",
                "HTTP",
            ),
            (
                r#"[{"name": "8080", "port": 80}]"#,
                "args.cni.namedPorts[0].name",
                "8080",
            ),
            (
                r#"[{"name": "-web", "port": 80}]"#,
                "args.cni.namedPorts[0].name",
                "-web",
            ),
            (
                r#"[{"name": "web-", "port": 80}]"#,
                "args.cni.namedPorts[0].name",
                "web-",
            ),
            (
                r#"[{"name": "a--b", "port": 80}]"#,
                "args.cni.namedPorts[0].name",
                "a--b",
            ),
            (
                r#"[{"name": "web_ui", "port": 80}]"#,
                "args.cni.namedPorts[0].name",
                "web_ui",
            ),
            (
                r#"[{"name": "abcdefghijklmnop", "port": 80}]"#,
                "args.cni.namedPorts[0].name",
                "abcdefghijklmnop",
            ),
            (
                r#"[{"name": "http", "port": 0}]"#,
                "args.cni.namedPorts[0].port",
                "0",
            ),
            (
                r#"[{"name": "http", "port": 65536}]"#,
                "args.cni.namedPorts[0].port",
                "65536",
            ),
            (
                r#"[{"name": "http", "port": -80}]"#,
                "args.cni.namedPorts[0].port",
                "-80",
            ),
            (
                r#"[{"name": "http", "port": 80.5}]"#,
                "args.cni.namedPorts[0].port",
                "80.5",
            ),
            (
                r#"[{"name": "http", "port": "80"}]"#,
                "args.cni.namedPorts[0].port",
                "\"80\"",
            ),
            (
                r#"[{"name": "http", "port": 80, "protocol": "tcp"}]"#,
                "args.cni.namedPorts[0].protocol",
                "tcp",
            ),
            (
                r#"[{"name": "http", "port": 80, "protocol": "ICMP"}]"#,
                "args.cni.namedPorts[0].protocol",
                "ICMP",
            ),
            (
                r#"[{"name": "http", "port": 80, "protocol": 6}]"#,
                "args.cni.namedPorts[0].protocol",
                "a number",
            ),
            (
                r#"[{"name": "http", "port": 80, "hostPort": 8080}]"#,
                "args.cni.namedPorts[0]",
                "hostPort",
            ),
            (
                r#"[{"NAME": "http", "Name": "web", "port": 80}]"#,
                "args.cni.namedPorts[0].name",
                "different letter case",
            ),
            (
                r#"[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "http", "port": 81, "protocol": "UDP"}]"#,
                "args.cni.namedPorts[2].name",
                "http",
            ),
        ] {
            let e = with_named_ports(ports).unwrap_err();
            assert!(
                matches!(
                    e,
                    ConfigError::Invalid { .. } | ConfigError::InvalidEntry { .. }
                ),
                "{ports}: {e:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains(&format!("{key} ")), "{ports}: {msg}");
            assert!(msg.contains(found), "{ports}: {msg}");
            assert_eq!(
                crate::error::CniError::from(crate::error::Error::from(e)).code,
                7,
                "{ports}"
            );
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
