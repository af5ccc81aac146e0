//! Accepting connections and taking each one through the upgrade:
//!
//! ```text
//! accept -> request head (hyper) -> validate -> admission (caps, origin,
//!   rate, token, shared limits, breaker) -> upstream dial -> 101 -> session
//! ```
//!
//! `limits.handshake_timeout` is one deadline for all of it: reading the
//! request head is cut at the deadline (slowloris), and once the request
//! is being handled the upstream dial is bounded by what is left of it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONNECTION, RETRY_AFTER, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_PROTOCOL,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::admission;
use crate::error::Reject;
use crate::guard::limits::{client_ip_of, ConnSlot, IpKey, SlotError};
use crate::handshake::{self, Forwarding};
use crate::session::{self, SessionInfo};
use crate::state::Process;
use crate::upstream::{self, DialError};

type Body = Full<Bytes>;

/// hyper's read buffer bound: a request head larger than this is 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Refuses a connection before reading it: one non-blocking write of the
/// answer and a close. Never waits on the peer.
fn refuse_now(stream: &TcpStream, e: &SlotError) {
    let answer: &[u8] = match e {
        // `limits.max_pending_handshakes`: the proxy is busy.
        SlotError::Global => b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        // `limits.per_ip.pending_handshakes`: this client is.
        SlotError::PerIp => b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    };
    let _ = stream.try_write(answer);
}

/// Accepts until shutdown. Every connection, handshake and session runs on
/// `process.tracker`, so shutdown can wait for them all.
pub async fn run(listener: TcpListener, process: Arc<Process>) {
    process.ready.store(true, Ordering::SeqCst);
    let sweeper = process.tracker.spawn(sweep(Arc::clone(&process)));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = process.shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Handshakes in progress are capped before a byte is read,
                // so idle sockets cannot exhaust file descriptors or
                // sessions' room: globally (limits.max_pending_handshakes)
                // and per peer address (limits.per_ip.pending_handshakes).
                // A trusted proxy's own address is never capped per IP: its
                // clients are counted by their forwarded IP once the
                // request head is read.
                let rt = process.current();
                let trusted = rt
                    .policy
                    .trusted_proxies
                    .iter()
                    .any(|c| c.contains(peer.ip()));
                let per_ip = rt.policy.per_ip_pending_handshakes.filter(|_| !trusted);
                let acquired = process.pending.acquire(
                    IpKey::new(peer.ip()),
                    rt.policy.max_pending_handshakes,
                    per_ip,
                );
                drop(rt);
                let pending = match acquired {
                    Ok(p) => p,
                    Err(e) => {
                        process.metrics.handshake("pending_limit");
                        process.metrics.reject("pending_limit");
                        refuse_now(&stream, &e);
                        continue;
                    }
                };
                let process2 = Arc::clone(&process);
                process
                    .tracker
                    .spawn(connection(stream, peer, process2, pending));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    sweeper.abort();
}

/// Forgets idle keyed-limiter entries so that a spray of source addresses
/// cannot grow memory without bound.
async fn sweep(process: Arc<Process>) {
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        every.tick().await;
        let rt = process.current();
        for r in &rt.routes {
            if let Some(l) = &r.handshakes {
                l.sweep();
            }
        }
        if let Some(l) = &rt.subject_messages {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// What the accept step learned about a connection.
#[derive(Clone)]
struct Conn {
    peer: SocketAddr,
    tls: bool,
    /// The verified client certificate's subject (mTLS).
    client_subject: Option<String>,
    /// The request head had a bare LF line ending (400).
    bare_lf: Arc<AtomicBool>,
}

/// A client stream whose request head is watched for bare LF line endings
/// ([`handshake::HeadScan`]); the answer is read by the request handler
/// (hyper has read the whole head before it calls it). After the head,
/// each read costs one branch.
struct Scanned<S> {
    inner: S,
    scan: handshake::HeadScan,
    /// Let go of once the head is over, so that a session's stream does
    /// not keep the flag's allocation for its whole life.
    bare_lf: Option<Arc<AtomicBool>>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Scanned<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if !this.scan.done {
            this.scan
                .feed(buf.filled().get(before..).unwrap_or_default());
            if let (true, Some(flag)) = (this.scan.bare_lf, &this.bare_lf) {
                flag.store(true, Ordering::Relaxed);
            }
            if this.scan.done {
                this.bare_lf = None;
            }
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Scanned<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn scanned<S>(inner: S) -> (Scanned<S>, Arc<AtomicBool>) {
    let flag = Arc::new(AtomicBool::new(false));
    (
        Scanned {
            inner,
            scan: handshake::HeadScan::default(),
            bare_lf: Some(Arc::clone(&flag)),
        },
        flag,
    )
}

/// One accepted connection. `pending` is its place among the handshakes in
/// progress, released when the handshake is over (before the socket closes,
/// so a client that sees the close can count on the slot being free).
async fn connection(stream: TcpStream, peer: SocketAddr, process: Arc<Process>, pending: ConnSlot) {
    let _ = stream.set_nodelay(true);
    let rt = process.current();
    let deadline = Instant::now() + rt.policy.handshake_timeout;
    let tls = rt.policy.tls.as_ref().map(|t| Arc::clone(&t.server));
    drop(rt);
    let Some(server) = tls else {
        let (stream, bare_lf) = scanned(stream);
        let conn = Conn {
            peer,
            tls: false,
            client_subject: None,
            bare_lf,
        };
        return serve(TokioIo::new(stream), conn, process, deadline, pending).await;
    };
    // The TLS handshake counts toward handshake_timeout.
    let accepted = tokio::select! {
        r = tokio::time::timeout_at(deadline, tokio_rustls::TlsAcceptor::from(server).accept(stream)) => r,
        () = process.shutdown.cancelled() => return,
    };
    match accepted {
        Ok(Ok(tls_stream)) => {
            let client_subject =
                crate::tls::client_identity(tls_stream.get_ref().1).map(|i| i.subject);
            let (stream, bare_lf) = scanned(tls_stream);
            let conn = Conn {
                peer,
                tls: true,
                client_subject,
                bare_lf,
            };
            serve(TokioIo::new(stream), conn, process, deadline, pending).await;
        }
        Ok(Err(e)) => {
            process.metrics.handshake("tls_error");
            process.metrics.reject("tls_error");
            tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            process.metrics.handshake("timeout");
            process.metrics.reject("handshake_timeout");
        }
    }
}

async fn serve<I>(io: I, conn: Conn, process: Arc<Process>, deadline: Instant, pending: ConnSlot)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let started = Arc::new(AtomicBool::new(false));
    let svc = {
        let process = Arc::clone(&process);
        let started = Arc::clone(&started);
        service_fn(move |req| {
            started.store(true, Ordering::SeqCst);
            let process = Arc::clone(&process);
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(handle(req, conn, process, deadline).await) }
        })
    };
    // Keep-alive stays on: with it off hyper rewrites the 101's Connection
    // header to `close`. Every refusal carries `Connection: close`, so a
    // connection still serves at most one request.
    let conn = http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = &mut conn => {}
        () = tokio::time::sleep_until(deadline) => {
            // Once the handler runs it bounds itself by the deadline and
            // answers (504 at worst); only a slow request head is cut here.
            if started.load(Ordering::SeqCst) {
                let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
            } else {
                process.metrics.handshake("timeout");
                process.metrics.reject("handshake_timeout");
            }
        }
        () = process.shutdown.cancelled() => {}
    }
    // Released while `conn` still holds the socket.
    drop(pending);
}

fn reject_response(r: &Reject) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(format!(
        "{}\n",
        r.status().canonical_reason().unwrap_or("error")
    ))));
    *resp.status_mut() = r.status();
    let h = resp.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    match r {
        Reject::Version => {
            h.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
        Reject::NotUpgrade => {
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(CONNECTION, HeaderValue::from_static("Upgrade, close"));
        }
        _ => {}
    }
    if let Reject::Unauthorized(e) = r {
        h.insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(e.www_authenticate()),
        );
    }
    if let Reject::AmbiguousToken(_) = r {
        h.insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_request\""),
        );
    }
    if let Reject::TokenInactive(e) = r {
        h.insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(e.www_authenticate()),
        );
    }
    if let Some(secs) = r.retry_after() {
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            h.insert(RETRY_AFTER, v);
        }
    }
    resp
}

async fn handle(
    req: Request<Incoming>,
    conn: Conn,
    process: Arc<Process>,
    deadline: Instant,
) -> Response<Body> {
    let peer = conn.peer;
    let route = {
        let rt = process.current();
        rt.policy
            .route(
                rt.policy
                    .route_index(&handshake::match_path_of(req.uri().path())),
            )
            .prefix
            .clone()
    };
    let client = client_ip_of(
        peer.ip(),
        req.headers(),
        &process.current().policy.trusted_proxies,
    );
    match upgrade(req, &conn, &process, deadline).await {
        Ok(resp) => {
            process.metrics.handshake("ok");
            process.metrics.route_handshake(&route, "ok");
            resp
        }
        Err(r) => {
            process.metrics.handshake(r.label());
            process.metrics.route_handshake(&route, r.label());
            if !matches!(r, Reject::NotUpgrade) {
                process.metrics.reject(r.label());
            }
            process.refusals.refused(peer, client, &r);
            reject_response(&r)
        }
    }
}

async fn upgrade(
    mut req: Request<Incoming>,
    conn: &Conn,
    process: &Arc<Process>,
    deadline: Instant,
) -> Result<Response<Body>, Reject> {
    let peer = conn.peer;
    if process.shutdown.is_cancelled() {
        return Err(Reject::ShuttingDown);
    }
    if conn.bare_lf.load(Ordering::Relaxed) {
        return Err(Reject::BadRequest(
            "bare LF line ending in the request head",
        ));
    }
    let up = handshake::validate(&req)?;
    let rt = process.current();
    let hs = admission::Handshake::new(process, &rt, req.headers(), &up, peer, deadline)?;
    let admission::Admitted {
        route_index,
        route,
        derived,
        client_ip: ip,
        peer_trusted,
        auth,
        slot,
        subject_slot,
        shared_slot,
        permit,
        // Held until the handshake is answered.
        pending_client: _pending_client,
    } = admission::admit(hs).await?;

    let request_id = handshake::request_id(req.headers(), peer_trusted);
    let mut headers = handshake::upstream_headers(
        &auth.headers,
        &Forwarding {
            client_ip: ip,
            peer_trusted,
            peer_ip: peer.ip(),
            tls: conn.tls,
            request_id: &request_id,
            asserted: &rt.asserted_headers,
        },
    );
    // Only now, after the client's headers are filtered, come the headers
    // only wsguard may assert: claims and the client certificate subject.
    headers.extend(auth.claim_headers);
    if let Some(name) = rt
        .policy
        .tls
        .as_ref()
        .and_then(|t| t.client_subject_header.as_ref())
    {
        if let Some(v) = conn
            .client_subject
            .as_deref()
            .and_then(|s| HeaderValue::from_str(s).ok())
        {
            headers.push((name.clone(), v));
        }
    }
    let connect_deadline = Instant::now() + route.upstream.connect_timeout;
    // When the client's handshake budget, not connect_timeout, is what runs
    // out, a timeout says nothing about the backend.
    let backend_bound = connect_deadline <= deadline;
    let dial_deadline = deadline.min(connect_deadline);
    let dialed = upstream::dial(
        &route.upstream,
        &auth.path_and_query,
        &auth.protocols,
        &headers,
        derived.upstream_ws_config,
        rt.policy.compression.as_ref(),
        dial_deadline,
    )
    .await;
    let dialed = match dialed {
        Ok(d) => {
            if let Some(p) = permit {
                p.success().await;
            }
            d
        }
        Err(e) => {
            if let Some(p) = permit {
                match (&e, backend_bound) {
                    (DialError::Timeout, false) => drop(p),
                    _ if e.is_backend_failure() => p.failure().await,
                    _ => p.success().await,
                }
            }
            tracing::warn!(client = %peer, upstream = %route.upstream.url, error = %e, "upstream handshake failed");
            return Err(match e {
                DialError::Timeout => Reject::GatewayTimeout,
                other => Reject::BadGateway(other.to_string()),
            });
        }
    };

    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    for (n, v) in &dialed.headers {
        h.append(n.clone(), v.clone());
    }
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(up.key.as_bytes())) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = dialed
        .protocol
        .as_deref()
        .or(auth.token_protocol.as_deref())
        .and_then(|p| HeaderValue::from_str(p).ok())
    {
        h.insert(SEC_WEBSOCKET_PROTOCOL, p);
    }
    // The client's offer is answered by wsguard itself, per hop.
    let client_deflate = crate::compression::negotiate::answer_client(
        req.headers()
            .get_all(hyper::header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .map(HeaderValue::as_bytes),
        rt.policy.compression.as_ref(),
    );
    if let Some(v) = client_deflate
        .as_ref()
        .and_then(|a| HeaderValue::from_str(&a.response).ok())
    {
        resp.headers_mut()
            .insert(hyper::header::SEC_WEBSOCKET_EXTENSIONS, v);
    }

    let on_upgrade = hyper::upgrade::on(&mut req);
    let info = SessionInfo {
        route: route_index,
        subject: auth.subject,
        bind: auth.bind,
        derive: auth.derive,
        expires: auth.expires,
        subject_slot,
        shared_slot,
        peer,
        path: handshake::redacted(&up.path_and_query).to_string(),
        request_id,
        slot,
        deflate_client: client_deflate.map(|a| a.params),
        deflate_upstream: dialed.deflate,
    };
    let process2 = Arc::clone(process);
    let rt2 = Arc::clone(&rt);
    let tracker = process.tracker.clone();
    process.tracker.spawn(async move {
        let upgraded = match tokio::time::timeout(Duration::from_secs(5), on_upgrade).await {
            Ok(Ok(u)) => u,
            _ => return,
        };
        let client = TokioIo::new(upgraded);
        // The session gets a task of its own: this block keeps everything
        // it captured (the backend's stream, the session info) for as long
        // as it runs, which would cost every idle session about 1 KiB.
        tracker.spawn(session::run(
            client,
            dialed.stream,
            dialed.rest,
            rt2,
            process2,
            info,
        ));
    });
    Ok(resp)
}
