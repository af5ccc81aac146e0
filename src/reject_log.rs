//! One info line per refused handshake, rate-limited.
//!
//! An operator whose users get 403 must see why at the default log level,
//! but a flood of bad handshakes must not fill the disk: lines pass through
//! a token bucket ([`RATE`] per second, bursts of [`BURST`]); the lines it
//! holds back are counted and the count is written on the next line that
//! passes. Every refusal is counted in `wsguard_rejections_total` anyway.
//!
//! A line names the status, the reason label (the same as the metric's),
//! a short description, the peer address and the client IP (after
//! `trusted_proxies`). Never the path or query (a token may ride in
//! `?access_token=`), never a header value, never a token: the
//! descriptions come from [`Reject`]'s Display, which names only the kind of
//! failure (`token expired`, `origin refused: origin_not_allowed`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use crate::error::Reject;

/// Lines per second, sustained.
pub const RATE: f64 = 20.0;
/// Lines in a burst.
pub const BURST: f64 = 100.0;

#[derive(Debug)]
pub struct RefusalLog {
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog {
            bucket: Mutex::new(Bucket {
                tokens: BURST,
                last: None,
                suppressed: 0,
            }),
        }
    }
}

impl RefusalLog {
    /// Whether a line may be written at `now`; if so, how many were held
    /// back since the last one.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = b.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            b.tokens = (b.tokens + dt * RATE).min(BURST);
        }
        b.last = Some(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed = b.suppressed.saturating_add(1);
            None
        }
    }

    /// Logs one refusal at info (when the bucket allows).
    pub fn refused(&self, peer: SocketAddr, client: IpAddr, r: &Reject) {
        let Some(suppressed) = self.admit(Instant::now()) else {
            return;
        };
        if suppressed > 0 {
            tracing::info!(
                client = %client, peer = %peer, status = r.status().as_u16(), reason = r.label(),
                suppressed, "handshake refused: {r} ({suppressed} earlier refusal lines suppressed)"
            );
        } else {
            tracing::info!(
                client = %client, peer = %peer, status = r.status().as_u16(), reason = r.label(),
                "handshake refused: {r}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flood_is_cut_to_the_rate_and_the_rest_counted() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        // 1000 refusals in the same instant: the burst passes, the rest wait.
        let passed = (0..1000).filter(|_| log.admit(t0).is_some()).count();
        assert_eq!(passed, BURST as usize);
        // One second later, RATE more lines; the first reports the count.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(log.admit(t1), Some(1000 - BURST as u64));
        let more = (0..100).filter(|_| log.admit(t1).is_some()).count();
        assert_eq!(more, RATE as usize - 1);
        // A quiet minute refills the bucket to its burst, no further.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(log.admit(t2), Some(100 - (RATE as u64 - 1)));
        let burst = (0..1000).filter(|_| log.admit(t2).is_some()).count();
        assert_eq!(burst, BURST as usize - 1);
    }
}
