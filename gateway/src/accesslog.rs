//! The access log: one line per request (`aihub::access` target, level info), written from
//! `logging`.
//!
//! The binary's text log gives this module a line writer ([`set_line_writer`]): the fields are
//! rendered by [`Line`] in one pass (`key=value`, integers through `itoa`, milliseconds with
//! three decimals from integer microseconds) straight into the log buffer. Through the
//! subscriber's per-field visitor (every string quoted and escaped through `Debug`, then the
//! message escaped char by char) the line cost ~4 % of the gateway's CPU per request. Values are
//! quoted and escaped here when they hold spaces, quotes or control characters. Without a line
//! writer (JSON logs, tests) each field is a field of a tracing event, as log pipelines expect.
//! Either way `RUST_LOG` decides whether the line is written.

use std::fmt::{self, Write};
use std::sync::OnceLock;
use std::time::Duration;

/// Writes one rendered access line (without its newline) to the log.
pub type LineWriter = Box<dyn Fn(fmt::Arguments<'_>) + Send + Sync>;

static LINE_WRITER: OnceLock<LineWriter> = OnceLock::new();

/// Sends access lines, rendered, to `writer` instead of through tracing's field visitor (set
/// once, by the binary's text log).
pub fn set_line_writer(writer: LineWriter) {
    let _ = LINE_WRITER.set(writer);
}

/// One request's access-log fields. Absent values are left out of the line.
pub struct Line<'a> {
    pub request_id: &'a uuid::Uuid,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub model: &'a str,
    pub key_id: Option<&'a str>,
    pub batch_id: Option<&'a str>,
    pub batch_line: Option<u64>,
    pub developer_id: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub endpoint: Option<&'a str>,
    pub attempts: u8,
    pub stream: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub overhead: Option<Duration>,
    pub upstream_latency: Option<Duration>,
    pub duration: Duration,
    pub error: Option<&'a str>,
}

impl Line<'_> {
    /// Writes the line to the log.
    pub fn emit(&self) {
        if !tracing::enabled!(target: "aihub::access", tracing::Level::INFO) {
            return;
        }
        if let Some(write) = LINE_WRITER.get() {
            write(format_args!("{self}"));
            return;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        tracing::info!(
            target: "aihub::access",
            request_id = %self.request_id,
            method = self.method,
            path = self.path,
            status = self.status,
            model = self.model,
            key_id = self.key_id,
            batch_id = self.batch_id,
            batch_line = self.batch_line,
            developer_id = self.developer_id,
            upstream = self.upstream,
            endpoint = self.endpoint,
            attempts = self.attempts,
            stream = self.stream,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            overhead_ms = self.overhead.map(ms),
            upstream_ms = self.upstream_latency.map(ms),
            duration_ms = ms(self.duration),
            error = self.error,
        );
    }
}

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut n = itoa::Buffer::new();
        let mut uuid = uuid::Uuid::encode_buffer();
        f.write_str("request_id=")?;
        f.write_str(self.request_id.hyphenated().encode_lower(&mut uuid))?;
        text(f, "method", self.method)?;
        text(f, "path", self.path)?;
        f.write_str(" status=")?;
        f.write_str(n.format(self.status))?;
        text(f, "model", self.model)?;
        for (name, value) in [
            ("key_id", self.key_id),
            ("batch_id", self.batch_id),
            ("developer_id", self.developer_id),
            ("upstream", self.upstream),
            ("endpoint", self.endpoint),
        ] {
            if let Some(v) = value {
                text(f, name, v)?;
            }
        }
        if let Some(line) = self.batch_line {
            f.write_str(" batch_line=")?;
            f.write_str(n.format(line))?;
        }
        f.write_str(" attempts=")?;
        f.write_str(n.format(self.attempts))?;
        f.write_str(if self.stream {
            " stream=true"
        } else {
            " stream=false"
        })?;
        f.write_str(" bytes_in=")?;
        f.write_str(n.format(self.bytes_in))?;
        f.write_str(" bytes_out=")?;
        f.write_str(n.format(self.bytes_out))?;
        for (name, value) in [
            ("overhead_ms", self.overhead),
            ("upstream_ms", self.upstream_latency),
            ("duration_ms", Some(self.duration)),
        ] {
            if let Some(d) = value {
                write!(f, " {name}={}", Millis(d))?;
            }
        }
        if let Some(e) = self.error {
            text(f, "error", e)?;
        }
        Ok(())
    }
}

/// ` name=value`, the value quoted (with `"` and `\` escaped) only when it holds a space, a
/// quote, a backslash, `=` or a control character.
fn text(f: &mut fmt::Formatter<'_>, name: &str, value: &str) -> fmt::Result {
    f.write_char(' ')?;
    f.write_str(name)?;
    f.write_char('=')?;
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b > b' ' && b != b'"' && b != b'\\' && b != b'=' && b != 0x7f);
    if plain {
        return f.write_str(value);
    }
    f.write_char('"')?;
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                f.write_char('\\')?;
                f.write_char(c)?;
            }
            c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

/// A duration as milliseconds with three decimals (`0.074`), from whole microseconds (no float
/// formatting): the access line's `*_ms` fields and the `x-aihub-overhead-ms` header.
pub struct Millis(pub Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.0.as_micros();
        let frac = (us % 1000) as u16;
        let digits = [
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ];
        f.write_str(itoa::Buffer::new().format(us / 1000))?;
        f.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_logfmt_line() {
        let id = uuid::Uuid::nil();
        let line = Line {
            request_id: &id,
            method: "POST",
            path: "/v1/chat/completions",
            status: 200,
            model: "gpt 4o \"x\"",
            key_id: Some("key_1"),
            batch_id: None,
            batch_line: Some(7),
            developer_id: Some("dev_1"),
            upstream: Some("openai"),
            endpoint: None,
            attempts: 1,
            stream: true,
            bytes_in: 64,
            bytes_out: 594,
            overhead: Some(Duration::from_micros(74)),
            upstream_latency: Some(Duration::from_micros(1_500)),
            duration: Duration::from_micros(12_345_678),
            error: Some(""),
        };
        assert_eq!(
            line.to_string(),
            "request_id=00000000-0000-0000-0000-000000000000 method=POST \
             path=/v1/chat/completions status=200 model=\"gpt 4o \\\"x\\\"\" key_id=key_1 \
             developer_id=dev_1 upstream=openai batch_line=7 attempts=1 stream=true bytes_in=64 \
             bytes_out=594 overhead_ms=0.074 upstream_ms=1.500 duration_ms=12345.678 error=\"\""
        );
    }
}
