"""Volume and snapshot lifecycle: create (empty or reflink copy), delete, list. No gRPC here."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import reflink
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OperationInProgress,
    OutOfRange,
    StaleToken,
    VolumeInUse,
    VolumeNotFound,
)
from .layout import DELETING_SUFFIX, PARTIAL_SUFFIX, Layout, is_guid, new_guid
from .locator import SourceLocator
from .mounts import mounts_of
from .placement import Segments, check_clone_node, choose_node
from .registry import CREATING, DELETING, READY, SNAPSHOT, VOLUME, Registry, VolumeRecord

log = logging.getLogger(__name__)

# Parameters external-provisioner adds (--extra-create-metadata); they are recorded, not options.
METADATA_PREFIX = "csi.storage.k8s.io/"
PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
PV_NAME = "csi.storage.k8s.io/pv/name"
MAX_NAME_LENGTH = 128

# Keys of volume_context, shown on the PV as spec.csi.volumeAttributes.
CTX_GUID = "pg-reflinker.csi/guid"
CTX_NODE = "pg-reflinker.csi/node"
CTX_HOST_PATH = "pg-reflinker.csi/host-path"
CTX_SOURCE_VOLUME = "pg-reflinker.csi/source-volume"
CTX_SOURCE_SNAPSHOT = "pg-reflinker.csi/source-snapshot"
CTX_CLAIM = "pg-reflinker.csi/claim"
CTX_PV = "pg-reflinker.csi/pv"


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
        unknown = sorted(k for k in self.parameters if not k.startswith(METADATA_PREFIX))
        if unknown:
            raise InvalidArgument(
                f"unknown StorageClass parameters {unknown}; pg-reflinker takes none besides the "
                f"{METADATA_PREFIX}* metadata; remove them from the StorageClass"
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


class VolumeService:
    """Creates, clones, deletes and lists volumes on one prefix through a Registry."""

    def __init__(
        self, layout: Layout, registry: Registry, locator: SourceLocator, node_id: str
    ) -> None:
        self.layout = layout
        self.registry = registry
        self.locator = locator
        self.node_id = node_id
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()

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

    def create(self, spec: CreateSpec) -> VolumeRecord:
        """Create the named volume, or return it when a compatible request already made it."""
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
                if existing.state == DELETING:
                    raise OperationInProgress(
                        f"volume {spec.name!r} ({existing.guid}) is being deleted; retry later"
                    )
                return self._complete(existing)
            source_id = spec.source_volume_id or spec.source_snapshot_id
            if source_id:
                kind = VOLUME if spec.source_volume_id else SNAPSHOT
                source = self._clone_source(source_id, kind)
                node = check_clone_node(source.node, spec.preferred, spec.requisite)
            else:
                node = choose_node(spec.preferred, spec.requisite, {self.node_id}, self.node_id)
            record = VolumeRecord(
                guid=new_guid(),
                name=spec.name,
                node=node,
                required_bytes=spec.required_bytes,
                limit_bytes=spec.limit_bytes,
                parameters=dict(spec.parameters),
                source_volume_id=spec.source_volume_id,
                source_snapshot_id=spec.source_snapshot_id,
                state=CREATING,
                context=self._context_of(spec),
            )
            record, _ = self.registry.reserve(record)
            return self._complete(record)

    @staticmethod
    def _context_of(spec: CreateSpec) -> dict[str, str]:
        ctx = {}
        if PVC_NAME in spec.parameters:
            ctx[CTX_CLAIM] = f"{spec.parameters.get(PVC_NAMESPACE, '')}/{spec.parameters[PVC_NAME]}"
        if PV_NAME in spec.parameters:
            ctx[CTX_PV] = spec.parameters[PV_NAME]
        return ctx

    def _clone_source(self, source_id: str, kind: str) -> VolumeRecord:
        """The ready volume or snapshot to copy from; a volume must not be in use."""
        if not is_guid(source_id):
            raise NotFound(
                f"source {kind} {source_id[:80]!r} is not a pg-reflinker {kind} id; "
                f"copy only {kind}s this driver created"
            )
        source = self.registry.get(source_id)
        if source is None or source.kind != kind:
            raise NotFound(f"source {kind} {source_id} does not exist")
        if source.state != READY:
            raise OperationInProgress(f"source {kind} {source_id} is {source.state}; retry later")
        if kind == VOLUME:
            location = self.locator.locate(source)
            if location.in_use_at:
                raise VolumeInUse(
                    f"source volume {source_id} is in use (mounted at "
                    f"{', '.join(location.in_use_at)}). A running database is cloned through its "
                    "PostgreSQL server with reflink_snapshot(), which the Kubernetes mode "
                    "(reflinker-csi controller) does; to copy it here, stop the server and "
                    "unpublish the volume first"
                )
        return source

    def data_dir(self, record: VolumeRecord) -> Path:
        if record.kind == SNAPSHOT:
            return self.layout.snapshot_dir(record.guid)
        return self.layout.volume_dir(record.guid)

    def _complete(self, record: VolumeRecord) -> VolumeRecord:
        if record.state == READY:
            return record
        with self._exclusive("guid:" + record.guid, f"creation of {record.kind} {record.guid}"):
            final = self.data_dir(record)
            if not os.path.lexists(final):
                source_id = record.source_volume_id or record.source_snapshot_id
                if source_id:
                    kind = VOLUME if record.source_volume_id else SNAPSHOT
                    self._reflink_copy(self._clone_source(source_id, kind), record)
                else:
                    final.mkdir(mode=0o750)
            ready = record.with_state(READY)
            self.registry.update(ready)
            return ready

    def _reflink_copy(self, source: VolumeRecord, record: VolumeRecord) -> None:
        """Cold copy: reflink the source tree into <dir>.partial, then rename it into place."""
        with self._exclusive("guid:" + source.guid, f"an operation on {source.kind} {source.guid}"):
            src = self.data_dir(source)
            if not src.is_dir() or src.is_symlink():
                raise FailedPrecondition(
                    f"the directory {src} of source {source.kind} {source.guid} is missing on "
                    f"node {source.node}; the source is lost, delete it"
                )
            reflink.probe(self.layout.state_dir)
            final = self.data_dir(record)
            final.parent.mkdir(mode=0o700, exist_ok=True)
            partial = final.with_name(final.name + PARTIAL_SUFFIX)
            _remove_tree(partial)
            try:
                files = reflink.copy_tree(src, partial)
                os.rename(partial, final)
            except BaseException:
                _remove_tree(partial)
                raise
            log.info(
                "reflinked %s %s from %s %s (%d files)",
                record.kind,
                record.guid,
                source.kind,
                source.guid,
                files,
            )

    # -- snapshots ------------------------------------------------------------------------

    def create_snapshot(self, name: str, source_volume_id: str) -> VolumeRecord:
        """A reflink copy of a volume that nothing is using, kept until deleted."""
        if not name:
            raise InvalidArgument("name is required")
        if len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise InvalidArgument(f"name must be 1-{MAX_NAME_LENGTH} printable characters")
        if not source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        with self._exclusive("snapshot:" + name, f"creation of snapshot {name!r}"):
            existing = self.registry.get_by_name(name, SNAPSHOT)
            if existing is not None:
                if existing.source_volume_id != source_volume_id:
                    raise AlreadyExists(
                        f"snapshot {name!r} already exists as {existing.guid} of volume "
                        f"{existing.source_volume_id}, not of {source_volume_id[:80]}; "
                        "use another name"
                    )
                return self._complete(existing)
            source = self._clone_source(source_volume_id, VOLUME)
            record = VolumeRecord(
                guid=new_guid(),
                name=name,
                node=source.node,
                required_bytes=source.capacity_bytes,
                limit_bytes=0,
                source_volume_id=source.guid,
                kind=SNAPSHOT,
                state=CREATING,
            )
            record, _ = self.registry.reserve(record)
            return self._complete(record)

    def delete_snapshot(self, snapshot_id: str) -> None:
        if not snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        if not is_guid(snapshot_id):
            return
        with self._exclusive("guid:" + snapshot_id, f"an operation on snapshot {snapshot_id}"):
            record = self.registry.get(snapshot_id)
            if record is None or record.kind != SNAPSHOT:
                return
            self._delete_record(record)

    def list_snapshots(
        self, max_entries: int, starting_token: str, snapshot_id: str, source_volume_id: str
    ) -> tuple[list[VolumeRecord], str]:
        return self._page(
            SNAPSHOT,
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
            if record is None or record.kind != VOLUME:
                return
            users = self.publishers(volume_id)
            if users:
                raise VolumeInUse(
                    f"volume {volume_id} is still published at {', '.join(users)}; "
                    "unpublish it (delete the pod using it) before deleting the volume"
                )
            self._delete_record(record)

    def _delete_record(self, record: VolumeRecord) -> None:
        if record.state != DELETING:
            self.registry.update(record.with_state(DELETING))
        final = self.data_dir(record)
        doomed = final.with_name(final.name + DELETING_SUFFIX)
        if os.path.lexists(final):
            # One rename makes the data vanish at once; the slow removal follows.
            os.rename(final, doomed)
        _remove_tree(doomed)
        _remove_tree(final.with_name(final.name + PARTIAL_SUFFIX))
        self.registry.remove(record.guid)

    def publishers(self, guid: str) -> list[str]:
        path = self.layout.volume_dir(guid)
        if not path.is_dir() or path.is_symlink():
            return []
        return [m.mount_point for m in mounts_of(path)]

    # -- read -----------------------------------------------------------------------------

    def get(self, volume_id: str) -> VolumeRecord:
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        record = self.registry.get(volume_id) if is_guid(volume_id) else None
        if record is None or record.state != READY or record.kind != VOLUME:
            raise VolumeNotFound(volume_id[:80])
        return record

    def list_volumes(self, max_entries: int, starting_token: str) -> tuple[list[VolumeRecord], str]:
        """A page of ready volumes in id order; the token is the last id of the previous page."""
        return self._page(VOLUME, max_entries, starting_token, lambda r: True)

    def _page(
        self,
        kind: str,
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
            if r.kind == kind and r.state == READY and r.guid > starting_token and match(r)
        ]
        if max_entries and len(records) > max_entries:
            page = records[:max_entries]
            return page, page[-1].guid
        return records, ""

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

    # -- start-up -------------------------------------------------------------------------

    def recover(self) -> None:
        """Finish what a crash interrupted: drop partial copies, complete deletions."""
        places = [self.layout.prefix]
        if self.layout.snapshots_dir.is_dir():
            places.append(self.layout.snapshots_dir)
        for place in places:
            for entry in place.iterdir():
                name = entry.name
                for suffix in (PARTIAL_SUFFIX, DELETING_SUFFIX):
                    if name.endswith(suffix) and is_guid(name[: -len(suffix)]):
                        log.info("removing leftover %s", entry)
                        _remove_tree(entry)
        for record in self.registry.list():
            if record.state == DELETING:
                self._delete_record(record)


def _remove_tree(path: Path) -> None:
    """Remove path without following symlinks, inside or at the top."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    # On Linux rmtree works through directory file descriptors and never follows symlinks
    # (shutil.rmtree.avoids_symlink_attacks).
    shutil.rmtree(path)
