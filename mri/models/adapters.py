"""Per-family adapters: where each family keeps its blocks, norms, attention and MLP modules.

An adapter only *locates* modules; the model's own forward pass always runs unchanged. A new family is one
entry in `ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mri.errors import MriError


@dataclass(frozen=True)
class Adapter:
    """Module paths for one family. Paths under a block are relative to that block."""

    family: str
    model_types: tuple[str, ...]
    blocks: str
    """The ModuleList of transformer blocks."""
    embed: str
    """Token embedding module (its output is `hook_embed`)."""
    final_norm: str
    """Final norm before the unembedding (its output is `ln_final.hook_normalized`)."""
    attn: str
    """Module whose output is exactly what the attention sub-layer adds to the residual stream."""
    attn_core: str
    """The attention module itself (its second output is the pattern under eager attention)."""
    mlp: str
    """The MLP module; its input is `hook_mlp_in`."""
    mlp_out: str
    """Module whose output is exactly what the MLP sub-layer adds to the residual stream."""
    parallel_attr: str | None = None
    """Config attribute that, when true, makes attention and MLP read the same residual (no resid_mid)."""

    def is_parallel(self, config) -> bool:
        return bool(self.parallel_attr and getattr(config, self.parallel_attr, False))


_LLAMA_LIKE = dict(
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    attn="self_attn",
    attn_core="self_attn",
    mlp="mlp",
    mlp_out="mlp",
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        family="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        attn="attn",
        attn_core="attn",
        mlp="mlp",
        mlp_out="mlp",
    ),
    Adapter(
        family="gpt_neox",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        attn="post_attention_dropout",
        attn_core="attention",
        mlp="mlp",
        mlp_out="post_mlp_dropout",
        parallel_attr="use_parallel_residual",
    ),
    Adapter(family="llama", model_types=("llama", "mistral", "qwen2", "qwen3", "gemma"), **_LLAMA_LIKE),
    Adapter(
        family="gemma2",
        model_types=("gemma2", "gemma3_text"),
        blocks="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        attn="post_attention_layernorm",
        attn_core="self_attn",
        mlp="mlp",
        mlp_out="post_feedforward_layernorm",
    ),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a `config.model_type`, or an error listing what is supported."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise MriError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "A new family is one Adapter entry in mri/models/adapters.py."
    )


def get_module(root: nn.Module, path: str) -> nn.Module:
    """`root.get_submodule(path)` with an error that names the adapter path that failed."""
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise MriError(f"module {path!r} not found in {type(root).__name__}: the adapter does not fit") from e
