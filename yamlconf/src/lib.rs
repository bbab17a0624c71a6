//! Reading AI Hub's YAML configuration files (the gateway's and the admin API's): every problem
//! is a [`ConfigError`] naming the file and the key path (`upstreams.openai.endpoints[1]`), and
//! [`parse`] turns serde's errors into one. [`parse_streaming`] does the same for a document
//! with one huge top-level list (the gateway's `keys:`), read item by item instead of whole.
//! Both refuse an anchor defined twice (`anchors`: serde_norway would misread aliases).
//! Validation stays with each configuration type.

use std::fmt;
use std::path::{Path, PathBuf};

mod anchors;
mod stream;

pub use stream::parse_streaming;

/// A configuration problem, located by file and key path.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted key path, e.g. `routes[2].upstream`; empty for whole-file problems.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &Path, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

/// Reads a configuration file's text.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, "", format!("cannot read the file: {e}")))
}

/// Parses YAML text into `T`; `file` only names errors. A document that defines an anchor
/// name twice is refused (see `anchors`).
pub fn parse<T: serde::de::DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    let t = parse_located(text, file).map_err(|(e, _)| e)?;
    anchors::Anchors::of(text).check(file)?;
    Ok(t)
}

/// [`parse`] without the anchor rule, with the (1-based) line an error was found at, when known.
fn parse_located<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &Path,
) -> Result<T, (ConfigError, Option<usize>)> {
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let line = e.inner().location().map(|l| l.line());
        let error = ConfigError::new(
            file,
            if key == "." { String::new() } else { key },
            message(e.into_inner()),
        );
        (error, line)
    })
}

/// A serde_norway error's message, without its own rendering of the key path ("server: …"):
/// ours is exact.
fn message(e: serde_norway::Error) -> String {
    let mut message = e.to_string();
    if let Some((prefix, rest)) = message.split_once(": ") {
        if !prefix.contains(' ') {
            message = rest.to_owned();
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        server: Server,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Server {
        port: u16,
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = parse::<Doc>("server: {port: nope}", Path::new("a.yaml")).unwrap_err();
        assert_eq!(e.key, "server.port");
        assert!(e.to_string().starts_with("a.yaml: server.port: "), "{e}");
        let e = parse::<Doc>("- not a map", Path::new("a.yaml")).unwrap_err();
        assert_eq!(e.key, "");
        let e = read(Path::new("/nonexistent/x.yaml")).unwrap_err();
        assert!(e.to_string().contains("cannot read the file"));
    }
}
