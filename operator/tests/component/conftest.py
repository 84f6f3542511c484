"""The real S3 server of the component tests (volume snapshots, Postgres backups): one
kubefly.objectstore.localstore per session on 127.0.0.1, stopped at teardown."""

from __future__ import annotations

import pytest

from kubefly.objectstore import localstore


@pytest.fixture(scope="session")
def object_store():
    if (why := localstore.problem()) is not None:
        pytest.fail(why, pytrace=False)
    try:
        with localstore.running() as store:
            yield store
    except localstore.StoreFailed as exc:
        pytest.fail(str(exc), pytrace=False)
