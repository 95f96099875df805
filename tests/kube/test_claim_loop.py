"""The claim loop's decisions in-process against a real API server: events a user reads in
`kubectl describe pvc`, waiting for a source, one slow clone not holding up other claims, and
records of claims that went away."""

from __future__ import annotations

import copy
import uuid

from reflinker_csi import DRIVER_NAME
from reflinker_csi.core.keys import FINALIZER, LABEL_GUID, LABEL_NODE
from reflinker_csi.kube.api import (
    CLAIMS,
    EVENTS,
    JSON,
    REFERENCEGRANTS,
    REFLINKVOLUMES,
    STORAGECLASSES,
    VOLUMES,
    Kube,
)
from reflinker_csi.kube.fields import obj, text
from reflinker_csi.kube.model import Meta
from reflinker_csi.kube.reflinkvolume import record_of
from reflinker_csi.kube.runtime import Informer
from tests.kube.conftest import NAMESPACES, Mode, wait_for


def claim(name: str, source: str = "", volume: str = "", source_ns: str = "") -> JSON:
    spec: JSON = {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "pg-reflinker",
        "resources": {"requests": {"storage": "6400Gi"}},
    }
    if source:
        spec["dataSourceRef"] = {"apiGroup": "", "kind": "PersistentVolumeClaim", "name": source}
        if source_ns:
            spec["dataSourceRef"]["namespace"] = source_ns  # type: ignore[index]
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


def counts(kube: Kube, ns: str, name: str) -> list[tuple[str, int]]:
    items, _ = kube.list(EVENTS, ns)
    return [
        (text(e, "message"), int(str(e.get("count") or 0)))
        for e in items
        if text(obj(e, "involvedObject"), "name") == name
    ]


def test_a_missing_source_is_named_and_found_once_it_exists(
    admin: Kube, mode: Mode, namespace: str
) -> None:
    admin.create(CLAIMS, claim("dev", source="tmpl"), namespace)
    first = wait_for("a ProvisioningFailed event", lambda: events(admin, namespace, "dev"))
    assert first[0] == (
        "Warning ProvisioningFailed: source claim 'tmpl' not found in namespaces "
        f"{namespace}, {namespace}-src, or not shared with namespace {namespace}: a claim of "
        "another namespace is cloned only while a ReferenceGrant in namespace "
        f"{namespace}-src lets PersistentVolumeClaims of namespace {namespace} use "
        "PersistentVolumeClaim tmpl (or all of them); create the claim, or ask the owner of its "
        "namespace for the grant (docs/cloning-cnpg.md#sources-in-other-namespaces)"
    )
    # Retries of the same failure count on that one Event, as client-go's recorder does.
    counted = wait_for(
        "the retry counted on the first Event",
        lambda: [c for m, c in counts(admin, namespace, "dev") if c >= 2],
    )
    assert counted and events(admin, namespace, "dev") == first[:1]
    admin.create(CLAIMS, claim("tmpl"), namespace)
    later = wait_for(
        "the next attempt to find the new source",
        lambda: [e for e in events(admin, namespace, "dev") if "not bound" in e],
    )
    assert later[0] == (
        f"Warning ProvisioningFailed: source claim {namespace}/tmpl is not bound to a volume; "
        "it is cloned once it is Bound"
    )


def test_the_claim_loop_serves_every_class_it_is_given_and_no_other(
    admin: Kube, mode: Mode, namespace: str
) -> None:
    """STORAGE_CLASS lists the driver's classes (the chart sets all of its own): a claim of the
    second class is served like one of the first; a claim of a class not listed is left alone."""
    foreign = claim("foreign-dev", source="absent")
    foreign["spec"]["storageClassName"] = "someone-elses"
    admin.create(CLAIMS, foreign, namespace)  # first: it would be answered first if served
    other = claim("native-dev", source="absent")
    other["spec"]["storageClassName"] = "pg-reflinker-native"
    admin.create(CLAIMS, other, namespace)
    served = wait_for("an event on the claim", lambda: events(admin, namespace, "native-dev"))
    assert "source claim 'absent' not found" in served[0], served
    assert events(admin, namespace, "foreign-dev") == []
    forget(admin, namespace, "native-dev", "foreign-dev")


def source_volume(admin: Kube, mode: Mode, ns: str, node: str, name: str = "src") -> str:
    """A Ready pg-reflinker volume on `node` (where no node plugin runs) bound to claim ns/name
    as the PV controller binds them: the claim Bound to the PV, the PV's claimRef naming the
    claim with its uid."""
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
    made = admin.create(CLAIMS, claim(name, volume=guid), ns)
    admin.create(
        VOLUMES,
        {
            "metadata": {"name": guid},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "claimRef": {"namespace": ns, "name": name, "uid": Meta.of(made).uid},
                "csi": {"driver": DRIVER_NAME, "volumeHandle": guid},
            },
        },
    )
    admin.merge_patch(CLAIMS, name, {"status": {"phase": "Bound"}}, ns, status=True)
    return guid


def grant(admin: Kube, source_ns: str, claims_of: str, source: str = "", name: str = "g") -> None:
    """The source namespace's consent: a ReferenceGrant from claims of claims_of."""
    to: JSON = {"group": "", "kind": "PersistentVolumeClaim"}
    if source:
        to["name"] = source
    admin.create(
        REFERENCEGRANTS,
        {
            "apiVersion": "gateway.networking.k8s.io/v1beta1",
            "kind": "ReferenceGrant",
            "metadata": {"name": name},
            "spec": {
                "from": [{"group": "", "kind": "PersistentVolumeClaim", "namespace": claims_of}],
                "to": [to],
            },
        },
        source_ns,
    )


def forget(admin: Kube, namespace: str, *names: str) -> None:
    """Delete the claims and their records, so the loops of later tests find nothing of them
    (no node plugin runs on the far nodes to remove the records' finalizers)."""
    for name in names:
        admin.delete(CLAIMS, name, namespace)
    for value in admin.list(REFLINKVOLUMES)[0]:
        claim_key = record_of(value).context.get("pg-reflinker.csi/claim", "")
        if claim_key in {f"{namespace}/{n}" for n in names}:
            name = Meta.of(value).name
            admin.merge_patch(REFLINKVOLUMES, name, {"metadata": {"finalizers": []}})
            admin.delete(REFLINKVOLUMES, name)


def test_no_clone_of_another_namespace_without_its_reference_grant(
    admin: Kube, mode: Mode, namespace: str
) -> None:
    """NAMESPACE_PATH says where to look, not who may copy: the source namespace consents with
    a ReferenceGrant, read on every attempt. Without it the refusal is the answer for a claim
    that does not exist at all (a tenant learns nothing of the other namespace's claims) and
    names nothing of the source (no pod, node or path); no volume is reserved."""
    other = f"{namespace}-src"
    admin.create(NAMESPACES, {"metadata": {"name": other}})
    source_volume(admin, mode, other, node=f"{namespace}-far")
    needs = (
        "Warning ProvisioningFailed: source claim 'src' not found in namespaces "
        f"{namespace}, {other}, or not shared with namespace {namespace}: a claim of another "
        f"namespace is cloned only while a ReferenceGrant in namespace {other} lets "
        f"PersistentVolumeClaims of namespace {namespace} use PersistentVolumeClaim src (or all "
        "of them); create the claim, or ask the owner of its namespace for the grant "
        "(docs/cloning-cnpg.md#sources-in-other-namespaces)"
    )
    admin.create(CLAIMS, claim("probe", source="absent"), namespace)
    absent = wait_for(
        "the answer for a claim that is nowhere", lambda: events(admin, namespace, "probe")
    )
    assert absent[0] == needs.replace("'src'", "'absent'").replace("Claim src", "Claim absent")
    admin.create(CLAIMS, claim("steal", source="src"), namespace)
    first = wait_for("the refusal", lambda: events(admin, namespace, "steal"))
    assert first[0] == needs
    # A grant for other claims of the namespace, or from another namespace, is no consent.
    grant(admin, other, claims_of=namespace, source="not-src", name="other-claim")
    grant(admin, other, claims_of=f"{namespace}-x", name="other-namespace")

    def mine() -> list[JSON]:
        return [
            v
            for v in admin.list(REFLINKVOLUMES)[0]
            if record_of(v).context.get("pg-reflinker.csi/claim") == f"{namespace}/steal"
        ]

    refused = needs.removeprefix("Warning ProvisioningFailed: ")
    wait_for(
        "a second refusal",
        lambda: [c for m, c in counts(admin, namespace, "steal") if m == refused and c >= 2],
    )
    assert mine() == []
    # Consent: the clone goes ahead.
    grant(admin, other, claims_of=namespace, source="src", name="consent")
    wait_for("the clone to start", lambda: mine())
    assert f"Normal Provisioning: cloning source claim {other}/src" in events(
        admin, namespace, "steal"
    )
    # Consent withdrawn: the next claim is refused again.
    admin.delete(REFERENCEGRANTS, "consent", other)
    admin.create(CLAIMS, claim("again", source="src"), namespace)
    again = wait_for("the refusal of a new claim", lambda: events(admin, namespace, "again"))
    assert again[0].startswith(needs)
    assert all("node" not in e and "pod" not in e for e in first + again)
    forget(admin, namespace, "steal", "again", "probe")


def test_a_claim_that_names_another_namespaces_volume_is_no_way_to_its_data(
    admin: Kube, mode: Mode, namespace: str
) -> None:
    """The bait-claim attack: in a namespace it may write (on NAMESPACE_PATH), a tenant makes a
    claim `bait` whose spec.volumeName is the victim's PV (it stays Pending: the PV's claimRef
    names the victim's claim), grants its own namespace that claim, and asks for a clone of
    `bait`. Consent was given only for `bait`, never by the victim's namespace: the clone is
    refused as unbound, nothing is reserved, and the answer names nothing of the victim."""
    victim, shared = f"{namespace}-victim", f"{namespace}-src"
    for ns in (victim, shared):
        admin.create(NAMESPACES, {"metadata": {"name": ns}})
    guid = source_volume(admin, mode, victim, node=f"{namespace}-far", name="pg-prod-1")
    admin.create(CLAIMS, claim("bait", volume=guid), shared)
    grant(admin, shared, claims_of=namespace, source="bait")
    admin.create(CLAIMS, claim("loot", source="bait"), namespace)
    refused = wait_for("the refusal", lambda: events(admin, namespace, "loot"))
    assert refused[0] == (
        f"Warning ProvisioningFailed: source claim {shared}/bait is not bound to a volume; it "
        "is cloned once it is Bound"
    )
    wait_for(
        "a second refusal",
        lambda: [c for _, c in counts(admin, namespace, "loot") if c >= 2],
    )
    assert not [
        v
        for v in admin.list(REFLINKVOLUMES)[0]
        if record_of(v).context.get("pg-reflinker.csi/claim") == f"{namespace}/loot"
    ]
    assert all(victim not in e and guid not in e for e in events(admin, namespace, "loot"))
    forget(admin, namespace, "loot")


def test_a_claim_of_a_native_class_is_cloned_natively(
    admin: Kube, mode: Mode, namespace: str
) -> None:
    """The claim loop passes its StorageClass's parameters as csi-provisioner passes them to
    CreateVolume: a class with cloneMethod native gets native clones, not auto ones."""
    other = f"{namespace}-src"
    admin.create(NAMESPACES, {"metadata": {"name": other}})
    source_volume(admin, mode, other, node=f"{namespace}-far")
    grant(admin, other, claims_of=namespace)
    native = f"{namespace}-native"
    admin.create(
        STORAGECLASSES,
        {
            "metadata": {"name": native},
            "provisioner": DRIVER_NAME,
            "parameters": {"cloneMethod": "native"},
        },
    )
    mode.controller.claim_loop.storage_classes += (native,)
    try:
        made = claim("natively", source="src")
        made["spec"]["storageClassName"] = native  # type: ignore[index]
        admin.create(CLAIMS, made, namespace)
        [value] = wait_for(
            "the clone's record",
            lambda: [
                v
                for v in admin.list(REFLINKVOLUMES)[0]
                if record_of(v).context.get("pg-reflinker.csi/claim") == f"{namespace}/natively"
            ],
        )
        assert record_of(value).parameters == {"cloneMethod": "native"}
    finally:
        mode.controller.claim_loop.storage_classes = mode.controller.claim_loop.storage_classes[:-1]
        forget(admin, namespace, "natively")
        admin.delete(STORAGECLASSES, native)


def test_a_claim_no_node_can_serve_is_refused_before_anything_is_copied(
    admin: Kube, mode: Mode, namespace: str
) -> None:
    """The claim loop makes the checks CreateVolume makes: a ReadWriteMany or Block claim gets
    an event saying what to change, and no record and no PV (a PV would bind and then never
    mount)."""
    other = f"{namespace}-src"
    admin.create(NAMESPACES, {"metadata": {"name": other}})
    source_volume(admin, mode, other, node=f"{namespace}-far")
    grant(admin, other, claims_of=namespace)
    shared = claim("shared", source="src")
    shared["spec"]["accessModes"] = ["ReadWriteMany"]  # type: ignore[index]
    raw = claim("raw", source="src")
    raw["spec"]["volumeMode"] = "Block"  # type: ignore[index]
    admin.create(CLAIMS, shared, namespace)
    admin.create(CLAIMS, raw, namespace)
    assert wait_for("the refusal", lambda: events(admin, namespace, "shared"))[0] == (
        f"Warning ProvisioningFailed: claim {namespace}/shared: access mode ReadWriteMany is not "
        "supported: a volume lives on one node, so only single-node modes (ReadWriteOnce, "
        "ReadWriteOncePod, ReadOnlyOnce) work"
    )
    assert wait_for("the refusal", lambda: events(admin, namespace, "raw"))[0] == (
        f"Warning ProvisioningFailed: claim {namespace}/raw: block access is not supported: "
        "pg-reflinker volumes are directories (use mount); set volumeMode: Filesystem"
    )
    claims = (f"{namespace}/shared", f"{namespace}/raw")
    assert not [
        v
        for v in admin.list(REFLINKVOLUMES)[0]
        if record_of(v).context.get("pg-reflinker.csi/claim") in claims
    ]
    assert not [
        v
        for v in admin.list(VOLUMES)[0]
        if text(obj(obj(v, "spec"), "claimRef"), "namespace") == namespace
    ]
    forget(admin, namespace, "shared", "raw")


def test_the_orphan_sweep_removes_nothing_its_stale_cache_misses(
    admin: Kube, mode: Mode, namespace: str
) -> None:
    """A claim missing from the claims cache (as while it lists again) is not taken for deleted:
    the API server is asked before a clone in progress is removed."""
    other = f"{namespace}-src"
    admin.create(NAMESPACES, {"metadata": {"name": other}})
    source_volume(admin, mode, other, node=f"{namespace}-far")
    grant(admin, other, claims_of=namespace)
    admin.create(CLAIMS, claim("busy", source="src"), namespace)

    def record() -> JSON | None:
        for value in admin.list(REFLINKVOLUMES)[0]:
            if record_of(value).context.get("pg-reflinker.csi/claim") == f"{namespace}/busy":
                return value
        return None

    name = Meta.of(wait_for("the clone in progress", record)).name
    stale = copy.copy(mode.controller.claim_loop)
    stale.claims = Informer(admin, CLAIMS)  # never listed: it holds no claim at all
    stale.reconcile_record(name)
    value = admin.get(REFLINKVOLUMES, name)
    assert value is not None and not Meta.of(value).deleting
    # Once the claim is really gone, the same sweep removes the clone.
    admin.delete(CLAIMS, "busy", namespace)
    stale.reconcile_record(name)
    value = admin.get(REFLINKVOLUMES, name)
    assert value is None or Meta.of(value).deleting
    forget(admin, namespace, "busy")


def test_a_source_named_by_data_source_ref_namespace_needs_the_grant_too(
    admin: Kube, mode: Mode, namespace: str
) -> None:
    elsewhere = f"{namespace}-far-ns"  # not on NAMESPACE_PATH: named by the claim itself
    admin.create(NAMESPACES, {"metadata": {"name": elsewhere}})
    source_volume(admin, mode, elsewhere, node=f"{namespace}-far")
    admin.create(CLAIMS, claim("named", source="src", source_ns=elsewhere), namespace)
    first = wait_for("the refusal", lambda: events(admin, namespace, "named"))
    assert first[0].startswith(
        f"Warning ProvisioningFailed: source claim 'src' not found in namespace {elsewhere}, or "
        f"not shared with namespace {namespace}: a claim of another namespace is cloned only "
        f"while a ReferenceGrant in namespace {elsewhere} lets"
    ), first
    grant(admin, elsewhere, claims_of=namespace)
    wait_for(
        "the clone to start",
        lambda: (
            f"Normal Provisioning: cloning source claim {elsewhere}/src"
            in events(admin, namespace, "named")
        ),
    )
    wait_for(
        "the clone's record",
        lambda: [
            v
            for v in admin.list(REFLINKVOLUMES)[0]
            if record_of(v).context.get("pg-reflinker.csi/claim") == f"{namespace}/named"
        ],
    )
    forget(admin, namespace, "named")


def test_a_clone_waiting_for_its_node_holds_up_no_other_claim_and_goes_with_its_claim(
    admin: Kube, mode: Mode, namespace: str
) -> None:
    other = f"{namespace}-src"
    admin.create(NAMESPACES, {"metadata": {"name": other}})
    grant(admin, other, claims_of=namespace)
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
