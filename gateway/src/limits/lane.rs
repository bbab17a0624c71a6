//! The request path's calls to Redis, sent in batches.
//!
//! A request queues its script call and waits for the answer; the lane's task, on the runtime
//! that serves the requests, wakes on the first call of a batch, lets the other requests that
//! are ready run first (one `yield_now`, so every request reaching its admission in the same
//! scheduler round joins), then sends everything queued as one pipeline: one write and one read
//! for the whole batch instead of one each per request. At a trickle a batch is one call and
//! the wait is one scheduler round (microseconds). Several batches may be in flight at once
//! (the connection is multiplexed), each bounded by the timeout; an error answer (`NOSCRIPT`)
//! is that call's alone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::{Cmd, Value};
use tokio::sync::{oneshot, Notify};

/// Why a call got no answer.
#[derive(Debug, Clone)]
pub enum Failed {
    Timeout,
    /// The connection failed (or the lane closed): its error.
    Connection(Arc<str>),
}

/// A call's answer: Redis' reply (an error reply is a [`Value::ServerError`]).
type Answer = Result<Value, Failed>;

struct Call {
    cmd: Cmd,
    reply: oneshot::Sender<Answer>,
}

/// Calls waiting for the lane's task.
pub struct Lane {
    queue: Mutex<Vec<Call>>,
    wake: Notify,
    closed: AtomicBool,
}

impl Lane {
    /// A lane and its task's future (to spawn on the requests' runtime).
    pub fn start(
        conn: MultiplexedConnection,
        timeout: Duration,
    ) -> (
        Arc<Lane>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let lane = Arc::new(Lane {
            queue: Mutex::new(Vec::with_capacity(64)),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let task = run(Arc::clone(&lane), conn, timeout);
        (lane, task)
    }

    /// Queues a call; the answer arrives on the receiver (a dropped sender: the lane failed).
    pub fn call(&self, cmd: Cmd) -> oneshot::Receiver<Answer> {
        let (reply, rx) = oneshot::channel();
        let first = {
            let mut q = self.queue.lock().expect("lane queue");
            q.push(Call { cmd, reply });
            q.len() == 1
        };
        if first {
            self.wake.notify_one();
        }
        rx
    }

    /// Ends the lane once what is queued and in flight is answered (a new connection replaces
    /// it).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

async fn run(lane: Arc<Lane>, conn: MultiplexedConnection, timeout: Duration) {
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
            _ = lane.wake.notified() => {}
        }
        // The requests ready in this scheduler round queue their calls first.
        tokio::task::yield_now().await;
        let batch = std::mem::take(&mut *lane.queue.lock().expect("lane queue"));
        if !batch.is_empty() {
            in_flight.push(send(conn.clone(), batch, timeout));
        }
        if lane.closed.load(Ordering::Relaxed) {
            while in_flight.next().await.is_some() {}
            return;
        }
    }
}

/// Sends one batch as a pipeline and hands each call its answer.
async fn send(mut conn: MultiplexedConnection, batch: Vec<Call>, timeout: Duration) {
    let mut pipe = redis::pipe();
    let mut replies = Vec::with_capacity(batch.len());
    for c in batch {
        pipe.add_command(c.cmd);
        replies.push(c.reply);
    }
    let n = replies.len();
    let sent = tokio::time::timeout(timeout, conn.send_packed_commands(&pipe, 0, n)).await;
    match sent {
        Ok(Ok(values)) if values.len() == n => {
            for (reply, v) in replies.into_iter().zip(values) {
                let _ = reply.send(Ok(v));
            }
        }
        failed => {
            let why = match failed {
                Err(_) => Failed::Timeout,
                Ok(Err(e)) => Failed::Connection(e.to_string().into()),
                Ok(Ok(_)) => Failed::Connection("a short pipeline reply".into()),
            };
            for reply in replies {
                let _ = reply.send(Err(why.clone()));
            }
        }
    }
}
