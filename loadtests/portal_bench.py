#!/usr/bin/env python3
"""Server time of the portal's pages and the weight of a page load (issue 7's benchmark).

Called by loadtests/portal-bench.sh, which fills ClickHouse, registers the generated developers
and starts the admin API. Standard library only.

1. Signs developers in the way a person would: the password-reset mail (file transport) gives a
   token, the JSON API sets a password, then the portal's login form (its CSRF token read from
   the page) sets the session cookie. The heaviest developer (dev_gen_00000) and SESSIONS
   developers drawn at random (seeded).
2. For every page: REQUESTS sequential GETs (one keep-alive connection) as the heaviest
   developer, then REQUESTS spread over the random developers, after a few warm-ups. Records the
   server's own time (its `Server-Timing: app;dur=…` header: from the request reaching the portal
   to the rendered page) and the client's time (request sent → last byte).
3. Page weight: the HTML of each page plus every stylesheet, script and image it references,
   raw and gzip-compressed (level 6) — a first visit; later visits fetch only the HTML (assets
   are content-hashed and cached as immutable).

  portal_bench.py --base URL --mail DIR --requests N --sessions N --developers N --out FILE
"""

import argparse
import gzip
import http.client
import json
import os
import random
import re
import sys
import time
import urllib.parse

TARGET_P95_MS = 50.0
MARK = {True: "✓", False: "✗", None: "—"}
PASSWORD = "portal bench password 0000"
PAGES = [
    ("dashboard", "/portal/dashboard"),
    ("usage (this month)", "/portal/usage"),
    ("usage (90 days)", "/portal/usage?from={since}&to={today}"),
    ("billing", "/portal/billing"),
    ("keys", "/portal/keys"),
    ("docs: quick-start", "/portal/docs/quickstart"),
    ("docs: API reference", "/portal/docs/api"),
]


def percentile(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, max(0, round((len(v) - 1) * p)))]


class Browser:
    """One keep-alive connection with a cookie jar (the portal's three cookies)."""

    def __init__(self, base):
        u = urllib.parse.urlparse(base)
        self.host, self.port = u.hostname, u.port
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        self.cookies = {}

    def request(self, method, path, body=None, content_type=None):
        headers = {"Accept": "text/html", "Accept-Language": "en"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if content_type:
            headers["Content-Type"] = content_type
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
                if attempt:
                    raise
        for h, v in resp.getheaders():
            if h.lower() == "set-cookie":
                name, _, rest = v.partition("=")
                self.cookies[name] = rest.split(";", 1)[0]
        return resp, data

    def json(self, method, path, body):
        self.conn.request(method, path, body=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        return resp.status, resp.read()


def mail_token(mail_dir, email, seen):
    deadline = time.time() + 20
    while time.time() < deadline:
        for name in sorted(os.listdir(mail_dir)):
            path = os.path.join(mail_dir, name)
            if path in seen:
                continue
            text = open(path, encoding="utf-8", errors="replace").read()
            if f"To: {email}" in text and "paste this token" in text:
                seen.add(path)
                lines = text.splitlines()
                i = next(i for i, l in enumerate(lines) if "paste this token" in l)
                return lines[i + 1].strip()
        time.sleep(0.02)
    raise SystemExit(f"no reset mail to {email} in {mail_dir}")


def sign_in(base, mail_dir, developer, seen):
    b = Browser(base)
    email = f"dev-gen-{developer:05d}@aihub.test"
    status, body = b.json("POST", "/developer/reset-password", {"email": email})
    if status != 202:
        raise SystemExit(f"reset {email}: {status} {body[:200]!r}")
    token = mail_token(mail_dir, email, seen)
    status, body = b.json("POST", "/developer/reset-password/confirm",
                          {"token": token, "new_password": PASSWORD})
    if status != 200:
        raise SystemExit(f"reset confirm {email}: {status} {body[:200]!r}")
    _, page = b.request("GET", "/portal/login")
    csrf = re.search(rb'name="csrf" value="([^"]+)"', page).group(1).decode()
    form = urllib.parse.urlencode({"csrf": csrf, "next": "/portal/dashboard", "email": email,
                                   "password": PASSWORD})
    resp, body = b.request("POST", "/portal/login", form, "application/x-www-form-urlencoded")
    if resp.status != 303 or "aihub_session" not in b.cookies:
        raise SystemExit(f"portal login {email}: {resp.status} {body[:300]!r}")
    return b


def server_ms(resp):
    m = re.search(r"app;dur=([0-9.]+)", resp.getheader("server-timing") or "")
    if not m:
        raise SystemExit("no Server-Timing header on a portal page")
    return float(m.group(1))


def measure(browsers, path, requests, warmup=3):
    for b in browsers[:warmup]:
        b.request("GET", path)
    server, client = [], []
    for i in range(requests):
        b = browsers[i % len(browsers)]
        t0 = time.perf_counter()
        resp, body = b.request("GET", path)
        client.append((time.perf_counter() - t0) * 1000)
        if resp.status != 200:
            raise SystemExit(f"GET {path}: {resp.status} {body[:300]!r}")
        server.append(server_ms(resp))
    return server, client, len(body)


def weight(b, path):
    _, html = b.request("GET", path)
    refs = re.findall(rb'<(?:link[^>]+href|script[^>]+src|img[^>]+src)="(/[^"]+)"', html)
    parts = [("html", len(html), len(gzip.compress(html, 6)))]
    for ref in dict.fromkeys(refs):
        resp, data = b.request("GET", ref.decode().replace("&amp;", "&"))
        if resp.status != 200:
            raise SystemExit(f"asset {ref!r}: {resp.status}")
        parts.append((ref.decode().rsplit("/", 1)[-1], len(data), len(gzip.compress(data, 6))))
    return parts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--mail", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--developers", type=int, default=10000)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import datetime as dt
    today = dt.datetime.now(dt.timezone.utc).date()
    since = today - dt.timedelta(days=89)
    seen = set()
    rnd = random.Random(7)
    top = [sign_in(a.base, a.mail, 0, seen)]
    others = [sign_in(a.base, a.mail, d, seen)
              for d in sorted(rnd.sample(range(1, a.developers), a.sessions))]

    rows, failed = [], False
    for name, template in PAGES:
        path = template.format(since=since, today=today)
        for group, browsers in (("top", top), ("random", others)):
            server, client, size = measure(browsers, path, a.requests)
            p95 = percentile(server, 0.95)
            # The target is the dashboard's; the other pages are reported for comparison.
            ok = (p95 <= TARGET_P95_MS) if name == "dashboard" else None
            failed |= ok is False
            rows.append((name, group, server, client, size, ok))
            print(f"{name:22s} {group:7s} server p50 {percentile(server, .5):6.2f} "
                  f"p95 {p95:6.2f} p99 {percentile(server, .99):6.2f} max {max(server):6.2f} ms"
                  f" | client p95 {percentile(client, .95):6.2f} ms | {size:6d} B "
                  f"{MARK[ok]}", flush=True)

    weights = [(name, weight(top[0], template.format(since=since, today=today)))
               for name, template in PAGES]

    with open(a.out, "a", encoding="utf-8") as f:
        f.write(f"\nSequential requests, one keep-alive connection; `top` = the heaviest developer "
                f"(dev_gen_00000), `random` = {a.sessions} developers drawn at random (seeded), "
                f"{a.requests} requests each. **Server** = the admin API's `Server-Timing` "
                f"(request in → page rendered, ClickHouse queries included); **client** = sent → "
                f"last byte over loopback. Target: dashboard server p95 ≤ {TARGET_P95_MS:.0f} ms.\n\n")
        f.write("| page | developer | server p50 | server p95 | server p99 | server max "
                "| client p95 | HTML | target p95 ≤ 50 ms |\n|---|---|---:|---:|---:|---:|---:|---:|:-:|\n")
        for name, group, server, client, size, ok in rows:
            f.write(f"| {name} | {group} | {percentile(server, .5):.2f} ms | "
                    f"{percentile(server, .95):.2f} ms | {percentile(server, .99):.2f} ms | "
                    f"{max(server):.2f} ms | {percentile(client, .95):.2f} ms | {size:,} B | "
                    f"{MARK[ok]} |\n")
        f.write("\n## Page weight (first visit: HTML + every referenced asset)\n\n"
                "No web fonts, no images beyond inline SVG charts, one stylesheet and one "
                "script shared by every page (content-hashed URLs, `Cache-Control: immutable`: "
                "a repeat visit downloads the HTML only). gzip = level 6, what a compressing "
                "proxy in front would send; the admin API itself sends identity.\n\n"
                "| page | requests | raw | gzip | of which HTML raw / gzip |\n"
                "|---|---:|---:|---:|---:|\n")
        for name, parts in weights:
            raw = sum(p[1] for p in parts)
            gz = sum(p[2] for p in parts)
            f.write(f"| {name} | {len(parts)} | {raw / 1024:.1f} KiB | {gz / 1024:.1f} KiB | "
                    f"{parts[0][1] / 1024:.1f} / {parts[0][2] / 1024:.1f} KiB |\n")
        assets = {p[0]: p for _, parts in weights for p in parts[1:]}
        f.write("\nAssets: " + ", ".join(f"`{n}` {r / 1024:.1f} KiB raw / {g / 1024:.1f} KiB gzip"
                                          for n, r, g in assets.values()) + ".\n")
    for name, parts in weights:
        print(f"weight {name:22s} {sum(p[1] for p in parts) / 1024:7.1f} KiB raw "
              f"{sum(p[2] for p in parts) / 1024:7.1f} KiB gzip ({len(parts)} requests)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
