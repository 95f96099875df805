"""The PostgreSQL majors this machine's Debian release does not ship, from Debian's own packages:
bookworm has 15, trixie 17 and forky 18. Each suite becomes a minbase debootstrap root under
PG_ROOTS with postgresql-<major> installed by apt's dependency rules, and its PostgreSQL programs
are made to run from that root on this host: patchelf points their ELF interpreter and library
path at the root's own glibc and libraries. PostgreSQL finds its share and lib directories from
where its binary is, so the root needs no chroot, and the programs run as the host's postgres
user on the host's paths. PostgreSQL 16 is in none of these suites, so it is not tested.

Built once per root (a `.relocated` marker); `python -m tests.tools.pgmajors` is what
`make pg-majors` runs. The roots live outside /root so the postgres user can reach them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests import timings
from tests.e2e.images import debian_mirror
from tests.pgserver import PG_ROOTS, pg_majors

# Debian suite -> the PostgreSQL major it ships. bookworm's 15 comes from the host's packages.
SUITES = {"trixie": 17, "forky": 18}
# debootstrap in bookworm has no script for forky; sid's is the one for every later suite.
SCRIPT = "/usr/share/debootstrap/scripts/sid"
# What a test or a bench never reads: a cluster made by the package's postinst, docs, locales.
TRIM = (
    "var/lib/postgresql",
    "etc/postgresql",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "var/cache/apt",
)


def is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def relocate(root: Path, major: int) -> None:
    """Point each PostgreSQL program of root at root's dynamic loader and libraries."""
    loader = (root / "lib64" / "ld-linux-x86-64.so.2").resolve()
    libs = f"{root}/usr/lib/x86_64-linux-gnu:{root}/usr/lib/postgresql/{major}/lib"
    for program in sorted((root / f"usr/lib/postgresql/{major}/bin").iterdir()):
        if program.is_file() and not program.is_symlink() and is_elf(program):
            subprocess.run(
                [
                    "patchelf",
                    "--set-interpreter",
                    str(loader),
                    "--force-rpath",
                    "--set-rpath",
                    libs,
                    str(program),
                ],
                check=True,
            )


def build(suite: str, major: int) -> None:
    root = PG_ROOTS / suite
    marker = root / ".relocated"
    if marker.exists():
        return
    began = time.monotonic()
    print(f"PostgreSQL {major}: debootstrap of Debian {suite} into {root} (once)", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    for parent in (root.parent.parent, root.parent):
        parent.chmod(0o755)  # the postgres user runs the programs
    result = subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include=postgresql-{major}",
            suite,
            str(root),
            debian_mirror(),
            SCRIPT,
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"debootstrap of {suite} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    for junk in TRIM:
        shutil.rmtree(root / junk, ignore_errors=True)
    relocate(root, major)
    bindir = root / "usr/lib/postgresql" / str(major) / "bin"
    version = subprocess.run(
        [str(bindir / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    marker.write_text(version + "\n")
    seconds = time.monotonic() - began
    print(f"  {version} in {seconds:.0f} s", flush=True)
    timings.record(f"PostgreSQL {major} (debootstrap {suite})", seconds)


def main() -> None:
    for suite, major in SUITES.items():
        build(suite, major)
    print(
        "PostgreSQL majors here: "
        + ", ".join(f"{major} ({path})" for major, path in pg_majors().items())
    )


if __name__ == "__main__":
    main()
