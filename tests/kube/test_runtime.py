"""The reconcile runtime: work queue, informer cache, leader election, runner."""

from __future__ import annotations

import threading
import time

from reflinker_csi.kube.api import LEASES, NODES, VOLUMES, Kube
from reflinker_csi.kube.model import Lease
from reflinker_csi.kube.runtime import (
    DONE,
    Controller,
    Informer,
    LeaderElector,
    Result,
    Runner,
    WorkQueue,
)


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

    controller = Controller("test", reconcile, workers=1, max_backoff=0.5)
    stop = threading.Event()
    thread = threading.Thread(target=controller.run, args=(stop,))
    thread.start()
    controller.queue.add("k")
    assert succeeded.wait(10)
    stop.set()
    thread.join(10)
    assert len(calls) == 3 and calls[1] - calls[0] >= 0.4


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
    time.sleep(0.5)  # let every watch request reach the server
    assert runner.stop(10)


def test_one_leader_and_a_released_lease_is_taken_over_at_once(admin: Kube, namespace: str) -> None:
    first = LeaderElector(admin, namespace, "lease", duration=60)
    second = LeaderElector(admin, namespace, "lease", duration=60)
    second.identity = "second"
    stop_first, stop_second = threading.Event(), threading.Event()
    one = threading.Thread(target=first.run, args=(stop_first,))
    one.start()
    assert first.leading.wait(10)
    two = threading.Thread(target=second.run, args=(stop_second,))
    two.start()
    try:
        time.sleep(1)
        value = admin.get(LEASES, "lease", namespace)
        assert value is not None and Lease.of(value).holder == first.identity
        assert not second.leading.is_set()
        stop_first.set()
        one.join(10)
        # Released, so the second takes over within its retry period, not after 60 s.
        assert second.leading.wait(10)
        value = admin.get(LEASES, "lease", namespace)
        assert value is not None and Lease.of(value).holder == "second"
    finally:
        stop_first.set()
        stop_second.set()
        one.join(10)
        two.join(10)
