"""The local replacement model: the real model with attention patterns and norm scales frozen at their
values on one prompt, and each MLP output replaced by transcoder features plus an error node.

Nothing is re-implemented: hooks on the unmodified `transformers` modules make each nonlinear piece an
affine function around the prompt's own forward pass:

- norms: y = y0 + (centre(x) - centre(x0)) / s0 * gain, with the denominator s0 of the real pass;
- attention: the pattern of the real pass is a constant (a registered attention function multiplies it
  with the current values);
- MLPs: out = out0 + decode(changed features) + skip(x - x0); with every feature held this is a constant,
  `out0` = decode(features) + error, which is exactly the model's own MLP output.

On the prompt itself every delta is exactly zero, so the replacement model reproduces the model's logits
bit for bit (under eager attention); with features held it is affine in its inputs, so gradients give
exact direct effects between nodes. The MLP's own computation is skipped (its input is cut to zero
positions), since its output is known.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from mri.errors import MriError
from mri.models.adapters import get_module
from mri.trace.transcoders import TranscoderSet

FROZEN_ATTENTION = "mri_frozen_pattern"
_PATTERNS: dict[int, torch.Tensor] = {}
"""id(attention module) -> frozen pattern (1, heads, query, key), set only inside a frozen pass."""
QUERY_KEY: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
"""id(attention module) -> its (query, key) states of the last frozen pass, for modules listed here."""


def _frozen_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention with a constant pattern: pattern @ values, in eager attention's layout."""
    pattern = _PATTERNS.get(id(module))
    if pattern is None:
        raise MriError("the frozen attention function ran outside a replacement-model pass")
    if id(module) in QUERY_KEY:
        QUERY_KEY[id(module)] = (query, key)
    n_rep = query.shape[1] // value.shape[1]
    if n_rep > 1:
        value = value.repeat_interleave(n_rep, dim=1)
    out = torch.matmul(pattern.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), pattern


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FROZEN_ATTENTION, _frozen_attention)


_register_attention()


class _Stop(Exception):
    """Ends a frozen pass once the final norm's output is known."""


# ---- norms ------------------------------------------------------------------------------------------
def _norm_kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm") and hasattr(module, "bias"):
        return "layernorm"
    if "RMSNorm" in name:
        return "rms_one_plus" if name.startswith("Gemma") else "rms"
    return None


@dataclass
class FrozenNorm:
    """A norm at its values on the prompt: y = y0 + centre(x - x0) / scale * gain."""

    kind: str
    x0: torch.Tensor
    """(1, pos, d) input on the prompt."""
    y0: torch.Tensor
    """(1, pos, d) output on the prompt."""
    scale: torch.Tensor
    """(1, pos, 1) the frozen denominator."""
    gain: torch.Tensor
    """(d,) elementwise gain."""

    @classmethod
    def record(cls, module: nn.Module, x: torch.Tensor, y: torch.Tensor, path: str) -> FrozenNorm:
        kind = _norm_kind(module)
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6))
        xf = x.detach().float()
        if kind == "layernorm":
            centred = xf - xf.mean(-1, keepdim=True)
            scale = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        else:
            centred = xf
            scale = (xf.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        weight = module.weight.detach().float() if getattr(module, "weight", None) is not None else None
        gain = (
            torch.ones(x.shape[-1], device=x.device)
            if weight is None
            else (1.0 + weight if kind == "rms_one_plus" else weight)
        )
        bias = getattr(module, "bias", None)
        guess = centred / scale * gain + (bias.detach().float() if bias is not None else 0.0)
        if not torch.allclose(guess, y.detach().float(), rtol=1e-3, atol=1e-4 * (1 + y.abs().max().item())):
            raise MriError(
                f"the norm at {path} ({type(module).__name__}) does not compute centre(x)/scale*gain+bias; "
                "the replacement model cannot freeze it"
            )
        return cls(kind, x.detach(), y.detach(), scale.to(x.dtype), gain.to(x.dtype))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        dx = x - self.x0
        if self.kind == "layernorm":
            dx = dx - dx.mean(-1, keepdim=True)
        return self.y0 + dx / self.scale * self.gain


# ---- the prompt's snapshot --------------------------------------------------------------------------
@dataclass
class Snapshot:
    """Everything the replacement model holds fixed for one prompt (batch 1, `pos` tokens)."""

    input_ids: torch.Tensor
    """(pos,) token ids."""
    logits: torch.Tensor
    """(pos, vocab) the model's logits (eager attention)."""
    embed: torch.Tensor
    """(pos, d_model) output of the token embedding: the token nodes' vectors."""
    mlp_in: torch.Tensor
    """(n_layers, pos, d_in) each MLP's input (`hook_mlp_in`)."""
    mlp_out: torch.Tensor
    """(n_layers, pos, d_out) each MLP's true output (`hook_mlp_out`)."""
    final: torch.Tensor
    """(pos, d_model) output of the final norm."""
    features: torch.Tensor
    """(n_active, 3) active (layer, pos, latent), sorted; none at a BOS position."""
    activations: torch.Tensor
    """(n_active,) their activations."""
    errors: torch.Tensor
    """(n_layers, pos, d_out) true MLP output minus the transcoders' output (zero at a BOS position)."""
    patterns: dict[int, torch.Tensor] = field(repr=False)
    """layer -> (1, heads, query, key) attention pattern."""
    norms: dict[str, FrozenNorm] = field(repr=False)
    """module path -> frozen norm."""
    bos: bool = False
    """Whether position 0 is a BOS token whose nodes are left out (it is a constant, as in circuit-tracer)."""

    @property
    def n_pos(self) -> int:
        return int(self.input_ids.shape[0])


class FrozenOutput(NamedTuple):
    """What a frozen pass returns."""

    logits: torch.Tensor | None
    """(batch, pos, vocab) the model's logits (None when the pass stopped at the final norm)."""
    final: torch.Tensor
    """(batch, pos, d_model) output of the final norm."""
    mlp_in: list[torch.Tensor]
    """Per layer, (batch, pos, d_in) the MLP's input."""


Changes = Mapping[tuple[int, int, int], float]
"""(layer, pos, latent) -> new activation."""


class ReplacementModel:
    """A model with transcoders: `prepare` a prompt, then run frozen passes around it."""

    def __init__(self, model, transcoders: TranscoderSet | object):
        self.model = model
        self.hf = model.hf
        self.adapter = model.adapter
        self.n_layers = model.n_layers
        self.transcoders = (
            transcoders
            if isinstance(transcoders, TranscoderSet)
            else TranscoderSet(transcoders, model.n_layers)
        )
        self.transcoders.check_model(model)
        if self.transcoders.device != model.device:
            self.transcoders.to(model.device)  # everything follows the model's device
        blocks = get_module(self.hf, self.adapter.blocks)
        self._blocks = list(blocks)
        self._mlp = [get_module(b, self.adapter.mlp) for b in self._blocks]
        self._mlp_out = [get_module(b, self.adapter.mlp_out) for b in self._blocks]
        self._attn = [get_module(b, self.adapter.attn_core) for b in self._blocks]
        self._embed = get_module(self.hf, self.adapter.embed)
        self._final = get_module(self.hf, self.adapter.final_norm)
        self._norms = self._find_norms()

    def _find_norms(self) -> dict[str, nn.Module]:
        """Norm modules in the residual path: each block's, outside attention and the MLP, and the final."""
        found: dict[str, nn.Module] = {}
        for i, block in enumerate(self._blocks):
            skip = {id(self._mlp_out[i])}
            inside = [self._attn[i], self._mlp[i]]
            for name, module in block.named_modules():
                if id(module) in skip or _norm_kind(module) is None:
                    continue
                if any(module is not owner and _contains(owner, module) for owner in inside):
                    continue
                found[f"{self.adapter.blocks}.{i}.{name}"] = module
        found[self.adapter.final_norm] = self._final
        return found

    @property
    def unembed(self) -> torch.Tensor:
        """(vocab, d_model) the unembedding matrix."""
        return self.hf.get_output_embeddings().weight

    # ---- the prompt's own pass ---------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, input_ids: torch.Tensor, *, zero_bos: bool = True) -> Snapshot:
        """Run the real model once on `input_ids` (pos,) or (1, pos) and record what the replacement
        model freezes: patterns, norm scales, MLP inputs and outputs, active features and errors."""
        ids = input_ids.reshape(-1).to(self.model.device)
        if ids.numel() == 0:
            raise MriError("the prompt has no tokens")
        ctx = context_length(self.model)
        if ctx is not None and ids.numel() > ctx:
            raise MriError(
                f"the prompt has {ids.numel()} tokens, more than {self.model.name}'s context of {ctx}; "
                "shorten it (attention patterns past the context are not what the model learned)"
            )
        vocab = int(self.unembed.shape[0])
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise MriError(f"token ids must lie in 0..{vocab - 1}; got {int(ids.min())}..{int(ids.max())}")
        rec: dict = {"norms": {}, "patterns": {}, "mlp_in": {}, "mlp_out": {}}
        handles = []

        def norm_hook(path):
            def hook(module, args, out):
                rec["norms"][path] = FrozenNorm.record(module, args[0], out, path)

            return hook

        def keep(key, layer, first_input=False):
            def hook(module, args, kwargs_or_out, *rest):
                if first_input:
                    value = (
                        args[0]
                        if args
                        else kwargs_or_out.get("hidden_states", next(iter(kwargs_or_out.values())))
                    )
                else:
                    value = kwargs_or_out[0] if isinstance(kwargs_or_out, tuple) else kwargs_or_out
                rec[key][layer] = value.detach()

            return hook

        def pattern_hook(layer):
            def hook(module, args, out):
                if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
                    raise MriError("attention returned no pattern under eager attention")
                rec["patterns"][layer] = out[1].detach()

            return hook

        def embed_hook(module, args, out):
            rec["embed"] = out.detach()

        previous = self.hf.config._attn_implementation
        try:
            self.hf.set_attn_implementation("eager")
            for path, module in self._norms.items():
                handles.append(module.register_forward_hook(norm_hook(path)))
            for i in range(self.n_layers):
                handles.append(
                    self._mlp[i].register_forward_pre_hook(keep("mlp_in", i, True), with_kwargs=True)
                )
                handles.append(self._mlp_out[i].register_forward_hook(keep("mlp_out", i)))
                handles.append(self._attn[i].register_forward_hook(pattern_hook(i)))
            handles.append(self._embed.register_forward_hook(embed_hook))
            logits = self.hf(input_ids=ids[None], use_cache=False).logits[0]
        finally:
            for h in handles:
                h.remove()
            self.hf.set_attn_implementation(previous)
        mlp_in = torch.stack([rec["mlp_in"][i][0] for i in range(self.n_layers)])
        mlp_out = torch.stack([rec["mlp_out"][i][0] for i in range(self.n_layers)])
        bos_id = (
            getattr(self.model.tokenizer, "bos_token_id", None) if self.model.tokenizer is not None else None
        )
        bos = bool(zero_bos and bos_id is not None and int(ids[0]) == bos_id)
        features, activations = self._active(mlp_in, bos)
        errors = torch.stack(
            [
                mlp_out[t] - self._decode_sparse(t, features, activations, len(ids), mlp_in[t])
                for t in range(self.n_layers)
            ]
        )
        if bos:
            errors[:, 0] = 0
        return Snapshot(
            input_ids=ids,
            logits=logits,
            embed=rec["embed"][0],
            mlp_in=mlp_in,
            mlp_out=mlp_out,
            final=rec["norms"][self.adapter.final_norm].y0[0],
            features=features,
            activations=activations,
            errors=errors,
            patterns=rec["patterns"],
            norms=rec["norms"],
            bos=bos,
        )

    def _active(self, mlp_in: torch.Tensor, bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows, values = [], []
        for layer in self.transcoders.layers:
            acts = self.transcoders.encode_layer(layer, mlp_in[layer])
            if bos:
                acts[0] = 0
            pos, latent = (acts > 0).nonzero(as_tuple=True)
            rows.append(torch.stack([torch.full_like(pos, layer), pos, latent], dim=1))
            values.append(acts[pos, latent])
        return torch.cat(rows), torch.cat(values)

    def _decode_sparse(
        self, target: int, features: torch.Tensor, values: torch.Tensor, n_pos: int, x: torch.Tensor | None
    ) -> torch.Tensor:
        """(pos, d_out) what `features` (n, 3) with activations `values` write to layer `target`, plus the
        decoder bias and skip term when `x` (pos, d_in) is given (else neither)."""
        tc = self.transcoders
        out = torch.zeros(n_pos, self.model.d_model, dtype=values.dtype, device=values.device)
        for source in tc.sources(target):
            sel = features[:, 0] == source
            if sel.any():
                rows = values[sel, None] * tc.W_dec(source, target)[features[sel, 2]]
                out.index_add_(0, features[sel, 1], rows.to(out.dtype))
        if x is not None:
            if tc.sources(target):
                b = tc.clt.b_dec[target] if tc.clt is not None else tc.coders[target].b_dec
                out = out + b
            skip = tc.W_skip(target)
            if skip is not None:
                out = out + x @ skip
        return out

    # ---- frozen passes -----------------------------------------------------------------------------
    @contextmanager
    def _frozen(
        self,
        snap: Snapshot,
        mlp_out: Callable[[int, torch.Tensor], torch.Tensor],
        embed: torch.Tensor | None,
        stop: bool,
        sink: dict,
    ) -> Iterator[None]:
        handles = []

        def norm_hook(path):
            frozen = snap.norms[path]

            def hook(module, args, out):
                y = frozen.apply(args[0])
                if module is self._final:
                    sink["final"] = y
                    if stop:
                        raise _Stop
                return y

            return hook

        def mlp_pre(layer):
            def hook(module, args, kwargs):
                if args:
                    x = args[0]
                    sink["mlp_in"][layer] = x
                    return (x[..., :0, :], *args[1:]), kwargs
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                x = kwargs[key]
                sink["mlp_in"][layer] = x
                return args, {**kwargs, key: x[..., :0, :]}

            return hook

        def mlp_post(layer):
            def hook(module, args, out):
                value = mlp_out(layer, sink["mlp_in"][layer])
                return (value, *out[1:]) if isinstance(out, tuple) else value

            return hook

        previous = self.hf.config._attn_implementation
        try:
            for i, attn in enumerate(self._attn):
                _PATTERNS[id(attn)] = snap.patterns[i]
            self.hf.set_attn_implementation(FROZEN_ATTENTION)
            for path, module in self._norms.items():
                handles.append(module.register_forward_hook(norm_hook(path)))
            for i in range(self.n_layers):
                handles.append(self._mlp[i].register_forward_pre_hook(mlp_pre(i), with_kwargs=True))
                handles.append(self._mlp_out[i].register_forward_hook(mlp_post(i)))
            if embed is not None:
                handles.append(self._embed.register_forward_hook(lambda m, a, o: embed))
            yield
        finally:
            for h in handles:
                h.remove()
            for attn in self._attn:
                _PATTERNS.pop(id(attn), None)
            self.hf.set_attn_implementation(previous)

    def frozen_pass(
        self,
        snap: Snapshot,
        mlp_out: Callable[[int, torch.Tensor], torch.Tensor],
        *,
        batch: int = 1,
        embed: torch.Tensor | None = None,
        stop: bool = False,
    ) -> FrozenOutput:
        """One pass with patterns and norms frozen and MLP outputs given by `mlp_out(layer, mlp_in)`.

        embed: (batch, pos, d_model) replaces the token embedding's output. stop: end at the final norm
        (logits None). Runs under the caller's grad mode.
        """
        sink: dict = {"mlp_in": {}}
        ids = snap.input_ids[None].expand(batch, -1)
        logits = None
        with self._frozen(snap, mlp_out, embed, stop, sink):
            try:
                logits = self.hf(input_ids=ids, use_cache=False).logits
            except _Stop:
                pass
        return FrozenOutput(logits, sink["final"], [sink["mlp_in"][i] for i in range(self.n_layers)])

    def _skip_delta(self, snap: Snapshot, layer: int, x: torch.Tensor) -> torch.Tensor | int:
        skip = self.transcoders.W_skip(layer)
        return 0 if skip is None else (x - snap.mlp_in[layer]) @ skip

    def run(
        self,
        snap: Snapshot,
        changes: Changes | None = None,
        *,
        live: bool = False,
        embed: torch.Tensor | None = None,
    ) -> FrozenOutput:
        """The replacement model on the prompt, with attention patterns and norm scales frozen.

        changes: (layer, pos, latent) -> new activation (constrained patching: every other feature keeps
        its activation, unless `live`). live: recompute every feature from its layer's current MLP input
        (nonlinear; on the unchanged prompt this reproduces the model's logits exactly). embed: (1, pos,
        d_model) replaces the token embedding's output.
        """
        changes = dict(changes or {})
        tc = self.transcoders
        if changes:
            device = snap.activations.device
            keys = torch.tensor(list(changes), dtype=torch.long, device=device).reshape(-1, 3)
            new = torch.tensor(list(changes.values()), dtype=snap.activations.dtype, device=device)
        if not live:
            if changes:
                old = self._lookup(snap, keys)
                delta = [
                    self._decode_sparse(t, keys, new - old, snap.n_pos, None) for t in range(self.n_layers)
                ]

            def frozen_out(layer: int, x: torch.Tensor) -> torch.Tensor:
                out = snap.mlp_out[layer] + self._skip_delta(snap, layer, x)
                return out + delta[layer] if changes else out

            return self.frozen_pass(snap, frozen_out, embed=embed)
        acts: dict[int, torch.Tensor] = {}
        acts0: dict[int, torch.Tensor] = {}

        def live_out(layer: int, x: torch.Tensor) -> torch.Tensor:
            a = tc.encode_layer(layer, x)
            a0 = tc.encode_layer(layer, snap.mlp_in[layer][None])
            if snap.bos:
                a[:, 0] = a0[:, 0]
            for (lay, p, f), v in changes.items():
                if lay == layer:
                    a[:, p, f] = v
            acts[layer], acts0[layer] = a, a0
            recon = tc.decode_layer(acts, x, layer)
            recon0 = tc.decode_layer(acts0, snap.mlp_in[layer][None], layer)
            return snap.mlp_out[layer] + (recon - recon0)

        return self.frozen_pass(snap, live_out, embed=embed)

    @staticmethod
    def _lookup(snap: Snapshot, keys: torch.Tensor) -> torch.Tensor:
        """Activations on the prompt of (layer, pos, latent) rows `keys` (0 where inactive)."""
        device = snap.activations.device
        out = torch.zeros(keys.shape[0], dtype=snap.activations.dtype, device=device)
        for i, key in enumerate(keys.tolist()):
            hit = (snap.features == torch.tensor(key, device=device)).all(1).nonzero()
            if hit.numel():
                out[i] = snap.activations[hit[0, 0]]
        return out

    # ---- reading targets ---------------------------------------------------------------------------
    def preactivation(self, out: FrozenOutput, layer: int, pos: int, latent: int) -> torch.Tensor:
        """(batch,) a feature's pre-activation W_enc . mlp_in + b_enc in a pass's output."""
        tc = self.transcoders
        return out.mlp_in[layer][:, pos] @ tc.W_enc(layer)[latent] + tc.b_enc(layer)[latent]

    def logit_effect(self, out: FrozenOutput, token: int, pos: int = -1) -> torch.Tensor:
        """(batch,) a token's logit minus the mean logit, before any soft-capping: what logit nodes measure."""
        W = self.unembed
        return out.final[:, pos] @ (W[token] - W.mean(0))


def context_length(model) -> int | None:
    """The model's context in tokens (max_position_embeddings or n_positions), if its config says."""
    config = model.hf.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _contains(owner: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in owner.modules())
