"""`make conformance`: the Kubernetes external storage e2e suites (e2e.test, built from the
pinned k8s.io/kubernetes module) against pg-reflinker on the real one-node cluster.

Runs the `External Storage [Driver: pg-reflinker.csi]` specs of tests/conformance/testdriver.yaml
with ginkgo in parallel, skipping what this cluster cannot provide (SKIPS), prints ginkgo's
summary and writes the per-suite table to docs/conformance.md."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT
from tests.e2e import images
from tests.e2e.onenode import OneNodeCluster, import_images, running_cluster

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "testdriver.yaml"
REGISTRY = "localhost/e2e"  # where KUBE_TEST_REPO_LIST points every e2e image

# Each skip and why this cluster cannot run it; nothing is skipped only because it fails.
SKIPS = {
    r"\[Disruptive\]": "restarts kubelet or the node, which would take the test cluster down",
    r"\[Serial\]": "needs the whole cluster to itself; the run is parallel",
    r"\[Feature:": "optional features this one-node cluster does not run (e.g. Windows, SELinux)",
    r"\[FeatureGate:": "alpha or beta feature gates that are off in the test cluster",
    r"should not mount / map unused volumes in a pod": "it inspects the node with HostExec, "
    "which enters PID 1's mount namespace (nsenter --mount=/proc/1/ns/mnt); on this machine "
    "PID 1 is the sandbox's init, whose namespaces root may not enter, so the check cannot run "
    "here (on a real node it does)",
}


def e2e_images(b: images.Builder, conformance_tools: Path, k8s_tools: Path) -> dict[str, Path]:
    context = b.store / "agnhost-context"
    context.mkdir(parents=True, exist_ok=True)
    shutil.copy2(conformance_tools / "agnhost", context / "agnhost")
    shutil.copy2(HERE / "images" / "agnhost" / "Containerfile", context / "Containerfile")
    agnhost = f"{REGISTRY}/agnhost:2.63.0"
    box = f"{REGISTRY}/busybox:1.37.0-1"
    archives = {
        agnhost: b.containerfile(
            agnhost, context, context / "Containerfile", [context / "agnhost"]
        ),
        box: images.busybox(b, box),
        # The pause image the suites name; our sandbox binary.
        f"{REGISTRY}/pause:3.10.2": b.single_binary(
            f"{REGISTRY}/pause:3.10.2", k8s_tools / "pause", "/pause", {}
        ),
    }
    # Images the suites only run shell commands in: the exec test's "nginx" gets busybox's
    # shell; "glibc-dns-testing" (a glibc shell for the multi-volume tests) gets Debian's.
    archives[f"{REGISTRY}/nginx:1.15-4"] = images.busybox(b, f"{REGISTRY}/nginx:1.15-4")
    b.debian_base()
    glibc = f"{REGISTRY}/glibc-dns-testing:2.0.0"
    archives[glibc] = b.alias(images.DEBIAN_BASE, glibc)
    archives[f"{REGISTRY}/agnhost:2.55"] = b.alias(agnhost, f"{REGISTRY}/agnhost:2.55")
    return archives


def repo_list(path: Path) -> Path:
    registries = {
        key: REGISTRY
        for key in (
            "promoterE2eRegistry",
            "gcRegistry",
            "gcEtcdRegistry",
            "privateRegistry",
            "sigStorageRegistry",
            "dockerLibraryRegistry",
            "cloudProviderGcpRegistry",
            "buildImageRegistry",
        )
    }
    path.write_text(yaml.safe_dump(registries))
    return path


def run_suites(k8s: OneNodeCluster, tools: Path, report: Path, procs: int) -> int:
    env = dict(os.environ, KUBE_TEST_REPO_LIST=str(repo_list(k8s.work / "repo-list.yaml")))
    args = [
        str(tools / "ginkgo"),
        f"--procs={procs}",
        "--no-color",
        "--timeout=3h",
        f"--json-report={report}",
        "--focus=External.Storage.*pg-reflinker.csi",
        "--skip=" + "|".join(SKIPS),
        str(tools / "e2e.test"),
        "--",
        f"--kubeconfig={k8s.kubeconfig}",
        f"--storage.testdriver={DRIVER}",
        "--provider=skeleton",
        f"--report-dir={k8s.work / 'e2e-report'}",
        "--allowed-not-ready-nodes=0",
        "--node-os-distro=debian",
    ]
    print("$ " + " ".join(args), flush=True)
    return subprocess.run(args, env=env, cwd=k8s.work, check=False).returncode


# "... [Testpattern: Dynamic PV (default fs)] [Slow] subPath should ...": the suite is the first
# word after the pattern and any bracketed labels.
SUITE = re.compile(r"\[Testpattern: ([^\]]+)\]\s+(?:\[[^\]]*\]\s+)*([^\s\[]+)")


def summarize(report: Path) -> dict[str, Any]:
    data = json.loads(report.read_text())
    rows: dict[str, Counter[str]] = defaultdict(Counter)
    skipped: dict[str, set[str]] = defaultdict(set)
    failed: list[str] = []
    for suite in data:
        for spec in suite.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It":
                continue
            text = " ".join(spec.get("ContainerHierarchyTexts") or []) + " " + spec["LeafNodeText"]
            if "pg-reflinker.csi" not in text:
                continue
            match = SUITE.search(text)
            name = match.group(2) if match else "other"
            state = spec["State"]
            rows[name][state] += 1
            if state == "skipped":
                message = (spec.get("Failure") or {}).get("Message", "") or "skipped by --skip"
                skipped[name].add(message.strip().splitlines()[0][:200])
            elif state not in ("passed",):
                failed.append(text)
    return {"rows": rows, "skipped": skipped, "failed": failed}


def write_doc(summary: dict[str, Any], seconds: float, procs: int) -> None:
    lines = [
        "# Kubernetes storage conformance",
        "",
        "`make conformance` (also the last step of `make test`) runs the external storage e2e",
        "suites of Kubernetes v1.36.1",
        "(`e2e.test`, `test/e2e/storage/external`) against pg-reflinker on the real one-node test",
        "cluster, with the capabilities declared in `tests/conformance/testdriver.yaml`.",
        f"Last run: {time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} minutes with {procs} ginkgo",
        "processes on the 2-core development machine.",
        "",
        "| suite | passed | skipped | failed |",
        "|---|---:|---:|---:|",
    ]
    for name, counts in sorted(summary["rows"].items()):
        bad = sum(v for k, v in counts.items() if k not in ("passed", "skipped"))
        lines.append(f"| {name} | {counts['passed']} | {counts['skipped']} | {bad} |")
    lines += ["", "## Skipped by this run's `--skip`", ""]
    lines += [f"- `{pattern}`: {why}" for pattern, why in SKIPS.items()]
    lines += ["", "## Skipped by the suites themselves, with their reasons", ""]
    for name, reasons in sorted(summary["skipped"].items()):
        for reason in sorted(reasons):
            lines.append(f"- {name}: {reason}")
    if summary["failed"]:
        lines += ["", "## Failed", ""]
        lines += [f"- {text}" for text in summary["failed"]]
    (ROOT / "docs" / "conformance.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    k8s_tools = Path(os.environ["K8S_TOOLS"])
    cnpg_tools = Path(os.environ["CNPG_TOOLS"])
    tools = Path(os.environ["CONFORMANCE_TOOLS"])
    procs = int(os.environ.get("CONFORMANCE_PROCS", "4"))
    started = time.monotonic()
    report = Path(tempfile.mkdtemp(prefix="pg-reflinker-conformance.")) / "report.json"
    b = images.Builder(images.tools_cache(), lambda s: print(f"== {s}", flush=True))
    archives = e2e_images(b, tools, k8s_tools)
    # deploy/ through kustomize here (the other scenarios install the chart with helm).
    with running_cluster(
        k8s_tools, cnpg_tools, announce=lambda s: print(f"== {s}"), install="kustomize"
    ) as k8s:
        import_images(k8s, archives)
        code = run_suites(k8s, tools, report, procs)
    summary = summarize(report)
    write_doc(summary, time.monotonic() - started, procs)
    for name, counts in sorted(summary["rows"].items()):
        print(f"{name:<28} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    states: Counter[str] = Counter()
    for counts in summary["rows"].values():
        states.update(counts)
    failed = sum(v for k, v in states.items() if k not in ("passed", "skipped"))
    print(f"wrote docs/conformance.md; ginkgo exit code {code}")
    print(f"conformance: {states['passed']} passed, {failed} failed, {states['skipped']} skipped")
    return code or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
