#!/usr/bin/env python3
"""Protocol abuse benchmark (issue 21, item 2): well-behaved clients' latency while hostile
clients hold the gateway's and the admin API's connections, and what those cost the servers.

Starts a mock upstream, a gateway (one worker thread, metering to ClickHouse) and an admin API
(SQLite), then for each phase measures a fixed-rate client (open loop: latency from each request's
scheduled start, so a stall is counted in full) and reads the server's VmRSS and open descriptors
from /proc before, during and after:

- baseline: no attack;
- idle: IDLE_CONNECTIONS (10,000) TCP connections that never send a byte, held until the server
  closes them (`server.idle_timeout`, 60 s by default): the time that takes is reported;
- kept-alive idle: KEPT_ALIVE (2,000) connections that made one request and then stay silent
  (pingora alone would keep those forever);
- slowloris: SLOWLORIS (1,000) connections sending a request header one byte per second, each
  reopened when the server closes it (`server.header_read_timeout`, 10 s by default);
- stalled readers: STALLED (20) clients asking for a long stream (30,000 events, ~6 MB, from a
  mock upstream of their own) and never reading it; the gateway cuts them at
  `server.response_write_timeout` (10 s here) and their usage rows (`error_type =
  client_timeout`) are counted in ClickHouse.

The admin API gets the baseline and idle phases (its `server.header_read_timeout`, 10 s by
default, ends idle connections). Attackers run in a child process so their work does not delay
the measured client's event loop. Writes loadtests/results/abuse-latest.md.

Env: AIHUB_BIN, RATE (req/s, 50), PHASE_SECONDS (20), IDLE_CONNECTIONS (10000), KEPT_ALIVE
(2000), SLOWLORIS (1000), STALLED (20), CLICKHOUSE_URL (http://127.0.0.1:8123), KEEP_TMP=1.
Ports 19700-19704.
"""

import asyncio
import ctypes
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("AIHUB_BIN", os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                "release", "aihub"))
RATE = int(os.environ.get("RATE", "50"))
PHASE = int(os.environ.get("PHASE_SECONDS", "20"))
IDLE = int(os.environ.get("IDLE_CONNECTIONS", "10000"))
KEPT_ALIVE = int(os.environ.get("KEPT_ALIVE", "2000"))
SLOWLORIS = int(os.environ.get("SLOWLORIS", "1000"))
STALLED = int(os.environ.get("STALLED", "20"))
CLICKHOUSE_URL = os.environ.get("CLICKHOUSE_URL", "http://127.0.0.1:8123")
GW, OPS, MOCK, ADMIN, LONG_MOCK = 19700, 19701, 19702, 19703, 19704
LONG_CHUNKS = 30000
WRITE_TIMEOUT = 10
AFTER_WAIT = int(os.environ.get("AFTER_WAIT", "150"))
RUN_ID = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
DATABASE = f"aihub_abuse_{RUN_ID}"
CHAT = json.dumps({"model": "mock-gpt", "messages": [{"role": "user", "content": "Say hello"}]})
STREAM = json.dumps({"model": "mock-long", "stream": True, "messages": [{"role": "user", "content": "Say hello"}]})


def die_with_parent():
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def proc(pid):
    """(VmRSS MiB, open descriptors) of `pid`."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def clickhouse(query):
    req = urllib.request.Request(CLICKHOUSE_URL + "/", data=query.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode().strip()


def wait_http(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def request_bytes(port, key, kind):
    if kind == "admin":
        return f"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    body = STREAM if kind == "stream" else CHAT
    extra = f"x-mock-chunks: {LONG_CHUNKS}\r\n" if kind == "stream" else ""
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n{body}").encode()


async def read_response(reader):
    """Reads one HTTP/1.1 response with a Content-Length or chunked body; its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, headers.get("connection", "").lower() == "close"


async def fixed_rate(port, key, kind, seconds):
    """Requests at RATE/s on a pool of kept-alive connections; latencies (ms) from each request's
    scheduled start, and the failures."""
    pool, latencies, failures = [], [], []
    payload = request_bytes(port, key, kind)

    async def one(scheduled):
        conn = pool.pop() if pool else None
        try:
            if conn is None:
                conn = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            conn[1].write(payload)
            status, close = await asyncio.wait_for(read_response(conn[0]), 30)
            latencies.append((time.monotonic() - scheduled) * 1000)
            if status != 200:
                failures.append(str(status))
            if close:
                conn[1].close()
            else:
                pool.append(conn)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            failures.append(type(e).__name__)
            if conn is not None:
                conn[1].close()

    start, tasks = time.monotonic(), []
    for i in range(int(seconds * RATE)):
        scheduled = start + i / RATE
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    for _, w in pool:
        w.close()
    return latencies, failures


# ------------------------------------------------------------------------------------ attackers

async def hold_idle(port, n, first_request, report):
    """Opens `n` connections (optionally after one unauthenticated request each) and holds them;
    reports how many are open every second until all are closed by the server."""
    conns, closed_at = [], {}
    for i in range(n):
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            report.put(("error", f"connect {i}: {e}"))
            break
        if first_request:
            w.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            await read_response(r)
        conns.append((r, w))
    opened = time.monotonic()
    report.put(("opened", len(conns)))

    async def watch(i, r):
        try:
            while await r.read(4096):
                pass
        except OSError:
            pass
        closed_at[i] = time.monotonic() - opened

    watchers = [asyncio.create_task(watch(i, r)) for i, (r, _) in enumerate(conns)]
    while len(closed_at) < len(conns):
        await asyncio.sleep(1)
        report.put(("open", len(conns) - len(closed_at), round(time.monotonic() - opened)))
    await asyncio.gather(*watchers)
    times = sorted(closed_at.values())
    report.put(("closed", len(times), times[0] if times else None, times[-1] if times else None))


async def slowloris(port, n, seconds, report):
    """`n` connections sending a request header one byte per second, each reopened when the server
    closes it; how many it closed and how long they lived."""
    header = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    closed, lifetimes = [0], []
    stop = time.monotonic() + seconds

    async def one(delay):
        await asyncio.sleep(delay)
        while time.monotonic() < stop:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(1)
                continue
            began = time.monotonic()
            eof = asyncio.create_task(r.read(1))
            try:
                for b in header:
                    w.write(bytes([b]))
                    done, _ = await asyncio.wait({eof}, timeout=max(0.0, min(1.0, stop - time.monotonic())))
                    if done or time.monotonic() >= stop:
                        break
            except OSError:
                pass
            if eof.done():
                closed[0] += 1
                lifetimes.append(time.monotonic() - began)
            else:
                eof.cancel()
            w.close()

    await asyncio.gather(*(one(i / n) for i in range(n)))
    life = sorted(lifetimes)
    report.put(("slowloris", closed[0], life[len(life) // 2] if life else None, life[-1] if life else None))


async def stalled(port, key, n, seconds, report):
    """`n` clients asking for a long stream and never reading it (a 4 KiB receive buffer), held
    for `seconds`; the server's cut shows in its usage rows (`client_timeout`) and descriptors."""
    payload = request_bytes(port, key, "stream")
    loop, socks = asyncio.get_running_loop(), []
    for _ in range(n):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, payload)
        socks.append(sock)
    report.put(("stalled", len(socks)))
    await asyncio.sleep(seconds)
    for sock in socks:
        sock.close()


def attacker(kind, args, report):
    die_with_parent()
    fn = {"idle": hold_idle, "slowloris": slowloris, "stalled": stalled}[kind]
    asyncio.run(fn(*args, report))


# ---------------------------------------------------------------------------------------- phases

def pct(xs, p):
    xs = sorted(xs)
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)] if xs else float("nan")


def sample_while(pid, seconds, every=1.0):
    out, end = [], time.time() + seconds
    while time.time() < end:
        out.append(proc(pid))
        time.sleep(every)
    return out


def measure(label, pid, port, key, kind, attack=None, after_wait=None):
    """One phase: the fixed-rate client for PHASE seconds, with `attack` (kind, args) running."""
    before = proc(pid)
    report, child, events = multiprocessing.Queue(), None, []
    if attack:
        child = multiprocessing.Process(target=attacker, args=(attack[0], attack[1], report), daemon=True)
        child.start()
        if attack[0] == "idle":
            # Measure once all connections are open.
            while True:
                ev = report.get(timeout=300)
                events.append(ev)
                if ev[0] in ("opened", "error"):
                    break
        else:
            time.sleep(3)  # the attack ramps up
    peak = [proc(pid)]
    lat, fail = [], []

    def run():
        nonlocal lat, fail
        lat, fail = asyncio.run(fixed_rate(port, key, kind, PHASE))

    t = threading.Thread(target=run)
    t.start()
    while t.is_alive():
        peak.append(proc(pid))
        time.sleep(1)
    t.join()
    closed_after = None
    if child is not None:
        started = time.time()
        while child.is_alive() and time.time() - started < (after_wait or 120):
            while not report.empty():
                events.append(report.get())
            time.sleep(0.5)
        while not report.empty():
            events.append(report.get())
        if child.is_alive():
            child.terminate()
        child.join()
        closed_after = time.time() - started
    time.sleep(2)
    after = proc(pid)
    row = {
        "phase": label, "requests": len(lat) + len([f for f in fail if not f.isdigit()]),
        "p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat) if lat else float("nan"),
        "failures": fail, "rss": (before[0], max(p[0] for p in peak), after[0]),
        "fds": (before[1], max(p[1] for p in peak), after[1]), "events": events, "closed_after": closed_after,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "events"}), [e for e in events if e[0] != "open"][-3:],
          flush=True)
    return row


def revision():
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return git("rev-parse", "--short", "HEAD") + (
        " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    if not os.path.exists(BIN):
        raise SystemExit(f"{BIN} not found: run loadtests/abuse-bench.sh (or set AIHUB_BIN)")
    tmp = tempfile.mkdtemp(prefix="aihub-abuse-")
    procs = []

    def start(name, cmd):
        log = open(os.path.join(tmp, name + ".log"), "a")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        procs.append(p)
        return p

    try:
        out = subprocess.run([BIN, "keys", "generate", "--id", "key_abuse", "--developer", "dev_abuse",
                              "--key-file", os.path.join(tmp, "key")], capture_output=True, text=True, check=True)
        entry = "\n".join(l for l in out.stdout.splitlines() if not l.startswith("#")) + "\n"
        key = open(os.path.join(tmp, "key")).read().strip()
        start("mock", [BIN, "mock-upstream", "--listen", f"127.0.0.1:{MOCK}", "--threads", "1"])
        wait_http(f"http://127.0.0.1:{MOCK}/v1/models")
        # The stalled readers' streams come from a mock of their own: the measured client's
        # upstream is not slowed by rendering them.
        start("long-mock", [BIN, "mock-upstream", "--listen", f"127.0.0.1:{LONG_MOCK}", "--threads", "1"])
        wait_http(f"http://127.0.0.1:{LONG_MOCK}/v1/models")
        with open(os.path.join(tmp, "gateway.yaml"), "w") as f:
            f.write(f"""server:
  listen: ["127.0.0.1:{GW}"]
  ops_listen: 127.0.0.1:{OPS}
  threads: 1
  response_write_timeout: {WRITE_TIMEOUT}s
upstreams:
  mock:
    endpoints: ["http://127.0.0.1:{MOCK}/v1"]
  long:
    endpoints: ["http://127.0.0.1:{LONG_MOCK}/v1"]
routes:
  - model: mock-gpt
    upstream: mock
  - model: mock-long
    upstream: long
metering:
  clickhouse: {{url: "{CLICKHOUSE_URL}", database: {DATABASE}}}
  wal_dir: {tmp}/wal
keys:
{entry}""")
        gw = start("gateway", [BIN, "gateway", "--config", os.path.join(tmp, "gateway.yaml")])
        wait_http(f"http://127.0.0.1:{OPS}/readyz")
        with open(os.path.join(tmp, "admin.yaml"), "w") as f:
            f.write(f"""listen: 127.0.0.1:{ADMIN}
database: {{url: "sqlite://{tmp}/admin.db"}}
email: {{transport: {{kind: file, dir: "{tmp}/mail"}}}}
tasks: {{files_dir: "{tmp}/files"}}
""")
        admin = start("admin", [BIN, "admin", "--config", os.path.join(tmp, "admin.yaml")])
        wait_http(f"http://127.0.0.1:{ADMIN}/readyz")
        with open(f"/proc/{gw.pid}/limits") as f:
            nofile = next(l for l in f if l.startswith("Max open files")).split()[3:5]
        with open(f"/proc/{admin.pid}/limits") as f:
            admin_nofile = next(l for l in f if l.startswith("Max open files")).split()[3:5]
        started_load = loadavg()
        rows = [measure("gateway: baseline", gw.pid, GW, key, "chat")]
        rows.append(measure(f"gateway: {IDLE:,} idle connections", gw.pid, GW, key, "chat",
                            ("idle", (GW, IDLE, False)), after_wait=AFTER_WAIT))
        rows.append(measure(f"gateway: {KEPT_ALIVE:,} kept-alive idle connections", gw.pid, GW, key, "chat",
                            ("idle", (GW, KEPT_ALIVE, True)), after_wait=AFTER_WAIT))
        rows.append(measure(f"gateway: slowloris, {SLOWLORIS:,} connections", gw.pid, GW, key, "chat",
                            ("slowloris", (GW, SLOWLORIS, PHASE + 3))))
        rows_before = int(clickhouse(f"SELECT count() FROM {DATABASE}.usage_events WHERE error_type = 'client_timeout'")
                          or 0)
        rows.append(measure(f"gateway: {STALLED} stalled readers", gw.pid, GW, key, "chat",
                            ("stalled", (GW, key, STALLED, PHASE + WRITE_TIMEOUT)), after_wait=PHASE + 60))
        query = f"SELECT count() FROM {DATABASE}.usage_events WHERE error_type = 'client_timeout'"
        deadline = time.time() + 30
        while int(clickhouse(query) or 0) - rows_before < STALLED and time.time() < deadline:
            time.sleep(1)
        client_timeouts = int(clickhouse(query)) - rows_before
        rows.append(measure("gateway: after the attacks", gw.pid, GW, key, "chat"))
        rows.append(measure("admin: baseline", admin.pid, ADMIN, key, "admin"))
        rows.append(measure(f"admin: {IDLE:,} idle connections", admin.pid, ADMIN, key, "admin",
                            ("idle", (ADMIN, IDLE, False)), after_wait=AFTER_WAIT))
        rows.append(measure("admin: after", admin.pid, ADMIN, key, "admin"))
        usage = clickhouse(f"SELECT count(), countIf(status = 200 AND error_type = '') FROM {DATABASE}.usage_events")
        write_report(rows, nofile, admin_nofile, client_timeouts, usage, started_load)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        try:
            clickhouse(f"DROP DATABASE IF EXISTS {DATABASE}")
        except OSError:
            pass
        if os.environ.get("KEEP_TMP", "") in ("", "0"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("kept", tmp)


def write_report(rows, nofile, admin_nofile, client_timeouts, usage, started_load):
    command = os.environ.get("ABUSE_BENCH_COMMAND", "loadtests/abuse-bench.sh")
    lines = [
        "# Protocol abuse: well-behaved clients during attacks", "",
        f"`{command}` at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, revision "
        f"{revision()}"
        f", binary `{os.path.relpath(BIN, ROOT) if BIN.startswith(ROOT) else BIN}`; {os.cpu_count()} CPUs shared with "
        f"other work (load average {started_load} at the start, {loadavg()} at the end).", "",
        f"Gateway: one worker thread, metering to ClickHouse, `response_write_timeout: {WRITE_TIMEOUT}s`, other "
        "deadlines at their defaults (`header_read_timeout` 10 s, `idle_timeout` 60 s); open files limit "
        f"{nofile[0]} (soft) / {nofile[1]} (hard) as the running process reports it. Admin API: SQLite, defaults "
        f"(`header_read_timeout` 10 s); open files {admin_nofile[0]} / {admin_nofile[1]}.", "",
        f"Measured client: {RATE} req/s for {PHASE} s per phase, open loop on kept-alive connections, latency "
        "from each request's scheduled start (gateway: a small chat completion through the mock upstream; "
        "admin: `GET /readyz`). RSS and descriptors of the server process: before / peak during / 2 s after "
        "the attack ended.", "",
        "| phase | requests | failed | p50 ms | p99 ms | max ms | RSS MiB before / peak / after | "
        "FDs before / peak / after | attack outcome |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        outcome = ""
        for ev in r["events"]:
            if ev[0] == "closed":
                outcome = (f"all {ev[1]:,} closed by the server, {ev[2]:.0f}–{ev[3]:.0f} s after opening"
                           if ev[1] else "none closed")
            elif ev[0] == "slowloris":
                outcome = (f"{ev[1]:,} connections closed by the header deadline (lifetime median {ev[2]:.1f} s, "
                           f"max {ev[3]:.1f} s)" if ev[1] else "none closed")
            elif ev[0] == "stalled":
                outcome = (f"{ev[1]} streams ({LONG_CHUNKS:,} events each) never read; {client_timeouts} cut by "
                           "the write timeout and metered (usage rows with `error_type = client_timeout`)")
            elif ev[0] == "error":
                outcome += f" {ev[1]}"
        fails = len(r["failures"])
        lines.append(
            f"| {r['phase']} | {r['requests']} | {fails} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} | "
            f"{r['rss'][0]:.1f} / {r['rss'][1]:.1f} / {r['rss'][2]:.1f} | "
            f"{r['fds'][0]} / {r['fds'][1]} / {r['fds'][2]} | {outcome} |")
    failures = sorted({f for r in rows for f in r["failures"]})
    lines += ["", f"Failures seen by the measured client: {', '.join(failures) if failures else 'none'}.",
              f"Usage rows (all, successful): {usage.replace(chr(9), ', ')}.", ""]
    path = os.path.join(ROOT, "loadtests", "results", "abuse-latest.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
