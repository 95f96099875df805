"""deploy/ and the chart's README, both generated from charts/pg-reflinker (`make deploy`).

deploy/ is the chart's rendering with its default values (release pg-reflinker in namespace
pg-reflinker), one file per template, and the chart's CRD; namespace.yaml and kustomization.yaml
are deploy/'s own. The README lists every value from the comments in values.yaml (helm-docs).
tests/unit/test_chart.py fails when deploy/ or the README differ from what this writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pg-reflinker"
DEPLOY = ROOT / "deploy"
# deploy/'s own files: kustomize's entry point and the namespace (Helm installs into one).
OWN = ("kustomization.yaml", "namespace.yaml")
RELEASE = NAMESPACE = "pg-reflinker"
# Value sets besides the defaults that the tests lint, render and dry-run on the real API server.
VALUE_SETS: dict[str, list[str]] = {
    "defaults": [],
    "other-namespace-sources-two-classes-no-snapshots": [
        "--namespace=storage",
        "--set=sourceNamespaces={ledger,analytics}",
        "--set=namespacePath={ledger,analytics}",
        "--set=hostPathPrefix=/srv/pg-reflinker",
        "--set=volumeSnapshotClass.enabled=false",
        "--set=storageClasses[0].name=pg-reflinker",
        "--set=storageClasses[1].name=pg-reflinker-native",
        "--set=storageClasses[1].cloneMethod=native",
        "--set=storageClasses[1].default=true",
        "--set=storageClasses[1].maxSourceLag=30s",
        "--set=storageClasses[2].name=pg-reflinker-clone-source",
        "--set=storageClasses[2].volumeBindingMode=WaitForFirstConsumer",
        "--set=node.nodeSelector.pg-reflinker\\.csi/storage=xfs",
    ],
    "one-replica-debug-text-logs-retained": [
        "--set=controller.replicas=1",
        "--set=log.level=debug",
        "--set=log.format=text",
        "--set=storageClasses[0].name=pg-reflinker-retained",
        "--set=storageClasses[0].reclaimPolicy=Retain",
        "--set=volumeSnapshotClass.name=pg-reflinker-retained",
        "--set=volumeSnapshotClass.deletionPolicy=Retain",
        "--set=image.repository=registry.example.org/pg-reflinker",
        "--set=image.pullPolicy=Always",
        "--set=metrics.auth=none",
        "--set=metrics.networkPolicy.enabled=false",
    ],
}
HEADER = "# Generated from charts/pg-reflinker by `make deploy`: change the chart, not this file.\n"


def tool(name: str) -> str:
    tools = os.environ.get("HELM_TOOLS", "")
    if not tools or not Path(tools, name).exists():
        raise FileNotFoundError(f"{name}: set HELM_TOOLS (make helm-tools builds it)")
    return str(Path(tools, name))


# The Helm majors the chart is tested with: helm is Helm 4, helm3 Helm 3.
HELMS = ("helm", "helm3")


def helm(*args: str, check: bool = True, program: str = "helm") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/pg-reflinker-helm/cache"}
    env |= {"HELM_CONFIG_HOME": "/tmp/pg-reflinker-helm/config"}
    env |= {"HELM_DATA_HOME": "/tmp/pg-reflinker-helm/data"}
    return subprocess.run(
        [tool(program), *args], capture_output=True, text=True, check=check, env=env
    )


def template(*args: str, program: str = "helm") -> str:
    """helm template of the chart as deploy/ is rendered, with more arguments (--set, -f)."""
    return helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args, program=program
    ).stdout


def split(rendered: str) -> dict[str, str]:
    """helm template's output by template file (each document comes after a
    '# Source: pg-reflinker/templates/<file>' line), the documents of one file joined by ---."""
    files: dict[str, list[str]] = {}
    for document in rendered.split("\n---\n"):
        source, _, body = document.removeprefix("---\n").partition("\n")
        if not source.startswith("# Source: pg-reflinker/templates/"):
            raise ValueError(f"helm template printed a document without its source: {source!r}")
        files.setdefault(source.rsplit("/", 1)[1], []).append(body.strip("\n") + "\n")
    return {name: HEADER + "---\n".join(documents) for name, documents in files.items()}


def deploy_files() -> dict[str, str]:
    """deploy/'s generated files, by name."""
    files = split(template())
    files["crd-reflinkvolume.yaml"] = HEADER + (CHART / "crds" / "reflinkvolume.yaml").read_text()
    return files


def readme() -> str:
    """The chart's README as helm-docs writes it from values.yaml's comments."""
    return subprocess.run(
        [
            tool("helm-docs"),
            "--dry-run",
            "--chart-search-root",
            str(CHART.parent),
            "--log-level",
            "error",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def main() -> int:
    files = deploy_files()
    stale = {p.name for p in DEPLOY.glob("*.yaml")} - set(files) - set(OWN)
    for name in sorted(stale):
        (DEPLOY / name).unlink()
        print(f"removed deploy/{name} (no template renders it)")
    for name, text in sorted(files.items()):
        (DEPLOY / name).write_text(text)
        print(f"wrote deploy/{name}")
    (CHART / "README.md").write_text(readme())
    print("wrote charts/pg-reflinker/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
