"""`build_atlas`: stream a corpus through a model and a dictionary, and write what each feature does.

The atlas folder holds `features.parquet` (one row per feature), `examples.parquet` (one row per kept
example, with its window of tokens and activations and its explain/score split), `vocab.parquet` (token id
-> text) and `manifest.json` (provenance). It is written into a temporary sibling folder and renamed into
place, so a reader never sees half an atlas.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from mri.atlas.collect import HIST_BINS, Collector, hist_edges
from mri.atlas.effects import decoder_neighbours, logit_effects
from mri.atlas.source import FeatureSource, dictionary_fingerprint, feature_source
from mri.atlas.split import DEFAULT_SALT, split_of
from mri.data.corpus import corpus_hash, iter_contexts, iter_documents
from mri.data.store import write_json_atomic
from mri.dictionaries.io import replace_folder
from mri.errors import MriError

FORMAT_VERSION = 1
FEATURES, EXAMPLES, VOCAB, MANIFEST = "features.parquet", "examples.parquet", "vocab.parquet", "manifest.json"
N_BANDS = 4
KINDS = ("top", "quantile", "random")
"""Example kinds: highest-activating contexts, uniformly sampled activating ones, non-activating ones."""


class _Speed(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} tok/s", style="progress.data.speed")


def build_atlas(
    model: Any,
    dictionary: Any,
    corpus: str | Path,
    out_dir: str | Path,
    *,
    tokens: int = 65536,
    ctx_len: int = 128,
    batch_size: int = 8,
    layer: int = 0,
    top_k: int = 20,
    n_samples: int = 40,
    n_random: int = 20,
    window: tuple[int, int] = (24, 8),
    score_fraction: float = 0.5,
    split_salt: int = DEFAULT_SALT,
    text_field: str = "text",
    seed: int = 0,
    html: bool = False,
    command: str | None = None,
    progress: bool = True,
    allow_other_model: bool = False,
) -> Path:
    """Write the atlas of `dictionary` (a folder or a loaded dictionary) on `model` (an `mri.Model`, a
    folder or an organism name) over the first `tokens` tokens of `corpus` to `out_dir`; return it.

    top_k: highest-activating contexts kept per feature (split between explain and score by context).
    n_samples: uniformly sampled activating contexts per feature, tagged with their rank quantile.
    n_random: non-activating contexts per feature. window: tokens kept (before, after) the maximum.
    allow_other_model: atlas a dictionary whose recorded model fingerprint is not `model`'s (an error
    otherwise: its features would describe another model's activations).
    """
    from mri.dictionaries.io import load as load_dictionary
    from mri.models import load as load_model

    started = time.time()
    dict_path = None
    if isinstance(model, (str, Path)):
        model = load_model(model)
    if isinstance(dictionary, (str, Path)):
        dict_path = Path(dictionary)
        dictionary = load_dictionary(dict_path, device=model.device)
    if tokens <= 0 or batch_size <= 0 or top_k <= 0:
        raise MriError("--tokens, --batch and --top-k must be positive")
    source = feature_source(dictionary, model, layer, allow_other_model=allow_other_model)
    collector = Collector(
        source.n_features,
        ctx_len,
        top_k=top_k,
        n_samples=n_samples,
        window=window,
        seed=seed,
        device=model.device,
    )
    out_dir = Path(out_dir)

    def write(tmp: Path) -> None:
        n_ctx, seconds = _stream(
            model, source, collector, corpus, tokens, ctx_len, batch_size, text_field, tmp, progress
        )
        ctx_tokens = np.memmap(tmp / ".tokens.bin", dtype=np.int32, mode="r").reshape(n_ctx, 3, ctx_len)
        directions = source.directions()
        _write_features(tmp / FEATURES, model, collector, directions)
        _write_examples(tmp / EXAMPLES, collector, ctx_tokens, n_random, score_fraction, split_salt)
        _write_vocab(tmp / VOCAB, model)
        del ctx_tokens
        (tmp / ".tokens.bin").unlink()
        manifest = {
            "kind": "atlas",
            "format_version": FORMAT_VERSION,
            "model": model.name,
            "model_fingerprint": model.fingerprint(),
            "dictionary": str(dict_path) if dict_path else None,
            "dictionary_config": dictionary.cfg.to_dict(),
            "dictionary_fingerprint": dictionary_fingerprint(dictionary),
            "dictionary_model_fingerprint": dictionary.cfg.model_fingerprint,
            "layer": layer,
            "site": source.site,
            "n_features": source.n_features,
            "corpus": str(corpus),
            "corpus_hash": corpus_hash(corpus),
            "text_field": text_field,
            "tokens": collector.tokens,
            "contexts": n_ctx,
            "ctx_len": ctx_len,
            "bos_excluded": True,
            "special_token_ids": sorted(int(i) for i in model.tokenizer.all_special_ids),
            "top_k": top_k,
            "n_samples": n_samples,
            "n_random": n_random,
            "window": list(window),
            "quantile_bands": N_BANDS,
            "hist_edges": hist_edges().tolist(),
            "split": {
                "method": "splitmix64(context id ^ salt)",
                "salt": split_salt,
                "score_fraction": score_fraction,
            },
            "cofiring": "MinHash (32 hashes) estimate of the Jaccard index of the tokens two features fire on",
            "seed": seed,
            "seconds_streaming": seconds,
            "tokens_per_second": collector.tokens / max(seconds, 1e-9),
            "seconds": time.time() - started,
            "command": command
            or (
                "mri " + shlex.join(sys.argv[1:])
                if sys.argv and sys.argv[0].endswith("mri")
                else "build_atlas()"
            ),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json_atomic(tmp / MANIFEST, manifest)

    replace_folder(out_dir, write)
    if html:
        from mri.atlas.html import write_html

        write_html(out_dir)
    return out_dir


def _stream(
    model: Any,
    source: FeatureSource,
    collector: Collector,
    corpus: str | Path,
    tokens: int,
    ctx_len: int,
    batch_size: int,
    text_field: str,
    tmp: Path,
    progress: bool,
) -> tuple[int, float]:
    """Run every context through model and encoder into `collector`; append (tokens, doc, pos) of each
    context to tmp/.tokens.bin. Returns (contexts, seconds)."""
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if max_pos is not None and ctx_len > max_pos:
        raise MriError(f"--ctx {ctx_len} is longer than {model.name}'s {max_pos} positions")
    want = math.ceil(tokens / ctx_len)
    contexts = iter_contexts(iter_documents(corpus, text_field), model.tokenizer, ctx_len, bos=True)
    columns = (
        TextColumn("atlas"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tokens"),
        _Speed(),
        TimeRemainingColumn(),
    )
    n_ctx, t0 = 0, time.time()
    with (
        open(tmp / ".tokens.bin", "wb") as fh,
        Progress(*columns, console=Console(stderr=True), disable=not progress, transient=True) as bar,
    ):
        task = bar.add_task("atlas", total=want * ctx_len)
        batch: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

        def flush() -> None:
            nonlocal n_ctx
            rows = np.stack([np.stack(b) for b in batch])  # (B, 3, T)
            fh.write(rows.astype(np.int32).tobytes())
            ids = torch.from_numpy(rows[:, 0].astype(np.int64))
            x = model.run(ids, read=[source.site], stop=True).cache[source.site]
            acts = source.encode(x)
            counted = torch.from_numpy(rows[:, 1] >= 0)
            collector.update(acts, torch.arange(n_ctx, n_ctx + len(batch)), counted)
            n_ctx += len(batch)
            bar.update(task, advance=len(batch) * ctx_len)
            batch.clear()

        for ctx in contexts:
            batch.append(ctx)
            if len(batch) == batch_size:
                flush()
            if n_ctx + len(batch) >= want:
                break
        if batch:
            flush()
    if n_ctx == 0:
        raise MriError(f"the corpus {corpus} is too small to fill one context of {ctx_len} tokens")
    return n_ctx, time.time() - t0


def _fixed_list(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """A (n, k) array as a pyarrow list column."""
    n, k = values.shape
    flat = pa.array(values.reshape(-1), type=dtype)
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k), flat)


def _write_features(path: Path, model: Any, c: Collector, directions: torch.Tensor) -> None:
    fired = c.fired.cpu().numpy()
    pos_ids, pos_vals, neg_ids, neg_vals = logit_effects(model, directions)
    nb_ids, nb_cos = decoder_neighbours(directions)
    co_ids, co_jac = c.cofiring()
    table = pa.table(
        {
            "feature": pa.array(np.arange(c.n, dtype=np.int32)),
            "density": pa.array(fired / max(c.tokens, 1)),
            "fired": pa.array(fired),
            "mean_act": pa.array(np.where(fired > 0, c.sum.cpu().numpy() / np.maximum(fired, 1), 0.0)),
            "max_act": pa.array(c.max.cpu().numpy().astype(np.float32)),
            "hist": _fixed_list(c.hist.view(c.n, HIST_BINS).cpu().numpy(), pa.int64()),
            "logit_pos_ids": _fixed_list(pos_ids.cpu().numpy().astype(np.int32), pa.int32()),
            "logit_pos": _fixed_list(pos_vals.cpu().numpy(), pa.float32()),
            "logit_neg_ids": _fixed_list(neg_ids.cpu().numpy().astype(np.int32), pa.int32()),
            "logit_neg": _fixed_list(neg_vals.cpu().numpy(), pa.float32()),
            "cofire_ids": _fixed_list(co_ids.cpu().numpy().astype(np.int32), pa.int32()),
            "cofire_jaccard": _fixed_list(co_jac.cpu().numpy(), pa.float32()),
            "neighbour_ids": _fixed_list(nb_ids.cpu().numpy().astype(np.int32), pa.int32()),
            "neighbour_cos": _fixed_list(nb_cos.cpu().numpy(), pa.float32()),
        }
    )
    pq.write_table(table, path, row_group_size=4096)


def _write_examples(
    path: Path, c: Collector, ctx_tokens: np.ndarray, n_random: int, score_fraction: float, salt: int
) -> None:
    """One row per kept example, sorted by feature: top, quantile-sampled and non-activating (random)."""
    n, width = c.n, c.width
    top_v, top_c = c.top.values.cpu().numpy(), c.top.context.cpu().numpy()
    smp_v, smp_c = c.sample.values.cpu().numpy(), c.sample.context.cpu().numpy()
    parts: list[dict[str, np.ndarray]] = []

    # top-k, already sorted by activation within each feature
    f, j = np.nonzero(top_v > 0)
    parts.append(
        _rows(
            f,
            "top",
            j,
            np.full(len(f), np.nan),
            top_c[f, j],
            c.top.pos.cpu().numpy()[f, j],
            c.top.start.cpu().numpy()[f, j],
            top_v[f, j],
            c.top.window.float().cpu().numpy()[f, j],
        )
    )

    # sampled activating contexts, with their rank quantile in the sample; drop those already in the top-k
    valid = smp_v > 0
    order = np.argsort(np.where(valid, smp_v, np.inf), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :].repeat(n, 0), axis=1)
    count = valid.sum(1, keepdims=True)
    quantile = (rank + 0.5) / np.maximum(count, 1)
    in_top = (smp_c[:, :, None] == np.where(top_v > 0, top_c, -2)[:, None, :]).any(-1)
    f, j = np.nonzero(valid & ~in_top)
    parts.append(
        _rows(
            f,
            "quantile",
            rank[f, j],
            quantile[f, j],
            smp_c[f, j],
            c.sample.pos.cpu().numpy()[f, j],
            c.sample.start.cpu().numpy()[f, j],
            smp_v[f, j],
            c.sample.window.float().cpu().numpy()[f, j],
        )
    )

    # non-activating: pool contexts where the feature never fired, in the pool's random order
    pool_ok = c.pool_context.cpu().numpy() >= 0
    quiet = (c.pool_max.float().cpu().numpy() <= 0) & pool_ok[:, None]  # (P, n)
    taken = np.cumsum(quiet, axis=0) * quiet
    p, f = np.nonzero((taken > 0) & (taken <= n_random))
    ctx = c.pool_context.cpu().numpy()[p]
    span = c.ctx_len - width  # the last start that fits; windows skip BOS where they can
    start = (np.where(span >= 1, 1 + (ctx * 7919) % max(span, 1), 0)).clip(0, span).astype(np.int32)
    parts.append(
        _rows(
            f,
            "random",
            taken[p, f] - 1,
            np.full(len(f), np.nan),
            ctx,
            start,
            start,
            np.zeros(len(f), np.float32),
            np.zeros((len(f), width), np.float32),
        )
    )

    rows = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    sort = np.lexsort((rows["rank"], rows["kind_code"], rows["feature"]))
    rows = {k: v[sort] for k, v in rows.items()}
    ctx = rows["context"]
    starts = rows["start"].astype(np.int64)
    cols = starts[:, None] + np.arange(width)[None, :]
    toks = ctx_tokens[ctx[:, None], 0, cols] if len(ctx) else np.zeros((0, width), np.int32)
    peak = rows["pos"].astype(np.int64)
    doc = ctx_tokens[ctx, 1, peak] if len(ctx) else np.zeros(0, np.int32)
    doc_pos = ctx_tokens[ctx, 2, peak] if len(ctx) else np.zeros(0, np.int32)
    table = pa.table(
        {
            "feature": pa.array(rows["feature"].astype(np.int32)),
            "kind": pa.array(rows["kind"]).dictionary_encode(),
            "rank": pa.array(rows["rank"].astype(np.int32)),
            "quantile": pa.array(rows["quantile"].astype(np.float32), from_pandas=True),
            "context": pa.array(ctx.astype(np.int64)),
            "split": pa.array(split_of(ctx, score_fraction=score_fraction, salt=salt)).dictionary_encode(),
            "doc": pa.array(doc.astype(np.int32)),
            "doc_pos": pa.array(doc_pos.astype(np.int32)),
            "pos": pa.array(rows["pos"].astype(np.int32)),
            "start": pa.array(rows["start"].astype(np.int32)),
            "max_act": pa.array(rows["max_act"].astype(np.float32)),
            "token_ids": _fixed_list(toks.astype(np.int32), pa.int32()),
            "acts": _fixed_list(rows["acts"].astype(np.float32), pa.float32()),
        }
    )
    pq.write_table(table, path, row_group_size=16384)


def _rows(
    feature: np.ndarray,
    kind: str,
    rank: np.ndarray,
    quantile: np.ndarray,
    context: np.ndarray,
    pos: np.ndarray,
    start: np.ndarray,
    max_act: np.ndarray,
    acts: np.ndarray,
) -> dict[str, np.ndarray]:
    return {
        "feature": np.asarray(feature),
        "kind": np.full(len(feature), kind, dtype=object),
        "kind_code": np.full(len(feature), KINDS.index(kind)),
        "rank": np.asarray(rank),
        "quantile": np.asarray(quantile, dtype=np.float64),
        "context": np.asarray(context, dtype=np.int64),
        "pos": np.asarray(pos),
        "start": np.asarray(start),
        "max_act": np.asarray(max_act),
        "acts": np.asarray(acts, dtype=np.float32),
    }


def _write_vocab(path: Path, model: Any) -> None:
    tok = model.tokenizer
    size = max(len(tok), int(model.hf.get_output_embeddings().weight.shape[0]))
    known = len(tok)
    texts = tok.batch_decode([[i] for i in range(known)], skip_special_tokens=False)
    texts += [f"<unused {i}>" for i in range(known, size)]
    pq.write_table(
        pa.table({"id": pa.array(np.arange(size, dtype=np.int32)), "token": pa.array(texts)}), path
    )
