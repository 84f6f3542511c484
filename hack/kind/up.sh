#!/usr/bin/env bash
# `make kind-up`: kind-config.yaml's cluster on Docker with real kubelets, and
# kubefly installed in it by Helm from its own images.
#
#   hack/kind/up.sh [--name NAME] [--port-offset N]
#
# KUBEFLY_KIND_NODE_IMAGE=kind uses kind's own node image and CNI (a machine
# that reaches registry.k8s.io and docker.io); the default builds the node
# image here (hack/kind/node-image.sh). Prints the kubeconfig path last.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
name=$(awk '/^name:/ {print $2}' "$repo/kind-config.yaml")
port_offset=0
while [ $# -gt 0 ]; do
  case $1 in
    --name) name=$2; shift 2 ;;
    --port-offset) port_offset=$2; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
t0=$SECONDS
release=kubefly ns=kubefly-system
kubeconfig="$kcache/$name.kubeconfig"

[ "${KUBEFLY_DOCKER_READY:-}" = 1 ] || bash "$repo/hack/kind/docker.sh"
bash "$repo/hack/build-tools.sh" k8s kind helm >/dev/null

# Only what this machine needs goes on top of kind-config.yaml.
overlay=(--name "$name" --port-offset "$port_offset")
node_image=""
if [ "${KUBEFLY_KIND_NODE_IMAGE:-local}" = local ]; then
  node_image=$(bash "$repo/hack/kind/node-image.sh")
  overlay+=(--node-image "$node_image")
fi
[ -f /sys/fs/cgroup/cgroup.controllers ] || overlay+=(--cgroup-v1)
config="$kcache/$name.kind-config.yaml"
"$repo/.venv/bin/python" "$repo/hack/kind/overlay.py" --out "$config" "${overlay[@]}"
log "cluster $name: ${node_image:-the kind project node image}; cgroup $([ -f /sys/fs/cgroup/cgroup.controllers ] && echo v2 || echo 'v1 (failCgroupV1: false)'); config $config"

kubectl() { command kubectl --kubeconfig "$kubeconfig" "$@"; }
if kind get clusters 2>/dev/null | grep -qx "$name" && kubectl get --raw /readyz >/dev/null 2>&1; then
  log "cluster $name already running"
else
  kind delete cluster --name "$name" >/dev/null 2>&1 || true
  timed "kind create cluster $name" kind create cluster --config "$config" --kubeconfig "$kubeconfig" >&2
  if [ -n "$node_image" ]; then
    pod_cidr=$(kubectl -n kube-system get cm kubeadm-config -o jsonpath='{.data.ClusterConfiguration}' | awk '/podSubnet:/ {print $2}')
    sed -e "s|@IMAGE@|kubefly/flannel:$FLANNEL_VERSION|" -e "s|@POD_CIDR@|$pod_cidr|" \
      -e "s|@CONTROL_PLANE@|$name-control-plane|" "$repo/hack/kind/flannel.yaml" | kubectl apply -f - >/dev/null
  fi
  # A worker's Node object can appear after `kind create` returns (kubelet registration under load).
  want=$(grep -c -- '- role:' "$config")
  for _ in $(seq 120); do [ "$(kubectl get nodes -o name 2>/dev/null | wc -l)" -ge "$want" ] && break; sleep 1; done
  timed "nodes Ready" kubectl wait --for=condition=Ready node --all --timeout=180s >/dev/null
  [ "$(kubectl get nodes -o name | wc -l)" -ge "$want" ] || die "only $(kubectl get nodes -o name | wc -l) of $want nodes registered"
  kubectl -n kube-system rollout status deployment/coredns --timeout=180s >/dev/null
fi

# Service CIDR traffic that no kube-proxy rule rewrote is refused on the node
# instead of leaving toward the real network (hack/kind/node/service-cidr-guard.sh);
# a systemd unit in each node applies it again whenever the node boots.
svc_cidr=$(kubectl -n kube-system get cm kubeadm-config -o jsonpath='{.data.ClusterConfiguration}' | awk '/serviceSubnet:/ {print $2}')
[ -n "$svc_cidr" ] || die "no serviceSubnet in the cluster's kubeadm-config"
for node in $(kind get nodes --name "$name"); do
  docker cp "$repo/hack/kind/node/service-cidr-guard.sh" "$node:/usr/local/sbin/kubefly-service-cidr-guard"
  docker cp "$repo/hack/kind/node/kubefly-service-cidr-guard.service" "$node:/etc/systemd/system/"
  docker exec "$node" sh -c "echo SERVICE_CIDR=$svc_cidr > /etc/default/kubefly-service-cidr-guard &&
    systemctl daemon-reload && systemctl enable -q kubefly-service-cidr-guard && systemctl restart kubefly-service-cidr-guard" \
    || die "could not guard the Service CIDR $svc_cidr on $node"
done
log "Service CIDR $svc_cidr: refused on every node unless kube-proxy rewrote it"

# kubefly's images, loaded into every node (no registry between them).
declare -A img
while IFS='=' read -r k v; do img[$k]=$v; done < <(bash "$repo/hack/kind/kubefly-images.sh")
# Workers only: the control plane is tainted against kubefly's pods. The bundled
# object store is the exception: it runs on the control plane (a toleration), since
# tests stop workers and the snapshots in it must outlive any of them.
workers=$(kind get nodes --name "$name" | grep -v control-plane | paste -sd, -)
worker_images=(); for k in "${!img[@]}"; do [ "$k" = objectstore ] || worker_images+=("${img[$k]}"); done
timed "kind load ${worker_images[*]}" kind load docker-image --name "$name" --nodes "$workers" "${worker_images[@]}" >/dev/null
timed "kind load ${img[objectstore]}" kind load docker-image --name "$name" --nodes "$name-control-plane" "${img[objectstore]}" >/dev/null

# The agents reach the API server at its own address (as kube-proxy does), so a worker
# that boots lists its machines before its kube-proxy has written the Service rules.
apiserver=$(kubectl get endpointslices -n default -l kubernetes.io/service-name=kubernetes \
  -o jsonpath='{.items[0].endpoints[0].addresses[0]}:{.items[0].ports[0].port}')
values=(--set "image.repository=${img[kubefly]%%:*}" --set "image.tag=${img[kubefly]#*:}" --set image.pullPolicy=Never
        --set agent.enabled=true --set proxy.enabled=true --set dns.enabled=true --set operator.replicas=2
        --set "agent.apiServer=$apiserver")
[ -n "${img[postgres]:-}" ] && values+=(--set "postgres.image=${img[postgres]}")
values+=(--set objectStore.bundled.enabled=true --set "objectStore.bundled.image=${img[objectstore]}"
         --set-json 'objectStore.bundled.nodeSelector={"node-role.kubernetes.io/control-plane":""}'
         --set-json 'objectStore.bundled.tolerations=[{"key":"node-role.kubernetes.io/control-plane","operator":"Exists","effect":"NoSchedule"}]')
timed "helm install" helm --kubeconfig "$kubeconfig" upgrade --install "$release" "$repo/charts/kubefly" \
  --namespace "$ns" --create-namespace "${values[@]}" --wait --timeout 180s >/dev/null
kubectl -n "$ns" rollout status "deployment/$release-operator" --timeout=120s >/dev/null
# Running is not healthy: the operator's own /healthz answers, through the API server's pod proxy.
healthy() {
  local pod; pod=$(kubectl -n "$ns" get pods -l app.kubernetes.io/component=operator \
    --field-selector=status.phase=Running -o jsonpath='{.items[0].metadata.name}' 2>/dev/null) || return 1
  [ -n "$pod" ] && kubectl get --raw "/api/v1/namespaces/$ns/pods/$pod:8080/proxy/healthz" >/dev/null 2>&1
}
for _ in $(seq 60); do healthy && break; sleep 2; done
healthy || die "the operator is not healthy; kubectl -n $ns logs deploy/$release-operator says:
$(kubectl -n "$ns" logs "deploy/$release-operator" --tail=20 2>&1)"
# The images by role, for the tests and for users' Machines.
printf '%s\n' "${!img[@]}" | while read -r k; do echo "$k=${img[$k]}"; done > "$kcache/$name.images"
log "kubefly on kind ($name) up in $((SECONDS - t0))s"
echo "$kubeconfig"
