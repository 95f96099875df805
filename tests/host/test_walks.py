"""Walks over a tenant's files cannot be led out of them: a directory swapped for a link to a
canary outside the volume (laid out like the directory, as another tenant's data directory would
be), over and over while a copy, a group change and a removal run, never has the canary read,
changed or removed.

The swapping runs in a process of its own so that it races the walk for real (no shared GIL)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reflinker_csi.disk.local import remove_tree
from reflinker_csi.disk.publish import apply_group
from reflinker_csi.disk.reflink import copy_tree
from tests.conftest import Filesystem

SECRET = b"CANARY-" * 512
ROUNDS = 60

SWAPPER = """
import os, sys
volume = sys.argv[1]
canary = sys.argv[2]
sub, real = os.path.join(volume, "sub"), os.path.join(volume, "sub.real")
while True:
    try:
        os.rename(sub, real)
        os.symlink(canary, sub)
        os.unlink(sub)
        os.rename(real, sub)
    except OSError:
        pass
"""


def make_volume(path: Path) -> None:
    """A small data directory: sub/ with a few hundred files and a nested directory."""
    (path / "sub" / "deeper").mkdir(parents=True)
    for i in range(200):
        (path / "sub" / f"f{i}").write_bytes(b"data" * 64)
        (path / "sub" / "deeper" / f"g{i}").write_bytes(b"more" * 64)
    (path / "top").write_bytes(b"top")


@contextlib.contextmanager
def swapping(volume: Path, canary: Path) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", SWAPPER, str(volume), str(canary)])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()
        sub, real = volume / "sub", volume / "sub.real"
        if sub.is_symlink():
            sub.unlink()
        if real.exists() and not sub.exists():
            real.rename(sub)


def read_everything(tree: Path) -> list[Path]:
    """Files in tree whose bytes are the canary's."""
    return [
        p
        for p in tree.rglob("*")
        if p.is_file() and not p.is_symlink() and SECRET in p.read_bytes()
    ]


@pytest.fixture
def canary(xfs: Filesystem) -> Iterator[Path]:
    """Another volume's directory, with the same names as the walked one holds."""
    directory = xfs.mnt / "canary"
    (directory / "deeper").mkdir(parents=True)
    for name in ["secret"] + [f"f{i}" for i in range(200)] + [f"deeper/g{i}" for i in range(200)]:
        (directory / name).write_bytes(SECRET)
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, 0, 0)
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
    yield directory
    remove_tree(directory)


def intact(canary: Path) -> list[tuple[str, int, int]]:
    """Every canary entry's group and mode; their bytes checked on the way."""
    found = []
    for path in sorted([canary, *canary.rglob("*")]):
        st = path.lstat()
        if path.is_file():
            assert path.read_bytes() == SECRET, f"{path} was changed"
        found.append((str(path), st.st_gid, st.st_mode))
    return found


def test_a_copy_never_follows_a_directory_swapped_for_a_link(xfs: Filesystem, canary: Path) -> None:
    volume = xfs.mnt / "copy-volume"
    volume.mkdir()
    make_volume(volume)
    before = intact(canary)
    with swapping(volume, canary):
        for i in range(ROUNDS):
            copy = xfs.mnt / f"copy-{i}"
            copy_tree(volume, copy, live=True)
            leaked = read_everything(copy)
            remove_tree(copy)
            assert not leaked, f"round {i}: the copy holds the canary's bytes at {leaked}"
    assert intact(canary) == before
    remove_tree(volume)


def test_a_group_change_never_follows_a_directory_swapped_for_a_link(
    xfs: Filesystem, canary: Path
) -> None:
    volume = xfs.mnt / "group-volume"
    volume.mkdir()
    make_volume(volume)
    before = intact(canary)
    with swapping(volume, canary):
        for i in range(ROUNDS):
            apply_group(volume, 1000 + i % 2)
            assert intact(canary) == before, f"round {i}: the canary's group or mode changed"
    remove_tree(volume)


def test_a_removal_never_follows_a_directory_swapped_for_a_link(
    xfs: Filesystem, canary: Path
) -> None:
    before = intact(canary)
    for i in range(ROUNDS // 3):
        volume = xfs.mnt / f"doomed-{i}"
        volume.mkdir()
        make_volume(volume)
        with swapping(volume, canary), contextlib.suppress(OSError):
            remove_tree(volume)  # entries moving under it may make it stop early
        remove_tree(volume)
        assert intact(canary) == before, f"round {i}: the canary was changed or removed"
