"""docs/benchmarks.md is written by several benchmarks; each replaces only its own sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[2] / "docs"
REPORT = DOCS / "benchmarks.md"
HEADER = [
    "# Benchmarks",
    "",
    "Each benchmark writes its own sections of this page, each from one run on one machine:",
    "`make bench` (the real cluster with the CNPG operator, tests/bench/bench_cluster.py),",
    "`make bench-stack` (the driver's stack with kubelet and CNPG played,",
    "tests/bench/bench_stack.py), `make bench-clone`, `make bench-space` and `make bench-scale`",
    "(host benchmarks of the copy itself, tests/bench/).",
    "",
]


def write_section(name: str, lines: list[str]) -> None:
    """Replace the section `name` of docs/benchmarks.md (or add it), keeping the others."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    text = REPORT.read_text() if REPORT.exists() else ""
    block = "\n".join([begin, *lines, end])
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        if not text.startswith(HEADER[0]):
            text = "\n".join(HEADER) + "\n"
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.mkdir(exist_ok=True)
    REPORT.write_text(text)


def plot(
    rows: list[dict[str, Any]],
    lines: list[tuple[str, str]],
    runs: int,
    title: str,
    name: str,
    legend_size: int = 8,
) -> None:
    """docs/<name>: seconds against database size (log-log), one line per (key, label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["bytes"] / 2**30 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for key, label in lines:
        ax.plot(sizes, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("database size (GiB, pgbench)")
    ax.set_ylabel(f"seconds (median of {runs})")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    fig.savefig(DOCS / name)
