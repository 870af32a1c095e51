//! The "many policies" case of `cargo xtask bench policy`: 10,000 NetworkPolicies over
//! 100 namespaces, with 250 endpoints on the node (issue 10).
//!
//! Pods: the client and the server of the main case (namespace `default`), and pod `i`
//! of the others in namespace `ns<i % namespaces>` labelled `app: a<i / namespaces % 3>`,
//! so each namespace holds a few pods of different apps. Policies: policy `j` of a
//! namespace selects `app: a<j % 3>` and allows ingress from `app: a<(j + 1) % 3>` of
//! its namespace on TCP port `1000 + j`: each selects a pod or so and names its peers by
//! label. Measured, in this order:
//! - the full apply: `hypha policy apply -f DIR` of the 10,000 (one file per namespace),
//!   until it returns (target < 2 s);
//! - one policy changed on top: the main case's probe policy flipped between allowing
//!   and not allowing the client, timed as the main case times it (until new
//!   connections see the new verdict), but from the start of `hypha policy apply`, the
//!   API call, since with 10,000 policies the call itself is what costs (target p99 <
//!   20 ms); the time from the call returning is reported too;
//! - one more pod's CNI ADD (namespace `ns0`, an existing label set) with the set in force;
//! - the agent's RSS (`VmRSS` of /proc/PID/status; target < 200 MB).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::super::Target;
use super::super::setups::{self, CniCall, Plan, Pods};
use super::super::teardown::{Teardown, Undo};
use super::{Enforcement, PROBE_POLICY, PROBE_PORT, ProbeServer, Prober, enforcement, hypha};

/// Full apply of the set, at most.
const TARGET_APPLY_MS: f64 = 2_000.0;
/// One policy changed on top, enforced within, p99.
const TARGET_ENFORCE_P99_MS: f64 = 20.0;
/// The agent's RSS, at most.
const TARGET_RSS_MB: f64 = 200.0;
/// Apps per namespace.
const APPS: usize = 3;

#[derive(Serialize)]
pub struct Many {
    pub policies: usize,
    pub namespaces: usize,
    /// Endpoints on the node while measuring (client and server included).
    pub endpoints: usize,
    /// Creating the extra pods, one ADD after the other.
    pub pods_ms: Option<f64>,
    pub apply_ms: Option<f64>,
    pub enforcement: Option<Enforcement>,
    /// One more pod's ADD with the set in force.
    pub add_ms: Option<f64>,
    pub agent_rss_mb: Option<f64>,
    pub errors: Vec<String>,
}

/// Runs the case on the Hypha setup `pods` (with no other policy in force).
pub fn run(
    plan: &Plan,
    td: &Teardown,
    pods: &Pods,
    policies: usize,
    namespaces: usize,
    endpoints: usize,
    changes: u32,
) -> Many {
    let mut m = Many {
        policies,
        namespaces,
        endpoints,
        pods_ms: None,
        apply_ms: None,
        enforcement: None,
        add_ms: None,
        agent_rss_mb: None,
        errors: Vec::new(),
    };
    println!(
        "==> many policies: {policies} NetworkPolicies over {namespaces} namespaces, {endpoints} endpoints"
    );
    let extra = endpoints.saturating_sub(2);
    let start = Instant::now();
    for i in 0..extra {
        let ns = format!("ns{}", i % namespaces);
        let app = format!("a{}", i / namespaces % APPS);
        if let Err(e) = add_pod(plan, td, pods, &format!("m{i}"), &ns, &app) {
            m.errors.push(format!("creating pod {i} of {extra}: {e:#}"));
            return m;
        }
    }
    m.pods_ms = Some(start.elapsed().as_secs_f64() * 1e3);
    println!(
        "    {extra} more pods in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    let dir = plan.tmp.join("many");
    let written = td.make(Undo::Dir(dir.clone()), || {
        write_policies(&dir, policies, namespaces)
    });
    if let Err(e) = written {
        m.errors.push(format!("writing the policies: {e:#}"));
        return m;
    }
    let Some(dir_str) = dir.to_str() else {
        m.errors.push("a temp path that is not UTF-8".into());
        return m;
    };
    let start = Instant::now();
    match hypha(plan, pods, &["policy", "apply", "-f", dir_str]) {
        Ok(_) => {
            let ms = start.elapsed().as_secs_f64() * 1e3;
            println!("    full apply: {ms:.0} ms");
            m.apply_ms = Some(ms);
        }
        Err(e) => {
            m.errors
                .push(format!("applying {policies} policies: {e:#}"));
            return m;
        }
    }

    match probe_enforcement(plan, pods, policies as u32, changes) {
        Ok(e) => m.enforcement = Some(e),
        Err(e) => m.errors.push(format!("enforcement: {e:#}")),
    }

    let start = Instant::now();
    match add_pod(plan, td, pods, "m-add", "ns0", "a0") {
        Ok(()) => {
            let ms = start.elapsed().as_secs_f64() * 1e3;
            println!("    one more ADD with the set in force: {ms:.1} ms");
            m.add_ms = Some(ms);
        }
        Err(e) => m
            .errors
            .push(format!("the ADD with the set in force: {e:#}")),
    }

    match agent_rss_mb(pods) {
        Ok(mb) => {
            println!("    agent RSS: {mb:.1} MB");
            m.agent_rss_mb = Some(mb);
        }
        Err(e) => m.errors.push(format!("agent RSS: {e:#}")),
    }
    m
}

/// The case's targets.
pub fn targets(m: &Many) -> Vec<Target> {
    let n = m.policies;
    let mut t = vec![Target {
        goal: format!("{n} policies: full apply < {TARGET_APPLY_MS:.0} ms"),
        measured: m.apply_ms.map(|v| format!("{v:.0} ms")),
        pass: m.apply_ms.map(|v| v < TARGET_APPLY_MS),
    }];
    let e = m.enforcement.as_ref();
    t.push(Target {
        goal: format!(
            "{n} policies: one changed on top, API call to enforced, p99 < {TARGET_ENFORCE_P99_MS:.0} ms"
        ),
        measured: e.and_then(|e| {
            e.from_trigger_p99_ms.map(|p| {
                format!(
                    "{p:.1} ms from the call ({} changes, {} never flipped)",
                    e.changes, e.failed
                )
            })
        }),
        pass: e.and_then(|e| {
            e.from_trigger_p99_ms
                .map(|p| p < TARGET_ENFORCE_P99_MS && e.failed == 0)
        }),
    });
    t.push(Target {
        goal: format!("{n} policies: agent RSS < {TARGET_RSS_MB:.0} MB"),
        measured: m.agent_rss_mb.map(|v| format!("{v:.1} MB")),
        pass: m.agent_rss_mb.map(|v| v < TARGET_RSS_MB),
    });
    t
}

/// The lines of the printed table.
pub fn print(m: &Many) {
    let v = |x: Option<f64>, unit: &str| {
        x.map_or_else(|| "n/a".to_owned(), |x| format!("{x:.1} {unit}"))
    };
    println!(
        "Many policies ({} NetworkPolicies, {} namespaces, {} endpoints): full apply {}, one \
         more ADD {}, agent RSS {}",
        m.policies,
        m.namespaces,
        m.endpoints,
        v(m.apply_ms, "ms"),
        v(m.add_ms, "ms"),
        v(m.agent_rss_mb, "MB")
    );
    if let Some(e) = &m.enforcement {
        println!(
            "  one policy changed on top: p99 {} from the API call (the call: p50 {}); from the \
             call returning: p50 {} p99 {} max {} ({} changes, {} never flipped)",
            v(e.from_trigger_p99_ms, "ms"),
            v(e.trigger_p50_ms, "ms"),
            v(e.p50_ms, "ms"),
            v(e.p99_ms, "ms"),
            v(e.max_ms, "ms"),
            e.changes,
            e.failed
        );
    }
}

/// Pod `name` in namespace `ns` with label `app`, through hypha-cni; its DEL and netns
/// are undone at teardown.
fn add_pod(plan: &Plan, td: &Teardown, pods: &Pods, name: &str, ns: &str, app: &str) -> Result<()> {
    let socket = pods
        .agent_socket
        .as_ref()
        .context("the Hypha setup has no agent socket")?;
    let netns = plan.netns(name);
    setups::add_netns(td, &netns)?;
    let config = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "hypha",
        "type": "hypha-cni",
        "agentSocket": socket,
        "args": {"cni": {"labels": [{"key": "app", "value": app}]}},
    });
    let call = CniCall {
        program: vec![
            "env".into(),
            format!("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}").into(),
            "nsenter".into(),
            format!("--net=/run/netns/{}", plan.netns("node")).into(),
            plan.bin.join("hypha-cni").into(),
        ],
        container_id: format!("hypb-{}-{name}", plan.uniq),
        netns,
        config: config.to_string(),
    };
    let result = td.make(Undo::Cni(call.clone()), || call.invoke("ADD"))?;
    setups::first_address(&result).map(drop)
}

/// One file per namespace, `policies / namespaces` policies each.
fn write_policies(dir: &Path, policies: usize, namespaces: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = vec![String::new(); namespaces];
    for j in 0..policies {
        let k = j % namespaces;
        let i = j / namespaces;
        files[k] += &format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: ns{k}}}\nspec:\n  podSelector: {{matchLabels: {{app: a{}}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: a{}}}}}}}]\n    ports: [{{port: {}}}]\n",
            i % APPS,
            (i + 1) % APPS,
            1000 + i
        );
    }
    for (k, text) in files.into_iter().enumerate() {
        let path = dir.join(format!("ns{k:03}.yaml"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The probe policy flipped `changes` times by `hypha policy apply`, as the main case's
/// enforcement measures it.
fn probe_enforcement(plan: &Plan, pods: &Pods, base: u32, changes: u32) -> Result<Enforcement> {
    let server = ProbeServer::start(pods)?;
    let prober = Prober::start(
        pods.client_ns.clone(),
        SocketAddr::from((pods.server_ip, PROBE_PORT)),
    );
    let file = plan.tmp.join("many-probe.yaml");
    let apply = |allow: bool| -> Result<()> {
        std::fs::write(&file, super::probe_policy(PROBE_POLICY, allow))
            .with_context(|| format!("writing {}", file.display()))?;
        let path = file.to_str().context("a temp path that is not UTF-8")?;
        hypha(plan, pods, &["policy", "apply", "-f", path]).map(drop)
    };
    let result = enforcement("apply, many policies", base, changes, &prober, apply)
        .and_then(|e| hypha(plan, pods, &["policy", "delete", PROBE_POLICY]).map(|_| e));
    let mut errors = Vec::new();
    if let Err(e) = prober.stop() {
        errors.push(format!("prober: {e:#}"));
    }
    if let Err(e) = server.stop() {
        errors.push(format!("probe server: {e:#}"));
    }
    match (result, errors.is_empty()) {
        (Ok(e), true) => Ok(e),
        (Ok(_), false) => bail!("{}", errors.join("; ")),
        (Err(e), _) => Err(e.context(errors.join("; "))),
    }
}

/// The agent's RSS: the process whose command line names the setup's socket.
fn agent_rss_mb(pods: &Pods) -> Result<f64> {
    let socket = pods
        .agent_socket
        .as_ref()
        .context("the Hypha setup has no agent socket")?;
    let socket = socket.to_string_lossy();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_agent = args.first().is_some_and(|a| a.ends_with("hypha"))
            && args.get(1).is_some_and(|a| a == "agent")
            && args.iter().any(|a| *a == socket);
        if !is_agent {
            continue;
        }
        let status_path = entry.path().join("status");
        let status = std::fs::read_to_string(&status_path)
            .with_context(|| format!("reading {}", status_path.display()))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmRSS in {}", status_path.display()))?;
        return Ok(kb / 1024.0);
    }
    bail!("no `hypha agent` process with --socket {socket}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_files_hold_the_set_and_each_policy_selects_by_label() {
        let dir = std::env::temp_dir().join(format!("hypha-many-test-{}", std::process::id()));
        write_policies(&dir, 20, 4).unwrap();
        let mut names = Vec::new();
        for k in 0..4 {
            let text = std::fs::read_to_string(dir.join(format!("ns{k:03}.yaml"))).unwrap();
            assert_eq!(text.matches("kind: NetworkPolicy").count(), 5);
            assert!(text.contains(&format!("namespace: ns{k}}}")), "{text}");
            names.extend(
                text.lines()
                    .filter(|l| l.starts_with("metadata"))
                    .map(str::to_owned),
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(names.len(), 20);
        assert!(names[0].contains("name: p0,"), "{}", names[0]);
    }
}
