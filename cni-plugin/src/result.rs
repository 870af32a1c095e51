//! The JSON the plugin writes on stdout, in the shape of each CNI version (pure).

use std::net::Ipv4Addr;
use std::path::Path;

use hypha_api::MacAddr;
use ipnet::Ipv4Net;
use serde_json::{Value, json};

use crate::config::CniVersion;
use crate::json;

/// What ADD set up, to be reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached<'a> {
    pub host_ifname: &'a str,
    pub host_mac: MacAddr,
    pub ifname: &'a str,
    pub pod_mac: MacAddr,
    pub netns: &'a Path,
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// DNS settings from a delegated IPAM plugin's result.
    pub dns: Option<Value>,
}

/// ADD's success result.
///
/// interfaces[0] is the host veth, interfaces[1] the container's interface (with its
/// sandbox); the one IP is a /32 on interfaces[1]; the one route is the default route.
/// Versions before 1.0.0 also give each IP its `"version": "4"`.
pub fn add_result(version: CniVersion, a: &Attached<'_>) -> Value {
    let mut ip = json!({
        "address": format!("{}/32", a.address),
        "gateway": a.gateway.to_string(),
        "interface": 1,
    });
    if version < CniVersion::V1_0_0 {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version.as_str(),
        "interfaces": [
            { "name": a.host_ifname, "mac": a.host_mac.to_string() },
            {
                "name": a.ifname,
                "mac": a.pod_mac.to_string(),
                "sandbox": a.netns.to_string_lossy(),
            },
        ],
        "ips": [ip],
        "routes": [{ "dst": "0.0.0.0/0", "gw": a.gateway.to_string() }],
        "dns": a.dns.clone().unwrap_or_else(|| json!({})),
    })
}

/// VERSION's result.
pub fn version_result(version: CniVersion) -> Value {
    json!({
        "cniVersion": version.as_str(),
        "supportedVersions": CniVersion::ALL.map(CniVersion::as_str),
    })
}

/// What a previous result says the container's interface has, for CHECK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub address: Ipv4Net,
    /// Gateway of the default route, if the result has one.
    pub default_gateway: Option<Ipv4Addr>,
    /// Every IPv4 route of the result: destination and gateway.
    pub routes: Vec<(Ipv4Net, Option<Ipv4Addr>)>,
    /// MAC of the interface, if the result gives it.
    pub mac: Option<MacAddr>,
}

/// Reads [`Expected`] for interface `ifname` out of a `prevResult` (any supported
/// version), its keys matched as Go matches them ([`crate::json`]). The error says what is
/// missing or malformed.
pub fn expected_from_prev_result(prev: &Value, ifname: &str) -> Result<Expected, String> {
    // A key given twice in different cases cannot be read as Go would: say which.
    let get = |v: &'_ Value, key: &str| -> Result<Option<Value>, String> {
        json::get(v, key)
            .map(|found| found.filter(|f| !f.is_null()).cloned())
            .map_err(|e| format!("prevResult: {key} {e}"))
    };
    let str_of = |v: &Value, key: &str| -> Result<Option<String>, String> {
        Ok(get(v, key)?.and_then(|s| s.as_str().map(str::to_owned)))
    };
    let ips = match get(prev, "ips")? {
        Some(Value::Array(ips)) => ips,
        _ => return Err("prevResult has no \"ips\" list".into()),
    };
    let interfaces = match get(prev, "interfaces")? {
        Some(Value::Array(i)) => i,
        _ => Vec::new(),
    };
    let mut on_ifname = Vec::new();
    let mut any = Vec::new();
    for ip in &ips {
        let Some(address) = str_of(ip, "address")?.and_then(|a| a.parse::<Ipv4Net>().ok()) else {
            continue;
        };
        let gateway = str_of(ip, "gateway")?.and_then(|g| g.parse::<Ipv4Addr>().ok());
        let index = get(ip, "interface")?
            .and_then(|i| i.as_u64())
            .and_then(|i| usize::try_from(i).ok());
        let name = match index.and_then(|i| interfaces.get(i)) {
            Some(iface) => str_of(iface, "name")?,
            None => None,
        };
        if name.as_deref() == Some(ifname) {
            on_ifname.push((address, gateway));
        }
        any.push((address, gateway));
    }
    let (address, ip_gateway) = on_ifname
        .first()
        .or_else(|| any.first())
        .copied()
        .ok_or_else(|| format!("prevResult has no IPv4 address for interface {ifname}"))?;
    let mut routes: Vec<(Ipv4Net, Option<Ipv4Addr>)> = Vec::new();
    if let Some(Value::Array(list)) = get(prev, "routes")? {
        for r in &list {
            let Some(dst) = str_of(r, "dst")?.and_then(|d| d.parse::<Ipv4Net>().ok()) else {
                continue;
            };
            let gw = str_of(r, "gw")?.and_then(|g| g.parse().ok());
            routes.push((dst.trunc(), gw));
        }
    }
    let route_gateway = routes
        .iter()
        .find(|(dst, _)| dst.prefix_len() == 0)
        .and_then(|(_, gw)| *gw);
    let mut mac = None;
    for iface in &interfaces {
        if str_of(iface, "name")?.as_deref() == Some(ifname) && get(iface, "sandbox")?.is_some() {
            mac = str_of(iface, "mac")?.and_then(|m| m.parse().ok());
            break;
        }
    }
    Ok(Expected {
        address,
        default_gateway: route_gateway.or(ip_gateway),
        routes,
        mac,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attached() -> Attached<'static> {
        Attached {
            host_ifname: "hyp538f587a2365",
            host_mac: MacAddr([0x02, 0, 0, 0, 0, 0x01]),
            ifname: "eth0",
            pod_mac: MacAddr([0x02, 0, 0, 0, 0, 0x02]),
            netns: Path::new("/run/netns/p"),
            address: Ipv4Addr::new(10, 244, 0, 5),
            gateway: Ipv4Addr::new(10, 244, 0, 1),
            dns: None,
        }
    }

    #[test]
    fn add_result_1_x() {
        let r = add_result(CniVersion::V1_1_0, &attached());
        assert_eq!(
            r,
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "hyp538f587a2365", "mac": "02:00:00:00:00:01"},
                    {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/p"},
                ],
                "ips": [{"address": "10.244.0.5/32", "gateway": "10.244.0.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}],
                "dns": {},
            })
        );
        assert_eq!(
            add_result(CniVersion::V1_0_0, &attached())["cniVersion"],
            "1.0.0"
        );
    }

    #[test]
    fn add_result_0_x_has_ip_versions() {
        for v in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let r = add_result(v, &attached());
            assert_eq!(r["cniVersion"], v.as_str());
            assert_eq!(r["ips"][0]["version"], "4");
            assert_eq!(r["ips"][0]["address"], "10.244.0.5/32");
        }
        assert!(
            add_result(CniVersion::V1_0_0, &attached())["ips"][0]
                .get("version")
                .is_none()
        );
    }

    #[test]
    fn version_result_lists_every_version() {
        assert_eq!(
            version_result(CniVersion::V0_4_0),
            json!({"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
    }

    #[test]
    fn prev_results_are_read_back() {
        for v in CniVersion::ALL {
            let r = add_result(v, &attached());
            assert_eq!(
                expected_from_prev_result(&r, "eth0"),
                Ok(Expected {
                    address: "10.244.0.5/32".parse().unwrap(),
                    default_gateway: Some(Ipv4Addr::new(10, 244, 0, 1)),
                    routes: vec![(
                        "0.0.0.0/0".parse().unwrap(),
                        Some(Ipv4Addr::new(10, 244, 0, 1))
                    )],
                    mac: Some(MacAddr([0x02, 0, 0, 0, 0, 0x02])),
                }),
                "{v}"
            );
        }
    }

    /// A Go runtime or plugin may write a result with Go's field names; Go's readers
    /// match them whatever their case, and so does CHECK.
    #[test]
    fn prev_results_are_read_whatever_the_case_of_their_keys() {
        let prev = json!({
            "CNIVersion": "1.0.0",
            "Interfaces": [{"Name": "net1", "Sandbox": "/x"}, {"NAME": "eth0", "SandBox": "/x", "Mac": "02:00:00:00:00:02"}],
            "IPs": [{"Address": "10.0.0.7/32", "Gateway": "10.0.0.1", "Interface": 1}],
            "Routes": [{"Dst": "0.0.0.0/0", "GW": "10.0.0.1"}],
        });
        assert_eq!(
            expected_from_prev_result(&prev, "eth0"),
            Ok(Expected {
                address: "10.0.0.7/32".parse().unwrap(),
                default_gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
                routes: vec![(
                    "0.0.0.0/0".parse().unwrap(),
                    Some(Ipv4Addr::new(10, 0, 0, 1))
                )],
                mac: Some(MacAddr([0x02, 0, 0, 0, 0, 0x02])),
            })
        );
    }

    #[test]
    fn prev_results_pick_the_interface_and_say_what_is_missing() {
        let prev = json!({
            "interfaces": [{"name": "net1", "sandbox": "/x"}, {"name": "eth0", "sandbox": "/x"}],
            "ips": [
                {"address": "fd00::5/128", "interface": 1},
                {"address": "192.168.0.9/24", "interface": 0},
                {"address": "10.0.0.7/32", "gateway": "10.0.0.1", "interface": 1},
            ],
        });
        assert_eq!(
            expected_from_prev_result(&prev, "eth0"),
            Ok(Expected {
                address: "10.0.0.7/32".parse().unwrap(),
                default_gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
                routes: Vec::new(),
                mac: None,
            })
        );
        assert!(
            expected_from_prev_result(&json!({}), "eth0")
                .unwrap_err()
                .contains("\"ips\"")
        );
        assert!(
            expected_from_prev_result(&json!({"ips": [{"address": "fd00::1/64"}]}), "eth0")
                .unwrap_err()
                .contains("no IPv4 address for interface eth0")
        );
    }
}
