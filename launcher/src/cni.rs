//! Running a CNI network configuration list as libcni does.
//!
//! [`NetworkConfig::load`] finds the conflist (by `name`, or the first file by file name),
//! [`NetworkConfig::resolve_plugins`] finds every plugin on `CNI_PATH` before anything is
//! created, [`Network::add`] runs ADD through the chain passing each result on as
//! `prevResult`, and [`Network::del`] runs DEL in reverse order with the cached result.
//! Each plugin's configuration gets `cniVersion` and `name` from the list, the
//! `runtimeConfig` keys of the capabilities it declares, `args.cni.labels` and
//! `args.cni.namedPorts`.
//!
//! Plugins run through [`PluginExec`], so the chain logic is unit-tested with a fake.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::ports::NamedPort;

/// The default CNI configuration directory.
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
/// The default plugin search path.
pub const DEFAULT_CNI_PATH: &str = "/opt/cni/bin";
/// The interface name the container gets.
pub const IFNAME: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The configuration directory cannot be listed.
    #[error("reading the CNI configuration directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// A configuration file cannot be read.
    #[error("reading CNI configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A configuration file is not a valid conflist or conf.
    #[error("invalid CNI configuration {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// No file in the directory defines the network asked for.
    #[error("network {name:?} not found in {dir}")]
    UnknownNetwork { name: String, dir: PathBuf },
    /// No network was asked for and the directory has none.
    #[error("no CNI network configuration in {dir} (use --network none for no network)")]
    NoNetwork { dir: PathBuf },
    /// A plugin the list names is not on the search path.
    #[error("CNI plugin {plugin:?} of network {network:?} not found in CNI_PATH {path}")]
    PluginNotFound {
        network: String,
        plugin: String,
        path: String,
    },
    /// A plugin could not be started or waited for.
    #[error("running CNI plugin {plugin} ({command}): {source}")]
    Exec {
        plugin: String,
        command: &'static str,
        source: std::io::Error,
    },
    /// A plugin reported an error (its CNI error object, or its output when it gave none).
    #[error("CNI plugin {plugin} failed {command}: {msg}")]
    Plugin {
        plugin: String,
        command: &'static str,
        msg: String,
    },
    /// A plugin succeeded but its output is not a JSON result.
    #[error("CNI plugin {plugin} returned an invalid {command} result: {reason}")]
    BadResult {
        plugin: String,
        command: &'static str,
        reason: String,
    },
}

/// One network configuration list, as read from the configuration directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetworkConfig {
    pub name: String,
    pub cni_version: String,
    /// The file it came from.
    pub source: PathBuf,
    /// Every plugin's configuration as written (no runtime keys yet).
    pub plugins: Vec<Map<String, Value>>,
}

impl NetworkConfig {
    /// Parses a `.conflist` (or a single-plugin `.conf`, which becomes a list of one).
    pub fn parse(path: &Path, text: &str) -> Result<Self, CniError> {
        let invalid = |reason: String| CniError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| invalid("not a JSON object".into()))?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid("missing \"name\"".into()))?
            .to_owned();
        let cni_version = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("missing \"cniVersion\"".into()))?
            .to_owned();
        let plugins = match obj.get("plugins") {
            Some(Value::Array(list)) => list
                .iter()
                .map(|p| p.as_object().cloned())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid("\"plugins\" must hold objects".into()))?,
            Some(_) => return Err(invalid("\"plugins\" must be an array".into())),
            None if obj.contains_key("type") => vec![obj.clone()],
            None => return Err(invalid("no \"plugins\" and no \"type\"".into())),
        };
        if plugins.is_empty() {
            return Err(invalid("\"plugins\" is empty".into()));
        }
        for p in &plugins {
            if !p
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| !t.is_empty() && !t.contains('/'))
            {
                return Err(invalid(
                    "every plugin needs a \"type\" (a file name)".into(),
                ));
            }
        }
        Ok(Self {
            name,
            cni_version,
            source: path.to_owned(),
            plugins,
        })
    }

    /// The network named `name` in `dir`, or the first file by name when `name` is `None`.
    /// Files ending in `.conflist`, `.conf` or `.json` are considered, as libcni does.
    pub fn load(dir: &Path, name: Option<&str>) -> Result<Self, CniError> {
        let entries = std::fs::read_dir(dir).map_err(|source| CniError::ReadDir {
            dir: dir.to_owned(),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
            })
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|source| CniError::Read {
                path: path.clone(),
                source,
            })?;
            match name {
                None => return Self::parse(&path, &text),
                Some(want) => {
                    // Files that do not parse cannot be the one asked for unless they
                    // name it; report those only when they do.
                    let named = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_owned));
                    if named.as_deref() == Some(want) {
                        return Self::parse(&path, &text);
                    }
                }
            }
        }
        Err(match name {
            Some(n) => CniError::UnknownNetwork {
                name: n.to_owned(),
                dir: dir.to_owned(),
            },
            None => CniError::NoNetwork {
                dir: dir.to_owned(),
            },
        })
    }

    /// Finds every plugin binary on `cni_path` (colon-separated), in chain order.
    pub fn resolve_plugins(&self, cni_path: &str) -> Result<Vec<PathBuf>, CniError> {
        self.plugins
            .iter()
            .map(|p| {
                let ty = p.get("type").and_then(Value::as_str).unwrap_or_default();
                cni_path
                    .split(':')
                    .filter(|d| !d.is_empty())
                    .map(|d| Path::new(d).join(ty))
                    .find(|p| p.is_file())
                    .ok_or_else(|| CniError::PluginNotFound {
                        network: self.name.clone(),
                        plugin: ty.to_owned(),
                        path: cni_path.to_owned(),
                    })
            })
            .collect()
    }
}

/// What the runtime knows about the container that plugins may ask for.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RuntimeInfo {
    pub container_id: String,
    /// The pod name (`K8S_POD_NAME`): the container's name.
    pub name: String,
    /// The pod namespace (`K8S_POD_NAMESPACE`).
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// The container's named ports (`--port`), for every plugin in `args.cni.namedPorts`.
    /// (Absent from the state of containers made before it.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NamedPort>,
    /// Bits per second.
    pub ingress_rate: Option<u64>,
    pub egress_rate: Option<u64>,
}

impl RuntimeInfo {
    /// `CNI_ARGS` as Kubernetes runtimes pass it.
    pub fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            self.namespace, self.name, self.container_id
        )
    }

    /// The `runtimeConfig` for a plugin declaring `capabilities`: only the capabilities it
    /// declares as `true` and the runtime has values for.
    pub fn runtime_config(&self, capabilities: Option<&Value>) -> Map<String, Value> {
        let mut rc = Map::new();
        let declared = |cap: &str| {
            capabilities
                .and_then(|c| c.get(cap))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        };
        if declared("bandwidth") && (self.ingress_rate.is_some() || self.egress_rate.is_some()) {
            // Kubernetes passes no burst of its own: the largest the plugin takes.
            let mut bw = Map::new();
            if let Some(r) = self.ingress_rate {
                bw.insert("ingressRate".into(), json!(r));
                bw.insert("ingressBurst".into(), json!(i32::MAX));
            }
            if let Some(r) = self.egress_rate {
                bw.insert("egressRate".into(), json!(r));
                bw.insert("egressBurst".into(), json!(i32::MAX));
            }
            rc.insert("bandwidth".into(), Value::Object(bw));
        }
        if declared("labels") && !self.labels.is_empty() {
            rc.insert("labels".into(), self.labels_json());
        }
        rc
    }

    fn labels_json(&self) -> Value {
        Value::Array(
            self.labels
                .iter()
                .map(|(k, v)| json!({"key": k, "value": v}))
                .collect(),
        )
    }

    /// One plugin's configuration as it goes to the plugin's stdin.
    pub fn plugin_conf(
        &self,
        net: &NetworkConfig,
        plugin: &Map<String, Value>,
        prev_result: Option<&Value>,
    ) -> Value {
        let mut conf = plugin.clone();
        conf.insert("cniVersion".into(), json!(net.cni_version));
        conf.insert("name".into(), json!(net.name));
        let rc = self.runtime_config(plugin.get("capabilities"));
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        let mut cni_args = Map::new();
        if !self.labels.is_empty() {
            cni_args.insert("labels".into(), self.labels_json());
        }
        if !self.ports.is_empty() {
            cni_args.insert(
                "namedPorts".into(),
                serde_json::to_value(&self.ports).expect("named ports serialize"),
            );
        }
        if !cni_args.is_empty() {
            let args = conf
                .entry("args")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .map(|a| a.entry("cni").or_insert_with(|| json!({})));
            if let Some(Value::Object(cni)) = args {
                cni.extend(cni_args);
            }
        }
        if let Some(prev) = prev_result {
            conf.insert("prevResult".into(), prev.clone());
        }
        Value::Object(conf)
    }
}

/// Runs one plugin: `CNI_*` variables in `env`, the configuration on stdin; returns its
/// exit success and standard output.
pub trait PluginExec {
    fn exec(
        &self,
        plugin: &Path,
        env: &[(&str, String)],
        stdin: &[u8],
    ) -> std::io::Result<(bool, Vec<u8>)>;
}

/// Runs plugins as child processes, in the caller's network namespace.
pub struct RealExec;

impl PluginExec for RealExec {
    fn exec(
        &self,
        plugin: &Path,
        env: &[(&str, String)],
        stdin: &[u8],
    ) -> std::io::Result<(bool, Vec<u8>)> {
        let mut cmd = Command::new(plugin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CNI_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(stdin)?;
        let out = child.wait_with_output()?;
        Ok((out.status.success(), out.stdout))
    }
}

/// A network attachment: the list, its plugins and the container's details; everything
/// DEL needs later, kept in the container's state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Network {
    pub config: NetworkConfig,
    pub plugin_paths: Vec<PathBuf>,
    pub cni_path: String,
    pub netns: PathBuf,
    pub info: RuntimeInfo,
    /// The final ADD result, once ADD completed.
    pub result: Option<Value>,
}

impl Network {
    fn env(&self, command: &'static str) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", command.to_owned()),
            ("CNI_CONTAINERID", self.info.container_id.clone()),
            ("CNI_NETNS", self.netns.display().to_string()),
            ("CNI_IFNAME", IFNAME.to_owned()),
            ("CNI_ARGS", self.info.cni_args()),
            ("CNI_PATH", self.cni_path.clone()),
        ]
    }

    fn invoke(
        &self,
        exec: &dyn PluginExec,
        index: usize,
        command: &'static str,
        prev: Option<&Value>,
    ) -> Result<Option<Value>, CniError> {
        let plugin = &self.config.plugins[index];
        let ty = plugin
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let conf = self.info.plugin_conf(&self.config, plugin, prev);
        let (ok, stdout) = exec
            .exec(
                &self.plugin_paths[index],
                &self.env(command),
                conf.to_string().as_bytes(),
            )
            .map_err(|source| CniError::Exec {
                plugin: ty.clone(),
                command,
                source,
            })?;
        let text = String::from_utf8_lossy(&stdout);
        if !ok {
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    let msg = v.get("msg")?.as_str()?.to_owned();
                    let code = v.get("code").and_then(Value::as_u64).unwrap_or(0);
                    Some(match v.get("details").and_then(Value::as_str) {
                        Some(d) if !d.is_empty() => format!("{msg} ({d}; code {code})"),
                        _ => format!("{msg} (code {code})"),
                    })
                })
                .unwrap_or_else(|| format!("exited with an error: {}", text.trim()));
            return Err(CniError::Plugin {
                plugin: ty,
                command,
                msg,
            });
        }
        if command == "DEL" || text.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str::<Value>(&text)
            .ok()
            .filter(Value::is_object)
            .map(Some)
            .ok_or_else(|| CniError::BadResult {
                plugin: ty,
                command,
                reason: format!("not a JSON object: {}", text.trim()),
            })
    }

    /// ADD through the chain; each plugin gets the previous one's result. Stores and returns
    /// the final result. On failure nothing is undone here: the caller runs [`Network::del`]
    /// for the whole chain, as runtimes do.
    pub fn add(&mut self, exec: &dyn PluginExec) -> Result<&Value, CniError> {
        let mut prev: Option<Value> = None;
        for i in 0..self.config.plugins.len() {
            if let Some(r) = self.invoke(exec, i, "ADD", prev.as_ref())? {
                prev = Some(r);
            }
        }
        Ok(self.result.insert(prev.unwrap_or_else(|| json!({}))))
    }

    /// DEL through the chain in reverse order, every plugin with the cached result as
    /// `prevResult`. Keeps going past failures and returns them all.
    pub fn del(&self, exec: &dyn PluginExec) -> Vec<CniError> {
        (0..self.config.plugins.len())
            .rev()
            .filter_map(|i| self.invoke(exec, i, "DEL", self.result.as_ref()).err())
            .collect()
    }

    /// The container's addresses from the cached result (without prefix length).
    pub fn ips(&self) -> Vec<String> {
        self.result
            .as_ref()
            .and_then(|r| r.get("ips"))
            .and_then(Value::as_array)
            .map(|ips| {
                ips.iter()
                    .filter_map(|ip| ip.get("address")?.as_str())
                    .map(|a| a.split('/').next().unwrap_or(a).to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::ports::parse_port;

    const LIST: &str = r#"{"cniVersion":"1.0.0","name":"net1","plugins":[
        {"type":"hypha-cni","agentSocket":"/s"},
        {"type":"bandwidth","capabilities":{"bandwidth":true}}]}"#;

    fn info() -> RuntimeInfo {
        RuntimeInfo {
            container_id: "abc".into(),
            name: "web".into(),
            namespace: "default".into(),
            labels: [("app".to_owned(), "x".to_owned())].into(),
            ports: vec![
                parse_port("http:8080").unwrap(),
                parse_port("dns:53/udp").unwrap(),
            ],
            ingress_rate: Some(1_000_000),
            egress_rate: None,
        }
    }

    #[test]
    fn parses_lists_and_single_confs() {
        let n = NetworkConfig::parse(Path::new("a"), LIST).unwrap();
        assert_eq!((n.name.as_str(), n.plugins.len()), ("net1", 2));
        let one = r#"{"cniVersion":"0.4.0","name":"n","type":"bridge"}"#;
        assert_eq!(
            NetworkConfig::parse(Path::new("b"), one).unwrap().plugins[0]["type"],
            "bridge"
        );
        for (bad, why) in [
            ("[]", "object"),
            (r#"{"cniVersion":"1.0.0","plugins":[]}"#, "name"),
            (r#"{"name":"n","plugins":[]}"#, "cniVersion"),
            (r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#, "empty"),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{}]}"#,
                "type",
            ),
            (r#"{"cniVersion":"1.0.0","name":"n"}"#, "type"),
        ] {
            let e = NetworkConfig::parse(Path::new("c"), bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn loads_by_name_or_first_file() {
        let dir = tempfile::tempdir().unwrap();
        let write = |f: &str, name: &str| {
            std::fs::write(
                dir.path().join(f),
                format!(r#"{{"cniVersion":"1.0.0","name":"{name}","plugins":[{{"type":"x"}}]}}"#),
            )
            .unwrap()
        };
        let e = NetworkConfig::load(dir.path(), None).unwrap_err();
        assert!(matches!(e, CniError::NoNetwork { .. }), "{e}");
        write("20-b.conflist", "b");
        write("10-a.conflist", "a");
        std::fs::write(dir.path().join("00-notes.txt"), "x").unwrap();
        assert_eq!(NetworkConfig::load(dir.path(), None).unwrap().name, "a");
        assert_eq!(
            NetworkConfig::load(dir.path(), Some("b")).unwrap().name,
            "b"
        );
        let e = NetworkConfig::load(dir.path(), Some("nope")).unwrap_err();
        assert!(e.to_string().contains("\"nope\" not found"), "{e}");
    }

    #[test]
    fn runtime_config_only_for_declared_capabilities() {
        let i = info();
        assert!(i.runtime_config(None).is_empty());
        assert!(
            i.runtime_config(Some(&json!({"bandwidth": false})))
                .is_empty()
        );
        let rc = i.runtime_config(Some(&json!({"bandwidth": true, "portMappings": true})));
        assert_eq!(
            Value::Object(rc),
            json!({"bandwidth": {"ingressRate": 1_000_000, "ingressBurst": i32::MAX}})
        );
        let rc = i.runtime_config(Some(&json!({"labels": true})));
        assert_eq!(rc["labels"], json!([{"key": "app", "value": "x"}]));
    }

    /// Named ports go next to the labels in `args.cni`, without them too, keeping what the
    /// plugin's own configuration has there; nothing to pass, no `args`.
    #[test]
    fn plugin_conf_named_ports_beside_the_plugins_own_args() {
        let net = NetworkConfig::parse(
            Path::new("a"),
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[
                {"type":"hypha-cni","args":{"cni":{"ips":["10.1.0.9"]},"other":1}},
                {"type":"x"}]}"#,
        )
        .unwrap();
        let only_ports = RuntimeInfo {
            labels: BTreeMap::new(),
            ..info()
        };
        let c = only_ports.plugin_conf(&net, &net.plugins[0], None);
        assert_eq!(
            c["args"],
            json!({"cni": {"ips": ["10.1.0.9"], "namedPorts": [
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ]}, "other": 1})
        );
        let nothing = RuntimeInfo {
            labels: BTreeMap::new(),
            ports: Vec::new(),
            ..info()
        };
        assert!(
            nothing
                .plugin_conf(&net, &net.plugins[1], None)
                .get("args")
                .is_none()
        );
    }

    #[test]
    fn plugin_conf_injects_list_keys_args_and_prev_result() {
        let net = NetworkConfig::parse(Path::new("a"), LIST).unwrap();
        let prev = json!({"ips": []});
        let c = info().plugin_conf(&net, &net.plugins[1], Some(&prev));
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(c["name"], "net1");
        assert_eq!(c["prevResult"], prev);
        assert_eq!(c["runtimeConfig"]["bandwidth"]["ingressRate"], 1_000_000);
        assert_eq!(c["args"]["cni"]["labels"][0]["key"], "app");
        let ports = json!([
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]);
        assert_eq!(c["args"]["cni"]["namedPorts"], ports);
        let c = info().plugin_conf(&net, &net.plugins[0], None);
        assert_eq!(
            c["args"]["cni"]["namedPorts"], ports,
            "every plugin gets them"
        );
        assert!(c.get("runtimeConfig").is_none() && c.get("prevResult").is_none());
        assert_eq!(
            info().cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc"
        );
    }

    /// Records every call; plugin `i` fails when `fail == Some(i)`.
    struct Fake {
        calls: RefCell<Vec<(String, String, Value)>>,
        fail: Option<usize>,
    }

    impl PluginExec for Fake {
        fn exec(
            &self,
            plugin: &Path,
            env: &[(&str, String)],
            stdin: &[u8],
        ) -> std::io::Result<(bool, Vec<u8>)> {
            let cmd = env
                .iter()
                .find(|(k, _)| *k == "CNI_COMMAND")
                .unwrap()
                .1
                .clone();
            let name = plugin.display().to_string();
            let conf: Value = serde_json::from_slice(stdin).unwrap();
            let n = self.calls.borrow().len();
            self.calls.borrow_mut().push((name.clone(), cmd, conf));
            if self.fail.is_some_and(|f| name.ends_with(&f.to_string())) {
                return Ok((false, br#"{"code":11,"msg":"no addresses left"}"#.to_vec()));
            }
            Ok((
                true,
                json!({"ips": [{"address": format!("10.0.0.{n}/32")}]})
                    .to_string()
                    .into_bytes(),
            ))
        }
    }

    fn network() -> Network {
        Network {
            config: NetworkConfig::parse(Path::new("a"), LIST).unwrap(),
            plugin_paths: vec!["/p/0".into(), "/p/1".into()],
            cni_path: "/p".into(),
            netns: "/run/x/netns".into(),
            info: info(),
            result: None,
        }
    }

    #[test]
    fn add_chains_prev_results_and_del_runs_in_reverse() {
        let fake = Fake {
            calls: RefCell::new(vec![]),
            fail: None,
        };
        let mut net = network();
        let result = net.add(&fake).unwrap().clone();
        assert_eq!(result["ips"][0]["address"], "10.0.0.1/32");
        assert_eq!(net.ips(), ["10.0.0.1"]);
        let errors = net.del(&fake);
        assert!(errors.is_empty());
        let calls = fake.calls.borrow();
        let order: Vec<_> = calls.iter().map(|(p, c, _)| format!("{c} {p}")).collect();
        assert_eq!(order, ["ADD /p/0", "ADD /p/1", "DEL /p/1", "DEL /p/0"]);
        assert!(calls[0].2.get("prevResult").is_none());
        assert_eq!(calls[1].2["prevResult"]["ips"][0]["address"], "10.0.0.0/32");
        assert_eq!(calls[2].2["prevResult"], result);
        assert_eq!(calls[3].2["prevResult"], result);
    }

    /// Whatever families the result has, in its order: dual stack, IPv6 only.
    #[test]
    fn ips_of_dual_stack_and_ipv6_only_results() {
        let mut net = network();
        net.result = Some(json!({"ips": [
            {"address": "10.0.0.5/32", "gateway": "10.0.0.1", "interface": 1},
            {"address": "fd00:10:244::5/128", "gateway": "fe80::1", "interface": 1},
        ]}));
        assert_eq!(net.ips(), ["10.0.0.5", "fd00:10:244::5"]);
        net.result = Some(json!({"ips": [{"address": "fd00:10:244::5/128", "version": "6"}]}));
        assert_eq!(net.ips(), ["fd00:10:244::5"]);
    }

    #[test]
    fn plugin_errors_carry_the_cni_message() {
        let fake = Fake {
            calls: RefCell::new(vec![]),
            fail: Some(1),
        };
        let mut net = network();
        let e = net.add(&fake).unwrap_err().to_string();
        assert!(
            e.contains("no addresses left") && e.contains("code 11"),
            "{e}"
        );
        assert!(net.result.is_none());
        // DEL goes on past a failing plugin and reports it.
        assert_eq!(net.del(&fake).len(), 1);
        assert_eq!(fake.calls.borrow().len(), 4);
    }
}
