//! What the webhook engine reports, turned into email: a usage alert (80 % / 100 % of the
//! monthly quota) mails the developer, as does an endpoint the engine disabled. Mail is sent
//! in the background and never blocks the engine; the events themselves are delivered to
//! webhooks and kept in the event history whatever happens to the mail.

use aihub_store::outbox::API_USAGE_ALERT;
use aihub_store::{developers, Store};
use aihub_webhooks::Notice;
use tokio::sync::mpsc::Receiver;

use crate::email::Mailer;

/// Where notices go: the store (the developers' addresses), the mailer, the portal's URL.
pub struct Mail {
    pub store: Store,
    pub mailer: Mailer,
    pub public_url: String,
    /// Told when events were fanned out (the portal's event streams).
    pub ticks: tokio::sync::broadcast::Sender<()>,
}

/// Runs until the engine stops (its sender dropped).
pub async fn run(s: Mail, mut notices: Receiver<Notice>) {
    let portal = s.public_url.trim_end_matches('/').to_owned();
    while let Some(n) = notices.recv().await {
        match n {
            Notice::Events(events) => {
                let _ = s.ticks.send(());
                for e in events.iter().filter(|e| e.event_type == API_USAGE_ALERT) {
                    let Some(dev) = &e.developer_id else { continue };
                    let d = &e.payload["data"];
                    let (pct, used, quota, period) = (
                        d["threshold_percent"].as_i64().unwrap_or(0),
                        d["used_tokens"].as_i64().unwrap_or(0),
                        d["quota_tokens"].as_i64().unwrap_or(0),
                        d["period"].as_str().unwrap_or(""),
                    );
                    let subject = format!("AI Hub: {pct}% of your monthly quota used");
                    let body = format!(
                        "Your usage for {period} has reached {pct}% of your monthly quota: \
                         {used} of {quota} tokens.\n\n\
                         See your usage: {portal}/portal\n"
                    );
                    mail(&s, dev, &subject, body).await;
                }
            }
            Notice::Disabled(d) => {
                let subject = "AI Hub: a webhook endpoint was disabled".to_owned();
                let body = format!(
                    "Your webhook endpoint {} ({}) was disabled: {}.\n\n\
                     Fix the receiver, then enable it again and redeliver what it missed: {portal}/portal/webhooks\n",
                    d.endpoint.url,
                    d.endpoint.id,
                    d.reason,
                );
                mail(&s, &d.endpoint.developer_id, &subject, body).await;
            }
        }
    }
}

async fn mail(s: &Mail, developer_id: &str, subject: &str, body: String) {
    match developers::by_id(&s.store, developer_id).await {
        Ok(dev) if dev.disabled_at.is_none() => s.mailer.send(&dev.email, subject, body),
        Ok(_) => {}
        Err(e) => tracing::warn!(developer_id, error = %e, "cannot mail a notice"),
    }
}
