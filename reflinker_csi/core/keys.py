"""Every name pg-reflinker writes on or reads from other objects: volume-context keys (shown on
the PV as spec.csi.volumeAttributes), labels, annotations, and the keys other components use."""

from __future__ import annotations

from .. import DRIVER_NAME, TOPOLOGY_KEY

__all__ = ["DRIVER_NAME", "TOPOLOGY_KEY"]

_P = "pg-reflinker.csi/"

# -- volume_context --------------------------------------------------------------------------
CTX_GUID = _P + "guid"
CTX_NODE = _P + "node"
CTX_HOST_PATH = _P + "host-path"
CTX_SOURCE_VOLUME = _P + "source-volume"
CTX_SOURCE_SNAPSHOT = _P + "source-snapshot"
CTX_SOURCE_PVC = _P + "source-pvc"  # namespace/name of the source claim
CTX_SOURCE_POD = _P + "source-pod"  # namespace/name of the CNPG instance that was cloned hot
# A fenced CNPG instance's PGDATA on its node: the cold copy checks that its PostgreSQL is down.
CTX_SOURCE_FENCED = _P + "source-fenced-pgdata"
CTX_CLONE_MODE = _P + "clone-mode"  # hot or cold
CTX_CLONE_METHOD = _P + "clone-method"  # a hot clone's: function or native
CTX_CLAIM = _P + "claim"  # namespace/name of the new claim
# A volume or snapshot cut from a capture of a whole instance (core/capture.py): which piece
# (PG_DATA, PG_WAL or PG_TABLESPACE:<name>), and the group whose requests share the capture.
CTX_PIECE = _P + "piece"
CTX_GROUP = _P + "group"
# A PG_DATA piece whose instance keeps its WAL on a volume of its own: pg_wal links there.
CTX_WAL_LINK = _P + "pg-wal-link"
# On a capture: the pieces it holds, comma-separated.
CTX_PIECES = _P + "pieces"
CTX_PV = _P + "pv"
# What a hot copy is as of (core/freshness.py): the source's LSN and the commit time of the
# last transaction it held, and how far behind production the source was (seconds).
CTX_AS_OF_LSN = _P + "as-of-lsn"
CTX_AS_OF_TIME = _P + "as-of-time"
CTX_SOURCE_LAG = _P + "source-lag-seconds"
AS_OF_KEYS = (CTX_AS_OF_LSN, CTX_AS_OF_TIME, CTX_SOURCE_LAG)

# -- parameters external-provisioner adds (--extra-create-metadata): recorded, not options ----
METADATA_PREFIX = "csi.storage.k8s.io/"
PVC_NAME = METADATA_PREFIX + "pvc/name"
PVC_NAMESPACE = METADATA_PREFIX + "pvc/namespace"
PV_NAME = METADATA_PREFIX + "pv/name"
# csi-snapshotter's (--extra-create-metadata)
SNAPSHOT_NAME = METADATA_PREFIX + "volumesnapshot/name"
SNAPSHOT_NAMESPACE = METADATA_PREFIX + "volumesnapshot/namespace"

# -- StorageClass parameters ----------------------------------------------------------------
PARAM_CLONE_METHOD = "cloneMethod"  # auto (default), function or native
# A bound on the source's lag behind production (30s, 5m): a copy of a staler one is refused.
PARAM_MAX_SOURCE_LAG = "maxSourceLag"
PARAMETERS = (PARAM_CLONE_METHOD, PARAM_MAX_SOURCE_LAG)

# -- ReflinkVolume labels and finalizer -------------------------------------------------------
LABEL_GUID = _P + "guid"
LABEL_NODE = _P + "node"
FINALIZER = _P + "node-agent"
# On a Secret kept in a clone source's namespace (kube/controller/cert_mirror.py): whose it is,
# <namespace>.<cluster>.
CERT_MIRROR_LABEL = _P + "mirror-of"

# -- annotations on PersistentVolumes (traceability) ------------------------------------------
ANNOTATION_GUID = _P + "guid"
ANNOTATION_SOURCE_PVC = _P + "source-pvc"
ANNOTATION_CLAIM = _P + "claim"
# The volume's as-of LSN, time and source lag (the context keys of the same names).
ANNOTATIONS_AS_OF = AS_OF_KEYS
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"

# -- annotations on Nodes: the node plugin's report of its free space --------------------------
ANNOTATION_FREE_BYTES = "capacity." + _P + "free-bytes"
ANNOTATION_FLOOR_BYTES = "capacity." + _P + "floor-bytes"  # FREE_SPACE_FLOOR in bytes
ANNOTATION_REPORTED_AT = "capacity." + _P + "reported-at"
# The type of HOSTPATH_PREFIX's filesystem (xfs, btrfs): on btrfs cloneMethod auto is native.
ANNOTATION_FILESYSTEM = "capacity." + _P + "filesystem"

# -- other components ------------------------------------------------------------------------
CNPG_CLUSTER_LABEL = "cnpg.io/cluster"
CNPG_ROLE_LABEL = "cnpg.io/pvcRole"  # on CNPG's claims: PG_DATA, PG_WAL or PG_TABLESPACE
# On a CNPG Cluster: a JSON list of its fenced instances ("*": all). A fenced instance's
# PostgreSQL is shut down and stays down, its pod kept (CNPG's offline backups fence).
CNPG_FENCED_ANNOTATION = "cnpg.io/fencedInstances"
# Where CNPG mounts an instance's PGDATA volume (PGDATA is pgdata inside it).
CNPG_DATA_MOUNT = "/var/lib/postgresql/data"
# Where CNPG mounts the WAL volume (pg_wal is a directory in it) and each tablespace's volume
# (the tablespace's location is data in it).
CNPG_WAL_MOUNT = "/var/lib/postgresql/wal"
CNPG_TABLESPACES_MOUNT = "/var/lib/postgresql/tablespaces"
# On the claims of one CNPG instance, and on the VolumeSnapshots of one CNPG Backup.
CNPG_INSTANCE_LABEL = "cnpg.io/instanceName"
CNPG_BACKUP_LABEL = "cnpg.io/backupName"
# On a WaitForFirstConsumer claim: the node the scheduler chose for its pod.
SELECTED_NODE_ANNOTATION = "volume.kubernetes.io/selected-node"
CNPG_TABLESPACE_LABEL = "cnpg.io/tablespaceName"
CLAIM_LOOP_COMPONENT = _P + "claim-loop"
NODE_COMPONENT = _P + "node"
COPY_COMPONENT = _P + "controller"  # what a hot copy is as of
