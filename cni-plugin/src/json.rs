//! Looking keys up the way Go's `encoding/json` matches them (pure).
//!
//! Runtimes written in Go build this plugin's stdin with `encoding/json`: on input it
//! matches an object's keys to a struct's fields case-insensitively, preferring an exact
//! match, and on output it writes an untagged struct's fields with their Go names. go-cni's
//! `BandWidth` is such a struct, so containerd sends `{"IngressRate": ..}` where the CNI
//! conventions say `ingressRate`, and the reference plugins, being Go, accept both. Every
//! key this plugin reads from the network configuration, `runtimeConfig`, `args` and
//! `prevResult` goes through [`lookup`] so that it accepts what they accept.

use serde_json::{Map, Value};

/// Two or more keys of one object match a key when case is ignored, and none matches it
/// exactly: Go would keep whichever comes last in the document, which a JSON object (here
/// or in the runtime that wrote it) does not reliably keep, so it is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ambiguous {
    /// The keys found, in the object's order.
    pub keys: Vec<String>,
}

impl std::fmt::Display for Ambiguous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "is given more than once with different letter case ({})",
            self.keys.join(", ")
        )
    }
}

/// The value of `key` in `obj`: the exact key if present, else the one key equal to it
/// when case is ignored (Unicode simple case folding, as Go's `bytes.EqualFold`).
pub fn lookup<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a Value>, Ambiguous> {
    if let Some(v) = obj.get(key) {
        return Ok(Some(v));
    }
    let mut found = obj.iter().filter(|(k, _)| fold_eq(k, key));
    let Some((_, first)) = found.next() else {
        return Ok(None);
    };
    let rest: Vec<&String> = found.map(|(k, _)| k).collect();
    if rest.is_empty() {
        return Ok(Some(first));
    }
    Err(Ambiguous {
        keys: obj
            .keys()
            .filter(|k| fold_eq(k, key))
            .map(String::clone)
            .collect(),
    })
}

/// [`lookup`] in `v` if it is an object; `None` for anything else. For readers of results
/// that already treat a missing key as an error of their own.
pub fn get<'a>(v: &'a Value, key: &str) -> Result<Option<&'a Value>, Ambiguous> {
    match v {
        Value::Object(obj) => lookup(obj, key),
        _ => Ok(None),
    }
}

/// Removes `key` from `obj` under every letter case (to replace it in a copy without
/// leaving a differently-cased twin behind for a Go reader to prefer).
pub fn remove_all(obj: &mut Map<String, Value>, key: &str) {
    obj.retain(|k, _| !fold_eq(k, key));
}

/// Case-insensitive equality as Go's `bytes.EqualFold`: each character compared through its
/// simple case folding (`ſ` equals `s` and the Kelvin sign equals `k`, as in Go).
pub fn fold_eq(a: &str, b: &str) -> bool {
    if a.len() == b.len() && a.eq_ignore_ascii_case(b) {
        return true;
    }
    let mut a = a.chars().map(fold);
    let mut b = b.chars().map(fold);
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

/// One character's fold: its lowercase of its uppercase when both are single characters
/// (which maps every member of a simple folding orbit such as s/S/ſ to one of them).
fn fold(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_lowercase();
    }
    let mut upper = c.to_uppercase();
    let u = match (upper.next(), upper.next()) {
        (Some(u), None) => u,
        _ => return c,
    };
    let mut lower = u.to_lowercase();
    match (lower.next(), lower.next()) {
        (Some(l), None) => l,
        _ => c,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => unreachable!(),
        }
    }

    #[test]
    fn exact_first_then_any_case() {
        let o = obj(json!({"ingressRate": 1, "EgressRate": 2, "egressburst": 3}));
        assert_eq!(lookup(&o, "ingressRate"), Ok(Some(&json!(1))));
        assert_eq!(lookup(&o, "egressRate"), Ok(Some(&json!(2))));
        assert_eq!(lookup(&o, "egressBurst"), Ok(Some(&json!(3))));
        assert_eq!(lookup(&o, "ingressBurst"), Ok(None));
        // An exact key wins over a differently-cased one.
        let o = obj(json!({"mac": "a", "MAC": "b"}));
        assert_eq!(lookup(&o, "mac"), Ok(Some(&json!("a"))));
        assert_eq!(lookup(&o, "MAC"), Ok(Some(&json!("b"))));
    }

    #[test]
    fn two_cased_twins_without_the_exact_key_are_refused() {
        let o = obj(json!({"MAC": "b", "Mac": "c"}));
        let e = lookup(&o, "mac").unwrap_err();
        assert_eq!(e.keys, vec!["MAC".to_owned(), "Mac".to_owned()]);
        assert!(e.to_string().contains("MAC, Mac"), "{e}");
    }

    #[test]
    fn folding_is_gos() {
        assert!(fold_eq("cniVersion", "CNIVERSION"));
        assert!(fold_eq("disable\u{17f}", "disableS"), "long s folds to s");
        assert!(fold_eq("\u{212a}ey", "key"), "the Kelvin sign folds to k");
        assert!(!fold_eq("mac", "macs"));
        assert!(!fold_eq("ips", "ip"));
        assert!(!fold_eq("a_b", "ab"));
    }

    #[test]
    fn get_is_none_on_non_objects_and_remove_all_takes_every_case() {
        assert_eq!(get(&json!([1]), "ips"), Ok(None));
        let mut o = obj(json!({"cniVersion": 1, "CNIVersion": 2, "name": 3}));
        remove_all(&mut o, "cniversion");
        assert_eq!(Value::Object(o), json!({"name": 3}));
    }
}
