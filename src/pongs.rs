//! Keeps tungstenite's automatic pongs off the wire, so that a peer's
//! application ping is answered by the *other* end of the session.
//!
//! tungstenite answers every ping it reads with a pong of its own, and has
//! no switch to stop it. For a proxy that is wrong: a client that pings
//! wants to know that the backend is alive, and wsguard forwards the ping
//! to the backend anyway. So each hop's socket is wrapped in a
//! [`PongFilter`], which drops every Pong frame written to it unless the
//! session granted a pass with [`PongPasses::grant`] just before relaying a
//! pong from the other hop. The client then gets exactly one pong per ping:
//! the backend's. (wsguard's own keepalive never sends pongs.)
//!
//! The filter parses only frames that tungstenite itself formatted (whole,
//! well-formed frames), never peer input. Frames are tracked across partial
//! writes; runs of non-pong frames are written in one call.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const OP_PONG: u8 = 0xA;

/// Passes for relayed pongs, shared between a session and its filter.
#[derive(Clone, Default)]
pub struct PongPasses(Arc<AtomicU32>);

impl PongPasses {
    /// The next pong written to this hop is a relayed one: let it through.
    pub fn grant(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    fn take(&self) -> bool {
        self.0
            .fetch_update(Relaxed, Relaxed, |v| v.checked_sub(1))
            .is_ok()
    }
}

pub struct PongFilter<S> {
    inner: S,
    passes: PongPasses,
    /// Bytes of the current frame (header included) not yet consumed.
    remaining: usize,
    /// The current frame is a dropped pong.
    dropping: bool,
    /// Set if the byte stream ever stops looking like whole frames; from
    /// then on everything is passed through unfiltered (extra pongs are
    /// harmless; a corrupted stream would not be).
    bypass: bool,
}

impl<S> PongFilter<S> {
    pub fn new(inner: S) -> PongFilter<S> {
        PongFilter {
            inner,
            passes: PongPasses::default(),
            remaining: 0,
            dropping: false,
            bypass: false,
        }
    }

    pub fn passes(&self) -> PongPasses {
        self.passes.clone()
    }
}

/// Length (header plus payload) and opcode of the frame at the start of
/// `buf`, or `None` if its header is not all there.
fn frame_at(buf: &[u8]) -> Option<(usize, u8)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    let (ext, payload) = match b1 & 0x7F {
        126 => {
            let b = buf.get(2..4)?;
            (2, u64::from(u16::from_be_bytes([b[0], b[1]])))
        }
        127 => {
            let b: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (8, u64::from_be_bytes(b))
        }
        n => (0, u64::from(n)),
    };
    let len = usize::try_from(payload).ok()?.checked_add(2 + ext + mask)?;
    Some((len, b0 & 0x0F))
}

impl<S: AsyncWrite + Unpin> PongFilter<S> {
    /// Consumes `n` written bytes of `buf`, a run of passed frames that
    /// starts with the rest of the current frame.
    fn advance(&mut self, buf: &[u8], n: usize) {
        let mut pos = 0;
        let mut rem = self.remaining;
        while n - pos > rem {
            pos += rem;
            match buf.get(pos..).and_then(frame_at) {
                Some((len, _)) => rem = len,
                None => {
                    self.bypass = true;
                    return;
                }
            }
        }
        self.remaining = rem - (n - pos);
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PongFilter<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.bypass {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        // Drop pongs at the front of `buf`; stop at the first passed frame.
        let mut dropped = 0;
        while dropped < buf.len() {
            if this.remaining == 0 {
                let Some((len, op)) = buf.get(dropped..).and_then(frame_at) else {
                    this.bypass = true;
                    break;
                };
                this.remaining = len;
                this.dropping = op == OP_PONG && !this.passes.take();
            }
            if !this.dropping {
                break;
            }
            let n = this.remaining.min(buf.len() - dropped);
            dropped += n;
            this.remaining -= n;
            this.dropping = this.remaining > 0;
        }
        if dropped > 0 {
            // Report the dropped bytes as written; the caller comes back
            // with the rest.
            return Poll::Ready(Ok(dropped));
        }
        if this.bypass || buf.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        // The current frame passes; so do the non-pong frames after it.
        let mut end = this.remaining.min(buf.len());
        while end < buf.len() {
            match buf.get(end..).and_then(frame_at) {
                Some((len, op)) if op != OP_PONG => end = end.saturating_add(len).min(buf.len()),
                _ => break,
            }
        }
        let span = buf.get(..end).unwrap_or(buf);
        match Pin::new(&mut this.inner).poll_write(cx, span) {
            Poll::Ready(Ok(n)) => {
                this.advance(span, n.min(span.len()));
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PongFilter<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A sink that accepts at most `chunk` bytes per write.
    struct Chunky {
        out: Vec<u8>,
        chunk: usize,
    }

    impl AsyncWrite for Chunky {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let n = buf.len().min(this.chunk);
            this.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A frame as tungstenite itself formats it (masked: as a client would).
    fn frame(op: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        use tokio_tungstenite::tungstenite::protocol::frame::{coding::OpCode, Frame, FrameHeader};
        let header = FrameHeader {
            opcode: OpCode::from(op),
            mask: masked.then_some([1, 2, 3, 4]),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        Frame::from_payload(header, payload.to_vec().into())
            .format(&mut out)
            .unwrap();
        out
    }

    async fn run(chunk: usize, writes: &[Vec<u8>], grants: u32) -> Vec<u8> {
        let mut f = PongFilter::new(Chunky {
            out: Vec::new(),
            chunk,
        });
        for _ in 0..grants {
            f.passes().grant();
        }
        for w in writes {
            f.write_all(w).await.unwrap();
        }
        assert!(!f.bypass);
        f.inner.out
    }

    #[tokio::test]
    async fn drops_pongs_without_a_pass_and_keeps_everything_else() {
        for masked in [false, true] {
            let big = vec![7u8; 70_000];
            let text = frame(0x1, b"hello", masked);
            let ping = frame(0x9, b"p", masked);
            let pong = frame(0xA, b"auto", masked);
            let bin = frame(0x2, &big, masked);
            let mid = frame(0x2, &big[..300], masked);
            let close = frame(0x8, &[3, 232], masked);
            let all: Vec<u8> = [
                text.clone(),
                pong.clone(),
                bin.clone(),
                pong.clone(),
                pong.clone(),
                ping.clone(),
                mid.clone(),
                close.clone(),
            ]
            .concat();
            let want: Vec<u8> = [
                text.clone(),
                bin.clone(),
                ping.clone(),
                mid.clone(),
                close.clone(),
            ]
            .concat();
            // One buffer, any partial-write size.
            for chunk in [1, 2, 3, 7, 64, 1000, usize::MAX] {
                assert_eq!(
                    run(chunk, std::slice::from_ref(&all), 0).await,
                    want,
                    "{chunk}"
                );
            }
            // Frame by frame.
            let each = vec![text.clone(), pong.clone(), bin.clone(), close.clone()];
            let want2: Vec<u8> = [text.clone(), bin.clone(), close.clone()].concat();
            assert_eq!(run(5, &each, 0).await, want2);
        }
    }

    #[tokio::test]
    async fn a_granted_pass_lets_exactly_one_pong_through() {
        let a = frame(0xA, b"a", false);
        let b = frame(0xA, b"b", false);
        let d = frame(0x2, b"data", false);
        let all = [a.clone(), d.clone(), b.clone()].concat();
        for chunk in [1, 3, usize::MAX] {
            let got = run(chunk, std::slice::from_ref(&all), 1).await;
            assert_eq!(got, [a.clone(), d.clone()].concat());
            let got = run(chunk, std::slice::from_ref(&all), 2).await;
            assert_eq!(got, all);
        }
    }

    #[tokio::test]
    async fn a_stream_that_is_not_frames_passes_through() {
        let mut f = PongFilter::new(Chunky {
            out: Vec::new(),
            chunk: usize::MAX,
        });
        // A header cut short: not something tungstenite writes.
        f.write_all(&[0x82, 126, 1]).await.unwrap();
        f.write_all(b"rest").await.unwrap();
        assert!(f.bypass);
        assert_eq!(f.inner.out, b"\x82\x7e\x01rest");
    }
}
