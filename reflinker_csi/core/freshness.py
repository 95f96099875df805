"""What a copy is as of, and how far behind production its source is.

A copy of a clone source (a CNPG replica Cluster of production, in continuous recovery) holds
what that standby had replayed. `Position` is read from the source in the copy's own session,
before its backup starts, so it is a lower bound: the copy holds every transaction up to
`lsn` (the replay LSN on a standby, the current WAL LSN on a primary). Its lag is how far the
standby's replay is behind what production sent, in seconds:

- a primary (production itself) has no lag;
- a standby without a WAL receiver (the stream from production is down, or it restores from
  an archive only) has an unknown lag: a bound refuses it;
- a standby that has replayed all it received has no lag (an idle production sends nothing);
- otherwise the time since the last transaction it replayed committed on production.

No I/O here: pg/source.py reads the position."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import InvalidArgument, SourceUnavailable
from .keys import CTX_AS_OF_LSN, CTX_AS_OF_TIME, CTX_SOURCE_LAG, PARAM_MAX_SOURCE_LAG

# A bound longer than a day is no bound; one under a second cannot be met by any stream.
MAX_LAG_BOUND_SECONDS = 86400
_DURATION = re.compile(r"^(\d{1,6})(s|m|h)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, None: 1}
_LSN = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")


def lag_bound(parameters: dict[str, str], where: str = "StorageClass") -> float | None:
    """The class's maxSourceLag in seconds (30, 30s, 5m, 1h), None when it has none."""
    value = parameters.get(PARAM_MAX_SOURCE_LAG)
    if value is None:
        return None
    match = _DURATION.match(value.strip())
    seconds = int(match.group(1)) * _UNITS[match.group(2)] if match else 0
    if not 1 <= seconds <= MAX_LAG_BOUND_SECONDS:
        raise InvalidArgument(
            f"{where} parameter {PARAM_MAX_SOURCE_LAG} is {value[:40]!r}; use a duration from "
            f"1s to 24h (e.g. 30s, 5m): a copy is refused while its source is further behind "
            "production than that"
        )
    return float(seconds)


@dataclass(frozen=True)
class Position:
    """The source at the copy: see the module's docstring."""

    lsn: str
    in_recovery: bool
    # Seconds since the epoch of the last transaction replayed (a standby) or of the read (a
    # primary); None for a standby that has replayed no transaction since it started.
    replayed_at: float | None
    streaming: bool  # a standby's WAL receiver runs
    caught_up: bool  # a standby has replayed all the WAL it received
    read_at: float  # seconds since the epoch, by the source's clock

    def __post_init__(self) -> None:
        if not _LSN.match(self.lsn):
            raise ValueError(f"an LSN of {self.lsn[:40]!r}")

    @property
    def lag(self) -> float | None:
        """Seconds behind production, None when it cannot be known (no stream)."""
        if not self.in_recovery:
            return 0.0
        if not self.streaming:
            return None
        if self.caught_up:
            return 0.0
        if self.replayed_at is None:
            return None
        return max(0.0, self.read_at - self.replayed_at)

    @property
    def as_of_time(self) -> str:
        """The last transaction the copy holds committed at (RFC 3339, UTC); "" unknown."""
        if self.replayed_at is None:
            return ""
        return datetime.fromtimestamp(self.replayed_at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def context(self) -> dict[str, str]:
        """The volume-context keys that carry it (the PV shows them)."""
        lag = self.lag
        return {
            CTX_AS_OF_LSN: self.lsn,
            CTX_AS_OF_TIME: self.as_of_time,
            CTX_SOURCE_LAG: "" if lag is None else f"{lag:.3f}",
        }


def check_lag(position: Position, bound: float | None, source: str) -> None:
    """Refuse a copy whose source is further behind production than bound (UNAVAILABLE: the
    request is retried, and succeeds once the standby catches up or its stream is back)."""
    if bound is None:
        return
    lag = position.lag
    if lag is not None and lag <= bound:
        return
    if lag is None:
        why = (
            "its WAL receiver is not running: the stream from production is down (check the "
            "replica Cluster's externalClusters connection and production's primary) or the "
            "standby restores from an archive only"
            if not position.streaming
            else "it has replayed no transaction since it started"
        )
        raise SourceUnavailable(
            f"{source} is a standby of unknown lag ({why}); the StorageClass's "
            f"{PARAM_MAX_SOURCE_LAG} is {bound:.0f} s, so no copy is taken until it streams "
            "again; the request is retried"
        )
    raise SourceUnavailable(
        f"{source} is {lag:.1f} s behind production (it last replayed a transaction committed "
        f"at {position.as_of_time}, LSN {position.lsn}), {lag - bound:.1f} s over the "
        f"StorageClass's {PARAM_MAX_SOURCE_LAG} of {bound:.0f} s: the replica is catching up "
        "(a burst of writes on production, or a slow clone node); the request is retried"
    )
