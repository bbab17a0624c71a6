#!/usr/bin/env python3
"""Latency of the usage and analytics endpoints, and export throughput (issue 6's benchmark).

Called by loadtests/analytics-bench.sh, which fills ClickHouse, registers the developers and
starts the admin API. Standard library only. Signs in as the operator, then for every endpoint:
REQUESTS sequential requests (one keep-alive connection) about the heaviest developer
(dev_gen_00000), then REQUESTS about developers drawn at random (seeded) from all of them, each
timed from sending the request to the last byte of the body; a few warm-up requests first.
Reports p50/p95/p99/max per endpoint and group, then the export of the heaviest developer's
whole generated range (rows/s, MiB/s, the client's RSS), and writes Markdown.

  analytics_bench.py --base URL --email E --password P --requests N --days D --out FILE
                     [--developers N] [--title TEXT] [--only TEXT]

`--only TEXT` measures only the endpoints whose name contains TEXT, and skips the export.
"""

import argparse
import datetime as dt
import http.client
import json
import random
import resource
import sys
import time
import urllib.parse

TARGET_P95_MS = 100.0


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round((len(sorted_values) - 1) * p)))
    return sorted_values[i]


class Client:
    def __init__(self, base):
        u = urllib.parse.urlparse(base)
        self.host, self.port = u.hostname, u.port
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        self.token = None

    def request(self, method, path, body=None):
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
        except (http.client.HTTPException, OSError):
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
        return resp

    def get_json(self, path):
        resp = self.request("GET", path)
        body = resp.read()
        if resp.status != 200:
            raise SystemExit(f"GET {path}: {resp.status} {body[:300]!r}")
        return json.loads(body)


def endpoints(days):
    today = dt.datetime.now(dt.timezone.utc).date()
    since = today - dt.timedelta(days=days - 1)
    last_month = (today.replace(day=1) - dt.timedelta(days=1)).strftime("%Y-%m")
    rng = f"from={since}&to={today}"
    return [
        ("usage (current period)", "/developer/usage?developer_id={d}"),
        (f"usage ({days} days)", "/developer/usage?developer_id={d}&" + rng),
        ("key usage (current period)", "/developer/keys/{k}/usage?developer_id={d}"),
        ("analytics/overview", "/developer/analytics/overview?developer_id={d}"),
        ("analytics/trends daily", "/developer/analytics/trends?developer_id={d}&" + rng),
        (
            "analytics/trends hourly (last month)",
            "/developer/analytics/trends?granularity=hour&period=" + last_month + "&developer_id={d}",
        ),
        ("analytics/costs", "/developer/analytics/costs?developer_id={d}"),
        ("analytics/performance", "/developer/analytics/performance?developer_id={d}"),
        (f"analytics/performance ({days} days)", "/developer/analytics/performance?developer_id={d}&" + rng),
        ("admin/analytics/overview (current period)", "/admin/analytics/overview"),
        ("admin/analytics/overview (last month)", "/admin/analytics/overview?period=" + last_month),
        ("admin/analytics/overview (" + str(days) + " days, top 100)",
         "/admin/analytics/overview?limit=100&" + rng),
    ]


def measure(client, paths, warmup=3):
    for p in paths[:warmup]:
        client.request("GET", p).read()
    times = []
    for p in paths:
        t0 = time.perf_counter()
        resp = client.request("GET", p)
        body = resp.read()
        elapsed = (time.perf_counter() - t0) * 1000
        if resp.status != 200:
            raise SystemExit(f"GET {p}: {resp.status} {body[:300]!r}")
        times.append(elapsed)
    times.sort()
    return {
        "n": len(times),
        "p50": percentile(times, 0.50),
        "p95": percentile(times, 0.95),
        "p99": percentile(times, 0.99),
        "max": times[-1],
    }


def export(client, developer, days):
    today = dt.datetime.now(dt.timezone.utc).date()
    since = today - dt.timedelta(days=days)
    path = f"/developer/usage/export?developer_id={developer}&from={since}&to={today}"
    t0 = time.perf_counter()
    resp = client.request("GET", path)
    if resp.status != 200:
        raise SystemExit(f"export: {resp.status} {resp.read()[:300]!r}")
    first = None
    lines = 0
    size = 0
    while True:
        chunk = resp.read1(1 << 16) if hasattr(resp, "read1") else resp.read(1 << 16)
        if not chunk:
            break
        if first is None:
            first = time.perf_counter() - t0
        size += len(chunk)
        lines += chunk.count(b"\r\n")
    elapsed = time.perf_counter() - t0
    rows = lines - 1
    return {
        "path": path,
        "rows": rows,
        "bytes": size,
        "seconds": elapsed,
        "first_byte_ms": (first or 0) * 1000,
        "rows_per_s": rows / elapsed,
        "mib_per_s": size / elapsed / (1 << 20),
        "client_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--email", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--developers", type=int, default=10000)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    ap.add_argument("--server-pid", type=int, default=0)
    ap.add_argument("--only", default="", help="only the endpoints whose name contains this")
    a = ap.parse_args()

    c = Client(a.base)
    resp = c.request("POST", "/developer/login", {"email": a.email, "password": a.password})
    body = json.loads(resp.read())
    if resp.status != 200:
        raise SystemExit(f"login: {resp.status} {body}")
    c.token = body["access_token"]

    top = "dev_gen_00000"
    rnd = random.Random(6)
    picks = [f"dev_gen_{rnd.randrange(a.developers):05d}" for _ in range(a.requests)]
    # One key per developer (its first), as the store has them.
    key_of = {}
    for d in set(picks) | {top}:
        key_of[d] = f"key_gen_{d[len('dev_gen_'):]}_0"

    sizes = {}
    rows = []
    for name, template in endpoints(a.days):
        if a.only not in name:
            continue
        groups = [("top", [top] * a.requests)]
        if "{d}" in template:
            groups.append(("random", picks))
        for group, devs in groups:
            paths = [template.format(d=d, k=key_of[d]) for d in devs]
            if "{d}" not in template:
                group = "platform"
            r = measure(c, paths)
            body = c.request("GET", paths[0]).read()
            sizes[(name, group)] = len(body)
            rows.append((name, group, r, len(body)))
            ok = "✓" if r["p95"] <= TARGET_P95_MS else "✗"
            print(
                f"{name:45s} {group:8s} p50 {r['p50']:7.2f} p95 {r['p95']:7.2f} "
                f"p99 {r['p99']:7.2f} max {r['max']:7.2f} ms  {len(body):7d} B {ok}",
                flush=True,
            )

    top_rows = 0 if a.only else c.get_json(f"/developer/usage?developer_id={top}&from="
                          f"{dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=a.days - 1)}"
                          f"&to={dt.datetime.now(dt.timezone.utc).date()}")["totals"]["requests"]
    ex = None if a.only else export(c, top, a.days)
    if ex:
        print(
            f"export {top}: {ex['rows']} rows, {ex['bytes'] / (1 << 20):.1f} MiB in "
            f"{ex['seconds']:.2f} s = {ex['rows_per_s']:.0f} rows/s, {ex['mib_per_s']:.1f} MiB/s; "
            f"first byte after {ex['first_byte_ms']:.0f} ms",
            flush=True,
        )
    server_rss = ""
    if a.server_pid:
        try:
            with open(f"/proc/{a.server_pid}/status") as f:
                st = dict(l.split(":", 1) for l in f if ":" in l)
            server_rss = (f"admin API VmRSS {int(st['VmRSS'].split()[0]) // 1024} MiB, "
                          f"peak VmHWM {int(st['VmHWM'].split()[0]) // 1024} MiB after all of it")
        except OSError:
            pass

    over = [(name, group, r["p95"]) for name, group, r, _ in rows if r["p95"] > TARGET_P95_MS]
    out = [a.title, ""] if a.title else [""]
    verdict = (
        "**met by every row**"
        if not over
        else f"met by {len(rows) - len(over)} of {len(rows)} rows; above it: "
        + ", ".join(f"{n} / {g} ({p:.1f} ms)" for n, g, p in over)
    )
    heaviest = f", {top_rows:,} requests in the last {a.days} days" if top_rows else ""
    out.append(
        f"{a.requests} sequential requests per endpoint and group (one keep-alive connection, "
        f"timed to the last byte, after 3 warm-up requests): `top` = the heaviest developer "
        f"(dev_gen_00000{heaviest}), `random` = "
        f"{a.requests} developers drawn at random from {a.developers:,}, `platform` = the "
        f"operator view. Endpoints without a range parameter read the current period. "
        f"Target p95 ≤ {TARGET_P95_MS:.0f} ms: {verdict}."
        + (f" Only the endpoints named `…{a.only}…`." if a.only else "")
    )
    out.append("")
    out.append("| endpoint | developer | p50 ms | p95 ms | p99 ms | max ms | body |")
    out.append("|---|---|---:|---:|---:|---:|---:|")
    for name, group, r, size in rows:
        out.append(
            f"| {name} | {group} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | "
            f"{r['max']:.2f} | {size / 1024:.1f} KiB |"
        )
    out.append("")
    if ex:
        out.append(
            f"Export (`GET /developer/usage/export`, CSV, streamed) of the heaviest developer's "
            f"{a.days + 1} days: **{ex['rows']:,} rows in {ex['seconds']:.2f} s = "
            f"{ex['rows_per_s']:,.0f} rows/s** ({ex['bytes'] / (1 << 20):.0f} MiB, "
            f"{ex['mib_per_s']:.1f} MiB/s; first byte after {ex['first_byte_ms']:.0f} ms)."
            + (f" {server_rss}." if server_rss else "")
        )
        out.append("")
    with open(a.out, "a") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    sys.exit(main())
