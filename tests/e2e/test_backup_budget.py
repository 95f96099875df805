"""Backup mode is a budget the driver keeps for the source: none longer than BACKUP_MODE_LIMIT.
(One backup per instance at a time: tests/e2e/test_claim_loop.py, where several workers take
claims of one source at once.)"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.e2e.stack import Cluster, CnpgInstance, wait_for
from tests.e2e.test_native import boots_with_the_rows, slots_and_sessions, wait_copy_asked
from tests.pgserver import PostgresServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def limit_of_three_seconds(cluster: Cluster) -> Iterator[None]:
    original = dict(cluster.commands["controller"][1])
    cluster.restart_controller({**original, "BACKUP_MODE_LIMIT": "3"})
    try:
        yield
    finally:
        cluster.restart_controller(original)


def test_a_backup_that_reaches_the_limit_is_ended_and_the_claim_says_so(
    cluster: Cluster,
    cnpg: CnpgInstance,
    without_function: PostgresServer,
    limit_of_three_seconds: None,
) -> None:
    """The node plugin is frozen, so the native clone's Copy step never finishes: the source
    leaves backup mode at BACKUP_MODE_LIMIT (3 s here), not at the CreateVolume deadline (60 s),
    and the claim's events name the limit; once the node plugin runs again the claim binds."""
    node = cluster.processes["node"]
    node.send_signal(signal.SIGSTOP)
    try:
        cluster.pvc("over-limit", source=cnpg.pvc)
        wait_copy_asked(cluster, "over-limit")
        asked = time.monotonic()
        wait_for(
            "the source to leave backup mode",
            lambda: slots_and_sessions(without_function) == "0,0",
            30,
        )
        in_backup = time.monotonic() - asked
        assert in_backup < 10, f"the source stayed in backup mode for {in_backup:.1f} s"
        wait_for(
            "the claim's event naming the limit",
            lambda: any(
                "reached BACKUP_MODE_LIMIT" in e
                for e in cluster.events_for("PersistentVolumeClaim", "over-limit")
            ),
            30,
        )
    finally:
        node.send_signal(signal.SIGCONT)
    pv = cluster.wait_bound("over-limit", timeout=120)
    boots_with_the_rows(cluster, pv.spec.csi.volume_handle, without_function)


@pytest.mark.parametrize("fault", ["frozen", "cut off"])
def test_a_controller_frozen_or_cut_off_in_backup_mode_leaves_the_source_within_the_limit(
    cluster: Cluster,
    cnpg: CnpgInstance,
    without_function: PostgresServer,
    limit_of_three_seconds: None,
    fault: str,
) -> None:
    """The controller holds the source in backup mode (the node plugin frozen at Copy) and is
    then frozen itself (SIGSTOP), or its traffic to the source dropped (iptables): it can end
    nothing, so the server must. The session's idle_session_timeout (BACKUP_MODE_LIMIT and a
    second) ends the backup and drops the slot on the server within the limit and a few
    seconds, whatever the controller or the network does; once they are back, the claim
    binds."""
    node, controller = cluster.processes["node"], cluster.processes["controller"]
    claim = f"stalled-{fault.replace(' ', '-')}"
    drop = ["INPUT", "-p", "tcp", "--dport", str(without_function.port), "-j", "DROP"]
    node.send_signal(signal.SIGSTOP)
    try:
        cluster.pvc(claim, source=cnpg.pvc)
        wait_copy_asked(cluster, claim)
        assert slots_and_sessions(without_function) == "1,1"  # in backup mode
        began = time.monotonic()
        if fault == "frozen":
            controller.send_signal(signal.SIGSTOP)
        else:
            subprocess.run(["iptables", "-w", "-I", *drop], check=True)
        try:
            wait_for(
                "the server to end the backup",
                lambda: slots_and_sessions(without_function) == "0,0",
                30,
            )
            in_backup = time.monotonic() - began
        finally:
            if fault == "frozen":
                controller.send_signal(signal.SIGCONT)
            else:
                subprocess.run(["iptables", "-w", "-D", *drop], check=True)
        assert in_backup < 3 + 1 + 4, f"the source stayed in backup mode {in_backup:.1f} s"
    finally:
        node.send_signal(signal.SIGCONT)
    pv = cluster.wait_bound(claim, timeout=120)
    boots_with_the_rows(cluster, pv.spec.csi.volume_handle, without_function)
