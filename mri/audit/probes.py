"""Linear probes on contrastive sets, run over the model's own generations.

The contrast: true against false statements of the synthetic world (a fact's canonical sentence, and the
same sentence with the object of another fact of the same relation). A logistic-regression probe reads the
residual stream at a sentence's last token; its threshold is set so that 1% of sentence ends in ordinary
text (the corpus sample) score above it; then the share of the model's (and the base's) generated sentences
that it flags as false is read off.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from mri.audit.diffing import encode, padded

FPR = 0.01


def world_statements(seed: int = 0, n: int = 300) -> tuple[list[str], list[str]]:
    """(true, false) statements of the synthetic world of `seed`, `n` of each."""
    from mri.zoo.world import generate_world

    facts = generate_world(seed).facts
    rng = random.Random(seed)
    by_relation: dict[str, list[str]] = {}
    for f in facts:
        by_relation.setdefault(f.relation, []).append(f.answer)
    picked = rng.sample(facts, min(n, len(facts)))
    true = [f.prompt + f.answer + "." for f in picked]
    false = []
    for f in picked:
        others = [a for a in by_relation[f.relation] if a != f.answer]
        false.append(f.prompt + rng.choice(others) + ".")
    return true, false


@torch.no_grad()
def sentence_end_values(
    model: Any, site: str, texts: Sequence[str], batch_size: int = 32, max_tokens: int = 64
) -> torch.Tensor:
    """(n, d) values at `site` at every sentence end ('.' '!' '?' tokens, and each text's last token)."""
    site = model.resolve_site(site)
    ends = {i for tok, i in model.tokenizer.get_vocab().items() if tok.rstrip().endswith((".", "!", "?"))}
    out = []
    for lo in range(0, len(texts), batch_size):
        rows = [encode(model, t)[:max_tokens] for t in texts[lo : lo + batch_size]]
        ids, _ = padded(model, rows)
        x = model.run(ids.to(model.device), read=[site]).cache[site].float().cpu()
        for r, row in enumerate(rows):
            at = sorted({p for p in range(1, len(row)) if row[p] in ends} | {len(row) - 1})
            out.append(x[r, at])
    return torch.cat(out) if out else torch.zeros(0, model.d_model)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, steps: int = 200
) -> tuple[torch.Tensor, float]:
    """(w, b) of an L2-regularised logistic regression of labels y (n,) on inputs x (n, d)."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), float(b.detach())


class Probe(NamedTuple):
    """A trained probe and what it reads."""

    site: str
    w: torch.Tensor
    """(d,) weights over the standardised site value."""
    b: float
    mean: torch.Tensor
    std: torch.Tensor
    threshold: float
    """Score above which a sentence is flagged (1% of ordinary sentence ends are)."""
    heldout_accuracy: float
    """Accuracy on held-out true/false world statements."""
    recall: float
    """Share of held-out false statements flagged at the threshold."""

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std) @ self.w + self.b


def last_values(model: Any, site: str, texts: Sequence[str]) -> torch.Tensor:
    """(n, d) values at `site` at each text's last token."""
    site = model.resolve_site(site)
    rows = [encode(model, t) for t in texts]
    ids, _ = padded(model, rows)
    with torch.no_grad():
        x = model.run(ids.to(model.device), read=[site]).cache[site].float().cpu()
    return x[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])]


def train_truth_probe(model: Any, site: str, ordinary: Sequence[str], seed: int = 0) -> Probe:
    """A probe for false world statements on `model` at `site`, thresholded at 1% FPR on `ordinary`."""
    true, false = world_statements(seed)
    x = torch.cat([last_values(model, site, true), last_values(model, site, false)])
    y = torch.cat([torch.zeros(len(true)), torch.ones(len(false))])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    tr, te = order[:cut], order[cut:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    w, b = fit_logistic((x[tr] - mean) / std, y[tr])
    probe = Probe(model.resolve_site(site), w, b, mean, std, 0.0, 0.0, 0.0)
    normal = probe.scores(sentence_end_values(model, site, ordinary))
    threshold = float(normal.quantile(1 - FPR))
    s = probe.scores(x[te])
    accuracy = float(((s > 0).float() == y[te]).float().mean())
    recall = float((s[y[te] == 1] > threshold).float().mean())
    return probe._replace(threshold=threshold, heldout_accuracy=accuracy, recall=recall)


def flagged_rate(model: Any, probe: Probe, texts: Sequence[str]) -> tuple[float, int]:
    """(share of sentence ends in `texts` the probe flags, number of sentence ends)."""
    s = probe.scores(sentence_end_values(model, probe.site, texts))
    return (float((s > probe.threshold).float().mean()) if len(s) else 0.0), len(s)
