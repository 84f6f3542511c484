"""At startup: the Secrets the platform makes for itself exist (kubefly.secrets.platformkeys)."""

from __future__ import annotations

import kopf

from kubefly.controllers.kubeapi import kube
from kubefly.secrets import platformkeys


@kopf.on.startup()
async def platform_keys(memo: kopf.Memo, logger, **_) -> None:
    home = memo.home_namespace
    wanted = [platformkeys.hop_token(home), platformkeys.snapshot_key(home)]
    store = memo.object_store
    if store is not None and store.bundled:
        wanted.append(platformkeys.object_store_credentials(home))
    for secret in wanted:
        made = await platformkeys.ensure(kube(), secret)
        logger.info(f"Secret {home}/{secret['metadata']['name']} {'created' if made else 'present'}")
