"""The cluster's sealing key pair, kept in the operator's own namespace.

The private key lives in the Secret `kubefly-sealing-key` (only the operator's
ServiceAccount reads Secrets there); the public key is published in the
ConfigMap of the same name, where `kubefly secrets seal` fetches it. The first
operator to start creates the pair; a replica that loses the creation race
reads the winner's, so every replica opens the same values.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from kubernetes import client

from kubefly.controllers.kubeapi import KubeAPI, core_path
from kubefly.labels import MANAGED_BY, MANAGED_BY_VALUE
from kubefly.secrets import sealing

NAME = "kubefly-sealing-key"
PRIVATE_KEY = "privateKey"
PUBLIC_KEY = "publicKey"
KEY_ID = "keyId"
_LABELS = {MANAGED_BY: MANAGED_BY_VALUE, "app.kubernetes.io/component": "sealing-key"}


async def ensure(kube: KubeAPI, namespace: str) -> X25519PrivateKey:
    """The operator's side: the cluster's private key, read or created once; then its public half published."""
    secret = await kube.get(core_path(namespace, "secrets", NAME), missing_ok=True)
    if secret is None:
        secret = await _create(kube, namespace)
    private = sealing.load_private(base64.b64decode(secret["data"][PRIVATE_KEY]))
    await _publish(kube, namespace, private.public_key())
    return private


async def _create(kube: KubeAPI, namespace: str) -> dict:
    key = sealing.generate()
    body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": NAME, "namespace": namespace, "labels": _LABELS},
            "data": {PRIVATE_KEY: base64.b64encode(sealing.private_bytes(key)).decode()}}
    # If another replica was first, its key is the cluster's.
    return await kube.create_or_get(core_path(namespace, "secrets"), body)


async def _publish(kube: KubeAPI, namespace: str, public: X25519PublicKey) -> None:
    data = {PUBLIC_KEY: sealing.encode_public(public), KEY_ID: sealing.key_id(public)}
    path = core_path(namespace, "configmaps", NAME)
    body = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": NAME, "namespace": namespace, "labels": _LABELS}, "data": data}
    current = await kube.get(path, missing_ok=True) or await kube.create_or_get(core_path(namespace, "configmaps"), body)
    if (current.get("data") or {}) != data:
        await kube.patch(path, {"data": data})


def fetch_public(core: client.CoreV1Api, namespace: str) -> X25519PublicKey:
    config_map = core.read_namespaced_config_map(NAME, namespace)
    return sealing.load_public((config_map.data or {})[PUBLIC_KEY])
