"""Steered generation: left-padded batches through `transformers`' own `generate` with its KV cache, seeded.

The steering hooks stay on for the whole `generate` call, so every new token is steered. Sampling draws from
torch's global generator, forked and seeded for the call, so the same seed gives the same text and the
caller's random state is left as it was. A strength that makes an activation or a logit NaN/inf is caught,
and `largest_finite_strength` finds how far the strength can go.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from mri.errors import MriError
from mri.steer.interventions import NonFiniteSteering, Steering


class Generations(NamedTuple):
    """Continuations of a batch of prompts."""

    prompts: list[str]
    """The prompts, as given."""
    prompt_ids: list[list[int]]
    """Token ids of each prompt (BOS first when the tokenizer has one)."""
    ids: list[list[int]]
    """Token ids of each continuation, ending before the first EOS."""
    texts: list[str]
    """Each continuation decoded."""


class Batch(NamedTuple):
    """Prompts and continuations as one right-padded batch, for re-reading the generated text."""

    ids: torch.Tensor
    """(batch, pos) token ids."""
    attention_mask: torch.Tensor
    """(batch, pos) 1 on real tokens."""
    prompt_ends: torch.Tensor
    """(batch,) where each row's continuation starts."""
    generated: torch.Tensor
    """(batch, pos) True on continuation tokens."""


def prompt_ids(model: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, BOS first when the tokenizer has one."""
    bos = model.tokenizer.bos_token_id
    rows = [model.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [[bos, *r] if bos is not None else r for r in rows]
    if any(not r for r in rows):
        raise MriError("a prompt is empty and the tokenizer has no BOS token; give non-empty prompts")
    return rows


def pad_id(model: Any) -> int:
    tok = model.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def left_padded(model: Any, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (batch, width): rows padded on the left, as generation needs."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id(model), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(model.device), mask.to(model.device)


def as_batch(model: Any, gens: Generations) -> Batch:
    """Prompt + continuation of each row, right-padded (positions stay 0.. per row, no position shift)."""
    rows = [p + g for p, g in zip(gens.prompt_ids, gens.ids, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id(model), dtype=torch.long)
    mask = torch.zeros_like(ids)
    generated = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(gens.prompt_ids, rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
        generated[i, len(p) : len(r)] = True
    ends = torch.tensor([len(p) for p in gens.prompt_ids], dtype=torch.long)
    dev = model.device
    return Batch(ids.to(dev), mask.to(dev), ends, generated.to(dev))


class _FiniteLogits:
    """A logits processor that stops generation when a logit is NaN or infinite."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(scores).all():
            raise NonFiniteSteering("steering made the logits NaN or infinite")
        return scores


@torch.no_grad()
def generate(
    model: Any,
    prompts: Sequence[str],
    steering: Steering | None = None,
    *,
    max_new_tokens: int = 32,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 16,
) -> Generations:
    """Continue each prompt under `steering` (None: the unsteered model); temperature 0 is greedy.

    Raises `NonFiniteSteering` when the steering drives an activation or logit to NaN/inf.
    """
    from transformers import LogitsProcessorList

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise MriError("no prompts given")
    if max_new_tokens <= 0:
        raise MriError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise MriError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    rows = prompt_ids(model, prompts)
    eos = model.tokenizer.eos_token_id
    sampling = (
        {"do_sample": False}
        if temperature == 0
        else {
            "do_sample": True,
            "temperature": float(temperature),
            "top_k": int(top_k),
            "top_p": float(top_p),
        }
    )
    out: list[list[int]] = []
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for lo in range(0, len(rows), batch_size):
            ids, mask = left_padded(model, rows[lo : lo + batch_size])
            kwargs = {
                "input_ids": ids,
                "attention_mask": mask,
                "max_new_tokens": max_new_tokens,
                "min_new_tokens": 0,
                "pad_token_id": pad_id(model),
                "eos_token_id": eos,
                "logits_processor": LogitsProcessorList([_FiniteLogits()]),
                "use_cache": True,
                **sampling,
            }
            if steering is None:
                new = model.hf.generate(**kwargs)
            else:
                steering.begin(ids.shape[1])
                with model.hooks(replace=steering.replace):
                    new = model.hf.generate(**kwargs)
            for row in new[:, ids.shape[1] :].tolist():
                out.append(row[: row.index(eos)] if eos is not None and eos in row else row)
    texts = [model.tokenizer.decode(r, skip_special_tokens=True) for r in out]
    return Generations(prompts, rows, out, texts)


@torch.no_grad()
def forward_logits(model: Any, batch: Batch, steering: Steering | None = None) -> torch.Tensor:
    """(batch, pos, vocab) logits of one full-sequence forward, steered as during generation when given."""
    if steering is None:
        return model.run(batch.ids, batch.attention_mask, stop=False).logits
    steering.begin(batch.prompt_ends)
    logits = model.run(batch.ids, batch.attention_mask, replace=steering.replace, stop=False).logits
    if not torch.isfinite(logits).all():
        raise NonFiniteSteering("steering made the logits NaN or infinite")
    return logits


def is_finite(model: Any, steering: Steering, ids: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether a forward pass of the prompts `ids` (batch, pos) under `steering` stays finite everywhere."""
    batch = Batch(
        ids, mask, torch.full((ids.shape[0],), ids.shape[1]), torch.zeros_like(ids, dtype=torch.bool)
    )
    if steering.positions == "generated":
        steering = _all_positions(steering)
    try:
        forward_logits(model, batch, steering)
    except NonFiniteSteering:
        return False
    return True


def _all_positions(steering: Steering) -> Steering:
    out = copy.copy(steering)
    out.positions = "all"
    return out


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""The search's upper end: activations are float32 (or narrower), so no larger strength can stay finite."""


def largest_finite_strength(
    model: Any,
    steering: Steering,
    prompts: Sequence[str],
    too_far: float,
    *,
    rel_tol: float = 0.02,
    max_steps: int = 400,
) -> float:
    """The largest |strength| (with the sign of `too_far`) up to `too_far` at which the prompts' forward
    pass stays finite: halving until finite, then bisecting on a log scale to within `rel_tol`.

    The search starts at most at float32's largest value (an infinite or NaN `too_far` starts there too, so
    halving always makes progress: inf / 2 is inf), the tolerance is at least 1e-6 (the midpoint of two
    neighbouring floats is one of them), and it takes at most `max_steps` forward passes: it always ends.
    """
    ids, mask = left_padded(model, [r[-64:] for r in prompt_ids(model, list(prompts)[:4])])
    sign = -1.0 if too_far < 0 else 1.0  # NaN compares false: searched as positive
    hi = abs(too_far) if math.isfinite(too_far) else FLOAT32_MAX
    hi = min(hi, FLOAT32_MAX)
    if hi == 0:
        return 0.0
    steps = 0

    def finite(strength: float) -> bool:
        nonlocal steps
        steps += 1
        return is_finite(model, steering.with_strength(sign * strength), ids, mask)

    if hi == FLOAT32_MAX and finite(hi):
        return sign * hi
    lo = hi / 2
    while not finite(lo):
        hi, lo = lo, lo / 2
        if lo < 1e-30 or steps >= max_steps:
            return 0.0
    while hi / lo > 1 + max(rel_tol, 1e-6) and steps < max_steps:
        mid = math.sqrt(lo * hi)
        if finite(mid):
            lo = mid
        else:
            hi = mid
    return sign * lo
