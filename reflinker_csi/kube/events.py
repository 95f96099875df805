"""Events people read in `kubectl describe`: one writer for every loop."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime

from .api import EVENTS, JSON, ApiError, Kube
from .fields import text

log = logging.getLogger(__name__)


def stamp(at: datetime | None = None, fraction: bool = False) -> str:
    """A Kubernetes timestamp (RFC 3339, UTC; microseconds where the field takes them)."""
    return (at or datetime.now(UTC)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ" if fraction else "%Y-%m-%dT%H:%M:%SZ"
    )


class EventRecorder:
    """Posts Events on objects people `kubectl describe`, as client-go's recorder does: the same
    event again (same object, type, reason, message and source) within `window` seconds updates
    the Event already posted (count + 1, lastTimestamp) instead of posting another, so a claim
    retried for an hour shows one Event with its count. Messages therefore carry no changing
    parts (no retry delays). A failure is logged, not raised: an event is never worth failing
    the work it reports."""

    def __init__(
        self, kube: Kube, component: str, host: str = "", window: float = 600.0, size: int = 4096
    ) -> None:
        self.kube = kube
        self.component = component
        self.host = host
        self.window = window
        self.size = size
        self._lock = threading.Lock()
        # (namespace, uid or name, type, reason, message) -> (event name, count, first posted)
        self._posted: OrderedDict[tuple[str, ...], tuple[str, int, float]] = OrderedDict()

    def record(self, involved: JSON, kind: str, reason: str, message: str) -> None:
        """An event on the object `involved` (apiVersion, kind, name, uid, and namespace when it
        has one; cluster-scoped objects get theirs in "default")."""
        namespace = str(involved.get("namespace") or "default")
        message = message[:1000]
        key = (
            namespace,
            str(involved.get("uid") or involved.get("name")),
            kind,
            reason,
            message,
        )
        with self._lock:
            seen = self._posted.get(key)
            if seen is not None and time.monotonic() - seen[2] > self.window:
                seen = None
        try:
            if seen is not None and self._repeat(namespace, seen[0], seen[1] + 1):
                with self._lock:
                    self._posted[key] = (seen[0], seen[1] + 1, seen[2])
                return
            name = self._post(namespace, involved, kind, reason, message)
        except ApiError as err:
            log.warning(
                "cannot record event on %s %s: %s", involved.get("kind"), involved.get("name"), err
            )
            return
        with self._lock:
            self._posted[key] = (name, 1, time.monotonic())
            self._posted.move_to_end(key)
            while len(self._posted) > self.size:
                self._posted.popitem(last=False)

    def _post(self, namespace: str, involved: JSON, kind: str, reason: str, message: str) -> str:
        now = stamp()
        source: JSON = {"component": self.component, **({"host": self.host} if self.host else {})}
        body: JSON = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved.get('name')}.", "namespace": namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": kind,
            "source": source,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        made = self.kube.create(EVENTS, body, namespace)
        return text(made.get("metadata"), "name")

    def _repeat(self, namespace: str, name: str, count: int) -> bool:
        """Count one more on the Event posted before; False when it is gone (expired)."""
        patch: JSON = {"count": count, "lastTimestamp": stamp()}
        try:
            self.kube.merge_patch(EVENTS, name, patch, namespace)
        except ApiError as err:
            if err.status == 404:
                return False
            raise
        return True
