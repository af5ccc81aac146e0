//! Token-bucket limits (governor) and concurrent-connection caps.
//!
//! Keyed state is bounded: the keyed handshake limiter is swept with
//! `retain_recent` on a timer (see [`crate::server`]), and per-IP connection
//! counts are removed when they fall to zero, so a spray of source
//! addresses cannot grow memory without bound.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::values::{canonical_ip, Cidr, Rate};

/// The limiter key for a client: its IPv4 address, or its IPv6 /64 (one
/// subscriber usually owns a whole /64, so keying by /128 would let one
/// client take 2^64 identities).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpKey(IpAddr);

impl std::fmt::Display for IpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl IpKey {
    pub fn new(ip: IpAddr) -> IpKey {
        match canonical_ip(ip) {
            IpAddr::V6(v6) => {
                let masked = u128::from(v6) & (u128::MAX << 64);
                IpKey(IpAddr::V6(Ipv6Addr::from(masked)))
            }
            v4 => IpKey(v4),
        }
    }
}

pub fn quota(rate: &Rate) -> Quota {
    let period = rate.period().max(Duration::from_nanos(1));
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(rate.count))
        .allow_burst(rate.burst)
}

pub type KeyedLimiter = RateLimiter<IpKey, DefaultKeyedStateStore<IpKey>, DefaultClock>;
/// Per-subject message buckets (JWT `sub`).
pub type SubjectLimiter = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;
pub type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// Per-IP handshake rate.
pub struct HandshakeLimiter {
    limiter: KeyedLimiter,
}

impl HandshakeLimiter {
    pub fn new(rate: &Rate) -> HandshakeLimiter {
        HandshakeLimiter {
            limiter: RateLimiter::keyed(quota(rate)),
        }
    }

    /// `Err(retry_after_seconds)` when the client is over its rate.
    pub fn check(&self, key: IpKey) -> Result<(), u64> {
        self.limiter.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ceil_secs(wait)
        })
    }

    /// Forget keys whose buckets are full again; call periodically.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

pub fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs();
    if d.subsec_nanos() > 0 { s + 1 } else { s }.max(1)
}

/// Per-connection message and byte buckets. Lives inside the session, so it
/// costs nothing when off and needs no lock when on. Each bucket is boxed:
/// a session holds only the buckets its route sets (about 70 bytes each),
/// and its future two pointers.
pub struct MessageLimiter {
    messages: Option<Box<DirectLimiter>>,
    bytes: Option<Box<DirectLimiter>>,
}

impl MessageLimiter {
    pub fn new(messages: Option<&Rate>, bytes: Option<&Rate>) -> Option<MessageLimiter> {
        if messages.is_none() && bytes.is_none() {
            return None;
        }
        Some(MessageLimiter {
            messages: messages.map(|r| Box::new(RateLimiter::direct(quota(r)))),
            bytes: bytes.map(|r| Box::new(RateLimiter::direct(quota(r)))),
        })
    }

    /// True when the message fits both buckets. A message larger than the
    /// whole byte burst is a rejection, never a wait.
    pub fn allow(&self, len: usize) -> bool {
        if let Some(m) = &self.messages {
            if m.check().is_err() {
                return false;
            }
        }
        if let Some(b) = &self.bytes {
            let Some(n) = u32::try_from(len).ok().and_then(NonZeroU32::new) else {
                return len == 0;
            };
            return matches!(b.check_n(n), Ok(Ok(())));
        }
        true
    }

    /// True when `len` more bytes of a message already under way fit the
    /// byte bucket (the message itself was counted at its first frame).
    pub fn allow_bytes(&self, len: usize) -> bool {
        let Some(b) = &self.bytes else {
            return true;
        };
        let Some(n) = u32::try_from(len).ok().and_then(NonZeroU32::new) else {
            return len == 0;
        };
        matches!(b.check_n(n), Ok(Ok(())))
    }
}

/// Live-session counts: global and per client IP. Shared by every policy
/// generation, because a reload must not forget who is connected.
pub struct ConnCounts<K = IpKey> {
    inner: Mutex<CountsInner<K>>,
}

impl<K> Default for ConnCounts<K> {
    fn default() -> Self {
        ConnCounts {
            inner: Mutex::new(CountsInner {
                total: 0,
                per_ip: HashMap::new(),
            }),
        }
    }
}

struct CountsInner<K> {
    total: u64,
    per_ip: HashMap<K, u32>,
}

/// Why a connection slot was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotError {
    Global,
    PerIp,
}

impl<K: std::hash::Hash + Eq + Clone> ConnCounts<K> {
    /// Takes a slot for `key`, released when the returned guard drops.
    pub fn acquire(
        self: &Arc<Self>,
        key: K,
        max_total: u64,
        per_ip: Option<u32>,
    ) -> Result<ConnSlot<K>, SlotError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.total >= max_total {
            return Err(SlotError::Global);
        }
        let n = g.per_ip.get(&key).copied().unwrap_or(0);
        if per_ip.is_some_and(|cap| n >= cap) {
            return Err(SlotError::PerIp);
        }
        g.total += 1;
        g.per_ip.insert(key.clone(), n + 1);
        Ok(ConnSlot {
            counts: Arc::clone(self),
            key,
        })
    }

    pub fn total(&self) -> u64 {
        self.inner.lock().map(|g| g.total).unwrap_or(0)
    }

    pub fn tracked_ips(&self) -> usize {
        self.inner.lock().map(|g| g.per_ip.len()).unwrap_or(0)
    }
}

/// One live session's place in [`ConnCounts`].
pub struct ConnSlot<K: std::hash::Hash + Eq = IpKey> {
    counts: Arc<ConnCounts<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq> Drop for ConnSlot<K> {
    fn drop(&mut self) {
        let mut g = self.counts.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.total = g.total.saturating_sub(1);
        if let Some(n) = g.per_ip.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.per_ip.remove(&self.key);
            }
        }
    }
}

/// [`client_ip`] from a request's `X-Forwarded-For` headers.
pub fn client_ip_of(peer: IpAddr, headers: &hyper::HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let xff: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    client_ip(peer, &xff, trusted)
}

/// The client's IP: the peer, unless the peer is a trusted proxy, in which
/// case the right-most `X-Forwarded-For` hop that is not itself trusted.
/// Walking from the right stops a client from prepending forged hops.
pub fn client_ip(peer: IpAddr, xff: &[&str], trusted: &[Cidr]) -> IpAddr {
    let peer = canonical_ip(peer);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut current = peer;
    for header in xff.iter().rev() {
        for hop in header.rsplit(',') {
            let hop = hop.trim();
            // Tolerate "ip:port" and "[v6]:port" forms some proxies write.
            let parsed = hop
                .parse::<IpAddr>()
                .ok()
                .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()));
            let Some(ip) = parsed.map(canonical_ip) else {
                // Garbage in a trusted chain: stop believing it.
                return current;
            };
            current = ip;
            if !is_trusted(ip) {
                return ip;
            }
        }
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32, per_s: u64, burst: u32) -> Rate {
        Rate {
            count: NonZeroU32::new(count).unwrap(),
            per: Duration::from_secs(per_s),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn ipv6_is_keyed_by_64() {
        let a = IpKey::new("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = IpKey::new("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = IpKey::new("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            IpKey::new("::ffff:1.2.3.4".parse().unwrap()),
            IpKey::new("1.2.3.4".parse().unwrap())
        );
    }

    #[test]
    fn handshake_burst_then_retry_after() {
        let l = HandshakeLimiter::new(&rate(1, 2, 3));
        let k = IpKey::new("10.0.0.1".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(l.check(k), Ok(()));
        }
        let retry = l.check(k).unwrap_err();
        assert!((1..=2).contains(&retry), "retry {retry}");
        // Another key has its own bucket.
        assert_eq!(l.check(IpKey::new("10.0.0.2".parse().unwrap())), Ok(()));
    }

    #[test]
    fn an_address_spray_is_forgotten_by_the_sweep() {
        // Buckets refill in 1 ms, so every key is idle again almost at once.
        let l = HandshakeLimiter::new(&rate(1000, 1, 1));
        for i in 0..20_000u32 {
            let _ = l.check(IpKey::new(IpAddr::V4(std::net::Ipv4Addr::from(
                0x0a00_0000 + i,
            ))));
        }
        assert_eq!(l.len(), 20_000);
        // Time has to pass for the buckets to be full again (not a wait
        // for a condition: the sweep is synchronous).
        std::thread::sleep(Duration::from_millis(20));
        l.sweep();
        assert_eq!(l.len(), 0, "idle keys must be swept");
    }

    #[test]
    fn byte_burst_above_capacity_is_rejected() {
        let m = MessageLimiter::new(None, Some(&rate(100, 1, 100))).unwrap();
        assert!(!m.allow(101));
        assert!(m.allow(60));
        assert!(!m.allow(60));
    }

    #[test]
    fn counts_are_capped_and_released() {
        let c = Arc::new(ConnCounts::default());
        let k = IpKey::new("10.0.0.1".parse().unwrap());
        let a = c.acquire(k, 10, Some(2)).unwrap();
        let _b = c.acquire(k, 10, Some(2)).unwrap();
        assert_eq!(c.acquire(k, 10, Some(2)).err(), Some(SlotError::PerIp));
        assert_eq!(
            c.acquire(IpKey::new("10.0.0.2".parse().unwrap()), 2, None)
                .err(),
            Some(SlotError::Global)
        );
        drop(a);
        assert!(c.acquire(k, 10, Some(2)).is_ok());
        assert_eq!(c.total(), 1);
        assert_eq!(c.tracked_ips(), 1);
    }

    #[test]
    fn xff_only_from_trusted_proxies() {
        let trusted = vec![Cidr::parse("10.0.0.0/8").unwrap()];
        let peer: IpAddr = "10.1.1.1".parse().unwrap();
        // Forged left-most entry is ignored: right-most untrusted hop wins.
        assert_eq!(
            client_ip(peer, &["6.6.6.6, 1.2.3.4, 10.2.2.2"], &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // Untrusted peer: its header is not believed.
        assert_eq!(
            client_ip("8.8.8.8".parse().unwrap(), &["1.2.3.4"], &trusted),
            "8.8.8.8".parse::<IpAddr>().unwrap()
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(client_ip(peer, &["nonsense"], &trusted), peer);
    }
}
