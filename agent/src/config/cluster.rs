//! Cluster mode's settings as flags and the configuration file give them, each parsed
//! from text (`--node-ip 192.0.2.1,fd00::1`) or, in the file, from the same text or a
//! list (`node-ip: [192.0.2.1, "fd00::1"]`), and checked before the agent starts.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use super::{MAX_PREFIX4, MAX_PREFIX6, MIN_PREFIX6};

/// The default cluster CIDRs (`--cluster-cidr`).
pub const DEFAULT_CLUSTER_CIDR: &str = "10.244.0.0/16,fd00:10:244::/48";
/// The default size of each node's pod CIDR (`--node-cidr-size`), IPv4 then IPv6.
pub const DEFAULT_NODE_CIDR_SIZE4: u8 = 24;
pub const DEFAULT_NODE_CIDR_SIZE6: u8 = 64;
/// How long a cluster identity stays unused before it is deleted (`--identity-gc-grace`).
pub const DEFAULT_IDENTITY_GC_GRACE: Duration = Duration::from_secs(15 * 60);
/// The lease of a node's record (`--node-ttl`): heartbeats every third of it.
pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(15);

/// A value the file may give as one comma-separated string (or number) or as a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum TextOrList {
    One(Scalar),
    List(Vec<Scalar>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Number(u64),
}

impl Scalar {
    fn text(self) -> String {
        match self {
            Scalar::Text(s) => s,
            Scalar::Number(n) => n.to_string(),
        }
    }
}

impl TextOrList {
    fn joined(self) -> String {
        match self {
            TextOrList::One(s) => s.text(),
            TextOrList::List(l) => l
                .into_iter()
                .map(Scalar::text)
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// Implements `Deserialize` through `FromStr` (text, or a list joined with commas).
macro_rules! from_text_or_list {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                TextOrList::deserialize(d)?
                    .joined()
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}

/// `--cluster-store etcd=URL[,URL]`: the store's kind and its client URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterStore {
    pub urls: Vec<String>,
}

impl std::str::FromStr for ClusterStore {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some((kind, urls)) = s.split_once('=') else {
            return Err(format!(
                "cluster-store {s:?} names no store: write etcd=http://IP:2379[,http://IP2:2379]"
            ));
        };
        if kind.trim() != "etcd" {
            return Err(format!(
                "cluster-store {s:?}: store {:?} is not supported; the only one is etcd (etcd=http://IP:2379[,...])",
                kind.trim()
            ));
        }
        let urls: Vec<String> = urls
            .split(',')
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(format!(
                "cluster-store {s:?} lists no URL: write etcd=http://IP:2379[,http://IP2:2379]"
            ));
        }
        for url in &urls {
            check_url(url).map_err(|why| format!("cluster-store {s:?}: {url:?} {why}"))?;
        }
        Ok(ClusterStore { urls })
    }
}
from_text_or_list!(ClusterStore);

/// An etcd client URL: `http://` or `https://`, a host, a port, nothing after.
fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("is not an http:// or https:// URL")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') {
        return Err("has a path; give the scheme, host and port only".into());
    }
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or("has no port (etcd's client port is usually 2379)")?;
    if host.is_empty() || (host.starts_with('[') != host.ends_with(']')) {
        return Err("has no valid host".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(format!("has an invalid port {port:?}")),
    }
}

/// A node name: what `hypha node list` shows and the store's keys hold. DNS-subdomain
/// rules, as Kubernetes' node names: lowercase letters, digits, `-` and `.`, starting and
/// ending with a letter or digit, labels of 1 to 63 characters, at most 253 in all.
pub fn check_node_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("node-name {name:?} {why}"));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > 253 {
        return bad("is longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("has a dot-separated part that is empty or longer than 63 characters");
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return bad("may only hold lowercase letters, digits, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("has a part starting or ending with '-'");
        }
    }
    Ok(())
}

/// `--node-ip IP[,IPv6]`: the node's underlay addresses, at most one per family, IPv4
/// first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIps(pub Vec<IpAddr>);

impl std::str::FromStr for NodeIps {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (mut v4, mut v6) = (None, None);
        for part in s.split(',').map(str::trim) {
            let ip: IpAddr = part
                .parse()
                .map_err(|_| format!("node-ip {s:?}: {part:?} is not an IP address"))?;
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(format!(
                    "node-ip {s:?}: {ip} is not a unicast address of this node"
                ));
            }
            let slot = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
            if let Some(first) = slot.replace(ip) {
                return Err(format!(
                    "node-ip {s:?} lists two addresses of one family ({first} and {ip}); give at most one IPv4 and one IPv6"
                ));
            }
        }
        Ok(NodeIps(v4.into_iter().chain(v6).collect()))
    }
}
from_text_or_list!(NodeIps);

/// `--cluster-cidr LIST`: the CIDRs every node's pod CIDR comes from, at most one per
/// family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterCidrs {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

impl std::str::FromStr for ClusterCidrs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = ClusterCidrs { v4: None, v6: None };
        for part in s.split(',').map(str::trim) {
            let net: IpNet = part
                .parse()
                .map_err(|_| format!("cluster-cidr {s:?}: {part:?} is not an IPv4 or IPv6 CIDR"))?;
            if net.trunc() != net {
                return Err(format!(
                    "cluster-cidr {net} has host bits set; did you mean {}?",
                    net.trunc()
                ));
            }
            let twice = match net {
                IpNet::V4(n) => out.v4.replace(n).is_some(),
                IpNet::V6(n) => out.v6.replace(n).is_some(),
            };
            if twice {
                return Err(format!(
                    "cluster-cidr {s:?} lists two CIDRs of one family; give at most one per family"
                ));
            }
        }
        Ok(out)
    }
}
from_text_or_list!(ClusterCidrs);

/// `--node-cidr-size LIST`: the prefix length of each node's pod CIDR, one per cluster
/// CIDR, IPv4 first (`24,64`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCidrSizes(pub Vec<u8>);

impl std::str::FromStr for NodeCidrSizes {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(|part| {
                let part = part.trim();
                let part = part.strip_prefix('/').unwrap_or(part);
                part.parse::<u8>()
                    .ok()
                    .filter(|n| *n <= 128)
                    .ok_or_else(|| format!("node-cidr-size {s:?}: {part:?} is not a prefix length"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(NodeCidrSizes)
    }
}
from_text_or_list!(NodeCidrSizes);

/// A duration as `500ms`, `30s`, `15m` or `2h` (`--identity-gc-grace`, `--node-ttl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span(pub Duration);

impl std::str::FromStr for Span {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let n: u64 = number.parse().map_err(|_| {
            format!("duration {s:?} is not a number with a unit (500ms, 30s, 15m, 2h)")
        })?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => {
                return Err(format!(
                    "duration {s:?} has no known unit (ms, s, m or h: 500ms, 30s, 15m, 2h)"
                ));
            }
        };
        if d.is_zero() {
            return Err(format!("duration {s:?} must be longer than zero"));
        }
        Ok(Span(d))
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The cluster CIDR plan from the cluster CIDRs and the node CIDR sizes (one per
/// family the cluster CIDRs have, IPv4 first; the defaults per family when unset).
pub fn cidr_plan(
    cidrs: ClusterCidrs,
    sizes: Option<&NodeCidrSizes>,
) -> Result<hypha_cluster::node::CidrPlan, String> {
    let families = usize::from(cidrs.v4.is_some()) + usize::from(cidrs.v6.is_some());
    if families == 0 {
        return Err("cluster-cidr is empty: give an IPv4 CIDR, an IPv6 CIDR or both".into());
    }
    let sizes: Vec<u8> = match sizes {
        Some(NodeCidrSizes(list)) => {
            if list.len() != families {
                return Err(format!(
                    "node-cidr-size {} gives {} sizes for {families} cluster CIDR(s); give one per cluster CIDR, IPv4 first",
                    list.iter().map(u8::to_string).collect::<Vec<_>>().join(","),
                    list.len()
                ));
            }
            list.clone()
        }
        None => cidrs
            .v4
            .map(|_| DEFAULT_NODE_CIDR_SIZE4)
            .into_iter()
            .chain(cidrs.v6.map(|_| DEFAULT_NODE_CIDR_SIZE6))
            .collect(),
    };
    let mut sizes = sizes.into_iter();
    let mut plan = hypha_cluster::node::CidrPlan::default();
    if let Some(net) = cidrs.v4 {
        let size = sizes.next().expect("one size per family");
        if size <= net.prefix_len() || size > MAX_PREFIX4 {
            return Err(format!(
                "node-cidr-size /{size} does not fit cluster-cidr {net}: an IPv4 node CIDR is longer than the cluster's /{} and at most a /{MAX_PREFIX4}",
                net.prefix_len()
            ));
        }
        plan.v4 = Some((net, size));
    }
    if let Some(net) = cidrs.v6 {
        let size = sizes.next().expect("one size per family");
        if size <= net.prefix_len() || !(MIN_PREFIX6..=MAX_PREFIX6).contains(&size) {
            return Err(format!(
                "node-cidr-size /{size} does not fit cluster-cidr {net}: an IPv6 node CIDR is longer than the cluster's /{} and a /{MIN_PREFIX6} to a /{MAX_PREFIX6}",
                net.prefix_len()
            ));
        }
        plan.v6 = Some((net, size));
    }
    Ok(plan)
}

/// A key prefix: absolute, no empty or dot segment, ending with `/`.
pub fn check_prefix(prefix: &str) -> Result<String, String> {
    if !prefix.starts_with('/') || prefix.len() < 2 {
        return Err(format!(
            "cluster-prefix {prefix:?} must be an absolute key prefix such as /hypha/v1/"
        ));
    }
    let trimmed = prefix.trim_end_matches('/');
    if trimmed[1..]
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == ".." || seg.contains(char::is_whitespace))
    {
        return Err(format!(
            "cluster-prefix {prefix:?} has an empty, dot or blank segment"
        ));
    }
    Ok(format!("{trimmed}/"))
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

    #[test]
    fn no_cluster_store_is_a_single_node() {
        assert_eq!(ConfigFile::default().resolve().unwrap().cluster, None);
    }

    #[test]
    fn cluster_defaults_resolve() {
        let c = cluster_flags().resolve().unwrap();
        let cl = c.cluster.clone().unwrap();
        assert_eq!(cl.store, vec!["http://192.0.2.10:2379".to_owned()]);
        assert_eq!(cl.node_name, "node-a");
        assert_eq!(cl.node_ips, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            cl.cidrs.v4,
            Some(("10.244.0.0/16".parse().unwrap(), DEFAULT_NODE_CIDR_SIZE4))
        );
        assert_eq!(
            cl.cidrs.v6,
            Some(("fd00:10:244::/48".parse().unwrap(), DEFAULT_NODE_CIDR_SIZE6))
        );
        assert_eq!(cl.prefix, "/hypha/v1/");
        assert_eq!(cl.identity_gc_grace, DEFAULT_IDENTITY_GC_GRACE);
        assert_eq!(cl.node_ttl, DEFAULT_NODE_TTL);
        // Until registration, the pod CIDRs are the first share of each cluster CIDR.
        assert_eq!(c.pod_cidrs.to_string(), "10.244.0.0/24,fd00:10:244::/64");
    }

    #[test]
    fn file_keys_and_flags() {
        let file = ConfigFile::parse(
            "cluster-store: etcd=https://10.0.0.1:2379,https://10.0.0.2:2379\n\
             node-name: n1.example\n\
             node-ip: [10.0.0.5, \"fd00::5\"]\n\
             etcd-ca: /etc/hypha/ca.pem\n\
             etcd-cert: /etc/hypha/c.pem\n\
             etcd-key: /etc/hypha/c.key\n\
             cluster-cidr: [10.8.0.0/14]\n\
             node-cidr-size: 26\n\
             cluster-prefix: /t/v1\n\
             identity-gc-grace: 30s\n\
             node-ttl: 3s\n",
        )
        .unwrap();
        let c = file.resolve().unwrap().cluster.unwrap();
        assert_eq!(c.store.len(), 2);
        assert_eq!(c.node_name, "n1.example");
        assert_eq!(c.node_ips.len(), 2);
        assert_eq!(c.etcd_key, Some("/etc/hypha/c.key".into()));
        assert_eq!(c.cidrs.v4, Some(("10.8.0.0/14".parse().unwrap(), 26)));
        assert_eq!(c.cidrs.v6, None);
        assert_eq!(c.prefix, "/t/v1/");
        assert_eq!(c.identity_gc_grace, Duration::from_secs(30));
        assert_eq!(c.node_ttl, Duration::from_secs(3));
        // A flag wins over the file.
        let file = ConfigFile::parse(
            "cluster-store: etcd=http://10.0.0.1:2379\nnode-name: a\nnode-ip: 10.0.0.5\n",
        )
        .unwrap();
        let flags = ConfigFile {
            node_name: Some("b".into()),
            ..Default::default()
        };
        let c = file.merge(flags).resolve().unwrap().cluster.unwrap();
        assert_eq!(c.node_name, "b");
        let err = ConfigFile::parse("cluster_store: etcd=http://a:1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster_store"), "{err}");
    }

    #[test]
    fn bad_cluster_stores_are_named() {
        let bad = |s: &str| s.parse::<ClusterStore>().unwrap_err();
        let e = bad("http://10.0.0.1:2379");
        assert!(e.contains("names no store") && e.contains("etcd="), "{e}");
        let e = bad("consul=http://10.0.0.1:8500");
        assert!(
            e.contains("\"consul\"") && e.contains("only one is etcd"),
            "{e}"
        );
        let e = bad("etcd=");
        assert!(e.contains("lists no URL"), "{e}");
        let e = bad("etcd=10.0.0.1:2379");
        assert!(
            e.contains("\"10.0.0.1:2379\"") && e.contains("http://"),
            "{e}"
        );
        let e = bad("etcd=http://10.0.0.1");
        assert!(e.contains("no port"), "{e}");
        let e = bad("etcd=http://10.0.0.1:2379/v3");
        assert!(e.contains("path"), "{e}");
        let e = bad("etcd=http://10.0.0.1:99999");
        assert!(e.contains("invalid port"), "{e}");
        let ok: ClusterStore = "etcd=http://[fd00::1]:2379, https://h.example:2379/"
            .parse()
            .unwrap();
        assert_eq!(ok.urls.len(), 2);
    }

    #[test]
    fn bad_node_names_are_named() {
        for (name, why) in [
            ("", "empty"),
            ("Node-A", "lowercase"),
            ("node_a", "lowercase"),
            ("a/b", "lowercase"),
            ("-a", "'-'"),
            ("a..b", "empty"),
            (&"x".repeat(64), "63"),
        ] {
            let err = refused(ConfigFile {
                node_name: Some(name.into()),
                ..cluster_flags()
            });
            assert!(
                err.contains(&format!("node-name {name:?}")) && err.contains(why),
                "{name}: {err}"
            );
        }
        check_node_name("worker-1.rack-2").unwrap();
    }

    #[test]
    fn bad_node_ips_are_named() {
        let bad = |s: &str| s.parse::<NodeIps>().unwrap_err();
        let e = bad("10.0.0.1,10.0.0.2");
        assert!(
            e.contains("two addresses of one family") && e.contains("10.0.0.2"),
            "{e}"
        );
        let e = bad("fd00::1,fd00::2");
        assert!(e.contains("two addresses"), "{e}");
        let e = bad("node-a");
        assert!(e.contains("\"node-a\" is not an IP"), "{e}");
        let e = bad("0.0.0.0");
        assert!(e.contains("not a unicast"), "{e}");
        let ips: NodeIps = "fd00::1, 10.0.0.1".parse().unwrap();
        assert!(ips.0[0].is_ipv4(), "IPv4 first: {ips:?}");
    }

    #[test]
    fn cluster_keys_need_cluster_store() {
        let err = refused(ConfigFile {
            node_name: Some("a".into()),
            ..Default::default()
        });
        assert!(
            err.contains("node-name applies only in cluster mode")
                && err.contains("--cluster-store"),
            "{err}"
        );
        let err = refused(ConfigFile {
            node_ip: Some("10.0.0.1".parse().unwrap()),
            identity_gc_grace: Some("1m".parse().unwrap()),
            ..Default::default()
        });
        assert!(
            err.contains("node-ip, identity-gc-grace apply only"),
            "{err}"
        );
    }

    #[test]
    fn cluster_mode_refuses_pod_cidr_and_gateway_and_needs_name_and_ip() {
        let err = refused(ConfigFile {
            pod_cidrs: Some("10.1.0.0/24".parse().unwrap()),
            ..cluster_flags()
        });
        assert!(err.contains("pod-cidr is refused in cluster mode"), "{err}");
        let err = refused(ConfigFile {
            pod_cidr: Some("10.1.0.0/24".parse().unwrap()),
            ..cluster_flags()
        });
        assert!(err.contains("pod-cidr is refused"), "{err}");
        let err = refused(ConfigFile {
            gateway: Some("10.244.0.1".parse().unwrap()),
            ..cluster_flags()
        });
        assert!(err.contains("gateway 10.244.0.1 is refused"), "{err}");
        let err = refused(ConfigFile {
            node_name: None,
            ..cluster_flags()
        });
        assert!(err.contains("needs node-name"), "{err}");
        let err = refused(ConfigFile {
            node_ip: None,
            ..cluster_flags()
        });
        assert!(err.contains("needs node-ip"), "{err}");
    }

    #[test]
    fn etcd_tls_needs_cert_and_key_together() {
        let err = refused(ConfigFile {
            etcd_cert: Some("/c.pem".into()),
            ..cluster_flags()
        });
        assert!(err.contains("etcd-cert is set without etcd-key"), "{err}");
        let err = refused(ConfigFile {
            etcd_key: Some("/c.key".into()),
            ..cluster_flags()
        });
        assert!(err.contains("etcd-key is set without etcd-cert"), "{err}");
        let err = refused(ConfigFile {
            etcd_ca: Some("ca.pem".into()),
            ..cluster_flags()
        });
        assert!(
            err.contains("etcd-ca ca.pem must be an absolute path"),
            "{err}"
        );
        let c = ConfigFile {
            etcd_ca: Some("/ca.pem".into()),
            ..cluster_flags()
        }
        .resolve()
        .unwrap();
        assert!(
            c.cluster.unwrap().etcd_cert.is_none(),
            "a CA alone is server TLS"
        );
    }

    #[test]
    fn bad_cidr_plans_are_named() {
        let plan = |c: &str, s: Option<&str>| {
            let c: ClusterCidrs = c.parse()?;
            let s: Option<NodeCidrSizes> = s.map(str::parse).transpose()?;
            cidr_plan(c, s.as_ref())
        };
        let e = plan("10.0.0.0/16", Some("16")).unwrap_err();
        assert!(
            e.contains("/16 does not fit cluster-cidr 10.0.0.0/16"),
            "{e}"
        );
        let e = plan("10.0.0.0/16", Some("31")).unwrap_err();
        assert!(e.contains("/31") && e.contains("/30"), "{e}");
        let e = plan("fd00::/48", Some("56")).unwrap_err();
        assert!(e.contains("/56") && e.contains("/64 to a /120"), "{e}");
        let e = plan("10.0.0.0/16,fd00::/48", Some("24")).unwrap_err();
        assert!(e.contains("gives 1 sizes for 2"), "{e}");
        let e = plan("10.0.0.0/16,10.1.0.0/16", None).unwrap_err();
        assert!(e.contains("two CIDRs of one family"), "{e}");
        let e = plan("10.0.0.1/16", None).unwrap_err();
        assert!(e.contains("host bits") && e.contains("10.0.0.0/16"), "{e}");
        let e = plan("10.0.0.0/16", Some("x")).unwrap_err();
        assert!(e.contains("\"x\" is not a prefix length"), "{e}");
        let p = plan("fd00::/48", None).unwrap();
        assert_eq!((p.v4, p.v6.map(|v| v.1)), (None, Some(64)));
        let p = plan("10.0.0.0/16,fd00::/48", Some("/26,/96")).unwrap();
        assert_eq!((p.v4.unwrap().1, p.v6.unwrap().1), (26, 96));
        // Through the configuration.
        let err = refused(ConfigFile {
            node_cidr_size: Some("8,64".parse().unwrap()),
            ..cluster_flags()
        });
        assert!(err.contains("node-cidr-size /8"), "{err}");
    }

    #[test]
    fn spans_and_prefixes() {
        assert_eq!(
            "500ms".parse::<Span>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!("15m".parse::<Span>().unwrap().0, Duration::from_secs(900));
        assert_eq!("2h".parse::<Span>().unwrap().0, Duration::from_secs(7200));
        let e = "15".parse::<Span>().unwrap_err();
        assert!(e.contains("no known unit"), "{e}");
        let e = "0s".parse::<Span>().unwrap_err();
        assert!(e.contains("longer than zero"), "{e}");
        let e = "m".parse::<Span>().unwrap_err();
        assert!(e.contains("not a number"), "{e}");
        assert_eq!(check_prefix("/a/b").unwrap(), "/a/b/");
        assert_eq!(check_prefix("/hypha/v1/").unwrap(), "/hypha/v1/");
        let e = check_prefix("hypha/v1").unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let e = check_prefix("/a//b/").unwrap_err();
        assert!(e.contains("empty"), "{e}");
    }
}
