"""The operator's one Kubernetes API client: plain JSON over aiohttp on Kopf's loop.

Every controller calls the API through `kube()`. Not the official client's
API classes: they are synchronous (a thread per call) and validate every
argument and body into models; both stood out in a profile of a 1,000-machine
burst. Credentials still come from its config loader, so the operator runs
from a kubeconfig (KUBECONFIG, the kwok tier) or in-cluster (the
ServiceAccount token, refreshed by the loader's hook, and CA; the chart).
Errors raise its ApiException with the HTTP status set, as before.
"""

from __future__ import annotations

import asyncio
import json
import ssl

import aiohttp
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubefly import GROUP, VERSION

THROTTLE_RETRIES = 5  # a 429 (Retry-After) is retried in place this many times
MAX_RETRY_AFTER_S = 5.0


def custom_path(namespace: str | None, plural: str, name: str = "") -> str:
    """A kubefly custom object (or their collection); namespace None: across namespaces."""
    where = f"/namespaces/{namespace}" if namespace else ""
    return f"/apis/{GROUP}/{VERSION}{where}/{plural}" + (f"/{name}" if name else "")


def core_path(namespace: str | None, plural: str, name: str = "") -> str:
    """A built-in core/v1 object (or their collection); namespace None: cluster-scoped or across namespaces."""
    where = f"/namespaces/{namespace}" if namespace else ""
    return f"/api/v1{where}/{plural}" + (f"/{name}" if name else "")


class KubeAPI:
    def __init__(self, cfg: client.Configuration) -> None:
        self.cfg = cfg
        ctx: ssl.SSLContext | bool = False
        if cfg.verify_ssl:
            ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        elif cfg.cert_file:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        if cfg.cert_file and ctx:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        self.host = cfg.host.rstrip("/")
        # No total timeout: in a burst, requests queue for a connection far longer than any
        # one call takes; only a stalled socket is an error.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=16),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60))

    async def request(self, method: str, path: str, body: dict | None = None, *, content_type: str = "application/json",
                      params: dict | None = None, parse: bool = True, tolerate: tuple[int, ...] = ()) -> dict | None:
        """The answer as a dict (None if not parsed, or its status is in `tolerate`); other errors raise ApiException."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        # Asked per request: the in-cluster loader's hook re-reads a rotated ServiceAccount token.
        if token := self.cfg.auth_settings().get("BearerToken", {}).get("value"):
            headers["Authorization"] = token
        data = json.dumps(body, separators=(",", ":")) if body is not None else None
        extra = {"server_hostname": self.cfg.tls_server_name} if self.cfg.tls_server_name else {}
        throttled = 0
        while True:
            async with self.session.request(method, self.host + path, data=data, headers=headers, params=params,
                                            **extra) as resp:
                raw = await resp.read()
                if resp.status == 429 and throttled < THROTTLE_RETRIES:
                    throttled += 1
                    # API priority and fairness queues were full: wait as told, not the reconcile backoff.
                    await asyncio.sleep(min(float(resp.headers.get("Retry-After") or 1), MAX_RETRY_AFTER_S))
                    continue
                if resp.status in tolerate:
                    return None
                if resp.status >= 400:
                    raise ApiException(status=resp.status, reason=resp.reason, body=raw[:2000].decode(errors="replace"))
                return json.loads(raw) if raw and parse else None

    async def get(self, path: str, *, missing_ok: bool = False) -> dict | None:
        """The object; with missing_ok, None when it does not exist (404)."""
        return await self.request("GET", path, tolerate=(404,) if missing_ok else ())

    async def list(self, path: str, *, label_selector: str | None = None) -> list[dict]:
        answer = await self.request("GET", path, params={"labelSelector": label_selector} if label_selector else None)
        return answer["items"]

    async def create(self, path: str, body: dict, *, exists_ok: bool = False, parse: bool = True) -> dict | None:
        """POST to the collection `path`: the created object (if parsed); with exists_ok, None on 409."""
        return await self.request("POST", path, body, parse=parse, tolerate=(409,) if exists_ok else ())

    async def create_or_get(self, collection: str, body: dict) -> dict | None:
        """POST to `collection`, or, if it exists already (409: an earlier pass, another replica),
        the existing object; None if that one was gone again before it could be read."""
        made = await self.create(collection, body, exists_ok=True)
        return made if made is not None else await self.get(f"{collection}/{body['metadata']['name']}", missing_ok=True)

    async def patch(self, path: str, body: dict, *, missing_ok: bool = False) -> dict | None:
        # As the official client did: built-in kinds take a strategic merge patch (merge keys,
        # `$patch: delete`); custom resources have none and take a JSON merge patch.
        kind = "strategic-merge-patch" if path.startswith("/api/") else "merge-patch"
        return await self.request("PATCH", path, body, content_type=f"application/{kind}+json",
                                  tolerate=(404,) if missing_ok else ())

    async def patch_status(self, path: str, body: dict) -> dict | None:
        return await self.request("PATCH", f"{path}/status", body, content_type="application/merge-patch+json")

    async def delete(self, path: str, *, grace_period_seconds: int | None = None, missing_ok: bool = False) -> None:
        params = {"gracePeriodSeconds": str(grace_period_seconds)} if grace_period_seconds is not None else None
        await self.request("DELETE", path, params=params, parse=False, tolerate=(404,) if missing_ok else ())

    async def close(self) -> None:
        await self.session.close()


def load_config() -> client.Configuration:
    """A kubeconfig (KUBECONFIG or ~/.kube/config) if there is one, else the in-cluster ServiceAccount."""
    config.load_config()
    return client.Configuration.get_default_copy()


_kube: KubeAPI | None = None


def kube() -> KubeAPI:
    """The shared client, made on first use (on Kopf's loop: its connection pool lives there)."""
    global _kube
    if _kube is None:
        _kube = KubeAPI(load_config())
    return _kube


async def close() -> None:
    global _kube
    if _kube is not None:
        await _kube.close()
        _kube = None
