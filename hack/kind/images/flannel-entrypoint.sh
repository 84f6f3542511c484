#!/bin/sh
# flanneld plus the CNI half of flannel: flannel-io/cni-plugin is not on the Go
# module proxy, so once flanneld has leased this node's subnet, write a
# bridge + host-local + portmap conflist for it (Debian's CNI plugins on the node).
set -eu
rm -f /run/flannel/subnet.env
flanneld "$@" &
pid=$!
trap 'kill $pid' TERM INT
while [ ! -s /run/flannel/subnet.env ]; do
  kill -0 "$pid" 2>/dev/null || { wait "$pid"; exit 1; }
  sleep 1
done
. /run/flannel/subnet.env
# host-local wants the network address: FLANNEL_SUBNET is the gateway (x.y.z.1/len).
len=${FLANNEL_SUBNET#*/}
IFS=. read -r a b c d <<ADDR
${FLANNEL_SUBNET%/*}
ADDR
n=$(( ((a << 24) | (b << 16) | (c << 8) | d) & ((0xffffffff << (32 - len)) & 0xffffffff) ))
net="$((n >> 24 & 255)).$((n >> 16 & 255)).$((n >> 8 & 255)).$((n & 255))/$len"
conf=/etc/cni/net.d/10-kubefly-flannel.conflist
cat > "$conf.tmp" <<CONF
{
  "cniVersion": "1.0.0",
  "name": "kubefly",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "mtu": $FLANNEL_MTU,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$net"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
CONF
mv "$conf.tmp" "$conf"
echo "wrote $conf for $net"
wait "$pid"
