"""Container images for the one-node test cluster, built on this machine with no registry.

- `debian:bookworm-slim`: a minbase debootstrap of Debian bookworm from the mirror this machine's
  apt is configured with (read from /etc/apt at run time), trimmed like the published slim image.
- the project's image, built by buildah from the repository's Dockerfile as shipped;
- the PostgreSQL instance image CNPG runs (tests/e2e/images/postgresql/Containerfile);
- single-binary images from the Go builds: csi-provisioner, the CNPG operator, the pod sandbox
  (`pause`) and the test stand-ins for node-driver-registrar and livenessprobe.

Builds happen once per input: each image is saved as a docker-archive under the tools cache,
named by a hash of what it is built from, and imported into the test cluster's containerd at
start-up.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tests import timings
from tests.conftest import ROOT

HERE = Path(__file__).resolve().parent

# The names the test overlay (tests/e2e/overlay) gives the images; deploy/ keeps the public ones.
PAUSE = "localhost/pause:test"
PROJECT = "localhost/pg-reflinker:test"
PROVISIONER = "localhost/csi-provisioner:v6.3.0"
SNAPSHOTTER = "localhost/csi-snapshotter:v8.6.0"
SNAPSHOT_CONTROLLER = "localhost/snapshot-controller:v8.6.0"
REGISTRAR = "localhost/node-driver-registrar-standin:test"
LIVENESS = "localhost/livenessprobe-standin:test"
OPERATOR = "localhost/cloudnative-pg:1.30.0"
# The PostgreSQL instance images CNPG runs, by major, each from the Debian suite that ships it;
# CNPG reads the major from the tag. The scenarios run PG_MAJOR (CNPG's default, 18).
PG_SUITES = {15: "bookworm", 17: "trixie", 18: "forky"}
PG_MAJOR = int(os.environ.get("PG_MAJOR", "18"))
if PG_MAJOR not in PG_SUITES:
    raise SystemExit(f"PG_MAJOR={PG_MAJOR}: the test images are built for {sorted(PG_SUITES)}")


def postgres_image(major: int = PG_MAJOR) -> str:
    return f"localhost/postgresql:{major}"


POSTGRES = postgres_image()
DEBIAN_BASE = "docker.io/library/debian:bookworm-slim"
# debootstrap in bookworm has no script for a suite after trixie; sid's serves every later one.
DEBOOTSTRAP_SID = "/usr/share/debootstrap/scripts/sid"


def debian_image(suite: str) -> str:
    return f"docker.io/library/debian:{suite}-slim"


def tools_cache() -> Path:
    return Path(os.environ.get("TOOLS_CACHE", Path.home() / ".cache" / "pg-reflinker"))


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses for bookworm (deb822 or one-line sources)."""
    sources = Path("/etc/apt")
    for path in sorted((sources / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1)
                for line in stanza.splitlines()
                if re.match(r"^[A-Za-z-]+:", line)
            )
            suites = fields.get("Suites", "").split()
            if "bookworm" in suites and fields.get("Types", "").split()[:1] == ["deb"]:
                return fields["URIs"].split()[0]
    for path in [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
                    return words[1]
    raise RuntimeError("no Debian bookworm source in /etc/apt: cannot build the base image")


def _digest(parts: Iterable[bytes | str | Path]) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(str(part.relative_to(ROOT) if part.is_relative_to(ROOT) else part).encode())
            h.update(part.read_bytes())
        else:
            h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:16]


def _tree(*paths: Path) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(
                p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            )
        else:
            files.append(path)
    return files


@dataclass
class Builder:
    """buildah with its own storage under the tools cache; every image ends as an archive."""

    cache: Path
    announce: Callable[[str], None]

    @property
    def store(self) -> Path:
        return self.cache / "images"

    def buildah(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [
                "buildah",
                "--root",
                str(self.store / "storage"),
                "--runroot",
                str(self.store / "run"),
                "--storage-driver",
                "vfs",
                *args,
            ],
            text=True,
            capture_output=True,
            **kwargs,  # type: ignore[call-overload]
        )
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
            raise RuntimeError(f"buildah {' '.join(args)} failed:\n{tail}")
        return result

    def archive(self, name: str, key: str) -> Path:
        slug = name.split("/")[-1].replace(":", "-")
        return self.store / f"{slug}-{key}.tar"

    def _save(self, name: str, archive: Path) -> None:
        partial = archive.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        self.buildah("push", name, f"docker-archive:{partial}:{name}")
        partial.rename(archive)
        for old in self.store.glob(archive.name.rsplit("-", 1)[0] + "-*.tar"):
            if old != archive:
                old.unlink()

    def _timed(self, what: str, build: Callable[[], None]) -> None:
        self.announce(f"build image {what}")
        start = time.monotonic()
        build()
        seconds = time.monotonic() - start
        print(f"     built image {what} in {seconds:.1f} s", flush=True)
        timings.record(f"build image {what}", seconds)

    def single_binary(
        self, name: str, binary: Path, path: str, links: dict[str, str], cmd: str = ""
    ) -> Path:
        """An image holding one static binary at `path` (and symlinks to it), run as `path`
        (or, with `cmd`, running `cmd` with no entrypoint)."""
        archive = self.archive(name, _digest([binary.read_bytes(), path, repr(sorted(links)), cmd]))
        if archive.exists():
            return archive

        def build() -> None:
            ctr = self.buildah("from", "scratch").stdout.strip()
            try:
                self.buildah("copy", "--chmod", "0755", ctr, str(binary), path)
                if links:
                    mnt = Path(self.buildah("mount", ctr).stdout.strip())
                    for link, dest in links.items():
                        (mnt / link.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                        (mnt / link.lstrip("/")).symlink_to(dest)
                    self.buildah("umount", ctr)
                if cmd:
                    self.buildah("config", "--entrypoint", "[]", "--cmd", cmd, ctr)
                else:
                    self.buildah("config", "--entrypoint", f'["{path}"]', "--cmd", "", ctr)
                self.buildah("commit", "--rm", ctr, name)
            except BaseException:
                self.buildah("rm", ctr)
                raise
            self._save(name, archive)

        self._timed(name, build)
        return archive

    def alias(self, source: str, name: str) -> Path:
        """The image `source` (in buildah's storage) under another name, as an archive."""
        image_id = self.buildah(
            "inspect", "--type", "image", "--format", "{{.FromImageID}}", source
        ).stdout.strip()
        archive = self.archive(name, _digest([image_id, name]))
        if not archive.exists():
            self.buildah("tag", source, name)
            self._save(name, archive)
        return archive

    def debian_base(self, suite: str = "bookworm") -> None:
        """debian:<suite>-slim in buildah's storage, from the configured Debian mirror."""
        image = debian_image(suite)
        marker = self.store / f"debian-{suite}-slim.done"
        if marker.exists():
            try:
                self.buildah("inspect", "--type", "image", image)
                return
            except RuntimeError:
                pass

        def build() -> None:
            rootfs = self.store / f"debian-rootfs-{suite}"
            subprocess.run(["rm", "-rf", str(rootfs)], check=True)
            script = (
                []
                if Path(f"/usr/share/debootstrap/scripts/{suite}").exists()
                else [DEBOOTSTRAP_SID]
            )
            subprocess.run(
                ["debootstrap", "--variant=minbase", suite, str(rootfs), debian_mirror(), *script],
                check=True,
                capture_output=True,
            )
            # What the published slim image leaves out: documentation, manuals, locales, caches.
            (rootfs / "etc/dpkg/dpkg.cfg.d/slim").write_text(
                "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\n"
                "path-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n"
                "path-exclude /usr/share/locale/*\npath-include /usr/share/locale/locale.alias\n"
            )
            for junk in ("usr/share/doc", "usr/share/man", "usr/share/info", "var/cache/apt"):
                subprocess.run(["rm", "-rf", str(rootfs / junk)], check=True)
            subprocess.run(
                ["find", str(rootfs / "var/lib/apt/lists"), "-type", "f", "-delete"], check=True
            )
            ctr = self.buildah("from", "scratch").stdout.strip()
            mnt = Path(self.buildah("mount", ctr).stdout.strip())
            subprocess.run(
                f"tar -C {rootfs} --exclude=./dev/* -cf - . | tar -C {mnt} -xpf -",
                shell=True,
                check=True,
            )
            self.buildah("umount", ctr)
            self.buildah(
                "config",
                "--cmd",
                "bash",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                ctr,
            )
            self.buildah("commit", "--rm", ctr, image)
            subprocess.run(["rm", "-rf", str(rootfs)], check=True)
            marker.touch()

        self._timed(f"{image} (debootstrap)", build)

    def containerfile(
        self,
        name: str,
        context: Path,
        containerfile: Path,
        inputs: list[Path],
        args: dict[str, str] | None = None,
    ) -> Path:
        """`buildah bud` of a Dockerfile on a local debian:<SUITE>-slim (bookworm unless the
        build argument SUITE says otherwise), never pulling."""
        args = args or {}
        archive = self.archive(
            name, _digest([*_tree(containerfile, *inputs), repr(sorted(args.items()))])
        )
        if archive.exists():
            return archive
        self.debian_base(args.get("SUITE", "bookworm"))

        def build() -> None:
            # RUN steps reach Debian's archive and PyPI through this machine's network, whose
            # egress may need a local CA: the machine's local CAs (Debian's place for them) are
            # lent to the build, where ca-certificates picks them up as it does on the host.
            local_cas = Path("/usr/local/share/ca-certificates")
            trust = (
                ["--volume", f"{local_cas}:{local_cas}:ro"] if any(local_cas.glob("*.crt")) else []
            )
            self.buildah(
                "bud",
                "--pull=never",
                "--layers",
                "--isolation",
                "chroot",
                *trust,
                *[f"--build-arg={k}={v}" for k, v in sorted(args.items())],
                "-f",
                str(containerfile),
                "-t",
                name,
                str(context),
            )
            self._save(name, archive)

        self._timed(name, build)
        return archive


def busybox(b: Builder, name: str) -> Path:
    """busybox from Debian's busybox-static: the binary and a link for each applet."""
    binary = Path("/bin/busybox")
    applets = subprocess.run(
        [str(binary), "--list-full"], check=True, text=True, capture_output=True
    ).stdout.split()
    links = {"/" + a: "/bin/busybox" for a in applets if a != "bin/busybox"}
    return b.single_binary(name, binary, "/bin/busybox", links, cmd="sh")


def build_all(
    k8s_tools: Path,
    cnpg_tools: Path,
    announce: Callable[[str], None] = lambda s: None,
    pg_majors: Iterable[int] = (PG_MAJOR,),
) -> dict[str, Path]:
    """Every image the test cluster runs, as {name: docker-archive}; a PostgreSQL image for
    each of pg_majors."""
    b = Builder(tools_cache(), announce)
    b.store.mkdir(parents=True, exist_ok=True)
    images = {
        PAUSE: b.single_binary(PAUSE, k8s_tools / "pause", "/pause", {}),
        PROVISIONER: b.single_binary(
            PROVISIONER, k8s_tools / "csi-provisioner", "/csi-provisioner", {}
        ),
        SNAPSHOTTER: b.single_binary(
            SNAPSHOTTER, k8s_tools / "csi-snapshotter", "/csi-snapshotter", {}
        ),
        SNAPSHOT_CONTROLLER: b.single_binary(
            SNAPSHOT_CONTROLLER, k8s_tools / "snapshot-controller", "/snapshot-controller", {}
        ),
        REGISTRAR: b.single_binary(
            REGISTRAR, k8s_tools / "registrar-standin", "/csi-node-driver-registrar", {}
        ),
        LIVENESS: b.single_binary(
            LIVENESS, k8s_tools / "livenessprobe-standin", "/livenessprobe", {}
        ),
        # The operator globs operator/manager_* to learn the architectures it can run on.
        OPERATOR: b.single_binary(
            OPERATOR,
            cnpg_tools / "manager",
            "/operator/manager_amd64",
            {"/manager": "/operator/manager_amd64"},
        ),
    }
    images.update(debian_images(b, pg_majors))
    return images


def debian_images(b: Builder, pg_majors: Iterable[int]) -> dict[str, Path]:
    """The images built on Debian from a Containerfile: the project's and the PostgreSQL
    instance images (they need no Go build, so `make test` builds them beside those)."""
    images = {
        PROJECT: b.containerfile(
            PROJECT,
            ROOT,
            ROOT / "Dockerfile",
            [
                ROOT / ".dockerignore",
                ROOT / "pyproject.toml",
                ROOT / "requirements.lock",
                ROOT / "README.md",
                ROOT / "csi",
                ROOT / "reflinker_csi",
            ],
        )
    }
    for major in pg_majors:
        images[postgres_image(major)] = b.containerfile(
            postgres_image(major),
            HERE / "images" / "postgresql",
            HERE / "images" / "postgresql" / "Containerfile",
            [],
            {"SUITE": PG_SUITES[major], "MAJOR": str(major)},
        )
    return images


if __name__ == "__main__":
    # `make images`: the Debian-based images of every major, into the cache the cluster uses.
    builder = Builder(tools_cache(), lambda what: print(what, flush=True))
    builder.store.mkdir(parents=True, exist_ok=True)
    for name, archive in debian_images(builder, sorted(PG_SUITES)).items():
        print(f"{name}: {archive}", flush=True)
