"""The operator's API client and its status writes against a loopback HTTP server
answering as a kube-apiserver would: the answers are scripted per request."""

from __future__ import annotations

import json

import kopf
import pytest
from aiohttp import web
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubefly.controllers import common, kubeapi
from kubefly.controllers.kubeapi import THROTTLE_RETRIES, KubeAPI, core_path, custom_path

NOT_FOUND = (404, {}, {"kind": "Status", "code": 404, "reason": "NotFound"})


class Apiserver:
    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], list[tuple[int, dict, dict]]] = {}
        self.seen: list[dict] = []

    def answer(self, method: str, path: str, *answers: tuple[int, dict, dict]) -> None:
        self.answers.setdefault((method, path), []).extend(answers)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.seen.append({"method": request.method, "path": request.path, "query": dict(request.query),
                          "type": request.headers.get("Content-Type"), "auth": request.headers.get("Authorization"),
                          "body": json.loads(raw) if raw else None})
        queue = self.answers.get((request.method, request.path))
        status, headers, body = queue.pop(0) if queue else NOT_FOUND
        return web.json_response(body, status=status, headers=headers)


@pytest.fixture
async def apiserver(monkeypatch):
    server = Apiserver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    cfg = client.Configuration(host=f"http://127.0.0.1:{port}", api_key={"authorization": "token-1"},
                               api_key_prefix={"authorization": "Bearer"})
    api = KubeAPI(cfg)
    monkeypatch.setattr(kubeapi, "_kube", api)  # what kube() hands the controllers
    yield server, api
    await api.close()
    await runner.cleanup()


def test_paths():
    assert core_path(None, "nodes") == "/api/v1/nodes"
    assert core_path("org-a", "pods", "web-1") == "/api/v1/namespaces/org-a/pods/web-1"
    assert custom_path(None, "volumes") == "/apis/kubefly.dev/v1alpha1/volumes"
    assert custom_path("org-a", "machines", "m1") == "/apis/kubefly.dev/v1alpha1/namespaces/org-a/machines/m1"


async def test_throttled_call_waits_as_told_then_succeeds(apiserver):
    server, api = apiserver
    server.answer("GET", "/api/v1/nodes", (429, {"Retry-After": "0"}, {}),
                  (200, {}, {"items": [{"metadata": {"name": "host-1"}}]}))
    assert await api.list(core_path(None, "nodes")) == [{"metadata": {"name": "host-1"}}]
    assert len(server.seen) == 2
    assert all(s["auth"] == "Bearer token-1" for s in server.seen)


async def test_throttled_beyond_the_retries_is_an_error(apiserver):
    server, api = apiserver
    server.answer("GET", "/api/v1/nodes", *[(429, {"Retry-After": "0"}, {})] * (THROTTLE_RETRIES + 1))
    with pytest.raises(ApiException) as err:
        await api.list(core_path(None, "nodes"))
    assert err.value.status == 429
    assert len(server.seen) == THROTTLE_RETRIES + 1


async def test_missing_and_existing_objects(apiserver):
    server, api = apiserver
    path = core_path("org-a", "secrets", "s")
    assert await api.get(path, missing_ok=True) is None
    with pytest.raises(ApiException) as err:
        await api.get(path)
    assert err.value.status == 404
    await api.delete(path, missing_ok=True)
    server.answer("POST", core_path("org-a", "secrets"), (409, {}, {}), (409, {}, {}))
    assert await api.create(core_path("org-a", "secrets"), {"metadata": {"name": "s"}}, exists_ok=True) is None
    with pytest.raises(ApiException) as err:
        await api.create(core_path("org-a", "secrets"), {"metadata": {"name": "s"}})
    assert err.value.status == 409


async def test_create_or_get_hands_back_the_existing_object_on_conflict(apiserver):
    server, api = apiserver
    collection, body = core_path("org-a", "secrets"), {"metadata": {"name": "s"}, "data": {"k": "mine"}}
    server.answer("POST", collection, (201, {}, body), (409, {}, {}), (409, {}, {}))
    server.answer("GET", f"{collection}/s", (200, {}, {"metadata": {"name": "s"}, "data": {"k": "theirs"}}))
    assert (await api.create_or_get(collection, body))["data"] == {"k": "mine"}
    assert (await api.create_or_get(collection, body))["data"] == {"k": "theirs"}
    assert await api.create_or_get(collection, body) is None  # conflicted, then gone before the read
    assert [s["method"] for s in server.seen] == ["POST", "POST", "GET", "POST", "GET"]


async def test_patch_kinds_and_query(apiserver):
    server, api = apiserver
    pod, machine = core_path("org-a", "pods", "p"), custom_path("org-a", "machines", "m")
    for path in (pod, machine, machine + "/status"):
        server.answer("PATCH", path, (200, {}, {}))
    server.answer("GET", core_path("org-a", "pods"), (200, {}, {"items": []}))
    await api.patch(pod, {"metadata": {"labels": {"a": "b"}}})
    await api.patch(machine, {"spec": {"x": 1}})
    await api.patch_status(machine, {"status": {"state": "started"}})
    await api.list(core_path("org-a", "pods"), label_selector="kubefly.dev/app=web")
    # Built-in kinds take a strategic merge patch (merge keys, $patch directives); custom resources a JSON merge patch.
    assert [(s["path"], s["type"]) for s in server.seen[:3]] == [
        (pod, "application/strategic-merge-patch+json"),
        (machine, "application/merge-patch+json"),
        (machine + "/status", "application/merge-patch+json"),
    ]
    assert server.seen[3]["query"] == {"labelSelector": "kubefly.dev/app=web"}


def _volume(rv: str, attached: str | None = None) -> dict:
    return {"metadata": {"name": "v", "namespace": "org-a", "resourceVersion": rv}, "status": {"attachedMachine": attached}}


async def test_update_status_retries_a_conflict_on_the_fresh_object(apiserver):
    server, _ = apiserver
    path = custom_path("org-a", "volumes", "v")
    server.answer("GET", path, (200, {}, _volume("1")), (200, {}, _volume("2")))
    server.answer("PATCH", path + "/status", (409, {}, {}), (200, {}, _volume("3", "m1")))
    seen_rv = []

    def mutate(body):
        seen_rv.append(body["metadata"]["resourceVersion"])
        return {"attachedMachine": "m1"}

    assert await common.update_status("volumes", "org-a", "v", mutate) == _volume("3", "m1")
    assert seen_rv == ["1", "2"]
    patches = [s["body"] for s in server.seen if s["method"] == "PATCH"]
    assert [p["metadata"]["resourceVersion"] for p in patches] == ["1", "2"]
    assert patches[-1]["status"] == {"attachedMachine": "m1"}


async def test_update_status_of_a_gone_object_or_with_nothing_to_write(apiserver):
    server, _ = apiserver
    path = custom_path("org-a", "volumes", "v")
    assert await common.update_status("volumes", "org-a", "v", lambda b: {"x": 1}) is None  # 404 on read
    server.answer("GET", path, (200, {}, _volume("1")), (200, {}, _volume("1")))
    server.answer("PATCH", path + "/status", NOT_FOUND)
    assert await common.update_status("volumes", "org-a", "v", lambda b: {"x": 1}) is None  # 404 on write

    async def unchanged(body):  # a coroutine mutate: its verdict may need another read
        return None

    assert await common.update_status("volumes", "org-a", "v", unchanged) == _volume("1")
    assert [s["method"] for s in server.seen].count("PATCH") == 1


async def test_update_status_gives_up_when_it_keeps_changing(apiserver):
    server, _ = apiserver
    path = custom_path("org-a", "volumes", "v")
    server.answer("GET", path, *[(200, {}, _volume(str(i))) for i in range(10)])
    server.answer("PATCH", path + "/status", *[(409, {}, {})] * 10)
    with pytest.raises(kopf.TemporaryError):
        await common.update_status("volumes", "org-a", "v", lambda b: {"x": 1})


async def test_other_errors_are_raised(apiserver):
    server, _ = apiserver
    path = custom_path("org-a", "volumes", "v")
    server.answer("GET", path, (200, {}, _volume("1")))
    server.answer("PATCH", path + "/status", (422, {}, {"reason": "Invalid"}))
    with pytest.raises(ApiException) as err:
        await common.update_status("volumes", "org-a", "v", lambda b: {"x": 1})
    assert err.value.status == 422
