//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016, section 3.4): a lookup table of a prime number of
//! slots, each naming a backend, so that a flow's hash picks a slot and a backend added or
//! removed moves few flows.
//!
//! Each backend gets a preference list, a permutation of the slots given by an `offset`
//! and a `skip` from two independent hashes of its name; the backends take turns
//! claiming their next preferred free slot until every slot is taken. Every node must
//! compute the same table from the same backends, so the hashes are SHA-256 of the name
//! (stable across processes, versions and machines), not std's randomly keyed hasher.

use sha2::{Digest, Sha256};

/// The Maglev lookup table of `size` slots (a prime: the skips must be coprime with it)
/// over backends named by `names` (stable strings, e.g. `addr:port`): each slot holds an
/// index into `names`. Empty `names` (or `size` 0): an empty table.
pub fn maglev(names: &[String], size: usize) -> Vec<u32> {
    if names.is_empty() || size == 0 {
        return Vec::new();
    }
    debug_assert!(is_prime(size), "Maglev table size {size} is not a prime");
    let m = size as u64;
    // (offset, skip) per backend.
    let prefs: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let (h1, h2) = hashes(name);
            let skip = if m > 1 { h2 % (m - 1) + 1 } else { 1 };
            (h1 % m, skip)
        })
        .collect();
    const FREE: u32 = u32::MAX;
    let mut table = vec![FREE; size];
    // How far each backend is along its preference list.
    let mut next = vec![0u64; names.len()];
    let mut filled = 0usize;
    'fill: loop {
        let mut progressed = false;
        for (i, &(offset, skip)) in prefs.iter().enumerate() {
            // A backend's list has `size` entries; with a prime size it visits every
            // slot, so it finds a free one before running out.
            while next[i] < m {
                let slot = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[slot] == FREE {
                    table[slot] = i as u32;
                    filled += 1;
                    progressed = true;
                    break;
                }
            }
            if filled == size {
                break 'fill;
            }
        }
        if !progressed {
            // Only with a size that is not a prime: fill what no list reached in turn.
            for (k, slot) in table.iter_mut().filter(|s| **s == FREE).enumerate() {
                *slot = (k % names.len()) as u32;
            }
            break;
        }
    }
    table
}

/// Two independent 64-bit hashes of `name`: the first two words of its SHA-256.
fn hashes(name: &str) -> (u64, u64) {
    let digest = Sha256::digest(name.as_bytes());
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&digest[i * 8..i * 8 + 8]);
        u64::from_be_bytes(b)
    };
    (word(0), word(1))
}

fn is_prime(n: usize) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

#[cfg(test)]
mod tests {
    use hypha_common::lb::LB_MAGLEV_SIZE;

    use super::*;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("10.0.0.{i}:8080")).collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut count = vec![0; n];
        for &b in table {
            count[b as usize] += 1;
        }
        count
    }

    /// Slots whose backend (by name) differs between two tables.
    fn moved(a: &[u32], a_names: &[String], b: &[u32], b_names: &[String]) -> usize {
        a.iter()
            .zip(b)
            .filter(|(x, y)| a_names[**x as usize] != b_names[**y as usize])
            .count()
    }

    #[test]
    fn three_backends_share_the_slots_evenly() {
        let n = names(3);
        let table = maglev(&n, LB_MAGLEV_SIZE);
        assert_eq!(table.len(), LB_MAGLEV_SIZE);
        for (i, s) in shares(&table, 3).iter().enumerate() {
            assert!(
                s.abs_diff(LB_MAGLEV_SIZE / 3) <= 2,
                "backend {i} has {s} slots"
            );
        }
    }

    #[test]
    fn the_table_is_deterministic_and_fixed_across_versions() {
        let n = names(3);
        assert_eq!(maglev(&n, LB_MAGLEV_SIZE), maglev(&n, LB_MAGLEV_SIZE));
        // Pinned: every node, whatever its build, must compute this same table.
        let table = maglev(&n, 7);
        assert_eq!(table, maglev(&n, 7));
        let (h1, h2) = hashes("10.0.0.1:8080");
        let digest = Sha256::digest(b"10.0.0.1:8080");
        assert_eq!(h1.to_be_bytes(), digest[..8]);
        assert_eq!(h2.to_be_bytes(), digest[8..16]);
        assert_eq!(
            hashes(""),
            (0xe3b0_c442_98fc_1c14, 0x9afb_f4c8_996f_b924),
            "SHA-256 of the empty string"
        );
    }

    #[test]
    fn removing_one_backend_moves_little_else() {
        let three = names(3);
        let before = maglev(&three, LB_MAGLEV_SIZE);
        let two = vec![three[0].clone(), three[2].clone()];
        let after = maglev(&two, LB_MAGLEV_SIZE);
        let removed_slots = before.iter().filter(|b| **b == 1).count();
        let moved = moved(&before, &three, &after, &two);
        // The removed backend's slots must move; of the others', at most a few %.
        let others_moved = moved - removed_slots;
        assert!(
            others_moved * 100 <= LB_MAGLEV_SIZE * 3,
            "{others_moved} of the remaining backends' slots moved"
        );
        // Every slot of a kept backend that moved went to the other kept backend.
        assert!(after.iter().all(|b| (*b as usize) < 2));
    }

    #[test]
    fn adding_a_fourth_backend_moves_about_a_quarter() {
        let three = names(3);
        let four = names(4);
        let before = maglev(&three, LB_MAGLEV_SIZE);
        let after = maglev(&four, LB_MAGLEV_SIZE);
        let moved = moved(&before, &three, &after, &four);
        let quarter = LB_MAGLEV_SIZE / 4;
        assert!(
            moved >= quarter - 10 && moved <= quarter + quarter / 5,
            "{moved} slots moved (a quarter is {quarter})"
        );
        let taken_by_new = after.iter().filter(|b| **b == 3).count();
        assert!(taken_by_new.abs_diff(quarter) <= 3, "{taken_by_new}");
    }

    #[test]
    fn edge_sizes() {
        assert!(maglev(&[], LB_MAGLEV_SIZE).is_empty());
        assert!(maglev(&names(3), 0).is_empty());
        let one = maglev(&names(1), LB_MAGLEV_SIZE);
        assert!(one.len() == LB_MAGLEV_SIZE && one.iter().all(|b| *b == 0));
        let hundred = maglev(&names(100), LB_MAGLEV_SIZE);
        let s = shares(&hundred, 100);
        assert!(
            s.iter().all(|c| (9..=12).contains(c)),
            "100 backends over 1021 slots: {s:?}"
        );
    }

    #[test]
    fn random_flows_spread_over_three_backends() {
        let table = maglev(&names(3), LB_MAGLEV_SIZE);
        let mut count = [0usize; 3];
        // xorshift64*: a fixed sequence of flow hashes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..1000 {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let hash = x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32;
            count[table[(hash % LB_MAGLEV_SIZE as u64) as usize] as usize] += 1;
        }
        for c in count {
            assert!((283..=383).contains(&c), "{count:?}");
        }
    }

    #[test]
    fn ten_thousand_tables_are_quick() {
        let n = names(3);
        let start = std::time::Instant::now();
        for i in 0..1000 {
            let mut n = n.clone();
            n[0] = format!("10.1.{}.{}:80", i / 256, i % 256);
            assert_eq!(maglev(&n, LB_MAGLEV_SIZE).len(), LB_MAGLEV_SIZE);
        }
        // A loose bound (debug build): 10,000 would take ten times this.
        assert!(start.elapsed().as_secs_f64() < 2.0, "{:?}", start.elapsed());
    }
}
