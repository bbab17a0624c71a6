//! Sending one webhook request: resolve the host, check every address against the
//! [`AddressPolicy`], connect to a checked address (so the address checked is the address
//! connected), TLS for `https` (certificate and name verified), one HTTP/1.1 `POST`, the
//! status, `Retry-After` and the first 1 KiB of the answer; no redirect is followed. The whole
//! exchange has one deadline.
//!
//! Connections are kept alive and reused for the same scheme, host and port (a pool of idle
//! connections, each made to a checked address, dropped after [`IDLE`]): a busy receiver is
//! not sent a new TCP (and TLS) handshake per event, and the node does not run out of ports.
//! An answer whose body is longer than [`DRAIN`] ends its connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::guard::AddressPolicy;

/// How much of an answer's body is kept for the delivery log.
pub const BODY_KEPT: usize = 1024;
/// How much of a body is read (and dropped) to keep its connection for the next request.
pub const DRAIN: usize = 64 * 1024;
/// How long an idle connection is kept.
pub const IDLE: Duration = Duration::from_secs(30);
/// Idle connections kept per host.
const IDLE_PER_HOST: usize = 32;

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Where a connection goes: `(https, host, port)`.
type Origin = (bool, String, u16);

/// Idle connections by origin, each with the time it became idle.
#[derive(Default)]
struct Pool {
    idle: Mutex<HashMap<Origin, Vec<(Conn, Instant)>>>,
}

impl Pool {
    fn take(&self, key: &Origin) -> Option<Conn> {
        let mut idle = self.idle.lock().expect("pool");
        let list = idle.get_mut(key)?;
        while let Some((c, at)) = list.pop() {
            if at.elapsed() < IDLE && !c.is_closed() {
                return Some(c);
            }
        }
        None
    }

    fn give(&self, key: Origin, c: Conn) {
        let mut idle = self.idle.lock().expect("pool");
        if idle.len() > 10_000 {
            idle.retain(|_, l| l.iter().any(|(_, at)| at.elapsed() < IDLE));
        }
        let list = idle.entry(key).or_default();
        if list.len() < IDLE_PER_HOST {
            list.push((c, Instant::now()));
        }
    }
}

/// What came back (or why nothing did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: Option<u16>,
    /// The first [`BODY_KEPT`] bytes of the body (lossy UTF-8).
    pub body: String,
    /// `Retry-After`, in seconds, when the answer carried one.
    pub retry_after: Option<Duration>,
    pub latency: Duration,
    /// Why there is no usable answer: connect or TLS failure, timeout, refused address.
    pub error: Option<String>,
    /// The address was refused by the guard (an SSRF attempt, logged).
    pub refused: bool,
}

/// The HTTP client of the delivery engine.
#[derive(Clone)]
pub struct Sender {
    policy: AddressPolicy,
    timeout: Duration,
    tls: tokio_native_tls::TlsConnector,
    pool: Arc<Pool>,
}

impl Sender {
    pub fn new(policy: AddressPolicy, timeout: Duration) -> Result<Sender, String> {
        let tls = tokio_native_tls::native_tls::TlsConnector::new()
            .map_err(|e| format!("TLS setup: {e}"))?;
        Ok(Sender {
            policy,
            timeout,
            tls: tls.into(),
            pool: Arc::default(),
        })
    }

    /// Posts `body` to `url` with `headers`.
    pub async fn post(
        &self,
        url: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Answer {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.exchange(url, headers, body)).await;
        let latency = started.elapsed();
        match result {
            Ok(Ok((status, body, retry_after))) => Answer {
                status: Some(status),
                body,
                retry_after,
                latency,
                error: None,
                refused: false,
            },
            Ok(Err(e)) => Answer {
                status: None,
                body: String::new(),
                retry_after: None,
                latency,
                refused: matches!(e, SendError::Refused(_)),
                error: Some(e.to_string()),
            },
            Err(_) => Answer {
                status: None,
                body: String::new(),
                retry_after: None,
                latency,
                error: Some(format!("no answer within {} s", self.timeout.as_secs_f64())),
                refused: false,
            },
        }
    }

    async fn exchange(
        &self,
        url: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<(u16, String, Option<Duration>), SendError> {
        let uri: http::Uri = url.parse().map_err(|_| SendError::Url)?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(SendError::Url),
        };
        let host = uri.host().ok_or(SendError::Url)?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = uri.authority().map_or(host, |a| a.as_str());
        let request = || {
            let mut req = http::Request::post(path)
                .header(http::header::HOST, authority)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::USER_AGENT, "AIHub-Webhooks/1.0");
            for (k, v) in headers {
                req = req.header(k, v);
            }
            req.body(Full::new(body.clone()))
                .map_err(|_| SendError::Url)
        };
        let key = (https, bare.to_owned(), port);
        let (answer, reusable) = match self.pool.take(&key) {
            // A kept connection the receiver closed meanwhile fails before any answer: the
            // request goes again on a new connection.
            Some(c) => match exchange_on(c, request()?).await {
                Err(SendError::Http(_)) => {
                    let c = self.connect(https, bare, port).await?;
                    exchange_on(c, request()?).await?
                }
                other => other?,
            },
            None => {
                let c = self.connect(https, bare, port).await?;
                exchange_on(c, request()?).await?
            }
        };
        if let Some(c) = reusable {
            self.pool.give(key, c);
        }
        Ok(answer)
    }

    /// A new connection to a checked address of `bare` (the host without brackets).
    async fn connect(&self, https: bool, bare: &str, port: u16) -> Result<Conn, SendError> {
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((bare, port))
                .await
                .map_err(|e| SendError::Resolve(e.to_string()))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(SendError::Resolve("no address".into()));
        }
        // Every address must be allowed: a name that resolves to a public and a private
        // address is refused whole.
        if let Some(bad) = addrs.iter().find(|a| !self.policy.allows(a.ip())) {
            tracing::warn!(host = %bare, address = %bad.ip(), "webhook refused: the host resolves to a private, loopback or reserved address");
            return Err(SendError::Refused(bad.ip()));
        }
        let mut last = None;
        let mut tcp = None;
        for a in &addrs {
            match TcpStream::connect(a).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp =
            tcp.ok_or_else(|| SendError::Connect(last.map(|e| e.to_string()).unwrap_or_default()))?;
        let _ = tcp.set_nodelay(true);
        if https {
            let tls = self
                .tls
                .connect(bare, tcp)
                .await
                .map_err(|e| SendError::Tls(e.to_string()))?;
            handshake(tls).await
        } else {
            handshake(tcp).await
        }
    }
}

/// An HTTP/1.1 client connection over `stream`; its driver runs until the connection ends.
async fn handshake<S>(stream: S) -> Result<Conn, SendError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError::Http(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

type Exchanged = ((u16, String, Option<Duration>), Option<Conn>);

/// Sends `req` and reads the answer; returns the connection when it can be used again.
async fn exchange_on(
    mut send: Conn,
    req: http::Request<Full<Bytes>>,
) -> Result<Exchanged, SendError> {
    send.ready()
        .await
        .map_err(|e| SendError::Http(e.to_string()))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| SendError::Http(e.to_string()))?;
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, aihub_store::now_ms() / 1000));
    let mut body = resp.into_body();
    let mut kept = Vec::with_capacity(256);
    let mut read = 0usize;
    let mut complete = false;
    while read <= DRAIN {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    read += d.len();
                    let take = d.len().min(BODY_KEPT - kept.len());
                    kept.extend_from_slice(&d[..take]);
                }
            }
            None => {
                complete = true;
                break;
            }
            // A body cut short still leaves the status: the answer counts.
            Some(Err(_)) => break,
        }
    }
    let answer = (
        status,
        String::from_utf8_lossy(&kept).into_owned(),
        retry_after,
    );
    Ok((answer, complete.then_some(send)))
}

/// `Retry-After` as seconds (`120`) or an HTTP date (`Wed, 21 Oct 2026 07:28:00 GMT`, taken
/// relative to `now_s`); a date in the past is no wait.
pub fn retry_after(value: &str, now_s: i64) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // IMF-fixdate: `Day, DD Mon YYYY HH:MM:SS GMT`.
    let mut parts = v.split_whitespace().skip(1);
    let day: u32 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i32 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|x| x.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next()? != "GMT" || !(1..=31).contains(&day) {
        return None;
    }
    let period = days_to_month(year, month)?;
    let at = (period + i64::from(day) - 1) * 86_400 + h * 3600 + m * 60 + sec;
    Some(Duration::from_secs((at - now_s).max(0) as u64))
}

/// Days from 1970-01-01 to the first of `month` of `year` (proleptic Gregorian).
fn days_to_month(year: i32, month: u32) -> Option<i64> {
    if !(1970..=9999).contains(&year) {
        return None;
    }
    let (y, m) = if month <= 2 {
        (i64::from(year) - 1, i64::from(month) + 9)
    } else {
        (i64::from(year), i64::from(month) - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("invalid URL")]
    Url,
    #[error("cannot resolve the host: {0}")]
    Resolve(String),
    #[error("refused: the host resolves to a private, loopback or reserved address ({0})")]
    Refused(IpAddr),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(retry_after("120", 0), Some(Duration::from_secs(120)));
        // 2026-10-21T07:28:00Z = 1792567680.
        let at = 1_792_567_680;
        assert_eq!(
            retry_after("Wed, 21 Oct 2026 07:28:00 GMT", at - 90),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2026 07:28:00 GMT", at + 5),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after("Sun, 01 Mar 2026 00:00:00 GMT", 1_772_323_200),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", 0), None);
        assert_eq!(retry_after("Wed, 21 Foo 2026 07:28:00 GMT", 0), None);
    }
}
