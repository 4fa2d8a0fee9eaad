"""The steering claim in numbers: over neutral prompts, how much more often steered text carries a feature's
concept than unsteered text, and at what cost in perplexity (target: >= 10x as often, <= 2x perplexity)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mri.errors import MriError
from mri.steer.calibrate import calibrate
from mri.steer.generate import generate, largest_finite_strength
from mri.steer.interventions import FeatureEdit, NonFiniteSteering, Steering
from mri.steer.measure import concept_tokens, logit_tokens, measure

TARGET_RATIO = 10.0
TARGET_PPL_RATIO = 2.0


def concept_demo(
    model: Any,
    dictionary: Any,
    feature: int,
    prompts: Sequence[str],
    *,
    strength: float | None = None,
    mode: str = "add",
    positions: str = "all",
    concept: Sequence[int] | None = None,
    atlas: str | Path | None = None,
    token_source: str = "logits",
    n_tokens: int = 5,
    max_new_tokens: int = 32,
    seed: int = 0,
    temperature: float = 1.0,
    calibration_prompts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Steer `feature` on every prompt and compare with the unsteered model; return the figures.

    strength: None calibrates it first (on `calibration_prompts`, default 16 of the prompts spread evenly over
    the list, with another seed, so the sampled texts measured here are not the ones the strength was picked
    on; spread, because neutral prompts come in corpus order and the first few share a source).
    concept: token ids that mark the concept (default: the feature's `n_tokens` top tokens, from `atlas`
    when given, else by `token_source`). The concept rate ratio is a lower bound: an unsteered rate of 0
    counts as 1/n. With an atlas (which must be of this dictionary) and no `concept`, the concept is the
    whole words the atlas shows the feature promoting (`atlas_concept_words`).
    """
    if len(prompts) == 0:
        raise MriError("give at least one prompt")
    if concept is not None:
        concept = list(concept)
    elif atlas is not None:
        concept = atlas_concept_words(model, dictionary, atlas, feature) or concept_tokens(
            model, dictionary, feature, atlas=atlas, k=n_tokens
        )
    elif token_source == "logits":
        concept = concept_words(model, dictionary, feature) or concept_tokens(
            model, dictionary, feature, k=n_tokens
        )
    else:
        concept = concept_tokens(model, dictionary, feature, source=token_source, atlas=atlas, k=n_tokens)
    steering = Steering(model, [FeatureEdit(dictionary, feature, mode, strength or 0.0)], positions)
    gen = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    calibration = None
    if strength is None:
        calibration = calibrate(
            model,
            steering,
            calibration_prompts or list(prompts[:: max(1, len(prompts) // 16)][:16]),
            dictionary=dictionary,
            feature=feature,
            concept=concept,
            seed=seed + 1,
            **gen,
        )
        if calibration.chosen is None:
            raise MriError(f"no strength could be calibrated: {calibration.reason}; pass one with strength=")
        strength = calibration.chosen
    steering = steering.with_strength(strength)
    read = {"dictionary": dictionary, "feature": feature, "concept": concept}
    plain = measure(model, generate(model, prompts, seed=seed, **gen), **read)
    try:
        steered_gens = generate(model, prompts, steering, seed=seed, **gen)
    except NonFiniteSteering as e:
        safe = largest_finite_strength(model, steering, prompts, strength)
        raise MriError(
            f"{e} at strength {strength:g}; the largest finite strength found is {safe:.4g}"
        ) from e
    steered = measure(model, steered_gens, strength=strength, steering=steering, **read)
    n = len(prompts)
    ratio = steered.token_rate / max(plain.token_rate, 1 / n)
    ppl_ratio = steered.perplexity / plain.perplexity
    return {
        "feature": int(feature),
        "mode": mode,
        "strength": float(strength),
        "n_prompts": n,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "atlas": None if atlas is None else str(atlas),
        "concept_tokens": [model.tokenizer.decode([t]) for t in concept],
        "steered_rate": steered.token_rate,
        "unsteered_rate": plain.token_rate,
        "rate_ratio": ratio,
        "steered_perplexity": steered.perplexity,
        "unsteered_perplexity": plain.perplexity,
        "perplexity_ratio": ppl_ratio,
        "steered_activation": steered.activation,
        "unsteered_activation": plain.activation,
        "kl": steered.kl,
        "passed": bool(ratio >= TARGET_RATIO and ppl_ratio <= TARGET_PPL_RATIO),
        "examples": [
            {"prompt": p, "unsteered": u, "steered": s}
            for p, u, s in zip(prompts[:5], plain.examples, steered.examples, strict=False)
        ],
        "calibration": calibration.to_dict() if calibration is not None else None,
    }


def token_frequencies(model: Any, corpus: str | Path | None = None, max_docs: int = 2000) -> torch.Tensor:
    """Each token's share of the tokens of `corpus` (default the shipped corpus sample): how common a word
    is in ordinary text, so that concepts the unsteered model already writes all the time can be passed over."""
    from mri.data.corpus import iter_documents, sample_corpus

    counts = torch.zeros(len(model.tokenizer), dtype=torch.float64)
    docs = [d for _, d in zip(range(max_docs), iter_documents(corpus or sample_corpus()), strict=False)]
    for lo in range(0, len(docs), 256):
        for ids in model.tokenizer(docs[lo : lo + 256], add_special_tokens=False, verbose=False)["input_ids"]:
            counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=len(counts)).double()
    return counts / counts.sum().clamp_min(1)


@torch.no_grad()
def concept_candidates(
    model: Any,
    dictionary: Any,
    n: int = 8,
    min_letters: int = 4,
    max_frequency: float = 2e-4,
    frequencies: torch.Tensor | None = None,
    atlas: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Features most likely to carry a steerable concept: those whose decoder direction promotes one word
    far above the rest of the vocabulary.

    Score: the z-score of the top logit effect over the vocabulary (how singled out the word is), kept only
    when that token is a word (a leading space and at least `min_letters` letters) that is rare in ordinary
    text (share of corpus tokens at most `max_frequency`: a concept the unsteered model already writes
    everywhere cannot become ten times as common). Nothing here knows what any concept is: every feature
    is ranked the same way, so it can be used on any model and dictionary.

    With `atlas` (one built from this dictionary) the candidates are picked from the atlas, as a person
    browsing it would: only features that fired on the atlas's corpus count (a latent that never fires
    carries no concept a reader could have seen), the word and the concept words are the ones the atlas
    shows the feature promoting (`atlas_concept_words`), and each candidate lists the tokens it fires on
    most in the atlas's top examples (`fires_on`), so what it reads can be weighed against what it writes.
    """
    from mri.atlas.effects import unembedding_path

    shown = _atlas_features(dictionary, atlas) if atlas is not None else None
    freq = token_frequencies(model) if frequencies is None else frequencies
    W_U, gamma, centre = unembedding_path(model)
    W_dec = dictionary.W_dec.detach().float()
    if W_dec.dim() == 3:  # a cross-layer transcoder: the decoder to its last layer
        W_dec = W_dec[:, -1]
    rows = []
    for lo in range(0, len(W_dec), 1024):
        d = W_dec[lo : lo + 1024].to(W_U.device)
        if centre:
            d = d - d.mean(-1, keepdim=True)
        eff = (d * gamma) @ W_U.T
        z = (eff - eff.mean(1, keepdim=True)) / eff.std(1, keepdim=True).clamp_min(1e-6)
        top = z.topk(5, dim=1)
        for i in range(len(d)):
            ids = top.indices[i].tolist()
            if shown is not None:
                if lo + i not in shown:
                    continue
                ids = shown[lo + i]["logit_pos_ids"][:5]
            word = model.tokenizer.decode([ids[0]])
            if not _is_word(word, min_letters) or (
                ids[0] < len(freq) and float(freq[ids[0]]) > max_frequency
            ):
                continue
            rows.append({"feature": lo + i, "z": float(top.values[i, 0]), "word": word, "top_ids": ids})
    rows.sort(key=lambda r: -r["z"])
    rows = rows[:n]
    for r in rows:
        if atlas is None:
            r["concept"] = concept_words(model, dictionary, r["feature"], min_letters - 1)
        else:
            r["concept"] = atlas_concept_words(model, dictionary, atlas, r["feature"], min_letters - 1)
            r["fires_on"] = atlas_peak_tokens(atlas, r["feature"])
            r["density"] = shown[r["feature"]]["density"]
    return rows


def _atlas_features(dictionary: Any, atlas: str | Path) -> dict[int, dict[str, Any]]:
    """Feature -> its atlas row (density, promoted token ids), for the features that fired in the atlas;
    MriError when the atlas is not of `dictionary` (its latent i would be another feature)."""
    import pyarrow.parquet as pq

    from mri.atlas.build import FEATURES
    from mri.atlas.reader import Atlas

    a = Atlas(atlas)
    a.check_dictionary(dictionary)
    rows = pq.read_table(a.path / FEATURES, columns=["feature", "density", "logit_pos_ids"]).to_pylist()
    return {int(r["feature"]): r for r in rows if r["density"] > 0}


def atlas_concept_words(
    model: Any, dictionary: Any, atlas: str | Path, feature: int, min_letters: int = 3, k: int = 10
) -> list[int]:
    """The concept as the atlas shows it: the whole-word tokens (a leading space, letters only) among the
    tokens the atlas lists the feature as promoting (its logit effect, top 10), up to `k`.

    The promoted tokens, not the tokens it fires on: steering adds the feature's decoder direction, so what
    should appear in steered text is what the feature writes; at the last block the tokens a feature fires
    on are the context before that word (feature 3882 of mri-base's L3 SAE fires on ' file', ' message'
    and promotes ' displayed', ' stored'), common words whose presence would say nothing about steering.
    """
    from mri.atlas.reader import Atlas

    a = Atlas(atlas)
    a.check_dictionary(dictionary)
    ids = a.feature(feature, examples=False)["logit_pos_ids"]
    return [int(t) for t in ids if _is_word(model.tokenizer.decode([int(t)]), min_letters)][:k]


def atlas_peak_tokens(atlas: str | Path, feature: int, k: int = 5) -> list[str]:
    """The tokens the feature fires on most in the atlas: peak tokens of its top examples, commonest
    first."""
    from collections import Counter

    from mri.atlas.reader import Atlas

    a = Atlas(atlas)
    peaks = Counter(
        e["tokens"][e["peak"]]
        for e in a.examples(feature, kinds=("top",))
        if 0 <= e["peak"] < len(e["tokens"])
    )
    return [t for t, _ in peaks.most_common(k)]


def concept_words(model: Any, dictionary: Any, feature: int, min_letters: int = 3, k: int = 10) -> list[int]:
    """The concept as words: the whole-word tokens (a leading space, letters only) among the 40 tokens the
    feature's decoder promotes most, up to `k`. Word pieces are left out: a piece such as 'by' also matches
    the common word ' by' and would count unsteered text as carrying the concept."""
    W_dec = dictionary.W_dec.detach()
    direction = W_dec[feature, -1] if W_dec.dim() == 3 else W_dec[feature]
    ids = logit_tokens(model, direction, 40)
    return [t for t in ids if _is_word(model.tokenizer.decode([t]), min_letters)][:k]


def _is_word(text: str, min_letters: int) -> bool:
    return text.startswith(" ") and len(text.strip()) >= min_letters and text.strip().isalpha()


def concept_search(
    model: Any,
    dictionary: Any,
    prompts: Sequence[str],
    n_candidates: int = 8,
    min_letters: int = 4,
    **kwargs: Any,
) -> dict[str, Any]:
    """`concept_demo` on the `n_candidates` best `concept_candidates`, each with its strength calibrated on
    other samples; returns every result (so a reader sees how many were tried) and the best one: the first
    that passes, else the one with the highest concept ratio inside the perplexity budget. An `atlas` in
    `kwargs` picks the candidates and their concept words from the atlas (see `concept_candidates`)."""
    tried = []
    atlas = kwargs.get("atlas")
    for cand in concept_candidates(model, dictionary, n_candidates, min_letters, atlas=atlas):
        try:
            options = {"concept": cand["concept"], **kwargs}
            result = concept_demo(model, dictionary, cand["feature"], prompts, **options)
        except MriError as e:
            tried.append(
                {"feature": cand["feature"], "word": cand["word"], "candidate": cand, "error": str(e)}
            )
            continue
        result["candidate"] = cand
        tried.append(result)
        if result["passed"]:
            break
    ok = [r for r in tried if "error" not in r]
    within = [r for r in ok if r["perplexity_ratio"] <= TARGET_PPL_RATIO]
    best = next((r for r in ok if r["passed"]), None) or max(
        within or ok, key=lambda r: r["rate_ratio"], default=None
    )
    return {"best": best, "tried": tried, "passed": bool(best and best["passed"])}
