"""The floor of an `mri explain` run: of the atlas's live features, how many got a label that scores above
chance with 95% confidence (the lower end of the bootstrap interval above the scorer's chance level), the
distribution of scores (a PNG), the speed in features per minute, and how many LLM replies could not be
read (a run that quietly lost a third of its replies to an HTML error page would otherwise report a floor
that looks like the labels' fault). Written to ATLAS/explain-report.json and ATLAS/explain-scores.png."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mri.atlas.build import FEATURES
from mri.atlas.reader import Atlas
from mri.data.store import write_json_atomic
from mri.explain.scorers import SCORERS

REPORT, PLOT = "explain-report.json", "explain-scores.png"


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def malformed_counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Malformed LLM replies of one run: the explainer's (one per feature at most; a row repeats it for
    each scorer), each scorer's, and the total. Rows without the columns (older runs) count 0."""
    explain = {r["feature"] for r in rows if r.get("explain_malformed")}
    score: dict[str, int] = {}
    for r in rows:
        n = int(r.get("malformed_replies") or 0) - int(bool(r.get("explain_malformed")))
        score[r["scorer"]] = score.get(r["scorer"], 0) + n
    return {
        "total": len(explain) + sum(score.values()),
        "explain": len(explain),
        "score": dict(sorted(score.items())),
        "unlabelled_features": len(explain),
    }


def floor_report(atlas: Atlas, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Per scorer over `rows` (one explain run): features scored, above chance with 95% confidence (as a
    share of the features explained and of the atlas's live features), mean and quantiles of the score;
    plus the same for "any scorer", features per minute, and the malformed LLM replies counted."""
    live = int(
        sum(d > 0 for d in pq.read_table(atlas.path / FEATURES, columns=["density"])["density"].to_pylist())
    )
    explained = sorted({r["feature"] for r in rows})
    n = len(explained)
    scorers: dict[str, Any] = {}
    above_any: set[int] = set()
    for name in sorted({r["scorer"] for r in rows}):
        chance = SCORERS[name].chance
        mine = [r for r in rows if r["scorer"] == name]
        scored = [r for r in mine if _finite(r["score"])]
        above = {r["feature"] for r in scored if _finite(r["ci_low"]) and r["ci_low"] > chance}
        above_any |= above
        values = np.array([r["score"] for r in scored], dtype=float)
        scorers[name] = {
            "chance": chance,
            "explained": len(mine),
            "scored": len(scored),
            "above_chance": len(above),
            "fraction_of_explained": len(above) / n if n else math.nan,
            "fraction_of_live": len(above) / live if live else math.nan,
            "mean": float(values.mean()) if len(values) else math.nan,
            "quantiles": {
                q: float(np.quantile(values, float(q))) for q in ("0.1", "0.25", "0.5", "0.75", "0.9")
            }
            if len(values)
            else {},
        }
    return {
        "kind": "explain-report",
        "explainer": rows[0]["explainer"] if rows else None,
        "live_features": live,
        "explained": n,
        "seconds": seconds,
        "features_per_minute": n / seconds * 60 if seconds > 0 else math.nan,
        "above_chance_any_scorer": len(above_any),
        "fraction_of_live_any_scorer": len(above_any) / live if live else math.nan,
        "scorers": scorers,
        "malformed_replies": malformed_counts(rows),
        "confidence": "95% bootstrap interval over score-split examples; above chance when its lower end is",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def plot_scores(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """One histogram per scorer of the finite scores, above-chance features stacked in a darker colour,
    with the chance level marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    names = sorted({r["scorer"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(5 * max(1, len(names)), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        chance = SCORERS[name].chance
        scored = [r for r in rows if r["scorer"] == name and _finite(r["score"])]
        above = [r["score"] for r in scored if _finite(r["ci_low"]) and r["ci_low"] > chance]
        rest = [r["score"] for r in scored if not (_finite(r["ci_low"]) and r["ci_low"] > chance)]
        lo = -1.0 if chance == 0.0 else 0.0
        bins = np.linspace(lo, 1.0, 41)
        ax.hist([above, rest], bins=bins, stacked=True, color=["tab:blue", "lightgray"],
                label=[f"above chance, 95% ({len(above)})", f"not ({len(rest)})"])  # fmt: skip
        ax.axvline(chance, color="k", ls=":", label=f"chance {chance:g}")
        ax.set_title(f"{name}: {len(scored)} features")
        ax.set_xlabel("score")
        ax.set_ylabel("features")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_floor_report(atlas: Atlas, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """`floor_report` written to ATLAS/explain-report.json, the histogram to ATLAS/explain-scores.png."""
    report = floor_report(atlas, rows, seconds)
    write_json_atomic(atlas.path / REPORT, report)
    if rows:
        plot_scores(rows, atlas.path / PLOT)
    return report


def read_floor_report(atlas: Atlas | str | Path) -> dict[str, Any]:
    """The last run's report (ATLAS/explain-report.json)."""
    import json

    path = (atlas.path if isinstance(atlas, Atlas) else Path(atlas)) / REPORT
    return json.loads(path.read_text())
