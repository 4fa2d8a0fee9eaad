"""Scorers: how well a label predicts where its feature fires, on score-split examples only.

Each scorer reads a `FeatureView`'s `activating` and `non_activating` examples (score-split contexts, never
shown to an explainer) and returns a `Score` with a 95% bootstrap confidence interval over examples.

- match-simulation (offline): predict each token's activation from the tokens the label names (see
  `mri.explain.offline`); Pearson correlation with the true activations over all tokens.
- match-detection (offline): an example is predicted active when it holds a named token; balanced accuracy.
- simulation (LLM): the LLM predicts 0-10 per token from the label; correlation with the true activations.
- detection (LLM): the LLM says which texts the feature fires on; balanced accuracy.
- fuzzing (LLM): the LLM says whether the marked tokens of activating texts (half marked right, half
  marked at random) are where the label says it fires; balanced accuracy.
- embedding (offline, all-MiniLM-L6-v2): cosine similarity of the label to each text; AUROC of
  activating against non-activating.

An LLM reply that cannot be read (the client's `malformed`, or no list of the right length in it) is
counted in `Score.malformed` and its examples are left out of that score: turned into zeros they would
read as "the label predicts nothing" and drag the score towards chance for a reason that is not the
label's. The counts of examples in a `Score` are those actually scored.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from mri.explain import prompts
from mri.explain.clients import ChatClient, Completion
from mri.explain.examples import Example, FeatureView
from mri.explain.offline import simulate

BOOTSTRAP = 1000


class Score(NamedTuple):
    """One scorer's verdict on one label."""

    value: float
    """The score (NaN when the feature has no score-split examples of one class)."""
    ci_low: float
    ci_high: float
    """95% bootstrap confidence interval over examples."""
    n_activating: int
    n_non_activating: int
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    malformed: int = 0
    """LLM replies that could not be read; their examples are left out of the score."""


def _interval(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return math.nan, math.nan
    return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


def correlation(
    pred: list[list[float]], true: list[list[float]], seed: int = 0
) -> tuple[float, float, float]:
    """Pearson correlation over all tokens of all examples, and its bootstrap CI (resampling examples)."""
    stats = np.array(
        [
            [
                len(p),
                sum(p),
                sum(t),
                sum(a * b for a, b in zip(p, t, strict=True)),
                sum(a * a for a in p),
                sum(b * b for b in t),
            ]
            for p, t in zip(pred, true, strict=True)
        ],
        dtype=np.float64,
    )

    def r(s: np.ndarray, undefined: float) -> np.ndarray:
        n, sx, sy, sxy, sxx, syy = s.T
        cov = sxy - sx * sy / n
        var = (sxx - sx**2 / n) * (syy - sy**2 / n)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(var > 0, cov / np.sqrt(np.maximum(var, 1e-300)), undefined)

    value = float(r(stats.sum(0, keepdims=True), 0.0)[0])  # a label that predicts nothing scores 0
    counts = np.random.default_rng(seed).multinomial(
        len(stats), np.full(len(stats), 1 / len(stats)), size=BOOTSTRAP
    )
    return (value, *_interval(r(counts @ stats, np.nan)))  # resamples without variance are left out


def balanced_accuracy(
    positive: np.ndarray, predicted: np.ndarray, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of the true-positive and true-negative rates, and its bootstrap CI (stratified by class)."""
    positive, predicted = np.asarray(positive, bool), np.asarray(predicted, bool)
    hit = positive == predicted
    pos, neg = hit[positive].astype(float), hit[~positive].astype(float)
    if not len(pos) or not len(neg):
        return math.nan, math.nan, math.nan  # one class left: accuracy over it says nothing balanced
    value = 0.5 * (pos.mean() + neg.mean())
    rng = np.random.default_rng(seed)
    boot = 0.5 * (
        rng.choice(pos, (BOOTSTRAP, len(pos))).mean(1) + rng.choice(neg, (BOOTSTRAP, len(neg))).mean(1)
    )
    return (float(value), *_interval(boot))


def auroc(pos: np.ndarray, neg: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Probability that an activating example outscores a non-activating one (ties count half), with a
    stratified bootstrap CI."""

    def area(p: np.ndarray, q: np.ndarray) -> float:
        diff = p[:, None] - q[None, :]
        return float(((diff > 0) + 0.5 * (diff == 0)).mean())

    rng = np.random.default_rng(seed)
    boot = np.array(
        [area(rng.choice(pos, len(pos)), rng.choice(neg, len(neg))) for _ in range(BOOTSTRAP // 4)]
    )
    return (area(np.asarray(pos), np.asarray(neg)), *_interval(boot))


def _empty(view: FeatureView) -> Score | None:
    if view.activating and view.non_activating:
        return None
    return Score(math.nan, math.nan, math.nan, len(view.activating), len(view.non_activating))


def _reads_list(n: int, hi: float = 1.0) -> Callable[[str], bool]:
    """Whether a reply holds a list of n numbers (the client's `check`: an unreadable reply is not cached)."""
    return lambda text: prompts.parse_list(text, n, hi) is not None


def _usage(replies: list[Completion]) -> dict[str, Any]:
    return {
        "input_tokens": sum(r.input_tokens for r in replies),
        "output_tokens": sum(r.output_tokens for r in replies),
        "cost_usd": sum(r.cost_usd for r in replies),
    }


class Scorer:
    """Scores a label against a feature's score-split examples."""

    name = ""
    needs_client = False
    chance = 0.5
    """The score of a label that knows nothing (0 for correlations, 0.5 for balanced accuracy and AUROC)."""

    def __init__(self, client: ChatClient | None = None, *, max_examples: int = 20, seed: int = 0):
        self.client = client
        self.max_examples = max_examples
        self.seed = seed

    def examples(self, view: FeatureView) -> tuple[list[Example], list[Example]]:
        """At most `max_examples` activating and as many non-activating score-split examples."""
        return view.activating[: self.max_examples], view.non_activating[: self.max_examples]

    def score(self, label: str, view: FeatureView) -> Score:
        raise NotImplementedError


class MatchSimulation(Scorer):
    name = "match-simulation"
    chance = 0.0

    def score(self, label: str, view: FeatureView) -> Score:
        if (empty := _empty(view)) is not None:
            return empty
        pos, neg = self.examples(view)
        exs = pos + neg
        value, lo, hi = correlation([simulate(label, e) for e in exs], [e.acts for e in exs], self.seed)
        return Score(value, lo, hi, len(pos), len(neg))


class MatchDetection(Scorer):
    name = "match-detection"

    def score(self, label: str, view: FeatureView) -> Score:
        if (empty := _empty(view)) is not None:
            return empty
        pos, neg = self.examples(view)
        predicted = [any(v > 0 for v in simulate(label, e)) for e in pos + neg]
        value, lo, hi = balanced_accuracy(
            np.array([True] * len(pos) + [False] * len(neg)), np.array(predicted), self.seed
        )
        return Score(value, lo, hi, len(pos), len(neg))


class Simulation(Scorer):
    name = "simulation"
    chance = 0.0
    needs_client = True

    def score(self, label: str, view: FeatureView) -> Score:
        if (empty := _empty(view)) is not None:
            return empty
        pos, neg = self.examples(view)
        exs = pos + neg
        replies = self.client.complete_many(
            [(prompts.SIMULATE_SYSTEM, prompts.simulate_prompt(label, e)) for e in exs],
            [_reads_list(len(e.tokens), 10.0) for e in exs],
        )
        read = [
            None if r.malformed else prompts.parse_list(r.text, len(e.tokens), hi=10.0)
            for r, e in zip(replies, exs, strict=True)
        ]
        ok = [i for i, p in enumerate(read) if p is not None]
        n_pos = sum(i < len(pos) for i in ok)
        bad = len(exs) - len(ok)
        if not n_pos or n_pos == len(ok):
            return Score(
                math.nan, math.nan, math.nan, n_pos, len(ok) - n_pos, **_usage(replies), malformed=bad
            )
        pred = [read[i] for i in ok]
        value, lo, hi = correlation(pred, [exs[i].acts for i in ok], self.seed)  # type: ignore[arg-type]
        return Score(value, lo, hi, n_pos, len(ok) - n_pos, **_usage(replies), malformed=bad)


class Detection(Scorer):
    name = "detection"
    needs_client = True

    def __init__(self, client: ChatClient | None = None, *, batch: int = 5, **kwargs: Any):
        super().__init__(client, **kwargs)
        self.batch = batch

    def _ask(
        self, system: str, label: str, texts: list[str]
    ) -> tuple[list[bool | None], list[Completion], int]:
        """Batched yes/no questions about `texts`: (answer per text, None where its batch's reply could not
        be read; the replies; how many replies could not be read)."""
        chunks = [texts[i : i + self.batch] for i in range(0, len(texts), self.batch)]
        replies = self.client.complete_many(
            [(system, prompts.numbered_prompt(label, c)) for c in chunks],
            [_reads_list(len(c)) for c in chunks],
        )
        answers: list[bool | None] = []
        bad = 0
        for reply, chunk in zip(replies, chunks, strict=True):
            got = None if reply.malformed else prompts.parse_list(reply.text, len(chunk))
            if got is None:
                bad += 1
                answers += [None] * len(chunk)
            else:
                answers += [v >= 0.5 for v in got]
        return answers, replies, bad

    def _verdict(
        self, truth: list[bool], answers: list[bool | None], replies: list[Completion], bad: int
    ) -> Score:
        """Balanced accuracy over the texts whose answer could be read (NaN when a class has none left)."""
        keep = [i for i, a in enumerate(answers) if a is not None]
        t = np.array([truth[i] for i in keep], dtype=bool)
        a = np.array([answers[i] for i in keep], dtype=bool)
        value, lo, hi = balanced_accuracy(t, a, self.seed)
        return Score(value, lo, hi, int(t.sum()), int((~t).sum()), **_usage(replies), malformed=bad)

    def score(self, label: str, view: FeatureView) -> Score:
        if (empty := _empty(view)) is not None:
            return empty
        pos, neg = self.examples(view)
        items = [(e.text, True) for e in pos] + [(e.text, False) for e in neg]
        random.Random(self.seed).shuffle(items)
        answers, replies, bad = self._ask(prompts.DETECT_SYSTEM, label, [t for t, _ in items])
        return self._verdict([p for _, p in items], answers, replies, bad)


class Fuzzing(Detection):
    name = "fuzzing"

    def score(self, label: str, view: FeatureView) -> Score:
        pos, _ = self.examples(view)
        if len(pos) < 2:
            return Score(math.nan, math.nan, math.nan, len(pos), 0)
        rng = random.Random(self.seed)
        items = []
        for i, ex in enumerate(pos):
            marks = ex.marked()
            right = i % 2 == 0
            if not right:
                off = [j for j, m in enumerate(marks) if not m]
                wrong = set(rng.sample(off, min(max(sum(marks), 1), len(off))))
                marks = [j in wrong for j in range(len(marks))]
            items.append((ex.highlighted(marks), right))
        rng.shuffle(items)
        answers, replies, bad = self._ask(prompts.FUZZ_SYSTEM, label, [t for t, _ in items])
        return self._verdict([r for _, r in items], answers, replies, bad)


class EmbeddingScorer(Scorer):
    name = "embedding"

    def __init__(
        self,
        client: ChatClient | None = None,
        *,
        embed: Callable[[list[str]], np.ndarray] | None = None,
        **kwargs: Any,
    ):
        super().__init__(client, **kwargs)
        if embed is None:
            from mri.explain.embedding import embed_texts

            embed = embed_texts
        self.embed = embed

    def score(self, label: str, view: FeatureView) -> Score:
        if (empty := _empty(view)) is not None:
            return empty
        pos, neg = self.examples(view)
        vectors = self.embed([label] + [e.text for e in pos + neg])
        sims = vectors[1:] @ vectors[0]
        value, lo, hi = auroc(sims[: len(pos)], sims[len(pos) :], self.seed)
        return Score(value, lo, hi, len(pos), len(neg))


SCORERS: dict[str, type[Scorer]] = {
    s.name: s for s in (MatchSimulation, MatchDetection, Simulation, Detection, Fuzzing, EmbeddingScorer)
}
