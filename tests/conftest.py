"""Shared fixtures: tiny random models of every supported family, saved as real HF folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "def add(a, b):\n    return a + b\n"
    "In the beginning was the word, and the word was with the model. "
) * 20

FAMILY_CONFIGS = {
    "gpt2": lambda v: __import__("transformers").GPT2Config(
        n_layer=3, n_embd=32, n_head=4, n_positions=128, vocab_size=v, bos_token_id=0, eos_token_id=1
    ),
    "gpt_neox": lambda v: __import__("transformers").GPTNeoXConfig(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        vocab_size=v,
        max_position_embeddings=128,
        use_parallel_residual=True,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "gpt_neox_seq": lambda v: __import__("transformers").GPTNeoXConfig(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        vocab_size=v,
        max_position_embeddings=128,
        use_parallel_residual=False,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "llama": lambda v: __import__("transformers").LlamaConfig(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=v,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "qwen2": lambda v: __import__("transformers").Qwen2Config(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=v,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "gemma2": lambda v: __import__("transformers").Gemma2Config(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=v,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    ),
}


def write_tiny_tokenizer(folder: Path, vocab_size: int = 300) -> None:
    """A byte-level BPE trained on a few KB, saved as tokenizer.json + config (loads with AutoTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_TEXT], trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|bos|>",
                "eos_token": "<|eos|>",
                "pad_token": "<|pad|>",
                "model_max_length": 128,
            }
        )
    )


def make_tiny_model(folder: Path, family: str, seed: int = 0) -> Path:
    """Save a random tiny model of `family` with the tiny tokenizer into `folder`."""
    from transformers import AutoModelForCausalLM

    write_tiny_tokenizer(folder)
    torch.manual_seed(seed)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    config = FAMILY_CONFIGS[family](len(vocab))
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir(family) -> folder holding a saved random model of that family (cached)."""
    made: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in made:
            made[family] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return made[family]

    return get


def mri_base_site_acts(site_name: str = "L2.resid_post", tokens: int = 49152, ctx: int = 128):
    """(model, site, activations (rows, d_model)) of mri-base at `site_name` over the shipped corpus sample:
    `tokens` tokens in contexts of `ctx`, each context's first (BOS) position left out."""
    import mri
    from mri.data.corpus import iter_contexts, iter_documents, sample_corpus

    model = mri.load("mri-base")
    site = model.resolve_site(site_name)
    rows = []
    for ids, _, _ in iter_contexts(iter_documents(sample_corpus()), model.tokenizer, ctx):
        rows.append(torch.as_tensor(ids, dtype=torch.long))
        if len(rows) * ctx >= tokens:
            break
    acts = torch.cat(
        [
            model.run(torch.stack(rows[i : i + 16]), read=[site], stop=True)
            .cache[site][:, 1:]
            .reshape(-1, model.d_model)
            for i in range(0, len(rows), 16)
        ]
    ).float()
    return model, site, acts
