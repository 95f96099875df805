"""`make demo` can always be stopped: Ctrl-C or SIGTERM tear the cluster down and restore the host,
whether they come while the demo is kept running (DEMO_KEEP=1) or in the middle of a step. The
whole demo runs on btrfs (DEMO_FS=btrfs: the real cluster's scenario on that backend); the one
stopped in the middle on XFS."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, mount_unavailable
from tests.e2e import images
from tests.e2e.onenode import clean_after_a_killed_run, host_snapshot


def _tools_missing() -> str:
    k8s, cnpg = os.environ.get("K8S_TOOLS", ""), os.environ.get("CNPG_TOOLS", "")
    if not (
        k8s and (Path(k8s) / "kubelet").exists() and cnpg and (Path(cnpg) / "manager").exists()
    ):
        return "K8S_TOOLS and CNPG_TOOLS are not set: run through `make test`"
    return mount_unavailable()


pytestmark = pytest.mark.skipif(bool(_tools_missing()), reason=_tools_missing() or "ok")


class Demo:
    """`python -m tests.tools.demo` in a session of its own (as a terminal runs it), its output
    read line by line."""

    def __init__(self, **env: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.tools.demo"],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
            if text in line:
                return
        raise AssertionError(f"the demo never printed {text!r}:\n{''.join(self.output[-40:])}")

    def finish(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            while not self.lines.empty():
                self.output.append(self.lines.get() or "")
            raise AssertionError(
                f"the demo did not end {timeout:.0f} s after the signal:\n"
                + "".join(self.output[-40:])
            ) from None
        while (line := self.lines.get(timeout=5)) is not None:
            self.output.append(line)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            clean_after_a_killed_run()


@pytest.fixture
def demo() -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for d in started:
        d.kill()


def test_ctrl_c_ends_a_kept_demo_and_restores_the_host(demo: list[Demo]) -> None:
    clean_after_a_killed_run()
    before = host_snapshot()
    d = Demo(DEMO_KEEP="1", DEMO_SCALE="1", DEMO_FS="btrfs")
    demo.append(d)
    d.wait_for("Press Ctrl-C", timeout=900)
    os.killpg(d.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    code = d.finish(timeout=300)
    text = "".join(d.output)
    assert code == 0, text[-3000:]
    assert "SIGINT received" in text and "row counts equal" in text, text[-3000:]
    # cloneMethod auto takes the native method on btrfs (the source has reflink_snapshot()),
    # and the new Cluster's volume is a snapshot of the capture of the source's subvolume.
    assert "volume is a btrfs subvolume on btrfs" in text, text[-3000:]
    assert "copied by the native method" in text, text[-3000:]
    # The source and the clone run CNPG's default major (PG_MAJOR unless set).
    major = images.PG_MAJOR
    assert re.search(rf"PostgreSQL +source +{major}\.\d+ .* clone +{major}\.\d+", text), text[
        -3000:
    ]
    after = host_snapshot()
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}


def test_sigterm_in_the_middle_of_a_step_tears_down_and_restores_the_host(
    demo: list[Demo],
) -> None:
    clean_after_a_killed_run()
    before = host_snapshot()
    d = Demo(DEMO_KEEP="1", DEMO_SCALE="1")
    demo.append(d)
    # Kubernetes is up, the driver and the operator installed; the source is being created.
    d.wait_for("create the source", timeout=900)
    d.process.terminate()  # kill <pid>: SIGTERM to the demo alone
    code = d.finish(timeout=300)
    text = "".join(d.output)
    assert code == 130, text[-3000:]
    assert "SIGTERM received at step" in text, text[-3000:]
    after = host_snapshot()
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
