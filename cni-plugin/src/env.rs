//! The `CNI_*` environment variables, parsed into an [`Operation`] (pure).

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;

use hypha_api::MacAddr;

/// What the runtime asked for, with the variables that operation needs, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    Add(Attachment),
    Del(Detachment),
    Check(Attachment),
    Status,
    Gc,
    Version,
}

/// ADD and CHECK: a container's interface, in a network namespace that must exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub args: CniArgs,
}

/// DEL: the network namespace may be gone already.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detachment {
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: CniArgs,
}

/// The `CNI_ARGS` this plugin understands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    /// `IP`: requested addresses, comma-separated, with or without a prefix length (as
    /// host-local and static read it; CRI-O and podman pass a static address so).
    pub ips: Vec<IpAddr>,
    /// `MAC`: the container interface's MAC (as tuning reads it; CRI-O and podman pass a
    /// static MAC so).
    pub mac: Option<MacAddr>,
}

/// Why the environment is not a valid CNI invocation. All of them are CNI error 4.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    /// A variable the operation needs is not set or empty.
    #[error("{var} is not set (required for {command})")]
    Missing {
        var: &'static str,
        command: &'static str,
    },
    /// A variable is not valid UTF-8.
    #[error("{var} is not valid UTF-8: {value:?}")]
    NotUnicode { var: &'static str, value: OsString },
    /// `CNI_COMMAND` is not a CNI operation.
    #[error(
        "CNI_COMMAND={0:?} is not a CNI operation (expected ADD, DEL, CHECK, STATUS, GC or VERSION)"
    )]
    UnknownCommand(String),
    /// `CNI_CONTAINERID` breaks the spec's syntax.
    #[error(
        "CNI_CONTAINERID={0:?} is invalid: it must start with a letter or digit followed by letters, digits, '_', '.' or '-'"
    )]
    InvalidContainerId(String),
    /// `CNI_IFNAME` is not a valid Linux interface name.
    #[error("CNI_IFNAME={value:?} is invalid: {reason}")]
    InvalidIfname { value: String, reason: &'static str },
    /// A `CNI_ARGS` pair is not `KEY=VALUE`.
    #[error("CNI_ARGS: {pair:?} is not a KEY=VALUE pair")]
    InvalidArgsPair { pair: String },
    /// `IgnoreUnknown` has a value that is not a boolean.
    #[error("CNI_ARGS: IgnoreUnknown={0:?} is not a boolean (expected 1, 0, true or false)")]
    InvalidIgnoreUnknown(String),
    /// A key this plugin reads has a value it cannot use.
    #[error("CNI_ARGS: {key}={value:?} is invalid: {problem}")]
    InvalidArg {
        key: &'static str,
        value: String,
        problem: &'static str,
    },
    /// Keys this plugin does not know, without `IgnoreUnknown=1`.
    #[error("CNI_ARGS: unknown keys {0:?} (pass IgnoreUnknown=1 to ignore them)")]
    UnknownArgs(Vec<String>),
}

/// Reads the operation from the variables `get` returns (`std::env::var_os` in the binary).
pub fn parse(get: &impl Fn(&str) -> Option<OsString>) -> Result<Operation, EnvError> {
    let var = |name: &'static str| -> Result<Option<String>, EnvError> {
        match get(name) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => v
                .into_string()
                .map(Some)
                .map_err(|value| EnvError::NotUnicode { var: name, value }),
        }
    };
    let command = var("CNI_COMMAND")?.ok_or(EnvError::Missing {
        var: "CNI_COMMAND",
        command: "every operation",
    })?;
    let command: &'static str = match command.as_str() {
        "ADD" => "ADD",
        "DEL" => "DEL",
        "CHECK" => "CHECK",
        "STATUS" => return Ok(Operation::Status),
        "GC" => return Ok(Operation::Gc),
        "VERSION" => return Ok(Operation::Version),
        _ => return Err(EnvError::UnknownCommand(command)),
    };
    let required = |name: &'static str| -> Result<String, EnvError> {
        var(name)?.ok_or(EnvError::Missing { var: name, command })
    };

    let container_id = required("CNI_CONTAINERID")?;
    validate_container_id(&container_id)?;
    let ifname = required("CNI_IFNAME")?;
    validate_ifname(&ifname)?;
    let raw_args = var("CNI_ARGS")?;
    let raw_args = raw_args.as_deref().unwrap_or("");
    // DEL uses neither IP nor MAC: a value it could not use must not keep it from
    // succeeding.
    let args = parse_args_with(raw_args, command != "DEL")?;

    if command == "DEL" {
        return Ok(Operation::Del(Detachment {
            container_id,
            netns: var("CNI_NETNS")?.map(PathBuf::from),
            ifname,
            args,
        }));
    }
    let attachment = Attachment {
        container_id,
        netns: PathBuf::from(required("CNI_NETNS")?),
        ifname,
        args,
    };
    Ok(if command == "ADD" {
        Operation::Add(attachment)
    } else {
        Operation::Check(attachment)
    })
}

/// The spec's container id syntax: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
pub fn validate_container_id(id: &str) -> Result<(), EnvError> {
    let mut bytes = id.bytes();
    let valid = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(EnvError::InvalidContainerId(id.to_owned()))
    }
}

/// A valid Linux interface name: 1 to 15 bytes, not `.` or `..`, without `/`, `:` or
/// whitespace.
pub fn validate_ifname(name: &str) -> Result<(), EnvError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 15 {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not interface names")
    } else if name.contains(['/', ':']) {
        Some("it contains '/' or ':'")
    } else if name.chars().any(char::is_whitespace) {
        Some("it contains whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(EnvError::InvalidIfname {
            value: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`. Keys other than the ones this plugin
/// knows are an error unless `IgnoreUnknown` is true, as libcni's `LoadArgs` does.
/// With `addressing` false (DEL), `IP` and `MAC` are accepted as known keys but not read.
pub fn parse_args_with(args: &str, addressing: bool) -> Result<CniArgs, EnvError> {
    let mut pairs = Vec::new();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.contains('=') => pairs.push((k, v)),
            _ => {
                return Err(EnvError::InvalidArgsPair {
                    pair: pair.to_owned(),
                });
            }
        }
    }
    let mut ignore_unknown = false;
    for (k, v) in &pairs {
        if *k == "IgnoreUnknown" {
            ignore_unknown = match v.to_ascii_lowercase().as_str() {
                "1" | "true" => true,
                "0" | "false" => false,
                _ => return Err(EnvError::InvalidIgnoreUnknown((*v).to_owned())),
            };
        }
    }
    let mut out = CniArgs::default();
    let mut unknown = Vec::new();
    for (k, v) in pairs {
        match k {
            "K8S_POD_NAMESPACE" => out.pod_namespace = Some(v.to_owned()),
            "K8S_POD_NAME" => out.pod_name = Some(v.to_owned()),
            "IP" | "MAC" if !addressing => {}
            "IP" => {
                out.ips = v
                    .split(',')
                    .map(|ip| crate::config::parse_ip(ip.trim()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| EnvError::InvalidArg {
                        key: "IP",
                        value: v.to_owned(),
                        problem: "expected IP addresses, with or without a prefix length, separated by commas",
                    })?;
            }
            "MAC" => {
                out.mac =
                    Some(
                        crate::config::unicast_mac(v).ok_or_else(|| EnvError::InvalidArg {
                            key: "MAC",
                            value: v.to_owned(),
                            problem: "expected a unicast MAC address such as 02:42:ac:11:00:02",
                        })?,
                    );
            }
            "IgnoreUnknown" | "K8S_POD_INFRA_CONTAINER_ID" | "K8S_POD_UID" => {}
            _ if ignore_unknown => {}
            _ => unknown.push(k.to_owned()),
        }
    }
    if unknown.is_empty() {
        Ok(out)
    } else {
        Err(EnvError::UnknownArgs(unknown))
    }
}

/// `CNI_ARGS` as ADD reads them (the tests' shorthand).
#[cfg(test)]
pub fn parse_args(args: &str) -> Result<CniArgs, EnvError> {
    parse_args_with(args, true)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn parse_vars(vars: &[(&str, &str)]) -> Result<Operation, EnvError> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        parse(&|k| map.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-1.2_3"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    fn without(
        vars: &[(&'static str, &'static str)],
        var: &str,
    ) -> Vec<(&'static str, &'static str)> {
        vars.iter().filter(|(k, _)| *k != var).copied().collect()
    }

    fn with(
        vars: &[(&'static str, &'static str)],
        var: &'static str,
        value: &'static str,
    ) -> Vec<(&'static str, &'static str)> {
        let mut v = without(vars, var);
        v.push((var, value));
        v
    }

    #[test]
    fn add_is_parsed() {
        let op = parse_vars(&with(
            ADD,
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;FOO=bar",
        ));
        assert_eq!(
            op,
            Ok(Operation::Add(Attachment {
                container_id: "abc-1.2_3".into(),
                netns: "/run/netns/x".into(),
                ifname: "eth0".into(),
                args: CniArgs {
                    pod_namespace: Some("ns".into()),
                    pod_name: Some("p".into()),
                    ..CniArgs::default()
                },
            }))
        );
    }

    #[test]
    fn commands_without_a_container_need_nothing_else() {
        assert_eq!(
            parse_vars(&[("CNI_COMMAND", "VERSION")]),
            Ok(Operation::Version)
        );
        assert_eq!(
            parse_vars(&[("CNI_COMMAND", "STATUS")]),
            Ok(Operation::Status)
        );
        assert_eq!(parse_vars(&[("CNI_COMMAND", "GC")]), Ok(Operation::Gc));
    }

    #[test]
    fn command_errors_name_the_variable_and_value() {
        let e = parse_vars(&[]).unwrap_err();
        assert!(e.to_string().starts_with("CNI_COMMAND is not set"), "{e}");
        let e = parse_vars(&with(ADD, "CNI_COMMAND", "add")).unwrap_err();
        assert_eq!(e, EnvError::UnknownCommand("add".into()));
        assert!(e.to_string().contains("CNI_COMMAND=\"add\""), "{e}");
    }

    #[test]
    fn add_needs_container_netns_and_ifname() {
        for var in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let e = parse_vars(&without(ADD, var)).unwrap_err();
            assert!(
                matches!(e, EnvError::Missing { var: v, command: "ADD" } if v == var),
                "{e:?}"
            );
            assert!(
                e.to_string().starts_with(&format!("{var} is not set")),
                "{e}"
            );
            // Empty is the same as unset.
            let e = parse_vars(&with(ADD, var, "")).unwrap_err();
            assert!(matches!(e, EnvError::Missing { .. }), "{e:?}");
        }
    }

    #[test]
    fn del_does_not_need_the_netns() {
        let op = parse_vars(&with(&without(ADD, "CNI_NETNS"), "CNI_COMMAND", "DEL")).unwrap();
        assert!(
            matches!(op, Operation::Del(Detachment { netns: None, .. })),
            "{op:?}"
        );
        let e = parse_vars(&with(&without(ADD, "CNI_IFNAME"), "CNI_COMMAND", "DEL")).unwrap_err();
        assert!(
            matches!(
                e,
                EnvError::Missing {
                    var: "CNI_IFNAME",
                    command: "DEL"
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn container_ids_follow_the_spec() {
        for ok in ["a", "0", "abc-DEF_1.2", "7f3a"] {
            assert_eq!(validate_container_id(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-a", ".a", "_a", "a/b", "a b", "a;b", "é"] {
            assert!(validate_container_id(bad).is_err(), "{bad}");
        }
        let e = parse_vars(&with(ADD, "CNI_CONTAINERID", "a/b")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("CNI_CONTAINERID=\"a/b\" is invalid"),
            "{e}"
        );
    }

    #[test]
    fn ifnames_follow_linux() {
        for ok in ["eth0", "a", "net-1.2", "x23456789012345"] {
            assert_eq!(validate_ifname(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "x234567890123456",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad}");
        }
        let e = parse_vars(&with(ADD, "CNI_IFNAME", "averyveryverylongname")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "CNI_IFNAME=\"averyveryverylongname\" is invalid: it is longer than 15 bytes"
        );
    }

    #[test]
    fn args_follow_libcni() {
        assert_eq!(parse_args(""), Ok(CniArgs::default()));
        assert_eq!(
            parse_args("K8S_POD_NAME=p;K8S_POD_UID=u;"),
            Ok(CniArgs {
                pod_name: Some("p".into()),
                ..CniArgs::default()
            })
        );
        // Unknown keys are an error unless IgnoreUnknown is true, wherever it is.
        assert_eq!(
            parse_args("FOO=1;K8S_POD_NAME=p"),
            Err(EnvError::UnknownArgs(vec!["FOO".into()]))
        );
        assert!(parse_args("FOO=1;IgnoreUnknown=true").is_ok());
        assert!(parse_args("FOO=1;IgnoreUnknown=0").is_err());
        assert_eq!(
            parse_args("IgnoreUnknown=maybe"),
            Err(EnvError::InvalidIgnoreUnknown("maybe".into()))
        );
        for bad in ["FOO", "=x", "A=b=c"] {
            assert_eq!(
                parse_args(bad),
                Err(EnvError::InvalidArgsPair { pair: bad.into() }),
                "{bad}"
            );
        }
        let e = parse_args("K8S_POD_NAME=p;oops").unwrap_err();
        assert_eq!(e.to_string(), "CNI_ARGS: \"oops\" is not a KEY=VALUE pair");
    }

    /// CRI-O (cri-o/ocicni pkg/ocicni/ocicni.go, `buildCNIRuntimeConf`) and podman 4
    /// (containers/common libnetwork/cni/run.go, `getRuntimeConfig`) pass a static address
    /// and MAC as `IP` and `MAC` in CNI_ARGS, with IgnoreUnknown=1: neither is dropped.
    #[test]
    fn ip_and_mac_args_are_read() {
        let args = parse_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=abc;IP=10.1.0.5;MAC=02:42:ac:11:00:02",
        )
        .unwrap();
        assert_eq!(
            args.ips,
            vec!["10.1.0.5".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(
            args.mac,
            Some(hypha_api::MacAddr([0x02, 0x42, 0xac, 0x11, 0, 2]))
        );
        // host-local and static take several, comma-separated, with or without a length.
        let args = parse_args("IP=10.1.0.5/24,fd00::5").unwrap();
        assert_eq!(args.ips.len(), 2);
    }

    #[test]
    fn del_does_not_read_ip_or_mac() {
        let del = with(&with(ADD, "CNI_COMMAND", "DEL"), "CNI_ARGS", "IP=x;MAC=y");
        assert!(
            matches!(parse_vars(&del), Ok(Operation::Del(Detachment { ref args, .. })) if args.ips.is_empty() && args.mac.is_none()),
            "{:?}",
            parse_vars(&del)
        );
        let add = with(ADD, "CNI_ARGS", "IP=x");
        assert!(parse_vars(&add).is_err());
    }

    #[test]
    fn bad_ip_and_mac_args_are_refused_by_key() {
        for (args, key) in [
            ("IgnoreUnknown=1;IP=10.1.0.300", "IP"),
            ("IP=", "IP"),
            ("IP=10.1.0.5,", "IP"),
            ("IgnoreUnknown=1;MAC=zz", "MAC"),
            ("MAC=01:00:5e:00:00:01", "MAC"),
        ] {
            let e = parse_args(args).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("CNI_ARGS: {key}=")),
                "{args}: {e}"
            );
        }
    }

    #[test]
    fn non_utf8_is_reported() {
        use std::os::unix::ffi::OsStringExt;
        let e = parse(&|k| match k {
            "CNI_COMMAND" => Some(OsString::from("ADD")),
            "CNI_CONTAINERID" => Some(OsString::from_vec(vec![0xff])),
            _ => None,
        })
        .unwrap_err();
        assert!(
            matches!(
                e,
                EnvError::NotUnicode {
                    var: "CNI_CONTAINERID",
                    ..
                }
            ),
            "{e:?}"
        );
    }
}
