"""Shared fixtures: a real XFS reflink loop filesystem, a real driver process, gRPC stubs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2, csi_pb2_grpc
from tests import timings

ROOT = Path(__file__).resolve().parent.parent
REFLINKER = [sys.executable, "-m", "reflinker_csi.cli"]


def mount_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root (mount, loop devices)"
    if shutil.which("mkfs.xfs") is None:
        return "mkfs.xfs is missing (make test installs xfsprogs)"
    return ""


requires_mount = pytest.mark.skipif(bool(mount_unavailable()), reason=mount_unavailable() or "ok")


class Filesystem:
    """A filesystem mounted on a loop file (XFS with reflinks, btrfs, or a tmpfs) for the
    length of a test session."""

    KINDS = ("xfs", "btrfs", "tmpfs")

    def __init__(self, kind: str, size: str = "4G") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"no test filesystem of kind {kind!r}; one of {self.KINDS}")
        self.kind = kind
        self.work = Path(tempfile.mkdtemp(prefix=f"pg-reflinker-{kind}."))
        self.mnt = self.work / "mnt"
        self.mnt.mkdir()
        if kind == "tmpfs":
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(self.mnt)], check=True
            )
            return
        image = self.work / "disk.img"
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        if kind == "btrfs":
            subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
        else:
            subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(self.mnt)], check=True)

    def new_volume(self, path: Path) -> Path:
        """A directory as the driver makes a volume here: a subvolume on btrfs."""
        if self.kind == "btrfs":
            subprocess.run(["btrfs", "-q", "subvolume", "create", str(path)], check=True)
        else:
            path.mkdir()
        return path

    def trim(self) -> None:
        """Give the blocks of removed files back to the host: the loop file is sparse, and
        without this it grows with every byte ever written (a benchmark that writes and removes
        tens of GiB would fill the host's disk under it)."""
        subprocess.run(["fstrim", str(self.mnt)], check=True)

    def close(self) -> None:
        # A server a failed set-up left running would keep the filesystem busy.
        for proc in Path("/proc").iterdir():
            try:
                args = (proc / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if (
                args
                and args[0].endswith(b"/postgres")
                and any(a.startswith(str(self.work).encode()) for a in args)
            ):
                with contextlib.suppress(OSError):
                    os.kill(int(proc.name), signal.SIGQUIT)
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(self.work) + "/")
        ]
        for mount_point in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", mount_point], check=False)
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture(scope="session")
def xfs() -> Iterator[Filesystem]:
    reason = mount_unavailable()
    if reason:
        pytest.skip(reason)
    fs = Filesystem("xfs")
    yield fs
    fs.close()


@dataclass
class Driver:
    """A running `reflinker-csi standalone` process and stubs for its three services."""

    prefix: Path
    target_root: Path
    socket: Path
    node_id: str
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None
    _fds: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [*REFLINKER, "standalone"],
            env=self.env,
            cwd=ROOT,
            stderr=self._log_file(),
        )
        while self._fds:
            os.close(self._fds.pop())
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"driver did not start:\n{self.log()}")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=10)

    def _log_file(self) -> int:
        # The child keeps its own copy of the descriptor; ours is closed right away.
        fd = os.open(self.prefix.parent / "driver.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._fds.append(fd)
        return fd

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=30)

    def log(self) -> str:
        path = self.prefix.parent / "driver.log"
        return path.read_text() if path.exists() else ""

    @property
    def identity(self) -> csi_pb2_grpc.IdentityStub:
        return csi_pb2_grpc.IdentityStub(self.channel)

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self.channel)

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.channel)


def driver_env(prefix: Path, target_root: Path, sock: Path, node_id: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "VIRTUAL_ENV")}
    env.update(
        HOSTPATH_PREFIX=str(prefix),
        TARGET_ROOT=str(target_root),
        CSI_ENDPOINT=f"unix://{sock}",
        NODE_ID=node_id,
        LOG_LEVEL="debug",
        PYTHONPATH=str(ROOT),
    )
    return env


@pytest.fixture
def driver_on(request: pytest.FixtureRequest) -> Iterator[object]:
    """Factory: driver_on(mount_point) starts a driver whose prefix is on that filesystem."""
    started: list[Driver] = []

    def make(base: Path, node_id: str = "node-a") -> Driver:
        area = base / f"t-{uuid.uuid4().hex[:8]}"
        prefix, targets = area / "prefix", Path(tempfile.mkdtemp(prefix="pg-reflinker-targets."))
        prefix.mkdir(parents=True)
        sock = area.parent / f"{area.name}.sock"
        d = Driver(
            prefix=prefix,
            target_root=targets,
            socket=sock,
            node_id=node_id,
            env=driver_env(prefix, targets, sock, node_id),
        )
        d.start()
        started.append(d)
        return d

    yield make
    for d in started:
        if d.process is not None and d.process.poll() is None:
            d.stop()
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mount_point = line.split()[4]
            if mount_point.startswith(str(d.target_root) + "/"):
                subprocess.run(["umount", "-l", mount_point], check=False)
        shutil.rmtree(d.target_root, ignore_errors=True)


@pytest.fixture
def driver(xfs: Filesystem, driver_on) -> Driver:  # type: ignore[no-untyped-def]
    return driver_on(xfs.mnt)


MOUNT_RW = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    ),
)


def create_request(
    name: str, source: str = "", size: int = 1 << 30, **kwargs: object
) -> csi_pb2.CreateVolumeRequest:
    req = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[MOUNT_RW],
        **kwargs,
    )
    if source:
        req.volume_content_source.volume.volume_id = source
    return req


def code_of(call, request) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        call(request)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


# `make hot-clone-matrix` (HOT_CLONE_MATRIX=full): every test of tests/host/test_hot_clone.py on
# every major; make test runs them pairwise (_kept_on_its_major).
FULL_MATRIX = os.environ.get("HOT_CLONE_MATRIX", "") == "full"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Which setups a test of tests/host/test_hot_clone.py runs on: on btrfs only when it is marked
    every_filesystem (the others test what no filesystem changes); on a major below the newest
    only when it is marked every_major (the others test what no major changes)."""
    majors = sorted(
        {
            setup[0]
            for item in items
            if isinstance(setup := _params(item).get("setup"), tuple) and setup[1:] == ("xfs",)
        }
    )
    keep, drop = [], []
    for item in items:
        setup = _params(item).get("setup")
        if isinstance(setup, tuple) and not _kept(item, setup, majors):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _kept(item: pytest.Item, setup: tuple[object, ...], majors: list[int]) -> bool:
    if setup[1:] == ("btrfs",) and item.get_closest_marker("every_filesystem") is None:
        return False
    return _kept_on_its_major(item, int(str(setup[0])), majors)


def _params(item: pytest.Item) -> dict[str, object]:
    return dict(getattr(getattr(item, "callspec", None), "params", {}))


def _kept_on_its_major(item: pytest.Item, major: int, majors: list[int]) -> bool:
    """Pairwise over majors and methods: the newest major runs everything; an older one runs
    the tests marked every_major, and of those with a method parameter one method per major,
    in turn (every_major(turn=1) starts with the other), so each method meets each major in
    some test without every test running every method on every major."""
    if FULL_MATRIX or not majors or major == majors[-1]:
        return True
    marker = item.get_closest_marker("every_major")
    if marker is None:
        return False
    method = _params(item).get("method")
    if method is None:
        return True
    turn = (majors.index(major) + int(marker.kwargs.get("turn", 0))) % 2
    return method == ("function", "native")[turn]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    """Show a failed subprocess's stderr in the report, not just its exit code."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and isinstance(call.excinfo.value, subprocess.CalledProcessError):
        err = call.excinfo.value
        report.sections.append(("subprocess stderr", str(err.stderr)))


_module_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    module = report.nodeid.split("::")[0]
    _module_seconds[module] = _module_seconds.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """Each test module's wall time (set-up, tests and teardown), also for `make test`'s summary,
    and the tests that failed, for the end of that summary."""
    timings.record_failures(
        [
            report.nodeid
            for key in ("failed", "error")
            for report in terminalreporter.stats.get(key, [])
            if getattr(report, "nodeid", "")
        ]
    )
    if not _module_seconds:
        return
    terminalreporter.write_sep("-", "wall time per test module")
    for module, seconds in _module_seconds.items():
        terminalreporter.write_line(f"{seconds:8.1f} s  {module}")
        timings.record(f"pytest {module}", seconds)
