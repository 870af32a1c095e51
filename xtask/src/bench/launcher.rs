//! `cargo xtask bench launcher`: wall time from starting a container running `/bin/true`
//! to its exit, for `hypha run` without and with networking, side by side with `crun`
//! and `runc` running the same command on the same host root, and `unshare` (namespaces
//! only, no runtime) as the floor. The setups take turns run by run, so noise on this
//! small shared machine hits them alike; medians and p99 are reported.
//!
//! Images: a busybox image (two layers, written as a Docker archive by hypha-tests'
//! `image-archive`) is imported once, untimed, into a store of the bench's own; then
//! `hypha run --image` starts it (layers already unpacked), crun and runc start a bundle
//! whose rootfs is a read-only overlay of the same unpacked layer directories, and podman
//! (`run --rm --network none`) starts the same archive loaded into its own store (a root
//! of the bench's own, cgroupfs, no systemd). Import throughput: a generated image of
//! three layers of incompressible files (100 MB) imported by `hypha image import` and by
//! `podman load`, a fresh store each round.
//!
//! The whole bench runs in a private mount namespace where `/sys/fs/cgroup/unified` is
//! a tmpfs: crun 1.8 refuses the cgroup v1 "hybrid" layout of this machine otherwise
//! ("cgroups in hybrid mode not supported"). Every runtime sees the same v1 controllers.
//! The agent finds the cgroup v2 hierarchy (for its socket load balancer) mounted below
//! that tmpfs, where no runtime looks.
//! runc refuses `/` as a root filesystem: the OCI bundle's rootfs, shared by crun and
//! runc, is an overlay over `/` (it vanishes with the mount namespace).
//!
//! Hypha with networking runs against an agent in a node network namespace of its own;
//! the launcher is started inside it with `setns` between fork and exec, so no `nsenter`
//! is timed.

use super::Target;
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::median;
use super::svg::{self, BarChart, Series};
use super::teardown::{Teardown, Undo};
use crate::util::{output, workspace_root};

/// Hypha's targets: without networking at most crun's time; with networking at most
/// 20 ms above it.
const TARGET_NET_ABOVE_CRUN_MS: f64 = 20.0;
/// `hypha run --image` at most this much above `hypha run` on the host root.
const TARGET_IMAGE_ABOVE_HYPHA_MS: f64 = 5.0;
/// The reference of the image the image setups run.
const BENCH_IMAGE: &str = "hypl-bench:1";

#[derive(clap::Args)]
pub struct Options {
    /// Container starts per setup; the setups take turns [default: 50, 5 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: Option<u32>,
    /// Setups to compare, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Kind::ALL)]
    setups: Vec<Kind>,
    /// Size of the generated three-layer image for the import throughput, in MB (0: no
    /// import measurement) [default: 100, 10 with --quick].
    #[arg(long)]
    import_mb: Option<u64>,
    /// Imports per tool [default: 3, 1 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=20))]
    import_rounds: Option<u32>,
    /// A short run: fewer starts, a smaller image, one import each.
    #[arg(long)]
    quick: bool,
    /// Directory of the `hypha`, `hypha-cni` and `image-archive` binaries (default
    /// `target/release`; then the release build is skipped).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

impl Options {
    /// Whether `--bin-dir` was given.
    pub fn has_bin_dir(&self) -> bool {
        self.bin_dir.is_some()
    }
    fn runs(&self) -> u32 {
        self.runs.unwrap_or(if self.quick { 5 } else { 50 })
    }
    fn import_mb(&self) -> u64 {
        self.import_mb.unwrap_or(if self.quick { 10 } else { 100 })
    }
    fn import_rounds(&self) -> u32 {
        self.import_rounds.unwrap_or(if self.quick { 1 } else { 3 })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Unshare,
    Crun,
    Runc,
    Hypha,
    HyphaNet,
    HyphaImage,
    CrunImage,
    RuncImage,
    Podman,
}

impl Kind {
    const ALL: [Kind; 9] = [
        Kind::Unshare,
        Kind::Crun,
        Kind::Runc,
        Kind::Hypha,
        Kind::HyphaNet,
        Kind::HyphaImage,
        Kind::CrunImage,
        Kind::RuncImage,
        Kind::Podman,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Unshare => "unshare",
            Kind::Crun => "crun",
            Kind::Runc => "runc",
            Kind::Hypha => "hypha",
            Kind::HyphaNet => "hypha+net",
            Kind::HyphaImage => "hypha-image",
            Kind::CrunImage => "crun-image",
            Kind::RuncImage => "runc-image",
            Kind::Podman => "podman",
        }
    }

    fn uses_image(self) -> bool {
        matches!(
            self,
            Kind::HyphaImage | Kind::CrunImage | Kind::RuncImage | Kind::Podman
        )
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Unshare => {
                "unshare --pid --fork --mount --uts --ipc --net --mount-proc (the floor)"
            }
            Kind::Crun => "crun run, OCI bundle: overlay over /, default runc spec",
            Kind::Runc => "runc run, the same bundle",
            Kind::Hypha => "hypha run --network none (host root read-only, cgroup, seccomp)",
            Kind::HyphaNet => "hypha run with a hypha-cni network (CNI ADD and DEL)",
            Kind::HyphaImage => {
                "hypha run --image --network none (busybox image, layers unpacked, overlay)"
            }
            Kind::CrunImage => "crun run, OCI bundle: read-only overlay of the image's layers",
            Kind::RuncImage => "runc run, the image bundle",
            Kind::Podman => {
                "podman run --rm --network none, the same image in podman's store (cgroupfs)"
            }
        }
    }
}

/// The bench image, imported into a store of the bench's own.
struct BenchImage {
    archive: PathBuf,
    image_dir: PathBuf,
    /// The unpacked layer directories, base first.
    layers: Vec<PathBuf>,
}

/// podman with a store, run root and settings of the bench's own: no systemd (cgroupfs,
/// file events), and limits this host's hard limits allow (podman's defaults exceed them).
fn podman(tmp: &Path) -> Vec<String> {
    let dir = tmp.join("podman");
    vec![
        "podman".into(),
        "--root".into(),
        dir.join("root").display().to_string(),
        "--runroot".into(),
        dir.join("run").display().to_string(),
        "--cgroup-manager".into(),
        "cgroupfs".into(),
        "--events-backend".into(),
        "file".into(),
    ]
}

fn podman_run_args() -> [&'static str; 8] {
    [
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
    ]
}

/// Writes the bench image's Docker archive, imports it (untimed) and asks the store for
/// its layer directories.
fn bench_image(bin: &Path, tmp: &Path) -> Result<BenchImage> {
    let archive = tmp.join("bench-image.tar");
    let image_dir = tmp.join("images");
    output(
        Command::new(bin.join("image-archive"))
            .args(["busybox", "--reference", BENCH_IMAGE, "--out"])
            .arg(&archive),
    )
    .context("writing the bench image (hypha-tests' image-archive)")?;
    output(
        Command::new(bin.join("hypha"))
            .args(["image", "import", "--image-dir"])
            .arg(&image_dir)
            .arg(&archive),
    )
    .context("hypha image import of the bench image")?;
    let layers = output(
        Command::new(bin.join("image-archive"))
            .args(["layers", "--image-dir"])
            .arg(&image_dir)
            .arg(BENCH_IMAGE),
    )
    .context("the bench image's layers")?
    .lines()
    .map(PathBuf::from)
    .collect::<Vec<_>>();
    if layers.is_empty() {
        bail!("the store lists no layers for {BENCH_IMAGE}");
    }
    Ok(BenchImage {
        archive,
        image_dir,
        layers,
    })
}

/// How one setup starts its container.
struct Setup {
    kind: Kind,
    /// The program and arguments; `{}` in an argument becomes a unique container id.
    argv: Vec<String>,
    /// A network namespace to start the command in (hypha+net: the node's).
    netns: Option<File>,
    error: Option<String>,
    times_ms: Vec<f64>,
    failures: Vec<String>,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    runs: u32,
    quick: bool,
    kernel: String,
    nproc: usize,
    timestamp_unix: u64,
    versions: Vec<(String, Option<String>)>,
    setups: Vec<SetupReport>,
    imports: Vec<ImportReport>,
    targets: Vec<Target>,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct SetupReport {
    name: &'static str,
    description: &'static str,
    command: String,
    error: Option<String>,
    failures: Vec<String>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    min_ms: Option<f64>,
    times_ms: Vec<f64>,
}

fn check(ret: libc::c_int, what: &str) -> Result<()> {
    if ret != 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Moves this (still single-threaded) process into a private mount namespace without
/// the empty cgroup2 mount of the hybrid layout.
fn private_mount_namespace() -> Result<()> {
    // SAFETY: plain system calls with valid C strings; unshare(CLONE_NEWNS) needs a
    // single-threaded caller, which this is before the teardown's Ctrl-C thread starts.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS), "unshare(CLONE_NEWNS)")?;
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            "making / private",
        )?;
        if Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
            check(
                libc::umount2(c"/sys/fs/cgroup/unified".as_ptr(), libc::MNT_DETACH),
                "unmounting /sys/fs/cgroup/unified",
            )?;
            // An empty tmpfs of this namespace's own in its place: what podman writes
            // there (its v2 parent cgroup, as plain files) vanishes with the namespace
            // instead of landing on the host's /sys/fs/cgroup, where crun would then see
            // a hybrid layout.
            check(
                libc::mount(
                    c"tmpfs".as_ptr(),
                    c"/sys/fs/cgroup/unified".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    c"mode=755".as_ptr().cast(),
                ),
                "mounting a private tmpfs on /sys/fs/cgroup/unified",
            )?;
            // The agent attaches its socket load balancer to the cgroup v2 root, and
            // mounts the hierarchy where it finds none, which crun would then see. Here
            // it finds this one, which no runtime looks at.
            check(
                libc::mkdir(c"/sys/fs/cgroup/unified/hypha-v2".as_ptr(), 0o755),
                "making /sys/fs/cgroup/unified/hypha-v2",
            )?;
            check(
                libc::mount(
                    c"cgroup2".as_ptr(),
                    c"/sys/fs/cgroup/unified/hypha-v2".as_ptr(),
                    c"cgroup2".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ),
                "mounting the cgroup v2 hierarchy at /sys/fs/cgroup/unified/hypha-v2",
            )?;
        }
    }
    Ok(())
}

pub fn run(o: &Options) -> Result<()> {
    let root = workspace_root();
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let bin = o
        .bin_dir
        .clone()
        .unwrap_or_else(|| root.join("target/release"));
    private_mount_namespace()?;
    let td = Teardown::install()?;
    let uniq = std::process::id();
    let tmp = std::env::temp_dir().join(format!("hypl-{uniq}"));
    td.make(Undo::Dir(tmp.clone()), || {
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))
    })?;

    let mut kinds: Vec<Kind> = Vec::new();
    for k in &o.setups {
        if !kinds.contains(k) {
            kinds.push(*k);
        }
    }
    let image = kinds.iter().any(|k| k.uses_image()).then(|| {
        println!("==> writing and importing the bench image {BENCH_IMAGE}");
        bench_image(&bin, &tmp).map_err(|e| {
            eprintln!("    FAILED: {e:#}");
            format!("{e:#}")
        })
    });
    let image = image.as_ref().map(|r| r.as_ref());
    let image_or_err = || -> Result<&BenchImage> {
        match image {
            Some(Ok(i)) => Ok(i),
            Some(Err(e)) => Err(anyhow::anyhow!("the bench image: {e}")),
            None => Err(anyhow::anyhow!("no bench image")),
        }
    };
    let mut setups: Vec<Setup> = kinds
        .iter()
        .map(|&kind| {
            println!("==> setting up {}: {}", kind.name(), kind.describe());
            let made = match kind {
                Kind::Unshare => Ok((
                    [
                        "unshare",
                        "--pid",
                        "--fork",
                        "--mount",
                        "--uts",
                        "--ipc",
                        "--net",
                        "--mount-proc",
                        "/bin/true",
                    ]
                    .map(String::from)
                    .to_vec(),
                    None,
                )),
                Kind::HyphaImage => image_or_err().map(|i| {
                    let dir = i.image_dir.display().to_string();
                    let argv = hypha_argv(
                        &bin,
                        &tmp,
                        &[
                            "--network",
                            "none",
                            "--image-dir",
                            &dir,
                            "--image",
                            BENCH_IMAGE,
                        ],
                    );
                    (argv, None)
                }),
                Kind::CrunImage | Kind::RuncImage => image_or_err()
                    .and_then(|i| image_bundle(&tmp, &i.layers))
                    .map(|bundle| {
                        let rt = if kind == Kind::CrunImage {
                            "crun"
                        } else {
                            "runc"
                        };
                        let argv = vec![
                            rt.to_owned(),
                            "run".into(),
                            "--bundle".into(),
                            bundle.display().to_string(),
                            format!("hypl-{uniq}-img-{{}}"),
                        ];
                        (argv, None)
                    }),
                Kind::Podman => image_or_err().and_then(|i| {
                    output(
                        Command::new("podman")
                            .args(&podman(&tmp)[1..])
                            .args(["load", "-q", "-i"])
                            .arg(&i.archive),
                    )
                    .context("podman load (is podman installed? `cargo xtask setup`)")?;
                    let mut argv = podman(&tmp);
                    argv.extend(podman_run_args().map(String::from));
                    argv.extend([format!("localhost/{BENCH_IMAGE}"), "/bin/true".into()]);
                    Ok((argv, None))
                }),
                Kind::Crun | Kind::Runc => oci_bundle(&tmp).map(|bundle| {
                    let rt = kind.name().to_owned();
                    let argv = vec![
                        rt,
                        "run".into(),
                        "--bundle".into(),
                        bundle.display().to_string(),
                        format!("hypl-{uniq}-{{}}"),
                    ];
                    (argv, None)
                }),
                Kind::Hypha => Ok((hypha_argv(&bin, &tmp, &["--network", "none"]), None)),
                Kind::HyphaNet => node(&bin, &tmp, &td, uniq).map(|(conf_dir, netns)| {
                    let conf = conf_dir.display().to_string();
                    let cni_path = bin.display().to_string();
                    let argv = hypha_argv(
                        &bin,
                        &tmp,
                        &[
                            "--network",
                            "bench",
                            "--cni-conf-dir",
                            &conf,
                            "--cni-path",
                            &cni_path,
                        ],
                    );
                    (argv, Some(netns))
                }),
            };
            let (argv, netns, error) = match made {
                Ok((argv, netns)) => (argv, netns, None),
                Err(e) => {
                    eprintln!("    FAILED: {e:#}");
                    (vec![], None, Some(format!("{e:#}")))
                }
            };
            Setup {
                kind,
                argv,
                netns,
                error,
                times_ms: vec![],
                failures: vec![],
            }
        })
        .collect();

    let runs = o.runs();
    println!("==> {runs} runs of /bin/true per setup, setups taking turns");
    // One warm-up run each (page cache, first cgroup creation), not counted.
    for i in 0..=runs {
        let n = setups.len();
        for k in 0..n {
            let s = &mut setups[(i as usize + k) % n];
            if s.error.is_some() {
                continue;
            }
            match time_once(s, i) {
                Ok(ms) if i > 0 => s.times_ms.push(ms),
                Ok(_) => {}
                Err(e) => {
                    if s.failures.len() < 5 {
                        eprintln!("    {}: {e:#}", s.kind.name());
                    }
                    s.failures.push(format!("{e:#}"));
                    if s.failures.len() >= 5 && s.times_ms.is_empty() {
                        s.error = Some(format!("failed 5 times: {e:#}"));
                    }
                }
            }
        }
        if i > 0 && i % 10 == 0 {
            println!("    {i}/{runs}");
        }
    }
    let imports = if o.import_mb() > 0 {
        import_throughput(o, &bin, &tmp)
    } else {
        vec![]
    };
    drop(
        setups
            .iter_mut()
            .map(|s| s.netns.take())
            .collect::<Vec<_>>(),
    );

    let mut errors = vec![];
    println!("==> cleaning up");
    if kinds.contains(&Kind::Podman) {
        errors.extend(remove_podman_parent_cgroups());
    }
    // Mounts under the bench's directory (the bundle's overlay, anything a runtime left)
    // must go before the directory: deepest first.
    errors.extend(unmount_under(&tmp));
    if let Err(e) = td.finish() {
        errors.push(format!("{e:#}"));
    }
    let report = report(o, setups, imports, errors);
    print_table(&report);
    super::write_outputs(
        &out_dir,
        "launcher",
        &report,
        chart(&report),
        &report.errors,
    )
}

/// podman (cgroupfs) leaves its parent cgroup `libpod_parent` in every v1 hierarchy:
/// removed once empty, deepest first.
fn remove_podman_parent_cgroups() -> Vec<String> {
    let mut errors = vec![];
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return errors;
    };
    // `unified` is the bench's private tmpfs here: it goes with the namespace.
    for h in hierarchies
        .filter_map(|e| e.ok())
        .filter(|h| h.file_name() != "unified")
    {
        let parent = h.path().join("libpod_parent");
        if !parent.is_dir() {
            continue;
        }
        let mut dirs = vec![parent.clone()];
        if let Ok(children) = std::fs::read_dir(&parent) {
            dirs.extend(
                children
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.is_dir()),
            );
        }
        for d in dirs.iter().rev() {
            if let Err(e) = std::fs::remove_dir(d) {
                errors.push(format!("removing podman's cgroup {}: {e}", d.display()));
            }
        }
    }
    errors
}

/// Unmounts every mount of this mount namespace under `dir`, deepest first.
fn unmount_under(dir: &Path) -> Vec<String> {
    let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    let mut errors = vec![];
    for p in points {
        let Ok(c) = std::ffi::CString::new(p.clone()) else {
            continue;
        };
        // SAFETY: a valid C string; unmounting what this bench (or a runtime it ran) made.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = std::io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
                errors.push(format!("unmounting {p}: {e}"));
            }
        }
    }
    errors
}

/// `hypha run --rm` of `/bin/true` with its state in the bench's directory.
fn hypha_argv(bin: &Path, tmp: &Path, extra: &[&str]) -> Vec<String> {
    let mut argv = vec![
        bin.join("hypha").display().to_string(),
        "run".into(),
        "--rm".into(),
        "--run-dir".into(),
        tmp.join("run").display().to_string(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv.extend(["--".into(), "/bin/true".into()]);
    argv
}

/// Starts one container and waits for its exit; the wall time in milliseconds.
fn time_once(s: &Setup, i: u32) -> Result<f64> {
    let argv: Vec<String> = s
        .argv
        .iter()
        .map(|a| a.replace("{}", &i.to_string()))
        .collect();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(ns) = &s.netns {
        let fd = ns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; `fd` stays open for the whole bench.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let start = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", argv[0]))?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "{} exited with {}: {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(ms)
}

/// An OCI bundle for crun and runc: `runc spec`'s default configuration running
/// `/bin/true` without a terminal, on a read-only overlay over `/`.
fn oci_bundle(tmp: &Path) -> Result<PathBuf> {
    bundle(tmp, "bundle", &[PathBuf::from("/")])
}

/// The same, on a read-only overlay of the image's layer directories (`layers` base first).
fn image_bundle(tmp: &Path, layers: &[PathBuf]) -> Result<PathBuf> {
    let top_first: Vec<PathBuf> = layers.iter().rev().cloned().collect();
    bundle(tmp, "image-bundle", &top_first)
}

/// A bundle `tmp/NAME` whose rootfs is an overlay of `lower` (topmost first), its upper
/// and work directories beside it.
fn bundle(tmp: &Path, name: &str, lower: &[PathBuf]) -> Result<PathBuf> {
    let bundle = tmp.join(name);
    let rootfs = bundle.join("rootfs");
    if rootfs.join("bin").exists() {
        return Ok(bundle);
    }
    let (upper, work) = (
        tmp.join(format!("{name}-upper")),
        tmp.join(format!("{name}-work")),
    );
    for d in [&rootfs, &upper, &work] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    output(Command::new("runc").args(["spec", "--bundle"]).arg(&bundle))
        .context("runc spec (is runc installed? `cargo xtask setup` installs it)")?;
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .context("parsing runc's spec")?;
    spec["process"]["args"] = serde_json::json!(["/bin/true"]);
    spec["process"]["terminal"] = serde_json::json!(false);
    spec["root"]["readonly"] = serde_json::json!(true);
    std::fs::write(&path, spec.to_string())
        .with_context(|| format!("writing {}", path.display()))?;
    let lower = lower
        .iter()
        .map(|l| l.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let data = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    let c = |p: &Path| std::ffi::CString::new(p.display().to_string()).expect("no NUL");
    let (target, data) = (
        c(&rootfs),
        std::ffi::CString::new(data).context("a NUL in the overlay's paths")?,
    );
    // SAFETY: valid C strings; the overlay lives in the bench's private mount namespace.
    check(
        unsafe {
            libc::mount(
                c"overlay".as_ptr(),
                target.as_ptr(),
                c"overlay".as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        },
        &format!("mounting the overlay of the OCI bundle {name}"),
    )?;
    Ok(bundle)
}

/// One tool's imports of the generated image.
#[derive(Serialize)]
struct ImportReport {
    tool: &'static str,
    command: String,
    archive_mb: f64,
    times_s: Vec<f64>,
    p50_s: Option<f64>,
    /// The archive's size over the median time.
    mb_per_s: Option<f64>,
    error: Option<String>,
}

/// Generates the import image (three layers of incompressible files, `import_mb` MB in
/// all) as a Docker archive, then imports it with each tool in turn: `hypha image import`
/// into a fresh store each round, `podman load` after `podman rmi` of the last round's.
fn import_throughput(o: &Options, bin: &Path, tmp: &Path) -> Vec<ImportReport> {
    let mb = o.import_mb();
    println!("==> import throughput: a {mb} MB image of three layers of incompressible files");
    let archive = tmp.join("import-image.tar");
    let reference = "hypl-import:1";
    let hypha = bin.join("hypha").display().to_string();
    let made = output(
        Command::new(bin.join("image-archive"))
            .args(["random", "--layers", "3", "--reference", reference])
            .args(["--mb", &mb.to_string(), "--out"])
            .arg(&archive),
    )
    .context("writing the import image (hypha-tests' image-archive)");
    let archive_mb = std::fs::metadata(&archive).map_or(0.0, |m| m.len() as f64 / 1e6);
    let mut reports = vec![
        ImportReport {
            tool: "hypha image import",
            command: format!("{hypha} image import --image-dir DIR {}", archive.display()),
            archive_mb,
            times_s: vec![],
            p50_s: None,
            mb_per_s: None,
            error: None,
        },
        ImportReport {
            tool: "podman load",
            command: format!("{} load -q -i {}", podman(tmp).join(" "), archive.display()),
            archive_mb,
            times_s: vec![],
            p50_s: None,
            mb_per_s: None,
            error: None,
        },
    ];
    if let Err(e) = made {
        eprintln!("    FAILED: {e:#}");
        for r in &mut reports {
            r.error = Some(format!("{e:#}"));
        }
        return reports;
    }
    let timed = |cmd: &mut Command| -> Result<f64> {
        let start = Instant::now();
        output(cmd)?;
        Ok(start.elapsed().as_secs_f64())
    };
    for round in 0..o.import_rounds() {
        let store = tmp.join(format!("import-store-{round}"));
        let hypha_time = timed(
            Command::new(&hypha)
                .args(["image", "import", "--image-dir"])
                .arg(&store)
                .arg(&archive),
        );
        let _ = std::fs::remove_dir_all(&store);
        let p = podman(tmp);
        let _ = Command::new(&p[0])
            .args(&p[1..])
            .args(["rmi", "-f", reference])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let podman_time = timed(
            Command::new(&p[0])
                .args(&p[1..])
                .args(["load", "-q", "-i"])
                .arg(&archive),
        );
        for (r, t) in reports.iter_mut().zip([hypha_time, podman_time]) {
            match t {
                Ok(t) => r.times_s.push(t),
                Err(e) => {
                    eprintln!("    {}: {e:#}", r.tool);
                    r.error.get_or_insert(format!("{e:#}"));
                }
            }
        }
    }
    for r in &mut reports {
        r.p50_s = median(r.times_s.iter().copied());
        r.mb_per_s = r.p50_s.filter(|t| *t > 0.0).map(|t| archive_mb / t);
    }
    reports
}

/// An agent in a node network namespace of its own, and a CNI configuration directory
/// with one network `bench` of `hypha-cni`; returns the directory and the namespace.
fn node(bin: &Path, tmp: &Path, td: &Teardown, uniq: u32) -> Result<(PathBuf, File)> {
    let hypha = bin.join("hypha");
    for b in [&hypha, &bin.join("hypha-cni")] {
        if !b.exists() {
            bail!(
                "{} is missing (the release build should have made it)",
                b.display()
            );
        }
    }
    let netns = format!("hypl-{uniq}-node");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/hypl-{uniq}"));
    let socket = tmp.join("agent.sock");
    let log_path = tmp.join("agent.log");
    td.make(Undo::Dir(pin_dir.clone()), || Ok(()))?;
    td.make(Undo::Netns(netns.clone()), || {
        output(Command::new("ip").args(["netns", "add", &netns]))?;
        output(Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]))
    })?;
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let agent = td.spawn(
        "hypha agent",
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg(&hypha)
            .arg("agent")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(tmp.join("state"))
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args([
                "--pod-cidr",
                &format!("10.250.{}.0/24", uniq % 250),
                "--no-masquerade",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0),
    )?;
    let start = Instant::now();
    while !Command::new(&hypha)
        .args(["status", "--socket"])
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        if let Some(exit) = agent.lock().unwrap_or_else(|p| p.into_inner()).try_wait()? {
            bail!(
                "the agent exited with {exit}: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the agent did not answer within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let conf_dir = tmp.join("net.d");
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::write(
        conf_dir.join("10-bench.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "bench",
            "plugins": [{"type": "hypha-cni", "agentSocket": socket}],
        })
        .to_string(),
    )?;
    let ns = File::open(format!("/run/netns/{netns}")).context("opening the node netns")?;
    Ok((conf_dir, ns))
}

/// The value at percentile `p` (nearest rank) of `values`.
fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}

fn report(
    o: &Options,
    setups: Vec<Setup>,
    imports: Vec<ImportReport>,
    mut errors: Vec<String>,
) -> Report {
    let reports: Vec<SetupReport> = setups
        .into_iter()
        .map(|s| {
            if let Some(e) = &s.error {
                errors.push(format!("{}: {e}", s.kind.name()));
            }
            SetupReport {
                name: s.kind.name(),
                description: s.kind.describe(),
                command: s.argv.join(" "),
                error: s.error,
                p50_ms: median(s.times_ms.iter().copied()),
                p99_ms: percentile(&s.times_ms, 99.0),
                min_ms: s.times_ms.iter().copied().reduce(f64::min),
                failures: s.failures,
                times_ms: s.times_ms,
            }
        })
        .collect();
    let p50 = |name: &str| {
        reports
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.p50_ms)
    };
    // A run that failed has no time: a target over the others' median would hide it.
    let failed = |name: &str| {
        reports
            .iter()
            .find(|r| r.name == name)
            .map_or(0, |r| r.failures.len())
    };
    let with_failures = |text: String, names: &[&str]| {
        let n: usize = names.iter().map(|n| failed(n)).sum();
        if n == 0 {
            text
        } else {
            format!("{text}, {n} failed runs")
        }
    };
    let mut targets = vec![];
    let (crun, hypha, net) = (p50("crun"), p50("hypha"), p50("hypha+net"));
    targets.push(Target {
        goal: "hypha (no network) p50 <= crun p50".into(),
        measured: hypha
            .zip(crun)
            .map(|(h, c)| with_failures(format!("{h:.1} ms vs {c:.1} ms"), &["hypha", "crun"])),
        pass: hypha.zip(crun).map(|(h, c)| h <= c && failed("hypha") == 0),
    });
    targets.push(Target {
        goal: format!(
            "hypha run with hypha-cni networking p50 <= crun p50 + {TARGET_NET_ABOVE_CRUN_MS} ms (medians of interleaved runs)"
        ),
        measured: net
            .zip(crun)
            .map(|(h, c)| {
                with_failures(
                    format!("{h:.1} ms vs {c:.1} ms ({:+.1} ms)", h - c),
                    &["hypha+net", "crun"],
                )
            }),
        pass: net
            .zip(crun)
            .map(|(h, c)| h <= c + TARGET_NET_ABOVE_CRUN_MS && failed("hypha+net") == 0),
    });
    let (image, podman) = (p50("hypha-image"), p50("podman"));
    targets.push(Target {
        goal: format!(
            "hypha run --image p50 <= hypha run p50 + {TARGET_IMAGE_ABOVE_HYPHA_MS} ms (medians of interleaved runs)"
        ),
        measured: image.zip(hypha).map(|(i, h)| {
            with_failures(
                format!("{i:.1} ms vs {h:.1} ms ({:+.1} ms)", i - h),
                &["hypha-image", "hypha"],
            )
        }),
        pass: image.zip(hypha).map(|(i, h)| {
            i <= h + TARGET_IMAGE_ABOVE_HYPHA_MS && failed("hypha-image") == 0
        }),
    });
    targets.push(Target {
        goal: "hypha run --image p50 < podman run --rm p50 (the same image)".into(),
        measured: image.zip(podman).map(|(i, p)| {
            with_failures(
                format!("{i:.1} ms vs {p:.1} ms ({:.1}x faster)", p / i),
                &["hypha-image", "podman"],
            )
        }),
        pass: image
            .zip(podman)
            .map(|(i, p)| i < p && failed("hypha-image") == 0),
    });
    for i in &imports {
        if let Some(e) = &i.error {
            errors.push(format!("{}: {e}", i.tool));
        }
    }
    let version = |cmd: &str| {
        output(Command::new(cmd).arg("--version"))
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
    };
    Report {
        bench: "launcher",
        runs: o.runs(),
        quick: o.quick,
        kernel: output(Command::new("uname").arg("-r"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        timestamp_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        versions: ["crun", "runc", "unshare", "podman"]
            .into_iter()
            .map(|c| (c.to_owned(), version(c)))
            .collect(),
        setups: reports,
        imports,
        targets,
        errors,
    }
}

fn print_table(r: &Report) {
    let f = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"));
    println!(
        "\n{:<12} {:>9} {:>9} {:>9}  failures",
        "setup", "p50 ms", "p99 ms", "min ms"
    );
    for s in &r.setups {
        println!(
            "{:<12} {:>9} {:>9} {:>9}  {}",
            s.name,
            f(s.p50_ms),
            f(s.p99_ms),
            f(s.min_ms),
            s.failures.len()
        );
    }
    if !r.imports.is_empty() {
        println!(
            "\n{:<20} {:>10} {:>9} {:>9}  rounds",
            "import", "archive MB", "p50 s", "MB/s"
        );
        for i in &r.imports {
            println!(
                "{:<20} {:>10.1} {:>9} {:>9}  {}",
                i.tool,
                i.archive_mb,
                f(i.p50_s),
                f(i.mb_per_s),
                i.times_s.len()
            );
        }
    }
    super::print_targets("Targets:", &r.targets);
}

fn chart(r: &Report) -> String {
    let chart = BarChart {
        title: "Start to exit of a container running /bin/true".to_owned(),
        unit: "ms".to_owned(),
        categories: r.setups.iter().map(|s| s.name.to_owned()).collect(),
        series: vec![Series::new("p50", "#457b9d"), Series::new("p99", "#e76f51")],
        values: r.setups.iter().map(|s| vec![s.p50_ms, s.p99_ms]).collect(),
        decimals: 1,
    };
    let (w, h) = (900.0, 440.0);
    svg::document(
        w,
        h,
        "Hypha launcher bench: container start to exit",
        &format!(
            "{} runs per setup, interleaved; private mount ns without the cgroup2 mount; kernel {}, {} CPUs",
            r.runs, r.kernel, r.nproc
        ),
        &[svg::bars(&chart, 10.0, 60.0, w - 20.0, h - 70.0)],
    )
}

#[cfg(test)]
mod tests {
    use super::{Kind, Options, Setup, percentile, report};

    fn options(setups: Vec<Kind>) -> Options {
        Options {
            runs: Some(3),
            setups,
            import_mb: None,
            import_rounds: None,
            quick: false,
            bin_dir: None,
        }
    }

    /// The image targets' verdicts (against hypha run, against podman).
    fn image_targets(
        hypha: &[f64],
        image: &[f64],
        podman: &[f64],
    ) -> (Option<bool>, Option<bool>, Vec<String>) {
        let o = options(vec![Kind::Hypha, Kind::HyphaImage, Kind::Podman]);
        let r = report(
            &o,
            vec![
                setup(Kind::Hypha, hypha, 0),
                setup(Kind::HyphaImage, image, 0),
                setup(Kind::Podman, podman, 0),
            ],
            vec![],
            vec![],
        );
        let t = |what: &str| {
            r.targets
                .iter()
                .find(|t| t.goal.contains(what))
                .unwrap_or_else(|| panic!("a target on {what}"))
        };
        let (a, b) = (t("hypha run p50 + 5 ms"), t("podman"));
        (
            a.pass,
            b.pass,
            [a, b]
                .iter()
                .map(|t| t.measured.clone().unwrap_or_default())
                .collect(),
        )
    }

    #[test]
    fn image_targets_are_5_ms_over_hypha_and_below_podman() {
        let (near, faster, m) = image_targets(&[10.0, 11.0], &[14.0, 16.0], &[300.0]);
        assert_eq!((near, faster), (Some(true), Some(true)), "{m:?}");
        assert!(m[0].contains("+4.5 ms"), "{m:?}");
        let (near, faster, m) = image_targets(&[10.0], &[16.0], &[15.0]);
        assert_eq!((near, faster), (Some(false), Some(false)), "{m:?}");
        assert_eq!(
            image_targets(&[10.0], &[], &[15.0]).0,
            None,
            "nothing measured"
        );
    }

    #[test]
    fn quick_is_short() {
        let mut o = options(vec![]);
        o.runs = None;
        o.quick = true;
        assert_eq!((o.runs(), o.import_mb(), o.import_rounds()), (5, 10, 1));
        o.quick = false;
        assert_eq!((o.runs(), o.import_mb(), o.import_rounds()), (50, 100, 3));
    }

    fn setup(kind: Kind, times_ms: &[f64], failures: usize) -> Setup {
        Setup {
            kind,
            argv: vec![],
            netns: None,
            error: None,
            times_ms: times_ms.to_vec(),
            failures: vec!["failed".into(); failures],
        }
    }

    /// The networking target's verdict for crun's and hypha+net's times.
    fn net_target(crun: &[f64], net: &[f64], net_failures: usize) -> (Option<bool>, String) {
        let o = options(vec![Kind::Crun, Kind::HyphaNet]);
        let r = report(
            &o,
            vec![
                setup(Kind::Crun, crun, 0),
                setup(Kind::HyphaNet, net, net_failures),
            ],
            vec![],
            vec![],
        );
        let t = r
            .targets
            .iter()
            .find(|t| t.goal.contains("networking"))
            .expect("the networking target");
        (t.pass, t.measured.clone().unwrap_or_default())
    }

    #[test]
    fn networking_target_is_crun_plus_20_ms_on_medians() {
        // Medians 21 and 40: +19 ms, met; the outliers do not count.
        let (pass, measured) = net_target(&[20.0, 21.0, 90.0], &[39.0, 40.0, 200.0], 0);
        assert_eq!(pass, Some(true), "{measured}");
        assert!(measured.contains("+19.0 ms"), "{measured}");
        // Median 42: +21 ms, short.
        assert_eq!(
            net_target(&[20.0, 21.0, 22.0], &[41.0, 42.0, 43.0], 0).0,
            Some(false)
        );
        // Fast, but a run failed: short, and said.
        let (pass, measured) = net_target(&[20.0, 21.0, 22.0], &[30.0, 31.0], 1);
        assert_eq!(pass, Some(false));
        assert!(measured.contains("1 failed runs"), "{measured}");
        // Nothing measured: no verdict.
        assert_eq!(net_target(&[20.0], &[], 3).0, None);
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 99.0), None);
    }
}
