"""What a volume costs on disk: bytes allocated to its files, and of those the bytes it shares
with no other file (FIEMAP's shared-extent flag; a fresh reflink clone owns almost nothing and
grows as it is written). On btrfs, a volume that is a subvolume with a qgroup reads both from
the qgroup instead, without walking its files."""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from . import subvolume

FS_IOC_FIEMAP = 0xC020660B
_HEADER = struct.Struct("=QQLLLL")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQLLLL")  # logical, physical, length, 2 reserved, flags, 3 reserved
_BATCH = 256
_LAST = 0x1
_SHARED = 0x2000
_ALL = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Usage:
    used_bytes: int  # allocated to the volume's files (shared or not)
    own_bytes: int  # allocated and shared with no other file
    files: int
    extents: int
    seconds: float  # what measuring cost


def file_extents(fd: int) -> tuple[int, int, int]:
    """(allocated bytes, bytes in extents not marked shared, extents) of one open file."""
    used = own = count = 0
    start = 0
    while True:
        request = bytearray(_HEADER.size + _EXTENT.size * _BATCH)
        _HEADER.pack_into(request, 0, start, _ALL - start, 0, 0, _BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
        mapped = _HEADER.unpack_from(request, 0)[3]
        if mapped == 0:
            return used, own, count
        count += mapped
        last = False
        for i in range(mapped):
            logical, _, length, _, _, flags, _, _, _ = _EXTENT.unpack_from(
                request, _HEADER.size + i * _EXTENT.size
            )
            used += length
            if not flags & _SHARED:
                own += length
            start = logical + length
            last = bool(flags & _LAST)
        if last:
            return used, own, count


def volume_usage(directory: Path) -> tuple[Usage, int]:
    """(what the volume's directory costs, its size cap in bytes or 0): from the qgroup of a
    btrfs subvolume (referenced and exclusive bytes, as of btrfs's last commit, at most about
    30 s old), else by walking its files."""
    began = time.monotonic()
    if subvolume.is_subvolume(directory):
        found = subvolume.qgroup(directory)
        if found is not None:
            usage = Usage(found.referenced, found.exclusive, 0, 0, time.monotonic() - began)
            return usage, found.limit
    return measure(directory), 0


def measure(directory: Path) -> Usage:
    """Walk directory (never following symlinks) and add up its regular files' extents."""
    began = time.monotonic()
    used = own = files = extents = 0
    for root, _dirs, names in os.walk(directory, followlinks=False):
        for name in names:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue  # a symlink, a socket, or gone meanwhile
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                file_used, file_own, file_count = file_extents(fd)
            except OSError:
                continue  # removed or truncated while measured; the next pass counts it
            finally:
                os.close(fd)
            used += file_used
            own += file_own
            files += 1
            extents += file_count
    return Usage(used, own, files, extents, time.monotonic() - began)


# -- the copy-on-write extent size hint (XFS) -------------------------------------------------

FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_COWEXTSIZE = 0x00010000
_FSXATTR = struct.Struct("=LLLLL8x")  # xflags, extsize, nextents, projid, cowextsize


def cow_extent_size(directory: Path) -> int:
    """The CoW extent size hint of directory in bytes (0: the filesystem's default)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(_FSXATTR.size)
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
        xflags, _, _, _, cowextsize = _FSXATTR.unpack(buf)
        return cowextsize if xflags & FS_XFLAG_COWEXTSIZE else 0
    finally:
        os.close(fd)


def set_cow_extent_size(directory: Path, size_bytes: int) -> None:
    """Set the hint on directory: files and directories made below it later inherit it, so a
    write into a clone unshares this much around each changed block instead of the default
    (XFS: 128 KiB). Raises OSError where the filesystem has no such hint (btrfs)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(_FSXATTR.size)
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
        xflags, extsize, nextents, projid, _ = _FSXATTR.unpack(buf)
        if size_bytes:
            xflags |= FS_XFLAG_COWEXTSIZE
        else:
            xflags &= ~FS_XFLAG_COWEXTSIZE
        fcntl.ioctl(
            fd, FS_IOC_FSSETXATTR, _FSXATTR.pack(xflags, extsize, nextents, projid, size_bytes)
        )
    finally:
        os.close(fd)
