//! The value types a policy is made of: durations, sizes, rates, IP
//! networks and the circuit-breaker settings, with their text parsers.
//!
//! A leaf: it imports nothing of this crate, so `policy` (which validates
//! the YAML into these) and the guards (which enforce them) both depend on
//! it and not on each other.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use ipnet::IpNet;

/// A token-bucket rate: `count` cells per `per`, with a burst capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
    pub burst: NonZeroU32,
}

impl Rate {
    /// The time to replenish one cell.
    pub fn period(&self) -> Duration {
        self.per / self.count.get()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    pub consecutive_failures: u32,
    pub open_for: Duration,
    pub max_open_for: Duration,
    pub half_open_probes: u32,
    /// Keep the state in `limits.shared`'s Redis, for every replica.
    pub shared: bool,
}

/// An IP network, for `trusted_proxies`: `ADDR/PREFIX` or a bare address
/// (a network of one), parsed and matched by `ipnet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl Cidr {
    /// The address is read by `std` and the prefix length by `IpNet::new`,
    /// not by `IpNet`'s own parser: that one takes leading zeros
    /// (`010.0.0.0/8` as 10.0.0.0/8), which other tools read as octal; a
    /// trusted-proxy list must mean one thing.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let bad = || {
            format!(
                "`{s}` is not an IP address or CIDR (ADDR/PREFIX, the prefix length at most 32 for IPv4, 128 for IPv6)"
            )
        };
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| bad())?;
        let net = match prefix {
            None => IpNet::from(addr),
            Some(p) => {
                let len = p
                    .parse::<u8>()
                    .ok()
                    .filter(|_| p.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(bad)?;
                IpNet::new(addr, len).map_err(|_| bad())?
            }
        };
        Ok(Cidr(net))
    }

    /// The prefix length (0 matches every address of its family).
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&canonical_ip(ip))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) are the IPv4 address: a
/// dual-stack listener must not give one client two identities.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `500ms`, `25s`, `10m`, `1h` (also `0` for zero).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{s}` is not a duration (use e.g. 500ms, 25s, 10m, 1h)");
    if num.is_empty() || num.len() > 12 {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(bad()),
    };
    Ok(d)
}

/// A size in bytes: `1024`, `64KiB`, `1MiB`, `1GiB` (also with a `B` unit).
pub fn size_text(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{s}` is not a size (use bytes, or e.g. 64KiB, 1MiB)");
    if num.is_empty() || num.len() > 15 {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

/// `50/s`, `600/m`, `10/h`, and for byte rates `1MiB/s`. A zero rate is
/// refused: it would block everything, which `null` says more honestly.
pub fn parse_rate(s: &str, bytes: bool) -> Result<(NonZeroU32, Duration), String> {
    let bad = || {
        if bytes {
            format!("`{s}` is not a byte rate (use e.g. 1MiB/s, 64KiB/s)")
        } else {
            format!("`{s}` is not a rate (use e.g. 50/s, 600/m, 10/h)")
        }
    };
    let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
    let count = if bytes {
        size_text(n)?
    } else {
        n.trim().parse::<u64>().map_err(|_| bad())?
    };
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    if count == 0 {
        return Err(format!(
            "`{s}`: a rate must be above zero (use null to turn the limit off)"
        ));
    }
    let count = u32::try_from(count)
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(|| format!("`{s}`: rate too large"))?;
    Ok((count, per))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert_eq!(size_text("64KiB"), Ok(65536));
        assert!(size_text("1MB").is_err());
        let (n, per) = parse_rate("600/m", false).unwrap();
        assert_eq!((n.get(), per), (600, Duration::from_secs(60)));
        assert_eq!(parse_rate("1MiB/s", true).map(|r| r.0.get()), Ok(1 << 20));
        assert!(parse_rate("0/s", false).is_err());
        assert!(parse_rate("5", false).is_err());
    }

    #[test]
    fn cidr_matching() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let c = Cidr::parse("fd00::/8").unwrap();
        assert!(c.contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("fd00::/129").is_err());
        assert!(Cidr::parse("10.0.0.0/").is_err());
        assert!(Cidr::parse("10.0.0/8").is_err());
        assert!(
            Cidr::parse("010.0.0.0/8").is_err(),
            "leading zeros are ambiguous (octal)"
        );
        assert!(Cidr::parse("10.0.0.0/-1").is_err());
        assert!(Cidr::parse("10.0.0.0/8/8").is_err());
        // Host bits may be set; the network is what is matched.
        assert!(Cidr::parse("10.9.9.9/8")
            .unwrap()
            .contains("10.1.1.1".parse().unwrap()));
        let one = Cidr::parse("192.0.2.7").unwrap();
        assert_eq!(one.prefix_len(), 32);
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        assert!(!Cidr::parse("::/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
    }
}
