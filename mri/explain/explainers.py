"""Explainers: turn a feature's explain-split examples into a label (offline, or with an LLM)."""

from __future__ import annotations

from typing import NamedTuple

from mri.explain import prompts
from mri.explain.clients import ChatClient
from mri.explain.examples import FeatureView
from mri.explain.offline import offline_label


class Explanation(NamedTuple):
    """A label and what it cost to write."""

    label: str | None
    """None when the explainer's reply could not be read: no label rather than the raw reply."""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    malformed: bool = False
    """The reply was malformed (not the protocol's reply, or no explanation in it); counted in the report."""


class OfflineExplainer:
    """Deterministic, no network: the feature's peak tokens, what precedes them, and what it promotes."""

    name = "offline"
    model = None

    def explain(self, view: FeatureView) -> Explanation:
        return Explanation(offline_label(view))


class LLMExplainer:
    """Asks a chat model for a one-phrase description from highlighted examples and promoted tokens."""

    def __init__(self, client: ChatClient, max_examples: int = 20):
        self.client = client
        self.max_examples = max_examples
        self.name = client.provider
        self.model = client.model

    def explain(self, view: FeatureView) -> Explanation:
        if not view.explain:
            return Explanation("never fired on the explain split")
        reply = self.client.complete(
            prompts.EXPLAIN_SYSTEM,
            prompts.explain_prompt(view, self.max_examples),
            check=lambda text: prompts.parse_explanation(text) is not None,
        )
        label = None if reply.malformed else prompts.parse_explanation(reply.text)
        return Explanation(label, reply.input_tokens, reply.output_tokens, reply.cost_usd, label is None)
