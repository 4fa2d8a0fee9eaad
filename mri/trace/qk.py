"""QK attribution: which features at the query and key positions made one attention score.

With norm scales frozen, a head's score q(r_q) . k(r_k) is bilinear in the residual streams at the query
and key positions, so the gradient of the score with respect to either, dotted with each component written
there (token embedding, earlier attention outputs, and each earlier MLP output split into its active
features and error), splits the score exactly over that side's components (each side on its own adds up
to the score); what biases add is left as that side's `rest`. Node ids are those of graph files (`{layer}_{latent}_{pos}`, `err_{layer}_{pos}`,
`E_{id}_{pos}`), plus `attn_{layer}_{pos}` for attention outputs and `skip_{layer}_{pos}` for a
transcoder's skip term.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mri.errors import MriError
from mri.models.adapters import get_module
from mri.trace.replacement import QUERY_KEY, ReplacementModel, Snapshot


class QKAttribution(NamedTuple):
    """One attention score split over the components of the residual stream at its query and key."""

    score: float
    """The pre-softmax score (query . key times the head's scaling), as the model computed it."""
    query: list[tuple[str, float]]
    """(node id, contribution) at the query position, largest |contribution| first."""
    key: list[tuple[str, float]]
    """The same at the key position (empty when query and key are the same position: see `query`)."""
    query_rest: float
    """Score minus the query side's contributions: biases and what is no node (e.g. position embeddings)."""
    key_rest: float
    """The same for the key side."""


def qk_attribution(
    rm: ReplacementModel, snap: Snapshot, layer: int, head: int, query_pos: int, key_pos: int
) -> QKAttribution:
    """Split head `head` of `layer`'s score from `query_pos` to `key_pos` over features and other nodes."""
    if not 0 <= key_pos <= query_pos < snap.n_pos:
        raise MriError(f"need 0 <= key_pos <= query_pos < {snap.n_pos}, got {key_pos}, {query_pos}")
    blocks = get_module(rm.hf, rm.adapter.blocks)
    attn_core = rm._attn[layer]
    store: dict = {"attn": {}}
    handles = []

    def make_leaf(module, args, kwargs):
        r = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        store["resid"] = r
        return ((r, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": r})

    def keep_attn(i):
        def hook(module, args, out):
            store["attn"][i] = (out[0] if isinstance(out, tuple) else out).detach()

        return hook

    QUERY_KEY[id(attn_core)] = None
    try:
        handles.append(blocks[layer].register_forward_pre_hook(make_leaf, with_kwargs=True))
        for i in range(layer):
            handles.append(get_module(blocks[i], rm.adapter.attn).register_forward_hook(keep_attn(i)))
        with torch.enable_grad():
            rm.run(snap)
            query, key = QUERY_KEY[id(attn_core)]
            kv = head // (query.shape[1] // key.shape[1])
            scaling = getattr(attn_core, "scaling", query.shape[-1] ** -0.5)
            score = (query[0, head, query_pos] @ key[0, kv, key_pos]) * scaling
            (grad,) = torch.autograd.grad(score, store["resid"])
    finally:
        QUERY_KEY.pop(id(attn_core), None)
        for h in handles:
            h.remove()
    grad = grad[0]
    sides = [query_pos] if query_pos == key_pos else [query_pos, key_pos]
    with torch.no_grad():
        found = [_components(rm, snap, store["attn"], layer, pos, grad[pos]) for pos in sides]
    key_side = found[1] if len(found) > 1 else []
    value = float(score.detach())
    rests = [value - sum(v for _, v in side) for side in (found[0], key_side or found[0])]
    return QKAttribution(value, found[0], key_side, *rests)


def _components(
    rm: ReplacementModel, snap: Snapshot, attn: dict, layer: int, pos: int, g: torch.Tensor
) -> list[tuple[str, float]]:
    """(node id, g . component) for everything written at `pos` before block `layer`."""
    tc = rm.transcoders
    out = [(f"E_{int(snap.input_ids[pos])}_{pos}", float(g @ snap.embed[pos]))]
    for i in range(layer):
        out.append((f"attn_{i}_{pos}", float(g @ attn[i][0, pos])))
        out.append((f"err_{i}_{pos}", float(g @ snap.errors[i, pos])))
        skip = tc.W_skip(i)
        if skip is not None:
            out.append((f"skip_{i}_{pos}", float(g @ (snap.mlp_in[i, pos] @ skip))))
    here = (snap.features[:, 1] == pos) & (snap.features[:, 0] < layer)
    for (src, _, latent), a in zip(
        snap.features[here].tolist(), snap.activations[here].tolist(), strict=True
    ):
        written = sum(tc.W_dec(src, t)[latent] for t in tc.targets(src) if t < layer)
        out.append((f"{src}_{latent}_{pos}", float(a * (g @ written))))
    return sorted(out, key=lambda c: -abs(c[1]))
