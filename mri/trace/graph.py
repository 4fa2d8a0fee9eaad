"""`Graph`: an attribution graph's nodes and dense adjacency; pruning by influence; replacement and
completeness scores.

Nodes are ordered [features, error nodes (layer-major: layer 0 at every position, then layer 1, ...),
token embeddings, logits]. `adjacency[target, source]` is the direct effect of the source node on the
target: a feature's pre-activation, or a logit minus the mean logit. Error, token and logit nodes have no
inputs; logits have no outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch


@dataclass
class Graph:
    """An attribution graph over one prompt."""

    prompt: str
    input_ids: torch.Tensor
    """(pos,) token ids."""
    tokens: list[str]
    """Each input token's text."""
    features: torch.Tensor
    """(n_features, 3) (layer, pos, latent) of the feature nodes, sorted."""
    activations: torch.Tensor
    """(n_features,) their activations."""
    logit_ids: torch.Tensor
    """(n_logits,) vocabulary ids of the logit nodes: most probable first, or the requested targets."""
    logit_probs: torch.Tensor
    """(n_logits,) their probabilities."""
    logit_tokens: list[str]
    """Their texts."""
    adjacency: torch.Tensor
    """(n_nodes, n_nodes) direct effects, rows are targets and columns sources."""
    n_layers: int
    n_latents: int
    info: dict[str, Any] = field(default_factory=dict)
    """Model, dictionaries, settings and timings."""

    @property
    def n_pos(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_logits(self) -> int:
        return int(self.logit_ids.shape[0])

    @property
    def n_nodes(self) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos + self.n_logits

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_layers * self.n_pos + pos

    def logit_index(self, k: int) -> int:
        return self.n_nodes - self.n_logits + k

    def feature_index(self, layer: int, pos: int, latent: int) -> int | None:
        """Node index of a feature, or None when it is not in the graph."""
        hit = (self.features == self.features.new_tensor([layer, pos, latent])).all(1).nonzero()
        return int(hit[0, 0]) if hit.numel() else None

    def logit_weights(self) -> torch.Tensor:
        """(n_nodes,) each logit node's probability, zero elsewhere: where influence starts."""
        w = self.adjacency.new_zeros(self.n_nodes)
        w[self.n_nodes - self.n_logits :] = self.logit_probs.to(w.dtype)
        return w


class PruneResult(NamedTuple):
    """What `prune` keeps."""

    node_mask: torch.Tensor
    """(n_nodes,) kept nodes (tokens and logits always)."""
    edge_mask: torch.Tensor
    """(n_nodes, n_nodes) kept edges."""
    cumulative_influence: torch.Tensor
    """(n_nodes,) share of total influence of this node and every node more influential than it."""


class GraphScores(NamedTuple):
    """How much of the graph's explanation runs through features rather than error nodes."""

    replacement: float
    """Influence on the logits reaching them from tokens, over that from tokens and error nodes."""
    completeness: float
    """Share of each node's incoming (normalised) edge weight not from error nodes, weighted by influence."""


def normalized(adjacency: torch.Tensor) -> torch.Tensor:
    """|A| with each row scaled to sum to one (rows without inputs stay zero)."""
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def influence(matrix: torch.Tensor, start: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """start @ (M + M^2 + ...): total indirect influence; converges because the graph is acyclic."""
    current = start @ matrix
    total = current.clone()
    for _ in range(max_iter):
        if not bool(current.any()):
            return total
        current = current @ matrix
        total += current
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def node_influence(graph: Graph) -> torch.Tensor:
    """(n_nodes,) each node's total influence on the logit nodes, weighted by their probabilities."""
    return influence(normalized(graph.adjacency), graph.logit_weights())


def _threshold(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """The score above which the highest scores add up to a `keep` share of their sum."""
    flat = scores.flatten()
    ordered = flat[flat > 0].sort(descending=True).values  # zeros never change the running share
    if ordered.numel() == 0:
        return flat.new_tensor(float("inf"))
    total = ordered.sum().clamp_min(1e-30)
    cut = int(torch.searchsorted(ordered.cumsum(0) / total, ordered.new_tensor(keep)))
    return ordered[min(cut, ordered.numel() - 1)]


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes carrying `node_threshold` of the influence on the logits and, among them, the edges
    carrying `edge_threshold`; then drop feature and error nodes left without an output (and features
    without an input), repeatedly."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    A = graph.adjacency
    n_fixed = graph.n_pos + graph.n_logits
    inner = graph.n_nodes - n_fixed
    weights = graph.logit_weights()
    scores = influence(normalized(A), weights)
    node_mask = scores >= _threshold(scores, node_threshold)
    node_mask[inner:] = True
    kept = A * node_mask[:, None] * node_mask[None, :]
    norm = normalized(kept)
    reach = influence(norm, weights) + weights
    edge_scores = norm * reach[:, None]
    edge_mask = edge_scores >= _threshold(edge_scores, edge_threshold)
    while True:
        before = node_mask.clone()
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        node_mask[:inner] &= edge_mask[:, :inner].any(0)
        node_mask[: graph.n_features] &= edge_mask[: graph.n_features].any(1)
        if torch.equal(node_mask, before):
            break
    order = scores.argsort(descending=True)
    cumulative = torch.empty_like(scores)
    cumulative[order] = scores[order].cumsum(0) / scores.sum().clamp_min(1e-30)
    return PruneResult(node_mask, edge_mask, cumulative)


def scores(graph: Graph) -> GraphScores:
    """Replacement and completeness scores (as defined by circuit-tracer)."""
    norm = normalized(graph.adjacency)
    weights = graph.logit_weights()
    inf = influence(norm, weights)
    err = slice(graph.n_features, graph.n_features + graph.n_layers * graph.n_pos)
    tok = slice(err.stop, err.stop + graph.n_pos)
    from_tokens, from_errors = float(inf[tok].sum()), float(inf[err].sum())
    replacement = from_tokens / max(from_tokens + from_errors, 1e-30)
    not_error = 1 - norm[:, err].sum(1)  # rows without inputs count as complete
    reach = inf + weights
    completeness = float((not_error * reach).sum() / reach.sum().clamp_min(1e-30))
    return GraphScores(replacement, completeness)
