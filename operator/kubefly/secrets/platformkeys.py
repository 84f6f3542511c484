"""Secrets the platform makes for itself once, in the operator's own namespace.

- `kubefly-hop-token` (key `token`): what proves a hop to a host's proxy came
  from a kubefly edge; the chart mounts it into every proxy and agent.
- `kubefly-snapshot-key` (key `password`): the key every Volume's restic
  repository is encrypted with; only the operator's snapshot pods read it.
- `kubefly-objectstore-credentials` (keys AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY): the bundled object store's admin key, for the
  snapshot pods; the store reads it, with the tenants' keys, from
  kubefly-objectstore-identities (kubefly.objectstore.access), which is
  the one of these that changes later (on each grant).
- `kubefly-objectstore-tls` (keys ca.crt, tls.crt, tls.key): the bundled
  store's HTTPS certificate for its Service's names (kubefly.objectstore.tls).

The first operator replica to start creates each and never changes it; the
pods that mount one wait for it to exist. Made at runtime rather than by the
chart, so `helm template` and GitOps tools that render the chart again keep
the same values.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime

from kubefly.controllers.kubeapi import KubeAPI, core_path
from kubefly.labels import MANAGED_BY, MANAGED_BY_VALUE
from kubefly.objectstore import tls as objectstore_tls

HOP_TOKEN, HOP_TOKEN_KEY = "kubefly-hop-token", "token"
SNAPSHOT_KEY = "kubefly-snapshot-key"
OBJECT_STORE_CREDENTIALS = "kubefly-objectstore-credentials"
OBJECT_STORE_TLS = "kubefly-objectstore-tls"


def _secret(namespace: str, name: str, component: str, data: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {MANAGED_BY: MANAGED_BY_VALUE, "app.kubernetes.io/component": component}},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def hop_token(namespace: str) -> dict:
    return _secret(namespace, HOP_TOKEN, "hop-token", {HOP_TOKEN_KEY: secrets.token_urlsafe(32)})


def snapshot_key(namespace: str) -> dict:
    return _secret(namespace, SNAPSHOT_KEY, "snapshot-key", {"password": secrets.token_urlsafe(32)})


def object_store_credentials(namespace: str) -> dict:
    access, secret = "kubefly" + secrets.token_hex(6), secrets.token_urlsafe(32)
    return _secret(namespace, OBJECT_STORE_CREDENTIALS, "objectstore",
                   {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret})


def object_store_tls(namespace: str, service: str, now: datetime) -> dict:
    return _secret(namespace, OBJECT_STORE_TLS, "objectstore", objectstore_tls.secret_data(service, namespace, now))


async def ensure(kube: KubeAPI, secret: dict) -> bool:
    """Create the Secret unless it exists (another replica's, or an earlier run's, is kept); True if made here."""
    meta = secret["metadata"]
    if await kube.get(core_path(meta["namespace"], "secrets", meta["name"]), missing_ok=True) is not None:
        return False
    made = await kube.create(core_path(meta["namespace"], "secrets"), secret, exists_ok=True)
    return made is not None
