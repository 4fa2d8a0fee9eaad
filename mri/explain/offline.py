"""The offline explainer, and the offline scorers that read its labels back: no network, deterministic.

The explainer counts which token each explain-split example peaks on, what comes right before it, and
which tokens the feature promotes, and writes that down in words:

    fires on " Paris" (78% of top activations), mostly after " capital of"; promotes " France", " French"

Token texts are written as JSON strings, so `label_tokens` can read them back exactly; the match scorers
simulate a feature from a label by predicting activation on exactly those tokens.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from mri.explain.examples import Example, FeatureView

_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def _quote(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)


def _printable(token: str) -> bool:
    return bool(token.strip()) and token.isprintable() and "\ufffd" not in token


def offline_label(view: FeatureView, *, max_tokens: int = 3, coverage: float = 0.8) -> str:
    """A plain-words description of the feature from its explain-split examples and logit effects."""
    if not view.explain:
        return "never fired on the explain split"
    peaks = Counter(e.tokens[e.peak] for e in view.explain)
    total = sum(peaks.values())
    named: list[tuple[str, float]] = []
    covered = 0.0
    for tok, n in peaks.most_common(max_tokens):
        named.append((tok, n / total))
        covered += n / total
        if covered >= coverage:
            break
    if len(named) == 1:
        parts = [f"fires on {_quote(named[0][0])} ({named[0][1]:.0%} of top activations)"]
    else:
        listed = ", ".join(f"{_quote(t)} ({s:.0%})" for t, s in named)
        parts = [f"fires on {listed} of top activations"]
    before = _common_context(view.explain, named[0][0])
    if before:
        parts[0] += f", mostly after {_quote(before)}"
    promoted = [t for t in view.promoted if _printable(t)][:3]
    if promoted:
        parts.append("promotes " + ", ".join(_quote(t) for t in promoted))
    return "; ".join(parts)


def _common_context(examples: list[Example], token: str, min_share: float = 0.5) -> str | None:
    """The longest text (one or two tokens) that precedes `token` in at least `min_share` of its peaks."""
    hits = [e for e in examples if e.tokens[e.peak] == token and e.peak > 0]
    if len(hits) < 2:
        return None
    for width in (2, 1):
        ctx = Counter("".join(e.tokens[max(e.peak - width, 0) : e.peak]) for e in hits if e.peak >= width)
        if ctx:
            text, n = ctx.most_common(1)[0]
            if n / len(hits) >= min_share and text.strip():
                return text
    return None


def label_tokens(label: str) -> dict[str, float]:
    """Token texts a label says the feature fires on, with their share (1.0 when none is given)."""
    head = label.split(";", 1)[0]
    if not head.startswith("fires on"):
        return {}
    head = head.split(", mostly after", 1)[0]
    out: dict[str, float] = {}
    for m in _QUOTED.finditer(head):
        tail = head[m.end() :].lstrip()
        share = re.match(r"\((\d+)%", tail)
        out[json.loads(m.group())] = int(share.group(1)) / 100 if share else 1.0
    return out


def simulate(label: str, example: Example) -> list[float]:
    """Predicted per-token activation of `example` under `label`: the share of each token the label names."""
    tokens = label_tokens(label)
    return [tokens.get(t, 0.0) for t in example.tokens]
