//! RFC 6455 framing: an incremental, validating frame decoder and the
//! small pieces a proxy needs to write frames.
//!
//! The decoder is pure: it takes whatever bytes one read produced, unmasks
//! payload bytes in place, and calls a [`Sink`] with frame starts, payload
//! chunks, frame ends and whole control frames. It never buffers a data
//! payload: a proxy relays the bytes as they arrive. What it keeps between
//! reads is at most an unfinished header (14 bytes, inline) and an
//! unfinished control frame (up to 125 bytes, on the heap only while a read
//! has cut it; a control frame whole in one read is delivered in place).
//!
//! Validation (each rule fails as early as the bytes allow, so a peer learns
//! about its error without having to send a whole frame first):
//! - masking per direction: a client's frames are masked, a server's not;
//! - reserved bits: none is allowed unless an extension was negotiated
//!   (`allow_rsv1` is the switch for permessage-deflate, per hop);
//! - opcodes 3-7 and 11-15 are reserved;
//! - control frames carry at most 125 bytes and are never fragmented;
//! - a continuation needs a message to continue, and a new data message may
//!   not start inside another one;
//! - text is valid UTF-8, checked incrementally across frames, and fails as
//!   soon as the bytes can no longer become valid;
//! - frame and message size limits.

use thiserror::Error;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest control frame payload (RFC 6455 section 5.5).
pub const MAX_CONTROL: usize = 125;
/// Largest frame header: 2 + 8 (length) + 4 (mask).
pub const MAX_HEADER: usize = 14;

/// A peer broke the protocol or a limit. Each maps to one close code
/// (contract section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("invalid utf-8")]
    Utf8,
    #[error("{0}")]
    TooBig(&'static str),
    /// Message data inconsistent with its type, other than UTF-8 (a
    /// compressed message that does not inflate): 1007.
    #[error("{0}")]
    BadData(&'static str),
}

impl FrameError {
    /// The close code this error is answered with.
    pub fn code(&self) -> u16 {
        match self {
            FrameError::Protocol(_) => 1002,
            FrameError::Utf8 => 1007,
            FrameError::TooBig(_) => 1009,
            FrameError::BadData(_) => 1007,
        }
    }

    /// The close reason (short, static, safe to send).
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::Protocol(_) => "protocol error",
            FrameError::Utf8 => "invalid utf-8",
            FrameError::TooBig(r) | FrameError::BadData(r) => r,
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1..RSV3 as the three low bits (RSV1 = 0b100).
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// What one hop's frames must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Frames from a client are masked; frames from a server are not.
    pub masked: bool,
    /// RSV1 may be set on the first frame of a data message (only once
    /// permessage-deflate was negotiated on this hop).
    pub allow_rsv1: bool,
    /// Largest frame payload.
    pub max_frame: u64,
    /// Largest message (sum of its frames' payloads).
    pub max_message: u64,
}

/// Checks the first two header bytes: everything that does not need the
/// extended length.
fn check_first(b0: u8, b1: u8, rules: &Rules) -> Result<(), FrameError> {
    let opcode = b0 & 0x0F;
    let rsv = (b0 >> 4) & 0x7;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7F;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
        _ => return Err(FrameError::Protocol("reserved opcode")),
    }
    let rsv1_ok = rules.allow_rsv1 && (opcode == OP_TEXT || opcode == OP_BINARY);
    if rsv & 0b011 != 0 || (rsv & 0b100 != 0 && !rsv1_ok) {
        return Err(FrameError::Protocol("reserved bits set"));
    }
    if masked != rules.masked {
        return Err(FrameError::Protocol(if rules.masked {
            "unmasked frame"
        } else {
            "masked frame from a server"
        }));
    }
    if opcode & 0x8 != 0 {
        if !fin {
            return Err(FrameError::Protocol("fragmented control frame"));
        }
        if usize::from(len7) > MAX_CONTROL {
            return Err(FrameError::Protocol("control frame too long"));
        }
    }
    Ok(())
}

/// Parses a header at the start of `buf`. `Ok(None)`: not all there yet
/// (whatever is there is already valid as far as it goes).
pub fn parse_header(buf: &[u8], rules: &Rules) -> Result<Option<(Header, usize)>, FrameError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    check_first(b0, b1, rules)?;
    let masked = b1 & 0x80 != 0;
    let (ext, len) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (2, u64::from(u16::from_be_bytes([b[0], b[1]]))),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => {
                let n = u64::from_be_bytes(b);
                if n >> 63 != 0 {
                    return Err(FrameError::Protocol("frame length has its top bit set"));
                }
                (8, n)
            }
            None => return Ok(None),
        },
        n => (0, u64::from(n)),
    };
    let mut at = 2 + ext;
    let mask = if masked {
        match buf
            .get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
        {
            Some(m) => {
                at += 4;
                Some(m)
            }
            None => return Ok(None),
        }
    } else {
        None
    };
    Ok(Some((
        Header {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x7,
            opcode: b0 & 0x0F,
            mask,
            len,
        },
        at,
    )))
}

/// Appends a frame header.
pub fn write_header(
    out: &mut Vec<u8>,
    fin: bool,
    rsv: u8,
    opcode: u8,
    len: u64,
    mask: Option<[u8; 4]>,
) {
    let b0 = (u8::from(fin) << 7) | ((rsv & 0x7) << 4) | (opcode & 0x0F);
    let m = if mask.is_some() { 0x80 } else { 0 };
    out.push(b0);
    if len < 126 {
        out.push(m | len as u8);
    } else if let Ok(l16) = u16::try_from(len) {
        out.push(m | 126);
        out.extend_from_slice(&l16.to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
}

/// Appends a whole frame (header and payload, masked when `mask` is set).
pub fn write_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    write_header(out, fin, 0, opcode, payload.len() as u64, mask);
    match mask {
        Some(k) => mask_extend(out, payload, k, 0),
        None => out.extend_from_slice(payload),
    }
}

/// The mask key as seen from payload position `offset`.
fn rotated(mask: [u8; 4], offset: usize) -> [u8; 4] {
    let mut k = mask;
    k.rotate_left(offset % 4);
    k
}

/// XORs `buf` with `mask`, `buf` starting at payload position `offset`.
/// (Masking and unmasking are the same operation.)
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let k = rotated(mask, offset);
    let k8 = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = u64::from_ne_bytes(w) ^ k8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= k[i % 4];
    }
}

/// Appends `src` masked with `mask` (from payload position `offset`).
pub fn mask_extend(out: &mut Vec<u8>, src: &[u8], mask: [u8; 4], offset: usize) {
    let start = out.len();
    out.extend_from_slice(src);
    if let Some(tail) = out.get_mut(start..) {
        apply_mask(tail, mask, offset);
    }
}

/// Incremental UTF-8 validation across chunks and frames. Holds at most the
/// three bytes of a code point cut by a chunk boundary.
#[derive(Debug, Default, Clone, Copy)]
pub struct Utf8 {
    buf: [u8; 4],
    len: u8,
}

impl Utf8 {
    /// Validates the next chunk; fails as soon as the bytes so far can no
    /// longer be the start of valid UTF-8.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), FrameError> {
        while self.len > 0 {
            let Some((&b, rest)) = data.split_first() else {
                return Ok(());
            };
            let n = usize::from(self.len);
            if let Some(slot) = self.buf.get_mut(n) {
                *slot = b;
            }
            self.len += 1;
            data = rest;
            match std::str::from_utf8(self.buf.get(..n + 1).unwrap_or_default()) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_some() => return Err(FrameError::Utf8),
                Err(_) if n + 1 >= 4 => return Err(FrameError::Utf8),
                Err(_) => {}
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(FrameError::Utf8),
            Err(e) => {
                let tail = data.get(e.valid_up_to()..).unwrap_or_default();
                if tail.len() > 3 {
                    return Err(FrameError::Utf8);
                }
                if let Some(b) = self.buf.get_mut(..tail.len()) {
                    b.copy_from_slice(tail);
                }
                self.len = tail.len() as u8;
                Ok(())
            }
        }
    }

    /// The message ended: a cut code point left over is invalid.
    pub fn finish(&mut self) -> Result<(), FrameError> {
        let ok = self.len == 0;
        self.len = 0;
        if ok {
            Ok(())
        } else {
            Err(FrameError::Utf8)
        }
    }
}

/// Close codes that may travel on the wire (contract section 4).
pub fn close_code_ok(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Validates a close frame's payload: `None` for an empty one (no status),
/// else the code and the reason.
pub fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::Protocol("close payload of one byte")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !close_code_ok(code) {
                return Err(FrameError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::Utf8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// What the decoder hands out. Every method may stop decoding with an error
/// of the sink's own (a guard's verdict, a close frame).
pub trait Sink {
    type Error: From<FrameError>;
    /// A data frame begins. `message_op` is the message's opcode (text or
    /// binary), also for continuation frames; `first` marks a message's
    /// first frame. Size limits were checked already.
    fn frame_start(&mut self, h: &Header, message_op: u8, first: bool) -> Result<(), Self::Error>;
    /// Unmasked payload bytes of the current data frame (text: validated so
    /// far).
    fn payload(&mut self, data: &[u8]) -> Result<(), Self::Error>;
    /// The current data frame ended; `fin`: so did its message.
    fn frame_end(&mut self, fin: bool) -> Result<(), Self::Error>;
    /// A whole, unmasked control frame (close payloads not yet validated).
    fn control(&mut self, opcode: u8, payload: &[u8]) -> Result<(), Self::Error>;
}

#[derive(Debug, Clone, Copy)]
enum State {
    Header,
    Data {
        remaining: u64,
        mask: Option<[u8; 4]>,
        offset: usize,
    },
    Control {
        opcode: u8,
        remaining: usize,
        mask: Option<[u8; 4]>,
    },
}

/// One hop's incoming frames, decoded incrementally.
#[derive(Debug, Clone)]
pub struct Decoder {
    rules: Rules,
    state: State,
    hdr: [u8; MAX_HEADER],
    hdr_len: u8,
    /// A control frame's payload cut by the end of a read, kept until the
    /// rest arrives; empty (no allocation) otherwise. A control frame
    /// whole in one read is delivered from the read's own bytes.
    ctrl: Vec<u8>,
    /// Opcode of the data message in progress, if any.
    message: Option<u8>,
    /// Payload bytes of the message in progress.
    message_len: u64,
    /// The current frame is the last of its message.
    fin: bool,
    utf8: Utf8,
    /// The message in progress is compressed (RSV1 on its first frame): its
    /// wire bytes are not UTF-8; the session checks the inflated text.
    compressed: bool,
}

impl Decoder {
    pub fn new(rules: Rules) -> Decoder {
        Decoder {
            rules,
            state: State::Header,
            hdr: [0; MAX_HEADER],
            hdr_len: 0,
            ctrl: Vec::new(),
            message: None,
            message_len: 0,
            fin: false,
            utf8: Utf8::default(),
            compressed: false,
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// True between a data frame's header and its last payload byte.
    pub fn in_data_frame(&self) -> bool {
        matches!(self.state, State::Data { .. })
    }

    /// True while a fragmented message is unfinished.
    pub fn in_message(&self) -> bool {
        self.message.is_some()
    }

    /// Decodes `input` (one read's worth), unmasking it in place.
    pub fn feed<S: Sink>(&mut self, mut input: &mut [u8], sink: &mut S) -> Result<(), S::Error> {
        loop {
            match self.state {
                State::Header => {
                    if input.is_empty() {
                        return Ok(());
                    }
                    let have = usize::from(self.hdr_len);
                    let (h, used) = if have == 0 {
                        match parse_header(input, &self.rules)? {
                            Some(x) => x,
                            None => {
                                // Keep the partial header inline.
                                let n = input.len().min(MAX_HEADER);
                                self.hdr[..n].copy_from_slice(&input[..n]);
                                self.hdr_len = n as u8;
                                return Ok(());
                            }
                        }
                    } else {
                        let take = (MAX_HEADER - have).min(input.len());
                        self.hdr[have..have + take].copy_from_slice(&input[..take]);
                        match parse_header(&self.hdr[..have + take], &self.rules)? {
                            Some((h, len)) => {
                                self.hdr_len = 0;
                                (h, len - have)
                            }
                            None => {
                                self.hdr_len = (have + take) as u8;
                                return Ok(());
                            }
                        }
                    };
                    input = &mut input[used..];
                    self.start_frame(h, sink)?;
                }
                State::Data {
                    remaining,
                    mask,
                    offset,
                } => {
                    if remaining == 0 {
                        self.state = State::Header;
                        self.end_data_frame(sink)?;
                        continue;
                    }
                    if input.is_empty() {
                        return Ok(());
                    }
                    let n = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(input.len());
                    let (chunk, rest) = input.split_at_mut(n);
                    if let Some(k) = mask {
                        apply_mask(chunk, k, offset);
                    }
                    if self.message == Some(OP_TEXT) && !self.compressed {
                        self.utf8.feed(chunk)?;
                    }
                    self.state = State::Data {
                        remaining: remaining - n as u64,
                        mask,
                        offset: offset.wrapping_add(n),
                    };
                    sink.payload(chunk)?;
                    input = rest;
                }
                State::Control {
                    opcode,
                    remaining,
                    mask,
                } => {
                    if self.ctrl.is_empty() && input.len() >= remaining {
                        // Whole in this read: delivered in place.
                        let (payload, rest) = input.split_at_mut(remaining);
                        if let Some(k) = mask {
                            apply_mask(payload, k, 0);
                        }
                        input = rest;
                        self.state = State::Header;
                        sink.control(opcode, payload)?;
                        continue;
                    }
                    if remaining > 0 {
                        if input.is_empty() {
                            return Ok(());
                        }
                        let n = remaining.min(input.len());
                        if self.ctrl.is_empty() {
                            // At most MAX_CONTROL bytes (checked with the
                            // header), held only until the frame is whole.
                            self.ctrl.reserve_exact(remaining);
                        }
                        self.ctrl.extend_from_slice(&input[..n]);
                        input = &mut input[n..];
                        self.state = State::Control {
                            opcode,
                            remaining: remaining - n,
                            mask,
                        };
                        continue;
                    }
                    let mut payload = std::mem::take(&mut self.ctrl);
                    if let Some(k) = mask {
                        apply_mask(&mut payload, k, 0);
                    }
                    self.state = State::Header;
                    sink.control(opcode, &payload)?;
                }
            }
        }
    }

    fn start_frame<S: Sink>(&mut self, h: Header, sink: &mut S) -> Result<(), S::Error> {
        if h.is_control() {
            // Length <= 125 was checked with the first two bytes.
            self.ctrl.clear();
            self.state = State::Control {
                opcode: h.opcode,
                remaining: h.len as usize,
                mask: h.mask,
            };
            return Ok(());
        }
        let (op, first) = match (h.opcode, self.message) {
            (OP_CONTINUATION, Some(op)) => (op, false),
            (OP_CONTINUATION, None) => {
                return Err(FrameError::Protocol("continuation without a message").into())
            }
            (_, Some(_)) => {
                return Err(FrameError::Protocol("new message inside a fragmented one").into())
            }
            (op, None) => (op, true),
        };
        // The message limit first: with the default frame limit (equal to
        // the message limit) a one-frame message that is too big is called
        // what the operator configured, a message too big.
        let total = if first {
            h.len
        } else {
            self.message_len.saturating_add(h.len)
        };
        if total > self.rules.max_message {
            return Err(FrameError::TooBig("message too big").into());
        }
        if h.len > self.rules.max_frame {
            return Err(FrameError::TooBig("frame too big").into());
        }
        if first {
            self.utf8 = Utf8::default();
            self.compressed = h.rsv & 0b100 != 0;
        }
        self.message = Some(op);
        self.message_len = total;
        self.fin = h.fin;
        self.state = State::Data {
            remaining: h.len,
            mask: h.mask,
            offset: 0,
        };
        sink.frame_start(&h, op, first)
    }

    fn end_data_frame<S: Sink>(&mut self, sink: &mut S) -> Result<(), S::Error> {
        let fin = self.fin;
        if fin {
            if self.message == Some(OP_TEXT) && !self.compressed {
                self.utf8.finish()?;
            }
            self.message = None;
            self.message_len = 0;
        }
        sink.frame_end(fin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Ev {
        Start(u8, u8, bool, u64),
        Data(Vec<u8>),
        End(bool),
        Control(u8, Vec<u8>),
    }

    #[derive(Default)]
    struct Rec(Vec<Ev>);

    impl Sink for Rec {
        type Error = FrameError;
        fn frame_start(&mut self, h: &Header, op: u8, first: bool) -> Result<(), FrameError> {
            self.0.push(Ev::Start(h.opcode, op, first, h.len));
            Ok(())
        }
        fn payload(&mut self, data: &[u8]) -> Result<(), FrameError> {
            // Merge chunks so results do not depend on read boundaries.
            if let Some(Ev::Data(d)) = self.0.last_mut() {
                d.extend_from_slice(data);
            } else {
                self.0.push(Ev::Data(data.to_vec()));
            }
            Ok(())
        }
        fn frame_end(&mut self, fin: bool) -> Result<(), FrameError> {
            self.0.push(Ev::End(fin));
            Ok(())
        }
        fn control(&mut self, op: u8, payload: &[u8]) -> Result<(), FrameError> {
            self.0.push(Ev::Control(op, payload.to_vec()));
            Ok(())
        }
    }

    fn rules(masked: bool) -> Rules {
        Rules {
            masked,
            allow_rsv1: false,
            max_frame: 1 << 20,
            max_message: 1 << 20,
        }
    }

    /// Decodes `bytes` in one piece and byte by byte; both must agree.
    fn decode(bytes: &[u8], masked: bool) -> Result<Vec<Ev>, FrameError> {
        let mut one = Rec::default();
        let r1 = Decoder::new(rules(masked)).feed(&mut bytes.to_vec(), &mut one);
        let mut each = Rec::default();
        let mut d = Decoder::new(rules(masked));
        let mut r2 = Ok(());
        for b in bytes {
            r2 = d.feed(&mut [*b], &mut each);
            if r2.is_err() {
                break;
            }
        }
        assert_eq!(r1, r2);
        if r1.is_ok() {
            assert_eq!(one.0, each.0);
        }
        r1.map(|()| one.0)
    }

    fn data(s: &str) -> Ev {
        Ev::Data(s.as_bytes().to_vec())
    }

    // RFC 6455 section 5.7 examples.
    #[test]
    fn rfc_single_frame_unmasked_text() {
        let ev = decode(&[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f], false).unwrap();
        assert_eq!(
            ev,
            vec![Ev::Start(1, 1, true, 5), data("Hello"), Ev::End(true)]
        );
    }

    #[test]
    fn rfc_single_frame_masked_text() {
        let f = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let ev = decode(&f, true).unwrap();
        assert_eq!(
            ev,
            vec![Ev::Start(1, 1, true, 5), data("Hello"), Ev::End(true)]
        );
        // The same frame from a server is a protocol error, and vice versa.
        assert_eq!(
            decode(&f, false),
            Err(FrameError::Protocol("masked frame from a server"))
        );
        assert_eq!(
            decode(&[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f], true),
            Err(FrameError::Protocol("unmasked frame"))
        );
    }

    #[test]
    fn rfc_fragmented_unmasked_text() {
        let f = [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f];
        let ev = decode(&f, false).unwrap();
        assert_eq!(
            ev,
            vec![
                Ev::Start(1, 1, true, 3),
                data("Hel"),
                Ev::End(false),
                Ev::Start(0, 1, false, 2),
                data("lo"),
                Ev::End(true)
            ]
        );
    }

    #[test]
    fn rfc_ping_and_masked_pong() {
        let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        assert_eq!(
            decode(&ping, false).unwrap(),
            vec![Ev::Control(9, b"Hello".to_vec())]
        );
        let pong = [
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(
            decode(&pong, true).unwrap(),
            vec![Ev::Control(10, b"Hello".to_vec())]
        );
    }

    #[test]
    fn rfc_256_bytes_and_64_kib_binary() {
        let mut f = vec![0x82, 0x7E, 0x01, 0x00];
        f.extend(std::iter::repeat_n(7u8, 256));
        let ev = decode(&f, false).unwrap();
        assert_eq!(ev[0], Ev::Start(2, 2, true, 256));
        assert_eq!(ev[1], Ev::Data(vec![7; 256]));
        let mut f = vec![0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0];
        f.extend(std::iter::repeat_n(9u8, 65536));
        let mut rec = Rec::default();
        Decoder::new(rules(false)).feed(&mut f, &mut rec).unwrap();
        assert_eq!(rec.0[0], Ev::Start(2, 2, true, 65536));
        assert_eq!(rec.0[1], Ev::Data(vec![9; 65536]));
    }

    #[test]
    fn control_frames_interleave_with_fragments() {
        let f = [0x01, 0x01, b'a', 0x89, 0x00, 0x80, 0x01, b'b'];
        let ev = decode(&f, false).unwrap();
        assert_eq!(
            ev,
            vec![
                Ev::Start(1, 1, true, 1),
                data("a"),
                Ev::End(false),
                Ev::Control(9, vec![]),
                Ev::Start(0, 1, false, 1),
                data("b"),
                Ev::End(true)
            ]
        );
    }

    #[test]
    fn protocol_errors() {
        let p = |s| Err(FrameError::Protocol(s));
        assert_eq!(decode(&[0x83, 0x00], false), p("reserved opcode"));
        assert_eq!(decode(&[0x8B, 0x00], false), p("reserved opcode"));
        assert_eq!(decode(&[0xC1, 0x00], false), p("reserved bits set"));
        assert_eq!(decode(&[0xA1, 0x00], false), p("reserved bits set"));
        assert_eq!(decode(&[0x91, 0x00], false), p("reserved bits set"));
        assert_eq!(decode(&[0x09, 0x00], false), p("fragmented control frame"));
        assert_eq!(
            decode(&[0x89, 0x7E, 0, 126], false),
            p("control frame too long")
        );
        assert_eq!(
            decode(&[0x80, 0x00], false),
            p("continuation without a message")
        );
        assert_eq!(
            decode(&[0x01, 0x00, 0x81, 0x00], false),
            p("new message inside a fragmented one")
        );
        let mut huge = vec![0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0];
        huge.push(0);
        assert_eq!(decode(&huge, false), p("frame length has its top bit set"));
    }

    #[test]
    fn rsv1_only_when_negotiated_and_only_on_a_first_data_frame() {
        let mut r = rules(false);
        r.allow_rsv1 = true;
        let mut rec = Rec::default();
        assert!(Decoder::new(r).feed(&mut [0xC1, 0x00], &mut rec).is_ok());
        assert!(Decoder::new(r).feed(&mut [0xC9, 0x00], &mut rec).is_err());
    }

    #[test]
    fn size_limits() {
        let r = Rules {
            masked: false,
            allow_rsv1: false,
            max_frame: 4,
            max_message: 6,
        };
        let mut rec = Rec::default();
        assert_eq!(
            Decoder::new(r).feed(&mut [0x82, 0x05], &mut rec),
            Err(FrameError::TooBig("frame too big"))
        );
        let mut f = vec![0x02, 0x04, 1, 2, 3, 4, 0x80, 0x03];
        assert_eq!(
            Decoder::new(r).feed(&mut f, &mut rec),
            Err(FrameError::TooBig("message too big"))
        );
    }

    #[test]
    fn utf8_fails_fast_and_across_frames() {
        // A valid code point split over two frames.
        let f = [0x01, 0x02, 0xCE, 0xBA, 0x80, 0x02, 0xE1, 0xBD];
        // ...but left unfinished at the message end.
        assert_eq!(decode(&f, false), Err(FrameError::Utf8));
        let f = [0x01, 0x01, 0xCE, 0x80, 0x01, 0xBA];
        assert!(decode(&f, false).is_ok());
        // Fails on the first byte that cannot start or continue a code
        // point, before the frame is complete.
        let mut rec = Rec::default();
        let mut d = Decoder::new(rules(false));
        assert_eq!(
            d.feed(&mut [0x81, 0x10, b'a', 0xF4, 0x90], &mut rec),
            Err(FrameError::Utf8)
        );
        let mut d = Decoder::new(rules(false));
        assert_eq!(
            d.feed(&mut [0x81, 0x10, b'a', 0xC0], &mut rec),
            Err(FrameError::Utf8)
        );
        // Binary is not checked.
        assert!(decode(&[0x82, 0x01, 0xFF], false).is_ok());
    }

    #[test]
    fn utf8_validator_agrees_with_std() {
        let samples: [&[u8]; 6] = [
            "κόσμε".as_bytes(),
            b"\xed\xa0\x80",
            b"\xf0\x90\x80\x80",
            b"\xf8\x88\x80\x80\x80",
            b"\xe0\x80\xaf",
            "Hello-µ@ßöäüàá-UTF-8!!".as_bytes(),
        ];
        for s in samples {
            let want = std::str::from_utf8(s).is_ok();
            for split in 0..=s.len() {
                let mut u = Utf8::default();
                let (a, b) = s.split_at(split);
                let got = u.feed(a).and_then(|()| u.feed(b)).and_then(|()| u.finish());
                assert_eq!(got.is_ok(), want, "{s:?} split at {split}");
            }
        }
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close(&[]), Ok(None));
        assert!(parse_close(&[3]).is_err());
        assert_eq!(
            parse_close(&[0x03, 0xE8, b'o', b'k']),
            Ok(Some((1000, "ok")))
        );
        for code in [1012u16, 1013, 1014, 3000, 4999] {
            assert!(parse_close(&code.to_be_bytes()).is_ok(), "{code}");
        }
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(
                parse_close(&code.to_be_bytes()),
                Err(FrameError::Protocol("invalid close code")),
                "{code}"
            );
        }
        assert_eq!(parse_close(&[0x03, 0xE8, 0xFF]), Err(FrameError::Utf8));
    }

    #[test]
    fn write_and_mask_round_trip() {
        for len in [0usize, 1, 125, 126, 65535, 65536] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let mut out = Vec::new();
                write_frame(&mut out, true, OP_BINARY, &payload, mask);
                let mut rec = Rec::default();
                Decoder::new(rules(mask.is_some()))
                    .feed(&mut out, &mut rec)
                    .unwrap();
                assert_eq!(rec.0[0], Ev::Start(2, 2, true, len as u64));
                if len > 0 {
                    assert_eq!(rec.0[1], Ev::Data(payload));
                }
            }
        }
        // Unmasking in odd pieces equals unmasking at once.
        let k = [0x37, 0xfa, 0x21, 0x3d];
        let plain: Vec<u8> = (0..100u8).collect();
        let mut whole = plain.clone();
        apply_mask(&mut whole, k, 0);
        let mut pieces = plain.clone();
        let mut at = 0;
        for n in [1, 3, 7, 9, 80] {
            apply_mask(&mut pieces[at..at + n], k, at);
            at += n;
        }
        assert_eq!(whole, pieces);
    }
}
