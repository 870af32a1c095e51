//! Privileged: `hypha run --image`, run as a user runs it. The images are built by the
//! tests themselves ([`hypha_tests::images`]: a busybox layer, and a layer that deletes
//! `/etc/deleteme`, makes `/data` opaque and sets Entrypoint, Cmd, Env and WorkingDir),
//! imported with `hypha image import` into the launcher's own store, then run.
//!
//! Needs the binaries built first (`cargo build --workspace --exclude hypha-ebpf --bins`).
//! Every name is unique; every container, node, store and directory is removed on drop.

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hypha_tests::images::{ImageSpec, LayerBuilder, busybox_layer};
use hypha_tests::launcher::{Launcher, NETWORK, Run, cgroups_of, mounts_under};
use hypha_tests::netns::unique_name;
use hypha_tests::node::Node;

/// Writes `spec` as a Docker archive in the launcher's directory and imports it.
fn import(l: &Launcher, spec: &ImageSpec, file: &str) {
    let path = l.dir.join(file);
    spec.write_docker_archive(&path);
    l.hypha(&["image", "import", path.to_str().expect("a UTF-8 path")])
        .ok();
}

/// Imports the busybox + app image as `reference`.
fn import_app(l: &Launcher, reference: &str) {
    import(
        l,
        &ImageSpec::busybox_app(Some(reference)),
        &format!("{}.tar", unique_name("img")),
    );
}

/// `hypha run --rm --network none --image IMAGE ARGS...`: stdout, panicking on failure.
fn run_image(l: &Launcher, image: &str, args: &[&str]) -> String {
    let mut all = vec!["run", "--rm", "--network", "none", "--image", image];
    all.extend(args);
    l.hypha(&all).ok().to_owned()
}

/// `hypha run FLAGS... --name NAME --image IMAGE -- CMD...` (`--network none` unless
/// the flags name one).
fn run_named(l: &Launcher, flags: &[&str], name: &str, image: &str, cmd: &[&str]) -> Run {
    let mut all = vec!["run"];
    all.extend(flags);
    if !flags.contains(&"--network") {
        all.extend(["--network", "none"]);
    }
    all.extend(["--name", name, "--image", image, "--"]);
    all.extend(cmd);
    l.hypha(&all)
}

/// The pid of running container `name`.
fn pid_of(l: &Launcher, name: &str) -> i64 {
    l.container(name).expect("listed")["pid"]
        .as_i64()
        .expect("a running container has a pid")
}

/// Waits until `f` holds, at most 10 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The container's state as the launcher recorded it.
fn state(l: &Launcher, name: &str) -> serde_json::Value {
    let path = l.run_dir().join(name).join("state.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("state.json is JSON")
}

/// The layer directories the state of `name` records, topmost first.
fn layers_of(l: &Launcher, name: &str) -> Vec<PathBuf> {
    state(l, name)["image"]["layers"]
        .as_array()
        .expect("an image container records its layers")
        .iter()
        .map(|v| PathBuf::from(v.as_str().expect("a path")))
        .collect()
}

/// Asserts that no trace of container `name` is left: no state entry (its upper and work
/// directories with it), no cgroup, no mount under the run directory.
fn assert_nothing_left(l: &Launcher, name: &str) {
    assert!(
        !l.run_dir().join(name).exists(),
        "state directory of {name} left: {:?}",
        l.entries()
    );
    assert_eq!(cgroups_of(name), Vec::<PathBuf>::new(), "cgroups left");
    assert_eq!(
        mounts_under(&l.run_dir()),
        Vec::<String>::new(),
        "mounts left"
    );
}

#[test]
fn runs_an_image_with_its_config_and_the_flags_over_it() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let image = format!("{}:1", unique_name("app"));
    import_app(&l, &image);

    // The image alone: Entrypoint + Cmd, its Env and WorkingDir.
    let out = run_image(&l, &image, &[]);
    assert_eq!(out, "cwd=/app greeting=hi\n");

    // A command replaces Cmd (after the Entrypoint `/bin/sh -c`): the whiteout and the
    // opaque directory of the upper layer, the environment, root by default.
    let out = run_image(
        &l,
        &image,
        &[
            "--",
            "cat /etc/deleteme 2>&1; echo rc=$?; ls /data; cat /app/hello.txt; \
             echo \"PATH=$PATH HOME=$HOME container=$container\"; id -u; id -g; \
             touch /etc/new && echo etc-writable",
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("No such file"), "{out}");
    assert_eq!(
        lines[1], "rc=1",
        "the whiteout hides the base's file: {out}"
    );
    assert_eq!(lines[2], "new", "the opaque /data hides data/old: {out}");
    assert_eq!(lines[3], "hello from the app layer", "{out}");
    assert_eq!(lines[4], "PATH=/bin HOME=/root container=hypha", "{out}");
    assert_eq!(&lines[5..7], ["0", "0"], "{out}");
    assert_eq!(lines[7], "etc-writable", "the overlay's upper layer: {out}");

    // -e overrides by key, --workdir replaces WorkingDir and is made if missing.
    let out = run_image(&l, &image, &["-e", "GREETING=yo", "-w", "/made/here"]);
    assert_eq!(out, "cwd=/made/here greeting=yo\n");

    // --entrypoint replaces the Entrypoint and drops the Cmd.
    let out = run_image(&l, &image, &["--entrypoint", "/bin/echo", "--", "a", "b"]);
    assert_eq!(out, "a b\n");
    let out = run_image(&l, &image, &["--entrypoint", "pwd"]);
    assert_eq!(out, "/app\n", "a bare name on the image's PATH");

    // --user by name (the image's /etc/passwd, its groups from /etc/group) and by
    // numbers.
    let out = run_image(
        &l,
        &image,
        &["--user", "nobody", "--", "id -u; id -g; id -G; echo $HOME"],
    );
    assert_eq!(out, "65534\n65534\n65534 50\n/nonexistent\n");
    let out = run_image(&l, &image, &["-u", "1000:1001", "--", "id -u; id -g"]);
    assert_eq!(out, "1000\n1001\n");

    // Refused with clear errors, nothing left behind.
    for (args, msg) in [
        (
            vec!["--user", "alice"],
            "user \"alice\" not found in the container's /etc/passwd",
        ),
        (vec!["-e", "=x"], "invalid -e \"=x\""),
        (vec!["--entrypoint", "/no/such"], "/no/such"),
        (vec!["--entrypoint", ""], "has no Entrypoint or Cmd"),
    ] {
        let mut all = vec!["run", "--rm", "--network", "none", "--image", &image];
        all.extend(args.iter().copied());
        let out = l.hypha(&all);
        assert!(
            out.code != Some(0) && out.stderr.contains(msg),
            "{args:?}: {out:?}"
        );
    }
    let out = l.hypha(&["run", "--network", "none", "--image", "absent:1"]);
    assert!(
        out.code != Some(0) && out.stderr.contains("absent"),
        "{out:?}"
    );
    let out = l.hypha(&["run", "--image", &image, "--rootfs", "/"]);
    assert!(out.stderr.contains("cannot be used with"), "{out:?}");
    assert_eq!(l.entries(), Vec::<String>::new(), "nothing left");
    assert_eq!(mounts_under(&l.run_dir()), Vec::<String>::new());
}

#[test]
fn an_oci_layout_image_runs_too() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let reference = format!("{}:oci", unique_name("app"));
    let dir = l.dir.join("layout");
    ImageSpec::busybox_app(Some(&reference)).write_oci_layout(&dir);
    l.hypha(&[
        "image",
        "import",
        dir.to_str().unwrap(),
        "--name",
        &reference,
    ])
    .ok();
    assert_eq!(run_image(&l, &reference, &[]), "cwd=/app greeting=hi\n");
}

#[test]
fn two_containers_share_the_layers_not_their_writes() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let image = format!("{}:1", unique_name("app"));
    import_app(&l, &image);
    let (a, b) = (unique_name("ia"), unique_name("ib"));
    for n in [&a, &b] {
        let out = run_named(
            &l,
            &["-d"],
            n,
            &image,
            &["echo $HOSTNAME > /mine; echo $HOSTNAME > /app/hello.txt; exec sleep 300"],
        );
        assert_eq!(out.ok().trim(), n.as_str());
    }
    for n in [&a, &b] {
        eventually("the container wrote its file", || {
            l.hypha(&["exec", n, "--", "cat", "/mine"]).stdout.trim() == n.as_str()
        });
    }
    // One set of layer directories, recorded by both.
    let layers = layers_of(&l, &a);
    assert_eq!(layers.len(), 2, "{layers:?}");
    assert_eq!(layers, layers_of(&l, &b));
    // The same file through both containers' roots is the layer's own inode.
    let base = &layers[1];
    let in_layer = std::fs::metadata(base.join("bin/busybox")).expect("busybox in the base layer");
    for n in [&a, &b] {
        let seen = std::fs::metadata(format!("/proc/{}/root/bin/busybox", pid_of(&l, n)))
            .expect("busybox through the container's root");
        assert_eq!(seen.ino(), in_layer.ino(), "{n} sees the layer's inode");
    }
    // Each sees its own writes only; the layers stay as they were.
    for (n, other) in [(&a, &b), (&b, &a)] {
        let out = l.hypha(&["exec", n, "--", "cat", "/mine", "/app/hello.txt"]);
        assert_eq!(out.ok(), format!("{n}\n{n}\n"));
        assert!(!out.stdout.contains(other.as_str()));
        let upper = l.run_dir().join(n).join("upper");
        assert_eq!(
            std::fs::read_to_string(upper.join("mine")).expect("the write is in the upper dir"),
            format!("{n}\n")
        );
    }
    assert_eq!(
        std::fs::read_to_string(layers[0].join("app/hello.txt")).unwrap(),
        "hello from the app layer\n"
    );
    assert!(!layers.iter().any(|d| d.join("mine").exists()));
    l.hypha(&["rm", "-f", &a, &b]).ok();
    assert_nothing_left(&l, &a);
    assert_nothing_left(&l, &b);
    assert!(
        base.join("bin/busybox").exists(),
        "removing containers keeps the layers"
    );
}

#[test]
fn image_rm_is_refused_while_a_container_uses_it() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let image = format!("{}:1", unique_name("app"));
    import_app(&l, &image);
    let (running, exited) = (unique_name("ir"), unique_name("ie"));
    run_named(&l, &["-d"], &running, &image, &["exec sleep 300"]).ok();
    // An exited container keeps its upper directory, and its image, until `hypha rm`.
    run_named(&l, &[], &exited, &image, &["touch /x"]).ok();
    assert!(l.run_dir().join(&exited).join("upper/x").exists());
    let out = l.hypha(&["image", "rm", &image]);
    assert!(
        out.code != Some(0) && out.stderr.contains("in use"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains(&running)
            || out.stderr.contains(&exited)
            || out.stderr.contains("container"),
        "{out:?}"
    );
    l.hypha(&["rm", "-f", &running]).ok();
    assert_nothing_left(&l, &running);
    let out = l.hypha(&["image", "rm", &image]);
    assert!(
        out.code != Some(0) && out.stderr.contains("in use"),
        "still the exited one: {out:?}"
    );
    l.hypha(&["rm", &exited]).ok();
    assert_nothing_left(&l, &exited);
    l.hypha(&["image", "rm", &image]).ok();
    let ls = l.hypha(&["image", "ls", "-o", "json"]);
    assert!(
        !ls.ok().contains(image.split(':').next().unwrap()),
        "{ls:?}"
    );
    // A failed start releases its hold as well.
    import_app(&l, &image);
    let out = l.hypha(&[
        "run",
        "--network",
        "none",
        "--image",
        &image,
        "--entrypoint",
        "/no/such",
    ]);
    assert!(out.code != Some(0), "{out:?}");
    l.hypha(&["image", "rm", &image]).ok();
}

#[test]
fn forty_layers_are_mounted() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let image = format!("{}:1", unique_name("many"));
    let mut layers = vec![busybox_layer()];
    for i in 1..40 {
        layers.push(
            LayerBuilder::new()
                .dir("layers", 0o755)
                .file(
                    &format!("layers/{i:02}"),
                    0o644,
                    format!("{i}\n").as_bytes(),
                )
                .finish(),
        );
    }
    import(&l, &ImageSpec::new(Some(&image), layers), "many.tar");
    let n = unique_name("im");
    let out = run_named(
        &l,
        &[],
        &n,
        &image,
        &[
            "/bin/sh",
            "-c",
            "ls /layers | wc -l; cat /layers/01 /layers/39",
        ],
    );
    assert_eq!(out.ok(), "39\n1\n39\n");
    let dirs = layers_of(&l, &n);
    assert_eq!(dirs.len(), 40);
    let lowerdir: usize = dirs.iter().map(|d| d.as_os_str().len() + 1).sum();
    assert!(
        lowerdir > 4096,
        "the layers' paths ({lowerdir} bytes) must exceed mount(2)'s page for this test"
    );
    l.hypha(&["rm", &n]).ok();
    assert_nothing_left(&l, &n);
}

#[test]
fn pods_from_images_talk_through_hypha_cni() {
    hypha_tests::require_root!();
    let node = Node::start();
    let l = Launcher::for_node(&node);
    let image = format!("{}:1", unique_name("app"));
    import_app(&l, &image);
    let (server, client) = (unique_name("srv"), unique_name("cli"));
    run_named(
        &l,
        &["-d", "--network", NETWORK, "-w", "/www"],
        &server,
        &image,
        &["echo served-by-$HOSTNAME > index.html; exec httpd -f -p 8080 -h /www"],
    )
    .ok();
    let ip = l.ip(&server);
    // busybox's nc (its static wget looks the scheme's port up through NSS, absent here).
    let request = format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 8080");
    let mut last = None;
    let start = Instant::now();
    loop {
        let out = run_named(
            &l,
            &["--rm", "--network", NETWORK],
            &client,
            &image,
            &[&request],
        );
        if out.code == Some(0) && out.stdout.contains("200 OK") {
            assert!(
                out.stdout
                    .ends_with(&format!("\r\n\r\nserved-by-{server}\n")),
                "{out:?}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{client} → {ip}:8080: {out:?} (before: {last:?})\nagent log:\n{}",
            node.log()
        );
        last = Some(out);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        node.endpoints().len(),
        1,
        "the client's endpoint went with --rm"
    );
    l.hypha(&["rm", "-f", &server]).ok();
    assert!(node.endpoints().is_empty());
    assert_nothing_left(&l, &server);
    assert_nothing_left(&l, &client);
}

/// With `--rm` the writable layer lives in a tmpfs of the container's mount namespace:
/// its writes are not on the host's disk nor its mount point in the host's mount table,
/// and nothing is left once the container has removed itself.
#[test]
fn a_removed_containers_writable_layer_is_in_memory() {
    hypha_tests::require_root!();
    let l = Launcher::new();
    let image = format!("{}:1", unique_name("app"));
    import_app(&l, &image);
    let n = unique_name("im");
    run_named(
        &l,
        &["-d", "--rm"],
        &n,
        &image,
        &["echo $HOSTNAME > /mine; exec sleep 300"],
    )
    .ok();
    let pid = pid_of(&l, &n);
    let mine = PathBuf::from(format!("/proc/{pid}/root/mine"));
    eventually("the container wrote its file", || mine.exists());
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), format!("{n}\n"));
    let entry = l.run_dir().join(&n);
    let on_disk: Vec<_> = std::fs::read_dir(entry.join("layer"))
        .expect("the layer's mount point")
        .collect();
    assert!(on_disk.is_empty(), "the layer is not on disk: {on_disk:?}");
    assert!(!entry.join("upper").exists());
    // The tmpfs under the overlay: in the container's mount namespace, not the host's.
    let layer = entry.join("layer");
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!host_mounts.contains(layer.to_str().unwrap()));
    // Stopped, a --rm container removes itself.
    l.hypha(&["stop", &n]).ok();
    eventually("the container removed itself", || !entry.exists());
    assert_nothing_left(&l, &n);
}
