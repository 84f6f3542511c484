"""runc-kubefly (hack/kind/runc-wrapper), run as containerd-shim runs runc, in
front of a stand-in "real runc" that records what it was given. The capability
bounding set is read from a /proc status fixture, so both kinds of machine are
covered wherever this runs. No cluster needed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from .kindlib import REPO

HAS_SYS_RESOURCE = "CapBnd:\t000001ffffffffff\n"    # bit 24 set
LACKS_SYS_RESOURCE = "CapBnd:\t000001fffeffffff\n"  # as on this project's CI machines
CAPS = ["CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE", "CAP_NET_ADMIN"]
# Text json.loads/dumps would not keep: a 64-bit limit (floats lose it) and key order.
CONFIG = (
    '{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":["/pause"],'
    '"capabilities":{"bounding":%(caps)s,"effective":%(caps)s,"permitted":%(caps)s,"inheritable":%(caps)s},'
    '"oomScoreAdj":%(oom)d},"linux":{"resources":{"memory":{"limit":9223372036854771712}}},"hostname":"p"}'
)


@pytest.fixture(scope="module")
def wrapper() -> Path:
    out = subprocess.run(["bash", "-c", f"source {REPO}/hack/kind/lib.sh && runc_wrapper"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


@pytest.fixture
def runc(tmp_path: Path):
    """A stand-in real runc: records its arguments and the JSON files it was handed."""
    fake = tmp_path / "real-runc"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/args\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return fake


def run(wrapper: Path, runc: Path, status: str, *args: str) -> list[str]:
    status_file = runc.parent / "status"
    status_file.write_text("Name:\trunc\n" + status + "CapEff:\t0\n")
    env = {**os.environ, "KUBEFLY_REAL_RUNC": str(runc), "KUBEFLY_PROC_STATUS": str(status_file)}
    proc = subprocess.run([str(wrapper), *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return (runc.parent / "args").read_text().splitlines()


def bundle(tmp_path: Path, oom: int = -998) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "config.json").write_text(CONFIG % {"caps": json.dumps(CAPS), "oom": oom})
    return d


@pytest.mark.parametrize("form", [["--bundle", "{b}"], ["--bundle={b}"], ["-b", "{b}"]])
def test_create_drops_cap_sys_resource_and_raises_negative_oom_score_adj(wrapper, runc, tmp_path, form):
    b = bundle(tmp_path)
    args = ["--root", "/run/containerd/runc/k8s.io", "--log", "/tmp/log.json", "--log-format", "json",
            "create", *[f.format(b=b) for f in form], "--pid-file", "/tmp/pid", "sandbox-1"]
    assert run(wrapper, runc, LACKS_SYS_RESOURCE, *args) == args  # arguments pass through untouched
    raw = (b / "config.json").read_text()
    spec = json.loads(raw)
    for name, caps in spec["process"]["capabilities"].items():
        assert caps == ["CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_NET_ADMIN"], name
    assert spec["process"]["oomScoreAdj"] == 0
    assert '"limit":9223372036854771712' in raw  # numbers keep their exact text
    assert spec["hostname"] == "p" and spec["process"]["args"] == ["/pause"]


def test_run_without_bundle_flag_uses_the_working_directory(wrapper, runc, tmp_path):
    b = bundle(tmp_path)
    status_file = tmp_path / "status"
    status_file.write_text(LACKS_SYS_RESOURCE)
    env = {**os.environ, "KUBEFLY_REAL_RUNC": str(runc), "KUBEFLY_PROC_STATUS": str(status_file)}
    subprocess.run([str(wrapper), "run", "--detach", "c1"], env=env, cwd=b, check=True)
    spec = json.loads((b / "config.json").read_text())
    assert "CAP_SYS_RESOURCE" not in spec["process"]["capabilities"]["bounding"]


def test_exec_rewrites_the_process_file(wrapper, runc, tmp_path):
    proc_file = tmp_path / "process.json"
    proc_file.write_text(json.dumps({"args": ["sh"], "capabilities": {"bounding": CAPS, "effective": CAPS}, "oomScoreAdj": -5}))
    args = ["exec", "--process", str(proc_file), "--detach", "c1"]
    assert run(wrapper, runc, LACKS_SYS_RESOURCE, *args) == args
    proc = json.loads(proc_file.read_text())
    assert "CAP_SYS_RESOURCE" not in proc["capabilities"]["bounding"] + proc["capabilities"]["effective"]
    assert proc["oomScoreAdj"] == 0


def test_a_spec_that_needs_nothing_is_left_byte_for_byte(wrapper, runc, tmp_path):
    b = bundle(tmp_path, oom=100)
    (b / "config.json").write_text(CONFIG % {"caps": json.dumps(["CAP_CHOWN"]), "oom": 100})
    before = (b / "config.json").read_bytes()
    run(wrapper, runc, LACKS_SYS_RESOURCE, "create", "--bundle", str(b), "c1")
    assert (b / "config.json").read_bytes() == before


def test_a_machine_with_cap_sys_resource_gets_runc_unchanged(wrapper, runc, tmp_path):
    b = bundle(tmp_path)
    before = (b / "config.json").read_bytes()
    args = ["create", "--bundle", str(b), "c1"]
    assert run(wrapper, runc, HAS_SYS_RESOURCE, *args) == args
    assert (b / "config.json").read_bytes() == before


def test_other_commands_pass_straight_through(wrapper, runc, tmp_path):
    for args in (["state", "c1"], ["delete", "--force", "c1"], ["--version"]):
        assert run(wrapper, runc, LACKS_SYS_RESOURCE, *args) == args
