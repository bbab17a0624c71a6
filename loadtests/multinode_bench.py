#!/usr/bin/env python3
"""Multi-node benchmark (issue 20): per-node CPU per request with 1, 2 and 3 gateways under the
same load per node, and how fast a revocation reaches all three.

Run by loadtests/multinode-bench.sh (release build, oha, a fresh PostgreSQL database in
MULTINODE_DATABASE_URL). The cluster is cli/tests/multinode.rs's without nginx: the mock upstream;
one `aihub admin` on PostgreSQL publishing key changes to Redis; gateways (`server.threads: 1`)
following its keys (`control_plane` with `redis_url`), limits in Redis (a plan nothing reaches,
so every request makes its Redis round trip), metering into ClickHouse (a database of this run,
dropped at the end) with a WAL folder each.

1. Load: for N in 1, 2, 3 (ROUNDS rounds, the order reversed every other round), N fresh
   gateways; a 1 s warm-up, then one oha per gateway, all started together, each sending RATE
   req/s for DURATION s (a small non-streaming chat completion, `model: demo`) with a key of
   its own. Per gateway: CPU seconds (utime+stime, /proc/PID/stat) ÷ the requests it answered,
   its CPU share, req/s, p50/p99, then its key's usage rows in ClickHouse against oha's 200s.
   The CPU of everything else sharing the machine is recorded beside it.
2. Revocation with 3 gateways, TRIALS times: a new key is seen with 200 by every gateway
   (GET /v1/models), revoked (DELETE /developer/keys/{id}), each gateway polled every 5 ms
   until it answers 401; the figure is the time until the last one does (target ≤ 1 s).

Settings (env) as in loadtests/multinode-bench.sh. Writes loadtests/results/multinode-latest.md.
"""

import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection, HTTPException

from benchlib import Processes, admin_config, delete_redis_prefix, die_with_parent, expect, http, pctl, sign_up, wait_ready
import benchlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("AIHUB_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", "/var/tmp/aihub-target"), "release", "aihub")
RATE = int(os.environ.get("RATE", "1000"))
DURATION = int(os.environ.get("DURATION", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))
TRIALS = int(os.environ.get("TRIALS", "20"))
IDLE = 5  # seconds of idle CPU measured after each run
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
POOL = ThreadPoolExecutor(3)  # the revocation's pollers
NODES = [1, 2, 3]
# Ports 198xx (proxy-bench 190xx-191xx, limits 194xx, routing 196xx); a gateway's ops port is +1.
MOCK_PORT, ADMIN_PORT, GW_PORTS = 19880, 19881, [19882, 19884, 19886]
CHAT = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "Write one short sentence."}]})
# Limits nothing reaches (u32 maxima are 4.29e9); the monthly quota is a hard stop.
PLANS = ("default_plan: bench\nplans:\n  bench: {display_name: Bench, monthly_price_usd: 0, included_tokens: "
         "1000000000000000, overage: false, requests_per_minute: 1000000000, tokens_per_minute: 4000000000, "
         "max_concurrent_requests: 100000}\n")


def pinned(cpu, cmd):
    return (["taskset", "-c", cpu] if PIN else []) + cmd


def clickhouse(query):
    return benchlib.clickhouse(CLICKHOUSE_URL, query)


def redis_cli(*args):
    return benchlib.redis_cli(REDIS_URL, *args)


def proc_cpu(pid):
    """(CPU seconds, voluntary and involuntary context switches of all its threads, seconds its
    threads were runnable but waiting for a CPU)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0, 0, 0.0
    vcsw, nvcsw, wait = 0, 0, 0.0
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                ctx = {k: int(v) for k, v in (l.split(":") for l in f if "ctxt_switches" in l)}
            vcsw, nvcsw = vcsw + ctx["voluntary_ctxt_switches"], nvcsw + ctx["nonvoluntary_ctxt_switches"]
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                wait += int(f.read().split()[1]) / 1e9
        except (OSError, KeyError, IndexError, ValueError):
            pass
    return (int(fields[11]) + int(fields[12])) * TICK_S, vcsw, nvcsw, wait


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


def pids(cmd, after=None):
    """The pids `cmd` prints (pgrep), or those following `after` in its output (ss -p: "pid=")."""
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    return [int(x.split(",")[0]) for x in out.split(after)[1:]] if after else [int(x) for x in out.split()]


def admin_api(method, path, body=None, token=None):
    h = {"Authorization": f"Bearer {token}"} if token else {}
    return http(method, f"http://127.0.0.1:{ADMIN_PORT}{path}", body, h)


def start_admin(procs, tmp):
    conf = admin_config(tmp, ADMIN_PORT, DATABASE_URL, REDIS_URL, os.path.join(tmp, "plans.yaml"))
    procs.start("admin", [BIN, "admin", "--config", conf], LOAD_CPU if PIN else None)
    wait_ready(procs, "admin", f"http://127.0.0.1:{ADMIN_PORT}/readyz")
    return sign_up(f"http://127.0.0.1:{ADMIN_PORT}", os.path.join(tmp, "mail"))


def create_key(session, name):
    body = expect((201,), "POST /developer/keys", admin_api("POST", "/developer/keys", {"name": name}, session))
    return body["key"], body["api_key"]["id"]


def gateway_config(tmp, i, name, tag):
    """Gateway i's configuration file (limits under a Redis prefix per `tag`: each run its own nodes)."""
    port, conf = GW_PORTS[i], os.path.join(tmp, f"{name}.yaml")
    with open(conf, "w") as f:
        f.write(f"""server: {{listen: ["127.0.0.1:{port}"], ops_listen: "127.0.0.1:{port + 1}", threads: 1,
         pid_file: "{tmp}/{name}.pid", upgrade_sock: "{tmp}/{name}.sock"}}
upstreams: {{mock: {{endpoints: ["http://127.0.0.1:{MOCK_PORT}/v1"]}}}}
routes: [{{model: demo, upstream: mock}}]
keys: []
control_plane: {{database_url: "{DATABASE_URL}", redis_url: "{REDIS_URL}"}}
limits:
  plans_file: "{tmp}/plans.yaml"
  default_max_tokens: 1024
  redis: {{url: "{REDIS_URL}", prefix: "{PREFIX}-{tag}", timeout: 50ms}}
metering: {{clickhouse: {{url: "{CLICKHOUSE_URL}", database: {CH_DB}}}, wal_dir: "{tmp}/wal-{name}"}}
""")
    return conf


def start_gateways(procs, tmp, n, tag):
    names = [f"gw-{tag}-{i + 1}" for i in range(n)]
    for i, name in enumerate(names):
        procs.start(name, [BIN, "gateway", "--config", gateway_config(tmp, i, name, tag)], GATEWAY_CPU if PIN else None)
    for port, name in zip(GW_PORTS, names):
        wait_ready(procs, name, f"http://127.0.0.1:{port + 1}/readyz")
    return names


def node_notes(procs, names, counters=("aihub_rate_limited_total", "aihub_limits_redis_errors_total")):
    """What is worth a note about running gateways: WARN/ERROR lines of their logs, non-zero
    `counters`, Redis limits not up, another number of nodes sharing the limits than started."""
    out = []
    for i, name in enumerate(names):
        seen = {}  # the same message (numbers aside) once, with its count
        with open(procs.logs[name], errors="replace") as f:
            for line in (l.split(None, 1)[-1].strip()[:300] for l in f if " WARN " in l or " ERROR " in l):
                seen.setdefault(re.sub(r"\d+", "#", line), [line, 0])[1] += 1
        out += [f"{name}: {text} (×{n}; first shown)" if n > 1 else f"{name}: {text}" for text, n in seen.values()]
        with urllib.request.urlopen(f"http://127.0.0.1:{GW_PORTS[i] + 1}/metrics", timeout=5) as r:
            m = {}
            for line in r.read().decode(errors="replace").splitlines():
                name_part = line.split("{")[0].split(" ")[0]
                if not line.startswith("#") and " " in line:
                    m[name_part] = m.get(name_part, 0.0) + float(line.rsplit(" ", 1)[1])
        bad = {k: m.get(k, 0) for k in counters if m.get(k)}
        bad.update({k: m.get(k) for k, want in (("aihub_limits_redis_up", 1), ("aihub_limits_nodes", len(names)))
                    if m.get(k) != want})
        if bad:
            out.append(f"{name}: " + ", ".join(f"{k} = {v}" for k, v in bad.items()))
    return out


def oha_cmd(port, key, rate, n):
    return pinned(LOAD_CPU, ["oha", "--no-tui", "--output-format", "json", "-n", str(n), "-q", str(rate),
                             "-c", str(CONNECTIONS), "--latency-correction", "-m", "POST", "-d", CHAT,
                             "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {key}",
                             f"http://127.0.0.1:{port}/v1/chat/completions"])


def run_ohas(cmds):
    """Starts every command at once; their parsed JSON outputs (a few KB each: no pipe fills up)."""
    ps = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
          for c in cmds]
    outs = [p.communicate() for p in ps]
    for p, (_, err) in zip(ps, outs):
        if p.returncode != 0:
            raise SystemExit(f"oha failed ({p.returncode}): {err}")
    return [json.loads(out) for out, _ in outs]


def one_run(procs, tmp, n, rnd, keys, warm_key, others):
    names = start_gateways(procs, tmp, n, f"r{rnd}-n{n}")
    gw = [procs.procs[x].pid for x in names]
    try:
        for i in range(n):  # every node answers the run's key before the load
            expect((200,), f"{names[i]}: GET /v1/models with the run's key",
                   http("GET", f"http://127.0.0.1:{GW_PORTS[i]}/v1/models", headers={"Authorization": f"Bearer {keys[i][0]}"}))
        run_ohas([oha_cmd(GW_PORTS[i], warm_key, RATE, RATE) for i in range(n)])  # 1 s warm-up
        before = [proc_cpu(p) for p in gw]
        other_before = {k: {p: proc_cpu(p)[0] for p in v} for k, v in others.items()}
        mach_before, kids_before = machine_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        outs = run_ohas([oha_cmd(GW_PORTS[i], keys[i][0], RATE, RATE * DURATION) for i in range(n)])
        wall = time.monotonic() - t0
        after = [proc_cpu(p) for p in gw]
        # A process that ended meanwhile (a PostgreSQL backend) counts 0: its CPU falls in `rest`.
        other = {k: sum(max(0.0, proc_cpu(p)[0] - c) for p, c in other_before[k].items()) for k in others}
        mach_after, kids_after = machine_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
        other["oha"] = (kids_after.ru_utime + kids_after.ru_stime) - (kids_before.ru_utime + kids_before.ru_stime)
        other["gateways"] = sum(a[0] - b[0] for a, b in zip(after, before))
        machine = {k: (mach_after[k] - mach_before[k]) / wall for k in mach_after}
        other["rest"] = max(0.0, machine["all"] * wall - sum(other.values()))
        nodes = []
        for o, b, a in zip(outs, before, after):
            codes, pct = {int(k): v for k, v in o["statusCodeDistribution"].items()}, o["latencyPercentiles"]
            answered = sum(codes.values())
            cpu, vcsw, nvcsw, waited = (x / max(answered, 1) for x in (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3]))
            nodes.append({"cpu_us": cpu * 1e6, "busy": (a[0] - b[0]) / wall, "vcsw": vcsw, "nvcsw": nvcsw,
                          "wait_us": waited * 1e6, "rps": o["summary"]["requestsPerSec"], "p50": (pct["p50"] or 0) * 1000,
                          "p99": (pct["p99"] or 0) * 1000, "answered": answered, "ok": codes.get(200, 0),
                          "errors": sum(o.get("errorDistribution", {}).values()), "sent": RATE * DURATION})
        usage = usage_rows([k[1] for k in keys[:n]], [x["ok"] for x in nodes])
        idle0 = [proc_cpu(p)[0] for p in gw]
        time.sleep(IDLE)  # the nodes without requests: their fixed cost (timers, polls, flushes)
        for x, rows, b, p in zip(nodes, usage, idle0, gw):
            x["rows"], x["idle"] = rows, (proc_cpu(p)[0] - b) / IDLE
            x["net_us"] = x["cpu_us"] - x["idle"] * wall / max(x["answered"], 1) * 1e6
        warnings = node_notes(procs, names)
    finally:
        for name in names:
            procs.stop(name)
    return {"n": n, "round": rnd, "wall": wall, "nodes": nodes, "machine": machine,
            "other": {k: v / wall for k, v in other.items()}, "warnings": warnings}


def usage_rows(key_ids, want, timeout=30):
    """Rows per key in ClickHouse, waiting up to `timeout` s for them to reach `want`."""
    deadline, ids = time.time() + timeout, ", ".join(f"'{k}'" for k in key_ids)
    while True:
        text = clickhouse(f"SELECT key_id, count() FROM {CH_DB}.usage_events WHERE key_id IN ({ids}) GROUP BY key_id FORMAT TSV")
        got = dict(l.split("\t") for l in text.splitlines())
        rows = [int(got.get(k, 0)) for k in key_ids]
        if all(r >= w for r, w in zip(rows, want)) or time.time() > deadline:
            return rows
        time.sleep(0.5)


def poll(port, key, want, t0, timeout):
    """GET /v1/models every 5 ms on one keep-alive connection until it answers `want`: the
    seconds since t0, or None after `timeout`."""
    conn = None
    while time.monotonic() < t0 + timeout:
        try:
            conn = conn or HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
            r = conn.getresponse()
            r.read()
            if r.status == want:
                return time.monotonic() - t0
        except (OSError, HTTPException):
            conn = None
        time.sleep(0.005)
    return None


def poll_all(key, want, timeout=5.0):
    """Polls the three gateways at once from now; a function waiting for their times."""
    t0 = time.monotonic()
    futures = [POOL.submit(poll, port, key, want, t0, timeout) for port in GW_PORTS]
    return lambda: [fu.result() for fu in futures]


def revocations(procs, tmp, session):
    names = start_gateways(procs, tmp, 3, "revoke")
    trials = []
    try:
        for t in range(TRIALS):
            key, key_id = create_key(session, f"revoke-{t}")
            seen = poll_all(key, 200)()
            if None in seen:
                raise SystemExit(f"trial {t + 1}: a new key is not accepted by every gateway within 5 s: {seen}")
            time.sleep(random.uniform(0.1, 0.6))  # not in step with any poll interval
            d0 = time.monotonic()
            join = poll_all(key, 401)
            answer = admin_api("DELETE", f"/developer/keys/{key_id}", token=session)
            deleted = time.monotonic() - d0
            expect((200, 204), f"DELETE /developer/keys/{key_id}", answer)
            out = join()
            trials.append({"created": max(seen), "deleted": deleted, "nodes": out})
            print(f"revocation {t + 1}/{TRIALS}: DELETE answered in {deleted * 1000:.0f} ms; gateways "
                  + ", ".join("never" if x is None else f"{x * 1000:.0f} ms" for x in out), file=sys.stderr, flush=True)
        warnings = node_notes(procs, names)
    finally:
        for name in names:
            procs.stop(name)
    return trials, warnings


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


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
         "answered; node CPU % = the same CPU seconds ÷ wall time (100 % = one core). sleeps/req: its threads' voluntary "
         "context switches (going to sleep for want of work) per request; preempt/req: its involuntary "
         "context switches per request; wait µs/req: time its threads were runnable but waiting for a CPU "
         "(/proc/PID/task/*/schedstat), per request.",
         "- Shared machine: " + (f"gateways pinned to CPU {GATEWAY_CPU}; oha, the mock and the admin to CPU {LOAD_CPU}; "
                                 if PIN else "nothing pinned; ")
         + "Redis, ClickHouse and PostgreSQL (the machine's own servers) unpinned. All of them share these "
         f"{meta['nproc']} cores; on real nodes each gateway would have its machine to itself.", ""]
    L += ["## Per-node CPU per request (medians)", "",
          "| nodes | mean CPU µs/req | vs 1 node | per node CPU µs/req | node CPU % | idle node CPU % | CPU µs/req net of idle "
          "| req/s per node | p50 ms | p99 ms | sleeps/req | preempt/req | wait µs/req | success |", "|" + "---|" * 14]
    for n, rs in by_n.items():
        per = [med([r["nodes"][i]["cpu_us"] for r in rs]) for i in range(n)]
        col = lambda k, d=1, x100=1: f(med([statistics.mean(x[k] for x in r["nodes"]) * x100 for r in rs]), d)  # noqa: E731
        ok = sum(x["ok"] for r in rs for x in r["nodes"])
        sent = sum(x["sent"] for r in rs for x in r["nodes"])
        L.append(f"| {n} | {f(mean_cpu[n])} | {f(mean_cpu[n] / base, 2) + '×' if base else '–'} | "
                 f"{' / '.join(f(v) for v in per)} | {col('busy', 1, 100)} % | {col('idle', 2, 100)} % | {col('net_us')} | "
                 f"{col('rps', 0)} | {col('p50', 2)} | {col('p99', 2)} | {col('vcsw', 2)} | {col('nvcsw', 2)} | {col('wait_us')} | "
                 f"{ok:,}/{sent:,} ({ok / sent * 100:.2f} %) |")
    flat = all(mean_cpu[n] <= base * 1.10 for n in NODES) if base else None
    every = [x for r in runs for x in r["nodes"]]
    L += ["", f"- **Per-node CPU per request does not grow with the nodes (2 and 3 nodes ≤ 1.10× 1 node's): "
          f"{'–' if flat is None else 'met' if flat else 'not met'}**: {' → '.join(f(mean_cpu[n]) for n in NODES)} "
          f"µs/req ({', '.join(f'{n} nodes {mean_cpu[n] / base:.2f}×' for n in NODES[1:]) if base else '–'}).",
          f"- Every request answered 200: {'yes' if all(x['ok'] == x['sent'] for x in every) else '**no**'}; usage rows "
          f"= oha's 200s for every node and run: {'yes' if all(x['rows'] == x['ok'] for x in every) else '**no**'}.", "",
          "Means, node CPU %, req/s and latencies are the mean over the nodes of a run, median over the rounds. Idle node CPU %: "
          f"each node's CPU during {IDLE} s without requests after the run (timers, key-feed polls, flushes); net of "
          "idle = CPU µs/req minus that idle rate over the run's wall time.", ""]
    cpus = sorted(k for k in runs[0]["machine"] if k != "all")
    parts = ("gateways", "oha", "mock", "admin", "redis", "clickhouse", "postgres", "rest")
    L += ["## What shared the machine (CPU % of one core during the run, medians)", "",
          "| nodes | machine busy (all cores) | " + " | ".join(cpus) + " | gateways | oha | mock | admin | Redis "
          "| ClickHouse | PostgreSQL | everything else |", "|---|---|" + "---|" * (len(cpus) + len(parts))]
    for n, rs in by_n.items():
        m = lambda k, src: f(med([r[src].get(k, 0) * 100 for r in rs]), 0)  # noqa: E731
        L.append(f"| {n} | {m('all', 'machine')} % of {meta['nproc'] * 100} % | "
                 + " | ".join(f"{m(k, 'machine')} %" for k in cpus) + " | "
                 + " | ".join(f"{m(k, 'other')} %" for k in parts) + " |")
    L += ["", "Redis, ClickHouse and PostgreSQL are the machine's shared servers: their CPU counts every client's "
          "work. `everything else` = machine busy − the processes listed (kernel threads, other jobs)."]
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
    L += ["## Per run and node; usage rows against the 200s oha counted", "",
          "| round | nodes | node | CPU µs/req | node CPU % | idle % | req/s | p50 ms | p99 ms | sleeps/req | preempt/req "
          "| wait µs/req | 200s (oha) | other answers / errors | usage rows | rows = 200s |", "|" + "---|" * 16]
    for r in runs:
        for i, x in enumerate(r["nodes"]):
            L.append(f"| {r['round']} | {r['n']} | {i + 1} | {f(x['cpu_us'])} | {f(x['busy'] * 100)} | {f(x['idle'] * 100, 2)} | {f(x['rps'], 0)} | "
                     f"{f(x['p50'], 2)} | {f(x['p99'], 2)} | {f(x['vcsw'], 2)} | {f(x['nvcsw'], 2)} | {f(x['wait_us'])} | {x['ok']:,} | "
                     f"{x['answered'] - x['ok']} / {x['errors']} | {x['rows']:,} | {'yes' if x['rows'] == x['ok'] else '**no**'} |")
    L += ["", "Usage rows: those of the run's key (one key per gateway and run) in `usage_events`, waited for up to 30 s."]
    for r in runs:
        notes += [f"round {r['round']}, {r['n']} node(s): {w}" for w in r["warnings"]]
    notes += [f"revocation: {w}" for w in rev_warn]
    if notes:
        L += ["", "## Notes", ""] + [f"- {x}" for x in notes]
    return "\n".join(L) + "\n"


def main():
    if not DATABASE_URL or not os.access(BIN, os.X_OK) or not shutil.which("oha"):
        raise SystemExit(f"no MULTINODE_DATABASE_URL, {BIN} or oha: run loadtests/multinode-bench.sh")
    for port in [MOCK_PORT, ADMIN_PORT] + [p + d for p in GW_PORTS for d in (0, 1)]:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                raise SystemExit(f"port {port} is in use: stop what listens there (ss -ltnp 'sport = :{port}')")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "nproc": len(os.sched_getaffinity(0)), "cpu": cpu_model,
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
        mock = procs.start("mock", [BIN, "mock-upstream", "--listen", f"127.0.0.1:{MOCK_PORT}", "--threads", "1"], LOAD_CPU if PIN else None)
        wait_ready(procs, "mock", f"http://127.0.0.1:{MOCK_PORT}/v1/models")
        session = start_admin(procs, tmp)
        # The usage schema first, as a deployment does, rather than raced by the first nodes.
        m = subprocess.run([BIN, "migrate", "--config", gateway_config(tmp, 0, "migrate", "migrate"),
                            "--admin-config", os.path.join(tmp, "none")], capture_output=True, text=True)
        if m.returncode != 0:
            raise SystemExit(f"aihub migrate failed:\n{m.stdout}{m.stderr}")
        warm_key, _ = create_key(session, "warm-up")
        keys = {(rnd, n): [create_key(session, f"load-r{rnd}-n{n}-{i + 1}") for i in range(n)]
                for rnd in range(1, ROUNDS + 1) for n in NODES}
        redis = [int(l.split(":")[1]) for l in redis_cli("INFO", "server").splitlines() if l.startswith("process_id:")]
        others = {"mock": [mock.pid], "admin": [procs.procs["admin"].pid], "postgres": [],
                  "redis": [p for p in redis if os.path.exists(f"/proc/{p}")],  # not if Redis runs elsewhere
                  "clickhouse": pids(["ss", "-ltnpH", f"sport = :{CLICKHOUSE_URL.rsplit(':', 1)[1].strip('/')}"], "pid=")[:1]}
        if not others["redis"] or not others["clickhouse"]:
            notes.append("the CPU of Redis or ClickHouse could not be read (no pid found): shown as 0")
        for rnd in range(1, ROUNDS + 1):
            for n in (NODES if rnd % 2 else NODES[::-1]):
                others["postgres"] = pids(["pgrep", "-x", "postgres"])  # backends come and go
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
        for name in reversed(list(procs.procs)):
            procs.stop(name, timeout=10)
        try:
            clickhouse(f"DROP DATABASE IF EXISTS {CH_DB}")
        except (RuntimeError, OSError) as e:
            print(f"could not drop ClickHouse database {CH_DB}: {e}", file=sys.stderr)
        delete_redis_prefix(REDIS_URL, PREFIX)
        if failed or os.environ.get("KEEP_TMP"):
            print(f"logs and configs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = int(time.monotonic() - started)
    meta.update(wall=f"{wall // 60} min {wall % 60} s", load_after="/".join(open("/proc/loadavg").read().split()[:3]))
    text = report(runs, trials, rev_warn, notes, meta)
    out = os.path.join(ROOT, "loadtests", "results", "multinode-latest.md")
    with open(out, "w") as fh:
        fh.write(text)
    print(text)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
