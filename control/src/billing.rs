//! Billing actions: a developer's self-service plan change (prorated by the billing engine
//! from the plan history the change writes), voiding an invoice, and the audit entries of the
//! operators' billing runs (generate, finalize), which the billing engine (`aihub-billing`)
//! performs.

use aihub_store::developers::{self, Developer, OperatorUpdate};
use aihub_store::invoices::{self, Invoice};
use aihub_store::StoreError;

use crate::journal::{self, Actor, Entry};
use crate::{Control, Error, Result};

/// `the invoice is void` → `The invoice is void.`
pub fn sentence(m: &str) -> String {
    let mut c = m.chars();
    let mut out: String = match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    };
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

/// A store refusal (`Conflict`) as a conflict the client reads as a sentence.
pub fn conflict(e: StoreError) -> Error {
    match e {
        StoreError::Conflict(m) => Error::Conflict(sentence(&m)),
        e => e.into(),
    }
}

impl Control {
    /// Whether a developer may choose `plan` themselves: a known plan with a monthly price.
    pub fn check_plan_choice(&self, plan: &str) -> Result<()> {
        let plans = &self.config.plans.plans;
        let priced: Vec<&str> = plans
            .iter()
            .filter(|(_, p)| p.monthly_price_usd.is_some())
            .map(|(n, _)| n.as_str())
            .collect();
        match plans.get(plan) {
            None => Err(Error::invalid(
                "plan",
                format!("must be one of: {}", priced.join(", ")),
            )),
            Some(p) if p.monthly_price_usd.is_none() => Err(Error::invalid(
                "plan",
                format!(
                    "`{plan}` has custom pricing: ask an operator; plans you can choose: {}",
                    priced.join(", ")
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    /// A developer changes their own plan (checked by [`Control::check_plan_choice`]),
    /// effective now: the plan, the subscription history (closed and opened at the same
    /// millisecond) and the audit entry in one transaction; gateways apply the new limits
    /// within a second. Choosing the current plan changes nothing.
    pub async fn change_plan(
        &self,
        developer: &Developer,
        ip: Option<&str>,
        plan: &str,
    ) -> Result<Developer> {
        self.check_plan_choice(plan)?;
        if developer.plan == plan {
            return Ok(developer.clone());
        }
        let id = developer.id.as_str();
        let mut tx = self.store.begin_write().await?;
        // The developer's row first (lock order: developer, keys, feed counter).
        developers::lock(&mut tx, id).await?;
        let entry = Entry {
            action: "billing.plan_change",
            target_type: "developer",
            target_id: id,
            details: serde_json::json!({ "from": developer.plan, "to": plan }),
        };
        let by = Actor::Developer { developer, ip };
        journal::record(&mut tx, &by, None, Some(entry)).await?;
        let u = OperatorUpdate {
            plan: Some(plan.to_owned()),
            changed_by: Some(id.to_owned()),
            ..Default::default()
        };
        let dev = developers::operator_update(&mut tx, id, &u).await?;
        tx.commit().await?;
        self.notifier.keys_changed();
        Ok(dev)
    }

    /// Voids a draft or open invoice without payments, with its audit entry when it changed
    /// (voiding twice returns the invoice unchanged), in one transaction.
    pub async fn void_invoice(&self, by: &Actor<'_>, id: &str, reason: &str) -> Result<Invoice> {
        let reason = reason.trim();
        let n = reason.chars().count();
        if n == 0 || n > 500 {
            return Err(Error::invalid("reason", "must be 1 to 500 characters"));
        }
        let mut tx = self.store.begin_write().await?;
        let (inv, changed) = invoices::void(&mut tx, id, reason)
            .await
            .map_err(conflict)?;
        if changed {
            let entry = Entry {
                action: "invoice.void",
                target_type: "invoice",
                target_id: id,
                details: serde_json::json!({
                    "developer_id": inv.developer_id,
                    "period": inv.period,
                    "reason": reason,
                }),
            };
            journal::record(&mut tx, by, None, Some(entry)).await?;
        }
        tx.commit().await?;
        Ok(inv)
    }

    /// Finalizes an invoice now (an operator, without waiting for the grace window): `open`,
    /// or `paid` when nothing is due, its `invoice.finalized` event and, when this call
    /// finalized it, the audit entry, in one transaction. The caller refreshed the draft from
    /// usage first (`aihub_billing::Billing::refresh_draft`). An invoice past draft is
    /// returned unchanged; a void one, or one whose period has not ended, is a conflict.
    pub async fn finalize_invoice(&self, by: &Actor<'_>, id: &str) -> Result<Invoice> {
        let mut tx = self.store.begin_write().await?;
        let (inv, changed) = invoices::finalize_changed(&mut tx, id)
            .await
            .map_err(conflict)?;
        if changed {
            let entry = Entry {
                action: "invoice.finalize",
                target_type: "invoice",
                target_id: id,
                details: serde_json::json!({
                    "developer_id": inv.developer_id,
                    "period": inv.period,
                    "status": inv.status,
                    "total": inv.total.to_string(),
                }),
            };
            journal::record(&mut tx, by, None, Some(entry)).await?;
        }
        tx.commit().await?;
        Ok(inv)
    }

    /// Records the audit entry of an action done outside a service transaction (an operator's
    /// billing run: `invoice.generate`, `invoice.finalize`), in its own transaction.
    pub async fn audit(&self, by: &Actor<'_>, entry: Entry<'_>) -> Result<()> {
        let mut tx = self.store.begin_write().await?;
        journal::record(&mut tx, by, None, Some(entry)).await?;
        tx.commit().await?;
        Ok(())
    }
}
