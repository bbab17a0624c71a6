//! The printable invoice (self-contained HTML, every value escaped) and the choice between
//! HTML and JSON for an invoice request.

use super::*;
use crate::view::int as grouped;

/// `format` wins; else the `Accept` header's preference between `text/html` and JSON (an
/// explicit `text/html` with a higher quality than `application/json`, `application/*` or
/// `*/*`). Browsers get HTML, API clients (`*/*`, `application/json`) JSON.
pub(super) fn wants_html(format: Option<&str>, headers: &HeaderMap) -> Result<bool, AppError> {
    match format {
        Some("html") => return Ok(true),
        Some("json") => return Ok(false),
        Some(_) => return Err(AppError::validation("format", "must be `json` or `html`")),
        None => {}
    }
    let accept = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let (mut html, mut json) = (0.0f32, 0.0f32);
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q=").map(str::to_owned))
            .find_map(|v| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "text/html" | "application/xhtml+xml" => html = html.max(q),
            "application/json" | "application/*" | "*/*" => json = json.max(q),
            _ => {}
        }
    }
    Ok(html > 0.0 && html > json)
}

// ---------------------------------------------------------------------------------------------
// The printable invoice

/// `<`, `>`, `&`, `"` and `'` as entities: every value on the page goes through here.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn day(ms: i64) -> String {
    rfc3339_ms(ms)[..10].to_owned()
}

const STYLE: &str = "\
body{font:14px/1.45 -apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:#111;\
margin:2rem auto;max-width:52rem;padding:0 1rem}\
h1{font-size:1.7rem;margin:0 0 .2rem}h2{font-size:1rem;margin:1.6rem 0 .4rem}\
.muted{color:#555}.head{display:flex;justify-content:space-between;gap:2rem;flex-wrap:wrap}\
table{width:100%;border-collapse:collapse;margin:.6rem 0}\
th,td{padding:.35rem .5rem;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}\
th{font-size:.8rem;text-transform:uppercase;letter-spacing:.04em;color:#444}\
.n{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}\
table.facts{width:auto}table.facts th{text-transform:none;letter-spacing:0;font-size:inherit;\
padding-right:1.5rem}table.facts td,table.facts th{border:none;padding:.1rem .5rem .1rem 0}\
table.totals{width:auto;margin-left:auto}table.totals td,table.totals th{border:none}\
table.totals tr.due th,table.totals tr.due td{border-top:2px solid #111;font-weight:bold}\
.status{display:inline-block;padding:.05rem .5rem;border:1px solid #333;border-radius:3px;\
text-transform:uppercase;font-size:.8rem;letter-spacing:.05em}\
.void{color:#a00;border-color:#a00}.paid{color:#060;border-color:#060}\
footer{margin-top:2rem;font-size:.85rem}\
@media print{body{margin:0;max-width:none;font-size:12px}tr{break-inside:avoid}}\
@page{margin:15mm}";

/// The invoice as a self-contained, print-friendly HTML page (inline CSS, no script, no
/// external resource; every value escaped).
pub fn render_html(
    inv: &Invoice,
    lines: &[InvoiceLine],
    paid: &[Payment],
    dev: &Developer,
) -> String {
    let e = escape;
    let mut h = String::with_capacity(8 * 1024);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Invoice {} ({})</title><style>{STYLE}</style></head><body>\n",
        e(&inv.id),
        e(&inv.period)
    );
    let status_class = match inv.status.as_str() {
        invoices::VOID => "status void",
        invoices::PAID => "status paid",
        _ => "status",
    };
    let _ = writeln!(
        h,
        "<div class=\"head\"><div><h1>Invoice</h1><div class=\"muted\">AI Hub Gateway</div>\
         </div><div><span class=\"{status_class}\">{}</span></div></div>",
        e(&inv.status)
    );
    // Billed to, and the invoice's facts.
    let _ = write!(
        h,
        "<div class=\"head\"><div><h2>Billed to</h2><div>{}</div>",
        e(&dev.full_name)
    );
    if let Some(c) = dev.company_name.as_deref().filter(|c| !c.is_empty()) {
        let _ = write!(h, "<div>{}</div>", e(c));
    }
    let _ = write!(
        h,
        "<div class=\"muted\">{}</div></div>\n<div><h2>Details</h2><table class=\"facts\">",
        e(&dev.email)
    );
    let period = Period::parse(&inv.period);
    let mut fact = |name: &str, value: &str| {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", e(name), e(value));
    };
    fact("Invoice", &inv.id);
    fact("Period", &inv.period);
    if let Some(p) = period {
        fact(
            "Covering",
            &format!("{} to {} (UTC)", day(p.start_ms()), day(p.end_ms() - 1)),
        );
    }
    if let Some(at) = inv.finalized_at {
        fact("Issued", &day(at));
    }
    fact("Currency", &inv.currency);
    fact("Developer id", &inv.developer_id);
    h.push_str("</table></div></div>\n");

    // Lines.
    h.push_str(
        "<h2>Charges</h2><table class=\"lines\"><thead><tr><th>Description</th>\
         <th class=\"n\">Quantity</th><th class=\"n\">Requests</th>\
         <th class=\"n\">Amount (USD)</th></tr></thead><tbody>\n",
    );
    for l in lines {
        let quantity = if l.kind == "overage" {
            format!("{} tokens", grouped(l.quantity))
        } else {
            grouped(l.quantity)
        };
        let requests = if l.kind == "overage" {
            grouped(l.requests)
        } else {
            String::new()
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td></tr>",
            e(&l.description),
            e(&quantity),
            e(&requests),
            e(&usd_string(l.amount))
        );
    }
    h.push_str("</tbody></table>\n<table class=\"totals\">");
    let mut total_row = |class: &str, name: &str, value: &str| {
        let _ = write!(
            h,
            "<tr class=\"{class}\"><th>{}</th><td class=\"n\">{}</td></tr>",
            e(name),
            e(value)
        );
    };
    total_row("", "Subtotal (exact)", &usd_string(inv.subtotal));
    total_row("", "Total (rounded to cents)", &usd_string(inv.total));
    total_row("", "Amount paid", &usd_string(inv.amount_paid));
    total_row(
        "due",
        &format!("Amount due ({})", inv.currency),
        &usd_string(amount_due(inv)),
    );
    h.push_str("</table>\n");

    if !paid.is_empty() {
        h.push_str(
            "<h2>Payments</h2><table><thead><tr><th>Received</th><th>Method</th>\
             <th>Reference</th><th class=\"n\">Amount (USD)</th></tr></thead><tbody>",
        );
        for p in paid {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>",
                e(&day(p.received_at)),
                e(&p.provider),
                e(&p.reference),
                e(&usd_string(p.amount))
            );
        }
        h.push_str("</tbody></table>\n");
    }
    if inv.status == invoices::VOID {
        let _ = writeln!(
            h,
            "<p><strong>This invoice is void.</strong> {}</p>",
            e(inv.void_reason.as_deref().unwrap_or(""))
        );
    }
    let _ = write!(
        h,
        "<footer class=\"muted\"><p>Usage this period: {} requests, {} tokens ({} included, \
         {} billed as overage, {} beyond the included tokens not billed).</p>\
         <p>Line amounts are exact; the total is their sum rounded once, to cents (half away \
         from zero).</p></footer>\n</body></html>\n",
        e(&grouped(inv.requests)),
        e(&grouped(inv.total_tokens)),
        e(&grouped(inv.included_tokens)),
        e(&grouped(inv.overage_tokens)),
        e(&grouped(inv.waived_tokens))
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, v.parse().unwrap());
            m
        };
        let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert!(wants_html(None, &h(browser)).unwrap());
        assert!(!wants_html(None, &h("*/*")).unwrap());
        assert!(!wants_html(None, &h("application/json")).unwrap());
        assert!(!wants_html(None, &h("application/json, text/html;q=0.5")).unwrap());
        assert!(wants_html(None, &h("text/html;q=0.9, application/json;q=0.1")).unwrap());
        assert!(!wants_html(None, &HeaderMap::new()).unwrap());
        assert!(wants_html(Some("html"), &h("application/json")).unwrap());
        assert!(!wants_html(Some("json"), &h(browser)).unwrap());
        assert!(wants_html(Some("pdf"), &HeaderMap::new()).is_err());
    }

    #[test]
    fn text() {
        assert_eq!(
            escape(r#"<script>alert("x" & 'y')</script>"#),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(-1000), "-1,000");
    }
}
