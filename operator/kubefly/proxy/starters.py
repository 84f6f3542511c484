"""Who starts and stops a machine for autostart and autostop.

In the cluster: set the Machine's desired state through the Kubernetes API,
the only time the proxy talks to it, and off the path of every request but
the one waiting for a stopped app. Elsewhere (component tests, other
platforms): a command run as `CMD start|stop ORG MACHINE`.
"""

from __future__ import annotations

import asyncio
import shlex

from kubefly import GROUP, VERSION
from kubefly.instances import Instance


class KubeStarter:
    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self._api = client.CustomObjectsApi()

    async def _set(self, inst: Instance, state: str) -> None:
        # The kubernetes client is synchronous: keep it off the event loop.
        await asyncio.to_thread(
            self._api.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            inst.org,
            "machines",
            inst.machine_id,
            {"spec": {"state": state}},
        )

    async def start(self, inst: Instance) -> None:
        await self._set(inst, "started")

    async def stop(self, inst: Instance) -> None:
        await self._set(inst, "stopped")


class CommandStarter:
    def __init__(self, command: str, timeout: float = 30.0) -> None:
        self._argv = shlex.split(command)
        self._timeout = timeout

    async def _run(self, action: str, inst: Instance) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self._argv, action, inst.org, inst.machine_id, stdout=asyncio.subprocess.DEVNULL
        )
        try:
            async with asyncio.timeout(self._timeout):
                code = await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"{action} {inst.machine_id}: command timed out") from None
        if code != 0:
            raise RuntimeError(f"{action} {inst.machine_id}: command exited {code}")

    async def start(self, inst: Instance) -> None:
        await self._run("start", inst)

    async def stop(self, inst: Instance) -> None:
        await self._run("stop", inst)


def from_spec(spec: str):
    """`kube`, `command:<shell words>`, or `none`."""
    if spec == "none":
        return None
    if spec == "kube":
        return KubeStarter()
    if spec.startswith("command:"):
        return CommandStarter(spec.removeprefix("command:"))
    raise ValueError(f"unknown starter {spec!r}: kube, command:<cmd> or none")
