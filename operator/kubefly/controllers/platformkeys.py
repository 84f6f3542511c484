"""At startup: the Secrets the platform makes for itself exist (kubefly.secrets.platformkeys)."""

from __future__ import annotations

from datetime import UTC, datetime

import kopf

from kubefly.controllers.kubeapi import core_path, kube
from kubefly.objectstore import access
from kubefly.secrets import platformkeys


@kopf.on.startup()
async def platform_keys(memo: kopf.Memo, logger, **_) -> None:
    home = memo.home_namespace
    wanted = [platformkeys.hop_token(home), platformkeys.snapshot_key(home)]
    store = memo.object_store
    if store is not None and store.bundled:
        if not store.service:
            raise kopf.PermanentError("the bundled object store's Service is not named (KUBEFLY_OBJECT_STORE_SERVICE): "
                                      "its TLS certificate must name it")
        wanted += [platformkeys.object_store_credentials(home),
                   platformkeys.object_store_tls(home, store.service, datetime.now(UTC))]
    for secret in wanted:
        await _ensure(home, secret, logger)
    if store is not None and store.bundled:
        # The store's identity file starts with the admin key, whichever replica made that.
        credentials = await kube().get(core_path(home, "secrets", platformkeys.OBJECT_STORE_CREDENTIALS))
        await _ensure(home, access.identities_secret(home, access.admin_keys(credentials), store.bucket), logger)


async def _ensure(home: str, secret: dict, logger) -> None:
    made = await platformkeys.ensure(kube(), secret)
    logger.info(f"Secret {home}/{secret['metadata']['name']} {'created' if made else 'present'}")
