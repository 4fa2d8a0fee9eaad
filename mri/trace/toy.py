"""Fixtures for tracing's tests and docs: random transcoders for a model (as circuit-tracer's tests use),
and a small hand-made graph.

Random weights make no sense of the model, but every property tracing promises — exact reproduction,
linearity once frozen, edge weights that predict interventions — holds for any weights.
"""

from __future__ import annotations

import torch

from mri.trace.graph import Graph
from mri.trace.transcoders import TranscoderSet


def random_transcoders(
    model,
    *,
    n_latents: int = 64,
    arch: str = "relu",
    active: int = 8,
    skip: bool = False,
    clt: bool = False,
    text: str = "The quick brown fox jumps over the lazy dog.",
    seed: int = 0,
) -> TranscoderSet:
    """Per-layer transcoders (or one cross-layer transcoder) with random weights for `model`.

    For relu/jumprelu the encoder biases are set so that about `active` latents fire per token of `text`;
    topk keeps `active` per token by construction.
    """
    from mri.dictionaries import CrossLayerTranscoder, DictConfig, SparseCoder

    L, d = model.n_layers, model.d_model
    sites_in = [f"blocks.{i}.hook_mlp_in" for i in range(L)]
    sites_out = [f"blocks.{i}.hook_mlp_out" for i in range(L)]
    gen = torch.Generator().manual_seed(seed)
    # rows of norm 1: `init_norm`'s small default is a starting point for training, not for untrained weights
    common = dict(arch=arch, d_in=d, n_latents=n_latents, k=min(active, n_latents), skip=skip, init_norm=1.0)
    if clt:
        coders = [
            CrossLayerTranscoder(
                DictConfig(kind="clt", sites_in=sites_in, sites_out=sites_out, **common), seed=seed
            )
        ]
    else:
        coders = [
            SparseCoder(
                DictConfig(kind="transcoder", sites_in=[sites_in[i]], sites_out=[sites_out[i]], **common),
                seed=seed + i,
            )
            for i in range(L)
        ]
    cache = model.run(model.to_tokens(text), read=sites_in).cache
    with torch.no_grad():
        for i in range(L):
            W_enc = coders[0].W_enc[i] if clt else coders[i].W_enc
            b_enc = coders[0].b_enc[i] if clt else coders[i].b_enc
            if skip:
                W_skip = coders[0].W_skip[i] if clt else coders[i].W_skip
                W_skip.copy_(torch.randn(W_skip.shape, generator=gen) * 0.1 / d**0.5)
            if arch in ("relu", "jumprelu"):
                pre = cache[sites_in[i]].reshape(-1, d) @ W_enc.T
                b_enc.fill_(-float(pre.flatten().quantile(1 - active / n_latents)))
    return TranscoderSet(coders[0] if clt else coders, L)


def chain_graph() -> Graph:
    """A hand-made graph with a known answer: two layers, two positions; token 1 -> feature A (strong) ->
    feature B (strong) -> the logit, plus a weak feature C feeding the logit a little, and an error node
    feeding A a little."""
    features = torch.tensor([[0, 1, 5], [0, 1, 6], [1, 1, 7]])  # A, C, B
    n_layers, n_pos, n_logits = 2, 2, 1
    n = 3 + (n_layers + 1) * n_pos + n_logits
    A = torch.zeros(n, n)
    tok1, err01, logit = 3 + n_layers * n_pos + 1, 3 + 0 * n_pos + 1, n - 1
    A[0, tok1] = 5.0  # token -> A
    A[0, err01] = 0.5  # error -> A
    A[1, tok1] = 0.1  # token -> C
    A[2, 0] = 4.0  # A -> B
    A[logit, 2] = 3.0  # B -> logit
    A[logit, 1] = 0.05  # C -> logit
    return Graph(
        prompt="ab",
        input_ids=torch.tensor([0, 9]),
        tokens=["<bos>", "b"],
        features=features,
        activations=torch.tensor([1.0, 0.2, 2.0]),
        logit_ids=torch.tensor([4]),
        logit_probs=torch.tensor([0.9]),
        logit_tokens=["x"],
        adjacency=A,
        n_layers=n_layers,
        n_latents=16,
        info={"model": "toy", "dictionaries": ["a", "b"]},
    )
