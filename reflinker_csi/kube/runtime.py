"""The reconcile runtime every Kubernetes loop of pg-reflinker runs on.

- Informer: a cached list+watch of one resource kind. It lists once, then follows a watch; it
  lists again only when the watch's version expired (410) or after an error. Every `resync`
  seconds it hands every cached key to its handlers again, from the cache (no list).
- WorkQueue: keys, each processed by one worker at a time; a key added while it is processed is
  processed once more afterwards; delayed adds for "requeue after N s".
- Controller: a reconcile function key -> Done or Requeue(seconds), run by a bounded number of
  workers; an exception requeues the key with exponential backoff (per key).
- LeaderElector: a coordination.k8s.io Lease with client-go's timings; loops that must run on
  one replica take keys only while it leads; it is released after their workers have stopped.
- Runner: starts every loop in its own thread, stops them all on SIGTERM and joins them.

The official client offers a watch helper and a leader election module; neither fits: the
watch helper yields untyped model objects or dicts and cannot be interrupted from another
thread, and the leader election blocks forever without releasing the Lease on shutdown. kopf
brings its own asyncio event loop, peering objects and handler model beside a threaded gRPC
server. So this module is small and ours, on the client's authenticated connection."""

from __future__ import annotations

import heapq
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from ..core.errors import ReflinkerError
from .api import JSON, LEASES, ApiError, Kube, Resource, WatchHandle
from .events import stamp
from .fields import obj
from .model import Lease, Meta

log = logging.getLogger(__name__)

Handler = Callable[[str], None]
T = TypeVar("T")


# -- informer -----------------------------------------------------------------------------------

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def trimmed(value: JSON) -> JSON:
    """An object as the caches keep it: without what no loop reads and every object carries
    (the server's managedFields, kubectl's copy of the last applied object), which is most of
    a small object's size."""
    meta = obj(value, "metadata")
    annotations = obj(meta, "annotations")
    if "managedFields" not in meta and LAST_APPLIED not in annotations:
        return value
    kept: JSON = {k: v for k, v in meta.items() if k != "managedFields"}
    if LAST_APPLIED in annotations:
        kept["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    return {**value, "metadata": kept}


class Informer:
    def __init__(
        self,
        kube: Kube,
        resource: Resource,
        selector: str = "",
        resync: float = 300.0,
        watch_seconds: int = 300,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.kube = kube
        self.on_error = on_error
        self.resource = resource
        self.selector = selector
        self.resync = resync
        self.watch_seconds = watch_seconds
        self.synced = threading.Event()
        self._cache: dict[str, JSON] = {}
        self._changed = threading.Condition()
        self._handlers: list[Handler] = []
        self._watch = WatchHandle()
        self._progress = time.monotonic()  # the last list, event, bookmark or watch end
        # name -> (what an object is looked up by, that value -> the keys of its objects)
        self._indexes: dict[str, tuple[Callable[[JSON], str], dict[str, set[str]]]] = {}

    def close(self) -> None:
        """End the current watch now; run() returns once its stop event is set."""
        self._watch.close()

    def watching(self) -> bool:
        """A watch is open on the server."""
        return self._watch.attached

    def fresh(self, within: float | None = None) -> bool:
        """Synced, and the server was heard from (a list, an event, a bookmark, a watch that
        ended on time) within `within` seconds (default: a watch's length and 90 s; the API
        server sends a bookmark about every minute and ends each watch after watch_seconds).
        False means the cache may be stale with no error to show it: the health probe says
        so, and kubelet restarts the process."""
        limit = self.watch_seconds + 90.0 if within is None else within
        return self.synced.is_set() and time.monotonic() - self._progress < limit

    @property
    def name(self) -> str:
        return f"informer/{self.resource.plural}" + (f"[{self.selector}]" if self.selector else "")

    def on_change(self, handler: Handler) -> None:
        """handler(key) runs after each change of key (and on resync); read the cache there."""
        self._handlers.append(handler)

    def index(self, name: str, value_of: Callable[[JSON], str]) -> None:
        """Keep the cache's objects indexed by value_of(object) ("" is not indexed), for
        by_index: a lookup costs the objects found, not the whole cache."""
        with self._changed:
            found: dict[str, set[str]] = {}
            for key, value in self._cache.items():
                if indexed := value_of(value):
                    found.setdefault(indexed, set()).add(key)
            self._indexes[name] = (value_of, found)

    def by_index(self, name: str, value: str) -> list[JSON]:
        with self._changed:
            keys = self._indexes[name][1].get(value, ())
            return [self._cache[k] for k in keys if k in self._cache]

    def _unindex(self, key: str) -> None:
        old = self._cache.get(key)
        if old is None:
            return
        for value_of, found in self._indexes.values():
            if (indexed := value_of(old)) and indexed in found:
                found[indexed].discard(key)
                if not found[indexed]:
                    del found[indexed]

    def _reindex(self, key: str, value: JSON) -> None:
        for value_of, found in self._indexes.values():
            if indexed := value_of(value):
                found.setdefault(indexed, set()).add(key)

    def get(self, key: str) -> JSON | None:
        with self._changed:
            return self._cache.get(key)

    def items(self) -> list[JSON]:
        with self._changed:
            return list(self._cache.values())

    def wait_until(self, probe: Callable[[], T | None], deadline: float) -> T | None:
        """probe() after every change until it returns a value or the deadline passes."""
        with self._changed:
            while True:
                found = probe()
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def _store(self, kind: str, value: JSON) -> str:
        value = trimmed(value)
        key = Meta.of(value).key
        with self._changed:
            self._unindex(key)
            if kind == "DELETED":
                self._cache.pop(key, None)
            else:
                self._cache[key] = value
                self._reindex(key, value)
            self._changed.notify_all()
        return key

    def _notify(self, key: str) -> None:
        for handler in self._handlers:
            try:
                handler(key)
            except Exception:
                log.exception("%s: handler for %s failed", self.name, key)

    def _relist(self) -> str:
        items, version = self.kube.list(self.resource, selector=self.selector)
        fresh = {Meta.of(i).key: trimmed(i) for i in items}
        with self._changed:
            gone = set(self._cache) - set(fresh)
            self._cache = fresh
            for _, found in self._indexes.values():
                found.clear()
            for key, value in fresh.items():
                self._reindex(key, value)
            self._changed.notify_all()
        self.synced.set()
        for key in [*fresh, *gone]:
            self._notify(key)
        return version

    def run(self, stop: threading.Event) -> None:
        backoff = 1.0
        version = ""
        next_resync = time.monotonic() + self.resync
        while not stop.is_set():
            try:
                if not version:
                    version = self._relist()
                    self._progress = time.monotonic()
                for kind, value in self.kube.watch(
                    self.resource, version, self.selector, self.watch_seconds, self._watch
                ):
                    self._progress = time.monotonic()
                    version = Meta.of(value).resource_version or version
                    if kind != "BOOKMARK":
                        self._notify(self._store(kind, value))
                    if time.monotonic() >= next_resync:
                        next_resync = time.monotonic() + self.resync
                        for key in list(self._cache):
                            self._notify(key)
                    if stop.is_set():
                        break
                self._progress = time.monotonic()  # the watch ended on time
                if time.monotonic() >= next_resync:
                    next_resync = time.monotonic() + self.resync
                    for key in list(self._cache):
                        self._notify(key)
                backoff = 1.0
            except Exception as err:
                if isinstance(err, ApiError) and err.status == 410:
                    version = ""  # expired: list again
                    continue
                if stop.is_set():
                    break
                if self.on_error is not None:
                    self.on_error(self.name)
                if isinstance(err, ApiError):
                    log.warning("%s: %s; retrying in %.0f s", self.name, err, backoff)
                else:
                    log.exception("%s failed; retrying in %.0f s", self.name, backoff)
                # The watch resumes from the last version seen: a failed watch is no reason to
                # list everything again (a version too old answers 410, which lists).
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)


# -- work queue -----------------------------------------------------------------------------


class WorkQueue:
    """Per-key: queued at most once, processed by one worker at a time."""

    def __init__(self, gate: Callable[[], bool] | None = None) -> None:
        self._gate = gate  # keys are handed out only while gate() is true
        self._ready: list[str] = []
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._again: set[str] = set()
        self._later: list[tuple[float, str]] = []  # may hold stale entries: see _due
        self._due: dict[str, float] = {}  # key -> when it is due: one delayed add per key
        self._cond = threading.Condition()
        self._closed = False

    def add(self, key: str, after: float = 0.0) -> None:
        with self._cond:
            if after > 0:
                # The earliest of a key's delayed adds is kept, so a key retried often (a
                # requeue on each resync, each event) holds one entry, not one per add.
                when = time.monotonic() + after
                if key not in self._due or when < self._due[key]:
                    self._due[key] = when
                    heapq.heappush(self._later, (when, key))
            elif key in self._active:
                self._again.add(key)
            elif key not in self._queued:
                self._queued.add(key)
                self._ready.append(key)
            self._cond.notify()

    def get(self) -> str | None:
        """The next key to process, or None once closed."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    when, key = heapq.heappop(self._later)
                    if self._due.get(key) != when:
                        continue  # superseded by an earlier add of the key
                    del self._due[key]
                    if key in self._active:
                        self._again.add(key)
                    elif key not in self._queued:
                        self._queued.add(key)
                        self._ready.append(key)
                if self._ready and self._gate is not None and not self._gate():
                    self._cond.wait(0.1)  # paused (not leading): keys wait, none is lost
                    continue
                if self._ready:
                    key = self._ready.pop(0)
                    self._queued.discard(key)
                    self._active.add(key)
                    return key
                wait = self._later[0][0] - now if self._later else None
                self._cond.wait(wait)
            return None

    def done(self, key: str) -> None:
        with self._cond:
            self._active.discard(key)
            if key in self._again:
                self._again.discard(key)
                if key not in self._queued:
                    self._queued.add(key)
                    self._ready.append(key)
            self._cond.notify()

    def pending(self) -> int:
        """Keys queued or waiting for their delay (each counted once)."""
        with self._cond:
            return len(self._queued | set(self._due))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# -- controller -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Requeue:
    after: float


DONE = None
Result = Requeue | None


class Controller:
    """Runs reconcile(key) for keys fed by informers, on `workers` threads."""

    def __init__(
        self,
        name: str,
        reconcile: Callable[[str], Result],
        workers: int = 2,
        leader: LeaderElector | None = None,
        max_backoff: float = 60.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.on_error = on_error
        self.reconcile = reconcile
        self.workers = workers
        self.leader = leader
        self.max_backoff = max_backoff
        self.queue = WorkQueue(leader.is_leading if leader is not None else None)
        self.ended = threading.Event()  # set once the workers have stopped
        if leader is not None:
            leader.follow(self.ended)
        self._failures: dict[str, int] = {}
        self._sources: list[Informer] = []

    def watch(self, informer: Informer, keys: Callable[[str], list[str]] | None = None) -> None:
        """Reconcile on changes of informer's objects: the key itself, or the keys keys(key)
        maps it to (e.g. the claims waiting for a source claim)."""
        self._sources.append(informer)
        if keys is None:
            informer.on_change(self.queue.add)
            return
        mapped = keys

        def add_mapped(key: str) -> None:
            for other in mapped(key):
                self.queue.add(other)

        informer.on_change(add_mapped)

    def reads(self, *informers: Informer) -> None:
        """Caches reconcile reads: it starts only once they have synced."""
        self._sources.extend(informers)

    def _work(self) -> None:
        while True:
            key = self.queue.get()
            if key is None:
                return
            try:
                result = self.reconcile(key)
                self._failures.pop(key, None)
                if result is not None:
                    self.queue.add(key, after=result.after)
            except Exception as err:
                count = self._failures.get(key, 0) + 1
                self._failures[key] = count
                self._count_error()
                delay = min(self.max_backoff, 0.5 * 2.0**count) * random.uniform(0.9, 1.1)
                if isinstance(err, ReflinkerError):
                    log.warning("%s: %s: %s; again in %.1f s", self.name, key, err, delay)
                else:
                    log.exception(
                        "%s: reconciling %s failed; again in %.1f s", self.name, key, delay
                    )
                self.queue.add(key, after=delay)
            finally:
                self.queue.done(key)

    def _count_error(self) -> None:
        """on_error (a metric), which must not end the worker that calls it."""
        if self.on_error is None:
            return
        try:
            self.on_error(self.name)
        except Exception:
            log.exception("%s: counting an error failed", self.name)

    def run(self, stop: threading.Event) -> None:
        """Workers start once the caches are synced; with a leader they take keys only while
        it leads (in-flight keys finish when the Lease is lost)."""
        try:
            self._run(stop)
        finally:
            self.ended.set()

    def _run(self, stop: threading.Event) -> None:
        for informer in self._sources:
            while not informer.synced.wait(0.5):
                if stop.is_set():
                    return
        threads = [
            threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for thread in threads:
            thread.start()
        stop.wait()
        self.queue.close()
        for thread in threads:
            thread.join()


# -- leader election --------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseTimings:
    """client-go's leader election timings. A follower takes the Lease over only after it has
    seen the Lease unchanged for `duration` (by its own clock, not the holder's renewTime); the
    holder stops leading when it has not renewed for `renew_deadline` < `duration`, so the two
    never lead at once. Each request gives up after `request_timeout` < `renew_deadline`."""

    duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    request_timeout: float = 4.0

    def __post_init__(self) -> None:
        if not (
            0 < self.retry_period < self.renew_deadline < self.duration
            and 0 < self.request_timeout < self.renew_deadline
        ):
            raise ValueError(
                "lease timings need retry period and request timeout < renew deadline < "
                f"lease duration, not {self}"
            )


class LeaderElector:
    """Holds a Lease for the loops that must run on one replica only (`is_leading()` gates
    their work queues). Losing the Lease pauses that work and calls `on_lost` (the process
    ends there, as controller-runtime's managers do: work a deposed leader still has in hand
    ends with it, its backup sessions closed by the kernel). On stop it keeps renewing until
    the loops registered with `follow` have ended, then releases the Lease so a successor
    takes over at once."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        timings: LeaseTimings = LeaseTimings(),
        identity: str = "",
        hold_on_stop: float = 30.0,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.kube = kube.with_timeout(timings.request_timeout)
        self.on_lost = on_lost
        self.namespace = namespace
        self.name = name
        self.timings = timings
        self.hold_on_stop = hold_on_stop  # at most this long for the loops to end on stop
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}"
        self.terms: list[tuple[float, float | None]] = []  # (began, ended), monotonic
        self._lock = threading.Lock()
        self._valid_until = 0.0  # monotonic; leading while before it
        self._observed = ""  # resourceVersion of the Lease last read
        self._observed_at = 0.0  # monotonic, when it last changed
        self._acquired = datetime.now(UTC)
        self._followers: list[threading.Event] = []

    def is_leading(self) -> bool:
        with self._lock:
            return time.monotonic() < self._valid_until

    def follow(self, ended: threading.Event) -> None:
        """Release the Lease on stop only once `ended` is set (a loop's workers have stopped)."""
        self._followers.append(ended)

    def wait_leading(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.is_leading():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._round()
            stop.wait(self.timings.retry_period * (1.0 if self.is_leading() else 1.2))
        # Keep the Lease while the leader's workers finish, then hand it over.
        deadline = time.monotonic() + self.hold_on_stop
        for ended in self._followers:
            while not ended.wait(self.timings.retry_period):
                if time.monotonic() >= deadline:
                    break
                self._round()
        self._release()

    def _round(self) -> None:
        began = time.monotonic()
        try:
            held = self._try(began)
        except Exception as err:
            log.warning("lease %s/%s: %s", self.namespace, self.name, err)
            held = False
        with self._lock:
            now = time.monotonic()
            was = bool(self.terms) and self.terms[-1][1] is None
            if held:
                self._valid_until = began + self.timings.renew_deadline
                if not was:
                    self.terms.append((now, None))
            elif was and now >= self._valid_until:
                self.terms[-1] = (self.terms[-1][0], self._valid_until)
            else:
                return
            ended = self._valid_until
        # Each term's bounds on the wall clock, in the log: terms of replicas never overlap.
        if held and not was:
            fields = {"lease": self.name, "id": self.identity, "since": _wall(now)}
            log.info("leading", extra={"fields": fields})
        elif not held:
            log.error(
                "lost the lease %s/%s: not renewed for %.0f s; its loops pause%s",
                self.namespace,
                self.name,
                self.timings.renew_deadline,
                "" if self.on_lost is None else " and the process ends",
                extra={"fields": {"lease": self.name, "id": self.identity, "until": _wall(ended)}},
            )
            if self.on_lost is not None:
                self.on_lost()

    def _try(self, now: float) -> bool:
        """Acquire or renew; False when another holder's Lease is not expired, or another
        writer came first."""
        value = self.kube.get(LEASES, self.name, self.namespace)
        lease = Lease.of(value) if value is not None else None
        if lease is not None and lease.resource_version != self._observed:
            self._observed, self._observed_at = lease.resource_version, now
        if (
            lease is not None
            and lease.holder not in (self.identity, "")
            and now < self._observed_at + self.timings.duration
        ):
            return False
        if lease is None or lease.holder != self.identity or not self.is_leading():
            self._acquired = datetime.now(UTC)
        version = lease.resource_version if lease is not None else ""
        return self._write(version, self._acquired, self.identity, self.timings.duration)

    def _write(self, version: str, acquired: datetime, holder: str, duration: float) -> bool:
        """Create the Lease (version "") or replace the one read at version; False when another
        writer came first (409)."""
        now = datetime.now(UTC)
        metadata: JSON = {"name": self.name, "namespace": self.namespace}
        if version:
            metadata["resourceVersion"] = version  # a concurrent writer gets 409
        body: JSON = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": holder,
                "acquireTime": stamp(acquired, fraction=True),
                "renewTime": stamp(now, fraction=True),
                "leaseDurationSeconds": max(1, int(duration)),
            },
        }
        try:
            if version:
                self.kube.replace(LEASES, self.name, body, self.namespace)
            else:
                self.kube.create(LEASES, body, self.namespace)
        except ApiError as err:
            if err.status == 409:
                return False
            raise
        return True

    def _release(self) -> None:
        with self._lock:
            ended = time.monotonic()
            leading = ended < self._valid_until
            self._valid_until = 0.0
            if self.terms and self.terms[-1][1] is None:
                self.terms[-1] = (self.terms[-1][0], ended)
        if not leading:
            return
        try:
            value = self.kube.get(LEASES, self.name, self.namespace)
            if value is None or Lease.of(value).holder != self.identity:
                return
            # Held by nobody: a successor takes it on its next try.
            if self._write(Lease.of(value).resource_version, datetime.now(UTC), "", 1):
                fields = {"lease": self.name, "id": self.identity, "until": _wall(ended)}
                log.info("released the lease", extra={"fields": fields})
        except ApiError as err:
            log.warning("cannot release lease %s/%s: %s", self.namespace, self.name, err)


def _wall(monotonic: float) -> str:
    """A monotonic instant on the wall clock (UTC, milliseconds)."""
    at = datetime.fromtimestamp(time.time() - (time.monotonic() - monotonic), UTC)
    return at.isoformat(timespec="milliseconds")


# -- runner ---------------------------------------------------------------------------------


class Runner:
    """Starts loops (callables taking a stop event) in threads; stop() ends and joins them,
    the work loops first and the caches (`cache=True`) last, so work in hand when the
    process is told to stop still sees the answers it waits for."""

    def __init__(self) -> None:
        self.stopping = threading.Event()  # set by stop(), or when a loop failed
        self._loops: list[tuple[bool, threading.Thread, threading.Event]] = []
        self._closers: list[tuple[bool, Callable[[], None]]] = []

    def start(
        self,
        name: str,
        loop: Callable[[threading.Event], None],
        close: Callable[[], None] | None = None,
        cache: bool = False,
    ) -> None:
        """Run loop(stop) in a thread; close() (if given) interrupts it when it is stopped.
        cache: a loop others read from (an informer), stopped after the rest."""
        if close is not None:
            self._closers.append((cache, close))
        stop = threading.Event()

        def body() -> None:
            try:
                loop(stop)
            except Exception:
                log.exception("loop %s failed; stopping", name)
                self.stopping.set()

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        self._loops.append((cache, thread, stop))

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop every loop and wait for it, the work loops, then the caches; True when all
        ended in time."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for caches in (False, True):
            for cache, _, stop in self._loops:
                if cache == caches:
                    stop.set()
            for cache, close in self._closers:
                if cache == caches:
                    close()
            for cache, thread, _ in self._loops:
                if cache == caches:
                    thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for _, t, _ in self._loops if t.is_alive()]
        if alive:
            log.warning("loops still running after %.0f s: %s", timeout, ", ".join(alive))
        return not alive
