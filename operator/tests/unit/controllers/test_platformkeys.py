"""Startup: the bundled store's Secrets exist, its identity file starts with the admin key, and nothing
that exists is changed."""

from __future__ import annotations

import base64
import json
import logging

import kopf
import pytest

from kubefly.controllers import platformkeys
from kubefly.volumes.snapshots import ObjectStore

HOME = "kubefly-system"
BUNDLED = ObjectStore(endpoint="http://s:8333", bucket="copies", credentials_secret="kubefly-objectstore-credentials",
                      bundled=True, service="x-kubefly-objectstore")


class Secrets:
    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}

    async def get(self, path: str, *, missing_ok: bool = False) -> dict | None:
        return self.objects.get(path)

    async def create(self, collection: str, body: dict, *, exists_ok: bool = False) -> dict | None:
        path = f"{collection}/{body['metadata']['name']}"
        if path in self.objects:
            return None
        self.objects[path] = body
        return body


def _data(kube: Secrets, name: str) -> dict[str, str]:
    secret = kube.objects[f"/api/v1/namespaces/{HOME}/secrets/{name}"]
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


@pytest.fixture
def kube(monkeypatch) -> Secrets:
    fake = Secrets()
    monkeypatch.setattr(platformkeys, "kube", lambda: fake)
    return fake


async def test_the_bundled_store_gets_keys_a_certificate_and_an_identity_file_once(kube):
    memo = kopf.Memo(home_namespace=HOME, object_store=BUNDLED)
    await platformkeys.platform_keys(memo=memo, logger=logging.getLogger("t"))
    creds, tls = _data(kube, "kubefly-objectstore-credentials"), _data(kube, "kubefly-objectstore-tls")
    assert sorted(creds) == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    assert sorted(tls) == ["ca.crt", "tls.crt", "tls.key"]
    (admin,) = json.loads(_data(kube, "kubefly-objectstore-identities")["s3.json"])["identities"]
    assert admin["credentials"] == [{"accessKey": creds["AWS_ACCESS_KEY_ID"], "secretKey": creds["AWS_SECRET_ACCESS_KEY"]}]
    before = {p: json.dumps(o, sort_keys=True) for p, o in kube.objects.items()}
    await platformkeys.platform_keys(memo=memo, logger=logging.getLogger("t"))  # a restart, another replica
    assert {p: json.dumps(o, sort_keys=True) for p, o in kube.objects.items()} == before


async def test_a_bundled_store_without_its_service_name_stops_startup(kube):
    memo = kopf.Memo(home_namespace=HOME, object_store=ObjectStore(endpoint="http://s:8333", bucket="b",
                                                                   credentials_secret="c", bundled=True))
    with pytest.raises(kopf.PermanentError, match="KUBEFLY_OBJECT_STORE_SERVICE"):
        await platformkeys.platform_keys(memo=memo, logger=logging.getLogger("t"))


async def test_without_the_bundled_store_only_the_platform_keys_are_made(kube):
    memo = kopf.Memo(home_namespace=HOME, object_store=None)
    await platformkeys.platform_keys(memo=memo, logger=logging.getLogger("t"))
    assert sorted(p.rsplit("/", 1)[1] for p in kube.objects) == ["kubefly-hop-token", "kubefly-snapshot-key"]
