//! Resource limits and rates as the command line gives them, parsed into plain numbers.
//!
//! Pure functions, unit-tested: `--memory 64M`, `--cpus 0.5`, `--pids 100`,
//! `--egress-rate 10mbit`.

/// A value the command line gave that is not what the flag takes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {flag} value {value:?}: {reason}")]
pub struct LimitError {
    pub flag: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn bad(flag: &'static str, value: &str, reason: &'static str) -> LimitError {
    LimitError {
        flag,
        value: value.to_owned(),
        reason,
    }
}

/// The limits a container's cgroup enforces; `None` leaves a resource unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Bytes of memory (no swap on top of it).
    pub memory: Option<u64>,
    /// CPU bandwidth as a CFS quota per [`CPU_PERIOD_US`], in microseconds.
    pub cpu_quota_us: Option<u64>,
    /// Most processes (and threads) at once.
    pub pids: Option<u64>,
}

/// The CFS period the CPU quota is expressed in (100 ms, as Docker and runc use).
pub const CPU_PERIOD_US: u64 = 100_000;

/// `--memory`: a byte count with an optional binary suffix `k`, `m`, `g` (`b` allowed after
/// it, any case): `64M` is 64 MiB. At least 4 MiB, as smaller limits leave no room for the
/// container's init.
pub fn parse_memory(value: &str) -> Result<u64, LimitError> {
    const FLAG: &str = "--memory";
    let bytes = parse_bytes(FLAG, value)?;
    if bytes < 4 << 20 {
        return Err(bad(FLAG, value, "must be at least 4M"));
    }
    Ok(bytes)
}

/// A byte count for `flag` with an optional binary suffix `k`, `m`, `g`, `t` (`b` allowed
/// after it, any case): `100M` is 100 MiB.
pub fn parse_bytes(flag: &'static str, value: &str) -> Result<u64, LimitError> {
    const EXPECTED: &str = "expected a number with an optional k, m, g or t suffix";
    let s = value.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (digits, shift) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 10),
        Some('m') => (&s[..s.len() - 1], 20),
        Some('g') => (&s[..s.len() - 1], 30),
        Some('t') => (&s[..s.len() - 1], 40),
        Some(c) if c.is_ascii_digit() => (s, 0),
        _ => return Err(bad(flag, value, EXPECTED)),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(flag, value, EXPECTED));
    }
    let n: u64 = digits.parse().map_err(|_| bad(flag, value, "too large"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| bad(flag, value, "too large"))
}

/// `--cpus`: a positive decimal number of CPUs (`0.5`, `2`), as a CFS quota in
/// microseconds per [`CPU_PERIOD_US`]. At least 0.01 CPU (the kernel's 1 ms minimum quota).
pub fn parse_cpus(value: &str) -> Result<u64, LimitError> {
    const FLAG: &str = "--cpus";
    let s = value.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad(
            FLAG,
            value,
            "expected a positive decimal number such as 0.5",
        ));
    }
    let cpus: f64 = s.parse().map_err(|_| {
        bad(
            FLAG,
            value,
            "expected a positive decimal number such as 0.5",
        )
    })?;
    if !(0.01..=1024.0).contains(&cpus) {
        return Err(bad(FLAG, value, "must be between 0.01 and 1024"));
    }
    Ok((cpus * CPU_PERIOD_US as f64).round() as u64)
}

/// `--pids`: the most processes at once, at least 2 (the container's init and its command).
pub fn parse_pids(value: &str) -> Result<u64, LimitError> {
    const FLAG: &str = "--pids";
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| bad(FLAG, value, "expected a whole number"))?;
    if n < 2 {
        return Err(bad(
            FLAG,
            value,
            "must be at least 2 (init and the command)",
        ));
    }
    Ok(n)
}

/// `--egress-rate`/`--ingress-rate`: bits per second with an optional decimal suffix `k`,
/// `m`, `g` and an optional `bit`/`bps` unit (`10mbit`, `1G`, `500kbps`), as the bandwidth
/// plugin's `runtimeConfig.bandwidth` takes it.
pub fn parse_rate(flag: &'static str, value: &str) -> Result<u64, LimitError> {
    let s = value.trim().to_ascii_lowercase();
    let s = s
        .strip_suffix("bit")
        .or_else(|| s.strip_suffix("bps"))
        .unwrap_or(&s);
    let (digits, mult) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1_000),
        Some('m') => (&s[..s.len() - 1], 1_000_000),
        Some('g') => (&s[..s.len() - 1], 1_000_000_000),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(flag, value, "expected bits per second such as 10mbit"));
    }
    let n: u64 = digits.parse().map_err(|_| bad(flag, value, "too large"))?;
    let rate = n
        .checked_mul(mult)
        .ok_or_else(|| bad(flag, value, "too large"))?;
    if rate < 1_000 {
        return Err(bad(flag, value, "must be at least 1kbit"));
    }
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory() {
        assert_eq!(parse_memory("64M"), Ok(64 << 20));
        assert_eq!(parse_memory("64mb"), Ok(64 << 20));
        assert_eq!(parse_memory("1g"), Ok(1 << 30));
        assert_eq!(parse_memory("8192k"), Ok(8 << 20));
        assert_eq!(parse_memory("16777216"), Ok(16 << 20));
        for bad in ["", "M", "-5M", "1.5G", "64X", "3M", "99999999999999999999G"] {
            let e = parse_memory(bad).unwrap_err();
            assert_eq!(e.flag, "--memory", "{bad}");
        }
        assert!(
            parse_memory("abc")
                .unwrap_err()
                .to_string()
                .contains("\"abc\"")
        );
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("0.5"), Ok(50_000));
        assert_eq!(parse_cpus("2"), Ok(200_000));
        assert_eq!(parse_cpus("0.01"), Ok(1_000));
        for bad in ["", "0", "-1", "abc", "0.001", "1e3", "nan", "inf"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pids() {
        assert_eq!(parse_pids("20"), Ok(20));
        for bad in ["", "1", "-3", "x", "2.5"] {
            assert!(parse_pids(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates() {
        let r = |v| parse_rate("--egress-rate", v);
        assert_eq!(r("10mbit"), Ok(10_000_000));
        assert_eq!(r("1G"), Ok(1_000_000_000));
        assert_eq!(r("500kbps"), Ok(500_000));
        assert_eq!(r("123456"), Ok(123_456));
        for bad in ["", "mbit", "10x", "1.5m", "5", "-1m"] {
            assert!(r(bad).is_err(), "{bad}");
        }
    }
}
