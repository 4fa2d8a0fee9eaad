"""Read activations back as shuffled token-level minibatches, from a store on disk or straight from a model.

Both paths go through the same mixing buffer: rows arrive in chunks (contiguous runs of contexts from a
shard, or a model batch), the buffer holds at most `buffer_tokens` rows (plus one chunk), and whenever it
is full a random half of it goes out as minibatches. Memory stays bounded however large the store is; all
sites of a row stay together, so paired sites (a transcoder's mlp_in and mlp_out) line up.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri.data.corpus import iter_contexts, iter_documents
from mri.data.store import INDEX_FILES, read_manifest, site_file, verify_shard
from mri.errors import MriError

Batch = torch.Tensor | dict[str, torch.Tensor]
_CHUNKS_PER_BUFFER = 16


class Shard:
    """One shard of a store: token ids, (doc, pos) and activations as memory-mapped arrays."""

    def __init__(self, path: Path, info: dict[str, Any], dtype: str) -> None:
        self.path = path
        self.n_tokens: int = int(info["n_tokens"])
        self.context_start: int = int(info["context_start"])
        self.files: dict[str, str] = info["files"]
        self._dtype = dtype

    def _load(self, name: str) -> np.ndarray:
        # copy-on-write maps are writable views, so torch.from_numpy takes them without a warning
        return np.load(self.path / name, mmap_mode="c")

    @property
    def tokens(self) -> np.ndarray:
        """(n_tokens,) int32 token ids."""
        return self._load("tokens.npy")

    @property
    def doc(self) -> np.ndarray:
        """(n_tokens,) int32 document index, -1 for BOS."""
        return self._load("doc.npy")

    @property
    def pos(self) -> np.ndarray:
        """(n_tokens,) int32 position in the document, -1 for BOS."""
        return self._load("pos.npy")

    def acts(self, site: str) -> torch.Tensor:
        """(n_tokens, d) activations at `site`, memory-mapped (nothing is read until indexed)."""
        return _as_torch(self._load(site_file(site)), self._dtype)


def _as_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "bf16" else t


class ActivationStore:
    """A finished activation store written by `mri record` (see `mri.data.store` for the layout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise MriError(f"activation store not found: {self.path}")
        manifest = read_manifest(self.path)
        if manifest is None:
            raise MriError(f"{self.path} is not an activation store: it has no manifest.json")
        if not manifest.get("complete"):
            raise MriError(
                f"{self.path} is unfinished; run its record command again to finish it: {manifest['command']}"
            )
        self.manifest = manifest
        self.sites: list[str] = list(manifest["sites"])
        self.dtype: str = manifest["dtype"]
        self.ctx_len: int = int(manifest["ctx_len"])
        self.model_fingerprint: str = manifest["model_fingerprint"]
        self.shards = [Shard(self.path / s["name"], s, self.dtype) for s in manifest["shards"]]
        self.n_tokens: int = sum(s.n_tokens for s in self.shards)
        missing = [s.path.name for s in self.shards if not s.path.is_dir()]
        if missing:
            raise MriError(f"{self.path} is missing shards {missing}; record it again")

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, sites={self.sites}, n_tokens={self.n_tokens})"

    def site(self, name: str) -> str:
        """The canonical name of a recorded site ('L3.resid_post' works too); MriError if not recorded."""
        if name in self.sites:
            return name
        from mri.models.sites import parse_site

        try:
            canonical = parse_site(name, n_layers=1 << 20).name
        except MriError:
            canonical = None
        if canonical not in self.sites:
            raise MriError(f"{self.path} has no site {name!r}; it holds {self.sites}")
        return canonical

    def d(self, site: str) -> int:
        """Width of the activations recorded at `site`."""
        return int(self.manifest["d"][self.site(site)])

    def verify(self) -> None:
        """Re-hash every file against its recorded sha256; MriError naming the first bad shard."""
        for shard in self.shards:
            if verify_shard(shard.path, [*INDEX_FILES, *(site_file(s) for s in self.sites)]) is None:
                raise MriError(f"{shard.path} does not match its checksums; record the store again")

    def batches(
        self,
        sites: str | Sequence[str],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_tokens: int = 1 << 18,
        skip_bos: bool = True,
        drop_last: bool = False,
        dtype: torch.dtype | None = None,
    ) -> Iterator[Batch]:
        """One pass over the store in token-level minibatches.

        Yields `(batch_size, d)` tensors for one site, or `{site: (batch_size, d)}` keyed by the names as
        given for a list of sites (the same tokens in every site). With `shuffle`, chunks of contexts are
        visited in a seeded random order and rows are mixed through a buffer of `buffer_tokens`.
        `skip_bos` leaves out BOS positions, whose activations are outliers; `dtype` converts (default:
        the stored dtype). The last batch may be smaller unless `drop_last`.
        """
        names = [self.site(sites)] if isinstance(sites, str) else [self.site(s) for s in sites]
        if batch_size <= 0 or buffer_tokens <= 0:
            raise MriError("batch_size and buffer_tokens must be positive")
        chunk_rows = max(self.ctx_len, buffer_tokens // _CHUNKS_PER_BUFFER // self.ctx_len * self.ctx_len)
        chunks = [(i, a) for i, s in enumerate(self.shards) for a in range(0, s.n_tokens, chunk_rows)]
        rng = np.random.default_rng(seed)
        if shuffle:
            chunks = [chunks[j] for j in rng.permutation(len(chunks))]

        def rows() -> Iterator[dict[str, torch.Tensor]]:
            for i, a in chunks:
                shard = self.shards[i]
                keep = slice(a, min(a + chunk_rows, shard.n_tokens))
                mask = torch.from_numpy(shard.doc[keep] >= 0) if skip_bos else None
                out = {}
                for s in names:
                    x = shard.acts(s)[keep]
                    x = x[mask] if mask is not None else x.clone()
                    out[s] = x if dtype is None else x.to(dtype)
                yield out

        gen = torch.Generator().manual_seed(seed) if shuffle else None
        for batch in _mix(rows(), batch_size, buffer_tokens, gen, drop_last):
            yield batch[names[0]] if isinstance(sites, str) else dict(zip(sites, batch.values(), strict=True))


def _mix(
    chunks: Iterable[dict[str, torch.Tensor]],
    batch_size: int,
    buffer_tokens: int,
    gen: torch.Generator | None,
    drop_last: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    """Minibatches of rows from `chunks`; with a generator, through a shuffling buffer of `buffer_tokens`."""
    held: list[dict[str, torch.Tensor]] = []
    n_held = 0

    def take(final: bool) -> Iterator[dict[str, torch.Tensor]]:
        nonlocal held, n_held
        if not held:
            return
        buf = {k: torch.cat([c[k] for c in held]) if len(held) > 1 else held[0][k] for k in held[0]}
        n = n_held
        order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
        if final:
            n_out = n
        elif gen is None:
            n_out = n // batch_size * batch_size
        else:  # half the buffer, in whole batches, at least one batch when there is one
            n_out = max(n // 2 // batch_size, min(1, n // batch_size)) * batch_size
        for a in range(0, n_out, batch_size):
            idx = order[a : min(a + batch_size, n_out)]
            if len(idx) < batch_size and drop_last:
                break
            yield {k: v[idx] for k, v in buf.items()}
        rest = order[n_out:]
        held = [{k: v[rest] for k, v in buf.items()}] if len(rest) else []
        n_held = len(rest)

    for chunk in chunks:
        rows = len(next(iter(chunk.values())))
        if rows == 0:
            continue
        held.append(chunk)
        n_held += rows
        if n_held >= (buffer_tokens if gen is not None else batch_size):
            yield from take(final=False)
    yield from take(final=True)


def stream_from_model(
    model: Any,
    docs: str | Path | Iterable[str],
    sites: str | Sequence[str],
    batch_size: int,
    buffer_tokens: int,
    ctx_len: int,
    *,
    model_batch: int = 8,
    bos: bool = True,
    seed: int = 0,
    skip_bos: bool = True,
    dtype: torch.dtype = torch.float32,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """Token-level minibatches of `model`'s activations at `sites`, computed on the fly from `docs`.

    `docs` is a corpus path or an iterable of texts; they are packed into contexts of `ctx_len` (as for
    a store), run through the model `model_batch` contexts at a time, and mixed through a buffer of
    `buffer_tokens` rows on the model's device. Yields what `ActivationStore.batches` yields, until the
    documents run out.
    """
    names = [model.resolve_site(s) for s in ([sites] if isinstance(sites, str) else sites)]
    for s in names:
        model.site_dim(s)
    texts = iter_documents(docs) if isinstance(docs, str | Path) else iter(docs)

    def rows() -> Iterator[dict[str, torch.Tensor]]:
        contexts = iter_contexts(texts, model.tokenizer, ctx_len, bos=bos)
        while True:
            group = [c for _, c in zip(range(model_batch), contexts, strict=False)]
            if not group:
                return
            ids = torch.from_numpy(np.stack([t for t, _, _ in group]).astype(np.int64))
            cache = model.run(ids, read=names, stop=True).cache
            keep = torch.from_numpy(np.stack([d for _, d, _ in group]).ravel() >= 0).to(model.device)
            out = {}
            for s in names:
                x = cache[s].reshape(-1, cache[s].shape[-1]).to(dtype)
                out[s] = x[keep] if skip_bos else x
            yield out

    gen = torch.Generator().manual_seed(seed)
    for batch in _mix(rows(), batch_size, buffer_tokens, gen, drop_last):
        yield batch[names[0]] if isinstance(sites, str) else dict(zip(sites, batch.values(), strict=True))
