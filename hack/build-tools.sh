#!/usr/bin/env bash
# Builds the pinned Kubernetes tool binaries from the Go module proxy (no other
# download source is reachable here) and caches them outside the repo, keyed by
# tool version and Go version, so a warm machine skips this entirely.
#
#   hack/build-tools.sh [k8s|k8s_node|etcd|kwok|helm|kind|buildx|all]...   (default: k8s etcd kwok helm)
#
# Prints the bin directory as its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../versions.env
source "$here/versions.env"

cache=${KUBEFLY_CACHE:-$HOME/.cache/kubefly}
gover=$(go env GOVERSION)
bin="$cache/bin"
mkdir -p "$bin" "$cache/build"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local

log() { printf '[build-tools] %s\n' "$*" >&2; }

# stamp FILE KEY: a tool is fresh when its stamp holds the same key.
fresh() { [ -f "$bin/.$1.stamp" ] && [ "$(cat "$bin/.$1.stamp")" = "$2" ]; }
stamp() { echo "$2" > "$bin/.$1.stamp"; }

# timed WHAT CMD...: run CMD and log how long WHAT took.
timed() { local what=$1 t0=$SECONDS; shift; "$@"; log "$what built in $((SECONDS - t0))s"; }

# k8s_module CMD...: the throw-away wrapper module that pins k/k's staging
# modules to their tags, with go.sum entries for each k8s.io/kubernetes/cmd/CMD.
# Prints its directory.
k8s_module() {
  local w="$cache/build/k8s-$KUBERNETES_VERSION"
  if [ ! -f "$w/.pinned" ]; then
    rm -rf "$w"; mkdir -p "$w"
    ( cd "$w"
      go mod init kubefly.dev/build/k8s >/dev/null 2>&1
      go mod edit -go=1.26.0
      # k/k's go.mod replaces every staging module with a local path; pin each
      # one to its published tag instead (derived from the .mod, which changes per minor).
      local gomod staging
      gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
      staging=$(grep -oE 'k8s\.io/[A-Za-z0-9._-]+ => \./staging/' "$gomod" | awk '{print $1}' | sort -u)
      [ -n "$staging" ] || { log "no staging replaces found in $gomod"; exit 1; }
      for m in $staging; do go mod edit "-replace=$m=$m@$KUBERNETES_STAGING_VERSION"; done
      touch .pinned ) >&2 || exit 1
  fi
  ( cd "$w"
    for c in "$@"; do go get "k8s.io/kubernetes/cmd/$c@$KUBERNETES_VERSION" >/dev/null 2>&1 || go get "k8s.io/kubernetes/cmd/$c@$KUBERNETES_VERSION"; done
    if grep -q ' v0.0.0$' go.mod; then log "unreplaced v0.0.0 requirement left in go.mod"; grep ' v0.0.0$' go.mod >&2; exit 1; fi ) >&2 || exit 1
  echo "$w"
}

# k8s_build CMD...: stamped (version-reporting) static builds into $bin.
k8s_build() {
  local w; w=$(k8s_module "$@") || exit 1
  cd "$w"
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  for c in "$@"; do
    timed "$c" go build -trimpath -ldflags "$ld" -o "$bin/$c" "k8s.io/kubernetes/cmd/$c"
  done
}

build_k8s() {
  local key="$KUBERNETES_VERSION $gover"
  fresh k8s "$key" && return 0
  log "kubernetes $KUBERNETES_VERSION (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl): cold build takes ~9 min on 2 cores"
  # shellcheck disable=SC2086 # EXTRA_K8S_CMDS is a word list
  k8s_build kube-apiserver kube-controller-manager kube-scheduler kubectl ${EXTRA_K8S_CMDS:-}
  stamp k8s "$key"
}

# The node-side binaries a kind node image needs (the kind tier only).
build_k8s_node() {
  local key="$KUBERNETES_VERSION $gover"
  fresh k8s-node "$key" && return 0
  log "kubernetes $KUBERNETES_VERSION node binaries (kubelet, kubeadm, kube-proxy): ~2 min after the control plane's"
  k8s_build kubelet kubeadm kube-proxy
  stamp k8s-node "$key"
}

build_etcd() {
  local key="$ETCD_VERSION $gover"
  fresh etcd "$key" && return 0
  log "etcd $ETCD_VERSION"
  local w="$cache/build/etcd-$ETCD_VERSION"
  rm -rf "$w"; mkdir -p "$w"; cd "$w"
  go mod init kubefly.dev/build/etcd >/dev/null 2>&1
  go mod edit -go=1.26.0
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" "go.etcd.io/etcd/etcdctl/v3@$ETCD_VERSION" >/dev/null 2>&1
  timed etcd go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
  timed etcdctl go build -trimpath -ldflags "-s -w" -o "$bin/etcdctl" go.etcd.io/etcd/etcdctl/v3
  stamp etcd "$key"
}

build_kwok() {
  local key="$KWOK_VERSION $gover"
  fresh kwok "$key" && return 0
  log "kwok $KWOK_VERSION"
  GOBIN="$bin" timed kwok go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
  stamp kwok "$key"
}

build_helm() {
  local key="$HELM_VERSION $gover $KUBERNETES_VERSION"
  fresh helm "$key" && return 0
  log "helm $HELM_VERSION"
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ld="$ld -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
  ld="$ld -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
  GOBIN="$bin" timed helm go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  stamp helm "$key"
}

build_kind() {
  local key="$KIND_VERSION $gover"
  fresh kind "$key" && return 0
  log "kind $KIND_VERSION"
  GOBIN="$bin" timed kind go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kind@$KIND_VERSION"
  stamp kind "$key"
}

# docker-buildx: the BuildKit client (`docker build --secret`); Debian
# bookworm's docker.io ships without it. Installed as a CLI plugin by hack/kind/docker.sh.
build_buildx() {
  local key="$BUILDX_VERSION $gover"
  fresh buildx "$key" && return 0
  log "buildx $BUILDX_VERSION"
  local w="$cache/build/buildx-$BUILDX_VERSION"
  rm -rf "$w"; mkdir -p "$w"
  GOBIN="$w" timed buildx go install -trimpath -ldflags "-s -w -X github.com/docker/buildx/version.Version=$BUILDX_VERSION" "github.com/docker/buildx/cmd/buildx@$BUILDX_VERSION"
  mv "$w/buildx" "$bin/docker-buildx"
  stamp buildx "$key"
}

command -v go >/dev/null || { log "go is required (Go >= $GO_MIN_VERSION)"; exit 1; }
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(k8s etcd kwok helm)
[ "${targets[*]}" = all ] && targets=(k8s k8s_node etcd kwok helm kind buildx)
t0=$SECONDS
for t in "${targets[@]}"; do ( "build_$t" ); done
log "tools ready in $((SECONDS - t0))s"
echo "$bin"
