"""What the CLI's API commands share: running one against the cluster, reading a duration."""

from __future__ import annotations

import asyncio
import re

import click
from kubernetes.client.exceptions import ApiException

from kubefly.controllers.kubeapi import KubeAPI, load_config

DURATION = re.compile(r"^(\d+)(s|m|h)?$")


def duration(value: str, option: str) -> float:
    match = DURATION.match(value.strip())
    if not match:
        raise click.BadParameter(f"{value!r} is not a duration: use 90, 90s, 5m or 1h", param_hint=option)
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600, None: 1}[match[2]]


def run_api(work) -> None:
    """Run `work(api)` with a client of the current kubeconfig; an API refusal is a clear CLI error."""
    async def main():
        api = KubeAPI(load_config())
        try:
            return await work(api)
        except ApiException as exc:
            raise click.ClickException(f"the API server refused: {exc.status} {exc.reason}: {(exc.body or '')[:300]}")
        finally:
            await api.close()
    asyncio.run(main())
