"""QK attribution splits an attention score exactly over the components at its query and key."""

from __future__ import annotations

import torch

import mri
from mri.trace import ReplacementModel
from mri.trace.qk import qk_attribution
from mri.trace.replacement import QUERY_KEY
from mri.trace.toy import random_transcoders


def test_qk_contributions_add_up_and_predict_ablation(tiny_model_dir):
    model = mri.load(tiny_model_dir("llama"))
    rm = ReplacementModel(model, random_transcoders(model, skip=True))
    snap = rm.prepare(model.to_tokens("The quick brown fox jumps")[0])
    layer, head, q, k = 2, 1, 5, 2
    r = qk_attribution(rm, snap, layer, head, q, k)
    assert {name for name, _ in r.query} >= {f"err_1_{q}", f"attn_1_{q}"}
    # Llama has no biases and the random transcoders' b_dec is zero: the components are the whole stream.
    scale = sum(abs(v) for _, v in r.query + r.key)
    assert abs(r.query_rest) < 1e-4 * scale and abs(r.key_rest) < 1e-4 * scale
    # Ablating a layer-1 feature at the query position changes the score by minus its contribution:
    # nothing lies between it and the score, and the score is linear in the query side.
    name, contribution = next((n, v) for n, v in r.query if n.startswith("1_") and v != 0)
    latent = int(name.split("_")[1])
    core = rm._attn[layer]
    kv = head // (4 // 2)

    def score(changes):
        QUERY_KEY[id(core)] = None
        try:
            with torch.no_grad():
                rm.run(snap, changes)
            qs, ks = QUERY_KEY[id(core)]
        finally:
            QUERY_KEY.pop(id(core))
        return float(qs[0, head, q] @ ks[0, kv, k] * core.scaling)

    assert abs(score({}) - r.score) < 1e-6
    moved = score({(1, q, latent): 0.0}) - r.score
    assert abs(moved + contribution) < 1e-4 * max(1.0, abs(contribution))
