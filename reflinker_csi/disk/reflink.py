"""Reflink copies: every regular file is cloned with FICLONE, never copied byte by byte."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
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


class Leave(Enum):
    NOTHING = "nothing"  # copy the entry
    OUT = "out"  # not in the copy at all
    CONTENTS = "contents"  # a directory: in the copy, empty
    # A file copied after every other one: a backup's global/pg_control, which recovery from a
    # standby's backup reads for the backup's end (pg_basebackup sends it last too).
    LAST = "last"


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


_HELD = re.compile(r"^/proc/self/fd/([0-9]+)$")


def held(fd: int) -> Path:
    """A path that names the directory fd holds, whatever is renamed or swapped meanwhile:
    open_dir() opens that directory again through fd, and a path below it resolves from it."""
    return Path(f"/proc/self/fd/{fd}")


def open_dir(name: str | Path, dir_fd: int | None = None) -> int:
    """A directory's descriptor, never through a symbolic link (ELOOP or ENOTDIR instead);
    a held() directory through its descriptor."""
    found = _HELD.match(str(name)) if dir_fd is None else None
    if found:
        return os.open(".", _DIR_FLAGS, dir_fd=int(found.group(1)))
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def open_regular(name: str, dir_fd: int, expected: os.stat_result | None = None) -> int:
    """A regular file's descriptor relative to its directory's, never through a link; when
    expected is given, the file must still be that one (a swap in between is FileNotFound)."""
    fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (
        expected is not None and (st.st_ino, st.st_dev) != (expected.st_ino, expected.st_dev)
    ):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "replaced while it was copied", name)
    return fd


_File = tuple[int, str, Path, os.stat_result]  # source directory's descriptor, name, dst, stat


def copy_tree(
    src: Path,
    dst: Path,
    leave: Callable[[str], Leave] | None = None,
    live: bool = False,
    workers: int = 1,
    into_existing: bool = False,
) -> int:
    """Reflink-copy the tree at src to dst (which must not exist, or must be an empty directory
    made for it when into_existing); return the number of files.

    Ownership, modes and times are kept; symlinks are recreated, never followed. The walk goes
    through directory descriptors (each opened without following a link, each file opened
    relative to its directory's descriptor and checked to be the file the walk saw), so a
    directory swapped for a link while the copy runs cannot lead it out of src. leave(relative
    path) says what to leave out. live: the tree belongs to a running server, so entries that
    vanish while it is copied are skipped (dropped relations, truncated SLRUs; WAL replay
    recreates what matters). workers: threads cloning files, each a share of the bytes (FICLONE
    of a large file is kernel work that runs beside the others; small files are not worth it).
    """
    top = open_dir(src)
    fds = [top]
    try:
        return _copy_from(top, src, dst, leave, live, workers, fds, into_existing)
    finally:
        for fd in fds:
            os.close(fd)


def _copy_from(
    top: int,
    src: Path,
    dst: Path,
    leave: Callable[[str], Leave] | None,
    live: bool,
    workers: int,
    fds: list[int],
    into_existing: bool = False,
) -> int:
    top_st = os.fstat(top)
    if not into_existing:
        os.mkdir(dst, 0o700)
    stack: list[tuple[int, Path, os.stat_result, str]] = [(top, dst, top_st, "")]
    dirs_done: list[tuple[Path, os.stat_result]] = []
    files: list[_File] = []
    last: list[_File] = []
    # The directories first (with links), then the files, then the directories' metadata.
    while stack:
        s_fd, d_dir, s_st, rel_dir = stack.pop()
        try:
            entries = list(os.scandir(s_fd))
        except FileNotFoundError:
            if not live:
                raise
            entries = []
        for entry in entries:
            rel = f"{rel_dir}{entry.name}"
            what = leave(rel) if leave else Leave.NOTHING
            if what == Leave.OUT:
                continue
            d_path = d_dir / entry.name
            if what == Leave.CONTENTS:
                # An empty directory in the copy, even where the source's is a link to another
                # filesystem (pg_wal on a WAL volume): owned like its parent then.
                st = s_st
                with contextlib.suppress(OSError):
                    st = os.stat(entry.name, dir_fd=s_fd, follow_symlinks=False)
                os.mkdir(d_path, 0o700)
                dirs_done.append((d_path, st if stat.S_ISDIR(st.st_mode) else s_st))
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                if not live:
                    raise
                continue
            if stat.S_ISDIR(st.st_mode):
                try:
                    sub = open_dir(entry.name, s_fd)
                except OSError as err:
                    # Swapped for a link or a file since it was listed: never followed.
                    if err.errno in (errno.ELOOP, errno.ENOTDIR) or (
                        live and err.errno == errno.ENOENT
                    ):
                        continue
                    raise
                fds.append(sub)
                os.mkdir(d_path, 0o700)
                stack.append((sub, d_path, st, rel + "/"))
            elif stat.S_ISREG(st.st_mode):
                (last if what == Leave.LAST else files).append((s_fd, entry.name, d_path, st))
            elif stat.S_ISLNK(st.st_mode):
                try:
                    target = os.readlink(entry.name, dir_fd=s_fd)
                except OSError:
                    if not live:
                        raise
                    continue
                os.symlink(target, d_path)
                os.lchown(d_path, st.st_uid, st.st_gid)
            # sockets, fifos and devices are runtime artefacts; a data directory needs none.
        dirs_done.append((d_dir, s_st))

    def clone_all(share: list[_File]) -> None:
        for s_dir, name, d_path, st in share:
            try:
                s_fd = open_regular(name, s_dir, st)
            except OSError as err:
                # Swapped for a link since it was listed (never followed), or gone.
                if err.errno == errno.ELOOP or (live and err.errno == errno.ENOENT):
                    continue
                raise
            try:
                clone_fd(s_fd, d_path, st, f"{src}/{name}")
            finally:
                os.close(s_fd)

    shares = _shares(files, workers)
    if len(shares) > 1:
        with ThreadPoolExecutor(len(shares)) as pool:
            for done in [pool.submit(clone_all, share) for share in shares]:
                done.result()
    else:
        clone_all(files)
    clone_all(last)
    # Directory metadata last, so adding entries does not disturb the copied times.
    for d_dir, s_st in reversed(dirs_done):
        _copy_metadata(d_dir, s_st)
    return len(files) + len(last)


# Below this many bytes per thread, threads cost more than they save.
_BYTES_PER_WORKER = 256 << 20


def _shares(files: list[_File], workers: int) -> list[list[_File]]:
    """Split files into up to `workers` lists of about equal bytes, largest first."""
    total = sum(f[3].st_size for f in files)
    count = max(1, min(workers, total // _BYTES_PER_WORKER))
    if count == 1:
        return [files]
    shares: list[list[_File]] = [[] for _ in range(count)]
    sizes = [0] * count
    for item in sorted(files, key=lambda f: f[3].st_size, reverse=True):
        least = sizes.index(min(sizes))
        shares[least].append(item)
        sizes[least] += item[3].st_size
    return shares


def clone_fd(s_fd: int, dst: Path, st: os.stat_result, what: str | Path) -> None:
    """Reflink the open file s_fd to dst (which must not exist), with owner, mode and times."""
    d_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if st.st_size:
            try:
                clone_file(s_fd, d_fd)
            except OSError as err:
                if err.errno in _NO_REFLINK:
                    raise _unsupported(Path(what), err) from None
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ResourceExhausted(f"no space left to reflink {what}: {err}") from None
                raise
        os.fchown(d_fd, st.st_uid, st.st_gid)
        os.fchmod(d_fd, stat.S_IMODE(st.st_mode))
        os.utime(d_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(d_fd)


def _copy_metadata(path: Path, st: os.stat_result) -> None:
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
