"""Cluster-wide platform settings: the maintenance switch and closed regions.

They live in the ConfigMap `kubefly-platform` in the operator's own namespace
(the chart renders it from `values.platform`; an operator of the platform may
also edit it directly). Keys:

    maintenance        "true" | "false"   pause changes to started machines
    maintenanceReason  free text          shown on every held Machine
    maintenanceUntil   RFC 3339 time      when the platform team expects to lift it
    closedRegions      "ams, iad"         regions that take no new machines
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime

from kubefly.api.common import DNS_LABEL_PATTERN

CONFIGMAP = "kubefly-platform"
DEFAULT_HOME_NAMESPACE = "kubefly-system"


def home_namespace() -> str:
    """The operator's own namespace (the chart's release namespace)."""
    return os.environ.get("KUBEFLY_NAMESPACE") or DEFAULT_HOME_NAMESPACE


@dataclass(frozen=True)
class Maintenance:
    reason: str
    until: datetime | None

    def describe(self) -> str:
        until = f"until {self.until.strftime('%Y-%m-%dT%H:%M:%SZ')}" if self.until else "until it is lifted (no end given)"
        return f"platform maintenance: {self.reason or 'no reason given'}; changes to started machines are paused {until}"


@dataclass(frozen=True)
class PlatformSettings:
    maintenance: Maintenance | None = None
    closed_regions: frozenset[str] = field(default_factory=frozenset)


def parse(data: dict[str, str] | None) -> PlatformSettings:
    """The ConfigMap's data as settings; a bad value raises ValueError naming the key."""
    data = data or {}
    switch = (data.get("maintenance") or "false").strip().lower()
    if switch not in ("true", "false"):
        raise ValueError(f"{CONFIGMAP}: maintenance must be \"true\" or \"false\", not {data['maintenance']!r}")
    until = None
    if data.get("maintenanceUntil", "").strip():
        raw = data["maintenanceUntil"].strip()
        try:
            until = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{CONFIGMAP}: maintenanceUntil must be an RFC 3339 time, not {raw!r}") from None
        if until.tzinfo is None:
            raise ValueError(f"{CONFIGMAP}: maintenanceUntil must carry a time zone (e.g. Z), not {raw!r}")
    regions = frozenset(r.strip() for r in (data.get("closedRegions") or "").replace("\n", ",").split(",") if r.strip())
    bad = sorted(r for r in regions if not re.fullmatch(DNS_LABEL_PATTERN, r))
    if bad:
        raise ValueError(f"{CONFIGMAP}: closedRegions must be region names (DNS labels), not {', '.join(bad)}")
    maintenance = Maintenance(data.get("maintenanceReason", "").strip(), until) if switch == "true" else None
    return PlatformSettings(maintenance=maintenance, closed_regions=regions)
