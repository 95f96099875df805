"""The native hot copy's hand-off, one protocol between two processes, through the copy's
ReflinkVolume. The controller holds the backup session (pg/backup.py: grants checked, a
temporary slot, pg_backup_start ... pg_backup_stop, the slot dropped); the node agent of the
source's node does the file work (disk/backup.py). They speak only through the record, one step
at a time, each attempt under an id of its own:

  controller: spec.backup.step                   node agent: status.backup.done
  -------------------------------------------    ------------------------------------------
  Copy (attempt, the source's data directory     reflink the data directory (a capture: each
  on the node, the pod's other volumes, the      tablespace first, through the pod's volumes)
  system identifier, the start LSN)              into <dir>.partial stamped with the attempt
                                                 -> Copy
  pg_backup_stop
  Finish (+ stop LSN, backup_label,              write backup_label and tablespace_map, copy
  tablespace_map)                                the WAL from the start segment through the
                                                 stop LSN (no segment missing) -> Finish
  drop the slot: only a live session can, so
  the WAL was protected for the whole copy
  Complete                                       rename the partial copy into place -> phase
                                                 Ready

A failure on either side ends the attempt: the controller's session ends (PostgreSQL aborts the
backup and drops the slot) and the record goes Failed, with the node's code when the node
failed; the node agent then removes the attempt's partial copy. A retry is a new attempt: the
controller removes the old hand-off before the record is Pending again (KubeRegistry.new_attempt),
so the node agent never runs an old attempt's step; each step replaces spec.backup whole; and a
partial copy stamped with another attempt is never finished. The steps are core/records.py's
Step; the record's phases are Pending (steps under way), Ready (Complete done), Failed."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.backup import BackupStart, BackupStop, parse_lsn
from ..core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    OperationInProgress,
    ReflinkerError,
    SourceUnavailable,
    from_code,
)
from ..core.keys import CNPG_TABLESPACES_MOUNT
from ..core.layout import PARTIAL_SUFFIX
from ..core.locator import SourceLocation
from ..core.records import HandOff, Kind, Phase, Step, VolumeRecord
from ..disk import backup
from ..disk.local import LocalDisk, remove_tree

if TYPE_CHECKING:
    from .registry import KubeRegistry

log = logging.getLogger(__name__)


# -- the controller's side: ask for a step, wait for the node's answer -------------------------


class RecordCopier:
    """The file side of a native hot clone, done by the node agent of the source's node: each
    step is written on the volume's record (spec.backup) and waited for (status.backup), the
    steps in backup mode until backup_limit_at at the latest, all of them until deadline (the
    request's)."""

    def __init__(
        self,
        registry: KubeRegistry,
        record: VolumeRecord,
        location: SourceLocation,
        deadline: float,
        backup_limit_at: float = float("inf"),
    ) -> None:
        self.registry = registry
        self.record = record
        self.location = location
        self.deadline = deadline
        self.backup_limit_at = backup_limit_at
        self.hand_off: HandOff | None = None
        self.ready: VolumeRecord | None = None

    def copy(self, start: BackupStart) -> None:
        # CNPG keeps PGDATA in pgdata on the instance's volume; the node agent checks that the
        # directory there is the source's (its system identifier).
        self.hand_off = HandOff(
            attempt=str(uuid.uuid4()),
            step=Step.COPY,
            source_dir=str(self.location.host_path / "pgdata"),
            volumes=dict(self.location.volumes),
            system_id=start.system_id,
            start_lsn=start.lsn,
            segment_bytes=start.segment_bytes,
        )
        self._ask(self.hand_off)

    def finish(self, start: BackupStart, stop: BackupStop) -> None:
        assert self.hand_off is not None
        self.hand_off = dataclasses.replace(
            self.hand_off,
            step=Step.FINISH,
            stop_lsn=stop.lsn,
            label_file=stop.label_file,
            map_file=stop.map_file,
        )
        self._ask(self.hand_off)

    def complete(self) -> None:
        assert self.hand_off is not None
        self.hand_off = dataclasses.replace(self.hand_off, step=Step.COMPLETE)
        self.ready = self._ask(self.hand_off)

    def abandon(self) -> None:
        """This attempt failed while the backup session lived: the node agent removes its
        partial copy when the record is Failed; a retry starts over with a new attempt."""
        if self.hand_off is None:
            return
        current = self.registry.get_by_name(self.record.name, self.record.kind)
        if current is not None and current.phase == Phase.PENDING:
            self.registry.fail_attempt(
                self.record,
                self.hand_off.attempt,
                SourceUnavailable("the hot clone's attempt was abandoned; it is retried"),
            )

    def _ask(self, hand_off: HandOff) -> VolumeRecord:
        self.registry.set_hand_off(self.record, hand_off)
        name, kind = self.record.name, self.record.kind

        def answered() -> VolumeRecord | None:
            current = self.registry.get_by_name(name, kind)
            if current is None or current.phase in (Phase.FAILED, Phase.DELETING):
                return current or self.record.with_phase(Phase.DELETING)
            if hand_off.step == Step.COMPLETE:
                return current if current.phase == Phase.READY else None
            done = current.hand_off
            if done is not None and done.attempt == hand_off.attempt and done.done == hand_off.step:
                return current
            return None

        # Copy and Finish happen in backup mode, so within its limit; Complete comes after the
        # backup ended and has the rest of the request's time (a backlogged node agent's
        # finished copy is not thrown away for the backup's sake).
        until = self.deadline
        if hand_off.step != Step.COMPLETE:
            until = min(self.deadline, self.backup_limit_at)
        current = self.registry.informer.wait_until(answered, until)
        if current is None and until >= self.backup_limit_at:
            raise DeadlineExceeded(
                f"hot clone {self.record.guid} reached BACKUP_MODE_LIMIT (the longest a source "
                f"stays in backup mode) at step {hand_off.step} on node {self.record.node}; the "
                "backup was ended and the clone starts over on the next attempt"
            )
        if current is None:
            raise DeadlineExceeded(
                f"the pg-reflinker node plugin on node {self.record.node} did not finish step "
                f"{hand_off.step} of hot clone {self.record.guid} in time; the source left "
                "backup mode and the clone starts over on the next attempt"
            )
        if current.phase == Phase.DELETING:
            raise OperationInProgress(f"volume {self.record.guid} is being deleted; retry later")
        if current.phase == Phase.FAILED:
            raise from_code(
                current.code,
                f"node {self.record.node} could not copy hot clone {self.record.guid}: "
                f"{current.message}",
            )
        return current


# -- the node agent's side: do the step asked, once per attempt ------------------------------


def _lsn(value: str, field: str) -> int:
    try:
        return parse_lsn(value)
    except ValueError:
        raise FailedPrecondition(
            f"spec.backup.{field} {value[:40]!r} of the record is not an LSN; the clone starts over"
        ) from None


class AnswerNotWritten(Exception):
    """A step was done but the record could not say so: the key is retried (with backoff),
    the step done again (each one is idempotent for its attempt), and the answer written;
    never a failed copy."""


class NodeSteps:
    """The steps of native hot copies whose source is on this node."""

    def __init__(
        self,
        registry: KubeRegistry,
        disk: LocalDisk,
        node_id: str,
        checked: Callable[[Path], None] = lambda source: None,
    ) -> None:
        self.registry = registry
        self.disk = disk
        self.node_id = node_id
        # Called between a source's check and its use (a test seam: a swap made there must
        # not be taken).
        self.checked = checked

    def partial(self, record: VolumeRecord) -> Path:
        final = self.disk.data_dir(record)
        return final.with_name(final.name + PARTIAL_SUFFIX)

    def abandoned(self, record: VolumeRecord) -> None:
        """The record went Failed: its attempt's partial copy goes."""
        remove_tree(self.partial(record))

    def do(self, record: VolumeRecord, hand_off: HandOff) -> bool:
        """One step of a native hot clone, the one the controller asked for (once per attempt);
        True when the volume is in place."""
        if hand_off.done == hand_off.step:
            return False  # done; the controller's next step brings the record back
        partial = self.partial(record)
        log.info(
            "hot clone step",
            extra={
                "fields": {"guid": record.guid, "attempt": hand_off.attempt, "step": hand_off.step}
            },
        )
        # source_dir is <the source volume's directory on this node>/pgdata (the controller's
        # reading of the PV, not the source server's answer). Each directory is resolved once
        # and held while it is used: a link swapped in after the check is never taken.
        named = Path(hand_off.source_dir)
        with contextlib.ExitStack() as held:
            source = held.enter_context(self.disk.source_dir(named, named.parent))
            self.checked(source)
            if hand_off.step == Step.COPY:
                self.disk.check_room(self.node_id)
                began = time.monotonic()
                spaces = None
                if record.kind == Kind.CAPTURE:
                    spaces = self._tablespaces(source, hand_off.volumes, held)
                files = backup.copy_data(
                    source, partial, hand_off.attempt, hand_off.system_id, spaces, named.parent
                )
                log.info(
                    "hot clone copied",
                    extra={
                        "fields": {
                            "guid": record.guid,
                            "files": files,
                            "ms": round((time.monotonic() - began) * 1000, 1),
                        }
                    },
                )
            elif hand_off.step == Step.FINISH:
                backup.finish(
                    partial,
                    hand_off.attempt,
                    self._wal_dir(source, hand_off.volumes, held),
                    hand_off.label_file,
                    hand_off.map_file,
                    _lsn(hand_off.start_lsn, "startLSN"),
                    _lsn(hand_off.stop_lsn, "stopLSN"),
                    hand_off.segment_bytes,
                )
            else:
                self.disk.limit(record, partial)  # btrfs: the new volume's size
                backup.complete(partial, self.disk.data_dir(record), hand_off.attempt)
                return True
        try:
            self.registry.set_step_done(record, hand_off.attempt, hand_off.step)
        except ReflinkerError as err:
            # The step's work is done and is done again, the same, on the retry: an answer
            # the API server did not take is no reason to fail the copy.
            raise AnswerNotWritten(
                f"step {hand_off.step} of hot clone {record.guid} is done but its answer was "
                f"not written ({err}); written again on the retry"
            ) from err
        return False

    def _wal_dir(self, source: Path, volumes: dict[str, str], held: contextlib.ExitStack) -> Path:
        """The source's pg_wal on this node: in the data directory, or on the pod's WAL volume
        when pg_wal links there (a path inside the pod, mapped through its volumes, resolved
        from that volume and held)."""
        wal = source / "pg_wal"
        if not wal.is_symlink():
            return wal
        found = self._on_volume(os.readlink(wal), volumes)
        if found is None:
            # Not the link's target: it may name another volume's directory on this node.
            raise FailedPrecondition(
                "pg_wal in the source's data directory links to a path on none of the server "
                f"pod's volumes ({', '.join(sorted(volumes)) or 'none'}); a source's WAL is read "
                "only from its own volumes, so it cannot be copied"
            )
        _, node_path, inside = found
        return held.enter_context(self.disk.source_dir(node_path / inside, node_path))

    def _tablespaces(
        self, source: Path, volumes: dict[str, str], held: contextlib.ExitStack
    ) -> dict[str, tuple[Path, str, Path]]:
        """A capture's tablespaces: name -> (its volume's directory on this node, the location
        inside it, that location held), from the links in pg_tblspc, each on one of the pod's
        tablespace volumes."""
        found: dict[str, tuple[Path, str, Path]] = {}
        links = source / "pg_tblspc"
        for oid in sorted(os.listdir(links)) if links.is_dir() else []:
            if not (links / oid).is_symlink():
                continue  # an in-place tablespace: inside the data directory
            on = self._on_volume(os.readlink(links / oid), volumes)
            prefix = CNPG_TABLESPACES_MOUNT + "/"
            name = on[0][len(prefix) :] if on and on[0].startswith(prefix) else ""
            if on is None or not name or "/" in name:
                listed = ", ".join(sorted(volumes)) or "none"
                raise FailedPrecondition(
                    f"tablespace {oid} in the source's data directory links to a path on none "
                    f"of the server pod's tablespace volumes ({listed}); a source's tablespaces "
                    "are read only from their own volumes, so it cannot be copied"
                )
            _, node_path, inside = on
            space = held.enter_context(self.disk.source_dir(node_path / inside, node_path))
            found[name] = (Path(os.path.realpath(node_path)), inside, space)
        return found

    @staticmethod
    def _on_volume(target: str, volumes: dict[str, str]) -> tuple[str, Path, str] | None:
        """(mount, its node path, the path inside it) of a path in the server's pod, on the
        deepest of the pod's volumes that holds it."""
        target = os.path.normpath(target)
        for mount in sorted(volumes, key=len, reverse=True):
            if target == mount or target.startswith(mount.rstrip("/") + "/"):
                return mount, Path(volumes[mount]), target[len(mount) :].lstrip("/")
        return None
