"""Captures of whole instances in Kubernetes mode (core/capture.py): which group a request
belongs to, the capture record (a ReflinkVolume of kind capture on the source's node, taken hot
like any copy), the piece a request is cut from it, and the capture's removal."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from ...core.capture import (
    PG_DATA,
    PG_TABLESPACE,
    PG_WAL,
    WAL_LINK,
    capture_name,
    expires_in,
    pieces_held,
    pieces_of,
    tablespace_piece,
)
from ...core.errors import FailedPrecondition
from ...core.keys import (
    AS_OF_KEYS,
    CNPG_BACKUP_LABEL,
    CNPG_INSTANCE_LABEL,
    CNPG_ROLE_LABEL,
    CNPG_TABLESPACE_LABEL,
    CTX_CLAIM,
    CTX_CLONE_METHOD,
    CTX_CLONE_MODE,
    CTX_GROUP,
    CTX_PIECE,
    CTX_PIECES,
    CTX_WAL_LINK,
    PARAM_CLONE_METHOD,
    PARAMETERS,
    SNAPSHOT_NAME,
    SNAPSHOT_NAMESPACE,
)
from ...core.layout import new_guid
from ...core.locator import SourceLocation
from ...core.records import CloneMethod, CloneMode, Kind, Phase, VolumeRecord
from ..api import VOLUMESNAPSHOTS, ApiError, Kube, domain_error
from ..model import Meta
from ..reflinkvolume import record_of
from ..registry import KubeRegistry
from ..runtime import DONE, Informer, Requeue, Result

log = logging.getLogger(__name__)

# Makes a reserved record Ready from a location (KubeMaterializer.materialize's hot path).
TakeHot = Callable[[VolumeRecord, SourceLocation, float], VolumeRecord]


class Captures:
    def __init__(
        self, kube: Kube, registry: KubeRegistry, claims: Informer, wait: float = 600.0
    ) -> None:
        self.wait = wait  # CAPTURE_WAIT
        self.kube = kube
        self.registry = registry
        self.claims = claims

    def group_of(self, record: VolumeRecord) -> str:
        """The group a request belongs to ("" for none): the claims of one new CNPG instance
        (cnpg.io/instanceName on the new claim), or the VolumeSnapshots of one CNPG Backup
        (cnpg.io/backupName on the VolumeSnapshot, named by csi-snapshotter's metadata)."""
        if record.kind == Kind.SNAPSHOT:
            name = record.parameters.get(SNAPSHOT_NAME, "")
            ns = record.parameters.get(SNAPSHOT_NAMESPACE, "")
            if not name or not ns:
                return ""
            try:
                value = self.kube.get(VOLUMESNAPSHOTS, name, ns)
            except ApiError as err:
                if err.status in (403, 404):
                    return ""
                raise domain_error(err, f"read VolumeSnapshot {ns}/{name}") from None
            backup = Meta.of(value or {}).labels.get(CNPG_BACKUP_LABEL, "")
            return f"backup {ns}/{backup}" if backup else ""
        if record.kind != Kind.VOLUME:
            return ""
        claim = record.context.get(CTX_CLAIM, "")
        value = self.claims.get(claim) if claim else None
        instance = Meta.of(value or {}).labels.get(CNPG_INSTANCE_LABEL, "")
        ns = claim.partition("/")[0]
        return f"instance {ns}/{instance}" if instance else ""

    def cut(
        self,
        record: VolumeRecord,
        location: SourceLocation,
        group: str,
        deadline: float,
        take_hot: TakeHot,
    ) -> None:
        """Find or take the group's capture of the source instance, then ask the node agent for
        record's piece of it (spec.capture)."""
        server = location.server
        assert server is not None
        name = capture_name(group, f"{server.namespace}/{server.pod}")
        capture = self.registry.get_by_name(name, Kind.CAPTURE)
        if capture is None:
            self._check_siblings(record, name)
            method = record.parameters.get(PARAM_CLONE_METHOD)
            pieces = pieces_of(location.volumes)
            if method == CloneMethod.FUNCTION and any(p.startswith(PG_TABLESPACE) for p in pieces):
                raise FailedPrecondition(
                    f"{server.where} has tablespaces, which reflink_snapshot() does not copy "
                    "(cloneMethod function); copies of the whole instance need cloneMethod "
                    "native or auto in the StorageClass or VolumeSnapshotClass"
                )
            context = {k: v for k, v in location.context.items() if k != CTX_PIECE}
            context.update(
                {
                    CTX_GROUP: name,
                    CTX_PIECES: ",".join(pieces),
                    CTX_CLONE_MODE: str(CloneMode.HOT),
                }
            )
            capture, _ = self.registry.reserve(
                VolumeRecord(
                    guid=new_guid(),
                    name=name,
                    node=location.node,
                    required_bytes=0,
                    limit_bytes=0,
                    # The class's options the capture is taken with (the first piece's).
                    parameters={k: v for k in PARAMETERS if (v := record.parameters.get(k))},
                    kind=Kind.CAPTURE,
                    clone_mode=CloneMode.HOT,
                    context=context,
                )
            )
            log.info(
                "capture reserved",
                extra={"fields": {"capture": capture.guid, "group": group, "for": record.guid}},
            )
        if capture.phase != Phase.READY:
            whole = dataclasses.replace(
                location, context={k: v for k, v in location.context.items() if k != CTX_PIECE}
            )
            capture = take_hot(capture, whole, deadline)
        context = {CTX_CLONE_METHOD: capture.clone_method} if capture.clone_method else {}
        piece = location.context.get(CTX_PIECE, PG_DATA)
        if piece == PG_DATA and PG_WAL in pieces_held(capture) and self._wal_volume(record):
            context[CTX_WAL_LINK] = WAL_LINK
        as_of = {k: capture.context[k] for k in AS_OF_KEYS if k in capture.context}
        self.registry.set_capture(record, capture.guid, name, {**context, **as_of})
        if as_of:  # every piece is as of its capture
            self.registry.set_as_of(record, as_of)

    def _wal_volume(self, record: VolumeRecord) -> bool:
        """Whether the PG_DATA piece's instance keeps its WAL on a volume of its own: a new
        CNPG instance that has a WAL claim (CNPG creates its claims together), or a snapshot
        of a CNPG Backup (which snapshots the WAL claim too, and restores into an instance
        with one, as the source had)."""
        if record.kind == Kind.SNAPSHOT:
            return True
        ns, _, claim = record.context.get(CTX_CLAIM, "").partition("/")
        labels = Meta.of(self.claims.get(f"{ns}/{claim}") or {}).labels
        instance = labels.get(CNPG_INSTANCE_LABEL, "")
        for value in self.claims.items():
            meta = Meta.of(value)
            if (
                meta.namespace == ns
                and meta.labels.get(CNPG_INSTANCE_LABEL) == instance
                and meta.labels.get(CNPG_ROLE_LABEL) == PG_WAL
            ):
                return True
        return False

    def _check_siblings(self, record: VolumeRecord, name: str) -> None:
        """A request whose siblings were cut from a capture that is gone (every piece cut, or
        expired) would mix two moments in one set: refused."""
        for other in self.registry.list():
            if other.guid != record.guid and other.capture and other.context.get(CTX_GROUP) == name:
                raise FailedPrecondition(
                    f"{record.kind} {record.name} belongs with {other.kind} {other.name}, which "
                    f"was cut from a capture of the source instance that is gone (removed once "
                    f"every piece was cut, or after waiting for the rest of its group); the "
                    "pieces of one instance must come from one capture: delete the new "
                    "instance's claims (or the Backup's snapshots) and start over"
                )

    def release(self, record: VolumeRecord) -> None:
        """Remove record's capture once every piece its group wants has been cut: the pieces
        of the new instance's claims (CNPG creates them together, before the capture is
        taken), or every piece the capture holds (a Backup snapshots every claim)."""
        capture = self.registry.get(record.capture)
        if capture is None or capture.phase != Phase.READY:
            return
        cut = {
            r.context.get(CTX_PIECE, PG_DATA)
            for r in self.registry.list()
            if r.capture == capture.guid and r.phase == Phase.READY
        }
        wanted = self._wanted(record) or set(pieces_held(capture))
        if wanted <= cut:
            log.info(
                "capture removed, every piece cut",
                extra={"fields": {"capture": capture.guid, "pieces": ",".join(sorted(cut))}},
            )
            self.registry.remove(capture.guid)

    def _wanted(self, record: VolumeRecord) -> set[str]:
        """The pieces the claims of record's new CNPG instance want (empty: unknown)."""
        if record.kind != Kind.VOLUME:
            return set()
        ns, _, name = record.context.get(CTX_CLAIM, "").partition("/")
        instance = Meta.of(self.claims.get(f"{ns}/{name}") or {}).labels.get(
            CNPG_INSTANCE_LABEL, ""
        )
        wanted: set[str] = set()
        for value in self.claims.items():
            labels = Meta.of(value).labels
            if Meta.of(value).namespace != ns or labels.get(CNPG_INSTANCE_LABEL) != instance:
                continue
            role = labels.get(CNPG_ROLE_LABEL, "")
            if role == PG_TABLESPACE:
                space = labels.get(CNPG_TABLESPACE_LABEL, "")
                if not space:
                    return set()
                wanted.add(tablespace_piece(space))
            elif role in (PG_DATA, PG_WAL):
                wanted.add(role)
        return wanted if instance else set()

    def reconcile(self, key: str) -> Result:
        """A capture expires CAPTURE_WAIT seconds after it was made, whatever its state (an
        attempt still taking it has ended by then if BACKUP_MODE_LIMIT is shorter)."""
        value = self.registry.informer.get(key)
        if value is None:
            return DONE
        capture = record_of(value)
        if capture.kind != Kind.CAPTURE or capture.phase == Phase.DELETING:
            return DONE
        left = expires_in(capture, time.time(), self.wait)
        if left > 0:
            return Requeue(max(1.0, left + 0.5))
        log.info("capture expired", extra={"fields": {"capture": capture.guid}})
        self.registry.remove(capture.guid)
        return DONE
