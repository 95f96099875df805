"""The package's layering, checked on the source: the domain core imports no gRPC, Kubernetes or
PostgreSQL client, and only the adapters import their client library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "reflinker_csi"

# package -> top-level modules it must not import (directly or through another layer)
FORBIDDEN = {
    "core": {"grpc", "csi", "kubernetes", "urllib3", "psycopg"}
    | {f"reflinker_csi.{p}" for p in ("rpc", "kube", "pg", "standalone", "disk", "cli", "config")},
    "disk": {"grpc", "csi", "kubernetes", "urllib3", "psycopg"}
    | {f"reflinker_csi.{p}" for p in ("rpc", "kube", "pg", "standalone")},
    "standalone": {"grpc", "csi", "kubernetes", "urllib3", "psycopg"}
    | {f"reflinker_csi.{p}" for p in ("rpc", "kube")},
    "kube": {"grpc", "csi"} | {f"reflinker_csi.{p}" for p in ("rpc", "standalone")},
    "pg": {"grpc", "csi", "kubernetes", "urllib3"}
    | {f"reflinker_csi.{p}" for p in ("rpc", "kube", "standalone", "disk")},
    "rpc": {"kubernetes", "urllib3", "psycopg"} | {f"reflinker_csi.{p}" for p in ("kube", "pg")},
}


def imports_of(path: Path, root: Path) -> set[str]:
    """Absolute names of every module path imports (relative imports resolved)."""
    module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def violations(package: str, root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        for name in sorted(imports_of(path, root)):
            for forbidden in FORBIDDEN[package]:
                if name == forbidden or name.startswith(forbidden + "."):
                    bad.append(f"{path.relative_to(root.parent)} imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(package: str) -> None:
    assert violations(package) == []


def test_the_rule_catches_an_import_it_forbids(tmp_path: Path) -> None:
    """The checker itself finds a forbidden import (so an empty list above means something)."""
    root = tmp_path / "reflinker_csi"
    (root / "core").mkdir(parents=True)
    (root / "core" / "probe.py").write_text("from ..kube.api import Kube\nimport grpc\n")
    assert violations("core", root) == [
        "reflinker_csi/core/probe.py imports grpc",
        "reflinker_csi/core/probe.py imports reflinker_csi.kube.api",
        "reflinker_csi/core/probe.py imports reflinker_csi.kube.api.Kube",
    ]


# The Kubernetes framework (API client, field reading, events, views of Kubernetes' objects,
# informers, queues and leader election): what the loops build on, knowing nothing of them.
KUBE_FRAMEWORK = ("api", "fields", "events", "model", "runtime")


def test_the_kube_framework_imports_no_domain_code() -> None:
    allowed = {f"reflinker_csi.kube.{m}" for m in KUBE_FRAMEWORK} | {"reflinker_csi.core.errors"}
    bad = []
    for module in KUBE_FRAMEWORK:
        path = PACKAGE / "kube" / f"{module}.py"
        for name in sorted(imports_of(path, PACKAGE)):
            if name.startswith("reflinker_csi.") and not any(
                name == a or name.startswith(a + ".") for a in allowed
            ):
                bad.append(f"kube/{module}.py imports {name}")
    assert bad == []
