"""`kubefly machine move NAME`: move one Machine (and its volume) to another host of its region.

    kubefly machine move db-1 -n acme --timeout 5m

The Machine is asked to leave its host with the annotation kubefly.dev/move-from,
as a drain asks each of a host's Machines. A Machine without a volume stops
there and starts anew on another host; one with a volume migrates with it
(kubefly.volumes.migration: copied while it runs, stopped, the delta copied,
started on the new host under the same name). Each phase is printed as it
happens; the command returns once the Machine is routable on its new host and
removes the annotation. Exit status 1 if it did not get there in time (the
request stays, and the Machine's and Volume's conditions say why).
"""

from __future__ import annotations

import asyncio
import time

import click

from kubefly import labels
from kubefly.cli.common import duration, run_api
from kubefly.conditions import get_condition
from kubefly.controllers.kubeapi import KubeAPI, custom_path
from kubefly.placement.drain import POSTGRES_CLUSTER_LABEL
from kubefly.volumes.migration import CONDITION as MIGRATED
from kubefly.volumes.migration import Migration

POLL_S = 0.5


@click.group("machine")
def machine_group() -> None:
    """Act on one Machine."""


def _progress(machine: dict, volume: dict | None) -> str:
    status = machine.get("status") or {}
    ready = get_condition(status.get("conditions"), "Ready") or {}
    said = f"machine {status.get('state')} on host {status.get('host')}: {ready.get('message', '')}"
    if volume is not None:
        vstatus = volume.get("status") or {}
        m = Migration.of(vstatus)
        cond = get_condition(vstatus.get("conditions"), MIGRATED) or {}
        said += f"; volume {volume['metadata']['name']}: " + (m.describe() if m else cond.get("message", "waiting"))
    return said


@machine_group.command("move")
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True, help="The Machine's namespace (organisation).")
@click.option("--timeout", default="5m", show_default=True, help="Give up waiting after this long (90s, 5m, 1h).")
def move_command(name: str, namespace: str, timeout: str) -> None:
    """Move Machine NAME (with its volume, if it mounts one) to another host of its region."""
    limit = duration(timeout, "--timeout")

    async def work(api: KubeAPI):
        path = custom_path(namespace, "machines", name)
        machine = await api.get(path, missing_ok=True)
        if machine is None:
            raise click.ClickException(f"there is no Machine {name} in namespace {namespace}")
        leave = (machine.get("status") or {}).get("host")
        if not leave:
            raise click.ClickException(f"Machine {name} is not placed on a host yet: nothing to move")
        cluster = (machine["metadata"].get("labels") or {}).get(POSTGRES_CLUSTER_LABEL)
        if cluster:
            pgc = await api.get(custom_path(namespace, "postgresclusters", cluster), missing_ok=True)
            if ((pgc or {}).get("status") or {}).get("primary") == name:
                raise click.ClickException(
                    f"{name} is the primary of PostgresCluster {cluster}: stopping it would be a failover. Hand over "
                    f"first (spec.switchoverTo: <a standby>), then move it; `kubefly host drain` does both")
        mounts = (machine.get("spec") or {}).get("mounts") or []
        volume_path = custom_path(namespace, "volumes", mounts[0]["volume"]) if mounts else None
        await api.patch(path, {"metadata": {"annotations": {labels.MOVE_FROM: leave}}})
        click.echo(f"moving {namespace}/{name} off host {leave}" + (f" with volume {mounts[0]['volume']}" if mounts else ""))
        started, said = time.monotonic(), None
        while True:
            machine = await api.get(path, missing_ok=True)
            if machine is None:
                raise click.ClickException(f"Machine {name} was deleted")
            volume = await api.get(volume_path, missing_ok=True) if volume_path else None
            elapsed = time.monotonic() - started
            line = _progress(machine, volume)
            if line != said:
                click.echo(f"[{elapsed:6.1f}s] {line}")
                said = line
            status = machine.get("status") or {}
            ready = (get_condition(status.get("conditions"), "Ready") or {}).get("status") == "True"
            if status.get("host") not in (None, leave) and ready:
                await api.patch(path, {"metadata": {"annotations": {labels.MOVE_FROM: None}}})
                click.echo(f"{namespace}/{name} moved from host {leave} to host {status['host']} in {elapsed:.1f}s "
                           f"(instance {status.get('instanceId')})")
                return
            if elapsed > limit:
                raise click.ClickException(f"{namespace}/{name} is not routable on another host after {timeout}: {line}")
            await asyncio.sleep(POLL_S)

    run_api(work)
