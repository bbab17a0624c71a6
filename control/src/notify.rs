//! Tells gateways that keys changed, through Redis pub/sub (`PUBLISH aihub:keys:changed`), so
//! they poll the change feed at once instead of at their next tick. Best effort: the feed in the
//! database is the truth and gateways poll it anyway; a Redis outage only slows propagation to
//! the poll interval. Requests never wait on Redis: they nudge a background task.

use tokio::sync::Notify;

use std::sync::Arc;
use std::time::Duration;

use aihub_store::feed::REDIS_CHANNEL;

#[derive(Clone, Default)]
pub struct Notifier {
    nudge: Option<Arc<Notify>>,
}

impl Notifier {
    /// Without Redis: nudges do nothing.
    pub fn disabled() -> Notifier {
        Notifier { nudge: None }
    }

    /// Starts the publisher task for `redis`.
    pub fn redis(client: aihub_net::redis::RedisTarget) -> Notifier {
        let nudge = Arc::new(Notify::new());
        let wakeups = Arc::clone(&nudge);
        tokio::spawn(async move {
            let mut conn: Option<redis::aio::MultiplexedConnection> = None;
            let mut failing = false;
            loop {
                wakeups.notified().await;
                // Nudges arriving while we publish coalesce into the next round.
                for attempt in 0..3 {
                    if conn.is_none() {
                        conn = client.multiplexed().await.ok();
                    }
                    let Some(c) = conn.as_mut() else {
                        tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                        continue;
                    };
                    let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                        .arg(REDIS_CHANNEL)
                        .arg("1")
                        .query_async(c)
                        .await;
                    match sent {
                        Ok(_) => {
                            if failing {
                                tracing::info!("redis reachable again: key changes are pushed");
                                failing = false;
                            }
                            break;
                        }
                        Err(e) => {
                            if !failing {
                                tracing::warn!(error = %e, "redis publish failed: gateways fall back to polling");
                                failing = true;
                            }
                            conn = None;
                        }
                    }
                }
            }
        });
        Notifier { nudge: Some(nudge) }
    }

    /// Call after a transaction that changed keys committed.
    pub fn keys_changed(&self) {
        if let Some(n) = &self.nudge {
            n.notify_one();
        }
    }
}
