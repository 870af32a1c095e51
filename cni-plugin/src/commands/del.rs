//! DEL: idempotent, best-effort teardown. Every step runs even when an earlier one failed,
//! and what is already gone counts as done. Neither the container's namespace nor
//! `prevResult` is needed: the host end's name derives from the attachment, and deleting
//! it removes the pair wherever the container end is.
//!
//! When the agent does not complete the delete (nothing listens, no answer within
//! `agentTimeout`, the connection closed before the whole answer, a 5xx), the delete is
//! left for it as a file in [`hypha_api::deferred_deletes_dir`] and DEL succeeds: the agent
//! finishes it (endpoint, map entries, address) when it is back. Only an answer refusing
//! the request itself (4xx: nothing the agent could do later) fails DEL, and so does an
//! ADD or CHECK of the same attachment holding its lock ([`crate::lock`]) for all of
//! `agentTimeout` (11, try again later: the runtime's retry finds it free).

use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use hypha_netlink::Netlink;

use crate::config::NetConf;
use crate::delegate::Ipam;
use crate::env::Detachment;
use crate::error::{self, Error};
use crate::lock::AttachmentLock;
use crate::naming;

pub fn run(d: &Detachment, conf: &NetConf, cni_path: Option<&OsString>) -> Result<(), Error> {
    let mut errors = Vec::new();
    // Not while an ADD or CHECK of this attachment is halfway; the file goes at the end.
    // One held too long fails DEL (the runtime retries); a lock that cannot be made at
    // all is reported but does not stop the teardown.
    let lock = match AttachmentLock::acquire(
        &conf.agent_socket,
        &d.container_id,
        &d.ifname,
        conf.agent_timeout,
    ) {
        Ok(lock) => lock,
        Err(e @ Error::Busy { .. }) => return Err(e),
        Err(e) => {
            errors.push(e);
            None
        }
    };

    // The delegated plugin releases what it gave, whatever happens to the rest.
    match Ipam::of(conf, cni_path) {
        Ok(Some(ipam)) => {
            if let Err(e) = ipam.del() {
                errors.push(e);
            }
        }
        Ok(None) => {}
        Err(e) => errors.push(e),
    }

    let host_ifname = naming::host_ifname(&d.container_id, &d.ifname);
    if let Err(e) = Netlink::new().and_then(|mut nl| nl.delete_link_by_name(&host_ifname)) {
        errors.push(Error::Netlink(e));
    }

    // The endpoint, its datapath state and its address; absent is success. Unless the
    // agent answered that the request itself is wrong (4xx), a failure is left for it.
    let released = conf
        .client()
        .and_then(|client| client.delete_endpoint(&d.container_id, &d.ifname));
    match released {
        Ok(_) => {}
        Err(e) if error::is_refusal(&e) => errors.push(error::agent(e)),
        Err(e) => {
            if let Err(e) = defer_after(&e, &conf.agent_socket, &d.container_id, &d.ifname) {
                errors.push(e);
            }
        }
    }

    if let Some(lock) = lock
        && let Err(e) = lock.remove()
    {
        errors.push(e);
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::Teardown(errors))
    }
}

/// [`defer`], after the call to the agent failed with `why`, which goes to stderr (the
/// runtime's log) with where the record is: the reply itself is a success.
pub fn defer_after(
    why: &hypha_api::ClientError,
    socket: &Path,
    container_id: &str,
    ifname: &str,
) -> Result<(), Error> {
    match defer(socket, container_id, ifname)? {
        Some(path) => eprintln!(
            "hypha-cni: {why}; the delete of {container_id}/{ifname} is left for the agent in {}",
            path.display()
        ),
        None => eprintln!(
            "hypha-cni: {why}; no agent ever ran at {} (its directory is missing), nothing left for one",
            socket.display()
        ),
    }
    Ok(())
}

/// Leaves the delete of (`container_id`, `ifname`) for the agent at `socket`: one
/// `hypha_api::Attachment` as JSON, written aside and renamed into place so the agent
/// never reads half a file, named after the attachment so that repeated DELs overwrite
/// each other. Returns where, or `None` when the socket's directory does not exist: no
/// agent ever ran there (it makes that directory to listen), or it went with a reboot,
/// after which the agent finds the vanished veths itself; no directory is made for it.
pub fn defer(socket: &Path, container_id: &str, ifname: &str) -> Result<Option<PathBuf>, Error> {
    let dir = hypha_api::deferred_deletes_dir(socket);
    if !dir.parent().is_some_and(Path::is_dir) {
        return Ok(None);
    }
    let name = naming::attachment_digest(container_id, ifname);
    let path = dir.join(format!("{name}.json"));
    // Per process, so that concurrent DELs of one attachment do not write one file.
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    let fail = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::DeferredDelete { path, source }
    };
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(fail(&dir)(e)),
        _ => {}
    }
    let body = serde_json::to_vec(&hypha_api::Attachment {
        container_id: container_id.to_owned(),
        ifname: ifname.to_owned(),
    })
    .expect("an attachment serializes");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&body).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(&tmp)(e));
    }
    std::fs::rename(&tmp, &path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail(&path)(e)
    })?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_deletes_are_whole_files_named_after_the_attachment() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/agent.sock");
        // No agent ever ran there: nothing to leave, and no directory made.
        assert_eq!(defer(&socket, "c1", "eth0").unwrap(), None);
        assert!(!dir.path().join("run").exists());
        std::fs::create_dir(dir.path().join("run")).unwrap();
        let a = defer(&socket, "c1", "eth0").unwrap().unwrap();
        let again = defer(&socket, "c1", "eth0").unwrap().unwrap();
        assert_eq!(a, again, "repeats overwrite");
        let b = defer(&socket, "c1", "eth1").unwrap().unwrap();
        assert_ne!(a, b);
        assert_eq!(
            a.parent(),
            Some(hypha_api::deferred_deletes_dir(&socket).as_path())
        );
        let files: Vec<_> = std::fs::read_dir(a.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files.len(), 2, "no temporary file left: {files:?}");
        let read: hypha_api::Attachment =
            serde_json::from_slice(&std::fs::read(&a).unwrap()).unwrap();
        assert_eq!(
            read,
            hypha_api::Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }
        );
    }

    #[test]
    fn a_deferred_delete_that_cannot_be_written_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        // Something that is not a directory where the records go.
        std::fs::write(hypha_api::deferred_deletes_dir(&socket), b"").unwrap();
        let e = defer(&socket, "c", "eth0").unwrap_err();
        assert!(e.to_string().contains("agent.sock.deferred"), "{e}");
    }
}
