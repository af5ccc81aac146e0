//! Origin allow-list: the defence against cross-site WebSocket hijacking.
//!
//! Browsers always send `Origin` on a WebSocket upgrade and scripts cannot
//! forge it, so an allow-list stops a hostile page from riding a user's
//! cookies into the backend. Comparison is exact on scheme, host and port
//! after normalising case and default ports; `null` (sandboxed frames,
//! `file:` pages) is never allowed; a wildcard covers exactly one leading
//! label, so `https://*.example.com` allows `https://a.example.com` but not
//! `https://example.com`, `https://a.b.example.com` or
//! `https://a.example.com.evil.io`.

use crate::config::Mode;

/// A normalised origin: lowercase scheme and host, explicit port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(Origin),
    /// `scheme://*.suffix:port`: one label, then `.suffix`.
    Wildcard(Origin),
}

/// The typed `origin` policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    pub mode: Mode,
    allow: Vec<Pattern>,
    pub allow_missing: bool,
}

/// Why an upgrade's Origin was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginError {
    Missing,
    Null,
    Malformed,
    NotAllowed,
}

impl OriginError {
    pub fn reason(self) -> &'static str {
        match self {
            OriginError::Missing => "origin_missing",
            OriginError::Null => "origin_null",
            OriginError::Malformed => "origin_malformed",
            OriginError::NotAllowed => "origin_not_allowed",
        }
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

fn valid_host(h: &str) -> bool {
    if let Some(v6) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Parses `scheme://host[:port]` (what browsers send: no path, no
/// userinfo). With `wildcard`, the host may start with `*.`.
fn parse(s: &str, wildcard: bool) -> Option<(Origin, bool)> {
    let (scheme, rest) = s.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme.is_empty()
        || !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ', '\\']) {
        return None;
    }
    let (host, port) = match rest.rfind(':') {
        Some(i) if !rest.ends_with(']') => {
            let (h, p) = rest.split_at(i);
            let p = p.get(1..)?;
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (h, Some(p.parse::<u16>().ok()?))
        }
        _ => (rest, None),
    };
    let host = host.to_ascii_lowercase();
    let (is_wild, check) = match host.strip_prefix("*.") {
        Some(suffix) if wildcard => (true, suffix),
        _ => (false, host.as_str()),
    };
    if !valid_host(check) {
        return None;
    }
    let port = port.or_else(|| default_port(&scheme))?;
    let host = if is_wild { check.to_string() } else { host };
    Some((Origin { scheme, host, port }, is_wild))
}

impl OriginPolicy {
    /// Builds the policy; `Err` names the first bad allow-list entry.
    pub fn new(
        mode: Mode,
        allow: &[String],
        allow_missing: bool,
    ) -> Result<OriginPolicy, (usize, String)> {
        let mut out = Vec::with_capacity(allow.len());
        for (i, a) in allow.iter().enumerate() {
            if a.trim() == "null" {
                return Err((i, "`null` can never be allowed".into()));
            }
            let Some((o, wild)) = parse(a.trim(), true) else {
                return Err((i, format!("`{a}` is not an origin (scheme://host[:port], optionally with one leading `*.` label)")));
            };
            out.push(if wild {
                Pattern::Wildcard(o)
            } else {
                Pattern::Exact(o)
            });
        }
        Ok(OriginPolicy {
            mode,
            allow: out,
            allow_missing,
        })
    }

    /// Checks the request's `Origin` header values.
    pub fn check(&self, values: &[&[u8]]) -> Result<(), OriginError> {
        let v = match values {
            [] => {
                return if self.allow_missing {
                    Ok(())
                } else {
                    Err(OriginError::Missing)
                }
            }
            [v] => std::str::from_utf8(v)
                .map_err(|_| OriginError::Malformed)?
                .trim(),
            _ => return Err(OriginError::Malformed),
        };
        if v.eq_ignore_ascii_case("null") {
            return Err(OriginError::Null);
        }
        let (o, _) = parse(v, false).ok_or(OriginError::Malformed)?;
        let allowed = self.allow.iter().any(|p| match p {
            Pattern::Exact(e) => *e == o,
            Pattern::Wildcard(w) => {
                w.scheme == o.scheme
                    && w.port == o.port
                    && o.host
                        .strip_suffix(w.host.as_str())
                        .and_then(|label| label.strip_suffix('.'))
                        .is_some_and(|label| !label.is_empty() && !label.contains('.'))
            }
        });
        if allowed {
            Ok(())
        } else {
            Err(OriginError::NotAllowed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], allow_missing: bool) -> OriginPolicy {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        OriginPolicy::new(Mode::Enforce, &allow, allow_missing).unwrap()
    }

    fn check(p: &OriginPolicy, o: &str) -> Result<(), OriginError> {
        p.check(&[o.as_bytes()])
    }

    #[test]
    fn exact_with_normalised_case_and_default_port() {
        let p = policy(&["https://App.Example.com"], false);
        assert_eq!(check(&p, "https://app.example.com"), Ok(()));
        assert_eq!(check(&p, "HTTPS://APP.EXAMPLE.COM:443"), Ok(()));
        assert_eq!(
            check(&p, "http://app.example.com"),
            Err(OriginError::NotAllowed)
        );
        assert_eq!(
            check(&p, "https://app.example.com:8443"),
            Err(OriginError::NotAllowed)
        );
        assert_eq!(
            check(&p, "https://app.example.com.evil.io"),
            Err(OriginError::NotAllowed)
        );
        assert_eq!(
            check(&p, "https://evilapp.example.com"),
            Err(OriginError::NotAllowed)
        );
    }

    #[test]
    fn wildcard_is_one_label() {
        let p = policy(&["https://*.example.com"], false);
        assert_eq!(check(&p, "https://a.example.com"), Ok(()));
        assert_eq!(
            check(&p, "https://example.com"),
            Err(OriginError::NotAllowed)
        );
        assert_eq!(
            check(&p, "https://a.b.example.com"),
            Err(OriginError::NotAllowed)
        );
        assert_eq!(
            check(&p, "https://a.example.com.evil.io"),
            Err(OriginError::NotAllowed)
        );
        assert_eq!(
            check(&p, "https://aexample.com"),
            Err(OriginError::NotAllowed)
        );
        assert_eq!(
            check(&p, "http://a.example.com"),
            Err(OriginError::NotAllowed)
        );
    }

    #[test]
    fn null_missing_and_malformed() {
        let p = policy(&["https://a.example"], false);
        assert_eq!(check(&p, "null"), Err(OriginError::Null));
        assert_eq!(p.check(&[]), Err(OriginError::Missing));
        assert_eq!(policy(&[], true).check(&[]), Ok(()));
        for bad in [
            "",
            "https://",
            "a.example",
            "https://a.example/path",
            "https://u@a.example",
            "https://a.example:99999",
            "https://a..example",
            "https://a.example:",
        ] {
            assert_eq!(check(&p, bad), Err(OriginError::Malformed), "{bad:?}");
        }
        assert_eq!(
            p.check(&[b"https://a.example", b"https://a.example"]),
            Err(OriginError::Malformed)
        );
        assert_eq!(p.check(&[&[0xff, 0xfe]]), Err(OriginError::Malformed));
    }

    #[test]
    fn bad_allow_entries_are_refused() {
        for bad in [
            "null",
            "example.com",
            "https://*.*.example.com",
            "https://a.*.example.com",
            "https://x/y",
        ] {
            assert!(
                OriginPolicy::new(Mode::Enforce, &[bad.to_string()], false).is_err(),
                "{bad}"
            );
        }
        assert!(
            OriginPolicy::new(Mode::Enforce, &["http://[::1]:3000".to_string()], false).is_ok()
        );
    }
}
