//! Limits shared by every replica, kept in Redis (`limits.shared`).
//!
//! Each replica's own governor limiters ([`crate::guard::limits`]) only see
//! the traffic that reaches that replica; with N replicas a client gets N
//! times its rate. [`SharedLimiter`] keeps the same buckets in one Redis, so
//! the rate holds across the fleet.
//!
//! # Where Redis is: one node, Sentinel or Cluster
//!
//! [`RedisTarget`] is one of:
//!
//! * `redis_url`: one node (or a primary behind a stable address), through
//!   a managed connection that reconnects by itself;
//! * `sentinel`: the primary a Sentinel group names. The primary is looked
//!   up through the sentinels when the connection is made, and again after
//!   any connection error or a `READONLY` answer (the old primary demoted),
//!   so a failover is followed without a restart;
//! * `cluster`: Redis Cluster, seeded by a few node URLs; the slot map is
//!   learnt and refreshed (`MOVED`, failovers) by the cluster client.
//!
//! Every script touches exactly one key, so on a Cluster each runs on the
//! node that owns that key's slot, unchanged (no cross-slot access). A key
//! is `{prefix}:{what}` as before; keys that a future script would touch
//! together must share a hash tag.
//!
//! # Rates: GCRA in one Lua script
//!
//! A rate is a GCRA (generic cell rate algorithm) bucket: one Redis string
//! per key holding the *theoretical arrival time* (TAT, microseconds). One
//! Lua script, run with `EVALSHA` (and re-loaded by [`redis::Script`] when
//! Redis answers `NOSCRIPT`, e.g. after a restart or a failover), does per
//! call:
//!
//! 1. `now` = Redis `TIME` (so the replicas' clocks do not matter);
//! 2. `tat = max(stored TAT or now, now)`, `new_tat = tat + T` where `T` is
//!    [`Rate::period`] and the tolerance is `T * burst`;
//! 3. if `new_tat - T * burst > now` the cell does not fit: nothing is
//!    written and the reply is the wait until it would fit;
//! 4. else `SET key new_tat PX (new_tat - now)`: the key expires exactly
//!    when the bucket would be full again, so idle keys vanish by themselves.
//!
//! A script runs atomically, so concurrent replicas never lose an update.
//! The semantics match the local governor limiter for the same [`Rate`]
//! (`burst` cells at once, then one per `period`).
//!
//! # When Redis is down: `on_error`
//!
//! Every call is bounded by `timeout`. A call that fails or times out
//! returns [`Decision::Unavailable`]; the caller applies `on_error`, most
//! simply through [`resolve`] (or [`verdict`]):
//!
//! * `local` (default): fall back to this replica's own governor limiter,
//!   so the limit still holds per replica (N times looser fleet-wide);
//! * `allow`: let the request through (availability over enforcement);
//! * `deny`: reject it; the caller picks the status (503: this is an
//!   outage, not the client's fault; [`verdict`] tells the two apart).
//!
//! Health: the first failure logs one `warn` and marks the limiter down;
//! the first success of a call sent after the failure logs one `info` (a
//! Redis that keeps flapping logs each transition). While down, calls do not
//! each wait for the timeout: one probe per [`PROBE_INTERVAL`] goes to
//! Redis and the others answer `Unavailable` at once, so an outage adds no
//! latency to the handshake path. [`SharedLimiter::errors`] counts every
//! `Unavailable` answer, [`SharedLimiter::is_down`] reports the state. If
//! Redis stays unreachable for [`REBUILD_AFTER`], the connection is thrown
//! away and dialled afresh (a connection whose peer vanished silently, e.g.
//! behind a NAT or after a failover, otherwise only errors out when the
//! kernel gives up on it, many minutes later).
//!
//! # Connection caps: one lease per session
//!
//! A per-subject cap is a sorted set of *leases*, one per live session,
//! scored by the time it expires. [`SharedLimiter::acquire_slot_guard`]
//! runs one script: drop the expired leases, refuse at the cap, else add a
//! lease that expires in [`DEFAULT_LEASE_TTL`]. While the session lives,
//! one background task per limiter renews every live lease of this replica
//! each third of that TTL (one script call per subject). The session
//! releases its lease (removes it) before its task ends, bounded by
//! `timeout`; a guard that is only dropped releases from a task on the
//! process's task tracker, so a graceful shutdown waits for it.
//!
//! A lease that is never released (a replica crashed, Redis was down at the
//! release, an acquire timed out after Redis applied it) is no longer
//! renewed and expires on its own one TTL later, whatever the subject does
//! meanwhile: new acquires never extend old leases. If Redis is
//! unreachable for longer than the TTL, live leases lapse too; the next
//! renewal puts them back.
//!
//! After a failover to a replica, buckets and leases are as fresh as
//! replication was, so a few extra cells may pass.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, Pipeline, RedisConnectionInfo, RedisFuture, Script, Value,
};
use tokio_util::task::TaskTracker;

use crate::config::OnError;
use crate::values::Rate;

/// While down, at most one call per this interval actually goes to Redis.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Down for this long: drop the connection and dial a new one (at most
/// once per this interval).
pub const REBUILD_AFTER: Duration = Duration::from_secs(2);
/// How long the background dial + script preload may take.
const WARM_UP_LIMIT: Duration = Duration::from_secs(10);
/// Default lifetime of a connection-slot lease; renewed every third of it
/// while the session lives.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);
/// Retry-After for a refused connection slot.
pub const SLOT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Retry-After [`resolve`] answers when `on_error: deny` rejects.
pub const UNAVAILABLE_RETRY_SECS: u64 = 1;

/// GCRA, one cell. KEYS[1] bucket (holds the TAT in µs); ARGV[1] emission
/// interval T in µs (may be fractional); ARGV[2] burst.
/// Returns {1, 0} (allowed) or {0, retry_after_µs}.
const GCRA_LUA: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if allow_at > now then
  return {0, math.ceil(allow_at - now)}
end
local ttl_ms = math.ceil((new_tat - now) / 1000)
if ttl_ms < 1 then ttl_ms = 1 end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', string.format('%.0f', ttl_ms))
return {1, 0}
"#;

/// KEYS[1] lease set (sorted set: lease id -> expiry, ms of Redis time);
/// ARGV[1] cap; ARGV[2] lease TTL in ms; ARGV[3] the new lease's id.
/// Returns 1 (granted) or 0. Expired leases are dropped first; the key's
/// own TTL covers the newest lease and keeps no expired one alive.
const ACQUIRE_LUA: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"#;

/// KEYS[1] lease set; ARGV[1] lease TTL in ms; ARGV[2] '0': renew only
/// leases that are still there, '1': also put back the ones that lapsed;
/// ARGV[3..] live lease ids of one replica. Drops expired leases. Returns
/// the ids that were not there (with '0').
///
/// Renewing only what is there keeps a lease released between the
/// replica's snapshot and this call from coming back; a lapsed lease (Redis
/// out of reach for longer than the TTL) is put back by a second call for
/// the ids the replica still holds.
const RENEW_LUA: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local missing = {}
for i = 3, #ARGV do
  if ARGV[2] == '1' or redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  else
    table.insert(missing, ARGV[i])
  end
end
if redis.call('ZCARD', KEYS[1]) > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return missing
"#;

/// KEYS[1] lease set; ARGV[1] lease id. Removes it; deletes the key when
/// no lease is left. Returns the number of leases left.
const RELEASE_LUA: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
if n == 0 then redis.call('DEL', KEYS[1]) end
return n
"#;

/// Where Redis is (`limits.shared.redis_url | sentinel | cluster`).
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One node: `redis://[user:password@]host[:port][/db]`.
    Url(String),
    /// The primary that a Sentinel group monitors under `master`.
    Sentinel {
        master: String,
        /// The sentinels' URLs.
        addresses: Vec<String>,
        /// The primary's password (from `password_env`), if any.
        password: Option<String>,
    },
    /// A Redis Cluster, seeded by these node URLs.
    Cluster(Vec<String>),
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // URLs may carry passwords: show only where they point.
        match self {
            RedisTarget::Url(u) => write!(f, "{}", redacted_addr(u)),
            RedisTarget::Sentinel {
                master, addresses, ..
            } => write!(
                f,
                "sentinel {master} via [{}]",
                addresses
                    .iter()
                    .map(|a| redacted_addr(a))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            RedisTarget::Cluster(nodes) => write!(
                f,
                "cluster [{}]",
                nodes
                    .iter()
                    .map(|a| redacted_addr(a))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// `limits.shared`, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedSettings {
    pub target: RedisTarget,
    pub prefix: String,
    pub timeout: Duration,
    pub on_error: OnError,
}

impl fmt::Debug for SharedSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSettings")
            .field("redis", &self.target)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish()
    }
}
/// The answer of one shared check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        retry_after: Duration,
    },
    /// Redis failed or timed out: the caller applies `on_error`.
    Unavailable,
}

/// A [`Decision`] with `on_error` applied, for callers that answer an
/// outage differently from a rate limit (503 vs 429).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Over the rate (shared, or local under `on_error: local`).
    Limited {
        retry_after_secs: u64,
    },
    /// Redis unavailable and `on_error: deny`.
    Unavailable,
}

/// Applies `on_error` to `decision`. `local` is this replica's own limiter
/// (e.g. `|| handshake_limiter.check(ip_key)`); it is called only when
/// Redis is unavailable and `on_error` is `local`.
pub fn verdict(
    decision: Decision,
    on_error: OnError,
    local: impl FnOnce() -> Result<(), u64>,
) -> Verdict {
    match decision {
        Decision::Allow => Verdict::Allow,
        Decision::Deny { retry_after } => Verdict::Limited {
            retry_after_secs: ceil_secs(retry_after),
        },
        Decision::Unavailable => match on_error {
            OnError::Local => match local() {
                Ok(()) => Verdict::Allow,
                Err(retry_after_secs) => Verdict::Limited { retry_after_secs },
            },
            OnError::Allow => Verdict::Allow,
            OnError::Deny => Verdict::Unavailable,
        },
    }
}

/// [`verdict`] flattened to the local limiter's shape: `Err(retry-after
/// seconds)` to reject. `on_error: deny` during an outage answers
/// `Err(UNAVAILABLE_RETRY_SECS)`; use [`verdict`] to send it a 503 instead.
pub fn resolve(
    decision: Decision,
    on_error: OnError,
    local: impl FnOnce() -> Result<(), u64>,
) -> Result<(), u64> {
    match verdict(decision, on_error, local) {
        Verdict::Allow => Ok(()),
        Verdict::Limited { retry_after_secs } => Err(retry_after_secs),
        Verdict::Unavailable => Err(UNAVAILABLE_RETRY_SECS),
    }
}

/// Whole seconds, rounded up, at least 1 (a Retry-After of 0 invites a
/// tight retry loop).
fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs();
    if d.subsec_nanos() > 0 { s + 1 } else { s }.max(1)
}

/// Why one call failed (for the logs; callers only see `Unavailable`).
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Setup(String),
    #[error("unexpected reply from the script: {0:?}")]
    Reply(Vec<i64>),
}

/// Checks `url` the way [`SharedLimiter::new`] will use it (for policy
/// load). The message never repeats the URL, which may hold a password.
pub fn validate_url(url: &str) -> Result<(), String> {
    Client::open(url).map(|_| ()).map_err(url_error)
}

fn url_error(e: redis::RedisError) -> String {
    format!(
        "not a usable Redis URL ({e}); use redis://[user:password@]host[:port][/db] \
         or redis+unix:///path/to/redis.sock (TLS is not supported)"
    )
}

/// `host:port` (or the socket path) of a Redis URL, without credentials.
fn redacted_addr(url: &str) -> String {
    match Client::open(url) {
        Ok(c) => c.get_connection_info().addr().to_string(),
        Err(_) => "<invalid url>".to_string(),
    }
}

/// One connection, whichever the deployment.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Sentinel(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How a connection is made.
enum Dialer {
    /// Made at once (lazily connecting) and managed from then on.
    Single(Client),
    /// Asked of the sentinels each time a connection is made.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    Cluster(ClusterClient),
}

/// Checks `target` the way [`SharedLimiter::new`] will use it (for policy
/// load). Messages never repeat a URL, which may hold a password.
pub fn validate_target(target: &RedisTarget) -> Result<(), String> {
    dialer(target, Duration::from_secs(1)).map(|_| ())
}

fn dialer(target: &RedisTarget, timeout: Duration) -> Result<Dialer, String> {
    let connect_timeout = timeout.max(Duration::from_secs(1));
    let response_timeout = timeout.max(Duration::from_millis(500));
    match target {
        RedisTarget::Url(url) => Client::open(url.as_str())
            .map(Dialer::Single)
            .map_err(url_error),
        RedisTarget::Sentinel {
            master,
            addresses,
            password,
        } => {
            if master.is_empty() {
                return Err("the sentinel master name must not be empty".to_string());
            }
            if addresses.is_empty() {
                return Err("list at least one sentinel address".to_string());
            }
            for a in addresses {
                validate_url(a)?;
            }
            let mut info = RedisConnectionInfo::default();
            if let Some(p) = password {
                info = info.set_password(p);
            }
            let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
            SentinelClient::build(
                addresses.iter().map(String::as_str).collect(),
                master.clone(),
                Some(node),
                SentinelServerType::Master,
            )
            .map(|c| Dialer::Sentinel(tokio::sync::Mutex::new(c)))
            .map_err(url_error)
        }
        RedisTarget::Cluster(nodes) => {
            if nodes.is_empty() {
                return Err("list at least one cluster node".to_string());
            }
            for n in nodes {
                validate_url(n)?;
            }
            ClusterClient::builder(nodes.iter().map(String::as_str))
                .connection_timeout(connect_timeout)
                .response_timeout(response_timeout)
                .retries(2)
                .min_retry_wait(10)
                .max_retry_wait(200)
                .build()
                .map(Dialer::Cluster)
                .map_err(url_error)
        }
    }
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout.max(Duration::from_secs(1))))
        .set_response_timeout(Some(timeout.max(Duration::from_millis(500))))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
        .set_number_of_retries(8)
}

impl Dialer {
    /// A new connection (Sentinel and Cluster; `Single` is lazy).
    async fn dial(&self, timeout: Duration) -> redis::RedisResult<Conn> {
        match self {
            Dialer::Single(client) => {
                ConnectionManager::new_lazy_with_config(client.clone(), manager_config(timeout))
                    .map(Conn::Single)
            }
            Dialer::Sentinel(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout.max(Duration::from_secs(1))))
                    .set_response_timeout(Some(timeout.max(Duration::from_millis(500))));
                let mut client = client.lock().await;
                client
                    .get_async_connection_with_config(&config)
                    .await
                    .map(Conn::Sentinel)
            }
            Dialer::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
        }
    }
}

/// The connection in use, and whether a dial is under way.
#[derive(Default)]
struct ConnSlot {
    conn: Option<Conn>,
    dialing: bool,
}

/// Fleet-wide rate limits and connection caps in Redis. Cheap to share
/// (`Arc`); all methods take `&self`.
pub struct SharedLimiter {
    dialer: Arc<Dialer>,
    addr: String,
    prefix: String,
    timeout: Duration,
    on_error: OnError,
    lease_ttl: Duration,
    /// The connection, made on first use (needs a Tokio runtime) and
    /// replaced after a long outage (or, behind Sentinel, after any
    /// connection error). Cloned out under the lock; the lock is never held
    /// across an await.
    conn: Arc<Mutex<ConnSlot>>,
    /// Woken when a background dial ends.
    dialed: Arc<tokio::sync::Notify>,
    gcra: Script,
    acquire: Script,
    renew: Script,
    release: Script,
    pub(crate) breaker_scripts: crate::guard::breaker::SharedScripts,
    health: Health,
    /// This replica's live leases: lease-set key -> lease ids.
    leases: Mutex<HashMap<String, HashSet<String>>>,
    /// Makes lease ids unique across replicas and restarts.
    instance: u64,
    next_lease: AtomicU64,
    renewer_started: AtomicBool,
    /// Where dropped guards' releases run (shutdown waits for them).
    tracker: Option<TaskTracker>,
}

struct Health {
    epoch: Instant,
    down: AtomicBool,
    errors: AtomicU64,
    /// Milliseconds since `epoch`.
    down_since: AtomicU64,
    next_probe: AtomicU64,
    last_rebuild: AtomicU64,
}

impl fmt::Debug for SharedLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedLimiter")
            .field("redis", &self.addr)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .field("down", &self.is_down())
            .field("errors", &self.errors())
            .finish()
    }
}

impl SharedLimiter {
    /// Does not connect: the connection is made on first use and managed
    /// (reconnected) from then on, so Redis being down at start-up is an
    /// outage like any other. Fails only on a bad target (which
    /// [`validate_target`] reports at policy load) or a zero timeout.
    pub fn new(settings: SharedSettings) -> Result<SharedLimiter, String> {
        if settings.timeout.is_zero() {
            return Err("timeout must be above zero".to_string());
        }
        let dialer = dialer(&settings.target, settings.timeout)?;
        let addr = format!("{:?}", settings.target);
        Ok(SharedLimiter {
            dialer: Arc::new(dialer),
            addr,
            prefix: settings.prefix,
            timeout: settings.timeout,
            on_error: settings.on_error,
            lease_ttl: DEFAULT_LEASE_TTL,
            conn: Arc::new(Mutex::new(ConnSlot::default())),
            dialed: Arc::new(tokio::sync::Notify::new()),
            gcra: Script::new(GCRA_LUA),
            acquire: Script::new(ACQUIRE_LUA),
            renew: Script::new(RENEW_LUA),
            release: Script::new(RELEASE_LUA),
            breaker_scripts: crate::guard::breaker::SharedScripts::new(),
            health: Health {
                epoch: Instant::now(),
                down: AtomicBool::new(false),
                errors: AtomicU64::new(0),
                down_since: AtomicU64::new(0),
                next_probe: AtomicU64::new(0),
                last_rebuild: AtomicU64::new(0),
            },
            leases: Mutex::new(HashMap::new()),
            instance: rand::random(),
            next_lease: AtomicU64::new(0),
            renewer_started: AtomicBool::new(false),
            tracker: None,
        })
    }

    /// Starts connecting now (in the background, on the current runtime),
    /// so the first handshakes do not fall to `on_error` while a Sentinel
    /// lookup or a Cluster's slot map is under way.
    pub fn warm_up(&self) {
        let _ = self.start_dial();
    }

    /// Lifetime of connection-slot leases (default [`DEFAULT_LEASE_TTL`],
    /// at least 1 s); live ones are renewed every third of it.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> SharedLimiter {
        self.lease_ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// Releases of dropped [`SharedSlot`]s run on `tracker`.
    pub fn with_tracker(mut self, tracker: TaskTracker) -> SharedLimiter {
        self.tracker = Some(tracker);
        self
    }

    pub fn on_error(&self) -> OnError {
        self.on_error
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The Redis key for a limiter key: `{prefix}:{key}`.
    pub fn full_key(&self, key: &str) -> String {
        format!("{}:{}", self.prefix, key)
    }

    /// The lease set of a connection-cap key: `{prefix}:lease:{key}` (a
    /// sorted set; not the plain counter earlier versions kept under
    /// `{prefix}:{key}`, so the two never collide during a rolling upgrade).
    pub fn lease_key(&self, key: &str) -> String {
        format!("{}:lease:{}", self.prefix, key)
    }

    /// Checks one cell against `rate` for `key` (e.g. `hs:ip:1.2.3.4`).
    /// Bounded by the timeout; never panics.
    pub async fn check(&self, key: &str, rate: &Rate) -> Decision {
        let full = self.full_key(key);
        // Fractional microseconds are kept; below 1 ns per cell a shared
        // limit is meaningless anyway.
        let interval_us = (rate.period().as_secs_f64() * 1e6).max(0.001);
        let interval = format!("{interval_us:.3}");
        let burst = rate.burst.get();
        let reply = self
            .call(|mut conn| async move {
                self.gcra
                    .key(&full)
                    .arg(interval)
                    .arg(burst)
                    .invoke_async::<Vec<i64>>(&mut conn)
                    .await
            })
            .await;
        match reply {
            Ok(v) => match v.as_slice() {
                [1, _] => Decision::Allow,
                [0, wait_us] => Decision::Deny {
                    retry_after: Duration::from_micros(u64::try_from(*wait_us).unwrap_or(0)),
                },
                _ => {
                    self.failed(CallError::Reply(v));
                    Decision::Unavailable
                }
            },
            Err(()) => Decision::Unavailable,
        }
    }

    /// Takes one of `cap` fleet-wide slots for `key` (e.g. `conn:sub:alice`)
    /// as a lease, renewed while the returned guard lives and released when
    /// it is released or dropped. `Err` carries the `Deny { retry_after:
    /// 1s }` at the cap, or `Unavailable`.
    pub async fn acquire_slot_guard(
        self: &Arc<Self>,
        key: &str,
        cap: u32,
    ) -> Result<SharedSlot, Decision> {
        if cap == 0 {
            return Err(Decision::Deny {
                retry_after: SLOT_RETRY_AFTER,
            });
        }
        let set = self.lease_key(key);
        let lease = format!(
            "{:016x}-{}",
            self.instance,
            self.next_lease.fetch_add(1, Ordering::Relaxed)
        );
        let ttl_ms = ms(self.lease_ttl);
        let reply = self
            .call(|mut conn| {
                let (set, lease) = (&set, &lease);
                async move {
                    self.acquire
                        .key(set)
                        .arg(cap)
                        .arg(ttl_ms)
                        .arg(lease)
                        .invoke_async::<i64>(&mut conn)
                        .await
                }
            })
            .await;
        match reply {
            Ok(1) => {
                self.leases
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(set.clone())
                    .or_default()
                    .insert(lease.clone());
                self.start_renewer();
                Ok(SharedSlot {
                    limiter: Arc::clone(self),
                    lease: Some((set, lease)),
                })
            }
            Ok(_) => Err(Decision::Deny {
                retry_after: SLOT_RETRY_AFTER,
            }),
            Err(()) => Err(Decision::Unavailable),
        }
    }

    /// Removes a lease: from this replica's renewals at once, from Redis
    /// within the timeout. Best effort: if Redis is unavailable the lease
    /// expires on its own.
    async fn release_lease(&self, set: &str, lease: &str) {
        self.forget_lease(set, lease);
        let _ = self
            .call(|mut conn| async move {
                self.release
                    .key(set)
                    .arg(lease)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
    }

    fn forget_lease(&self, set: &str, lease: &str) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ids) = leases.get_mut(set) {
            ids.remove(lease);
            if ids.is_empty() {
                leases.remove(set);
            }
        }
    }

    /// Runs `work` on the limiter's task tracker (so a graceful shutdown
    /// waits for it), or untracked without one; outside a runtime it is
    /// dropped (what it would have released expires on its own).
    pub(crate) fn spawn_tracked(
        &self,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        match (&self.tracker, tokio::runtime::Handle::try_current()) {
            (Some(tracker), Ok(handle)) => {
                tracker.spawn_on(work, &handle);
            }
            (None, Ok(handle)) => {
                handle.spawn(work);
            }
            (_, Err(_)) => {
                tracing::debug!("shared limits: release outside a runtime; it expires on its own")
            }
        }
    }

    /// This replica's live leases (for tests and the debug log).
    pub fn live_leases(&self) -> usize {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(HashSet::len)
            .sum()
    }

    /// One renewal task per limiter, started with the first lease; it ends
    /// when the limiter is dropped (a reload that changes the settings).
    fn start_renewer(self: &Arc<Self>) {
        if self.renewer_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.renewer_started.store(false, Ordering::Relaxed);
            return;
        };
        let weak: Weak<SharedLimiter> = Arc::downgrade(self);
        let every = self.lease_ttl / 3;
        handle.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(limiter) = weak.upgrade() else {
                    return;
                };
                limiter.renew_all().await;
            }
        });
    }

    /// Renews every live lease of this replica: one call per lease set.
    async fn renew_all(&self) {
        let snapshot: Vec<(String, Vec<String>)> = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, ids)| (k.clone(), ids.iter().cloned().collect()))
            .collect();
        for (set, ids) in snapshot {
            let Some(missing) = self.renew_leases(&set, &ids, false).await else {
                continue;
            };
            // Lapsed (not released: a release forgets the lease here
            // first): put back those this replica still holds.
            let live: Vec<String> = {
                let leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
                missing
                    .into_iter()
                    .filter(|id| leases.get(&set).is_some_and(|l| l.contains(id)))
                    .collect()
            };
            if !live.is_empty() {
                tracing::debug!(
                    leases = live.len(),
                    "shared limits: putting back lapsed leases"
                );
                let _ = self.renew_leases(&set, &live, true).await;
            }
        }
    }

    /// One renewal call; the ids that were not there (None on an error).
    async fn renew_leases(&self, set: &str, ids: &[String], put_back: bool) -> Option<Vec<String>> {
        let ttl_ms = ms(self.lease_ttl);
        self.call(|mut conn| async move {
            let mut inv = self.renew.key(set);
            inv.arg(ttl_ms).arg(if put_back { "1" } else { "0" });
            for id in ids {
                inv.arg(id);
            }
            inv.invoke_async::<Vec<String>>(&mut conn).await
        })
        .await
        .ok()
    }

    /// Calls answered `Unavailable` since start (failures, timeouts, and
    /// calls short-circuited while down).
    pub fn errors(&self) -> u64 {
        self.health.errors.load(Ordering::Relaxed)
    }

    /// True from the first failed call until the next successful one.
    pub fn is_down(&self) -> bool {
        self.health.down.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.health.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs one Redis operation under the timeout, with health bookkeeping.
    pub(crate) async fn call<T, F, Fut>(&self, op: F) -> Result<T, ()>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if self.is_down() && !self.take_probe() {
            self.health.errors.fetch_add(1, Ordering::Relaxed);
            return Err(());
        }
        let started = self.now_ms();
        let attempt = async {
            let conn = self.connection().await?;
            op(conn).await.map_err(CallError::Redis)
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(v)) => {
                self.succeeded(started);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.failed(e);
                Err(())
            }
            Err(_) => {
                self.failed(CallError::Timeout(self.timeout));
                Err(())
            }
        }
    }

    /// While down: true for the one caller per [`PROBE_INTERVAL`] that may
    /// try Redis.
    fn take_probe(&self) -> bool {
        let now = self.now_ms();
        let next = self.health.next_probe.load(Ordering::Relaxed);
        now >= next
            && self
                .health
                .next_probe
                .compare_exchange(
                    next,
                    now + ms(PROBE_INTERVAL),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// The connection in use; without one, starts a dial in the background
    /// (at most one at a time) and waits for it (the caller's timeout
    /// bounds the wait).
    async fn connection(&self) -> Result<Conn, CallError> {
        let notified = self.dialed.notified();
        tokio::pin!(notified);
        // Registered before the dial can finish, so its wake-up is not lost.
        notified.as_mut().enable();
        if self.start_dial()? {
            return self
                .current()
                .ok_or_else(|| CallError::Setup("no connection".into()));
        }
        notified.await;
        self.current()
            .ok_or_else(|| CallError::Setup("could not connect".to_string()))
    }

    fn current(&self) -> Option<Conn> {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .conn
            .clone()
    }

    /// True when a connection is there (or was made at once); false when
    /// a dial is under way.
    fn start_dial(&self) -> Result<bool, CallError> {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if slot.conn.is_some() {
            return Ok(true);
        }
        // The dial and the managed connections' reconnect tasks run on the
        // current runtime.
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| CallError::Setup("not inside a Tokio runtime".to_string()))?;
        let scripts = [
            self.gcra.clone(),
            self.acquire.clone(),
            self.renew.clone(),
            self.release.clone(),
        ]
        .into_iter()
        .chain(self.breaker_scripts.all())
        .collect::<Vec<_>>();
        if let Dialer::Single(client) = &*self.dialer {
            // Lazy: connects on first use, so it can be stored at once; the
            // scripts are loaded in the background, so the first real call
            // does not pay for both within its timeout.
            let conn = Conn::Single(ConnectionManager::new_lazy_with_config(
                client.clone(),
                manager_config(self.timeout),
            )?);
            slot.conn = Some(conn.clone());
            drop(slot);
            handle.spawn(preload(conn, scripts));
            return Ok(true);
        }
        if slot.dialing {
            return Ok(false);
        }
        slot.dialing = true;
        drop(slot);
        let (dialer, state, dialed) = (
            Arc::clone(&self.dialer),
            Arc::clone(&self.conn),
            Arc::clone(&self.dialed),
        );
        let timeout = self.timeout;
        let addr = self.addr.clone();
        handle.spawn(async move {
            let conn = match tokio::time::timeout(WARM_UP_LIMIT, dialer.dial(timeout)).await {
                Ok(Ok(c)) => Some(c),
                Ok(Err(e)) => {
                    tracing::debug!(redis = %addr, error = %e, "shared limits: connecting failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(redis = %addr, "shared limits: connecting timed out");
                    None
                }
            };
            if let Some(c) = &conn {
                preload(c.clone(), scripts).await;
            }
            {
                let mut slot = state.lock().unwrap_or_else(|e| e.into_inner());
                slot.dialing = false;
                if conn.is_some() {
                    slot.conn = conn;
                }
            }
            dialed.notify_waiters();
        });
        Ok(false)
    }

    /// Throws the connection away; the next call dials a new one.
    fn drop_connection(&self) {
        let old = self
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .conn
            .take();
        drop(old);
    }

    /// A call that `started` (ms since epoch) got an answer. Only a call
    /// started after the outage began ends it: a straggler sent before the
    /// failure proves nothing.
    fn succeeded(&self, started: u64) {
        if !self.health.down.load(Ordering::Relaxed) {
            return;
        }
        let since = self.health.down_since.load(Ordering::Relaxed);
        if started > since && self.health.down.swap(false, Ordering::Relaxed) {
            tracing::info!(
                redis = %self.addr,
                outage_ms = self.now_ms().saturating_sub(since),
                errors_total = self.errors(),
                "shared limits: Redis reachable again, shared limits enforced"
            );
        }
    }

    fn failed(&self, err: CallError) {
        self.health.errors.fetch_add(1, Ordering::Relaxed);
        // Behind Sentinel a broken connection or a demoted primary means
        // "ask the sentinels again", at once.
        if matches!(&*self.dialer, Dialer::Sentinel(_)) {
            if let CallError::Redis(e) = &err {
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                {
                    self.drop_connection();
                }
            }
        }
        let now = self.now_ms();
        if !self.health.down.load(Ordering::Relaxed) {
            self.health.down_since.store(now, Ordering::Relaxed);
            self.health
                .next_probe
                .store(now + ms(PROBE_INTERVAL), Ordering::Relaxed);
            if !self.health.down.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    redis = %self.addr,
                    error = %err,
                    on_error = ?self.on_error,
                    "shared limits: Redis unavailable, applying on_error until it recovers"
                );
            }
            return;
        }
        tracing::debug!(redis = %self.addr, error = %err, "shared limits: Redis call failed");
        let since = self.health.down_since.load(Ordering::Relaxed);
        let last = self.health.last_rebuild.load(Ordering::Relaxed);
        if now.saturating_sub(since) >= ms(REBUILD_AFTER)
            && now.saturating_sub(last) >= ms(REBUILD_AFTER)
            && self
                .health
                .last_rebuild
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // Dropping the connection closes it; the next call dials a
            // fresh one.
            self.drop_connection();
            tracing::debug!(redis = %self.addr, "shared limits: dropped the Redis connection to redial");
        }
    }
}

/// Loads the scripts, so the first calls find them (bounded; a failure
/// only costs a `NOSCRIPT` round trip later).
async fn preload(mut conn: Conn, scripts: Vec<Script>) {
    let load = async {
        for s in scripts {
            s.prepare_invoke().load_async(&mut conn).await?;
        }
        Ok::<(), redis::RedisError>(())
    };
    match tokio::time::timeout(WARM_UP_LIMIT, load).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "shared limits: preloading scripts failed"),
        Err(_) => tracing::debug!("shared limits: preloading scripts timed out"),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A fleet-wide connection slot (a lease, renewed while this lives).
/// Release it with [`SharedSlot::release`] before the session's task ends;
/// a dropped guard releases from a task on the limiter's tracker.
pub struct SharedSlot {
    limiter: Arc<SharedLimiter>,
    /// (lease set, lease id)
    lease: Option<(String, String)>,
}

impl SharedSlot {
    /// Releases now and waits for Redis (bounded by the timeout).
    pub async fn release(mut self) {
        if let Some((set, lease)) = self.lease.take() {
            self.limiter.release_lease(&set, &lease).await;
        }
    }
}

impl Drop for SharedSlot {
    fn drop(&mut self) {
        let Some((set, lease)) = self.lease.take() else {
            return;
        };
        // No longer renewed, whatever happens next.
        self.limiter.forget_lease(&set, &lease);
        let limiter = Arc::clone(&self.limiter);
        self.limiter
            .spawn_tracked(async move { limiter.release_lease(&set, &lease).await });
    }
}
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::AtomicUsize;

    // ---- a private redis-server per test -------------------------------

    /// A redis-server child process on its own port; killed (by PID) on drop.
    struct RedisServer {
        child: Option<Child>,
        port: u16,
    }

    /// False (with a message) only when the redis-server binary is absent.
    fn redis_available() -> bool {
        match Command::new("redis-server").arg("--version").output() {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!(
                    "SKIPPED: redis-server is not installed (apt-get install -y redis-server); \
                     the shared-limit tests need a real Redis"
                );
                false
            }
            Err(e) => panic!("cannot run redis-server: {e}"),
        }
    }

    /// A random port for a test's own redis-server. Redis cannot bind port
    /// 0 (that turns TCP off) and a port bound and dropped here could be
    /// taken again before Redis binds it, so a random one is tried and, if
    /// it is taken (Redis exits), another.
    fn random_port() -> u16 {
        20_000 + rand::random::<u16>() % 30_000
    }

    impl RedisServer {
        fn start() -> Option<RedisServer> {
            if !redis_available() {
                return None;
            }
            for _ in 0..20 {
                if let Some(s) = RedisServer::start_on(random_port()) {
                    return Some(s);
                }
            }
            panic!("could not start redis-server on a free port");
        }

        /// Starts on `port`; `None` if it did not come up (port taken).
        fn start_on(port: u16) -> Option<RedisServer> {
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--bind", "127.0.0.1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut server = RedisServer {
                child: Some(child),
                port,
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if server.ping() {
                    return Some(server);
                }
                if let Some(c) = server.child.as_mut() {
                    if let Ok(Some(_)) = c.try_wait() {
                        // Exited: most likely the port was taken.
                        server.child = None;
                        return None;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            server.stop();
            None
        }

        fn ping(&self) -> bool {
            use std::io::{Read, Write};
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 7];
            s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut buf).is_ok()
                && &buf == b"+PONG\r\n"
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/", self.port)
        }

        /// SIGKILL by PID, then reap: a crash, not a clean shutdown.
        fn stop(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        async fn conn(&self) -> redis::aio::MultiplexedConnection {
            Client::open(self.url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap()
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            self.stop();
        }
    }

    // ---- helpers --------------------------------------------------------

    fn rate(count: u32, per_s: u64, burst: u32) -> Rate {
        Rate {
            count: NonZeroU32::new(count).unwrap(),
            per: Duration::from_secs(per_s),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    fn settings(url: &str, prefix: &str) -> SharedSettings {
        SharedSettings {
            target: RedisTarget::Url(url.to_string()),
            prefix: prefix.to_string(),
            timeout: Duration::from_millis(50),
            on_error: OnError::Local,
        }
    }

    fn limiter(url: &str, prefix: &str) -> SharedLimiter {
        SharedLimiter::new(settings(url, prefix)).unwrap()
    }

    /// First call after construction dials; give it a generous first try
    /// so a slow CI box does not turn the dial into a test failure.
    async fn warm(l: &SharedLimiter) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if l.check("warmup", &rate(1_000_000, 1, 1_000_000)).await == Decision::Allow {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("limiter never reached redis");
    }

    /// Counts this module's warn/info events (to check "log once").
    #[derive(Default)]
    struct LogCounts {
        warn: AtomicUsize,
        info: AtomicUsize,
    }

    struct CountingSubscriber(Arc<LogCounts>);

    impl tracing::Subscriber for CountingSubscriber {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, e: &tracing::Event<'_>) {
            if !e.metadata().target().ends_with("redis_limits") {
                return;
            }
            match *e.metadata().level() {
                tracing::Level::WARN => self.0.warn.fetch_add(1, Ordering::SeqCst),
                tracing::Level::INFO => self.0.info.fetch_add(1, Ordering::SeqCst),
                _ => 0,
            };
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    // ---- tests ----------------------------------------------------------

    #[test]
    fn futures_are_send_and_new_needs_no_runtime() {
        fn assert_send<T: Send>(_: &T) {}
        // Built outside any runtime (policy load may be synchronous).
        let l = limiter("redis://127.0.0.1:1/", "x");
        let r = rate(1, 1, 1);
        let f = l.check("k", &r);
        assert_send(&f);
        drop(f);
        let l = Arc::new(l);
        let f = l.acquire_slot_guard("k", 1);
        assert_send(&f);
        drop(f);
        let f = l.release_lease("k", "1");
        assert_send(&f);
        drop(f);
        assert!(SharedLimiter::new(SharedSettings {
            timeout: Duration::ZERO,
            ..settings("redis://127.0.0.1/", "x")
        })
        .is_err());
    }

    #[test]
    fn validate_url_accepts_redis_and_hides_secrets() {
        assert_eq!(validate_url("redis://127.0.0.1:6379"), Ok(()));
        assert_eq!(
            validate_url("redis://:s3cret@redis.internal:6380/2"),
            Ok(())
        );
        assert_eq!(validate_url("redis+unix:///run/redis.sock"), Ok(()));
        for bad in [
            "http://:s3cret@example.com/",
            "not a url s3cret",
            "rediss://:s3cret@redis.internal/", // TLS is not built in
            "",
        ] {
            let e = validate_url(bad).unwrap_err();
            assert!(!e.contains("s3cret"), "{bad}: {e}");
            assert!(SharedLimiter::new(settings(bad, "x")).is_err(), "{bad}");
        }
        let s = settings("redis://:s3cret@redis.internal:6380/2", "x");
        let dbg = format!("{s:?} {:?}", SharedLimiter::new(s.clone()).unwrap());
        assert!(
            !dbg.contains("s3cret") && dbg.contains("redis.internal:6380"),
            "{dbg}"
        );
    }

    #[test]
    fn resolve_applies_on_error() {
        let deny = Decision::Deny {
            retry_after: Duration::from_millis(11_200),
        };
        let never = || -> Result<(), u64> { panic!("local limiter must not be consulted") };
        for mode in [OnError::Local, OnError::Allow, OnError::Deny] {
            assert_eq!(resolve(Decision::Allow, mode, never), Ok(()));
            assert_eq!(resolve(deny, mode, never), Err(12));
            assert_eq!(
                resolve(
                    Decision::Deny {
                        retry_after: Duration::from_millis(1)
                    },
                    mode,
                    never
                ),
                Err(1)
            );
        }
        let u = Decision::Unavailable;
        assert_eq!(resolve(u, OnError::Local, || Ok(())), Ok(()));
        assert_eq!(resolve(u, OnError::Local, || Err(7)), Err(7));
        assert_eq!(resolve(u, OnError::Allow, never), Ok(()));
        assert_eq!(
            resolve(u, OnError::Deny, never),
            Err(UNAVAILABLE_RETRY_SECS)
        );
        assert_eq!(verdict(u, OnError::Deny, never), Verdict::Unavailable);
        assert_eq!(
            verdict(u, OnError::Local, || Err(3)),
            Verdict::Limited {
                retry_after_secs: 3
            }
        );
        assert_eq!(
            verdict(deny, OnError::Deny, never),
            Verdict::Limited {
                retry_after_secs: 12
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_replicas_share_one_bucket() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let a = Arc::new(limiter(&server.url(), "wsguard"));
        let b = Arc::new(limiter(&server.url(), "wsguard"));
        warm(&a).await;
        warm(&b).await;

        // 1/min, burst 5: five cells across both replicas, then a wait of
        // one period (60 s), as the local governor limiter would answer.
        let r = rate(1, 60, 5);
        let mut allowed = 0;
        let mut first_deny = None;
        for i in 0..10 {
            let l = if i % 2 == 0 { &a } else { &b };
            match l.check("hs:ip:1.2.3.4", &r).await {
                Decision::Allow => allowed += 1,
                Decision::Deny { retry_after } => {
                    assert_eq!(allowed, 5, "denied before the burst was used");
                    first_deny.get_or_insert(retry_after);
                }
                Decision::Unavailable => panic!("redis is up"),
            }
        }
        assert_eq!(allowed, 5);
        let wait = first_deny.unwrap();
        assert!(
            wait > Duration::from_secs(59) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert_eq!(
            resolve(Decision::Deny { retry_after: wait }, OnError::Local, || Ok(
                ()
            )),
            Err(60)
        );

        // 5/min, burst 5: the 6th waits one period of 12 s.
        let r = rate(5, 60, 5);
        for i in 0..5 {
            let l = if i % 2 == 0 { &a } else { &b };
            assert_eq!(l.check("hs:ip:5.6.7.8", &r).await, Decision::Allow);
        }
        match b.check("hs:ip:5.6.7.8", &r).await {
            Decision::Deny { retry_after } => assert!(
                retry_after > Duration::from_secs(11) && retry_after <= Duration::from_secs(12),
                "{retry_after:?}"
            ),
            other => panic!("{other:?}"),
        }

        // Atomic under concurrency: 100 racing checks, 5 pass.
        let r = rate(1, 60, 5);
        let mut tasks = Vec::new();
        for i in 0..100 {
            let l = Arc::clone(if i % 2 == 0 { &a } else { &b });
            tasks.push(tokio::spawn(
                async move { l.check("hs:ip:9.9.9.9", &r).await },
            ));
        }
        let mut allowed = 0;
        for t in tasks {
            match t.await.unwrap() {
                Decision::Allow => allowed += 1,
                Decision::Deny { .. } => {}
                Decision::Unavailable => panic!("redis is up"),
            }
        }
        assert_eq!(allowed, 5);
        assert_eq!(a.errors() + b.errors(), 0);
    }

    #[tokio::test]
    async fn bucket_refills_with_time() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let l = limiter(&server.url(), "wsguard");
        warm(&l).await;
        // 10/s, burst 2: one cell back every 100 ms.
        let r = rate(10, 1, 2);
        assert_eq!(l.check("k", &r).await, Decision::Allow);
        assert_eq!(l.check("k", &r).await, Decision::Allow);
        let Decision::Deny { retry_after } = l.check("k", &r).await else {
            panic!("third call should be limited")
        };
        assert!(retry_after <= Duration::from_millis(100), "{retry_after:?}");
        tokio::time::sleep(retry_after + Duration::from_millis(5)).await;
        assert_eq!(l.check("k", &r).await, Decision::Allow);
        assert!(matches!(l.check("k", &r).await, Decision::Deny { .. }));
    }

    #[tokio::test]
    async fn prefixes_are_independent() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let a = limiter(&server.url(), "blue");
        let b = limiter(&server.url(), "green");
        warm(&a).await;
        warm(&b).await;
        let r = rate(1, 60, 2);
        for l in [&a, &b] {
            assert_eq!(l.check("hs:ip:1.2.3.4", &r).await, Decision::Allow);
            assert_eq!(l.check("hs:ip:1.2.3.4", &r).await, Decision::Allow);
            assert!(matches!(
                l.check("hs:ip:1.2.3.4", &r).await,
                Decision::Deny { .. }
            ));
        }
        let mut c = server.conn().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(keys.contains(&"blue:hs:ip:1.2.3.4".to_string()), "{keys:?}");
        assert!(
            keys.contains(&"green:hs:ip:1.2.3.4".to_string()),
            "{keys:?}"
        );
    }

    #[tokio::test]
    async fn keys_have_bounded_ttls() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let l = limiter(&server.url(), "wsguard");
        warm(&l).await;
        let mut c = server.conn().await;
        let pttl = |k: &'static str| {
            let mut c = c.clone();
            async move {
                redis::cmd("PTTL")
                    .arg(k)
                    .query_async::<i64>(&mut c)
                    .await
                    .unwrap()
            }
        };

        let r = rate(1, 60, 5);
        assert_eq!(l.check("hs:ip:1.1.1.1", &r).await, Decision::Allow);
        // One cell used: full again in one period.
        let t = pttl("wsguard:hs:ip:1.1.1.1").await;
        assert!(t > 59_000 && t <= 60_000, "{t}");
        for _ in 0..4 {
            assert_eq!(l.check("hs:ip:1.1.1.1", &r).await, Decision::Allow);
        }
        // Five cells used: five periods.
        let t = pttl("wsguard:hs:ip:1.1.1.1").await;
        assert!(t > 299_000 && t <= 300_000, "{t}");
        // A denial does not extend it.
        assert!(matches!(
            l.check("hs:ip:1.1.1.1", &r).await,
            Decision::Deny { .. }
        ));
        assert!(pttl("wsguard:hs:ip:1.1.1.1").await <= t);

        // A short period: the key is gone soon after.
        let fast = Rate {
            count: NonZeroU32::new(1).unwrap(),
            per: Duration::from_millis(100),
            burst: NonZeroU32::new(1).unwrap(),
        };
        assert_eq!(l.check("hs:ip:2.2.2.2", &fast).await, Decision::Allow);
        let t = pttl("wsguard:hs:ip:2.2.2.2").await;
        assert!(t > 0 && t <= 100, "{t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(pttl("wsguard:hs:ip:2.2.2.2").await, -2, "expired");

        // Leases: the set lives as long as its newest lease, and goes
        // with the last one.
        let l = Arc::new(l.with_lease_ttl(Duration::from_secs(90)));
        let g = l.acquire_slot_guard("conn:sub:alice", 3).await.unwrap();
        let t = pttl("wsguard:lease:conn:sub:alice").await;
        assert!(t > 89_000 && t <= 90_000, "{t}");
        g.release().await;
        assert_eq!(
            pttl("wsguard:lease:conn:sub:alice").await,
            -2,
            "deleted with the last lease"
        );
        let _: () = redis::cmd("PING").query_async(&mut c).await.unwrap();
    }

    async fn leases(c: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
        redis::cmd("ZCARD").arg(key).query_async(c).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn slots_are_capped_across_replicas() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let a = Arc::new(limiter(&server.url(), "wsguard"));
        let b = Arc::new(limiter(&server.url(), "wsguard"));
        warm(&a).await;
        warm(&b).await;
        let key = "conn:sub:alice";
        let deny = Decision::Deny {
            retry_after: Duration::from_secs(1),
        };
        let a1 = a.acquire_slot_guard(key, 3).await.unwrap();
        let b1 = b.acquire_slot_guard(key, 3).await.unwrap();
        let a2 = a.acquire_slot_guard(key, 3).await.unwrap();
        assert_eq!(b.acquire_slot_guard(key, 3).await.err(), Some(deny));
        assert_eq!(a.acquire_slot_guard(key, 3).await.err(), Some(deny));
        b1.release().await;
        let b2 = b.acquire_slot_guard(key, 3).await.unwrap();
        assert_eq!(a.acquire_slot_guard(key, 3).await.err(), Some(deny));
        assert_eq!((a.live_leases(), b.live_leases()), (2, 1));
        for g in [a1, a2, b2] {
            g.release().await;
        }
        let mut c = server.conn().await;
        assert_eq!(leases(&mut c, "wsguard:lease:conn:sub:alice").await, 0);
        assert_eq!((a.live_leases(), b.live_leases()), (0, 0));
        assert_eq!(
            a.acquire_slot_guard(key, 0).await.err(),
            Some(deny),
            "cap 0 admits nobody"
        );

        // Racing acquires: exactly the cap.
        let mut tasks = Vec::new();
        for i in 0..40 {
            let l = Arc::clone(if i % 2 == 0 { &a } else { &b });
            tasks.push(tokio::spawn(async move {
                l.acquire_slot_guard("conn:sub:bob", 7).await
            }));
        }
        let mut granted = Vec::new();
        for t in tasks {
            if let Ok(g) = t.await.unwrap() {
                granted.push(g);
            }
        }
        assert_eq!(granted.len(), 7);
        for g in granted {
            g.release().await;
        }

        // The guard releases on drop.
        let g = a.acquire_slot_guard("conn:sub:carol", 1).await.unwrap();
        assert_eq!(
            b.acquire_slot_guard("conn:sub:carol", 1).await.err(),
            Some(deny)
        );
        drop(g);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(g) = b.acquire_slot_guard("conn:sub:carol", 1).await {
                g.release().await;
                break;
            }
            assert!(Instant::now() < deadline, "dropped guard never released");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(leases(&mut c, "wsguard:lease:conn:sub:carol").await, 0);
    }

    /// A lease whose replica vanished (never released, never renewed)
    /// expires on its own, even while the subject keeps connecting through
    /// other replicas; live leases are renewed and outlast their TTL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leaked_leases_expire_live_ones_are_renewed() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let ttl = Duration::from_secs(1);
        let crashed = Arc::new(limiter(&server.url(), "wsguard").with_lease_ttl(ttl));
        let live = Arc::new(limiter(&server.url(), "wsguard").with_lease_ttl(ttl));
        warm(&crashed).await;
        warm(&live).await;
        let key = "conn:sub:dave";
        let set = "wsguard:lease:conn:sub:dave";
        // A crash: the guard is neither released nor renewed.
        let leaked = crashed.acquire_slot_guard(key, 2).await.unwrap();
        std::mem::forget(leaked);
        crashed.leases.lock().unwrap().clear();
        let held = live.acquire_slot_guard(key, 2).await.unwrap();
        let mut c = server.conn().await;
        assert_eq!(leases(&mut c, set).await, 2);
        // The subject keeps trying (at the cap): refusals extend nothing.
        let t = Instant::now();
        loop {
            match live.acquire_slot_guard(key, 2).await {
                Ok(g) => {
                    // The leaked lease is gone: back to one live + this one.
                    assert_eq!(leases(&mut c, set).await, 2);
                    g.release().await;
                    break;
                }
                Err(d) => assert!(matches!(d, Decision::Deny { .. }), "{d:?}"),
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "leaked lease never expired"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // The live lease, renewed every ttl/3, survives several TTLs.
        let until = Instant::now() + 3 * ttl;
        while Instant::now() < until {
            assert_eq!(leases(&mut c, set).await, 1, "a live lease lapsed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A lease Redis lost (an outage longer than the TTL, a failover) is
        // put back by the next renewal.
        let _: () = redis::cmd("DEL")
            .arg(set)
            .query_async(&mut c)
            .await
            .unwrap();
        let t = Instant::now();
        while leases(&mut c, set).await != 1 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "lapsed lease not put back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let id = held.lease.as_ref().unwrap().1.clone();
        held.release().await;
        assert_eq!(leases(&mut c, set).await, 0);
        // A renewal that races the release does not bring it back.
        let missing = live
            .renew_leases(set, std::slice::from_ref(&id), false)
            .await;
        assert_eq!(missing, Some(vec![id]));
        assert_eq!(leases(&mut c, set).await, 0);
    }

    #[tokio::test]
    async fn lost_scripts_are_reloaded() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let l = limiter(&server.url(), "wsguard");
        warm(&l).await;
        let r = rate(1, 60, 3);
        assert_eq!(l.check("k", &r).await, Decision::Allow);
        let mut c = server.conn().await;
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut c)
            .await
            .unwrap();
        // NOSCRIPT is answered by loading the script again, within the call.
        assert_eq!(l.check("k", &r).await, Decision::Allow);
        let l = Arc::new(l);
        l.acquire_slot_guard("s", 1).await.unwrap().release().await;
        assert_eq!(l.errors(), 0);
        assert!(!l.is_down());
    }

    #[tokio::test]
    async fn outage_is_fast_logged_once_and_recovers_after_restart() {
        let Some(mut server) = RedisServer::start() else {
            return;
        };
        let counts = Arc::new(LogCounts::default());
        let _log = tracing::subscriber::set_default(CountingSubscriber(Arc::clone(&counts)));
        let l = Arc::new(limiter(&server.url(), "wsguard"));
        warm(&l).await;
        let r = rate(1, 60, 1000);
        assert_eq!(l.check("k", &r).await, Decision::Allow);
        assert!(!l.is_down());

        // Kill it mid-test.
        server.stop();
        let mut slowest = Duration::ZERO;
        for _ in 0..50 {
            let t = Instant::now();
            let d = l.check("k", &r).await;
            slowest = slowest.max(t.elapsed());
            assert_eq!(d, Decision::Unavailable);
            assert_eq!(
                l.acquire_slot_guard("s", 5).await.err(),
                Some(Decision::Unavailable)
            );
            l.release_lease("wsguard:lease:s", "x").await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            slowest < Duration::from_millis(500),
            "slowest check {slowest:?}"
        );
        assert!(l.is_down());
        assert!(l.errors() >= 150, "{}", l.errors());
        assert_eq!(
            counts.warn.load(Ordering::SeqCst),
            1,
            "one warning per outage"
        );
        assert_eq!(counts.info.load(Ordering::SeqCst), 0);

        // on_error, applied to a real Unavailable.
        let d = l.check("k", &r).await;
        assert_eq!(d, Decision::Unavailable);
        assert_eq!(resolve(d, OnError::Local, || Err(4)), Err(4));
        assert_eq!(resolve(d, OnError::Local, || Ok(())), Ok(()));
        assert_eq!(resolve(d, OnError::Allow, || Err(4)), Ok(()));
        assert_eq!(
            resolve(d, OnError::Deny, || Ok(())),
            Err(UNAVAILABLE_RETRY_SECS)
        );

        // Restart on the same port, empty: no data, no scripts.
        let port = server.port;
        let mut restarted = None;
        for _ in 0..50 {
            restarted = RedisServer::start_on(port);
            if restarted.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let server = restarted.unwrap();
        let mut c = server.conn().await;
        let exists: Vec<i32> = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(l.gcra.get_hash())
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(exists, vec![0], "the restarted server has no scripts");

        let t = Instant::now();
        loop {
            match l.check("k", &r).await {
                Decision::Allow => break,
                Decision::Unavailable => {}
                d => panic!("{d:?}"),
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no recovery");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("recovered {:?} after the restart", t.elapsed());
        assert!(!l.is_down());
        assert_eq!(counts.warn.load(Ordering::SeqCst), 1);
        // At most one info when it ends. (Not exactly one: a thread-local
        // subscriber can miss an event whose callsite another test thread,
        // with no subscriber, registered first: tracing caches interest.)
        assert!(
            counts.info.load(Ordering::SeqCst) <= 1,
            "one info when it ends"
        );
        let errors = l.errors();
        l.acquire_slot_guard("s", 5).await.unwrap().release().await;
        assert_eq!(l.errors(), errors);
    }

    #[tokio::test]
    async fn redis_down_at_start_then_up() {
        if !redis_available() {
            return;
        }
        // A port nothing listens on yet (the server is started on it below;
        // if that port turns out to be taken, the test says so).
        let port = random_port();
        let l = limiter(&format!("redis://127.0.0.1:{port}/"), "wsguard");
        let r = rate(1, 60, 5);
        let t = Instant::now();
        assert_eq!(l.check("k", &r).await, Decision::Unavailable);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        let _server = RedisServer::start_on(port)
            .unwrap_or_else(|| panic!("port {port} was taken meanwhile; rerun"));
        let t = Instant::now();
        while l.check("k", &r).await != Decision::Allow {
            assert!(t.elapsed() < Duration::from_secs(10), "no recovery");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!l.is_down());
    }

    /// A peer that accepts and never answers (a silently dead connection):
    /// calls still end within the timeout, and the connection is redialled.
    #[tokio::test]
    async fn hung_redis_times_out_and_is_redialled() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acc = Arc::clone(&accepted);
        let black_hole = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        let l = limiter(&format!("redis://127.0.0.1:{port}/"), "wsguard");
        let r = rate(1, 60, 5);
        let start = Instant::now();
        let mut slowest = Duration::ZERO;
        while start.elapsed() < Duration::from_millis(3500) {
            let t = Instant::now();
            assert_eq!(l.check("k", &r).await, Decision::Unavailable);
            slowest = slowest.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(slowest < Duration::from_millis(500), "{slowest:?}");
        assert!(l.is_down());
        assert!(
            accepted.load(Ordering::SeqCst) >= 2,
            "redialled: {} connections",
            accepted.load(Ordering::SeqCst)
        );
        black_hole.abort();
    }

    /// Rough throughput: `cargo test --release -- --ignored throughput --nocapture`.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore]
    async fn throughput_50_tasks() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let l = Arc::new(limiter(&server.url(), "bench"));
        warm(&l).await;
        let r = rate(1_000_000, 1, 1_000_000);
        let run_for = Duration::from_secs(3);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..50 {
            let l = Arc::clone(&l);
            tasks.push(tokio::spawn(async move {
                let key = format!("hs:ip:10.0.0.{i}");
                let mut n = 0u64;
                while start.elapsed() < run_for {
                    assert_ne!(l.check(&key, &r).await, Decision::Unavailable);
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "throughput: {total} checks in {secs:.2}s = {:.0} checks/s (50 tasks, errors {})",
            total as f64 / secs,
            l.errors()
        );
    }
}
