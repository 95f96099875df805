"""Which node a new volume goes to, from the CSI topology requirement."""

from __future__ import annotations

from collections.abc import Sequence

from .. import TOPOLOGY_KEY
from .errors import InvalidArgument, ResourceExhausted

Segments = dict[str, str]


def _nodes(topologies: Sequence[Segments]) -> list[str]:
    nodes = []
    for segments in topologies:
        unknown = set(segments) - {TOPOLOGY_KEY}
        if unknown:
            raise InvalidArgument(
                f"topology segment keys {sorted(unknown)} are not offered by this driver; "
                f"it uses only {TOPOLOGY_KEY}"
            )
        if TOPOLOGY_KEY in segments:
            nodes.append(segments[TOPOLOGY_KEY])
    return nodes


def choose_node(
    preferred: Sequence[Segments], requisite: Sequence[Segments], placeable: Sequence[str]
) -> str:
    """Preferred nodes first, then requisite ones; with no requirement, the first placeable node
    (placeable: nodes that run the node plugin and have room, most free space first)."""
    pref, req = _nodes(preferred), _nodes(requisite)
    if not pref and not req:
        if not placeable:
            raise ResourceExhausted(
                "no node can hold the volume: no pg-reflinker node plugin has reported enough "
                "free space; check that the node DaemonSet runs and that HOSTPATH_PREFIX has room"
            )
        return placeable[0]
    allowed = set(req) if req else None
    for node in [*pref, *req]:
        if (allowed is None or node in allowed) and node in placeable:
            return node
    raise ResourceExhausted(
        f"no requested node can hold the volume: requested {sorted(set(pref + req))}, "
        f"but only {sorted(placeable)} run the pg-reflinker node plugin with enough free space; "
        "check the StorageClass allowedTopologies, the node plugin's NODE_ID and free space"
    )


def check_clone_node(
    source_node: str, preferred: Sequence[Segments], requisite: Sequence[Segments]
) -> str:
    """A clone must live on its source's node; fail when the requirement excludes that node."""
    req = _nodes(requisite)
    _nodes(preferred)
    if req and source_node not in req:
        raise ResourceExhausted(
            f"the clone must be on the source's node {source_node!r}, but the request allows only "
            f"{sorted(set(req))}; use volumeBindingMode: Immediate or a provisioner without "
            "--strict-topology for clones"
        )
    return source_node
