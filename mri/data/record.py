"""Record a model's activations at sites over a corpus into an activation store, resumably.

The contexts are a pure function of (corpus, tokenizer, ctx_len, bos, seed, tokens) and shard k always
holds contexts `[k * shard_contexts, (k + 1) * shard_contexts)`, so a run killed at any point and started
again with the same arguments skips the shards it finished, redoes the rest, and ends with the same bytes
as a run that was never stopped. Under torchrun, rank r records shards r, r + W, r + 2W, ... of the same
store and rank 0 writes the manifest once all ranks are done; the store is the one a single process writes.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from mri.data.corpus import corpus_hash, iter_documents, tokenize_contexts
from mri.data.store import (
    DTYPES,
    FORMAT_VERSION,
    INDEX_FILES,
    KIND,
    MANIFEST,
    ShardWriter,
    check_dtype,
    check_free_disk,
    check_same_spec,
    estimated_bytes,
    read_manifest,
    shard_name,
    site_file,
    verify_shard,
    write_json_atomic,
)
from mri.errors import MriError

DEFAULT_SHARD_TOKENS = 1 << 16
_console = Console(stderr=True)


class _TokensPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} tok/s", style="progress.data.speed")


def _dist() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def _process_group(world: int):
    """Join torch.distributed (gloo, for barriers and small objects) when under torchrun and not yet in."""
    import torch.distributed as tdist

    created = False
    if world > 1 and not tdist.is_initialized():
        if not tdist.is_available():
            raise MriError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        tdist.init_process_group(backend="gloo")
        created = True
    try:
        yield
    finally:
        if created:
            tdist.destroy_process_group()


def _broadcast(obj: Any, world: int) -> Any:
    """Rank 0's `obj` on every rank."""
    if world == 1:
        return obj
    import torch.distributed as tdist

    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if world == 1:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * world
    tdist.all_gather_object(out, obj)
    return out


def record(
    model: Any,
    corpus: str | Path,
    sites: Sequence[str],
    tokens: int,
    out: str | Path,
    *,
    dtype: str = "fp16",
    ctx_len: int = 128,
    batch_size: int = 8,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    seed: int = 0,
    bos: bool = True,
    text_field: str = "text",
    command: str | None = None,
    progress: bool = True,
) -> Path:
    """Record `model`'s activations at `sites` over the first `tokens` tokens of `corpus` into `out`.

    `model` is an `mri.Model`; `tokens` is rounded up to whole contexts of `ctx_len`; each shard holds
    `shard_tokens // ctx_len` contexts. Resumes an unfinished store at `out` written with the same
    arguments; raises MriError naming the field when `out` holds a different store. Returns `out`.
    """
    rank, world = _dist()
    with _process_group(world):
        return _record(
            model,
            Path(corpus),
            list(sites),
            tokens,
            Path(out),
            dtype=dtype,
            ctx_len=ctx_len,
            batch_size=batch_size,
            shard_tokens=shard_tokens,
            seed=seed,
            bos=bos,
            text_field=text_field,
            command=command,
            progress=progress and rank == 0,
            rank=rank,
            world=world,
        )


def _record(
    model: Any,
    corpus: Path,
    sites: list[str],
    tokens: int,
    out: Path,
    *,
    dtype: str,
    ctx_len: int,
    batch_size: int,
    shard_tokens: int,
    seed: int,
    bos: bool,
    text_field: str,
    command: str | None,
    progress: bool,
    rank: int,
    world: int,
) -> Path:
    check_dtype(dtype)
    if tokens <= 0 or batch_size <= 0 or shard_tokens <= 0:
        raise MriError("--tokens, --batch and --shard-tokens must be positive")
    if not sites:
        raise MriError("name at least one site to record (--sites)")
    canonical = [s.name for s in sorted({model.site(name) for name in sites})]  # forward order
    dims = {s: int(model.site_dim(s)) for s in canonical}
    for s in canonical:
        site_file(s)
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if max_pos is not None and ctx_len > max_pos:
        raise MriError(f"--ctx {ctx_len} is longer than {model.name}'s {max_pos} positions")
    shard_contexts = max(1, shard_tokens // ctx_len)
    spec = {
        "model_fingerprint": model.fingerprint(),
        "sites": canonical,
        "dtype": dtype,
        "ctx_len": ctx_len,
        "bos": bos,
        "seed": seed,
        "tokens_requested": tokens,
        "shard_contexts": shard_contexts,
        "corpus_hash": corpus_hash(corpus),
        "text_field": text_field,
    }
    existing = read_manifest(out) if out.is_dir() else None
    if existing is not None:  # settle before tokenizing: another store is refused, a finished one kept
        check_same_spec(existing, spec, out)
        if existing.get("complete"):
            if progress:
                _console.print(f"{out} is already complete ({existing['n_tokens']:,} tokens)")
            return out

    wanted = math.ceil(tokens / ctx_len)
    contexts = tokenize_contexts(
        iter_documents(corpus, text_field), model.tokenizer, ctx_len, bos=bos, seed=seed, max_contexts=wanted
    )
    n_contexts = len(contexts.tokens)
    n_shards = math.ceil(n_contexts / shard_contexts)
    if n_contexts < wanted and rank == 0:
        _console.print(
            f"[yellow]warning:[/] the corpus fills only {n_contexts * ctx_len:,} tokens "
            f"({n_contexts} contexts of {ctx_len}); recording those, not {tokens:,}"
        )

    manifest = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "complete": False,
        **spec,
        "model": {"name": model.name, "family": model.family},
        "d": dims,
        "n_contexts": n_contexts,
        "n_tokens": n_contexts * ctx_len,
        "corpus": str(corpus.resolve()),
        "command": command if command is not None else " ".join(sys.argv),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "shards": [],
    }
    error = None
    if rank == 0:
        try:
            manifest = _prepare(
                out, manifest, spec, dims, dtype, n_shards, shard_contexts, ctx_len, n_contexts
            )
        except MriError as e:
            error = str(e)
    error, manifest = _broadcast((error, manifest), world)
    if error is not None:
        raise MriError(error)
    if manifest["complete"]:  # another process finished it meanwhile
        return out

    expected = [*INDEX_FILES, *(site_file(s) for s in canonical)]
    mine = list(range(rank, n_shards, world))
    todo = []
    for k in mine:
        path = out / shard_name(k)
        if path.exists() and verify_shard(path, expected) is None:
            shutil.rmtree(path)
        if not path.exists():
            todo.append(k)
    todo_tokens = sum(_shard_range(k, shard_contexts, n_contexts)[1] for k in todo) * ctx_len
    with _progress_bar(progress, todo_tokens) as advance:
        for k in todo:
            _record_shard(
                model, contexts, k, shard_contexts, n_contexts, ctx_len, dims, dtype, batch_size, out, advance
            )

    infos = {
        info["name"]: info
        for part in _gather([_shard_info(out / shard_name(k)) for k in mine], world)
        for info in part
    }
    if rank == 0:
        manifest["shards"] = [infos[shard_name(k)] for k in range(n_shards)]
        manifest["complete"] = True
        write_json_atomic(out / MANIFEST, manifest)
    _broadcast(None, world)
    return out


def _prepare(
    out: Path,
    manifest: dict[str, Any],
    spec: dict[str, Any],
    dims: dict[str, int],
    dtype: str,
    n_shards: int,
    shard_contexts: int,
    ctx_len: int,
    n_contexts: int,
) -> dict[str, Any]:
    """On rank 0: check `out` can take this store, clear partial shards, check disk, write the manifest."""
    existing = read_manifest(out) if out.exists() else None
    if existing is not None:
        check_same_spec(existing, spec, out)
        if existing.get("complete"):
            return existing
        manifest["created"] = existing.get("created", manifest["created"])
    elif out.exists() and any(p.name != MANIFEST + ".tmp" for p in out.iterdir()):
        raise MriError(f"{out} exists and is not an activation store; choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    for debris in out.glob("shard-*.tmp"):
        shutil.rmtree(debris)
    remaining = sum(
        _shard_range(k, shard_contexts, n_contexts)[1]
        for k in range(n_shards)
        if not (out / shard_name(k) / "shard.json").is_file()
    )
    check_free_disk(out, estimated_bytes(remaining * ctx_len, dims, dtype))
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _shard_range(k: int, shard_contexts: int, n_contexts: int) -> tuple[int, int]:
    """(first context, number of contexts) of shard k."""
    start = k * shard_contexts
    return start, min(shard_contexts, n_contexts - start)


def _shard_info(path: Path) -> dict[str, Any]:
    return json.loads((path / "shard.json").read_text())


def _record_shard(
    model: Any,
    contexts: Any,
    k: int,
    shard_contexts: int,
    n_contexts: int,
    ctx_len: int,
    dims: dict[str, int],
    dtype: str,
    batch_size: int,
    out: Path,
    advance: Any,
) -> None:
    start, count = _shard_range(k, shard_contexts, n_contexts)
    torch_dtype = DTYPES[dtype][1]
    writer = ShardWriter(out, k, start, count * ctx_len, dims, dtype)
    sl = slice(start, start + count)
    writer.write_index(0, contexts.tokens[sl].ravel(), contexts.doc[sl].ravel(), contexts.pos[sl].ravel())
    for b in range(0, count, batch_size):
        rows = contexts.tokens[start + b : start + min(b + batch_size, count)]
        ids = torch.from_numpy(rows.astype(np.int64))
        cache = model.run(ids, read=list(dims), stop=True).cache
        for site, d in dims.items():
            acts = cache[site]
            if acts.ndim != 3 or acts.shape[-1] != d:
                raise MriError(
                    f"{site} gave shape {tuple(acts.shape)}, not (batch, pos, {d}); "
                    "the store records per-token vectors"
                )
            writer.write_acts(site, b * ctx_len, acts.to(torch_dtype).reshape(-1, d).cpu())
        advance(rows.size)
    writer.finish()


@contextmanager
def _progress_bar(show: bool, total: int):
    """Yields `advance(n_tokens)`; draws a rich bar with tokens/s and ETA when `show`."""
    if not show or total == 0:
        yield lambda n: None
        return
    columns = [
        TextColumn("recording"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tokens"),
        _TokensPerSecond(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=_console, transient=False) as bar:
        task = bar.add_task("record", total=total)
        yield lambda n: bar.advance(task, n)
