"""Disk work on this host: directories under HOSTPATH_PREFIX, reflink copies, removal.

On btrfs each volume is a subvolume with a qgroup limit of its size, and a copy of a whole
volume or snapshot is a subvolume snapshot (disk/subvolume.py); elsewhere (XFS) a volume is a
directory and a copy clones its files one by one. Used directly by standalone mode and by the
node agent in Kubernetes mode."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from ..core.capture import part_of
from ..core.errors import FailedPrecondition, SourceUnavailable, VolumeInUse
from ..core.keys import CTX_SOURCE_POD
from ..core.layout import DELETING_SUFFIX, PARTIAL_SUFFIX, Layout, is_guid
from ..core.records import Kind, VolumeRecord
from ..core.space import SpaceFloor, check_room
from . import reflink, subvolume
from .mounts import mount_containing, mounts_of
from .usage import cow_extent_size, set_cow_extent_size

log = logging.getLogger(__name__)
NO_FLOOR = SpaceFloor()


def remove_tree(path: Path) -> None:
    """Remove path without following symlinks, inside or at the top."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    if subvolume.is_subvolume(path):
        subvolume.delete(path)  # one call, whatever it holds
        return
    # On Linux rmtree works through directory file descriptors and never follows symlinks
    # (shutil.rmtree.avoids_symlink_attacks).
    shutil.rmtree(path)


# pg_control's DBState values of a cleanly stopped server: DB_SHUTDOWNED (a primary) and
# DB_SHUTDOWNED_IN_RECOVERY (a standby); the field follows the system identifier and two
# version numbers in every major.
SHUT_DOWN = (1, 2)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _not_shut_down(pgdata: Path) -> str:
    """Why the server of a data directory is not cleanly shut down ("" when it is)."""
    top = reflink.open_dir(pgdata)
    try:
        if _exists(top, "postmaster.pid"):
            return "postmaster.pid present"
        state = _control_state(top)
    finally:
        os.close(top)
    return "" if state in SHUT_DOWN else f"control file state {state}"


def _control_state(pgdata_fd: int) -> int:
    """The state field of global/pg_control, read through descriptors (no link followed)."""
    global_fd = reflink.open_dir("global", pgdata_fd)
    try:
        fd = reflink.open_regular("pg_control", global_fd)
    finally:
        os.close(global_fd)
    try:
        head = os.pread(fd, 20, 0)
    finally:
        os.close(fd)
    if len(head) < 20:
        return -1
    return int.from_bytes(head[16:20], "little")


def _step_into(fd: int, part: str, path: Path, volume: Path) -> int:
    """The descriptor of directory part inside fd, never through a link."""
    try:
        st = os.lstat(part, dir_fd=fd)
        if stat.S_ISLNK(st.st_mode):
            raise FailedPrecondition(
                f"source directory {path}: {part} is a symbolic link; a source is read "
                f"only within its own volume ({volume}), so it cannot be copied"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise FailedPrecondition(f"source directory {path}: {part} is not a directory")
        inner = reflink.open_dir(part, fd)
    except OSError as err:
        reason = {
            errno.ENOTDIR: "was replaced while it was opened",
            errno.ELOOP: "was replaced while it was opened",
        }.get(err.errno or 0, f"is missing ({err.strerror})")
        raise FailedPrecondition(f"source directory {path}: {part} {reason}") from None
    return inner


class LocalDisk:
    """Volume and snapshot directories of one prefix on this host."""

    def __init__(
        self,
        layout: Layout,
        source_roots: tuple[Path, ...] = (),
        floor: SpaceFloor = NO_FLOOR,
    ) -> None:
        self.layout = layout
        self.floor = floor
        # Besides the prefix, where hot clones of other drivers' volumes may wait (kubelet's
        # directory): the only places adopt() takes a directory from.
        self.source_roots = tuple(Path(os.path.realpath(r)) for r in source_roots)

    @functools.cached_property
    def filesystem(self) -> str:
        """The type of the prefix's filesystem (xfs, btrfs)."""
        return mount_containing(self.layout.prefix).fs_type

    @property
    def subvolumes(self) -> bool:
        """The prefix is on btrfs: volumes are subvolumes, copies of them snapshots."""
        return self.filesystem == "btrfs"

    def new_top(self, path: Path, mode: int = 0o700) -> None:
        """A new volume's top directory: a subvolume on btrfs, a directory elsewhere."""
        if self.subvolumes:
            subvolume.create(path, mode)
        else:
            os.mkdir(path, mode)

    def limit(self, record: VolumeRecord, path: Path) -> None:
        """On btrfs, cap a volume's subvolume at the volume's size (a write past it fails with
        EDQUOT there, its neighbours unharmed). Snapshots and captures are never written."""
        size = record.capacity_bytes
        if self.subvolumes and record.kind == Kind.VOLUME and size and subvolume.is_subvolume(path):
            subvolume.limit(path, size)

    def data_dir(self, record: VolumeRecord) -> Path:
        if record.kind == Kind.SNAPSHOT:
            return self.layout.snapshot_dir(record.guid)
        if record.kind == Kind.CAPTURE:
            return self.layout.capture_dir(record.guid)
        return self.layout.volume_dir(record.guid)

    def apply_cow_extent_size(self, size_bytes: int) -> None:
        """Set the copy-on-write extent size hint on the prefix (new volumes inherit it); on a
        filesystem without the hint (btrfs) say so once and go on."""
        try:
            if cow_extent_size(self.layout.prefix) != size_bytes:
                set_cow_extent_size(self.layout.prefix, size_bytes)
        except OSError as err:
            log.warning(
                "cannot set the copy-on-write extent size hint on %s (%s); "
                "the filesystem's default applies",
                self.layout.prefix,
                err.strerror,
            )
            return
        log.info(
            "copy-on-write extent size",
            extra={"fields": {"prefix": str(self.layout.prefix), "bytes": size_bytes}},
        )

    def space(self) -> tuple[int, int, int]:
        """(free bytes, the floor in bytes, free inodes) under the prefix."""
        st = os.statvfs(self.layout.prefix)
        return (
            st.f_bavail * st.f_frsize,
            self.floor.of(st.f_blocks * st.f_frsize),
            st.f_favail,
        )

    def check_room(self, node: str) -> None:
        """Refuse a new volume below the free-space floor; existing volumes are not touched."""
        free, floor, _ = self.space()
        check_room(node, free, floor, str(self.layout.prefix), str(self.floor))

    def publishers(self, record: VolumeRecord) -> list[str]:
        """Mount points that expose the record's directory (pods using it)."""
        path = self.data_dir(record)
        if not path.is_dir() or path.is_symlink():
            return []
        return [m.mount_point for m in mounts_of(path)]

    def make_empty(self, record: VolumeRecord) -> None:
        final = self.data_dir(record)
        if os.path.lexists(final):
            return
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        remove_tree(partial)
        self.new_top(partial, 0o750)
        self.limit(record, partial)
        os.rename(partial, final)

    def reflink_copy(
        self,
        source: VolumeRecord,
        record: VolumeRecord,
        stopped: Path | None = None,
        clean: bool = False,
    ) -> None:
        """Cold copy: reflink the source tree into <dir>.partial, then rename it into place.
        stopped: the PGDATA of the fenced CNPG instance the source belongs to; the source may
        be mounted by its pod, as long as that PostgreSQL is down before and after the copy.
        clean: a data directory in the source (pgdata) must have been shut down cleanly."""
        final = self.data_dir(record)
        if os.path.lexists(final):
            return
        src = self.data_dir(source)
        if not src.is_dir() or src.is_symlink():
            raise FailedPrecondition(
                f"the directory {src} of source {source.kind} {source.guid} is missing on "
                f"node {source.node}; the source is lost, delete it"
            )
        instance = record.context.get(CTX_SOURCE_POD, "the source's CNPG instance")
        if stopped is not None:
            self.check_stopped(stopped, instance)
        elif source.kind != Kind.SNAPSHOT and self.publishers(source):
            raise VolumeInUse(
                f"source volume {source.guid} is in use on node {source.node} "
                f"(mounted at {', '.join(self.publishers(source))}); a running database is "
                "cloned through its PostgreSQL server"
            )
        elif clean:
            self._require_shut_down(source, src)
        reflink.probe(self.layout.state_dir)
        final.parent.mkdir(mode=0o700, exist_ok=True)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        remove_tree(partial)
        try:
            if self.subvolumes and subvolume.is_subvolume(src):
                subvolume.snapshot(src, partial)
                how = "snapshot"
            else:
                how = f"{reflink.copy_tree(src, partial)} files"
            if stopped is not None:
                self.check_stopped(stopped, instance)  # and it stayed down throughout
            self.limit(record, partial)
            os.rename(partial, final)
        except BaseException:
            remove_tree(partial)
            raise
        log.info(
            "copied %s %s from %s %s (%s)",
            record.kind,
            record.guid,
            source.kind,
            source.guid,
            how,
        )

    def cut_piece(
        self, capture: VolumeRecord, record: VolumeRecord, piece: str, wal_link: str = ""
    ) -> None:
        """A piece of a capture (core/capture.py): reflink the capture's part for it into
        <dir>.partial, then rename it into place; on btrfs the PG_DATA piece is a snapshot of
        the capture with everything but pgdata removed. Nothing uses a capture but this.
        wal_link: a PG_DATA piece whose WAL is in the WAL piece: its pg_wal becomes that link."""
        final = self.data_dir(record)
        if os.path.lexists(final):
            return
        part = part_of(piece)
        top = self.data_dir(capture)
        with self.source_dir(top / part.inside, top) as src:
            how = self._cut(capture, record, part.into, src, wal_link)
        log.info(
            "cut %s %s from capture %s (%s, %s)", record.kind, record.guid, capture.guid, piece, how
        )

    def _cut(
        self, capture: VolumeRecord, record: VolumeRecord, into: str, src: Path, wal_link: str
    ) -> str:
        final = self.data_dir(record)
        top = self.data_dir(capture)
        reflink.probe(self.layout.state_dir)
        final.parent.mkdir(mode=0o700, exist_ok=True)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        remove_tree(partial)
        try:
            if into == "pgdata" and self.subvolumes and subvolume.is_subvolume(top):
                subvolume.snapshot(top, partial)  # the whole capture at once, then trimmed
                for entry in os.listdir(partial):
                    if entry != into:
                        remove_tree(partial / entry)
                how = "snapshot"
            elif into:
                self.new_top(partial)
                # The new volume's top directory is owned like the capture's (CNPG: postgres).
                st = os.stat(top)
                os.chown(partial, st.st_uid, st.st_gid)
                os.chmod(partial, stat.S_IMODE(st.st_mode))
                how = f"{reflink.copy_tree(src, partial / into)} files"
            else:
                self.new_top(partial)
                how = f"{reflink.copy_tree(src, partial, into_existing=True)} files"
            wal = partial / into / "pg_wal"
            if wal_link and into == "pgdata" and not wal.is_symlink():
                st = os.stat(wal)
                remove_tree(wal)
                os.symlink(wal_link, wal)
                os.lchown(wal, st.st_uid, st.st_gid)
            self.limit(record, partial)
            os.rename(partial, final)
        except BaseException:
            remove_tree(partial)
            raise
        return how

    def adopt(self, record: VolumeRecord, moved_from: Path) -> None:
        """Move a hot clone's <label> directory into place: one rename on the same mount, or a
        reflink copy and removal when it sits on another mount of the same filesystem."""
        final = self.data_dir(record)
        if os.path.lexists(final):
            return
        real = Path(os.path.realpath(moved_from))
        inside = self.layout.contains(real) or any(r in real.parents for r in self.source_roots)
        if not inside or real.name != record.guid or moved_from.is_symlink():
            raise FailedPrecondition(
                f"hot clone directory {moved_from} is not a {record.guid} directory under "
                f"{self.layout.prefix} or {', '.join(map(str, self.source_roots)) or '-'}; "
                "it cannot be moved into place"
            )
        pgdata = real / "pgdata"
        if pgdata.is_symlink() or not pgdata.is_dir():
            raise FailedPrecondition(
                f"hot clone directory {moved_from} has no pgdata directory inside"
            )
        try:
            self.limit(record, real)
            os.rename(real, final)
            return
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        remove_tree(partial)
        reflink.copy_tree(real, partial)
        os.rename(partial, final)
        remove_tree(real)

    def check_stopped(self, pgdata: Path, instance: str) -> None:
        """The PostgreSQL of a fenced instance is down: no postmaster.pid in its PGDATA, and its
        control file says it was shut down (as a primary or as a standby). SourceUnavailable
        otherwise: CNPG stops it after fencing, and the copy is retried."""
        with self.source_dir(pgdata, pgdata.parent) as real:
            reason = _not_shut_down(real)
        if reason:
            raise SourceUnavailable(
                f"{instance} is fenced, but its PostgreSQL has not shut down yet ({reason}); "
                "the cold copy is retried once it has"
            )

    def _require_shut_down(self, source: VolumeRecord, volume: Path) -> None:
        """A volume no pod uses that holds a data directory (pgdata, as CNPG keeps it) whose WAL
        is on another volume (CNPG's walStorage: pg_wal a link): its server shut down cleanly,
        or the copy waits. A crashed or restarting instance (a pod deleted, a failover) is
        copied hot once it runs again: its data directory alone holds none of the WAL that
        crash recovery needs. With its WAL inside, a crash-consistent copy starts as it is."""
        try:
            with self.source_dir(volume / "pgdata", volume) as real:
                if not stat.S_ISLNK(os.lstat(real / "pg_wal").st_mode):
                    return  # its WAL is in it: a crashed one is copied as crash recovery finds it
                reason = _not_shut_down(real)
        except (FailedPrecondition, OSError):
            return  # no data directory there (or not one of CNPG's): files are copied as files
        if reason:
            raise SourceUnavailable(
                f"source volume {source.guid} holds a PostgreSQL data directory that no running "
                f"instance uses and that was not shut down cleanly ({reason}): its instance is "
                "restarting or crashed; the clone is retried, and taken hot once the instance "
                "runs again"
            )

    @contextlib.contextmanager
    def source_dir(self, path: Path, volume: Path) -> Iterator[Path]:
        """A source's directory named by a record, within the source volume's own directory
        (under the prefix or a source root, kubelet's directory), resolved once: walked from
        the volume one component at a time, never through a symbolic link (one could lead
        into another tenant's volume), and held open while the caller uses it. What it yields
        names that directory itself (/proc/self/fd/N): a link swapped in on the way after the
        check is never taken. Errors name only what the record named, never where a link
        points."""
        root = Path(os.path.realpath(volume))
        inside = self.layout.contains(root) or any(r in root.parents for r in self.source_roots)
        try:
            relative = path.relative_to(volume)
        except ValueError:
            relative = None
        if not inside or relative is None or ".." in relative.parts or not root.is_dir():
            raise FailedPrecondition(
                f"source directory {path} is not inside a volume directory under "
                f"{self.layout.prefix} or {', '.join(map(str, self.source_roots)) or '-'}; "
                "it cannot be copied"
            )
        fd = reflink.open_dir(root)
        try:
            for part in relative.parts:
                inner = _step_into(fd, part, path, volume)
                os.close(fd)
                fd = inner
            yield reflink.held(fd)
        finally:
            os.close(fd)

    def remove(self, record: VolumeRecord) -> None:
        final = self.data_dir(record)
        doomed = final.with_name(final.name + DELETING_SUFFIX)
        if os.path.lexists(final):
            # One rename makes the data vanish at once; the slow removal follows.
            os.rename(final, doomed)
        remove_tree(doomed)
        remove_tree(final.with_name(final.name + PARTIAL_SUFFIX))

    def sweep(self) -> None:
        """Remove partial copies and half-removed directories a crash left behind."""
        places = [self.layout.prefix]
        for place in (self.layout.snapshots_dir, self.layout.captures_dir):
            if place.is_dir():
                places.append(place)
        for place in places:
            for entry in place.iterdir():
                for suffix in (PARTIAL_SUFFIX, DELETING_SUFFIX):
                    if entry.name.endswith(suffix) and is_guid(entry.name[: -len(suffix)]):
                        log.info("removing leftover %s", entry)
                        remove_tree(entry)
