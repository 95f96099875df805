"""The server process: socket handling, one log line per RPC, graceful stop, crash recovery."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2
from reflinker_csi.core.records import VolumeRecord
from reflinker_csi.standalone.registry import FileRegistry
from tests.conftest import REFLINKER, ROOT, Driver, Filesystem, create_request

pytestmark = pytest.mark.integration


def test_socket_is_0660_and_a_second_server_is_refused(driver: Driver) -> None:
    assert stat.S_IMODE(os.stat(driver.socket).st_mode) == 0o660
    env = dict(driver.env, HOSTPATH_PREFIX=str(driver.prefix.parent))
    result = subprocess.run(
        [*REFLINKER, "standalone"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "another server is listening" in result.stderr
    # The live server is unharmed.
    assert driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value


def test_two_servers_never_share_one_prefix(driver: Driver) -> None:
    env = dict(driver.env, CSI_ENDPOINT=f"unix://{driver.socket}.2")
    result = subprocess.run(
        [*REFLINKER, "standalone"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "another reflinker-csi process holds" in result.stderr


def test_stale_socket_is_replaced(driver: Driver) -> None:
    driver.stop(signal.SIGKILL)
    assert driver.socket.exists()  # a killed server leaves its socket behind
    driver.start()
    assert driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value


def test_sigterm_stops_cleanly_and_logs_each_rpc_once(driver: Driver) -> None:
    vol = driver.controller.CreateVolume(create_request("pvc-log")).volume
    with pytest.raises(grpc.RpcError):
        driver.controller.CreateVolume(create_request("pvc-log", size=7))  # ALREADY_EXISTS
    assert driver.stop(signal.SIGTERM) == 0
    assert not driver.socket.exists()
    log = driver.log()
    lines = [line for line in log.splitlines() if "method=CreateVolume" in line]
    assert len(lines) == 2
    assert "name=pvc-log code=OK" in lines[0]
    assert "code=ALREADY_EXISTS" in lines[1]
    assert (
        vol.volume_id
        in (driver.prefix / ".pg-reflinker" / "volumes" / f"{vol.volume_id}.json").read_text()
    )


def test_json_logs_never_carry_secrets(xfs: Filesystem, driver_on) -> None:  # type: ignore[no-untyped-def]
    drv: Driver = driver_on(xfs.mnt)
    drv.stop()
    drv.env["LOG_FORMAT"] = "json"
    drv.start()
    req = create_request("pvc-secret")
    req.secrets["password"] = "hunter2-very-secret"
    drv.controller.CreateVolume(req)
    drv.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(
            volume_id="0b6f4c1e-1111-4222-8333-444455556666",
            secrets={"token": "hunter2-very-secret"},
        )
    )
    drv.stop()
    records = [json.loads(line) for line in drv.log().splitlines() if line.startswith("{")]
    rpcs = [r for r in records if r.get("msg") == "rpc"]
    assert {r["method"] for r in rpcs} >= {"CreateVolume", "DeleteVolume"}
    assert all("ms" in r and "code" in r for r in rpcs)
    assert "hunter2" not in drv.log()


def start_big_clone(driver: Driver, name: str, dirs: int) -> tuple[grpc.Future, str]:
    """A source of dirs x 100 small files and a clone of it in flight (its .partial exists)."""
    src = driver.controller.CreateVolume(create_request(f"{name}-src")).volume
    base = driver.prefix / src.volume_id
    for d in range(dirs):
        (base / f"d{d}").mkdir()
        for f in range(100):
            (base / f"d{d}" / f"f{f}").write_bytes(b"x" * 100)
    future = driver.controller.CreateVolume.future(
        create_request(f"{name}-clone", source=src.volume_id)
    )
    deadline = time.monotonic() + 20
    while not any(p.name.endswith(".partial") for p in driver.prefix.iterdir()):
        assert time.monotonic() < deadline, "the clone never started"
        time.sleep(0.005)
    return future, src.volume_id


def test_in_flight_rpc_finishes_after_sigterm(driver: Driver) -> None:
    """A clone of a large tree is still running when SIGTERM arrives; it completes."""
    future, _ = start_big_clone(driver, "pvc-big", 80)
    assert driver.process is not None
    driver.process.send_signal(signal.SIGTERM)
    volume = future.result(timeout=60).volume
    assert driver.process.wait(timeout=30) == 0
    assert len(list((driver.prefix / volume.volume_id).rglob("f*"))) == 8000
    # The driver's own log shows the order: it began stopping, then the clone's call ended.
    lines = driver.log().splitlines()
    stopping = next(i for i, line in enumerate(lines) if " stopping signal=SIGTERM" in line)
    finished = next(
        i
        for i, line in enumerate(lines)
        if " rpc method=CreateVolume name=pvc-big-clone " in line and " code=OK" in line
    )
    assert stopping < finished, "the clone had finished before SIGTERM: nothing was in flight"


def test_crash_after_record_before_directory_is_completed_by_the_retry(driver: Driver) -> None:
    driver.stop(signal.SIGKILL)
    # The state a crash right after reserving leaves: a record, no directory.
    registry = FileRegistry(driver.prefix / ".pg-reflinker")
    reserved, _ = registry.reserve(
        VolumeRecord(
            guid="3f2b1c0d-aaaa-4bbb-8ccc-ddddeeeeffff",
            name="pvc-crash",
            node="node-a",
            required_bytes=1 << 30,
            limit_bytes=0,
        )
    )
    registry.close()
    driver.start()
    vol = driver.controller.CreateVolume(create_request("pvc-crash")).volume
    assert vol.volume_id == reserved.guid
    assert (driver.prefix / vol.volume_id).is_dir()


def test_kill_during_clone_leaves_no_orphan_and_retry_gets_same_guid(driver: Driver) -> None:
    future, source_id = start_big_clone(driver, "pvc-kill", 60)
    driver.stop(signal.SIGKILL)
    with pytest.raises(grpc.RpcError):
        future.result(timeout=10)
    # The kill came in the middle of the copy: its partial copy is there, not yet in place.
    [partial] = [p for p in driver.prefix.iterdir() if p.name.endswith(".partial")]
    assert not (driver.prefix / partial.name.removesuffix(".partial")).exists()
    record_files = list((driver.prefix / ".pg-reflinker" / "volumes").glob("*.json"))
    guids = {
        json.loads(p.read_text())["guid"]
        for p in record_files
        if json.loads(p.read_text())["name"] == "pvc-kill-clone"
    }
    assert len(guids) == 1  # the record was written before the copy began

    driver.start()
    assert not any(p.name.endswith(".partial") for p in driver.prefix.iterdir())
    vol = driver.controller.CreateVolume(create_request("pvc-kill-clone", source=source_id)).volume
    assert vol.volume_id == guids.pop()
    assert len(list((driver.prefix / vol.volume_id).rglob("f*"))) == 6000
    entries = sorted(p.name for p in driver.prefix.iterdir())
    assert entries == sorted([".pg-reflinker", source_id, vol.volume_id])


def test_unknown_rpc_is_unimplemented(driver: Driver) -> None:
    with pytest.raises(grpc.RpcError) as err:
        driver.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(volume_id="x", node_id="y")
        )
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def run_command(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, with only the given environment."""
    command = Path(sys.executable).with_name("reflinker-csi")
    return subprocess.run(
        [str(command), *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_installed_command_names_a_bad_setting_in_one_line() -> None:
    result = run_command("node", HOSTPATH_PREFIX="relative/path")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "reflinker-csi: configuration error: HOSTPATH_PREFIX='relative/path': expected an "
        "absolute path of an existing directory\n"
    )


def test_controller_needs_no_node_directories_to_start(tmp_path: Path) -> None:
    """The controller only names node paths: a prefix and kubelet root that do not exist here
    pass its configuration; it stops at the missing Kubernetes credentials instead."""
    result = run_command(
        "controller",
        HOSTPATH_PREFIX="/var/lib/pg-reflinker-nowhere",
        TARGET_ROOT="/var/lib/kubelet-nowhere",
        CSI_ENDPOINT=f"unix://{tmp_path}/csi.sock",
    )
    assert result.returncode == 1
    assert result.stderr.startswith("reflinker-csi: no Kubernetes configuration (")
    assert result.stderr.endswith("); run inside a pod with a service account or set KUBECONFIG\n")
