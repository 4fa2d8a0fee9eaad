"""`mri steer`: generate with features or vectors steered, calibrate the strength, make vectors, and
measure the concept claim. `mri steer MODEL ...` is short for `mri steer generate MODEL ...`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from mri.errors import MriError
from mri.steer.interventions import (
    MODES,
    POSITIONS,
    FeatureEdit,
    NonFiniteSteering,
    Steering,
    VectorEdit,
    check_strength,
)

console = Console()


class _DefaultGenerate(TyperGroup):
    """A group whose first argument, when it names no subcommand, starts `generate`."""

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["generate", *args]
        return super().parse_args(ctx, args)


steer_app = typer.Typer(
    cls=_DefaultGenerate,
    help="Steer generation with features or vectors; calibrate the strength by measurement. "
    "`mri steer MODEL ...` is short for `mri steer generate MODEL ...`.",
    no_args_is_help=True,
)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise MriError(f"{path} does not exist; give a text file with one text per line")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise MriError(f"{path} holds no texts")
    return lines


def build_steering(
    model: Any,
    *,
    dictionary: Path | None,
    features: list[int],
    mode: str,
    strengths: list[float],
    vector: Path | None,
    vector_key: str | None,
    site: str | None,
    positions: str,
) -> tuple[Steering, Any]:
    """The Steering the CLI options describe, and the dictionary (None for a vector).

    Strengths are checked before anything is loaded: an infinite or NaN one could only fail later, deep in
    a forward pass. A vector file is checked against the model by the fingerprint it records, as a
    dictionary is (a vector of the right width made on another model would steer, meaninglessly)."""
    from mri.dictionaries import load as load_dictionary
    from mri.steer.interventions import check_vector_file, read_vector

    strengths = [check_strength(s) for s in strengths]

    if (dictionary is None) == (vector is None):
        raise MriError(
            "steer either features (--dict D --feature F) or a vector (--vector FILE), one of the two"
        )
    if mode not in MODES:
        raise MriError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "ablate" and not strengths:
        raise MriError(f"--mode {mode} needs --strength (or run `mri steer calibrate` to choose one)")
    if vector is not None:
        direction, meta = read_vector(vector, vector_key)
        check_vector_file(model, vector, meta)
        where = site or meta.get("site")
        if where is None:
            raise MriError(f"{vector} does not say its site; pass --site")
        return Steering(model, [VectorEdit(where, direction, strengths[0])], positions), None
    if not features:
        raise MriError("give the feature(s) to steer with --feature")
    if len(strengths) not in (0, 1, len(features)):
        raise MriError("give one --strength, or one per --feature")
    coder = load_dictionary(dictionary)
    values = strengths if len(strengths) == len(features) else (strengths or [0.0]) * len(features)
    edits = [FeatureEdit(coder, f, mode, s) for f, s in zip(features, values, strict=True)]  # type: ignore[arg-type]
    return Steering(model, edits, positions), coder  # type: ignore[arg-type]


def _strength_list(text: str) -> list[float]:
    """`--strengths 1,2,4` as floats, each finite (see `check_strength`)."""
    out = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise MriError(
                f"--strengths takes comma-separated numbers such as 1,2,4; {part.strip()!r} is not one"
            ) from None
        out.append(check_strength(value))
    return out


def _prompts(prompts: list[str], prompts_file: Path | None, n: int) -> list[str]:
    from mri.steer.measure import neutral_prompts

    out = list(prompts) + (_read_lines(prompts_file) if prompts_file else [])
    return out or neutral_prompts(n)


@steer_app.command("generate")
def steer(
    model: str = typer.Argument(..., help="Model folder, shipped organism or hub name."),
    dictionary: Path | None = typer.Option(None, "--dict", help="Dictionary folder whose features to steer."),
    feature: list[int] = typer.Option([], "--feature", "-f", help="Feature index (repeat for several)."),
    mode: str = typer.Option("add", "--mode", help="add | clamp | ablate."),
    strength: list[float] = typer.Option(
        [],
        "--strength",
        "-s",
        help="add: multiple of the decoder row; clamp: the activation held. One, or one per feature.",
    ),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt (repeat for a batch)."),
    prompts_file: Path | None = typer.Option(None, "--prompts-file", help="Text file, one prompt per line."),
    positions: str = typer.Option("all", "--positions", help="prompt | generated | all."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    seed: int = typer.Option(0, "--seed"),
    temperature: float = typer.Option(1.0, "--temperature", help="0 is greedy."),
    vector: Path | None = typer.Option(
        None, "--vector", help="A steering vector (safetensors) instead of features."
    ),
    vector_key: str | None = typer.Option(None, "--vector-key", help="Tensor name in the vector file."),
    site: str | None = typer.Option(None, "--site", help="Site of the vector (default: from its file)."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also show the unsteered text."),
    out: Path | None = typer.Option(None, "--out", help="Write the generations as JSON here."),
) -> None:
    """Generate from prompts with features (add, clamp, ablate) or a vector steered at every new token."""
    from mri.models import load
    from mri.steer.generate import generate, largest_finite_strength

    if positions not in POSITIONS:
        raise MriError(f"--positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    strength = [check_strength(s) for s in strength]  # before the model loads: bad input fails at once
    m = load(model)
    steering, _ = build_steering(
        m,
        dictionary=dictionary,
        features=feature,
        mode=mode,
        strengths=strength,
        vector=vector,
        vector_key=vector_key,
        site=site,
        positions=positions,
    )
    prompts = _prompts(prompt, prompts_file, 4)
    gen = {"max_new_tokens": max_new_tokens, "seed": seed, "temperature": temperature}
    try:
        steered = generate(m, prompts, steering, **gen)
    except NonFiniteSteering as e:
        too_far = max((getattr(x, "strength", 0.0) for x in steering.edits), key=abs)
        safe = largest_finite_strength(m, steering, prompts, too_far) if too_far else 0.0
        raise MriError(
            f"{e} at strength {too_far:g}; the largest strength found to stay finite is {safe:.4g}: "
            f"use --strength {safe:.4g} or less (or `mri steer calibrate` to choose one)"
        ) from e
    plain = generate(m, prompts, **gen) if baseline else None
    table = Table(title=f"{m.name}: {mode} {', '.join(map(str, feature)) or vector} ({positions} positions)")
    table.add_column("prompt")
    if plain is not None:
        table.add_column("unsteered")
    table.add_column("steered")
    for i, p in enumerate(prompts):
        table.add_row(p, *([plain.texts[i]] if plain else []), steered.texts[i])
    console.print(table)
    if out is not None:
        rows = [
            {"prompt": p, "steered": steered.texts[i], **({"unsteered": plain.texts[i]} if plain else {})}
            for i, p in enumerate(prompts)
        ]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "model": m.name,
                    "mode": mode,
                    "features": feature,
                    "strengths": strength,
                    "positions": positions,
                    **gen,
                    "generations": rows,
                },
                indent=2,
            )
        )


@steer_app.command("calibrate")
def calibrate_cmd(
    model: str = typer.Argument(..., help="Model folder, shipped organism or hub name."),
    dictionary: Path | None = typer.Option(None, "--dict", help="Dictionary folder."),
    feature: int | None = typer.Option(None, "--feature", "-f", help="Feature index."),
    mode: str = typer.Option("add", "--mode", help="add | clamp (the strength swept is the value held)."),
    strengths: str | None = typer.Option(
        None, "--strengths", help="Comma-separated strengths (default: a sweep scaled to the site)."
    ),
    prompt: list[str] = typer.Option(
        [], "--prompt", "-p", help="Prompt (repeat); default neutral corpus openings."
    ),
    prompts_file: Path | None = typer.Option(None, "--prompts-file", help="Text file, one prompt per line."),
    n_prompts: int = typer.Option(16, "--n-prompts", help="Neutral prompts to use when none are given."),
    positions: str = typer.Option("all", "--positions", help="prompt | generated | all."),
    atlas: Path | None = typer.Option(
        None,
        "--atlas",
        help="Atlas of the dictionary: the concept is the whole words it shows the feature promoting.",
    ),
    tokens: str = typer.Option(
        "logits", "--tokens", help="Without an atlas, top tokens from: logits | corpus."
    ),
    metric: str | None = typer.Option(None, "--metric", help="tokens | activation (default tokens)."),
    max_ppl_ratio: float = typer.Option(2.0, "--max-ppl-ratio", help="Perplexity budget, x unsteered."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens"),
    seed: int = typer.Option(0, "--seed"),
    temperature: float = typer.Option(1.0, "--temperature"),
    vector: Path | None = typer.Option(None, "--vector", help="Calibrate a vector (safetensors) instead."),
    vector_key: str | None = typer.Option(
        None, "--vector-key", help="Tensor name in the vector file (when it holds several)."
    ),
    concept: list[str] = typer.Option([], "--concept", help="A token (text) marking the concept (repeat)."),
    site: str | None = typer.Option(None, "--site", help="Site of the vector (default: from its file)."),
    out: Path = typer.Option(
        Path("steer-calibration"), "--out", help="Folder for calibration.json and tradeoff.png."
    ),
) -> None:
    """Sweep the strength; measure concept against perplexity under the unsteered model; pick and plot."""
    from mri.models import load
    from mri.steer.calibrate import calibrate
    from mri.steer.measure import concept_tokens

    if mode not in ("add", "clamp"):
        raise MriError(f"calibrate sweeps the strength of add or clamp, not {mode!r}")
    swept = _strength_list(strengths) if strengths else None
    m = load(model)
    steering, coder = build_steering(
        m,
        dictionary=dictionary,
        features=[] if feature is None else [feature],
        mode=mode,
        strengths=[0.0],
        vector=vector,
        vector_key=vector_key,
        site=site,
        positions=positions,
    )
    prompts = _prompts(prompt, prompts_file, n_prompts)
    if concept:
        ids = [m.tokenizer(c, add_special_tokens=False)["input_ids"] for c in concept]
        concept_ids: list[int] | None = [i for row in ids for i in row]
    elif coder is not None and atlas is not None:
        # the same concept words as `mri steer concept --atlas`: the whole words the atlas shows the
        # feature promoting (what steering should make appear), else its top tokens there
        from mri.steer.concept_demo import atlas_concept_words

        concept_ids = atlas_concept_words(m, coder, atlas, feature) or concept_tokens(
            m, coder, feature, atlas=atlas
        )
    elif coder is not None:
        concept_ids = concept_tokens(m, coder, feature, source=tokens)
    else:
        concept_ids = None
    cal = calibrate(
        m,
        steering,
        prompts,
        strengths=swept,
        dictionary=coder,
        feature=feature,
        concept=concept_ids,
        metric=metric,
        max_ppl_ratio=max_ppl_ratio,
        max_new_tokens=max_new_tokens,
        seed=seed,
        temperature=temperature,
    )
    json_path, png = cal.save(out)
    table = Table(title=f"{m.name}: {mode} sweep over {len(prompts)} prompts ({cal.metric})")
    for col in ("strength", "concept", "tokens", "act.", "ppl", "ppl ×", "KL"):
        table.add_column(col)
    for p in [cal.baseline, *cal.points]:
        table.add_row(
            "unsteered" if p.strength is None else f"{p.strength:.4g}",
            f"{cal.score(p):.3g}",
            "-" if p.token_rate is None else f"{p.token_rate:.0%}",
            "-" if p.activation is None else f"{p.activation:.3g}",
            f"{p.perplexity:.3g}",
            f"{p.perplexity / cal.baseline.perplexity:.2f}",
            "-" if p.kl is None else f"{p.kl:.3g}",
        )
    console.print(table)
    if cal.largest_finite is not None:
        console.print(
            f"[yellow]a larger strength made activations NaN/inf; the largest finite one found is "
            f"{cal.largest_finite:.4g}[/]"
        )
    console.print(f"chosen strength: [bold]{cal.chosen}[/] — {cal.reason}")
    console.print(f"wrote {json_path} and {png}")


@steer_app.command("vector")
def vector_cmd(
    model: str = typer.Argument(..., help="Model folder, shipped organism or hub name."),
    site: str = typer.Option(..., "--site", help="Site to take the means at, e.g. L2.resid_post."),
    positive: Path = typer.Option(..., "--positive", help="Text file: texts with the concept, one per line."),
    negative: Path = typer.Option(..., "--negative", help="Text file: texts without it, one per line."),
    out: Path = typer.Option(Path("vector.safetensors"), "--out", help="Where to write the vector."),
) -> None:
    """A steering vector: the mean activation over positive texts minus that over negative texts."""
    from mri.models import load
    from mri.steer.interventions import diff_of_means, save_vector

    m = load(model)
    canonical = m.resolve_site(site)
    v = diff_of_means(m, canonical, _read_lines(positive), _read_lines(negative))
    save_vector(out, v, canonical, model_fingerprint=m.fingerprint())
    console.print(f"wrote {out}: ‖v‖ = {float(v.norm()):.3g} at {canonical}")


@steer_app.command("concept")
def concept_cmd(
    model: str = typer.Argument(..., help="Model folder, shipped organism or hub name."),
    dictionary: Path = typer.Option(..., "--dict", help="Dictionary folder."),
    feature: int | None = typer.Option(
        None, "--feature", "-f", help="Feature index (default: search the dictionary's best candidates)."
    ),
    search: int = typer.Option(
        8, "--search", help="Without --feature: candidate features to try, best first."
    ),
    strength: float | None = typer.Option(None, "--strength", help="Default: calibrated first."),
    mode: str = typer.Option("add", "--mode", help="add | clamp."),
    n_prompts: int = typer.Option(50, "--n-prompts", help="Neutral prompts (openings of corpus documents)."),
    atlas: Path | None = typer.Option(
        None,
        "--atlas",
        help="Atlas of the dictionary (`mri atlas`): candidates are features that fired in it, and the "
        "concept words are the whole words it shows them promoting.",
    ),
    tokens: str = typer.Option(
        "logits", "--tokens", help="Without an atlas, top tokens from: logits | corpus."
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    seed: int = typer.Option(0, "--seed"),
    out: Path | None = typer.Option(None, "--out", help="Write the figures as JSON here."),
) -> None:
    """How often steered text carries the feature's concept vs unsteered (target >= 10x at <= 2x perplexity)."""
    from mri.dictionaries import load as load_dictionary
    from mri.models import load
    from mri.steer.concept_demo import concept_demo
    from mri.steer.measure import neutral_prompts

    if strength is not None:
        check_strength(strength)
    m = load(model)
    options = dict(strength=strength, mode=mode, atlas=atlas, token_source=tokens, max_new_tokens=max_new_tokens,
                   seed=seed)  # fmt: skip
    searched = None
    if feature is None:
        from mri.steer.concept_demo import concept_search

        searched = concept_search(
            m, load_dictionary(dictionary), neutral_prompts(n_prompts), search, **options
        )
        for r in searched["tried"]:
            verdict = (
                r.get("error")
                or f"{r['rate_ratio']:.1f}x concept at {r['perplexity_ratio']:.2f}x perplexity"
                f" (strength {r['strength']:.3g})"
            )
            cand = r["candidate"]
            fires = f"; fires on {', '.join(map(repr, cand['fires_on']))}" if cand.get("fires_on") else ""
            console.print(f"  candidate feature {r['feature']} ({cand['word']!r}{fires}): {verdict}")
        if searched["best"] is None:
            raise MriError("no candidate feature could be steered; pass --feature and --strength yourself")
        result = searched["best"]
        feature = result["feature"]
    else:
        result = concept_demo(m, load_dictionary(dictionary), feature, neutral_prompts(n_prompts), **options)
    console.print(
        f"feature {feature} ({', '.join(map(repr, result['concept_tokens']))}) at strength {result['strength']:.4g}: "
        f"concept in {result['steered_rate']:.0%} of steered vs {result['unsteered_rate']:.0%} of unsteered "
        f"generations ({result['rate_ratio']:.1f}x), perplexity {result['steered_perplexity']:.3g} vs "
        f"{result['unsteered_perplexity']:.3g} ({result['perplexity_ratio']:.2f}x) — "
        + ("[green]target met[/]" if result["passed"] else "[red]target not met[/]")
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result if searched is None else searched, indent=2))
