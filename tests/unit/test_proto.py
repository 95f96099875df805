"""The generated csi/ modules match proto/csi.proto."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_csi_modules_are_current(tmp_path: Path) -> None:
    (tmp_path / "csi").mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Icsi=" + str(ROOT / "proto"),
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "csi/csi.proto",
        ],
        check=True,
    )
    for name in ("csi_pb2.py", "csi_pb2_grpc.py"):
        fresh = (tmp_path / "csi" / name).read_text()
        committed = (ROOT / "csi" / name).read_text()
        assert fresh == committed, f"csi/{name} is stale: run `make proto` and commit the result"


def test_proto_is_the_csi_v1_12_wire_contract() -> None:
    from csi import csi_pb2

    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    fields = csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name
    assert fields["mutable_parameters"].number == 8
    assert fields["accessibility_requirements"].number == 7
    assert csi_pb2.ControllerServiceCapability.RPC.GET_SNAPSHOT == 15
    assert csi_pb2.Snapshot.DESCRIPTOR.fields_by_name["group_snapshot_id"].number == 6
