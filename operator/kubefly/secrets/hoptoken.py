"""The platform's hop token: what proves a hop to a host's proxy came from a kubefly edge.

It lives in the Secret `kubefly-hop-token` (key `token`) in the operator's own
namespace. The first operator replica to start creates it and never changes it;
the chart mounts it into every proxy pod, which waits for it to exist. Made at
runtime rather than by the chart, so `helm template` and GitOps tools that
render the chart again keep the same token.
"""

from __future__ import annotations

import base64
import secrets

from kubefly.controllers.kubeapi import KubeAPI, core_path
from kubefly.labels import MANAGED_BY, MANAGED_BY_VALUE

NAME = "kubefly-hop-token"
KEY = "token"
_LABELS = {MANAGED_BY: MANAGED_BY_VALUE, "app.kubernetes.io/component": "hop-token"}


def new_secret(namespace: str) -> dict:
    token = secrets.token_urlsafe(32)
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": NAME, "namespace": namespace, "labels": _LABELS},
            "data": {KEY: base64.b64encode(token.encode()).decode()}}


async def ensure(kube: KubeAPI, namespace: str) -> bool:
    """Create the token unless it exists (another replica's, or an earlier run's, is kept); True if made here."""
    if await kube.get(core_path(namespace, "secrets", NAME), missing_ok=True) is not None:
        return False
    made = await kube.create(core_path(namespace, "secrets"), new_secret(namespace), exists_ok=True)
    return made is not None
