"""End-to-end fixtures: thin wrappers over tests/e2e/stack.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import mount_unavailable
from tests.e2e.stack import Cluster, CnpgInstance, running_stack, start_cnpg
from tests.pgserver import PostgresServer

_timings: list[tuple[str, float, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and "tests/e2e" in report.nodeid:
        _timings.append((report.nodeid.split("::")[-1], report.duration, report.outcome))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _timings:
        terminalreporter.write_sep("-", "end-to-end scenario wall times")
        for name, seconds, outcome in _timings:
            terminalreporter.write_line(f"{seconds:8.2f} s  {outcome:<7} {name}")


def tools_dir() -> Path:
    path = os.environ.get("K8S_TOOLS", "")
    if not path or not (Path(path) / "kube-apiserver").exists():
        pytest.skip(
            "K8S_TOOLS is not set: run through `make e2e` or `make test`, which build "
            "the control plane from tests/tools/k8s"
        )
    return Path(path)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if reason := mount_unavailable():
        pytest.skip(reason)
    with running_stack(tools_dir()) as stack:
        yield stack


@pytest.fixture(scope="session")
def cnpg(cluster: Cluster) -> Iterator[CnpgInstance]:
    instance = start_cnpg(cluster)
    yield instance
    instance.server.stop("immediate")
    cluster.unpublish(instance.pv, instance.target)


@pytest.fixture
def without_function(cnpg: CnpgInstance) -> Iterator[PostgresServer]:
    """The source as CNPG makes it plus the two grants of deploy/postgres/native-grants.sql:
    no reflink_snapshot()."""
    server = cnpg.server
    server.psql("ALTER FUNCTION reflink_snapshot(text) RENAME TO reflink_snapshot_away")
    try:
        yield server
    finally:
        server.psql("ALTER FUNCTION reflink_snapshot_away(text) RENAME TO reflink_snapshot")
