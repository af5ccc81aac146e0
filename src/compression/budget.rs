//! A process-wide cap on the bytes held in messages being inflated.
//!
//! `max_message_size` bounds one message; this bounds all of them together,
//! so that many sessions each inflating a message just under the limit
//! cannot add up to more memory than the operator planned for. Every
//! growth of an inflated message's buffer is reserved here first; the
//! reservation is an RAII guard that gives the bytes back when the message
//! is dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The default budget: 256 MiB of inflated messages in flight at once.
pub const DEFAULT_BUDGET: usize = 256 * 1024 * 1024;

#[derive(Debug)]
pub struct InflateBudget {
    limit: usize,
    used: AtomicUsize,
}

impl InflateBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(InflateBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes reserved right now (for metrics and tests).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes `n` bytes if they fit under the limit; never overshoots, even
    /// with many sessions racing.
    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// An empty reservation that grows with [`Reservation::grow`].
    pub fn reserve(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: Arc::clone(self),
            bytes: 0,
        }
    }
}

/// Bytes held against the budget; returned when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<InflateBudget>,
    bytes: usize,
}

impl Reservation {
    /// Adds `n` bytes to the reservation, or returns false (and holds what
    /// it held before) when the budget has no room.
    pub fn grow(&mut self, n: usize) -> bool {
        if !self.budget.take(n) {
            return false;
        }
        self.bytes += n;
        true
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_add_up_and_come_back() {
        let b = InflateBudget::new(100);
        let mut r1 = b.reserve();
        assert!(r1.grow(60));
        let mut r2 = b.reserve();
        assert!(!r2.grow(41));
        assert!(r2.grow(40));
        assert_eq!(b.used(), 100);
        assert!(!r1.grow(1));
        assert_eq!(r1.bytes(), 60);
        drop(r1);
        assert_eq!(b.used(), 40);
        assert!(!r2.grow(usize::MAX));
        drop(r2);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn racing_reservations_never_overshoot() {
        let b = InflateBudget::new(1000);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    let mut r = b.reserve();
                    let mut got = 0;
                    for _ in 0..1000 {
                        if r.grow(7) {
                            got += 7;
                        }
                        assert!(b.used() <= 1000);
                    }
                    (r, got)
                })
            })
            .collect();
        let held: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let total: usize = held.iter().map(|(_, g)| g).sum();
        assert_eq!(total, b.used());
        assert!(total <= 1000 && total > 1000 - 7 * 8);
        drop(held);
        assert_eq!(b.used(), 0);
    }
}
