#!/usr/bin/env python3
"""Runs the same load against the mock upstream directly, nginx in front of it, and the gateway.

Called by loadtests/proxy-bench.sh (which installs wrk, oha and nginx and builds aihub). The
proxy under test runs alone on PROXY_CPU; the load generator and the mock upstream share
LOAD_CPU, so on a 2-core machine the proxies are compared at equal footing while the load
generator saturates first. Reported per target and body kind (JSON, SSE):

- closed loop (wrk, 50 connections): requests/s, p50, p99, and the proxy's CPU microseconds per
  request (utime+stime delta from /proc/PID/stat divided by requests);
- fixed rates (oha, 20 and 1000 requests/s): p50/p99 and the latency added over direct.

Writes a Markdown table to loadtests/results/ and prints it.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("AIHUB_BIN", os.path.join(ROOT, "target", "release", "aihub"))
DURATION = int(os.environ.get("DURATION", "10"))
PROXY_CPU = os.environ.get("PROXY_CPU", "0")
LOAD_CPU = os.environ.get("LOAD_CPU", "1")
CONNECTIONS = int(os.environ.get("CONNECTIONS", "50"))
PORTS = {"direct": 19090, "nginx": 19081, "gateway": 19082, "gateway+metering": 19084}
OPS_PORT = 19083
METERED_OPS_PORT = 19085
CLICKHOUSE_URL = os.environ.get("AIHUB_BENCH_CLICKHOUSE_URL", "http://127.0.0.1:18124")
TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")

CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "Write one short sentence about proxies."}]}


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_http(url, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def start(tmp):
    procs = {}
    procs["mock"] = subprocess.Popen(
        ["taskset", "-c", LOAD_CPU, BIN, "mock-upstream", "--listen", f"127.0.0.1:{PORTS['direct']}",
         "--threads", "1", "--chunks", "16"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nginx_conf = os.path.join(tmp, "nginx.conf")
    with open(nginx_conf, "w") as f:
        f.write(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {tmp}/nginx-access.log;
    upstream mock {{ server 127.0.0.1:{PORTS['direct']}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{PORTS['nginx']} reuseport;
        client_max_body_size 10m;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    procs["nginx"] = subprocess.Popen(["taskset", "-c", PROXY_CPU, "nginx", "-c", nginx_conf, "-p", tmp],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    key = subprocess.run([BIN, "keys", "generate", "--id", "key_bench", "--developer", "dev_bench",
                          "--key-file", os.path.join(tmp, "key")], capture_output=True, text=True, check=True).stdout
    keys = "\n".join(l for l in key.splitlines() if not l.startswith("#")) + "\n"
    for name, port, ops, metering in (("gateway", PORTS["gateway"], OPS_PORT, ""),
                                      ("gateway+metering", PORTS["gateway+metering"], METERED_OPS_PORT,
                                       f"metering:\n  clickhouse: {{url: \"{CLICKHOUSE_URL}\", database: aihub_bench}}\n"
                                       f"  wal_dir: {tmp}/wal\n")):
        conf = os.path.join(tmp, f"{name}.yaml")
        with open(conf, "w") as f:
            f.write(f"""server:
  listen: ["127.0.0.1:{port}"]
  ops_listen: 127.0.0.1:{ops}
  threads: 1
upstreams:
  mock:
    endpoints: ["http://127.0.0.1:{PORTS['direct']}/v1"]
routes:
  - model: mock-gpt
    upstream: mock
{metering}keys:
{keys}""")
        procs[name] = subprocess.Popen(["taskset", "-c", PROXY_CPU, BIN, "gateway", "--config", conf],
                                       stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, f"{name}.log"), "w"))
    wait_http(f"http://127.0.0.1:{METERED_OPS_PORT}/readyz")
    wait_http(f"http://127.0.0.1:{OPS_PORT}/readyz")
    wait_http(f"http://127.0.0.1:{PORTS['nginx']}/v1/models")
    wait_http(f"http://127.0.0.1:{PORTS['direct']}/v1/models")
    with open(os.path.join(tmp, "key")) as f:
        return procs, f.read().strip()


def proxy_pids(procs, target):
    if target == "direct":
        return None
    pid = procs[target].pid
    return [pid] + children(pid)


def wrk_script(tmp, key, stream):
    body = dict(CHAT, stream=True) if stream else CHAT
    path = os.path.join(tmp, f"{'sse' if stream else 'json'}.lua")
    with open(path, "w") as f:
        f.write(f"""wrk.method = "POST"
wrk.body = {json.dumps(json.dumps(body))}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
""")
    return path


def closed_loop(url, script, pids):
    before = cpu_ticks(pids) if pids else 0
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{DURATION}s", "-s", script, url],
                         capture_output=True, text=True, check=True).stdout
    after = cpu_ticks(pids) if pids else 0
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    reqs, dur_us, p50, p99, errors = map(int, line.split()[1:])
    cpu_us = (after - before) * TICK_US / reqs if pids else None
    return {"rps": reqs / (dur_us / 1e6), "p50_ms": p50 / 1000, "p99_ms": p99 / 1000, "cpu_us": cpu_us,
            "errors": errors, "requests": reqs}


def fixed_rate(url, key, stream, rate):
    body = json.dumps(dict(CHAT, stream=True) if stream else CHAT)
    conns = max(2, min(50, rate // 20))
    cmd = ["taskset", "-c", LOAD_CPU, "oha", "--no-tui", "--output-format", "json", "-z", f"{DURATION}s",
           "-q", str(rate), "-c", str(conns), "--latency-correction", "-m", "POST", "-d", body,
           "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {key}", url]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"oha failed: {out.stderr}")
    r = json.loads(out.stdout)
    pct = r["latencyPercentiles"]
    ok = r["statusCodeDistribution"].get("200", 0)
    total = sum(r["statusCodeDistribution"].values()) + sum(r.get("errorDistribution", {}).values())
    return {"p50_ms": pct["p50"] * 1000, "p99_ms": pct["p99"] * 1000, "ok": ok, "total": total}


def main():
    for tool in ["wrk", "oha", "nginx", "taskset"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run loadtests/proxy-bench.sh")
    tmp = tempfile.mkdtemp(prefix="aihub-bench-")
    procs, key = start(tmp)
    rows = []
    try:
        for stream in (False, True):
            kind = "SSE" if stream else "JSON"
            script = wrk_script(tmp, key, stream)
            results = {}
            for target in ("direct", "nginx", "gateway", "gateway+metering"):
                url = f"http://127.0.0.1:{PORTS[target]}/v1/chat/completions"
                # Warm up connections and caches.
                subprocess.run(["wrk", "-t1", "-c10", "-d1s", "-s", script, url], capture_output=True)
                res = {"closed": closed_loop(url, script, proxy_pids(procs, target))}
                for rate in (20, 1000):
                    res[rate] = fixed_rate(url, key, stream, rate)
                results[target] = res
                print(f"{kind} {target}: {json.dumps(res)}", file=sys.stderr)
            for target, res in results.items():
                c = res["closed"]
                added = lambda rate, p: res[rate][p] - results["direct"][rate][p]
                rows.append(
                    f"| {kind} | {target} | {c['rps']:.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | "
                    + (f"{c['cpu_us']:.1f}" if c["cpu_us"] is not None else "–")
                    + f" | {c['errors']} | {res[20]['p50_ms']:.2f} | {res[20]['p99_ms']:.2f} | "
                    + f"{res[1000]['p50_ms']:.2f} | {res[1000]['p99_ms']:.2f} | "
                    + ("–" if target == "direct" else f"{added(20, 'p50_ms'):+.2f} / {added(1000, 'p99_ms'):+.2f}")
                    + f" | {res[1000]['ok']}/{res[1000]['total']} |")
    finally:
        for p in procs.values():
            p.send_signal(2)
        for p in procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
    header = (
        f"Proxy comparison, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs; proxy on CPU {PROXY_CPU}, "
        f"wrk/oha and mock upstream on CPU {LOAD_CPU}; {DURATION}s per run, wrk -c{CONNECTIONS}.\n\n"
        "| body | target | closed-loop req/s | p50 ms | p99 ms | proxy CPU µs/req | errors | 20 rps p50 | 20 rps p99 | 1000 rps p50 | 1000 rps p99 | added p50@20 / p99@1000 ms | 200s @1000 |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    table = header + "\n".join(rows) + "\n"
    rows_out = subprocess.run(["curl", "-s", f"{CLICKHOUSE_URL}/?database=aihub_bench", "--data-binary",
                               "SELECT count() FROM usage_events"], capture_output=True, text=True).stdout.strip()
    table += f"\nUsage rows written by gateway+metering (ClickHouse aihub_bench, cumulative): {rows_out}\n"
    os.makedirs(os.path.join(ROOT, "loadtests", "results"), exist_ok=True)
    out = os.path.join(ROOT, "loadtests", "results", "proxy-latest.md")
    with open(out, "w") as f:
        f.write(table)
    print(table)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
