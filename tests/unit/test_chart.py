"""The Helm chart (charts/pg-reflinker) with helm built from its Go module: lint, its values
schema refusing wrong values by name, what the values change in the manifests, and deploy/ and
the chart's README generated from it (make deploy)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tools import chart

pytestmark = pytest.mark.skipif(
    not os.environ.get("HELM_TOOLS"), reason="HELM_TOOLS unset (make helm-tools builds helm)"
)


def documents(*args: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(chart.template(*args)) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def containers(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, dict[str, Any]]:
    spec = one(docs, kind, name)["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


def test_deploy_is_the_charts_default_rendering() -> None:
    """deploy/ (kubectl apply -k) is generated from the chart: a change to one without the
    other fails here, naming the file and the command that fixes it."""
    expected = chart.deploy_files()
    present = {p.name for p in chart.DEPLOY.glob("*.yaml")} - set(chart.OWN)
    assert present == set(expected), "run make deploy: deploy/ has other files than the chart"
    for name, text in expected.items():
        assert (chart.DEPLOY / name).read_text() == text, f"run make deploy: deploy/{name} differs"


def test_the_charts_readme_is_generated_and_describes_every_value() -> None:
    readme = (chart.CHART / "README.md").read_text()
    assert readme == chart.readme(), "run make deploy: the chart's README differs from values.yaml"
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "---" not in line]
    values = {row.split("|")[1].strip().strip("`"): row.split("|")[-2].strip() for row in rows[1:]}
    assert "storageClasses" in values and "controller.captureWait" in values, values.keys()
    undescribed = [key for key, description in values.items() if not description]
    assert undescribed == [], f"values without a '# --' comment in values.yaml: {undescribed}"


@pytest.mark.parametrize("program", chart.HELMS)
@pytest.mark.parametrize("name", list(chart.VALUE_SETS))
def test_helm_lint_strict_passes_with_helm_3_and_4(name: str, program: str) -> None:
    args = chart.VALUE_SETS[name]
    result = chart.helm("lint", "--strict", str(chart.CHART), *args, check=False, program=program)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", list(chart.VALUE_SETS))
def test_helm_3_renders_what_helm_4_renders(name: str) -> None:
    args = chart.VALUE_SETS[name]
    # The same objects (the two differ only in blank lines between documents).
    helm3 = list(yaml.safe_load_all(chart.template(*args, program="helm3")))
    assert helm3 == list(yaml.safe_load_all(chart.template(*args)))


@pytest.mark.parametrize(
    "setting, needle",
    [
        ("storageClasses[0].cloneMethod=fast", "cloneMethod"),
        ("hostPathPrefix=var/lib/pg-reflinker", "hostPathPrefix"),
        ("hostPathPrefix=/var/lib/../../etc", "hostPathPrefix"),
        ("controller.replicas=0", "replicas"),
        ("log.level=verbose", "level"),
        ("sourceNamespaces[0]=Apps_Prod", "sourceNamespaces"),
        ("node.freeSpaceFloor=lots", "freeSpaceFloor"),
        ("controler.replicas=3", "controler"),
        ("controller.backupModeLimit=600", "backupModeLimit"),
        ("storageClasses[0].maxSourceLag=soon", "maxSourceLag"),
        ("volumeSnapshotClass.maxSourceLag=-5s", "maxSourceLag"),
        ("storageClasses[0].volumeBindingMode=Later", "volumeBindingMode"),
        ("certMirrors[0].cluster=pg-prod", "cluster"),
    ],
)
@pytest.mark.parametrize("program", chart.HELMS)
def test_a_wrong_value_fails_at_install_naming_it(setting: str, needle: str, program: str) -> None:
    result = chart.helm(
        "template", "x", str(chart.CHART), "--set", setting, check=False, program=program
    )
    assert result.returncode != 0, f"{setting} was accepted"
    assert needle in result.stderr, result.stderr
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr


@pytest.mark.parametrize("program", chart.HELMS)
def test_a_statement_timeout_beyond_the_backup_budget_fails_at_install(program: str) -> None:
    """The controller refuses PG_STATEMENT_TIMEOUT above BACKUP_MODE_LIMIT at start; the chart
    refuses it at install, naming both values, instead of a controller that will not start."""
    result = chart.helm(
        "template",
        "x",
        str(chart.CHART),
        "--set",
        "controller.pgStatementTimeout=120",
        check=False,
        program=program,
    )
    assert result.returncode != 0, "a statement timeout above the backup budget was accepted"
    assert "controller.pgStatementTimeout=120" in result.stderr, result.stderr
    assert "controller.backupModeLimit (60)" in result.stderr, result.stderr
    rendered = chart.template("--set", "controller.backupModeLimit=120")
    [controller] = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"]
    [main] = [
        c for c in controller["spec"]["template"]["spec"]["containers"] if c["name"] == "controller"
    ]
    assert env(main)["BACKUP_MODE_LIMIT"] == env(main)["PG_STATEMENT_TIMEOUT"] == "120"


def test_values_shape_what_is_installed() -> None:
    docs = documents(*chart.VALUE_SETS["other-namespace-sources-two-classes-no-snapshots"])
    kinds = {d["kind"] for d in docs}
    # Snapshots off: no class, no sidecar, no snapshot rules.
    assert "VolumeSnapshotClass" not in kinds
    controller = containers(docs, "Deployment", "pg-reflinker-controller")
    assert "csi-snapshotter" not in controller
    rules = one(docs, "ClusterRole", "pg-reflinker-controller")["rules"]
    assert not [r for r in rules if "snapshot.storage.k8s.io" in r["apiGroups"]], rules
    # Two classes, the second the default and native; the claim loop serves both.
    native = one(docs, "StorageClass", "pg-reflinker-native")
    assert native["parameters"] == {"cloneMethod": "native", "maxSourceLag": "30s"}
    assert native["volumeBindingMode"] == "Immediate"
    # A class for a clone source's empty volumes: bound where its pod is scheduled.
    placed = one(docs, "StorageClass", "pg-reflinker-clone-source")
    assert placed["volumeBindingMode"] == "WaitForFirstConsumer"
    assert "parameters" not in placed
    assert native["metadata"]["annotations"] == {
        "storageclass.kubernetes.io/is-default-class": "true"
    }
    assert "parameters" not in one(docs, "StorageClass", "pg-reflinker")
    settings = env(controller["controller"])
    assert settings["STORAGE_CLASS"] == (
        "pg-reflinker,pg-reflinker-native,pg-reflinker-clone-source"
    )
    assert settings["NAMESPACE_PATH"] == "ledger,analytics"
    assert settings["HOSTPATH_PREFIX"] == "/srv/pg-reflinker"
    # A RoleBinding in each source namespace, for the release's own service account.
    for namespace in ("ledger", "analytics"):
        [binding] = [
            d
            for d in docs
            if d["kind"] == "RoleBinding" and d["metadata"].get("namespace") == namespace
        ]
        assert binding["roleRef"]["name"] == "pg-reflinker-source"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "pg-reflinker-controller", "namespace": "storage"}
        ]
    # Everything namespaced is in the release's namespace, and the admission policies name its
    # service accounts (a policy naming another namespace would let the real ones through).
    namespaced = [d for d in docs if "namespace" in d["metadata"] and d["kind"] != "RoleBinding"]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"storage"}
    policies = chart.template(*chart.VALUE_SETS["other-namespace-sources-two-classes-no-snapshots"])
    assert "system:serviceaccount:storage:pg-reflinker-node'" in policies
    assert "system:serviceaccount:storage:pg-reflinker-controller'" in policies
    assert not re.search(r"serviceaccount:pg-reflinker:|namespace=pg-reflinker\b", policies)
    # The node plugin: the prefix from the host at the same path, on the chosen nodes only.
    node = one(docs, "DaemonSet", "pg-reflinker-node")["spec"]["template"]["spec"]
    assert node["nodeSelector"] == {"pg-reflinker.csi/storage": "xfs"}
    prefix = next(v for v in node["volumes"] if v["name"] == "prefix")["hostPath"]
    assert prefix == {"path": "/srv/pg-reflinker", "type": "Directory"}
    assert env(node["containers"][0])["HOSTPATH_PREFIX"] == "/srv/pg-reflinker"


def test_the_default_rendering_installs_what_deploy_always_had() -> None:
    docs = documents()
    assert {d["kind"] for d in docs} >= {
        "CSIDriver",
        "StorageClass",
        "VolumeSnapshotClass",
        "Deployment",
        "DaemonSet",
        "PodDisruptionBudget",
        "ValidatingAdmissionPolicy",
        "ServiceAccount",
    }
    controller = containers(docs, "Deployment", "pg-reflinker-controller")
    assert list(controller) == [
        "controller",
        "csi-provisioner",
        "csi-snapshotter",
        "liveness-probe",
    ]
    assert controller["controller"]["image"] == "pg-reflinker:0.1.0"
    assert env(controller["controller"])["CAPTURE_WAIT"] == "600"
    # No Kind the cluster may lack unless asked for: the PodMonitor needs the Prometheus operator.
    assert "PodMonitor" not in {d["kind"] for d in docs}
    crd = yaml.safe_load((chart.CHART / "crds" / "reflinkvolume.yaml").read_text())
    assert crd["metadata"]["name"] == "reflinkvolumes.pg-reflinker.csi"
    assert Path(chart.CHART / "values.schema.json").exists()


def test_cert_mirrors_reach_the_controller_and_may_write_secrets_only_in_their_namespaces() -> None:
    docs = documents(
        "--set=certMirrors[0].cluster=apps/pg-prod",
        "--set=certMirrors[0].to=copies",
        "--set=certMirrors[1].cluster=ledger/pg-books",
        "--set=certMirrors[1].to=analytics",
    )
    controller = containers(docs, "Deployment", "pg-reflinker-controller")["controller"]
    assert env(controller)["CERT_MIRRORS"] == "apps/pg-prod:copies,ledger/pg-books:analytics"
    bindings = [
        d
        for d in docs
        if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "pg-reflinker-cert-mirror"
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["analytics", "copies"]
    role = one(docs, "ClusterRole", "pg-reflinker-cert-mirror")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "verbs": ["get", "create", "update", "delete"],
        }
    ]
    # Without mirrors, no variable and no binding; the controller's own role writes no secret.
    docs = documents()
    assert "CERT_MIRRORS" not in env(
        containers(docs, "Deployment", "pg-reflinker-controller")["controller"]
    )
    for rule in one(docs, "ClusterRole", "pg-reflinker-controller")["rules"]:
        assert "secrets" not in rule["resources"], rule
