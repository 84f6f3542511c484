"""Per-tenant identities: the rendered s3.json, and grant/revoke against an API server stand-in that
checks resourceVersion as the real one does (409 on a stale write)."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from kubernetes.client.exceptions import ApiException

from kubefly.objectstore import access
from kubefly.volumes.snapshots import ObjectStore

HOME = "kubefly-system"
STORE = ObjectStore(endpoint="http://s:8333", bucket="copies", credentials_secret="kubefly-objectstore-credentials",
                    bundled=True, https_endpoint="https://s.kubefly-system.svc:8443", ca_secret="kubefly-objectstore-tls",
                    service="s")
ADMIN = access.TenantKeys("ADMINKEY", "adminsecret")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Secrets:
    """Secrets by path; every read yields to the loop first, so concurrent callers interleave."""

    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}
        self.version = 0
        self.conflicts = 0

    def put(self, secret: dict) -> None:
        self.version += 1
        meta = secret["metadata"]
        secret = {**secret, "metadata": {**meta, "resourceVersion": str(self.version)}}
        self.objects[f"/api/v1/namespaces/{meta['namespace']}/secrets/{meta['name']}"] = secret

    async def get(self, path: str, *, missing_ok: bool = False) -> dict | None:
        await asyncio.sleep(0)
        if path not in self.objects:
            if missing_ok:
                return None
            raise ApiException(status=404)
        return json.loads(json.dumps(self.objects[path]))

    async def patch(self, path: str, body: dict, *, missing_ok: bool = False) -> dict:
        await asyncio.sleep(0)
        current = self.objects[path]
        if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"]:
            self.conflicts += 1
            raise ApiException(status=409, reason="Conflict")
        self.put({**current, "data": {**current["data"], **body["data"]}})
        return self.objects[path]

    def data(self, name: str, key: str) -> str:
        return base64.b64decode(self.objects[f"/api/v1/namespaces/{HOME}/secrets/{name}"]["data"][key]).decode()


@pytest.fixture
def kube() -> Secrets:
    k = Secrets()
    k.put({"metadata": {"name": "kubefly-objectstore-credentials", "namespace": HOME},
           "data": {"AWS_ACCESS_KEY_ID": _b64(ADMIN.access_key_id), "AWS_SECRET_ACCESS_KEY": _b64(ADMIN.secret_access_key)}})
    k.put(access.identities_secret(HOME, ADMIN, STORE.bucket))
    return k


def _identities(kube: Secrets) -> dict[str, dict]:
    return {i["name"]: i for i in json.loads(kube.data(access.IDENTITIES, access.CONFIG_KEY))["identities"]}


def test_render_confines_each_tenant_to_its_prefixes_and_keeps_the_admin():
    t = access.Tenant("pg-acme-orders", "AK", "SK", ("postgres/acme/orders",), ("postgres/acme/old",))
    doc = json.loads(access.render(ADMIN, "copies", [t]))
    admin, tenant = doc["identities"]
    assert admin == {"name": "kubefly", "credentials": [{"accessKey": "ADMINKEY", "secretKey": "adminsecret"}],
                     "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    assert tenant["name"] == "pg-acme-orders"
    assert tenant["credentials"] == [{"accessKey": "AK", "secretKey": "SK"}]
    assert tenant["actions"] == ["Read:copies/postgres/acme/orders/*", "Write:copies/postgres/acme/orders/*",
                                 "List:copies/postgres/acme/orders/*",
                                 "Read:copies/postgres/acme/old/*", "List:copies/postgres/acme/old/*"]
    # Never a bucket-wide or bare-prefix action: SeaweedFS matches `...*` as a string prefix.
    assert all(a.endswith("/*") for a in tenant["actions"])


def test_render_writes_a_tombstone_for_each_revoked_tenant_unless_granted_again():
    t = access.Tenant("pg-a-b", "AK", "SK", ("postgres/a/b",))
    doc = json.loads(access.render(ADMIN, "copies", [t], revoked=["pg-a-b", "pg-c-d"]))
    assert [i["name"] for i in doc["identities"]] == ["kubefly", "pg-a-b", "pg-c-d"]
    assert doc["identities"][2] == {"name": "pg-c-d", "credentials": [], "actions": []}


@pytest.mark.parametrize("given, want", [
    (["postgres/acme/orders"], ("postgres/acme/orders",)),
    (["/postgres/acme/orders/", "postgres/acme/orders"], ("postgres/acme/orders",)),
    (["b/x", "a/y"], ("a/y", "b/x")),
])
def test_prefixes_are_normalised(given, want):
    assert access.prefixes(given) == want


@pytest.mark.parametrize("bad", ["", "/", "postgres//x", "postgres/*", "postgres/../other", "a/./b", "a b", "a/b?c"])
def test_prefixes_refuse_what_could_escape_or_widen(bad):
    with pytest.raises(ValueError):
        access.prefixes([bad])


def test_identity_names_stay_short_distinct_and_clear_of_the_admin():
    ns, cluster = "n" * 63, "c" * 63
    long_a, long_b = f"pg-{ns}-{cluster}", f"pg-{ns}-{cluster[:-1]}d"
    a, b = access.identity_name(long_a), access.identity_name(long_b)
    assert len(a) <= 63 and len(b) <= 63 and a != b and a.startswith("pg-nnn")
    assert access.identity_name("pg-acme-orders") == "pg-acme-orders"
    assert access.identity_name("kubefly") != "kubefly"


async def test_grant_makes_keys_once_and_returns_them_again(kube):
    keys = await access.grant(kube, STORE, HOME, "pg-acme-orders", ["postgres/acme/orders"], [])
    assert len(keys.access_key_id) == 20 and len(keys.secret_access_key) >= 40
    again = await access.grant(kube, STORE, HOME, "pg-acme-orders", ["postgres/acme/orders"], [])
    assert again == keys
    ident = _identities(kube)["pg-acme-orders"]
    assert ident["credentials"] == [{"accessKey": keys.access_key_id, "secretKey": keys.secret_access_key}]
    assert _identities(kube)["kubefly"]["credentials"][0]["accessKey"] == "ADMINKEY"


async def test_a_second_grant_changes_read_only_prefixes_with_the_same_keys(kube):
    keys = await access.grant(kube, STORE, HOME, "pg-acme-new", ["postgres/acme/new"], [])
    version = kube.version
    same = await access.grant(kube, STORE, HOME, "pg-acme-new", ["postgres/acme/new"], [])
    assert same == keys and kube.version == version  # nothing to write
    restoring = await access.grant(kube, STORE, HOME, "pg-acme-new", ["postgres/acme/new"], ["postgres/acme/old"])
    assert restoring == keys
    assert "Read:copies/postgres/acme/old/*" in _identities(kube)["pg-acme-new"]["actions"]


async def test_a_tenant_name_owned_by_other_prefixes_is_refused(kube):
    # pg-a-b-c: namespace a-b and cluster c, or namespace a and cluster b-c.
    await access.grant(kube, STORE, HOME, "pg-a-b-c", ["postgres/a-b/c"], [])
    with pytest.raises(access.TenantConflict):
        await access.grant(kube, STORE, HOME, "pg-a-b-c", ["postgres/a/b-c"], [])


async def test_concurrent_grants_for_different_tenants_all_land(kube):
    names = [f"pg-org{i}-db" for i in range(8)]
    keys = await asyncio.gather(*(access.grant(kube, STORE, HOME, n, [f"postgres/org{i}/db"], [])
                                  for i, n in enumerate(names)))
    assert kube.conflicts > 0  # they did race
    identities = _identities(kube)
    for name, k in zip(names, keys):
        assert identities[name]["credentials"] == [{"accessKey": k.access_key_id, "secretKey": k.secret_access_key}]
    assert len({k.access_key_id for k in keys}) == len(names)


async def test_revoke_leaves_a_tombstone_and_a_later_grant_has_new_keys(kube):
    old = await access.grant(kube, STORE, HOME, "pg-acme-orders", ["postgres/acme/orders"], [])
    await access.grant(kube, STORE, HOME, "pg-acme-other", ["postgres/acme/other"], [])
    await access.revoke(kube, STORE, HOME, "pg-acme-orders")
    identities = _identities(kube)
    assert identities["pg-acme-orders"] == {"name": "pg-acme-orders", "credentials": [], "actions": []}
    assert identities["pg-acme-other"]["credentials"]
    await access.revoke(kube, STORE, HOME, "pg-never-granted")  # nothing to do
    new = await access.grant(kube, STORE, HOME, "pg-acme-orders", ["postgres/acme/orders"], [])
    assert new != old and _identities(kube)["pg-acme-orders"]["credentials"][0]["accessKey"] == new.access_key_id


@pytest.mark.parametrize("store", [None, ObjectStore(endpoint="https://s3.example.com", bucket="b", credentials_secret="k")])
async def test_an_external_store_has_no_per_tenant_keys(kube, store):
    with pytest.raises(access.NeedsBundledStore, match="bundled object store"):
        await access.grant(kube, store, HOME, "pg-a-b", ["postgres/a/b"], [])
    with pytest.raises(access.NeedsBundledStore):
        await access.revoke(kube, store, HOME, "pg-a-b")


async def test_grant_refuses_bad_tenants_and_empty_prefixes(kube):
    with pytest.raises(ValueError):
        await access.grant(kube, STORE, HOME, "PG_Upper", ["postgres/a/b"], [])
    with pytest.raises(ValueError):
        await access.grant(kube, STORE, HOME, "pg-a-b", [], ["postgres/a/c"])
