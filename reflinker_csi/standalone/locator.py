"""Standalone: every volume is on this host; it is in use while anything mounts it."""

from __future__ import annotations

from ..core.layout import Layout
from ..core.locator import SourceLocation
from ..core.records import VolumeRecord
from ..disk.mounts import mounts_of


class LocalSourceLocator:
    """Standalone: every volume is on this host; it is in use while anything mounts it."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout

    def locate(self, source: VolumeRecord) -> SourceLocation:
        path = self._layout.volume_dir(source.guid)
        users = tuple(m.mount_point for m in mounts_of(path)) if path.exists() else ()
        return SourceLocation(node=source.node, host_path=path, in_use_at=users)
