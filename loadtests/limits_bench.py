#!/usr/bin/env python3
"""Rate-limit benchmarks: what the `limits:` feature costs, and how exactly it admits.

Called by loadtests/limits-bench.sh (which installs wrk and redis-server and builds `aihub` and
`limits-bench` in release). Gateways run with one worker thread on PROXY_CPU; wrk, limits-bench,
the mock upstream and the private Redis servers on LOAD_CPU. Three parts:

a. CPU per request, limits off / on (local) / on (Redis): three gateways with the same routes and
   key; "on" adds a `limits:` section and `plan: bench` with limits nothing reaches, "redis" also
   `limits.redis` (REDIS_URL, default the Redis on 127.0.0.1:6379, with a unique key prefix).
   Closed loop (wrk -c CONNECTIONS, DURATION s), the gateway's CPU from /proc/PID/stat divided by
   requests. ROUNDS interleaved rounds (off, on, redis, off, …); medians reported. Each for two
   response sizes (A_RESPONSES, see RESPONSES): one that crosses pingora's write-buffer size only
   when the rate-limit headers are added, and one that crosses it either way.
b. Latency at OPEN_RATE req/s (1000), open loop (limits-bench), SECONDS_EACH s per run against
   the same three gateways, ROUNDS rounds interleaved: p50/p99/p999 medians, and the p99 that
   Redis adds over local limits.
c. Over-admission: a plan of OVER_RPM requests/min (30000 = 500/s) with a burst of OVER_BURST
   (50), offered OVER_RATE req/s (1500) for SECONDS_EACH s, round-robin over the nodes:
   1 node with local limits; 2 nodes sharing a private Redis; 2 nodes whose Redis was killed
   (each then decides alone with half of the limit); 2 nodes whose Redis hangs (SIGSTOP: the calls
   in flight wait for `limits.redis.timeout`, then the node decides alone). Allowed = burst + rate × the span the load covered.

Writes Markdown to loadtests/results/limits-latest.md and prints it.
"""

import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.environ.get("AIHUB_BIN", os.path.join(TARGET, "release", "aihub"))
LB = os.environ.get("LIMITS_BENCH_BIN", os.path.join(TARGET, "release", "limits-bench"))
DURATION = int(os.environ.get("DURATION", "10"))
SECONDS_EACH = float(os.environ.get("SECONDS_EACH", "20"))
ROUNDS = max(1, int(os.environ.get("ROUNDS", "2")))
PROXY_CPU = os.environ.get("PROXY_CPU", "0")
LOAD_CPU = os.environ.get("LOAD_CPU", "1")
CONNECTIONS = int(os.environ.get("CONNECTIONS", "50"))
# METERING_URL=http://127.0.0.1:8123: every gateway also meters into this ClickHouse (database
# aihub_bench_limits), as in production, where limits always come with metering.
METERING_URL = os.environ.get("METERING_URL", "")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
OPEN_RATE = int(os.environ.get("OPEN_RATE", "1000"))
OVER_RATE = int(os.environ.get("OVER_RATE", "1500"))
OVER_RPM = int(os.environ.get("OVER_RPM", "30000"))
OVER_BURST = int(os.environ.get("OVER_BURST", "50"))
COMMAND = os.environ.get("LIMITS_BENCH_COMMAND", "python3 loadtests/limits_bench.py")
TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")

# Ports: 194xx (proxy_bench uses 190xx-191xx, controlplane-bench 192xx); ops = port + 50.
MOCK_PORT = 19400
PORTS = {"off": 19401, "on": 19402, "redis": 19403, "node-local": 19404,
         "node-a": 19405, "node-b": 19406}
PRIVATE_REDIS_PORT = 19420
RUN_ID = f"{os.getpid()}-{int(time.time())}"
SHARED_PREFIX = f"aihub-bench-{RUN_ID}"  # of the Redis keys this run writes to REDIS_URL

BODY = {"model": "mock-gpt", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}
# Response sizes for part a. pingora buffers writes to the client up to 1,460 bytes
# (DEFAULT_L4_WRITE_BUFFER_SIZE): "small" (the mock's 600-byte body) fits with the response header
# when limits are off, and the ~450 bytes of rate-limit headers push it over (two writes instead
# of one); "large" (400 mock tokens, a 2.4 KB body) takes two writes either way.
RESPONSES = {"small": ({}, 16), "large": ({"x-mock-chunks": "400"}, 1000)}
A_RESPONSES = os.environ.get("A_RESPONSES", "small large").split()


def die_with_parent():
    """Child processes get SIGKILL if this script dies without cleaning up (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


class Processes:
    """Every process the benchmark starts, stopped in reverse order by `stop_all`."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = {}
        self.logs = {}

    def start(self, name, cmd, cpu):
        # One log per start (a name is started again in later scenarios): NAME[-N].log.
        n = sum(1 for k in os.listdir(self.tmp) if k == f"{name}.log" or k.startswith(f"{name}-"))
        path = os.path.join(self.tmp, f"{name}-{n + 1}.log" if n else f"{name}.log")
        with open(path, "w") as log:
            p = subprocess.Popen(["taskset", "-c", cpu] + cmd, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=die_with_parent)
        self.procs[name] = p
        self.logs[name] = path
        return p

    def log_tail(self, name, lines=20):
        try:
            with open(self.logs[name], errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, name, sig=signal.SIGINT):
        p = self.procs.pop(name, None)
        if p is None:
            return
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGCONT)  # in case it was stopped
                p.send_signal(sig)
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for name in reversed(list(self.procs)):
            self.stop(name)


def http_get(url, timeout=2):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace"), dict(e.headers)


def http_post(url, key, timeout=5):
    req = urllib.request.Request(url, data=json.dumps(BODY).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace"), {k.lower(): v for k, v in e.headers.items()}


def wait_ready(procs, name, url, timeout=30, any_status=False):
    """Waits for `url` to answer 200 (or anything, with `any_status`) while the process is alive."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = procs.procs[name]
        if p.poll() is not None:
            raise SystemExit(f"{name} exited with {p.returncode}:\n{procs.log_tail(name)}")
        try:
            status = http_get(url, timeout=1)[0]
            if any_status or status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{name}: {url} not ready after {timeout}s:\n{procs.log_tail(name)}")


def metrics(port):
    """The ops listener's Prometheus text as {'name{labels}': value} (aihub_limits_* and
    aihub_rate_limited_total only)."""
    status, text, _ = http_get(f"http://127.0.0.1:{port + 50}/metrics")
    out = {}
    if status != 200:
        return out
    for line in text.splitlines():
        if line.startswith(("aihub_limits_", "aihub_rate_limited_total")) and "_bucket{" not in line:
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def limited_total(m):
    return sum(v for k, v in m.items() if k.startswith("aihub_rate_limited_total"))


def fmt_metrics(m):
    keys = ("aihub_limits_redis_up", "aihub_limits_nodes")
    parts = [f"{k.removeprefix('aihub_limits_')}={m[k]:g}" for k in keys if k in m]
    parts += [f"{k.removeprefix('aihub_rate_limited_total')}={v:g}" for k, v in m.items()
              if k.startswith("aihub_rate_limited_total") and v]
    return ", ".join(parts) or "–"


def wait_metric(port, name, want, timeout=10):
    """Waits until metric `name` equals `want`; returns the last value seen (None: absent)."""
    deadline = time.time() + timeout
    value = None
    while time.time() < deadline:
        value = metrics(port).get(name)
        if value == want:
            break
        time.sleep(0.1)
    return value


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def redis_cli(url, *args):
    return subprocess.run(["redis-cli", "-u", url] + list(args), capture_output=True, text=True)


def redis_pid(url):
    out = redis_cli(url, "INFO", "server").stdout
    for line in out.splitlines():
        if line.startswith("process_id:"):
            pid = int(line.split(":")[1])
            return pid if os.path.exists(f"/proc/{pid}/stat") else None
    return None


def start_private_redis(procs, name, port):
    p = procs.start(name, ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--protected-mode", "no"], LOAD_CPU)
    url = f"redis://127.0.0.1:{port}"
    deadline = time.time() + 10
    while redis_cli(url, "PING").stdout.strip() != "PONG":
        if p.poll() is not None or time.time() > deadline:
            raise SystemExit(f"private redis-server on {port} did not start:\n{procs.log_tail(name)}")
        time.sleep(0.05)
    return url


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def plans_file(tmp, name, rpm, burst, tpm):
    burst_line = f"    request_burst: {burst}\n" if burst else ""
    return write(os.path.join(tmp, f"plans-{name}.yaml"), f"""default_plan: bench
alert_thresholds: [80, 100]
plans:
  bench:
    overage: true
    requests_per_minute: {rpm}
{burst_line}    tokens_per_minute: {tpm}
""")


def gateway_config(tmp, name, port, key_entry, plans=None, redis=None, prefix=None):
    limits = ""
    if plans:
        key_entry += "  plan: bench\n"
        limits = f"limits:\n  plans_file: {plans}\n  default_max_tokens: 1024\n"
        if redis:
            limits += f"  redis:\n    url: \"{redis}\"\n    timeout: 50ms\n    prefix: {prefix}\n"
    metering = ""
    if METERING_URL:
        metering = (f"metering:\n  clickhouse: {{url: \"{METERING_URL}\", database: aihub_bench_limits}}\n"
                    f"  wal_dir: {tmp}/wal-{name}\n")
    return write(os.path.join(tmp, f"{name}.yaml"), f"""server:
  listen: ["127.0.0.1:{port}"]
  ops_listen: 127.0.0.1:{port + 50}
  threads: 1
upstreams:
  mock:
    endpoints: ["http://127.0.0.1:{MOCK_PORT}/v1"]
routes:
  - model: mock-gpt
    upstream: mock
{limits}{metering}keys:
{key_entry}""")


def start_gateway(procs, name, config):
    procs.start(name, [BIN, "gateway", "--config", config], PROXY_CPU)
    wait_ready(procs, name, f"http://127.0.0.1:{PORTS[name] + 50}/readyz")
    wait_ready(procs, name, f"http://127.0.0.1:{PORTS[name]}/v1/models", any_status=True)
    time.sleep(0.2)
    if procs.procs[name].poll() is not None:
        raise SystemExit(f"{name} exited after answering:\n{procs.log_tail(name)}")


def check_gateway(name, key, limited, notes):
    """One request: 200 expected, with rate-limit headers exactly when limits are on."""
    status, body, headers = http_post(f"http://127.0.0.1:{PORTS[name]}/v1/chat/completions", key)
    has = "x-ratelimit-limit-requests" in headers
    if status != 200:
        notes.append(f"{name}: a first request got {status}: {body[:300]}")
    elif has != limited:
        notes.append(f"{name}: rate-limit headers {'present' if has else 'absent'} with limits "
                     f"{'on' if limited else 'off'}")
    return status


def wrk_script(tmp, key, response):
    headers, max_tokens = RESPONSES[response]
    extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
    return write(os.path.join(tmp, f"chat-{response}.lua"), f"""wrk.method = "POST"
wrk.body = {json.dumps(json.dumps(dict(BODY, max_tokens=max_tokens)))}
wrk.headers["Content-Type"] = "application/json"
{extra}wrk.headers["Authorization"] = "Bearer {key}"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
""")


def closed_loop(port, script, pid, rpid):
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c10", "-d1s", "-s", script, url],
                   capture_output=True)  # warm-up: connections, caches
    before, rbefore = cpu_ticks(pid), (cpu_ticks(rpid) if rpid else 0)
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{CONNECTIONS}",
                          f"-d{DURATION}s", "-s", script, url],
                         capture_output=True, text=True, check=True).stdout
    after, rafter = cpu_ticks(pid), (cpu_ticks(rpid) if rpid else 0)
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    reqs, dur_us, p50, p99, non2xx, errors = map(int, line.split()[1:])
    return {"rps": reqs / (dur_us / 1e6), "cpu_us": (after - before) * TICK_US / max(reqs, 1),
            "redis_cpu_us": (rafter - rbefore) * TICK_US / max(reqs, 1) if rpid else None,
            "p50_ms": p50 / 1000, "p99_ms": p99 / 1000, "non2xx": non2xx, "errors": errors,
            "requests": reqs}


def open_loop(ports, key, rate, seconds):
    cmd = ["taskset", "-c", LOAD_CPU, LB, "load", "--rate", str(rate), "--seconds", str(seconds),
           "--key", key, "--connections", "256"]
    for port in ports:
        cmd += ["--url", f"http://127.0.0.1:{port}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"limits-bench failed: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def part_a_b(procs, tmp, key_entry, key, redis, notes):
    high = plans_file(tmp, "high", 100_000_000, None, 2_000_000_000)
    prefix = SHARED_PREFIX
    configs = {"off": gateway_config(tmp, "off", PORTS["off"], key_entry),
               "on": gateway_config(tmp, "on", PORTS["on"], key_entry, high),
               "redis": gateway_config(tmp, "redis", PORTS["redis"], key_entry, high, redis, prefix)}
    for name, config in configs.items():
        start_gateway(procs, name, config)
    up = wait_metric(PORTS["redis"], "aihub_limits_redis_up", 1.0)
    if up != 1.0:
        notes.append(f"redis gateway: aihub_limits_redis_up = {up} after start (expected 1)")
    for name in configs:
        check_gateway(name, key, name != "off", notes)
    rpid = redis_pid(redis)
    scripts = {resp: wrk_script(tmp, key, resp) for resp in A_RESPONSES}
    a = {(resp, name): [] for resp in A_RESPONSES for name in configs}
    for r in range(ROUNDS):
        for resp in A_RESPONSES:
            for name in configs:
                res = closed_loop(PORTS[name], scripts[resp], procs.procs[name].pid,
                                  rpid if name == "redis" else None)
                a[resp, name].append(res)
                print(f"a round {r + 1} {resp} {name}: {json.dumps(res)}", file=sys.stderr)
    # "direct": the mock without a gateway, the floor of what the client itself measures.
    b = {name: [] for name in ["direct", *configs]}
    for r in range(ROUNDS):
        for name in b:
            port = MOCK_PORT if name == "direct" else PORTS[name]
            open_loop([port], key, OPEN_RATE, 1)  # warm-up
            res = open_loop([port], key, OPEN_RATE, SECONDS_EACH)
            b[name].append(res)
            print(f"b round {r + 1} {name}: {json.dumps(res)}", file=sys.stderr)
    final = {name: metrics(PORTS[name]) for name in configs}
    n_keys = len(redis_cli(redis, "--scan", "--pattern", f"{prefix}:*").stdout.split())
    for name in configs:
        procs.stop(name)
    return a, b, final, n_keys, rpid


def clean_shared_redis():
    """Deletes what this run wrote to the shared Redis (only keys under its own prefix)."""
    keys = redis_cli(REDIS_URL, "--scan", "--pattern", f"{SHARED_PREFIX}:*").stdout.split()
    for i in range(0, len(keys), 500):
        redis_cli(REDIS_URL, "DEL", *keys[i:i + 500])


def over_admission(procs, tmp, key_entry, key, notes):
    plans = plans_file(tmp, "over", OVER_RPM, OVER_BURST, 2_000_000_000)
    rate = OVER_RPM / 60
    rows = []

    def run(label, names, before_load=None):
        for name in names:
            start_gateway(procs, name, configs[name])
        # With Redis, each node must have seen the other in the node registry before the load.
        nodes = [wait_metric(PORTS[n], "aihub_limits_nodes", float(len(names)))
                 if len(names) > 1 else None for n in names]
        if before_load:
            before_load()
        res = open_loop([PORTS[n] for n in names], key, OVER_RATE, SECONDS_EACH)
        m = [metrics(PORTS[n]) for n in names]
        for n in names:
            procs.stop(n)
        admitted = res["status"].get("200", 0)
        allowed = OVER_BURST + rate * res["send_window_s"]
        rows.append({"label": label, "nodes": len(names), "res": res, "admitted": admitted,
                     "allowed": allowed, "over_pct": (admitted - allowed) / allowed * 100,
                     "per_node": [u["status"].get("200", 0) for u in res["by_url"]],
                     "nodes_metric": nodes, "metrics": m})
        print(f"c {label}: {json.dumps(rows[-1])}", file=sys.stderr)

    configs = {"node-local": gateway_config(tmp, "node-local", PORTS["node-local"], key_entry, plans)}
    run("1 node, local limits", ["node-local"])

    def nodes_on(redis, prefix):
        for n in ("node-a", "node-b"):
            configs[n] = gateway_config(tmp, n, PORTS[n], key_entry, plans, redis, prefix)

    redis = start_private_redis(procs, "redis-private", PRIVATE_REDIS_PORT)
    nodes_on(redis, f"aihub-bench-{RUN_ID}-shared")
    run("2 nodes, shared Redis", ["node-a", "node-b"])

    nodes_on(redis, f"aihub-bench-{RUN_ID}-killed")

    def kill_redis():
        time.sleep(2)
        procs.stop("redis-private", signal.SIGKILL)

    run("2 nodes, Redis killed before the load", ["node-a", "node-b"], kill_redis)

    redis = start_private_redis(procs, "redis-private", PRIVATE_REDIS_PORT)
    nodes_on(redis, f"aihub-bench-{RUN_ID}-hung")

    def hang_redis():
        time.sleep(2)
        procs.procs["redis-private"].send_signal(signal.SIGSTOP)

    run("2 nodes, Redis hung (SIGSTOP) before the load", ["node-a", "node-b"], hang_redis)
    procs.stop("redis-private", signal.SIGKILL)
    for row in rows:
        if row["nodes"] > 1 and any(n != 2.0 for n in row["nodes_metric"]):
            notes.append(f"c '{row['label']}': aihub_limits_nodes was {row['nodes_metric']} "
                         "before the load (expected 2 on each node)")
    return rows


# Expected: these gateways run without metering, and wrk drops its connections at the end of a run.
BENIGN = ("no `metering` section", "the client went away")


def log_findings(tmp, notes):
    """WARN/ERROR lines of the gateways' logs (first 3 distinct per log) into the notes."""
    for name in sorted(os.listdir(tmp)):
        if not name.endswith(".log") or name.startswith(("mock", "redis")):
            continue
        seen = []
        with open(os.path.join(tmp, name), errors="replace") as f:
            for line in f:
                if (" WARN " in line or " ERROR " in line) and "aihub::access" not in line \
                        and not any(b in line for b in BENIGN):
                    text = line.strip()[:300]
                    if text not in seen:
                        seen.append(text)
                    if len(seen) >= 3:
                        break
        notes += [f"{name}: {s}" for s in seen]


def report(a, b, final, n_redis_keys, rpid, redis, rows, notes):
    n = lambda v, f="{:.1f}": "–" if v is None else f.format(v)
    git = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    redis_shown = redis.split("@")[-1]
    lines = [
        f"# Rate-limit benchmark — {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} cores",
        "",
        f"`{COMMAND}` (commit {git or '?'}). Gateways: 1 worker thread each on CPU {PROXY_CPU}; wrk, "
        f"limits-bench, mock upstream and private Redis servers on CPU {LOAD_CPU}. Shared Redis for "
        f"a/b: {redis_shown}" + (" (pid known: its CPU is reported)" if rpid else "") + ". "
        + (f"Metering: on in every gateway (ClickHouse {METERING_URL}), as in production."
           if METERING_URL else "Metering: off in every gateway (the worst case for limits: "
           "with limits on, responses are parsed for tokens that nothing else needs)."),
        "",
        f"## a. CPU per request, limits off vs on (wrk -c{CONNECTIONS}, {DURATION} s × {ROUNDS} "
        "rounds interleaved, medians)",
        "",
        "Responses: small = the mock's 600-byte body (with the rate-limit headers, header + body "
        "no longer fit pingora's 1,460-byte write buffer: two writes per response instead of one); "
        "large = a 2.4 KB body (two writes with limits off too).",
        "",
        "| response | gateway | req/s | proxy CPU µs/req | vs off | per round µs/req | Redis CPU µs/req | "
        "p99 ms | non-2xx | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {"off": "limits off", "on": "limits on (local)", "redis": "limits on (Redis)",
              "direct": "direct (mock, no gateway)"}
    cpu = {k: med([r["cpu_us"] for r in runs]) for k, runs in a.items()}
    for (resp, name), runs in a.items():
        off_cpu = cpu[resp, "off"]
        vs = "–" if name == "off" else f"{(cpu[resp, name] - off_cpu) / off_cpu * 100:+.1f} %"
        lines.append(
            f"| {resp} | {labels[name]} | {med([r['rps'] for r in runs]):.0f} | {cpu[resp, name]:.1f} | {vs} | "
            + ", ".join(f"{r['cpu_us']:.1f}" for r in runs)
            + f" | {n(med([r['redis_cpu_us'] for r in runs]))} | {med([r['p99_ms'] for r in runs]):.2f} | "
            f"{sum(r['non2xx'] for r in runs)} | {sum(r['errors'] for r in runs)} |")
    lines.append("")
    for resp in A_RESPONSES:
        on, off = cpu[resp, "on"], cpu[resp, "off"]
        lines.append(f"Target \"within 5 %\" (local limits, {resp} responses): {(on - off) / off * 100:+.1f} % "
                     f"({on - off:+.1f} µs) — " + ("met" if abs(on - off) / off <= 0.05 else "**not met**") + ".")
    lines.append("")
    lines += [f"## b. Open loop at {OPEN_RATE} req/s (limits-bench, {SECONDS_EACH:g} s × {ROUNDS} "
              "rounds interleaved, medians; latency from each request's scheduled start)", "",
              "| target | p50 ms | p99 ms | p999 ms | max ms | achieved req/s | 200 | other | errors | "
              "client send lag max ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in b.items():
        ok = sum(r["status"].get("200", 0) for r in runs)
        other = sum(v for r in runs for k, v in r["status"].items() if k != "200")
        lines.append(
            f"| {labels[name]} | {med([r['p50_ms'] for r in runs]):.3f} | {med([r['p99_ms'] for r in runs]):.3f} | "
            f"{med([r['p999_ms'] for r in runs]):.3f} | {max(r['max_ms'] for r in runs):.3f} | "
            f"{med([r['achieved_rate'] for r in runs]):.0f} | {ok} | {other} | {sum(r['errors'] for r in runs)} | "
            f"{max(r['send_lag_max_ms'] for r in runs):.1f} |")
    p99 = {name: med([r["p99_ms"] for r in runs]) for name, runs in b.items()}
    lines += ["", f"p99 added by Redis (distributed) over local limits: {p99['redis'] - p99['on']:+.3f} ms; "
              f"local limits over off: {p99['on'] - p99['off']:+.3f} ms.", "",
              "Metrics after a and b: " + "; ".join(f"{labels[k]}: {fmt_metrics(m)}" for k, m in final.items())
              + f"; Redis keys under the run's prefix: {n_redis_keys} (deleted).", ""]
    lines += [f"## c. Over-admission: plan {OVER_RPM} req/min ({OVER_RPM / 60:g}/s), burst {OVER_BURST}; "
              f"offered {OVER_RATE} req/s for {SECONDS_EACH:g} s, round-robin", "",
              "Allowed = burst + rate × span of the load (first to last request sent).", "",
              "| scenario | admitted (200) | allowed | over-admission | per node 200s | 429 | errors | "
              "p99 ms | nodes metric before | metrics after |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        res = row["res"]
        lines.append(
            f"| {row['label']} | {row['admitted']} | {row['allowed']:.0f} | {row['over_pct']:+.2f} % | "
            f"{' / '.join(map(str, row['per_node']))} | {res['status'].get('429', 0)} | {res['errors']} | "
            f"{res['p99_ms']:.2f} | {', '.join(n(v, '{:g}') for v in row['nodes_metric'])} | "
            + "; ".join(fmt_metrics(m) for m in row["metrics"]) + " |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {x}" for x in notes]
    return "\n".join(lines) + "\n"


def ports_free():
    import socket
    ports = [MOCK_PORT, PRIVATE_REDIS_PORT] + [p + d for p in PORTS.values() for d in (0, 50)]
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise SystemExit(f"port {port} is in use: stop what listens there (ss -ltnp)")


def main():
    ports_free()
    for tool in ["wrk", "taskset", "redis-server", "redis-cli"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run loadtests/limits-bench.sh")
    for path in (BIN, LB):
        if not os.access(path, os.X_OK):
            raise SystemExit(f"{path} is missing: run loadtests/limits-bench.sh")
    if redis_cli(REDIS_URL, "PING").stdout.strip() != "PONG":
        raise SystemExit(f"Redis at {REDIS_URL.split('@')[-1]} does not answer: start it or set REDIS_URL")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.mkdtemp(prefix="aihub-limits-bench-")
    procs = Processes(tmp)
    notes = []
    try:
        procs.start("mock", [BIN, "mock-upstream", "--listen", f"127.0.0.1:{MOCK_PORT}", "--threads", "1",
                             "--chunks", "16"], LOAD_CPU)
        wait_ready(procs, "mock", f"http://127.0.0.1:{MOCK_PORT}/v1/models")
        out = subprocess.run([BIN, "keys", "generate", "--id", "key_bench", "--developer", "dev_bench",
                              "--key-file", os.path.join(tmp, "key")], capture_output=True, text=True, check=True)
        key_entry = "\n".join(l for l in out.stdout.splitlines() if not l.startswith("#")) + "\n"
        with open(os.path.join(tmp, "key")) as f:
            key = f.read().strip()
        a, b, final, n_keys, rpid = part_a_b(procs, tmp, key_entry, key, REDIS_URL, notes)
        rows = over_admission(procs, tmp, key_entry, key, notes)
        log_findings(tmp, notes)
    finally:
        procs.stop_all()
        clean_shared_redis()
        if os.environ.get("KEEP_TMP"):
            print(f"logs and configs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    text = report(a, b, final, n_keys, rpid, REDIS_URL, rows, notes)
    out = os.path.join(ROOT, "loadtests", "results", "limits-latest.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write(out, text)
    print(text)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
