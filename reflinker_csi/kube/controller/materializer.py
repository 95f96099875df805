"""Controller side of Kubernetes mode: the hot clone through the source's server, then the
node agent makes the volume; CreateVolume waits by watching the record. Placement and capacity
come from what each node plugin reports on its Node."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from datetime import UTC, datetime

from ...core.capture import PG_DATA, PG_TABLESPACE, pieces_held, pieces_of
from ...core.errors import (
    FailedPrecondition,
    OperationInProgress,
    SourceUnavailable,
    from_code,
)
from ...core.freshness import Position, check_lag, lag_bound
from ...core.keys import (
    ANNOTATION_FILESYSTEM,
    ANNOTATION_FLOOR_BYTES,
    ANNOTATION_FREE_BYTES,
    ANNOTATION_REPORTED_AT,
    AS_OF_KEYS,
    CNPG_CLUSTER_LABEL,
    CNPG_INSTANCE_LABEL,
    CTX_CLAIM,
    CTX_GROUP,
    CTX_PIECE,
    CTX_SOURCE_PVC,
    PARAM_CLONE_METHOD,
    SELECTED_NODE_ANNOTATION,
    SNAPSHOT_NAME,
    SNAPSHOT_NAMESPACE,
    TOPOLOGY_KEY,
)
from ...core.layout import Layout, is_guid
from ...core.locator import SourceLocation, SourceServer
from ...core.observe import NoRecorder, Recorder
from ...core.placement import Placement
from ...core.records import CloneMethod, CloneMode, Kind, Phase, VolumeRecord
from ...core.space import check_room
from ...core.volumes import Origin
from ...pg.backup import native_clone
from ...pg.source import call_function, has_function, position, session
from ..api import JSON
from ..events import EventRecorder
from ..fields import obj
from ..handoff import RecordCopier
from ..model import CSINode, Meta, parse_time
from ..registry import KubeRegistry
from ..runtime import Informer
from .captures import Captures
from .gate import SourceGate

log = logging.getLogger(__name__)

# A node whose plugin has not reported for this long is not offered for new empty volumes.
REPORT_STALE_SECONDS = 300.0


def host_path_of(returned: str, location: SourceLocation, layout: Layout, label: str) -> str:
    """Map the directory reflink_snapshot() returned (as the server sees it) to the node."""
    own = layout.volume_dir(label)
    if os.path.normpath(returned) == str(own):
        return str(own)
    mount = location.mount_path.rstrip("/")
    normal = os.path.normpath(returned)
    if mount and normal.startswith(mount + "/") and ".." not in returned.split("/"):
        inside = normal[len(mount) + 1 :]
        host = location.host_path / inside
        if host.name == label:
            return str(host)
    raise FailedPrecondition(
        f"reflink_snapshot() returned {returned!r}, which is neither {own} nor a {label} "
        f"directory inside the source volume (mounted at {location.mount_path or '?'}); "
        "check pg_reflinker.hostpath_prefix on the source server"
    )


class NodeReports:
    """Which nodes run the node plugin (CSINode) and how much free space each reported."""

    def __init__(self, csinodes: Informer, nodes: Informer, driver_name: str) -> None:
        self.csinodes = csinodes
        self.nodes = nodes
        self.driver_name = driver_name

    def free(self) -> dict[str, int]:
        """node -> room for new volumes (free bytes above the node's floor), for nodes with a
        registered plugin and a fresh report."""
        return {node: max(0, free - floor) for node, (free, floor) in self.reports().items()}

    def reports(self) -> dict[str, tuple[int, int]]:
        """node -> (free bytes, floor bytes) as its node plugin reported them."""
        running = {
            c.name
            for c in map(CSINode.of, self.csinodes.items())
            if TOPOLOGY_KEY in c.topology_keys.get(self.driver_name, ())
        }
        now = datetime.now(UTC)
        report: dict[str, tuple[int, int]] = {}
        for value in self.nodes.items():
            meta = Meta.of(value)
            raw = meta.annotations.get(ANNOTATION_FREE_BYTES, "")
            floor = meta.annotations.get(ANNOTATION_FLOOR_BYTES, "0")
            at = parse_time(meta.annotations.get(ANNOTATION_REPORTED_AT, ""))
            if meta.name not in running or not raw.isdigit() or at is None:
                continue
            if (now - at).total_seconds() > REPORT_STALE_SECONDS:
                continue
            report[meta.name] = (int(raw), int(floor) if floor.isdigit() else 0)
        return report

    def cordoned(self) -> set[str]:
        """Nodes that take no new pods (kubectl cordon, drain)."""
        return {
            Meta.of(value).name
            for value in self.nodes.items()
            if obj(value, "spec").get("unschedulable") is True
        }

    def filesystem(self, node: str) -> str:
        """The type of the node's HOSTPATH_PREFIX filesystem as its plugin reported it ("" if
        unknown)."""
        for value in self.nodes.items():
            meta = Meta.of(value)
            if meta.name == node:
                return meta.annotations.get(ANNOTATION_FILESYSTEM, "")
        return ""


class KubeMaterializer:
    """Reserve -> (hot clone) -> wait for the node agent to report Ready.

    A source instance serves one backup at a time (the others wait for it a few seconds, then
    are retried), and none stays in backup mode longer than backup_limit seconds."""

    def __init__(
        self,
        registry: KubeRegistry,
        reports: NodeReports,
        layout: Layout,
        connect_timeout: float,
        statement_timeout: float,
        captures: Captures,
        claims: Informer,
        gate: SourceGate,
        backup_limit: float = 60.0,
        events: EventRecorder | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.gate = gate
        self.events = events
        self.recorder = recorder or NoRecorder()
        self.captures = captures
        self.claims = claims
        self.registry = registry
        self.reports = reports
        self.layout = layout
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self.backup_limit = backup_limit

    def placement(self, required_bytes: int, claim: str) -> Placement:
        """Schedulable nodes with room, most free first. A claim the scheduler placed goes to
        its pod's node; a CloudNativePG instance's claims (PGDATA, WAL, tablespaces) go together,
        and away from the nodes of the same Cluster's other instances."""
        free = self.reports.free()
        cordoned = self.reports.cordoned()
        fitting = [
            n for n, b in free.items() if b > 0 and required_bytes <= b and n not in cordoned
        ]
        fitting.sort()
        fitting.sort(key=free.__getitem__, reverse=True)  # most free first, then by name
        value = self.claims.get(claim) if claim else None
        if value is None:
            return Placement(fitting)
        meta = Meta.of(value)
        selected = meta.annotations.get(SELECTED_NODE_ANNOTATION, "")
        if selected:
            return Placement(
                fitting, selected, f"the pod of claim {claim}, which was scheduled there"
            )
        cluster = meta.labels.get(CNPG_CLUSTER_LABEL, "")
        instance = meta.labels.get(CNPG_INSTANCE_LABEL, "")
        if not cluster or not instance:
            return Placement(fitting)
        nodes = {
            r.context[CTX_CLAIM]: r.node
            for r in self.registry.list()
            if r.kind == Kind.VOLUME and r.node and r.context.get(CTX_CLAIM)
        }
        avoid = set()
        for other in map(Meta.of, self.claims.items()):
            if (
                other.namespace != meta.namespace
                or other.name == meta.name
                or other.labels.get(CNPG_CLUSTER_LABEL) != cluster
                or other.key not in nodes
            ):
                continue
            node = nodes[other.key]
            if other.labels.get(CNPG_INSTANCE_LABEL) == instance:
                what = f"claim {other.key} of the same CloudNativePG instance {instance}"
                return Placement(fitting, node, what)
            avoid.add(node)
        return Placement(fitting, avoid=frozenset(avoid))

    def free_bytes(self, node: str | None) -> int:
        free = self.reports.free()
        if node is None:
            return max(free.values(), default=0)
        return free.get(node, 0)

    def materialize(
        self, record: VolumeRecord, origin: Origin | None, timeout: float
    ) -> VolumeRecord:
        deadline = time.monotonic() + max(1.0, timeout - 1.0)
        current = self.registry.get_by_name(record.name, record.kind) or record
        location = origin.location if origin else None
        if current.phase == Phase.READY:
            return current
        gone = bool(current.capture) and self.registry.get(current.capture) is None
        if gone:  # cut from a capture that is gone: a new one (or a refusal, core/capture.py)
            self.registry.set_capture(record, "", current.context.get(CTX_GROUP, ""), {})
            current = dataclasses.replace(current, capture="")
        if current.phase == Phase.FAILED:
            self.registry.new_attempt(record)  # a new attempt for the node agent
            # Wait for our own write, so the old Failed is not read as this attempt's answer.
            self.registry.informer.wait_until(
                lambda: self._not_failed(record), time.monotonic() + 5.0
            )
        if current.capture:
            pass  # the node agent cuts the piece from the capture
        elif location is not None and location.server is not None and not current.hot_clone_dir:
            try:
                group = self._group(record, location)
            except FailedPrecondition:
                # Refused as asked (a WAL or tablespace claim alone): the reserved record, with
                # nothing copied for it, goes, so a refusal leaves nothing behind and a retry is
                # a new request (once the instance is stopped, its claims copy cold). A record
                # kept would answer the retries "no running instance", which csi-snapshotter
                # retries for ever, holding the source claim's deletion.
                self.registry.remove(record.guid)
                raise
            if group:
                self.captures.cut(record, location, group, deadline, self._take)
            else:
                made = self._take_hot(record, location, deadline)
                if made is not None:
                    self._announce(made)
                    return made
        elif record.clone_mode == CloneMode.HOT and not current.hot_clone_dir:
            raise SourceUnavailable(
                f"volume {record.guid} is a hot clone of "
                f"{record.context.get(CTX_SOURCE_PVC) or record.source_volume_id or 'a claim'}, "
                "but no running CNPG instance uses the source now; retried until one does"
            )
        settled = self.registry.wait_settled(record, deadline)
        if settled is None or settled.phase == Phase.DELETING:
            raise OperationInProgress(f"volume {record.guid} is being deleted; retry later")
        if settled.phase == Phase.READY:
            if settled.capture:
                self.captures.release(settled)
            self._announce(settled)
            return settled
        if settled.phase == Phase.FAILED:
            raise from_code(
                settled.code,
                f"node {record.node} could not create volume {record.guid}: {settled.message}",
            )
        raise OperationInProgress(
            f"volume {record.guid} is not ready yet: waiting for the pg-reflinker node plugin on "
            f"node {record.node}; the request is retried"
        )

    def _group(self, record: VolumeRecord, location: SourceLocation) -> str:
        """The group whose capture record is cut from ("" for a copy of its own). Only an
        instance with more than one claim has pieces to share; a WAL or tablespace claim
        asked for outside a group is refused."""
        group = ""
        if len(pieces_of(location.volumes)) > 1:
            group = self.captures.group_of(record)
        piece = location.context.get(CTX_PIECE, PG_DATA)
        if not group and piece != PG_DATA:
            pvc = location.context.get(CTX_SOURCE_PVC, "the claim")
            server = location.server
            assert server is not None
            raise FailedPrecondition(
                f"claim {pvc} holds the {piece.partition(':')[0]} volume of running CNPG "
                f"cluster {server.cluster}, not a data directory; it is copied only together "
                f"with its instance's PGDATA claim {server.pod} (the claims of one new CNPG "
                "instance, or the snapshots of one CNPG Backup, share one capture), or clone "
                f"or snapshot the PGDATA claim {server.pod} alone, whose copy carries the WAL "
                "it needs, or take a CNPG offline Backup (online: false)"
            )
        return group

    def _take(
        self, record: VolumeRecord, location: SourceLocation, deadline: float
    ) -> VolumeRecord:
        """A hot copy of location into record, Ready (a capture)."""
        return self.materialize(record, Origin(None, location), deadline - time.monotonic() + 1.0)

    def _take_hot(
        self, record: VolumeRecord, location: SourceLocation, deadline: float
    ) -> VolumeRecord | None:
        """The hot copy, one backup at a time per source instance; the record when it is
        Ready already (native, or made meanwhile), None when the node agent puts it in place."""
        self._check_room(record.node)
        server = location.server
        assert server is not None
        instance = f"{server.namespace}/{server.pod}"
        what = location.context.get(CTX_SOURCE_PVC) or instance
        with self.gate.held(instance, what, deadline):
            current = self.registry.get_by_name(record.name, record.kind)
            if current is not None and current.phase == Phase.READY:
                return current  # made while this request waited at the gate
            if current is not None and current.hot_clone_dir:
                return None
            if current is not None and current.phase in (Phase.FAILED, Phase.DELETING):
                # Failed or deleted while this request waited at the gate (another replica's
                # attempt): no backup for it; the retry starts a new attempt, or stops.
                raise OperationInProgress(
                    f"volume {record.guid} changed while its request waited for the source's "
                    f"backup ({current.phase}); the request is retried"
                )
            left = max(1.0, deadline - time.monotonic())
            budget = min(self.statement_timeout, self.backup_limit, left)
            return self._hot_clone(record, location, budget, deadline)

    def _hot_clone(
        self, record: VolumeRecord, location: SourceLocation, budget: float, deadline: float
    ) -> VolumeRecord | None:
        """Take the hot clone by the StorageClass's method (auto: the function when the source
        has it, native otherwise or on a btrfs node, where the native copy is one subvolume
        snapshot). Native: the volume, Ready. Function: None; the node agent moves the copy
        into place."""
        server = location.server
        assert server is not None
        began = time.monotonic()
        wanted = method_of(record.parameters)
        # A capture of an instance with tablespaces: only the native method copies them (a
        # request for the function was refused before the capture was reserved).
        spaces = record.kind == Kind.CAPTURE and any(
            p.startswith(PG_TABLESPACE) for p in pieces_held(record)
        )
        with session(server, self.connect_timeout, budget, self.backup_limit) as conn:
            self._as_of(record, position(conn, server), server)
            method = wanted
            if method == CloneMethod.AUTO:
                # On btrfs the function's copy, made file by file inside the source's
                # subvolume, would be copied again out of it; the native one is a snapshot.
                snapshots = self.reports.filesystem(record.node) == "btrfs"
                use_function = not spaces and not snapshots and has_function(conn, server)
                method = CloneMethod.FUNCTION if use_function else CloneMethod.NATIVE
            self.registry.set_clone_method(record, str(method))
            fields: dict[str, object] = {
                "guid": record.guid,
                "source": location.context.get(CTX_SOURCE_PVC, record.source_volume_id),
                "method": str(method),
            }
            if method == CloneMethod.FUNCTION:
                result = call_function(conn, server, record.guid, budget, began)
                path = host_path_of(result.directory, location, self.layout, record.guid)
                self.registry.set_hot_clone_dir(record, path)
                log.info(
                    "hot clone taken", extra={"fields": {**fields, "s": round(result.seconds, 3)}}
                )
                return None
            limit = began + self.backup_limit
            copier = RecordCopier(self.registry, record, location, deadline, limit)
            in_backup = native_clone(
                conn, server, record.guid, copier, budget, whole=record.kind == Kind.CAPTURE
            )
        fields.update(s=round(time.monotonic() - began, 3), backup_s=round(in_backup, 3))
        log.info("hot clone taken", extra={"fields": fields})
        return copier.ready

    def _as_of(self, record: VolumeRecord, at: Position, server: SourceServer) -> None:
        """The source's position before its backup begins: refused when further behind
        production than the class's maxSourceLag, else written on the record (what the copy
        is as of)."""
        self.recorder.source_read(server.namespace, server.cluster, server.pod, at.lag)
        check_lag(at, lag_bound(record.parameters), server.source)
        self.registry.set_as_of(record, at.context())

    def _announce(self, record: VolumeRecord) -> None:
        """An event on the claim (or VolumeSnapshot) a hot copy was made for: what it is as
        of. Posted once per copy (the recorder folds a retry's repeat into a count)."""
        if self.events is None or record.kind == Kind.CAPTURE:
            return
        lsn, when, lag = (record.context.get(k, "") for k in AS_OF_KEYS)
        involved = self._involved(record) if lsn else None
        if involved is None:
            return
        source = record.context.get(CTX_SOURCE_PVC) or record.source_volume_id
        behind = f"{float(lag):.1f} s" if lag else "unknown (no WAL stream)"
        message = (
            f"{record.kind} {record.guid} is a copy of {source} as of LSN {lsn}"
            + (f", last transaction committed {when}" if when else "")
            + f"; its source was {behind} behind production"
        )
        self.events.record(involved, "Normal", "CopiedAsOf", message)

    def _involved(self, record: VolumeRecord) -> JSON | None:
        """The claim or VolumeSnapshot a record was made for, with its uid (kubectl describe
        matches events by it); None when it is not known."""
        if record.kind == Kind.SNAPSHOT:
            name = record.parameters.get(SNAPSHOT_NAME, "")
            namespace = record.parameters.get(SNAPSHOT_NAMESPACE, "")
            # csi-snapshotter names its request snapshot-<the VolumeSnapshot's uid>.
            uid = record.name.removeprefix("snapshot-")
            if not name or not namespace or not is_guid(uid):
                return None
            return {
                "apiVersion": "snapshot.storage.k8s.io/v1",
                "kind": "VolumeSnapshot",
                "namespace": namespace,
                "name": name,
                "uid": uid,
            }
        key = record.context.get(CTX_CLAIM, "")
        claim = self.claims.get(key) if key else None
        if claim is None:
            return None
        meta = Meta.of(claim)
        return {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": meta.namespace,
            "name": meta.name,
            "uid": meta.uid,
        }

    def _check_room(self, node: str) -> None:
        """The node's floor, from its report, before the source server makes a copy there."""
        free, floor = self.reports.reports().get(node, (0, 0))
        check_room(node, free, floor, "its HOSTPATH_PREFIX")

    def _not_failed(self, record: VolumeRecord) -> bool | None:
        current = self.registry.get_by_name(record.name, record.kind)
        return True if current is None or current.phase != Phase.FAILED else None

    def publishers(self, record: VolumeRecord) -> list[str]:
        # Kubernetes keeps a claim in use from being released; the node agent re-checks mounts.
        return []

    def dematerialize(self, record: VolumeRecord) -> None:
        self.registry.remove(record.guid)


def method_of(parameters: dict[str, str]) -> CloneMethod:
    """The StorageClass's cloneMethod (validated when the volume was requested)."""
    return CloneMethod(parameters.get(PARAM_CLONE_METHOD) or CloneMethod.AUTO)
