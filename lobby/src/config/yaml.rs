//! A YAML document as a tree in which every node knows where it starts.
//!
//! Built from saphyr-parser's events rather than through serde so that
//! validation sees the position of every field and can report every problem
//! in one pass. Hostile input is bounded here, while the events stream in:
//! nesting depth, and the number of nodes including those that aliases
//! repeat, so an alias bomb ("billion laughs") stops at the limit instead of
//! expanding.
use std::{borrow::Cow, collections::HashMap, rc::Rc};

use saphyr_parser::{Event, Marker, Parser, ScalarStyle, StrInput};

mod lines;

/// Far deeper than a Lobby file (11 levels) needs.
pub(crate) const MAX_DEPTH: usize = 32;
/// Nodes in the document, counting each node an alias repeats: room for
/// 10,000 health-checked upstreams, and a bound on the memory and time an
/// alias bomb can take.
pub(crate) const MAX_NODES: usize = 1_000_000;

/// A position in the text; both 1-based, the column in characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mark {
    pub line: usize,
    pub column: usize,
}

impl From<&Marker> for Mark {
    fn from(marker: &Marker) -> Self {
        Mark {
            line: marker.line(),
            column: marker.col() + 1,
        }
    }
}

/// A node written once owns its value. A node an alias may repeat (one
/// inside an anchored node, or an alias itself) shares it instead, so
/// memory grows with the text, not with what aliases repeat; sharing only
/// there spares the rest of the document an allocation per node.
#[derive(Debug)]
pub(crate) struct Node {
    pub mark: Mark,
    value: Content,
}

#[derive(Debug)]
enum Content {
    Own(Value),
    Shared(Rc<Value>),
}

impl Node {
    pub fn value(&self) -> &Value {
        match &self.value {
            Content::Own(value) => value,
            Content::Shared(value) => value,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value(), Value::Null)
    }

    /// The same node again, for a node inside a shared one: every node
    /// an alias may repeat is built shared.
    fn share(&self) -> Node {
        match &self.value {
            Content::Shared(value) => Node {
                mark: self.mark,
                value: Content::Shared(Rc::clone(value)),
            },
            Content::Own(_) => unreachable!("a node inside a shared one is shared"),
        }
    }
}

#[derive(Debug)]
pub(crate) enum Value {
    /// An empty value, `~` or `null`.
    Null,
    Scalar {
        text: String,
        /// Quoted, a block scalar or tagged `!!str`: text, never a number or
        /// a boolean.
        quoted: bool,
    },
    Sequence(Vec<Node>),
    /// Entries in document order; duplicate keys are kept for validation to
    /// report.
    Mapping(Vec<(Node, Node)>),
}

/// The text is not a YAML document Lobby will read; parsing stops at the first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub mark: Mark,
    pub message: String,
}

/// A document and what decides whether a piece of it reads the same alone.
pub(crate) struct Document {
    /// `None` when there is none (an empty file, or only comments).
    pub root: Option<Node>,
    /// Anchors tie distant nodes together (an alias repeats what an anchor
    /// holds), so a piece of such a document may not be read alone.
    pub has_anchors: bool,
    /// Nodes, counting those aliases repeat, against [`MAX_NODES`].
    pub nodes: usize,
}

/// The single document in `text`: read line by line when it is written
/// in the block style Lobby's files use (see [`lines`]), else by saphyr.
pub(crate) fn parse_document(text: &str) -> Result<Document, SyntaxError> {
    let Some(document) = lines::read(text) else {
        return parse_events(text);
    };
    #[cfg(debug_assertions)]
    {
        let events = parse_events(text).expect("what the line reader reads is valid YAML");
        assert!(
            lines::same_document(&document, &events),
            "the line reader read differently from saphyr:\n{text}"
        );
    }
    Ok(document)
}

/// The single document in `text`, from saphyr's events.
fn parse_events(text: &str) -> Result<Document, SyntaxError> {
    let mut builder = TreeBuilder {
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
        nodes: 0,
        last_mark: Mark { line: 1, column: 1 },
        anchored: 0,
        items: Vec::new(),
        entries: Vec::new(),
    };
    let root = builder.document()?;
    Ok(Document {
        root,
        has_anchors: !builder.anchors.is_empty(),
        nodes: builder.nodes,
    })
}

/// The key that merges other mappings into this one (`<<: *defaults`), as in
/// YAML 1.1 and the Go YAML library of the original Lobby.
const MERGE_KEY: &str = "<<";

struct TreeBuilder<'t> {
    parser: Parser<'t, StrInput<'t>>,
    /// Anchor id to the anchored node's mark, value and size in nodes.
    anchors: HashMap<usize, (Mark, Rc<Value>, usize)>,
    nodes: usize,
    last_mark: Mark,
    /// Anchored nodes being built around the current one, whose nodes an
    /// alias may repeat.
    anchored: usize,
    /// The items and entries of the collections being built, one after the
    /// other: each collection then takes one allocation of its exact size.
    items: Vec<Node>,
    entries: Vec<(Node, Node)>,
}

impl<'t> TreeBuilder<'t> {
    fn document(&mut self) -> Result<Option<Node>, SyntaxError> {
        self.expect(|e| matches!(e, Event::StreamStart), "the start of the text")?;
        let (event, _) = self.next()?;
        match event {
            Event::StreamEnd => return Ok(None),
            Event::DocumentStart(_) => {}
            _ => return Err(self.unexpected("a document")),
        }
        let (event, mark) = self.next()?;
        let (root, _) = self.node(event, mark, 0)?;
        self.expect(
            |e| matches!(e, Event::DocumentEnd),
            "the end of the document",
        )?;
        let (event, mark) = self.next()?;
        match event {
            Event::StreamEnd => Ok(Some(root)),
            _ => Err(SyntaxError {
                mark,
                message: "a second YAML document; expected one document".to_owned(),
            }),
        }
    }

    fn next(&mut self) -> Result<(Event<'t>, Mark), SyntaxError> {
        match self.parser.next_event() {
            Some(Ok((event, span))) => {
                let mark = Mark::from(&span.start);
                self.last_mark = mark;
                Ok((event, mark))
            }
            Some(Err(error)) => Err(SyntaxError {
                mark: Mark::from(error.marker()),
                message: syntax_message(error.info()),
            }),
            None => Err(self.unexpected("more text")),
        }
    }

    fn expect(&mut self, wanted: fn(&Event) -> bool, what: &str) -> Result<(), SyntaxError> {
        let (event, _) = self.next()?;
        if wanted(&event) {
            Ok(())
        } else {
            Err(self.unexpected(what))
        }
    }

    fn unexpected(&self, what: &str) -> SyntaxError {
        SyntaxError {
            mark: self.last_mark,
            message: format!("unexpected YAML structure; expected {what}"),
        }
    }

    /// Counts `added` more nodes against [`MAX_NODES`].
    fn count(&mut self, added: usize, mark: Mark) -> Result<(), SyntaxError> {
        self.nodes = self.nodes.saturating_add(added);
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                mark,
                message: format!(
                    "document too large: more than {MAX_NODES} nodes (counting what aliases repeat)"
                ),
            });
        }
        Ok(())
    }

    /// The node that `event` starts, and its size in nodes.
    fn node(
        &mut self,
        event: Event<'t>,
        mark: Mark,
        depth: usize,
    ) -> Result<(Node, usize), SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(SyntaxError {
                mark,
                message: format!("nesting deeper than {MAX_DEPTH} levels"),
            });
        }
        self.count(1, mark)?;
        let (value, size, anchor) = match event {
            Event::Alias(anchor) => {
                let Some((anchored, value, size)) = self.anchors.get(&anchor) else {
                    return Err(SyntaxError {
                        mark,
                        message: "alias to an unknown anchor".to_owned(),
                    });
                };
                let (node, size) = (
                    Node {
                        mark: *anchored,
                        value: Content::Shared(Rc::clone(value)),
                    },
                    *size,
                );
                self.count(size - 1, mark)?;
                return Ok((node, size));
            }
            Event::Scalar(text, style, anchor, tag) => {
                let quoted = style != ScalarStyle::Plain
                    || tag.is_some_and(|t| t.is_yaml_core_schema() && t.suffix == "str");
                (scalar_value(text, quoted), 1, anchor)
            }
            Event::SequenceStart(anchor, _) => {
                self.anchored += usize::from(anchor != 0);
                let (items, size) = self.sequence(depth)?;
                self.anchored -= usize::from(anchor != 0);
                (Value::Sequence(items), size, anchor)
            }
            Event::MappingStart(anchor, _) => {
                self.anchored += usize::from(anchor != 0);
                let (entries, size) = self.mapping(mark, depth)?;
                self.anchored -= usize::from(anchor != 0);
                (Value::Mapping(entries), size, anchor)
            }
            _ => return Err(self.unexpected("a value")),
        };
        if anchor == 0 && self.anchored == 0 {
            return Ok((
                Node {
                    mark,
                    value: Content::Own(value),
                },
                size,
            ));
        }
        let value = Rc::new(value);
        if anchor != 0 {
            self.anchors.insert(anchor, (mark, Rc::clone(&value), size));
        }
        Ok((
            Node {
                mark,
                value: Content::Shared(value),
            },
            size,
        ))
    }

    fn sequence(&mut self, depth: usize) -> Result<(Vec<Node>, usize), SyntaxError> {
        let start = self.items.len();
        let mut size = 1;
        loop {
            let (event, mark) = self.next()?;
            if matches!(event, Event::SequenceEnd) {
                return Ok((self.items.drain(start..).collect(), size));
            }
            let (item, item_size) = self.node(event, mark, depth + 1)?;
            size += item_size;
            self.items.push(item);
        }
    }

    fn mapping(
        &mut self,
        mark: Mark,
        depth: usize,
    ) -> Result<(Vec<(Node, Node)>, usize), SyntaxError> {
        let start = self.entries.len();
        let mut merged = Vec::new();
        let mut size = 1;
        loop {
            let (event, key_mark) = self.next()?;
            if matches!(event, Event::MappingEnd) {
                break;
            }
            let (key, key_size) = self.node(event, key_mark, depth + 1)?;
            let (event, value_mark) = self.next()?;
            let (value, value_size) = self.node(event, value_mark, depth + 1)?;
            size += key_size + value_size;
            if scalar_text(&key) == Some(MERGE_KEY) {
                merged.push(value);
            } else {
                self.entries.push((key, value));
            }
        }
        let mut entries: Vec<_> = self.entries.drain(start..).collect();
        for source in merged {
            merge_into(&mut entries, source, mark)?;
        }
        Ok((entries, size))
    }
}

/// Adds the entries of `source` (a mapping or a list of mappings) whose keys
/// `entries` lacks: keys written in the mapping win over merged ones. What
/// an alias may repeat is shared, what is written once moves.
fn merge_into(
    entries: &mut Vec<(Node, Node)>,
    source: Node,
    mark: Mark,
) -> Result<(), SyntaxError> {
    let lacks = |entries: &[(Node, Node)], key: &Node| {
        let text = scalar_text(key);
        !entries.iter().any(|(k, _)| scalar_text(k) == text)
    };
    match source.value {
        Content::Own(Value::Mapping(source_entries)) => {
            for (key, value) in source_entries {
                if lacks(entries, &key) {
                    entries.push((key, value));
                }
            }
            Ok(())
        }
        Content::Own(Value::Sequence(sources)) => sources
            .into_iter()
            .try_for_each(|source| merge_into(entries, source, mark)),
        Content::Shared(value) => match &*value {
            Value::Mapping(source_entries) => {
                for (key, value) in source_entries {
                    if lacks(entries, key) {
                        entries.push((key.share(), value.share()));
                    }
                }
                Ok(())
            }
            Value::Sequence(sources) => sources
                .iter()
                .try_for_each(|source| merge_into(entries, source.share(), mark)),
            _ => Err(not_mergeable(mark)),
        },
        Content::Own(_) => Err(not_mergeable(mark)),
    }
}

fn not_mergeable(mark: Mark) -> SyntaxError {
    SyntaxError {
        mark,
        message: format!("`{MERGE_KEY}` must be given a mapping or a list of mappings"),
    }
}

/// A scalar's value: plain `~`, `null` or nothing is null.
fn scalar_value(text: Cow<str>, quoted: bool) -> Value {
    if !quoted && matches!(&*text, "" | "~" | "null" | "Null" | "NULL") {
        Value::Null
    } else {
        Value::Scalar {
            text: text.into_owned(),
            quoted,
        }
    }
}

fn scalar_text(node: &Node) -> Option<&str> {
    match node.value() {
        Value::Scalar { text, .. } => Some(text),
        _ => None,
    }
}

/// The parser's words, made plainer where an operator often trips.
fn syntax_message(info: &str) -> String {
    // Whole words: "unprintable" (saphyr's word for a NUL) holds "tab".
    let mentions_tabs = info
        .split(|c: char| !c.is_ascii_alphabetic())
        .any(|word| word == "tab" || word == "tabs");
    // saphyr's one "unprintable character" is a NUL.
    if info.contains("unprintable character") {
        "YAML syntax: a NUL byte, which YAML does not allow anywhere (is this a text file?)"
            .to_owned()
    } else if mentions_tabs {
        format!("YAML syntax: {info} (indent with spaces, not tabs)")
    } else if info.contains("recursion limit") {
        format!("YAML syntax: nesting too deep ({info})")
    } else {
        format!("YAML syntax: {info}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree as flow YAML, with each mapping's line.
    fn render(node: &Node) -> String {
        match node.value() {
            Value::Null => "~".to_owned(),
            Value::Scalar { text, .. } => text.clone(),
            Value::Sequence(items) => {
                format!(
                    "[{}]",
                    items.iter().map(render).collect::<Vec<_>>().join(", ")
                )
            }
            Value::Mapping(entries) => format!(
                "{}{{{}}}",
                node.mark.line,
                entries
                    .iter()
                    .map(|(k, v)| format!("{}: {}", render(k), render(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn parsed(text: &str) -> String {
        render(&parse_document(text).unwrap().root.unwrap())
    }

    #[test]
    fn merges_from_written_and_repeated_mappings_read_alike() {
        // Written in place: moved into the mapping.
        assert_eq!(parsed("a: 1\n<<: {a: 2, b: 3}\n"), "1{a: 1, b: 3}");
        assert_eq!(
            parsed("<<: [{a: 1}, {a: 2, b: 3}]\nc: 4\n"),
            "1{c: 4, a: 1, b: 3}"
        );
        // Repeated through aliases, of a mapping or a list of them, and
        // merges inside anchored nodes: shared, with the anchor's line.
        let text = "x: &x\n  a: 1\n  <<: {b: 2}\n\
                    l: &l\n  - {c: 3}\n  - *x\n\
                    y:\n  <<: *x\n  d: 4\n\
                    z:\n  <<: *l\n\
                    w:\n  <<: [*x, {e: 5}]\n";
        assert_eq!(
            parsed(text),
            "1{x: 1{a: 1, b: 2}, l: [5{c: 3}, 1{a: 1, b: 2}], y: 8{d: 4, a: 1, b: 2}, \
             z: 11{c: 3, a: 1, b: 2}, w: 13{a: 1, b: 2, e: 5}}"
        );
        let document = parse_document(text).unwrap();
        assert!(document.has_anchors);
        let refused = parse_document("a: &s text\n<<: *s\n").err().unwrap();
        assert_eq!(refused, not_mergeable(Mark { line: 1, column: 1 }));
    }
}
