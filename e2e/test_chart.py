"""The Helm chart: lint, install, least-privilege RBAC, CRDs kept on uninstall."""

import json
import urllib.request

import pytest
import yaml

CRDS = ["machines.kubefly.dev", "volumes.kubefly.dev", "appsecrets.kubefly.dev", "postgresclusters.kubefly.dev",
        "snapshots.kubefly.dev", "postgresbackups.kubefly.dev"]


def sa_user(kube) -> str:
    return f"system:serviceaccount:{kube.release_namespace}:{kube.service_account}"


def test_chart_lints_strict(kube):
    proc = kube.helm("lint", "--strict", str(kube.chart), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_values_schema_refuses_a_typo(kube):
    proc = kube.helm("template", "x", str(kube.chart), "--set", "operator.replica=2", check=False)
    assert proc.returncode != 0
    assert "replica" in proc.stderr


def test_install_created_the_storage_class_the_operator_names(kube):
    from kubefly.volumes.objects import STORAGE_CLASS

    sc = json.loads(kube.kubectl("get", "storageclass", STORAGE_CLASS, "-o", "json").stdout)
    assert sc["provisioner"] == "kubernetes.io/no-provisioner"
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"


def test_install_created_crds_that_helm_keeps(kube):
    for name in CRDS:
        crd = json.loads(kube.kubectl("get", "crd", name, "-o", "json").stdout)
        assert crd["metadata"]["annotations"].get("helm.sh/resource-policy") == "keep"
        assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}
        assert "kubefly" in crd["spec"]["names"]["categories"]


def test_operator_identity_can_do_its_work_and_nothing_more(kube):
    def can(verb, resource, *extra):
        return kube.kubectl("auth", "can-i", verb, resource, "--as", sa_user(kube), *extra, check=False).stdout.strip()

    for verb, resource in [
        ("watch", "machines.kubefly.dev"), ("patch", "machines.kubefly.dev/status"),
        ("create", "pods"), ("create", "persistentvolumes"), ("list", "nodes"), ("get", "nodes"), ("create", "events"),
        ("delete", "snapshots.kubefly.dev"), ("update", "snapshots.kubefly.dev"), ("update", "snapshots.kubefly.dev/status"),
        ("create", "postgresbackups.kubefly.dev"), ("patch", "postgresbackups.kubefly.dev/status"),
    ]:
        assert can(verb, resource, "-A") == "yes", f"operator cannot {verb} {resource}"
    # Its leadership Lease, in its own namespace only.
    assert can("update", "leases.coordination.k8s.io/kubefly-operator", "-n", kube.release_namespace) == "yes"
    assert can("update", "leases.coordination.k8s.io/other", "-n", kube.release_namespace) == "no"
    # The Volume webhook's own configuration (its caBundle), and no other.
    hooks = "validatingwebhookconfigurations.admissionregistration.k8s.io"
    assert can("patch", f"{hooks}/{kube.release}-volumes") == "yes"
    assert can("patch", f"{hooks}/other") == "no" and can("create", hooks) == "no"
    for verb, resource in [
        ("delete", "nodes"), ("create", "clusterrolebindings"), ("delete", "customresourcedefinitions"),
        ("create", "deployments"), ("delete", "namespaces"), ("escalate", "clusterroles"),
        ("list", "secrets"), ("watch", "secrets"), ("delete", "secrets"), ("update", "machines.kubefly.dev"),
    ]:
        assert can(verb, resource, "-A") == "no", f"operator may {verb} {resource}, which it never needs"


def test_operator_runs_as_the_service_account_and_reconciles(kube, operator, namespace):
    manifest = {
        "apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine",
        "metadata": {"name": "web-1", "namespace": namespace},
        "spec": {"app": "web", "region": "ams", "image": "nginx:1.27"},
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def observed():
        obj = json.loads(kube.kubectl("-n", namespace, "get", "machine", "web-1", "-o", "json").stdout)
        status = obj.get("status", {})
        return status if status.get("observedGeneration") == obj["metadata"]["generation"] else None

    status = kube.wait_for("the operator to observe the Machine", observed)
    assert any(c["type"] == "Accepted" and c["status"] == "True" for c in status["conditions"])
    # The token really is the ServiceAccount's: a verb outside its role is refused.
    sa = ["--kubeconfig", str(operator.kubeconfig)]
    proc = kube.kubectl(*sa, "delete", "node", "kubefly-worker", "--dry-run=server", check=False)
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower()
    assert kube.kubectl(*sa, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout == sa_user(kube)
    metrics = urllib.request.urlopen(operator.metrics_url, timeout=5).read().decode()
    assert 'kubefly_reconciles_total{kind="Machine",outcome="accepted"}' in metrics
    # Logs are JSON with the object's namespace and name.
    lines = [json.loads(line) for line in operator.logs().splitlines() if line.startswith("{")]
    assert any(namespace in json.dumps(line) and "web-1" in json.dumps(line) for line in lines)


def test_operator_deployment_renders_and_rolls_out(kube):
    rendered = kube.helm("template", kube.release, str(kube.chart), "--namespace", kube.release_namespace, "--set", "operator.replicas=2").stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kube.service_account
    assert pod["containers"][0]["args"][0] == "operator"
    assert deployment["spec"]["replicas"] == 2
    # Applied to the real API server, the manifests are valid (server-side dry run). The webhook
    # configuration installed here calls the local operator by url, this one the Service: it is
    # checked as a new object (applied over the other, a client-side apply would keep both).
    hooks = [d for d in docs if d["kind"] == "ValidatingWebhookConfiguration"]
    rest = [d for d in docs if d["kind"] != "ValidatingWebhookConfiguration"]
    proc = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(rest), check=False)
    assert proc.returncode == 0, proc.stderr
    assert [h["webhooks"][0]["clientConfig"]["service"]["name"] for h in hooks] == [f"{kube.release}-operator-webhook"]
    for hook in hooks:
        hook["metadata"]["name"] += "-dry-run"
        proc = kube.kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(hook), check=False)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.disruptive
def test_uninstall_keeps_crds_and_user_objects_then_reinstall_adopts_them(kube, namespace):
    manifest = {
        "apiVersion": "kubefly.dev/v1alpha1", "kind": "Volume",
        "metadata": {"name": "data", "namespace": namespace},
        "spec": {"app": "web", "region": "ams", "sizeGb": 1},
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    kube.helm("uninstall", kube.release, "--namespace", kube.release_namespace, "--wait")
    for name in CRDS:
        assert kube.kubectl("get", "crd", name, check=False).returncode == 0, f"{name} was deleted by uninstall"
    assert kube.kubectl("-n", namespace, "get", "volume", "data", check=False).returncode == 0
    kube.helm(
        "install", kube.release, str(kube.chart), "--namespace", kube.release_namespace,
        "--set", "operator.enabled=false", "--wait", "--timeout", "120s",
    )
    assert kube.kubectl("get", "clusterrole", f"{kube.release}-operator").returncode == 0


def test_dns_runs_beside_the_agent_behind_a_node_local_service_that_machines_are_given(kube):
    out = kube.helm("template", "x", str(kube.chart), "--namespace", "kf", "--set", "agent.enabled=true",
                    "--set", "dns.enabled=true", "--set", "dns.clusterDomain=corp.example").stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    svc = docs[("Service", "x-kubefly-dns")]["spec"]
    # Local: a Machine's query reaches its own host's resolver (its org and "nearest" are judged there).
    assert svc["internalTrafficPolicy"] == "Local"
    assert {(p["port"], p["targetPort"], p["protocol"]) for p in svc["ports"]} == {(53, 7953, "UDP"), (53, 7953, "TCP")}
    pod = docs[("DaemonSet", "x-kubefly-dns")]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] and pod["containers"][0]["args"][:2] == ["dns", "--agent=http://127.0.0.1:7947"]
    assert "--listen=$(KUBEFLY_HOST_IP):7953" in pod["containers"][0]["args"]
    # No host process may ask unless named: only the host's Machines are answered.
    assert not any(a.startswith("--allow-source") for a in pod["containers"][0]["args"])
    allowed = kube.helm("template", "x", str(kube.chart), "--set", "agent.enabled=true", "--set", "dns.enabled=true",
                        "--set", "dns.allowSources={10.0.0.5/32}").stdout
    assert "- --allow-source=10.0.0.5/32" in allowed
    env = {e["name"]: e.get("value") for e in docs[("Deployment", "x-kubefly-operator")]["spec"]["template"]["spec"]["containers"][0]["env"]}
    # Kubernetes expands the Service link of the operator's own namespace into the ClusterIP.
    assert env["KUBEFLY_MACHINE_DNS"] == "$(X_KUBEFLY_DNS_SERVICE_HOST)" and env["KUBEFLY_CLUSTER_DOMAIN"] == "corp.example"


def test_dns_without_the_agent_is_refused_with_the_fix(kube):
    proc = kube.helm("template", "x", str(kube.chart), "--set", "dns.enabled=true", check=False)
    assert proc.returncode != 0 and "dns.enabled needs agent.enabled" in proc.stderr
    out = kube.helm("template", "x", str(kube.chart)).stdout
    assert "KUBEFLY_MACHINE_DNS" not in out and "x-kubefly-dns" not in out


def test_every_agent_host_runs_a_proxy_and_only_edges_take_clients(kube):
    out = kube.helm("template", "x", str(kube.chart), "--set", "agent.enabled=true", "--set", "proxy.enabled=true",
                    "--set", "agent.nodeSelector.pool=apps", "--set", "postgres.image=registry.example/kubefly-postgres:15").stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    roles = {}
    for name, operator in (("x-kubefly-proxy", "In"), ("x-kubefly-proxy-host", "NotIn")):
        pod = docs[("DaemonSet", name)]["spec"]["template"]["spec"]
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        # The agent's hosts, split by the edge label: together every agent host, each once.
        assert terms == [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["apps"]},
                                               {"key": "kubefly.dev/edge", "operator": operator, "values": ["true"]}]}]
        roles[name] = pod["containers"][0]
    assert "--listen=0.0.0.0:8080" in roles["x-kubefly-proxy"]["args"] and roles["x-kubefly-proxy"]["ports"][0]["hostPort"] == 8080
    assert "--listen=none" in roles["x-kubefly-proxy-host"]["args"] and "ports" not in roles["x-kubefly-proxy-host"]
    # Hops only at the host's own address, with the operator's token mounted (never one the chart rendered).
    for name, c in roles.items():
        assert "--hop-listen=$(KUBEFLY_HOST_IP):4281" in c["args"] and "--hop-token-file=/etc/kubefly/hop/token" in c["args"]
        assert {"name": "KUBEFLY_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}} in c["env"]
        vols = {v["name"]: v for v in docs[("DaemonSet", name)]["spec"]["template"]["spec"]["volumes"]}
        assert vols["hop-token"]["secret"] == {"secretName": "kubefly-hop-token"}
    assert not [d for d in docs if d[0] == "Secret" and d[1] == "kubefly-hop-token"]
    agent = docs[("DaemonSet", "x-kubefly-agent")]["spec"]["template"]["spec"]
    assert "--load-token-file=/etc/kubefly/hop/token" in agent["containers"][0]["args"]
    assert not [a for a in agent["containers"][0]["args"] if a.startswith("--admin-api")]
    assert {"name": "hop-token", "secret": {"secretName": "kubefly-hop-token"}} in agent["volumes"]
    env = {e["name"]: e.get("value") for e in docs[("Deployment", "x-kubefly-operator")]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEFLY_POSTGRES_IMAGE"] == "registry.example/kubefly-postgres:15"
    assert "KUBEFLY_POSTGRES_IMAGE" not in kube.helm("template", "x", str(kube.chart)).stdout


def test_operator_replicas_prefer_distinct_hosts(kube):
    def pod(*sets):
        out = kube.helm("template", "x", str(kube.chart), *[a for s in sets for a in ("--set", s)]).stdout
        docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
        return docs[("Deployment", "x-kubefly-operator")]["spec"]["template"]["spec"]
    assert "affinity" not in pod()
    term = pod("operator.replicas=2")["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == {"app.kubernetes.io/instance": "x", "app.kubernetes.io/component": "operator"}


def test_agents_can_reach_the_api_server_at_its_own_address(kube):
    def agent_env(*sets: str) -> dict:
        args = [a for s in sets for a in ("--set", s)]
        out = kube.helm("template", "x", str(kube.chart), "--set", "agent.enabled=true", *args).stdout
        docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
        return {e["name"]: e.get("value") for e in docs[("DaemonSet", "x-kubefly-agent")]["spec"]["template"]["spec"]["containers"][0]["env"]}

    # Default: the in-cluster Service (Kubernetes sets KUBERNETES_SERVICE_HOST itself).
    assert "KUBERNETES_SERVICE_HOST" not in agent_env()
    env = agent_env("agent.apiServer=172.18.0.2:6443")
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("172.18.0.2", "6443")
    env = agent_env("agent.apiServer=[fd00::2]:6443")
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("fd00::2", "6443")
    proc = kube.helm("template", "x", str(kube.chart), "--set", "agent.enabled=true", "--set", "agent.apiServer=no-port",
                     check=False)
    assert proc.returncode != 0 and "apiServer" in proc.stderr


def test_admission_policies_bind_each_process_to_its_service_account_and_the_volume_root(kube):
    from kubefly.volumes.objects import HOST_ROOT, build_pv

    def render(*sets):
        out = kube.helm("template", "x", str(kube.chart), "--namespace", "kf", *[a for s in sets for a in ("--set", s)]).stdout
        return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}

    docs = render("agent.enabled=true", "proxy.enabled=true")
    policies = {name: d["spec"] for (kind, name), d in docs.items() if kind == "ValidatingAdmissionPolicy"}
    assert set(policies) == {"x-kubefly-proxy-autostart", "x-kubefly-operator-volumes", "x-kubefly-agent-own-host"}
    for name, spec in policies.items():
        assert spec["failurePolicy"] == "Fail"
        assert docs[("ValidatingAdmissionPolicyBinding", name)]["spec"] == {"policyName": name, "validationActions": ["Deny"]}
    users = {name: spec["matchConditions"][0]["expression"] for name, spec in policies.items()}
    assert users["x-kubefly-proxy-autostart"] == "request.userInfo.username == 'system:serviceaccount:kf:x-kubefly-proxy'"
    assert users["x-kubefly-agent-own-host"] == "request.userInfo.username == 'system:serviceaccount:kf:x-kubefly-agent'"
    assert users["x-kubefly-operator-volumes"] == "request.userInfo.username == 'system:serviceaccount:kf:x-kubefly'"
    # Each policy names the ServiceAccount its process runs as.
    assert docs[("DaemonSet", "x-kubefly-proxy")]["spec"]["template"]["spec"]["serviceAccountName"] == "x-kubefly-proxy"
    assert docs[("DaemonSet", "x-kubefly-agent")]["spec"]["template"]["spec"]["serviceAccountName"] == "x-kubefly-agent"
    assert docs[("Deployment", "x-kubefly-operator")]["spec"]["template"]["spec"]["serviceAccountName"] == "x-kubefly"
    # The chart's volume root is the operator's, and it checks the labels the PV planner sets.
    volumes = yaml.safe_dump(policies["x-kubefly-operator-volumes"])
    assert f"'{HOST_ROOT}/'" in volumes
    pv_labels = build_pv(namespace="n", volume="v", uid="u", app="a", region="r", host="h", size_gb=1)["metadata"]["labels"]
    for label in pv_labels:
        assert f"'{label}'" in volumes, f"the PV policy does not check label {label}"

    # Without the proxy or agent there is no ServiceAccount to narrow; without rbac.create, no policies at all.
    assert {name for kind, name in render() if kind == "ValidatingAdmissionPolicy"} == {"x-kubefly-operator-volumes"}
    assert not [k for k in render("rbac.create=false", "agent.enabled=true", "proxy.enabled=true") if k[0].startswith("ValidatingAdmission")]


PIN = "objectStore.bundled.nodeSelector.kubernetes\\.io/hostname=kubefly-worker"


def test_the_bundled_object_store_runs_pinned_with_its_data_on_the_host_and_the_operator_is_told_where(kube):
    ns = kube.release_namespace
    out = kube.helm("template", "x", str(kube.chart), "--namespace", ns, "--set", "objectStore.bundled.enabled=true",
                    "--set", PIN, "--set", "image.pullPolicy=Never", "--set", "objectStore.bucket=copies",
                    "--set-json", 'objectStore.bundled.tolerations=[{"key":"node-role.kubernetes.io/control-plane",'
                                  '"operator":"Exists","effect":"NoSchedule"}]').stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    deployment = docs[("Deployment", "x-kubefly-objectstore")]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": "kubefly-worker"}
    assert pod["tolerations"] == [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["hostPath"] == {"path": "/var/lib/kubefly/objectstore", "type": "DirectoryOrCreate"}
    # The identity file and the TLS pair come from Secrets the operator makes; the chart renders none.
    # Whole-volume mounts (no subPath), so the kubelet refreshes s3.json in place on a grant.
    assert volumes["identities"]["secret"] == {"secretName": "kubefly-objectstore-identities",
                                               "items": [{"key": "s3.json", "path": "s3.json"}]}
    assert volumes["tls"]["secret"] == {"secretName": "kubefly-objectstore-tls",
                                        "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]}
    assert not [k for k in docs if k[0] == "Secret"]
    containers = {c["name"]: c for c in pod["containers"]}
    for c in [*containers.values(), *pod["initContainers"]]:
        assert c["image"] == "kubefly-objectstore:0.1.0" and c["imagePullPolicy"] == "Never"
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    store = containers["objectstore"]
    assert {"name": "identities", "mountPath": "/etc/kubefly-objectstore", "readOnly": True} in store["volumeMounts"]
    assert {"name": "tls", "mountPath": "/etc/kubefly-objectstore-tls", "readOnly": True} in store["volumeMounts"]
    assert not [m for c in containers.values() for m in c.get("volumeMounts", []) if "subPath" in m]
    assert {"name": "KUBEFLY_OBJECTSTORE_BUCKET", "value": "copies"} in store["env"]
    assert store["securityContext"]["runAsUser"] == 65532 and store["securityContext"]["runAsNonRoot"]
    # Only the init step is root, and it may only chown the data directory.
    init = pod["initContainers"][0]
    assert init["command"] == ["chown", "65532:65532", "/data"] and init["securityContext"]["capabilities"]["add"] == ["CHOWN"]
    # S3 leaves the pod through the relays, plain and TLS; metrics are scraped from the store.
    assert containers["s3"]["args"] == ["relay"] and containers["s3"]["ports"] == [{"name": "s3", "containerPort": 8333}]
    assert containers["s3-https"]["args"] == ["relay", "8443", "8444"]
    assert containers["s3-https"]["ports"] == [{"name": "s3-https", "containerPort": 8443}]
    assert not containers["s3-https"].get("volumeMounts")  # TLS is the store's own; the relay holds no key
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9327"
    assert {"name": "metrics", "containerPort": 9327} in store["ports"]
    svc = docs[("Service", "x-kubefly-objectstore")]["spec"]
    assert svc["ports"] == [{"name": "s3", "port": 8333, "targetPort": "s3"},
                            {"name": "s3-https", "port": 8443, "targetPort": "s3-https"}]
    assert svc["selector"] == deployment["spec"]["selector"]["matchLabels"]

    env = {e["name"]: e.get("value") for e in docs[("Deployment", "x-kubefly-operator")]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEFLY_OBJECT_STORE_ENDPOINT"] == f"http://x-kubefly-objectstore.{ns}.svc:8333"
    assert env["KUBEFLY_OBJECT_STORE_BUCKET"] == "copies"
    assert env["KUBEFLY_OBJECT_STORE_SECRET"] == "kubefly-objectstore-credentials"
    assert env["KUBEFLY_OBJECT_STORE_BUNDLED"] == "true"
    assert "KUBEFLY_OBJECT_STORE_REGION" not in env
    # What its certificate names, and how Postgres members reach it over TLS.
    assert env["KUBEFLY_OBJECT_STORE_SERVICE"] == "x-kubefly-objectstore"
    assert env["KUBEFLY_OBJECT_STORE_HTTPS_ENDPOINT"] == f"https://x-kubefly-objectstore.{ns}.svc:8443"
    assert env["KUBEFLY_OBJECT_STORE_CA_SECRET"] == "kubefly-objectstore-tls"
    # Applied to the real API server, the store's manifests are valid (server-side dry run).
    store = yaml.safe_dump_all([docs[("Deployment", "x-kubefly-objectstore")], docs[("Service", "x-kubefly-objectstore")]])
    proc = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=store, check=False)
    assert proc.returncode == 0, proc.stderr


def test_an_external_object_store_is_passed_to_the_operator_and_no_store_is_run(kube):
    def render(*sets: str) -> tuple[dict, list]:
        out = kube.helm("template", "x", str(kube.chart), *[a for s in sets for a in ("--set", s)]).stdout
        docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
        env = docs[("Deployment", "x-kubefly-operator")]["spec"]["template"]["spec"]["containers"][0]["env"]
        return {e["name"]: e.get("value") for e in env}, [name for _, name in docs if "objectstore" in name]

    env, stores = render("objectStore.endpoint=https://s3.example.com", "objectStore.region=eu-west-1",
                         "objectStore.credentialsSecret=s3-keys")
    assert (env["KUBEFLY_OBJECT_STORE_ENDPOINT"], env["KUBEFLY_OBJECT_STORE_BUCKET"], env["KUBEFLY_OBJECT_STORE_REGION"],
            env["KUBEFLY_OBJECT_STORE_SECRET"], env["KUBEFLY_OBJECT_STORE_BUNDLED"]) == \
        ("https://s3.example.com", "kubefly", "eu-west-1", "s3-keys", "false")
    assert stores == []
    # An external store is reached over TLS as it is (the operator derives that), trusted by the system CAs.
    assert not {"KUBEFLY_OBJECT_STORE_SERVICE", "KUBEFLY_OBJECT_STORE_HTTPS_ENDPOINT", "KUBEFLY_OBJECT_STORE_CA_SECRET"} & set(env)
    # The default: no store, which the operator reports on every Snapshot.
    env, stores = render()
    assert env["KUBEFLY_OBJECT_STORE_ENDPOINT"] == "" and env["KUBEFLY_OBJECT_STORE_BUNDLED"] == "false"
    assert "KUBEFLY_OBJECT_STORE_REGION" not in env and stores == []


@pytest.mark.parametrize("sets, message", [
    (["objectStore.bundled.enabled=true", PIN, "objectStore.endpoint=https://s3.example.com",
      "objectStore.credentialsSecret=k"], "set one"),
    (["objectStore.endpoint=https://s3.example.com"], "needs objectStore.credentialsSecret"),
    (["objectStore.bundled.enabled=true", PIN, "objectStore.credentialsSecret=k"], "the operator makes"),
    (["objectStore.bundled.enabled=true"], "nodeSelector must pin the store to one host"),
    (["objectStore.endpoint=https://s3.example.com/kubefly", "objectStore.credentialsSecret=k"], "endpoint"),
])
def test_object_store_settings_that_cannot_work_are_refused_with_the_fix(kube, sets, message):
    proc = kube.helm("template", "x", str(kube.chart), *[a for s in sets for a in ("--set", s)], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr

