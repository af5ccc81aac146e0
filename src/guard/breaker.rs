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
//!
//! # Shared across replicas (`circuit_breaker.shared: true`)
//!
//! With `limits.shared` set, the breaker's state can live in Redis, so that
//! replicas in front of one backend find an outage together: one hash per
//! upstream, `{prefix}:cb:{upstream url}` (one key, so it is Cluster-safe),
//! holding the consecutive failures, the open-until time (Redis `TIME`, so
//! replica clocks do not matter), the current open period and the
//! half-open probe window. Each transition is one Lua script
//! ([`SharedScripts`]): *acquire* (closed, open, or take a half-open probe),
//! *failure* (count; open at the threshold; a failed probe reopens for
//! twice as long, up to `max_open_for`), *success* (a probe closes the
//! circuit; a success while closed resets the count) and *release* (a
//! probe abandoned without a verdict). A probe that never reports (its
//! replica died) frees its slot when [`PROBE_WINDOW`] ends.
//!
//! Every outcome is also fed to this replica's own state machine, which
//! decides alone while Redis cannot be reached (`wsguard_circuit_state` then
//! shows the local state; otherwise the shared state as last read).
//! A success while the shared count is zero is not written, so a healthy
//! backend costs one Redis call per upgrade (the acquire).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use redis::Script;
use tokio::time::Instant;

use crate::guard::redis_limits::SharedLimiter;
use crate::values::BreakerPolicy;

/// How long a shared half-open probe holds its slot at most.
pub const PROBE_WINDOW: Duration = Duration::from_secs(10);

/// KEYS[1] breaker hash; ARGV[1] half_open_probes; ARGV[2] probe window ms.
/// {0, failures} closed; {1, wait_ms} open; {2, cycle} a probe is granted;
/// {3, wait_ms} half-open with every probe slot taken.
const ACQUIRE_LUA: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'failures', 'open_until', 'cycle', 'probes', 'probe_until')
local open_until = tonumber(h[2])
if open_until == nil then return {0, tonumber(h[1]) or 0} end
if now < open_until then return {1, open_until - now} end
local cycle = tonumber(h[3]) or 0
local probes = tonumber(h[4]) or 0
local probe_until = tonumber(h[5]) or 0
if probe_until <= now then
  cycle = cycle + 1
  probes = 0
  probe_until = now + tonumber(ARGV[2])
end
if probes >= tonumber(ARGV[1]) then return {3, math.min(1000, probe_until - now)} end
redis.call('HSET', KEYS[1], 'cycle', cycle, 'probes', probes + 1, 'probe_until', probe_until)
return {2, cycle}
"#;

/// KEYS[1]; ARGV[1] consecutive_failures; ARGV[2] open_for ms; ARGV[3]
/// max_open_for ms; ARGV[4] probe cycle (0: not a probe); ARGV[5] key TTL
/// ms. {1, open_for_ms} opened; {0, failures} counted; {2, 0} ignored.
const FAILURE_LUA: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'open_until', 'cycle', 'open_for')
local open_until = tonumber(h[1])
local ttl = tonumber(ARGV[5])
if open_until == nil then
  local f = redis.call('HINCRBY', KEYS[1], 'failures', 1)
  if f >= tonumber(ARGV[1]) then
    local open_for = tonumber(ARGV[2])
    redis.call('HSET', KEYS[1], 'failures', 0, 'open_until', now + open_for, 'open_for', open_for, 'probes', 0, 'probe_until', 0)
    redis.call('PEXPIRE', KEYS[1], ttl)
    return {1, open_for}
  end
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {0, f}
end
if now >= open_until and ARGV[4] ~= '0' and tonumber(h[2]) == tonumber(ARGV[4]) then
  local open_for = math.min((tonumber(h[3]) or tonumber(ARGV[2])) * 2, tonumber(ARGV[3]))
  redis.call('HSET', KEYS[1], 'open_until', now + open_for, 'open_for', open_for, 'probes', 0, 'probe_until', 0)
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {1, open_for}
end
return {2, 0}
"#;

/// KEYS[1]; ARGV[1] probe cycle (0: not a probe). Closed: the count starts
/// again. Half-open and the current cycle's probe: closes. Returns 0 when
/// closed by this call (or already closed), 1 when ignored.
const SUCCESS_LUA: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'open_until', 'cycle')
local open_until = tonumber(h[1])
if open_until == nil then
  redis.call('DEL', KEYS[1])
  return 0
end
if ARGV[1] ~= '0' and now >= open_until and tonumber(h[2]) == tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 0
end
return 1
"#;

/// KEYS[1]; ARGV[1] probe cycle. Frees the probe slot of an abandoned probe
/// of the current cycle.
const RELEASE_LUA: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'cycle', 'probes')
if tonumber(h[1]) == tonumber(ARGV[1]) and (tonumber(h[2]) or 0) > 0 then
  redis.call('HINCRBY', KEYS[1], 'probes', -1)
end
return 0
"#;

/// KEYS[1]. Reads the state without changing it: 0 closed, 1 open, 2
/// half-open (open_for has passed).
const PEEK_LUA: &str = r#"
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until'))
if open_until == nil then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < open_until then return 1 end
return 2
"#;

/// How often a shared breaker reads the shared state for its gauge.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The shared breaker's scripts, one per transition (kept on the
/// [`SharedLimiter`], which preloads them with its own).
#[derive(Clone)]
pub struct SharedScripts {
    acquire: Script,
    failure: Script,
    success: Script,
    release: Script,
    peek: Script,
}

impl Default for SharedScripts {
    fn default() -> Self {
        SharedScripts::new()
    }
}

impl SharedScripts {
    pub fn new() -> SharedScripts {
        SharedScripts {
            acquire: Script::new(ACQUIRE_LUA),
            failure: Script::new(FAILURE_LUA),
            success: Script::new(SUCCESS_LUA),
            release: Script::new(RELEASE_LUA),
            peek: Script::new(PEEK_LUA),
        }
    }

    pub fn all(&self) -> [Script; 5] {
        [
            self.acquire.clone(),
            self.failure.clone(),
            self.success.clone(),
            self.release.clone(),
            self.peek.clone(),
        ]
    }
}

/// Where a shared breaker keeps its state.
struct SharedLink {
    limiter: Arc<SharedLimiter>,
    key: String,
}

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
    shared: Option<SharedLink>,
}

/// Permission to dial. Report the outcome with [`Permit::success`] or
/// [`Permit::failure`]; dropping it unreported (the client went away
/// mid-handshake) frees a half-open probe slot without a verdict.
pub struct Permit<'a> {
    breaker: &'a Breaker,
    /// The half-open cycle this probe belongs to; None for a normal dial.
    probe: Option<u64>,
    reported: bool,
    /// Shared mode: the Redis probe cycle (0: not a probe) and whether a
    /// success must be written (a failure count or a probe to clear).
    shared: Option<(i64, bool)>,
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
            shared: None,
        }
    }

    /// Keeps the state in `limiter`'s Redis (`circuit_breaker.shared`).
    pub fn shared(mut self, limiter: Arc<SharedLimiter>) -> Breaker {
        let key = limiter.full_key(&format!("cb:{}", self.upstream));
        self.shared = Some(SharedLink { limiter, key });
        self
    }

    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Whether the gauge shows this replica's own state (not shared, or
    /// Redis unreachable).
    fn local_gauge(&self) -> bool {
        self.shared.as_ref().is_none_or(|s| s.limiter.is_down())
    }

    /// [`Self::try_acquire`], through Redis when shared (falling back to
    /// this replica's own state while Redis cannot be reached).
    pub async fn acquire(&self) -> Result<Permit<'_>, Duration> {
        let Some(link) = &self.shared else {
            return self.try_acquire();
        };
        let probes = self.policy.half_open_probes;
        let window = ms(PROBE_WINDOW);
        let reply = link
            .limiter
            .call(|mut conn| async move {
                link.limiter
                    .breaker_scripts
                    .acquire
                    .key(&link.key)
                    .arg(probes)
                    .arg(window)
                    .invoke_async::<Vec<i64>>(&mut conn)
                    .await
            })
            .await;
        let permit = |cycle: i64, write: bool| Permit {
            breaker: self,
            probe: None,
            reported: false,
            shared: Some((cycle, write)),
        };
        match reply.as_deref() {
            Ok([0, failures]) => {
                self.show(0);
                Ok(permit(0, *failures > 0))
            }
            Ok([1, wait_ms]) => {
                self.show(1);
                Err(Duration::from_millis(u64::try_from(*wait_ms).unwrap_or(0)))
            }
            Ok([2, cycle]) => {
                self.show(2);
                Ok(permit(*cycle, true))
            }
            Ok([3, wait_ms]) => {
                self.show(2);
                Err(Duration::from_millis(
                    u64::try_from(*wait_ms).unwrap_or(0).max(1),
                ))
            }
            // Unreachable or a reply this version does not know.
            _ => self.try_acquire(),
        }
    }

    /// Shared mode: keeps the gauge on the shared state while no handshake
    /// reads it (another replica opened the circuit), one read per
    /// [`WATCH_INTERVAL`]; ends when the breaker is dropped (a reload that
    /// forgets it).
    pub fn watch(self: &Arc<Self>) {
        if self.shared.is_none() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        handle.spawn(async move {
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(b) = weak.upgrade() else { return };
                b.peek().await;
            }
        });
    }

    async fn peek(&self) {
        let Some(link) = &self.shared else { return };
        let reply = link
            .limiter
            .call(|mut conn| async move {
                link.limiter
                    .breaker_scripts
                    .peek
                    .key(&link.key)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
        match reply {
            Ok(code @ 0..=2) => self.show(code),
            // Unreachable: the local state is what decides, so show it.
            _ => {
                self.gauge.set(self.state_code());
            }
        }
    }

    /// Sets the gauge to a state read from Redis; logs a change.
    fn show(&self, code: i64) {
        if self.gauge.get() != code {
            self.gauge.set(code);
            let state = state_name(code);
            tracing::warn!(upstream = %self.upstream, state, "circuit breaker transition (shared)");
        }
    }

    /// Reports a shared outcome. Always fed to the local state too.
    async fn report_shared(&self, cycle: i64, write: bool, ok: bool) {
        let Some(link) = &self.shared else { return };
        if ok && !write {
            return;
        }
        let p = self.policy;
        let ttl = ms((p.max_open_for * 2).max(Duration::from_secs(60)) + PROBE_WINDOW);
        let reply = link
            .limiter
            .call(|mut conn| async move {
                let s = &link.limiter.breaker_scripts;
                if ok {
                    s.success
                        .key(&link.key)
                        .arg(cycle)
                        .invoke_async::<i64>(&mut conn)
                        .await
                        .map(|v| vec![v])
                } else {
                    s.failure
                        .key(&link.key)
                        .arg(p.consecutive_failures)
                        .arg(ms(p.open_for))
                        .arg(ms(p.max_open_for))
                        .arg(cycle)
                        .arg(ttl)
                        .invoke_async::<Vec<i64>>(&mut conn)
                        .await
                }
            })
            .await;
        match reply.as_deref() {
            Ok([0]) if cycle != 0 => self.show(0),
            Ok([1, _]) if !ok => self.show(1),
            _ => {}
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
        if self.local_gauge() {
            self.gauge.set(code);
        }
        if old != std::mem::discriminant(&new) {
            let state = state_name(code);
            if self.shared.is_some() {
                tracing::debug!(upstream = %self.upstream, state, "circuit breaker transition (this replica's own state)");
            } else {
                tracing::warn!(upstream = %self.upstream, state, "circuit breaker transition");
            }
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
            shared: None,
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

fn state_name(code: i64) -> &'static str {
    match code {
        0 => "closed",
        1 => "open",
        _ => "half-open",
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Permit<'_> {
    /// The dial succeeded (in shared mode, written to Redis when it
    /// changes anything, bounded by `limits.shared.timeout`).
    pub async fn success(mut self) {
        self.reported = true;
        self.breaker.record(self.probe, true);
        if let Some((cycle, write)) = self.shared {
            self.breaker.report_shared(cycle, write, true).await;
        }
    }

    /// The backend failed.
    pub async fn failure(mut self) {
        self.reported = true;
        self.breaker.record(self.probe, false);
        if let Some((cycle, write)) = self.shared {
            self.breaker.report_shared(cycle, write, false).await;
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.reported {
            return;
        }
        if let Some(cycle) = self.probe {
            self.breaker.release(cycle);
        }
        if let (Some((cycle, _)), Some(link)) = (self.shared, &self.breaker.shared) {
            if cycle != 0 {
                let (limiter, key) = (Arc::clone(&link.limiter), link.key.clone());
                limiter.clone().spawn_tracked(async move {
                    let (limiter, key) = (&limiter, &key);
                    let _ = limiter
                        .call(|mut conn| async move {
                            limiter
                                .breaker_scripts
                                .release
                                .key(key)
                                .arg(cycle)
                                .invoke_async::<i64>(&mut conn)
                                .await
                        })
                        .await;
                });
            }
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
                shared: false,
            },
            "ws://test".into(),
            Gauge::default(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn closed_open_half_open_closed() {
        let b = breaker();
        for _ in 0..2 {
            b.try_acquire().unwrap().failure().await;
        }
        assert_eq!(b.state_code(), 0);
        // A success resets the count: failures must be consecutive.
        b.try_acquire().unwrap().success().await;
        for _ in 0..3 {
            b.try_acquire().unwrap().failure().await;
        }
        assert_eq!(b.state_code(), 1);
        let retry = b.try_acquire().err().unwrap();
        assert_eq!(retry, Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = b.try_acquire().unwrap();
        assert_eq!(b.state_code(), 2);
        // Only one probe at a time.
        assert!(b.try_acquire().is_err());
        probe.success().await;
        assert_eq!(b.state_code(), 0);
        assert!(b.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_doubles_open_for_up_to_max() {
        let b = breaker();
        for _ in 0..3 {
            b.try_acquire().unwrap().failure().await;
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        b.try_acquire().unwrap().failure().await;
        assert_eq!(b.try_acquire().err(), Some(Duration::from_secs(20)));
        tokio::time::advance(Duration::from_secs(20)).await;
        b.try_acquire().unwrap().failure().await;
        // 40s capped at max_open_for = 25s.
        assert_eq!(b.try_acquire().err(), Some(Duration::from_secs(25)));
    }

    #[tokio::test(start_paused = true)]
    async fn stale_probe_verdicts_are_ignored() {
        let b = breaker();
        for _ in 0..3 {
            b.try_acquire().unwrap().failure().await;
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
        fresh.success().await;
        assert_eq!(b.state_code(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_probe_frees_its_slot() {
        let b = breaker();
        for _ in 0..3 {
            b.try_acquire().unwrap().failure().await;
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(b.try_acquire().unwrap());
        assert!(b.try_acquire().is_ok());
    }
}
