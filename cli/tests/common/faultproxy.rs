//! A TCP proxy for fault tests: forwards loopback connections to a target that can be switched
//! (a "virtual IP" in front of a failover pair), delays the first byte of each answer (the first
//! chunk the target sends after the client sent something: a server answering slowly), or holds
//! everything the target sends (a stalled link). Runs on the test's tokio runtime.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Shared {
    target: Mutex<SocketAddr>,
    delay_ms: AtomicU64,
    /// Hold everything the target sends (nothing reaches the clients while set).
    hold: AtomicBool,
    connections: AtomicU64,
    conns: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// A running proxy; stops (and cuts its connections) on drop.
pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            delay_ms: AtomicU64::new(0),
            hold: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::Relaxed);
                let target = *s.target.lock().unwrap();
                let s2 = s.clone();
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return; // dropping `client` closes it: a refused connection
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let asked = Arc::new(AtomicBool::new(false));
                    let up = pump(cr, sw, asked.clone(), None);
                    let down = pump(sr, cw, asked, Some(s2));
                    // Each direction passes its end on (a shutdown); a dead server resets both.
                    tokio::join!(up, down);
                });
                let mut conns = s.conns.lock().unwrap();
                conns.retain(|h| !h.is_finished());
                conns.push(task.abort_handle());
            }
        });
        FaultProxy {
            addr,
            shared,
            accept,
        }
    }

    /// Delay added before the first chunk of each answer.
    pub fn set_delay(&self, d: Duration) {
        self.shared
            .delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Holds (`true`) or releases what the target sends: a stalled link (e.g. a replication
    /// stream that stops arriving; [`FaultProxy::cut`] then discards what was held).
    pub fn hold(&self, on: bool) {
        self.shared.hold.store(on, Ordering::Relaxed);
    }

    /// New connections go to `target` from now on.
    pub fn set_target(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap() = target;
    }

    /// Closes every open connection (both sides), as a failed-over address does.
    pub fn cut(&self) {
        for h in self.shared.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Copies `from` to `to`. The client side (`delay` none) marks `asked`; the server side (`delay`
/// set) holds the first chunk after each mark for the delay.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    asked: Arc<AtomicBool>,
    delay: Option<Arc<Shared>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match &delay {
            None => asked.store(true, Ordering::Relaxed),
            Some(s) if asked.swap(false, Ordering::Relaxed) => {
                let ms = s.delay_ms.load(Ordering::Relaxed);
                if ms > 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
            Some(_) => {}
        }
        if let Some(s) = &delay {
            while s.hold.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
