"""A dictionary with known answers: latent i fires exactly on token `token_ids[i]`, for testing the atlas,
explainers and scorers against ground truth."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mri.dictionaries.config import DictConfig
from mri.dictionaries.sparse_coder import SparseCoder
from mri.errors import MriError


@torch.no_grad()
def token_detectors(model: Any, token_ids: Sequence[int]) -> SparseCoder:
    """A ReLU SAE on `hook_embed` whose latent i reads along token_ids[i]'s embedding, with a bias that puts
    its threshold halfway between that token's projection and the largest projection of any other token:
    it fires on that token and on no other, always with the same activation."""
    E = model.hf.get_input_embeddings().weight.detach().float().cpu()  # (vocab, d)
    cfg = DictConfig(kind="sae", arch="relu", d_in=E.shape[1], n_latents=len(token_ids),
                     sites_in=["hook_embed"], sites_out=["hook_embed"])  # fmt: skip
    sae = SparseCoder(cfg)
    for i, t in enumerate(token_ids):
        unit = E[t] / E[t].norm()
        proj = E @ unit
        own = proj[t].item()
        proj[t] = float("-inf")
        other = proj.max().item()
        if other >= own:
            raise MriError(f"token {t}'s embedding is not separable from token {int(proj.argmax())}'s")
        sae.W_enc[i] = unit
        sae.W_dec[i] = unit
        sae.b_enc[i] = -(own + other) / 2
    sae.b_dec.zero_()
    return sae.eval()
