//! `aihub billing …`: operator commands on invoices, against the admin configuration's store
//! and usage database.
//!
//! - `aihub billing reconcile --period YYYY-MM` re-computes every invoice of the period from
//!   the raw ClickHouse records; prints the report; exits 1 on any mismatch. A period still open
//!   has no invoices yet: its raw records are compared with the live computation (the invoices
//!   as if it closed now), and it exits 0 when they agree.
//! - `aihub billing generate --period YYYY-MM [--developer ID] [--finalize]` creates or
//!   refreshes the period's drafts now (and finalizes them), as the background job would.

use std::path::PathBuf;
use std::time::Instant;

use aihub_admin::AdminConfig;
use aihub_billing::Billing;
use aihub_plans::Period;
use aihub_store::invoices::SaveMode;
use anyhow::{bail, Context};

#[derive(clap::Subcommand)]
pub enum BillingCommand {
    /// Re-compute every invoice of a period from the raw usage records; exit 1 on a mismatch.
    /// For the current (open) month, compare with the invoices as if it closed now.
    Reconcile {
        /// The billing period, `YYYY-MM`.
        #[arg(long)]
        period: String,
        #[arg(long, default_value = "config/admin.yaml")]
        admin_config: PathBuf,
    },
    /// Create or refresh a period's draft invoices now (and optionally finalize them).
    Generate {
        #[arg(long)]
        period: String,
        /// Only this developer.
        #[arg(long)]
        developer: Option<String>,
        /// Finalize the drafts afterwards (the background job does this after the grace
        /// window).
        #[arg(long)]
        finalize: bool,
        #[arg(long, default_value = "config/admin.yaml")]
        admin_config: PathBuf,
    },
}

fn billing(config: &AdminConfig) -> anyhow::Result<Billing> {
    let Some(ch) = &config.clickhouse else {
        bail!(
            "the admin configuration has no `clickhouse` section: billing needs the usage database"
        );
    };
    let plans = config.plans.clone();
    let handle = tokio::runtime::Handle::current();
    let store = handle.block_on(async {
        let mut opts = aihub_store::StoreOptions::new(&config.database.url);
        opts.max_connections = 4;
        let store = aihub_store::Store::connect(&opts).await?;
        aihub_store::migrations::migrate(&store).await?;
        anyhow::Ok(store)
    });
    Ok(Billing::new(store?, ch, plans, config.billing.clone()))
}

fn period(text: &str) -> anyhow::Result<Period> {
    Period::parse(text).with_context(|| format!("--period `{text}`: expected YYYY-MM"))
}

pub fn run(command: BillingCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    match command {
        BillingCommand::Reconcile {
            period: p,
            admin_config,
        } => {
            let period = period(&p)?;
            let config = AdminConfig::load(&admin_config)?;
            let billing = billing(&config)?;
            let started = Instant::now();
            let report = rt.block_on(aihub_billing::reconcile::reconcile(&billing, period))?;
            print!("{report}");
            println!("checked in {:.1} s", started.elapsed().as_secs_f64());
            if let Some(open) = report.open.as_ref().filter(|o| o.early_drafts > 0) {
                println!(
                    "note: {} draft invoice(s) generated before the period closed were not compared \
                     (they are refreshed once it has closed)",
                    open.early_drafts
                );
            }
            if !report.voided.is_empty() {
                println!(
                    "note: {} developer(s) have only a voided invoice for the period (not reissued)",
                    report.voided.len()
                );
            }
            if !report.without_subscription.is_empty() {
                println!(
                    "note: {} developer id(s) have usage but no subscription in the period (not billed)",
                    report.without_subscription.len()
                );
            }
            if !report.is_clean() {
                std::process::exit(1);
            }
            Ok(())
        }
        BillingCommand::Generate {
            period: p,
            developer,
            finalize,
            admin_config,
        } => {
            let period = period(&p)?;
            let config = AdminConfig::load(&admin_config)?;
            let billing = billing(&config)?;
            let started = Instant::now();
            let r =
                rt.block_on(billing.generate(period, developer.as_deref(), SaveMode::Automatic))?;
            println!(
                "period {period}: {} developers, {} created, {} refreshed, {} kept, {} ids with usage but no subscription, {} hours split, in {:.1} s",
                r.developers,
                r.created,
                r.refreshed,
                r.kept,
                r.skipped_without_subscription,
                r.raw_hours,
                started.elapsed().as_secs_f64()
            );
            if finalize {
                let started = Instant::now();
                let n = rt.block_on(billing.finalize_drafts(period, developer.as_deref()))?;
                println!(
                    "finalized {n} invoices in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
    }
}
