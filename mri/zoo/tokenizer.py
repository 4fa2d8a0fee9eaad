"""Train the zoo's byte-level BPE tokenizer and save it so plain transformers (4.57 and 5.x) loads it.

The folder holds `tokenizer.json` (the whole tokenizer, for `PreTrainedTokenizerFast(tokenizer_file=...)`)
plus `tokenizer_config.json` and `special_tokens_map.json` written by hand with the class name
`PreTrainedTokenizerFast`, which both major versions of `AutoTokenizer` resolve.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mri.errors import MriError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2


def corpus_shards(corpus_dir: str | Path, split: str = "train") -> list[Path]:
    """The corpus's parquet shards for `split` ("train" -> train-*.parquet, "val" -> val.parquet), sorted."""
    corpus_dir = Path(corpus_dir)
    shards = sorted(corpus_dir.glob("train-*.parquet")) if split == "train" else [corpus_dir / "val.parquet"]
    shards = [s for s in shards if s.exists()]
    if not shards:
        raise MriError(f"no {split} shards in {corpus_dir} (expected train-*.parquet and val.parquet)")
    return shards


def sample_texts(corpus_dir: str | Path, max_bytes: int) -> Iterator[str]:
    """Up to `max_bytes` of training text, spread over sources by taking every k-th document.

    Deterministic: the stride depends only on the corpus, so the same corpus gives the same sample.
    """
    shards = corpus_shards(corpus_dir)
    n_bytes = sum(
        pc.sum(pc.binary_length(pq.read_table(s, columns=["text"]).column("text"))).as_py() or 0
        for s in shards
    )
    stride = max(1, round(n_bytes / max(max_bytes, 1)))
    index = 0
    for s in shards:
        for text in pq.read_table(s, columns=["text"]).column("text").to_pylist():
            if index % stride == 0:
                yield text
            index += 1


def build_tokenizer(texts: Iterator[str], vocab_size: int = 8192) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `texts`; prepends `<|bos|>` to every encoded text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    for token, want in zip(SPECIAL_TOKENS, (BOS_ID, EOS_ID, PAD_ID), strict=True):
        if tok.token_to_id(token) != want:
            raise MriError(f"special token {token} got id {tok.token_to_id(token)}, expected {want}")
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int = 256) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": EOS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out


def train_tokenizer(
    corpus_dir: str | Path, out_dir: str | Path, vocab_size: int = 8192, sample_bytes: int = 50_000_000
) -> Path:
    """Train on a bounded, deterministic sample of the corpus's training text and save to `out_dir`."""
    tok = build_tokenizer(sample_texts(corpus_dir, sample_bytes), vocab_size)
    return save_tokenizer(tok, out_dir)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The raw `tokenizers.Tokenizer` from a folder's tokenizer.json (fast; no transformers import)."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise MriError(f"no tokenizer.json in {folder}; train one with `mri zoo tokenizer`")
    return Tokenizer.from_file(str(path))
