"""Digests of secret values: enough to tell that a value changed, useless to guess it.

A plain sha256 of a short password is a dictionary lookup away from the
password, and status is readable by anyone who can read the AppSecret. So each
value's digest is an HMAC-SHA256 under a key derived from the cluster's
private key, over (organisation, app, key, value), shown as 16 hex characters.
The organisation is bound in so that equal digests in two organisations never
tell either that they hold the same value.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LENGTH = 16


def digest_key(private_raw: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"kubefly.dev/secret-digest/v1").derive(private_raw)


def value_digest(key: bytes, *, org: str, app: str, name: str, value: str) -> str:
    # NUL cannot occur in a namespace, app or key name, so the fields cannot run into each other.
    message = b"\0".join((org.encode(), app.encode(), name.encode(), value.encode()))
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:LENGTH]


def set_digest(key_digests: Mapping[str, str]) -> str:
    """The digest of a whole AppSecret: its keys and their value digests."""
    lines = "".join(f"{k}={key_digests[k]}\n" for k in sorted(key_digests))
    return hashlib.sha256(lines.encode()).hexdigest()[:LENGTH]


def combined_digest(appsecrets: Iterable[tuple[str, str]]) -> str:
    """What a machine's pod carries in `kubefly.dev/secrets-digest` (the contract with Machine).

    `appsecrets` is (AppSecret name, its status.digest) for the AppSecrets the
    machine gets: their digests joined by commas in name order.
    """
    return ",".join(digest for _, digest in sorted(appsecrets))
