#!/usr/bin/env python3
"""What retries and fallbacks cost when they are not needed, and what they buy when they are.

Called by loadtests/routing-bench.sh (which installs wrk and oha and builds aihub). Reuses the
helpers of loadtests/proxy_bench.py (request body, wrk script, closed loop with the proxy's CPU
from /proc/PID/stat). Every gateway runs with `threads: 1` alone on PROXY_CPU; the
mock upstreams and the load generator share LOAD_CPU. No `metering:` section, so no ClickHouse.

A. Retries unused: one healthy endpoint, gateway `retry: {attempts: 1}` (retries off) against
   `retry: {attempts: 3}` plus a route `fallbacks:` entry (configured, never needed). Per body
   kind (JSON, SSE): closed loop (wrk, CONNECTIONS connections) requests/s and gateway CPU
   microseconds per request; fixed rates (oha, 20 and 1000 requests/s) p50/p99. ROUNDS rounds
   in alternating order, the median of each reported; the difference between the configurations
   is set against the spread between rounds of the same configuration (the noise). The direct
   hit on the mock is measured once as the reference.
B. One endpoint of two answers 503 to every 5th request it receives (--error-every 5), i.e.
   ~10 % of first attempts: gateway `attempts: 1` against `attempts: 3` (default backoff) and
   `attempts: 3, backoff: 0ms`; references: the mock hit directly and the gateway over two
   healthy endpoints. JSON at a fixed rate (oha, B_RATE requests/s for DURATION): the share of
   non-2xx answers the client sees, p50/p99/p99.9/max, retried attempts (from the gateway's
   aihub_upstream_attempts_total), passive-health ejections (from its log); and closed loop
   (wrk) requests/s and non-2xx share.

Env: DURATION (s per run, default 10), PROXY_CPU (0), LOAD_CPU (1), CONNECTIONS (50),
ROUNDS (3), B_RATE (200). Writes loadtests/results/routing-latest.md and prints it. Exits non-zero
with a message when a server does not come up.
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.dont_write_bytecode = True  # no loadtests/__pycache__ from the import below
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxy_bench as pb  # noqa: E402  (same directory)

ROOT = pb.ROOT
BIN = pb.BIN
DURATION = pb.DURATION
PROXY_CPU = pb.PROXY_CPU
LOAD_CPU = pb.LOAD_CPU
CONNECTIONS = pb.CONNECTIONS
ROUNDS = int(os.environ.get("ROUNDS", "3"))
B_RATE = int(os.environ.get("B_RATE", "200"))

# Ports 196xx (proxy_bench 190xx-191xx, controlplane 192xx, 193xx, limits 194xx, 195xx in use);
# a gateway's ops port is its port + 50.
MOCKS = {"mock-a": 19690, "mock-b-503": 19691, "mock-c": 19692}
MOCK_ARGS = {"mock-b-503": ["--error-every", "5", "--error-status", "503"]}


def endpoint(mock):
    return f"http://127.0.0.1:{MOCKS[mock]}/v1"


# name -> (port, upstreams YAML, routes YAML)
GATEWAYS = {
    "retries off": (19601, f"""  mock:
    endpoints: ["{endpoint('mock-a')}"]
    retry: {{attempts: 1}}
""", """  - model: mock-gpt
    upstream: mock
"""),
    "retries on + fallback": (19602, f"""  mock:
    endpoints: ["{endpoint('mock-a')}"]
    retry: {{attempts: 3}}
  spare:
    endpoints: ["{endpoint('mock-c')}"]
    retry: {{attempts: 3}}
""", """  - model: mock-gpt
    upstream: mock
    fallbacks: [mock-gpt-spare]
  - model: mock-gpt-spare
    upstream: spare
"""),
    "2 healthy, attempts 3": (19603, f"""  mock:
    endpoints: ["{endpoint('mock-a')}", "{endpoint('mock-c')}"]
    retry: {{attempts: 3}}
""", """  - model: mock-gpt
    upstream: mock
"""),
    "1 of 2 503s, attempts 1": (19604, f"""  mock:
    endpoints: ["{endpoint('mock-a')}", "{endpoint('mock-b-503')}"]
    retry: {{attempts: 1}}
""", """  - model: mock-gpt
    upstream: mock
"""),
    "1 of 2 503s, attempts 3": (19605, f"""  mock:
    endpoints: ["{endpoint('mock-a')}", "{endpoint('mock-b-503')}"]
    retry: {{attempts: 3}}
""", """  - model: mock-gpt
    upstream: mock
"""),
    "1 of 2 503s, attempts 3, backoff 0ms": (19606, f"""  mock:
    endpoints: ["{endpoint('mock-a')}", "{endpoint('mock-b-503')}"]
    retry: {{attempts: 3, backoff: 0ms}}
""", """  - model: mock-gpt
    upstream: mock
"""),
}
A_CONFIGS = ["retries off", "retries on + fallback"]
# With AIHUB_BASELINE_BIN (an `aihub` built from a revision before issue 18, e.g. 428e174, whose
# configuration knows no `retry:`), scenario A also runs that binary with a plain upstream: the
# gateway as it was "today" before retries, fallbacks, balancing and health checks existed.
BASELINE_BIN = os.environ.get("AIHUB_BASELINE_BIN")
BASELINE = "before issue 18"
BINS = {}  # gateway name -> binary, when not BIN
if BASELINE_BIN:
    GATEWAYS[BASELINE] = (19607, f"""  mock:
    endpoints: ["{endpoint('mock-a')}"]
""", """  - model: mock-gpt
    upstream: mock
""")
    BINS[BASELINE] = BASELINE_BIN
    A_CONFIGS.append(BASELINE)
LOGS = {}  # gateway name -> its stderr (access log, warnings)
B_TARGETS = ["direct mock A", "2 healthy, attempts 3", "1 of 2 503s, attempts 1",
             "1 of 2 503s, attempts 3", "1 of 2 503s, attempts 3, backoff 0ms"]


def url_of(target):
    port = MOCKS["mock-a"] if target.startswith("direct") else GATEWAYS[target][0]
    return f"http://127.0.0.1:{port}/v1/chat/completions"


def check_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise SystemExit(f"port {port} is in use ({e}): stop whatever listens there and run again")


def wait_up(name, proc, url, log, timeout=20):
    """Waits for `url` to answer; exits with the log's tail when `proc` dies or never answers."""
    def fail(why):
        tail = ""
        if log and os.path.exists(log):
            with open(log) as f:
                tail = "".join(f.read().split("Stack backtrace:")[0].splitlines(True)[-15:])
        raise SystemExit(f"{name} did not come up ({why}); {' '.join(proc.args)}\n{tail}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            fail(f"exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except Exception:
            time.sleep(0.1)
    else:
        fail(f"{url} did not answer within {timeout}s")
    if proc.poll() is not None:
        fail(f"exited with {proc.returncode} (another server on its port?)")


def start(tmp, procs):
    for port in list(MOCKS.values()) + [p for p, _, _ in GATEWAYS.values()] + [p + 50 for p, _, _ in GATEWAYS.values()]:
        check_free(port)
    for name, port in MOCKS.items():
        log = os.path.join(tmp, f"{name}.log")
        procs[name] = subprocess.Popen(
            ["taskset", "-c", LOAD_CPU, BIN, "mock-upstream", "--listen", f"127.0.0.1:{port}", "--name", name,
             "--threads", "1", "--chunks", "16"] + MOCK_ARGS.get(name, []),
            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        wait_up(name, procs[name], f"http://127.0.0.1:{port}/v1/models", log)
    key = subprocess.run([BIN, "keys", "generate", "--id", "key_bench", "--developer", "dev_bench",
                          "--key-file", os.path.join(tmp, "key")], capture_output=True, text=True, check=True).stdout
    keys = "\n".join(l for l in key.splitlines() if not l.startswith("#")) + "\n"
    for i, (name, (port, upstreams, routes)) in enumerate(GATEWAYS.items()):
        conf = os.path.join(tmp, f"gateway{i}.yaml")
        with open(conf, "w") as f:
            f.write(f"""server:
  listen: ["127.0.0.1:{port}"]
  ops_listen: 127.0.0.1:{port + 50}
  threads: 1
upstreams:
{upstreams}routes:
{routes}keys:
{keys}""")
        log = LOGS[name] = os.path.join(tmp, f"gateway{i}.log")
        procs[name] = subprocess.Popen(["taskset", "-c", PROXY_CPU, BINS.get(name, BIN), "gateway", "--config", conf],
                                       stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    for i, (name, (port, _, _)) in enumerate(GATEWAYS.items()):
        wait_up(f"gateway `{name}`", procs[name], f"http://127.0.0.1:{port + 50}/readyz",
                os.path.join(tmp, f"gateway{i}.log"))
    with open(os.path.join(tmp, "key")) as f:
        return f.read().strip()


def ejections(target):
    """How often the gateway's passive health started skipping an endpoint (its warning)."""
    if target.startswith("direct"):
        return "–"
    with open(LOGS[target], errors="replace") as f:
        return sum("endpoint skipped after repeated failures" in line for line in f)


def pids_of(procs, target):
    if target.startswith("direct"):
        return None
    pid = procs[target].pid
    return [pid] + pb.children(pid)


def warm_up(script, url):
    subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c10", "-d1s", "-s", script, url], capture_output=True)


def oha(url, key, stream, rate):
    """Fixed rate for DURATION: latency percentiles (ms) over all answers, and status counts."""
    body = json.dumps(dict(pb.CHAT, stream=True) if stream else pb.CHAT)
    conns = max(2, min(50, rate // 20))
    cmd = ["taskset", "-c", LOAD_CPU, "oha", "--no-tui", "--output-format", "json", "-z", f"{DURATION}s",
           "-q", str(rate), "-c", str(conns), "--latency-correction", "-m", "POST", "-d", body,
           "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {key}", url]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"oha failed: {out.stderr}")
    r = json.loads(out.stdout)
    pct = r["latencyPercentiles"]
    codes = {int(k): v for k, v in r["statusCodeDistribution"].items()}
    errors = r.get("errorDistribution", {})
    # oha cancels the requests still in flight when -z ends; those are not the target's failures.
    cut = sum(v for k, v in errors.items() if "deadline" in k)
    failed = sum(errors.values()) - cut
    total = sum(codes.values()) + failed
    ok = sum(v for k, v in codes.items() if 200 <= k < 300)
    ms = lambda v: (v or 0) * 1000  # noqa: E731
    return {"p50_ms": ms(pct["p50"]), "p99_ms": ms(pct["p99"]), "p999_ms": ms(pct.get("p99.9")),
            "max_ms": ms(r["summary"].get("slowest")), "total": total, "ok": ok, "codes": codes,
            "conn_errors": failed, "error_kinds": errors}


def retried(target):
    """aihub_upstream_attempts_total{result="retried_status"} of a gateway (0 for the direct hit)."""
    if target.startswith("direct"):
        return 0
    with urllib.request.urlopen(f"http://127.0.0.1:{GATEWAYS[target][0] + 50}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(int(float(l.rsplit(" ", 1)[1])) for l in text.splitlines()
               if l.startswith("aihub_upstream_attempts_total{") and 'result="retried_status"' in l)


def pct(new, old):
    return (new - old) / old * 100 if old else float("nan")


def spread(values):
    """Relative spread (max - min) / median of one configuration's rounds, in %."""
    m = statistics.median(values)
    return (max(values) - min(values)) / m * 100 if m else 0.0


def scenario_a(procs, key, tmp):
    """runs[kind][config] = list of per-round results."""
    runs = {}
    for stream in (False, True):
        kind = "SSE" if stream else "JSON"
        script = pb.wrk_script(tmp, key, stream)
        runs[kind] = {c: [] for c in ["direct mock A"] + A_CONFIGS}
        order = ["direct mock A"] + A_CONFIGS
        for rnd in range(ROUNDS):
            targets = (A_CONFIGS if rnd % 2 == 0 else A_CONFIGS[::-1])
            if rnd == 0:
                targets = ["direct mock A"] + targets
            for target in targets:
                url = url_of(target)
                warm_up(script, url)
                res = {"closed": pb.closed_loop(url, script, pids_of(procs, target))}
                for rate in (20, 1000):
                    res[rate] = oha(url, key, stream, rate)
                runs[kind][target].append(res)
                print(f"A {kind} round {rnd + 1} {target}: {json.dumps(res)}", file=sys.stderr)
        runs[kind] = {c: runs[kind][c] for c in order}
    return runs


A_METRICS = [  # (label, getter, unit)
    ("closed-loop req/s", lambda r: r["closed"]["rps"], ""),
    ("CPU µs/req", lambda r: r["closed"]["cpu_us"], ""),
    ("20 rps p50 ms", lambda r: r[20]["p50_ms"], "ms"),
    ("20 rps p99 ms", lambda r: r[20]["p99_ms"], "ms"),
    ("1000 rps p50 ms", lambda r: r[1000]["p50_ms"], "ms"),
    ("1000 rps p99 ms", lambda r: r[1000]["p99_ms"], "ms"),
]


def table_a(runs):
    head = "| body | gateway | " + " | ".join(m[0] for m in A_METRICS) + " | wrk errors | 2xx @1000 |\n"
    head += "|---|---|" + "---|" * len(A_METRICS) + "---|---|\n"
    rows = []
    for kind, by_config in runs.items():
        means = {}
        for config, rounds in by_config.items():
            vals = []
            for label, get, _ in A_METRICS:
                xs = [get(r) for r in rounds]
                if None in xs:
                    vals.append(None)
                    continue
                vals.append(statistics.median(xs))
            means[config] = vals
            errors = sum(r["closed"]["errors"] for r in rounds)
            ok = sum(r[1000]["ok"] for r in rounds)
            total = sum(r[1000]["total"] for r in rounds)
            label = config + (f" (median of {len(rounds)})" if len(rounds) > 1 else "")
            cells = ["–" if v is None else f"{v:.{digits}f}" for v, digits in zip(vals, (0, 1, 2, 2, 2, 2))]
            rows.append(f"| {kind} | {label} | " + " | ".join(cells) + f" | {errors} | {ok}/{total} |")
        comparisons = [(A_CONFIGS[1], A_CONFIGS[0], "(on − off) / off")]
        if BASELINE in means:
            comparisons.append((A_CONFIGS[1], BASELINE, "(on − before issue 18) / before"))
        for new_cfg, old_cfg, title in comparisons:
            on, off = means[new_cfg], means[old_cfg]
            diffs, noises = [], []
            for i, (label, get, unit) in enumerate(A_METRICS):
                d = pct(on[i], off[i])
                noise = max(spread([get(r) for r in by_config[c]]) for c in (new_cfg, old_cfg))
                extra = f"{on[i] - off[i]:+.2f} ms, " if unit == "ms" else ""
                diffs.append(f"{extra}{d:+.1f} %")
                noises.append(f"±{noise:.1f} %" + ("" if ROUNDS < 2 else (" ✓" if abs(d) <= noise else " ✗")))
            rows.append(f"| {kind} | **difference** {title} | " + " | ".join(diffs) + " | | |")
            rows.append(f"| {kind} | noise (spread between rounds of those two) | " + " | ".join(noises) + " | | |")
    return head + "\n".join(rows) + "\n"


def rounds_a(runs):
    lines = ["| body | gateway | round | req/s | CPU µs/req | 20 p50 | 20 p99 | 1000 p50 | 1000 p99 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, by_config in runs.items():
        for config, rounds in by_config.items():
            for i, r in enumerate(rounds):
                c = r["closed"]
                cpu = "–" if c["cpu_us"] is None else f"{c['cpu_us']:.1f}"
                lines.append(f"| {kind} | {config} | {i + 1} | {c['rps']:.0f} | {cpu} | {r[20]['p50_ms']:.2f} | "
                             f"{r[20]['p99_ms']:.2f} | {r[1000]['p50_ms']:.2f} | {r[1000]['p99_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def scenario_b(procs, key, tmp):
    script = pb.wrk_script(tmp, key, False)
    results = {}
    for target in B_TARGETS:
        url = url_of(target)
        warm_up(script, url)
        before = retried(target)
        fixed = oha(url, key, False, B_RATE)
        fixed["retried"] = retried(target) - before
        closed = pb.closed_loop(url, script, pids_of(procs, target))
        results[target] = {"fixed": fixed, "closed": closed}
        print(f"B {target}: {json.dumps(results[target])}", file=sys.stderr)
    return results


def table_b(results):
    head = (f"| target | {B_RATE} rps: non-2xx seen by client | statuses | retried attempts | p50 ms | p99 ms | "
            "p99.9 ms | max ms | closed-loop req/s | closed-loop non-2xx | gateway CPU µs/req | endpoint ejections |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for target, r in results.items():
        f, c = r["fixed"], r["closed"]
        bad = f["total"] - f["ok"]
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(f["codes"].items()))
        if f["conn_errors"]:
            statuses += f", connection errors: {f['conn_errors']}"
        cpu = "–" if c["cpu_us"] is None else f"{c['cpu_us']:.1f}"
        rows.append(f"| {target} | {bad}/{f['total']} ({bad / f['total'] * 100:.1f} %) | {statuses} | "
                    f"{'–' if target.startswith('direct') else f['retried']} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | "
                    f"{f['p999_ms']:.2f} | {f['max_ms']:.2f} | {c['rps']:.0f} | "
                    f"{c['errors']}/{c['requests']} ({c['errors'] / c['requests'] * 100:.1f} %) | {cpu} | {r['ejections']} |")
    return head + "\n".join(rows) + "\n"


def machine():
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}"


def loadavg():
    with open("/proc/loadavg") as f:
        return "/".join(f.read().split()[:3])


def revision():
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + (" with uncommitted changes in the work tree" if dirty else "")


def main():
    for tool in ["wrk", "oha", "taskset"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run loadtests/routing-bench.sh")
    if not os.access(BIN, os.X_OK):
        raise SystemExit(f"{BIN} not found: run loadtests/routing-bench.sh (or set AIHUB_BIN)")
    if ROUNDS < 1:
        raise SystemExit("ROUNDS must be at least 1")
    command = os.environ.get("ROUTING_BENCH_COMMAND") or (
        f"DURATION={DURATION} PROXY_CPU={PROXY_CPU} LOAD_CPU={LOAD_CPU} CONNECTIONS={CONNECTIONS} "
        f"ROUNDS={ROUNDS} B_RATE={B_RATE} python3 loadtests/routing_bench.py")
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load_before = loadavg()
    tmp = tempfile.mkdtemp(prefix="aihub-routing-bench-")
    procs = {}
    try:
        key = start(tmp, procs)
        runs = scenario_a(procs, key, tmp)
        b = scenario_b(procs, key, tmp)
    except BaseException:
        print(f"logs and configs kept in {tmp}", file=sys.stderr)
        raise
    finally:
        for p in procs.values():
            p.send_signal(2)
        for p in procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
    for target in b:
        b[target]["ejections"] = ejections(target)
    shutil.rmtree(tmp)  # the gateways' access logs run to a GB at DURATION=10
    out = f"""# Routing benchmark: retries unused, and one endpoint answering 503

- Date: {started}
- Machine: {machine()}; load average (1/5/15 min) {load_before} before, {loadavg()} after
  (other work on the machine shows up as noise)
- Revision: {revision()}
- Command: `{command}`
- DURATION={DURATION}s per run, ROUNDS={ROUNDS}, wrk -t1 -c{CONNECTIONS}, B_RATE={B_RATE} req/s. Each gateway
  (`threads: 1`, no metering) alone on CPU {PROXY_CPU}; mock upstreams (`--threads 1 --chunks 16`),
  wrk and oha on CPU {LOAD_CPU}. Latencies are client-side (oha with latency correction; wrk for the closed loop).

## A. Retries configured but not needed

One healthy endpoint. `retries off`: `retry: {{attempts: 1}}`. `retries on + fallback`:
`retry: {{attempts: 3}}` and the route has `fallbacks: [mock-gpt-spare]` (another upstream);
no request fails, so neither is ever used. Figures are medians over the rounds (run in alternating
order); the direct line is one run of the mock alone, for reference. "noise" is the larger relative
spread (max − min) / median between rounds of one configuration; ✓ = the difference is within it,
✗ = outside it, in either direction (a configuration that does strictly more work measuring faster is noise too).

{table_a(runs)}
<details><summary>Per round</summary>

{rounds_a(runs)}
</details>

## B. One of two endpoints answers 503 to 20 % of its requests

Upstream with two endpoints (round robin): mock A healthy, mock B `--error-every 5 --error-status 503`,
so ~10 % of first attempts fail. A 503 goes to the client with `attempts: 1` (passive health ejects B
only after three failures in a row, which its every-5th failures are not unless answers complete out
of order); with `attempts: 3` it is sent again to mock A, the endpoint not tried yet, at once (the
`backoff`, default 50 ms, is waited only before going back to an endpoint already tried; the `backoff:
0ms` line shows it makes no difference here). References: mock A
hit directly, and the gateway over two healthy endpoints (mocks A and C). JSON bodies. "retried
attempts" is the gateway's `aihub_upstream_attempts_total{{result="retried_status"}}` during the
fixed-rate run; "endpoint ejections" counts its warning "endpoint skipped after repeated failures"
(passive health: `failures: 3` in a row, in the order answers arrive, skip the endpoint for `cooldown: 10s`)
over the fixed-rate and closed-loop runs.

{table_b(b)}"""
    os.makedirs(os.path.join(ROOT, "loadtests", "results"), exist_ok=True)
    path = os.path.join(ROOT, "loadtests", "results", "routing-latest.md")
    with open(path, "w") as f:
        f.write(out)
    print(out)
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
