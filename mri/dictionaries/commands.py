"""`mri dict train` and `mri dict eval`: fit dictionaries from a store or a model, and measure them."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from mri.dictionaries.config import DictConfig, TrainConfig
from mri.errors import MriError

dict_app = typer.Typer(
    help="Train and evaluate sparse dictionaries (SAEs, transcoders, CLTs).", no_args_is_help=True
)


def site_pairs(sites: list[str], kind: str) -> list[tuple[str, str]]:
    """(input, output) site pairs from --site values: 'S' for an SAE; 'IN:OUT' or an mlp_in site (whose
    output is the same layer's mlp_out) for transcoders and CLTs."""
    pairs = []
    for raw in sites:
        for s in raw.replace(",", " ").split():
            if kind == "sae":
                if ":" in s:
                    raise MriError(f"an SAE reads and writes one site; got {s!r} (use --kind transcoder)")
                pairs.append((s, s))
            elif ":" in s:
                a, b = s.split(":", 1)
                pairs.append((a, b))
            elif s.endswith("mlp_in"):
                pairs.append((s, s[: -len("mlp_in")] + "mlp_out"))
            else:
                raise MriError(f"a {kind} needs IN:OUT sites (e.g. L1.mlp_in:L1.mlp_out); got {s!r}")
    if not pairs:
        raise MriError("give at least one --site")
    return pairs


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _store_batches(store: Any, sites: list[str], batch_size: int, seed: int) -> Iterator[dict]:
    """Endless shuffled passes over the store, a new seed each epoch (replayable for resume)."""
    epoch = 0
    while True:
        yield from store.batches(sites, batch_size, shuffle=True, seed=seed + epoch, drop_last=True)
        epoch += 1


def train(
    sites: Annotated[list[str], typer.Option("--site", help="Site to train on; repeat for several.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (one dictionary) or parent (several).")],
    store: Annotated[Path | None, typer.Option("--store", help="Activation store from `mri record`.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model to stream activations from.")] = None,
    corpus: Annotated[
        Path | None, typer.Option("--corpus", help="Corpus for --model (default: the shipped sample).")
    ] = None,
    arch: Annotated[str, typer.Option("--arch", help="topk | batchtopk | jumprelu | relu | gated.")] = "topk",
    kind: Annotated[str, typer.Option("--kind", help="sae | transcoder | clt.")] = "sae",
    latents: Annotated[
        int, typer.Option("--latents", help="Latents per dictionary (per layer for a CLT).")
    ] = 4096,
    k: Annotated[
        int,
        typer.Option("--k", help="Active latents per token (topk, batchtopk; jumprelu in its TopK warm-up)."),
    ] = 32,
    tokens: Annotated[int, typer.Option("--tokens", help="Training tokens.")] = 2_000_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Tokens per step.")] = 4096,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Learning rate (default: scaled by latents).")
    ] = None,
    sparsity_coef: Annotated[
        float | None, typer.Option("--sparsity-coef", help="L1 (relu, gated) / L0 (jumprelu) coefficient.")
    ] = None,
    skip: Annotated[
        bool, typer.Option("--skip/--no-skip", help="Transcoders: linear skip connection.")
    ] = False,
    init_norm: Annotated[
        float | None,
        typer.Option(
            "--init-norm",
            help="Norm of the encoder rows at initialisation [default: 0.577 for topk and batchtopk, 0.1 "
            "for jumprelu, relu and gated].",
        ),
    ] = None,
    matryoshka: Annotated[
        str | None,
        typer.Option(
            "--matryoshka",
            help="Nested prefix widths, comma-separated (e.g. 256,1024): Matryoshka training (SAEs, transcoders).",
        ),
    ] = None,
    threshold_lr_scale: Annotated[
        float, typer.Option("--threshold-lr-scale", help="JumpReLU: log-thresholds' LR over the LR.")
    ] = TrainConfig.threshold_lr_scale,
    topk_warmup: Annotated[
        float,
        typer.Option(
            "--topk-warmup",
            help="BatchTopK, JumpReLU: select each token's top k (as TopK) over this first fraction of the "
            "steps (0 to turn off).",
        ),
    ] = TrainConfig.topk_warmup_fraction,
    b_dec_init: Annotated[str, typer.Option("--b-dec-init", help="median | mean | zero.")] = "median",
    autocast: Annotated[bool, typer.Option("--bf16/--fp32", help="bf16 autocast compute (GPU).")] = False,
    cuda_graphs: Annotated[
        bool,
        typer.Option(
            "--cuda-graphs/--no-cuda-graphs",
            help="On one CUDA device, in one process: replay each step from a captured CUDA graph.",
        ),
    ] = True,
    ctx: Annotated[int, typer.Option("--ctx", help="Context length when streaming from --model.")] = 128,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")
    ] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.ckpt if it exists.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, ...")] = "auto",
    progress: Annotated[bool, typer.Option("--progress/--quiet")] = True,
    shard_latents: Annotated[
        bool,
        typer.Option(
            "--shard-latents", help="Under torchrun: split each dictionary's latents over the processes."
        ),
    ] = False,
) -> None:
    """Train sparse dictionaries at SITES, from an activation store or streamed from a model.

    Under `torchrun --nproc-per-node N`, N data-parallel processes train the same dictionaries: each
    steps on its share of every global batch of --batch-size tokens, the gradients are summed, and rank 0
    alone writes checkpoints and outputs. With --shard-latents, each process holds 1/N of every
    dictionary's latents instead and all see the whole batch (TopK and BatchTopK SAEs and transcoders).
    """
    from mri.dictionaries.distributed import env_ranks, process_group

    if (store is None) == (model is None):
        raise MriError("give either --store DIR or --model M with --corpus C")
    if shard_latents:
        from mri.dictionaries.sharding import check_shardable

        world = env_ranks().world
        if world == 1:
            raise MriError(
                "--shard-latents splits the latents over torchrun's processes; run under torchrun "
                "--nproc-per-node N (N > 1), or drop it"
            )
        check_shardable(kind, arch, latents, world, matryoshka=matryoshka is not None)
    if model is not None and corpus is None:
        from mri.data.corpus import sample_corpus

        corpus = sample_corpus()
    with process_group(_device(device)) as (ranks, dev):
        _train(
            ranks,
            dev,
            sites=sites,
            out=out,
            store=store,
            model=model,
            corpus=corpus,
            arch=arch,
            kind=kind,
            latents=latents,
            k=k,
            tokens=tokens,
            batch_size=batch_size,
            lr=lr,
            sparsity_coef=sparsity_coef,
            skip=skip,
            init_norm=init_norm,
            matryoshka=_widths(matryoshka),
            threshold_lr_scale=threshold_lr_scale,
            topk_warmup=topk_warmup,
            b_dec_init=b_dec_init,
            autocast=autocast,
            cuda_graphs=cuda_graphs,
            ctx=ctx,
            seed=seed,
            checkpoint_every=checkpoint_every,
            resume=resume,
            progress=progress,
            shard_latents=shard_latents,
        )


def _train(
    ranks: Any,
    dev: str,
    *,
    sites: list[str],
    out: Path,
    store: Path | None,
    model: str | None,
    corpus: Path | None,
    arch: str,
    kind: str,
    latents: int,
    k: int,
    tokens: int,
    batch_size: int,
    lr: float | None,
    sparsity_coef: float | None,
    skip: bool,
    b_dec_init: str,
    init_norm: float | None,
    threshold_lr_scale: float,
    autocast: bool,
    topk_warmup: float,
    cuda_graphs: bool = True,
    matryoshka: list[int] | None = None,
    ctx: int,
    seed: int,
    checkpoint_every: int,
    resume: bool,
    progress: bool,
    shard_latents: bool = False,
) -> None:
    """`train` on this process's rank: `ranks` split each batch, or with `shard_latents` the latents."""
    from mri.dictionaries import Trainer, build, save
    from mri.dictionaries.config import differences
    from mri.dictionaries.distributed import Ranks
    from mri.dictionaries.memory import check_fits, estimate
    from mri.dictionaries.trainer import captures_steps

    data, shards = (Ranks(), ranks) if shard_latents else (ranks, Ranks())
    if batch_size % data.world:
        raise MriError(
            f"--batch-size {batch_size} does not split over {data.world} processes; use a multiple of "
            f"{data.world}"
        )
    pairs = site_pairs(sites, kind)
    if store is not None:
        from mri.data.reader import ActivationStore

        src = ActivationStore(store)
        pairs = [(src.site(a), src.site(b)) for a, b in pairs]
        width = src.d
        fingerprint = src.model_fingerprint
    else:
        import mri

        m = mri.load(model, device=dev)
        pairs = [(m.resolve_site(a), m.resolve_site(b)) for a, b in pairs]
        width = m.site_dim
        fingerprint = m.fingerprint()
    cfgs = dict_configs(pairs, kind, arch, latents, k, skip, width, fingerprint, init_norm, matryoshka)
    tcfg = TrainConfig(
        tokens=tokens,
        batch_size=batch_size,
        lr=lr,
        sparsity_coef=sparsity_coef,
        threshold_lr_scale=threshold_lr_scale,
        topk_warmup_fraction=topk_warmup,
        b_dec_init=b_dec_init,
        autocast=autocast,
        cuda_graphs=cuda_graphs,
        seed=seed,
        checkpoint_every=checkpoint_every,
    )
    graphs = captures_steps(cfgs, tcfg, dev, single=ranks.single)
    need = estimate(cfgs, tcfg, processes=data.world, shards=shards.world, graphs=graphs)
    if ranks.main:
        typer.echo(f"memory: {need.describe()}")
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dev == "cpu" else 1
    refusal = None
    try:
        check_fits(need, dev, sharing=sharing)
    except MriError as e:
        refusal = e
    if ranks.any(refusal is not None):  # every rank stops, or none
        raise refusal or MriError("another process has too little memory to train; see its message")
    ckpt = out.with_name(out.name + ".ckpt")
    if resume and ckpt.is_dir():
        trainer = Trainer.resume(ckpt, device=dev, ranks=data, shards=shards)
        trainer.set_cuda_graphs(cuda_graphs)
        changed = [
            f"dictionary {i}: {change}"
            for i, (old, new) in enumerate(zip([d.cfg for d in trainer.dicts], cfgs, strict=False))
            for change in differences(old, new)
        ]
        if len(trainer.dicts) != len(cfgs):
            changed.append(f"dictionaries: {len(trainer.dicts)} -> {len(cfgs)}")
        changed += differences(trainer.cfg, tcfg, ignore=("checkpoint_every", "cuda_graphs"))  # speed only
        if changed:
            raise MriError(
                f"{ckpt} was trained with other settings than these options ask for ({'; '.join(changed)}); "
                "resume with the same options, or delete it or drop --resume to start afresh"
            )
    else:
        trainer = Trainer(
            [build(c, seed=seed + i) for i, c in enumerate(cfgs)], tcfg, device=dev, ranks=data, shards=shards
        )
    all_sites = trainer.sites
    local_batch = batch_size // data.world
    if store is not None:
        batches = data.split(_store_batches(src, all_sites, batch_size, seed))
    else:
        from itertools import islice

        from mri.data.corpus import iter_documents
        from mri.data.reader import stream_from_model

        batches = stream_from_model(
            m,
            islice(iter_documents(corpus), data.rank, None, data.world),
            all_sites,
            local_batch,
            buffer_tokens=max(8 * local_batch, 1 << 16),
            ctx_len=ctx,
            seed=seed + data.rank,
            drop_last=True,
        )
    trainer.fit(batches, progress=progress, checkpoint=ckpt if checkpoint_every else None)
    finished = trainer.finished()  # with sharded latents, every rank sends rank 0 its slices
    if not ranks.main:
        return
    command = "mri " + shlex.join(sys.argv[1:])
    for d, metrics in zip(finished, trainer.metrics, strict=True):
        folder = out if len(finished) == 1 else out / d.cfg.sites_in[0]
        save(
            d,
            folder,
            provenance={
                "training_tokens": trainer.step * batch_size,
                "train_config": trainer.cfg.to_dict(),
                "processes": ranks.world,
                "sharding": "latents" if shard_latents else "batch" if ranks.world > 1 else None,
                "source": str(store) if store is not None else f"{model} on {corpus}",
                "command": command,
                "final_train_metrics": metrics,
            },
        )
        typer.echo(f"dictionary written: {folder}  (fvu {metrics['fvu']:.3f}, l0 {metrics['l0']:.1f})")
    discard_checkpoint(ckpt)


def _widths(text: str | None) -> list[int] | None:
    """--matryoshka's comma-separated widths as integers; MriError naming the option otherwise."""
    if text is None:
        return None
    try:
        return [int(w) for w in text.replace(" ", "").split(",") if w]
    except ValueError:
        raise MriError(
            f"--matryoshka takes comma-separated latent counts, e.g. 256,1024; got {text!r}"
        ) from None


def dict_configs(
    pairs: list[tuple[str, str]],
    kind: str,
    arch: str,
    latents: int,
    k: int,
    skip: bool,
    width: Any,
    fingerprint: str | None,
    init_norm: float | None,
    matryoshka: list[int] | None = None,
) -> list[Any]:
    """The `DictConfig`s that `mri dict train` builds for (input, output) site `pairs` of widths `width`."""
    groups = [pairs] if kind == "clt" else [[p] for p in pairs]
    cfgs = []
    for group in groups:
        d_in, d_out = {width(a) for a, _ in group}, {width(b) for _, b in group}
        if len(d_in) != 1 or len(d_out) != 1:
            raise MriError(f"the sites of one CLT must share widths; got inputs {d_in}, outputs {d_out}")
        cfgs.append(
            DictConfig(
                kind=kind,
                arch=arch,
                d_in=d_in.pop(),
                d_out=d_out.pop(),
                n_latents=latents,
                k=k,
                sites_in=[a for a, _ in group],
                sites_out=[b for _, b in group],
                skip=skip,
                init_norm=init_norm,
                matryoshka=matryoshka,
                model_fingerprint=fingerprint,
            )
        )
    return cfgs


def check_widths(cfg: Any, width: Any, source: str) -> None:
    """MriError unless every site of the dictionary `cfg` has, in `source`, the width the dictionary
    expects; `width(site)` gives it."""
    for sites, want, what in ((cfg.sites_in, cfg.d_in, "d_in"), (cfg.sites_out, cfg.d_out, "d_out")):
        for s in sites:
            got = width(s)
            if got != want:
                raise MriError(
                    f"{source} has width {got} at {s}, but the dictionary's {what} is {want}: it was trained "
                    "on another model or site"
                )


def discard_checkpoint(folder: Path) -> None:
    """Remove a finished run's checkpoint."""
    shutil.rmtree(folder, ignore_errors=True)


def evaluate(
    dictionary: Annotated[Path, typer.Argument(help="Dictionary folder (ours or SAELens).")],
    model: Annotated[str | None, typer.Option("--model", help="Model to splice the dictionary into.")] = None,
    corpus: Annotated[
        Path | None, typer.Option("--corpus", help="Corpus for --model (default: the shipped sample).")
    ] = None,
    store: Annotated[
        Path | None, typer.Option("--store", help="Store for reconstruction metrics only.")
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens to evaluate on.")] = 65_536,
    ctx: Annotated[int, typer.Option("--ctx", help="Context length (with --model).")] = 128,
    batch: Annotated[int, typer.Option("--batch", help="Contexts per forward pass (with --model).")] = 8,
    out: Annotated[
        Path | None, typer.Option("--out", help="Where metrics.json goes (default: DICTIONARY).")
    ] = None,
    device: Annotated[str, typer.Option("--device")] = "auto",
) -> None:
    """Measure a dictionary: FVU, L0, dead/dense latents, and CE loss recovered / KL when spliced in."""
    import json

    from mri.dictionaries import load
    from mri.dictionaries.metrics import evaluate_on_batches, evaluate_on_model, write_report

    if (store is None) == (model is None):
        raise MriError("give either --model M with --corpus C, or --store DIR")
    dev = _device(device)
    d = load(dictionary, device=dev)
    cfg = d.cfg
    if model is not None:
        if corpus is None:
            from mri.data.corpus import sample_corpus

            corpus = sample_corpus()
        import mri
        from mri.data.corpus import iter_documents, tokenize_contexts

        m = mri.load(model, device=dev)
        check_widths(cfg, lambda s: m.site_dim(m.resolve_site(s)), model)
        if cfg.model_fingerprint and cfg.model_fingerprint != m.fingerprint():
            typer.echo(f"warning: {dictionary} was trained on another model (fingerprint differs)", err=True)
        n_ctx = max(1, tokens // ctx)
        contexts = tokenize_contexts(iter_documents(corpus), m.tokenizer, ctx, max_contexts=n_ctx)
        import torch

        ids = torch.from_numpy(contexts.tokens.astype("int64"))
        metrics, density = evaluate_on_model(d, m, ids, batch_size=batch)
        metrics["source"] = f"{model} on {corpus}"
    else:
        from mri.data.reader import ActivationStore

        src = ActivationStore(store)
        sites = list(dict.fromkeys([*cfg.sites_in, *cfg.sites_out]))
        check_widths(cfg, src.d, str(store))
        batches = src.batches(sites, 4096, shuffle=False)
        metrics, density = evaluate_on_batches(d, batches, max_tokens=tokens)
        metrics["source"] = str(store)
    path = write_report(metrics, density, out or dictionary)
    typer.echo(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=1))
    typer.echo(f"metrics written: {path}")


dict_app.command("train")(train)
dict_app.command("eval")(evaluate)
