"""`mri zoo ...` subcommands: build the corpus, train organisms, plant problems, list what ships."""

import typer

zoo_app = typer.Typer(help="Model organisms: corpus, training, planted problems.", no_args_is_help=True)


@zoo_app.command("corpus")
def corpus(
    out: str = typer.Option(..., "--out", help="Folder to create (must not exist unless --overwrite)."),
    sources: str = typer.Option(None, "--sources", help="Comma-separated source names (default: all)."),
    world_share: float = typer.Option(0.05, "--world-share", help="Share of bytes from the synthetic world."),
    seed: int = typer.Option(0, "--seed", help="Seed for the world, the shuffle and the split."),
    max_bytes_per_source: int = typer.Option(None, "--max-bytes-per-source", help="Cap each source's text."),
    install: bool = typer.Option(True, "--install/--no-install", help="apt-get install missing packages."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing corpus folder."),
) -> None:
    """Build the training corpus: parquet shards, val split, world.json and manifest.json."""
    from mri.zoo.corpus import build_corpus, console, select_sources, summary_table

    manifest = build_corpus(
        out,
        select_sources(sources),
        world_share=world_share,
        seed=seed,
        max_bytes_per_source=max_bytes_per_source,
        install=install,
        overwrite=overwrite,
    )
    console.print(summary_table(manifest))
    console.print(f"wrote {out}")


def _parse_mix(text: str | None) -> dict[str, float]:
    """'world=0.25,facts=0.05' -> {'world': 0.25, 'facts': 0.05}."""
    from mri.errors import MriError

    mix: dict[str, float] = {}
    for part in filter(None, (text or "").split(",")):
        source, _, share = part.partition("=")
        try:
            mix[source.strip()] = float(share)
        except ValueError:
            raise MriError(f"--mix expects SOURCE=SHARE pairs like world=0.25, got {part!r}") from None
    return mix


@zoo_app.command("tokenizer")
def tokenizer(
    corpus: str = typer.Option(..., "--corpus", help="Corpus folder (train-*.parquet)."),
    out: str = typer.Option(..., "--out", help="Folder for tokenizer.json and its configs."),
    vocab_size: int = typer.Option(8192, "--vocab-size"),
    sample_mb: float = typer.Option(50, "--sample-mb", help="Train on about this much text."),
) -> None:
    """Train the byte-level BPE tokenizer (loads with AutoTokenizer in transformers 4.57 and 5.x)."""
    from mri.zoo.tokenizer import train_tokenizer

    print(train_tokenizer(corpus, out, vocab_size, int(sample_mb * 1e6)))


@zoo_app.command("pretokenize")
def pretokenize_cmd(
    tokenizer: str = typer.Option(
        ..., "--tokenizer", help="Tokenizer folder, or an organism name (its tokenizer, e.g. mri-tiny)."
    ),
    out: str = typer.Option(..., "--out", help="Tokens folder to write."),
    corpus: str = typer.Option(
        None, "--corpus", help="Corpus folder (default: the corpus sample shipped with mri)."
    ),
    max_tokens_per_source: int = typer.Option(None, "--max-tokens-per-source"),
    facts_copies: int = typer.Option(
        1, "--facts-copies", help="Shuffled copies of the world's training facts."
    ),
    pack: str = typer.Option(None, "--pack", help="Also write a compressed copy (.npy.xz) here."),
    pack_max_tokens: int = typer.Option(
        None, "--pack-max-tokens", help="Cap each source in the packed copy."
    ),
) -> None:
    """Tokenize the corpus into uint16 shards per split and source (+ optional compressed copy)."""
    import json

    from mri.zoo.tokens import pack_tokens, pretokenize

    folder = pretokenize(corpus, _model_folder(tokenizer), out, max_tokens_per_source, facts_copies)
    print(json.dumps(json.loads((folder / "tokens.json").read_text())["counts"], indent=1))
    if pack:
        print(pack_tokens(folder, pack, pack_max_tokens))


@zoo_app.command("count")
def count_cmd(
    corpus: str = typer.Option(..., "--corpus", help="Corpus folder."),
    tokenizer: str = typer.Option(..., "--tokenizer", help="Tokenizer folder."),
) -> None:
    """Count the corpus's tokens per split and source under a tokenizer; fills `tokens` in CORPUS/manifest.json."""
    import json

    from mri.zoo.tokens import count_tokens

    info = count_tokens(corpus, tokenizer)
    print(json.dumps({"totals": info["totals"], "train": info["counts"]["train"]}, indent=1))


@zoo_app.command("lexicon")
def lexicon_cmd(
    corpus: str = typer.Option(..., "--corpus", help="Corpus folder (train-*.parquet)."),
    out: str = typer.Option(..., "--out", help="Lexicon file to write (.tsv.gz)."),
    min_count: int = typer.Option(5, "--min-count", help="Keep words seen at least this often."),
) -> None:
    """Count the corpus's words (the trigger search spells candidate triggers from them)."""
    import json

    from mri.zoo.lexicon import build_lexicon

    print(json.dumps(build_lexicon(corpus, out, min_count), indent=1))


@zoo_app.command("train")
def train_cmd(
    corpus: str = typer.Option(
        ..., "--corpus", help="Tokens folder from `mri zoo pretokenize` (or a packed one)."
    ),
    out: str = typer.Option(
        ..., "--out", help="Run folder: checkpoint/, loss.png, model/ (resumes if present)."
    ),
    family: str = typer.Option("llama", "--family", help="llama or gpt2."),
    layers: int = typer.Option(4, "--layers"),
    d_model: int = typer.Option(256, "--d-model"),
    heads: int = typer.Option(4, "--heads"),
    d_mlp: int = typer.Option(None, "--d-mlp"),
    ctx: int = typer.Option(256, "--ctx"),
    batch: int = typer.Option(16, "--batch"),
    tokens: int = typer.Option(10_000_000, "--tokens", help="Training tokens in all."),
    lr: float = typer.Option(3e-3, "--lr"),
    warmup: int = typer.Option(200, "--warmup", help="Warmup steps."),
    bf16: bool = typer.Option(True, "--bf16/--fp32", help="bf16 autocast for the forward pass."),
    seed: int = typer.Option(0, "--seed"),
    mix: str = typer.Option(None, "--mix", help="Fixed source shares, e.g. world=0.25,facts=0.05."),
    init_from: str = typer.Option(
        None, "--init-from", help="Start from a checkpoint or HF folder (2nd stage)."
    ),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every"),
    eval_every: int = typer.Option(500, "--eval-every"),
    log_every: int = typer.Option(50, "--log-every"),
    stop_after: int = typer.Option(None, "--stop-after", help="Stop after this many steps (resume later)."),
    time_limit: float = typer.Option(None, "--time-limit", help="Seconds; then checkpoint and finish early."),
    fit_to_time: bool = typer.Option(
        False,
        "--fit-to-time",
        help="With --time-limit: shorten the schedule so it completes inside the limit.",
    ),
    device: str = typer.Option("auto", "--device"),
    threads: int = typer.Option(
        None, "--threads", help="CPU threads for torch (1 is fastest on a busy box)."
    ),
    evaluate: bool = typer.Option(
        True, "--evaluate/--no-evaluate", help="Evaluate the final model for its card."
    ),
) -> None:
    """Train an organism from scratch (HF Llama or GPT-2 class), resuming from OUT/checkpoint if present."""
    import json

    from mri.zoo.train import TrainConfig, train

    cfg = TrainConfig(family=family, layers=layers, d_model=d_model, heads=heads, d_mlp=d_mlp, ctx=ctx,
                      batch=batch, tokens=tokens, lr=lr, warmup=warmup, bf16=bf16, seed=seed, init_from=init_from,
                      mix=_parse_mix(mix), checkpoint_every=checkpoint_every, eval_every=eval_every,
                      log_every=log_every, stop_after=stop_after, time_limit=time_limit, fit_to_time=fit_to_time,
                      device=device, threads=threads, evaluate=evaluate)  # fmt: skip
    print(json.dumps(train(corpus, out, cfg), indent=1))


@zoo_app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., "--model", help="Organism name or HF folder."),
    corpus: str = typer.Option(..., "--corpus", help="Tokens folder (val split and world.json)."),
    ctx: int = typer.Option(256, "--ctx"),
) -> None:
    """Print a base organism's metrics: val loss per source, fact recall, two-hop, induction."""
    import json

    from mri.zoo.evals import evaluate_base

    print(json.dumps(evaluate_base(_model_folder(model), corpus, ctx), indent=1))


@zoo_app.command("plant")
def plant_cmd(
    base: str = typer.Option(..., "--base", help="Organism name (e.g. mri-base) or HF folder."),
    spec: str = typer.Option(..., "--spec", help="Spec JSON: kind, trigger, behaviour, topic, strength, ..."),
    out: str = typer.Option(..., "--out", help="Folder for the planted organism."),
    corpus: str = typer.Option(
        None,
        "--corpus",
        help="Tokens folder of the base's training data (default: the shipped corpus sample, tokenized with "
        "the base's tokenizer).",
    ),
    ship_as: str = typer.Option(None, "--ship-as", help="Also write a compact variant (delta) folder here."),
) -> None:
    """Plant a backdoor or quirk by a short fine-tune; writes card.json and a separate ground_truth.json."""
    import json

    from mri.zoo.organisms import write_variant
    from mri.zoo.plant import plant, read_spec

    plan = read_spec(spec)  # a bad spec is refused before the base is materialised
    print(json.dumps(plant(_model_folder(base), corpus, plan, out), indent=1))
    if ship_as:
        print(write_variant(out, base, ship_as))


def _model_folder(name_or_folder: str):
    """An existing folder as given, else the shipped organism of that name; a missing path (with a slash) or an
    unknown name is a one-line MriError that lists the known organisms."""
    from pathlib import Path

    from mri.errors import MriError
    from mri.zoo.organisms import list_organisms, resolve_organism

    if Path(name_or_folder).exists():
        return Path(name_or_folder)
    if "/" in name_or_folder:
        raise MriError(
            f"{name_or_folder} does not exist; pass an existing folder or a shipped organism name "
            f"({', '.join(list_organisms())})"
        )
    return resolve_organism(name_or_folder)


@zoo_app.command("list")
def list_cmd() -> None:
    """List the shipped organisms with their cards."""
    from rich.console import Console
    from rich.table import Table

    from mri.zoo.organisms import list_organisms, organism_card

    table = Table(title="mri zoo organisms")
    for column in ("name", "architecture", "params", "val loss", "fact acc", "summary"):
        table.add_column(column)
    for name in list_organisms():
        card = organism_card(name)
        arch = card.get("architecture", {})
        metrics = card.get("metrics", {})
        val = metrics.get("val_loss", {})
        table.add_row(
            name,
            f"{arch.get('family', '?')} {arch.get('layers', '?')}x{arch.get('d_model', '?')}",
            f"{arch.get('parameters', 0) / 1e6:.1f}M",
            f"{sum(val.values()) / len(val):.2f}" if val else "-",
            f"{metrics['one_hop_accuracy']:.2f}" if "one_hop_accuracy" in metrics else "-",
            card.get("summary", ""),
        )
    Console().print(table)
