"""Native hot clones in Kubernetes mode: a source without reflink_snapshot() is cloned with
pg_backup_start/stop in the controller's session while the node plugin copies the files, step by
step through the volume's record. Real controller and node plugin processes, csi-provisioner, a
real PostgreSQL playing the CNPG instance."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from typing import Any

import pytest

from reflinker_csi.kube.api import REFLINKVOLUMES
from tests.e2e.stack import NS, Cluster, CnpgInstance, create_cnpg_objects, wait_for
from tests.pgserver import Certificates, PostgresServer, boot_clone, chown_postgres, free_port

pytestmark = pytest.mark.integration


def records(cluster: Cluster) -> list[dict[str, Any]]:
    return list(
        cluster.custom.list_cluster_custom_object(
            REFLINKVOLUMES.group, REFLINKVOLUMES.version, REFLINKVOLUMES.plural
        )["items"]
    )


def record_for_claim(cluster: Cluster, claim: str) -> dict[str, Any] | None:
    for item in records(cluster):
        if item["spec"].get("parameters", {}).get("csi.storage.k8s.io/pvc/name") == claim:
            return item
    return None


def wait_copy_asked(cluster: Cluster, claim: str) -> dict[str, Any]:
    """The record of claim (csi-provisioner's or the claim loop's) once the controller has
    handed the Copy step of a native clone to the node plugin."""

    def asked() -> dict[str, Any] | None:
        for item in records(cluster):
            spec = item["spec"]
            named = spec.get("parameters", {}).get("csi.storage.k8s.io/pvc/name") == claim
            if named or spec.get("claim", "").endswith(f"/{claim}"):
                return item if (spec.get("backup") or {}).get("step") == "Copy" else None
        return None

    found: dict[str, Any] = wait_for("the controller to ask for the copy", asked, 60)
    return found


def leftovers(cluster: Cluster) -> list[str]:
    return sorted(p.name for p in cluster.prefix.iterdir() if p.name.endswith(".partial"))


def slots_and_sessions(server: PostgresServer) -> str:
    return server.psql(
        "SELECT (SELECT count(*) FROM pg_replication_slots) || ',' || (SELECT count(*) FROM "
        "pg_stat_activity WHERE application_name = 'pg-reflinker')"
    )


def boots_with_the_rows(cluster: Cluster, guid: str, source: PostgresServer) -> None:
    clone = boot_clone(cluster.prefix / guid, cluster.plane.work / "sock")
    try:
        assert clone.psql("SELECT pg_is_in_recovery()") == "f"
        query = "SELECT count(*) FROM pgbench_accounts"
        assert clone.psql(query, db="app") == source.psql(query, db="app")
        clone.amcheck()
    finally:
        clone.stop()


def test_a_source_without_the_function_is_cloned_natively(
    cluster: Cluster, cnpg: CnpgInstance, without_function: PostgresServer
) -> None:
    cluster.pvc("native-1", source=cnpg.pvc)
    pv = cluster.wait_bound("native-1", timeout=60)
    guid = pv.spec.csi.volume_handle
    assert pv.spec.csi.volume_attributes["pg-reflinker.csi/clone-mode"] == "hot"
    assert pv.spec.csi.volume_attributes["pg-reflinker.csi/clone-method"] == "native"
    record = record_for_claim(cluster, "native-1")
    assert record is not None
    assert record["spec"]["cloneMethod"] == "native" and not record["spec"].get("hotCloneDir")
    assert record["spec"]["backup"]["step"] == "Complete"
    assert record["status"]["phase"] == "Ready"
    label = (cluster.prefix / guid / "pgdata" / "backup_label").read_text()
    assert "LABEL: " + guid in label
    assert leftovers(cluster) == [] and slots_and_sessions(without_function) == "0,0"
    assert "method=native" in cluster.log_tail("controller", 400)
    boots_with_the_rows(cluster, guid, without_function)


def test_controller_killed_while_the_node_copies_then_the_retry_binds(
    cluster: Cluster, cnpg: CnpgInstance, without_function: PostgresServer
) -> None:
    """The node plugin is frozen (SIGSTOP) so the controller waits in backup mode at the Copy
    step; the controller is killed there. PostgreSQL aborts the backup and drops the slot; the
    node's late copy is never put in place; the restarted controller's retry starts over with
    the same volume."""
    log_offset = without_function.log_file.stat().st_size
    node = cluster.processes["node"]
    node.send_signal(signal.SIGSTOP)
    try:
        cluster.pvc("native-killed", source=cnpg.pvc)

        first = wait_copy_asked(cluster, "native-killed")
        assert slots_and_sessions(without_function) == "1,1"  # in backup mode, holding WAL
        cluster.processes["controller"].send_signal(signal.SIGKILL)
        cluster.processes["controller"].wait(30)
    finally:
        node.send_signal(signal.SIGCONT)
    wait_for(
        "the source to leave backup mode",
        lambda: slots_and_sessions(without_function) == "0,0",
        30,
    )
    log = without_function.log_file.read_bytes()[log_offset:].decode(errors="replace")
    assert "aborting backup due to backend exiting before pg_backup_stop was called" in log
    guid = first["spec"]["guid"]
    # The node finishes the step it was asked for; nothing takes it further.
    wait_for(
        "the node plugin to report the copy",
        lambda: (
            (record_for_claim(cluster, "native-killed") or {})
            .get("status", {})
            .get("backup", {})
            .get("done")
            == "Copy"
        ),
        30,
    )
    assert not (cluster.prefix / guid).exists()
    cluster.restart("controller")
    # The sidecars exit when their driver goes away (kubelet restarts their containers); here
    # they are restarted with it, so the tests after this one find them connected.
    for sidecar in ("csi-provisioner", "csi-snapshotter"):
        cluster.stop_process(sidecar)
        cluster.restart(sidecar)
    pv = cluster.wait_bound("native-killed", timeout=90)
    assert pv.spec.csi.volume_handle == guid  # the same volume, a new attempt
    record = record_for_claim(cluster, "native-killed")
    assert record is not None
    assert record["spec"]["backup"]["attempt"] != first["spec"]["backup"]["attempt"]
    assert leftovers(cluster) == [] and slots_and_sessions(without_function) == "0,0"
    boots_with_the_rows(cluster, guid, without_function)


def test_a_controller_told_to_stop_mid_clone_finishes_it_first(
    cluster: Cluster, cnpg: CnpgInstance, without_function: PostgresServer
) -> None:
    """SIGTERM (a pod deleted with its grace) while the node plugin has the Copy step in hand
    (frozen, then thawed two seconds later): the controller takes no new call but keeps its
    caches while the call in flight finishes, so the clone binds from its first attempt and
    the source is out of backup mode before the process ends (exit 0, within its grace). It
    used to close every watch at once: the clone never saw the node's answer, waited out the
    grace and was taken again after the restart."""
    node = cluster.processes["node"]
    controller = cluster.processes["controller"]
    node.send_signal(signal.SIGSTOP)
    try:
        cluster.pvc("native-graceful", source=cnpg.pvc)

        first = wait_copy_asked(cluster, "native-graceful")
        controller.send_signal(signal.SIGTERM)
        time.sleep(2)  # the fault: the node plugin still busy as the controller stops
    finally:
        node.send_signal(signal.SIGCONT)
    assert controller.wait(45) == 0, cluster.log_tail("controller", 40)
    # Out of backup mode by the time the process is gone, nothing of the copy left over.
    assert slots_and_sessions(without_function) == "0,0"
    cluster.restart_controller()
    pv = cluster.wait_bound("native-graceful", timeout=90)
    record = record_for_claim(cluster, "native-graceful")
    assert record is not None and pv.spec.csi.volume_handle == first["spec"]["guid"]
    assert record["spec"]["backup"]["attempt"] == first["spec"]["backup"]["attempt"], (
        "the clone in flight was given up at shutdown and taken again"
    )
    assert leftovers(cluster) == []
    boots_with_the_rows(cluster, pv.spec.csi.volume_handle, without_function)


STEP = re.compile(r"hot clone step guid=(\S+) attempt=(\S+) step=(\S+)")


def steps_run(cluster: Cluster, guid: str, offset: int) -> list[tuple[str, str]]:
    """(attempt, step) of every step the node agents ran for volume guid, in order, from the
    node plugin's log after offset."""
    log = (cluster.plane.work / "node.log").read_bytes()[offset:].decode(errors="replace")
    return [(m[2], m[3]) for m in STEP.finditer(log) if m[1] == guid]


def backup_of(cluster: Cluster, claim: str) -> dict[str, Any]:
    record = record_for_claim(cluster, claim) or {}
    return {
        "guid": record.get("spec", {}).get("guid", ""),
        **(record.get("spec", {}).get("backup") or {}),
        "done": ((record.get("status") or {}).get("backup") or {}).get("done"),
    }


def node_log_size(cluster: Cluster) -> int:
    return (cluster.plane.work / "node.log").stat().st_size


def kill_and_restart_node(cluster: Cluster) -> None:
    node = cluster.processes["node"]
    node.send_signal(signal.SIGKILL)
    node.wait(30)
    cluster.restart("node")


def ends_consistent(
    cluster: Cluster, claim: str, source: PostgresServer, offset: int
) -> list[tuple[str, str]]:
    """The claim binds, its clone boots with the rows, no partial copy, slot or session is
    left, and no node agent ran a step of an attempt after a newer one had begun."""
    pv = cluster.wait_bound(claim, timeout=120)
    guid = pv.spec.csi.volume_handle
    wait_for("the source to leave backup mode", lambda: slots_and_sessions(source) == "0,0", 30)
    assert leftovers(cluster) == []
    steps = steps_run(cluster, guid, offset)
    final = backup_of(cluster, claim)["attempt"]
    assert [step for attempt, step in steps if attempt == final][-3:] == [
        "Copy",
        "Finish",
        "Complete",
    ], steps
    attempts = list(dict.fromkeys(attempt for attempt, _ in steps))
    order = [attempts.index(attempt) for attempt, _ in steps]
    assert order == sorted(order), f"a step of an older attempt after a newer one: {steps}"
    boots_with_the_rows(cluster, guid, source)
    return steps


def test_node_plugin_killed_with_the_copy_step_in_hand_then_the_clone_binds(
    cluster: Cluster, cnpg: CnpgInstance, without_function: PostgresServer
) -> None:
    """The node plugin is frozen when the controller asks for the Copy (the source is in
    backup mode) and killed: the restarted plugin copies for the same attempt, inside the
    same backup, and the clone binds."""
    offset = node_log_size(cluster)
    cluster.processes["node"].send_signal(signal.SIGSTOP)
    cluster.pvc("native-node-copy", source=cnpg.pvc)
    asked = wait_for(
        "the controller to ask for the copy",
        lambda: (b := backup_of(cluster, "native-node-copy")).get("step") == "Copy" and b,
        60,
    )
    assert slots_and_sessions(without_function) == "1,1"
    kill_and_restart_node(cluster)
    steps = ends_consistent(cluster, "native-node-copy", without_function, offset)
    # The backup the controller held through the kill is the one the copy was made in.
    assert steps == [(asked["attempt"], s) for s in ("Copy", "Finish", "Complete")], steps


def test_node_plugin_killed_with_the_finish_step_in_hand_then_the_clone_binds(
    cluster: Cluster, cnpg: CnpgInstance, without_function: PostgresServer
) -> None:
    """The node plugin is frozen right after it reported the Copy, so the Finish (backup
    stopped, backup_label and WAL to write) reaches a frozen plugin, which is killed. The
    restarted plugin either finishes that attempt or fails it (its partial copy is gone with
    the old process's sweep) and the controller's next attempt binds; never a mix."""
    node = cluster.processes["node"]
    for round in range(3):
        claim = f"native-node-finish-{round}"
        offset = node_log_size(cluster)
        node = cluster.processes["node"]
        node.send_signal(signal.SIGSTOP)
        cluster.pvc(claim, source=cnpg.pvc)
        wait_for(
            "the controller to ask for the copy",
            lambda: backup_of(cluster, claim).get("step") == "Copy",  # noqa: B023
            60,
        )
        node.send_signal(signal.SIGCONT)
        wait_for(
            "the node to report the copy",
            lambda: backup_of(cluster, claim).get("done") in ("Copy", "Finish"),  # noqa: B023
            30,
            every=0.002,
        )
        node.send_signal(signal.SIGSTOP)
        if backup_of(cluster, claim).get("done") == "Copy":
            break
        # The plugin finished before it was frozen: this round tested nothing; again.
        node.send_signal(signal.SIGCONT)
        cluster.wait_bound(claim, timeout=60)
    else:
        pytest.fail("the node plugin finished every time before it could be frozen")
    asked = wait_for(
        "the controller to ask for the finish",
        lambda: (b := backup_of(cluster, claim)).get("step") == "Finish" and b,
        30,
    )
    kill_and_restart_node(cluster)
    steps = ends_consistent(cluster, claim, without_function, offset)
    print(f"\nround {round}, steps the node agents ran:", *steps, sep="\n  ")
    assert steps[0] == (asked["attempt"], "Copy"), steps


def test_node_failure_mid_clone_ends_the_backup_and_names_the_cause(
    cluster: Cluster, cnpg: CnpgInstance, without_function: PostgresServer
) -> None:
    """The source's data directory is not where CNPG keeps it (here: moved away while the
    clone waits): the node plugin fails the Copy step with the reason, the controller ends the
    backup at once, and the claim's events say why."""
    # The source's data directory as the node plugin sees it (its volume's directory).
    pgdata = cluster.prefix / cnpg.pv.spec.csi.volume_handle / "pgdata"
    node = cluster.processes["node"]
    node.send_signal(signal.SIGSTOP)
    moved = pgdata.with_name("pgdata-elsewhere")
    try:
        cluster.pvc("native-lost", source=cnpg.pvc)
        wait_for(
            "the controller to ask for the copy",
            lambda: (
                ((record_for_claim(cluster, "native-lost") or {}).get("spec", {}))
                .get("backup", {})
                .get("step")
                == "Copy"
            ),
            60,
        )
        # A bind mount keeps the running server's files where they are for PostgreSQL while
        # the node plugin sees an empty directory at the data directory's path.
        moved.mkdir()
        subprocess.run(["mount", "--bind", str(moved), str(pgdata)], check=True)
    finally:
        node.send_signal(signal.SIGCONT)
    try:
        wait_for(
            "the claim's event",
            lambda: any(
                "no data directory at" in e
                for e in cluster.events_for("PersistentVolumeClaim", "native-lost")
            ),
            60,
        )
        wait_for(
            "the source to leave backup mode",
            lambda: slots_and_sessions(without_function) == "0,0",
            30,
        )
    finally:
        subprocess.run(["umount", str(pgdata)], check=True)
        os.rmdir(moved)
    pv = cluster.wait_bound("native-lost", timeout=90)  # the retry, once the path is right
    assert leftovers(cluster) == []
    boots_with_the_rows(cluster, pv.spec.csi.volume_handle, without_function)


def test_a_claim_deleted_mid_clone_leaves_no_record_no_copy_and_no_backup(
    cluster: Cluster, cnpg: CnpgInstance, without_function: PostgresServer
) -> None:
    """csi-provisioner stops asking once its claim is gone; the controller's sweep removes the
    record of a volume that was never made, which ends the waiting clone (and so the backup),
    and the node plugin removes the partial copy."""
    node = cluster.processes["node"]
    node.send_signal(signal.SIGSTOP)
    try:
        cluster.pvc("native-gone", source=cnpg.pvc)
        first = wait_for(
            "the controller to ask for the copy",
            lambda: (
                record
                if ((record := record_for_claim(cluster, "native-gone")) or {})
                .get("spec", {})
                .get("backup", {})
                .get("step")
                == "Copy"
                else None
            ),
            60,
        )
        cluster.core.delete_namespaced_persistent_volume_claim("native-gone", "apps")
        wait_for(
            "the record to be deleted",
            lambda: (
                (record_for_claim(cluster, "native-gone") or {})
                .get("metadata", {})
                .get("deletionTimestamp")
            ),
            30,
        )
    finally:
        node.send_signal(signal.SIGCONT)
    wait_for("the record to be gone", lambda: record_for_claim(cluster, "native-gone") is None, 30)
    wait_for(
        "the source to leave backup mode",
        lambda: slots_and_sessions(without_function) == "0,0",
        30,
    )
    guid = first["spec"]["guid"]
    assert leftovers(cluster) == [] and not (cluster.prefix / guid).exists()


# The tenant's link, where it lies, and the refusal it must meet.
REDIRECTS = {
    # pgdata itself a link to the victim's data directory; the tenant's server answers the
    # victim's system identifier through a pg_control_system() of its own.
    "pgdata": "pgdata is a symbolic link",
    # pgdata the tenant's own, its pg_wal a link straight to the victim's WAL directory.
    "pg_wal": "links to a path on none of the server pod's volumes",
    # pgdata the tenant's own, pg_wal on its own WAL volume, as CNPG lays it out, and there
    # a link to the victim's WAL directory.
    "pg_wal on the WAL volume": "pg_wal is a symbolic link",
}


@pytest.mark.parametrize("redirect", list(REDIRECTS))
def test_a_source_whose_directories_link_into_another_volume_is_refused_and_nothing_is_copied(
    cluster: Cluster, cnpg: CnpgInstance, without_function: PostgresServer, redirect: str
) -> None:
    """The redirect attack: a tenant runs its own "CNPG instance" (a pod labelled
    cnpg.io/cluster, its own CA and replication secrets, its own PostgreSQL with the two
    grants) whose volume leads, by a link, into another tenant's volume. A clone of the
    tenant's claim must copy nothing of the other volume, and its events must name neither
    that volume's path nor its identifier."""
    victim_guid = cnpg.pv.spec.csi.volume_handle
    victim_pgdata = cluster.prefix / victim_guid / "pgdata"
    victim_id = without_function.psql("SELECT system_identifier FROM pg_control_system()")
    wal_volume = redirect == "pg_wal on the WAL volume"
    claims = ["evil-1"] + (["evil-1-wal"] if wal_volume else [])
    targets = {}
    for claim in claims:
        cluster.pvc(claim)
        pv = cluster.wait_bound(claim)
        targets[claim] = (pv, cluster.publish(pv, str(uuid.uuid4())))
        chown_postgres(targets[claim][1])
    target = targets["evil-1"][1]
    certs = Certificates.create(cluster.plane.work / "certs-evil", "evil", NS)
    os.chmod(certs.directory, 0o755)
    server = PostgresServer(
        volume=target / "own", port=free_port(), socket_dir=cluster.plane.work / "sock", certs=certs
    )
    server.initdb()
    if redirect != "pgdata":
        # The volume's pgdata: the tenant's own files (its server's system identifier).
        subprocess.run(["cp", "-a", str(server.pgdata), str(target / "pgdata")], check=True)
    server.start()
    try:
        grants = (
            "CREATE ROLE streaming_replica LOGIN REPLICATION; "
            "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO streaming_replica; "
            "GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO streaming_replica"
        )
        if redirect == "pgdata":
            grants += (
                "; CREATE FUNCTION public.pg_control_system(OUT pg_control_version integer, "
                "OUT catalog_version_no integer, OUT system_identifier bigint, "
                "OUT pg_control_last_modified timestamptz) LANGUAGE sql "
                f"AS $$ SELECT 1, 1, {victim_id}::bigint, now() $$; "
                "ALTER ROLE streaming_replica SET search_path = public, pg_catalog"
            )
            (target / "pgdata").symlink_to(victim_pgdata)
        elif redirect == "pg_wal":
            subprocess.run(["rm", "-rf", str(target / "pgdata" / "pg_wal")], check=True)
            (target / "pgdata" / "pg_wal").symlink_to(victim_pgdata / "pg_wal")
        else:
            subprocess.run(["rm", "-rf", str(target / "pgdata" / "pg_wal")], check=True)
            (target / "pgdata" / "pg_wal").symlink_to("/var/lib/postgresql/wal/pg_wal")
            (targets["evil-1-wal"][1] / "pg_wal").symlink_to(victim_pgdata / "pg_wal")
        server.psql(grants)
        create_cnpg_objects(
            cluster.core,
            NS,
            "evil",
            "evil-1",
            "evil-1",
            certs,
            str(target),
            server.port,
            wal=("evil-1-wal", "/var/lib/postgresql/wal") if wal_volume else None,
        )
        cluster.pvc("stolen", source="evil-1")
        try:
            refused = wait_for(
                "the refusal",
                lambda: [
                    e
                    for e in cluster.events_for("PersistentVolumeClaim", "stolen")
                    if REDIRECTS[redirect] in e
                ],
                90,
            )
        except AssertionError as err:
            seen = cluster.events_for("PersistentVolumeClaim", "stolen")
            raise AssertionError(f"{err}; the claim's events: {seen}") from None
        events = "\n".join(cluster.events_for("PersistentVolumeClaim", "stolen"))
        assert victim_guid not in events and victim_id not in events, events
        assert "own volume" in refused[0]
        record = record_for_claim(cluster, "stolen")
        assert record is not None
        guid = record["spec"]["guid"]
        claim = cluster.core.read_namespaced_persistent_volume_claim("stolen", NS)
        assert claim.status.phase == "Pending"
        assert not (cluster.prefix / guid).exists() and leftovers(cluster) == []
        # The server the tenant runs was left as it was: no backup, no slot.
        wait_for(
            "the tenant's server to leave backup mode",
            lambda: slots_and_sessions(server) == "0,0",
            30,
        )
    finally:
        cluster.core.delete_namespaced_persistent_volume_claim("stolen", NS)
        cluster.core.delete_namespaced_pod("evil-1", NS, grace_period_seconds=0)
        for secret in ("evil-ca", "evil-replication"):
            cluster.core.delete_namespaced_secret(secret, NS)
        server.stop("immediate")
        for claim, (pv, published) in targets.items():
            subprocess.run(["rm", "-rf", str(published / "pgdata"), str(published / "pg_wal")])
            cluster.unpublish(pv, published)
            cluster.core.delete_namespaced_persistent_volume_claim(claim, NS)
        # Gone before the next case makes claims of the same names.
        wait_for(
            "the tenant's claims deleted",
            lambda: (
                not {
                    c.metadata.name
                    for c in cluster.core.list_namespaced_persistent_volume_claim(NS).items
                }
                & {"stolen", *targets}
            ),
            60,
        )
    # The victim's data directory is untouched and still the victim's.
    assert without_function.psql("SELECT system_identifier FROM pg_control_system()") == victim_id
