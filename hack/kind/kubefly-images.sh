#!/usr/bin/env bash
# Builds kubefly's images without pulling: the kubefly image (operator, agent,
# proxy, dns), the Postgres member image when docker/postgres.Dockerfile
# exists, the bundled object store's image, and the test app image, all on the
# local Debian base (debootstrap).
# Builds that reach PyPI get this machine's CA bundle as a BuildKit secret,
# never a layer. Tags are content hashes, so an unchanged tree is not rebuilt
# and a changed one never reuses a stale image.
# Prints "NAME=IMAGE" lines: kubefly, testapp[, postgres], objectstore.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$repo"
base=$(debian_base)
cacert=${KUBEFLY_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
secret=(); [ -s "$cacert" ] && secret=(--secret "id=cacert,src=$cacert")

# tree_key PATHS...: a hash of the files under PATHS (tracked or not) and the base.
tree_key() {
  find "$@" -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 | sort -z \
    | xargs -0 sha256sum | { cat; echo "$base"; } | sha256sum | cut -c1-12
}
# build NAME DOCKERFILE TAG [ARGS...]: the Dockerfile's `# syntax=` line is
# dropped (it names a frontend image to pull; dockerd's built-in one suffices).
build() {
  local name=$1 file=$2 tag=$3; shift 3
  if image_exists "$tag"; then log "$name image $tag (cached)"; return; fi
  sed '/^# *syntax=/d' "$file" | DOCKER_BUILDKIT=1 timed "$name image" \
    docker build -q -f - --build-arg "BASE_IMAGE=$base" "${secret[@]}" "$@" -t "$tag" . >/dev/null
  # Earlier builds of the same image are superseded (nodes keep their loaded copies).
  docker images --format '{{.Repository}}:{{.Tag}}' "${tag%%:*}" | grep -vx "$tag" | xargs -r docker rmi >/dev/null 2>&1 || true
}

kubefly="kubefly:$(sed -nE 's/^version = "(.*)"/\1/p' pyproject.toml)-$(tree_key pyproject.toml README.md operator/kubefly docker/kubefly.Dockerfile)"
build kubefly docker/kubefly.Dockerfile "$kubefly"
echo "kubefly=$kubefly"

testapp="kubefly-testapp:${kubefly#kubefly:}"
build testapp hack/kind/images/testapp.Dockerfile "$testapp" --build-arg "KUBEFLY_IMAGE=$kubefly"
echo "testapp=$testapp"

if [ -f docker/postgres.Dockerfile ]; then
  postgres="kubefly-postgres:$POSTGRES_MAJOR-$(tree_key docker/postgres.Dockerfile operator/kubefly pyproject.toml)"
  build postgres docker/postgres.Dockerfile "$postgres"
  echo "postgres=$postgres"
fi

objectstore="kubefly-objectstore:$SEAWEEDFS_VERSION-$(tree_key docker/objectstore.Dockerfile docker/objectstore-entrypoint.sh)"
build objectstore docker/objectstore.Dockerfile "$objectstore" --build-arg "SEAWEEDFS_VERSION=$SEAWEEDFS_VERSION"
echo "objectstore=$objectstore"
