//! Deadlines of a client connection between requests (HTTP/1): how long it may stay idle
//! before its next request starts (`server.idle_timeout`), and how long a request header may
//! take to arrive whole once its first byte came (`server.header_read_timeout`).
//!
//! pingora bounds each read of a request header separately (60 s), never the whole header, and
//! waits without limit for the next request on a kept-alive HTTP/1.1 connection: a client
//! sending its header one byte at a time, or keeping thousands of connections open after one
//! request, would hold their sockets and tasks forever. [`ConnDeadlines`] wraps the HTTP app and
//! gives each HTTP/1 connection a [`DeadlineStream`] that watches the bytes going by: a request
//! header ends at its first empty line; a response (any write but a `1xx`) ends the request, so
//! the next read starts the idle wait again. When a deadline passes, the read fails (or ends,
//! when no byte of a request came) and pingora closes the connection. Bodies are bounded by
//! `request_body_timeout` and writes by `response_write_timeout` elsewhere; HTTP/2 connections
//! are left alone.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The two limits, from the `server` section.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From the first byte of a request header to its end.
    pub header: Duration,
    /// From the connection's start, or the end of the previous response, to the next
    /// request's first byte.
    pub idle: Duration,
}

/// The HTTP app behind the proxy listeners, serving each HTTP/1 connection through a
/// [`DeadlineStream`].
pub struct ConnDeadlines<A> {
    pub inner: Arc<A>,
    pub limits: Limits,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ConnDeadlines<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.inner.process_new(stream, shutdown).await;
        }
        let stream: Stream = Box::new(DeadlineStream::new(stream, self.limits));
        let mut next = self.inner.process_new(stream, shutdown).await;
        while let Some(s) = next {
            next = self.inner.process_new(s, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Where the connection is in its current request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request header: `started` is when its first byte came (`None`: idle).
    Header { started: Option<Instant> },
    /// The header ended; `responded` once a final response was written.
    Request { responded: bool },
}

/// A client connection with the idle and header deadlines (see the module documentation).
pub struct DeadlineStream {
    inner: Stream,
    limits: Limits,
    phase: Phase,
    /// Idle since (connection start or end of the previous response).
    idle_since: Instant,
    /// Line-end scanner: whether the header's current line is empty so far (`\r` ignored),
    /// and whether any byte of the header other than a line end came.
    line_empty: bool,
    content: bool,
    timer: Pin<Box<Sleep>>,
}

impl fmt::Debug for DeadlineStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineStream")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish()
    }
}

impl DeadlineStream {
    pub fn new(inner: Stream, limits: Limits) -> DeadlineStream {
        let now = Instant::now();
        DeadlineStream {
            inner,
            limits,
            phase: Phase::Header { started: None },
            idle_since: now,
            line_empty: true,
            content: false,
            timer: Box::pin(tokio::time::sleep_until(now + limits.idle)),
        }
    }

    fn wait_for_header(&mut self) {
        self.phase = Phase::Header { started: None };
        self.idle_since = Instant::now();
        self.line_empty = true;
        self.content = false;
    }

    /// Feeds bytes of a request header; true at its end (an empty line after some content:
    /// empty lines before a request line are skipped by the parser, so they do not end it).
    fn scan(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            match b {
                b'\n' => {
                    if self.line_empty && self.content {
                        return true;
                    }
                    self.line_empty = true;
                }
                b'\r' => {}
                _ => {
                    self.line_empty = false;
                    self.content = true;
                }
            }
        }
        false
    }

    /// The deadline in force while waiting for (the rest of) a header.
    fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Header { started: None } => Some(self.idle_since + self.limits.idle),
            Phase::Header { started: Some(t) } => Some(t + self.limits.header),
            Phase::Request { .. } => None,
        }
    }
}

/// Whether `buf` starts an informational (`1xx`) response, e.g. `100 Continue`: the request
/// goes on after it.
fn informational(buf: &[u8]) -> bool {
    buf.len() > 9 && buf.starts_with(b"HTTP/1.") && buf[9] == b'1'
}

impl AsyncRead for DeadlineStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.phase == (Phase::Request { responded: true }) {
            this.wait_for_header();
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Phase::Header { started } = this.phase {
                    let new = &buf.filled()[before..];
                    if !new.is_empty() {
                        let started = started.unwrap_or_else(Instant::now);
                        this.phase = if this.scan(new) {
                            Phase::Request { responded: false }
                        } else {
                            Phase::Header {
                                started: Some(started),
                            }
                        };
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some(deadline) = this.deadline() else {
                    return Poll::Pending;
                };
                if this.timer.deadline() != deadline {
                    this.timer.as_mut().reset(deadline);
                }
                if this.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                match this.phase {
                    Phase::Header { started: None } => {
                        tracing::debug!("client connection idle past server.idle_timeout");
                        // An end of stream: nothing of a request was lost.
                        Poll::Ready(Ok(()))
                    }
                    _ => {
                        tracing::debug!(
                            "request header not complete within server.header_read_timeout"
                        );
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request header not complete within server.header_read_timeout",
                        )))
                    }
                }
            }
        }
    }
}

impl AsyncWrite for DeadlineStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 && !informational(buf) {
                this.phase = match this.phase {
                    // An answer before the header ended (a 400 for a malformed one): the
                    // connection closes after it; the next read waits for a header anyway.
                    Phase::Header { .. } | Phase::Request { .. } => {
                        Phase::Request { responded: true }
                    }
                };
            }
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs.iter().find(|b| !b.is_empty()).map(|b| &b[..]);
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 && !first.is_some_and(informational) {
                this.phase = Phase::Request { responded: true };
            }
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for DeadlineStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for DeadlineStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for DeadlineStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for DeadlineStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for DeadlineStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for DeadlineStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for DeadlineStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits {
        header: Duration::from_millis(300),
        idle: Duration::from_millis(600),
    };

    fn pair() -> (DeadlineStream, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(4096);
        (DeadlineStream::new(Box::new(ours), LIMITS), theirs)
    }

    #[test]
    fn a_header_ends_at_its_first_empty_line_after_content() {
        let (ours, _) = tokio::io::duplex(1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let mut s = DeadlineStream::new(Box::new(ours), LIMITS);
        assert!(!s.scan(b"\r\n\r\n"), "empty lines before a request line");
        assert!(!s.scan(b"GET / HTTP/1.1\r\nHost: x\r"));
        assert!(s.scan(b"\n\r\n"));
        s.wait_for_header();
        assert!(s.scan(b"GET / HTTP/1.1\nHost: x\n\n"), "bare line feeds");
        assert!(informational(b"HTTP/1.1 100 Continue\r\n\r\n"));
        assert!(!informational(b"HTTP/1.1 200 OK\r\n"));
    }

    #[tokio::test]
    async fn a_slow_header_fails_at_the_header_deadline() {
        let (mut s, mut client) = pair();
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let reader = tokio::spawn(async move {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.kind()),
                }
            }
        });
        for b in b"GET / HTTP/1.1\r\n" {
            if client.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(reader.await.unwrap(), Err(io::ErrorKind::TimedOut));
        let took = started.elapsed();
        assert!(
            took >= LIMITS.header && took < LIMITS.header + Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn an_idle_connection_ends_at_the_idle_deadline() {
        let (mut s, _client) = pair();
        let started = Instant::now();
        assert_eq!(s.read(&mut [0u8; 64]).await.unwrap(), 0);
        assert!(started.elapsed() >= LIMITS.idle);
    }

    #[tokio::test]
    async fn a_body_is_not_cut_by_the_header_deadline_but_the_wait_after_a_response_is() {
        let (mut s, mut client) = pair();
        let mut buf = [0u8; 64];
        client.write_all(b"POST / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 19);
        tokio::time::sleep(LIMITS.idle * 2).await;
        client.write_all(b"body").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 4);
        s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
        tokio::time::sleep(LIMITS.idle * 2).await;
        client.write_all(b"more").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 4, "still the request");
        s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        let idle = Instant::now();
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        assert!(idle.elapsed() >= LIMITS.idle);
    }
}
