"""Per-tenant S3 identities in the bundled object store, each confined to its own prefixes.

An organisation's Postgres members archive to the store with a key of their own, which can
read, list, write and delete only under its read-write prefixes (and read and list under
its read-only ones): never another tenant's objects, nor the snapshots. The platform's admin
key (Secret kubefly-objectstore-credentials) stays the only one allowed everything.

Every identity lives in one Secret in the operator's namespace, kubefly-objectstore-identities:
- `s3.json`: SeaweedFS's identity file, the admin and every tenant, which the store's pod
  mounts (the store reloads it on SIGHUP; docker/objectstore-entrypoint.sh sends one when
  the file changes);
- `tenants.json`: each tenant's keys and prefixes, so a second grant returns the same keys,
  and the revoked tenants.

weed 4.48 merges a reloaded file into the identities it holds and never drops one that is
gone from the file: a revoked tenant therefore stays in s3.json as a tombstone, its identity
with no key and no action, which replaces the live one.

Both are rewritten together by a patch that carries the resourceVersion read: a concurrent
grant makes the API server answer 409, and the change is made again on the fresh Secret, so
grants for different tenants never lose each other.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog
from kubernetes.client.exceptions import ApiException

from kubefly.controllers.kubeapi import KubeAPI, core_path
from kubefly.labels import MANAGED_BY, MANAGED_BY_VALUE
from kubefly.volumes.snapshots import ObjectStore

log = structlog.get_logger("kubefly.objectstore.access")

IDENTITIES = "kubefly-objectstore-identities"
CONFIG_KEY, TENANTS_KEY = "s3.json", "tenants.json"
ADMIN = "kubefly"  # the admin identity's name; no tenant's identity takes it
ADMIN_ACTIONS = ("Admin", "Read", "Write", "List", "Tagging")
CONFLICT_RETRIES = 10

_TENANT = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_TENANT = 253
_MAX_IDENTITY = 63  # identity names end up in IAM-style user names and logs: kept short


class NeedsBundledStore(RuntimeError):
    """Per-tenant keys exist only in the bundled store: an external one has just the platform's key."""


class TenantConflict(RuntimeError):
    """A tenant of that name holds other read-write prefixes: two callers named different owners alike."""


@dataclass(frozen=True)
class TenantKeys:
    access_key_id: str
    secret_access_key: str


@dataclass(frozen=True)
class Tenant:
    name: str
    access_key: str
    secret_key: str
    read_write: tuple[str, ...]
    read_only: tuple[str, ...] = ()

    @property
    def keys(self) -> TenantKeys:
        return TenantKeys(self.access_key, self.secret_key)

    def record(self) -> dict:
        return {"accessKey": self.access_key, "secretKey": self.secret_key,
                "readWrite": list(self.read_write), "readOnly": list(self.read_only)}

    @classmethod
    def from_record(cls, name: str, record: dict) -> "Tenant":
        return cls(name, record["accessKey"], record["secretKey"], tuple(record.get("readWrite", ())),
                   tuple(record.get("readOnly", ())))


def check_tenant(name: str) -> str:
    if not (0 < len(name) <= _MAX_TENANT) or not _TENANT.match(name):
        raise ValueError(f"tenant {name!r}: lower-case letters, digits, '-' and '.', at most {_MAX_TENANT}")
    return name


def prefixes(paths: Iterable[str]) -> tuple[str, ...]:
    """Key prefixes inside the bucket, without surrounding slashes, sorted and distinct. A prefix
    is whole path segments: `postgres/a` grants `postgres/a/...`, never `postgres/ab/...`."""
    out = set()
    for path in paths:
        trimmed = path.strip("/")
        segments = trimmed.split("/")
        if not trimmed or any(not _SEGMENT.match(s) or s in (".", "..") for s in segments):
            raise ValueError(f"prefix {path!r}: '/'-separated segments of letters, digits, '.', '_' and '-'")
        out.add(trimmed)
    return tuple(sorted(out))


def identity_name(tenant: str) -> str:
    """The tenant's identity in s3.json: its name while short, else a cut of it with a hash of
    the whole (`pg-<namespace>-<cluster>` may reach 130 characters)."""
    if len(tenant) <= _MAX_IDENTITY and tenant != ADMIN:
        return tenant
    digest = hashlib.sha256(tenant.encode()).hexdigest()[:12]
    return f"{tenant[:_MAX_IDENTITY - 13].rstrip('-.')}-{digest}"


def actions(bucket: str, read_write: Iterable[str], read_only: Iterable[str]) -> list[str]:
    """SeaweedFS actions confined to `bucket/prefix/*`. SeaweedFS 4.48 matches an action that ends
    in `*` as a string prefix of `bucket/key` (without one, only the whole bucket): so the `/` before
    the `*`, or `postgres/ns/a` would reach `postgres/ns/ab`. Write covers PutObject, multipart
    uploads and DeleteObject; List covers ListObjects with a prefix inside (verified on 4.48)."""
    granted = [f"{verb}:{bucket}/{p}/*" for p in read_write for verb in ("Read", "Write", "List")]
    granted += [f"{verb}:{bucket}/{p}/*" for p in read_only for verb in ("Read", "List")]
    return granted


def render(admin: TenantKeys, bucket: str, tenants: Iterable[Tenant], revoked: Iterable[str] = ()) -> str:
    """SeaweedFS's identity file (s3.json): the admin, allowed everything, each tenant, and a
    tombstone (no key, no action) for each revoked tenant's identity."""
    identities = [{"name": ADMIN, "credentials": [{"accessKey": admin.access_key_id, "secretKey": admin.secret_access_key}],
                   "actions": list(ADMIN_ACTIONS)}]
    live = sorted(tenants, key=lambda t: t.name)
    for t in live:
        identities.append({"name": identity_name(t.name),
                           "credentials": [{"accessKey": t.access_key, "secretKey": t.secret_key}],
                           "actions": actions(bucket, t.read_write, t.read_only)})
    names = {t.name for t in live}
    for name in sorted(set(revoked) - names):
        identities.append({"name": identity_name(name), "credentials": [], "actions": []})
    return json.dumps({"identities": identities}, indent=1, sort_keys=True)


def new_keys() -> TenantKeys:
    # AWS-shaped: 20 upper-case characters and a 40-character secret.
    return TenantKeys("KF" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30))


@dataclass
class Registry:
    """What tenants.json holds: the live tenants by name, and the names of revoked ones."""

    tenants: dict[str, Tenant] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)

    def dumps(self) -> str:
        return json.dumps({"tenants": {name: t.record() for name, t in self.tenants.items()},
                           "revoked": sorted(self.revoked)}, sort_keys=True)

    @classmethod
    def of(cls, secret: dict) -> "Registry":
        raw = (secret.get("data") or {}).get(TENANTS_KEY)
        doc = json.loads(base64.b64decode(raw)) if raw else {}
        return cls({name: Tenant.from_record(name, r) for name, r in doc.get("tenants", {}).items()},
                   set(doc.get("revoked", ())))


def _data(admin: TenantKeys, bucket: str, registry: Registry) -> dict[str, str]:
    plain = {CONFIG_KEY: render(admin, bucket, registry.tenants.values(), registry.revoked),
             TENANTS_KEY: registry.dumps()}
    return {k: base64.b64encode(v.encode()).decode() for k, v in plain.items()}


def identities_secret(namespace: str, admin: TenantKeys, bucket: str) -> dict:
    """The Secret as first made (at startup): the admin only."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": IDENTITIES, "namespace": namespace,
                         "labels": {MANAGED_BY: MANAGED_BY_VALUE, "app.kubernetes.io/component": "objectstore"}},
            "data": _data(admin, bucket, Registry())}


def admin_keys(credentials: dict) -> TenantKeys:
    data = credentials.get("data") or {}
    return TenantKeys(*(base64.b64decode(data[k]).decode() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")))


def _bundled(store: ObjectStore | None) -> ObjectStore:
    if store is None or not store.bundled:
        where = "no object store" if store is None else f"the external store {store.endpoint}"
        raise NeedsBundledStore(f"per-tenant S3 keys need the chart's bundled object store (objectStore.bundled.enabled); "
                                f"the platform has {where}, where only the platform's own key exists")
    return store


async def _update(kube: KubeAPI, store: ObjectStore, home: str, change: Callable[[Registry], bool]) -> Registry:
    """Apply `change` (True: it changed something) to the Secret's registry and write both keys back,
    again from a fresh read whenever another writer came first."""
    path = core_path(home, "secrets", IDENTITIES)
    for attempt in range(CONFLICT_RETRIES):
        secret = await kube.get(path, missing_ok=True)
        if secret is None:
            raise RuntimeError(f"Secret {home}/{IDENTITIES} does not exist yet: the operator makes it at startup")
        registry = Registry.of(secret)
        if not change(registry):
            return registry
        credentials = await kube.get(core_path(home, "secrets", store.credentials_secret))
        body = {"metadata": {"resourceVersion": secret["metadata"]["resourceVersion"]},
                "data": _data(admin_keys(credentials), store.bucket, registry)}
        try:
            await kube.patch(path, body)
            return registry
        except ApiException as exc:
            if exc.status != 409:
                raise
            log.info("identities changed meanwhile, again", secret=f"{home}/{IDENTITIES}", attempt=attempt + 1)
            await asyncio.sleep(random.uniform(0.02, 0.1) * (attempt + 1))
    raise RuntimeError(f"Secret {home}/{IDENTITIES}: still conflicting after {CONFLICT_RETRIES} attempts")


async def grant(kube: KubeAPI, store: ObjectStore | None, home_namespace: str, tenant: str,
                read_write: list[str], read_only: list[str]) -> TenantKeys:
    """The tenant's keys (made on its first grant, the same ever after), allowed read_write and
    read_only (replacing the read-only prefixes of an earlier grant). The store honours them once it
    has reloaded s3.json (docs/objectstore.md: the kubelet's refresh of the mounted Secret, then
    seconds)."""
    store = _bundled(store)
    check_tenant(tenant)
    rw, ro = prefixes(read_write), prefixes(read_only)
    if not rw:
        raise ValueError(f"tenant {tenant}: at least one read-write prefix")
    ro = tuple(p for p in ro if p not in rw)

    def change(registry: Registry) -> bool:
        old = registry.tenants.get(tenant)
        if old is not None and old.read_write != rw:
            raise TenantConflict(f"tenant {tenant} holds {', '.join(old.read_write)}, not {', '.join(rw)}: "
                                 "two owners share one tenant name")
        if old is not None and old.read_only == ro:
            return False
        keys = old.keys if old is not None else new_keys()
        registry.tenants[tenant] = Tenant(tenant, keys.access_key_id, keys.secret_access_key, rw, ro)
        registry.revoked.discard(tenant)
        return True

    registry = await _update(kube, store, home_namespace, change)
    log.info("object store tenant granted", tenant=tenant, read_write=list(rw), read_only=list(ro))
    return registry.tenants[tenant].keys


async def revoke(kube: KubeAPI, store: ObjectStore | None, home_namespace: str, tenant: str) -> None:
    """The tenant's keys stop working once the store has reloaded s3.json; a later grant makes new ones.
    Revoking a tenant that has none is nothing to do."""
    store = _bundled(store)

    def change(registry: Registry) -> bool:
        if registry.tenants.pop(tenant, None) is None:
            return False
        registry.revoked.add(tenant)
        return True

    await _update(kube, store, home_namespace, change)
    log.info("object store tenant revoked", tenant=tenant)
