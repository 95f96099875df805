"""docs/benchmarks.md is written by two benchmarks; each replaces only its own section."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
REPORT = DOCS / "benchmarks.md"
HEADER = [
    "# Benchmarks",
    "",
    "Two benchmarks write this page, each its own section, from one run on one machine:",
    "`make bench` (a real one-node cluster with the CNPG operator, tests/bench/bench_cluster.py)",
    "and `make bench-stack` (the driver's stack with kubelet and CNPG played,",
    "tests/bench/bench_stack.py).",
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
