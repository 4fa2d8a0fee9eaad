"""Head detectors find a planted head; patching restores what it should."""

from __future__ import annotations

import math

import torch

import mri
from mri.trace import activation_patching, attribution_patching, head_scores


def _plant_previous_token_head(model, layer: int, head: int, size: float = 60.0) -> None:
    """Make (layer, head) attend to the previous token whatever the input: its query and key ignore the
    residual (zero weights) and are constant biases, so RoPE turns their product into a function of the
    offset alone, cos((offset - 1) * theta), largest at offset 1."""
    attn = model.hf.model.layers[layer].self_attn
    hd = attn.head_dim
    kv = head // attn.num_key_value_groups
    theta = 10000.0 ** (-2 / hd)  # RoPE's second frequency: dims 1 and 1 + hd / 2
    q, k = slice(head * hd, (head + 1) * hd), slice(kv * hd, (kv + 1) * hd)
    with torch.no_grad():
        attn.q_proj.weight[q] = 0
        attn.k_proj.weight[k] = 0
        attn.q_proj.bias[q] = 0
        attn.k_proj.bias[k] = 0
        attn.q_proj.bias[head * hd + 1] = size
        attn.k_proj.bias[kv * hd + 1] = size * math.cos(theta)
        attn.k_proj.bias[kv * hd + 1 + hd // 2] = size * math.sin(theta)


def test_head_detector_finds_planted_previous_token_head(tiny_model_dir):
    model = mri.load(tiny_model_dir("qwen2"))
    assert model.hf.config.rope_parameters["rope_theta"] == 10000.0
    before = head_scores(model)
    _plant_previous_token_head(model, layer=1, head=2)
    after = head_scores(model)
    assert after.previous_token[1, 2] > 0.9 > before.previous_token.max()
    assert after.top("previous_token", 1)[0][:2] == (1, 2)
    assert after.induction[1, 2] < 0.2 and after.duplicate_token[1, 2] < 0.2


def test_patching_a_component_restores_its_share(tiny_model_dir):
    model = mri.load(tiny_model_dir("llama"))
    clean, corrupt = model.to_tokens("The quick brown fox"), model.to_tokens("The quick brown dog")
    answer = int(model.hf(clean).logits[0, -1].argmax())

    def metric(logits):
        return logits[:, -1, answer]

    exact = activation_patching(model, clean, corrupt, metric)
    estimate = attribution_patching(model, clean, corrupt, metric)
    assert exact.heads.shape == estimate.heads.shape == (model.n_layers, 4)
    assert exact.clean == estimate.clean and exact.corrupt == estimate.corrupt
    # The last MLP is followed only by the final norm and the unembedding: patching it is nearly linear,
    # so the first-order estimate must be close there.
    last = model.n_layers - 1
    torch.testing.assert_close(estimate.mlps[last], exact.mlps[last], rtol=0.25, atol=0.02)
    assert torch.isfinite(exact.heads).all() and torch.isfinite(estimate.heads).all()
