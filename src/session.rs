//! One proxied session after both upgrades: two message pumps and the
//! keepalive, in a single task.
//!
//! Each direction is its own pump future so that a slow reader on one side
//! only slows the sender on the other (backpressure: a pump awaits the
//! write before it reads the next message), while the other direction keeps
//! flowing. Both pumps run in one task to keep per-session memory small.
//! When either pump ends (or shutdown, idle timeout, keepalive death), the
//! other is dropped and [`finish`] closes both sides with the right codes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::config::{Mode, OnFailure};
use crate::gate::Gated;
use crate::guard::limits::{ConnSlot, MessageLimiter, SubjectLimiter};
use crate::keepalive::{self, Liveness, Tick};
use crate::metrics::{CloseLabel, ReasonLabel};
use crate::policy::{Hmac, Route};
use crate::pongs::{PongFilter, PongPasses};
use crate::runtime::{Runtime, Shared};
use crate::sign::{self, Direction, MsgType, SeqState};

/// How long to wait for the peer's half of a close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How long to try to tell a dead peer we are closing.
const DEAD_PEER_WAIT: Duration = Duration::from_millis(500);

/// Close code 1014 (Bad Gateway, IANA-registered) for "the backend failed".
/// tungstenite has no name for it.
const BAD_GATEWAY: u16 = 1014;

/// Everything a session needs from the handshake.
pub struct SessionInfo {
    /// Index of the route in the session's policy generation.
    pub route: usize,
    /// JWT `sub`, for per-subject message limits.
    pub subject: Option<String>,
    /// The `hmac.bind_claim` value bound into every signature ("" if none).
    pub bind: String,
    /// Claim values for derived client keys (`derive: CLAIM`).
    pub derive: sign::DeriveInputs,
    /// `close_on_expiry`: when the token's exp (plus leeway) passes.
    pub expires: Option<Instant>,
    pub subject_slot: Option<ConnSlot<String>>,
    /// A fleet-wide per-subject slot in Redis; released on drop.
    pub shared_slot: Option<crate::guard::shared::SharedSlot>,
    pub peer: SocketAddr,
    pub path: String,
    pub request_id: String,
    pub slot: ConnSlot,
}

/// Why the relay loop stopped.
#[derive(Debug)]
enum End {
    ClientClosed(Option<CloseFrame>),
    UpstreamClosed(Option<CloseFrame>),
    /// TCP gone or reset without a close frame.
    ClientGone,
    UpstreamGone,
    /// The client broke the protocol or a limit: (code, reason).
    ClientViolation(u16, &'static str),
    UpstreamViolation(u16, &'static str),
    /// A guard closed the session (signature failure, rate limit): 1008.
    Policy(&'static str, &'static str),
    ClientDead,
    UpstreamDead,
    Idle,
    /// `limits.max_session_duration` passed: 1001 "session too long".
    TooLong,
    /// SIGTERM drain, with the client's close code (`shutdown_close_code`).
    Shutdown(u16),
}

/// Which of a session's wall-clock ends comes first.
#[derive(Clone, Copy)]
enum Timed {
    TokenExpired,
    TooLong,
}

/// The earlier of the token's expiry and the session's duration limit, so
/// that every session's future holds one timer, not two. On a tie the token
/// wins: its 1008 tells the client to fetch a new one before reconnecting.
fn first_deadline(expires: Option<Instant>, too_long: Option<Instant>) -> Option<(Instant, Timed)> {
    match (expires, too_long) {
        (Some(e), Some(t)) if t < e => Some((t, Timed::TooLong)),
        (Some(e), _) => Some((e, Timed::TokenExpired)),
        (None, Some(t)) => Some((t, Timed::TooLong)),
        (None, None) => None,
    }
}

/// State the two pumps share. Atomics, because both pumps live in one
/// task but must be `Send`.
struct Pumps<'a> {
    route: &'a Route,
    bind: &'a str,
    /// The token claim values this session's derived client keys need.
    derive: &'a sign::DeriveInputs,
    subject: Option<(&'a str, &'a SubjectLimiter)>,
    shared: &'a Shared,
    start: Instant,
    client_live: Liveness,
    upstream_live: Liveness,
    /// Passes for the pongs relayed to each hop: every other pong written
    /// there (tungstenite's automatic answers) is dropped, so a ping is
    /// answered by the far end of the session, once.
    client_pongs: PongPasses,
    upstream_pongs: PongPasses,
    last_data_ms: AtomicU64,
    /// True while a pump waits for its peer to take a message. A side we
    /// are not reading from cannot prove liveness, so its keepalive verdict
    /// is suspended; the stalled write has its own deadline instead.
    c2u_blocked: AtomicBool,
    u2c_blocked: AtomicBool,
    msgs: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    limiter: Option<MessageLimiter>,
}

impl Pumps<'_> {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_data_ms.store(ms, Relaxed);
    }

    fn sig_failure(&self, reason: &'static str) {
        self.shared
            .metrics
            .signature_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// Maps a read error from the client to the contract's close code.
fn violation(e: &WsError) -> Option<(u16, &'static str)> {
    match e {
        WsError::Capacity(_) => Some((1009, "message too big")),
        WsError::Utf8(_) => Some((1007, "invalid utf-8")),
        WsError::Protocol(
            ProtocolError::ResetWithoutClosingHandshake
            | ProtocolError::SendAfterClosing
            | ProtocolError::ReceivedAfterClosing,
        ) => None,
        WsError::Protocol(_) => Some((1002, "protocol error")),
        _ => None,
    }
}

enum Signed {
    Forward(Message),
    Drop,
    Close(sign::SigFailure),
}

/// Verifies one data message and re-signs it for the next hop.
#[allow(clippy::too_many_arguments)]
fn resign(
    h: &Hmac,
    p: &Pumps<'_>,
    dir: Direction,
    verify: bool,
    verify_keys: &[sign::Key],
    sign_key: &sign::Key,
    state: &mut SeqState,
    out_seq: &mut u64,
    msg: Message,
) -> Signed {
    let (raw, ty): (Bytes, MsgType) = match msg {
        Message::Text(t) => (Bytes::from(t), MsgType::Text),
        Message::Binary(b) => (b, MsgType::Binary),
        other => return Signed::Forward(other),
    };
    let skew = u64::try_from(h.max_skew.as_millis()).unwrap_or(u64::MAX);
    let now = sign::now_ms();
    let outcome = if verify {
        sign::verify(verify_keys, dir, p.bind, ty, &raw, now, skew, state).map(|pl| pl.len())
    } else {
        // Trusted backend: strip its envelope without checking it.
        sign::parse(&raw).map(|env| env.payload.len())
    };
    let build = |payload: Bytes, signed: bool, out_seq: &mut u64| -> Option<Message> {
        let data = if signed {
            *out_seq += 1;
            Bytes::from(sign::sign(
                sign_key, dir, *out_seq, now, p.bind, ty, &payload,
            ))
        } else {
            payload
        };
        match ty {
            MsgType::Text => Utf8Bytes::try_from(data).ok().map(Message::Text),
            MsgType::Binary => Some(Message::Binary(data)),
        }
    };
    match outcome {
        Ok(len) => {
            let payload = raw.slice(raw.len() - len..);
            build(payload, true, out_seq).map_or(Signed::Drop, Signed::Forward)
        }
        Err(failure) => {
            let reason = failure.label();
            p.sig_failure(reason);
            if h.mode == Mode::Report {
                tracing::info!(
                    reason,
                    direction = dir.as_str(),
                    "signature failure (report mode, forwarded unsigned)"
                );
                let payload = match sign::parse(&raw) {
                    Ok(env) => raw.slice(raw.len() - env.payload.len()..),
                    Err(_) => raw,
                };
                return build(payload, false, out_seq).map_or(Signed::Drop, Signed::Forward);
            }
            tracing::info!(reason, direction = dir.as_str(), "signature failure");
            match h.on_failure {
                OnFailure::Drop => Signed::Drop,
                OnFailure::Close => Signed::Close(failure),
            }
        }
    }
}

/// The HMAC keys a live session uses: those of its route in the policy in
/// force now, so that a reload that removes (or replaces) a compromised
/// client key stops it at once, also for sessions opened before. If the
/// route or its `hmac` section is gone from the new policy, the session
/// keeps the keys it started with rather than silently stop verifying.
#[derive(Default)]
struct KeyView {
    generation: u64,
    current: Option<(Arc<Runtime>, usize)>,
    /// This session's own client keys (derived ones) for the generation
    /// in `derived_for`; None when the hmac in force derives none.
    derived: Option<Vec<sign::Key>>,
    derived_for: Option<u64>,
}

impl KeyView {
    /// Cheap when nothing changed: one atomic load per message.
    fn refresh(&mut self, shared: &Shared, prefix: &str) {
        let generation = shared.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let rt = shared.runtime();
        let index = rt.policy.all_routes().position(|r| r.prefix == prefix);
        self.current = index.map(|i| (rt, i));
    }

    /// The hmac in force and the client keys this session verifies with
    /// (derived from its token's claims when the policy says `derive`).
    fn hmac_keys<'a>(
        &'a mut self,
        original: &'a Route,
        inputs: &sign::DeriveInputs,
    ) -> Option<(&'a Hmac, &'a [sign::Key])> {
        let h = self
            .current
            .as_ref()
            .and_then(|(rt, i)| rt.policy.route(*i).hmac.as_ref())
            .or(original.hmac.as_ref())?;
        if self.derived_for != Some(self.generation) {
            self.derived = h.session_client_keys(inputs);
            self.derived_for = Some(self.generation);
        }
        Some((h, self.derived.as_deref().unwrap_or(&h.client_keys)))
    }
}

type Rx<S> = Gated<SplitStream<WebSocketStream<S>>>;
type Tx<S> = SplitSink<WebSocketStream<S>, Message>;

/// Client to backend.
async fn client_to_upstream<C, U>(p: &Pumps<'_>, crx: &mut Rx<C>, utx: &mut Tx<U>) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let ka = &p.route.keepalive;
    let mut ticker = keepalive::ticker(ka.upstream_interval);
    let stall = stall_limit(ka.upstream_interval, ka.max_missed);
    let mut keys = KeyView::default();
    let mut seq_in = SeqState::default();
    let mut seq_out = 0u64;
    let on_limit = p.route.limits.on_message_limit;
    let fail = |e: SendError| match e {
        SendError::Closed => End::UpstreamGone,
        SendError::Stalled => End::UpstreamDead,
    };
    loop {
        let next = tokio::select! {
            m = crx.next() => m,
            () = keepalive::tick(&mut ticker) => {
                if p.u2c_blocked.load(Relaxed) {
                    continue;
                }
                match p.upstream_live.on_tick() {
                    Tick::Skip => continue,
                    Tick::Dead => return End::UpstreamDead,
                    Tick::Ping(payload) => {
                        if let Err(e) = send_within(utx, Message::Ping(payload), stall, &p.c2u_blocked).await {
                            return fail(e);
                        }
                        continue;
                    }
                }
            }
        };
        let msg = match next {
            None => return End::ClientGone,
            Some(Err(e)) => {
                return violation(&e).map_or(End::ClientGone, |(c, r)| End::ClientViolation(c, r))
            }
            Some(Ok(m)) => m,
        };
        // Every frame from the client counts against its message limits,
        // pings and pongs included: they are forwarded too.
        if let (Some(l), false) = (
            &p.limiter,
            matches!(msg, Message::Close(_) | Message::Frame(_)),
        ) {
            if !l.allow(msg.len()) {
                p.shared.metrics.reject("message_rate");
                match on_limit {
                    OnFailure::Close => return End::Policy("rate limit", "rate limit"),
                    OnFailure::Drop => continue,
                }
            }
        }
        if let (Some((sub, l)), true) = (p.subject, msg.is_text() || msg.is_binary()) {
            if l.check_key(&sub.to_string()).is_err() {
                p.shared.metrics.reject("subject_message_rate");
                match on_limit {
                    OnFailure::Close => return End::Policy("rate limit", "rate limit"),
                    OnFailure::Drop => continue,
                }
            }
        }
        let msg = match msg {
            Message::Text(_) | Message::Binary(_) => {
                p.client_live.on_data();
                p.touch();
                let len = msg.len();
                keys.refresh(p.shared, &p.route.prefix);
                let msg = match keys.hmac_keys(p.route, p.derive) {
                    None => msg,
                    Some((h, client_keys)) => match resign(
                        h,
                        p,
                        Direction::C2s,
                        true,
                        client_keys,
                        h.upstream_signing_key(),
                        &mut seq_in,
                        &mut seq_out,
                        msg,
                    ) {
                        Signed::Forward(m) => m,
                        Signed::Drop => continue,
                        Signed::Close(f) => return End::Policy(f.close_reason(false), f.label()),
                    },
                };
                p.msgs[0].fetch_add(1, Relaxed);
                p.bytes[0].fetch_add(len as u64, Relaxed);
                p.shared.metrics.messages_c2s.inc();
                p.shared.metrics.bytes_c2s.inc_by(len as u64);
                msg
            }
            ping @ Message::Ping(_) => ping,
            Message::Pong(payload) => {
                if let Some(rtt) = p.client_live.on_pong(&payload) {
                    p.shared.metrics.ping_rtt.observe(rtt.as_secs_f64());
                    continue;
                }
                p.upstream_pongs.grant();
                Message::Pong(payload)
            }
            Message::Close(f) => return End::ClientClosed(f),
            Message::Frame(_) => continue,
        };
        if let Err(e) = send_within(utx, msg, stall, &p.c2u_blocked).await {
            return fail(e);
        }
    }
}

/// Backend to client.
async fn upstream_to_client<C, U>(p: &Pumps<'_>, urx: &mut Rx<U>, ctx: &mut Tx<C>) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let ka = &p.route.keepalive;
    let mut ticker = keepalive::ticker(ka.interval);
    let stall = stall_limit(ka.interval, ka.max_missed);
    let mut keys = KeyView::default();
    let mut seq_in = SeqState::default();
    let mut seq_out = 0u64;
    let fail = |e: SendError| match e {
        SendError::Closed => End::ClientGone,
        SendError::Stalled => End::ClientDead,
    };
    loop {
        let next = tokio::select! {
            m = urx.next() => m,
            () = keepalive::tick(&mut ticker) => {
                if p.c2u_blocked.load(Relaxed) {
                    continue;
                }
                match p.client_live.on_tick() {
                    Tick::Skip => continue,
                    Tick::Dead => return End::ClientDead,
                    Tick::Ping(payload) => {
                        if let Err(e) = send_within(ctx, Message::Ping(payload), stall, &p.u2c_blocked).await {
                            return fail(e);
                        }
                        continue;
                    }
                }
            }
        };
        let msg = match next {
            None => return End::UpstreamGone,
            Some(Err(e)) => {
                return violation(&e)
                    .map_or(End::UpstreamGone, |(c, r)| End::UpstreamViolation(c, r))
            }
            Some(Ok(m)) => m,
        };
        let msg = match msg {
            Message::Text(_) | Message::Binary(_) => {
                p.upstream_live.on_data();
                p.touch();
                let len = msg.len();
                keys.refresh(p.shared, &p.route.prefix);
                let msg = match keys.hmac_keys(p.route, p.derive) {
                    None => msg,
                    Some((h, client_keys)) => {
                        let first = client_keys.first().unwrap_or(h.upstream_signing_key());
                        let keys = h.upstream_verify_keys();
                        match resign(
                            h,
                            p,
                            Direction::S2c,
                            h.verify_upstream,
                            keys,
                            first,
                            &mut seq_in,
                            &mut seq_out,
                            msg,
                        ) {
                            Signed::Forward(m) => m,
                            Signed::Drop => continue,
                            Signed::Close(f) => {
                                return End::Policy(f.close_reason(true), f.label())
                            }
                        }
                    }
                };
                p.msgs[1].fetch_add(1, Relaxed);
                p.bytes[1].fetch_add(len as u64, Relaxed);
                p.shared.metrics.messages_s2c.inc();
                p.shared.metrics.bytes_s2c.inc_by(len as u64);
                msg
            }
            ping @ Message::Ping(_) => ping,
            Message::Pong(payload) => {
                if let Some(rtt) = p.upstream_live.on_pong(&payload) {
                    p.shared.metrics.ping_rtt.observe(rtt.as_secs_f64());
                    continue;
                }
                p.client_pongs.grant();
                Message::Pong(payload)
            }
            Message::Close(f) => return End::UpstreamClosed(f),
            Message::Frame(_) => continue,
        };
        if let Err(e) = send_within(ctx, msg, stall, &p.u2c_blocked).await {
            return fail(e);
        }
    }
}

/// How long a write to a peer may stall before the peer counts as dead:
/// the same budget keepalive gives it (`interval × max_missed`). With
/// keepalive off on that hop, writes wait as long as the peer holds them
/// (backpressure), bounded by the other timers.
fn stall_limit(interval: Option<Duration>, max_missed: u32) -> Option<Duration> {
    interval.map(|i| i.saturating_mul(max_missed.max(1)))
}

enum SendError {
    Closed,
    Stalled,
}

async fn send_within<S>(
    tx: &mut Tx<S>,
    msg: Message,
    limit: Option<Duration>,
    blocked: &AtomicBool,
) -> Result<(), SendError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    blocked.store(true, Relaxed);
    let mut send = std::pin::pin!(tx.send(msg));
    // Almost every send completes on its first poll; only one that has to
    // wait for the peer pays for a timer.
    let first = std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await;
    let r = match (first, limit) {
        (Poll::Ready(r), _) => r.map_err(|_| SendError::Closed),
        (Poll::Pending, None) => send.await.map_err(|_| SendError::Closed),
        (Poll::Pending, Some(l)) => match tokio::time::timeout(l, send).await {
            Ok(r) => r.map_err(|_| SendError::Closed),
            Err(_) => Err(SendError::Stalled),
        },
    };
    blocked.store(false, Relaxed);
    r
}

/// The session's wall-clock end ([`first_deadline`]): one timer per
/// session, no polling.
async fn expiry(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn idle_watch(p: &Pumps<'_>, timeout: Option<Duration>) {
    let Some(t) = timeout else {
        return std::future::pending().await;
    };
    loop {
        let last = Duration::from_millis(p.last_data_ms.load(Relaxed));
        let deadline = p.start + last + t;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Reads until the peer closes, bounded in time, so our close frame is
/// answered and the TCP connection ends cleanly.
async fn drain<S: AsyncRead + AsyncWrite + Unpin>(rx: &mut Rx<S>, wait: Duration) {
    let _ = tokio::time::timeout(wait, async { while let Some(Ok(_)) = rx.next().await {} }).await;
}

/// Sends `msg` (a close frame, or nothing for a close the peer started)
/// and waits for the peer's side of the close.
async fn close_side<S: AsyncRead + AsyncWrite + Unpin>(
    tx: &mut Tx<S>,
    rx: &mut Rx<S>,
    msg: Option<Message>,
    wait: Duration,
) {
    let sent = tokio::time::timeout(wait, async {
        match msg {
            Some(m) => tx.send(m).await,
            // The peer closed: flush tungstenite's queued reply.
            None => tx.close().await,
        }
    })
    .await;
    if matches!(sent, Ok(Ok(()))) {
        drain(rx, wait).await;
    }
}

/// Sends `close` to the backend and forwards its remaining data messages to
/// the client until the backend's close arrives (bounded by [`CLOSE_WAIT`]).
async fn relay_tail<C, U>(utx: &mut Tx<U>, urx: &mut Rx<U>, ctx: &mut Tx<C>, close: Message)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        if utx.send(close).await.is_err() {
            return;
        }
        while let Some(Ok(m)) = urx.next().await {
            if matches!(m, Message::Close(_)) {
                return;
            }
            let data = matches!(m, Message::Text(_) | Message::Binary(_));
            if data && ctx.send(m).await.is_err() {
                return;
            }
        }
    })
    .await;
}

/// Closes both sides with the codes `end` calls for, and counts the close.
/// Returns the code the client got and who ended the session.
async fn finish<C, U>(
    end: &End,
    shared: &Shared,
    ctx: &mut Tx<C>,
    crx: &mut Rx<C>,
    utx: &mut Tx<U>,
    urx: &mut Rx<U>,
) -> (u16, &'static str)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    // (frame to client, frame to backend, who ended it, client wait)
    let (to_client, mut to_upstream, side, client_wait): (
        Option<Message>,
        Option<Message>,
        &str,
        Duration,
    ) = match end {
        End::ClientClosed(f) => (None, Some(Message::Close(f.clone())), "client", CLOSE_WAIT),
        End::UpstreamClosed(f) => (Some(Message::Close(f.clone())), None, "backend", CLOSE_WAIT),
        End::ClientGone => (
            None,
            Some(close_frame(1001, "client went away")),
            "client",
            Duration::ZERO,
        ),
        End::UpstreamGone => (
            Some(close_frame(BAD_GATEWAY, "backend went away")),
            None,
            "backend",
            CLOSE_WAIT,
        ),
        End::ClientViolation(code, reason) => (
            Some(close_frame(*code, reason)),
            Some(close_frame(1001, "client error")),
            "client",
            CLOSE_WAIT,
        ),
        End::UpstreamViolation(code, reason) => (
            Some(close_frame(BAD_GATEWAY, "backend error")),
            Some(close_frame(*code, reason)),
            "backend",
            CLOSE_WAIT,
        ),
        End::Policy(what, _) => (
            Some(close_frame(1008, what)),
            Some(close_frame(1008, what)),
            "proxy",
            CLOSE_WAIT,
        ),
        End::ClientDead => (
            Some(close_frame(1011, "keepalive timeout")),
            Some(close_frame(1001, "client keepalive timeout")),
            "client",
            DEAD_PEER_WAIT,
        ),
        End::UpstreamDead => (
            Some(close_frame(BAD_GATEWAY, "backend keepalive timeout")),
            Some(close_frame(1001, "keepalive timeout")),
            "backend",
            CLOSE_WAIT,
        ),
        End::Idle => (
            Some(close_frame(1001, "idle timeout")),
            Some(close_frame(1001, "idle timeout")),
            "proxy",
            CLOSE_WAIT,
        ),
        End::TooLong => (
            Some(close_frame(1001, "session too long")),
            Some(close_frame(1001, "session too long")),
            "proxy",
            CLOSE_WAIT,
        ),
        // 1012 (Service Restart) is a server's word; toward the backend
        // wsguard is the client, which is going away (1001) either way.
        End::Shutdown(code) => (
            Some(close_frame(*code, "shutting down")),
            Some(close_frame(1001, "shutting down")),
            "proxy",
            CLOSE_WAIT,
        ),
    };
    let client_code = match (end, &to_client) {
        (End::ClientClosed(f), _) => f.as_ref().map_or(1005, |f| u16::from(f.code)),
        (_, Some(Message::Close(Some(f)))) => u16::from(f.code),
        _ => 1006,
    };
    let client_msg = match end {
        End::ClientClosed(_) | End::ClientGone => None,
        _ => to_client,
    };
    let upstream_wait = if matches!(end, End::UpstreamDead | End::UpstreamGone) {
        DEAD_PEER_WAIT
    } else {
        CLOSE_WAIT
    };
    // A client that broke the protocol still gets the backend's answers to
    // what it sent before (a peer talking to the backend directly would):
    // close the backend first, relay its last messages, then fail the
    // client with the violation's code.
    let mut upstream_closed = false;
    if let End::ClientViolation(..) = end {
        if let Some(m) = to_upstream.take() {
            relay_tail(utx, urx, ctx, m).await;
            upstream_closed = true;
        }
    }
    let client_done = async {
        if matches!(end, End::ClientGone) {
            return;
        }
        close_side(ctx, crx, client_msg, client_wait).await;
    };
    let upstream_done = async {
        if matches!(end, End::UpstreamGone) || upstream_closed {
            return;
        }
        let msg = if matches!(end, End::UpstreamClosed(_)) {
            None
        } else {
            to_upstream
        };
        close_side(utx, urx, msg, upstream_wait).await;
    };
    // Counted when decided, not after the (bounded) close handshake.
    shared
        .metrics
        .closes
        .get_or_create(&CloseLabel {
            side: match side {
                "client" => "client",
                "backend" => "backend",
                _ => "proxy",
            },
            code: code_label(client_code),
        })
        .inc();
    tokio::join!(client_done, upstream_done);
    (client_code, side)
}

/// Runs a session to the end and writes its access-log line.
///
/// Not an `async fn`: an async fn keeps its arguments (here two whole
/// WebSocket streams, about 700 bytes) in its state for as long as it
/// runs, and copies them once more into locals. The streams are split
/// first, and the future captures only what the session uses.
pub fn run<C, U>(
    client: WebSocketStream<PongFilter<C>>,
    upstream: WebSocketStream<PongFilter<U>>,
    rt: Arc<Runtime>,
    shared: Arc<Shared>,
    info: SessionInfo,
) -> impl Future<Output = ()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let pongs = (client.get_ref().passes(), upstream.get_ref().passes());
    let (mut ctx, crx) = client.split();
    let (mut utx, urx) = upstream.split();
    let (mut crx, mut urx) = (Gated::new(crx), Gated::new(urx));
    async move {
        let route = rt.policy.route(info.route);
        let limits = &route.limits;
        let p = Pumps {
            route,
            bind: &info.bind,
            derive: &info.derive,
            subject: info.subject.as_deref().zip(rt.subject_messages.as_deref()),
            shared: &shared,
            start: Instant::now(),
            client_live: Liveness::new(route.keepalive.max_missed),
            upstream_live: Liveness::new(route.keepalive.max_missed),
            client_pongs: pongs.0,
            upstream_pongs: pongs.1,
            last_data_ms: AtomicU64::new(0),
            c2u_blocked: AtomicBool::new(false),
            u2c_blocked: AtomicBool::new(false),
            msgs: [AtomicU64::new(0), AtomicU64::new(0)],
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            limiter: MessageLimiter::new(
                limits.per_connection_messages.as_ref(),
                limits.per_connection_bytes.as_ref(),
            ),
        };
        shared.metrics.connections_active.inc();
        let route_active = shared.metrics.route_active(&route.prefix);
        route_active.inc();
        let deadline = first_deadline(info.expires, limits.session_deadline(p.start));
        let end = tokio::select! {
            e = client_to_upstream(&p, &mut crx, &mut utx) => e,
            e = upstream_to_client(&p, &mut urx, &mut ctx) => e,
            // The policy in force at the drain decides the code.
            () = shared.shutdown.cancelled() => End::Shutdown(shared.runtime().policy.shutdown_close_code),
            () = idle_watch(&p, route.keepalive.idle_timeout) => End::Idle,
            () = expiry(deadline.map(|d| d.0)) => match deadline.map(|d| d.1) {
                Some(Timed::TooLong) => End::TooLong,
                _ => End::Policy("token expired", "token expired"),
            },
        };
        if let End::TooLong = end {
            shared.metrics.session_duration_closes.inc();
        }

        // The close phase is boxed: its timers and close handshakes would
        // otherwise reserve room in every idle session's future.
        let (client_code, side) = Box::pin(finish(
            &end, &shared, &mut ctx, &mut crx, &mut utx, &mut urx,
        ))
        .await;

        shared.metrics.connections_active.dec();
        route_active.dec();
        let reason = match &end {
            End::Policy(_, r) => *r,
            End::TooLong => "session too long",
            _ => "",
        };
        tracing::info!(
            target: "access",
            client = %info.peer,
            path = %info.path,
            request_id = %info.request_id,
            duration_ms = u64::try_from(p.start.elapsed().as_millis()).unwrap_or(u64::MAX),
            msgs_c2s = p.msgs[0].load(Relaxed),
            msgs_s2c = p.msgs[1].load(Relaxed),
            bytes_c2s = p.bytes[0].load(Relaxed),
            bytes_s2c = p.bytes[1].load(Relaxed),
            close_code = client_code,
            closed_by = side,
            reason,
            "session closed"
        );
        // Named, so the future owns them: an async block captures only the
        // fields it uses, and these slots must live as long as the session.
        drop((info.slot, info.subject_slot));
        // The fleet-wide lease goes back before the task ends (bounded by
        // limits.shared.timeout), so a graceful shutdown waits for it.
        if let Some(lease) = info.shared_slot {
            lease.release().await;
        }
    }
}

/// Bounded label values for close codes.
fn code_label(code: u16) -> &'static str {
    match code {
        1000 => "1000",
        1001 => "1001",
        1002 => "1002",
        1003 => "1003",
        1005 => "1005",
        1006 => "1006",
        1007 => "1007",
        1008 => "1008",
        1009 => "1009",
        1011 => "1011",
        1012 => "1012",
        1014 => "1014",
        3000..=3999 => "3xxx",
        4000..=4999 => "4xxx",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earlier_deadline_wins_and_the_token_wins_a_tie() {
        let now = Instant::now();
        let (early, late) = (now + Duration::from_secs(1), now + Duration::from_secs(2));
        let which = |e, t| first_deadline(e, t).map(|(at, w)| (at, matches!(w, Timed::TooLong)));
        assert_eq!(which(None, None), None);
        assert_eq!(which(Some(early), None), Some((early, false)));
        assert_eq!(which(None, Some(early)), Some((early, true)));
        assert_eq!(which(Some(late), Some(early)), Some((early, true)));
        assert_eq!(which(Some(early), Some(late)), Some((early, false)));
        assert_eq!(which(Some(early), Some(early)), Some((early, false)));
    }
}
