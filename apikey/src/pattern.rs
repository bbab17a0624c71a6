//! Permission rules of a key, shared by the gateway (which enforces them) and the admin API
//! (which validates what developers ask for), so both accept exactly the same lists.
//!
//! - [`Pattern`]/[`Patterns`]: model and endpoint patterns: `*`, `prefix*`, or an exact name.
//! - [`parse_ip_net`]: one IP allowlist entry: a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single
//!   address (`192.0.2.7`, `::1`).

use std::net::IpAddr;
use std::sync::Arc;

pub use ipnet::IpNet;

/// Why a pattern or an allowlist entry is refused. Carries the offending text (never a key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("empty pattern")]
    Empty,
    #[error("`{0}`: `*` is only allowed at the end")]
    MisplacedStar(String),
    #[error("`{0}`: expected an IP address or a CIDR network (e.g. 10.0.0.0/8)")]
    IpNet(String),
}

/// A model or endpoint pattern: `*`, `prefix*`, or an exact name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Prefix(Box<str>),
    Exact(Box<str>),
}

impl Pattern {
    pub fn parse(p: &str) -> Result<Pattern, PatternError> {
        match p {
            "" => Err(PatternError::Empty),
            "*" => Ok(Pattern::Any),
            _ => match p.strip_suffix('*') {
                Some(prefix) if !prefix.contains('*') => Ok(Pattern::Prefix(prefix.into())),
                None if !p.contains('*') => Ok(Pattern::Exact(p.into())),
                _ => Err(PatternError::MisplacedStar(p.to_owned())),
            },
        }
    }

    #[inline]
    pub fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Prefix(p) => s.starts_with(&**p),
            Pattern::Exact(e) => &**e == s,
        }
    }
}

/// Renders a pattern as it was written (`*`, `prefix*`, `exact`): `parse(p.to_string()) == p`.
impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Prefix(p) => write!(f, "{p}*"),
            Pattern::Exact(e) => f.write_str(e),
        }
    }
}

/// A list of patterns; empty (the default) matches nothing. One pointer wide (a thin `Arc`):
/// key records hold two of them, and equal lists are shared between records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns(Arc<Vec<Pattern>>);

impl Patterns {
    /// Parses every pattern; the first invalid one fails the list.
    pub fn parse<S: AsRef<str>>(list: &[S]) -> Result<Patterns, PatternError> {
        let v: Result<Vec<_>, _> = list.iter().map(|p| Pattern::parse(p.as_ref())).collect();
        Ok(Patterns(Arc::new(v?)))
    }

    /// The patterns as written, in order.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }

    /// Parses what can be parsed and reports the rest: for lists that were validated elsewhere
    /// (a database row), where dropping an invalid pattern only takes a permission away.
    pub fn parse_lenient<S: AsRef<str>>(list: &[S]) -> (Patterns, Vec<PatternError>) {
        let mut ok = Vec::with_capacity(list.len());
        let mut errors = Vec::new();
        for p in list {
            match Pattern::parse(p.as_ref()) {
                Ok(p) => ok.push(p),
                Err(e) => errors.push(e),
            }
        }
        (Patterns(Arc::new(ok)), errors)
    }

    pub fn any() -> Patterns {
        Patterns(Arc::new(vec![Pattern::Any]))
    }

    #[inline]
    pub fn matches(&self, s: &str) -> bool {
        self.0.iter().any(|p| p.matches(s))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A key's client networks. Held behind a (thin) `Arc` by key records, shared between records
/// with the same list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpAllowlist(Box<[IpNet]>);

impl IpAllowlist {
    pub fn new(nets: Vec<IpNet>) -> IpAllowlist {
        IpAllowlist(nets.into_boxed_slice())
    }

    /// Whether `ip` (compared as given: canonicalize IPv4-mapped addresses first) is in one of
    /// the networks. An empty list contains nothing.
    #[inline]
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.0
    }
}

/// Parses one IP allowlist entry: a CIDR network or a single address (a /32 or /128). Host bits
/// are cleared (`10.1.2.3/8` is `10.0.0.0/8`) and an IPv4-mapped IPv6 address (`::ffff:1.2.3.4`)
/// becomes the IPv4 address, as client addresses are compared in that form.
pub fn parse_ip_net(s: &str) -> Result<IpNet, PatternError> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    match s.parse::<IpAddr>() {
        Ok(addr) => Ok(IpNet::from(addr.to_canonical())),
        Err(_) => Err(PatternError::IpNet(s.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = Patterns::parse(&["gpt-4o*", "demo"]).unwrap();
        assert!(p.matches("gpt-4o-mini") && p.matches("demo"));
        assert!(!p.matches("demo2") && !p.matches("gpt-4"));
        assert_eq!(
            Pattern::parse("a*b"),
            Err(PatternError::MisplacedStar("a*b".into()))
        );
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        assert!(!Patterns::parse::<&str>(&[]).unwrap().matches("x"));
        assert!(Patterns::any().matches("anything"));
    }

    #[test]
    fn lenient_parsing_keeps_the_valid_patterns() {
        let (p, errors) = Patterns::parse_lenient(&["demo", "a*b*", ""]);
        assert!(p.matches("demo") && !p.matches("a"));
        assert_eq!(errors.len(), 2);
    }

    #[test]
    fn ip_entries() {
        let net = parse_ip_net("10.1.2.3/8").unwrap();
        assert_eq!(net.to_string(), "10.0.0.0/8");
        assert!(net.contains(&"10.200.0.1".parse::<IpAddr>().unwrap()));
        assert_eq!(
            parse_ip_net("127.0.0.1").unwrap().to_string(),
            "127.0.0.1/32"
        );
        assert_eq!(parse_ip_net("::1").unwrap().to_string(), "::1/128");
        assert_eq!(
            parse_ip_net("::ffff:192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            parse_ip_net("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        for bad in ["", "10.0.0.0/33", "localhost", "10.0.0.*"] {
            assert!(parse_ip_net(bad).is_err(), "{bad}");
        }
    }
}
