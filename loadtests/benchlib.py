"""Helpers shared by the load scripts that run the real `aihub` binaries (multinode_bench.py,
soak_bench.py): processes that die with the script, plain HTTP calls, readiness waits, the admin
API's sign-up and keys, ClickHouse queries, a gateway's Prometheus metrics, /proc readings.

Only the standard library: the scripts run with the system's python3.
"""

import ctypes
import json
import math
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

EMAIL, PASSWORD = "bench@aihub.test", "correct horse battery staple"


def die_with_parent():
    """preexec_fn: the child gets SIGKILL when this script dies (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


class Processes:
    """Every long-running process a script starts, with its log (`tmp/NAME.log`); `cpu` pins
    it with taskset (None: not pinned)."""

    def __init__(self, tmp):
        self.tmp, self.procs, self.logs = tmp, {}, {}

    def start(self, name, cmd, cpu=None):
        self.logs[name] = os.path.join(self.tmp, f"{name}.log")
        with open(self.logs[name], "w") as log:
            self.procs[name] = subprocess.Popen((["taskset", "-c", cpu] if cpu else []) + cmd, stdout=log,
                                                stderr=log, preexec_fn=die_with_parent)
        return self.procs[name]

    def tail(self, name, lines=20):
        try:
            with open(self.logs[name], errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, name, sig=signal.SIGTERM, timeout=30):
        """Stops `name` (SIGKILL after `timeout` s); its exit code, None if it was not running."""
        p = self.procs.pop(name, None)
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def stop_all(self, timeout=10):
        for name in reversed(list(self.procs)):
            self.stop(name, timeout=timeout)


def http(method, url, body=None, headers=None, timeout=5):
    """(status, parsed JSON or raw bytes); a dict body is sent as JSON."""
    h = dict(headers or {}, **({"Content-Type": "application/json"} if isinstance(body, dict) else {}))
    req = urllib.request.Request(url, json.dumps(body).encode() if isinstance(body, dict) else body, h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


def wait_ready(procs, name, url, timeout=60):
    """Until GET url answers 200; fails when the process `name` exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = procs.procs[name]
        if p.poll() is not None:
            raise SystemExit(f"{name} exited with {p.returncode}:\n{procs.tail(name)}")
        try:
            if http("GET", url, timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{name}: {url} not ready after {timeout} s:\n{procs.tail(name)}")


def expect(want, what, answer):
    """The body of `answer` (status, body) when its status is in `want`; else the script stops."""
    if answer[0] not in want:
        raise SystemExit(f"{what}: {answer[0]} {answer[1]!r:.500}")
    return answer[1]


def clickhouse(url, query, timeout=30):
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/", data=query.encode()), timeout=timeout) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"ClickHouse: {query}: {e.code} {e.read()[:300]!r}")


def redis_cli(url, *args):
    return subprocess.run(["redis-cli", "-u", url] + list(args), capture_output=True, text=True).stdout


def delete_redis_prefix(url, prefix):
    stale = redis_cli(url, "--scan", "--pattern", f"{prefix}*").split()
    for i in range(0, len(stale), 500):
        redis_cli(url, "DEL", *stale[i:i + 500])


def admin_config(tmp, port, database_url, redis_url, plans_file):
    """An `aihub admin` configuration on `database_url`, publishing key changes to `redis_url`,
    mail to files under tmp/mail; its path."""
    path = os.path.join(tmp, "admin.yaml")
    with open(path, "w") as f:
        f.write(f"""listen: 127.0.0.1:{port}
database: {{url: "{database_url}"}}
email: {{transport: {{kind: file, dir: "{tmp}/mail"}}}}
auth: {{argon2_memory_kib: 8192, argon2_iterations: 1}}
tasks: {{files_dir: "{tmp}/files"}}
plans_file: {plans_file}
redis: {{url: "{redis_url}"}}
""")
    return path


def sign_up(admin_url, mail_dir, email=EMAIL, password=PASSWORD):
    """Registers a developer, verifies the address from the mail file, logs in: the session token."""
    expect((202,), "register", http("POST", f"{admin_url}/developer/register",
                                    {"email": email, "password": password, "full_name": "Bench"}))
    token, deadline = None, time.time() + 10
    while token is None and time.time() < deadline:
        for name in os.listdir(mail_dir) if os.path.isdir(mail_dir) else []:
            with open(os.path.join(mail_dir, name), errors="replace") as f:
                lines = f.read().splitlines()
            if f"To: {email}" in lines:
                token = next((lines[i + 1].strip() for i, l in enumerate(lines[:-1]) if "paste this token" in l), None)
        time.sleep(0.05)
    expect((200,), "verify-email", http("POST", f"{admin_url}/developer/verify-email", {"token": token or "no mail came"}))
    return expect((200,), "login", http("POST", f"{admin_url}/developer/login",
                                        {"email": email, "password": password}))["access_token"]


def metrics(url, timeout=5):
    """A Prometheus text endpoint as {name: value summed over its labels}."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode(errors="replace")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and " " in line:
            name = line.split("{")[0].split(" ")[0]
            try:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return out


def proc_status(pid):
    """(VmRSS bytes, threads, open file descriptors, RssAnon bytes: the heap and stacks, without
    the mapped files such as the binary's pages) of a running process; None when it ended."""
    try:
        with open(f"/proc/{pid}/status") as f:
            st = dict(l.split(":", 1) for l in f if ":" in l)
        return (int(st["VmRSS"].split()[0]) * 1024, int(st["Threads"]), len(os.listdir(f"/proc/{pid}/fd")),
                int(st["RssAnon"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        return None


def dir_bytes(path):
    """Bytes of the regular files under `path` (what `du -b` counts for them)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # deleted meanwhile
    return total


def pctl(xs, p):
    """Nearest-rank percentile; None for no values."""
    xs = sorted(xs)
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)] if xs else None


def git_revision(root):
    git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return git("rev-parse", "--short", "HEAD") + (
        " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")
