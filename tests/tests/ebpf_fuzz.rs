//! Both eBPF programs on random and mutated frames through `BPF_PROG_TEST_RUN`, with
//! endpoints, identities and policy in the maps.
//!
//! **Privileged**, like `ebpf_verdicts.rs`: loads the object (CAP_BPF, CAP_SYS_ADMIN)
//! and creates veths in a namespace of its own (CAP_NET_ADMIN).
//!
//! Inputs are random bytes and the seed frames of `tests/corpus/ebpf/` mutated (bytes
//! flipped, header fields set to edge values) and truncated, run through either program
//! on any of the endpoints' veths or on a veth no endpoint owns; and, deterministically,
//! every seed truncated at every length. For every run:
//! - the kernel either refuses the frame before the program runs (too short for its
//!   EtherType) and nothing is counted, or the program returns `TC_ACT_OK`,
//!   `TC_ACT_SHOT` or `TC_ACT_REDIRECT` (and `hypha_to_pod` never redirects);
//! - the frame out is never longer than the frame in (the only answer the programs
//!   build, the ARP reply, is made in place);
//! - exactly the counters the verdict implies move, by one packet of the frame's length:
//!   a pass, a redirect (at the sender and the receiver), or a drop counted both in an
//!   endpoint's `dropped` and in one `hypha_drops` entry of the same endpoint and
//!   direction; a frame redirected to the rate-limited endpoint's egress is then taken
//!   by its `hypha_to_pod` without being counted again.
//!
//! That nothing reads past the packet is the verifier's guarantee (every access is
//! bounds-checked or goes through `bpf_skb_load_bytes`): the object is loaded, so it
//! holds, and the runs here exercise those bounds at every length.
//!
//! `HYPHA_FUZZ_CASES` sets the number of random cases (default 2,000, a few seconds).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use hypha_common::{
    Counter, DIR_EGRESS, DIR_INGRESS, DropKey, ENDPOINT_F_EGRESS_POLICY, ENDPOINT_F_INGRESS_LIMIT,
    ENDPOINT_F_INGRESS_POLICY, EndpointInfo, FamilyStats, IDENTITY_ANY, IDENTITY_WORLD,
    IDENTITY_WORLD6, NodeConfig, POLICY_ALLOW, POLICY_DENY, PolicyEntry, PolicyKey,
    programs::{FROM_POD, TO_POD},
};
use hypha_tests::ebpf::{
    Datapath, RunOptions, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestNetns, pin_to_current_cpu,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const GATEWAY_IP: [u8; 4] = [10, 244, 0, 1];
const A_IP: [u8; 4] = [10, 244, 0, 7];
const B_IP: [u8; 4] = [10, 244, 0, 8];
const C_IP: [u8; 4] = [10, 244, 0, 9];
/// `fd00::7`, `fd00::8`, `fd00::9`: every endpoint is dual stack.
const A_IP6: [u8; 16] = ip6(7);
const B_IP6: [u8; 16] = ip6(8);
const C_IP6: [u8; 16] = ip6(9);

const fn ip6(last: u8) -> [u8; 16] {
    [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, last]
}
const ID_A: u32 = 300;
const ID_B: u32 = 301;
const ID_C: u32 = 302;

/// Length of the neighbour advertisement `hypha_from_pod` answers a solicitation for the
/// gateway with: Ethernet, IPv6, the message and one option.
const NA_LEN: usize = 14 + 40 + 24 + 8;
const ETH_HLEN: usize = 14;

/// Environment variable: number of random cases.
const CASES_ENV: &str = "HYPHA_FUZZ_CASES";
const DEFAULT_CASES: u32 = 2_000;

/// The seed frames, by file name (without `.hex`).
fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/ebpf");
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap_or_else(|e| panic!("read {}: {e}", dir.display())))
        .filter(|entry| entry.path().extension().is_some_and(|x| x == "hex"))
        .map(|entry| {
            let path = entry.path();
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            (name, decode_hex(text.trim(), &path))
        })
        .collect();
    seeds.sort();
    assert!(
        seeds.len() >= 10,
        "the corpus in {} has {} seeds",
        dir.display(),
        seeds.len()
    );
    seeds
}

fn decode_hex(text: &str, path: &std::path::Path) -> Vec<u8> {
    assert!(
        text.len().is_multiple_of(2),
        "{}: odd number of hex digits",
        path.display()
    );
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16)
                .unwrap_or_else(|e| panic!("{}: at {i}: {e}", path.display()))
        })
        .collect()
}

/// The program a frame runs through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prog {
    FromPod,
    ToPod,
}

/// Three endpoints and a stranger veth, with identities and policy.
struct FuzzNode {
    dp: Datapath,
    a: u32,
    b: u32,
    c: u32,
    /// A veth no endpoint owns (no `hypha_ep_stats` entry).
    x: u32,
    _netns: TestNetns,
}

impl FuzzNode {
    fn new() -> Self {
        let netns = TestNetns::enter();
        let a = netns.add_veth("hy-host-a", "hy-pod-a");
        let b = netns.add_veth("hy-host-b", "hy-pod-b");
        let c = netns.add_veth("hy-host-c", "hy-pod-c");
        let x = netns.add_veth("hy-host-x", "hy-pod-x");
        let mut dp = Datapath::load();
        dp.set_config(NodeConfig {
            gateway: u32::from_ne_bytes(GATEWAY_IP),
            flags: 0,
        });
        let endpoint = |ifindex, endpoint_id, tag: u8, last: u8, flags| EndpointInfo {
            ifindex,
            endpoint_id,
            pod_mac: [0x02, tag, 0, 0, 0, last],
            host_mac: [0x02, tag, 0, 0, 0, 0x01],
            flags,
        };
        dp.add_endpoint_with(Some(A_IP), Some(A_IP6), endpoint(a, 1, 0xaa, 7, 0));
        dp.add_endpoint_with(
            Some(B_IP),
            Some(B_IP6),
            endpoint(b, 2, 0xbb, 8, ENDPOINT_F_INGRESS_POLICY),
        );
        dp.add_endpoint_with(
            Some(C_IP),
            Some(C_IP6),
            endpoint(
                c,
                3,
                0xcc,
                9,
                ENDPOINT_F_EGRESS_POLICY | ENDPOINT_F_INGRESS_LIMIT,
            ),
        );
        dp.set_identity(A_IP, 32, ID_A);
        dp.set_identity(B_IP, 32, ID_B);
        dp.set_identity(C_IP, 32, ID_C);
        dp.set_identity([0, 0, 0, 0], 0, IDENTITY_WORLD);
        dp.set_identity6(A_IP6, 128, ID_A);
        dp.set_identity6(B_IP6, 128, ID_B);
        dp.set_identity6(C_IP6, 128, ID_C);
        dp.set_identity6([0; 16], 0, IDENTITY_WORLD6);
        let rule = |endpoint_id, identity, proto, dport, direction, action, policy_id| {
            (
                PolicyKey {
                    endpoint_id,
                    identity,
                    dport,
                    proto,
                    direction,
                },
                PolicyEntry {
                    policy_id,
                    action,
                    flags: 0,
                    _pad: 0,
                },
            )
        };
        for (key, entry) in [
            rule(2, ID_A, 17, 53, DIR_INGRESS, POLICY_ALLOW, 1),
            rule(2, ID_A, 6, 80, DIR_INGRESS, POLICY_ALLOW, 1),
            rule(2, IDENTITY_ANY, 6, 22, DIR_INGRESS, POLICY_DENY, 2),
            rule(2, IDENTITY_WORLD, 17, 53, DIR_INGRESS, POLICY_ALLOW, 3),
            rule(3, IDENTITY_WORLD, 0, 0, DIR_EGRESS, POLICY_ALLOW, 4),
            rule(2, IDENTITY_WORLD6, 17, 53, DIR_INGRESS, POLICY_ALLOW, 3),
            rule(3, IDENTITY_WORLD6, 0, 0, DIR_EGRESS, POLICY_ALLOW, 4),
        ] {
            dp.set_policy(key, entry);
        }
        Self {
            dp,
            a,
            b,
            c,
            x,
            _netns: netns,
        }
    }

    /// The endpoints with counters, in a fixed order.
    fn endpoints(&self) -> [u32; 3] {
        [self.a, self.b, self.c]
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            stats: self.endpoints().map(|ifindex| self.dp.stats(ifindex)),
            drops: self.dp.drops().into_iter().collect(),
        }
    }
}

struct Snapshot {
    stats: [FamilyStats; 3],
    drops: HashMap<DropKey, Counter>,
}

/// A counter that moved between two snapshots: (ifindex, which counter, by how much).
type Move = (u32, &'static str, Counter);

const FIELDS: [&str; 6] = [
    "egress.passed",
    "egress.redirected",
    "egress.dropped",
    "ingress.passed",
    "ingress.redirected",
    "ingress.dropped",
];

fn fields(s: &FamilyStats) -> [Counter; 6] {
    [
        s.egress.passed,
        s.egress.redirected,
        s.egress.dropped,
        s.ingress.passed,
        s.ingress.redirected,
        s.ingress.dropped,
    ]
}

fn diff(a: &Counter, b: &Counter) -> Counter {
    Counter {
        packets: b.packets.wrapping_sub(a.packets),
        bytes: b.bytes.wrapping_sub(a.bytes),
    }
}

/// What the whole run saw.
#[derive(Debug, Default)]
struct Totals {
    runs: u64,
    refused: u64,
    passed: u64,
    dropped: u64,
    redirected: u64,
    /// Frames `hypha_to_pod` recognised as redirected by `hypha_from_pod`.
    taken_over: u64,
}

/// Runs frames and checks every run's verdict, output and counters.
struct Checker {
    node: FuzzNode,
    /// The frame `hypha_from_pod` last redirected to the rate-limited C's egress and no
    /// `hypha_to_pod` run has consumed yet: (ifindex, length).
    pending: Option<(u32, u32)>,
    totals: Totals,
}

impl Checker {
    fn new() -> Self {
        Self {
            node: FuzzNode::new(),
            pending: None,
            totals: Totals::default(),
        }
    }

    fn ifindex(&self, which: u8) -> u32 {
        match which % 4 {
            0 => self.node.a,
            1 => self.node.b,
            2 => self.node.c,
            _ => self.node.x,
        }
    }

    fn check(&mut self, prog: Prog, ifindex: u32, frame: &[u8]) -> Result<(), String> {
        let name = match prog {
            Prog::FromPod => FROM_POD,
            Prog::ToPod => TO_POD,
        };
        let before = self.node.snapshot();
        let result = self
            .node
            .dp
            .try_run_with(name, frame, ifindex, RunOptions::default());
        let after = self.node.snapshot();
        self.totals.runs += 1;
        let moves: Vec<Move> = self
            .node
            .endpoints()
            .iter()
            .enumerate()
            .flat_map(|(i, &ep)| {
                let (b, a) = (fields(&before.stats[i]), fields(&after.stats[i]));
                (0..6)
                    .map(move |f| (ep, FIELDS[f], diff(&b[f], &a[f])))
                    .collect::<Vec<_>>()
            })
            .filter(|(_, _, d)| d.packets != 0 || d.bytes != 0)
            .collect();
        let drop_moves: Vec<(DropKey, Counter)> = after
            .drops
            .iter()
            .map(|(k, c)| {
                (
                    *k,
                    diff(&before.drops.get(k).copied().unwrap_or_default(), c),
                )
            })
            .filter(|(_, d)| d.packets != 0 || d.bytes != 0)
            .collect();
        let context = || {
            format!(
                "{name} on ifindex {ifindex} with {} bytes {frame:02x?}: counters {moves:?}, drops {drop_moves:?}",
                frame.len()
            )
        };

        let run = match result {
            Ok(run) => run,
            Err(e) => {
                // Refused before the program ran: nothing may have moved.
                if !moves.is_empty() || !drop_moves.is_empty() {
                    return Err(format!("refused ({e}) yet counted: {}", context()));
                }
                self.totals.refused += 1;
                return Ok(());
            }
        };
        // The only answer the programs build in place that can be longer than the question
        // is the neighbour advertisement (a solicitation without options is 8 bytes
        // shorter).
        let advertisement = run.verdict == TC_ACT_REDIRECT
            && run.frame.len() == NA_LEN
            && run.frame[12..14] == [0x86, 0xdd]
            && run.frame[ETH_HLEN + 40] == 136;
        if run.frame.len() > frame.len() && !advertisement {
            return Err(format!(
                "the frame grew to {} bytes: {}",
                run.frame.len(),
                context()
            ));
        }
        let one = Counter {
            packets: 1,
            bytes: frame.len() as u64,
        };
        if let Some(m) = moves.iter().find(|(_, _, d)| *d != one) {
            return Err(format!(
                "{m:?} moved by other than one frame: {}",
                context()
            ));
        }
        if let Some(d) = drop_moves.iter().find(|(_, d)| *d != one) {
            return Err(format!(
                "{d:?} moved by other than one frame: {}",
                context()
            ));
        }
        let counted = |ep: u32, field: &str| moves.iter().any(|m| m.0 == ep && m.1 == field);
        let has_stats = ifindex != self.node.x;
        let shape: Vec<(u32, &str)> = moves.iter().map(|m| (m.0, m.1)).collect();

        match (prog, run.verdict) {
            (Prog::ToPod, verdict) => {
                let taken_over = self.pending.take() == Some((ifindex, frame.len() as u32));
                match verdict {
                    TC_ACT_OK if taken_over => {
                        if !moves.is_empty() || !drop_moves.is_empty() {
                            return Err(format!("a redirected frame counted twice: {}", context()));
                        }
                        self.totals.taken_over += 1;
                    }
                    TC_ACT_OK => {
                        let expected: Vec<(u32, &str)> = if has_stats {
                            vec![(ifindex, "ingress.passed")]
                        } else {
                            vec![]
                        };
                        if shape != expected || !drop_moves.is_empty() {
                            return Err(format!("a pass miscounted: {}", context()));
                        }
                        self.totals.passed += 1;
                    }
                    TC_ACT_SHOT => {
                        self.check_drop(ifindex, DIR_INGRESS, &shape, &drop_moves, has_stats)
                            .map_err(|e| format!("{e}: {}", context()))?;
                        self.totals.dropped += 1;
                    }
                    other => return Err(format!("verdict {other}: {}", context())),
                }
            }
            (Prog::FromPod, TC_ACT_OK) => {
                let expected: Vec<(u32, &str)> = if has_stats {
                    vec![(ifindex, "egress.passed")]
                } else {
                    vec![]
                };
                if shape != expected || !drop_moves.is_empty() {
                    return Err(format!("a pass miscounted: {}", context()));
                }
                self.totals.passed += 1;
            }
            (Prog::FromPod, TC_ACT_REDIRECT) => {
                if !drop_moves.is_empty() {
                    return Err(format!("a redirect counted as a drop: {}", context()));
                }
                let answered = shape == [(ifindex, "egress.passed")]
                    && ((run.frame.len() == frame.len() && run.frame[12..14] == [0x08, 0x06])
                        || advertisement);
                let receivers: Vec<u32> = moves
                    .iter()
                    .filter(|m| m.1 == "ingress.redirected")
                    .map(|m| m.0)
                    .collect();
                let forwarded = receivers.len() == 1
                    && counted(ifindex, "egress.redirected")
                    && moves.len() == 2;
                if !answered && !forwarded {
                    return Err(format!("a redirect miscounted: {}", context()));
                }
                self.totals.redirected += 1;
                if forwarded && receivers[0] == self.node.c {
                    // `bpf_redirect` to C's egress runs C's `hypha_to_pod` next, on this
                    // CPU, with the forwarded frame: run it, as the kernel would.
                    self.pending = Some((self.node.c, frame.len() as u32));
                    let c = self.node.c;
                    self.check(Prog::ToPod, c, &run.frame)
                        .map_err(|e| format!("delivering the redirect to C: {e}"))?;
                }
            }
            (Prog::FromPod, TC_ACT_SHOT) => {
                // Charged to the sender, or to the receiver whose ingress policy refused.
                let charged = drop_moves.first().map(|(k, _)| (k.ifindex, k.direction));
                match charged {
                    Some((ep, DIR_INGRESS)) if ep != ifindex || shape.len() == 1 => self
                        .check_drop(ep, DIR_INGRESS, &shape, &drop_moves, true)
                        .map_err(|e| format!("{e}: {}", context()))?,
                    _ => self
                        .check_drop(ifindex, DIR_EGRESS, &shape, &drop_moves, has_stats)
                        .map_err(|e| format!("{e}: {}", context()))?,
                }
                self.totals.dropped += 1;
            }
            (Prog::FromPod, other) => return Err(format!("verdict {other}: {}", context())),
        }
        Ok(())
    }

    /// A drop is one `dropped` counter of `ep` in `direction` (when `ep` has counters) and
    /// one `hypha_drops` entry of the same endpoint and direction.
    fn check_drop(
        &self,
        ep: u32,
        direction: u8,
        shape: &[(u32, &str)],
        drop_moves: &[(DropKey, Counter)],
        has_stats: bool,
    ) -> Result<(), String> {
        let field = if direction == DIR_INGRESS {
            "ingress.dropped"
        } else {
            "egress.dropped"
        };
        let expected: Vec<(u32, &str)> = if has_stats { vec![(ep, field)] } else { vec![] };
        if shape != expected.as_slice() {
            return Err(format!("a drop moved {shape:?}, not {expected:?}"));
        }
        match drop_moves {
            [(key, _)] if key.ifindex == ep && key.direction == direction => Ok(()),
            other => Err(format!(
                "a drop of ifindex {ep} direction {direction} recorded as {other:?}"
            )),
        }
    }

    /// Every drop verdict is in `hypha_drops`, and nothing else is.
    fn check_totals(&self) {
        let recorded: u64 = self.node.dp.drops().iter().map(|(_, c)| c.packets).sum();
        assert_eq!(
            recorded, self.totals.dropped,
            "hypha_drops against the drop verdicts: {:?}",
            self.totals
        );
        let t = &self.totals;
        assert_eq!(
            t.runs,
            t.refused + t.passed + t.dropped + t.redirected + t.taken_over,
            "{t:?}"
        );
    }
}

/// A frame to run: random bytes, or a seed mutated.
#[derive(Clone, Debug)]
enum Input {
    Random(Vec<u8>),
    Mutated {
        seed: Index,
        /// (offset, value) written over the frame: header fields set to edge values.
        sets: Vec<(Index, u8)>,
        /// (offset, mask) XORed into the frame.
        flips: Vec<(Index, u8)>,
        /// Where to cut the frame, if anywhere.
        truncate: Option<Index>,
    },
}

/// Offsets of the header fields the programs decide on: EtherType, IPv4 version/IHL,
/// flags/fragment offset, TTL, protocol, addresses, ports, TCP flags; ARP's operation
/// and addresses fall among them.
const FIELD_OFFSETS: [usize; 16] = [
    12, 13, 14, 20, 21, 22, 23, 26, 29, 30, 33, 34, 36, 37, 41, 47,
];
const EDGE_VALUES: [u8; 12] = [
    0x00, 0x01, 0x02, 0x06, 0x08, 0x11, 0x45, 0x4f, 0x60, 0x86, 0xdd, 0xff,
];

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..160).prop_map(Input::Random),
        4 => (
            any::<Index>(),
            proptest::collection::vec(
                (any::<Index>(), any::<Index>()).prop_map(|(f, v)| (f, v)),
                0..4
            ),
            proptest::collection::vec((any::<Index>(), 1..=255u8), 0..4),
            proptest::option::of(any::<Index>()),
        )
            .prop_map(|(seed, fields, flips, truncate)| Input::Mutated {
                seed,
                sets: fields
                    .into_iter()
                    .map(|(f, v)| (f, EDGE_VALUES[v.index(EDGE_VALUES.len())]))
                    .collect(),
                flips,
                truncate,
            }),
    ]
}

impl Input {
    /// The frame, and the program and veth its seed names (`from_X_...`, `to_X_...`).
    fn build(&self, seeds: &[(String, Vec<u8>)]) -> (Vec<u8>, Option<(Prog, u8)>) {
        match self {
            Input::Random(bytes) => (bytes.clone(), None),
            Input::Mutated {
                seed,
                sets,
                flips,
                truncate,
            } => {
                let (name, frame) = &seeds[seed.index(seeds.len())];
                let mut frame = frame.clone();
                for (field, value) in sets {
                    let offset = FIELD_OFFSETS[field.index(FIELD_OFFSETS.len())];
                    if offset < frame.len() {
                        frame[offset] = *value;
                    }
                }
                for (at, mask) in flips {
                    let i = at.index(frame.len());
                    frame[i] ^= mask;
                }
                if let Some(at) = truncate {
                    frame.truncate(at.index(frame.len() + 1));
                }
                (frame, natural_target(name))
            }
        }
    }
}

/// The program and endpoint (0 = A, 1 = B, 2 = C) a seed's name gives.
fn natural_target(name: &str) -> Option<(Prog, u8)> {
    let (prog, rest) = if let Some(rest) = name.strip_prefix("from_") {
        (Prog::FromPod, rest)
    } else {
        (Prog::ToPod, name.strip_prefix("to_")?)
    };
    let which = match rest.as_bytes().first()? {
        b'a' => 0,
        b'b' => 1,
        b'c' => 2,
        _ => return None,
    };
    Some((prog, which))
}

#[test]
fn random_and_mutated_frames_get_designed_verdicts_and_consistent_counters() {
    hypha_tests::require_root!();
    pin_to_current_cpu();
    let cases = match std::env::var(CASES_ENV) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{CASES_ENV}={v:?} is not a number of cases: {e}")),
        Err(_) => DEFAULT_CASES,
    };
    let seeds = corpus();
    let checker = RefCell::new(Checker::new());
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (input(), any::<bool>(), any::<bool>(), 0..4u8);
    let start = Instant::now();
    let result = runner.run(&strategy, |(input, natural, to_pod, which)| {
        let (frame, target) = input.build(&seeds);
        let (prog, which) = match target {
            Some(t) if natural => t,
            _ => (if to_pod { Prog::ToPod } else { Prog::FromPod }, which),
        };
        let mut c = checker.borrow_mut();
        let ifindex = c.ifindex(which);
        c.check(prog, ifindex, &frame)
            .map_err(TestCaseError::fail)?;
        if c.totals.runs.is_multiple_of(500) {
            // Keep the ring buffer from filling; its content is not checked here.
            c.node.dp.events();
        }
        Ok(())
    });
    let elapsed = start.elapsed();
    let checker = checker.into_inner();
    if let Err(e) = result {
        panic!("{e}\nafter {:?}", checker.totals);
    }
    checker.check_totals();
    eprintln!(
        "ebpf fuzz: {cases} cases, {} program runs in {elapsed:.2?} ({:?})",
        checker.totals.runs, checker.totals
    );
}

#[test]
fn every_seed_truncated_at_every_length_is_handled_by_both_programs() {
    hypha_tests::require_root!();
    pin_to_current_cpu();
    let mut checker = Checker::new();
    let seeds = corpus();
    for (name, frame) in &seeds {
        let natural = natural_target(name).unwrap_or((Prog::FromPod, 0));
        let other = match natural.0 {
            Prog::FromPod => Prog::ToPod,
            Prog::ToPod => Prog::FromPod,
        };
        for len in 0..=frame.len() {
            for (prog, which) in [natural, (other, natural.1), (natural.0, 3)] {
                let ifindex = checker.ifindex(which);
                if let Err(e) = checker.check(prog, ifindex, &frame[..len]) {
                    panic!("seed {name} cut at {len}: {e}");
                }
            }
        }
        checker.node.dp.events();
    }
    checker.check_totals();
    assert!(
        checker.totals.passed > 0 && checker.totals.dropped > 0 && checker.totals.redirected > 0,
        "the corpus exercises every verdict: {:?}",
        checker.totals
    );
    eprintln!("ebpf truncation sweep: {:?}", checker.totals);
}
