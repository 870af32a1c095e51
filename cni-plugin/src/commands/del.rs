//! DEL: idempotent, best-effort teardown. Every step runs even when an earlier one failed,
//! and what is already gone counts as done.

use hypha_api::Client;
use hypha_netlink::Netlink;

use crate::config::NetConf;
use crate::env::Detachment;
use crate::error::{self, Error};
use crate::naming;

pub fn run(d: &Detachment, conf: &NetConf) -> Result<(), Error> {
    let mut errors = Vec::new();

    // Deleting the host end removes the pair, wherever the container end is, so the
    // container's namespace (perhaps gone already) is not needed.
    let host_ifname = naming::host_ifname(&d.container_id, &d.ifname);
    if let Err(e) = Netlink::new().and_then(|mut nl| nl.delete_link_by_name(&host_ifname)) {
        errors.push(Error::Netlink(e));
    }

    // Releases the address and the endpoint's datapath state; absent is success.
    let released = Client::new(&conf.agent_socket)
        .and_then(|client| client.delete_endpoint(&d.container_id, &d.ifname));
    if let Err(e) = released {
        errors.push(error::agent(e));
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::Teardown(errors))
    }
}
