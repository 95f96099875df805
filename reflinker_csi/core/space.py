"""Free space: the floor below which a node takes no new volume, and sizes people read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from .errors import ResourceExhausted


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


def check_room(node: str, free: int, floor: int, where: str, setting: str = "") -> None:
    """Refuse a new volume on node when free space is below the floor."""
    if free < floor:
        named = f"FREE_SPACE_FLOOR={setting}" if setting else "FREE_SPACE_FLOOR"
        raise ResourceExhausted(
            f"node {node} has {size(free)} free under {where}, below the floor of {size(floor)} "
            f"({named}); no new volume is made there until space is freed (existing volumes "
            "are not affected)"
        )


_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "": 1,
}  # fmt: skip
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|)$")


def parse_quantity(quantity: str) -> int | None:
    """Bytes of a Kubernetes quantity such as 8Ki, 20Gi or 500M; None when it is not one."""
    found = _QUANTITY.match(quantity.strip())
    if found is None:
        return None
    return int(Decimal(found.group(1)) * _SUFFIXES[found.group(2)])
