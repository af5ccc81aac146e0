//! Inflating and deflating permessage-deflate messages (RFC 7692 section
//! 7.2), with the output cap and budget that keep a compression bomb from
//! becoming a memory hole.
//!
//! - [`Inflater`] takes a message frame by frame. The cap
//!   (`max_message_size`, applied to the decompressed size) is checked after
//!   every chunk the inflater writes, and the output space it is given never
//!   exceeds what is left under the cap plus one byte, so a message that
//!   would inflate past the cap stops there: wsguard never holds more than
//!   `cap + 1` bytes of it. Each growth of an assembled message's buffer is
//!   reserved from the process-wide [`InflateBudget`] first.
//! - [`Deflater`] compresses a message, whole or frame by frame, and strips
//!   the `00 00 ff ff` tail of the final sync flush.
//!
//! Without context takeover, the zlib state lives only while a message is
//! in progress: it comes from a small per-thread pool and goes back to it
//! when the message ends, so an idle session holds no compression memory.
//! With context takeover the state (and its LZ77 window) belongs to the
//! session for its whole life.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::budget::{InflateBudget, Reservation};
use super::negotiate::MIN_DEFLATE_BITS;
use std::sync::Arc;

/// The empty stored block's tail that the sender strips and the receiver
/// appends (RFC 7692 sections 7.2.1 and 7.2.2).
pub const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// zlib level for what wsguard compresses. Chosen by measurement
/// (docs/benchmarks.md, "permessage-deflate").
pub const LEVEL: u32 = 6;

/// How far an assembled message's buffer grows at first; it then doubles,
/// never past the cap.
const FIRST_CHUNK: usize = 4 * 1024;

/// The streaming output chunk of [`Inflater::inflate_chunks`].
const STREAM_CHUNK: usize = 16 * 1024;

/// zlib states kept per thread and window size. Four inflaters cost about
/// 4 × 40 KiB, four deflaters about 4 × 270 KiB at 15 bits.
const POOL_MAX: usize = 4;

/// Why a compressed message cannot be delivered. Each maps to the close
/// code a peer sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// The message inflates past `max_message_size` (1009).
    #[error("message inflates beyond {limit} bytes")]
    TooBig { limit: usize },
    /// The process-wide inflate budget is spent (1013 Try Again Later: the
    /// message may be fine, the proxy is busy).
    #[error("inflate budget exhausted")]
    Busy,
    /// The data is not valid DEFLATE (1007). RFC 7692 names no code; like
    /// the `ws` library, wsguard treats it as message data inconsistent with
    /// the message's type, not as a framing error (1002): the frames were
    /// well formed.
    #[error("invalid compressed data: {0}")]
    Corrupt(String),
}

impl InflateError {
    pub fn close_code(&self) -> u16 {
        match self {
            InflateError::TooBig { .. } => 1009,
            InflateError::Busy => 1013,
            InflateError::Corrupt(_) => 1007,
        }
    }
}

/// A compressor failure: never expected from valid state (1011).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("deflate failed: {0}")]
pub struct DeflateError(String);

thread_local! {
    /// [`Inflater::inflate_chunks`]'s output chunk (empty while in use).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(Box::default());
    static INFLATERS: RefCell<Vec<(u8, Decompress)>> = const { RefCell::new(Vec::new()) };
    static DEFLATERS: RefCell<Vec<(u8, Compress)>> = const { RefCell::new(Vec::new()) };
}

/// flate2 panics on windows outside 9..=15; a stream compressed with an
/// 8-bit window inflates fine with a 9-bit one.
fn inflate_bits(bits: u8) -> u8 {
    bits.clamp(MIN_DEFLATE_BITS, 15)
}

/// A per-thread pool of zlib states, keyed by window bits.
type Pool<T> = std::thread::LocalKey<RefCell<Vec<(u8, T)>>>;

/// A pooled state for `bits`, if this thread has one.
fn take_pooled<T: 'static>(pool: &'static Pool<T>, bits: u8) -> Option<T> {
    pool.try_with(|p| {
        let mut p = p.try_borrow_mut().ok()?;
        let i = p.iter().rposition(|(b, _)| *b == bits)?;
        Some(p.swap_remove(i).1)
    })
    .ok()
    .flatten()
}

/// Gives a (reset) state back to this thread's pool, unless it is full.
fn give_pooled<T: 'static>(pool: &'static Pool<T>, bits: u8, state: T) {
    let _ = pool.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if p.len() < POOL_MAX {
                p.push((bits, state));
            }
        }
    });
}

fn take_inflater(bits: u8) -> Decompress {
    take_pooled(&INFLATERS, bits)
        .unwrap_or_else(|| Decompress::new_with_window_bits(false, inflate_bits(bits)))
}

fn give_inflater(bits: u8, mut d: Decompress) {
    d.reset(false);
    give_pooled(&INFLATERS, bits, d);
}

fn take_deflater(bits: u8) -> Compress {
    take_pooled(&DEFLATERS, bits)
        .unwrap_or_else(|| Compress::new_with_window_bits(Compression::new(LEVEL), false, bits))
}

fn give_deflater(bits: u8, mut c: Compress) {
    c.reset();
    give_pooled(&DEFLATERS, bits, c);
}

/// Where inflated bytes go: the core loop asks for room and reports what it
/// wrote into it.
trait Sink {
    /// Room for at most `max` (>= 1) more bytes, at least one.
    fn room(&mut self, max: usize) -> Result<&mut [u8], InflateError>;
    /// `n` bytes were written at the start of the last room.
    fn wrote(&mut self, n: usize) -> Result<(), InflateError>;
}

/// An inflated message being assembled, with the budget it holds. Drop it
/// (or take its bytes with [`Inflated::into_parts`]) to give the budget
/// back.
#[derive(Debug)]
pub struct Inflated {
    buf: Vec<u8>,
    hold: Reservation,
    /// Length of `buf` before the room last handed out.
    mark: usize,
}

impl Inflated {
    pub fn new(budget: &Arc<InflateBudget>) -> Self {
        Inflated {
            buf: Vec::new(),
            hold: budget.reserve(),
            mark: 0,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes allocated for the message (never more than the cap plus one).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes of the budget this message holds.
    pub fn reserved(&self) -> usize {
        self.hold.bytes()
    }

    /// The message, and the reservation to keep as long as the bytes live.
    pub fn into_parts(self) -> (Vec<u8>, Reservation) {
        (self.buf, self.hold)
    }
}

impl Sink for Inflated {
    fn room(&mut self, max: usize) -> Result<&mut [u8], InflateError> {
        let len = self.buf.len();
        self.mark = len;
        if self.hold.bytes() <= len {
            // Grow by doubling, never past what the cap leaves. The budget
            // is charged before the allocation, for what is asked.
            let want = len
                .saturating_mul(2)
                .max(FIRST_CHUNK)
                .min(len.saturating_add(max));
            let more = want.saturating_sub(len).max(1);
            if !self.hold.grow(more) {
                return Err(InflateError::Busy);
            }
            self.buf.reserve_exact(self.hold.bytes() - len);
        }
        // Hand out only what the budget covers and the cap allows.
        let n = (self.hold.bytes() - len).min(max).max(1);
        self.buf.resize(len + n, 0);
        Ok(self.buf.get_mut(len..).unwrap_or_default())
    }

    fn wrote(&mut self, n: usize) -> Result<(), InflateError> {
        // `room` extended the buffer with zeros; keep what was written.
        self.buf.truncate(self.mark.saturating_add(n));
        Ok(())
    }
}

/// Streams inflated bytes to a callback through a fixed scratch chunk.
struct Chunks<'a> {
    scratch: Box<[u8]>,
    f: &'a mut dyn FnMut(&[u8]) -> Result<(), InflateError>,
}

impl Sink for Chunks<'_> {
    fn room(&mut self, max: usize) -> Result<&mut [u8], InflateError> {
        let n = max.clamp(1, self.scratch.len());
        Ok(self.scratch.get_mut(..n).unwrap_or_default())
    }

    fn wrote(&mut self, n: usize) -> Result<(), InflateError> {
        if n == 0 {
            return Ok(());
        }
        (self.f)(self.scratch.get(..n).unwrap_or_default())
    }
}

/// Inflates the messages of one direction of one hop.
#[derive(Debug)]
pub struct Inflater {
    state: Option<Decompress>,
    window_bits: u8,
    context_takeover: bool,
    /// Decompressed bytes of the current message so far.
    produced: usize,
    /// The current message's DEFLATE data reached a final block (BFINAL);
    /// whatever follows in the message is ignored (RFC 7692 section
    /// 7.2.3.4 shows such a message).
    ended: bool,
}

impl Inflater {
    /// `window_bits` is the peer's window (8..=15); `context_takeover`
    /// whether the peer may refer back to earlier messages.
    pub fn new(window_bits: u8, context_takeover: bool) -> Self {
        Inflater {
            state: None,
            window_bits: inflate_bits(window_bits),
            context_takeover,
            produced: 0,
            ended: false,
        }
    }

    /// Whether this inflater holds zlib memory right now. Without context
    /// takeover it does only while a message is in progress.
    pub fn holds_state(&self) -> bool {
        self.state.is_some()
    }

    /// Inflates one frame's `payload` of the current message into `out`;
    /// `fin` marks the message's last frame. On error the message is
    /// abandoned (the session closes).
    pub fn inflate_into(
        &mut self,
        payload: &[u8],
        fin: bool,
        limit: usize,
        out: &mut Inflated,
    ) -> Result<(), InflateError> {
        let r = self.message_part(payload, fin, limit, out);
        self.settle(fin, &r);
        r
    }

    /// Like [`Inflater::inflate_into`], but hands the inflated bytes to
    /// `f` in chunks of at most 16 KiB and keeps none: for counting the
    /// decompressed size or validating UTF-8 of a message that is relayed
    /// compressed.
    pub fn inflate_chunks(
        &mut self,
        payload: &[u8],
        fin: bool,
        limit: usize,
        f: &mut dyn FnMut(&[u8]) -> Result<(), InflateError>,
    ) -> Result<(), InflateError> {
        // One scratch chunk per thread, not per call: a relayed frame's
        // payload arrives in many small reads.
        let scratch = SCRATCH
            .try_with(|s| s.try_borrow_mut().ok().map(|mut s| std::mem::take(&mut *s)))
            .ok()
            .flatten()
            .filter(|s| s.len() == STREAM_CHUNK)
            .unwrap_or_else(|| vec![0; STREAM_CHUNK].into_boxed_slice());
        let mut sink = Chunks { scratch, f };
        let r = self.message_part(payload, fin, limit, &mut sink);
        let scratch = sink.scratch;
        let _ = SCRATCH.try_with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                *s = scratch;
            }
        });
        self.settle(fin, &r);
        r
    }

    fn message_part(
        &mut self,
        payload: &[u8],
        fin: bool,
        limit: usize,
        sink: &mut dyn Sink,
    ) -> Result<(), InflateError> {
        self.feed(payload, limit, sink)?;
        if fin {
            self.feed(&TAIL, limit, sink)?;
        }
        Ok(())
    }

    /// After a message (or an error): start the next message clean and,
    /// without context takeover, give the zlib state back to the pool.
    fn settle(&mut self, fin: bool, r: &Result<(), InflateError>) {
        if !(fin || r.is_err()) {
            return;
        }
        self.produced = 0;
        let restart = !self.context_takeover || self.ended || r.is_err();
        self.ended = false;
        if restart {
            if let Some(d) = self.state.take() {
                if self.context_takeover {
                    // A session's own state is not shared once it ended oddly.
                    drop(d);
                } else {
                    give_inflater(self.window_bits, d);
                }
            }
        }
    }

    fn feed(
        &mut self,
        mut input: &[u8],
        limit: usize,
        sink: &mut dyn Sink,
    ) -> Result<(), InflateError> {
        let mut more_output = false;
        while !self.ended && (!input.is_empty() || more_output) {
            // One byte past the cap is how an over-size message shows.
            let left = limit.saturating_sub(self.produced).saturating_add(1);
            let bits = self.window_bits;
            let d = self.state.get_or_insert_with(|| take_inflater(bits));
            let room = sink.room(left)?;
            let room_len = room.len();
            let (in0, out0) = (d.total_in(), d.total_out());
            let status = d
                .decompress(input, room, FlushDecompress::Sync)
                .map_err(|e| InflateError::Corrupt(e.to_string()))?;
            let used = usize::try_from(d.total_in() - in0).unwrap_or(usize::MAX);
            let wrote = usize::try_from(d.total_out() - out0).unwrap_or(usize::MAX);
            input = input.get(used..).unwrap_or_default();
            self.produced = self.produced.saturating_add(wrote);
            if self.produced > limit {
                return Err(InflateError::TooBig { limit });
            }
            sink.wrote(wrote)?;
            match status {
                Status::StreamEnd => self.ended = true,
                Status::Ok | Status::BufError => {
                    if used == 0 && wrote == 0 {
                        if input.is_empty() {
                            break;
                        }
                        return Err(InflateError::Corrupt("inflate made no progress".into()));
                    }
                }
            }
            // A full room may mean zlib has more output pending.
            more_output = wrote == room_len;
        }
        Ok(())
    }
}

/// Compresses the messages of one direction of one hop.
#[derive(Debug)]
pub struct Deflater {
    state: Option<Compress>,
    window_bits: u8,
    context_takeover: bool,
}

impl Deflater {
    /// `None` for a window wsguard cannot compress with (see
    /// [`MIN_DEFLATE_BITS`]): send that hop's messages uncompressed.
    pub fn new(window_bits: u8, context_takeover: bool) -> Option<Self> {
        (MIN_DEFLATE_BITS..=15)
            .contains(&window_bits)
            .then_some(Deflater {
                state: None,
                window_bits,
                context_takeover,
            })
    }

    pub fn holds_state(&self) -> bool {
        self.state.is_some()
    }

    /// Appends the compressed form of `data`, the next part of the current
    /// message, to `out`. With `fin` the message ends: the output is
    /// sync-flushed and its `00 00 ff ff` tail removed. A message can be
    /// compressed in one call (`fin` true) or frame by frame.
    pub fn deflate(
        &mut self,
        data: &[u8],
        fin: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), DeflateError> {
        let start = out.len();
        let r = self.run(data, fin, out);
        if r.is_err() {
            // A failed state is never reused; the message is abandoned.
            self.state = None;
            out.truncate(start);
        } else if fin && !self.context_takeover {
            if let Some(c) = self.state.take() {
                give_deflater(self.window_bits, c);
            }
        }
        r
    }

    fn run(&mut self, mut data: &[u8], fin: bool, out: &mut Vec<u8>) -> Result<(), DeflateError> {
        let bits = self.window_bits;
        let c = self.state.get_or_insert_with(|| take_deflater(bits));
        let flush = if fin {
            FlushCompress::Sync
        } else {
            FlushCompress::None
        };
        let start = out.len();
        out.reserve((data.len() / 2).clamp(64, 64 * 1024));
        loop {
            if out.capacity() == out.len() {
                out.reserve(out.len().saturating_sub(start).clamp(64, 256 * 1024));
            }
            let spare = out.capacity() - out.len();
            let (in0, out0) = (c.total_in(), c.total_out());
            c.compress_vec(data, out, flush)
                .map_err(|e| DeflateError(e.to_string()))?;
            let used = usize::try_from(c.total_in() - in0).unwrap_or(usize::MAX);
            let wrote = usize::try_from(c.total_out() - out0).unwrap_or(usize::MAX);
            data = data.get(used..).unwrap_or_default();
            // Done when all input is in and zlib did not fill the space it
            // had (a full buffer may hide pending flush output).
            if data.is_empty() && wrote < spare {
                break;
            }
        }
        if fin {
            // A sync flush ends with an empty stored block; RFC 7692
            // section 7.2.1 sends the message without its last four octets.
            if out.len() - start >= TAIL.len() && out.ends_with(&TAIL) {
                out.truncate(out.len() - TAIL.len());
            } else {
                return Err(DeflateError(
                    "sync flush did not end with 00 00 ff ff".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: [u8; 7] = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];

    fn budget() -> Arc<InflateBudget> {
        InflateBudget::new(1 << 30)
    }

    fn inflate(
        inf: &mut Inflater,
        frames: &[&[u8]],
        limit: usize,
    ) -> Result<Vec<u8>, InflateError> {
        let b = budget();
        let mut out = Inflated::new(&b);
        for (i, f) in frames.iter().enumerate() {
            inf.inflate_into(f, i + 1 == frames.len(), limit, &mut out)?;
        }
        Ok(out.into_parts().0)
    }

    fn deflate_all(def: &mut Deflater, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        def.deflate(data, true, &mut out).unwrap();
        out
    }

    #[test]
    fn rfc_7692_hello() {
        // Section 7.2.3.1: one compressed message, and the same split in two frames.
        let mut inf = Inflater::new(15, false);
        assert_eq!(inflate(&mut inf, &[&HELLO], 100).unwrap(), b"Hello");
        assert_eq!(
            inflate(&mut inf, &[&HELLO[..3], &HELLO[3..]], 100).unwrap(),
            b"Hello"
        );
        assert!(
            !inf.holds_state(),
            "no state between messages without takeover"
        );
        // wsguard's own compression of "Hello" is the RFC's bytes.
        let mut def = Deflater::new(15, false).unwrap();
        assert_eq!(deflate_all(&mut def, b"Hello"), HELLO);
        assert!(!def.holds_state());
    }

    #[test]
    fn rfc_7692_shared_window() {
        // Section 7.2.3.2: the second "Hello" refers back into the first.
        let second: &[u8] = &[0xf2, 0x00, 0x11, 0x00, 0x00];
        let mut inf = Inflater::new(15, true);
        assert_eq!(inflate(&mut inf, &[&HELLO], 100).unwrap(), b"Hello");
        assert!(inf.holds_state(), "context takeover keeps the window");
        assert_eq!(inflate(&mut inf, &[second], 100).unwrap(), b"Hello");
        // Without context takeover the reference points at nothing.
        let mut fresh = Inflater::new(15, false);
        assert_eq!(inflate(&mut fresh, &[&HELLO], 100).unwrap(), b"Hello");
        let err = inflate(&mut fresh, &[second], 100).unwrap_err();
        assert!(matches!(err, InflateError::Corrupt(_)), "{err:?}");
        assert_eq!(err.close_code(), 1007);
        // And the inflater recovers for the next message.
        assert_eq!(inflate(&mut fresh, &[&HELLO], 100).unwrap(), b"Hello");

        // wsguard's deflater with context takeover produces the same bytes.
        let mut def = Deflater::new(15, true).unwrap();
        assert_eq!(deflate_all(&mut def, b"Hello"), HELLO);
        assert_eq!(deflate_all(&mut def, b"Hello"), second);
        assert!(def.holds_state());
    }

    #[test]
    fn rfc_7692_other_block_kinds() {
        let mut inf = Inflater::new(15, false);
        // 7.2.3.3: a stored (uncompressed) block.
        let stored: &[u8] = &[
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ];
        assert_eq!(inflate(&mut inf, &[stored], 100).unwrap(), b"Hello");
        // 7.2.3.4: BFINAL set, with an octet after the final block.
        let bfinal: &[u8] = &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        assert_eq!(inflate(&mut inf, &[bfinal], 100).unwrap(), b"Hello");
        // 7.2.3.5: two DEFLATE blocks in one message.
        let two: &[u8] = &[
            0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
        ];
        assert_eq!(inflate(&mut inf, &[two], 100).unwrap(), b"Hello");
        // An empty message: the single 0x00 of 7.2.3.6, and no payload at all.
        assert_eq!(inflate(&mut inf, &[&[0x00]], 100).unwrap(), b"");
        assert_eq!(inflate(&mut inf, &[&[]], 100).unwrap(), b"");
        let mut def = Deflater::new(15, false).unwrap();
        assert_eq!(deflate_all(&mut def, b""), [0x00]);
        // After a BFINAL message a context-takeover inflater starts over.
        let mut inf = Inflater::new(15, true);
        assert_eq!(inflate(&mut inf, &[bfinal], 100).unwrap(), b"Hello");
        assert_eq!(inflate(&mut inf, &[&HELLO], 100).unwrap(), b"Hello");
    }

    #[test]
    fn corrupt_data_is_1007() {
        let mut inf = Inflater::new(15, false);
        // BTYPE 11 is reserved.
        let err = inflate(&mut inf, &[&[0xff, 0xff, 0xff]], 100).unwrap_err();
        assert_eq!(err.close_code(), 1007);
        // A stored block whose NLEN does not match LEN.
        let err = inflate(
            &mut inf,
            &[&[0x00, 0x05, 0x00, 0x00, 0x00, 1, 2, 3, 4, 5]],
            100,
        )
        .unwrap_err();
        assert_eq!(err.close_code(), 1007);
        assert_eq!(inflate(&mut inf, &[&HELLO], 100).unwrap(), b"Hello");
    }

    fn json_like(n: usize) -> Vec<u8> {
        let mut s = String::new();
        let mut i = 0u64;
        while s.len() < n {
            s.push_str(&format!(
                "{{\"id\":{i},\"sym\":\"AB{}\",\"px\":{}.{:02},\"qty\":{}}},",
                i % 37,
                1000 + (i * 7919) % 500,
                i % 100,
                (i * 31) % 1000
            ));
            i += 1;
        }
        s.truncate(n);
        s.into_bytes()
    }

    #[test]
    fn round_trips_in_every_window_and_mode() {
        let data = json_like(200 * 1024);
        for bits in 9..=15 {
            for takeover in [false, true] {
                let mut def = Deflater::new(bits, takeover).unwrap();
                let mut inf = Inflater::new(bits, takeover);
                for _ in 0..3 {
                    let z = deflate_all(&mut def, &data);
                    assert!(z.len() < data.len() / 3, "bits {bits}: {}", z.len());
                    assert_eq!(inflate(&mut inf, &[&z], data.len()).unwrap(), data);
                }
                // Frame by frame on both sides.
                let mut z = Vec::new();
                let mut frames = Vec::new();
                for (i, part) in data.chunks(10_000).enumerate() {
                    let fin = (i + 1) * 10_000 >= data.len();
                    let at = z.len();
                    def.deflate(part, fin, &mut z).unwrap();
                    frames.push(at..z.len());
                }
                let frames: Vec<&[u8]> = frames.into_iter().map(|r| &z[r]).collect();
                assert_eq!(inflate(&mut inf, &frames, data.len()).unwrap(), data);
            }
        }
        assert!(Deflater::new(8, false).is_none());
        assert!(Deflater::new(16, false).is_none());
        // A window-8 stream inflates with the 9-bit minimum flate2 allows.
        let mut inf = Inflater::new(8, false);
        assert_eq!(inflate(&mut inf, &[&HELLO], 10).unwrap(), b"Hello");
    }

    #[test]
    fn small_window_is_honoured_when_deflating() {
        // A match 1000 bytes back needs a window over 512 bytes: a 9-bit
        // stream must not use it, so a 9-bit inflater reads it back.
        let block: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let data = [block.clone(), block].concat();
        let mut def9 = Deflater::new(9, false).unwrap();
        let z9 = deflate_all(&mut def9, &data);
        let mut def15 = Deflater::new(15, false).unwrap();
        let z15 = deflate_all(&mut def15, &data);
        assert!(
            z15.len() < z9.len(),
            "15 bits finds the long match: {} vs {}",
            z15.len(),
            z9.len()
        );
        let mut inf9 = Inflater::new(9, false);
        assert_eq!(inflate(&mut inf9, &[&z9], 10_000).unwrap(), data);
    }

    /// Few KiB on the wire, 16 MiB inflated.
    fn bomb() -> Vec<u8> {
        let mut def = Deflater::new(15, false).unwrap();
        let mut z = Vec::new();
        let zeros = vec![0u8; 1 << 20];
        for i in 0..16 {
            def.deflate(&zeros, i == 15, &mut z).unwrap();
        }
        z
    }

    #[test]
    fn bomb_stops_at_the_cap_with_bounded_memory() {
        let z = bomb();
        assert!(z.len() < 32 * 1024, "bomb is {} bytes", z.len());
        let limit = 1 << 20;
        let b = budget();
        let mut inf = Inflater::new(15, false);
        let mut out = Inflated::new(&b);
        let err = inf.inflate_into(&z, true, limit, &mut out).unwrap_err();
        assert_eq!(err, InflateError::TooBig { limit });
        assert_eq!(err.close_code(), 1009);
        assert!(out.capacity() <= limit + 1, "allocated {}", out.capacity());
        assert!(out.reserved() <= limit + 1);
        assert!(!inf.holds_state());
        drop(out);
        assert_eq!(b.used(), 0);
        // The same bomb split into many frames stops at the same point.
        let mut out = Inflated::new(&b);
        let mut res = Ok(());
        for (i, part) in z.chunks(100).enumerate() {
            res = inf.inflate_into(part, (i + 1) * 100 >= z.len(), limit, &mut out);
            if res.is_err() {
                break;
            }
        }
        assert_eq!(res, Err(InflateError::TooBig { limit }));
        assert!(out.capacity() <= limit + 1);
        // Streamed: chunks handed out never add up past the cap.
        let mut seen = 0usize;
        let err = inf
            .inflate_chunks(&z, true, limit, &mut |c| {
                seen += c.len();
                Ok(())
            })
            .unwrap_err();
        assert_eq!(err, InflateError::TooBig { limit });
        assert!(seen <= limit, "{seen}");
        // Exactly at the cap is fine.
        let mut out = Inflated::new(&b);
        inf.inflate_into(&z, true, 16 << 20, &mut out).unwrap();
        assert_eq!(out.len(), 16 << 20);
        assert_eq!(out.capacity(), (16 << 20) + 1);
    }

    #[test]
    fn budget_exhaustion_is_1013_and_nothing_leaks() {
        let z = bomb();
        let b = InflateBudget::new(64 * 1024);
        let mut inf = Inflater::new(15, false);
        let mut out = Inflated::new(&b);
        let err = inf.inflate_into(&z, true, 1 << 30, &mut out).unwrap_err();
        assert_eq!(err, InflateError::Busy);
        assert_eq!(err.close_code(), 1013);
        assert!(out.capacity() <= 64 * 1024);
        assert!(b.used() <= 64 * 1024);
        drop(out);
        assert_eq!(b.used(), 0);
        // A small message still fits afterwards.
        let mut out = Inflated::new(&b);
        inf.inflate_into(&HELLO, true, 100, &mut out).unwrap();
        assert_eq!(out.as_slice(), b"Hello");
    }

    #[test]
    fn callback_errors_stop_inflating() {
        let data = json_like(100_000);
        let mut def = Deflater::new(15, false).unwrap();
        let z = deflate_all(&mut def, &data);
        let mut inf = Inflater::new(15, false);
        let mut calls = 0;
        let err = inf
            .inflate_chunks(&z, true, usize::MAX, &mut |_| {
                calls += 1;
                Err(InflateError::Corrupt("invalid utf-8".into()))
            })
            .unwrap_err();
        assert_eq!(calls, 1);
        assert_eq!(err, InflateError::Corrupt("invalid utf-8".into()));
        let mut total = 0;
        inf.inflate_chunks(&z, true, usize::MAX, &mut |c| {
            assert!(c.len() <= STREAM_CHUNK);
            total += c.len();
            Ok(())
        })
        .unwrap();
        assert_eq!(total, data.len());
    }
}
