"""Prompts for the LLM explainer and scorers, and the parsing of their replies."""

from __future__ import annotations

import json
import re

from mri.explain.examples import Example, FeatureView

EXPLAIN_SYSTEM = (
    "You are an interpretability researcher naming the features of a language model. You see short texts in "
    "which the tokens where one feature is active are marked <<like this>>, and the tokens whose logits the "
    "feature raises. Describe in one short phrase what the feature responds to: which tokens or concepts, and "
    "in what contexts. End your reply with one line of the form\nExplanation: <your description>"
)
DETECT_SYSTEM = (
    "You test descriptions of language-model features. Given a description and numbered texts, decide for each "
    "text whether the feature described is active on some token of it. Reply with only a JSON list of 0s and "
    "1s, one per text, in order."
)
FUZZ_SYSTEM = (
    "You test descriptions of language-model features. Each numbered text has some tokens marked <<like "
    "this>>. Decide for each text whether the marked tokens are exactly where the feature described would be "
    "active. Reply with only a JSON list of 0s and 1s (1: the marks are right), one per text, in order."
)
SIMULATE_SYSTEM = (
    "You predict how strongly a language-model feature activates on each token of a text, from a "
    "description of the feature. Reply with only a JSON list of integers from 0 (inactive) to 10 (maximal), "
    "one per token, in order."
)


def one_line(text: str) -> str:
    """Newlines shown as ↵, so each numbered example stays on one line of the prompt."""
    return text.replace("\r", "").replace("\n", "↵")


def explain_prompt(view: FeatureView, max_examples: int = 20) -> str:
    lines = [f"Examples of feature {view.feature}:"]
    for i, ex in enumerate(view.explain[:max_examples], 1):
        lines.append(f"{i}. {one_line(ex.highlighted())}")
    if view.promoted:
        lines.append(
            "Tokens it promotes: " + ", ".join(json.dumps(t, ensure_ascii=False) for t in view.promoted[:10])
        )
    return "\n".join(lines)


MAX_LABEL_CHARS = 300


def parse_explanation(reply: str) -> str | None:
    """The text after the last 'Explanation:'; else the whole reply when it is one short line (a model that
    answered with just the phrase); else None.

    None, not a guess: the last line of a reply that rambles without the asked-for line, or an error page,
    would become a label that scorers then score as if the model had meant it."""
    found = [f.strip() for f in re.findall(r"Explanation:\s*(.+)", reply) if f.strip()]
    if found:
        return found[-1][:MAX_LABEL_CHARS]
    if "Explanation:" in reply:  # the line was there, empty
        return None
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    if len(lines) == 1 and len(lines[0]) <= MAX_LABEL_CHARS and not lines[0].startswith(("<", "{", "[")):
        return lines[0]
    return None


def numbered_prompt(label: str, texts: list[str]) -> str:
    """The description, then the texts numbered from 1 (detection and fuzzing)."""
    lines = [f"Description: {label}", ""]
    lines += [f"{i}. {one_line(t)}" for i, t in enumerate(texts, 1)]
    return "\n".join(lines)


def simulate_prompt(label: str, example: Example) -> str:
    tokens = json.dumps(example.tokens, ensure_ascii=False)
    return f"Description: {label}\nTokens ({len(example.tokens)}): {tokens}"


def parse_list(reply: str, n: int, hi: float = 1.0) -> list[float] | None:
    """The first JSON list of n numbers in the reply, clipped to [0, hi]; None when there is none."""
    for m in re.finditer(r"\[[^\[\]]*\]", reply):
        try:
            values = json.loads(m.group())
        except json.JSONDecodeError:
            continue
        if isinstance(values, list) and len(values) == n and all(isinstance(v, (int, float)) for v in values):
            return [min(max(float(v), 0.0), hi) for v in values]
    return None
