"""What the Volume, AppSecret and PostgresCluster controllers share: the API
client, status writes that never clobber a concurrent writer, condition patches,
and the wait of a per-object reconcile loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubefly import GROUP, VERSION
from kubefly.conditions import set_condition

_api: tuple[client.CoreV1Api, client.CustomObjectsApi] | None = None


def kube_api() -> tuple[client.CoreV1Api, client.CustomObjectsApi]:
    global _api
    if _api is None:
        config.load_config()
        api = client.ApiClient()
        _api = (client.CoreV1Api(api), client.CustomObjectsApi(api))
    return _api


def to_dict(obj) -> dict:
    return client.ApiClient().sanitize_for_serialization(obj)


def update_status(plural: str, namespace: str, name: str, mutate: Callable[[dict], dict | None]) -> dict | None:
    """Read, let `mutate` compute a status merge patch from the fresh object, write it if not stale."""
    custom = kube_api()[1]
    for _ in range(10):
        try:
            body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        patch = mutate(body)
        if not patch:
            return body
        try:
            return custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name,
                {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]}, "status": patch},
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
            if exc.status == 404:
                return None
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
