"""The Kubernetes Registry: one ReflinkVolume per volume or snapshot, read from an informer's
cache, written through the API.

The controller creates the record (named from the CSI request name, so a retry finds it); the
node agent on spec.nodeName does the disk work, sets status.phase (with the CSI code of a
failure), and owns the finalizer."""

from __future__ import annotations

import time

from ..core.errors import OperationInProgress, classify
from ..core.layout import is_guid
from ..core.records import HandOff, Kind, Phase, Step, VolumeRecord
from . import reflinkvolume as rv
from .api import JSON, REFLINKVOLUMES, ApiError, Kube, domain_error
from .model import Meta
from .reflinkvolume import record_name, record_of, to_body
from .runtime import Informer

_Ops = list[JSON]  # a JSON patch's operations


def _failure(error: Exception) -> tuple[str, str]:
    """A failure's CSI code and message, as the record shows them."""
    known = classify(error)
    return (known.code, str(known)) if known else ("INTERNAL", str(error))


def _guid(record: VolumeRecord) -> str:
    return record.guid


class KubeRegistry:
    def __init__(self, kube: Kube, informer: Informer) -> None:
        self.kube = kube
        self.informer = informer

    # -- reads (cache) -----------------------------------------------------------------------

    def object_of(self, guid: str) -> JSON | None:
        if not is_guid(guid):
            return None
        for value in self.informer.items():
            if record_of(value).guid == guid:
                return value
        return None

    def get(self, guid: str) -> VolumeRecord | None:
        value = self.object_of(guid)
        return None if value is None else record_of(value)

    def get_by_name(self, name: str, kind: Kind = Kind.VOLUME) -> VolumeRecord | None:
        value = self.informer.get(record_name(kind, name))
        if value is None:
            return None
        record = record_of(value)
        return record if record.name == name and record.kind == kind else None

    def list(self) -> list[VolumeRecord]:
        return sorted((record_of(v) for v in self.informer.items()), key=_guid)

    def wait_settled(self, record: VolumeRecord, deadline: float) -> VolumeRecord | None:
        """The record once Ready, Failed or gone/deleting (None); the last state at deadline."""
        name = rv.object_name(record)
        settled = (Phase.READY, Phase.FAILED, Phase.DELETING)

        def probe() -> VolumeRecord | None:
            value = self.informer.get(name)
            if value is None:
                return record.with_phase(Phase.DELETING)
            current = record_of(value)
            return current if current.phase in settled else None

        found = self.informer.wait_until(probe, deadline)
        if found is not None:
            return found
        value = self.informer.get(name)
        return None if value is None else record_of(value)

    # -- writes (API) ------------------------------------------------------------------------

    def reserve(self, record: VolumeRecord) -> tuple[VolumeRecord, bool]:
        body = to_body(record)
        name = rv.object_name(record)
        try:
            created = self.kube.create(REFLINKVOLUMES, body)
            self._settle_cache(created)
            return record, True
        except ApiError as err:
            if err.status != 409:
                raise domain_error(err, f"create ReflinkVolume {name}") from None
        try:
            existing = self.kube.get(REFLINKVOLUMES, name)
        except ApiError as err:
            raise domain_error(err, f"read ReflinkVolume {name}") from None
        if existing is None:  # deleted between the conflict and the read
            return self.reserve(record)
        return record_of(existing), False

    def _settle_cache(self, written: JSON) -> None:
        """Wait (briefly) until the cache has seen a write, so a read right after finds it."""
        want = Meta.of(written)

        def seen() -> bool | None:
            value = self.informer.get(want.key)
            return True if value is not None and Meta.of(value).uid == want.uid else None

        self.informer.wait_until(seen, time.monotonic() + 5.0)

    def set_phase(self, record: VolumeRecord, phase: Phase, error: Exception | None = None) -> None:
        code, message = _failure(error) if error is not None else ("", "")
        self._patch(record, rv.status_body(phase, code, message), status=True)

    def set_usage(self, record: VolumeRecord, used: int, own: int) -> None:
        self._patch(record, rv.usage_patch(used, own), status=True, gone_ok=True)

    def set_hot_clone_dir(self, record: VolumeRecord, path: str) -> None:
        self._patch(record, rv.hot_clone_dir_patch(path))

    def set_capture(
        self, record: VolumeRecord, capture: str, group: str, context: dict[str, str]
    ) -> None:
        """The capture a piece is cut from (spec.capture), for its node agent, with more
        context (the group, how the capture was taken, shown on the PV)."""
        self._patch(record, rv.capture_patch(capture, group, context))

    def set_hand_off(self, record: VolumeRecord, hand_off: HandOff) -> None:
        """The controller's next step of a native hot clone: spec.backup replaced whole, so
        nothing of an earlier step or attempt survives in it; a later step only while its
        attempt is the record's (else OperationInProgress: this writer's attempt is over)."""
        self._patch(record, rv.hand_off_ops(hand_off), attempt=hand_off.attempt)

    def fail_attempt(self, record: VolumeRecord, attempt: str, error: Exception) -> bool:
        """The record Failed for attempt, only while attempt is the record's; False when
        another attempt has replaced it (nothing written)."""
        value = self.object_of(record.guid)
        if value is None:
            return False
        try:
            ops = rv.attempt_failed_ops(value, attempt, *_failure(error))
            self._patch(record, ops, status=True, attempt=attempt)
        except OperationInProgress:
            return False
        return True

    def new_attempt(self, record: VolumeRecord) -> None:
        """After a failed attempt: the old hand-off goes first, then the record is Pending, so
        the node agent never sees an old attempt's step on a Pending record."""
        self._patch(record, rv.no_hand_off_patch())
        self.set_phase(record, Phase.PENDING)

    def set_clone_method(self, record: VolumeRecord, method: str) -> None:
        """How the hot clone is taken, on the record and in the volume's context (PV)."""
        self._patch(record, rv.clone_method_patch(method))

    def set_as_of(self, record: VolumeRecord, context: dict[str, str]) -> None:
        """What a hot copy (or the capture a piece is cut from) is as of: in the volume's
        context (the PV shows it) and in status.asOf."""
        self._patch(record, rv.as_of_patch(context))
        self._patch(record, rv.as_of_status_patch(context), status=True)

    def set_step_done(self, record: VolumeRecord, attempt: str, step: Step) -> None:
        """The node agent finished step of a native hot clone (status.backup)."""
        self._patch(record, rv.step_done_patch(attempt, step), status=True)

    def _patch(
        self,
        record: VolumeRecord,
        patch: JSON | _Ops,
        status: bool = False,
        gone_ok: bool = False,
        attempt: str = "",
    ) -> None:
        """Send one patch of kube/reflinkvolume.py to the record's object (a list: a JSON
        patch, else a merge patch); API failures become domain errors naming the object, and
        a failed precondition on attempt (422) OperationInProgress."""
        name = rv.object_name(record)
        try:
            if isinstance(patch, list):
                self.kube.json_patch(REFLINKVOLUMES, name, patch, status=status)
            else:
                self.kube.merge_patch(REFLINKVOLUMES, name, patch, status=status)
        except ApiError as err:
            if gone_ok and err.status == 404:
                return
            if attempt and err.status == 422:
                raise OperationInProgress(
                    f"attempt {attempt} of volume {record.guid} is no longer the record's "
                    "(another attempt began); this one stops"
                ) from None
            part = "the status of " if status else ""
            raise domain_error(err, f"update {part}ReflinkVolume {name}") from None

    def remove(self, guid: str) -> None:
        value = self.object_of(guid)
        if value is None:
            return
        name = Meta.of(value).name
        try:
            self.kube.delete(REFLINKVOLUMES, name)
        except ApiError as err:
            raise domain_error(err, f"delete ReflinkVolume {name}") from None

    def drop_finalizer(self, value: JSON) -> None:
        meta = Meta.of(value)
        try:
            self.kube.merge_patch(REFLINKVOLUMES, meta.name, rv.finalizer_removed_patch(value))
        except ApiError as err:
            if err.status not in (404, 409):
                raise domain_error(
                    err, f"remove the finalizer of ReflinkVolume {meta.name}"
                ) from None
