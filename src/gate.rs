//! A stream that is only polled again after it asked to be.
//!
//! A session's two pumps, its timers and its shutdown signal all run in one
//! task, so every wakeup (a keepalive tick, a message on the other hop)
//! polls every branch. Polling a tungstenite stream that has nothing to read
//! is not free: it zero-fills its read buffer (4 KiB) before it finds out
//! that the socket is not readable. With thousands of sessions pinging every
//! second, those futile polls cost more than the pings themselves.
//!
//! [`Gated`] gives the inner stream a waker of its own. Until that waker
//! fires, `poll_next` answers `Pending` without touching the inner stream.
//! The pattern is the one `FuturesUnordered` uses for its futures.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use futures_util::Stream;

pub struct Gated<S> {
    inner: S,
    gate: Arc<Gate>,
    /// The waker handed to `inner`: built once, cloned by whatever the
    /// inner stream waits on.
    waker: Waker,
}

struct Gate {
    /// Set by the inner stream's waker and after every item (more may be
    /// buffered); cleared just before the inner stream is polled.
    open: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.open.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<S> Gated<S> {
    pub fn new(inner: S) -> Gated<S> {
        let gate = Arc::new(Gate {
            open: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&gate));
        Gated { inner, gate, waker }
    }
}

impl<S: Stream + Unpin> Stream for Gated<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.get_mut();
        this.gate.task.register(cx.waker());
        // Cleared before polling, so a wakeup that lands during the poll
        // opens the gate again instead of being lost.
        if !this.gate.open.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut inner_cx = Context::from_waker(&this.waker);
        let item = Pin::new(&mut this.inner).poll_next(&mut inner_cx);
        if item.is_ready() {
            // The inner stream registered no waker; it may hold more.
            this.gate.open.store(true, Ordering::Release);
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; yields an item only when `ready` is set, and wakes
    /// whoever waited when `ready` is set from outside.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waiter: Arc<AtomicWaker>,
    }

    impl Stream for Probe {
        type Item = u32;
        fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<u32>> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.swap(false, Ordering::SeqCst) {
                return Poll::Ready(Some(7));
            }
            self.waiter.register(cx.waker());
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn polls_inner_only_after_its_own_wakeup() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let waiter = Arc::new(AtomicWaker::new());
        let mut g = Gated::new(Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waiter: waiter.clone(),
        });
        let noop = Waker::noop();
        let mut cx = Context::from_waker(noop);
        assert!(g.poll_next_unpin(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // Spurious task wakeups (another branch) do not reach the inner stream.
        for _ in 0..10 {
            assert!(g.poll_next_unpin(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // The inner stream's own wakeup opens the gate.
        ready.store(true, Ordering::SeqCst);
        waiter.wake();
        assert_eq!(g.poll_next_unpin(&mut cx), Poll::Ready(Some(7)));
        // After an item the inner stream is asked again (it may hold more).
        assert!(g.poll_next_unpin(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 3);
        // And through the async API, with a real wakeup from another task.
        let (r, w) = (ready.clone(), waiter.clone());
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            r.store(true, Ordering::SeqCst);
            w.wake();
        });
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), g.next()).await;
        assert_eq!(got.ok().flatten(), Some(7));
    }
}
