"""The ReflinkVolume, pg-reflinker's own resource, whole in one place (as TopoLVM's
logicalvolume_types.go is): its object name, every field and how a VolumeRecord is written to
it and read from it, the native hand-off's spec.backup and status.backup, and every patch it
is written with. kube/registry.py sends these; the CRD (charts/pg-reflinker/crds) is checked
against FIELDS by tests/unit/test_kube_units.py.

A field that is missing or of the wrong type reads as empty, so a hostile or half-written
object cannot crash a loop."""

from __future__ import annotations

import hashlib
import re
from typing import TypeVar

from ..core.keys import (
    AS_OF_KEYS,
    CTX_AS_OF_LSN,
    CTX_AS_OF_TIME,
    CTX_CLAIM,
    CTX_CLONE_METHOD,
    CTX_GROUP,
    CTX_SOURCE_LAG,
    CTX_SOURCE_PVC,
    FINALIZER,
    LABEL_GUID,
    LABEL_NODE,
)
from ..core.records import CloneMode, HandOff, Kind, Phase, Step, VolumeRecord
from ..core.space import size
from .api import JSON, REFLINKVOLUMES
from .events import stamp
from .fields import number, obj, strings, text
from .model import Meta, parse_time

E = TypeVar("E", Kind, CloneMode, Phase)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

# Every field this module writes, by part: what the CRD's schema must declare.
FIELDS: dict[str, tuple[str, ...]] = {
    "spec": (
        "guid", "requestName", "kind", "nodeName", "requiredBytes", "limitBytes", "parameters",
        "context", "sourceVolume", "sourceSnapshot", "cloneMode", "source", "claim",
        "hotCloneDir", "cloneMethod", "backup", "capture",
    ),
    "status": ("phase", "code", "message", "usage", "backup", "asOf"),
    "spec.backup": (
        "attempt", "step", "sourceDir", "volumes", "systemId", "startLSN", "segmentBytes",
        "stopLSN", "labelFile", "mapFile",
    ),
    "status.backup": ("attempt", "done"),
    "status.usage": ("usedBytes", "ownBytes", "used", "own", "measuredAt"),
    "status.asOf": ("lsn", "time", "lagSeconds"),
}  # fmt: skip


def object_name(record: VolumeRecord) -> str:
    """The name of the ReflinkVolume that stores record."""
    return record_name(record.kind, record.name)


def record_name(kind: Kind, request_name: str) -> str:
    """A stable, valid object name for a CSI request name (the same name on every retry)."""
    if kind == Kind.VOLUME and _DNS_LABEL.match(request_name):
        return request_name
    digest = hashlib.sha256(request_name.encode()).hexdigest()[:40]
    prefix = {Kind.SNAPSHOT: "snap", Kind.CAPTURE: "cap"}.get(kind, "vol")
    return f"{prefix}-{digest}"


def to_body(record: VolumeRecord) -> JSON:
    """The ReflinkVolume that stores a new record (status is written separately)."""
    spec: JSON = {
        "guid": record.guid,
        "requestName": record.name,
        "kind": str(record.kind),
        "nodeName": record.node,
        "requiredBytes": record.required_bytes,
        "limitBytes": record.limit_bytes,
        "parameters": dict(record.parameters),
        "context": dict(record.context),
        "sourceVolume": record.source_volume_id,
        "sourceSnapshot": record.source_snapshot_id,
        "cloneMode": str(record.clone_mode),
        "source": record.context.get(CTX_SOURCE_PVC, record.source_volume_id),
        "claim": record.context.get(CTX_CLAIM, ""),
    }
    return {
        "apiVersion": f"{REFLINKVOLUMES.group}/{REFLINKVOLUMES.version}",
        "kind": REFLINKVOLUMES.kind,
        "metadata": {
            "name": record_name(record.kind, record.name),
            "labels": {LABEL_GUID: record.guid, LABEL_NODE: record.node},
            "finalizers": [FINALIZER],
        },
        "spec": spec,
    }


def _enum_value(kind: type[E], value: str, default: E) -> E:
    try:
        return kind(value)
    except ValueError:
        return default


def record_of(value: JSON) -> VolumeRecord:
    """The record a ReflinkVolume stores; a deletion in progress reads as Deleting."""
    spec, status, meta = obj(value, "spec"), obj(value, "status"), Meta.of(value)
    phase = _enum_value(Phase, text(status, "phase"), Phase.PENDING)
    if meta.deleting:
        phase = Phase.DELETING
    created = parse_time(meta.created) if meta.created else None
    return VolumeRecord(
        guid=text(spec, "guid"),
        name=text(spec, "requestName"),
        node=text(spec, "nodeName"),
        required_bytes=number(spec, "requiredBytes"),
        limit_bytes=number(spec, "limitBytes"),
        parameters=strings(spec, "parameters"),
        source_volume_id=text(spec, "sourceVolume"),
        source_snapshot_id=text(spec, "sourceSnapshot"),
        kind=_enum_value(Kind, text(spec, "kind"), Kind.VOLUME),
        clone_mode=_enum_value(CloneMode, text(spec, "cloneMode"), CloneMode.NONE),
        hot_clone_dir=text(spec, "hotCloneDir"),
        clone_method=text(spec, "cloneMethod"),
        hand_off=hand_off_of(obj(spec, "backup"), obj(status, "backup")),
        capture=text(spec, "capture"),
        phase=phase,
        code=text(status, "code"),
        message=text(status, "message"),
        context=strings(spec, "context"),
        created_at=created.timestamp() if created else 0.0,
    )


def claim_of(value: JSON) -> str:
    """The claim (namespace/name) a ReflinkVolume was made for, "" for none: read without
    parsing the whole record (an informer's index calls it on every change)."""
    return text(obj(obj(value, "spec"), "context"), CTX_CLAIM)


def status_body(phase: Phase, code: str = "", message: str = "") -> JSON:
    """status: the phase, and a failure's CSI code and message (status subresource)."""
    return {"status": {"phase": str(phase), "code": code, "message": message[:1000]}}


# -- on the record: spec.backup (the controller's step), status.backup (the node's answer) -----


def hand_off_of(wanted: JSON, done: JSON) -> HandOff | None:
    """spec.backup (the controller's step) with status.backup (the node agent's last step done,
    counted only for the same attempt)."""
    steps = {str(s): s for s in Step}
    step = steps.get(text(wanted, "step"))
    attempt = text(wanted, "attempt")
    if step is None or not attempt:
        return None
    finished = steps.get(text(done, "done"))
    return HandOff(
        attempt=attempt,
        step=step,
        source_dir=text(wanted, "sourceDir"),
        volumes=strings(wanted, "volumes"),
        system_id=text(wanted, "systemId"),
        start_lsn=text(wanted, "startLSN"),
        segment_bytes=number(wanted, "segmentBytes"),
        stop_lsn=text(wanted, "stopLSN"),
        label_file=text(wanted, "labelFile"),
        map_file=text(wanted, "mapFile"),
        done=finished if text(done, "attempt") == attempt else None,
    )


def step_done_body(attempt: str, step: Step) -> JSON:
    """status.backup: the node agent finished step of attempt."""
    return {"attempt": attempt, "done": str(step)}


def hand_off_body(hand_off: HandOff) -> JSON:
    """spec.backup for the controller's step."""
    return {
        "attempt": hand_off.attempt,
        "step": str(hand_off.step),
        "sourceDir": hand_off.source_dir,
        "volumes": dict(hand_off.volumes),
        "systemId": hand_off.system_id,
        "startLSN": hand_off.start_lsn,
        "segmentBytes": hand_off.segment_bytes,
        "stopLSN": hand_off.stop_lsn,
        "labelFile": hand_off.label_file,
        "mapFile": hand_off.map_file,
    }


# -- patches: every write after the create -------------------------------------------------------


def usage_patch(used: int, own: int) -> JSON:
    """status.usage: the volume's bytes, as the node agent last measured them."""
    return {
        "status": {
            "usage": {
                "usedBytes": used,
                "ownBytes": own,
                "used": size(used),
                "own": size(own),
                "measuredAt": stamp(),
            }
        }
    }


def hot_clone_dir_patch(path: str) -> JSON:
    return {"spec": {"hotCloneDir": path}}


def capture_patch(capture: str, group: str, context: dict[str, str]) -> JSON:
    """spec.capture of a piece, with its group and how the capture was taken in its context."""
    context = {CTX_GROUP: group, **context}
    method = context.get(CTX_CLONE_METHOD, "")
    spec: JSON = {"capture": capture, "context": context}
    if method:
        spec["cloneMethod"] = method
    return {"spec": spec}


def clone_method_patch(method: str) -> JSON:
    """How a hot clone is taken: on the record and in the volume's context (the PV shows it)."""
    return {"spec": {"cloneMethod": method, "context": {CTX_CLONE_METHOD: method}}}


def as_of_patch(context: dict[str, str]) -> JSON:
    """What a hot copy is as of, in the volume's context (the PV shows it)."""
    return {"spec": {"context": {k: context[k] for k in AS_OF_KEYS if k in context}}}


def as_of_status_patch(context: dict[str, str]) -> JSON:
    """status.asOf (status subresource), for `kubectl get reflinkvolumes`."""
    as_of: JSON = {"lsn": context.get(CTX_AS_OF_LSN, ""), "time": context.get(CTX_AS_OF_TIME, "")}
    lag = context.get(CTX_SOURCE_LAG, "")
    if lag:  # absent: unknown
        as_of["lagSeconds"] = round(float(lag), 3)
    return {"status": {"asOf": as_of}}


def attempt_test(attempt: str) -> JSON:
    """A JSON patch's precondition: the record is still at attempt (a writer whose attempt was
    replaced, a deposed leader resumed, gets 422 and stops)."""
    return {"op": "test", "path": "/spec/backup/attempt", "value": attempt}


def hand_off_ops(hand_off: HandOff) -> list[JSON]:
    """spec.backup replaced whole (JSON patch), so nothing of an earlier step survives in it;
    a step after Copy only while its attempt is still the record's."""
    ops = [] if hand_off.step == Step.COPY else [attempt_test(hand_off.attempt)]
    return [*ops, {"op": "add", "path": "/spec/backup", "value": hand_off_body(hand_off)}]


def attempt_failed_ops(value: JSON, attempt: str, code: str, message: str) -> list[JSON]:
    """status of an attempt that failed (status subresource), only while it is the record's
    attempt: a stale writer cannot fail its successor's attempt."""
    status = {**obj(value, "status"), **obj(status_body(Phase.FAILED, code, message), "status")}
    return [attempt_test(attempt), {"op": "add", "path": "/status", "value": status}]


def no_hand_off_patch() -> JSON:
    return {"spec": {"backup": None}}


def step_done_patch(attempt: str, step: Step) -> JSON:
    """status.backup: the node agent finished step of attempt (status subresource)."""
    return {"status": {"backup": step_done_body(attempt, step)}}


def finalizer_removed_patch(value: JSON) -> JSON:
    """The node agent's finalizer off, conditional on the version read."""
    meta = Meta.of(value)
    remaining = [f for f in meta.finalizers if f != FINALIZER]
    return {"metadata": {"finalizers": remaining, "resourceVersion": meta.resource_version}}
