//! `hypha image import`, `ls` and `rm` (issue 15), through the real binary, each test with a
//! store of its own (`--image-dir`): the three source formats, layers shared between images,
//! hostile images refused with nothing left behind, and removal (refused while held).
//!
//! Privileged: the layers hold whiteouts (character devices) and `trusted.*` xattrs.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use hypha_launcher::image::Store;
use hypha_tests::images::{
    Compression, ImageDir, ImageSpec, LayerBuilder, Tamper, big_layer, busybox_layer, dotdot_layer,
    escaping_symlink_layer, hex, listing,
};
use hypha_tests::require_root;

/// An image sharing the busybox base layer with [`ImageSpec::busybox_app`].
fn other_image(reference: &str) -> ImageSpec {
    let top = LayerBuilder::new()
        .dir("other", 0o755)
        .file("other/file", 0o644, b"other\n")
        .finish();
    ImageSpec::new(Some(reference), vec![busybox_layer(), top])
}

fn layer_dirs(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store.join("layers"))
        .expect("the layers directory")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn imports_oci_layout_oci_archive_and_docker_archive() {
    require_root!();
    let store = ImageDir::new();
    let work = tempfile::tempdir().expect("a temp dir");
    let spec = ImageSpec::busybox_app(Some("app:1"));

    let layout = work.path().join("oci");
    spec.write_oci_layout(&layout);
    let out = store.import(&layout, &[]);
    assert!(out.ok().contains("app:1 sha256:"), "{out:?}");

    let archive = work.path().join("oci.tar");
    spec.clone()
        .compression(Compression::Gzip)
        .write_oci_archive(&archive);
    store.import(&archive, &["--name", "app-gz:2"]).ok();

    let docker = work.path().join("docker.tar");
    ImageSpec::busybox_app(Some("app-docker:3"))
        .compression(Compression::Zstd)
        .write_docker_archive(&docker);
    store.import(&docker, &[]).ok();

    let ls = store.ls();
    let names: Vec<(String, String)> = ls
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["tag"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("app".into(), "1".into()),
            ("app-docker".into(), "3".into()),
            ("app-gz".into(), "2".into())
        ]
    );
    for r in &ls {
        assert_eq!(r["id"], spec.id(), "{r}");
        assert_eq!(r["layers"], 2, "{r}");
        assert_eq!(r["created"], "2026-01-02T03:04:05Z", "{r}");
        assert!(r["digest"].as_str().unwrap().starts_with("sha256:"), "{r}");
        assert!(r["size"].as_u64().unwrap() > 100_000, "{r}");
    }
    // Three sources of one image, three compressions: the layers are unpacked once.
    let mut expected: Vec<String> = spec.diff_ids().iter().map(|d| hex(d).to_owned()).collect();
    expected.sort();
    assert_eq!(layer_dirs(&store.dir), expected);

    let text = store.hypha(&["image", "ls"]);
    let text = text.ok();
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.contains("app-docker  3"), "{text}");

    // What `hypha run --image` gets.
    let s = Store::open(&store.dir).expect("open the store");
    let r = s.resolve("app-gz:2").expect("resolve");
    assert_eq!(r.config.entrypoint, ["/bin/sh", "-c"]);
    assert_eq!(r.config.cmd, ["/app/run.sh"]);
    assert_eq!(r.config.env, ["PATH=/bin", "GREETING=hi"]);
    assert_eq!(r.config.working_dir.as_deref(), Some("/app"));
    let base = &r.layers[0];
    assert!(base.join("bin/busybox").is_file(), "base layer first");
    assert!(base.join("etc/deleteme").is_file());
    let top = &r.layers[1];
    let wh = std::fs::symlink_metadata(top.join("etc/deleteme")).expect("the whiteout");
    assert_eq!((wh.mode() & libc::S_IFMT, wh.rdev()), (libc::S_IFCHR, 0));
    assert_eq!(
        std::fs::read_link(base.join("bin/sh")).expect("an applet link"),
        Path::new("busybox")
    );
    // By id and id prefix too.
    assert_eq!(s.resolve(&spec.id()).expect("by id").id, spec.id());
    assert_eq!(
        s.resolve(&hex(&spec.id())[..10]).expect("by prefix").id,
        spec.id()
    );
    let e = s.resolve("nope:1").expect_err("no such image").to_string();
    assert!(e.contains("no image \"nope:1\""), "{e}");
}

#[test]
fn a_second_image_reuses_the_shared_layer() {
    require_root!();
    let store = ImageDir::new();
    let work = tempfile::tempdir().expect("a temp dir");
    let app = ImageSpec::busybox_app(Some("app:1"));
    store.import_layout(&app, &work.path().join("app"));
    let base = store.dir.join("layers").join(hex(&app.diff_ids()[0]));
    let before = std::fs::metadata(base.join("bin/busybox"))
        .expect("busybox")
        .ino();

    let other = other_image("other:1");
    other.write_docker_archive(&work.path().join("other.tar"));
    store.import(&work.path().join("other.tar"), &[]).ok();

    let s = Store::open(&store.dir).expect("open the store");
    let a = s.resolve("app:1").expect("app");
    let o = s.resolve("other:1").expect("other");
    assert_eq!(a.layers[0], o.layers[0]);
    assert_ne!(a.layers[1], o.layers[1]);
    assert_eq!(
        layer_dirs(&store.dir).len(),
        3,
        "base, app and other layers"
    );
    assert_eq!(
        std::fs::metadata(o.layers[0].join("bin/busybox"))
            .expect("busybox")
            .ino(),
        before,
        "the shared layer is the same files, not written again"
    );
}

#[test]
fn two_concurrent_imports_of_one_image_both_succeed() {
    require_root!();
    let store = ImageDir::new();
    let work = tempfile::tempdir().expect("a temp dir");
    let spec = ImageSpec::busybox_app(Some("app:1"));
    spec.write_oci_layout(&work.path().join("oci"));
    let (a, b) = std::thread::scope(|t| {
        let a = t.spawn(|| store.import(&work.path().join("oci"), &["--name", "a:1"]));
        let b = t.spawn(|| store.import(&work.path().join("oci"), &["--name", "b:1"]));
        (a.join().expect("a"), b.join().expect("b"))
    });
    a.ok();
    b.ok();
    assert_eq!(store.ls().len(), 2);
    assert_eq!(layer_dirs(&store.dir).len(), 2);
    let s = Store::open(&store.dir).expect("open the store");
    assert!(
        s.resolve("a:1").expect("a").layers[1]
            .join("app/hello.txt")
            .is_file()
    );
    let leftovers = std::fs::read_dir(store.dir.join("tmp"))
        .expect("tmp")
        .count();
    assert_eq!(leftovers, 0, "no temporary directory is left");
}

/// Writes an image source at a path.
type Writer<'a> = Box<dyn Fn(&Path) + 'a>;

#[test]
fn hostile_and_broken_images_are_refused_and_leave_nothing() {
    require_root!();
    let store = ImageDir::new();
    let work = tempfile::tempdir().expect("a temp dir");
    store.import_layout(
        &ImageSpec::busybox_app(Some("good:1")),
        &work.path().join("good"),
    );
    let before = listing(&store.dir);

    let not_image = work.path().join("not-an-image");
    std::fs::write(&not_image, b"hello").expect("write");
    // (what, how the source is written, extra import flags, the expected message)
    let cases: Vec<(&str, Writer<'_>, Vec<&str>, &str)> = vec![
        (
            "tampered layer blob",
            Box::new(|p| {
                ImageSpec::busybox_app(Some("bad:1"))
                    .compression(Compression::Gzip)
                    .tamper(Tamper::LayerBlob)
                    .write_oci_layout(p)
            }),
            vec![],
            "digest mismatch for layer blob",
        ),
        (
            "wrong diff_id",
            Box::new(|p| {
                other_image("bad:2")
                    .tamper(Tamper::DiffId)
                    .write_docker_archive(p)
            }),
            vec![],
            "digest mismatch for the uncompressed layer",
        ),
        (
            "a ../ entry",
            Box::new(|p| ImageSpec::new(Some("bad:3"), vec![dotdot_layer()]).write_oci_archive(p)),
            vec![],
            "refused entry \"../escaped\": a `..` path component",
        ),
        (
            "an escaping symlink",
            Box::new(|p| {
                ImageSpec::new(
                    Some("bad:4"),
                    vec![busybox_layer(), escaping_symlink_layer()],
                )
                .write_oci_layout(p)
            }),
            vec![],
            "refused entry \"etc/evil\": symlink target \"../../../../tmp\" is outside the layer",
        ),
        (
            "an over-limit layer",
            Box::new(|p| {
                ImageSpec::new(Some("bad:5"), vec![big_layer(3 << 20)])
                    .compression(Compression::Gzip)
                    .write_oci_archive(p)
            }),
            vec!["--max-layer-size", "2M"],
            "unpacks to more than the limit of 2097152 bytes",
        ),
        (
            "a compressed archive over the archive limit",
            Box::new(|p| {
                let plain = p.with_extension("plain");
                ImageSpec::new(Some("bad:6"), vec![big_layer(3 << 20)])
                    .write_docker_archive(&plain);
                let tar = std::fs::read(&plain).expect("read the archive");
                std::fs::write(p, Compression::Gzip.apply(&tar)).expect("write");
            }),
            vec!["--max-archive-size", "1M"],
            "extracts to more than the limit of 1048576 bytes (raise it with --max-archive-size)",
        ),
        (
            "no name",
            Box::new(|p| ImageSpec::new(None, vec![busybox_layer()]).write_docker_archive(p)),
            vec![],
            "the image has no name of its own; give one with --name NAME[:TAG]",
        ),
        (
            "a bad --name",
            Box::new(|p| ImageSpec::new(None, vec![busybox_layer()]).write_oci_layout(p)),
            vec!["--name", "Bad Name"],
            "invalid image reference \"Bad Name\"",
        ),
        (
            "not an image",
            Box::new(|p| std::fs::copy(&not_image, p).map(drop).expect("copy")),
            vec![],
            "not an OCI image layout, OCI archive or Docker archive",
        ),
    ];
    for (i, (what, write, args, message)) in cases.iter().enumerate() {
        let src = work.path().join(format!("case-{i}"));
        write(&src);
        let out = store.import(&src, args);
        assert_ne!(out.code, Some(0), "{what}: imported: {out:?}");
        assert!(out.stderr.contains(message), "{what}: {out:?}");
        assert_eq!(listing(&store.dir), before, "{what}: the store changed");
    }
    assert_eq!(store.ls().len(), 1);
}

#[test]
fn rm_removes_what_no_other_image_uses_and_is_refused_while_held() {
    require_root!();
    let store = ImageDir::new();
    let work = tempfile::tempdir().expect("a temp dir");
    let app = ImageSpec::busybox_app(Some("app:1"));
    store.import_layout(&app, &work.path().join("app"));
    let other = other_image("other:1");
    store.import_layout(&other, &work.path().join("other"));
    let s = Store::open(&store.dir).expect("open the store");

    // A fresh hold counts (its container may be being created).
    let run_dir = work.path().join("run");
    s.hold(&app.id(), "c1", &run_dir).expect("hold");
    let out = store.hypha(&["image", "rm", "app:1"]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr
            .contains("image app:1 is in use by container(s) c1"),
        "{out:?}"
    );
    // An old hold whose container exists still counts.
    let state_dir = run_dir.join("c1");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    // From JSON, so that fields the state gains later (with defaults) need no change here.
    let security = hypha_launcher::security::Security::new(false, &[], &[]).expect("security");
    let state: hypha_launcher::state::State = serde_json::from_value(serde_json::json!({
        "id": "c1", "name": "c1", "namespace": "default", "command": ["/bin/true"],
        "status": "running", "init": null, "monitor": null, "exit_code": null,
        "detached": false, "created": 1, "cgroup": null, "network": null,
        "security": serde_json::to_value(security).expect("security serializes"),
        "userns": false, "rootfs": null,
    }))
    .expect("a container state");
    hypha_launcher::state::RunDir(run_dir.clone())
        .save(&state)
        .expect("save the state");
    let hold = store.dir.join("holds").join(hex(&app.id())).join("c1");
    age(&hold);
    let out = store.hypha(&["image", "rm", "app:1"]);
    assert!(out.stderr.contains("in use by container(s) c1"), "{out:?}");
    // Once the container is gone, the hold is stale: swept, and the image goes.
    std::fs::remove_dir_all(&state_dir).expect("remove the state");
    let out = store.hypha(&["image", "rm", "app:1"]);
    assert!(out.ok().contains("removed app:1"), "{out:?}");
    assert!(!hold.exists(), "the stale hold is swept");

    let names: Vec<_> = store.ls().iter().map(|r| r["name"].clone()).collect();
    assert_eq!(names, ["other"]);
    let mut left: Vec<String> = other.diff_ids().iter().map(|d| hex(d).to_owned()).collect();
    left.sort();
    assert_eq!(layer_dirs(&store.dir), left, "app's own layer is gone");
    assert!(!store.dir.join("blobs/sha256").join(hex(&app.id())).exists());
    assert!(
        store
            .dir
            .join("blobs/sha256")
            .join(hex(&other.id()))
            .exists()
    );

    // Held and released: the hold no longer counts.
    s.hold(&other.id(), "c2", &run_dir).expect("hold");
    s.release(&other.id(), "c2").expect("release");
    let other_id = other.id();
    let short = &hex(&other_id)[..12];
    store.hypha(&["image", "rm", short]).ok();
    assert!(store.ls().is_empty());
    assert!(layer_dirs(&store.dir).is_empty());
    let blobs = std::fs::read_dir(store.dir.join("blobs/sha256"))
        .expect("blobs")
        .count();
    assert_eq!(blobs, 0);
    let out = store.hypha(&["image", "rm", "other:1"]);
    assert!(out.stderr.contains("no image \"other:1\""), "{out:?}");
}

/// Sets a file's mtime ten minutes back (past the fresh-hold grace).
fn age(path: &Path) {
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open the hold");
    f.set_modified(SystemTime::now() - Duration::from_secs(600))
        .expect("set the mtime");
}
