"""mri.models: every site equals what the model computes independently, and hooks never leak."""

from __future__ import annotations

import gc
import json

import psutil
import pytest
import torch

import mri
from mri.errors import MriError

FAMILIES = ["gpt2", "gpt_neox", "gpt_neox_seq", "llama", "qwen2", "gemma2"]
TEXTS = ["The quick brown fox jumps", "def add(a, b):"]


def close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def n_hooks(model: mri.Model) -> int:
    """Hooks on the model, transformers' own output-capturing hooks excluded."""
    return sum(
        1
        for m in model.hf.modules()
        for fn in [*m._forward_hooks.values(), *m._forward_pre_hooks.values(), *m._backward_hooks.values()]
        if "output_capturing" not in getattr(fn, "__qualname__", "")
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_match_independent_forward(tiny_model_dir, family):
    model = mri.load(tiny_model_dir(family))
    own_hooks = n_hooks(model)  # transformers registers a few of its own
    ids = model.to_tokens(TEXTS)
    out = model.run(ids, read=model.site_names, stop=False)
    ref = model.hf(ids, output_hidden_states=True)
    c = out.cache
    assert close(out.logits, ref.logits)
    assert close(c["ln_final.hook_normalized"], ref.hidden_states[-1])
    assert close(c["hook_embed"], model.hf.get_input_embeddings()(ids))
    for i in range(model.n_layers):
        pre, post = c[f"blocks.{i}.hook_resid_pre"], c[f"blocks.{i}.hook_resid_post"]
        assert close(pre, ref.hidden_states[i])
        if i < model.n_layers - 1:  # the last hidden state is reported after the final norm
            assert close(post, ref.hidden_states[i + 1])
        attn, mlp = c[f"blocks.{i}.hook_attn_out"], c[f"blocks.{i}.hook_mlp_out"]
        if model.parallel:
            assert close(pre + attn + mlp, post)
        else:
            mid = c[f"blocks.{i}.hook_resid_mid"]
            assert torch.equal(pre + attn, mid)
            assert close(mid + mlp, post)
        pattern = c[f"blocks.{i}.attn.hook_pattern"]
        assert pattern.shape == (2, 4, ids.shape[1], ids.shape[1])
        assert close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
        assert torch.all(pattern.triu(1) == 0), "causal pattern has weight on future keys"
    assert n_hooks(model) == own_hooks
    assert model.hf.config._attn_implementation != "eager" or family == "gemma2"


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "gpt_neox_seq"])
def test_mlp_in_is_the_mlp_input(tiny_model_dir, family):
    model = mri.load(tiny_model_dir(family))
    ids = model.to_tokens(TEXTS)
    c = model.run(ids, read=["L1.mlp_in", "L1.mlp_out"], stop=False).cache
    mlp = model.hf.get_submodule(f"{model.adapter.blocks}.1.{model.adapter.mlp}")
    if model.adapter.mlp_out == model.adapter.mlp:
        assert close(mlp(c["blocks.1.hook_mlp_in"]), c["blocks.1.hook_mlp_out"])


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "gpt_neox"])
def test_add_and_replace_change_the_stream_exactly(tiny_model_dir, family):
    model = mri.load(tiny_model_dir(family))
    ids = model.to_tokens(TEXTS)
    v = torch.randn(model.d_model)
    base = model.run(ids, read=["L0.resid_post"], stop=False)
    # adding at resid_pre of block 1 == replacing resid_post of block 0 by value + v
    added = model.run(ids, add={"L1.resid_pre": v}, stop=False).logits
    replaced = model.run(
        ids, replace={"L0.resid_post": base.cache["blocks.0.hook_resid_post"] + v}, stop=False
    )
    assert close(added, replaced.logits)
    assert not close(added, base.logits)
    # zeroing the MLP output makes resid_post equal resid_pre + attn_out
    c = model.run(
        ids, read=["L1.resid_pre", "L1.attn_out", "L1.resid_post"], replace={"L1.mlp_out": torch.zeros_like}
    ).cache
    assert close(c["blocks.1.hook_resid_pre"] + c["blocks.1.hook_attn_out"], c["blocks.1.hook_resid_post"])


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_resid_mid_writes_reach_the_mlp_and_residual(tiny_model_dir, family):
    model = mri.load(tiny_model_dir(family))
    ids = model.to_tokens(TEXTS)
    v = torch.randn(model.d_model)
    base = model.run(ids, read=["L1.resid_mid", "L1.resid_post", "L1.mlp_out"], stop=False).cache
    new = model.run(ids, read=["L1.resid_mid", "L1.resid_post", "L1.mlp_out"], add={"L1.resid_mid": v}).cache
    assert close(new["blocks.1.hook_resid_mid"], base["blocks.1.hook_resid_mid"] + v)
    assert close(
        new["blocks.1.hook_resid_mid"] + new["blocks.1.hook_mlp_out"], new["blocks.1.hook_resid_post"]
    )
    target = torch.zeros_like(base["blocks.1.hook_resid_mid"])
    rep = model.run(ids, read=["L1.resid_mid", "L1.mlp_out"], replace={"L1.resid_mid": target}).cache
    assert close(rep["blocks.1.hook_resid_mid"], target)


def test_stop_returns_same_values_without_logits(tiny_model_dir):
    model = mri.load(tiny_model_dir("llama"))
    ids = model.to_tokens(TEXTS)
    full = model.run(ids, read=["L0.resid_post", "L1.mlp_in"], stop=False)
    early = model.run(ids, read=["L0.resid_post", "L1.mlp_in"])
    assert early.logits is None and full.logits is not None
    for k in full.cache:
        assert torch.equal(full.cache[k], early.cache[k])


def test_hooks_removed_on_error_and_memory_flat(tiny_model_dir):
    model = mri.load(tiny_model_dir("llama"))
    own_hooks = n_hooks(model)
    ids = model.to_tokens(TEXTS)

    def boom(x):
        raise RuntimeError("user function failed")

    with pytest.raises(RuntimeError, match="user function failed"):
        model.run(ids, read=["L0.resid_post"], replace={"L0.attn_out": boom})
    assert n_hooks(model) == own_hooks
    with pytest.raises(MriError, match="shape"):
        model.run(ids, replace={"L0.resid_post": torch.zeros(3)})
    assert n_hooks(model) == own_hooks

    proc = psutil.Process()
    for _ in range(10):
        model.run(ids, read=model.site_names, stop=False)
    gc.collect()
    before = proc.memory_info().rss
    for _ in range(100):
        model.run(ids, read=model.site_names, add={"L1.resid_mid": torch.ones(model.d_model)}, stop=False)
    gc.collect()
    grown = proc.memory_info().rss - before
    assert grown < 20 * 2**20, f"memory grew by {grown / 2**20:.1f} MiB over 100 runs"
    assert n_hooks(model) == own_hooks


def test_hooks_during_generation_read_every_step(tiny_model_dir):
    model = mri.load(tiny_model_dir("llama"))
    own_hooks = n_hooks(model)
    ids = model.to_tokens("The quick")
    seen = []
    with model.hooks(read=["L2.resid_post"]) as cache:
        model.hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
        seen.append(cache["blocks.2.hook_resid_post"].shape)
    assert seen[0][1] == 1, "with the KV cache the last step reads one new position"
    assert n_hooks(model) == own_hooks


def test_site_names_and_errors(tiny_model_dir, tmp_path):
    model = mri.load(tiny_model_dir("gpt_neox"))
    assert model.resolve_site("L2.resid_post") == "blocks.2.hook_resid_post"
    assert model.resolve_site("L0.pattern") == "blocks.0.attn.hook_pattern"
    with pytest.raises(MriError, match="Did you mean blocks.1.hook_resid_post"):
        model.resolve_site("blocks.1.hook_resid_pots")
    with pytest.raises(MriError, match="layers 0..2"):
        model.resolve_site("L7.resid_post")
    with pytest.raises(MriError, match="parallel"):
        model.resolve_site("L0.resid_mid")
    with pytest.raises(MriError, match="read-only"):
        model.run(model.to_tokens("x"), add={"L0.pattern": torch.zeros(1)})
    with pytest.raises(MriError, match="no config.json"):
        mri.load(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(MriError, match="supported model types: gpt2"):
        mri.load(bad)
    with pytest.raises(MriError, match="pass a local folder"):
        mri.load("no-such-org/no-such-model-xyz")
    assert len(model.fingerprint()) == 32
    assert mri.load(tiny_model_dir("gpt_neox")).fingerprint() == model.fingerprint()
    assert mri.load(tiny_model_dir("llama")).fingerprint() != model.fingerprint()


def test_fingerprint_names_the_weights_not_where_they_live(tiny_model_dir, tmp_path) -> None:
    """Dictionaries check the model they were trained on by fingerprint: a copy of the folder elsewhere (a
    fresh clone, an installed package) must match, and a changed weight must not."""
    import shutil

    import torch

    src = tiny_model_dir("llama")
    copy = shutil.copytree(src, tmp_path / "elsewhere" / "model")
    a, b = mri.load(src), mri.load(copy)
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        next(b.hf.parameters()).view(-1)[0] += 1
    b._fingerprint = None
    assert a.fingerprint() != b.fingerprint()
