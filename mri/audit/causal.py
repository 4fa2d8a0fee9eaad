"""Causal checks: does a finding's behaviour go when its features are ablated, and come when they are added?

A behaviour is measured by a function of generated texts (a phrase's rate, a topic's rate). Two kinds of
intervention, both at the dictionary's site and during generation:
- features: the implicated dictionary features are ablated (clamped to 0, the dictionary's error kept) where
  the behaviour shows, and added at their typical activation where it does not. The features are picked by
  their attribution to the behaviour (`feature_attribution`: activation times the gradient of the log-odds
  of the behaviour's tokens, summed over positions and prompts), and the check is run for the top 8, 16 and
  32 (`feature_curve`);
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


def log_odds(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n,) log p / (1 - p) of each target token under (n, vocab) logits: unlike log p, it does not flatten
    out as p nears 1, so a behaviour the model is sure of still has a gradient."""
    logp = torch.log_softmax(logits.float(), -1)
    hit = logp.gather(-1, targets[:, None].to(logp.device))[:, 0]
    rest = logp.scatter(-1, targets[:, None].to(logp.device), float("-inf")).logsumexp(-1)
    return hit - rest


def feature_attribution(
    model: Any,
    dictionary: Any,
    rows: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> torch.Tensor:
    """(n_latents,) each feature's attribution to the log-odds of the target tokens: the sum over rows and
    positions (BOS left out) of a_f(x) * (W_dec[f] . dJ/dx), where x is the site's value, a_f the
    dictionary's activation of feature f there and J the sum over rows r of log-odds (`log_odds`) of rows[r][t] after rows[r][:t]
    for t in targets[r]. To first order, the drop of J when feature f is ablated everywhere."""
    from mri.audit.diffing import padded

    site_in = model.resolve_site(dictionary.cfg.sites_in[0])
    site_out = model.resolve_site(dictionary.cfg.sites_out[0])
    w_dec = dictionary.W_dec.detach().float().to(model.device)
    total = torch.zeros(dictionary.cfg.n_latents)
    held: dict[str, torch.Tensor] = {}

    def leaf(value: torch.Tensor) -> torch.Tensor:
        held["x"] = value.detach().requires_grad_(True)
        return held["x"]

    for lo in range(0, len(rows), batch_size):
        chunk, want = rows[lo : lo + batch_size], targets[lo : lo + batch_size]
        ids, mask = padded(model, chunk)
        ids = ids.to(model.device)
        with torch.no_grad():
            x_in = model.run(ids, read=[site_in]).cache[site_in].float()
            acts = dictionary.encode(x_in.to(w_dec.dtype))
        logits = model.run(ids, replace={site_out: leaf}, stop=False, grad=True).logits.float()
        r_idx = torch.tensor([r for r, ts in enumerate(want) for _ in ts], dtype=torch.long)
        p_idx = torch.tensor([t - 1 for ts in want for t in ts], dtype=torch.long)
        objective = log_odds(logits[r_idx, p_idx], ids[r_idx, p_idx + 1]).sum()
        (grad,) = torch.autograd.grad(objective, held["x"])
        keep = mask.to(model.device).clone()
        keep[:, 0] = False
        per = acts * (grad.float() @ w_dec.T)
        total += (per * keep[..., None]).sum((0, 1)).cpu()
    return total


@torch.no_grad()
def mean_log_odds(
    model: Any,
    rows: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    steering: Steering | None = None,
) -> float:
    """Mean `log_odds` of the target tokens rows[r][t] (t in targets[r]), teacher-forced, under `steering`."""
    from mri.audit.diffing import padded

    ids, _ = padded(model, rows)
    r_idx = torch.tensor([r for r, ts in enumerate(targets) for _ in ts], dtype=torch.long)
    p_idx = torch.tensor([t - 1 for ts in targets for t in ts], dtype=torch.long)
    replace = {}
    if steering is not None:
        steering.begin(ids.shape[1])
        replace = steering.replace
    logits = model.run(ids.to(model.device), replace=replace, stop=False).logits
    return float(log_odds(logits[r_idx, p_idx], ids[r_idx, p_idx + 1].to(model.device)).mean())


def feature_curve(
    model: Any,
    dictionary: Any,
    ranked: Sequence[tuple[int, float]],
    measure: Measure,
    on: Sequence[str],
    off: Sequence[str],
    *,
    sizes: Sequence[int] = (8, 16, 32),
    induce_in: Any | None = None,
    forced: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]] | None = None,
    new_tokens: int = 16,
    selection: str = "attribution",
) -> list[dict]:
    """For each n in `sizes`, the top n of `ranked` ((feature, typical activation) pairs, best first) ablated in
    `model` on prompts `on`, where the behaviour shows, and added at their typical activation in `induce_in`
    (default `model`) on prompts `off`, where it does not: one row per n with the rates, the shares removed
    and induced, `n_features` and how the features were picked (`selection`). With `forced` (rows, targets),
    each row also has the targets' mean log-odds (`mean_log_odds`), plain and with the features ablated."""
    target = induce_in if induce_in is not None else model
    rate_on = measure(_texts(model, on, None, new_tokens))
    rate_off = measure(_texts(target, off, None, new_tokens))
    plain = mean_log_odds(model, *forced) if forced else None
    out = []
    for n in sizes:
        if n > len(ranked):
            break
        feats = ranked[:n]
        ablate = Steering(model, [FeatureEdit(dictionary, f, "ablate") for f, _ in feats], "all",
                          check_fingerprint=False)  # fmt: skip
        add = Steering(target, [FeatureEdit(dictionary, f, "add", v) for f, v in feats], "all",
                       check_fingerprint=False)  # fmt: skip
        row = {
            "intervention": "features",
            "selection": selection,
            "n_features": n,
            "site": dictionary.cfg.sites_out[0],
            **_effects(rate_on, measure(_texts(model, on, ablate, new_tokens)), rate_off,
                       measure(_texts(target, off, add, new_tokens))),
        }  # fmt: skip
        if forced:
            row |= {"log_odds": plain, "log_odds_ablated": mean_log_odds(model, *forced, ablate)}
        out.append(row)
    return out


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
