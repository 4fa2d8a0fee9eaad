"""Configuration of a dictionary (what it is) and of its training (how it is fitted), one dataclass each."""

from __future__ import annotations

import itertools
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from mri.errors import MriError

ARCHS = ("topk", "batchtopk", "jumprelu", "relu", "gated")
"""Activation functions: TopK per token, BatchTopK over the batch, JumpReLU, ReLU with an L1 penalty, and
Gated (Rajamanoharan et al. 2024: a gate decides which latents fire, a magnitude path how strongly)."""
KINDS = ("sae", "transcoder", "clt")
"""SAE: a site to itself. Transcoder: an input site to an output site. CLT: one encoder per layer, decoders
from layer l to every layer >= l."""
INIT_NORMS = {"topk": 0.577, "batchtopk": 0.577, "jumprelu": 0.1, "relu": 0.1, "gated": 0.1}
"""Default norm of the encoder rows at initialisation, in normalised input units (E||x||^2 = d). TopK ranks
pre-activations, so a row's norm counts as much as its direction, and Adam moves every row by about the same
amount a step: from rows of 0.1, the latents picked first triple their norm within 100 steps and most others
are never picked again (mri-base, k 8: 54% dead, which AuxK does not revive). From 0.577 (1/sqrt(3), the
expected norm of torch's default Linear rows, where sparsify starts) those steps are small beside the rows
and the choice turns on direction: k 8 0.2% dead and a 16% lower FVU after 2,000 steps, k 16 5% lower, k 32
and 64 1% higher. JumpReLU, ReLU and Gated keep 0.1. JumpReLU (TopK in its warm-up) lost fewer latents
from 0.577 but no FVU at equal L0, and at L0 above ~200 a higher one (coefficient 0.1, 2,000 steps: 0.0114
against 0.0074). ReLU's decoder rows start there too, and from rows of 1 its first reconstructions are far
too large (docs/dictionaries.md "Initial norms")."""
FORMAT_VERSION = 1


@dataclass
class DictConfig:
    """The shape and activation function of one dictionary; saved as `config.json` beside its weights."""

    kind: str
    """sae | transcoder | clt."""
    arch: str
    """topk | batchtopk | jumprelu | relu | gated."""
    d_in: int
    """Width of each input site."""
    n_latents: int
    """Latents (per layer for a CLT)."""
    sites_in: list[str]
    """Input site(s): one for an SAE or transcoder, one per layer for a CLT."""
    sites_out: list[str]
    """Output site(s), aligned with `sites_in` (an SAE's equal its inputs)."""
    d_out: int | None = None
    """Width of each output site (default d_in)."""
    k: int = 32
    """Active latents per token for topk, on average for batchtopk, and for jumprelu in its TopK warm-up (per
    layer for a CLT)."""
    skip: bool = False
    """Transcoder only: add a learned linear skip connection x @ W_skip."""
    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of JumpReLU's straight-through threshold gradient."""
    jumprelu_init_threshold: float = 0.1
    """JumpReLU's initial threshold, in normalised input units."""
    init_norm: float | None = None
    """Norm of each encoder row at initialisation, and of each decoder row where decoder norms are free
    (relu); None: `INIT_NORMS[arch]`, 0.577 for topk and batchtopk, 0.1 for jumprelu, relu and gated."""
    matryoshka: list[int] | None = None
    """Nested prefix widths for Matryoshka training (SAEs and transcoders), strictly increasing and below
    n_latents, e.g. [256, 1024] for 4,096 latents: the loss is the mean of the FVUs of the reconstructions
    from latents [0, m) for each m and from all of them, so the first latents must work as a small
    dictionary on their own and hold the most general features (Bussmann et al. 2025; Nabeshima 2024). It
    changes training only: the dictionary encodes and decodes as one of its arch."""
    model_fingerprint: str | None = None
    """sha256 prefix of the model the dictionary was trained on, when known."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MriError(f"unknown dictionary kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.arch not in ARCHS:
            raise MriError(f"unknown architecture {self.arch!r}; use one of {', '.join(ARCHS)}")
        if self.d_out is None:
            self.d_out = self.d_in
        if min(self.d_in, self.d_out, self.n_latents) <= 0:
            raise MriError("d_in, d_out and n_latents must be positive")
        if self.arch in ("topk", "batchtopk") and not 0 < self.k <= self.n_latents:
            raise MriError(f"k must be between 1 and n_latents ({self.n_latents}), got {self.k}")
        if len(self.sites_in) != len(self.sites_out) or not self.sites_in:
            raise MriError("give one output site per input site")
        if self.kind == "sae" and self.sites_in != self.sites_out:
            raise MriError("an SAE reads and writes the same site; use kind 'transcoder' for two sites")
        if self.kind != "clt" and len(self.sites_in) != 1:
            raise MriError(f"a {self.kind} has one input site; use kind 'clt' for several layers")
        if self.init_norm is None:
            self.init_norm = INIT_NORMS[self.arch]
        if not self.init_norm > 0:
            raise MriError(
                f"init_norm must be positive (--init-norm), got {self.init_norm}; the default is "
                f"{INIT_NORMS[self.arch]} for {self.arch}"
            )
        if self.skip and self.kind == "sae":
            raise MriError("a skip connection is for transcoders, not SAEs")
        if self.arch == "gated" and self.kind == "clt":
            raise MriError(
                "the gated arch is for SAEs and transcoders, not CLTs; use relu or jumprelu for a CLT"
            )
        if self.matryoshka is not None:
            self.matryoshka = [int(m) for m in self.matryoshka]
            widths = self.matryoshka
            if self.kind == "clt":
                raise MriError("Matryoshka prefixes (--matryoshka) are for SAEs and transcoders, not CLTs")
            if not widths or any(b <= a for a, b in itertools.pairwise(widths)) or not 0 < widths[0]:
                raise MriError(
                    f"Matryoshka widths (--matryoshka) must be positive and strictly increasing, got {widths}"
                )
            if widths[-1] >= self.n_latents:
                raise MriError(
                    f"Matryoshka widths (--matryoshka) must stay below n_latents ({self.n_latents}), got "
                    f"{widths}; the whole dictionary is always the last level"
                )

    @property
    def n_layers(self) -> int:
        """Input sites (1 unless a CLT)."""
        return len(self.sites_in)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DictConfig:
        """The config saved as `data` (config.json); MriError naming what is missing or wrong."""
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise MriError(f"not a dictionary config: it has no {', '.join(missing)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as e:
            raise MriError(f"not a valid dictionary config: {e}") from e


@dataclass
class TrainConfig:
    """How dictionaries are trained; the common fields are `mri dict train` options."""

    tokens: int = 20_000_000
    """Training tokens (steps = tokens // batch_size)."""
    batch_size: int = 4096
    """Tokens per step."""
    lr: float | None = None
    """Adam learning rate; None: 5e-4 / sqrt(n_latents / 16384), the square-root law of Gao et al. at 2.5 times
    their constant (1e-3 at 4,096 latents). Their 2e-4 is tuned for long runs; on mri-base (500 steps, 4,096
    latents) 1e-3 beat 4e-4 for every architecture (topk k 64 FVU 0.18 vs 0.21, batchtopk k 16 0.32 vs 0.39,
    jumprelu 0.20 vs 0.21 at lower L0, relu 0.48 at L0 75 vs 0.58 at L0 183), and the warm-up and final
    decay keep it stable."""
    warmup_steps: int | None = None
    """Linear LR warm-up; None: min(1000, 5% of steps)."""
    decay_fraction: float = 0.2
    """The LR decays linearly to zero over this last fraction of the steps."""
    sparsity_coef: float | None = None
    """L1 (relu, and gated's gate) or L0 (jumprelu) coefficient; None: the arch's default."""
    sparsity_warmup_fraction: float = 0.05
    """The sparsity coefficient ramps linearly from zero over this first fraction of the steps."""
    topk_warmup_fraction: float = 1 / 3
    """BatchTopK and JumpReLU: select each token's top k (as TopK) over this first fraction of the steps.
    BatchTopK then takes the batch's top k x batch. From a fresh dictionary the batch-wide cut ranks random
    projections, so it hands most activations to the tokens with the largest norms and the latents settle on
    blends of features; started once TopK has found them, BatchTopK keeps them (toy features, 600 steps: mean
    max cosine 0.77 batch-wide from the start, 0.98 with the first third per token; on mri-base the FVU at
    equal L0 stays within 1%, and at k 16 1.4% of the latents die instead of 17%). Its inference threshold
    is tracked from the switch on. JumpReLU, from low initial thresholds, fires on a large share of the
    tokens and learns blends that its L0 penalty then kills; over the warm-up its thresholds follow the
    selection instead, without the penalty, and at the switch it fires about k a token (toy: 0.85 without,
    0.98 with the warm-up)."""
    auxk: bool | None = None
    """AuxK loss that revives dead latents; None: on for topk and batchtopk."""
    auxk_alpha: float = 1 / 8
    """Weight of the AuxK loss. Gao et al. and sparsify use 1/32; on mri-base (4,096 latents, 500 steps) that
    left 24% of topk's latents dead at k 16, and 1/8 leaves 0.3% with a lower FVU, equal at k 32 and 64,
    where few latents die and AuxK, scaled by the dead count, hardly acts (docs/dictionaries.md)."""
    dead_tokens: int | None = None
    """A latent silent for this many tokens is dead; None: min(10M, max(tokens / 20, 10 batches))."""
    b_dec_init: str = "median"
    """Initial decoder bias: median (geometric median of the first batch), mean, or zero."""
    normalize: bool = True
    """Scale inputs and outputs so that E||x||^2 = d while training; folded into the weights on save."""
    autocast: bool = False
    """bf16 autocast for the compute (fp32 master weights); meant for GPUs."""
    sparse_kernels: bool = True
    """TopK/BatchTopK: the encoder backward and decoder touch only active latents."""
    cuda_graphs: bool = True
    """One CUDA device, one process: capture the step as CUDA graphs (without AuxK, with) and replay them."""
    seed: int = 0
    checkpoint_every: int = 0
    """Write a resumable checkpoint every this many steps (0: only at the end of `fit`)."""
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999))
    threshold_lr_scale: float = 30.0
    """JumpReLU: the log-thresholds' LR as a multiple of the LR. Adam moves a parameter by about its LR per
    step, so at 1x a log-threshold can change by at most LR x steps (20% over 500 steps at 4e-4) and the
    L0 coefficient has almost no effect; at 30x the thresholds settle where the coefficient puts them."""

    def __post_init__(self) -> None:
        if self.tokens < self.batch_size or self.batch_size <= 0:
            raise MriError(f"tokens ({self.tokens}) must be at least one batch ({self.batch_size})")
        if self.b_dec_init not in ("median", "mean", "zero"):
            raise MriError(f"b_dec_init must be median, mean or zero, got {self.b_dec_init!r}")
        if not self.threshold_lr_scale > 0:
            raise MriError(
                f"threshold_lr_scale must be positive (--threshold-lr-scale), got {self.threshold_lr_scale}; "
                "the default is 30"
            )
        if not 0 <= self.topk_warmup_fraction < 1:
            raise MriError(
                f"topk_warmup_fraction must be at least 0 and below 1 (--topk-warmup), got "
                f"{self.topk_warmup_fraction}; BatchTopK needs batch-wide steps to set its inference threshold"
            )
        self.adam_betas = tuple(self.adam_betas)

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def learning_rate(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else 5e-4 / math.sqrt(n_latents / 16384)

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(1000, self.steps // 20)

    def per_row(self, arch: str, step: int) -> bool:
        """Whether BatchTopK or JumpReLU selects each row's top k at `step` (their TopK warm-up)."""
        return arch in ("batchtopk", "jumprelu") and step < int(self.topk_warmup_fraction * self.steps)

    def dead_after(self) -> int:
        if self.dead_tokens is not None:
            return self.dead_tokens
        return min(10_000_000, max(self.tokens // 20, 10 * self.batch_size))

    def uses_auxk(self, arch: str) -> bool:
        return self.auxk if self.auxk is not None else arch in ("topk", "batchtopk")

    def coefficient(self, arch: str) -> float:
        if self.sparsity_coef is not None:
            return self.sparsity_coef
        # gated at 5 on mri-base L2 (4,096 latents, 512k tokens): L0 116, FVU 0.169; at 2: L0 331; at 10: L0 25
        return {"relu": 5.0, "jumprelu": 0.5, "gated": 5.0}.get(arch, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def differences(old: Any, new: Any, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """'field: old -> new' for each field in which two configs of one dataclass differ."""
    return [
        f"{f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
        for f in fields(old)
        if f.name not in ignore and getattr(old, f.name) != getattr(new, f.name)
    ]
