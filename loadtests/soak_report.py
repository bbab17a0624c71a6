"""The soak's verdicts and its Markdown report (loadtests/soak_bench.py runs the soak and calls
these with what it measured). `cfg` holds the run's settings; `totals` the answers as
{(kind, outcome): count}, an outcome being an HTTP status, `bad_body:STATUS` (answered, with a
body that is not what it should be) or `error:EXCEPTION` (no answer)."""

import statistics
from collections import Counter

from benchlib import pctl

MIB = 1 << 20
RECORDED = (200, 429)  # what the gateway records: authenticated model calls, refused or not


def http_status(outcome):
    """The HTTP status an outcome was answered with; None for a transport error."""
    if isinstance(outcome, int):
        return outcome
    if outcome.startswith("bad_body:"):
        return int(outcome.split(":", 1)[1])
    return None


def answers_by_status(totals):
    c = Counter()
    for (_, outcome), n in totals.items():
        s = http_status(outcome)
        if s is not None:
            c[s] += n
    return c


def unexpected(totals, expected):
    return {k: n for k, n in totals.items() if k[1] not in expected[k[0]]}


def mark_index(cfg, samples):
    """The warm-up mark: the first sample at or after DURATION/6 (10 min of an hour)."""
    at = cfg["duration"] / 6
    return next((i for i, s in enumerate(samples) if s["t_s"] >= at), len(samples) - 1)


def slope_per_hour(samples, key):
    """Least-squares growth of samples[key] per hour (None for fewer than 3 samples)."""
    if len(samples) < 3:
        return None
    ts, ys = [s["t_s"] for s in samples], [s[key] for s in samples]
    mt, my = statistics.mean(ts), statistics.mean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den * 3600 if den else None


def verdicts(cfg, samples, lags, record, end, totals, expected):
    """[{what, value, ok}] — every one must be ok for the soak to pass."""
    out = []

    def check(what, value, ok):
        out.append({"what": what, "value": value, "ok": bool(ok)})

    if not samples:
        check("samples taken", "none", False)
        return out
    mi = mark_index(cfg, samples)
    mark, last, after = samples[mi], samples[-1], samples[mi:]
    for who in ("gw", "admin"):
        name = "gateway" if who == "gw" else "admin API"
        limit = mark[f"{who}_rss_mib"] * 1.10 + 8
        check(f"{name} RSS flat: end ≤ mark × 1.10 + 8 MiB",
              f"{mark[f'{who}_rss_mib']:.1f} MiB at {mark['t_s']} s → {last[f'{who}_rss_mib']:.1f} MiB at {last['t_s']} s "
              f"(limit {limit:.1f}; max after the mark {max(s[f'{who}_rss_mib'] for s in after):.1f}; "
              f"trend after the mark {f(slope_per_hour(after, f'{who}_rss_mib'))} MiB/h; anonymous memory "
              f"{mark[f'{who}_anon_mib']:.1f} → {last[f'{who}_anon_mib']:.1f} MiB, "
              f"{f(slope_per_hour(after, f'{who}_anon_mib'))} MiB/h)",
              last[f"{who}_rss_mib"] <= limit)
        fds = [s[f"{who}_fds"] for s in after]
        check(f"{name} open FDs flat: every sample after the mark within mark ± {cfg['fd_slack']}",
              f"{mark[f'{who}_fds']} at the mark, {min(fds)}–{max(fds)} after, {last[f'{who}_fds']} at the end",
              all(abs(x - mark[f"{who}_fds"]) <= cfg["fd_slack"] for x in fds))
        check(f"{name} threads flat: end ≤ mark + 4", f"{mark[f'{who}_threads']} → {last[f'{who}_threads']}",
              last[f"{who}_threads"] <= mark[f"{who}_threads"] + 4)
    wal_max = max(s["wal_dir_bytes"] for s in samples)
    check(f"WAL folder bounded under load: ≤ {cfg['wal_bound'] / MIB:g} MiB at every sample",
          f"max {wal_max:,} bytes", wal_max <= cfg["wal_bound"])
    d = end.get("after_drain") or {}
    check("WAL drained after the load: aihub_usage_wal_bytes = 0",
          f"{d.get('wal_metric_bytes')} bytes after {end['drain_s']:.1f} s (folder {d.get('wal_dir_bytes')} bytes)"
          if end.get("drain_s") is not None else "not drained within 120 s", end.get("drain_s") is not None)

    answered, rows = answers_by_status(totals), end.get("rows", {})
    for s in sorted(set(answered) | set(rows)):
        got, distinct = rows.get(s, (0, 0))
        want = answered.get(s, 0) if s != 401 else 0
        why = " (unknown keys are not recorded)" if s == 401 else ""
        check(f"usage rows with status {s} = answers {s}{why}",
              f"{got:,} rows ({distinct:,} distinct request ids), {answered.get(s, 0):,} answers", got == want == distinct)
    total_rows = sum(c for c, _ in rows.values())
    check("rows in ClickHouse = aihub_usage_rows_written_total; none dead-lettered",
          f"{total_rows:,} rows, metric {end.get('rows_written_metric'):,}, dead-lettered {end.get('dead_lettered')}",
          total_rows == end.get("rows_written_metric") and end.get("dead_lettered") == 0)
    bad = unexpected(totals, expected)
    check("no unexpected answer (only 200s, the limited key's 429s, rotated/deleted keys' 401s)",
          ", ".join(f"{k[0]} → {k[1]}: {n}" for k, n in bad.items()) or "none", not bad)
    changes = [x for k in ("created", "rotated", "deleted") for x in record[k]]
    late = sum(1 for x in changes if x is None)
    check("every key change reached the gateway within 5 s; the admin API answered every call",
          f"{len(changes)} changes, {late} late, {len(record['admin_errors'])} admin API failures",
          not late and not record["admin_errors"] and changes)
    on_time = sum(1 for x in lags if x <= 1.0) / max(len(lags), 1)
    check("the load held its rate: ≥ 97 % of the requests sent within 1 s of their slot",
          f"{on_time * 100:.2f} % of {len(lags):,} (max lateness {max(lags, default=0) * 1000:.0f} ms)",
          on_time >= 0.97 and lags)
    return out


def f(v, d=1):
    return "–" if v is None else f"{v:+.{d}f}"


def curve_indices(samples, mi, points=9):
    n = len(samples)
    idx = {round(i * (n - 1) / (points - 1)) for i in range(points)} | {mi}
    return sorted(i for i in idx if 0 <= i < n)


def ms(xs, p):
    v = pctl(xs, p)
    return "–" if v is None else f"{v * 1000:.0f} ms"


def report(cfg, samples, lags, record, end, totals, examples, checks, meta):
    ok = all(c["ok"] for c in checks)
    mi = mark_index(cfg, samples) if samples else 0
    L = ["# Soak: the gateway and the admin API under a fixed mixed load (issue 21)", "",
         f"- Date: {meta['date']}; revision {meta['revision']}; `nproc` = {meta['nproc']}, load average "
         f"{meta['load_before']} before, {meta['load_after']} after",
         f"- Command: `{meta['command']}`; run folder `{meta['run_dir']}` (configs, logs, samples.csv)",
         f"- Load: {cfg['duration']} s, open loop at {cfg['rate']:g} req/s ({cfg['workers']} client threads, keep-alive; a "
         "connection idle for 20 s is closed by the client, under the gateway's 60 s `server.idle_timeout`), "
         "in a cycle of 20: 8 JSON chat completions, 4 SSE streams with `stream_options.include_usage`, 3 without, "
         f"3 embeddings, 2 chat completions on a key limited to {cfg['limited_rpm']} requests/min (`rate_limit_rpm`, set "
         f"through the admin API; 429s expected). Beside it, every {cfg['churn_every']:g} s, key churn through the admin "
         "API: create, 3 requests, regenerate (no grace), 2 requests on the new key, 1 on the old (401 expected), "
         "delete, 1 request on the deleted key (401 expected); each change waited for on the gateway (GET /v1/models).",
         f"- Deployment: `aihub mock-upstream`; `aihub admin` on a fresh PostgreSQL database publishing key changes to "
         f"Redis; one gateway (`server.threads: {cfg['gateway_threads']}`) following its keys, limits in Redis, "
         "metering into a fresh ClickHouse database through its WAL folder. All on this machine, unpinned. "
         f"Binary: `{meta['binary']}`.",
         f"- Sampled every {cfg['sample']} s; warm-up mark: the first sample at or after {cfg['duration'] / 6:.0f} s "
         "(duration ÷ 6: 10 min of an hour).", "",
         f"## Verdicts: {'all met' if ok else '**FAILED**'}", "", "| verdict | measured | |", "|---|---|---|"]
    L += [f"| {c['what']} | {c['value']} | {'met' if c['ok'] else '**not met**'} |" for c in checks]
    L += ["", "## The curve", "", "| point | t (s) | gateway RSS (anon) MiB | FDs | threads | admin RSS (anon) MiB | FDs | threads "
          "| WAL folder bytes | 2xx | 429 | 401 | unexpected | p50 ms | p99 ms |", "|" + "---|" * 15]
    mid = len(samples) // 2
    for i in curve_indices(samples, mi) if samples else []:
        s = samples[i]
        label = {0: "start", mi: "mark", mid: "middle", len(samples) - 1: "end"}.get(i, "")
        L.append(f"| {label} | {s['t_s']} | {s['gw_rss_mib']:.1f} ({s['gw_anon_mib']:.1f}) | {s['gw_fds']} | {s['gw_threads']} | "
                 f"{s['admin_rss_mib']:.1f} ({s['admin_anon_mib']:.1f}) | {s['admin_fds']} | {s['admin_threads']} | {s['wal_dir_bytes']:,} | "
                 f"{s['ok_2xx']} | {s['limited_429']} | {s['revoked_401']} | {s['unexpected']} | {s['p50_ms']} | {s['p99_ms']} |")
    d = end.get("after_drain")
    if d:
        L.append(f"| after drain | {d['t_s']} | {d['gw_rss_mib']:.1f} ({d['gw_anon_mib']:.1f}) | {d['gw_fds']} | "
                 f"{d['gw_threads']} | {d['admin_rss_mib']:.1f} ({d['admin_anon_mib']:.1f}) | {d['admin_fds']} | {d['admin_threads']} | {d['wal_dir_bytes']:,} | | | | | | |")
    L += ["", "Counts are per sampling interval; p50/p99: the interval's 200s of the unlimited requests, from each "
          "request's scheduled time to its last byte (streams read to the end). Every sample is in `loadtests/results/soak-latest.csv`.",
          "", "## Answers", "", "| request | outcome | count |", "|---|---|---|"]
    L += [f"| {k[0]} | {k[1]} | {n:,} |" for k, n in sorted(totals.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))]
    rows = end.get("rows", {})
    L += ["", "## Usage rows in ClickHouse", "", "| status | answers | rows | distinct request ids |", "|---|---|---|---|"]
    answered = answers_by_status(totals)
    L += [f"| {s} | {answered.get(s, 0):,} | {rows.get(s, (0, 0))[0]:,} | {rows.get(s, (0, 0))[1]:,} |"
          for s in sorted(set(answered) | set(rows))]
    if end.get("drain_s") is not None:
        L.append(f"\nLoad stopped at {end['load_stopped']:.0f} s; the WAL drained in {end['drain_s']:.1f} s. "
                 f"Gateway exit code on SIGTERM: {end.get('gateway_exit')}, admin: {end.get('admin_exit')}.")
    L += ["", "## Key churn", "", "| change | count | reached the gateway p50 | max | late (> 5 s) |", "|---|---|---|---|---|"]
    for k, what in (("created", "new key accepted"), ("rotated", "old key refused after regenerate"),
                    ("deleted", "deleted key refused")):
        xs = [x for x in record[k] if x is not None]
        L.append(f"| {what} | {len(record[k])} | {ms(xs, 50)} | {ms(xs, 100)} | {len(record[k]) - len(xs)} |")
    if lags:
        L += ["", f"Scheduling: {len(lags):,} requests, lateness p50 {ms(lags, 50)}, p99 {ms(lags, 99)}, "
              f"max {max(lags) * 1000:.0f} ms; mean answered rate "
              f"{sum(s['sent'] for s in samples) / max(samples[-1]['t_s'], 1):.1f} req/s (churn included)."]
    notes = [f"{k[0]} → {k[1]}: {v}" for k, v in examples.items()] + record["admin_errors"][:10]
    if notes:
        L += ["", "## Unexpected answers and failures (first of each)", ""] + [f"- {x}" for x in notes]
    if end.get("log_notes"):
        L += ["", "## WARN and ERROR lines in the logs (each message once, numbers aside)", ""]
        L += [f"- {x}" for x in end["log_notes"]]
    p99s = [s["p99_ms"] for s in samples if s["p99_ms"] != ""]
    if p99s:
        L += ["", f"Interval p99 over the run: median {statistics.median(p99s):.1f} ms, max {max(p99s):.1f} ms."]
    return "\n".join(L) + "\n"
