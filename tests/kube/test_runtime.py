"""The reconcile runtime: work queue, informer cache, leader election, runner."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from reflinker_csi.kube.api import LEASES, NODES, VOLUMES, ApiError, Kube
from reflinker_csi.kube.model import Lease
from reflinker_csi.kube.runtime import (
    DONE,
    Controller,
    Informer,
    LeaderElector,
    LeaseTimings,
    Result,
    Runner,
    WorkQueue,
)
from tests.e2e.cluster import ControlPlane


def test_a_key_added_while_it_is_processed_is_processed_once_more_afterwards() -> None:
    queue = WorkQueue()
    for key in ("a", "b", "a"):
        queue.add(key)
    first = queue.get()
    assert first == "a"
    queue.add("a")  # changed while a worker holds it
    assert queue.get() == "b"  # not a second "a" beside the first
    queue.done("b")
    queue.done("a")
    assert queue.get() == "a"
    queue.close()
    assert queue.get() is None


def test_requeue_after_delays_the_key() -> None:
    queue = WorkQueue()
    queue.add("later", after=0.3)
    queue.add("now")
    assert queue.get() == "now"
    start = time.monotonic()
    assert queue.get() == "later"
    assert time.monotonic() - start >= 0.25


def test_one_key_runs_on_one_worker_at_a_time_while_others_run_beside_it() -> None:
    """A slow key holds one worker; the other keys go on; no key runs twice at once."""
    running: dict[str, int] = {}
    overlap: list[str] = []
    fast_done = threading.Event()
    release = threading.Event()
    lock = threading.Lock()

    def reconcile(key: str) -> Result:
        with lock:
            running[key] = running.get(key, 0) + 1
            if running[key] > 1:
                overlap.append(key)
        try:
            if key == "slow":
                release.wait(10)
            elif key == "fast-9":
                fast_done.set()
        finally:
            with lock:
                running[key] -= 1
        return DONE

    controller = Controller("test", reconcile, workers=3)
    stop = threading.Event()
    thread = threading.Thread(target=controller.run, args=(stop,))
    thread.start()
    controller.queue.add("slow")
    for _ in range(3):
        controller.queue.add("slow")
    for i in range(10):
        controller.queue.add(f"fast-{i}")
    assert fast_done.wait(10), "fast keys waited behind the slow one"
    release.set()
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert overlap == []


def test_a_failing_reconcile_is_retried_with_backoff() -> None:
    calls: list[float] = []
    succeeded = threading.Event()

    def reconcile(key: str) -> Result:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise RuntimeError("transient")
        succeeded.set()
        return DONE

    controller = Controller("test", reconcile, workers=1, max_backoff=1.5)
    stop = threading.Event()
    thread = threading.Thread(target=controller.run, args=(stop,))
    thread.start()
    controller.queue.add("k")
    assert succeeded.wait(10)
    stop.set()
    thread.join(10)
    # 1 s after the first failure, then 2 s capped at max_backoff (each ±10 %).
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert len(calls) == 3
    assert 0.9 <= gaps[0] <= 1.3 and 1.35 <= gaps[1] <= 1.8, gaps


def test_a_key_requeued_many_times_waits_once_at_its_earliest_time() -> None:
    """A key requeued on every event and resync holds one delayed entry, due at the earliest
    time asked, and is handed out once (the heap used to grow by one entry per add)."""
    queue = WorkQueue()
    for _ in range(10_000):
        queue.add("often", after=30.0)
    queue.add("often", after=0.2)
    queue.add("often", after=60.0)
    assert queue.pending() == 1
    assert len(queue._later) <= 2, "one heap entry per add"
    assert queue.get() == "often"
    queue.done("often")
    assert queue.pending() == 0
    queue.add("last", after=0.05)
    assert queue.get() == "last"  # not a stale "often" from the heap


def test_a_worker_outlives_a_failing_error_counter() -> None:
    """on_error (the metric) raising does not end the worker that called it: the failing key
    is retried and the keys after it are still reconciled."""
    done: list[str] = []
    tried: dict[str, int] = {}
    finished = threading.Event()

    def reconcile(key: str) -> Result:
        tried[key] = tried.get(key, 0) + 1
        if key == "bad" and tried[key] == 1:
            raise RuntimeError("transient")
        done.append(key)
        if {"bad", "next"} <= set(done):
            finished.set()
        return DONE

    def broken_counter(name: str) -> None:
        raise ValueError("metrics are broken")

    controller = Controller("test", reconcile, workers=1, on_error=broken_counter)
    stop = threading.Event()
    thread = threading.Thread(target=controller.run, args=(stop,))
    thread.start()
    controller.queue.add("bad")
    controller.queue.add("next")
    try:
        assert finished.wait(10), f"the worker died: reconciled {done}"
    finally:
        stop.set()
        thread.join(10)


def test_an_index_finds_objects_by_value_as_they_change(admin: Kube) -> None:
    """An informer's index follows creates, changes, deletes and relists: a lookup returns the
    objects with that value now, without scanning the cache."""
    informer = Informer(admin, NODES, selector="t=runtime")
    informer.index(
        "zone",
        lambda v: str((v.get("metadata") or {}).get("labels", {}).get("zone", "")),  # type: ignore[union-attr]
    )
    runner = Runner()
    runner.start("informer", informer.run, informer.close)

    def names(zone: str) -> set[str]:
        return {str(v["metadata"]["name"]) for v in informer.by_index("zone", zone)}  # type: ignore[index]

    def until(check: Callable[[], bool]) -> None:
        assert informer.wait_until(lambda: True if check() else None, time.monotonic() + 10)

    try:
        assert informer.synced.wait(10)
        for name, zone in (("idx-1", "a"), ("idx-2", "a"), ("idx-3", "b")):
            admin.create(
                NODES, {"metadata": {"name": name, "labels": {"t": "runtime", "zone": zone}}}
            )
        until(lambda: names("a") == {"idx-1", "idx-2"} and names("b") == {"idx-3"})
        admin.merge_patch(NODES, "idx-2", {"metadata": {"labels": {"zone": "b"}}})
        until(lambda: names("a") == {"idx-1"} and names("b") == {"idx-2", "idx-3"})
        admin.delete(NODES, "idx-3")
        until(lambda: names("b") == {"idx-2"})
        informer._relist()
        assert names("a") == {"idx-1"} and names("b") == {"idx-2"} and names("") == set()
    finally:
        for name in ("idx-1", "idx-2", "idx-3"):
            admin.delete(NODES, name)
        assert runner.stop(10)


def test_a_cache_the_server_stopped_answering_is_not_fresh_and_is_again_after(
    plane: ControlPlane, admin: Kube
) -> None:
    """The API server frozen (SIGSTOP: the watch neither ends nor errs, as on a half-open
    connection): the informer stops being fresh, which the controller's Probe answers (the
    liveness probe then restarts it); resumed, it is fresh again."""
    informer = Informer(admin, NODES, selector="t=runtime", watch_seconds=1)
    runner = Runner()
    runner.start("informer", informer.run, informer.close)
    apiserver = plane.process("kube-apiserver")
    try:
        assert informer.synced.wait(10)
        assert wait(lambda: informer.fresh(within=3), 10)
        os.kill(apiserver.pid, signal.SIGSTOP)
        try:
            assert wait(lambda: not informer.fresh(within=3), 10)
        finally:
            os.kill(apiserver.pid, signal.SIGCONT)
        assert wait(lambda: informer.fresh(within=3), 60)
    finally:
        assert runner.stop(30)


def test_the_cache_keeps_no_managed_fields_or_last_applied_copy(admin: Kube) -> None:
    """What every object carries and no loop reads stays out of the caches (most of a small
    object's bytes, times every claim and PV in the cluster); the rest is kept as it is."""
    informer = Informer(admin, NODES, selector="t=runtime")
    runner = Runner()
    runner.start("informer", informer.run, informer.close, cache=True)
    applied = '{"kind":"Node","metadata":{"name":"trimmed-1"}}'
    try:
        assert informer.synced.wait(10)
        body = node("trimmed-1")
        body["metadata"]["annotations"] = {  # type: ignore[index]
            "kubectl.kubernetes.io/last-applied-configuration": applied,
            "kept": "yes",
        }
        admin.create(NODES, body)
        served = admin.get(NODES, "trimmed-1") or {}
        assert served["metadata"].get("managedFields")  # type: ignore[union-attr]
        cached = informer.wait_until(lambda: informer.get("trimmed-1"), time.monotonic() + 10)
        assert cached is not None
        meta = cached["metadata"]
        assert "managedFields" not in meta  # type: ignore[operator]
        assert meta["annotations"] == {"kept": "yes"}  # type: ignore[index]
        assert meta["labels"] == {"t": "runtime"}  # type: ignore[index]
    finally:
        admin.delete(NODES, "trimmed-1")
        assert runner.stop(10)


class FlakyWatches(Kube):
    """The real API server, with the first two watches failing as a broken connection or a
    500 would (a stand-in: the fault must hit the watch and not the list, which a real network
    fault cannot choose); the lists are counted."""

    def __init__(self, real: Kube) -> None:
        super().__init__(real._client)
        self.lists = 0
        self.watches = 0

    def list(self, *args: Any, **kwargs: Any) -> Any:
        self.lists += 1
        return super().list(*args, **kwargs)

    def watch(self, *args: Any, **kwargs: Any) -> Any:
        self.watches += 1
        if self.watches <= 2:
            raise ApiError(500, "InternalError", "the watch broke")
        return super().watch(*args, **kwargs)


def test_a_failed_watch_resumes_from_its_version_without_listing_again(admin: Kube) -> None:
    """A watch that fails (other than 410 Gone) is opened again from the last version seen:
    one list in all, and the changes made meanwhile still arrive (it used to list everything
    again on every watch error: at 10,000 claims, a full LIST per hiccup)."""
    kube = FlakyWatches(admin)
    informer = Informer(kube, NODES, selector="t=runtime")
    runner = Runner()
    runner.start("informer", informer.run, informer.close, cache=True)
    try:
        assert informer.synced.wait(10)
        admin.create(NODES, node("resumed-1"))
        assert informer.wait_until(lambda: informer.get("resumed-1"), time.monotonic() + 20)
        assert kube.watches >= 3 and kube.lists == 1, (kube.watches, kube.lists)
    finally:
        admin.delete(NODES, "resumed-1")
        assert runner.stop(10)


def node(name: str) -> dict[str, object]:
    return {"metadata": {"name": name, "labels": {"t": "runtime"}}}


def test_informer_follows_creates_updates_and_deletes(admin: Kube) -> None:
    informer = Informer(admin, NODES, selector="t=runtime")
    seen: list[str] = []
    informer.on_change(seen.append)
    runner = Runner()
    runner.start("informer", informer.run, informer.close)
    try:
        assert informer.synced.wait(10)
        admin.create(NODES, node("inf-1"))
        assert informer.wait_until(lambda: informer.get("inf-1"), time.monotonic() + 10)
        admin.merge_patch(NODES, "inf-1", {"metadata": {"annotations": {"a": "b"}}})

        def annotated() -> bool | None:
            value = informer.get("inf-1") or {}
            meta = value.get("metadata")
            return True if isinstance(meta, dict) and meta.get("annotations") else None

        assert informer.wait_until(annotated, time.monotonic() + 10)
        admin.delete(NODES, "inf-1")
        gone = informer.wait_until(
            lambda: True if informer.get("inf-1") is None else None, time.monotonic() + 10
        )
        assert gone
        assert seen.count("inf-1") >= 3  # created, changed, deleted
    finally:
        assert runner.stop(10), "the informer did not stop"


def test_runner_stops_every_loop_and_closes_watches(admin: Kube) -> None:
    """A watch blocked on a quiet resource ends when the runner stops (no waiting out the
    server's watch timeout)."""
    runner = Runner()
    informers = [
        Informer(admin, VOLUMES, selector=f"quiet={i}", watch_seconds=600) for i in range(3)
    ]
    for informer in informers:
        runner.start(informer.name, informer.run, informer.close)
    for informer in informers:
        assert informer.synced.wait(10)
    for informer in informers:  # every watch is open on the server and blocked
        assert wait(informer.watching, 10)
    began = time.monotonic()
    assert runner.stop(10)
    assert time.monotonic() - began < 3


def wait(probe: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def overlapping(*electors: LeaderElector) -> list[tuple[str, str]]:
    """Pairs of terms (one elector's each) that overlap in time: two leaders at once."""
    now = time.monotonic()
    terms = [
        (e.identity, began, ended if ended is not None else now)
        for e in electors
        for began, ended in e.terms
    ]
    return [
        (f"{a}@{a0:.2f}-{a1:.2f}", f"{b}@{b0:.2f}-{b1:.2f}")
        for i, (a, a0, a1) in enumerate(terms)
        for (b, b0, b1) in terms[i + 1 :]
        if a != b and a0 < b1 and b0 < a1
    ]


class Electors:
    """Electors on one Lease, each running in its own thread until stopped."""

    def __init__(self, kube: Kube, namespace: str, timings: LeaseTimings) -> None:
        self.kube, self.namespace, self.timings = kube, namespace, timings
        self.running: list[tuple[LeaderElector, threading.Event, threading.Thread]] = []

    def start(self, identity: str) -> LeaderElector:
        elector = LeaderElector(self.kube, self.namespace, "lease", self.timings, identity)
        stop = threading.Event()
        thread = threading.Thread(target=elector.run, args=(stop,), daemon=True)
        thread.start()
        self.running.append((elector, stop, thread))
        return elector

    def stop(self, elector: LeaderElector) -> None:
        for each, stop, thread in self.running:
            if each is elector:
                stop.set()
                thread.join(20)
                assert not thread.is_alive()

    def close(self) -> None:
        for elector, _, _ in self.running:
            self.stop(elector)


def test_one_leader_and_a_released_lease_is_taken_over_at_once(admin: Kube, namespace: str) -> None:
    electors = Electors(admin, namespace, LeaseTimings(60, 40, 0.5, 5))
    try:
        first = electors.start("first")
        assert first.wait_leading(10)
        second = electors.start("second")
        assert wait(lambda: second._observed != "", 10)  # it has read the held Lease
        electors.stop(first)
        # Released, so the second takes over within its retry period, not after 60 s.
        assert second.wait_leading(10)
        assert first.terms[-1][1] is not None
        assert second.terms[0][0] - first.terms[-1][1] < 5
        value = admin.get(LEASES, "lease", namespace)
        assert value is not None and Lease.of(value).holder == "second"
        assert overlapping(first, second) == []
    finally:
        electors.close()


def test_another_holders_lease_is_taken_only_once_seen_unchanged_for_its_duration(
    admin: Kube, namespace: str
) -> None:
    """Expiry by the time this replica saw the Lease last change, never by comparing the
    holder's renewTime with the local clock (the holder's clock may be behind)."""
    admin.create(
        LEASES,
        {
            "metadata": {"name": "lease"},
            "spec": {
                "holderIdentity": "holder-with-a-slow-clock",
                "renewTime": "2000-01-01T00:00:00.000000Z",
                "leaseDurationSeconds": 3,
            },
        },
        namespace,
    )
    electors = Electors(admin, namespace, LeaseTimings(3, 2, 0.5, 1))
    try:
        began = time.monotonic()
        elector = electors.start("newcomer")
        assert elector.wait_leading(15)
        assert time.monotonic() - began >= 3
    finally:
        electors.close()


def test_a_hung_api_server_pauses_the_leader_before_another_may_lead(
    plane: ControlPlane, admin: Kube, namespace: str
) -> None:
    """The API server frozen for longer than the Lease (SIGSTOP: requests hang, as in a network
    partition) and resumed: the leader stops taking work within the renew deadline although
    its request hangs, its process goes on, and there are never two leaders; afterwards one
    leads again and its gated loop works."""
    timings = LeaseTimings(duration=4, renew_deadline=2.5, retry_period=0.3, request_timeout=1)
    electors = Electors(admin, namespace, timings)
    done: list[tuple[str, float]] = []

    def reconcile(key: str) -> Result:
        done.append((key, time.monotonic()))
        return DONE

    try:
        first = electors.start("first")
        assert first.wait_leading(10)
        second = electors.start("second")
        assert wait(lambda: second._observed != "", 10)
        gated = Controller("gated", reconcile, workers=1, leader=first)
        stop = threading.Event()
        worker = threading.Thread(target=gated.run, args=(stop,), daemon=True)
        worker.start()
        apiserver = plane.process("kube-apiserver")
        os.kill(apiserver.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            assert wait(lambda: not first.is_leading(), timings.renew_deadline + 1)
            paused = time.monotonic()
            gated.queue.add("while-not-leading")
            time.sleep(timings.duration + 2 - (paused - frozen))  # the fault lasts this long
        finally:
            os.kill(apiserver.pid, signal.SIGCONT)
        assert paused - frozen <= timings.renew_deadline + 0.5
        assert wait(lambda: first.is_leading() or second.is_leading(), 30)
        leader = first if first.is_leading() else second
        if leader is first:
            assert wait(lambda: bool(done), 5)
            assert done[0][1] >= first.terms[-1][0]  # taken only once leading again
        else:
            assert done == []  # the key waits for a Lease the first no longer holds
        assert overlapping(first, second) == []
        stop.set()
        worker.join(10)
    finally:
        os.kill(plane.process("kube-apiserver").pid, signal.SIGCONT)
        electors.close()
