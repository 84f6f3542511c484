"""Labels and annotations that tie Kubernetes objects to kubefly's platform words.

The operator writes them on every pod it creates; the host agent reads them to
turn the pods on its node into instance rows without asking for the CRs.
"""

PREFIX = "kubefly.dev"

APP = f"{PREFIX}/app"
MACHINE = f"{PREFIX}/machine"
REGION = f"{PREFIX}/region"
HOST = f"{PREFIX}/host"
VOLUME = f"{PREFIX}/volume"
# On Snapshots and PostgresBackups a schedule made (the others are users').
SCHEDULED = f"{PREFIX}/scheduled"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "kubefly"

# Pod annotations
INSTANCE_ID = f"{PREFIX}/instance-id"
# JSON list of the Machine's services (kubefly.instances.Service, snake_case)
SERVICES = f"{PREFIX}/services"
# JSON list of the Machine's checks
CHECKS = f"{PREFIX}/checks"
# Pod condition (a readiness gate) the host agent sets once it has published the instance to gossip:
# Ready then means routable by every proxy and in .internal DNS, not only "containers ready".
ROUTED = f"{PREFIX}/routed"

# Machine annotation: the host a drain asks the Machine to leave (kubefly host drain); the Machine
# is stopped there and started anew on another host of its region. Ignored once it is elsewhere.
MOVE_FROM = f"{PREFIX}/move-from"
# Volume annotation: move this volume (and its machine) off that host (kubefly.volumes.migration). The
# Machine controller sets it for a volume Machine asked to move-from; a user may set it on a Volume too.
MIGRATE_FROM = f"{PREFIX}/migrate-from"
# PostgresCluster annotation: the host whose drain asked for its spec.switchoverTo (taken back once done).
DRAIN_SWITCHOVER = f"{PREFIX}/drain-switchover"
# Node annotation: the drain's state as JSON (kubefly.placement.drain.DrainPlan.summary).
DRAIN = f"{PREFIX}/drain"

# The standard node label that names a host's region.
NODE_REGION = "topology.kubernetes.io/region"
