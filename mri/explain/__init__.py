"""Explainers (offline and LLM-backed), scorers with bootstrap confidence intervals, and LLM clients."""

from mri.explain.clients import AnthropicClient, ChatClient, OpenAIClient, ResponseCache, make_client
from mri.explain.examples import Example, FeatureView, feature_view
from mri.explain.explainers import Explanation, LLMExplainer, OfflineExplainer
from mri.explain.run import explain_atlas
from mri.explain.scorers import SCORERS, Score

__all__ = [
    "SCORERS",
    "AnthropicClient",
    "ChatClient",
    "Example",
    "Explanation",
    "FeatureView",
    "LLMExplainer",
    "OfflineExplainer",
    "OpenAIClient",
    "ResponseCache",
    "Score",
    "explain_atlas",
    "feature_view",
    "make_client",
]
