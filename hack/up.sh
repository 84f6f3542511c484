#!/usr/bin/env bash
# `make up`: the platform on kind (real pods on real kubelets, the operator in
# the cluster) wherever Docker can run or be installed and started; otherwise
# on the local control plane (real API server, simulated hosts from
# kind-config.yaml) with the operator as a local process acting as the chart's
# ServiceAccount. KUBEFLY_UP=kind|local chooses explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${KUBEFLY_UP:-auto}
tools_bin=$(bash hack/link-cli.sh)  # kubefly, kubectl, helm and kind, in one directory

# What to do next, the same whichever cluster `make up` chose.
try_next() {
  cat <<MSG

Try:
  export KUBECONFIG=$kubeconfig PATH=$tools_bin:\$PATH
  kubectl create namespace my-org
  kubefly secrets seal --app web -n my-org GREETING=hello | kubectl apply -f -
  $apply_machine
  kubectl -n my-org apply -f examples/postgrescluster.yaml
  kubectl get kubefly -A

Stop everything with: make down
MSG
}

if [ "$mode" = kind ] || { [ "$mode" = auto ] && bash hack/kind/docker.sh; }; then
  [ "$mode" = auto ] && export KUBEFLY_DOCKER_READY=1  # checked just now
  kubeconfig=$(bash hack/kind/up.sh | tail -n 1)
  export KUBECONFIG=$kubeconfig
  # The example Machine runs the test app that was just loaded, under the tag that follows the tree.
  testapp=$(sed -n 's/^testapp=//p' "${kubeconfig%.kubeconfig}.images")
  apply_machine="sed 's|kubefly-testapp:make-up|$testapp|' examples/machine.yaml | kubectl -n my-org apply -f -"
  kubectl get machines -A
  cat <<MSG

kubefly is up on kind: hosts $(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{range .items[*]}{.metadata.name}({.metadata.labels.topology\.kubernetes\.io/region}) {end}')
  operator: deployment/kubefly-operator in kubefly-system (kubectl -n kubefly-system logs deploy/kubefly-operator)
MSG
  try_next
  exit 0
fi
[ "$mode" = auto ] && printf '[up] Docker cannot run here: using the local control plane\n'
apply_machine="kubectl -n my-org apply -f examples/machine.yaml"  # simulated hosts pull no image
PY=.venv/bin/python
state=.cluster
release=kubefly
ns=kubefly-system
health_port=${KUBEFLY_HEALTH_PORT:-29180}
metrics_port=${KUBEFLY_METRICS_PORT:-29190}
# The Volume admission webhook: the local kube-apiserver calls the local operator here (docs/volumes.md).
webhook_port=${KUBEFLY_WEBHOOK_PORT:-29143}
mkdir -p "$state"
say() { printf '[up] %s\n' "$*"; }

kubeconfig=$($PY -m kubefly.devcluster up | tail -n 1)
export KUBECONFIG=$kubeconfig

say "installing the chart (CRDs, RBAC, ServiceAccount; the operator runs locally)"
helm upgrade --install "$release" charts/kubefly --namespace "$ns" --create-namespace \
  --set operator.enabled=false --set "operator.webhook.url=https://127.0.0.1:$webhook_port/validate/volumes" \
  --wait --timeout 120s >/dev/null

if [ -f "$state/operator.pid" ] && kill -0 "$(cat "$state/operator.pid")" 2>/dev/null; then
  say "stopping the previous operator (pid $(cat "$state/operator.pid"))"
  kill "$(cat "$state/operator.pid")"; sleep 1
fi
$PY -m kubefly.devcluster sa-kubeconfig --namespace "$ns" --service-account "$release" \
  --out "$state/operator.kubeconfig" >/dev/null
KUBECONFIG="$state/operator.kubeconfig" setsid nohup .venv/bin/kubefly operator \
  --health-port "$health_port" --metrics-port "$metrics_port" --webhook-port "$webhook_port" \
  --webhook-host 127.0.0.1 --webhook-config "$release-volumes" --webhook-secret "$release-webhook-tls" \
  >>"$state/operator.log" 2>&1 < /dev/null &
echo $! > "$state/operator.pid"

for _ in $(seq 60); do
  if curl -fsS "http://127.0.0.1:$health_port/healthz" >/dev/null 2>&1; then break; fi
  kill -0 "$(cat "$state/operator.pid")" 2>/dev/null || { say "the operator exited; last lines of $state/operator.log:"; tail -n 20 "$state/operator.log"; exit 1; }
  sleep 1
done
curl -fsS "http://127.0.0.1:$health_port/healthz" >/dev/null || { say "operator not healthy after 60s; see $state/operator.log"; exit 1; }

kubectl get machines -A
cat <<MSG

kubefly is up: a local control plane with hosts $(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}({.metadata.labels.topology\.kubernetes\.io/region}) {end}')
  operator: pid $(cat "$state/operator.pid"), logs $state/operator.log, /healthz :$health_port, /metrics :$metrics_port
MSG
try_next
