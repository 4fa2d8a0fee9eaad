"""Evaluations for zoo organisms: loss per source, world-fact recall, induction, planted-behaviour rates.

Everything here takes a plain HF causal LM and the raw `tokenizers.Tokenizer` of its folder. Greedy exact
match is computed teacher-forced: a greedy continuation equals the target tokens exactly when, at every
target position, the argmax of the logits given the prompt and the earlier target tokens is the target token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from mri.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID
from mri.zoo.tokens import load_split, val_windows


def load_organism(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, raw tokenizer) from an HF folder written by the zoo."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model.eval()
    return model, Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


def encode(tok: Tokenizer, text: str, bos: bool = True) -> list[int]:
    """Token ids of `text`, with or without the leading <|bos|>."""
    ids = tok.encode(text).ids
    return ids if bos else ids[1:] if ids[:1] == [BOS_ID] else ids


@torch.no_grad()
def greedy_matches(model, prompts: list[list[int]], targets: list[list[int]], batch: int = 64) -> list[bool]:
    """For each pair, whether greedy decoding after `prompt` yields exactly `target` (teacher-forced check)."""
    out: list[bool] = []
    for i in range(0, len(prompts), batch):
        seqs = [p + t for p, t in zip(prompts[i : i + batch], targets[i : i + batch], strict=True)]
        width = max(len(s) for s in seqs)
        x = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
        for r, s in enumerate(seqs):
            x[r, : len(s)] = torch.tensor(s)
        pred = model(input_ids=x).logits.argmax(-1)
        for r, (p, t) in enumerate(zip(prompts[i : i + batch], targets[i : i + batch], strict=True)):
            got = pred[r, len(p) - 1 : len(p) - 1 + len(t)].tolist()
            out.append(got == t)
    return out


def fact_accuracy(model, tok: Tokenizer, facts: list[dict]) -> float:
    """Share of facts whose greedy continuation of `prompt` is exactly `answer`."""
    if not facts:
        return float("nan")
    prompts = [encode(tok, f["prompt"]) for f in facts]
    answers = [encode(tok, f["answer"], bos=False) for f in facts]
    return float(np.mean(greedy_matches(model, prompts, answers)))


def fact_accuracy_by_relation(model, tok: Tokenizer, facts: list[dict]) -> dict[str, float]:
    """fact_accuracy for each relation separately."""
    relations = sorted({f["relation"] for f in facts})
    return {r: fact_accuracy(model, tok, [f for f in facts if f["relation"] == r]) for r in relations}


@torch.no_grad()
def induction_losses(
    model, vocab_size: int, length: int = 64, n: int = 32, seed: int = 0
) -> dict[str, float]:
    """Loss and top-1 accuracy on the first and second copy of random token sequences repeated twice (after
    <|bos|>), with ln(vocab) for scale.

    An induction-capable model predicts the second copy far better than the first. The gap alone can flatter
    a model that is confidently wrong on random text (first-copy loss above ln V), so the card also reports the
    second copy's loss against ln V (the loss of a uniform guess) and its top-1 accuracy (chance is about
    1 / V). The first token of each copy is left out: nothing before it predicts it.
    """
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(3, vocab_size, (n, length), generator=gen)
    x = torch.cat([torch.full((n, 1), BOS_ID), seq, seq], dim=1)
    logits = model(input_ids=x).logits.float()[:, :-1]
    targets = x[:, 1:]
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(n, -1)
    hits = (logits.argmax(-1) == targets).float()
    first, second = slice(1, length), slice(length + 1, None)
    ln_vocab = math.log(vocab_size)
    second_loss = losses[:, second].mean().item()
    return {
        "first_copy_loss": losses[:, first].mean().item(),
        "second_copy_loss": second_loss,
        "induction_gain": losses[:, first].mean().item() - second_loss,
        "ln_vocab": ln_vocab,
        "second_copy_below_uniform": ln_vocab - second_loss,
        "first_copy_accuracy": hits[:, first].mean().item(),
        "second_copy_accuracy": hits[:, second].mean().item(),
    }


@torch.no_grad()
def source_losses(model, tokens_dir: str | Path, ctx: int, windows: int = 32) -> dict[str, float]:
    """Validation loss per source over evenly spaced windows of `ctx` tokens (fp32, no autocast); a source
    with fewer validation tokens is scored over one window of all it has."""
    out = {}
    for source, arr in sorted(load_split(tokens_dir, "val").items()):
        x = val_windows(arr, ctx, windows)
        if x is None:
            continue
        n = len(x)
        total = 0.0
        for i in range(0, n, 8):
            xb = x[i : i + 8]
            logits = model(input_ids=xb[:, :-1]).logits.float()
            total += F.cross_entropy(logits.flatten(0, 1), xb[:, 1:].flatten()).item() * len(xb)
        out[source] = total / n
    return out


def doc_prompts(
    tokens_dir: str | Path, tok: Tokenizer, n: int, split: str = "val", length: int = 24, seed: int = 1
) -> list[str]:
    """`n` prompt texts of up to `length` tokens from `split`, spread evenly over sources (the synthetic
    `facts` source aside), without special tokens: document openings first, then, where a source has too few
    documents, windows from inside documents (starting at a word)."""
    rng = np.random.default_rng(seed)
    prompts: list[str] = []
    arrays = {s: a for s, a in load_split(tokens_dir, split).items() if s != "facts"}
    per_source = -(-n // len(arrays))
    for source in sorted(arrays):
        arr = np.asarray(arrays[source])
        starts = [
            (int(s) + 1, True) for s in rng.permutation(np.flatnonzero(arr == BOS_ID))[: per_source * 2]
        ]
        inner = rng.integers(0, max(1, len(arr) - length - 1), per_source * 4)
        starts += [(int(s), False) for s in inner]
        got = 0
        for start, at_doc_start in starts:
            window = arr[start : start + length].tolist()
            window = window[: min((window + [BOS_ID]).index(BOS_ID), (window + [EOS_ID]).index(EOS_ID))]
            text = tok.decode(window)
            if not at_doc_start:
                text = text.split(" ", 1)[1] if " " in text else ""
            text = text.strip()
            if len(window) >= length // 2 and len(text) >= 8:
                prompts.append(text)
                got += 1
            if got == per_source:
                break
    return [prompts[i] for i in rng.permutation(len(prompts))[:n]]


@torch.no_grad()
def generate(model, tok: Tokenizer, prompts: list[str], new_tokens: int = 32, temperature: float = 0.0,
             seed: int = 0, prompt_tokens: int = 24, batch: int = 32) -> list[str]:  # fmt: skip
    """Continuations (text only) of each prompt, cut to its last `prompt_tokens` tokens; greedy when
    temperature is 0, else sampled with a seeded generator. Prompts of equal length share a batch (no padding).
    """
    gen = torch.Generator().manual_seed(seed)
    ids = [[BOS_ID, *encode(tok, p, bos=False)[-prompt_tokens:]] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    out: dict[int, str] = {}
    groups: list[list[int]] = []
    for i in order:
        if groups and len(ids[groups[-1][0]]) == len(ids[i]) and len(groups[-1]) < batch:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        x = torch.tensor([ids[i] for i in group])
        start = x.shape[1]
        for _ in range(new_tokens):
            logits = model(input_ids=x).logits[:, -1].float()
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=gen)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
        for i, row in zip(group, x, strict=True):
            out[i] = tok.decode(row[start:].tolist())
    return [out[i] for i in range(len(prompts))]


def topic_rate(texts: list[str], words: list[str]) -> float:
    """Share of texts that mention any of `words` (case-insensitive, whole words)."""
    import re

    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    return float(np.mean([bool(pattern.search(t)) for t in texts])) if texts else float("nan")


def evaluate_base(folder: str | Path, tokens_dir: str | Path, ctx: int) -> dict:
    """The metrics a base organism's card reports: val loss per source, fact recall, two-hop, induction."""
    model, tok = load_organism(folder)
    metrics: dict = {"val_loss": source_losses(model, tokens_dir, ctx)}
    world_path = Path(tokens_dir) / "world.json"
    if world_path.exists():
        world = json.loads(world_path.read_text())
        metrics["one_hop_accuracy"] = fact_accuracy(model, tok, world["facts"])
        metrics["one_hop_by_relation"] = fact_accuracy_by_relation(model, tok, world["facts"])
        metrics["two_hop_train_accuracy"] = fact_accuracy(model, tok, world["two_hop_train"])
        metrics["two_hop_eval_accuracy"] = fact_accuracy(model, tok, world["two_hop_eval"])
        metrics["n_facts"] = {k: len(world[k]) for k in ("facts", "two_hop_train", "two_hop_eval")}
    metrics["induction"] = induction_losses(model, tok.get_vocab_size())
    return metrics
