"""Reflink copies: every regular file is cloned with FICLONE, never copied byte by byte."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from ..core.errors import ReflinkUnsupported, ResourceExhausted
from .mounts import mount_containing

FICLONE = 0x40049409
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS}


def _describe_filesystem(path: Path) -> str:
    try:
        entry = mount_containing(path)
        return f"{entry.fs_type} filesystem {entry.source} mounted at {entry.mount_point}"
    except OSError:  # pragma: no cover - mountinfo is always readable on Linux
        return f"the filesystem of {path}"


def _unsupported(path: Path, err: OSError) -> ReflinkUnsupported:
    return ReflinkUnsupported(
        f"cannot reflink {path}: {os.strerror(err.errno or 0)} on {_describe_filesystem(path)}. "
        "HOSTPATH_PREFIX and the source must share one XFS (mkfs.xfs -m reflink=1) or btrfs "
        "filesystem; pg-reflinker never falls back to a full copy"
    )


def clone_file(src_fd: int, dst_fd: int) -> None:
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def probe(directory: Path) -> None:
    """Raise ReflinkUnsupported unless files in directory can be reflinked."""
    src = directory / ".reflink-probe"
    dst = directory / ".reflink-probe.clone"
    try:
        with open(src, "w+b") as f:
            f.write(b"pg-reflinker reflink probe\n" * 200)
            f.flush()
            with open(dst, "wb") as g:
                try:
                    clone_file(f.fileno(), g.fileno())
                except OSError as err:
                    if err.errno in _NO_REFLINK:
                        raise _unsupported(directory, err) from None
                    raise
    finally:
        for p in (src, dst):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def copy_tree(src: Path, dst: Path) -> int:
    """Reflink-copy the tree at src to dst (which must not exist); return the number of files.

    Ownership, modes and times are kept; symlinks are recreated, never followed.
    """
    count = 0
    src_st = os.lstat(src)
    if not stat.S_ISDIR(src_st.st_mode):
        raise NotADirectoryError(str(src))
    os.mkdir(dst, 0o700)
    stack: list[tuple[Path, Path, os.stat_result]] = [(src, dst, src_st)]
    dirs_done: list[tuple[Path, os.stat_result]] = []
    while stack:
        s_dir, d_dir, s_st = stack.pop()
        with os.scandir(s_dir) as it:
            for entry in it:
                s_path = Path(entry.path)
                d_path = d_dir / entry.name
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(d_path, 0o700)
                    stack.append((s_path, d_path, st))
                elif stat.S_ISREG(st.st_mode):
                    _clone_regular(s_path, d_path, st)
                    count += 1
                elif stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(s_path), d_path)
                    os.lchown(d_path, st.st_uid, st.st_gid)
                # sockets, fifos and devices are runtime artefacts; a data directory needs none.
        dirs_done.append((d_dir, s_st))
    # Directory metadata last, so adding entries does not disturb the copied times.
    for d_dir, s_st in reversed(dirs_done):
        _copy_metadata(d_dir, s_st)
    return count


def _clone_regular(src: Path, dst: Path, st: os.stat_result) -> None:
    s_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        d_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            if st.st_size:
                try:
                    clone_file(s_fd, d_fd)
                except OSError as err:
                    if err.errno in _NO_REFLINK:
                        raise _unsupported(src, err) from None
                    if err.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise ResourceExhausted(f"no space left to reflink {src}: {err}") from None
                    raise
            os.fchown(d_fd, st.st_uid, st.st_gid)
            os.fchmod(d_fd, stat.S_IMODE(st.st_mode))
            os.utime(d_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(d_fd)
    finally:
        os.close(s_fd)


def _copy_metadata(path: Path, st: os.stat_result) -> None:
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
