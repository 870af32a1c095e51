//! `hypha`: the agent daemon and the operator's commands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hypha_agent::cli::{
    format_applied, format_endpoint_policy, format_endpoints, format_identities, format_labels,
    format_nodes, format_policies, format_removed_node, format_services, format_services_applied,
    format_status, parse_label_args, parse_service_ref, read_policy_files,
};
use hypha_agent::config::{ConfigError, ConfigFile, cluster};
use hypha_api::Client;
use hypha_launcher::cli as launcher;

#[derive(Parser)]
#[command(name = "hypha", version, about = "Hypha: eBPF container networking")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-host agent (needs root).
    Agent(Box<AgentArgs>),
    /// Show the running agent's state.
    Status(ClientArgs),
    /// What the agent's state store holds (`-o json`: all of it).
    State(ClientArgs),
    /// Endpoints (pods) the agent manages.
    #[command(subcommand, alias = "endpoints")]
    Endpoint(EndpointCommand),
    /// Network policies: apply, delete, list, and what an endpoint enforces.
    #[command(subcommand, alias = "policies")]
    Policy(PolicyCommand),
    /// Services (ClusterIP, NodePort) and their backends: apply, delete, list.
    #[command(subcommand, alias = "services", alias = "svc")]
    Service(ServiceCommand),
    /// Stream drop and policy-verdict events from the datapath as they happen.
    Monitor(MonitorArgs),
    /// Namespaces' labels, for policies' namespaceSelector.
    #[command(subcommand, alias = "ns")]
    Namespace(NamespaceCommand),
    /// The cluster's nodes (cluster mode; a single node shows itself).
    #[command(subcommand, alias = "nodes")]
    Node(NodeCommand),
    /// The security identities the node knows.
    #[command(subcommand, alias = "identities")]
    Identity(IdentityCommand),
    /// Run a command in a new container (namespaces, CNI network, cgroup limits).
    Run(Box<launcher::RunArgs>),
    /// List containers.
    Ps(launcher::PsArgs),
    /// Run a command inside a running container.
    Exec(launcher::ExecArgs),
    /// Stop containers: SIGTERM, then SIGKILL after a timeout.
    Stop(launcher::StopArgs),
    /// Remove stopped containers (`-f`: running ones too).
    Rm(launcher::RmArgs),
    /// Print the output of a detached container.
    Logs(launcher::LogsArgs),
    /// Container images: import, list, remove.
    #[command(subcommand, alias = "images")]
    Image(hypha_launcher::image::cli::ImageCommand),
}

#[derive(Args)]
struct MonitorArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Only events of this endpoint (its id, as `hypha endpoint list` shows).
    #[arg(long)]
    endpoint: Option<u32>,
    /// Only `drop` events or only `policy` verdicts.
    #[arg(long = "type", value_parser = ["drop", "policy", "all"])]
    kind: Option<String>,
}

#[derive(Subcommand)]
enum EndpointCommand {
    /// List endpoints with their counters.
    #[command(alias = "ls")]
    List(ClientArgs),
    /// Change an endpoint's bandwidth limits at run time:
    /// `hypha endpoint config 7 egress-rate=10M ingress-rate=1.5G`.
    ///
    /// Rates are bits per second and bursts bits, with SI units (k, M, G, T: powers of
    /// 1000). `egress-rate=none` removes the egress limit (and its burst). Settings not
    /// given are kept.
    Config {
        /// Endpoint id, container id, or a unique prefix of a container id.
        endpoint: String,
        /// egress-rate=RATE, ingress-rate=RATE, egress-burst=BITS, ingress-burst=BITS
        /// (each may be `none`).
        #[arg(required = true, value_name = "KEY=VALUE")]
        settings: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Trace an endpoint's packets through the eBPF programs into the agent's log
    /// (what each program received and what it did with it), or stop: saved with the
    /// endpoint.
    Debug {
        /// Endpoint id, container id, or a unique prefix of a container id.
        endpoint: String,
        #[arg(value_enum)]
        switch: Switch,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change a running endpoint's labels (`app=web` sets, `app-` removes, as `kubectl
    /// label`): it moves to the identity of its new labels, and policies follow.
    Label {
        /// Endpoint id, container id, or a unique prefix of a container id.
        endpoint: String,
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        labels: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Set (replace) an endpoint's named ports, which NetworkPolicy ports may name:
    /// `hypha endpoint ports 7 http=8080/tcp dns=53/udp` (no ports: removes them all).
    Ports {
        /// Endpoint id, container id, or a unique prefix of a container id.
        endpoint: String,
        /// NAME=NUMBER[/PROTOCOL], protocol tcp (default), udp or sctp.
        #[arg(value_name = "NAME=NUMBER[/PROTO]")]
        ports: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Apply policy files (NetworkPolicy, HyphaNetworkPolicy; YAML or JSON), all or none.
    Apply {
        /// A file, or a directory (its *.yaml, *.yml and *.json files, in name order).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a policy applied with `hypha policy apply`.
    #[command(alias = "rm")]
    Delete {
        name: String,
        /// The policy's namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the policies in force.
    #[command(alias = "ls")]
    List(ClientArgs),
    /// Show what an endpoint enforces: its identity, flags and policy entries.
    Get {
        /// Endpoint id, container id, or a unique prefix of a container id.
        endpoint: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Apply service files (Service, EndpointSlice as Kubernetes writes them; YAML or
    /// JSON), all or none.
    Apply {
        /// A file, or a directory (its *.yaml, *.yml and *.json files, in name order).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a service (or an EndpointSlice): `NAMESPACE/NAME`, or `NAME` with -n.
    #[command(alias = "rm")]
    Delete {
        #[arg(value_name = "NAMESPACE/NAME")]
        name: String,
        /// The service's namespace [default: default]
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the services: ClusterIPs, ports, and each port's backends with their node
    /// and the connections this node sent them.
    #[command(alias = "ls")]
    List(ClientArgs),
}

#[derive(Subcommand)]
enum NamespaceCommand {
    /// Set (KEY=VALUE) and remove (KEY-) labels of a namespace.
    Label {
        namespace: String,
        #[arg(required = true)]
        labels: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List the nodes: addresses, pod CIDRs, last heartbeat, endpoints, agent version
    /// (`*` marks the node answering).
    #[command(alias = "ls")]
    List(ClientArgs),
    /// Remove a node from the cluster store: its record, pod CIDRs, lease and endpoints,
    /// in one transaction; every other node drops its pods. Refused while the node's
    /// agent is alive (its heartbeat fresh) unless --force.
    #[command(alias = "rm")]
    Remove {
        name: String,
        /// Remove it even while its agent still holds its lease.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// List identities: number, kind, what it stands for, endpoints here and elsewhere.
    #[command(alias = "ls")]
    List(ClientArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Args)]
struct ClientArgs {
    /// The agent's API socket.
    #[arg(long, env = "HYPHA_SOCKET", default_value = hypha_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    output: Output,
}

#[derive(Args)]
struct AgentArgs {
    /// YAML configuration file; flags override what it sets.
    #[arg(long, env = "HYPHA_CONFIG")]
    config: Option<PathBuf>,
    /// API socket [default: /run/hypha/agent.sock]
    #[arg(long)]
    socket: Option<PathBuf>,
    /// State directory [default: /var/lib/hypha]
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Pin directory on bpffs [default: /sys/fs/bpf/hypha]
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// This node's pod CIDRs, comma-separated, at most one per family; a list gives
    /// exactly its families [default: 10.244.0.0/24,fd00:10:244::/64]
    #[arg(long)]
    pod_cidr: Option<hypha_agent::config::PodCidrs>,
    /// The pods' IPv4 gateway [default: first address of the IPv4 pod CIDR]; the IPv6
    /// gateway is always fe80::1
    #[arg(long)]
    gateway: Option<std::net::Ipv4Addr>,
    /// Host device carrying the gateway address [default: lo]
    #[arg(long)]
    host_device: Option<String>,
    /// Do not masquerade pod traffic that leaves the pod CIDR.
    #[arg(long)]
    no_masquerade: bool,
    /// Directory of policy files to apply and watch [default: /etc/hypha/policies]
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9962 [default: off]
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// How programs attach to endpoints: tc (clsact + cls_bpf, ~0.3 ms) or tcx (~23 ms,
    /// but leaves the ingress qdisc slot free, e.g. for the reference bandwidth plugin)
    /// [default: tc]
    #[arg(long)]
    attach: Option<hypha_agent::config::AttachMode>,
    /// Cluster mode: the cluster store, etcd=http://IP:2379[,http://IP2:2379]
    /// [default: off, a single node]
    #[arg(long, value_name = "etcd=URL[,URL]")]
    cluster_store: Option<cluster::ClusterStore>,
    /// Cluster mode: this node's name (lowercase letters, digits, '-' and '.')
    #[arg(long)]
    node_name: Option<String>,
    /// Cluster mode: this node's address(es) on the network joining the nodes, at most
    /// one per family
    #[arg(long, value_name = "IP[,IPv6]")]
    node_ip: Option<cluster::NodeIps>,
    /// Cluster mode: the CA certificate that signs etcd's (TLS)
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// Cluster mode: this agent's client certificate for etcd (with --etcd-key)
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    /// Cluster mode: the key of --etcd-cert
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    /// Cluster mode: the CIDRs nodes' pod CIDRs are allocated from, at most one per
    /// family [default: 10.244.0.0/16,fd00:10:244::/48]
    #[arg(long, value_name = "LIST")]
    cluster_cidr: Option<cluster::ClusterCidrs>,
    /// Cluster mode: the prefix length of each node's pod CIDR, one per cluster CIDR,
    /// IPv4 first [default: 24,64]
    #[arg(long, value_name = "LIST")]
    node_cidr_size: Option<cluster::NodeCidrSizes>,
    /// Cluster mode: the prefix of every key in the store [default: /hypha/v1/]
    #[arg(long, hide = true)]
    cluster_prefix: Option<String>,
    /// Cluster mode: how long an identity no endpoint uses is kept [default: 15m]
    #[arg(long, value_name = "DURATION")]
    identity_gc_grace: Option<cluster::Span>,
    /// Cluster mode: the lease of this node's record (heartbeats every third of it)
    /// [default: 15s]
    #[arg(long, hide = true, value_name = "DURATION")]
    node_ttl: Option<cluster::Span>,
    /// Cluster mode: how pods reach other nodes' pods: tunnel (VXLAN, the sender's
    /// identity in the VNI) or native (the underlay routes pod CIDRs) [default: tunnel]
    #[arg(long)]
    routing: Option<hypha_agent::config::routing::RoutingMode>,
    /// Cluster mode, tunnel: the VXLAN device's name [default: hypha_vxlan]
    #[arg(long, value_name = "NAME")]
    tunnel_device: Option<String>,
    /// Cluster mode, tunnel: the VXLAN UDP port (4789 is IANA's) [default: 8472]
    #[arg(long, value_name = "PORT")]
    tunnel_port: Option<u16>,
    /// Cluster mode, tunnel: the VXLAN device's and the pods' MTU [default: the MTU of
    /// the interface holding --node-ip, less 50 (IPv4 underlay) or 70 (IPv6)]
    #[arg(long, value_name = "MTU")]
    tunnel_mtu: Option<u32>,
    /// A CIDR services' ClusterIPs are allocated from; repeat for the other family (at
    /// most one per family; the list gives exactly its families)
    /// [default: 10.96.0.0/16 and fd00:10:96::/112]
    #[arg(long, value_name = "CIDR")]
    service_cidr: Vec<ipnet::IpNet>,
    /// An interface that takes NodePort traffic from outside the node; repeatable
    /// [default: in cluster mode the interface holding --node-ip, else none]
    #[arg(long, value_name = "NAME")]
    nodeport_device: Vec<String>,
    /// Per-flow queues (leaf classes) of each bandwidth limiter, 1 to 256 [default: 64]
    #[arg(long, value_name = "N")]
    fq_queues: Option<u16>,
}

impl AgentArgs {
    fn resolve(self) -> Result<hypha_agent::config::AgentConfig, ConfigError> {
        let file = match &self.config {
            Some(p) => ConfigFile::read(p)?,
            None => ConfigFile::default(),
        };
        let flags = ConfigFile {
            socket: self.socket,
            state_dir: self.state_dir,
            pin_dir: self.pin_dir,
            pod_cidrs: self.pod_cidr,
            pod_cidr: None,
            gateway: self.gateway,
            host_device: self.host_device,
            masquerade: self.no_masquerade.then_some(false),
            policy_dir: self.policy_dir,
            metrics_addr: self.metrics_addr,
            attach: self.attach,
            cluster_store: self.cluster_store,
            node_name: self.node_name,
            node_ip: self.node_ip,
            etcd_ca: self.etcd_ca,
            etcd_cert: self.etcd_cert,
            etcd_key: self.etcd_key,
            cluster_cidr: self.cluster_cidr,
            node_cidr_size: self.node_cidr_size,
            cluster_prefix: self.cluster_prefix,
            identity_gc_grace: self.identity_gc_grace,
            node_ttl: self.node_ttl,
            routing: self.routing,
            tunnel_device: self.tunnel_device,
            tunnel_port: self.tunnel_port,
            tunnel_mtu: self.tunnel_mtu,
            service_cidrs: (!self.service_cidr.is_empty()).then_some(self.service_cidr),
            nodeport_devices: (!self.nodeport_device.is_empty()).then_some(self.nodeport_device),
            fq_queues: self.fq_queues,
        };
        file.merge(flags).resolve()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("hypha: {}", hypha_api::error_chain(e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        // netlink-packet-route warns about every attribute newer than itself.
                        .unwrap_or_else(|_| "info,netlink_packet_route=error".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let config = args.resolve()?;
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(hypha_agent::daemon::run(config))
        }
        Command::Monitor(args) => {
            let client = Client::new(&args.client.socket)?;
            let json = matches!(args.client.output, Output::Json);
            client.monitor(args.endpoint, args.kind.as_deref(), |line| {
                let shown = if json {
                    line.to_owned()
                } else {
                    hypha_agent::cli::format_event(line)
                };
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                // Stop when whoever reads us goes away (a closed pipe).
                writeln!(out, "{shown}").and_then(|()| out.flush()).is_ok()
            })?;
            Ok(())
        }
        Command::Status(args) => {
            let status = Client::new(&args.socket)?.status()?;
            print(args.output, &status, format_status)
        }
        Command::State(args) => {
            let state: hypha_agent::state::PersistedState = Client::new(&args.socket)?.state()?;
            print(args.output, &state, |s| {
                format!(
                    "endpoints: {}\naddress reservations: {}\npolicies: {}\nlabelled namespaces: {}\nnext endpoint id: {}\n",
                    s.endpoints.len(),
                    s.ipam.allocations.len(),
                    s.policies.len(),
                    s.namespace_labels.len(),
                    s.next_endpoint_id
                )
            })
        }
        Command::Endpoint(EndpointCommand::List(args)) => {
            let eps = Client::new(&args.socket)?.endpoints()?;
            print(args.output, &eps, |e| format_endpoints(e))
        }
        Command::Endpoint(EndpointCommand::Config {
            endpoint,
            settings,
            client,
        }) => {
            let api = Client::new(&client.socket)?;
            // The agent resolves `endpoint` the same way; read its current limits first,
            // so that settings not given are kept.
            let eps = api.endpoints()?;
            let current = eps
                .iter()
                .find(|e| e.id.to_string() == endpoint || e.container_id == endpoint)
                .or_else(|| {
                    let mut m = eps
                        .iter()
                        .filter(|e| e.container_id.starts_with(endpoint.as_str()));
                    match (m.next(), m.next()) {
                        (Some(e), None) => Some(e),
                        _ => None,
                    }
                })
                .ok_or_else(|| anyhow::anyhow!("no endpoint with id or container id {endpoint}"))?;
            let bw = hypha_agent::bandwidth::apply_settings(current.bandwidth, &settings)?
                .unwrap_or_default();
            let ep = api.set_bandwidth(&current.id.to_string(), &bw)?;
            print(client.output, &ep, |e| {
                format_endpoints(std::slice::from_ref(e))
            })
        }
        Command::Endpoint(EndpointCommand::Debug {
            endpoint,
            switch,
            client,
        }) => {
            let on = matches!(switch, Switch::On);
            let ep = Client::new(&client.socket)?.set_debug(&endpoint, on)?;
            print(client.output, &ep, |e| {
                format_endpoints(std::slice::from_ref(e))
            })
        }
        Command::Endpoint(EndpointCommand::Label {
            endpoint,
            labels,
            client,
        }) => {
            let req = parse_label_args(&labels).map_err(anyhow::Error::msg)?;
            let req = hypha_api::EndpointLabelsRequest {
                set: req.set,
                remove: req.remove,
            };
            let ep = Client::new(&client.socket)?.set_endpoint_labels(&endpoint, &req)?;
            print(client.output, &ep, |e| {
                format_endpoints(std::slice::from_ref(e))
            })
        }
        Command::Endpoint(EndpointCommand::Ports {
            endpoint,
            ports,
            client,
        }) => {
            let ports = ports
                .iter()
                .map(|p| hypha_api::parse_named_port(p, '='))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let ep = Client::new(&client.socket)?.set_endpoint_ports(&endpoint, &ports)?;
            print(client.output, &ep, |e| {
                format_endpoints(std::slice::from_ref(e))
            })
        }
        Command::Policy(PolicyCommand::Apply { files, client }) => {
            let sources = read_policy_files(&files)?;
            if sources.is_empty() {
                anyhow::bail!("no policy files (*.yaml, *.yml, *.json) in {files:?}");
            }
            let resp = Client::new(&client.socket)?.apply_policies(&sources)?;
            print(client.output, &resp, format_applied)
        }
        Command::Policy(PolicyCommand::Delete {
            name,
            namespace,
            client,
        }) => {
            let resp = Client::new(&client.socket)?.delete_policy(&namespace, &name)?;
            print(client.output, &resp, |p| {
                format!("policy {}/{} deleted\n", p.namespace, p.name)
            })
        }
        Command::Policy(PolicyCommand::List(args)) => {
            let ps = Client::new(&args.socket)?.policies()?;
            print(args.output, &ps, |p| format_policies(p))
        }
        Command::Policy(PolicyCommand::Get { endpoint, client }) => {
            let p = Client::new(&client.socket)?.endpoint_policy(&endpoint)?;
            print(client.output, &p, format_endpoint_policy)
        }
        Command::Service(ServiceCommand::Apply { files, client }) => {
            let sources = read_policy_files(&files)?;
            if sources.is_empty() {
                anyhow::bail!("no service files (*.yaml, *.yml, *.json) in {files:?}");
            }
            let resp = Client::new(&client.socket)?.apply_services(&sources)?;
            print(client.output, &resp, format_services_applied)
        }
        Command::Service(ServiceCommand::Delete {
            name,
            namespace,
            client,
        }) => {
            let (namespace, name) =
                parse_service_ref(&name, namespace.as_deref()).map_err(anyhow::Error::msg)?;
            Client::new(&client.socket)?.delete_service(&namespace, &name)?;
            let deleted = serde_json::json!({ "deleted": format!("{namespace}/{name}") });
            print(client.output, &deleted, |_| {
                format!("service {namespace}/{name} deleted\n")
            })
        }
        Command::Service(ServiceCommand::List(args)) => {
            let services = Client::new(&args.socket)?.services()?;
            print(args.output, &services, |s| format_services(s))
        }
        Command::Namespace(NamespaceCommand::Label {
            namespace,
            labels,
            client,
        }) => {
            let req = parse_label_args(&labels).map_err(anyhow::Error::msg)?;
            let resp = Client::new(&client.socket)?.set_namespace_labels(&namespace, &req)?;
            print(client.output, &resp, |n| format_labels(&n.labels))
        }
        Command::Node(NodeCommand::List(args)) => {
            let nodes = Client::new(&args.socket)?.nodes()?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            print(args.output, &nodes, |n| format_nodes(n, now))
        }
        Command::Node(NodeCommand::Remove {
            name,
            force,
            client,
        }) => {
            let resp = Client::new(&client.socket)?.remove_node(&name, force)?;
            print(client.output, &resp, format_removed_node)
        }
        Command::Identity(IdentityCommand::List(args)) => {
            let ids = Client::new(&args.socket)?.identities()?;
            print(args.output, &ids, |i| format_identities(i))
        }
        // The container verbs exit with their own code (`run`: the container's).
        Command::Run(args) => exit(launcher::run(*args)?),
        Command::Ps(args) => exit(launcher::ps(args)?),
        Command::Exec(args) => exit(launcher::exec(args)?),
        Command::Stop(args) => exit(launcher::stop(args)?),
        Command::Rm(args) => exit(launcher::rm(args)?),
        Command::Logs(args) => exit(launcher::logs(args)?),
        Command::Image(cmd) => exit(hypha_launcher::image::cli::image(cmd)?),
    }
}

fn exit(code: i32) -> anyhow::Result<()> {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

fn print<T: serde::Serialize + ?Sized>(
    output: Output,
    value: &T,
    text: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Text => print!("{}", text(value)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("hypha").chain(args.iter().copied()))
    }

    #[test]
    fn service_commands_parse() {
        let Command::Service(ServiceCommand::Apply { files, .. }) =
            parse(&["service", "apply", "-f", "a.yaml", "-f", "dir"])
                .unwrap()
                .command
        else {
            panic!("not service apply");
        };
        assert_eq!(files, [PathBuf::from("a.yaml"), PathBuf::from("dir")]);
        assert!(parse(&["service", "apply"]).is_err(), "-f is required");
        let Command::Service(ServiceCommand::Delete {
            name, namespace, ..
        }) = parse(&["svc", "delete", "-n", "shop", "web"])
            .unwrap()
            .command
        else {
            panic!("not service delete");
        };
        assert_eq!((name.as_str(), namespace.as_deref()), ("web", Some("shop")));
        let Command::Service(ServiceCommand::Delete {
            name, namespace, ..
        }) = parse(&["services", "rm", "shop/web"]).unwrap().command
        else {
            panic!("not service delete");
        };
        assert_eq!((name.as_str(), namespace), ("shop/web", None));
        let Command::Service(ServiceCommand::List(args)) =
            parse(&["service", "list", "-o", "json"]).unwrap().command
        else {
            panic!("not service list");
        };
        assert!(matches!(args.output, Output::Json));
        assert!(parse(&["service", "ls"]).is_ok());
    }

    fn agent_config(args: &[&str]) -> Result<hypha_agent::config::AgentConfig, String> {
        let mut all = vec!["agent"];
        all.extend_from_slice(args);
        let Command::Agent(a) = parse(&all).map_err(|e| e.to_string())?.command else {
            panic!("not agent");
        };
        a.resolve().map_err(|e| e.to_string())
    }

    #[test]
    fn service_flags_reach_the_config() {
        let c = agent_config(&[]).unwrap();
        assert_eq!(
            (
                c.service_cidrs.v4.unwrap().to_string(),
                c.service_cidrs.v6.unwrap().to_string()
            ),
            ("10.96.0.0/16".to_owned(), "fd00:10:96::/112".to_owned())
        );
        assert!(c.nodeport_devices.is_empty());
        let c = agent_config(&[
            "--service-cidr",
            "10.100.0.0/20",
            "--nodeport-device",
            "eth0",
            "--nodeport-device",
            "eth1",
        ])
        .unwrap();
        assert_eq!(c.service_cidrs.v4.unwrap().to_string(), "10.100.0.0/20");
        assert_eq!(
            c.service_cidrs.v6, None,
            "the list gives exactly its families"
        );
        assert_eq!(c.nodeport_devices, ["eth0", "eth1"]);
        let c = agent_config(&[
            "--service-cidr",
            "fd00:20::/112",
            "--service-cidr",
            "10.100.0.0/20",
        ])
        .unwrap();
        assert!(c.service_cidrs.v4.is_some() && c.service_cidrs.v6.is_some());
        let err = agent_config(&["--service-cidr", "banana"]).unwrap_err();
        assert!(err.contains("banana"), "{err}");
        let err = agent_config(&[
            "--service-cidr",
            "10.100.0.0/20",
            "--service-cidr",
            "10.101.0.0/20",
        ])
        .unwrap_err();
        assert!(
            err.contains("10.101.0.0/20") && err.contains("two IPv4"),
            "{err}"
        );
        let err = agent_config(&["--nodeport-device", "a/b"]).unwrap_err();
        assert!(err.contains("a/b"), "{err}");
    }
}
