"""btrfs subvolumes: a volume of its own for each volume, a snapshot for each copy of one, a
qgroup limit for each volume's size.

A subvolume snapshot costs the same at any size and fragmentation (a reflink copy costs per
extent). Everything here is one ioctl on a directory descriptor; no btrfs program is needed."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .mounts import mount_containing

# <linux/btrfs.h>: _IOW(0x94, nr, struct btrfs_ioctl_vol_args) with the 4096-byte vol_args
# (an fd, then the new entry's name).
_VOL_ARGS = struct.Struct("=q4088s")
BTRFS_IOC_SNAP_CREATE = 0x50009401
BTRFS_IOC_SUBVOL_CREATE = 0x5000940E
BTRFS_IOC_SNAP_DESTROY = 0x5000940F
# _IOWR(0x94, 40, struct btrfs_ioctl_quota_ctl_args {u64 cmd; u64 status;}); cmd 1 enables.
BTRFS_IOC_QUOTA_CTL = 0xC0109428
_QUOTA_ENABLE = 1
# _IOR(0x94, 43, struct btrfs_ioctl_qgroup_limit_args): the qgroup id (0: the subvolume of the
# descriptor), then flags, max_rfer, max_excl, rsv_rfer, rsv_excl.
BTRFS_IOC_QGROUP_LIMIT = 0x8030942B
_LIMIT_ARGS = struct.Struct("=QQQQQQ")
_LIMIT_MAX_RFER = 1
# A subvolume's top directory is always this inode in its tree.
_FIRST_FREE_OBJECTID = 256


def is_btrfs(path: Path) -> bool:
    return mount_containing(path).fs_type == "btrfs"


def is_subvolume(path: Path) -> bool:
    """path is the top directory of a btrfs subvolume (never through a link)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == _FIRST_FREE_OBJECTID and is_btrfs(path.parent)


def _vol_args(name: str, fd: int = 0) -> bytearray:
    encoded = name.encode()
    if "/" in name or not encoded or len(encoded) > 255:
        raise ValueError(f"not a directory entry name: {name!r}")
    return bytearray(_VOL_ARGS.pack(fd, encoded))


def _in_parent(path: Path, request: int, fd: int = 0) -> None:
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.ioctl(parent, request, _vol_args(path.name, fd))
    finally:
        os.close(parent)


def create(path: Path, mode: int = 0o700) -> None:
    """A new, empty subvolume at path (which must not exist)."""
    _in_parent(path, BTRFS_IOC_SUBVOL_CREATE)
    os.chmod(path, mode)


def snapshot(source: Path, path: Path) -> None:
    """A writable snapshot of the subvolume at source, at path (which must not exist): one
    atomic copy of every file in it, whatever their size. Subvolumes nested in source appear
    in it as empty directories."""
    fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _in_parent(path, BTRFS_IOC_SNAP_CREATE, fd)
    finally:
        os.close(fd)


def delete(path: Path) -> None:
    """Remove the subvolume at path with everything in it (its space comes back in the
    background). Subvolumes nested in it (a tenant may make some in its own volume, read-only
    ones too) are destroyed first, deepest first, found through descriptors that never follow a
    link out of it."""
    try:
        _in_parent(path, BTRFS_IOC_SNAP_DESTROY)
        return
    except OSError as err:
        if err.errno != errno.ENOTEMPTY:
            raise
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _destroy_nested(fd, os.fstat(fd).st_dev)
    finally:
        os.close(fd)
    _in_parent(path, BTRFS_IOC_SNAP_DESTROY)


def _destroy_nested(dir_fd: int, device: int) -> None:
    """Destroy every subvolume below the directory dir_fd (of the subvolume on device)."""
    with os.scandir(dir_fd) as entries:
        names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    for name in names:
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except OSError:
            continue  # gone, or replaced by a link: nothing of ours below it
        try:
            st = os.fstat(fd)
            nested = st.st_ino == _FIRST_FREE_OBJECTID and st.st_dev != device
            _destroy_nested(fd, st.st_dev if nested else device)
        finally:
            os.close(fd)
        if nested:
            # Root destroys a subvolume, read-only or not, in one call.
            fcntl.ioctl(dir_fd, BTRFS_IOC_SNAP_DESTROY, _vol_args(name))


def enable_quota(path: Path) -> None:
    """Turn qgroups on for the filesystem of path (nothing happens when they are on)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_QUOTA_CTL, bytearray(struct.pack("=QQ", _QUOTA_ENABLE, 0)))
    finally:
        os.close(fd)


def limit(path: Path, size_bytes: int) -> None:
    """Cap the bytes the subvolume at path refers to (shared with its source or not): a write
    past it fails with EDQUOT in this subvolume only. 0 removes the cap."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        flags = _LIMIT_MAX_RFER if size_bytes else 0
        args = bytearray(_LIMIT_ARGS.pack(0, flags, size_bytes, 0, 0, 0))
        try:
            fcntl.ioctl(fd, BTRFS_IOC_QGROUP_LIMIT, args)
        except OSError as err:
            if err.errno != errno.ENOTCONN:  # qgroups are off: turn them on, once
                raise
            enable_quota(path)
            fcntl.ioctl(fd, BTRFS_IOC_QGROUP_LIMIT, args)
    finally:
        os.close(fd)


# -- what a subvolume holds, from its qgroup -----------------------------------------------------

# _IOWR(0x94, 17, struct btrfs_ioctl_search_args): a 104-byte key (tree, min/max objectid,
# offset and transid, min/max type, the number of items), then a buffer of items, each a
# header (transid, objectid, offset, type, length) and its data.
BTRFS_IOC_TREE_SEARCH = 0xD0009411
_SEARCH_KEY = struct.Struct("=QQQQQQQLLLL32x")
_SEARCH_HEADER = struct.Struct("=QQQLL")
# _IOWR(0x94, 18, struct btrfs_ioctl_ino_lookup_args): tree id, object id, then a name buffer;
# tree 0 and the top directory's object id answer with the subvolume's id.
BTRFS_IOC_INO_LOOKUP = 0xD0009412
_INO_LOOKUP = struct.Struct("=QQ4080s")
_QUOTA_TREE = 8
_QGROUP_INFO_KEY = 242  # generation, referenced, referenced compressed, exclusive, ...
_QGROUP_LIMIT_KEY = 244  # flags, max referenced, max exclusive, ...
_FIVE = struct.Struct("=QQQQQ")


@dataclass(frozen=True)
class Qgroup:
    referenced: int  # bytes the subvolume refers to, shared or not
    exclusive: int  # bytes no other subvolume refers to
    limit: int  # the cap on referenced bytes (0: none)


def _search_one(fd: int, item_type: int, qgroup_id: int) -> tuple[int, ...] | None:
    args = bytearray(4096)
    _SEARCH_KEY.pack_into(
        args, 0, _QUOTA_TREE, 0, 0, qgroup_id, qgroup_id, 0, 2**64 - 1, item_type, item_type, 1, 0
    )
    fcntl.ioctl(fd, BTRFS_IOC_TREE_SEARCH, args)
    if _SEARCH_KEY.unpack_from(args, 0)[9] == 0:  # nr_items found
        return None
    _, _, offset, found_type, length = _SEARCH_HEADER.unpack_from(args, _SEARCH_KEY.size)
    if found_type != item_type or offset != qgroup_id or length < _FIVE.size:
        return None
    return _FIVE.unpack_from(args, _SEARCH_KEY.size + _SEARCH_HEADER.size)


def qgroup(path: Path) -> Qgroup | None:
    """The qgroup numbers of the subvolume at path, as of btrfs's last commit; None where
    qgroups are off (or the subvolume has none yet)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        lookup = bytearray(_INO_LOOKUP.pack(0, _FIRST_FREE_OBJECTID, b""))
        fcntl.ioctl(fd, BTRFS_IOC_INO_LOOKUP, lookup)
        subvolume_id = _INO_LOOKUP.unpack_from(lookup, 0)[0]
        try:
            info = _search_one(fd, _QGROUP_INFO_KEY, subvolume_id)
            limits = _search_one(fd, _QGROUP_LIMIT_KEY, subvolume_id)
        except OSError as err:
            if err.errno == errno.ENOENT:  # no quota tree: qgroups are off
                return None
            raise
    finally:
        os.close(fd)
    if info is None:
        return None
    cap = limits[1] if limits is not None and limits[0] & _LIMIT_MAX_RFER else 0
    return Qgroup(referenced=info[1], exclusive=info[3], limit=cap)
