//! One rule our YAML files keep that YAML itself does not: an anchor name is defined once.
//!
//! serde_norway (0.9.42, the newest) numbers anchors by how many distinct names it has seen:
//! once a name is defined again, the next new anchor gets the same number, and every alias to
//! the redefined name resolves to that new node instead, silently (`[&a 1, &a 2, *a, &b 3]`
//! reads as `[1, 2, 3, 3]`). Found by the `yaml_stream` fuzz target. Rather than read a wrong
//! value into a key's limits or permissions, [`parse`](crate::parse) and
//! [`parse_streaming`](crate::parse_streaming) refuse a second definition, naming both lines.
//!
//! [`Anchors`] reads the text line by line, as the streaming reader receives it, and finds
//! anchors lexically: `&name` where a node may start (the line's first token, after `- `,
//! `? `, `: `, `[`, `{`, a flow `,`, a tag or another anchor), outside quoted scalars, comments
//! and block scalars. It errs towards seeing an anchor (a plain scalar's continuation line that
//! begins with `&name`), never away from one in a document the parser accepts.

use std::collections::HashMap;
use std::path::Path;

use crate::ConfigError;

/// Anchors seen so far, and where the reader stands between lines.
#[derive(Default)]
pub(crate) struct Anchors {
    /// Name → line of its definition.
    seen: HashMap<String, usize>,
    /// 1-based number of the last line fed.
    line_no: usize,
    /// A quoted scalar continues on the next line (its quote character).
    quote: Option<u8>,
    /// In a block scalar, whose lines are those indented more than this.
    block: Option<usize>,
    /// Depth of open flow collections (`[`, `{`).
    flow: usize,
    /// The first anchor defined again: (name, first line, line).
    again: Option<(String, usize, usize)>,
}

impl Anchors {
    /// Reads a whole text (lines split at `\n`, as [`Anchors::feed`] expects them).
    pub(crate) fn of(text: &str) -> Anchors {
        let mut anchors = Anchors::default();
        if text.contains('&') {
            text.split_inclusive('\n')
                .for_each(|line| anchors.feed(line));
        }
        anchors
    }

    /// The error for the first anchor defined twice, if any.
    pub(crate) fn check(&self, file: &Path) -> Result<(), ConfigError> {
        match &self.again {
            None => Ok(()),
            Some((name, first, line)) => Err(ConfigError::new(
                file,
                "",
                format!(
                    "line {line}: the YAML anchor `&{name}` is already defined on line {first}: \
                     give each anchor its own name (the YAML reader would resolve aliases to a \
                     redefined anchor wrongly)"
                ),
            )),
        }
    }

    /// How many lines were fed.
    pub(crate) fn lines(&self) -> usize {
        self.line_no
    }

    /// Reads the document's next line (with or without its line break).
    pub(crate) fn feed(&mut self, line: &str) {
        self.line_no += 1;
        if self.again.is_some() {
            return;
        }
        // A lone CR breaks lines too, for libyaml (found by fuzzing: `-\r &a`).
        for body in line.trim_end_matches(['\n', '\r']).split('\r') {
            self.feed_break_free(body);
        }
    }

    /// [`Anchors::feed`] for a piece of line without line breaks.
    fn feed_break_free(&mut self, body: &str) {
        let indent = body.len() - body.trim_start_matches(' ').len();
        if let Some(parent) = self.block {
            if body.trim().is_empty() || indent > parent {
                return;
            }
            self.block = None;
        }
        let b = body.as_bytes();
        if self.quote.is_none() && !b.iter().any(|c| b"&\"'|>".contains(c)) {
            // Nothing here opens a scalar or defines an anchor; flow brackets stay balanced
            // enough for the rule (a node may start after `[`, `{` and `,` anyway).
            self.flow = count_flow(b, self.flow);
            return;
        }
        let mut i = 0;
        if let Some(q) = self.quote {
            match close_quote(b, 0, q) {
                Some(end) => (i, self.quote) = (end, None),
                None => return,
            }
        }
        // A node may start here; where this line's mapping entry begins; a `: ` was seen.
        let mut node_start = i == 0;
        let mut entry = indent;
        let mut colon = false;
        while i < b.len() {
            let c = b[i];
            let spaced = |at: usize| b.get(at).is_none_or(|&n| n == b' ' || n == b'\t');
            match c {
                b' ' | b'\t' => {}
                b'#' if i == 0 || matches!(b[i - 1], b' ' | b'\t') => return,
                b'-' | b'?' if node_start && spaced(i + 1) => entry = i + 2,
                b':' if spaced(i + 1) || self.flow > 0 => (node_start, colon) = (true, true),
                b'[' | b'{' if node_start => self.flow += 1,
                b',' if self.flow > 0 => node_start = true,
                b']' | b'}' if self.flow > 0 => (self.flow, node_start) = (self.flow - 1, false),
                b'\'' | b'"' if node_start => match close_quote(b, i + 1, c) {
                    Some(end) => {
                        (i, node_start) = (end, false);
                        continue;
                    }
                    None => {
                        self.quote = Some(c);
                        return;
                    }
                },
                b'|' | b'>' if node_start && self.flow == 0 => {
                    self.block = Some(if colon { entry } else { indent });
                    return;
                }
                b'&' if node_start => {
                    // libyaml's anchor names: ASCII letters, digits, `_` and `-`.
                    let len = b[i + 1..]
                        .iter()
                        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'))
                        .count();
                    if len > 0 {
                        self.define(&body[i + 1..i + 1 + len]);
                    }
                    i += 1 + len;
                    continue;
                }
                b'!' if node_start => {
                    i = tag_end(b, i + 1);
                    continue;
                }
                _ => {
                    // Part of a plain scalar (or an alias): up to the next space or indicator.
                    node_start = false;
                }
            }
            i += 1;
        }
    }

    fn define(&mut self, name: &str) {
        let line = self.line_no;
        if let Some(&first) = self.seen.get(name) {
            self.again.get_or_insert((name.to_owned(), first, line));
        } else {
            self.seen.insert(name.to_owned(), line);
        }
    }
}

/// Where a quoted scalar opened before `from` ends (the index after its closing quote), if on
/// this line: `''` escapes a single quote, `\` any character in double quotes.
fn close_quote(b: &[u8], mut from: usize, quote: u8) -> Option<usize> {
    while from < b.len() {
        match b[from] {
            b'\\' if quote == b'"' => from += 2,
            c if c == quote => {
                if quote == b'\'' && b.get(from + 1) == Some(&b'\'') {
                    from += 2;
                } else {
                    return Some(from + 1);
                }
            }
            _ => from += 1,
        }
    }
    None
}

/// The end of a tag: the next space or flow indicator.
fn tag_end(b: &[u8], from: usize) -> usize {
    b[from..]
        .iter()
        .position(|c| b" \t,[]{}".contains(c))
        .map_or(b.len(), |n| from + n)
}

/// Flow depth after a line without quotes (brackets in comments and plain scalars count too:
/// the rule only widens where a node may start).
fn count_flow(b: &[u8], mut depth: usize) -> usize {
    for &c in b {
        match c {
            b'#' => break,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    depth
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first redefinition: (name, first line, line).
    fn again(text: &str) -> Option<(String, usize, usize)> {
        Anchors::of(text).again
    }

    #[test]
    fn finds_a_name_defined_twice_where_nodes_start() {
        let twice = |a: &str, b: &str| again(&format!("{a}\n{b}\n"));
        let want = Some(("a".to_owned(), 1, 2));
        assert_eq!(twice("- &a 1", "- &a 2"), want);
        assert_eq!(twice("x: &a 1", "y: &a [2]"), want);
        assert_eq!(twice("&a x: 1", "? &a y"), want);
        assert_eq!(twice("x: !!str &a 1", "y: {k: &a 2}"), want);
        assert_eq!(twice("x: [1, &a 2]", "y: &a |"), want);
        assert_eq!(twice("- - &a 1", "  - &a {}"), want);
        // A name ends where libyaml ends it (found by fuzzing: `&a:x` defines `a`).
        assert_eq!(twice("- &a", "- &a:isz x: *a"), want);
        assert_eq!(twice("- &a", "-\r &a x"), want);
        assert_eq!(again("x: &a 1\ny: &b 2\nz: *a\n"), None);
    }

    #[test]
    fn ignores_ampersands_that_are_not_anchors() {
        let docs = [
            // Plain scalars, quoted scalars (on several lines too), comments, aliases.
            "- R&D\n- a &a\n- 'x &a' # &a\n- \"&a \\\" &a\"\n- *a\n- *a\n",
            "x: 'it''s &a'\ny: \"first\n  &a line\"\nz: 'a\n  &a'\n",
            // Block scalars, literal and folded, with indentation indicators.
            "x: |\n  &a one\n  &a two\ny: >-\n  &a\n\n  &a\n- |2\n   &a\n",
            "- k: |\n    &a\n    &a\n",
            // Apostrophes and brackets inside plain scalars open nothing.
            "a: it's [x\nb: &a 1\nc: don't {\n",
        ];
        for doc in docs {
            assert_eq!(again(doc), None, "{doc}");
        }
        // After a block scalar, a sibling's anchor is seen again.
        assert!(again("x: &a |\n  text\ny: &a 1\n").is_some());
        // After a multi-line quoted scalar too.
        assert!(again("x: &a \"one\n  two\" \ny: &a 1\n").is_some());
    }

    #[test]
    fn the_error_names_both_lines() {
        let e = Anchors::of("a: &x 1\nb: *x\nc: &x 2\nd: &y 3\n")
            .check(Path::new("f.yaml"))
            .unwrap_err();
        assert_eq!(e.key, "");
        assert!(
            e.message
                .starts_with("line 3: the YAML anchor `&x` is already defined on line 1"),
            "{e}"
        );
    }
}
