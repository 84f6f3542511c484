import json
import logging

import kopf

from kubefly import logs


def test_stdlib_records_become_json_with_the_kopf_object(capsys):
    logs.configure("INFO", component="operator")
    ref = {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine", "name": "web-1", "uid": "u", "namespace": "org-a"}
    # Kopf's own settings, with its event poster off (it handles "kopf.objects" once kopf is imported).
    settings = kopf.OperatorSettings()
    settings.posting.enabled = False
    logging.getLogger("kopf.objects").info("Handler succeeded.", extra={"k8s_ref": ref, "k8s_skip": False, "settings": settings})
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["event"] == "Handler succeeded."
    assert (line["kind"], line["namespace"], line["name"]) == ("Machine", "org-a", "web-1")
    assert line["component"] == "operator" and line["level"] == "info"
    assert "settings" not in line and "k8s_ref" not in line


def test_structlog_loggers_bind_fields(capsys):
    logs.configure("INFO")
    logs.get("kubefly.test", namespace="org-b", name="db").warning("failover", to="db-2")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["namespace"] == "org-b" and line["to"] == "db-2" and line["level"] == "warning"
