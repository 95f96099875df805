"""Where a source volume lives and whether a PostgreSQL server is using it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .layout import Layout
from .mounts import mounts_of
from .registry import VolumeRecord


@dataclass(frozen=True)
class SourceLocation:
    node: str
    host_path: Path
    # Mount points that expose the source (a running pod, or anything else using it).
    in_use_at: tuple[str, ...] = ()


class SourceLocator(Protocol):
    def locate(self, source: VolumeRecord) -> SourceLocation: ...


class LocalSourceLocator:
    """Standalone: every volume is on this host; it is in use while anything mounts it."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout

    def locate(self, source: VolumeRecord) -> SourceLocation:
        path = self._layout.volume_dir(source.guid)
        users = tuple(m.mount_point for m in mounts_of(path)) if path.exists() else ()
        return SourceLocation(node=source.node, host_path=path, in_use_at=users)
