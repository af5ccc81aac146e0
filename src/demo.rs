//! `wsguard demo`: a built-in echo backend on loopback with wsguard in
//! front of it, using the example policy, so a newcomer sees it work.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::policy::Policy;

/// The example policy, compiled in so the demo works from any directory.
pub const EXAMPLE_POLICY: &str = include_str!("../config.example.yaml");

/// A conformant echo server: text and binary come back as sent.
pub async fn echo_backend(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let cfg = WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(0)
                .max_message_size(Some(64 << 20))
                .max_frame_size(Some(16 << 20));
            let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(cfg)).await
            else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                let reply = match msg {
                    Message::Text(_) | Message::Binary(_) => msg,
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
            // Completes the close handshake (tungstenite queued the reply).
            let _ = ws.close(None).await;
        });
    }
}

/// Starts the echo backend on an ephemeral loopback port and returns the
/// example policy pointed at it, listening on loopback.
pub async fn prepare(listen: SocketAddr, admin: SocketAddr) -> Result<Policy, String> {
    let backend = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let backend_addr = backend.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(echo_backend(backend));
    let mut policy =
        Policy::from_text("config.example.yaml", EXAMPLE_POLICY).map_err(|e| e.to_string())?;
    policy.listen = listen;
    policy.admin_listen = admin;
    let up = &mut policy.default_route.upstream;
    up.url = format!("ws://{backend_addr}");
    up.host = backend_addr.ip().to_string();
    up.port = backend_addr.port();
    up.base_path = String::new();
    Ok(policy)
}
