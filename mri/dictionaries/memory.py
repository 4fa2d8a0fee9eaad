"""How much memory training a set of dictionaries needs on each device, and whether the device has it.

Weights, gradients and Adam's two moments are fp32 and exact. Activations are an upper estimate for one
step on a device's rows of the batch: the batch itself and its scaled copies, and the dense (rows,
n_latents) buffers of the encoder (pre-activations, AuxK's masked copy, top-k work space; with gradients
too for the dense archs). With latents sharded over N processes, each holds 1/N of every per-latent number
(weights, gradients, Adam and the dense buffers) and the whole of the replicated ones (b_dec, W_skip).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from mri.dictionaries.config import DictConfig, TrainConfig
from mri.errors import MriError

FLOAT = 4
"""Bytes per fp32 number."""


class MemoryEstimate(NamedTuple):
    """Bytes that training needs on one device."""

    weights: int
    """fp32 parameters of every dictionary."""
    gradients: int
    """Their gradients."""
    adam: int
    """Adam's first and second moments."""
    activations: int
    """Working memory of one step on this device's rows of the batch."""
    rows: int
    """Rows (tokens) of each batch on this device."""
    graph_pools: int = 0
    """CUDA graphs' private memory: each captured step (one without AuxK, one with) keeps its own
    gradients and working memory, next to the eager steps' (`Trainer.train_step`)."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.adam + self.activations + self.graph_pools

    def describe(self) -> str:
        pools = f", CUDA graphs {_size(self.graph_pools)}" if self.graph_pools else ""
        return (
            f"{_size(self.total)} per device: weights {_size(self.weights)}, gradients "
            f"{_size(self.gradients)}, Adam {_size(self.adam)}, activations {_size(self.activations)}{pools} "
            f"for {self.rows:,} tokens a step"
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parameter_count(cfg: DictConfig, *, shards: int = 1) -> int:
    """Trainable numbers of the dictionary `cfg` describes (what `build(cfg)` holds as parameters), or the
    share of one process when its latents are split over `shards`."""
    L, n, d_in, d_out = cfg.n_layers, -(-cfg.n_latents // shards), cfg.d_in, cfg.d_out
    decoders = L * (L + 1) // 2 if cfg.kind == "clt" else 1
    count = L * n * (d_in + 1) + decoders * n * d_out + L * d_out
    if cfg.skip:
        count += L * d_in * d_out
    if cfg.arch == "jumprelu":
        count += L * n
    if cfg.arch == "gated":
        count += 2 * L * n  # r_mag, b_mag
    return count


def activation_bytes(cfg: DictConfig, rows: int, *, sparse_kernels: bool = True, shards: int = 1) -> int:
    """Upper estimate of one training step's working memory for `cfg` on a batch of `rows` tokens (on one
    of `shards` processes that split its latents)."""
    L, n = cfg.n_layers, -(-cfg.n_latents // shards)
    per_layer = rows * (2 * cfg.d_in + 4 * cfg.d_out)
    dense = 3 if cfg.arch in ("topk", "batchtopk") and sparse_kernels else 6
    per_layer += dense * rows * n
    if cfg.arch in ("topk", "batchtopk"):
        per_layer += 3 * rows * cfg.k  # (row, latent, value) of each active pair
        if shards > 1:
            per_layer += 2 * rows * cfg.k * shards  # every shard's candidates (value, latent)
    return L * per_layer * FLOAT


def estimate(
    cfgs: Sequence[DictConfig],
    train: TrainConfig,
    *,
    processes: int = 1,
    shards: int = 1,
    graphs: bool = False,
) -> MemoryEstimate:
    """Bytes needed on each device to train `cfgs` together with `train`, each batch split over `processes`
    data-parallel ranks, or each dictionary's latents over `shards` ranks; with `graphs` (the trainer will
    capture its steps: `trainer.captures_steps`), two more copies of the gradients and working memory."""
    weights = sum(parameter_count(c, shards=shards) for c in cfgs) * FLOAT
    rows = -(-train.batch_size // processes)
    acts = sum(activation_bytes(c, rows, sparse_kernels=train.sparse_kernels, shards=shards) for c in cfgs)
    pools = 2 * (weights + acts) if graphs else 0
    return MemoryEstimate(weights, weights, 2 * weights, acts, rows, pools)


def free_bytes(device: str | torch.device) -> int:
    """Memory free on `device`: available host memory for the CPU, free GPU memory for CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(need: MemoryEstimate, device: str | torch.device, *, sharing: int = 1) -> None:
    """MriError naming the numbers unless `sharing` processes that each need `need` fit on `device`."""
    free = free_bytes(device)
    total = need.total * sharing
    if total > free:
        who = f"{sharing} processes x " if sharing > 1 else ""
        raise MriError(
            f"training needs {who}{need.describe()}, but {torch.device(device)} has {_size(free)} free: "
            "use a smaller --batch-size (activations) or fewer --latents (weights, gradients and Adam), or "
            "split the latents over more GPUs (torchrun ... --shard-latents)"
        )
