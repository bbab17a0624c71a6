//! Server-rendered SVG charts (no charting library, no script): stacked bars over days and the
//! quota bar. Colours come from CSS classes (`s0`…`s7`), so the strict CSP needs no inline
//! style; every bar has a `<title>` tooltip. Labels are escaped here; the output is markup.

use std::fmt::Write;

use crate::billing::html::escape;

/// At most this many series are drawn; the rest are summed into the last one ("other").
pub const MAX_SERIES: usize = 8;

const W: f64 = 640.0;
const H: f64 = 220.0;
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 8.0;

/// 1, 2 or 5 × 10^k at or above `v` (at least 1).
fn nice_ceiling(v: u64) -> u64 {
    let mut step = 1u64;
    loop {
        for m in [1, 2, 5] {
            if step.saturating_mul(m) >= v.max(1) {
                return step * m;
            }
        }
        step = step.saturating_mul(10);
    }
}

/// The top of a value axis with four grid steps: four times a 1, 2 or 5 × 10^k step, so every
/// grid line's label is a whole number (`1` → 4: 0, 1, 2, 3, 4 — not 0, 0, 0, 0, 1).
fn axis_max(v: u64) -> u64 {
    nice_ceiling(v.div_ceil(4)).saturating_mul(4)
}

/// `1234` → `1.2k`, `5600000` → `5.6M`.
pub fn compact(v: u64) -> String {
    let (d, unit) = match v {
        0..=999 => return v.to_string(),
        1_000..=999_999 => (1_000.0, "k"),
        1_000_000..=999_999_999 => (1_000_000.0, "M"),
        _ => (1_000_000_000.0, "G"),
    };
    let x = v as f64 / d;
    if x >= 10.0 {
        format!("{x:.0}{unit}")
    } else {
        format!("{x:.1}{unit}")
    }
}

/// Stacked bars: one bar per label (e.g. a day), one segment per series. `values[i][j]` is
/// label `i`'s value of series `j`. `title` names the chart for screen readers.
pub fn stacked_bars(
    title: &str,
    labels: &[String],
    series: &[String],
    values: &[Vec<u64>],
) -> String {
    let totals: Vec<u64> = values.iter().map(|v| v.iter().sum()).collect();
    let max = axis_max(totals.iter().copied().max().unwrap_or(0));
    let plot_w = W - LEFT - 4.0;
    let plot_h = H - TOP - BOTTOM;
    let n = labels.len().max(1) as f64;
    let slot = plot_w / n;
    let bar = (slot * 0.7).max(1.0);
    let mut svg = String::with_capacity(256 + labels.len() * series.len() * 96);
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"#,
        escape(title)
    );
    for i in 0..=4u64 {
        let y = TOP + plot_h - plot_h * i as f64 / 4.0;
        let _ = write!(
            svg,
            r#"<line class="grid-line" x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            W - 4.0,
            LEFT - 6.0,
            y + 4.0,
            compact(max * i / 4)
        );
    }
    let every = (labels.len() / 8).max(1);
    for (i, label) in labels.iter().enumerate() {
        let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
        let mut y = TOP + plot_h;
        for (j, v) in values.get(i).into_iter().flatten().enumerate() {
            if *v == 0 {
                continue;
            }
            let h = plot_h * *v as f64 / max as f64;
            y -= h;
            let name = series.get(j).map_or("", String::as_str);
            let _ = write!(
                svg,
                r#"<rect class="s{}" x="{x:.1}" y="{y:.1}" width="{bar:.1}" height="{h:.1}"><title>{} · {}: {}</title></rect>"#,
                j.min(MAX_SERIES - 1),
                escape(label),
                escape(name),
                super::view::int(*v as i128)
            );
        }
        if i % every == 0 {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                x + bar / 2.0,
                H - 6.0,
                escape(label.get(5..).unwrap_or(label))
            );
        }
    }
    let _ = write!(
        svg,
        r#"<line class="axis" x1="{LEFT}" x2="{}" y1="{y}" y2="{y}"/></svg>"#,
        W - 4.0,
        y = TOP + plot_h
    );
    svg
}

/// A horizontal bar filled to `used / total` (clamped), amber from 80 %, red at 100 %.
pub fn quota(used: u64, total: u64, label: &str) -> String {
    let share = if total == 0 {
        1.0
    } else {
        (used as f64 / total as f64).min(1.0)
    };
    let class = if share >= 1.0 {
        "fill full"
    } else if share >= 0.8 {
        "fill high"
    } else {
        "fill"
    };
    format!(
        r#"<svg class="quota" viewBox="0 0 100 4" preserveAspectRatio="none" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg"><rect class="track" width="100" height="4" rx="1"/><rect class="{class}" width="{:.2}" height="4" rx="1"/></svg>"#,
        escape(label),
        share * 100.0
    )
}

/// Folds series beyond [`MAX_SERIES`] into the last one, named `other`: returns the series
/// names kept and, per label, the values in that order.
pub fn fold_series(
    mut names: Vec<String>,
    mut values: Vec<Vec<u64>>,
    other: &str,
) -> (Vec<String>, Vec<Vec<u64>>) {
    if names.len() > MAX_SERIES {
        names.truncate(MAX_SERIES - 1);
        names.push(other.to_owned());
        for row in &mut values {
            let rest: u64 = row.iter().skip(MAX_SERIES - 1).sum();
            row.truncate(MAX_SERIES - 1);
            row.push(rest);
        }
    }
    (names, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_and_markup() {
        assert_eq!(nice_ceiling(0), 1);
        assert_eq!(nice_ceiling(7), 10);
        assert_eq!(nice_ceiling(1_234), 2_000);
        assert_eq!(nice_ceiling(5_000), 5_000);
        assert_eq!(axis_max(0), 4);
        assert_eq!(axis_max(1), 4);
        assert_eq!(axis_max(24), 40);
        assert_eq!(axis_max(1_234), 2_000);
        assert_eq!(compact(950), "950");
        assert_eq!(compact(1_234), "1.2k");
        assert_eq!(compact(56_000_000), "56M");
        let svg = stacked_bars(
            "t<",
            &["2026-12-01".into(), "2026-12-02".into()],
            &["gpt-4o".into(), "<b>".into()],
            &[vec![10, 5], vec![0, 0]],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<rect").count(), 2);
        assert!(svg.contains("&lt;b&gt;") && !svg.contains("<b>"));
        assert!(quota(90, 100, "q").contains("fill high"));
        assert!(quota(5, 0, "q").contains("fill full"));
        let (names, values) = fold_series(
            (0..10).map(|i| format!("m{i}")).collect(),
            vec![(1..=10).collect()],
            "other",
        );
        assert_eq!(names.len(), MAX_SERIES);
        assert_eq!(names[7], "other");
        assert_eq!(values[0][7], 8 + 9 + 10);
    }
}
