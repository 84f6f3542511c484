"""The replicated row store: one last-writer-wins map per origin host.

Each origin (host) is the only writer of its own namespace, so a key that
moves between hosts (a migrated machine) never conflicts: the reader-facing
view picks the newest live row per (org, machine_id) among live origins.

Expiry: tombstones and live rows both expire `ttl` after their HLC wall
time; origins re-sign their live rows every ttl/3 (`needs_refresh`). So a
stale live copy held by a partitioned host is either older than the
tombstone that replaced it (LWW drops it) or older than the TTL (refused
and pruned): a deleted row cannot come back.

Rows are kept in memory and written to SQLite in batches; the store is
reloaded on restart so an agent serves its last known state at once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from pydantic import ValidationError

from kubefly.gossip import hlc as hlcmod
from kubefly.gossip.wire import Record, WireError, pair_hash
from kubefly.instances import Instance

Key = tuple[str, str]


def validate(rec: Record, now: float, ttl: float) -> Instance | None:
    """The merge rules every received record must pass; returns the parsed
    row (None for a tombstone) or raises WireError with the reason."""
    if hlcmod.wall_s(rec.hlc) < now - ttl:
        raise WireError("expired", f"{rec.origin}/{rec.key}")
    if hlcmod.wall_s(rec.hlc) > now + hlcmod.MAX_DRIFT_MS / 1000:
        raise WireError("clock_drift", f"{rec.origin}/{rec.key}")
    if rec.row is None:
        return None
    try:
        inst = Instance.model_validate(rec.row)
    except ValidationError as exc:
        raise WireError("invalid_row", str(exc.errors()[:1])) from exc
    if inst.host != rec.origin:
        raise WireError("wrong_origin", f"{rec.origin} wrote a row of host {inst.host}")
    if inst.key != rec.key:
        raise WireError("invalid_row", "key does not match row")
    return inst


def newer(incoming: Record, current: Record | None) -> bool:
    """LWW within one origin's namespace: the higher HLC wins; equal is the same write."""
    return current is None or incoming.hlc > current.hlc


class Store:
    def __init__(self, path: Path | None, ttl: float):
        self.ttl = ttl
        self.by_origin: dict[str, dict[Key, Record]] = {}
        self.parsed: dict[tuple[str, Key], Instance] = {}
        self._hash: dict[str, int] = {}
        self._dirty: dict[tuple[str, Key], Record | None] = {}
        self._db: sqlite3.Connection | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS records (origin TEXT, org TEXT, machine_id TEXT,"
                " hlc INTEGER, body TEXT, mac TEXT, PRIMARY KEY (origin, org, machine_id))"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")

    # -- persistence ------------------------------------------------------------
    def load(self) -> list[Record]:
        """Records persisted by an earlier run (signatures were checked when first merged)."""
        if self._db is None:
            return []
        out = []
        for origin, org, mid, h, body, mac in self._db.execute("SELECT * FROM records"):
            doc = json.loads(body)
            rec = Record(origin, h, (org, mid), doc["r"], body, mac)
            self._set(rec)
            out.append(rec)
        self._dirty.clear()
        return out

    def flush(self) -> int:
        if self._db is None or not self._dirty:
            self._dirty.clear()
            return 0
        dirty, self._dirty = self._dirty, {}
        up = [(o, k[0], k[1], r.hlc, r.body, r.mac) for (o, k), r in dirty.items() if r is not None]
        gone = [(o, k[0], k[1]) for (o, k), r in dirty.items() if r is None]
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR REPLACE INTO records VALUES (?,?,?,?,?,?)", up)
        self._db.executemany("DELETE FROM records WHERE origin=? AND org=? AND machine_id=?", gone)
        self._db.execute("COMMIT")
        return len(dirty)

    def meta_get(self, k: str) -> str | None:
        if self._db is None:
            return None
        row = self._db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return row[0] if row else None

    def meta_set(self, k: str, v: str) -> None:
        if self._db is not None:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (k, v))

    def close(self) -> None:
        if self._db is not None:
            self.flush()
            self._db.close()
            self._db = None

    # -- rows -------------------------------------------------------------------
    def get(self, origin: str, key: Key) -> Record | None:
        return self.by_origin.get(origin, {}).get(key)

    def put(self, rec: Record, inst: Instance | None = None) -> bool:
        """Store rec if it wins LWW; True when it did."""
        if not newer(rec, self.get(rec.origin, rec.key)):
            return False
        self._set(rec, inst)
        self._dirty[(rec.origin, rec.key)] = rec
        return True

    def _set(self, rec: Record, inst: Instance | None = None) -> None:
        ns = self.by_origin.setdefault(rec.origin, {})
        old = ns.get(rec.key)
        h = self._hash.get(rec.origin, 0)
        if old is not None:
            h ^= pair_hash(old.key, old.hlc)
        self._hash[rec.origin] = h ^ pair_hash(rec.key, rec.hlc)
        ns[rec.key] = rec
        pk = (rec.origin, rec.key)
        if rec.row is None:
            self.parsed.pop(pk, None)
        else:
            self.parsed[pk] = inst if inst is not None else Instance.model_validate(rec.row)

    def remove(self, origin: str, key: Key) -> None:
        ns = self.by_origin.get(origin, {})
        old = ns.pop(key, None)
        if old is None:
            return
        self._hash[origin] = self._hash.get(origin, 0) ^ pair_hash(old.key, old.hlc)
        if not ns:
            del self.by_origin[origin]
            self._hash.pop(origin, None)
        self.parsed.pop((origin, key), None)
        self._dirty[(origin, key)] = None

    def records_of(self, origin: str) -> list[Record]:
        return list(self.by_origin.get(origin, {}).values())

    def instance(self, origin: str, key: Key) -> Instance | None:
        return self.parsed.get((origin, key))

    def live_count(self) -> int:
        return len(self.parsed)

    def count(self) -> int:
        return sum(len(ns) for ns in self.by_origin.values())

    def digest(self) -> dict[str, list]:
        """{origin: [count, hash]}: what a peer compares to find what differs."""
        return {o: [len(ns), f"{self._hash.get(o, 0):016x}"] for o, ns in self.by_origin.items()}

    def expired(self, now: float | None = None, keep_live_of: str | None = None) -> list[Record]:
        """Records older than the TTL (live rows of `keep_live_of`, this host, are refreshed instead)."""
        cutoff = (now if now is not None else time.time()) - self.ttl
        return [
            r for o, ns in self.by_origin.items() for r in ns.values()
            if hlcmod.wall_s(r.hlc) < cutoff and not (o == keep_live_of and r.row is not None)
        ]

    def needs_refresh(self, origin: str, now: float | None = None) -> list[Record]:
        cutoff = (now if now is not None else time.time()) - self.ttl / 3
        return [r for r in self.by_origin.get(origin, {}).values() if r.row is not None and hlcmod.wall_s(r.hlc) < cutoff]
