"""The file side of a native hot clone (pg/backup.py), on the host that sees the source's data
directory: reflink the data directory as pg_basebackup would copy it, then write backup_label
and tablespace_map and copy the WAL the backup needs. Work happens in a partial directory
stamped with the attempt it belongs to; only complete() puts it in place."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import uuid
from pathlib import Path

from ..core.backup import BackupStart, BackupStop, parse_lsn, wal_range
from ..core.errors import FailedPrecondition, ReflinkUnsupported
from ..core.layout import PARTIAL_SUFFIX
from . import reflink, subvolume
from .local import remove_tree
from .reflink import Leave

# Directories whose contents a copy leaves out, as pg_basebackup does (pg_wal is filled later).
EMPTIED = frozenset(
    {
        "pg_wal",
        "pg_replslot",
        "pg_stat_tmp",
        "pg_dynshmem",
        "pg_notify",
        "pg_serial",
        "pg_snapshots",
        "pg_subtrans",
    }
)
# Files that describe the running server, not its data.
SKIPPED = frozenset(
    {
        "postmaster.pid",
        "postmaster.opts",
        "backup_label",
        "tablespace_map",
        "backup_label.old",
        "standby.signal",
        "recovery.signal",
    }
)
ATTEMPT_FILE = ".attempt"
COPY_WORKERS = 4
_SEGMENT = re.compile(r"^[0-9A-F]{24}$")
_HISTORY = re.compile(r"^[0-9A-F]{8}\.history$")


def _leave(rel: str) -> Leave:
    if rel in EMPTIED:
        return Leave.CONTENTS
    if rel in SKIPPED:
        return Leave.OUT
    name = rel.rsplit("/", 1)[-1]
    if name.startswith("pgsql_tmp") or name == "pg_internal.init":
        return Leave.OUT
    if rel == "global/pg_control":
        return Leave.LAST
    return Leave.NOTHING


def system_identifier(pgdata: Path) -> str:
    """The cluster's system identifier from global/pg_control (its first 8 bytes), read
    through descriptors that follow no link."""
    top = reflink.open_dir(pgdata)
    try:
        global_fd = reflink.open_dir("global", top)
    finally:
        os.close(top)
    try:
        fd = reflink.open_regular("pg_control", global_fd)
    finally:
        os.close(global_fd)
    try:
        return str(int.from_bytes(os.pread(fd, 8, 0), "little"))
    finally:
        os.close(fd)


def _segment_number(name: str, segment_bytes: int) -> int:
    per_id = 0x100000000 // segment_bytes
    return int(name[8:16], 16) * per_id + int(name[16:24], 16)


def attempt_of(partial: Path) -> str:
    """The attempt stamped on a partial copy (ours: no link on the way is followed)."""
    try:
        top = reflink.open_dir(partial)
    except OSError:
        return ""
    try:
        fd = reflink.open_regular(ATTEMPT_FILE, top)
    except OSError:
        return ""
    finally:
        os.close(top)
    try:
        return os.pread(fd, 256, 0).decode(errors="replace")
    finally:
        os.close(fd)


def _leave_in_tablespace(rel: str) -> Leave:
    name = rel.rsplit("/", 1)[-1]
    return Leave.OUT if name.startswith("pgsql_tmp") else Leave.NOTHING


def copy_data(
    source: Path,
    partial: Path,
    attempt: str,
    system_id: str,
    tablespaces: dict[str, tuple[Path, str, Path]] | None = None,
    volume: Path | None = None,
) -> int:
    """Reflink the data directory at source into partial/pgdata for attempt (starting over if
    partial holds another attempt's copy); return the number of files. source may be a held
    directory (reflink.held) whose volume is then given. tablespaces: a capture of a whole
    instance (core/capture.py): name -> (the tablespace volume's directory on this node, the
    tablespace's location inside it, that location held), each copied into
    partial/tablespaces/<name>, before the data directory (whose pg_control is copied last of
    all)."""
    if os.path.lexists(partial) and attempt_of(partial) == attempt + "\n":
        return 0  # this attempt's copy is complete (the stamp is written last)
    volume = volume or source.parent
    try:
        found = system_identifier(source)
    except OSError as err:
        raise FailedPrecondition(
            f"no data directory at {source} ({err.strerror}); CNPG keeps PGDATA in pgdata on "
            "the instance's volume"
        ) from None
    if found != system_id:
        # Neither identifier nor path: the message reaches the claim's namespace.
        raise FailedPrecondition(
            "the data directory in the source volume is not the one the source server runs "
            "(their database system identifiers differ); CNPG runs PGDATA from pgdata on the "
            "instance's own volume"
        )
    remove_tree(partial)
    snapshot = _snapshot(source, volume, partial)  # the files in it, or None
    if snapshot is None:
        os.mkdir(partial, 0o700)
        # The new volume's top directory is owned like the source volume's (CNPG: postgres).
        owner = os.stat(volume)
        os.chown(partial, owner.st_uid, owner.st_gid)
        os.chmod(partial, stat.S_IMODE(owner.st_mode))
    files = snapshot or 0
    if tablespaces:
        os.mkdir(partial / "tablespaces", 0o700)
    for name, (top, inside, space) in sorted((tablespaces or {}).items()):
        into = partial / "tablespaces" / name
        os.mkdir(into, 0o700)
        st = os.stat(top)
        os.chown(into, st.st_uid, st.st_gid)
        os.chmod(into, stat.S_IMODE(st.st_mode))
        files += reflink.copy_tree(
            space, into / inside, leave=_leave_in_tablespace, live=True, workers=COPY_WORKERS
        )
    if snapshot is not None:
        _recopy_control_file(source, partial / "pgdata")
    else:
        files += reflink.copy_tree(
            source, partial / "pgdata", leave=_leave, live=True, workers=COPY_WORKERS
        )
    archive = partial / "pgdata" / "pg_wal" / "archive_status"
    archive.mkdir(mode=0o700)
    st = os.stat(partial / "pgdata")
    os.chown(archive, st.st_uid, st.st_gid)
    (partial / ATTEMPT_FILE).write_text(attempt + "\n")
    return files


def _snapshot(source: Path, volume: Path, partial: Path) -> int | None:
    """On btrfs, with the source volume a subvolume: take partial as its snapshot, one atomic
    copy whatever the size, then leave out of partial/pgdata what a copy leaves out (_leave)
    and drop everything else the volume holds; return the number of files kept. None where no
    snapshot can be taken (the files are reflinked then). The snapshot's pgdata must be the
    very directory source names (a snapshot keeps inode numbers): one swapped in since is
    refused, never walked."""
    if not subvolume.is_subvolume(volume):
        return None
    expected = os.stat(source)
    try:
        subvolume.snapshot(volume, partial)
    except OSError as err:
        if err.errno in (errno.EXDEV, errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP):
            return None  # another filesystem: the copy says what is wrong
        raise
    pgdata = partial / "pgdata"
    try:
        got = os.lstat(pgdata)
    except FileNotFoundError:
        got = None
    if got is None or not stat.S_ISDIR(got.st_mode) or got.st_ino != expected.st_ino:
        remove_tree(partial)
        raise FailedPrecondition(
            "the source's data directory was replaced while it was copied; the clone starts over"
        )
    for entry in os.listdir(partial):
        if entry != "pgdata":
            remove_tree(partial / entry)
    owner = os.lstat(pgdata)
    kept = 0
    for root, dirs, names in os.walk(pgdata):
        top = os.path.relpath(root, pgdata)
        rel = "" if top == "." else top + "/"
        for name in [*dirs, *names]:
            what = _leave(rel + name)
            path = Path(root) / name
            if what in (Leave.NOTHING, Leave.LAST) and name in names:
                kept += 1
            elif what == Leave.OUT:
                remove_tree(path)
            elif what == Leave.CONTENTS:
                if path.is_symlink() or not path.is_dir():
                    path.unlink()  # pg_wal linked to a WAL volume: a directory of its own
                    os.mkdir(path, 0o700)
                    os.chown(path, owner.st_uid, owner.st_gid)
                else:
                    for inner in os.listdir(path):
                        remove_tree(path / inner)
        dirs[:] = [d for d in dirs if _leave(rel + d) == Leave.NOTHING]
    return kept


def _recopy_control_file(source: Path, pgdata: Path) -> None:
    """global/pg_control again from the source, after every other file (a standby's backup
    ends where its copied control file says)."""
    top = reflink.open_dir(source)
    try:
        global_fd = reflink.open_dir("global", top)
    finally:
        os.close(top)
    try:
        fd = reflink.open_regular("pg_control", global_fd)
    finally:
        os.close(global_fd)
    try:
        target = pgdata / "global" / "pg_control"
        target.unlink()
        reflink.clone_fd(fd, target, os.fstat(fd), source / "global" / "pg_control")
    finally:
        os.close(fd)


def _write(path: Path, data: str, owner: os.stat_result) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode())
    os.chown(path, owner.st_uid, owner.st_gid)


def _copy_file(wal_fd: int, name: str, dst: Path) -> None:
    """One WAL file, opened relative to the WAL directory's descriptor and never through a
    link: a reflink on the same filesystem, the bytes when the WAL lives on another one."""
    fd = reflink.open_regular(name, wal_fd)
    try:
        st = os.fstat(fd)
        # A Finish step run again (its answer was not written) copies the segment anew: it
        # may have more WAL now, and a copy is never appended to.
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()
        try:
            reflink.clone_fd(fd, dst, st, name)
            return
        except ReflinkUnsupported:
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            offset = 0
            while offset < st.st_size:
                sent = os.sendfile(out, fd, offset, st.st_size - offset)
                if sent == 0:
                    break
                offset += sent
            os.fchown(out, st.st_uid, st.st_gid)
            os.fchmod(out, stat.S_IMODE(st.st_mode))
        finally:
            os.close(out)
    finally:
        os.close(fd)


def finish(
    partial: Path,
    attempt: str,
    wal_dir: Path,
    label_file: str,
    map_file: str,
    start_lsn: int,
    stop_lsn: int,
    segment_bytes: int,
) -> int:
    """Write backup_label and tablespace_map byte for byte and copy the WAL segments from the
    one holding start_lsn through the one holding stop_lsn (on any timeline), plus timeline
    history files; return the number of WAL files."""
    if attempt_of(partial) != attempt + "\n":
        raise FailedPrecondition(
            f"the copy in {partial} is not the one of this attempt (the node plugin restarted "
            "or another attempt began); the clone starts over"
        )
    pgdata = partial / "pgdata"
    owner = os.stat(pgdata)
    _write(pgdata / "backup_label", label_file, owner)
    if map_file:
        _write(pgdata / "tablespace_map", map_file, owner)
    try:
        first, last = wal_range(start_lsn, stop_lsn, segment_bytes)
    except ValueError as err:
        raise FailedPrecondition(f"the backup's WAL cannot be copied: {err}") from None
    seen: set[int] = set()
    try:
        wal_fd = reflink.open_dir(wal_dir)
    except OSError as err:
        raise FailedPrecondition(
            f"cannot read the source's WAL at {wal_dir}: {err.strerror}"
        ) from None
    try:
        copied = _copy_wal(wal_fd, pgdata / "pg_wal", first, last, segment_bytes, seen)
    finally:
        os.close(wal_fd)
    # seen holds only segments of the range: counted, never listed (a range is up to
    # MAX_BACKUP_WAL_BYTES), and how many are gone is not said.
    if len(seen) < last - first + 1:
        raise FailedPrecondition(
            f"WAL segments the backup needs are gone from {wal_dir}; the clone starts over"
        )
    return copied


def _copy_wal(
    wal_fd: int, into: Path, first: int, last: int, segment_bytes: int, seen: set[int]
) -> int:
    """Segments first..last and history files; the segments copied are added to seen."""
    copied = 0
    for name in sorted(os.listdir(wal_fd)):
        if _SEGMENT.match(name):
            number = _segment_number(name, segment_bytes)
            if not first <= number <= last:
                continue
        elif not _HISTORY.match(name):
            continue
        try:
            _copy_file(wal_fd, name, into / name)
        except OSError as err:
            # Removed meanwhile, or a link (never followed): the caller's check says whether
            # a segment the backup needs is missing.
            if err.errno in (errno.ENOENT, errno.ELOOP):
                continue
            raise
        if _SEGMENT.match(name):
            seen.add(_segment_number(name, segment_bytes))
        copied += 1
    return copied


def complete(partial: Path, final: Path, attempt: str) -> None:
    """Put attempt's finished copy in place: one rename."""
    if os.path.lexists(final):
        return
    if attempt_of(partial) != attempt + "\n":
        raise FailedPrecondition(
            f"the copy in {partial} is not the one of this attempt; the clone starts over"
        )
    (partial / ATTEMPT_FILE).unlink()
    os.rename(partial, final)


def wal_dir_of(pgdata: Path) -> Path:
    """pg_wal of a data directory on this host (a link to another filesystem is followed)."""
    return Path(os.path.realpath(pgdata / "pg_wal"))


class LocalCopier:
    """A native clone on this host (tests, benchmarks, `reflinker-csi snapshot`): the copy
    lands in target, a <label> directory with pgdata inside, as reflink_snapshot() makes it."""

    def __init__(self, source: Path, target: Path) -> None:
        self.source = source
        self.target = target
        self.partial = target.with_name(target.name + PARTIAL_SUFFIX)
        self.attempt = str(uuid.uuid4())

    def copy(self, start: BackupStart) -> None:
        copy_data(self.source, self.partial, self.attempt, start.system_id)

    def finish(self, start: BackupStart, stop: BackupStop) -> None:
        finish(
            self.partial,
            self.attempt,
            wal_dir_of(self.source),
            stop.label_file,
            stop.map_file,
            parse_lsn(start.lsn),
            parse_lsn(stop.lsn),
            start.segment_bytes,
        )

    def complete(self) -> None:
        complete(self.partial, self.target, self.attempt)

    def abandon(self) -> None:
        remove_tree(self.partial)
