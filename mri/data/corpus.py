"""Corpora on disk -> documents -> fixed-length token contexts, deterministically.

A corpus is a file or a folder of `.txt` (one document per file), `.jsonl` (one document per line, text in
a field), `.parquet` (text in a column) or a Hugging Face `datasets` folder written by `save_to_disk`
(read straight from its Arrow files). Files are visited in sorted path order, so the same corpus always
gives the same documents in the same order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mri.errors import MriError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_TOKENIZE_CHUNK = 256


def corpus_files(path: str | Path) -> list[Path]:
    """The corpus's sources in reading order: files, and HF dataset folders (those holding state.json)."""
    root = Path(path)
    if not root.exists():
        raise MriError(f"corpus not found: {root}")
    if root.is_file():
        if root.suffix not in TEXT_SUFFIXES:
            raise MriError(f"unsupported corpus file {root}: use one of {', '.join(TEXT_SUFFIXES)}")
        return [root]
    sources: list[Path] = []

    def walk(folder: Path) -> None:
        if (folder / "state.json").is_file():
            sources.append(folder)
            return
        for child in sorted(folder.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir():
                walk(child)
            elif child.suffix in TEXT_SUFFIXES:
                sources.append(child)

    walk(root)
    if not sources:
        raise MriError(f"empty corpus: no .txt, .jsonl, .parquet files or saved HF dataset under {root}")
    return sources


def iter_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield every document of the corpus at `path`, in a fixed order; raise MriError if there are none."""
    n = 0
    for source in corpus_files(path):
        for doc in _read_source(source, text_field):
            n += 1
            yield doc
    if n == 0:
        raise MriError(f"empty corpus: {path} holds no documents")


def corpus_hash(path: str | Path) -> str:
    """A sha256 over the corpus's relative file names and bytes: it changes whenever any document does."""
    root = Path(path)
    h = hashlib.sha256()
    for source in corpus_files(root):
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for f in files:
            rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
            h.update(rel.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
            h.update(b"\0")
    return h.hexdigest()


def _read_source(source: Path, text_field: str) -> Iterator[str]:
    if source.is_dir():
        yield from _read_hf_dataset(source, text_field)
    elif source.suffix == ".txt":
        yield source.read_text(encoding="utf-8", errors="replace")
    elif source.suffix == ".jsonl":
        yield from _read_jsonl(source, text_field)
    else:
        yield from _read_parquet(source, text_field)


def _read_jsonl(source: Path, text_field: str) -> Iterator[str]:
    with open(source, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MriError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else []
                raise MriError(
                    f"{source}:{lineno}: no field {text_field!r} (fields: {keys}); pass --text-field"
                )
            yield str(record[text_field])


def _text_column(table: Any, text_field: str, source: Path) -> Iterator[str]:
    if text_field not in table.column_names:
        raise MriError(
            f"{source}: no column {text_field!r} (columns: {table.column_names}); pass --text-field"
        )
    for value in table.column(text_field).to_pylist():
        yield "" if value is None else str(value)


def _read_parquet(source: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(source)
    if text_field not in pf.schema_arrow.names:
        raise MriError(
            f"{source}: no column {text_field!r} (columns: {pf.schema_arrow.names}); pass --text-field"
        )
    for batch in pf.iter_batches(columns=[text_field]):
        yield from _text_column(batch, text_field, source)


def _read_hf_dataset(folder: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    state = json.loads((folder / "state.json").read_text())
    names = [f["filename"] for f in state.get("_data_files", [])] or sorted(
        p.name for p in folder.glob("*.arrow")
    )
    for name in names:
        with pa.memory_map(str(folder / name)) as src:
            try:
                reader = pa.ipc.open_stream(src)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(src)
                batches: Iterable[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = reader
            for batch in batches:
                yield from _text_column(batch, text_field, folder / name)


class Contexts(NamedTuple):
    """Packed token contexts; row i is one model input. All arrays are (n_contexts, ctx_len) int32."""

    tokens: np.ndarray
    """Token ids."""
    doc: np.ndarray
    """Index of the document each token came from (in `iter_documents` order); -1 for the BOS token."""
    pos: np.ndarray
    """Position of each token within its document; -1 for the BOS token."""


def bos_token_id(tokenizer: Any) -> int:
    """The id put at the start of each context: the tokenizer's BOS, else its EOS (GPT-2 style)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise MriError("the tokenizer has neither a BOS nor an EOS token; record with bos=False (--no-bos)")


def iter_contexts(
    docs: Iterable[str], tokenizer: Any, ctx_len: int, *, bos: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pack documents into consecutive contexts of `ctx_len` tokens, lazily, in corpus order.

    Documents are joined end to end with the tokenizer's EOS between them (when it has one); with
    `bos`, each context is BOS followed by `ctx_len - 1` corpus tokens. A last partial context is dropped.
    Yields `(tokens, doc, pos)`, each `(ctx_len,)` int32.
    """
    if ctx_len < 2:
        raise MriError(f"context length must be at least 2, got {ctx_len}")
    start = bos_token_id(tokenizer) if bos else None
    eos = tokenizer.eos_token_id
    body = ctx_len - 1 if bos else ctx_len
    buf_t: list[np.ndarray] = []
    buf_d: list[np.ndarray] = []
    buf_p: list[np.ndarray] = []
    held = 0
    doc_index = 0
    for chunk in _chunks(docs, _TOKENIZE_CHUNK):
        ids_list = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in ids_list:
            if eos is not None:
                ids = [*ids, eos]
            n = len(ids)
            if n:
                buf_t.append(np.asarray(ids, dtype=np.int32))
                buf_d.append(np.full(n, doc_index, dtype=np.int32))
                buf_p.append(np.arange(n, dtype=np.int32))
                held += n
            doc_index += 1
        if held < body:
            continue
        t, d, p = (np.concatenate(b) for b in (buf_t, buf_d, buf_p))
        n_full = held // body
        for i in range(n_full):
            yield _with_bos(
                t[i * body : (i + 1) * body],
                d[i * body : (i + 1) * body],
                p[i * body : (i + 1) * body],
                start,
            )
        rest = n_full * body
        buf_t, buf_d, buf_p = [t[rest:]], [d[rest:]], [p[rest:]]
        held -= rest


def _with_bos(
    t: np.ndarray, d: np.ndarray, p: np.ndarray, start: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if start is None:
        return t.copy(), d.copy(), p.copy()
    minus = np.array([-1], dtype=np.int32)
    return (
        np.concatenate([np.array([start], dtype=np.int32), t]),
        np.concatenate([minus, d]),
        np.concatenate([minus, p]),
    )


def _chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_contexts(
    docs: Iterable[str],
    tokenizer: Any,
    ctx_len: int,
    *,
    bos: bool = True,
    seed: int = 0,
    max_contexts: int | None = None,
) -> Contexts:
    """The first `max_contexts` packed contexts of `docs` (all if None), in an order shuffled by `seed`.

    The same documents, tokenizer, `ctx_len`, `bos`, `seed` and `max_contexts` always give the same
    arrays. Raises MriError if the documents do not fill a single context.
    """
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if max_contexts is None or max_contexts > 0:
        for ctx in iter_contexts(docs, tokenizer, ctx_len, bos=bos):
            rows.append(ctx)
            if max_contexts is not None and len(rows) >= max_contexts:
                break
    if not rows:
        raise MriError(f"the corpus is too small to fill one context of {ctx_len} tokens")
    order = np.random.default_rng(seed).permutation(len(rows))
    return Contexts(*(np.stack([rows[i][k] for i in order]) for k in range(3)))


def sample_corpus() -> Path:
    """The corpus sample shipped with mri (a stratified slice of the zoo corpus, a few MB of parquet)."""
    path = Path(str(resources.files("mri") / "zoo" / "samples" / "corpus-sample.parquet"))
    if not path.is_file():
        raise MriError(f"the shipped corpus sample {path} is missing; reinstall mri or pass --corpus")
    return path
