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
from kubernetes.client.exceptions import ApiException

from kubefly.labels import MANAGED_BY, MANAGED_BY_VALUE
from kubefly.secrets import sealing

NAME = "kubefly-sealing-key"
PRIVATE_KEY = "privateKey"
PUBLIC_KEY = "publicKey"
KEY_ID = "keyId"
_LABELS = {MANAGED_BY: MANAGED_BY_VALUE, "app.kubernetes.io/component": "sealing-key"}


def ensure(core: client.CoreV1Api, namespace: str) -> X25519PrivateKey:
    """The cluster's private key: read it, or create it once; then publish its public half."""
    try:
        secret = core.read_namespaced_secret(NAME, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        secret = _create(core, namespace)
    private = sealing.load_private(base64.b64decode(secret.data[PRIVATE_KEY]))
    _publish(core, namespace, private.public_key())
    return private


def _create(core: client.CoreV1Api, namespace: str):
    key = sealing.generate()
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=NAME, namespace=namespace, labels=_LABELS),
        type="Opaque",
        data={PRIVATE_KEY: base64.b64encode(sealing.private_bytes(key)).decode()},
    )
    try:
        return core.create_namespaced_secret(namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        return core.read_namespaced_secret(NAME, namespace)  # another replica was first


def _publish(core: client.CoreV1Api, namespace: str, public: X25519PublicKey) -> None:
    data = {PUBLIC_KEY: sealing.encode_public(public), KEY_ID: sealing.key_id(public)}
    try:
        current = core.read_namespaced_config_map(NAME, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=NAME, namespace=namespace, labels=_LABELS), data=data)
        try:
            core.create_namespaced_config_map(namespace, body)
            return
        except ApiException as exc2:
            if exc2.status != 409:
                raise
            current = core.read_namespaced_config_map(NAME, namespace)
    if (current.data or {}) != data:
        core.patch_namespaced_config_map(NAME, namespace, {"data": data})


def fetch_public(core: client.CoreV1Api, namespace: str) -> X25519PublicKey:
    config_map = core.read_namespaced_config_map(NAME, namespace)
    return sealing.load_public((config_map.data or {})[PUBLIC_KEY])
