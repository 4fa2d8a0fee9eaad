"""`explain_atlas`: label an atlas's features, score every label on held-out examples, and write
`explanations.parquet` into the atlas folder (rows for other explainer/scorer pairs are kept).

Malformed LLM replies never stop a run: an explanation that cannot be read leaves the feature without a
label (null, not scored), a score reply that cannot be read is left out of its score, and each row counts
them (`malformed_replies`, `explain_malformed`) so the report can say how many there were."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mri.atlas.build import FEATURES
from mri.atlas.reader import EXPLANATIONS, Atlas
from mri.atlas.split import EXPLAIN, SCORE
from mri.errors import MriError
from mri.explain.clients import ChatClient, make_client
from mri.explain.examples import feature_view
from mri.explain.explainers import LLMExplainer, OfflineExplainer
from mri.explain.report import write_floor_report
from mri.explain.scorers import SCORERS, Score

EXPLAINERS = ("offline", "openai", "anthropic")
CACHE_FILE = "llm-cache.sqlite"
DEFAULT_SCORERS = {"offline": ["match-simulation", "match-detection"], "llm": ["detection", "fuzzing"]}
SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("label", pa.string()),
        ("explainer", pa.string()),
        ("explainer_model", pa.string()),
        ("scorer", pa.string()),
        ("score", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("n_activating", pa.int32()),
        ("n_non_activating", pa.int32()),
        ("explain_split", pa.string()),
        ("score_split", pa.string()),
        ("explain_contexts", pa.list_(pa.int64())),
        ("score_contexts", pa.list_(pa.int64())),
        ("explain_input_tokens", pa.int64()),
        ("explain_output_tokens", pa.int64()),
        ("explain_cost_usd", pa.float64()),
        ("score_input_tokens", pa.int64()),
        ("score_output_tokens", pa.int64()),
        ("score_cost_usd", pa.float64()),
        ("explain_malformed", pa.bool_()),
        ("malformed_replies", pa.int32()),
        ("created", pa.string()),
    ]
)


def explain_atlas(
    atlas: Atlas | str | Path,
    *,
    explainer: str = "offline",
    scorers: Iterable[str] | None = None,
    features: Iterable[int] | None = None,
    limit: int | None = None,
    client: ChatClient | None = None,
    client_options: dict[str, Any] | None = None,
    max_explain: int = 20,
    max_score: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> pa.Table:
    """Explain and score `features` (default: every feature that fired, densest first, at most `limit`).

    explainer: offline | openai | anthropic. scorers: names from `mri.explain.scorers.SCORERS` (default
    match-simulation and match-detection offline, detection and fuzzing with an LLM). LLM calls go
    through `client` or one made from `client_options` (model, base_url, concurrency, prices...), with
    its response cache in the atlas folder. Returns the new rows; explanations.parquet keeps the rest, and
    explain-report.json / explain-scores.png report this run (`mri.explain.report`).
    """
    atlas = atlas if isinstance(atlas, Atlas) else Atlas(atlas)
    if explainer not in EXPLAINERS:
        raise MriError(f"unknown explainer {explainer!r}; use one of {', '.join(EXPLAINERS)}")
    names = list(scorers) if scorers else DEFAULT_SCORERS["offline" if explainer == "offline" else "llm"]
    unknown = [s for s in names if s not in SCORERS]
    if unknown:
        raise MriError(f"unknown scorer(s) {', '.join(unknown)}; use {', '.join(SCORERS)}")
    needs_llm = explainer != "offline" or any(SCORERS[s].needs_client for s in names)
    if needs_llm and client is None:
        provider = explainer if explainer != "offline" else (client_options or {}).get("provider", "openai")
        options = {k: v for k, v in (client_options or {}).items() if k != "provider"}
        options.setdefault("cache", atlas.path / CACHE_FILE)
        client = make_client(provider, **options)
    expl = OfflineExplainer() if explainer == "offline" else LLMExplainer(client, max_explain)  # type: ignore[arg-type]
    score_with = [SCORERS[s](client, max_examples=max_score, seed=seed) for s in names]
    chosen = _features(atlas, features, limit)

    def one(feature: int) -> list[dict[str, Any]]:
        view = feature_view(atlas, feature, max_explain=max_explain)
        ex = expl.explain(view)
        rows = []
        for scorer in score_with:
            if ex.label is None:  # nothing to score: NaN, and the explainer's malformed reply is counted
                s = Score(math.nan, math.nan, math.nan, len(view.activating), len(view.non_activating))
            else:
                s = scorer.score(ex.label, view)
            rows.append(
                {
                    "feature": feature,
                    "label": ex.label,
                    "explainer": expl.name,
                    "explainer_model": expl.model,
                    "scorer": scorer.name,
                    "score": s.value,
                    "ci_low": s.ci_low,
                    "ci_high": s.ci_high,
                    "n_activating": s.n_activating,
                    "n_non_activating": s.n_non_activating,
                    "explain_split": EXPLAIN,
                    "score_split": SCORE,
                    "explain_contexts": view.explain_contexts,
                    "score_contexts": view.score_contexts,
                    "explain_input_tokens": ex.input_tokens,
                    "explain_output_tokens": ex.output_tokens,
                    "explain_cost_usd": ex.cost_usd,
                    "score_input_tokens": s.input_tokens,
                    "score_output_tokens": s.output_tokens,
                    "score_cost_usd": s.cost_usd,
                    "explain_malformed": ex.malformed,
                    "malformed_replies": int(ex.malformed) + s.malformed,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
        return rows

    started = time.time()
    columns = (TextColumn("explain"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    rows: list[dict[str, Any]] = []
    workers = client.concurrency if (client is not None and needs_llm) else 1
    with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task("explain", total=len(chosen))
        with ThreadPoolExecutor(workers) as pool:
            for got in pool.map(one, chosen):
                rows.extend(got)
                bar.advance(task)
    seconds = time.time() - started
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    _merge(atlas.path / EXPLANATIONS, table)
    write_floor_report(atlas, rows, seconds)
    if (atlas.path / "html").is_dir():
        from mri.atlas.html import write_html

        write_html(atlas.path)
    return table


def _features(atlas: Atlas, features: Iterable[int] | None, limit: int | None) -> list[int]:
    if features is not None:
        chosen = [atlas._check(f) for f in features]
    else:
        t = pq.read_table(atlas.path / FEATURES, columns=["feature", "density"]).to_pylist()
        chosen = [r["feature"] for r in sorted(t, key=lambda r: -r["density"]) if r["density"] > 0]
    return chosen[:limit] if limit else chosen


def _merge(path: Path, new: pa.Table) -> None:
    """Replace the rows of `path` with the same (feature, explainer, scorer) by `new`, atomically."""
    if path.is_file():
        old = pq.read_table(path)
        keys = {
            (r["feature"], r["explainer"], r["scorer"])
            for r in new.select(["feature", "explainer", "scorer"]).to_pylist()
        }
        keep = [
            (r["feature"], r["explainer"], r["scorer"]) not in keys
            for r in old.select(["feature", "explainer", "scorer"]).to_pylist()
        ]
        old = old.filter(pa.array(keep, pa.bool_()))
        for field in SCHEMA:  # files from before a column existed: null there (unknown), not a guess
            if field.name not in old.column_names:
                old = old.append_column(field, pa.nulls(len(old), field.type))
        new = pa.concat_tables([old.select(SCHEMA.names).cast(SCHEMA), new])
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(
        new.sort_by([("feature", "ascending"), ("explainer", "ascending"), ("scorer", "ascending")]), tmp
    )
    os.replace(tmp, path)
