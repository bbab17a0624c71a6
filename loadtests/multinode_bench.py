#!/usr/bin/env python3
"""Multi-node benchmark (issue 20): per-node CPU per request with 1, 2 and 3 gateways under the
same load per node, and how fast a revocation reaches all three.

Called by loadtests/multinode-bench.sh, which builds `aihub` in release, installs oha if
missing, checks ClickHouse, PostgreSQL and Redis, creates a fresh PostgreSQL database
(MULTINODE_DATABASE_URL, dropped by the shell script) and runs this script.

The cluster is cli/tests/multinode.rs's, without nginx: one `aihub admin` on the PostgreSQL
database, publishing key changes to Redis; gateways (`server.threads: 1`) following its keys
(`control_plane` with `redis_url`), limits in Redis (a plan whose limits nothing reaches, so
every request makes its Redis round trip) and metering into ClickHouse (a database of this run,
dropped at the end), each with its own WAL folder; the mock upstream behind them.

1. Load: for N in 1, 2, 3 (ROUNDS rounds, the order reversed every other round), N fresh
   gateways; a 1 s warm-up, then one oha per gateway, all started together, each sending
   RATE req/s for DURATION s (`-n RATE*DURATION -q RATE --latency-correction`, a small
   non-streaming chat completion, `model: demo`), each with a key of its own. Per gateway: CPU
   seconds (utime+stime, /proc/PID/stat) over the run ÷ the requests it answered, its CPU share,
   req/s, p50/p99; then the usage rows of its key in ClickHouse against the 200s oha counted.
   The CPU of everything else sharing the machine is recorded beside it.
2. Revocation with 3 gateways: TRIALS times, a new key is created, seen with 200 by every
   gateway (GET /v1/models), revoked (DELETE /developer/keys/{id}); each gateway is polled every
   5 ms until it answers 401; the time until the last one does is the figure (target ≤ 1 s).

Env: RATE (1000), DURATION (10), ROUNDS (2), TRIALS (20), CONNECTIONS (oha connections per
gateway, 50), GATEWAY_CPU (0), LOAD_CPU (1), PIN (1; 0: no taskset), REDIS_URL
(redis://127.0.0.1:6379; keys under a prefix of this run, deleted at the end),
CLICKHOUSE_URL (http://127.0.0.1:8123), MULTINODE_DATABASE_URL (required), KEEP_TMP=1.
Writes loadtests/results/multinode-latest.md and prints it.
"""

import ctypes
import json
import math
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from http.client import HTTPConnection, HTTPException
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("AIHUB_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", "/var/tmp/aihub-target"), "release", "aihub")
RATE = int(os.environ.get("RATE", "1000"))
DURATION = int(os.environ.get("DURATION", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))
TRIALS = int(os.environ.get("TRIALS", "20"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "50"))
GATEWAY_CPU = os.environ.get("GATEWAY_CPU", "0")
LOAD_CPU = os.environ.get("LOAD_CPU", "1")
PIN = os.environ.get("PIN", "1") not in ("", "0")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
CLICKHOUSE_URL = os.environ.get("CLICKHOUSE_URL", "http://127.0.0.1:8123")
DATABASE_URL = os.environ.get("MULTINODE_DATABASE_URL", "")
RUN_ID = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
CH_DB = f"aihub_mnbench_{RUN_ID}"
PREFIX = f"aihub-mnbench-{RUN_ID}"
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
NODES = [1, 2, 3]
# Ports 198xx (proxy-bench 190xx-191xx, limits 194xx, routing 196xx); a gateway's ops port is +1.
MOCK_PORT, ADMIN_PORT, GW_PORTS = 19880, 19881, [19882, 19884, 19886]
EMAIL, PASSWORD = "bench@aihub.test", "correct horse battery staple"
CHAT = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "Write one short sentence."}]})
# Limits nothing reaches (u32 maxima are 4.29e9); the monthly quota is a hard stop.
PLANS = """default_plan: bench
plans:
  bench:
    display_name: Bench
    monthly_price_usd: 0
    included_tokens: 1000000000000000
    overage: false
    requests_per_minute: 1000000000
    tokens_per_minute: 4000000000
    max_concurrent_requests: 100000
"""


# ---------------------------------------------------------------- processes and HTTP

def die_with_parent():
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def pinned(cpu, cmd):
    return (["taskset", "-c", cpu] if PIN else []) + cmd


class Processes:
    """Every long-running process this script starts; stop_all stops them in reverse order."""

    def __init__(self, tmp):
        self.tmp, self.procs, self.logs = tmp, {}, {}

    def start(self, name, cmd, cpu, stdout=None):
        self.logs[name] = os.path.join(self.tmp, f"{name}.log")
        with open(self.logs[name], "w") as log:
            self.procs[name] = subprocess.Popen(pinned(cpu, cmd), stdout=stdout or log, stderr=log,
                                                preexec_fn=die_with_parent, text=True)
        return self.procs[name]

    def tail(self, name, n=20):
        try:
            with open(self.logs[name], errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except (OSError, KeyError):
            return ""

    def stop(self, name, sig=signal.SIGTERM, timeout=30):
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def stop_all(self):
        for name in reversed(list(self.procs)):
            self.stop(name, timeout=10)


def http(method, url, body=None, headers=None, timeout=5):
    """(status, parsed JSON or raw bytes)."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    h = dict(headers or {})
    if isinstance(body, (dict, list)):
        h["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


def wait_until(what, check, timeout, proc=None, procs=None, name=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what}: exited with {proc.returncode}:\n{procs.tail(name)}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{what}: not ready after {timeout} s" + (f":\n{procs.tail(name)}" if procs else ""))


def clickhouse(query):
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{CLICKHOUSE_URL}/", data=query.encode()), timeout=30) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"ClickHouse: {query}: {e.code} {e.read()[:300]!r}")


def redis_cli(*args):
    return subprocess.run(["redis-cli", "-u", REDIS_URL] + list(args), capture_output=True, text=True).stdout


# ---------------------------------------------------------------- CPU accounting

def proc_cpu(pid):
    """(CPU seconds, involuntary context switches of all threads, run-queue wait seconds)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0, 0.0
    cpu = (int(fields[11]) + int(fields[12])) * TICK_S
    nvcsw, wait = 0, 0.0
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                nvcsw += next(int(l.split()[1]) for l in f if l.startswith("nonvoluntary_ctxt_switches"))
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                wait += int(f.read().split()[1]) / 1e9
        except (OSError, StopIteration, IndexError, ValueError):
            pass
    return cpu, nvcsw, wait


def cpu_map(pids):
    return {p: proc_cpu(p)[0] for p in pids if os.path.exists(f"/proc/{p}")}


def cpu_delta(before, after):
    """CPU seconds used between two cpu_map()s by the processes alive at both."""
    return sum(max(0.0, after[p] - before[p]) for p in before if p in after)


def machine_cpu():
    """{cpu name: busy seconds, 'all': …} from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu"):
                name, *v = line.split()
                v = [int(x) for x in v[:8]]
                out["all" if name == "cpu" else name] = (sum(v) - v[3] - v[4]) * TICK_S  # minus idle, iowait
    return out


def pids_by_name(name):
    return [int(p) for p in subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()]


def listener_pid(port):
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    for part in out.split("pid=")[1:]:
        return int(part.split(",")[0])
    return None


# ---------------------------------------------------------------- the cluster

def admin_api(method, path, body=None, token=None):
    h = {"Authorization": f"Bearer {token}"} if token else {}
    return http(method, f"http://127.0.0.1:{ADMIN_PORT}{path}", body, h)


def start_admin(procs, tmp):
    mail = os.path.join(tmp, "mail")
    conf = os.path.join(tmp, "admin.yaml")
    with open(conf, "w") as f:
        f.write(f"""listen: 127.0.0.1:{ADMIN_PORT}
database: {{url: "{DATABASE_URL}"}}
email: {{transport: {{kind: file, dir: "{mail}"}}}}
auth: {{argon2_memory_kib: 8192, argon2_iterations: 1}}
tasks: {{files_dir: "{tmp}/files"}}
plans_file: {tmp}/plans.yaml
redis: {{url: "{REDIS_URL}"}}
""")
    p = procs.start("admin", [BIN, "admin", "--config", conf], LOAD_CPU)
    wait_until("admin", lambda: http("GET", f"http://127.0.0.1:{ADMIN_PORT}/readyz", timeout=1)[0] == 200, 60,
               p, procs, "admin")
    status, body = admin_api("POST", "/developer/register", {"email": EMAIL, "password": PASSWORD, "full_name": "Bench"})
    if status != 202:
        raise SystemExit(f"register: {status} {body}")
    token = None
    deadline = time.time() + 10
    while token is None and time.time() < deadline:
        for name in os.listdir(mail) if os.path.isdir(mail) else []:
            with open(os.path.join(mail, name), errors="replace") as f:
                lines = f.read().splitlines()
            if any(l.strip() == f"To: {EMAIL}" for l in lines):
                token = next((lines[i + 1].strip() for i, l in enumerate(lines[:-1]) if "paste this token" in l), None)
        time.sleep(0.05)
    if token is None:
        raise SystemExit(f"no verification mail in {mail}")
    status, body = admin_api("POST", "/developer/verify-email", {"token": token})
    if status != 200:
        raise SystemExit(f"verify-email: {status} {body}")
    status, body = admin_api("POST", "/developer/login", {"email": EMAIL, "password": PASSWORD})
    if status != 200:
        raise SystemExit(f"login: {status} {body}")
    return body["access_token"]


def create_key(session, name):
    status, body = admin_api("POST", "/developer/keys", {"name": name}, session)
    if status != 201:
        raise SystemExit(f"POST /developer/keys: {status} {body}")
    return body["key"], body["api_key"]["id"]


def start_gateways(procs, tmp, n, tag):
    names = []
    for i in range(n):
        port, name = GW_PORTS[i], f"gw-{tag}-{i + 1}"
        conf = os.path.join(tmp, f"{name}.yaml")
        with open(conf, "w") as f:
            f.write(f"""server:
  listen: ["127.0.0.1:{port}"]
  ops_listen: 127.0.0.1:{port + 1}
  threads: 1
  pid_file: {tmp}/{name}.pid
  upgrade_sock: {tmp}/{name}.sock
upstreams:
  mock:
    endpoints: ["http://127.0.0.1:{MOCK_PORT}/v1"]
routes:
  - model: demo
    upstream: mock
keys: []
control_plane:
  database_url: "{DATABASE_URL}"
  redis_url: "{REDIS_URL}"
limits:
  plans_file: {tmp}/plans.yaml
  default_max_tokens: 1024
  redis: {{url: "{REDIS_URL}", prefix: "{PREFIX}", timeout: 50ms}}
metering:
  clickhouse: {{url: "{CLICKHOUSE_URL}", database: {CH_DB}}}
  wal_dir: {tmp}/wal-{name}
""")
        procs.start(name, [BIN, "gateway", "--config", conf], GATEWAY_CPU)
        names.append(name)
    for i, name in enumerate(names):
        wait_until(name, lambda i=i: http("GET", f"http://127.0.0.1:{GW_PORTS[i] + 1}/readyz", timeout=1)[0] == 200,
                   60, procs.procs[name], procs, name)
    return names


def log_warnings(procs, names):
    out = []
    for name in names:
        try:
            with open(procs.logs[name], errors="replace") as f:
                for line in f:
                    if (" WARN " in line or " ERROR " in line) and "aihub::access" not in line:
                        out.append(f"{name}: {line.strip()[:300]}")
        except OSError:
            pass
    return out[:10]


# ---------------------------------------------------------------- load

def oha_cmd(port, key, rate, n):
    return pinned(LOAD_CPU, ["oha", "--no-tui", "--output-format", "json", "-n", str(n), "-q", str(rate),
                             "-c", str(CONNECTIONS), "--latency-correction", "-m", "POST", "-d", CHAT,
                             "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {key}",
                             f"http://127.0.0.1:{port}/v1/chat/completions"])


def run_ohas(cmds):
    """Starts every command at once; their parsed JSON outputs."""
    outs = [tempfile.TemporaryFile(mode="w+") for _ in cmds]
    ps = [subprocess.Popen(c, stdout=o, stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
          for c, o in zip(cmds, outs)]
    results = []
    for p, o in zip(ps, outs):
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"oha failed ({p.returncode}): {err}")
        o.seek(0)
        results.append(json.loads(o.read()))
    return results


def one_run(procs, tmp, n, rnd, keys, warm_key, others):
    names = start_gateways(procs, tmp, n, f"r{rnd}-n{n}")
    gw = [procs.procs[x].pid for x in names]
    try:
        for i in range(n):  # every node answers the run's key before the load
            s, _ = http("GET", f"http://127.0.0.1:{GW_PORTS[i]}/v1/models", headers={"Authorization": f"Bearer {keys[i][0]}"})
            if s != 200:
                raise SystemExit(f"{names[i]}: GET /v1/models with the run's key: {s}")
        run_ohas([oha_cmd(GW_PORTS[i], warm_key, RATE, RATE) for i in range(n)])  # 1 s warm-up
        before = [proc_cpu(p) for p in gw]
        other_before = {k: cpu_map(v) for k, v in others.items()}
        mach_before, kids_before = machine_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        outs = run_ohas([oha_cmd(GW_PORTS[i], keys[i][0], RATE, RATE * DURATION) for i in range(n)])
        wall = time.monotonic() - t0
        after = [proc_cpu(p) for p in gw]
        other = {k: cpu_delta(other_before[k], cpu_map(v)) for k, v in others.items()}
        mach_after, kids_after = machine_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
        other["oha"] = (kids_after.ru_utime + kids_after.ru_stime) - (kids_before.ru_utime + kids_before.ru_stime)
        other["gateways"] = sum(a[0] - b[0] for a, b in zip(after, before))
        machine = {k: (mach_after[k] - mach_before[k]) / wall for k in mach_after}
        nodes = []
        for i, (o, b, a) in enumerate(zip(outs, before, after)):
            codes = {int(k): v for k, v in o["statusCodeDistribution"].items()}
            answered, ok = sum(codes.values()), codes.get(200, 0)
            errors = sum(o.get("errorDistribution", {}).values())
            pct = o["latencyPercentiles"]
            nodes.append({"cpu_us": (a[0] - b[0]) / max(answered, 1) * 1e6, "busy": (a[0] - b[0]) / wall,
                          "rps": o["summary"].get("requestsPerSec") or answered / wall,
                          "p50": (pct["p50"] or 0) * 1000, "p99": (pct["p99"] or 0) * 1000,
                          "answered": answered, "ok": ok, "errors": errors, "sent": RATE * DURATION,
                          "nvcsw": (a[1] - b[1]) / max(answered, 1), "wait_us": (a[2] - b[2]) / max(answered, 1) * 1e6,
                          "key_id": keys[i][1]})
        usage = usage_rows([k[1] for k in keys[:n]], [x["ok"] for x in nodes])
        for x, rows in zip(nodes, usage):
            x["rows"] = rows
        warnings = log_warnings(procs, names)
        m = [gateway_metrics(i, ["aihub_rate_limited_total", "aihub_limits_redis_errors_total", "aihub_limits_redis_up",
                                 "aihub_limits_nodes"]) for i in range(n)]
    finally:
        for name in names:
            procs.stop(name)
    return {"n": n, "round": rnd, "wall": wall, "nodes": nodes, "machine": machine,
            "other": {k: v / wall for k, v in other.items()}, "warnings": warnings, "metrics": m}


def gateway_metrics(i, names):
    """{name: sum of its series} from gateway i's /metrics."""
    out = {k: 0.0 for k in names}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{GW_PORTS[i] + 1}/metrics", timeout=5) as r:
            for line in r.read().decode(errors="replace").splitlines():
                for k in names:
                    if line.startswith(k) and line[len(k):len(k) + 1] in (" ", "{"):
                        out[k] += float(line.rsplit(" ", 1)[1])
    except (OSError, ValueError):
        pass
    return out


def usage_rows(key_ids, want, timeout=30):
    """Rows per key in ClickHouse, waiting up to `timeout` s for them to reach `want`."""
    deadline = time.time() + timeout
    while True:
        ids = ", ".join(f"'{k}'" for k in key_ids)
        text = clickhouse(f"SELECT key_id, count() FROM {CH_DB}.usage_events WHERE key_id IN ({ids}) GROUP BY key_id FORMAT TSV")
        got = {l.split("\t")[0]: int(l.split("\t")[1]) for l in text.splitlines() if l}
        rows = [got.get(k, 0) for k in key_ids]
        if all(r >= w for r, w in zip(rows, want)) or time.time() > deadline:
            return rows
        time.sleep(0.5)


# ---------------------------------------------------------------- revocation

def poll_until(port, key, want, t0, deadline, out, idx):
    """GET /v1/models every 5 ms on one keep-alive connection until `want`; out[idx] = seconds since t0."""
    conn = None
    while time.monotonic() < deadline:
        try:
            conn = conn or HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
            r = conn.getresponse()
            r.read()
            if r.status == want:
                out[idx] = time.monotonic() - t0
                break
        except (OSError, HTTPException):
            conn = None
        time.sleep(0.005)
    if conn:
        conn.close()


def poll_all(key, want, timeout=5.0):
    """Polls the three gateways at once from now on; their times (None: never)."""
    t0 = time.monotonic()
    out = [None] * 3
    ts = [threading.Thread(target=poll_until, args=(GW_PORTS[i], key, want, t0, t0 + timeout, out, i)) for i in range(3)]
    for t in ts:
        t.start()
    return t0, ts, out


def revocations(procs, tmp, session):
    names = start_gateways(procs, tmp, 3, "revoke")
    trials = []
    try:
        for t in range(TRIALS):
            key, key_id = create_key(session, f"revoke-{t}")
            _, ts, seen = poll_all(key, 200)
            for th in ts:
                th.join()
            if None in seen:
                raise SystemExit(f"trial {t + 1}: a new key is not accepted by every gateway within 5 s: {seen}")
            time.sleep(random.uniform(0.1, 0.6))  # not in step with any poll interval
            d0 = time.monotonic()
            t0, ts, out = poll_all(key, 401)
            status, body = admin_api("DELETE", f"/developer/keys/{key_id}", token=session)
            deleted = time.monotonic() - d0
            if status not in (200, 204):
                raise SystemExit(f"DELETE /developer/keys/{key_id}: {status} {body}")
            for th in ts:
                th.join()
            trials.append({"created": max(seen), "deleted": deleted, "nodes": out})
            print(f"revocation {t + 1}/{TRIALS}: DELETE answered in {deleted * 1000:.0f} ms; gateways "
                  + ", ".join("never" if x is None else f"{x * 1000:.0f} ms" for x in out), file=sys.stderr, flush=True)
        warnings = log_warnings(procs, names)
    finally:
        for name in names:
            procs.stop(name)
    return trials, warnings


# ---------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pctl(xs, p):
    """Nearest-rank percentile."""
    xs = sorted(xs)
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)] if xs else None


def f(v, d=1):
    return "–" if v is None else f"{v:.{d}f}"


def report(runs, trials, rev_warn, notes, meta):
    by_n = {n: [r for r in runs if r["n"] == n] for n in NODES}
    mean_cpu = {n: med([statistics.mean(x["cpu_us"] for x in r["nodes"]) for r in rs]) for n, rs in by_n.items()}
    base = mean_cpu[1]
    L = ["# Multi-node benchmark: per-node CPU per request at 1–3 gateways; revocation (issue 20)", "",
         f"- Date: {meta['date']}", f"- Revision: {meta['revision']}",
         f"- Machine: `nproc` = {meta['nproc']}, {meta['cpu']}; load average {meta['load_before']} before, "
         f"{meta['load_after']} after", f"- Command: `{meta['command']}` (wall time {meta['wall']})",
         f"- Cluster: one `aihub admin` on a fresh PostgreSQL database, key changes published to Redis; N gateways "
         "(release, `server.threads: 1`) following its keys (`control_plane` with `redis_url`), limits in Redis "
         "(a plan with per-minute request/token limits, a concurrency cap and a hard-stop monthly quota, none reached: "
         "every request makes its Redis round trip), metering into ClickHouse with a WAL folder per gateway; "
         "access log on (to a file); `aihub mock-upstream --threads 1` behind them.",
         f"- Load: every gateway driven directly by its own oha, all started together: `oha -n {RATE * DURATION} "
         f"-q {RATE} -c {CONNECTIONS} --latency-correction` ({RATE} req/s for {DURATION} s; a small non-streaming "
         "chat completion, `model: demo`), a key per gateway, after a 1 s warm-up at the same rate. "
         f"{ROUNDS} round(s), N = 1, 2, 3 then reversed; medians over rounds.",
         "- CPU µs/req: the gateway's utime+stime (/proc/PID/stat, all threads) over the run ÷ the requests it "
         "answered; node CPU % = the same CPU seconds ÷ wall time (100 % = one core). preempt/req: its involuntary "
         "context switches per request; wait µs/req: time its threads were runnable but waiting for a CPU "
         "(/proc/PID/task/*/schedstat), per request.",
         "- Shared machine: " + (f"gateways pinned to CPU {GATEWAY_CPU}; oha, the mock and the admin to CPU {LOAD_CPU}; "
                                 if PIN else "nothing pinned; ")
         + "Redis, ClickHouse and PostgreSQL (the machine's own servers) unpinned. All of them share these "
         f"{meta['nproc']} cores; on real nodes each gateway would have its machine to itself.", ""]
    L += ["## Per-node CPU per request (medians)", "",
          "| nodes | mean CPU µs/req | vs 1 node | per node CPU µs/req | node CPU % | req/s per node | p50 ms | p99 ms "
          "| preempt/req | wait µs/req | success |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, rs in by_n.items():
        per = [med([r["nodes"][i]["cpu_us"] for r in rs]) for i in range(n)]
        col = lambda k, d=1: f(med([statistics.mean(x[k] for x in r["nodes"]) for r in rs]), d)  # noqa: E731
        ok = sum(x["ok"] for r in rs for x in r["nodes"])
        sent = sum(x["sent"] for r in rs for x in r["nodes"])
        L.append(f"| {n} | {f(mean_cpu[n])} | {f(mean_cpu[n] / base, 2) + '×' if base else '–'} | "
                 f"{' / '.join(f(v) for v in per)} | {f(med([statistics.mean(x['busy'] for x in r['nodes']) * 100 for r in rs]))} % | "
                 f"{col('rps', 0)} | {col('p50', 2)} | {col('p99', 2)} | {col('nvcsw', 2)} | {col('wait_us')} | "
                 f"{ok:,}/{sent:,} ({ok / sent * 100:.2f} %) |")
    spread = max(mean_cpu.values()) / min(mean_cpu.values()) - 1 if base else None
    L += ["", f"Mean CPU µs/req from 1 to 3 nodes: {' → '.join(f(mean_cpu[n]) for n in NODES)} "
          f"(largest ÷ smallest − 1 = {f(spread * 100 if spread is not None else None)} %). Means, node CPU %, "
          "req/s and latencies are the mean over the nodes of a run, median over the rounds.", ""]
    L += ["## What shared the machine (CPU % of one core during the run, medians)", "",
          "| nodes | machine busy (all cores) | " + " | ".join(sorted(k for k in runs[0]["machine"] if k != "all"))
          + " | gateways | oha | mock | admin | Redis | ClickHouse | PostgreSQL |",
          "|---|---|" + "---|" * (len(runs[0]["machine"]) - 1) + "---|---|---|---|---|---|---|"]
    for n, rs in by_n.items():
        m = lambda k, src: f(med([r[src].get(k, 0) * 100 for r in rs]), 0)  # noqa: E731
        L.append(f"| {n} | {m('all', 'machine')} % of {meta['nproc'] * 100} % | "
                 + " | ".join(f"{m(k, 'machine')} %" for k in sorted(rs[0]["machine"]) if k != "all") + " | "
                 + " | ".join(f"{m(k, 'other')} %" for k in ("gateways", "oha", "mock", "admin", "redis", "clickhouse", "postgres")) + " |")
    L += ["", "## Revocation with 3 gateways", ""]
    if trials:
        last = [max(t["nodes"]) for t in trials if None not in t["nodes"]]
        never = sum(1 for t in trials if None in t["nodes"])
        first = [min(x for x in t["nodes"] if x is not None) for t in trials if any(x is not None for x in t["nodes"])]
        ms = lambda xs, p: f(pctl(xs, p) * 1000 if xs else None, 0)  # noqa: E731
        L += ["| trials | last gateway p50 | p90 | max | first gateway p50 | DELETE answered p50 | new key seen by all p50 "
              "| not reached in 5 s | target ≤ 1 s |", "|---|---|---|---|---|---|---|---|---|",
              f"| {len(trials)} | {ms(last, 50)} ms | {ms(last, 90)} ms | {ms(last, 100)} ms | {ms(first, 50)} ms | "
              f"{ms([t['deleted'] for t in trials], 50)} ms | {ms([t['created'] for t in trials], 50)} ms | {never} | "
              f"{'met' if last and never == 0 and max(last) <= 1.0 else '**not met**'} |", "",
              "Times from just before the DELETE /developer/keys/{id} is sent to the first 401 on GET /v1/models "
              "(each gateway polled every 5 ms on a keep-alive connection); no load meanwhile. "
              "`new key seen by all` = from the key's creation to 200 on every gateway.", ""]
    L += ["## Usage rows against the 200s oha counted", "",
          "| round | nodes | node | 200s (oha) | other answers / errors | usage rows | equal |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        for i, x in enumerate(r["nodes"]):
            L.append(f"| {r['round']} | {r['n']} | {i + 1} | {x['ok']:,} | {x['answered'] - x['ok']} / {x['errors']} | "
                     f"{x['rows']:,} | {'yes' if x['rows'] == x['ok'] else '**no**'} |")
    L += ["", "Rows of each run's key (one key per gateway and run) in `usage_events`, waited for up to 30 s.", "",
          "<details><summary>Per run</summary>", "",
          "| round | nodes | node | CPU µs/req | node CPU % | req/s | p50 ms | p99 ms | preempt/req | wait µs/req |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for i, x in enumerate(r["nodes"]):
            L.append(f"| {r['round']} | {r['n']} | {i + 1} | {f(x['cpu_us'])} | {f(x['busy'] * 100)} | {f(x['rps'], 0)} | "
                     f"{f(x['p50'], 2)} | {f(x['p99'], 2)} | {f(x['nvcsw'], 2)} | {f(x['wait_us'])} |")
    L += ["", "</details>"]
    for r in runs:
        for i, m in enumerate(r["metrics"]):
            bad = {k: v for k, v in m.items() if (k == "aihub_limits_redis_up" and v != 1)
                   or (k == "aihub_limits_nodes" and v != r["n"]) or (k.endswith("_total") and v)}
            if bad:
                notes.append(f"round {r['round']}, {r['n']} node(s), node {i + 1} after the run: "
                             + ", ".join(f"{k} = {v:.0f}" for k, v in bad.items()))
        notes += [f"round {r['round']}, {r['n']} node(s): {w}" for w in r["warnings"]]
    notes += [f"revocation: {w}" for w in rev_warn]
    if notes:
        L += ["", "## Notes", ""] + [f"- {x}" for x in notes]
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------- main

def main():
    if not DATABASE_URL:
        raise SystemExit("MULTINODE_DATABASE_URL is not set: run loadtests/multinode-bench.sh")
    for tool in ["oha", "redis-cli", "ss", "pgrep"] + (["taskset"] if PIN else []):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run loadtests/multinode-bench.sh")
    if not os.access(BIN, os.X_OK):
        raise SystemExit(f"{BIN} not found: run loadtests/multinode-bench.sh (or set AIHUB_BIN)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "nproc": os.cpu_count(), "cpu": cpu_model,
            "revision": git("rev-parse", "--short", "HEAD")
            + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""),
            "command": os.environ.get("MULTINODE_BENCH_COMMAND", "python3 loadtests/multinode_bench.py"),
            "load_before": "/".join(open("/proc/loadavg").read().split()[:3])}
    tmp = tempfile.mkdtemp(prefix="aihub-multinode-bench-")
    procs = Processes(tmp)
    failed = True
    runs, trials, rev_warn, notes = [], [], [], []
    try:
        with open(os.path.join(tmp, "plans.yaml"), "w") as fh:
            fh.write(PLANS)
        mock = procs.start("mock", [BIN, "mock-upstream", "--listen", f"127.0.0.1:{MOCK_PORT}", "--threads", "1"], LOAD_CPU)
        wait_until("mock", lambda: http("GET", f"http://127.0.0.1:{MOCK_PORT}/v1/models", timeout=1)[0] == 200, 30,
                   mock, procs, "mock")
        session = start_admin(procs, tmp)
        warm_key, _ = create_key(session, "warm-up")
        keys = {(rnd, n): [create_key(session, f"load-r{rnd}-n{n}-{i + 1}") for i in range(n)]
                for rnd in range(1, ROUNDS + 1) for n in NODES}
        redis_pid = next((int(l.split(":")[1]) for l in redis_cli("INFO", "server").splitlines()
                          if l.startswith("process_id:")), None)
        ch_pid = listener_pid(int(CLICKHOUSE_URL.rsplit(":", 1)[1].split("/")[0]))
        others = {"mock": [mock.pid], "admin": [procs.procs["admin"].pid],
                  "redis": [redis_pid] if redis_pid and os.path.exists(f"/proc/{redis_pid}") else [],
                  "clickhouse": [ch_pid] if ch_pid else [], "postgres": pids_by_name("postgres")}
        if not others["redis"] or not others["clickhouse"]:
            notes.append("the CPU of Redis or ClickHouse could not be read (no pid found): shown as 0")
        for rnd in range(1, ROUNDS + 1):
            for n in (NODES if rnd % 2 else NODES[::-1]):
                others["postgres"] = pids_by_name("postgres")  # backends come and go
                r = one_run(procs, tmp, n, rnd, keys[(rnd, n)], warm_key, others)
                runs.append(r)
                print(f"round {rnd}, {n} node(s): " + "; ".join(
                    f"node {i + 1} {x['cpu_us']:.1f} µs/req, {x['busy'] * 100:.1f} % CPU, {x['rps']:.0f} req/s, "
                    f"p50 {x['p50']:.2f} p99 {x['p99']:.2f} ms, {x['ok']}/{x['sent']} 200, {x['rows']} rows"
                    for i, x in enumerate(r["nodes"])), file=sys.stderr, flush=True)
        if TRIALS > 0:
            trials, rev_warn = revocations(procs, tmp, session)
        failed = False
    finally:
        procs.stop_all()
        try:
            clickhouse(f"DROP DATABASE IF EXISTS {CH_DB}")
        except (RuntimeError, OSError) as e:
            print(f"could not drop ClickHouse database {CH_DB}: {e}", file=sys.stderr)
        stale = redis_cli("--scan", "--pattern", f"{PREFIX}*").split()
        for i in range(0, len(stale), 500):
            redis_cli("DEL", *stale[i:i + 500])
        if failed or os.environ.get("KEEP_TMP"):
            print(f"logs and configs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = int(time.monotonic() - started)
    meta["wall"] = f"{wall // 60} min {wall % 60} s"
    meta["load_after"] = "/".join(open("/proc/loadavg").read().split()[:3])
    text = report(runs, trials, rev_warn, notes, meta)
    out = os.path.join(ROOT, "loadtests", "results", "multinode-latest.md")
    with open(out, "w") as fh:
        fh.write(text)
    print(text)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
