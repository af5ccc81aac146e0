//! Token extraction and removal: where a token is taken from
//! ([`TokenSource`]), finding it ([`extract`], [`find`]) and stripping every
//! source before the request goes upstream.

use std::borrow::Cow;
use std::fmt;

use cookie::Cookie;

use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, COOKIE};

/// Where a token is taken from, in the configured order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`.
    Header,
    /// A query parameter of that name.
    Query(String),
    /// A cookie of that name.
    Cookie(String),
    /// A requested subprotocol starting with that prefix; the token is the rest.
    Subprotocol(String),
}

impl TokenSource {
    /// Parses `header`, `query:NAME`, `cookie:NAME` or `subprotocol:PREFIX`.
    pub fn parse(s: &str) -> Result<TokenSource, String> {
        if s == "header" {
            return Ok(TokenSource::Header);
        }
        let bad = || {
            format!(
                "`{s}` is not a token source (use header, query:NAME, cookie:NAME or subprotocol:PREFIX)"
            )
        };
        let (kind, name) = s.split_once(':').ok_or_else(bad)?;
        if name.is_empty() {
            return Err(format!("`{s}`: the name after `{kind}:` is empty"));
        }
        match kind {
            "query" => {
                if name
                    .bytes()
                    .any(|b| matches!(b, b'&' | b'=' | b'#' | b'?') || b <= b' ')
                {
                    return Err(format!("`{name}` is not a plain query parameter name"));
                }
                Ok(TokenSource::Query(name.to_string()))
            }
            "cookie" => {
                if !name.bytes().all(is_tchar) {
                    return Err(format!("`{name}` is not a valid cookie name"));
                }
                Ok(TokenSource::Cookie(name.to_string()))
            }
            "subprotocol" => {
                if !name.bytes().all(is_tchar) {
                    return Err(format!(
                        "`{name}` is not a valid subprotocol prefix (HTTP token characters only)"
                    ));
                }
                Ok(TokenSource::Subprotocol(name.to_string()))
            }
            _ => Err(bad()),
        }
    }

    /// `header`, `query`, `cookie` or `subprotocol` (for logs and metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            TokenSource::Header => "header",
            TokenSource::Query(_) => "query",
            TokenSource::Cookie(_) => "cookie",
            TokenSource::Subprotocol(_) => "subprotocol",
        }
    }
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Header => f.write_str("header"),
            TokenSource::Query(n) => write!(f, "query:{n}"),
            TokenSource::Cookie(n) => write!(f, "cookie:{n}"),
            TokenSource::Subprotocol(p) => write!(f, "subprotocol:{p}"),
        }
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A token found in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub token: String,
    /// Index into the configured `token_sources`.
    pub source: usize,
}

/// Looks for a token in the configured order; the first source that has one
/// wins. `protocols` are the requested subprotocols, already split on commas
/// and trimmed.
pub fn extract(
    sources: &[TokenSource],
    headers: &HeaderMap,
    path_and_query: &str,
    protocols: &[String],
) -> Option<Found> {
    sources.iter().enumerate().find_map(|(i, s)| {
        let token = match s {
            TokenSource::Header => bearer(headers),
            TokenSource::Query(name) => query_param(path_and_query, name),
            TokenSource::Cookie(name) => cookie(headers, name),
            TokenSource::Subprotocol(prefix) => protocols.iter().find_map(|p| {
                p.strip_prefix(prefix.as_str())
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
            }),
        }?;
        Some(Found { token, source: i })
    })
}

/// A token in more than one place: several sources carry one, one source
/// carries several (query parameters, cookies, subprotocols), or the
/// request has more than one `Authorization` header (RFC 6750 section 2:
/// `invalid_request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ambiguous;

/// Like [`extract`], but looks at every configured source: exactly one
/// token in all of them is `Ok(Some)`, none is `Ok(None)`, more is
/// [`Ambiguous`].
pub fn find(
    sources: &[TokenSource],
    headers: &HeaderMap,
    path_and_query: &str,
    protocols: &[String],
) -> Result<Option<Found>, Ambiguous> {
    let mut found: Option<Found> = None;
    let mut count = 0usize;
    for (i, s) in sources.iter().enumerate() {
        let tokens: Vec<String> = match s {
            TokenSource::Header => {
                if headers.get_all(AUTHORIZATION).iter().count() > 1 {
                    return Err(Ambiguous);
                }
                bearer(headers).into_iter().collect()
            }
            TokenSource::Query(name) => query_values(path_and_query, name)
                .filter(|v| !v.is_empty())
                .collect(),
            TokenSource::Cookie(name) => cookie_values(headers, name)
                .filter(|v| !v.is_empty())
                .collect(),
            TokenSource::Subprotocol(prefix) => protocols
                .iter()
                .filter_map(|p| p.strip_prefix(prefix.as_str()))
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect(),
        };
        count += tokens.len();
        if count > 1 {
            return Err(Ambiguous);
        }
        if let Some(token) = tokens.into_iter().next() {
            found = Some(Found { token, source: i });
        }
    }
    Ok(found)
}

/// Removes from the request every configured token source except
/// `keep` (the index of the consumed source when `forward_token` is set):
/// the Authorization header, the query parameters, the cookies and the
/// subprotocol entries.
pub fn strip_sources(
    sources: &[TokenSource],
    keep: Option<usize>,
    headers: &mut HeaderMap,
    path_and_query: &mut String,
    protocols: &mut Vec<String>,
) {
    for (i, s) in sources.iter().enumerate() {
        if keep == Some(i) {
            continue;
        }
        match s {
            TokenSource::Header => strip_header(headers),
            TokenSource::Query(name) => *path_and_query = strip_query(path_and_query, name),
            TokenSource::Cookie(name) => {
                if !headers.contains_key(COOKIE) {
                    continue;
                }
                // A Cookie header that is not ASCII cannot be parsed here,
                // so it is not forwarded at all (it could hide a token).
                let values: Vec<String> = headers
                    .get_all(COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok().map(str::to_string))
                    .collect();
                let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                let rest = strip_cookie(&refs, name);
                headers.remove(COOKIE);
                if let Some(v) = rest.and_then(|r| HeaderValue::from_str(&r).ok()) {
                    headers.insert(COOKIE, v);
                }
            }
            TokenSource::Subprotocol(prefix) => *protocols = strip_subprotocol(protocols, prefix),
        }
    }
}

/// `Authorization: Bearer <token>` (scheme case-insensitive). Several
/// Authorization headers are ambiguous and yield nothing.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let mut all = headers.get_all(AUTHORIZATION).iter();
    let v = all.next()?;
    if all.next().is_some() {
        return None;
    }
    let v = v.to_str().ok()?.trim_matches([' ', '\t']);
    let (scheme, rest) = v.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_matches([' ', '\t']);
    if token.is_empty() || token.contains([' ', '\t']) {
        return None;
    }
    Some(token.to_string())
}

fn query_of(path_and_query: &str) -> Option<&str> {
    let (_, q) = path_and_query.split_once('?')?;
    Some(q.split_once('#').map_or(q, |(q, _)| q))
}

/// One `k=v` query segment, percent-decoded by `form_urlencoded` (`+` is
/// a space; invalid UTF-8 becomes U+FFFD, which no token survives).
fn decoded(segment: &str) -> Option<(Cow<'_, str>, Cow<'_, str>)> {
    form_urlencoded::parse(segment.as_bytes()).next()
}

/// Whether one `k=v` query segment is the parameter `name` (the key is
/// compared as written and percent-decoded).
fn param_is(segment: &str, name: &str) -> bool {
    let raw = segment.split_once('=').map_or(segment, |(k, _)| k);
    raw == name || decoded(segment).is_some_and(|(k, _)| k == name)
}

/// Every value of query parameter `name` (a segment without `=` has none),
/// percent-decoded.
fn query_values<'a>(path_and_query: &'a str, name: &'a str) -> impl Iterator<Item = String> + 'a {
    query_of(path_and_query)
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(move |seg| seg.contains('=') && param_is(seg, name))
        .filter_map(|seg| decoded(seg).map(|(_, v)| v.into_owned()))
}

/// The first non-empty value of query parameter `name`, percent-decoded.
fn query_param(path_and_query: &str, name: &str) -> Option<String> {
    query_values(path_and_query, name).find(|v| !v.is_empty())
}

/// Removes every parameter `name` from the query; the other parameters are
/// kept byte for byte, and a query left empty loses its `?`.
pub fn strip_query(path_and_query: &str, name: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_string();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|seg| !param_is(seg, name))
        .collect();
    let kept = kept.join("&");
    let mut out = path.to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept);
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// The values of every cookie `name` in the Cookie headers, parsed by the
/// `cookie` crate (RFC 6265 section 4.2.1: `name=value` pairs separated by
/// `;`, surrounding double quotes removed). A header that is not ASCII, and
/// a pair without `=`, carry no cookie.
fn cookie_values<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = String> + 'a {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .filter(move |c| c.name() == name)
        .map(|c| c.value_trimmed().to_string())
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    cookie_values(headers, name).find(|v| !v.is_empty())
}

/// The Cookie header without cookie `name` (all its copies); the other
/// cookies are kept as written, in order, joined with `; `. None if nothing
/// is left. Each pair is judged by the same parser as [`cookie_values`], so
/// whatever was read as the token is what is removed.
pub fn strip_cookie(cookie_header_values: &[&str], name: &str) -> Option<String> {
    let kept: Vec<&str> = cookie_header_values
        .iter()
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .filter(|c| Cookie::parse(*c).map_or(true, |c| c.name() != name))
        .collect();
    if kept.is_empty() {
        None
    } else {
        Some(kept.join("; "))
    }
}

/// The requested subprotocols without the ones carrying a token (those
/// starting with `prefix` and longer than it).
pub fn strip_subprotocol(protocols: &[String], prefix: &str) -> Vec<String> {
    protocols
        .iter()
        .filter(|p| !(p.starts_with(prefix) && p.len() > prefix.len()))
        .cloned()
        .collect()
}

/// Removes the `Authorization` header (the `header` source).
pub fn strip_header(headers: &mut HeaderMap) {
    headers.remove(AUTHORIZATION);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::guard::jwt::test_support::*;

    // -- extraction and removal ----------------------------------------------

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn one(src: TokenSource, h: &HeaderMap, pq: &str, protos: &[&str]) -> Option<String> {
        let protos: Vec<String> = protos.iter().map(|s| s.to_string()).collect();
        extract(&[src], h, pq, &protos).map(|f| f.token)
    }

    #[test]
    fn bearer_header() {
        let get = |v: &[(&str, &str)]| one(TokenSource::Header, &headers(v), "/", &[]);
        assert_eq!(
            get(&[("authorization", "Bearer abc.def.ghi")]).as_deref(),
            Some("abc.def.ghi")
        );
        assert_eq!(
            get(&[("authorization", "bearer   abc ")]).as_deref(),
            Some("abc")
        );
        assert_eq!(
            get(&[("authorization", "BEARER\tabc")]).as_deref(),
            Some("abc")
        );
        assert_eq!(get(&[("authorization", "Basic dXNlcjpwYXNz")]), None);
        assert_eq!(get(&[("authorization", "Bearer")]), None);
        assert_eq!(get(&[("authorization", "Bearer ")]), None);
        assert_eq!(get(&[("authorization", "Bearer a b")]), None);
        assert_eq!(get(&[("authorization", "Bearerabc")]), None);
        assert_eq!(
            get(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]),
            None
        );
        assert_eq!(get(&[]), None);
        let mut h = headers(&[("authorization", "Bearer a"), ("x-other", "1")]);
        strip_header(&mut h);
        assert!(h.get(AUTHORIZATION).is_none());
        assert!(h.get("x-other").is_some());
    }

    #[test]
    fn query_parameter() {
        let q = |pq: &str| {
            one(
                TokenSource::Query("access_token".into()),
                &HeaderMap::new(),
                pq,
                &[],
            )
        };
        assert_eq!(
            q("/ws?a=1&access_token=tok.en&b=2").as_deref(),
            Some("tok.en")
        );
        assert_eq!(q("/ws?access_token=tok").as_deref(), Some("tok"));
        assert_eq!(q("/ws?access_token=a%2Eb").as_deref(), Some("a.b"));
        assert_eq!(q("/ws?access%5Ftoken=tok").as_deref(), Some("tok"));
        assert_eq!(
            q("/ws?access_token=&access_token=second").as_deref(),
            Some("second")
        );
        assert_eq!(q("/ws?xaccess_token=1&access_tokens=2"), None);
        assert_eq!(q("/ws?access_token"), None);
        assert_eq!(q("/ws"), None);
        assert_eq!(q("/access_token=tok"), None);

        assert_eq!(
            strip_query("/ws?a=1&access_token=tok&b=2", "access_token"),
            "/ws?a=1&b=2"
        );
        assert_eq!(strip_query("/ws?access_token=tok", "access_token"), "/ws");
        assert_eq!(
            strip_query("/ws?access_token=tok&b=%20x", "access_token"),
            "/ws?b=%20x"
        );
        assert_eq!(
            strip_query("/ws?a=1&access_token=tok", "access_token"),
            "/ws?a=1"
        );
        assert_eq!(
            strip_query("/ws?access_token=1&a=x&access_token=2", "access_token"),
            "/ws?a=x"
        );
        assert_eq!(
            strip_query("/ws?access%5Ftoken=1&a=x", "access_token"),
            "/ws?a=x"
        );
        assert_eq!(
            strip_query("/ws?access_tokens=1&xaccess_token=2", "access_token"),
            "/ws?access_tokens=1&xaccess_token=2"
        );
        assert_eq!(strip_query("/ws?a=1", "access_token"), "/ws?a=1");
        assert_eq!(strip_query("/ws", "access_token"), "/ws");
        assert_eq!(strip_query("/ws?", "access_token"), "/ws");
    }

    #[test]
    fn cookie_source() {
        let c = |vals: &[&str]| {
            let pairs: Vec<(&str, &str)> = vals.iter().map(|v| ("cookie", *v)).collect();
            one(
                TokenSource::Cookie("session".into()),
                &headers(&pairs),
                "/",
                &[],
            )
        };
        assert_eq!(c(&["a=1; session=tok; b=2"]).as_deref(), Some("tok"));
        assert_eq!(c(&["a=1;session=tok"]).as_deref(), Some("tok"));
        assert_eq!(c(&["session=\"tok\""]).as_deref(), Some("tok"));
        assert_eq!(c(&["  session = tok ;"]).as_deref(), Some("tok"));
        assert_eq!(c(&["session=a=b"]).as_deref(), Some("a=b"));
        assert_eq!(c(&["a=1", "session=tok"]).as_deref(), Some("tok"));
        assert_eq!(c(&["session=; session=later"]).as_deref(), Some("later"));
        assert_eq!(c(&["xsession=1; sessions=2; Session=3"]), None);
        assert_eq!(c(&["session"]), None);
        assert_eq!(c(&[";;"]), None);
        assert_eq!(c(&[]), None);

        assert_eq!(
            strip_cookie(&["a=1; session=tok; b=2"], "session").as_deref(),
            Some("a=1; b=2")
        );
        assert_eq!(
            strip_cookie(&["a=1;session=tok", "c=3"], "session").as_deref(),
            Some("a=1; c=3")
        );
        assert_eq!(strip_cookie(&["session=tok"], "session"), None);
        assert_eq!(strip_cookie(&["session=1; session=2"], "session"), None);
        assert_eq!(
            strip_cookie(&["xsession=1; session=2"], "session").as_deref(),
            Some("xsession=1")
        );
        assert_eq!(strip_cookie(&[], "session"), None);
    }

    #[test]
    fn subprotocol_source() {
        let src = TokenSource::Subprotocol("access_token.".into());
        let h = HeaderMap::new();
        assert_eq!(
            one(src.clone(), &h, "/", &["chat", "access_token.a.b.c"]).as_deref(),
            Some("a.b.c")
        );
        assert_eq!(one(src.clone(), &h, "/", &["chat", "access_token."]), None);
        assert_eq!(one(src, &h, "/", &["chat"]), None);
        let protos: Vec<String> = ["chat", "access_token.x", "access_token.", "v2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            strip_subprotocol(&protos, "access_token."),
            ["chat", "access_token.", "v2"]
        );
        assert_eq!(
            strip_subprotocol(&protos[1..2], "access_token."),
            Vec::<String>::new()
        );
    }

    #[test]
    fn sources_are_tried_in_order() {
        let sources = [
            TokenSource::Query("t".into()),
            TokenSource::Header,
            TokenSource::Cookie("c".into()),
        ];
        let h = headers(&[
            ("authorization", "Bearer from-header"),
            ("cookie", "c=from-cookie"),
        ]);
        let f = extract(&sources, &h, "/?t=from-query", &[]).unwrap();
        assert_eq!(
            f,
            Found {
                token: "from-query".into(),
                source: 0
            }
        );
        let f = extract(&sources, &h, "/?x=1", &[]).unwrap();
        assert_eq!(
            f,
            Found {
                token: "from-header".into(),
                source: 1
            }
        );
        let h = headers(&[("cookie", "c=from-cookie")]);
        assert_eq!(extract(&sources, &h, "/", &[]).unwrap().source, 2);
        assert_eq!(extract(&sources, &HeaderMap::new(), "/", &[]), None);
    }

    #[test]
    fn a_token_in_more_than_one_place_is_ambiguous() {
        let sources = [
            TokenSource::Header,
            TokenSource::Query("t".into()),
            TokenSource::Cookie("c".into()),
            TokenSource::Subprotocol("bearer.".into()),
        ];
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let one = headers(&[("authorization", "Bearer a")]);
        assert_eq!(
            find(&sources, &one, "/?x=1", &[]).unwrap().unwrap().source,
            0
        );
        assert_eq!(find(&sources, &one, "/?t=b", &[]), Err(Ambiguous));
        assert_eq!(
            find(&sources, &one, "/?t=", &[]).unwrap().unwrap().source,
            0
        );
        let cookie = headers(&[("authorization", "Bearer a"), ("cookie", "c=b")]);
        assert_eq!(find(&sources, &cookie, "/", &[]), Err(Ambiguous));
        assert_eq!(
            find(&sources, &one, "/", &p(&["chat", "bearer.b"])),
            Err(Ambiguous)
        );
        let two = headers(&[("authorization", "Bearer a"), ("authorization", "Basic x")]);
        assert_eq!(find(&sources, &two, "/", &[]), Err(Ambiguous));
        let none = HeaderMap::new();
        assert_eq!(find(&sources, &none, "/?t=a&t=b", &[]), Err(Ambiguous));
        assert_eq!(
            find(&sources, &headers(&[("cookie", "c=a; c=b")]), "/", &[]),
            Err(Ambiguous)
        );
        assert_eq!(
            find(&sources, &none, "/", &p(&["bearer.a", "bearer.b"])),
            Err(Ambiguous)
        );
        assert_eq!(find(&sources, &none, "/", &p(&["chat"])), Ok(None));
    }

    #[test]
    fn every_source_is_stripped() {
        let sources = [
            TokenSource::Header,
            TokenSource::Query("t".into()),
            TokenSource::Cookie("c".into()),
            TokenSource::Subprotocol("bearer.".into()),
        ];
        let mut h = headers(&[("authorization", "Bearer a"), ("cookie", "c=b; k=1")]);
        let mut pq = "/x?t=c&y=2".to_string();
        let mut protos = vec!["chat".to_string(), "bearer.d".to_string()];
        strip_sources(&sources, None, &mut h, &mut pq, &mut protos);
        assert!(h.get(AUTHORIZATION).is_none());
        assert_eq!(h.get(COOKIE).unwrap(), "k=1");
        assert_eq!(pq, "/x?y=2");
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_bytes(b"tok=forged; caf\xc3\xa9=1").unwrap(),
        );
        h.append(COOKIE, HeaderValue::from_static("k=2"));
        strip_sources(&sources, None, &mut h, &mut pq, &mut protos);
        let left: Vec<_> = h.get_all(COOKIE).iter().collect();
        assert_eq!(left, vec!["k=2"]);
        assert_eq!(protos, vec!["chat"]);
        let mut h = headers(&[("authorization", "Bearer a"), ("cookie", "c=b")]);
        let mut pq = "/x?t=c".to_string();
        strip_sources(&sources, Some(0), &mut h, &mut pq, &mut protos);
        assert_eq!(h.get(AUTHORIZATION).unwrap(), "Bearer a");
        assert!(h.get(COOKIE).is_none());
        assert_eq!(pq, "/x");
    }
}
