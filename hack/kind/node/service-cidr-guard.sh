#!/bin/sh
# kubefly-service-cidr-guard CIDR[,CIDR]: packets routed through this node to
# the cluster's Service CIDR that no kube-proxy rule rewrote are refused here
# (ICMP unreachable) instead of leaving by the default route toward the real
# network, e.g. while kube-proxy is not running on the node.
#
# A policy rule, not a route in the main table: kube-proxy's PREROUTING DNAT
# happens before routing, so pods' Service traffic is unaffected, but a host
# process's connect() looks its route up before OUTPUT's DNAT, and a blackhole
# route would fail every hostNetwork pod's Service traffic (cluster DNS).
# Host-originated traffic therefore keeps the main table (priority 32000).
# Idempotent; run at every boot of the node (kubefly-service-cidr-guard.service).
set -eu
[ $# -eq 1 ] || { echo "usage: $0 SERVICE_CIDR[,SERVICE_CIDR]" >&2; exit 2; }
for cidr in $(echo "$1" | tr , ' '); do
  case $cidr in *:*) family=-6 ;; *) family=-4 ;; esac
  while ip "$family" rule del priority 32000 2>/dev/null; do :; done
  while ip "$family" rule del priority 32001 2>/dev/null; do :; done
  ip "$family" rule add priority 32000 to "$cidr" iif lo lookup main
  ip "$family" rule add priority 32001 to "$cidr" unreachable
done
