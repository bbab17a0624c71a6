//! `aihub`: the one binary of AI Hub Gateway.
//!
//! - `aihub gateway --config FILE [--check-config]` runs (or only checks) the gateway.
//! - `aihub admin --config FILE` runs the admin API (control plane).
//! - `aihub serve` runs the gateway and the admin API in one process (the embedded default).
//! - `aihub migrate` creates or updates the ClickHouse and control-plane schemas.
//! - `aihub billing reconcile --period YYYY-MM` re-computes every invoice from the raw usage
//!   records and exits non-zero on a mismatch; `aihub billing generate` creates invoices now.
//! - `aihub keys generate …` prints a new API key and the YAML entry holding its hash.
//! - `aihub keys hash` reads a key on stdin and prints its hash (format checked first).
//! - `aihub keys list|create|revoke …` manage keys in the control-plane database (operators).
//! - `aihub tasks list|show|cancel …` operators' view of async tasks and OpenAI batches.
//! - `aihub mock-upstream …` runs the mock OpenAI-compatible upstream used by tests and load tests.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

mod billing;
mod control;
mod logwriter;
mod tasks;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};

/// glibc's allocator took ~12 % of the gateway's CPU per request; mimalloc's thread-local free
/// lists cut CPU per request by 9-14 % (docs/design/gateway-profile.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "aihub", version, about = "AI Hub Gateway")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "AIHUB_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the data plane).
    Gateway {
        /// Configuration file.
        #[arg(long, short, default_value = "config/gateway.yaml")]
        config: PathBuf,
        /// Validate the configuration and exit (non-zero on error).
        #[arg(long)]
        check_config: bool,
        /// Zero-downtime upgrade: take over the listening sockets of the gateway running with
        /// this configuration (its `server.pid_file`), which then drains and exits.
        #[arg(long)]
        upgrade: bool,
    },
    /// Run the admin API (developer accounts, API keys, operators).
    Admin {
        #[arg(long, short, default_value = "config/admin.yaml")]
        config: PathBuf,
    },
    /// Run the gateway and the admin API in one process.
    Serve {
        #[arg(long, default_value = "config/gateway.yaml")]
        gateway_config: PathBuf,
        #[arg(long, default_value = "config/admin.yaml")]
        admin_config: PathBuf,
    },
    /// Create or update the ClickHouse usage schema and the control-plane schema (both also
    /// done at start, by the gateway and the admin API).
    Migrate {
        /// Gateway configuration file (its `metering.clickhouse` section).
        #[arg(long, short, default_value = "config/gateway.yaml")]
        config: PathBuf,
        /// Admin configuration file (its `database`); skipped when the file does not exist.
        #[arg(long, default_value = "config/admin.yaml")]
        admin_config: PathBuf,
    },
    /// Invoices: reconcile a period against the raw usage records, generate invoices now.
    Billing {
        #[command(subcommand)]
        command: billing::BillingCommand,
    },
    /// API key tools.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Async tasks and OpenAI batches (operators): list, show, cancel.
    Tasks {
        #[command(subcommand)]
        command: tasks::TasksCommand,
    },
    /// Run the mock OpenAI-compatible upstream.
    MockUpstream(MockArgs),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate a key; print it and the `keys:` YAML entry holding its hash.
    Generate {
        /// Key id written in usage records. Default: `key_` + 12 random characters.
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value = "dev_default")]
        developer: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Model patterns (repeatable).
        #[arg(long = "model", default_values_t = vec!["*".to_owned()])]
        models: Vec<String>,
        /// Endpoint patterns after `/v1/` (repeatable).
        #[arg(long = "endpoint", default_values_t = vec!["*".to_owned()])]
        endpoints: Vec<String>,
        /// Lifetime (`365d`, `12h`) or `never`.
        #[arg(long, default_value = "365d")]
        expires_in: String,
        /// Write the key to this file (mode 600) instead of printing it.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Read a key from stdin, check its format and print `sha256:<hex>`.
    Hash,
    /// Keys in the control-plane database.
    #[command(flatten)]
    Db(control::DbKeysCommand),
}

#[derive(clap::Args)]
struct MockArgs {
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Name reported in `x-mock-server`.
    #[arg(long, default_value = "mock")]
    name: String,
    /// Require `Authorization: Bearer <value>`.
    #[arg(long, env = "MOCK_UPSTREAM_API_KEY")]
    api_key: Option<String>,
    /// Delay before the response header (e.g. `50ms`).
    #[arg(long, default_value = "0ms")]
    latency: humantime::Duration,
    /// Content chunks (tokens) per completion.
    #[arg(long, default_value_t = 16)]
    chunks: usize,
    /// Delay between SSE events.
    #[arg(long, default_value = "0ms")]
    chunk_interval: humantime::Duration,
    /// Every Nth request fails (0 = never).
    #[arg(long, default_value_t = 0)]
    error_every: u64,
    #[arg(long, default_value_t = 500)]
    error_status: u16,
    /// The first N requests fail with `error_status` (0 = none).
    #[arg(long, default_value_t = 0)]
    fail_first: u64,
    /// `Retry-After` seconds on injected errors.
    #[arg(long)]
    retry_after: Option<u64>,
    /// `error.code` of injected errors (e.g. `context_length_exceeded`).
    #[arg(long)]
    error_code: Option<String>,
    /// Where a chat or completion stream puts the usage it was asked for: `choices-empty`
    /// (OpenAI), `empty-delta` or `on-finish` (other OpenAI-compatible servers).
    #[arg(long, default_value = "choices-empty", value_parser = parse_usage_shape)]
    usage_shape: aihub_mock_upstream::wire::UsageShape,
    /// Serve HTTPS only, with this certificate (PEM, then any intermediates).
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Require a client certificate signed by this CA (PEM): mutual TLS.
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Answer 200 with the usual header, then abort the connection before any body byte
    /// (`x-mock-reset-after-headers: 0` turns it off per request).
    #[arg(long)]
    reset_after_headers: bool,
    /// Abort SSE streams after N events (no `[DONE]`, no terminating chunk); JSON answers abort
    /// right after the header.
    #[arg(long, value_name = "N", conflicts_with = "reset_after_headers")]
    close_after_events: Option<usize>,
    /// Worker threads (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    // Transparent huge pages off for this process (as mimalloc's `allow_thp=0`, set here since
    // the allocator starts before `main`): with 1,000,000 keys, huge pages kept 17-25 MiB more
    // resident (loadtests/keys-rss.sh). An old kernel without the flag changes nothing else.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let cli = Cli::parse();
    let log = init_logging(cli.log_format);
    let result = run(cli.command);
    log.flush_now();
    result
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Gateway {
            config,
            check_config,
            upgrade,
        } => {
            if check_config {
                let (routes, keys) = aihub_gateway::check_config(&config)?;
                println!("{}: ok ({routes} routes, {keys} keys)", config.display());
                return Ok(());
            }
            let server = aihub_gateway::GatewayServer::build(&config, upgrade)?;
            server.run_forever()
        }
        Command::Admin { config } => control::admin(&config),
        Command::Serve {
            gateway_config,
            admin_config,
        } => control::serve(&gateway_config, &admin_config),
        Command::Migrate {
            config,
            admin_config,
        } => {
            let gateway = migrate(&config);
            if admin_config.exists() {
                control::migrate(&admin_config)?;
            }
            gateway
        }
        Command::Billing { command } => billing::run(command),
        Command::Keys { command } => keys(command),
        Command::Tasks { command } => tasks::run(command),
        Command::MockUpstream(args) => mock_upstream(args),
    }
}

/// pingora's debug and trace logs print request headers (credentials included), so its crates
/// are capped at `info` whatever `RUST_LOG` says.
const PINGORA_CAP: &str = "pingora=info,pingora_core=info,pingora_proxy=info,pingora_pool=info";

/// Logs go to stderr through [`logwriter::BatchedStderr`]: no syscall and no thread wake-up per
/// line on the request path. Colours only on a terminal.
fn init_logging(format: LogFormat) -> logwriter::BatchedStderr {
    use std::io::IsTerminal;
    let requested = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{requested},{PINGORA_CAP}"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("info,{PINGORA_CAP}")));
    let writer = logwriter::BatchedStderr::start();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer.clone());
    match format {
        LogFormat::Text => {
            let lines = writer.clone();
            aihub_gateway::accesslog::set_line_writer(Box::new(move |line| {
                lines.write_line("INFO", "aihub::access", line)
            }));
            builder.init()
        }
        LogFormat::Json => builder.json().init(),
    }
    writer
}

fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Generate {
            id,
            developer,
            name,
            models,
            endpoints,
            expires_in,
            key_file,
        } => {
            let key = aihub_apikey::generate();
            let hash = aihub_apikey::KeyHash::of(&key);
            let id = id.unwrap_or_else(|| {
                let random = &aihub_apikey::generate()[aihub_apikey::PREFIX.len()..];
                format!("key_{}", &random[..12])
            });
            let expires_at = match expires_in.as_str() {
                "never" => None,
                lifetime => {
                    let d: Duration = humantime::parse_duration(lifetime)
                        .with_context(|| format!("--expires-in `{lifetime}`"))?;
                    Some(humantime::format_rfc3339_seconds(SystemTime::now() + d).to_string())
                }
            };
            match &key_file {
                Some(path) => write_secret(path, &key)?,
                None => println!("# New API key, shown once; store it now:\n# {key}"),
            }
            println!("# Entry for the `keys:` list of the gateway configuration:");
            println!("- id: {id}");
            println!("  hash: sha256:{}", hash.to_hex());
            println!("  developer_id: {developer}");
            println!("  name: {}", serde_json::Value::String(name));
            println!("  models: {}", serde_json::json!(models));
            println!("  endpoints: {}", serde_json::json!(endpoints));
            if let Some(at) = expires_at {
                println!("  expires_at: {at}");
            }
            println!("  active: true");
            Ok(())
        }
        KeysCommand::Db(command) => {
            let admin = std::env::var_os("AIHUB_ADMIN_CONFIG")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("config/admin.yaml"));
            control::db_keys(&admin, command)
        }
        KeysCommand::Hash => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            match aihub_apikey::parse(line.trim()) {
                Ok(hash) => {
                    println!("sha256:{}", hash.to_hex());
                    Ok(())
                }
                Err(e) => bail!("not a valid key: {e}"),
            }
        }
    }
}

fn write_secret(path: &PathBuf, key: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{key}")?;
    Ok(())
}

fn migrate(path: &std::path::Path) -> anyhow::Result<()> {
    let config = aihub_gateway::Config::load(path)?;
    let Some(metering) = config.metering else {
        bail!(
            "{}: no `metering` section: nothing to migrate",
            path.display()
        );
    };
    let clickhouse = metering.clickhouse;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(aihub_usage::schema::migrate(&clickhouse))?;
    println!(
        "ClickHouse {} at {}, database `{}`: applied {:?} (schema at version {})",
        report.server_version,
        clickhouse.url,
        clickhouse.database,
        report.applied,
        aihub_usage::schema::MIGRATIONS
            .last()
            .map_or(0, |m| m.version)
    );
    Ok(())
}

fn parse_usage_shape(s: &str) -> Result<aihub_mock_upstream::wire::UsageShape, String> {
    aihub_mock_upstream::wire::UsageShape::parse(s)
        .ok_or_else(|| "expected choices-empty, empty-delta or on-finish".to_owned())
}

fn mock_upstream(args: MockArgs) -> anyhow::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        rt.worker_threads(args.threads);
    }
    let rt = rt.enable_all().build()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            aihub_mock_upstream::tls::acceptor(cert, key, args.tls_client_ca.as_deref())
                .context("cannot set up TLS")?,
        ),
        _ => None,
    };
    let fault = if args.reset_after_headers {
        Some(aihub_mock_upstream::Fault::ResetAfterHeaders)
    } else {
        args.close_after_events
            .map(aihub_mock_upstream::Fault::CloseAfterEvents)
    };
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        // Tests and scripts read this line to learn the scheme and port.
        let scheme = if tls.is_some() { "https" } else { "http" };
        println!("listening on {scheme}://{addr}");
        std::io::stdout().flush()?;
        let config = aihub_mock_upstream::MockConfig {
            name: args.name,
            api_key: args.api_key,
            latency: args.latency.into(),
            chunks: args.chunks,
            chunk_interval: args.chunk_interval.into(),
            error_every: args.error_every,
            error_status: args.error_status,
            fail_first: args.fail_first,
            retry_after: args.retry_after,
            error_code: args.error_code,
            usage_shape: args.usage_shape,
            tls,
            fault,
        };
        tokio::select! {
            r = aihub_mock_upstream::serve(listener, config) => r.map_err(Into::into),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
