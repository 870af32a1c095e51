//! STATUS: whether the plugin could serve an ADD now, that is whether the agent answers.

use hypha_api::Client;

use crate::config::{CniVersion, NetConf};
use crate::error::Error;

pub fn run(conf: &NetConf) -> Result<(), Error> {
    if conf.cni_version < CniVersion::V1_1_0 {
        return Err(Error::VersionTooOld {
            command: "STATUS",
            version: conf.cni_version,
            min: CniVersion::V1_1_0,
        });
    }
    let client =
        Client::new(&conf.agent_socket).map_err(|e| Error::AgentNotAvailable(Box::new(e)))?;
    client
        .status()
        .map_err(|e| Error::AgentNotAvailable(Box::new(e)))?;
    Ok(())
}
