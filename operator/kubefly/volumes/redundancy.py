"""Fly's advice, as a condition: run an app's volumes in sets of two or more per region.

Condition `Redundant` on every Volume: False (reason SingleVolumeInRegion) when
it is its app's only Volume in its region, True (MultipleVolumesInRegion)
otherwise. A Volume being deleted no longer counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

CONDITION = "Redundant"


@dataclass(frozen=True)
class Sibling:
    name: str
    app: str
    region: str
    deleting: bool = False


@dataclass(frozen=True)
class Verdict:
    redundant: bool
    reason: str
    message: str


def verdict(volume: Sibling, volumes: Iterable[Sibling]) -> Verdict:
    peers = sorted(
        v.name for v in volumes
        if v.app == volume.app and v.region == volume.region and not v.deleting and v.name != volume.name
    )
    if not peers:
        return Verdict(
            False,
            "SingleVolumeInRegion",
            f"the only volume of app {volume.app} in region {volume.region}: a host failure loses its data "
            "until restored; run at least two volumes per region and replicate between them",
        )
    return Verdict(True, "MultipleVolumesInRegion", f"app {volume.app} has {len(peers) + 1} volumes in region {volume.region}")
