"""The sealing scheme: X25519 + HKDF-SHA256 + AES-256-GCM, one sealed box per value.

sealed = base64( 0x01 | key id (8) | ephemeral X25519 public key (32) | nonce (12) | AES-GCM ciphertext+tag )

Anyone with the cluster's public key can seal; only the holder of the private
key (the operator) can open. Each value gets a fresh ephemeral key, so two
seals of one value differ. The associated data binds a sealed value to its
organisation (namespace), app and key name: copied into another AppSecret
under another name, app or organisation it no longer opens. The key id (a
hash of the public key) tells "sealed for another cluster" apart from
"tampered or moved".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT = 1
KEY_ID_BYTES = 8
_PUB = 32
_NONCE = 12
_HEADER = 1 + KEY_ID_BYTES + _PUB + _NONCE
_INFO = b"kubefly.dev/sealed-value/v1"


class UnsealError(ValueError):
    """A value that cannot be opened; the message says why, never what the value is."""


def generate() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return key.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption())


def public_bytes(key: X25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


def load_private(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def load_public(text: str) -> X25519PublicKey:
    """The public key as published: base64 of the 32 raw bytes."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return X25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not a kubefly sealing public key (base64 of 32 bytes)") from exc


def encode_public(key: X25519PublicKey) -> str:
    return base64.b64encode(public_bytes(key)).decode()


def key_id(public: X25519PublicKey) -> str:
    return hashlib.sha256(public_bytes(public)).hexdigest()[: KEY_ID_BYTES * 2]


def associated_data(namespace: str, app: str, key: str) -> bytes:
    # NUL-separated: names cannot contain NUL, so no two triples encode alike.
    return b"\0".join((_INFO, namespace.encode(), app.encode(), key.encode()))


def _aead_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_INFO).derive(shared)


def seal(public: X25519PublicKey, *, namespace: str, app: str, key: str, value: str) -> str:
    ephemeral = X25519PrivateKey.generate()
    eph_pub = public_bytes(ephemeral.public_key())
    recipient = public_bytes(public)
    nonce = os.urandom(_NONCE)
    aead = AESGCM(_aead_key(ephemeral.exchange(public), eph_pub, recipient))
    ciphertext = aead.encrypt(nonce, value.encode(), associated_data(namespace, app, key))
    blob = bytes([FORMAT]) + bytes.fromhex(key_id(public)) + eph_pub + nonce + ciphertext
    return base64.b64encode(blob).decode()


def unseal(private: X25519PrivateKey, sealed: str, *, namespace: str, app: str, key: str) -> str:
    try:
        blob = base64.b64decode(sealed, validate=True)
    except binascii.Error as exc:
        raise UnsealError("not base64") from exc
    if len(blob) < _HEADER + 16 or blob[0] != FORMAT:
        raise UnsealError("not a kubefly sealed value (format 1)")
    public = private.public_key()
    if blob[1 : 1 + KEY_ID_BYTES].hex() != key_id(public):
        raise UnsealError(f"sealed for another cluster key (id {blob[1:1 + KEY_ID_BYTES].hex()}, this cluster's is {key_id(public)})")
    eph_pub = blob[1 + KEY_ID_BYTES : 1 + KEY_ID_BYTES + _PUB]
    nonce = blob[1 + KEY_ID_BYTES + _PUB : _HEADER]
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        aead = AESGCM(_aead_key(shared, eph_pub, public_bytes(public)))
        plain = aead.decrypt(nonce, blob[_HEADER:], associated_data(namespace, app, key))
    except (InvalidTag, ValueError) as exc:
        raise UnsealError(
            f"does not open for organisation {namespace}, app {app}, key {key}: sealed for another one, or altered"
        ) from exc
    try:
        return plain.decode()
    except UnicodeDecodeError as exc:
        raise UnsealError("opens, but is not UTF-8 text") from exc
