//! `hypha`: the agent daemon and the operator's commands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hypha_agent::cli::{format_endpoints, format_status};
use hypha_agent::config::{ConfigError, ConfigFile};
use hypha_api::Client;
use ipnet::Ipv4Net;

#[derive(Parser)]
#[command(name = "hypha", version, about = "Hypha: eBPF container networking")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-host agent (needs root).
    Agent(AgentArgs),
    /// Show the running agent's state.
    Status(ClientArgs),
    /// Endpoints (pods) the agent manages.
    #[command(subcommand, alias = "endpoints")]
    Endpoint(EndpointCommand),
}

#[derive(Subcommand)]
enum EndpointCommand {
    /// List endpoints with their counters.
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
    /// This node's pod CIDR [default: 10.244.0.0/24]
    #[arg(long)]
    pod_cidr: Option<Ipv4Net>,
    /// The pods' gateway [default: first address of the pod CIDR]
    #[arg(long)]
    gateway: Option<std::net::Ipv4Addr>,
    /// Host device carrying the gateway address [default: lo]
    #[arg(long)]
    host_device: Option<String>,
    /// Do not masquerade pod traffic that leaves the pod CIDR.
    #[arg(long)]
    no_masquerade: bool,
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
            pod_cidr: self.pod_cidr,
            gateway: self.gateway,
            host_device: self.host_device,
            masquerade: self.no_masquerade.then_some(false),
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
        Command::Status(args) => {
            let status = Client::new(&args.socket)?.status()?;
            print(args.output, &status, format_status)
        }
        Command::Endpoint(EndpointCommand::List(args)) => {
            let eps = Client::new(&args.socket)?.endpoints()?;
            print(args.output, &eps, |e| format_endpoints(e))
        }
    }
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
