"""`Model`: a thin wrapper over an unmodified `transformers` causal LM that knows its sites.

`mri.load` finds the weights (a folder, a shipped organism's name, or a hub name where the network allows),
loads them from safetensors only, and picks the family adapter. `Model.run` performs one forward pass with
reads, additions and replacements at sites, and stops early after the last site a caller reads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from mri.errors import MriError
from mri.models.adapters import Adapter, adapter_for, get_module
from mri.models.hooks import Plan, Replacement, StopForward, install
from mri.models.sites import Site, all_site_names, parse_site

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


class RunOutput(NamedTuple):
    """What `Model.run` returns."""

    logits: torch.Tensor | None
    """(batch, pos, vocab) logits, or None when the pass stopped after the last site read."""
    cache: dict[str, torch.Tensor]
    """Canonical site name -> value (batch, pos, d) — or (batch, heads, query, key) for patterns."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accept torch dtypes or the strings fp32/fp16/bf16."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise MriError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return _DTYPES[dtype]


class Model:
    """A causal LM with named sites. `hf` is the untouched transformers model; `tokenizer` its tokenizer."""

    def __init__(self, hf: nn.Module, tokenizer, name: str, path: Path | None = None):
        self.hf = hf.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.path = path
        self.config = hf.config
        self.adapter: Adapter = adapter_for(hf.config.model_type)
        self.family = self.adapter.family
        self.n_layers = len(get_module(hf, self.adapter.blocks))
        self.d_model = int(hf.config.hidden_size)
        self.parallel = self.adapter.is_parallel(hf.config)
        self.site_names = all_site_names(self.n_layers, parallel=self.parallel)
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return f"Model({self.name!r}, family={self.family}, layers={self.n_layers}, d_model={self.d_model})"

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    # ---- sites -------------------------------------------------------------------------------------
    def site(self, name: str | Site) -> Site:
        """Parse and validate a site name for this model."""
        site = name if isinstance(name, Site) else parse_site(name, self.n_layers)
        if site.kind == "resid_mid" and self.parallel:
            raise MriError(
                f"{site.name} does not exist in {self.name}: its blocks are parallel (attention and MLP both "
                "read resid_pre). Use hook_resid_pre, hook_attn_out, hook_mlp_out or hook_resid_post."
            )
        return site

    def resolve_site(self, name: str) -> str:
        """Canonical name of a site ('L3.resid_post' -> 'blocks.3.hook_resid_post')."""
        return self.site(name).name

    def site_dim(self, name: str) -> int:
        """Width of the last axis at a site (d_model, or key positions for a pattern)."""
        site = self.site(name)
        if site.kind == "attn_pattern":
            raise MriError(f"{site.name} has shape (batch, heads, query, key); it has no fixed width")
        return self.d_model

    # ---- tokens ------------------------------------------------------------------------------------
    def to_tokens(self, text: str | Sequence[str], *, bos: bool = True) -> torch.Tensor:
        """Token ids (batch, pos) for one text or a batch of texts (right-padded), BOS first when asked."""
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        bos_id = self.tokenizer.bos_token_id
        if bos and bos_id is not None:
            rows = [[bos_id, *r] for r in rows]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids.to(self.device)

    # ---- running -----------------------------------------------------------------------------------
    def _plan(
        self,
        read: Iterable[str] = (),
        add: Mapping[str, torch.Tensor] | None = None,
        replace: Mapping[str, Replacement] | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> Plan:
        plan = Plan(
            read={self.site(s) for s in read},
            add={self.site(s): v for s, v in (add or {}).items()},
            replace={self.site(s): v for s, v in (replace or {}).items()},
            detach=detach,
        )
        if stop and plan.read:
            plan.stop_after = max(plan.read)
        return plan

    @contextmanager
    def hooks(
        self,
        read: Iterable[str] = (),
        add: Mapping[str, torch.Tensor] | None = None,
        replace: Mapping[str, Replacement] | None = None,
        detach: bool = True,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Hooks live for the `with` block (e.g. around `model.hf.generate`); yields the cache dict.

        Each forward pass inside overwrites the cache entry of a site it reads.
        """
        plan = self._plan(read, add, replace, stop=False, detach=detach)
        with self._attention_for(plan), install(self.hf, self.adapter, plan) as cache:
            yield cache

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        read: Iterable[str] = (),
        add: Mapping[str, torch.Tensor] | None = None,
        replace: Mapping[str, Replacement] | None = None,
        stop: bool = True,
        detach: bool = True,
        grad: bool = False,
    ) -> RunOutput:
        """One forward pass of `input_ids` (batch, pos).

        read: sites to cache. add: site -> vector added (broadcast over batch and positions). replace: site
        -> tensor or function of the value. stop: end the pass after the last site read (logits are then
        None). The model's weights and forward code are never changed; every hook is removed on return.
        """
        plan = self._plan(read, add, replace, stop=stop, detach=detach)
        input_ids = input_ids.to(self.device)
        logits = None
        with torch.set_grad_enabled(grad), self._attention_for(plan):
            with install(self.hf, self.adapter, plan) as cache:
                try:
                    out = self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                    logits = out.logits
                except StopForward:
                    pass
        return RunOutput(logits, cache)

    @contextmanager
    def _attention_for(self, plan: Plan) -> Iterator[None]:
        """Patterns exist only under eager attention: switch to it for a run that reads one."""
        wants_pattern = any(s.kind == "attn_pattern" for s in plan.read)
        previous = getattr(self.hf.config, "_attn_implementation", None)
        if not wants_pattern or previous == "eager":
            yield
            return
        self.hf.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.hf.set_attn_implementation(previous)

    # ---- identity ----------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 over the config and every weight's bytes: identifies exactly these weights, wherever the
        folder lives and whichever transformers version reads it (those config keys are left out)."""
        if self._fingerprint is None:
            config = self.hf.config.to_dict()
            for key in ("_name_or_path", "transformers_version", "_commit_hash"):
                config.pop(key, None)
            config = {k: v for k, v in config.items() if not k.startswith("_attn_implementation")}
            h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
            for name, tensor in sorted(self.hf.state_dict().items()):
                t = tensor.detach().to("cpu").contiguous()
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint


def _locate(name_or_path: str | Path) -> tuple[Path | None, str]:
    """A local folder for `name_or_path` (a path or a shipped organism), or None for a hub name."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MriError(
                f"{path} is a file; pass the model's folder (it holds config.json and *.safetensors)"
            )
        if not (path / "config.json").is_file():
            raise MriError(f"{path} is not a model folder: it has no config.json")
        return path, path.name
    if str(name_or_path).startswith("mri-"):
        from mri.zoo.organisms import resolve_organism

        return resolve_organism(str(name_or_path)), str(name_or_path)
    if str(name_or_path).startswith((".", "/", "~")) or "\\" in str(name_or_path):
        raise MriError(f"model folder {name_or_path} does not exist")
    return None, str(name_or_path)


def _check_architecture(path: Path) -> None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MriError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    adapter_for(config.get("model_type", "<missing model_type>"))
    if not any(path.glob("*.safetensors")):
        raise MriError(f"{path} has no *.safetensors weights; mri loads weights only from safetensors")


def load(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Model:
    """Load a causal LM and its tokenizer: a local folder, a shipped organism ('mri-base'), or a hub name.

    dtype: fp32 unless given (fp16 checkpoints such as the organisms are upcast: fp16 is slow and lossy on
    CPU); pass "bf16" or "fp16" to run a large model in half precision on a GPU.
    """
    from transformers import AutoModelForCausalLM

    path, name = _locate(name_or_path)
    torch_dtype = parse_dtype(dtype) or torch.float32
    source = str(path) if path is not None else name
    if path is not None:
        _check_architecture(path)
    try:
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True)
    except OSError as e:
        if path is None:
            raise MriError(
                f"could not load {name!r} from the model hub ({e.__class__.__name__}); offline, pass a local "
                "folder with config.json, tokenizer files and *.safetensors, or a shipped organism "
                "(`mri zoo list`)"
            ) from e
        raise MriError(f"could not load the model in {path}: {e}") from e
    if path is None:
        adapter_for(hf.config.model_type)
    tokenizer = load_tokenizer(source)
    model = Model(hf.to(device), tokenizer, name=name, path=path)
    return model


def load_tokenizer(source: str):
    """AutoTokenizer, falling back to a bare `tokenizer.json` (which loads under transformers 4.57 and 5)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as e:
        tok_file = Path(source) / "tokenizer.json"
        if tok_file.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
        raise MriError(f"no tokenizer could be loaded from {source}: {e}") from e
