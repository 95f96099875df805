"""Volume and snapshot lifecycle: create (empty or reflink copy), delete, list. No gRPC here."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OperationInProgress,
    OutOfRange,
    StaleToken,
    VolumeInUse,
    VolumeNotFound,
    classify,
)
from .freshness import lag_bound
from .keys import (
    CTX_CLAIM,
    CTX_CLONE_MODE,
    CTX_GUID,
    CTX_HOST_PATH,
    CTX_NODE,
    CTX_PV,
    CTX_SOURCE_SNAPSHOT,
    CTX_SOURCE_VOLUME,
    METADATA_PREFIX,
    PARAM_CLONE_METHOD,
    PARAMETERS,
    PV_NAME,
    PVC_NAME,
    PVC_NAMESPACE,
)
from .layout import Layout, is_guid, new_guid
from .locator import SourceLocation, SourceLocator
from .observe import NoRecorder, Recorder
from .placement import Placement, Segments, check_clone_node, choose_node
from .records import CloneMethod, CloneMode, Kind, Phase, Registry, VolumeRecord

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 128


@dataclass(frozen=True)
class CreateSpec:
    name: str
    required_bytes: int = 0
    limit_bytes: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    source_volume_id: str = ""
    source_snapshot_id: str = ""
    preferred: Sequence[Segments] = ()
    requisite: Sequence[Segments] = ()
    # A source the caller located itself (the claim loop: a claim in another namespace or of
    # another driver, which has no record here). Its node is the clone's node.
    located_source: SourceLocation | None = None
    # More traceability for the volume_context (the claim loop's claim).
    context: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.name:
            raise InvalidArgument("name is required")
        if len(self.name) > MAX_NAME_LENGTH or not self.name.isprintable():
            raise InvalidArgument(
                f"name must be 1-{MAX_NAME_LENGTH} printable characters, got {len(self.name)}"
            )
        if self.required_bytes < 0 or self.limit_bytes < 0:
            raise OutOfRange("capacity_range bytes must not be negative")
        if self.limit_bytes and self.limit_bytes < self.required_bytes:
            raise OutOfRange(
                f"capacity_range limit_bytes {self.limit_bytes} is below required_bytes "
                f"{self.required_bytes}"
            )
        check_parameters(self.parameters, "StorageClass")


def check_parameters(parameters: dict[str, str], where: str) -> None:
    """The parameters of a StorageClass or VolumeSnapshotClass: cloneMethod, maxSourceLag and
    the sidecars' metadata, nothing else."""
    unknown = sorted(
        k for k in parameters if not k.startswith(METADATA_PREFIX) and k not in PARAMETERS
    )
    if unknown:
        raise InvalidArgument(
            f"unknown {where} parameters {unknown}; pg-reflinker takes only "
            f"{' and '.join(PARAMETERS)} besides the {METADATA_PREFIX}* metadata; remove "
            f"them from the {where}"
        )
    lag_bound(parameters, where)
    method = parameters.get(PARAM_CLONE_METHOD)
    if method is not None and method not in set(CloneMethod):
        raise InvalidArgument(
            f"{where} parameter {PARAM_CLONE_METHOD} is {method[:40]!r}; use "
            f"{', '.join(CloneMethod)} (auto: reflink_snapshot() when the source has it, "
            "native otherwise)"
        )


def _mismatch(record: VolumeRecord, spec: CreateSpec) -> str:
    if (record.required_bytes, record.limit_bytes) != (spec.required_bytes, spec.limit_bytes):
        return (
            f"capacity (required {record.required_bytes}, limit {record.limit_bytes}) "
            f"differs from (required {spec.required_bytes}, limit {spec.limit_bytes})"
        )
    theirs = record.source_volume_id or record.source_snapshot_id or "none"
    ours = spec.source_volume_id or spec.source_snapshot_id or "none"
    if theirs != ours:
        return f"content source {theirs!r} differs from {ours!r}"
    if record.parameters != spec.parameters:
        return "parameters differ"
    return ""


def _clone_mode(location: SourceLocation | None) -> CloneMode:
    return CloneMode.HOT if location is not None and location.server is not None else CloneMode.COLD


@dataclass(frozen=True)
class Origin:
    """What a new volume is made from: a record of this driver (cold copy of a volume nothing
    uses, or of a snapshot), a location with the server using the source (hot clone), or both."""

    record: VolumeRecord | None = None
    location: SourceLocation | None = None


class Materializer(Protocol):
    """Makes a reserved record's data exist, and removes it: on this host (standalone) or
    through the node agent of the record's node (Kubernetes)."""

    def placement(self, required_bytes: int, claim: str) -> Placement:
        """Where a new empty volume of that size for that claim ("namespace/name", or "") may
        go: nodes with room, most free space first, and what ties it to a node or keeps it
        from one."""

    def materialize(
        self, record: VolumeRecord, origin: Origin | None, timeout: float
    ) -> VolumeRecord:
        """Make the volume (empty when origin is None); return the record once Ready."""

    def free_bytes(self, node: str | None) -> int:
        """Free space for new volumes on node (None: the most any one node has)."""

    def publishers(self, record: VolumeRecord) -> list[str]: ...

    def dematerialize(self, record: VolumeRecord) -> None: ...


class VolumeService:
    """Creates, clones, deletes and lists volumes on one prefix through a Registry."""

    def __init__(
        self,
        layout: Layout,
        registry: Registry,
        locator: SourceLocator,
        node_id: str,
        materializer: Materializer,
        recorder: Recorder | None = None,
    ) -> None:
        self.recorder: Recorder = recorder or NoRecorder()
        self.layout = layout
        self.registry = registry
        self.locator = locator
        self.node_id = node_id
        self.materializer = materializer
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._placing = threading.Lock()

    @contextlib.contextmanager
    def _exclusive(self, key: str, what: str) -> Iterator[None]:
        with self._busy_lock:
            if key in self._busy:
                raise OperationInProgress(f"{what} is already in progress; retry later")
            self._busy.add(key)
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy.discard(key)

    # -- create ---------------------------------------------------------------------------

    def create(self, spec: CreateSpec, timeout: float = 60) -> VolumeRecord:
        """Create the named volume, or return it when a compatible request already made it.

        timeout bounds the wait for work done elsewhere (the node agent in Kubernetes mode)."""
        spec.validate()
        with self._exclusive("name:" + spec.name, f"creation of volume {spec.name!r}"):
            existing = self.registry.get_by_name(spec.name)
            if existing is not None:
                problem = _mismatch(existing, spec)
                if problem:
                    raise AlreadyExists(
                        f"volume {spec.name!r} already exists as {existing.guid} and {problem}; "
                        "use another name or repeat the original request"
                    )
                if existing.phase == Phase.DELETING:
                    raise OperationInProgress(
                        f"volume {spec.name!r} ({existing.guid}) is being deleted; retry later"
                    )
                if existing.phase == Phase.READY:
                    return existing
                return self._complete(existing, self._origin(existing, spec), timeout)
            origin = self._origin(None, spec)
            context = {**self._context_of(spec), **spec.context}
            # Empty volumes are placed one at a time: where one goes depends on where its
            # siblings went (the claims of one database instance), until its record is written.
            with self._placing if origin is None else contextlib.nullcontext():
                if origin is None:
                    claim = context.get(CTX_CLAIM, "")
                    placement = self.materializer.placement(spec.required_bytes, claim)
                    node = choose_node(spec.preferred, spec.requisite, placement)
                    mode = CloneMode.NONE
                else:
                    where = origin.location.node if origin.location else ""
                    node = check_clone_node(
                        where or (origin.record.node if origin.record else ""),
                        spec.preferred,
                        spec.requisite,
                    )
                    mode = _clone_mode(origin.location)
                    context.update(origin.location.context if origin.location else {})
                    context[CTX_CLONE_MODE] = str(mode)
                record = VolumeRecord(
                    guid=new_guid(),
                    name=spec.name,
                    node=node,
                    required_bytes=spec.required_bytes,
                    limit_bytes=spec.limit_bytes,
                    parameters=dict(spec.parameters),
                    source_volume_id=spec.source_volume_id,
                    source_snapshot_id=spec.source_snapshot_id,
                    clone_mode=mode,
                    context=context,
                )
                record, _ = self.registry.reserve(record)
            return self._complete(record, origin, timeout)

    def _origin(self, existing: VolumeRecord | None, spec: CreateSpec) -> Origin | None:
        """Find the source once per attempt: its record, and where it lives now."""
        if existing is not None and existing.hot_clone_dir:
            return Origin()  # the source server has made the copy: nothing left to find
        if spec.located_source is not None:
            return Origin(None, spec.located_source)
        source_id = spec.source_volume_id or spec.source_snapshot_id
        if not source_id:
            return None
        kind = Kind.VOLUME if spec.source_volume_id else Kind.SNAPSHOT
        return self._clone_source(source_id, kind)

    @staticmethod
    def _context_of(spec: CreateSpec) -> dict[str, str]:
        ctx = {}
        if PVC_NAME in spec.parameters:
            ctx[CTX_CLAIM] = f"{spec.parameters.get(PVC_NAMESPACE, '')}/{spec.parameters[PVC_NAME]}"
        if PV_NAME in spec.parameters:
            ctx[CTX_PV] = spec.parameters[PV_NAME]
        return ctx

    def _clone_source(self, source_id: str, kind: Kind) -> Origin:
        """The ready volume or snapshot to copy from, and where a source volume lives."""
        if not is_guid(source_id):
            raise NotFound(
                f"source {kind} {source_id[:80]!r} is not a pg-reflinker {kind} id; "
                f"copy only {kind}s this driver created"
            )
        source = self.registry.get(source_id)
        if source is None or source.kind != kind:
            raise NotFound(f"source {kind} {source_id} does not exist")
        if source.phase != Phase.READY:
            raise OperationInProgress(
                f"source {kind} {source_id} is {source.phase.lower()}; retry later"
            )
        if kind != Kind.VOLUME:
            return Origin(source, None)
        location = self.locator.locate(source)
        if location.in_use_at and location.server is None:
            raise VolumeInUse(
                f"source volume {source_id} is in use ({', '.join(location.in_use_at)}). "
                "A running database is cloned through its PostgreSQL server with "
                "reflink_snapshot(), which the Kubernetes mode (reflinker-csi controller) does "
                "for CNPG instances; to copy it otherwise, stop the server and unpublish the "
                "volume first"
            )
        return Origin(source, location)

    def _complete(
        self, record: VolumeRecord, origin: Origin | None, timeout: float
    ) -> VolumeRecord:
        method = record.method
        started = time.monotonic()
        try:
            made = self._make(record, origin, timeout)
        except Exception as err:
            known = classify(err)
            self.recorder.volume_made(method, known.code if known else "INTERNAL", 0.0)
            raise
        self.recorder.volume_made(method, "OK", time.monotonic() - started)
        return made

    def _make(self, record: VolumeRecord, origin: Origin | None, timeout: float) -> VolumeRecord:
        with self._exclusive("guid:" + record.guid, f"creation of {record.kind} {record.guid}"):
            if origin is None or origin.record is None:
                return self.materializer.materialize(record, origin, timeout)
            source = origin.record
            # Holding the source keeps it from being deleted while it is copied.
            with self._exclusive(
                "guid:" + source.guid, f"an operation on {source.kind} {source.guid}"
            ):
                return self.materializer.materialize(record, origin, timeout)

    # -- snapshots ------------------------------------------------------------------------

    def create_snapshot(
        self,
        name: str,
        source_volume_id: str,
        parameters: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> VolumeRecord:
        """A self-contained copy of a volume, kept until deleted, on the volume's node: a
        reflink copy of a volume nothing uses, or a hot clone (backup_label and WAL of its
        own) of one a database server uses (Kubernetes mode)."""
        parameters = dict(parameters or {})
        check_parameters(parameters, "VolumeSnapshotClass")
        if not name:
            raise InvalidArgument("name is required")
        if len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise InvalidArgument(f"name must be 1-{MAX_NAME_LENGTH} printable characters")
        if not source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        with self._exclusive("snapshot:" + name, f"creation of snapshot {name!r}"):
            existing = self.registry.get_by_name(name, Kind.SNAPSHOT)
            if existing is not None:
                if existing.source_volume_id != source_volume_id:
                    raise AlreadyExists(
                        f"snapshot {name!r} already exists as {existing.guid} of volume "
                        f"{existing.source_volume_id}, not of {source_volume_id[:80]}; "
                        "use another name"
                    )
                if existing.phase == Phase.READY:
                    return existing
                return self._complete(
                    existing, self._clone_source(existing.source_volume_id, Kind.VOLUME), timeout
                )
            origin = self._clone_source(source_volume_id, Kind.VOLUME)
            assert origin.record is not None
            source = origin.record
            mode = _clone_mode(origin.location)
            context = dict(origin.location.context) if origin.location else {}
            context[CTX_CLONE_MODE] = str(mode)
            record = VolumeRecord(
                guid=new_guid(),
                name=name,
                node=source.node,
                required_bytes=source.capacity_bytes,
                limit_bytes=0,
                parameters=parameters,
                source_volume_id=source.guid,
                kind=Kind.SNAPSHOT,
                clone_mode=mode,
                context=context,
            )
            record, _ = self.registry.reserve(record)
            return self._complete(record, origin, timeout)

    def delete_snapshot(self, snapshot_id: str) -> None:
        if not snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        if not is_guid(snapshot_id):
            return
        with self._exclusive("guid:" + snapshot_id, f"an operation on snapshot {snapshot_id}"):
            record = self.registry.get(snapshot_id)
            if record is None or record.kind != Kind.SNAPSHOT:
                return
            self.materializer.dematerialize(record)

    def list_snapshots(
        self, max_entries: int, starting_token: str, snapshot_id: str, source_volume_id: str
    ) -> tuple[list[VolumeRecord], str]:
        return self._page(
            Kind.SNAPSHOT,
            max_entries,
            starting_token,
            lambda r: (
                (not snapshot_id or r.guid == snapshot_id)
                and (not source_volume_id or r.source_volume_id == source_volume_id)
            ),
        )

    # -- delete ---------------------------------------------------------------------------

    def delete(self, volume_id: str) -> None:
        """Delete the volume and its data; succeed when it does not exist."""
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        if not is_guid(volume_id):
            return  # no pg-reflinker volume can have this id, so it is already gone
        with self._exclusive("guid:" + volume_id, f"an operation on volume {volume_id}"):
            record = self.registry.get(volume_id)
            if record is None or record.kind != Kind.VOLUME:
                return
            users = self.materializer.publishers(record)
            if users:
                raise VolumeInUse(
                    f"volume {volume_id} is still published at {', '.join(users)}; "
                    "unpublish it (delete the pod using it) before deleting the volume"
                )
            self.materializer.dematerialize(record)

    # -- read -----------------------------------------------------------------------------

    def get(self, volume_id: str) -> VolumeRecord:
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        record = self.registry.get(volume_id) if is_guid(volume_id) else None
        if record is None or record.phase != Phase.READY or record.kind != Kind.VOLUME:
            raise VolumeNotFound(volume_id[:80])
        return record

    def list_volumes(self, max_entries: int, starting_token: str) -> tuple[list[VolumeRecord], str]:
        """A page of ready volumes in id order; the token is the last id of the previous page."""
        return self._page(Kind.VOLUME, max_entries, starting_token, lambda r: True)

    def _page(
        self,
        kind: Kind,
        max_entries: int,
        starting_token: str,
        match: Callable[[VolumeRecord], bool],
    ) -> tuple[list[VolumeRecord], str]:
        if max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        if starting_token and not is_guid(starting_token):
            raise StaleToken(
                f"starting_token {starting_token[:80]!r} was not issued by this driver; "
                "restart the listing without a token"
            )
        records = [
            r
            for r in self.registry.list()
            if r.kind == kind and r.phase == Phase.READY and r.guid > starting_token and match(r)
        ]
        if max_entries and len(records) > max_entries:
            page = records[:max_entries]
            return page, page[-1].guid
        return records, ""

    def free_bytes(self, node: str | None) -> int:
        return self.materializer.free_bytes(node)

    def context(self, record: VolumeRecord) -> dict[str, str]:
        ctx = {
            CTX_GUID: record.guid,
            CTX_NODE: record.node,
            CTX_HOST_PATH: str(self.layout.volume_dir(record.guid)),
            **record.context,
        }
        if record.source_volume_id:
            ctx[CTX_SOURCE_VOLUME] = record.source_volume_id
        if record.source_snapshot_id:
            ctx[CTX_SOURCE_SNAPSHOT] = record.source_snapshot_id
        return ctx
