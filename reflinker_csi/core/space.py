"""Free space: the floor below which a node takes no new volume, and sizes people read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpaceFloor:
    """A share of the filesystem (percent) or a number of bytes."""

    percent: float = 0.0
    bytes: int = 0

    def of(self, total_bytes: int) -> int:
        return self.bytes or int(total_bytes * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else size(self.bytes)


def size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"  # pragma: no cover
