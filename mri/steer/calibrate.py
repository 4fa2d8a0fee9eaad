"""Choose a steering strength by measurement: sweep it, measure concept against fluency, pick the knee.

The pick: the strength with the most concept (token rate, or the re-read activation) whose perplexity
stays within `max_ppl_ratio` times the unsteered model's, smallest strength on ties. A strength whose
activations or logits turn NaN/inf ends the sweep; the largest finite strength below it is reported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mri.errors import MriError
from mri.steer.generate import generate, largest_finite_strength
from mri.steer.interventions import FeatureEdit, NonFiniteSteering, Steering, VectorEdit, check_strength
from mri.steer.measure import Measurement, measure

MULTIPLES = (0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0, 2.0, 4.0, 8.0, 16.0)
"""Default sweep, in units of the site's typical scale (see `default_strengths`); dense at the low end,
where the knee between concept and fluency usually lies."""


@dataclass
class Calibration:
    """A strength sweep: the unsteered baseline, one measurement per strength, and the pick."""

    baseline: Measurement
    points: list[Measurement]
    metric: str
    """'tokens' (concept token rate) or 'activation' (re-read feature activation)."""
    max_ppl_ratio: float
    chosen: float | None
    """The picked strength (None when no strength raised the concept within the perplexity budget)."""
    reason: str
    largest_finite: float | None = None
    """When a strength turned activations NaN/inf: the largest strength found that stays finite."""
    settings: dict[str, Any] = field(default_factory=dict)

    def score(self, m: Measurement) -> float:
        value = m.token_rate if self.metric == "tokens" else m.activation
        return float("nan") if value is None else float(value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "steer-calibration",
            "format_version": 1,
            "metric": self.metric,
            "max_ppl_ratio": self.max_ppl_ratio,
            "chosen": self.chosen,
            "reason": self.reason,
            "largest_finite": self.largest_finite,
            "baseline": asdict(self.baseline),
            "points": [
                asdict(p) | {"ppl_ratio": p.perplexity / self.baseline.perplexity} for p in self.points
            ],
            "settings": self.settings,
        }

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write calibration.json and tradeoff.png into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "calibration.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True))
        return path, plot(self, folder / "tradeoff.png")


def site_scale(model: Any, steering: Steering, prompts: Sequence[str]) -> float:
    """A natural unit for the strength: the feature's top activation on the prompts for a clamp; otherwise
    the mean norm of the edited site over the prompts, per unit of the edit's direction norm."""
    edit = steering.edits[0]
    if isinstance(edit, VectorEdit):
        site, direction = edit.site, edit.vector
    else:
        site = model.resolve_site(edit.dictionary.cfg.sites_out[0])
        direction = edit.dictionary.W_dec[edit.feature].detach()
    reads = {site}
    if isinstance(edit, FeatureEdit):
        reads.add(model.resolve_site(edit.dictionary.cfg.sites_in[0]))
    ids = model.to_tokens(list(prompts)[:16])
    cache = model.run(ids, read=sorted(reads)).cache
    norm = float(cache[site][:, 1:].float().norm(dim=-1).mean()) / max(float(direction.norm()), 1e-12)
    if isinstance(edit, FeatureEdit) and edit.mode == "clamp":
        x_in = cache[model.resolve_site(edit.dictionary.cfg.sites_in[0])].float()
        top = float(edit.dictionary.encode(x_in)[..., edit.feature].max())
        return top if top > 0 else norm
    return norm


def default_strengths(model: Any, steering: Steering, prompts: Sequence[str]) -> list[float]:
    """`MULTIPLES` of `site_scale`."""
    scale = site_scale(model, steering, prompts)
    return [round(m * scale, 6) for m in MULTIPLES]


def calibrate(
    model: Any,
    steering: Steering,
    prompts: Sequence[str],
    *,
    strengths: Sequence[float] | None = None,
    dictionary: Any = None,
    feature: int | None = None,
    concept: Sequence[int] | None = None,
    metric: str | None = None,
    max_ppl_ratio: float = 2.0,
    max_new_tokens: int = 24,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 16,
    refine: int = 2,
) -> Calibration:
    """Sweep `strengths` (default: `default_strengths`) of `steering` over `prompts`, measure each against
    the unsteered model, and pick a strength (see the module docstring). Then `refine` times, try the
    geometric midpoint between the pick and the next strength, when that one had more concept but broke
    the perplexity budget, and pick again: the knee is found between the grid's points.

    dictionary/feature: re-read the feature's activation; concept: token ids whose presence marks the
    concept. metric: 'tokens' (default when `concept` is given) or 'activation'.
    """
    metric = metric or ("tokens" if concept else "activation")
    if metric == "tokens" and not concept:
        raise MriError("the 'tokens' metric needs concept tokens; give them, or an atlas, or a dictionary")
    if metric == "activation" and (dictionary is None or feature is None):
        raise MriError("the 'activation' metric needs a dictionary feature; steer a feature, or give tokens")
    if metric not in ("tokens", "activation"):
        raise MriError(f"metric must be 'tokens' or 'activation', got {metric!r}")
    if max_ppl_ratio <= 1:
        raise MriError(f"max_ppl_ratio must exceed 1, got {max_ppl_ratio}")
    strengths = sorted(
        [check_strength(s) for s in strengths]
        if strengths is not None
        else default_strengths(model, steering, prompts),
        key=abs,
    )
    gen = {
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "temperature": temperature,
        "batch_size": batch_size,
    }
    read = {"dictionary": dictionary, "feature": feature, "concept": concept}
    baseline = measure(model, generate(model, prompts, **gen), **read)
    points: list[Measurement] = []
    largest = None

    def run(s: float) -> bool:
        nonlocal largest
        steered = steering.with_strength(s)
        try:
            gens = generate(model, prompts, steered, **gen)
        except NonFiniteSteering:
            largest = largest_finite_strength(model, steering, prompts, s)
            return False
        points.append(measure(model, gens, strength=s, steering=steered, **read))
        points.sort(key=lambda p: abs(p.strength))
        return True

    for s in strengths:
        if not run(s):
            break
    cal = Calibration(
        baseline,
        points,
        metric,
        max_ppl_ratio,
        None,
        "",
        largest,
        {
            **{k: v for k, v in gen.items() if k != "batch_size"},
            "strengths": list(strengths),
            "n_prompts": len(prompts),
            "positions": steering.positions,
            "concept_tokens": [model.tokenizer.decode([t]) for t in concept] if concept else None,
        },
    )
    cal.chosen, cal.reason = pick(cal)
    for _ in range(refine):
        mid = _between(cal)
        if mid is None or not run(mid):
            break
        cal.chosen, cal.reason = pick(cal)
    cal.settings["strengths"] = [p.strength for p in points]
    return cal


def _between(cal: Calibration) -> float | None:
    """The geometric midpoint of the pick (or 0) and the next strength, when that one has more concept but
    breaks the perplexity budget; None when there is nothing to refine."""
    low = abs(cal.chosen) if cal.chosen is not None else 0.0
    above = [p for p in cal.points if abs(p.strength) > low]
    if not above:
        return None
    nxt = above[0]
    best = (
        cal.score(next(p for p in cal.points if p.strength == cal.chosen))
        if cal.chosen is not None
        else (cal.score(cal.baseline))
    )
    if not cal.score(nxt) > best or nxt.perplexity <= cal.max_ppl_ratio * cal.baseline.perplexity:
        return None
    high = abs(nxt.strength)
    mid = math.sqrt(low * high) if low > 0 else high / 2
    return math.copysign(round(mid, 6), nxt.strength)


def pick(cal: Calibration) -> tuple[float | None, str]:
    """The strength with the most concept among those within the perplexity budget (see module doc)."""
    budget = cal.max_ppl_ratio * cal.baseline.perplexity
    base = cal.score(cal.baseline)
    ok = [p for p in cal.points if math.isfinite(p.perplexity) and p.perplexity <= budget]
    best = max(ok, key=lambda p: (cal.score(p), -abs(p.strength)), default=None)
    if best is None or not cal.score(best) > base:
        return None, (
            f"no strength raised the concept ({cal.metric}) above the unsteered {base:.3g} with perplexity "
            f"within {cal.max_ppl_ratio:g}x the unsteered {cal.baseline.perplexity:.3g}"
        )
    return best.strength, (
        f"most concept ({cal.metric} {cal.score(best):.3g} vs unsteered {base:.3g}) with perplexity "
        f"{best.perplexity:.3g} <= {cal.max_ppl_ratio:g}x unsteered {cal.baseline.perplexity:.3g}"
    )


def plot(cal: Calibration, path: str | Path) -> Path:
    """Write `tradeoff_figure(cal)` as a PNG at `path`."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = tradeoff_figure(cal)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tradeoff_figure(cal: Calibration) -> Any:
    """Two panels: concept and perplexity ratio against strength; concept against perplexity ratio.

    The perplexity ratio is drawn on a log scale: the strengths worth choosing sit between 1x and the 2x
    budget, and a linear axis stretched to fit the 10x-100x of the strongest edits flattens them into one
    line at the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p.strength for p in cal.points]
    concept = [cal.score(p) for p in cal.points]
    ratio = [p.perplexity / cal.baseline.perplexity for p in cal.points]
    label = "concept token rate" if cal.metric == "tokens" else "feature activation (re-read)"
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(xs, concept, "o-", color="tab:blue", label=label)
    a.axhline(cal.score(cal.baseline), color="tab:blue", ls=":", label="unsteered")
    a.set_xlabel("strength")
    a.set_ylabel(label)
    a.set_xscale("symlog", linthresh=max(min((abs(x) for x in xs if x), default=1.0), 1e-6))
    twin = a.twinx()
    twin.plot(xs, ratio, "s--", color="tab:red", label="perplexity / unsteered")
    twin.axhline(cal.max_ppl_ratio, color="tab:red", ls=":")
    twin.set_ylabel("perplexity / unsteered (log scale)", color="tab:red")
    _log_ratio_axis(twin, "y", [*ratio, 1.0, cal.max_ppl_ratio])
    if cal.chosen is not None:
        a.axvline(cal.chosen, color="k", alpha=0.4)
    a.legend(loc="upper left", fontsize=8)
    b.plot(ratio, concept, "o-")
    for x, r, c in zip(xs, ratio, concept, strict=True):
        b.annotate(f"{x:.3g}", (r, c), fontsize=7, textcoords="offset points", xytext=(3, 3))
    b.axvline(cal.max_ppl_ratio, color="tab:red", ls=":")
    b.plot([1.0], [cal.score(cal.baseline)], "k*", label="unsteered")
    b.set_xlabel("perplexity / unsteered (log scale)")
    _log_ratio_axis(b, "x", [*ratio, 1.0, cal.max_ppl_ratio])
    b.set_ylabel(label)
    b.legend(fontsize=8)
    fig.suptitle(f"steering trade-off; chosen strength: {cal.chosen if cal.chosen is not None else 'none'}")
    fig.tight_layout()
    return fig


def _log_ratio_axis(ax: Any, which: str, ratios: Sequence[float]) -> None:
    """Put the perplexity-ratio axis (`which`: 'x' or 'y') of `ax` on a log scale, labelled in plain
    numbers (0.8, 1, 1.5, 2, 5; fewer the wider the span), spanning the finite ratios (a ratio can fall below 1: steering can make
    text the model finds likelier)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    finite = [r for r in ratios if math.isfinite(r) and r > 0]
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    span = max(finite) / min(finite)
    subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if span < 20 else (1.0, 2.0, 5.0) if span < 1000 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())
    (ax.set_ylim if which == "y" else ax.set_xlim)(min(finite) / 1.1, max(finite) * 1.1)
