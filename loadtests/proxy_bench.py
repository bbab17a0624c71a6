#!/usr/bin/env python3
"""Proxy benchmark (issue 19): the gateway against nginx and the bare upstream, in one run.

Called by loadtests/proxy-bench.sh, which installs wrk, oha, nginx and redis-server, builds
`aihub` in release and starts a private ClickHouse (AIHUB_BENCH_CLICKHOUSE_URL) on LOAD_CPU.

Targets, each a proxy in front of the same mock upstream (`aihub mock-upstream --threads 1
--chunks 16`); every proxy runs alone on PROXY_CPU with one worker (`threads: 1`,
`worker_processes 1`); the mock, wrk, oha, ClickHouse and Redis share LOAD_CPU:

- `direct`: the mock itself, the reference for the latency the proxies add;
- `nginx`: a tuned proxy hop (see NGINX_CONF: upstream keepalive, HTTP/1.1 to the upstream,
  `proxy_buffering off`, keep-alive without a request cap, a buffered access log);
- `gateway bare`: one YAML key, no `limits:`, no `metering:`;
- `gateway full (local limits)`: the production pipeline: the key has plan `bench` and its own
  `rate_limit_rpm`/`rate_limit_tpm`, so key and developer buckets (requests, tokens),
  the concurrency cap and the monthly hard-stop quota are all checked and every rate-limit
  header is written, with limits nothing reaches; metering into ClickHouse (a database of its
  own for this run, dropped at the end);
- `gateway full (Redis limits)`: the same with `limits.redis` (a private redis-server on
  LOAD_CPU at nice -10, or REDIS_URL with a prefix unique to this run, whose keys are deleted at
  the end).

Bodies: `JSON small` (a chat completion of 16 tokens, ~0.6 KB), `JSON large` (the same with
`x-mock-chunks: LARGE_CHUNKS`, ~5 KB) and `SSE` (a streamed chat completion: role chunk,
16 content chunks, finish chunk, `[DONE]`; the gateway also receives and hides the usage chunk).

Per target × body, in each of ROUNDS interleaved rounds (the target order alternates):
a 1 s warm-up (wrk -c10), then a closed loop (wrk -t1 -cCONNECTIONS for DURATION s): req/s
and the proxy's CPU per request (utime+stime from /proc/PID/stat of the proxy and its children,
divided by the requests wrk completed); then fixed rates (oha with latency correction,
RATES req/s for DURATION s each): p50/p99, and the p50/p99 added over `direct` in the same round.
Medians over the rounds are reported, with the spread. Then the ratios against nginx and
issue 19's goals, met or not. Usage rows are counted in ClickHouse and set against the
requests the metered gateways report in their metrics.

Env: DURATION (s, 10), ROUNDS (3), QUICK=1 (DURATION=3, ROUNDS=1 unless set), PROXY_CPU (0),
LOAD_CPU (1), CONNECTIONS (50), RATES ("20 1000"), LARGE_CHUNKS (1000), REDIS_URL (default: a
private redis-server on port 19120), AIHUB_BENCH_CLICKHOUSE_URL (http://127.0.0.1:18124),
KEEP_TMP=1 (keep configs and logs), KEEP_DB=1 (keep the ClickHouse databases).
Writes loadtests/results/proxy-latest.md and prints it.

loadtests/routing_bench.py imports this module (CHAT, wrk_script, closed_loop, children and the
settings above): keep those signatures.
"""

import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("AIHUB_BIN", os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                "release", "aihub"))
QUICK = os.environ.get("QUICK", "") not in ("", "0")
DURATION = int(os.environ.get("DURATION") or (3 if QUICK else 10))
ROUNDS = int(os.environ.get("ROUNDS") or (1 if QUICK else 3))
PROXY_CPU = os.environ.get("PROXY_CPU", "0")
LOAD_CPU = os.environ.get("LOAD_CPU", "1")
CONNECTIONS = int(os.environ.get("CONNECTIONS", "50"))
RATES = [int(r) for r in os.environ.get("RATES", "20 1000").split()]
LARGE_CHUNKS = int(os.environ.get("LARGE_CHUNKS", "1000"))
CLICKHOUSE_URL = os.environ.get("AIHUB_BENCH_CLICKHOUSE_URL", "http://127.0.0.1:18124")
REDIS_URL = os.environ.get("REDIS_URL", "")
KEEP_DB = os.environ.get("KEEP_DB", "") not in ("", "0")
TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")
RUN_ID = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
REDIS_PREFIX = f"aihub-proxy-bench-{RUN_ID}"

# Ports 190xx-191xx (limits-bench 194xx, routing-bench 196xx); a gateway's ops port is its port + 1.
MOCK_PORT = 19080
NGINX_PORT = 19081
PRIVATE_REDIS_PORT = 19120
DIRECT, NGINX, BARE, LOCAL, REDIS = ("direct", "nginx", "gateway bare", "gateway full (local limits)",
                                     "gateway full (Redis limits)")
TARGETS = [DIRECT, NGINX, BARE, LOCAL, REDIS]
GATEWAYS = {BARE: 19082, LOCAL: 19084, REDIS: 19086}
DATABASES = {LOCAL: f"aihub_bench_{RUN_ID}_local", REDIS: f"aihub_bench_{RUN_ID}_redis"}
PORTS = {DIRECT: MOCK_PORT, NGINX: NGINX_PORT, **GATEWAYS}

CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "Write one short sentence about proxies."}]}
# body kind -> (stream, extra request headers)
BODIES = {"JSON small": (False, {}), "JSON large": (False, {"x-mock-chunks": str(LARGE_CHUNKS)}), "SSE": (True, {})}
RATELIMIT_HEADERS = ["x-ratelimit-limit-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-requests",
                     "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens",
                     "ratelimit-policy", "ratelimit"]

# Limits nothing reaches: u32 maxima are 4.29e9; the month's quota is a hard stop (overage: false).
PLANS = """default_plan: bench
alert_thresholds: [80, 100]
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
KEY_LIMITS = "  plan: bench\n  rate_limit_rpm: 1000000000\n  rate_limit_tpm: 4000000000\n"

# nginx as a tuned hop: one worker, keep-alive to the upstream (HTTP/1.1, no Connection header),
# no response buffering (streams pass as they come), no cap on requests per connection either
# way (the default 1,000 would make wrk reconnect), and an access log written in 64 KB batches
# (flushed at least every second), as a production nginx logs.
NGINX_CONF = """worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log {tmp}/nginx-access.log combined buffer=64k flush=1s;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_buffer_size 64k;
    client_max_body_size 10m;
    upstream mock {{
        server 127.0.0.1:{mock};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


# ---------------------------------------------------------------- helpers shared with routing_bench

def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wrk_script(tmp, key, stream, headers=None, name=None):
    """A wrk Lua script posting the chat body (streamed or not) with `headers`; it prints
    `RESULT requests duration_us p50_us p99_us non2xx socket_errors`."""
    body = dict(CHAT, stream=True) if stream else CHAT
    name = name or ("sse" if stream else "json")
    extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
    path = os.path.join(tmp, f"{name.replace(' ', '-').lower()}.lua")
    with open(path, "w") as f:
        f.write(f"""wrk.method = "POST"
wrk.body = {json.dumps(json.dumps(body))}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
{extra}done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
""")
    return path


def parse_wrk(out):
    line = next((l for l in out.splitlines() if l.startswith("RESULT")), None)
    if line is None:
        raise SystemExit(f"wrk printed no result:\n{out}")
    reqs, dur_us, p50, p99, non2xx, sock = map(int, line.split()[1:])
    return reqs, dur_us, p50, p99, non2xx, sock


def closed_loop(url, script, pids, extra_pids=None, connections=None, duration=None):
    """wrk -t1 -c`connections` for `duration` s; the CPU of `pids` (and apart, of `extra_pids`)
    per completed request. `errors` = non-2xx answers + socket errors."""
    pids = pids or []
    before, xbefore = cpu_ticks(pids), cpu_ticks(extra_pids or [])
    t0 = time.monotonic()
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections or CONNECTIONS}",
                          f"-d{duration or DURATION}s", "-s", script, url],
                         capture_output=True, text=True, check=True).stdout
    wall = time.monotonic() - t0
    after, xafter = cpu_ticks(pids), cpu_ticks(extra_pids or [])
    reqs, dur_us, p50, p99, non2xx, sock = parse_wrk(out)
    n = max(reqs, 1)
    return {"rps": reqs / (dur_us / 1e6), "p50_ms": p50 / 1000, "p99_ms": p99 / 1000,
            "cpu_us": (after - before) * TICK_US / n if pids else None,
            "cpu_busy": (after - before) * TICK_US / 1e6 / wall if pids else None,
            "extra_cpu_us": (xafter - xbefore) * TICK_US / n if extra_pids else None,
            "errors": non2xx + sock, "non2xx": non2xx, "socket_errors": sock, "requests": reqs}


# ---------------------------------------------------------------- processes

def die_with_parent():
    """Children get SIGKILL if this script dies without cleaning up (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


class Processes:
    """Every process the benchmark starts; `stop_all` stops them in reverse order."""

    def __init__(self, tmp):
        self.tmp, self.procs, self.logs = tmp, {}, {}

    def start(self, name, cmd, cpu):
        path = os.path.join(self.tmp, name.replace(" ", "-").replace("(", "").replace(")", "") + ".log")
        with open(path, "a") as log:  # O_APPEND: the log can be truncated between runs
            self.procs[name] = subprocess.Popen(["taskset", "-c", cpu] + cmd, stdout=log, stderr=subprocess.STDOUT,
                                                preexec_fn=die_with_parent)
        self.logs[name] = path
        return self.procs[name]

    def tail(self, name, lines=20):
        try:
            with open(self.logs[name], errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except (OSError, KeyError):
            return ""

    def stop(self, name, sig=signal.SIGINT):
        p = self.procs.pop(name, None)
        if p is not None and p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for name in reversed(list(self.procs)):
            self.stop(name)


def http(method, url, body=None, headers=None, timeout=5):
    """(status, body bytes, lower-cased headers)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def wait_ready(procs, name, url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = procs.procs[name]
        if p.poll() is not None:
            raise SystemExit(f"{name} exited with {p.returncode}:\n{procs.tail(name)}")
        try:
            if http("GET", url, timeout=1)[0] < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{name}: {url} not ready after {timeout}s:\n{procs.tail(name)}")


def clickhouse(query, database=None):
    url = CLICKHOUSE_URL + "/" + (f"?database={database}" if database else "")
    status, body, _ = http("POST", url, query.encode(), timeout=30)
    if status != 200:
        raise RuntimeError(f"ClickHouse: {query}: {status} {body[:300]!r}")
    return body.decode().strip()


def redis_cli(url, *args):
    return subprocess.run(["redis-cli", "-u", url] + list(args), capture_output=True, text=True)


def metrics(port):
    """The ops listener's Prometheus samples: {'name{labels}': value} (histogram buckets left out)."""
    try:
        status, text, _ = http("GET", f"http://127.0.0.1:{port + 1}/metrics", timeout=5)
    except OSError:
        return {}
    out = {}
    for line in text.decode(errors="replace").splitlines():
        if line.startswith("#") or "_bucket{" in line:
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def metric_sum(m, prefix, where=""):
    return sum(v for k, v in m.items() if (k == prefix or k.startswith(prefix + "{")) and where in k)


def port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise SystemExit(f"port {port} is in use: stop what listens there (ss -ltnp 'sport = :{port}')")


def gateway_config(tmp, target, key_entry, redis_url):
    port = GATEWAYS[target]
    extra = ""
    if target in (LOCAL, REDIS):
        key_entry += KEY_LIMITS
        extra = f"limits:\n  plans_file: {tmp}/plans.yaml\n  default_max_tokens: 1024\n"
        if target == REDIS:
            extra += f"  redis:\n    url: \"{redis_url}\"\n    timeout: 50ms\n    prefix: {REDIS_PREFIX}\n"
        extra += (f"metering:\n  clickhouse: {{url: \"{CLICKHOUSE_URL}\", database: {DATABASES[target]}}}\n"
                  f"  wal_dir: {tmp}/wal-{port}\n")
    path = os.path.join(tmp, f"gateway-{port}.yaml")
    with open(path, "w") as f:
        f.write(f"""server:
  listen: ["127.0.0.1:{port}"]
  ops_listen: 127.0.0.1:{port + 1}
  threads: 1
upstreams:
  mock:
    endpoints: ["http://127.0.0.1:{MOCK_PORT}/v1"]
routes:
  - model: mock-gpt
    upstream: mock
{extra}keys:
{key_entry}""")
    return path


def start_all(procs, tmp):
    for port in [MOCK_PORT, NGINX_PORT, PRIVATE_REDIS_PORT] + [p + d for p in GATEWAYS.values() for d in (0, 1)]:
        port_free(port)
    procs.start("mock", [BIN, "mock-upstream", "--listen", f"127.0.0.1:{MOCK_PORT}", "--threads", "1",
                         "--chunks", "16"], LOAD_CPU)
    wait_ready(procs, "mock", f"http://127.0.0.1:{MOCK_PORT}/v1/models")
    with open(os.path.join(tmp, "nginx.conf"), "w") as f:
        f.write(NGINX_CONF.format(tmp=tmp, mock=MOCK_PORT, port=NGINX_PORT))
    procs.start(NGINX, ["nginx", "-c", os.path.join(tmp, "nginx.conf"), "-p", tmp], PROXY_CPU)
    wait_ready(procs, NGINX, f"http://127.0.0.1:{NGINX_PORT}/v1/models")
    redis_url, redis_pid = REDIS_URL, None
    if not redis_url:
        # Above the load generator's priority: a Redis host of its own is not starved by wrk.
        procs.start("redis", ["nice", "-n", "-10", "redis-server", "--port", str(PRIVATE_REDIS_PORT), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--protected-mode", "no"], LOAD_CPU)
        redis_url = f"redis://127.0.0.1:{PRIVATE_REDIS_PORT}"
        redis_pid = procs.procs["redis"].pid
    deadline = time.time() + 10
    while redis_cli(redis_url, "PING").stdout.strip() != "PONG":
        if time.time() > deadline:
            raise SystemExit(f"Redis at {redis_url.split('@')[-1]} does not answer:\n{procs.tail('redis')}")
        time.sleep(0.1)
    if redis_pid is None:  # a Redis of this machine: its CPU is reported when its pid is readable
        for line in redis_cli(redis_url, "INFO", "server").stdout.splitlines():
            if line.startswith("process_id:"):
                pid = int(line.split(":")[1])
                redis_pid = pid if os.path.exists(f"/proc/{pid}/stat") else None
    out = subprocess.run([BIN, "keys", "generate", "--id", "key_bench", "--developer", "dev_bench",
                          "--key-file", os.path.join(tmp, "key")], capture_output=True, text=True, check=True)
    key_entry = "\n".join(l for l in out.stdout.splitlines() if not l.startswith("#")) + "\n"
    with open(os.path.join(tmp, "key")) as f:
        key = f.read().strip()
    with open(os.path.join(tmp, "plans.yaml"), "w") as f:
        f.write(PLANS)
    for target in GATEWAYS:
        conf = gateway_config(tmp, target, key_entry, redis_url)
        check = subprocess.run([BIN, "gateway", "--config", conf, "--check-config"], capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"{target}: --check-config failed:\n{check.stdout}{check.stderr}")
        procs.start(target, [BIN, "gateway", "--config", conf], PROXY_CPU)
    for target, port in GATEWAYS.items():
        wait_ready(procs, target, f"http://127.0.0.1:{port + 1}/readyz")
        wait_ready(procs, target, f"http://127.0.0.1:{port}/v1/models")
    return key, redis_url, redis_pid


# ---------------------------------------------------------------- checks before the load

def request(target, key, body_kind):
    stream, headers = BODIES[body_kind]
    body = json.dumps(dict(CHAT, stream=True) if stream else CHAT).encode()
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {key}", **headers}
    return http("POST", f"http://127.0.0.1:{PORTS[target]}/v1/chat/completions", body, h)


def check_targets(key, notes):
    """One request per target and body: 200, the same body size as direct (SSE: the same
    number of events), rate-limit headers exactly on the full gateways. Returns the sizes seen
    directly, {body: (bytes, events)}, and the 200s per target."""
    sizes, ok = {}, {t: 0 for t in TARGETS}
    for body_kind in BODIES:
        for target in TARGETS:
            status, body, headers = request(target, key, body_kind)
            events = sum(1 for line in body.split(b"\n") if line.startswith(b"data:"))
            if status != 200:
                notes.append(f"check: {target}, {body_kind}: status {status}: {body[:300]!r}")
                continue
            ok[target] += 1
            if target == DIRECT:
                sizes[body_kind] = (len(body), events)
            elif body_kind in sizes:
                want_bytes, want_events = sizes[body_kind]
                if BODIES[body_kind][0] and events != want_events:
                    notes.append(f"check: {target}, {body_kind}: {events} events, direct {want_events}")
                if not BODIES[body_kind][0] and abs(len(body) - want_bytes) > 16:  # ids and dates differ
                    notes.append(f"check: {target}, {body_kind}: {len(body)} bytes, direct {want_bytes}")
            missing = [h for h in RATELIMIT_HEADERS if h not in headers]
            if target in (LOCAL, REDIS) and missing:
                notes.append(f"check: {target}, {body_kind}: rate-limit headers missing: {', '.join(missing)}")
            if target not in (LOCAL, REDIS) and len(missing) < len(RATELIMIT_HEADERS):
                notes.append(f"check: {target}, {body_kind}: rate-limit headers present without limits")
    return sizes, ok


def wait_metric(port, name, want, timeout=15):
    deadline = time.time() + timeout
    value = None
    while time.time() < deadline:
        value = metrics(port).get(name)
        if value == want:
            break
        time.sleep(0.2)
    return value


# ---------------------------------------------------------------- load

def oha(url, key, body_kind, rate, pids):
    stream, headers = BODIES[body_kind]
    body = json.dumps(dict(CHAT, stream=True) if stream else CHAT)
    conns = max(2, min(CONNECTIONS, rate // 20))
    cmd = ["taskset", "-c", LOAD_CPU, "oha", "--no-tui", "--output-format", "json", "-z", f"{DURATION}s",
           "-q", str(rate), "-c", str(conns), "--latency-correction", "-m", "POST", "-d", body,
           "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {key}"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    before = cpu_ticks(pids) if pids else 0
    out = subprocess.run(cmd + [url], capture_output=True, text=True)
    after = cpu_ticks(pids) if pids else 0
    if out.returncode != 0:
        raise SystemExit(f"oha failed: {out.stderr}")
    r = json.loads(out.stdout)
    pct = r["latencyPercentiles"]
    codes = {int(k): v for k, v in r["statusCodeDistribution"].items()}
    errors = r.get("errorDistribution", {})
    cut = sum(v for k, v in errors.items() if "deadline" in k)  # in flight when -z ended
    ok = sum(v for k, v in codes.items() if 200 <= k < 300)
    answered = sum(codes.values())
    return {"p50_ms": (pct["p50"] or 0) * 1000, "p99_ms": (pct["p99"] or 0) * 1000, "ok": ok,
            "bad": answered - ok + sum(errors.values()) - cut, "cut": cut,
            "rps": answered / DURATION,
            "cpu_us": (after - before) * TICK_US / max(answered, 1) if pids else None}


class Logs:
    """Scans the proxies' logs for warnings after each run, then truncates them (the gateway's
    access log grows by ~100 MB per 10 s run)."""

    BENIGN = ("no `metering` section", "the client went away")

    def __init__(self, procs, tmp):
        self.procs, self.tmp, self.seen = procs, tmp, {}

    def sweep(self):
        paths = {n: p for n, p in self.procs.logs.items() if n in GATEWAYS}
        paths["nginx error log"] = os.path.join(self.tmp, "nginx-error.log")
        for name, path in paths.items():
            try:
                with open(path, errors="replace") as f:
                    for line in f:
                        if name in GATEWAYS and not (" WARN " in line or " ERROR " in line):
                            continue
                        if "aihub::access" in line or any(b in line for b in self.BENIGN):
                            continue
                        seen = self.seen.setdefault(name, {})
                        text = line.strip()
                        if text[:4].isdigit() and "T" in text[:11]:  # the same warning at another time
                            text = text.split(None, 1)[-1]
                        text = text[:300]
                        if len(seen) < 3 or text in seen:
                            seen[text] = seen.get(text, 0) + 1
                os.truncate(path, 0)
            except FileNotFoundError:
                pass
        access = os.path.join(self.tmp, "nginx-access.log")
        if os.path.exists(access):
            os.truncate(access, 0)  # nginx opened it with O_APPEND

    def notes(self):
        return [f"{name} log: {text} (×{n})" for name, seen in self.seen.items() for text, n in seen.items()]


def pids_of(procs, target):
    if target == DIRECT:
        return None
    pid = procs.procs[target].pid
    return [pid] + children(pid)


def run_all(procs, key, tmp, redis_pid, logs, ok_seen):
    """results[body][target] = list of per-round dicts; sent[target] = 2xx answers the client saw."""
    scripts = {b: wrk_script(tmp, key, stream, headers, name=b) for b, (stream, headers) in BODIES.items()}
    results = {b: {t: [] for t in TARGETS} for b in BODIES}
    total = ROUNDS * len(BODIES) * len(TARGETS)
    n = 0
    for r in range(ROUNDS):
        order = TARGETS if r % 2 == 0 else TARGETS[::-1]
        for body_kind in BODIES:
            for target in order:
                n += 1
                url = f"http://127.0.0.1:{PORTS[target]}/v1/chat/completions"
                warm = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c10", "-d1s", "-s",
                                       scripts[body_kind], url], capture_output=True, text=True)
                wr = parse_wrk(warm.stdout)
                ok_seen[target] += wr[0] - wr[4]
                pids = pids_of(procs, target)
                res = {"closed": closed_loop(url, scripts[body_kind], pids,
                                             [redis_pid] if target == REDIS and redis_pid else None)}
                ok_seen[target] += res["closed"]["requests"] - res["closed"]["non2xx"]
                for rate in RATES:
                    res[rate] = oha(url, key, body_kind, rate, pids)
                    ok_seen[target] += res[rate]["ok"]
                results[body_kind][target].append(res)
                logs.sweep()
                c = res["closed"]
                print(f"[{n}/{total}] round {r + 1} {body_kind:10} {target:28} {c['rps']:8.0f} req/s  "
                      + ("" if c["cpu_us"] is None else f"{c['cpu_us']:6.1f} µs/req  ")
                      + "  ".join(f"@{rate} p50 {res[rate]['p50_ms']:.2f} p99 {res[rate]['p99_ms']:.2f}" for rate in RATES),
                      file=sys.stderr, flush=True)
    return results, ok_seen


# ---------------------------------------------------------------- metering check

def usage_check(ok_seen, notes):
    """Waits for the metered gateways' rows to reach ClickHouse (at most 60 s), then sets the
    rows against the requests each gateway counted; returns lines for the report."""
    lines = []
    for target in (LOCAL, REDIS):
        port, db = GATEWAYS[target], DATABASES[target]
        rows = ok_rows = None
        deadline = time.time() + 60
        while True:
            m = metrics(port)
            # Proxied requests (aihub_requests_total also counts GET /v1/models, which is not metered).
            served = metric_sum(m, "aihub_requests_total", f'model="{CHAT["model"]}"')
            written = metric_sum(m, "aihub_usage_rows_written_total")
            try:
                rows, ok_rows = map(int, clickhouse("SELECT count(), countIf(status < 300 AND error_type = '') "
                                                    "FROM usage_events FORMAT TSV", db).split())
            except (RuntimeError, OSError, ValueError) as e:
                notes.append(f"{target}: ClickHouse count failed: {e}")
                break
            if (rows >= served and written >= served) or time.time() > deadline:
                break
            time.sleep(0.5)
        if rows is None:
            lines.append(f"- {target}: usage rows could not be counted")
            continue
        met = "met" if rows == served else "**not met**"
        lines.append(f"- {target}: {rows:,} usage rows in ClickHouse (`{db}`, {ok_rows:,} of them 2xx without error) "
                     f"vs {served:,.0f} requests the gateway proxied (`aihub_requests_total{{model=\"{CHAT['model']}\"}}`; "
                     f"`aihub_usage_rows_written_total` {written:,.0f}): one row per request {met}. The clients saw "
                     f"{ok_seen[target]:,} 2xx answers (checks, warm-ups and runs; requests still in flight when wrk "
                     "or oha stop are completed and metered but not counted by the client).")
    return lines


# ---------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m * 100 if m else None


def f(v, digits=1, signed=False):
    if v is None:
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def pm(v):
    return "–" if v is None else f"±{v:.0f} %"


def pm_ms(v):
    return "" if v is None else f" (spread {v:.2f})"


def share(v):
    return "–" if v is None else f"{v * 100:.0f} %"


def summarize(results):
    """s[body][target] = medians (and spreads) of every figure; added latencies per round."""
    s = {}
    for body_kind, by_target in results.items():
        s[body_kind] = {}
        direct = by_target[DIRECT]
        for target, runs in by_target.items():
            d = {"rps": med([r["closed"]["rps"] for r in runs]), "rps_spread": spread([r["closed"]["rps"] for r in runs]),
                 "cpu": med([r["closed"]["cpu_us"] for r in runs]),
                 "cpu_spread": spread([r["closed"]["cpu_us"] for r in runs]),
                 "busy": med([r["closed"]["cpu_busy"] for r in runs]),
                 "redis_cpu": med([r["closed"]["extra_cpu_us"] for r in runs]),
                 "non2xx": sum(r["closed"]["non2xx"] + sum(r[rate]["bad"] for rate in RATES) for r in runs),
                 "sock": sum(r["closed"]["socket_errors"] for r in runs),
                 "cut": sum(r[rate]["cut"] for r in runs for rate in RATES)}
            for rate in RATES:
                d[f"cpu@{rate}"] = med([r[rate]["cpu_us"] for r in runs])
                for p in ("p50", "p99"):
                    d[f"{p}@{rate}"] = med([r[rate][f"{p}_ms"] for r in runs])
                    added = [r[rate][f"{p}_ms"] - dr[rate][f"{p}_ms"] for r, dr in zip(runs, direct)]
                    d[f"add_{p}@{rate}"] = med(added) if target != DIRECT else None
                    d[f"add_{p}@{rate}_spread"] = (max(added) - min(added)) if len(added) > 1 else None
            s[body_kind][target] = d
    return s


def goals(s):
    """[(goal, [(case, measured text, met: True/False/None)])]."""
    out = []
    gw = [BARE, LOCAL, REDIS]

    def ratio(a, b):
        return a / b if a and b else None

    def case(label, value, ok, fmt="{:.2f}×"):
        return (label, "–" if value is None else fmt.format(value), None if value is None else ok(value))

    for body_kind, limit in (("JSON small", 1.25), ("SSE", 1.15)):
        out.append((f"full pipeline CPU/req ≤ {limit}× nginx's ({body_kind})",
                    [case(t, ratio(s[body_kind][t]["cpu"], s[body_kind][NGINX]["cpu"]), lambda v, l=limit: v <= l)
                     for t in (LOCAL, REDIS)]))
    out.append(("bare gateway CPU/req ≤ 1.1× nginx's",
                [case(b, ratio(s[b][BARE]["cpu"], s[b][NGINX]["cpu"]), lambda v: v <= 1.1) for b in s]))
    out.append(("Redis limits add ≤ 15 % CPU/req over local limits",
                [case(b, None if not s[b][LOCAL]["cpu"] or s[b][REDIS]["cpu"] is None
                      else (s[b][REDIS]["cpu"] / s[b][LOCAL]["cpu"] - 1) * 100, lambda v: v <= 15, "{:+.1f} %")
                 for b in s]))
    for rate in RATES:
        cases = []
        for b in s:
            for t in gw:
                a, n = s[b][t][f"add_p50@{rate}"], s[b][NGINX][f"add_p50@{rate}"]
                cases.append((f"{b}, {t}", f"{f(a, 2, True)} vs nginx {f(n, 2, True)} ms",
                              None if a is None or n is None else a <= n))
        out.append((f"added p50 ≤ nginx's added p50 at {rate} req/s", cases))
    for rate in RATES:
        out.append((f"added p99 ≤ 0.3 ms at {rate} req/s",
                    [case(f"{b}, {t}", s[b][t][f"add_p99@{rate}"], lambda v: v <= 0.3, "{:+.2f} ms")
                     for b in s for t in gw]))
    out.append(("closed-loop throughput ≥ 0.9× nginx's",
                [case(f"{b}, {t}", ratio(s[b][t]["rps"], s[b][NGINX]["rps"]), lambda v: v >= 0.9)
                 for b in s for t in gw]))
    return out


def goal_line(goal, cases):
    decided = [c for c in cases if c[2] is not None]
    failed = [c for c in decided if not c[2]]
    overall = verdict(None if not decided else not failed)
    if len(cases) <= 3:
        return f"- {goal}: {overall} — " + "; ".join(f"{c[0]} {c[1]}" for c in cases)
    return (f"- {goal}: {overall} ({len(decided) - len(failed)} of {len(decided)} cases met)"
            + ("" if not failed else "; not met: " + "; ".join(f"{c[0]} {c[1]}" for c in failed)))


def verdict(met):
    return "–" if met is None else ("met" if met else "**not met**")


def report(results, s, sizes, usage_lines, notes, meta):
    r20, r1k = RATES[0], RATES[-1]
    lines = [
        "# Proxy benchmark: direct, nginx, gateway bare and full (issue 19)", "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['machine']}; load average (1/5/15 min) {meta['load_before']} before, {meta['load_after']} after "
        "(other work on the machine shows up as noise)",
        f"- Revision: {meta['revision']}",
        f"- Command: `{meta['command']}`",
        f"- {DURATION} s per run, {ROUNDS} round(s) interleaved (target order alternating), medians reported; "
        f"closed loop `wrk -t1 -c{CONNECTIONS}` after a 1 s warm-up; fixed rates with `oha --latency-correction` at "
        f"{' and '.join(map(str, RATES))} req/s ({'/'.join(str(max(2, min(CONNECTIONS, r // 20))) for r in RATES)} connections). "
        f"Proxies alone on CPU {PROXY_CPU} with one worker; mock upstream (`--threads 1 --chunks 16`), wrk, oha, "
        f"ClickHouse and Redis on CPU {LOAD_CPU}.",
        "- Targets: **direct** = the mock upstream (the reference for added latency); **nginx** "
        f"{meta['nginx']} = `worker_processes 1`, upstream `keepalive 128`, `proxy_http_version 1.1`, "
        "`proxy_buffering off`, `keepalive_requests 1000000` both ways, `access_log … buffer=64k flush=1s` (a "
        "production nginx logs; buffered, it costs a write per 64 KB); **gateway bare** = `threads: 1`, one YAML key, "
        "no limits, no metering; **gateway full** = the key on a plan with key and developer requests/tokens per minute, "
        "a concurrency cap and a hard-stop monthly quota, none of them reached (every rate-limit header written), "
        "metering into ClickHouse; with **local** limits, or **Redis** limits (`limits.redis`: "
        f"{meta['redis']}). Gateway access logs go to a file, like nginx's.",
        "- Bodies: " + "; ".join(
            f"**{b}** = {sizes[b][0]:,} bytes" + (f", {sizes[b][1]} SSE events" if BODIES[b][0] else "")
            + (f" (`x-mock-chunks: {LARGE_CHUNKS}`)" if BODIES[b][1] else "")
            for b in BODIES if b in sizes) + " (response bodies, direct).",
        "- CPU µs/req: utime+stime of the proxy process and its children (/proc/PID/stat, 10 ms ticks) over the "
        "requests wrk completed; `busy` = the proxy's CPU share during that run (below ~95 %, the load generator "
        f"rather than the proxy limited the closed loop). `CPU @{r1k}` is the same during the oha run at {r1k} req/s. "
        "Added latency = the target's percentile minus direct's in the same round (median over rounds). "
        f"At {r20} req/s a run holds {r20 * DURATION} requests: its p99 is nearly the maximum.",
        "", "## Results (medians)", "",
        f"| body | target | req/s | spread | CPU µs/req | spread | busy | CPU µs/req @{r1k} | "
        + " | ".join(f"p50 @{r} | p99 @{r}" for r in RATES) + " | "
        + " | ".join(f"added p50 @{r} | added p99 @{r}" for r in RATES) + " | Redis CPU µs/req | errors |",
        "|---|---|" + "---|" * (6 + 4 * len(RATES) + 2),
    ]
    for b, by_target in s.items():
        for t, d in by_target.items():
            errs = f"{d['non2xx']}" + (f" + {d['sock']} socket" if d["sock"] else "")
            lines.append(
                f"| {b} | {t} | {f(d['rps'], 0)} | {pm(d['rps_spread'])} | "
                f"{f(d['cpu'])} | {pm(d['cpu_spread'])} | "
                f"{share(d['busy'])} | {f(d[f'cpu@{r1k}'])} | "
                + " | ".join(f"{f(d[f'p50@{r}'], 2)} | {f(d[f'p99@{r}'], 2)}" for r in RATES) + " | "
                + " | ".join(f"{f(d[f'add_p50@{r}'], 2, True)} | {f(d[f'add_p99@{r}'], 2, True)}" for r in RATES)
                + f" | {f(d['redis_cpu'])} | {errs} |")
    lines += ["", "Latencies in ms. errors = non-2xx answers and failed requests over all runs (oha's requests cut "
              "off by the end of a run are not errors)."]

    lines += ["", "## Against nginx", "",
              "| body | target | CPU/req ÷ nginx | req/s ÷ nginx | "
              + " | ".join(f"added p50 @{r}: target / nginx ms" for r in RATES) + " | "
              + " | ".join(f"added p99 @{r} ms" for r in RATES) + " |",
              "|---|---|---|---|" + "---|" * (2 * len(RATES))]
    if ROUNDS > 1:
        lines[-2:-2] = ["Spread of an added p99 = max − min over the rounds, ms.", ""]
    for b, by_target in s.items():
        n = by_target[NGINX]
        for t in (BARE, LOCAL, REDIS):
            d = by_target[t]
            lines.append(
                f"| {b} | {t} | {f(d['cpu'] / n['cpu'] if d['cpu'] and n['cpu'] else None, 2)} | "
                f"{f(d['rps'] / n['rps'] if n['rps'] else None, 2)} | "
                + " | ".join(f"{f(d[f'add_p50@{r}'], 2, True)} / {f(n[f'add_p50@{r}'], 2, True)}" for r in RATES) + " | "
                + " | ".join(f"{f(d[f'add_p99@{r}'], 2, True)}" + pm_ms(d[f"add_p99@{r}_spread"]) for r in RATES) + " |")

    lines += ["", "## Goals (issue 19)", ""]
    lines += [goal_line(goal, cases) for goal, cases in goals(s)]
    if ROUNDS < 3:
        lines.append(f"\nWith {ROUNDS} round(s), these verdicts are within the noise: run with ROUNDS ≥ 3 for figures to quote.")

    lines += ["", "## Metering", ""] + usage_lines
    lines += ["", "<details><summary>Per round</summary>", "",
              "| body | target | round | req/s | CPU µs/req | busy | " + " | ".join(f"p50 @{r} | p99 @{r}" for r in RATES)
              + " | non-2xx |", "|---|---|---|---|---|---|" + "---|" * (2 * len(RATES) + 1)]
    for b, by_target in results.items():
        for t, runs in by_target.items():
            for i, r in enumerate(runs):
                c = r["closed"]
                lines.append(f"| {b} | {t} | {i + 1} | {c['rps']:.0f} | {f(c['cpu_us'])} | "
                             f"{share(c['cpu_busy'])} | "
                             + " | ".join(f"{r[rate]['p50_ms']:.2f} | {r[rate]['p99_ms']:.2f}" for rate in RATES)
                             + f" | {c['non2xx'] + sum(r[rate]['bad'] for rate in RATES)} |")
    lines += ["", "</details>"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {x}" for x in notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def machine():
    model = "unknown CPU"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs, {model}"


def loadavg():
    with open("/proc/loadavg") as fh:
        return "/".join(fh.read().split()[:3])


def revision():
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + (" with uncommitted changes in the work tree" if dirty else "")


def cleanup_external(redis_url):
    if not KEEP_DB:
        for db in DATABASES.values():
            try:
                clickhouse(f"DROP DATABASE IF EXISTS {db}")
            except (RuntimeError, OSError) as e:
                print(f"could not drop {db}: {e}", file=sys.stderr)
    if REDIS_URL and redis_url:
        keys = redis_cli(redis_url, "--scan", "--pattern", f"{REDIS_PREFIX}:*").stdout.split()
        for i in range(0, len(keys), 500):
            redis_cli(redis_url, "DEL", *keys[i:i + 500])



def main():
    for tool in ["wrk", "oha", "nginx", "taskset", "redis-cli"] + ([] if REDIS_URL else ["redis-server"]):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run loadtests/proxy-bench.sh")
    if not os.access(BIN, os.X_OK):
        raise SystemExit(f"{BIN} not found: run loadtests/proxy-bench.sh (or set AIHUB_BIN)")
    if ROUNDS < 1 or DURATION < 1:
        raise SystemExit("ROUNDS and DURATION must be at least 1")
    try:
        clickhouse("SELECT 1")
    except (RuntimeError, OSError) as e:
        raise SystemExit(f"ClickHouse at {CLICKHOUSE_URL} does not answer ({e}): run loadtests/proxy-bench.sh")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = os.environ.get("PROXY_BENCH_COMMAND") or (
        f"DURATION={DURATION} ROUNDS={ROUNDS} PROXY_CPU={PROXY_CPU} LOAD_CPU={LOAD_CPU} CONNECTIONS={CONNECTIONS} "
        f"python3 loadtests/proxy_bench.py")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "load_before": loadavg(),
            "revision": revision(), "command": command,
            "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]}
    tmp = tempfile.mkdtemp(prefix="aihub-proxy-bench-")
    procs = Processes(tmp)
    notes = []
    redis_url = None
    failed = True
    try:
        key, redis_url, redis_pid = start_all(procs, tmp)
        meta["redis"] = (f"a private redis-server on CPU {LOAD_CPU}, at nice -10 so that the load generator "
                         "does not starve it" if not REDIS_URL
                         else f"{redis_url.split('@')[-1]}, key prefix {REDIS_PREFIX}") + \
                        ("" if redis_pid else "; its CPU is not known")
        for target in (LOCAL, REDIS):
            if wait_metric(GATEWAYS[target], "aihub_limits_quota_seeded", 1.0) != 1.0:
                notes.append(f"{target}: aihub_limits_quota_seeded is not 1 before the load (the month's usage "
                             "was not read from ClickHouse)")
        if wait_metric(GATEWAYS[REDIS], "aihub_limits_redis_up", 1.0) != 1.0:
            notes.append(f"{REDIS}: aihub_limits_redis_up is not 1 before the load")
        sizes, ok_seen = check_targets(key, notes)
        logs = Logs(procs, tmp)
        results, ok_seen = run_all(procs, key, tmp, redis_pid, logs, ok_seen)
        for target in GATEWAYS:
            m = metrics(GATEWAYS[target])
            limited = metric_sum(m, "aihub_rate_limited_total")
            if limited:
                notes.append(f"{target}: {limited:.0f} requests were rate limited (aihub_rate_limited_total)")
            if target == REDIS and m.get("aihub_limits_redis_up") != 1.0:
                notes.append(f"{REDIS}: aihub_limits_redis_up = {m.get('aihub_limits_redis_up')} after the load")
            if target == REDIS and metric_sum(m, "aihub_limits_redis_errors_total"):
                notes.append(f"{REDIS}: {metric_sum(m, 'aihub_limits_redis_errors_total'):.0f} failed Redis calls")
        usage_lines = usage_check(ok_seen, notes)
        logs.sweep()
        notes += logs.notes()
        failed = False
    finally:
        procs.stop_all()
        cleanup_external(redis_url)
        if failed or os.environ.get("KEEP_TMP"):
            print(f"logs and configs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    meta["load_after"] = loadavg()
    s = summarize(results)
    text = report(results, s, sizes, usage_lines, notes, meta)
    out = os.path.join(ROOT, "loadtests", "results", "proxy-latest.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        fh.write(text)
    print(text)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
