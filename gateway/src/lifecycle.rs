//! How a gateway process ends and hands over: draining on SIGTERM, and the zero-downtime
//! upgrade (`aihub gateway --upgrade`).
//!
//! **Drain.** SIGTERM turns `/readyz` to 503 at once and every response from then on closes its
//! connection (`Connection: close`: clients reconnect elsewhere rather than reuse a connection
//! this process will close), keeps serving for `server.drain_delay`
//! (time for load balancers to notice), then stops accepting; requests in flight, streams
//! included, finish within `server.shutdown_grace_period`. The process exits as soon as none is
//! in flight and every usage record is in ClickHouse, or when the grace period ends (records not
//! yet delivered stay in the WAL for the next start). SIGINT stops at once.
//!
//! **Upgrade.** The new process, started with `--upgrade`, reads the old one's pid from
//! `server.pid_file`, listens on `server.upgrade_sock` and sends the old process SIGQUIT: the
//! old process passes its listening sockets over that socket (pingora's hand-off), stops
//! accepting 5 s later and drains as above. Both share the WAL folder safely (each writes into
//! its own locked subfolder; the new process adopts what the old leaves). Not carried over:
//! local limiter state (buckets restart full) and the admin API of `aihub serve`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora_core::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

use crate::context::{set_ready, Shared};

/// Turns signals into pingora's shutdown kinds, marking the gateway not ready first.
pub struct Signals {
    pub shared: Arc<Shared>,
    pub drain_delay: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = quit.recv() => {
                tracing::info!("SIGQUIT: handing the listeners to the new process, then draining");
                set_ready(&self.shared, false);
                self.shared.draining.store(true, Ordering::Relaxed);
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => {
                set_ready(&self.shared, false);
                self.shared.draining.store(true, Ordering::Relaxed);
                tracing::info!(drain_delay = ?self.drain_delay, "SIGTERM: not ready; draining");
                tokio::time::sleep(self.drain_delay).await;
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping now");
                ShutdownSignal::FastShutdown
            }
        }
    }
}

/// Ends the process early once a graceful shutdown has nothing left to do: pingora would
/// otherwise sleep through the whole grace period even when idle.
pub struct EarlyExit {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for EarlyExit {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let started = std::time::Instant::now();
        let mut quiet = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let idle = self.shared.metrics.in_flight.get() == 0
                && self.shared.usage.as_ref().is_none_or(|u| u.delivered());
            quiet = if idle { quiet + 1 } else { 0 };
            // Idle for 100 ms: pending limit settles (every 10 ms) have gone out too.
            if quiet >= 5 {
                tracing::info!(after = ?started.elapsed(), "drained: nothing in flight, usage delivered; exiting");
                // The log writer hands its buffer to stderr every 50 ms.
                tokio::time::sleep(Duration::from_millis(120)).await;
                std::process::exit(0);
            }
        }
    }
}

/// Writes this process's pid to `path` (atomically: a reader sees the old or the new pid).
pub fn write_pid_file(path: &Path) -> std::io::Result<()> {
    let tmp = path.with_extension("pid.tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}

/// For `--upgrade`: the old process's pid from `pid_file`, checked alive.
pub fn old_process(pid_file: &Path) -> Result<rustix::process::Pid, String> {
    let text = std::fs::read_to_string(pid_file)
        .map_err(|e| format!("--upgrade: cannot read {}: {e}", pid_file.display()))?;
    let pid = text
        .trim()
        .parse::<i32>()
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| format!("--upgrade: {} holds no pid", pid_file.display()))?;
    rustix::process::test_kill_process(pid).map_err(|e| {
        format!(
            "--upgrade: the gateway {} is not running: {e}",
            pid.as_raw_nonzero()
        )
    })?;
    Ok(pid)
}

/// For `--upgrade`: once this process listens on `sock` (pingora's bootstrap binds it and
/// waits for the sockets), asks `old` to send them (SIGQUIT). A stale socket file is removed
/// first so its appearance means we are listening.
pub fn ask_for_listeners(old: rustix::process::Pid, sock: PathBuf) {
    let _ = std::fs::remove_file(&sock);
    std::thread::spawn(move || {
        for _ in 0..500 {
            if sock.exists() {
                // Bound; `listen` follows at once, and the old process retries its connect.
                std::thread::sleep(Duration::from_millis(50));
                match rustix::process::kill_process(old, rustix::process::Signal::QUIT) {
                    Ok(()) => tracing::info!(
                        old = old.as_raw_nonzero(),
                        "asked the running gateway for its listeners"
                    ),
                    Err(e) => tracing::error!(error = %e, "cannot signal the running gateway"),
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::error!(sock = %sock.display(), "the upgrade socket never appeared");
    });
}
