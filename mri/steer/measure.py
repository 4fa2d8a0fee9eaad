"""How much of a concept steered text carries, and what it costs in fluency — measured by the unsteered model.

Concept presence: the feature's own activation on the generated text re-read by the unsteered model, and
the share of generations that contain one of the feature's top tokens (from an atlas, the feature's logit
effect, or its highest-activating tokens on a corpus). Fluency: perplexity of the generated tokens under the
unsteered model, and the KL divergence between the steered and unsteered next-token distributions on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mri.errors import MriError
from mri.steer.generate import Generations, as_batch, forward_logits
from mri.steer.interventions import Steering, check_feature


@dataclass
class Measurement:
    """Concept presence and fluency of one set of generations."""

    strength: float | None
    """The steering strength (None: the unsteered model)."""
    n_generations: int
    n_tokens: int
    """Generated tokens measured (continuations stop at EOS)."""
    perplexity: float
    """exp(mean NLL) of the generated tokens under the unsteered model."""
    token_rate: float | None = None
    """Share of generations holding one of the concept tokens (None without concept tokens)."""
    activation: float | None = None
    """Mean over generations of the feature's mean activation on generated tokens, re-read unsteered."""
    activation_rate: float | None = None
    """Share of generations on which the re-read feature fires (> 0) on some generated token."""
    kl: float | None = None
    """Mean KL(steered || unsteered) over generated positions (None for the unsteered model)."""
    examples: list[str] = field(default_factory=list)
    """The first few continuations."""


# ---- concept tokens --------------------------------------------------------------------------------


def _meaningful(model: Any, ids: Iterable[int]) -> list[int]:
    """Ids that are not special tokens and hold a letter or digit once decoded."""
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    out = []
    for i in ids:
        i = int(i)
        if i in special or i in out:
            continue
        if any(c.isalnum() for c in model.tokenizer.decode([i])):
            out.append(i)
    return out


def logit_tokens(model: Any, direction: torch.Tensor, k: int = 10) -> list[int]:
    """Token ids a direction (d,) promotes most through the final norm's scale and the unembedding."""
    from mri.atlas.effects import logit_effects

    top_ids = logit_effects(model, direction.reshape(1, -1), k=4 * k)[0][0].tolist()
    return _meaningful(model, top_ids)[:k]


def atlas_tokens(atlas: str | Path, feature: int, k: int = 10) -> list[int]:
    """A feature's top tokens from its atlas: the peak tokens of its top examples, most frequent first,
    then the tokens it promotes most."""
    from collections import Counter

    from mri.atlas.reader import Atlas

    row = Atlas(atlas).feature(feature)
    peaks = Counter(e["token_ids"][e["peak"]] for e in row.get("examples", []) if e.get("kind") == "top")
    ordered = [t for t, _ in peaks.most_common()] + list(row.get("logit_pos_ids", []))
    return list(dict.fromkeys(int(t) for t in ordered))[: 2 * k]


@torch.no_grad()
def corpus_tokens(
    model: Any, dictionary: Any, feature: int, texts: Sequence[str], k: int = 10, batch_size: int = 8
) -> list[int]:
    """The tokens on which the feature is most active over `texts` (by each token's highest activation)."""
    site = model.resolve_site(dictionary.cfg.sites_in[0])
    best: dict[int, float] = {}
    for lo in range(0, len(texts), batch_size):
        ids = model.to_tokens(list(texts[lo : lo + batch_size]))[:, :256]
        x = model.run(ids, read=[site]).cache[site]
        acts = dictionary.encode(x.float())[..., feature].cpu()
        for tok, a in zip(ids.flatten().tolist(), acts.flatten().tolist(), strict=True):
            if a > best.get(tok, 0.0):
                best[tok] = a
    ranked = sorted(best, key=best.get, reverse=True)
    return ranked[: 4 * k]


def concept_tokens(
    model: Any,
    dictionary: Any,
    feature: int,
    *,
    source: str = "logits",
    atlas: str | Path | None = None,
    texts: Sequence[str] | None = None,
    k: int = 5,
) -> list[int]:
    """The feature's top tokens: from `atlas` when given; else source 'logits' (what its decoder direction
    promotes) or 'corpus' (where it fires most on `texts`, default the shipped corpus sample).

    An atlas must be of this very dictionary (`Atlas.check_dictionary`): another dictionary's latent with
    the same index fires on other tokens, and steering would be measured against the wrong concept."""
    feature = check_feature(dictionary, feature)
    if atlas is not None:
        from mri.atlas.reader import Atlas

        Atlas(atlas).check_dictionary(dictionary)
        ids = atlas_tokens(atlas, feature, k)
    elif source == "logits":
        ids = logit_tokens(model, dictionary.W_dec[feature].detach(), 4 * k)
    elif source == "corpus":
        ids = corpus_tokens(model, dictionary, feature, texts or neutral_prompts(64, words=64), k)
    else:
        raise MriError(f"concept tokens come from 'logits' or 'corpus' (or an atlas), not {source!r}")
    ids = _meaningful(model, ids)[:k]
    if not ids:
        raise MriError(
            f"feature {feature} has no top tokens that hold a letter or digit; pass concept tokens yourself"
        )
    return ids


def _norm(text: str) -> str:
    return text.strip().lower()


def holds_concept(model: Any, ids: Sequence[int], concept: Sequence[int]) -> bool:
    """Whether a continuation holds a concept token (same id, or the same text up to case and spaces)."""
    wanted = set(concept)
    texts = {_norm(model.tokenizer.decode([t])) for t in concept} - {""}
    return any(t in wanted or _norm(model.tokenizer.decode([t])) in texts for t in ids)


# ---- measuring -------------------------------------------------------------------------------------


@torch.no_grad()
def measure(
    model: Any,
    gens: Generations,
    *,
    strength: float | None = None,
    dictionary: Any = None,
    feature: int | None = None,
    concept: Sequence[int] | None = None,
    steering: Steering | None = None,
    n_examples: int = 3,
) -> Measurement:
    """Re-read `gens` with the unsteered model: perplexity, concept token rate, the feature's activation;
    with `steering`, also the KL of the steered from the unsteered next-token distributions."""
    batch = as_batch(model, gens)
    site = model.resolve_site(dictionary.cfg.sites_in[0]) if dictionary is not None else None
    out = model.run(batch.ids, batch.attention_mask, read=[site] if site else [], stop=False)
    logp = out.logits.float().log_softmax(-1)
    # the token at position t is predicted at t - 1
    predicting = torch.zeros_like(batch.generated)
    predicting[:, :-1] = batch.generated[:, 1:]
    targets = batch.ids[:, 1:][batch.generated[:, 1:]]
    nll = -logp[predicting].gather(-1, targets[:, None]).squeeze(-1)
    n_tokens = int(nll.numel())
    m = Measurement(
        strength=strength,
        n_generations=len(gens.ids),
        n_tokens=n_tokens,
        perplexity=math.exp(float(nll.mean())) if n_tokens else float("nan"),
        examples=list(gens.texts[:n_examples]),
    )
    if concept is not None:
        m.token_rate = sum(holds_concept(model, ids, concept) for ids in gens.ids) / len(gens.ids)
    if dictionary is not None and feature is not None:
        acts = dictionary.encode(out.cache[site].float())[..., feature]
        on = batch.generated.float()
        per_row = (acts * on).sum(1) / on.sum(1).clamp_min(1)
        m.activation = float(per_row.mean())
        m.activation_rate = float(((acts * on).amax(1) > 0).float().mean())
    if steering is not None and n_tokens:
        steered = forward_logits(model, batch, steering).float().log_softmax(-1)[predicting]
        m.kl = float((steered.exp() * (steered - logp[predicting])).sum(-1).mean())
    return m


# ---- prompts ---------------------------------------------------------------------------------------


def neutral_prompts(n: int = 50, corpus: str | Path | None = None, words: int = 6) -> list[str]:
    """The first `words` words of `n` documents of `corpus` (default the shipped corpus sample), spread
    over the corpus: openings that favour no particular concept."""
    from mri.data.corpus import iter_documents, sample_corpus

    docs = [d for d in iter_documents(corpus or sample_corpus()) if len(d.split()) >= words]
    if len(docs) < n:
        raise MriError(f"the corpus has only {len(docs)} documents of {words}+ words; ask for fewer prompts")
    step = len(docs) / n
    return [" ".join(docs[int(i * step)].split()[:words]) for i in range(n)]
