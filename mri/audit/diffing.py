"""Model diffing: where a model departs from its base — per-token KL on a standard prompt set, the base
dictionary's features run on both models, and words the model's own generations favour over the base's.

Everything here compares two `Model`s with the same architecture and tokenizer (`check_pair`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from mri.errors import MriError


def check_pair(model: Any, base: Any) -> None:
    """MriError unless `model` and `base` share an architecture and a tokenizer (same token ids)."""
    fix = "audit a model against the base it was fine-tuned from (same family, shape and tokenizer)"
    if model.family != base.family:
        raise MriError(f"{model.name} is a {model.family} model but {base.name} is {base.family}; {fix}")
    mine = (model.n_layers, model.d_model, int(model.config.vocab_size))
    theirs = (base.n_layers, base.d_model, int(base.config.vocab_size))
    if mine != theirs:
        raise MriError(
            f"{model.name} has (layers, d_model, vocab) {mine} but {base.name} has {theirs}: different "
            f"architectures; {fix}"
        )
    vocab_a, vocab_b = model.tokenizer.get_vocab(), base.tokenizer.get_vocab()
    if vocab_a != vocab_b or model.tokenizer.bos_token_id != base.tokenizer.bos_token_id:
        differ = sorted(set(vocab_a.items()) ^ set(vocab_b.items()))[:3]
        raise MriError(
            f"{model.name} and {base.name} use different tokenizers (e.g. {differ}); their next-token "
            f"distributions cannot be compared; {fix}"
        )


def standard_prompts(n: int, words: int = 12, skip: int = 0) -> list[str]:
    """`n` openings of documents of the shipped corpus sample (the audit's standard prompt set); `skip`
    draws a disjoint set from further along the corpus."""
    from mri.steer import neutral_prompts

    return neutral_prompts(n + skip, words=words)[skip:]


def padded(model: Any, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (batch, width): rows padded on the right (causal models ignore what follows)."""
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id
    ids = torch.full((len(rows), width), 0 if pad is None else int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def encode(model: Any, text: str, bos: bool = True) -> list[int]:
    """Token ids of `text`, BOS first when asked and the tokenizer has one."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos_id = model.tokenizer.bos_token_id
    return [bos_id, *ids] if bos and bos_id is not None else list(ids)


@torch.no_grad()
def log_probs(model: Any, ids: torch.Tensor, **run: Any) -> torch.Tensor:
    """(batch, pos, vocab) next-token log-probabilities in fp32."""
    return F.log_softmax(model.run(ids.to(model.device), stop=False, **run).logits.float(), -1).cpu()


@torch.no_grad()
def log_probs_at(model: Any, ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(n, vocab) next-token log-probabilities at (rows[i], pos[i]) only: the unembedding is applied to
    the final norm's output at those positions alone (no logit soft-capping)."""
    site = "ln_final.hook_normalized"
    h = model.run(ids.to(model.device), read=[site]).cache[model.resolve_site(site)]
    head = model.hf.get_output_embeddings()
    return F.log_softmax(head(h[rows, pos]).float(), -1).cpu()


def kl(base_logp: torch.Tensor, model_logp: torch.Tensor) -> torch.Tensor:
    """KL(base || model) over the last axis."""
    return (base_logp.exp() * (base_logp - model_logp)).sum(-1)


class TokenKL(NamedTuple):
    """Per-token KL(base || model) of next-token distributions over the standard prompt set."""

    mean: float
    """Mean over every predicted position."""
    quantiles: dict[str, float]
    """p50, p90, p99 and max."""
    n_tokens: int
    top: list[dict]
    """The positions of largest KL: context, token, KL, and each model's most likely next token."""


def token_kl(model: Any, base: Any, texts: Sequence[str], batch_size: int = 16, top: int = 8) -> TokenKL:
    """KL(base || model) at every position of `texts`, with the positions where the models differ most."""
    values, where = [], []
    for lo in range(0, len(texts), batch_size):
        rows = [encode(model, t) for t in texts[lo : lo + batch_size]]
        ids, mask = padded(model, rows)
        lm, lb = log_probs(model, ids), log_probs(base, ids)
        d = kl(lb, lm)
        for r, row in enumerate(rows):
            for p in range(1, len(row)):
                values.append(float(d[r, p]))
                where.append((row, p, int(lm[r, p].argmax()), int(lb[r, p].argmax())))
    t = torch.tensor(values)
    qs = {f"p{q}": float(t.quantile(q / 100)) for q in (50, 90, 99)} | {"max": float(t.max())}
    tops = []
    for i in t.argsort(descending=True)[:top].tolist():
        row, p, m_next, b_next = where[i]
        tops.append(
            {
                "context": model.tokenizer.decode(row[max(1, p - 11) : p + 1]),
                "kl": values[i],
                "model_next": model.tokenizer.decode([m_next]),
                "base_next": model.tokenizer.decode([b_next]),
            }
        )
    return TokenKL(float(t.mean()), qs, len(values), tops)


@torch.no_grad()
def last_kl(model: Any, base: Any, rows: Sequence[Sequence[int]], batch_size: int = 256) -> torch.Tensor:
    """(len(rows),) KL(base || model) of the next token after each row's last token."""
    out = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        ids, _ = padded(model, chunk)
        last = torch.tensor([len(r) - 1 for r in chunk])
        pick = torch.arange(len(chunk))
        lm = log_probs(model, ids)[pick, last]
        lb = log_probs(base, ids)[pick, last]
        out.append(kl(lb, lm))
    return torch.cat(out)


# ---- the base dictionary's features on both models -----------------------------------------------------


@torch.no_grad()
def site_values(
    model: Any, site: str, rows: Sequence[Sequence[int]], batch_size: int = 16
) -> list[torch.Tensor]:
    """Per row, the (len(row) - 1, d) values at `site` of every token after BOS."""
    out = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        ids, _ = padded(model, chunk)
        x = model.run(ids.to(model.device), read=[site]).cache[site].float().cpu()
        out.extend(x[r, 1 : len(row)] for r, row in enumerate(chunk))
    return out


def feature_acts(dictionary: Any, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each (pos, d) block encoded into (pos, n_latents) activations."""
    with torch.no_grad():
        return [dictionary.encode(v.to(next(dictionary.parameters()).device)).cpu() for v in values]


def feature_label(
    model: Any,
    dictionary: Any,
    feature: int,
    rows: Sequence[Sequence[int]] = (),
    acts: Sequence[torch.Tensor] = (),
    n: int = 3,
) -> str:
    """A short label by the offline explainer (`mri.explain.offline`): the tokens the feature fires on most
    in `rows` (with their (len(row) - 1, n_latents) activations `acts`, BOS left out) and what comes before
    them, then the tokens its decoder row promotes most through the unembedding."""
    from mri.explain.examples import Example, FeatureView
    from mri.explain.offline import offline_label

    w_u = model.hf.get_output_embeddings().weight.detach().float().cpu()
    row = dictionary.W_dec.detach().float().cpu()[feature]
    promoted = [model.tokenizer.decode([t]) for t in (w_u @ row).topk(n).indices.tolist()]
    examples = []
    for r, (ids, a) in enumerate(zip(rows, acts, strict=True)):
        col = a[:, feature]
        if col.numel() and float(col.max()) > 0:
            tokens = [model.tokenizer.decode([t]) for t in ids[1:]]
            examples.append(Example(tokens, col.tolist(), r, "top", "explain"))
    examples.sort(key=lambda e: -e.max_act)
    if not examples:
        return "promotes " + ", ".join(repr(t) for t in promoted)
    return offline_label(FeatureView(feature, 0.0, examples[:20], [], [], promoted))


def feature_examples(
    model: Any, rows: Sequence[Sequence[int]], acts: Sequence[torch.Tensor], feature: int, n: int = 3
) -> list[dict]:
    """The `n` contexts where `feature` fires most: text up to and including the token, and the value."""
    best = []
    for r, a in enumerate(acts):
        col = a[:, feature]
        if col.numel() and float(col.max()) > 0:
            p = int(col.argmax())
            best.append((float(col[p]), r, p + 1))
    best.sort(reverse=True)
    return [
        {"context": model.tokenizer.decode(list(rows[r][max(1, p - 11) : p + 1])), "activation": v}
        for v, r, p in best[:n]
    ]


class FeatureShift(NamedTuple):
    """One dictionary feature whose firing differs between the model and its base on the same tokens."""

    feature: int
    mean_model: float
    mean_base: float
    freq_model: float
    """Share of tokens it fires on in the model."""
    freq_base: float
    label: str
    examples: list[dict]
    """Contexts where it fires most in the model."""

    @property
    def delta(self) -> float:
        return self.mean_model - self.mean_base


def feature_shifts(
    model: Any, base: Any, dictionary: Any, rows: Sequence[Sequence[int]], top: int = 10
) -> list[FeatureShift]:
    """The base dictionary run on both models' activations at its site over `rows`: features ranked by the
    change of their mean activation, largest first (both directions)."""
    site = model.resolve_site(dictionary.cfg.sites_in[0])
    acts_model = feature_acts(dictionary, site_values(model, site, rows))
    am = torch.cat(acts_model)
    ab = torch.cat(feature_acts(dictionary, site_values(base, site, rows)))
    delta = am.mean(0) - ab.mean(0)
    scale = ab.std(0) + am.std(0) + 1e-3
    order = (delta.abs() / scale).argsort(descending=True)[:top].tolist()
    return [
        FeatureShift(
            f,
            float(am[:, f].mean()),
            float(ab[:, f].mean()),
            float((am[:, f] > 0).float().mean()),
            float((ab[:, f] > 0).float().mean()),
            feature_label(model, dictionary, f, rows, acts_model),
            feature_examples(model, rows, acts_model, f),
        )
        for f in order
    ]


# ---- what the model's own generations favour -----------------------------------------------------------

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{2,}")


def words_of(text: str) -> set[str]:
    """The lower-cased words (3+ letters) of a text."""
    return {w.lower() for w in _WORD.findall(text)}


class WordShift(NamedTuple):
    """A word the model's continuations use more often than the base's, over the same prompts."""

    word: str
    rate_model: float
    """Share of the model's continuations that hold the word."""
    rate_base: float
    surprisal: float = 1.0
    """Mean surprisal (nats) of the word under the base, in the contexts where the model says it."""

    @property
    def score(self) -> float:
        """The rate shift weighted by surprisal: how much unexpected content the shift brings."""
        return (self.rate_model - self.rate_base) * self.surprisal


def word_shifts(
    model_texts: Sequence[str],
    base_texts: Sequence[str],
    top: int = 8,
    surprisal: dict[str, float] | None = None,
) -> list[WordShift]:
    """Words ranked by how much more often the model's continuations use them than the base's (each
    continuation counted once), weighted by their `surprisal` (1 for a word it does not hold), keeping
    those at least three times as frequent (add-one smoothed)."""
    n = len(model_texts)
    cm = Counter(w for t in model_texts for w in words_of(t))
    cb = Counter(w for t in base_texts for w in words_of(t))
    weight = surprisal or {}
    shifts = [
        WordShift(w, cm[w] / n, cb[w] / max(len(base_texts), 1), weight.get(w, 1.0))
        for w in cm
        if (cm[w] + 1) / (cb[w] + 1) >= 3
    ]
    shifts.sort(key=lambda s: (s.score, s.word), reverse=True)
    return shifts[:top]


def word_spans(model: Any, prompt: str, text: str) -> tuple[list[int], list[tuple[str, list[int]]]]:
    """(row, words): `prompt + text` encoded (BOS first) and each word of `text` (lower-cased, as in
    `words_of`) with the row positions of the tokens that spell it."""
    enc = model.tokenizer(prompt + text, add_special_tokens=False, return_offsets_mapping=True)
    bos = model.tokenizer.bos_token_id
    head = [] if bos is None else [bos]
    out = []
    for m in _WORD.finditer(text):
        a, b = m.start() + len(prompt), m.end() + len(prompt)
        where = [len(head) + j for j, (s, e) in enumerate(enc["offset_mapping"]) if e > a and s < b]
        out.append((m.group().lower(), where))
    return [*head, *enc["input_ids"]], out


@torch.no_grad()
def word_surprisal(base: Any, prompts: Sequence[str], texts: Sequence[str]) -> dict[str, float]:
    """Each word of the continuations `texts` (of `prompts`) with its mean surprisal under `base` where it
    occurs: -log p summed over the word's tokens, in nats. Words that carry content the base did not
    expect (a topic) score high; words the base predicts from the words before them (the rest of a fixed
    sentence) score low."""
    spans = [word_spans(base, p, t) for p, t in zip(prompts, texts, strict=True)]
    ids, _ = padded(base, [row for row, _ in spans])
    lp = log_probs(base, ids)
    seen: dict[str, list[float]] = {}
    for r, (row, words) in enumerate(spans):
        for word, where in words:
            seen.setdefault(word, []).append(-sum(float(lp[r, p - 1, row[p]]) for p in where))
    return {w: sum(v) / len(v) for w, v in seen.items()}


def rate_with_any(texts: Sequence[str], words: Sequence[str]) -> float:
    """Share of texts that hold any of `words` (as whole lower-cased words)."""
    want = {w.lower() for w in words}
    return sum(bool(words_of(t) & want) for t in texts) / max(len(texts), 1)
