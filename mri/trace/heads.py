"""Component-level tools: attention-head detectors, and activation and attribution patching over heads and
MLPs for a clean/corrupt prompt pair.

A head's output is its slice of the input to the attention's output projection (`o_proj`, `c_proj` or
`dense`), read and written with a pre-hook on that projection; MLPs are patched at `hook_mlp_out`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from mri.errors import MriError
from mri.models.adapters import get_module

_OUT_PROJ = ("o_proj", "c_proj", "dense", "out_proj")


def _out_proj(model, layer: int) -> nn.Module:
    core = get_module(get_module(model.hf, model.adapter.blocks)[layer], model.adapter.attn_core)
    for name in _OUT_PROJ:
        if hasattr(core, name):
            return getattr(core, name)
    raise MriError(f"no attention output projection ({', '.join(_OUT_PROJ)}) in {type(core).__name__}")


def n_heads(model) -> int:
    return int(model.config.num_attention_heads)


class HeadScores(NamedTuple):
    """Per (layer, head) mean attention on repeated random tokens."""

    previous_token: torch.Tensor
    """(n_layers, n_heads) attention from each token to the one before it."""
    duplicate_token: torch.Tensor
    """(n_layers, n_heads) attention from a repeated token to its first occurrence."""
    induction: torch.Tensor
    """(n_layers, n_heads) attention from a repeated token to the token after its first occurrence."""

    def top(self, kind: str, k: int = 3) -> list[tuple[int, int, float]]:
        """The k highest-scoring (layer, head, score) for `kind` (a field name)."""
        scores = getattr(self, kind)
        flat = scores.flatten().topk(min(k, scores.numel()))
        return [
            (i // scores.shape[1], i % scores.shape[1], v)
            for v, i in zip(flat.values.tolist(), flat.indices.tolist(), strict=True)
        ]


@torch.no_grad()
def head_scores(model, *, n_tokens: int = 24, batch: int = 4, seed: int = 0) -> HeadScores:
    """Score every head on `batch` sequences of BOS + n random tokens + the same n tokens again."""
    vocab = int(model.config.vocab_size)
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor([i for i in range(vocab) if i not in special])
    rand = pool[torch.randint(len(pool), (batch, n_tokens), generator=gen)]
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    parts = [rand, rand] if bos is None else [torch.full((batch, 1), bos), rand, rand]
    ids = torch.cat(parts, 1)
    start = 0 if bos is None else 1
    sites = [f"blocks.{i}.attn.hook_pattern" for i in range(model.n_layers)]
    cache = model.run(ids, read=sites).cache
    first = torch.arange(start, start + n_tokens)
    second = first + n_tokens
    prev, dup, ind = [], [], []
    for site in sites:
        p = cache[site].float()  # (batch, heads, query, key)
        q = torch.arange(start + 1, ids.shape[1])
        prev.append(p[:, :, q, q - 1].mean((0, 2)))
        dup.append(p[:, :, second, first].mean((0, 2)))
        ind.append(p[:, :, second, first + 1].mean((0, 2)))
    return HeadScores(torch.stack(prev), torch.stack(dup), torch.stack(ind))


class Patching(NamedTuple):
    """Per component, the share of the clean-vs-corrupt metric gap that it restores."""

    heads: torch.Tensor
    """(n_layers, n_heads) restored share when one head's output is patched (or estimated)."""
    mlps: torch.Tensor
    """(n_layers,) the same for each MLP's output."""
    clean: float
    """The metric on the clean prompt."""
    corrupt: float
    """The metric on the corrupt prompt."""


Metric = Callable[[torch.Tensor], torch.Tensor]
"""(batch, pos, vocab) logits -> (batch,) scores."""


def logit_diff(answer: int, wrong: int) -> Metric:
    """Metric: last-position logit of `answer` minus that of `wrong`."""
    return lambda logits: logits[:, -1, answer] - logits[:, -1, wrong]


def _pair(model, clean, corrupt) -> tuple[torch.Tensor, torch.Tensor]:
    c = model.to_tokens(clean) if isinstance(clean, str) else torch.as_tensor(clean).reshape(1, -1)
    k = model.to_tokens(corrupt) if isinstance(corrupt, str) else torch.as_tensor(corrupt).reshape(1, -1)
    if c.shape != k.shape:
        raise MriError(
            f"clean and corrupt prompts must have the same number of tokens ({c.shape[1]} vs {k.shape[1]})"
        )
    return c, k


def _default_metric(model, clean_ids, corrupt_ids) -> Metric:
    with torch.no_grad():
        a = int(model.hf(input_ids=clean_ids).logits[0, -1].argmax())
        b = int(model.hf(input_ids=corrupt_ids).logits[0, -1].argmax())
    if a == b:
        raise MriError("clean and corrupt prompts predict the same token; pass a metric")
    return logit_diff(a, b)


@contextmanager
def _head_inputs(model, edit: Callable[[int, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Pre-hooks on every layer's attention output projection: edit(layer, (batch, pos, heads*d_head))."""
    handles = []

    def hook(layer):
        def fn(module, args):
            new = edit(layer, args[0])
            return None if new is None else (new, *args[1:])

        return fn

    try:
        for layer in range(model.n_layers):
            handles.append(_out_proj(model, layer).register_forward_pre_hook(hook(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


def _record(
    model, ids: torch.Tensor
) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[str, torch.Tensor]]:
    heads: dict[int, torch.Tensor] = {}

    def keep(layer, x):
        heads[layer] = x.detach()

    sites = [f"blocks.{i}.hook_mlp_out" for i in range(model.n_layers)]
    with _head_inputs(model, keep), model.hooks(read=sites) as cache:
        logits = model.hf(input_ids=ids).logits
    return logits, heads, dict(cache)


@torch.no_grad()
def activation_patching(model, clean, corrupt, metric: Metric | None = None) -> Patching:
    """Patch each head's and each MLP's clean output into the corrupt run, one at a time."""
    clean_ids, corrupt_ids = _pair(model, clean, corrupt)
    metric = metric or _default_metric(model, clean_ids, corrupt_ids)
    clean_logits, clean_heads, clean_mlps = _record(model, clean_ids)
    m_clean = float(metric(clean_logits)[0])
    m_corrupt = float(metric(model.hf(input_ids=corrupt_ids).logits)[0])
    gap = m_clean - m_corrupt if abs(m_clean - m_corrupt) > 1e-12 else 1e-12
    H = n_heads(model)
    heads = torch.zeros(model.n_layers, H)
    for layer in range(model.n_layers):
        d_head = clean_heads[layer].shape[-1] // H
        for h in range(H):
            sl = slice(h * d_head, (h + 1) * d_head)

            def patch(lay, x, layer=layer, sl=sl):
                if lay != layer:
                    return None
                x = x.clone()
                x[..., sl] = clean_heads[layer][..., sl]
                return x

            with _head_inputs(model, patch):
                heads[layer, h] = (float(metric(model.hf(input_ids=corrupt_ids).logits)[0]) - m_corrupt) / gap
    mlps = torch.zeros(model.n_layers)
    for layer in range(model.n_layers):
        site = f"blocks.{layer}.hook_mlp_out"
        out = model.run(corrupt_ids, replace={site: clean_mlps[site]}, stop=False)
        mlps[layer] = (float(metric(out.logits)[0]) - m_corrupt) / gap
    return Patching(heads, mlps, m_clean, m_corrupt)


def attribution_patching(model, clean, corrupt, metric: Metric | None = None) -> Patching:
    """First-order estimate of `activation_patching` from one backward pass on the corrupt prompt:
    gradient . (clean - corrupt) per head and MLP output."""
    clean_ids, corrupt_ids = _pair(model, clean, corrupt)
    metric = metric or _default_metric(model, clean_ids, corrupt_ids)
    with torch.no_grad():
        clean_logits, clean_heads, clean_mlps = _record(model, clean_ids)
    m_clean = float(metric(clean_logits)[0])
    heads: dict[int, torch.Tensor] = {}

    def keep(layer, x):
        heads[layer] = x

    sites = [f"blocks.{i}.hook_mlp_out" for i in range(model.n_layers)]
    with torch.enable_grad(), _head_inputs(model, keep), model.hooks(read=sites, detach=False) as cache:
        value = metric(model.hf(input_ids=corrupt_ids).logits)[0]
        inputs = [heads[i] for i in range(model.n_layers)] + [cache[s] for s in sites]
        grads = torch.autograd.grad(value, inputs)
    m_corrupt = float(value.detach())
    gap = m_clean - m_corrupt if abs(m_clean - m_corrupt) > 1e-12 else 1e-12
    H = n_heads(model)
    head_est = torch.stack(
        [
            (grads[i] * (clean_heads[i] - heads[i].detach()))[0].sum(0).reshape(H, -1).sum(-1) / gap
            for i in range(model.n_layers)
        ]
    )
    mlps = torch.stack(
        [
            (g * (clean_mlps[s] - cache[s].detach())).sum() / gap
            for g, s in zip(grads[model.n_layers :], sites, strict=True)
        ]
    )
    return Patching(head_est, mlps, m_clean, m_corrupt)
