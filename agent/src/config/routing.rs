//! How pods reach other nodes' pods in cluster mode (`--routing`, `--tunnel-device`,
//! `--tunnel-port`, `--tunnel-mtu`): parsed and checked before the agent starts.

use serde::Deserialize;

/// The VXLAN device's name by default (`--tunnel-device`).
pub const DEFAULT_TUNNEL_DEVICE: &str = "hypha_vxlan";
/// The smallest MTU of a node whose pods have IPv6 (RFC 8200 §5).
pub const MIN_MTU6: u32 = 1280;
/// The smallest MTU of an IPv4-only node (RFC 791's datagram every host accepts).
pub const MIN_MTU4: u32 = 576;
/// The largest MTU (an IP packet's length field).
pub const MAX_MTU: u32 = 65_535;

/// `--routing`: how another node's pods are reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingMode {
    /// A VXLAN overlay, the sender's identity in the VNI (the default).
    #[default]
    Tunnel,
    /// The underlay routes pod CIDRs; no encapsulation.
    Native,
}

impl RoutingMode {
    /// `tunnel` or `native`, as the flag, the file and the status spell it.
    pub fn name(self) -> &'static str {
        match self {
            RoutingMode::Tunnel => "tunnel",
            RoutingMode::Native => "native",
        }
    }
}

impl std::fmt::Display for RoutingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RoutingMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tunnel" => Ok(RoutingMode::Tunnel),
            "native" => Ok(RoutingMode::Native),
            _ => Err(format!("routing {s:?} is neither tunnel nor native")),
        }
    }
}

/// Cluster mode's routing, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Routing {
    /// One VXLAN device in collect-metadata mode.
    Tunnel {
        device: String,
        port: u16,
        /// The device's (and the pods') MTU; `None`: the underlay's less the overhead.
        mtu: Option<u32>,
    },
    Native,
}

impl Default for Routing {
    fn default() -> Self {
        Routing::Tunnel {
            device: DEFAULT_TUNNEL_DEVICE.to_owned(),
            port: hypha_common::DEFAULT_TUNNEL_PORT,
            mtu: None,
        }
    }
}

impl Routing {
    pub fn mode(&self) -> RoutingMode {
        match self {
            Routing::Tunnel { .. } => RoutingMode::Tunnel,
            Routing::Native => RoutingMode::Native,
        }
    }

    /// The routing the keys give: `mode` (tunnel by default) and the tunnel's keys, which
    /// native routing refuses by name. `ipv6`: the pods have IPv6 (the MTU's floor).
    pub fn resolve(
        mode: Option<RoutingMode>,
        device: Option<String>,
        port: Option<u16>,
        mtu: Option<u32>,
        ipv6: bool,
    ) -> Result<Routing, String> {
        match mode.unwrap_or_default() {
            RoutingMode::Native => {
                let set: Vec<&str> = [
                    ("tunnel-device", device.is_some()),
                    ("tunnel-port", port.is_some()),
                    ("tunnel-mtu", mtu.is_some()),
                ]
                .into_iter()
                .filter_map(|(k, set)| set.then_some(k))
                .collect();
                if !set.is_empty() {
                    return Err(format!(
                        "{} {} only with routing tunnel, not with routing native (--routing native has no tunnel)",
                        set.join(", "),
                        if set.len() == 1 { "applies" } else { "apply" },
                    ));
                }
                Ok(Routing::Native)
            }
            RoutingMode::Tunnel => {
                let device = device.unwrap_or_else(|| DEFAULT_TUNNEL_DEVICE.to_owned());
                check_device_name(&device)?;
                let port = port.unwrap_or(hypha_common::DEFAULT_TUNNEL_PORT);
                if port == 0 {
                    return Err(
                        "tunnel-port 0 is not a UDP port: give 1 to 65535 (8472 by default, 4789 is IANA's)"
                            .into(),
                    );
                }
                if let Some(m) = mtu {
                    check_mtu(m, ipv6)?;
                }
                Ok(Routing::Tunnel { device, port, mtu })
            }
        }
    }
}

/// An interface name the kernel accepts: 1 to 15 bytes (IFNAMSIZ less its NUL), no '/',
/// ':' or white space, not `.` or `..`.
pub fn check_device_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("tunnel-device {name:?} {why}"));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > 15 {
        return bad("is longer than 15 bytes (the kernel's limit of interface names)");
    }
    if name == "." || name == ".." {
        return bad("is not a valid interface name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return bad("may not hold '/', ':' or white space");
    }
    Ok(())
}

/// An MTU a pod's interface can have: at least 1280 when the pods have IPv6 (576
/// otherwise), at most 65535.
pub fn check_mtu(mtu: u32, ipv6: bool) -> Result<(), String> {
    let floor = if ipv6 { MIN_MTU6 } else { MIN_MTU4 };
    if mtu < floor {
        return Err(if ipv6 {
            format!(
                "tunnel-mtu {mtu} is below {MIN_MTU6}, the smallest MTU IPv6 allows (the pods have IPv6)"
            )
        } else {
            format!(
                "tunnel-mtu {mtu} is below {MIN_MTU4}, the smallest IPv4 datagram every host accepts"
            )
        });
    }
    if mtu > MAX_MTU {
        return Err(format!(
            "tunnel-mtu {mtu} is above {MAX_MTU}, the largest IP packet"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigFile;

    fn cluster_flags() -> ConfigFile {
        ConfigFile {
            cluster_store: Some("etcd=http://192.0.2.10:2379".parse().unwrap()),
            node_name: Some("node-a".into()),
            node_ip: Some("192.0.2.1".parse().unwrap()),
            ..Default::default()
        }
    }

    fn refused(f: ConfigFile) -> String {
        f.resolve().unwrap_err().to_string()
    }

    fn routing(f: ConfigFile) -> Routing {
        f.resolve().unwrap().cluster.unwrap().routing
    }

    #[test]
    fn tunnel_is_the_default_with_its_defaults() {
        assert_eq!(
            routing(cluster_flags()),
            Routing::Tunnel {
                device: "hypha_vxlan".into(),
                port: 8472,
                mtu: None,
            }
        );
    }

    #[test]
    fn flags_and_file_keys_set_it() {
        let file = ConfigFile::parse(
            "cluster-store: etcd=http://10.0.0.1:2379\nnode-name: a\nnode-ip: 10.0.0.5\n\
             routing: tunnel\ntunnel-device: vx0\ntunnel-port: 4789\ntunnel-mtu: 1400\n",
        )
        .unwrap();
        assert_eq!(
            routing(file),
            Routing::Tunnel {
                device: "vx0".into(),
                port: 4789,
                mtu: Some(1400),
            }
        );
        // A flag wins over the file.
        let file = ConfigFile::parse(
            "cluster-store: etcd=http://10.0.0.1:2379\nnode-name: a\nnode-ip: 10.0.0.5\ntunnel-port: 4789\n",
        )
        .unwrap();
        let flags = ConfigFile {
            tunnel_port: Some(5555),
            ..Default::default()
        };
        assert!(matches!(
            routing(file.merge(flags)),
            Routing::Tunnel { port: 5555, .. }
        ));
        let native = ConfigFile {
            routing: Some("native".parse().unwrap()),
            ..cluster_flags()
        };
        assert_eq!(routing(native), Routing::Native);
        let err = ConfigFile::parse("routing: bgp\n").unwrap_err().to_string();
        assert!(err.contains("bgp"), "{err}");
        let err = "bgp".parse::<RoutingMode>().unwrap_err();
        assert!(err.contains("\"bgp\"") && err.contains("native"), "{err}");
    }

    #[test]
    fn routing_keys_need_cluster_store() {
        let err = refused(ConfigFile {
            routing: Some(RoutingMode::Native),
            ..Default::default()
        });
        assert!(
            err.contains("routing applies only in cluster mode") && err.contains("--cluster-store"),
            "{err}"
        );
        let err = refused(ConfigFile {
            tunnel_device: Some("vx0".into()),
            tunnel_mtu: Some(1400),
            ..Default::default()
        });
        assert!(
            err.contains("tunnel-device, tunnel-mtu apply only in cluster mode"),
            "{err}"
        );
    }

    #[test]
    fn tunnel_keys_are_refused_with_native_routing() {
        let err = refused(ConfigFile {
            routing: Some(RoutingMode::Native),
            tunnel_port: Some(4789),
            ..cluster_flags()
        });
        assert!(
            err.contains("tunnel-port applies only with routing tunnel") && err.contains("native"),
            "{err}"
        );
        let err = refused(ConfigFile {
            routing: Some(RoutingMode::Native),
            tunnel_device: Some("vx0".into()),
            tunnel_mtu: Some(1400),
            ..cluster_flags()
        });
        assert!(err.contains("tunnel-device, tunnel-mtu apply"), "{err}");
    }

    #[test]
    fn bad_tunnel_values_are_named() {
        for (name, why) in [
            ("", "empty"),
            ("a-name-far-too-long", "15 bytes"),
            ("vx/0", "'/'"),
            ("vx 0", "white space"),
            ("vx:0", "':'"),
            ("..", "not a valid"),
        ] {
            let err = refused(ConfigFile {
                tunnel_device: Some(name.into()),
                ..cluster_flags()
            });
            assert!(
                err.contains(&format!("tunnel-device {name:?}")) && err.contains(why),
                "{name}: {err}"
            );
        }
        let err = refused(ConfigFile {
            tunnel_port: Some(0),
            ..cluster_flags()
        });
        assert!(err.contains("tunnel-port 0"), "{err}");
        // The default cluster CIDRs are dual stack: IPv6's floor.
        let err = refused(ConfigFile {
            tunnel_mtu: Some(1279),
            ..cluster_flags()
        });
        assert!(
            err.contains("tunnel-mtu 1279") && err.contains("1280"),
            "{err}"
        );
        let err = refused(ConfigFile {
            tunnel_mtu: Some(65_536),
            ..cluster_flags()
        });
        assert!(
            err.contains("tunnel-mtu 65536") && err.contains("65535"),
            "{err}"
        );
        // IPv4 only: 576 is the floor.
        let v4_only = || ConfigFile {
            cluster_cidr: Some("10.8.0.0/16".parse().unwrap()),
            ..cluster_flags()
        };
        let err = refused(ConfigFile {
            tunnel_mtu: Some(575),
            ..v4_only()
        });
        assert!(
            err.contains("tunnel-mtu 575") && err.contains("576"),
            "{err}"
        );
        assert!(matches!(
            routing(ConfigFile {
                tunnel_mtu: Some(576),
                ..v4_only()
            }),
            Routing::Tunnel { mtu: Some(576), .. }
        ));
        let err = ConfigFile::parse("tunnel-port: 70000\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("70000"), "{err}");
    }
}
