"""AppSecrets on the real control plane: the cluster key, `kubefly secrets seal`, the
Secret next to the machines, values never in the CR, logs or events, decryption
failures, and rolling the app's started machines one at a time (or not, staged).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

KUBEFLY = Path(sys.executable).with_name("kubefly")

pytestmark = pytest.mark.usefixtures("operator")
VALUE = "hunter2-correct-horse-battery"


def get(kube, *args):
    proc = kube.kubectl(*args, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def cond(obj, type_):
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def seal(kube, namespace, *args) -> dict:
    proc = subprocess.run([str(KUBEFLY), "secrets", "seal", "-n", namespace, *args], capture_output=True, text=True,
                          env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)})
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def wait_appsecret(kube, namespace, name, what, pred, timeout=60):
    def probe():
        s = get(kube, "-n", namespace, "get", "appsecret", name)
        return s if s and pred(s) else None
    return kube.wait_for(f"appsecret {name}: {what}", probe, timeout=timeout)


def materialised(digest=None):
    def pred(s):
        c = cond(s, "Ready")
        return c and c["status"] == "True" and (digest is None or s["status"]["digest"] != digest)
    return pred


def secret_values(kube, namespace, name):
    secret = get(kube, "-n", namespace, "get", "secret", name)
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}, secret


def test_sealed_values_open_into_a_secret_and_appear_nowhere_else(kube, namespace, operator):
    # The operator publishes the public sealing key shortly after it starts, not at once.
    key = kube.wait_for("the sealing key ConfigMap", lambda: get(
        kube, "-n", kube.release_namespace, "get", "configmap", "kubefly-sealing-key"))
    assert len(base64.b64decode(key["data"]["publicKey"])) == 32
    manifest = seal(kube, namespace, "--app", "web", "DATABASE_URL=" + VALUE, "MODE=prod")
    text = json.dumps(manifest)
    assert VALUE not in text
    kube.kubectl("apply", "-f", "-", input=text)
    s = wait_appsecret(kube, namespace, "web", "Ready", materialised())
    st = s["status"]
    assert st["keys"] == ["DATABASE_URL", "MODE"]
    assert all(len(d) == 16 for d in st["keyDigests"].values()) and len(st["digest"]) == 16
    values, secret = secret_values(kube, namespace, st["secretName"])
    assert values == {"DATABASE_URL": VALUE, "MODE": "prod"}
    assert secret["metadata"]["labels"]["kubefly.dev/app"] == "web"
    owner = secret["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "AppSecret" and owner["uid"] == s["metadata"]["uid"]
    assert VALUE not in json.dumps(s)
    assert VALUE not in operator.logs()
    assert VALUE not in kube.kubectl("get", "events", "-A", "-o", "json").stdout
    table = kube.kubectl("-n", namespace, "get", "appsecrets").stdout
    assert st["digest"] in table

    # A key removed from the AppSecret leaves the Secret; a changed value changes its digest only.
    changed = seal(kube, namespace, "--app", "web", "DATABASE_URL=other")
    kube.kubectl("apply", "-f", "-", input=json.dumps(changed))
    s2 = wait_appsecret(kube, namespace, "web", "new digest", materialised(st["digest"]))
    assert s2["status"]["keys"] == ["DATABASE_URL"]
    assert s2["status"]["keyDigests"]["DATABASE_URL"] != st["keyDigests"]["DATABASE_URL"]
    assert secret_values(kube, namespace, st["secretName"])[0] == {"DATABASE_URL": "other"}


def test_a_value_that_does_not_open_is_named_and_the_secret_is_untouched(kube, namespace):
    good = seal(kube, namespace, "--app", "web", "A=1", "B=2")
    kube.kubectl("apply", "-f", "-", input=json.dumps(good))
    s = wait_appsecret(kube, namespace, "web", "Ready", materialised())
    before = get(kube, "-n", namespace, "get", "secret", s["status"]["secretName"])
    # B sealed for another app, pasted into this one: it must not open here.
    moved = seal(kube, namespace, "--app", "api", "B=stolen")
    good["spec"]["data"]["B"] = moved["spec"]["data"]["B"]
    good["spec"]["data"]["A"] = seal(kube, namespace, "--app", "web", "A=changed")["spec"]["data"]["A"]
    kube.kubectl("apply", "-f", "-", input=json.dumps(good))
    failed = wait_appsecret(kube, namespace, "web", "DecryptionFailed",
                            lambda x: (cond(x, "Ready") or {}).get("reason") == "DecryptionFailed")
    message = cond(failed, "Ready")["message"]
    assert "spec.data.B" in message and "spec.data.A" not in message and "app web" in message
    after = get(kube, "-n", namespace, "get", "secret", s["status"]["secretName"])
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert failed["status"]["digest"] == s["status"]["digest"]


def machine(kube, namespace, name):
    manifest = {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine", "metadata": {"name": name, "namespace": namespace},
                "spec": {"app": "web", "region": "ams", "image": "nginx:1.27"}}
    kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def machines(kube, namespace):
    return {m["metadata"]["name"]: m for m in get(kube, "-n", namespace, "get", "machines")["items"]}


def settled(m):
    c = cond(m, "Ready")
    return (m.get("status") or {}).get("state") == "started" and c and c["status"] == "True"


def test_a_change_rolls_started_machines_one_at_a_time_and_a_staged_one_does_not(kube, namespace):
    first = seal(kube, namespace, "--app", "web", "TOKEN=v1")
    kube.kubectl("apply", "-f", "-", input=json.dumps(first))
    wait_appsecret(kube, namespace, "web", "Ready", materialised())
    for name in ("web-1", "web-2", "web-3"):
        machine(kube, namespace, name)
    kube.wait_for("three started machines", lambda: len(ms := machines(kube, namespace)) == 3 and all(map(settled, ms.values())),
                  timeout=90)
    kube.wait_for("no roll in progress", lambda: not get(kube, "-n", namespace, "get", "appsecret", "web")["status"].get("rollout"))
    before = {n: m["status"]["instanceId"] for n, m in machines(kube, namespace).items()}
    old_digest = get(kube, "-n", namespace, "get", "appsecret", "web")["status"]["digest"]

    # Watch while rolling: at no moment may two machines be out of service for the roll.
    in_flight_max, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            ms = machines(kube, namespace)
            out = sum(1 for m in ms.values() if not settled(m) or m["status"].get("instanceId") is None)
            in_flight_max[0] = max(in_flight_max[0], out)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    second = seal(kube, namespace, "--app", "web", "TOKEN=v2")
    kube.kubectl("apply", "-f", "-", input=json.dumps(second))
    s = wait_appsecret(kube, namespace, "web", "rolled out",
                       lambda x: (cond(x, "RolledOut") or {}).get("status") == "True" and not x["status"].get("rollout")
                       and x["status"]["digest"] != old_digest, timeout=180)
    stop.set()
    watcher.join()
    after = machines(kube, namespace)
    assert all(after[n]["status"]["instanceId"] != before[n] for n in before), "every started machine is a new instance"
    assert all(after[n]["metadata"]["annotations"]["kubefly.dev/secrets-digest"] == s["status"]["digest"] for n in after)
    assert in_flight_max[0] <= 1, f"{in_flight_max[0]} machines were being replaced at once"

    # Staged: the Secret changes, the machines do not.
    staged = seal(kube, namespace, "--app", "web", "--stage", "TOKEN=v3")
    kube.kubectl("apply", "-f", "-", input=json.dumps(staged))
    s3 = wait_appsecret(kube, namespace, "web", "staged", lambda x: x["status"]["digest"] != s["status"]["digest"])
    assert cond(s3, "RolledOut")["reason"] == "Staged"
    assert secret_values(kube, namespace, s3["status"]["secretName"])[0] == {"TOKEN": "v3"}
    time.sleep(6)  # three roll intervals: long enough for a roll to have started if one were going to
    assert {n: m["status"]["instanceId"] for n, m in machines(kube, namespace).items()} == \
        {n: m["status"]["instanceId"] for n, m in after.items()}
