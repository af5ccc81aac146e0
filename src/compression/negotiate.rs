//! permessage-deflate negotiation (RFC 7692 section 7.1), one hop at a time.
//!
//! wsguard is the server toward the client and the client toward the
//! backend, so it negotiates twice and the two hops may end up different:
//! [`answer_client`] picks the first acceptable offer of the client and
//! writes wsguard's answer, [`offer_to_backend`] writes wsguard's own offer,
//! and [`accept_backend_response`] checks the backend's answer to that
//! offer. Each gives a [`HopParams`] seen from wsguard's side of the hop.
//!
//! The two directions are not symmetric in what a bad header means:
//! - a client's offer that is malformed, has an unknown or repeated
//!   parameter or an invalid value is *declined* (RFC 7692 section 7.1: the
//!   server "MUST decline"), and the next offer is tried; a client whose
//!   header cannot be parsed at all just gets no compression;
//! - the backend's answer must be exactly something wsguard offered; anything
//!   else fails the connection (RFC 7692 section 7.1: the client "MUST
//!   _Fail the WebSocket Connection_"), which wsguard answers with 502.

use std::fmt::Write as _;

/// The registered extension name (RFC 7692 section 7).
pub const EXTENSION: &str = "permessage-deflate";

/// The LZ77 window sizes RFC 7692 allows on the wire (section 7.1.2).
const WIRE_BITS: std::ops::RangeInclusive<u8> = 8..=15;

/// The smallest window wsguard can *compress* with: zlib's raw deflate has
/// no 256-byte (8-bit) window. Inflating a window-8 stream works with any
/// larger window, so 8 is only a problem for what wsguard sends.
pub const MIN_DEFLATE_BITS: u8 = 9;

/// What the policy asks for (`compression` section, contract section 2).
/// `None` in the policy means `mode: off`: nothing is offered or accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// `compression.context_takeover`: whether either peer may keep its
    /// LZ77 window between messages. False asks both peers for no context
    /// takeover, so a session keeps no compression state between messages.
    pub context_takeover: bool,
    /// `compression.max_window_bits` (9..=15): the largest window wsguard
    /// compresses with, and the largest it lets a peer compress with.
    pub max_window_bits: u8,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            context_takeover: false,
            max_window_bits: 15,
        }
    }
}

/// What one hop agreed, seen from wsguard (the roles "client" and "server"
/// of RFC 7692 are already resolved: toward the client wsguard is the
/// server, toward the backend it is the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HopParams {
    /// Largest window wsguard may compress with toward this peer (8..=15).
    /// Below [`MIN_DEFLATE_BITS`] wsguard sends its messages uncompressed
    /// (RSV1 off), which RFC 7692 always allows.
    pub send_window_bits: u8,
    /// Whether wsguard keeps its compression context between the messages
    /// it sends to this peer: only when the peer allowed it *and* the
    /// policy asks for context takeover.
    pub send_context_takeover: bool,
    /// Largest window this peer compresses with (8..=15).
    pub recv_window_bits: u8,
    /// Whether this peer may refer back to earlier messages: then the
    /// inflater for this hop lives as long as the session.
    pub recv_context_takeover: bool,
}

impl HopParams {
    /// Whether wsguard can compress toward this peer at all (see
    /// [`MIN_DEFLATE_BITS`]).
    pub fn can_deflate(&self) -> bool {
        self.send_window_bits >= MIN_DEFLATE_BITS
    }

    /// Whether compressed messages that arrive on hop `from` may be
    /// forwarded unchanged on hop `to`: the receiver on `to` must be able
    /// to inflate what the sender on `from` produced. Its window must fit,
    /// and a stream that may use context takeover may only go to a peer
    /// that accepted context takeover. (wsguard must then forward every
    /// message of that stream, in order, without dropping any: a dropped
    /// message would corrupt the receiver's window.)
    ///
    /// An 8-bit window counts as 9: zlib-based senders that agreed to 8
    /// compress with 9, which a receiver held to 8 could not inflate.
    pub fn can_pass_through(from: &HopParams, to: &HopParams) -> bool {
        from.recv_window_bits.max(MIN_DEFLATE_BITS) <= to.send_window_bits
            && (!from.recv_context_takeover || to.send_context_takeover)
    }
}

/// A syntax error in a `Sec-WebSocket-Extensions` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed Sec-WebSocket-Extensions: {0}")]
pub struct SyntaxError(&'static str);

/// Why the backend's answer fails the connection (502).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error(transparent)]
    Syntax(#[from] SyntaxError),
    #[error("backend selected an extension that was not offered: {0}")]
    NotOffered(String),
    #[error("backend accepted permessage-deflate more than once")]
    Repeated,
    #[error("backend's permessage-deflate answer is invalid: {0}")]
    Invalid(&'static str),
}

/// One element of an extension list: the name (lower-cased) and its
/// parameters in order (names lower-cased, quoted values unquoted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub name: String,
    pub params: Vec<(String, Option<String>)>,
}

/// Parses every `Sec-WebSocket-Extensions` header value (RFC 6455 section
/// 9.1; several header lines are one list). A value that is not UTF-8 or
/// does not follow the grammar is an error for the whole header.
pub fn parse<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<Extension>, SyntaxError> {
    let mut out = Vec::new();
    for v in values {
        let s = std::str::from_utf8(v).map_err(|_| SyntaxError("not UTF-8"))?;
        Parser {
            b: s.as_bytes(),
            i: 0,
        }
        .list(&mut out)?;
    }
    Ok(out)
}

/// Bounds what a hostile header can make wsguard allocate.
const MAX_ELEMENTS: usize = 64;
const MAX_PARAMS: usize = 16;

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn token(&mut self) -> Result<String, SyntaxError> {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        if self.i == start {
            return Err(SyntaxError("expected a token"));
        }
        let t = self.b.get(start..self.i).unwrap_or_default();
        Ok(String::from_utf8_lossy(t).into_owned())
    }

    /// A quoted-string whose content, once unescaped, must itself be a
    /// token (RFC 6455 section 9.1).
    fn quoted(&mut self) -> Result<String, SyntaxError> {
        self.i += 1; // the opening quote
        let mut v = Vec::new();
        loop {
            match self.peek() {
                None => return Err(SyntaxError("unterminated quoted string")),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(c) => v.push(c),
                        None => return Err(SyntaxError("unterminated quoted string")),
                    }
                    self.i += 1;
                }
                Some(c) => {
                    v.push(c);
                    self.i += 1;
                }
            }
        }
        if v.is_empty() || !v.iter().copied().all(is_tchar) {
            return Err(SyntaxError("a quoted value must be a token"));
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    fn list(&mut self, out: &mut Vec<Extension>) -> Result<(), SyntaxError> {
        loop {
            self.ows();
            match self.peek() {
                None => return Ok(()),
                // Empty list elements are allowed by the #rule.
                Some(b',') => {
                    self.i += 1;
                    continue;
                }
                Some(_) => {}
            }
            if out.len() >= MAX_ELEMENTS {
                return Err(SyntaxError("too many extensions"));
            }
            let name = self.token()?.to_ascii_lowercase();
            let mut params = Vec::new();
            loop {
                self.ows();
                match self.peek() {
                    None => {
                        out.push(Extension { name, params });
                        return Ok(());
                    }
                    Some(b',') => {
                        self.i += 1;
                        out.push(Extension { name, params });
                        break;
                    }
                    Some(b';') => {
                        self.i += 1;
                        self.ows();
                        if params.len() >= MAX_PARAMS {
                            return Err(SyntaxError("too many parameters"));
                        }
                        let pname = self.token()?.to_ascii_lowercase();
                        self.ows();
                        let value = if self.peek() == Some(b'=') {
                            self.i += 1;
                            self.ows();
                            Some(if self.peek() == Some(b'"') {
                                self.quoted()?
                            } else {
                                self.token()?
                            })
                        } else {
                            None
                        };
                        params.push((pname, value));
                    }
                    Some(_) => return Err(SyntaxError("unexpected character")),
                }
            }
        }
    }
}

/// The permessage-deflate parameters of one offer or answer, with RFC
/// 7692's role names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Pmd {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: present without a value (allowed in an offer only).
    client_max_window_bits: Option<Option<u8>>,
}

/// A window-bits value: a decimal integer 8..=15 without leading zeros
/// (RFC 7692 section 7.1.2.1).
fn window_bits(v: &str) -> Option<u8> {
    if v.starts_with('0') || v.len() > 2 || !v.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| WIRE_BITS.contains(b))
}

/// Reads the parameters of one element; `offer` is true for a client's
/// offer (where `client_max_window_bits` may have no value).
fn pmd(params: &[(String, Option<String>)], offer: bool) -> Result<Pmd, &'static str> {
    let mut p = Pmd::default();
    let mut seen = [false; 4];
    for (name, value) in params {
        let slot = match name.as_str() {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ => return Err("unknown parameter"),
        };
        if std::mem::replace(&mut seen[slot], true) {
            return Err("repeated parameter");
        }
        match (slot, value.as_deref()) {
            (0, None) => p.server_no_context_takeover = true,
            (1, None) => p.client_no_context_takeover = true,
            (0 | 1, Some(_)) => return Err("no_context_takeover takes no value"),
            (2, Some(v)) => {
                p.server_max_window_bits = Some(window_bits(v).ok_or("invalid window bits")?)
            }
            (2, None) => return Err("server_max_window_bits needs a value"),
            (_, Some(v)) => {
                p.client_max_window_bits = Some(Some(window_bits(v).ok_or("invalid window bits")?))
            }
            (_, None) if offer => p.client_max_window_bits = Some(None),
            (_, None) => return Err("client_max_window_bits needs a value in an answer"),
        }
    }
    Ok(p)
}

/// The agreement with the client: what wsguard answers and what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub params: HopParams,
    /// The value of wsguard's `Sec-WebSocket-Extensions` answer.
    pub response: String,
}

/// Picks the first of the client's offers that wsguard accepts under
/// `settings`, or `None` (no compression on the client hop).
///
/// An offer is declined when it is invalid (RFC 7692 section 7.1), when it
/// asks wsguard to compress with a window it cannot produce (below
/// [`MIN_DEFLATE_BITS`]), or when the policy caps the window below 15 and
/// the offer lacks `client_max_window_bits`, so the client could not be
/// held to the cap. With `context_takeover: false` the answer always
/// carries both `*_no_context_takeover` parameters.
pub fn answer_client<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
    settings: Option<&Settings>,
) -> Option<Accepted> {
    let settings = settings?;
    let cap = settings.max_window_bits.clamp(MIN_DEFLATE_BITS, 15);
    let offers = parse(values).ok()?;
    offers
        .iter()
        .filter(|e| e.name == EXTENSION)
        .filter_map(|e| pmd(&e.params, true).ok())
        .find_map(|offer| accept_offer(&offer, settings, cap))
}

fn accept_offer(offer: &Pmd, settings: &Settings, cap: u8) -> Option<Accepted> {
    // The window wsguard compresses with toward the client.
    let send_bits = match offer.server_max_window_bits {
        Some(n) if n < MIN_DEFLATE_BITS => return None,
        Some(n) => n.min(cap),
        None => cap,
    };
    // The window the client compresses with.
    let recv_bits = match offer.client_max_window_bits {
        None if cap < 15 => return None,
        None => 15,
        Some(None) => cap,
        Some(Some(v)) => v.min(cap),
    };
    let server_nct = offer.server_no_context_takeover || !settings.context_takeover;
    let client_nct = offer.client_no_context_takeover || !settings.context_takeover;

    let mut response = String::from(EXTENSION);
    if server_nct {
        response.push_str("; server_no_context_takeover");
    }
    if client_nct {
        response.push_str("; client_no_context_takeover");
    }
    // Accepting an offer's server_max_window_bits means answering it; without
    // one in the offer the server may still announce a smaller window.
    if offer.server_max_window_bits.is_some() || send_bits < 15 {
        let _ = write!(response, "; server_max_window_bits={send_bits}");
    }
    // Never without the client's client_max_window_bits (RFC 7692 section
    // 7.1.2.2); with it, only when it limits something.
    if offer.client_max_window_bits.is_some() && recv_bits < 15 {
        let _ = write!(response, "; client_max_window_bits={recv_bits}");
    }
    Some(Accepted {
        params: HopParams {
            send_window_bits: send_bits,
            send_context_takeover: !server_nct && settings.context_takeover,
            recv_window_bits: recv_bits,
            recv_context_takeover: !client_nct,
        },
        response,
    })
}

/// wsguard's offer to the backend, or `None` with compression off.
pub fn offer_to_backend(settings: Option<&Settings>) -> Option<String> {
    let settings = settings?;
    let cap = settings.max_window_bits.clamp(MIN_DEFLATE_BITS, 15);
    let mut offer = String::from(EXTENSION);
    if !settings.context_takeover {
        offer.push_str("; server_no_context_takeover; client_no_context_takeover");
    }
    if cap < 15 {
        let _ = write!(
            offer,
            "; server_max_window_bits={cap}; client_max_window_bits={cap}"
        );
    } else {
        offer.push_str("; client_max_window_bits");
    }
    Some(offer)
}

/// Checks the backend's `Sec-WebSocket-Extensions` answer against the
/// offer [`offer_to_backend`] made under the same `settings`. `Ok(None)`:
/// the backend declined, the hop is uncompressed. An error fails the
/// connection (502).
pub fn accept_backend_response<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
    settings: Option<&Settings>,
) -> Result<Option<HopParams>, NegotiationError> {
    let answer = parse(values)?;
    let mut chosen = None;
    for e in &answer {
        if e.name != EXTENSION || settings.is_none() {
            return Err(NegotiationError::NotOffered(e.name.clone()));
        }
        if chosen.replace(e).is_some() {
            return Err(NegotiationError::Repeated);
        }
    }
    let (Some(e), Some(settings)) = (chosen, settings) else {
        return Ok(None);
    };
    let cap = settings.max_window_bits.clamp(MIN_DEFLATE_BITS, 15);
    let p = pmd(&e.params, false).map_err(NegotiationError::Invalid)?;
    if !settings.context_takeover && !p.server_no_context_takeover {
        return Err(NegotiationError::Invalid(
            "server_no_context_takeover was asked for and not granted",
        ));
    }
    let recv_bits = match p.server_max_window_bits {
        // Offered only below 15: then the answer must carry it, at most the offer.
        None if cap < 15 => {
            return Err(NegotiationError::Invalid(
                "server_max_window_bits was asked for and not granted",
            ))
        }
        None => 15,
        Some(n) if n > cap => {
            return Err(NegotiationError::Invalid(
                "server_max_window_bits larger than offered",
            ))
        }
        Some(n) => n,
    };
    let send_bits = match p.client_max_window_bits {
        Some(Some(n)) if n > cap => {
            return Err(NegotiationError::Invalid(
                "client_max_window_bits larger than offered",
            ))
        }
        Some(Some(n)) => n,
        _ => cap,
    };
    Ok(Some(HopParams {
        send_window_bits: send_bits,
        send_context_takeover: settings.context_takeover && !p.client_no_context_takeover,
        recv_window_bits: recv_bits,
        recv_context_takeover: !p.server_no_context_takeover,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFF_TAKEOVER: Settings = Settings {
        context_takeover: false,
        max_window_bits: 15,
    };
    const TAKEOVER: Settings = Settings {
        context_takeover: true,
        max_window_bits: 15,
    };

    fn answer(h: &str, s: &Settings) -> Option<Accepted> {
        answer_client([h.as_bytes()], Some(s))
    }

    fn backend(h: &str, s: &Settings) -> Result<Option<HopParams>, NegotiationError> {
        accept_backend_response([h.as_bytes()], Some(s))
    }

    #[test]
    fn parses_lists_params_and_quotes() {
        let got = parse([
            b"permessage-deflate; client_max_window_bits, foo ; a=\"1\" ;B=x".as_slice(),
            b" , permessage-deflate;server_max_window_bits=10".as_slice(),
        ])
        .unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].params, [("client_max_window_bits".into(), None)]);
        assert_eq!(got[1].name, "foo");
        assert_eq!(
            got[1].params,
            [
                ("a".into(), Some("1".into())),
                ("b".into(), Some("x".into()))
            ]
        );
        assert_eq!(
            got[2].params,
            [("server_max_window_bits".into(), Some("10".into()))]
        );
        for bad in [
            "permessage-deflate; ",
            "permessage-deflate; a=",
            "permessage-deflate; a=\"1",
            "permessage-deflate; a=\"\"",
            "permessage-deflate; a=\"1 2\"",
            "permessage deflate",
            ";a",
            "x=1",
        ] {
            assert!(parse([bad.as_bytes()]).is_err(), "{bad}");
        }
        assert!(parse([b"\xff".as_slice()]).is_err());
        let many = "a,".repeat(100);
        assert!(parse([many.as_bytes()]).is_err());
    }

    #[test]
    fn window_bits_values() {
        assert_eq!(window_bits("8"), Some(8));
        assert_eq!(window_bits("15"), Some(15));
        for bad in ["7", "16", "08", "015", "", "+9", "9.0", "1e1"] {
            assert_eq!(window_bits(bad), None, "{bad}");
        }
    }

    #[test]
    fn simplest_offer_gets_both_no_context_takeover_by_default() {
        let a = answer("permessage-deflate", &OFF_TAKEOVER).unwrap();
        assert_eq!(
            a.response,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert_eq!(
            a.params,
            HopParams {
                send_window_bits: 15,
                send_context_takeover: false,
                recv_window_bits: 15,
                recv_context_takeover: false,
            }
        );
    }

    #[test]
    fn browser_offer_with_context_takeover_policy() {
        // Chromium's offer.
        let a = answer("permessage-deflate; client_max_window_bits", &TAKEOVER).unwrap();
        assert_eq!(a.response, "permessage-deflate");
        assert!(a.params.send_context_takeover && a.params.recv_context_takeover);
        // A client that asks for no context takeover gets it, whatever the policy.
        let a = answer(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            &TAKEOVER,
        )
        .unwrap();
        assert_eq!(
            a.response,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert!(!a.params.send_context_takeover && !a.params.recv_context_takeover);
    }

    #[test]
    fn invalid_offers_are_declined_and_the_next_one_is_tried() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=08",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; mystery",
            // Valid, but wsguard cannot compress with a 256-byte window.
            "permessage-deflate; server_max_window_bits=8",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(answer(bad, &OFF_TAKEOVER), None, "{bad}");
            let both = format!("{bad}, permessage-deflate");
            assert!(answer(&both, &OFF_TAKEOVER).is_some(), "{both}");
        }
        // Syntax errors in the header: no compression, never an error.
        assert_eq!(answer("permessage-deflate; a=\"", &OFF_TAKEOVER), None);
        assert_eq!(
            answer_client([b"permessage-deflate".as_slice()], None),
            None
        );
    }

    #[test]
    fn rfc_7692_section_7_1_3_fallback_offer() {
        // The client asks for a 1 KiB server window with a fallback.
        let h = "permessage-deflate; client_max_window_bits; server_max_window_bits=10, \
                 permessage-deflate; client_max_window_bits";
        let a = answer(h, &OFF_TAKEOVER).unwrap();
        assert_eq!(a.params.send_window_bits, 10);
        assert!(a.response.ends_with("; server_max_window_bits=10"));
    }

    #[test]
    fn autobahn_13_offers() {
        // The offers of Autobahn testsuite 0.8.2's cases 12.* and 13.1-13.7
        // (autobahn 0.10.9's PerMessageDeflateOffer), and what wsguard must
        // answer under the default policy: always both no_context_takeover,
        // a requested server window granted as asked, never a
        // client_max_window_bits the client did not offer.
        let cases = [
            (
                "permessage-deflate; client_no_context_takeover; client_max_window_bits",
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
                15,
            ),
            (
                "permessage-deflate; client_no_context_takeover; client_max_window_bits; \
                 server_no_context_takeover",
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
                15,
            ),
            (
                "permessage-deflate; client_no_context_takeover; client_max_window_bits; \
                 server_max_window_bits=9",
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=9",
                9,
            ),
            (
                "permessage-deflate; client_no_context_takeover; client_max_window_bits; \
                 server_max_window_bits=15",
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=15",
                15,
            ),
            (
                "permessage-deflate; client_no_context_takeover; client_max_window_bits; \
                 server_no_context_takeover; server_max_window_bits=9, \
                 permessage-deflate; client_no_context_takeover; client_max_window_bits; \
                 server_no_context_takeover, \
                 permessage-deflate; client_no_context_takeover; client_max_window_bits",
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=9",
                9,
            ),
        ];
        for (offer, response, send_bits) in cases {
            let a = answer(offer, &Settings::default()).unwrap();
            assert_eq!(a.response, response, "{offer}");
            assert_eq!(
                a.params,
                HopParams {
                    send_window_bits: send_bits,
                    send_context_takeover: false,
                    recv_window_bits: 15,
                    recv_context_takeover: false,
                },
                "{offer}"
            );
        }
    }

    #[test]
    fn window_cap_from_policy() {
        let s = Settings {
            context_takeover: true,
            max_window_bits: 10,
        };
        // Without client_max_window_bits the client cannot be held to 10: declined.
        assert_eq!(answer("permessage-deflate", &s), None);
        let a = answer("permessage-deflate; client_max_window_bits", &s).unwrap();
        assert_eq!(
            a.response,
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=10"
        );
        assert_eq!(
            (a.params.send_window_bits, a.params.recv_window_bits),
            (10, 10)
        );
        let a = answer(
            "permessage-deflate; client_max_window_bits=9; server_max_window_bits=12",
            &s,
        )
        .unwrap();
        assert_eq!(
            (a.params.send_window_bits, a.params.recv_window_bits),
            (10, 9)
        );
        assert_eq!(
            a.response,
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=9"
        );
        // A client's own smaller window is inflated with a larger one: fine.
        let a = answer("permessage-deflate; client_max_window_bits=8", &TAKEOVER).unwrap();
        assert_eq!(a.params.recv_window_bits, 8);
    }

    #[test]
    fn offer_to_backend_follows_policy() {
        assert_eq!(offer_to_backend(None), None);
        assert_eq!(
            offer_to_backend(Some(&OFF_TAKEOVER)).unwrap(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits"
        );
        let s = Settings {
            context_takeover: true,
            max_window_bits: 12,
        };
        assert_eq!(
            offer_to_backend(Some(&s)).unwrap(),
            "permessage-deflate; server_max_window_bits=12; client_max_window_bits=12"
        );
        // wsguard's own offer is one it would accept as a server.
        for s in [OFF_TAKEOVER, TAKEOVER, s] {
            let offer = offer_to_backend(Some(&s)).unwrap();
            assert!(answer(&offer, &s).is_some(), "{offer}");
        }
    }

    #[test]
    fn backend_answers() {
        // No extension: an uncompressed hop.
        assert_eq!(accept_backend_response([], Some(&OFF_TAKEOVER)), Ok(None));
        let p = backend(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            &OFF_TAKEOVER,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            p,
            HopParams {
                send_window_bits: 15,
                send_context_takeover: false,
                recv_window_bits: 15,
                recv_context_takeover: false,
            }
        );
        // A server may add server_no_context_takeover or a smaller window unasked.
        let p = backend(
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=9; client_max_window_bits=8",
            &TAKEOVER,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.recv_window_bits, 9);
        assert!(!p.recv_context_takeover && p.send_context_takeover);
        // An 8-bit window toward the backend: legal, sent uncompressed.
        assert_eq!(p.send_window_bits, 8);
        assert!(!p.can_deflate());
        let p = backend("permessage-deflate", &TAKEOVER).unwrap().unwrap();
        assert!(p.recv_context_takeover && p.send_context_takeover);
    }

    #[test]
    fn backend_answers_that_fail_the_connection() {
        let capped = Settings {
            context_takeover: true,
            max_window_bits: 12,
        };
        let cases: [(&str, &Settings); 11] = [
            ("x-custom", &TAKEOVER),
            ("permessage-deflate, permessage-deflate", &TAKEOVER),
            ("permessage-deflate; client_max_window_bits", &TAKEOVER),
            ("permessage-deflate; server_max_window_bits=16", &TAKEOVER),
            ("permessage-deflate; bogus", &TAKEOVER),
            (
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
                &TAKEOVER,
            ),
            // Asked for and not granted.
            (
                "permessage-deflate; client_no_context_takeover",
                &OFF_TAKEOVER,
            ),
            ("permessage-deflate; client_max_window_bits=12", &capped),
            // Larger than offered.
            (
                "permessage-deflate; server_max_window_bits=13; client_max_window_bits=12",
                &capped,
            ),
            (
                "permessage-deflate; server_max_window_bits=12; client_max_window_bits=13",
                &capped,
            ),
            ("permessage-deflate; a=\"", &TAKEOVER),
        ];
        for (h, s) in cases {
            let got = backend(h, s);
            assert!(got.is_err(), "{h}: {got:?}");
        }
        // Compression off: wsguard offered nothing, so any extension fails.
        assert!(matches!(
            accept_backend_response([b"permessage-deflate".as_slice()], None),
            Err(NegotiationError::NotOffered(_))
        ));
        assert_eq!(accept_backend_response([], None), Ok(None));
    }

    #[test]
    fn pass_through_needs_a_compatible_receiver() {
        let nct = HopParams {
            send_window_bits: 15,
            send_context_takeover: false,
            recv_window_bits: 15,
            recv_context_takeover: false,
        };
        assert!(HopParams::can_pass_through(&nct, &nct));
        let takeover = HopParams {
            send_context_takeover: true,
            recv_context_takeover: true,
            ..nct
        };
        assert!(!HopParams::can_pass_through(&takeover, &nct));
        assert!(HopParams::can_pass_through(&nct, &takeover));
        let small = HopParams {
            send_window_bits: 10,
            ..nct
        };
        assert!(!HopParams::can_pass_through(&nct, &small));
        assert!(HopParams::can_pass_through(&small, &nct));
        // A sender that agreed to 8 bits compresses with 9.
        let eight = HopParams {
            send_window_bits: 8,
            recv_window_bits: 8,
            ..nct
        };
        assert!(!HopParams::can_pass_through(&eight, &eight));
        let nine = HopParams {
            send_window_bits: 9,
            ..nct
        };
        assert!(HopParams::can_pass_through(&eight, &nine));
    }
}
