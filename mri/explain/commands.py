"""`mri explain`: label an atlas's features and score the labels on held-out examples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def explain(
    atlas: Annotated[Path, typer.Argument(help="Atlas folder (from `mri atlas`).")],
    explainer: Annotated[str, typer.Option("--explainer", help="offline, openai or anthropic.")] = "offline",
    features: Annotated[
        str | None,
        typer.Option("--features", help="Features to explain: 3,5,10-20 (default: all that fired)."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="At most this many features (densest first).")
    ] = None,
    scorer: Annotated[
        list[str] | None,
        typer.Option(
            "--scorer", help="match-simulation, match-detection, simulation, detection, fuzzing, embedding."
        ),
    ] = None,
    model: Annotated[str | None, typer.Option("--llm-model", help="Chat model name for the LLM.")] = None,
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="API base URL (any OpenAI-compatible server works).")
    ] = None,
    provider: Annotated[
        str, typer.Option("--llm", help="Provider for LLM scorers when the explainer is offline.")
    ] = "openai",
    concurrency: Annotated[int, typer.Option("--concurrency", help="LLM requests in flight at once.")] = 4,
    price_in: Annotated[float, typer.Option("--price-in", help="USD per million input tokens.")] = 0.0,
    price_out: Annotated[float, typer.Option("--price-out", help="USD per million output tokens.")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the scorers' shuffles and bootstrap.")] = 0,
) -> None:
    """Explain features of ATLAS and score each label on score-split examples (written to
    ATLAS/explanations.parquet)."""
    from rich.console import Console
    from rich.table import Table

    from mri.explain.run import explain_atlas

    options = {"provider": provider, "model": model, "base_url": base_url, "concurrency": concurrency,
               "price_in": price_in, "price_out": price_out}  # fmt: skip
    table = explain_atlas(
        atlas,
        explainer=explainer,
        scorers=scorer,
        features=parse_features(features) if features else None,
        limit=limit,
        client_options=options,
        seed=seed,
    )
    rows = table.to_pylist()
    view = Table(title=f"{len({r['feature'] for r in rows})} features explained ({explainer})")
    for col in ("feature", "label", "scorer", "score", "95% CI"):
        view.add_column(col)
    for r in rows[:40]:
        ci = f"{r['ci_low']:.2f}–{r['ci_high']:.2f}" if r["ci_low"] == r["ci_low"] else "-"
        label = r["label"] if r["label"] is not None else "(no label: the reply could not be read)"
        view.add_row(str(r["feature"]), label[:70], r["scorer"], f"{r['score']:.3f}", ci)
    Console().print(view)
    explained = {r["feature"]: r for r in rows}.values()  # the explainer's cost repeats on each scorer's row
    cost = sum(r["explain_cost_usd"] for r in explained) + sum(r["score_cost_usd"] for r in rows)
    tokens = sum(r["explain_input_tokens"] + r["explain_output_tokens"] for r in explained)
    tokens += sum(r["score_input_tokens"] + r["score_output_tokens"] for r in rows)
    typer.echo(f"written: {Path(atlas) / 'explanations.parquet'} ({tokens:,} LLM tokens, ${cost:.4f})")
    from mri.explain.report import PLOT, REPORT, read_floor_report

    report = read_floor_report(atlas)
    for name, s in report["scorers"].items():
        typer.echo(
            f"{name}: {s['above_chance']} of {report['live_features']} live features "
            f"({s['fraction_of_live']:.1%}; {s['fraction_of_explained']:.1%} of the {report['explained']} "
            f"explained) score above chance {s['chance']:g} with 95% confidence; median {s['quantiles'].get('0.5', float('nan')):.3f}"
        )
    bad = report["malformed_replies"]
    typer.echo(
        f"{bad['total']} malformed LLM replies (explain {bad['explain']}, score "
        f"{sum(bad['score'].values())}): counted, left unlabelled or out of their scores"
    )
    typer.echo(
        f"{report['features_per_minute']:,.0f} features/minute; report: {Path(atlas) / REPORT}, {Path(atlas) / PLOT}"
    )


def parse_features(spec: str) -> list[int]:
    """'3,5,10-12' -> [3, 5, 10, 11, 12]."""
    from mri.errors import MriError

    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise MriError(f"--features: {part!r} is not a number or a range like 10-20") from None
    return out
