"""The Volume admission webhook, served over HTTPS by every operator replica.

Not Kopf's admission server: that runs inside `kopf.run`, which only the
leader reaches (cli/operator_cmd.py waits for the leadership Lease first), and
the Service in front of the webhook selects every operator pod. This server
starts before the election, on its own thread and event loop, so a standby
answers admission requests as well as the leader, and a busy reconcile loop
never delays one.

At startup it takes the shared certificate from a Secret in the operator's
namespace (making or re-issuing it there when needed: admission.tls), only
then listens, and keeps the ValidatingWebhookConfiguration's caBundle equal to
the CA (checked again every minute: `helm upgrade` or a re-install may reset
it). Everything it reads goes through controllers/kubeapi.py's client.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
from datetime import datetime, timezone

import aiohttp
import structlog
from aiohttp import web
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter
from pydantic import ValidationError

from kubefly.admission import tls
from kubefly.admission.volume import ALLOWED, Verdict, response, review, source_of
from kubefly.api.volume import Volume
from kubefly.controllers.kubeapi import KubeAPI, core_path, custom_path, load_config

log = structlog.get_logger("kubefly.admission.server")
REVIEWS = Counter("kubefly_admission_reviews_total", "Admission reviews answered, by outcome "
                  "(allowed, denied, unchecked: an error, so allowed)", ["kind", "outcome"])
VOLUMES_PATH = "/validate/volumes"
WEBHOOK_CONFIGS = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
# Below the webhook's timeoutSeconds (the chart's, 5 s): an answer, rather than the API server giving up.
LOOKUP_TIMEOUT_S = 3.0
RESYNC_S = 60.0
# What an API call may raise: an answer (ApiException), or no answer (aiohttp's own errors are not all OSErrors).
API_ERRORS = (ApiException, OSError, asyncio.TimeoutError, aiohttp.ClientError)


class AdmissionWebhook:
    def __init__(self, *, port: int, namespace: str, secret: str, config: str | None, hosts: list[str],
                 bind: str = "0.0.0.0"):
        self.port, self.namespace, self.secret, self.config = port, namespace, secret, config
        self.hosts, self.bind = hosts, bind
        self.ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bundle: tls.Bundle | None = None
        self._ctx: ssl.SSLContext | None = None
        self._config_missing_said = False

    # -- lifecycle --

    def start(self) -> "AdmissionWebhook":
        self._thread = threading.Thread(target=self._run, name="admission-webhook", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except Exception:
            # Never take the operator down with it: Volumes are still checked by the reconcile.
            log.exception("the admission webhook stopped", port=self.port)
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self.api = KubeAPI(load_config())
        runner = None
        try:
            while self._bundle is None:
                try:
                    await self._refresh_certificate()
                except API_ERRORS as exc:
                    log.warning("cannot set up the webhook certificate yet; retrying", error=str(exc),
                                secret=f"{self.namespace}/{self.secret}")
                    if await self._sleep(5):
                        return
            app = web.Application()
            app.router.add_post(VOLUMES_PATH, self._validate_volume)
            app.router.add_get("/healthz", self._healthz)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, self.bind, self.port, ssl_context=self._ctx).start()
            self.ready.set()
            log.info("admission webhook serving", port=self.port, path=VOLUMES_PATH, hosts=self.hosts,
                     config=self.config or "(none: not registered by this process)")
            while True:
                await self._sync_ca_bundle()
                if await self._sleep(RESYNC_S):
                    return
                try:
                    await self._refresh_certificate()
                except API_ERRORS as exc:
                    log.warning("cannot re-read the webhook certificate", error=str(exc))
        finally:
            if runner is not None:
                await runner.cleanup()
            await self.api.close()

    async def _sleep(self, seconds: float) -> bool:
        """Wait; True if asked to stop meanwhile."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    # -- TLS --

    async def _refresh_certificate(self) -> None:
        """Take the shared pair from the Secret; make or re-issue it there when it will not do."""
        path = core_path(self.namespace, "secrets", self.secret)
        for _ in range(5):
            current = await self.api.get(path, missing_ok=True)
            stored = tls.Bundle.from_secret(current)
            why = tls.renewal(stored, self.hosts, datetime.now(timezone.utc))
            if why is None:
                self._use(stored)
                return
            try:
                kept = stored.hosts() if stored else []
            except ValueError:
                kept = []
            hosts = list(dict.fromkeys([*self.hosts, *kept]))
            fresh = tls.issue(hosts, datetime.now(timezone.utc), stored)
            body = {"metadata": {"name": self.secret, "namespace": self.namespace,
                                 "labels": {"app.kubernetes.io/managed-by": "kubefly",
                                            "app.kubernetes.io/component": "admission-webhook"}},
                    "type": "kubernetes.io/tls", "data": fresh.secret_data()}
            try:
                if current is None:
                    if await self.api.create(core_path(self.namespace, "secrets"), body, exists_ok=True) is None:
                        continue  # another replica made it first: use theirs
                else:
                    # On the version read: a replica that re-issued it meanwhile wins, and we read theirs.
                    body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                    await self.api.patch(path, body)
            except ApiException as exc:
                if exc.status == 409:
                    continue
                raise
            log.info("webhook certificate issued", why=why, hosts=hosts, secret=f"{self.namespace}/{self.secret}")
            self._use(fresh)
            return
        raise ApiException(status=409, reason=f"Secret {self.namespace}/{self.secret} kept changing while it was written")

    def _use(self, bundle: tls.Bundle) -> None:
        if bundle == self._bundle:
            return
        ctx = self._ctx or ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # From memory, not a file: the container's root filesystem is read-only, and the key
        # should not sit on a disk anyway. A context takes a new pair for new connections.
        fd = os.memfd_create("kubefly-webhook-tls")
        try:
            os.write(fd, bundle.tls_key + bundle.tls_crt)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        self._ctx, self._bundle = ctx, bundle

    async def _sync_ca_bundle(self) -> None:
        """The webhook configuration trusts our CA: patch every webhook in it whose caBundle differs."""
        if not self.config or self._bundle is None:
            return
        path = f"{WEBHOOK_CONFIGS}/{self.config}"
        want = self._bundle.ca_bundle
        try:
            cfg = await self.api.get(path, missing_ok=True)
            if cfg is None:
                if not self._config_missing_said:
                    log.warning("no ValidatingWebhookConfiguration to register the webhook in", name=self.config)
                    self._config_missing_said = True
                return
            self._config_missing_said = False
            stale = [w["name"] for w in cfg.get("webhooks") or [] if (w.get("clientConfig") or {}).get("caBundle") != want]
            if stale:
                # A strategic merge patch merges webhooks by name: only their caBundle changes.
                await self.api.request("PATCH", path, {"webhooks": [{"name": n, "clientConfig": {"caBundle": want}}
                                                                    for n in stale]},
                                       content_type="application/strategic-merge-patch+json")
                log.info("webhook caBundle set", config=self.config, webhooks=stale)
        except API_ERRORS as exc:
            log.warning("cannot set the webhook caBundle", config=self.config, error=str(exc))

    # -- requests --

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _validate_volume(self, request: web.Request) -> web.Response:
        try:
            req = (await request.json()).get("request") or {}
        except ValueError:
            return web.json_response({"error": "not an AdmissionReview"}, status=400)
        try:
            verdict, outcome = await asyncio.wait_for(self._review_volume(req), LOOKUP_TIMEOUT_S), None
        except Exception as exc:  # an API error or timeout: fail open, as the webhook's failurePolicy does
            log.warning("could not check a Volume's source; allowed", error=repr(exc),
                        volume=f"{req.get('namespace')}/{req.get('name')}")
            verdict, outcome = Verdict(True, warnings=(
                "kubefly could not check this Volume's source now; the operator checks it when it reconciles "
                "(condition Restored)",)), "unchecked"
        REVIEWS.labels("Volume", outcome or ("allowed" if verdict.allowed else "denied")).inc()
        if not verdict.allowed:
            log.info("Volume refused at admission", volume=f"{req.get('namespace')}/{req.get('name')}",
                     reason=verdict.reason, message=verdict.message)
        return web.json_response(response(req.get("uid", ""), verdict, req.get("name") or ""))

    async def _review_volume(self, req: dict) -> Verdict:
        obj = req.get("object") or {}
        if req.get("operation") != "CREATE" or obj.get("kind") != "Volume":
            return ALLOWED
        namespace = req.get("namespace") or (obj.get("metadata") or {}).get("namespace")
        try:
            volume = Volume.model_validate({k: obj[k] for k in ("apiVersion", "metadata", "spec") if k in obj})
        except ValidationError:
            return ALLOWED  # the schema is the API server's to enforce; the reconcile reports the rest (Accepted)
        wanted = source_of(volume)
        if wanted is None:
            return ALLOWED
        found = await self.api.get(custom_path(namespace, wanted.plural, wanted.name), missing_ok=True)
        return review(volume, namespace, found)
