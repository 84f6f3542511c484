"""`make bench-proxy`: kubefly's proxy against nginx (least_conn) over the same backends.

1. throughput (wrk, keep-alive, small bodies) and the latency each proxy adds
   over direct requests at a moderate fixed rate;
2. overload: 4 instances with hard limit 8 and 20 ms service time (each app
   has 8 workers, as a thread-pool server would), offered 1.5x their capacity
   for 20 s by an open-loop generator (latency counted from the scheduled
   send time, so a queue shows up in the figures).

Everything runs on 127.0.0.1: backends are kubefly's test app, the kubefly
proxy runs standalone from a static replica file (the gossip layer is not
what is measured here), nginx from Debian with one worker like the proxy's
one process. Writes bench/results/proxy.json.

`python bench/proxy.py loadgen ...` is the load generator itself (run in its
own process so it does not share a CPU with what it measures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from kubefly.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RESULTS = ROOT / "bench" / "results" / "proxy.json"
HOST = "web.bench.test"


# ---------------------------------------------------------------- load generator
class _Client(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, gen: "OpenLoop"):
        import httptools

        self.gen = gen
        self.parser = httptools.HttpResponseParser(self)
        self.transport = None
        self.current: float | None = None  # scheduled time of the request in flight
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except Exception:
            self.transport.close()

    def on_message_complete(self):
        scheduled, self.current = self.current, None
        keep = self.parser.should_keep_alive()
        self.gen.answered(scheduled, self.parser.get_status_code())
        if keep and not self.closed:
            self.gen.idle(self)
        else:
            self.closed = True
            self.transport.close()

    def connection_lost(self, exc):
        self.closed = True
        if self.current is not None:
            scheduled, self.current = self.current, None
            self.gen.failed(scheduled)
        self.gen.lost(self)

    def send(self, scheduled: float, request: bytes):
        self.current = scheduled
        self.transport.write(request)


class OpenLoop:
    def __init__(self, targets, host, rate, duration, max_conns, timeout, path="/"):
        self.targets = targets
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kubefly-bench\r\n\r\n".encode()
        self.rate, self.duration, self.max_conns, self.timeout = rate, duration, max_conns, timeout
        self.idle_conns: dict[int, list[_Client]] = {i: [] for i in range(len(targets))}
        self.conns = 0
        self.pending: deque[float] = deque()
        self.latencies: list[float] = []
        self.ok_latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.unanswered = 0
        self.sent = 0
        self.outstanding: dict[_Client, None] = {}
        self.rr = 0

    def answered(self, scheduled, status):
        now = time.monotonic()
        if now - scheduled > self.timeout:
            self.unanswered += 1  # too late: the client would have given up
            return
        self.latencies.append(now - scheduled)
        if 200 <= status < 300:
            self.ok_latencies.append(now - scheduled)
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def failed(self, scheduled):
        self.unanswered += 1

    def idle(self, conn):
        if self.pending:
            conn.send(self.pending.popleft(), self.request)
        else:
            self.idle_conns[conn.target].append(conn)

    def lost(self, conn):
        self.conns -= 1
        idle = self.idle_conns[conn.target]
        if conn in idle:
            idle.remove(conn)

    async def _open(self, scheduled):
        loop = asyncio.get_running_loop()
        target = self.rr % len(self.targets)
        self.rr += 1
        self.conns += 1
        try:
            _, conn = await loop.create_connection(lambda: _Client(self), *self.targets[target])
        except OSError:
            self.conns -= 1
            self.failed(scheduled)
            return
        conn.target = target
        conn.send(scheduled, self.request)

    def issue(self, scheduled):
        self.sent += 1
        target = self.rr % len(self.targets)
        idle = self.idle_conns[target]
        if idle:
            self.rr += 1
            idle.pop().send(scheduled, self.request)
        elif self.conns < self.max_conns:
            asyncio.get_running_loop().create_task(self._open(scheduled))
        else:
            self.pending.append(scheduled)

    async def prewarm(self, n):
        """Open keep-alive connections before measuring, as a client's pool would have:
        a burst of new connections mid-run measures SYN retransmits, not the proxy."""
        loop = asyncio.get_running_loop()
        for i in range(n):
            target = i % len(self.targets)
            try:
                _, conn = await loop.create_connection(lambda: _Client(self), *self.targets[target])
            except OSError:
                continue
            conn.target = target
            self.conns += 1
            self.idle_conns[target].append(conn)

    async def run(self):
        await self.prewarm(min(self.max_conns, 256))
        start = time.monotonic() + 0.05
        n = int(self.rate * self.duration)
        i = 0
        while i < n:
            now = time.monotonic()
            while i < n and start + i / self.rate <= now:
                self.issue(start + i / self.rate)
                i += 1
            await asyncio.sleep(0.001)
        # Let the last requests finish (or time out), then count what never came back.
        end = time.monotonic() + self.timeout
        while time.monotonic() < end and len(self.latencies) + self.unanswered < self.sent:
            await asyncio.sleep(0.05)
        self.unanswered = self.sent - len(self.latencies)
        return self.summary()

    def summary(self):
        def pct(values, p):
            if not values:
                return None
            values = sorted(values)
            return round(values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000, 2)

        return {
            "rate": self.rate,
            "duration_s": self.duration,
            "sent": self.sent,
            "answered": len(self.latencies),
            "unanswered": self.unanswered,
            "ok": len(self.ok_latencies),
            "errors": len(self.latencies) - len(self.ok_latencies),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p50_ms": pct(self.latencies, 50),
            "p90_ms": pct(self.latencies, 90),
            "p99_ms": pct(self.latencies, 99),
            "p50_ok_ms": pct(self.ok_latencies, 50),
            "p99_ok_ms": pct(self.ok_latencies, 99),
        }


def loadgen_main(argv):
    import uvloop

    ap = argparse.ArgumentParser()
    ap.add_argument("--target", action="append", required=True, help="host:port (repeat: round robin)")
    ap.add_argument("--host", default=HOST)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--max-conns", type=int, default=2000)
    ap.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args(argv)
    targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in a.target]
    gen = OpenLoop(targets, a.host, a.rate, a.duration, a.max_conns, a.timeout)
    print(json.dumps(uvloop.run(gen.run())))


# ---------------------------------------------------------------- orchestration


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Procs:
    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, argv, **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.remove(p)

    def stop_all(self):
        for p in list(self.procs):
            self.stop(p)


def backends(procs, ports, workers, service_ms):
    out = []
    for i, port in enumerate(ports):
        out.append(procs.start([PY, "-m", "kubefly.proxy.testapp", "--host", "127.0.0.1", "--port", str(port),
                                "--machine-id", f"m{i}", "--workers", str(workers), "--service-ms", str(service_ms)]))
    for port in ports:
        wait_port(port)
    return out


def replica_file(path: Path, ports, soft, hard):
    rows = [
        {"org": "bench", "app": "web", "machine_id": f"m{i}", "instance_id": f"m{i}-1", "region": "local",
         "host": "local", "address": "127.0.0.1", "state": "started", "check_status": "passing",
         "services": [{"internal_port": p, "ports": [80], "http_ports": [80], "concurrency_type": "requests",
                       "soft_limit": soft, "hard_limit": hard}]}
        for i, p in enumerate(ports)
    ]
    path.write_text(json.dumps(rows))


def nginx_conf(tmp: Path, port: int, ports) -> Path:
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in ports)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
error_log {tmp}/nginx-error.log warn;
pid {tmp}/nginx.pid;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  upstream app {{
    least_conn;
{servers}
    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      # The headers kubefly's edge adds, so both proxies do the same work per request.
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header Forwarded "for=\\"$remote_addr\\";proto=$scheme;host=\\"$host\\"";
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Forwarded-Port $server_port;
      proxy_set_header Fly-Client-IP $remote_addr;
      proxy_set_header Fly-Forwarded-Port $server_port;
      proxy_set_header Fly-Region local;
      proxy_set_header Fly-Request-Id $request_id;
      add_header Fly-Request-Id $request_id;
    }}
  }}
}}
""")
    return conf


def wrk(port, seconds, conns=32):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-H", f"Host: {HOST}", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "non_2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(1) if errors else ""}


def loadgen(targets, rate, duration, timeout=10.0):
    argv = [PY, __file__, "loadgen", "--rate", str(rate), "--duration", str(duration), "--timeout", str(timeout)]
    for port in targets:
        argv += ["--target", f"127.0.0.1:{port}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main():
    if not shutil.which("wrk"):
        sys.exit("bench-proxy needs wrk (Debian package wrk)")
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        sys.exit("bench-proxy needs nginx (Debian package nginx-light)")
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    tmp = Path(tempfile.mkdtemp(prefix="kubefly-bench-proxy-"))
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir()
    procs = Procs()
    results: dict = {"machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}}
    ports = [free_port() for _ in range(4)]
    kf_port, hop_port, metrics_port, ng_port = free_port(), free_port(), free_port(), free_port()
    replica = tmp / "replica.json"
    try:
        # ---- 1. throughput and added latency (fast backends, no limits reached)
        be = backends(procs, ports, workers=0, service_ms=0)
        replica_file(replica, ports, soft=1000, hard=None)
        kf = procs.start([str(Path(PY).parent / "kubefly"), "proxy", "--listen", f"127.0.0.1:{kf_port}",
                          "--hop-listen", f"127.0.0.1:{hop_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
                          "--static", str(replica), "--self-host", "local", "--self-region", "local",
                          "--domain", "bench.test", "--starter", "none", "--log-level", "WARNING"],
                         stderr=open(tmp / "kubefly.log", "w"))
        procs.start([nginx_bin, "-p", str(tmp), "-c", str(nginx_conf(tmp, ng_port, ports)), "-g", "daemon off;"])
        wait_port(kf_port)
        wait_port(ng_port)
        wrk(kf_port, 2)
        wrk(ng_port, 2)  # warm-up: pools, caches
        # Alternate short runs: on a shared machine the background load drifts, and
        # it should not favour whichever ran first. The ratio is the median of the
        # ratios of adjacent pairs (each pair saw about the same background load).
        runs: dict[str, list] = {"nginx": [], "kubefly": []}
        pairs = []
        for _ in range(5):
            runs["nginx"].append(wrk(ng_port, 4))
            runs["kubefly"].append(wrk(kf_port, 4))
            pairs.append(runs["kubefly"][-1]["rps"] / runs["nginx"][-1]["rps"])
        tp = {name: {"rps": sorted(r["rps"] for r in rs)[len(rs) // 2], "runs": rs} for name, rs in runs.items()}
        tp["loadavg_after"] = os.getloadavg()
        results["throughput"] = tp
        results["throughput_pair_ratios"] = [round(r, 3) for r in pairs]
        results["throughput_ratio"] = round(sorted(pairs)[len(pairs) // 2], 3)
        print(f"throughput: kubefly {tp['kubefly']['rps']:.0f} req/s, nginx {tp['nginx']['rps']:.0f} req/s (medians), "
              f"ratio {results['throughput_ratio']} (median of pairs {results['throughput_pair_ratios']}), "
              f"load {os.getloadavg()[0]:.1f}", flush=True)

        moderate = 1000
        lat = {
            "direct": loadgen(ports, moderate, 8),
            "nginx": loadgen([ng_port], moderate, 8),
            "kubefly": loadgen([kf_port], moderate, 8),
        }
        d = lat["direct"]
        added = {
            name: {"p50_ms": round(lat[name]["p50_ms"] - d["p50_ms"], 3), "p99_ms": round(lat[name]["p99_ms"] - d["p99_ms"], 3)}
            for name in ("nginx", "kubefly")
        }
        results["moderate_load"] = {"rate": moderate, "runs": lat, "added_over_direct": added}
        print(f"added latency at {moderate} req/s: kubefly p50 +{added['kubefly']['p50_ms']} ms p99 +{added['kubefly']['p99_ms']} ms; "
              f"nginx p50 +{added['nginx']['p50_ms']} ms p99 +{added['nginx']['p99_ms']} ms", flush=True)

        # ---- 2. overload: 4 x (8 workers, 20 ms) = 1600 req/s capacity, offered 2400 req/s
        for p in be:
            procs.stop(p)
        be = backends(procs, ports, workers=8, service_ms=20)
        replica_file(replica, ports, soft=6, hard=8)
        kf.send_signal(signal.SIGHUP)  # the proxy re-reads its replica file without restarting
        time.sleep(0.5)
        capacity = 4 * 8 / 0.020
        offered = 1.5 * capacity
        over = {}
        for name, port in (("nginx", ng_port), ("kubefly", kf_port)):
            over[name] = loadgen([port], offered, 20)
            print(f"overload {name}: p50 {over[name]['p50_ms']} ms p99 {over[name]['p99_ms']} ms, "
                  f"ok {over[name]['ok']}, errors {over[name]['errors']}, unanswered {over[name]['unanswered']}", flush=True)
            # Let backend queues drain before the next run.
            for p in be:
                procs.stop(p)
            be = backends(procs, ports, workers=8, service_ms=20)
        results["overload"] = {"capacity_rps": capacity, "offered_rps": offered, "runs": over,
                               "loadavg_after": os.getloadavg()}
        results["overload_p99_ratio"] = round(over["kubefly"]["p99_ms"] / over["nginx"]["p99_ms"], 4)
        results["overload_unanswered"] = over["kubefly"]["unanswered"]
        results["nginx_config"] = ("1 worker process (kubefly: 1 process), upstream least_conn, keepalive 256, "
                                   "no max_conns, the same forwarding headers as kubefly's edge")
        results["machine"]["loadavg_at_end"] = os.getloadavg()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2))
        print(json.dumps({k: results[k] for k in ("throughput_ratio", "overload_p99_ratio", "overload_unanswered")}))
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "loadgen":
        loadgen_main(sys.argv[2:])
    else:
        main()
