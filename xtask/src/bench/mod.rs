//! `cargo xtask bench`: measurements side by side with their baselines, in one run on
//! this machine, written under `target/bench/`.
//!
//! - `attach`: the cost of attaching an endpoint's programs, method by method.
//! - `cluster`: cross-node pod traffic between two simulated nodes: the underlay itself, a
//!   Flannel-style kernel VXLAN overlay, and Hypha's tunnel (driven by hypha-tests'
//!   `overlay-bench`).
//! - `cluster-control`: the cluster control plane over etcd: convergence of pods and
//!   policies to every node, concurrent identity allocation, and a synthetic cluster's
//!   full sync, memory and churn lag (driven by hypha-tests' `cluster-bench`).
//! - `cni`: CNI ADD/DEL latency, sequential and in concurrent bursts: hypha-cni, bridge.
//! - `datapath`: pod-to-pod throughput and latency: veth pair, bridge plugin, Hypha.
//! - `policy`: throughput and latency under 0 to 10,000 rules, Hypha and iptables, and
//!   the time until a policy change is enforced.
//! - `services`: service load balancing at 100 to 10,000 services, Hypha against
//!   kube-proxy's iptables design: new connections to VIPs, throughput through a VIP,
//!   programming and change times.
//!
//! [`svg`] draws bar charts any bench can use; [`teardown`] undoes what a bench made,
//! also on error and Ctrl-C.

mod attach;
mod bandwidth;
mod cluster;
mod cni;
mod datapath;
mod launcher;
pub(crate) mod measure;
mod overlay;
mod policy;
mod services;
mod setups;
mod svg;
pub(crate) mod teardown;

use anyhow::Result;

#[derive(clap::Subcommand)]
pub enum Bench {
    /// What attaching an endpoint's programs costs, method by method: TCX, legacy tc
    /// (clsact + cls_bpf), link and filter replacement, moving a pre-made veth's peer.
    Attach(attach::Options),
    /// Per-pod egress rate limits at 10, 100 and 1000 Mbit/s: Hypha against the reference
    /// bandwidth plugin chained after bridge; rate, first second, retransmits, latency
    /// under load.
    Bandwidth(bandwidth::Options),
    /// Cross-node pod traffic between two simulated nodes: TCP throughput (1 and 4
    /// streams), 1-byte request/response latency and CPU per Gbit/s over (a) the underlay
    /// itself, (b) a Flannel-style kernel VXLAN overlay and (c) Hypha's tunnel.
    Cluster(overlay::Options),
    /// The cluster control plane over etcd: pods and policies reaching 5 nodes, 5 × 20
    /// concurrent identity allocations, and 1,000 synthetic nodes with 50,000 endpoints:
    /// one agent's full sync, RSS and maps, and its lag under 1,000 endpoint changes a
    /// second.
    ClusterControl(cluster::Options),
    /// CNI ADD and DEL latency, sequential and in bursts of 10 and 30 concurrent ADDs:
    /// hypha-cni against the reference bridge + host-local plugins.
    Cni(cni::Options),
    /// Pod-to-pod TCP throughput and 1-byte request/response latency: a bare veth pair
    /// (the physical limit), the reference bridge CNI plugin, and Hypha.
    Datapath(datapath::Options),
    /// Container start to exit of `/bin/true`: `hypha run` with and without networking,
    /// crun, runc, and `unshare` as the floor; `hypha run --image` beside crun and runc on
    /// the same layers and podman on the same image; image import throughput beside
    /// `podman load`.
    Launcher(launcher::Options),
    /// Pod-to-pod throughput and latency with 0 to 10,000 rules selecting the server:
    /// Hypha's policy map against iptables rules in the pod; and the time from `hypha
    /// policy apply` (or a file in the watched directory) until the verdict is enforced.
    Policy(policy::Options),
    /// Service load balancing at 100, 1,000 and 10,000 services of 3 backends: Hypha
    /// against kube-proxy's iptables design (nat table, statistic, DNAT, conntrack):
    /// new-connection latency to random VIPs, throughput through a VIP and direct, the
    /// time to program all services and one change.
    Services(services::Options),
}

impl Bench {
    /// Whether the bench was given binaries of its own (`--bin-dir`), so that the release
    /// build can be skipped.
    pub fn own_binaries(&self) -> bool {
        match self {
            Bench::Bandwidth(o) => o.has_bin_dir(),
            Bench::Launcher(o) => o.has_bin_dir(),
            _ => false,
        }
    }
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Attach(o) => attach::run(&o),
        Bench::Bandwidth(o) => bandwidth::run(&o),
        Bench::Cluster(o) => overlay::run_bench(&o),
        Bench::ClusterControl(o) => cluster::run_bench(&o),
        Bench::Cni(o) => cni::run(&o),
        Bench::Datapath(o) => datapath::run(&o),
        Bench::Launcher(o) => launcher::run(&o),
        Bench::Policy(o) => policy::run(&o),
        Bench::Services(o) => services::run(&o),
    }
}

/// The median of some values (the mean of the middle two for an even count).
/// One of an issue's benchmark targets, as measured: printed after the table and written
/// to the JSON.
#[derive(serde::Serialize)]
struct Target {
    goal: String,
    /// What was measured, in words; `None` when it could not be.
    measured: Option<String>,
    /// `None` when it could not be measured.
    pass: Option<bool>,
}

/// Prints the targets as aligned `goal  measured  PASS|SHORT` lines under `title`.
fn print_targets(title: &str, targets: &[Target]) {
    let measured = |t: &Target| t.measured.clone().unwrap_or_else(|| "not measured".into());
    let goal_width = targets
        .iter()
        .map(|t| t.goal.chars().count())
        .max()
        .unwrap_or(0);
    let measured_width = targets
        .iter()
        .map(|t| measured(t).chars().count())
        .max()
        .unwrap_or(0);
    println!("{title}");
    for t in targets {
        let verdict = match t.pass {
            Some(true) => "PASS",
            Some(false) => "SHORT",
            None => "n/a",
        };
        println!(
            "  {:<goal_width$}  {:<measured_width$}  {verdict}",
            t.goal,
            measured(t)
        );
    }
}

/// Writes a bench's report as `target/bench/NAME.json` and its chart as `NAME.svg`, then
/// fails if the run met errors (after writing, so a partial run still leaves its data).
fn write_outputs(
    out_dir: &std::path::Path,
    name: &str,
    report: &impl serde::Serialize,
    svg: String,
    errors: &[String],
) -> Result<()> {
    use anyhow::Context as _;
    let json_path = out_dir.join(format!("{name}.json"));
    let svg_path = out_dir.join(format!("{name}.svg"));
    std::fs::write(&json_path, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&svg_path, svg).with_context(|| format!("writing {}", svg_path.display()))?;
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    if !errors.is_empty() {
        anyhow::bail!("the bench met errors:\n  {}", errors.join("\n  "));
    }
    Ok(())
}

fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median([]), None);
    }
}
