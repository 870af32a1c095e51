//! Bounds checked before a policy file is parsed, so that no input (a file in the watched
//! directory, a body posted to the API) costs more than a bounded time and memory.
//!
//! - Size: at most [`MAX_FILE_BYTES`].
//! - Nesting: at most [`MAX_DEPTH`] levels of sequences and mappings. libyaml's scanner
//!   checks every open flow level on every token, so a 200 KB `[[[[...` of 100,000 levels
//!   costs minutes before any deserializer's recursion limit is reached; the check here
//!   stops at the first level too deep.
//! - Aliases: at most [`MAX_NODES`] nodes once every alias is expanded (a "billion
//!   laughs" of nested anchors stays a few hundred bytes on disk and would be walked by
//!   the deserializer once per reference), and no alias to a node that is still open.
//!
//! YAML is checked by pulling libyaml's events one at a time (the same libyaml, through
//! `unsafe-libyaml`, that `serde_yaml_ng` parses with, so the depth seen here is exactly
//! the depth the deserializer would see) and stopping at the first violation: its
//! scanner never holds more than the levels open so far plus its 1024-character
//! look-ahead. JSON is checked by a scan of its brackets outside strings.

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::mem::MaybeUninit;

use super::PolicyError;

/// The largest policy file accepted, in bytes (4 MiB).
pub const MAX_FILE_BYTES: usize = 4 << 20;
/// The deepest nesting of sequences and mappings accepted. A NetworkPolicy needs about
/// ten levels; `kubectl get -o yaml`'s managedFields about twenty.
pub const MAX_DEPTH: usize = 64;
/// The most nodes (scalars, sequences, mappings) a file may have once every alias is
/// expanded.
pub const MAX_NODES: u64 = 1_000_000;

/// Whether `content` is read as JSON (and not YAML): it starts with `{` or `[`. Also read
/// by the service parser.
pub(crate) fn is_json(content: &str) -> bool {
    let trimmed = content.trim_start();
    trimmed.starts_with('{') || trimmed.starts_with('[')
}

/// Checks `content` against the limits; the error names the file, the limit and the line.
pub fn check(source: &str, content: &str) -> Result<(), PolicyError> {
    let invalid = |message: String| PolicyError::Invalid {
        source_name: source.to_owned(),
        message,
    };
    if content.len() > MAX_FILE_BYTES {
        return Err(invalid(too_big(content.len() as u64)));
    }
    if is_json(content) {
        json_depth(content).map_err(invalid)
    } else {
        yaml_events(content.as_bytes()).map_err(invalid)
    }
}

/// The message for a file of `len` bytes over [`MAX_FILE_BYTES`].
pub fn too_big(len: u64) -> String {
    format!(
        "the file is {len} bytes; a policy file may have at most {MAX_FILE_BYTES} bytes (4 MiB): \
         split it into several files"
    )
}

fn too_deep(line: usize) -> String {
    format!(
        "line {line}: nesting deeper than {MAX_DEPTH} levels (the limit for a policy file); \
         nothing was parsed"
    )
}

fn json_depth(content: &str) -> Result<(), String> {
    let mut depth = 0usize;
    let mut line = 1usize;
    let mut in_string = false;
    let mut escaped = false;
    for b in content.bytes() {
        if b == b'\n' {
            line += 1;
        }
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(too_deep(line));
                }
            }
            // Unbalanced closers are serde_json's to report.
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Pulls every event of every document, tracking depth, anchors and expanded size.
fn yaml_events(input: &[u8]) -> Result<(), String> {
    let mut parser = Parser::new(input);
    let mut depth = 0usize;
    // Expanded size of each anchor of the current document.
    let mut anchors: HashMap<Vec<u8>, u64> = HashMap::new();
    // Open collections: their anchor and the expanded count when they started.
    let mut open: Vec<(Option<Vec<u8>>, u64)> = Vec::new();
    let mut open_anchors: HashSet<Vec<u8>> = HashSet::new();
    let mut nodes: u64 = 0;
    let too_many = |line: usize| {
        format!(
            "line {line}: more than {MAX_NODES} nodes once aliases are expanded (the limit for a \
             policy file; an anchor referenced over and over multiplies its size)"
        )
    };
    loop {
        let event = parser.next()?;
        match event.kind {
            EventKind::StreamEnd => return Ok(()),
            EventKind::DocumentStart => {
                anchors.clear();
                open.clear();
                open_anchors.clear();
                depth = 0;
            }
            EventKind::Scalar => {
                nodes += 1;
                if let Some(a) = event.anchor {
                    anchors.insert(a, 1);
                }
            }
            EventKind::CollectionStart => {
                nodes += 1;
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(too_deep(event.line));
                }
                if let Some(a) = &event.anchor {
                    open_anchors.insert(a.clone());
                }
                open.push((event.anchor, nodes - 1));
            }
            EventKind::CollectionEnd => {
                depth = depth.saturating_sub(1);
                if let Some((Some(a), start)) = open.pop() {
                    open_anchors.remove(&a);
                    anchors.insert(a, nodes - start);
                }
            }
            EventKind::Alias => {
                let name = event.anchor.unwrap_or_default();
                if open_anchors.contains(&name) {
                    return Err(format!(
                        "line {}: alias *{} refers to a node that contains it (a recursive \
                         alias)",
                        event.line,
                        String::from_utf8_lossy(&name)
                    ));
                }
                // An unknown anchor is the deserializer's to report.
                nodes += anchors.get(&name).copied().unwrap_or(1);
            }
            EventKind::Other => {}
        }
        if nodes > MAX_NODES {
            return Err(too_many(event.line));
        }
    }
}

enum EventKind {
    StreamEnd,
    DocumentStart,
    Scalar,
    CollectionStart,
    CollectionEnd,
    Alias,
    Other,
}

/// What this module reads of a libyaml event, copied out before the event is freed.
struct Event {
    kind: EventKind,
    /// 1-based.
    line: usize,
    anchor: Option<Vec<u8>>,
}

/// A libyaml parser over a borrowed input, freed on drop.
struct Parser<'input> {
    // Boxed: libyaml's structures are used in place, never moved once initialized.
    raw: Box<MaybeUninit<unsafe_libyaml::yaml_parser_t>>,
    _input: std::marker::PhantomData<&'input [u8]>,
}

impl<'input> Parser<'input> {
    fn new(input: &'input [u8]) -> Self {
        let mut raw = Box::new(MaybeUninit::<unsafe_libyaml::yaml_parser_t>::uninit());
        let p = raw.as_mut_ptr();
        // SAFETY: `p` points to memory for a parser that `yaml_parser_initialize` fills
        // (it zeroes it first); it fails only when its first buffers cannot be allocated,
        // which aborts in unsafe-libyaml's allocator. The input outlives the parser
        // (`'input`), as `yaml_parser_set_input_string` requires.
        unsafe {
            if unsafe_libyaml::yaml_parser_initialize(p).fail {
                panic!("libyaml cannot allocate a parser");
            }
            unsafe_libyaml::yaml_parser_set_input_string(p, input.as_ptr(), input.len() as u64);
        }
        Self {
            raw,
            _input: std::marker::PhantomData,
        }
    }

    fn next(&mut self) -> Result<Event, String> {
        let p = self.raw.as_mut_ptr();
        let mut event = MaybeUninit::<unsafe_libyaml::yaml_event_t>::uninit();
        // SAFETY: the parser was initialized in `new` and is not moved (boxed). On
        // success `event` is initialized; everything read from it (its type, its mark, and
        // the anchor, a NUL-terminated string owned by the event, for the event types that
        // have one) is copied out before `yaml_event_delete` frees it. On failure the
        // parser's `problem` is a static C string or null.
        unsafe {
            if unsafe_libyaml::yaml_parser_parse(p, event.as_mut_ptr()).fail {
                // The error fields are public through the parser's prefix.
                let parser: &unsafe_libyaml::yaml_parser_t = &*p;
                let problem = parser.problem;
                let mark = parser.problem_mark;
                let what = if problem.is_null() {
                    "invalid YAML".to_owned()
                } else {
                    CStr::from_ptr(problem).to_string_lossy().into_owned()
                };
                return Err(format!("line {}: {what}", mark.line + 1));
            }
            let ev = event.as_mut_ptr();
            let anchor_ptr = match (*ev).type_ {
                unsafe_libyaml::YAML_ALIAS_EVENT => (*ev).data.alias.anchor,
                unsafe_libyaml::YAML_SCALAR_EVENT => (*ev).data.scalar.anchor,
                unsafe_libyaml::YAML_SEQUENCE_START_EVENT => (*ev).data.sequence_start.anchor,
                unsafe_libyaml::YAML_MAPPING_START_EVENT => (*ev).data.mapping_start.anchor,
                _ => std::ptr::null_mut(),
            };
            let anchor = (!anchor_ptr.is_null())
                .then(|| CStr::from_ptr(anchor_ptr.cast()).to_bytes().to_vec());
            let kind = match (*ev).type_ {
                unsafe_libyaml::YAML_STREAM_END_EVENT => EventKind::StreamEnd,
                unsafe_libyaml::YAML_DOCUMENT_START_EVENT => EventKind::DocumentStart,
                unsafe_libyaml::YAML_SCALAR_EVENT => EventKind::Scalar,
                unsafe_libyaml::YAML_SEQUENCE_START_EVENT
                | unsafe_libyaml::YAML_MAPPING_START_EVENT => EventKind::CollectionStart,
                unsafe_libyaml::YAML_SEQUENCE_END_EVENT
                | unsafe_libyaml::YAML_MAPPING_END_EVENT => EventKind::CollectionEnd,
                unsafe_libyaml::YAML_ALIAS_EVENT => EventKind::Alias,
                _ => EventKind::Other,
            };
            let line = (*ev).start_mark.line as usize + 1;
            unsafe_libyaml::yaml_event_delete(ev);
            Ok(Event { kind, line, anchor })
        }
    }
}

impl Drop for Parser<'_> {
    fn drop(&mut self) {
        // SAFETY: initialized in `new`, deleted once here.
        unsafe { unsafe_libyaml::yaml_parser_delete(self.raw.as_mut_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn err(content: &str) -> String {
        check("f.yaml", content).unwrap_err().to_string()
    }

    /// Runs `f`, asserting it took less than `limit`.
    fn quick<T>(limit: Duration, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        assert!(start.elapsed() < limit, "took {:?}", start.elapsed());
        out
    }

    #[test]
    fn deep_flow_nesting_is_refused_at_once_with_the_line() {
        // 100,000 levels: minutes of libyaml time before the deserializer's own limit.
        let bomb = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nspec: {}",
            "[".repeat(100_000)
        );
        let msg = quick(Duration::from_secs(1), || err(&bomb));
        assert!(
            msg.starts_with("f.yaml: line 3: nesting deeper than 64 levels"),
            "{msg}"
        );
        let json = format!("{{\"spec\":\n{}", "[".repeat(100_000));
        let msg = quick(Duration::from_secs(1), || err(&json));
        assert!(msg.contains("line 2: nesting deeper than 64"), "{msg}");
    }

    #[test]
    fn deep_block_nesting_is_refused() {
        let bomb = format!("spec:\n{}x\n", "- ".repeat(10_000));
        let msg = quick(Duration::from_secs(1), || err(&bomb));
        assert!(msg.contains("line 2: nesting deeper than 64"), "{msg}");
        let mut indented = String::new();
        for i in 0..70 {
            indented.push_str(&" ".repeat(i));
            indented.push_str("k:\n");
        }
        assert!(err(&indented).contains("nesting deeper than 64"));
    }

    #[test]
    fn nesting_up_to_the_limit_and_brackets_in_strings_pass() {
        let ok = format!("a: {}{}\n", "[".repeat(63), "]".repeat(63));
        check("f.yaml", &ok).unwrap();
        // Brackets inside quoted scalars, comments and block scalars are text.
        let text = format!(
            "a: \"{0}\"\nb: '{0}'\n# {0}\nc: |\n  {0}\n",
            "[".repeat(1000)
        );
        check("f.yaml", &text).unwrap();
        check(
            "f.json",
            &format!("{{\"a\": \"{}\\\"\"}}", "[".repeat(1000)),
        )
        .unwrap();
    }

    #[test]
    fn billion_laughs_is_refused() {
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            doc.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let msg = quick(Duration::from_secs(1), || err(&doc));
        assert!(
            msg.contains("more than 1000000 nodes once aliases"),
            "{msg}"
        );
        // A few aliases of a small anchor are fine.
        check("f.yaml", "a: &s {app: web}\nb: *s\nc: *s\n").unwrap();
    }

    #[test]
    fn a_recursive_alias_is_refused() {
        let msg = err("a: &x [1, *x]\n");
        assert!(
            msg.contains("alias *x refers to a node that contains it"),
            "{msg}"
        );
    }

    #[test]
    fn a_file_over_the_size_limit_is_refused_without_parsing() {
        let big = "#".repeat(MAX_FILE_BYTES + 1);
        let msg = quick(Duration::from_secs(1), || err(&big));
        assert!(msg.contains("at most 4194304 bytes (4 MiB)"), "{msg}");
    }

    #[test]
    fn syntax_errors_carry_the_line() {
        let msg = err("a: 1\nb: [\n");
        assert!(msg.starts_with("f.yaml: line "), "{msg}");
    }
}

#[cfg(test)]
mod through_the_parser {
    use std::time::{Duration, Instant};

    use super::super::parse_file;

    /// The bounds hold for the parser's entry point, not only for `check`.
    #[test]
    fn parse_file_refuses_a_nesting_bomb_at_once() {
        let bomb = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: x}}\nspec: {}",
            "[".repeat(20_000)
        );
        let start = Instant::now();
        let msg = parse_file("bomb.yaml", &bomb).unwrap_err().to_string();
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "took {:?}",
            start.elapsed()
        );
        assert!(
            msg.starts_with("bomb.yaml: line 4: nesting deeper than 64 levels"),
            "{msg}"
        );
    }
}
