//! Property-based fuzzing of the policy parser (`hypha_agent::policy::parse_file`), YAML
//! and JSON: random text, mutations of the seed corpus (`tests/corpus/policy/`), deep
//! nesting, anchor bombs, huge scalars and unicode. For every input: no panic, an answer
//! within a time bound, and either policies or a clear error that names the file.
//!
//! `cargo test -p hypha-agent --test policy_fuzz` runs a short pass (a few seconds);
//! `HYPHA_FUZZ_CASES=N` runs N cases per property (a longer run: see the README for the
//! figures of one).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hypha_agent::policy::limits::{MAX_DEPTH, MAX_FILE_BYTES};
use hypha_agent::policy::{PolicyError, parse_file};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

/// Cases per property: `HYPHA_FUZZ_CASES`, default small enough for `cargo test`.
fn config(default: u32) -> Config {
    let cases = std::env::var("HYPHA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

/// The most a parse of `len` bytes may take: linear in the size, with room for a busy
/// machine. An unoptimized libyaml reads about 3 MB/s per pass and a file takes three
/// passes (the limits, the headers, the documents): a 2.6 MB scalar took 3.5 s in a debug
/// build, well under a second in a release build. The quadratic inputs this guards
/// against take minutes for 200 KB.
fn time_limit(len: usize) -> Duration {
    let mib = len as f64 / (1 << 20) as f64;
    if cfg!(debug_assertions) {
        Duration::from_secs_f64(2.0 + 5.0 * mib)
    } else {
        Duration::from_secs_f64(1.0 + 0.5 * mib)
    }
}

/// The most memory the test process may have used at its peak (the largest input is
/// 4 MiB; the parser's events for it take some tens of MiB).
const MEMORY_LIMIT_KIB: u64 = 1024 * 1024;

/// The process's peak resident size so far (`VmHWM`), 0 where unknown.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn corpus() -> &'static Vec<(String, String)> {
    static SEEDS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/policy");
        let mut seeds: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| {
                let path = e.expect("corpus entry").path();
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                (
                    path.file_name().unwrap().to_string_lossy().into_owned(),
                    text,
                )
            })
            .collect();
        seeds.sort();
        assert!(seeds.len() >= 5, "the corpus has its seeds");
        seeds
    })
}

/// Parses `content` as file `name`, checking the properties every input must have.
fn check(name: &str, content: &str) -> Result<(), TestCaseError> {
    let start = Instant::now();
    let result = parse_file(name, content);
    let took = start.elapsed();
    prop_assert!(
        took < time_limit(content.len()),
        "{} bytes took {took:?}",
        content.len()
    );
    let peak = peak_rss_kib();
    prop_assert!(peak < MEMORY_LIMIT_KIB, "peak RSS {peak} KiB");
    match result {
        Ok(policies) => {
            prop_assert!(content.len() <= MAX_FILE_BYTES);
            for p in &policies {
                prop_assert!(!p.name.is_empty() && !p.namespace.is_empty());
            }
        }
        Err(PolicyError::Invalid {
            source_name,
            message,
        }) => {
            prop_assert_eq!(&source_name, name);
            prop_assert!(!message.trim().is_empty(), "an empty message");
        }
        Err(PolicyError::Duplicate { first, second, .. }) => {
            prop_assert!(first == name && second == name);
        }
        Err(e) => prop_assert!(false, "parse_file answered {e:?}"),
    }
    Ok(())
}

/// One edit of a text, on character boundaries.
#[derive(Clone, Debug)]
enum Mutation {
    Insert(usize, String),
    Delete(usize, usize),
    Duplicate(usize, usize, usize),
    Nest(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let fragment = prop_oneof![
        Just(": ".to_owned()),
        Just("- ".to_owned()),
        Just("\n".to_owned()),
        Just("  ".to_owned()),
        Just("&a ".to_owned()),
        Just("*a".to_owned()),
        Just("!!str ".to_owned()),
        Just("'".to_owned()),
        Just("\"".to_owned()),
        Just("---\n".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just("port: 99999".to_owned()),
        Just("cidr: 10.0.0.1/8".to_owned()),
        Just("\u{feff}".to_owned()),
        "\\PC{1,8}",
        "[ -~]{1,12}",
    ];
    prop_oneof![
        (any::<usize>(), fragment).prop_map(|(at, s)| Mutation::Insert(at, s)),
        (any::<usize>(), 1usize..40).prop_map(|(at, n)| Mutation::Delete(at, n)),
        (any::<usize>(), 1usize..80, 1usize..50)
            .prop_map(|(at, n, times)| Mutation::Duplicate(at, n, times)),
        (any::<usize>(), 1usize..200).prop_map(|(at, depth)| Mutation::Nest(at, depth)),
    ]
}

fn apply(text: &str, m: &Mutation) -> String {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: usize| {
        if chars.is_empty() {
            0
        } else {
            i % (chars.len() + 1)
        }
    };
    let s = |a: usize, b: usize| {
        let b = b.min(chars.len());
        chars[a.min(b)..b].iter().collect::<String>()
    };
    match m {
        Mutation::Insert(i, frag) => format!("{}{frag}{}", s(0, at(*i)), s(at(*i), chars.len())),
        Mutation::Delete(i, n) => format!("{}{}", s(0, at(*i)), s(at(*i) + n, chars.len())),
        Mutation::Duplicate(i, n, times) => {
            let piece = s(at(*i), at(*i) + n);
            format!(
                "{}{}{}",
                s(0, at(*i)),
                piece.repeat(*times),
                s(at(*i), chars.len())
            )
        }
        Mutation::Nest(i, depth) => format!(
            "{}{}{}{}",
            s(0, at(*i)),
            "[".repeat(*depth),
            "]".repeat(*depth),
            s(at(*i), chars.len())
        ),
    }
}

/// A JSON value of bounded size, as text.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        "\\PC{0,20}".prop_map(serde_json::Value::from),
        prop_oneof![
            Just("apiVersion"),
            Just("kind"),
            Just("metadata"),
            Just("spec"),
            Just("NetworkPolicy"),
            Just("networking.k8s.io/v1"),
            Just("hypha.dev/v1"),
            Just("HyphaNetworkPolicy"),
        ]
        .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(8, 128, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("apiVersion".to_owned()),
                    Just("kind".to_owned()),
                    Just("metadata".to_owned()),
                    Just("name".to_owned()),
                    Just("spec".to_owned()),
                    Just("podSelector".to_owned()),
                    Just("ingress".to_owned()),
                    "\\PC{0,10}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn every_seed_of_the_corpus_parses() {
    for (name, text) in corpus() {
        let result = parse_file(name, text);
        if name.starts_with("laughs") || name.starts_with("deep") {
            let msg = result.expect_err(name).to_string();
            assert!(
                msg.contains("nodes once aliases") || msg.contains("nesting deeper"),
                "{msg}"
            );
        } else {
            assert!(!result.expect(name).is_empty(), "{name}");
        }
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn random_text(text in "[ -~\n\t\u{a0}-\u{2fff}]{0,400}") {
        check("random.yaml", &text)?;
    }

    #[test]
    fn mutated_seeds(seed in 0usize..64, edits in prop::collection::vec(mutation(), 1..6)) {
        let (name, text) = &corpus()[seed % corpus().len()];
        let mut text = text.clone();
        for m in &edits {
            text = apply(&text, m);
        }
        check(name, &text)?;
    }

    #[test]
    fn random_json(v in json_value()) {
        check("random.json", &v.to_string())?;
        check("random.yaml", &serde_yaml_ng::to_string(&v).unwrap_or_default())?;
    }
}

proptest! {
    // Each case here is up to a few MiB: fewer of them.
    #![proptest_config(config(6))]

    #[test]
    fn deep_nesting(depth in 1usize..150_000, opener in prop_oneof![Just("["), Just("{a: "), Just("- "), Just("{\"a\":")], json in any::<bool>()) {
        let body = opener.repeat(depth);
        let text = if json {
            format!("{{\"spec\": {body}")
        } else if opener == "- " {
            format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nspec:\n{body}x\n")
        } else {
            format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nspec: {body}\n")
        };
        check("deep.yaml", &text)?;
        // In JSON only `[` and `{"a":` nest (the others are a syntax error).
        let nests = !json || opener == "[" || opener == "{\"a\":";
        if nests && depth > MAX_DEPTH + 2 {
            let msg = parse_file("deep.yaml", &text).unwrap_err().to_string();
            prop_assert!(msg.contains("nesting deeper than 64 levels"), "{}", msg);
        }
    }

    #[test]
    fn anchor_bombs(levels in 1usize..12, fanout in 1usize..16) {
        let mut doc = String::from("metadata:\n  annotations:\n    a0: &a0 [lol]\n");
        for i in 1..levels {
            let refs = vec![format!("*a{}", i - 1); fanout].join(", ");
            doc.push_str(&format!("    a{i}: &a{i} [{refs}]\n"));
        }
        let text = format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n{doc}");
        check("bomb.yaml", &text)?;
        let expanded = (0..levels).map(|l| (fanout as f64).powi(l as i32)).sum::<f64>();
        if expanded > 2e6 {
            let msg = parse_file("bomb.yaml", &text).unwrap_err().to_string();
            prop_assert!(msg.contains("nodes once aliases"), "{}", msg);
        }
    }

    #[test]
    fn huge_scalars(len in 0usize..(MAX_FILE_BYTES + 4096), quoted in any::<bool>(), c in "\\PC") {
        let n = len / c.len().max(1);
        let value = c.repeat(n);
        let value = if quoted { format!("{:?}", value) } else { value };
        let text = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: x\n  annotations: {{a: {value}}}\nspec: {{}}\n"
        );
        check("huge.yaml", &text)?;
        if text.len() > MAX_FILE_BYTES {
            let msg = parse_file("huge.yaml", &text).unwrap_err().to_string();
            prop_assert!(msg.contains("at most 4194304 bytes"), "{}", msg);
        }
    }
}
