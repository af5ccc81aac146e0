//! A policy printed back in policy syntax: the `check` summary line and
//! `check --explain`.

use super::*;

impl Policy {
    /// The one-line summary `check` prints.
    pub fn summary(&self) -> String {
        format!(
            "ok: listen {} (admin {}), {} route(s), compression {}; default: {}",
            self.listen,
            self.admin_listen,
            self.routes.len() + 1,
            if self.compression.is_some() {
                "on"
            } else {
                "off"
            },
            self.default_route.describe(),
        )
    }

    /// `check --explain`: the effective policy of every route.
    pub fn explain(&self) -> String {
        let mut out = format!(
            "listen {}  admin {}  max_connections {}  handshake_timeout {}  trusted_proxies {}  shutdown_grace {}  shutdown_close_code {}\n",
            self.listen,
            self.admin_listen,
            self.max_connections,
            show_duration(self.handshake_timeout),
            self.trusted_proxies.len(),
            show_duration(self.shutdown_grace),
            self.shutdown_close_code,
        );
        out.push_str(&match &self.compression {
            None => "compression off\n".to_string(),
            Some(s) => format!(
                "compression on  context_takeover {}  max_window_bits {}\n",
                s.context_takeover, s.max_window_bits
            ),
        });
        for r in self
            .routes
            .iter()
            .chain(std::iter::once(&self.default_route))
        {
            let name = if r.prefix.is_empty() {
                "(top level)"
            } else {
                r.prefix.as_str()
            };
            out.push_str(&format!("route {name}: {}\n", r.describe()));
        }
        out
    }
}

/// A duration as the policy writes it: `500ms`, `25s`, `10m`, `1h`.
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A size as the policy writes it: `64KiB`, `1MiB`, or bytes.
pub fn show_size(n: u64) -> String {
    for (unit, m) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= m && n.is_multiple_of(m) {
            return format!("{}{unit}", n / m);
        }
    }
    n.to_string()
}

/// A rate as the policy writes it: `{ rate: 5/s, burst: 20 }`.
pub fn show_rate(r: &Rate, bytes: bool) -> String {
    let unit = match r.per.as_secs() {
        1 => "s",
        60 => "m",
        3600 => "h",
        _ => "?",
    };
    let (count, burst) = if bytes {
        (
            show_size(u64::from(r.count.get())),
            show_size(u64::from(r.burst.get())),
        )
    } else {
        (r.count.to_string(), r.burst.to_string())
    };
    format!("{{ rate: {count}/{unit}, burst: {burst} }}")
}

impl Route {
    /// One line that says what is enforced on this route.
    pub fn describe(&self) -> String {
        let mode = |m: Mode| match m {
            Mode::Enforce => "enforce",
            Mode::Report => "report",
            Mode::Off => "off",
        };
        let rate = |r: &Option<Rate>| r.map_or("off".to_string(), |r| show_rate(&r, false));
        let timer = |d: Option<Duration>| d.map_or("off".to_string(), show_duration);
        let on_limit = match self.limits.on_message_limit {
            OnFailure::Close => "close",
            OnFailure::Drop => "drop",
        };
        format!(
            "upstream {} (connect_timeout {}, breaker {}), origin {}, jwt {}, introspection {}, hmac {}, keepalive interval {} upstream_interval {} idle_timeout {} max_missed {}, \
             max_message_size {} max_frame_size {}, per_ip handshakes {} connections {}, per_connection messages {} bytes {}, on_message_limit: {}, max_session_duration {}",
            self.upstream.url,
            show_duration(self.upstream.connect_timeout),
            self.upstream.breaker.map_or("off".to_string(), |b| format!("after {} failures", b.consecutive_failures)),
            self.origin.as_ref().map_or("off", |o| mode(o.mode)),
            self.jwt.as_ref().map_or("off", |j| mode(j.mode)),
            self.introspection.as_ref().map_or("off", |i| mode(i.mode)),
            self.hmac.as_ref().map_or("off", |h| mode(h.mode)),
            timer(self.keepalive.interval),
            timer(self.keepalive.upstream_interval),
            timer(self.keepalive.idle_timeout),
            self.keepalive.max_missed,
            show_size(self.limits.max_message_size as u64),
            show_size(self.limits.max_frame_size as u64),
            rate(&self.limits.per_ip_handshakes),
            self.limits.per_ip_connections.map_or("off".to_string(), |n| n.to_string()),
            rate(&self.limits.per_connection_messages),
            self.limits.per_connection_bytes.map_or("off".to_string(), |r| show_rate(&r, true)),
            on_limit,
            timer(self.limits.max_session_duration),
        )
    }
}
