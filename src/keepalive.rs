//! wsguard's own keepalive pings, one [`Liveness`] per hop.
//!
//! A ping carries `nonce | id | sent-at` (24 bytes), so a pong can be
//! matched without storing anything per ping: the nonce is random per
//! session, the id must be one wsguard sent, and the timestamp gives the
//! round-trip time. A pong that matches nothing is not proof of life.
//!
//! Any data message from the peer also proves it is alive (as browsers and
//! the `websockets` library do), so a busy session is never pinged. State
//! is a few atomics because the two message pumps of a session share it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, Interval, MissedTickBehavior};

pub struct Liveness {
    nonce: u64,
    start: Instant,
    max_missed: u32,
    sent: AtomicU64,
    missed: AtomicU32,
    seen: AtomicBool,
}

/// What to do at a keepalive tick.
#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    /// The peer proved itself alive since the last tick.
    Skip,
    Ping(Bytes),
    /// `max_missed` pings in a row went unanswered.
    Dead,
}

impl Liveness {
    pub fn new(max_missed: u32) -> Liveness {
        Liveness {
            nonce: rand::random(),
            start: Instant::now(),
            max_missed,
            sent: AtomicU64::new(0),
            missed: AtomicU32::new(0),
            seen: AtomicBool::new(false),
        }
    }

    /// A data message arrived from this peer.
    pub fn on_data(&self) {
        self.seen.store(true, Relaxed);
    }

    pub fn on_tick(&self) -> Tick {
        if self.seen.swap(false, Relaxed) {
            self.missed.store(0, Relaxed);
            return Tick::Skip;
        }
        let missed = self.missed.load(Relaxed);
        if missed >= self.max_missed {
            return Tick::Dead;
        }
        self.missed.store(missed + 1, Relaxed);
        let id = self.sent.fetch_add(1, Relaxed) + 1;
        let micros = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut p = [0u8; 24];
        p[..8].copy_from_slice(&self.nonce.to_be_bytes());
        p[8..16].copy_from_slice(&id.to_be_bytes());
        p[16..].copy_from_slice(&micros.to_be_bytes());
        Tick::Ping(Bytes::copy_from_slice(&p))
    }

    /// `Some(rtt)` when the pong answers one of our pings: it is consumed
    /// here and never forwarded. `None`: not ours.
    pub fn on_pong(&self, payload: &[u8]) -> Option<Duration> {
        let field = |r: std::ops::Range<usize>| -> Option<u64> {
            payload
                .get(r)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes)
        };
        if payload.len() != 24 || field(0..8)? != self.nonce {
            return None;
        }
        let id = field(8..16)?;
        if id == 0 || id > self.sent.load(Relaxed) {
            return None;
        }
        let sent_at = Duration::from_micros(field(16..24)?);
        self.missed.store(0, Relaxed);
        Some(self.start.elapsed().saturating_sub(sent_at))
    }
}

/// Keepalive ticks sit on a process-wide grid of `interval / GRID_DIVISOR`.
/// Sessions that share an interval then ping in the same timer turn, so
/// thousands of pings cost a handful of wakeups instead of one wakeup (and
/// one context switch) each, and their pongs come back in bursts that one
/// `epoll_wait` collects. A session's first ping comes between one and
/// `1 + 1/GRID_DIVISOR` intervals after it starts; the ticks after that are
/// exactly one interval apart.
const GRID_DIVISOR: u32 = 8;

/// One interval per hop and session.
pub fn ticker(every: Option<Duration>) -> Option<Interval> {
    every.map(|d| {
        let first = align_up(Instant::now() + d, d / GRID_DIVISOR);
        let mut i = tokio::time::interval_at(first, d);
        // `Skip` keeps a late session on the grid; `Delay` would move it off.
        i.set_missed_tick_behavior(MissedTickBehavior::Skip);
        i
    })
}

/// The first grid point at or after `t`. The grid starts at a process-wide
/// epoch, so every session agrees on it.
fn align_up(t: Instant, grid: Duration) -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let g = grid.as_nanos();
    let Some(since) = t.checked_duration_since(epoch) else {
        return t;
    };
    if g == 0 {
        return t;
    }
    let n = since.as_nanos();
    let pad = n.div_ceil(g).saturating_mul(g).saturating_sub(n);
    t + Duration::from_nanos(u64::try_from(pad).unwrap_or(0))
}

/// Waits for the next tick, or forever when keepalive is off.
pub async fn tick(t: &mut Option<Interval>) {
    match t {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pings_then_dead_unless_answered() {
        let l = Liveness::new(2);
        let Tick::Ping(p1) = l.on_tick() else {
            panic!()
        };
        let Tick::Ping(_) = l.on_tick() else { panic!() };
        assert_eq!(l.on_tick(), Tick::Dead);
        // An answer to an outstanding ping revives it.
        tokio::time::advance(Duration::from_millis(30)).await;
        assert_eq!(l.on_pong(&p1), Some(Duration::from_millis(30)));
        assert!(matches!(l.on_tick(), Tick::Ping(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn foreign_pongs_do_not_count() {
        let l = Liveness::new(1);
        let Tick::Ping(p) = l.on_tick() else { panic!() };
        let mut forged = p.to_vec();
        forged[0] ^= 1;
        assert_eq!(l.on_pong(&forged), None);
        assert_eq!(l.on_pong(b"hello"), None);
        // An id we never sent.
        let mut future = p.to_vec();
        future[15] = 9;
        assert_eq!(l.on_pong(&future), None);
        assert_eq!(l.on_tick(), Tick::Dead);
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_with_one_interval_tick_together() {
        let every = Duration::from_secs(1);
        let mut a = ticker(Some(every)).unwrap();
        tokio::time::advance(Duration::from_millis(37)).await;
        let mut b = ticker(Some(every)).unwrap();
        tokio::time::advance(Duration::from_millis(401)).await;
        let mut c = ticker(Some(every)).unwrap();
        let start = Instant::now();
        let (ta, tb, tc) = (a.tick().await, b.tick().await, c.tick().await);
        // Each first tick is at least one interval after its session began,
        // and at most an eighth of one later; all sit on the same grid.
        assert!(tc - start >= every && tc - start <= every + every / GRID_DIVISOR);
        let grid = every / GRID_DIVISOR;
        for t in [ta, tb, tc] {
            let off = (t - ta).as_nanos() % grid.as_nanos();
            assert_eq!(off, 0, "off the grid by {off} ns");
        }
        // After that, exactly one interval apart.
        assert_eq!(a.tick().await - ta, every);
        assert_eq!(c.tick().await - tc, every);
    }

    #[test]
    fn align_up_is_a_grid_point_not_before_t() {
        let g = Duration::from_millis(125);
        // Fix the epoch first: a time before it is returned unchanged.
        let _ = align_up(Instant::now(), g);
        let t0 = Instant::now();
        let base = align_up(t0, g);
        assert!(base >= t0 && base - t0 < g);
        for ms in [0u64, 1, 124, 125, 126, 999, 1000] {
            let t = base + Duration::from_millis(ms);
            let up = align_up(t, g);
            assert!(up >= t && up - t < g, "{ms}");
            assert_eq!((up - base).as_nanos() % g.as_nanos(), 0, "{ms}");
        }
        assert_eq!(align_up(t0, Duration::ZERO), t0);
    }

    #[tokio::test(start_paused = true)]
    async fn data_is_liveness() {
        let l = Liveness::new(1);
        assert!(matches!(l.on_tick(), Tick::Ping(_)));
        l.on_data();
        assert_eq!(l.on_tick(), Tick::Skip);
        assert!(matches!(l.on_tick(), Tick::Ping(_)));
    }
}
