"""At startup: the hop token the chart's proxies mount exists (kubefly.secrets.hoptoken)."""

from __future__ import annotations

import kopf

from kubefly.controllers.kubeapi import kube
from kubefly.secrets import hoptoken


@kopf.on.startup()
async def hop_token(memo: kopf.Memo, logger, **_) -> None:
    made = await hoptoken.ensure(kube(), memo.home_namespace)
    logger.info(f"hop token {'created' if made else 'present'} in Secret {memo.home_namespace}/{hoptoken.NAME}")
