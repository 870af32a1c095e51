//! GC: removes everything that belongs to no valid attachment, continuing past errors
//! and reporting them all.
//!
//! 1. Host veths named like this plugin's (`hyp` + 12 hex digits) whose name derives from
//!    no valid attachment: the leftovers of ADDs killed before the agent knew of them.
//! 2. The agent's endpoints, map entries, host veths and address reservations of every
//!    other attachment (`POST /v1/gc`).
//! 3. The delegated IPAM plugin: its GC if it speaks 1.1.0; otherwise its DEL for each
//!    attachment the agent removed.

use std::collections::BTreeSet;
use std::ffi::OsString;

use hypha_api::GcRequest;
use hypha_netlink::Netlink;

use crate::config::{CniVersion, ConfigError, NetConf};
use crate::delegate::Ipam;
use crate::error::{self, Error};
use crate::naming;

pub fn run(conf: &NetConf, cni_path: Option<&OsString>) -> Result<(), Error> {
    if conf.cni_version < CniVersion::V1_1_0 {
        return Err(Error::VersionTooOld {
            command: "GC",
            version: conf.cni_version,
            min: CniVersion::V1_1_0,
        });
    }
    if conf.disable_gc {
        return Ok(());
    }
    let valid = conf
        .valid_attachments
        .as_ref()
        .ok_or(Error::Config(ConfigError::Missing(
            "cni.dev/valid-attachments",
        )))?;
    let mut errors = Vec::new();
    let ipam = match Ipam::of(conf, cni_path) {
        Ok(ipam) => ipam,
        Err(e) => {
            errors.push(e);
            None
        }
    };

    let keep: BTreeSet<String> = valid
        .iter()
        .map(|a| naming::host_ifname(&a.container_id, &a.ifname))
        .collect();
    if let Err(e) = remove_stray_veths(&keep) {
        errors.extend(e);
    }

    let removed = conf
        .client()
        .and_then(|client| {
            client.gc(&GcRequest {
                valid_attachments: valid.clone(),
            })
        })
        .map_err(error::agent);
    let removed = match removed {
        Ok(resp) => {
            errors.extend(resp.errors.into_iter().map(Error::GcAgent));
            resp.removed
        }
        Err(e) => {
            errors.push(e);
            Vec::new()
        }
    };

    if let Some(ipam) = ipam {
        match ipam.gc() {
            Ok(true) => {}
            Ok(false) => {
                for a in &removed {
                    if let Err(e) = ipam.del_attachment(&a.container_id, &a.ifname) {
                        errors.push(e);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::Teardown(errors))
    }
}

/// Deletes every host veth that looks like this plugin's and is not in `keep`.
fn remove_stray_veths(keep: &BTreeSet<String>) -> Result<(), Vec<Error>> {
    let mut nl = Netlink::new().map_err(|e| vec![Error::Netlink(e)])?;
    let links = nl.links().map_err(|e| vec![Error::Netlink(e)])?;
    let errors: Vec<Error> = links
        .iter()
        .filter(|l| l.kind.as_deref() == Some("veth") && naming::is_host_ifname(&l.name))
        .filter(|l| !keep.contains(&l.name))
        .filter_map(|l| nl.delete_link_by_name(&l.name).err().map(Error::Netlink))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}
