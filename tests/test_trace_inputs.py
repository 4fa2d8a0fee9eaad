"""Bad input to tracing stops with an MriError that says what was wrong; explicit logit targets."""

from __future__ import annotations

import pytest
import torch

import mri
from mri.dictionaries import DictConfig, SparseCoder
from mri.errors import MriError
from mri.trace import ReplacementModel, attribute
from mri.trace.toy import random_transcoders

PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return mri.load(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def rm(llama):
    return ReplacementModel(llama, random_transcoders(llama, arch="topk", active=4))


def test_transcoders_trained_on_another_model(llama, tiny_model_dir):
    other = mri.load(tiny_model_dir("qwen2"))
    tcs = random_transcoders(llama, arch="topk", active=4)
    for coder in tcs.coders.values():
        coder.cfg.model_fingerprint = other.fingerprint()
    with pytest.raises(MriError, match="trained on another model"):
        ReplacementModel(llama, tcs)
    for coder in tcs.coders.values():
        coder.cfg.model_fingerprint = llama.fingerprint()
    assert ReplacementModel(llama, tcs).transcoders is tcs


def test_transcoders_of_another_width(llama):
    wide = DictConfig(
        kind="transcoder",
        arch="topk",
        d_in=llama.d_model + 16,
        n_latents=32,
        k=4,
        sites_in=["blocks.0.hook_mlp_in"],
        sites_out=["blocks.0.hook_mlp_out"],
    )
    with pytest.raises(MriError, match="made for another model"):
        ReplacementModel(llama, [SparseCoder(wide)])


def test_transcoders_for_layers_the_model_lacks(llama):
    deep = DictConfig(
        kind="transcoder",
        arch="topk",
        d_in=llama.d_model,
        n_latents=32,
        k=4,
        sites_in=[f"blocks.{llama.n_layers}.hook_mlp_in"],
        sites_out=[f"blocks.{llama.n_layers}.hook_mlp_out"],
    )
    with pytest.raises(MriError, match="does not fit layer"):
        ReplacementModel(llama, [SparseCoder(deep)])


def test_prompt_longer_than_the_context(rm, llama):
    ctx = llama.hf.config.max_position_embeddings
    ids = torch.randint(3, 50, (ctx + 1,))
    with pytest.raises(MriError, match=f"{ctx + 1} tokens, more than .* context of {ctx}"):
        attribute(ids, rm)
    with pytest.raises(MriError, match="token ids must lie in"):
        attribute([0, 5, 10**6], rm)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (" fox jumps over the lazy dog", "tokens .* not one"),
        ("", "has no tokens"),
        (10**6, "is not a token"),
        (-1, "is not a token"),
        (2.5, "is not a token"),
    ],
)
def test_target_that_is_not_a_token(rm, target, message):
    with pytest.raises(MriError, match=message):
        attribute(PROMPT, rm, targets=[target])


def test_targets_give_the_same_logit_rows_as_the_top_tokens(rm):
    """Asking for the second and first most probable tokens, in that order, yields the top-token graph's
    logit rows in that order: a logit row depends on its token alone."""
    top = attribute(PROMPT, rm, max_n_logits=2, desired_logit_prob=1.0, max_feature_nodes=None)
    second, first = top.logit_ids[1].item(), top.logit_ids[0].item()
    text = rm.model.tokenizer.decode([second])
    if rm.model.to_tokens(text, bos=False)[0].tolist() == [second]:
        second = text  # by its text when it round-trips to one token
    asked = attribute(PROMPT, rm, targets=[second, first], max_feature_nodes=None)
    assert asked.logit_ids.tolist() == top.logit_ids.flip(0).tolist()
    torch.testing.assert_close(asked.logit_probs, top.logit_probs.flip(0))
    n = top.n_nodes - top.n_logits
    torch.testing.assert_close(asked.adjacency[-2:, :n], top.adjacency[-2:, :n].flip(0))
    assert asked.info["targets"] == asked.logit_ids.tolist()
