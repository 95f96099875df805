"""Node-side work: bind-mount a volume at kubelet's target path, unmount it, report usage."""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ..core.layout import Layout, check_absolute_path, require_guid
from .mounts import (
    BIND_MOUNT_FLAGS,
    MS_RDONLY,
    bind_mount,
    filesystem_path,
    mount_at,
    read_mountinfo,
    unmount,
)
from .usage import volume_usage


@dataclass(frozen=True)
class VolumeStats:
    bytes_total: int
    bytes_available: int
    bytes_used: int
    inodes_total: int
    inodes_available: int
    inodes_used: int
    abnormal: bool
    message: str


def mount_flags(options: Sequence[str], readonly: bool) -> int:
    flags = MS_RDONLY if readonly else 0
    for option in options:
        for part in option.split(","):
            part = part.strip()
            if part not in BIND_MOUNT_FLAGS:
                raise InvalidArgument(
                    f"mount flag {part[:40]!r} is not supported for a bind mount; "
                    f"use only {sorted(BIND_MOUNT_FLAGS)}"
                )
            flags |= BIND_MOUNT_FLAGS[part]
    return flags


class Publisher:
    """Publishes volumes of one prefix under one target root (kubelet's directory)."""

    def __init__(self, layout: Layout, target_root: Path) -> None:
        self.layout = layout
        self.target_root = Path(os.path.realpath(target_root))

    def _target(self, target_path: str) -> Path:
        target = check_absolute_path(target_path, "target_path")
        # Resolve the parent: a symlink planted on the way must not lead out of the root.
        parent = Path(os.path.realpath(target.parent))
        resolved = parent / target.name
        if self.target_root not in resolved.parents:
            raise InvalidArgument(
                f"target_path {target_path!r} is outside {self.target_root}, where this node "
                "plugin publishes volumes (TARGET_ROOT)"
            )
        if self.layout.contains(resolved) or resolved == self.layout.prefix:
            raise InvalidArgument(f"target_path {target_path!r} lies inside HOSTPATH_PREFIX")
        return resolved

    def _volume_dir(self, volume_id: str) -> Path:
        path = self.layout.volume_dir(require_guid(volume_id))
        if path.is_symlink() or not path.is_dir():
            raise NotFound(f"volume {volume_id} has no directory {path} on this node")
        return path

    def publish(
        self,
        volume_id: str,
        target_path: str,
        readonly: bool,
        options: Sequence[str],
        mount_group: str = "",
    ) -> None:
        """Bind-mount the volume at target_path; succeed if it is already mounted there.
        mount_group (the pod's fsGroup, from kubelet) is applied as apply_group describes."""
        _require(volume_id=volume_id, target_path=target_path)
        flags = mount_flags(options, readonly)
        gid = parse_mount_group(mount_group)
        source = self._volume_dir(volume_id)
        target = self._target(target_path)
        entries = read_mountinfo()
        current = mount_at(target, entries)
        if current is not None:
            device, inner = filesystem_path(source, entries)
            if (current.device, current.root) != (device, inner):
                raise AlreadyExists(
                    f"target_path {target} already holds another mount ({current.source}:"
                    f"{current.root}); unpublish it first"
                )
            if current.read_only != bool(flags & MS_RDONLY):
                raise AlreadyExists(
                    f"volume {volume_id} is already published at {target} "
                    f"{'read-only' if current.read_only else 'read-write'}; unpublish it first"
                )
            return
        try:
            target.mkdir(mode=0o750, parents=False)
        except FileExistsError:
            if target.is_symlink() or not target.is_dir():
                raise AlreadyExists(f"target_path {target} exists and is not a directory") from None
        except FileNotFoundError:
            raise NotFound(
                f"the parent of target_path {target} does not exist; kubelet creates it"
            ) from None
        if gid is not None and not flags & MS_RDONLY:
            apply_group(source, gid)
        bind_mount(source, target, flags)

    def unpublish(self, volume_id: str, target_path: str) -> None:
        """Unmount target_path if this volume is mounted there and remove the directory."""
        _require(volume_id=volume_id, target_path=target_path)
        require_guid(volume_id)
        target = self._target(target_path)
        device, prefix_inner = filesystem_path(self.layout.prefix)
        while (current := mount_at(target)) is not None:
            if current.device != device or not current.root.startswith(
                prefix_inner.rstrip("/") + "/"
            ):
                raise FailedPrecondition(
                    f"target_path {target} holds a mount that is not a pg-reflinker volume "
                    f"({current.source}:{current.root}); refusing to unmount it"
                )
            unmount(target)
        try:
            target.rmdir()
        except FileNotFoundError:
            pass
        except OSError as err:
            if err.errno == errno.ENOTDIR:
                raise FailedPrecondition(f"target_path {target} is not a directory") from None
            raise

    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        """Usage of the filesystem behind a published volume; NotFound unless mounted there."""
        _require(volume_id=volume_id, volume_path=volume_path)
        require_guid(volume_id)
        if not volume_path.startswith("/") or "\x00" in volume_path:
            raise NotFound(
                f"volume_path {volume_path[:200]!r} is not where volume {volume_id} is published"
            )
        path = Path(os.path.normpath(volume_path))
        source = self.layout.volume_dir(volume_id)
        entries = read_mountinfo()
        current = mount_at(path, entries)
        if not source.is_dir():
            if current is None:
                raise NotFound(f"volume {volume_id} does not exist on this node")
            st = os.statvfs(path)
            return _stats(
                st,
                abnormal=True,
                message=f"the directory {source} of volume {volume_id} is missing",
            )
        device, inner = filesystem_path(source, entries)
        if current is None or (current.device, current.root) != (device, inner):
            raise NotFound(f"volume {volume_id} is not published at {path}")
        stats = _stats(os.statvfs(path), abnormal=False, message="volume is healthy")
        # The filesystem is shared with other volumes: "used" is what this volume alone holds
        # (bytes shared with no other file), so kubelet_volume_stats_used_bytes is its cost.
        usage, cap = volume_usage(source)
        stats = dataclasses.replace(stats, bytes_used=usage.own_bytes)
        if cap:
            # A btrfs volume capped at its size: what it may still write before EDQUOT.
            room = min(stats.bytes_available, max(0, cap - usage.used_bytes))
            stats = dataclasses.replace(stats, bytes_total=cap, bytes_available=room)
        return stats


def parse_mount_group(value: str) -> int | None:
    if not value:
        return None
    if not value.isdigit() or len(value) > 10 or int(value) > 0xFFFFFFFE:
        raise InvalidArgument(
            f"volume_mount_group {value[:40]!r} is not a numeric group id (the pod's fsGroup)"
        )
    return int(value)


def apply_group(directory: Path, gid: int) -> None:
    """The pod's fsGroup, as kubelet applies it with fsGroupChangePolicy OnRootMismatch: when the
    volume's top directory already has the group (a clone mounted by the same kind of pod as its
    source, e.g. CNPG's 26), nothing below it is touched; otherwise every file and directory gets
    the group and group read/write (directories also setgid), as kubelet's walk would do.
    The walk goes through directory descriptors (os.fwalk) and changes each entry through a
    descriptor opened without following links, so an entry swapped for a link while it runs
    changes nothing outside the volume."""
    st = directory.stat()
    if st.st_gid != gid:
        for _, dirs, files, dir_fd in os.fwalk(directory, follow_symlinks=False):
            for name in dirs + files:
                _group_entry(name, dir_fd, gid)
        os.chown(directory, -1, gid)
    mode = stat.S_IMODE(st.st_mode) | stat.S_IRWXG | stat.S_ISGID
    if stat.S_IMODE(directory.stat().st_mode) != mode:
        os.chmod(directory, mode)


def _group_entry(name: str, dir_fd: int, gid: int) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode) or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            if st.st_gid != gid:  # the link (or socket, fifo) itself, never its target
                os.chown(name, -1, gid, dir_fd=dir_fd, follow_symlinks=False)
            return
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ELOOP):
            return  # gone, or swapped for a link since it was listed
        raise
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return
        if st.st_gid != gid:
            os.fchown(fd, -1, gid)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            wanted = mode | stat.S_IRWXG | stat.S_ISGID
        else:
            execute = stat.S_IXGRP if mode & stat.S_IXUSR else 0
            wanted = mode | stat.S_IRGRP | stat.S_IWGRP | execute
        if wanted != mode:
            os.fchmod(fd, wanted)
    finally:
        os.close(fd)


def _require(**fields: str) -> None:
    for name, value in fields.items():
        if not value:
            raise InvalidArgument(f"{name} is required")


def _stats(st: os.statvfs_result, abnormal: bool, message: str) -> VolumeStats:
    total = st.f_blocks * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    return VolumeStats(
        bytes_total=total,
        bytes_available=avail,
        bytes_used=(st.f_blocks - st.f_bfree) * st.f_frsize,
        inodes_total=st.f_files,
        inodes_available=st.f_favail,
        inodes_used=st.f_files - st.f_ffree,
        abnormal=abnormal,
        message=message,
    )
