"""Which CSI volume capabilities a pg-reflinker volume (a directory on one node) can serve."""

from __future__ import annotations

from collections.abc import Iterable

from csi import csi_pb2

from ..core.access import BLOCK_UNSUPPORTED, mode_unsupported
from ..core.errors import InvalidArgument

_Mode = csi_pb2.VolumeCapability.AccessMode
SINGLE_NODE_MODES = {
    _Mode.SINGLE_NODE_WRITER,
    _Mode.SINGLE_NODE_READER_ONLY,
    _Mode.SINGLE_NODE_SINGLE_WRITER,
    _Mode.SINGLE_NODE_MULTI_WRITER,
}


def unsupported_reason(cap: csi_pb2.VolumeCapability) -> str:
    """Why cap cannot be served, or "" when it can."""
    access = cap.WhichOneof("access_type")
    if access == "block":
        return BLOCK_UNSUPPORTED
    if access != "mount":
        return "access_type must be mount"
    mode = cap.access_mode.mode
    if mode not in SINGLE_NODE_MODES:
        name = _Mode.Mode.Name(mode) if mode in _Mode.Mode.values() else str(mode)
        return mode_unsupported(name)
    return ""


def require_supported(caps: Iterable[csi_pb2.VolumeCapability], field: str) -> None:
    caps = list(caps)
    if not caps:
        raise InvalidArgument(f"{field} is required")
    for cap in caps:
        reason = unsupported_reason(cap)
        if reason:
            raise InvalidArgument(reason)


def is_read_only_mode(cap: csi_pb2.VolumeCapability) -> bool:
    return bool(cap.access_mode.mode == _Mode.SINGLE_NODE_READER_ONLY)
