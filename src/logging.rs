//! The log filter. Whatever `log.level` or `WSGUARD_LOG` asks for, the
//! WebSocket library never logs below `info`: at `debug`/`trace` it logs
//! every frame and message it reads or writes, payload included
//! (`received frame ...`, `Received message ...`), and message payloads
//! must never reach the logs.

use tracing_subscriber::EnvFilter;

/// Log targets whose debug and trace events carry message payloads.
pub const PAYLOAD_TARGETS: &[&str] = &["tungstenite", "tokio_tungstenite"];

/// The filter for `spec` (the `WSGUARD_LOG` value, if set and valid) or
/// else `level`, with [`PAYLOAD_TARGETS`] capped at `info`: any directive
/// of the spec that names one of them (or a module below it, which would
/// be more specific than the cap) is dropped first.
pub fn filter(spec: Option<&str>, level: &str) -> EnvFilter {
    let spec = spec.map(|s| {
        s.split(',')
            .filter(|d| {
                let d = d.trim();
                !PAYLOAD_TARGETS.iter().any(|t| {
                    d.strip_prefix(t)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '=', '[']))
                })
            })
            .collect::<Vec<_>>()
            .join(",")
    });
    let mut f = spec
        .as_deref()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(level));
    for t in PAYLOAD_TARGETS {
        if let Ok(d) = format!("{t}=info").parse() {
            f = f.add_directive(d);
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;
    use tracing_subscriber::layer::SubscriberExt;

    fn enabled(spec: Option<&str>, level: &str) -> [bool; 4] {
        let sub = tracing_subscriber::registry().with(filter(spec, level));
        tracing::subscriber::with_default(sub, || {
            [
                tracing::enabled!(target: "tungstenite::protocol", Level::TRACE),
                tracing::enabled!(target: "tokio_tungstenite::compat", Level::DEBUG),
                tracing::enabled!(target: "tungstenite::protocol", Level::INFO),
                tracing::enabled!(target: "wsguard::session", Level::TRACE),
            ]
        })
    }

    #[test]
    fn the_websocket_library_never_logs_below_info() {
        assert_eq!(enabled(None, "trace"), [false, false, true, true]);
        assert_eq!(
            enabled(
                Some("trace,tungstenite=trace,tokio_tungstenite=trace"),
                "info"
            ),
            [false, false, true, true]
        );
        assert_eq!(
            enabled(
                Some("debug,tungstenite::protocol=trace,wsguard=trace"),
                "info"
            ),
            [false, false, true, true]
        );
    }
}
