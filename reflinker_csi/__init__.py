"""pg-reflinker: a CSI driver that clones PostgreSQL data directories with reflinks."""

from importlib import metadata

DRIVER_NAME = "pg-reflinker.csi"
TOPOLOGY_KEY = "topology.pg-reflinker.csi/node"

try:
    __version__ = metadata.version("pg-reflinker")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
