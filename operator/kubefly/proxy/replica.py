"""Where the proxy reads instance rows from.

In the platform: the local host agent's replica (kubefly.gossip.client).
Standalone (one host, benchmarks, development): a JSON file of rows, re-read
on SIGHUP, so the proxy can be measured without the gossip layer.
"""

from __future__ import annotations

import json
from pathlib import Path

from kubefly.instances import Instance


class StaticReplica:
    def __init__(self, path: Path, self_host: str, self_region: str):
        self.path = path
        self.self_host = self_host
        self.self_region = self_region
        self._by_app: dict[tuple[str, str], list[Instance]] = {}
        self.reload()

    def reload(self) -> None:
        rows = [Instance.model_validate(r) for r in json.loads(self.path.read_text())]
        by_app: dict[tuple[str, str], list[Instance]] = {}
        for row in rows:
            by_app.setdefault((row.org, row.app), []).append(row)
        self._by_app = by_app

    def instances(self, org: str | None = None, app: str | None = None) -> list[Instance]:
        if org is not None and app is not None:
            return self._by_app.get((org, app), [])
        return [i for (o, _), rows in self._by_app.items() if org is None or o == org for i in rows]

    def apps(self) -> set[tuple[str, str]]:
        return set(self._by_app)

    def rtt(self, host: str) -> float | None:
        return None

    def host_ip(self, host: str) -> str | None:
        # One host, no agent: rows of other hosts have nowhere to hop to.
        return None
