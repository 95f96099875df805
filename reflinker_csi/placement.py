"""Which node a new volume goes to, from the CSI topology requirement."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from . import TOPOLOGY_KEY
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
    preferred: Sequence[Segments],
    requisite: Sequence[Segments],
    placeable: Collection[str],
    default_node: str,
) -> str:
    """Preferred nodes first, then requisite ones; with no requirement, the default node."""
    pref, req = _nodes(preferred), _nodes(requisite)
    if not pref and not req:
        return default_node
    allowed = set(req) if req else None
    for node in [*pref, *req]:
        if (allowed is None or node in allowed) and node in placeable:
            return node
    raise ResourceExhausted(
        f"no requested node can hold the volume: requested {sorted(set(pref + req))}, "
        f"but the pg-reflinker node plugin runs only on {sorted(placeable)}; "
        "check the StorageClass allowedTopologies and the node plugin's NODE_ID"
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
