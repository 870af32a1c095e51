//! Fuzz targets, driven by proptest: the network configuration on stdin, `prevResult` in
//! every CNI version, and `CNI_ARGS`, from the committed corpus (`tests/corpus/`,
//! `tests/fixtures/`) mutated the ways runtimes and attackers get things wrong, and from
//! nothing. Whatever the input: no panic, every failure a CNI error with a code from the
//! spec and a message, and each input handled within [`BUDGET`].
//!
//! `cargo test -p hypha-cni fuzz_` runs a short pass (a few thousand inputs, seconds);
//! `HYPHA_FUZZ_CASES=N` runs N inputs per target and prints the executions and time.
//! Shrunk failures are saved to `proptest-regressions/fuzz.txt` and replayed first.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hypha_api::MacAddr;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

use crate::config::CniVersion;
use crate::env::{Attachment, CniArgs};
use crate::error::{CniError, Error};
use crate::{commands, config, env, result};

/// The most one input may take. Generous for a loaded 2-CPU machine: what it catches is
/// a parser going quadratic on deep or wide input, which costs seconds or hours.
const BUDGET: Duration = Duration::from_secs(2);

/// Inputs per target in a plain `cargo test`.
const DEFAULT_CASES: u32 = 1500;

fn cases() -> u32 {
    std::env::var("HYPHA_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// Runs `test` on `cases()` inputs of `strategy`, then prints how many and how long.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/fuzz.txt"
        )))),
        ..Config::default()
    });
    let start = Instant::now();
    let executions = std::cell::Cell::new(0u64);
    let outcome = runner.run(&strategy, |input| {
        executions.set(executions.get() + 1);
        let began = Instant::now();
        test(input)?;
        let took = began.elapsed();
        prop_assert!(took < BUDGET, "one input took {took:?}");
        Ok(())
    });
    eprintln!(
        "fuzz {name}: {} executions in {:.2?}",
        executions.get(),
        start.elapsed()
    );
    if let Err(e) = outcome {
        panic!("fuzz {name}: {e}");
    }
}

fn assert_cni_error(e: Error) -> Result<(), TestCaseError> {
    let e = CniError::from(e);
    prop_assert!(
        matches!(e.code, 1..=7 | 11 | 50 | 51 | 100..),
        "code {} is not a spec code: {}",
        e.code,
        e.msg
    );
    prop_assert!(!e.msg.is_empty());
    Ok(())
}

fn manifest_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(sub)
}

fn files(dir: &Path, ext: &str) -> Vec<(PathBuf, String)> {
    let mut out: Vec<(PathBuf, String)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, text)
        })
        .collect();
    out.sort();
    out
}

/// The configurations of the corpus and the runtimes' fixtures' stdin.
fn conf_seeds() -> &'static [Value] {
    static SEEDS: OnceLock<Vec<Value>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut seeds: Vec<Value> = files(&manifest_dir("tests/corpus"), "json")
            .into_iter()
            .map(|(p, t)| {
                serde_json::from_str(&t).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            })
            .collect();
        for (p, t) in files(&manifest_dir("tests/fixtures"), "json") {
            let f: Value =
                serde_json::from_str(&t).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            seeds.push(f["stdin"].clone());
        }
        assert!(seeds.len() >= 10, "the corpus is missing: {}", seeds.len());
        seeds
    })
}

/// The `CNI_ARGS` of the corpus and the fixtures.
fn args_seeds() -> &'static [String] {
    static SEEDS: OnceLock<Vec<String>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut seeds: Vec<String> = files(&manifest_dir("tests/corpus"), "txt")
            .into_iter()
            .map(|(_, t)| t.trim().to_owned())
            .collect();
        for (_, t) in files(&manifest_dir("tests/fixtures"), "json") {
            let f: Value = serde_json::from_str(&t).expect("fixture JSON");
            seeds.push(f["cniArgs"].as_str().unwrap_or_default().to_owned());
        }
        seeds
    })
}

/// Any JSON value a few levels deep, under any keys.
fn json_value() -> impl Strategy<Value = Value> {
    crate::properties::json_value_under(".{0,10}".boxed())
}

/// One change to a seed. Node indices are taken modulo the seed's node count.
#[derive(Clone, Debug)]
enum Mutation {
    /// Every key of the node (and under it) in a random mix of cases, from `seed`.
    MangleCase { node: usize, seed: u64 },
    /// The node replaced by another value.
    Replace { node: usize, with: Value },
    /// A key of the node (an object) removed.
    Remove { node: usize, key: usize },
    /// A key of the node doubled under another case with another value.
    Twin {
        node: usize,
        key: usize,
        with: Value,
    },
    /// The node wrapped in `depth` arrays or objects.
    Nest {
        node: usize,
        depth: usize,
        objects: bool,
    },
}

/// A change to the serialized text.
#[derive(Clone, Debug)]
enum TextMutation {
    None,
    /// The `n`th number replaced by a literal no integer or float holds.
    HugeNumber {
        n: usize,
        literal: &'static str,
    },
    /// Cut after `at` bytes (modulo the length).
    Truncate {
        at: usize,
    },
    /// The whole text wrapped `depth` times in `[..]` or `{"prevResult": ..}`: deep
    /// nesting at the parser's door, far past its recursion limit.
    Nest {
        depth: usize,
        objects: bool,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u64>()).prop_map(|(node, seed)| Mutation::MangleCase { node, seed }),
        (any::<usize>(), json_value()).prop_map(|(node, with)| Mutation::Replace { node, with }),
        (any::<usize>(), any::<usize>()).prop_map(|(node, key)| Mutation::Remove { node, key }),
        (any::<usize>(), any::<usize>(), json_value())
            .prop_map(|(node, key, with)| Mutation::Twin { node, key, with }),
        (any::<usize>(), 1usize..3, any::<bool>()).prop_map(|(node, depth, objects)| {
            Mutation::Nest {
                node,
                depth,
                objects,
            }
        }),
    ]
}

fn text_mutation() -> impl Strategy<Value = TextMutation> {
    prop_oneof![
        4 => Just(TextMutation::None),
        1 => (
            any::<usize>(),
            prop_oneof![
                Just("18446744073709551616"),
                Just("-9223372036854775809"),
                Just("1e400"),
                Just("-1e400"),
                Just("123456789012345678901234567890123456789"),
                Just("0.0000000000000000000000000001"),
            ]
        )
            .prop_map(|(n, literal)| TextMutation::HugeNumber { n, literal }),
        1 => any::<usize>().prop_map(|at| TextMutation::Truncate { at }),
        1 => (1usize..10_000, any::<bool>())
            .prop_map(|(depth, objects)| TextMutation::Nest { depth, objects }),
    ]
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count_nodes).sum(),
        Value::Object(o) => o.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// The `idx`th node in pre-order.
fn node_mut<'a>(v: &'a mut Value, idx: &mut usize) -> Option<&'a mut Value> {
    if *idx == 0 {
        return Some(v);
    }
    *idx -= 1;
    match v {
        Value::Array(a) => a.iter_mut().find_map(|c| node_mut(c, idx)),
        Value::Object(o) => o.values_mut().find_map(|c| node_mut(c, idx)),
        _ => None,
    }
}

/// xorshift: deterministic from the case's seed, so failures replay.
fn coin(state: &mut u64) -> bool {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state & 1 == 1
}

fn mangle(v: &mut Value, state: &mut u64) {
    match v {
        Value::Object(o) => {
            let old = std::mem::take(o);
            for (k, mut child) in old {
                let k: String = k
                    .chars()
                    .map(|c| {
                        if coin(state) {
                            c.to_ascii_uppercase()
                        } else {
                            c.to_ascii_lowercase()
                        }
                    })
                    .collect();
                mangle(&mut child, state);
                o.insert(k, child);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| mangle(c, state)),
        _ => {}
    }
}

fn apply(mut v: Value, mutations: &[Mutation]) -> Value {
    for m in mutations {
        let n = count_nodes(&v);
        let pick = |i: usize| i % n;
        match m {
            Mutation::MangleCase { node, seed } => {
                if let Some(t) = node_mut(&mut v, &mut pick(*node)) {
                    let mut state = seed | 1;
                    mangle(t, &mut state);
                }
            }
            Mutation::Replace { node, with } => {
                if let Some(t) = node_mut(&mut v, &mut pick(*node)) {
                    *t = with.clone();
                }
            }
            Mutation::Remove { node, key } => {
                if let Some(Value::Object(o)) = node_mut(&mut v, &mut pick(*node))
                    && !o.is_empty()
                {
                    let k = o.keys().nth(key % o.len()).cloned().expect("in range");
                    o.remove(&k);
                }
            }
            Mutation::Twin { node, key, with } => {
                if let Some(Value::Object(o)) = node_mut(&mut v, &mut pick(*node))
                    && !o.is_empty()
                {
                    let k = o.keys().nth(key % o.len()).cloned().expect("in range");
                    let twin: String = k
                        .chars()
                        .map(|c| {
                            if c.is_ascii_lowercase() {
                                c.to_ascii_uppercase()
                            } else {
                                c.to_ascii_lowercase()
                            }
                        })
                        .collect();
                    o.insert(twin, with.clone());
                }
            }
            Mutation::Nest {
                node,
                depth,
                objects,
            } => {
                if let Some(t) = node_mut(&mut v, &mut pick(*node)) {
                    let mut inner = std::mem::take(t);
                    for _ in 0..*depth {
                        inner = if *objects {
                            json!({ "a": inner })
                        } else {
                            json!([inner])
                        };
                    }
                    *t = inner;
                }
            }
        }
    }
    v
}

fn apply_text(text: String, m: &TextMutation) -> Vec<u8> {
    match m {
        TextMutation::None => text.into_bytes(),
        TextMutation::Nest { depth, objects } => {
            let (open, close) = if *objects {
                ("{\"prevResult\":", "}")
            } else {
                ("[", "]")
            };
            let mut out = open.repeat(*depth);
            out.push_str(&text);
            out.push_str(&close.repeat(*depth));
            out.into_bytes()
        }
        TextMutation::Truncate { at } => {
            let mut b = text.into_bytes();
            let at = at % (b.len() + 1);
            b.truncate(at);
            b
        }
        TextMutation::HugeNumber { n, literal } => {
            // Digit runs outside strings are numbers (keys and values in the corpus that
            // hold digits are quoted; a match inside a string only makes another string).
            let bytes = text.as_bytes();
            let mut runs = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i].is_ascii_digit() && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric()) {
                    let start = i;
                    while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                        i += 1;
                    }
                    runs.push(start..i);
                } else {
                    i += 1;
                }
            }
            if runs.is_empty() {
                return text.into_bytes();
            }
            let r = runs[n % runs.len()].clone();
            let mut out = text[..r.start].to_owned();
            out.push_str(literal);
            out.push_str(&text[r.end..]);
            out.into_bytes()
        }
    }
}

/// Everything the plugin does with a configuration before it touches the system: parse
/// it, read `prevResult` as CHECK does, and work out the address and MAC ADD would ask for.
fn check_conf(bytes: &[u8], args: &CniArgs) -> Result<(), TestCaseError> {
    let _ = config::version_hint(bytes);
    let conf = match config::parse(bytes) {
        Ok(conf) => conf,
        Err(e) => return assert_cni_error(e.into()),
    };
    if let Some(prev) = &conf.prev_result
        && let Err(msg) = result::expected_from_prev_result(prev, "eth0")
    {
        prop_assert!(!msg.is_empty());
        assert_cni_error(Error::InvalidPrevResult(msg))?;
    }
    let a = Attachment {
        container_id: "c".into(),
        netns: "/nonexistent".into(),
        ifname: "eth0".into(),
        args: args.clone(),
    };
    if let Err(e) = commands::add::requested_addresses(&a, &conf) {
        assert_cni_error(e)?;
    }
    if let Err(e) = commands::add::requested_mac(&a, &conf) {
        assert_cni_error(e)?;
    }
    Ok(())
}

#[test]
fn fuzz_stdin_from_the_corpus_mutated() {
    let seeds = conf_seeds();
    let strategy = (
        0..seeds.len(),
        prop::collection::vec(mutation(), 0..4),
        text_mutation(),
    );
    fuzz("stdin (corpus, mutated)", strategy, |(i, muts, text)| {
        let v = apply(seeds[i].clone(), &muts);
        let bytes = apply_text(v.to_string(), &text);
        check_conf(&bytes, &CniArgs::default())
    });
}

#[test]
fn fuzz_stdin_from_nothing() {
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512).boxed(),
        json_value()
            .prop_map(|v| v.to_string().into_bytes())
            .boxed(),
        // Brackets only: nesting far past any sane depth, open or closed.
        (1usize..5000, any::<bool>())
            .prop_map(|(depth, close)| {
                let mut s = "[".repeat(depth);
                if close {
                    s.push_str(&"]".repeat(depth));
                }
                s.into_bytes()
            })
            .boxed(),
    ];
    fuzz("stdin (from nothing)", strategy, |bytes| {
        check_conf(&bytes, &CniArgs::default())
    });
}

/// A pair of `CNI_ARGS` with a key this plugin reads, or another.
fn arg_pair() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("IgnoreUnknown".to_owned()),
        Just("K8S_POD_NAMESPACE".to_owned()),
        Just("K8S_POD_NAME".to_owned()),
        Just("K8S_POD_INFRA_CONTAINER_ID".to_owned()),
        Just("K8S_POD_UID".to_owned()),
        Just("IP".to_owned()),
        Just("MAC".to_owned()),
        Just("ip".to_owned()),
        "[A-Za-z_]{0,10}",
    ];
    let value = prop_oneof![
        Just("1".to_owned()),
        Just("true".to_owned()),
        Just("10.88.0.5".to_owned()),
        Just("10.88.0.5/24,fd00::5".to_owned()),
        Just("10.88.0.5,".to_owned()),
        Just("02:00:00:00:00:05".to_owned()),
        Just("01:00:5e:00:00:01".to_owned()),
        ".{0,24}",
    ];
    (key, value, any::<bool>()).prop_map(|(k, v, eq)| if eq { format!("{k}={v}") } else { k })
}

#[test]
fn fuzz_cni_args() {
    let seeds = args_seeds();
    let strategy = (
        0..seeds.len(),
        prop::collection::vec((any::<usize>(), arg_pair()), 0..4),
        any::<bool>(),
    );
    fuzz("CNI_ARGS", strategy, |(i, inserts, replace)| {
        let mut pairs: Vec<String> = seeds[i].split(';').map(str::to_owned).collect();
        for (at, pair) in inserts {
            let at = at % (pairs.len() + 1);
            if replace && at < pairs.len() {
                pairs[at] = pair;
            } else {
                pairs.insert(at, pair);
            }
        }
        let args = pairs.join(";");
        match env::parse_args(&args) {
            Ok(parsed) => {
                // What ADD would ask for with these arguments and a seed configuration.
                let conf = serde_json::to_vec(&conf_seeds()[i % conf_seeds().len()])
                    .expect("a value serializes");
                check_conf(&conf, &parsed)
            }
            Err(e) => {
                prop_assert!(e.to_string().starts_with("CNI_ARGS"), "{}", e);
                assert_cni_error(e.into())
            }
        }
    });
}

/// This plugin's own results in every version, mutated, as `prevResult` of CHECK (and of
/// a chained plugin's ADD): read or refused with a message.
#[test]
fn fuzz_prev_result_of_every_version() {
    let strategy = (
        prop::sample::select(CniVersion::ALL.to_vec()),
        prop::collection::vec(mutation(), 0..4),
        any::<bool>(),
        text_mutation(),
    );
    fuzz(
        "prevResult",
        strategy,
        |(version, muts, ok_unmutated, text)| {
            let attached = result::Attached {
                host_ifname: "hyp538f587a2365",
                host_mac: MacAddr([0x02, 0, 0, 0, 0, 1]),
                ifname: "eth0",
                pod_mac: MacAddr([0x02, 0, 0, 0, 0, 2]),
                netns: Path::new("/run/netns/p"),
                ipv4: Some(result::Family {
                    address: Ipv4Addr::new(10, 244, 0, 5),
                    gateway: Ipv4Addr::new(10, 244, 0, 1),
                }),
                ipv6: Some(result::Family {
                    address: "fd00:10:244::5".parse().unwrap(),
                    gateway: "fe80::1".parse().unwrap(),
                }),
                dns: None,
                mtu: Some(1450),
            };
            let clean = result::add_result(version, &attached);
            if ok_unmutated {
                prop_assert!(result::expected_from_prev_result(&clean, "eth0").is_ok());
            }
            let prev = apply(clean, &muts);
            if let Err(msg) = result::expected_from_prev_result(&prev, "eth0") {
                prop_assert!(!msg.is_empty());
            }
            let mut conf = Map::new();
            conf.insert("cniVersion".into(), json!(version.as_str()));
            conf.insert("name".into(), json!("n"));
            conf.insert("prevResult".into(), prev);
            check_conf(
                &apply_text(Value::Object(conf).to_string(), &text),
                &CniArgs::default(),
            )
        },
    );
}
