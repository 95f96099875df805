"""Kubernetes-mode rules that need no cluster: record names, record round trips, path mapping."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from reflinker_csi.core import errors
from reflinker_csi.core.layout import Layout
from reflinker_csi.core.locator import SourceLocation
from reflinker_csi.core.records import CloneMode, HandOff, Kind, Phase, Step, VolumeRecord
from reflinker_csi.core.space import parse_quantity
from reflinker_csi.kube.controller.materializer import host_path_of
from reflinker_csi.kube.model import Claim, Pod
from reflinker_csi.kube.reflinkvolume import (
    FIELDS,
    hand_off_body,
    hand_off_of,
    record_name,
    record_of,
    status_body,
    to_body,
)

ROOT = Path(__file__).resolve().parents[2]

SRC = "11111111-2222-4333-8444-555555555555"
NEW = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"


def test_record_names_are_stable_and_valid() -> None:
    assert (
        record_name(Kind.VOLUME, "pvc-0b6f4c1e-1111-4222-8333-444455556666")
        == "pvc-0b6f4c1e-1111-4222-8333-444455556666"
    )
    odd = record_name(Kind.VOLUME, "Sanity Volume/ÄÖ")
    assert odd == record_name(Kind.VOLUME, "Sanity Volume/ÄÖ") and odd.startswith("vol-")
    assert record_name(Kind.SNAPSHOT, "snap") != record_name(Kind.VOLUME, "snap")
    assert len(record_name(Kind.VOLUME, "x" * 128)) <= 63


def test_record_round_trips_through_the_custom_resource() -> None:
    record = VolumeRecord(
        guid=NEW,
        name="pvc-1",
        node="node-a",
        required_bytes=5,
        limit_bytes=0,
        parameters={"csi.storage.k8s.io/pvc/name": "c"},
        source_volume_id=SRC,
        clone_mode=CloneMode.HOT,
        context={"pg-reflinker.csi/claim": "apps/c"},
    )
    obj = to_body(record)
    meta = obj["metadata"]
    assert isinstance(meta, dict)
    assert meta["finalizers"] == ["pg-reflinker.csi/node-agent"]
    assert meta["labels"] == {"pg-reflinker.csi/node": "node-a", "pg-reflinker.csi/guid": NEW}
    obj["status"] = {"phase": "Failed", "code": "RESOURCE_EXHAUSTED", "message": "no space"}
    back = record_of(obj)
    assert back.phase == Phase.FAILED and back.code == "RESOURCE_EXHAUSTED"
    assert (back.guid, back.name, back.source_volume_id, back.clone_mode, back.context) == (
        record.guid,
        record.name,
        record.source_volume_id,
        CloneMode.HOT,
        record.context,
    )
    meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert record_of(obj).phase == Phase.DELETING


def test_a_native_clones_hand_off_round_trips_and_counts_only_its_own_attempt() -> None:
    wanted = HandOff(
        attempt="a1",
        step=Step.FINISH,
        source_dir="/p/src/pgdata",
        volumes={"/var/lib/postgresql/wal": "/p/wal"},
        system_id="7714195230706104125",
        start_lsn="0/2000028",
        segment_bytes=16 << 20,
        stop_lsn="0/2001E88",
        label_file="START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n",
    )
    body = {
        "spec": {"backup": hand_off_body(wanted)},
        "status": {"backup": {"attempt": "a1", "done": "Copy"}},
    }
    assert hand_off_of(body["spec"]["backup"], body["status"]["backup"]) == dataclasses.replace(
        wanted, done=Step.COPY
    )
    # The node's answer for an earlier attempt is not this attempt's.
    assert hand_off_of(body["spec"]["backup"], {"attempt": "a0", "done": "Finish"}).done is None  # type: ignore[union-attr]
    # Hostile or partial hand-offs read as none, never as a step to act on.
    for bad in ({"step": "Copy"}, {"attempt": "a1", "step": "Delete"}, {"attempt": 5, "step": 7}):
        assert hand_off_of(bad, {}) is None


def test_hostile_objects_read_as_empty_fields_not_crashes() -> None:
    """Wrong types anywhere in an object read as empty: a loop never dies on one object."""
    pod = Pod.of(
        {
            "metadata": [],
            "spec": {"volumes": "x", "containers": [{"ports": [{"containerPort": "a"}]}]},
        }
    )
    assert (pod.meta.name, pod.claims, pod.containers[0].ports) == ("", (), (("", 0),))
    claim = Claim.of(
        {
            "spec": {
                "dataSourceRef": {"kind": "PersistentVolumeClaim", "apiGroup": "x.io", "name": "a"}
            }
        }
    )
    assert claim.source is None  # a claim of another API group is not ours to clone
    record = record_of({"spec": {"guid": 7, "kind": "weird", "cloneMode": None}, "status": "x"})
    assert (record.guid, record.kind, record.clone_mode, record.phase) == (
        "",
        Kind.VOLUME,
        CloneMode.NONE,
        Phase.PENDING,
    )


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("1Gi", 1 << 30),
        ("6400Gi", 6400 << 30),
        ("500M", 500_000_000),
        ("1.5Ki", 1536),
        ("12", 12),
        ("1e9", 10**9),
        ("1E3", 1000),
        ("2.5e-1", 1),  # a fraction of a byte rounds up, as Kubernetes reads it
        ("1E", 10**18),
        ("+5k", 5000),
        (".5Gi", 1 << 29),
        ("100m", None),  # a tenth of a byte is no size
        ("5u", None),
        ("-1Gi", None),
        ("Gi", None),
        ("", None),
        ("9Ei", None),  # beyond int64
        ("1e999", None),
    ],
)
def test_quantities_are_read_as_kubernetes_reads_them(quantity: str, expected: int | None) -> None:
    """A claim of 1e9 or 500M is that many bytes: never read as "no size", which would leave a
    btrfs volume uncapped (found when 1e9 parsed as 0)."""
    assert parse_quantity(quantity) == expected


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


def location(mount: str = "/var/lib/postgresql/data") -> SourceLocation:
    return SourceLocation(node="node-a", host_path=Path("/prefix") / SRC, mount_path=mount)


def test_returned_path_inside_the_pod_mount_maps_into_the_source_volume(layout: Layout) -> None:
    path = host_path_of(f"/var/lib/postgresql/data/.pg-reflinker/{NEW}", location(), layout, NEW)
    assert path == f"/prefix/{SRC}/.pg-reflinker/{NEW}"


def test_returned_prefix_path_is_taken_as_is(layout: Layout) -> None:
    assert host_path_of(str(layout.prefix / NEW), location(), layout, NEW) == str(
        layout.prefix / NEW
    )


@pytest.mark.parametrize(
    "returned",
    [
        "/etc/" + NEW,
        f"/var/lib/postgresql/data/../../../etc/{NEW}",
        "/var/lib/postgresql/data/.pg-reflinker/other-label",
        f"/var/lib/postgresql/database/{NEW}",
    ],
)
def test_returned_path_outside_both_is_refused_naming_it(layout: Layout, returned: str) -> None:
    with pytest.raises(errors.FailedPrecondition) as err:
        host_path_of(returned, location(), layout, NEW)
    assert repr(returned) in str(err.value)


def test_a_reference_grant_consents_only_to_claims_of_the_namespace_it_names() -> None:
    from reflinker_csi.kube.model import grants_clone

    def grant(from_: list[dict[str, str]], to: list[dict[str, str]]) -> dict[str, object]:
        return {"spec": {"from": from_, "to": to}}

    pvc_from = {"group": "", "kind": "PersistentVolumeClaim", "namespace": "tenant"}
    all_pvcs = {"group": "", "kind": "PersistentVolumeClaim"}
    assert grants_clone(grant([pvc_from], [all_pvcs]), "tenant", "pg-prod-1")
    assert grants_clone(
        grant([pvc_from], [{**all_pvcs, "name": "pg-prod-1"}]), "tenant", "pg-prod-1"
    )
    assert not grants_clone(
        grant([pvc_from], [{**all_pvcs, "name": "other"}]), "tenant", "pg-prod-1"
    )
    assert not grants_clone(grant([pvc_from], [all_pvcs]), "evil", "pg-prod-1")
    # Other kinds and groups are other consents (a Gateway's HTTPRoute, a VolumeSnapshot).
    assert not grants_clone(
        grant(
            [{**pvc_from, "kind": "HTTPRoute", "group": "gateway.networking.k8s.io"}], [all_pvcs]
        ),
        "tenant",
        "pg-prod-1",
    )
    assert not grants_clone(
        grant([pvc_from], [{"group": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot"}]),
        "tenant",
        "pg-prod-1",
    )
    # Hostile shapes read as no consent.
    assert not grants_clone({"spec": {"from": "tenant", "to": None}}, "tenant", "pg-prod-1")
    assert not grants_clone({}, "tenant", "pg-prod-1")


def test_the_crd_declares_every_field_the_reflinkvolume_module_writes() -> None:
    """kube/reflinkvolume.py is the record's schema in code; the CRD must declare each of its
    fields (a field the API server does not know is pruned: the record would lose it)."""
    crd = yaml.safe_load((ROOT / "charts/pg-reflinker/crds/reflinkvolume.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part, names in FIELDS.items():
        node = schema
        for step in part.split("."):
            node = node["properties"][step]
        assert set(names) <= set(node["properties"]), (part, set(names) - set(node["properties"]))
    # FIELDS is what the writers write: the bodies use no name it lacks.
    record = VolumeRecord(guid="g", name="n", node="a", required_bytes=1, limit_bytes=0)
    assert set(to_body(record)["spec"]) <= set(FIELDS["spec"])  # type: ignore[arg-type]
    assert set(status_body(Phase.READY)["status"]) <= set(FIELDS["status"])  # type: ignore[arg-type]
    hand_off = HandOff("a", Step.COPY, "/d", {}, "1", "0/0", 16 << 20)
    assert set(hand_off_body(hand_off)) == set(FIELDS["spec.backup"])
