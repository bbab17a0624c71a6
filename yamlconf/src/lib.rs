//! Reading AI Hub's YAML configuration files (the gateway's and the admin API's): every problem
//! is a [`ConfigError`] naming the file and the key path (`upstreams.openai.endpoints[1]`), and
//! [`parse`] turns serde's errors into one. Validation stays with each configuration type.

use std::fmt;
use std::path::{Path, PathBuf};

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

/// Parses YAML text into `T`; `file` only names errors.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let mut message = e.into_inner().to_string();
        // serde_norway prefixes its own rendering of the path ("server: …"); ours is exact.
        if let Some((prefix, rest)) = message.split_once(": ") {
            if !prefix.contains(' ') {
                message = rest.to_owned();
            }
        }
        ConfigError::new(file, if key == "." { String::new() } else { key }, message)
    })
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
