"""Where a source volume lives and whether a PostgreSQL server is using it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .records import VolumeRecord


@dataclass(frozen=True)
class SourceServer:
    """How to reach the PostgreSQL instance that uses a source volume (CNPG conventions)."""

    pod_ip: str
    cluster: str
    namespace: str
    ca_cert: bytes = field(default=b"", repr=False)  # never in a log line
    client_cert: bytes = field(default=b"", repr=False)  # never in a log line
    client_key: bytes = field(default=b"", repr=False)  # never in a log line
    port: int = 5432
    pod: str = ""
    claim: str = ""  # the source claim (namespace/name) the clone asked for, when known

    @property
    def host_name(self) -> str:
        # CNPG server certificates name the -rw service, never the pod IP.
        return f"{self.cluster}-rw.{self.namespace}.svc"

    @property
    def where(self) -> str:
        pod = f"pod {self.pod}, " if self.pod else ""
        return f"CNPG cluster {self.cluster} in namespace {self.namespace} ({pod}{self.pod_ip})"

    @property
    def source(self) -> str:
        """The source as a refusal names it: its claim first, when known."""
        return f"source claim {self.claim} ({self.where})" if self.claim else self.where


@dataclass(frozen=True)
class SourceLocation:
    node: str
    host_path: Path
    # What uses the source now (pods, or mount points), for messages.
    in_use_at: tuple[str, ...] = ()
    # The PostgreSQL server using the source, when it is a CNPG instance: clone it hot.
    server: SourceServer | None = None
    # Where that server's pod mounts the source volume (maps paths the server returns).
    mount_path: str = ""
    pod_uid: str = ""
    # The server pod's other claim volumes on the node: mount path in the pod -> node path
    # (CNPG's WAL volume, to which PGDATA/pg_wal links).
    volumes: dict[str, str] = field(default_factory=dict)
    # Traceability for the clone's volume_context (source claim, pod).
    context: dict[str, str] = field(default_factory=dict)


class SourceLocator(Protocol):
    def locate(self, source: VolumeRecord) -> SourceLocation: ...
