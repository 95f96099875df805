"""Configuration: read from the environment once, validated, frozen.

A bad value raises ConfigError, which the CLI prints as one line and exits with code 2.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import DRIVER_NAME
from .core.space import SpaceFloor, parse_quantity

# The plugin-name rule csi-sanity and the CSI spec apply.
_DRIVER_NAME_RE = re.compile(r"^[a-zA-Z][A-Za-z0-9\-._]{0,61}[a-zA-Z]$")
# A node name is used as a Kubernetes label value (the topology segment).
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9\-_.]{0,61}[A-Za-z0-9])?$")
_NAMESPACE_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

_SC_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
# <namespace>/<CNPG Cluster>:<namespace of its clone source>
_MIRROR_RE = re.compile(rf"^{_LABEL}/{_LABEL}:{_LABEL}$")

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")

T = TypeVar("T")

# The longest BACKUP_MODE_LIMIT: with the time to reach a source and to finish a copy, a backup
# fits in the sidecars' --timeout=300s.
MAX_BACKUP_MODE_LIMIT = 240.0
# How long a request waits at a source instance's backup gate before it is retried later.
GATE_WAIT_SECONDS = 5.0
# After the backup ended, for the node to put a native copy in place (its Complete step).
COMPLETE_MARGIN_SECONDS = 30.0


class ConfigError(Exception):
    """A configuration variable has a value the driver cannot use."""

    def __init__(self, variable: str, value: str | None, expected: str) -> None:
        shown = "<unset>" if value is None else repr(value)
        super().__init__(f"{variable}={shown}: expected {expected}")
        self.variable = variable


def _floor(raw: str) -> SpaceFloor:
    if raw.endswith("%"):
        percent = float(raw[:-1])
        if not 0 <= percent < 100:
            raise ValueError
        return SpaceFloor(percent=percent)
    value = parse_quantity(raw)
    if value is None:
        raise ValueError
    return SpaceFloor(bytes=value)


def _cow_size(raw: str) -> int:
    value = parse_quantity(raw)
    if value is None or value % 4096 or value > 1 << 30:  # whole filesystem blocks, at most 1 GiB
        raise ValueError
    return value


def _metrics_auth(mode: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw == "none" or (raw == "kubernetes" and mode != "standalone"):
            return raw
        raise ValueError

    return parse


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError
    return value


@dataclass(frozen=True)
class Config:
    endpoint: Path
    driver_name: str
    node_id: str
    hostpath_prefix: Path
    target_root: Path
    namespace_path: tuple[str, ...]
    storage_classes: tuple[str, ...]
    pod_namespace: str
    log_level: str
    log_format: str
    grpc_workers: int
    reconcile_workers: int
    shutdown_grace_seconds: float
    pg_connect_timeout_seconds: float
    pg_statement_timeout_seconds: float
    backup_mode_limit_seconds: float
    capture_wait_seconds: float
    free_space_floor: SpaceFloor
    cow_extent_size: int
    metrics_port: int
    usage_interval_seconds: float
    # CNPG Clusters whose replication certificate and CA are kept in another namespace (that of
    # their clone source): (namespace, cluster, target namespace) each.
    cert_mirrors: tuple[tuple[str, str, str], ...] = ()
    # Who may read /metrics: "kubernetes" (a bearer token the API server allows GET /metrics)
    # or "none" (anyone who reaches the port).
    metrics_auth: str = "none"
    # Not read from the environment: the product's timings, which tests shorten with
    # dataclasses.replace().
    # One claim-loop reconcile waits this long for its clone (None: as long as a clone may
    # take, claim_wait()).
    claim_wait_seconds: float | None = None
    claim_first_backoff_seconds: float = 2.0  # a failing claim's first retry; doubled to 60 s
    report_period_seconds: float = 60.0  # the node plugin's free-space report on its Node
    cert_mirror_period_seconds: float = 60.0  # how often mirrored certificates are compared

    def claim_wait(self) -> float:
        """How long one claim-loop reconcile waits for its clone: the source's backup gate,
        the connection, a whole BACKUP_MODE_LIMIT and the node's Complete step after it, as
        csi-provisioner's CreateVolume may."""
        if self.claim_wait_seconds is not None:
            return self.claim_wait_seconds
        return (
            GATE_WAIT_SECONDS
            + self.pg_connect_timeout_seconds
            + self.backup_mode_limit_seconds
            + COMPLETE_MARGIN_SECONDS
        )


def _get(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    value = env.get(name)
    if value is None or value == "":
        return default
    return value


def _parse(
    env: Mapping[str, str], name: str, default: str | None, expected: str, parse: Callable[[str], T]
) -> T:
    raw = _get(env, name, default)
    if raw is None:
        raise ConfigError(name, None, expected)
    try:
        return parse(raw)
    except ValueError:
        raise ConfigError(name, raw, expected) from None


def _endpoint(raw: str) -> Path:
    if not raw.startswith("unix://"):
        raise ValueError
    path = raw[len("unix://") :]
    # unix:///abs/path gives "/abs/path"; unix://relative is not allowed.
    if not path.startswith("/") or "\x00" in path or len(path.encode()) > 107:
        raise ValueError
    return Path(path)


def _existing_dir(raw: str) -> Path:
    path = Path(raw)
    if not path.is_absolute() or "\x00" in raw or not path.is_dir():
        raise ValueError
    return Path(os.path.realpath(path))


def _absolute_path(raw: str) -> Path:
    """A path named on another host (the controller names node paths it never opens)."""
    path = Path(os.path.normpath(raw))
    if not Path(raw).is_absolute() or "\x00" in raw:
        raise ValueError
    return path


def _matching(regex: re.Pattern[str]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if not regex.match(raw):
            raise ValueError
        return raw

    return parse


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError
        return raw.lower()

    return parse


def _positive_int(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 256:
        raise ValueError
    return value


def _positive_seconds(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 86400:
        raise ValueError
    return value


def _seconds_up_to(most: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = _positive_seconds(raw)
        if value > most:
            raise ValueError
        return value

    return parse


def _names(regex: re.Pattern[str], at_least_one: bool = False) -> Callable[[str], tuple[str, ...]]:
    """A comma-separated list of names, each matching regex (blanks around them ignored)."""

    def parse(raw: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in raw.split(",") if part.strip())
        if (at_least_one and not names) or not all(regex.match(name) for name in names):
            raise ValueError
        return names

    return parse


def _mirror(entry: str) -> tuple[str, str, str]:
    source, _, target = entry.partition(":")
    namespace, _, cluster = source.partition("/")
    return namespace, cluster, target


MODES = ("standalone", "controller", "node")


def load(env: Mapping[str, str] | None = None, mode: str = "standalone") -> Config:
    """Read and validate every setting for mode; raise ConfigError naming the first bad one.

    The node plugin and standalone mode work on HOSTPATH_PREFIX and TARGET_ROOT, so both must
    exist there; the controller only names paths on the nodes, so they need only be absolute."""
    env = os.environ if env is None else env
    local = mode != "controller"
    path, what = (
        (_existing_dir, "an absolute path of an existing directory")
        if local
        else (
            _absolute_path,
            "an absolute path (the directory on the nodes)",
        )
    )
    prefix = _parse(env, "HOSTPATH_PREFIX", None, what, path)
    target_root = _parse(
        env,
        "TARGET_ROOT",
        "/var/lib/kubelet",
        what + " (where kubelet publishes)",
        path,
    )
    if target_root == prefix or prefix in target_root.parents or target_root in prefix.parents:
        raise ConfigError(
            "TARGET_ROOT",
            str(target_root),
            f"a directory that neither contains nor lies inside HOSTPATH_PREFIX={prefix}",
        )
    # One backup budget for every path that copies a running source (csi-provisioner's and
    # csi-snapshotter's CreateVolume and CreateSnapshot, the claim loop): BACKUP_MODE_LIMIT.
    # Every statement of a copy runs within it, so a longer statement timeout is refused, not
    # silently cut.
    backup_limit = _parse(
        env,
        "BACKUP_MODE_LIMIT",
        "60",
        f"a number of seconds greater than 0 and at most {MAX_BACKUP_MODE_LIMIT:.0f} (with the "
        "time to reach the source and to finish the copy, within the sidecars' --timeout=300s)",
        _seconds_up_to(MAX_BACKUP_MODE_LIMIT),
    )
    statement_timeout = _parse(
        env,
        "PG_STATEMENT_TIMEOUT",
        env.get("BACKUP_MODE_LIMIT") or "60",
        f"a number of seconds greater than 0 and at most BACKUP_MODE_LIMIT={backup_limit:g}, "
        "which bounds every statement of a copy (raise BACKUP_MODE_LIMIT for longer ones)",
        _seconds_up_to(backup_limit),
    )
    return Config(
        endpoint=_parse(
            env,
            "CSI_ENDPOINT",
            "unix:///csi/csi.sock",
            "unix:///absolute/path/to/socket (at most 107 bytes)",
            _endpoint,
        ),
        driver_name=_parse(
            env,
            "DRIVER_NAME",
            DRIVER_NAME,
            "a CSI plugin name: 2-63 characters, letters at both ends",
            _matching(_DRIVER_NAME_RE),
        ),
        node_id=_parse(
            env,
            "NODE_ID",
            socket.gethostname(),
            "a node name: 1-63 letters, digits, '-', '_' or '.'",
            _matching(_NODE_ID_RE),
        ),
        hostpath_prefix=prefix,
        target_root=target_root,
        namespace_path=_parse(
            env,
            "NAMESPACE_PATH",
            "",
            "a comma-separated list of Kubernetes namespace names",
            _names(_NAMESPACE_RE),
        ),
        storage_classes=_parse(
            env,
            "STORAGE_CLASS",
            "pg-reflinker",
            "a comma-separated list of StorageClass names (lowercase letters, digits, '-', '.')",
            _names(_SC_RE, at_least_one=True),
        ),
        cert_mirrors=tuple(
            _mirror(entry)
            for entry in _parse(
                env,
                "CERT_MIRRORS",
                "",
                "a comma-separated list of <namespace>/<CNPG cluster>:<target namespace>",
                _names(_MIRROR_RE),
            )
        ),
        pod_namespace=_parse(
            env,
            "POD_NAMESPACE",
            "pg-reflinker",
            "the namespace the controller runs in (its leader-election Lease)",
            _matching(_NAMESPACE_RE),
        ),
        log_level=_parse(
            env, "LOG_LEVEL", "info", "one of " + ", ".join(LOG_LEVELS), _one_of(LOG_LEVELS)
        ),
        log_format=_parse(
            env, "LOG_FORMAT", "text", "one of " + ", ".join(LOG_FORMATS), _one_of(LOG_FORMATS)
        ),
        grpc_workers=_parse(env, "GRPC_WORKERS", "8", "an integer from 1 to 256", _positive_int),
        reconcile_workers=_parse(
            env, "RECONCILE_WORKERS", "4", "an integer from 1 to 256", _positive_int
        ),
        shutdown_grace_seconds=_parse(
            env,
            "SHUTDOWN_GRACE_SECONDS",
            "30",
            "a number of seconds greater than 0",
            _positive_seconds,
        ),
        pg_connect_timeout_seconds=_parse(
            env, "PG_CONNECT_TIMEOUT", "10", "a number of seconds greater than 0", _positive_seconds
        ),
        free_space_floor=_parse(
            env,
            "FREE_SPACE_FLOOR",
            "5%",
            "a share of the filesystem such as 5% or a size such as 20Gi",
            _floor,
        ),
        cow_extent_size=_parse(
            env,
            "COW_EXTENT_SIZE",
            "8Ki",
            "a multiple of 4Ki up to 1Gi (such as 8Ki), or 0 for the filesystem's default",
            _cow_size,
        ),
        metrics_port=_parse(
            env,
            "METRICS_PORT",
            {"controller": "9810", "node": "9811"}.get(mode, "0"),
            "a TCP port from 1 to 65535, or 0 for no /metrics endpoint",
            _port,
        ),
        metrics_auth=_parse(
            env,
            "METRICS_AUTH",
            "none" if mode == "standalone" else "kubernetes",
            "kubernetes (a bearer token allowed to GET /metrics) or none"
            + (" (standalone has no API server: none)" if mode == "standalone" else ""),
            _metrics_auth(mode),
        ),
        usage_interval_seconds=_parse(
            env,
            "USAGE_INTERVAL",
            "300",
            "a number of seconds greater than 0",
            _positive_seconds,
        ),
        pg_statement_timeout_seconds=statement_timeout,
        backup_mode_limit_seconds=backup_limit,
        capture_wait_seconds=_parse(
            env,
            "CAPTURE_WAIT",
            "600",
            "a number of seconds greater than 0",
            _positive_seconds,
        ),
    )
