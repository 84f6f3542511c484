"""Parsing the platform settings ConfigMap."""

from datetime import datetime, timezone

import pytest

from kubefly.platform import PlatformSettings, parse


def test_empty_or_missing_means_no_maintenance_no_closed_regions():
    assert parse(None) == PlatformSettings()
    assert parse({"maintenance": "false", "closedRegions": ""}) == PlatformSettings()


def test_maintenance_with_reason_and_until():
    s = parse({"maintenance": "true", "maintenanceReason": "db upgrade", "maintenanceUntil": "2026-12-01T18:00:00Z"})
    assert s.maintenance.reason == "db upgrade"
    assert s.maintenance.until == datetime(2026, 12, 1, 18, tzinfo=timezone.utc)
    assert "db upgrade" in s.maintenance.describe() and "2026-12-01T18:00:00Z" in s.maintenance.describe()


def test_closed_regions_list():
    assert parse({"closedRegions": "ams, iad\nsyd"}).closed_regions == {"ams", "iad", "syd"}


@pytest.mark.parametrize("data, key", [
    ({"maintenance": "yes"}, "maintenance"),
    ({"maintenance": "true", "maintenanceUntil": "tomorrow"}, "maintenanceUntil"),
    ({"maintenanceUntil": "2026-12-01T18:00:00"}, "maintenanceUntil"),
    ({"closedRegions": "AMS"}, "closedRegions"),
])
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ValueError, match=key):
        parse(data)
