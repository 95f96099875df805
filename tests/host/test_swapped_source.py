"""A native copy's source directories are resolved once and held from the check to the use: a
tenant that swaps its `pgdata` for a link to another volume (renameat2 in a loop does it
sometimes; the seam between the node's check and its use makes it certain) gets nothing of
that volume, on XFS and on btrfs, and that volume is left as it was.

The node agent's steps run here as on the node (NodeSteps with a real LocalDisk on a loop
filesystem, a real data directory from initdb); the record's API server is a stand-in that
only notes which step was done (the steps' writes are covered against a real API server in
tests/kube)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reflinker_csi.core.errors import FailedPrecondition
from reflinker_csi.core.layout import Layout
from reflinker_csi.core.records import HandOff, Step, VolumeRecord
from reflinker_csi.disk.backup import system_identifier
from reflinker_csi.disk.local import NO_FLOOR, LocalDisk
from reflinker_csi.kube.handoff import NodeSteps
from tests.conftest import Filesystem, requires_mount
from tests.pgserver import chown_postgres, pg_majors, run_as_postgres

pytestmark = [pytest.mark.integration, requires_mount]
CANARY = b"ANOTHER-TENANTS-DATA-" * 64
SEGMENT = "000000010000000000000001"


class StepsDone:
    """Stand-in for the record's API server: the steps the node agent reported done."""

    def __init__(self) -> None:
        self.done: list[Step] = []

    def set_step_done(self, record: VolumeRecord, attempt: str, step: Step) -> None:
        self.done.append(step)


@pytest.fixture(scope="module", params=["xfs", "btrfs"])
def fs(request: pytest.FixtureRequest) -> Iterator[Filesystem]:
    made = Filesystem(str(request.param), size="2G")
    yield made
    made.close()


def volume_with_pgdata(fs: Filesystem, prefix: Path, bin: Path) -> Path:
    """A volume directory under prefix holding a real data directory (initdb)."""
    volume = fs.new_volume(prefix / str(uuid.uuid4()))
    os.chmod(fs.work, 0o755)
    chown_postgres(volume)
    run_as_postgres(
        [str(bin / "initdb"), "-D", str(volume / "pgdata"), "-U", "postgres", "--no-sync"],
        capture_output=True,
    )
    return volume


def listing(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.mark.parametrize("at", [Step.COPY, Step.FINISH])
def test_pgdata_swapped_for_a_link_between_check_and_use_copies_nothing_of_the_other_volume(
    fs: Filesystem, at: Step
) -> None:
    """At the Copy step the data directory itself is read; at the Finish step its pg_wal (the
    WAL segments are then copied from whatever pgdata names)."""
    prefix = fs.mnt / f"prefix-{uuid.uuid4().hex[:8]}"
    prefix.mkdir()
    bin = pg_majors()[max(pg_majors())]
    source = volume_with_pgdata(fs, prefix, bin)
    victim = fs.new_volume(prefix / str(uuid.uuid4()))
    # Another tenant's data directory, laid out like the source's, with the same identifier.
    os.system(f"cp -a --reflink=auto {source / 'pgdata'} {victim / 'pgdata'}")
    (victim / "pgdata" / "CANARY").write_bytes(CANARY)
    (victim / "pgdata" / "pg_wal" / SEGMENT).write_bytes(CANARY)
    before = listing(victim)
    pgdata = source / "pgdata"

    steps_seen: list[Path] = []

    def swap(checked: Path) -> None:
        steps_seen.append(checked)
        if len(steps_seen) == [Step.COPY, Step.FINISH].index(at) + 1:
            os.rename(pgdata, source / "pgdata.real")
            os.symlink(victim / "pgdata", pgdata)

    def unswap() -> None:
        if pgdata.is_symlink():
            os.unlink(pgdata)
            os.rename(source / "pgdata.real", pgdata)

    registry = StepsDone()
    disk = LocalDisk(Layout(prefix), floor=NO_FLOOR)
    steps = NodeSteps(registry, disk, "node-a", checked=swap)  # type: ignore[arg-type]
    record = VolumeRecord(guid=str(uuid.uuid4()), name="clone", node="node-a", required_bytes=0,
                          limit_bytes=0)  # fmt: skip
    hand_off = HandOff(
        attempt="a1",
        step=Step.COPY,
        source_dir=str(pgdata),
        volumes={},
        system_id=system_identifier(pgdata),
        start_lsn="0/1000028",
        segment_bytes=16 << 20,
    )
    copied: Path | None = None
    try:
        steps.do(record, hand_off)
        unswap()
        finish = HandOff(**{**hand_off.__dict__, "step": Step.FINISH, "stop_lsn": "0/1000100",
                            "label_file": "START WAL LOCATION: 0/1000028\n"})  # fmt: skip
        steps.do(record, finish)
        unswap()
        copied = steps.partial(record) / "pgdata"
    except FailedPrecondition as err:
        # btrfs: the snapshot of the volume holds the link, not the data directory checked.
        assert fs.kind == "btrfs", err
        assert str(err) == (
            "the source's data directory was replaced while it was copied; the clone starts over"
        )
        unswap()
    if copied is not None:
        assert registry.done == [Step.COPY, Step.FINISH]
        assert not (copied / "CANARY").exists()
        assert (copied / "pg_wal" / SEGMENT).read_bytes() != CANARY
        assert CANARY not in b"".join(listing(copied).values())
    # The other tenant's volume was neither read into the copy nor changed.
    assert listing(victim) == before
