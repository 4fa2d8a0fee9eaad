"""The steering claim in numbers: over neutral prompts, how much more often steered text carries a feature's
concept than unsteered text, and at what cost in perplexity (target: >= 10x as often, <= 2x perplexity)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mri.errors import MriError
from mri.steer.calibrate import calibrate
from mri.steer.generate import generate, largest_finite_strength
from mri.steer.interventions import FeatureEdit, NonFiniteSteering, Steering
from mri.steer.measure import concept_tokens, measure

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

    strength: None calibrates it first (on `calibration_prompts`, default the first 16 prompts with another
    seed, so the sampled texts measured here are not the ones the strength was picked on).
    concept: token ids that mark the concept (default: the feature's `n_tokens` top tokens, from `atlas`
    when given, else by `token_source`). The concept rate ratio is a lower bound: an unsteered rate of 0
    counts as 1/n.
    """
    if len(prompts) == 0:
        raise MriError("give at least one prompt")
    concept = (
        list(concept)
        if concept is not None
        else concept_tokens(model, dictionary, feature, source=token_source, atlas=atlas, k=n_tokens)
    )
    steering = Steering(model, [FeatureEdit(dictionary, feature, mode, strength or 0.0)], positions)
    gen = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    calibration = None
    if strength is None:
        calibration = calibrate(
            model,
            steering,
            calibration_prompts or prompts[:16],
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
