//! Outgoing mail: verification links, password reset links, and the "you already have an
//! account" notice. SMTP in production; by default each message is written as an `.eml` file
//! into a folder (development and tests read tokens from there). Sending happens in the
//! background, so a response never reveals (by timing) whether a mail was sent.

use std::sync::Arc;

use lettre::message::{header::ContentType, Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use crate::config::{EmailConfig, EmailTransport};

#[derive(Clone)]
pub struct Mailer {
    from: Mailbox,
    transport: Arc<Transport>,
}

enum Transport {
    File(AsyncFileTransport<Tokio1Executor>),
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
}

impl Mailer {
    pub fn new(config: &EmailConfig) -> Result<Mailer, String> {
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|e| format!("email.from: {e}"))?;
        let transport = match &config.transport {
            EmailTransport::File { dir } => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("email.transport.dir {}: {e}", dir.display()))?;
                Transport::File(AsyncFileTransport::new(dir))
            }
            EmailTransport::Smtp {
                host,
                port,
                security,
                username,
                password_env,
            } => {
                let builder = match security.as_str() {
                    "tls" => AsyncSmtpTransport::<Tokio1Executor>::relay(host),
                    "starttls" => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host),
                    _ => Ok(AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(
                        host,
                    )),
                }
                .map_err(|e| format!("email.transport.host: {e}"))?
                .port(*port);
                let builder = match (username, password_env) {
                    (Some(user), Some(env)) => {
                        let password = std::env::var(env).map_err(|_| {
                            format!("email.transport.password_env: ${env} is not set")
                        })?;
                        builder.credentials(Credentials::new(user.clone(), password))
                    }
                    _ => builder,
                };
                Transport::Smtp(builder.build())
            }
        };
        Ok(Mailer {
            from,
            transport: Arc::new(transport),
        })
    }

    /// Queues a plain-text message; failures are logged (without the body, which may hold a
    /// token), never returned.
    pub fn send(&self, to: &str, subject: &str, body: String) {
        let to: Mailbox = match to.parse() {
            Ok(to) => to,
            Err(e) => {
                tracing::warn!(error = %e, "cannot send email: bad recipient");
                return;
            }
        };
        let message = match Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body)
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build email");
                return;
            }
        };
        let transport = Arc::clone(&self.transport);
        let subject = subject.to_owned();
        tokio::spawn(async move {
            let result = match &*transport {
                Transport::File(t) => t.send(message).await.map(|_| ()).map_err(|e| e.to_string()),
                Transport::Smtp(t) => t.send(message).await.map(|_| ()).map_err(|e| e.to_string()),
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, subject, "email not sent");
            }
        });
    }
}
