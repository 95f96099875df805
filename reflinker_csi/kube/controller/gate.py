"""One backup per source instance in the whole controller, not per process: csi-provisioner,
csi-snapshotter and the claim loop elect their leaders separately, so two controller replicas
may each be asked for a copy of the same instance. The gate of an instance is a coordination
Lease in the controller's namespace, held while its backup session lives (a backup ends within
BACKUP_MODE_LIMIT, so the Lease's duration is that and a margin). A request that finds it held
waits a few seconds, then is retried later: the requests for one source never hold more than
one worker each. A holder that died leaves its Lease; another takes it once it has seen it
unchanged for its whole duration by its own clock (as leader election does, never trusting
another machine's clock)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

from ...config import GATE_WAIT_SECONDS
from ...core.errors import OperationInProgress
from ..api import JSON, LEASES, ApiError, Kube, domain_error
from ..events import stamp
from ..model import Lease

log = logging.getLogger(__name__)
LEASE_PREFIX = "pg-reflinker-backup-"
# Beyond the longest backup, before a Lease left by a holder that died is taken over.
HOLD_MARGIN_SECONDS = 15.0
POLL_SECONDS = 0.2


def lease_name(instance: str) -> str:
    """The Lease of a source instance (namespace/pod): a valid name whatever the length."""
    return LEASE_PREFIX + hashlib.sha256(instance.encode()).hexdigest()[:32]


class SourceGate:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        backup_limit: float,
        wait_seconds: float = GATE_WAIT_SECONDS,
        identity: str = "",
        hold_margin: float = HOLD_MARGIN_SECONDS,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.duration = math.ceil(backup_limit + hold_margin)
        self.wait_seconds = wait_seconds
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}"
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[str, float]] = {}  # lease -> (resourceVersion, first seen)

    @contextlib.contextmanager
    def held(self, instance: str, what: str, deadline: float) -> Iterator[None]:
        """Hold the gate of instance (namespace/pod) for one backup; OperationInProgress when
        another holds it past the wait. what names the source in the message."""
        name = lease_name(instance)
        me = f"{self.identity}/{uuid.uuid4()}"  # two requests of one process are two holders
        until = min(deadline, time.monotonic() + self.wait_seconds)
        while not self._try(name, me, instance):
            if time.monotonic() >= until:
                raise OperationInProgress(
                    f"another copy of {what} is being taken; a source instance serves one "
                    "backup at a time, this request is retried"
                )
            time.sleep(POLL_SECONDS)
        try:
            yield
        finally:
            self._release(name, me, instance)

    def _try(self, name: str, me: str, instance: str) -> bool:
        try:
            value = self.kube.get(LEASES, name, self.namespace)
        except ApiError as err:
            raise domain_error(err, f"read Lease {self.namespace}/{name}") from None
        if value is None:
            return self._write(name, "", me, instance)
        lease = Lease.of(value)
        if lease.holder:
            now = time.monotonic()
            with self._lock:
                version, since = self._seen.get(name, ("", now))
                if version != lease.resource_version:
                    self._seen[name] = (lease.resource_version, now)
                    return False
            if now < since + max(lease.duration, self.duration):
                return False
            log.warning(
                "taking over the backup gate of %s: its holder %s left it", instance, lease.holder
            )
        return self._write(name, lease.resource_version, me, instance)

    def _write(self, name: str, version: str, holder: str, instance: str) -> bool:
        """Create the Lease (version "") or replace the one read at version; False when another
        writer came first."""
        metadata: JSON = {
            "name": name,
            "namespace": self.namespace,
            "annotations": {"pg-reflinker.csi/source-instance": instance},
        }
        if version:
            metadata["resourceVersion"] = version
        now = stamp(datetime.now(UTC), fraction=True)
        body: JSON = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": holder,
                "acquireTime": now,
                "renewTime": now,
                "leaseDurationSeconds": self.duration if holder else 1,
            },
        }
        try:
            if version:
                self.kube.replace(LEASES, name, body, self.namespace)
            else:
                self.kube.create(LEASES, body, self.namespace)
        except ApiError as err:
            if err.status == 409:
                return False
            raise domain_error(err, f"write Lease {self.namespace}/{name}") from None
        return True

    def _release(self, name: str, me: str, instance: str) -> None:
        """Held by nobody again (the Lease stays: one small object per instance copied)."""
        try:
            value = self.kube.get(LEASES, name, self.namespace)
            if value is not None and Lease.of(value).holder == me:
                self._write(name, Lease.of(value).resource_version, "", instance)
        except Exception:
            log.warning("could not release the backup gate %s", name, exc_info=True)
