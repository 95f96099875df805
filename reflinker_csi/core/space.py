"""Free space: the floor below which a node takes no new volume, and sizes people read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

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


_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18, "": 0}
# Kubernetes' quantity grammar (apimachinery resource.ParseQuantity): a signed decimal number
# then a binary suffix, a decimal SI suffix or a decimal exponent (1e9, 5E-3). "1E" is exa.
_QUANTITY = re.compile(
    r"^\+?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:[eE]([+-]?[0-9]{1,3})|(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?)$"
)
# Bytes are a whole number: quantities such as 100m (0.1) are no size, however Kubernetes reads
# them. Kubernetes rounds a fraction of a byte up (1.5 is 2); so do we.
_MAX_BYTES = 2**63 - 1


def parse_quantity(quantity: str) -> int | None:
    """Bytes of a Kubernetes quantity (8Ki, 20Gi, 500M, 1e9, 1.5Gi); None when it is not one,
    is negative, has a sub-unit suffix (m, u, n) or is beyond int64."""
    found = _QUANTITY.match(quantity.strip())
    if found is None:
        return None
    number, exponent, suffix = found.groups()
    value = Decimal(number)
    if exponent is not None:
        value = value.scaleb(int(exponent))
    elif suffix in _BINARY:
        value *= 2 ** _BINARY[suffix]
    else:
        value = value.scaleb(_DECIMAL[suffix or ""])
    whole = int(value.to_integral_value(rounding=ROUND_CEILING))
    return whole if whole <= _MAX_BYTES else None
