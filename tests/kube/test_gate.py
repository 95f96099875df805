"""One backup per source instance across controller replicas: the gate is a Lease on the real
API server, so two replicas (two gates with their own identities, as two pods would have)
never hold one instance's backup at once, and a replica that died holding it holds it no
longer than the Lease's duration."""

from __future__ import annotations

import threading
import time

import pytest

from reflinker_csi.core.errors import OperationInProgress
from reflinker_csi.kube.api import JSON, LEASES, Kube
from reflinker_csi.kube.controller.gate import SourceGate, lease_name


def gates(admin: Kube, namespace: str, limit: float = 60.0) -> tuple[SourceGate, SourceGate]:
    return (
        SourceGate(admin, namespace, limit, wait_seconds=0.5, identity="replica-a", hold_margin=0),
        SourceGate(admin, namespace, limit, wait_seconds=0.5, identity="replica-b", hold_margin=0),
    )


def test_a_second_replica_waits_for_the_first_replicas_backup_then_takes_its_turn(
    admin: Kube, namespace: str
) -> None:
    a, b = gates(admin, namespace)
    far = time.monotonic() + 60
    with a.held("apps/pg-prod-1", "claim apps/pg-prod-1", far):
        with (
            pytest.raises(OperationInProgress) as refused,
            b.held("apps/pg-prod-1", "claim apps/pg-prod-1", far),
        ):
            pytest.fail("two replicas held one instance's gate")
        assert str(refused.value) == (
            "another copy of claim apps/pg-prod-1 is being taken; a source instance serves one "
            "backup at a time, this request is retried"
        )
        # Another instance is not held up.
        with b.held("apps/pg-prod-2", "claim apps/pg-prod-2", far):
            pass
    with b.held("apps/pg-prod-1", "claim apps/pg-prod-1", far):
        lease = admin.get(LEASES, lease_name("apps/pg-prod-1"), namespace)
        assert lease is not None
        holder = str(lease["spec"]["holderIdentity"])  # type: ignore[index]
        assert holder.startswith("replica-b/")


def test_replicas_racing_for_one_instance_never_overlap(admin: Kube, namespace: str) -> None:
    replicas = gates(admin, namespace)
    inside: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    done = {"replica-a": 0, "replica-b": 0}
    lock = threading.Lock()

    def work(gate: SourceGate) -> None:
        while done[gate.identity] < 5:
            try:
                with gate.held("apps/pg-race-1", "claim apps/pg-race-1", time.monotonic() + 5):
                    with lock:
                        inside.append(gate.identity)
                        if len(inside) > 1:
                            overlaps.append(tuple(inside))
                    time.sleep(0.05)
                    with lock:
                        inside.remove(gate.identity)
                    done[gate.identity] += 1
            except OperationInProgress:
                pass

    threads = [threading.Thread(target=work, args=(g,)) for g in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert done == {"replica-a": 5, "replica-b": 5}
    assert overlaps == []


def test_the_gate_of_a_replica_that_died_is_taken_over_after_its_duration(
    admin: Kube, namespace: str
) -> None:
    """A replica killed mid-backup leaves its Lease held; PostgreSQL ended that backup with its
    session. Another replica takes the gate once it has seen the Lease unchanged for its whole
    duration (here 2 s), by its own clock."""
    dead: JSON = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": lease_name("apps/pg-gone-1")},
        "spec": {"holderIdentity": "replica-x/killed", "leaseDurationSeconds": 2},
    }
    admin.create(LEASES, dead, namespace)
    _, b = gates(admin, namespace, limit=2.0)
    with (
        pytest.raises(OperationInProgress),
        b.held("apps/pg-gone-1", "claim apps/pg-gone-1", time.monotonic() + 60),
    ):
        pass
    time.sleep(2.0)
    with b.held("apps/pg-gone-1", "claim apps/pg-gone-1", time.monotonic() + 60):
        pass
