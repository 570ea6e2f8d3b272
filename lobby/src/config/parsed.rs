//! A configuration kept with its text, so that the next text of the file is
//! read piece by piece where it can be: an edit inside some targets
//! re-reads those targets' lines only. At 1,000 targets the whole file
//! takes about 45 ms of a CPU to read, a target a few microseconds, and a
//! reload's time is what stands between an edit and the kernel.
//!
//! A piece is read alone only when that is sure to give what reading the
//! whole file gives: the edit lies within the lines of consecutive targets
//! of one `lb` entry, the document has no anchors (an alias elsewhere may
//! repeat what the piece held), the piece's lines are all indented under
//! its list, and the targets it holds are valid, draw no warning and clash
//! with no other target. Anything else is read whole. Every debug build
//! checks the piece's result against reading the whole file.
//!
//! A large piece (an edit of every target) is read in runs of whole items,
//! one a CPU: a reload's parse is then a fraction of the whole file's.
use std::{collections::HashSet, ops::Range, path::Path, sync::Arc};

use super::{
    Config, ConfigErrors, Policy, Protocol, Target, parse_root,
    validate::{self, balances},
    yaml::{self, MAX_NODES, Node, Value},
};

/// A valid configuration, the text it was read from and where its targets
/// are in that text.
#[derive(Clone, Debug)]
pub struct Parsed {
    text: String,
    config: Config,
    /// `None` when the text can only be read whole.
    layout: Option<Layout>,
}

/// Where each target of the configuration is written.
#[derive(Clone, Debug)]
struct Layout {
    /// In the configuration's order of targets.
    items: Vec<Item>,
    /// Each `lb` entry's `defaults`, which its targets start from.
    defaults: Vec<Policy>,
    /// Nodes in the document, bounded by [`MAX_NODES`].
    nodes: usize,
}

/// The lines of one target: from the line of its `-` to the line where the
/// next item or anything less indented starts.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Item {
    bytes: Range<usize>,
    /// The column of its `-`, from 0.
    indent: usize,
    /// Index of its `lb` entry.
    entry: usize,
}

impl Parsed {
    /// The configuration in `text`, read whole; `file` only names it in
    /// errors.
    pub fn parse(text: String, file: &Path) -> Result<Parsed, ConfigErrors> {
        let document = yaml::parse_document(&text);
        let (config, defaults) = parse_root(document.as_ref().map(|d| d.root.as_ref()), file)?;
        let layout = match document {
            Ok(yaml::Document {
                root: Some(root),
                has_anchors: false,
                nodes,
            }) if config.warnings.is_empty() && !has_directives(&text) => {
                Layout::of(&text, &root, defaults, nodes)
            }
            _ => None,
        };
        Ok(Parsed {
            text,
            config,
            layout,
        })
    }

    /// The configuration in `text`, which the file holds now: the targets
    /// an edit touched are read again, the others kept, where that reads
    /// the same as the whole file; else the whole file.
    pub fn reparse(&self, text: String, file: &Path) -> Result<Parsed, ConfigErrors> {
        if text == self.text {
            return Ok(self.clone());
        }
        let Some(parsed) = self.piecewise(&text) else {
            return Parsed::parse(text, file);
        };
        #[cfg(debug_assertions)]
        {
            let whole = Parsed::parse(parsed.text.clone(), file)
                .expect("a piecewise read is only taken when it is valid");
            assert_eq!(whole.config, parsed.config, "a piecewise read differs");
            assert_eq!(
                whole.layout.map(|l| l.items),
                parsed.layout.as_ref().map(|l| l.items.clone()),
                "a piecewise read placed its targets elsewhere"
            );
        }
        Ok(parsed)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn into_config(self) -> Config {
        self.config
    }

    /// `None` when the edit from `self.text` to `text` cannot be read in
    /// pieces.
    fn piecewise(&self, text: &str) -> Option<Parsed> {
        let layout = self.layout.as_ref()?;
        let old = self.text.as_bytes();
        let new = text.as_bytes();
        // From the start of the line: lines added at the end of a target
        // begin with the indentation of the next target's first line, and
        // are theirs, not the next target's.
        let prefix = common_prefix(old, new);
        let prefix = old[..prefix]
            .iter()
            .rposition(|byte| *byte == b'\n')
            .map_or(0, |newline| newline + 1);
        let suffix = common_prefix_rev(&old[prefix..], &new[prefix..]);
        // The edit: `old[prefix..old_end]` became `new[prefix..new_end]`.
        let old_end = old.len() - suffix;
        let first = layout
            .items
            .iter()
            .position(|item| item.bytes.start <= prefix && prefix <= item.bytes.end)?;
        let last = first
            + layout.items[first..]
                .iter()
                .position(|item| old_end <= item.bytes.end)?;
        let (entry, indent) = (layout.items[first].entry, layout.items[first].indent);
        if layout.items[first..=last].iter().any(|i| i.entry != entry) {
            return None;
        }
        let start = layout.items[first].bytes.start;
        let end = (layout.items[last].bytes.end + new.len()).checked_sub(old.len())?;
        let piece = text.get(start..end)?;
        if !indented_under(piece, indent) {
            return None;
        }
        let threads = reading_threads(piece.len());
        // On one thread most of the file is read as fast whole, and with no
        // doubt.
        if threads == 1 && piece.len() > text.len() / 2 {
            return None;
        }
        let read = read_piece(
            piece,
            start,
            indent,
            entry,
            &layout.defaults[entry],
            threads,
        )?;
        if layout.nodes + read.nodes > MAX_NODES {
            return None;
        }
        let (targets, items) = (read.targets, read.items);

        let mut config = self.config.clone();
        config
            .targets
            .splice(first..=last, targets.into_iter().map(Arc::new));
        let shift = |item: &Item| Item {
            bytes: item.bytes.start + new.len() - old.len()..item.bytes.end + new.len() - old.len(),
            ..item.clone()
        };
        let mut layout = Layout {
            items: layout.items[..first].to_vec(),
            defaults: layout.defaults.clone(),
            nodes: layout.nodes + read.nodes,
        };
        layout.items.extend(items);
        layout
            .items
            .extend(self.layout.as_ref()?.items[last + 1..].iter().map(shift));
        // Lines before the piece's first `-` (comments, or all of it when it
        // holds no target now) belong to the item before, as in a whole read.
        if let Some(before) = first.checked_sub(1)
            && layout.items[before].entry == entry
        {
            layout.items[before].bytes.end = match layout.items.get(first) {
                Some(next) if next.entry == entry => next.bytes.start,
                _ => end,
            };
        }
        let entry_kept = layout.items.iter().any(|item| item.entry == entry);
        (entry_kept && distinct(&config)).then(|| Parsed {
            text: text.to_owned(),
            config,
            layout: Some(layout),
        })
    }
}

impl Layout {
    /// `None` when a target is not written as a block list item on its own
    /// lines (`- name: ...`), or the file has no targets.
    fn of(text: &str, root: &Node, defaults: Vec<Policy>, nodes: usize) -> Option<Layout> {
        let line_starts = line_starts(text);
        let mut items = Vec::new();
        for (entry, entry_node) in sequence(mapping_value(root, "lb")?)?.iter().enumerate() {
            let targets = sequence(mapping_value(entry_node, "targets")?)?;
            let starts: Vec<(usize, usize)> = targets
                .iter()
                .map(|target| dash_line(text, &line_starts, target))
                .collect::<Option<_>>()?;
            for (i, &(start, indent)) in starts.iter().enumerate() {
                let end = match starts.get(i + 1) {
                    Some(&(next, next_indent)) if next > start && next_indent == indent => next,
                    Some(_) => return None,
                    None => start + list_end(&text[start..], indent),
                };
                items.push(Item {
                    bytes: start..end,
                    indent,
                    entry,
                });
            }
        }
        (!items.is_empty() && defaults.len() == sequence(mapping_value(root, "lb")?)?.len())
            .then_some(Layout {
                items,
                defaults,
                nodes,
            })
    }
}

/// The items of a piece read alone, placed in the whole text (the piece
/// starts at byte `offset`).
fn piece_items(
    piece: &str,
    nodes: &[Node],
    offset: usize,
    indent: usize,
    entry: usize,
) -> Option<Vec<Item>> {
    let line_starts = line_starts(piece);
    let starts: Vec<usize> = nodes
        .iter()
        .map(|node| match dash_line(piece, &line_starts, node)? {
            (start, i) if i == indent => Some(start),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let mut items = Vec::new();
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(piece.len());
        if end <= start {
            return None;
        }
        items.push(Item {
            bytes: offset + start..offset + end,
            indent,
            entry,
        });
    }
    Some(items)
}

/// A piece of at least this many bytes is read on several threads: a
/// thread's start costs tens of microseconds, a target's read a few.
const SHARED_READ: usize = 64 * 1024;

/// Threads to read a piece of `len` bytes on.
fn reading_threads(len: usize) -> usize {
    crate::parallel::threads(len, SHARED_READ)
}

/// What the items of a piece read as.
struct PieceRead {
    targets: Vec<Target>,
    items: Vec<Item>,
    nodes: usize,
}

/// Reads `piece` (at byte `offset` of the text, its items at column
/// `indent` of `lb` entry `entry`) in `threads` runs of whole items, one a
/// thread; `None` when any run cannot be read alone. A run starts at the
/// line of an item's `-` at `indent`, which nothing read whole carries
/// over: a scalar or flow collection spanning such a line is left open in
/// the run before it, which then fails to read.
fn read_piece(
    piece: &str,
    offset: usize,
    indent: usize,
    entry: usize,
    defaults: &Policy,
    threads: usize,
) -> Option<PieceRead> {
    let runs = runs_of_items(piece, indent, threads);
    let read = |&(at, run): &(usize, &str)| read_run(run, offset + at, indent, entry, defaults);
    let reads = crate::parallel::map_runs(&runs, read)
        .into_iter()
        .map(|read| read.ok().flatten());
    let mut whole = PieceRead {
        targets: Vec::new(),
        items: Vec::new(),
        nodes: 0,
    };
    for read in reads {
        let read = read?;
        whole.targets.extend(read.targets);
        whole.items.extend(read.items);
        whole.nodes += read.nodes;
    }
    Some(whole)
}

/// One run of a piece's items, read alone.
fn read_run(
    run: &str,
    offset: usize,
    indent: usize,
    entry: usize,
    defaults: &Policy,
) -> Option<PieceRead> {
    let document = yaml::parse_document(run).ok()?;
    if document.has_anchors {
        return None;
    }
    let nodes: &[Node] = match document.root.as_ref().map(Node::value) {
        Some(Value::Sequence(nodes)) => nodes,
        None => &[],
        Some(_) => return None,
    };
    Some(PieceRead {
        targets: validate::targets_alone(nodes, defaults)?,
        items: piece_items(run, nodes, offset, indent, entry)?,
        nodes: document.nodes,
    })
}

/// `piece` cut into at most `parts` runs of about equal length, each
/// starting at the line of an item's `-` at column `indent` (the first at
/// the piece's start), with where each starts in the piece.
fn runs_of_items(piece: &str, indent: usize, parts: usize) -> Vec<(usize, &str)> {
    let mut cuts = vec![0];
    for part in 1..parts {
        let Some(&last) = cuts.last() else { break };
        let wanted = (piece.len() * part / parts).max(last + 1);
        let Some(cut) = next_item_line(piece, wanted, indent) else {
            break;
        };
        cuts.push(cut);
    }
    cuts.iter()
        .enumerate()
        .map(|(i, &at)| {
            (
                at,
                &piece[at..cuts.get(i + 1).copied().unwrap_or(piece.len())],
            )
        })
        .collect()
}

/// The first line starting after byte `from` of `piece` that holds an
/// item's `-` at column `indent`.
fn next_item_line(piece: &str, from: usize, indent: usize) -> Option<usize> {
    let mut at = piece.get(from..)?.find('\n')? + from + 1;
    while at < piece.len() {
        let line = &piece[at..];
        let content = line.trim_start_matches(' ');
        if line.len() - content.len() == indent && is_dash(content.lines().next()?) {
            return Some(at);
        }
        at += line.find('\n')? + 1;
    }
    None
}

/// Whether no two targets share a name, an upstream group's name or a
/// protocol and port, and none takes the metrics endpoint's port: what
/// the whole file's check compares across targets.
fn distinct(config: &Config) -> bool {
    let mut names = HashSet::new();
    let mut groups = HashSet::new();
    let mut ports = HashSet::new();
    let metrics = config.metrics.as_ref().map(|m| m.listen);
    config.targets.iter().all(|target| {
        names.insert(target.name.as_str())
            && groups.insert(target.group.name.as_str())
            && ports.insert((target.protocol, target.port))
            && !metrics.is_some_and(|listen| {
                target.protocol == Protocol::Tcp
                    && target.port == listen.port()
                    && balances(target.ip, listen.ip())
            })
    })
}

/// `%YAML` or `%TAG` lines change how the whole document reads.
fn has_directives(text: &str) -> bool {
    text.starts_with('%') || text.contains("\n%")
}

fn mapping_value<'n>(node: &'n Node, key: &str) -> Option<&'n Node> {
    let Value::Mapping(entries) = node.value() else {
        return None;
    };
    entries.iter().find_map(|(k, v)| match k.value() {
        Value::Scalar { text, .. } if text == key => Some(v),
        _ => None,
    })
}

fn sequence(node: &Node) -> Option<&[Node]> {
    match node.value() {
        Value::Sequence(items) => Some(items),
        _ => None,
    }
}

/// The byte offset of each line's start.
fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

/// Where the line of a list item's `-` starts, and the `-`'s column: the
/// item must start on that line, after only spaces, a `-` and spaces.
fn dash_line(text: &str, line_starts: &[usize], item: &Node) -> Option<(usize, usize)> {
    let start = *line_starts.get(item.mark.line.checked_sub(1)?)?;
    let before: &str = text.get(start..)?.get(..item.mark.column.checked_sub(1)?)?;
    let indent = before.len() - before.trim_start_matches(' ').len();
    let rest = &before[indent..];
    (rest.starts_with('-') && !rest[1..].is_empty() && rest[1..].bytes().all(|b| b == b' '))
        .then_some((start, indent))
}

/// How far the last item of a list at `indent` reaches in `rest` (which
/// starts at its line): up to the first line of content indented less, or
/// as much without a `-`; blank and comment lines belong to it.
fn list_end(rest: &str, indent: usize) -> usize {
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        if offset > 0 && ends_list(line, indent) {
            return offset;
        }
        offset += line.len();
    }
    offset
}

fn ends_list(line: &str, indent: usize) -> bool {
    let content = line.trim_start_matches(' ');
    let column = line.len() - content.len();
    let blank = content.trim().is_empty() || content.starts_with('#');
    !blank && (column < indent || (column == indent && !is_dash(content)))
}

fn is_dash(content: &str) -> bool {
    content.starts_with("- ") || content.trim_end() == "-"
}

/// Whether every line of `piece` reads the same alone as in its list at
/// `indent`: the first item's `-` first, then only content indented more,
/// the `-` of further items, blank lines and comments.
fn indented_under(piece: &str, indent: usize) -> bool {
    let mut started = false;
    piece.split_inclusive('\n').all(|line| {
        let content = line.trim_start_matches(' ');
        let column = line.len() - content.len();
        if content.trim().is_empty() || content.starts_with('#') || content.starts_with('\t') {
            return !content.starts_with('\t');
        }
        let fits = column > indent || (column == indent && is_dash(content));
        let first = !started;
        started = true;
        fits && (!first || (column == indent && is_dash(content)))
    })
}

/// Compared a block at a time first: a byte at a time takes milliseconds
/// over a megabyte.
const BLOCK: usize = 256;

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut same = 0;
    while same + BLOCK <= n && a[same..same + BLOCK] == b[same..same + BLOCK] {
        same += BLOCK;
    }
    same + a[same..n]
        .iter()
        .zip(&b[same..n])
        .take_while(|(x, y)| x == y)
        .count()
}

fn common_prefix_rev(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let mut same = 0;
    while same + BLOCK <= n && a[n - same - BLOCK..n - same] == b[n - same - BLOCK..n - same] {
        same += BLOCK;
    }
    same + a[..n - same]
        .iter()
        .rev()
        .zip(b[..n - same].iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(port: u16) -> String {
        format!(
            "          - name: u{port}\n            host: 198.18.1.{}\n            port: {port}\n",
            port % 200 + 1
        )
    }

    fn target(i: usize, upstreams: &[u16]) -> String {
        let mut text = format!(
            "      - name: t{i}\n        protocol: tcp\n        port: {}\n        upstream_group:\n          name: g{i}\n          distribution: round-robin\n          upstreams:\n",
            10_000 + i
        );
        text.extend(
            upstreams
                .iter()
                .map(|p| upstream(*p).replace("          ", "            ")),
        );
        text
    }

    fn config(targets: &[String], after: &str) -> String {
        format!("lb:\n  - targets:\n{}{after}", targets.concat())
    }

    fn six() -> Vec<String> {
        (0..6).map(|i| target(i, &[8080, 8081])).collect()
    }

    const METRICS: &str = "metrics:\n  listen: 127.0.0.1:9100\n";

    fn parsed(text: &str) -> Parsed {
        Parsed::parse(text.to_owned(), Path::new("t.yaml")).expect("valid")
    }

    /// The edit is read piecewise, and as the whole file reads it (the
    /// debug build's check in `reparse`).
    fn piecewise(before: &str, after: &str) -> Parsed {
        let running = parsed(before);
        assert!(running.piecewise(after).is_some(), "read whole:\n{after}");
        running
            .reparse(after.to_owned(), Path::new("t.yaml"))
            .unwrap()
    }

    fn whole(before: &str, after: &str) {
        let running = parsed(before);
        assert!(
            running.piecewise(after).is_none(),
            "read in pieces:\n{after}"
        );
    }

    #[test]
    fn an_edit_inside_targets_rereads_those_targets() {
        let before = config(&six(), METRICS);
        let mut changed = six();
        changed[1] = target(1, &[8080]);
        let after = piecewise(&before, &config(&changed, METRICS));
        assert_eq!(after.config.targets[1].group.upstreams.len(), 1);
        assert!(
            Arc::ptr_eq(&after.config.targets[0], &parsed(&before).config.targets[0])
                || after.config.targets[0] == parsed(&before).config.targets[0]
        );
        // The next edit reads against the layout this one left.
        changed[2] = target(2, &[9000, 9001, 9002]);
        let again = after
            .piecewise(&config(&changed, METRICS))
            .expect("piecewise");
        assert_eq!(again.config.targets[2].group.upstreams.len(), 3);
    }

    #[test]
    fn lines_added_at_the_end_of_a_target_are_read_with_it() {
        // The added upstream's lines start with the indentation the next
        // target's first line starts with: the edit begins mid-line there.
        let before = config(&six(), METRICS);
        let mut changed = six();
        changed[1] = target(1, &[8080, 8081, 8082]);
        let after = piecewise(&before, &config(&changed, METRICS));
        assert_eq!(after.config.targets[1].group.upstreams.len(), 3);
        // And back.
        piecewise(&config(&changed, METRICS), &before);
    }

    #[test]
    fn targets_added_removed_or_in_the_last_item_are_read_piecewise() {
        let before = config(&six(), METRICS);
        let mut seven = six();
        seven.push(target(6, &[8080]));
        piecewise(&before, &config(&seven, METRICS));
        let five: Vec<String> = six().into_iter().take(5).collect();
        piecewise(&before, &config(&five, METRICS));
        let mut middle = six();
        middle.remove(1);
        piecewise(&before, &config(&middle, METRICS));
        let mut inserted = six();
        inserted.insert(1, target(7, &[8080]));
        piecewise(&before, &config(&inserted, METRICS));
        // Without anything after the list: the last item reaches the end.
        piecewise(&config(&six(), ""), &config(&seven, ""));
        let mut commented = six();
        commented[0].push_str("      # drained for maintenance\n");
        piecewise(&before, &config(&commented, METRICS));
    }

    #[test]
    fn a_large_edit_is_read_in_runs_of_whole_items_on_several_threads() {
        let many =
            |upstreams: &[u16]| -> Vec<String> { (0..400).map(|i| target(i, upstreams)).collect() };
        let before = config(&many(&[8080, 8081]), METRICS);
        let after = config(&many(&[8080]), METRICS);
        let start = after.find("      - name: t0").expect("the first target");
        let piece = &after[start..after.find(METRICS).expect("metrics")];
        assert!(piece.len() >= SHARED_READ);
        let runs = runs_of_items(piece, 6, 3);
        assert_eq!(runs.len(), 3);
        for (at, run) in &runs {
            assert!(run.starts_with("      - name: t"), "{run:.40}");
            assert!(piece[*at..].starts_with(run));
        }
        let defaults = parsed(&before).layout.expect("a layout").defaults;
        let read = read_piece(piece, start, 6, 0, &defaults[0], 3).expect("read in runs");
        let whole = parsed(&after);
        assert!(
            read.targets
                .iter()
                .eq(whole.config.targets.iter().map(|t| &**t))
        );
        assert_eq!(read.items, whole.layout.expect("a layout").items);
        // Through a reload, on as many threads as this machine gives.
        if reading_threads(piece.len()) > 1 {
            piecewise(&before, &after);
        }
    }

    #[test]
    fn edits_outside_targets_or_that_cannot_read_alone_are_read_whole() {
        let before = config(&six(), METRICS);
        whole(
            &before,
            &config(&six(), "metrics:\n  listen: 127.0.0.1:9101\n"),
        );
        // A duplicate name is an error only the whole file reports fully.
        let mut duplicate = six();
        duplicate[2] = duplicate[2].replace("name: t2", "name: t0");
        whole(&before, &config(&duplicate, METRICS));
        let error = parsed(&before)
            .reparse(config(&duplicate, METRICS), Path::new("t.yaml"))
            .unwrap_err();
        assert!(
            error.to_string().contains("duplicate target name"),
            "{error}"
        );
        let mut port = six();
        port[2] = port[2].replace("port: 10002", "port: 10000");
        whole(&before, &config(&port, METRICS));
        // A line less indented than the list changes what encloses it.
        let mut outdented = six();
        outdented[1].push_str("    defaults: {}\n");
        let running = parsed(&before);
        assert!(running.piecewise(&config(&outdented, METRICS)).is_none());
        // Removing every target leaves `targets:` empty: an error.
        whole(&config(&six()[..1], METRICS), &config(&[], METRICS));
    }

    #[test]
    fn documents_with_anchors_or_unusual_layouts_are_always_read_whole() {
        let anchored = format!(
            "lb:\n  - targets:\n{}{}",
            target(0, &[8080]).replace("upstreams:\n", "upstreams: &ups\n"),
            target(1, &[]).replace("upstreams:\n", "upstreams: *ups\n")
        );
        assert!(parsed(&anchored).layout.is_none());
        let flow = "lb:\n  - targets: [{name: t, protocol: tcp, port: 1, upstream_group: {name: g, distribution: round-robin, upstreams: [{name: u, host: 198.18.1.1, port: 1}]}}]\n";
        assert!(parsed(flow).layout.is_none());
        let second_entry = format!(
            "lb:\n  - targets:\n{}  - targets:\n{}",
            target(0, &[8080]),
            target(1, &[8080])
        );
        let layout = parsed(&second_entry).layout.expect("block lists");
        assert_eq!(
            layout.items.iter().map(|i| i.entry).collect::<Vec<_>>(),
            [0, 1]
        );
        // One edit across two entries' targets.
        let across = second_entry.replace("port: 8080", "port: 8081");
        whole(&second_entry, &across);
    }
}
