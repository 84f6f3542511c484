"""AppSecret handlers: open the sealed values into a Secret, then roll the app's machines.

Thin: unseal with kubefly.secrets.sealing, write the Secret (create-if-absent,
then patch), report keys and keyed digests in status, and let the `roll`
timer step kubefly.secrets.rollout while status.rollout is present. Values
never reach a log line, an event, or the custom resource: messages name keys.
"""

from __future__ import annotations

import base64
import hashlib
import time

import kopf

from kubefly import API_VERSION, GROUP, VERSION
from kubefly.api.appsecret import AppSecret
from kubefly.conditions import get_condition
from kubefly.controllers import acceptance
from kubefly.controllers.common import condition_patch, update_status
from kubefly.controllers.kubeapi import core_path, custom_path, kube
from kubefly.controllers.main import RECONCILE_SECONDS, RECONCILES
from kubefly.labels import APP, MACHINE, MANAGED_BY, MANAGED_BY_VALUE, PREFIX
from kubefly.secrets import digest, keystore, rollout, sealing

PLURAL = "appsecrets"
APPSECRET_LABEL = f"{PREFIX}/appsecret"
DIGEST_ANNOTATION = f"{PREFIX}/digest"
ROLL_INTERVAL_S = 2.0


@kopf.on.startup()
async def sealing_key(memo: kopf.Memo, logger, **_) -> None:
    memo.sealing_key = await keystore.ensure(kube(), memo.home_namespace)
    logger.info(f"sealing key {sealing.key_id(memo.sealing_key.public_key())} published in "
                f"ConfigMap {memo.home_namespace}/{keystore.NAME}")


def secret_name(appsecret: str) -> str:
    name = f"appsecret-{appsecret}"
    if len(name) <= 253:
        return name
    return f"appsecret-{appsecret[:225]}-{hashlib.sha256(appsecret.encode()).hexdigest()[:16]}"


def _unseal_all(body: dict, private) -> tuple[dict[str, str], dict[str, str]]:
    meta, spec = body["metadata"], body["spec"]
    values, failures = {}, {}
    for key, sealed in sorted((spec.get("data") or {}).items()):
        try:
            values[key] = sealing.unseal(private, sealed, namespace=meta["namespace"], app=spec["app"], key=key)
        except sealing.UnsealError as exc:
            failures[key] = str(exc)
    return values, failures


async def _write_secret(body: dict, values: dict[str, str], set_digest: str) -> str:
    api = kube()
    meta, spec = body["metadata"], body["spec"]
    name = secret_name(meta["name"])
    path = core_path(meta["namespace"], "secrets", name)
    data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
    labels = {MANAGED_BY: MANAGED_BY_VALUE, APP: spec["app"], APPSECRET_LABEL: meta["name"]}
    current = await api.get(path, missing_ok=True)
    if current is None:
        owner = {"apiVersion": API_VERSION, "kind": "AppSecret", "name": meta["name"], "uid": meta["uid"], "controller": True}
        secret = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": meta["namespace"], "labels": labels,
                         "annotations": {DIGEST_ANNOTATION: set_digest}, "ownerReferences": [owner]},
            "data": data,
        }
        current = await api.create_or_get(core_path(meta["namespace"], "secrets"), secret)
    if (current["metadata"].get("annotations") or {}).get(DIGEST_ANNOTATION) == set_digest and (current.get("data") or {}) == data:
        return name
    # Keys removed from the AppSecret are removed from the Secret (null in a merge patch).
    removed = {k: None for k in (current.get("data") or {}) if k not in data}
    await api.patch(path, {
        "metadata": {"labels": labels, "annotations": {DIGEST_ANNOTATION: set_digest}},
        "data": {**removed, **data},
    })
    return name


@kopf.on.resume(GROUP, VERSION, PLURAL, id="appsecret")
@kopf.on.create(GROUP, VERSION, PLURAL, id="appsecret")
@kopf.on.update(GROUP, VERSION, PLURAL, id="appsecret")
async def materialise(body: kopf.Body, memo: kopf.Memo, logger, **_) -> None:
    started = time.monotonic()
    body = dict(body)
    meta = body["metadata"]
    ns, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    result = acceptance.check(AppSecret, body)
    if not result.ok:
        await update_status(PLURAL, ns, name, lambda b: {"conditions": result.conditions(b), "observedGeneration": generation})
        logger.warning(f"AppSecret refused: {result.message}")
        RECONCILES.labels("AppSecret", "invalid").inc()
        return
    values, failures = _unseal_all(body, memo.sealing_key)
    if failures:
        # The Secret keeps its previous values and no machine is rolled.
        message = "; ".join(f"spec.data.{k}: {why}" for k, why in failures.items())
        message += ". Reseal with `kubefly secrets seal` for this cluster, organisation and app"
        await update_status(PLURAL, ns, name, lambda b: condition_patch(b, [
            ("Accepted", True, "SpecValid", result.message),
            ("Ready", False, "DecryptionFailed", message),
        ], {"observedGeneration": generation}))
        logger.warning(f"cannot decrypt {', '.join(f'spec.data.{k}' for k in failures)}; the Secret is left as it was")
        RECONCILES.labels("AppSecret", "undecryptable").inc()
        return
    app = body["spec"]["app"]
    key = digest.digest_key(sealing.private_bytes(memo.sealing_key))
    key_digests = {k: digest.value_digest(key, org=ns, app=app, name=k, value=v) for k, v in values.items()}
    set_digest = digest.set_digest(key_digests)
    secret = await _write_secret(body, values, set_digest)
    staged = bool(body["spec"].get("stage"))
    conditions = [
        ("Accepted", True, "SpecValid", result.message),
        ("Ready", True, "Materialised", f"{len(values)} key(s) in Secret {secret}"),
    ]
    if staged:
        conditions.append(("RolledOut", False, "Staged",
                           "stage: true: machines get these values when they are next updated or created"))
    extra = {"keys": sorted(values), "keyDigests": key_digests, "digest": set_digest, "secretName": secret,
             "observedGeneration": generation}

    def patch(b: dict) -> dict | None:
        out = condition_patch(b, conditions, extra) or {}
        # Every non-staged change starts a roll; the planner finds nothing to
        # do when every started machine already runs these values.
        if not staged and not (b.get("status") or {}).get("rollout"):
            out["rollout"] = {"digest": set_digest}
        if staged and (b.get("status") or {}).get("rollout"):
            out["rollout"] = None
        return out or None

    await update_status(PLURAL, ns, name, patch)
    logger.info(f"Secret {secret} holds keys {', '.join(sorted(values)) or '(none)'} (digest {set_digest})")
    RECONCILES.labels("AppSecret", "materialised").inc()
    RECONCILE_SECONDS.labels("AppSecret").observe(time.monotonic() - started)


async def _machines(namespace: str, app: str) -> list[rollout.MachineView]:
    api = kube()
    pods = await api.list(core_path(namespace, "pods"), label_selector=f"{APP}={app}")
    pod_digest = {
        (p["metadata"].get("labels") or {}).get(MACHINE): (p["metadata"].get("annotations") or {}).get(rollout.DIGEST_ANNOTATION)
        for p in pods if not p["metadata"].get("deletionTimestamp")
    }
    views = []
    for m in await api.list(custom_path(namespace, "machines")):
        spec, status, meta = m.get("spec") or {}, m.get("status") or {}, m["metadata"]
        if spec.get("app") != app or meta.get("deletionTimestamp"):
            continue
        ready = get_condition(status.get("conditions"), "Ready")
        annotated = (meta.get("annotations") or {}).get(rollout.DIGEST_ANNOTATION)
        views.append(rollout.MachineView(
            name=meta["name"],
            # Being replaced or starting is still started: the roll waits for it to be back.
            started=status.get("state") in ("started", "starting", "replacing"),
            ready=bool(ready and ready.get("status") == "True"),
            instance_id=status.get("instanceId"),
            secrets=tuple(spec["secrets"]) if spec.get("secrets") is not None else None,
            # The latest instruction wins over what the pod was built with.
            digest=annotated if annotated is not None else pod_digest.get(meta["name"]),
        ))
    return views


async def _appsecrets(namespace: str, app: str) -> list[rollout.AppSecretView]:
    items = await kube().list(custom_path(namespace, PLURAL))
    return [
        rollout.AppSecretView(s["metadata"]["name"], s["status"]["digest"])
        for s in items
        if (s.get("spec") or {}).get("app") == app and (s.get("status") or {}).get("digest")
        and (s.get("status") or {}).get("secretName")
    ]


def _rolling(status: dict, spec: dict, **_) -> bool:
    return bool(status.get("rollout")) and not spec.get("stage")


@kopf.timer(GROUP, VERSION, PLURAL, id="roll", interval=ROLL_INTERVAL_S, when=_rolling)
async def roll(body: kopf.Body, logger, **_) -> None:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    fresh = await kube().get(custom_path(ns, PLURAL, name), missing_ok=True)
    if fresh is None:
        return
    status = fresh.get("status") or {}
    progress_raw = status.get("rollout")
    if not progress_raw or fresh["spec"].get("stage"):
        return
    app = fresh["spec"]["app"]
    progress = rollout.Progress(progress_raw["machine"], progress_raw.get("fromInstanceId")) if progress_raw.get("machine") else None
    step = rollout.next_step(name, await _appsecrets(ns, app), await _machines(ns, app), progress)
    generation = fresh["metadata"].get("generation")
    if isinstance(step, rollout.Wait):
        message = f"waiting for machine {step.machine} to be Ready as a new instance before the next"
        await update_status(PLURAL, ns, name, lambda b: condition_patch(b, [("RolledOut", False, "Rolling", message)]))
        return
    if isinstance(step, rollout.Roll):
        await kube().patch(custom_path(ns, "machines", step.machine),
                           {"metadata": {"annotations": {rollout.DIGEST_ANNOTATION: step.digest}}})
        message = f"replacing machine {step.machine} with the new values"
        await update_status(PLURAL, ns, name, lambda b: {
            **(condition_patch(b, [("RolledOut", False, "Rolling", message)]) or {}),
            "rollout": {"digest": status["digest"], "machine": step.machine, "fromInstanceId": step.from_instance_id},
        })
        logger.info(f"rolling machine {step.machine} onto secrets digest {step.digest}")
        return
    await update_status(PLURAL, ns, name, lambda b: {
        **(condition_patch(b, [("RolledOut", True, "RolledOut", "every started machine of the app runs these values")]) or {}),
        "rollout": None,
    })
    logger.info(f"secrets digest {status.get('digest')} rolled out to app {app} (generation {generation})")
