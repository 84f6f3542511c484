#!/usr/bin/env bash
# Builds kubefly's kind node image with no container registry: a Debian rootfs
# from debootstrap with Debian's containerd, runc and CNI plugins, kind's own
# base files (from the kind module), kubelet/kubeadm/kubectl built from the Go
# module proxy, runc-kubefly, and every image the cluster needs preloaded into
# containerd: the images `kubeadm config images list` names (built from the
# proxy at those versions), flannel, and the kube-proxy image.
# Cached by the versions and build files that go into it. Prints the image tag.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
here="$repo/hack/kind"

k8sbin=$(bash "$repo/hack/build-tools.sh" k8s k8s_node kind | tail -n 1)
mapfile -t kubeadm_images < <("$k8sbin/kubeadm" config images list --kubernetes-version "$KUBERNETES_VERSION")
img_tag() { local i; for i in "${kubeadm_images[@]}"; do [[ $i == *"/$1:"* ]] && { echo "${i##*:}"; return; }; done; die "kubeadm names no $1 image"; }
etcd_tag=$(img_tag etcd); coredns_tag=$(img_tag coredns); pause_tag=$(img_tag pause)
gover=$(go env GOVERSION)
kind_mod="$(go env GOMODCACHE)/sigs.k8s.io/kind@$KIND_VERSION"
[ -d "$kind_mod/images/base/files" ] || die "kind's base files are missing from $kind_mod (hack/build-tools.sh kind downloads them)"

node_key=$(key "$KUBERNETES_VERSION" "$KIND_VERSION" "$FLANNEL_VERSION" "$DEBIAN_SUITE" "$gover" "${kubeadm_images[@]}" \
  "$here/node-image.sh" "$here/lib.sh" "$here/images/pause.c" "$here/images/flannel-entrypoint.sh" \
  "$here/runc-wrapper/main.go")
node_image="kubefly/node:$KUBERNETES_VERSION-$node_key"
if fresh node-image "$node_key" && image_exists "$node_image"; then log "node image $node_image (cached)"; echo "$node_image"; exit 0; fi
t_all=$SECONDS
base=$(debian_base)
ctx="$kcache/build/node-image"; rm -rf "$ctx"; mkdir -p "$ctx/images"

# ---- the images the cluster runs, tagged as kubeadm and kind name them ------
# static_image TAG BINARY [ENTRYPOINT]: a one-binary image with no base.
static_image() {
  local tag=$1 binary=$2 entry=${3:-} d; d=$(mktemp -d)
  mkdir -p "$d/usr/local/bin"; cp "$binary" "$d/usr/local/bin/"
  local change=(--change 'ENV PATH=/usr/local/bin')
  [ -n "$entry" ] && change+=(--change "ENTRYPOINT [\"$entry\"]")
  tar -C "$d" -c . | docker import "${change[@]}" - "$tag" >/dev/null
  rm -rf "$d"
}
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  static_image "registry.k8s.io/$c:$KUBERNETES_VERSION" "$k8sbin/$c"
done

# etcd at the version kubeadm pins (3.6.8-0 -> v3.6.8); its go.mod has replace
# lines, so it is built inside a wrapper module (as hack/build-tools.sh does).
etcd_version="v${etcd_tag%-*}"
etcd_out="$kcache/bin/etcd-$etcd_version"
if [ ! -x "$etcd_out" ]; then
  w="$kcache/build/etcd-$etcd_version"; rm -rf "$w"; mkdir -p "$w"
  (cd "$w" && go mod init kubefly.dev/build/etcd >/dev/null 2>&1 && go mod edit -go=1.26.0 \
    && go get "go.etcd.io/etcd/server/v3@$etcd_version" >/dev/null 2>&1 \
    && CGO_ENABLED=0 timed "etcd $etcd_version" go build -trimpath -ldflags "-s -w" -o "$etcd_out.tmp" go.etcd.io/etcd/server/v3) >&2
  mv "$etcd_out.tmp" "$etcd_out"; rm -rf "$w"
fi
d=$(mktemp -d); cp "$etcd_out" "$d/etcd"; static_image "registry.k8s.io/etcd:$etcd_tag" "$d/etcd"; rm -rf "$d"

coredns=$(go_bin coredns "$coredns_tag" github.com/coredns/coredns)
d=$(mktemp -d); cp "$coredns" "$d/coredns"
static_image "registry.k8s.io/coredns/coredns:$coredns_tag" "$d/coredns" /usr/local/bin/coredns; rm -rf "$d"

gcc -static -Os -s -o "$ctx/pause" "$here/images/pause.c"
static_image "registry.k8s.io/pause:$pause_tag" "$ctx/pause" /usr/local/bin/pause
# kind's containerd config names its own sandbox image; it is the same program.
kind_pause=$(sed -nE 's/^\s*sandbox_image = "(.*)"/\1/p' "$kind_mod/images/base/files/etc/containerd/config.toml")
docker tag "registry.k8s.io/pause:$pause_tag" "$kind_pause"

# kube-proxy and flanneld program iptables: Debian's iptables (nft backend, as on the node).
# flanneld from its module, with one line dropped from main.go: the blank
# import of the tencentvpc backend, whose SDK is not on the module proxy
# (kubefly uses host-gw). cgo, as upstream builds it on amd64 (UDP backend);
# the flannel image has glibc.
flanneld="$kcache/bin/flanneld-$FLANNEL_VERSION"
if [ ! -x "$flanneld" ]; then
  src=$(cd "$kcache/build" && go mod download -json "github.com/flannel-io/flannel@$FLANNEL_VERSION" | jq -r .Dir)
  w="$kcache/build/flannel-$FLANNEL_VERSION"; rm -rf "$w"; cp -r "$src" "$w"; chmod -R u+w "$w"
  sed -i '\|_ "github.com/flannel-io/flannel/pkg/backend/tencentvpc"|d' "$w/main.go"
  (cd "$w" && CGO_ENABLED=1 timed "flanneld $FLANNEL_VERSION" go build -trimpath \
    -ldflags "-s -w -X github.com/flannel-io/flannel/pkg/version.Version=$FLANNEL_VERSION" -o "$flanneld.tmp" .) >&2 \
    || die "building flanneld failed"
  mv "$flanneld.tmp" "$flanneld"; rm -rf "$w"
fi
cp "$k8sbin/kube-proxy" "$flanneld" "$here/images/flannel-entrypoint.sh" "$ctx/images/"
cat > "$ctx/images/Dockerfile" <<DOCKERFILE
FROM $base AS netbase
RUN apt-get update && apt-get install -y --no-install-recommends iptables nftables conntrack iproute2 kmod \\
 && rm -rf /var/lib/apt/lists/*

FROM netbase AS kube-proxy
COPY kube-proxy /usr/local/bin/kube-proxy

FROM netbase AS flannel
COPY $(basename "$flanneld") /opt/bin/flanneld
COPY flannel-entrypoint.sh /opt/bin/entrypoint
RUN chmod 0755 /opt/bin/entrypoint /opt/bin/flanneld
ENV PATH=/opt/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENTRYPOINT ["/opt/bin/entrypoint"]
DOCKERFILE
timed "kube-proxy image" docker build -q --target kube-proxy -t "registry.k8s.io/kube-proxy:$KUBERNETES_VERSION" "$ctx/images" >/dev/null
timed "flannel image" docker build -q --target flannel -t "kubefly/flannel:$FLANNEL_VERSION" "$ctx/images" >/dev/null
preload=("${kubeadm_images[@]}" "$kind_pause" "kubefly/flannel:$FLANNEL_VERSION")

# ---- the node: kind's base image, made from Debian packages ------------------
mkdir -p "$ctx/node/bin"
cp -r "$kind_mod/images/base/files" "$ctx/node/files"; chmod -R u+w "$ctx/node/files"
cp "$k8sbin/kubelet" "$k8sbin/kubeadm" "$k8sbin/kubectl" "$(runc_wrapper)" "$ctx/node/bin/"
cat > "$ctx/node/Dockerfile" <<DOCKERFILE
FROM $base
RUN apt-get update && apt-get install -y --no-install-recommends \\
      systemd systemd-sysv dbus containerd runc containernetworking-plugins \\
      conntrack iptables nftables iproute2 ethtool socat mount util-linux kmod \\
      libseccomp2 procps ca-certificates jq e2fsprogs bash \\
 && rm -rf /var/lib/apt/lists/*
COPY files/ /
# As kind's base image does: only the units kind needs start in the node.
RUN chmod 0755 /usr/local/bin/* /kind/bin/* \\
 && find /lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete \\
 && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \\
          /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \\
          /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/* \\
 && echo ReadKMsg=no >> /etc/systemd/journald.conf \\
 && systemctl enable kubelet.service containerd.service undo-mount-hacks.service \\
 && systemctl mask systemd-binfmt.service \\
 && mkdir -p /etc/kubernetes/manifests /opt/cni \\
 && ln -s /usr/lib/cni /opt/cni/bin \\
 && ln -s /usr/bin/containerd /usr/local/bin/containerd \\
 && ctr oci spec | jq '.hooks.createContainer += [{"path": "/kind/bin/mount-product-files.sh"}] | del(.process.rlimits)' \\
      > /etc/containerd/cri-base.json \\
 && sed -i 's|^\(\s*\)SystemdCgroup = true|&\n\1BinaryName = "/usr/local/sbin/runc-kubefly"|' /etc/containerd/config.toml \\
 && grep -q runc-kubefly /etc/containerd/config.toml \\
 && echo "$KUBERNETES_VERSION" > /kind/version
COPY bin/kubelet bin/kubeadm bin/kubectl /usr/bin/
COPY bin/runc-kubefly /usr/local/sbin/runc-kubefly
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]
DOCKERFILE
timed "node base image" docker build -q -t "$node_image-base" "$ctx/node" >/dev/null

# ---- preload: import the images into the node's containerd, then commit ----
docker save "${preload[@]}" -o "$ctx/preload.tar"
builder="kubefly-node-builder-$$"
docker rm -f "$builder" >/dev/null 2>&1 || true
docker run -d --privileged --name "$builder" --entrypoint containerd -v "$ctx/preload.tar:/preload.tar:ro" "$node_image-base" >/dev/null
trap 'docker rm -f "$builder" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 30); do docker exec "$builder" ctr version >/dev/null 2>&1 && break; sleep 1; done
timed "preload ${#preload[@]} images" docker exec "$builder" ctr -n k8s.io images import --no-unpack /preload.tar >&2
docker exec "$builder" ctr -n k8s.io images ls -q >"$ctx/loaded.txt"
for i in "${preload[@]}"; do
  grep -qx "$i" "$ctx/loaded.txt" || grep -qx "docker.io/$i" "$ctx/loaded.txt" || die "preload: $i missing from the node's containerd"
done
docker stop -t 10 "$builder" >/dev/null
# The builder's env and stop signal are the image's; only its entrypoint was overridden.
docker commit --change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' --change 'CMD []' \
  "$builder" "$node_image" >/dev/null
[ "$(docker image inspect -f '{{.Config.StopSignal}}' "$node_image")" = "SIGRTMIN+3" ] || die "node image lost its stop signal"
docker rm -f "$builder" >/dev/null; docker rmi "$node_image-base" >/dev/null
rm -rf "$ctx"
stamp node-image "$node_key"
echo "$(date -u +%FT%TZ) node image total $((SECONDS - t_all))s load=$(cut -d' ' -f1 /proc/loadavg)" >> "$kcache/timings.log"
log "node image $node_image built in $((SECONDS - t_all))s"
echo "$node_image"
