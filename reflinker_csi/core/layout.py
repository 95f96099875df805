"""Where volumes live under HOSTPATH_PREFIX, and the checks that keep every path inside it."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from .errors import InvalidArgument, NotFound

# Canonical lowercase UUID, as uuid.uuid4() prints it. Nothing else can name a volume.
_GUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
STATE_DIR_NAME = ".pg-reflinker"
PARTIAL_SUFFIX = ".partial"
DELETING_SUFFIX = ".deleting"


def new_guid() -> str:
    return str(uuid.uuid4())


def is_guid(value: str) -> bool:
    return bool(_GUID_RE.fullmatch(value))


def require_guid(volume_id: str, field: str = "volume_id") -> str:
    """Return volume_id if it can name a volume; NotFound otherwise (no such volume can exist)."""
    if not volume_id:
        raise InvalidArgument(f"{field} is required")
    if not is_guid(volume_id):
        raise NotFound(
            f"{field} {volume_id[:80]!r} is not a pg-reflinker volume id "
            "(volume ids are lowercase UUIDs such as 0b6f4c1e-...); no such volume exists"
        )
    return volume_id


class Layout:
    """Paths of volumes and driver state under one prefix directory."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = Path(os.path.realpath(prefix))

    @property
    def state_dir(self) -> Path:
        return self.prefix / STATE_DIR_NAME

    def volume_dir(self, guid: str) -> Path:
        return self.prefix / require_guid(guid)

    @property
    def snapshots_dir(self) -> Path:
        return self.state_dir / "snapshots"

    def snapshot_dir(self, guid: str) -> Path:
        return self.snapshots_dir / require_guid(guid, "snapshot_id")

    @property
    def captures_dir(self) -> Path:
        return self.state_dir / "captures"

    def capture_dir(self, guid: str) -> Path:
        return self.captures_dir / require_guid(guid, "capture id")

    def contains(self, path: Path) -> bool:
        """True when path, with every symlink resolved, lies strictly inside the prefix."""
        real = Path(os.path.realpath(path))
        return self.prefix in real.parents


def check_absolute_path(path: str, field: str) -> Path:
    """A path from a request: absolute, printable, with no '..' components."""
    if not path:
        raise InvalidArgument(f"{field} is required")
    if "\x00" in path or not path.isprintable():
        raise InvalidArgument(f"{field} contains control or NUL characters")
    if not path.startswith("/"):
        raise InvalidArgument(f"{field} {path!r} must be an absolute path")
    if ".." in path.split("/"):
        raise InvalidArgument(f"{field} {path!r} must not contain '..'")
    return Path(os.path.normpath(path))
