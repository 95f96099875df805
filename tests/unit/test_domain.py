"""Pure domain rules: placement, request validation, error mapping, mountinfo parsing."""

from __future__ import annotations

import grpc
import pytest

from reflinker_csi import TOPOLOGY_KEY
from reflinker_csi.core import errors
from reflinker_csi.core.freshness import Position, check_lag, lag_bound
from reflinker_csi.core.layout import check_absolute_path, is_guid, require_guid
from reflinker_csi.core.placement import Placement, check_clone_node, choose_node
from reflinker_csi.core.volumes import CreateSpec, check_parameters
from reflinker_csi.disk.mounts import parse_mountinfo
from reflinker_csi.rpc.server import status_of


def seg(node: str) -> dict[str, str]:
    return {TOPOLOGY_KEY: node}


def test_no_requirement_places_on_the_node_with_most_room() -> None:
    assert choose_node([], [], Placement(["b", "a"])) == "b"


def test_no_requirement_and_no_node_with_room_is_resource_exhausted() -> None:
    with pytest.raises(errors.ResourceExhausted) as err:
        choose_node([], [], Placement([]))
    assert str(err.value) == (
        "no node can hold the volume: no schedulable node with a pg-reflinker node plugin has "
        "reported enough free space; check that the node DaemonSet runs and that "
        "HOSTPATH_PREFIX has room"
    )


def test_preferred_wins_over_requisite_order() -> None:
    assert choose_node([seg("b")], [seg("a"), seg("b")], Placement(["a", "b"])) == "b"


def test_requisite_used_when_no_preferred_node_can_be_placed() -> None:
    assert choose_node([seg("x")], [seg("x"), seg("a")], Placement(["a"])) == "a"


def test_requirement_excluding_every_node_names_the_nodes() -> None:
    with pytest.raises(errors.ResourceExhausted) as err:
        choose_node([], [seg("node-z")], Placement(["node-a"]))
    assert "node-z" in str(err.value) and "node-a" in str(err.value)


def test_a_replica_avoids_the_nodes_of_its_clusters_other_instances_while_another_fits() -> None:
    everywhere = [seg("a"), seg("b"), seg("c")]
    assert (
        choose_node(everywhere, everywhere, Placement(["a", "b", "c"], avoid=frozenset("a"))) == "b"
    )
    assert choose_node([], [], Placement(["a", "b"], avoid=frozenset("ab"))) == "a"


def test_a_claim_of_an_instance_goes_to_its_siblings_node_or_fails_naming_it() -> None:
    pinned = Placement(["a", "b"], with_node="b", with_what="claim ns/db-1 of instance db-1")
    assert choose_node([seg("a")], [seg("a"), seg("b")], pinned) == "b"
    with pytest.raises(errors.ResourceExhausted) as err:
        choose_node([], [seg("a")], pinned)
    assert "'b' with claim ns/db-1 of instance db-1" in str(err.value)
    with pytest.raises(errors.ResourceExhausted, match="cordoned"):
        choose_node([], [], Placement(["a"], with_node="b", with_what="claim ns/db-1"))


def test_unknown_topology_key_is_invalid() -> None:
    with pytest.raises(errors.InvalidArgument, match="zone"):
        choose_node([], [{"zone": "eu"}], Placement(["a"]))


def test_clone_stays_on_source_node_or_fails_naming_both() -> None:
    assert check_clone_node("a", [seg("b")], [seg("a"), seg("b")]) == "a"
    with pytest.raises(errors.ResourceExhausted) as err:
        check_clone_node("a", [], [seg("b")])
    assert "'a'" in str(err.value) and "'b'" in str(err.value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "../../etc",
        "/abs",
        "..",
        ".",
        "ABCDEF00-0000-4000-8000-000000000000",
        "0b6f4c1e-1111-4222-8333-44445555666",
        "0b6f4c1e-1111-4222-8333-444455556666/..",
        "0b6f4c1e-1111-4222-8333-444455556666\x00",
        "é" * 36,
    ],
)
def test_only_canonical_lowercase_uuids_name_volumes(value: str) -> None:
    assert not is_guid(value)
    with pytest.raises((errors.NotFound, errors.InvalidArgument)):
        require_guid(value)


@pytest.mark.parametrize("path", ["relative/target", "/a/../b", "/a\x00b", "/a\nb", ""])
def test_request_paths_must_be_absolute_and_clean(path: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        check_absolute_path(path, "target_path")


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (CreateSpec(name=""), errors.InvalidArgument),
        (CreateSpec(name="x" * 129), errors.InvalidArgument),
        (CreateSpec(name="a\x00b"), errors.InvalidArgument),
        (CreateSpec(name="ok", required_bytes=10, limit_bytes=5), errors.OutOfRange),
        (CreateSpec(name="ok", parameters={"fsType": "xfs"}), errors.InvalidArgument),
    ],
)
def test_create_spec_validation(spec: CreateSpec, error: type[Exception]) -> None:
    with pytest.raises(error):
        spec.validate()


def test_extra_create_metadata_parameters_are_accepted() -> None:
    CreateSpec(name="x" * 128, parameters={"csi.storage.k8s.io/pvc/name": "c"}).validate()


def test_clone_method_parameter_takes_three_values_and_names_them_otherwise() -> None:
    for method in ("auto", "function", "native"):
        CreateSpec(name="ok", parameters={"cloneMethod": method}).validate()
    with pytest.raises(errors.InvalidArgument) as err:
        CreateSpec(name="ok", parameters={"cloneMethod": "Native"}).validate()
    assert str(err.value) == (
        "StorageClass parameter cloneMethod is 'Native'; use auto, function, native (auto: "
        "reflink_snapshot() when the source has it, native otherwise)"
    )


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.VolumeNotFound("v"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.OperationInProgress("x"), grpc.StatusCode.ABORTED),
        (errors.StaleToken("x"), grpc.StatusCode.ABORTED),
        (errors.ReflinkUnsupported("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.VolumeInUse("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.OutOfRange("x"), grpc.StatusCode.OUT_OF_RANGE),
        (errors.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.SourceUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (NotImplementedError(), grpc.StatusCode.UNIMPLEMENTED),
        (OSError(28, "No space left on device"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (KeyError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_one_place_maps_errors_to_status_codes(exc: Exception, code: grpc.StatusCode) -> None:
    assert status_of(exc, "CreateVolume")[0] == code


def test_mountinfo_parsing_unescapes_paths() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "40 36 7:0 / /data ro,relatime shared:5 - xfs /dev/loop0 rw\n"
    )
    first, second = parse_mountinfo(text)
    assert first.mount_point == "/mnt two" and first.root == "/mnt1" and first.fs_type == "ext3"
    assert second.read_only and second.device == "7:0" and second.source == "/dev/loop0"


def test_an_instances_pieces_come_from_its_pods_volumes() -> None:
    from reflinker_csi.core.capture import pieces_of

    volumes = {
        "/var/lib/postgresql/wal": "/x/w",
        "/var/lib/postgresql/tablespaces/archive": "/x/a",
        "/var/lib/postgresql/tablespaces/hot": "/x/h",
        "/controller": "/x/c",  # not a claim CNPG copies
        "/var/lib/postgresql/tablespaces/a/b": "/x/ab",  # not where CNPG mounts one
    }
    assert pieces_of(volumes) == [
        "PG_DATA",
        "PG_WAL",
        "PG_TABLESPACE:archive",
        "PG_TABLESPACE:hot",
    ]
    assert pieces_of({}) == ["PG_DATA"]


def test_a_piece_is_found_only_inside_its_capture() -> None:
    from reflinker_csi.core.capture import Part, capture_name, part_of

    assert part_of("PG_DATA") == Part("pgdata", "pgdata")
    assert part_of("PG_WAL") == Part("pgdata/pg_wal", "pg_wal")
    assert part_of("PG_TABLESPACE:archive") == Part("tablespaces/archive", "")
    for hostile in ("PG_TABLESPACE:..", "PG_TABLESPACE:a/../../x", "PG_TABLESPACE:", "PG_X"):
        with pytest.raises(ValueError):
            part_of(hostile)
    # One capture per group and source instance, the same name on every retry.
    assert capture_name("instance apps/new-1", "apps/pg-1") == capture_name(
        "instance apps/new-1", "apps/pg-1"
    )
    assert capture_name("instance apps/new-1", "apps/pg-1") != capture_name(
        "instance apps/new-1", "apps/pg-2"
    )


@pytest.mark.parametrize(
    ("value", "seconds"), [("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("24h", 86400.0)]
)
def test_max_source_lag_reads_as_seconds(value: str, seconds: float) -> None:
    assert lag_bound({"maxSourceLag": value}) == seconds
    assert lag_bound({}) is None


@pytest.mark.parametrize("value", ["0", "25h", "-5s", "5 minutes", "1e3", ""])
def test_a_max_source_lag_that_is_no_duration_is_refused_naming_the_class(value: str) -> None:
    with pytest.raises(errors.InvalidArgument) as err:
        check_parameters({"maxSourceLag": value, "cloneMethod": "native"}, "StorageClass")
    assert "StorageClass parameter maxSourceLag" in str(err.value)
    assert "1s to 24h" in str(err.value)


def test_an_unknown_class_parameter_is_refused_naming_both_known_ones() -> None:
    with pytest.raises(errors.InvalidArgument) as err:
        check_parameters({"maxLag": "5s"}, "VolumeSnapshotClass")
    assert "['maxLag']" in str(err.value)
    assert "cloneMethod and maxSourceLag" in str(err.value)


def _at(**kw: object) -> Position:
    fields: dict[str, object] = {
        "lsn": "0/3000060",
        "in_recovery": True,
        "replayed_at": 1000.0,
        "streaming": True,
        "caught_up": False,
        "read_at": 1012.5,
    }
    return Position(**{**fields, **kw})  # type: ignore[arg-type]


def test_a_sources_lag_is_what_it_has_not_replayed_and_unknown_without_a_stream() -> None:
    assert _at().lag == 12.5
    assert _at(caught_up=True).lag == 0.0  # an idle production sends nothing to replay
    assert _at(in_recovery=False).lag == 0.0  # production itself
    assert _at(streaming=False).lag is None
    assert _at(replayed_at=None).lag is None
    assert _at().context() == {
        "pg-reflinker.csi/as-of-lsn": "0/3000060",
        "pg-reflinker.csi/as-of-time": "1970-01-01T00:16:40.000000Z",
        "pg-reflinker.csi/source-lag-seconds": "12.500",
    }
    with pytest.raises(ValueError):
        _at(lsn="0/3000060; DROP")


def test_a_copy_over_the_lag_bound_is_refused_saying_by_how_much() -> None:
    check_lag(_at(), None, "source")
    check_lag(_at(), 13.0, "source")
    with pytest.raises(errors.SourceUnavailable) as err:
        check_lag(_at(), 10.0, "CNPG cluster pg-copies")
    assert str(err.value).startswith("CNPG cluster pg-copies is 12.5 s behind production")
    assert "2.5 s over the StorageClass's maxSourceLag of 10 s" in str(err.value)
    with pytest.raises(errors.SourceUnavailable) as err:
        check_lag(_at(streaming=False), 10.0, "CNPG cluster pg-copies")
    assert "the stream from production is down" in str(err.value)
