//! The agent's configuration: defaults, an optional YAML file, then command-line flags.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;

/// Errors in the agent's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file cannot be read.
    #[error("cannot read the agent configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid YAML for the agent's settings.
    #[error("invalid agent configuration {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A value is well-formed but unusable.
    #[error("invalid agent configuration: {0}")]
    Invalid(String),
}

/// Every setting of the agent. Each path can be set so that several agents (tests,
/// benchmarks) run side by side on one machine without sharing anything.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    /// The API's unix socket.
    pub socket: PathBuf,
    /// Where the agent keeps its state (endpoints, address reservations).
    pub state_dir: PathBuf,
    /// Where maps and program links are pinned; must be on a bpf filesystem.
    pub pin_dir: PathBuf,
    /// This node's pod CIDR: pods get addresses from it.
    pub pod_cidr: Ipv4Net,
    /// The pods' gateway; defaults to the first address of the pod CIDR.
    pub gateway: Option<Ipv4Addr>,
    /// The host device that carries the gateway address (a /32). Loopback by default; a
    /// name that does not exist is created as a dummy device.
    pub host_device: String,
    /// Masquerade traffic from pods to destinations outside the pod CIDR.
    pub masquerade: bool,
    /// Directory of policy files the agent applies and watches (`*.yaml`, `*.yml`,
    /// `*.json`); a directory that does not exist holds no policies.
    pub policy_dir: PathBuf,
    /// Where to serve Prometheus metrics (`GET /metrics`); off when unset.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How the programs are attached to each endpoint's veth.
    pub attach: AttachMode,
}

/// How the eBPF programs are attached to an endpoint's host veth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// Legacy tc: a `clsact` qdisc with two direct-action `cls_bpf` filters. ~0.3 ms per
    /// endpoint, but `clsact` takes the veth's one ingress-qdisc slot (handle `ffff:`),
    /// so a chained plugin that adds an `ingress` qdisc (the reference `bandwidth`) fails.
    #[default]
    Tc,
    /// TCX links (kernel 6.6+): leaves the qdiscs alone, but each attach waits out an RCU
    /// grace period and attaches do not overlap (~23 ms per endpoint here).
    Tcx,
}

impl AttachMode {
    /// `tc` or `tcx`, as the flag and the configuration file spell it.
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Tc => "tc",
            AttachMode::Tcx => "tcx",
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AttachMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tc" => Ok(AttachMode::Tc),
            "tcx" => Ok(AttachMode::Tcx),
            _ => Err(format!("attach mode {s:?} is neither tc nor tcx")),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(hypha_api::DEFAULT_SOCKET),
            state_dir: PathBuf::from("/var/lib/hypha"),
            pin_dir: PathBuf::from("/sys/fs/bpf/hypha"),
            pod_cidr: "10.244.0.0/24".parse().expect("valid default"),
            gateway: None,
            host_device: "lo".to_owned(),
            masquerade: true,
            policy_dir: PathBuf::from("/etc/hypha/policies"),
            metrics_addr: None,
            attach: AttachMode::Tc,
        }
    }
}

/// The settings as a file may give them: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub pod_cidr: Option<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    pub host_device: Option<String>,
    pub masquerade: Option<bool>,
    pub policy_dir: Option<PathBuf>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub attach: Option<AttachMode>,
}

impl ConfigFile {
    /// Reads a YAML file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Parses YAML text; an empty file is an empty configuration.
    pub fn parse(text: &str) -> Result<Self, serde_yaml_ng::Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml_ng::from_str(text)
    }

    /// Lays `over` on top of `self`: what `over` sets wins.
    pub fn merge(self, over: ConfigFile) -> ConfigFile {
        ConfigFile {
            socket: over.socket.or(self.socket),
            state_dir: over.state_dir.or(self.state_dir),
            pin_dir: over.pin_dir.or(self.pin_dir),
            pod_cidr: over.pod_cidr.or(self.pod_cidr),
            gateway: over.gateway.or(self.gateway),
            host_device: over.host_device.or(self.host_device),
            masquerade: over.masquerade.or(self.masquerade),
            policy_dir: over.policy_dir.or(self.policy_dir),
            metrics_addr: over.metrics_addr.or(self.metrics_addr),
            attach: over.attach.or(self.attach),
        }
    }

    /// Fills what is unset with the defaults and checks the result.
    pub fn resolve(self) -> Result<AgentConfig, ConfigError> {
        let d = AgentConfig::default();
        let config = AgentConfig {
            socket: self.socket.unwrap_or(d.socket),
            state_dir: self.state_dir.unwrap_or(d.state_dir),
            pin_dir: self.pin_dir.unwrap_or(d.pin_dir),
            pod_cidr: self.pod_cidr.unwrap_or(d.pod_cidr),
            gateway: self.gateway,
            host_device: self.host_device.unwrap_or(d.host_device),
            masquerade: self.masquerade.unwrap_or(d.masquerade),
            policy_dir: self.policy_dir.unwrap_or(d.policy_dir),
            metrics_addr: self.metrics_addr,
            attach: self.attach.unwrap_or(d.attach),
        };
        config.validate()?;
        Ok(config)
    }
}

impl AgentConfig {
    /// The gateway address pods route through.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
            .unwrap_or_else(|| first_host(self.pod_cidr).unwrap_or(self.pod_cidr.network()))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let cidr = self.pod_cidr;
        if cidr.trunc() != cidr {
            return Err(ConfigError::Invalid(format!(
                "pod-cidr {cidr} has host bits set; did you mean {}?",
                cidr.trunc()
            )));
        }
        if cidr.prefix_len() > 30 {
            return Err(ConfigError::Invalid(format!(
                "pod-cidr {cidr} is too small: it needs room for a gateway and pods (at most /30)"
            )));
        }
        let gw = self.gateway();
        if !cidr.contains(&gw) || gw == cidr.network() || gw == cidr.broadcast() {
            return Err(ConfigError::Invalid(format!(
                "gateway {gw} must be a host address inside pod-cidr {cidr}"
            )));
        }
        if self.host_device.is_empty()
            || self.host_device.len() > 15
            || self
                .host_device
                .contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err(ConfigError::Invalid(format!(
                "host-device {:?} is not a valid interface name (1 to 15 characters, no '/', ':' or spaces)",
                self.host_device
            )));
        }
        for (name, path) in [
            ("socket", &self.socket),
            ("state-dir", &self.state_dir),
            ("pin-dir", &self.pin_dir),
            ("policy-dir", &self.policy_dir),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "{name} {} must be an absolute path",
                    path.display()
                )));
            }
        }
        Ok(())
    }
}

fn first_host(net: Ipv4Net) -> Option<Ipv4Addr> {
    net.hosts().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve() {
        let c = ConfigFile::default().resolve().unwrap();
        assert_eq!(c, AgentConfig::default());
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 244, 0, 1));
    }

    #[test]
    fn file_then_flags_override() {
        let file =
            ConfigFile::parse("pod-cidr: 10.9.0.0/16\nsocket: /tmp/a.sock\nmasquerade: false\n")
                .unwrap();
        let flags = ConfigFile {
            socket: Some("/tmp/b.sock".into()),
            ..Default::default()
        };
        let c = file.merge(flags).resolve().unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/b.sock"));
        assert_eq!(c.pod_cidr, "10.9.0.0/16".parse::<Ipv4Net>().unwrap());
        assert!(!c.masquerade);
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 9, 0, 1));
    }

    #[test]
    fn attach_mode_defaults_to_tc_and_is_set_by_file_or_flag() {
        assert_eq!(AgentConfig::default().attach, AttachMode::Tc);
        let file = ConfigFile::parse("attach: tcx\n").unwrap();
        assert_eq!(file.resolve().unwrap().attach, AttachMode::Tcx);
        let file = ConfigFile::parse("attach: tcx\n").unwrap();
        let flags = ConfigFile {
            attach: Some("tc".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(file.merge(flags).resolve().unwrap().attach, AttachMode::Tc);
        let err = "xdp".parse::<AttachMode>().unwrap_err();
        assert!(err.contains("xdp") && err.contains("tcx"), "{err}");
        let err = ConfigFile::parse("attach: tcz\n").unwrap_err().to_string();
        assert!(err.contains("tcz"), "{err}");
    }

    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(
            ConfigFile::parse("  \n").unwrap().resolve().unwrap(),
            AgentConfig::default()
        );
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = ConfigFile::parse("pod_cidr: 10.0.0.0/24\n").unwrap_err();
        assert!(err.to_string().contains("pod_cidr"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |f: ConfigFile| f.resolve().unwrap_err().to_string();
        let msg = bad(ConfigFile {
            pod_cidr: Some("10.0.0.5/24".parse().unwrap()),
            ..Default::default()
        });
        assert!(
            msg.contains("10.0.0.5/24") && msg.contains("10.0.0.0/24"),
            "{msg}"
        );
        let msg = bad(ConfigFile {
            pod_cidr: Some("10.0.0.0/31".parse().unwrap()),
            ..Default::default()
        });
        assert!(msg.contains("too small"), "{msg}");
        let msg = bad(ConfigFile {
            gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
            ..Default::default()
        });
        assert!(msg.contains("gateway 192.0.2.1"), "{msg}");
        let msg = bad(ConfigFile {
            host_device: Some("a-name-far-too-long".into()),
            ..Default::default()
        });
        assert!(msg.contains("host-device"), "{msg}");
        let msg = bad(ConfigFile {
            state_dir: Some("relative/dir".into()),
            ..Default::default()
        });
        assert!(msg.contains("state-dir relative/dir"), "{msg}");
    }
}
