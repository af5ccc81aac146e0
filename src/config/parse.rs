//! Reading a policy document: YAML under parse budgets into [`Config`],
//! with every structural problem (syntax, unknown key, wrong type,
//! duplicate key) reported at its own line and column and key path.

use super::*;

/// A structural problem found while reading the YAML (syntax, unknown key,
/// wrong type, duplicate key), at the line and column of the offending key
/// or value.
#[derive(Debug, Clone)]
pub struct ParseProblem {
    pub line: u64,
    pub col: u64,
    pub path: String,
    pub message: String,
}

/// Parse budget: a policy file is small; anything beyond these is hostile or
/// a mistake (a billion-laughs alias bomb, a multi-megabyte file).
fn options() -> serde_saphyr::Options {
    serde_saphyr::Options {
        budget: Some(serde_saphyr::Budget {
            max_reader_input_bytes: Some(1 << 20),
            max_events: 100_000,
            max_aliases: 100,
            max_anchors: 100,
            max_depth: 32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How many structural problems one run reports at most; past this the
/// file is not a policy with typos but something else.
const MAX_STRUCTURAL: usize = 50;

/// The outcome of reading a policy document: every structural problem, and
/// the configuration read from what remains once the offending keys and
/// values are set aside (None when the YAML itself cannot be read: a
/// syntax error, a broken budget, or more than [`MAX_STRUCTURAL`] problems).
/// Positions in the configuration are those of the original text, so the
/// semantic checks run on it point at the right places too.
#[derive(Debug)]
pub struct Parsed {
    pub config: Option<Config>,
    pub problems: Vec<ParseProblem>,
}

/// Reads a policy document and reports every structural problem.
///
/// serde stops at the first error, so this reads the document, notes the
/// error, blanks out the offending entry (an unknown or duplicate key with
/// its value) or value (a wrong type, which then reads as null) in a copy
/// of the text, keeping every other character where it was, and reads
/// again, until the rest deserialises. The error's key path is resolved
/// against the YAML node tree ([`Node`]) so that each problem is reported
/// at its own key or value with a clean path (`origin.allwo`,
/// `routes[0].mode`).
pub fn parse(text: &str) -> Parsed {
    if text.len() > 1 << 20 {
        return Parsed {
            config: None,
            problems: vec![ParseProblem {
                line: 1,
                col: 1,
                path: "(file)".into(),
                message: "policy file larger than 1 MiB".into(),
            }],
        };
    }
    // A syntax error first: nothing after it can be read reliably.
    if let Err(e) = Node::parse(text) {
        let (line, col, message) = e.unwrap_or((1, 1, "invalid YAML".into()));
        return Parsed {
            config: None,
            problems: vec![ParseProblem {
                line,
                col,
                path: "(syntax)".into(),
                message,
            }],
        };
    }
    let mut chars: Vec<char> = text.chars().collect();
    let mut current = text.to_string();
    let mut problems = Vec::new();
    // Nodes already reported (by the start of their key, or their own), and
    // those whose value was blanked for a wrong type: an error that blanking
    // causes around them ("missing field", "null") is a consequence, not a
    // new problem.
    let mut reported: Vec<usize> = Vec::new();
    let mut blanked: Vec<usize> = Vec::new();
    for _ in 0..=MAX_STRUCTURAL * 2 {
        let (err, segments) = match read(&current) {
            Ok(cfg) => {
                return Parsed {
                    config: Some(cfg),
                    problems,
                }
            }
            Err(e) => e,
        };
        let message = clean_message(&err);
        let location = err.location().map(|l| (l.line(), l.column()));
        let fatal = |problems: &mut Vec<ParseProblem>, path: String| {
            problems.push(ParseProblem {
                line: location.map_or(1, |l| l.0),
                col: location.map_or(1, |l| l.1),
                path,
                message: message.clone(),
            });
        };
        if matches!(err.without_snippet(), serde_saphyr::Error::Budget { .. }) {
            fatal(&mut problems, "(file)".into());
            return Parsed {
                config: None,
                problems,
            };
        }
        let Ok(root) = Node::parse(&current) else {
            fatal(&mut problems, "(syntax)".into());
            return Parsed {
                config: None,
                problems,
            };
        };
        let before = chars.clone();
        if let Some(dup) = message.strip_prefix("duplicate mapping key") {
            // Reported at the second occurrence; drop that one and go on.
            let _ = dup;
            match location.and_then(|l| root.entry_at(l.0, l.1)) {
                Some((path, entry)) => {
                    problems.push(ParseProblem {
                        line: entry.key.line,
                        col: entry.key.col,
                        path,
                        message: message.clone(),
                    });
                    blank(&mut chars, entry.key.start, entry.end(), true);
                }
                None => fatal(&mut problems, "(root)".into()),
            }
        } else {
            let found = root.resolve(&segments);
            let unknown = message.starts_with("unknown field");
            let missing = message
                .strip_prefix("missing field `")
                .and_then(|m| m.split('`').next());
            match found {
                Resolved {
                    path,
                    node: Some(node),
                    entry,
                    rest_is_key: false,
                } => {
                    // A value keeps its identity by its key's position: once
                    // blanked, the value itself moves.
                    let id = entry.map_or(node.start, |e| e.key.start);
                    let again = reported.contains(&id);
                    let consequence = (missing.is_some() || message.contains("null"))
                        && blanked
                            .iter()
                            .any(|b| (node.start..=node.end).contains(b) || *b == id);
                    let (line, col) = match (&entry, unknown || missing.is_some()) {
                        (Some(e), true) => (e.key.line, e.key.col),
                        _ => (node.line, node.col),
                    };
                    if !again && !consequence {
                        problems.push(ParseProblem {
                            line,
                            col,
                            path: if path.is_empty() {
                                "(root)".into()
                            } else {
                                path.clone()
                            },
                            message: message.clone(),
                        });
                        reported.push(id);
                    }
                    match (&entry, unknown || again) {
                        // An unknown key, or a value that is still wrong
                        // once blanked (a required key): drop the entry.
                        (Some(e), true) => {
                            if again {
                                blanked.push(id);
                            }
                            blank(&mut chars, e.key.start, e.end(), e.in_flow);
                        }
                        // A wrong type: blank the value, which reads as null.
                        (_, false) if node.start < node.end => {
                            blanked.push(id);
                            blank(&mut chars, node.start, node.end, false);
                        }
                        _ => {}
                    }
                }
                Resolved { path, .. } => {
                    let path = if path.is_empty() {
                        "(root)".into()
                    } else {
                        path
                    };
                    fatal(&mut problems, path);
                }
            }
        }
        if chars == before || problems.len() > MAX_STRUCTURAL {
            return Parsed {
                config: None,
                problems,
            };
        }
        current = chars.iter().collect();
    }
    Parsed {
        config: None,
        problems,
    }
}

/// One serde pass; on failure, the error and its key path.
fn read(text: &str) -> Result<Config, (serde_saphyr::Error, Vec<Seg>)> {
    // The key path of a failure is kept aside: the closure must return
    // serde-saphyr's own error so that it stops reading the document.
    let mut segments = Vec::new();
    let outcome = serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
            segments = e
                .path()
                .iter()
                .filter_map(|s| match s {
                    serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
                    serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
                    _ => None,
                })
                .collect();
            e.into_inner()
        })
    });
    outcome.map_err(|e| (e, segments))
}

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

/// One line, no snippet, no trailing position, and the Rust type names of
/// the schema turned into what an operator wrote.
fn clean_message(err: &serde_saphyr::Error) -> String {
    let shown = err.without_snippet().to_string();
    let first = shown.lines().next().unwrap_or("invalid YAML");
    let first = match first.rfind(" at line ") {
        Some(i) => first.get(..i).unwrap_or(first),
        None => first,
    };
    if let Some(what) = first.strip_prefix("unexpected event: expected ") {
        let what = what.trim_end_matches(" start").trim_end_matches(" scalar");
        let what = match what {
            "mapping" => "a mapping",
            "sequence" => "a list",
            "string" => "a string",
            other => other,
        };
        return format!("wrong type: expected {what}");
    }
    if first.contains("untagged enum SizeValue") {
        return "expected a size: a number of bytes or a string like 64KiB".into();
    }
    let mut m = first.to_string();
    if let Some(i) = m.find("expected struct ") {
        m.truncate(i);
        m.push_str("expected a mapping");
    } else if let Some(i) = m.find("expected a span-aware newtype wrapper") {
        m.truncate(i);
        m.push_str("expected a value");
    }
    m.replace("invalid type: map,", "invalid type: mapping,")
}

/// Replaces `chars[start..end]` with spaces, keeping line breaks, so that
/// every other character keeps its line and column. In a flow collection
/// the comma that separated the entry goes too.
fn blank(chars: &mut [char], start: usize, end: usize, in_flow: bool) {
    let end = end.min(chars.len());
    if start >= end {
        return;
    }
    for c in chars.iter_mut().take(end).skip(start) {
        if *c != '\n' && *c != '\r' {
            *c = ' ';
        }
    }
    if in_flow {
        // `{a: 1, bad: 2}` -> `{a: 1         }`; `{bad: 2, a: 1}` -> `{        a: 1}`.
        let after = chars.iter().skip(end).position(|c| !c.is_whitespace());
        if let Some(i) = after.map(|i| i + end) {
            if chars.get(i) == Some(&',') {
                if let Some(c) = chars.get_mut(i) {
                    *c = ' ';
                }
                return;
            }
        }
        let before = chars
            .get(..start)
            .and_then(|b| b.iter().rposition(|c| !c.is_whitespace()));
        if let Some(i) = before {
            if chars.get(i) == Some(&',') {
                if let Some(c) = chars.get_mut(i) {
                    *c = ' ';
                }
            }
        }
    }
}

/// A YAML node with its position: `start..end` in characters (as the
/// parser counts them), `line`/`col` 1-based at its start.
#[derive(Debug)]
struct Node {
    start: usize,
    end: usize,
    line: u64,
    col: u64,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Leaf,
    Map(Vec<Entry>),
    Seq(Vec<Node>),
}

#[derive(Debug)]
struct Entry {
    /// The key's text when it is a scalar.
    name: Option<String>,
    key: Node,
    value: Node,
    in_flow: bool,
}

impl Entry {
    fn end(&self) -> usize {
        self.value.end.max(self.key.end)
    }
}

/// Where a serde key path lands in the node tree.
struct Resolved<'a> {
    /// The clean key path, as the operator reads it.
    path: String,
    node: Option<&'a Node>,
    /// The mapping entry whose value is `node`.
    entry: Option<&'a Entry>,
    /// The path went on past the tree (a key that is not written).
    rest_is_key: bool,
}

/// Deepest nesting the tree builder follows (serde's budget stops at 32).
const MAX_TREE_DEPTH: usize = 64;

impl Node {
    /// The document's root node, or where and why it cannot be read
    /// (None when the tree is deeper than [`MAX_TREE_DEPTH`]).
    fn parse(text: &str) -> Result<Node, Option<(u64, u64, String)>> {
        let chars: Vec<char> = text.chars().collect();
        let mut events = saphyr_parser::Parser::new_from_str(text);
        let mut error = None;
        let root = Node::read_stream(&chars, &mut || match events.next_event() {
            Some(Ok((ev, span))) => Ok((ev, span)),
            Some(Err(e)) => {
                let m = e.marker();
                error = Some((m.line() as u64, m.col() as u64 + 1, e.info().to_string()));
                Err(())
            }
            None => Err(()),
        });
        root.map_err(|()| error)
    }

    fn read_stream<'t>(
        chars: &[char],
        next: &mut dyn FnMut() -> Result<(saphyr_parser::Event<'t>, saphyr_parser::Span), ()>,
    ) -> Result<Node, ()> {
        // StreamStart, DocumentStart, the root node.
        let root = loop {
            let Ok((ev, span)) = next() else {
                break Err(());
            };
            match ev {
                saphyr_parser::Event::StreamStart | saphyr_parser::Event::DocumentStart(_) => {}
                // An empty document: nothing more to scan.
                saphyr_parser::Event::StreamEnd => return Ok(Node::leaf(&span)),
                ev => break Node::build(ev, span, chars, next, 0),
            }
        };
        // The rest of the stream must scan too (a syntax error after the
        // first document's root, or a second document).
        root.and_then(|root| loop {
            match next() {
                Ok((saphyr_parser::Event::StreamEnd, _)) => break Ok(root),
                Ok(_) => {}
                Err(()) => break Err(()),
            }
        })
    }

    fn leaf(span: &saphyr_parser::Span) -> Node {
        Node {
            start: span.start.index(),
            end: span.end.index(),
            line: span.start.line() as u64,
            col: span.start.col() as u64 + 1,
            kind: Kind::Leaf,
        }
    }

    fn build<'t>(
        ev: saphyr_parser::Event<'t>,
        span: saphyr_parser::Span,
        text: &[char],
        next: &mut dyn FnMut() -> Result<(saphyr_parser::Event<'t>, saphyr_parser::Span), ()>,
        depth: usize,
    ) -> Result<Node, ()> {
        use saphyr_parser::Event;
        if depth > MAX_TREE_DEPTH {
            return Err(());
        }
        let mut node = Node::leaf(&span);
        match ev {
            Event::MappingStart(..) => {
                let mut entries = Vec::new();
                let flow = text.get(node.start) == Some(&'{');
                loop {
                    let (ev, span) = next()?;
                    if matches!(ev, Event::MappingEnd) {
                        if flow {
                            node.end = span.end.index();
                        }
                        break;
                    }
                    let name = match &ev {
                        Event::Scalar(v, ..) => Some(v.to_string()),
                        _ => None,
                    };
                    let key = Node::build(ev, span, text, next, depth + 1)?;
                    let (ev, span) = next()?;
                    let value = Node::build(ev, span, text, next, depth + 1)?;
                    if !flow {
                        node.end = node.end.max(value.end).max(key.end);
                    }
                    entries.push(Entry {
                        name,
                        key,
                        value,
                        in_flow: flow,
                    });
                }
                node.kind = Kind::Map(entries);
            }
            Event::SequenceStart(..) => {
                let mut items = Vec::new();
                let flow = text.get(node.start) == Some(&'[');
                loop {
                    let (ev, span) = next()?;
                    if matches!(ev, Event::SequenceEnd) {
                        if flow {
                            node.end = span.end.index();
                        }
                        break;
                    }
                    let item = Node::build(ev, span, text, next, depth + 1)?;
                    if !flow {
                        node.end = node.end.max(item.end);
                    }
                    items.push(item);
                }
                node.kind = Kind::Seq(items);
            }
            Event::Scalar(..) | Event::Alias(..) => {}
            _ => return Err(()),
        }
        Ok(node)
    }

    /// Follows a serde path. `value` segments that name no key are the
    /// [`Spanned`] wrapper's own field and are skipped.
    fn resolve(&self, segments: &[Seg]) -> Resolved<'_> {
        let mut path = String::new();
        let mut node = self;
        let mut entry = None;
        for seg in segments {
            match (seg, &node.kind) {
                (Seg::Key(k), Kind::Map(entries)) => {
                    match entries
                        .iter()
                        .find(|e| e.name.as_deref() == Some(k.as_str()))
                    {
                        Some(e) => {
                            if !path.is_empty() {
                                path.push('.');
                            }
                            path.push_str(k);
                            node = &e.value;
                            entry = Some(e);
                        }
                        None if k == "value" => {}
                        None => {
                            if !path.is_empty() {
                                path.push('.');
                            }
                            path.push_str(k);
                            return Resolved {
                                path,
                                node: Some(node),
                                entry,
                                rest_is_key: true,
                            };
                        }
                    }
                }
                (Seg::Key(k), _) if k == "value" => {}
                (Seg::Index(i), Kind::Seq(items)) => match items.get(*i) {
                    Some(item) => {
                        path.push_str(&format!("[{i}]"));
                        node = item;
                        entry = None;
                    }
                    None => {
                        path.push_str(&format!("[{i}]"));
                        return Resolved {
                            path,
                            node: None,
                            entry: None,
                            rest_is_key: false,
                        };
                    }
                },
                (Seg::Key(k), _) => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                    return Resolved {
                        path,
                        node: None,
                        entry: None,
                        rest_is_key: false,
                    };
                }
                (Seg::Index(i), _) => {
                    path.push_str(&format!("[{i}]"));
                    return Resolved {
                        path,
                        node: None,
                        entry: None,
                        rest_is_key: false,
                    };
                }
            }
        }
        Resolved {
            path,
            node: Some(node),
            entry,
            rest_is_key: false,
        }
    }

    /// The mapping entry whose key starts at `line:col`, with its path.
    fn entry_at(&self, line: u64, col: u64) -> Option<(String, &Entry)> {
        match &self.kind {
            Kind::Leaf => None,
            Kind::Map(entries) => entries.iter().find_map(|e| {
                let name = e.name.clone().unwrap_or_else(|| "?".into());
                if (e.key.line, e.key.col) == (line, col) {
                    return Some((name, e));
                }
                e.value
                    .entry_at(line, col)
                    .map(|(p, x)| (format!("{name}.{p}").replace(".[", "["), x))
            }),
            Kind::Seq(items) => items.iter().enumerate().find_map(|(i, n)| {
                n.entry_at(line, col)
                    .map(|(p, x)| (format!("[{i}].{p}"), x))
            }),
        }
    }
}
