"""What the Volume, AppSecret and PostgresCluster controllers share: status
writes that never clobber a concurrent writer, condition patches, and the wait
of a per-object reconcile loop. The API client is controllers/kubeapi.py."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

import kopf
from kubernetes.client.exceptions import ApiException

from kubefly import platform
from kubefly.conditions import set_condition
from kubefly.controllers.kubeapi import custom_path, kube


async def update_status(plural: str, namespace: str, name: str,
                        mutate: Callable[[dict], dict | None | Awaitable[dict | None]]) -> dict | None:
    """Read, let `mutate` compute a status merge patch from the fresh object, write it if not stale.

    `mutate` may be a coroutine function, for a verdict that needs another read after this one."""
    k, path = kube(), custom_path(namespace, plural, name)
    for _ in range(10):
        body = await k.get(path, missing_ok=True)
        if body is None:
            return None
        patch = mutate(body)
        if inspect.isawaitable(patch):
            patch = await patch
        if not patch:
            return body
        try:
            return await k.patch_status(path, {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
                                               "status": patch})
        except ApiException as exc:
            if exc.status == 404:
                return None
            if exc.status != 409:
                raise
    raise kopf.TemporaryError(f"{plural} {namespace}/{name}: status kept changing under us", delay=1)


def condition_patch(body: dict, updates: list[tuple[str, bool, str, str]], extra: dict | None = None) -> dict | None:
    """The status merge patch that sets `updates` (type, ok, reason, message) and `extra` fields; None if nothing changes."""
    status = body.get("status") or {}
    generation = body["metadata"].get("generation")
    conditions = status.get("conditions") or []
    for type_, ok, reason, message in updates:
        conditions = set_condition(conditions, type_, ok, reason, message, generation)
    patch = {k: v for k, v in (extra or {}).items() if status.get(k) != v}
    if _essence(conditions) != _essence(status.get("conditions") or []):
        patch["conditions"] = conditions
    return patch or None


def home_namespace(memo: kopf.Memo) -> str:
    """The operator's own namespace, where its one-shot pods and platform Secrets live."""
    return getattr(memo, "home_namespace", None) or platform.home_namespace()


def _essence(conditions: list[dict]) -> list[tuple]:
    return sorted((c["type"], c["status"], c["reason"], c["message"]) for c in conditions)


async def wait_woken(waker: asyncio.Event, stopped: asyncio.Event, timeout: float) -> None:
    """Sleep until the object's loop is woken (a change to react to), stopped, or `timeout` passes."""
    waits = [asyncio.ensure_future(waker.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
