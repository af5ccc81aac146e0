//! Memory of the keyed handshake limiter under a spray of source addresses
//! (issue 6): RSS per key, and that the periodic sweep (`retain_recent`,
//! which wsguard runs every 10 s) gives the memory back.
//!
//! `cargo run --release --example spray -- 1000000`

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use wsguard::guard::limits::{HandshakeLimiter, IpKey};
use wsguard::policy::Rate;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    // The default per-IP handshake rate: 5/s, burst 20 (full again after 4 s).
    let rate = Rate {
        count: NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN),
        per: Duration::from_secs(1),
        burst: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
    };
    let limiter = HandshakeLimiter::new(&rate);
    let before = rss_kib();
    let t = Instant::now();
    for i in 0..n {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i)));
        let _ = limiter.check(IpKey::new(ip));
    }
    let filled = rss_kib();
    println!(
        "{n} distinct source addresses in {:.2?}: {} keys, RSS +{} KiB = {:.0} bytes per key",
        t.elapsed(),
        limiter.len(),
        filled.saturating_sub(before),
        (filled.saturating_sub(before) as f64 * 1024.0) / f64::from(n)
    );
    std::thread::sleep(Duration::from_millis(4200));
    let t = Instant::now();
    limiter.sweep();
    println!(
        "after the buckets refill and one sweep ({:.2?}): {} keys, RSS {} KiB above the start (allocator may keep some pages)",
        t.elapsed(),
        limiter.len(),
        rss_kib().saturating_sub(before)
    );
}
