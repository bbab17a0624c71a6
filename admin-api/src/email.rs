//! Outgoing mail: verification links, password reset links, and the "you already have an
//! account" notice. SMTP in production; by default each message is written as an `.eml` file
//! into a folder (development and tests read tokens from there). Sending happens in the
//! background, so a response never reveals (by timing) whether a mail was sent.
//!
//! The mail folder holds sign-in links and reset tokens: it is created owner-only (0700) and
//! each `.eml` file is created 0600, whatever the process umask.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lettre::message::{header::ContentType, Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{
    Certificate, CertificateStore, Identity, Tls, TlsParameters,
};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use crate::config::{EmailConfig, EmailTransport};

#[derive(Clone)]
pub struct Mailer {
    from: Mailbox,
    transport: Arc<Transport>,
}

enum Transport {
    /// The mail folder.
    File(PathBuf),
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
                create_private_dir(dir)
                    .map_err(|e| format!("email.transport.dir {}: {e}", dir.display()))?;
                Transport::File(dir.clone())
            }
            EmailTransport::Smtp {
                host,
                port,
                security,
                username,
                password_env,
                tls,
            } => {
                let tls_parameters =
                    || smtp_tls(host, tls).map_err(|e| format!("email.transport.tls: {e}"));
                let (builder, default_port) = match security.as_str() {
                    "tls" => (
                        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                            .tls(Tls::Wrapper(tls_parameters()?)),
                        465,
                    ),
                    "starttls" => (
                        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                            .tls(Tls::Required(tls_parameters()?)),
                        587,
                    ),
                    _ => (
                        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host),
                        25,
                    ),
                };
                let builder = builder.port(port.unwrap_or(default_port));
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
                Transport::File(dir) => write_eml(dir, &message).await.map_err(|e| e.to_string()),
                Transport::Smtp(t) => t.send(message).await.map(|_| ()).map_err(|e| e.to_string()),
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, subject, "email not sent");
            }
        });
    }
}

/// TLS for the relay `host` (verified: certificate chain and name, TLS 1.2+), trusting
/// `tls.ca_file` (else the system's roots) and presenting `tls.client_cert_file` when asked.
fn smtp_tls(host: &str, tls: &aihub_net::tls::ClientTls) -> Result<TlsParameters, String> {
    let material = tls.load().map_err(|e| e.to_string())?;
    let mut b = TlsParameters::builder(host.to_owned());
    if !material.roots_pem.is_empty() {
        b = b.certificate_store(CertificateStore::None);
    }
    for pem in &material.roots_pem {
        b = b.add_root_certificate(Certificate::from_pem(pem).map_err(|e| e.to_string())?);
    }
    if let Some((cert, key)) = &material.identity_pem {
        b = b.identify_with(Identity::from_pem(cert, key).map_err(|e| e.to_string())?);
    }
    b.build_native().map_err(|e| e.to_string())
}

/// Creates `dir` (and missing parents) with mode 0700. A folder that already exists keeps its
/// mode; one that others may read is reported.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", mode & 0o777),
            "the mail folder is open to other users; its mails hold sign-in tokens (chmod 700 it)"
        );
    }
    Ok(())
}

/// Writes `message` as `<uuid>.eml` into `dir`, created with mode 0600.
async fn write_eml(dir: &Path, message: &Message) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let path = dir.join(format!("{}.eml", uuid::Uuid::now_v7()));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .await?;
    file.write_all(&message.formatted()).await?;
    file.flush().await
}
