//! SSE streaming ([`ChannelBody`]), and the faults that break a successful answer on purpose.
//!
//! - [`Fault`]: which fault a request gets — `x-mock-reset-after-headers: 1` or
//!   `x-mock-close-after-events: N` on the request, else the server's `--reset-after-headers` /
//!   `--close-after-events N` (`x-mock-reset-after-headers: 0` turns the server's off).
//! - `apply`: turns a 200 answer into a broken one. A JSON (or audio) answer sends its header
//!   and then aborts before any body byte, whatever the fault; an SSE stream sends its first N
//!   events (none for reset-after-headers) and then aborts, so neither `[DONE]` nor the
//!   terminating chunk arrives (when the stream has N events or fewer, all of them are sent,
//!   and the connection is still aborted). Error answers are sent as they are.
//! - [`ChannelBody`]: a body fed by a channel (the SSE events `sse` renders, paced by a task),
//!   which can end by aborting.
//!
//! An abort is a body error: hyper then drops the connection without finishing the message
//! (and, over TLS, without `close_notify`), so the client sees a truncated response, not a
//! clean end. The body fails 20 ms after its last frame: meanwhile hyper flushes the header and
//! the events written (failing at once would drop them from its write buffer with the
//! connection), and the client reads them before it sees the break, as when a real upstream
//! dies mid-answer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Either;
use hyper::body::{Body, Frame};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::{hv, MockBody};

/// A way to break a successful answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Send the header, then abort before any body byte.
    ResetAfterHeaders,
    /// Send the first N SSE events, then abort (a JSON answer: the header, then abort).
    CloseAfterEvents(usize),
}

impl Fault {
    /// The fault the request's headers ask for, else the server's.
    pub(crate) fn of(server: Option<Fault>, headers: &HeaderMap) -> Option<Fault> {
        let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let reset = value("x-mock-reset-after-headers").map(|v| v.trim() != "0");
        let close = value("x-mock-close-after-events").and_then(|v| v.trim().parse().ok());
        match (reset, close) {
            (Some(true), _) => Some(Fault::ResetAfterHeaders),
            (_, Some(n)) => Some(Fault::CloseAfterEvents(n)),
            (Some(false), None) => None,
            (None, None) => server,
        }
    }

    /// SSE events sent before the abort.
    fn events(self) -> usize {
        match self {
            Fault::ResetAfterHeaders => 0,
            Fault::CloseAfterEvents(n) => n,
        }
    }
}

/// Breaks `resp` as `fault` says when it is a 200; other answers are returned unchanged.
/// `x-mock-body-sha256` is removed: the body is deliberately not what it announces.
pub(crate) fn apply(resp: Response<MockBody>, fault: Fault, pause: Duration) -> Response<MockBody> {
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove("x-mock-body-sha256");
    let body = match body {
        Either::Left(_) => ChannelBody::aborting(None, 0, pause),
        Either::Right(stream) => ChannelBody::aborting(stream.rx, fault.events(), pause),
    };
    Response::from_parts(parts, Either::Right(body))
}

/// Streams pre-rendered SSE events, `interval` apart; `x-mock-body-sha256` covers them all.
pub(crate) fn sse(events: Vec<Bytes>, interval: Duration) -> Response<MockBody> {
    let mut hasher = Sha256::new();
    for e in &events {
        hasher.update(e);
    }
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        for (i, e) in events.into_iter().enumerate() {
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            if tx.send(e).await.is_err() {
                return; // client went away
            }
        }
    });
    let mut r = Response::new(Either::Right(ChannelBody::new(rx)));
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    h.insert("x-mock-body-sha256", hv(&hex::encode(hasher.finalize())));
    r
}

/// How long a broken answer stays open after its last byte before the abort, unless the
/// request's `x-mock-abort-pause-ms` says otherwise: hyper flushes meanwhile, and the client
/// reads what was sent before it sees the connection break (a short pause sends the last
/// bytes and the break together).
pub(crate) const ABORT_PAUSE: Duration = Duration::from_millis(20);

/// The error that aborts a broken answer's connection.
#[derive(Debug)]
pub struct Aborted;

impl fmt::Display for Aborted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection aborted on purpose (mock fault)")
    }
}

impl std::error::Error for Aborted {}

/// A response body fed by a channel, one frame per message; with an abort set, it fails after
/// that many frames (or when the channel ends first) instead of ending.
pub struct ChannelBody {
    rx: Option<mpsc::Receiver<Bytes>>,
    abort: Option<Abort>,
}

struct Abort {
    /// Frames still to pass before the abort.
    left: usize,
    /// How long to pause before the abort.
    length: Duration,
    /// The pause before the abort, once the frames have passed.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ChannelBody {
    /// A body that ends when the channel does.
    pub(crate) fn new(rx: mpsc::Receiver<Bytes>) -> ChannelBody {
        ChannelBody {
            rx: Some(rx),
            abort: None,
        }
    }

    fn aborting(rx: Option<mpsc::Receiver<Bytes>>, after: usize, pause: Duration) -> ChannelBody {
        ChannelBody {
            rx,
            abort: Some(Abort {
                left: after,
                length: pause,
                pause: None,
            }),
        }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Aborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Aborted>>> {
        let this = self.get_mut();
        let Some(abort) = &mut this.abort else {
            return match &mut this.rx {
                Some(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
                None => Poll::Ready(None),
            };
        };
        if abort.left > 0 {
            if let Some(rx) = &mut this.rx {
                if let Some(b) = ready!(rx.poll_recv(cx)) {
                    abort.left -= 1;
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
            }
        }
        this.rx = None; // the producer stops at its next send
        let pause = abort
            .pause
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(abort.length)));
        ready!(pause.as_mut().poll(cx));
        Poll::Ready(Some(Err(Aborted)))
    }
}
