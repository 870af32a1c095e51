//! Delegated IPAM: running the plugin named in `ipam.type` as the spec's "Delegated
//! plugins" section and libcni's `invoke.Delegate*` do: found in `CNI_PATH`, given this
//! process's environment with `CNI_COMMAND` set, and the same network configuration on
//! stdin; its result or its error read back from stdout.
//!
//! One refinement over libcni: a plugin that does not speak the configuration's
//! `cniVersion` (Debian's reference plugins stop at 1.0.0, this plugin's configurations
//! may say 1.1.0) is asked for its versions, and called again with the configuration's
//! `cniVersion` lowered to the newest version both speak. ADD and DEL mean the same in
//! both, and the result is read in whatever version it comes back.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{Map, Value};

use crate::config::{CniVersion, NetConf};
use crate::error::Error;
use crate::json;

/// Spec code 1: incompatible CNI version.
const INCOMPATIBLE_VERSION: u64 = 1;

/// The delegated IPAM plugin of a configuration.
pub struct Ipam<'a> {
    pub plugin: &'a str,
    path: PathBuf,
    conf: &'a NetConf,
}

impl<'a> Ipam<'a> {
    /// The plugin named in `ipam.type`, found in `cni_path`; `None` without `ipam.type`.
    pub fn of(conf: &'a NetConf, cni_path: Option<&OsString>) -> Result<Option<Self>, Error> {
        let Some(plugin) = conf.ipam_type.as_deref() else {
            return Ok(None);
        };
        let cni_path = cni_path
            .filter(|p| !p.is_empty())
            .ok_or_else(|| Error::NoCniPath {
                plugin: plugin.to_owned(),
            })?;
        let path = std::env::split_paths(cni_path)
            .filter(|dir| !dir.as_os_str().is_empty())
            .map(|dir| dir.join(plugin))
            .find(|p| p.is_file())
            .ok_or_else(|| Error::DelegateNotFound {
                plugin: plugin.to_owned(),
                cni_path: cni_path.to_string_lossy().into_owned(),
            })?;
        Ok(Some(Self { plugin, path, conf }))
    }

    /// ADD: the plugin's result.
    pub fn add(&self) -> Result<Value, Error> {
        self.call("ADD")?
            .ok_or_else(|| self.bad_result("ADD", "it printed no result"))
    }

    pub fn del(&self) -> Result<(), Error> {
        self.call("DEL").map(drop)
    }

    pub fn check(&self) -> Result<(), Error> {
        self.call("CHECK").map(drop)
    }

    /// STATUS, if the plugin knows it (it speaks 1.1.0); `Ok(false)` if it does not.
    pub fn status(&self) -> Result<bool, Error> {
        self.call_if_known("STATUS")
    }

    /// GC with this configuration's valid attachments, if the plugin knows it.
    pub fn gc(&self) -> Result<bool, Error> {
        self.call_if_known("GC")
    }

    /// DEL for an attachment other than this invocation's (GC of a plugin without GC).
    pub fn del_attachment(&self, container_id: &str, ifname: &str) -> Result<(), Error> {
        let stdin = self.stdin(self.conf.cni_version, true);
        let env = [
            ("CNI_CONTAINERID", container_id),
            ("CNI_IFNAME", ifname),
            ("CNI_NETNS", ""),
        ];
        match self.exec("DEL", &stdin, &env)? {
            Reply::Err { code, msg } if code == INCOMPATIBLE_VERSION => {
                let version = self.common_version("DEL", &msg)?;
                let stdin = self.stdin(version, true);
                self.exec("DEL", &stdin, &env)?.into_result(self, "DEL")
            }
            r => r.into_result(self, "DEL"),
        }
        .map(drop)
    }

    fn call_if_known(&self, command: &'static str) -> Result<bool, Error> {
        let versions = self.versions(command)?;
        if !versions.contains(&CniVersion::V1_1_0.as_str().to_owned()) {
            return Ok(false);
        }
        self.call(command)?;
        Ok(true)
    }

    /// Runs `command`; on "incompatible version", again in the newest common version.
    fn call(&self, command: &'static str) -> Result<Option<Value>, Error> {
        let stdin = self.stdin(self.conf.cni_version, false);
        match self.exec(command, &stdin, &[])? {
            Reply::Err { code, msg } if code == INCOMPATIBLE_VERSION => {
                let version = self.common_version(command, &msg)?;
                let stdin = self.stdin(version, false);
                self.exec(command, &stdin, &[])?.into_result(self, command)
            }
            r => r.into_result(self, command),
        }
    }

    /// The configuration for the plugin, in `version`.
    fn stdin(&self, version: CniVersion, no_prev_result: bool) -> Vec<u8> {
        let mut conf: Map<String, Value> = self.conf.raw.clone();
        json::remove_all(&mut conf, "cniVersion");
        conf.insert("cniVersion".into(), Value::from(version.as_str()));
        if no_prev_result {
            json::remove_all(&mut conf, "prevResult");
        }
        serde_json::to_vec(&conf).expect("a map of JSON values serializes")
    }

    /// The newest version both this plugin and the delegated one speak, not newer than the
    /// configuration's.
    fn common_version(&self, command: &'static str, refusal: &str) -> Result<CniVersion, Error> {
        let theirs = self.versions(command)?;
        CniVersion::ALL
            .into_iter()
            .rev()
            .filter(|v| *v < self.conf.cni_version)
            .find(|v| theirs.iter().any(|t| t == v.as_str()))
            .ok_or_else(|| Error::Delegated {
                plugin: self.plugin.to_owned(),
                command,
                code: INCOMPATIBLE_VERSION as u32,
                msg: format!("{refusal} (it speaks {})", theirs.join(", ")),
            })
    }

    /// The plugin's `supportedVersions`.
    fn versions(&self, command: &'static str) -> Result<Vec<String>, Error> {
        let stdin = format!(r#"{{"cniVersion":"{}"}}"#, self.conf.cni_version);
        let reply = self
            .exec("VERSION", stdin.as_bytes(), &[])?
            .into_result(self, "VERSION")?
            .unwrap_or_default();
        let versions = reply
            .get("supportedVersions")
            .and_then(Value::as_array)
            .ok_or_else(|| self.bad_result(command, "its VERSION has no supportedVersions"))?;
        Ok(versions
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect())
    }

    fn exec(&self, command: &str, stdin: &[u8], env: &[(&str, &str)]) -> Result<Reply, Error> {
        let spawn_error = |source| Error::DelegateExec {
            plugin: self.path.clone(),
            source,
        };
        let mut child = Command::new(&self.path)
            .env("CNI_COMMAND", command)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        // A plugin may exit without reading all of stdin; its reply says why.
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin);
        }
        let out = child.wait_with_output().map_err(spawn_error)?;
        let reply: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        if out.status.success() {
            return Ok(Reply::Ok(reply));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Ok(match reply {
            Some(err) if err.get("code").is_some_and(Value::is_u64) => {
                let code = err["code"].as_u64().unwrap_or_default();
                let mut msg = err["msg"].as_str().unwrap_or_default().to_owned();
                if let Some(details) = err["details"].as_str().filter(|d| !d.is_empty()) {
                    msg = format!("{msg}: {details}");
                }
                Reply::Err { code, msg }
            }
            _ => Reply::Failed(format!(
                "it exited with {} and no CNI error on stdout: {}",
                out.status,
                stderr.trim()
            )),
        })
    }

    fn bad_result(&self, command: &'static str, problem: &str) -> Error {
        Error::DelegateBadResult {
            plugin: self.plugin.to_owned(),
            command,
            problem: problem.to_owned(),
        }
    }
}

/// What a delegated plugin answered.
enum Reply {
    /// Success, with the JSON it printed (none for DEL, CHECK, ...).
    Ok(Option<Value>),
    /// A CNI error.
    Err { code: u64, msg: String },
    /// A failure without a CNI error.
    Failed(String),
}

impl Reply {
    fn into_result(self, ipam: &Ipam<'_>, command: &'static str) -> Result<Option<Value>, Error> {
        match self {
            Reply::Ok(v) => Ok(v),
            Reply::Err { code, msg } => Err(Error::Delegated {
                plugin: ipam.plugin.to_owned(),
                command,
                code: u32::try_from(code).unwrap_or(u32::MAX),
                msg,
            }),
            Reply::Failed(problem) => Err(Error::DelegateFailed {
                plugin: ipam.plugin.to_owned(),
                command,
                problem,
            }),
        }
    }
}

/// What this plugin takes from an IPAM result: its IPv4 and IPv6 addresses (at most one
/// of each) and the DNS.
#[derive(Clone, Debug, PartialEq)]
pub struct IpamResult {
    pub address: Option<std::net::Ipv4Addr>,
    pub address6: Option<std::net::Ipv6Addr>,
    pub dns: Option<Value>,
}

/// Reads an IPAM plugin's ADD result, its keys matched as Go matches them. An address
/// that does not parse, two of one family (a pod gets one per family: the others would be
/// dropped) or none at all are refused, naming them.
pub fn ipam_result(v: &Value) -> Result<IpamResult, String> {
    let get = |v: &Value, key: &str| -> Result<Option<Value>, String> {
        json::get(v, key)
            .map(|found| found.cloned())
            .map_err(|e| format!("its result's {key} {e}"))
    };
    let Some(Value::Array(ips)) = get(v, "ips")? else {
        return Err("its result has no \"ips\" list".into());
    };
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ip in &ips {
        let text = get(ip, "address")?;
        let text = text.as_ref().and_then(Value::as_str).unwrap_or_default();
        match text.parse::<ipnet::IpNet>().map(|n| n.addr()) {
            Ok(std::net::IpAddr::V4(a)) => v4.push(a),
            Ok(std::net::IpAddr::V6(a)) => v6.push(a),
            Err(_) => {
                return Err(format!(
                    "its result has an address that is not an IP address with a prefix \
                     length: {ip}"
                ));
            }
        }
    }
    for (family, list) in [
        (
            "IPv4",
            v4.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ),
        ("IPv6", v6.iter().map(ToString::to_string).collect()),
    ] {
        if list.len() > 1 {
            return Err(format!(
                "its result has more than one {family} address ({}); a pod gets one per family",
                list.join(", ")
            ));
        }
    }
    if v4.is_empty() && v6.is_empty() {
        return Err(format!(
            "its result has no address: {}",
            Value::from(ips.clone())
        ));
    }
    let dns = get(v, "dns")?.filter(|d| d.as_object().is_some_and(|o| !o.is_empty()));
    Ok(IpamResult {
        address: v4.first().copied(),
        address6: v6.first().copied(),
        dns,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::config;

    fn conf(ipam: &str) -> NetConf {
        config::parse(
            json!({"cniVersion": "1.1.0", "name": "n", "ipam": {"type": ipam}, "x": 1})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
    }

    /// A fake IPAM plugin: a shell script that speaks 1.0.0 only, like Debian's.
    fn fake_plugin(dir: &Path) {
        let script = r#"#!/bin/sh
conf=$(cat)
case "$conf" in
  *'"cniVersion":"1.1.0"'*) if [ "$CNI_COMMAND" != VERSION ]; then
      echo '{"cniVersion":"1.1.0","code":1,"msg":"incompatible CNI versions"}'; exit 1; fi ;;
esac
case "$CNI_COMMAND" in
  VERSION) echo '{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}' ;;
  ADD) echo '{"cniVersion":"1.0.0","ips":[{"address":"10.9.0.7/24","gateway":"10.9.0.1"}],"dns":{"nameservers":["10.9.0.53"]}}' ;;
  DEL) [ "$CNI_CONTAINERID" = bad ] && { echo '{"code":7,"msg":"nope"}'; exit 1; }; exit 0 ;;
  *) exit 3 ;;
esac
"#;
        let path = dir.join("fake-ipam");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn found_in_cni_path_or_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        fake_plugin(dir.path());
        let c = conf("fake-ipam");
        let path = OsString::from(format!("/nonexistent:{}", dir.path().display()));
        assert!(Ipam::of(&c, Some(&path)).unwrap().is_some());
        let e = Ipam::of(&c, None).err().unwrap();
        assert!(e.to_string().contains("CNI_PATH"), "{e}");
        let e = Ipam::of(&conf("absent"), Some(&path)).err().unwrap();
        assert!(
            e.to_string().contains("ipam.type") && e.to_string().contains("absent"),
            "{e}"
        );
    }

    #[test]
    fn an_older_plugin_is_called_in_a_version_it_speaks() {
        let dir = tempfile::tempdir().unwrap();
        fake_plugin(dir.path());
        let c = conf("fake-ipam");
        let path = OsString::from(dir.path());
        let ipam = Ipam::of(&c, Some(&path)).unwrap().unwrap();
        let result = ipam.add().unwrap();
        assert_eq!(
            ipam_result(&result).unwrap(),
            IpamResult {
                address: Some("10.9.0.7".parse().unwrap()),
                address6: None,
                dns: Some(json!({"nameservers": ["10.9.0.53"]})),
            }
        );
        ipam.del().unwrap();
        // It does not speak 1.1.0, so it has no STATUS or GC to forward.
        assert!(!ipam.status().unwrap());
        assert!(!ipam.gc().unwrap());
        let e = ipam.del_attachment("bad", "eth0").unwrap_err();
        assert!(
            matches!(&e, Error::Delegated { code: 7, msg, .. } if msg == "nope"),
            "{e:?}"
        );
        // A failure without a CNI error says how it exited.
        let e = ipam.check().unwrap_err();
        assert!(e.to_string().contains("exit status: 3"), "{e}");
    }

    #[test]
    fn ipam_results_of_any_version_with_one_address_per_family() {
        let r = ipam_result(&json!({"ips": [
            {"version": "6", "address": "fd00::2/64"},
            {"version": "4", "address": "10.1.2.3/16", "gateway": "10.1.0.1"}
        ]}))
        .unwrap();
        assert_eq!(r.address, Some("10.1.2.3".parse().unwrap()));
        assert_eq!(r.address6, Some("fd00::2".parse().unwrap()));
        assert_eq!(r.dns, None);
        let r = ipam_result(&json!({"ips": [{"address": "fd00::2/64"}]})).unwrap();
        assert_eq!(
            (r.address, r.address6),
            (None, Some("fd00::2".parse().unwrap()))
        );
        assert!(ipam_result(&json!({})).is_err());
        let e = ipam_result(&json!({"ips": []})).unwrap_err();
        assert!(e.contains("no address"), "{e}");
    }

    #[test]
    fn ipam_results_with_two_of_a_family_or_a_malformed_address_are_refused() {
        let e = ipam_result(&json!({"ips": [
            {"address": "fd00::2/64"}, {"address": "10.0.0.2/24"}, {"address": "fd00::3/64"}
        ]}))
        .unwrap_err();
        assert!(
            e.contains("more than one IPv6 address (fd00::2, fd00::3)"),
            "{e}"
        );
        let e =
            ipam_result(&json!({"ips": [{"address": "10.0.0.2/24"}, {"address": "10.0.0.3/24"}]}))
                .unwrap_err();
        assert!(e.contains("more than one IPv4 address"), "{e}");
        let e = ipam_result(&json!({"ips": [{"address": "fd00::zz/64"}]})).unwrap_err();
        assert!(e.contains("fd00::zz"), "{e}");
        let e = ipam_result(&json!({"ips": [{"address": "10.0.0.2"}]})).unwrap_err();
        assert!(e.contains("prefix length"), "{e}");
    }
}
