"""`kubefly host cordon|uncordon|drain HOST`: take a host out of placement and empty it.

    kubefly host drain ams-3 --deadline 5m

A host is a Kubernetes Node. Cordon marks it unschedulable: no new Machine or
Volume is placed there. Drain cordons it, then moves its Machines off, round by
round, as kubefly.placement.drain plans: a Machine is asked to leave with the
annotation kubefly.dev/move-from, and the operator stops it there and starts a
new instance of it on another host of its region (a Machine with a volume
migrates with it: copied while running, stopped, the delta copied). Every change is printed as
it happens; a Machine that cannot move says why in the first round. The Node's
kubefly.dev/drain annotation holds the drain's state (draining, drained,
blocked, timed-out) for anyone to read. Exit status: 0 drained, 1 not drained
by the deadline (what is left, and why, is printed; the Machines that had not
started moving are no longer asked to).
"""

from __future__ import annotations

import asyncio
import json
import time

import click

from kubefly import labels
from kubefly.conditions import now_rfc3339
from kubefly.cli.common import duration, run_api
from kubefly.controllers.kubeapi import KubeAPI, core_path, custom_path
from kubefly.placement import drain
from kubefly.placement.machines import Host, Placed

ROUND_S = 1.0


@click.group("host")
def host_group() -> None:
    """Cordon, uncordon and drain hosts (Kubernetes Nodes)."""


async def _node(api: KubeAPI, host: str) -> dict:
    node = await api.get(core_path(None, "nodes", host), missing_ok=True)
    if node is None:
        names = sorted(n["metadata"]["name"] for n in await api.list(core_path(None, "nodes")))
        raise click.ClickException(f"there is no host {host}; hosts: {', '.join(names) or 'none'}")
    return node


async def _mark(api: KubeAPI, host: str, *, unschedulable: bool, state: dict | None) -> None:
    annotation = json.dumps({**state, "updatedAt": now_rfc3339()}, separators=(",", ":")) if state else None
    await api.patch(core_path(None, "nodes", host),
                    {"spec": {"unschedulable": unschedulable}, "metadata": {"annotations": {labels.DRAIN: annotation}}})


@host_group.command("cordon")
@click.argument("host")
def cordon(host: str) -> None:
    """No new Machine or Volume is placed on HOST; what runs there stays."""
    async def work(api: KubeAPI):
        await _node(api, host)
        await _mark(api, host, unschedulable=True, state={"state": "cordoned"})
        click.echo(f"host {host} cordoned")
    run_api(work)


@host_group.command("uncordon")
@click.argument("host")
def uncordon(host: str) -> None:
    """HOST takes new Machines and Volumes again."""
    async def work(api: KubeAPI):
        await _node(api, host)
        await _mark(api, host, unschedulable=False, state=None)
        click.echo(f"host {host} uncordoned")
    run_api(work)


async def _round(api: KubeAPI, host: str) -> tuple[drain.DrainPlan, list[dict]]:
    nodes, machines, volumes, clusters = await asyncio.gather(
        api.list(core_path(None, "nodes")), api.list(custom_path(None, "machines")), api.list(custom_path(None, "volumes")),
        api.list(custom_path(None, "postgresclusters")))
    views = [drain.MachineView.of(m, _by_name(volumes), _by_name(clusters)) for m in machines]
    placed = [p for p in (Placed.of_machine(m) for m in machines) if p is not None]
    return drain.plan(host, views, [Host.of_node(n) for n in nodes], placed), machines


def _by_name(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objects}


async def _switchover(api: KubeAPI, namespace: str, cluster: str, target: str | None, host: str) -> None:
    """Ask the PostgresCluster to make `target` its primary (spec.switchoverTo, as a user would); the
    annotation says the drain asked, so the drain takes the request back once it is done (None)."""
    await api.patch(custom_path(namespace, "postgresclusters", cluster),
                    {"metadata": {"annotations": {labels.DRAIN_SWITCHOVER: host if target else None}},
                     "spec": {"switchoverTo": target}}, missing_ok=True)


async def _settle_switchovers(api: KubeAPI, host: str) -> None:
    """A switchover the drain asked for and the cluster has done leaves no request behind in its spec."""
    for c in await api.list(custom_path(None, "postgresclusters")):
        meta, spec, status = c["metadata"], c.get("spec") or {}, c.get("status") or {}
        if (meta.get("annotations") or {}).get(labels.DRAIN_SWITCHOVER) == host and \
                spec.get("switchoverTo") and status.get("primary") == spec["switchoverTo"]:
            await _switchover(api, meta["namespace"], meta["name"], None, host)


async def _set_move(api: KubeAPI, key: tuple[str, str], host: str | None) -> None:
    await api.patch(custom_path(key[0], "machines", key[1]), {"metadata": {"annotations": {labels.MOVE_FROM: host}}},
                    missing_ok=True)


@host_group.command("drain")
@click.argument("host")
@click.option("--deadline", default="5m", show_default=True, help="Give up after this long (90s, 5m, 1h).")
def drain_command(host: str, deadline: str) -> None:
    """Cordon HOST and move every Machine off it."""
    limit = duration(deadline, '--deadline')

    async def work(api: KubeAPI):
        await _node(api, host)
        started = time.monotonic()
        await _mark(api, host, unschedulable=True, state={"state": "draining"})
        click.echo(f"host {host} cordoned; draining (deadline {deadline})")
        said: dict[tuple[str, str], tuple[str, str]] = {}
        moved, marked = 0, None
        while True:
            p, machines = await _round(api, host)
            elapsed = time.monotonic() - started
            for step in p.steps:
                if said.get(step.machine) != (step.state, step.message):
                    said[step.machine] = (step.state, step.message)
                    click.echo(f"[{elapsed:6.1f}s] {step.machine[0]}/{step.machine[1]}: {step.state}: {step.message}")
                if step.state == "move":
                    await _set_move(api, step.machine, host)
                elif step.state == "switchover":
                    m = next(x for x in machines if (x["metadata"]["namespace"], x["metadata"]["name"]) == step.machine)
                    await _switchover(api, step.machine[0], m["metadata"]["labels"][drain.POSTGRES_CLUSTER_LABEL],
                                      step.switchover_to, host)
            await _settle_switchovers(api, host)
            # Moved and routable elsewhere: the request is done; it leaves no annotation behind.
            for m in machines:
                v = drain.MachineView.of(m)
                if v.moving_from == host and v.host != host and v.ready:
                    await _set_move(api, v.key, None)
                    moved += 1
                    said.pop(v.key, None)
                    click.echo(f"[{elapsed:6.1f}s] {v.namespace}/{v.name}: moved to host {v.host}, routable")
            summary = {**p.summary(), "moved": moved}
            if p.done:
                await _mark(api, host, unschedulable=True, state=summary)
                click.echo(f"host {host} drained in {elapsed:.1f}s: {moved} machine(s) moved")
                return
            if elapsed > limit:
                # A drain that gave up asks nothing more: what has not started moving stays, and does not
                # move later by itself when room appears (the host stays cordoned).
                for step in p.steps:
                    if step.state in ("move", "waiting", "blocked"):
                        await _set_move(api, step.machine, None)
                await _mark(api, host, unschedulable=True, state={**summary, "state": "timed-out"})
                left = "\n".join(f"  {ns}/{name}: {s.state}: {s.message}" for s in p.steps for ns, name in [s.machine])
                raise click.ClickException(f"host {host} not drained after {deadline}; {len(p.steps)} machine(s) left:\n{left}")
            if summary != marked:
                await _mark(api, host, unschedulable=True, state=summary)
                marked = summary
            await asyncio.sleep(ROUND_S)

    run_api(work)
