"""A real PostgreSQL server set up the way CloudNativePG sets up an instance, for tests and
benchmarks: TLS with an ECDSA P-256 CA, a server certificate for <cluster>-rw.<ns>.svc (no IP SAN),
a streaming_replica client certificate, `hostssl postgres streaming_replica ... cert`, and the
reference reflink_snapshot() installed."""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FUNCTION_SQL = ROOT / "deploy" / "postgres" / "reflink_snapshot.sql"
PG_USER = "postgres"


# Where `make pg-majors` puts the PostgreSQL majors this machine's Debian release lacks: one
# Debian root per suite (tests/tools/pgmajors.py), its programs made to run from there.
PG_ROOTS = Path(os.environ.get("PG_ROOTS", "/var/cache/pg-reflinker/postgresql"))


def _major(bindir: str) -> int:
    return int(re.findall(r"/(\d+)/bin$", bindir)[0])


def pg_majors() -> dict[int, Path]:
    """Every PostgreSQL major whose server can run here, by major: this machine's Debian
    packages (/usr/lib/postgresql) and the relocated roots under PG_ROOTS."""
    found = {
        _major(str(Path(p).parent)): Path(p).parent
        for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")
    }
    for marker in glob.glob(f"{PG_ROOTS}/*/.relocated"):
        for p in glob.glob(f"{Path(marker).parent}/usr/lib/postgresql/*/bin/postgres"):
            found.setdefault(_major(str(Path(p).parent)), Path(p).parent)
    return dict(sorted(found.items()))


def pg_bin() -> Path:
    """This machine's own PostgreSQL server, from its Debian packages (the newest if several)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: _major(str(Path(p).parent))
    )
    if not found:
        raise FileNotFoundError(
            "no PostgreSQL server in /usr/lib/postgresql (make test installs it)"
        )
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Commands run as postgres start here, not in the caller's working directory: the checkout may
# be somewhere the postgres user cannot enter (PostgreSQL's programs then print "could not
# change directory to ...: Permission denied"). Nothing of the checkout is handed to that user.
PG_CWD = "/"


def as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *args]


def run_as_postgres(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command as the postgres user; a failure carries its output in the exception."""
    kwargs.setdefault("cwd", PG_CWD)
    result = subprocess.run(as_postgres(args), text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise subprocess.CalledProcessError(
            result.returncode,
            args[:3],
            output=result.stdout,
            stderr=f"{result.stderr or ''}\n{result.stdout or ''}"[-3000:],
        )
    return result  # type: ignore[no-any-return]


def chown_postgres(path: Path) -> None:
    pw = pwd.getpwnam(PG_USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)


@dataclass
class Certificates:
    """CNPG-style TLS material for cluster `cluster` in namespace `namespace`."""

    directory: Path
    cluster: str
    namespace: str

    def path(self, name: str) -> Path:
        return self.directory / name

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=self.directory)

    def _ca(self, name: str) -> None:
        self._openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
        self._openssl(
            "req",
            "-x509",
            "-new",
            "-key",
            f"{name}.key",
            "-days",
            "30",
            "-subj",
            f"/OU={self.cluster}/CN={self.cluster}",
            "-out",
            f"{name}.crt",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        )

    def _leaf(self, name: str, ca: str, cn: str, sans: list[str], usage: str) -> None:
        self._openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
        self._openssl(
            "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-out", f"{name}.csr"
        )
        ext = self.directory / f"{name}.ext"
        lines = [f"extendedKeyUsage={usage}", "keyUsage=critical,digitalSignature,keyEncipherment"]
        if sans:
            lines.append("subjectAltName=" + ",".join(f"DNS:{s}" for s in sans))
        ext.write_text("\n".join(lines) + "\n")
        self._openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            f"{ca}.crt",
            "-CAkey",
            f"{ca}.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            str(ext),
            "-out",
            f"{name}.crt",
        )
        os.chmod(self.directory / f"{name}.key", 0o600)

    @classmethod
    def create(cls, directory: Path, cluster: str, namespace: str) -> Certificates:
        directory.mkdir(parents=True, exist_ok=True)
        certs = cls(directory, cluster, namespace)
        rw = f"{cluster}-rw"
        certs._ca("ca")
        certs._leaf(
            "server",
            "ca",
            rw,
            [
                rw,
                f"{rw}.{namespace}",
                f"{rw}.{namespace}.svc",
                f"{rw}.{namespace}.svc.cluster.local",
            ],
            "serverAuth",
        )
        certs._leaf("replication", "ca", "streaming_replica", [], "clientAuth")
        certs._leaf("other-user", "ca", "app", [], "clientAuth")
        certs._ca("wrong-ca")
        for name in ("server.key", "server.crt", "ca.crt"):
            chown_postgres(directory / name)
        return certs


@dataclass
class PostgresServer:
    """One PostgreSQL instance whose PGDATA is `<volume>/pgdata`, as in a CNPG volume."""

    volume: Path
    port: int
    socket_dir: Path
    certs: Certificates | None = None
    # The programs of the major this instance runs (pg_majors()).
    bin: Path = field(default_factory=pg_bin)

    @property
    def major(self) -> int:
        return _major(str(self.bin))

    @property
    def pgdata(self) -> Path:
        return self.volume / "pgdata"

    @property
    def log_file(self) -> Path:
        return self.socket_dir / f"postgres-{self.port}.log"

    def initdb(self, waldir: Path | None = None) -> None:
        """waldir: pg_wal there (a link to it in PGDATA), as CNPG's walStorage makes it."""
        self.volume.mkdir(parents=True, exist_ok=True)
        chown_postgres(self.volume)
        wal_args: list[str] = []
        if waldir is not None:
            waldir.parent.mkdir(parents=True, exist_ok=True)
            chown_postgres(waldir.parent)
            wal_args = ["--waldir", str(waldir)]
        run_as_postgres(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.pgdata),
                *wal_args,
                "-U",
                PG_USER,
                "--auth-local=trust",
                "--auth-host=reject",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--data-checksums",
            ],
            capture_output=True,
        )
        assert self.certs is not None
        c = self.certs.directory
        with open(self.pgdata / "postgresql.auto.conf", "a") as conf:
            conf.write(
                "ssl = on\n"
                f"ssl_cert_file = '{c}/server.crt'\nssl_key_file = '{c}/server.key'\n"
                f"ssl_ca_file = '{c}/ca.crt'\n"
                "ssl_min_protocol_version = 'TLSv1.3'\n"
                "shared_buffers = '256MB'\nmax_wal_size = '1GB'\n"
                "wal_level = 'replica'\nmax_wal_senders = 10\nmax_replication_slots = 10\n"
                "full_page_writes = on\nlogging_collector = off\nlog_checkpoints = on\n"
            )
        (self.pgdata / "pg_hba.conf").write_text(
            "local all all trust\n"
            "local replication postgres trust\n"
            "hostssl postgres streaming_replica 127.0.0.1/32 cert\n"
            "hostssl all all 127.0.0.1/32 reject\n"
        )

    def start(self, extra: str = "") -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.socket_dir, 0o777)
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.socket_dir} {extra}"
        )
        run_as_postgres(
            [
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                "300",
                "-o",
                opts,
                "start",
            ],
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            as_postgres(
                [str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "-m", mode, "-w", "stop"]
            ),
            capture_output=True,
            check=False,
            cwd=PG_CWD,
        )

    def psql(self, sql: str, db: str = "postgres") -> str:
        out = run_as_postgres(
            [
                str(self.bin / "psql"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-d",
                db,
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
            capture_output=True,
        )
        return str(out.stdout).strip()

    def install_function(self) -> None:
        self.psql("CREATE ROLE streaming_replica LOGIN REPLICATION")
        run_as_postgres(
            [
                str(self.bin / "psql"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-d",
                "postgres",
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
            ],
            # Through stdin: the postgres user may not be able to enter the checkout.
            input=FUNCTION_SQL.read_text(),
            capture_output=True,
        )

    def pgbench(
        self, *args: str, db: str = "app", **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return run_as_postgres(
            [
                str(self.bin / "pgbench"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                *args,
                db,
            ],
            **(kwargs or {"capture_output": True}),
        )

    def pgbench_background(self, *args: str, db: str = "app") -> subprocess.Popen[str]:
        """pgbench running while the caller does something else; stdout+stderr to a pipe."""
        return subprocess.Popen(
            as_postgres(
                [
                    str(self.bin / "pgbench"),
                    "-h",
                    str(self.socket_dir),
                    "-p",
                    str(self.port),
                    *args,
                    db,
                ]
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=PG_CWD,
        )

    def basebackup(self, target: Path, standby: bool = False) -> None:
        """pg_basebackup -X stream -c fast into target (what users do today without reflinks);
        standby: write the settings of a streaming replica of this server (-R)."""
        target.mkdir(mode=0o700)
        chown_postgres(target)
        run_as_postgres(
            [
                str(self.bin / "pg_basebackup"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                PG_USER,
                "-D",
                str(target),
                "-X",
                "stream",
                "-c",
                "fast",
                *(["-R"] if standby else []),
            ],
            capture_output=True,
        )

    def amcheck(self, db: str = "app") -> None:
        """pg_amcheck --heapallindexed over every table and index; raises on corruption."""
        run_as_postgres(
            [
                str(self.bin / "pg_amcheck"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "--heapallindexed",
                "--install-missing",
                "-d",
                db,
            ],
            capture_output=True,
        )

    def checksums(self) -> str:
        """pg_checksums --check on this stopped instance; raises on a block that fails it."""
        out = run_as_postgres(
            [str(self.bin / "pg_checksums"), "--check", "-D", str(self.pgdata)],
            capture_output=True,
        )
        return str(out.stdout)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.psql("SELECT 1")
                return
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def boot_clone(label_dir: Path, socket_dir: Path, bin: Path | None = None) -> PostgresServer:
    """Start a PostgreSQL server on a cloned <label> directory (local socket only), with the
    programs of bin (the source's major) or this machine's own."""
    clone = PostgresServer(
        volume=label_dir, port=free_port(), socket_dir=socket_dir, bin=bin or pg_bin()
    )
    clone.start(extra="-c listen_addresses='' -c ssl=off")
    clone.wait_ready()
    return clone


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
