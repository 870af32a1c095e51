//! The eBPF programs' trace lines (`hypha endpoint debug ENDPOINT on`), read from aya-log's
//! ring buffer and written to the agent's log.
//!
//! The programs log numbers where a name would cost them a copy of variable length (drop
//! reasons); [`annotate`] adds the names here.

use hypha_common::DropReason;

/// The target of the lines in the agent's log (`RUST_LOG=hypha::datapath=off` hides them).
pub const TARGET: &str = "hypha::datapath";

/// Receives aya-log's records and writes them to the agent's log at info level: they
/// exist only because an operator turned tracing on for an endpoint, so they are shown
/// without a change of log level.
#[derive(Clone, Copy, Debug, Default)]
pub struct DatapathLog;

impl log::Log for DatapathLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = annotate(&record.args().to_string());
        tracing::info!(target: TARGET, "datapath: {line}");
    }

    fn flush(&self) {}
}

/// `reason N` becomes `reason N (name)` for a known drop reason.
pub fn annotate(line: &str) -> String {
    const WORD: &str = "reason ";
    let mut out = String::with_capacity(line.len() + 24);
    let mut rest = line;
    while let Some(at) = rest.find(WORD) {
        let after = at + WORD.len();
        let digits = rest[after..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len() - after);
        out.push_str(&rest[..after + digits]);
        if let Some(reason) = rest[after..after + digits]
            .parse::<u16>()
            .ok()
            .and_then(DropReason::from_u16)
        {
            out.push_str(&format!(" ({})", reason.name()));
        }
        rest = &rest[after + digits..];
    }
    out.push_str(rest);
    out
}

/// Drains the programs' log ring buffer into the agent's log whenever it has records,
/// until the agent stops.
pub async fn pump(logger: aya_log::EbpfLogger<DatapathLog>) {
    // SAFETY: the logger owns its ring buffer's map fd for as long as it lives, and it
    // lives inside the `AsyncFd` until the end of this function; `as_raw_fd` always
    // returns that fd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(
                "cannot watch the datapath's log ring buffer: {e}; endpoint tracing will be silent"
            );
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                tracing::warn!(
                    "the datapath's log ring buffer failed: {e}; endpoint tracing stops"
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_get_their_names() {
        assert_eq!(
            annotate("endpoint 3 tx verdict: dropped, reason 8, policy 0 of endpoint 0"),
            "endpoint 3 tx verdict: dropped, reason 8 (spoofed-source), policy 0 of endpoint 0"
        );
        assert_eq!(
            annotate("endpoint 3 rx verdict: dropped, reason 6"),
            "endpoint 3 rx verdict: dropped, reason 6 (policy-denied)"
        );
        // Unknown codes and other text pass as they are.
        assert_eq!(annotate("reason 999 x"), "reason 999 x");
        assert_eq!(annotate("no reasons here"), "no reasons here");
        assert_eq!(annotate("reason "), "reason ");
    }
}
