//! The read side against a real ClickHouse (a fresh database per test): "a developer's usage"
//! comes out the same whichever table answers it (raw rows, hourly and daily rollups, the
//! platform rollups), and a window ending mid-hour counts the raw rows of that hour.

use aihub_usage::read::{billing, daily, events, platform, totals, Days, MS_PER_DAY, MS_PER_HOUR};
use aihub_usage::testing::{usage_row, TestClickHouse};

/// 2026-03-01T00:00:00Z.
const MARCH: i64 = 1_772_323_200_000;
const APRIL: i64 = MARCH + 31 * MS_PER_DAY;

fn march() -> Days {
    Days {
        first: MARCH / MS_PER_DAY,
        last: APRIL / MS_PER_DAY - 1,
    }
}

async fn seeded() -> TestClickHouse {
    let ch = TestClickHouse::new().await;
    let day2_noon = MARCH + MS_PER_DAY + 12 * MS_PER_HOUR;
    ch.insert(&[
        usage_row("dev_a", MARCH + 10 * 60_000, "gpt-4o", 100, 1_000),
        usage_row(
            "dev_a",
            MARCH + 5 * MS_PER_HOUR + 30 * 60_000,
            "gpt-4o-mini",
            40,
            70,
        ),
        usage_row("dev_a", day2_noon, "gpt-4o", 10, 5),
        usage_row("dev_a", day2_noon + 40 * 60_000, "gpt-4o", 20, 9),
        usage_row("dev_a", day2_noon + 41 * 60_000, "gpt-4o", 0, 0),
        usage_row("dev_b", MARCH + 3 * MS_PER_DAY, "gpt-4o", 7, 3),
        // Outside the month on both sides.
        usage_row("dev_a", MARCH - 1, "gpt-4o", 1_000, 1_000),
        usage_row("dev_a", APRIL, "gpt-4o", 1_000, 1_000),
    ])
    .await;
    ch
}

#[tokio::test]
async fn every_table_agrees_on_a_developers_month() {
    let ch = seeded().await;
    let client = ch.client();

    let month = totals::window(&client, MARCH, APRIL, None).await.unwrap();
    assert_eq!(month.len(), 2);
    let a = &month[0];
    assert_eq!(
        (a.developer_id.as_str(), a.requests, a.tokens, a.cost_nanos),
        ("dev_a", 5, 170, 1_084)
    );
    assert_eq!((month[1].requests, month[1].tokens), (1, 7));
    let only_b = totals::window(&client, MARCH, APRIL, Some("dev_b"))
        .await
        .unwrap();
    assert_eq!(only_b, vec![month[1].clone()]);

    // The hourly rollup alone, and the raw rows, say the same over whole hours.
    assert_eq!(
        totals::hourly_rollup(&client, MARCH, APRIL, None)
            .await
            .unwrap(),
        month
    );
    assert_eq!(totals::raw_count(&client, MARCH, APRIL).await.unwrap(), 6);
    let mut raw = billing::all_rows(&client, MARCH, APRIL, Some("dev_a")).unwrap();
    let (mut n, mut tokens, mut nanos) = (0, 0, 0);
    while let Some(r) = raw.next().await.unwrap() {
        n += 1;
        tokens += u64::from(r.total_tokens);
        nanos += r.cost_nanos;
    }
    assert_eq!((n, tokens, nanos), (a.requests, a.tokens, a.cost_nanos));

    // Billing's hourly groups.
    let mut hours = billing::hours(&client, MARCH, APRIL, Some("dev_a")).unwrap();
    let (mut n, mut tokens, mut nanos) = (0, 0, 0);
    while let Some(h) = hours.next().await.unwrap() {
        n += h.requests;
        tokens += h.tokens;
        nanos += h.cost_nanos;
    }
    assert_eq!((n, tokens, nanos), (a.requests, a.tokens, a.cost_nanos));

    // The daily rollup (the usage report's total).
    let report = daily::report(&client, "dev_a", None, march())
        .await
        .unwrap();
    let total = report.iter().find(|r| r.dim == "total").unwrap();
    assert_eq!(
        (total.n, total.tokens, total.nanos, total.errors),
        (a.requests, a.tokens, a.cost_nanos, 1)
    );
    assert_eq!(report.iter().filter(|r| r.dim == "day").count(), 2);
    let series = daily::daily_series(&client, "dev_a", march())
        .await
        .unwrap();
    assert_eq!(series.iter().map(|b| b.n).sum::<u64>(), a.requests);
    let hourly = daily::hourly_series(&client, "dev_a", MARCH, MARCH + 2 * MS_PER_DAY)
        .await
        .unwrap();
    assert_eq!(hourly.iter().map(|b| b.n).sum::<u64>(), a.requests);

    // The platform rollups.
    let (devs, models) = platform::overview(&client, march(), 1).await.unwrap();
    assert_eq!((devs.active, devs.requests, devs.tokens), (2, 6, 177));
    assert_eq!(devs.nanos, 1_087);
    assert_eq!(devs.top, vec![("dev_a".to_owned(), 1_084, 5, 170)]);
    assert_eq!(models.iter().map(|m| m.n).sum::<u64>(), 6);

    // The raw rows of the export.
    let mut export = events::export(&client, "dev_a", None, MARCH, APRIL).unwrap();
    let mut exported = 0;
    while export.next().await.unwrap().is_some() {
        exported += 1;
    }
    assert_eq!(exported, a.requests);
    let errors = events::recent_errors(&client, "dev_a", MARCH, 5)
        .await
        .unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].status, 429);
}

#[tokio::test]
async fn a_window_ending_mid_hour_counts_that_hours_raw_rows() {
    let ch = seeded().await;
    let client = ch.client();
    let day2_noon = MARCH + MS_PER_DAY + 12 * MS_PER_HOUR;
    // Until 12:20: the 12:00 row counts, the 12:40 one does not.
    let w = totals::window(&client, MARCH, day2_noon + 20 * 60_000, Some("dev_a"))
        .await
        .unwrap();
    assert_eq!(
        (w[0].requests, w[0].tokens, w[0].cost_nanos),
        (3, 150, 1_075)
    );
    // A window inside one hour reads only raw rows, from its start.
    let w = totals::window(
        &client,
        day2_noon + 30 * 60_000,
        day2_noon + 50 * 60_000,
        None,
    )
    .await
    .unwrap();
    assert_eq!((w[0].requests, w[0].tokens), (2, 20));
    // Exactly at the hour: the rollup alone.
    let w = totals::window(&client, MARCH, day2_noon, Some("dev_a"))
        .await
        .unwrap();
    assert_eq!((w[0].requests, w[0].tokens), (2, 140));
}
