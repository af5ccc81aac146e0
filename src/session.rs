//! One proxied session after both upgrades: wsguard's own frame engine.
//!
//! The engine owns the frames of both hops. It is one hand-written future
//! per session (no split streams, no locks, no second task):
//!
//! - **Relay.** Data frames are relayed as they arrive: each read's bytes
//!   are decoded ([`crate::frame::Decoder`]), unmasked in place, re-masked
//!   toward the backend and written on. No message is built. Only when HMAC
//!   must see a whole message is it assembled, under a process-wide budget
//!   of bytes held in unfinished messages ([`Budget`]); past it the sender
//!   gets 1013 (Try Again Later).
//! - **Buffers on demand.** Reads go into a per-thread scratch buffer; what
//!   the engine keeps between reads is at most an unfinished frame header
//!   (inline) and an unfinished control frame (on the heap only while a
//!   read has cut it). Writes go straight
//!   to the socket; only what the socket would not take is kept, in a buffer
//!   freed as soon as it empties. An idle session therefore holds no read or
//!   write buffer.
//! - **Backpressure.** A hop is read only while the far hop has nothing
//!   waiting to be written: a slow reader slows the sender, and what waits
//!   is at most one read's worth.
//! - **Control frames.** A peer's ping goes to the far side and the far
//!   side's pong comes back; nothing answers a ping automatically.
//!   wsguard's own keepalive pings carry a nonce ([`keepalive`]); their
//!   pongs are matched and consumed.
//! - **Close.** Close codes and reasons pass unchanged (contract section
//!   4). After wsguard sends a close it shuts down its write side and
//!   discards what still arrives, for a bounded time, so the peer can read
//!   the close frame instead of a reset.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::compression::{Deflater, HopParams, InflateError, Inflated, Inflater};
use crate::config::{Mode, OnFailure};
use crate::frame::{self, Decoder, FrameError, Header, Rules, Sink, Utf8};
use crate::guard::limits::{ConnSlot, MessageLimiter, SubjectLimiter};
use crate::keepalive::{self, Liveness, Tick};
use crate::metrics::{CloseLabel, ReasonLabel};
use crate::policy::{Hmac, Route};
use crate::sign::{self, Direction, MsgType, SeqState};
use crate::state::{Generation, Process};

/// How long to wait for the peer's half of a close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How long to try to tell a dead peer we are closing.
const DEAD_PEER_WAIT: Duration = Duration::from_millis(500);

/// Close code 1014 (Bad Gateway) for "the backend failed".
const BAD_GATEWAY: u16 = 1014;
/// Close code 1013 (Try Again Later): the partial-message budget is spent.
const TRY_AGAIN_LATER: u16 = 1013;

/// Bytes one read may take: a per-thread scratch buffer of this size.
const SCRATCH: usize = 64 * 1024;
/// Reads per wakeup before the session yields to other tasks.
const READS_PER_POLL: usize = 16;

thread_local! {
    /// Where every session on this thread reads into.
    static READ: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
    /// Where one read's output is built before it is written.
    static OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The default partial-message budget: 256 MiB across the process. At the
/// default `max_message_size` (1 MiB) that is 256 large messages being
/// assembled at once; past it, a new large message (over 8 KiB) gets 1013.
pub const DEFAULT_PARTIAL_BUDGET: usize = 256 << 20;

/// A message assembled for HMAC up to this size does not draw on the
/// partial-message budget (see `FlowSink::frame_start`).
const SMALL_MESSAGE: usize = 8 * 1024;

/// Bytes held process-wide in unfinished messages that HMAC must see
/// whole. Reserved frame by frame as each frame header arrives (so a slow
/// sender cannot hold more than it reserved), released when the message
/// is complete or the session ends.
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    fn reserve(&self, n: usize) -> bool {
        self.used
            .fetch_update(Relaxed, Relaxed, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Relaxed, Relaxed, |u| Some(u.saturating_sub(n)));
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

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
    pub shared_slot: Option<crate::guard::redis_limits::SharedSlot>,
    pub peer: SocketAddr,
    pub path: String,
    pub request_id: String,
    /// The place among live connections (taken by admission).
    pub slot: Option<ConnSlot>,
    /// permessage-deflate as negotiated with the client and with the
    /// backend (None: that hop is uncompressed).
    pub deflate_client: Option<HopParams>,
    pub deflate_upstream: Option<HopParams>,
}

/// A close frame's payload: `None` is a close with no status.
type CloseMsg = Option<(u16, String)>;

/// Why the relay stopped.
#[derive(Debug)]
enum End {
    ClientClosed(CloseMsg),
    UpstreamClosed(CloseMsg),
    /// TCP gone or reset without a close frame.
    ClientGone,
    UpstreamGone,
    /// The client broke the protocol or a limit: (code, reason).
    ClientViolation(u16, &'static str),
    UpstreamViolation(u16, &'static str),
    /// A guard closed the session (signature failure, rate limit): 1008.
    Policy(&'static str, &'static str),
    /// The partial-message budget is spent: 1013 to both sides.
    Overload,
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
/// that every session holds one timer, not two. On a tie the token wins:
/// its 1008 tells the client to fetch a new one before reconnecting.
fn first_deadline(expires: Option<Instant>, too_long: Option<Instant>) -> Option<(Instant, Timed)> {
    match (expires, too_long) {
        (Some(e), Some(t)) if t < e => Some((t, Timed::TooLong)),
        (Some(e), _) => Some((e, Timed::TokenExpired)),
        (None, Some(t)) => Some((t, Timed::TooLong)),
        (None, None) => None,
    }
}

/// How the sink stops the decoder.
enum Halt {
    Frame(FrameError),
    Closed(CloseMsg),
    Policy(&'static str, &'static str),
    Overload,
}

impl From<FrameError> for Halt {
    fn from(e: FrameError) -> Halt {
        Halt::Frame(e)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Client,
    Upstream,
}

/// What a sink needs from the session besides its own direction's state.
struct Env<'a> {
    route: &'a Route,
    process: &'a Process,
    bind: &'a str,
    derive: &'a sign::DeriveInputs,
    /// The source hop's keepalive state (its pongs may be ours).
    live: &'a Liveness,
    /// Client direction only: per-connection and per-subject limits.
    limiter: Option<&'a MessageLimiter>,
    subject: Option<(&'a str, &'a SubjectLimiter)>,
}

/// An HMAC message being assembled.
struct Assembly {
    op: u8,
    buf: Vec<u8>,
    reserved: usize,
    /// RSV1 was set: `buf` is raw DEFLATE, inflated when the message ends.
    compressed: bool,
}

/// One direction's relay state.
struct Flow {
    dec: Decoder,
    st: FlowState,
}

struct FlowState {
    dir: Direction,
    /// Frames written by this flow are masked (toward the backend).
    mask_out: bool,
    /// The frame being relayed: its mask and payload position.
    out_mask: Option<[u8; 4]>,
    out_off: usize,
    /// A relayed frame's payload is still coming: nothing of wsguard's own
    /// (a keepalive ping, a close) may be written to this flow's hop yet.
    open_out: bool,
    /// The current message was refused by a limit (`on_message_limit:
    /// drop`): its frames are discarded.
    dropping: bool,
    msg_len: u64,
    assembly: Option<Box<Assembly>>,
    /// A data frame arrived since the engine last looked.
    data_seen: bool,
    msgs: u64,
    bytes: u64,
    keys: KeyView,
    seq_in: SeqState,
    seq_out: u64,
    /// A keepalive ping waiting for the open frame to end.
    pending_ping: Option<Bytes>,
    /// permessage-deflate on the source hop (window bits, context
    /// takeover) and the inflater for its compressed messages (None: RSV1
    /// is refused by the decoder). The inflater exists only while a message
    /// is inflated, or for the session's life with context takeover: an
    /// idle session without takeover holds three bytes of compression
    /// state per direction, not the inflater (about 160 bytes).
    inflate_cfg: Option<(u8, bool)>,
    inflater: Option<Box<Inflater>>,
    /// permessage-deflate on the destination hop: messages wsguard
    /// assembles are deflated again for it (None: sent uncompressed). The
    /// deflater lives like the inflater.
    deflate_cfg: Option<(u8, bool)>,
    deflater: Option<Box<Deflater>>,
    /// Largest inflated message (`max_message_size`).
    max_plain: usize,
    /// Both hops negotiated compatible permessage-deflate parameters: a
    /// compressed message that no guard needs in plaintext is relayed frame
    /// by frame as it came, inflated only to be measured and checked.
    pass: bool,
    /// The current message is being relayed compressed ([`FlowState::pass`]).
    zstream: bool,
    /// Its decompressed bytes so far.
    zplain: u64,
    /// Its UTF-8 check, for a text message (the decoder checks only
    /// uncompressed text).
    zutf8: Option<Utf8>,
}

impl FlowState {
    /// Whether the source hop's compressed stream keeps its window between
    /// messages.
    fn inflate_takeover(&self) -> bool {
        self.inflate_cfg.is_some_and(|(_, takeover)| takeover)
    }

    /// After a message: without context takeover, nothing of the codec
    /// outlives it (its zlib state went back to the per-thread pool).
    fn codec_rest(&mut self) {
        if !self.inflate_takeover() {
            self.inflater = None;
        }
        if !self.deflate_cfg.is_some_and(|(_, takeover)| takeover) {
            self.deflater = None;
        }
    }
}

impl Flow {
    fn new(dir: Direction, rules: Rules) -> Flow {
        Flow {
            dec: Decoder::new(rules),
            st: FlowState {
                dir,
                mask_out: dir == Direction::C2s,
                out_mask: None,
                out_off: 0,
                open_out: false,
                dropping: false,
                msg_len: 0,
                assembly: None,
                data_seen: false,
                msgs: 0,
                bytes: 0,
                keys: KeyView::default(),
                seq_in: SeqState::default(),
                seq_out: 0,
                pending_ping: None,
                inflate_cfg: None,
                inflater: None,
                deflate_cfg: None,
                deflater: None,
                max_plain: usize::MAX,
                pass: false,
                zstream: false,
                zplain: 0,
                zutf8: None,
            },
        }
    }

    /// Sets permessage-deflate for this flow: `from` as negotiated with the
    /// hop it reads, `to` with the hop it writes. `signed`: the route
    /// verifies and re-signs messages (`hmac`), so none can be relayed as
    /// it came.
    fn with_deflate(
        mut self,
        from: Option<HopParams>,
        to: Option<HopParams>,
        max: u64,
        signed: bool,
    ) -> Flow {
        self.st.pass = match (&from, &to) {
            (Some(f), Some(t)) => !signed && HopParams::can_pass_through(f, t),
            _ => false,
        };
        self.st.inflate_cfg = from.map(|p| (p.recv_window_bits, p.recv_context_takeover));
        // Relayed compressed messages feed the receiver's window with the
        // sender's history; a message wsguard compresses itself must then
        // not refer back into a history of its own, so it is compressed
        // without context takeover (self-contained, valid in any window).
        let pass = self.st.pass;
        self.st.deflate_cfg = to
            .filter(HopParams::can_deflate)
            .map(|p| (p.send_window_bits, p.send_context_takeover && !pass));
        self.st.max_plain = usize::try_from(max).unwrap_or(usize::MAX);
        self
    }
}

/// The source hop's inflater in `slot`, made on first use; None when the
/// hop did not negotiate compression (`cfg`).
fn inflater(slot: &mut Option<Box<Inflater>>, cfg: Option<(u8, bool)>) -> Option<&mut Inflater> {
    let (bits, takeover) = cfg?;
    Some(slot.get_or_insert_with(|| Box::new(Inflater::new(bits, takeover))))
}

/// Why a compressed message cannot be delivered, as the decoder's errors.
fn inflate_halt(e: InflateError) -> Halt {
    match e {
        InflateError::TooBig { .. } => Halt::Frame(FrameError::TooBig("message too big")),
        InflateError::Busy => Halt::Overload,
        InflateError::Corrupt(_) => Halt::Frame(FrameError::BadData("invalid compressed data")),
    }
}

fn out_mask(masked: bool) -> Option<[u8; 4]> {
    masked.then(rand::random::<[u8; 4]>)
}

struct FlowSink<'a> {
    st: &'a mut FlowState,
    env: &'a Env<'a>,
    out: &'a mut Vec<u8>,
}

impl FlowSink<'_> {
    fn is_client_to_backend(&self) -> bool {
        self.st.dir == Direction::C2s
    }

    /// A limit refused something: close, or drop what it refused.
    fn limited(&self, reason: &'static str) -> Result<bool, Halt> {
        self.env.process.metrics.reject(reason);
        match self.env.route.limits.on_message_limit {
            OnFailure::Close => Err(Halt::Policy("rate limit", "rate limit")),
            OnFailure::Drop => Ok(true),
        }
    }

    /// A limit refused a data message before any of it went on. A
    /// compressed message of a context-takeover stream is never dropped:
    /// the sender's later messages may refer back into it, so dropping it
    /// would corrupt the window of whoever inflates the stream (wsguard,
    /// and the receiver of a relayed stream). The session closes instead.
    fn limited_message(&self, reason: &'static str, compressed: bool) -> Result<bool, Halt> {
        let takeover = compressed && self.st.inflate_takeover();
        if takeover {
            self.env.process.metrics.reject(reason);
            return Err(Halt::Policy("rate limit", "rate limit"));
        }
        self.limited(reason)
    }

    /// Inflates the next part of a message relayed compressed, to hold it
    /// to `max_message_size` and check its UTF-8; the bytes are then
    /// dropped. `fin`: the message ended (its tail is inflated too).
    fn measure(&mut self, data: &[u8], fin: bool) -> Result<(), Halt> {
        let st = &mut *self.st;
        let Some(inf) = inflater(&mut st.inflater, st.inflate_cfg) else {
            return Err(Halt::Frame(FrameError::Protocol("RSV1 not negotiated")));
        };
        let (plain, utf8) = (&mut st.zplain, &mut st.zutf8);
        let mut bad_utf8 = false;
        let r = inf.inflate_chunks(data, fin, st.max_plain, &mut |chunk| {
            *plain = plain.saturating_add(chunk.len() as u64);
            if let Some(u) = utf8.as_mut() {
                if u.feed(chunk).is_err() {
                    bad_utf8 = true;
                    return Err(InflateError::Corrupt(String::new()));
                }
            }
            Ok(())
        });
        if bad_utf8 {
            return Err(Halt::Frame(FrameError::Utf8));
        }
        r.map_err(inflate_halt)?;
        if fin {
            if let Some(mut u) = st.zutf8.take() {
                u.finish().map_err(Halt::Frame)?;
            }
        }
        Ok(())
    }

    /// A compressed message inflated to `plain` bytes: from now on it counts
    /// as that long. The byte rate limit counts payload bytes: the frames
    /// paid for their compressed size, the rest is charged now, so that
    /// compression cannot multiply what a client may send. False: the
    /// limit refused it.
    fn charge_inflated(&mut self, plain: u64) -> bool {
        let wire = std::mem::replace(&mut self.st.msg_len, plain);
        let extra = usize::try_from(plain.saturating_sub(wire)).unwrap_or(usize::MAX);
        self.env.limiter.is_none_or(|l| l.allow_bytes(extra))
    }

    /// Writes one whole message toward the destination hop: deflated
    /// (RSV1) when that hop negotiated compression, else as is.
    fn emit(&mut self, op: u8, data: &[u8]) -> Result<(), Halt> {
        let mask = out_mask(self.st.mask_out);
        let st = &mut *self.st;
        if st.deflater.is_none() {
            if let Some((bits, takeover)) = st.deflate_cfg {
                st.deflater = Deflater::new(bits, takeover).map(Box::new);
            }
        }
        let Some(d) = st.deflater.as_mut() else {
            frame::write_frame(self.out, true, op, data, mask);
            return Ok(());
        };
        let mut z = Vec::with_capacity(data.len() / 2 + 16);
        if d.deflate(data, true, &mut z).is_err() {
            // Never expected from valid state; RSV1 off is always legal.
            frame::write_frame(self.out, true, op, data, mask);
            return Ok(());
        }
        if st.inflate_takeover() {
            // The receiver's window now holds a message of wsguard's that
            // the sender's stream does not: the sender's later back
            // references would point elsewhere there, so none of its
            // messages is relayed as it came any more in this session.
            st.pass = false;
        }
        frame::write_header(self.out, true, 0b100, op, z.len() as u64, mask);
        match mask {
            Some(k) => frame::mask_extend(self.out, &z, k, 0),
            None => self.out.extend_from_slice(&z),
        }
        Ok(())
    }

    fn finish_assembly(&mut self, a: Assembly) -> Result<(), Halt> {
        let env = self.env;
        let Assembly {
            op,
            buf,
            reserved,
            compressed,
        } = a;
        // Held until the message is written: the inflated bytes count
        // against the process-wide inflate budget meanwhile.
        let mut _hold = None;
        let buf = if compressed {
            let Some(inf) = inflater(&mut self.st.inflater, self.st.inflate_cfg) else {
                env.process.partial.release(reserved);
                return Err(Halt::Frame(FrameError::Protocol("RSV1 not negotiated")));
            };
            let mut plain = Inflated::new(&env.process.inflate);
            let r = inf.inflate_into(&buf, true, self.st.max_plain, &mut plain);
            drop(buf);
            env.process.partial.release(reserved);
            r.map_err(inflate_halt)?;
            if op == frame::OP_TEXT && std::str::from_utf8(plain.as_slice()).is_err() {
                return Err(Halt::Frame(FrameError::Utf8));
            }
            let (plain, hold) = plain.into_parts();
            _hold = Some(hold);
            if !self.charge_inflated(plain.len() as u64) && self.limited("message_rate")? {
                return Ok(());
            }
            plain
        } else {
            env.process.partial.release(reserved);
            buf
        };
        let ty = if op == frame::OP_TEXT {
            MsgType::Text
        } else {
            MsgType::Binary
        };
        let st = &mut *self.st;
        st.keys.refresh(env.process, &env.route.prefix);
        let Some((h, client_keys)) = st.keys.hmac_keys(env.route, env.derive) else {
            // No hmac (or none any more): relay the plaintext.
            self.emit(op, &buf)?;
            self.count();
            return Ok(());
        };
        let signed = match st.dir {
            Direction::C2s => resign(
                h,
                env,
                Direction::C2s,
                true,
                client_keys,
                h.upstream_signing_key(),
                &mut st.seq_in,
                &mut st.seq_out,
                &buf,
                ty,
            ),
            Direction::S2c => {
                let first = client_keys.first().unwrap_or(h.upstream_signing_key());
                resign(
                    h,
                    env,
                    Direction::S2c,
                    h.verify_upstream,
                    h.upstream_verify_keys(),
                    first,
                    &mut st.seq_in,
                    &mut st.seq_out,
                    &buf,
                    ty,
                )
            }
        };
        match signed {
            Signed::Forward(data) => {
                self.emit(op, &data)?;
                self.count();
                Ok(())
            }
            Signed::Drop => Ok(()),
            Signed::Close(f) => Err(Halt::Policy(
                f.close_reason(st.dir == Direction::S2c),
                f.label(),
            )),
        }
    }

    fn count(&mut self) {
        let len = self.st.msg_len;
        self.st.msgs += 1;
        self.st.bytes += len;
        let m = &self.env.process.metrics;
        match self.st.dir {
            Direction::C2s => {
                m.messages_c2s.inc();
                m.bytes_c2s.inc_by(len);
            }
            Direction::S2c => {
                m.messages_s2c.inc();
                m.bytes_s2c.inc_by(len);
            }
        }
    }

    /// A message's last frame ended: what is left to do for it.
    fn end_message(&mut self) -> Result<(), Halt> {
        if std::mem::take(&mut self.st.zstream) {
            self.measure(&[], true)?;
            // The message went on already, so a refusal closes the session.
            if !self.charge_inflated(self.st.zplain) {
                self.env.process.metrics.reject("message_rate");
                return Err(Halt::Policy("rate limit", "rate limit"));
            }
        }
        match self.st.assembly.take() {
            Some(a) => self.finish_assembly(*a),
            None => {
                self.count();
                Ok(())
            }
        }
    }
}

impl Sink for FlowSink<'_> {
    type Error = Halt;

    fn frame_start(&mut self, h: &Header, op: u8, first: bool) -> Result<(), Halt> {
        self.st.data_seen = true;
        if first {
            self.st.msg_len = 0;
            self.st.dropping = false;
            let compressed = h.rsv & 0b100 != 0;
            if let Some(l) = self.env.limiter {
                // A message's first frame pays for the message and its own
                // bytes; continuation frames pay for their bytes.
                if !l.allow(usize::try_from(h.len).unwrap_or(usize::MAX)) {
                    self.st.dropping = self.limited_message("message_rate", compressed)?;
                }
            }
            if let (Some((sub, l)), false) = (self.env.subject, self.st.dropping) {
                if l.check_key(&sub.to_string()).is_err() {
                    self.st.dropping = self.limited_message("subject_message_rate", compressed)?;
                }
            }
            if !self.st.dropping {
                let env = self.env;
                self.st.keys.refresh(env.process, &env.route.prefix);
                let signed = self.st.keys.hmac_keys(env.route, env.derive).is_some();
                if compressed && self.st.pass && !signed {
                    // Relayed as it came; inflated only to be measured.
                    self.st.zstream = true;
                    self.st.zplain = 0;
                    self.st.zutf8 = (op == frame::OP_TEXT).then(Utf8::default);
                } else if compressed || signed {
                    if compressed && self.st.inflate_takeover() {
                        // The receiver will not see this message in the
                        // sender's compressed stream, so later ones may
                        // refer to what it never had: relay none as is
                        // any more in this session (see also `emit`).
                        self.st.pass = false;
                    }
                    self.st.assembly = Some(Box::new(Assembly {
                        op,
                        buf: Vec::new(),
                        reserved: 0,
                        compressed,
                    }));
                }
            }
        } else if let Some(l) = self.env.limiter {
            // Part of the message went on already: it cannot be dropped
            // any more, so a refused continuation closes the session.
            if !self.st.dropping && !l.allow_bytes(usize::try_from(h.len).unwrap_or(usize::MAX)) {
                self.env.process.metrics.reject("message_rate");
                return Err(Halt::Policy("rate limit", "rate limit"));
            }
        }
        self.st.msg_len = self.st.msg_len.saturating_add(h.len);
        if self.st.dropping {
            return Ok(());
        }
        if let Some(a) = &mut self.st.assembly {
            let n = usize::try_from(h.len).unwrap_or(usize::MAX);
            // A small message is held like a socket buffer would be (at
            // most SMALL_MESSAGE per hop); only the bytes of a larger one
            // come from the process-wide budget, all of them once it grows
            // past the line. So a spent budget refuses new large messages
            // and still lets chat-sized ones through.
            let total = usize::try_from(self.st.msg_len).unwrap_or(usize::MAX);
            if total > SMALL_MESSAGE {
                let need = total.saturating_sub(a.reserved);
                if !self.env.process.partial.reserve(need) {
                    self.env.process.metrics.reject("partial_budget");
                    return Err(Halt::Overload);
                }
                a.reserved += need;
            }
            a.buf.reserve_exact(n);
            return Ok(());
        }
        let mask = out_mask(self.st.mask_out);
        frame::write_header(self.out, h.fin, h.rsv, h.opcode, h.len, mask);
        self.st.out_mask = mask;
        self.st.out_off = 0;
        self.st.open_out = true;
        Ok(())
    }

    fn payload(&mut self, data: &[u8]) -> Result<(), Halt> {
        if self.st.dropping {
            return Ok(());
        }
        if let Some(a) = &mut self.st.assembly {
            a.buf.extend_from_slice(data);
            return Ok(());
        }
        if self.st.zstream {
            // Checked before a byte of it goes on.
            self.measure(data, false)?;
        }
        match self.st.out_mask {
            Some(k) => frame::mask_extend(self.out, data, k, self.st.out_off),
            None => self.out.extend_from_slice(data),
        }
        self.st.out_off = self.st.out_off.wrapping_add(data.len());
        Ok(())
    }

    fn frame_end(&mut self, fin: bool) -> Result<(), Halt> {
        self.st.open_out = false;
        if !fin {
            return Ok(());
        }
        if self.st.dropping {
            self.st.dropping = false;
            return Ok(());
        }
        let r = self.end_message();
        self.st.codec_rest();
        r
    }

    fn control(&mut self, op: u8, payload: &[u8]) -> Result<(), Halt> {
        if op == frame::OP_CLOSE {
            let close = frame::parse_close(payload)?;
            return Err(Halt::Closed(close.map(|(c, r)| (c, r.to_string()))));
        }
        // Pings and pongs from the client count against its message
        // limits: they are forwarded too.
        if let (Some(l), true) = (self.env.limiter, self.is_client_to_backend()) {
            if !l.allow(payload.len()) && self.limited("message_rate")? {
                return Ok(());
            }
        }
        if op == frame::OP_PONG {
            if let Some(rtt) = self.env.live.on_pong(payload) {
                self.env.process.metrics.ping_rtt.observe(rtt.as_secs_f64());
                return Ok(());
            }
        }
        frame::write_frame(self.out, true, op, payload, out_mask(self.st.mask_out));
        Ok(())
    }
}

enum Signed {
    Forward(Vec<u8>),
    Drop,
    Close(sign::SigFailure),
}

fn sig_failure(process: &Process, reason: &'static str) {
    process
        .metrics
        .signature_failures
        .get_or_create(&ReasonLabel { reason })
        .inc();
}

/// Verifies one data message and re-signs it for the next hop.
#[allow(clippy::too_many_arguments)]
fn resign(
    h: &Hmac,
    env: &Env<'_>,
    dir: Direction,
    verify: bool,
    verify_keys: &[sign::Key],
    sign_key: &sign::Key,
    state: &mut SeqState,
    out_seq: &mut u64,
    raw: &[u8],
    ty: MsgType,
) -> Signed {
    let skew = u64::try_from(h.max_skew.as_millis()).unwrap_or(u64::MAX);
    let now = sign::now_ms();
    let outcome = if verify {
        sign::verify(verify_keys, dir, env.bind, ty, raw, now, skew, state)
    } else {
        // Trusted backend: strip its envelope without checking it.
        sign::parse(raw).map(|env| env.payload)
    };
    match outcome {
        Ok(payload) => {
            *out_seq += 1;
            Signed::Forward(sign::sign(
                sign_key, dir, *out_seq, now, env.bind, ty, payload,
            ))
        }
        Err(failure) => {
            let reason = failure.label();
            sig_failure(env.process, reason);
            if h.mode == Mode::Report {
                tracing::info!(
                    reason,
                    direction = dir.as_str(),
                    "signature failure (report mode, forwarded unsigned)"
                );
                let payload = match sign::parse(raw) {
                    Ok(e) => e.payload,
                    Err(_) => raw,
                };
                return Signed::Forward(payload.to_vec());
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
    current: Option<(Arc<Generation>, usize)>,
    /// This session's own client keys (derived ones) for the generation
    /// in `derived_for`; None when the hmac in force derives none.
    derived: Option<Vec<sign::Key>>,
    derived_for: Option<u64>,
}

impl KeyView {
    /// Cheap when nothing changed: one atomic load per message.
    fn refresh(&mut self, process: &Process, prefix: &str) {
        let generation = process.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let rt = process.current();
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

/// One hop's socket and what waits to be written to it.
struct Hop<S> {
    io: S,
    /// Bytes the socket would not take yet; empty (no allocation) otherwise.
    wbuf: Vec<u8>,
    wpos: usize,
    /// A write went in since the last flush (TLS streams need one).
    unflushed: bool,
    /// Since when output has waited for this peer.
    stalled_since: Option<Instant>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Hop<S> {
    fn new(io: S) -> Hop<S> {
        Hop {
            io,
            wbuf: Vec::new(),
            wpos: 0,
            unflushed: false,
            stalled_since: None,
        }
    }

    /// Something waits to be written (or flushed).
    fn busy(&self) -> bool {
        self.wpos < self.wbuf.len() || self.unflushed
    }

    fn stall(&mut self) {
        if self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
        }
    }

    /// Writes what waits. `Ready(Ok)` once everything is out.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rest) = self.wbuf.get(self.wpos..).filter(|r| !r.is_empty()) {
            match Pin::new(&mut self.io).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.wpos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.stall();
                    return Poll::Pending;
                }
            }
        }
        if !self.wbuf.is_empty() {
            // Give the memory back: an idle hop holds no write buffer.
            self.wbuf = Vec::new();
            self.wpos = 0;
        }
        if self.unflushed {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.stall();
                    return Poll::Pending;
                }
            }
        }
        self.stalled_since = None;
        Poll::Ready(Ok(()))
    }

    /// Writes `out` straight to the socket when nothing waits before it;
    /// keeps only what the socket would not take.
    fn write(&mut self, cx: &mut Context<'_>, out: &[u8]) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        self.unflushed = true;
        if self.wpos < self.wbuf.len() {
            self.wbuf.extend_from_slice(out);
            return Ok(());
        }
        let mut at = 0;
        while let Some(rest) = out.get(at..).filter(|r| !r.is_empty()) {
            match Pin::new(&mut self.io).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => at += n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        if let Some(rest) = out.get(at..).filter(|r| !r.is_empty()) {
            self.wbuf = rest.to_vec();
            self.wpos = 0;
            self.stall();
        }
        Ok(())
    }

    /// Queues bytes of wsguard's own (a keepalive ping, a close frame).
    fn queue(&mut self, out: &[u8]) {
        if self.wpos >= self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        self.wbuf.extend_from_slice(out);
        self.unflushed = true;
    }
}

/// The session: both hops, both directions, and the keepalive state.
struct Engine<'r, C, U> {
    route: &'r Route,
    process: &'r Process,
    bind: &'r str,
    derive: &'r sign::DeriveInputs,
    subject: Option<(&'r str, &'r SubjectLimiter)>,
    limiter: Option<MessageLimiter>,
    client: Hop<C>,
    upstream: Hop<U>,
    /// Client to backend, backend to client.
    c2u: Flow,
    u2c: Flow,
    client_live: Liveness,
    upstream_live: Liveness,
    /// Bytes the backend sent after its 101, read with the handshake.
    upstream_rest: Vec<u8>,
    /// After a client violation: the client is not read any more while the
    /// backend's last answers are relayed.
    tail: bool,
    last_data: Instant,
}

impl<C, U> Engine<'_, C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    /// Feeds one read's bytes from `from` through its flow, and writes the
    /// result to the far hop.
    fn on_bytes(&mut self, from: Side, data: &mut [u8], cx: &mut Context<'_>) -> Result<(), End> {
        OUT.with_borrow_mut(|out| {
            out.clear();
            let (flow, live, limiter, subject) = match from {
                Side::Client => (
                    &mut self.c2u,
                    &self.client_live,
                    self.limiter.as_ref(),
                    self.subject,
                ),
                Side::Upstream => (&mut self.u2c, &self.upstream_live, None, None),
            };
            let env = Env {
                route: self.route,
                process: self.process,
                bind: self.bind,
                derive: self.derive,
                live,
                limiter,
                subject,
            };
            let mut sink = FlowSink {
                st: &mut flow.st,
                env: &env,
                out,
            };
            let r = flow.dec.feed(data, &mut sink);
            if !flow.st.open_out {
                if let Some(p) = flow.st.pending_ping.take() {
                    frame::write_frame(out, true, frame::OP_PING, &p, out_mask(flow.st.mask_out));
                }
            }
            if std::mem::take(&mut flow.st.data_seen) {
                live.on_data();
                self.last_data = Instant::now();
            }
            let m = &self.process.metrics;
            let (wire_in, wire_out) = match from {
                Side::Client => (&m.wire_client_c2s, &m.wire_backend_c2s),
                Side::Upstream => (&m.wire_backend_s2c, &m.wire_client_s2c),
            };
            wire_in.inc_by(data.len() as u64);
            wire_out.inc_by(out.len() as u64);
            // What came before an error still goes on (a direct peer would
            // have answered it too).
            let w = match from {
                Side::Client => self.upstream.write(cx, out),
                Side::Upstream => self.client.write(cx, out),
            };
            if out.capacity() > 4 * SCRATCH {
                *out = Vec::new();
            }
            if let Err(h) = r {
                return Err(halt_end(h, from));
            }
            w.map_err(|_| match from {
                Side::Client => End::UpstreamGone,
                Side::Upstream => End::ClientGone,
            })
        })
    }

    /// Reads once from `side` into the thread's scratch buffer and relays
    /// what came.
    fn read_side(&mut self, side: Side, cx: &mut Context<'_>) -> Poll<Result<(), End>> {
        let gone = match side {
            Side::Client => End::ClientGone,
            Side::Upstream => End::UpstreamGone,
        };
        READ.with_borrow_mut(|scratch| {
            if scratch.len() < SCRATCH {
                scratch.resize(SCRATCH, 0);
            }
            let mut rb = ReadBuf::new(scratch);
            let r = match side {
                Side::Client => Pin::new(&mut self.client.io).poll_read(cx, &mut rb),
                Side::Upstream => Pin::new(&mut self.upstream.io).poll_read(cx, &mut rb),
            };
            let n = rb.filled().len();
            match r {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(_)) => Poll::Ready(Err(gone)),
                Poll::Ready(Ok(())) if n == 0 => Poll::Ready(Err(gone)),
                Poll::Ready(Ok(())) => match scratch.get_mut(..n) {
                    Some(data) => Poll::Ready(self.on_bytes(side, data, cx)),
                    None => Poll::Ready(Err(gone)),
                },
            }
        })
    }

    /// Relays until the session ends. Cancel-safe: all state lives in the
    /// engine, none in the future.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        if !self.upstream_rest.is_empty() {
            let mut rest = std::mem::take(&mut self.upstream_rest);
            if let Err(e) = self.on_bytes(Side::Upstream, &mut rest, cx) {
                return Poll::Ready(e);
            }
        }
        for _ in 0..READS_PER_POLL {
            let mut progress = false;
            if let Poll::Ready(Err(_)) = self.client.poll_out(cx) {
                return Poll::Ready(End::ClientGone);
            }
            if let Poll::Ready(Err(_)) = self.upstream.poll_out(cx) {
                return Poll::Ready(End::UpstreamGone);
            }
            // Backpressure: read a hop only while the far hop has taken
            // everything so far.
            if !self.tail && !self.upstream.busy() {
                match self.read_side(Side::Client, cx) {
                    Poll::Pending => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(e),
                    Poll::Ready(Ok(())) => progress = true,
                }
            }
            if !self.client.busy() {
                match self.read_side(Side::Upstream, cx) {
                    Poll::Pending => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(e),
                    Poll::Ready(Ok(())) => progress = true,
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Busy: let other sessions on this worker run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Maps a sink's halt on `from`'s input to the session's end.
fn halt_end(h: Halt, from: Side) -> End {
    match (h, from) {
        (Halt::Frame(e), Side::Client) => End::ClientViolation(e.code(), e.reason()),
        (Halt::Frame(e), Side::Upstream) => End::UpstreamViolation(e.code(), e.reason()),
        (Halt::Closed(c), Side::Client) => End::ClientClosed(c),
        (Halt::Closed(c), Side::Upstream) => End::UpstreamClosed(c),
        (Halt::Policy(what, label), _) => End::Policy(what, label),
        (Halt::Overload, _) => End::Overload,
    }
}

/// How long output may wait for a peer before the peer counts as dead:
/// the same budget keepalive gives it (`interval × max_missed`). With
/// keepalive off on that hop, output waits as long as the peer holds it
/// (backpressure), bounded by the other timers.
fn stall_limit(interval: Option<Duration>, max_missed: u32) -> Option<Duration> {
    interval.map(|i| i.saturating_mul(max_missed.max(1)))
}

impl<C, U> Engine<'_, C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    /// A keepalive tick for `side`.
    fn on_tick(&mut self, side: Side, stall: Option<Duration>) -> Result<(), End> {
        let (stalled, far_busy, live, flow, dead) = match side {
            Side::Client => (
                self.client.stalled_since,
                self.upstream.busy() || self.tail,
                &self.client_live,
                &mut self.u2c,
                End::ClientDead,
            ),
            Side::Upstream => (
                self.upstream.stalled_since,
                self.client.busy(),
                &self.upstream_live,
                &mut self.c2u,
                End::UpstreamDead,
            ),
        };
        if let (Some(since), Some(limit)) = (stalled, stall) {
            if since.elapsed() >= limit {
                return Err(dead);
            }
        }
        // A hop we are not reading (its far side is backed up) cannot
        // prove it is alive: no verdict until it is read again.
        if far_busy {
            return Ok(());
        }
        match live.on_tick() {
            Tick::Skip => Ok(()),
            Tick::Dead => Err(dead),
            Tick::Ping(p) => {
                if flow.st.open_out {
                    flow.st.pending_ping = Some(p);
                } else {
                    let mut f = Vec::with_capacity(2 + 4 + p.len());
                    frame::write_frame(
                        &mut f,
                        true,
                        frame::OP_PING,
                        &p,
                        out_mask(flow.st.mask_out),
                    );
                    match side {
                        Side::Client => self.client.queue(&f),
                        Side::Upstream => self.upstream.queue(&f),
                    }
                }
                Ok(())
            }
        }
    }

    /// Closes both sides with the codes `end` calls for, and counts the
    /// close. Returns the code the client got and who ended the session.
    async fn finish(&mut self, end: &End) -> (u16, &'static str) {
        let close = |code: u16, reason: &str| Some(Some((code, reason.to_string())));
        // (to client, to backend, who ended it, client wait); `None`: that
        // side gets nothing (it is gone, or is answered separately).
        let (to_client, to_upstream, side, client_wait): (
            Option<CloseMsg>,
            Option<CloseMsg>,
            &'static str,
            Duration,
        ) = match end {
            // A close is answered with the same payload (as an endpoint
            // would) and passed on unchanged.
            End::ClientClosed(f) => (Some(f.clone()), Some(f.clone()), "client", CLOSE_WAIT),
            End::UpstreamClosed(f) => (Some(f.clone()), Some(f.clone()), "backend", CLOSE_WAIT),
            End::ClientGone => (
                None,
                close(1001, "client went away"),
                "client",
                Duration::ZERO,
            ),
            End::UpstreamGone => (
                close(BAD_GATEWAY, "backend went away"),
                None,
                "backend",
                CLOSE_WAIT,
            ),
            End::ClientViolation(code, reason) => (
                close(*code, reason),
                close(1001, "client error"),
                "client",
                CLOSE_WAIT,
            ),
            End::UpstreamViolation(code, reason) => (
                close(BAD_GATEWAY, "backend error"),
                close(*code, reason),
                "backend",
                CLOSE_WAIT,
            ),
            End::Policy(what, _) => (close(1008, what), close(1008, what), "proxy", CLOSE_WAIT),
            End::Overload => (
                close(TRY_AGAIN_LATER, "try again later"),
                close(TRY_AGAIN_LATER, "try again later"),
                "proxy",
                CLOSE_WAIT,
            ),
            End::ClientDead => (
                close(1011, "keepalive timeout"),
                close(1001, "client keepalive timeout"),
                "client",
                DEAD_PEER_WAIT,
            ),
            End::UpstreamDead => (
                close(BAD_GATEWAY, "backend keepalive timeout"),
                close(1001, "keepalive timeout"),
                "backend",
                CLOSE_WAIT,
            ),
            End::Idle => (
                close(1001, "idle timeout"),
                close(1001, "idle timeout"),
                "proxy",
                CLOSE_WAIT,
            ),
            End::TooLong => (
                close(1001, "session too long"),
                close(1001, "session too long"),
                "proxy",
                CLOSE_WAIT,
            ),
            // 1012 (Service Restart) is a server's word; toward the backend
            // wsguard is the client, which is going away (1001) either way.
            End::Shutdown(code) => (
                close(*code, "shutting down"),
                close(1001, "shutting down"),
                "proxy",
                CLOSE_WAIT,
            ),
        };
        let client_code = match (end, &to_client) {
            (End::ClientClosed(f), _) => f.as_ref().map_or(1005, |f| f.0),
            (_, Some(Some((code, _)))) => *code,
            _ => 1006,
        };
        // Counted when decided, not after the (bounded) close handshake.
        self.process
            .metrics
            .closes
            .get_or_create(&CloseLabel {
                side,
                code: code_label(client_code),
            })
            .inc();
        let upstream_wait = if matches!(end, End::UpstreamDead | End::UpstreamGone) {
            DEAD_PEER_WAIT
        } else {
            CLOSE_WAIT
        };

        // A client that broke the protocol still gets the backend's answers
        // to what it sent before (a peer talking to the backend directly
        // would): close the backend first, relay its last messages, then
        // fail the client with the violation's code.
        let mut to_upstream = to_upstream;
        if matches!(end, End::ClientViolation(..)) && !self.c2u.st.open_out {
            if let Some(msg) = to_upstream.take() {
                self.upstream
                    .queue(&close_frame(&msg, self.c2u.st.mask_out));
                self.tail = true;
                let _ =
                    tokio::time::timeout(CLOSE_WAIT, std::future::poll_fn(|cx| self.poll_io(cx)))
                        .await;
            }
        }
        let client_gone = matches!(end, End::ClientGone);
        let upstream_gone = matches!(end, End::UpstreamGone);
        let (client_open, upstream_open) = (self.u2c.st.open_out, self.c2u.st.open_out);
        let client_done = async {
            if !client_gone {
                let peer_closed = matches!(end, End::ClientClosed(_));
                close_hop(
                    &mut self.client,
                    client_open,
                    false,
                    peer_closed,
                    to_client,
                    client_wait,
                )
                .await;
            }
        };
        let upstream_done = async {
            if !upstream_gone {
                let peer_closed = matches!(end, End::UpstreamClosed(_));
                close_hop(
                    &mut self.upstream,
                    upstream_open,
                    true,
                    peer_closed,
                    to_upstream,
                    upstream_wait,
                )
                .await;
            }
        };
        tokio::join!(client_done, upstream_done);
        for flow in [&mut self.c2u, &mut self.u2c] {
            if let Some(a) = flow.st.assembly.take() {
                self.process.partial.release(a.reserved);
            }
        }
        (client_code, side)
    }
}

fn close_frame(msg: &CloseMsg, masked: bool) -> Vec<u8> {
    let mut payload = Vec::new();
    if let Some((code, reason)) = msg {
        payload.extend_from_slice(&code.to_be_bytes());
        // A reason is at most 123 bytes, cut at a character boundary.
        let mut end = reason.len().min(frame::MAX_CONTROL - 2);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        payload.extend_from_slice(reason.get(..end).unwrap_or_default().as_bytes());
    }
    let mut f = Vec::with_capacity(payload.len() + 6);
    frame::write_frame(&mut f, true, frame::OP_CLOSE, &payload, out_mask(masked));
    f
}

/// Sends a close frame (unless `msg` is `None`, or a relayed frame is still
/// open on this hop), shuts down the write side, then discards what still
/// arrives until the peer closes: the peer reads our close frame instead of
/// a reset. All of it within `wait`.
///
/// When the peer closed first (`peer_closed`), nothing can follow its close
/// frame, so there is nothing to drain and nothing to wait for: the
/// connection ends as soon as the answer is written, as RFC 6455 7.1.1 asks
/// of a server. Waiting for the peer's FIN instead would hold the session
/// (and its connection slot) open for as long as the client keeps its
/// socket.
async fn close_hop<S: AsyncRead + AsyncWrite + Unpin>(
    hop: &mut Hop<S>,
    open_out: bool,
    masked: bool,
    peer_closed: bool,
    msg: Option<CloseMsg>,
    wait: Duration,
) {
    let _ = tokio::time::timeout(wait, async {
        if let (Some(m), false) = (&msg, open_out) {
            hop.queue(&close_frame(m, masked));
        }
        if std::future::poll_fn(|cx| hop.poll_out(cx)).await.is_err() {
            return;
        }
        let _ = std::future::poll_fn(|cx| Pin::new(&mut hop.io).poll_shutdown(cx)).await;
        if peer_closed {
            return;
        }
        std::future::poll_fn(|cx| {
            READ.with_borrow_mut(|scratch| loop {
                if scratch.len() < SCRATCH {
                    scratch.resize(SCRATCH, 0);
                }
                let mut rb = ReadBuf::new(scratch);
                match Pin::new(&mut hop.io).poll_read(cx, &mut rb) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) if !rb.filled().is_empty() => continue,
                    Poll::Ready(_) => return Poll::Ready(()),
                }
            })
        })
        .await;
    })
    .await;
}

/// A timer a session may not have (`idle_timeout`, the wall-clock end of
/// [`first_deadline`]; both off by default): boxed, so that a session
/// without it holds a pointer in its future, not a `Sleep` (112 bytes).
type Timer = Option<Pin<Box<tokio::time::Sleep>>>;

/// Fires when `timer` does; never when there is none.
fn fired(timer: &mut Timer) -> impl std::future::Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| match timer {
        Some(t) => std::future::Future::poll(t.as_mut(), cx),
        None => Poll::Pending,
    })
}

enum Ev {
    End(End),
    Tick(Side),
    Idle,
}

/// Runs a session to the end and writes its access-log line.
///
/// `upstream_rest` holds the bytes the backend sent right after its 101
/// (read together with the handshake); they are its first frames.
pub fn run<C, U>(
    client: C,
    upstream: U,
    upstream_rest: Vec<u8>,
    rt: Arc<Generation>,
    process: Arc<Process>,
    info: SessionInfo,
) -> impl std::future::Future<Output = ()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    run_session(Box::new(Start {
        client,
        upstream,
        upstream_rest,
        rt,
        process,
        info,
    }))
}

/// What a session starts from, handed to its future in one box.
struct Start<C, U> {
    client: C,
    upstream: U,
    upstream_rest: Vec<u8>,
    rt: Arc<Generation>,
    process: Arc<Process>,
    info: SessionInfo,
}

/// [`run`]'s body. It takes its inputs boxed because an async fn keeps
/// its arguments in its future for its whole life, beside the locals they
/// are moved into: about 400 bytes per idle session. The box is freed as
/// soon as the session starts.
async fn run_session<C, U>(start: Box<Start<C, U>>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let Start {
        client,
        upstream,
        upstream_rest,
        rt,
        process,
        info,
    } = {
        // Moved into this block so that the emptied box is freed here,
        // not kept (allocated) until the session ends.
        let start = start;
        *start
    };
    let route = rt.policy.route(info.route);
    let limits = &route.limits;
    let ka = &route.keepalive;
    let max_message = u64::try_from(limits.max_message_size).unwrap_or(u64::MAX);
    let start = Instant::now();
    let mut eng = Engine {
        route,
        process: &process,
        bind: &info.bind,
        derive: &info.derive,
        subject: info.subject.as_deref().zip(rt.subject_messages.as_deref()),
        limiter: MessageLimiter::new(
            limits.per_connection_messages.as_ref(),
            limits.per_connection_bytes.as_ref(),
        ),
        client: Hop::new(client),
        upstream: Hop::new(upstream),
        c2u: Flow::new(
            Direction::C2s,
            Rules {
                masked: true,
                allow_rsv1: info.deflate_client.is_some(),
                max_frame: u64::try_from(limits.max_frame_size).unwrap_or(u64::MAX),
                max_message,
            },
        )
        .with_deflate(
            info.deflate_client,
            info.deflate_upstream,
            max_message,
            route.hmac.is_some(),
        ),
        // Backends send messages as one frame: no frame limit; the
        // message limit has room for a signature envelope.
        u2c: Flow::new(
            Direction::S2c,
            Rules {
                masked: false,
                allow_rsv1: info.deflate_upstream.is_some(),
                max_frame: u64::MAX,
                max_message: max_message.saturating_add(1024),
            },
        )
        .with_deflate(
            info.deflate_upstream,
            info.deflate_client,
            max_message.saturating_add(1024),
            route.hmac.is_some(),
        ),
        client_live: Liveness::new(ka.max_missed),
        upstream_live: Liveness::new(ka.max_missed),
        upstream_rest,
        tail: false,
        last_data: start,
    };
    process.metrics.connections_active.inc();
    let route_active = process.metrics.route_active(&route.prefix);
    route_active.inc();

    let mut client_ticker = keepalive::ticker(ka.interval);
    let mut upstream_ticker = keepalive::ticker(ka.upstream_interval);
    let client_stall = stall_limit(ka.interval, ka.max_missed);
    let upstream_stall = stall_limit(ka.upstream_interval, ka.max_missed);
    let idle = ka.idle_timeout;
    let mut shutdown = std::pin::pin!(process.shutdown.cancelled());
    let deadline = first_deadline(info.expires, limits.session_deadline(start));
    let mut expires: Timer = deadline.map(|(at, _)| Box::pin(tokio::time::sleep_until(at)));
    let mut idle_sleep: Timer = idle.map(|d| Box::pin(tokio::time::sleep_until(start + d)));
    let end = loop {
        let ev = tokio::select! {
            biased;
            // The policy in force at the drain decides the code.
            () = &mut shutdown => Ev::End(End::Shutdown(process.current().policy.shutdown_close_code)),
            e = std::future::poll_fn(|cx| eng.poll_io(cx)) => Ev::End(e),
            () = keepalive::tick(&mut client_ticker) => Ev::Tick(Side::Client),
            () = keepalive::tick(&mut upstream_ticker) => Ev::Tick(Side::Upstream),
            () = fired(&mut idle_sleep) => Ev::Idle,
            () = fired(&mut expires) => Ev::End(match deadline.map(|d| d.1) {
                Some(Timed::TooLong) => End::TooLong,
                _ => End::Policy("token expired", "token expired"),
            }),
        };
        match ev {
            Ev::End(e) => break e,
            Ev::Tick(side) => {
                let stall = match side {
                    Side::Client => client_stall,
                    Side::Upstream => upstream_stall,
                };
                if let Err(e) = eng.on_tick(side, stall) {
                    break e;
                }
            }
            Ev::Idle => {
                let deadline = eng.last_data + idle.unwrap_or_default();
                if Instant::now() >= deadline {
                    break End::Idle;
                }
                if let Some(t) = idle_sleep.as_mut() {
                    t.as_mut().reset(deadline);
                }
            }
        }
    };

    if let End::TooLong = end {
        process.metrics.session_duration_closes.inc();
    }

    // The close phase is boxed: its timers and close handshakes would
    // otherwise reserve room in every idle session's future.
    let (client_code, side) = Box::pin(eng.finish(&end)).await;

    process.metrics.connections_active.dec();
    route_active.dec();
    // `closed_by` is who ended the session: the client or the backend
    // (it closed or went away), or wsguard (it imposed the close: a limit,
    // a protocol violation, a dead peer, a timer, a drain). `fault` is the
    // side whose behaviour caused it, as in wsguard_session_closes_total's
    // `side` label; `reason` says what happened.
    let closed_by = match &end {
        End::ClientClosed(_) | End::ClientGone => "client",
        End::UpstreamClosed(_) | End::UpstreamGone => "backend",
        _ => "proxy",
    };
    let reason = match &end {
        End::Policy(_, r) => *r,
        End::ClientViolation(_, r) | End::UpstreamViolation(_, r) => *r,
        End::ClientDead => "client keepalive timeout",
        End::UpstreamDead => "backend keepalive timeout",
        End::Idle => "idle timeout",
        End::Overload => "partial message budget",
        End::TooLong => "session too long",
        End::Shutdown(_) => "shutting down",
        _ => "",
    };
    tracing::info!(
        target: "access",
        client = %info.peer,
        path = %info.path,
        request_id = %info.request_id,
        duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        msgs_c2s = eng.c2u.st.msgs,
        msgs_s2c = eng.u2c.st.msgs,
        bytes_c2s = eng.c2u.st.bytes,
        bytes_s2c = eng.u2c.st.bytes,
        close_code = client_code,
        closed_by,
        fault = side,
        reason,
        "session closed"
    );
    drop(eng);
    // Named, so the future owns them: an async block captures only the
    // fields it uses, and these slots must live as long as the session.
    drop((info.slot, info.subject_slot));
    // The fleet-wide lease goes back before the task ends (bounded by
    // limits.shared.timeout), so a graceful shutdown waits for it.
    // Boxed: the release's Redis round trip is about 1 KiB of future state,
    // which would otherwise be reserved in every session's task for its
    // whole life.
    if let Some(lease) = info.shared_slot {
        Box::pin(lease.release()).await;
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
        1013 => "1013",
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
