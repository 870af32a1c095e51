//! Privileged: the real binary against a fake agent (a few lines of HTTP/1.1 on a unix
//! socket), so that ADD, CHECK, DEL and ADD's rollback run against the real kernel
//! without the real agent or eBPF. Each test has its own namespace, socket and container.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use hypha_api::{
    AllocateRequest, Allocation, CreateEndpointRequest, DeleteResponse, Endpoint, EndpointCheck,
    EndpointCounters, MacAddr, NamedPort,
};
use hypha_cni::naming::host_ifname;
use hypha_netlink::Netlink;
use serde_json::{Value, json};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The first line of every test here: without root, says the test is skipped and returns
/// (straight to stderr, which libtest does not capture). `cargo xtask test` runs as root.
macro_rules! require_root {
    () => {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let _ = writeln!(
                std::io::stderr(),
                "skipped ({}:{}): needs root (CAP_NET_ADMIN)",
                file!(),
                line!()
            );
            return;
        }
    };
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

struct TestNetns(String);

impl TestNetns {
    fn new() -> Self {
        let name = unique("hypcnit");
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success()
        );
        Self(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
    fn netlink(&self) -> Netlink {
        Netlink::in_netns(&self.path()).unwrap()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Deletes a host interface on drop, in case a test fails half way.
struct HostLink(String);

impl Drop for HostLink {
    fn drop(&mut self) {
        let _ = Netlink::new().and_then(|mut nl| nl.delete_link_by_name(&self.0));
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// An IPv4-only node.
    Ok,
    /// A dual-stack node: allocations have both families.
    Dual,
    /// An IPv6-only node.
    V6Only,
    /// `POST /v1/endpoints` answers 500.
    EndpointFails,
    /// `POST /v1/ipam/allocate` answers 409.
    Conflict,
    /// `POST /v1/ipam/allocate` is read and never answered.
    HangAllocate,
    /// `POST /v1/endpoints` is read and never answered.
    HangEndpoint,
    /// An IPv4 node in cluster mode: allocations carry the pods' MTU ([`CLUSTER_MTU`]).
    Cluster,
}

/// The pods' MTU the agent of [`Mode::Cluster`] gives (a 1500 underlay less VXLAN's 50).
const CLUSTER_MTU: u32 = 1450;

#[derive(Default)]
struct Seen {
    calls: Vec<String>,
    endpoints: Vec<Endpoint>,
    allocations: Vec<AllocateRequest>,
    /// Every `POST /v1/endpoints` body, as sent.
    creates: Vec<CreateEndpointRequest>,
}

struct FakeAgent {
    socket: PathBuf,
    seen: Arc<Mutex<Seen>>,
    _dir: PathBuf,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 5);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const ADDRESS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 5);
const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

impl FakeAgent {
    fn start(mode: Mode) -> Self {
        let dir = std::env::temp_dir().join(unique("hypcni-agent"));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let state = seen.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let mut parts = request_line.split_whitespace();
                let call = format!("{} {}", parts.next().unwrap(), parts.next().unwrap());
                let hang = match mode {
                    Mode::HangAllocate => call == "POST /v1/ipam/allocate",
                    Mode::HangEndpoint => call == "POST /v1/endpoints",
                    _ => false,
                };
                if hang {
                    // Kept open, never answered, until the test ends.
                    state.lock().unwrap().calls.push(call);
                    held.push(stream);
                    continue;
                }
                let (status, answer) = answer(mode, &call, &body, &mut state.lock().unwrap());
                state.lock().unwrap().calls.push(call);
                let answer = answer.to_string();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            }
        });
        Self {
            socket,
            seen,
            _dir: dir,
        }
    }

    fn calls(&self) -> Vec<String> {
        self.seen.lock().unwrap().calls.clone()
    }
}

fn answer(mode: Mode, call: &str, body: &[u8], seen: &mut Seen) -> (&'static str, Value) {
    match call {
        "POST /v1/ipam/allocate" if mode == Mode::Conflict => {
            ("409 Conflict", json!({"error": "endpoint exists"}))
        }
        "POST /v1/ipam/allocate" => {
            seen.allocations
                .push(serde_json::from_slice(body).expect("an AllocateRequest"));
            (
                "200 OK",
                serde_json::to_value(Allocation {
                    address: (mode != Mode::V6Only).then_some(ADDRESS),
                    gateway: (mode != Mode::V6Only).then_some(GATEWAY),
                    pod_cidr: (mode != Mode::V6Only).then(|| "10.77.0.0/24".parse().unwrap()),
                    address6: dual(mode).then_some(ADDRESS6),
                    gateway6: dual(mode).then_some(GATEWAY6),
                    pod_cidr6: dual(mode).then(|| "fd00:77::/64".parse().unwrap()),
                    mtu: (mode == Mode::Cluster).then_some(CLUSTER_MTU),
                })
                .unwrap(),
            )
        }
        "POST /v1/endpoints" if mode == Mode::EndpointFails => (
            "500 Internal Server Error",
            json!({"error": "attach failed"}),
        ),
        "POST /v1/endpoints" => {
            let req: CreateEndpointRequest = serde_json::from_slice(body).unwrap();
            seen.creates.push(req.clone());
            // As the agent does, the host end's MAC is read from the kernel.
            let host = Netlink::new()
                .unwrap()
                .link_by_name(&req.host_ifname)
                .unwrap()
                .expect("the host veth exists when the endpoint is created");
            let ep = Endpoint {
                id: 1,
                container_id: req.container_id,
                ifname: req.ifname,
                netns: req.netns,
                host_ifname: req.host_ifname,
                host_ifindex: 0,
                address: req.address,
                address6: req.address6,
                pod_mac: req.pod_mac,
                host_mac: MacAddr(host.mac),
                labels: req.labels,
                external_ipam: req.external_ipam,
                bandwidth: req.bandwidth,
                counters: EndpointCounters::default(),
                counters4: EndpointCounters::default(),
                counters6: EndpointCounters::default(),
                drops: Vec::new(),
                debug: false,
                ports: req.ports,
                identity: None,
            };
            seen.endpoints.push(ep.clone());
            ("200 OK", serde_json::to_value(ep).unwrap())
        }
        "GET /v1/endpoints" => ("200 OK", serde_json::to_value(&seen.endpoints).unwrap()),
        c if c.starts_with("GET /v1/endpoints/") => {
            let endpoint = seen.endpoints.first().cloned().or_else(|| {
                // Conflict: an endpoint from an earlier ADD.
                (mode == Mode::Conflict).then(|| Endpoint {
                    id: 7,
                    container_id: "earlier".into(),
                    ifname: "eth0".into(),
                    netns: String::new(),
                    host_ifname: String::new(),
                    host_ifindex: 0,
                    address: Some(ADDRESS),
                    pod_mac: MacAddr::default(),
                    host_mac: MacAddr::default(),
                    labels: Default::default(),
                    external_ipam: false,
                    bandwidth: None,
                    counters: EndpointCounters::default(),
                    drops: Vec::new(),
                    debug: false,
                    ports: Vec::new(),
                    identity: None,
                    address6: None,
                    counters4: Default::default(),
                    counters6: Default::default(),
                })
            });
            match endpoint {
                Some(endpoint) => (
                    "200 OK",
                    serde_json::to_value(EndpointCheck {
                        endpoint,
                        problems: Vec::new(),
                    })
                    .unwrap(),
                ),
                None => ("404 Not Found", json!({"error": "no endpoint"})),
            }
        }
        c if c.starts_with("DELETE /v1/endpoints/") => {
            let removed = !seen.endpoints.is_empty();
            seen.endpoints.clear();
            let resp = DeleteResponse {
                endpoint_removed: removed,
                address_released: (removed && mode != Mode::V6Only).then_some(ADDRESS),
                address6_released: (removed && dual(mode)).then_some(ADDRESS6),
            };
            ("200 OK", serde_json::to_value(resp).unwrap())
        }
        _ => ("404 Not Found", json!({"error": "no such route"})),
    }
}

/// Whether the node of `mode` has IPv6.
fn dual(mode: Mode) -> bool {
    matches!(mode, Mode::Dual | Mode::V6Only)
}

fn cni(command: &str, cid: &str, netns: &Path, ifname: &str, conf: &Value) -> Output {
    cni_with_args(
        command,
        cid,
        netns,
        ifname,
        conf,
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
    )
}

fn cni_with_args(
    command: &str,
    cid: &str,
    netns: &Path,
    ifname: &str,
    conf: &Value,
    args: &str,
) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hypha-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn conf(version: &str, agent: &FakeAgent) -> Value {
    json!({"cniVersion": version, "name": "hypha", "type": "hypha-cni", "agentSocket": agent.socket, "mtu": 1400})
}

fn reply(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[test]
fn add_check_del() {
    require_root!();
    let agent = FakeAgent::start(Mode::Ok);
    let ns = TestNetns::new();
    let cid = unique("ctr");
    let host = host_ifname(&cid, "eth0");
    let _guard = HostLink(host.clone());

    let out = cni("ADD", &cid, &ns.path(), "eth0", &conf("1.1.0", &agent));
    assert!(out.status.success(), "{out:?}");
    let result = reply(&out);

    // The container side.
    let mut pod_nl = ns.netlink();
    let pod = pod_nl
        .link_by_name("eth0")
        .unwrap()
        .expect("eth0 in the pod");
    assert!(pod.up);
    assert_eq!(pod.mtu, 1400);
    assert_eq!(pod_nl.addresses(pod.index).unwrap(), vec![(ADDRESS, 32)]);
    let routes = pod_nl.routes(pod.index).unwrap();
    assert!(
        routes
            .iter()
            .any(|r| r.dst.prefix_len() == 0 && r.gateway == Some(GATEWAY)),
        "{routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r.dst == "10.77.0.1/32".parse().unwrap() && r.scope_link),
        "{routes:?}"
    );
    // The host side.
    let h = Netlink::new()
        .unwrap()
        .link_by_name(&host)
        .unwrap()
        .expect("host veth");
    assert!(h.up);

    assert_eq!(
        result,
        json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": host, "mac": MacAddr(h.mac).to_string(), "mtu": 1400},
                {"name": "eth0", "mac": MacAddr(pod.mac).to_string(), "sandbox": ns.path(), "mtu": 1400},
            ],
            "ips": [{"address": "10.77.0.5/32", "gateway": "10.77.0.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.77.0.1"}],
            "dns": {},
        })
    );
    {
        let seen = agent.seen.lock().unwrap();
        let ep = &seen.endpoints[0];
        assert_eq!(ep.host_ifname, host);
        assert_eq!(ep.pod_mac, MacAddr(pod.mac));
        assert_eq!(ep.netns, ns.path().display().to_string());
        assert_eq!(ep.labels.get("k8s:pod").map(String::as_str), Some("web-0"));
    }

    // CHECK against the result.
    let mut check_conf = conf("1.1.0", &agent);
    check_conf["prevResult"] = result.clone();
    let out = cni("CHECK", &cid, &ns.path(), "eth0", &check_conf);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty());

    // CHECK reports what differs.
    pod_nl
        .delete_route(&hypha_netlink::Route {
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: Some(GATEWAY),
            oif: pod.index,
            scope_link: false,
            src: None,
        })
        .unwrap();
    let out = cni("CHECK", &cid, &ns.path(), "eth0", &check_conf);
    assert!(!out.status.success());
    let err = reply(&out);
    assert_eq!(err["code"], 100);
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains("no route to 0.0.0.0/0 via 10.77.0.1 on interface eth0"),
        "{err}"
    );

    // DEL removes both ends and the endpoint, and can be repeated.
    let out = cni("DEL", &cid, &ns.path(), "eth0", &conf("1.1.0", &agent));
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty());
    assert!(
        Netlink::new()
            .unwrap()
            .link_by_name(&host)
            .unwrap()
            .is_none()
    );
    assert!(pod_nl.link_by_name("eth0").unwrap().is_none());
    let out = cni("DEL", &cid, &ns.path(), "eth0", &conf("1.1.0", &agent));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        agent
            .calls()
            .iter()
            .filter(|c| c.starts_with("DELETE"))
            .count(),
        2
    );
}

#[test]
fn add_result_in_old_versions() {
    require_root!();
    let agent = FakeAgent::start(Mode::Ok);
    let ns = TestNetns::new();
    let cid = unique("ctr");
    let _guard = HostLink(host_ifname(&cid, "net1"));
    let out = cni("ADD", &cid, &ns.path(), "net1", &conf("0.3.1", &agent));
    assert!(out.status.success(), "{out:?}");
    let r = reply(&out);
    assert_eq!(r["cniVersion"], "0.3.1");
    assert_eq!(r["ips"][0]["version"], "4");
    assert_eq!(r["interfaces"][1]["name"], "net1");
}

/// ADD against the cluster-mode agent with the network configuration's `mtu` (`None`:
/// left out): the reply, and the MTUs of the pod's and the host's ends.
fn add_in_cluster(
    agent: &FakeAgent,
    ns: &TestNetns,
    cid: &str,
    mtu: Option<u32>,
) -> (Output, Option<(u32, u32)>) {
    let mut c = conf("1.1.0", agent);
    match mtu {
        Some(m) => c["mtu"] = json!(m),
        None => {
            c.as_object_mut().unwrap().remove("mtu");
        }
    }
    let out = cni("ADD", cid, &ns.path(), "eth0", &c);
    let pod = ns.netlink().link_by_name("eth0").unwrap();
    let host = Netlink::new()
        .unwrap()
        .link_by_name(&host_ifname(cid, "eth0"))
        .unwrap();
    (out, pod.zip(host).map(|(p, h)| (p.mtu, h.mtu)))
}

#[test]
fn the_nodes_mtu_reaches_the_pod_unless_the_configuration_lowers_it() {
    require_root!();
    let agent = FakeAgent::start(Mode::Cluster);
    // No mtu in the configuration: the node's, on both ends and in the result.
    let ns = TestNetns::new();
    let cid = unique("ctr");
    let _guard = HostLink(host_ifname(&cid, "eth0"));
    let (out, mtus) = add_in_cluster(&agent, &ns, &cid, None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mtus, Some((CLUSTER_MTU, CLUSTER_MTU)));
    let r = reply(&out);
    assert_eq!(r["interfaces"][0]["mtu"], CLUSTER_MTU, "{r}");
    assert_eq!(r["interfaces"][1]["mtu"], CLUSTER_MTU, "{r}");
    // A lower one wins.
    let ns = TestNetns::new();
    let cid = unique("ctr");
    let _guard = HostLink(host_ifname(&cid, "eth0"));
    let (out, mtus) = add_in_cluster(&agent, &ns, &cid, Some(1400));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mtus, Some((1400, 1400)));
    assert_eq!(reply(&out)["interfaces"][1]["mtu"], 1400);
}

#[test]
fn a_configured_mtu_above_the_nodes_is_refused_and_nothing_is_left() {
    require_root!();
    let agent = FakeAgent::start(Mode::Cluster);
    let ns = TestNetns::new();
    let cid = unique("ctr");
    let _guard = HostLink(host_ifname(&cid, "eth0"));
    let (out, mtus) = add_in_cluster(&agent, &ns, &cid, Some(1500));
    assert!(!out.status.success(), "{out:?}");
    let err = reply(&out);
    assert_eq!(err["code"], 7, "invalid network configuration: {err}");
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains("mtu 1500") && msg.contains("pod MTU 1450"),
        "{msg}"
    );
    assert_eq!(mtus, None, "no veth made");
    assert!(
        Netlink::new()
            .unwrap()
            .link_by_name(&host_ifname(&cid, "eth0"))
            .unwrap()
            .is_none()
    );
    // The address was given back.
    assert_eq!(
        agent.calls(),
        vec![
            "POST /v1/ipam/allocate".to_owned(),
            format!("DELETE /v1/endpoints/{cid}/eth0"),
        ]
    );
}

#[test]
fn failed_endpoint_rolls_everything_back() {
    require_root!();
    let agent = FakeAgent::start(Mode::EndpointFails);
    let ns = TestNetns::new();
    let cid = unique("ctr");
    let host = host_ifname(&cid, "eth0");
    let _guard = HostLink(host.clone());

    let out = cni("ADD", &cid, &ns.path(), "eth0", &conf("1.0.0", &agent));
    assert!(!out.status.success());
    let err = reply(&out);
    assert_eq!(err["code"], 5, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains("attach failed"),
        "{err}"
    );
    assert!(
        Netlink::new()
            .unwrap()
            .link_by_name(&host)
            .unwrap()
            .is_none()
    );
    assert!(ns.netlink().link_by_name("eth0").unwrap().is_none());
    assert_eq!(
        agent.calls(),
        vec![
            "POST /v1/ipam/allocate".to_owned(),
            "POST /v1/endpoints".to_owned(),
            format!("DELETE /v1/endpoints/{cid}/eth0"),
        ]
    );
}

#[test]
fn ifname_taken_in_the_container() {
    require_root!();
    let agent = FakeAgent::start(Mode::Ok);
    let ns = TestNetns::new();
    let cid = unique("ctr");
    let host = host_ifname(&cid, "eth0");
    let _guard = HostLink(host.clone());
    let netns = ns.0.clone();
    assert!(
        Command::new("ip")
            .args([
                "-n", &netns, "link", "add", "eth0", "type", "veth", "peer", "name", "other0"
            ])
            .status()
            .unwrap()
            .success()
    );

    let out = cni("ADD", &cid, &ns.path(), "eth0", &conf("1.1.0", &agent));
    let err = reply(&out);
    assert_eq!(err["code"], 4, "{err}");
    assert_eq!(
        err["msg"],
        format!(
            "interface eth0 already exists in the container's network namespace {}",
            ns.path().display()
        )
    );
    assert!(
        Netlink::new()
            .unwrap()
            .link_by_name(&host)
            .unwrap()
            .is_none()
    );
    // The address was given back.
    assert_eq!(
        agent.calls().last().unwrap(),
        &format!("DELETE /v1/endpoints/{cid}/eth0")
    );
}

#[test]
fn add_twice_leaves_the_first_alone() {
    require_root!();
    let agent = FakeAgent::start(Mode::Conflict);
    let ns = TestNetns::new();
    let cid = unique("ctr");
    let out = cni("ADD", &cid, &ns.path(), "eth0", &conf("1.1.0", &agent));
    let err = reply(&out);
    assert_eq!(err["code"], 4, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains("already attached"),
        "{err}"
    );
    assert_eq!(
        agent.calls(),
        vec![
            "POST /v1/ipam/allocate".to_owned(),
            format!("GET /v1/endpoints/{cid}/eth0")
        ]
    );
}

/// An agent whose allocation does not refuse a second ADD (as the agent did before it
/// checked for an endpoint, or in a race): the second ADD, here from a retry with a new
/// namespace, finds the host veth taken and the agent's endpoint for it, fails "already
/// attached", and leaves the first's veth, endpoint and address alone.
#[test]
fn a_second_add_finding_the_first_ones_veth_leaves_it_alone() {
    require_root!();
    let agent = FakeAgent::start(Mode::Ok);
    let (ns, retry_ns) = (TestNetns::new(), TestNetns::new());
    let cid = unique("ctr");
    let host = host_ifname(&cid, "eth0");
    let _guard = HostLink(host.clone());
    let out = cni("ADD", &cid, &ns.path(), "eth0", &conf("1.1.0", &agent));
    assert!(out.status.success(), "{out:?}");
    let before = Netlink::new()
        .unwrap()
        .link_by_name(&host)
        .unwrap()
        .expect("the host veth");

    let out = cni(
        "ADD",
        &cid,
        &retry_ns.path(),
        "eth0",
        &conf("1.1.0", &agent),
    );
    let err = reply(&out);
    assert_eq!(err["code"], 4, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains("already attached"),
        "{err}"
    );
    let after = Netlink::new()
        .unwrap()
        .link_by_name(&host)
        .unwrap()
        .expect("the first ADD's host veth is gone");
    assert_eq!(after.index, before.index, "the host veth was replaced");
    let pod = ns.netlink().link_by_name("eth0").unwrap();
    assert!(pod.is_some(), "the first pod lost its eth0");
    assert!(retry_ns.netlink().link_by_name("eth0").unwrap().is_none());
    let calls = agent.calls();
    assert!(
        !calls.iter().any(|c| c.starts_with("DELETE")),
        "the second ADD deleted the first's endpoint: {calls:?}"
    );
    assert_eq!(agent.seen.lock().unwrap().endpoints.len(), 1);
}

/// An ADD against `agent` with `agentTimeout` set to `timeout` seconds, as it ends: the
/// plugin's error reply, how long it took, and what the test must check is gone (the
/// pod's netns with its eth0, the host end of the veth, which the guard also removes).
struct TimedAdd {
    ns: TestNetns,
    cid: String,
    host: String,
    _guard: HostLink,
    err: Value,
    took: std::time::Duration,
}

impl TimedAdd {
    fn run(agent: &FakeAgent, timeout: f64) -> Self {
        let ns = TestNetns::new();
        let cid = unique("ctr");
        let host = host_ifname(&cid, "eth0");
        let guard = HostLink(host.clone());
        let mut c = conf("1.1.0", agent);
        c["agentTimeout"] = json!(timeout);
        let start = std::time::Instant::now();
        let out = cni("ADD", &cid, &ns.path(), "eth0", &c);
        let took = start.elapsed();
        TimedAdd {
            err: reply(&out),
            ns,
            cid,
            host,
            _guard: guard,
            took,
        }
    }

    /// Neither end of the veth is left.
    fn assert_no_veth(&self) {
        assert!(
            Netlink::new()
                .unwrap()
                .link_by_name(&self.host)
                .unwrap()
                .is_none()
        );
        assert!(self.ns.netlink().link_by_name("eth0").unwrap().is_none());
    }
}

/// An agent that reads the allocation request and never answers: ADD fails within
/// `agentTimeout` with "try again later", naming the socket and the call, and leaves
/// nothing behind.
#[test]
fn add_is_bounded_when_the_agent_never_answers() {
    require_root!();
    let agent = FakeAgent::start(Mode::HangAllocate);
    let add = TimedAdd::run(&agent, 1.0);
    let err = &add.err;
    assert_eq!(err["code"], 11, "{err}");
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains(&agent.socket.display().to_string())
            && msg.contains("POST /v1/ipam/allocate")
            && msg.contains("within 1s"),
        "{msg}"
    );
    assert!(
        add.took < std::time::Duration::from_secs(4),
        "{:?}",
        add.took
    );
    add.assert_no_veth();
}

/// An agent that never answers the endpoint's creation: ADD rolls the veth back and, the
/// agent not answering, leaves the endpoint's delete for it instead of waiting a second
/// time; within one timeout.
#[test]
fn add_rolls_back_and_defers_when_the_endpoint_call_hangs() {
    require_root!();
    let agent = FakeAgent::start(Mode::HangEndpoint);
    let add = TimedAdd::run(&agent, 1.5);
    let err = &add.err;
    assert_eq!(err["code"], 11, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains("POST /v1/endpoints"),
        "{err}"
    );
    assert!(
        add.took < std::time::Duration::from_secs(3),
        "one timeout, not two: {:?}",
        add.took
    );
    add.assert_no_veth();
    assert_eq!(
        agent.calls(),
        vec![
            "POST /v1/ipam/allocate".to_owned(),
            "POST /v1/endpoints".to_owned()
        ]
    );
    let deferred = hypha_api::deferred_deletes_dir(&agent.socket);
    let records: Vec<hypha_api::Attachment> = std::fs::read_dir(&deferred)
        .unwrap_or_else(|e| panic!("{}: {e}", deferred.display()))
        .map(|e| serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap())
        .collect();
    assert_eq!(
        records,
        vec![hypha_api::Attachment {
            container_id: add.cid.clone(),
            ifname: "eth0".into()
        }]
    );
}

/// CRI-O (cri-o/ocicni pkg/ocicni/ocicni.go, `buildCNIRuntimeConf`) and podman 4 with one
/// static address (containers/common libnetwork/cni/run.go, `getRuntimeConfig`) ask for
/// the address and MAC in CNI_ARGS (`IP=`, `MAC=`), after `IgnoreUnknown=1`: the agent is
/// asked for that address and the pod's interface gets that MAC.
#[test]
fn ip_and_mac_from_cni_args_are_applied() {
    require_root!();
    let agent = FakeAgent::start(Mode::Ok);
    let ns = TestNetns::new();
    let cid = unique("ctr");
    let _guard = HostLink(host_ifname(&cid, "eth0"));
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID={cid};IP={ADDRESS};MAC=02:00:00:c0:ff:ee"
    );
    let out = cni_with_args(
        "ADD",
        &cid,
        &ns.path(),
        "eth0",
        &conf("1.0.0", &agent),
        &args,
    );
    assert!(out.status.success(), "{out:?}");
    let seen = agent.seen.lock().unwrap();
    assert_eq!(seen.allocations.len(), 1);
    assert_eq!(seen.allocations[0].address, Some(ADDRESS));
    let pod = ns.netlink().link_by_name("eth0").unwrap().expect("eth0");
    assert_eq!(MacAddr(pod.mac).to_string(), "02:00:00:c0:ff:ee");
    assert_eq!(
        seen.endpoints[0].labels.get("k8s:pod").map(String::as_str),
        Some("web-1")
    );
}

/// `hypha run --port` passes the pod's named ports in `args.cni.namedPorts`, in any letter
/// case a Go runtime may write the keys: they reach the agent in the create request, in
/// order, TCP where no protocol is given.
#[test]
fn named_ports_reach_the_agent() {
    require_root!();
    let agent = FakeAgent::start(Mode::Ok);
    let ns = TestNetns::new();
    let cid = unique("ctr");
    let _guard = HostLink(host_ifname(&cid, "eth0"));
    let mut conf = conf("1.0.0", &agent);
    conf["args"] = json!({"cni": {
        "labels": [{"key": "app", "value": "web"}],
        "NamedPorts": [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"Name": "dns", "Port": 53, "Protocol": "UDP"},
            {"name": "metrics", "port": 9090},
        ],
    }});
    let out = cni("ADD", &cid, &ns.path(), "eth0", &conf);
    assert!(out.status.success(), "{out:?}");
    let seen = agent.seen.lock().unwrap();
    assert_eq!(seen.creates.len(), 1);
    let port = |name: &str, port, protocol: &str| NamedPort {
        name: name.into(),
        port,
        protocol: protocol.into(),
    };
    assert_eq!(
        seen.creates[0].ports,
        [
            port("http", 8080, "TCP"),
            port("dns", 53, "UDP"),
            port("metrics", 9090, "TCP"),
        ]
    );
    assert_eq!(
        seen.creates[0].labels.get("app").map(String::as_str),
        Some("web")
    );
}

/// A bad named port is refused as a configuration error naming the entry and field,
/// before the agent is asked for anything.
#[test]
fn a_bad_named_port_is_refused_before_anything_is_made() {
    require_root!();
    let agent = FakeAgent::start(Mode::Ok);
    let ns = TestNetns::new();
    let cid = unique("ctr");
    let _guard = HostLink(host_ifname(&cid, "eth0"));
    let mut conf = conf("1.0.0", &agent);
    conf["args"] = json!({"cni": {"namedPorts": [
        {"name": "http", "port": 8080},
        {"name": "dns", "port": 70000, "protocol": "UDP"},
    ]}});
    let out = cni("ADD", &cid, &ns.path(), "eth0", &conf);
    assert!(!out.status.success(), "{out:?}");
    let err = reply(&out);
    assert_eq!(err["code"], 7, "{err}");
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains("args.cni.namedPorts[1].port") && msg.contains("70000"),
        "{err}"
    );
    assert!(agent.calls().is_empty(), "{:?}", agent.calls());
    assert!(ns.netlink().link_by_name("eth0").unwrap().is_none());
}

/// The runtimes' invocations of `tests/fixtures/` (containerd's go-cni, CRI-O's ocicni,
/// podman 4's libnetwork/cni; see its README), placeholders replaced.
fn runtime_fixtures(socket: &Path, cid: &str) -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p)
                .unwrap()
                .replace("@SOCKET@", &socket.display().to_string())
                .replace("@CID@", cid)
                .replace("@IP@", &ADDRESS.to_string())
                .replace("@IP6@", &ADDRESS6.to_string());
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, serde_json::from_str(&text).unwrap())
        })
        .collect()
}

/// Each runtime's exact stdin and CNI_ARGS: the address, MAC, limits and labels it asks
/// for reach the agent (and the MAC the pod's interface).
#[test]
fn runtime_fixtures_reach_the_agent() {
    require_root!();
    let probe = FakeAgent::start(Mode::Ok);
    for (name, _) in runtime_fixtures(&probe.socket, "x") {
        let agent = FakeAgent::start(Mode::Dual);
        let ns = TestNetns::new();
        let cid = unique("ctr");
        let _guard = HostLink(host_ifname(&cid, "eth0"));
        let fixture = runtime_fixtures(&agent.socket, &cid)
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1;
        let args = fixture["cniArgs"].as_str().unwrap();
        let out = cni_with_args("ADD", &cid, &ns.path(), "eth0", &fixture["stdin"], args);
        assert!(out.status.success(), "{name}: {out:?}");
        let expect = &fixture["expect"];
        let seen = agent.seen.lock().unwrap();
        assert_eq!(
            seen.allocations[0].address.map(|a| a.to_string()),
            expect["address"].as_str().map(str::to_owned),
            "{name}"
        );
        assert_eq!(
            seen.allocations[0].address6.map(|a| a.to_string()),
            expect["address6"].as_str().map(str::to_owned),
            "{name}"
        );
        let ep = &seen.endpoints[0];
        let bw = ep.bandwidth.unwrap_or_default();
        assert_eq!(bw.egress_rate, expect["egressRate"].as_u64(), "{name}");
        assert_eq!(bw.ingress_rate, expect["ingressRate"].as_u64(), "{name}");
        let labels: Value = serde_json::to_value(&ep.labels).unwrap();
        assert_eq!(labels, expect["labels"], "{name}");
        if let Some(mac) = expect["mac"].as_str() {
            let pod = ns.netlink().link_by_name("eth0").unwrap().expect("eth0");
            assert_eq!(MacAddr(pod.mac).to_string(), mac, "{name}");
            assert_eq!(ep.pod_mac.to_string(), mac, "{name}");
        }
    }
}

/// The link-local address the kernel makes from `mac` in EUI-64 mode.
fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

/// A dual-stack node: the pod gets its /32 and its /128 (without DAD), a default route
/// per family, a link-local address made from its MAC; the result and the endpoint have
/// both; CHECK passes, then names a missing IPv6 route and a missing IPv6 address; DEL
/// removes everything and can be repeated.
#[test]
fn dual_stack_add_check_del() {
    require_root!();
    let agent = FakeAgent::start(Mode::Dual);
    let ns = TestNetns::new();
    let cid = unique("ctr");
    let host = host_ifname(&cid, "eth0");
    let _guard = HostLink(host.clone());

    let out = cni("ADD", &cid, &ns.path(), "eth0", &conf("1.0.0", &agent));
    assert!(out.status.success(), "{out:?}");
    let result = reply(&out);
    let mut pod_nl = ns.netlink();
    let pod = pod_nl.link_by_name("eth0").unwrap().expect("eth0");
    assert!(pod.up);
    assert_eq!(pod.addr_gen_mode, Some(hypha_netlink::AddrGenMode::Eui64));
    assert_eq!(pod_nl.addresses(pod.index).unwrap(), vec![(ADDRESS, 32)]);
    let v6 = pod_nl.addresses6(pod.index).unwrap();
    let mine = v6
        .iter()
        .find(|a| a.address == ADDRESS6)
        .unwrap_or_else(|| panic!("no {ADDRESS6} in {v6:?}"));
    assert_eq!(mine.prefix_len, 128);
    assert!(mine.nodad && mine.usable(), "{mine:?}");
    let ll = eui64_link_local(pod.mac);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !pod_nl
        .addresses6(pod.index)
        .unwrap()
        .iter()
        .any(|a| a.address == ll)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no link-local {ll}: {:?}",
            pod_nl.addresses6(pod.index).unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let default6 = hypha_netlink::Route6 {
        dst: "::/0".parse().unwrap(),
        gateway: Some(GATEWAY6),
        oif: pod.index,
        src: None,
    };
    let routes6 = pod_nl.routes6(pod.index).unwrap();
    assert!(routes6.contains(&default6), "{routes6:?}");
    assert!(
        pod_nl
            .routes(pod.index)
            .unwrap()
            .iter()
            .any(|r| r.dst.prefix_len() == 0 && r.gateway == Some(GATEWAY))
    );
    let h = Netlink::new()
        .unwrap()
        .link_by_name(&host)
        .unwrap()
        .unwrap();
    assert_eq!(
        result,
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": host, "mac": MacAddr(h.mac).to_string()},
                {"name": "eth0", "mac": MacAddr(pod.mac).to_string(), "sandbox": ns.path()},
            ],
            "ips": [
                {"address": "10.77.0.5/32", "gateway": "10.77.0.1", "interface": 1},
                {"address": "fd00:77::5/128", "gateway": "fe80::1", "interface": 1},
            ],
            "routes": [
                {"dst": "0.0.0.0/0", "gw": "10.77.0.1"},
                {"dst": "::/0", "gw": "fe80::1"},
            ],
            "dns": {},
        })
    );
    {
        let seen = agent.seen.lock().unwrap();
        assert_eq!(seen.creates[0].address, Some(ADDRESS));
        assert_eq!(seen.creates[0].address6, Some(ADDRESS6));
        assert_eq!(seen.allocations[0].address6, None);
    }

    let mut check_conf = conf("1.0.0", &agent);
    check_conf["prevResult"] = result.clone();
    let out = cni("CHECK", &cid, &ns.path(), "eth0", &check_conf);
    assert!(out.status.success(), "{out:?}");

    // A missing IPv6 default route is named.
    assert!(pod_nl.delete_route6(&default6).unwrap());
    let out = cni("CHECK", &cid, &ns.path(), "eth0", &check_conf);
    let err = reply(&out);
    assert_eq!(err["code"], 100, "{err}");
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains("no route to ::/0 via fe80::1 on interface eth0"),
        "{msg}"
    );
    assert!(!msg.contains("0.0.0.0/0"), "the IPv4 route is there: {msg}");
    pod_nl.add_route6(&default6).unwrap();
    // So is a missing IPv6 address (the default route stays: it needs none).
    assert!(pod_nl.delete_address6(pod.index, ADDRESS6, 128).unwrap());
    let out = cni("CHECK", &cid, &ns.path(), "eth0", &check_conf);
    let err = reply(&out);
    assert_eq!(err["code"], 100, "{err}");
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains("prevResult says fd00:77::5/128") && msg.contains("IPv6 addresses ["),
        "{msg}"
    );
    assert!(
        !msg.contains("10.77.0.5"),
        "the IPv4 address is there: {msg}"
    );

    for _ in 0..2 {
        let out = cni("DEL", &cid, &ns.path(), "eth0", &conf("1.0.0", &agent));
        assert!(out.status.success(), "{out:?}");
        assert!(
            Netlink::new()
                .unwrap()
                .link_by_name(&host)
                .unwrap()
                .is_none()
        );
        assert!(pod_nl.link_by_name("eth0").unwrap().is_none());
    }
}

/// An IPv6-only node: the pod has no IPv4 at all, IPv6 is enabled on its interface even
/// where the namespace disables it for new interfaces, the 0.3.1 result says version
/// "6", CHECK passes and DEL can be repeated.
#[test]
fn ipv6_only_pod_in_a_namespace_with_ipv6_disabled() {
    require_root!();
    let agent = FakeAgent::start(Mode::V6Only);
    let ns = TestNetns::new();
    for key in ["default", "lo"] {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.0, "sysctl", "-qw"])
            .arg(format!("net.ipv6.conf.{key}.disable_ipv6=1"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let cid = unique("ctr");
    let host = host_ifname(&cid, "eth0");
    let _guard = HostLink(host.clone());
    let out = cni("ADD", &cid, &ns.path(), "eth0", &conf("0.4.0", &agent));
    assert!(out.status.success(), "{out:?}");
    let result = reply(&out);
    assert_eq!(
        result["ips"],
        json!([{"address": "fd00:77::5/128", "gateway": "fe80::1", "interface": 1, "version": "6"}])
    );
    assert_eq!(result["routes"], json!([{"dst": "::/0", "gw": "fe80::1"}]));
    let mut pod_nl = ns.netlink();
    let pod = pod_nl.link_by_name("eth0").unwrap().unwrap();
    assert!(pod_nl.addresses(pod.index).unwrap().is_empty());
    assert!(pod_nl.routes(pod.index).unwrap().is_empty());
    assert!(
        pod_nl
            .addresses6(pod.index)
            .unwrap()
            .iter()
            .any(|a| a.address == ADDRESS6 && a.usable())
    );
    for ifname in ["eth0", "lo"] {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.0, "cat"])
            .arg(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{ifname}");
    }
    {
        let seen = agent.seen.lock().unwrap();
        assert_eq!(seen.creates[0].address, None);
        assert_eq!(seen.creates[0].address6, Some(ADDRESS6));
    }
    let mut check_conf = conf("0.4.0", &agent);
    check_conf["prevResult"] = result;
    let out = cni("CHECK", &cid, &ns.path(), "eth0", &check_conf);
    assert!(out.status.success(), "{out:?}");
    for _ in 0..2 {
        let out = cni("DEL", &cid, &ns.path(), "eth0", &conf("0.4.0", &agent));
        assert!(out.status.success(), "{out:?}");
        assert!(
            Netlink::new()
                .unwrap()
                .link_by_name(&host)
                .unwrap()
                .is_none()
        );
    }
}

/// A requested IPv6 address the (IPv4-only) node's allocation does not give is refused,
/// naming it, and the allocation is given back before any interface is made.
#[test]
fn a_requested_ipv6_address_the_node_does_not_give_is_refused() {
    require_root!();
    let agent = FakeAgent::start(Mode::Ok);
    let ns = TestNetns::new();
    let cid = unique("ctr");
    let host = host_ifname(&cid, "eth0");
    let _guard = HostLink(host.clone());
    let mut c = conf("1.0.0", &agent);
    c["runtimeConfig"] = json!({"ips": ["fd00:77::9/64"]});
    let out = cni("ADD", &cid, &ns.path(), "eth0", &c);
    assert!(!out.status.success());
    let err = reply(&out);
    assert_eq!(err["code"], 7, "{err}");
    assert_eq!(
        err["msg"],
        "runtimeConfig.ips: fd00:77::9 cannot be given to this pod: the node's allocation has \
         10.77.0.5"
    );
    assert_eq!(
        agent.seen.lock().unwrap().allocations[0].address6,
        Some("fd00:77::9".parse().unwrap())
    );
    assert_eq!(
        agent.calls(),
        vec![
            "POST /v1/ipam/allocate".to_owned(),
            format!("DELETE /v1/endpoints/{cid}/eth0"),
        ]
    );
    assert!(
        Netlink::new()
            .unwrap()
            .link_by_name(&host)
            .unwrap()
            .is_none()
    );
    assert!(ns.netlink().link_by_name("eth0").unwrap().is_none());
}
