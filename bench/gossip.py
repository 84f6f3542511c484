"""Gossip benchmark: real `kubefly agent` processes on loopback.

For 20, 50 and 100 agents: propagation latency from a write on one agent
until every agent has it (p50/p99/max over writes), and bytes per second per
agent at rest and under ~100 changes/s spread over the cluster. A second pass
at the largest size adds emulated WAN latency (`--emulate-latency`: this host
has no sch_netem, so network namespaces could not add delay; the agents delay
their own sends instead: 1 ms within a region, 30 ms across, one way).

Times come from the agents themselves: each watch-stream upsert carries the
wall time at which that agent merged the row, and all agents share this
machine's clock, so the bench process's own scheduling does not skew them.

Writes bench/results/gossip.json and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from kubefly.gossip.harness import AgentCluster  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gossip.json"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


class Watchers:
    """Follows every agent's /v1/watch and records when each agent merged each instance_id."""

    def __init__(self, cluster: AgentCluster, agents=None):
        self.c = cluster
        self.agents = agents or cluster.agents
        self.seen: dict[str, dict[str, float]] = {}  # instance_id -> host -> merge time
        self.tasks: list[asyncio.Task] = []
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def start(self) -> None:
        ready = []
        for a in self.agents:
            ev = asyncio.Event()
            ready.append(ev)
            self.tasks.append(asyncio.create_task(self._follow(a, ev)))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 60)

    async def _follow(self, a, ready: asyncio.Event) -> None:
        async with self.session.get(a.api + "/v1/watch") as resp:
            async for raw in resp.content:
                line = raw.strip()
                if not line:
                    continue
                doc = json.loads(line)
                if doc["type"] == "snapshot":
                    ready.set()
                elif doc["type"] == "upsert":
                    iid = doc["instance"]["instance_id"]
                    self.seen.setdefault(iid, {}).setdefault(a.host, doc["at"])

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.session.close()


async def wait_members(c: AgentCluster, timeout: float) -> float:
    t0 = time.monotonic()
    n = len(c.agents)
    while time.monotonic() - t0 < timeout:
        docs = await asyncio.gather(*(c.get(a, "/v1/members") for a in c.agents))
        if all(sum(m["state"] == "alive" for m in d["members"]) == n - 1 for d in docs):
            return time.monotonic() - t0
        await asyncio.sleep(0.5)
    raise TimeoutError("membership did not converge")


async def propagation(c: AgentCluster, w: Watchers, writes: int, gap: float, tag: str) -> dict:
    n = len(c.agents)
    tokens = []
    for k in range(writes):
        origin = random.choice(c.agents)
        token = f"{tag}-{k}"
        c.write_machine(origin, f"{tag}-{origin.index}", instance_id=token)
        tokens.append((token, origin.host))
        await asyncio.sleep(gap)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(len(w.seen.get(t, {})) == n for t, _ in tokens):
        await asyncio.sleep(0.2)
    full, per_agent, missing = [], [], 0
    for token, origin in tokens:
        seen = w.seen.get(token, {})
        if origin not in seen or len(seen) < n:
            missing += 1
            continue
        t0 = seen[origin]
        full.append(max(seen.values()) - t0)
        per_agent.extend(v - t0 for h, v in seen.items() if h != origin)
    return {
        "writes": writes, "incomplete_writes": missing,
        "p50_s": round(pct(full, 50), 4), "p99_s": round(pct(full, 99), 4), "max_s": round(max(full), 4),
        "per_agent_p50_s": round(pct(per_agent, 50), 4), "per_agent_p99_s": round(pct(per_agent, 99), 4),
    }


def cpu_seconds(c: AgentCluster) -> float:
    """User+system CPU time of every agent process so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for a in c.agents:
        try:
            fields = Path(f"/proc/{a.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, AttributeError, IndexError):
            pass
    return total / tick


async def bytes_rate(c: AgentCluster, seconds: float) -> dict:
    async def sample():
        vals = await asyncio.gather(*(asyncio.gather(
            c.metric(a, "kubefly_gossip_bytes_total", 'direction="out"'),
            c.metric(a, "kubefly_gossip_bytes_total", 'direction="in"')) for a in c.agents))
        return sum(v[0] for v in vals), sum(v[1] for v in vals)

    o0, i0 = await sample()
    c0, t0 = cpu_seconds(c), time.monotonic()
    await asyncio.sleep(seconds)
    c1, dt = cpu_seconds(c), time.monotonic() - t0
    o1, i1 = await sample()
    n = len(c.agents)
    return {"out_Bps_per_agent": round((o1 - o0) / dt / n), "in_Bps_per_agent": round((i1 - i0) / dt / n),
            "cpu_pct_per_agent": round(100 * (c1 - c0) / dt / n, 2)}


def paced_writes(targets: list[tuple[str, int, str]], rate: float, seconds: float) -> int:
    """Runs in its own process, so the paced writes neither wait for this process's
    event loop nor for its GIL; the same file shape as AgentCluster.write_machine."""
    k = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        path, index, region = targets[k % len(targets)]
        doc = {"org": "acme", "app": "web", "machine_id": f"load-{index}", "instance_id": f"load-{k}",
               "address": "127.0.0.1", "state": "started", "region": region,
               "services": [{"internal_port": 8080, "ports": [80], "http_ports": [80]}]}
        tmp = Path(path) / f".load-{index}.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, Path(path) / f"load-{index}.json")
        k += 1
        time.sleep(max(0.0, t0 + k / rate - time.monotonic()))
    return k


async def under_load(c: AgentCluster, w: Watchers, rate: float, seconds: float) -> dict:
    """Writes spread round-robin over every agent; lag is taken for the writes whose
    origin is one of the sampled (followed) agents, from the origin to the last sample."""
    targets = [(str(a.machines), a.index, a.region) for a in c.agents]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        task = asyncio.get_running_loop().run_in_executor(pool, paced_writes, targets, rate, seconds)
        rates = await bytes_rate(c, seconds)
        written = await task
    await asyncio.sleep(3)
    host0 = w.agents[0].host
    delivered = [t for t, s in w.seen.items() if t.startswith("load-") and host0 in s]
    sampled = {a.host for a in w.agents}
    lags = []
    for t in delivered:
        s = w.seen[t]
        origin = c.agents[int(t.split("-")[1]) % len(c.agents)].host
        if origin in sampled and origin in s and len(s) == len(w.agents):
            lags.append(max(s.values()) - s[origin])
    rates.update({"lag_sampled_agents": len(w.agents), "writes_per_s": round(written / seconds, 1),
                  "changes_seen_per_s": round(len(delivered) / seconds, 1),
                  "p50_s": round(pct(lags, 50), 4) if lags else None,
                  "p99_s": round(pct(lags, 99), 4) if lags else None})
    return rates


async def run_size(n: int, writes: int, args, latency: str | None) -> dict:
    extra = ("--log-level", "WARNING") + (("--emulate-latency", latency) if latency else ())
    c = AgentCluster(n, regions=5, seeds=3, extra_args=extra)
    t0 = time.monotonic()
    try:
        await c.start(timeout=180)
        started = time.monotonic() - t0
        joined = await wait_members(c, 120)
        w = Watchers(c)
        await w.start()
        out = {"agents": n, "start_s": round(started, 1), "membership_converged_s": round(joined, 1)}
        out.update(await propagation(c, w, writes, args.gap, f"w{n}"))
        out["bytes_at_rest"] = await bytes_rate(c, args.rest_seconds)
        await w.close()
        if not args.skip_load:
            # Following every agent at 100 changes/s would make this process the bottleneck:
            # lag under load is measured on a sample (origins included by the writer's choice).
            sample = Watchers(c, c.agents[:10])
            await sample.start()
            out["bytes_under_load"] = await under_load(c, sample, args.rate, args.load_seconds)
            await sample.close()
        return out
    finally:
        await c.close()


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20,50,100")
    p.add_argument("--writes", type=int, default=60)
    p.add_argument("--gap", type=float, default=0.25, help="seconds between propagation writes")
    p.add_argument("--rest-seconds", type=float, default=10)
    p.add_argument("--rate", type=float, default=100, help="changes/s for the load phase")
    p.add_argument("--load-seconds", type=float, default=10)
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--wan", default="1,30", help="SAME_MS,CROSS_MS for the WAN pass at the largest size; '' skips")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_before": load_avg(),
                          "note": "shared machine: other engineers' builds and tests ran at the same time"},
              "propagation": {}, "propagation_wan": {}}
    for n in sizes:
        print(f"... {n} agents", flush=True)
        result["propagation"][str(n)] = await run_size(n, args.writes, args, None)
    if args.wan:
        n = max(sizes)
        print(f"... {n} agents with emulated WAN latency {args.wan} ms", flush=True)
        result["propagation_wan"][str(n)] = await run_size(n, args.writes, argparse.Namespace(**{**vars(args), "skip_load": True}), args.wan)
    result["machine"]["load_avg_after"] = load_avg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))

    print(f"\ngossip propagation (write on one agent -> every agent has it), {os.cpu_count()} CPUs, shared machine")
    print(f"{'agents':>7} {'p50 s':>8} {'p99 s':>8} {'max s':>8} {'incomplete':>10} {'rest B/s/agent (out)':>21} "
          f"{'rest CPU%/agent':>15} {'load B/s/agent (out)':>21} {'load chg/s':>10} {'load p99 s':>10}")
    for label, table in (("", result["propagation"]), ("wan ", result["propagation_wan"])):
        for n, r in table.items():
            load = r.get("bytes_under_load") or {}
            print(f"{label + n:>7} {r['p50_s']:>8} {r['p99_s']:>8} {r['max_s']:>8} {r['incomplete_writes']:>10} "
                  f"{r['bytes_at_rest']['out_Bps_per_agent']:>21} {r['bytes_at_rest']['cpu_pct_per_agent']:>15} "
                  f"{str(load.get('out_Bps_per_agent', '-')):>21} "
                  f"{str(load.get('changes_seen_per_s', '-')):>10} {str(load.get('p99_s', '-')):>10}")
    target = result["propagation"].get("100", {}).get("p99_s")
    if target is not None:
        print(f"target p99 < 0.5 s at 100 agents: {'met' if target < 0.5 else 'NOT met'} ({target} s)")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
