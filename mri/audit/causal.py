"""Causal checks: does a finding's behaviour go when its features are ablated, and come when they are added?

A behaviour is measured by a function of generated texts (a phrase's rate, a topic's rate). Two kinds of
intervention, both at the dictionary's site and during generation:
- features: the implicated dictionary features are ablated (clamped to 0, the dictionary's error kept) where
  the behaviour shows, and added at their typical activation where it does not;
- direction: the mean difference of the site's value between where the behaviour shows and where it does
  not is projected out, or added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mri.steer import FeatureEdit, Steering, generate

Measure = Callable[[Sequence[str]], float]


def _texts(model: Any, prompts: Sequence[str], steering: Steering | None, new_tokens: int) -> list[str]:
    return generate(model, list(prompts), steering, max_new_tokens=new_tokens, temperature=0.0).texts


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def _effects(rate_on: float, rate_ablated: float, rate_off: float, rate_added: float) -> dict:
    """The behaviour's rates under an intervention, the share it removed and what it induced."""
    return {
        "rate": rate_on,
        "rate_ablated": rate_ablated,
        "removed": _ratio(rate_on - rate_ablated, rate_on),
        "rate_without": rate_off,
        "rate_added": rate_added,
        "induced": rate_added - rate_off,
    }


def feature_check(
    model: Any,
    dictionary: Any,
    features: Sequence[tuple[int, float]],
    measure: Measure,
    on: Sequence[str],
    off: Sequence[str],
    *,
    induce_in: Any | None = None,
    new_tokens: int = 16,
) -> dict:
    """Ablate `features` ((feature, typical activation) pairs) in `model` on prompts `on`, where the
    behaviour shows; add them at their typical activation in `induce_in` (default `model`) on prompts
    `off`, where it does not. Returns the rates and the shares removed and induced."""
    target = induce_in if induce_in is not None else model
    ablate = Steering(model, [FeatureEdit(dictionary, f, "ablate") for f, _ in features], "all",
                      check_fingerprint=False)  # fmt: skip
    add = Steering(target, [FeatureEdit(dictionary, f, "add", v) for f, v in features], "all",
                   check_fingerprint=False)  # fmt: skip
    rate_on = measure(_texts(model, on, None, new_tokens))
    rate_ablated = measure(_texts(model, on, ablate, new_tokens))
    rate_off = measure(_texts(target, off, None, new_tokens))
    rate_added = measure(_texts(target, off, add, new_tokens))
    return {
        "intervention": "features",
        "site": dictionary.cfg.sites_out[0],
        "features": [{"feature": f, "activation": v} for f, v in features],
        **_effects(rate_on, rate_ablated, rate_off, rate_added),
    }


@torch.no_grad()
def mean_site_value(model: Any, site: str, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """(d,) mean value at `site` over every token after BOS of `rows`."""
    from mri.audit.diffing import site_values

    return torch.cat(site_values(model, site, rows)).mean(0)


def direction_check(
    model: Any,
    site: str,
    direction: torch.Tensor,
    measure: Measure,
    on: Sequence[str],
    off: Sequence[str],
    *,
    induce_in: Any | None = None,
    new_tokens: int = 16,
) -> dict:
    """Project `direction` (d,) out of `site` in `model` on prompts `on`; add it to `induce_in` (default
    `model`) on prompts `off`. Returns the rates and the shares removed and induced."""
    target = induce_in if induce_in is not None else model
    site = model.resolve_site(site)
    d = direction.float().to(model.device)
    unit = d / d.norm().clamp_min(1e-9)

    def project_out(x: torch.Tensor) -> torch.Tensor:
        return x - (x @ unit.to(x.dtype))[..., None] * unit.to(x.dtype)

    def add(x: torch.Tensor) -> torch.Tensor:
        return x + d.to(x.dtype)

    rate_on = measure(_texts(model, on, None, new_tokens))
    with model.hooks(replace={site: project_out}):
        rate_ablated = measure(_texts(model, on, None, new_tokens))
    rate_off = measure(_texts(target, off, None, new_tokens))
    with target.hooks(replace={site: add}):
        rate_added = measure(_texts(target, off, None, new_tokens))
    return {
        "intervention": "direction",
        "site": site,
        "norm": float(d.norm()),
        **_effects(rate_on, rate_ablated, rate_off, rate_added),
    }


@torch.no_grad()
def kl_feature_check(
    model: Any, base: Any, dictionary: Any, features: Sequence[int], rows: Sequence[Sequence[int]]
) -> dict:
    """Mean per-token KL(base || model) over `rows`, plain and with `features` ablated in the model: the
    share of the divergence those features carry."""
    from mri.audit.diffing import kl, log_probs, padded

    steering = Steering(model, [FeatureEdit(dictionary, f, "ablate") for f in features], "all",
                        check_fingerprint=False)  # fmt: skip
    ids, mask = padded(model, rows)
    keep = mask.clone()
    keep[:, 0] = False
    lb = log_probs(base, ids)
    plain = float(kl(lb, log_probs(model, ids))[keep].mean())
    steering.begin(ids.shape[1])
    ablated = float(kl(lb, log_probs(model, ids, replace=steering.replace))[keep].mean())
    return {
        "intervention": "features",
        "site": dictionary.cfg.sites_out[0],
        "features": [{"feature": f} for f in features],
        "measure": "mean per-token KL to the base on the standard texts",
        "kl": plain,
        "kl_ablated": ablated,
        "removed": _ratio(plain - ablated, plain),
    }
