//! The JSON the plugin writes on stdout, in the shape of each CNI version (pure).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use hypha_api::MacAddr;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
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
    /// The pod's IPv4 address (a /32) and gateway, on a node with IPv4.
    pub ipv4: Option<Family<Ipv4Addr>>,
    /// The pod's IPv6 address (a /128) and gateway (`fe80::1`), on a node with IPv6.
    pub ipv6: Option<Family<Ipv6Addr>>,
    /// DNS settings from a delegated IPAM plugin's result.
    pub dns: Option<Value>,
    /// The MTU given to both ends of the veth (`None`: the kernel's default, unreported).
    pub mtu: Option<u32>,
}

/// One family's address of a pod and the gateway of its default route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family<A> {
    pub address: A,
    pub gateway: A,
}

/// ADD's success result.
///
/// interfaces[0] is the host veth, interfaces[1] the container's interface (with its
/// sandbox); the IPs, IPv4 first, are a /32 and a /128 on interfaces[1], each with its
/// family's gateway; the routes are the default route of each family (`0.0.0.0/0`,
/// `::/0`). Versions before 1.0.0 also give each IP its `"version"` (`"4"` or `"6"`);
/// 1.1.0 gives each interface its `"mtu"` when the plugin set one.
pub fn add_result(version: CniVersion, a: &Attached<'_>) -> Value {
    let mut ips = Vec::new();
    let mut routes = Vec::new();
    let families = [
        a.ipv4
            .map(|f| (IpAddr::from(f.address), IpAddr::from(f.gateway))),
        a.ipv6
            .map(|f| (IpAddr::from(f.address), IpAddr::from(f.gateway))),
    ];
    for (address, gateway) in families.into_iter().flatten() {
        let net = IpNet::from(address);
        let mut ip = json!({
            "address": net.to_string(),
            "gateway": gateway.to_string(),
            "interface": 1,
        });
        if version < CniVersion::V1_0_0 {
            ip["version"] = json!(if address.is_ipv4() { "4" } else { "6" });
        }
        ips.push(ip);
        let default = if address.is_ipv4() {
            "0.0.0.0/0"
        } else {
            "::/0"
        };
        routes.push(json!({ "dst": default, "gw": gateway.to_string() }));
    }
    let mut interfaces = json!([
        { "name": a.host_ifname, "mac": a.host_mac.to_string() },
        {
            "name": a.ifname,
            "mac": a.pod_mac.to_string(),
            "sandbox": a.netns.to_string_lossy(),
        },
    ]);
    if let Some(mtu) = a.mtu.filter(|_| version >= CniVersion::V1_1_0)
        && let Some(list) = interfaces.as_array_mut()
    {
        for iface in list {
            iface["mtu"] = json!(mtu);
        }
    }
    json!({
        "cniVersion": version.as_str(),
        "interfaces": interfaces,
        "ips": ips,
        "routes": routes,
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
    /// The IPv4 address of the interface, if the result has one.
    pub address: Option<Ipv4Net>,
    /// The IPv6 address of the interface, if the result has one.
    pub address6: Option<Ipv6Net>,
    /// Every route of the result, of both families: destination and gateway.
    pub routes: Vec<(IpNet, Option<IpAddr>)>,
    /// MAC of the interface, if the result gives it.
    pub mac: Option<MacAddr>,
}

/// Reads [`Expected`] for interface `ifname` out of a `prevResult` (any supported
/// version), its keys matched as Go matches them ([`crate::json`]): per family, the first
/// address on `ifname`, or else the first address of no known interface. The error says
/// what is missing or malformed.
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
        let Some(address) = str_of(ip, "address")?.and_then(|a| a.parse::<IpNet>().ok()) else {
            continue;
        };
        let index = get(ip, "interface")?
            .and_then(|i| i.as_u64())
            .and_then(|i| usize::try_from(i).ok());
        let name = match index.and_then(|i| interfaces.get(i)) {
            Some(iface) => str_of(iface, "name")?,
            None => None,
        };
        if name.as_deref() == Some(ifname) {
            on_ifname.push(address);
        }
        any.push(address);
    }
    let pick = |want_v4: bool| {
        let of_family = |list: &Vec<IpNet>| {
            list.iter()
                .copied()
                .find(|a| matches!(a, IpNet::V4(_)) == want_v4)
        };
        of_family(&on_ifname).or_else(|| of_family(&any))
    };
    let address = pick(true).and_then(|a| match a {
        IpNet::V4(a) => Some(a),
        IpNet::V6(_) => None,
    });
    let address6 = pick(false).and_then(|a| match a {
        IpNet::V6(a) => Some(a),
        IpNet::V4(_) => None,
    });
    if address.is_none() && address6.is_none() {
        return Err(format!(
            "prevResult has no IP address for interface {ifname}"
        ));
    }
    let mut routes: Vec<(IpNet, Option<IpAddr>)> = Vec::new();
    if let Some(Value::Array(list)) = get(prev, "routes")? {
        for r in &list {
            let Some(dst) = str_of(r, "dst")?.and_then(|d| d.parse::<IpNet>().ok()) else {
                continue;
            };
            let gw: Option<IpAddr> = str_of(r, "gw")?.and_then(|g| g.parse().ok());
            // A gateway of the other family cannot be the route's: read as none.
            let gw = gw.filter(|g| g.is_ipv4() == matches!(dst, IpNet::V4(_)));
            routes.push((dst.trunc(), gw));
        }
    }
    let mut mac = None;
    for iface in &interfaces {
        if str_of(iface, "name")?.as_deref() == Some(ifname) && get(iface, "sandbox")?.is_some() {
            mac = str_of(iface, "mac")?.and_then(|m| m.parse().ok());
            break;
        }
    }
    Ok(Expected {
        address,
        address6,
        routes,
        mac,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: Family<Ipv4Addr> = Family {
        address: Ipv4Addr::new(10, 244, 0, 5),
        gateway: Ipv4Addr::new(10, 244, 0, 1),
    };
    const V6: Family<Ipv6Addr> = Family {
        address: Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 5),
        gateway: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
    };

    fn attached() -> Attached<'static> {
        Attached {
            host_ifname: "hyp538f587a2365",
            host_mac: MacAddr([0x02, 0, 0, 0, 0, 0x01]),
            ifname: "eth0",
            pod_mac: MacAddr([0x02, 0, 0, 0, 0, 0x02]),
            netns: Path::new("/run/netns/p"),
            ipv4: Some(V4),
            ipv6: None,
            dns: None,
            mtu: None,
        }
    }

    fn dual() -> Attached<'static> {
        Attached {
            ipv6: Some(V6),
            ..attached()
        }
    }

    fn v6_only() -> Attached<'static> {
        Attached {
            ipv4: None,
            ipv6: Some(V6),
            ..attached()
        }
    }

    const IP4: &str = "10.244.0.5/32";
    const IP6: &str = "fd00:10:244::5/128";

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
                "ips": [{"address": IP4, "gateway": "10.244.0.1", "interface": 1}],
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
    fn the_mtu_is_on_both_interfaces_from_1_1_0() {
        let with = Attached {
            mtu: Some(1450),
            ..dual()
        };
        let r = add_result(CniVersion::V1_1_0, &with);
        assert_eq!(r["interfaces"][0]["mtu"], 1450, "{r}");
        assert_eq!(r["interfaces"][1]["mtu"], 1450, "{r}");
        // Earlier versions' interfaces have no such field.
        for v in CniVersion::ALL
            .into_iter()
            .filter(|v| *v < CniVersion::V1_1_0)
        {
            let r = add_result(v, &with);
            assert!(r["interfaces"][1].get("mtu").is_none(), "{v}: {r}");
        }
        // Unknown (the kernel's default): not reported.
        let r = add_result(CniVersion::V1_1_0, &dual());
        assert!(r["interfaces"][1].get("mtu").is_none(), "{r}");
    }

    #[test]
    fn add_result_of_every_version_dual_and_v6_only() {
        for v in CniVersion::ALL {
            let old = v < CniVersion::V1_0_0;
            let ip = |address: &str, gateway: &str, family: &str| {
                let mut ip = json!({"address": address, "gateway": gateway, "interface": 1});
                if old {
                    ip["version"] = json!(family);
                }
                ip
            };
            let r = add_result(v, &dual());
            assert_eq!(r["cniVersion"], v.as_str());
            assert_eq!(
                r["ips"],
                json!([ip(IP4, "10.244.0.1", "4"), ip(IP6, "fe80::1", "6")]),
                "{v}"
            );
            assert_eq!(
                r["routes"],
                json!([
                    {"dst": "0.0.0.0/0", "gw": "10.244.0.1"},
                    {"dst": "::/0", "gw": "fe80::1"},
                ]),
                "{v}"
            );
            let r = add_result(v, &v6_only());
            assert_eq!(r["ips"], json!([ip(IP6, "fe80::1", "6")]), "{v}");
            assert_eq!(
                r["routes"],
                json!([{"dst": "::/0", "gw": "fe80::1"}]),
                "{v}"
            );
            assert_eq!(r["interfaces"][1]["name"], "eth0");
            let r = add_result(v, &attached());
            assert_eq!(r["ips"], json!([ip(IP4, "10.244.0.1", "4")]), "{v}");
            assert_eq!(
                r["routes"],
                json!([{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}])
            );
        }
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
        let route4 = ("0.0.0.0/0".parse().unwrap(), Some(IpAddr::from(V4.gateway)));
        let route6 = ("::/0".parse().unwrap(), Some(IpAddr::from(V6.gateway)));
        let mac = Some(MacAddr([0x02, 0, 0, 0, 0, 0x02]));
        for v in CniVersion::ALL {
            assert_eq!(
                expected_from_prev_result(&add_result(v, &attached()), "eth0"),
                Ok(Expected {
                    address: Some(IP4.parse().unwrap()),
                    address6: None,
                    routes: vec![route4],
                    mac,
                }),
                "{v}"
            );
            assert_eq!(
                expected_from_prev_result(&add_result(v, &dual()), "eth0"),
                Ok(Expected {
                    address: Some(IP4.parse().unwrap()),
                    address6: Some(IP6.parse().unwrap()),
                    routes: vec![route4, route6],
                    mac,
                }),
                "{v}"
            );
            assert_eq!(
                expected_from_prev_result(&add_result(v, &v6_only()), "eth0"),
                Ok(Expected {
                    address: None,
                    address6: Some(IP6.parse().unwrap()),
                    routes: vec![route6],
                    mac,
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
                address: Some("10.0.0.7/32".parse().unwrap()),
                address6: None,
                routes: vec![(
                    "0.0.0.0/0".parse().unwrap(),
                    Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)))
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
                {"address": "fd00::9/64", "interface": 0},
                {"address": "192.168.0.9/24", "interface": 0},
                {"address": "fd00::5/128", "interface": 1},
                {"address": "10.0.0.7/32", "gateway": "10.0.0.1", "interface": 1},
            ],
            "routes": [{"dst": "::/0", "gw": "10.0.0.1"}],
        });
        assert_eq!(
            expected_from_prev_result(&prev, "eth0"),
            Ok(Expected {
                address: Some("10.0.0.7/32".parse().unwrap()),
                address6: Some("fd00::5/128".parse().unwrap()),
                // A gateway of the other family is no gateway.
                routes: vec![("::/0".parse().unwrap(), None)],
                mac: None,
            })
        );
        assert!(
            expected_from_prev_result(&json!({}), "eth0")
                .unwrap_err()
                .contains("\"ips\"")
        );
        assert!(
            expected_from_prev_result(&json!({"ips": [{"address": "nonsense"}]}), "eth0")
                .unwrap_err()
                .contains("no IP address for interface eth0")
        );
        // An IPv6-only result is a result.
        assert_eq!(
            expected_from_prev_result(&json!({"ips": [{"address": "fd00::1/64"}]}), "eth0")
                .unwrap()
                .address6,
            Some("fd00::1/64".parse().unwrap())
        );
    }
}
