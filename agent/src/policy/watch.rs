//! Which files of the watched policy directory to (re)apply, from a scan of the directory
//! and the clock: pure, so the loop's logic is tested without a directory or real time.
//!
//! A file is applied when it appears or its modification time or size changes. A file
//! that was refused (unreadable, invalid, in conflict, or refused by the agent: maps full,
//! an I/O error saving the state) is tried again with backoff, [`FIRST_RETRY`] doubling up
//! to [`MAX_RETRY`], even if nothing about it changes, until it is applied, changed or
//! removed. A removal that fails is retried the same way.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// The first retry of a refused file comes this long after the refusal.
pub const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Retries double up to this interval.
pub const MAX_RETRY: Duration = Duration::from_secs(10);

/// What a scan saw of a file: its modification time and size, or why it cannot be read
/// (a dangling symlink, a directory named `x.yaml`, ...).
pub type Seen = Result<(SystemTime, u64), String>;

/// A scan of the directory: its policy files by path.
pub type Scan = BTreeMap<PathBuf, Seen>;

/// What to do now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Files to read, parse and apply, with what the scan saw of them.
    pub files: Vec<(PathBuf, Seen)>,
    /// Files gone whose policies are to be removed.
    pub removed: Vec<PathBuf>,
}

impl Due {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.removed.is_empty()
    }
}

#[derive(Debug)]
struct Tracked {
    /// What the scan saw when the file was last handled; `None`: it is gone, and
    /// removing its policies failed.
    seen: Option<Seen>,
    /// Failed attempts in a row (0: applied).
    failures: u32,
    /// When to try again after a failure.
    retry_at: Option<Instant>,
}

/// The loop's memory of the directory.
#[derive(Debug, Default)]
pub struct DirWatch {
    files: BTreeMap<PathBuf, Tracked>,
}

/// The wait before the next attempt after `failures` failures in a row.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << exp).min(MAX_RETRY)
}

impl DirWatch {
    /// The files to handle now: new, changed, or refused and due for a retry; and the
    /// files gone (their removal not yet done, or due for a retry).
    pub fn due(&self, scan: &Scan, now: Instant) -> Due {
        let retry_due = |t: &Tracked| t.retry_at.is_some_and(|at| at <= now);
        let mut due = Due::default();
        for (path, seen) in scan {
            let handle = match self.files.get(path) {
                None => true,
                Some(t) => t.seen.as_ref() != Some(seen) || retry_due(t),
            };
            if handle {
                due.files.push((path.clone(), seen.clone()));
            }
        }
        for (path, t) in &self.files {
            // A file just gone is handled at once; a failed removal when its retry is due.
            if !scan.contains_key(path) && (t.seen.is_some() || retry_due(t)) {
                due.removed.push(path.clone());
            }
        }
        due
    }

    /// Records what happened to `path`: `seen` is what the scan saw (`None`: the file was
    /// removed), `outcome` whether the agent applied it.
    pub fn record(
        &mut self,
        path: PathBuf,
        seen: Option<Seen>,
        outcome: &Result<(), String>,
        now: Instant,
    ) {
        match (seen, outcome) {
            (None, Ok(())) => {
                self.files.remove(&path);
            }
            (Some(seen), Ok(())) => {
                self.files.insert(
                    path,
                    Tracked {
                        seen: Some(seen),
                        failures: 0,
                        retry_at: None,
                    },
                );
            }
            (seen, Err(_)) => {
                let t = self.files.entry(path).or_insert(Tracked {
                    seen: None,
                    failures: 0,
                    retry_at: None,
                });
                if t.seen != seen {
                    // Another version of the file (or its removal): the backoff starts over.
                    t.failures = 0;
                }
                t.seen = seen;
                t.failures += 1;
                t.retry_at = Some(now + backoff(t.failures));
            }
        }
    }

    /// Failed attempts in a row for `path`.
    pub fn failures(&self, path: &std::path::Path) -> u32 {
        self.files.get(path).map_or(0, |t| t.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(secs: u64, len: u64) -> Seen {
        Ok((SystemTime::UNIX_EPOCH + Duration::from_secs(secs), len))
    }

    fn scan(entries: &[(&str, Seen)]) -> Scan {
        entries
            .iter()
            .map(|(p, s)| (PathBuf::from(p), s.clone()))
            .collect()
    }

    fn paths(due: &Due) -> Vec<&str> {
        due.files.iter().map(|(p, _)| p.to_str().unwrap()).collect()
    }

    #[test]
    fn backoff_doubles_from_100ms_to_10s() {
        let waits: Vec<u128> = (1..10).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000]);
        assert_eq!(backoff(u32::MAX), MAX_RETRY);
    }

    #[test]
    fn new_and_changed_files_are_due_and_applied_ones_are_not() {
        let t0 = Instant::now();
        let mut w = DirWatch::default();
        let s = scan(&[("/p/a.yaml", stamp(1, 10)), ("/p/b.yaml", stamp(1, 20))]);
        assert_eq!(paths(&w.due(&s, t0)), ["/p/a.yaml", "/p/b.yaml"]);
        for (p, seen) in w.due(&s, t0).files {
            w.record(p, Some(seen), &Ok(()), t0);
        }
        assert!(w.due(&s, t0 + MAX_RETRY * 2).is_empty());
        let s = scan(&[("/p/a.yaml", stamp(2, 10)), ("/p/b.yaml", stamp(1, 20))]);
        assert_eq!(paths(&w.due(&s, t0)), ["/p/a.yaml"]);
    }

    #[test]
    fn a_refused_file_is_retried_with_backoff_without_any_change() {
        let t0 = Instant::now();
        let mut w = DirWatch::default();
        let s = scan(&[("/p/a.yaml", stamp(1, 10))]);
        let seen = stamp(1, 10);
        let fail = Err("/p/a.yaml: the maps are full".to_owned());
        w.record("/p/a.yaml".into(), Some(seen.clone()), &fail, t0);
        assert!(w.due(&s, t0 + Duration::from_millis(99)).is_empty());
        assert_eq!(paths(&w.due(&s, t0 + FIRST_RETRY)), ["/p/a.yaml"]);
        // Second failure: 200 ms later.
        let t1 = t0 + FIRST_RETRY;
        w.record("/p/a.yaml".into(), Some(seen.clone()), &fail, t1);
        assert_eq!(w.failures("/p/a.yaml".as_ref()), 2);
        assert!(w.due(&s, t1 + Duration::from_millis(199)).is_empty());
        assert!(!w.due(&s, t1 + Duration::from_millis(200)).is_empty());
        // Many failures: never more than 10 s apart.
        for _ in 0..20 {
            w.record("/p/a.yaml".into(), Some(seen.clone()), &fail, t1);
        }
        assert!(!w.due(&s, t1 + MAX_RETRY).is_empty());
        // A change is handled at once, and its backoff starts over.
        let changed = scan(&[("/p/a.yaml", stamp(2, 10))]);
        assert!(!w.due(&changed, t1).is_empty());
        w.record("/p/a.yaml".into(), Some(stamp(2, 10)), &fail, t1);
        assert_eq!(w.failures("/p/a.yaml".as_ref()), 1);
        // Success: no more retries.
        w.record("/p/a.yaml".into(), Some(stamp(2, 10)), &Ok(()), t1);
        assert!(w.due(&changed, t1 + MAX_RETRY * 2).is_empty());
    }

    #[test]
    fn an_unreadable_file_is_retried_and_handled_when_it_becomes_readable() {
        let t0 = Instant::now();
        let mut w = DirWatch::default();
        let dangling: Seen = Err("cannot read /p/a.yaml: No such file or directory".into());
        let s = scan(&[("/p/a.yaml", dangling.clone())]);
        let due = w.due(&s, t0);
        assert_eq!(due.files, [("/p/a.yaml".into(), dangling.clone())]);
        w.record(
            "/p/a.yaml".into(),
            Some(dangling.clone()),
            &Err("x".into()),
            t0,
        );
        assert!(w.due(&s, t0).is_empty());
        // Readable now: handled at the next scan, whatever the backoff.
        let s = scan(&[("/p/a.yaml", stamp(5, 10))]);
        assert_eq!(paths(&w.due(&s, t0)), ["/p/a.yaml"]);
    }

    #[test]
    fn removed_files_are_due_once_and_retried_when_the_removal_fails() {
        let t0 = Instant::now();
        let mut w = DirWatch::default();
        w.record("/p/a.yaml".into(), Some(stamp(1, 1)), &Ok(()), t0);
        let empty = Scan::new();
        assert_eq!(w.due(&empty, t0).removed, [PathBuf::from("/p/a.yaml")]);
        w.record("/p/a.yaml".into(), None, &Err("io".into()), t0);
        assert!(w.due(&empty, t0).is_empty());
        assert_eq!(
            w.due(&empty, t0 + FIRST_RETRY).removed,
            [PathBuf::from("/p/a.yaml")]
        );
        w.record("/p/a.yaml".into(), None, &Ok(()), t0 + FIRST_RETRY);
        assert!(w.due(&empty, t0 + MAX_RETRY * 2).is_empty());
        // A file refused and then removed is removed at once (its old policies go).
        w.record(
            "/p/b.yaml".into(),
            Some(stamp(1, 1)),
            &Err("bad".into()),
            t0,
        );
        assert_eq!(w.due(&empty, t0).removed, [PathBuf::from("/p/b.yaml")]);
    }
}
