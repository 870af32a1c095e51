//! A container's named ports as `hypha run --port NAME:NUMBER[/PROTO]` gives them (pure).
//!
//! The CNI carries no container port names, so the launcher passes them to every plugin in
//! `args.cni.namedPorts` (`[{"name": "http", "port": 8080, "protocol": "TCP"}]`), where
//! hypha-cni hands them to the agent for NetworkPolicies that name a port (`port: http`).

use serde::{Deserialize, Serialize};

/// A `--port` value that is not `NAME:NUMBER[/PROTO]`, or a name given twice.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid --port {value:?}: {reason}")]
pub struct PortError {
    pub value: String,
    pub reason: &'static str,
}

/// A port's protocol, written upper case as Kubernetes writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

/// One named port of the container: `http` = 8080/TCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// `--port NAME:NUMBER[/PROTO]`: `http:8080`, `dns:53/udp`. NAME is a Kubernetes port name
/// (see [`is_port_name`]), NUMBER from 1 to 65535, PROTO `tcp` (the default), `udp` or
/// `sctp` in any case.
pub fn parse_port(value: &str) -> Result<NamedPort, PortError> {
    let bad = |reason| PortError {
        value: value.to_owned(),
        reason,
    };
    let (name, rest) = value
        .split_once(':')
        .ok_or_else(|| bad("expected NAME:NUMBER[/PROTO], such as http:8080 or dns:53/udp"))?;
    let (number, protocol) = match rest.split_once('/') {
        Some((number, protocol)) => (number, Some(protocol)),
        None => (rest, None),
    };
    if !is_port_name(name) {
        return Err(bad(
            "NAME must be a port name as Kubernetes takes it: 1 to 15 lower-case letters, digits and '-', with a letter, no '-' at either end or next to another",
        ));
    }
    // Digits only: `u16::from_str` would take a leading `+`.
    let port = Some(number)
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("NUMBER must be a port number from 1 to 65535"))?;
    let protocol = match protocol.map(str::to_ascii_lowercase).as_deref() {
        None | Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some("sctp") => Protocol::Sctp,
        Some(_) => return Err(bad("PROTO must be tcp, udp or sctp")),
    };
    Ok(NamedPort {
        name: name.to_owned(),
        port,
        protocol,
    })
}

/// Refuses a name given twice: a pod names each of its ports once.
pub fn check_unique(ports: &[NamedPort]) -> Result<(), PortError> {
    for (i, p) in ports.iter().enumerate() {
        if ports[..i].iter().any(|q| q.name == p.name) {
            return Err(PortError {
                value: format!("{}:{}", p.name, p.port),
                reason: "the name is given to another --port already",
            });
        }
    }
    Ok(())
}

/// A port name as Kubernetes validates a container port's (`IsValidPortName`, an
/// IANA_SVC_NAME): 1 to 15 characters of `a-z`, `0-9` and `-`, at least one letter, no
/// `-` first, last or twice in a row. (hypha-cni checks `args.cni.namedPorts` the same
/// way; the launcher checks first so that nothing is made for a name a plugin refuses.)
pub fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, port: u16, protocol: Protocol) -> NamedPort {
        NamedPort {
            name: name.into(),
            port,
            protocol,
        }
    }

    #[test]
    fn names_numbers_and_protocols_in_any_case() {
        for (spec, want) in [
            ("http:8080", port("http", 8080, Protocol::Tcp)),
            ("http:8080/tcp", port("http", 8080, Protocol::Tcp)),
            ("dns:53/udp", port("dns", 53, Protocol::Udp)),
            ("dns:53/UDP", port("dns", 53, Protocol::Udp)),
            ("sig-1:65535/Sctp", port("sig-1", 65535, Protocol::Sctp)),
            ("a:1", port("a", 1, Protocol::Tcp)),
            (
                "abcdefghijklmno:443",
                port("abcdefghijklmno", 443, Protocol::Tcp),
            ),
        ] {
            assert_eq!(parse_port(spec), Ok(want), "{spec}");
        }
        // As plugins get it: upper-case protocols.
        assert_eq!(
            serde_json::to_value(port("dns", 53, Protocol::Udp)).unwrap(),
            serde_json::json!({"name": "dns", "port": 53, "protocol": "UDP"})
        );
    }

    #[test]
    fn bad_specs_are_refused_naming_them_and_what_is_wrong() {
        for (spec, why) in [
            ("http", "expected NAME:NUMBER[/PROTO]"),
            ("8080", "expected NAME:NUMBER[/PROTO]"),
            ("", "expected NAME:NUMBER[/PROTO]"),
            (":8080", "NAME must be a port name"),
            ("HTTP:8080", "NAME must be a port name"),
            ("80:8080", "NAME must be a port name"),
            ("-web:80", "NAME must be a port name"),
            ("web-:80", "NAME must be a port name"),
            ("a--b:80", "NAME must be a port name"),
            ("web_ui:80", "NAME must be a port name"),
            ("abcdefghijklmnop:80", "NAME must be a port name"),
            ("http:", "NUMBER must be"),
            ("http:0", "NUMBER must be"),
            ("http:65536", "NUMBER must be"),
            ("http:+80", "NUMBER must be"),
            ("http:-80", "NUMBER must be"),
            ("http:eighty", "NUMBER must be"),
            ("http:80:81", "NUMBER must be"),
            ("http:80/", "PROTO must be tcp, udp or sctp"),
            ("http:80/icmp", "PROTO must be tcp, udp or sctp"),
            ("http:80/tcp/udp", "PROTO must be tcp, udp or sctp"),
        ] {
            let e = parse_port(spec).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("invalid --port {spec:?}: ")),
                "{spec}: {e}"
            );
            assert!(e.contains(why), "{spec}: {e}");
        }
    }

    #[test]
    fn a_name_is_given_once() {
        let ok = [
            port("http", 80, Protocol::Tcp),
            port("dns", 53, Protocol::Udp),
        ];
        assert_eq!(check_unique(&ok), Ok(()));
        let twice = [
            port("http", 80, Protocol::Tcp),
            port("dns", 53, Protocol::Udp),
            port("http", 81, Protocol::Udp),
        ];
        let e = check_unique(&twice).unwrap_err().to_string();
        assert!(
            e.contains("\"http:81\"") && e.contains("another --port"),
            "{e}"
        );
    }
}
