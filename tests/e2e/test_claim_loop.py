"""The claim loop end to end: claims whose source lives in another namespace (NAMESPACE_PATH)
or on another driver, which external-provisioner cannot clone."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kubernetes import client

from tests.e2e.stack import NS, Cluster, create_cnpg_objects, enable_source_namespace, wait_for
from tests.e2e.test_native import wait_copy_asked
from tests.pgserver import Certificates, PostgresServer, boot_clone, chown_postgres, free_port

pytestmark = pytest.mark.integration
TEMPLATES = "templates"
# The crowd of claims of one source, and the controller's BACKUP_MODE_LIMIT (its default).
CROWD = 200
BACKUP_MODE_LIMIT = 60.0
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@dataclass
class Template:
    server: PostgresServer
    directory: Path


def hostpath_claim(cluster: Cluster, ns: str, name: str, path: Path) -> None:
    """A static hostPath PV pre-bound to a claim of no StorageClass (another driver)."""
    pv_name = f"hostpath-{ns}-{name}"
    cluster.core.create_persistent_volume(
        client.V1PersistentVolume(
            metadata=client.V1ObjectMeta(name=pv_name),
            spec=client.V1PersistentVolumeSpec(
                capacity={"storage": "1Gi"},
                access_modes=["ReadWriteOnce"],
                host_path=client.V1HostPathVolumeSource(path=str(path)),
                storage_class_name="",
                persistent_volume_reclaim_policy="Retain",
                claim_ref=client.V1ObjectReference(namespace=ns, name=name),
            ),
        )
    )
    cluster.core.create_namespaced_persistent_volume_claim(
        ns,
        client.V1PersistentVolumeClaim(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteOnce"],
                storage_class_name="",
                volume_name=pv_name,
                resources=client.V1VolumeResourceRequirements(requests={"storage": "1Gi"}),
            ),
        ),
    )
    cluster.wait_bound(name, namespace=ns)


def claim_from(
    cluster: Cluster,
    name: str,
    source: str,
    namespace: str = NS,
    storage_class: str = "pg-reflinker",
    source_namespace: str | None = None,
) -> None:
    cluster.core.create_namespaced_persistent_volume_claim(
        namespace,
        client.V1PersistentVolumeClaim(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteOnce"],
                storage_class_name=storage_class,
                resources=client.V1VolumeResourceRequirements(requests={"storage": "1Gi"}),
                data_source_ref=client.V1TypedObjectReference(
                    api_group="",
                    kind="PersistentVolumeClaim",
                    name=source,
                    namespace=source_namespace,
                ),
            ),
        ),
    )


@pytest.fixture(scope="module")
def template(cluster: Cluster) -> Iterator[Template]:
    """A CNPG instance in namespace templates on a hostPath PV (not a pg-reflinker volume)."""
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=TEMPLATES)))
    enable_source_namespace(cluster.plane.api_client(), TEMPLATES)
    directory = cluster.prefix / "hostpath" / "pg-tmpl-1"
    directory.mkdir(parents=True)
    chown_postgres(directory)
    hostpath_claim(cluster, TEMPLATES, "pg-tmpl-1", directory)
    certs = Certificates.create(cluster.plane.work / "certs-tmpl", "pg-tmpl", TEMPLATES)
    os.chmod(certs.directory, 0o755)
    server = PostgresServer(
        volume=directory, port=free_port(), socket_dir=cluster.plane.work / "sock", certs=certs
    )
    server.initdb()
    server.start()
    server.install_function()
    server.psql("CREATE DATABASE app")
    server.pgbench("-i", "-s", "1", "-q")
    create_cnpg_objects(
        cluster.core,
        TEMPLATES,
        "pg-tmpl",
        "pg-tmpl-1",
        "pg-tmpl-1",
        certs,
        str(directory),
        server.port,
    )
    # The templates namespace lets claims of apps clone its claims.
    cluster.custom.create_namespaced_custom_object(
        "gateway.networking.k8s.io",
        "v1beta1",
        TEMPLATES,
        "referencegrants",
        {
            "apiVersion": "gateway.networking.k8s.io/v1beta1",
            "kind": "ReferenceGrant",
            "metadata": {"name": "clones-for-apps"},
            "spec": {
                "from": [{"group": "", "kind": "PersistentVolumeClaim", "namespace": NS}],
                "to": [{"group": "", "kind": "PersistentVolumeClaim"}],
            },
        },
    )
    yield Template(server, directory)
    server.stop("immediate")


def test_claim_in_apps_clones_the_template_found_through_namespace_path(
    cluster: Cluster, template: Template
) -> None:
    claim_from(cluster, "dev", "pg-tmpl-1")
    pv = cluster.wait_bound("dev", timeout=60)
    guid = pv.spec.csi.volume_handle
    assert UUID4.match(guid) and pv.metadata.name == guid
    notes = pv.metadata.annotations
    assert notes["pv.kubernetes.io/provisioned-by"] == "pg-reflinker.csi"
    assert notes["pg-reflinker.csi/guid"] == guid
    assert notes["pg-reflinker.csi/source-pvc"] == f"{TEMPLATES}/pg-tmpl-1"
    assert notes["pg-reflinker.csi/claim"] == f"{NS}/dev"
    assert pv.spec.claim_ref.name == "dev" and pv.spec.claim_ref.namespace == NS
    assert pv.spec.persistent_volume_reclaim_policy == "Delete"
    events = wait_for(
        "the claim loop's ProvisioningSucceeded event",
        lambda: (
            [
                e
                for e in cluster.events_for("PersistentVolumeClaim", "dev")
                if "ProvisioningSucceeded" in e and guid in e
            ]
            and cluster.events_for("PersistentVolumeClaim", "dev")
        ),
        15,
    )
    loop = "pg-reflinker.csi/claim-loop"
    events = sorted(e for e in events if e.startswith(loop))  # not the PV controller's
    assert events[0] == (
        f"{loop} Provisioning: cloning source claim {TEMPLATES}/pg-tmpl-1, used by pod "
        f"{TEMPLATES}/pg-tmpl-1 on node node-a"
    )
    assert re.fullmatch(
        rf"{loop} ProvisioningSucceeded: cloned into volume {guid} on node node-a in \d+\.\d\d s",
        events[1],
    )
    assert len(events) == 2

    target = cluster.publish(pv, str(uuid.uuid4()))
    clone = boot_clone(target, cluster.plane.work / "sock")
    try:
        q = "SELECT count(*) FROM pgbench_accounts"
        assert clone.psql(q, db="app") == template.server.psql(q, db="app") == "100000"
    finally:
        clone.stop()
        cluster.unpublish(pv, target)


def test_same_name_in_the_claims_own_namespace_wins(cluster: Cluster, template: Template) -> None:
    # templates/pg-shadow would be cloneable (the template's server uses the same directory);
    # apps/pg-shadow, on another driver with no instance running, must still be the one chosen.
    hostpath_claim(cluster, TEMPLATES, "pg-shadow", template.directory)
    own = cluster.prefix / "hostpath" / "apps-shadow"
    own.mkdir(parents=True)
    hostpath_claim(cluster, NS, "pg-shadow", own)
    claim_from(cluster, "shadow-clone", "pg-shadow")
    events = wait_for(
        "an event naming apps/pg-shadow",
        lambda: [
            e
            for e in cluster.events_for("PersistentVolumeClaim", "shadow-clone")
            if f"{NS}/pg-shadow" in e
        ],
        30,
    )
    assert not any(
        f"{TEMPLATES}/pg-shadow" in e
        for e in cluster.events_for("PersistentVolumeClaim", "shadow-clone")
    )
    assert re.fullmatch(
        rf"pg-reflinker.csi/claim-loop ProvisioningFailed: no running CNPG instance uses source "
        rf"claim {NS}/pg-shadow; a volume of another driver is cloned through its PostgreSQL "
        r"server, start it",
        events[0],
    )
    pvc = cluster.core.read_namespaced_persistent_volume_claim("shadow-clone", NS)
    assert pvc.status.phase == "Pending"
    cluster.core.delete_namespaced_persistent_volume_claim("shadow-clone", NS)


def test_delete_and_recreate_a_claim_gets_a_new_guid(cluster: Cluster, template: Template) -> None:
    claim_from(cluster, "again", "pg-tmpl-1")
    first = cluster.wait_bound("again", timeout=60).spec.csi.volume_handle
    cluster.core.delete_namespaced_persistent_volume_claim("again", NS)
    wait_for(
        "the first volume's directory to go", lambda: not (cluster.prefix / first).exists(), 30
    )
    wait_for(
        "the first claim to go",
        lambda: (
            not [
                c
                for c in cluster.core.list_namespaced_persistent_volume_claim(NS).items
                if c.metadata.name == "again"
            ]
        ),
        30,
    )
    claim_from(cluster, "again", "pg-tmpl-1")
    second = cluster.wait_bound("again", timeout=60).spec.csi.volume_handle
    assert second != first
    assert (cluster.prefix / second / "pgdata").is_dir()


def test_missing_source_is_reported_then_binds_when_it_appears(
    cluster: Cluster, template: Template
) -> None:
    claim_from(cluster, "late", "pg-late-1")
    events = wait_for(
        "a Warning listing the namespaces searched",
        lambda: [
            e
            for e in cluster.events_for("PersistentVolumeClaim", "late")
            if re.fullmatch(
                r".* ProvisioningFailed: source claim 'pg-late-1' not found in namespaces apps, "
                r"templates, or not shared with namespace apps: .* ReferenceGrant in namespace "
                r"templates .*",
                e,
            )
        ],
        30,
    )
    assert events
    # Now the source appears: another instance of pg-tmpl (same server, same directory).
    hostpath_claim(cluster, TEMPLATES, "pg-late-1", template.directory)
    create_cnpg_objects(
        cluster.core,
        TEMPLATES,
        "pg-tmpl",
        "pg-late-1",
        "pg-late-1",
        None,
        str(template.directory),
        template.server.port,
    )
    cluster.wait_bound("late", timeout=60)


def test_two_claims_from_one_source_at_once(cluster: Cluster, template: Template) -> None:
    claim_from(cluster, "twin-a", "pg-tmpl-1")
    claim_from(cluster, "twin-b", "pg-tmpl-1")
    a = cluster.wait_bound("twin-a", timeout=60).spec.csi.volume_handle
    b = cluster.wait_bound("twin-b", timeout=60).spec.csi.volume_handle
    assert a != b
    assert (cluster.prefix / a / "pgdata").is_dir() and (cluster.prefix / b / "pgdata").is_dir()


def test_pg_reflinker_source_in_the_same_namespace_is_left_to_external_provisioner(
    cluster: Cluster,
) -> None:
    cluster.pvc("own-src")
    cluster.wait_bound("own-src")
    claim_from(cluster, "own-clone", "own-src")
    pv = cluster.wait_bound("own-clone")
    claim = cluster.core.read_namespaced_persistent_volume_claim("own-clone", NS)
    # external-provisioner names PVs pvc-<claim UID>; the loop would have used the GUID.
    assert pv.metadata.name == f"pvc-{claim.metadata.uid}"
    events = wait_for(
        "external-provisioner's ProvisioningSucceeded event",
        lambda: (
            [
                e
                for e in cluster.events_for("PersistentVolumeClaim", "own-clone")
                if "ProvisioningSucceeded" in e
            ]
            and cluster.events_for("PersistentVolumeClaim", "own-clone")
        ),
        15,
    )
    assert not any(e.startswith("pg-reflinker.csi/claim-loop") for e in events)


def test_claim_deleted_while_its_clone_fails_leaves_no_record(
    cluster: Cluster, template: Template
) -> None:
    # Neither method is open to the role: no EXECUTE on the function, none on pg_backup_start.
    revoked = (
        "FUNCTION reflink_snapshot(text)",
        "FUNCTION pg_backup_start(text, boolean)",
    )
    for what in revoked:
        template.server.psql(f"REVOKE EXECUTE ON {what} FROM streaming_replica")
    try:
        claim_from(cluster, "doomed", "pg-tmpl-1")
        wait_for(
            "a ProvisioningFailed event naming the role",
            lambda: [
                e
                for e in cluster.events_for("PersistentVolumeClaim", "doomed")
                if "streaming_replica" in e
            ],
            30,
        )
        uid = cluster.core.read_namespaced_persistent_volume_claim("doomed", NS).metadata.uid
        records = cluster.custom.list_cluster_custom_object(
            "pg-reflinker.csi", "v1alpha1", "reflinkvolumes"
        )["items"]
        assert any(r["metadata"]["name"] == f"claim-{uid}" for r in records)
        cluster.core.delete_namespaced_persistent_volume_claim("doomed", NS)
    finally:
        for what in revoked:
            template.server.psql(f"GRANT EXECUTE ON {what} TO streaming_replica")

    def gone() -> bool:
        items = cluster.custom.list_cluster_custom_object(
            "pg-reflinker.csi", "v1alpha1", "reflinkvolumes"
        )["items"]
        return not any(r["metadata"]["name"] == f"claim-{uid}" for r in items)

    wait_for("the orphaned record to be removed", gone, 90)


def test_a_native_clone_whose_node_is_slow_gets_the_whole_backup_budget(
    cluster: Cluster, template: Template
) -> None:
    """A claim of a cloneMethod: native class, served by the claim loop, whose node plugin
    takes 25 s over the Copy step (frozen, so the moment is certain): within BACKUP_MODE_LIMIT
    (60 s), so the first attempt binds. The claim loop used to give a clone 20 s in all: the
    backup was ended and every retry, each with a checkpoint on the source, failed the same
    way on a busy node."""
    storage = client.StorageV1Api(cluster.plane.api_client())
    storage.create_storage_class(
        client.V1StorageClass(
            metadata=client.V1ObjectMeta(name="pg-reflinker-native"),
            provisioner="pg-reflinker.csi",
            parameters={"cloneMethod": "native"},
            volume_binding_mode="Immediate",
        )
    )
    node = cluster.processes["node"]
    node.send_signal(signal.SIGSTOP)
    try:
        claim_from(cluster, "slow-node", "pg-tmpl-1", storage_class="pg-reflinker-native")

        first = wait_copy_asked(cluster, "slow-node")
        time.sleep(25)  # the fault itself: a node plugin 25 s late
    finally:
        node.send_signal(signal.SIGCONT)
    pv = cluster.wait_bound("slow-node", timeout=90)
    [record] = [
        r
        for r in cluster.custom.list_cluster_custom_object(
            "pg-reflinker.csi", "v1alpha1", "reflinkvolumes"
        )["items"]
        if r["spec"]["guid"] == pv.spec.csi.volume_handle
    ]
    assert record["spec"]["cloneMethod"] == "native"
    assert record["spec"]["backup"]["attempt"] == first["spec"]["backup"]["attempt"], (
        "the first attempt was given up: "
        + "; ".join(cluster.events_for("PersistentVolumeClaim", "slow-node"))
    )
    cluster.core.delete_namespaced_persistent_volume_claim("slow-node", NS)
    storage.delete_storage_class("pg-reflinker-native")


def test_a_controller_that_loses_its_lease_ends_and_comes_back_a_follower(
    cluster: Cluster,
) -> None:
    """Another holder takes the claim loop's Lease and keeps it renewed: the controller stops
    leading within its renew deadline and its process ends (exit code 1, as a
    controller-runtime manager's), so nothing it had in hand goes on beside the new leader;
    restarted, it follows until the Lease is free again, then leads."""
    leases = client.CoordinationV1Api(cluster.plane.api_client())
    name, namespace = "pg-reflinker-claim-loop", "pg-reflinker"

    def holder() -> str:
        return str(leases.read_namespaced_lease(name, namespace).spec.holder_identity or "")

    controller = cluster.processes["controller"]
    wait_for("the controller to lead", lambda: holder() not in ("", "usurper"), 30)
    ended = None
    deadline = time.monotonic() + 40
    while ended is None and time.monotonic() < deadline:
        lease = leases.read_namespaced_lease(name, namespace)
        lease.spec.holder_identity = "usurper"
        lease.spec.renew_time = datetime.now(UTC)
        with contextlib.suppress(client.ApiException):  # the controller wrote meanwhile
            leases.replace_namespaced_lease(name, namespace, lease)
        ended = controller.poll()
        time.sleep(1)
    try:
        assert ended == 1, f"the deposed controller's process: {ended}"
        assert "lost the lease" in cluster.log_tail("controller", 200)
    finally:
        lease = leases.read_namespaced_lease(name, namespace)
        lease.spec.holder_identity = ""
        leases.replace_namespaced_lease(name, namespace, lease)
        cluster.restart_controller()
    wait_for("the restarted controller to lead", lambda: holder() not in ("", "usurper"), 30)


CALL = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \S+ \[\d+\] LOG:  duration: ([\d.]+) ms  "
    r"(?:statement|execute <unnamed>): SELECT pg_catalog\.left\(public\.reflink_snapshot",
    re.M,
)


def backups_in_log(text: str) -> list[tuple[float, float]]:
    """(start, end) of each reflink_snapshot() call the server logged: the line's time (when
    the statement ended) less its duration."""
    found = []
    for when, ms in CALL.findall(text):
        end = datetime.strptime(when, "%Y-%m-%d %H:%M:%S.%f").timestamp()
        found.append((end - float(ms) / 1000, end))
    return sorted(found)


def test_many_claims_of_one_source_take_one_backup_at_a_time(
    cluster: Cluster, template: Template
) -> None:
    """Two hundred claims of one source at once: the claim loop's workers take several at a
    time, the source instance still serves one backup at a time, none longer than
    BACKUP_MODE_LIMIT, and every claim is bound (here each backup is one reflink_snapshot()
    statement, whose end and duration the server logs, so overlapping backups cannot hide
    between samples)."""
    names = [f"crowd-{i}" for i in range(CROWD)]
    server = template.server
    offset = server.log_file.stat().st_size
    server.psql("ALTER ROLE streaming_replica SET log_min_duration_statement = 0")
    try:
        for name in names:
            claim_from(cluster, name, "pg-tmpl-1")
        began = time.monotonic()
        guids = {cluster.wait_bound(n, timeout=600).spec.csi.volume_handle for n in names}
        print(f"\n{CROWD} claims of one source bound in {time.monotonic() - began:.1f} s")
    finally:
        server.psql("ALTER ROLE streaming_replica RESET log_min_duration_statement")
    assert len(guids) == len(names)
    log = server.log_file.read_bytes()[offset:].decode(errors="replace")
    backups = backups_in_log(log)
    assert len(backups) >= len(names), log[-3000:]
    overlaps = [(a, b) for a, b in itertools.pairwise(backups) if b[0] < a[1] - 0.002]
    assert not overlaps, f"{len(overlaps)} of {len(backups)} backups began before the last ended"
    longest = max(end - start for start, end in backups)
    assert longest < BACKUP_MODE_LIMIT, f"a backup took {longest:.1f} s"
    began = time.monotonic()
    for name in names:
        cluster.core.delete_namespaced_persistent_volume_claim(name, NS)
    # The tests after this one find the sidecars and the node plugin idle again.
    wait_for(
        "the crowd's volumes removed",
        lambda: not [g for g in guids if (cluster.prefix / g).exists()],
        600,
        every=1.0,
    )
    print(f"and removed in {time.monotonic() - began:.1f} s")
