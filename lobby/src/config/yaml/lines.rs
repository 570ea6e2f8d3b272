//! The block style Lobby files are written in, read a line at a time. At
//! 1,000 targets of 10 upstreams (1 MB) saphyr's scanner and parser take
//! most of a reload's reading, and a reload's reading is Lobby's own time
//! between an edit and the kernel.
//!
//! Only what is sure to read as saphyr reads it is read here: block
//! mappings and sequences (a sequence under a key may share its indent),
//! keys of letters, digits, `_` and `-`, plain scalars of letters, digits,
//! spaces and `._/:+=~-` (no `: `, no leading indicator), quoted scalars
//! without escapes and flow collections of these, each on one line,
//! whole-line and trailing comments, in printable ASCII (no tabs, no
//! carriage returns, no control characters). Anything else, an empty value
//! among them, gives `None`, and the document goes to saphyr, which also
//! words every error. Debug builds check each document read here against
//! saphyr's reading of it.
use super::{Content, Document, MAX_DEPTH, MAX_NODES, Mark, Node, Value, scalar_value};

/// Longest key read here; saphyr refuses implicit keys past 1,024
/// characters.
const MAX_KEY: usize = 128;

/// The document in `text`, when it is written in the style this module
/// reads.
pub(super) fn read(text: &str) -> Option<Document> {
    // Printable ASCII only: saphyr refuses a NUL anywhere, comments
    // included, and tabs and carriage returns have rules of their own.
    if !text
        .bytes()
        .all(|b| b == b'\n' || (b' '..=b'~').contains(&b))
    {
        return None;
    }
    let mut lines = Vec::new();
    for (index, line) in text.split('\n').enumerate() {
        let content = line.trim_start_matches(' ');
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let indent = line.len() - content.len();
        // Document markers and directives.
        if indent == 0
            && (content.starts_with("---")
                || content.starts_with("...")
                || content.starts_with('%'))
        {
            return None;
        }
        lines.push(Line {
            number: index + 1,
            indent,
            content: content.trim_end_matches(' '),
        });
    }
    let mut reader = Reader {
        lines,
        next: 0,
        nodes: 0,
    };
    let root = match reader.lines.first() {
        Some(_) => Some(reader.block(0)?),
        None => None,
    };
    if reader.next != reader.lines.len() || reader.nodes > MAX_NODES {
        return None;
    }
    Some(Document {
        root,
        has_anchors: false,
        nodes: reader.nodes,
    })
}

/// A line with something on it besides a comment.
#[derive(Clone, Copy)]
struct Line<'t> {
    /// From 1.
    number: usize,
    /// Spaces before the content; an item's content starts further right.
    indent: usize,
    /// Without the indent and trailing spaces.
    content: &'t str,
}

struct Reader<'t> {
    lines: Vec<Line<'t>>,
    /// The first line not read yet.
    next: usize,
    nodes: usize,
}

impl<'t> Reader<'t> {
    /// The mapping or sequence that starts at the next line, at its indent.
    fn block(&mut self, depth: usize) -> Option<Node> {
        let line = &self.lines[self.next];
        if is_item(line.content) {
            self.sequence(line.indent, depth, false)
        } else {
            self.mapping(line.indent, depth)
        }
    }

    /// Counts a node `depth` levels deep.
    fn enter(&mut self, depth: usize) -> Option<()> {
        self.nodes += 1;
        (depth <= MAX_DEPTH).then_some(())
    }

    /// Whether the next line is indented past `indent`: text this reader
    /// left unread under a node, which is saphyr's to read.
    fn more_indented(&self, indent: usize) -> bool {
        self.lines.get(self.next).is_some_and(|l| l.indent > indent)
    }

    /// A sequence at `indent`; `under_key` when it shares the indent of
    /// the key it is the value of.
    fn sequence(&mut self, indent: usize, depth: usize, under_key: bool) -> Option<Node> {
        let first = self.lines[self.next];
        // saphyr marks a sequence under a key at its first item's content,
        // others at their first `-`.
        let column = if under_key {
            let (content, inner) = item_content(first);
            if content.is_empty() {
                return None;
            }
            inner + 1
        } else {
            indent + 1
        };
        let mark = Mark {
            line: first.number,
            column,
        };
        self.enter(depth)?;
        let mut items = Vec::new();
        while let Some(&line) = self.lines.get(self.next) {
            if line.indent != indent || !is_item(line.content) {
                break;
            }
            let (content, inner) = item_content(line);
            let number = line.number;
            if content.is_empty() {
                // `-` alone: the item is the block below it.
                self.next += 1;
                if !self.more_indented(indent) {
                    return None;
                }
                items.push(self.block(depth + 1)?);
            } else if is_item(content) {
                return None;
            } else if key_and_rest(content).is_some() {
                // A mapping whose first entry shares the item's line: its
                // entries are at the column of its first key.
                self.lines[self.next] = Line {
                    number,
                    indent: inner,
                    content,
                };
                items.push(self.mapping(inner, depth + 1)?);
            } else {
                self.next += 1;
                items.push(self.value(content, number, inner + 1, depth + 1)?);
            }
            if self.more_indented(indent) {
                return None;
            }
        }
        Some(Node {
            mark,
            value: Content::Own(Value::Sequence(items)),
        })
    }

    fn mapping(&mut self, indent: usize, depth: usize) -> Option<Node> {
        let mark = Mark {
            line: self.lines[self.next].number,
            column: indent + 1,
        };
        self.enter(depth)?;
        let mut entries = Vec::new();
        while let Some(&line) = self.lines.get(self.next) {
            if line.indent != indent {
                break;
            }
            let (key, rest) = key_and_rest(line.content)?;
            let number = line.number;
            self.enter(depth + 1)?;
            let key_node = Node {
                mark: Mark {
                    line: number,
                    column: indent + 1,
                },
                value: Content::Own(scalar_value(key.into(), false)),
            };
            let content = rest.trim_start_matches(' ');
            let column = indent + 1 + key.len() + 1 + rest.len() - content.len();
            self.next += 1;
            let value = if content.is_empty() || content.starts_with('#') {
                match self.lines.get(self.next) {
                    Some(below) if below.indent > indent => self.block(depth + 1)?,
                    // A sequence under a key may share the key's indent.
                    Some(below) if below.indent == indent && is_item(below.content) => {
                        self.sequence(indent, depth + 1, true)?
                    }
                    // An empty value: where saphyr marks it is left to
                    // saphyr.
                    _ => return None,
                }
            } else {
                self.value(content, number, column, depth + 1)?
            };
            entries.push((key_node, value));
            if self.more_indented(indent) {
                return None;
            }
        }
        Some(Node {
            mark,
            value: Content::Own(Value::Mapping(entries)),
        })
    }

    /// The scalar or one-line flow collection `content` at `column` of
    /// line `number`, with any comment after it.
    fn value(&mut self, content: &str, number: usize, column: usize, depth: usize) -> Option<Node> {
        if content.starts_with(['{', '[']) {
            let mut at = 0;
            let node = self.flow(content, &mut at, number, column, depth)?;
            return ends_line(&content[at..]).then_some(node);
        }
        self.enter(depth)?;
        let value = match content.as_bytes()[0] {
            quote @ (b'"' | b'\'') => {
                let (text, end) = quoted(content, 0, quote)?;
                if !ends_line(&content[end..]) {
                    return None;
                }
                scalar_value(text.into(), true)
            }
            _ => {
                let text = match content.find(" #") {
                    Some(at) => content[..at].trim_end_matches(' '),
                    None => content,
                };
                if !is_plain(text) {
                    return None;
                }
                scalar_value(text.into(), false)
            }
        };
        Some(Node {
            mark: Mark {
                line: number,
                column,
            },
            value: Content::Own(value),
        })
    }

    /// The node at byte `at` of `text` inside a flow collection on one
    /// line (or the collection itself), whose first byte is at `column`;
    /// `at` moves past it.
    fn flow(
        &mut self,
        text: &str,
        at: &mut usize,
        number: usize,
        column: usize,
        depth: usize,
    ) -> Option<Node> {
        self.enter(depth)?;
        let bytes = text.as_bytes();
        let mark = Mark {
            line: number,
            column: column + *at,
        };
        let close = match bytes.get(*at)? {
            b'{' => b'}',
            b'[' => b']',
            quote @ (b'"' | b'\'') => {
                let (quoted, end) = quoted(text, *at, *quote)?;
                *at = end;
                return Some(Node {
                    mark,
                    value: Content::Own(scalar_value(quoted.into(), true)),
                });
            }
            _ => {
                let end = text[*at..]
                    .find([',', ']', '}'])
                    .map_or(text.len(), |e| *at + e);
                let plain = text[*at..end].trim_end_matches(' ');
                if !is_plain(plain) {
                    return None;
                }
                *at += plain.len();
                return Some(Node {
                    mark,
                    value: Content::Own(scalar_value(plain.into(), false)),
                });
            }
        };
        *at += 1;
        skip_spaces(bytes, at);
        let mut items = Vec::new();
        let mut entries = Vec::new();
        if bytes.get(*at) == Some(&close) {
            *at += 1;
        } else {
            loop {
                if close == b'}' {
                    let (key, rest) = key_and_rest(&text[*at..])?;
                    if rest.is_empty() {
                        return None;
                    }
                    self.enter(depth + 1)?;
                    let key_node = Node {
                        mark: Mark {
                            line: number,
                            column: column + *at,
                        },
                        value: Content::Own(scalar_value(key.into(), false)),
                    };
                    *at += key.len() + 1;
                    skip_spaces(bytes, at);
                    let value = self.flow(text, at, number, column, depth + 1)?;
                    entries.push((key_node, value));
                } else {
                    items.push(self.flow(text, at, number, column, depth + 1)?);
                }
                skip_spaces(bytes, at);
                match *bytes.get(*at)? {
                    b',' => {
                        *at += 1;
                        skip_spaces(bytes, at);
                    }
                    b if b == close => {
                        *at += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        let value = if close == b'}' {
            Value::Mapping(entries)
        } else {
            Value::Sequence(items)
        };
        Some(Node {
            mark,
            value: Content::Own(value),
        })
    }
}

/// The text of the quoted scalar at byte `at` of `content` (its opening
/// `quote`) and the byte after its closing quote, when it has no escape.
fn quoted(content: &str, at: usize, quote: u8) -> Option<(&str, usize)> {
    let end = at + 1 + content[at + 1..].find(char::from(quote))?;
    let text = &content[at + 1..end];
    // A backslash escapes in double quotes, a doubled quote in single ones.
    let escaped = match quote {
        b'"' => text.contains('\\'),
        _ => content.as_bytes().get(end + 1) == Some(&quote),
    };
    (!escaped).then_some((text, end + 1))
}

/// Whether `rest`, what follows a value on its line, is nothing or a
/// comment.
fn ends_line(rest: &str) -> bool {
    let comment = rest.trim_start_matches(' ');
    rest.is_empty()
        || rest.len() > comment.len() && (comment.is_empty() || comment.starts_with('#'))
}

fn skip_spaces(bytes: &[u8], at: &mut usize) {
    while bytes.get(*at) == Some(&b' ') {
        *at += 1;
    }
}

/// What an item's line holds after its `-`, and the indent it starts at.
fn item_content(line: Line<'_>) -> (&str, usize) {
    let rest = &line.content[1..];
    let content = rest.trim_start_matches(' ');
    (content, line.indent + 1 + rest.len() - content.len())
}

/// `- ` or `-` alone: a sequence's item.
fn is_item(content: &str) -> bool {
    content == "-" || content.starts_with("- ")
}

/// The key of a `key: value` or `key:` line and what follows its colon.
fn key_and_rest(content: &str) -> Option<(&str, &str)> {
    let len = key_len(content);
    let rest = content[len..].strip_prefix(':')?;
    let key = &content[..len];
    let fits = (1..=MAX_KEY).contains(&len) && !key.starts_with('-');
    (fits && (rest.is_empty() || rest.starts_with(' '))).then_some((key, rest))
}

/// Length of the run of key characters `content` starts with.
fn key_len(content: &str) -> usize {
    content
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        .count()
}

/// Whether `text` is a plain scalar read the same by any YAML reader: no
/// leading indicator (a `-` before a digit or letter is a sign), nothing
/// that would make it a key, a flow collection or a comment.
fn is_plain(text: &str) -> bool {
    let bytes = text.as_bytes();
    let starts_well = match bytes.first() {
        Some(b'-') => bytes.get(1).is_some_and(u8::is_ascii_alphanumeric),
        Some(b) => b.is_ascii_alphanumeric() || matches!(b, b'.' | b'/' | b'_' | b'+' | b'~'),
        None => false,
    };
    starts_well
        && !text.ends_with(':')
        && !text.contains(": ")
        && bytes.iter().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b' ' | b'.' | b'_' | b'/' | b':' | b'+' | b'=' | b'~' | b'-'
                )
        })
}

/// Whether two readings of a document are the same, marks included.
#[cfg(debug_assertions)]
pub(super) fn same_document(a: &Document, b: &Document) -> bool {
    a.has_anchors == b.has_anchors
        && a.nodes == b.nodes
        && match (&a.root, &b.root) {
            (Some(a), Some(b)) => same(a, b),
            (None, None) => true,
            _ => false,
        }
}

#[cfg(debug_assertions)]
fn same(a: &Node, b: &Node) -> bool {
    a.mark == b.mark
        && match (a.value(), b.value()) {
            (Value::Null, Value::Null) => true,
            (
                Value::Scalar { text, quoted },
                Value::Scalar {
                    text: other,
                    quoted: other_quoted,
                },
            ) => text == other && quoted == other_quoted,
            (Value::Sequence(a), Value::Sequence(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same(a, b))
            }
            (Value::Mapping(a), Value::Mapping(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|((ak, av), (bk, bv))| same(ak, bk) && same(av, bv))
            }
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::{super::parse_events, *};

    /// A small deterministic generator (xorshift), so a failing case is
    /// reproduced by its seed.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len())]
        }

        fn one_in(&mut self, n: usize) -> bool {
            self.below(n) == 0
        }
    }

    /// Keys and scalars this reader reads, and (`NEAR_*`) ones near them
    /// that it must leave to saphyr or read exactly as saphyr does.
    const KEYS: &[&str] = &["name", "port", "a-b", "k_1", "10", "null", "lb", "x"];
    const NEAR_KEYS: &[&str] = &["~", "<<", "a b", "\"q\"", "-x", "x?", "a.b", "'k'"];
    const SCALARS: &[&str] = &[
        "web1",
        "198.18.0.1",
        "\"198.18.0.1\"",
        "'s'",
        "\"a # b\"",
        "-1",
        "~",
        "null",
        "NULL",
        "a #c",
        "x:y",
        "2001:db8::1",
        "foo bar",
        "http://x/y",
        "/healthz",
        "true",
        "0x1F",
        "1e3",
        ".5",
        "+1",
        "a=b",
        "~x",
        "-a",
        "_x",
        "\"\"",
        "''",
        "'a'  # c",
        "{ a: 1 }",
        "[a, b]",
        "{a: [1, 2], b: {c: d}}",
        "[{ name: x, port: 1 }, {}]",
        "{ a: 1 } # c",
        "[ ]",
        "[a b, 'c', \"d\"]",
        "{ name: web1, host: 198.18.1.11, port: 9000 }",
        "[a, [b, [c]]]",
        "{a: 1, a: 2}",
        "{a: ~}",
        "{ a: 'x' , b: \"y\" }",
        "[a,b]",
        "{ a: 1,b: 2 }",
        "[-1]",
    ];
    const NEAR_SCALARS: &[&str] = &[
        "'it''s'",
        "\"a\\tb\"",
        "- x",
        "-",
        "a: b",
        "a#b",
        "::1",
        "x:",
        "|",
        ">",
        "&a x",
        "*a",
        "!!str 1",
        "# c",
        "a  b",
        "@x",
        "`x`",
        "%x",
        "?x",
        "? x",
        ":x",
        "a,b",
        "'open",
        "\"open",
        "\"a\" b",
        "\"a\"#c",
        "a:",
        "a :b",
        "x ",
        "a\\b",
        "{a: }",
        "[a, ]",
        "{a: 1}#c",
        "[1:2]",
        "{a:b}",
        "{ a: 2001:db8::1 }",
        "{a: 'x''y'}",
        "{a: 1",
        "[a]]",
        "{\"a\": 1}",
        "[-1, - 1]",
        "[a #b]",
        "{a: [1, 2]]",
        "[{a: 1}, {b: 2}",
        "{a: 1}}",
    ];

    fn key<'a>(g: &mut Gen) -> &'a str {
        if g.one_in(12) {
            g.pick(NEAR_KEYS)
        } else {
            g.pick(KEYS)
        }
    }

    fn scalar<'a>(g: &mut Gen) -> &'a str {
        if g.one_in(12) {
            g.pick(NEAR_SCALARS)
        } else {
            g.pick(SCALARS)
        }
    }

    fn spaces(out: &mut String, n: usize) {
        out.extend(std::iter::repeat_n(' ', n));
    }

    fn end_line(g: &mut Gen, out: &mut String) {
        if g.one_in(8) {
            out.push_str(g.pick(&["  ", " # note", "  #x", " #"]));
        }
        out.push('\n');
        if g.one_in(10) {
            out.push_str(g.pick(&["\n", "# comment\n", "  # indented comment\n", "   \n"]));
        }
    }

    /// A mapping at `indent`, its first key after `lead` when it shares an
    /// item's line.
    fn mapping(g: &mut Gen, out: &mut String, indent: usize, lead: Option<&str>, depth: usize) {
        for entry in 0..1 + g.below(3) {
            match (entry, lead) {
                (0, Some(lead)) => out.push_str(lead),
                _ => spaces(out, indent),
            }
            out.push_str(key(g));
            out.push(':');
            let choice = if depth < 5 { g.below(10) } else { 0 };
            match choice {
                0..=5 => {
                    spaces(out, 1 + usize::from(g.one_in(4)));
                    out.push_str(scalar(g));
                    end_line(g, out);
                }
                6..=8 => {
                    end_line(g, out);
                    match g.below(4) {
                        0 => sequence(g, out, indent, None, depth + 1),
                        1 => sequence(g, out, indent + 2, None, depth + 1),
                        _ => {
                            let deeper = indent + 2 + 2 * g.below(2);
                            mapping(g, out, deeper, None, depth + 1)
                        }
                    }
                }
                _ => end_line(g, out),
            }
        }
    }

    fn sequence(g: &mut Gen, out: &mut String, indent: usize, lead: Option<&str>, depth: usize) {
        for item in 0..1 + g.below(3) {
            let mut line = match (item, lead) {
                (0, Some(lead)) => lead.to_owned(),
                _ => " ".repeat(indent),
            };
            line.push('-');
            let choice = if depth < 5 { g.below(8) } else { 0 };
            match choice {
                0..=2 => {
                    out.push_str(&line);
                    out.push(' ');
                    out.push_str(scalar(g));
                    end_line(g, out);
                }
                3..=5 => {
                    line.push_str(if g.one_in(4) { "   " } else { " " });
                    let column = line.len();
                    mapping(g, out, column, Some(&line), depth + 1);
                }
                6 => {
                    out.push_str(&line);
                    end_line(g, out);
                    if g.one_in(2) {
                        mapping(g, out, indent + 2, None, depth + 1);
                    } else {
                        sequence(g, out, indent + 2, None, depth + 1);
                    }
                }
                _ => {
                    line.push(' ');
                    let column = line.len();
                    sequence(g, out, column, Some(&line), depth + 1);
                }
            }
        }
    }

    fn document(seed: u64) -> String {
        let mut g = Gen(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut out = String::new();
        if g.one_in(20) {
            out.push_str(g.pick(&["---\n", "# head\n", "%YAML 1.2\n---\n", "\n"]));
        }
        let indent = if g.one_in(5) { 2 } else { 0 };
        if g.one_in(4) {
            sequence(&mut g, &mut out, indent, None, 0);
        } else {
            mapping(&mut g, &mut out, indent, None, 0);
        }
        // Now and then a character YAML does not print, anywhere.
        if g.one_in(6) {
            let at = g.below(out.len());
            let unprintable = g.pick(&["\u{0}", "\u{1}", "\u{b}", "\u{1b}", "\u{7f}"]);
            out.insert_str(at, unprintable);
        }
        // Now and then a line moved by a space, or a tab: not ours.
        if g.one_in(6) {
            let lines: Vec<&str> = out.lines().collect();
            let at = g.below(lines.len());
            let moved = if g.one_in(2) {
                format!(" {}", lines[at])
            } else {
                lines[at].replacen(' ', if g.one_in(3) { "\t" } else { "" }, 1)
            };
            let mut lines: Vec<String> = lines.into_iter().map(str::to_owned).collect();
            lines[at] = moved;
            out = lines.join("\n") + "\n";
        }
        out
    }

    /// A tree as flow YAML with each node's line and column.
    fn describe(node: Option<&Node>) -> String {
        let Some(node) = node else {
            return "(none)".to_owned();
        };
        let at = format!("@{}:{}", node.mark.line, node.mark.column);
        match node.value() {
            Value::Null => format!("~{at}"),
            Value::Scalar { text, quoted } => {
                format!("{text:?}{}{at}", if *quoted { "q" } else { "" })
            }
            Value::Sequence(items) => format!(
                "[{}]{at}",
                items
                    .iter()
                    .map(|i| describe(Some(i)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Value::Mapping(entries) => format!(
                "{{{}}}{at}",
                entries
                    .iter()
                    .map(|(k, v)| format!("{}: {}", describe(Some(k)), describe(Some(v))))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    #[test]
    fn what_it_reads_saphyr_reads_alike_marks_included() {
        let mut taken = 0;
        let cases = 30_000;
        for seed in 0..cases {
            let text = document(seed);
            let Some(document) = read(&text) else {
                continue;
            };
            taken += 1;
            let events = parse_events(&text).unwrap_or_else(|e| {
                panic!("seed {seed}: saphyr refuses what was read: {e:?}\n{text}")
            });
            assert!(
                same_document(&document, &events),
                "seed {seed}: read differently\n{text}\nlines:  {}\nsaphyr: {}",
                describe(document.root.as_ref()),
                describe(events.root.as_ref()),
            );
        }
        // The generator must reach what the reader takes, not only what it
        // leaves to saphyr.
        assert!(taken > cases / 4, "only {taken} of {cases} documents read");
    }

    #[test]
    fn lobby_files_as_written_are_read_line_by_line() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for file in [
            "../dist/lobby.yaml",
            "tests/golden/005_thousand_targets/lobby.yaml",
            "tests/golden/007_weights_backups_hash/lobby.yaml",
        ] {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            assert!(read(&text).is_some(), "{file} was left to saphyr");
        }
    }

    #[test]
    fn empty_values_and_flow_collections_are_left_to_saphyr() {
        for text in [
            "a:\nb: 1\n",
            "a: [1, {b: 1\n  }]\n",
            "a: {b: }\n",
            "a: &x 1\nb: *x\n",
            "a: |\n  text\n",
            "a: \"x\\ty\"\n",
            "a: b\n  c\n",
            "- - a\n",
            "a: 1\n - b\n",
            "a:\tb\n",
            "a: 1 # \u{0}\n",
            "# \u{0}\na: 1\n",
            "a: \"x\u{1}y\"\n",
            "---\na: 1\n",
        ] {
            assert!(read(text).is_none(), "{text:?} was read line by line");
        }
        let empty = read("# only a comment\n\n").unwrap();
        assert!(empty.root.is_none());
    }
}
