//! Reading a document whose one top-level list is huge (the gateway's `keys:`, a million
//! entries) without holding it whole: [`parse_streaming`].
//!
//! serde_norway loads a document's every event before deserializing it (for 1,000,000 keys,
//! ~2 GiB of events for a 180 MB file). Here the file is read line by line; the lines of the
//! streamed list are cut into batches of whole items (a line at the list's indentation that
//! starts with `- ` begins an item, deeper lines continue it), each batch is parsed on its own
//! (so the parser's memory is per batch) and handed item by item to the caller; the rest of the
//! document is parsed as usual, with the list replaced by `[]` and its lines kept as blank
//! lines, so every line number stays the file's.
//!
//! The result is what parsing the whole document gives, errors included: an item's errors
//! name `list[index].field` and the file's line and column, and the first error in document
//! order is the one reported. The list is streamed only in the common form: `key:` alone on
//! its line at column 0 (a top-level block mapping), followed by a block sequence; any other
//! form (`key: [...]`, flow style, ...) is parsed whole, as before. Anchors defined in an item
//! may be used by the items after it (the anchoring items, up to [`ANCHOR_BYTES`] of them, are
//! parsed again before each batch; an item defining an anchor beyond that is an error), but
//! not across the list's boundary: an item's alias to an anchor defined elsewhere in the
//! document, or a later section's alias to an item's anchor, is an `unknown anchor` error. An
//! anchor name defined twice is an error, as in [`parse`](crate::parse) (`anchors`). An
//! item's quoted or flow continuation lines must be indented deeper than its `- ` (as YAML
//! requires; libyaml alone tolerates less). Lines end with LF or CRLF: a lone CR (a line break
//! for YAML) is refused.

use std::fmt;
use std::io::BufRead;
use std::marker::PhantomData;
use std::path::Path;

use serde::de::{DeserializeOwned, DeserializeSeed, SeqAccess, Visitor};

use crate::anchors::Anchors;
use crate::{parse_located, ConfigError};

/// Text of a batch of items parsed at once: large enough to amortize the parser's set-up,
/// small enough that its events stay a few MiB.
const BATCH_BYTES: usize = 64 * 1024;

/// Parses YAML read from `reader` into `T`, streaming the top-level list `list_key` item by
/// item to `on_item` (in order) instead of into `T`: `T` sees `list_key: []`. Returns `T` and
/// whether the list was streamed (when it was not, `T` deserialized it itself, whole).
/// `file` only names errors.
pub fn parse_streaming<T, I>(
    mut reader: impl BufRead,
    file: &Path,
    list_key: &str,
    mut on_item: impl FnMut(I),
) -> Result<(T, bool), ConfigError>
where
    T: DeserializeOwned,
    I: DeserializeOwned,
{
    let read_error =
        |e: std::io::Error| ConfigError::new(file, "", format!("cannot read the file: {e}"));
    let mut doc = Splitter::new(list_key);
    let mut batch = Batch::default();
    // Every line, the list's and the rest's, in document order: an anchor defined twice
    // anywhere is refused as `parse` refuses it.
    let mut anchors = Anchors::default();
    // The first error among the list's items (they are parsed in order).
    let mut item_error: Option<ConfigError> = None;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(read_error)? == 0 {
            break;
        }
        let body = line.strip_suffix('\n').unwrap_or(&line);
        if body.strip_suffix('\r').unwrap_or(body).contains('\r') {
            // YAML breaks lines there too; the list is cut at LF (found by fuzzing: a block
            // scalar's CR-separated lines went to the rest of the document).
            return Err(ConfigError::new(
                file,
                "",
                format!(
                    "line {}: a carriage return without a line feed (a classic Mac OS line \
                     ending): save the file with LF or CRLF line endings",
                    anchors.lines() + 1
                ),
            ));
        }
        anchors.feed(&line);
        match doc.feed(&line) {
            Line::Rest | Line::Opening => {}
            Line::Item | Line::Continuation => {
                let starts_item = doc.starts_item;
                if starts_item && batch.text.len() >= BATCH_BYTES {
                    batch.flush(file, list_key, &mut item_error, &mut on_item);
                }
                if item_error.is_none() {
                    batch.push(&line, doc.line_no, starts_item);
                }
            }
            Line::EndOfList => batch.flush(file, list_key, &mut item_error, &mut on_item),
        }
    }
    doc.finish();
    batch.flush(file, list_key, &mut item_error, &mut on_item);
    let streamed = doc.list_line.is_some();
    let rest = parse_located::<T>(&doc.rest, file);
    match (rest, item_error) {
        (Ok(t), None) => anchors.check(file).map(|()| (t, streamed)),
        // The first error in document order: the rest's if it comes before the list's items.
        (Err((e, Some(line))), Some(_)) if Some(line) <= doc.list_line => Err(e),
        (_, Some(e)) => Err(e),
        (Err((e, _)), None) => Err(e),
    }
}

/// Lines of the streamed list waiting to be parsed together.
#[derive(Default)]
struct Batch {
    /// The batch's lines.
    text: String,
    /// Where each item begins in `text`.
    item_starts: Vec<usize>,
    /// The file's line number of the batch's first line.
    first_line: usize,
    /// Index in the list of the batch's first item.
    first_index: usize,
    /// Items seen so far that define an anchor: parsed again (and skipped) before each batch,
    /// so that later items may refer to them, as in the whole document.
    anchors: String,
    anchor_items: usize,
    anchor_lines: usize,
}

/// Most text kept for anchors defined by earlier items; an item defining an anchor past it is
/// an error.
const ANCHOR_BYTES: usize = 1024 * 1024;

impl Batch {
    fn push(&mut self, line: &str, line_no: usize, starts_item: bool) {
        if self.text.is_empty() && self.item_starts.is_empty() {
            self.first_line = line_no;
        }
        if starts_item {
            self.item_starts.push(self.text.len());
        }
        self.text.push_str(line);
    }

    fn flush<I: DeserializeOwned>(
        &mut self,
        file: &Path,
        list_key: &str,
        error: &mut Option<ConfigError>,
        on_item: &mut impl FnMut(I),
    ) {
        if error.is_none() && !self.text.is_empty() {
            // A blank line first, so that no position is line 1 column 1 (which serde_norway
            // does not print); then the anchoring items; then the batch.
            let mut doc = String::with_capacity(1 + self.anchors.len() + self.text.len());
            doc.push('\n');
            doc.push_str(&self.anchors);
            doc.push_str(&self.text);
            let de = serde_norway::Deserializer::from_str(&doc);
            let mut track = serde_path_to_error::Track::new();
            let seed = Items {
                skip: self.anchor_items,
                on_item: &mut *on_item,
                _item: PhantomData,
            };
            let result = seed.deserialize(serde_path_to_error::Deserializer::new(de, &mut track));
            match result {
                Ok(()) => {
                    if let Err(index) = self.keep_anchors() {
                        *error = Some(ConfigError::new(
                            file,
                            format!("{list_key}[{index}]"),
                            format!(
                                "this entry defines a YAML anchor, but the entries before it \
                                 already define {} KiB of anchors (the most kept for later \
                                 entries): define shared values in fewer entries",
                                ANCHOR_BYTES / 1024
                            ),
                        ));
                    }
                }
                Err(e) => {
                    let index = self.first_index as isize - self.anchor_items as isize;
                    let key = item_path(list_key, index, &track.path());
                    // Line 2 + anchor_lines of `doc` is the file's line `first_line`.
                    let delta = self.first_line as isize - 2 - self.anchor_lines as isize;
                    let message = shift_lines(&crate::message(e), delta);
                    *error = Some(ConfigError::new(file, key, message));
                }
            }
        }
        self.first_index += self.item_starts.len();
        self.item_starts.clear();
        self.text.clear();
        // Batches are small: keep the buffer, not a larger one a long item grew.
        self.text.shrink_to(2 * BATCH_BYTES);
    }

    /// Keeps the items of the batch just parsed that define an anchor. An item that defines
    /// one past [`ANCHOR_BYTES`] is refused (its index in the list is the error): dropping it
    /// would let a later alias resolve to an earlier anchor of the same name, silently.
    fn keep_anchors(&mut self) -> Result<(), usize> {
        let mut ends = self.item_starts.iter().skip(1).copied();
        for (i, &start) in self.item_starts.iter().enumerate() {
            let item = &self.text[start..ends.next().unwrap_or(self.text.len())];
            if defines_anchor(item) {
                if self.anchors.len() + item.len() > ANCHOR_BYTES {
                    return Err(self.first_index + i);
                }
                self.anchors.push_str(item);
                self.anchor_items += 1;
                self.anchor_lines += item.matches('\n').count();
            }
        }
        Ok(())
    }
}

/// Whether an item's text may define an anchor (`&name` starting a node). Errs on the side of
/// yes (an item kept needlessly only costs parsing it again).
fn defines_anchor(item: &str) -> bool {
    item.match_indices('&').any(|(at, _)| {
        let before = item[..at].chars().next_back();
        let after = item[at + 1..].chars().next();
        matches!(
            before,
            None | Some(' ' | '\t' | '[' | '{' | ',' | '-' | ':')
        ) && after.is_some_and(|c| !c.is_whitespace())
    })
}

/// Deserializes a sequence, handing each element over as soon as it is read.
struct Items<'a, I, F> {
    /// Elements read but not handed over (anchoring items already handed over).
    skip: usize,
    on_item: &'a mut F,
    _item: PhantomData<I>,
}

impl<'de, I: DeserializeOwned, F: FnMut(I)> DeserializeSeed<'de> for Items<'_, I, F> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, I: DeserializeOwned, F: FnMut(I)> Visitor<'de> for Items<'_, I, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut skip = self.skip;
        while let Some(item) = seq.next_element::<I>()? {
            if skip > 0 {
                skip -= 1;
            } else {
                (self.on_item)(item);
            }
        }
        Ok(())
    }
}

/// `list[index]…` for a path within a batch (`[3].models` → `keys[1027].models`), its first
/// element being the list's `first_index`th.
fn item_path(list_key: &str, first_index: isize, path: &serde_path_to_error::Path) -> String {
    let mut out = list_key.to_owned();
    for (i, segment) in path.iter().enumerate() {
        match segment {
            serde_path_to_error::Segment::Seq { index } if i == 0 => {
                out.push_str(&format!("[{}]", first_index + *index as isize));
            }
            serde_path_to_error::Segment::Seq { .. } => out.push_str(&segment.to_string()),
            _ => {
                out.push('.');
                out.push_str(&segment.to_string());
            }
        }
    }
    out
}

/// Adds `delta` to every `line N column` of a parser message.
fn shift_lines(message: &str, delta: isize) -> String {
    const LINE: &str = "line ";
    let mut out = String::with_capacity(message.len() + 8);
    let mut rest = message;
    while let Some(at) = rest.find(LINE) {
        let (before, after) = rest.split_at(at + LINE.len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) if after[digits..].starts_with(" column ") => {
                out.push_str(&(n as isize + delta).to_string());
                rest = &after[digits..];
            }
            _ => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// What a line of the document is, for the streamed list.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// Part of the rest of the document (kept in [`Splitter::rest`]).
    Rest,
    /// The list's `key:` line, or a blank or comment line before its first item.
    Opening,
    /// Begins an item of the list.
    Item,
    /// Continues the list (deeper lines, comments, blank lines).
    Continuation,
    /// The line after the list's last one; it is itself part of the rest.
    EndOfList,
}

enum State {
    /// Before the list's `key:` line.
    Before,
    /// After `key:`, before its first item: the key's line and the blank or comment lines
    /// since, which are the rest's if no block sequence follows.
    Opening(String),
    /// In the list, whose items begin at this column.
    In(usize),
    /// After the list (or once it is known there is none to stream).
    After,
}

/// Sorts the document's lines into the list's and the rest's.
struct Splitter<'k> {
    key: &'k str,
    state: State,
    /// The document without the list's items.
    rest: String,
    /// 1-based number of the last line fed.
    line_no: usize,
    /// The `key:` line's number, once the list is streamed.
    list_line: Option<usize>,
    /// The last line fed begins an item.
    starts_item: bool,
}

impl<'k> Splitter<'k> {
    fn new(key: &'k str) -> Self {
        Splitter {
            key,
            state: State::Before,
            rest: String::new(),
            line_no: 0,
            list_line: None,
            starts_item: false,
        }
    }

    fn feed(&mut self, line: &str) -> Line {
        self.line_no += 1;
        self.starts_item = false;
        match &mut self.state {
            State::Before => {
                if is_key_line(line, self.key) {
                    self.state = State::Opening(line.to_owned());
                    return Line::Opening;
                }
                self.rest.push_str(line);
                Line::Rest
            }
            State::Opening(pending) => {
                if is_blank_or_comment(line) {
                    pending.push_str(line);
                    return Line::Opening;
                }
                match item_start(line) {
                    Some(column) => {
                        // `key: []` with the key line's comment, then the blank or comment
                        // lines up to the item as they are (the parser still reads every
                        // comment: one with a control character is an error either way).
                        let opening_lines = pending.matches('\n').count();
                        let key_line = self.line_no - opening_lines;
                        let after_colon = &pending[self.key.len() + 1..];
                        self.rest.push_str(self.key);
                        self.rest.push_str(": []");
                        self.rest.push_str(after_colon);
                        self.rest.push('\n');
                        self.list_line = Some(key_line);
                        self.state = State::In(column);
                        self.starts_item = true;
                        Line::Item
                    }
                    None => {
                        // Not a block sequence: parsed whole with the rest.
                        self.rest.push_str(pending);
                        self.rest.push_str(line);
                        self.state = State::After;
                        Line::Rest
                    }
                }
            }
            State::In(column) => {
                let column = *column;
                if is_blank_or_comment(line) || indentation(line) > column {
                    self.rest.push('\n');
                    Line::Continuation
                } else if item_start(line) == Some(column) {
                    self.rest.push('\n');
                    self.starts_item = true;
                    Line::Item
                } else {
                    self.rest.push_str(line);
                    self.state = State::After;
                    Line::EndOfList
                }
            }
            State::After => {
                self.rest.push_str(line);
                Line::Rest
            }
        }
    }

    /// At the end of the document: a `key:` line with nothing after it is the rest's.
    fn finish(&mut self) {
        if let State::Opening(pending) = std::mem::replace(&mut self.state, State::After) {
            self.rest.push_str(&pending);
        }
    }
}

/// `key:` alone at column 0, maybe with a comment.
fn is_key_line(line: &str, key: &str) -> bool {
    let Some(after) = line.strip_prefix(key).and_then(|l| l.strip_prefix(':')) else {
        return false;
    };
    let value = after.trim_start_matches([' ', '\t']);
    value.trim_end_matches(['\r', '\n']).is_empty()
        || value.starts_with('#') && value.len() < after.len()
}

fn is_blank_or_comment(line: &str) -> bool {
    let l = line.trim_start_matches([' ', '\t']);
    l.trim_end_matches(['\r', '\n']).is_empty() || l.starts_with('#')
}

/// Leading spaces.
fn indentation(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// The column of the `-` of a line beginning a block sequence entry (`- `, `-` at the end of
/// the line).
fn item_start(line: &str) -> Option<usize> {
    let column = indentation(line);
    let rest = line[column..].strip_prefix('-')?;
    match rest.as_bytes().first() {
        None | Some(b' ' | b'\t' | b'\r' | b'\n') => Some(column),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(default)]
        name: String,
        #[serde(default)]
        items: Vec<Item>,
        #[serde(default)]
        after: u32,
    }

    #[derive(Debug, Clone, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        id: String,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(default)]
        n: u32,
    }

    /// Parses `yaml` both ways: whole, and with `items` streamed.
    fn both(yaml: &str) -> (Result<Doc, ConfigError>, Result<Doc, ConfigError>, bool) {
        let file = Path::new("t.yaml");
        let whole = crate::parse::<Doc>(yaml, file);
        let mut items = Vec::new();
        let streamed =
            parse_streaming::<Doc, Item>(yaml.as_bytes(), file, "items", |i| items.push(i)).map(
                |(mut doc, streamed)| {
                    if streamed {
                        assert!(doc.items.is_empty());
                        doc.items = items;
                    }
                    (doc, streamed)
                },
            );
        let was = streamed.as_ref().is_ok_and(|(_, s)| *s);
        (whole, streamed.map(|(d, _)| d), was)
    }

    /// Both ways give the same document or the same error (key and message).
    fn same(yaml: &str) -> bool {
        let (whole, streamed, was_streamed) = both(yaml);
        match (whole, streamed) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{yaml}"),
            (Err(a), Err(b)) => {
                assert_eq!((&a.key, &a.message), (&b.key, &b.message), "{yaml}");
            }
            (a, b) => panic!("{yaml}\nwhole: {a:?}\nstreamed: {b:?}"),
        }
        was_streamed
    }

    #[test]
    fn block_lists_stream_with_the_same_result() {
        let docs = [
            "name: x\nitems:\n- {id: a, tags: [p, q]}\n- id: b\n  n: 2\nafter: 3\n",
            "items:\n  - id: a\n    tags:\n      - p\n      - q\n\n  # a comment\n  - id: b\nafter: 1\n",
            "items:   # the list\n\n- id: a\n-\n  id: b\n",
            "items:\n- id: 'multi\n    line'\n- id: \"x\"\n",
            "name: first\nitems:\n- id: a\n",
            "items:\n- id: a\n  tags: &t [x]\n- id: b\n",
            "items:\n- id: &i a\n  tags: &t [x, y]\n- {id: b, tags: *t}\n- id: c\n  tags: *t\n",
            "items:\n- {id: a, tags: [\"x & y\", z&w]}\n",
            "items:  \n- id: a\n",
            "items:\r\n- {id: a}\r\n- {id: b}\r\nafter: 2\r\n",
            "items:\n- id: |\n    text\n    - not an item\n- id: b\n",
        ];
        for doc in docs {
            assert!(same(doc), "not streamed: {doc}");
        }
        // Many items, over several batches.
        let mut big = String::from("name: big\nitems:\n");
        for i in 0..5000 {
            big.push_str(&format!("- {{id: k{i}, tags: [a, b], n: {i}}}\n"));
        }
        big.push_str("after: 9\n");
        assert!(same(&big));
        let (_, doc, _) = both(&big);
        assert_eq!(doc.unwrap().items[4321].n, 4321);
        // Anchors defined by earlier items (other batches), used later.
        let mut anchored = String::from("items:\n- {id: first, tags: &t [a, b]}\n");
        for i in 0..4000 {
            anchored.push_str(&format!("- {{id: k{i}, tags: *t}}\n"));
        }
        anchored.push_str("- id: again\n  tags: &u\n    - c\n");
        for i in 0..4000 {
            anchored.push_str(&format!(
                "- {{id: j{i}, tags: *u}}\n- {{id: t{i}, tags: *t}}\n"
            ));
        }
        assert!(same(&anchored));
        let (_, doc, _) = both(&anchored);
        let doc = doc.unwrap();
        assert_eq!(doc.items[3000].tags, ["a", "b"]);
        assert_eq!(doc.items[4002].tags, ["c"]);
        assert_eq!(doc.items[4003].tags, ["a", "b"]);
        assert_eq!(doc.items[12001].tags, ["a", "b"]);
        assert_eq!(doc.items.len(), 12002);
    }

    #[test]
    fn a_lone_carriage_return_is_refused() {
        // Found by fuzzing (fuzz/ yaml_stream): a block scalar's CR-separated lines went to the
        // rest of the document, and the item read "" instead of its text.
        let doc = "items:\n- id: |\n\n\r    a\r    b\r\n";
        let (whole, streamed, _) = both(doc);
        assert!(whole.is_ok());
        let e = streamed.unwrap_err();
        assert!(e.message.starts_with("line 4: a carriage return"), "{e}");
        assert!(same("items:\r\n- id: a\r\nafter: 1\r"));
    }

    #[test]
    fn an_anchor_defined_twice_is_refused_both_ways() {
        // Found by fuzzing (fuzz/ yaml_stream): after `&a` is defined again, serde_norway gives
        // the next new anchor (`&x`) the same number, and `*a` reads as `&x`'s node (item c
        // got d's tags).
        let docs = [
            "items:\n- {id: a, tags: &a [x]}\n- {id: b, tags: &a [y]}\n- {id: c, tags: *a}\n- {id: d, tags: &x [z]}\n",
            // Across the list's boundary both ways, and in the rest alone.
            "\nitems:\n- {id: a, tags: &t [x]}\n- {id: b, tags: *t}\nafter: &t 1\n",
            "name: &t x\nitems:\n- {id: a, tags: &t [y]}\n",
            "name: &t x\nitems:\n- {id: a}\nafter: &t 2\n",
        ];
        for doc in docs {
            same(doc);
            let message = both(doc).0.unwrap_err().message;
            assert!(message.contains("is already defined on line"), "{message}");
        }
        let message = both(docs[0]).0.unwrap_err().message;
        assert!(
            message.starts_with("line 3: the YAML anchor `&a`"),
            "{message}"
        );
    }

    #[test]
    fn the_lists_opening_comments_are_still_read() {
        // Found by fuzzing (fuzz/ yaml_stream): the `key:` line's comment was dropped with the
        // list, so a control character in it (an error for the whole document) passed.
        for doc in ["items: #\u{e}x\n- id: a\n", "items:\n# \u{e}\n- id: a\n"] {
            let (whole, streamed, _) = both(doc);
            assert!(whole.is_err() && streamed.is_err(), "{doc:?}");
        }
        assert!(same("items: # the list\n# more\n\n- id: a\nafter: 1\n"));
    }

    #[test]
    fn other_forms_are_parsed_whole() {
        for doc in [
            "items: [{id: a}]\n",
            "items:\n",
            "items:\nafter: 2\n",
            "items: !!seq\n- {id: a}\n",
            "name: x\n",
            "items:\n  {id: a}\n",
        ] {
            assert!(!same(doc), "streamed: {doc}");
        }
    }

    #[test]
    fn errors_are_the_same_as_whole() {
        let mut big = String::from("items:\n");
        for i in 0..3000 {
            big.push_str(&format!("- {{id: k{i}}}\n"));
        }
        let errors = [
            // In an item: unknown field, wrong type, missing field, syntax.
            "items:\n- {id: a}\n- {id: b, colour: red}\n",
            "items:\n- id: a\n  n: many\n",
            "items:\n- {id: a}\n- {tags: []}\n",
            "items:\n- {id: a, tags: [x}\n- {id: b}\n",
            "items:\n- id: a\n  tags: *nowhere\n",
            // Before and after the list, and both.
            "name: [1\nitems:\n- {id: a}\n",
            "colour: red\nitems:\n- {id: 5, n: x}\n",
            "items:\n- {id: a, n: x}\nafter: nope\n",
            "items:\n- {id: a}\nafter: nope\n",
            "items:\n- {id: a}\nitems:\n- {id: b}\n",
            "items:\n- {id: a}\n---\nname: b\n",
            "items:\n-\tid: a\nafter: 1\n",
            "items:\n- {id: a, tags: *t}\n- {id: b, tags: &t [x]}\n",
        ];
        for doc in errors {
            let (whole, _, _) = both(doc);
            assert!(whole.is_err(), "{doc}");
            same(doc);
        }
        // Deep in a long list: the file's line number, the item's index.
        let doc = format!("{big}- {{id: x, n: many}}\n");
        same(&doc);
        let (_, e, _) = both(&doc);
        let e = e.unwrap_err();
        assert_eq!(e.key, "items[3000].n");
        assert!(e.message.contains("line 3002 column"), "{e}");
    }

    #[test]
    fn lines_are_shifted_only_where_they_are_positions() {
        assert_eq!(
            shift_lines("bad at line 2 column 5, context at line 3 column 1", 10),
            "bad at line 12 column 5, context at line 13 column 1"
        );
        assert_eq!(shift_lines("line 2 is fine", 10), "line 2 is fine");
        assert_eq!(shift_lines("online 7 column 2", 1), "online 8 column 2");
        assert_eq!(shift_lines("at line 9 column 2", -3), "at line 6 column 2");
    }

    #[test]
    fn anchors_past_the_cap_are_refused_not_dropped() {
        // Each item redefines anchor `t`; past the cap a later `*t` would silently resolve to
        // an earlier definition if the defining item were dropped.
        let mut doc = String::from("items:\n");
        let mut n = 0;
        while doc.len() < 2 * ANCHOR_BYTES + 4 * BATCH_BYTES {
            doc.push_str(&format!(
                "- {{id: k{n}, tags: &t [v{n}]}}\n- {{id: u{n}, tags: *t}}\n"
            ));
            n += 1;
        }
        let e = parse_streaming::<Doc, Item>(doc.as_bytes(), Path::new("t.yaml"), "items", |_| {})
            .unwrap_err();
        assert!(e.message.contains("defines a YAML anchor"), "{e}");
        let index: usize = e.key["items[".len()..e.key.len() - 1].parse().unwrap();
        assert_eq!(
            index % 2,
            0,
            "the refused item is one that defines the anchor: {e}"
        );
    }

    #[test]
    fn unreadable_input_is_named() {
        let bad: &[u8] = b"items:\n- id: \xff\n";
        let e =
            parse_streaming::<Doc, Item>(bad, Path::new("t.yaml"), "items", |_| {}).unwrap_err();
        assert!(e.message.starts_with("cannot read the file"), "{e}");
    }
}
