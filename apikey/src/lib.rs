//! The API key format, shared by the gateway (which checks keys) and the admin API (which issues
//! them).
//!
//! A key is `ahub_dev_` + 32 random base62 characters + 6 base62 characters of the CRC32 of the
//! random part (GitHub's token format idea): secret scanners recognise it by its prefix, and a
//! typo or a truncated key is refused offline, before any lookup. 32 base62 characters carry
//! 190 bits of entropy.
//!
//! Keys are stored as the sha256 of the whole key ([`KeyHash`]), unsalted: the key is
//! high-entropy, so a slow or salted hash buys nothing, and an unsalted hash gives an O(1) lookup.
//! Only [`display_prefix`] (the prefix and the first four random characters) is ever shown again.
//!
//! # Layout
//! - This file: [`generate`], [`parse`], [`KeyHash`], [`display_prefix`].
//! - [`pattern`]: a key's permission rules (model/endpoint patterns, IP allowlist entries),
//!   enforced by the gateway and validated by the admin API with the same code.
//! - [`internal`]: credentials between the gateway and the admin API (forwarded identities of
//!   Files/Batches calls, batch items' tokens), signed with the shared internal secret.

pub mod internal;
pub mod pattern;

use std::fmt;

use rand::Rng;
use sha2::{Digest, Sha256};

/// The prefix of every developer key.
pub const PREFIX: &str = "ahub_dev_";
/// Length of the random part, in base62 characters.
pub const RANDOM_LEN: usize = 32;
/// Length of the checksum, in base62 characters (CRC32 < 62^6).
pub const CHECKSUM_LEN: usize = 6;
/// Total length of a well-formed key.
pub const KEY_LEN: usize = PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a string is not a well-formed key. None of these variants carries the key itself, so
/// they are safe to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("the key does not start with `{PREFIX}`")]
    Prefix,
    #[error("the key has the wrong length")]
    Length,
    #[error("the key contains characters outside base62")]
    Charset,
    #[error("the key's checksum does not match")]
    Checksum,
}

/// sha256 of a whole key: what stores hold and what lookups use. The default (all zeros) is the
/// hash of no key.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Hashes a key string (well-formed or not).
    pub fn of(key: &str) -> Self {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    /// Lower-case hex, as written in YAML and the control-plane database.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex characters, optionally prefixed by `sha256:`. (A million of them are
    /// parsed when a gateway loads its keys: the digits are decoded two at a time; the `hex`
    /// crate names what is wrong with the others.)
    pub fn from_hex(s: &str) -> Result<Self, hex::FromHexError> {
        let s = s.strip_prefix("sha256:").unwrap_or(s);
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        if s.len() == 64 {
            let pairs = s.as_bytes().chunks_exact(2);
            if out
                .iter_mut()
                .zip(pairs)
                .all(|(o, pair)| match (digit(pair[0]), digit(pair[1])) {
                    (Some(hi), Some(lo)) => {
                        *o = hi << 4 | lo;
                        true
                    }
                    _ => false,
                })
            {
                return Ok(KeyHash(out));
            }
        }
        hex::decode_to_slice(s, &mut out)?;
        Ok(KeyHash(out))
    }

    /// The first eight bytes, as a ready-made hash for hash maps (the value is already uniform).
    pub fn short(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }
}

/// Feeds only [`KeyHash::short`] to the hasher: the digest is already uniform, so maps keyed by
/// it can use a pass-through hasher.
impl std::hash::Hash for KeyHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.short());
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", &self.to_hex()[..12])
    }
}

/// Generates a new random key.
pub fn generate() -> String {
    let mut rng = rand::rng();
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(PREFIX);
    for _ in 0..RANDOM_LEN {
        key.push(BASE62[rng.random_range(0..62)] as char);
    }
    let checksum = checksum(&key.as_bytes()[PREFIX.len()..]);
    key.push_str(std::str::from_utf8(&checksum).expect("base62 is ASCII"));
    key
}

/// Checks the format and checksum of `key` and returns its hash. No allocation.
pub fn parse(key: &str) -> Result<KeyHash, KeyFormatError> {
    check(key)?;
    Ok(KeyHash::of(key))
}

/// Checks the format and checksum of `key` without hashing it.
pub fn check(key: &str) -> Result<(), KeyFormatError> {
    let bytes = key.as_bytes();
    if !bytes.starts_with(PREFIX.as_bytes()) {
        return Err(KeyFormatError::Prefix);
    }
    if bytes.len() != KEY_LEN {
        return Err(KeyFormatError::Length);
    }
    let body = &bytes[PREFIX.len()..];
    if !body.iter().all(u8::is_ascii_alphanumeric) {
        return Err(KeyFormatError::Charset);
    }
    let (random, sum) = body.split_at(RANDOM_LEN);
    if checksum(random) != sum {
        return Err(KeyFormatError::Checksum);
    }
    Ok(())
}

/// What may be shown of a key after its creation: `ahub_dev_` and four characters, then `…`.
pub fn display_prefix(key: &str) -> String {
    let end = (PREFIX.len() + 4).min(key.len());
    format!("{}…", key.get(..end).unwrap_or(PREFIX))
}

/// CRC32 of the random part, as 6 base62 digits, most significant first, zero-padded.
fn checksum(random: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(random);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_differ() {
        let a = generate();
        let b = generate();
        assert_eq!(a.len(), KEY_LEN);
        assert!(a.starts_with(PREFIX));
        assert_ne!(a, b);
        assert_eq!(parse(&a).unwrap(), KeyHash::of(&a));
    }

    #[test]
    fn malformed_keys_are_refused_with_the_reason() {
        let key = generate();
        assert_eq!(parse("sk-abc"), Err(KeyFormatError::Prefix));
        assert_eq!(parse(&key[..KEY_LEN - 1]), Err(KeyFormatError::Length));
        let mut bad = key.clone().into_bytes();
        bad[PREFIX.len()] = b'-';
        assert_eq!(
            parse(std::str::from_utf8(&bad).unwrap()),
            Err(KeyFormatError::Charset)
        );
        // Change one random character: the checksum no longer matches.
        let mut typo = key.into_bytes();
        let i = PREFIX.len() + 3;
        typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
        assert_eq!(
            parse(std::str::from_utf8(&typo).unwrap()),
            Err(KeyFormatError::Checksum)
        );
    }

    #[test]
    fn checksum_is_crc32_in_base62() {
        // crc32("") == 0 → all zeros; a known value checks the digit order.
        assert_eq!(&checksum(b""), b"000000");
        let n = crc32fast::hash(b"abc"); // 0x352441C2 = 891568578
        assert_eq!(n, 891_568_578);
        let digits = checksum(b"abc");
        let back = digits.iter().fold(0u64, |acc, d| {
            acc * 62 + BASE62.iter().position(|c| c == d).unwrap() as u64
        });
        assert_eq!(back, u64::from(n));
    }

    #[test]
    fn hex_hashes_parse_in_any_case_and_errors_are_named() {
        let h = KeyHash::of("k");
        let upper = h.to_hex().to_uppercase();
        assert_eq!(KeyHash::from_hex(&upper).unwrap(), h);
        assert_eq!(
            KeyHash::from_hex(&"g".repeat(64)),
            Err(hex::FromHexError::InvalidHexCharacter { c: 'g', index: 0 })
        );
        assert_eq!(KeyHash::from_hex("abc"), Err(hex::FromHexError::OddLength));
        assert!(KeyHash::from_hex(&"ab".repeat(31)).is_err());
        assert!(KeyHash::from_hex(&format!("{}é", "a".repeat(62))).is_err());
    }

    #[test]
    fn hash_hex_round_trip_and_display_prefix() {
        let key = generate();
        let h = KeyHash::of(&key);
        assert_eq!(KeyHash::from_hex(&h.to_hex()).unwrap(), h);
        assert_eq!(
            KeyHash::from_hex(&format!("sha256:{}", h.to_hex())).unwrap(),
            h
        );
        let shown = display_prefix(&key);
        assert!(shown.starts_with(PREFIX) && shown.ends_with('…'));
        assert_eq!(shown.chars().count(), PREFIX.len() + 5);
        assert!(!format!("{h:?}").contains(&h.to_hex()));
    }
}
