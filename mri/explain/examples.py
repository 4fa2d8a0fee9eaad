"""A feature's examples as explainers and scorers see them: explain-split evidence and score-split tests.

`feature_view` is the only door from an atlas into `mri.explain`, and it enforces the split: `explain` holds
only examples whose context hashes to the explain side, `activating` and `non_activating` only those on the
score side (see `mri.atlas.split`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mri.atlas.reader import Atlas
from mri.atlas.split import EXPLAIN, SCORE

HIGHLIGHT_FRACTION = 0.3
"""A token is highlighted when its activation exceeds this fraction of its example's maximum."""


@dataclass
class Example:
    """One window of text with per-token activations (special tokens such as BOS removed)."""

    tokens: list[str]
    acts: list[float]
    context: int
    kind: str
    """top | quantile | random (non-activating)."""
    split: str

    @property
    def max_act(self) -> float:
        return max(self.acts, default=0.0)

    @property
    def active(self) -> bool:
        return self.max_act > 0

    @property
    def peak(self) -> int:
        """Index of the strongest token."""
        return max(range(len(self.acts)), key=self.acts.__getitem__) if self.acts else 0

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def marked(self, fraction: float = HIGHLIGHT_FRACTION) -> list[bool]:
        """Which tokens count as firing (activation above `fraction` of the maximum)."""
        top = self.max_act
        return [top > 0 and a > fraction * top for a in self.acts]

    def highlighted(self, marks: list[bool] | None = None) -> str:
        """The text with runs of firing tokens wrapped in <<...>>."""
        marks = self.marked() if marks is None else marks
        out, inside = [], False
        for tok, on in zip(self.tokens, marks, strict=True):
            if on and not inside:
                out.append("<<")
            if not on and inside:
                out.append(">>")
            out.append(tok)
            inside = on
        if inside:
            out.append(">>")
        return "".join(out)


@dataclass
class FeatureView:
    """What an explainer may read (`explain`, logit effects) and what a scorer tests on (score split)."""

    feature: int
    density: float
    explain: list[Example]
    """Activating examples from explain-split contexts: top first, then quantile-sampled."""
    activating: list[Example]
    """Activating examples from score-split contexts."""
    non_activating: list[Example]
    """Non-activating examples from score-split contexts."""
    promoted: list[str] = field(default_factory=list)
    """Tokens whose logits the feature raises most (directly)."""
    suppressed: list[str] = field(default_factory=list)

    @property
    def explain_contexts(self) -> list[int]:
        return sorted({e.context for e in self.explain})

    @property
    def score_contexts(self) -> list[int]:
        return sorted({e.context for e in self.activating + self.non_activating})


def _example(row: dict[str, Any], special: set[int], vocab_decode) -> Example:
    keep = [i for i, t in enumerate(row["token_ids"]) if t not in special]
    return Example(
        tokens=vocab_decode([row["token_ids"][i] for i in keep]),
        acts=[float(row["acts"][i]) for i in keep],
        context=int(row["context"]),
        kind=row["kind"],
        split=row["split"],
    )


def feature_view(atlas: Atlas, feature: int, *, max_explain: int | None = None) -> FeatureView:
    """Split-separated examples of `feature` (see the module docstring)."""
    info = atlas.feature(feature, examples=False)
    special = set(atlas.manifest.get("special_token_ids", []))
    rows = atlas.examples(feature)
    explain, activating, quiet = [], [], []
    for r in rows:
        ex = _example(r, special, atlas.decode)
        if r["split"] == EXPLAIN and r["kind"] != "random" and ex.active:
            explain.append(ex)
        elif r["split"] == SCORE:
            (quiet if r["kind"] == "random" else activating).append(ex)
    return FeatureView(
        feature=int(feature),
        density=float(info["density"]),
        explain=explain[:max_explain] if max_explain else explain,
        activating=[e for e in activating if e.active],
        non_activating=[e for e in quiet if not e.active],
        promoted=[
            t
            for i, t in zip(info["logit_pos_ids"], info["logit_pos_tokens"], strict=True)
            if i not in special
        ],
        suppressed=[
            t
            for i, t in zip(info["logit_neg_ids"], info["logit_neg_tokens"], strict=True)
            if i not in special
        ],
    )
