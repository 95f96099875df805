"""Mount state from /proc/self/mountinfo, and bind mounts through mount(2).

Mount state is always read from the kernel, never remembered, so a restart sees the truth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_RELATIME = 1 << 21
MNT_DETACH = 2

# Mount flags a volume capability may ask for; each maps to a per-mount flag of a bind mount.
BIND_MOUNT_FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "rw": 0,
    "bind": 0,
    "defaults": 0,
}

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    device: str  # "major:minor"
    root: str  # path inside the filesystem that is mounted here
    mount_point: str
    options: frozenset[str]
    fs_type: str
    source: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10:
            continue
        sep = fields.index("-", 6)
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                device=fields[2],
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                options=frozenset(fields[5].split(",")),
                fs_type=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
            )
        )
    return entries


def read_mountinfo() -> list[MountEntry]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def _is_within(path: str, ancestor: str) -> bool:
    return path == ancestor or ancestor == "/" or path.startswith(ancestor.rstrip("/") + "/")


def mount_containing(path: Path, entries: list[MountEntry] | None = None) -> MountEntry:
    """The mount that serves path (the last, i.e. topmost, of the deepest mount points)."""
    real = os.path.realpath(path)
    entries = read_mountinfo() if entries is None else entries
    best: MountEntry | None = None
    for entry in entries:
        if _is_within(real, entry.mount_point) and (
            best is None or len(entry.mount_point) >= len(best.mount_point)
        ):
            best = entry
    if best is None:  # pragma: no cover - "/" is always mounted
        raise FileNotFoundError(path)
    return best


def filesystem_path(path: Path, entries: list[MountEntry] | None = None) -> tuple[str, str]:
    """(device, path inside its filesystem) of a directory, as mountinfo's root field shows it."""
    real = os.path.realpath(path)
    entry = mount_containing(Path(real), entries)
    rest = os.path.relpath(real, entry.mount_point)
    inner = entry.root if rest == "." else os.path.join(entry.root, rest)
    return entry.device, os.path.normpath(inner)


def mounts_of(directory: Path, entries: list[MountEntry] | None = None) -> list[MountEntry]:
    """Bind mounts that expose directory, or anything inside it, somewhere else."""
    entries = read_mountinfo() if entries is None else entries
    device, inner = filesystem_path(directory, entries)
    return [
        e
        for e in entries
        if e.device == device
        and _is_within(e.root, inner)
        and e.root != "/"
        and not (e.root == inner and os.path.realpath(directory) == e.mount_point)
    ]


def mount_at(target: Path, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The topmost mount whose mount point is exactly target, if any."""
    entries = read_mountinfo() if entries is None else entries
    found = None
    for entry in entries:
        if entry.mount_point == str(target):
            found = entry
    return found


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def bind_mount(source: Path, target: Path, flags: int = 0) -> None:
    """Bind source onto target; apply per-mount flags (read-only etc.) with a remount."""
    _check(
        _libc.mount(str(source).encode(), str(target).encode(), None, MS_BIND, None),
        f"bind mount {source} on {target}",
    )
    if flags:
        try:
            _check(
                _libc.mount(None, str(target).encode(), None, MS_REMOUNT | MS_BIND | flags, None),
                f"remount {target} with flags {flags:#x}",
            )
        except OSError:
            unmount(target)
            raise


def unmount(target: Path) -> None:
    result = _libc.umount2(str(target).encode(), 0)
    if result != 0 and ctypes.get_errno() == errno.EBUSY:
        result = _libc.umount2(str(target).encode(), MNT_DETACH)
    _check(result, f"unmount {target}")
