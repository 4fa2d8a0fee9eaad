"""`diff`: what changed between two attribution graphs — nodes and edges gained or lost, and edges whose
weight moved — e.g. the same prompt under a fine-tuned model, other dictionaries, or an edited prompt of the
same length. Nodes match by id (layer, latent and position; tokens by id and position)."""

from __future__ import annotations

from typing import Any, NamedTuple

from mri.trace.export import graph_json
from mri.trace.graph import Graph


class GraphDiff(NamedTuple):
    """Differences from graph A to graph B."""

    nodes_gained: list[str]
    """Node ids in B only."""
    nodes_lost: list[str]
    """Node ids in A only."""
    edges_gained: list[tuple[str, str, float]]
    """(source, target, weight in B) in B only, strongest first."""
    edges_lost: list[tuple[str, str, float]]
    """(source, target, weight in A) in A only, strongest first."""
    edges_changed: list[tuple[str, str, float, float]]
    """(source, target, weight in A, weight in B) present in both with a relative change above the
    tolerance, largest change first."""

    def summary(self) -> str:
        return (
            f"nodes +{len(self.nodes_gained)} -{len(self.nodes_lost)}; edges +{len(self.edges_gained)} "
            f"-{len(self.edges_lost)}, {len(self.edges_changed)} changed"
        )


def _as_json(graph: Graph | dict[str, Any]) -> dict[str, Any]:
    return graph_json(graph) if isinstance(graph, Graph) else graph


def diff(a: Graph | dict[str, Any], b: Graph | dict[str, Any], *, rel_tol: float = 0.1) -> GraphDiff:
    """Compare two graphs (Graph objects are pruned with the default thresholds first)."""
    ja, jb = _as_json(a), _as_json(b)
    na = {n["node_id"] for n in ja["nodes"]}
    nb = {n["node_id"] for n in jb["nodes"]}
    ea = {(x["source"], x["target"]): float(x["weight"]) for x in ja["links"]}
    eb = {(x["source"], x["target"]): float(x["weight"]) for x in jb["links"]}
    gained = sorted(((s, t, w) for (s, t), w in eb.items() if (s, t) not in ea), key=lambda e: -abs(e[2]))
    lost = sorted(((s, t, w) for (s, t), w in ea.items() if (s, t) not in eb), key=lambda e: -abs(e[2]))
    changed = [
        (s, t, ea[s, t], eb[s, t])
        for (s, t) in ea.keys() & eb.keys()
        if abs(eb[s, t] - ea[s, t]) > rel_tol * max(abs(ea[s, t]), abs(eb[s, t]), 1e-12)
    ]
    changed.sort(key=lambda e: -abs(e[3] - e[2]))
    return GraphDiff(sorted(nb - na), sorted(na - nb), gained, lost, changed)
