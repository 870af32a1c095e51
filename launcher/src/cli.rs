//! The command-line side of `hypha run`, `ps`, `exec`, `stop`, `rm` and `logs`: clap
//! arguments and one function per verb returning the process's exit code. The `hypha`
//! binary only wires them in.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::cni::{DEFAULT_CNI_PATH, DEFAULT_CONF_DIR};
use crate::image::cli::ImageDirArg;
use crate::lifecycle;
use crate::limits::{self, LimitError, Limits};
use crate::ports::{self, NamedPort};
use crate::run::{RunError, RunOptions};
use crate::state::{DEFAULT_RUN_DIR, RunDir};

// Where containers' state lives; shared by every verb. (A plain comment: a doc comment
// here would become the `about` of every command that flattens it.)
#[derive(Args, Debug, Clone)]
pub struct RunDirArg {
    /// Directory of the containers' state.
    #[arg(long = "run-dir", env = "HYPHA_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
}

impl RunDirArg {
    fn run_dir(&self) -> RunDir {
        RunDir(self.run_dir.clone())
    }
}

fn memory(v: &str) -> Result<u64, LimitError> {
    limits::parse_memory(v)
}
fn cpus(v: &str) -> Result<u64, LimitError> {
    limits::parse_cpus(v)
}
fn pids(v: &str) -> Result<u64, LimitError> {
    limits::parse_pids(v)
}
fn egress(v: &str) -> Result<u64, LimitError> {
    limits::parse_rate("--egress-rate", v)
}
fn ingress(v: &str) -> Result<u64, LimitError> {
    limits::parse_rate("--ingress-rate", v)
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Container name (and hostname) [default: the first 12 digits of its id]
    #[arg(long)]
    pub name: Option<String>,
    /// Namespace passed to CNI plugins as K8S_POD_NAMESPACE.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// A label key=value, passed to plugins in args.cni.labels (repeatable).
    #[arg(long = "label", short = 'l')]
    pub labels: Vec<String>,
    /// A named port, e.g. http:8080 or dns:53/udp (tcp by default; tcp, udp or sctp),
    /// passed to plugins in args.cni.namedPorts, for NetworkPolicies naming a port
    /// (repeatable).
    #[arg(long = "port", value_name = "NAME:NUMBER[/PROTO]", value_parser = ports::parse_port)]
    pub ports: Vec<NamedPort>,
    /// CNI network name, or `none` [default: the first configuration by file name]
    #[arg(long)]
    pub network: Option<String>,
    /// CNI network configuration directory.
    #[arg(long, env = "CNI_CONF_DIR", default_value = DEFAULT_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// Directories searched for CNI plugins, colon-separated.
    #[arg(long, env = "CNI_PATH", default_value = DEFAULT_CNI_PATH)]
    pub cni_path: String,
    /// Memory limit, e.g. 64M or 1G (no swap on top).
    #[arg(long, value_parser = memory)]
    pub memory: Option<u64>,
    /// CPU limit in CPUs, e.g. 0.5.
    #[arg(long, value_parser = cpus)]
    pub cpus: Option<u64>,
    /// Most processes at once.
    #[arg(long, value_parser = pids)]
    pub pids: Option<u64>,
    /// Egress rate limit in bits/s, e.g. 10mbit (to plugins declaring `bandwidth`).
    #[arg(long, value_parser = egress)]
    pub egress_rate: Option<u64>,
    /// Ingress rate limit in bits/s, e.g. 10mbit (to plugins declaring `bandwidth`).
    #[arg(long, value_parser = ingress)]
    pub ingress_rate: Option<u64>,
    /// Run in the background, output to `hypha logs NAME`; prints the name.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Remove the container's entry when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Root filesystem directory (an overlay over it keeps it unchanged) [default: the
    /// host's root, read-only]
    #[arg(long, conflicts_with = "image")]
    pub rootfs: Option<PathBuf>,
    /// Run an image of the store (`hypha image import`): NAME[:TAG] or ID; its layers
    /// under an overlay, its Entrypoint, Cmd, Env, WorkingDir and User honoured.
    #[arg(long, value_name = "NAME[:TAG]")]
    pub image: Option<String>,
    #[command(flatten)]
    pub image_dir: ImageDirArg,
    /// The program, replacing the image's Entrypoint (and dropping its Cmd); "" clears
    /// it.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Set an environment variable, over the image's (KEY alone: the host's value;
    /// repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The command's working directory, made if missing [default: the image's, or /]
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Run as USER[:GROUP], names (from the container's /etc/passwd and /etc/group) or
    /// numbers [default: the image's, or root]
    #[arg(short = 'u', long = "user", value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// Every capability, no seccomp filter, no no_new_privs.
    #[arg(long)]
    pub privileged: bool,
    /// Add a capability (NET_ADMIN, CAP_NET_ADMIN or ALL; repeatable).
    #[arg(long)]
    pub cap_add: Vec<String>,
    /// Drop a capability (repeatable).
    #[arg(long)]
    pub cap_drop: Vec<String>,
    /// Run in a new user namespace, root mapped to root's range in /etc/subuid.
    #[arg(long)]
    pub userns: bool,
    #[command(flatten)]
    pub run_dir: RunDirArg,
    /// The command and its arguments (with --image: replacing the image's Cmd).
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl RunArgs {
    pub fn options(self) -> RunOptions {
        RunOptions {
            name: self.name,
            namespace: self.namespace,
            labels: self.labels,
            ports: self.ports,
            network: self.network,
            cni_conf_dir: self.cni_conf_dir,
            cni_path: self.cni_path,
            limits: Limits {
                memory: self.memory,
                cpu_quota_us: self.cpus,
                pids: self.pids,
            },
            ingress_rate: self.ingress_rate,
            egress_rate: self.egress_rate,
            detach: self.detach,
            remove: self.rm,
            rootfs: self.rootfs,
            image: self.image,
            image_dir: self.image_dir.image_dir,
            entrypoint: self.entrypoint,
            env: self.env,
            workdir: self.workdir,
            user: self.user,
            privileged: self.privileged,
            cap_add: self.cap_add,
            cap_drop: self.cap_drop,
            userns: self.userns,
            run_dir: self.run_dir.run_dir,
            command: self.command,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct PsArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: Output,
    #[command(flatten)]
    pub run_dir: RunDirArg,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    pub name: String,
    #[command(flatten)]
    pub run_dir: RunDirArg,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    pub names: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    pub time: u64,
    #[command(flatten)]
    pub run_dir: RunDirArg,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    pub names: Vec<String>,
    /// Kill the container first if it is running.
    #[arg(short = 'f', long)]
    pub force: bool,
    #[command(flatten)]
    pub run_dir: RunDirArg,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    pub name: String,
    #[command(flatten)]
    pub run_dir: RunDirArg,
}

/// `hypha run`: the container's exit code (0 once started with `-d`).
pub fn run(args: RunArgs) -> Result<i32, RunError> {
    crate::run::run(&args.options())
}

pub fn ps(args: PsArgs) -> Result<i32, RunError> {
    let list = lifecycle::ps(&args.run_dir.run_dir())?;
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&list).expect("summaries serialize")
        ),
        Output::Text => print!("{}", lifecycle::format_ps(&list)),
    }
    Ok(0)
}

pub fn exec(args: ExecArgs) -> Result<i32, RunError> {
    lifecycle::exec(&args.run_dir.run_dir(), &args.name, &args.command)
}

/// Applies `f` to every name, going on past failures; the first error is returned after
/// the others are printed.
fn each(
    names: &[String],
    mut f: impl FnMut(&str) -> Result<(), RunError>,
) -> Result<i32, RunError> {
    let mut first = None;
    for n in names {
        if let Err(e) = f(n) {
            if first.is_some() {
                eprintln!("hypha: {e}");
            } else {
                first = Some(e);
            }
        }
    }
    first.map_or(Ok(0), Err)
}

pub fn stop(args: StopArgs) -> Result<i32, RunError> {
    let run = args.run_dir.run_dir();
    each(&args.names, |n| {
        lifecycle::stop(&run, n, Duration::from_secs(args.time))
    })
}

pub fn rm(args: RmArgs) -> Result<i32, RunError> {
    let run = args.run_dir.run_dir();
    each(&args.names, |n| lifecycle::rm(&run, n, args.force))
}

pub fn logs(args: LogsArgs) -> Result<i32, RunError> {
    lifecycle::logs(&args.run_dir.run_dir(), &args.name, &mut std::io::stdout())?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunOptions, String> {
        Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .map(|c| c.run.options())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn run_flags() {
        let o = parse(&[
            "--name",
            "web",
            "--memory",
            "64M",
            "--cpus",
            "0.5",
            "--pids",
            "20",
            "--egress-rate",
            "10mbit",
            "--ingress-rate",
            "1G",
            "-l",
            "app=x",
            "--port",
            "http:8080",
            "--port",
            "dns:53/UDP",
            "--cap-add",
            "NET_ADMIN",
            "--cap-drop",
            "CHOWN",
            "-d",
            "--rm",
            "--userns",
            "--network",
            "none",
            "--",
            "sh",
            "-c",
            "echo --memory",
        ])
        .unwrap();
        assert_eq!(o.name.as_deref(), Some("web"));
        assert_eq!(
            o.limits,
            Limits {
                memory: Some(64 << 20),
                cpu_quota_us: Some(50_000),
                pids: Some(20),
            }
        );
        assert_eq!(
            (o.egress_rate, o.ingress_rate),
            (Some(10_000_000), Some(1_000_000_000))
        );
        assert_eq!(o.labels, ["app=x"]);
        assert_eq!(
            o.ports,
            [
                ports::parse_port("http:8080/tcp").unwrap(),
                ports::parse_port("dns:53/udp").unwrap()
            ]
        );
        assert_eq!((o.cap_add.len(), o.cap_drop.len()), (1, 1));
        assert!(o.detach && o.remove && o.userns && !o.privileged);
        assert_eq!(o.network.as_deref(), Some("none"));
        assert_eq!(o.namespace, "default");
        assert_eq!(o.command, ["sh", "-c", "echo --memory"]);
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        for (args, msg) in [
            (&["--memory", "64X"][..], "invalid --memory value \"64X\""),
            (&["--cpus", "lots"][..], "invalid --cpus value"),
            (&["--pids", "1"][..], "at least 2"),
            (
                &["--ingress-rate", "fast"][..],
                "invalid --ingress-rate value",
            ),
            (
                &["--port", "http"][..],
                "invalid --port \"http\": expected NAME:NUMBER[/PROTO]",
            ),
            (
                &["--port", "dns:53/icmp"][..],
                "PROTO must be tcp, udp or sctp",
            ),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(msg), "{args:?}: {e}");
        }
    }

    #[test]
    fn image_flags() {
        let o = parse(&[
            "--image",
            "web:1",
            "--image-dir",
            "/s",
            "--entrypoint",
            "/bin/sh",
            "-e",
            "A=1",
            "--env",
            "B",
            "-w",
            "/srv",
            "--user",
            "www:staff",
            "--",
            "-c",
            "echo",
        ])
        .unwrap();
        assert_eq!(o.image.as_deref(), Some("web:1"));
        assert_eq!(o.image_dir, PathBuf::from("/s"));
        assert_eq!(o.entrypoint.as_deref(), Some("/bin/sh"));
        assert_eq!(o.env, ["A=1", "B"]);
        assert_eq!(o.workdir.as_deref(), Some("/srv"));
        assert_eq!(o.user.as_deref(), Some("www:staff"));
        assert_eq!(o.command, ["-c", "echo"]);
        let e = parse(&["--image", "x", "--rootfs", "/r"]).unwrap_err();
        assert!(e.contains("cannot be used with"), "{e}");
    }

    #[test]
    fn help_shows_the_port_flag() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("--port <NAME:NUMBER[/PROTO]>"), "{help}");
        assert!(help.contains("args.cni.namedPorts"), "{help}");
    }
}
