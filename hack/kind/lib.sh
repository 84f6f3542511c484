# Shared by hack/kind/*.sh: cache layout, stamps, logging. Sourced, not run.
# shellcheck shell=bash
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../../versions.env
source "$repo/versions.env"
cache=${KUBEFLY_CACHE:-$HOME/.cache/kubefly}
kcache="$cache/kind"
bin="$cache/bin"
mkdir -p "$kcache/logs" "$kcache/stamps" "$kcache/bin"
export PATH="$bin:$PATH" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false

log() { printf '[kind] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo

# key PARTS...: a short hash of strings and file contents (files are read when
# the part names an existing file). Image caches are keyed by their inputs.
key() {
  local p
  for p in "$@"; do if [ -f "$p" ]; then cat "$p"; else printf '%s\n' "$p"; fi; done | sha256sum | cut -c1-16
}
fresh() { [ -f "$kcache/stamps/$1" ] && [ "$(cat "$kcache/stamps/$1")" = "$2" ]; }
stamp() { echo "$2" > "$kcache/stamps/$1"; }

# timed WHAT CMD...: run CMD, log its duration, record it in $kcache/timings.log.
timed() {
  local what=$1 t0=$SECONDS; shift
  "$@"
  log "$what: $((SECONDS - t0))s"
  echo "$(date -u +%FT%TZ) $what $((SECONDS - t0))s load=$(cut -d' ' -f1 /proc/loadavg)" >> "$kcache/timings.log"
}

# image_exists REF: the local Docker daemon has REF.
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# The capability bounding set of this machine lacks CAP_SYS_RESOURCE (bit 24):
# runc then needs runc-kubefly in front of it (hack/kind/runc-wrapper).
needs_runc_wrapper() {
  local mask; mask=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
  (( (16#$mask >> 24 & 1) == 0 ))
}

# runc_wrapper: build runc-kubefly (static, standard library only) into the
# cache, keyed by its source; prints its path.
runc_wrapper() {
  local src="$repo/hack/kind/runc-wrapper" out="$kcache/bin/runc-kubefly"
  local k; k=$(key "$src/main.go" "$src/go.mod" "$(go env GOVERSION)")
  if ! fresh runc-kubefly "$k" || [ ! -x "$out" ]; then
    (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$out" .) >&2
    stamp runc-kubefly "$k"
  fi
  echo "$out"
}

# debian_base: a Debian $DEBIAN_SUITE minbase image built with debootstrap
# (no registry is needed), imported into Docker; prints its tag. Every image
# kubefly builds locally starts from it.
debian_base() {
  local mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  local k; k=$(key "$DEBIAN_SUITE" "$mirror" "$(declare -f debian_base)")
  local tag="kubefly/debian:$DEBIAN_SUITE-$k"
  if fresh debian-base "$k" && image_exists "$tag"; then echo "$tag"; return; fi
  local root="$kcache/build/rootfs-$DEBIAN_SUITE"
  $sudo rm -rf "$root"; mkdir -p "$root"
  timed "debootstrap $DEBIAN_SUITE minbase" $sudo debootstrap --variant=minbase "$DEBIAN_SUITE" "$root" "$mirror" \
    >>"$kcache/logs/debootstrap.log" 2>&1 || die "debootstrap failed; see $kcache/logs/debootstrap.log"
  # apt inside images sees the same suites as a Debian image from a registry would.
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s-security %s-security main\n' \
    "$mirror" "$DEBIAN_SUITE" "$mirror" "$DEBIAN_SUITE" "${mirror%/debian}/debian" "$DEBIAN_SUITE" \
    | $sudo tee "$root/etc/apt/sources.list" >/dev/null
  $sudo rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
  $sudo tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["bash"]' - "$tag" >/dev/null
  docker tag "$tag" "kubefly/debian:$DEBIAN_SUITE"
  $sudo rm -rf "$root"
  stamp debian-base "$k"
  echo "$tag"
}

# go_bin NAME VERSION PKG [LDFLAGS]: `go install PKG@VERSION` (static) into
# $kcache/bin/NAME-VERSION, cached by version and Go version; prints the path.
go_bin() {
  local name=$1 version=$2 pkg=$3 ld=${4:-}
  local out="$kcache/bin/$name-$version" k; k=$(key "$version" "$(go env GOVERSION)" "$ld")
  if ! fresh "go-$name-$version" "$k" || [ ! -x "$out" ]; then
    local w="$kcache/build/$name-$version"; rm -rf "$w"; mkdir -p "$w"
    GOBIN="$w" CGO_ENABLED=0 timed "go install $name $version" go install -trimpath -ldflags "-s -w $ld" "$pkg@$version" >&2 \
      || die "go install $pkg@$version failed"
    mv "$w/$(basename "${pkg%/v[0-9]*}")" "$out"; rm -rf "$w"
    stamp "go-$name-$version" "$k"
  fi
  echo "$out"
}
