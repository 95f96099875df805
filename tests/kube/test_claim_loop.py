"""The claim loop's decisions in-process against a real API server: events a user reads in
`kubectl describe pvc`, waiting for a source, one slow clone not holding up other claims, and
records of claims that went away."""

from __future__ import annotations

import uuid

from reflinker_csi import DRIVER_NAME
from reflinker_csi.core.keys import FINALIZER, LABEL_GUID, LABEL_NODE
from reflinker_csi.kube.api import CLAIMS, EVENTS, JSON, REFLINKVOLUMES, VOLUMES, Kube
from reflinker_csi.kube.model import Meta, obj, record_of, text
from tests.kube.conftest import NAMESPACES, Mode, wait_for


def claim(name: str, source: str = "", volume: str = "") -> JSON:
    spec: JSON = {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "pg-reflinker",
        "resources": {"requests": {"storage": "6400Gi"}},
    }
    if source:
        spec["dataSourceRef"] = {"apiGroup": "", "kind": "PersistentVolumeClaim", "name": source}
    if volume:
        spec["volumeName"] = volume
        spec["storageClassName"] = ""
    return {"metadata": {"name": name}, "spec": spec}


def events(kube: Kube, ns: str, name: str) -> list[str]:
    items, _ = kube.list(EVENTS, ns)
    return [
        f"{text(e, 'type')} {text(e, 'reason')}: {text(e, 'message')}"
        for e in sorted(items, key=lambda e: Meta.of(e).created + Meta.of(e).name)
        if text(obj(e, "involvedObject"), "name") == name
    ]


def test_a_missing_source_is_named_and_found_once_it_exists(
    admin: Kube, mode: Mode, namespace: str
) -> None:
    admin.create(CLAIMS, claim("dev", source="tmpl"), namespace)
    first = wait_for("a ProvisioningFailed event", lambda: events(admin, namespace, "dev"))
    assert first[0] == (
        "Warning ProvisioningFailed: source claim 'tmpl' not found in namespaces "
        f"{namespace}, {namespace}-src; "
        "create it there or add its namespace to NAMESPACE_PATH (retrying in 2 s)"
    )
    admin.create(CLAIMS, claim("tmpl"), namespace)
    later = wait_for(
        "the next attempt to find the new source",
        lambda: [e for e in events(admin, namespace, "dev") if "not Bound" in e],
    )
    assert later[0] == (
        f"Warning ProvisioningFailed: source claim {namespace}/tmpl is not Bound to a volume "
        "yet (retrying in 4 s)"
    )


def source_volume(admin: Kube, mode: Mode, ns: str, node: str) -> str:
    """A Ready pg-reflinker volume on `node` (where no node plugin runs) bound to claim ns/src."""
    guid = str(uuid.uuid4())
    admin.create(
        REFLINKVOLUMES,
        {
            "apiVersion": "pg-reflinker.csi/v1alpha1",
            "kind": "ReflinkVolume",
            "metadata": {
                "name": f"pvc-{guid}",
                "labels": {LABEL_GUID: guid, LABEL_NODE: node},
            },
            "spec": {"guid": guid, "requestName": f"pvc-{guid}", "nodeName": node},
        },
    )
    admin.merge_patch(REFLINKVOLUMES, f"pvc-{guid}", {"status": {"phase": "Ready"}}, status=True)
    admin.create(
        VOLUMES,
        {
            "metadata": {"name": guid},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "claimRef": {"namespace": ns, "name": "src"},
                "csi": {"driver": DRIVER_NAME, "volumeHandle": guid},
            },
        },
    )
    admin.create(CLAIMS, claim("src", volume=guid), ns)
    return guid


def test_a_clone_waiting_for_its_node_holds_up_no_other_claim_and_goes_with_its_claim(
    admin: Kube, mode: Mode, namespace: str
) -> None:
    other = f"{namespace}-src"
    admin.create(NAMESPACES, {"metadata": {"name": other}})
    source = source_volume(admin, mode, other, node=f"{namespace}-far")
    # The clone of "slow" is reserved on the source's node, whose node plugin never answers.
    admin.create(CLAIMS, claim("slow", source="src"), namespace)
    assert wait_for("the slow claim's first event", lambda: events(admin, namespace, "slow")) == [
        f"Normal Provisioning: cloning source claim {other}/src"
    ]
    admin.create(CLAIMS, claim("quick", source="nowhere"), namespace)
    wait_for("the quick claim's event", lambda: events(admin, namespace, "quick"))

    def reserved() -> list[JSON]:
        return [
            v
            for v in admin.list(REFLINKVOLUMES)[0]
            if record_of(v).context.get("pg-reflinker.csi/claim") == f"{namespace}/slow"
        ]

    [value] = wait_for("the slow claim's record", reserved)
    record = record_of(value)
    assert (record.node, record.source_volume_id, record.phase.value) == (
        f"{namespace}-far",
        source,
        "Pending",
    )
    # The slow claim is still waiting: no outcome yet, while the quick one has had its answer.
    assert events(admin, namespace, "slow") == [
        f"Normal Provisioning: cloning source claim {other}/src"
    ]
    assert record.required_bytes == 6400 << 30  # recorded, not held against free space

    admin.delete(CLAIMS, "slow", namespace)
    name = Meta.of(value).name
    wait_for(
        "the record of the deleted claim to be deleted",
        lambda: (
            Meta.of(
                admin.get(REFLINKVOLUMES, name) or {"metadata": {"deletionTimestamp": "x"}}
            ).deleting
        ),
    )
    # No node plugin runs on that node to remove the directory and the finalizer: do it here.
    current = admin.get(REFLINKVOLUMES, name)
    if current is not None:
        assert Meta.of(current).finalizers == (FINALIZER,)
        admin.merge_patch(REFLINKVOLUMES, name, {"metadata": {"finalizers": []}})
