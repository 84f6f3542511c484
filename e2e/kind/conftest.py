"""Kind-tier fixtures: kind-config.yaml's cluster on Docker with real kubelets
and kubefly installed by Helm from its own images (hack/kind/up.sh, the same
script as `make kind-up`). The cluster is built once for this package and
deleted when its tests are done (KUBEFLY_KEEP_CLUSTER=1 keeps it). When it
cannot be built, every test here fails with the reason; none skips.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from .kindlib import REPO, KindCluster, port_offset

# One cluster per session: two sessions on one machine must not delete each other's.
CLUSTER = os.environ.get("KUBEFLY_KIND_E2E_CLUSTER", f"kubefly-e2e-{uuid.uuid4().hex[:6]}")
# A cold machine builds the node image and kubefly's images first (~15 min on 2 busy cores).
SETUP_TIMEOUT = 3600
HERE = Path(__file__).parent


# Cases that stop a worker or kill the operator run after every other one on the shared cluster.
DISRUPTIVE = HERE / "test_kind_disruption.py"


def pytest_collection_modifyitems(items):
    slots = [i for i, item in enumerate(items) if Path(str(item.fspath)).is_relative_to(HERE)]
    ours = sorted((items[i] for i in slots), key=lambda item: Path(str(item.fspath)) == DISRUPTIVE)
    for i, item in zip(slots, ours):
        item.add_marker(pytest.mark.kind)
        item.add_marker(pytest.mark.timeout(SETUP_TIMEOUT))
        items[i] = item


@pytest.fixture(scope="package")
def kind(tmp_path_factory) -> KindCluster:
    offset = port_offset()
    log = tmp_path_factory.mktemp("kind") / "up.log"
    started = time.monotonic()
    with log.open("w") as err:
        proc = subprocess.run(
            ["bash", str(REPO / "hack" / "kind" / "up.sh"), "--name", CLUSTER, "--port-offset", str(offset)],
            stdout=subprocess.PIPE, stderr=err, text=True,
        )
    if proc.returncode != 0:
        if os.environ.get("KUBEFLY_KEEP_CLUSTER") != "1":
            subprocess.run(["bash", str(REPO / "hack" / "kind" / "down.sh"), "--name", CLUSTER], capture_output=True)
        pytest.fail(f"the kind cluster could not be built (hack/kind/up.sh exited {proc.returncode}); "
                    f"last lines of {log}:\n{log.read_text()[-4000:]}", pytrace=False)
    print(f"\n[kind] cluster {CLUSTER} ready in {time.monotonic() - started:.0f}s")
    kubeconfig = Path(proc.stdout.strip().splitlines()[-1])
    images_file = kubeconfig.with_name(f"{CLUSTER}.images")
    images = dict(line.split("=", 1) for line in images_file.read_text().split())
    yield KindCluster(CLUSTER, kubeconfig, images)
    if os.environ.get("KUBEFLY_KEEP_CLUSTER") != "1":
        subprocess.run(["bash", str(REPO / "hack" / "kind" / "down.sh"), "--name", CLUSTER], capture_output=True)


@pytest.fixture
def namespace(kind: KindCluster):
    name = f"kind-{uuid.uuid4().hex[:8]}"
    kind.kubectl("create", "namespace", name)
    yield name
    kind.kubectl("delete", "namespace", name, "--wait=false", check=False)
