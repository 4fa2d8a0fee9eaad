"""`mri atlas` (build an atlas; `mri atlas crosslingual`: features shared across languages) and `mri show`
(one feature in the terminal)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup


def atlas(
    model: Annotated[str, typer.Argument(help="Model folder, shipped organism name, or hub name.")],
    dictionary: Annotated[Path, typer.Argument(help="Dictionary folder (ours or SAELens's).")],
    out: Annotated[Path, typer.Option("--out", help="Atlas folder to write (replaced if it exists).")],
    corpus: Annotated[
        Path | None, typer.Option("--corpus", help="Corpus file or folder (default: the shipped sample).")
    ] = None,
    tokens: Annotated[
        int, typer.Option("--tokens", help="Tokens to stream (rounded up to contexts).")
    ] = 65536,
    ctx: Annotated[int, typer.Option("--ctx", help="Context length in tokens.")] = 128,
    batch: Annotated[int, typer.Option("--batch", help="Contexts per forward pass.")] = 8,
    layer: Annotated[int, typer.Option("--layer", help="Layer of a cross-layer transcoder.")] = 0,
    top_k: Annotated[int, typer.Option("--top-k", help="Top-activating contexts kept per feature.")] = 20,
    samples: Annotated[int, typer.Option("--samples", help="Sampled activating contexts per feature.")] = 40,
    random: Annotated[int, typer.Option("--random", help="Non-activating contexts per feature.")] = 20,
    html: Annotated[
        bool, typer.Option("--html", help="Also write html/feature-<i>.html and an index.")
    ] = False,
    text_field: Annotated[str, typer.Option("--text-field", help="Text field of .jsonl/.parquet.")] = "text",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")] = "cpu",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the example sampling.")] = 0,
    allow_other_model: Annotated[
        bool,
        typer.Option(
            "--allow-other-model", help="Atlas a dictionary that was trained on another model anyway."
        ),
    ] = False,
) -> None:
    """Stream a corpus through MODEL and DICTIONARY and write each feature's statistics and examples."""
    import mri
    from mri.atlas.build import build_atlas

    if corpus is None:
        from mri.data.corpus import sample_corpus

        corpus = sample_corpus()
    m = mri.load(model, device=device)
    path = build_atlas(
        m,
        dictionary,
        corpus,
        out,
        tokens=tokens,
        ctx_len=ctx,
        batch_size=batch,
        layer=layer,
        top_k=top_k,
        n_samples=samples,
        n_random=random,
        html=html,
        text_field=text_field,
        seed=seed,
        command="mri " + shlex.join(sys.argv[1:]),
        allow_other_model=allow_other_model,
    )
    from mri.atlas.reader import Atlas

    a = Atlas(path)
    typer.echo(f"atlas written: {path} ({a.n_features} features, {a.manifest['tokens']:,} tokens, "
               f"{a.manifest['tokens_per_second']:,.0f} tok/s)")  # fmt: skip


def show(
    atlas: Annotated[Path, typer.Argument(help="Atlas folder.")],
    feature: Annotated[int, typer.Argument(help="Feature index.")],
    examples: Annotated[int, typer.Option("--examples", help="Top examples to show.")] = 8,
) -> None:
    """Show one feature: label, density, histogram, top examples with highlighted tokens, logit effects."""
    from mri.atlas.show import show_feature

    show_feature(str(atlas), feature, n_examples=examples)


class _AtlasGroup(TyperGroup):
    """`mri atlas MODEL DICT ...` builds an atlas (the `build` subcommand, implied); other subcommands by
    name."""

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["build", *args]
        return super().parse_args(ctx, args)


atlas_app = typer.Typer(
    cls=_AtlasGroup,
    no_args_is_help=True,
    help="Build an atlas (`mri atlas MODEL DICT --out DIR`), or report cross-lingual features.",
)
atlas_app.command("build")(atlas)


@atlas_app.command("crosslingual")
def crosslingual(
    model: Annotated[str, typer.Option("--model", help="Model folder, shipped organism name, or hub name.")],
    dictionary: Annotated[
        Path, typer.Option("--dict", help="Dictionary folder, or a folder of them per site (scan/dicts).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Report folder (crosslingual.json, crosslingual.html).")],
    site: Annotated[
        str | None, typer.Option("--site", help="Site of the dictionary to use when --dict holds several.")
    ] = None,
    passages: Annotated[
        str,
        typer.Option(
            "--passages",
            help="gnome-help (installed GNOME Help), sample (the shipped sample) or a .jsonl of passages.",
        ),
    ] = "gnome-help",
    languages: Annotated[
        str, typer.Option("--languages", help="Comma-separated languages (en is the original).")
    ] = "en,de,fr,es,it,ru",
    limit: Annotated[int, typer.Option("--limit", help="At most this many passages (spread evenly).")] = 600,
    min_languages: Annotated[
        int, typer.Option("--min-languages", help="A feature counts on a passage when active in this many.")
    ] = 3,
    max_common: Annotated[
        float,
        typer.Option("--max-common", help="Leave out features active on more than this share of texts."),
    ] = 0.1,
    controls: Annotated[int, typer.Option("--controls", help="Misaligned re-pairings to average.")] = 5,
    layer: Annotated[int, typer.Option("--layer", help="Layer of a cross-layer transcoder.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")] = "cpu",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the control's tie-breaks.")] = 0,
) -> None:
    """Features of MODEL's dictionary active on the same aligned passage in at least --min-languages
    languages, against misaligned controls; writes OUT/crosslingual.json and OUT/crosslingual.html."""
    import mri
    from mri.atlas.crosslingual import write_crosslingual

    m = mri.load(model, device=device)
    report = write_crosslingual(
        m,
        dictionary,
        out,
        site=site,
        passages=passages,
        languages=[x.strip() for x in languages.split(",") if x.strip()],
        limit=limit,
        min_languages=min_languages,
        max_common=max_common,
        controls=controls,
        layer=layer,
        seed=seed,
        command="mri " + shlex.join(sys.argv[1:]),
    )
    a, c = report["aligned"], report["control"]
    ratio = "no ratio: the control has none" if report["ratio"] is None else f"x{report['ratio']:.2f}"
    typer.echo(
        f"{report['passages']} passages in {len(report['languages'])} languages: "
        f"{a['hits']} (passage, feature) pairs active in >= {min_languages} languages, "
        f"{a['features']} features; misaligned control {c['mean']['hits']:.1f} ± {c['std']['hits']:.1f} "
        f"({ratio}); with different peak tokens {a['hits_different_tokens']} vs "
        f"{c['mean']['hits_different_tokens']:.1f}"
    )
    for line in report["source"].get("missing", []):
        typer.echo(f"skipped (not installed): {line}")
    if "note" in report["source"]:
        typer.echo(report["source"]["note"])
    typer.echo(f"written: {out / 'crosslingual.json'}, {out / 'crosslingual.html'}")
