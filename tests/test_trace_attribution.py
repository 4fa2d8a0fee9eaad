"""Attribution: edge weights are the direct effects that interventions under constrained patching measure."""

from __future__ import annotations

import pytest
import torch

import mri
from mri.trace import ReplacementModel, attribute, prune, scores
from mri.trace.toy import random_transcoders

PROMPT = "The quick brown fox jumps over"


def _strongest_feature_edges(graph, n: int) -> list[tuple[int, int]]:
    """(target, source) pairs of the n largest |weight| feature -> feature edges."""
    nf = graph.n_features
    block = graph.adjacency[:nf, :nf].abs()
    top = block.flatten().topk(n).indices.tolist()
    return [divmod(i, nf) for i in top]


@pytest.mark.parametrize(
    "options",
    [dict(arch="relu"), dict(arch="topk", skip=True), dict(arch="relu", clt=True)],
    ids=["relu", "topk-skip", "clt"],
)
def test_doubling_a_feature_moves_targets_by_edge_weight(tiny_model_dir, options):
    model = mri.load(tiny_model_dir("llama"))
    rm = ReplacementModel(model, random_transcoders(model, **options))
    graph = attribute(PROMPT, rm, max_feature_nodes=None, batch_size=32)
    snap = rm.prepare(graph.input_ids)
    with torch.no_grad():
        base = rm.run(snap)
        for target, source in _strongest_feature_edges(graph, 6):
            layer, pos, latent = graph.features[source].tolist()
            doubled = rm.run(snap, {(layer, pos, latent): 2 * float(graph.activations[source])})
            t = graph.features[target].tolist()
            moved = rm.preactivation(doubled, *t) - rm.preactivation(base, *t)
            weight = graph.adjacency[target, source]
            assert weight != 0
            torch.testing.assert_close(moved[0], weight, rtol=1e-3, atol=1e-4 * float(weight.abs()))
        for k in range(graph.n_logits):
            row = graph.adjacency[graph.logit_index(k), : graph.n_features]
            source = int(row.abs().argmax())
            key = tuple(graph.features[source].tolist())
            doubled = rm.run(snap, {key: 2 * float(graph.activations[source])})
            token = int(graph.logit_ids[k])
            moved = rm.logit_effect(doubled, token) - rm.logit_effect(base, token)
            torch.testing.assert_close(moved[0], row[source], rtol=1e-3, atol=1e-4 * float(row[source].abs()))


def test_logit_row_accounts_for_every_source(tiny_model_dir):
    """Doubling every source node at once (token embeddings, errors, features) moves each logit by the sum
    of its row: the graph accounts for the whole logit, up to the constant biases."""
    model = mri.load(tiny_model_dir("gpt2"))
    rm = ReplacementModel(model, random_transcoders(model))
    graph = attribute(PROMPT, rm, max_feature_nodes=None)
    snap = rm.prepare(graph.input_ids)
    errors = snap.errors
    with torch.no_grad():
        base = rm.run(snap)

        def doubled_mlp(layer, x):
            out = snap.mlp_out[layer] + errors[layer]
            feats = snap.features[snap.features[:, 0] == layer]
            acts = snap.activations[snap.features[:, 0] == layer]
            dec = rm.transcoders.W_dec(layer, layer)[feats[:, 2]] * acts[:, None]
            return out.index_add(0, feats[:, 1], dec)

        doubled = rm.frozen_pass(snap, doubled_mlp, embed=2 * snap.embed[None])
    for k in range(graph.n_logits):
        token = int(graph.logit_ids[k])
        moved = rm.logit_effect(doubled, token) - rm.logit_effect(base, token)
        torch.testing.assert_close(
            moved[0], graph.adjacency[graph.logit_index(k)].sum(), rtol=1e-3, atol=1e-3
        )


def test_max_feature_nodes_bounds_the_graph(tiny_model_dir):
    model = mri.load(tiny_model_dir("llama"))
    rm = ReplacementModel(model, random_transcoders(model, active=12))
    full = attribute(PROMPT, rm, max_feature_nodes=None, batch_size=16)
    small = attribute(PROMPT, rm, max_feature_nodes=20, batch_size=8, update_interval=1)
    assert small.n_features == 20 < full.n_features
    assert small.adjacency.shape == (small.n_nodes, small.n_nodes)
    # the features kept are among the more influential ones of the full graph
    from mri.trace.graph import node_influence

    inf = node_influence(full)[: full.n_features]
    rank = {tuple(f): r for r, f in enumerate(full.features[inf.argsort(descending=True)].tolist())}
    kept = sorted(rank[tuple(f)] for f in small.features.tolist())
    assert sum(r < 40 for r in kept) >= 15
    # edges into kept features are the same as in the full graph
    i = full.feature_index(*small.features[0].tolist())
    cols = [full.feature_index(*f) for f in small.features.tolist()]
    torch.testing.assert_close(small.adjacency[0, :20], full.adjacency[i, cols])


def test_scores_are_shares(tiny_model_dir):
    model = mri.load(tiny_model_dir("llama"))
    rm = ReplacementModel(model, random_transcoders(model))
    graph = attribute(PROMPT, rm, max_feature_nodes=None)
    s = scores(graph)
    assert 0 < s.replacement < 1 and 0 < s.completeness < 1
    kept = prune(graph)
    assert kept.node_mask[-graph.n_logits :].all()


def test_partial_influence_in_chunks_equals_the_matrix_series():
    """Chunked influence (no copy of the rows) equals sum_k w A^k with A = normalized rows, fed back
    through each feature row's own column."""
    from mri.trace.attribution import _partial_influence
    from mri.trace.graph import normalized

    gen = torch.Generator().manual_seed(0)
    n_logits, n_feats, n_cols = 2, 9, 15
    rows = torch.randn(n_logits + n_feats, n_cols, generator=gen)
    rows[n_logits + 3] = 0  # a row without inputs
    row_node = torch.tensor([-1] * n_logits + list(range(n_feats)))
    for i, node in enumerate(row_node.tolist()):  # acyclic: a feature's row reads only later columns
        if node >= 0:
            rows[i, : node + 1] = 0
    probs = torch.tensor([0.7, 0.2])
    A = normalized(rows)
    weight = torch.zeros(n_logits + n_feats)
    weight[:n_logits] = probs
    expected = torch.zeros(n_cols)
    for _ in range(n_cols + 1):
        reach = weight @ A
        expected += reach
        weight = torch.zeros_like(weight)
        weight[n_logits:] = reach[row_node[n_logits:]]
    for chunk in (1, 4, 512):
        torch.testing.assert_close(_partial_influence(rows, row_node, probs, chunk=chunk), expected)


@pytest.mark.parametrize(
    "family, options",
    [("llama", dict(arch="topk", skip=True)), ("gpt2", dict(arch="relu", clt=True))],
    ids=["llama-topk-skip", "gpt2-clt"],
)
def test_attribution_makes_every_tensor_on_the_models_device(tiny_model_dir, family, options):
    """With torch's default device set to "meta", any tensor that tracing creates without an explicit
    device= lands on meta and the run fails or comes back on meta. So this CPU test catches what would
    break on a GPU: every tensor follows the model's device, and the graph comes back on the CPU."""
    model = mri.load(tiny_model_dir(family), device="cpu")
    rm = ReplacementModel(model, random_transcoders(model, **options))
    assert rm.transcoders.device == model.device
    ids = model.to_tokens(PROMPT)[0]
    ref = attribute(ids, rm, max_feature_nodes=30, batch_size=8, update_interval=1)
    ref_kept, ref_scores = prune(ref), scores(ref)
    key = tuple(ref.features[0].tolist())
    with torch.device("meta"):
        graph = attribute(ids, rm, max_feature_nodes=30, batch_size=8, update_interval=1)
        targeted = attribute(ids, rm, max_feature_nodes=10, targets=[int(ref.logit_ids[0])])
        kept, s = prune(graph), scores(graph)
        snap = rm.prepare(ids)
        with torch.no_grad():
            constrained = rm.run(snap, {key: 0.0}).logits
            live = rm.run(snap, {key: 0.0}, live=True).logits
    for name in ("input_ids", "features", "activations", "logit_ids", "logit_probs", "adjacency"):
        value = getattr(graph, name)
        assert value.device.type == "cpu", name
        assert torch.equal(value, getattr(ref, name)), name
    assert targeted.adjacency.device.type == "cpu" and targeted.n_logits == 1
    assert torch.equal(kept.node_mask, ref_kept.node_mask) and torch.equal(kept.edge_mask, ref_kept.edge_mask)
    assert s == ref_scores
    assert constrained.device == live.device == model.device
    with torch.no_grad():
        base = rm.run(snap).logits
    assert not torch.equal(constrained, base)  # the ablation reached the logits
