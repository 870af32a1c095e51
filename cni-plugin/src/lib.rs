//! Hypha's CNI plugin, `hypha-cni`: a thin, typed shell over the CNI protocol.
//!
//! The environment and stdin are parsed into an [`env::Operation`] and a
//! [`config::NetConf`]; each operation lives in `commands/`; every failure is an
//! [`error::Error`] that gets its CNI code in one place (`From<Error> for CniError`);
//! exactly one JSON reply is written on stdout.
//!
//! The library target exists so that other crates (the agent, the integration tests)
//! can compute [`naming::host_ifname`]; the binary only calls [`run`].

mod commands;
mod config;
mod delegate;
mod env;
mod error;
#[cfg(test)]
mod fuzz;
mod json;
pub mod lock;
pub mod naming;
#[cfg(test)]
mod properties;
mod result;

use std::io::{self, IsTerminal, Read, Write};
use std::process::ExitCode;

use serde_json::Value;

use crate::config::CniVersion;
use crate::env::Operation;
use crate::error::{CniError, Error};

/// Runs one CNI invocation of this process: reads `CNI_*` and stdin, writes the reply.
pub fn run() -> ExitCode {
    let stdin = read_stdin();
    let outcome = execute(|name| std::env::var_os(name), &stdin);
    let (reply, code) = match outcome {
        Ok(None) => return ExitCode::SUCCESS,
        Ok(Some(reply)) => (reply, ExitCode::SUCCESS),
        Err(e) => {
            let version = stdin
                .as_deref()
                .ok()
                .and_then(config::version_hint)
                .unwrap_or(CniVersion::LATEST);
            (CniError::from(e).to_json(version), ExitCode::FAILURE)
        }
    };
    let mut out = io::stdout().lock();
    let written = serde_json::to_writer(&mut out, &reply)
        .map_err(io::Error::from)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    if let Err(e) = written {
        eprintln!("hypha-cni: cannot write the reply on stdout: {e}");
        return ExitCode::FAILURE;
    }
    code
}

/// The network configuration; nothing when stdin is a terminal (someone running
/// `CNI_COMMAND=VERSION hypha-cni` by hand), so that the plugin never waits on it.
fn read_stdin() -> io::Result<Vec<u8>> {
    let mut stdin = io::stdin().lock();
    let mut buf = Vec::new();
    if !stdin.is_terminal() {
        stdin.read_to_end(&mut buf)?;
    }
    Ok(buf)
}

/// Parses the invocation and runs it; `Ok(None)` for operations that answer nothing.
fn execute(
    get_env: impl Fn(&str) -> Option<std::ffi::OsString>,
    stdin: &io::Result<Vec<u8>>,
) -> Result<Option<Value>, Error> {
    let op = env::parse(&get_env)?;
    let cni_path = get_env("CNI_PATH");
    let cni_path = cni_path.as_ref();
    let conf = || -> Result<config::NetConf, Error> {
        match stdin {
            Ok(bytes) => Ok(config::parse(bytes)?),
            Err(e) => Err(Error::Stdin(io::Error::new(e.kind(), e.to_string()))),
        }
    };
    match op {
        Operation::Version => {
            let stdin = stdin.as_deref().unwrap_or_default();
            Ok(Some(commands::version::run(stdin)))
        }
        Operation::Gc => commands::gc::run(&conf()?, cni_path).map(|()| None),
        Operation::Add(a) => commands::add::run(&a, &conf()?, cni_path).map(Some),
        Operation::Del(d) => commands::del::run(&d, &conf()?, cni_path).map(|()| None),
        Operation::Check(a) => commands::check::run(&a, &conf()?, cni_path).map(|()| None),
        Operation::Status => commands::status::run(&conf()?, cni_path).map(|()| None),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::ffi::OsString;

    use super::*;

    fn exec(vars: &[(&str, &str)], stdin: &str) -> Result<Option<Value>, CniError> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        execute(|k| map.get(k).cloned(), &Ok(stdin.as_bytes().to_vec())).map_err(CniError::from)
    }

    #[test]
    fn version_answers_without_other_variables() {
        let r = exec(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion": "0.4.0"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(r["cniVersion"], "0.4.0");
        let r = exec(&[("CNI_COMMAND", "VERSION")], "").unwrap().unwrap();
        assert_eq!(r["cniVersion"], "1.1.0");
        assert_eq!(r["supportedVersions"].as_array().map(Vec::len), Some(5));
    }

    #[test]
    fn gc_needs_1_1_and_its_attachments() {
        let e = exec(
            &[("CNI_COMMAND", "GC")],
            r#"{"cniVersion": "1.0.0", "name": "n"}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, 1);
        let e = exec(
            &[("CNI_COMMAND", "GC")],
            r#"{"cniVersion": "1.1.0", "name": "n"}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("cni.dev/valid-attachments"), "{}", e.msg);
        let e = exec(
            &[("CNI_COMMAND", "GC")],
            r#"{"cniVersion": "1.1.0", "name": "n", "cni.dev/valid-attachments": [{"containerID": 1}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("cni.dev/valid-attachments"), "{}", e.msg);
        // disableGC: nothing to do, nothing to reach.
        assert_eq!(
            exec(
                &[("CNI_COMMAND", "GC")],
                r#"{"cniVersion": "1.1.0", "name": "n", "disableGC": true, "agentSocket": "/nonexistent"}"#,
            ),
            Ok(None)
        );
    }

    #[test]
    fn status_and_check_need_recent_versions() {
        let e = exec(
            &[("CNI_COMMAND", "STATUS")],
            r#"{"cniVersion": "1.0.0", "name": "n"}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, 1);
        let check = [
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/nonexistent"),
            ("CNI_IFNAME", "eth0"),
        ];
        let e = exec(&check, r#"{"cniVersion": "0.3.1", "name": "n"}"#).unwrap_err();
        assert_eq!(e.code, 1);
        let e = exec(&check, r#"{"cniVersion": "1.0.0", "name": "n"}"#).unwrap_err();
        assert_eq!((e.code, e.msg.contains("prevResult")), (7, true), "{e:?}");
    }

    #[test]
    fn stdin_errors_come_before_any_work() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/nonexistent"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert_eq!(exec(&add, "{").unwrap_err().code, 6);
        assert_eq!(
            exec(&add, r#"{"cniVersion": "0.1.0", "name": "n"}"#)
                .unwrap_err()
                .code,
            1
        );
        let e = exec(&add, r#"{"cniVersion": "1.0.0", "name": "n"}"#).unwrap_err();
        assert_eq!(e.code, 4);
        assert_eq!(e.msg, "CNI_NETNS=/nonexistent does not exist");
    }
}
