"""Validation by intervention: scale a feature under constrained patching (attention patterns, norm scales
and every other feature held) and check that each downstream pre-activation and logit moves by what the
graph's edge weight predicts.

Because the frozen replacement model is affine in the features, scaling a source's activation by `factor`
moves a target by exactly `weight * (factor - 1)`; a mismatch means the graph and the model disagree. The
`live` column shows the fuller effect when downstream features respond (attention and norms still frozen).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from mri.errors import MriError
from mri.trace.export import graph_json, parse_node
from mri.trace.graph import Graph
from mri.trace.replacement import FrozenOutput, ReplacementModel


class EdgeCheck(NamedTuple):
    """One edge, predicted against measured."""

    source: str
    """Source node id (a feature)."""
    target: str
    """Target node id (a feature's pre-activation, or a logit minus the mean logit)."""
    weight: float
    """The graph's edge weight."""
    predicted: float
    """weight * (factor - 1): the target's predicted change."""
    measured: float
    """The target's change under constrained patching."""
    live: float
    """The target's change when downstream features are recomputed (attention and norms frozen)."""

    @property
    def error(self) -> float:
        """|measured - predicted| relative to |predicted|."""
        return abs(self.measured - self.predicted) / max(abs(self.predicted), 1e-12)


class Validation(NamedTuple):
    """What `validate` found."""

    factor: float
    """Each source's activation was multiplied by this (0: ablated)."""
    edges: list[EdgeCheck]

    @property
    def max_error(self) -> float:
        """Largest relative error over the edges (0 when none were checked)."""
        return max((e.error for e in self.edges), default=0.0)

    def table(self) -> str:
        """The checks as aligned text."""
        head = f"{'source':>16} {'target':>16} {'weight':>10} {'predicted':>10} {'measured':>10} {'live':>10}"
        lines = [head]
        for e in self.edges:
            lines.append(
                f"{e.source:>16} {e.target:>16} {e.weight:>10.4g} {e.predicted:>10.4g} {e.measured:>10.4g} {e.live:>10.4g}"
            )
        return "\n".join(lines)


def _edges(graph: Graph | dict[str, Any]) -> tuple[list[int], list[tuple[dict, dict, float]]]:
    data = graph_json(graph) if isinstance(graph, Graph) else graph
    nodes = {n["node_id"]: n for n in data["nodes"]}
    ids = data["metadata"].get("info", {}).get("input_ids")
    if ids is None:
        raise MriError("this graph file has no metadata.info.input_ids; validate graphs written by mri")
    edges = [(nodes[link["source"]], nodes[link["target"]], float(link["weight"])) for link in data["links"]]
    return ids, edges


def _measure(rm: ReplacementModel, out: FrozenOutput, node: dict) -> float:
    kind, key = parse_node(node)
    if kind == "feature":
        layer, pos, latent = key
        return float(rm.preactivation(out, layer, pos, latent)[0])
    return float(rm.logit_effect(out, key[0])[0])


@torch.no_grad()
def validate(
    graph: Graph | dict[str, Any], rm: ReplacementModel, *, n_edges: int = 20, factor: float = 2.0
) -> Validation:
    """Check the `n_edges` strongest feature -> feature/logit edges of `graph` (a Graph, or a graph file's
    dict) by scaling each source feature by `factor` under constrained patching."""
    ids, edges = _edges(graph)
    candidates = [
        (s, t, w)
        for s, t, w in edges
        if parse_node(s)[0] == "feature" and parse_node(t)[0] in ("feature", "logit")
    ]
    candidates.sort(key=lambda e: -abs(e[2]))
    chosen = candidates[:n_edges]
    snap = rm.prepare(torch.tensor(ids))
    base = rm.run(snap)
    base_live = rm.run(snap, live=True)
    by_source: dict[str, list[tuple[dict, dict, float]]] = {}
    for s, t, w in chosen:
        by_source.setdefault(s["node_id"], []).append((s, t, w))
    checks = []
    for group in by_source.values():
        source = group[0][0]
        layer, pos, latent = parse_node(source)[1]
        act = float(rm._lookup(snap, torch.tensor([[layer, pos, latent]]))[0])
        change = {(layer, pos, latent): factor * act}
        constrained = rm.run(snap, change)
        live = rm.run(snap, change, live=True)
        for s, t, w in group:
            checks.append(
                EdgeCheck(
                    source=s["node_id"],
                    target=t["node_id"],
                    weight=w,
                    predicted=w * (factor - 1),
                    measured=_measure(rm, constrained, t) - _measure(rm, base, t),
                    live=_measure(rm, live, t) - _measure(rm, base_live, t),
                )
            )
    return Validation(factor, checks)
