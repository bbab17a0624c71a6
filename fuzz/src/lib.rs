//! Helpers shared by the fuzz targets in `fuzz_targets/`: cutting one input into a
//! configuration byte, chunk splits and a body, and reading SSE events the way the gateway's
//! meter cuts them.

use aihub_gateway::api::Api;

/// An input cut as the split-sensitive targets read it: the first byte chooses the API (and a
/// flag), the second seeds the chunk sizes, the rest is the body.
pub struct Split<'a> {
    pub api: Api,
    /// The first byte's top bit (the SSE target: strip the usage).
    pub flag: bool,
    pub seed: u8,
    pub body: &'a [u8],
}

impl<'a> Split<'a> {
    pub fn of(data: &'a [u8]) -> Option<Split<'a>> {
        let (&cfg, rest) = data.split_first()?;
        let (&seed, body) = rest.split_first()?;
        let api = match cfg & 0x7 {
            0 => Api::ChatCompletions,
            1 => Api::Completions,
            2 => Api::Embeddings,
            3 => Api::Responses,
            4 => Api::Messages,
            _ => Api::Other,
        };
        Some(Split {
            api,
            flag: cfg & 0x80 != 0,
            seed,
            body,
        })
    }

    /// The body cut into chunks whose sizes (1 to 64 bytes, or 1 byte each when the seed is
    /// 0) come from a small generator seeded by `seed`.
    pub fn chunks(&self) -> Vec<&'a [u8]> {
        let mut state = u32::from(self.seed).wrapping_mul(2_654_435_761) | 1;
        let mut out = Vec::new();
        let mut rest = self.body;
        while !rest.is_empty() {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let n = if self.seed == 0 {
                1
            } else {
                1 + (state % 64) as usize
            };
            let (a, b) = rest.split_at(n.min(rest.len()));
            out.push(a);
            rest = b;
        }
        out
    }
}

/// The complete events of an SSE body (each with its blank line) and the unterminated tail,
/// cut at `\n\n` or `\n\r\n` as the gateway cuts them.
pub fn sse_events(buf: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut events = Vec::new();
    let mut start = 0;
    'next: loop {
        let mut i = start;
        while i < buf.len() {
            if buf[i] == b'\n' {
                if buf.get(i + 1) == Some(&b'\n') {
                    events.push(&buf[start..i + 2]);
                    start = i + 2;
                    continue 'next;
                }
                if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                    events.push(&buf[start..i + 3]);
                    start = i + 3;
                    continue 'next;
                }
            }
            i += 1;
        }
        return (events, &buf[start..]);
    }
}

/// The `data:` lines of one event, each without the field name, one optional space and `\r`.
pub fn data_lines(event: &[u8]) -> Vec<&[u8]> {
    event
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let data = line.strip_prefix(b"data:")?;
            Some(data.strip_prefix(b" ").unwrap_or(data))
        })
        .collect()
}

/// How many times `needle` occurs in `haystack`.
pub fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| w == &needle)
        .count()
}
