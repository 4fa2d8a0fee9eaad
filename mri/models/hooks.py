"""Hooks that read, add to, replace, or stop the forward pass at sites — installed for one run, always removed.

Each requested site maps to a PyTorch forward (pre-)hook on the module the adapter names. The value a
site holds is transformed in this order: replace, then add, then read — so the cache records what the rest
of the model actually sees. `hook_resid_mid` has no module of its own: it is `resid_pre + attn_out`, so it
is read from the attention sub-layer's output and written by changing that output, which changes the
residual stream exactly as writing resid_mid would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from mri.errors import MriError
from mri.models.adapters import Adapter, get_module
from mri.models.sites import Site, block_site

Replacement = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised inside a hook once the last site a caller needs has been computed."""


@dataclass
class Plan:
    """What to do at which sites during one forward pass."""

    read: set[Site] = field(default_factory=set)
    add: dict[Site, torch.Tensor] = field(default_factory=dict)
    replace: dict[Site, Replacement] = field(default_factory=dict)
    stop_after: Site | None = None
    detach: bool = True

    def touches(self, site: Site) -> bool:
        return site in self.read or site in self.add or site in self.replace

    def sites(self) -> set[Site]:
        return set(self.read) | set(self.add) | set(self.replace)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _cast(vec: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return vec.to(device=like.device, dtype=like.dtype)


class _Runner:
    """Applies a Plan at each site as its hook fires, filling `cache`."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.cache: dict[str, torch.Tensor] = {}
        self.resid_pre: dict[int, torch.Tensor] = {}

    def edit(self, site: Site, value: torch.Tensor) -> torch.Tensor:
        """Replace and add at `site` (no read, no stop)."""
        if site in self.plan.replace:
            r = self.plan.replace[site]
            new = r(value) if callable(r) else _cast(r, value)
            if new.shape != value.shape:
                raise MriError(
                    f"replacement at {site.name} has shape {tuple(new.shape)}, the site holds {tuple(value.shape)}"
                )
            value = new
        if site in self.plan.add:
            value = value + _cast(self.plan.add[site], value)
        return value

    def finish(self, site: Site, value: torch.Tensor) -> None:
        """Read and maybe stop at `site`, after edits."""
        if site in self.plan.read:
            self.cache[site.name] = value.detach() if self.plan.detach else value
        if self.plan.stop_after == site:
            raise StopForward

    def visit(self, site: Site, value: torch.Tensor) -> torch.Tensor:
        value = self.edit(site, value)
        self.finish(site, value)
        return value


def _output_hook(runner: _Runner, site: Site):
    def hook(module, args, out):
        value = _first(out)
        new = runner.visit(site, value)
        return None if new is value else _with_first(out, new)

    return hook


def _input_hook(runner: _Runner, site: Site, remember_layer: int | None = None):
    """Pre-hook on a module whose first input (positional or `hidden_states`) is the site's value."""

    def hook(module, args, kwargs):
        if args:
            value = args[0]
        else:
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            value = kwargs[key]
        new = runner.visit(site, value) if runner.plan.touches(site) else value
        if remember_layer is not None:
            runner.resid_pre[remember_layer] = new
        if new is value:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, key: new}

    return hook


def _attn_hook(runner: _Runner, attn_out: Site, resid_mid: Site | None):
    """Attention sub-layer output: `hook_attn_out`, and `hook_resid_mid` = resid_pre + attn_out."""

    def hook(module, args, out):
        a0 = _first(out)
        a = runner.visit(attn_out, a0) if runner.plan.touches(attn_out) else a0
        if resid_mid is not None and runner.plan.touches(resid_mid):
            pre = runner.resid_pre[resid_mid.layer]
            mid = pre + a
            if resid_mid in runner.plan.replace:
                new_mid = runner.edit(resid_mid, mid)
                a = new_mid - pre
            elif resid_mid in runner.plan.add:
                a = a + _cast(runner.plan.add[resid_mid], a)
                new_mid = pre + a
            else:
                new_mid = mid
            runner.finish(resid_mid, new_mid)
        return None if a is a0 else _with_first(out, a)

    return hook


def _pattern_hook(runner: _Runner, site: Site):
    def hook(module, args, out):
        if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
            raise MriError("this attention module returned no pattern; patterns need eager attention")
        runner.finish(site, out[1])

    return hook


@contextmanager
def install(hf: nn.Module, adapter: Adapter, plan: Plan) -> Iterator[dict[str, torch.Tensor]]:
    """Install the hooks a Plan needs on `hf`; yield the cache; remove every hook on exit, even on error."""
    runner = _Runner(plan)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    sites = plan.sites()
    for site in sites:
        if site.kind == "attn_pattern" and (site in plan.add or site in plan.replace):
            raise MriError(f"{site.name} is read-only: attention patterns can be read, not written")
    blocks = get_module(hf, adapter.blocks)
    try:
        by_layer: dict[int, set[str]] = {}
        for site in sites:
            by_layer.setdefault(site.layer, set()).add(site.kind)
            if site.kind == "embed":
                handles.append(
                    get_module(hf, adapter.embed).register_forward_hook(_output_hook(runner, site))
                )
            elif site.kind == "ln_final":
                handles.append(
                    get_module(hf, adapter.final_norm).register_forward_hook(_output_hook(runner, site))
                )
        for layer, kinds in by_layer.items():
            if layer < 0 or layer >= len(blocks):
                continue
            block = blocks[layer]

            def at(kind: str, layer: int = layer) -> Site:
                return block_site(layer, kind)

            if "resid_pre" in kinds or "resid_mid" in kinds:
                remember = layer if "resid_mid" in kinds else None
                handles.append(
                    block.register_forward_pre_hook(
                        _input_hook(runner, at("resid_pre"), remember), with_kwargs=True
                    )
                )
            if "attn_out" in kinds or "resid_mid" in kinds:
                mid = at("resid_mid") if "resid_mid" in kinds else None
                attn = get_module(block, adapter.attn)
                handles.append(attn.register_forward_hook(_attn_hook(runner, at("attn_out"), mid)))
            if "attn_pattern" in kinds:
                core = get_module(block, adapter.attn_core)
                handles.append(core.register_forward_hook(_pattern_hook(runner, at("attn_pattern"))))
            if "mlp_in" in kinds:
                mlp = get_module(block, adapter.mlp)
                handles.append(
                    mlp.register_forward_pre_hook(_input_hook(runner, at("mlp_in")), with_kwargs=True)
                )
            if "mlp_out" in kinds:
                mlp_out = get_module(block, adapter.mlp_out)
                handles.append(mlp_out.register_forward_hook(_output_hook(runner, at("mlp_out"))))
            if "resid_post" in kinds:
                handles.append(block.register_forward_hook(_output_hook(runner, at("resid_post"))))
        yield runner.cache
    finally:
        for h in handles:
            h.remove()
