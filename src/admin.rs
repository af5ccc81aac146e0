//! The admin listener: `/healthz`, `/readyz` and `/metrics`.
//!
//! `/readyz` turns 503 as soon as shutdown starts, before the proxy
//! listener closes, so a load balancer stops sending new clients first.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::state::Process;

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn route<B>(req: &Request<B>, process: &Process) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            if process.ready.load(Ordering::SeqCst) && !process.shutdown.is_cancelled() {
                respond(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready\n".into(),
                )
            }
        }
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            process.metrics.encode(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Admin connections served at once; beyond, a connection gets a 503 and
/// is closed before anything is read. Probes and scrapers need a handful;
/// a flood of idle sockets cannot take the process's file descriptors.
pub const MAX_CONNECTIONS: usize = 64;
/// A request head must arrive this soon after the connection opens (and
/// after each keep-alive response).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// No admin connection lives longer than this, whatever it does.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoints until the process exits. It keeps answering
/// during the shutdown drain (with `/readyz` = 503).
pub async fn run(listener: TcpListener, process: Arc<Process>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            let _ = stream.try_write(b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
            continue;
        };
        let process = Arc::clone(&process);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let r = route(&req, &process);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .max_headers(32)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, &mut conn).await;
            // Freed while `conn` still holds the socket: a client that sees
            // the close can count on the slot being free.
            drop(slot);
        });
    }
}
