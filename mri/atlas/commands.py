"""`mri atlas` (build an atlas) and `mri show` (one feature in the terminal)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer


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
