//! Serving the admin API: the accept loop, HTTP/1.1 connections (past the listener's front:
//! PROXY header, TLS, see `listener`) with a header read deadline, and graceful shutdown.
//!
//! `axum::serve` offers no deadline for reading a request header, so a client sending its
//! header one byte at a time (or nothing at all) would hold a connection and its task forever.
//! Here every connection is served by hyper with `header_read_timeout`: a connection that has
//! not delivered a complete request header within it (counted from the connection's start, or
//! from the end of the previous response on a kept-alive connection) is closed. The body's
//! deadline is [`crate::http::read_body`]'s, inside the router. Writes to the client must make
//! progress within `response_write_timeout` ([`WriteDeadline`]): a client that stops reading
//! (say, in the middle of a CSV export holding a ClickHouse cursor) is disconnected.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::Service;

use crate::listener::{Front, Io};

/// Serves `router` on `listener` until `shutdown` resolves; then stops accepting, lets
/// in-flight requests finish and returns when every connection has closed. Each connection
/// first passes `front` (PROXY header, TLS handshake, within the header deadline); handlers see
/// the client's address (after trusted proxies) as `ConnectInfo<SocketAddr>`.
pub async fn serve_router(
    listener: TcpListener,
    front: Front,
    router: Router,
    deadlines: Deadlines,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // Every connection task holds a receiver; the loop's end waits for all of them to drop.
    let (open_tx, open_rx) = watch::channel(());
    let mut stop = stop_rx.clone();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let stop = stop_rx.clone();
        let open = open_rx.clone();
        let front = front.clone();
        tokio::spawn(async move {
            if let Some((io, peer)) = front.open(stream, peer, deadlines.header_read).await {
                let connection = Connection {
                    router,
                    front,
                    peer,
                    deadlines,
                    stop,
                };
                match io {
                    Io::Plain(s) => connection.serve(s).await,
                    Io::Tls(s) => connection.serve(s).await,
                }
            }
            drop(open);
        });
    }
    drop(open_rx);
    drop(listener);
    open_tx.closed().await;
    Ok(())
}

/// One accepted connection, past its front.
struct Connection {
    router: Router,
    front: Front,
    /// The TCP peer, or the client a trusted PROXY header named.
    peer: SocketAddr,
    deadlines: Deadlines,
    stop: watch::Receiver<bool>,
}

impl Connection {
    /// HTTP/1.1 with the header-read and write deadlines until the client closes, a deadline
    /// passes or shutdown (in-flight requests finish).
    async fn serve<S>(mut self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (router, front, peer) = (self.router, self.front, self.peer);
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let client = front.client(peer, req.headers());
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo(client));
            router.clone().call(req)
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.deadlines.header_read);
        let stream = WriteDeadline::new(stream, self.deadlines.response_write);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = stopped(&mut self.stop) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "admin connection ended with an error");
        }
    }
}

/// The connection deadlines of the admin listener (`server` section of the admin config).
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// A whole request header must arrive within this.
    pub header_read: Duration,
    /// Every write to the client must make progress within this.
    pub response_write: Duration,
}

/// A connection whose writes must make progress within a deadline: a write that stays blocked
/// (the client's receive window closed) for `limit` fails with `TimedOut`, which ends the
/// connection. Reads pass through.
pub struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Armed when a write is blocked; cleared once one makes progress.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            timer: None,
        }
    }

    /// Called when a write is blocked: `Pending` until the deadline, then `TimedOut`.
    fn blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading the response",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<T>(&mut self, result: io::Result<T>) -> Poll<io::Result<T>> {
        self.timer = None;
        Poll::Ready(result)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => this.progressed(r),
            Poll::Pending => this.blocked(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => this.progressed(r),
            Poll::Pending => this.blocked(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(r) => this.progressed(r),
            Poll::Pending => this.blocked(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Resolves once shutdown has been signalled.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A failed `accept`: a connection that died before it was accepted is skipped; anything
/// else (e.g. out of file descriptors) is logged and waited out, as axum does.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "admin listener: accept failed; retrying in 1s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
