"""What a feature does downstream, read off the weights: logit effects and nearest decoder directions."""

from __future__ import annotations

from typing import Any

import torch


def unembedding_path(model: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(W_U (vocab, d), gamma (d,), centre): the final norm's scale and unembedding a direction passes
    through; `centre` when the norm is a LayerNorm (which removes the mean first)."""
    hf = model.hf
    norm = hf.get_submodule(model.adapter.final_norm)
    d = model.d_model
    weight = getattr(norm, "weight", None)
    W_U = hf.get_output_embeddings().weight.detach().float()
    gamma = torch.ones(d, device=W_U.device) if weight is None else weight.detach().float().to(W_U.device)
    if "gemma" in type(norm).__name__.lower():
        gamma = 1.0 + gamma  # Gemma's RMSNorm scales by (1 + weight)
    centre = isinstance(norm, torch.nn.LayerNorm)
    return W_U, gamma, centre


@torch.no_grad()
def logit_effects(
    model: Any, directions: torch.Tensor, k: int = 10, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct effect of each direction (n, d) on the logits, through the final norm's scale and the
    unembedding: (top ids, top values, bottom ids, bottom values), each (n, k)."""
    W_U, gamma, centre = unembedding_path(model)
    k = min(k, W_U.shape[0])
    out = [], [], [], []
    for lo in range(0, len(directions), chunk):
        d = directions[lo : lo + chunk].float().to(W_U.device)
        if centre:
            d = d - d.mean(-1, keepdim=True)
        eff = (d * gamma) @ W_U.T  # (c, vocab)
        top, bottom = eff.topk(k, dim=1), (-eff).topk(k, dim=1)
        for store, t in zip(out, (top.indices, top.values, bottom.indices, -bottom.values), strict=True):
            store.append(t.cpu())
    return tuple(torch.cat(x) for x in out)  # type: ignore[return-value]


@torch.no_grad()
def decoder_neighbours(
    directions: torch.Tensor, k: int = 5, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) ids and cosines of each direction's nearest other directions (-1 / 0 beyond n - 1)."""
    n = len(directions)
    unit = directions.float() / directions.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    ids = torch.full((n, k), -1, dtype=torch.long, device=unit.device)
    cos = torch.zeros(n, k, device=unit.device)
    kk = min(k, n - 1)
    for lo in range(0, n, chunk if kk > 0 else n):
        if kk <= 0:
            break
        hi = min(lo + chunk, n)
        sim = unit[lo:hi] @ unit.T
        rows = torch.arange(hi - lo, device=unit.device)
        sim[rows, rows + lo] = float("-inf")
        top = sim.topk(kk, dim=1)
        ids[lo:hi, :kk], cos[lo:hi, :kk] = top.indices, top.values
    return ids.cpu(), cos.cpu()
