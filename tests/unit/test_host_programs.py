"""Every host program and host path the tests, image builds and scripts use comes from a Debian
package the Makefile installs, from the base system, or from the tool cache the Makefile builds.

A fresh machine has only what `make test` installs: a program that was installed by hand on the
machine a change was written on (busybox-static once) fails CI on the next fresh machine. This
finds the programs by reading the code (subprocess calls, `shutil.which`, absolute host paths,
the shell scripts and the Makefile's recipes) and asks dpkg who owns each one.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

MAKEFILE = ROOT / "Makefile"
PYTHON_SOURCES = ("reflinker_csi", "tests")
SCRIPTS = sorted((ROOT / "tests" / "tools").glob("*.sh"))
# Calls that start a host program: their first argument, or the first element of a list
# literal given to them, names it.
RUNNERS = {"run", "Popen", "check_output", "check_call", "call", "_run", "spawn", "which"}
# Calls whose first word is fixed (the program is the function itself).
WRAPPED = {"buildah": "buildah", "as_postgres": "runuser", "run_as_postgres": "runuser"}
HOST_PATH = re.compile(r"^/(usr/)?(s?bin|lib)/[\w./+-]+$")
# What every machine this runs on has without the Makefile installing it.
MACHINE = {
    "go": "the Go toolchain comes with the machine (README: Go 1.26 with the Go module proxy)",
    "python3": "the Python the venv is made from comes with the machine",
    "make": "`make test` itself runs in it",
}
SHELL_WORDS = {
    "if", "then", "else", "elif", "fi", "for", "do", "done", "while", "until", "case", "esac",
    "in", "function", "return", "exit", "set", "trap", "cd", "export", "local", "read", "echo",
    "printf", "test", "true", "false", "wait", "kill", "shift", "command", "status", "[", "[[",
    ":", "!", "{", "}", "break", "continue", "touch", "mkdir",
}  # fmt: skip


@dataclass(frozen=True)
class Use:
    """A program (a name looked up on PATH) or an absolute host path, and where it is used."""

    what: str
    where: str


def python_uses(path: Path) -> Iterator[Use]:
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT)
    tuples = {
        target.id: [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple | ast.List)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    loops = {
        node.target.id: tuples.get(node.iter.id, [])
        for node in ast.walk(tree)
        if isinstance(node, ast.For)
        and isinstance(node.target, ast.Name)
        and isinstance(node.iter, ast.Name)
    }

    def named(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Name):
            return [v for v in loops.get(node.id, []) if isinstance(v, str)]
        if isinstance(node, ast.List | ast.Tuple) and node.elts:
            return named(node.elts[0])
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Path" and node.args:
            return named(node.args[0])
        return []

    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in WRAPPED:
                yield Use(WRAPPED[name], where)
            if name in RUNNERS and node.args:
                first = node.args[0]
                # spawn(name, [program, ...]): the list names the program.
                if name == "spawn" and len(node.args) > 1:
                    first = node.args[1]
                for program in named(first):
                    if program and not program.startswith("-") and " " not in program:
                        yield Use(program, where)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            # pg_bin() / "pg_ctl", or self.bin / "pg_ctl" in PostgresServer: a PostgreSQL
            # program of the Debian server package (this machine's major; 17's and 18's are
            # the same programs in the roots `make pg-majors` builds).
            left, right = node.left, node.right
            server_bin = (
                rel.name == "pgserver.py"
                and isinstance(left, ast.Attribute)
                and left.attr == "bin"
                and getattr(left.value, "id", "") == "self"
            )
            if (
                server_bin
                or (isinstance(left, ast.Call) and getattr(left.func, "id", "") == "pg_bin")
            ) and isinstance(right, ast.Constant):
                yield Use(f"/usr/lib/postgresql/*/bin/{right.value}", where)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and HOST_PATH.match(node.value)
            and not node.value.endswith("/")
        ):
            yield Use(node.value, where)


def shell_uses(path: Path, text: str, recipes_only: bool = False) -> Iterator[Use]:
    """The first word of each simple command: at a line's start, after |, &&, ||, ; and $(."""
    rel = path.relative_to(ROOT)
    functions = set(re.findall(r"^\s*(\w+)\(\)\s*\{", text, re.M))
    for number, line in enumerate(text.splitlines(), 1):
        if recipes_only:
            if not line.startswith("\t"):
                continue
            line = line.lstrip("\t@-")
        line = line.split(" #", 1)[0].strip()
        if line.startswith("#"):
            continue
        # Quoted text is an argument, never a command of its own.
        line = re.sub(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'', "QUOTED", line)
        for segment in re.split(r"\|\||&&|\||;|\$\(|`", line):
            words = segment.split()
            if words[:1] in (["for"], ["case"], ["select"]) or (words and words[0].endswith(")")):
                continue  # a loop variable, a case pattern
            # Skip keywords and VAR=value prefixes.
            while words and (words[0] in SHELL_WORDS or re.match(r"^\w+=", words[0])):
                words = words[1:]
            if not words:
                continue
            word = words[0].strip("\"'()")
            if re.fullmatch(r"[a-z][\w.+-]*", word) and word not in SHELL_WORDS | functions:
                yield Use(word, f"{rel}:{number}")


def all_uses() -> list[Use]:
    uses: list[Use] = []
    for top in PYTHON_SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path != Path(__file__).resolve():
                uses.extend(python_uses(path))
    for script in SCRIPTS:
        uses.extend(shell_uses(script, script.read_text()))
    uses.extend(shell_uses(MAKEFILE, makefile_text(), recipes_only=True))
    return uses


def makefile_text() -> str:
    return MAKEFILE.read_text().replace("\\\n", " ")


def debian_packages() -> list[str]:
    match = re.search(r"^DEBIAN_PACKAGES\s*:?=\s*(.+)$", makefile_text(), re.M)
    assert match, "the Makefile has no DEBIAN_PACKAGES list"
    return match.group(1).split()


def cached_tools() -> set[str]:
    """Names of the binaries the Makefile builds into the tool cache: the last element of each
    Go package its `go build`/`go install`/`go test -c` lines name, and every `-o` file."""
    text = makefile_text()
    names = set(re.findall(r"-o \$\([A-Z_]+\)/([\w.-]+)", text))
    for command in re.findall(r"go (?:build|install|test)[^\n]*", text):
        for word in command.split():
            word = word.split("@")[0]
            if "/" in word and "$" not in word and not word.startswith("-"):
                names.add(word.rstrip("/").rsplit("/", 1)[-1])
    return names


def installed() -> dict[str, tuple[bool, list[list[str]]]]:
    """Installed packages: whether each is essential/required, and its dependency groups."""
    fields = "${Package}\t${Essential}\t${Priority}\t${Pre-Depends}, ${Depends}\n"
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", fields], capture_output=True, text=True, check=True
    ).stdout
    packages = {}
    for line in out.splitlines():
        name, essential, priority, depends = line.split("\t")
        groups = [
            [re.sub(r"[\s(:].*", "", alt.strip()) for alt in group.split("|")]
            for group in depends.split(",")
            if group.strip()
        ]
        packages[name] = (essential == "yes" or priority == "required", groups)
    return packages


def allowed_packages(listed: list[str]) -> set[str]:
    """The listed packages, what they depend on (as installed here), and the base system."""
    packages = installed()
    provides = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Provides}\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    providers: dict[str, list[str]] = {}
    for line in provides.splitlines():
        name, virtuals = line.split("\t")
        for virtual in virtuals.split(","):
            if virtual.strip():
                providers.setdefault(re.sub(r"[\s(].*", "", virtual.strip()), []).append(name)
    allowed: set[str] = set()
    todo = [*listed, *(name for name, (base, _) in packages.items() if base)]
    while todo:
        name = todo.pop()
        for candidate in (name, *providers.get(name, [])):
            if candidate in packages and candidate not in allowed:
                allowed.add(candidate)
                for group in packages[candidate][1]:
                    todo.extend(group)
    return allowed | set(listed)


def owners(paths: list[str]) -> dict[str, str]:
    """dpkg's owner of each path (usr-merged paths are looked up under both names), in one
    dpkg-query call."""
    variants: dict[str, list[str]] = {}
    for path in paths:
        names = {path, str(Path(path).resolve())}
        names |= {n.removeprefix("/usr") for n in list(names) if n.startswith("/usr/")}
        names |= {"/usr" + n for n in list(names) if not n.startswith("/usr/")}
        for name in names:
            variants.setdefault(name, []).append(path)
    result = subprocess.run(
        ["dpkg-query", "-S", *sorted(variants)], capture_output=True, text=True, check=False
    )
    found: dict[str, str] = {}
    for line in result.stdout.splitlines():
        package, _, owned = line.partition(": ")
        for path in variants.get(owned.strip(), []):
            found[path] = package.split(",")[0].split(":")[0].strip()
    return found


def problems(listed: list[str]) -> list[str]:
    """What is used but would not be on a fresh machine after `make test`'s installs."""
    uses = all_uses()
    tools = cached_tools()
    by_what: dict[str, list[str]] = {}
    for use in uses:
        by_what.setdefault(use.what, []).append(use.where)
    resolved: dict[str, str] = {}
    missing: list[str] = []
    for what, where in sorted(by_what.items()):
        if what in MACHINE or what in tools:
            continue
        if what.startswith("/"):
            matches = sorted(Path("/").glob(what.lstrip("/"))) if "*" in what else [Path(what)]
            path = str(matches[-1]) if matches and matches[-1].exists() else ""
        else:
            path = shutil.which(what) or ""
        if not path:
            missing.append(f"{what} (used at {', '.join(where[:3])}) is not on this machine")
            continue
        if path.startswith(str(ROOT)):
            continue  # the project's own scripts and venv
        resolved[what] = path
    owner = owners(sorted(set(resolved.values())))
    allowed = allowed_packages(listed)
    found = list(missing)
    for what, path in sorted(resolved.items()):
        package = owner.get(path)
        used = f"{what} ({path}, used at {', '.join(by_what[what][:3])})"
        if package is None:
            found.append(f"{used} belongs to no Debian package")
        elif package not in allowed:
            found.append(
                f"{used} comes from Debian package {package}, which DEBIAN_PACKAGES in the "
                "Makefile neither lists nor depends on"
            )
    return found


needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian machine")


@needs_dpkg
def test_every_host_program_comes_from_an_installed_package_or_the_tool_cache() -> None:
    if not (ROOT / ".stamps" / "system").exists():
        pytest.skip("DEBIAN_PACKAGES are not installed yet here (`make test` installs them)")
    found = problems(debian_packages())
    assert not found, "add the package to DEBIAN_PACKAGES in the Makefile:\n" + "\n".join(found)


@needs_dpkg
def test_the_scan_finds_the_programs_the_harness_is_known_to_use() -> None:
    """The scan itself: it must see the programs whose absence once broke a fresh machine."""
    what = {use.what for use in all_uses()}
    for known in (
        "/bin/busybox",
        "debootstrap",
        "buildah",
        "mkfs.xfs",
        "runuser",
        "ip6tables",
        "ctr",
    ):
        assert known in what, f"the scan no longer finds {known}"
    assert any(w.endswith("/bin/pg_ctl") for w in what)
    assert {"kubelet", "kube-proxy", "csi-sanity"} <= cached_tools()


@needs_dpkg
def test_a_package_left_out_of_the_list_is_found() -> None:
    if not (ROOT / ".stamps" / "system").exists():
        pytest.skip("DEBIAN_PACKAGES are not installed yet here (`make test` installs them)")
    without = [p for p in debian_packages() if p != "busybox-static"]
    found = problems(without)
    assert any("/bin/busybox" in line and "busybox-static" in line for line in found), found
