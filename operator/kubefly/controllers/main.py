"""The operator's startup settings, and the registry of its handlers.

Each kind's handlers live in controllers/<kind>.py and are registered by
importing that module here. Handlers stay thin: read the object, call a pure
planner, apply, patch status. Importing this module registers everything.
"""

from __future__ import annotations

import logging
import time

import kopf
from prometheus_client import Counter, Histogram

from kubefly import GROUP, VERSION
from kubefly.controllers import acceptance, kubeapi

# Kinds whose controller is not written yet: their spec is only checked and
# acknowledged (condition Accepted). A kind leaves this tuple when its module
# in controllers/ is imported below.
ACCEPT_ONLY: tuple = ()

RECONCILES = Counter("kubefly_reconciles_total", "Reconciles by kind and outcome", ["kind", "outcome"])
RECONCILE_SECONDS = Histogram("kubefly_reconcile_seconds", "Reconcile latency by kind", ["kind"])
# A Volume's copies to and from the object store, as restic timed them (operation: snapshot, restore).
VOLUME_COPY_SECONDS = Histogram("kubefly_volume_copy_seconds", "Snapshot and restore copies, restic's own time",
                                ["operation"], buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 900))
VOLUME_COPY_BYTES = Counter("kubefly_volume_copy_bytes_total",
                            "Bytes a copy moved: new to the store for snapshot, written to the host for restore",
                            ["operation"])
VOLUME_MIGRATIONS = Counter("kubefly_volume_migrations_total", "Volume migrations by outcome (migrated, aborted)",
                            ["outcome"])
VOLUME_MIGRATION_DOWNTIME = Histogram("kubefly_volume_migration_downtime_seconds",
                                      "From the machine asked to stop to its claim on the new host",
                                      buckets=(1, 2.5, 5, 10, 20, 30, 60, 120))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    # kubefly's own names on the objects it touches, not Kopf's defaults.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Events for what a user should see in `kubectl describe`; debug chatter stays in logs.
    settings.posting.level = logging.INFO
    # Watches are re-established regularly so a silently dropped connection cannot stall us.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 20
    # Which replica runs is decided before Kopf starts (controllers/leadership.py, a Lease), not by Kopf's peering.


def _register_acceptance(resource) -> None:
    kind = resource.__name__
    plural = resource.crd.plural

    def accept(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, **_) -> None:
        started = time.monotonic()
        result = acceptance.check(resource, body)
        patch.status["observedGeneration"] = body.metadata.get("generation")
        patch.status["conditions"] = result.conditions(body)
        if not result.ok:
            logger.warning(f"{kind} refused: {result.message}")
        RECONCILES.labels(kind, "accepted" if result.ok else "invalid").inc()
        RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - started)

    accept.__name__ = accept.__qualname__ = f"accept_{plural}"
    for on in (kopf.on.create, kopf.on.update, kopf.on.resume):
        on(GROUP, VERSION, plural, id="accept")(accept)


for _resource in ACCEPT_ONLY:
    _register_acceptance(_resource)

# Controllers; imported last because they use the metrics above.
from kubefly.controllers import (  # noqa: E402,F401
    appsecret,
    machine,
    migration,
    platformkeys,
    postgresbackup,
    postgrescluster,
    snapshot,
    volume,
)


@kopf.on.cleanup()
async def close_api_client(**_) -> None:
    # Kopf runs cleanup handlers in the order registered: this one after the controllers'.
    await kubeapi.close()
