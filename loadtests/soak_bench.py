#!/usr/bin/env python3
"""Soak (issue 21): the gateway and the admin API under a fixed, mixed load for DURATION s;
resources sampled all along, usage rows checked against the answers at the end.

Run by loadtests/soak.sh (release build, a fresh PostgreSQL database in SOAK_DATABASE_URL).
The deployment is the multi-node benchmark's with one gateway: the mock upstream; one
`aihub admin` on PostgreSQL publishing key changes to Redis; a gateway (`server.threads:
GATEWAY_THREADS`) following its keys, limits in Redis, metering into ClickHouse (a database of
this run, dropped at the end) through its WAL folder.

Load, open loop at RATE req/s (each request is scheduled at its time whatever the previous ones
do; its latency counts from that time), in a fixed cycle of 20: 8 JSON chat completions, 4 SSE
streams with `stream_options.include_usage`, 3 SSE streams without (the gateway asks the
upstream for usage and strips it: none may reach the client), 3 embeddings, 2 chat completions on
a key limited to LIMITED_RPM requests/min (created through the admin API with `rate_limit_rpm`;
its 429s are expected). Beside it, every CHURN_EVERY s, a key churn through the admin API: create
a key, wait for the gateway to accept it, 3 requests; regenerate it (no grace period), wait for
the old key's refusal, 2 requests on the new key and 1 on the old one (401 expected); delete the
new key, wait for its refusal, 1 request on it (401 expected). Every answer's body is checked
(usage in JSON answers, `[DONE]` and usage as asked in streams, the OpenAI error shape).

Every SAMPLE s: the gateway's and the admin's VmRSS, threads and open FDs, the WAL folder's bytes
and `aihub_usage_wal_bytes`, the interval's answers by outcome and its latency p50/p99 (the
unlimited requests' 200s). CSV in the run folder and loadtests/results/soak-latest.csv.

At the end (load stopped, the pipeline drained until `aihub_usage_wal_bytes` and the queue are 0)
the verdicts, each failing the run when not met:
- rows: usage rows in ClickHouse, by status, equal the answers by status exactly, for every status
  the gateway records (authenticated model calls: 200 and 429); unknown keys' 401s are not
  recorded, so no 401 row; no duplicate request id; rows = `aihub_usage_rows_written_total`;
  no dead-lettered row.
- errors: no answer but 200, the limited key's 429s and the 401s on rotated or deleted keys (a
  transport error, a 5xx, another 4xx, a bad body all count as unexpected); every key change
  reached the gateway within 5 s.
- flat, from the warm-up mark (the first sample at or after DURATION/6, 10 min of an hour) to
  the last sample under load: RSS (gateway, admin) ≤ mark × 1.10 + 8 MiB; open FDs of every sample
  after the mark within mark ± FD_SLACK; threads ≤ mark + 4; the WAL folder ≤ WAL_BOUND bytes at
  every sample, and `aihub_usage_wal_bytes` = 0 after the drain.
- rate: at least 97 % of the scheduled requests were sent on time (within 1 s of their slot).

Writes loadtests/results/soak-latest.md. Settings (env): see loadtests/soak.sh.
"""

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection, HTTPException

import benchlib as lib
from soak_report import RECORDED, answers_by_status, report, verdicts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("AIHUB_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", "/var/tmp/aihub-target"), "release", "aihub")
DURATION = int(os.environ.get("DURATION", "3600"))
RATE = float(os.environ.get("RATE", "40"))
SAMPLE = int(os.environ.get("SAMPLE") or (30 if DURATION >= 1800 else max(5, DURATION // 30)))
LIMITED_RPM = int(os.environ.get("LIMITED_RPM", "30"))
CHURN_EVERY = float(os.environ.get("CHURN_EVERY", "5"))
WORKERS = int(os.environ.get("WORKERS", "32"))
GATEWAY_THREADS = int(os.environ.get("GATEWAY_THREADS", "2"))
FD_SLACK = int(os.environ.get("FD_SLACK", "24"))
WAL_BOUND = int(os.environ.get("WAL_BOUND", str(16 << 20)))
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
CLICKHOUSE_URL = os.environ.get("CLICKHOUSE_URL", "http://127.0.0.1:8123")
DATABASE_URL = os.environ.get("SOAK_DATABASE_URL", "")
RUN_ID = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
RUN_DIR = os.environ.get("RUN_DIR") or f"/var/tmp/aihub-soak/{RUN_ID}"
CH_DB = f"aihub_soak_{RUN_ID}"
PREFIX = f"aihub-soak-{RUN_ID}"
# PORT_BASE (19960): the mock, the admin API, the gateway and its ops listener on the next four.
_BASE = int(os.environ.get("PORT_BASE", "19960"))
MOCK_PORT, ADMIN_PORT, GW_PORT = _BASE, _BASE + 1, _BASE + 2  # the gateway's ops listener: +3
ADMIN, OPS = f"http://127.0.0.1:{ADMIN_PORT}", f"http://127.0.0.1:{GW_PORT + 1}"
MIB = 1 << 20
# A client connection idle this long is closed rather than reused: well under the gateway's
# server.idle_timeout (60 s), so a request never races the gateway closing an idle connection.
CLIENT_IDLE = 20
PLANS = ("default_plan: soak\nplans:\n  soak: {display_name: Soak, monthly_price_usd: 0, included_tokens: "
         "1000000000000000, overage: false, requests_per_minute: 1000000000, tokens_per_minute: 4000000000, "
         "max_concurrent_requests: 100000}\n")
MESSAGES = [{"role": "user", "content": "Write one short sentence."}]
BODIES = {
    "chat": ("/v1/chat/completions", {"model": "demo", "messages": MESSAGES}),
    "stream_usage": ("/v1/chat/completions", {"model": "demo", "messages": MESSAGES, "stream": True,
                                              "stream_options": {"include_usage": True}}),
    "stream": ("/v1/chat/completions", {"model": "demo", "messages": MESSAGES, "stream": True}),
    "embed": ("/v1/embeddings", {"model": "demo", "input": "The quick brown fox."}),
}
CYCLE = ["chat", "stream_usage", "chat", "embed", "stream", "chat", "limited", "stream_usage", "chat", "embed",
         "chat", "stream", "stream_usage", "chat", "limited", "embed", "chat", "stream", "stream_usage", "chat"]
# The statuses each kind of request may get; anything else is unexpected.
EXPECTED = {"chat": {200}, "stream_usage": {200}, "stream": {200}, "embed": {200}, "limited": {200, 429},
            "churn_live": {200}, "churn_rotated": {401}, "churn_deleted": {401}}
COLUMNS = ["t_s", "gw_rss_mib", "gw_anon_mib", "gw_fds", "gw_threads", "admin_rss_mib", "admin_anon_mib", "admin_fds",
           "admin_threads",
           "wal_dir_bytes", "wal_metric_bytes", "sent", "ok_2xx", "limited_429", "revoked_401",
           "unexpected", "p50_ms", "p99_ms"]


class Tally:
    """Answers by kind and outcome, overall and for the current sampling interval."""

    def __init__(self):
        self.lock = threading.Lock()
        self.total = Counter()  # (kind, outcome)
        self.interval, self.latencies = Counter(), []
        self.examples = {}  # an unexpected outcome → its first detail

    def add(self, kind, outcome, latency, detail=""):
        ok = outcome in EXPECTED[kind]
        with self.lock:
            self.total[(kind, outcome)] += 1
            self.interval["sent"] += 1
            if not ok:
                self.interval["unexpected"] += 1
                self.examples.setdefault((kind, outcome), detail[:300])
            elif outcome == 200:
                self.interval["ok_2xx"] += 1
                if kind in BODIES:
                    self.latencies.append(latency)
            elif outcome == 429:
                self.interval["limited_429"] += 1
            elif outcome == 401:
                self.interval["revoked_401"] += 1

    def take_interval(self):
        with self.lock:
            out, lat = self.interval, self.latencies
            self.interval, self.latencies = Counter(), []
        return out, lat


TALLY = Tally()
LOCAL = threading.local()


def check_body(kind, status, raw):
    """'' when the answer's body is what its kind and status should carry; else what is wrong."""
    if status != 200:
        try:
            err = json.loads(raw)["error"]
            return "" if all(k in err for k in ("message", "type", "code")) else f"error shape: {raw[:200]!r}"
        except (ValueError, KeyError, TypeError):
            return f"not an OpenAI error: {raw[:200]!r}"
    if kind.startswith("stream"):
        events = [l[6:] for l in raw.decode(errors="replace").split("\n") if l.startswith("data: ")]
        if not events or events[-1].strip() != "[DONE]":
            return "stream without [DONE]"
        usage = [json.loads(e).get("usage") for e in events[:-1]]
        if kind == "stream_usage" and not any(u and u.get("total_tokens") for u in usage):
            return "stream_options.include_usage but no usage chunk"
        if kind == "stream" and any(u for u in usage):
            return "usage not asked for reached the client"
        return ""
    try:
        body = json.loads(raw)
    except ValueError:
        return f"not JSON: {raw[:200]!r}"
    return "" if (body.get("usage") or {}).get("total_tokens") else f"no usage: {raw[:200]!r}"


def call(kind, key, path, body, scheduled):
    """One request on this thread's keep-alive connection; tallied with its latency from `scheduled`."""
    data = json.dumps(body).encode()
    conn = getattr(LOCAL, "conn", None)
    if conn is not None and time.monotonic() - LOCAL.used > CLIENT_IDLE:
        conn.close()  # the gateway may be closing it (server.idle_timeout): never race that
        conn = None
    try:
        conn = conn or HTTPConnection("127.0.0.1", GW_PORT, timeout=30)
        LOCAL.conn = conn
        conn.request("POST", path, data, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        r = conn.getresponse()
        raw = r.read()
        status = r.status
        LOCAL.used = time.monotonic()
    except (OSError, HTTPException) as e:
        LOCAL.conn = None
        TALLY.add(kind, f"error:{type(e).__name__}", time.monotonic() - scheduled, str(e))
        return None
    bad = check_body(kind, status, raw)
    TALLY.add(kind, f"bad_body:{status}" if bad else status, time.monotonic() - scheduled, bad)
    return status


def load(stop, keys, lags):
    """Schedules RATE req/s in the fixed CYCLE until `stop`; the lateness of every slot in `lags`."""
    pool = ThreadPoolExecutor(WORKERS)
    t0, i = time.monotonic(), 0
    while not stop.is_set():
        slot = t0 + i / RATE
        delay = slot - time.monotonic()
        if delay > 0:
            stop.wait(delay)
            if stop.is_set():
                break
        kind = CYCLE[i % len(CYCLE)]
        path, body = BODIES["chat" if kind == "limited" else kind]
        lags.append(time.monotonic() - slot)
        pool.submit(call, kind, keys["limited" if kind == "limited" else "main"], path, body, slot)
        i += 1
    pool.shutdown(wait=True)


def seen(key, want, timeout=5.0):
    """Seconds until GET /v1/models with `key` answers `want` (a key change reaching the
    gateway), or None after `timeout` s."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if lib.http("GET", f"http://127.0.0.1:{GW_PORT}/v1/models", headers={"Authorization": f"Bearer {key}"},
                        timeout=2)[0] == want:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.01)
    return None


def churn(stop, session, record):
    """Key churn through the admin API every CHURN_EVERY s until `stop`; each change's
    propagation time (or None) appended to record[what]."""
    auth = {"Authorization": f"Bearer {session}"}
    chat = BODIES["chat"]
    n = 0
    while not stop.is_set():
        started = time.monotonic()
        n += 1
        try:
            made = lib.expect((201,), "create key", lib.http("POST", f"{ADMIN}/developer/keys", {"name": f"churn-{n}"}, auth))
            old, key_id = made["key"], made["api_key"]["id"]
            record["created"].append(seen(old, 200))
            for _ in range(3):
                call("churn_live", old, *chat, time.monotonic())
            rot = lib.expect((201,), "regenerate key", lib.http(
                "POST", f"{ADMIN}/developer/keys/{key_id}/regenerate", {"grace_period_seconds": 0}, auth))
            new, new_id = rot["key"], rot["api_key"]["id"]
            record["rotated"].append(seen(old, 401))
            record["created"].append(seen(new, 200))
            for _ in range(2):
                call("churn_live", new, *chat, time.monotonic())
            call("churn_rotated", old, *chat, time.monotonic())
            lib.expect((204,), "delete key", lib.http("DELETE", f"{ADMIN}/developer/keys/{new_id}", None, auth))
            record["deleted"].append(seen(new, 401))
            call("churn_deleted", new, *chat, time.monotonic())
        except (SystemExit, OSError) as e:  # an admin API failure is a finding, not the end of the soak
            record["admin_errors"].append(f"{time.strftime('%H:%M:%S')} {e}"[:300])
        stop.wait(max(0.0, CHURN_EVERY - (time.monotonic() - started)))


def sample(t, procs, wal_dir):
    interval, lat = TALLY.take_interval()
    gw = lib.proc_status(procs.procs["gateway"].pid) or (0, 0, 0, 0)
    ad = lib.proc_status(procs.procs["admin"].pid) or (0, 0, 0, 0)
    try:
        m = lib.metrics(f"{OPS}/metrics")
    except OSError:
        m = {}
    p = lambda q: round(lib.pctl(lat, q) * 1000, 2) if lat else ""  # noqa: E731
    return {"t_s": round(t), "gw_rss_mib": round(gw[0] / MIB, 2), "gw_anon_mib": round(gw[3] / MIB, 2),
            "gw_fds": gw[2], "gw_threads": gw[1], "admin_rss_mib": round(ad[0] / MIB, 2),
            "admin_anon_mib": round(ad[3] / MIB, 2), "admin_fds": ad[2], "admin_threads": ad[1],
            "wal_dir_bytes": lib.dir_bytes(wal_dir), "wal_metric_bytes": int(m.get("aihub_usage_wal_bytes", -1)),
            "sent": interval["sent"],
            "ok_2xx": interval["ok_2xx"], "limited_429": interval["limited_429"],
            "revoked_401": interval["revoked_401"], "unexpected": interval["unexpected"],
            "p50_ms": p(50), "p99_ms": p(99)}


def write_configs(tmp):
    with open(os.path.join(tmp, "plans.yaml"), "w") as f:
        f.write(PLANS)
    conf = os.path.join(tmp, "gateway.yaml")
    with open(conf, "w") as f:
        f.write(f"""server: {{listen: ["127.0.0.1:{GW_PORT}"], ops_listen: "127.0.0.1:{GW_PORT + 1}", threads: {GATEWAY_THREADS},
         pid_file: "{tmp}/gateway.pid", upgrade_sock: "{tmp}/gateway.sock"}}
upstreams: {{mock: {{endpoints: ["http://127.0.0.1:{MOCK_PORT}/v1"]}}}}
routes: [{{model: demo, upstream: mock}}]
keys: []
control_plane: {{database_url: "{DATABASE_URL}", redis_url: "{REDIS_URL}"}}
limits:
  plans_file: "{tmp}/plans.yaml"
  default_max_tokens: 1024
  redis: {{url: "{REDIS_URL}", prefix: "{PREFIX}", timeout: 50ms}}
metering: {{clickhouse: {{url: "{CLICKHOUSE_URL}", database: {CH_DB}}}, wal_dir: "{tmp}/wal"}}
""")
    return conf


def drain(timeout=120):
    """Seconds until the gateway holds no usage record any more: no WAL bytes, and nothing
    queued or held in memory where the gateway has those gauges (None: not within `timeout`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = lib.metrics(f"{OPS}/metrics")
        if m.get("aihub_usage_wal_bytes") == 0 and all(
                m.get(g, 0) == 0 for g in ("aihub_usage_queue_depth", "aihub_usage_unwritten_rows")):
            return time.monotonic() - t0
        time.sleep(0.2)
    return None


def usage_rows(want_total, timeout=60):
    """{status: rows}, distinct request ids; waits up to `timeout` s for `want_total` rows."""
    deadline = time.time() + timeout
    while True:
        text = lib.clickhouse(CLICKHOUSE_URL, f"SELECT status, count(), uniqExact(request_id) FROM {CH_DB}.usage_events "
                              "GROUP BY status FORMAT TSV")
        rows = {int(s): (int(c), int(u)) for s, c, u in (l.split("\t") for l in text.splitlines())}
        if sum(c for c, _ in rows.values()) >= want_total or time.time() > deadline:
            return rows
        time.sleep(0.5)


def log_notes(procs, names, top=8):
    """The WARN and ERROR lines of the processes' logs: each message once (numbers aside), with
    its count, most frequent first."""
    out = []
    for name in names:
        seen = Counter()
        first = {}
        with open(procs.logs[name], errors="replace") as f:
            for line in f:
                if " WARN " in line or " ERROR " in line:
                    text = line.split(None, 1)[-1].strip()[:240]
                    k = re.sub(r"\d+", "#", text)
                    seen[k] += 1
                    first.setdefault(k, text)
        out += [f"{name}: {first[k]} (×{n:,})" for k, n in seen.most_common(top)]
    return out


def main():
    if not DATABASE_URL or not os.access(BIN, os.X_OK):
        raise SystemExit(f"no SOAK_DATABASE_URL or {BIN}: run loadtests/soak.sh")
    for port in (MOCK_PORT, ADMIN_PORT, GW_PORT, GW_PORT + 1):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                raise SystemExit(f"port {port} is in use: stop what listens there (ss -ltnp 'sport = :{port}')")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.makedirs(RUN_DIR, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "revision": lib.git_revision(ROOT),
            "command": os.environ.get("SOAK_COMMAND", "python3 loadtests/soak_bench.py"), "run_dir": RUN_DIR,
            "nproc": os.cpu_count(), "binary": BIN, "load_before": "/".join(open("/proc/loadavg").read().split()[:3])}
    procs = lib.Processes(RUN_DIR)
    samples, lags, failed = [], [], True
    record = {"created": [], "rotated": [], "deleted": [], "admin_errors": []}
    end = {}
    try:
        conf = write_configs(RUN_DIR)
        procs.start("mock", [BIN, "mock-upstream", "--listen", f"127.0.0.1:{MOCK_PORT}", "--threads", "1"])
        lib.wait_ready(procs, "mock", f"http://127.0.0.1:{MOCK_PORT}/v1/models")
        procs.start("admin", [BIN, "admin", "--config", lib.admin_config(
            RUN_DIR, ADMIN_PORT, DATABASE_URL, REDIS_URL, os.path.join(RUN_DIR, "plans.yaml"))])
        lib.wait_ready(procs, "admin", f"{ADMIN}/readyz")
        session = lib.sign_up(ADMIN, os.path.join(RUN_DIR, "mail"))
        m = subprocess.run([BIN, "migrate", "--config", conf, "--admin-config", os.path.join(RUN_DIR, "none")],
                           capture_output=True, text=True)
        if m.returncode != 0:
            raise SystemExit(f"aihub migrate failed:\n{m.stdout}{m.stderr}")
        auth = {"Authorization": f"Bearer {session}"}
        keys = {"main": lib.expect((201,), "create key", lib.http("POST", f"{ADMIN}/developer/keys", {"name": "soak"}, auth))["key"],
                "limited": lib.expect((201,), "create limited key", lib.http(
                    "POST", f"{ADMIN}/developer/keys", {"name": "soak-limited", "rate_limit_rpm": LIMITED_RPM}, auth))["key"]}
        procs.start("gateway", [BIN, "gateway", "--config", conf])
        lib.wait_ready(procs, "gateway", f"{OPS}/readyz")
        for k in keys.values():
            if seen(k, 200, 10) is None:
                raise SystemExit("the gateway does not accept the run's keys")
        print(f"soak: {DURATION} s at {RATE:g} req/s + key churn every {CHURN_EVERY:g} s, sampled every {SAMPLE} s; "
              f"run folder {RUN_DIR}", file=sys.stderr, flush=True)
        stop = threading.Event()
        threads = [threading.Thread(target=load, args=(stop, keys, lags)),
                   threading.Thread(target=churn, args=(stop, session, record))]
        t0 = time.monotonic()
        TALLY.take_interval()
        for t in threads:
            t.start()
        with open(os.path.join(RUN_DIR, "samples.csv"), "w", newline="") as fh:
            out = csv.DictWriter(fh, COLUMNS)
            out.writeheader()
            k = 1
            while True:
                time.sleep(max(0.0, t0 + k * SAMPLE - time.monotonic()))
                s = sample(time.monotonic() - t0, procs, os.path.join(RUN_DIR, "wal"))
                samples.append(s)
                out.writerow(s)
                fh.flush()
                print(" ".join(f"{c}={s[c]}" for c in COLUMNS), file=sys.stderr, flush=True)
                for name in ("gateway", "admin"):
                    if procs.procs[name].poll() is not None:
                        raise SystemExit(f"{name} exited with {procs.procs[name].returncode}:\n{procs.tail(name)}")
                if k * SAMPLE >= DURATION:
                    break
                k += 1
            stop.set()
            for t in threads:
                t.join()
            end["load_stopped"] = time.monotonic() - t0
        end["drain_s"] = drain()
        end["after_drain"] = sample(time.monotonic() - t0, procs, os.path.join(RUN_DIR, "wal"))
        with TALLY.lock:
            recorded = sum(n for s, n in answers_by_status(TALLY.total).items() if s in RECORDED)
        end["rows"] = usage_rows(recorded)
        mt = lib.metrics(f"{OPS}/metrics")
        end["rows_written_metric"] = int(mt.get("aihub_usage_rows_written_total", -1))
        end["dead_lettered"] = int(mt.get("aihub_usage_dead_lettered_rows_total", 0))
        end["log_notes"] = log_notes(procs, ("gateway", "admin"))
        end["gateway_exit"] = procs.stop("gateway")
        end["admin_exit"] = procs.stop("admin")
        failed = False
    finally:
        procs.stop_all()
        try:
            lib.clickhouse(CLICKHOUSE_URL, f"DROP DATABASE IF EXISTS {CH_DB}")
        except (RuntimeError, OSError) as e:
            print(f"could not drop ClickHouse database {CH_DB}: {e}", file=sys.stderr)
        lib.delete_redis_prefix(REDIS_URL, PREFIX)
        if failed:
            print(f"logs and configs kept in {RUN_DIR}", file=sys.stderr)
    meta["load_after"] = "/".join(open("/proc/loadavg").read().split()[:3])
    results = os.path.join(ROOT, "loadtests", "results")
    shutil.copy(os.path.join(RUN_DIR, "samples.csv"), os.path.join(results, "soak-latest.csv"))
    cfg = {"duration": DURATION, "rate": RATE, "sample": SAMPLE, "limited_rpm": LIMITED_RPM, "churn_every": CHURN_EVERY,
           "workers": WORKERS, "gateway_threads": GATEWAY_THREADS, "fd_slack": FD_SLACK, "wal_bound": WAL_BOUND}
    with TALLY.lock:
        totals = dict(TALLY.total)
    checks = verdicts(cfg, samples, lags, record, end, totals, EXPECTED)
    text = report(cfg, samples, lags, record, end, totals, TALLY.examples, checks, meta)
    with open(os.path.join(results, "soak-latest.md"), "w") as fh:
        fh.write(text)
    print(text)
    print(f"written to {results}/soak-latest.md; samples in {RUN_DIR}/samples.csv", file=sys.stderr)
    bad = [c["what"] for c in checks if not c["ok"]]
    if bad:
        print("soak FAILED: " + "; ".join(bad), file=sys.stderr)
        sys.exit(1)
    print("soak passed: every verdict met", file=sys.stderr)


if __name__ == "__main__":
    main()
