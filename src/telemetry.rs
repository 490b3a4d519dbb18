//! Logging set-up: text or JSON lines, filtered by `log_level` (or `RUST_LOG` when set).
//!
//! Log lines carry values from requests (an event type, a timestamp that failed to parse). In
//! JSON lines the encoder escapes them. In text lines nothing would, so a value with a newline
//! could forge a whole line and one with an escape sequence could rewrite the terminal: text
//! lines go through [`EscapingWriter`], which writes every control character as a `\u{..}`
//! escape (the line's own final newline excepted). Text lines therefore have no colours.

use std::io::Write;

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber; a second call is a no-op.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Json => builder
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .try_init(),
        LogFormat::Text => builder
            .with_writer(|| EscapingWriter(std::io::stderr()))
            .with_ansi(false)
            .try_init(),
    };
}

/// Writes what it is given with control characters (and the Unicode line and paragraph
/// separators) escaped, except a newline that ends the buffer: the formatter hands over one
/// whole line per write.
pub struct EscapingWriter<W: Write>(pub W);

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (body, end) = match text.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (&*text, ""),
        };
        if !body.chars().any(needs_escape) {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = String::with_capacity(body.len() + 16);
        for c in body.chars() {
            if needs_escape(c) {
                out.extend(c.escape_unicode());
            } else {
                out.push(c);
            }
        }
        out.push_str(end);
        self.0.write_all(out.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_but_the_line_end_is_kept() {
        let mut out = Vec::new();
        EscapingWriter(&mut out)
            .write_all("WARN type=evil\nINFO forged \u{1b}[2J\r\u{2028}x\n".as_bytes())
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "WARN type=evil\\u{a}INFO forged \\u{1b}[2J\\u{d}\\u{2028}x\n"
        );
        let mut plain = Vec::new();
        EscapingWriter(&mut plain)
            .write_all("INFO 群名 ok\n".as_bytes())
            .unwrap();
        assert_eq!(String::from_utf8(plain).unwrap(), "INFO 群名 ok\n");
    }
}
