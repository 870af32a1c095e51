//! The container's process as `docker run` makes it: the image config's `Entrypoint`,
//! `Cmd`, `Env`, `WorkingDir` and `User` under the flags of `hypha run`, merged by pure
//! functions; a user name is looked up in the container's own `/etc/passwd` and
//! `/etc/group` (read from its root: an image's layers topmost first, `--rootfs`, or the
//! host's root).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::rootfs::DEFAULT_PATH;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProcessError {
    /// Nothing to run.
    #[error("no command given: hypha run [OPTIONS] -- COMMAND [ARGS...]")]
    NoCommand,
    /// Neither the flags nor the image give a command.
    #[error(
        "no command given: the image {image} has no Entrypoint or Cmd; give one after `--` \
         (or --entrypoint)"
    )]
    ImageNoCommand { image: String },
    /// An `-e` is not `KEY=VALUE` or `KEY`.
    #[error("invalid -e {0:?}: expected KEY=VALUE, or KEY to pass the host's value")]
    BadEnv(String),
    /// `--workdir` is not an absolute path.
    #[error("invalid --workdir {0:?}: expected an absolute path")]
    BadWorkdir(String),
    /// `--user` (or the image's User) is not `USER[:GROUP]`.
    #[error("invalid user {0:?}: expected USER[:GROUP], names or numeric ids")]
    BadUser(String),
    /// A user or group name the container's files do not know.
    #[error("{what} {name:?} not found in the container's {file}")]
    UnknownName {
        what: &'static str,
        name: String,
        file: &'static str,
    },
}

/// What an image's config says about its process (a plain copy of the store's, so that
/// merging is tested without a store).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageProcess {
    /// `NAME:TAG`, for messages.
    pub reference: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// The flags of `hypha run` that shape the process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--entrypoint`: replaces the image's Entrypoint and drops its Cmd; `""` clears it.
    pub entrypoint: Option<String>,
    /// After `--`: replaces the image's Cmd.
    pub command: Vec<String>,
    /// `-e KEY=VALUE` (or `KEY`, the host's value), in order.
    pub env: Vec<String>,
    /// `--workdir`.
    pub workdir: Option<String>,
    /// `--user USER[:GROUP]`.
    pub user: Option<String>,
}

/// The process a container runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub argv: Vec<String>,
    /// `KEY=VALUE`, one per key.
    pub env: Vec<String>,
    /// The working directory, absolute; `None` is `/`.
    pub workdir: Option<PathBuf>,
    /// The user spec still to resolve (`USER[:GROUP]`).
    pub user: Option<String>,
}

/// Merges the image's process (if any) and the flags as `docker run` does: `--entrypoint`
/// replaces the Entrypoint and drops the Cmd, a command after `--` replaces the Cmd, and
/// argv is entrypoint then cmd; the environment is `base` (the launcher's defaults, `PATH`
/// first), then the image's Env, then `-e`, each overriding by key; `host_env` gives the
/// value of a bare `-e KEY` (left out when the host has none).
pub fn merge(
    image: Option<&ImageProcess>,
    o: &Overrides,
    base: &[String],
    host_env: impl Fn(&str) -> Option<String>,
) -> Result<Process, ProcessError> {
    let (image_entrypoint, image_cmd) = image
        .map(|i| (i.entrypoint.clone(), i.cmd.clone()))
        .unwrap_or_default();
    let entrypoint = match &o.entrypoint {
        Some(e) if e.is_empty() => vec![],
        Some(e) => vec![e.clone()],
        None => image_entrypoint,
    };
    let cmd = if !o.command.is_empty() {
        o.command.clone()
    } else if o.entrypoint.is_some() {
        vec![]
    } else {
        image_cmd
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(match image {
            Some(img) => ProcessError::ImageNoCommand {
                image: img.reference.clone(),
            },
            None => ProcessError::NoCommand,
        });
    }
    finish(argv, image, o, base, host_env)
}

fn finish(
    argv: Vec<String>,
    image: Option<&ImageProcess>,
    o: &Overrides,
    base: &[String],
    host_env: impl Fn(&str) -> Option<String>,
) -> Result<Process, ProcessError> {
    let mut env: Vec<String> = vec![];
    let mut set = |kv: String| {
        let key = kv
            .split_once('=')
            .map_or(kv.as_str(), |(k, _)| k)
            .to_owned();
        match env
            .iter_mut()
            .find(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
        {
            Some(e) => *e = kv,
            None => env.push(kv),
        }
    };
    for kv in base {
        set(kv.clone());
    }
    for kv in image.map(|i| i.env.as_slice()).unwrap_or_default() {
        // An image's entry without `=` carries nothing: skipped, as docker does.
        if kv.split_once('=').is_some_and(|(k, _)| !k.is_empty()) {
            set(kv.clone());
        }
    }
    for kv in &o.env {
        match kv.split_once('=') {
            Some((k, _)) if !k.is_empty() => set(kv.clone()),
            None if !kv.is_empty() => {
                if let Some(v) = host_env(kv) {
                    set(format!("{kv}={v}"));
                }
            }
            _ => return Err(ProcessError::BadEnv(kv.clone())),
        }
    }
    let workdir = match (&o.workdir, image.and_then(|i| i.working_dir.as_deref())) {
        (Some(w), _) if w.starts_with('/') => Some(PathBuf::from(w)),
        (Some(w), _) => return Err(ProcessError::BadWorkdir(w.clone())),
        // An image's relative WorkingDir is taken from `/`.
        (None, Some(w)) if !w.is_empty() => Some(Path::new("/").join(w)),
        (None, _) => None,
    };
    let user = o
        .user
        .clone()
        .or_else(|| image.and_then(|i| i.user.clone()))
        .filter(|u| !u.is_empty());
    Ok(Process {
        argv,
        env,
        workdir,
        user,
    })
}

/// The launcher's default environment, under the image's and `-e` (`HOME` comes last,
/// from the user: [`ensure_home`]).
pub fn base_env(hostname: &str) -> Vec<String> {
    vec![
        format!("PATH={DEFAULT_PATH}"),
        format!("HOSTNAME={hostname}"),
        "container=hypha".to_owned(),
    ]
}

/// Adds `HOME` unless the image or `-e` set it: the user's home from passwd, else `/root`
/// for root and `/` for anyone else (docker's rule).
pub fn ensure_home(env: &mut Vec<String>, home: Option<&str>, uid: u32) {
    if env.iter().any(|e| e.starts_with("HOME=")) {
        return;
    }
    let home = home.unwrap_or(if uid == 0 { "/root" } else { "/" });
    env.push(format!("HOME={home}"));
}

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups besides `gid`: those `/etc/group` lists the user's name in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u32>,
}

/// Resolves `USER[:GROUP]` (names or numbers) against the texts of the container's
/// `/etc/passwd` and `/etc/group` (`None`: the file is absent). A numeric user absent
/// from passwd gets group 0; a named one must be there; a group name must be in group.
/// Without an explicit group, a user passwd knows also gets, as supplementary groups,
/// the groups whose member list names it (as `docker run --user` does).
/// Returns the ids and the user's home directory when passwd has it.
pub fn resolve_user(
    spec: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<(User, Option<String>), ProcessError> {
    let bad = || ProcessError::BadUser(spec.to_owned());
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || grp.is_some_and(str::is_empty) {
        return Err(bad());
    }
    // name:password:uid:gid:gecos:home:shell
    let entries = |text: Option<&str>| -> Vec<Vec<String>> {
        text.unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| l.split(':').map(str::to_owned).collect())
            .collect()
    };
    let users = entries(passwd);
    let entry =
        match user.parse::<u32>() {
            Ok(uid) => users
                .iter()
                .find(|f| f.get(2).and_then(|u| u.parse().ok()) == Some(uid)),
            Err(_) => Some(users.iter().find(|f| f[0] == user).ok_or_else(|| {
                ProcessError::UnknownName {
                    what: "user",
                    name: user.to_owned(),
                    file: "/etc/passwd",
                }
            })?),
        };
    let field = |i: usize| entry.and_then(|f| f.get(i)).and_then(|v| v.parse().ok());
    let uid = match user.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => field(2).ok_or_else(bad)?,
    };
    let gid = match grp {
        None => field(3).unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => entries(group)
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f.get(2)?.parse().ok())
                .ok_or_else(|| ProcessError::UnknownName {
                    what: "group",
                    name: g.to_owned(),
                    file: "/etc/group",
                })?,
        },
    };
    let mut groups = Vec::new();
    if let (None, Some(name)) = (grp, entry.map(|f| &f[0])) {
        // name:password:gid:member,member...
        for g in entries(group) {
            let member = g
                .get(3)
                .is_some_and(|m| m.split(',').any(|m| m.trim() == name));
            if let (true, Some(id)) = (member, g.get(2).and_then(|i| i.parse::<u32>().ok()))
                && id != gid
                && !groups.contains(&id)
            {
                groups.push(id);
            }
        }
    }
    let home = entry
        .and_then(|f| f.get(5))
        .filter(|h| !h.is_empty())
        .cloned();
    Ok((User { uid, gid, groups }, home))
}

/// Reads `path` (absolute, in the container) from a stack of root directories, topmost
/// first: the first that has it wins; an overlayfs whiteout (a 0:0 character device) in
/// a higher one hides it. `None` when absent.
pub fn read_in_roots(roots: &[PathBuf], path: &str) -> Option<String> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let rel = path.trim_start_matches('/');
    for r in roots {
        let p = r.join(rel);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_char_device() && m.rdev() == 0 => return None,
            Ok(_) => return std::fs::read_to_string(&p).ok(),
            Err(_) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageProcess {
        ImageProcess {
            reference: "web:1".into(),
            entrypoint: vec!["/bin/server".into(), "--port".into()],
            cmd: vec!["80".into()],
            env: vec!["PATH=/app/bin".into(), "MODE=prod".into(), "NOVALUE".into()],
            working_dir: Some("/srv".into()),
            user: Some("www".into()),
        }
    }

    fn base() -> Vec<String> {
        base_env("c1")
    }

    fn no_host(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_image_alone() {
        let p = merge(Some(&image()), &Overrides::default(), &base(), no_host).unwrap();
        assert_eq!(p.argv, ["/bin/server", "--port", "80"]);
        assert_eq!(
            p.env,
            [
                "PATH=/app/bin",
                "HOSTNAME=c1",
                "container=hypha",
                "MODE=prod"
            ]
        );
        assert_eq!(p.workdir.as_deref(), Some(Path::new("/srv")));
        assert_eq!(p.user.as_deref(), Some("www"));
    }

    #[test]
    fn a_command_replaces_cmd_and_entrypoint_replaces_both() {
        let o = Overrides {
            command: vec!["8080".into()],
            ..Overrides::default()
        };
        let p = merge(Some(&image()), &o, &base(), no_host).unwrap();
        assert_eq!(p.argv, ["/bin/server", "--port", "8080"]);
        let o = Overrides {
            entrypoint: Some("/bin/sh".into()),
            ..Overrides::default()
        };
        let p = merge(Some(&image()), &o, &base(), no_host).unwrap();
        assert_eq!(p.argv, ["/bin/sh"], "the image's Cmd is dropped");
        let o = Overrides {
            entrypoint: Some("/bin/sh".into()),
            command: vec!["-c".into(), "echo".into()],
            ..Overrides::default()
        };
        let p = merge(Some(&image()), &o, &base(), no_host).unwrap();
        assert_eq!(p.argv, ["/bin/sh", "-c", "echo"]);
        let o = Overrides {
            entrypoint: Some(String::new()),
            command: vec!["ls".into()],
            ..Overrides::default()
        };
        let p = merge(Some(&image()), &o, &base(), no_host).unwrap();
        assert_eq!(p.argv, ["ls"], "an empty --entrypoint clears it");
    }

    #[test]
    fn an_empty_command_is_refused_by_name() {
        let img = ImageProcess {
            entrypoint: vec![],
            cmd: vec![],
            ..image()
        };
        let e = merge(Some(&img), &Overrides::default(), &base(), no_host).unwrap_err();
        assert_eq!(
            e,
            ProcessError::ImageNoCommand {
                image: "web:1".into()
            }
        );
        assert!(
            e.to_string().contains("web:1 has no Entrypoint or Cmd"),
            "{e}"
        );
        let o = Overrides {
            entrypoint: Some(String::new()),
            ..Overrides::default()
        };
        assert!(merge(Some(&image()), &o, &base(), no_host).is_err());
        assert_eq!(
            merge(None, &Overrides::default(), &base(), no_host).unwrap_err(),
            ProcessError::NoCommand
        );
    }

    #[test]
    fn env_overrides_by_key_in_order() {
        let o = Overrides {
            env: vec![
                "MODE=dev".into(),
                "HOME=/home/x".into(),
                "EXTRA=a=b".into(),
                "FROMHOST".into(),
                "ABSENT".into(),
                "MODE=test".into(),
            ],
            ..Overrides::default()
        };
        let host = |k: &str| (k == "FROMHOST").then(|| "h".to_owned());
        let p = merge(Some(&image()), &o, &base(), host).unwrap();
        assert_eq!(
            p.env,
            [
                "PATH=/app/bin",
                "HOSTNAME=c1",
                "container=hypha",
                "MODE=test",
                "HOME=/home/x",
                "EXTRA=a=b",
                "FROMHOST=h"
            ]
        );
        // No PATH in the image: the default stays.
        let img = ImageProcess {
            env: vec![],
            ..image()
        };
        let p = merge(Some(&img), &Overrides::default(), &base(), no_host).unwrap();
        assert_eq!(p.env[0], format!("PATH={DEFAULT_PATH}"));
        for bad in ["=x", ""] {
            let o = Overrides {
                env: vec![bad.into()],
                ..Overrides::default()
            };
            assert_eq!(
                merge(Some(&image()), &o, &base(), no_host).unwrap_err(),
                ProcessError::BadEnv(bad.into())
            );
        }
    }

    #[test]
    fn workdir_and_user_flags_win() {
        let o = Overrides {
            workdir: Some("/tmp/w".into()),
            user: Some("1000:1000".into()),
            ..Overrides::default()
        };
        let p = merge(Some(&image()), &o, &base(), no_host).unwrap();
        assert_eq!(p.workdir.as_deref(), Some(Path::new("/tmp/w")));
        assert_eq!(p.user.as_deref(), Some("1000:1000"));
        let o = Overrides {
            workdir: Some("rel".into()),
            ..Overrides::default()
        };
        assert_eq!(
            merge(Some(&image()), &o, &base(), no_host).unwrap_err(),
            ProcessError::BadWorkdir("rel".into())
        );
        let img = ImageProcess {
            working_dir: Some("app".into()),
            user: Some(String::new()),
            ..image()
        };
        let p = merge(Some(&img), &Overrides::default(), &base(), no_host).unwrap();
        assert_eq!(p.workdir.as_deref(), Some(Path::new("/app")));
        assert_eq!(p.user, None);
    }

    #[test]
    fn without_an_image_the_command_is_the_flags() {
        let o = Overrides {
            command: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec!["A=1".into()],
            ..Overrides::default()
        };
        let p = merge(None, &o, &base(), no_host).unwrap();
        assert_eq!(p.argv, ["sh", "-c", "true"]);
        assert_eq!(p.env.last().unwrap(), "A=1");
        assert_eq!((p.workdir, p.user), (None, None));
        let o = Overrides {
            entrypoint: Some("/bin/echo".into()),
            command: vec!["hi".into()],
            ..Overrides::default()
        };
        assert_eq!(
            merge(None, &o, &base(), no_host).unwrap().argv,
            ["/bin/echo", "hi"]
        );
    }

    #[test]
    fn home_from_the_user_unless_set() {
        let mut env = base();
        ensure_home(&mut env, None, 0);
        assert_eq!(env.last().unwrap(), "HOME=/root");
        let mut env = base();
        ensure_home(&mut env, None, 1000);
        assert_eq!(env.last().unwrap(), "HOME=/");
        let mut env = base();
        ensure_home(&mut env, Some("/var/www"), 33);
        assert_eq!(env.last().unwrap(), "HOME=/var/www");
        let mut env = vec!["HOME=/x".to_owned()];
        ensure_home(&mut env, Some("/var/www"), 33);
        assert_eq!(env, ["HOME=/x"]);
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # a comment\n\
                          www:x:33:34:web:/var/www:/sbin/nologin\n\
                          nohome:x:44:45::: \n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:www\naudio:x:63:nobody, www\nwww:x:34:www\n";

    #[test]
    fn users_by_name_and_number() {
        let r = |s: &str| resolve_user(s, Some(PASSWD), Some(GROUP));
        assert_eq!(
            r("www").unwrap(),
            (
                User {
                    uid: 33,
                    gid: 34,
                    groups: vec![50, 63]
                },
                Some("/var/www".into())
            ),
            "supplementary groups from /etc/group, the primary one not repeated"
        );
        assert_eq!(
            r("www:staff").unwrap().0,
            User {
                uid: 33,
                gid: 50,
                groups: vec![]
            },
            "an explicit group alone"
        );
        assert_eq!(
            r("www:7").unwrap().0,
            User {
                uid: 33,
                gid: 7,
                groups: vec![]
            }
        );
        assert_eq!(
            r("33").unwrap().0,
            User {
                uid: 33,
                gid: 34,
                groups: vec![50, 63]
            },
            "passwd's group and the user's name's groups"
        );
        assert_eq!(
            r("1000").unwrap(),
            (
                User {
                    uid: 1000,
                    gid: 0,
                    groups: vec![]
                },
                None
            ),
            "an unknown number: group 0"
        );
        assert_eq!(
            r("1000:1000").unwrap().0,
            User {
                uid: 1000,
                gid: 1000,
                groups: vec![]
            }
        );
        assert_eq!(r("nohome").unwrap().1, None);
        assert_eq!(
            resolve_user("5:6", None, None).unwrap().0,
            User {
                uid: 5,
                gid: 6,
                groups: vec![]
            },
            "numbers need no files"
        );
    }

    #[test]
    fn unknown_names_and_bad_specs_are_refused() {
        let r = |s: &str| {
            resolve_user(s, Some(PASSWD), Some(GROUP))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            r("nobody"),
            "user \"nobody\" not found in the container's /etc/passwd"
        );
        assert_eq!(
            r("www:wheel"),
            "group \"wheel\" not found in the container's /etc/group"
        );
        for bad in [":1", "1:", ""] {
            assert!(r(bad).starts_with("invalid user"), "{bad}: {}", r(bad));
        }
        assert!(resolve_user("www", None, None).is_err(), "no passwd file");
    }

    #[test]
    fn files_are_read_topmost_first_through_whiteouts() {
        let tmp = tempfile::tempdir().unwrap();
        let (top, mid, base) = (
            tmp.path().join("top"),
            tmp.path().join("mid"),
            tmp.path().join("base"),
        );
        for (d, text) in [(&mid, "mid"), (&base, "base")] {
            std::fs::create_dir_all(d.join("etc")).unwrap();
            std::fs::write(d.join("etc/passwd"), text).unwrap();
        }
        std::fs::create_dir_all(top.join("etc")).unwrap();
        let roots = vec![top.clone(), mid.clone(), base.clone()];
        assert_eq!(read_in_roots(&roots, "/etc/passwd").as_deref(), Some("mid"));
        assert_eq!(
            read_in_roots(&roots[2..], "/etc/passwd").as_deref(),
            Some("base")
        );
        assert_eq!(read_in_roots(&roots, "/etc/group"), None);
        // The top layer deletes it: a whiteout hides the lower copies.
        nix::sys::stat::mknod(
            &top.join("etc/passwd"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .expect("mknod a whiteout (the tests run as root)");
        assert_eq!(read_in_roots(&roots, "/etc/passwd"), None);
    }
}
