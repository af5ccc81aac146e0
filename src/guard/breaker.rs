//! A circuit breaker per upstream.
//!
//! Only the backend's failures to *accept* sessions count: connect errors,
//! timeouts, and 5xx or malformed answers to the upgrade. 4xx answers are
//! the backend working as designed, and clean closes of established
//! sessions are not failures at all (unlike Envoy's outlier detection).
//! Live sessions are never touched by the breaker.
//!
//! Time comes from `tokio::time`, so the state machine is tested on paused
//! time.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use crate::policy::BreakerPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        open_for: Duration,
    },
    /// `cycle` tells probes of this half-open period from stale ones.
    HalfOpen {
        in_flight: u32,
        open_for: Duration,
        cycle: u64,
    },
}

pub struct Breaker {
    policy: BreakerPolicy,
    state: Mutex<State>,
    cycles: std::sync::atomic::AtomicU64,
    gauge: Gauge,
    upstream: String,
}

/// Permission to dial. Report the outcome with [`Permit::success`] or
/// [`Permit::failure`]; dropping it unreported (the client went away
/// mid-handshake) frees a half-open probe slot without a verdict.
pub struct Permit<'a> {
    breaker: &'a Breaker,
    /// The half-open cycle this probe belongs to; None for a normal dial.
    probe: Option<u64>,
    reported: bool,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy, upstream: String, gauge: Gauge) -> Breaker {
        gauge.set(0);
        Breaker {
            policy,
            state: Mutex::new(State::Closed { failures: 0 }),
            cycles: std::sync::atomic::AtomicU64::new(0),
            gauge,
            upstream,
        }
    }

    pub fn policy(&self) -> &BreakerPolicy {
        &self.policy
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, st: &mut State, new: State) {
        let code = match new {
            State::Closed { .. } => 0,
            State::Open { .. } => 1,
            State::HalfOpen { .. } => 2,
        };
        let old = std::mem::discriminant(st);
        *st = new;
        self.gauge.set(code);
        if old != std::mem::discriminant(&new) {
            let state = ["closed", "open", "half-open"]
                .get(code as usize)
                .copied()
                .unwrap_or("?");
            tracing::warn!(upstream = %self.upstream, state, "circuit breaker transition");
        }
    }

    /// `Err(retry_after)` while open (or while half-open probes are all in
    /// flight): the caller answers 503 at once, without dialing.
    pub fn try_acquire(&self) -> Result<Permit<'_>, Duration> {
        let now = Instant::now();
        let mut st = self.lock();
        let permit = |probe| Permit {
            breaker: self,
            probe,
            reported: false,
        };
        match *st {
            State::Closed { .. } => Ok(permit(None)),
            State::Open { until, open_for } => {
                if now < until {
                    return Err(until - now);
                }
                let cycle = self
                    .cycles
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                self.set(
                    &mut st,
                    State::HalfOpen {
                        in_flight: 1,
                        open_for,
                        cycle,
                    },
                );
                Ok(permit(Some(cycle)))
            }
            State::HalfOpen {
                in_flight,
                open_for,
                cycle,
            } => {
                if in_flight >= self.policy.half_open_probes {
                    return Err(Duration::from_secs(1));
                }
                *st = State::HalfOpen {
                    in_flight: in_flight + 1,
                    open_for,
                    cycle,
                };
                Ok(permit(Some(cycle)))
            }
        }
    }

    fn record(&self, probe: Option<u64>, ok: bool) {
        let now = Instant::now();
        let mut st = self.lock();
        match (*st, ok) {
            (State::Closed { .. }, true) => *st = State::Closed { failures: 0 },
            (State::Closed { failures }, false) => {
                let failures = failures + 1;
                if failures >= self.policy.consecutive_failures {
                    let open_for = self.policy.open_for;
                    self.set(
                        &mut st,
                        State::Open {
                            until: now + open_for,
                            open_for,
                        },
                    );
                } else {
                    *st = State::Closed { failures };
                }
            }
            (State::HalfOpen { cycle, .. }, true) if probe == Some(cycle) => {
                self.set(&mut st, State::Closed { failures: 0 })
            }
            (
                State::HalfOpen {
                    open_for, cycle, ..
                },
                false,
            ) if probe == Some(cycle) => {
                let open_for = (open_for * 2).min(self.policy.max_open_for);
                self.set(
                    &mut st,
                    State::Open {
                        until: now + open_for,
                        open_for,
                    },
                );
            }
            // A verdict from a dial that started before the state changed
            // says nothing about the current probe.
            _ => {}
        }
    }

    fn release(&self, probe: u64) {
        let mut st = self.lock();
        if let State::HalfOpen {
            in_flight,
            open_for,
            cycle,
        } = *st
        {
            if cycle == probe {
                *st = State::HalfOpen {
                    in_flight: in_flight.saturating_sub(1),
                    open_for,
                    cycle,
                };
            }
        }
    }

    pub fn state_code(&self) -> i64 {
        match *self.lock() {
            State::Closed { .. } => 0,
            State::Open { .. } => 1,
            State::HalfOpen { .. } => 2,
        }
    }
}

impl Permit<'_> {
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.record(self.probe, true);
    }

    pub fn failure(mut self) {
        self.reported = true;
        self.breaker.record(self.probe, false);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let (false, Some(cycle)) = (self.reported, self.probe) {
            self.breaker.release(cycle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(
            BreakerPolicy {
                consecutive_failures: 3,
                open_for: Duration::from_secs(10),
                max_open_for: Duration::from_secs(25),
                half_open_probes: 1,
            },
            "ws://test".into(),
            Gauge::default(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn closed_open_half_open_closed() {
        let b = breaker();
        for _ in 0..2 {
            b.try_acquire().unwrap().failure();
        }
        assert_eq!(b.state_code(), 0);
        // A success resets the count: failures must be consecutive.
        b.try_acquire().unwrap().success();
        for _ in 0..3 {
            b.try_acquire().unwrap().failure();
        }
        assert_eq!(b.state_code(), 1);
        let retry = b.try_acquire().err().unwrap();
        assert_eq!(retry, Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = b.try_acquire().unwrap();
        assert_eq!(b.state_code(), 2);
        // Only one probe at a time.
        assert!(b.try_acquire().is_err());
        probe.success();
        assert_eq!(b.state_code(), 0);
        assert!(b.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_doubles_open_for_up_to_max() {
        let b = breaker();
        for _ in 0..3 {
            b.try_acquire().unwrap().failure();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        b.try_acquire().unwrap().failure();
        assert_eq!(b.try_acquire().err(), Some(Duration::from_secs(20)));
        tokio::time::advance(Duration::from_secs(20)).await;
        b.try_acquire().unwrap().failure();
        // 40s capped at max_open_for = 25s.
        assert_eq!(b.try_acquire().err(), Some(Duration::from_secs(25)));
    }

    #[tokio::test(start_paused = true)]
    async fn stale_probe_verdicts_are_ignored() {
        let b = breaker();
        for _ in 0..3 {
            b.try_acquire().unwrap().failure();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let stale = b.try_acquire().unwrap();
        // Another probe of the same cycle fails and reopens the circuit.
        *b.lock() = State::Open {
            until: Instant::now(),
            open_for: Duration::from_secs(10),
        };
        tokio::time::advance(Duration::from_secs(1)).await;
        let fresh = b.try_acquire().unwrap();
        assert_eq!(b.state_code(), 2);
        // The stale probe's release or verdict must not touch the new cycle.
        drop(stale);
        assert!(
            b.try_acquire().is_err(),
            "a stale release freed a slot of the new cycle"
        );
        fresh.success();
        assert_eq!(b.state_code(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_probe_frees_its_slot() {
        let b = breaker();
        for _ in 0..3 {
            b.try_acquire().unwrap().failure();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(b.try_acquire().unwrap());
        assert!(b.try_acquire().is_ok());
    }
}
