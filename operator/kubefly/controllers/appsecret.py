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
from kubernetes.client.exceptions import ApiException

from kubefly import API_VERSION, GROUP, VERSION
from kubefly.api.appsecret import AppSecret
from kubefly.conditions import get_condition
from kubefly.controllers import acceptance
from kubefly.controllers.main import RECONCILE_SECONDS, RECONCILES
from kubefly.controllers.common import condition_patch, kube_api, update_status
from kubefly.labels import APP, MACHINE, MANAGED_BY, MANAGED_BY_VALUE, PREFIX
from kubefly.secrets import digest, keystore, rollout, sealing

PLURAL = "appsecrets"
APPSECRET_LABEL = f"{PREFIX}/appsecret"
DIGEST_ANNOTATION = f"{PREFIX}/digest"
ROLL_INTERVAL_S = 2.0


@kopf.on.startup()
def sealing_key(memo: kopf.Memo, logger, **_) -> None:
    memo.sealing_key = keystore.ensure(kube_api()[0], memo.home_namespace)
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


def _write_secret(body: dict, values: dict[str, str], set_digest: str) -> str:
    core = kube_api()[0]
    meta, spec = body["metadata"], body["spec"]
    name = secret_name(meta["name"])
    data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
    labels = {MANAGED_BY: MANAGED_BY_VALUE, APP: spec["app"], APPSECRET_LABEL: meta["name"]}
    try:
        current = core.read_namespaced_secret(name, meta["namespace"])
    except ApiException as exc:
        if exc.status != 404:
            raise
        current = None
    if current is None:
        owner = {"apiVersion": API_VERSION, "kind": "AppSecret", "name": meta["name"], "uid": meta["uid"], "controller": True}
        secret = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": meta["namespace"], "labels": labels,
                         "annotations": {DIGEST_ANNOTATION: set_digest}, "ownerReferences": [owner]},
            "data": data,
        }
        try:
            core.create_namespaced_secret(meta["namespace"], secret)
            return name
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = core.read_namespaced_secret(name, meta["namespace"])
    if (current.metadata.annotations or {}).get(DIGEST_ANNOTATION) == set_digest and (current.data or {}) == data:
        return name
    # Keys removed from the AppSecret are removed from the Secret (null in a merge patch).
    removed = {k: None for k in (current.data or {}) if k not in data}
    core.patch_namespaced_secret(name, meta["namespace"], {
        "metadata": {"labels": labels, "annotations": {DIGEST_ANNOTATION: set_digest}},
        "data": {**removed, **data},
    })
    return name


@kopf.on.resume(GROUP, VERSION, PLURAL, id="appsecret")
@kopf.on.create(GROUP, VERSION, PLURAL, id="appsecret")
@kopf.on.update(GROUP, VERSION, PLURAL, id="appsecret")
def materialise(body: kopf.Body, memo: kopf.Memo, logger, **_) -> None:
    started = time.monotonic()
    body = dict(body)
    meta = body["metadata"]
    ns, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    result = acceptance.check(AppSecret, body)
    if not result.ok:
        update_status(PLURAL, ns, name, lambda b: {"conditions": result.conditions(b), "observedGeneration": generation})
        logger.warning(f"AppSecret refused: {result.message}")
        RECONCILES.labels("AppSecret", "invalid").inc()
        return
    values, failures = _unseal_all(body, memo.sealing_key)
    if failures:
        # The Secret keeps its previous values and no machine is rolled.
        message = "; ".join(f"spec.data.{k}: {why}" for k, why in failures.items())
        message += ". Reseal with `kubefly secrets seal` for this cluster, organisation and app"
        update_status(PLURAL, ns, name, lambda b: condition_patch(b, [
            ("Accepted", True, "SpecValid", result.message),
            ("Ready", False, "DecryptionFailed", message),
        ], {"observedGeneration": generation}))
        logger.warning(f"cannot decrypt {', '.join(f'spec.data.{k}' for k in failures)}; the Secret is left as it was")
        RECONCILES.labels("AppSecret", "undecryptable").inc()
        return
    app = body["spec"]["app"]
    key = digest.digest_key(sealing.private_bytes(memo.sealing_key))
    key_digests = {k: digest.value_digest(key, app=app, name=k, value=v) for k, v in values.items()}
    set_digest = digest.set_digest(key_digests)
    secret = _write_secret(body, values, set_digest)
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

    update_status(PLURAL, ns, name, patch)
    logger.info(f"Secret {secret} holds keys {', '.join(sorted(values)) or '(none)'} (digest {set_digest})")
    RECONCILES.labels("AppSecret", "materialised").inc()
    RECONCILE_SECONDS.labels("AppSecret").observe(time.monotonic() - started)


def _machines(namespace: str, app: str) -> list[rollout.MachineView]:
    core, custom = kube_api()
    pods = core.list_namespaced_pod(namespace, label_selector=f"{APP}={app}").items
    pod_digest = {
        (p.metadata.labels or {}).get(MACHINE): (p.metadata.annotations or {}).get(rollout.DIGEST_ANNOTATION)
        for p in pods if p.metadata.deletion_timestamp is None
    }
    views = []
    for m in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "machines")["items"]:
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


def _appsecrets(namespace: str, app: str) -> list[rollout.AppSecretView]:
    items = kube_api()[1].list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    return [
        rollout.AppSecretView(s["metadata"]["name"], s["status"]["digest"])
        for s in items
        if (s.get("spec") or {}).get("app") == app and (s.get("status") or {}).get("digest")
        and (s.get("status") or {}).get("secretName")
    ]


def _rolling(status: dict, spec: dict, **_) -> bool:
    return bool(status.get("rollout")) and not spec.get("stage")


@kopf.timer(GROUP, VERSION, PLURAL, id="roll", interval=ROLL_INTERVAL_S, when=_rolling)
def roll(body: kopf.Body, logger, **_) -> None:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    try:
        fresh = kube_api()[1].get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    status = fresh.get("status") or {}
    progress_raw = status.get("rollout")
    if not progress_raw or fresh["spec"].get("stage"):
        return
    app = fresh["spec"]["app"]
    progress = rollout.Progress(progress_raw["machine"], progress_raw.get("fromInstanceId")) if progress_raw.get("machine") else None
    step = rollout.next_step(name, _appsecrets(ns, app), _machines(ns, app), progress)
    generation = fresh["metadata"].get("generation")
    if isinstance(step, rollout.Wait):
        message = f"waiting for machine {step.machine} to be Ready as a new instance before the next"
        update_status(PLURAL, ns, name, lambda b: condition_patch(b, [("RolledOut", False, "Rolling", message)]))
        return
    if isinstance(step, rollout.Roll):
        kube_api()[1].patch_namespaced_custom_object(
            GROUP, VERSION, ns, "machines", step.machine,
            {"metadata": {"annotations": {rollout.DIGEST_ANNOTATION: step.digest}}},
        )
        message = f"replacing machine {step.machine} with the new values"
        update_status(PLURAL, ns, name, lambda b: {
            **(condition_patch(b, [("RolledOut", False, "Rolling", message)]) or {}),
            "rollout": {"digest": status["digest"], "machine": step.machine, "fromInstanceId": step.from_instance_id},
        })
        logger.info(f"rolling machine {step.machine} onto secrets digest {step.digest}")
        return
    update_status(PLURAL, ns, name, lambda b: {
        **(condition_patch(b, [("RolledOut", True, "RolledOut", "every started machine of the app runs these values")]) or {}),
        "rollout": None,
    })
    logger.info(f"secrets digest {status.get('digest')} rolled out to app {app} (generation {generation})")
