"""Fixtures for the real-cluster scenarios: one three-node cluster (tests/e2e/onenode.py; the
other two nodes cordoned but for tests/cluster/test_ha.py) for the whole package, with the
set-up time of each part and each scenario's wall time printed."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import mount_unavailable
from tests.e2e import images
from tests.e2e.onenode import (
    OneNodeCluster,
    clean_after_a_killed_run,
    host_snapshot,
    running_cluster,
)

_setup: list[tuple[str, float]] = []
_scenarios: list[tuple[str, float, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and "tests/cluster" in report.nodeid:
        _scenarios.append((report.nodeid.split("::")[-1], report.duration, report.outcome))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _setup:
        terminalreporter.write_sep("-", "real cluster: set-up and teardown times")
        for what, seconds in _setup:
            terminalreporter.write_line(f"{seconds:8.2f} s  {what}")
    if _scenarios:
        terminalreporter.write_sep("-", "real cluster: scenario wall times")
        for name, seconds, outcome in _scenarios:
            terminalreporter.write_line(f"{seconds:8.2f} s  {outcome:<7} {name}")


def _tools() -> tuple[Path, Path]:
    k8s, cnpg = os.environ.get("K8S_TOOLS", ""), os.environ.get("CNPG_TOOLS", "")
    if not (
        k8s and (Path(k8s) / "kubelet").exists() and cnpg and (Path(cnpg) / "manager").exists()
    ):
        pytest.skip(
            "K8S_TOOLS and CNPG_TOOLS are not set: run through `make test` or `make cluster-test`, "
            "which build the cluster from tests/tools/k8s and tests/tools/cnpg"
        )
    return Path(k8s), Path(cnpg)


@pytest.fixture(scope="package")
def k8s() -> Iterator[OneNodeCluster]:
    if reason := mount_unavailable():
        pytest.skip(reason)
    k8s_tools, cnpg_tools = _tools()
    clean_after_a_killed_run()
    before = host_snapshot()
    started = time.monotonic()
    # PG_MAJOR's image for every scenario; 15's and 17's for the clone scenario run on each.
    with running_cluster(
        k8s_tools,
        cnpg_tools,
        announce=print,
        pg_majors=sorted(images.PG_SUITES),
        nodes=3,
        object_store=True,
    ) as cluster:
        _setup.extend(cluster.timings)
        _setup.append(("whole set-up", time.monotonic() - started))
        yield cluster
        cluster.timings.clear()
    _setup.extend(cluster.timings)
    after = host_snapshot()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"the cluster's teardown left the host changed: {changed}"
