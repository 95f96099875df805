"""csi-sanity, the CSI conformance suite, against reflinker-csi standalone on a fresh XFS."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_csi_sanity_passes_with_clone_and_snapshot_specs() -> None:
    binary = os.environ.get("CSI_SANITY")
    if not binary or not Path(binary).exists():
        pytest.skip("CSI_SANITY is not set: run through `make test`, which builds csi-sanity")
    if os.geteuid() != 0:
        pytest.skip("csi-sanity publishes with real bind mounts and needs root")
    env = dict(
        os.environ,
        REFLINKER=str(Path(sys.executable).with_name("reflinker-csi")),
        SANITY_ARGS="-ginkgo.v",
    )
    result = subprocess.run(
        [str(ROOT / "tests/tools/with-xfs.sh"), "2G", str(ROOT / "tests/tools/sanity.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout + result.stderr
    summary = re.search(r"(\d+) Passed \| (\d+) Failed", out)
    assert summary, out[-4000:]
    passed, failed = int(summary.group(1)), int(summary.group(2))
    assert failed == 0 and result.returncode == 0, out[-6000:]
    assert passed >= 50, out[-3000:]
    assert "should create volume from an existing source volume" in out
    assert "should create volume from an existing source snapshot" in out
