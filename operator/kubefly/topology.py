"""The test topology, read from kind-config.yaml (its one source).

kind names nodes `<cluster>-control-plane`, `<cluster>-worker`, `<cluster>-worker2`...;
the kwok tier gives its simulated hosts the same names and labels, so tests and
docs speak of the same hosts on both tiers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kubefly.labels import NODE_REGION

REPO_ROOT = Path(__file__).resolve().parents[2]
KIND_CONFIG = REPO_ROOT / "kind-config.yaml"


@dataclass(frozen=True)
class Host:
    name: str
    role: str  # control-plane | worker
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def region(self) -> str | None:
        return self.labels.get(NODE_REGION)


@dataclass(frozen=True)
class Topology:
    cluster: str
    hosts: tuple[Host, ...]

    @property
    def workers(self) -> tuple[Host, ...]:
        return tuple(h for h in self.hosts if h.role == "worker")

    @property
    def regions(self) -> list[str]:
        return sorted({h.region for h in self.hosts if h.region})


def parse(doc: dict) -> Topology:
    if doc.get("kind") != "Cluster":
        raise ValueError("kind-config: `kind` must be Cluster")
    cluster = doc.get("name") or "kind"
    counts: dict[str, int] = {}
    hosts = []
    for i, node in enumerate(doc.get("nodes") or [{"role": "control-plane"}]):
        role = node.get("role", "control-plane")
        if role not in ("control-plane", "worker"):
            raise ValueError(f"kind-config: nodes[{i}].role must be control-plane or worker, not {role!r}")
        counts[role] = counts.get(role, 0) + 1
        suffix = "" if counts[role] == 1 else str(counts[role])
        labels = {str(k): str(v) for k, v in (node.get("labels") or {}).items()}
        hosts.append(Host(name=f"{cluster}-{role}{suffix}", role=role, labels=labels))
    return Topology(cluster=cluster, hosts=tuple(hosts))


def load(path: Path = KIND_CONFIG) -> Topology:
    return parse(yaml.safe_load(path.read_text()))
