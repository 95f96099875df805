"""Configuration: every bad value stops the process with one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reflinker_csi import config

ROOT = Path(__file__).resolve().parents[2]


def good_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "prefix").mkdir(exist_ok=True)
    (tmp_path / "kubelet").mkdir(exist_ok=True)
    return {
        "HOSTPATH_PREFIX": str(tmp_path / "prefix"),
        "TARGET_ROOT": str(tmp_path / "kubelet"),
        "CSI_ENDPOINT": f"unix://{tmp_path}/csi.sock",
    }


def test_defaults_and_parsing(tmp_path: Path) -> None:
    env = good_env(tmp_path) | {"NAMESPACE_PATH": " templates, shared ,", "LOG_FORMAT": "JSON"}
    cfg = config.load(env)
    assert cfg.driver_name == "pg-reflinker.csi"
    assert cfg.namespace_path == ("templates", "shared")
    assert cfg.storage_classes == ("pg-reflinker",)
    classes = config.load(env | {"STORAGE_CLASS": "pg-reflinker, pg-reflinker-native"})
    assert classes.storage_classes == ("pg-reflinker", "pg-reflinker-native")
    assert cfg.log_format == "json"
    assert cfg.endpoint == tmp_path / "csi.sock"
    with pytest.raises(AttributeError):
        cfg.node_id = "x"  # type: ignore[misc]
    # Space settings: defaults, and both spellings of the floor.
    assert (str(cfg.free_space_floor), cfg.cow_extent_size, cfg.metrics_port) == ("5%", 8192, 0)
    assert cfg.free_space_floor.of(1000) == 50
    sized = config.load(env | {"FREE_SPACE_FLOOR": "20Gi", "COW_EXTENT_SIZE": "0"})
    assert (sized.free_space_floor.of(1 << 40), sized.cow_extent_size) == (20 << 30, 0)
    assert config.load(env, mode="node").metrics_port == 9811


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HOSTPATH_PREFIX", None),
        ("HOSTPATH_PREFIX", "relative/dir"),
        ("HOSTPATH_PREFIX", "/does/not/exist"),
        ("CSI_ENDPOINT", "tcp://127.0.0.1:5000"),
        ("CSI_ENDPOINT", "unix://relative.sock"),
        ("DRIVER_NAME", "-bad-"),
        ("NODE_ID", "node with spaces"),
        ("NAMESPACE_PATH", "Templates"),
        ("STORAGE_CLASS", " , "),
        ("STORAGE_CLASS", "pg-reflinker,Fast_SSD"),
        ("LOG_LEVEL", "loud"),
        ("LOG_FORMAT", "xml"),
        ("GRPC_WORKERS", "0"),
        ("GRPC_WORKERS", "many"),
        ("SHUTDOWN_GRACE_SECONDS", "-1"),
        ("PG_STATEMENT_TIMEOUT", "soon"),
        ("FREE_SPACE_FLOOR", "100%"),
        ("FREE_SPACE_FLOOR", "lots"),
        ("COW_EXTENT_SIZE", "1000"),
        ("COW_EXTENT_SIZE", "2Gi"),
        ("METRICS_PORT", "70000"),
        ("USAGE_INTERVAL", "0"),
        ("CERT_MIRRORS", "apps/pg-prod"),
        ("CERT_MIRRORS", "apps/pg-prod:Copies"),
        ("CERT_MIRRORS", "pg-prod:copies"),
    ],
)
def test_bad_value_names_variable_value_and_expectation(
    tmp_path: Path, variable: str, value: str | None
) -> None:
    env = good_env(tmp_path)
    if value is None:
        env.pop(variable)
    else:
        env[variable] = value
    with pytest.raises(config.ConfigError) as err:
        config.load(env)
    message = str(err.value)
    assert message.startswith(f"{variable}=")
    assert (repr(value) if value is not None else "<unset>") in message
    assert "expected" in message


def test_cert_mirrors_read_as_namespace_cluster_and_target(tmp_path: Path) -> None:
    env = {**good_env(tmp_path), "CERT_MIRRORS": "apps/pg-prod:copies, ledger/pg-books:analytics"}
    assert config.load(env).cert_mirrors == (
        ("apps", "pg-prod", "copies"),
        ("ledger", "pg-books", "analytics"),
    )
    assert config.load(good_env(tmp_path)).cert_mirrors == ()


def test_one_backup_budget_bounds_every_statement_and_the_claim_loop(tmp_path: Path) -> None:
    """BACKUP_MODE_LIMIT is the one budget of a copy: the statement timeout defaults to it, a
    longer one is refused at start (it used to be cut to the limit silently), and the claim
    loop waits for a whole backup, not a fixed 20 s that ended native clones early."""
    env = good_env(tmp_path)
    cfg = config.load(env, mode="controller")
    assert (cfg.backup_mode_limit_seconds, cfg.pg_statement_timeout_seconds) == (60, 60)
    assert cfg.claim_wait() >= cfg.backup_mode_limit_seconds + 30
    raised = config.load(env | {"BACKUP_MODE_LIMIT": "120"}, mode="controller")
    assert raised.pg_statement_timeout_seconds == 120
    assert raised.claim_wait() >= 150
    with pytest.raises(config.ConfigError) as err:
        config.load(env | {"PG_STATEMENT_TIMEOUT": "240"}, mode="controller")
    assert str(err.value).startswith("PG_STATEMENT_TIMEOUT='240': expected")
    assert "at most BACKUP_MODE_LIMIT=60" in str(err.value)
    with pytest.raises(config.ConfigError, match=r"BACKUP_MODE_LIMIT='600'.*at most 240"):
        config.load(env | {"BACKUP_MODE_LIMIT": "600"}, mode="controller")


def test_target_root_inside_prefix_is_refused(tmp_path: Path) -> None:
    env = good_env(tmp_path)
    (tmp_path / "prefix" / "kubelet").mkdir()
    env["TARGET_ROOT"] = str(tmp_path / "prefix" / "kubelet")
    with pytest.raises(config.ConfigError, match="TARGET_ROOT"):
        config.load(env)


def test_cli_prints_one_line_and_exits_2_without_traceback(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOSTPATH_PREFIX": "/nope"}
    result = subprocess.run(
        [sys.executable, "-m", "reflinker_csi.cli", "standalone"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "reflinker-csi: configuration error: HOSTPATH_PREFIX='/nope': expected an absolute path "
        "of an existing directory"
    ]
    assert "Traceback" not in result.stderr


def test_version_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reflinker_csi.cli", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("reflinker-csi ")


@pytest.mark.parametrize("mode", ["controller", "node"])
def test_kubernetes_modes_without_credentials_say_what_to_set(tmp_path: Path, mode: str) -> None:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)} | good_env(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "reflinker_csi.cli", mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "no Kubernetes configuration" in result.stderr and "KUBECONFIG" in result.stderr
    assert "Traceback" not in result.stderr
