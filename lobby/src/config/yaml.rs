//! A YAML document as a tree in which every node knows where it starts.
//!
//! Built from saphyr-parser's events rather than through serde so that
//! validation sees the position of every field and can report every problem
//! in one pass. Hostile input is bounded here, while the events stream in:
//! nesting depth, and the number of nodes including those that aliases
//! repeat, so an alias bomb ("billion laughs") stops at the limit instead of
//! expanding.
use std::{collections::HashMap, rc::Rc};

use saphyr_parser::{Event, Marker, Parser, ScalarStyle, StrInput};

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

/// Cheap to clone: an alias shares the anchored value instead of copying it,
/// so memory grows with the text, not with what aliases repeat.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub mark: Mark,
    value: Rc<Value>,
}

impl Node {
    pub fn value(&self) -> &Value {
        &self.value
    }

    pub fn is_null(&self) -> bool {
        matches!(*self.value, Value::Null)
    }
}

#[derive(Clone, Debug)]
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

/// The single document in `text`.
pub(crate) fn parse_document(text: &str) -> Result<Document, SyntaxError> {
    let mut builder = TreeBuilder {
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
        nodes: 0,
        last_mark: Mark { line: 1, column: 1 },
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
    /// Anchor id to the anchored node and its size in nodes.
    anchors: HashMap<usize, (Node, usize)>,
    nodes: usize,
    last_mark: Mark,
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
                let Some((node, size)) = self.anchors.get(&anchor).cloned() else {
                    return Err(SyntaxError {
                        mark,
                        message: "alias to an unknown anchor".to_owned(),
                    });
                };
                self.count(size - 1, mark)?;
                return Ok((node, size));
            }
            Event::Scalar(text, style, anchor, tag) => {
                let quoted = style != ScalarStyle::Plain
                    || tag.is_some_and(|t| t.is_yaml_core_schema() && t.suffix == "str");
                let value = if !quoted && matches!(&*text, "" | "~" | "null" | "Null" | "NULL") {
                    Value::Null
                } else {
                    Value::Scalar {
                        text: text.into_owned(),
                        quoted,
                    }
                };
                (value, 1, anchor)
            }
            Event::SequenceStart(anchor, _) => {
                let (items, size) = self.sequence(depth)?;
                (Value::Sequence(items), size, anchor)
            }
            Event::MappingStart(anchor, _) => {
                let (entries, size) = self.mapping(mark, depth)?;
                (Value::Mapping(entries), size, anchor)
            }
            _ => return Err(self.unexpected("a value")),
        };
        let node = Node {
            mark,
            value: Rc::new(value),
        };
        if anchor != 0 {
            self.anchors.insert(anchor, (node.clone(), size));
        }
        Ok((node, size))
    }

    fn sequence(&mut self, depth: usize) -> Result<(Vec<Node>, usize), SyntaxError> {
        let mut items = Vec::new();
        let mut size = 1;
        loop {
            let (event, mark) = self.next()?;
            if matches!(event, Event::SequenceEnd) {
                return Ok((items, size));
            }
            let (item, item_size) = self.node(event, mark, depth + 1)?;
            size += item_size;
            items.push(item);
        }
    }

    fn mapping(
        &mut self,
        mark: Mark,
        depth: usize,
    ) -> Result<(Vec<(Node, Node)>, usize), SyntaxError> {
        let mut entries = Vec::new();
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
                entries.push((key, value));
            }
        }
        for source in merged {
            merge_into(&mut entries, &source, mark)?;
        }
        Ok((entries, size))
    }
}

/// Adds the entries of `source` (a mapping or a list of mappings) whose keys
/// `entries` lacks: keys written in the mapping win over merged ones.
fn merge_into(
    entries: &mut Vec<(Node, Node)>,
    source: &Node,
    mark: Mark,
) -> Result<(), SyntaxError> {
    match source.value() {
        Value::Mapping(source_entries) => {
            for (key, value) in source_entries {
                let text = scalar_text(key);
                if !entries.iter().any(|(k, _)| scalar_text(k) == text) {
                    entries.push((key.clone(), value.clone()));
                }
            }
            Ok(())
        }
        Value::Sequence(sources) => sources
            .iter()
            .try_for_each(|source| merge_into(entries, source, mark)),
        _ => Err(SyntaxError {
            mark,
            message: format!("`{MERGE_KEY}` must be given a mapping or a list of mappings"),
        }),
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
    if info.contains("tab") {
        format!("YAML syntax: {info} (indent with spaces, not tabs)")
    } else if info.contains("recursion limit") {
        format!("YAML syntax: nesting too deep ({info})")
    } else {
        format!("YAML syntax: {info}")
    }
}
