"""`mri record`: run a model over a corpus and store its activations at sites (resumable, torchrun-aware)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from mri.data.record import DEFAULT_SHARD_TOKENS
from mri.data.record import record as record_store


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def record(
    model: Annotated[str, typer.Argument(help="Model folder, shipped organism name, or hub name.")],
    corpus: Annotated[
        Path, typer.Option("--corpus", help="Folder or file: .txt, .jsonl, .parquet, or a saved HF dataset.")
    ],
    sites: Annotated[
        list[str],
        typer.Option(
            "--sites", help="Sites to record: --sites L0.resid_post L1.mlp_out (or comma-separated)."
        ),
    ],
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens to record (rounded up to whole contexts).")],
    out: Annotated[Path, typer.Option("--out", help="Store folder (created, or resumed if unfinished).")],
    more_sites: Annotated[list[str] | None, typer.Argument(hidden=True, metavar="(more sites)")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Storage dtype: fp16, bf16 or fp32.")] = "fp16",
    ctx: Annotated[int, typer.Option("--ctx", help="Context length in tokens.")] = 128,
    batch: Annotated[int, typer.Option("--batch", help="Contexts per forward pass.")] = 8,
    shard_tokens: Annotated[
        int, typer.Option("--shard-tokens", help="Tokens per shard (rounded down to whole contexts).")
    ] = DEFAULT_SHARD_TOKENS,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the context shuffle.")] = 0,
    bos: Annotated[bool, typer.Option("--bos/--no-bos", help="Start every context with BOS.")] = True,
    text_field: Annotated[
        str, typer.Option("--text-field", help="Text field of .jsonl/.parquet/datasets.")
    ] = "text",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    model_dtype: Annotated[str, typer.Option("--model-dtype", help="Dtype to run the model in.")] = "fp32",
) -> None:
    """Record activations at SITES over a corpus into a sharded, resumable store."""
    import mri

    names = [s for arg in [*sites, *(more_sites or [])] for s in arg.replace(",", " ").split()]
    m = mri.load(model, device=_device(device), dtype=model_dtype)
    path = record_store(
        m,
        corpus,
        names,
        tokens,
        out,
        dtype=dtype,
        ctx_len=ctx,
        batch_size=batch,
        shard_tokens=shard_tokens,
        seed=seed,
        bos=bos,
        text_field=text_field,
        command="mri " + shlex.join(sys.argv[1:]),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"store written: {path}")
