"""pg-reflinker in a real one-node cluster: real kubelet and containerd running real pods, our
image built from the Dockerfile, the chart installed with helm, and the real
CloudNativePG operator creating the databases and their clones.

The scenarios build on each other in file order (one source cluster for the package)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import cnpg
from tests.cluster.test_deploy import container_pids, memory_peaks, node_plugin
from tests.e2e import images
from tests.e2e.onenode import (
    NODE,
    PREFIX,
    OneNodeCluster,
    driver_registered,
    helm_install,
    tag_image,
)
from tests.tools import chart

NS = cnpg.NS
SOURCE = "pg-prod"
CLONE = "pg-prod-dev"
PGBENCH_SCALE = 20


@pytest.fixture(scope="package")
def source(k8s: OneNodeCluster) -> str:
    """The source CNPG cluster (from deploy/examples/source-cluster.yaml) with pgbench data."""
    cnpg.ensure_namespace(k8s)
    cnpg.install_function_configmap(k8s)
    start = time.monotonic()
    k8s.apply(cnpg.example("source-cluster.yaml"))
    healthy = cnpg.wait_healthy(k8s, SOURCE)
    print(
        f"\nsource Cluster healthy {time.monotonic() - start:.1f} s after apply ({healthy:.1f} s)"
    )
    pod = cnpg.primary_pod(k8s, SOURCE)
    cnpg.pgbench(k8s, pod, "-i", "-s", str(PGBENCH_SCALE), "-q")
    return pod


def test_source_cluster_runs_on_a_pg_reflinker_volume_with_the_function(
    k8s: OneNodeCluster, source: str
) -> None:
    pvc = k8s.get("pvc", source, "-n", NS)
    assert pvc["spec"]["storageClassName"] == "pg-reflinker"
    pv = k8s.get("pv", pvc["spec"]["volumeName"])
    assert pv["spec"]["csi"]["driver"] == "pg-reflinker.csi"
    node_terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert node_terms[0]["matchExpressions"][0]["values"] == [NODE]
    # The data lives on the node's HOSTPATH_PREFIX, under the volume's GUID, with a record.
    guid = pv["spec"]["csi"]["volumeHandle"]
    record = _record_for(k8s, guid)
    assert record["status"]["phase"] == "Ready"
    assert record["spec"]["claim"] == f"{NS}/{source}"
    assert (PREFIX / guid / "pgdata" / "PG_VERSION").read_text().strip() == str(images.PG_MAJOR)
    # postInitSQLRefs installed the function where streaming_replica can call it.
    assert (
        cnpg.psql(
            k8s,
            source,
            "SELECT has_function_privilege("
            "'streaming_replica', 'reflink_snapshot(text)', 'EXECUTE')",
            db="postgres",
        )
        == "t"
    )
    assert int(cnpg.psql(k8s, source, "SELECT count(*) FROM pgbench_accounts")) == (
        PGBENCH_SCALE * 100000
    )


TENANT = "tenant"


def _claim_of_the_source(name: str, source: str) -> dict[str, Any]:
    """A claim in namespace tenant naming the source in NS (dataSourceRef.namespace)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": TENANT},
        "spec": {
            "storageClassName": "pg-reflinker",
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "8Gi"}},
            "dataSourceRef": {"kind": "PersistentVolumeClaim", "name": source, "namespace": NS},
        },
    }


def _events_of(k8s: OneNodeCluster, claim: str, ns: str) -> list[str]:
    events = k8s.get("events", "-n", ns, "--field-selector", f"involvedObject.name={claim}")
    return [e.get("message", "") for e in events["items"]]


def test_a_claim_in_another_namespace_needs_the_source_namespaces_reference_grant(
    k8s: OneNodeCluster, source: str
) -> None:
    """Consent on the real cluster: a claim in namespace tenant naming the running source in
    NS is not bound while NS grants nothing (its event names the grant and nothing of the
    source: no pod, IP, node or path), is bound once NS has a ReferenceGrant for it, and a new
    claim is refused again once the grant is deleted."""
    k8s.kubectl("create", "namespace", TENANT)
    try:
        k8s.apply(_claim_of_the_source("stolen", source))
        refused = k8s.wait(
            "the refusal of tenant/stolen",
            lambda: [m for m in _events_of(k8s, "stolen", TENANT) if "ReferenceGrant" in m],
            60,
        )
        assert f"a ReferenceGrant in namespace {NS} lets" in refused[0], refused[0]
        pod = k8s.get("pod", source, "-n", NS)
        secrets = [pod["status"]["podIP"], NODE, str(PREFIX), "pgdata"]
        for event in _events_of(k8s, "stolen", TENANT):
            assert not [s for s in secrets if s in event], event
        assert _phase(k8s, "stolen", TENANT) == "Pending"
        grant = {
            "apiVersion": "gateway.networking.k8s.io/v1beta1",
            "kind": "ReferenceGrant",
            "metadata": {"name": "clones-for-tenant", "namespace": NS},
            "spec": {
                "from": [{"group": "", "kind": "PersistentVolumeClaim", "namespace": TENANT}],
                "to": [{"group": "", "kind": "PersistentVolumeClaim", "name": source}],
            },
        }
        k8s.apply(grant)
        k8s.wait("tenant/stolen Bound", lambda: _phase(k8s, "stolen", TENANT) == "Bound", 90)
        guid = _pv_of(k8s, "stolen", TENANT)["spec"]["csi"]["volumeHandle"]
        assert (PREFIX / guid / "pgdata" / "PG_VERSION").is_file()
        k8s.kubectl("delete", "referencegrant", "clones-for-tenant", "-n", NS)
        k8s.apply(_claim_of_the_source("stolen-again", source))
        k8s.wait(
            "the refusal of tenant/stolen-again",
            lambda: [m for m in _events_of(k8s, "stolen-again", TENANT) if "ReferenceGrant" in m],
            60,
        )
        assert _phase(k8s, "stolen-again", TENANT) == "Pending"
    finally:
        k8s.kubectl("delete", "referencegrant", "clones-for-tenant", "-n", NS, check=False)
        k8s.kubectl("delete", "pvc", "--all", "-n", TENANT, "--wait=true", check=False)
        k8s.kubectl("delete", "namespace", TENANT, "--wait=false", check=False)
    k8s.wait("the tenant's volume removed", lambda: guid not in _volume_dirs(), 60)


SHARED = "shared"
ATTACKER = "attacker"
DEVELOPER = "dev@example.com"


def _as_developer(k8s: OneNodeCluster, manifest: dict[str, Any]) -> None:
    """kubectl apply as the developer (impersonated): edit in namespaces attacker and shared,
    and ReferenceGrants in shared; nothing in NS."""
    k8s.kubectl("--as", DEVELOPER, "apply", "-f", "-", input=yaml.safe_dump(manifest))


def test_a_bait_claim_naming_the_sources_volume_gets_the_tenant_nothing(
    k8s: OneNodeCluster, source: str
) -> None:
    """The bait-claim attack, as a developer with only `edit` in two namespaces (attacker and
    shared) and the right to write ReferenceGrants in shared: a claim `bait` in shared whose
    spec.volumeName is the production claim's PV (it stays Pending), a grant in shared from
    claims of attacker to `bait`, and `attacker/loot` cloning `shared/bait`. NS never consented:
    loot stays Pending, its events say only that bait is not bound, and no volume is made."""
    for ns in (ATTACKER, SHARED):
        k8s.kubectl("create", "namespace", ns)
        k8s.kubectl(
            "create",
            "rolebinding",
            "dev-edit",
            "-n",
            ns,
            "--clusterrole=edit",
            f"--user={DEVELOPER}",
        )
    k8s.kubectl(
        "create", "role", "grants", "-n", SHARED, "--verb=get,list,create,delete",
        "--resource=referencegrants.gateway.networking.k8s.io",
    )  # fmt: skip
    k8s.kubectl(
        "create", "rolebinding", "dev-grants", "-n", SHARED, "--role=grants", f"--user={DEVELOPER}"
    )
    denied = k8s.kubectl("--as", DEVELOPER, "get", "pvc", "-n", NS, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr, denied.stderr
    victim_pv = k8s.get("pvc", source, "-n", NS)["spec"]["volumeName"]
    records_before = {r["metadata"]["name"] for r in k8s.get("reflinkvolumes")["items"]}
    try:
        bait = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "bait", "namespace": SHARED},
            "spec": {
                "storageClassName": "",
                "volumeName": victim_pv,
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        _as_developer(k8s, bait)
        _as_developer(
            k8s,
            {
                "apiVersion": "gateway.networking.k8s.io/v1beta1",
                "kind": "ReferenceGrant",
                "metadata": {"name": "to-bait", "namespace": SHARED},
                "spec": {
                    "from": [{"group": "", "kind": "PersistentVolumeClaim", "namespace": ATTACKER}],
                    "to": [{"group": "", "kind": "PersistentVolumeClaim", "name": "bait"}],
                },
            },
        )
        loot = _claim_of_the_source("loot", "bait")
        loot["metadata"]["namespace"] = ATTACKER
        loot["spec"]["dataSourceRef"]["namespace"] = SHARED
        _as_developer(k8s, loot)
        refused = k8s.wait(
            "the refusal of attacker/loot",
            lambda: [m for m in _events_of(k8s, "loot", ATTACKER) if "bait" in m],
            60,
        )
        assert refused[0] == (
            f"source claim {SHARED}/bait is not bound to a volume; it is cloned once it is Bound"
        ), refused
        assert _phase(k8s, "bait", SHARED) == "Pending"
        assert _phase(k8s, "loot", ATTACKER) == "Pending"
        pod = k8s.get("pod", source, "-n", NS)
        leaks = [NS + "/", source, pod["status"]["podIP"], NODE, victim_pv, str(PREFIX)]
        for event in _events_of(k8s, "loot", ATTACKER):
            assert not [s for s in leaks if s in event], event
        records = {r["metadata"]["name"] for r in k8s.get("reflinkvolumes")["items"]}
        assert records == records_before
    finally:
        for ns in (ATTACKER, SHARED):
            k8s.kubectl("delete", "pvc", "--all", "-n", ns, "--wait=true", check=False)
            k8s.kubectl("delete", "namespace", ns, "--wait=false", check=False)


METRICS_PROBE = """import sys, urllib.request, urllib.error
url, token = sys.argv[1], sys.argv[2]
request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token} if token else {})
try:
    with urllib.request.urlopen(request, timeout=10) as answer:
        print(answer.status, "pg_reflinker_filesystem_free_bytes" in answer.read().decode())
except urllib.error.HTTPError as err:
    print(err.code, "pg_reflinker" in err.read().decode())
"""


def test_a_pod_in_a_tenants_namespace_reads_no_driver_metrics(k8s: OneNodeCluster) -> None:
    """The metrics of the controller and the node plugin name every claim with a volume on a
    node. A developer's pod (edit in its namespace, its default service account) reaches their
    ports (this cluster's network plugin enforces no NetworkPolicy) and gets 401 without a
    token and 403 with its own; the token of the chart's metrics reader gets them."""
    from tests.e2e import images

    ns = "tenant-metrics"
    k8s.kubectl("create", "namespace", ns)
    k8s.kubectl(
        "create", "rolebinding", "dev-edit", "-n", ns, "--clusterrole=edit", f"--user={DEVELOPER}"
    )
    try:
        _as_developer(
            k8s,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "curious", "namespace": ns},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": "probe",
                            "image": images.PROJECT,
                            "imagePullPolicy": "Never",
                            "command": ["sleep", "3600"],
                        }
                    ],
                },
            },
        )
        k8s.wait(
            "the developer's pod Running",
            lambda: k8s.get("pod", "curious", "-n", ns)["status"].get("phase") == "Running",
            60,
        )
        pods = k8s.get("pods", "-n", "pg-reflinker")["items"]
        ports = {"pg-reflinker-controller": 9810, "pg-reflinker-node": 9811}
        urls = [
            f"http://{p['status']['podIP']}:{ports[name]}/metrics"
            for p in pods
            if (name := p["metadata"].get("labels", {}).get("app.kubernetes.io/name")) in ports
            and p["status"].get("podIP")
        ]
        assert len(urls) >= 2, urls
        secret = k8s.get("secret", "pg-reflinker-metrics-token", "-n", "pg-reflinker")
        reader = base64.b64decode(secret["data"]["token"]).decode()

        def probe(url: str, token: str) -> str:
            script = f"python3 -c '{METRICS_PROBE}' {url} \"{token}\""
            done = k8s.kubectl(
                "--as", DEVELOPER, "exec", "-n", ns, "curious", "--", "sh", "-c", script
            )
            return done.stdout.strip()

        own = "$(cat /var/run/secrets/kubernetes.io/serviceaccount/token)"
        for url in urls:
            assert probe(url, "") == "401 False", url
            assert probe(url, own) == "403 False", url
            assert probe(url, reader) == "200 True", url
    finally:
        k8s.kubectl("delete", "namespace", ns, "--wait=false", check=False)


EVIL = "evil"
# The tenant's "CNPG instance": its own PostgreSQL in the project's image, with its own CA and
# server certificate, its data in own/ on its volume, and pgdata a link to another volume.
EVIL_SCRIPT = """set -e
D=/var/lib/postgresql/data
B=$(ls -d /usr/lib/postgresql/*/bin | head -1)
[ -d $D/own ] || $B/initdb -D $D/own -U postgres --auth-local=trust --auth-host=reject >/dev/null
cp /certs/server.crt /certs/server.key /certs/ca.crt $D/own/
chmod 600 $D/own/server.key
printf "%s\\n" "listen_addresses = '*'" "port = 5432" "ssl = on" "wal_level = replica" \\
  "ssl_cert_file = 'server.crt'" "ssl_key_file = 'server.key'" "ssl_ca_file = 'ca.crt'" \\
  >> $D/own/postgresql.auto.conf
printf "%s\\n" "local all all trust" "hostssl postgres streaming_replica all cert" \\
  > $D/own/pg_hba.conf
ln -sfn VICTIM $D/pgdata
exec $B/postgres -D $D/own -k /tmp
"""


def test_a_tenants_pgdata_linked_to_another_volume_is_refused_on_the_real_cluster(
    k8s: OneNodeCluster, source: str, tmp_path: Path
) -> None:
    """The redirect attack with a real kubelet and a real pod: in namespace evil (enabled as a
    source, as a tenant's own namespace would be), a pod labelled as CNPG instance evil-1 runs
    its own PostgreSQL with its own CA and replication secrets, answers the victim's system
    identifier through a pg_control_system() of its own, and its volume's pgdata links to the
    running source's data directory. A clone of its claim is refused; nothing is copied; the
    events name neither the victim's volume nor its identifier."""
    from tests.e2e import images
    from tests.pgserver import Certificates

    victim = cnpg.volume_handle(k8s, source)
    victim_id = cnpg.psql(k8s, source, "SELECT system_identifier FROM pg_control_system()")
    certs = Certificates.create(tmp_path, EVIL, EVIL)
    cnpg.ensure_namespace(k8s, EVIL)
    try:

        def secret(name: str, kind: str, files: dict[str, str]) -> None:
            args = [f"--from-file={key}={certs.path(f)}" for key, f in files.items()]
            k8s.kubectl("create", "secret", kind, name, "-n", EVIL, *args)

        secret("evil-ca", "generic", {"ca.crt": "ca.crt", "ca.key": "ca.key"})
        secret(
            "evil-replication",
            "generic",
            {"tls.crt": "replication.crt", "tls.key": "replication.key"},
        )
        secret(
            "evil-certs",
            "generic",
            {"server.crt": "server.crt", "server.key": "server.key", "ca.crt": "ca.crt"},
        )
        claim = _claim_of_the_source("evil-1", source)
        claim["metadata"]["namespace"] = EVIL
        del claim["spec"]["dataSourceRef"]
        k8s.apply(claim)
        k8s.wait("evil/evil-1 Bound", lambda: _phase(k8s, "evil-1", EVIL) == "Bound", 60)
        script = EVIL_SCRIPT.replace("VICTIM", str(PREFIX / victim / "pgdata"))
        k8s.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "evil-1",
                    "namespace": EVIL,
                    "labels": {
                        "cnpg.io/cluster": EVIL,
                        "cnpg.io/instanceName": "evil-1",
                        "cnpg.io/podRole": "instance",
                    },
                },
                "spec": {
                    "securityContext": {"runAsUser": 26, "runAsGroup": 26, "fsGroup": 26},
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": "postgres",
                            "image": images.POSTGRES,
                            "imagePullPolicy": "Never",
                            "command": ["sh", "-c", script],
                            "ports": [{"name": "postgresql", "containerPort": 5432}],
                            "volumeMounts": [
                                {"name": "pgdata", "mountPath": "/var/lib/postgresql/data"},
                                {"name": "certs", "mountPath": "/certs"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "pgdata", "persistentVolumeClaim": {"claimName": "evil-1"}},
                        {"name": "certs", "secret": {"secretName": "evil-certs"}},
                    ],
                },
            }
        )

        def tenant_psql(*args: str, check: bool = True) -> str:
            """psql as postgres in the tenant's pod, through its local socket."""
            psql = ["exec", "-n", EVIL, "evil-1", "--", "psql", "-h", "/tmp", "-U", "postgres"]
            return k8s.kubectl(*psql, *args, check=check).stdout.strip()

        k8s.wait(
            "the tenant's server", lambda: tenant_psql("-Atc", "SELECT 1", check=False) == "1", 120
        )
        for sql in (
            "CREATE ROLE streaming_replica LOGIN REPLICATION",
            "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO streaming_replica",
            "GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO streaming_replica",
            "CREATE FUNCTION public.pg_control_system(OUT pg_control_version integer, "
            "OUT catalog_version_no integer, OUT system_identifier bigint, "
            "OUT pg_control_last_modified timestamptz) LANGUAGE sql "
            f"AS $$ SELECT 1, 1, {victim_id}::bigint, now() $$",
            "ALTER ROLE streaming_replica SET search_path = public, pg_catalog",
        ):
            tenant_psql("-v", "ON_ERROR_STOP=1", "-c", sql)
        stolen = _claim_of_the_source("stolen", "evil-1")
        stolen["metadata"]["namespace"] = EVIL
        del stolen["spec"]["dataSourceRef"]["namespace"]
        before = _volume_dirs()
        k8s.apply(stolen)
        refused = k8s.wait(
            "the refusal of evil/stolen",
            lambda: [
                m for m in _events_of(k8s, "stolen", EVIL) if "pgdata is a symbolic link" in m
            ],
            120,
        )
        assert "own volume" in refused[0], refused[0]
        for event in _events_of(k8s, "stolen", EVIL):
            assert victim not in event and victim_id not in event, event
        assert _phase(k8s, "stolen", EVIL) == "Pending"
        assert _volume_dirs() == before
        assert not [p for p in PREFIX.iterdir() if p.name.endswith(".partial")]
    finally:
        k8s.kubectl("delete", "namespace", EVIL, "--wait=true", "--timeout=120s", check=False)
    # The victim still serves its own data.
    assert cnpg.psql(k8s, source, "SELECT system_identifier FROM pg_control_system()") == victim_id


def _records(k8s: OneNodeCluster) -> list[dict[str, Any]]:
    return list(k8s.get("reflinkvolumes")["items"])


def _record_for(k8s: OneNodeCluster, guid: str) -> dict[str, Any]:
    found = [r for r in _records(k8s) if r["spec"]["guid"] == guid]
    assert len(found) == 1, f"{len(found)} records for volume {guid}"
    return found[0]


def _pv_of(k8s: OneNodeCluster, claim: str, ns: str = NS) -> dict[str, Any]:
    pvc = k8s.get("pvc", claim, "-n", ns)
    assert pvc["status"]["phase"] == "Bound", f"claim {ns}/{claim} is {pvc['status']['phase']}"
    pv: dict[str, Any] = k8s.get("pv", pvc["spec"]["volumeName"])
    return pv


def _volume_dirs() -> set[str]:
    return {p.name for p in PREFIX.iterdir() if not p.name.startswith(".")}


def _wait_removed(k8s: OneNodeCluster, what: str, guids: set[str], timeout: float) -> None:
    """Wait until none of the volumes' directories is left; on a timeout, say for each one left
    what still holds it (its PV and its record). A deleted CNPG Cluster's claims go once its
    pods have stopped, which CNPG allows a smart shutdown of up to 180 s
    (smartShutdownTimeout) before a fast one."""
    try:
        k8s.wait(what, lambda: not (guids & _volume_dirs()), timeout)
    except AssertionError as err:
        left = guids & _volume_dirs()
        pvs = {pv["spec"].get("csi", {}).get("volumeHandle"): pv for pv in k8s.get("pv")["items"]}
        lines = []
        for guid in sorted(left):
            pv = pvs.get(guid)
            found = [r for r in _records(k8s) if r["spec"]["guid"] == guid]
            ref = (pv or {}).get("spec", {}).get("claimRef") or {}
            claim = k8s.kubectl(
                "get",
                "pvc",
                ref.get("name", "-"),
                "-n",
                ref.get("namespace", NS),
                "-o",
                "jsonpath={.metadata.deletionTimestamp} {.metadata.finalizers}",
                check=False,
            ).stdout
            lines.append(
                f"{guid}: PV "
                + (
                    f"{pv['metadata']['name']} {pv['status'].get('phase')} "
                    f"claim {pv['spec'].get('claimRef', {}).get('name')} "
                    f"finalizers {pv['metadata'].get('finalizers')}"
                    if pv
                    else "none"
                )
                + f"; its claim (deleted at, finalizers): {claim}"
                + f"; record {[(r['metadata']['name'], r.get('status')) for r in found]}"
            )
        raise AssertionError(f"{err}; left: " + "; ".join(lines)) from None


def _group_bits(directory: Path) -> list[str]:
    """Files under a data directory that kubelet's recursive fsGroup walk would have changed."""
    return [str(p) for p in directory.rglob("*") if p.is_file() and p.stat().st_mode & 0o070][:5]


def test_new_cluster_from_a_running_cluster_under_pgbench_load(
    k8s: OneNodeCluster, source: str
) -> None:
    load = cnpg.pgbench_background(k8s, source, seconds=25)
    try:
        # The clone is taken while transactions are committing.
        k8s.wait(
            "pgbench transactions on the source",
            lambda: int(cnpg.psql(k8s, source, "SELECT count(*) FROM pgbench_history")) > 0,
            60,
        )
        start = time.monotonic()
        k8s.apply(cnpg.example("clone-cluster.yaml"))
        cnpg.wait_healthy(k8s, CLONE)
        elapsed = time.monotonic() - start
    finally:
        out, _ = load.communicate(timeout=120)
    assert load.returncode == 0, f"pgbench on the source failed: {out}"
    assert "number of transactions actually processed" in out
    print(f"\nclone Cluster {CLONE} healthy {elapsed:.1f} s after apply (source under pgbench)")

    pod = cnpg.primary_pod(k8s, CLONE)
    sums = cnpg.pgbench_sums(k8s, pod)
    assert len(sums) == 1, f"pgbench invariant broken in the clone: {sums}"
    assert sums != {"0"}, "the clone has no pgbench transactions: it was not taken under load"
    cnpg.amcheck(k8s, pod)
    rows = int(cnpg.psql(k8s, pod, "SELECT count(*) FROM pgbench_accounts"))
    assert rows == PGBENCH_SCALE * 100000
    # The clone is a primary that accepts writes, independent of its source.
    cnpg.psql(k8s, pod, "CREATE TABLE only_in_clone (id int); INSERT INTO only_in_clone VALUES (1)")
    assert cnpg.psql(k8s, source, "SELECT to_regclass('only_in_clone') IS NULL") == "t"

    pv = _pv_of(k8s, pod)
    guid = pv["spec"]["csi"]["volumeHandle"]
    record = _record_for(k8s, guid)
    assert record["spec"]["cloneMode"] == "hot"
    assert record["spec"]["nodeName"] == NODE
    source_guid = _pv_of(k8s, source)["spec"]["csi"]["volumeHandle"]
    assert record["spec"]["sourceVolume"] == source_guid
    # CNPG made the claim from the source claim; csi-provisioner passed it on as a clone.
    claim = k8s.get("pvc", pod, "-n", NS)
    assert claim["spec"]["dataSource"] == {
        "apiGroup": "",
        "kind": "PersistentVolumeClaim",
        "name": source,
    }
    # The PV says where the clone came from, in its attributes and annotations.
    attrs = pv["spec"]["csi"]["volumeAttributes"]
    assert attrs["pg-reflinker.csi/source-pvc"] == f"{NS}/{source}"
    assert attrs["pg-reflinker.csi/source-pod"] == f"{NS}/{source}"
    assert attrs["pg-reflinker.csi/claim"] == f"{NS}/{pod}"
    annotations = k8s.get("pv", pv["metadata"]["name"])["metadata"]["annotations"]
    assert annotations["pg-reflinker.csi/guid"] == guid
    assert annotations["pg-reflinker.csi/source-pvc"] == f"{NS}/{source}"
    assert cnpg.hot_clone_seconds(k8s, guid) is not None, "no 'hot clone taken' log line"
    # No hot-clone work directory is left inside the source volume.
    assert not list((PREFIX / source_guid).glob(".pg-reflinker/*"))


@pytest.mark.parametrize(
    "major", [m for m in sorted(images.PG_SUITES) if m != images.PG_MAJOR], ids=lambda m: f"pg{m}"
)
def test_a_cluster_of_another_major_is_cloned_under_load_into_a_new_one(
    k8s: OneNodeCluster, major: int
) -> None:
    """Every other scenario runs PG_MAJOR (18 unless set); this one runs the other majors the
    images are built for: a Cluster on that major's image with the native grants, a new Cluster
    made from it under pgbench load boots on the same major with pgbench's invariant and
    amcheck, and both go away with their volumes."""
    cnpg.ensure_namespace(k8s)
    name = f"pg-v{major}"
    spec = cnpg.example("source-cluster-native.yaml", metadata__name=name)
    spec["spec"]["imageName"] = images.postgres_image(major)
    del spec["spec"]["walStorage"]
    k8s.apply(spec)
    cnpg.wait_healthy(k8s, name)
    source = cnpg.primary_pod(k8s, name)
    cnpg.pgbench(k8s, source, "-i", "-s", "2", "-q")
    load = cnpg.pgbench_background(k8s, source, seconds=15)
    try:
        k8s.wait(
            f"pgbench transactions on {name}",
            lambda: int(cnpg.psql(k8s, source, "SELECT count(*) FROM pgbench_history")) > 0,
            60,
        )
        clone_spec = cnpg.example("clone-cluster.yaml", metadata__name=f"{name}-dev")
        clone_spec["spec"]["imageName"] = images.postgres_image(major)
        clone_spec["spec"]["bootstrap"]["recovery"]["volumeSnapshots"]["storage"]["name"] = source
        k8s.apply(clone_spec)
        cnpg.wait_healthy(k8s, f"{name}-dev")
    finally:
        out, _ = load.communicate(timeout=120)
    assert load.returncode == 0, f"pgbench on the source failed: {out}"
    pod = cnpg.primary_pod(k8s, f"{name}-dev")
    assert int(cnpg.psql(k8s, pod, "SHOW server_version_num")) // 10000 == major
    sums = cnpg.pgbench_sums(k8s, pod)
    assert len(sums) == 1 and sums != {"0"}, f"pgbench invariant in the clone: {sums}"
    cnpg.amcheck(k8s, pod)
    assert int(cnpg.psql(k8s, pod, "SELECT count(*) FROM pgbench_accounts")) == 200000
    guids = {_pv_of(k8s, c)["spec"]["csi"]["volumeHandle"] for c in (source, pod)}
    cnpg.delete_cluster(k8s, f"{name}-dev")
    cnpg.delete_cluster(k8s, name)
    _wait_removed(k8s, "the volumes removed", guids, 240)


def test_kubelet_hands_fs_group_to_the_driver_instead_of_walking_the_clone(
    k8s: OneNodeCluster,
) -> None:
    """CNPG pods run with fsGroup 26 and no fsGroupChangePolicy: kubelet would chown and chmod
    every file of a cloned PGDATA at every mount. With VOLUME_MOUNT_GROUP it passes the group to
    NodePublishVolume and walks nothing: the clone's files keep their modes."""
    pod = cnpg.primary_pod(k8s, CLONE)
    guid = _pv_of(k8s, pod)["spec"]["csi"]["volumeHandle"]
    volume = PREFIX / guid
    assert volume.stat().st_gid == 26
    pgdata = volume / "pgdata"
    assert pgdata.stat().st_mode & 0o777 == 0o700
    assert _group_bits(pgdata / "base") == []
    instance = k8s.get("pod", pod, "-n", NS)
    assert instance["spec"]["securityContext"]["fsGroup"] == 26
    conditions = {c["type"]: c["lastTransitionTime"] for c in instance["status"]["conditions"]}
    print(
        f"\nclone instance pod: scheduled {conditions['PodScheduled']}, "
        f"initialized {conditions['Initialized']} (mount and init containers)"
    )


# The seed's example claim: what CNPG creates for a Cluster "pg-xyz" restored from claim
# "pgdata-empty". Instance-specific values (the owner's uid, the operator's version) excepted,
# the claim CNPG makes must be exactly this.
SEED_PVC = """
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  annotations:
    cnpg.io/nodeSerial: "1"
    cnpg.io/operatorVersion: 1.28.0
  name: pg-xyz-1
  namespace: apps
  ownerReferences:
    - apiVersion: postgresql.cnpg.io/v1
      controller: true
      kind: Cluster
      name: pg-xyz
      uid: d82a45e1-3236-42a1-933f-2203991d1a66
spec:
  accessModes:
    - ReadWriteOnce
  dataSourceRef:
    apiGroup: ""
    kind: PersistentVolumeClaim
    name: pgdata-empty
  resources:
    requests:
      storage: 6400Gi
  storageClassName: pg-reflinker
  volumeMode: Filesystem
"""


def test_the_seed_example_claim_is_bound_and_mounted_by_a_real_pod(
    k8s: OneNodeCluster, source: str
) -> None:
    seed = yaml.safe_load(SEED_PVC)
    # pgdata-empty: a clone of the running source, labelled as CNPG labels PGDATA claims.
    k8s.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": "pgdata-empty",
                "namespace": NS,
                "labels": {"cnpg.io/pvcRole": "PG_DATA"},
            },
            "spec": {
                "storageClassName": "pg-reflinker",
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "8Gi"}},
                "dataSource": {"kind": "PersistentVolumeClaim", "name": source},
            },
        }
    )
    k8s.wait("claim pgdata-empty Bound", lambda: _phase(k8s, "pgdata-empty") == "Bound", 60)
    cluster = cnpg.example("clone-cluster.yaml")
    cluster["metadata"]["name"] = "pg-xyz"
    cluster["spec"]["storage"]["size"] = "6400Gi"  # clones are thin: no room is reserved
    cluster["spec"]["bootstrap"]["recovery"]["volumeSnapshots"]["storage"]["name"] = "pgdata-empty"
    k8s.apply(cluster)
    cnpg.wait_healthy(k8s, "pg-xyz")

    made = k8s.get("pvc", "pg-xyz-1", "-n", NS)
    owner = k8s.get("cluster.postgresql.cnpg.io", "pg-xyz", "-n", NS)
    expected = json.loads(json.dumps(seed))
    expected["metadata"]["ownerReferences"][0]["uid"] = owner["metadata"]["uid"]
    expected["metadata"]["annotations"]["cnpg.io/operatorVersion"] = "1.30.0"
    for key, value in expected["metadata"]["annotations"].items():
        assert made["metadata"]["annotations"].get(key) == value, key
    refs = [
        {k: r.get(k) for k in ("apiVersion", "controller", "kind", "name", "uid")}
        for r in made["metadata"]["ownerReferences"]
    ]
    assert refs == expected["metadata"]["ownerReferences"]
    for key in ("accessModes", "resources", "storageClassName", "volumeMode"):
        assert made["spec"][key] == expected["spec"][key], key
    ref = made["spec"]["dataSourceRef"]
    assert (ref.get("apiGroup", ""), ref["kind"], ref["name"]) == (
        "",
        "PersistentVolumeClaim",
        "pgdata-empty",
    )
    assert made["status"]["phase"] == "Bound"
    assert made["status"]["capacity"]["storage"] == "6400Gi"
    # Mounted by the real instance pod, which serves the source's data.
    pod = k8s.get("pod", "pg-xyz-1", "-n", NS)
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert "pg-xyz-1" in claims
    assert pod["status"]["phase"] == "Running"
    assert int(cnpg.psql(k8s, "pg-xyz-1", "SELECT count(*) FROM pgbench_accounts")) == (
        PGBENCH_SCALE * 100000
    )


def _phase(k8s: OneNodeCluster, claim: str, ns: str = NS) -> str:
    result = k8s.kubectl(
        "get", "pvc", claim, "-n", ns, "-o", "jsonpath={.status.phase}", check=False
    )
    return result.stdout.strip()


def test_deleting_a_cluster_and_its_claims_removes_directories_and_records(
    k8s: OneNodeCluster,
) -> None:
    guids = {
        _pv_of(k8s, claim)["spec"]["csi"]["volumeHandle"] for claim in ("pg-xyz-1", "pgdata-empty")
    }
    assert guids <= _volume_dirs()
    cnpg.delete_cluster(k8s, "pg-xyz")
    k8s.kubectl("delete", "pvc", "pgdata-empty", "-n", NS, "--wait=true", "--timeout=60s")
    _wait_removed(k8s, "the claims' volumes removed", guids, 60)
    k8s.wait(
        "their records removed",
        lambda: not [r for r in _records(k8s) if r["spec"]["guid"] in guids],
        60,
    )
    pvs = {pv["spec"]["csi"]["volumeHandle"] for pv in k8s.get("pv")["items"]}
    assert not guids & pvs


def _claim(name: str, source: str = "", size: str = "1Gi") -> dict[str, Any]:
    spec: dict[str, Any] = {
        "storageClassName": "pg-reflinker",
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    }
    if source:
        spec["dataSource"] = {"kind": "PersistentVolumeClaim", "name": source}
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def _shell_pod(name: str, claim: str, script: str) -> dict[str, Any]:
    """A pod that mounts `claim` at /data and runs `script` (as CNPG's uid, with fsGroup 26)."""

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "securityContext": {"runAsUser": 26, "runAsGroup": 26, "fsGroup": 26},
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "shell",
                    "image": images.POSTGRES,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", script],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }


def _pod_phase(k8s: OneNodeCluster, name: str) -> str:
    result = k8s.kubectl(
        "get", "pod", name, "-n", NS, "-o", "jsonpath={.status.phase}", check=False
    )
    return result.stdout.strip()


def test_node_plugin_restart_keeps_mounts_and_registers_again(k8s: OneNodeCluster) -> None:
    clone_pod = cnpg.primary_pod(k8s, CLONE)
    old_name = node_plugin(k8s)["metadata"]["name"]
    k8s.kubectl("delete", "pod", old_name, "-n", "pg-reflinker", "--wait=true", "--timeout=60s")
    # While no node plugin runs, the mounted clone keeps serving reads and writes.
    cnpg.psql(k8s, clone_pod, "INSERT INTO only_in_clone VALUES (2)")
    k8s.wait_rollout("daemonset/pg-reflinker-node", "pg-reflinker")
    new_name = node_plugin(k8s)["metadata"]["name"]
    k8s.wait(
        "the new node plugin registered with kubelet",
        lambda: (
            "kubelet registered pg-reflinker.csi"
            in k8s.kubectl(
                "logs", new_name, "-n", "pg-reflinker", "-c", "node-driver-registrar", check=False
            ).stdout
        ),
        60,
    )
    assert cnpg.psql(k8s, clone_pod, "SELECT count(*) FROM only_in_clone") == "2"
    # kubelet reaches the new plugin: a new volume is published into a new pod.
    k8s.apply(_claim("after-restart"))
    k8s.apply(_shell_pod("after-restart", "after-restart", "echo written > /data/f && sleep 600"))
    k8s.wait("pod after-restart Running", lambda: _pod_phase(k8s, "after-restart") == "Running", 90)
    guid = _pv_of(k8s, "after-restart")["spec"]["csi"]["volumeHandle"]
    k8s.wait("the pod's write on the volume", lambda: (PREFIX / guid / "f").exists(), 30)
    assert (PREFIX / guid / "f").read_text() == "written\n"
    k8s.kubectl("delete", "pod", "after-restart", "-n", NS, "--wait=true", "--timeout=60s")
    k8s.kubectl("delete", "pvc", "after-restart", "-n", NS, "--wait=true", "--timeout=60s")
    k8s.wait("volume after-restart removed", lambda: guid not in _volume_dirs(), 60)


def _driver_pods(k8s: OneNodeCluster) -> dict[str, str]:
    """The driver's running pods: name -> image of its first container."""
    pods = k8s.get("pods", "-n", "pg-reflinker")["items"]
    return {
        p["metadata"]["name"]: p["spec"]["containers"][0]["image"]
        for p in pods
        if not p["metadata"].get("deletionTimestamp") and p["status"].get("phase") == "Running"
    }


def _new_clone_boots(k8s: OneNodeCluster, name: str, source: str) -> None:
    """A clone of the source claim, made now, mounted by a pod that finds the data in it; then
    deleted, its volume (PV, record) gone."""
    k8s.apply(_claim(name, source=source, size="8Gi"))
    k8s.apply(_shell_pod(name, name, "test -s /data/pgdata/PG_VERSION && echo found && sleep 600"))
    k8s.wait(f"pod {name} Running", lambda: _pod_phase(k8s, name) == "Running", 120)
    k8s.wait(
        f"pod {name} found the clone's data",
        lambda: "found" in k8s.kubectl("logs", name, "-n", NS, check=False).stdout,
        60,
    )
    guid = str(_pv_of(k8s, name)["spec"]["csi"]["volumeHandle"])
    k8s.kubectl("delete", "pod", name, "-n", NS, "--wait=true", "--timeout=60s")
    k8s.kubectl("delete", "pvc", name, "-n", NS, "--wait=true", "--timeout=60s")
    k8s.wait(
        f"the volume of claim {name} deleted",
        lambda: all(r["spec"]["guid"] != guid for r in _records(k8s)),
        120,
    )


def test_helm_upgrade_while_databases_serve_then_uninstall_and_install_again(
    k8s: OneNodeCluster, source: str
) -> None:
    """helm upgrade to another image tag while the source Cluster runs on a pg-reflinker volume
    and its clone pg-prod-dev is mounted: the node plugin and both controller replicas roll, a
    bounded pgbench run on the source across the upgrade completes with no failed transaction,
    the clone keeps serving, and a new clone works after it. Then helm uninstall and install:
    the CRD, the records and the volumes stay, and the volumes are still served."""
    clone_pod = cnpg.primary_pod(k8s, CLONE)
    before = _driver_pods(k8s)
    upgraded = tag_image(k8s, images.PROJECT, "upgraded")
    load = cnpg.pgbench_background(k8s, source, 40)
    started = time.monotonic()
    k8s.helm(
        "upgrade",
        "pg-reflinker",
        str(chart.CHART),
        "-n",
        "pg-reflinker",
        "--reuse-values",
        "--set",
        "image.tag=upgraded",
        "--wait",
        "--timeout",
        "180s",
    )
    k8s.wait_rollout("daemonset/pg-reflinker-node", "pg-reflinker")
    k8s.wait_rollout("deployment/pg-reflinker-controller", "pg-reflinker")
    print(f"\nhelm upgrade rolled both plugins in {time.monotonic() - started:.1f} s")
    out, _ = load.communicate(timeout=180)
    assert load.returncode == 0, out
    assert "number of failed transactions: 0" in out, out
    after = _driver_pods(k8s)
    assert not set(before) & set(after), "every driver pod should have been replaced"
    assert set(after.values()) == {upgraded}, after
    assert len(cnpg.pgbench_sums(k8s, source)) == 1
    cnpg.psql(k8s, clone_pod, "INSERT INTO only_in_clone VALUES (3)")
    _new_clone_boots(k8s, "after-upgrade", source)

    # Uninstall: the CRD (from the chart's crds/), the records and the data stay.
    records = {r["spec"]["guid"] for r in _records(k8s)}
    k8s.helm("uninstall", "pg-reflinker", "-n", "pg-reflinker", "--wait", "--timeout", "120s")
    try:
        k8s.wait("the driver's pods gone", lambda: not _driver_pods(k8s), 120)
        assert {r["spec"]["guid"] for r in _records(k8s)} == records
        assert cnpg.psql(k8s, clone_pod, "SELECT count(*) FROM only_in_clone") == "3"
    finally:
        # Installed again whatever happened: the scenarios after this one need the driver.
        helm_install(k8s, "--wait", "--timeout", "180s")
    k8s.wait("the node plugin registered with kubelet", lambda: driver_registered(k8s), 60)
    # The clone's Cluster restarted: its volume is published again by the new node plugin.
    k8s.kubectl("delete", "pod", clone_pod, "-n", NS, "--wait=true", "--timeout=60s")
    cnpg.wait_healthy(k8s, CLONE)
    assert cnpg.psql(k8s, cnpg.primary_pod(k8s, CLONE), "SELECT count(*) FROM only_in_clone") == "3"
    _new_clone_boots(k8s, "after-reinstall", source)


def _lease_holder(k8s: OneNodeCluster, lease: str) -> str:
    value = k8s.get("lease", lease, "-n", "pg-reflinker")
    return str(value["spec"].get("holderIdentity") or "")


def _controller_pods(k8s: OneNodeCluster) -> list[str]:
    pods = k8s.get(
        "pods", "-n", "pg-reflinker", "-l", "app.kubernetes.io/name=pg-reflinker-controller"
    )
    return [
        p["metadata"]["name"] for p in pods["items"] if not p["metadata"].get("deletionTimestamp")
    ]


def test_the_leading_controller_pod_deleted_during_a_clone_the_other_replica_binds_it(
    k8s: OneNodeCluster, source: str
) -> None:
    """deploy/ runs two controller replicas. The pod whose csi-provisioner leads is deleted
    while a clone is in progress: the other replica's csi-provisioner takes the lease over and
    its controller finishes the clone, within about a lease duration; nothing is left half-made
    and the source leaves backup mode."""
    # csi-provisioner's lease is named after the driver; its holder is "<pod name>" or starts
    # with it.
    leases = "pg-reflinker-csi"
    pods = _controller_pods(k8s)
    assert len(pods) == 2, pods
    k8s.wait("a csi-provisioner leader", lambda: _lease_holder(k8s, leases), 60)
    leader = next(p for p in pods if _lease_holder(k8s, leases).startswith(p))
    k8s.apply(_claim("restart-clone", source=source, size="8Gi"))

    def reserved() -> bool:
        return any(r["spec"].get("claim", "").endswith("restart-clone") for r in _records(k8s))

    k8s.wait("the clone's record (CreateVolume has started)", reserved, 60)
    # As when its node is lost: no replacement can start (the only node is cordoned), so the
    # other replica must take over.
    k8s.kubectl("cordon", NODE)
    try:
        k8s.kubectl(
            "delete", "pod", leader, "-n", "pg-reflinker", "--grace-period=1", "--wait=false"
        )
        start = time.monotonic()
        k8s.wait("claim restart-clone Bound", lambda: _phase(k8s, "restart-clone") == "Bound", 90)
        took = time.monotonic() - start
        successor = _lease_holder(k8s, leases)
    finally:
        k8s.kubectl("uncordon", NODE)
    print(f"\nclaim Bound {took:.1f} s after the leading controller pod was deleted")
    [survivor] = [p for p in pods if p != leader]
    assert successor.startswith(survivor), (successor, survivor)
    # Within a lease duration (15 s), retries and the clone itself.
    assert took < 60, took
    k8s.wait_rollout("deployment/pg-reflinker-controller", "pg-reflinker")

    guid = _pv_of(k8s, "restart-clone")["spec"]["csi"]["volumeHandle"]
    assert (PREFIX / guid / "pgdata" / "PG_VERSION").exists()
    # Exactly one volume, one record and one directory per claim; nothing half-made.
    handles = {pv["spec"]["csi"]["volumeHandle"] for pv in k8s.get("pv")["items"]}
    assert _volume_dirs() == handles
    assert sorted(r["spec"]["guid"] for r in _records(k8s)) == sorted(handles)
    source_guid = _pv_of(k8s, source)["spec"]["csi"]["volumeHandle"]
    assert not list((PREFIX / source_guid).glob(".pg-reflinker/*"))
    assert (
        cnpg.psql(
            k8s,
            source,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pg_reflinker%'",
        )
        == "0"
    )
    k8s.kubectl("delete", "pvc", "restart-clone", "-n", NS, "--wait=true", "--timeout=60s")
    k8s.wait("volume restart-clone removed", lambda: guid not in _volume_dirs(), 60)


def _claim_loop_terms(k8s: OneNodeCluster) -> list[tuple[str, str, str]]:
    """(since, until, pod) of every term each controller replica led the claim loop, from the
    bounds its log gives (its current and previous container); an open term ends "~"."""
    terms = []
    for pod in _controller_pods(k8s):
        for previous in ("--previous=true", "--previous=false"):
            logs = k8s.kubectl(
                "logs", pod, "-n", "pg-reflinker", "-c", "controller", previous, check=False
            ).stdout
            since = ""
            for line in logs.splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("lease") != "pg-reflinker-claim-loop":
                    continue
                if entry["msg"] == "leading":
                    since = entry["since"]
                elif "until" in entry and since:
                    terms.append((since, entry["until"], pod))
                    since = ""
            if since:
                terms.append((since, "~", pod))
    return sorted(terms)


def _mounts_of(target: str) -> int:
    return sum(
        1 for line in Path("/proc/self/mountinfo").read_text().splitlines() if f" {target} " in line
    )


def test_api_server_frozen_past_the_lease_during_a_clone_then_kubelet_restarted(
    k8s: OneNodeCluster, source: str
) -> None:
    """kube-apiserver is frozen (SIGSTOP) for longer than the claim loop's lease while a clone
    is in progress: the replicas never both lead (from their logs), the clone is bound once the
    API server is back, nothing is orphaned. Then kubelet is restarted while that clone and the
    clone cluster's volume are published: both stay mounted once, their pods keep running, and
    the clone is unpublished and removed normally afterwards."""
    k8s.apply(_claim("frozen-api", source=source, size="8Gi"))
    k8s.wait(
        "the clone's record (CreateVolume has started)",
        lambda: any(r["spec"].get("claim", "").endswith("frozen-api") for r in _records(k8s)),
        60,
    )
    apiserver = k8s.plane.process("kube-apiserver")
    apiserver.send_signal(signal.SIGSTOP)
    try:
        time.sleep(20)  # the fault: longer than the lease (15 s) and every renew deadline
    finally:
        apiserver.send_signal(signal.SIGCONT)
    start = time.monotonic()
    k8s.wait("claim frozen-api Bound", lambda: _phase(k8s, "frozen-api") == "Bound", 240)
    print(f"\nclaim Bound {time.monotonic() - start:.1f} s after the API server came back")
    terms = _claim_loop_terms(k8s)
    print("claim-loop terms:", *terms, sep="\n  ")
    assert terms
    for (_, until, pod), (since, _, next_pod) in itertools.pairwise(terms):
        assert until != "~" and until <= since, f"{pod} led until {until}, {next_pod} from {since}"
    guid = _pv_of(k8s, "frozen-api")["spec"]["csi"]["volumeHandle"]
    handles = {pv["spec"]["csi"]["volumeHandle"] for pv in k8s.get("pv")["items"]}
    assert _volume_dirs() == handles
    assert sorted(r["spec"]["guid"] for r in _records(k8s)) == sorted(handles)
    slots = "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pg_reflinker%'"
    assert cnpg.psql(k8s, source, slots) == "0"

    # kubelet restarted with the clone published in a pod and the clone cluster running.
    k8s.apply(_shell_pod("frozen-api", "frozen-api", "sleep 600"))
    k8s.wait("pod frozen-api Running", lambda: _pod_phase(k8s, "frozen-api") == "Running", 90)
    clone_pod = cnpg.primary_pod(k8s, CLONE)
    pods = {p: k8s.get("pod", p, "-n", NS) for p in ("frozen-api", clone_pod)}
    targets = {
        p: f"/var/lib/kubelet/pods/{pod['metadata']['uid']}/volumes/kubernetes.io~csi"
        for p, pod in pods.items()
    }
    published = {
        p: [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if f" {t}/" in line
        ]
        for p, t in targets.items()
    }
    assert all(len(m) >= 1 for m in published.values()), published
    kubelet = k8s.daemons["kubelet"]
    args = [str(a) for a in kubelet.process.args]  # type: ignore[union-attr]
    kubelet.process.terminate()
    kubelet.process.wait(30)
    restarted = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    k8s.spawn("kubelet", args)
    k8s.wait("the restarted kubelet's node status", lambda: _ready_since(k8s, restarted), 120)
    # kubelet's volume manager finds the mounts again; it mounts nothing twice.
    k8s.wait(
        "kubelet's pods seen Running again",
        lambda: all(_pod_phase(k8s, p) == "Running" for p in pods),
        60,
    )
    for p, mounts in published.items():
        assert all(_mounts_of(m) == 1 for m in mounts), (p, mounts)
    for p, pod in pods.items():
        now = k8s.get("pod", p, "-n", NS)
        assert now["metadata"]["uid"] == pod["metadata"]["uid"]
        restarts = [c["restartCount"] for c in now["status"]["containerStatuses"]]
        assert restarts == [c["restartCount"] for c in pod["status"]["containerStatuses"]], p
    # The clone's database kept its volume: it writes (once kubelet serves exec again).
    write = "CREATE TABLE IF NOT EXISTS after_kubelet (i int); INSERT INTO after_kubelet VALUES (1)"
    k8s.wait("a write on the clone", lambda: _psql_ok(k8s, clone_pod, write), 60)
    k8s.kubectl("delete", "pod", "frozen-api", "-n", NS, "--wait=true", "--timeout=60s")
    assert all(_mounts_of(m) == 0 for m in published["frozen-api"])
    k8s.kubectl("delete", "pvc", "frozen-api", "-n", NS, "--wait=true", "--timeout=60s")
    k8s.wait("volume frozen-api removed", lambda: guid not in _volume_dirs(), 60)
    # The CNPG operator lost its own lease in the freeze and restarts with kubelet's backoff:
    # the scenarios after this one need its webhook answering again.
    k8s.wait("CNPG's webhook answering again", lambda: _cnpg_webhook_answers(k8s), 240)


def _cnpg_webhook_answers(k8s: OneNodeCluster) -> bool:
    spec = cnpg.example("source-cluster.yaml", metadata__name="webhook-check")
    manifest = yaml.safe_dump(spec)
    done = k8s.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False)
    return done.returncode == 0


def _psql_ok(k8s: OneNodeCluster, pod: str, sql: str) -> bool:
    try:
        cnpg.psql(k8s, pod, sql)
    except AssertionError:
        return False
    return True


def _ready_since(k8s: OneNodeCluster, since: str) -> bool:
    """The node Ready, as reported by a kubelet at `since` or later."""
    node = k8s.get("node", NODE)
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    return bool(ready) and ready[0]["status"] == "True" and ready[0]["lastHeartbeatTime"] >= since


def test_a_cluster_with_only_the_grants_and_a_wal_volume_is_cloned_natively(
    k8s: OneNodeCluster,
) -> None:
    """deploy/examples/source-cluster-native.yaml: no reflink_snapshot(), PGDATA and WAL on two
    volumes. A new Cluster made from it under pgbench load boots from a native hot clone (the
    controller ran pg_backup_start/stop, the node plugin copied data and WAL). Then CNPG's
    offline volumeSnapshot Backup of it, and a Cluster with a WAL volume restored from that."""
    cnpg.ensure_namespace(k8s)
    k8s.apply(cnpg.example("source-cluster-native.yaml"))
    cnpg.wait_healthy(k8s, "pg-lean")
    source = cnpg.primary_pod(k8s, "pg-lean")
    assert (
        cnpg.psql(k8s, source, "SELECT to_regproc('reflink_snapshot') IS NULL", db="postgres")
        == "t"
    )
    cnpg.pgbench(k8s, source, "-i", "-s", "5", "-q")
    load = cnpg.pgbench_background(k8s, source, seconds=20)
    try:
        k8s.wait(
            "pgbench transactions on pg-lean",
            lambda: int(cnpg.psql(k8s, source, "SELECT count(*) FROM pgbench_history")) > 0,
            60,
        )
        clone_spec = cnpg.example("clone-cluster.yaml", metadata__name="pg-lean-dev")
        clone_spec["spec"]["bootstrap"]["recovery"]["volumeSnapshots"]["storage"]["name"] = source
        k8s.apply(clone_spec)
        cnpg.wait_healthy(k8s, "pg-lean-dev")
    finally:
        out, _ = load.communicate(timeout=120)
    assert load.returncode == 0, f"pgbench on the source failed: {out}"
    pod = cnpg.primary_pod(k8s, "pg-lean-dev")
    sums = cnpg.pgbench_sums(k8s, pod)
    assert len(sums) == 1 and sums != {"0"}, f"pgbench invariant in the clone: {sums}"
    cnpg.amcheck(k8s, pod)
    assert int(cnpg.psql(k8s, pod, "SELECT count(*) FROM pgbench_accounts")) == 500000

    pv = _pv_of(k8s, pod)
    guid = pv["spec"]["csi"]["volumeHandle"]
    record = _record_for(k8s, guid)
    assert record["spec"]["cloneMode"] == "hot" and record["spec"]["cloneMethod"] == "native"
    assert pv["spec"]["csi"]["volumeAttributes"]["pg-reflinker.csi/clone-method"] == "native"
    # The source's WAL lived on its own volume; the clone's pg_wal is a directory of its own.
    assert (PREFIX / guid / "pgdata" / "pg_wal").is_dir()
    assert not (PREFIX / guid / "pgdata" / "pg_wal").is_symlink()
    assert cnpg.hot_clone_seconds(k8s, guid) is not None
    assert cnpg.psql(k8s, source, "SELECT count(*) FROM pg_replication_slots", db="postgres") == "0"
    _controller_killed_with_a_native_copy_in_hand(k8s, source)

    restored_guids = _offline_backup_and_restore(k8s, source)
    guids = {
        guid,
        *restored_guids,
        *(_pv_of(k8s, c)["spec"]["csi"]["volumeHandle"] for c in (source, f"{source}-wal")),
    }
    cnpg.delete_cluster(k8s, "pg-lean-dev")
    cnpg.delete_cluster(k8s, "pg-lean")
    _wait_removed(k8s, "the volumes removed", guids, 240)
    assert not [p for p in PREFIX.iterdir() if p.name.endswith(".partial")]


def _controller_killed_with_a_native_copy_in_hand(k8s: OneNodeCluster, source: str) -> None:
    """The leading replica's controller is SIGKILLed while its session holds the source in
    backup mode and the node plugin has the Copy step in hand (frozen, so the moment is
    certain), under pgbench load. PostgreSQL aborts the backup and drops the slot; the copy the
    node plugin makes once thawed is never put in place; the retry, a new attempt of the same
    volume, binds a clone that boots and passes amcheck and pgbench's invariant."""
    slots = "SELECT count(*) FROM pg_replication_slots"
    holder = _lease_holder(k8s, "pg-reflinker-csi")
    [leader] = [p for p in _controller_pods(k8s) if holder.startswith(p)]
    leader_pod = k8s.get("pod", leader, "-n", "pg-reflinker")
    node = node_plugin(k8s)
    node_pids = container_pids(node, "node")
    size = k8s.get("pvc", source, "-n", NS)["spec"]["resources"]["requests"]["storage"]
    load = cnpg.pgbench_background(k8s, source, seconds=30)
    try:
        for pid in node_pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            k8s.apply(_claim("lean-killed", source=source, size=size))

            def copy_asked() -> dict[str, Any] | None:
                for r in _records(k8s):
                    if r["spec"].get("claim", "").endswith("/lean-killed"):
                        step = (r["spec"].get("backup") or {}).get("step")
                        return r if step == "Copy" else None
                return None

            first = k8s.wait("the Copy step handed to the node plugin", copy_asked, 90)
            assert cnpg.psql(k8s, source, slots, db="postgres") == "1"  # in backup mode
            for pid in container_pids(leader_pod, "controller"):
                os.kill(pid, signal.SIGKILL)
        finally:
            for pid in node_pids:
                os.kill(pid, signal.SIGCONT)
        k8s.wait(
            "the source out of backup mode",
            lambda: cnpg.psql(k8s, source, slots, db="postgres") == "0",
            60,
        )
        k8s.wait("claim lean-killed Bound", lambda: _phase(k8s, "lean-killed") == "Bound", 180)
    finally:
        out, _ = load.communicate(timeout=120)
    assert load.returncode == 0, f"pgbench on the source failed: {out}"
    guid = _pv_of(k8s, "lean-killed")["spec"]["csi"]["volumeHandle"]
    record = _record_for(k8s, guid)
    assert guid == first["spec"]["guid"]  # the same volume
    assert record["spec"]["backup"]["attempt"] != first["spec"]["backup"]["attempt"]
    assert not [p for p in PREFIX.iterdir() if p.name.endswith(".partial")]
    k8s.apply(_boot_pod("boot-killed", ["lean-killed"]))
    k8s.wait(
        "the boot pod to finish",
        lambda: _pod_phase(k8s, "boot-killed") in ("Succeeded", "Failed"),
        300,
    )
    logs = k8s.kubectl("logs", "boot-killed", "-n", NS).stdout
    assert _pod_phase(k8s, "boot-killed") == "Succeeded", logs[-3000:]
    [sums] = [line.split()[2] for line in logs.splitlines() if line.startswith("sums ")]
    assert len(set(sums.split(","))) == 1 and sums.split(",")[0] != "0", sums
    k8s.kubectl("delete", "pod", "boot-killed", "-n", NS, "--wait=true", "--timeout=60s")
    k8s.kubectl("delete", "pvc", "lean-killed", "-n", NS, "--wait=true", "--timeout=60s")
    k8s.wait("volume lean-killed removed", lambda: guid not in _volume_dirs(), 60)


def _offline_backup(k8s: OneNodeCluster, cluster: str) -> list[dict[str, Any]]:
    """deploy/examples/backup-offline.yaml for `cluster`: CNPG fences the instance, shuts its
    PostgreSQL down and snapshots each of its claims, which pg-reflinker copies cold; then it
    lifts the fence. The Backup's elements (name and type of each VolumeSnapshot)."""
    k8s.kubectl(
        "patch",
        "cluster.postgresql.cnpg.io",
        cluster,
        "-n",
        NS,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"backup": {"volumeSnapshot": {"className": "pg-reflinker"}}}}),
    )
    elements = _backup(k8s, "backup-offline.yaml", cluster)
    for element in elements:
        snapshot = k8s.get("volumesnapshot", element["name"], "-n", NS)
        content = k8s.get(
            "volumesnapshotcontent", snapshot["status"]["boundVolumeSnapshotContentName"]
        )
        record = _record_for(k8s, content["status"]["snapshotHandle"])
        assert record["spec"]["cloneMode"] == "cold", record["spec"]
    # The fence is lifted and the source serves again.
    cnpg.wait_healthy(k8s, cluster)
    return elements


def _backup(k8s: OneNodeCluster, example: str, cluster: str) -> list[dict[str, Any]]:
    """A CNPG Backup from deploy/examples/`example`, named <cluster>-<online|offline>, once
    completed: its elements (name and type of each VolumeSnapshot)."""
    backup = cnpg.example(example)
    kind = "online" if backup["spec"].get("online", True) else "offline"
    name = backup["metadata"]["name"] = f"{cluster}-{kind}"
    backup["spec"]["cluster"]["name"] = cluster
    began = time.monotonic()
    k8s.apply(backup)

    def phase() -> str:
        found = [b for b in _backups(k8s) if b["metadata"]["name"] == name]
        return str(found[0].get("status", {}).get("phase", "")) if found else ""

    k8s.wait(f"Backup {name} completed", lambda: phase() in ("completed", "failed"), 300)
    done = next(b for b in _backups(k8s) if b["metadata"]["name"] == name)
    assert done["status"]["phase"] == "completed", done.get("status")
    print(f"\n{kind} Backup of {cluster} completed in {time.monotonic() - began:.1f} s")
    elements: list[dict[str, Any]] = done["status"]["snapshotBackupStatus"]["elements"]
    return elements


def _forget_backup(k8s: OneNodeCluster, cluster: str, elements: list[dict[str, Any]]) -> None:
    _forget(k8s, f"{cluster}-offline", elements)


def _forget(k8s: OneNodeCluster, backup: str, elements: list[dict[str, Any]]) -> None:
    k8s.kubectl("delete", "backups.postgresql.cnpg.io", backup, "-n", NS)
    for element in elements:
        k8s.kubectl("delete", "volumesnapshot", element["name"], "-n", NS, "--wait=true")


def _offline_backup_and_restore(k8s: OneNodeCluster, source: str) -> set[str]:
    """CNPG's offline Backup of pg-lean (PGDATA and WAL), then
    deploy/examples/restore-cluster-wal.yaml: a new Cluster with a WAL volume from that Backup.
    The guids of the restored Cluster's volumes."""
    # A snapshot of the running instance's WAL claim alone is refused, saying what to do.
    k8s.apply(_volume_snapshot("pg-lean-wal-alone", f"{source}-wal"))

    def refusal() -> str:
        snapshot = k8s.get("volumesnapshot", "pg-lean-wal-alone", "-n", NS)
        message = str(snapshot.get("status", {}).get("error", {}).get("message", ""))
        return message if "holds the PG_WAL volume" in message else ""

    message = k8s.wait("the refusal of a snapshot of the WAL claim alone", refusal, 60)
    assert f"PGDATA claim {source} " in message and "offline Backup" in message, message
    k8s.kubectl("delete", "volumesnapshot", "pg-lean-wal-alone", "-n", NS, "--wait=false")
    rows = cnpg.psql(k8s, source, "SELECT count(*) FROM pgbench_history")
    elements = _offline_backup(k8s, "pg-lean")
    assert sorted(e["type"] for e in elements) == ["PG_DATA", "PG_WAL"], elements
    k8s.apply(cnpg.example("restore-cluster-wal.yaml"))
    cnpg.wait_healthy(k8s, "pg-lean-restored")
    pod = cnpg.primary_pod(k8s, "pg-lean-restored")
    assert cnpg.psql(k8s, pod, "SELECT count(*) FROM pgbench_history") == rows
    sums = cnpg.pgbench_sums(k8s, pod)
    assert len(sums) == 1 and sums != {"0"}, f"pgbench invariant in the restored copy: {sums}"
    cnpg.amcheck(k8s, pod)
    # Its WAL is on its own WAL volume, as the source's was.
    data = _pv_of(k8s, pod)["spec"]["csi"]["volumeHandle"]
    wal = _pv_of(k8s, f"{pod}-wal")["spec"]["csi"]["volumeHandle"]
    assert (PREFIX / data / "pgdata" / "pg_wal").is_symlink()
    assert any((PREFIX / wal).rglob("0000000*"))
    cnpg.delete_cluster(k8s, "pg-lean-restored")
    _forget_backup(k8s, "pg-lean", elements)
    return {data, wal}


# Two tables, one in the tablespace, one in the default tablespace, changed by the same
# transactions: they agree in any consistent copy of the instance.
LEDGERS = (
    "CREATE TABLE ledger (id int PRIMARY KEY, total bigint NOT NULL) TABLESPACE archive; "
    "CREATE TABLE mirror (id int PRIMARY KEY, total bigint NOT NULL); "
    "INSERT INTO ledger SELECT g, 0 FROM generate_series(1, 100) g; "
    "INSERT INTO mirror SELECT g, 0 FROM generate_series(1, 100) g"
)
MOVES = (
    "DO $$ BEGIN FOR i IN 1..3000 LOOP "
    "UPDATE ledger SET total = total + i WHERE id = i % 100 + 1; "
    "UPDATE mirror SET total = total + i WHERE id = i % 100 + 1; "
    "COMMIT; END LOOP; END $$"
)
AGREE = (
    "SELECT (SELECT sum(total) FROM ledger) || ',' || (SELECT sum(total) FROM mirror) || ',' || "
    "(SELECT t.spcname FROM pg_class c JOIN pg_tablespace t ON t.oid = c.reltablespace "
    "WHERE c.relname = 'ledger')"
)


# Every transaction of the load moves the same amount in both tables (a pgbench custom script).
MOVES_SCRIPT = """\\set id random(1, 100)
\\set d random(1, 1000)
BEGIN;
UPDATE ledger SET total = total + :d WHERE id = :id;
UPDATE mirror SET total = total + :d WHERE id = :id;
END;
"""


def _agreeing_copy(k8s: OneNodeCluster, cluster: str) -> str:
    """The primary of `cluster`, checked: both tables agree, the ledger is in the tablespace,
    amcheck passes, PGDATA's pg_wal links to the instance's WAL volume, which holds WAL, and the
    tablespace's files are on its own volume."""
    pod = cnpg.primary_pod(k8s, cluster)
    total, mirrored, space = cnpg.psql(k8s, pod, AGREE).split(",")
    assert total == mirrored != "0" and space == "archive", (cluster, total, mirrored, space)
    cnpg.amcheck(k8s, pod)
    data, wal, tablespace = (
        PREFIX / _pv_of(k8s, c)["spec"]["csi"]["volumeHandle"]
        for c in (pod, f"{pod}-wal", f"{pod}-tbs-archive")
    )
    assert (data / "pgdata" / "pg_wal").is_symlink(), f"{cluster}: pg_wal is not on its volume"
    assert any((wal / "pg_wal").glob("0000000*")), f"{cluster}: no WAL on the WAL volume"
    assert any(tablespace.glob("data/PG_*")), f"{cluster}: the tablespace is not on its volume"
    return pod


def _under_moves(k8s: OneNodeCluster, pod: str, seconds: int) -> Any:
    load = cnpg.pgbench_background(k8s, pod, seconds=seconds, script=MOVES_SCRIPT)
    k8s.wait(
        "the moves under way",
        lambda: int(cnpg.psql(k8s, pod, "SELECT sum(total) FROM mirror")) > 0,
        60,
    )
    return load


def _ended(load: Any) -> None:
    out, _ = load.communicate(timeout=180)
    assert load.returncode == 0, f"the load on the source failed: {out}"


def _captures(k8s: OneNodeCluster) -> list[dict[str, Any]]:
    return [r for r in _records(k8s) if r["spec"].get("kind") == "capture"]


def _function_refused_for_tablespaces(k8s: OneNodeCluster, pod: str) -> None:
    """A claim of a new instance through a StorageClass with cloneMethod function: refused in
    one line that names the native method; nothing is left behind."""
    k8s.apply(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": "pg-reflinker-function"},
            "provisioner": "pg-reflinker.csi",
            "parameters": {"cloneMethod": "function"},
            "volumeBindingMode": "Immediate",
        }
    )
    claim = _claim("pg-fn-1", source=pod, size="8Gi")
    claim["spec"]["storageClassName"] = "pg-reflinker-function"
    claim["metadata"]["labels"] = {"cnpg.io/instanceName": "pg-fn-1", "cnpg.io/pvcRole": "PG_DATA"}
    k8s.apply(claim)
    refused = k8s.wait(
        "the function refused",
        lambda: [m for m in _events_of(k8s, "pg-fn-1", NS) if "does not copy" in m],
        120,
    )
    assert "cloneMethod native or auto" in refused[0] and "\n" not in refused[0], refused[0]
    k8s.kubectl("delete", "pvc", "pg-fn-1", "-n", NS, "--wait=true")
    k8s.kubectl("delete", "storageclass", "pg-reflinker-function")
    k8s.wait("no capture left", lambda: not _captures(k8s), 60)


def _abandoned_capture_expires_and_a_late_sibling_is_refused(k8s: OneNodeCluster, pod: str) -> None:
    snapshot = _volume_snapshot("pg-spaces-lonely", pod)
    snapshot["metadata"]["labels"] = {"cnpg.io/backupName": "never-completed"}
    k8s.apply(snapshot)
    k8s.wait("the lonely snapshot ready", lambda: _snapshot_ready(k8s, "pg-spaces-lonely"), 120)
    captures = _captures(k8s)
    assert len(captures) == 1, captures
    held = captures[0]["spec"]["context"]["pg-reflinker.csi/pieces"]
    assert held == "PG_DATA,PG_WAL,PG_TABLESPACE:archive", held
    directory = PREFIX / ".pg-reflinker" / "captures" / captures[0]["spec"]["guid"]
    assert directory.is_dir()
    began = time.monotonic()
    k8s.wait("the abandoned capture expired", lambda: not _captures(k8s), 150)
    print(f"\nabandoned capture removed {time.monotonic() - began:.1f} s after the snapshot")
    k8s.wait("its directory removed", lambda: not directory.exists(), 60)
    assert cnpg.psql(k8s, pod, "SELECT count(*) FROM pg_replication_slots", db="postgres") == "0"
    in_backup = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg-reflinker'"
    assert cnpg.psql(k8s, pod, in_backup, db="postgres") == "0"

    late = _volume_snapshot("pg-spaces-late", f"{pod}-wal")
    late["metadata"]["labels"] = {"cnpg.io/backupName": "never-completed"}
    k8s.apply(late)

    def refusal() -> str:
        found = k8s.get("volumesnapshot", "pg-spaces-late", "-n", NS)
        message = str(found.get("status", {}).get("error", {}).get("message", ""))
        return message if "must come from one capture" in message else ""

    message = k8s.wait("the late sibling refused", refusal, 90)
    assert "start over" in message and not _captures(k8s), message
    for name in ("pg-spaces-late", "pg-spaces-lonely"):
        k8s.kubectl("delete", "volumesnapshot", name, "-n", NS, "--wait=true")


def test_a_cluster_with_wal_and_a_tablespace_is_copied_whole_online_and_offline(
    k8s: OneNodeCluster,
) -> None:
    """deploy/examples/source-cluster-tablespace.yaml: PGDATA, WAL and a tablespace on three
    pg-reflinker volumes, native grants only, two tables (one in the tablespace) changed by
    every transaction of a bounded pgbench script. Under that load: a new Cluster from the three
    running claims (clone-cluster-whole.yaml), CNPG's online volumeSnapshot Backup
    (backup-online.yaml) and its offline one (backup-offline.yaml), each restored: every copy
    has both tables in agreement (they would not if the pieces came from different moments),
    passes amcheck, and has its WAL and tablespace on volumes of their own. The three claims of
    one new instance share one capture, which is gone once its pieces are cut."""
    cnpg.ensure_namespace(k8s)
    k8s.apply(cnpg.example("source-cluster-tablespace.yaml"))
    cnpg.wait_healthy(k8s, "pg-spaces")
    pod = cnpg.primary_pod(k8s, "pg-spaces")
    cnpg.psql(k8s, pod, LEDGERS)
    guids: set[str] = set()
    # reflink_snapshot() installed too: cloneMethod auto must still take the native method,
    # the only one that copies tablespaces, and cloneMethod function is refused.
    function = (Path(__file__).parents[2] / "deploy/postgres/reflink_snapshot.sql").read_text()
    k8s.kubectl(
        "exec",
        "-i",
        "-n",
        NS,
        pod,
        "-c",
        "postgres",
        "--",
        "psql",
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        "postgres",
        input=function,
    )
    _function_refused_for_tablespaces(k8s, pod)

    # A new Cluster from the running claims.
    load = _under_moves(k8s, pod, seconds=30)
    try:
        began = time.monotonic()
        k8s.apply(cnpg.example("clone-cluster-whole.yaml"))
        cnpg.wait_healthy(k8s, "pg-spaces-dev")
        print(f"\nnew Cluster from the three running claims: {time.monotonic() - began:.1f} s")
    finally:
        _ended(load)
    copy = _agreeing_copy(k8s, "pg-spaces-dev")
    pieces = [
        _record_for(k8s, _pv_of(k8s, c)["spec"]["csi"]["volumeHandle"])
        for c in (copy, f"{copy}-wal", f"{copy}-tbs-archive")
    ]
    assert len({r["spec"]["capture"] for r in pieces}) == 1, [r["spec"] for r in pieces]
    assert {r["spec"]["context"]["pg-reflinker.csi/piece"] for r in pieces[1:]} == {
        "PG_WAL",
        "PG_TABLESPACE:archive",
    }
    assert all(r["spec"]["cloneMethod"] == "native" for r in pieces)
    k8s.wait("the capture removed once its pieces are cut", lambda: not _captures(k8s), 60)
    assert not list((PREFIX / ".pg-reflinker" / "captures").glob("*"))
    assert cnpg.psql(k8s, pod, "SELECT count(*) FROM pg_replication_slots", db="postgres") == "0"
    guids |= {r["spec"]["guid"] for r in pieces}
    cnpg.delete_cluster(k8s, "pg-spaces-dev")

    # CNPG's online volumeSnapshot Backup, restored.
    k8s.kubectl(
        "patch",
        "cluster.postgresql.cnpg.io",
        "pg-spaces",
        "-n",
        NS,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"backup": {"volumeSnapshot": {"className": "pg-reflinker"}}}}),
    )
    load = _under_moves(k8s, pod, seconds=20)
    try:
        online = _backup(k8s, "backup-online.yaml", "pg-spaces")
    finally:
        _ended(load)
    assert sorted(e["type"] for e in online) == ["PG_DATA", "PG_TABLESPACE", "PG_WAL"]
    restored = cnpg.example("source-cluster-tablespace.yaml", metadata__name="pg-spaces-online")
    restored["spec"]["bootstrap"] = {"recovery": {"backup": {"name": "pg-spaces-online"}}}
    k8s.apply(restored)
    cnpg.wait_healthy(k8s, "pg-spaces-online")
    _agreeing_copy(k8s, "pg-spaces-online")
    k8s.wait("the Backup's capture removed", lambda: not _captures(k8s), 60)
    cnpg.delete_cluster(k8s, "pg-spaces-online")
    _forget(k8s, "pg-spaces-online", online)

    # A group that never completes: a snapshot of the PGDATA claim labelled as part of a CNPG
    # Backup that takes no other. Its capture waits CAPTURE_WAIT (60 s in the test overlay),
    # then goes, leaving no directory, slot or backup; a sibling that comes later is refused.
    _abandoned_capture_expires_and_a_late_sibling_is_refused(k8s, pod)

    # CNPG's offline Backup (the instance fenced: each claim copied cold), restored.
    elements = _offline_backup(k8s, "pg-spaces")
    assert sorted(e["type"] for e in elements) == ["PG_DATA", "PG_TABLESPACE", "PG_WAL"]
    restored = cnpg.example("source-cluster-tablespace.yaml", metadata__name="pg-spaces-restored")
    restored["spec"]["bootstrap"] = {"recovery": {"backup": {"name": "pg-spaces-offline"}}}
    k8s.apply(restored)
    cnpg.wait_healthy(k8s, "pg-spaces-restored")
    restored_pod = _agreeing_copy(k8s, "pg-spaces-restored")
    guids |= {
        _pv_of(k8s, c)["spec"]["csi"]["volumeHandle"]
        for p in (pod, restored_pod)
        for c in (p, f"{p}-wal", f"{p}-tbs-archive")
    }
    cnpg.delete_cluster(k8s, "pg-spaces-restored")
    cnpg.delete_cluster(k8s, "pg-spaces")
    _forget_backup(k8s, "pg-spaces", elements)
    _wait_removed(k8s, "the volumes removed", guids, 240)


SNAPSHOTS = "snapshot.storage.k8s.io"
# The pgbench invariant, one sum a query (the boot pod's script quotes nothing).
SUMS = (
    "SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts",
    "SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches",
    "SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers",
    "SELECT coalesce(sum(delta), 0) FROM pgbench_history",
)


def _volume_snapshot(name: str, claim: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{SNAPSHOTS}/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "volumeSnapshotClassName": "pg-reflinker",
            "source": {"persistentVolumeClaimName": claim},
        },
    }


def _claim_from_snapshot(name: str, snapshot: str) -> dict[str, Any]:
    claim = _claim(name, size="8Gi")
    claim["spec"]["dataSource"] = {
        "apiGroup": SNAPSHOTS,
        "kind": "VolumeSnapshot",
        "name": snapshot,
    }
    return claim


def _snapshot_ready(k8s: OneNodeCluster, name: str) -> bool:
    result = k8s.kubectl("get", "volumesnapshot", name, "-n", NS, "-o", "json", check=False)
    return result.returncode == 0 and bool(
        json.loads(result.stdout).get("status", {}).get("readyToUse")
    )


def _boot_pod(name: str, claims: list[str]) -> dict[str, Any]:
    """One pod that starts PostgreSQL on each claim in turn (as CNPG's uid, with no TLS and no
    archiving), prints the pgbench sums, runs pg_amcheck and stops it."""

    script = (
        "set -eu; echo 'local all all trust' > /tmp/hba; : > /tmp/ident; "
        f"for i in $(seq 0 {len(claims) - 1}); do d=/data/$i/pgdata; "
        "pg_ctl -D $d -w -t 180 -l /tmp/log-$i -o \"-c listen_addresses='' "
        "-c unix_socket_directories=/tmp -c ssl=off -c archive_mode=off -c hba_file=/tmp/hba "
        '-c ident_file=/tmp/ident -c logging_collector=off -c log_destination=stderr" start '
        "|| { cat /tmp/log-$i; exit 1; }; "
        + "s=; "
        + "".join(f's="$s$(psql -h /tmp -U postgres -d app -Atc "{q}"),"; ' for q in SUMS)
        + 'echo "sums $i ${s%,}"; '
        "pg_amcheck -h /tmp -U postgres --heapallindexed --install-missing -d app; "
        "pg_ctl -D $d -m fast -w stop; done; echo booted all"
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "securityContext": {"runAsUser": 26, "runAsGroup": 26, "fsGroup": 26},
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "boot",
                    "image": images.POSTGRES,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", script],
                    "volumeMounts": [
                        {"name": f"c{i}", "mountPath": f"/data/{i}"} for i in range(len(claims))
                    ],
                }
            ],
            "volumes": [
                {"name": f"c{i}", "persistentVolumeClaim": {"claimName": c}}
                for i, c in enumerate(claims)
            ],
        },
    }


def _backups(k8s: OneNodeCluster) -> list[dict[str, Any]]:
    return list(k8s.get("backups.postgresql.cnpg.io", "-n", NS)["items"])


def test_volume_snapshots_of_a_running_cluster_feed_five_volumes_and_cnpg_backups_and_recovery(
    k8s: OneNodeCluster, source: str
) -> None:
    # A VolumeSnapshot of the running instance's PGDATA claim, taken under pgbench load.
    load = cnpg.pgbench_background(k8s, source, seconds=20)
    try:
        k8s.wait(
            "pgbench transactions on the source",
            lambda: int(cnpg.psql(k8s, source, "SELECT count(*) FROM pgbench_history")) > 0,
            60,
        )
        k8s.apply(_volume_snapshot("golden", source))
        k8s.wait("VolumeSnapshot golden readyToUse", lambda: _snapshot_ready(k8s, "golden"), 120)
    finally:
        out, _ = load.communicate(timeout=120)
    assert load.returncode == 0, f"pgbench on the source failed: {out}"
    golden = k8s.get("volumesnapshot", "golden", "-n", NS)
    content = k8s.get("volumesnapshotcontent", golden["status"]["boundVolumeSnapshotContentName"])
    golden_guid = content["status"]["snapshotHandle"]
    record = _record_for(k8s, golden_guid)
    assert record["spec"]["kind"] == "snapshot" and record["spec"]["cloneMode"] == "hot"
    snapshot_dir = PREFIX / ".pg-reflinker" / "snapshots" / golden_guid
    assert (snapshot_dir / "pgdata" / "backup_label").is_file()

    # Five claims from it at once: all Bound (reflink copies; no database involved), all boot.
    claims = [f"golden-{i}" for i in range(5)]
    k8s.apply([_claim_from_snapshot(c, "golden") for c in claims])
    k8s.wait("five claims Bound", lambda: all(_phase(k8s, c) == "Bound" for c in claims), 120)
    k8s.apply(_boot_pod("boot-golden", claims))
    k8s.wait(
        "the boot pod to finish",
        lambda: _pod_phase(k8s, "boot-golden") in ("Succeeded", "Failed"),
        600,
    )
    logs = k8s.kubectl("logs", "boot-golden", "-n", NS).stdout
    assert _pod_phase(k8s, "boot-golden") == "Succeeded", logs[-3000:]
    sums = [line.split()[2] for line in logs.splitlines() if line.startswith("sums ")]
    assert len(sums) == 5, logs[-3000:]
    for each in sums:
        parts = set(each.split(","))
        assert len(parts) == 1 and parts != {"0"}, f"pgbench invariant in a clone: {each}"
    clone_guids = {_pv_of(k8s, c)["spec"]["csi"]["volumeHandle"] for c in claims}

    # CNPG's own volume snapshot backups on our VolumeSnapshotClass (online, the defaults).
    k8s.kubectl(
        "patch",
        "cluster.postgresql.cnpg.io",
        SOURCE,
        "-n",
        NS,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"backup": {"volumeSnapshot": {"className": "pg-reflinker"}}}}),
    )
    k8s.apply(
        {
            "apiVersion": "postgresql.cnpg.io/v1",
            "kind": "Backup",
            "metadata": {"name": "pg-prod-snap", "namespace": NS},
            "spec": {"method": "volumeSnapshot", "cluster": {"name": SOURCE}},
        }
    )

    def backup_phase(name: str) -> str:
        found = [b for b in _backups(k8s) if b["metadata"]["name"] == name]
        return str(found[0].get("status", {}).get("phase", "")) if found else ""

    k8s.wait(
        "Backup pg-prod-snap completed",
        lambda: backup_phase("pg-prod-snap") in ("completed", "failed"),
        300,
    )
    backup = next(b for b in _backups(k8s) if b["metadata"]["name"] == "pg-prod-snap")
    assert backup["status"]["phase"] == "completed", backup.get("status")
    [element] = backup["status"]["snapshotBackupStatus"]["elements"]
    backup_snapshot = element["name"]

    # A ScheduledBackup makes them on schedule (every 20 s here).
    k8s.apply(
        {
            "apiVersion": "postgresql.cnpg.io/v1",
            "kind": "ScheduledBackup",
            "metadata": {"name": "pg-prod-often", "namespace": NS},
            "spec": {
                "schedule": "*/20 * * * * *",
                "method": "volumeSnapshot",
                "cluster": {"name": SOURCE},
            },
        }
    )

    def scheduled_done() -> int:
        return len(
            [
                b
                for b in _backups(k8s)
                if b["metadata"]["name"].startswith("pg-prod-often")
                and b.get("status", {}).get("phase") == "completed"
            ]
        )

    k8s.wait("two scheduled backups completed", lambda: scheduled_done() >= 2, 240)
    k8s.kubectl("delete", "scheduledbackup.postgresql.cnpg.io", "pg-prod-often", "-n", NS)

    # A new Cluster recovered from the backup's VolumeSnapshot alone (no WAL archive).
    restored = cnpg.example("clone-cluster.yaml", metadata__name="pg-prod-restored")
    restored["spec"]["bootstrap"]["recovery"]["volumeSnapshots"]["storage"] = {
        "name": backup_snapshot,
        "kind": "VolumeSnapshot",
        "apiGroup": SNAPSHOTS,
    }
    k8s.apply(restored)
    cnpg.wait_healthy(k8s, "pg-prod-restored")
    pod = cnpg.primary_pod(k8s, "pg-prod-restored")
    assert (
        int(cnpg.psql(k8s, pod, "SELECT count(*) FROM pgbench_accounts")) == PGBENCH_SCALE * 100000
    )
    assert len(cnpg.pgbench_sums(k8s, pod)) == 1
    cnpg.amcheck(k8s, pod)
    restored_guid = _pv_of(k8s, pod)["spec"]["csi"]["volumeHandle"]

    # Delete the source Cluster, then the snapshots, then the volumes made from them.
    snapshot_guids = set()
    for item in k8s.get("volumesnapshot", "-n", NS)["items"]:
        bound = item.get("status", {}).get("boundVolumeSnapshotContentName")
        if bound:
            snapshot_guids.add(k8s.get("volumesnapshotcontent", bound)["status"]["snapshotHandle"])
    assert golden_guid in snapshot_guids and len(snapshot_guids) >= 4
    cnpg.delete_cluster(k8s, SOURCE)
    k8s.kubectl("delete", "backups.postgresql.cnpg.io", "--all", "-n", NS, "--wait=true")
    k8s.kubectl(
        "delete", "volumesnapshot", "--all", "-n", NS, "--wait=true", "--timeout=120s", timeout=150
    )
    snapshots = PREFIX / ".pg-reflinker" / "snapshots"
    k8s.wait(
        "the snapshots' directories removed",
        lambda: not any((snapshots / g).exists() for g in snapshot_guids),
        120,
    )
    k8s.kubectl("delete", "pod", "boot-golden", "-n", NS, "--wait=true")
    cnpg.delete_cluster(k8s, "pg-prod-restored")
    k8s.kubectl("delete", "pvc", *claims, "-n", NS, "--wait=true", "--timeout=120s", timeout=150)
    gone = clone_guids | {restored_guid}
    k8s.wait("the volumes removed", lambda: not (gone & _volume_dirs()), 120)
    # The node agent drops a record's finalizer right after removing its directory.
    k8s.wait(
        "their records removed",
        lambda: not [r for r in _records(k8s) if r["spec"]["guid"] in gone | snapshot_guids],
        60,
    )


def test_every_driver_container_stayed_within_its_memory_limit(k8s: OneNodeCluster) -> None:
    """Last, after every scenario: the highest memory use of each container (what deploy/'s
    requests and limits are sized from, docs/install.md), none OOM-killed."""
    peaks = memory_peaks(k8s)
    print()
    for where, peak, limit in peaks:
        print(f"{peak / (1 << 20):8.1f} MiB of {limit >> 20:4d} MiB  {where}")
    for where, peak, limit in peaks:
        assert peak < limit, where
    for pod in k8s.get("pods", "-n", "pg-reflinker")["items"]:
        for status in pod["status"].get("containerStatuses", []):
            ended = status.get("lastState", {}).get("terminated") or {}
            assert ended.get("reason") != "OOMKilled", (pod["metadata"]["name"], status["name"])
