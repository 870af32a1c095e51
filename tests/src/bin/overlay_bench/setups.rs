//! The setups measured, each between two simulated nodes (network namespaces joined by an
//! underlay bridge in a third):
//!
//! - (a) `underlay`: the two node namespaces talking directly over the underlay, the
//!   limit.
//! - (b) `kernel-vxlan`: a Flannel-style overlay in the same two node namespaces: a Linux
//!   VXLAN device each (`vxlan id 1 dstport 8472 nolearning`, MTU underlay − 50, the
//!   device's own address the `.0` of its node's pod subnet), a static FDB entry, a
//!   permanent neighbour entry and an on-link route for the peer's pod subnet through
//!   it, and one pod namespace per node behind a veth that the node routes; and
//!   Flannel's masquerade rule (kube-flannel runs with `--ip-masq`): pod traffic leaving
//!   the cluster CIDR is masqueraded, so conntrack runs in the node as on a Flannel node
//!   (and on a Hypha node, whose agent masquerades alike). No eBPF. Without the rule:
//!   `kernel-vxlan-bare`, which (a) shares.
//! - (c) `hypha`: the issue-12 cluster harness ([`Cluster`]: its own underlay, a real
//!   etcd, two nodes with an agent each in tunnel mode), one pod per node made through
//!   `hypha-cni`.
//!
//! Everything lives in namespaces made here and goes with them on drop (their veths and
//! VXLAN devices inside), also when the bench fails or panics.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use hypha_tests::cluster::{Cluster, ClusterOpts};
use hypha_tests::netns::NamedNetns;
use hypha_tests::node::Pod;
use serde_json::{Value, json};

use crate::measure::Peers;

/// The kernel setups' underlay: `192.168.77.0/24`, node i at `.10+i`.
const UNDERLAY_NET: [u8; 3] = [192, 168, 77];
/// Its MTU, the veths' default (the Hypha cluster's underlay has the same).
const UNDERLAY_MTU: u32 = 1500;
/// VXLAN over IPv4: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
const VXLAN_OVERHEAD: u32 = 50;
/// The Flannel-style device, its VNI and port.
const VXLAN_DEVICE: &str = "flannel.1";
const VNI: &str = "1";
const VXLAN_PORT: &str = "8472";
/// The kernel overlay's cluster CIDR (every node's pod subnet is in it).
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The underlay veth's name inside each node namespace.
const UNDERLAY_IF: &str = "ul0";
/// The pod's host-side veth in its node namespace.
const POD_HOST_IF: &str = "pod0";

/// Node i's pod subnet: `10.244.<i>.0/24` (the VXLAN device `.0`, the node's veth `.1`,
/// the pod `.2`).
fn pod_net(i: u8) -> [u8; 3] {
    [10, 244, i]
}

fn node_ip(i: u8) -> Ipv4Addr {
    let [a, b, c] = UNDERLAY_NET;
    Ipv4Addr::new(a, b, c, 10 + i)
}

/// Node i's VXLAN device's MAC (locally administered, fixed so that the peer's static
/// entries can name it before it exists).
fn vxlan_mac(i: u8) -> String {
    format!("02:42:0a:f4:{i:02x}:00")
}

/// The namespaces of setups (a) and (b). Fields drop in order: the pods, the nodes, then
/// the underlay.
pub struct KernelSetup {
    pods: [NamedNetns; 2],
    nodes: [NamedNetns; 2],
    underlay: NamedNetns,
}

/// Runs `cmd` in `ns`, an error (not a panic) naming the namespace on failure.
fn exec(ns: &NamedNetns, cmd: &[&str]) -> Result<String> {
    let out = ns.try_exec(cmd);
    if !out.status.success() {
        bail!(
            "in {}: {} failed: {}",
            ns.name(),
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl KernelSetup {
    /// The namespaces wired; with Flannel's masquerade rule in each node when
    /// `masquerade`.
    pub fn create(masquerade: bool) -> Result<KernelSetup> {
        let underlay = NamedNetns::new("hob-u");
        let nodes = [NamedNetns::new("hob-n"), NamedNetns::new("hob-n")];
        let pods = [NamedNetns::new("hob-p"), NamedNetns::new("hob-p")];
        let setup = KernelSetup {
            pods,
            nodes,
            underlay,
        };
        setup.wire().context("setting up the kernel overlay")?;
        if masquerade {
            for node in &setup.nodes {
                masquerade_rule(node).context("Flannel's masquerade rule")?;
            }
        }
        Ok(setup)
    }

    fn wire(&self) -> Result<()> {
        let u = &self.underlay;
        exec(u, &["ip", "link", "add", "br0", "type", "bridge"])?;
        exec(u, &["ip", "link", "set", "br0", "up"])?;
        let mtu = (UNDERLAY_MTU - VXLAN_OVERHEAD).to_string();
        for (i, node) in self.nodes.iter().enumerate() {
            let i = i as u8;
            let bridge_side = format!("u{i}");
            exec(
                u,
                &[
                    "ip",
                    "link",
                    "add",
                    &bridge_side,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    UNDERLAY_IF,
                    "netns",
                    node.name(),
                ],
            )?;
            exec(
                u,
                &["ip", "link", "set", &bridge_side, "master", "br0", "up"],
            )?;
            let ip = node_ip(i);
            exec(
                node,
                &["ip", "addr", "add", &format!("{ip}/24"), "dev", UNDERLAY_IF],
            )?;
            exec(node, &["ip", "link", "set", UNDERLAY_IF, "up"])?;
            exec(node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            // The Flannel-style device: its own address is the .0 of the pod subnet.
            exec(
                node,
                &[
                    "ip",
                    "link",
                    "add",
                    VXLAN_DEVICE,
                    "address",
                    &vxlan_mac(i),
                    "type",
                    "vxlan",
                    "id",
                    VNI,
                    "local",
                    &ip.to_string(),
                    "dev",
                    UNDERLAY_IF,
                    "dstport",
                    VXLAN_PORT,
                    "nolearning",
                ],
            )?;
            exec(
                node,
                &["ip", "link", "set", VXLAN_DEVICE, "mtu", &mtu, "up"],
            )?;
            let [a, b, c] = pod_net(i);
            exec(
                node,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{a}.{b}.{c}.0/32"),
                    "dev",
                    VXLAN_DEVICE,
                ],
            )?;
            // The pod behind a veth routed by the node, with the overlay's MTU (as
            // Flannel's CNI configuration gives it).
            let pod = &self.pods[i as usize];
            exec(
                node,
                &[
                    "ip",
                    "link",
                    "add",
                    POD_HOST_IF,
                    "mtu",
                    &mtu,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "mtu",
                    &mtu,
                    "netns",
                    pod.name(),
                ],
            )?;
            exec(
                node,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{a}.{b}.{c}.1/24"),
                    "dev",
                    POD_HOST_IF,
                ],
            )?;
            exec(node, &["ip", "link", "set", POD_HOST_IF, "up"])?;
            exec(
                pod,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{a}.{b}.{c}.2/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            exec(pod, &["ip", "link", "set", "eth0", "up"])?;
            exec(
                pod,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("{a}.{b}.{c}.1"),
                ],
            )?;
        }
        // Each node's static entries for the other: route, neighbour, FDB.
        for (i, node) in self.nodes.iter().enumerate() {
            let peer = 1 - i as u8;
            let [a, b, c] = pod_net(peer);
            let gateway = format!("{a}.{b}.{c}.0");
            exec(
                node,
                &[
                    "ip",
                    "route",
                    "add",
                    &format!("{a}.{b}.{c}.0/24"),
                    "via",
                    &gateway,
                    "dev",
                    VXLAN_DEVICE,
                    "onlink",
                ],
            )?;
            exec(
                node,
                &[
                    "ip",
                    "neigh",
                    "add",
                    &gateway,
                    "lladdr",
                    &vxlan_mac(peer),
                    "dev",
                    VXLAN_DEVICE,
                    "nud",
                    "permanent",
                ],
            )?;
            exec(
                node,
                &[
                    "bridge",
                    "fdb",
                    "append",
                    &vxlan_mac(peer),
                    "dev",
                    VXLAN_DEVICE,
                    "dst",
                    &node_ip(peer).to_string(),
                ],
            )?;
        }
        Ok(())
    }

    /// (a): node 0 to node 1 over the underlay.
    pub fn underlay_peers(&self) -> Peers {
        Peers {
            client_ns: self.nodes[0].name().to_owned(),
            server_ns: self.nodes[1].name().to_owned(),
            client_ip: IpAddr::V4(node_ip(0)),
            server_ip: IpAddr::V4(node_ip(1)),
        }
    }

    /// (b): pod 0 to pod 1 through the VXLAN devices.
    pub fn overlay_peers(&self) -> Peers {
        let pod_ip = |i: u8| {
            let [a, b, c] = pod_net(i);
            IpAddr::V4(Ipv4Addr::new(a, b, c, 2))
        };
        Peers {
            client_ns: self.pods[0].name().to_owned(),
            server_ns: self.pods[1].name().to_owned(),
            client_ip: pod_ip(0),
            server_ip: pod_ip(1),
        }
    }

    /// Packets each node's VXLAN device sent and received (`ip -s` counters), to show
    /// that (b)'s traffic went through it.
    pub fn vxlan_counters(&self) -> Result<Value> {
        let mut out = Vec::new();
        for node in &self.nodes {
            let stats = link_stats(node, VXLAN_DEVICE)?;
            out.push(stats);
        }
        Ok(json!(out))
    }
}

/// Flannel's `--ip-masq` rule as nftables: pod traffic leaving the cluster CIDR is
/// masqueraded, pod to pod is not (as Hypha's agent does in cluster mode).
fn masquerade_rule(node: &NamedNetns) -> Result<()> {
    exec(node, &["nft", "add", "table", "ip", "flannel"])?;
    exec(
        node,
        &[
            "nft",
            "add",
            "chain",
            "ip",
            "flannel",
            "postrouting",
            "{ type nat hook postrouting priority srcnat ; }",
        ],
    )?;
    exec(
        node,
        &[
            "nft",
            "add",
            "rule",
            "ip",
            "flannel",
            "postrouting",
            "ip",
            "saddr",
            CLUSTER_CIDR,
            "ip",
            "daddr",
            "!=",
            CLUSTER_CIDR,
            "masquerade",
        ],
    )?;
    Ok(())
}

/// `{"tx_packets", "rx_packets"}` of a link, from `ip -j -s link show`.
fn link_stats(ns: &NamedNetns, ifname: &str) -> Result<Value> {
    let text = exec(ns, &["ip", "-j", "-s", "link", "show", "dev", ifname])?;
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("ip -j -s link show {ifname}: {text}"))?;
    let link = &json[0]["stats64"];
    Ok(json!({
        "tx_packets": link["tx"]["packets"],
        "rx_packets": link["rx"]["packets"],
    }))
}

/// The MTU of `ifname` in `ns`.
pub fn mtu_in(ns: &str, ifname: &str) -> Result<u32> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/sys/class/net/{ifname}/mtu"))
        .output()
        .context("running ip netns exec")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("the MTU of {ifname} in {ns}: {text:?}"))
}

/// (c): a two-node Hypha cluster and a pod on each node. Fields drop in order: the pods
/// (their namespaces), then the cluster (agents, etcd, namespaces).
pub struct HyphaSetup {
    pods: [Pod; 2],
    cluster: Cluster,
}

impl HyphaSetup {
    /// Starts the cluster and the pods; waits until the client pod reaches the server pod.
    pub fn create() -> Result<HyphaSetup> {
        // The harness panics on a failed step (with what failed); the bench goes on
        // without this setup. Unwinding drops whatever was made.
        let made = std::panic::catch_unwind(|| {
            let cluster = Cluster::start(2, ClusterOpts::default());
            let client = cluster.nodes[0].add_pod("obc");
            let server = cluster.nodes[1].add_pod("obs");
            HyphaSetup {
                pods: [client, server],
                cluster,
            }
        })
        .map_err(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".to_owned());
            anyhow::anyhow!("starting the Hypha cluster: {what}")
        })?;
        made.wait_reachable(Duration::from_secs(30))?;
        Ok(made)
    }

    fn wait_reachable(&self, limit: Duration) -> Result<()> {
        let (from, to) = (&self.pods[0], self.pods[1].address);
        let start = Instant::now();
        while start.elapsed() < limit {
            crate::check_interrupted()?;
            let out = from
                .netns
                .try_exec(&["ping", "-c", "1", "-W", "1", &to.to_string()]);
            if out.status.success() {
                return Ok(());
            }
        }
        bail!(
            "the client pod ({}) does not reach the server pod ({to}) on the other node within {limit:?}; the agents' last log lines:\n{}\n{}",
            self.pods[0].address,
            tail(&self.cluster.nodes[0].log(), 15),
            tail(&self.cluster.nodes[1].log(), 15)
        )
    }

    pub fn peers(&self) -> Peers {
        Peers {
            client_ns: self.pods[0].netns.name().to_owned(),
            server_ns: self.pods[1].netns.name().to_owned(),
            client_ip: IpAddr::V4(self.pods[0].address),
            server_ip: IpAddr::V4(self.pods[1].address),
        }
    }

    /// The routing section of node 0's status (mode, device, MTU).
    pub fn routing(&self) -> Value {
        serde_json::to_value(&self.cluster.nodes[0].status().routing).unwrap_or(Value::Null)
    }

    /// The client pod's and the server pod's tunnel counters (packets they sent into and
    /// received from the tunnel), as their agents count them.
    pub fn tunnel_counters(&self) -> Result<Value> {
        let mut out = Vec::new();
        for (node, pod) in self.cluster.nodes.iter().zip(&self.pods) {
            let ep = node
                .client()
                .endpoints()
                .context("listing the endpoints")?
                .into_iter()
                .find(|e| e.container_id == pod.container_id)
                .with_context(|| format!("no endpoint for {}", pod.container_id))?;
            let c = serde_json::to_value(ep.counters).context("endpoint counters")?;
            out.push(json!({
                "egress_tunnel_packets": c["egress"]["tunnel"]["packets"],
                "ingress_tunnel_packets": c["ingress"]["tunnel"]["packets"],
            }));
        }
        Ok(json!(out))
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_macs() {
        assert_eq!(node_ip(1), Ipv4Addr::new(192, 168, 77, 11));
        assert_eq!(vxlan_mac(1), "02:42:0a:f4:01:00");
        assert_eq!(pod_net(0), [10, 244, 0]);
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
