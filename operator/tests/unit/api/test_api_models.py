"""The models refuse what the CRD refuses, and fill in the same defaults."""

from __future__ import annotations

import base64

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from kubefly.api import AppSecret, Machine, MachineSpec, MachineStatus, PostgresClusterSpec, VolumeSpec
from kubefly.api.appsecret import AppSecretSpec
from kubefly.api.machine import Concurrency

BASE = {"app": "web", "region": "ams", "image": "nginx:1.27"}


def test_machine_defaults():
    spec = MachineSpec.model_validate(BASE)
    assert (spec.guest.cpu_kind, spec.guest.cpus, spec.guest.memory_mb) == ("shared", 1, 256)
    assert (spec.restart.policy, spec.restart.max_retries) == ("on-failure", 10)
    assert (spec.stop.signal, spec.stop.timeout_seconds) == ("SIGINT", 5)
    assert spec.state == "started" and spec.secrets is None and spec.mounts == []
    service = MachineSpec.model_validate({**BASE, "services": [{"internalPort": 8080}]}).services[0]
    assert (service.protocol, service.autostart, service.autostop, service.min_machines_running) == ("tcp", True, "off", 0)
    assert (service.concurrency.type, service.concurrency.soft_limit, service.concurrency.hard_limit) == ("connections", 20, None)


def test_autostop_suspend_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match=r"spec\.services\[\]\.autostop: suspend is not supported"):
        MachineSpec.model_validate({**BASE, "services": [{"internalPort": 8080, "autostop": "suspend"}]})
    assert MachineSpec.model_validate({**BASE, "services": [{"internalPort": 8080, "autostop": "stop"}]}).services[0].autostop == "stop"


def test_other_defaults():
    volume = VolumeSpec.model_validate({"app": "web", "region": "ams"})
    assert (volume.size_gb, volume.snapshot_retention, volume.snapshot_interval_hours, volume.fork_from) == (1, 5, 24, None)
    assert AppSecretSpec.model_validate({"app": "web", "data": {}}).stage is False
    pg = PostgresClusterSpec.model_validate({"app": "db", "region": "ams"})
    assert (pg.members, pg.version, pg.synchronous, pg.delete_policy, pg.switchover_to) == (3, 15, False, "keepVolumes", None)


def test_camel_case_on_the_wire_snake_case_in_python():
    spec = MachineSpec(app="web", region="ams", image="x", guest={"memory_mb": 512})
    dumped = spec.model_dump(mode="json", exclude_none=True)
    assert dumped["guest"]["memoryMb"] == 512
    assert MachineSpec.model_validate(dumped) == spec


def test_status_keeps_kopf_fields():
    status = MachineStatus.model_validate({"state": "started", "instanceId": "i1", "kopf": {"progress": {}}})
    assert status.instance_id == "i1"
    assert status.model_dump(exclude_none=True, exclude_defaults=True)["kopf"] == {"progress": {}}


INVALID_SPECS = {
    "memory-not-multiple-of-256": (MachineSpec, {**BASE, "guest": {"memoryMb": 300}}, "multiple of 256"),
    "too-many-cpus": (MachineSpec, {**BASE, "guest": {"cpus": 17}}, "cpus"),
    "soft-above-hard": (
        MachineSpec,
        {**BASE, "services": [{"internalPort": 80, "concurrency": {"softLimit": 50, "hardLimit": 10}}]},
        "softLimit must be <= concurrency.hardLimit",
    ),
    "two-mounts": (MachineSpec, {**BASE, "mounts": [{"volume": "a", "path": "/a"}, {"volume": "b", "path": "/b"}]}, "mounts"),
    "duplicate-checks": (
        MachineSpec,
        {**BASE, "checks": [{"name": "alive", "type": "tcp", "port": 80}, {"name": "alive", "type": "tcp", "port": 81}]},
        "names must be unique",
    ),
    "bad-signal": (MachineSpec, {**BASE, "stop": {"signal": "SIGHUP"}}, "signal"),
    "sigkill-signal": (MachineSpec, {**BASE, "stop": {"signal": "SIGKILL"}}, "signal"),
    "stop-timeout": (MachineSpec, {**BASE, "stop": {"timeoutSeconds": 301}}, "timeoutSeconds"),
    "app-not-a-label": (MachineSpec, {**BASE, "app": "My_App"}, "app"),
    "unknown-field": (MachineSpec, {**BASE, "imagee": "typo"}, "imagee"),
    "env-name-empty": (MachineSpec, {**BASE, "env": {"": "x"}}, "spec.env names"),
    "env-name-with-equals": (MachineSpec, {**BASE, "env": {"A=B": "x"}}, "spec.env names"),
    "env-name-with-newline": (MachineSpec, {**BASE, "env": {"A\nB": "x"}}, "spec.env names"),
    "env-name-trailing-newline": (MachineSpec, {**BASE, "env": {"A\n": "x"}}, "spec.env names"),
    "image-with-space": (MachineSpec, {**BASE, "image": "nginx:1.27 --privileged"}, "image"),
    "image-with-newline": (MachineSpec, {**BASE, "image": "nginx:1.27\n"}, "image"),
    "mount-over-proc": (MachineSpec, {**BASE, "mounts": [{"volume": "a", "path": "/proc"}]}, "spec.mounts[].path"),
    "mount-under-sys": (MachineSpec, {**BASE, "mounts": [{"volume": "a", "path": "/sys/fs/cgroup"}]}, "spec.mounts[].path"),
    "mount-over-token": (
        MachineSpec, {**BASE, "mounts": [{"volume": "a", "path": "/var/run/secrets/kubernetes.io/serviceaccount"}]},
        "spec.mounts[].path",
    ),
    "mount-dotdot": (MachineSpec, {**BASE, "mounts": [{"volume": "a", "path": "/data/../proc"}]}, "spec.mounts[].path"),
    "mount-double-slash": (MachineSpec, {**BASE, "mounts": [{"volume": "a", "path": "//proc"}]}, "path"),
    "mount-trailing-slash": (MachineSpec, {**BASE, "mounts": [{"volume": "a", "path": "/data/"}]}, "path"),
    "check-path-crlf": (
        MachineSpec, {**BASE, "checks": [{"name": "h", "type": "http", "port": 80, "path": "/x\r\nHost: evil"}]}, "path",
    ),
    "check-header-value-crlf": (
        MachineSpec, {**BASE, "checks": [{"name": "h", "type": "http", "port": 80, "headers": {"X": "a\r\nB: c"}}]},
        "headers.X",
    ),
    "check-header-name-colon": (
        MachineSpec, {**BASE, "checks": [{"name": "h", "type": "http", "port": 80, "headers": {"X: y": "a"}}]},
        "spec.checks[].headers names",
    ),
    "volume-too-big": (VolumeSpec, {"app": "web", "region": "ams", "sizeGb": 501}, "sizeGb"),
    "secret-key": (AppSecretSpec, {"app": "web", "data": {"1BAD": "c2VhbGVk"}}, "environment variable names"),
    "secret-not-base64": (AppSecretSpec, {"app": "web", "data": {"TOKEN": "plain text!"}}, "TOKEN"),
    "pg-members": (PostgresClusterSpec, {"app": "db", "region": "ams", "members": 8}, "members"),
    "pg-version": (PostgresClusterSpec, {"app": "db", "region": "ams", "version": 16}, "version"),
    "pg-synchronous": (PostgresClusterSpec, {"app": "db", "region": "ams", "members": 1, "synchronous": True}, "synchronous"),
}


@pytest.mark.parametrize("model,data,expected", INVALID_SPECS.values(), ids=INVALID_SPECS.keys())
def test_invalid_specs_are_refused(model, data, expected):
    with pytest.raises(ValidationError) as err:
        model.model_validate(data)
    assert expected in str(err.value)


def test_label_unsafe_names_are_refused_where_names_become_labels():
    with pytest.raises(ValidationError, match="metadata.name must be a DNS label"):
        Machine.model_validate({"metadata": {"name": "m" * 64}, "spec": BASE})
    with pytest.raises(ValidationError, match="metadata.name must be a DNS label"):
        Machine.model_validate({"metadata": {"name": "a.b"}, "spec": BASE})
    # AppSecret names do not become labels, so a dotted name is fine.
    AppSecret.model_validate({"metadata": {"name": "a.b"}, "spec": {"app": "web", "data": {}}})


@given(st.integers(min_value=-1024, max_value=200_000))
def test_memory_accepted_iff_a_multiple_of_256_in_range(memory):
    ok = memory % 256 == 0 and 256 <= memory <= 131072
    try:
        MachineSpec.model_validate({**BASE, "guest": {"memoryMb": memory}})
    except ValidationError:
        assert not ok
    else:
        assert ok


@given(st.integers(1, 200), st.one_of(st.none(), st.integers(1, 200)))
def test_soft_limit_accepted_iff_not_above_hard_limit(soft, hard):
    ok = hard is None or soft <= hard
    try:
        Concurrency(soft_limit=soft, hard_limit=hard)
    except ValidationError:
        assert not ok
    else:
        assert ok


@given(st.lists(st.sampled_from(["alive", "ready", "db", "http"]), max_size=6))
def test_check_names_accepted_iff_unique(names):
    checks = [{"name": n, "type": "tcp", "port": 80} for n in names]
    try:
        MachineSpec.model_validate({**BASE, "checks": checks})
    except ValidationError:
        assert len(set(names)) != len(names)
    else:
        assert len(set(names)) == len(names)


@given(st.dictionaries(st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,30}\Z"), st.binary(max_size=64), max_size=8))
def test_any_env_var_key_with_base64_value_is_accepted(raw):
    data = {k: base64.b64encode(v).decode() for k, v in raw.items()}
    assert AppSecretSpec.model_validate({"app": "web", "data": data}).data == data


@given(st.text(min_size=1, max_size=20).filter(lambda k: not k.isidentifier() or not k.isascii()))
@example("A\n")  # Python's `$` matches before a final newline: the key must match whole
def test_non_identifier_keys_are_refused(key):
    with pytest.raises(ValidationError):
        AppSecretSpec.model_validate({"app": "web", "data": {key: "c2VhbGVk"}})


def test_sane_machine_input_is_accepted():
    spec = MachineSpec.model_validate({
        **BASE, "image": "registry.example.com:5000/team/app@sha256:" + "a" * 64,
        "env": {"A": "1", "my-var.x": "multi\nline value", "_": ""},
        "mounts": [{"volume": "data", "path": "/data/pg.15"}],
        "checks": [{"name": "h", "type": "http", "port": 80, "path": "/health?full=1&x=%20",
                    "headers": {"Authorization": "Bearer a.b.c", "X-Empty": ""}}],
    })
    assert spec.mounts[0].path == "/data/pg.15" and spec.checks[0].headers["X-Empty"] == ""
    for path in ("/process", "/system", "/devices", "/var/run", "/run", "/data/..x", "/a/.b"):
        MachineSpec.model_validate({**BASE, "mounts": [{"volume": "data", "path": path}]})


@given(st.text(max_size=12))
@example("A=B")
@example("A\n")
@example(" A")
def test_env_names_accepted_iff_printable_without_equals_or_space(name):
    ok = 0 < len(name) and all("!" <= ch <= "~" and ch != "=" for ch in name)
    try:
        MachineSpec.model_validate({**BASE, "env": {name: "v"}})
    except ValidationError:
        assert not ok
    else:
        assert ok


@given(st.lists(st.sampled_from(["a", "..", ".", "proc", "sys", "dev", "run", "var", "secrets", ""]), min_size=1, max_size=4))
def test_mount_paths_accepted_iff_clean_and_outside_the_runtimes_own(segments):
    path = "/" + "/".join(segments)
    reserved = segments[0] in ("proc", "sys", "dev") or segments[:2] == ["run", "secrets"] or segments[:3] == ["var", "run", "secrets"]
    ok = len(path) >= 2 and "" not in segments and "." not in segments and ".." not in segments and not reserved
    try:
        MachineSpec.model_validate({**BASE, "mounts": [{"volume": "data", "path": path}]})
    except ValidationError:
        assert not ok, path
    else:
        assert ok, path
