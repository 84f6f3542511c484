"""Bytes on the wire: authenticated datagrams, signed records, sync frames.

Every UDP datagram is `b"KF1" + mac16 + json`, where mac16 is HMAC-SHA256
(truncated to 16 bytes) of the JSON with a key derived from the cluster key.
Every row travels as a *record* signed by its origin, `[body, mac]`, where
body is the JSON text `{"o": origin, "h": hlc, "k": [org, machine_id],
"r": row-or-null}`; relays and anti-entropy forward records verbatim, so a
receiver can always check that the host that signed a row is the row's host.
TCP sync frames are `len32 + mac16 + json`.

Keys are derived per purpose so that one kind of message can never be
replayed as another.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"KF1"
MAC_LEN = 16
MAX_DATAGRAM = 8192  # fits loopback and pod networks (IP fragments above the MTU)
MAX_FRAME = 16 * 1024 * 1024
# The first frame a sync server reads (the caller's members and digest: ~100 bytes a host) is
# bounded far below MAX_FRAME: a caller not yet authenticated makes us buffer at most this.
HELLO_FRAME = 1024 * 1024
# Datagrams and frames older or newer than this are refused (replay window).
MAX_SKEW_S = 30.0


class WireError(ValueError):
    """A message that fails authentication or parsing; `reason` labels metrics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Keys:
    dgram: bytes
    record: bytes
    frame: bytes

    @classmethod
    def from_secret(cls, secret: bytes) -> "Keys":
        secret = secret.strip()
        if len(secret) < 16:
            raise ValueError("the cluster key must be at least 16 bytes")

        def derive(purpose: bytes) -> bytes:
            return hmac.digest(secret, b"kubefly-gossip/" + purpose, "sha256")

        return cls(derive(b"dgram"), derive(b"record"), derive(b"frame"))

    @classmethod
    def load(cls, path: str | None = None, env: str = "KUBEFLY_GOSSIP_KEY") -> "Keys":
        """From a file (a mounted Secret) or, failing that, an environment variable."""
        if path:
            return cls.from_secret(Path(path).read_bytes())
        value = os.environ.get(env)
        if not value:
            raise ValueError(f"no cluster key: pass --key-file or set {env}")
        return cls.from_secret(value.encode())


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")[:MAC_LEN]


# -- datagrams --------------------------------------------------------------
def encode_dgram(keys: Keys, msg: dict) -> bytes:
    msg["ts"] = round(time.time(), 3)
    body = json.dumps(msg, separators=(",", ":")).encode()
    return MAGIC + _mac(keys.dgram, body) + body


def decode_dgram(keys: Keys, data: bytes, now: float | None = None) -> dict:
    if len(data) < len(MAGIC) + MAC_LEN + 2 or not data.startswith(MAGIC):
        raise WireError("malformed", "bad header")
    mac, body = data[3:3 + MAC_LEN], data[3 + MAC_LEN:]
    if not hmac.compare_digest(mac, _mac(keys.dgram, body)):
        raise WireError("bad_mac")
    try:
        msg = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: a deeply nested document
        raise WireError("malformed", "json") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("f"), str) or not isinstance(msg.get("t"), str):
        raise WireError("malformed", "fields")
    ts = msg.get("ts")
    if not isinstance(ts, (int, float)) or abs((now or time.time()) - ts) > MAX_SKEW_S:
        raise WireError("stale", "timestamp outside the replay window")
    return msg


# -- records ----------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    origin: str
    hlc: int
    key: tuple[str, str]
    row: dict | None  # None: a tombstone
    body: str  # the signed text, forwarded verbatim
    mac: str

    @property
    def wire(self) -> list[str]:
        return [self.body, self.mac]


def sign_record(keys: Keys, origin: str, hlc: int, key: tuple[str, str], row: dict | None) -> Record:
    body = json.dumps({"o": origin, "h": hlc, "k": list(key), "r": row}, separators=(",", ":"))
    mac = base64.b64encode(_mac(keys.record, body.encode())).decode()
    return Record(origin, hlc, key, row, body, mac)


def verify_record(keys: Keys, wire: object, parsed: dict | None = None) -> Record:
    """Authenticate and parse one record; raise WireError on any defect.
    `parsed`: the body already decoded by the caller (the MAC still covers the text)."""
    if not (isinstance(wire, list) and len(wire) == 2 and all(isinstance(x, str) for x in wire)):
        raise WireError("malformed", "record shape")
    body, mac = wire
    try:
        good = hmac.compare_digest(base64.b64decode(mac, validate=True), _mac(keys.record, body.encode()))
    except ValueError:
        good = False
    if not good:
        raise WireError("bad_mac", "record")
    try:
        doc = parsed if parsed is not None else json.loads(body)
        origin, hlc, key, row = doc["o"], doc["h"], doc["k"], doc["r"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise WireError("malformed", "record body") from exc
    if not (isinstance(origin, str) and isinstance(hlc, int) and hlc > 0
            and isinstance(key, list) and len(key) == 2 and all(isinstance(k, str) and k for k in key)
            and (row is None or isinstance(row, dict))):
        raise WireError("malformed", "record fields")
    return Record(origin, hlc, (key[0], key[1]), row, body, mac)


# -- TCP frames (anti-entropy) ---------------------------------------------
_LEN = struct.Struct(">I")


async def write_frame(keys: Keys, writer: asyncio.StreamWriter, msg: dict) -> int:
    msg["ts"] = round(time.time(), 3)
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise WireError("too_large", "frame")
    data = _LEN.pack(len(body)) + _mac(keys.frame, body) + body
    writer.write(data)
    await writer.drain()
    return len(data)


async def read_frame(keys: Keys, reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> tuple[dict, int]:
    """One authenticated frame of at most `limit` bytes (refused before it is read)."""
    head = await reader.readexactly(_LEN.size + MAC_LEN)
    (n,) = _LEN.unpack(head[:_LEN.size])
    if n > limit:
        raise WireError("too_large", "frame")
    body = await reader.readexactly(n)
    if not hmac.compare_digest(head[_LEN.size:], _mac(keys.frame, body)):
        raise WireError("bad_mac", "frame")
    try:
        msg = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise WireError("malformed", "frame json") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("f"), str):
        raise WireError("malformed", "frame fields")
    ts = msg.get("ts")
    if not isinstance(ts, (int, float)) or abs(time.time() - ts) > MAX_SKEW_S:
        raise WireError("stale", "frame")
    return msg, len(head) + n


def pair_hash(key: tuple[str, str], hlc: int) -> int:
    """One (key, version) as 64 bits; a replica's digest per origin is the XOR of these,
    so it is order-independent and updated in O(1) per change."""
    return int.from_bytes(hashlib.blake2b(f"{key[0]}\0{key[1]}\0{hlc}".encode(), digest_size=8).digest(), "big")
