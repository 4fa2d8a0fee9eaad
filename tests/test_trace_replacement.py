"""The frozen replacement model: exact on its prompt, affine once frozen."""

from __future__ import annotations

import pytest
import torch

import mri
from mri.trace import ReplacementModel
from mri.trace.toy import random_transcoders

PROMPT = "The quick brown fox jumps over"


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_replacement_reproduces_logits_exactly(tiny_model_dir, family):
    model = mri.load(tiny_model_dir(family))
    rm = ReplacementModel(model, random_transcoders(model, skip=True))
    ids = model.to_tokens(PROMPT)[0]
    snap = rm.prepare(ids)
    with torch.no_grad():
        held = rm.run(snap).logits[0]
        live = rm.run(snap, live=True).logits[0]
    assert torch.equal(held, snap.logits)
    assert torch.equal(live, snap.logits)
    default = model.run(ids[None], stop=False).logits[0]  # the model's default attention kernel
    torch.testing.assert_close(snap.logits, default, rtol=1e-4, atol=1e-5)
    assert len(snap.features) > 0 and not (snap.features[:, 1] == 0).any()  # BOS has no feature nodes


def test_cross_layer_transcoder_reproduces_logits(tiny_model_dir):
    model = mri.load(tiny_model_dir("llama"))
    rm = ReplacementModel(model, random_transcoders(model, clt=True, skip=True))
    snap = rm.prepare(model.to_tokens(PROMPT)[0])
    with torch.no_grad():
        assert torch.equal(rm.run(snap, live=True).logits[0], snap.logits)


def _superposition_gap(f, e0: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """|f(e0 + a + b) - f(e0 + a) - f(e0 + b) + f(e0)| relative to |f(e0 + a + b) - f(e0)|."""
    gap = f(e0 + a + b) - f(e0 + a) - f(e0 + b) + f(e0)
    return float(gap.abs().max() / (f(e0 + a + b) - f(e0)).abs().max())


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_frozen_replacement_is_linear(tiny_model_dir, family):
    """With patterns, norm scales and features frozen, logits are affine in the embeddings: the second
    difference vanishes, while the real model's does not."""
    model = mri.load(tiny_model_dir(family))
    rm = ReplacementModel(model, random_transcoders(model, skip=True))
    snap = rm.prepare(model.to_tokens(PROMPT)[0])
    gen = torch.Generator().manual_seed(0)
    e0 = snap.embed[None]
    a, b = (torch.randn(e0.shape, generator=gen) * e0.std() for _ in range(2))
    with torch.no_grad():
        frozen = _superposition_gap(lambda e: rm.run(snap, embed=e).final, e0, a, b)
        real = _superposition_gap(
            lambda e: model.run(snap.input_ids[None], replace={"hook_embed": e}, stop=False).logits, e0, a, b
        )
    assert frozen < 1e-4
    assert real > 1e-2


def test_second_derivative_is_zero(tiny_model_dir):
    """d2(logit)/d(embed)2 along a direction is zero in the frozen model."""
    model = mri.load(tiny_model_dir("llama"))
    rm = ReplacementModel(model, random_transcoders(model))
    snap = rm.prepare(model.to_tokens(PROMPT)[0])
    direction = torch.randn(snap.embed[None].shape, generator=torch.Generator().manual_seed(1))

    def logit(t: torch.Tensor) -> torch.Tensor:
        return rm.run(snap, embed=snap.embed[None] + t * direction).logits[0, -1, 3]

    t = torch.zeros((), requires_grad=True)
    (first,) = torch.autograd.grad(logit(t), t, create_graph=True)
    second = torch.autograd.grad(first, t, allow_unused=True)[0]
    assert first.abs() > 0
    assert second is None or float(second.abs()) < 1e-6 * float(first.abs())
