"""Which node a new volume goes to, from the CSI topology requirement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Placement:
    """Where a new empty volume may go, as the orchestrator sees it.

    nodes: nodes that run the node plugin, have room and take new pods, most free space first.
    with_node: the node it must share (another claim of the same database instance lives there,
    or the scheduler already chose the node of the claim's pod), and with_what says why.
    avoid: nodes holding another instance of the same database: a replica there would go down
    with its primary."""

    nodes: Sequence[str]
    with_node: str = ""
    with_what: str = ""
    avoid: frozenset[str] = frozenset()


def choose_node(
    preferred: Sequence[Segments], requisite: Sequence[Segments], placement: Placement
) -> str:
    """The node the placement pins, or: preferred nodes first, then requisite ones, then (with
    no requirement) the placement's own order; a node the placement avoids only when no other
    fits."""
    pref, req = _nodes(preferred), _nodes(requisite)
    if placement.with_node:
        node = placement.with_node
        if req and node not in req:
            raise ResourceExhausted(
                f"the volume must be on node {node!r} with {placement.with_what}, but the "
                f"request allows only {sorted(set(req))}; check the StorageClass allowedTopologies"
            )
        if node not in placement.nodes:
            raise ResourceExhausted(
                f"the volume must be on node {node!r} with {placement.with_what}, but that node "
                "has no room reported by its pg-reflinker node plugin or is cordoned; free space "
                "there or uncordon it"
            )
        return node
    if not pref and not req:
        if not placement.nodes:
            raise ResourceExhausted(
                "no node can hold the volume: no schedulable node with a pg-reflinker node plugin "
                "has reported enough free space; check that the node DaemonSet runs and that "
                "HOSTPATH_PREFIX has room"
            )
        fitting = list(placement.nodes)
    else:
        allowed = set(req) if req else None
        fitting = [
            n
            for n in dict.fromkeys([*pref, *req])
            if (allowed is None or n in allowed) and n in placement.nodes
        ]
        if not fitting:
            raise ResourceExhausted(
                f"no requested node can hold the volume: requested {sorted(set(pref + req))}, "
                f"but only {sorted(placement.nodes)} run the pg-reflinker node plugin, take new "
                "pods and have enough free space; check the StorageClass allowedTopologies, the "
                "node plugin's NODE_ID, cordoned nodes and free space"
            )
    spread = [n for n in fitting if n not in placement.avoid]
    return (spread or fitting)[0]


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
