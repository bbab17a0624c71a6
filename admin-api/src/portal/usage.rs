//! The usage page: a period (or a from–to range of days), tokens per day stacked by model
//! (SVG), the by-model and by-key tables of the JSON API's usage report, and the CSV export of
//! the raw rows (the JSON API's streamed export, signed in by the session cookie).

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use aihub_plans::Period;
use aihub_store::now_ms;
use aihub_usage::read::daily;

use crate::error::{AppError, Query};
use crate::range::{date_string, DayRange, MAX_RANGE_DAYS};
use crate::state::AppState;
use crate::usage::export::ExportQuery;
use crate::usage::{self, Usage, UsageQuery, UsageReport};

use super::session::{encode, Member};
use super::{charts, form_errors, render_status, view, Chrome, FieldErrors, PageResult};

/// The range form as typed: empty fields are absent; `from`/`to` win over `period`.
#[derive(Deserialize, Default)]
pub struct RangeForm {
    #[serde(default)]
    period: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
}

impl RangeForm {
    fn query(&self) -> UsageQuery {
        let some = |v: &str| Some(v.trim().to_owned()).filter(|v| !v.is_empty());
        let (from, to) = (some(&self.from), some(&self.to));
        let ranged = from.is_some() || to.is_some();
        UsageQuery {
            period: if ranged { None } else { some(&self.period) },
            from,
            to,
            developer_id: None,
        }
    }

    /// The same range as a query string, for the export link.
    fn query_string(&self) -> String {
        let q = self.query();
        match (q.period, q.from, q.to) {
            (Some(p), _, _) => format!("period={}", encode(&p)),
            (None, Some(f), Some(t)) => format!("from={}&to={}", encode(&f), encode(&t)),
            _ => String::new(),
        }
    }
}

/// One row of a figures table.
pub struct FigureLine {
    pub name: String,
    pub requests: String,
    pub errors: String,
    pub prompt: String,
    pub completion: String,
    pub tokens: String,
    pub cost: String,
    pub latency: String,
}

impl FigureLine {
    fn new(name: String, u: &Usage) -> FigureLine {
        FigureLine {
            name,
            requests: view::int(u.requests),
            errors: view::int(u.errors),
            prompt: view::int(u.prompt_tokens),
            completion: view::int(u.completion_tokens),
            tokens: view::int(u.total_tokens),
            cost: view::usd(&u.cost_usd),
            latency: view::ms(u.avg_latency_ms),
        }
    }
}

#[derive(Template)]
#[template(path = "portal/usage.html")]
struct UsagePage {
    page: Chrome,
    form: RangeForm,
    periods: Vec<String>,
    errors: FieldErrors,
    range_text: String,
    totals: Option<FigureLine>,
    by_model: Vec<FigureLine>,
    by_key: Vec<FigureLine>,
    chart: Option<String>,
    legend: Vec<String>,
    export_query: String,
    unavailable: bool,
}

/// Tokens per day and model over `r` (from `usage_daily`): day labels, model names by total,
/// and the values.
async fn day_by_model(
    s: &AppState,
    developer_id: &str,
    r: &DayRange,
) -> Result<(Vec<String>, Vec<String>, Vec<Vec<u64>>), AppError> {
    let db = s.usage_db()?;
    let rows = daily::tokens_by_day_and_model(&db.client, developer_id, r.window()).await?;
    let r = r.until(now_ms());
    let labels: Vec<String> = (r.from..=r.to).map(date_string).collect();
    let mut models: Vec<(String, u64)> = Vec::new();
    for row in &rows {
        match models.iter_mut().find(|(m, _)| *m == row.model) {
            Some((_, total)) => *total += row.tokens,
            None => models.push((row.model.clone(), row.tokens)),
        }
    }
    models.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut values = vec![vec![0u64; models.len()]; labels.len()];
    for row in &rows {
        let (Some(i), Some(j)) = (
            labels.iter().position(|l| *l == row.date),
            models.iter().position(|(m, _)| *m == row.model),
        ) else {
            continue;
        };
        values[i][j] += row.tokens;
    }
    let names = models
        .into_iter()
        .map(|(m, _)| if m.is_empty() { "—".into() } else { m })
        .collect();
    Ok((labels, names, values))
}

/// The last 12 periods, newest first, for the period menu.
fn recent_periods() -> Vec<String> {
    let mut p = Period::of_unix_ms(now_ms());
    let mut out = Vec::with_capacity(12);
    for _ in 0..12 {
        out.push(p.to_string());
        p = Period::of_unix_ms(p.start_ms() - 1);
    }
    out
}

pub async fn page(
    State(s): State<AppState>,
    member: Member,
    Query(form): Query<RangeForm>,
) -> PageResult {
    let t = member.visit.lang.texts();
    let dev = member.caller.developer.clone();
    let mut p = UsagePage {
        page: Chrome::new(&member.visit, Some(&dev), "usage", t.usage_title),
        periods: recent_periods(),
        errors: FieldErrors::default(),
        range_text: String::new(),
        totals: None,
        by_model: Vec::new(),
        by_key: Vec::new(),
        chart: None,
        legend: Vec::new(),
        export_query: form.query_string(),
        unavailable: false,
        form,
    };
    let q = p.form.query();
    let range = match form_errors(q.range(Some(MAX_RANGE_DAYS)))? {
        Ok(r) => r,
        Err(errors) => {
            p.errors = errors;
            return render_status(StatusCode::UNPROCESSABLE_ENTITY, &p);
        }
    };
    let (report, series) = tokio::join!(
        usage::usage_of(&s, &member.caller, q),
        day_by_model(&s, &dev.id, &range),
    );
    let report: UsageReport = match report {
        Ok(r) => r,
        Err(AppError::UsageUnavailable(detail)) => {
            AppError::UsageUnavailable(detail).describe();
            p.unavailable = true;
            return render_status(StatusCode::SERVICE_UNAVAILABLE, &p);
        }
        Err(e) => return Err(e.into()),
    };
    let (labels, names, values) = series?;
    p.range_text = match &report.period {
        Some(period) => period.clone(),
        None => format!("{} – {}", report.from, report.to),
    };
    if report.totals.requests > 0 {
        let (names, values) = charts::fold_series(names, values, "other");
        p.chart = Some(charts::stacked_bars(
            t.usage_by_day,
            &labels,
            &names,
            &values,
        ));
        p.legend = names;
    }
    p.totals = Some(FigureLine::new(t.usage_total.into(), &report.totals));
    p.by_model = report
        .by_model
        .iter()
        .map(|m| {
            FigureLine::new(
                if m.model.is_empty() {
                    "—".into()
                } else {
                    m.model.clone()
                },
                &m.usage,
            )
        })
        .collect();
    p.by_key = report
        .by_key
        .iter()
        .map(|k| {
            let name = match &k.key_name {
                Some(n) => format!("{n} ({})", k.key_id),
                None => k.key_id.clone(),
            };
            FigureLine::new(name, &k.usage)
        })
        .collect();
    render_status(StatusCode::OK, &p)
}

/// `GET /portal/usage/export?period=…`: the CSV export, signed in by cookie.
pub async fn export(
    State(s): State<AppState>,
    member: Member,
    Query(form): Query<RangeForm>,
) -> Result<Response, super::Failure> {
    let q = form.query();
    let export = ExportQuery {
        period: q.period,
        from: q.from,
        to: q.to,
        key_id: None,
        developer_id: None,
    };
    Ok(usage::export::export_of(&s, &member.caller, export).await?)
}
