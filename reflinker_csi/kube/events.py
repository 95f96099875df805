"""Events people read in `kubectl describe`: one writer for every loop."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from .api import EVENTS, JSON, ApiError, Kube

log = logging.getLogger(__name__)


def stamp(at: datetime | None = None, fraction: bool = False) -> str:
    """A Kubernetes timestamp (RFC 3339, UTC; microseconds where the field takes them)."""
    return (at or datetime.now(UTC)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ" if fraction else "%Y-%m-%dT%H:%M:%SZ"
    )


def record_event(
    kube: Kube,
    involved: JSON,
    kind: str,
    reason: str,
    message: str,
    component: str,
    host: str = "",
) -> None:
    """Post an event on the object `involved` (apiVersion, kind, name, uid, and namespace when
    it has one; cluster-scoped objects get theirs in "default"). A failure is logged, not
    raised: an event is never worth failing the work it reports."""
    namespace = str(involved.get("namespace") or "default")
    now = stamp()
    source: JSON = {"component": component, **({"host": host} if host else {})}
    body: JSON = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{involved.get('name')}.", "namespace": namespace},
        "involvedObject": involved,
        "reason": reason,
        "message": message[:1000],
        "type": kind,
        "source": source,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        kube.create(EVENTS, body, namespace)
    except ApiError as err:
        log.warning(
            "cannot record event on %s %s: %s", involved.get("kind"), involved.get("name"), err
        )
